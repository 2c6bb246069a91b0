"""Checkpoints and weights on disk, always written atomically (temp file or folder, then rename).

A run folder holds ``checkpoints/epoch-NNNN/`` folders, each complete or absent:
``model.safetensors`` (parameters and buffers named ``0.weight``, ``0.bias``... — what a
``torch.nn.Sequential`` of the same shape loads directly), ``optimizer.safetensors`` (its
slots), optionally ``best.safetensors`` (early stopping's best weights) and ``state.json``
(architecture, optimizer scalars, schedule position, epoch, RNG seed, early-stopping state).
Killing the process at any instant leaves the previous complete checkpoint in place;
``clean_run_folder`` removes the temporary files and folders such a kill (or a full disk)
leaves behind. The ``Trainer``'s persistence (``save_trainer``, ``resume_trainer``,
``append_metrics``) lives here too: ``Trainer.save``/``resume`` call it in one line each.
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


class SaveError(CheckpointError, OSError):
    """Writing a checkpoint or the final weights failed (disk full, folder gone...); the
    previous complete checkpoint is untouched and no temporary file is left behind."""


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
    """Write ``data`` to ``path`` through a temporary file and a rename: ``path`` holds either
    its old content or all of ``data``. On failure (disk full...) the temporary file is
    removed and the OSError propagates."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
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


