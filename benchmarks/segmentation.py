"""Train the lean segmentation network and its dense twin with the same budget on CamVid and compare them.

Both networks (``lean-segnet`` and ``dense-segnet`` of ``pdenet.configs``: the same encoder–decoder, lean or
dense 3x3 operators) get the same seed, data order, augmentation (CamVid's defaults: colour jitter, zoom, random
shift by up to 16 pixels and horizontal flip, the geometry jointly on image and mask), optimizer, schedule and
number of epochs, on the CamVid development copy (``../shared/data/CamVid``: 80 training, 20 validation images of
360x480). Reported per network: mean IoU and pixel accuracy on the validation split (void ignored), per-class IoU,
parameters, FLOPs per 360x480 image (PyTorch's counter) and latency at batch 1 (median after warm-up), plus the
issue's targets (lean within 3 mIoU points of the dense twin at at least 4x fewer FLOPs). Writes
``results.json``, ``results.md`` and each network's ``predictions-<config>.png`` to ``--out``; ``--docs`` also
replaces the "Segmentation" section of ``docs/benchmarks.md``.

    python benchmarks/segmentation.py --threads 1 --docs   # full run (about 55 minutes on one core)
    python benchmarks/segmentation.py --quick              # smoke run: 8 training, 4 validation images, 1 epoch

The same training from the command line: ``pdenet train --task segmentation --data camvid --config
lean-segnet --epochs 80 --batch-size 8 --optimizer adamw --lr 3e-3 --eval-every 10``. Class weights are off by
default: on the development copy the SegNet median-frequency weights (``--class-weights segnet-median-freq``) made
the dense twin paint road as car (docs/benchmarks.md "Segmentation").
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

# benchmarks/operators.py shares its name with the operators package: keep this folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
from pdenet.allocator import keep_freed_memory  # noqa: E402
from pdenet.commands._common import CommandError, load_split  # noqa: E402
from pdenet.commands.train import format_row  # noqa: E402
from pdenet.configs import build_model  # noqa: E402
from pdenet.costs import measure_costs  # noqa: E402
from pdenet.data import Augmentation, BatchLoader  # noqa: E402
from pdenet.segmentation import SegmentationTask, save_prediction_grid  # noqa: E402
from pdenet.training import TrainConfig, Trainer, seed_everything  # noqa: E402

LEAN, DENSE = "lean-segnet", "dense-segnet"
INPUT_SHAPE = (3, 360, 480)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", help="folder holding CamVid (default: the standard places)")
    p.add_argument("--epochs", type=int, help="epochs per network (default 80; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 training and 4 validation images, 1 epoch")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--optimizer", default="adamw", choices=("sgd", "adamw"))
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--class-weights", default="none",
                   help="none, segnet-median-freq, median-freq or a comma-separated list")
    p.add_argument("--zoom", type=float, help="random zoom range (default: CamVid's, Dataset.zoom_range)")
    p.add_argument("--color-jitter", type=float, help="colour jitter strength (default: CamVid's)")
    p.add_argument("--eval-every", type=int, default=10, help="validate every N epochs and after the last")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--out", default="benchmarks/results/segmentation", help="output folder")
    p.add_argument("--docs", action="store_true", help=f"write the table into the Segmentation section of {DOCS}")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = 1 if args.quick else 80
    if args.epochs < 1 or args.batch_size < 1 or args.eval_every < 1:
        p.error("--epochs, --batch-size and --eval-every must be positive")
    return args


def train_one(name: str, train_set, val_set, augment: Augmentation, args, out: Path) -> dict:
    """Train configuration ``name`` with the benchmark's budget; its metrics, costs and predictions."""
    seed_everything(args.seed)
    model = build_model(name, num_classes=train_set.num_classes, in_channels=train_set.image_shape[0])
    task = SegmentationTask.from_dataset(train_set, {"class_weights": args.class_weights})
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                         seed=args.seed)
    loader = BatchLoader(train_set, args.batch_size, shuffle=True, augment=augment, seed=args.seed, drop_last=True,
                         channels_last=True)
    val_loader = BatchLoader(val_set, 4, shuffle=False, channels_last=True)
    trainer = Trainer(model, task, config, len(loader), channels_last=True)

    def report_epoch(_, row):  # one line per epoch (the progress bar redraws only on a terminal)
        print(f"  {name}: {format_row(row, task.metric)}", flush=True)

    start = time.perf_counter()
    history = trainer.fit(loader, val_loader, args.eval_every, [report_epoch], show_progress=True)
    train_time = time.perf_counter() - start
    repeats = 3 if args.quick else 20
    costs = measure_costs(model, INPUT_SHAPE, batch_size=1, warmup=2, repeats=repeats, channels_last=True)
    picture = out / f"predictions-{name}.png"
    images = val_set.images[:3]
    save_prediction_grid(images, val_set.targets[:3], task.predict(model, images), picture, val_set.class_names,
                         val_set.palette, val_set.ignore_index)
    last = history[-1]
    evaluated = [r for r in history if "test_miou" in r]
    return {"model": name, "epochs": args.epochs, "miou": last["test_miou"],
            "pixel_accuracy": last["test_pixel_accuracy"],
            "miou_last3": sum(r["test_miou"] for r in evaluated[-3:]) / len(evaluated[-3:]),
            "validation": [[r["epoch"], r["test_miou"], r["test_pixel_accuracy"]] for r in evaluated],
            "class_iou": {k[len("test_iou_"):]: v for k, v in last.items() if k.startswith("test_iou_")},
            "parameters": costs.parameters, "flops_per_image": costs.flops_per_image, "latency_ms": costs.latency_ms,
            "train_time_s": train_time, "train_loss": [r["train_loss"] for r in history], "predictions": picture.name}


