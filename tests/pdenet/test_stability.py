"""The network stability report, its table and JSON, the plots and the ``pdenet stability`` command."""
import json
import math

import pytest
import torch
from torch import nn

from pdenet.blocks import build_block
from pdenet.cli import main
from pdenet.stability import block_grids, format_table, report


def _net(scheme="parabolic", h=0.1, boundary="zeros", **block_kwargs):
    """conv -> block (8x8) -> pool -> 1x1 conv -> block (4x4) -> head."""
    torch.manual_seed(0)
    kw = {"operator_kwargs": {"boundary": boundary}, **block_kwargs}
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        build_block(scheme, 4, nt=2, h=h, operator="dense", **kw),
        nn.AvgPool2d(2),
        nn.Conv2d(4, 6, 1),
        build_block(scheme, 6, nt=2, h=h, operator="lean", **kw),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10),
    )


def test_report_rows_for_every_block_at_its_grid():
    model = _net()
    assert block_grids(model, (3, 8, 8)) == {"1": (8, 8), "4": (4, 4)}
    rep = report(model, (3, 8, 8))
    assert [r.block for r in rep.rows] == ["1", "4"]
    assert [r.operator for r in rep.rows] == ["dense", "lean"]
    for row, block, grid in zip(rep.rows, (model[1], model[4]), ((8, 8), (4, 4))):
        assert row.scheme == "parabolic" and row.h == pytest.approx(0.1)
        assert row.grid == grid
        assert row.bound == pytest.approx(block.step_bound(grid))
        assert row.norm == pytest.approx(max(op.spectral_norm(grid) for op in block.operators()))
        assert row.margin == pytest.approx(1 - 0.1 / row.bound)
        assert row.stable == "yes"
        assert any("‖K‖" in a for a in row.assumptions) and any("relu" in a for a in row.assumptions)
    assert rep.stable


def test_report_flags_a_violated_bound_and_the_stabilizer_fixes_it():
    model = _net(h=100.0, stabilize="rescale-h")
    rep = report(model, (1, 3, 8, 8))
    assert [r.stable for r in rep.rows] == ["no", "no"] and not rep.stable
    assert all(r.margin < 0 for r in rep.rows)
    assert all(r.stabilize == "rescale-h" for r in rep.rows)
    model(torch.randn(2, 3, 8, 8))  # the trainer: forward, optimizer step, then enforce_stability
    for m in model.modules():
        if hasattr(m, "enforce_stability"):
            m.enforce_stability()
    after = report(model, (3, 8, 8), method="power")  # the norm on the grid, which the stabilizer tracks
    assert [r.stable for r in after.rows] == ["yes", "yes"]
    assert all(r.h < 100.0 and r.margin == pytest.approx(0.1, abs=0.01) for r in after.rows)


def test_power_method_is_exact_and_below_the_symbol_bound():
    model = _net()
    symbol = report(model, (3, 8, 8))
    power = report(model, (3, 8, 8), method="power")
    for s, p in zip(symbol.rows, power.rows):
        assert p.norm <= s.norm * (1 + 1e-6)
        assert p.bound >= s.bound * (1 - 1e-6)
        assert any("power iteration" in a for a in p.assumptions)
    with pytest.raises(ValueError, match="unknown norm method"):
        report(model, (3, 8, 8), method="guess")


def test_unknown_and_unconditional_bounds():
    torch.manual_seed(0)
    euler = nn.Sequential(build_block("euler", 3, nt=2, h=0.1, operator="dense"),
                          build_block("parabolic", 3, operator="dense", normalization="tv"),
                          build_block("diffusion-reaction", 3, diffusion="implicit",
                                      operator_kwargs={"boundary": "circular"}))
    rows = report(euler, (3, 6, 6)).rows
    assert rows[0].stable in ("yes", "no") and any("eigenvalues" in a for a in rows[0].assumptions)
    assert rows[1].bound is None and rows[1].stable == "unknown" and rows[1].margin is None
    assert rows[2].operator == "depthwise+pointwise" and math.isfinite(rows[2].bound)
    assert any("every h" in a for a in rows[2].assumptions)


def test_table_and_json(tmp_path):
    rep = report(_net(h=100.0), (3, 8, 8))
    text = rep.table()
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["block", "scheme", "operator"]
    assert "no" in lines[2].split() and "parabolic" in lines[2]
    assert "assumptions:" in text and "[1]" in text
    path = tmp_path / "report.json"
    rep.to_json(path)
    data = json.loads(path.read_text())
    assert data["input_shape"] == [3, 8, 8] and len(data["rows"]) == 2
    assert set(data["rows"][0]) >= {"block", "scheme", "operator", "norm", "h", "bound", "margin", "stable",
                                    "assumptions"}
    assert format_table(data["rows"]) == text  # formatting round-trips through JSON
    assert report(nn.Linear(2, 2), (2,) * 3).table() == "no time-stepping or residual blocks"
    with pytest.raises(ValueError, match="input_shape"):
        report(_net(), (8, 8))


