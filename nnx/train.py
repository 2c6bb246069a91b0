"""``python -m nnx.train``: train a network on MNIST or Fashion-MNIST from the command line.

Every run leaves a folder (default ``runs/<timestamp>/``) with config.json, metrics.jsonl,
checkpoints/ (resumable with --resume) and model.safetensors (final weights).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
from pathlib import Path

from .distributed import abort_on_failure
from .errors import check_out_dir, cli_main
from .errors import debug_requested as _debug_requested

DEFAULTS = {
    "device": "cpu", "backend": "auto", "dataset": "mnist", "data_dir": None,
    "model": "mlp", "arch": None, "layers": "784,128,64,10", "activation": "relu", "dropout": 0.0,
    "optimizer": "nesterov", "lr": None, "momentum": 0.9, "weight_decay": 5e-4, "clip_norm": None,
    "schedule": "cosine", "warmup_epochs": 0.0, "epochs": 10, "batch_size": 128, "val_size": 5000,
    "seed": 0, "dtype": "float32", "early_stopping": 0, "limit": None, "download": True,
    "plots": True, "sync_bn": False,
}
#: settings whose default depends on --model (a BatchNorm CNN trains best with Adam)
MODEL_DEFAULTS = {"cnn": {"optimizer": "adam", "weight_decay": 0.0},
                  "cnn-fast": {"optimizer": "adam", "weight_decay": 0.0, "lr": 3e-3, "epochs": 3,
                               "batch_size": 64}}
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.1, "nesterov": 0.1, "adam": 1e-3, "adamw": 1e-3}
#: the optimizers --momentum applies to
MOMENTUM_OPTIMIZERS = ("momentum", "nesterov")
#: settings a resumed run's config.json must hold (those of the first config.json nnx wrote;
#: settings added since, like "arch", take their defaults when an older run lacks them)
REQUIRED_SETTINGS = ("dataset", "model", "layers", "activation", "dropout", "optimizer", "lr",
                     "momentum", "weight_decay", "clip_norm", "schedule", "warmup_epochs",
                     "batch_size", "val_size", "seed", "dtype", "early_stopping", "limit")
#: settings a resumed run may change; everything else comes from the run's config.json
RESUMABLE_OVERRIDES = {"device", "backend", "data_dir", "epochs", "quiet", "plots", "download",
                       "sync_bn"}
NUM_INPUTS, NUM_CLASSES = 784, 10
#: the type each setting must have (config.json of a resumed run is checked against it)
INT_SETTINGS = ("epochs", "batch_size", "val_size", "seed", "early_stopping")
FLOAT_SETTINGS = ("lr", "momentum", "weight_decay", "clip_norm", "warmup_epochs", "dropout")
STR_SETTINGS = ("device", "backend", "dataset", "model", "layers", "activation", "optimizer",
                "schedule", "dtype")
MAX_SEED = 2**32 - 1
#: largest --arch file read (a spec is a line of text; anything bigger is not one)
MAX_SPEC_BYTES = 64 * 1024
#: files nnx.evaluate writes into a run folder (stale once a resumed run replaces the weights)
EVALUATION_FILES = ("evaluation.json", "report.md")


def finite_float(text: str) -> float:
    """argparse type: a float that is a real number (nan and inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def seed_int(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_SEED}, got {text}")
    return value


def positive_int(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .architectures import PRESETS
    from .optim import OPTIMIZERS
    from .schedules import SCHEDULES
    from .layers import ACTIVATIONS
    from .backends import BACKENDS
    from .threads import add_threads_option

    p = argparse.ArgumentParser(
        prog="python -m nnx.train",
        description="Train a hand-written neural network (NumPy/CuPy/PyTorch through the Array "
                    "API) on MNIST or Fashion-MNIST. On MNIST the defaults train 784-128-64-10 to "
                    ">= 98% test accuracy in 10 epochs on a CPU; Fashion-MNIST is harder and "
                    "ends lower.",
        epilog="examples:\n"
               "  python -m nnx.train                           # default MLP on the CPU\n"
               "  python -m nnx.train --device cuda             # same on an NVIDIA GPU (CuPy)\n"
               "  python -m nnx.train --optimizer adam --lr 1e-3 --epochs 5\n"
               "  python -m nnx.train --resume runs/20260101-120000   # continue a run\n"
               "data is looked for in --data-dir (only there, when given), else in\n"
               "  $NNX_DATA_DIR/<dataset>, $NNX_DATA_DIR, the cache ($XDG_CACHE_HOME/nnx/<dataset>,\n"
               "  default ~/.cache/nnx/<dataset>), /usr/share/datasets/<dataset>, then downloaded\n"
               "  into the cache (see docs/data.md)\n"
               "errors are one line; --debug (or NNX_DEBUG=1) shows the Python traceback",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=None)
    g = p.add_argument_group("hardware")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cpu)")
    g.add_argument("--backend", choices=BACKENDS,
                   help="array library: auto picks numpy on cpu, cupy on cuda (default: auto)")
    g.add_argument("--dtype", choices=("float32", "float64"), help="default: float32")
    g.add_argument("--compile", action="store_true", default=None,
                   help="run each training step through torch.compile (torch backend only; "
                        "the math stays nnx's hand-written backprop; needs a C++ compiler on "
                        "the CPU; the first steps take seconds to compile; on the CPU it speeds "
                        "up MLPs and slows conv nets: docs/benchmarks.md)")
    g.add_argument("--no-fused", action="store_true", default=None,
                   help="use the standard Array-API code everywhere, not the backend's fused "
                        "versions (CuPy's kernels for relu, softmax-cross-entropy and the "
                        "optimizer updates; torch's single calls for those and its own "
                        "convolution, batch norm and max pool; NumPy's direct calls for relu and "
                        "the loss and its max-pool, batch-norm, batch-norm-then-max-pool and "
                        "convolution-batch-norm-max-pool pairs; a ReLU is moved after its max "
                        "pool only with them on; "
                        "docs/architecture.md, Backend overrides)")
    add_threads_option(g)
    g.add_argument("--distributed", action="store_true", default=None,
                   help="data-parallel on the K processes of `mpirun -n K python -m nnx.train "
                        "...` (on by itself under an MPI launcher); --batch-size stays the "
                        "global batch; see docs/distributed.md")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="with --distributed: BatchNorm statistics of the global batch (all "
                        "processes' rows, like torch's SyncBatchNorm) instead of each "
                        "process's own; the run then matches one process (--no-sync-bn: "
                        "each process's own, also to turn it off on --resume)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=("mnist", "fashion-mnist"), help="default: mnist")
    g.add_argument("--data-dir", help="folder with the four IDX files (.gz or raw)")
    g.add_argument("--val-size", type=int, help="training images held out for validation (default: 5000)")
    g.add_argument("--limit", type=positive_int,
                   help="use only the first N training images and the first N/6 test images "
                        "(quick runs); when N is at most the default --val-size (5000) and "
                        "--val-size is not given, validation shrinks to N/10")
    g.add_argument("--no-download", dest="download", action="store_false", default=None,
                   help="never download; fail if the files are not found")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=("mlp", *PRESETS),
                   help="mlp: Dense layers from --layers; cnn: " + PRESETS["cnn"] + " (Adam, 10 "
                        "epochs: >= 99.2%% on MNIST); cnn-fast: " + PRESETS["cnn-fast"] + " (Adam "
                        "3e-3, batch 64, 3 epochs: ~99.2%% in about 35 s on a 2-core CPU) (default: mlp)")
    g.add_argument("--arch", metavar="SPEC",
                   help="any network as a layer spec (or a file holding one), e.g. "
                        "'conv:16,relu,maxpool:2,flatten,dense:10'; tokens: dense:OUT, "
                        "conv:OUT[:K[:S[:P]]], maxpool:K, avgpool:K, gap, bn, relu, leaky_relu, "
                        "tanh, sigmoid, dropout:P, flatten, res[...]; see docs/cnn.md")
    g.add_argument("--layers", help="MLP sizes, input 784 first and 10 classes last "
                                    "(default: 784,128,64,10)")
    g.add_argument("--activation", choices=sorted(ACTIVATIONS), help="hidden activation (default: relu)")
    g.add_argument("--dropout", type=finite_float, help="dropout after each hidden layer, 0 disables (default: 0)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=list(OPTIMIZERS),
                   help="default: nesterov for the MLP, adam for --model cnn / --arch")
    g.add_argument("--lr", type=finite_float, help="peak learning rate (default: "
                   + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    g.add_argument("--momentum", type=finite_float, help="for momentum/nesterov (default: 0.9)")
    g.add_argument("--weight-decay", type=finite_float, help="L2 (sgd/momentum/nesterov/adam) or decoupled (adamw) "
                        "(default: 5e-4 for the MLP, 0 for --model cnn / --arch)")
    g.add_argument("--clip-norm", type=finite_float, help="clip gradients to this global L2 norm (default: off)")
    g.add_argument("--schedule", choices=list(SCHEDULES), help="learning-rate schedule (default: cosine)")
    g.add_argument("--warmup-epochs", type=finite_float, help="linear warm-up length (default: 0)")
    g.add_argument("--epochs", type=int, help="default: 10")
    g.add_argument("--batch-size", type=int, help="default: 128")
    g.add_argument("--seed", type=seed_int, help="seeds weights, validation split, shuffling, dropout (default: 0)")
    g.add_argument("--early-stopping", type=int, metavar="PATIENCE",
                   help="stop when validation loss has not improved for PATIENCE epochs; the "
                        "run ends with its best-validation weights (default: 0 = off)")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="run folder (default: runs/<timestamp>)")
    g.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint")
    g.add_argument("--checkpoint-every", type=positive_int, metavar="N",
                   help="write a checkpoint every N epochs (and at the last one, on early "
                        "stopping or Ctrl-C); default 1")
    g.add_argument("--quiet", action="store_true", default=None, help="no progress bars or per-epoch lines")
    g.add_argument("--no-plots", dest="plots", action="store_false", default=None,
                   help="do not draw PNG plots into the run folder at the end")
    g.add_argument("--debug", action="store_true", default=None,
                   help="show the Python traceback of an error (also: NNX_DEBUG=1)")
    return p


