"""``python -m nnx.train``: train a network on MNIST or Fashion-MNIST from the command line.

Every run leaves a folder (default ``runs/<timestamp>/``) with config.json, metrics.jsonl,
checkpoints/ (resumable with --resume) and model.safetensors (final weights).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
from pathlib import Path

DEFAULTS = {
    "device": "cpu", "backend": "auto", "dataset": "mnist", "data_dir": None,
    "model": "mlp", "arch": None, "layers": "784,128,64,10", "activation": "relu", "dropout": 0.0,
    "optimizer": "nesterov", "lr": None, "momentum": 0.9, "weight_decay": 5e-4, "clip_norm": None,
    "schedule": "cosine", "warmup_epochs": 0.0, "epochs": 10, "batch_size": 128, "val_size": 5000,
    "seed": 0, "dtype": "float32", "early_stopping": 0, "limit": None, "download": True,
    "plots": True,
}
#: settings whose default depends on --model (a BatchNorm CNN trains best with Adam)
MODEL_DEFAULTS = {"cnn": {"optimizer": "adam", "weight_decay": 0.0}}
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.1, "nesterov": 0.1, "adam": 1e-3, "adamw": 1e-3}
#: settings a resumed run may change; everything else comes from the run's config.json
RESUMABLE_OVERRIDES = {"device", "backend", "data_dir", "epochs", "quiet", "plots", "download"}
NUM_INPUTS, NUM_CLASSES = 784, 10


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
                    "API) on MNIST or Fashion-MNIST. Defaults train 784-128-64-10 to >= 98% test "
                    "accuracy in 10 epochs on a CPU.",
        epilog="examples:\n"
               "  python -m nnx.train                           # default MLP on the CPU\n"
               "  python -m nnx.train --device cuda             # same on an NVIDIA GPU (CuPy)\n"
               "  python -m nnx.train --optimizer adam --lr 1e-3 --epochs 5\n"
               "  python -m nnx.train --resume runs/20260101-120000   # continue a run\n"
               "data is looked for in --data-dir, $NNX_DATA_DIR, ~/.cache/nnx/<dataset>, then "
               "downloaded (see docs/data.md)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=None)
    g = p.add_argument_group("hardware")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cpu)")
    g.add_argument("--backend", choices=BACKENDS,
                   help="array library: auto picks numpy on cpu, cupy on cuda (default: auto)")
    g.add_argument("--dtype", choices=("float32", "float64"), help="default: float32")
    add_threads_option(g)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=("mnist", "fashion-mnist"), help="default: mnist")
    g.add_argument("--data-dir", help="folder with the four IDX files (.gz or raw)")
    g.add_argument("--val-size", type=int, help="training images held out for validation (default: 5000)")
    g.add_argument("--limit", type=int, help="use only the first N training images (quick runs)")
    g.add_argument("--no-download", dest="download", action="store_false", default=None,
                   help="never download; fail if the files are not found")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=tuple(PRESETS),
                   help="mlp: Dense layers from --layers; cnn: " + PRESETS["cnn"] + " (default: mlp)")
    g.add_argument("--arch", metavar="SPEC",
                   help="any network as a layer spec (or a file holding one), e.g. "
                        "'conv:16,relu,maxpool:2,flatten,dense:10'; tokens: dense:OUT, "
                        "conv:OUT[:K[:S[:P]]], maxpool:K, avgpool:K, gap, bn, relu, leaky_relu, "
                        "tanh, sigmoid, dropout:P, flatten, res[...]; see docs/cnn.md")
    g.add_argument("--layers", help="MLP sizes, input 784 first and 10 classes last "
                                    "(default: 784,128,64,10)")
    g.add_argument("--activation", choices=sorted(ACTIVATIONS), help="hidden activation (default: relu)")
    g.add_argument("--dropout", type=float, help="dropout after each hidden layer, 0 disables (default: 0)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=list(OPTIMIZERS),
                   help="default: nesterov for the MLP, adam for --model cnn / --arch")
    g.add_argument("--lr", type=float, help="peak learning rate (default: "
                   + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    g.add_argument("--momentum", type=float, help="for momentum/nesterov (default: 0.9)")
    g.add_argument("--weight-decay", type=float, help="L2 (sgd/momentum/nesterov/adam) or decoupled (adamw) "
                        "(default: 5e-4 for the MLP, 0 for --model cnn / --arch)")
    g.add_argument("--clip-norm", type=float, help="clip gradients to this global L2 norm (default: off)")
    g.add_argument("--schedule", choices=list(SCHEDULES), help="learning-rate schedule (default: cosine)")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up length (default: 0)")
    g.add_argument("--epochs", type=int, help="default: 10")
    g.add_argument("--batch-size", type=int, help="default: 128")
    g.add_argument("--seed", type=int, help="seeds weights, validation split, shuffling, dropout (default: 0)")
    g.add_argument("--early-stopping", type=int, metavar="PATIENCE",
                   help="stop when validation loss has not improved for PATIENCE epochs; the "
                        "run ends with its best-validation weights (default: 0 = off)")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="run folder (default: runs/<timestamp>)")
    g.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint")
    g.add_argument("--quiet", action="store_true", default=None, help="no progress bars or per-epoch lines")
    g.add_argument("--no-plots", dest="plots", action="store_false", default=None,
                   help="do not draw PNG plots into the run folder at the end")
    return p


def validate(cfg: dict, parser) -> None:
    """Reject bad settings up front, with the option name and the accepted range."""
    def bad(msg):
        parser.error(msg)

    if cfg["batch_size"] <= 0:
        bad(f"--batch-size must be a positive integer, got {cfg['batch_size']}")
    if cfg["epochs"] <= 0:
        bad(f"--epochs must be a positive integer, got {cfg['epochs']}")
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
        bad(f"--limit ({cfg['limit']}) must be larger than --val-size ({cfg['val_size']})")
    try:
        sizes = [int(s) for s in str(cfg["layers"]).split(",")]
    except ValueError:
        bad(f"--layers must be comma-separated integers like 784,128,64,10, got {cfg['layers']!r}")
    if len(sizes) < 2 or min(sizes) <= 0:
        bad(f"--layers needs at least two positive sizes, got {cfg['layers']!r}")
    if sizes[0] != NUM_INPUTS or sizes[-1] != NUM_CLASSES:
        bad(f"--layers must start at {NUM_INPUTS} (28x28 pixels) and end at {NUM_CLASSES} "
            f"(classes), got {cfg['layers']!r}")
    if cfg["arch"] or cfg["model"] != "mlp":
        from .architectures import ArchitectureError, build_layers, input_shape_for
        from .errors import ShapeError

        spec = arch_spec(cfg)
        try:
            layers = build_layers(spec, input_shape_for(spec))
            out = input_shape_for(spec)
            for layer in layers:
                out = layer.output_shape(out)
        except (ArchitectureError, ShapeError, ValueError, TypeError) as e:
            bad(f"--arch: {e}")
        if tuple(out) != (NUM_CLASSES,):
            bad(f"--arch must end with {NUM_CLASSES} outputs (one per class), it ends with shape {tuple(out)}")


def arch_spec(cfg: dict) -> str:
    """The layer spec of a non-MLP run: --arch (text or a file holding it) or the preset."""
    from .architectures import PRESETS

    arch = cfg.get("arch")
    if arch:
        path = Path(arch)
        return path.read_text().strip().replace("\n", ",") if path.is_file() else arch
    return PRESETS[cfg["model"]]


def resolve_config(args, parser) -> dict:
    """Merge defaults, a resumed run's config.json and the explicit command-line flags."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    cfg = dict(DEFAULTS)
    if given.get("arch") or given.get("model", "mlp") != "mlp":
        cfg.update(MODEL_DEFAULTS.get(given.get("model"), MODEL_DEFAULTS["cnn"]))
    if "resume" in given:
        config_file = Path(given["resume"]) / "config.json"
        if not config_file.is_file():
            parser.error(f"--resume {given['resume']}: no config.json there; is it a run folder?")
        saved = json.loads(config_file.read_text())["settings"]
        cfg.update(saved)
        ignored = sorted(k for k in given if k not in RESUMABLE_OVERRIDES | {"resume"}
                         and given[k] != saved.get(k))
        if ignored:
            parser.error("--resume continues a run with its own settings; these cannot change: "
                         + ", ".join("--" + k.replace("_", "-") for k in ignored))
        cfg["out"] = given["resume"]
    cfg.update(given)
    if cfg["data_dir"]:  # stored absolute so evaluate/plots find the data from any folder
        cfg["data_dir"] = str(Path(cfg["data_dir"]).expanduser().resolve())
    if cfg["arch"] and Path(cfg["arch"]).is_file():  # store the spec itself: resumable anywhere
        cfg["arch"] = arch_spec(cfg)
    if not cfg.get("resume") and cfg.get("out") and (Path(cfg["out"]) / "config.json").exists():
        parser.error(f"--out {cfg['out']} already holds a run; continue it with --resume "
                     f"{cfg['out']} or choose another --out")
    cfg.setdefault("quiet", False)
    if cfg["lr"] is None:
        cfg["lr"] = DEFAULT_LR[cfg["optimizer"]]
    validate(cfg, parser)
    return cfg


