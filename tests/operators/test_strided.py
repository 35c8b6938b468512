"""Strided lean operators ``K_s = D_s K``: action, exact adjoint, gradients, polyphase symbol, norms, counts, errors."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from operators import LeanConv, count_flops, dottest, make_operator
from operators.base import polyphase_symbol

STENCILS = ("cross", "full", "none")
BOUNDARIES = ("zeros", "circular")
# (c_in, c_out, groups): square, grouped, both kinds of channel mismatch
CHANNELS = ((4, 4, 1), (4, 6, 2), (6, 3, 3), (3, 5, 1))
GRIDS = [(7, 6), (6, 4), (5, 9), (8, 8)]  # odd and even sizes


def make(c_in, c_out, groups=1, stencil="cross", boundary="zeros", stride=2, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return LeanConv(c_in, c_out, stencil=stencil, groups=groups, boundary=boundary, stride=stride).to(dtype)


def reference(op, x):
    """``nn.Conv2d``'s arithmetic with the equivalent dense kernel: stride ``s``, padding ``k // 2``."""
    r = op.kernel_size // 2
    w = op.equivalent_dense_weight()
    if op.boundary == "circular":
        return F.conv2d(F.pad(x, (r, r, r, r), mode="circular"), w, stride=op.stride)
    return F.conv2d(x, w, stride=op.stride, padding=r)


@pytest.mark.parametrize("stride", [2, 3])
@pytest.mark.parametrize("stencil,boundary,channels", itertools.product(STENCILS, BOUNDARIES, CHANNELS))
def test_forward_is_strided_conv2d_with_the_equivalent_kernel(stencil, boundary, channels, stride):
    c_in, c_out, groups = channels
    op = make(c_in, c_out, groups, stencil, boundary, stride)
    for n1, n2 in GRIDS:
        x = torch.randn(2, c_in, n1, n2, dtype=torch.float64)
        out = op(x)
        assert out.shape == (2, c_out, math.ceil(n1 / stride), math.ceil(n2 / stride)) == reference(op, x).shape
        assert op.output_grid(n1, n2) == tuple(out.shape[-2:])
        torch.testing.assert_close(out, reference(op, x), rtol=1e-12, atol=1e-12)
    # float32 and channels-last input take the same plain convolutions
    op32 = op.float()
    x = torch.randn(2, c_in, 9, 8).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(op32(x), reference(op32, x), rtol=1e-5, atol=1e-5)


def test_stride_one_is_the_same_size_operator():
    a, b = make(4, 6, stride=1), make(4, 6, stride=1)
    x = torch.randn(1, 4, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x))
    assert a.output_grid(7, 6) == (7, 6) and "stride" not in repr(a)
    assert "stride=2" in repr(make(4, 6))


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("stencil,boundary", itertools.product(STENCILS, BOUNDARIES))
def test_dot_test(stencil, boundary, grid):
    for (c_in, c_out, groups), stride in itertools.product(CHANNELS, (2, 3)):
        op = make(c_in, c_out, groups, stencil, boundary, stride)
        assert dottest(op, grid, batch=2, seed=stride) < 1e-12
    assert op.check_adjoint() < 1e-12


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("channels", CHANNELS)
def test_adjoint_is_the_transposed_convolution(boundary, channels):
    """``K_s^T y`` equals autograd's transpose of the strided convolution, and for zero padding
    ``F.conv_transpose2d`` with the output padding that recovers the input grid."""
    c_in, c_out, groups = channels
    op = make(c_in, c_out, groups, "full", boundary)
    for n1, n2 in GRIDS:
        x = torch.randn(2, c_in, n1, n2, dtype=torch.float64, requires_grad=True)
        y = torch.randn(2, c_out, *op.output_grid(n1, n2), dtype=torch.float64)
        (reference(op, x) * y).sum().backward()
        torch.testing.assert_close(op.adjoint(y, grid=(n1, n2)), x.grad, rtol=1e-12, atol=1e-12)
        if boundary == "zeros":
            m1, m2 = y.shape[-2:]
            pads = (n1 - 1 - 2 * (m1 - 1), n2 - 1 - 2 * (m2 - 1))
            t = F.conv_transpose2d(y, op.equivalent_dense_weight(), stride=2, padding=1, output_padding=pads)
            torch.testing.assert_close(op.adjoint(y, grid=(n1, n2)), t, rtol=1e-12, atol=1e-12)


