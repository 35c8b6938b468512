"""``LeanConv2d`` against ``nn.Conv2d`` on everything they share: arguments, shapes, values, layout, dtype, state."""
from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pdenet
from operators import LeanConv, LeanConv2d, count_flops

CL = torch.channels_last
PADDINGS = [0, 1, 2, (1, 2), (0, 3), "same", "valid"]


def pair(layer: LeanConv2d, **kwargs) -> nn.Conv2d:
    """The ``nn.Conv2d`` with ``layer``'s arguments and its equivalent weights."""
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                     groups=layer.groups, bias=layer.bias is not None, padding_mode=layer.padding_mode, **kwargs)
    with torch.no_grad():
        conv.weight.copy_(layer.weight)
        if layer.bias is not None:
            conv.bias.copy_(layer.bias)
    return conv


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_shapes_and_values_equal_conv2d(kernel_size, stride, padding_mode):
    """Every allowed stride/padding combination, odd and even inputs, with and without groups and bias."""
    for padding, (c_in, c_out, groups), bias in itertools.product(PADDINGS, [(4, 6, 1), (6, 6, 3)], [True, False]):
        if padding == "same" and stride > 1:
            continue
        torch.manual_seed(0)
        layer = LeanConv2d(c_in, c_out, kernel_size, stride, padding, groups=groups, bias=bias,
                           padding_mode=padding_mode, dtype=torch.float64)
        conv = pair(layer, dtype=torch.float64)
        assert layer.weight.shape == conv.weight.shape == (c_out, c_in // groups, kernel_size, kernel_size)
        for n1, n2 in [(7, 8), (8, 9), (6, 6), (9, 5)]:
            x = torch.randn(2, c_in, n1, n2, dtype=torch.float64)
            out = layer(x)
            assert out.shape == conv(x).shape, (padding, n1, n2)
            torch.testing.assert_close(out, conv(x), rtol=1e-12, atol=1e-12)
            if padding_mode == "zeros":
                expected = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, 1, groups)
                torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
@pytest.mark.parametrize("stride,padding", [(1, 1), (1, 0), (2, 1), (2, 0)])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_float32_output_follows_the_input_layout(fmt, stride, padding, padding_mode):
    """Float32 at stride 1 and padding 1 runs the compiled kernel (channels-last inside); the output still has
    the input's layout, so ``.view(b, -1)`` works after an NCHW input as after ``nn.Conv2d``."""
    torch.manual_seed(1)
    layer = LeanConv2d(16, 16, 3, stride, padding, padding_mode=padding_mode)
    conv = pair(layer)
    x = torch.randn(2, 16, 9, 8).contiguous(memory_format=fmt)
    out = layer(x)
    assert out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)
    if fmt == torch.contiguous_format:
        assert out.view(2, -1).shape == (2, out[0].numel())
        torch.testing.assert_close(layer(x[0]), conv(x[0]), rtol=1e-5, atol=1e-5)  # unbatched, as nn.Conv2d


@pytest.mark.parametrize("kwargs", [
    {"groups": 0}, {"groups": -2}, {"in_channels": 6, "groups": 4}, {"out_channels": 6, "groups": 4},
    {"padding": "full"}, {"padding": "same", "stride": 2}, {"padding_mode": "wrap"},
], ids=str)
def test_rejects_what_conv2d_rejects(kwargs):
    args = {"in_channels": 4, "out_channels": 4, "kernel_size": 3, **kwargs}
    with pytest.raises(ValueError):
        nn.Conv2d(**args)
    with pytest.raises(ValueError):
        LeanConv2d(**args)


@pytest.mark.parametrize("kwargs, match", [
    ({"dilation": 2}, r"dilation \(2, 2\): lean convolutions take dilation 1"),
    ({"kernel_size": 4}, r"kernel_size \(4, 4\): a lean stencil needs an odd size"),
    ({"kernel_size": (3, 5)}, r"kernel_size \(3, 5\): a lean kernel is square"),
    ({"stride": (2, 1)}, r"stride \(2, 1\): lean convolutions take the same stride on both axes"),
    ({"stride": 0}, "stride must be positive"),
    ({"padding": -1}, "padding must be non-negative"),
    ({"padding_mode": "reflect"}, "padding_mode 'reflect': lean convolutions take"),
    ({"padding_mode": "replicate"}, "padding_mode 'replicate': lean convolutions take"),
    ({"out_channels": 8, "groups": 2}, "groups=2 with in_channels=4 != out_channels=8"),
], ids=str)
def test_rejects_what_a_lean_kernel_cannot_represent(kwargs, match):
    args = {"in_channels": 4, "out_channels": 4, "kernel_size": 3, **kwargs}
    nn.Conv2d(**args)  # accepted there
    with pytest.raises(ValueError, match=match):
        LeanConv2d(**args)


