"""FLOPs of a forward pass as PyTorch's counter measures them, plus the work it cannot see.

``torch.utils.flop_counter.FlopCounterMode`` counts matrix products, convolutions and registered operators
with a FLOP formula, such as pdenet's compiled kernels (2 FLOPs per multiply-add), and nothing else: FFTs count
as zero. A module that does such work reports it through ``uncounted_flops(input_shape) -> int``; ``count_flops`` adds those reports, taken
with forward pre-hooks on every submodule that defines the method, for every call. Calls of such a module's
``adjoint`` (the time-stepping layers apply ``K^T`` directly) are counted too, with the same report: ``K^T``
has ``K``'s structure and runs through the same kernels.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: nn.Module, *inputs) -> int:
    """FLOPs of ``model(*inputs)``: the counter's total plus every call's ``uncounted_flops(input.shape)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_flops expects an nn.Module, got {type(model).__name__}")
    extra = []

    def hook(module, args):
        extra.append(int(module.uncounted_flops(tuple(args[0].shape))))

    def counted_adjoint(module):
        adjoint = module.adjoint

        def wrapper(y):
            hook(module, (y,))
            return adjoint(y)
        return wrapper

    reporting = [m for m in model.modules() if callable(getattr(m, "uncounted_flops", None))]
    handles = [m.register_forward_pre_hook(hook) for m in reporting]
    with_adjoint = [m for m in reporting if callable(getattr(m, "adjoint", None))]
    for m in with_adjoint:
        m.adjoint = counted_adjoint(m)  # an instance attribute shadowing the method, removed below
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        for m in with_adjoint:
            del m.adjoint
    return int(counter.get_total_flops()) + sum(extra)
