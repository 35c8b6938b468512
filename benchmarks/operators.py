"""Time every operator kind against the dense 3x3 convolution at the same width, side by side in one run.

For each (batch, channels, size) the baseline is ``nn.Conv2d(c, c, 3, padding=1, bias=False)`` on a plain
NCHW input, the layer a lean operator replaces. Every operator of ``operators`` is timed on the same
input in channels-last layout (the layout the toolbox keeps end to end); ``lean(cross)[nchw]`` repeats the
lean operator on the NCHW input, conversion included, and ``dense`` is ``DenseConv`` on channels-last.
Forward runs under ``torch.no_grad()``; forward+backward computes the gradients of the input and of the
weights for a fixed random output gradient. Within each repeat all operators run one after the other
(interleaved, in a new random order each repeat: an operator runs measurably slower right after a dense
convolution), so load from other processes hits them alike. Each timing is the mean of a short burst of
``BURST`` consecutive calls after one untimed call, so the input is in cache as in a network, where the
previous layer has just written it (one call right after an unrelated operator measures the cache misses
of the other operator's data instead). The table shows medians after warm-up, the
speed-ups also from the fastest run of each (the least disturbed on a shared machine), and the load average
before and after. ``flop_ratio`` is the dense FLOPs over the operator's FLOPs, both from
``operators.count_flops`` (PyTorch's counter plus the work it cannot see).

    python benchmarks/operators.py                    # all four shapes
    python benchmarks/operators.py --quick            # (64, 128, 16) only, fewer repeats (< 1 minute)
    python benchmarks/operators.py --json ops.json    # also write the rows as JSON
    python benchmarks/operators.py --threads 1        # one torch thread (steadier on a busy machine)
    python benchmarks/operators.py --shapes 128,16,28 128,32,14 128,64,7   # other (batch, channels, size)

JSON rows: ``operator, batch, channels, size, fwd_ms, fwdbwd_ms, dense_fwd_ms, dense_fwdbwd_ms, flop_ratio``
(medians, ms) and the same times as minima (``fwd_min_ms``, ...).

The last row times the exact spectral norm ``DenseConv(256, 256, boundary="circular").spectral_norm((32, 32))``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

# This script shares its name with the package it measures: keep its own folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
from operators import DenseConv, count_flops, make_operator  # noqa: E402

SHAPES = ((64, 64, 32), (64, 128, 16), (64, 256, 8), (8, 64, 112))
QUICK_SHAPES = ((64, 128, 16),)
#: (row label, registry kind, keywords, input layout)
OPERATORS = (
    ("dense", "dense", {}, "channels_last"),
    ("lean(cross)", "lean", {"stencil": "cross"}, "channels_last"),
    ("lean(cross)[nchw]", "lean", {"stencil": "cross"}, "nchw"),
    ("lean(full)", "lean", {"stencil": "full"}, "channels_last"),
    ("lean(cross,g=4)", "lean", {"stencil": "cross", "groups": 4}, "channels_last"),
    ("grouped(g=4)", "grouped", {"groups": 4}, "channels_last"),
    ("separable", "separable", {}, "channels_last"),
    ("depthwise", "depthwise", {}, "channels_last"),
    ("pointwise", "pointwise", {}, "channels_last"),
    ("circulant", "circulant", {}, "channels_last"),
)
BASELINE = "nn.Conv2d[nchw]"
#: timed consecutive calls per measurement, after one untimed call
BURST = 3


def _timed(fn, burst: int = 1) -> float:
    """Milliseconds per call of ``fn``, the mean over ``burst`` consecutive calls."""
    start = time.perf_counter()
    for _ in range(burst):
        fn()
    return (time.perf_counter() - start) * 1e3 / burst


class Case:
    """One module on one input: callables for the forward and the forward+backward pass."""

    def __init__(self, module: nn.Module, x: torch.Tensor):
        self.module, self.flops = module, count_flops(module, x)
        self.x = x.detach().requires_grad_()
        with torch.no_grad():
            y = module(x)
        self.grad = torch.randn_like(y)
        self.fwd_ms: list[float] = []
        self.fwdbwd_ms: list[float] = []

    @torch.no_grad()
    def forward(self):
        self.module(self.x)

    def forward_backward(self):
        self.x.grad = None
        for p in self.module.parameters():
            p.grad = None
        self.module(self.x).backward(self.grad)

    def run(self, record: bool):
        self.forward()
        fwd = _timed(self.forward, BURST)
        self.forward_backward()
        fwdbwd = _timed(self.forward_backward, BURST)
        if record:
            self.fwd_ms.append(fwd)
            self.fwdbwd_ms.append(fwdbwd)


def benchmark_shape(batch: int, channels: int, size: int, repeats: int, warmup: int) -> list[dict]:
    """Rows for one shape: every operator and the NCHW ``nn.Conv2d`` baseline, interleaved per repeat."""
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    dense = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    cases = {BASELINE: Case(dense, x)}
    for label, kind, kwargs, layout in OPERATORS:
        cases[label] = Case(make_operator(kind, channels, channels, **kwargs), x if layout == "nchw" else x_cl)
    order = list(cases.values())
    for rep in range(warmup + repeats):
        random.Random(rep).shuffle(order)  # a new order per repeat: no operator always follows the same one
        for case in order:
            case.run(record=rep >= warmup)
    base = cases[BASELINE]
    med, best = statistics.median, min
    return [{"operator": label, "batch": batch, "channels": channels, "size": size,
             "fwd_ms": med(case.fwd_ms), "fwdbwd_ms": med(case.fwdbwd_ms),
             "dense_fwd_ms": med(base.fwd_ms), "dense_fwdbwd_ms": med(base.fwdbwd_ms),
             "flop_ratio": base.flops / case.flops,
             "fwd_min_ms": best(case.fwd_ms), "fwdbwd_min_ms": best(case.fwdbwd_ms),
             "dense_fwd_min_ms": best(base.fwd_ms), "dense_fwdbwd_min_ms": best(base.fwdbwd_ms)}
            for label, case in cases.items()]


def spectral_norm_row(repeats: int) -> dict:
    """Median wall time of the exact spectral norm of a 256-channel dense 3x3 operator, 32x32 periodic grid."""
    torch.manual_seed(0)
    op = DenseConv(256, 256, boundary="circular")
    op.spectral_norm((32, 32))  # warm-up
    ms = statistics.median(_timed(lambda: op.spectral_norm((32, 32))) for _ in range(repeats))
    return {"operator": "spectral_norm(dense 256, circular, 32x32)", "batch": 1, "channels": 256, "size": 32,
            "fwd_ms": ms, "fwdbwd_ms": None, "dense_fwd_ms": None, "dense_fwdbwd_ms": None, "flop_ratio": None}


def format_table(rows: list[dict]) -> str:
    """Markdown table: median times in ms, speed-ups over the NCHW ``nn.Conv2d`` of the same shape from the
    medians and from the fastest runs (the runs least disturbed by other processes), FLOP ratio."""
    lines = ["| operator | batch, c, n | fwd ms | fwd+bwd ms | speed-up fwd, fwd+bwd (median) | "
             "speed-up fwd, fwd+bwd (best) | FLOP ratio |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        shape = f"{r['batch']}, {r['channels']}, {r['size']}"
        if r["dense_fwd_ms"] is None:
            lines.append(f"| {r['operator']} | {shape} | {r['fwd_ms']:.0f} | | | | |")
            continue
        lines.append(f"| {r['operator']} | {shape} | {r['fwd_ms']:.2f} | {r['fwdbwd_ms']:.2f} | "
                     f"{r['dense_fwd_ms'] / r['fwd_ms']:.1f}x, {r['dense_fwdbwd_ms'] / r['fwdbwd_ms']:.1f}x | "
                     f"{r['dense_fwd_min_ms'] / r['fwd_min_ms']:.1f}x, "
                     f"{r['dense_fwdbwd_min_ms'] / r['fwdbwd_min_ms']:.1f}x | {r['flop_ratio']:.1f} |")
    return "\n".join(lines)


def _shape(text: str) -> tuple[int, int, int]:
    """``"64,128,16"`` -> ``(64, 128, 16)``; anything else is an argparse error naming the value."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers B,C,N, got {text!r}")
    return shape


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only (64, 128, 16), fewer repeats")
    p.add_argument("--repeats", type=int, help="timed repeats per operator (default 15; 5 with --quick)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repeats first")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--shapes", nargs="+", type=_shape, metavar="B,C,N",
                   help="(batch, channels, size) triples instead of the default four")
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 15)
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows = []
    for shape in args.shapes or (QUICK_SHAPES if args.quick else SHAPES):
        rows += benchmark_shape(*shape, repeats=repeats, warmup=args.warmup)
        print(format_table(rows[-len(OPERATORS) - 1:]), flush=True)
    rows.append(spectral_norm_row(1 if args.quick else 3))
    load_after = os.getloadavg()
    print()
    print(format_table(rows))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {repeats} repeats (median), "
          f"load average {load_before[0]:.1f} before / {load_after[0]:.1f} after, "
          f"{time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
