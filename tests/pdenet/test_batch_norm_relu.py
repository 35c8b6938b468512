"""``batch_norm_relu`` against ``nn.BatchNorm2d`` + addition + ReLU: outputs, every gradient, running statistics,
double backward, the paths it must not take (evaluation, other dtypes, hooks, distributed batch norm)."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from operators import native
from pdenet import batch_norm_relu as bnr
from pdenet.batch_norm_relu import batch_norm_relu
from pdenet.distributed import GlobalBatchNorm2d

CL = torch.channels_last
# skipped where no kernels can be built (no C compiler, PDENET_NATIVE=0); elsewhere the fused kernels must load and
# pass their self-check
compiled = pytest.mark.skipif(native.status().startswith(("disabled", "no C compiler")),
                              reason=f"compiled kernels: {native.status()}")


@compiled
def test_kernels_are_loaded():
    assert bnr.KERNELS.get() is not None, bnr.status()


def problem(shape, seed=0, momentum=0.1, track=True):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(shape, generator=gen) * 3 + 2).contiguous(memory_format=CL).requires_grad_()
    r = torch.randn(shape, generator=gen).contiguous(memory_format=CL).requires_grad_()
    g = torch.randn(shape, generator=gen).contiguous(memory_format=CL)
    bn = nn.BatchNorm2d(shape[1], momentum=momentum, track_running_stats=track)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.uniform_(-1, 1, generator=gen)
    return z, r, g, bn


def reference(bn, z, r):
    out = bn(z)
    return torch.relu(out if r is None else out + r)


@compiled
@pytest.mark.parametrize("shape", [(8, 16, 5, 7), (4, 19, 3, 3), (2, 64, 1, 1), (1, 3, 40, 40)], ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_matches_batch_norm_add_relu(shape, with_residual, momentum):
    """Two steps (the second with the running statistics of the first): output, the gradients of the input,
    residual, weight and bias, running mean and variance, the batch counter."""
    z, r, g, bn = problem(shape, momentum=momentum)
    fused = copy.deepcopy(bn)
    r = r if with_residual else None
    for _ in range(2):
        y_ref, y = reference(bn, z, r), batch_norm_relu(fused, z, r)
        assert type(y.grad_fn).__name__ == "_BatchNormReLUFunctionBackward"  # the compiled path ran
        assert y.is_contiguous(memory_format=CL)
        inputs = [z] + ([r] if with_residual else [])
        ref_grads = torch.autograd.grad(y_ref, inputs + [bn.weight, bn.bias], g)
        grads = torch.autograd.grad(y, inputs + [fused.weight, fused.bias], g)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fused.running_mean, bn.running_mean)
        torch.testing.assert_close(fused.running_var, bn.running_var)
        assert int(fused.num_batches_tracked) == int(bn.num_batches_tracked)


@compiled
@pytest.mark.parametrize("channels", [1, 7, 8, 9, 15, 16, 17, 33, 48])
def test_every_channel_chunk_remainder(channels):
    """The kernels run one vector of channels at a time (16 with AVX-512, 8 without); full chunks, a partial last
    chunk and both together, with an odd pixel count (the reductions pair pixels)."""
    z, r, g, bn = problem((3, channels, 5, 3), seed=channels)
    fused = copy.deepcopy(bn)
    for residual in (None, r):
        y_ref, y = reference(bn, z, residual), batch_norm_relu(fused, z, residual)
        assert type(y.grad_fn).__name__ == "_BatchNormReLUFunctionBackward"
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        inputs = [z, bn.weight, bn.bias] + ([] if residual is None else [r])
        fused_inputs = [z, fused.weight, fused.bias] + ([] if residual is None else [r])
        for a, b in zip(torch.autograd.grad(y, fused_inputs, g), torch.autograd.grad(y_ref, inputs, g)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.running_var, bn.running_var)


@compiled
def test_nan_propagates_like_pytorch():
    """A NaN in one channel makes that channel's output NaN (ReLU keeps NaN, as torch.relu) and leaves the
    others as PyTorch computes them."""
    z, r, _, bn = problem((2, 20, 3, 3), seed=7)
    with torch.no_grad():
        z[1, 17, 2, 0] = float("nan")
    y, y_ref = batch_norm_relu(copy.deepcopy(bn), z, r), reference(bn, z, r)
    assert torch.isnan(y[:, 17]).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5, equal_nan=True)


@compiled
def test_without_running_statistics():
    z, r, g, bn = problem((4, 16, 6, 6), track=False)
    fused = copy.deepcopy(bn)
    y = batch_norm_relu(fused, z, r)
    assert type(y.grad_fn).__name__ == "_BatchNormReLUFunctionBackward"
    torch.testing.assert_close(y, reference(bn, z, r), rtol=1e-5, atol=1e-5)


@compiled
def test_large_mean_loses_no_precision():
    """A mean 3000 times the spread: against float64, the shifted sums keep the statistics (a naive
    E[x²] − E[x]² in float would lose the variance entirely); the output is as exact as the float32 input
    allows (PyTorch's own float32 batch norm is off by 1e-3 here)."""
    z, _, _, bn = problem((16, 16, 8, 8))
    with torch.no_grad():
        z.mul_(1e-3).add_(10.0)
    fused, ref64 = copy.deepcopy(bn), copy.deepcopy(bn).double()
    y = batch_norm_relu(fused, z)
    expected = reference(ref64, z.double(), None)
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=5e-4)
    torch.testing.assert_close(fused.running_var.double(), ref64.running_var, rtol=1e-4, atol=0)
    torch.testing.assert_close(fused.running_mean.double(), ref64.running_mean, rtol=1e-6, atol=0)


