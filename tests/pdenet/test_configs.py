"""Named configurations: each builds and trains a step, its parameter and FLOP counts agree with per-layer
analytic counts, lean configurations are at least 5x cheaper than their dense twins, and errors are clear."""
import functools

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
from pdenet.configs import build_model, describe, get_config, list_configs, parse_overrides
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
    with pytest.raises(ValueError, match="no option\\(s\\) width.*takes: .*widths"):
        build_model("resnet20", width=(8, 16, 32))
    with pytest.raises(ValueError, match="nt"):
        build_model("pde-parabolic-lean", nt=0)
    with pytest.raises(ValueError, match="unknown operator kind 'leen'"):
        build_model("resnet20", operator="leen")


def test_describe_lists_defaults_twin_and_options():
    text = describe("lean-resnet20")
    assert text.startswith("lean-resnet20:") and "operator = 'lean'" in text and "dense twin: resnet20" in text
    assert "overridable: " in text and "shortcut" in text


def test_parse_overrides():
    assert parse_overrides(["nt=2", "h=0.5", "operator=grouped", "operator_kwargs={'groups': 4}",
                            "widths=[8, 16]"]) == {"nt": 2, "h": 0.5, "operator": "grouped",
                                                   "operator_kwargs": {"groups": 4}, "widths": [8, 16]}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["nt"])
