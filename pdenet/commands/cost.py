"""``pdenet cost --config A B C``: parameters, FLOPs, latency and throughput of several networks side by side.

``--width W`` and ``--depth D`` scale every configuration (``pdenet.configs.build_model(name, width=W,
depth=D)``). Each network's parameters and FLOPs are printed as soon as it is built, before the timings.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ._common import (CommandError, build_named_model, fail, load_split, parse_override_args, plural,
                      restored_threads, set_threads)

HELP = "parameters, FLOPs per image, latency and throughput of named networks, side by side"
BUSY_SPREAD = 0.25  # a spread of the batch-1 timings above this fraction of their median says the machine is busy


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
    add_knob_arguments(p)
    p.add_argument("--batch-size", type=int, default=128, help="batch for the throughput (default 128)")
    p.add_argument("--train", action="store_true", help="also time training steps at --batch-size")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (median; default 20)")
    p.add_argument("--channels-last", action="store_true", help="time in the NHWC memory layout")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the fastest of 1, half and all cores "
                                               "in a short probe, as pdenet train picks them)")
    p.add_argument("--json", metavar="FILE", help="also write the table to FILE as JSON")


def add_knob_arguments(p: argparse.ArgumentParser, **kwargs) -> None:
    """``--width W`` and ``--depth D`` (``kwargs`` go to both ``add_argument`` calls, e.g. ``default=``)."""
    from ..configs import DEPTH_HELP, WIDTH_HELP

    p.add_argument("--width", type=float, metavar="W", help=WIDTH_HELP, **kwargs)
    p.add_argument("--depth", type=int, metavar="D", help=DEPTH_HELP, **kwargs)


def with_knobs(overrides: dict, width: float | None, depth: int | None) -> dict:
    """``overrides`` plus ``width`` and ``depth`` where given (``build_model`` takes them as keywords);
    CommandError where an override sets them too."""
    knobs = {k: v for k, v in (("width", width), ("depth", depth)) if v is not None}
    both = sorted(set(knobs) & set(overrides))
    if both:
        raise CommandError(f"give --{both[0]} or --override {both[0]}=..., not both")
    return {**overrides, **knobs}


def cost_line(name: str, model, input_shape) -> str:
    """``NAME: P parameters, F FLOPs per image (C x H x W)``: measured by ``pdenet.costs`` (PyTorch's counter)."""
    from ..costs import count_parameters, flops_per_image

    c, h, w = input_shape
    return (f"{name}: {count_parameters(model):,} parameters, {flops_per_image(model, input_shape):,} FLOPs per "
            f"image on {c}x{h}x{w} (PyTorch's FLOP counter)")


@restored_threads()
def run(args: argparse.Namespace) -> int:
    from ..costs import format_costs, measure_costs

    try:
        cores = set_threads(args.threads)
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
        overrides = with_knobs(parse_override_args(args.override), args.width, args.depth)
        models = {name: build_named_model(name, classes, shape[0], overrides) for name in args.config}
    except CommandError as exc:
        return fail("cost", exc)
    for name, model in models.items():
        print(cost_line(name, model, shape), flush=True)

    if args.threads is None and cores > 1:  # on a busy machine fewer threads can be many times faster
        from .train import ThreadTuner

        ThreadTuner(cores, shape, args.batch_size, args.channels_last).probe(next(iter(models.values())))
    rows = {}
    for name, model in models.items():
        rows[name] = measure_costs(model, shape, args.batch_size, train=args.train, repeats=args.repeats,
                                   channels_last=args.channels_last)
    print(f"input {shape[0]}x{shape[1]}x{shape[2]}, {classes} classes, {plural(torch.get_num_threads(), 'thread')}")
    print(format_costs(rows))
    busy = {name: c.latency_spread for name, c in rows.items() if c.latency_spread > BUSY_SPREAD}
    if busy:
        print(f"warning: the batch-1 timings of {', '.join(busy)} spread by "
              f"{', '.join(f'{100 * v:.0f}%' for v in busy.values())} (interquartile range over the median): the "
              "machine looks busy; rerun on an idle machine or with --threads", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"input_shape": list(shape), "num_classes": classes,
                                               "rows": {k: c.as_dict() for k, c in rows.items()}}, indent=2) + "\n")
    return 0
