"""Train lean and baseline networks with one fixed budget each and compare accuracy against costs.

Models (issue 4's benchmark): the lean ResNet-20, its dense twin (ResNet-20), MobileNetV2 and ShuffleNetV2
with width multipliers matched to the lean network's FLOPs (largest multiplier within them), and the
PDE-ResNet with the symmetric (parabolic) lean layer. Data: Fashion-MNIST and the CIFAR-10 development copy
(``../shared/data``). Every model gets the same budget: ``--epochs N`` epochs, or ``--budget SECONDS`` of
training time, turned into a number of epochs per model from its measured training-step time (so faster
networks train for more epochs). Writes ``results.json``, ``results.md`` (the table) and
``accuracy_vs_flops.png`` to ``--out``; prints the table and the issue's targets.

    python benchmarks/train.py                         # full run: 15 epochs per model on both data sets
    python benchmarks/train.py --budget 600            # 10 minutes of training per model
    python benchmarks/train.py --quick                 # smoke run: small subsets, 1 epoch
    python benchmarks/train.py --quick --epochs 3 --models pde-parabolic-lean pde-rk2-lean pde-rk4-lean \
        pde-antisymmetric-lean pde-leapfrog-lean pde-leapfrog-reversible pde-implicit-lean   # the schemes
"""
from __future__ import annotations

import argparse
import json
import math
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
from pdenet.costs import measure_costs, measure_train_step  # noqa: E402
from pdenet.data import BatchLoader  # noqa: E402
from pdenet.networks import match_width  # noqa: E402
from pdenet.training import ClassificationTask, TrainConfig, Trainer, seed_everything  # noqa: E402

MODELS = ("lean-resnet20", "resnet20", "mobilenetv2", "shufflenetv2", "pde-parabolic-lean")
#: the PDE-ResNet's other schemes, trainable here by name (``--models pde-rk4-lean ...``)
SCHEME_MODELS = ("pde-rk2-lean", "pde-rk4-lean", "pde-antisymmetric-lean", "pde-leapfrog-lean",
                 "pde-leapfrog-reversible", "pde-hamiltonian-lean", "pde-hamiltonian-reversible", "pde-implicit-lean")
MATCHED = ("mobilenetv2", "shufflenetv2")  # width multiplier matched to the lean ResNet-20's FLOPs
LEAN, DENSE = "lean-resnet20", "resnet20"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=["fashion-mnist", "cifar10"], help="data sets")
    p.add_argument("--data-dir", help="folder holding the data sets (default: the standard places)")
    p.add_argument("--models", nargs="+", default=list(MODELS), help="configurations to train")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, help="epochs per model (default 15; 1 with --quick)")
    budget.add_argument("--budget", type=float, help="training seconds per model (epochs estimated per model)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2,000 training and 1,000 test images, 1 epoch")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels-last", action="store_true", help="train and time every model in NHWC layout")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", default="benchmarks/results/train", help="output folder")
    args = p.parse_args(argv)
    if args.epochs is None and args.budget is None:
        args.epochs = 1 if args.quick else 15
    unknown = sorted(set(args.models) - set(MODELS) - set(SCHEME_MODELS))
    if unknown:
        p.error(f"unknown models {unknown}; the benchmark trains {list(MODELS + SCHEME_MODELS)}")
    if LEAN not in args.models and set(MATCHED) & set(args.models):
        p.error(f"matching the widths of {list(MATCHED)} needs {LEAN} in --models")
    return args


def build(name: str, dataset, width_mult: float | None = None):
    overrides = {"width_mult": width_mult} if width_mult is not None else {}
    return build_model(name, num_classes=dataset.num_classes, in_channels=dataset.image_shape[0], **overrides)


def matched_widths(dataset, models) -> dict[str, float]:
    """Width multipliers of MobileNetV2 and ShuffleNetV2 whose FLOPs are the largest within the lean ResNet's."""
    from pdenet.costs import flops_per_image

    target = flops_per_image(build(LEAN, dataset), dataset.image_shape)
    return {name: match_width(lambda w, name=name: build(name, dataset, w), target, dataset.image_shape)[0]
            for name in models if name in MATCHED}