def test_adjoint_grid_defaults_to_stride_times_the_output_and_is_checked():
    op = make(3, 4)
    y = torch.randn(1, 4, 3, 5, dtype=torch.float64)
    assert op.adjoint(y).shape == (1, 3, 6, 10)
    assert op.adjoint(y, grid=(5, 9)).shape == (1, 3, 5, 9)
    with pytest.raises(ValueError, match=r"input grid \(7, 9\) gives outputs of size \(4, 5\).*but y is \(3, 5\)"):
        op.adjoint(y, grid=(7, 9))
    with pytest.raises(ValueError, match="expects 4 channels"):
        op.adjoint(torch.randn(1, 3, 3, 5, dtype=torch.float64))


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_to_matrix_and_linear_operator(boundary):
    """The dense matrix is that of ``F.conv2d`` with the equivalent kernel; scipy's operator agrees both ways."""
    op = make(3, 4, 1, "full", boundary)
    grid = (5, 4)
    n = 3 * 5 * 4
    basis = torch.eye(n, dtype=torch.float64).reshape(n, 3, *grid)
    expected = reference(op, basis).reshape(n, -1).T
    matrix = op.to_matrix(grid)
    assert matrix.shape == (4 * 3 * 2, n)
    torch.testing.assert_close(matrix, expected, rtol=1e-12, atol=1e-12)
    linear = op.as_linear_operator(grid)
    assert linear.shape == tuple(matrix.shape)
    v, w = torch.randn(n, dtype=torch.float64), torch.randn(matrix.shape[0], dtype=torch.float64)
    torch.testing.assert_close(torch.from_numpy(linear.matvec(v.numpy())), matrix @ v)
    torch.testing.assert_close(torch.from_numpy(linear.rmatvec(w.numpy())), matrix.T @ w)


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("channels", [(2, 3, 1), (4, 4, 2)])
def test_gradcheck(boundary, channels):
    c_in, c_out, groups = channels
    op = make(c_in, c_out, groups, "cross", boundary)
    x = torch.randn(1, c_in, 5, 4, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in op.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(op, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *op.parameters()))


@pytest.mark.parametrize("stride,grid", [(2, (6, 4)), (2, (4, 6)), (3, (6, 3))])
@pytest.mark.parametrize("channels", [(3, 4, 1), (4, 4, 2), (1, 6, 1)])  # c_out <, = and > s² c_in
def test_polyphase_symbol_and_singular_values(channels, stride, grid):
    """On a periodic grid divisible by ``s``: a polyphase plane wave (``F.pixel_shuffle`` of ``V e^{iν·j}``) is
    mapped to ``K̂_s(ν) V e^{iν·j}``, and the singular values from the symbol are those of the dense matrix."""
    c_in, c_out, groups = channels
    op = make(c_in, c_out, groups, "full", "circular", stride)
    n1, n2 = grid
    m1, m2 = n1 // stride, n2 // stride
    sym = op.symbol(grid)
    assert sym.shape == (m1, m2, c_out, stride * stride * c_in)
    matrix = op.to_matrix(grid).to(torch.complex128)
    a = torch.arange(m1, dtype=torch.float64)[:, None]
    b = torch.arange(m2, dtype=torch.float64)[None, :]
    for mu1, mu2 in itertools.product(range(m1), range(m2)):
        wave = torch.exp(2j * math.pi * (mu1 * a / m1 + mu2 * b / m2))
        v = torch.randn(stride * stride * c_in, dtype=torch.complex128)
        x = F.pixel_shuffle((v[:, None, None] * wave)[None], stride)[0]  # phases (a, b) of channel i: i s² + a s + b
        out = (matrix @ x.reshape(-1)).reshape(c_out, m1, m2)
        torch.testing.assert_close(out, (sym[mu1, mu2] @ v)[:, None, None] * wave, rtol=1e-10, atol=1e-10)
    exact = torch.linalg.svdvals(op.to_matrix(grid))
    got = op.singular_values(grid)
    assert got.shape == exact.shape
    torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-12)


