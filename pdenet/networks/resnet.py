"""Residual networks with any 3x3 operator kind: the CIFAR ResNet-20/32/56 family and the ResNet-18/34 layout.

Every 3x3 convolution is a stride-1 operator from ``operators.registry.make_operator`` (``"dense"`` gives
the classical ResNet, ``"lean"`` the lean ResNet of LeanConvNets, ``"grouped"``, ``"separable"``, ...).

Downsampling. A stride-2 3x3 convolution is ``S₂ K`` (apply ``K`` at full resolution, keep every second
pixel), which wastes 3/4 of its multiply-adds. Here the downsampling block first averages each 2x2 window,
``D`` (:func:`~pdenet.networks.layers.downsample2x`), and then applies the stride-1 operator at the coarse
resolution: ``K D``. Its cost is that of ``K`` on the output grid, the same multiply-adds as a strided
convolution, plus about ``c n1 n2`` additions for ``D`` on the ``c x n1 x n2`` input, which PyTorch's FLOP
counter does not see: a fraction ``2c / macs_per_pixel`` of the operator it feeds (5% for the 16 -> 32 lean
operator of a CIFAR ResNet, 0.7% for the dense one), 0.2% of a whole lean ResNet-20. ``D`` is the low-pass
filter a strided convolution lacks, and ``K D`` stays a composition of linear maps with known adjoints
(``D^T K^T``). The pooled input ``D x`` feeds both the residual branch and the shortcut.

Shortcuts when the width changes (He et al. 2016): option ``"A"`` pads ``D x`` with zero channels
(parameter-free, the choice of He et al. for CIFAR, default of :func:`cifar_resnet`); option ``"B"`` is a
1x1 convolution and batch norm on ``D x`` (the ImageNet choice, default of :func:`resnet18` and
:func:`resnet34`; with the pooling in front it is the "ResNet-D" shortcut).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from operators.base import as_grid, check_positive_int
from operators.stability import max_stable_step

from ..blocks import StepStability
from .layers import ClassifierHead, check_operator_kwargs, downsample2x, make_stem

SHORTCUTS = ("A", "B")
STEMS = ("small", "imagenet")
CIFAR_WIDTHS = (16, 32, 64)
IMAGENET_WIDTHS = (64, 128, 256, 512)
RESNET18_DEPTHS = (2, 2, 2, 2)
RESNET34_DEPTHS = (3, 4, 6, 3)


class BasicBlock(nn.Module):
    """``y = ReLU(BN(K₂ ReLU(BN(K₁ D x))) + Q D x)``.

    ``D`` is the identity (``stride=1``) or 2x2 average pooling (``stride=2``); ``K₁: c_in -> c_out`` and
    ``K₂: c_out -> c_out`` are stride-1 3x3 operators; ``Q`` is the identity when ``c_in == c_out``, else
    zero channel padding (shortcut ``"A"``) or a 1x1 convolution with batch norm (``"B"``).
    Shapes: ``(B, c_in, n1, n2) -> (B, c_out, n1', n2')`` with ``n' = n`` or ``⌈n/2⌉``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, operator: str = "lean",
                 operator_kwargs: dict | None = None, shortcut: str = "A"):
        super().__init__()
        from operators.registry import make_operator

        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut option {shortcut!r}; expected one of {SHORTCUTS}")
        if shortcut == "A" and out_channels < in_channels:
            raise ValueError(f"shortcut 'A' pads channels and cannot go from {in_channels} to {out_channels}")
        kwargs = check_operator_kwargs(operator_kwargs)
        self.stride = stride
        self.conv1 = make_operator(operator, in_channels, out_channels, **kwargs)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = make_operator(operator, out_channels, out_channels, **kwargs)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.pad_channels = 0
        self.projection = None
        if in_channels != out_channels:
            if shortcut == "B":
                self.projection = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
                )
            else:
                self.pad_channels = out_channels - in_channels

    # ------------------------------------------------------------ as a time step (for stability reports)
    #: at stride 1 and constant width the block is forward Euler with h = 1 (see ``stability``)
    scheme = "resnet"
    h = 1.0
    stabilize = None

    def is_time_step(self) -> bool:
        """Stride 1 at constant width: ``y = ReLU(x + F(x))``, a forward Euler step of ``y' = F(y)``."""
        return self.stride == 1 and self.projection is None and not self.pad_channels

    def operators(self) -> list:
        return [self.conv1, self.conv2]

    @torch.no_grad()
    def stability(self, grid, method: str = "symbol") -> StepStability:
        """The block as forward Euler with ``h = 1`` on the ``(n1, n2)`` grid of its operators.

        With batch norm in inference mode, ``B x = b ⊙ x + β`` with ``b = γ/√(var + ε)``, the residual branch
        is ``F(x) = B₂K₂ ReLU(B₁K₁x)``. Linearized at ``ReLU' = 1`` (the largest slope), its Jacobian has the
        eigenvalues of ``diag(b₂)K̂₂(ω) diag(b₁)K̂₁(ω)`` over the periodic grid's frequencies, and forward
        Euler needs ``1 + hλ`` inside the unit disc (the largest ``|1 + λ|`` is stated too: the growth per step).
        The outer ReLU is 1-Lipschitz and left out. ``norm``:
        ``max_i max|b_i| ‖K_i‖``. A downsampling or width-changing block is not a step of one ODE: no bound.
        """
        grid = as_grid(grid)
        scales = [bn.weight / torch.sqrt(bn.running_var + bn.eps) for bn in (self.bn1, self.bn2)]
        norm = max(float(b.abs().max()) * op.spectral_norm(grid, method=method)
                   for b, op in zip(scales, self.operators()))
        norm_text = (f"‖K‖ column: max over K₁, K₂ of max|b|·‖K‖ with the batch-norm scale b = γ/√(var+ε) "
                     f"({method} norm on the {grid[0]}x{grid[1]} grid)")
        if not self.is_time_step():
            return StepStability(None, norm, ("downsampling or width-changing residual block: not a time step "
                                              "of one ODE, no step bound", norm_text))
        symbols = [b[:, None] * op.symbol(grid) for b, op in zip(scales, self.operators())]
        eigenvalues = torch.linalg.eigvals(symbols[1] @ symbols[0]).flatten().cpu().numpy()
        law = (f"ResNet block y = ReLU(x + B₂K₂ReLU(B₁K₁x)) as forward Euler with h = 1, linearized at ReLU' = 1: "
               f"eigenvalues of b₂K̂₂(ω)b₁K̂₁(ω) on the periodic {grid[0]}x{grid[1]} grid (batch norm in "
               "inference mode; not a guarantee where ReLU' varies)")
        growth = f"largest amplification |1 + λ| of the linearized step: {float(np.abs(1 + eigenvalues).max()):.4g}"
        return StepStability(float(max_stable_step("euler", eigenvalues)), norm, (law, growth, norm_text))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """``Q x``: ``x``, ``x`` with zero channels appended, or the projection."""
        if self.projection is not None:
            return self.projection(x)
        return F.pad(x, (0, 0, 0, 0, 0, self.pad_channels)) if self.pad_channels else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            x = downsample2x(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet of basic blocks: stem, stages of ``depths[i]`` blocks at width ``widths[i]``, classifier.

    Stage ``i > 0`` starts with a downsampling block (2x2 average pooling, then the operators at the coarse
    resolution; see the module notes). Stems: ``"small"`` is a stride-1 3x3 operator of kind
    ``stem_operator`` with BN and ReLU (CIFAR style, for 28x28 and 32x32 images); ``"imagenet"`` is the
    7x7 stride-2 convolution with BN, ReLU and 3x3 stride-2 max pooling. The stem operator is dense by
    default: it sees only ``in_channels`` (1 or 3) inputs, so a lean one would save little.

    Shapes: ``(B, in_channels, n1, n2) -> (B, num_classes)``.
    """

    def __init__(self, depths: Sequence[int], widths: Sequence[int], num_classes: int = 10, in_channels: int = 3,
                 operator: str = "lean", operator_kwargs: dict | None = None, stem: str = "small",
                 stem_operator: str = "dense", shortcut: str = "A"):
        super().__init__()
        depths, widths = list(depths), list(widths)
        if not depths or len(depths) != len(widths):
            raise ValueError(f"depths and widths must be non-empty and of equal length, got {depths} and {widths}")
        for d in depths:
            check_positive_int("each stage depth", d)
        for w in widths:
            check_positive_int("each stage width", w)
        in_channels = check_positive_int("in_channels", in_channels)
        num_classes = check_positive_int("num_classes", num_classes)
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; expected one of {STEMS}")
        kwargs = check_operator_kwargs(operator_kwargs)
        self.operator = operator
        if stem == "small":
            self.stem = make_stem(in_channels, widths[0], stem_operator, operator, kwargs)
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        stages = []
        c = widths[0]
        for i, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(c, width, stride, operator, kwargs, shortcut))
                c = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def cifar_depths(depth: int) -> tuple[int, int, int]:
    """Blocks per stage ``(n, n, n)`` of He et al.'s CIFAR ResNet with ``depth = 6n + 2`` layers."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth!r}")
    n = (depth - 2) // 6
    return n, n, n


def cifar_resnet(depth: int, **kwargs) -> ResNet:
    """He et al.'s CIFAR ResNet of ``depth = 6n + 2`` layers: 3 stages of ``n`` blocks, widths 16, 32, 64.

    Defaults: small stem, shortcut ``"A"``; any :class:`ResNet` keyword can be given.
    """
    kwargs.setdefault("shortcut", "A")
    kwargs.setdefault("stem", "small")
    return ResNet(cifar_depths(depth), CIFAR_WIDTHS, **kwargs)


def resnet20(**kwargs) -> ResNet:
    """CIFAR ResNet-20 (3 x 3 blocks, widths 16/32/64)."""
    return cifar_resnet(20, **kwargs)


def resnet32(**kwargs) -> ResNet:
    """CIFAR ResNet-32 (3 x 5 blocks, widths 16/32/64)."""
    return cifar_resnet(32, **kwargs)


def resnet56(**kwargs) -> ResNet:
    """CIFAR ResNet-56 (3 x 9 blocks, widths 16/32/64)."""
    return cifar_resnet(56, **kwargs)


def _imagenet_layout(depths, kwargs) -> ResNet:
    kwargs.setdefault("shortcut", "B")
    kwargs.setdefault("stem", "imagenet")
    return ResNet(depths, IMAGENET_WIDTHS, **kwargs)


def resnet18(**kwargs) -> ResNet:
    """ResNet-18 layout: blocks (2, 2, 2, 2), widths 64/128/256/512, shortcut ``"B"``, ImageNet stem by default."""
    return _imagenet_layout(RESNET18_DEPTHS, kwargs)


def resnet34(**kwargs) -> ResNet:
    """ResNet-34 layout: blocks (3, 4, 6, 3), widths 64/128/256/512, shortcut ``"B"``, ImageNet stem by default."""
    return _imagenet_layout(RESNET34_DEPTHS, kwargs)
