"""The base class of all convolution operators: checked public methods around private hooks.

A subclass implements ``_forward``, ``_adjoint``, ``_symbol`` and ``macs_per_pixel``; everything else
(shape checks, spectra, scipy interoperability, dense matrices, FLOP counts) lives here once.
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


class ConvOperator(nn.Module):
    """A linear, same-resolution convolution operator ``K: R^{c_in x n1 x n2} -> R^{c_out x n1 x n2}``.

    Notes
    -----
    Inputs are ``(batch, c_in, n1, n2)``, outputs ``(batch, c_out, n1, n2)``. ``adjoint`` is the exact
    transpose for the boundary condition in use (``"zeros"`` or ``"circular"``), so
    ``<K x, y> = <x, K^T y>``. On an ``n1 x n2`` periodic grid ``K`` is block-diagonalised by the 2-D
    DFT: ``symbol(grid)[m1, m2]`` is the ``c_out x c_in`` matrix ``K̂(ω)`` at ``ω = 2π(m1/n1, m2/n2)``,
    and the singular values of ``K`` are the union over ``ω`` of those of ``K̂(ω)``.
    """

    kind: str = "operator"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, boundary: str = "zeros"):
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        if self.kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for a same-size convolution, got {kernel_size}")
        self.boundary = check_boundary(boundary)

    # ----------------------------------------------------------------- hooks for subclasses
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _symbol(self, n1: int, n2: int) -> torch.Tensor:
        """Complex ``(n1, n2, c_out, c_in)``: the matrix ``K̂(ω)`` at each grid frequency."""
        raise NotImplementedError

    def macs_per_pixel(self) -> int:
        """Multiply-adds per output pixel executed by ``forward`` (as PyTorch's FLOP counter sees them)."""
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

        Generic: the impulse response. ``K`` applied to ``e_i δ_centre`` on a ``k x k`` grid gives
        ``(K e_i δ)[o, n] = W[o, i, 2r − n]`` (no wrap-around or truncation reaches the centre on that grid,
        for either boundary), so ``W = flip(response).transpose(0, 1)``. Subclasses may build it directly.
        """
        k, c = self.kernel_size, self.in_channels
        p = next(self.parameters(), None)
        impulses = torch.zeros(c, c, k, k, dtype=p.dtype if p is not None else None,
                               device=p.device if p is not None else None)
        impulses[torch.arange(c), torch.arange(c), k // 2, k // 2] = 1
        return self._forward(impulses).transpose(0, 1).flip(-1, -2).contiguous()

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
        """``K x``: ``(B, c_in, n1, n2) -> (B, c_out, n1, n2)``."""
        self._check_input(x, self.in_channels, "forward")
        return self._forward(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``K^T y``: ``(B, c_out, n1, n2) -> (B, c_in, n1, n2)``, exact for the boundary condition."""
        self._check_input(y, self.out_channels, "adjoint")
        return self._adjoint(y)

    def symbol(self, grid: Grid) -> torch.Tensor:
        """Complex tensor ``(n1, n2, c_out, c_in)``: ``K̂(ω)`` at ``ω = 2π(m1/n1, m2/n2)``."""
        n1, n2 = as_grid(grid)
        return self._symbol(n1, n2)

    @torch.no_grad()
    def singular_values(self, grid: Grid) -> torch.Tensor:
        """All singular values of ``K`` on the periodic ``n1 x n2`` grid, sorted descending (exact).

        The union over ``ω`` of the singular values of ``K̂(ω)``; real weights give ``K̂(−ω) = conj K̂(ω)``,
        so only the half ``0 ≤ m2 ≤ n2 // 2`` is decomposed and each value counted with its multiplicity.
        """
        n1, n2 = as_grid(grid)
        m1, m2, mult = half_spectrum(n1, n2)
        sym = self._symbol(n1, n2)
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
        """
        if method == "symbol":
            degree = self.kernel_size - 1
            n = max(1, 32 * degree)
            if grid is not None:
                n1, n2 = as_grid(grid)
                if self.boundary == "circular":
                    return self._max_symbol_norm(n1, n2)
                n1, n2 = n1 + degree, n2 + degree
                if n1 * n2 <= n * n:
                    return self._max_symbol_norm(n1, n2)
                # a larger zero-padded grid: the grid-free bound below is cheaper and still bounds it
            return self._max_symbol_norm(n, n) / math.sqrt(1 - 2 * (math.pi * degree / n) ** 2)
        if method == "power":
            if grid is None:
                raise ValueError("spectral_norm(method='power') needs a grid (n1, n2) to iterate on")
            return self._power_iteration(as_grid(grid), tol, maxiter, seed)
        raise ValueError(f"unknown spectral_norm method {method!r}; expected 'symbol' or 'power'")

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
        """``scipy.sparse.linalg.LinearOperator`` of shape ``(c_out n1 n2, c_in n1 n2)`` (batch 1).

        Vectors are flattened in C order from ``(c, n1, n2)``; ``matvec`` is ``K``, ``rmatvec`` is ``K^T``.
        """
        from scipy.sparse.linalg import LinearOperator

        n1, n2 = as_grid(grid)
        p = next(self.parameters(), None)
        dtype = p.dtype if p is not None else torch.float64
        device = p.device if p is not None else None

        def apply(fn, channels_in, v):
            t = torch.as_tensor(np.ascontiguousarray(v).reshape(1, channels_in, n1, n2), dtype=dtype, device=device)
            with torch.no_grad():
                return fn(t).reshape(-1).cpu().numpy()

        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        return LinearOperator(
            shape=(self.out_channels * n1 * n2, self.in_channels * n1 * n2),
            matvec=lambda v: apply(self._forward, self.in_channels, v),
            rmatvec=lambda v: apply(self._adjoint, self.out_channels, v),
            dtype=np_dtype,
        )

    @torch.no_grad()
    def to_matrix(self, grid: Grid) -> torch.Tensor:
        """Dense matrix ``(c_out n1 n2, c_in n1 n2)`` of ``K`` on the grid (small grids only)."""
        n1, n2 = as_grid(grid)
        n = self.in_channels * n1 * n2
        if n > 20000:
            raise ValueError(f"to_matrix would build a {self.out_channels * n1 * n2} x {n} matrix; use a smaller grid")
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
        """FLOPs of one ``forward`` on ``input_shape`` counted as PyTorch's counter does: 2 per multiply-add."""
        b, _, n1, n2 = input_shape
        return 2 * self.macs_per_pixel() * b * n1 * n2

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, boundary={self.boundary!r}"
