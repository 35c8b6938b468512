"""Time the fused ``ReLU(BN(z) + r)`` (``torch.ops.pdenet.batch_norm_relu``, what ``pdenet.fuse`` runs after a stem's
convolution) against PyTorch's batch norm, addition and
ReLU, side by side in one run, at the shapes of ResNet-20's three stages.

Both run in training mode on channels-last float32 input (batch statistics, running statistics updated).
Forward+backward computes the gradients of ``z``, ``r``, ``γ`` and ``β`` for a fixed output gradient. Each
timing is one call; within a repeat the two implementations alternate (in a new random order each repeat), so
load from other processes hits them alike. "warm" times a call whose tensors are in cache (as in a
microbenchmark); "cold" first writes a 64 MiB buffer, so the tensors come from memory, as inside a training
step, whose working set exceeds the cache. The table shows medians after warm-up and the speed-up
(PyTorch / fused).

    python benchmarks/batch_norm.py               # 2 torch threads unless --threads
    python benchmarks/batch_norm.py --threads 1 --repeats 50
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# benchmarks/operators.py shares its name with the package: keep this folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
import pdenet_kernels  # noqa: E402
from pdenet.allocator import keep_freed_memory  # noqa: E402

SHAPES = ((128, 16, 28), (128, 32, 14), (128, 64, 7))
EVICT_BYTES = 64 * 2**20


def pytorch(bn, z, r):
    out = bn(z)
    return F.relu(out if r is None else out + r)


def fused(bn, z, r):
    return pdenet_kernels.batch_norm_relu(z, r, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.momentum,
                                          bn.eps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=30, help="timed repeats per case (default 30)")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be at least 1")
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the training commands: reused buffers, not fresh pages, for every output
    status = pdenet_kernels.status()
    if not status.startswith("compiled kernels loaded"):
        print(f"the fused kernels are not in use ({status}): nothing to compare")
        return 2
    print(f"{args.threads} threads; fused kernels: {status}")
    evict = torch.zeros(EVICT_BYTES // 4)
    cl = torch.channels_last
    print(f"{'batch, channels, size':22s} {'residual':8s} {'cache':5s} {'pass':8s} "
          f"{'pytorch ms':>10s} {'fused ms':>9s} {'speed-up':>8s}")
    for batch, channels, size in SHAPES:
        shape = (batch, channels, size, size)
        z = torch.randn(shape).contiguous(memory_format=cl).requires_grad_()
        r = torch.randn(shape).contiguous(memory_format=cl).requires_grad_()
        g = torch.randn(shape).contiguous(memory_format=cl)
        bn = nn.BatchNorm2d(channels)
        for residual in (None, r):
            inputs = [z, bn.weight, bn.bias] + ([] if residual is None else [r])

            def forward(fn):
                with torch.no_grad():
                    fn(bn, z, residual)

            def forward_backward(fn):
                torch.autograd.grad(fn(bn, z, residual), inputs, g)

            for cache in ("warm", "cold"):
                for name, run in (("fwd", forward), ("fwd+bwd", forward_backward)):
                    times = {pytorch: [], fused: []}
                    for repeat in range(args.repeats + 3):
                        order = [pytorch, fused]
                        random.shuffle(order)
                        for fn in order:
                            if cache == "cold":
                                evict.add_(1.0)
                            start = time.perf_counter()
                            run(fn)
                            if repeat >= 3:  # warm-up
                                times[fn].append((time.perf_counter() - start) * 1e3)
                    t_pytorch, t_fused = (statistics.median(times[fn]) for fn in (pytorch, fused))
                    print(f"{str((batch, channels, size)):22s} {'yes' if residual is not None else 'no':8s} "
                          f"{cache:5s} {name:8s} {t_pytorch:10.3f} {t_fused:9.3f} {t_pytorch / t_fused:7.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