def save(model, path) -> Path:
    """``nnx.save(model, path)``: the model's weights, buffers and architecture in one
    safetensors file that ``nnx.load`` rebuilds on any backend (and that torch's
    ``load_state_dict`` reads: the names are a ``torch.nn.Sequential``'s). ``path`` is the
    file (``*.safetensors``) or a folder to hold ``model.safetensors``; missing folders are
    created. Written atomically: an existing file is replaced whole or not at all.
    Returns the file's path; a write that fails raises ``SaveError``."""
    from .model import Sequential

    if not isinstance(model, Sequential):
        raise TypeError(f"nnx.save takes an nnx Sequential model, not {type(model).__name__}")
    path = Path(path).expanduser()
    target = path if path.suffix == ".safetensors" else path / "model.safetensors"
    if target.is_dir():
        raise SaveError(f"cannot save to {target}: it is a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        save_weights(target, model)
    except OSError as e:
        raise SaveError(f"cannot save the model to {target} ({_describe_os_error(e)})") from e
    return target


# --- training checkpoints ----------------------------------------------------------------
def checkpoint_name(epoch: int, step_in_epoch: int = 0) -> str:
    """``epoch-0003`` after 3 full epochs; ``epoch-0003-step-000120`` when interrupted mid-epoch."""
    return f"epoch-{epoch:04d}" + (f"-step-{step_in_epoch:06d}" if step_in_epoch else "")


def _describe_os_error(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def save_checkpoint(run_dir, model, optimizer, state: dict, best_weights: dict | None = None,
                    keep: int = 2) -> Path:
    """Write a complete checkpoint folder atomically and keep only the newest ``keep``.

    A failure while writing (disk full, folder removed...) removes the temporary folder and
    raises ``SaveError``; the previous complete checkpoint is not touched.
    """
    root = Path(run_dir) / "checkpoints"
    name = checkpoint_name(state["epoch"], state.get("step_in_epoch", 0))
    tmp = root / f".{name}.tmp-{os.getpid()}"
    final = root / name
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_weights(tmp / "model.safetensors", model)
        scalars, slots = optimizer.state_dict()
        backend = model.backend
        save_safetensors(tmp / "optimizer.safetensors",
                         {k: backend.to_numpy(v) for k, v in slots.items()})
        if best_weights is not None:
            save_safetensors(tmp / "best.safetensors",
                             {k: backend.to_numpy(v) for k, v in best_weights.items()})
        full_state = {"format": FORMAT, "architecture": model.architecture(),
                      "input_shape": list(model.input_shape),
                      "dtype": backend.dtype_name(model.dtype), "optimizer": scalars, **state}
        atomic_write_json(tmp / "state.json", full_state)
        _fsync_dir(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            previous = list_checkpoints(run_dir)
            kept = (f"the last complete checkpoint, {previous[-1].name}, is unchanged"
                    if previous else "no earlier checkpoint exists")
            raise SaveError(f"cannot write checkpoint {final} ({_describe_os_error(e)}); {kept} "
                            "and no temporary files are left. Free some space (or fix the "
                            f"folder) and continue with --resume {run_dir}") from e
        raise
    if final.exists():  # re-saving the same position (e.g. after an interrupt): swap safely
        old = root / f".{name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:  # a file (or link) that sat on the checkpoint's name
            old.unlink(missing_ok=True)
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


def incomplete_checkpoints(run_dir) -> list[Path]:
    """Checkpoint folders without their state.json (a file deleted by hand: checkpoints are
    written whole), newer than the latest complete one: a resume skips them."""
    root, complete = Path(run_dir) / "checkpoints", list_checkpoints(run_dir)
    if not root.is_dir():
        return []
    last = complete[-1].name if complete else ""
    return sorted(p for p in root.iterdir() if _CKPT_RE.match(p.name) and p.is_dir()
                  and not (p / "state.json").is_file() and _order(p.name) > _order(last))


def _order(name: str):
    m = _CKPT_RE.match(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else (-1, -1)


def latest_checkpoint(run_dir) -> Path:
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir}: no complete checkpoint in {Path(run_dir) / 'checkpoints'}")
    return found[-1]


_TEMP_RE = re.compile(r"^\.(.+)\.(tmp|old)-(\d+)$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def clean_run_folder(run_dir) -> list[str]:
    """Remove what a killed process (or a full disk) left in a run folder: hidden
    ``.NAME.tmp-PID`` files and checkpoint folders of processes no longer running. A
    checkpoint that was being swapped (``.NAME.old-PID`` present, ``NAME`` gone) is put
    back. Returns the names removed or restored, for the log."""
    run_dir = Path(run_dir)
    done = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            m = _TEMP_RE.match(p.name)
            if not m or _pid_alive(int(m.group(3))):
                continue
            if m.group(2) == "old" and not (folder / m.group(1)).exists():
                os.replace(p, folder / m.group(1))
                done.append(f"restored {m.group(1)}")
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    p.unlink()
                except OSError:
                    continue
            done.append(f"removed {p.relative_to(run_dir)}")
    return done


def _damaged_hint(ckpt_dir) -> str:
    """What to do with a damaged checkpoint: fall back to the one before, or start over."""
    ckpt_dir = Path(ckpt_dir)
    run_dir = ckpt_dir.parent.parent
    earlier = [c for c in list_checkpoints(run_dir) if c.name < ckpt_dir.name]
    if earlier:
        return (f"move {ckpt_dir} out of {ckpt_dir.parent} and --resume {run_dir} again to "
                f"continue from {earlier[-1].name}")
    return (f"it is the only checkpoint: move it out of {ckpt_dir.parent} and --resume "
            f"{run_dir} again to start the run over with its settings")


def read_state(ckpt_dir) -> dict:
    path = Path(ckpt_dir) / "state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is damaged ({e}); {_damaged_hint(ckpt_dir)}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{ckpt_dir}: not an nnx checkpoint (format {got!r})")
    problems = [k for k in ("epoch", "step_in_epoch", "global_step")
                if not isinstance(state.get(k), int) or isinstance(state.get(k), bool)
                or state[k] < 0]
    partial = state.get("partial")
    if not (isinstance(partial, dict) and isinstance(partial.get("seen"), int)
            and all(isinstance(partial.get(k), (int, float)) for k in ("loss_sum", "correct"))):
        problems.append("partial")
    for key, kind in (("architecture", list), ("input_shape", list), ("optimizer", dict),
                      ("early_stopping", dict), ("history", list)):
        if not isinstance(state.get(key), kind):
            problems.append(key)
    if problems:
        raise CheckpointError(f"{path}: missing or invalid {', '.join(problems)}; "
                              f"{_damaged_hint(ckpt_dir)}")
    return state


def check_position(state: dict, steps_per_epoch: int, where="checkpoint") -> None:
    """Refuse a saved position that does not fit the data (a step past the end of an epoch,
    a global step that disagrees with epoch and step): resuming it would replay or skip
    steps that do not exist."""
    epoch, step, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
    if step >= steps_per_epoch or global_step != epoch * steps_per_epoch + step:
        raise CheckpointError(
            f"{where}: the saved position (epoch {epoch}, step {step}, global step "
            f"{global_step}) does not fit {steps_per_epoch} steps per epoch: the data or the "
            "batch size differ from the run's, or state.json was edited; resume with the "
            "run's own data and settings")


def _normalized(architecture):
    """Layer specs as today's layers write them (arguments added since, like Conv2D's
    ``method``, filled in with their defaults), so older checkpoints compare equal."""
    from .spec import layer_from_spec, layer_to_spec

    try:
        return [layer_to_spec(layer_from_spec(s)) for s in architecture]
    except (ValueError, TypeError, KeyError):
        return architecture


def check_architecture(model, state: dict, where) -> None:
    """Refuse to load a checkpoint into a model of another shape, saying what differs."""
    have, want = model.architecture(), _normalized(state["architecture"])
    if have != want or list(model.input_shape) != list(state["input_shape"]):
        describe = lambda arch: " → ".join(
            str(s.get("type")) + (f"({s.get('in_features')}→{s.get('out_features')})"
                                  if s.get("type") == "Dense" else "")
            for s in arch if isinstance(s, dict))
        differ = next((f"\n  first difference, layer {i}: checkpoint {w} vs model {h}"
                       for i, (w, h) in enumerate(zip(want, have)) if w != h), "")
        raise CheckpointError(
            f"{where}: checkpoint architecture does not match the model\n"
            f"  checkpoint: input {state['input_shape']}: {describe(want)}\n"
            f"  model:      input {list(model.input_shape)}: {describe(have)}{differ}")


# --- the Trainer's persistence (Trainer.save / Trainer.resume call these) ---------------------
def save_trainer(trainer) -> Path:
    """A checkpoint of ``trainer``'s exact position in its run folder. While it is written,
    a second Ctrl-C/SIGTERM is held back (``_graceful_sigint``) and acted on once the
    checkpoint is complete, so it cannot leave a half-written one."""
    trainer._saving = True
    try:
        path = save_checkpoint(trainer.run_dir, trainer.model, trainer.optimizer,
                               trainer.state(), trainer.best_weights)
    finally:
        trainer._saving = False
    if getattr(trainer, "_abort_pending", False):
        raise KeyboardInterrupt(f"aborted after writing {path}")
    return path


def resume_trainer(trainer, ckpt_dir) -> None:
    """Restore weights, optimizer, position and early-stopping state from a checkpoint, and
    make the run folder's metrics.jsonl match it. Any inconsistency is a CheckpointError."""
    try:
        _resume(trainer, Path(ckpt_dir))
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{ckpt_dir}: cannot resume from this checkpoint ({e}); "
                              f"{_damaged_hint(ckpt_dir)}") from e


def _resume(trainer, ckpt_dir: Path) -> None:
    import math

    state = read_state(ckpt_dir)
    model, backend = trainer.model, trainer.backend
    check_architecture(model, state, ckpt_dir)
    if state["global_step"] < state["step_in_epoch"] or (
            state["epoch"] and (state["global_step"] - state["step_in_epoch"]) % state["epoch"]):
        raise CheckpointError(f"{ckpt_dir / 'state.json'}: epoch {state['epoch']}, step "
                              f"{state['step_in_epoch']} and global step {state['global_step']} "
                              f"disagree; {_damaged_hint(ckpt_dir)}")
    try:
        arrays, _ = load_safetensors(ckpt_dir / "model.safetensors")
        slots, _ = load_safetensors(ckpt_dir / "optimizer.safetensors")
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {_damaged_hint(ckpt_dir)}") from e
    try:
        model.load_state_dict(arrays)
    except ValueError as e:
        raise CheckpointError(f"{ckpt_dir / 'model.safetensors'}: {e}; "
                              f"{_damaged_hint(ckpt_dir)}") from e
    trainer.optimizer.load_state_dict(state["optimizer"], slots, backend, model.dtype)
    trainer.epoch, trainer.step_in_epoch = state["epoch"], state["step_in_epoch"]
    trainer.global_step, trainer.partial = state["global_step"], dict(state["partial"])
    trainer.history = list(state.get("history", []))
    es = state["early_stopping"]
    trainer.best_val_loss = math.inf if es.get("best_val_loss") is None else float(es["best_val_loss"])
    trainer.bad_epochs = int(es.get("bad_epochs", 0))
    if es.get("best_epoch") is not None:
        trainer.best_epoch = es["best_epoch"]
    best_file = ckpt_dir / "best.safetensors"
    if best_file.is_file():
        best, _ = load_safetensors(best_file)
        buffers = model.named_buffers()  # BatchNorm counters keep their integer dtype
        trainer.best_weights = {k: backend.from_numpy(
            v, dtype=buffers[k].dtype if k in buffers else model.dtype) for k, v in best.items()}
    if trainer.run_dir:
        rewrite_metrics(trainer.run_dir, trainer.history)


def append_metrics(run_dir, row: dict) -> None:
    """One JSON line per epoch, flushed to disk before the epoch's checkpoint is written."""
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def rewrite_metrics(run_dir, history: list) -> None:
    """After a resume, make metrics.jsonl hold exactly the checkpoint's epochs.

    The checkpoint's history is the truth: lines of epochs it does not include, and a last
    line half written by a killed process, are dropped (atomically)."""
    path = Path(run_dir) / "metrics.jsonl"
    want = "".join(json.dumps(row) + "\n" for row in history)
    try:
        have = path.read_text()
    except FileNotFoundError:
        have = None
    except (OSError, UnicodeDecodeError):
        have = ""
    if have is None and not history:
        return
    if have != want:
        atomic_write_bytes(path, want.encode())


# --- loading a ready model -----------------------------------------------------------------
def resolve_weights(path) -> Path:
    """A run folder, checkpoint folder or .safetensors file → the weights file to load."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if (path / "model.safetensors").is_file() and not (path / "state.json").is_file():
        return path / "model.safetensors"  # a run folder with its final weights
    if (path / "state.json").is_file():
        return path / "model.safetensors"
    if (path / "config.json").is_file() and not list_checkpoints(path):
        raise CheckpointError(f"{path}: this run has no weights yet (no model.safetensors, no "
                              "complete checkpoint: it stopped during its first epoch)")
    if not (path / "checkpoints").is_dir():
        raise CheckpointError(f"{path}: not a run folder, a checkpoint folder or an nnx "
                              ".safetensors file (no model.safetensors and no checkpoints/ in it)")
    return latest_checkpoint(path) / "model.safetensors"


_MAX_SIZE = 2**31 - 1


def _size(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_SIZE:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def expected_tensors(architecture: list, prefix: str = "") -> dict:
    """``{name: (shape, kind)}`` the layers of ``architecture`` (specs) will own, computed from
    the specs alone (nothing allocated); kind is "float" or "int". Layer types with no known
    tensors contribute none; a malformed spec raises ValueError."""
    out = {}
    for i, spec in enumerate(architecture):
        if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
            raise ValueError(f"layer {prefix}{i} is {spec!r}, not a layer spec")
        kind, name = spec["type"], f"{prefix}{i}."
        if kind == "Dense":
            n_in = _size(spec.get("in_features"), f"layer {prefix}{i} (Dense) in_features")
            n_out = _size(spec.get("out_features"), f"layer {prefix}{i} (Dense) out_features")
            out[name + "weight"] = ((n_out, n_in), "float")
            if spec.get("bias", True):
                out[name + "bias"] = ((n_out,), "float")
        elif kind == "Conv2D":
            c = _size(spec.get("in_channels"), f"layer {prefix}{i} (Conv2D) in_channels")
            o = _size(spec.get("out_channels"), f"layer {prefix}{i} (Conv2D) out_channels")
            k = _size(spec.get("kernel_size"), f"layer {prefix}{i} (Conv2D) kernel_size")
            out[name + "weight"] = ((o, c, k, k), "float")
            if spec.get("bias", True):
                out[name + "bias"] = ((o,), "float")
        elif kind == "BatchNorm":
            f = _size(spec.get("num_features"), f"layer {prefix}{i} (BatchNorm) num_features")
            for t in ("weight", "bias", "running_mean", "running_var"):
                out[name + t] = ((f,), "float")
            out[name + "num_batches_tracked"] = ((), "int")
        elif kind == "Residual":
            inner = spec.get("layers")
            if not isinstance(inner, list) or not inner:
                raise ValueError(f"layer {prefix}{i} (Residual) needs a list of layers")
            out.update(expected_tensors(inner, prefix=f"{name}fn."))
    return out


def _check_tensors(weights, arrays: dict, architecture: list, dtype: str) -> None:
    """Names, shapes and dtypes of the file's tensors against its metadata, before building."""
    try:
        want = expected_tensors(architecture)
    except ValueError as e:
        raise CheckpointError(f"{weights}: bad architecture metadata ({e})") from e
    known = {"Dense", "Conv2D", "BatchNorm", "Residual"}

    def all_known(arch):
        return all(s["type"] in known | _PARAMETER_FREE and
                   (s["type"] != "Residual" or all_known(s["layers"])) for s in arch)

    if all_known(architecture):
        missing, extra = sorted(set(want) - set(arrays)), sorted(set(arrays) - set(want))
        if missing or extra:
            raise CheckpointError(f"{weights}: the tensors do not match the architecture in its "
                                  f"metadata (missing {missing[:5]}, unexpected {extra[:5]})")
    for name, (shape, kind) in want.items():
        if name not in arrays:
            continue
        a = arrays[name]
        if tuple(a.shape) != shape and not (shape == () and tuple(a.shape) == (1,)):
            raise CheckpointError(f"{weights}: tensor {name} has shape {tuple(a.shape)} but the "
                                  f"architecture in its metadata needs {shape}")
        if kind == "float" and a.dtype != np.dtype(dtype):
            raise CheckpointError(f"{weights}: tensor {name} is {a.dtype} but the metadata says "
                                  f"the model is {dtype}; the file was altered or damaged")
        if kind == "int" and a.dtype.kind not in "iu":
            raise CheckpointError(f"{weights}: tensor {name} is {a.dtype}, expected an integer")


#: layer types that own no tensors (checked by name, so a tampered file cannot sneak some in)
_PARAMETER_FREE = {"ReLU", "LeakyReLU", "Sigmoid", "Tanh", "Softmax", "Dropout", "Flatten",
                   "Reshape", "MaxPool2D", "AvgPool2D", "GlobalAvgPool"}


def _meta_json(weights, meta: dict, key: str, kind):
    try:
        value = json.loads(meta[key])
    except KeyError:
        raise CheckpointError(f"{weights}: its metadata has no {key!r}; the file was altered or "
                              "is not an nnx weights file") from None
    except (TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{weights}: its {key!r} metadata is not valid JSON ({e}); the "
                              "file was altered or damaged") from e
    except RecursionError:
        raise CheckpointError(f"{weights}: its {key!r} metadata nests too deeply to be a "
                              "model nnx wrote") from None
    if not isinstance(value, kind):
        raise CheckpointError(f"{weights}: its {key!r} metadata is a {type(value).__name__}, "
                              f"expected a {kind.__name__}")
    return value


def load(path, backend=None, device: str | None = None, dtype: str | None = None):
    """A ready ``Sequential`` from a run folder, checkpoint folder or nnx ``.safetensors`` file,
    on any backend (``backend`` object, or a backend name with ``device``).

    The file's metadata is checked before anything is built: valid JSON, known layer types
    and arguments, tensor names, shapes and dtypes that agree with it. Any disagreement is a
    ``CheckpointError`` naming the file."""
    from .backends import Backend, get_backend
    from .model import Sequential
    from .spec import layer_from_spec

    weights = resolve_weights(path)
    arrays, meta = load_safetensors(weights)
    if meta.get("format") != FORMAT or "architecture" not in meta:
        raise CheckpointError(f"{weights}: has no nnx architecture metadata; build the model "
                              "yourself and call model.load_state_dict(...)")
    architecture = _meta_json(weights, meta, "architecture", list)
    input_shape = _meta_json(weights, meta, "input_shape", list)
    if not input_shape or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= _MAX_SIZE
                                  for d in input_shape):
        raise CheckpointError(f"{weights}: input_shape {input_shape} in its metadata is not a "
                              "list of positive sizes")
    file_dtype = meta.get("dtype", "float32")
    if file_dtype not in ("float32", "float64"):
        raise CheckpointError(f"{weights}: dtype {file_dtype!r} in its metadata; expected "
                              "float32 or float64")
    try:
        _check_tensors(weights, arrays, architecture, file_dtype)
        layers = []
        for i, spec in enumerate(architecture):
            try:
                layers.append(layer_from_spec(spec))
            except (TypeError, ValueError, KeyError) as e:
                raise CheckpointError(f"{weights}: layer {i} of its architecture metadata "
                                      f"cannot be built ({e})") from e
    except RecursionError:
        raise CheckpointError(f"{weights}: its architecture metadata nests layers too deeply "
                              "to be a model nnx wrote") from None
    for name, a in arrays.items():
        if name.endswith("running_var") and not bool(np.all(a >= 0)):
            raise CheckpointError(f"{weights}: {name} holds negative or NaN variances; the "
                                  "file is damaged")
    if not isinstance(backend, Backend):
        backend = get_backend(backend or "auto", device or ("cuda" if backend == "cupy" else "cpu"))
    if (dtype or file_dtype) == "float64" and not backend.supports_float64():
        raise CheckpointError(f"{weights}: the weights are float64 and {backend} has no float64; "
                              "load them on a backend or device that has it (e.g. --backend "
                              "numpy), or as float32 with nnx.load(..., dtype='float32')")
    try:
        model = Sequential(layers, input_shape=input_shape, backend=backend,
                           dtype=dtype or file_dtype)
        model.load_state_dict(arrays)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{weights}: {e}") from e
    return model
