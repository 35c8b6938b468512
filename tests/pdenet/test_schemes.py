"""Runge–Kutta and antisymmetric blocks: each step is R(hJ) on a linear problem, the order of convergence is
measured, the step bounds are the closed forms and tight, the antisymmetric spectrum matches its dense matrix."""
import math

import numpy as np
import pytest
import torch

from operators.stability import get_scheme
from pdenet.blocks import build_block

DT = torch.float64
GRID = (5, 4)


def _linear_block(scheme, c=3, h=0.3, **kwargs):
    """A block whose layer is linear (identity activation, no bias): one step is a polynomial of its Jacobian."""
    torch.manual_seed(0)
    return build_block(scheme, c, nt=1, h=h, operator="dense", activation="identity", bias=False,
                       operator_kwargs={"boundary": "circular"}, **kwargs).to(DT)


def _jacobian_matrix(block, grid=GRID):
    """The dense matrix J of the step's layer F (linear here) on ``grid``, columns F(e_i)."""
    n = block.channels * grid[0] * grid[1]
    eye = torch.eye(n, dtype=DT).reshape(n, block.channels, *grid)
    with torch.no_grad():
        return block.weights(0)(eye).reshape(n, n).T


def _matrix_polynomial(R_coefficients, M):
    out = torch.zeros_like(M)
    for c in reversed(R_coefficients):
        out = out @ M + c * torch.eye(M.shape[0], dtype=M.dtype)
    return out


@pytest.mark.parametrize("scheme, layer, coefficients", [
    ("rk2", "symmetric", [1, 1, 1 / 2]),
    ("rk4", "symmetric", [1, 1, 1 / 2, 1 / 6, 1 / 24]),
    ("rk2", "general", [1, 1, 1 / 2]),
    ("rk4", "general", [1, 1, 1 / 2, 1 / 6, 1 / 24]),
])
def test_runge_kutta_step_is_its_stability_function_of_the_jacobian(scheme, layer, coefficients):
    """On a linear F(Y) = J Y one step is R(hJ) Y, and R is the contract's stability function: at each
    eigenvalue λ of J the step's eigenvalue is R(hλ)."""
    block = _linear_block(scheme, h=0.3, layer=layer)
    h = float(block.h)  # exp(log h) in float64
    J = _jacobian_matrix(block)
    step = _matrix_polynomial(coefficients, h * J)
    y = torch.randn(2, 3, *GRID, dtype=DT)
    with torch.no_grad():
        out = block(y).reshape(2, -1)
    torch.testing.assert_close(out, y.reshape(2, -1) @ step.T, rtol=1e-12, atol=1e-12)
    lam = torch.linalg.eigvals(J).numpy()
    mu = torch.linalg.eigvals(step).numpy()
    R = get_scheme(scheme).amplification(h * lam)
    np.testing.assert_allclose(np.sort_complex(np.round(R, 9)), np.sort_complex(np.round(mu, 9)), atol=1e-8)


def test_antisymmetric_spectrum_against_its_dense_matrix():
    """(K − Kᵀ − γI) from the operator's dense matrix has eigenvalues −γ + iμ, |μ| ≤ ‖K − Kᵀ‖ (equality on a
    periodic grid); the layer's Jacobian (identity activation) is that matrix; the bound 2γ/(γ² + ‖K − Kᵀ‖²) is
    exact: ‖I + h(A − γI)‖ (a normal matrix) is at most 1 just below it and above 1 just above."""
    gamma = 0.4
    block = _linear_block("antisymmetric", c=4, gamma=gamma)
    layer = block.weights(0)
    K = layer.op.to_matrix(GRID)
    M = K - K.T - gamma * torch.eye(K.shape[0], dtype=DT)
    torch.testing.assert_close(_jacobian_matrix(block), M, rtol=1e-12, atol=1e-12)
    lam = torch.linalg.eigvals(M)
    torch.testing.assert_close(lam.real, torch.full_like(lam.real, -gamma), rtol=0, atol=1e-12)
    norm_a = layer.antisymmetric_operator().spectral_norm(GRID)
    torch.testing.assert_close(float(lam.imag.abs().max()), norm_a, rtol=1e-10, atol=0)
    torch.testing.assert_close(float(torch.linalg.matrix_norm(K - K.T, ord=2)), norm_a, rtol=1e-10, atol=0)
    bound = block.step_bound(GRID)
    assert bound == pytest.approx(2 * gamma / (gamma ** 2 + norm_a ** 2), rel=1e-9)
    eye = torch.eye(M.shape[0], dtype=DT)
    assert float(torch.linalg.matrix_norm(eye + 0.99 * bound * M, ord=2)) <= 1 + 1e-12
    assert float(torch.linalg.matrix_norm(eye + 1.01 * bound * M, ord=2)) > 1 + 1e-6
    assert any("‖K − Kᵀ‖" in a for a in block.stability(GRID).assumptions)


