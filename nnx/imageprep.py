"""Turn an arbitrary picture of one digit into an MNIST-style 28x28 input.

MNIST digits are white ink on a black background, the ink's bounding box scaled to 20 px on
its longer side (aspect ratio kept) and pasted into a 28x28 field so that the centre of mass
of the ink sits at the centre. ``preprocess`` repeats those steps for a photo or scan:

1. grayscale in [0, 1] (EXIF rotation applied, transparency composited on white);
2. pictures over 1024 px are shrunk to 1024 px, and any over 64 px get a 3x3 median
   filter (removes paper grain and sensor noise);
3. decide from the border pixels whether the background is light (dark ink on paper) or
   dark (light ink), and measure ink as "darker than the paper around it" — the paper's
   brightness is estimated locally, so shadows and uneven lighting do not count as ink;
4. stretch the ink to 1 (white ink on black, as in MNIST) and zero what lies within the
   border's noise level;
5. crop to the ink's bounding box (pixels above a threshold, grown over faint edges);
6. thicken very thin strokes (a fine pen on a big photo would vanish when shrunk);
7. scale the longer side to 20 px (Lanczos), paste into 28x28 with the centre of mass at
   (14, 14), and return float32 values in [0, 1].

Only NumPy and Pillow are used: this is input handling, not model maths.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SIZE = 28          #: the MNIST field
BOX = 20           #: the longer side of the ink's bounding box inside it
CENTRE = 14.0      #: where MNIST puts the centre of mass (row, column), in pixel indices
STROKE = 2.6       #: typical MNIST stroke width in px at the 20 px box size
_WORK = 80         #: intermediate resolution (longer side) for denoising and thickening
_INK = 0.25        #: threshold on the normalised image that counts as ink for the bounding box
_MAX_SIDE = 1024   #: larger pictures are first shrunk to this (area average)


class ImageError(ValueError):
    """A file cannot be turned into a 28x28 input (unreadable, wrong size...)."""


class EmptyImageError(ImageError):
    """The image holds no ink (blank, or too little contrast)."""


# --- loading -------------------------------------------------------------------------------
def to_gray(image) -> np.ndarray:
    """A PIL image or array (H, W), (H, W, 1/3/4), any dtype → float64 (H, W) in [0, 1].

    Transparent pixels are composited on white (digits drawn on a transparent canvas).
    """
    from PIL import Image, ImageOps

    if isinstance(image, Image.Image):
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # broken EXIF: keep the pixels as they are
            pass
        mode = image.mode
        if mode in ("I;16", "I;16B", "I;16L", "I"):
            a = np.asarray(image, dtype=np.float64)
            return np.clip(a / (65535.0 if a.max() > 255 else 255.0), 0.0, 1.0)
        if mode == "F":
            return _scale01(np.asarray(image, dtype=np.float64))
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        return np.asarray(image.convert("L"), dtype=np.float64) / 255.0

    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype == np.bool_:
        a = a.astype(np.float64)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        a = _to_unit(a)
        rgb = a[..., :3] @ np.array([0.299, 0.587, 0.114])
        if a.shape[-1] == 4:  # composite on white
            rgb = rgb * a[..., 3] + (1.0 - a[..., 3])
        return np.clip(rgb, 0.0, 1.0)
    if a.ndim != 2:
        raise ImageError(f"expected a 2-D grayscale or (H, W, 3/4) colour image, got shape {a.shape}")
    return _to_unit(a)


def _to_unit(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float64) / 65535.0
    return _scale01(a.astype(np.float64))


def _scale01(a: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(a)):
        raise ImageError("image contains NaN or infinite values")
    if a.size and a.max() > 1.0:
        a = a / 255.0
    return np.clip(a, 0.0, 1.0)


def load_array(path) -> np.ndarray:
    """A ``.npy`` file of 28x28 or 784 values, taken as already MNIST-like: float32 (28, 28).

    Values in [0, 255] (max > 1) are scaled to [0, 1]; no other preprocessing is done.
    """
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ImageError(f"not a readable .npy file ({_short(e)})") from e
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "biuf":
        raise ImageError(f"expected a numeric array, got dtype {getattr(a, 'dtype', type(a))}")
    if a.size != SIZE * SIZE:
        raise ImageError(f"has shape {a.shape} ({a.size} values); expected 28x28 or 784 values")
    a = a.reshape(SIZE, SIZE).astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ImageError("contains NaN or infinite values")
    if a.max() > 1.0:
        a = a / 255.0
    a = np.clip(a, 0.0, 1.0)
    if a.max() <= 0.0:
        raise EmptyImageError("has no ink (no value above 0)")
    return a.astype(np.float32)


#: largest picture decoded (after a JPEG's reduced-size decoding): 50 megapixels
MAX_PIXELS = 50_000_000


def load_image(path):
    """Open a PNG/JPEG/... with Pillow (fully decoded), or raise ImageError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.format == "JPEG" and max(im.size) > 2 * _MAX_SIDE:  # decode at 1/2..1/8 size
                f = _MAX_SIDE / max(im.size)
                im.draft(im.mode, (int(im.width * f) + 1, int(im.height * f) + 1))
            if im.width * im.height > MAX_PIXELS:  # decoding would take gigabytes first
                raise ImageError(f"is {im.width}x{im.height} pixels; pictures of up to "
                                 f"{MAX_PIXELS // 1_000_000} megapixels are read (a digit needs "
                                 "far fewer): scale it down first")
            im.load()
            return im.copy() if im.mode != "P" else im.convert("RGBA")
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ImageError(f"not a readable image ({_short(e)})") from e
    except OSError as e:
        raise ImageError(f"cannot read image ({_short(e)})") from e