@compiled
def test_float32_gradients_against_float64_reference():
    """The compiled float32 backward against autograd through PyTorch's batch norm in float64."""
    z, r, g, bn = problem((6, 16, 5, 5), seed=2)
    y = batch_norm_relu(copy.deepcopy(bn), z, r)
    grads = torch.autograd.grad(y, [z, r], g)
    z64, r64 = z.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    y64 = reference(copy.deepcopy(bn).double(), z64, r64)
    ref = torch.autograd.grad(y64, [z64, r64], g.double())
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@compiled
def test_double_backward_under_create_graph():
    """The gradient of ‖∂L/∂z‖² with respect to γ, through the compiled forward, equals PyTorch's."""
    z, r, g, bn = problem((4, 16, 4, 4), seed=3)
    fused = copy.deepcopy(bn)
    results = []
    for y, weight in ((reference(bn, z, r), bn.weight), (batch_norm_relu(fused, z, r), fused.weight)):
        (dz,) = torch.autograd.grad(y, z, g, create_graph=True)
        results.append(torch.autograd.grad(dz.square().sum(), weight)[0])
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["eval", "float64", "contiguous", "hook", "global"])
def test_other_cases_run_batch_norm_itself(case):
    """Evaluation, float64, a contiguous (not channels-last) input, a module with a hook and the distributed
    ``GlobalBatchNorm2d`` (its own forward) go through ``bn`` itself, with its result."""
    z, r, _, bn = problem((4, 16, 5, 5), seed=4)
    if case == "eval":
        bn.eval()
    elif case == "float64":
        bn, z, r = bn.double(), z.double(), r.double()
    elif case == "contiguous":
        z = z.contiguous()
    elif case == "global":
        converted = GlobalBatchNorm2d(bn.num_features)
        converted.load_state_dict(bn.state_dict())
        bn = converted
    expected = reference(copy.deepcopy(bn), z, r)
    calls = []
    if case == "hook":
        bn.register_forward_hook(lambda *args: calls.append(1))
    y = batch_norm_relu(bn, z, r)
    assert calls == ([1] if case == "hook" else [])
    assert type(y.grad_fn).__name__ != "_BatchNormReLUFunctionBackward"
    torch.testing.assert_close(y, expected)


def test_residual_of_another_shape_is_a_clear_error():
    z, r, _, bn = problem((2, 16, 4, 4))
    with pytest.raises(ValueError, match="residual of shape"):
        batch_norm_relu(bn, z, r[:, :8])


@compiled
def test_self_check_detects_wrong_kernels():
    """The numpy self-check passes for the real library and names the first wrong result of one that writes
    nothing."""
    assert bnr._self_check(bnr.KERNELS.get()) == ""

    class WritesNothing:
        def bn_relu_forward(self, *args):
            return 1

        bn_relu_backward = bn_relu_backward_coefficients = bn_relu_forward

    assert bnr._self_check(WritesNothing()).startswith("output differs from numpy")


def test_numpy_reference_matches_autograd():
    """The self-check's reference itself, against autograd in float64."""
    rng = np.random.default_rng(1)
    x, r, g = (rng.standard_normal((30, 5)) for _ in range(3))
    gamma, beta = rng.uniform(0.5, 1.5, 5), rng.uniform(-1, 1, 5)
    y, dx, dr, dgamma, dbeta = bnr._reference(x, r, gamma, beta, 1e-5, g)  # dr: the masked g
    tx, tr, tg, tb = (torch.tensor(a, requires_grad=True) for a in (x, r, gamma, beta))
    ty = torch.relu((tx - tx.mean(0)) / torch.sqrt(tx.var(0, unbiased=False) + 1e-5) * tg + tb + tr)
    grads = torch.autograd.grad(ty, [tx, tr, tg, tb], torch.tensor(g))
    for a, b in zip((y, dx, dr, dgamma, dbeta), [ty] + list(grads)):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-10, atol=1e-10)


