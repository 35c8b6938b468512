"""pdenet's lean ResNet-20 against the same network written plainly in PyTorch, eager and under ``torch.compile``:
training step and inference at batch 1 and 128, side by side in one run.

"Plain" replaces every lean operator by what a user would write with PyTorch's modules: a 1x1 ``nn.Conv2d`` plus a
depthwise 3x3 ``nn.Conv2d`` whose kernel is masked to the operator's stencil, added (the same weights, so the same
function: the script checks that the outputs agree). The network around it (batch norm, ReLU, the residual
additions, pooling) is the same. The variants:

- ``plain eager``, ``plain compiled`` (``torch.compile``, inductor, default mode) and ``plain max-autotune``
  (``mode="max-autotune-no-cudagraphs"``);
- ``pdenet`` (the model as built: the registered lean operator, batch norm and ReLU by PyTorch) and
  ``pdenet fused`` (``pdenet.fuse``: the residual blocks as one operator each in training, as the trainer runs).

Compilation happens in the warm-up and is not timed. Each round times every variant once, in turn (``--steps``
calls each, median), so drift of the host's speed hits them alike; the table reports the median over rounds and
the ratio of each variant's time to ``pdenet fused``.

    python benchmarks/pytorch_peers.py                      # 1x28x28, batch 128, 2 threads
    python benchmarks/pytorch_peers.py --variants plain-eager plain-compiled pdenet-fused --rounds 5
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# benchmarks/operators.py shares its name with the package: keep this folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
from operators import LeanConv  # noqa: E402
from pdenet import build_model, fuse  # noqa: E402
from pdenet.allocator import keep_freed_memory  # noqa: E402

CL = torch.channels_last
VARIANTS = ("plain-eager", "plain-compiled", "plain-max-autotune", "pdenet", "pdenet-fused")


class PlainLean(nn.Module):
    """``P x + S x`` with PyTorch's modules: a 1x1 convolution plus a depthwise ``k x k`` convolution whose kernel is
    zero off the stencil, on the first ``m = min(c_in, c_out)`` channels (the lean operator ``op``'s weights
    copied)."""

    def __init__(self, op: LeanConv):
        super().__init__()
        k, m = op.kernel_size, op.stencil.shape[0]
        self.pointwise = nn.Conv2d(op.in_channels, op.out_channels, 1, groups=op.groups, bias=False)
        self.depthwise = nn.Conv2d(m, m, k, padding=k // 2, groups=m, bias=False)
        self.register_buffer("support", torch.zeros(k * k).index_fill_(0, op.stencil_index, 1.0).view(1, 1, k, k))
        with torch.no_grad():
            self.pointwise.weight.copy_(op.pointwise_kernel())
            self.depthwise.weight.copy_(op.stencil_kernel())
        self.extra_channels = op.out_channels - m

    def forward(self, x):
        m = self.depthwise.groups
        smooth = F.conv2d(x[:, :m], self.depthwise.weight * self.support, padding=self.depthwise.padding, groups=m)
        return self.pointwise(x) + F.pad(smooth, (0, 0, 0, 0, 0, self.extra_channels))


def plain_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every lean operator replaced by ``PlainLean``."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LeanConv):
                setattr(module, child_name, PlainLean(child))
    return twin


def make_variants(model: nn.Module, names) -> dict:
    variants = {}
    for name in names:
        if name.startswith("plain"):
            net = plain_twin(model)
            if name == "plain-compiled":
                net = torch.compile(net)
            elif name == "plain-max-autotune":
                net = torch.compile(net, mode="max-autotune-no-cudagraphs")
        else:
            net = copy.deepcopy(model)
            if name == "pdenet-fused":
                fuse(net)
        variants[name] = net.to(memory_format=CL)
    return variants


def training_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(net.parameters(), lr=1e-6, momentum=0.9, foreach=True)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    return step


def inference(net: nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad():
            net(x)

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="lean-resnet20", help="named lean configuration (default lean-resnet20)")
    parser.add_argument("--input-shape", type=int, nargs=3, default=[1, 28, 28], metavar=("C", "H", "W"))
    parser.add_argument("--batch-size", type=int, default=128, help="training and large-batch inference batch")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds (default 7)")
    parser.add_argument("--steps", type=int, default=3, help="timed calls per variant and round (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    if min(args.rounds, args.steps, args.threads, args.batch_size) < 1:
        parser.error("--rounds, --steps, --threads and --batch-size must be positive")
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    torch.manual_seed(0)
    model = build_model(args.config, num_classes=10, in_channels=args.input_shape[0])
    variants = make_variants(model, args.variants)
    gen = torch.Generator().manual_seed(0)
    batches = {size: torch.randn(size, *args.input_shape, generator=gen).contiguous(memory_format=CL)
               for size in (1, args.batch_size)}
    labels = torch.randint(0, 10, (args.batch_size,), generator=gen)
    reference = model.eval()(batches[1])
    for name, net in variants.items():  # the same function: outputs agree in evaluation mode
        torch.testing.assert_close(net.eval()(batches[1]), reference, rtol=1e-3, atol=1e-3, msg=name)
    cases = {}
    for name, net in variants.items():
        cases[(name, "train")] = (net.train(), training_step(net, batches[args.batch_size], labels))
        for size in (1, args.batch_size):
            cases[(name, f"infer b={size}")] = (net, inference(net, batches[size]))
    times = {key: [] for key in cases}
    for key, (net, fn) in cases.items():  # warm-up, compilation included
        net.train(key[1] == "train")
        for _ in range(3):
            fn()
    for _ in range(args.rounds):
        for key, (net, fn) in cases.items():
            net.train(key[1] == "train")
            calls = []
            for _ in range(args.steps):
                start = time.perf_counter()
                fn()
                calls.append(time.perf_counter() - start)
            times[key].append(statistics.median(calls))
    passes = ["train", "infer b=1", f"infer b={args.batch_size}"]
    median = {key: statistics.median(values) * 1e3 for key, values in times.items()}
    base = "pdenet-fused" if "pdenet-fused" in variants else args.variants[-1]
    print(f"{args.config}, input {tuple(args.input_shape)}, batch {args.batch_size}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.steps} calls; ratio = time / {base}'s")
    print("| variant | " + " | ".join(f"{p} ms | ratio" for p in passes) + " |")
    print("|---|" + "---:|---:|" * len(passes))
    for name in variants:
        cells = [f"{median[(name, p)]:.2f} | {median[(name, p)] / median[(base, p)]:.2f}" for p in passes]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
