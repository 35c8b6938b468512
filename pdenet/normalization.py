"""Normalizations ``N`` used inside the layers ``σ(N(K Y + b))``: none, batch norm, pixel-wise TV.

``make_normalization(kind, channels)`` builds one by name. Each module also reports ``gain()``: an upper
bound ``g`` on the slope of ``N`` when ``N`` acts as a per-channel scaling ``diag(s)`` with ``0 ≤ s ≤ g``
(identity: ``g = 1``; batch norm at inference: ``s = γ / √(running_var + ε)``), or ``None`` when ``N`` is not
such a map (TV normalization, or batch norm with a negative scale) and no step bound can be derived.
"""
from __future__ import annotations

import torch
from torch import nn

NORMALIZATIONS = ("none", "batch", "tv")


class NoNorm(nn.Identity):
    """``N(x) = x``."""

    kind = "none"

    def gain(self) -> float:
        return 1.0


def inference_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """``s = γ / √(σ² + ε)`` per channel from the running statistics (``γ = 1`` without affine weights): batch
    norm at inference is ``s ⊙ (x − μ) + β``."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    return scale * bn.weight if bn.affine else scale


class BatchNorm(nn.BatchNorm2d):
    """``nn.BatchNorm2d``; at inference ``N(x) = s ⊙ (x − μ) + β`` with ``s = γ / √(σ² + ε)`` per channel."""

    kind = "batch"

    @torch.no_grad()
    def gain(self) -> float | None:
        """``max_c s_c`` from the running statistics, ``None`` if some ``s_c < 0`` (the slope changes sign)."""
        scale = inference_scale(self)
        return float(scale.max()) if bool((scale >= 0).all()) else None


class TVNorm(nn.Module):
    """Pixel-wise TV normalization: each pixel's channel vector divided by its length.

    Notes
    -----
    For ``x`` of shape ``(B, c, n1, n2)``: ``N(x)[:, :, i, j] = γ ⊙ x[:, :, i, j] / √(Σ_c x[:, c, i, j]² + ε) + β``
    with per-channel ``γ`` (ones) and ``β`` (zeros) when ``affine``. The map is nonlinear and its slope can
    reach ``1/√ε``, so it admits no step bound (``gain()`` is ``None``).
    """

    kind = "tv"

    def __init__(self, channels: int, eps: float = 1e-3, affine: bool = True):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"TVNorm eps must be positive, got {eps}")
        self.channels = channels
        self.eps = float(eps)
        if affine:
            self.weight = nn.Parameter(torch.ones(channels))
            self.bias = nn.Parameter(torch.zeros(channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"TVNorm expects (batch, {self.channels}, n1, n2), got shape {tuple(x.shape)}")
        y = x * torch.rsqrt(x.pow(2).sum(dim=1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y

    def gain(self) -> None:
        return None

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}, affine={self.weight is not None}"


def make_normalization(kind: str, channels: int, **kwargs) -> nn.Module:
    """``"none"`` -> :class:`NoNorm`, ``"batch"`` -> :class:`BatchNorm`, ``"tv"`` -> :class:`TVNorm`."""
    if kind == "none":
        if kwargs:
            raise TypeError(f"normalization 'none' takes no options, got {sorted(kwargs)}")
        return NoNorm()
    if kind == "batch":
        return BatchNorm(channels, **kwargs)
    if kind == "tv":
        return TVNorm(channels, **kwargs)
    raise ValueError(f"unknown normalization {kind!r}; expected one of {NORMALIZATIONS}")
