"""The PDE-based CNN of Ruthotto and Haber: time-stepping stages joined by 1x1 connecting layers.

Layout::

    opening   Y₀ = ReLU(BN(K₀ x))                                     in_channels -> widths[0]
    stage i   Y ← block_i(Y): nt steps of size h of the chosen scheme     widths[i], fixed
    connect   Y ← ReLU(BN(D C_i Y))   (i < len(widths) - 1)           widths[i] -> widths[i+1], n -> ⌈n/2⌉
    head      global average pooling, linear classifier

``C_i`` is a 1x1 convolution and ``D`` 2x2 average pooling (:func:`~pdenet.networks.layers.downsample2x`).
Both are linear and act on different axes (channels, space), so ``D C_i = C_i D``: the connecting layer pools
first and couples the channels on the coarse grid, the same map at a quarter of the multiply-adds.
Their CIFAR-10 network: widths ``[32, 64, 112, 112]``, ``nt = 3`` steps of ``h = 1`` per stage.
The blocks come from ``pdenet.blocks.build_block`` (any scheme, any operator kind).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from operators.base import check_positive_int

from .layers import ClassifierHead, check_operator_kwargs, downsample2x, make_stem


class ConnectingLayer(nn.Module):
    """``Y ↦ ReLU(BN(C D Y))`` with ``C`` a 1x1 convolution ``c_in -> c_out`` and ``D`` 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(downsample2x(x))))


class PDEResNet(nn.Module):
    """Ruthotto–Haber stage layout with any block scheme and operator kind.

    ``scheme``, ``nt``, ``h``, ``operator``, ``operator_kwargs`` and ``block_kwargs`` go to
    ``pdenet.blocks.build_block`` for every stage (``operator=None``: the scheme's default kind, e.g. depthwise
    diffusion for ``"diffusion-reaction"``; ``block_kwargs`` e.g. ``{"normalization": "batch"}``). The opening
    operator is of kind ``stem_operator`` (dense by default: it sees only the ``in_channels`` image channels).
    Shapes: ``(B, in_channels, n1, n2) -> (B, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths: Sequence[int] = (32, 64, 112, 112),
                 scheme: str = "parabolic", nt: int = 3, h: float = 1.0, operator: str | None = "lean",
                 operator_kwargs: dict | None = None, block_kwargs: dict | None = None, stem_operator: str = "dense"):
        super().__init__()
        from ..blocks import build_block

        widths = list(widths)
        if not widths:
            raise ValueError("widths must list at least one stage width")
        for w in widths:
            check_positive_int("each stage width", w)
        in_channels = check_positive_int("in_channels", in_channels)
        num_classes = check_positive_int("num_classes", num_classes)
        kwargs = check_operator_kwargs(operator_kwargs)
        if block_kwargs is not None and not isinstance(block_kwargs, dict):
            raise TypeError(f"block_kwargs must be a dict or None, got {type(block_kwargs).__name__}")
        self.opening = make_stem(in_channels, widths[0], stem_operator, operator, kwargs)
        layers = []
        for i, width in enumerate(widths):
            if i > 0:
                layers.append(ConnectingLayer(widths[i - 1], width))
            layers.append(build_block(scheme, width, nt=nt, h=h, operator=operator, operator_kwargs=kwargs,
                                      **(block_kwargs or {})))
        self.stages = nn.Sequential(*layers)
        self.head = ClassifierHead(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.opening(x)))
