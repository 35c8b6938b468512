"""operators.stability: stability functions, regions, the generic step helper, and the bounds on real operators."""
import math

import numpy as np
import pytest
import torch

from operators import DenseConv
from operators.stability import (
    SCHEMES, Scheme, get_scheme, in_stability_region, max_stable_step, region_reach, register_scheme,
    stability_function, step_bound, taylor_polynomial, theta_scheme,
)

NAMES = ["euler", "parabolic", "leapfrog", "hamiltonian", "diffusion-explicit", "diffusion-implicit",
         "implicit-euler", "crank-nicolson", "rk2", "rk4"]


def test_all_schemes_registered_and_unknown_names_rejected():
    assert set(NAMES) <= set(SCHEMES)
    with pytest.raises(ValueError, match="unknown scheme 'rk5'.*parabolic"):
        get_scheme("rk5")
    for fn in (stability_function, lambda s: max_stable_step(s, [-1.0]), lambda s: step_bound(s, 1.0),
               lambda s: region_reach(s), lambda s: in_stability_region(s, 0.5)):
        with pytest.raises(ValueError, match="known schemes"):
            fn("nope")
    with pytest.raises(TypeError, match="scheme"):
        get_scheme(3)


def test_stability_functions_values_numpy_and_torch():
    z = np.array([-1.0, -0.5 + 0.5j, 0.2, -3.0])
    np.testing.assert_allclose(stability_function("euler")(z), 1 + z)
    np.testing.assert_allclose(stability_function("implicit-euler")(z), 1 / (1 - z))
    xi = stability_function("leapfrog")(z)
    np.testing.assert_allclose(xi ** 2 - (2 + z) * xi + 1, 0, atol=1e-12)            # a root ...
    np.testing.assert_allclose(np.abs(xi), np.maximum(np.abs(xi), np.abs(1 / xi)))   # ... the dominant one
    for name in SCHEMES:
        r_np = stability_function(name)(z)
        r_t = stability_function(name)(torch.as_tensor(z))
        assert isinstance(r_t, torch.Tensor) and r_t.is_complex()
        np.testing.assert_allclose(r_t.numpy(), r_np, atol=1e-14)
    assert in_stability_region("euler", -1.0) is True and in_stability_region("euler", 0.1) is False
    assert in_stability_region("implicit-euler", 1.0) is False           # the pole
    assert in_stability_region("diffusion-implicit", -1e6) is True
    assert in_stability_region("leapfrog", -3.99) and not in_stability_region("leapfrog", -4.01)
    assert not in_stability_region("leapfrog", -2 + 0.01j)              # off the segment: one root outside


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_real_interval_agrees_with_the_stability_function(name):
    """Brute force on the real axis: the stable part containing 0 is exactly ``real_interval``."""
    s = get_scheme(name)
    a, b = s.real_interval
    z = np.linspace(-10, 10, 20001)
    inside = in_stability_region(name, z)
    component = (z >= a) & (z <= b)
    assert np.all(inside[component])
    # the first unstable points on each side of 0 are where the interval ends
    left = z[(z < 0) & ~inside]
    assert (left.max() if left.size else -math.inf) == pytest.approx(a, abs=2e-3) or (a == -math.inf and left.size == 0)
    right = z[(z > 0) & ~inside]
    assert right.min() == pytest.approx(b, abs=2e-3)


def test_max_stable_step_closed_forms_on_real_spectra():
    lam = -np.array([0.3, 2.0, 5.0, 0.0])
    assert max_stable_step("euler", lam) == pytest.approx(2 / 5, rel=1e-15)
    assert max_stable_step("parabolic", torch.as_tensor(lam)) == pytest.approx(2 / 5, rel=1e-15)
    assert max_stable_step("leapfrog", lam) == pytest.approx(2 / math.sqrt(5), rel=1e-15)
    assert max_stable_step("diffusion-implicit", lam) == math.inf
    assert max_stable_step("euler", [0.0, 0.0]) == math.inf
    assert max_stable_step("euler", [-1.0, 0.5]) == 0.0                 # a growing mode
    assert max_stable_step("implicit-euler", [-1.0, 0.5]) == 0.0        # small steps follow the growth
    # eigensolver noise in the imaginary part is treated as real
    assert max_stable_step("leapfrog", [-4.0 + 1e-14j]) == pytest.approx(1.0, rel=1e-14)


