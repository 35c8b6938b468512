"""The registered operators ``torch.ops.pdenet.*``: ``torch.library.opcheck`` (schema, fake implementation,
autograd registration, ``torch.compile`` compatibility), the fake implementations' shapes, dtypes and strides
against the real outputs, the FLOP formulas, autocast, ``torch.func``, and clear errors for bad arguments."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils.flop_counter import FlopCounterMode

import pdenet_kernels

CL = torch.channels_last
compiled = pytest.mark.skipif(not pdenet_kernels.available(), reason=f"compiled kernels: {pdenet_kernels.status()}")
CROSS = torch.tensor([1, 3, 4, 5, 7])


def lean_args(c_in=16, c_out=16, groups=1, dtype=torch.float32, layout=CL, circular=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c_in, 6, 5, generator=gen, dtype=dtype).contiguous(memory_format=layout)
    p = torch.randn(c_out, c_in // groups, generator=gen, dtype=dtype)
    s = torch.randn(min(c_in, c_out), 5, generator=gen, dtype=dtype)
    return x, p, s, CROSS, 3, circular, groups


def bn_vectors(c, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen), torch.randn(c, generator=gen) * 0.1,
            torch.rand(c, generator=gen) + 0.5)


def block_args(c_in=16, channels=16, shortcut=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, c_in, 5, 6, generator=gen).contiguous(memory_format=CL)
    layer1 = (torch.randn(channels, c_in, generator=gen) * 0.3, torch.randn(min(c_in, channels), 5, generator=gen) * 0.3,
              *bn_vectors(channels, seed), 0.1, 1e-5)
    layer2 = (torch.randn(channels, channels, generator=gen) * 0.3, torch.randn(channels, 5, generator=gen) * 0.3,
              *bn_vectors(channels, seed + 1), 0.1, 1e-5)
    r = torch.randn(3, channels, 5, 6, generator=gen).contiguous(memory_format=CL) if shortcut else None
    return (x, r, channels, CROSS, 3, 1, *layer1, *layer2)


def with_grad(args, positions):
    return tuple(a.detach().clone().requires_grad_() if i in positions else a for i, a in enumerate(args))


CASES = {
    "lean_conv float32": (torch.ops.pdenet.lean_conv, lambda: with_grad(lean_args(), (0, 1, 2))),
    "lean_conv groups": (torch.ops.pdenet.lean_conv, lambda: with_grad(lean_args(32, 32, 2), (0, 1, 2))),
    "lean_conv float64 circular": (torch.ops.pdenet.lean_conv,
                                   lambda: with_grad(lean_args(5, 3, 1, torch.float64, circular=True), (0, 1, 2))),
    "lean_conv_backward": (torch.ops.pdenet.lean_conv_backward,
                           lambda: (torch.randn(2, 16, 6, 5).contiguous(memory_format=CL), *lean_args(), True)),
    "lean_conv_backward float64": (torch.ops.pdenet.lean_conv_backward,
                                   lambda: with_grad((torch.randn(2, 3, 6, 5, dtype=torch.float64),
                                                      *lean_args(5, 3, 1, torch.float64), True), (0, 1, 2, 3))),
    "batch_norm_relu": (torch.ops.pdenet.batch_norm_relu,
                        lambda: with_grad((torch.randn(4, 19, 3, 5).contiguous(memory_format=CL),
                                           torch.randn(4, 19, 3, 5).contiguous(memory_format=CL), *bn_vectors(19),
                                           0.1, 1e-5), (0, 1, 2, 3))),
    "residual_block": (torch.ops.pdenet.residual_block,
                       lambda: with_grad(block_args(), (0, 6, 7, 8, 9, 14, 15, 16, 17))),
    "residual_block widening": (torch.ops.pdenet.residual_block,
                                lambda: with_grad(block_args(16, 32), (0, 6, 7, 8, 9, 14, 15, 16, 17))),
    "residual_block shortcut": (torch.ops.pdenet.residual_block,
                                lambda: with_grad(block_args(16, 32, True), (0, 1, 6, 7, 8, 9, 14, 15, 16, 17))),
}


@compiled
@pytest.mark.parametrize("case", list(CASES))
def test_opcheck(case):
    """Schema, fake implementation, autograd registration and AOT dispatch of every registered operator."""
    op, make = CASES[case]
    torch.library.opcheck(op, make())


@compiled
@pytest.mark.parametrize("case", list(CASES))
def test_fake_implementation_matches_the_real_outputs(case):
    """Traced with fake tensors (``make_fx``), each operator's outputs have the real outputs' shapes, dtypes and
    strides."""
    op, make = CASES[case]
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in make()]
    real = op(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    graph = make_fx(lambda *a: op(*a), tracing_mode="fake")(*args)
    fake = next(n for n in graph.graph.nodes if n.op == "output").args[0]
    real = real if isinstance(real, tuple) else (real,)
    fake = [f.meta["val"] for f in (fake if isinstance(fake, (tuple, list)) else (fake,))]
    assert len(real) == len(fake)
    for r, f in zip(real, fake):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())


@compiled
def test_flop_formulas():
    """The counter sees every operator: the lean operator's forward and backward, and a fused block as its two
    lean operators forward and backward (batch norm counts nothing, as PyTorch counts it)."""
    x, p, s, taps, k, circular, groups = lean_args()
    forward = 2 * 2 * 30 * (16 * 16 + 9 * 16)
    with FlopCounterMode(display=False) as counter:
        torch.ops.pdenet.lean_conv(x, p, s, taps, k, circular, groups)
        torch.ops.pdenet.lean_conv_backward(torch.ones(2, 16, 6, 5), x, p, s, taps, k, circular, groups, False)
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.pdenet.lean_conv] == forward and counts[torch.ops.pdenet.lean_conv_backward] == forward
    args = with_grad(block_args(16, 32), (0, 6, 7, 14, 15))
    with FlopCounterMode(display=False) as counter:
        torch.ops.pdenet.residual_block(*args)[0].sum().backward()
    counts = counter.get_flop_counts()["Global"]
    layers = 2 * 3 * 30 * (32 * 16 + 9 * 16) + 2 * 3 * 30 * (32 * 32 + 9 * 32)
    assert counts[torch.ops.pdenet.residual_block] == layers
    assert counts[torch.ops.pdenet.residual_block_backward] == 2 * layers


@pytest.mark.parametrize("device_dtype", ["float32", "bfloat16"])
def test_lean_conv_under_autocast(device_dtype):
    """Under CPU autocast the operator follows its input's dtype (the weights cast to it), forward and
    backward: float32 input runs the compiled kernel in float32, bfloat16 input the plain convolutions in
    bfloat16; the weights' gradients keep the weights' dtype."""
    x, p, s, taps, k, circular, groups = lean_args()
    x = x.to(getattr(torch, device_dtype)).requires_grad_()
    p, s = p.requires_grad_(), s.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pdenet_kernels.lean_conv(x, p, s, taps, k, circular, groups)
    assert y.dtype == x.dtype
    y.float().sum().backward()
    assert x.grad.dtype == x.dtype and p.grad.dtype == s.grad.dtype == torch.float32
    ref = pdenet_kernels.lean_conv_reference(x.detach().float(), p.detach(), s.detach(), taps, k, circular, groups)
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)


def test_vmap_over_inputs_and_weights():
    x, p, s, taps, k, circular, groups = lean_args()
    xs = torch.stack([x, 2 * x])
    ys = torch.func.vmap(lambda t: pdenet_kernels.lean_conv(t, p, s, taps, k, circular, groups))(xs)
    torch.testing.assert_close(ys[1], 2 * pdenet_kernels.lean_conv(x, p, s, taps, k, circular, groups))
    ps = torch.stack([p, -p])
    ys = torch.func.vmap(lambda q: pdenet_kernels.lean_conv(x, q, s, taps, k, circular, groups))(ps)
    torch.testing.assert_close(ys[1], pdenet_kernels.lean_conv(x, -p, s, taps, k, circular, groups))


@pytest.mark.parametrize("change,message", [
    (lambda a: (a[0][0],) + a[1:], "x must be 4-D"),
    (lambda a: (a[0], a[1][:, :3]) + a[2:], "does not take 16 input channels"),
    (lambda a: a[:2] + (torch.zeros(17, 5),) + a[3:], "at most min"),
    (lambda a: a[:3] + (CROSS.int(),) + a[4:], "taps int64"),
])
def test_bad_arguments_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        torch.ops.pdenet.lean_conv(*change(lean_args()))


@compiled
def test_fused_operators_refuse_what_the_kernels_do_not_take():
    """The fused operators exist for the compiled CPU path: other dtypes, or inconsistent shapes, are named."""
    args = list(block_args())
    args[0] = args[0].double()
    with pytest.raises(ValueError, match="compiled CPU kernels only .*float64"):
        torch.ops.pdenet.residual_block(*args)
    args = list(block_args())
    args[14] = args[14][:, :8]
    with pytest.raises(ValueError, match="second layer's pointwise"):
        torch.ops.pdenet.residual_block(*args)
    with pytest.raises(ValueError, match=r"must have shape \(19,\)"):
        torch.ops.pdenet.batch_norm_relu(torch.randn(2, 19, 3, 3), None, *bn_vectors(18), 0.1, 1e-5)
