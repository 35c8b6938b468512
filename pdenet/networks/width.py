"""Width multipliers: rounding scaled channel counts, and matching a network to a FLOP budget.

A width multiplier ``w`` scales every channel count ``c`` of a network to ``make_divisible(w c, d)``. FLOPs
grow roughly like ``w²``, but rounding makes them a step function of ``w``; ``match_width`` therefore
bisects on ``w`` for the largest multiplier whose measured FLOPs (PyTorch's counter, through
``pdenet.costs.flops_per_image``) stay within the budget.
"""
from __future__ import annotations

from typing import Callable, Sequence

from torch import nn


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``min_value``, default ``divisor``),
    never going below 90% of ``value`` (the rounding rule of MobileNet's reference code)."""
    if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
        raise ValueError(f"divisor must be a positive integer, got {divisor!r}")
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def check_width_mult(width_mult: float) -> float:
    if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not width_mult > 0:
        raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")
    return float(width_mult)


def match_width(factory: Callable[[float], nn.Module], target_flops: float, input_shape: Sequence[int],
                low: float = 0.05, high: float = 2.0, iters: int = 12) -> tuple[float, int]:
    """Largest width multiplier ``w`` in ``[low, high]`` with ``FLOPs(factory(w)) <= target_flops``.

    ``factory(w)`` builds the network at multiplier ``w``; FLOPs per image are measured on one image of
    ``input_shape = (C, H, W)`` by :func:`pdenet.costs.flops_per_image`. Returns ``(w, flops)``. Bisection
    assumes FLOPs are non-decreasing in ``w``; raises ``ValueError`` when even ``factory(low)`` exceeds the
    budget.
    """
    from ..costs import flops_per_image

    if not target_flops > 0:
        raise ValueError(f"target_flops must be positive, got {target_flops!r}")
    if not 0 < low < high:
        raise ValueError(f"need 0 < low < high, got low={low!r}, high={high!r}")
    low_flops = flops_per_image(factory(low), input_shape)
    if low_flops > target_flops:
        raise ValueError(
            f"even width multiplier {low} needs {low_flops} FLOPs, above the target {target_flops:.0f}; lower `low`"
        )
    high_flops = flops_per_image(factory(high), input_shape)
    if high_flops <= target_flops:
        return high, high_flops
    for _ in range(iters):
        mid = 0.5 * (low + high)
        flops = flops_per_image(factory(mid), input_shape)
        if flops <= target_flops:
            low, low_flops = mid, flops
        else:
            high = mid
    return low, low_flops