def test_max_stable_step_complex_spectra_against_closed_forms():
    rng = np.random.default_rng(0)
    lam = -rng.uniform(0.1, 3, 50) + 1j * rng.uniform(-3, 3, 50)
    # forward Euler: |1 + h λ|² ≤ 1  ⟺  h ≤ −2 Re λ / |λ|²
    assert max_stable_step("euler", lam) == pytest.approx(np.min(-2 * lam.real / np.abs(lam) ** 2), rel=1e-9)
    assert max_stable_step("euler", lam.astype(np.complex64)) == pytest.approx(
        np.min(-2 * lam.real.astype(np.float32) / np.abs(lam.astype(np.complex64)) ** 2), rel=1e-5)
    assert max_stable_step("implicit-euler", lam) == math.inf           # A-stable
    assert max_stable_step("implicit-euler", np.append(lam, 0.5 + 1j)) == 0.0
    assert max_stable_step("leapfrog", lam) == 0.0                      # complex λ: one root outside
    assert max_stable_step("euler", [1j]) == 0.0                        # pure oscillation: Euler always grows


@pytest.mark.parametrize("name, spectrum", [
    ("euler", "complex"), ("parabolic", "real"), ("leapfrog", "real"), ("hamiltonian", "real"),
    ("diffusion-explicit", "real"), ("euler", "real"),
])
def test_max_stable_step_against_brute_force_scan(name, spectrum):
    """Every ``h`` in ``(0, h*]`` keeps all ``h^m λ`` in the region; a step 0.1% larger does not."""
    rng = np.random.default_rng(7)
    lam = -rng.uniform(0.05, 4, 40)
    if spectrum == "complex":
        lam = lam + 1j * rng.uniform(-2, 2, 40)
    m = get_scheme(name).derivative_order
    best = max_stable_step(name, lam)
    assert 0 < best < math.inf
    steps = np.linspace(0, best, 400)[1:-1]
    assert np.all(in_stability_region(name, (steps[:, None] ** m) * lam[None, :], tol=1e-9))
    # at the bound itself leapfrog has a double root −1, computed only to ~sqrt(machine eps)
    assert np.all(in_stability_region(name, best ** m * lam, tol=1e-6))
    assert not np.all(in_stability_region(name, (1.001 * best) ** m * lam))


def test_step_bound_closed_forms():
    n = 3.0
    assert step_bound("parabolic", n) == pytest.approx(2 / n ** 2, rel=1e-15)
    assert step_bound("diffusion-explicit", n) == pytest.approx(2 / n ** 2, rel=1e-15)
    assert step_bound("leapfrog", n) == pytest.approx(2 / n, rel=1e-15)
    assert step_bound("hamiltonian", n) == pytest.approx(2 / n, rel=1e-15)
    assert step_bound("diffusion-implicit", n) == math.inf
    assert step_bound("implicit-euler", n) == math.inf
    assert step_bound("parabolic", 0.0) == math.inf
    assert step_bound("parabolic", torch.tensor(2.0)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="euler.*max_stable_step"):
        step_bound("euler", n)
    with pytest.raises(ValueError, match="non-negative"):
        step_bound("parabolic", -1.0)
    with pytest.raises(TypeError, match="norm"):
        step_bound("parabolic", "big")
    with pytest.raises(ValueError, match="empty"):
        max_stable_step("euler", [])
    with pytest.raises(ValueError, match="nan"):
        max_stable_step("euler", [float("nan")])
    with pytest.raises(ValueError, match="directions must be"):
        region_reach("euler", 1)


def _random_op(boundary, c=3, seed=0):
    torch.manual_seed(seed)
    return DenseConv(c, c, boundary=boundary).double()


