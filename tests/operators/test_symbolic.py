"""operators.symbolic: sympy symbols against the numeric operator symbols, amplification factors, step bounds."""
import math

import numpy as np
import pytest
import sympy as sp
import torch

from operators import DenseConv, stability
from operators.symbolic import (
    StepBound, euler_amplification_linear, euler_amplification_normal, h, lambdify_symbol, laplacian_5point,
    laplacian_9point, stencil_symbol, stencil_weights, step_bound, symbol_on_grid, theta1, theta2,
)


def dense_stencil(w, boundary="circular"):
    """A 1-channel DenseConv whose kernel is the stencil ``w`` (k x k), float64."""
    w = torch.as_tensor(np.asarray(w, dtype=np.float64))
    op = DenseConv(1, 1, kernel_size=w.shape[-1], boundary=boundary).double()
    with torch.no_grad():
        op.weight.copy_(w.reshape(op.weight.shape))
    return op


def stencil_of(op, channel, k):
    """Channel ``channel``'s stencil of a channel-diagonal operator, read from its response to a delta.

    ``(K δ_c)[n] = w[c − n + r]``: with ``c`` the centre of a ``k x k`` grid the response is ``w`` flipped.
    """
    p = next(op.parameters())
    x = torch.zeros(1, op.in_channels, k, k, dtype=p.dtype)
    x[0, channel, k // 2, k // 2] = 1
    with torch.no_grad():
        return op(x)[0, channel].flip(-1, -2)


@pytest.mark.parametrize("k, grid", [(3, (7, 10)), (3, (8, 8)), (5, (9, 6))])
def test_symbol_matches_dense_operator(k, grid):
    gen = torch.Generator().manual_seed(k * 100 + grid[0])
    w = torch.randn(k, k, generator=gen, dtype=torch.float64)
    op = dense_stencil(w)
    expected = op.symbol(grid)[:, :, 0, 0].detach()
    got = symbol_on_grid(stencil_symbol(w.tolist()), grid)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # and the numpy backend gives the same numbers
    np.testing.assert_allclose(symbol_on_grid(stencil_symbol(w), grid, backend="numpy"), expected.numpy(),
                               rtol=1e-12, atol=1e-12)


def test_symbol_matches_depthwise_operator():
    depthwise = pytest.importorskip("operators.depthwise", reason="operators/depthwise.py not written yet")
    torch.manual_seed(3)
    op = depthwise.DepthwiseConv(4, 4, kernel_size=3, boundary="circular").double()
    grid = (9, 7)
    numeric = op.symbol(grid).detach()
    for j in range(4):
        w = stencil_of(op, j, 3)
        got = symbol_on_grid(stencil_symbol(w), grid)
        torch.testing.assert_close(got, numeric[:, :, j, j], rtol=1e-12, atol=1e-12)


def test_symbol_at_random_frequencies_is_a_plane_wave_eigenvalue():
    """At random grid frequencies, ``K e^{iθ·n} = ŝ(θ) e^{iθ·n}`` for the periodic operator."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 3))
    op = dense_stencil(w)
    f = lambdify_symbol(stencil_symbol(w))
    for _ in range(5):
        n1, n2 = rng.integers(3, 12, size=2)
        m1, m2 = rng.integers(0, n1), rng.integers(0, n2)
        t1, t2 = 2 * np.pi * m1 / n1, 2 * np.pi * m2 / n2
        i, j = np.meshgrid(np.arange(n1), np.arange(n2), indexing="ij")
        wave = np.exp(1j * (t1 * i + t2 * j))
        with torch.no_grad():
            re = op(torch.as_tensor(wave.real)[None, None])[0, 0].numpy()
            im = op(torch.as_tensor(wave.imag)[None, None])[0, 0].numpy()
        np.testing.assert_allclose(re + 1j * im, complex(f(t1, t2)) * wave, atol=1e-12)


def test_known_symbols():
    assert sp.simplify(stencil_symbol(laplacian_5point()) - (2 * sp.cos(theta1) + 2 * sp.cos(theta2) - 4)) == 0
    nine = stencil_symbol(laplacian_9point())
    assert nine.subs({theta1: 0, theta2: 0}) == 0
    assert sp.simplify(nine.subs({theta1: sp.pi, theta2: sp.pi})) == sp.Rational(-16, 3)
    # spacing scales by 1 / dx²
    assert sp.simplify(stencil_symbol(laplacian_5point(sp.Rational(1, 2))) - 4 * stencil_symbol(laplacian_5point())) == 0


def test_symbolic_cross_weights_match_operator():
    cross = stencil_weights("cross")
    assert cross[0, 0] == 0 and cross[1, 1].is_Symbol and len(cross.free_symbols) == 5
    assert len(stencil_weights("full").free_symbols) == 9
    s = stencil_symbol(cross)
    rng = np.random.default_rng(1)
    values = {sym: float(rng.standard_normal()) for sym in cross.free_symbols}
    numeric_w = np.array(cross.subs(values), dtype=np.float64)
    expected = dense_stencil(numeric_w).symbol((6, 5))[:, :, 0, 0].detach()
    torch.testing.assert_close(symbol_on_grid(s.subs(values), (6, 5)), expected, rtol=1e-12, atol=1e-12)
    # symbolic weights can be kept as arguments too
    f = lambdify_symbol(s)
    args = sorted(cross.free_symbols, key=lambda x: x.name)
    assert complex(f(0.3, -1.1, *[values[a] for a in args])) == pytest.approx(complex(
        s.subs(values).subs({theta1: 0.3, theta2: -1.1}).evalf()), abs=1e-12)


@pytest.mark.parametrize("boundary", ["circular"])
def test_amplification_factors_are_the_eigenvalues_of_one_euler_step(boundary):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3, 3))
    op = dense_stencil(w, boundary)
    grid, step = (5, 4), 0.3
    K = op.to_matrix(grid)
    eye = torch.eye(K.shape[0], dtype=K.dtype)
    s = stencil_symbol(w)
    for amplification, matrix in [(euler_amplification_linear(s), eye + step * K),
                                  (euler_amplification_normal(s), eye - step * K.T @ K)]:
        g = symbol_on_grid(amplification.subs(h, step), grid).flatten().numpy()
        eig = torch.linalg.eigvals(matrix).numpy()
        distance = np.abs(g[:, None] - eig[None, :])
        assert distance.min(axis=1).max() < 1e-10 and distance.min(axis=0).max() < 1e-10


def test_laplacian_step_bounds_are_exact():
    s = stencil_symbol(laplacian_5point())
    heat = step_bound(euler_amplification_linear(s))          # ∂_t u = Δu
    normal = step_bound(euler_amplification_normal(s))        # ∂_t u = −K^T K u, K = Δ
    assert isinstance(heat, StepBound) and heat.exact and heat.value == sp.Rational(1, 4)
    assert normal.exact and normal.value == sp.Rational(1, 32)
    assert "exact" in str(heat) and float(normal) == 1 / 32


@pytest.mark.parametrize("stencil, linear, normal", [
    (laplacian_9point(), sp.Rational(3, 8), sp.Rational(9, 128)),
    (laplacian_5point(sp.Rational(1, 2)), sp.Rational(1, 16), sp.Rational(1, 512)),
    ([[1, 0, 0], [0, -2, 0], [0, 0, 1]], sp.Rational(1, 2), sp.Rational(1, 8)),        # diagonal direction
    ([[0, 1, 0], [1, 1, 1], [0, 1, 0]], sp.Integer(0), sp.Rational(2, 25)),          # a growing mode
])
def test_step_bounds_of_known_stencils(stencil, linear, normal):
    s = stencil_symbol(stencil)
    assert step_bound(euler_amplification_linear(s)).value == linear
    assert step_bound(euler_amplification_normal(s)).value == normal


def test_numeric_fallback_says_so_and_agrees():
    upwind = stencil_symbol([[0, 0, 0], [1, -1, 0], [0, 0, 0]])          # ŝ = e^{−iθ₂} − 1: CFL h ≤ 1
    b = step_bound(euler_amplification_linear(upwind))
    assert not b.exact and "numeric" in str(b) and float(b) == pytest.approx(1.0, rel=1e-9)
    centred = stencil_symbol([[0, 0, 0], [-1, 0, 1], [0, 0, 0]])         # ŝ = 2i sin θ₂: unstable for every h
    assert float(step_bound(euler_amplification_linear(centred))) == 0.0
    lap = euler_amplification_normal(stencil_symbol(laplacian_5point()))
    forced = step_bound(lap, exact=False)
    assert not forced.exact and float(forced) == pytest.approx(1 / 32, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_step_bound_is_sharp_on_a_grid_and_matches_operator_bounds(seed):
    """Random symmetric integer stencil: ``|g| ≤ 1`` at the bound, ``> 1`` just above it (on a grid containing
    the extreme frequency), and the same number as ``ConvOperator.step_bound``/``operators.stability``."""
    rng = np.random.default_rng(seed)
    a, b, c = (int(v) for v in rng.integers(1, 4, size=3))
    w = [[0, b, 0], [a, -(2 * a + 2 * b + c), a], [0, b, 0]]
    s = stencil_symbol(w)
    g = euler_amplification_normal(s)
    bound = step_bound(g)
    assert bound.exact
    grid = (8, 8)  # contains θ = (π, π), where |ŝ| is largest for this stencil
    values = lambda step: np.abs(symbol_on_grid(g.subs(h, step), grid).numpy())
    assert values(bound.value).max() <= 1 + 1e-12
    assert values(float(bound.value) * 1.001).max() > 1
    op = dense_stencil(w)
    for scheme in ("parabolic", "diffusion-explicit"):
        assert op.step_bound(scheme, grid) == pytest.approx(float(bound.value), rel=1e-12)
    heat = step_bound(euler_amplification_linear(s))
    eigenvalues = symbol_on_grid(s, grid)
    assert stability.max_stable_step("euler", eigenvalues) == pytest.approx(float(heat.value), rel=1e-12)


def test_lambdify_backends_and_broadcasting():
    s = stencil_symbol(laplacian_5point())
    t = torch.linspace(0, math.pi, 5, dtype=torch.float64)
    out = lambdify_symbol(s, "torch")(t, torch.zeros_like(t))
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out.real, 2 * torch.cos(t) - 2)
    const = lambdify_symbol(sp.Integer(3), "numpy", args=(theta1, theta2))(np.zeros((2, 3)), np.zeros((2, 3)))
    assert const.shape == (2, 3) and np.all(const == 3)
    tconst = lambdify_symbol(sp.Integer(3), "torch", args=(theta1, theta2))(torch.zeros(4), torch.zeros(4))
    assert tconst.shape == (4,)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="odd k"):
        stencil_symbol([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="odd k"):
        stencil_symbol([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match="pattern"):
        stencil_weights("star")
    with pytest.raises(ValueError, match="backend"):
        lambdify_symbol(theta1, "jax")
    with pytest.raises(ValueError, match="free symbols"):
        step_bound(euler_amplification_linear(stencil_symbol(stencil_weights("cross"))))
    with pytest.raises(ValueError, match="forward-Euler"):
        step_bound(1 / (1 + h * (2 - 2 * sp.cos(theta1))))   # implicit: not affine in h
    with pytest.raises(ValueError, match="free symbols"):
        lambdify_symbol(theta1 + sp.Symbol("a"), args=(theta1, theta2))
