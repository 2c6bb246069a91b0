"""Checkpoints and weights on disk, always written atomically (temp file or folder, then rename).

A run folder holds ``checkpoints/epoch-NNNN/`` folders, each complete or absent:
``model.safetensors`` (parameters and buffers named ``0.weight``, ``0.bias``... — what a
``torch.nn.Sequential`` of the same shape loads directly), ``optimizer.safetensors`` (its
slots), optionally ``best.safetensors`` (early stopping's best weights) and ``state.json``
(architecture, optimizer scalars, schedule position, epoch, RNG seed, early-stopping state).
Killing the process at any instant leaves the previous complete checkpoint in place.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

FORMAT = "nnx-checkpoint-1"
_CKPT_RE = re.compile(r"^epoch-(\d{4,})(?:-step-(\d+))?$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the model."""


# --- small atomic writers ------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_safetensors(path, arrays: dict, metadata: dict | None = None) -> None:
    """Write ``{name: numpy array}`` as safetensors, atomically."""
    from safetensors.numpy import save

    data = save({k: np.require(np.asarray(v), requirements="C") for k, v in arrays.items()},  # keeps 0-D
                metadata={k: str(v) for k, v in (metadata or {}).items()})
    atomic_write_bytes(path, data)


def load_safetensors(path) -> tuple[dict, dict]:
    """``(arrays, metadata)`` from a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (OSError, ValueError, Exception) as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


# --- model weights -------------------------------------------------------------------------
def model_metadata(model) -> dict:
    return {"format": FORMAT, "architecture": json.dumps(model.architecture()),
            "input_shape": json.dumps(list(model.input_shape)),
            "dtype": model.backend.dtype_name(model.dtype)}


def save_weights(path, model) -> None:
    """The model's parameters and buffers as one self-describing safetensors file."""
    save_safetensors(path, model.state_dict(), model_metadata(model))


# --- training checkpoints ----------------------------------------------------------------
def checkpoint_name(epoch: int, step_in_epoch: int = 0) -> str:
    """``epoch-0003`` after 3 full epochs; ``epoch-0003-step-000120`` when interrupted mid-epoch."""
    return f"epoch-{epoch:04d}" + (f"-step-{step_in_epoch:06d}" if step_in_epoch else "")


def save_checkpoint(run_dir, model, optimizer, state: dict, best_weights: dict | None = None,
                    keep: int = 2) -> Path:
    """Write a complete checkpoint folder atomically and keep only the newest ``keep``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(state["epoch"], state.get("step_in_epoch", 0))
    tmp = root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(tmp / "model.safetensors", model)
    scalars, slots = optimizer.state_dict()
    backend = model.backend
    save_safetensors(tmp / "optimizer.safetensors", {k: backend.to_numpy(v) for k, v in slots.items()})
    if best_weights is not None:
        save_safetensors(tmp / "best.safetensors", {k: backend.to_numpy(v) for k, v in best_weights.items()})
    full_state = {"format": FORMAT, "architecture": model.architecture(),
                  "input_shape": list(model.input_shape),
                  "dtype": backend.dtype_name(model.dtype), "optimizer": scalars, **state}
    atomic_write_json(tmp / "state.json", full_state)
    _fsync_dir(tmp)
    final = root / name
    if final.exists():  # re-saving the same position (e.g. after an interrupt): swap safely
        old = root / f".{name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    for stale in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temp folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and (p / "state.json").is_file():
            found.append(((int(m.group(1)), int(m.group(2) or 0)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir) -> Path:
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir}: no complete checkpoint in {Path(run_dir) / 'checkpoints'}")
    return found[-1]


def read_state(ckpt_dir) -> dict:
    try:
        state = json.loads((Path(ckpt_dir) / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt_dir}: unreadable state.json ({e})") from e
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt_dir}: not an nnx checkpoint (format {state.get('format')!r})")
    return state


def check_architecture(model, state: dict, where) -> None:
    """Refuse to load a checkpoint into a model of another shape, saying what differs."""
    have, want = model.architecture(), state["architecture"]
    if have != want or list(model.input_shape) != list(state["input_shape"]):
        describe = lambda arch: " → ".join(
            s["type"] + (f"({s['in_features']}→{s['out_features']})" if s["type"] == "Dense" else "")
            for s in arch)
        raise CheckpointError(
            f"{where}: checkpoint architecture does not match the model\n"
            f"  checkpoint: input {state['input_shape']}: {describe(want)}\n"
            f"  model:      input {list(model.input_shape)}: {describe(have)}")


# --- loading a ready model -----------------------------------------------------------------
def resolve_weights(path) -> Path:
    """A run folder, checkpoint folder or .safetensors file → the weights file to load."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if (path / "model.safetensors").is_file() and not (path / "state.json").is_file():
        return path / "model.safetensors"  # a run folder with its final weights
    if (path / "state.json").is_file():
        return path / "model.safetensors"
    return latest_checkpoint(path) / "model.safetensors"


def load(path, backend=None, device: str | None = None, dtype: str | None = None):
    """A ready ``Sequential`` from a run folder, checkpoint folder or nnx ``.safetensors`` file,
    on any backend (``backend`` object, or a backend name with ``device``)."""
    from .backends import Backend, get_backend
    from .model import Sequential
    from .spec import layer_from_spec

    weights = resolve_weights(path)
    arrays, meta = load_safetensors(weights)
    if meta.get("format") != FORMAT or "architecture" not in meta:
        raise CheckpointError(f"{weights}: has no nnx architecture metadata; build the model "
                              "yourself and call model.load_state_dict(...)")
    if not isinstance(backend, Backend):
        backend = get_backend(backend or "auto", device or ("cuda" if backend == "cupy" else "cpu"))
    layers = [layer_from_spec(s) for s in json.loads(meta["architecture"])]
    model = Sequential(layers, input_shape=json.loads(meta["input_shape"]), backend=backend,
                       dtype=dtype or meta.get("dtype", "float32"))
    try:
        model.load_state_dict(arrays)
    except ValueError as e:
        raise CheckpointError(f"{weights}: {e}") from e
    return model
