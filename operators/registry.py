"""Operators by name: ``make_operator("lean", 64, 64, stencil="full")``."""
from __future__ import annotations

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


def make_operator(kind: str, in_channels: int, out_channels: int, **kwargs) -> ConvOperator:
    """The operator of kind ``kind`` (a key of ``OPERATORS``) with the kind-specific keywords ``kwargs``."""
    if kind not in OPERATORS:
        raise ValueError(f"unknown operator kind {kind!r}; expected one of {tuple(OPERATORS)}")
    return OPERATORS[kind](in_channels, out_channels, **kwargs)
