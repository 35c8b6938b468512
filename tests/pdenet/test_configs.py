"""Named configurations: each builds and trains a step, its parameter and FLOP counts agree with per-layer
analytic counts, lean configurations are at least 5x cheaper than their dense twins, width and depth scale every
family (from Python and from ``pdenet train``/``pdenet cost``, which print the measured costs), and errors are
clear."""
import functools
import re

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from operators import ConvOperator
from operators.dense import DenseConv
from operators.depthwise import DepthwiseConv
from operators.flops import count_flops
from operators.lean import LeanConv
from operators.pointwise import PointwiseConv
from pdenet.blocks import DiffusionReactionBlock
from pdenet.configs import CONFIGS, ModelConfig, build_model, describe, get_config, list_configs, parse_overrides
from pdenet.costs import count_parameters, flops_per_image
from pdenet.diffusion import fourier_diffusion_flops

REQUIRED = ["lean-resnet20", "resnet20", "lean-resnet32", "lean-resnet56", "resnet56", "lean-resnet18", "resnet18",
            "mobilenetv2", "shufflenetv2", "pde-parabolic-lean", "pde-parabolic-dense", "pde-diffusion-reaction",
            "pde-leapfrog-lean", "pde-hamiltonian-lean"]
INPUTS = {"fashion-mnist": (1, 28), "cifar": (3, 32)}
LEAN = [n for n in list_configs() if get_config(n).dense_twin]


def test_required_configurations_exist():
    assert set(REQUIRED) <= set(list_configs())
    assert list_configs() == sorted(list_configs())
    assert {"lean-resnet20", "lean-resnet56", "lean-resnet18", "pde-parabolic-lean", "pde-leapfrog-lean",
            "pde-hamiltonian-lean"} <= set(LEAN)