def test_polyphase_symbol_of_a_subsampled_coupling():
    """``D_s P`` reads phase ``(0, 0)`` only: its symbol is ``P`` in those columns and zero elsewhere."""
    op = make(3, 2, stencil="none", boundary="circular")
    sym = op.symbol((4, 6))
    expected = torch.zeros(2, 3, 4, dtype=torch.complex128)
    expected[:, :, 0] = op.pointwise.detach()
    torch.testing.assert_close(sym, expected.reshape(2, 12).expand(2, 3, 2, 12))
    fine = op._symbol(4, 6)
    torch.testing.assert_close(polyphase_symbol(fine, 1), fine)


@pytest.mark.parametrize("channels", [(3, 4, 1), (4, 4, 2)])
def test_spectral_norms(channels):
    c_in, c_out, groups = channels
    circular = make(c_in, c_out, groups, "cross", "circular")
    exact = float(torch.linalg.svdvals(circular.to_matrix((6, 4)))[0])
    assert circular.spectral_norm((6, 4)) == pytest.approx(exact, rel=1e-10)
    assert circular.spectral_norm((6, 4), method="power", tol=1e-12) == pytest.approx(exact, rel=1e-8)
    same_size = make(c_in, c_out, groups, "cross", "circular", stride=1)
    assert circular.spectral_norm() == pytest.approx(same_size.spectral_norm())  # ‖D_s K‖ ≤ ‖K‖
    assert circular.spectral_norm() >= exact
    zeros = make(c_in, c_out, groups, "cross", "zeros")
    for grid in [(5, 5), (6, 7), (8, 8)]:
        power = zeros.spectral_norm(grid, method="power", tol=1e-12)
        assert power == pytest.approx(float(torch.linalg.svdvals(zeros.to_matrix(grid))[0]), rel=1e-8)
        assert power * (1 - 1e-12) <= zeros.spectral_norm(grid) <= zeros.spectral_norm() * (1 + 1e-12)
    assert zeros.step_bound("parabolic", (8, 8)) == pytest.approx(2 / zeros.spectral_norm((8, 8)) ** 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("stencil", STENCILS)
def test_counts_match_pytorch_flop_counter(stencil, boundary, dtype):
    for (c_in, c_out, groups), stride in itertools.product(CHANNELS, (2, 3)):
        op = make(c_in, c_out, groups, stencil, boundary, stride, dtype)
        points = {"cross": 5, "full": 9, "none": 0}[stencil]
        assert op.num_parameters() == c_out * c_in // groups + points * min(c_in, c_out)  # as for stride 1
        assert op.macs_per_pixel() == make(c_in, c_out, groups, stencil, boundary, 1).macs_per_pixel()
        for n1, n2 in [(7, 6), (8, 8)]:
            x = torch.randn(2, c_in, n1, n2, dtype=dtype)
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                op(x)
            expected = 2 * op.macs_per_pixel() * 2 * math.ceil(n1 / stride) * math.ceil(n2 / stride)
            assert counter.get_total_flops() == op.flops(x.shape) == count_flops(op, x) == expected


def test_bad_input():
    for stride in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="stride must be a positive integer"):
            LeanConv(4, 4, stride=stride)
    assert make_operator("lean", 4, 6, stride=2).stride == 2
    with pytest.raises(ValueError, match=r"'dense' operator takes no option\(s\) stride"):
        make_operator("dense", 4, 4, stride=2)
    op = make(4, 4, boundary="circular")
    for method in ("symbol", "singular_values"):
        with pytest.raises(ValueError, match=r"stride-2 operator .* divisible by 2, got \(7, 6\)"):
            getattr(op, method)((7, 6))
    with pytest.raises(ValueError, match="divisible by 2"):
        op.spectral_norm((6, 5))
    assert op.spectral_norm((6, 5), method="power") > 0  # the exact norm on any grid
    with pytest.raises(ValueError, match="padding must be non-negative"):
        op.padded_forward(torch.randn(1, 4, 5, 5, dtype=torch.float64), (-1, 1))
