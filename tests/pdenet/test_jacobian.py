"""Matrix-free Jacobian spectra against dense Jacobians, step spectra in the stability regions, growth."""
import numpy as np
import pytest
import torch

from pdenet.blocks import build_block
from pdenet.jacobian import jacobian_eigenvalues, jacobian_operator, perturbation_growth, step_spectra
from pdenet.plots import plot_eigenvalues, plot_growth, plot_singular_values

DT = torch.float64


def _block(scheme, activation="tanh", h=0.3, boundary="zeros", nt=2, seed=0):
    torch.manual_seed(seed)
    block = build_block(scheme, 2, nt=nt, h=h, operator="dense", activation=activation,
                        operator_kwargs={"boundary": boundary}).to(DT)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    return block


def _dense_jacobian(fn, x):
    return torch.autograd.functional.jacobian(fn, x).reshape(x.numel(), x.numel()).numpy()


@pytest.mark.parametrize("scheme", ["euler", "diffusion-reaction"])
def test_eigs_matches_the_dense_jacobian(scheme):
    block = _block(scheme)
    x = torch.randn(1, 2, 3, 4, dtype=DT)
    k = 5
    got = jacobian_eigenvalues(block, x, k=k)
    dense = np.linalg.eigvals(_dense_jacobian(block, x))
    dense = dense[np.argsort(-np.abs(dense))]
    assert np.allclose(np.abs(got), np.abs(dense[:k]), rtol=1e-8)
    for value in got:  # each eigenvalue (conjugate pairs included) is one of the dense ones
        assert np.min(np.abs(dense - value)) < 1e-8 * np.abs(dense[0])


def test_jacobian_operator_matvec_and_rmatvec_are_the_dense_jacobian():
    block = _block("euler")
    x = torch.randn(1, 2, 3, 3, dtype=DT)
    op = jacobian_operator(block, x)
    J = _dense_jacobian(block, x)
    v = np.random.default_rng(0).standard_normal(J.shape[1])
    assert np.allclose(op.matvec(v), J @ v, rtol=1e-10, atol=1e-12)
    assert np.allclose(op.rmatvec(v), J.T @ v, rtol=1e-10, atol=1e-12)


def test_eigs_rejects_too_many_eigenvalues():
    block = _block("parabolic")
    with pytest.raises(ValueError, match="k must satisfy"):
        jacobian_eigenvalues(block, torch.randn(1, 2, 2, 2, dtype=DT), k=7)
    with pytest.raises(ValueError, match="square"):
        jacobian_eigenvalues(lambda t: t.sum(dim=1), torch.randn(1, 2, 3, 3, dtype=DT), k=2)


def test_step_spectra_lie_in_the_region_below_the_bound_and_leave_it_above():
    grid = (4, 4)
    block = _block("parabolic", activation="identity", boundary="circular", nt=1)
    x = torch.randn(1, 2, *grid, dtype=DT)
    bound = block.step_bound(grid)
    block.set_h(0.95 * bound)
    (inside,) = step_spectra(block, x, k=4)
    assert inside.scheme == "parabolic" and inside.inside.all()
    assert np.abs(inside.z.imag).max() < 1e-8 and inside.z.real.max() <= 1e-10  # −h KᵀK: real, ≤ 0
    assert inside.z.real.min() == pytest.approx(-0.95 * 2, rel=1e-6)  # h‖K‖² = 0.95·2 exactly (periodic)
    block.set_h(1.05 * bound)
    (outside,) = step_spectra(block, x, k=4)
    assert not outside.inside.all()


@pytest.mark.parametrize("scheme", ["leapfrog", "hamiltonian"])
def test_second_order_schemes_use_h_squared_and_the_segment(scheme):
    block = _block(scheme, activation="identity", boundary="circular", nt=2)
    x = torch.randn(1, 2, 4, 4, dtype=DT)
    bound = block.step_bound((4, 4))
    block.set_h(0.9 * bound)
    spectra = step_spectra(block, x, k=4)
    last = spectra[-1]
    assert np.abs(last.z.imag).max() < 1e-8
    assert last.z.real.min() >= -4 and last.inside.all()
    block.set_h(3 * bound)  # (for Verlet the product of the norms over-estimates the spectrum)
    assert not all(s.inside.all() for s in step_spectra(block, x, k=4))


def test_perturbation_growth_adversarial_matches_the_largest_singular_value():
    block = _block("parabolic", activation="identity", boundary="circular", nt=3)
    x = torch.randn(1, 2, 4, 4, dtype=DT)
    growth = perturbation_growth(block, x, eps=1e-4)
    sigma = np.linalg.svd(_dense_jacobian(block, x), compute_uv=False)[0]
    assert growth.labels == ["ParabolicBlock[0]", "ParabolicBlock[1]", "ParabolicBlock[2]"]
    assert growth.sigma_max == pytest.approx(sigma, rel=1e-8)
    assert growth.adversarial[-1] == pytest.approx(sigma, rel=1e-6)  # linear block: exact growth
    assert growth.random[-1] <= growth.adversarial[-1] * (1 + 1e-9)
    block.set_h(0.99 * block.step_bound((4, 4)))
    stable = perturbation_growth(block, x)
    assert (stable.adversarial <= 1 + 1e-9).all() and (stable.random <= 1 + 1e-9).all()
    with pytest.raises(ValueError, match="no time-stepping block"):
        perturbation_growth(torch.nn.Identity(), x)


def test_plots_are_written(tmp_path):
    block = _block("leapfrog", nt=2)
    x = torch.randn(1, 2, 5, 5, dtype=DT)
    paths = [
        plot_eigenvalues(step_spectra(block, x, k=3), tmp_path / "eig.png"),
        plot_growth(perturbation_growth(block, x), tmp_path / "growth.png"),
        plot_singular_values(block, (2, 5, 5), tmp_path / "sv" / "sv.png"),
    ]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no spectra"):
        plot_eigenvalues([], tmp_path / "none.png")
