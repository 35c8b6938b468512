"""The base class of all convolution operators: checked public methods around private hooks.

A subclass implements ``_forward``, ``_adjoint``, ``_symbol`` and ``macs_per_pixel``; everything else
(shape checks, spectra, scipy interoperability, dense matrices, FLOP counts) lives here once, for strided
operators too (``output_grid``, ``polyphase_symbol``).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from . import stability
from .functional import check_boundary
from .spectral import batched_lapack, half_spectrum, max_symbol_norm

Grid = int | Sequence[int]


def as_grid(grid: Grid) -> tuple[int, int]:
    """``8`` -> ``(8, 8)``; ``(8, 6)`` -> ``(8, 6)``; rejects anything else with a clear message."""
    if isinstance(grid, (int, np.integer)):
        grid = (int(grid), int(grid))
    try:
        n1, n2 = (int(n) for n in grid)
    except (TypeError, ValueError):
        raise TypeError(f"grid must be an int or a pair of ints (n1, n2), got {grid!r}") from None
    if n1 < 1 or n2 < 1:
        raise ValueError(f"grid sizes must be positive, got {(n1, n2)}")
    return n1, n2


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def polyphase_symbol(symbol: torch.Tensor, stride: int) -> torch.Tensor:
    """The symbol of ``D_s K`` from that of ``K``: ``(n1, n2, c_out, c_in) -> (n1/s, n2/s, c_out, s² c_in)``.

    ``D_s`` keeps the pixels ``(s j1, s j2)``. Split the input into its ``s²`` phases
    ``x_(a,b)[j] = x[s j1 + a, s j2 + b]`` (``F.pixel_unshuffle(x, s)``: channel ``i`` of phase ``(a, b)`` is its
    channel ``i s² + a s + b``); then ``D_s K`` is a convolution on the coarse grid from ``s² c_in`` channels, and
    its symbol at the coarse frequency ``ν = 2π(μ1 s/n1, μ2 s/n2)`` is, with ``ω_t = (ν + 2π t)/s`` the ``s²`` fine
    frequencies that alias to ``ν`` (grid indices ``μ + t n/s``)::

        K̂_s(ν)[:, i s² + a s + b] = s⁻² Σ_t e^{−i ω_t·(a, b)} K̂(ω_t)[:, i].

    ``symbol`` must be that of an ``n1 x n2`` periodic grid with ``n1`` and ``n2`` divisible by ``s``.
    """
    n1, n2, c_out, c_in = symbol.shape
    s = stride
    m1, m2 = n1 // s, n2 // s
    real = symbol.real.dtype
    fine = symbol.reshape(s, m1, s, m2, c_out, c_in)  # grid index m = t (n/s) + μ

    def phases(n, m):  # e^{−2πi (μ + t m) a / n}, indexed [t, μ, a]
        index = torch.arange(n, device=symbol.device, dtype=real).reshape(s, m, 1)
        a = torch.arange(s, device=symbol.device, dtype=real)
        return torch.polar(torch.ones(s, m, s, device=symbol.device, dtype=real), -2 * math.pi * index * a / n)

    coarse = torch.einsum("xmyqoi,xma,yqb->mqoiab", fine, phases(n1, m1), phases(n2, m2)) / (s * s)
    return coarse.reshape(m1, m2, c_out, c_in * s * s)


class ConvOperator(nn.Module):
    """A linear convolution operator ``K_s = D_s K: R^{c_in x n1 x n2} -> R^{c_out x m1 x m2}``.

    Notes
    -----
    ``K`` is the same-size convolution (padding ``k // 2``) and ``D_s`` keeps every ``s``-th pixel per axis
    (``x ↦ x[..., ::s, ::s]``), so ``m = ceil(n / s)`` (``output_grid``), the output size of
    ``nn.Conv2d(k, stride=s, padding=k // 2)``; ``s = 1`` (the default) is the same-size operator. Inputs are
    ``(batch, c_in, n1, n2)``, outputs ``(batch, c_out, m1, m2)``. ``adjoint`` is the exact transpose for the
    boundary condition in use (``"zeros"`` or ``"circular"``), so ``<K_s x, y> = <x, K_s^T y>``. On an
    ``n1 x n2`` periodic grid ``K`` is block-diagonalised by the 2-D DFT: ``symbol(grid)[m1, m2]`` is the
    ``c_out x c_in`` matrix ``K̂(ω)`` at ``ω = 2π(m1/n1, m2/n2)``, and the singular values of ``K`` are the union
    over ``ω`` of those of ``K̂(ω)``; for a stride, ``symbol`` is the polyphase symbol of ``polyphase_symbol``.

    Hooks: ``_forward(x)`` computes ``D_s K x`` (directly, not by subsampling); ``_adjoint(y)`` and
    ``_symbol(n1, n2)`` are those of the same-size ``K``: the base class applies ``D_s^T`` (zeros between the
    pixels of ``y``), so ``K_s^T = K^T D_s^T`` is the transposed convolution, and builds the polyphase symbol.
    """

    kind: str = "operator"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, boundary: str = "zeros",
                 stride: int = 1):
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        if self.kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for a same-size convolution, got {kernel_size}")
        self.boundary = check_boundary(boundary)
        self.stride = check_positive_int("stride", stride)

    # ----------------------------------------------------------------- hooks for subclasses
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """``D_s K x``: ``(B, c_in, n1, n2) -> (B, c_out, ceil(n1/s), ceil(n2/s))``."""
        raise NotImplementedError

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``K^T y`` of the same-size ``K``: ``(B, c_out, n1, n2) -> (B, c_in, n1, n2)``."""
        raise NotImplementedError

    def _symbol(self, n1: int, n2: int) -> torch.Tensor:
        """Complex ``(n1, n2, c_out, c_in)``: the matrix ``K̂(ω)`` at each grid frequency."""
        raise NotImplementedError

    def macs_per_pixel(self) -> int:
        """Multiply-adds per output pixel executed by ``forward`` (as PyTorch's FLOP counter sees them): the same
        for every stride (a strided operator has fewer output pixels)."""
        raise NotImplementedError

    def _symbol_norms(self, n1: int, n2: int) -> torch.Tensor:
        """``‖K̂(ω)‖₂`` at each frequency, shape ``(n1, n2)``.

        Subclasses whose structure makes this cheap (diagonal or circulant symbols) override it, and
        ``spectral_norm`` then takes its maximum; otherwise ``spectral_norm`` uses ``_max_symbol_norm``.
        """
        sym = self._symbol(n1, n2)
        return batched_lapack(lambda s: torch.linalg.matrix_norm(s, ord=2), sym.flatten(0, 1)).reshape(n1, n2)

    def _max_symbol_norm(self, n1: int, n2: int) -> float:
        """``max_ω ‖K̂(ω)‖₂`` over the ``n1 x n2`` grid, exact.

        The maximum of the subclass's own ``_symbol_norms`` if it defines one, else the pruned Gram algorithm
        of ``operators.spectral.max_symbol_norm`` on ``equivalent_dense_weight()`` (half the frequencies,
        one Cholesky certificate per frequency, ``eigvalsh`` only where the maximum can be).
        """
        if type(self)._symbol_norms is not ConvOperator._symbol_norms:
            return float(self._symbol_norms(n1, n2).max())
        return max_symbol_norm(self.equivalent_dense_weight(), n1, n2)

    def equivalent_dense_weight(self) -> torch.Tensor:
        """The kernel ``W`` (c_out, c_in, k, k) with ``K = conv_same(., W, boundary)``: ``K`` as a dense conv.

        With a stride, ``K_s x = F.conv2d(x, W, stride=s, padding=k // 2)`` (zeros; after a periodic pad of
        ``k // 2`` for the circular boundary). Generic: the impulse response of the adjoint. ``K^T`` is the
        correlation with ``W`` flipped and transposed, so ``K^T`` applied to ``e_o δ_centre`` on a ``k x k`` grid
        gives ``(K^T e_o δ)[i, n] = W[o, i, n]`` (no wrap-around or truncation reaches it on that grid, for either
        boundary). Subclasses may build it directly.
        """
        k, c = self.kernel_size, self.out_channels
        p = next(self.parameters(), None)
        impulses = torch.zeros(c, c, k, k, dtype=p.dtype if p is not None else None,
                               device=p.device if p is not None else None)
        impulses[torch.arange(c), torch.arange(c), k // 2, k // 2] = 1
        return self._adjoint(impulses).contiguous()

    def output_grid(self, n1: int, n2: int) -> tuple[int, int]:
        """The output grid ``(ceil(n1/s), ceil(n2/s))`` of an ``n1 x n2`` input (the input grid for stride 1)."""
        s = self.stride
        return -(-n1 // s), -(-n2 // s)

    def _input_grid(self, y: torch.Tensor, grid: Grid | None) -> tuple[int, int]:
        """The input grid of ``K_s`` whose output is ``y``'s: ``grid`` (checked), or ``s`` times ``y``'s grid."""
        out = tuple(y.shape[-2:])
        if grid is None:
            return out[0] * self.stride, out[1] * self.stride
        n1, n2 = as_grid(grid)
        if self.output_grid(n1, n2) != out:
            raise ValueError(f"{type(self).__name__}.adjoint: an input grid {(n1, n2)} gives outputs of size "
                             f"{self.output_grid(n1, n2)} (stride {self.stride}), but y is {out}")
        return n1, n2

    def _transpose(self, y: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``K_s^T y = K^T D_s^T y`` onto the ``grid`` (the input grid of ``K_s``): zeros between ``y``'s pixels."""
        s = self.stride
        if s > 1:
            fine = y.new_zeros(*y.shape[:2], *grid)
            fine[..., ::s, ::s] = y
            y = fine
        return self._adjoint(y)

    # ----------------------------------------------------------------- checked public interface
    def _check_input(self, x: torch.Tensor, channels: int, what: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__}.{what} expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"{type(self).__name__}.{what} expects a 4-D tensor (batch, channels, n1, n2), "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != channels:
            raise ValueError(
                f"{type(self).__name__}.{what} expects {channels} channels, got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``K_s x``: ``(B, c_in, n1, n2) -> (B, c_out, ceil(n1/s), ceil(n2/s))`` (``K x`` for stride 1)."""
        self._check_input(x, self.in_channels, "forward")
        return self._forward(x)

    def adjoint(self, y: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        """``K_s^T y``: ``(B, c_out, m1, m2) -> (B, c_in, n1, n2)``, exact for the boundary condition.

        ``grid = (n1, n2)`` is the input grid of ``K_s``. A stride ``s`` maps every ``n`` in
        ``(s (m − 1), s m]`` to ``m``, so a strided operator needs it where the input size is not ``s m`` (the
        default); for stride 1 it is ``y``'s grid. ``K_s^T y = K^T D_s^T y``: the transposed convolution.
        """
        self._check_input(y, self.out_channels, "adjoint")
        return self._transpose(y, self._input_grid(y, grid))

    def symbol(self, grid: Grid) -> torch.Tensor:
        """Complex tensor ``(n1, n2, c_out, c_in)``: ``K̂(ω)`` at ``ω = 2π(m1/n1, m2/n2)``.

        With a stride ``s``: the polyphase symbol ``(n1/s, n2/s, c_out, s² c_in)`` of ``polyphase_symbol``,
        columns ordered as the channels of ``F.pixel_unshuffle(x, s)``; ``ValueError`` unless ``s`` divides the
        grid sizes.
        """
        n1, n2 = as_grid(grid)
        s = self.stride
        if s == 1:
            return self._symbol(n1, n2)
        if n1 % s or n2 % s:
            raise ValueError(f"the symbol of a stride-{s} operator is defined on periodic grids whose sizes are "
                             f"divisible by {s}, got {(n1, n2)} (spectral_norm(grid, method='power') gives the "
                             "exact norm on any grid, spectral_norm() a bound for every grid)")
        return polyphase_symbol(self._symbol(n1, n2), s)

    @torch.no_grad()
    def singular_values(self, grid: Grid) -> torch.Tensor:
        """All singular values of ``K`` on the periodic ``n1 x n2`` grid, sorted descending (exact).

        The union over ``ω`` of the singular values of ``K̂(ω)``; real weights give ``K̂(−ω) = conj K̂(ω)``,
        so only the half ``0 ≤ m2 ≤ n2 // 2`` is decomposed and each value counted with its multiplicity.
        With a stride ``s`` the same over the polyphase symbol on the ``n1/s x n2/s`` coarse grid (``s`` must
        divide ``n1`` and ``n2``).
        """
        sym = self.symbol(grid)
        m1, m2, mult = half_spectrum(*sym.shape[:2])
        s = batched_lapack(torch.linalg.svdvals, sym[m1.to(sym.device), m2.to(sym.device)])
        s = s.repeat_interleave(mult.to(s.device), dim=0).flatten()
        return torch.sort(s, descending=True).values

    @torch.no_grad()
    def spectral_norm(self, grid: Grid | None = None, method: str = "symbol", tol: float = 1e-10,
                      maxiter: int = 2000, seed: int = 0) -> float:
        """``‖K‖₂``.

        ``method="symbol"``: ``max_ω ‖K̂(ω)‖₂``. With ``"circular"`` boundaries and a grid this is exact.
        With ``"zeros"`` and a grid ``n1 x n2`` it is a guaranteed upper bound: the zero-padded operator is
        a compression of the periodic one on the ``(n1 + k − 1) x (n2 + k − 1)`` grid (for grids larger than
        the ``N x N`` one below, the grid-free bound is used instead: cheaper, and it bounds every grid). Without a grid it is
        a guaranteed upper bound on the supremum over all continuous frequencies (hence on every grid and
        both boundaries), at most 1% above it: the maximum ``Λ_N`` on an ``N x N`` grid, ``N = 32 (k − 1)``,
        times ``(1 − 2π²D²/N²)^{-1/2}``. (``v^H K̂^H K̂ v`` is a trigonometric polynomial of degree
        ``D = k − 1`` per variable; at its maximiser the gradient vanishes and Bernstein's inequality bounds
        the Hessian by ``D² sup``, so a grid point within ``π/N`` per axis is within ``2π²D²/N²`` of it.)

        ``method="power"``: Lanczos (ARPACK, implicitly restarted) on ``K^T K`` with ``forward``/``adjoint`` on
        the given grid: the exact norm of the operator as it acts (any boundary), ``σ²`` to relative accuracy
        ``tol``, at most ``maxiter`` restarts. (Plain power iteration stalls when the top singular values
        cluster, as they do for zero padding on large grids.)

        Stride ``s``: ``"symbol"`` with ``"circular"`` and a grid is ``max_ν ‖K̂_s(ν)‖₂`` over the polyphase
        symbol, exact (``ValueError`` unless ``s`` divides the grid sizes); with ``"zeros"`` and a grid, the same
        on the enlarged grid rounded up to a multiple of ``s`` (the zero-padded ``D_s K`` is a compression of the
        periodic one there), an upper bound; without a grid, the bound on ``‖K‖`` above, since
        ``‖D_s K‖ ≤ ‖K‖``. ``"power"`` iterates on ``K_s^T K_s`` as for stride 1.
        """
        if method == "symbol":
            degree = self.kernel_size - 1
            n = max(1, 32 * degree)
            if grid is not None:
                n1, n2 = as_grid(grid)
                if self.boundary == "zeros":  # the periodic grid that the zero-padded operator is a compression of
                    s = self.stride
                    n1, n2 = -(-(n1 + degree) // s) * s, -(-(n2 + degree) // s) * s
                if self.boundary == "circular" or n1 * n2 <= n * n:
                    return self._periodic_norm(n1, n2)
                # a larger zero-padded grid: the grid-free bound below is cheaper and still bounds it
            return self._max_symbol_norm(n, n) / math.sqrt(1 - 2 * (math.pi * degree / n) ** 2)
        if method == "power":
            if grid is None:
                raise ValueError("spectral_norm(method='power') needs a grid (n1, n2) to iterate on")
            return self._power_iteration(as_grid(grid), tol, maxiter, seed)
        raise ValueError(f"unknown spectral_norm method {method!r}; expected 'symbol' or 'power'")

    def _periodic_norm(self, n1: int, n2: int) -> float:
        """``‖K_s‖₂`` on the periodic ``n1 x n2`` grid: ``max_ω ‖K̂(ω)‖₂``, or over the polyphase symbol."""
        if self.stride == 1:
            return self._max_symbol_norm(n1, n2)
        sym = self.symbol((n1, n2))
        m1, m2, _ = half_spectrum(*sym.shape[:2], device=sym.device)
        norms = batched_lapack(lambda s: torch.linalg.matrix_norm(s, ord=2), sym[m1, m2])
        return float(norms.max())

    def _power_iteration(self, grid: tuple[int, int], tol: float, maxiter: int, seed: int) -> float:
        """``sqrt(λ_max(K^T K))`` by implicitly restarted Lanczos (ARPACK's ``eigsh``) on the LinearOperator
        ``v -> K^T K v`` built from ``forward``/``adjoint``; ``tol`` is ARPACK's relative accuracy of the Ritz
        value, ``maxiter`` its number of restarts, ``seed`` fixes the start vector."""
        from scipy.sparse.linalg import LinearOperator, eigsh

        op = self.as_linear_operator(grid)
        n = op.shape[1]
        start = np.random.default_rng(seed).standard_normal(n).astype(op.dtype)
        if n == 1:  # ARPACK needs k < n
            return float(np.linalg.norm(op.matvec(start / np.linalg.norm(start))))
        gram = LinearOperator((n, n), matvec=lambda v: op.rmatvec(op.matvec(v)), dtype=op.dtype)
        lam = eigsh(gram, k=1, which="LA", tol=tol, maxiter=maxiter, v0=start, return_eigenvectors=False)[0]
        return math.sqrt(max(float(lam), 0.0))

    def step_bound(self, scheme: str = "parabolic", grid: Grid | None = None,
                   other: "ConvOperator | None" = None) -> float:
        """Largest stable step ``h`` of ``scheme`` driven by this operator: ``operators.stability.step_bound``.

        The norm is ``self.spectral_norm(grid)`` (``max_ω ‖K̂(ω)‖₂`` from the symbol: exact on a periodic
        grid, an upper bound for zero padding or without a grid, so the step is then on the safe side). For
        the diffusion schemes it is the same symbol maximum, ``max_{ω,j} |ŝ_j(ω)|`` for a depthwise ``K``.
        ``"parabolic"``: ``2/‖K‖²``; ``"leapfrog"``: ``2/‖K‖``; ``"hamiltonian"``: ``2/(‖K‖ ‖other‖)`` with
        ``other`` the second operator of the Verlet pair (default: ``K`` itself); implicit schemes: ``inf``.

        Assumes the linearization of the block: activation slopes ``σ' ∈ [0, 1]``, no normalization, the
        current weights. ``"euler"`` (the general layer) has no bound from a norm and raises ``ValueError``.
        """
        norm = self.spectral_norm(grid)
        if other is not None:
            if stability.get_scheme(scheme).name != "hamiltonian":
                raise ValueError(f"other= is the second operator of a 'hamiltonian' pair, not used by {scheme!r}")
            if not isinstance(other, ConvOperator):
                raise TypeError(f"other must be a ConvOperator, got {type(other).__name__}")
            norm *= other.spectral_norm(grid)
        elif stability.get_scheme(scheme).name == "hamiltonian":
            norm *= norm
        return stability.step_bound(scheme, norm)

    def as_linear_operator(self, grid: Grid):
        """``scipy.sparse.linalg.LinearOperator`` of shape ``(c_out m1 m2, c_in n1 n2)`` (batch 1).

        ``grid = (n1, n2)`` is the input grid, ``(m1, m2) = output_grid(n1, n2)``. Vectors are flattened in C
        order from ``(c, n1, n2)`` and ``(c, m1, m2)``; ``matvec`` is ``K_s``, ``rmatvec`` is ``K_s^T``.
        """
        from scipy.sparse.linalg import LinearOperator

        n1, n2 = as_grid(grid)
        m1, m2 = self.output_grid(n1, n2)
        p = next(self.parameters(), None)
        dtype = p.dtype if p is not None else torch.float64
        device = p.device if p is not None else None

        def apply(fn, shape, v):
            t = torch.as_tensor(np.ascontiguousarray(v).reshape(1, *shape), dtype=dtype, device=device)
            with torch.no_grad():
                return fn(t).reshape(-1).cpu().numpy()

        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        return LinearOperator(
            shape=(self.out_channels * m1 * m2, self.in_channels * n1 * n2),
            matvec=lambda v: apply(self._forward, (self.in_channels, n1, n2), v),
            rmatvec=lambda v: apply(lambda y: self._transpose(y, (n1, n2)), (self.out_channels, m1, m2), v),
            dtype=np_dtype,
        )

    @torch.no_grad()
    def to_matrix(self, grid: Grid) -> torch.Tensor:
        """Dense matrix ``(c_out m1 m2, c_in n1 n2)`` of ``K_s`` on the input grid (small grids only)."""
        n1, n2 = as_grid(grid)
        n = self.in_channels * n1 * n2
        if n > 20000:
            rows = self.out_channels * math.prod(self.output_grid(n1, n2))
            raise ValueError(f"to_matrix would build a {rows} x {n} matrix; use a smaller grid")
        p = next(self.parameters(), None)
        eye = torch.eye(n, dtype=p.dtype if p is not None else None, device=p.device if p is not None else None)
        columns = self._forward(eye.reshape(n, self.in_channels, n1, n2))
        return columns.reshape(n, -1).T.contiguous()

    def check_adjoint(self, grid: Grid = (7, 6), batch: int = 2, seed: int = 0) -> float:
        """Relative dot-test error ``|<Kx, y> − <x, K^T y>| / (|<Kx, y>| + eps)`` on random inputs."""
        from .dottest import dottest

        return dottest(self, grid, batch=batch, seed=seed)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops(self, input_shape: Sequence[int]) -> int:
        """FLOPs of one ``forward`` on ``input_shape`` counted as PyTorch's counter does: 2 per multiply-add, at
        every pixel of the output grid."""
        b, _, n1, n2 = input_shape
        return 2 * self.macs_per_pixel() * b * math.prod(self.output_grid(n1, n2))

    def extra_repr(self) -> str:
        stride = f", stride={self.stride}" if self.stride != 1 else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}{stride}, "
                f"boundary={self.boundary!r}")
