"""The compiled lean kernels (``operators.native``) against ``F.conv2d`` and autograd, over the shapes that
exercise every branch: register blocks and scalar tails in the channels, short rows and partial tiles in the
pixels, channel mismatch, groups, both boundaries, stencils up to 7x7 with any number of taps."""
import contextlib
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

from operators import LeanConv, native
from operators.lean import stencil_as_kernel

CL = torch.channels_last
# skipped where the kernels cannot be built (no C compiler, PDENET_NATIVE=0); a failed build or self-check fails
pytestmark = pytest.mark.skipif(native.status().startswith(("disabled", "no C compiler")),
                                reason=f"compiled kernels: {native.status()}")


def test_kernels_are_loaded():
    assert native.available(), native.status()


def reference(x, p, s, taps, k, groups, circular):
    """``P x + S x`` with ``S`` (weights ``s`` at ``taps``) on the channels ``j < m`` by PyTorch's
    convolutions."""
    m, r = s.shape[0], k // 2
    y = F.conv2d(x, p, groups=groups)
    head = F.pad(x[:, :m], (r,) * 4, mode="circular" if circular else "constant")
    return torch.cat([y[:, :m] + F.conv2d(head, stencil_as_kernel(s, taps, k), groups=m), y[:, m:]], 1)


def problem(c_in, c_out, groups, k, taps, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    m = min(c_in, c_out)
    x = torch.randn(shape[0], c_in, *shape[1:], generator=gen).contiguous(memory_format=CL)
    g = torch.randn(shape[0], c_out, *shape[1:], generator=gen).contiguous(memory_format=CL)
    p = torch.randn(c_out, c_in // groups, 1, 1, generator=gen)
    s = torch.randn(m, len(taps), generator=gen)
    return x, g, p, s


def cross(k):
    r = k // 2
    return torch.tensor([t for t in range(k * k) if t // k == r or t % k == r])


NR = native.block_channels() if native.available() else 16
CHANNELS = [(1, 1, 1), (3, 5, 1), (7, 2, 1), (NR, NR, 1), (NR + 3, NR + 1, 1), (2 * NR + 5, 2 * NR, 1),
            (NR, 3 * NR, 1), (3 * NR + 2, 3 * NR + 2, 1), (2 * NR, 2 * NR, 2), (4 * NR, 2 * NR, 2)]
SHAPES = [(2, 5, 7), (1, 1, 1), (3, 2, 1), (1, 13, 17), (2, 1, 9)]


@pytest.mark.parametrize("channels", CHANNELS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("circular", [False, True], ids=["zeros", "circular"])
def test_forward_and_backward_match_conv2d(channels, shape, circular):
    c_in, c_out, groups = channels
    for k, taps in ((3, cross(3)), (3, torch.arange(9))):
        x, g, p, s = problem(c_in, c_out, groups, k, taps, shape, seed=c_in + c_out + shape[1])
        check_forward_and_backward(x, g, p, s, taps, k, groups, circular)


def check_forward_and_backward(x, g, p, s, taps, k, groups, circular):
    """``lean_forward`` (with and without the output's moments) and ``lean_backward`` (with and without the input
    gradient, and with a shortcut's gradient added to it) against autograd through ``reference``."""
    x, p, s = (t.detach().requires_grad_() for t in (x, p, s))
    ref = reference(x, p, s, taps, k, groups, circular)
    ref_x, ref_p, ref_s = torch.autograd.grad(ref, [x, p, s], g)
    y = native.lean_forward(x.detach(), p.detach(), s.detach(), taps, k, circular, groups)
    assert y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y, ref.detach(), rtol=1e-4, atol=1e-4)
    shift = torch.randn(y.shape[1])
    y_again, moments = native.lean_forward(x.detach(), p.detach(), s.detach(), taps, k, circular, groups,
                                           moments_about=shift)
    e = ref.detach().double() - shift.double()[:, None, None]
    assert torch.equal(y_again, y) and moments.dtype == torch.float64
    torch.testing.assert_close(moments, torch.stack([e.sum((0, 2, 3)), e.square().sum((0, 2, 3))]),
                               rtol=1e-4, atol=1e-3)
    for input_grad in (True, False):
        gx, gp, gs = native.lean_backward(g, x.detach(), p.detach(), s.detach(), taps, k, circular, groups,
                                          input_grad=input_grad)
        if input_grad:
            gx_alone, gp_alone = gx, gp
            assert gx.is_contiguous(memory_format=CL)
            torch.testing.assert_close(gx, ref_x, rtol=1e-4, atol=1e-4)
        else:
            assert gx is None
        torch.testing.assert_close(gp, ref_p, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gs, ref_s, rtol=1e-4, atol=1e-4)
    # the first c_in channels of a wider addend, added as the kernel stores the input gradient: one rounding, as here
    addend = torch.randn(x.shape[0], x.shape[1] + 3, *x.shape[2:]).contiguous(memory_format=CL)
    gx_plus, gp_plus, _ = native.lean_backward(g, x.detach(), p.detach(), s.detach(), taps, k, circular, groups,
                                               input_grad_addend=addend)
    assert torch.equal(gx_plus, gx_alone + addend[:, :x.shape[1]]) and torch.equal(gp_plus, gp_alone)
    mask = torch.where(torch.rand(addend.shape) < 0.5, -1, 0).to(torch.int8).contiguous(memory_format=CL)
    gx_masked, _, _ = native.lean_backward(g, x.detach(), p.detach(), s.detach(), taps, k, circular, groups,
                                           input_grad_addend=addend, addend_mask=mask)  # only where the mask is set
    assert torch.equal(gx_masked, gx_alone + (addend * (mask != 0))[:, :x.shape[1]])


# tap counts 9, 25, 13, 6 and 7: the stencil gradient takes five taps per pass and every remainder 0-4
STENCILS = [(5, cross(5)), (5, torch.arange(25)), (7, cross(7)), (3, torch.arange(6)), (3, torch.arange(7))]


@pytest.mark.parametrize("stencil", STENCILS, ids=lambda st: f"k{st[0]}-{len(st[1])}taps")
@pytest.mark.parametrize("circular", [False, True], ids=["zeros", "circular"])
def test_larger_stencils_and_many_tiles(stencil, circular):
    """Stencils up to 7x7 (taps three pixels away), any number of taps, on a grid of several 96-pixel tiles
    with a partial last tile."""
    k, taps = stencil
    x, g, p, s = problem(NR + 2, NR + 2, 1, k, taps, (3, 11, 10), seed=1)
    check_forward_and_backward(x, g, p, s, taps, k, 1, circular)


def test_lean_operator_takes_the_compiled_path(monkeypatch):
    """A float32 channels-last forward and backward of ``LeanConv`` call the kernels (and nothing else
    computes the result: with the kernels replaced by zeros, the output is zero)."""
    calls = []
    for name in ("lean_forward", "lean_backward"):
        real = getattr(native, name)

        def spy(*args, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(*args, **kw)

        monkeypatch.setattr(native, name, spy)
    op = LeanConv(NR, NR, stencil="cross")
    x = torch.randn(2, NR, 6, 6, requires_grad=True)
    op(x).sum().backward()
    assert calls == ["lean_forward", "lean_backward"]  # the backward: all three gradients in one call
    with native.disabled():
        assert not native.available() and "disabled" in native.status()
        calls.clear()
        op(x)
        assert calls == []
    assert native.available()


@pytest.mark.parametrize("threads", [1, 2])
def test_results_do_not_depend_on_the_thread_count(threads):
    x, g, p, s = problem(NR, NR, 1, 3, cross(3), (4, 9, 9), seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        y = native.lean_forward(x, p, s, cross(3), 3, False, 1)
        _, gp, _ = native.lean_backward(g, x, p, s, cross(3), 3, False, 1)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(y, reference(x, p, s, cross(3), 3, 1, False), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gp, torch.einsum("bonm,binm->oi", g, x)[..., None, None], rtol=1e-4, atol=1e-4)


def test_unsupported_arguments_raise_a_clear_error():
    x, _, p, s = problem(4, 4, 1, 3, cross(3), (1, 3, 3), seed=0)
    too_many = torch.zeros(5, 5)  # a stencil on more channels than x has
    with pytest.raises(ValueError, match="unsupported arguments"):
        native.lean_forward(x, p, too_many, cross(3), 3, False, 1)
    with pytest.raises(ValueError, match=r"moments_about must have shape \(4,\)"):
        native.lean_forward(x, p, s, cross(3), 3, False, 1, moments_about=torch.zeros(3))
    for addend, input_grad in ((torch.zeros(1, 3, 3, 3), True), (torch.zeros(1, 4, 3, 2), True),
                               (torch.zeros(1, 4, 3, 3, dtype=torch.float64), True), (torch.zeros(1, 4, 3, 3), False)):
        with pytest.raises(ValueError, match="input_grad_addend must be"):
            native.lean_backward(x, x, p, s, cross(3), 3, False, 1, input_grad=input_grad, input_grad_addend=addend)
    with pytest.raises(ValueError, match="addend_mask must be a channels-last int8 tensor"):
        native.lean_backward(x, x, p, s, cross(3), 3, False, 1, input_grad_addend=x, addend_mask=x > 0)
    with pytest.raises(ValueError, match="mask must be a channels-last int8 tensor"):
        native.lean_backward(x, x, p, s, cross(3), 3, False, 1,
                             bn_gradient=(x, torch.zeros(4, 4), x.to(torch.int8)[:, :2]))


@pytest.mark.parametrize("fast", [True, False], ids=["kernel", "pytorch"])
def test_forward_with_moments_matches_forward(fast):
    """``LeanConv.forward_with_moments``: the output and gradients of ``forward`` and the moments of the output,
    summed by the kernel or (kernels disabled) from the output."""
    op = LeanConv(NR + 1, NR, stencil="cross")
    x = torch.randn(3, NR + 1, 7, 6).contiguous(memory_format=CL).requires_grad_()
    shift = torch.randn(NR)
    with contextlib.nullcontext() if fast else native.disabled():
        y, moments = op.forward_with_moments(x, shift)
        y_ref = op(x)
    assert type(y.grad_fn).__name__ == ("_LeanConvMomentsFunctionBackward" if fast else y_ref.grad_fn.name())
    assert not moments.requires_grad
    e = y_ref.detach().double() - shift.double()[:, None, None]
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(moments, torch.stack([e.sum((0, 2, 3)), e.square().sum((0, 2, 3))]),
                               rtol=1e-5, atol=1e-3)
    g = torch.randn_like(y)
    params = [x, op.pointwise, op.stencil]
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(y_ref, params, g)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=rf"shift must have shape \({NR},\)"):
        op.forward_with_moments(x, torch.zeros(NR + 1))


def test_build_is_cached_and_failures_are_reported(tmp_path, monkeypatch):
    """The library is built once per cache key; a broken compiler gives a status naming the failure."""
    monkeypatch.setenv("PDENET_CACHE_DIR", str(tmp_path))
    path = native._build("cc")
    assert path.parent == tmp_path and path.exists()
    stamp = path.stat().st_mtime_ns
    assert native._build("cc") == path and path.stat().st_mtime_ns == stamp
    with pytest.raises(RuntimeError, match="false failed"):
        native._build("false")  # a "compiler" that exits with an error, under a new cache key
    assert [f.name for f in tmp_path.iterdir()] == [path.name]  # no partial file left behind


def test_compiled_library_loads_checks_and_reports(tmp_path, monkeypatch):
    """``CompiledLibrary``: a good source is loaded with its constants; a failing self-check, a source that
    does not compile and ``PDENET_NATIVE=0`` give ``None`` and a status naming why, with one warning each except
    when disabled."""
    monkeypatch.setenv("PDENET_CACHE_DIR", str(tmp_path))
    good, bad = tmp_path / "twice.c", tmp_path / "broken.c"
    good.write_text("int twice(int v) { return 2 * v; }\n")
    bad.write_text("int twice(int v) { return 2 * v }\n")

    def configure(lib):
        return lib.twice(21)  # ctypes' default: int arguments and result

    def library(source, check=lambda lib: ""):
        return native.CompiledLibrary(source, configure, check, "test kernels", "nothing runs instead")

    loaded = library(good)
    assert loaded.get() is not None and loaded.constants == 42 and loaded.status.startswith("compiled kernels")
    for lib, reason in ((library(good, lambda lib: "twice is wrong"), "self-check failed: twice is wrong"),
                        (library(bad), "build failed")):
        with pytest.warns(RuntimeWarning, match=r"(?s)test kernels are unavailable .*nothing runs instead"):
            assert lib.get() is None
        assert lib.status.startswith(reason)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert lib.get() is None  # tried once: no second warning
    monkeypatch.setenv("PDENET_NATIVE", "0")
    disabled = library(good)
    assert disabled.get() is None and disabled.status == "disabled by PDENET_NATIVE=0"


@pytest.mark.parametrize("combo", list(itertools.product([False, True], [1, 2])))
def test_operator_gradients_in_float32_match_float64_reference(combo):
    """End to end through ``LeanConv``: the compiled path's gradients against the float64 plain path."""
    circular, groups = combo
    torch.manual_seed(0)
    op = LeanConv(2 * NR, 2 * NR, stencil="full", groups=groups, boundary="circular" if circular else "zeros")
    x = torch.randn(3, 2 * NR, 7, 5)
    g = torch.randn(3, 2 * NR, 7, 5)
    x32 = x.clone().requires_grad_()
    out = op(x32)
    out.backward(g)
    grads32 = [x32.grad] + [q.grad for q in op.parameters()]
    op64 = op.double()
    for q in op64.parameters():
        q.grad = None
    x64 = x.double().requires_grad_()
    out64 = op64(x64)
    out64.backward(g.double())
    grads64 = [x64.grad] + [q.grad for q in op64.parameters()]
    torch.testing.assert_close(out.double(), out64, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads32, grads64):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_self_check_passes_and_catches_a_wrong_kernel():
    assert native._self_check(native.LEAN_KERNELS.lib) == ""

    class DoesNothing:  # "succeeds" without writing its outputs
        lean_block_channels = staticmethod(lambda: NR)
        lean_forward = lean_backward = lean_backward_bn = staticmethod(lambda *args: 1)

    assert native._self_check(DoesNothing()).startswith("forward differs from numpy")
