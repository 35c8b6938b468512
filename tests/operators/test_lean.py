"""The lean operator ``K = P + S``: fast paths against the dense reference, adjoint, symbol, counts, bad input."""
import itertools
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import pdenet_kernels
from operators import count_flops
from operators.functional import conv_same, conv_same_adjoint, kernel_symbol
from operators.lean import LeanConv

CL = torch.channels_last
STENCILS = ("cross", "full", "none")
BOUNDARIES = ("zeros", "circular")
# (c_in, c_out, groups): square, grouped, and both kinds of channel mismatch
CHANNELS = ((6, 6, 1), (8, 8, 4), (6, 4, 2), (3, 5, 1))
compiled = pytest.mark.skipif(not pdenet_kernels.available(), reason=f"compiled kernels: {pdenet_kernels.status()}")


def make(c_in, c_out, groups, stencil, boundary, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return LeanConv(c_in, c_out, stencil=stencil, groups=groups, boundary=boundary).to(dtype)


def grads(op, x, y_grad, fn):
    """Gradients of ``<fn(x), y_grad>`` with respect to ``x`` and every parameter of ``op``."""
    x = x.detach().requires_grad_()
    out = fn(x)
    return [out.detach()] + list(torch.autograd.grad(out, [x, *op.parameters()], y_grad))


@pytest.mark.parametrize("stencil,boundary,channels", itertools.product(STENCILS, BOUNDARIES, CHANNELS))
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_forward_adjoint_and_gradients_match_dense_reference(stencil, boundary, channels, fmt):
    c_in, c_out, groups = channels
    op = make(c_in, c_out, groups, stencil, boundary)
    x = torch.randn(3, c_in, 7, 6).contiguous(memory_format=fmt)
    y = torch.randn(3, c_out, 7, 6).contiguous(memory_format=fmt)
    w = op.equivalent_dense_weight()
    torch.testing.assert_close(op.adjoint(y), conv_same_adjoint(y, w, boundary), rtol=1e-5, atol=1e-5)
    fast = grads(op, x, y, op)
    ref = grads(op, x, y, lambda t: conv_same(t, op.equivalent_dense_weight(), boundary))
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@compiled
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_compiled_path_is_counted_and_returns_channels_last(fmt):
    """Float32 on the CPU runs the compiled kernel (channels-last output); PyTorch's FLOP counter sees the
    registered operator and counts what ``flops`` states, forward and backward."""
    op = make(16, 16, 1, "cross", "zeros")
    x = torch.randn(2, 16, 5, 5).contiguous(memory_format=fmt).requires_grad_()
    with FlopCounterMode(display=False) as counter:
        y = op(x)
    assert y.is_contiguous(memory_format=CL)
    assert counter.get_total_flops() == op.flops(x.shape) == 2 * 2 * 25 * (16 * 16 + 9 * 16)
    with FlopCounterMode(display=False) as counter:
        y.backward(torch.ones_like(y))
    assert counter.get_total_flops() == 2 * op.flops(x.shape)  # the input gradient and the weights'


@compiled
@pytest.mark.parametrize("stencil", ["cross", "full"])
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_compiled_and_plain_paths_agree(stencil, boundary):
    """The compiled kernel and the plain composition it replaces give the same output and gradients."""
    op = make(16, 16, 1, stencil, boundary)
    x = torch.randn(4, 16, 9, 8).contiguous(memory_format=CL)
    g = torch.randn(4, 16, 9, 8)
    args = (op.stencil_index, op.kernel_size, boundary == "circular", 1)
    fast = grads(op, x, g, op)
    plain = grads(op, x, g, lambda t: pdenet_kernels.lean_conv_reference(t, op.pointwise, op.stencil, *args))
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("channels", [(4, 4, 2), (4, 2, 2), (2, 3, 1)])
def test_function_gradcheck_double_backward_and_forward_ad(boundary, channels):
    c_in, c_out, groups = channels
    op = make(c_in, c_out, groups, "cross", boundary, torch.float64)
    x = torch.randn(1, c_in, 4, 3, dtype=torch.float64, requires_grad=True)
    p = op.pointwise.detach().requires_grad_()
    s = op.stencil.detach().requires_grad_()

    def fn(x, p, s):
        return pdenet_kernels.lean_conv(x, p, s, op.stencil_index, op.kernel_size, boundary == "circular", groups)

    assert torch.autograd.gradcheck(fn, (x, p, s), check_forward_ad=True, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x, p, s), fast_mode=True)


@pytest.mark.parametrize("shape", [(1, 5, 1, 1), (1, 5, 1, 7), (3, 1, 4, 4), (2, 5, 2, 1)])
def test_degenerate_shapes(shape):
    """Sizes where NCHW and channels-last strides coincide still take a correct path."""
    op = make(shape[1], shape[1], 1, "full", "circular")
    x = torch.randn(shape)
    torch.testing.assert_close(op(x), conv_same(x, op.equivalent_dense_weight(), "circular"))


