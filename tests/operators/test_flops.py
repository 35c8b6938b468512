"""Counts of multiply-adds and FLOPs agree with PyTorch's FLOP counter plus the declared uncounted work."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cases import BOUNDARIES, CASES, build
from operators import CirculantConv, LeanConv, count_flops
from operators.circulant import real_fft_flops


def counter_only(model, x):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def uncounted(op, shape):
    return op.uncounted_flops(shape) if hasattr(op, "uncounted_flops") else 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("case", CASES)
def test_flops_match_counter(case, boundary, dtype):
    op = build(case, boundary, seed=0, dtype=dtype)
    x = torch.randn(3, op.in_channels, 6, 5, dtype=dtype)
    op(x)  # warm-up: LeanConv probes its fused kernel once per process with a small convolution
    shape = tuple(x.shape)
    total = count_flops(op, x)
    assert total == op.flops(shape)
    assert counter_only(op, x) + uncounted(op, shape) == total
    assert op.flops(shape) >= 2 * op.macs_per_pixel() * 3 * 6 * 5


def test_circulant_fft_counts():
    op = CirculantConv(8, 8, method="fft")
    x = torch.randn(2, 8, 4, 4)
    # the counter sees the complex depthwise convolution as three real ones
    assert counter_only(op, x) == 2 * 3 * 9 * (8 // 2 + 1) * 2 * 4 * 4
    assert op.uncounted_flops(tuple(x.shape)) == (2 * 32 + 9) * real_fft_flops(8) + (4 * 32 + 9) * 5
    assert real_fft_flops(8) == 60 and real_fft_flops(1) == 0 and real_fft_flops(6) == math.ceil(15 * math.log2(6))
    assert CirculantConv(8, 8).uncounted_flops((2, 8, 4, 4)) == 0


def test_count_flops_sums_every_call_of_every_submodule():
    a, b = CirculantConv(6, 6, method="fft"), LeanConv(6, 6)
    model = nn.Sequential(a, nn.ReLU(), b, a)  # ``a`` runs twice
    x = torch.randn(2, 6, 5, 5)
    shape = tuple(x.shape)
    model(x)  # warm-up (LeanConv's one-time kernel probe)
    assert count_flops(model, x) == 2 * a.flops(shape) + b.flops(shape)
    calls = []
    a.uncounted_flops = lambda shape: calls.append(shape) or 0
    model(x)
    assert calls == []  # the counting hooks are removed afterwards