@pytest.mark.parametrize("boundary", ["circular", "zeros"])
def test_parabolic_euler_step_is_non_expansive_below_the_bound_and_grows_above(boundary):
    """``y ← y − h K^T K y``: at ``0.99·bound`` no random vector grows over 30 steps; at ``3·bound`` they blow up."""
    op = _random_op(boundary)
    grid = (8, 8)
    bound = op.step_bound("parabolic", grid)
    assert bound == pytest.approx(2 / op.spectral_norm(grid) ** 2, rel=1e-14)

    def run(step, y, steps=30):
        ratios = []
        with torch.no_grad():
            for _ in range(steps):
                new = y - step * op.adjoint(op(y))
                ratios.append(float(new.norm() / y.norm()))
                y = new
        return ratios

    gen = torch.Generator().manual_seed(1)
    y = torch.randn(6, 3, *grid, generator=gen, dtype=torch.float64)
    assert max(run(0.99 * bound, y)) <= 1 + 1e-12
    # the exact matrix norm of one step agrees: ‖I − h K^T K‖₂ ≤ 1
    K = op.to_matrix(grid)
    step = torch.eye(K.shape[1], dtype=K.dtype) - 0.99 * bound * K.T @ K
    assert float(torch.linalg.matrix_norm(step, ord=2)) <= 1 + 1e-12
    growth = run(3 * bound, y)
    assert math.prod(growth) > 1e6


def test_leapfrog_and_verlet_bounds_on_a_real_operator():
    """Leapfrog ``y_{j+1} = 2y_j − y_{j−1} − h² K^T K y_j`` stays bounded at ``0.99·2/‖K‖`` and blows up at
    ``1.2·2/‖K‖``; Verlet with the pair ``(K, K)`` has the bound ``2/‖K‖²`` and the same behaviour.
    (Iterated with the operators' dense matrices on a 6x6 grid, to keep 300 steps cheap.)"""
    op = _random_op("circular", seed=2)
    grid = (6, 6)
    gen = torch.Generator().manual_seed(3)
    y0 = torch.randn(op.in_channels * 36, 2, generator=gen, dtype=torch.float64)
    K = op.to_matrix(grid)
    N = K.T @ K

    def leapfrog(step, steps=300):
        prev, y, peak = y0, y0, 1.0
        for _ in range(steps):
            prev, y = y, 2 * y - prev - step ** 2 * N @ y
            peak = max(peak, float(y.norm() / y0.norm()))
        return peak

    def verlet(step, other, steps=300):
        y, z, peak = y0, torch.zeros_like(y0), 1.0
        M = other.T @ other
        for _ in range(steps):
            z = z - step * N @ y
            y = y + step * M @ z
            peak = max(peak, float(y.norm() / y0.norm()))
        return peak

    lf = op.step_bound("leapfrog", grid)
    assert lf == pytest.approx(2 / op.spectral_norm(grid), rel=1e-14)
    assert leapfrog(0.99 * lf) < 20 and leapfrog(1.2 * lf) > 1e6
    ham = op.step_bound("hamiltonian", grid)
    assert ham == pytest.approx(2 / op.spectral_norm(grid) ** 2, rel=1e-14)
    assert verlet(0.99 * ham, K) < 20 and verlet(1.2 * ham, K) > 1e6
    other = _random_op("circular", seed=4)
    pair = op.step_bound("hamiltonian", grid, other=other)
    assert pair == pytest.approx(2 / (op.spectral_norm(grid) * other.spectral_norm(grid)), rel=1e-14)
    assert verlet(0.99 * pair, other.to_matrix(grid)) < 50          # the product of norms is a safe (conservative) bound
    with pytest.raises(ValueError, match="hamiltonian"):
        op.step_bound("parabolic", grid, other=other)
    with pytest.raises(ValueError, match="max_stable_step"):
        op.step_bound("euler", grid)


def test_max_stable_step_on_an_operator_spectrum():
    """The generic helper on the exact spectrum of ``−K^T K`` gives the operator's closed-form bound."""
    op = _random_op("circular", seed=5)
    grid = (5, 6)
    eigenvalues = -op.singular_values(grid) ** 2
    assert max_stable_step("parabolic", eigenvalues) == pytest.approx(op.step_bound("parabolic", grid), rel=1e-12)
    assert max_stable_step("leapfrog", eigenvalues) == pytest.approx(op.step_bound("leapfrog", grid), rel=1e-12)