def test_unconditional_rows_serialize():
    block = build_block("diffusion-reaction", 2, diffusion="exact", reaction="general", activation="identity",
                        operator_kwargs={"boundary": "circular"})
    row = report(block, (2, 4, 4)).rows[0]
    assert row.operator == "depthwise+pointwise"
    json.dumps(row.as_dict(), allow_nan=False)


def test_cli_on_a_named_configuration(tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = main(["stability", "--config", "pde-parabolic-lean", "--input-shape", "3", "6", "6",
                 "--override", "widths=(3, 4)", "--override", "nt=2", "--json", str(out), "--eigs", "2",
                 "--plot", str(tmp_path / "plots"), "--threads", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "parabolic" in printed and "lean" in printed and "perturbation growth" in printed
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 2 and data["rows"][0]["grid"] == [6, 6] and data["rows"][1]["grid"] == [3, 3]
    assert len(data["spectra"]) == 4 and len(data["growth"]["labels"]) == 4
    for name in ("eigenvalues.png", "growth.png", "singular_values.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000


def test_cli_on_a_checkpoint(tmp_path, capsys):
    from pdenet.checkpoint import save_checkpoint
    from pdenet.configs import build_model

    overrides = {"widths": (4,), "nt": 2, "h": 0.2, "scheme": "leapfrog"}
    model = build_model("pde-parabolic-lean", num_classes=10, in_channels=1, **overrides)
    meta = {"config": "pde-parabolic-lean", "overrides": overrides, "num_classes": 10, "in_channels": 1,
            "input_shape": [1, 6, 6]}
    path = save_checkpoint(tmp_path / "checkpoint.pt", model=model, epoch=1, meta=meta)
    assert main(["stability", str(path), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "leapfrog" in printed and "6x6" in printed


def test_cli_errors(capsys):
    assert main(["stability"]) == 2
    assert "exactly one" in capsys.readouterr().err
    assert main(["stability", "--config", "no-such-net"]) == 2
    assert "no-such-net" in capsys.readouterr().err
    assert main(["stability", "/nonexistent/checkpoint.pt"]) == 2
    assert "nonexistent" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- ResNet basic blocks
def test_report_covers_resnet_blocks_at_the_grid_of_their_operators():
    from pdenet.configs import build_model

    model = build_model("lean-resnet20", 10, 1)
    rows = report(model, (1, 28, 28)).rows
    assert [r.block for r in rows] == [f"stages.{i}.{j}" for i in range(3) for j in range(3)]
    assert [r.grid for r in rows] == [(28, 28)] * 3 + [(14, 14)] * 3 + [(7, 7)] * 3
    assert all(r.scheme == "resnet" and r.h == 1 and r.operator == "lean" for r in rows)
    transitions = [r for r in rows if r.block in ("stages.1.0", "stages.2.0")]
    assert all(r.bound is None and r.stable == "unknown" for r in transitions)
    assert all(r.bound is not None for r in rows if r not in transitions)


def test_resnet_block_bound_matches_the_dense_linearized_jacobian():
    """A dissipative block (K₂ = −K₁ᵀ) with batch-norm scales: the bound from the symbols equals the forward
    Euler bound from the eigenvalues of the dense matrix of x ↦ B₂K₂B₁K₁x on a periodic 6x6 grid."""
    from operators.functional import adjoint_weight
    from pdenet.networks.resnet import BasicBlock

    torch.manual_seed(0)
    block = BasicBlock(4, 4, operator="dense", operator_kwargs={"boundary": "circular"}).double().eval()
    with torch.no_grad():
        block.conv2.weight.copy_(-adjoint_weight(block.conv1.weight))
        for bn in (block.bn1, block.bn2):
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    grid = (6, 6)
    stability = block.stability(grid)
    matrices = []
    for bn, op in ((block.bn1, block.conv1), (block.bn2, block.conv2)):
        b = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
        matrices.append(b.repeat_interleave(36)[:, None] * op.to_matrix(grid))
    eigenvalues = torch.linalg.eigvals(matrices[1] @ matrices[0]).numpy()
    from operators.stability import max_stable_step

    expected = max_stable_step("euler", eigenvalues)
    assert 0 < expected < math.inf
    assert stability.bound == pytest.approx(expected, rel=1e-8)
    growth = float(abs(1 + eigenvalues).max())
    assert any(f"{growth:.4g}" in a for a in stability.assumptions)
    row = report(nn.Sequential(block), (4, *grid)).rows[0]
    assert row.bound == pytest.approx(expected, rel=1e-8) and row.stable == ("yes" if expected >= 1 else "no")
