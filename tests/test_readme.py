"""README.md's Python blocks run as they stand, each pasted alone into a fresh interpreter."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
RUN = "runs/20261125-141500"  # the run folder README's examples name


def _first_code_line(code: str) -> str:
    return next((l for l in code.splitlines() if l.strip() and not l.startswith("import")), "")


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


def _make_run_folder(where: Path) -> None:
    """A run folder as `python -m nnx.train` leaves it, as far as nnx.load reads it: the final
    weights of the default 784-128-64-10 MLP (made here without data or training)."""
    import nnx
    from nnx.checkpoint import save_weights

    folder = where / RUN
    folder.mkdir(parents=True)
    save_weights(folder / "model.safetensors", nnx.mlp([784, 128, 64, 10], seed=0))


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs_alone(code, tmp_path):
    if 'backend="torch"' in code and importlib.util.find_spec("torch") is None:
        pytest.skip("this README block uses PyTorch, which is not installed (pip install -e '.[torch]')")
    if RUN in code:
        _make_run_folder(tmp_path)
    env = {**os.environ, "MPLBACKEND": "Agg"}
    # run from a temporary folder so that only the installed package (not the checkout's
    # folder on sys.path by accident) and what the block creates are there
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"README block starting {_first_code_line(code)!r} failed:\n{out.stderr}"
    if "nnx.load(" in code and RUN in code:
        assert "total parameters: 109,386" in out.stdout
    if "opt.step()" in code:  # the ten-line training loop fits its 32 samples
        loss = float(re.search(r"loss (\S+)", out.stdout).group(1))
        assert loss < 0.05, out.stdout
    if "gradcheck" in code:
        assert "'0.weight'" in out.stdout


def test_the_new_layer_example_of_docs_architecture_runs(tmp_path):
    """docs/architecture.md, "Writing a new layer": its three blocks, pasted one after the
    other into a fresh interpreter, build the layers and pass their gradient check."""
    text = (README.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("### Writing a new layer", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert len(blocks) == 3
    code = "\n".join(blocks)
    if importlib.util.find_spec("torch") is None:
        code = code.replace(', ("torch", "cpu")', "")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