def test_runge_kutta_and_theta_contracts():
    """RK2/RK4 are Taylor polynomials of e^z; the RK4 interval ends at the real root of (R(x) − 1)/x, a cubic
    (−2.78529356...); θ ≥ ½ is A-stable, θ < ½ has the interval [−2/(1 − 2θ), 0]."""
    z = np.array([-1.5 + 0.3j, 0.2, -2.7])
    np.testing.assert_allclose(stability_function("rk2")(z), 1 + z + z ** 2 / 2)
    np.testing.assert_allclose(stability_function("rk4")(z), 1 + z + z ** 2 / 2 + z ** 3 / 6 + z ** 4 / 24)
    assert get_scheme("rk2").real_interval == (-2.0, 0.0)
    a = get_scheme("rk4").real_interval[0]
    roots = np.roots([1 / 24, 1 / 6, 1 / 2, 1])  # (R(x) − 1)/x = 1 + x/2 + x²/6 + x³/24
    assert a == pytest.approx(float(roots[np.abs(roots.imag) < 1e-12].real[0]), rel=1e-12)
    assert step_bound("rk4", 2.0) == pytest.approx(2.785293563405282 / 4, rel=1e-12)
    assert step_bound("rk2", 2.0) == pytest.approx(0.5, rel=1e-15)
    # RK4 contains a piece of the imaginary axis (|z| < 2√2), forward Euler and RK2 none
    assert in_stability_region("rk4", 2.8j) and not in_stability_region("rk4", 2.9j)
    assert not in_stability_region("rk2", 0.1j)
    np.testing.assert_allclose(stability_function("crank-nicolson")(z), (1 + z / 2) / (1 - z / 2))
    assert theta_scheme(1.0) is get_scheme("implicit-euler") and theta_scheme(0.5) is get_scheme("crank-nicolson")
    lam = -np.random.default_rng(0).uniform(0.1, 9, 30) + 1j * np.random.default_rng(1).uniform(-9, 9, 30)
    for theta in (0.5, 0.7, 1.0):
        assert max_stable_step(theta_scheme(theta), lam) == math.inf
    assert theta_scheme(0.25).real_interval == (-4.0, 0.0) and theta_scheme(0.25) is get_scheme("theta-0.25")
    assert max_stable_step("theta-0.25", [-2.0]) == pytest.approx(2.0)
    np.testing.assert_allclose(stability_function("theta-0.25")(z), (1 + 0.75 * z) / (1 - 0.25 * z))
    with pytest.raises(ValueError, match="theta must be"):
        theta_scheme(1.5)
    with pytest.raises(ValueError, match="stages must be"):
        taylor_polynomial(0)


def test_user_contracts_are_checked_and_registered_once():
    heun = Scheme("test-heun", "Heun", lambda z: 1 + z + z * z / 2)
    assert heun.real_interval == (-2.0, 0.0)            # computed from R along the real axis
    assert in_stability_region(heun, -1.0 + 0.5j)       # real inputs and Python numbers are made complex
    register_scheme(heun)
    try:
        assert get_scheme("test-heun") is heun
        with pytest.raises(ValueError, match="'test-heun' is already registered"):
            register_scheme(Scheme("test-heun", "again", lambda z: 1 + z))
    finally:
        del SCHEMES["test-heun"]
    with pytest.raises(TypeError, match="expects an operators.stability.Scheme"):
        register_scheme("rk4")
    with pytest.raises(ValueError, match=r"R\(0\) must be 1"):
        Scheme("bad", "inconsistent", lambda z: 2 + z)
    with pytest.raises(TypeError, match="stability_function must be callable"):
        Scheme("bad", "not callable", 3)
    with pytest.raises(ValueError, match="derivative_order"):
        Scheme("bad", "third order", lambda z: 1 + z, derivative_order=3)
