"""Where the fused lean layers' time goes inside a training step, kernel by kernel and width by width, against the
same kernel calls repeated on warm data.

Each fused layer (a lean operator with its batch norm and ReLU, half of a ``pdenet.fuse``d residual block) makes
four compiled-kernel calls per step: the lean operator's forward with batch norm's moments (``lean_forward``),
batch norm's elementwise pass (``bn forward``), its reduction in the backward (``bn backward reduction``) and the
lean backward fed by batch norm's gradient (``lean_backward``). The script wraps the four with timers, runs ``--steps`` training steps
(``pdenet.costs.training_step``: channels-last, batch ``--batch-size``) and reports each kernel's milliseconds per
step grouped by the layer's output channel count ("in the step"; "bn forward" also counts the stem's batch norm).
It then calls each kernel again on the arguments of its last call in one more step, ``--repeats`` times in a row
("warm": the inputs were just read, so they come from the caches), and reports the ratio. A width's calls differ
a little (a stage's first layer reads a narrower input; a block's two layers differ in residual and mask): the
warm time is that of its last call. The gap between the two is the cost of the step's order of work: every layer's
tensors were written long before they are read again, and come from memory.

    python benchmarks/lean_breakdown.py                         # lean-resnet20, 1x28x28, batch 128
    python benchmarks/lean_breakdown.py --input-shape 3 32 32
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
from pdenet_kernels import binding  # noqa: E402
from pdenet.allocator import keep_freed_memory  # noqa: E402
from pdenet.configs import build_model, list_configs  # noqa: E402
from pdenet.costs import training_step  # noqa: E402

#: (label, module, attribute, (argument, dimension) that holds the layer's output channel count)
KERNELS = (
    ("lean forward (+moments)", binding, "lean_forward", (1, 0)),  # pointwise weight (c_out, c_in)
    ("bn forward", binding, "bn_relu_forward", (0, 1)),  # z (B, c_out, n1, n2)
    ("bn backward reduction", binding, "bn_relu_backward_coefficients", (0, 1)),  # output gradient
    ("lean backward (bn gradient)", binding, "lean_backward", (0, 1)),  # output gradient
)


def instrument(totals: dict, calls: dict, last_call: dict, recording: dict) -> None:
    """Wrap the kernels, keyed by ``(label, output channels)``: ``totals`` sums the seconds of their calls,
    ``calls`` counts them and, while ``recording["on"]``, ``last_call`` keeps the (unwrapped) kernel and the
    arguments of the latest. Keeping them holds a step's tensors into the next, which then allocates anew: only an
    untimed step records."""
    for label, module, name, (arg, dim) in KERNELS:
        kernel = getattr(module, name)

        def timed(*args, _kernel=kernel, _label=label, _arg=arg, _dim=dim, **kwargs):
            start = time.perf_counter()
            result = _kernel(*args, **kwargs)
            elapsed = time.perf_counter() - start
            key = (_label, args[_arg].shape[_dim])
            totals[key] += elapsed
            calls[key] += 1
            if recording["on"]:
                last_call[key] = (_kernel, args, kwargs)
            return result

        setattr(module, name, timed)


def median_time(fn, repeats: int, warmup: int = 2, args=(), kwargs=None) -> float:
    """Median seconds of ``fn(*args, **kwargs)`` called ``repeats`` times in a row after ``warmup`` calls."""
    kwargs = kwargs or {}
    for _ in range(warmup):
        fn(*args, **kwargs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="lean-resnet20", choices=list_configs(), metavar="NAME")
    parser.add_argument("--input-shape", nargs=3, type=int, default=[1, 28, 28], metavar=("C", "H", "W"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps after 5 warm-up steps")
    parser.add_argument("--repeats", type=int, default=30, help="warm calls per kernel and width")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.steps, args.repeats, *args.input_shape) < 1:
        parser.error("--batch-size, --steps, --repeats and --input-shape must be positive")
    if not binding.available():
        parser.error(f"the compiled kernels are not in use: {binding.status()}")
    keep_freed_memory()
    torch.manual_seed(0)
    shape = tuple(args.input_shape)
    model = build_model(args.config, num_classes=10, in_channels=shape[0])
    step, _ = training_step(model, shape, args.batch_size, channels_last=True)
    plain = median_time(step, args.steps, warmup=5)
    totals, calls, last_call, recording = defaultdict(float), defaultdict(int), {}, {"on": False}
    instrument(totals, calls, last_call, recording)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    instrumented = (time.perf_counter() - start) / args.steps
    per_step_calls = {key: count // args.steps for key, count in calls.items()}
    recording["on"] = True  # one more step, untimed
    step()
    if not totals:
        print(f"{args.config} makes no fused lean kernel calls")
        return 1
    print(f"{args.config}, batch {args.batch_size}, input {'x'.join(map(str, shape))}, {torch.get_num_threads()} "
          f"threads: median step {1e3 * plain:.1f} ms ({1e3 * instrumented:.1f} ms instrumented)")
    print("\n| kernel | channels | in the step ms | warm ms (per call x calls) | in the step / warm |")
    print("|---|---|---|---|---|")
    step_total = warm_total = 0.0
    for (label, width), seconds in sorted(totals.items(), key=lambda item: (item[0][1], item[0][0])):
        kernel, call_args, call_kwargs = last_call[label, width]
        per_step, n = seconds / args.steps, per_step_calls[label, width]
        one = median_time(kernel, args.repeats, args=call_args, kwargs=call_kwargs)
        step_total += per_step
        warm_total += one * n
        print(f"| {label} | {width} | {1e3 * per_step:.2f} | {1e3 * one:.3f} x {n} | {per_step / (one * n):.2f} |")
    print(f"\nthe four kernels: {1e3 * step_total:.1f} ms of the {1e3 * instrumented:.1f} ms step, "
          f"{1e3 * warm_total:.1f} ms warm ({step_total / warm_total:.2f}x); outside them: "
          f"{1e3 * (instrumented - step_total):.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
