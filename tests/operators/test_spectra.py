"""Spectra against dense ground truth: singular values, exact and bounding norms, Lanczos, the fast paths."""
from __future__ import annotations


import pytest
import torch
from scipy.sparse.linalg import svds

from cases import CASES, build
from operators import CirculantConv, DenseConv, DepthwiseConv, GroupedConv
from operators.spectral import batched_lapack, gram_at, half_spectrum, max_hermitian_eigenvalue, tap_gram

PERIODIC_GRIDS = [(4, 4), (5, 6), (7, 8), (8, 8)]


def exact_norm(op, grid):
    return float(torch.linalg.matrix_norm(op.to_matrix(grid), ord=2))


@pytest.mark.parametrize("case", CASES)
def test_singular_values_match_dense_matrix(case):
    for seed, grid in enumerate(PERIODIC_GRIDS):
        op = build(case, "circular", seed)
        expected = torch.linalg.svdvals(op.to_matrix(grid))
        got = op.singular_values(grid)
        assert got.shape == expected.shape
        assert float((got - expected).abs().max() / expected[0]) < 1e-8
        assert abs(op.spectral_norm(grid) - float(expected[0])) < 1e-8 * float(expected[0])


@pytest.mark.parametrize("boundary", ["zeros", "circular"])
@pytest.mark.parametrize("case", CASES)
def test_power_norm_matches_svds(case, boundary):
    grid = (5, 6)
    op = build(case, boundary, seed=5)
    reference = svds(op.as_linear_operator(grid), k=1, return_singular_vectors=False, random_state=0)[0]
    got = op.spectral_norm(grid, method="power")
    assert abs(got - reference) < 1e-8 * reference
    assert abs(got - exact_norm(op, grid)) < 1e-8 * reference


def test_power_norm_converges_where_power_iteration_stalls():
    """Clustered top singular values (zero padding): Lanczos reaches 1e-10 where power iteration stalls."""
    torch.manual_seed(0)
    op = DenseConv(4, 4, boundary="zeros").double()
    for grid in [(8, 8), (3, 5)]:
        assert abs(op.spectral_norm(grid, method="power") - exact_norm(op, grid)) < 1e-10 * exact_norm(op, grid)


@pytest.mark.parametrize("case", CASES)
def test_zero_padding_symbol_bound(case):
    for seed, grid in enumerate([(4, 4), (5, 7), (8, 8)]):
        op = build(case, "zeros", seed)
        assert op.spectral_norm(grid) >= exact_norm(op, grid) * (1 - 1e-12)
    c = 6 if case[2] == 3 else 4
    op = build(case, "zeros", seed=7, c_in=c, c_out=c)
    exact = op.spectral_norm((32, 32), method="power", tol=1e-8)
    bound = op.spectral_norm((32, 32))
    assert exact * (1 - 1e-12) <= bound <= 1.10 * exact


@pytest.mark.parametrize("case", CASES)
def test_gridless_bound_covers_every_grid(case):
    op = build(case, "circular", seed=8)
    bound = op.spectral_norm()
    norms = [op.spectral_norm(g) for g in [(3, 3), (5, 8), (16, 16), (33, 31), (64, 64)]]
    assert max(norms) <= bound <= 1.01 * max(norms)


def test_circulant_spectrum_is_3d_dft():
    """Singular values of the circulant operator = |3-D DFT| of its weights embedded in c x n1 x n2."""
    c, n1, n2 = 6, 5, 8
    torch.manual_seed(0)
    for method in ("direct", "fft"):
        op = CirculantConv(c, c, boundary="circular", method=method).double()
        embedded = torch.zeros(c, n1, n2, dtype=torch.float64)
        embedded[:, :3, :3] = op.weight.detach()
        formula = torch.sort(torch.fft.fftn(embedded).abs().flatten(), descending=True).values
        torch.testing.assert_close(op.singular_values((n1, n2)), formula, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.linalg.svdvals(op.to_matrix((n1, n2))), formula, rtol=1e-10, atol=1e-12)
        assert op.spectral_norm((n1, n2)) == pytest.approx(float(formula[0]), rel=1e-12)


