"""Fourier symbols of stencils, forward-Euler amplification factors and step bounds, with sympy.

A ``k x k`` stencil ``w`` (numbers or sympy symbols), applied as a same-size cross-correlation as in
:mod:`operators.functional`, maps the plane wave ``e^{i θ·n}`` to ``ŝ(θ) e^{i θ·n}`` with

    ŝ(θ₁, θ₂) = Σ_{p,q} w_pq e^{i(θ₁(p − r) + θ₂(q − r))},   r = k // 2,

written here as ``Σ w_pq cos(φ_pq) + i Σ w_pq sin(φ_pq)``. On an ``n1 x n2`` periodic grid
``θ = 2π(m₁/n₁, m₂/n₂)``, matching ``ConvOperator.symbol(grid)``. Forward Euler with step ``h`` multiplies
each Fourier mode by the amplification factor

    ∂_t u = s(D) u:         g(θ) = 1 + h ŝ(θ),
    ∂_t u = −K^T K u:       g(θ) = 1 − h |ŝ(θ)|²,

and the step bound is the largest ``h`` with ``|g(θ)| ≤ 1`` for all ``θ`` (and all smaller steps). For the
5-point Laplacian with unit spacing, ``ŝ = 2cos θ₁ + 2cos θ₂ − 4 ∈ [−8, 0]``: ``h ≤ 1/4`` for the heat
equation ``∂_t u = Δu``, and ``h ≤ 2/64 = 1/32`` for ``∂_t u = −K^T K u`` with ``K = Δ`` (``|ŝ|² ≤ 64``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import sympy as sp
import torch

from .base import as_grid

theta1, theta2 = sp.symbols("theta1 theta2", real=True)
h = sp.Symbol("h", positive=True)

_x1, _y1, _x2, _y2 = sp.symbols("x1 y1 x2 y2", real=True)


def _stencil(coefficients) -> sp.Matrix:
    """Coefficients as a square sympy Matrix of odd size (numbers, sympy expressions, numpy, torch)."""
    if isinstance(coefficients, torch.Tensor):
        coefficients = coefficients.detach().cpu().tolist()
    elif isinstance(coefficients, np.ndarray):
        coefficients = coefficients.tolist()
    try:
        w = sp.Matrix(coefficients)
    except (TypeError, ValueError, sp.SympifyError) as err:
        raise TypeError(f"stencil coefficients must be a k x k array of numbers or sympy expressions ({err})") \
            from None
    k1, k2 = w.shape
    if k1 != k2 or k1 % 2 != 1:
        raise ValueError(f"a stencil must be k x k with odd k, got shape {(k1, k2)}")
    return w


def stencil_symbol(coefficients) -> sp.Expr:
    """``ŝ(θ₁, θ₂) = Σ_{p,q} w_pq e^{i(θ₁(p−r) + θ₂(q−r))}`` as ``Σ w cos φ + i Σ w sin φ`` (cross-correlation)."""
    w = _stencil(coefficients)
    r = w.shape[0] // 2
    phases = [(w[p, q], theta1 * (p - r) + theta2 * (q - r)) for p in range(w.shape[0]) for q in range(w.shape[1])]
    real = sum((c * sp.cos(phi) for c, phi in phases), sp.Integer(0))
    imag = sum((c * sp.sin(phi) for c, phi in phases), sp.Integer(0))
    return sp.expand(real) + sp.I * sp.expand(imag)


def laplacian_5point(spacing=1) -> sp.Matrix:
    """The 5-point Laplacian ``[[0, 1, 0], [1, −4, 1], [0, 1, 0]] / spacing²``; symbol ``(2cos θ₁ + 2cos θ₂ − 4)/spacing²``."""
    return sp.Matrix([[0, 1, 0], [1, -4, 1], [0, 1, 0]]) / sp.sympify(spacing) ** 2


def laplacian_9point(spacing=1) -> sp.Matrix:
    """The isotropic 9-point Laplacian ``[[1, 4, 1], [4, −20, 4], [1, 4, 1]] / (6 spacing²)``; symbol in ``[−16/3, 0]``."""
    return sp.Matrix([[1, 4, 1], [4, -20, 4], [1, 4, 1]]) / (6 * sp.sympify(spacing) ** 2)


def stencil_weights(pattern: str = "cross", prefix: str = "w") -> sp.Matrix:
    """A 3 x 3 stencil of real symbols ``w_pq``: ``"cross"`` (centre and 4 neighbours, zeros at the corners) or ``"full"``."""
    if pattern not in ("cross", "full"):
        raise ValueError(f"unknown stencil pattern {pattern!r}; expected 'cross' or 'full'")
    keep = (lambda p, q: p == 1 or q == 1) if pattern == "cross" else (lambda p, q: True)
    return sp.Matrix(3, 3, lambda p, q: sp.Symbol(f"{prefix}_{p}{q}", real=True) if keep(p, q) else 0)


def euler_amplification_linear(symbol) -> sp.Expr:
    """Forward Euler on ``∂_t u = s(D) u``: ``g(θ) = 1 + h ŝ(θ)``."""
    return 1 + h * sp.sympify(symbol)


def euler_amplification_normal(symbol) -> sp.Expr:
    """Forward Euler on ``∂_t u = −K^T K u`` (``K^T`` has symbol ``conj(ŝ)``): ``g(θ) = 1 − h |ŝ(θ)|²``."""
    s = sp.sympify(symbol)
    re, im = sp.re(s), sp.im(s)
    return 1 - h * (re ** 2 + im ** 2)


def lambdify_symbol(expr, backend: str = "numpy", args=None):
    """``expr`` as a function of ``args`` (default ``(theta1, theta2)`` then the other free symbols by name).

    ``backend="numpy"`` or ``"torch"``; the result broadcasts to the shape of the arguments.
    """
    if backend not in ("numpy", "torch"):
        raise ValueError(f"unknown backend {backend!r}; expected 'numpy' or 'torch'")
    expr = sp.sympify(expr)
    if args is None:
        rest = sorted(expr.free_symbols - {theta1, theta2}, key=lambda s: s.name)
        args = (theta1, theta2, *rest)
    missing = expr.free_symbols - set(args)
    if missing:
        raise ValueError(f"expression has free symbols {sorted(map(str, missing))} not among args {list(map(str, args))}")
    f = sp.lambdify(args, expr, modules=backend)

    def evaluate(*values):
        out = f(*values)
        if not values:
            return out
        if backend == "numpy":
            return np.broadcast_to(out, np.broadcast_shapes(*(np.shape(v) for v in values)))
        tensors = [torch.as_tensor(v) for v in values]
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
        out = torch.as_tensor(out, device=tensors[0].device)
        return out if out.shape == shape else out.expand(shape)

    return evaluate


def symbol_on_grid(expr, grid, backend: str = "torch"):
    """``expr(θ₁, θ₂)`` at ``θ = 2π(m₁/n₁, m₂/n₂)``: complex ``(n1, n2)``, the layout of ``ConvOperator.symbol``."""
    n1, n2 = as_grid(grid)
    f = lambdify_symbol(expr, backend, args=(theta1, theta2))
    if backend == "torch":
        t1, t2 = torch.meshgrid(2 * torch.pi * torch.arange(n1, dtype=torch.float64) / n1,
                                2 * torch.pi * torch.arange(n2, dtype=torch.float64) / n2, indexing="ij")
        return f(t1, t2).to(torch.complex128)
    t1, t2 = np.meshgrid(2 * np.pi * np.arange(n1) / n1, 2 * np.pi * np.arange(n2) / n2, indexing="ij")
    return np.asarray(f(t1, t2), dtype=np.complex128)


# ---------------------------------------------------------------------------------------------- step bounds
@dataclass(frozen=True)
class StepBound:
    """The largest stable ``h``: an exact sympy number (``exact=True``) or a float from a numeric search."""

    value: sp.Expr | float
    exact: bool
    method: str

    def __float__(self) -> float:
        return float(self.value)

    def __str__(self) -> str:
        return f"h <= {self.value} ({'exact' if self.exact else 'numeric'}: {self.method})"


def _trig_polynomial(m: sp.Expr) -> sp.Expr | None:
    """A real trigonometric polynomial in θ as a polynomial in ``x_i = cos θ_i``, ``y_i = sin θ_i``."""
    p = sp.expand(sp.expand_trig(m)).subs(
        {sp.cos(theta1): _x1, sp.sin(theta1): _y1, sp.cos(theta2): _x2, sp.sin(theta2): _y2})
    if p.free_symbols - {_x1, _y1, _x2, _y2} or not p.is_polynomial(_x1, _y1, _x2, _y2):
        return None
    return p


def _exact_range(m: sp.Expr) -> tuple[sp.Expr, sp.Expr] | None:
    """``(min_θ m, max_θ m)`` exactly for a real trigonometric polynomial ``m``, or ``None``.

    The torus has no boundary, so the extremes are critical points: ``∂m/∂θ_i = −y_i ∂P/∂x_i + x_i ∂P/∂y_i = 0``
    with ``x_i² + y_i² = 1`` (solved by ``sympy.solve``). ``m = c u^k`` is reduced to the range of ``u``.
    """
    coeff, rest = m.as_coeff_Mul()
    if rest.is_Pow and rest.exp.is_Integer and rest.exp >= 2 and rest.base.is_real is not False \
            and sp.simplify(sp.im(rest.base)) == 0:
        inner = _exact_range(rest.base)
        if inner is None:
            return None
        a, b = inner
        k = int(rest.exp)
        values = [a ** k, b ** k] + ([sp.Integer(0)] if k % 2 == 0 and a <= 0 <= b else [])
        lo, hi = coeff * sp.Min(*values), coeff * sp.Max(*values)
        return (lo, hi) if coeff >= 0 else (hi, lo)
    p = _trig_polynomial(m)
    if p is None:
        return None
    if p.is_number:
        return p, p
    equations = [_x1 ** 2 + _y1 ** 2 - 1, _x2 ** 2 + _y2 ** 2 - 1,
                 -_y1 * sp.diff(p, _x1) + _x1 * sp.diff(p, _y1), -_y2 * sp.diff(p, _x2) + _x2 * sp.diff(p, _y2)]
    try:
        solutions = sp.solve(equations, [_x1, _y1, _x2, _y2], dict=True)
    except (NotImplementedError, ValueError):
        return None
    values = []
    for sol in solutions:
        v = sp.simplify(p.subs(sol))
        if v.free_symbols:
            return None
        z = complex(sp.N(v))
        if abs(z.imag) > 1e-12 * (1 + abs(z)):
            continue  # a complex critical point: not on the torus
        values.append(sp.simplify(sp.re(v)))
    if not values:
        return None
    return sp.Min(*values), sp.Max(*values)


def _sample(m: sp.Expr, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    f = lambdify_symbol(m, "numpy", args=(theta1, theta2))
    t = np.linspace(-np.pi, np.pi, n, endpoint=False)
    t1, t2 = np.meshgrid(t, t, indexing="ij")
    return t1, t2, np.asarray(f(t1, t2), dtype=np.complex128)


def _numeric_bound(m: sp.Expr, samples: int, refine: int) -> float:
    """``max(0, min_θ b(θ))`` with ``b = −2 Re m / |m|²`` (the largest ``h`` with ``|1 + h m(θ)| ≤ 1``).

    ``b`` is sampled on a ``samples x samples`` grid of ``[−π, π)²`` (points with ``m = 0`` never limit ``h``),
    then minimized by Nelder–Mead from the ``refine`` best samples.
    """
    from scipy.optimize import minimize

    f = lambdify_symbol(m, "numpy", args=(theta1, theta2))

    def b(t):
        v = complex(f(t[0], t[1]))
        return math.inf if abs(v) < 1e-14 else -2 * v.real / abs(v) ** 2

    t1, t2, v = _sample(m, samples)
    mag2 = np.abs(v) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        bs = np.where(mag2 > 1e-28, -2 * v.real / mag2, np.inf)
    best = float(bs.min())
    for i in np.argsort(bs, axis=None)[:refine]:
        x0 = np.array([t1.flat[i], t2.flat[i]])
        res = minimize(b, x0, method="Nelder-Mead", options={"xatol": 1e-13, "fatol": 1e-15, "maxiter": 2000})
        best = min(best, float(res.fun))
    return max(0.0, best)


def step_bound(amplification, exact: bool = True, samples: int = 256, refine: int = 5) -> StepBound:
    """Largest ``h`` with ``|g(θ)| ≤ 1`` for all ``θ`` (and every smaller step), ``g = 1 + h m(θ)`` from forward Euler.

    Exact when ``m`` is real (a symmetric stencil, or the ``−|ŝ|²`` of ``−K^T K``): with ``m ∈ [m_min, m_max]``
    the bound is ``2/(−m_min)`` if ``m_max ≤ 0`` (``oo`` if ``m ≡ 0``) and 0 if ``m_max > 0`` (a growing mode);
    the extremes come from :func:`_exact_range` and are cross-checked against ``samples²`` numeric samples.
    Otherwise (complex ``m``, or sympy finds no closed form, or ``exact=False``): the numeric search of
    :func:`_numeric_bound`, reported with ``exact=False``.
    """
    g = sp.sympify(amplification)
    extra = g.free_symbols - {theta1, theta2, h}
    if extra:
        raise ValueError(f"amplification factor has free symbols {sorted(map(str, extra))} besides theta1, theta2, h;"
                         " substitute numbers for them first")
    m = sp.diff(g, h)
    if sp.simplify(sp.diff(m, h)) != 0 or sp.simplify(g.subs(h, 0) - 1) != 0:
        raise ValueError(f"expected a forward-Euler amplification factor 1 + h m(theta), got {g}")
    m = sp.simplify(m) if m.free_symbols else m
    if exact and sp.simplify(sp.im(m)) == 0:
        m_real = sp.re(m) if m.free_symbols else m
        rng = _exact_range(m_real)
        if rng is not None:
            lo, hi = (sp.simplify(v) for v in rng)
            values = _sample(m_real, samples)[2].real
            tol = 1e-9 * (1 + float(np.abs(values).max()))
            if float(hi) >= values.max() - tol and float(lo) <= values.min() + tol:
                how = "critical points of m(θ) by sympy.solve, checked against sampling"
                if hi > 0:
                    return StepBound(sp.Integer(0), True, how + "; m > 0 somewhere: a growing mode")
                return StepBound(sp.oo if lo == 0 else -2 / lo, True, how)
    value = _numeric_bound(m, samples, refine)
    return StepBound(value, False, f"{samples}x{samples} θ samples of -2 Re m/|m|² + Nelder-Mead from {refine} best")
