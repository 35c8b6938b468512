"""Export: ONNX of standard operators run in onnxruntime against PyTorch, ``torch.export`` programs saved and
loaded, safetensors weights, and ``pdenet export`` on a checkpoint with its errors."""
import importlib.util

import pytest
import torch

from pdenet import build_model
from pdenet.checkpoint import load_weights, save_checkpoint
from pdenet.cli import main
from pdenet.export import export_onnx, export_pt2, inference_copy, run_onnx
from tests.pdenet.test_folding import trained_looking

HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="onnx, onnxscript and onnxruntime are optional "
                                                     "(pip install 'pdenet[onnx]'); CI installs them")


@needs_onnx
@pytest.mark.parametrize("name", ["lean-resnet20", "resnet20", "pde-parabolic-lean"])
def test_onnx_file_runs_in_onnxruntime_like_pytorch(name, tmp_path):
    import onnx

    torch.manual_seed(0)
    model = trained_looking(build_model(name, in_channels=1))
    path = export_onnx(model, torch.randn(1, 1, 28, 28), tmp_path / "model.onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    graph = proto.graph
    assert all(node.domain in ("", "ai.onnx") for node in graph.node), {n.domain for n in graph.node}
    if name.startswith("lean"):  # each lean layer: a 1x1 Conv and a depthwise Conv
        groups = [next((a.i for a in node.attribute if a.name == "group"), 1) for node in graph.node
                  if node.op_type == "Conv"]
        assert sum(g > 1 for g in groups) >= 18
    for batch in (1, 3):  # any batch size
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            expected = model(x)
        got = torch.from_numpy(run_onnx(path, x))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_pt2_program_loads_and_runs_on_pdenet_operators(tmp_path):
    model = trained_looking(build_model("lean-resnet20", in_channels=1))
    path = export_pt2(model, torch.randn(2, 1, 28, 28), tmp_path / "model.pt2")
    program = torch.export.load(str(path))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("pdenet.residual_chain_inference" in t for t in targets), targets
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_refuses_a_non_image_example(tmp_path):
    with pytest.raises(ValueError, match="must be 4-D"):
        export_pt2(build_model("resnet20").eval(), torch.randn(3, 32, 32), tmp_path / "m.pt2")


def test_inference_copy_leaves_the_model_alone():
    model = build_model("lean-resnet20").train()
    folded, report = inference_copy(model)
    assert model.training and not folded.training and report.fused
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


@pytest.fixture
def checkpoint(tmp_path):
    model = trained_looking(build_model("lean-resnet20", num_classes=10, in_channels=1))
    meta = {"config": "lean-resnet20", "overrides": {}, "num_classes": 10, "in_channels": 1,
            "input_shape": [1, 28, 28], "task": "classification", "data": "fashion-mnist"}
    return save_checkpoint(tmp_path / "run" / "checkpoint.pt", model=model, epoch=3, meta=meta), model


@pytest.mark.parametrize("fmt", ["onnx", "pt2", "safetensors"])
def test_export_command_writes_and_checks_each_format(fmt, checkpoint, capsys):
    if fmt == "onnx" and not HAS_ONNX:
        pytest.skip("onnx, onnxscript and onnxruntime are optional (pip install 'pdenet[onnx]'); CI installs them")
    path, model = checkpoint
    assert main(["export", str(path.parent), "--format", fmt]) == 0
    out = capsys.readouterr().out
    written = path.parent / {"onnx": "model.onnx", "pt2": "model.pt2", "safetensors": "weights.safetensors"}[fmt]
    assert written.is_file() and f"wrote {written}" in out
    if fmt == "safetensors":
        state, meta = load_weights(written)
        assert meta["config"] == "lean-resnet20"
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    else:
        assert "checked with" in out and "1 chain of residual blocks fused for inference" in out


def test_export_command_errors_are_one_line(tmp_path, checkpoint, capsys):
    assert main(["export", str(tmp_path / "missing.pt"), "--format", "pt2"]) == 2
    assert "pdenet export: error:" in capsys.readouterr().err
    path, _ = checkpoint
    assert main(["export", str(path), "--format", "pt2", "--out", str(tmp_path / "no" / "such" / "m.pt2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(path), "--format", "tflite"])
