"""Where a training step's time goes: the median step time of each configuration and a ``torch.profiler``
breakdown of its self CPU time into the lean operators fused with their batch norm and ReLU (the ResNet
blocks'), other lean operators, batch norm (with ReLU and the residual where fused), convolutions and everything
else, side by side in one run.

A step is ``pdenet.costs.training_step`` (forward, backward, SGD update on a random channels-last batch), the
step that ``pdenet cost --train`` times; the median is ``measure_train_step``'s. The thread count is ``torch``'s
unless ``--threads``. The profiled steps run after the timed ones; the profiler's own overhead makes their total
larger than the median step, so the shares, not the profiled milliseconds, are what compare.

On a host whose speed drifts (shared or throttled cores), ``--rounds R`` instead alternates the configurations
in one process, two timed steps each per round after a warm-up step, and reports the median of the per-round
step-time ratios to the first configuration: drift that lasts longer than a round cancels out.

    python benchmarks/train_step.py                                  # lean-resnet20 and resnet20, 28x28
    python benchmarks/train_step.py --configs lean-resnet20 --input-shape 3 32 32 --threads 1
    python benchmarks/train_step.py --rounds 20                      # alternating, ratio per round
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

# benchmarks/operators.py shares its name with the package: keep this folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
from pdenet.allocator import keep_freed_memory  # noqa: E402
from pdenet.configs import build_model, list_configs  # noqa: E402
from pdenet.costs import measure_train_step, training_step  # noqa: E402

#: (group, substrings of profiler event names), first match wins
GROUPS = (
    ("lean + batch norm (+ReLU) fused", ("LeanBatchNormReLU",)),
    ("lean operators", ("LeanConvFunction", "LeanConvMomentsFunction")),
    ("batch norm (+ReLU, +residual)", ("BatchNormReLU", "batch_norm", "threshold_backward", "relu")),
    ("convolutions", ("convolution", "conv2d")),
)


def group_of(name: str) -> str:
    for group, keys in GROUPS:
        if any(key in name for key in keys):
            return group
    return "everything else"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["lean-resnet20", "resnet20"])
    parser.add_argument("--input-shape", nargs=3, type=int, default=[1, 28, 28], metavar=("C", "H", "W"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps after 5 warm-up steps (default 20)")
    parser.add_argument("--profiled-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternate the configurations for this many rounds instead (no profile)")
    args = parser.parse_args(argv)
    unknown = [c for c in args.configs if c not in list_configs()]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; known: {', '.join(list_configs())}")
    if min(args.batch_size, args.steps, args.profiled_steps, args.rounds or 1, *args.input_shape) < 1:
        parser.error("--batch-size, --steps, --profiled-steps, --rounds and --input-shape must be positive")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    c, h, w = args.input_shape
    print(f"batch {args.batch_size}, input {c}x{h}x{w}, {torch.get_num_threads()} threads")
    if args.rounds:
        return alternate(args.configs, (c, h, w), args.batch_size, args.rounds)
    for name in args.configs:
        torch.manual_seed(0)
        model = build_model(name, num_classes=10, in_channels=c)
        shape = (c, h, w)
        median = 1e3 * measure_train_step(model, shape, args.batch_size, warmup=5, repeats=args.steps,
                                          channels_last=True)
        step, _ = training_step(model, shape, args.batch_size, channels_last=True)
        step()  # warm-up of this copy
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.profiled_steps):
                step()
        shares = defaultdict(float)
        for event in prof.key_averages():
            shares[group_of(event.key)] += event.self_cpu_time_total
        total = sum(shares.values())
        print(f"\n{name}: median step {median:.1f} ms ({args.batch_size / median * 1e3:.0f} images/s)")
        for group, _ in GROUPS + (("everything else", ()),):
            share = shares[group] / total
            print(f"  {group:30s} {100 * share:5.1f}%  ~{share * median:6.1f} ms of the median step")
    return 0


def alternate(configs, shape, batch_size: int, rounds: int) -> int:
    """Each round: per configuration one warm-up step, then two timed ones. Prints each configuration's median
    step and the median over rounds of its step time divided by the first configuration's."""
    steps = {}
    for name in configs:
        torch.manual_seed(0)
        model = build_model(name, num_classes=10, in_channels=shape[0])
        steps[name], _ = training_step(model, shape, batch_size, channels_last=True)
    times = {name: [] for name in configs}
    for _ in range(rounds):
        for name, step in steps.items():
            step()
            start = time.perf_counter()
            step()
            step()
            times[name].append((time.perf_counter() - start) / 2)
    first = configs[0]
    for name in configs:
        ratio = statistics.median(t / t0 for t, t0 in zip(times[name], times[first]))
        print(f"{name}: median step {1e3 * statistics.median(times[name]):.1f} ms, per-round ratio to {first} "
              f"{ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