def test_argument_types():
    with pytest.raises(ValueError, match="unknown stencil 'star'"):
        LeanConv2d(4, 4, 3, stencil="star")
    with pytest.raises(ValueError, match="in_channels must be a positive integer, got 0"):
        LeanConv2d(0, 4, 3)
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair of ints, got '3'"):
        LeanConv2d(4, 4, "3")
    with pytest.raises(TypeError, match=r"padding must be an int or a pair of ints, got \(1, 1, 1\)"):
        LeanConv2d(4, 4, 3, padding=(1, 1, 1))
    layer = LeanConv2d(4, 4, [3, 3], [2, 2], [1, 1])
    assert (layer.kernel_size, layer.stride, layer.padding, layer.dilation) == ((3, 3), (2, 2), (1, 1), (1, 1))


def test_repr_matches_conv2d():
    for args, kwargs in [((4, 8, 3), {}), ((4, 8, 3, 2, 1), {"bias": False}),
                         ((6, 6, 5), {"padding": "same", "groups": 3, "padding_mode": "circular"})]:
        lean, conv = LeanConv2d(*args, **kwargs), nn.Conv2d(*args, **kwargs)
        assert lean.extra_repr() == conv.extra_repr() + ", stencil='cross'"
    assert "LeanConv(4, 8, kernel_size=3, stride=2" in repr(LeanConv2d(4, 8, 3, 2, 1))


def test_parameters_weight_and_analysis():
    torch.manual_seed(2)
    layer = LeanConv2d(8, 8, 3, stride=2, padding=1, groups=2, padding_mode="circular")
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"operator.pointwise", "operator.stencil", "bias"}
    assert sum(p.numel() for p in layer.parameters()) == 8 * 8 // 2 + 5 * 8 + 8
    assert isinstance(layer.operator, LeanConv) and layer.operator.stride == 2
    layer.weight.sum().backward()  # computed from the lean parameters, differentiably
    assert layer.operator.pointwise.grad is not None and layer.operator.stencil.grad is not None
    assert layer.symbol((8, 6)).shape == (4, 3, 8, 4 * 8)
    exact = float(torch.linalg.svdvals(layer.operator.double().to_matrix((4, 4)))[0])
    assert layer.spectral_norm((4, 4)) == pytest.approx(exact, rel=1e-10)
    assert layer.singular_values((4, 4))[0].item() == pytest.approx(exact, rel=1e-10)
    torch.testing.assert_close(layer.equivalent_dense_weight(), layer.operator.equivalent_dense_weight())
    assert pdenet.LeanConv2d is LeanConv2d


def test_reset_parameters():
    torch.manual_seed(3)
    layer = LeanConv2d(16, 16, 3)
    before = [p.detach().clone() for p in layer.parameters()]
    layer.reset_parameters()
    bound = 1 / math.sqrt(16 + 5)
    for old, new in zip(before, layer.parameters()):
        assert not torch.equal(old, new) and new.abs().max() <= bound
    LeanConv2d(4, 4, 3, bias=False).reset_parameters()


def test_dtype_device_to_and_state_dict_round_trip():
    layer = LeanConv2d(4, 6, 3, 2, 1, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    x = torch.randn(2, 4, 7, 7)
    layer32 = layer.to(torch.float32)
    assert layer32 is layer and layer.weight.dtype == torch.float32
    torch.testing.assert_close(layer(x), pair(layer)(x), rtol=1e-5, atol=1e-5)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    torch.manual_seed(4)
    other = LeanConv2d(4, 6, 3, 2, 1)
    assert not torch.equal(other(x), layer(x))
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(other(x), layer(x))
    assert set(layer.state_dict()) == {"operator.pointwise", "operator.stencil", "bias"}


@pytest.mark.parametrize("stride,padding,padding_mode", [(1, 1, "zeros"), (1, 1, "circular"), (2, 0, "zeros"),
                                                         (2, 2, "circular"), (1, "valid", "zeros")])
def test_gradcheck(stride, padding, padding_mode):
    torch.manual_seed(5)
    layer = LeanConv2d(3, 4, 3, stride, padding, padding_mode=padding_mode, dtype=torch.float64)
    x = torch.randn(1, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *layer.parameters()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_flops_are_the_lean_ones_on_the_output_grid(dtype):
    for stride, padding in itertools.product([1, 2], [0, 1, 2]):
        layer = LeanConv2d(8, 8, 3, stride, padding, dtype=dtype)
        x = torch.randn(2, 8, 9, 8, dtype=dtype)
        layer(x)  # warm-up: the compiled kernel's one-time probe
        out = layer(x)
        assert count_flops(layer, x) == 2 * layer.operator.macs_per_pixel() * out[:, 0].numel()
        if padding == 1:
            assert count_flops(layer, x) == layer.operator.flops(x.shape)
