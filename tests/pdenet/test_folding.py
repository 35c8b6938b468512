"""Inference fusion (``fuse(model, inference=True)``): batch norms folded into the operators before them, lean
layers as one ``lean_conv_affine`` call. Outputs equal the eval-mode model for every named configuration; the
operator against its plain composition; what is left and why; the one-way rules."""
import copy

import pytest
import torch
from torch import nn

import pdenet_kernels
from operators import DenseConv, LeanConv, LeanConv2d
from pdenet import build_model, fuse, unfuse
from pdenet.configs import list_configs
from pdenet.folding import FoldedBasicBlock, FoldedChain, FoldedConv, batch_norm_affine, fold
from pdenet.fusion import is_fused
from pdenet_kernels.ops import lean_conv_affine, lean_conv_affine_reference

compiled = pytest.mark.skipif(not pdenet_kernels.available(), reason=f"compiled kernels: {pdenet_kernels.status()}")


def trained_looking(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with batch-norm statistics and affine weights away from their initial values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5, generator=gen)
                    m.bias.uniform_(-0.3, 0.3, generator=gen)
    return model.eval()


def ops_run(model, x) -> dict[str, int]:
    """How often each operator ran in one forward, as PyTorch's profiler records it."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x)
    return {event.key: event.count for event in prof.key_averages()}


@pytest.mark.parametrize("name", list_configs())
def test_folded_model_equals_the_eval_mode_model(name):
    torch.manual_seed(0)
    segmentation = "segnet" in name
    model = trained_looking(build_model(name, num_classes=5, in_channels=3))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        report = fuse(model, inference=True)
        got = model(x)
    scale = expected.abs().max()
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * float(scale))
    assert is_fused(model) and report.purpose == "inference"
    assert report.fused or segmentation, str(report)


@compiled
def test_lean_resnet_runs_its_blocks_as_one_operator_call_and_no_batch_norm():
    model = trained_looking(build_model("lean-resnet20"))
    report = fuse(model, inference=True)
    assert report.fused == {"stem.0": "operator + batch norm pair", "stages": "chain of residual blocks"}
    assert not report.left
    assert str(report).startswith("fuse: 1 operator + batch norm pair, 1 chain of residual blocks fused for inference")
    assert isinstance(model.stages, FoldedChain) and model.stages.strides == [1, 1, 1, 2, 1, 1, 2, 1, 1]
    counts = ops_run(model, torch.randn(1, 3, 32, 32))
    assert counts["pdenet::residual_chain_inference"] == 1  # all nine blocks (the dense stem sees the image)
    assert not any("batch_norm" in n for n in counts), counts
    assert counts.get("aten::relu", 0) == 1  # the stem's; the blocks' ReLUs run inside the lean kernel
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_what_is_left_is_named_with_why():
    model = trained_looking(build_model("pde-parabolic-lean"))  # batch norm inside its blocks
    report = fuse(model, inference=True)
    assert report.left, str(report)
    assert all("batch norm that does not directly follow an operator" in why for why in report.left.values())
    assert "left as is" in str(report)

    block_model = trained_looking(build_model("lean-resnet20", operator="grouped", operator_kwargs={"groups": 2}))
    report = fuse(block_model, inference=True)
    assert any("GroupedConv is not implemented" in why for why in report.left.values()), str(report)


def test_training_mode_is_refused_and_folding_is_one_way():
    model = build_model("lean-resnet20")
    with pytest.raises(ValueError, match="model.eval"):
        fuse(model, inference=True)
    model.eval()
    fuse(model, inference=True)
    again = fuse(model, inference=True)  # idempotent: nothing left to fold
    assert not again.fused
    with pytest.raises(ValueError, match="cannot be undone"):
        unfuse(model)
    with pytest.raises(ValueError, match="cannot be fused for training"):
        fuse(model)


def test_a_folded_chain_alone_counts_as_folded():
    model = build_model("lean-resnet20").eval()
    fuse(model, inference=True)
    chain_only = nn.Sequential(model.stages)
    assert is_fused(chain_only)
    with pytest.raises(ValueError, match="cannot be undone"):
        unfuse(chain_only)


def test_a_model_fused_for_training_can_be_folded_for_inference():
    model = trained_looking(build_model("lean-resnet20"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    fuse(model)
    model.eval()
    fuse(model, inference=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=2e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("kind", ["lean", "strided lean", "LeanConv2d", "dense", "conv2d"])
def test_fold_scales_each_output_channel_and_adds_the_shift(kind):
    torch.manual_seed(1)
    conv = {"lean": lambda: LeanConv(6, 4, stencil="full"), "strided lean": lambda: LeanConv(6, 4, stride=2),
            "LeanConv2d": lambda: LeanConv2d(6, 4, 3, stride=2, padding=0),
            "dense": lambda: DenseConv(6, 4, boundary="circular"),
            "conv2d": lambda: nn.Conv2d(6, 4, 3, padding=1, bias=True)}[kind]().double()
    bn = trained_looking(nn.BatchNorm2d(4).double())
    folded, bias = fold(conv, bn)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    layer = FoldedConv(folded, bias, None)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), bn(conv(x)))
    scale, shift = batch_norm_affine(bn)
    torch.testing.assert_close(scale, bn.weight / torch.sqrt(bn.running_var + bn.eps))


def test_folded_model_is_differentiable_like_the_eval_mode_model():
    model = trained_looking(build_model("lean-resnet20").double())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(model(x).square().sum(), x)
    fuse(model, inference=True)
    (got,) = torch.autograd.grad(model(x).square().sum(), x)
    torch.testing.assert_close(got, expected)


def test_folded_block_keeps_the_projection_shortcut():
    model = trained_looking(build_model("lean-resnet18", num_classes=3))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        fuse(model, inference=True)
        blocks = [m for m in model.modules() if isinstance(m, FoldedBasicBlock)]
        assert any(b.projection is not None for b in blocks)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=2e-5 * float(expected.abs().max()))


# ------------------------------------------------------------------------------------ the registered operator
def affine_problem(c_in=16, c_out=32, shape=(2, 9, 11), seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    op = LeanConv(c_in, c_out).to(dtype)
    x = torch.randn(shape[0], c_in, *shape[1:], generator=gen, dtype=dtype)
    bias = torch.randn(c_out, generator=gen, dtype=dtype)
    residual = torch.randn(shape[0], c_out, *shape[1:], generator=gen, dtype=dtype)
    return op, x, bias, residual


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("channels", [(16, 32), (5, 7), (32, 16)], ids=str)
@pytest.mark.parametrize("circular", [False, True], ids=["zeros", "circular"])
def test_lean_conv_affine_matches_its_plain_composition(relu, with_residual, channels, circular):
    op, x, bias, residual = affine_problem(*channels)
    residual = residual if with_residual else None
    args = (x, op.pointwise, op.stencil, op.stencil_index, 3, circular, 1, bias, residual, relu)
    with torch.no_grad():
        got = lean_conv_affine(*args)
        reference = lean_conv_affine_reference(*args)
        in_float64 = lean_conv_affine_reference(*(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                                                  else a for a in args))
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), in_float64, rtol=1e-5, atol=1e-5)
    if relu:
        assert (got >= 0).all()


@compiled
def test_lean_conv_affine_is_one_kernel_call_with_a_channels_last_output():
    op, x, bias, residual = affine_problem()
    with torch.no_grad():
        y = torch.ops.pdenet.lean_conv_affine(x, op.pointwise, op.stencil, op.stencil_index, 3, False, 1, bias,
                                              residual, True)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_lean_conv_affine_opcheck_and_errors():
    op, x, bias, residual = affine_problem(c_in=4, c_out=6, shape=(1, 5, 5))
    args = (x, op.pointwise.detach(), op.stencil.detach(), op.stencil_index, 3, False, 1, bias, residual, True)
    torch.library.opcheck(torch.ops.pdenet.lean_conv_affine.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="bias must have shape \\(6,\\)"):
        lean_conv_affine(x, op.pointwise, op.stencil, op.stencil_index, 3, False, 1, bias[:5])
    with pytest.raises(ValueError, match="residual the output's shape"):
        with torch.no_grad():
            lean_conv_affine(x, op.pointwise, op.stencil, op.stencil_index, 3, False, 1, bias, residual[:, :3])


def test_lean_conv_affine_gradients_in_float64():
    op, x, bias, residual = affine_problem(c_in=3, c_out=4, shape=(1, 4, 5), dtype=torch.float64)
    x.requires_grad_()
    bias.requires_grad_()
    residual.requires_grad_()

    def f(x, pointwise, stencil, bias, residual):
        return lean_conv_affine(x, pointwise, stencil, op.stencil_index, 3, False, 1, bias, residual, True)

    assert torch.autograd.gradcheck(f, (x, op.pointwise, op.stencil, bias, residual))


@pytest.mark.parametrize("channels", [(16, 16), (16, 32), (5, 7)], ids=str)
def test_residual_block_inference_matches_two_affine_layers(channels):
    from pdenet_kernels.ops import residual_block_inference

    c_in, c_out = channels
    op1, x, bias1, _ = affine_problem(c_in, c_out, seed=1)
    op2, _, bias2, residual = affine_problem(c_out, c_out, seed=2)
    taps = op1.stencil_index
    with torch.no_grad():
        got = residual_block_inference(x, residual, taps, 3, False, 1, (op1.pointwise, op1.stencil, bias1),
                                       (op2.pointwise, op2.stencil, bias2))
        h = lean_conv_affine_reference(x, op1.pointwise, op1.stencil, taps, 3, False, 1, bias1, None, True)
        expected = lean_conv_affine_reference(h, op2.pointwise, op2.stencil, taps, 3, False, 1, bias2, residual, True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    args = (x, residual, taps, 3, False, 1, op1.pointwise.detach(), op1.stencil.detach(), bias1,
            op2.pointwise.detach(), op2.stencil.detach(), bias2)
    torch.library.opcheck(torch.ops.pdenet.residual_block_inference.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="residual_block_inference: the bias must have shape"):
        torch.ops.pdenet.residual_block_inference(*args[:-1], bias2[:-1])
    with pytest.raises(ValueError, match="residual_block_inference: pointwise of shape .* does not take"):
        torch.ops.pdenet.residual_block_inference(*args[:-3], args[-3][:, :-1], *args[-2:])


def chain_problem(in_channels=16, widths=(16, 32, 32, 64), strides=(1, 2, 1, 2), seed=0, dtype=torch.float32):
    from pdenet_kernels.ops import chain_weight_shapes

    gen = torch.Generator().manual_seed(seed)
    shapes = chain_weight_shapes(in_channels, list(widths), 1, 5)
    packed = torch.cat([0.3 * torch.randn(shape, generator=gen, dtype=dtype).reshape(-1) for shape in shapes])
    return packed, list(strides), list(widths), LeanConv(4, 4).stencil_index


@pytest.mark.parametrize("image", [(2, 32, 32), (1, 9, 7), (3, 5, 6)], ids=str)
@pytest.mark.parametrize("circular", [False, True], ids=["zeros", "circular"])
def test_residual_chain_inference_matches_block_by_block(image, circular):
    from pdenet_kernels.ops import residual_chain_inference, residual_chain_inference_reference

    packed, strides, widths, taps = chain_problem()
    x = torch.randn(image[0], 16, *image[1:])
    with torch.no_grad():
        got = residual_chain_inference(x, taps, 3, circular, 1, strides, widths, packed)
        expected = residual_chain_inference_reference(x.double(), taps, 3, circular, 1, strides, widths,
                                                      packed.double())
    assert got.shape == (image[0], 64, (image[1] + 3) // 4, (image[2] + 3) // 4)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_residual_chain_inference_opcheck_errors_and_gradients():
    from pdenet_kernels.ops import residual_chain_inference

    packed, strides, widths, taps = chain_problem(widths=(4, 6), strides=(1, 2), in_channels=4)
    x = torch.randn(1, 4, 5, 5)
    args = (x, taps, 3, False, 1, strides, widths, packed)
    torch.library.opcheck(torch.ops.pdenet.residual_chain_inference.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="must hold .* numbers"):
        torch.ops.pdenet.residual_chain_inference(x, taps, 3, False, 1, strides, widths, packed[:-1])
    with pytest.raises(ValueError, match="at least its input's channels"):
        torch.ops.pdenet.residual_chain_inference(x, taps, 3, False, 1, strides, [4, 3], packed)
    with pytest.raises(ValueError, match="stride 1 or 2"):
        torch.ops.pdenet.residual_chain_inference(x, taps, 3, False, 1, [1, 3], widths, packed)
    x64 = x.double().requires_grad_()
    packed64 = packed.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, p: residual_chain_inference(x, taps, 3, False, 1, strides, widths, p), (x64, packed64))


def test_folded_model_compiles():
    model = trained_looking(build_model("lean-resnet20"))
    fuse(model, inference=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        got = torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
