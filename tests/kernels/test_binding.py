"""The compiled kernels (``pdenet_kernels.binding``) against ``F.conv2d`` and autograd over the shapes that exercise
their register blocks and remainders; the build cache, the self-check, the error convention and out-of-memory
inside the kernels' parallel regions."""
import platform
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pdenet_kernels import binding, build, stencil_as_kernel
from pdenet_kernels.self_check import self_check

CL = torch.channels_last
pytestmark = pytest.mark.skipif(not binding.available(), reason=f"compiled kernels: {binding.status()}")


def reference(x, p, s, taps, k, groups, circular):
    """``P x + S x`` with ``S`` (weights ``s`` at ``taps``) on the channels ``j < m`` by PyTorch's convolutions."""
    m, r = s.shape[0], k // 2
    y = F.conv2d(x, p[:, :, None, None], groups=groups)
    head = F.pad(x[:, :m], (r,) * 4, mode="circular" if circular else "constant")
    return torch.cat([y[:, :m] + F.conv2d(head, stencil_as_kernel(s, taps, k), groups=m), y[:, m:]], 1)


def problem(c_in, c_out, groups, taps, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape[0], c_in, *shape[1:], generator=gen).contiguous(memory_format=CL)
    g = torch.randn(shape[0], c_out, *shape[1:], generator=gen).contiguous(memory_format=CL)
    p = torch.randn(c_out, c_in // groups, generator=gen)
    s = torch.randn(min(c_in, c_out), len(taps), generator=gen)
    return x, g, p, s


def cross(k):
    r = k // 2
    return torch.tensor([t for t in range(k * k) if t // k == r or t % k == r])


NR = binding.block_channels() if binding.available() else 16
CHANNELS = [(1, 1, 1), (3, 5, 1), (7, 2, 1), (NR, NR, 1), (NR + 3, NR + 1, 1), (2 * NR + 5, 2 * NR, 1),
            (NR, 3 * NR, 1), (3 * NR + 2, 3 * NR + 2, 1), (2 * NR, 2 * NR, 2), (4 * NR, 2 * NR, 2)]
SHAPES = [(2, 5, 7), (1, 1, 1), (3, 2, 1), (1, 13, 17), (2, 1, 9)]


def check_forward_and_backward(x, g, p, s, taps, k, groups, circular):
    """``lean_forward`` (with and without the output's moments) and ``lean_backward`` (with and without the input
    gradient, with a shortcut's gradient added to it, masked or not) against autograd through ``reference``."""
    x, p, s = (t.detach().requires_grad_() for t in (x, p, s))
    ref = reference(x, p, s, taps, k, groups, circular)
    ref_x, ref_p, ref_s = torch.autograd.grad(ref, [x, p, s], g)
    x, p, s = x.detach(), p.detach(), s.detach()
    y = binding.lean_forward(x, p, s, taps, k, circular, groups)
    assert y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y, ref.detach(), rtol=1e-4, atol=1e-4)
    shift = torch.randn(y.shape[1])
    y_again, moments = binding.lean_forward(x, p, s, taps, k, circular, groups, moments_about=shift)
    e = ref.detach().double() - shift.double()[:, None, None]
    assert torch.equal(y_again, y) and moments.dtype == torch.float64
    torch.testing.assert_close(moments, torch.stack([e.sum((0, 2, 3)), e.square().sum((0, 2, 3))]),
                               rtol=1e-4, atol=1e-3)
    gx, gp, gs = binding.lean_backward(g, x, p, s, taps, k, circular, groups, True)
    assert gx.is_contiguous(memory_format=CL)
    for got, want in ((gx, ref_x), (gp, ref_p), (gs, ref_s)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    no_gx, gp_alone, _ = binding.lean_backward(g, x, p, s, taps, k, circular, groups, False)
    assert no_gx is None and torch.equal(gp_alone, gp)
    addend = torch.randn(x.shape[0], x.shape[1] + 3, *x.shape[2:]).contiguous(memory_format=CL)
    gx_plus, gp_plus, _ = binding.lean_backward(g, x, p, s, taps, k, circular, groups, True, addend=addend)
    assert torch.equal(gx_plus, gx + addend[:, :x.shape[1]]) and torch.equal(gp_plus, gp)
    mask = torch.where(torch.rand(addend.shape) < 0.5, -1, 0).to(torch.int8).contiguous(memory_format=CL)
    gx_masked, _, _ = binding.lean_backward(g, x, p, s, taps, k, circular, groups, True, addend=addend,
                                            addend_mask=mask)
    assert torch.equal(gx_masked, gx + (addend * (mask != 0))[:, :x.shape[1]])


@pytest.mark.parametrize("channels", CHANNELS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("circular", [False, True], ids=["zeros", "circular"])
def test_forward_and_backward_match_conv2d(channels, shape, circular):
    c_in, c_out, groups = channels
    for taps in (cross(3), torch.arange(9)):
        x, g, p, s = problem(c_in, c_out, groups, taps, shape, seed=c_in + c_out + shape[1])
        check_forward_and_backward(x, g, p, s, taps, 3, groups, circular)


# tap counts 9, 25, 13, 6 and 7: the stencil gradient takes five taps per pass and every remainder 0-4
STENCILS = [(5, cross(5)), (5, torch.arange(25)), (7, cross(7)), (3, torch.arange(6)), (3, torch.arange(7))]


@pytest.mark.parametrize("stencil", STENCILS, ids=lambda st: f"k{st[0]}-{len(st[1])}taps")
@pytest.mark.parametrize("circular", [False, True], ids=["zeros", "circular"])
def test_larger_stencils_and_many_tiles(stencil, circular):
    """Stencils up to 7x7, any number of taps, on a grid of several 96-pixel tiles with a partial last tile."""
    k, taps = stencil
    x, g, p, s = problem(NR + 2, NR + 2, 1, taps, (3, 11, 10), seed=1)
    check_forward_and_backward(x, g, p, s, taps, k, 1, circular)


def test_batch_norm_output_gradient_in_its_three_mask_modes():
    """``lean_backward`` with batch norm's output gradient ``a gm + e z + f`` formed inside the kernel: the mask
    recomputed from ``z``, already applied, or read from mask bytes; against the same gradient formed here."""
    x, g, p, s = problem(NR, NR + 2, 1, cross(3), (2, 6, 5), seed=4)
    z = binding.lean_forward(x, p, s, cross(3), 3, False, 1)
    coefficients = torch.randn(4, NR + 2)
    a, b, e, f = (c[:, None, None] for c in coefficients)
    mask = torch.where(torch.rand(z.shape) < 0.5, -1, 0).to(torch.int8).contiguous(memory_format=CL)
    for mode, keep in ((binding.MASK_FROM_OUTPUT, a * z + b > 0), (binding.MASK_APPLIED, torch.ones_like(z, dtype=bool)),
                       (binding.MASK_BYTES, mask != 0)):
        formed = (g * keep * a + e * z + f).contiguous(memory_format=CL)
        want = binding.lean_backward(formed, x, p, s, cross(3), 3, False, 1, True)
        got = binding.lean_backward(g, x, p, s, cross(3), 3, False, 1, True,
                                    bn_gradient=(z, coefficients, mode, mask))
        for u, v in zip(got, want):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
def test_results_do_not_depend_on_the_thread_count(threads):
    x, g, p, s = problem(NR, NR, 1, cross(3), (4, 9, 9), seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        y = binding.lean_forward(x, p, s, cross(3), 3, False, 1)
        _, gp, _ = binding.lean_backward(g, x, p, s, cross(3), 3, False, 1, False)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(y, reference(x, p, s, cross(3), 3, 1, False), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gp, torch.einsum("bonm,binm->oi", g, x), rtol=1e-4, atol=1e-4)


def test_arguments_outside_the_kernels_range_are_refused():
    x, g, p, s = problem(4, 4, 1, cross(3), (1, 3, 3), seed=0)
    with pytest.raises(ValueError, match="lean_forward: arguments outside the kernel's range"):
        binding.lean_forward(x, p, torch.zeros(5, 5), cross(3), 3, False, 1)  # a stencil on 5 of 4 channels
    with pytest.raises(ValueError, match="lean_backward: arguments outside the kernel's range"):
        binding.lean_backward(g, x, p, s, cross(3), 3, True, 1, True, bn_gradient=(g, torch.zeros(4, 4), 0, None))


@pytest.mark.parametrize("kernel", ["lean forward", "lean backward", "batch norm forward", "batch norm backward"])
def test_out_of_memory_inside_a_kernel_is_a_python_error(kernel):
    """Each of a kernel's allocations (its threads' scratch memory among them, allocated before its OpenMP regions),
    made to fail in turn, is a ``MemoryError`` naming the kernel, never a crash; the next call works."""
    x, g, p, s = problem(NR, NR, 1, cross(3), (2, 9, 9), seed=5)
    bn = (torch.ones(NR), torch.zeros(NR), torch.zeros(NR), torch.ones(NR))
    calls = {"lean forward": lambda: binding.lean_forward(x, p, s, cross(3), 3, False, 1, moments_about=bn[2]),
             "lean backward": lambda: binding.lean_backward(g, x, p, s, cross(3), 3, False, 1, True),
             "batch norm forward": lambda: binding.bn_relu_forward(x, None, *bn, 0.1, 1e-5),
             "batch norm backward": lambda: binding.bn_relu_backward(g, x, None, bn[0], bn[1], bn[2], bn[3])}
    call = calls[kernel]
    expected = call()
    failures = 0
    for after in range(12):
        binding.fail_allocation(after)
        try:
            call()
        except MemoryError as err:
            assert "out of memory" in str(err)
            failures += 1
        else:
            break
        finally:
            binding.fail_allocation(-1)
    assert failures >= 2  # the weights' layout or the sums, and the threads' scratch memory
    for a, b in zip(call(), expected):
        if a is not None:
            torch.testing.assert_close(a, b)


def test_build_is_cached_and_failures_are_reported(tmp_path, monkeypatch):
    """The library is built once per cache key; a broken compiler or ``PDENET_NATIVE=0`` is named."""
    monkeypatch.setenv("PDENET_CACHE_DIR", str(tmp_path))
    path = build.build("cc")
    assert path.parent == tmp_path and path.exists()
    stamp = path.stat().st_mtime_ns
    assert build.build("cc") == path and path.stat().st_mtime_ns == stamp
    with pytest.raises(build.KernelsUnavailable, match="false failed"):
        build.build("false")  # a "compiler" that exits with an error, under a new cache key
    assert [f.name for f in tmp_path.iterdir()] == [path.name]  # no partial file left behind
    monkeypatch.setenv("PDENET_NATIVE", "0")
    with pytest.raises(build.KernelsUnavailable, match="disabled by PDENET_NATIVE=0"):
        build.build("cc")


def test_a_library_that_fails_its_self_check_is_not_used(monkeypatch):
    """A library whose self-check fails is not loaded: ``None``, a status naming the mismatch, one warning."""
    monkeypatch.setattr("pdenet_kernels.self_check.self_check", lambda lib: "forward is wrong")
    library = binding._Library()
    with pytest.warns(RuntimeWarning, match="compiled kernels are unavailable .*forward is wrong"):
        assert library.get() is None
    assert library.status == "self-check failed: forward is wrong"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert library.get() is None  # tried once: no second warning


def test_self_check_passes_and_catches_a_kernel_that_writes_nothing():
    assert self_check(binding.library()) == ""

    class WritesNothing:  # "succeeds" without writing its outputs
        lean_block_channels = staticmethod(lambda: NR)
        lean_forward = lean_backward = staticmethod(lambda *args: binding.KERNEL_OK)

    assert self_check(WritesNothing()).startswith("lean forward differs from numpy")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 processor targets")
def test_the_kernels_build_for_avx2_and_without_vector_extensions(tmp_path, monkeypatch):
    """The sources also compile and pass the self-check for other processors than this one (an AVX2-only host,
    and plain x86-64), so the register-block code of every vector width is tested on any host that runs them."""
    monkeypatch.setenv("PDENET_CACHE_DIR", str(tmp_path))
    cpu = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    targets = ["-march=x86-64"] + (["-march=haswell"] if "avx2" in cpu else [])
    for target in targets:
        lib = build.load(build.build(flags=tuple(f if f != "-march=native" else target for f in build.FLAGS)))
        binding.configure(lib)
        assert self_check(lib) == "", target
