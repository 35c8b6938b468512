"""Networks: shapes at 28x28 and 32x32, reference parameter counts, the downsampling maths, width matching."""
import pytest
import torch
import torch.nn.functional as F

from pdenet.networks import MobileNetV2, PDEResNet, ResNet, ShuffleNetV2, cifar_resnet, make_divisible, match_width
from pdenet.networks import resnet18, resnet20, resnet34
from pdenet.networks.layers import downsample2x
from pdenet.networks.resnet import BasicBlock


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ reference parameter counts
def test_resnet20_dense_has_he_et_al_parameter_count():
    # 267,696 conv + 1,376 batch-norm + 650 classifier weights: the 0.27M of He et al. (option A).
    assert n_params(resnet20(operator="dense")) == 269_722


@pytest.mark.parametrize("factory, count", [(resnet18, 11_689_512), (resnet34, 21_797_672)])
def test_imagenet_layout_matches_torchvision_parameter_count(factory, count):
    assert n_params(factory(operator="dense", num_classes=1000)) == count


@pytest.mark.parametrize("cls, count", [(MobileNetV2, 3_504_872), (ShuffleNetV2, 2_278_604)])
def test_baselines_match_torchvision_parameter_count_at_width_one(cls, count):
    assert n_params(cls(num_classes=1000)) == count


# ------------------------------------------------------------------ shapes
SMALL_NETS = {
    "resnet20-lean": lambda c: resnet20(in_channels=c, operator="lean"),
    "resnet20-grouped": lambda c: resnet20(in_channels=c, operator="grouped", operator_kwargs={"groups": 4}),
    "resnet20-separable-B": lambda c: resnet20(in_channels=c, operator="separable", shortcut="B"),
    "resnet18-imagenet-stem": lambda c: ResNet((1, 1, 1, 1), (8, 16, 16, 32), in_channels=c, stem="imagenet",
                                               shortcut="B", operator="lean"),
    "mobilenetv2": lambda c: MobileNetV2(in_channels=c, width_mult=0.25),
    "shufflenetv2": lambda c: ShuffleNetV2(in_channels=c, width_mult=0.25),
    "pde-resnet": lambda c: PDEResNet(in_channels=c, widths=(8, 16, 16), nt=2, h=0.5),
}


@pytest.mark.parametrize("name", sorted(SMALL_NETS))
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 37)])
def test_forward_backward_shapes(name, channels, size):
    torch.manual_seed(0)
    model = SMALL_NETS[name](channels)
    x = torch.randn(2, channels, size, size)
    out = model(x)
    assert out.shape == (2, 10)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["resnet20-lean", "mobilenetv2", "shufflenetv2"])
def test_channels_last_input_gives_same_output(name):
    torch.manual_seed(0)
    model = SMALL_NETS[name](3).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    out = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ the mathematics of the layers
@pytest.mark.parametrize("n", [7, 8])
def test_downsample2x_averages_windows_and_matches_strided_conv_size(n):
    x = torch.randn(1, 2, n, n, dtype=torch.float64)
    y = downsample2x(x)
    m = (n + 1) // 2
    assert y.shape == (1, 2, m, m) == F.conv2d(x, torch.ones(2, 2, 3, 3, dtype=x.dtype), stride=2, padding=1).shape
    torch.testing.assert_close(y[..., 0, 0], x[..., :2, :2].mean(dim=(-1, -2)))
    # the clipped last window averages only the pixels inside the image
    torch.testing.assert_close(y[..., -1, -1], x[..., 2 * m - 2:, 2 * m - 2:].mean(dim=(-1, -2)))


def test_downsampling_block_applies_operator_to_pooled_input():
    torch.manual_seed(0)
    block = BasicBlock(4, 8, stride=2, operator="dense", shortcut="B").double().eval()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    d = downsample2x(x)
    h = F.relu(block.bn1(F.conv2d(d, block.conv1.weight, padding=1)))
    ref = F.relu(block.bn2(F.conv2d(h, block.conv2.weight, padding=1)) + block.projection(d))
    torch.testing.assert_close(block(x), ref)


def test_option_a_shortcut_pads_pooled_input_with_zero_channels():
    block = BasicBlock(3, 5, stride=2, operator="dense", shortcut="A").double().eval()
    for p in block.parameters():
        torch.nn.init.zeros_(p)  # residual branch is zero, so y = ReLU(pad(D x))
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    ref = F.relu(torch.cat([downsample2x(x), torch.zeros(1, 2, 3, 3, dtype=x.dtype)], dim=1))
    torch.testing.assert_close(block(x), ref)


def test_pde_connecting_layer_pooling_commutes_with_1x1_conv():
    torch.manual_seed(0)
    net = PDEResNet(widths=(4, 6), nt=1, operator="dense").double().eval()
    connect = net.stages[1]
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    conv_then_pool = downsample2x(connect.conv(x))
    torch.testing.assert_close(connect(x), connect.act(connect.bn(conv_then_pool)))


# ------------------------------------------------------------------ width multipliers
def test_make_divisible_rounds_to_multiples_without_losing_more_than_ten_percent():
    assert make_divisible(32 * 0.5, 8) == 16
    assert make_divisible(1280 * 0.35, 8) == 448
    assert make_divisible(10, 8) == 16  # 8 would lose 20%
    assert make_divisible(3, 8) == 8
    with pytest.raises(ValueError, match="divisor"):
        make_divisible(10, 0)


def test_match_width_finds_largest_multiplier_within_budget():
    cls = MobileNetV2
    from pdenet.costs import flops_per_image

    target = 4e6
    w, flops = match_width(lambda w: cls(in_channels=1, width_mult=w, round_to=2), target, (1, 28, 28),
                           low=0.1, high=0.5, iters=5)
    assert flops <= target
    assert flops == flops_per_image(cls(in_channels=1, width_mult=w, round_to=2), (1, 28, 28))
    assert flops_per_image(cls(in_channels=1, width_mult=w + 0.02, round_to=2), (1, 28, 28)) > target
    assert flops > 0.8 * target


def test_match_width_rejects_unreachable_budget():
    with pytest.raises(ValueError, match="above the target"):
        match_width(lambda w: MobileNetV2(width_mult=w), 1e3, (3, 32, 32), iters=2)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("build, match", [
    (lambda: cifar_resnet(21), "6n \\+ 2"),
    (lambda: ResNet((1, 1), (8,)), "equal length"),
    (lambda: ResNet((1,), (8,), stem="huge"), "unknown stem"),
    (lambda: ResNet((1, 1), (8, 16), shortcut="C"), "unknown shortcut"),
    (lambda: ResNet((1, 1), (16, 8), shortcut="A"), "cannot go from 16 to 8"),
    (lambda: ResNet((1,), (8,), in_channels=0), "in_channels"),
    (lambda: ResNet((1,), (8,), operator="nope"), "nope"),
    (lambda: MobileNetV2(width_mult=0), "width_mult"),
    (lambda: ShuffleNetV2(round_to=3), "round_to"),
    (lambda: PDEResNet(widths=()), "widths"),
    (lambda: PDEResNet(num_classes=-1), "num_classes"),
])
def test_bad_arguments_raise_clear_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_operator_kwargs_must_be_a_dict():
    with pytest.raises(TypeError, match="operator_kwargs"):
        resnet20(operator_kwargs=["groups", 2])