@pytest.mark.parametrize("data", sorted(INPUTS))
@pytest.mark.parametrize("name", list_configs())
def test_builds_and_runs_forward_and_backward(name, data):
    channels, size = INPUTS[data]
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=channels)
    out = model(torch.randn(2, channels, size, size))
    expected = (2, 7) if get_config(name).task == "classification" else (2, 7, size, size)  # per-pixel logits
    assert out.shape == expected and torch.isfinite(out).all()
    out.logsumexp(dim=1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


# ------------------------------------------------------------------ analytic per-layer counts
def operator_params(op: ConvOperator) -> int:
    """Weights of an operator from DESIGN.md's table (3x3 kernels)."""
    c_in, c_out, k2 = op.in_channels, op.out_channels, op.kernel_size ** 2
    if isinstance(op, DenseConv):
        return k2 * c_in * c_out
    if isinstance(op, LeanConv):
        points = {"cross": 5, "full": 9, "none": 0}[op.stencil_type]
        return c_in * c_out // op.groups + points * min(c_in, c_out)
    if isinstance(op, DepthwiseConv):
        return k2 * c_in
    if isinstance(op, PointwiseConv):
        return c_in * c_out
    raise AssertionError(f"no analytic count for {type(op).__name__}")


def analytic_params(model: nn.Module) -> int:
    total = 0
    for m in model.modules():
        if isinstance(m, ConvOperator):
            total += operator_params(m)
        elif isinstance(m, nn.Conv2d):
            total += m.out_channels * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            total += 0 if m.bias is None else m.out_channels
        elif isinstance(m, nn.Linear):
            total += (m.in_features + 1) * m.out_features
        elif isinstance(m, nn.BatchNorm2d):
            total += 2 * m.num_features
        else:  # e.g. the bias b of a layer σ(N(K Y + b)), a learnable h
            total += sum(p.numel() for p in m.parameters(recurse=False))
    return total


def count_flops_and_analytic(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """``count_flops(model, x)`` and, recorded in the same pass, the analytic count: 2 x the multiply-adds of
    every operator application (forward and adjoint, from ``macs_per_pixel``), nn.Conv2d and nn.Linear, and
    for an FFT diffusion step its ``fourier_diffusion_flops`` plus the FLOPs of the stencil symbols it forms."""
    total = 0
    diffusion_steps = []  # (operator, input shape, kind, applications): evaluated after the counted pass

    def diffusion_hook(block, args):
        if block.diffusion != "explicit":
            per_step = 1 if block.splitting == "lie" else 2
            diffusion_steps.extend((block.weights(j).diffusion, tuple(args[0].shape), block.diffusion, per_step)
                                   for j in range(block.nt))

    def conv_hook(m, args, out):
        nonlocal total
        total += 2 * out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, args, out):
        nonlocal total
        total += 2 * out.numel() * m.in_features

    def op_hook(op, y):
        nonlocal total
        total += 2 * op.macs_per_pixel() * y.shape[0] * y.shape[2] * y.shape[3]

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    hooks += [m.register_forward_pre_hook(diffusion_hook) for m in model.modules()
              if isinstance(m, DiffusionReactionBlock)]
    forward, adjoint = ConvOperator.forward, ConvOperator.adjoint
    ConvOperator.forward = lambda op, y: (op_hook(op, y), forward(op, y))[1]
    ConvOperator.adjoint = lambda op, y: (op_hook(op, y), adjoint(op, y))[1]
    try:
        counted = count_flops(model, x)
    finally:
        ConvOperator.forward, ConvOperator.adjoint = forward, adjoint
        for h in hooks:
            h.remove()
    for op, shape, kind, applications in diffusion_steps:
        with FlopCounterMode(display=False) as symbol:
            op.stencil_symbols(*shape[2:])
        total += applications * (fourier_diffusion_flops(op, shape, kind) + symbol.get_total_flops())
    return counted, total


@functools.cache
def measure(name: str, data: str) -> dict:
    channels, size = INPUTS[data]
    torch.manual_seed(0)
    model = build_model(name, in_channels=channels).eval()
    flops, analytic = count_flops_and_analytic(model, torch.randn(1, channels, size, size))
    return {"params": sum(p.numel() for p in model.parameters()), "analytic_params": analytic_params(model),
            "flops": flops, "analytic_flops": analytic}


@pytest.fixture(scope="module", autouse=True)
def warm_up_operators():
    """Run a lean operator once: its one-time backend probe must not enter any FLOP count."""
    LeanConv(4, 4)(torch.randn(1, 4, 4, 4))


@pytest.mark.parametrize("name", list_configs())
def test_parameter_count_matches_per_layer_formulas(name):
    m = measure(name, "cifar")
    assert m["params"] == m["analytic_params"]


def test_lean_resnet20_parameter_count_by_hand():
    # 3x3 lean operators c_in c_out + 5 min(c_in, c_out): 6 x 336 (16->16), 592 (16->32), 5 x 1184 (32->32),
    # 2208 (32->64), 5 x 4416 (64->64); dense stem 432; batch norms 1376; classifier 650.
    assert measure("lean-resnet20", "cifar")["params"] == 6 * 336 + 592 + 5 * 1184 + 2208 + 5 * 4416 + 432 + 1376 + 650


@pytest.mark.parametrize("data", sorted(INPUTS))
@pytest.mark.parametrize("name", list_configs())
def test_count_flops_matches_per_layer_analytic_count(name, data):
    m = measure(name, data)
    assert m["flops"] == m["analytic_flops"]


@pytest.mark.parametrize("data", sorted(INPUTS))
@pytest.mark.parametrize("name", LEAN)
def test_lean_configuration_is_5x_cheaper_than_its_dense_twin(name, data):
    lean, dense = measure(name, data), measure(get_config(name).dense_twin, data)
    assert dense["params"] >= 5 * lean["params"]
    assert dense["flops"] >= 5 * lean["flops"]


def test_the_full_stencil_network_is_lean_resnet20_with_nine_points():
    cross, full = (build_model(name, in_channels=1) for name in ("lean-resnet20", "lean-resnet20-full"))
    cross_leans, full_leans = ([m for m in net.modules() if isinstance(m, LeanConv)] for net in (cross, full))
    assert len(full_leans) == len(cross_leans) == 18
    assert {m.stencil_type for m in full_leans} == {"full"} and {m.stencil.shape[1] for m in full_leans} == {9}
    stencil_channels = sum(m.stencil.shape[0] for m in full_leans)
    assert count_parameters(full) - count_parameters(cross) == 4 * stencil_channels == 2496
    assert flops_per_image(full, (1, 28, 28)) == flops_per_image(cross, (1, 28, 28))  # both run a 3x3 depthwise
    wider = build_model("lean-resnet20-full", depth=32, width=2)
    assert {m.stencil_type for m in wider.modules() if isinstance(m, LeanConv)} == {"full"}


# ------------------------------------------------------------------ overrides, description, errors
def test_overrides_reach_the_network():
    model = build_model("lean-resnet20", operator_kwargs={"stencil": "full", "groups": 2})
    leans = [m for m in model.modules() if isinstance(m, LeanConv)]
    assert len(leans) == 18 and all(m.groups == 2 and m.stencil_type == "full" for m in leans)
    pde = build_model("pde-parabolic-lean", widths=(8, 16), nt=1, h=0.5)
    assert pde(torch.randn(1, 3, 16, 16)).shape == (1, 10)
    assert sum(p.numel() for p in pde.parameters()) < 2000


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown model configuration 'resnet21'.*lean-resnet20"):
        build_model("resnet21")
    with pytest.raises(ValueError, match="known"):
        describe("nope")


def test_bad_override_names_the_option_and_the_valid_ones():
    with pytest.raises(ValueError, match="no option\\(s\\) widht.*takes: .*widths"):
        build_model("resnet20", widht=(8, 16, 32))
    with pytest.raises(ValueError, match="nt"):
        build_model("pde-parabolic-lean", nt=0)
    with pytest.raises(ValueError, match="unknown operator kind 'leen'"):
        build_model("resnet20", operator="leen")


def test_describe_lists_defaults_twin_and_options():
    text = describe("lean-resnet20")
    assert text.startswith("lean-resnet20:") and "operator = 'lean'" in text and "dense twin: resnet20" in text
    assert "overridable: " in text and "shortcut" in text
    assert "width: multiplies widths" in text and "depth: a CIFAR ResNet of 6n + 2 layers" in text
    assert "depth: none (this family has no depth knob)" in describe("mobilenetv2")


def test_parse_overrides():
    assert parse_overrides(["nt=2", "h=0.5", "operator=grouped", "operator_kwargs={'groups': 4}",
                            "widths=[8, 16]"]) == {"nt": 2, "h": 0.5, "operator": "grouped",
                                                   "operator_kwargs": {"groups": 4}, "widths": [8, 16]}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["nt"])


