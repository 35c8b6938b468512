"""Every operator kind: exact adjoint, the action it claims (against independent references), symbol, counts."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cases import BOUNDARIES, CASES, build, channels
from operators import CirculantConv, GroupedConv, channel_shuffle, dottest
from operators.functional import conv_same

GRIDS = [(7, 7), (8, 6), (5, 9)]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("case", CASES)
def test_dot_test(case, boundary, grid):
    for seed in range(2):
        op = build(case, boundary, seed)
        assert dottest(op, grid, batch=2, seed=seed) < 1e-10


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("case", CASES)
def test_equivalent_dense_weight_reproduces_forward_and_adjoint(case, boundary):
    op = build(case, boundary, seed=1)
    w = op.equivalent_dense_weight()
    assert w.shape == (op.out_channels, op.in_channels, op.kernel_size, op.kernel_size)
    x = torch.randn(2, op.in_channels, 6, 5, dtype=torch.float64)
    y = torch.randn(2, op.out_channels, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(op(x), conv_same(x, w, boundary), rtol=1e-12, atol=1e-12)
    # the adjoint of a convolution: flipped kernel, channels swapped; checked against autograd's transpose
    xr = x.clone().requires_grad_()
    (conv_same(xr, w, boundary) * y).sum().backward()
    torch.testing.assert_close(op.adjoint(y), xr.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_zero_boundary_stands_in_for_conv2d(case):
    op = build(case, "zeros", seed=2, dtype=torch.float32)
    k = op.kernel_size
    x = torch.randn(3, op.in_channels, 9, 7, requires_grad=True)
    out = op(x)
    assert out.shape == (3, op.out_channels, 9, 7)
    ref = F.conv2d(x, op.equivalent_dense_weight().detach(), padding=k // 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in op.parameters())


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("case", CASES)
def test_gradcheck(case, boundary):
    op = build(case, boundary, seed=3)
    x = torch.randn(1, op.in_channels, 3, 4, dtype=torch.float64, requires_grad=True)
    params = list(op.parameters())
    names = [n for n, _ in op.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(op, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


@pytest.mark.parametrize("case", CASES)
def test_parameter_counts(case):
    for seed in range(3):
        op = build(case, seed=seed)
        c_in, c_out = channels(case, seed)
        expected = case[4](c_in, c_out, op.kernel_size)
        assert op.num_parameters() == expected == sum(p.numel() for p in op.parameters())


@pytest.mark.parametrize("case", CASES)
def test_symbol_maps_plane_waves(case):
    """On a periodic grid ``K (v e^{iω·n}) = (K̂(ω) v) e^{iω·n}``, checked through the dense matrix."""
    n1, n2 = 5, 4
    op = build(case, "circular", seed=4)
    matrix = op.to_matrix((n1, n2)).to(torch.complex128)
    sym = op.symbol((n1, n2))
    assert sym.shape == (n1, n2, op.out_channels, op.in_channels)
    a = torch.arange(n1, dtype=torch.float64)[:, None]
    b = torch.arange(n2, dtype=torch.float64)[None, :]
    for m1 in range(n1):
        for m2 in range(n2):
            wave = torch.exp(2j * math.pi * (m1 * a / n1 + m2 * b / n2))
            v = torch.randn(op.in_channels, dtype=torch.complex128)
            out = (matrix @ (v[:, None, None] * wave).reshape(-1)).reshape(op.out_channels, n1, n2)
            torch.testing.assert_close(out, (sym[m1, m2] @ v)[:, None, None] * wave, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_circulant_matches_its_definition(boundary):
    """``(K x)_o = Σ_j W_{(o−j) mod c} ⋆ x_j``, one single-channel convolution per term."""
    c = 5
    x = torch.randn(2, c, 6, 7, dtype=torch.float64)
    for method in ("direct", "fft"):
        torch.manual_seed(0)
        op = CirculantConv(c, c, boundary=boundary, method=method).double()
        w = op.weight.detach()
        ref = torch.stack([
            sum(conv_same(x[:, j:j + 1], w[(o - j) % c][None, None], boundary)[:, 0] for j in range(c))
            for o in range(c)], dim=1)
        torch.testing.assert_close(op(x), ref, rtol=1e-12, atol=1e-12)


def test_grouped_conv_is_conv2d_with_groups_then_shuffle():
    torch.manual_seed(0)
    op = GroupedConv(6, 9, groups=3, shuffle=True).double()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    y = F.conv2d(x, op.weight, padding=1, groups=3)
    perm = [i * 3 + j for j in range(3) for i in range(3)]  # output j·g + i <- channel i·(c/g) + j
    torch.testing.assert_close(op(x), y[:, perm])
    torch.testing.assert_close(channel_shuffle(channel_shuffle(y, 3), 3), y)  # c/g = g = 3 here: an involution


def test_channel_shuffle_inverse():
    y = torch.arange(2 * 12 * 2 * 2, dtype=torch.float64).reshape(2, 12, 2, 2)
    torch.testing.assert_close(channel_shuffle(channel_shuffle(y, 3), 4), y)
    assert channel_shuffle(y, 3)[0, :, 0, 0].tolist() == [y[0, i * 4 + j, 0, 0].item() for j in range(4) for i in range(3)]
