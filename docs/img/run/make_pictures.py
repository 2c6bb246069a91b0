"""Regenerate the pictures in docs/img/run/ (used by docs/evaluate.md).

    python docs/img/run/make_pictures.py RUN_FOLDER

RUN_FOLDER is a finished default run (``python -m nnx.train --out RUN_FOLDER``). Draws the
five plots of ``nnx.plots`` for it, makes a photo-like picture of a handwritten "3"
(dark pen on grey, noisy, unevenly lit paper; large and off-centre) and classifies it with
``nnx.predict`` (``--show`` preview enlarged for the docs). PNGs are palette-quantised to
keep the repository small.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent


def photo_of_digit(path, size=(640, 480), seed=0) -> Path:
    """A fake phone photo: a hand-drawn 3 on grey paper with a lighting gradient and noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[:h, :w]
    paper = 205 + 25 * (xx / w) - 15 * (yy / h)  # light from the right, darker at the bottom
    rgb = np.stack([paper + 4, paper + 1, paper - 6], axis=-1)  # slightly warm paper
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    ink, width = (38, 40, 72), 20
    cx, top = 400, 70  # off-centre: right of the middle
    # upper bowl and lower bowl of a "3", drawn as thick polylines along ellipse arcs
    def arc(x0, y0, rx, ry, a0, a1, n=60):
        t = np.radians(np.linspace(a0, a1, n))
        return [(x0 + rx * np.cos(a), y0 + ry * np.sin(a)) for a in t]
    upper = arc(cx, top + 80, 85, 78, 200, 450)   # from left, over the top, to the middle
    lower = arc(cx + 5, top + 245, 100, 92, 270, 520)  # from the middle, round the right, to lower left
    d.line(upper, fill=ink, width=width, joint="curve")
    d.line(lower, fill=ink, width=width, joint="curve")
    for x, y in (upper[0], upper[-1], lower[0], lower[-1]):  # round pen ends
        d.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=ink)
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    noisy = np.asarray(img, dtype=np.float64) + rng.normal(0, 7, (h, w, 1))
    img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
    img.save(path, quality=80)
    return Path(path)


def quantise(png: Path) -> None:
    im = Image.open(png).convert("RGB")
    im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        png, optimize=True)


def main(run_dir) -> None:
    import nnx.plots
    from nnx.imageprep import save_png
    from nnx.predict import predict

    for p in nnx.plots.plot_run(run_dir, out_dir=HERE):
        quantise(p)
        print(p, p.stat().st_size // 1024, "KB")
    photo = photo_of_digit(HERE / "handwritten_3.jpg")
    (r,) = predict(run_dir, [photo], show=True)
    print(r)
    seen = np.asarray(Image.open(r["preview"]), dtype=np.float32) / 255
    save_png(seen, HERE / "handwritten_3.nnx28x8.png", scale=8)  # enlarged for the docs


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/img/run/make_pictures.py RUN_FOLDER")
    main(sys.argv[1])
