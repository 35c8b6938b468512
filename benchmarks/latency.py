"""Inference latency of the lean ResNet-20 against its dense twin and the FLOP-matched MobileNetV2 and
ShuffleNetV2, at batch 1 and 32, in every way a user would run them, side by side in one run.

Variants of each model:

- ``eager``: the model as built, in eval mode under ``torch.inference_mode``;
- ``folded``: ``pdenet.fuse(model, inference=True)``: batch norms folded into the operators before them, lean
  layers with their bias, residual and ReLU as one compiled-kernel call (the dense twin's convolutions become
  ``nn.Conv2d`` with a bias: oneDNN);
- ``compiled``: ``torch.compile`` (inductor) of the folded model;
- ``onnxruntime``: the ONNX file of ``pdenet.export.export_onnx`` in onnxruntime (when ``onnxruntime`` is
  installed), with as many intra-op threads as torch.

Every variant runs both in NCHW and in channels-last, and the faster is reported (the table says which), so each
network gets its best memory format. Each round times every (model, variant, format) once, in turn, so drift of
the host's speed hits them alike; the table gives the median over rounds of the per-round medians, and each
time's speed-up (how many times faster) over the dense ResNet-20 folded in PyTorch (its batch norms folded, oneDNN's
convolutions, the faster memory format) and over the dense ResNet-20's best time in any variant.

``--breakdown`` says where the folded lean ResNet-20's time goes at batch 1: the stem, the head, and the chain of
its nine residual blocks at each level of the call (the module, the registered operator, the compiled kernels
called directly).

    python benchmarks/latency.py                         # 3x32x32, batches 1 and 32, 2 threads
    python benchmarks/latency.py --threads 1 --rounds 9 --batches 1
    python benchmarks/latency.py --breakdown --threads 1
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# benchmarks/operators.py shares its name with the package: keep this folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
from pdenet import build_model, fuse, match_width  # noqa: E402
from pdenet.costs import flops_per_image  # noqa: E402
from pdenet.export import export_onnx  # noqa: E402

LEAN, DENSE, MATCHED = "lean-resnet20", "resnet20", ("mobilenetv2", "shufflenetv2")
VARIANTS = ("eager", "folded", "compiled", "onnxruntime")
CL = torch.channels_last


def build(name: str, input_shape, width_mult=None):
    overrides = {} if width_mult is None else {"width_mult": width_mult}
    return build_model(name, num_classes=10, in_channels=input_shape[0], **overrides).eval()


def models(input_shape) -> dict:
    """The lean and dense ResNet-20 and the baselines at the largest width multiplier within the lean FLOPs."""
    nets = {LEAN: build(LEAN, input_shape), DENSE: build(DENSE, input_shape)}
    target = flops_per_image(nets[LEAN], input_shape)
    for name in MATCHED:
        width, _ = match_width(lambda w, name=name: build(name, input_shape, w), target, input_shape)
        nets[f"{name} (w={width:.3f})"] = build(name, input_shape, width)
    return nets


def runner(model, variant: str, channels_last: bool, example: torch.Tensor, threads: int):
    """A callable ``x -> output`` for the variant, or ``None`` where it is unavailable (onnxruntime absent)."""
    model = copy.deepcopy(model)
    if variant == "eager":
        net = model.to(memory_format=CL) if channels_last else model
        return lambda x: net(x)
    fuse(model, inference=True)
    if variant == "folded":
        net = model.to(memory_format=CL) if channels_last else model
        return lambda x: net(x)
    if variant == "compiled":
        net = torch.compile(model.to(memory_format=CL) if channels_last else model)
        return lambda x: net(x)
    if importlib.util.find_spec("onnxruntime") is None or channels_last:  # ONNX takes NCHW
        return None
    import onnxruntime

    path = Path(tempfile.mkdtemp()) / "model.onnx"
    export_onnx(model, example, path)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})


def median_time(fn, x, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def quantile_time(fn, calls: int = 2000, q: float = 0.1) -> float:
    """The ``q`` quantile of ``calls`` timed calls after a warm-up: a per-call cost robust to a busy host."""
    for _ in range(calls // 10):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[int(q * calls)]


def breakdown(input_shape) -> list[str]:
    """Where the folded lean ResNet-20's batch-1 time goes (see the module notes)."""
    from pdenet_kernels import binding
    from pdenet_kernels.ops import chain_weight_shapes

    model = build(LEAN, input_shape).to(memory_format=CL)
    fuse(model, inference=True)
    x = torch.randn(1, *input_shape).contiguous(memory_format=CL)
    chain = model.stages
    with torch.inference_mode():
        h = model.stem(x)
        z = chain(h)
        args = (h, chain.taps, chain.kernel_size, chain.circular, chain.groups, chain.strides, chain.widths,
                chain.packed)
        shapes = chain_weight_shapes(h.shape[1], chain.widths, chain.groups, chain.taps.shape[0])
        levels = [("the whole network", lambda: model(x)), ("its stem (dense 3x3 + ReLU)", lambda: model.stem(x)),
                  ("its nine blocks: the FoldedChain module", lambda: chain(h)),
                  ("torch.ops.pdenet.residual_chain_inference", lambda: torch.ops.pdenet.residual_chain_inference(*args)),
                  ("the compiled chain called directly (binding)",
                   lambda: binding.lean_chain_forward(h, chain.taps, chain.kernel_size, chain.circular, chain.groups,
                                                      chain.strides, shapes, chain.packed)),
                  ("its classifier head", lambda: model.head(z))]
        times = [(name, quantile_time(fn, calls=1000)) for name, fn in levels]
    lines = [f"# where the folded {LEAN}'s batch-1 time goes ({torch.get_num_threads()} thread(s), "
             "channels-last, 10% quantile of 1000 calls each)", "", "| part | µs per call |", "|---|---|"]
    return lines + [f"| {name} | {1e6 * t:.1f} |" for name, t in times]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default="3x32x32", help="image shape CxHxW (default 3x32x32)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7, help="rounds over all variants (median reported)")
    parser.add_argument("--calls", type=int, default=0,
                        help="calls per variant and round (default: 200 at batch 1, 10 at batch 32 and more)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--breakdown", action="store_true",
                        help="instead: where the folded lean ResNet-20's batch-1 time goes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    input_shape = tuple(int(n) for n in args.input.lower().split("x"))
    if args.breakdown:
        print("\n".join(breakdown(input_shape)))
        return 0
    nets = models(input_shape)
    flops = {name: flops_per_image(net, input_shape) for name, net in nets.items()}

    lines = [f"# inference latency, {args.input}, {args.threads} thread(s), torch {torch.__version__}, "
             f"{platform.processor() or platform.machine()}, {datetime.date.today()}"]
    for batch in args.batches:
        calls = args.calls or (200 if batch == 1 else 10)
        x = torch.randn(batch, *input_shape)
        inputs = {False: x, True: x.contiguous(memory_format=CL)}
        runs = {}
        with torch.inference_mode():
            for name, net in nets.items():
                for variant in args.variants:
                    for cl in (False, True):
                        fn = runner(net, variant, cl, x, args.threads)
                        if fn is not None:
                            for _ in range(3 if variant == "compiled" else 1):  # compile in the warm-up
                                fn(inputs[cl])
                            median_time(fn, inputs[cl], max(5, calls // 10))
                            runs[name, variant, cl] = (fn, [])
            for _ in range(args.rounds):
                for (name, variant, cl), (fn, times) in runs.items():
                    times.append(median_time(fn, inputs[cl], calls))
        best = {}
        for (name, variant, cl), (_, times) in runs.items():
            t = statistics.median(times)
            if (name, variant) not in best or t < best[name, variant][0]:
                best[name, variant] = (t, "channels-last" if cl else "NCHW")
        dense_best = min(t for (name, _), (t, _) in best.items() if name == DENSE)
        dense_folded = best.get((DENSE, "folded"), (float("nan"),))[0]
        lines += ["", f"batch {batch} ({calls} calls per round, {args.rounds} rounds; speed-up: the dense "
                      "ResNet-20's time, folded or best of all variants, / this time)", "",
                  "| model | MFLOPs/img | variant | format | ms | vs dense folded | vs dense best |",
                  "|---|---|---|---|---|---|---|"]
        for (name, variant), (t, fmt) in best.items():
            lines.append(f"| {name} | {flops[name] / 1e6:.1f} | {variant} | {fmt} | {1e3 * t:.3f} | "
                         f"{dense_folded / t:.2f}x | {dense_best / t:.2f}x |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
