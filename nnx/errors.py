"""Errors users see: each names what is wrong and what was expected.

``cli_main`` wraps the ``main`` of every command-line tool: an error becomes one line on
stderr (``error: ...``) and a non-zero exit code, never a traceback — unless ``--debug`` is
on the command line or ``NNX_DEBUG=1`` is set, which re-raise it. ``check_out_dir`` refuses
an ``--out`` folder that cannot be written, before any work.
"""
from __future__ import annotations

import functools
import os
import sys


class ShapeError(ValueError):
    """An input of the wrong shape reached a layer; names the layer, expected and actual shapes."""


def debug_requested(argv=None) -> bool:
    args = sys.argv[1:] if argv is None else list(argv)
    return "--debug" in args or os.environ.get("NNX_DEBUG", "").strip() not in ("", "0")


def one_line(msg) -> str:
    """Collapse a (possibly multi-line) error message into one line."""
    parts = [p.strip() for p in str(msg).splitlines() if p.strip()]
    out = ""
    for part in parts:
        out += ("" if not out else " " if out.endswith((":", ".")) else "; ") + part
    return out


def describe(e: BaseException) -> str:
    """One line for an exception: its message for nnx's own errors and OS errors, plus the
    type and a --debug hint for anything unexpected."""
    if isinstance(e, MemoryError):
        return ("out of memory: the model, batch or data does not fit; try a smaller "
                "--batch-size or model")
    if isinstance(e, OSError) and not str(e).startswith(("cannot", "error")):
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        return f"{e.strerror or e}{':' if where else ''}{where}"
    msg = one_line(e)
    module = type(e).__module__ or ""
    if module.startswith(("nnx", "backends")) or isinstance(e, OSError):
        return msg or type(e).__name__
    return (f"{type(e).__name__}: {msg} (unexpected; rerun with --debug or NNX_DEBUG=1 for "
            "the traceback)")


def cli_main(fn):
    """Decorate a CLI ``main(argv)``: errors → one ``error:`` line and exit code 1, Ctrl-C →
    exit code 130, argparse's own exits pass through; ``--debug``/``NNX_DEBUG=1`` re-raise."""
    @functools.wraps(fn)
    def main(argv=None) -> int:
        try:
            return fn(argv)
        except SystemExit:
            raise
        except KeyboardInterrupt as e:
            if debug_requested(argv):
                raise
            detail = f" ({e})" if str(e) else ""
            print(f"\naborted{detail}", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 — the point: no traceback for users
            if debug_requested(argv):
                raise
            print(f"error: {describe(e)}", file=sys.stderr)
            return 1
    return main


def check_out_dir(out, parser, option: str = "--out") -> None:
    """``option`` (a folder, ``Path``) must be (or become) a writable folder: not a file,
    not inside a file; ``parser.error`` otherwise, before a command does any work (train,
    evaluate, predict's --show-dir)."""
    if out.exists() and not out.is_dir():
        parser.error(f"{option} {out} is a file; give a folder (it is created if needed)")
    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        parser.error(f"{option} {out} lies inside {ancestor}, which is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        parser.error(f"{option} {out}: cannot write in {ancestor} (permission denied or a "
                     f"read-only file system); choose another {option}")