def test_depthwise_norm_is_largest_stencil_symbol():
    torch.manual_seed(0)
    op = DepthwiseConv(3, 3, boundary="circular").double()
    s_hat = torch.fft.fft2(torch.nn.functional.pad(op.weight.detach()[:, 0], (0, 5, 0, 5)))  # 8 x 8 grid
    assert op.spectral_norm((8, 8)) == pytest.approx(float(s_hat.abs().max()), rel=1e-12)


def test_grouped_norm_is_max_over_groups():
    torch.manual_seed(0)
    op = GroupedConv(6, 4, groups=2, shuffle=True, boundary="circular").double()
    norms = []
    for w in op.weight.detach().chunk(2):
        dense = DenseConv(3, 2, boundary="circular").double()
        dense.weight.data.copy_(w)
        norms.append(exact_norm(dense, (6, 6)))
    assert op.spectral_norm((6, 6)) == pytest.approx(max(norms), rel=1e-10)
    assert exact_norm(op, (6, 6)) == pytest.approx(max(norms), rel=1e-10)


def test_tap_gram_is_symbol_gram():
    torch.manual_seed(0)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    op = DenseConv(3, 5).double()
    op.weight.data.copy_(w)
    sym = op.symbol((6, 7))
    m1, m2, _ = half_spectrum(6, 7)
    torch.testing.assert_close(gram_at(tap_gram(w), m1, m2, 6, 7), (sym.mH @ sym)[m1, m2])


@pytest.mark.parametrize("n1,n2", [(1, 1), (4, 4), (5, 6), (7, 7), (6, 9)])
def test_half_spectrum_covers_grid(n1, n2):
    m1, m2, mult = half_spectrum(n1, n2)
    assert int(mult.sum()) == n1 * n2
    seen = {(a, b) for a, b in zip(m1.tolist(), m2.tolist())} | {((-a) % n1, (-b) % n2) for a, b in zip(m1.tolist(), m2.tolist())}
    assert seen == {(a, b) for a in range(n1) for b in range(n2)}


def test_pruned_maximum_is_exact_even_with_useless_estimates():
    """The Cholesky certificate, not the ranking, makes the result exact: worst estimates, constant symbols."""
    torch.manual_seed(1)
    grams = torch.randn(40, 12, 12, dtype=torch.complex128)
    grams = grams.mH @ grams
    truth = float(torch.linalg.eigvalsh(grams)[:, -1].max())
    for candidates, steps, budget in [(1, 0, 1 << 26), (1, 0, 3 * 144), (8, 3, 1 << 26)]:
        got = max_hermitian_eigenvalue(lambda idx: grams[idx], 40, 12, "cpu", budget=budget,
                                       candidates=candidates, power_steps=steps)
        assert got == pytest.approx(truth, rel=1e-13)
    op = DenseConv(5, 5, boundary="circular").double()
    op.weight.data.zero_()
    op.weight.data[:, :, 1, 1] = torch.randn(5, 5, dtype=torch.float64)  # the same K̂(ω) at every ω
    assert op.spectral_norm((6, 6)) == pytest.approx(exact_norm(op, (6, 6)), rel=1e-12)


def test_spectral_norm_float32_and_large_width():
    torch.manual_seed(0)
    op = DenseConv(48, 40, boundary="circular")
    ref = float(torch.linalg.svdvals(op.symbol((12, 12)).detach().to(torch.complex128)).max())
    assert op.spectral_norm((12, 12)) == pytest.approx(ref, rel=1e-5)


def test_batched_lapack_restores_threads_and_concatenates():
    threads = torch.get_num_threads()
    x = torch.randn(70, 4, 4, dtype=torch.float64)
    x = x @ x.mT
    torch.testing.assert_close(batched_lapack(torch.linalg.eigvalsh, x, batch=8), torch.linalg.eigvalsh(x))
    assert torch.get_num_threads() == threads