def describe_augmentation(a: Augmentation) -> str:
    return (f"shift by up to {a.padding} pixels, {'horizontal flip, ' if a.flip else ''}zoom by [{1 - a.zoom:g}, "
            f"{1 + a.zoom:g}], colour jitter {a.jitter:g}")


def table(rows: list[dict]) -> str:
    lines = ["| network | mIoU | mIoU, mean of last 3 evaluations | pixel accuracy | params | GFLOPs (360x480) | "
             "latency ms (b=1) | training s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {100 * r['miou']:.2f} | {100 * r['miou_last3']:.2f} | "
                     f"{100 * r['pixel_accuracy']:.2f} | "
                     f"{r['parameters']:,} | {r['flops_per_image'] / 1e9:.2f} | {r['latency_ms']:.1f} | "
                     f"{r['train_time_s']:.0f} |")
    return "\n".join(lines)


def validation_table(rows: list[dict]) -> str:
    """mIoU / pixel accuracy (%) of every network at each evaluated epoch."""
    lines = ["| epoch | " + " | ".join(r["model"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for i, (epoch, *_) in enumerate(rows[0]["validation"]):
        cells = [f"{100 * r['validation'][i][1]:.1f} / {100 * r['validation'][i][2]:.1f}" for r in rows]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def class_table(rows: list[dict]) -> str:
    names = list(dict.fromkeys(n for r in rows for n in r["class_iou"]))
    lines = ["| class IoU | " + " | ".join(r["model"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for n in names:
        values = [r["class_iou"].get(n) for r in rows]
        lines.append(f"| {n} | " + " | ".join("-" if v is None else f"{100 * v:.1f}" for v in values) + " |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    by = {r["model"]: r for r in rows}
    lean, dense = by[LEAN], by[DENSE]
    gap = 100 * (dense["miou"] - lean["miou"])
    gap3 = 100 * (dense["miou_last3"] - lean["miou_last3"])
    flops = dense["flops_per_image"] / lean["flops_per_image"]
    speed = dense["latency_ms"] / lean["latency_ms"]
    return [f"mIoU gap dense − lean: {gap:+.2f} points (target <= 3): {'met' if gap <= 3 else 'MISSED'}; "
            f"{gap3:+.2f} points between the means of the last 3 evaluations",
            f"FLOP ratio dense/lean: {flops:.2f}x (target >= 4): {'met' if flops >= 4 else 'MISSED'}",
            f"latency ratio dense/lean at batch 1: {speed:.2f}x; parameter ratio "
            f"{dense['parameters'] / lean['parameters']:.2f}x"]


def write_docs(section: str, path: Path = DOCS) -> None:
    """Replace (or append) the ``## Segmentation`` section of ``path`` with ``section``."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    pattern = re.compile(r"^## Segmentation\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip() + "\n\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section.rstrip() + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    keep_freed_memory()  # as the pdenet commands do
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        train_set = load_split("camvid", "train", args.data_dir)
        val_set = load_split("camvid", "val", args.data_dir)
    except CommandError as exc:  # missing or corrupt files: the reader's message
        print(f"benchmarks/segmentation.py: {exc}", file=sys.stderr)
        return 2
    if args.quick:
        train_set, val_set = train_set.subset(slice(0, 8)), val_set.subset(slice(0, 4))
    augment = Augmentation.for_dataset(train_set, zoom=args.zoom, jitter=args.color_jitter)
    load_before = os.getloadavg()
    rows = []
    for name in (LEAN, DENSE):
        print(f"training {name} for {args.epochs} epochs on {len(train_set)} images ...", flush=True)
        rows.append(train_one(name, train_set, val_set, augment, args, out))
        print(f"{name}: mIoU {100 * rows[-1]['miou']:.2f} in {rows[-1]['train_time_s']:.0f}s", flush=True)
    load_after = os.getloadavg()
    command = "python benchmarks/segmentation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    setup = (f"CamVid development copy: {len(train_set)} training, {len(val_set)} validation images (360x480); "
             f"{args.epochs} epochs per network, batch {args.batch_size}, {args.optimizer} lr {args.lr} cosine, "
             f"class weights {args.class_weights}, seed {args.seed}; augmentation: "
             f"{describe_augmentation(augment)}; {torch.get_num_threads()} torch threads, "
             f"load average {load_before[0]:.1f} before and {load_after[0]:.1f} after (2 cores shared)")
    section = "\n".join(["## Segmentation", "", f"`{command.strip()}`", "", setup + ".", "", table(rows), "",
                         *[f"- {t}" for t in targets(rows)], "",
                         "Validation mIoU / pixel accuracy (%) during training:", "", validation_table(rows), "",
                         class_table(rows), "",
                         "Metrics on the validation split, void ignored; mIoU over the classes present in prediction "
                         "or ground truth. Predictions next to the ground truth: "
                         + ", ".join(f"`{out / r['predictions']}`" for r in rows) + ".", ""])
    (out / "results.md").write_text(section)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "setup": setup, "results": rows},
                                                 indent=2) + "\n")
    if args.docs:
        write_docs(section)
    print(section)
    print(f"written to {out}/results.md, results.json" + (f" and {DOCS}" if args.docs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