def sequential_pair(seed=5):
    gen = torch.Generator().manual_seed(seed)
    layers = [nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
              nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU()]
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                p.uniform_(-1, 1, generator=gen)
    plain = nn.Sequential(*layers).to(memory_format=CL)
    x = torch.randn(4, 3, 9, 9, generator=gen).contiguous(memory_format=CL)
    return plain, bnr.BatchNormReLUSequential(*copy.deepcopy(list(plain))), x


@compiled
def test_sequential_fuses_batch_norm_and_relu():
    """Both (BatchNorm2d, ReLU) pairs run fused; output, parameter gradients and running statistics equal
    ``nn.Sequential``'s; the state-dict keys are the same."""
    plain, fused, x = sequential_pair()
    assert list(fused.state_dict()) == list(plain.state_dict())
    calls = []
    original = bnr._BatchNormReLUFunction.apply
    bnr._BatchNormReLUFunction.apply = lambda *args: calls.append(1) or original(*args)
    try:
        y = fused(x)
    finally:
        bnr._BatchNormReLUFunction.apply = original
    assert len(calls) == 2
    y_ref = plain(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, list(fused.parameters()), g),
                    torch.autograd.grad(y_ref, list(plain.parameters()), g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(fused.buffers(), plain.buffers()):
        torch.testing.assert_close(a, b)


def test_sequential_keeps_a_hooked_relu():
    """A ReLU with a hook is called as a module (its hook fires), in training and in evaluation."""
    plain, fused, x = sequential_pair()
    calls = []
    fused[2].register_forward_hook(lambda *args: calls.append(1))
    for training in (True, False):
        plain.train(training), fused.train(training)
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)
    assert calls == [1, 1]


