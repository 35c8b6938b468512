"""leanify: which convolutions it replaces, exactness of the dense initialisation, the report."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from operators import DenseConv
from operators.lean import LeanConv
from pdenet.configs import build_model
from pdenet.leanify import BiasedOperator, init_from_dense, leanify


class UserBlock(nn.Module):
    """A user's own residual block written with nn.Conv2d (not built by the toolbox)."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                      if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.short(x))


class UserResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 7, 2, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = nn.Sequential(UserBlock(16, 16, 1), UserBlock(16, 32, 2))
        self.odd = nn.ModuleDict({
            "biased": nn.Conv2d(32, 32, 3, padding=1),                            # eligible, with bias
            "periodic": nn.Conv2d(32, 32, 3, padding=1, padding_mode="circular"),  # eligible
            "same": nn.Conv2d(32, 32, 3, padding="same", bias=False),             # eligible
            "dilated": nn.Conv2d(32, 32, 3, padding=2, dilation=2),
            "grouped": nn.Conv2d(32, 32, 3, padding=1, groups=4),
            "reflect": nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect"),
            "valid": nn.Conv2d(32, 32, 3, padding=0),
        })
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.layer1(self.stem(x))
        for name in ("biased", "periodic", "same", "dilated", "grouped", "reflect"):
            x = self.odd[name](x)
        return self.fc(self.odd["valid"](x).mean((2, 3)))


def eligible(m):
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1) and m.dilation == (1, 1)
            and m.groups == 1 and m.padding in ((1, 1), "same") and m.padding_mode in ("zeros", "circular"))


def test_leanify_user_resnet_replaces_exactly_the_eligible_convolutions():
    torch.manual_seed(0)
    model = UserResNet().eval()
    x = torch.randn(2, 3, 32, 32)
    expected = {n for n, m in model.named_modules() if eligible(m)}
    with_bias = {n for n in expected if model.get_submodule(n).bias is not None}
    others = {n: type(m) for n, m in model.named_modules() if not isinstance(m, nn.Conv2d) and n}
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    shape = model(x).shape

    report = leanify(model)

    assert {r.name for r in report.replaced} == expected
    assert {s.name for s in report.skipped} == convs - expected
    assert len(expected) == 6
    for name in expected:
        new = model.get_submodule(name)
        assert isinstance(new, BiasedOperator) == (name in with_bias)
        lean = new.operator if name in with_bias else new
        assert isinstance(lean, LeanConv)
        assert lean.boundary == ("circular" if name == "odd.periodic" else "zeros")
    assert with_bias == {"odd.biased", "odd.periodic"}
    for name, kind in others.items():  # nothing else was touched
        assert type(model.get_submodule(name)) is kind
    for name in convs - expected:
        assert type(model.get_submodule(name)) is nn.Conv2d
    reasons = {s.name: s.reason for s in report.skipped}
    assert "kernel 7x7" in reasons["stem.0"] and "stride (2, 2)" in reasons["layer1.1.conv1"]
    assert "dilation" in reasons["odd.dilated"] and "groups=4" in reasons["odd.grouped"]
    assert "reflect" in reasons["odd.reflect"] and "padding" in reasons["odd.valid"]
    out = model(x)
    assert out.shape == shape
    out.sum().backward()
    assert "replaced 6, skipped 7" in str(report)


def test_leanify_toolbox_dense_resnet_matches_lean_parameter_budget():
    model = build_model("resnet20")
    before = sum(p.numel() for p in model.parameters())
    report = leanify(model, stencil="cross")
    assert len(report.replaced) == 19 and not report.skipped  # stem + 18 block convolutions
    assert all(r.kind == "DenseConv" for r in report.replaced)
    assert not any(isinstance(m, DenseConv) for m in model.modules())
    assert before - sum(p.numel() for p in model.parameters()) == report.params_before - report.params_after
    assert report.params_before >= 5 * report.params_after
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 10)


def lean_structure_mask(c_out, c_in, groups, stencil):
    """0/1 mask of the dense kernels a LeanConv can represent, built independently of leanify."""
    mask = torch.zeros(c_out, c_in, 3, 3, dtype=torch.float64)
    for o in range(c_out):
        for i in range(c_in):
            if o // (c_out // groups) == i // (c_in // groups):
                mask[o, i, 1, 1] = 1
    taps = {"cross": [(0, 1), (1, 0), (1, 1), (1, 2), (2, 1)], "full": [(p, q) for p in range(3) for q in range(3)],
            "none": []}[stencil]
    for j in range(min(c_in, c_out)):
        for p, q in taps:
            mask[j, j, p, q] = 1
    return mask


CASES = [(6, 6, 1, "cross"), (6, 6, 2, "cross"), (6, 6, 3, "full"), (4, 8, 2, "cross"), (8, 4, 4, "full"),
         (5, 5, 1, "none")]


@pytest.mark.parametrize("c_in, c_out, groups, stencil", CASES)
@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_structured_kernel_is_reproduced_exactly(c_in, c_out, groups, stencil, padding_mode):
    torch.manual_seed(1)
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode=padding_mode).double()
    with torch.no_grad():
        conv.weight.mul_(lean_structure_mask(c_out, c_in, groups, stencil))
    model = nn.Sequential(conv)
    x = torch.randn(2, c_in, 7, 6, dtype=torch.float64)
    ref = model(x)
    report = leanify(model, stencil=stencil, groups=groups)
    assert isinstance(model[0], BiasedOperator) and isinstance(model[0].operator, LeanConv)
    torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)
    assert report.replaced[0].captured == pytest.approx(1.0)