# ------------------------------------------------------------------ width and depth
def shapes(model: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name, knobs, explicit", [
    ("lean-resnet20", {"width": 1.5, "depth": 32}, {"widths": (24, 48, 96), "depths": (5, 5, 5)}),
    ("resnet56", {"width": 0.5, "depth": 20}, {"widths": (8, 16, 32), "depths": (3, 3, 3)}),
    ("lean-resnet18", {"width": 0.25, "depth": 34}, {"widths": (16, 32, 64, 128), "depths": (3, 4, 6, 3)}),
    ("pde-parabolic-lean", {"width": 0.5, "depth": 2}, {"widths": (16, 32, 56, 56), "nt": 2}),
    ("pde-diffusion-reaction", {"width": 0.25, "depth": 1}, {"widths": (8, 16, 28, 28), "nt": 1}),
    ("lean-segnet", {"width": 0.5, "depth": 2}, {"widths": (16, 32, 64, 64), "stem_width": 8, "decoder_width": 16,
                                                 "nt": 2}),
    ("mobilenetv2", {"width": 0.35}, {"width_mult": 0.35}),
    ("shufflenetv2", {"width": 0.5}, {"width_mult": 0.5}),
])
def test_width_and_depth_build_the_scaled_family(name, knobs, explicit):
    assert shapes(build_model(name, **knobs)) == shapes(build_model(name, **explicit))
    assert shapes(build_model(name, **knobs)) != shapes(build_model(name))