@pytest.mark.parametrize("kind", ["dense", "lean", "grouped", "separable", "depthwise", "pointwise", "circulant"])
def test_antisymmetric_part_is_exact_for_every_kind(kind):
    """K − Kᵀ built from the equivalent dense kernel equals the operator's forward minus its exact adjoint, for
    both boundaries (the analysis copy is right for every kind)."""
    kwargs = {"groups": 2} if kind == "grouped" else {}
    for boundary in ("zeros", "circular"):
        torch.manual_seed(1)
        block = build_block("antisymmetric", 4, nt=1, operator=kind,
                            operator_kwargs={"boundary": boundary, **kwargs}).to(DT)
        layer = block.weights(0)
        y = torch.randn(2, 4, 6, 5, dtype=DT)
        with torch.no_grad():
            torch.testing.assert_close(layer.antisymmetric_operator()(y), layer.op(y) - layer.op.adjoint(y))
        assert 0 < block.step_bound((6, 5)) < math.inf


def test_antisymmetric_layer_rejects_bad_input():
    with pytest.raises(ValueError, match="gamma must be"):
        build_block("antisymmetric", 2, operator="dense", gamma=-1.0)
    with pytest.raises(ValueError, match="square operator"):
        from operators import DenseConv
        from pdenet.layers import AntisymmetricLayer

        AntisymmetricLayer(DenseConv(2, 3))
    assert build_block("antisymmetric", 2, operator="dense", gamma=0.0).step_bound((4, 4)) == 0.0


@pytest.mark.parametrize("scheme", ["rk2", "rk4"])
def test_runge_kutta_symmetric_bound_is_the_closed_form_and_tight(scheme):
    """h ≤ |a|/‖K‖² (a = −2 for RK2, −2.785... for RK4) on a periodic grid: the top singular direction of K is an
    eigenvector of −KᵀK with eigenvalue −‖K‖², amplified by |R(−h‖K‖²)|, ≤ 1 below the bound, > 1 above."""
    block = _linear_block(scheme, h=1.0)
    norm = block.weights(0).op.spectral_norm(GRID)
    a = get_scheme(scheme).real_interval[0]
    bound = block.step_bound(GRID)
    assert bound == pytest.approx(-a / norm ** 2, rel=1e-12)
    m = block.weights(0).op.to_matrix(GRID)
    v = torch.linalg.svd(m)[2][0].reshape(1, 3, *GRID)
    for factor, grows in ((0.99, False), (1.01, True)):
        block.set_h(factor * bound)
        with torch.no_grad():
            ratio = float(block(v).norm() / v.norm())
        assert (ratio > 1 + 1e-4) == grows, (factor, ratio)
    assert block.stability(GRID).assumptions[0].startswith("Jacobian −KᵀDK")


def test_runge_kutta_general_layer_bound_from_eigenvalues():
    block = _linear_block("rk4", h=1.0, layer="general")
    J = _jacobian_matrix(block)
    bound = block.step_bound(GRID)
    lam = torch.linalg.eigvals(J).numpy()
    assert np.all(np.abs(get_scheme("rk4").amplification(0.999 * bound * lam)) <= 1 + 1e-9) or bound == 0
    assert np.any(np.abs(get_scheme("rk4").amplification(1.05 * bound * lam)) > 1) or bound == 0
    with pytest.raises(ValueError, match="unknown layer 'skew'"):
        build_block("rk2", 2, layer="skew")
    with pytest.raises(ValueError, match="needs a step bound"):
        build_block("rk4", 2, layer="general", stabilize="rescale-h")


