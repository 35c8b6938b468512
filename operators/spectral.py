"""Fast exact spectra of convolution symbols on periodic grids.

For a real kernel ``W`` of shape ``(c_out, c_in, k1, k2)`` (taps ``W_a``, ``a`` the offset from the centre) the
symbol is ``K̂(ω) = Σ_a W_a e^{iω·a}`` and its Gram matrix is a trigonometric polynomial with matrix
coefficients::

    K̂(ω)^H K̂(ω) = Σ_d M_d e^{iω·d},    M_d = Σ_{b − a = d} W_a^T W_b,    d ∈ [−(k1−1), k1−1] x [−(k2−1), k2−1].

All ``M_d`` come from one real ``(k1 k2 c_in)²`` Gram product. Real weights give ``K̂(−ω) = conj K̂(ω)``, so
half of the frequencies suffice. ``max_symbol_norm`` then finds ``max_ω ‖K̂(ω)‖₂`` exactly:

1. a few batched power steps give a lower estimate ``ρ(ω) ≤ λ_max(G(ω))`` at every frequency;
2. the exact ``λ_max`` (``eigvalsh``) at the few most promising frequencies gives ``L ≤ max_ω λ_max``;
3. a batched Cholesky factorisation of ``μI − G(ω)``, ``μ = L(1 − δ)``, proves ``λ_max(G(ω)) < L`` wherever
   it succeeds (``δ`` covers the rounding of the factorisation);
4. ``eigvalsh`` at the remaining frequencies; the answer is the largest eigenvalue found.

Step 3 is a certificate, so the result is exact (to rounding) whatever the quality of the estimates in
step 1; good estimates only make step 4 short.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch


def batched_lapack(fn, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """``fn(x)`` for a batched linear-algebra ``fn``, run on CPU as single-threaded calls in parallel.

    Batches of small factorisations gain nothing from MKL's threading inside each call and lose a lot to
    it on a busy machine (measured here: batched ``eigvalsh`` of 256 x 256 matrices 30x slower with two
    contended threads than with one). So on CPU ``x`` is cut into slices of ``batch`` along dim 0, each
    slice is one single-threaded call, and as many slices run at once as torch has intra-op threads;
    the results are concatenated along dim 0 and the thread setting is restored. Elsewhere: ``fn(x)``.
    """
    if x.device.type != "cpu":
        return fn(x)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if threads == 1 or len(x) <= batch:
            return fn(x)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return torch.cat(list(pool.map(fn, x.split(batch))))
    finally:
        torch.set_num_threads(threads)


def half_spectrum(n1: int, n2: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frequency indices ``(m1, m2)`` with ``0 ≤ m2 ≤ n2 // 2`` and each one's multiplicity on the full grid.

    Every frequency ``ω`` of the ``n1 x n2`` grid is either in this set or is ``−ω`` of one in it; the
    multiplicity is 1 for self-paired columns (``m2 = 0`` and, for even ``n2``, ``m2 = n2 / 2``), else 2.
    Returns flat int64 tensors ``m1``, ``m2`` and ``mult`` of length ``n1 (n2 // 2 + 1)``.
    """
    h = n2 // 2 + 1
    m1 = torch.arange(n1, device=device).repeat_interleave(h)
    m2 = torch.arange(h, device=device).repeat(n1)
    mult = torch.where((m2 == 0) | (2 * m2 == n2), 1, 2)
    return m1, m2, mult


def tap_gram(weight: torch.Tensor) -> torch.Tensor:
    """``M_d = Σ_{b − a = d} W_a^T W_b`` for ``weight`` (c_out, c_in, k1, k2); shape (2k1−1, 2k2−1, c_in, c_in).

    ``M[d1 + k1 − 1, d2 + k2 − 1]`` is the coefficient of ``e^{iω·d}``; ``M_{−d} = M_d^T``.
    """
    c_out, c_in, k1, k2 = weight.shape
    taps = weight.permute(0, 2, 3, 1).reshape(c_out, k1 * k2 * c_in)
    products = (taps.T @ taps).reshape(k1, k2, c_in, k1, k2, c_in).permute(0, 1, 3, 4, 2, 5)
    gram = weight.new_zeros(2 * k1 - 1, 2 * k2 - 1, c_in, c_in)
    for p in range(k1):
        for q in range(k2):
            # all b with a = (p, q): d = b − a, so the block of offsets lands at [k1−1−p : 2k1−1−p, ...]
            gram[k1 - 1 - p:2 * k1 - 1 - p, k2 - 1 - q:2 * k2 - 1 - q] += products[p, q]
    return gram