def load_input(path) -> np.ndarray:
    """A file → float32 (28, 28) in [0, 1]: ``.npy`` as is, pictures through ``preprocess``."""
    path = Path(path)
    if not path.exists():
        raise ImageError("no such file")
    if path.is_dir():
        raise ImageError("is a folder, not an image")
    if path.suffix.lower() == ".npy":
        return load_array(path)
    return preprocess(load_image(path))


def _short(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# --- the MNIST pipeline --------------------------------------------------------------------
def _pil_f(a: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(a, dtype=np.float32), mode="F")


def _resize(a: np.ndarray, h: int, w: int, box: bool = False) -> np.ndarray:
    from PIL import Image

    method = Image.BOX if box else Image.LANCZOS
    out = np.asarray(_pil_f(a).resize((max(1, w), max(1, h)), method), dtype=np.float64)
    return np.clip(out, 0.0, 1.0)


def _filter(a: np.ndarray, which: str, size: int) -> np.ndarray:
    from PIL import ImageFilter

    f = {"median": ImageFilter.MedianFilter, "max": ImageFilter.MaxFilter,
         "min": ImageFilter.MinFilter}[which](size)
    return np.asarray(_pil_f(a).filter(f), dtype=np.float64)


def _paper_level(paper: np.ndarray) -> np.ndarray:
    """Brightness of the paper under the ink: a grey closing (max then min filter) at
    <= 48 px with a window of 40 % of the image — it fills in the ink (narrower than that)
    but keeps wider shadows and gradients — scaled back up to full size."""
    from PIL import Image

    h, w = paper.shape
    s = min(1.0, 48 / max(h, w))
    small = np.asarray(_pil_f(paper).resize((max(1, round(w * s)), max(1, round(h * s))),
                                            Image.BOX), dtype=np.float64)
    k = max(3, int(0.4 * max(small.shape)) | 1)
    closed = _filter(_filter(small, "max", k), "min", k)
    closed = np.maximum(closed, small)  # never below the pixels themselves
    back = np.asarray(_pil_f(closed).resize((w, h), Image.BILINEAR), dtype=np.float64)
    return back


def _border(a: np.ndarray) -> np.ndarray:
    h, w = a.shape
    b = max(1, round(min(h, w) * 0.03))
    return np.concatenate([a[:b].ravel(), a[-b:].ravel(), a[b:-b, :b].ravel(), a[b:-b, -b:].ravel()])


def _bbox(n: np.ndarray):
    """(r0, r1, c0, c1) of the ink, grown over adjoining faint (anti-aliased) edges."""
    mask = n > _INK
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    margin = max(2, round(0.05 * max(n.shape)))
    faint = n > 0.02
    for _ in range(margin):
        grown = False
        if r0 > 0 and faint[r0 - 1, c0:c1].any():
            r0, grown = r0 - 1, True
        if r1 < n.shape[0] and faint[r1, c0:c1].any():
            r1, grown = r1 + 1, True
        if c0 > 0 and faint[r0:r1, c0 - 1].any():
            c0, grown = c0 - 1, True
        if c1 < n.shape[1] and faint[r0:r1, c1].any():
            c1, grown = c1 + 1, True
        if not grown:
            break
    return r0, r1, c0, c1


def stroke_width(a: np.ndarray, threshold: float = 0.5) -> float:
    """Rough stroke width in px: 2 · ink area / ink boundary pixels (0 when there is no ink)."""
    mask = a > threshold
    area = int(mask.sum())
    if area == 0:
        return 0.0
    p = np.pad(mask, 1)
    inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    boundary = area - int(inner.sum())
    return 2.0 * area / max(boundary, 1)


def centre_of_mass(a: np.ndarray) -> tuple[float, float]:
    """(row, column) centre of mass of the pixel values, in pixel indices."""
    total = float(a.sum())
    if total <= 0:
        return (float("nan"), float("nan"))
    rows, cols = np.indices(a.shape)
    return float((a * rows).sum() / total), float((a * cols).sum() / total)


def preprocess(image, thicken: bool = True) -> np.ndarray:
    """A picture of one digit (PIL image or array, any size, colour or grey, dark-on-light or
    light-on-dark) → float32 (28, 28) in [0, 1], white ink on black, MNIST-style.

    Raises ``EmptyImageError`` when there is no ink to find.
    """
    g = to_gray(image)
    if g.ndim != 2 or min(g.shape) < 2:
        raise ImageError(f"image of shape {g.shape} is too small")
    if max(g.shape) > _MAX_SIDE:  # phone photos: 1024 px is plenty for one digit
        f = _MAX_SIDE / max(g.shape)
        g = _resize(g, round(g.shape[0] * f), round(g.shape[1] * f), box=True)
    if min(g.shape) >= 64:  # photos and scans: paper grain and noise
        g = _filter(g, "median", 3)
    border = _border(g)
    paper = g if np.median(border) > 0.5 else 1.0 - g  # light paper, dark ink from here on
    back = _paper_level(paper)  # smooth paper brightness: removes shadows and gradients
    diff = paper - back
    noise = 1.4826 * float(np.median(np.abs(_border(diff) - np.median(_border(diff)))))
    ink = np.clip(-diff, 0.0, None)  # how much darker than the paper around it
    hi = float(ink.max())
    if hi < 0.15 or hi < 6 * noise:
        raise EmptyImageError("no ink found (the image is blank or has too little contrast)")
    n = ink / hi
    cut = min(0.5, 4 * noise / hi)
    if cut > 0:
        n = np.clip((n - cut) / (1.0 - cut), 0.0, 1.0)
    box = _bbox(n)
    if box is None:
        raise EmptyImageError("no ink found (nothing above the ink threshold)")
    r0, r1, c0, c1 = box
    crop = n[r0:r1, c0:c1]

    # work at <= 80 px: cheap to thicken there, and the final shrink is a small factor
    h, w = crop.shape
    if max(h, w) > _WORK:
        s = _WORK / max(h, w)
        crop = _resize(crop, round(h * s), round(w * s))
        # thin strokes come out grey when shrunk: stretch so typical ink is white again
        inked = crop[crop > 0.2 * crop.max()]
        crop = np.clip(crop / max(float(np.percentile(inked, 80)) if inked.size else 0, 1e-6),
                       0.0, 1.0)
        h, w = crop.shape
    if thicken:
        target = STROKE * max(h, w) / BOX
        width = stroke_width(crop)
        if width < 0.65 * target:
            size = int(round(target - width)) | 1  # odd
            if size >= 3:
                crop = _filter(crop, "max", min(size, 15))

    s = BOX / max(h, w)
    bh, bw = max(1, round(h * s)), max(1, round(w * s))
    digit = _resize(crop, bh, bw)
    peak = digit.max()
    if peak <= 0:
        raise EmptyImageError("no ink left after scaling to 20 px")
    digit = digit / peak

    cy, cx = centre_of_mass(digit)
    top = int(np.clip(round(CENTRE - cy), 0, SIZE - bh))
    left = int(np.clip(round(CENTRE - cx), 0, SIZE - bw))
    out = np.zeros((SIZE, SIZE), dtype=np.float32)
    out[top:top + bh, left:left + bw] = digit
    return out


# --- writing -------------------------------------------------------------------------------
def save_png(a: np.ndarray, path, scale: int = 1) -> Path:
    """Save a (28, 28) array in [0, 1] as an 8-bit grey PNG (optionally enlarged), atomically."""
    from PIL import Image

    path = Path(path)
    im = Image.fromarray(np.round(np.clip(a, 0, 1) * 255).astype(np.uint8), mode="L")
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        im.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