def _convergence_errors(scheme, steps, final_time=1.0):
    """Errors at ``T = final_time`` of ``scheme`` with ``nt`` steps of ``T/nt`` (shared weights: an autonomous ODE),
    against RK4 with 1024 steps."""
    def run(name, nt):
        torch.manual_seed(3)
        block = build_block(name, 3, nt=nt, h=final_time / nt, operator="dense", activation="tanh",
                            shared_weights=True, **({"layer": "general"} if name in ("rk2", "rk4") else {})).to(DT)
        block.set_h(final_time / nt)  # log h in float64: T exact to rounding
        return block

    reference_block = run("rk4", 1024)
    y = torch.randn(2, 3, 6, 6, dtype=DT, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = reference_block(y)
        errors = []
        for nt in steps:
            block = run(scheme, nt)
            block.steps.load_state_dict(reference_block.steps.state_dict())
            errors.append(float((block(y) - reference).norm() / reference.norm()))
    return np.array(errors)


@pytest.mark.parametrize("scheme, order", [("euler", 1), ("rk2", 2), ("rk4", 4)])
def test_measured_order_of_convergence(scheme, order):
    """Halving h divides the error at a fixed final time by about 2^order (slope of log error vs log h)."""
    steps = [4, 8, 16, 32] if order < 4 else [4, 8, 16]
    errors = _convergence_errors(scheme, steps)
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.3, (errors, slope)


@pytest.mark.parametrize("start, order", [("rest", 1), ("taylor", 2)])
def test_leapfrog_order_depends_on_its_start(start, order):
    """Y'' = F(Y), Y'(0) = 0 at T = 1: the Taylor start gives second order, the rest start (Y₋₁ = Y₀) first."""
    def run(nt):
        torch.manual_seed(3)
        block = build_block("leapfrog", 3, nt=nt, operator="dense", activation="tanh", shared_weights=True,
                            start=start).to(DT)
        block.set_h(1.0 / nt)
        return block

    y = torch.randn(1, 3, 6, 6, dtype=DT, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = run(2048)(y)
        steps = [8, 16, 32, 64]
        errors = [float((run(nt)(y) - reference).norm() / reference.norm()) for nt in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.3, (errors, slope)
    with pytest.raises(ValueError, match="unknown start 'cold'"):
        build_block("leapfrog", 2, start="cold")


# ------------------------------------------------------------------------------------------ implicit θ-method
@pytest.mark.parametrize("theta", [1.0, 0.5, 0.7])
def test_theta_step_is_its_stability_function_of_the_jacobian(theta):
    """On F(Y) = −KᵀK Y one step is (I − hθA)^{-1}(I + h(1 − θ)A), A = −KᵀK; its eigenvalues are R(hλ)."""
    block = _linear_block("theta", h=2.0, theta=theta, tol=1e-12)
    h = float(block.h)
    A = _jacobian_matrix(block)
    eye = torch.eye(A.shape[0], dtype=DT)
    step = torch.linalg.solve(eye - h * theta * A, eye + h * (1 - theta) * A)
    y = torch.randn(2, 3, *GRID, dtype=DT)
    with torch.no_grad():
        out = block(y).reshape(2, -1)
    torch.testing.assert_close(out, y.reshape(2, -1) @ step.T, rtol=1e-9, atol=1e-10)
    lam = torch.linalg.eigvalsh(A).numpy()
    expected = np.sort(get_scheme(block.contract).amplification(h * lam).real)
    np.testing.assert_allclose(np.sort(torch.linalg.eigvals(step).real.numpy()), expected, atol=1e-9)
    record = block.solver_log[0]
    assert record["newton"] >= 1 and record["cg"] >= 1 and record["residual"] <= 1e-12


@pytest.mark.parametrize("theta", [1.0, 0.5])
def test_theta_block_gradcheck(theta):
    """Gradients by the implicit function theorem (one adjoint solve per step) against finite differences, in
    float64, for the input, an operator weight, a bias and the step size, at a step 5x past the explicit bound."""
    torch.manual_seed(1)
    block = build_block("theta", 2, nt=2, h=1.0, operator="dense", activation="tanh", theta=theta, tol=1e-11,
                        learn_h=True).to(DT)
    block.set_h(5 * block.steps[0].op.step_bound("parabolic", (4, 4)))
    y = torch.randn(2, 2, 4, 4, dtype=DT, requires_grad=True)
    names = ["steps.0.op.weight", "steps.1.bias", "log_h"]
    params = dict(block.named_parameters())

    def run(y, *values):
        return torch.func.functional_call(block, {**params, **dict(zip(names, values))}, (y,))

    values = tuple(params[n].detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(run, (y, *values), atol=1e-7, rtol=1e-6)
    assert block.adjoint_log and all(r["cg"] >= 1 for r in block.adjoint_log)


def test_implicit_step_past_the_explicit_bound_stays_stable():
    """At 20x the forward Euler bound, backward Euler (ReLU layer: B-stable, F is monotone) and Crank–Nicolson
    (linear layer: A-stable; on a nonlinear one the trapezoidal rule can expand) stay non-expansive over 20 steps
    where forward Euler (the parabolic block, same weights) blows up; the report reads every h as stable."""
    torch.manual_seed(2)
    grid = (6, 6)
    y = torch.randn(3, 3, *grid, dtype=DT)
    z = y + 1e-2 * torch.randn(3, 3, *grid, dtype=DT)
    explicit = build_block("parabolic", 3, nt=20, operator="dense", operator_kwargs={"boundary": "circular"},
                           shared_weights=True).to(DT)
    h = 20 * explicit.step_bound(grid)
    explicit.set_h(h)
    with torch.no_grad():
        assert float((explicit(y) - explicit(z)).norm() / (y - z).norm()) > 1e3
    for theta, activation in ((1.0, "relu"), (0.5, "identity")):
        block = build_block("theta", 3, nt=20, theta=theta, operator="dense", shared_weights=True,
                            activation=activation, operator_kwargs={"boundary": "circular"}).to(DT)
        block.steps.load_state_dict(explicit.steps.state_dict())
        block.set_h(h)
        with torch.no_grad():
            assert float((block(y) - block(z)).norm() / (y - z).norm()) <= 1 + 1e-6
        assert block.step_bound(grid) == math.inf
        assert "A-stable" in " ".join(block.stability(grid).assumptions)


def test_theta_block_rejects_bad_options():
    with pytest.raises(ValueError, match="needs normalization='none'"):
        build_block("theta", 2, normalization="batch")
    with pytest.raises(ValueError, match="theta must be"):
        build_block("theta", 2, theta=2.0)
    with pytest.raises(ValueError, match="tol must be"):
        build_block("theta", 2, tol=0.0)
