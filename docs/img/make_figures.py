"""Make the pictures in docs/backprop.md and the window layout in docs/cnn.md.

    python docs/img/make_figures.py

Writes docs/img/dense_backward_shapes.png, docs/img/gradcheck_eps.png and
docs/img/cnn/window_layout.png. The second one runs nnx.gradcheck for real (NumPy backend,
float64, a few seconds).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

HERE = Path(__file__).resolve().parent


def _matrix(ax, x, y, w, h, label, shape, color):
    """A matrix drawn as a box of width ∝ columns, height ∝ rows, named inside, shape below."""
    ax.add_patch(Rectangle((x, y - h), w, h, facecolor=color, edgecolor="black", lw=1.5))
    ax.text(x + w / 2, y - h / 2, label, ha="center", va="center", fontsize=17, weight="bold")
    ax.text(x + w / 2, y - h - 0.22, shape, ha="center", va="top", fontsize=12)
    return x + w


def _symbol(ax, x, y, s):
    ax.text(x, y, s, ha="center", va="center", fontsize=20)


def dense_backward_shapes(path):
    """x (N,in), W (out,in), g (N,out): each gradient is the only product whose shapes fit."""
    N, IN, OUT = 1.6, 2.4, 1.2  # drawn sizes: rows = height, columns = width
    cx, cw, cg = "#cfe2ff", "#ffe0b3", "#d4edda"
    fig, ax = plt.subplots(figsize=(11, 7.2))
    rows = [
        ("forward", [("x", "(N, in)", N, IN, cx), "·", ("Wᵀ", "(in, out)", IN, OUT, cw), "=",
                     ("y", "(N, out)", N, OUT, cg)], "+ b  (out,) broadcast over rows"),
        ("dW", [("gᵀ", "(out, N)", OUT, N, cg), "·", ("x", "(N, in)", N, IN, cx), "=",
                ("dW", "(out, in)", OUT, IN, cw)], "same shape as W"),
        ("dx", [("g", "(N, out)", N, OUT, cg), "·", ("W", "(out, in)", OUT, IN, cw), "=",
                ("dx", "(N, in)", N, IN, cx)], "same shape as x"),
    ]
    top = 8.6
    for title, items, note in rows:
        ax.text(0.0, top - 0.5, title, fontsize=16, weight="bold", va="center")
        x = 1.3
        tallest = max(it[2] for it in items if isinstance(it, tuple))
        for it in items:
            if isinstance(it, str):
                _symbol(ax, x + 0.3, top - tallest / 2, it)
                x += 0.6
            else:
                label, shape, h, w, color = it
                x = _matrix(ax, x, top, w, h, label, shape, color)
        ax.text(x + 0.3, top - tallest / 2, note, fontsize=12, va="center", style="italic")
        top -= tallest + 0.95
    ax.text(0.0, top - 0.25, "db = Σ over the N rows of g:  (N, out) → (out,)", fontsize=14,
            va="center")
    ax.text(0.0, top - 0.85, "Inner dimensions must match (in·in, N·N, out·out): the transposes are "
            "forced by the shapes.", fontsize=12, va="center", color="#444444")
    ax.set_xlim(-0.1, 12.6)
    ax.set_ylim(top - 1.2, 8.8)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("Dense layer, row-major batches: y = x Wᵀ + b", fontsize=17, pad=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gradcheck_eps(path):
    """Relative error of nnx.gradcheck against the step ε: the V of truncation vs rounding."""
    import nnx

    g = np.random.default_rng(0)
    x, y = g.standard_normal((4, 5)), g.integers(0, 3, size=4)
    eps = np.logspace(-13, -1, 25)
    model = nnx.mlp((5, 6, 3), activation="tanh", dtype="float64", seed=1)
    err = np.array([max(nnx.gradcheck(model, x, y, eps=float(e)).values()) for e in eps])
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.loglog(eps, err, "o-", lw=2, ms=5, label="tanh MLP 5-6-3, float64")
    i_right, i_left = np.argmin(np.abs(eps - 1e-2)), np.argmin(np.abs(eps - 1e-11))
    ax.loglog(eps, err[i_right] * (eps / eps[i_right]) ** 2, "--", color="gray",
              label="truncation ∝ ε²")
    ax.loglog(eps, err[i_left] * (eps[i_left] / eps), ":", color="gray", lw=2,
              label="rounding ∝ u / ε  (u ≈ 1e-16)")
    ax.axhline(1e-6, color="green", lw=1)
    ax.text(1.5e-9, 1.6e-6, "pass: < 1e-6", color="green", fontsize=12)
    ax.axhline(1e-3, color="red", lw=1)
    ax.text(1.5e-10, 1.6e-3, "wrong backward: > 1e-3", color="red", fontsize=12)
    ax.axvline(1e-6, color="black", lw=0.8, ls="-.")
    ax.text(8e-7, 1e-1, "nnx default ε = 1e-6", fontsize=11, ha="right")
    ax.set_ylim(1e-12, 1.0)
    ax.set_xlabel("finite-difference step ε", fontsize=13)
    ax.set_ylabel("max relative error vs backward()", fontsize=13)
    ax.set_title("Central differences: error = O(ε²) + O(u/ε)", fontsize=14)
    ax.tick_params(labelsize=11)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=11, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def window_layout(path):
    """One channel of one image's 4×6 convolution output in the image layout, and the same
    values window by window (NumPy's "conv_batchnorm_maxpool" pair): position q of every
    2×2 window together, so the max pool is the element-wise max of four contiguous blocks."""
    colors = ["#cfe2ff", "#ffe0b3", "#d4edda", "#f8d7da"]
    names = ["top left", "top right", "bottom left", "bottom right"]
    h, w = 4, 6
    per, gap = (h // 2) * (w // 2), 0.5
    width = 4 * per + 3 * gap
    fig, ax = plt.subplots(figsize=(11, 5.2))
    x0, y0 = (width - w) / 2, 3.2  # the image, centred above the blocks
    for a in range(h):
        for b in range(w):
            q, window = 2 * (a % 2) + b % 2, (a // 2) * (w // 2) + b // 2
            ax.add_patch(Rectangle((x0 + b, y0 + h - 1 - a), 1, 1, facecolor=colors[q],
                                   edgecolor="gray", lw=0.8))
            ax.text(x0 + b + 0.5, y0 + h - 0.5 - a, str(window), ha="center", va="center",
                    fontsize=13)
    for t in range(h // 2):
        for u in range(w // 2):
            ax.add_patch(Rectangle((x0 + 2 * u, y0 + h - 2 - 2 * t), 2, 2, fill=False,
                                   edgecolor="black", lw=2.2))
    ax.text(x0 + w + 0.4, y0 + h / 2, "image layout, row by row:\neach 2×2 window (numbered)\n"
            "spans two rows, every other value", va="center", fontsize=12)
    ax.annotate("", xy=(width / 2, 1.75), xytext=(width / 2, y0 - 0.15),
                arrowprops={"arrowstyle": "->", "lw": 1.5})
    ax.text(width / 2 + 0.3, (y0 + 1.75) / 2, "columns ordered (q, n, t, u)", va="center",
            fontsize=12)
    x = 0.0
    for q in range(4):
        for window in range(per):
            ax.add_patch(Rectangle((x + window, 0.7), 1, 1, facecolor=colors[q],
                                   edgecolor="gray", lw=0.8))
            ax.text(x + window + 0.5, 1.2, str(window), ha="center", va="center", fontsize=13)
        ax.add_patch(Rectangle((x, 0.7), per, 1, fill=False, edgecolor="black", lw=2.2))
        ax.text(x + per / 2, 0.35, f"q = {q}: {names[q]}", ha="center", va="center",
                fontsize=11)
        x += per + gap
    ax.text(width / 2, -0.35, "window by window: max pool = max(max(block 0, block 1), "
            "max(block 2, block 3)), element by element,\non contiguous blocks; the result "
            "is the pooled map, window 0, 1, 2, ... in the image layout", ha="center",
            va="center", fontsize=11, style="italic")
    ax.set_xlim(-0.3, width + 0.3)
    ax.set_ylim(-0.9, y0 + h + 0.3)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    dense_backward_shapes(HERE / "dense_backward_shapes.png")
    gradcheck_eps(HERE / "gradcheck_eps.png")
    window_layout(HERE / "cnn" / "window_layout.png")
    print("wrote", HERE / "dense_backward_shapes.png", HERE / "gradcheck_eps.png", "and",
          HERE / "cnn" / "window_layout.png")