@pytest.mark.parametrize("name", list_configs())
def test_unit_width_and_own_depth_change_nothing(name):
    config = get_config(name)
    layers = re.search(r"resnet(\d+)$", name)
    depth = config.defaults["nt"] if config.knobs.depth == "nt" else layers and int(layers[1])
    assert shapes(build_model(name, width=1, depth=depth)) == shapes(build_model(name))


def test_width_rounds_to_the_coupling_groups():
    model = build_model("lean-resnet20", width=1.1, operator_kwargs={"stencil": "cross", "groups": 4})
    assert sorted({m.out_channels for m in model.modules() if isinstance(m, LeanConv)}) == [16, 36, 72]
    assert all(m.groups == 4 for m in model.modules() if isinstance(m, LeanConv))
    full = build_model("lean-resnet32", width=2, operator_kwargs={"stencil": "full", "groups": 1})
    assert {m.stencil_type for m in full.modules() if isinstance(m, LeanConv)} == {"full"}


@pytest.mark.parametrize("knobs, error, message", [
    ({"width": 0}, ValueError, "width must be a positive finite number, got 0"),
    ({"width": -1.5}, ValueError, "width must be a positive finite number"),
    ({"width": float("nan")}, ValueError, "positive finite"),
    ({"width": float("inf")}, ValueError, "positive finite"),
    ({"width": "2"}, TypeError, "width must be a number"),
    ({"width": (8, 16, 32)}, TypeError, "width must be a number"),
    ({"width": True}, TypeError, "width must be a number"),
    ({"width": 0.01}, ValueError, r"width 0.01 rounds widths \(16, 32, 64\) to \(0, 0, 1\).*smallest width here is "
                                  r"0.0312"),
    ({"depth": 21}, ValueError, r"6n \+ 2 with n >= 1 \(20, 32, 44, 56, 110, ...\), got 21"),
    ({"depth": 2}, ValueError, "6n \\+ 2"),
    ({"depth": 20.0}, TypeError, "depth must be an integer"),
    ({"depth": "20"}, TypeError, "depth must be an integer"),
    ({"width": 2, "widths": (8, 16, 32)}, ValueError, "width=2.0 sets widths, and the override\\(s\\) widths="),
    ({"depth": 32, "depths": (1, 1, 1)}, ValueError, "depth=32 sets depths.*give one or the other"),
])
def test_impossible_width_or_depth_is_a_named_error(knobs, error, message):
    with pytest.raises(error, match=f"^configuration 'lean-resnet20': .*{message}"):
        build_model("lean-resnet20", **knobs)


@pytest.mark.parametrize("name, knobs, message", [
    ("mobilenetv2", {"depth": 20}, "'mobilenetv2' has no depth knob.*options: width_mult"),
    ("shufflenetv2", {"depth": 1}, "'shufflenetv2' has no depth knob"),
    ("mobilenetv2", {"width": 2, "width_mult": 1.0}, "width=2.0 sets width_mult"),
    ("lean-resnet18", {"depth": 20}, "depth must be one of 18, 34"),
    ("pde-parabolic-lean", {"depth": 0}, "depth \\(time steps per stage\\) must be a positive integer, got 0"),
    ("pde-leapfrog-lean", {"depth": 2, "nt": 3}, "depth=2 sets nt, and the override\\(s\\) nt=3"),
    ("lean-segnet", {"width": 2, "decoder_width": 8}, "sets widths, stem_width, decoder_width"),
    ("pde-parabolic-lean", {"width": 0.01}, "rounds widths \\(32, 64, 112, 112\\) to \\(0, 1, 1, 1\\)"),
])
def test_family_specific_knob_errors(name, knobs, message):
    with pytest.raises(ValueError, match=message):
        build_model(name, **knobs)


def test_a_configuration_without_knobs_says_so(monkeypatch):
    monkeypatch.setitem(CONFIGS, "plain", ModelConfig("plain", get_config("resnet20").builder, "no knobs",
                                                      dict(get_config("resnet20").defaults)))
    with pytest.raises(ValueError, match="'plain' has no width or depth knob.*overrides: depths, widths"):
        build_model("plain", width=2)
    assert shapes(build_model("plain")) == shapes(build_model("resnet20"))