def epochs_for(model, dataset, args) -> int:
    """``--epochs``, or as many epochs as fit in ``--budget`` seconds at the measured training-step time."""
    if args.epochs is not None:
        return args.epochs
    step = measure_train_step(model, dataset.image_shape, args.batch_size, warmup=2, repeats=5,
                              channels_last=args.channels_last)
    return max(1, math.floor(args.budget / (step * (len(dataset) // args.batch_size))))


def train_one(name, train_set, test_set, args, width_mult=None) -> dict:
    seed_everything(args.seed)
    model = build(name, train_set, width_mult)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    epochs = epochs_for(model, train_set, args)
    config = TrainConfig(epochs=epochs, batch_size=args.batch_size, seed=args.seed)
    layout = {"channels_last": args.channels_last}
    loader = BatchLoader(train_set, args.batch_size, shuffle=True, augment=True, seed=args.seed, drop_last=True,
                         **layout)
    test_loader = BatchLoader(test_set, 1000, shuffle=False, **layout)
    trainer = Trainer(model, ClassificationTask(train_set.num_classes), config, len(loader), **layout)

    def report_epoch(_, row):  # one line per epoch (the progress bar redraws only on a terminal)
        print(f"  {name}: {format_row(row, trainer.task.metric)}", flush=True)

    start = time.perf_counter()
    history = trainer.fit(loader, test_loader, epochs, [report_epoch], show_progress=True)
    train_time = time.perf_counter() - start
    costs = measure_costs(model, train_set.image_shape, args.batch_size, **layout)
    images = sum(r["train_images_per_s"] * r["train_time"] for r in history)
    return {"model": name, "width_mult": width_mult, "epochs": epochs, "accuracy": history[-1]["test_accuracy"],
            "parameters": costs.parameters, "flops_per_image": costs.flops_per_image,
            "latency_ms": costs.latency_ms, "train_images_per_s": images / sum(r["train_time"] for r in history),
            "train_time_s": train_time}


def table(rows: list[dict]) -> str:
    header = "| model | epochs | accuracy | params | MFLOPs/img | latency ms (b=1) | train img/s |"
    lines = [header, "|" + "---|" * 7]
    for r in rows:
        name = r["model"] + (f" (w={r['width_mult']:.3f})" if r["width_mult"] is not None else "")
        lines.append(f"| {name} | {r['epochs']} | {100 * r['accuracy']:.2f}% | {r['parameters']:,} | "
                     f"{r['flops_per_image'] / 1e6:.2f} | {r['latency_ms']:.2f} | {r['train_images_per_s']:.0f} |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets for the lean ResNet-20, checked on this data set's rows."""
    by = {r["model"]: r for r in rows}
    if LEAN not in by:
        return []
    lean, out = by[LEAN], []
    if DENSE in by:
        dense = by[DENSE]
        gap = 100 * (dense["accuracy"] - lean["accuracy"])
        flops = dense["flops_per_image"] / lean["flops_per_image"]
        speed = lean["train_images_per_s"] / dense["train_images_per_s"]
        out += [f"accuracy gap to dense twin {gap:+.2f} points (target <= 1.5): {'met' if gap <= 1.5 else 'MISSED'}",
                f"FLOP ratio dense/lean {flops:.1f}x (target >= 5): {'met' if flops >= 5 else 'MISSED'}",
                f"training throughput lean/dense {speed:.2f}x (target >= 3): {'met' if speed >= 3 else 'MISSED'}"]
    for name in MATCHED:
        if name in by:
            ahead = lean["accuracy"] > by[name]["accuracy"]
            out.append(f"ahead of {name} at matched FLOPs ({100 * lean['accuracy']:.2f}% vs "
                       f"{100 * by[name]['accuracy']:.2f}%): {'met' if ahead else 'MISSED'}")
    return out


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, (data, rows) in zip(axes[0], results.items()):
        for r in rows:
            ax.scatter(r["flops_per_image"] / 1e6, 100 * r["accuracy"], s=40)
            ax.annotate(r["model"], (r["flops_per_image"] / 1e6, 100 * r["accuracy"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("MFLOPs per image (PyTorch counter)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(data)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    keep_freed_memory()  # as the pdenet commands do
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, report = {}, []
    for data in args.data:
        try:
            train_set = load_split(data, "train", args.data_dir)
            test_set = load_split(data, "test", args.data_dir)
        except CommandError as exc:  # unknown name, missing or corrupt files: the reader's message
            print(f"benchmarks/train.py: {exc}", file=sys.stderr)
            return 2
        if args.quick:
            train_set, test_set = train_set.subset(slice(0, 2000)), test_set.subset(slice(0, 1000))
        widths = matched_widths(train_set, args.models)
        rows = []
        for name in args.models:
            print(f"[{data}] training {name} ...", flush=True)
            rows.append(train_one(name, train_set, test_set, args, widths.get(name)))
            print(f"[{data}] {name}: {100 * rows[-1]['accuracy']:.2f}% in {rows[-1]['train_time_s']:.0f}s",
                  flush=True)
        results[data] = rows
        report += [f"## {data} ({len(train_set)} training, {len(test_set)} test images)", "", table(rows), "",
                   *[f"- {t}" for t in targets(rows)], ""]
    budget = f"{args.epochs} epochs" if args.epochs is not None else f"{args.budget:.0f} s of training"
    layout = "channels-last" if args.channels_last else "NCHW"
    header = [f"# Training benchmark: one budget per model ({budget}), batch {args.batch_size}, seed {args.seed}, "
              f"{layout}, {torch.get_num_threads()} threads", ""]
    text = "\n".join(header + report)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    plot(results, out / "accuracy_vs_flops.png")
    print(text)
    print(f"written to {out}/results.md, results.json, accuracy_vs_flops.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
