"""``pdenet evaluate CHECKPOINT``: the task's metrics of a saved model on a data split."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import CommandError, fail, load_split, restored_threads, set_threads

HELP = "evaluate a saved model (a checkpoint file or a run directory) on a data split"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint.pt, or the output directory of a training run")
    p.add_argument("--data", help="data set (default: the one the model was trained on)")
    p.add_argument("--data-dir", help="folder holding the data set (default: the standard places)")
    p.add_argument("--split", help="split to evaluate (default: the run's evaluation split, e.g. val for "
                                   "camvid, test otherwise)")
    p.add_argument("--batch-size", type=int, default=500, help="evaluation batch (default 500)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    p.add_argument("--json", metavar="FILE", help="also write the metrics to FILE as JSON")


@restored_threads()
def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_model
    from ..data import BatchLoader
    from ..distributed import DistContext, resolve_device
    from ..training import evaluate, task_class

    try:
        set_threads(args.threads)
        if args.batch_size < 1:
            raise CommandError(f"--batch-size must be positive, got {args.batch_size}")
        device = resolve_device(args.device)
        try:
            model, meta = load_model(args.checkpoint, map_location=device)
        except (FileNotFoundError, ValueError) as exc:
            raise CommandError(str(exc)) from None
        data = args.data or meta.get("data")
        if data is None:
            raise CommandError(f"{args.checkpoint} does not record its data set; pass --data")
        from ..data.registry import eval_split

        split = args.split or meta.get("settings", {}).get("eval_split") or eval_split(data)
        dataset = load_split(data, split, args.data_dir)
        if (dataset.num_classes, dataset.image_shape[0]) != (meta["num_classes"], meta["in_channels"]):
            raise CommandError(f"the model takes {meta['in_channels']}-channel images in {meta['num_classes']} "
                               f"classes; {data} has {dataset.image_shape[0]} channels and {dataset.num_classes} "
                               f"classes")
        try:
            task = task_class(meta.get("task", dataset.task)).from_dataset(dataset, meta.get("settings", {}))
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    except (CommandError, ValueError) as exc:
        return fail("evaluate", exc)

    loader = BatchLoader(dataset, args.batch_size, shuffle=False, augment=False, device=device)
    metrics = evaluate(model, task, loader, DistContext(device=device))
    print(f"{meta['config']} (epoch {meta['epoch']}) on {data}/{split}, {len(dataset)} images: "
          + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "time")
          + f"  ({metrics['time']:.1f}s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": str(args.checkpoint), "config": meta["config"],
                                               "data": data, "split": split, **metrics}, indent=2) + "\n")
    return 0
