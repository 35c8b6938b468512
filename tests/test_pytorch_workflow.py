"""Every named configuration in the ordinary PyTorch workflow: ``torch.compile(fullgraph=True)`` forward and
backward against eager, ``torch.export`` round trips, ``torch.jit.trace`` on a new input, training under CPU
autocast (bfloat16), as built and as ``pdenet.fuse`` rewrites it; and no module of the project using a private
torch name."""
import copy
import re
from pathlib import Path

import pytest
import torch

from pdenet import build_model, fuse, list_configs

CL = torch.channels_last
ROOT = Path(__file__).resolve().parents[1]
SEGMENTATION = ("dense-segnet", "lean-segnet")


def model_and_input(name, seed=0):
    torch.manual_seed(seed)
    model = build_model(name, num_classes=5, in_channels=3).to(memory_format=CL)
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=CL)
    return model, x


def loss_of(output):
    return output.float().square().mean()


def step_results(model, x):
    """The output and every parameter's gradient of one training-mode forward and backward."""
    for p in model.parameters():
        p.grad = None
    out = model(x)
    loss_of(out).backward()
    return [out.detach()] + [p.grad.detach().clone() for p in model.parameters()]


def assert_float32_close(candidate, eager, float64, what):
    """``candidate`` is about as close to the float64 results as eager float32 is (four times its error, plus 1e-4
    of the tensor's scale): float32 tolerance measured, not guessed."""
    for i, (c, e, d) in enumerate(zip(candidate, eager, float64)):
        scale = d.abs().max().item()
        err_eager = (e.double() - d).abs().max().item()
        err = (c.double() - d).abs().max().item()
        assert err <= 4 * err_eager + 1e-4 * scale + 1e-7, f"{what}, tensor {i}: {err:.3g} vs eager {err_eager:.3g}"


def capture_limits(model) -> list[str]:
    """The reasons parts of ``model`` give for not being recordable as one graph in their present mode."""
    return [m.capture_limit for m in model.modules() if getattr(m, "capture_limit", "")]


def compile_check(name, fused, backend):
    """A training step under ``torch.compile`` against eager; ``fullgraph=True`` unless a part of the model states
    why it cannot be one graph (then ``fullgraph=True`` must fail, and the step without it must still be right)."""
    model, x = model_and_input(name)
    if fused:
        fuse(model)
    reference = copy.deepcopy(model).double()
    limited = bool(capture_limits(model))
    if limited:
        with pytest.raises(Exception):
            step_results(torch.compile(copy.deepcopy(model), backend=backend, fullgraph=True), x)
    compiled = torch.compile(copy.deepcopy(model), backend=backend, fullgraph=not limited)
    eager_results = step_results(model, x)
    assert_float32_close(step_results(compiled, x), eager_results, step_results(reference, x.double()),
                         f"{name} ({'fused' if fused else 'as built'}) under torch.compile({backend})")


@pytest.mark.slow
@pytest.mark.parametrize("name", list_configs())
def test_compile_fullgraph_equals_eager(name):
    """``torch.compile(fullgraph=True, backend="aot_eager")``: no graph break, outputs and every gradient of a
    training step equal eager's; a model that ``pdenet.fuse`` rewrites in its fused form, as it trains (the plain
    form's operators are those of the other configurations)."""
    torch.compiler.reset()
    model, _ = model_and_input(name)
    compile_check(name, bool(fuse(model).fused), "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("name,fused", [("lean-resnet20", True), ("lean-resnet20", False),
                                        ("pde-parabolic-lean", False)])
def test_inductor_equals_eager(name, fused):
    torch.compiler.reset()
    compile_check(name, fused, "inductor")


@pytest.mark.parametrize("name", list_configs())
def test_export_round_trips(name, tmp_path):
    """``torch.export.export`` in evaluation mode, saved and loaded: the same outputs as the model (a model with a
    part that cannot be one graph is refused with that part's reason)."""
    model, x = model_and_input(name)
    model.eval()
    limits = capture_limits(model)
    if limits:
        with pytest.raises(RuntimeError, match="cannot be recorded as a graph"):
            torch.export.export(model, (x,))
        return
    program = torch.export.export(model, (x,))
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(loaded.module()(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list_configs())
def test_jit_trace_is_correct_on_a_new_input(name):
    """A model traced in evaluation mode (with gradients on, as by default, and off) gives the model's outputs on
    an input it was not traced with, and the traced model's gradients are the model's; a model with a part that
    cannot be one graph is refused with that part's reason, never traced wrongly."""
    model, x = model_and_input(name)
    model.eval()
    if capture_limits(model):
        with pytest.raises(RuntimeError, match="cannot be recorded as a graph"):
            torch.jit.trace(model, (x,))
        return
    other = (torch.randn_like(x) * 3 + 1).requires_grad_()
    expected = model(other)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), other)
    traced = torch.jit.trace(model, (x,))
    out = traced(other)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(out.square().sum(), other)[0], expected_grad, rtol=1e-4,
                               atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.trace(model, (x,))(other), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list_configs())
def test_trains_under_bfloat16_autocast(name):
    """A training step under CPU autocast (bfloat16), fused as the trainer trains: finite gradients of every
    parameter, and the loss close to float32's."""
    model, x = model_and_input(name)
    fuse(model)
    reference = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    loss = loss_of(out)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(loss, loss_of(reference(x)), rtol=0.5, atol=1e-2)  # bfloat16 has 8 bits


PRIVATE = re.compile(r"torch\._[A-Za-z]|from torch\._|import torch\._|\._C\b|\._(forward|backward)_(pre_)?hooks\b"
                     r"|_global_(forward|backward)")


def test_no_private_torch_names():
    """No source of the project (packages, tests, benchmarks, examples) uses a private torch name."""
    offending = []
    for folder in ("operators", "pdenet", "pdenet_kernels", "tests", "benchmarks", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if PRIVATE.search(line) and path.name != Path(__file__).name:
                    offending.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offending, "\n".join(offending)
