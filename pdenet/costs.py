"""Measured costs of a network: parameters, FLOPs per image, latency and throughput.

Nothing is estimated by hand. FLOPs come from PyTorch's counter (``operators.flops.count_flops``, which adds
what the counter cannot see, such as FFTs; the compiled kernels are registered operators it counts itself);
times are medians over repeated runs after a warm-up, on the model's own device, with CUDA synchronised around
every timed call.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

from operators.flops import count_flops

from .fusion import fuse


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _dtype(model: nn.Module) -> torch.dtype:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.get_default_dtype()


def _check_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (channels, height, width) of one image, got {tuple(input_shape)}")
    return shape


def _nhwc_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its 4-D weights in NHWC, for a channels-last batch. A 1-channel batch is both
    NCHW and NHWC to PyTorch, whose convolution then follows its weight's layout: with NCHW weights, a
    Fashion-MNIST network given a channels-last batch would run in NCHW throughout."""
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def _input(model: nn.Module, input_shape, batch_size: int, channels_last: bool) -> torch.Tensor:
    """A random batch from a private generator (measuring never disturbs the global random state)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *_check_shape(input_shape), generator=gen, dtype=_dtype(model)).to(_device(model))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def flops_per_image(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass on one ``(C, H, W)`` image in eval mode (2 per multiply-add)."""
    was_training = model.training
    model.eval()
    try:
        return count_flops(model, _input(model, input_shape, 1, False))
    finally:
        model.train(was_training)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _times(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall times in seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def spread(times: Sequence[float]) -> float:
    """The interquartile range of ``times`` over their median (0 for fewer than 4 times)."""
    if len(times) < 4:
        return 0.0
    q1, _, q3 = statistics.quantiles(times, n=4)
    return (q3 - q1) / statistics.median(times)


def _median_time(fn, device: torch.device, warmup: int, repeats: int) -> float:
    return statistics.median(_times(fn, device, warmup, repeats))


def latency_times(model: nn.Module, input_shape: Sequence[int], batch_size: int = 1, warmup: int = 5,
                  repeats: int = 20, channels_last: bool = False) -> list[float]:
    """Wall times in seconds of ``repeats`` inference forward passes on a batch (eval mode, no grad) after
    ``warmup``; with ``channels_last`` the batch and (a copy of) the model in NHWC."""
    model = _nhwc_copy(model) if channels_last else model
    x = _input(model, input_shape, batch_size, channels_last)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _times(lambda: model(x), x.device, warmup, repeats)
    finally:
        model.train(was_training)


def measure_latency(model: nn.Module, input_shape: Sequence[int], batch_size: int = 1, warmup: int = 5,
                    repeats: int = 20, channels_last: bool = False) -> float:
    """Median of ``latency_times``: seconds of one inference forward pass on a batch."""
    return statistics.median(latency_times(model, input_shape, batch_size, warmup, repeats, channels_last))


def training_step(model: nn.Module, input_shape: Sequence[int], batch_size: int, channels_last: bool = False,
                  fused: bool = True):
    """A callable running one training step (forward, backward, SGD update) on a fixed random batch, and the
    device it runs on. The step trains a copy of the model, so the model's weights and statistics are left
    untouched; with ``channels_last`` the batch and the copy are in NHWC; with ``fused`` the copy is rewritten by
    ``pdenet.fuse``, as the trainer trains it."""
    net = (_nhwc_copy(model) if channels_last else copy.deepcopy(model)).train()
    if fused:
        fuse(net)
    x = _input(net, input_shape, batch_size, channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=1e-6, momentum=0.9, foreach=True)  # as pdenet.training's

    def step():
        opt.zero_grad(set_to_none=True)
        out = net(x)
        out.float().square().mean().backward()
        opt.step()

    return step, x.device


def measure_train_step(model: nn.Module, input_shape: Sequence[int], batch_size: int, warmup: int = 2,
                       repeats: int = 5, channels_last: bool = False, fused: bool = True) -> float:
    """Median wall time in seconds of one ``training_step`` on a batch."""
    step, device = training_step(model, input_shape, batch_size, channels_last, fused)
    return _median_time(step, device, warmup, repeats)


def fastest_threads(model: nn.Module, input_shape: Sequence[int], batch_size: int, candidates: Sequence[int],
                    channels_last: bool = False) -> tuple[int, dict[int, float]]:
    """The torch CPU thread count among ``candidates`` with the highest training throughput right now.

    Each candidate is timed on a few training steps (``measure_train_step``); on a busy machine fewer threads
    than cores can be many times faster (threads wait on each other at every parallel region). A candidate
    whose first step is over 3 times slower than the best median so far is not timed further. Returns
    ``(best, {threads: images/s})`` and leaves torch set to ``best``.
    """
    rates = {}
    for n in sorted(set(candidates)):
        if n < 1:
            raise ValueError(f"thread counts must be positive, got {n}")
        torch.set_num_threads(n)
        first = measure_train_step(model, input_shape, batch_size, warmup=0, repeats=1, channels_last=channels_last)
        if rates and batch_size / first < max(rates.values()) / 3:
            rates[n] = batch_size / first
            continue
        rates[n] = batch_size / measure_train_step(model, input_shape, batch_size, warmup=0, repeats=3,
                                                   channels_last=channels_last)
    best = max(rates, key=rates.get)
    torch.set_num_threads(best)
    return best, rates


@dataclass
class Costs:
    """Cost summary of a network on ``(C, H, W)`` images."""

    parameters: int
    flops_per_image: int
    latency_ms: float           # one image, batch 1, inference
    throughput: float           # images/s of inference at ``batch_size``
    train_throughput: float | None  # images/s of training steps at ``batch_size`` (None if not measured)
    batch_size: int
    latency_spread: float = 0.0  # interquartile range of the batch-1 timings over their median

    def as_dict(self) -> dict:
        return asdict(self)


def measure_costs(model: nn.Module, input_shape: Sequence[int], batch_size: int = 128, train: bool = False,
                  warmup: int = 5, repeats: int = 20, channels_last: bool = False) -> Costs:
    """Parameters, FLOPs per image, latency at batch 1 and throughput at ``batch_size`` (and training
    throughput when ``train``)."""
    latency_samples = latency_times(model, input_shape, 1, warmup, repeats, channels_last)
    batch_time = measure_latency(model, input_shape, batch_size, max(1, warmup // 2), max(3, repeats // 4),
                                 channels_last)
    train_time = measure_train_step(model, input_shape, batch_size, channels_last=channels_last) if train else None
    return Costs(
        parameters=count_parameters(model),
        flops_per_image=flops_per_image(model, input_shape),
        latency_ms=1e3 * statistics.median(latency_samples),
        throughput=batch_size / batch_time,
        train_throughput=batch_size / train_time if train_time else None,
        batch_size=batch_size,
        latency_spread=spread(latency_samples),
    )


def format_costs(rows: dict[str, Costs]) -> str:
    """A side-by-side plain-text table of named cost summaries."""
    header = ["model", "params", "MFLOPs/img", "latency ms (b=1)", "infer img/s", "train img/s"]
    lines = [[name, f"{c.parameters:,}", f"{c.flops_per_image / 1e6:.2f}",
              f"{c.latency_ms:.2f} ±{100 * c.latency_spread:.0f}%",
              f"{c.throughput:.0f} (b={c.batch_size})",
              "-" if c.train_throughput is None else f"{c.train_throughput:.0f}"] for name, c in rows.items()]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    fmt = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)])