# ------------------------------------------------------------------ the command line
COST_LINE = re.compile(r"^(\S+): ([\d,]+) parameters, ([\d,]+) FLOPs per image on (\d+)x(\d+)x(\d+)", re.M)


def printed_costs(text: str) -> dict:
    return {m[1]: (int(m[2].replace(",", "")), int(m[3].replace(",", ""))) for m in COST_LINE.finditer(text)}


def test_cost_prints_the_measured_costs_of_the_scaled_networks(capsys):
    from pdenet.cli import main

    assert main(["cost", "--config", "lean-resnet20", "resnet20", "--width", "0.5", "--depth", "8",
                 "--input-shape", "1", "28", "28", "--batch-size", "4", "--repeats", "1", "--threads", "1"]) == 0
    printed = printed_costs(capsys.readouterr().out)
    for name in ("lean-resnet20", "resnet20"):
        model = build_model(name, in_channels=1, width=0.5, depth=8)
        assert printed[name] == (count_parameters(model), flops_per_image(model, (1, 28, 28)))
    assert printed["resnet20"][1] > 4 * printed["lean-resnet20"][1]


@pytest.mark.parametrize("extra, message", [
    (["--width", "0"], "width must be a positive finite number, got 0.0"),
    (["--width", "0.001"], "a stage of 0 channels"),
    (["--depth", "21"], "6n \\+ 2"),
    (["--width", "2", "--override", "width=3"], "give --width or --override width=..., not both"),
    (["--width", "2", "--override", "widths=(32, 64, 128)"], "width=2.0 sets widths, and the override"),
    (["--config", "mobilenetv2", "--depth", "20"], "'mobilenetv2' has no depth knob"),
])
def test_cost_knob_errors_are_one_line(extra, message, capsys):
    from pdenet.cli import main

    argv = ["cost", "--config", "lean-resnet20", "--threads", "1", *extra]
    if "--config" in extra:
        argv = ["cost", "--threads", "1", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pdenet cost: error:") and re.search(message, err) and len(err.splitlines()) == 1


@pytest.mark.parametrize("value", ["abc", "1,5"])
def test_non_numbers_are_refused_by_the_parser(value, capsys):
    from pdenet.cli import build_parser

    for command, option in (("cost", "--width"), ("train", "--width"), ("train", "--depth")):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([command, "--config", "lean-resnet20", option, value])
        assert exit_info.value.code == 2 and f"argument {option}: invalid" in capsys.readouterr().err


def test_train_prints_the_measured_costs_before_training_and_saves_the_knobs(tmp_path, monkeypatch, capsys):
    from pdenet import checkpoint as ckpt
    from pdenet.cli import main
    from pdenet.data import DATASETS, Dataset

    def stripes(split, data_dir):
        g = torch.Generator().manual_seed(int(split == "train"))
        labels = torch.randint(10, (64,), generator=g)
        images = torch.randint(0, 60, (64, 1, 28, 28), generator=g, dtype=torch.uint8)
        for i, k in enumerate(labels.tolist()):
            images[i, 0, 2 * k + 3:2 * k + 6] += 180
        return Dataset("stripes", split, images, labels, 10, tuple("0123456789"), (0.3,), (0.3,))

    monkeypatch.setitem(DATASETS, "stripes", stripes)
    out = tmp_path / "run"
    assert main(["train", "--config", "lean-resnet20", "--width", "0.5", "--depth", "8", "--data", "stripes",
                 "--epochs", "1", "--batch-size", "32", "--threads", "1", "--no-progress", "--no-safetensors",
                 "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    model = build_model("lean-resnet20", in_channels=1, width=0.5, depth=8)
    assert printed_costs(stdout)["lean-resnet20"] == (count_parameters(model), flops_per_image(model, (1, 28, 28)))
    assert stdout.index("FLOPs per image on 1x28x28") < stdout.index("epoch   1")
    restored, meta = ckpt.load_model(out)
    assert meta["overrides"] == {"width": 0.5, "depth": 8} and shapes(restored) == shapes(model)
