"""``pdenet train``: train a named network on a data set, with checkpoints, metrics and a final report.

Settings come from, in increasing priority: the defaults below, ``--config-file FILE.json`` (an object
whose keys are the option names with underscores, e.g. ``{"config": "resnet20", "batch_size": 256,
"overrides": {"widths": [32, 64, 128]}}``) and the options given on the command line. ``--resume`` takes every setting
from the run's checkpoint; only the run-time options (``RUNTIME``) may then be given again.

The output directory receives ``settings.json``, ``checkpoint.pt`` (atomically rewritten after every
epoch), ``weights.safetensors`` (the weights alone, also after every epoch; ``--no-safetensors`` skips it),
``metrics.json`` and ``metrics.csv`` (one row per epoch) and ``report.json`` (the final report).

Defaults (measured on the project's 2-core CPU machines, seed 0). ``pdenet train`` trains
``lean-resnet20-full``, the lean ResNet-20 with the full 3x3 stencil (the best lean network of the measured
accuracy-cost frontier, docs/benchmarks.md), on Fashion-MNIST for 7 epochs: SGD with Nesterov momentum 0.9,
learning rate 0.1 on a cosine schedule, weight decay 5e-4, batch 128, random crops (padding 2) and flips,
channels-last layout (the compiled lean kernel's layout). Without ``--threads`` the thread count is the fastest of
1, half and all cores in a one-second probe, repeated when the throughput changes (see ``ThreadTuner``). 7 epochs
reached 92.12% test accuracy in 321 s, the whole command, on 2 AVX-512 cores (AMD EPYC Zen 4, 37-46 s per epoch). With
the cross stencil (``lean-resnet20``) 7 epochs reached 91.36-91.87% on three hosts, 10 epochs 92.05-92.60% and 30
epochs (``--epochs 30``) 93.60% (1,261 s of training on 2 threads).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from pathlib import Path

import torch

from ..training import AMP_MODES, OPTIMIZERS, SCHEDULES, TASKS, TrainConfig, Trainer, seed_everything, task_class
from ._common import (CommandError, build_named_model, fail, load_split, parse_override_args, plural,
                      restored_threads, set_threads)
from .cost import add_knob_arguments, cost_line, with_knobs

HELP = "train a network on a data set (checkpoints every epoch, metrics, costs and stability report)"

DEFAULTS = {
    "config": "lean-resnet20-full",
    "data": "fashion-mnist",
    "data_dir": None,
    "task": None,            # None: the data set's own task (class labels -> classification)
    "eval_split": None,      # None: the data set's evaluation split (pdenet.data.registry.eval_split)
    "epochs": 7,             # the README's first command: 92.12% in 321 s on 2 cores (module docstring)
    "batch_size": 128,
    "optimizer": "sgd",
    "lr": None,              # per optimizer, see TrainConfig
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": None,    # per optimizer, see TrainConfig
    "schedule": "cosine",
    "warmup_epochs": 0.0,
    "milestones": [0.5, 0.75],
    "gamma": 0.1,
    "label_smoothing": 0.0,
    "seed": 0,
    "amp": "off",
    "grad_accum": 1,
    "clip_grad": None,
    "compile": False,
    "safetensors": True,     # weights.safetensors beside each checkpoint
    "augment": True,
    "zoom": None,            # None: the data set's own zoom range and colour jitter (Dataset.zoom_range,
    "color_jitter": None,    # Dataset.color_jitter; CamVid's are on, the classification sets' off)
    "overrides": {},
    "width": None,           # None: the configuration's own width and depth (see pdenet.configs.Knobs)
    "depth": None,
    "eval_every": 1,
    "eval_batch_size": 1000,
    "channels_last": True,   # NHWC: faster on CPU for these networks (measured), see the module docstring
    "out": None,
    "resume": False,
    "checkpoint_every": 0,   # optimizer steps between mid-epoch checkpoints; 0: at each epoch's end only
    "threads": None,
    "device": "auto",
    "progress": True,
}
RUNTIME = ("out", "resume", "threads", "device", "data_dir", "progress", "eval_batch_size", "config_file", "compile",
           "safetensors", "checkpoint_every")
TRAIN_KEYS = tuple(TrainConfig.__dataclass_fields__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS  # only options given explicitly reach the namespace; defaults are merged in run()
    from ..configs import list_configs
    from ..data import DATASETS

    p.add_argument("--config", default=s, help=f"named network configuration (default {DEFAULTS['config']}): "
                                               f"{', '.join(list_configs())}")
    p.add_argument("--data", default=s, help=f"data set: {', '.join(DATASETS)} (default {DEFAULTS['data']})")
    p.add_argument("--data-dir", default=s, help="folder holding the data set (default: the standard places)")
    p.add_argument("--task", default=s, choices=sorted(TASKS), help="what to learn (default: from the data set)")
    p.add_argument("--eval-split", default=s, help="split evaluated after each epoch and reported (default: val for "
                                                   "camvid, test otherwise)")
    p.add_argument("--epochs", type=int, default=s, help=f"epochs (default {DEFAULTS['epochs']})")
    p.add_argument("--batch-size", type=int, default=s,
                   help=f"global training batch (default {DEFAULTS['batch_size']})")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=s, help="sgd (momentum, Nesterov) or adamw")
    p.add_argument("--lr", type=float, default=s, help="peak learning rate (default 0.1 for sgd, 2e-3 for adamw)")
    p.add_argument("--momentum", type=float, default=s, help="SGD momentum (default 0.9)")
    p.add_argument("--no-nesterov", dest="nesterov", action="store_false", default=s,
                   help="classical instead of Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=s, help="default 5e-4 (sgd), 0.05 (adamw)")
    p.add_argument("--schedule", choices=SCHEDULES, default=s, help="learning-rate schedule (default cosine)")
    p.add_argument("--warmup-epochs", type=float, default=s, help="linear warm-up length (default 0)")
    p.add_argument("--milestones", type=float, nargs="+", default=s,
                   help="step schedule: fractions of the run where lr *= gamma (default 0.5 0.75)")
    p.add_argument("--gamma", type=float, default=s, help="step schedule factor (default 0.1)")
    p.add_argument("--label-smoothing", type=float, default=s, help="default 0 (off)")
    p.add_argument("--seed", type=int, default=s, help="seed of weights, data order and augmentation (default 0)")
    p.add_argument("--amp", choices=AMP_MODES, default=s,
                   help="mixed precision: bf16, or fp16 with a gradient scaler (default off)")
    p.add_argument("--grad-accum", type=int, default=s, metavar="N",
                   help="sum the gradients of N batches before each optimizer step (default 1)")
    p.add_argument("--clip-grad", type=float, default=s, metavar="NORM",
                   help="clip the norm of all gradients together to NORM at each step (default: no clipping)")
    p.add_argument("--safetensors", action=argparse.BooleanOptionalAction, default=s,
                   help="also write the weights as weights.safetensors after each epoch (default on)")
    p.add_argument("--compile", nargs="?", const=True, default=s, metavar="BACKEND",
                   help="train through torch.compile (optionally naming its backend; default off)")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=s,
                   help="no random crops, flips, zooms or colour jitter")
    p.add_argument("--zoom", type=float, default=s, metavar="Z",
                   help="random zoom by a factor in [1-Z, 1+Z] (default: the data set's; 0 for off)")
    p.add_argument("--color-jitter", type=float, default=s, metavar="J",
                   help="random contrast and brightness in [1-J, 1+J], colour gains in [1-J/2, 1+J/2] (default: "
                        "the data set's; 0 for off)")
    p.add_argument("--override", dest="override", action="append", default=s, metavar="KEY=VALUE",
                   help="model option passed to the configuration (VALUE is a Python literal when it parses as "
                        "one, else a string); repeatable")
    add_knob_arguments(p, default=s)
    p.add_argument("--eval-every", type=int, default=s, help="evaluate every N epochs and after the last (default 1)")
    p.add_argument("--eval-batch-size", type=int, default=s, help="evaluation batch (default 1000)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=s,
                   help="NHWC memory layout (default on)")
    p.add_argument("--config-file", default=s, metavar="FILE.json", help="settings as a JSON object")
    p.add_argument("--out", default=s, help="output directory (default runs/CONFIG-DATA-TIMESTAMP); never "
                                            "overwritten")
    p.add_argument("--resume", nargs="?", const=True, choices=[True, "auto"], type=_resume_mode, default=s,
                   metavar="auto", help="continue the run in --out; 'auto': continue it if --out holds one, else start "
                                        "it (the default when torchrun restarts a worker)")
    p.add_argument("--checkpoint-every", type=int, default=s, metavar="STEPS",
                   help="also checkpoint every STEPS optimizer steps inside an epoch, for an exact resume there "
                        "(default: at each epoch's end only)")
    p.add_argument("--threads", type=int, default=s, help="torch CPU threads (default: the fastest of 1, half and "
                                                          "all cores in a short probe; torchrun processes share "
                                                          "the cores)")
    p.add_argument("--device", default=s, help="auto, cpu or cuda (default auto)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=s, help="no progress bar")
    for name in sorted(TASKS):
        task_class(name).add_arguments(p)


def _resume_mode(text: str):
    if text != "auto":
        raise argparse.ArgumentTypeError(f"expected 'auto' or nothing, got {text!r}")
    return text


def restarted_by_torchrun() -> bool:
    """Whether this process is a worker that torchrun restarted after a failure (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


# ------------------------------------------------------------------------------------------------ settings
def resolve_settings(given: dict, known: set[str]) -> dict:
    """Defaults <- config file <- explicit options; on ``--resume`` the checkpoint's settings instead."""
    given = dict(given)
    overrides = parse_override_args(given.pop("override", []))
    settings = dict(DEFAULTS)
    if "config_file" in given:
        settings.update(read_config_file(given["config_file"], known))
    if "resume" not in given and restarted_by_torchrun():
        given["resume"] = "auto"
    if given.get("resume") == "auto":
        out = given.get("out") or default_out(given, settings)
        given.update(out=out, resume=(Path(out) / "checkpoint.pt").is_file() or (Path(out) / "settings.json").is_file())
    if given.get("resume"):
        if "out" not in given:
            raise CommandError("--resume needs --out DIR, the directory of the run to continue")
        stored = stored_settings(Path(given["out"]))
        threads = stored.pop("threads_used")
        changed = sorted(k for k, v in given.items() if k not in RUNTIME and stored.get(k) != v)
        if overrides and overrides != stored.get("overrides"):
            changed.append("override")
        if changed:
            raise CommandError(f"--resume continues a run with its own settings; do not change "
                               f"{', '.join('--' + k.replace('_', '-') for k in changed)}")
        # the same number of threads as before, unless told otherwise: float rounding depends on it
        settings = {**settings, **stored, "threads": threads}
    elif overrides:
        settings["overrides"] = {**settings["overrides"], **overrides}
    settings.update(given)
    return settings


def default_out(given: dict, settings: dict) -> str:
    """``runs/CONFIG-DATA-STAMP``: the time, or under torchrun its run id, which a restarted worker shares."""
    stamp = os.environ.get("TORCHELASTIC_RUN_ID") or time.strftime("%Y%m%d-%H%M%S")
    return f"runs/{given.get('config', settings['config'])}-{given.get('data', settings['data'])}-{stamp}"


def read_config_file(path: str, known: set[str]) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CommandError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise CommandError(f"config file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CommandError(f"config file {path} must hold a JSON object of settings")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CommandError(f"config file {path}: unknown settings {unknown}; known: {sorted(known)}")
    if not isinstance(data.get("overrides", {}), dict):
        raise CommandError(f"config file {path}: 'overrides' must be an object of model options")
    return data


def stored_settings(out: Path) -> dict:
    """The settings of the run in ``out``: its checkpoint's, or, where it stopped before its first checkpoint, its
    ``settings.json`` (it then starts anew in ``out``)."""
    from ..checkpoint import CHECKPOINT_NAME, load_checkpoint

    path = out / CHECKPOINT_NAME
    if not path.is_file():
        if int(os.environ.get("RANK", "0")) > 0 and (out.is_dir() or not out.exists()):
            raise CommandError(f"cannot resume: rank {os.environ['RANK']} does not see {path}, which rank 0 writes; "
                               "put --out on a file system that every machine of the run shares")
        if (out / "settings.json").is_file():
            try:
                stored = json.loads((out / "settings.json").read_text())
                return {**stored, "threads_used": stored.get("threads")}  # as the run was told
            except json.JSONDecodeError as exc:
                raise CommandError(f"cannot resume: {out / 'settings.json'} is not valid JSON ({exc})") from None
        raise CommandError(f"cannot resume: {path} does not exist")
    try:
        meta = load_checkpoint(path)["meta"]
        return {**meta["settings"], "threads_used": meta.get("threads")}
    except (ValueError, KeyError) as exc:
        raise CommandError(f"cannot resume from {path}: {exc}") from None


# ------------------------------------------------------------------------------------------------ run
def known_settings() -> set[str]:
    """Every setting name: the options of ``pdenet train`` (task options included) and ``overrides``."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return {a.dest for a in parser._actions} | set(DEFAULTS)


@restored_threads()
def run(args: argparse.Namespace) -> int:
    given = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    try:
        settings = resolve_settings(given, known_settings())
        return train(settings)
    except CommandError as exc:
        return fail("train", exc)
    except FloatingPointError as exc:
        print(f"pdenet train: {exc}", file=sys.stderr)
        return 1


def train(settings: dict) -> int:
    """Run (or resume) the training run described by ``settings``; returns the exit code."""
    from .. import checkpoint as ckpt
    from ..distributed import init_distributed

    start = time.perf_counter()
    try:
        dist = init_distributed(settings["device"])
    except (ValueError, RuntimeError) as exc:  # an unavailable device, a broken process group environment
        raise CommandError(str(exc)) from None
    try:
        trainer, loader, test_loader, meta, out, tuner = setup(settings, dist)
        task = trainer.task
        say(dist, f"training {meta['config']} on {meta['data']} ({len(loader.dataset)} train, "
                  f"{len(test_loader.dataset)} test images) for {trainer.config.epochs} epochs on {dist.device} "
                  f"x{dist.world_size}, {plural(torch.get_num_threads(), 'thread')}; output in {out}")

        def on_checkpoint(tr: Trainer) -> None:
            meta["threads"] = torch.get_num_threads()  # the count in use now: a resumed run continues with it
            tr.save(out / ckpt.CHECKPOINT_NAME, meta)

        def on_epoch_end(tr: Trainer, row: dict) -> None:
            on_checkpoint(tr)
            if dist.is_main:
                write_metrics(out, tr.history)
                if settings["safetensors"]:
                    ckpt.save_weights(out / ckpt.WEIGHTS_NAME, tr.model, {**meta, "epoch": tr.epoch})
            say(dist, format_row(row, task.metric))

        trainer.checkpoint_every, trainer.on_checkpoint = settings["checkpoint_every"], on_checkpoint
        callbacks = [tuner, on_epoch_end] if tuner is not None else [on_epoch_end]
        trainer.fit(loader, test_loader, settings["eval_every"], callbacks, settings["progress"])
        if dist.is_main:
            report = final_report(trainer, meta, out)
            report["artifacts"] = task.save_artifacts(trainer.model, test_loader.dataset, out)
            report["wall_time_s"] = time.perf_counter() - start
            ckpt.atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
            print(format_report(report, task), flush=True)
        dist.barrier()
        return 0
    finally:
        dist.close()


def setup(settings: dict, dist):
    """Everything a run needs, with bad input reported as CommandError: ``(trainer, train loader, test
    loader, checkpoint meta, output directory)``. Restores the checkpoint on ``--resume``."""
    from .. import checkpoint as ckpt
    from ..data import Augmentation, BatchLoader

    from ..configs import get_config

    threads = set_threads(settings["threads"], dist)
    try:
        get_config(settings["config"])
        config = TrainConfig(**{k: settings[k] for k in TRAIN_KEYS})
    except (TypeError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    overrides = with_knobs(settings["overrides"], settings["width"], settings["depth"])
    if config.batch_size % dist.world_size:
        raise CommandError(f"--batch-size {config.batch_size} is not divisible by the {dist.world_size} processes")
    if settings["eval_every"] < 1 or settings["eval_batch_size"] < 1 or settings["checkpoint_every"] < 0:
        raise CommandError("--eval-every and --eval-batch-size must be positive, --checkpoint-every not negative")
    train_set = load_split(settings["data"], "train", settings["data_dir"])
    try:
        augment = settings["augment"] and Augmentation.for_dataset(train_set, zoom=settings["zoom"],
                                                                   jitter=settings["color_jitter"])
    except ValueError as exc:
        raise CommandError(f"--zoom / --color-jitter: {exc}") from None
    from ..data.registry import eval_split

    settings["eval_split"] = settings["eval_split"] or eval_split(settings["data"])
    test_set = load_split(settings["data"], settings["eval_split"], settings["data_dir"])
    settings["task"] = settings["task"] or train_set.task
    try:
        task = task_class(settings["task"]).from_dataset(train_set, settings)
    except ValueError as exc:
        raise CommandError(str(exc)) from None

    out = Path(settings["out"] or default_out(settings, settings))
    if dist.is_main:
        try:
            ckpt.prepare_output_dir(out, settings["resume"])
        except (FileExistsError, FileNotFoundError) as exc:
            raise CommandError(str(exc)) from None
        except OSError as exc:
            raise CommandError(f"cannot write the output directory {out}: {exc.strerror or exc}") from None
    settings["out"] = str(out)
    meta = {"config": settings["config"], "overrides": overrides,
            "num_classes": train_set.num_classes, "in_channels": train_set.image_shape[0],
            "input_shape": list(train_set.image_shape), "task": settings["task"], "data": settings["data"],
            "settings": {k: v for k, v in settings.items() if k not in RUNTIME}}

    seed_everything(config.seed)
    model = build_named_model(settings["config"], train_set.num_classes, train_set.image_shape[0],
                              overrides).to(dist.device)
    say(dist, cost_line(settings["config"], model, train_set.image_shape))
    tuner = None
    if settings["threads"] is None and threads > 1 and not dist.enabled and dist.device.type == "cpu":
        tuner = ThreadTuner(threads, train_set.image_shape, config.batch_size, settings["channels_last"])
        tuner.probe(model)
    common = dict(seed=config.seed, rank=dist.rank, world_size=dist.world_size, device=dist.device,
                  channels_last=settings["channels_last"])
    loader = BatchLoader(train_set, config.batch_size // dist.world_size, shuffle=True,
                         augment=augment, drop_last=True, **common)
    test_loader = BatchLoader(test_set, -(-settings["eval_batch_size"] // dist.world_size), shuffle=False,
                              augment=False, drop_last=False, **common)
    if len(loader) < 1:
        raise CommandError(f"the training set ({len(train_set)} images) is smaller than one batch "
                           f"({config.batch_size})")
    try:
        trainer = Trainer(model, task, config, len(loader), dist, channels_last=settings["channels_last"],
                          compile=settings["compile"])
    except RuntimeError as exc:  # an unavailable compile backend
        raise CommandError(str(exc)) from None
    say(dist, str(trainer.fusion))
    if settings["resume"] and (out / ckpt.CHECKPOINT_NAME).is_file():
        try:
            trainer.restore(ckpt.load_checkpoint(out / ckpt.CHECKPOINT_NAME, map_location=dist.device))
        except (ValueError, RuntimeError) as exc:
            raise CommandError(f"cannot resume from {out / ckpt.CHECKPOINT_NAME}: {exc}") from None
        where = (f"in epoch {trainer.epoch + 1}/{config.epochs} after batch {trainer.batch_in_epoch}"
                 if trainer.batch_in_epoch else f"after epoch {trainer.epoch}/{config.epochs}")
        say(dist, f"resuming {out} {where}")
    elif settings["resume"]:
        say(dist, f"{out} holds no checkpoint yet (the run stopped in its first epoch): starting it anew there")
    elif dist.is_main:
        ckpt.atomic_write_text(out / "settings.json", json.dumps(settings, indent=2) + "\n")
    return trainer, loader, test_loader, meta, out, tuner


class ThreadTuner:
    """The default thread count: the fastest of 1, half and all cores on a few training steps of the model.

    Probed before training (about a second). The first epoch after a probe sets the expected training
    throughput (an epoch also loads and augments data, which the probe does not); a later epoch more than
    ``tolerance`` away from it means other jobs started or stopped, and the probe runs again: on a shared
    machine, all-core steps can be many times slower than single-thread ones while other processes keep
    cores busy. A probe that chose fewer threads than cores is checked once more after the next epoch: a
    one-second probe can fall in a brief busy moment, and fewer threads then run at a steady (slower) rate that
    the tolerance test alone would never question. Runs with an explicit ``--threads`` are not tuned (and are
    bit-reproducible).
    """

    def __init__(self, cores: int, image_shape, batch_size: int, channels_last: bool, tolerance: float = 0.25):
        self.candidates = {1, max(1, cores // 2), cores}
        self.image_shape, self.batch_size, self.channels_last = image_shape, batch_size, channels_last
        self.tolerance = tolerance
        self.expected: float | None = None
        self.recheck = False

    def probe(self, model, recheck: bool = False) -> int:
        """Time the candidates on a copy of ``model``, set torch to the fastest and return it; unless this probe
        is itself the ``recheck``, one that chose fewer threads than cores is repeated after the next epoch."""
        import copy

        from ..costs import fastest_threads

        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        best, rates = fastest_threads(copy.deepcopy(model).to(memory_format=layout), self.image_shape,
                                      self.batch_size, self.candidates, self.channels_last)
        self.expected = None
        self.recheck = best < max(self.candidates) and not recheck
        print(f"threads: {best} (training images/s by threads: "
              + ", ".join(f"{n}: {r:.0f}" for n, r in sorted(rates.items())) + ")", flush=True)
        return best

    def __call__(self, trainer: Trainer, row: dict) -> None:
        rate = row["train_images_per_s"]
        if trainer.done:
            return
        if self.recheck:
            self.probe(trainer.model, recheck=True)
        elif self.expected is None:
            self.expected = rate
        elif abs(rate / self.expected - 1) > self.tolerance:
            self.probe(trainer.model)


def say(dist, text: str) -> None:
    if dist.is_main:
        print(text, flush=True)


def format_row(row: dict, metric: str) -> str:
    """One line per epoch: learning rate (from the epoch's start to its last step where they differ), training
    and test loss and metric, time and throughput."""
    start, end = f"{row['lr']:.4g}", f"{row.get('lr_end', row['lr']):.4g}"  # older rows have no lr_end
    lr = start if end == start else f"{start}->{end}"
    text = (f"epoch {row['epoch']:3d}  lr {lr}  train loss {row['train_loss']:.4f} "
            f"{metric} {row.get('train_' + metric, float('nan')):.4f}")
    if "test_loss" in row:
        text += f"  test loss {row['test_loss']:.4f} {metric} {row.get('test_' + metric, float('nan')):.4f}"
    return text + f"  {row['train_time']:.1f}s  {row['train_images_per_s']:.0f} img/s"


def write_metrics(out: Path, history: list[dict]) -> None:
    """``metrics.json`` and ``metrics.csv``: one row per epoch (columns: the union of the rows' keys)."""
    from ..checkpoint import atomic_write_text

    atomic_write_text(out / "metrics.json", json.dumps(history, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in history for k in row)))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(out / "metrics.csv", buf.getvalue())


def final_report(trainer: Trainer, meta: dict, out: Path) -> dict:
    """Headline metric, costs (measured now, on this machine) and the stability report of the trained model."""
    from ..costs import measure_costs
    from ..stability import report as stability_report

    model = trainer.model
    last = next((r for r in reversed(trainer.history) if "test_loss" in r), {})
    shape = tuple(meta["input_shape"])
    costs = measure_costs(model, shape, trainer.config.batch_size, channels_last=trainer.channels_last)
    train_time = sum(r["train_time"] + r.get("test_time", 0.0) for r in trainer.history)
    return {
        "config": meta["config"], "data": meta["data"], "task": meta["task"], "epochs": trainer.epoch,
        "test": {k[5:]: v for k, v in last.items() if k.startswith("test_")},
        "costs": costs.as_dict(),
        "training_time_s": train_time,
        "training_images_per_s": (sum(r["train_images_per_s"] * r["train_time"] for r in trainer.history)
                                  / max(sum(r["train_time"] for r in trainer.history), 1e-9)),
        "stability": stability_report(model, shape).as_dicts(),
        "out": str(out),
    }


def format_report(report: dict, task) -> str:
    from ..stability import format_table

    c = report["costs"]
    test = report["test"]
    lines = [
        "",
        f"== {report['config']} on {report['data']}: {report['epochs']} epochs ==",
        f"{task.metric_label:<28} {test.get(task.metric, float('nan')):.4f}",
        *[f"{'test ' + k.replace('_', ' '):<28} {v:.4f}" for k, v in test.items()
          if k not in (task.metric, "time") and isinstance(v, float)],
        f"{'parameters':<28} {c['parameters']:,}",
        f"{'FLOPs per image':<28} {c['flops_per_image'] / 1e6:.2f} M",
        f"{'latency per image (b=1)':<28} {c['latency_ms']:.2f} ms",
        f"{'throughput (b=' + str(c['batch_size']) + ')':<28} {c['throughput']:.0f} images/s (inference)",
        f"{'training':<28} {report['training_time_s']:.1f} s, {report['training_images_per_s']:.0f} images/s",
        f"{'wall time of the command':<28} {report['wall_time_s']:.1f} s",
        "",
        "stability report:",
        format_table(report["stability"]),
        f"\nfiles in {report['out']}",
    ]
    return "\n".join(lines)