def run_config(cfg: dict, backend) -> dict:
    """What config.json records: every setting plus versions and the machine."""
    from . import __version__

    settings = {k: v for k, v in cfg.items() if k not in ("resume", "quiet", "out")}
    return {"settings": settings, "nnx_version": __version__, "backend": backend.name,
            "device": str(backend.device), "device_description": backend.describe(),
            "versions": backend.versions(), "python": platform.python_version(),
            "platform": platform.platform(),
            "command": " ".join(["python -m nnx.train", *sys.argv[1:]]),
            "created": _dt.datetime.now().isoformat(timespec="seconds")}


def build_model(cfg: dict, backend):
    """The MLP from --layers/--activation/--dropout, or the --model/--arch spec network."""
    from .model import Sequential, mlp

    if cfg["arch"] or cfg["model"] != "mlp":
        from .architectures import build_layers, input_shape_for

        spec = arch_spec(cfg)
        shape = input_shape_for(spec)
        return Sequential(build_layers(spec, shape), shape, backend=backend, dtype=cfg["dtype"],
                          seed=cfg["seed"])
    sizes = [int(s) for s in str(cfg["layers"]).split(",")]
    return mlp(sizes, activation=cfg["activation"], dropout=cfg["dropout"], backend=backend,
               dtype=cfg["dtype"], seed=cfg["seed"])


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .threads import set_threads

    set_threads(vars(args).pop("threads"))  # the machine's setting, not the run's: not in config
    cfg = resolve_config(args, parser)
    log = (lambda *a, **k: None) if cfg["quiet"] else print

    from . import datasets
    from .backends import BackendError, get_backend
    from .checkpoint import CheckpointError, atomic_write_json, latest_checkpoint
    from .data import make_splits
    from .optim import make_optimizer
    from .schedules import make_schedule
    from .trainer import Trainer, TrainingDiverged, TrainingInterrupted

    try:
        backend = get_backend(cfg["backend"], cfg["device"])
        dtype = backend.dtype(cfg["dtype"])
    except BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        data = datasets.load(cfg["dataset"], data_dir=cfg["data_dir"], download=cfg["download"],
                             progress=not cfg["quiet"])
    except datasets.DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    model = build_model(cfg, backend)
    splits = make_splits(data, backend, dtype, val_size=cfg["val_size"], seed=cfg["seed"],
                         limit=cfg["limit"], flatten=len(model.input_shape) == 1)
    optimizer = make_optimizer(cfg["optimizer"], model.named_parameters(), cfg["lr"],
                               momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
                               clip_norm=cfg["clip_norm"])
    steps_per_epoch = -(-len(splits["train"]) // cfg["batch_size"])
    schedule = make_schedule(cfg["schedule"], cfg["lr"], cfg["epochs"], steps_per_epoch,
                             warmup_epochs=cfg["warmup_epochs"])
    run_dir = Path(cfg.get("out") or Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(model, optimizer, schedule, batch_size=cfg["batch_size"],
                      epochs=cfg["epochs"], seed=cfg["seed"], early_stopping=cfg["early_stopping"],
                      run_dir=run_dir, progress=not cfg["quiet"], log=log)
    if cfg.get("resume"):
        try:
            ckpt = latest_checkpoint(run_dir)
            trainer.resume(ckpt)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        started = trainer.epoch + (1 if trainer.step_in_epoch else 0)
        if cfg["epochs"] < started:
            print(f"error: --epochs {cfg['epochs']} is fewer than the {started} epochs this run "
                  f"has already started; pass --epochs {started} or more", file=sys.stderr)
            return 2
        log(f"resuming {run_dir} from {ckpt.name} (epoch {trainer.epoch}, step {trainer.global_step})")
    atomic_write_json(run_dir / "config.json", run_config(cfg, backend))

    log(f"nnx: {backend.describe()}")
    log(f"data: {cfg['dataset']}  train {len(splits['train']):,}  "
        f"val {len(splits['val']) if 'val' in splits else 0:,}  test {len(splits['test']):,}")
    log(model.summary())
    log(f"optimizer {cfg['optimizer']} lr {cfg['lr']:g} ({cfg['schedule']}), batch {cfg['batch_size']}, "
        f"{cfg['epochs']} epochs -> {run_dir}")
    try:
        trainer.fit(splits["train"], splits.get("val"), splits["test"])
    except TrainingInterrupted as e:
        where = e.checkpoint or "(no run folder)"
        print(f"\ninterrupted: saved checkpoint {where}\nresume with: python -m nnx.train "
              f"--resume {run_dir}", file=sys.stderr)
        return 130
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if cfg["plots"]:
        _draw_plots(run_dir, model, splits["test"], log)
    acc = trainer.result.get("test_acc")
    print(f"test accuracy {100 * acc:.2f}%  run folder: {run_dir}" if acc is not None
          else f"run folder: {run_dir}")
    log(f"resume: python -m nnx.train --resume {run_dir} --epochs N   "
        f"reload: nnx.load('{run_dir}')")
    return 0


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