@compiled
@pytest.mark.parametrize("size", [(6, 7), (9, 30)], ids=["one-window", "windows"])
@pytest.mark.parametrize("boundary", ["zeros", "circular"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_conv_batch_norm_relu_matches_the_unfused_layers(boundary, with_residual, size):
    """A lean operator sums the batch's moments (about the running mean) as it writes its output and batch norm
    skips its reduction; with the zero boundary the lean backward also computes batch norm's input gradient
    itself (on 30-pixel rows in windows of several tiles with a partial last one). Three steps give the outputs,
    every gradient and the running statistics of ``batch_norm_relu(bn, conv(x), residual)``, to float
    rounding."""
    from operators import LeanConv

    torch.manual_seed(0)
    conv, bn = LeanConv(5, 16, stencil="cross", boundary=boundary), nn.BatchNorm2d(16)
    twin_conv, twin_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = (torch.randn(4, 5, *size, generator=gen) + 3).contiguous(memory_format=CL).requires_grad_()
        r = torch.randn(4, 16, *size, generator=gen).contiguous(memory_format=CL) if with_residual else None
        y = bnr.conv_batch_norm_relu(conv, bn, x, r)
        fused = "_LeanBatchNormReLUFunction" if boundary == "zeros" else "_BatchNormReLUFunction"
        assert type(y.grad_fn).__name__ == fused + "Backward"
        y_ref = batch_norm_relu(twin_bn, twin_conv(x), r)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * float(y_ref.abs().max()))
        g = torch.randn(y.shape, generator=gen)
        params = [x, conv.pointwise, conv.stencil, bn.weight, bn.bias]
        twin_params = [x, twin_conv.pointwise, twin_conv.stencil, twin_bn.weight, twin_bn.bias]
        for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(y_ref, twin_params, g)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
        torch.testing.assert_close(bn.running_mean, twin_bn.running_mean)
        torch.testing.assert_close(bn.running_var, twin_bn.running_var)
        assert int(bn.num_batches_tracked) == int(twin_bn.num_batches_tracked)


@compiled
def test_fused_lean_batch_norm_double_backward():
    """Under ``create_graph`` the fused layer's backward is differentiable: second derivatives match the unfused
    layers'."""
    from operators import LeanConv

    conv, bn = LeanConv(16, 16, stencil="cross"), nn.BatchNorm2d(16)
    twin_conv, twin_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    x = torch.randn(2, 16, 5, 5).contiguous(memory_format=CL).requires_grad_()
    r = torch.randn(2, 16, 5, 5).contiguous(memory_format=CL)
    second = []
    for c, b in ((conv, bn), (twin_conv, twin_bn)):
        y = bnr.conv_batch_norm_relu(c, b, x, r) if c is conv else batch_norm_relu(b, c(x), r)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        second.append(torch.autograd.grad(gx.square().sum(), [x, c.pointwise, b.weight]))
    for a, b in zip(*second):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    y = bnr.conv_batch_norm_relu(conv, bn, x.detach(), r)  # an input without gradient: the weights' alone
    (gp,) = torch.autograd.grad(y.square().sum(), conv.pointwise, create_graph=True)
    assert gp.requires_grad


@compiled
@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "pytorch"])
@pytest.mark.parametrize("widths", [(16, 16), (8, 16)], ids=["identity", "zero-channels"])
def test_residual_block_matches_the_unfused_layers(widths, fused):
    """``residual_block``, ``ReLU(BN(K₂ ReLU(BN(K₁ x))) + Q x)`` with the shortcut ``Q x`` (identity, or zero
    channels appended): the second layer keeps its ReLU mask as bytes and hands the shortcut's gradient to the
    first layer's kernel. Two steps give the outputs, every gradient, the running statistics and second
    derivatives of the unfused layers with ``F.pad``; with the kernels disabled, the same through PyTorch."""
    import contextlib

    import torch.nn.functional as F

    from operators import LeanConv

    c_in, c = widths
    torch.manual_seed(0)
    layers = [LeanConv(c_in, c, stencil="cross"), nn.BatchNorm2d(c), LeanConv(c, c, stencil="cross"), nn.BatchNorm2d(c)]
    twins = copy.deepcopy(layers)
    gen = torch.Generator().manual_seed(1)

    def block(conv1, bn1, conv2, bn2, x, ours):
        if ours:
            return bnr.residual_block(conv1, bn1, conv2, bn2, x, c)
        return batch_norm_relu(bn2, conv2(batch_norm_relu(bn1, conv1(x))), F.pad(x, (0, 0, 0, 0, 0, c - c_in)))

    with contextlib.nullcontext() if fused else native.disabled():
        for _ in range(2):
            x = torch.randn(3, c_in, 6, 9, generator=gen).contiguous(memory_format=CL).requires_grad_()
            y = block(*layers, x, True)
            if fused:
                assert type(y.grad_fn).__name__ == "_LeanBatchNormReLUFunctionBackward"
                assert y.grad_fn.saved_tensors[-1].dtype == torch.int8  # the mask bytes, not y
            y_ref = block(*twins, x, False)
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * float(y_ref.abs().max()))
            g = torch.randn(y.shape, generator=gen)
            params = [x] + [p for layer in layers for p in layer.parameters()]
            twin_params = [x] + [p for layer in twins for p in layer.parameters()]
            for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(y_ref, twin_params, g)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
            for bn, twin in ((layers[1], twins[1]), (layers[3], twins[3])):
                torch.testing.assert_close(bn.running_mean, twin.running_mean)
                torch.testing.assert_close(bn.running_var, twin.running_var)
        second = []
        for conv1, *rest in (layers, twins):
            y = block(conv1, *rest, x, conv1 is layers[0])
            (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
            second.append(torch.autograd.grad(gx.square().sum(), [x, conv1.pointwise]))
        for a, b in zip(*second):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    with pytest.raises(ValueError, match="shortcut needs an integer channel count"):
        bnr.residual_block(*layers, x, c_in - 1)


@compiled
def test_conv_batch_norm_relu_falls_back_where_the_moments_cannot_come_from_the_kernel():
    """A dense operator, a lean one with a hook, evaluation mode and batch norm without running statistics:
    ``batch_norm_relu(bn, conv(x))``, and the hook runs."""
    from operators import DenseConv, LeanConv

    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=CL)
    hooked = LeanConv(8, 8, stencil="cross")
    calls = []
    hooked.register_forward_hook(lambda *args: calls.append(1))
    cases = [(DenseConv(8, 8), nn.BatchNorm2d(8)), (hooked, nn.BatchNorm2d(8)),
             (LeanConv(8, 8, stencil="cross"), nn.BatchNorm2d(8).eval()),
             (LeanConv(8, 8, stencil="cross"), nn.BatchNorm2d(8, track_running_stats=False))]
    for conv, bn in cases:
        twin_conv, twin_bn = copy.deepcopy(conv), copy.deepcopy(bn)
        torch.testing.assert_close(bnr.conv_batch_norm_relu(conv, bn, x), batch_norm_relu(twin_bn, twin_conv(x)))
    assert calls == [1, 1]  # the hooked operator's and its copy's


@compiled
def test_wrong_moments_are_a_clear_error():
    z, _, _, bn = problem((2, 4, 3, 3))
    with pytest.raises(ValueError, match="moments for 4 channels"):
        batch_norm_relu(bn, z, None, (torch.zeros(4), torch.zeros(2, 3, dtype=torch.float64)))