def test_torch_func_transforms():
    """``jacrev`` / ``jacfwd`` (vmap over vjp / jvp), per-sample gradients and vmap over weights."""
    op = make(4, 4, 2, "cross", "zeros")
    x = torch.randn(2, 4, 3, 3)
    weight = op.equivalent_dense_weight().detach()
    expected = torch.func.jacrev(lambda t: conv_same(t, weight, "zeros"))(x)
    torch.testing.assert_close(torch.func.jacrev(op)(x), expected)
    torch.testing.assert_close(torch.func.jacfwd(op)(x), expected)
    params = {k: v.detach() for k, v in op.named_parameters()}

    def loss(p, sample):
        return torch.func.functional_call(op, p, (sample[None],)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(2):
        for name, g in torch.func.grad(loss)(params, x[i]).items():
            torch.testing.assert_close(per_sample[name][i], g)
    stacked = {k: torch.stack([v, 2 * v]) for k, v in params.items()}
    ys = torch.func.vmap(lambda p: torch.func.functional_call(op, p, (x,)))(stacked)
    torch.testing.assert_close(ys[1], conv_same(x, 2 * weight, "zeros"))


@pytest.mark.parametrize("stencil,boundary", itertools.product(STENCILS, BOUNDARIES))
@pytest.mark.parametrize("grid", [(5, 6), (7, 7)])
def test_dot_test_float64(stencil, boundary, grid):
    for c_in, c_out, groups in CHANNELS:
        op = make(c_in, c_out, groups, stencil, boundary, torch.float64)
        assert op.check_adjoint(grid) < 1e-10


@pytest.mark.parametrize("stencil", STENCILS)
@pytest.mark.parametrize("channels", CHANNELS)
def test_symbol_singular_values_and_norms(stencil, channels):
    c_in, c_out, groups = channels
    op = make(c_in, c_out, groups, stencil, "circular", torch.float64)
    grid = (5, 4)
    sym = op.symbol(grid)
    torch.testing.assert_close(sym, kernel_symbol(op.equivalent_dense_weight(), *grid), rtol=1e-12, atol=1e-12)
    exact = torch.linalg.svdvals(op.to_matrix(grid))
    torch.testing.assert_close(op.singular_values(grid)[: exact.numel()], exact, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(op._symbol_norms(*grid), torch.linalg.matrix_norm(sym, ord=2), rtol=1e-10, atol=0)
    assert op.spectral_norm(grid) == pytest.approx(float(exact[0]), rel=1e-10)


def test_zero_padding_symbol_bound_and_power_iteration():
    op = make(6, 6, 1, "cross", "zeros", torch.float64)
    exact = float(torch.linalg.matrix_norm(op.to_matrix((5, 5)), ord=2))
    assert op.spectral_norm((5, 5), method="power", tol=1e-12) == pytest.approx(exact, rel=1e-5)
    assert op.spectral_norm((5, 5)) >= exact * (1 - 1e-12)
    assert op.spectral_norm() >= exact * (1 - 1e-12)


@pytest.mark.parametrize("stencil,points", [("cross", 5), ("full", 9), ("none", 0)])
@pytest.mark.parametrize("channels", [(16, 16, 1), (16, 16, 4), (12, 8, 2), (8, 12, 4)])
def test_parameter_and_flop_counts(stencil, points, channels):
    c_in, c_out, groups = channels
    op = make(c_in, c_out, groups, stencil, "zeros")
    assert op.num_parameters() == c_out * c_in // groups + points * min(c_in, c_out)
    assert op.macs_per_pixel() == c_out * c_in // groups + (9 * min(c_in, c_out) if points else 0)
    for dtype in (torch.float32, torch.float64):  # the fused and the plain path
        op = op.to(dtype)
        x = torch.randn(2, c_in, 6, 5, dtype=dtype)
        assert count_flops(op, x) == op.flops(x.shape)


def test_cross_stencil_layout_and_initialisation():
    op = LeanConv(64, 64, stencil="cross")
    k = op.stencil_kernel()[0, 0]
    assert (k[[0, 0, 2, 2], [0, 2, 0, 2]] == 0).all()  # corners of the cross are empty
    north, west, centre, east, south = op.stencil[0]
    assert (k[0, 1], k[1, 0], k[1, 1], k[1, 2], k[2, 1]) == (north, west, centre, east, south)
    bound = 1 / math.sqrt(64 + 5)
    for p in op.parameters():
        assert p.abs().max() <= bound
        assert p.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.2)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown stencil 'star'"):
        LeanConv(4, 4, stencil="star")
    with pytest.raises(ValueError, match="groups=3 must divide"):
        LeanConv(4, 6, groups=3)
    with pytest.raises(ValueError, match="groups must be a positive integer"):
        LeanConv(4, 4, groups=0)
    with pytest.raises(ValueError, match="unknown boundary"):
        LeanConv(4, 4, boundary="reflect")
    op = LeanConv(4, 4)
    with pytest.raises(ValueError, match="expects 4 channels"):
        op(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="4-D tensor"):
        op(torch.randn(4, 5, 5))


def test_forward_mode_derivative_under_no_grad_matches_the_operator():
    """Inference takes a shortcut past the autograd Function; forward-mode AD under no_grad must not."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    op = LeanConv(6, 6, stencil="cross")
    x, v = torch.randn(2, 6, 7, 9), torch.randn(2, 6, 7, 9)
    with torch.no_grad(), fwAD.dual_level():
        out = op(fwAD.make_dual(x, v))
        tangent = fwAD.unpack_dual(out).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, op(v), rtol=1e-5, atol=1e-5)
