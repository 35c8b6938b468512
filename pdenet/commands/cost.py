"""``pdenet cost --config A B C``: parameters, FLOPs, latency and throughput of several networks side by side."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import (CommandError, build_named_model, fail, load_split, parse_override_args, restored_threads,
                      set_threads)

HELP = "parameters, FLOPs per image, latency and throughput of named networks, side by side"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", nargs="+", required=True, metavar="NAME", help="named network configurations")
    p.add_argument("--data", help="take the image shape and number of classes from this data set's test split")
    p.add_argument("--data-dir", help="folder holding the data set")
    p.add_argument("--input-shape", type=int, nargs=3, default=[3, 32, 32], metavar=("C", "H", "W"),
                   help="image shape when no --data is given (default 3 32 32)")
    p.add_argument("--num-classes", type=int, default=10, help="classes when no --data is given (default 10)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="model option applied to every configuration (VALUE a Python literal or a string); "
                        "repeatable")
    p.add_argument("--batch-size", type=int, default=128, help="batch for the throughput (default 128)")
    p.add_argument("--train", action="store_true", help="also time training steps at --batch-size")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (median; default 20)")
    p.add_argument("--channels-last", action="store_true", help="time in the NHWC memory layout")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    p.add_argument("--json", metavar="FILE", help="also write the table to FILE as JSON")


@restored_threads()
def run(args: argparse.Namespace) -> int:
    from ..costs import format_costs, measure_costs

    try:
        set_threads(args.threads)
        if args.batch_size < 1 or args.repeats < 1:
            raise CommandError("--batch-size and --repeats must be positive")
        if args.data:
            from ..data.registry import eval_split

            dataset = load_split(args.data, eval_split(args.data), args.data_dir)
            shape, classes = dataset.image_shape, dataset.num_classes
        else:
            shape, classes = tuple(args.input_shape), args.num_classes
            if min(shape) < 1 or classes < 1:
                raise CommandError(f"--input-shape {shape} and --num-classes {classes} must be positive")
        overrides = parse_override_args(args.override)
        models = {name: build_named_model(name, classes, shape[0], overrides) for name in args.config}
    except CommandError as exc:
        return fail("cost", exc)

    rows = {}
    for name, model in models.items():
        rows[name] = measure_costs(model, shape, args.batch_size, train=args.train, repeats=args.repeats,
                                   channels_last=args.channels_last)
    print(f"input {shape[0]}x{shape[1]}x{shape[2]}, {classes} classes")
    print(format_costs(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"input_shape": list(shape), "num_classes": classes,
                                               "rows": {k: c.as_dict() for k, c in rows.items()}}, indent=2) + "\n")
    return 0
