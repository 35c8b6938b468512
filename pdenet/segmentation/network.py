"""A segmentation network: an encoder of time-stepping residual stages and a light top-down decoder.

Layout, for an input ``x`` of ``(B, in_channels, H, W)`` (any ``H, W``, odd or even)::

    stem        Y₀ = ReLU(BN(K₀ x))                                  full resolution, stem_width channels
    stage i     Y_i = block_i(ReLU(BN(C_i D Y_{i-1})))                 resolution H/2^(i+1), widths[i]
    decoder     Z_L = ReLU(BN(R_L L_L Y_L))                            coarsest level L
                Z_i = ReLU(BN(R_i (U(Z_{i+1}) + L_i Y_i)))              i = L-1, ..., 1
    head        logits = U_{H x W}(Q Z_1)                              (B, num_classes, H, W)

``D`` is 2x2 average pooling (ceil mode), ``C_i`` and ``L_i`` are 1x1 convolutions (connecting and lateral),
``block_i`` is ``nt`` steps of size ``h`` of ``scheme`` from :func:`pdenet.blocks.build_block`, ``R_i`` are
3x3 operators of the network's kind (decoder_width -> decoder_width), ``Q`` a 1x1 classifier and ``U``
bilinear upsampling to the size of the finer level (so odd sizes, which pool to ``⌈n/2⌉``, come back exactly).
Every 3x3 operator after the stem is of kind ``operator`` (lean by default); ``operator="dense"`` gives the
dense twin, the same network with full ``3 x 3`` channel coupling.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from operators.base import check_positive_int
from operators.registry import make_operator

from ..blocks import build_block
from ..networks.layers import check_operator_kwargs, make_stem
from ..networks.pde_resnet import ConnectingLayer


def upsample_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear interpolation of ``(B, c, n1, n2)`` to ``(B, c, *size)`` (``align_corners=False``)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class DecoderStage(nn.Module):
    """``Z = ReLU(BN(R (U(Z_coarse) + L Y)))``: lateral 1x1 ``L: c_skip -> d``, 3x3 operator ``R: d -> d``.

    Without ``Z_coarse`` (the coarsest level) ``Z = ReLU(BN(R L Y))``. Shapes: ``Y (B, c_skip, n1, n2)``,
    ``Z_coarse (B, d, m1, m2)`` -> ``(B, d, n1, n2)``.
    """

    def __init__(self, skip_channels: int, width: int, operator: str, operator_kwargs: dict):
        super().__init__()
        self.lateral = nn.Conv2d(skip_channels, width, 1, bias=False)
        self.refine = make_operator(operator, width, width, **operator_kwargs)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, skip: torch.Tensor, coarse: torch.Tensor | None = None) -> torch.Tensor:
        z = self.lateral(skip)
        if coarse is not None:
            z = z + upsample_to(coarse, z.shape[-2:])
        return F.relu(self.bn(self.refine(z)), inplace=True)


class SegmentationNet(nn.Module):
    """Encoder of residual stages (any scheme, any operator kind) with a top-down decoder; see the module notes.

    Parameters
    ----------
    num_classes, in_channels : output classes (logits per pixel) and image channels.
    widths : encoder widths, one stage per entry, at resolutions ``1/2, 1/4, ...`` of the input.
    stem_width : channels of the full-resolution opening layer (operator kind ``stem_operator``).
    scheme, nt, h, block_kwargs : the time-stepping block of every stage (``pdenet.blocks.build_block``).
    operator, operator_kwargs : kind of every 3x3 operator after the stem (blocks and decoder).
    decoder_width : channels of the decoder levels.

    Shapes: ``(B, in_channels, H, W) -> (B, num_classes, H, W)`` for every ``H, W ≥ 1``.
    """

    def __init__(self, num_classes: int = 11, in_channels: int = 3, widths: Sequence[int] = (32, 64, 128, 128),
                 stem_width: int = 16, scheme: str = "euler", nt: int = 1, h: float = 1.0,
                 operator: str = "lean", operator_kwargs: dict | None = None, block_kwargs: dict | None = None,
                 decoder_width: int = 32, stem_operator: str = "dense"):
        super().__init__()
        widths = [check_positive_int("each encoder width", w) for w in widths]
        if not widths:
            raise ValueError("widths must list at least one encoder stage")
        num_classes = check_positive_int("num_classes", num_classes)
        in_channels = check_positive_int("in_channels", in_channels)
        stem_width = check_positive_int("stem_width", stem_width)
        decoder_width = check_positive_int("decoder_width", decoder_width)
        if not isinstance(operator, str):
            raise TypeError(f"operator must be a kind name (str), got {type(operator).__name__}")
        if block_kwargs is not None and not isinstance(block_kwargs, dict):
            raise TypeError(f"block_kwargs must be a dict or None, got {type(block_kwargs).__name__}")
        kwargs = check_operator_kwargs(operator_kwargs)
        self.num_classes = num_classes
        self.stem = make_stem(in_channels, stem_width, stem_operator, operator, kwargs)
        self.encoder = nn.ModuleList()
        previous = stem_width
        for width in widths:
            self.encoder.append(nn.Sequential(
                ConnectingLayer(previous, width),
                build_block(scheme, width, nt=nt, h=h, operator=operator, operator_kwargs=kwargs,
                            **(block_kwargs or {})),
            ))
            previous = width
        self.decoder = nn.ModuleList(DecoderStage(w, decoder_width, operator, kwargs) for w in widths)
        self.classifier = nn.Conv2d(decoder_width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"SegmentationNet expects images (B, C, H, W), got shape {tuple(x.shape)}")
        y = self.stem(x)
        skips = []
        for stage in self.encoder:
            y = stage(y)
            skips.append(y)
        z = None
        for stage, skip in zip(reversed(self.decoder), reversed(skips)):
            z = stage(skip, z)
        return upsample_to(self.classifier(z), x.shape[-2:])