def validate(cfg: dict, parser) -> None:
    """Reject bad settings up front, with the option name and the accepted range."""
    def bad(msg):
        parser.error(msg)

    def opt(key):
        return "--" + key.replace("_", "-")

    for key in INT_SETTINGS:
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int):
            bad(f"{opt(key)} must be an integer, got {cfg[key]!r}")
    for key in FLOAT_SETTINGS:
        value = cfg[key]
        if value is None and key in ("lr", "clip_norm"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            bad(f"{opt(key)} must be a finite number, got {value!r}")
    for key in STR_SETTINGS:
        if not isinstance(cfg[key], str):
            bad(f"{opt(key)} must be a string, got {cfg[key]!r}")
    if not cfg["device"].strip():
        bad("--device is empty: give cpu, cuda or cuda:N")
    for action in parser._actions:  # choices again: a resumed run's config.json may hold anything
        key = action.dest
        if action.choices and key in STR_SETTINGS and cfg[key] not in action.choices:
            bad(f"{opt(key)} must be one of {', '.join(map(str, action.choices))}, got {cfg[key]!r}")
    if cfg["limit"] is not None and (isinstance(cfg["limit"], bool) or not isinstance(cfg["limit"], int)
                                     or cfg["limit"] <= 0):
        bad(f"--limit must be a positive integer, got {cfg['limit']!r}")
    if cfg["batch_size"] <= 0:
        bad(f"--batch-size must be a positive integer, got {cfg['batch_size']}")
    if cfg["epochs"] <= 0:
        bad(f"--epochs must be a positive integer, got {cfg['epochs']}")
    if not 0 <= cfg["seed"] <= MAX_SEED:
        bad(f"--seed must be between 0 and {MAX_SEED}, got {cfg['seed']}")
    if cfg["lr"] is not None and not cfg["lr"] > 0:
        bad(f"--lr must be positive, got {cfg['lr']}")
    if not 0.0 <= cfg["dropout"] < 1.0:
        bad(f"--dropout must be in [0, 1), got {cfg['dropout']}")
    if not 0.0 <= cfg["momentum"] < 1.0:
        bad(f"--momentum must be in [0, 1), got {cfg['momentum']}")
    if cfg["weight_decay"] < 0:
        bad(f"--weight-decay must be >= 0, got {cfg['weight_decay']}")
    if cfg["clip_norm"] is not None and cfg["clip_norm"] <= 0:
        bad(f"--clip-norm must be positive, got {cfg['clip_norm']}")
    if cfg["warmup_epochs"] < 0 or cfg["warmup_epochs"] > cfg["epochs"]:
        bad(f"--warmup-epochs must be between 0 and --epochs, got {cfg['warmup_epochs']}")
    if not 0 <= cfg["val_size"] < 50_000:
        bad(f"--val-size must be between 0 and 49999 (of 60,000 training images), got {cfg['val_size']}")
    if cfg["early_stopping"] < 0:
        bad(f"--early-stopping must be >= 0, got {cfg['early_stopping']}")
    if cfg["early_stopping"] and not cfg["val_size"]:
        bad("--early-stopping needs a validation split (--val-size > 0)")
    if cfg["limit"] is not None and cfg["limit"] <= cfg["val_size"]:
        bad(f"--limit {cfg['limit']} leaves no training images after --val-size "
            f"{cfg['val_size']}; pass a smaller --val-size (e.g. --val-size "
            f"{cfg['limit'] // 10}) or a larger --limit")
    if cfg["arch"] or cfg["model"] != "mlp":
        try:
            spec = arch_spec(cfg)
            layers, shapes = check_arch(spec)
        except ValueError as e:  # ArchitectureError, ShapeError
            bad(f"--arch: {e}")
        out = shapes[-1] if shapes else None
        if tuple(out or ()) != (NUM_CLASSES,):
            bad(f"--arch must end with {NUM_CLASSES} outputs (one per class), it ends with shape "
                f"{tuple(out or ())}")
        sizes = None
    else:
        try:
            sizes = [int(s) for s in str(cfg["layers"]).split(",")]
        except ValueError:
            bad(f"--layers must be comma-separated integers like 784,128,64,10, got {cfg['layers']!r}")
        if len(sizes) < 2 or min(sizes) <= 0:
            bad(f"--layers needs at least two positive sizes, got {cfg['layers']!r}")
        if sizes[0] != NUM_INPUTS or sizes[-1] != NUM_CLASSES:
            bad(f"--layers must start at {NUM_INPUTS} (28x28 pixels) and end at {NUM_CLASSES} "
                f"(classes), got {cfg['layers']!r}")
        layers = None
    need = memory_estimate(cfg, sizes=sizes, layers=layers)
    have = available_memory(cfg["device"])
    if have is not None and need > have:
        what = f"--layers {cfg['layers']}" if sizes else "this --arch/--model"
        bad(f"{what} with --batch-size {cfg['batch_size']} needs about {_gb(need)} of memory "
            f"(weights, gradients, optimizer state, activations and the data), but only "
            f"{_gb(have)} is available; choose smaller layers or a smaller --batch-size")


def _gb(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


def available_memory(device: str) -> int | None:
    """Bytes of memory a CPU run can still use (MemAvailable), or None when unknown (and for
    GPUs, whose memory the backend reports once it is loaded)."""
    if not str(device).startswith("cpu"):
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_estimate(cfg: dict, sizes=None, layers=None) -> int:
    """Rough bytes a run needs, from the layer sizes alone (nothing allocated): parameters
    with their gradients and optimizer slots, one batch of activations kept for backward
    (and their gradients), and the device copy of the data."""
    itemsize = 8 if cfg["dtype"] == "float64" else 4
    params, acts = 0, 0
    if sizes is not None:
        params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
        acts = 2 * sum(sizes)
    else:
        from .checkpoint import expected_tensors

        shape = input_shape_for_spec(arch_spec(cfg))
        try:
            params = sum(math.prod(t[0]) for t in
                         expected_tensors([{"type": type(l).__name__, **l.config()} for l in layers]).values())
        except ValueError:
            params = 0
        for layer in layers:
            shape = layer.output_shape(shape)
            acts += 2 * math.prod(shape)
    slots = {"sgd": 0, "momentum": 1, "nesterov": 1, "adam": 2, "adamw": 2}.get(cfg["optimizer"], 2)
    data = 70_000 * NUM_INPUTS * itemsize
    return int(params * itemsize * (2 + slots) + acts * cfg["batch_size"] * itemsize * 2 + data)


def input_shape_for_spec(spec: str) -> tuple:
    from .architectures import spec_input_shape

    return tuple(spec_input_shape(spec))


#: spec tokens whose layers take no arguments ("relu:3" is a mistake, not a variant)
NO_ARGUMENT_TOKENS = ("relu", "tanh", "sigmoid", "gap", "bn", "flatten", "softmax")


def check_arch(spec: str, shape=None):
    """Build the layer objects of ``spec`` (no parameters allocated) and return them with
    the shape after each; ValueError for an empty spec or item, arguments on layers that
    take none, bad numbers, or a residual branch that changes the shape."""
    from .architectures import build_layers, split_top_level

    if not spec.strip():
        raise ValueError("the layer spec is empty; give layers like 'conv:16,relu,flatten,dense:10'")
    shape = tuple(shape) if shape is not None else input_shape_for_spec(spec)
    layers, shapes = [], []
    for item in split_top_level(spec, keep_empty=True):
        if not item:
            raise ValueError(f"empty item in {spec!r} (two commas in a row, or one at an end)")
        if item.lower().startswith("res["):
            if not item.endswith("]"):
                raise ValueError(f"{item!r}: a residual block is written res[LAYERS]")
            inner, inner_shapes = check_arch(item[4:-1], shape)
            out = inner_shapes[-1] if inner_shapes else shape
            if tuple(out) != tuple(shape):
                raise ValueError(f"the residual branch {item!r} maps shape {shape} to {tuple(out)}; "
                                 "it must keep its input's shape so x + f(x) is defined")
        else:
            name, *args = item.split(":")
            if name.lower() in NO_ARGUMENT_TOKENS and args:
                raise ValueError(f"{item!r}: {name} takes no arguments; write {name}")
            if name.lower() in ("dropout", "leaky_relu") and args:
                try:
                    value = float(args[0])
                except ValueError:
                    value = math.nan
                if len(args) > 1 or not math.isfinite(value) or (
                        name.lower() == "dropout" and not 0 <= value < 1):
                    raise ValueError(f"{item!r}: {name} takes one finite number"
                                     + (" in [0, 1)" if name.lower() == "dropout" else ""))
        try:
            (layer,) = build_layers(item, shape)
            shape = tuple(layer.output_shape(shape))
        except (TypeError, OverflowError) as e:
            raise ValueError(f"{item!r}: {e}") from None
        if any(d <= 0 for d in shape):
            raise ValueError(f"{item!r} leaves nothing: output shape {shape}")
        layers.append(layer)
        shapes.append(shape)
    return layers, shapes


def arch_spec(cfg: dict) -> str:
    """The layer spec of a non-MLP run: --arch (text or a file holding it) or the preset.

    A file holds the spec on one or more lines (blank lines and ``#`` comments are
    skipped); a file that is not short UTF-8 text is a ValueError."""
    from .architectures import PRESETS

    arch = cfg.get("arch")
    if not arch:
        return PRESETS[cfg["model"]]
    path = Path(arch)
    try:
        is_file = path.is_file()
    except OSError:  # e.g. a spec too long to be a file name
        is_file = False
    if not is_file:
        return arch
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise ValueError(f"cannot read the spec file {arch} ({e.strerror or e})") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise ValueError(f"{arch} is larger than {MAX_SPEC_BYTES // 1024} KiB: not a layer spec file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\0" in text:
        raise ValueError(f"{arch} is a binary file, not a text file holding a layer spec like "
                         "'conv:16,relu,flatten,dense:10'")
    lines = [l.split("#", 1)[0].strip().strip(",") for l in text.splitlines()]
    spec = ",".join(l for l in lines if l)
    if not spec:
        raise ValueError(f"the spec file {arch} holds no layers (only blank lines or comments); "
                         "write layers like 'conv:16,relu,maxpool:2,flatten,dense:10'")
    return spec


def _read_run_config(run: str, parser) -> dict:
    """The settings in RUN/config.json, or one clear error when the file is missing or damaged."""
    config_file = Path(run) / "config.json"
    if not config_file.is_file():
        for folder in Path(run).resolve().parents:
            if folder.name == "checkpoints" and (folder.parent / "config.json").is_file():
                parser.error(f"--resume {run}: that is a checkpoint of the run {folder.parent}; "
                             f"resume the run itself: --resume {folder.parent} (it continues "
                             "from its latest checkpoint)")
        parser.error(f"--resume {run}: no config.json there; is it a run folder?")
    try:
        saved = json.loads(config_file.read_text())["settings"]
        if not isinstance(saved, dict):
            raise TypeError(f"'settings' is a {type(saved).__name__}")
        unknown = sorted(set(saved) - set(DEFAULTS))
        if unknown:
            raise KeyError(f"unknown settings {unknown}")
        missing = sorted(set(REQUIRED_SETTINGS) - set(saved))
        if missing:  # filling them from today's defaults would train another run
            raise KeyError(f"missing settings {missing}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        parser.error(f"--resume {run}: {config_file} is damaged ({e}); it holds the run's "
                     "settings, so restore it from a backup or start a new run with another --out")
    return saved


#: files a run folder holds: a new run in a folder with any of them would overwrite them
RUN_FILES = ("model.safetensors", "results.json", "metrics.jsonl", "state.json",
             "optimizer.safetensors", "checkpoints")


def _refuse_run_files(out: Path, parser) -> None:
    """--out must not be a checkpoint of a run, a folder inside one, or a folder holding a
    run's files without its config.json (those would be overwritten or mixed)."""
    for folder in (out, *out.parents):
        if folder.name == "checkpoints" and _is_run(folder.parent):
            parser.error(f"--out {out} lies inside the checkpoints of the run {folder.parent}; "
                         "choose another --out")
    if out.is_dir() and not (out / "config.json").exists():
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found:
            parser.error(f"--out {out} already holds {', '.join(found)} (a run's files, or a "
                         "checkpoint's); choose another --out")


def _is_run(folder: Path) -> bool:
    """Whether ``folder`` holds an nnx run's config.json (JSON with its "settings")."""
    try:
        return isinstance(json.loads((folder / "config.json").read_text()).get("settings"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def _default_run_dir() -> Path:
    """runs/<date-time>, with -2, -3, ... when a run started in the same second took it."""
    base = Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    return run_dir


def _reserve(base: Path) -> Path:
    """Create ``base`` (or ``base-2``, ``base-3``... when another run took it first) with an
    exclusive mkdir, and return the folder created."""
    for n in range(1, 10_000):
        run_dir = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
            return run_dir
        except FileExistsError:
            continue
    raise FileExistsError(f"{base}: 10,000 run folders of that second exist")


def _has_progress(run_dir: Path) -> bool:
    """Whether a run folder holds anything a new run there would lose."""
    from .checkpoint import list_checkpoints

    return bool(list_checkpoints(run_dir)) or (run_dir / "model.safetensors").exists()


def resolve_config(args, parser) -> dict:
    """Merge defaults, a resumed run's config.json and the explicit command-line flags."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "arch" in given and not str(given["arch"]).strip():
        parser.error("--arch is empty; give layers like 'conv:16,relu,maxpool:2,flatten,dense:10' "
                     "(or leave --arch out for the MLP)")
    if "resume" not in given:
        _refuse_conflicts(given, parser)
    cfg = dict(DEFAULTS)
    if given.get("arch") or given.get("model", "mlp") != "mlp":
        cfg.update(MODEL_DEFAULTS.get(given.get("model"), MODEL_DEFAULTS["cnn"]))
    if "resume" in given:
        saved = _read_run_config(given["resume"], parser)
        cfg.update(saved)
        ignored = sorted(k for k in given if k not in RESUMABLE_OVERRIDES | {"resume"}
                         and given[k] != saved.get(k))
        if ignored:
            parser.error("--resume continues a run with its own settings; these cannot change: "
                         + ", ".join("--" + k.replace("_", "-") for k in ignored))
        cfg["out"] = given["resume"]
        cfg["_previous_epochs"] = saved.get("epochs")
    elif given.get("limit") and "val_size" not in given and given["limit"] <= cfg["val_size"]:
        # a quick run: hold out a tenth for validation instead of refusing
        cfg["val_size"] = given["limit"] // 10
        cfg["_note"] = (f"--limit {given['limit']}: validation split shrunk to "
                        f"{cfg['val_size']} images (pass --val-size to choose)")
    cfg.update(given)
    if cfg["data_dir"]:  # stored absolute so evaluate/plots find the data from any folder
        cfg["data_dir"] = str(Path(cfg["data_dir"]).expanduser().resolve())
    if cfg["arch"]:  # store the spec itself (from a file too): resumable anywhere
        try:
            cfg["arch"] = arch_spec(cfg)
        except ValueError as e:
            parser.error(f"--arch: {e}")
    if not cfg.get("resume") and cfg.get("out"):
        out = Path(cfg["out"]).expanduser()  # (--out=~/x reaches here unexpanded)
        if ".." in out.parts:  # a/missing/../b: the folder the OS would reach, not a new "missing"
            out = Path(os.path.realpath(out))
        cfg["out"] = str(out)  # the folder checked is the folder written
        check_out_dir(out, parser)
        _refuse_run_files(Path(os.path.realpath(out)), parser)
        if (out / "config.json").exists():
            if _has_progress(out):
                parser.error(f"--out {out} already holds a run; continue it with --resume "
                             f"{out} or choose another --out")
            parser.error(f"--out {out} holds a run that stopped before its first checkpoint; "
                         f"--resume {out} starts it over with its saved settings, or choose "
                         "another --out")
    cfg.setdefault("quiet", False)
    if cfg["lr"] is None and isinstance(cfg["optimizer"], str):
        cfg["lr"] = DEFAULT_LR.get(cfg["optimizer"])
    validate(cfg, parser)
    if "momentum" in given and "resume" not in given and cfg["optimizer"] not in MOMENTUM_OPTIMIZERS:
        parser.error(f"--momentum applies to --optimizer {' or '.join(MOMENTUM_OPTIMIZERS)}; "
                     f"{cfg['optimizer']} has none, so it would be ignored (leave it out, or "
                     "choose --optimizer nesterov)")
    return cfg


#: options that shape the MLP only: a --model preset or an --arch spec has its own layers
MLP_ONLY = ("layers", "activation", "dropout")


def _refuse_conflicts(given: dict, parser) -> None:
    """Options that would be silently ignored are an error: two networks named at once, or
    MLP options next to a preset or a spec (which would also be recorded as if used)."""
    model = given.get("model")
    if given.get("arch") and model is not None:
        parser.error(f"--arch and --model {model} both name a network; give one of them")
    network = "--arch" if given.get("arch") else (f"--model {model}" if model not in (None, "mlp")
                                                  else None)
    mlp_only = [k for k in MLP_ONLY if k in given]
    if network and mlp_only:
        parser.error(", ".join("--" + k for k in mlp_only)
                     + (" shape" if len(mlp_only) > 1 else " shapes") + f" the MLP only; {network} "
                     "has its own layers (write them into an --arch spec instead, e.g. "
                     "'...,dropout:0.3,dense:10')")


def run_config(cfg: dict, backend) -> dict:
    """What config.json records: every setting plus versions and the machine."""
    from . import __version__

    settings = {k: v for k, v in cfg.items()
                if k not in ("resume", "quiet", "out") and not k.startswith("_")}
    return {"settings": settings, "nnx_version": __version__, "backend": backend.name,
            "device": str(backend.device), "device_description": backend.describe(),
            "versions": backend.versions(), "python": platform.python_version(),
            "platform": platform.platform(),
            "command": " ".join(["python -m nnx.train", *sys.argv[1:]]),
            "created": _dt.datetime.now().isoformat(timespec="seconds")}


def _saved_architecture(run_dir):
    """(layer specs, input shape) of a run's latest checkpoint, or None (no checkpoint yet,
    or an unreadable one: the resume reports that)."""
    from .checkpoint import CheckpointError, latest_checkpoint, read_state

    try:
        state = read_state(latest_checkpoint(run_dir))
        return state["architecture"], tuple(state["input_shape"])
    except (CheckpointError, KeyError, TypeError):
        return None


def _config_contradicts_checkpoint(cfg: dict, run_dir) -> str | None:
    """What config.json says that the run's latest checkpoint contradicts (its dtype, or
    another network: other layer types or sizes), or None. Details the spec builder has
    changed since (a convolution's bias before batch norm, say) do not count: the resume
    rebuilds the checkpoint's own layers (``build_model``'s ``saved``)."""
    from .backends import get_backend
    from .checkpoint import CheckpointError, latest_checkpoint, read_state

    try:
        state = read_state(latest_checkpoint(run_dir))
    except CheckpointError:
        return None  # no checkpoint yet, or a damaged one: the resume reports that
    if state.get("dtype") not in (None, cfg["dtype"]):
        return f"config.json says dtype {cfg['dtype']}, its checkpoint holds {state['dtype']} weights"

    def coarse(arch):
        return [(s.get("type"), s.get("out_features", s.get("out_channels", s.get("num_features"))))
                for s in arch if isinstance(s, dict)]

    try:
        model = build_model(dict(cfg, dtype="float32"), get_backend("numpy"))
        have, shape = coarse(model.architecture()), list(model.input_shape)
        want = coarse(state["architecture"])
    except Exception:  # noqa: BLE001  (a spec that does not build: validate() has said so)
        return None
    if have != want or shape != list(state["input_shape"]):
        describe = lambda arch: ", ".join(f"{t}({n})" if n else str(t) for t, n in arch)
        return (f"config.json describes another network than its checkpoint (config: "
                f"{describe(have)}; checkpoint: {describe(want)})")
    return None


def build_model(cfg: dict, backend, flat: bool = True, saved=None):
    """The MLP from --layers/--activation/--dropout, or the --model/--arch spec network
    (``flat``: parameters in one array; ``nnx.step.compile_step`` needs it off). A resumed
    run passes its checkpoint's ``saved`` (layer specs, input shape): the model is rebuilt
    exactly as it was trained, also when the spec builder has changed since (e.g. the
    presets' convolutions lost their bias before batch norm)."""
    from .model import Sequential, mlp

    if saved is not None:
        from .spec import layer_from_spec

        try:
            layers = [layer_from_spec(s) for s in saved[0]]
        except (ValueError, TypeError, KeyError):
            layers = None  # the resume's checks name what is wrong with the checkpoint
        if layers is not None:
            return Sequential(layers, saved[1], backend=backend, dtype=cfg["dtype"],
                              seed=cfg["seed"], flat=flat)

    if cfg["arch"] or cfg["model"] != "mlp":
        from .architectures import build_layers, spec_input_shape

        spec = arch_spec(cfg)
        shape = spec_input_shape(spec)
        return Sequential(build_layers(spec, shape), shape, backend=backend, dtype=cfg["dtype"],
                          seed=cfg["seed"], flat=flat)
    sizes = [int(s) for s in str(cfg["layers"]).split(",")]
    return mlp(sizes, activation=cfg["activation"], dropout=cfg["dropout"], backend=backend,
               dtype=cfg["dtype"], seed=cfg["seed"], flat=flat)


@abort_on_failure  # distributed: a failure on one process stops all of them
@cli_main
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .threads import set_threads

    set_threads(vars(args).pop("threads"))  # the machine's setting, not the run's: not in config
    compile_step = bool(vars(args).pop("compile"))  # how to run, not a setting of the run
    vars(args).pop("debug", None)  # read by cli_main; not a setting of the run
    from .backends.overrides import set_enabled

    set_enabled(not vars(args).pop("no_fused"))  # how to run, not a setting of the run
    checkpoint_every = vars(args).pop("checkpoint_every") or 1
    from .distributed import detect

    asked = vars(args).pop("distributed")
    distributed = asked or detect()  # how it was launched, not a setting
    cfg = resolve_config(args, parser)
    log = (lambda *a, **k: None) if cfg["quiet"] else print
    note = lambda msg: print(f"note: {msg}", file=sys.stderr)

    from . import datasets
    from .backends import BackendError, get_backend
    from .checkpoint import (CheckpointError, SaveError, atomic_write_json, check_position,
                             clean_run_folder, incomplete_checkpoints, latest_checkpoint,
                             list_checkpoints)
    from .data import make_splits
    from .optim import make_optimizer
    from .schedules import make_schedule
    from .step import CompileError, check_compilable
    from .trainer import Trainer, TrainingDiverged, TrainingInterrupted

    run_dir = Path(cfg.get("out") or _default_run_dir())
    if not cfg.get("out"):
        check_out_dir(run_dir, parser)
    try:
        from .distributed import device_for_rank

        backend = get_backend(cfg["backend"], device_for_rank(cfg["device"]) if distributed
                              else cfg["device"])
        dtype = backend.dtype(cfg["dtype"])
    except BackendError as e:
        if _debug_requested(argv):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .distributed import create_communicator

    comm = create_communicator(backend) if distributed else None
    rank = comm.rank if comm else 0
    if comm:  # every rank has checked --out before rank 0 writes there; rank 0 alone logs
        comm.barrier()  # (a default folder's name is rank 0's, broadcast when it is made)
        if rank:
            log, note = (lambda *a, **k: None), (lambda *a: None)
            comm.quiet_follower()
    if cfg.get("_note"):  # (rank 0 alone, when distributed)
        note(cfg["_note"])
    world = comm.size if comm else 1
    if world > 1 and (cfg["batch_size"] % world or compile_step):  # before any folder exists
        print("error: " + ((f"this run's batch size {cfg['batch_size']} (the global batch, kept "
                            f"when resuming) does not divide among {world} processes; resume "
                            f"it with a number of processes that divides {cfg['batch_size']}"
                            if cfg.get("resume") else
                            f"--batch-size {cfg['batch_size']} (the global batch) does not divide "
                            f"among {world} processes; use a multiple of {world}")
                           if cfg["batch_size"] % world else
                           "--compile is not supported with --distributed (the allreduce would "
                           "split the compiled step)"), file=sys.stderr)
        return 2
    if rank == 0 and asked and world == 1:  # (mpirun -n 1 without --distributed: an ordinary run)
        note("--distributed with one process: launch with mpirun -n K to train on K processes")
    if rank == 0 and cfg.get("sync_bn") and world == 1:
        note("--sync-bn changes nothing in a one-process run (its statistics are the global "
             "batch's already)")
    if cfg.get("resume"):
        problem = _config_contradicts_checkpoint(cfg, run_dir)
        if problem:
            print(f"error: --resume {run_dir}: {problem}; config.json was edited or belongs to "
                  "another run: restore it, or start a new run with another --out",
                  file=sys.stderr)
            return 2
    try:
        data = datasets.load(cfg["dataset"], data_dir=cfg["data_dir"], download=cfg["download"],
                             progress=not cfg["quiet"])
    except datasets.DatasetError as e:
        if _debug_requested(argv):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    model = build_model(cfg, backend, flat=not compile_step,
                        saved=_saved_architecture(run_dir) if cfg.get("resume") else None)
    splits = make_splits(data, backend, dtype, val_size=cfg["val_size"], seed=cfg["seed"],
                         limit=cfg["limit"], flatten=len(model.input_shape) == 1,
                         num_classes=NUM_CLASSES)
    optimizer = make_optimizer(cfg["optimizer"], model.named_parameters(), cfg["lr"],
                               momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
                               clip_norm=cfg["clip_norm"], xp=model.xp)
    from .trainer import batchnorm_rows_problem

    problem = batchnorm_rows_problem(model, len(splits["train"]), cfg["batch_size"], world,
                                     bool(cfg.get("sync_bn")) and world > 1)
    if problem:  # before the run folder exists; every process says the same (rank 0 shows it)
        print(f"error: {problem}", file=sys.stderr)
        return 2
    steps_per_epoch = -(-len(splits["train"]) // cfg["batch_size"])
    schedule = make_schedule(cfg["schedule"], cfg["lr"], cfg["epochs"], steps_per_epoch,
                             warmup_epochs=cfg["warmup_epochs"])
    if compile_step:
        try:
            check_compilable(model.backend, model=model)
        except CompileError as e:
            if _debug_requested(argv):
                raise
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        if not cfg.get("out") and not cfg.get("resume"):  # a default folder: taken atomically
            if rank == 0:  # by the one process that writes it (another run in the same second
                run_dir = _reserve(run_dir)  # may have taken the name since it was chosen)
            if comm:
                run_dir = Path(comm.bcast(str(run_dir)))
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if _debug_requested(argv):
            raise
        print(f"error: cannot create the run folder {run_dir} ({e.strerror or e}); choose "
              "another --out", file=sys.stderr)
        return 1
    for line in clean_run_folder(run_dir) if rank == 0 else ():
        note(f"{run_dir}: {line} (left by a process that was killed or ran out of disk space)")
    if comm:  # every rank looks for checkpoints only after rank 0 has tidied the folder
        comm.barrier()
    trainer = Trainer(model, optimizer, schedule, batch_size=cfg["batch_size"],
                      epochs=cfg["epochs"], seed=cfg["seed"], early_stopping=cfg["early_stopping"],
                      run_dir=run_dir, progress=not cfg["quiet"], log=log, comm=comm,
                      compile=compile_step, sync_bn=bool(cfg.get("sync_bn")))
    trainer.checkpoint_every = checkpoint_every
    if cfg.get("resume"):
        if not list_checkpoints(run_dir):
            trained = [name for name in ("model.safetensors", "results.json")
                       if (run_dir / name).exists()]
            if trained:  # finished once: starting over would overwrite its model and results
                print(f"error: --resume {run_dir}: no complete checkpoint is left in "
                      f"{run_dir / 'checkpoints'}, but the run holds {' and '.join(trained)} "
                      "from training: resuming would start it over and overwrite them. Restore "
                      "the checkpoints folder to continue it; nnx.load still reads its model",
                      file=sys.stderr)
                return 1
            note(f"{run_dir} has no checkpoint yet (the run stopped during its first epoch): "
                 "starting it over from epoch 1 with its saved settings")
            if rank == 0 and (run_dir / "metrics.jsonl").exists():
                (run_dir / "metrics.jsonl").unlink()
        else:
            for bad in incomplete_checkpoints(run_dir) if rank == 0 else ():
                note(f"{bad} is incomplete (no state.json): skipped; resuming from "
                     f"{latest_checkpoint(run_dir).name}, and a new checkpoint of that name "
                     "will replace it")
            try:
                ckpt = latest_checkpoint(run_dir)
                trainer.resume(ckpt)
                from .checkpoint import read_state

                check_position(read_state(ckpt), steps_per_epoch, where=ckpt)
            except CheckpointError as e:
                if _debug_requested(argv):
                    raise
                print(f"error: {e}", file=sys.stderr)
                return 1
            started = trainer.epoch + (1 if trainer.step_in_epoch else 0)
            if cfg["epochs"] < started:
                print(f"error: --epochs {cfg['epochs']} is fewer than the {started} epochs this "
                      f"run has already started; pass --epochs {started} or more", file=sys.stderr)
                return 2
            where_now = (f"step {trainer.step_in_epoch} of epoch {trainer.epoch + 1}"
                         if trainer.step_in_epoch else f"the end of epoch {trainer.epoch}")
            log(f"resuming {run_dir} from {ckpt.name} ({where_now}; global step "
                f"{trainer.global_step})")
            _explain_resume(cfg, trainer, schedule, steps_per_epoch, note)
            if trainer.epoch < cfg["epochs"] and rank == 0:  # the weights will change
                _remove_stale_evaluation(run_dir, note)
    if rank == 0:
        atomic_write_json(run_dir / "config.json",
                          {**run_config(cfg, backend), "world_size": comm.size if comm else 1})

    log(f"nnx: {backend.describe()}")
    log(f"data: {cfg['dataset']}  train {len(splits['train']):,}  "
        f"val {len(splits['val']) if 'val' in splits else 0:,}  test {len(splits['test']):,}")
    log(model.summary())
    log(f"optimizer {cfg['optimizer']} lr {cfg['lr']:g} ({cfg['schedule']}), batch {cfg['batch_size']}, "
        f"{cfg['epochs']} epoch{'s' if cfg['epochs'] != 1 else ''} -> {run_dir}")
    launcher = f"mpirun -n {comm.size} " if comm else ""
    resume_hint = f"{launcher}python -m nnx.train --resume {run_dir}"
    try:
        with _quiet_float_warnings():  # a NaN loss gets one message (below), not NumPy's too
            trainer.fit(splits["train"], splits.get("val"), splits["test"])
    except TrainingInterrupted as e:
        import signal

        from .distributed import agreed_stop

        where = e.checkpoint or "(no run folder)"
        print(f"\ninterrupted: saved checkpoint {where}\nresume with: {resume_hint}", file=sys.stderr)
        agreed_stop()
        return 143 if getattr(trainer, "_stop_kind", None) == signal.SIGTERM else 130
    except KeyboardInterrupt:
        kept = list_checkpoints(run_dir)
        print(f"\naborted: {'the last complete checkpoint is ' + str(kept[-1]) if kept else 'no checkpoint was written yet'}"
              f"; resume with: {resume_hint}", file=sys.stderr)
        return 130
    except TrainingDiverged as e:
        if _debug_requested(argv):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except SaveError as e:
        if _debug_requested(argv):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if _debug_requested(argv):
            raise
        kept = list_checkpoints(run_dir)
        print(f"error: cannot write to {run_dir} ({e.strerror or e}"
              f"{': ' + str(e.filename) if getattr(e, 'filename', None) else ''}); "
              + (f"the last complete checkpoint, {kept[-1].name}, is unchanged; free some space "
                 f"and continue with: {resume_hint}" if kept else "nothing was saved"),
              file=sys.stderr)
        return 1
    if cfg["plots"] and rank == 0:
        _draw_plots(run_dir, model, splits["test"], log)
    acc = trainer.result.get("test_acc")
    print(f"test accuracy {100 * acc:.2f}%  run folder: {run_dir}" if acc is not None
          else f"run folder: {run_dir}")
    log(f"resume: {resume_hint} --epochs N   "
        f"reload: nnx.load('{run_dir}')")
    return 0


def _quiet_float_warnings():
    """Silence NumPy's overflow/invalid-value warnings while training: a run that diverges
    is stopped with one message naming the cause (the Trainer's NaN check)."""
    import numpy as np

    return np.errstate(over="ignore", invalid="ignore", divide="ignore")


def _explain_resume(cfg, trainer, schedule, steps_per_epoch, note) -> None:
    """Say what a resume changes: a finished run needs more --epochs; a cosine schedule
    stretched over more (or fewer) epochs continues at another learning rate."""
    from .schedules import make_schedule

    previous = cfg.get("_previous_epochs")
    if trainer.epoch >= cfg["epochs"]:
        note(f"this run already finished its {trainer.epoch} epochs; pass --epochs "
             f"{trainer.epoch + 5} (say) to train longer")
        return
    if previous and previous != cfg["epochs"] and cfg["schedule"] == "cosine":
        old = make_schedule("cosine", cfg["lr"], previous, steps_per_epoch,
                            warmup_epochs=cfg["warmup_epochs"])
        step = trainer.global_step
        before, after = old(max(0, step - 1)), schedule(step)
        how = "stretches" if cfg["epochs"] > previous else "shortens"
        moves = "restarts at" if after >= before else "drops to"
        note(f"--epochs {cfg['epochs']} (was {previous}) {how} the cosine schedule: the "
             f"learning rate, {before:.3g} at the last step done, {moves} {after:.3g} and "
             f"decays to 0 over the remaining {cfg['epochs'] - trainer.epoch} epoch(s)")


def _remove_stale_evaluation(run_dir: Path, note) -> None:
    """nnx.evaluate's files in the run folder describe the weights before this resume:
    remove them (and the pictures they list) so nothing stale sits beside the new weights."""
    files = [run_dir / name for name in EVALUATION_FILES if (run_dir / name).exists()]
    try:
        listed = json.loads((run_dir / "evaluation.json").read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        listed = []
    for f in listed:
        f = Path(f)
        if f.suffix == ".png" and f.parent.resolve() == run_dir.resolve() and f.exists():
            files.append(f)
    if not files:
        return
    for f in files:
        f.unlink()
    note(f"removed {', '.join(f.name for f in files)}: they evaluated the weights from before "
         f"this resume; run python -m nnx.evaluate {run_dir} again when it ends")


def _draw_plots(run_dir, model, test_split, log) -> None:
    """PNG plots into the run folder, when the plotting module is present."""
    try:
        from . import plots
    except ImportError:
        return
    try:
        written = plots.plot_run(run_dir, model=model, test=test_split)
        log(f"plots: {', '.join(Path(p).name for p in written)}")
    except Exception as e:  # a plotting failure must never lose a finished run
        print(f"warning: plotting failed ({e}); the run itself is saved", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