def gram_at(gram: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, n1: int, n2: int) -> torch.Tensor:
    """``G(ω) = Σ_d M_d e^{iω·d}`` at ``ω = 2π(m1/n1, m2/n2)``: complex ``(len(m1), c, c)``, one GEMM."""
    D1, D2, c, _ = gram.shape
    cdtype = torch.complex128 if gram.dtype == torch.float64 else torch.complex64
    d1 = torch.arange(D1, device=gram.device, dtype=torch.float64) - (D1 - 1) // 2
    d2 = torch.arange(D2, device=gram.device, dtype=torch.float64) - (D2 - 1) // 2
    phase = 2 * math.pi * (m1.double()[:, None, None] * d1[:, None] / n1 + m2.double()[:, None, None] * d2 / n2)
    waves = torch.polar(torch.ones_like(phase), phase).reshape(len(m1), D1 * D2).to(cdtype)
    return (waves @ gram.reshape(D1 * D2, c * c).to(cdtype)).reshape(len(m1), c, c)


def _power_estimate(g: torch.Tensor, steps: int, generator: torch.Generator) -> torch.Tensor:
    """Rayleigh quotients after ``steps`` batched power steps: lower bounds on ``λ_max`` of each ``g[f]``."""
    v = torch.randn(g.shape[0], g.shape[1], 1, generator=generator, dtype=g.dtype).to(g.device)
    tiny = torch.finfo(g.real.dtype).tiny
    for _ in range(steps):
        v = g @ v
        v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(tiny)
    return (v.mH @ (g @ v)).real.flatten() / (v.mH @ v).real.flatten().clamp_min(tiny)


def max_hermitian_eigenvalue(gram_fn, count: int, size: int, device, budget: int = 1 << 26,
                             candidates: int = 8, power_steps: int = 3, seed: int = 0) -> float:
    """``max_f λ_max(G_f)`` over ``count`` Hermitian positive semi-definite ``size x size`` matrices, exactly.

    ``gram_fn(index)`` returns the matrices ``G_f`` (complex, ``(len(index), size, size)``) for a 1-D index
    tensor. They are built in chunks of at most ``budget`` entries (512 MB in complex64), kept between the
    two passes when one chunk holds them all, and rebuilt otherwise. Steps 1-4 of the module docstring;
    ``power_steps = 3`` already ranks random 256-channel kernels well enough that step 4 is empty.
    """
    device = torch.device(device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    chunks = torch.arange(count, device=device).split(max(1, budget // (size * size)))
    kept = gram_fn(chunks[0]) if len(chunks) == 1 else None

    def grams(idx):
        if kept is None:
            return gram_fn(idx)
        return kept if len(idx) == count else kept[idx]

    def top_eigenvalue(g):
        return torch.linalg.eigvalsh(g)[:, -1]

    estimate = torch.cat([_power_estimate(grams(idx), power_steps, generator) for idx in chunks])
    top = estimate.topk(min(candidates, count)).indices
    best = float(batched_lapack(top_eigenvalue, grams(top)).max())
    if best <= 0.0:
        return 0.0
    level = best * (1 - 8 * size * torch.finfo(estimate.dtype).eps)  # below best by the Cholesky rounding

    def certified(g):  # λ_max(g) < best wherever the Cholesky factorisation of level·I − g succeeds
        shifted = -g
        shifted.diagonal(dim1=-2, dim2=-1).add_(level)
        return torch.linalg.cholesky_ex(shifted).info == 0

    open_ = torch.ones(count, dtype=torch.bool, device=device)
    open_[top] = False
    for idx in chunks:
        g = grams(idx)
        failed = (~batched_lapack(certified, g) & open_[idx]).nonzero().flatten()
        if len(failed):
            best = max(best, float(batched_lapack(top_eigenvalue, g[failed]).max()))
    return best


def max_symbol_norm(weight: torch.Tensor, n1: int, n2: int) -> float:
    """``max_ω ‖K̂(ω)‖₂`` over the ``n1 x n2`` grid frequencies for a real kernel (c_out, c_in, k1, k2), exact.

    Works on the smaller Gram side (``K̂^T`` has the kernel with channels swapped) and on half the grid.
    """
    weight = weight.detach()
    if weight.shape[0] < weight.shape[1]:
        weight = weight.transpose(0, 1)
    gram = tap_gram(weight)
    m1, m2, _ = half_spectrum(n1, n2, device=weight.device)
    lam = max_hermitian_eigenvalue(lambda idx: gram_at(gram, m1[idx], m2[idx], n1, n2), len(m1),
                                   weight.shape[1], weight.device)
    return math.sqrt(lam)
