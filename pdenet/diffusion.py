"""Diffusion steps for ``∂_t Y = −L Y``, ``L = K^T K``: explicit (forward Euler), implicit and exact (FFT solves).

Notes
-----
For ``Y`` of shape ``(B, c, n1, n2)`` and an operator ``K: c -> m``:

- explicit: ``Y⁺ = Y − h K^T K Y`` (any boundary; stable for ``h ≤ 2/‖K‖²``);
- implicit: ``Y⁺ = (I + h K^T K)^{-1} Y`` (stable for every ``h > 0``);
- exact: ``Y⁺ = exp(−h K^T K) Y`` (the exact flow; stable for every ``h > 0``). On an ``n1 x n2`` periodic grid
  ``K^T K`` is block-diagonalised by the 2-D DFT, ``(K^T K Y)^(ω) = K̂(ω)^H K̂(ω) Ŷ(ω)``, so the solve is
  exact and costs two real FFTs: per channel ``Ŷ⁺(ω) = Ŷ(ω) / (1 + h |ŝ(ω)|²)`` (or ``e^{−h|ŝ(ω)|²} Ŷ(ω)``)
  when ``K`` is depthwise (diagonal symbol ``ŝ``), and a ``c x c`` Hermitian solve ``(I + h K̂^H K̂) Ŷ⁺ = Ŷ``
  (or matrix exponential) per frequency otherwise.
  Only the ``n2 // 2 + 1`` non-redundant frequencies of ``torch.fft.rfft2`` are used. Everything is
  differentiable in ``Y``, ``h`` and the operator's weights.

  With zero padding ``K^T K`` is not diagonalised by the DFT; these two steps then raise a ``ValueError``
  (use ``boundary="circular"``, or the explicit step).
"""
from __future__ import annotations

import torch

from operators import ConvOperator
from operators.circulant import real_fft_flops
from operators.depthwise import DepthwiseConv

DIFFUSION_STEPS = ("explicit", "implicit", "exact")


def _check(y: torch.Tensor, op: ConvOperator) -> None:
    if not isinstance(op, ConvOperator):
        raise TypeError(f"the diffusion operator must be an operators.ConvOperator, got {type(op).__name__}")
    if not isinstance(y, torch.Tensor) or y.dim() != 4 or y.shape[1] != op.in_channels:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"diffusion expects Y of shape (batch, {op.in_channels}, n1, n2), got {shape}")


def explicit_diffusion(y: torch.Tensor, op: ConvOperator, h) -> torch.Tensor:
    """``Y − h K^T K Y`` (forward Euler for ``∂_t Y = −K^T K Y``)."""
    _check(y, op)
    return y - h * op.adjoint(op(y))


def _fourier_diffusion(y: torch.Tensor, op: ConvOperator, h, kind: str) -> torch.Tensor:
    """``r(h KᵀK) Y`` on the periodic grid of ``Y`` with ``r(x) = 1/(1 + x)`` or ``e^{−x}``, by ``rfft2``."""
    _check(y, op)
    if op.boundary != "circular":
        raise ValueError(
            f"{kind} diffusion solves exactly in Fourier space and needs boundary='circular'; the operator has "
            f"boundary={op.boundary!r} (use the explicit step for zero padding)"
        )
    n1, n2 = y.shape[-2:]
    half = n2 // 2 + 1  # rfft2 keeps the frequencies m2 = 0 .. n2 // 2
    yhat = torch.fft.rfft2(y)  # (B, c, n1, n2//2+1)
    if isinstance(op, DepthwiseConv):
        x = h * op.stencil_symbols(n1, n2)[:, :half].abs().square()  # h|ŝ(ω)|², (n1, n2//2+1, c)
        factor = 1 / (1 + x) if kind == "implicit" else torch.exp(-x)
        yhat = yhat * factor.permute(2, 0, 1)
    else:
        khat = op.symbol((n1, n2))[:, :half]  # (n1, n2//2+1, m, c)
        x = h * (khat.mH @ khat)  # h K̂^H K̂, (n1, n2//2+1, c, c), Hermitian positive semi-definite
        rhs = yhat.permute(2, 3, 1, 0)  # (n1, n2//2+1, c, B)
        if kind == "implicit":
            eye = torch.eye(op.in_channels, dtype=khat.dtype, device=khat.device)
            out = torch.linalg.solve(eye + x, rhs)
        else:
            out = torch.linalg.matrix_exp(-x) @ rhs
        yhat = out.permute(3, 2, 0, 1)
    return torch.fft.irfft2(yhat, s=(n1, n2))


def implicit_diffusion(y: torch.Tensor, op: ConvOperator, h) -> torch.Tensor:
    """``(I + h KᵀK)^{-1} Y`` (backward Euler) on the periodic grid of ``Y``, exactly, by FFT."""
    return _fourier_diffusion(y, op, h, "implicit")


def exact_diffusion(y: torch.Tensor, op: ConvOperator, h) -> torch.Tensor:
    """``exp(−h KᵀK) Y``, the exact flow of ``∂_t Y = −KᵀK Y`` over time ``h``, on the periodic grid, by FFT."""
    return _fourier_diffusion(y, op, h, "exact")


def fourier_diffusion_flops(op: ConvOperator, input_shape, kind: str = "implicit") -> int:
    """FLOPs of one implicit or exact step on ``input_shape`` that PyTorch's FLOP counter does not see.

    ``rfft2`` and ``irfft2`` of every ``n1 x n2`` channel image (``2.5 N log₂ N`` each, ``N = n1 n2``); for a
    depthwise ``K`` the damping factor (4 per frequency and channel) and the spectral product (2 per
    complex entry); otherwise the per-frequency ``c x c`` work: a complex LU solve (``8/3 c³ + 8 c² B``) or
    a matrix exponential (counted as 12 complex ``c x c`` products, ``8 c³`` each, plus ``8 c² B``).
    """
    if kind not in ("implicit", "exact"):
        raise ValueError(f"FFT diffusion steps are 'implicit' or 'exact', got {kind!r}")
    b, c, n1, n2 = input_shape
    freqs = n1 * (n2 // 2 + 1)
    fft = 2 * b * c * real_fft_flops(n1 * n2)
    if isinstance(op, DepthwiseConv):
        return fft + 4 * freqs * c + 2 * b * c * freqs
    per_freq = (8 * c ** 3) // 3 if kind == "implicit" else 12 * 8 * c ** 3
    return fft + freqs * (per_freq + 8 * c * c * b)


def diffusion_step(kind: str):
    """The step function ``(Y, K, h) -> Y⁺`` named ``"explicit"``, ``"implicit"`` or ``"exact"``."""
    if kind == "explicit":
        return explicit_diffusion
    if kind == "implicit":
        return implicit_diffusion
    if kind == "exact":
        return exact_diffusion
    raise ValueError(f"unknown diffusion step {kind!r}; expected one of {DIFFUSION_STEPS}")