@pytest.mark.parametrize("c_in, c_out, groups, stencil", CASES)
def test_dense_init_is_the_projection_onto_the_lean_structure(c_in, c_out, groups, stencil):
    torch.manual_seed(2)
    w = torch.randn(c_out, c_in, 3, 3, dtype=torch.float64)
    lean = LeanConv(c_in, c_out, stencil=stencil, groups=groups).double()
    captured = init_from_dense(lean, w)
    projected = w * lean_structure_mask(c_out, c_in, groups, stencil)
    torch.testing.assert_close(lean.equivalent_dense_weight(), projected)
    assert captured == pytest.approx(float(projected.norm() / w.norm()))
    x = torch.randn(1, c_in, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(lean(x), F.conv2d(x, projected, padding=1))


def test_random_init_keeps_lean_initialisation_and_reports_no_capture():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False))
    w = model[0].weight.detach().clone()
    report = leanify(model, init="random")
    assert report.replaced[0].captured is None
    assert not torch.allclose(model[0].pointwise, w[:, :, 1, 1])


def test_shared_convolution_is_replaced_once_and_stays_shared():
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    report = leanify(model)
    assert len(report.replaced) == 1
    assert model[0] is model[2] and isinstance(model[0], LeanConv)


def test_report_serialises():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 1))
    d = leanify(model).to_dict()
    assert d["params_before"] == 2 * 4 * 9 + 4 and d["params_after"] == 4 * 2 + 2 * 5 + 4
    assert d["replaced"][0]["bias"] is True and d["skipped"][0]["name"] == "1"


@pytest.mark.parametrize("kwargs, error, match", [
    ({"stencil": "star"}, ValueError, "unknown stencil"),
    ({"init": "zeros"}, ValueError, "unknown init"),
    ({"groups": 0}, ValueError, "groups"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        leanify(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1)), **kwargs)


def test_bad_models():
    with pytest.raises(TypeError, match="nn.Module"):
        leanify("resnet20")
    with pytest.raises(TypeError, match="itself a convolution"):
        leanify(nn.Conv2d(2, 2, 3, padding=1))


# ------------------------------------------------------------------------------ strided convolutions (ResNet-18)
class BasicBlock(nn.Module):
    """torchvision's ResNet ``BasicBlock``: the first 3x3 convolution carries the stride, the shortcut a 1x1
    strided convolution with batch norm."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout (7x7 stride-2 stem, max pooling, four stages of two blocks), narrower."""

    def __init__(self, width=8, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [width, 2 * width, 4 * width, 8 * width]
        stages, inplanes = [], width
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def convs(model, kernel):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (kernel, kernel)}


def test_strided_resnet18_replaces_every_3x3_convolution():
    torch.manual_seed(0)
    model = ResNet18()
    three, seven, one = convs(model, 3), convs(model, 7), convs(model, 1)
    strided = {n for n, m in three.items() if m.stride == (2, 2)}
    assert len(three) == 16 and strided == {"layer2.0.conv1", "layer3.0.conv1", "layer4.0.conv1"}
    assert len(seven) == 1 and len(one) == 3

    report = leanify(model, strided=True)

    assert {r.name for r in report.replaced} == set(three)
    assert {r.name for r in report.replaced if r.stride == 2} == strided
    reasons = {s.name: s.reason for s in report.skipped}
    assert set(reasons) == set(seven) | set(one)
    assert "kernel 7x7 (only 3x3)" in reasons["conv1"]
    assert all("kernel 1x1 (only 3x3)" in reasons[n] for n in one)
    for name in three:
        lean = model.get_submodule(name)
        assert type(lean) is LeanConv and lean.stride == (2 if name in strided else 1)
    assert not convs(model, 3)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert model.layer2[0].conv1.pointwise.grad is not None
    text = str(report)
    assert "strided=True" in text and "replaced layer2.0.conv1: Conv2d 8->16 (zeros, stride 2)" in text
    assert report.to_dict()["replaced"][0]["stride"] == 1


def test_strided_convolutions_are_skipped_by_default_with_the_option_named():
    model = ResNet18()
    report = leanify(model)
    reasons = {s.name: s.reason for s in report.skipped}
    assert len(report.replaced) == 13
    for name in ("layer2.0.conv1", "layer3.0.conv1", "layer4.0.conv1"):
        assert "stride (2, 2)" in reasons[name] and "strided=True" in reasons[name]
    assert "strided" not in str(report).splitlines()[0]


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_strided_dense_init_keeps_outputs_of_lean_structured_kernels(padding_mode):
    torch.manual_seed(3)
    model = ResNet18().double()
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
            module.padding_mode = padding_mode
            with torch.no_grad():
                module.weight.mul_(lean_structure_mask(module.out_channels, module.in_channels, 1, "cross"))
        if isinstance(module, nn.BatchNorm2d):  # non-trivial statistics, used in evaluation mode
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(2, 3, 48, 40, dtype=torch.float64)
    ref = model(x)
    report = leanify(model, strided=True, init="dense")
    assert len(report.replaced) == 16 and all(r.captured == pytest.approx(1.0) for r in report.replaced)
    assert {r.boundary for r in report.replaced} == {"circular" if padding_mode == "circular" else "zeros"}
    torch.testing.assert_close(model(x), ref, rtol=1e-10, atol=1e-10)


def test_strided_option_checks():
    with pytest.raises(TypeError, match="strided must be a bool"):
        leanify(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1)), strided="yes")
    model = nn.Sequential(nn.Conv2d(2, 2, 3, stride=(2, 1), padding=1), nn.Conv2d(2, 2, 3, stride=3, padding=1))
    report = leanify(model, strided=True)
    assert [s.reason for s in report.skipped] == ["stride (2, 1) (only the same stride on both axes)"]
    assert report.replaced[0].stride == 3 and model[1].operator.stride == 3
    x = torch.randn(1, 2, 7, 8)
    assert model[1](x).shape == (1, 2, 3, 3)
