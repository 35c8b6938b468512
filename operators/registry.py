"""Operators by name: ``make_operator("lean", 64, 64, stencil="full")``; ``register_operator`` adds a kind."""
from __future__ import annotations

import inspect

from .base import ConvOperator
from .circulant import CirculantConv
from .dense import DenseConv
from .depthwise import DepthwiseConv
from .grouped import GroupedConv
from .lean import LeanConv
from .pointwise import PointwiseConv
from .separable import SeparableConv

OPERATORS: dict[str, type[ConvOperator]] = {
    cls.kind: cls
    for cls in (DenseConv, LeanConv, GroupedConv, SeparableConv, DepthwiseConv, PointwiseConv, CirculantConv)
}
#: the hooks a kind implements (see :class:`operators.base.ConvOperator`).
HOOKS = ("_forward", "_adjoint", "_symbol", "macs_per_pixel")


def register_operator(cls: type[ConvOperator]) -> type[ConvOperator]:
    """Make the operator class ``cls`` available by its ``kind`` name (usable as a decorator).

    ``cls`` subclasses :class:`ConvOperator`, sets ``kind`` and implements the hooks ``_forward`` (``K x``),
    ``_adjoint`` (``Kᵀ y``, exact), ``_symbol`` (``K̂(ω)``) and ``macs_per_pixel``; every other method (shape
    checks, spectra, step bounds, dense matrices, FLOPs) comes from the base class. Then
    ``make_operator(kind, ...)``, ``build_block(..., operator=kind)``, the ``operator=`` override of the named
    configurations and the command line (with ``--import``) build it. ``TypeError`` for a class that is not a
    complete ``ConvOperator``, ``ValueError`` for a kind already registered.
    """
    if not (isinstance(cls, type) and issubclass(cls, ConvOperator)):
        raise TypeError(f"register_operator expects a subclass of operators.ConvOperator, got {cls!r}")
    kind = cls.kind
    if not isinstance(kind, str) or not kind or kind == ConvOperator.kind:
        raise TypeError(f"{cls.__name__} must set the class attribute kind to its own name, got {kind!r}")
    if kind in OPERATORS:
        raise ValueError(f"an operator kind named {kind!r} is already registered ({OPERATORS[kind].__name__})")
    missing = [h for h in HOOKS if getattr(cls, h) is getattr(ConvOperator, h)]
    if missing:
        raise TypeError(f"{cls.__name__} must implement {', '.join(missing)} (the hooks of operators.ConvOperator)")
    OPERATORS[kind] = cls
    return cls


def make_operator(kind: str, in_channels: int, out_channels: int, **kwargs) -> ConvOperator:
    """The operator of kind ``kind`` (a key of ``OPERATORS``) with the kind-specific keywords ``kwargs``."""
    if kind not in OPERATORS:
        raise ValueError(f"unknown operator kind {kind!r}; expected one of {tuple(OPERATORS)}")
    cls = OPERATORS[kind]
    params = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            accepted = [n for n in params if n not in ("in_channels", "out_channels")]
            raise ValueError(f"the {kind!r} operator takes no option(s) {', '.join(unknown)}; it takes: "
                             f"{', '.join(accepted)}")
    return cls(in_channels, out_channels, **kwargs)
