"""Make the pictures in docs/backprop.md.

    python docs/img/make_figures.py

Writes docs/img/dense_backward_shapes.png and docs/img/gradcheck_eps.png. The second one runs
nnx.gradcheck for real (NumPy backend, float64, a few seconds).
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


if __name__ == "__main__":
    dense_backward_shapes(HERE / "dense_backward_shapes.png")
    gradcheck_eps(HERE / "gradcheck_eps.png")
    print("wrote", HERE / "dense_backward_shapes.png", "and", HERE / "gradcheck_eps.png")
