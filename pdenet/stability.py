"""Stability report of a whole network: one row per time-stepping block and per ResNet basic block.

``report(model, input_shape)`` runs the model once on an input of ``input_shape`` to learn the grid each
block's operators act on, then asks every :class:`~pdenet.blocks.TimeSteppingBlock` and every ResNet
:class:`~pdenet.networks.resnet.BasicBlock` (forward Euler with ``h = 1``) for its step bound from its
current weights on that grid. A row holds the block's name, scheme, operator kind(s), ``max ‖K‖``, ``h``, the bound
on ``h``, the margin ``1 − h/bound`` (negative when violated), whether ``h ≤ bound`` (``"yes"``, ``"no"``, or
``"unknown"`` when no bound exists), the largest amplification of a perturbation by one linearized step
(``max |R(h^m λ)|`` over the spectrum the bound comes from) and over the block (the product over its steps), the
``stabilize`` option, and the assumptions behind the bound. The table adds the amplification over the network
(the product over the blocks that have one) and a one-line reading of every block that is not a stable step.

``report(..., progress=True)`` writes the progress of the analysis (one unit per block) to stderr.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from .blocks import TimeSteppingBlock, time_stepping_blocks
from .networks.resnet import BasicBlock

COLUMNS = ("block", "scheme", "operator", "norm", "h", "bound", "margin", "stable", "amplification",
           "block_amplification", "stabilize")


@dataclass
class StabilityRow:
    block: str
    scheme: str
    operator: str
    norm: float
    h: float
    bound: float | None  # inf: stable for every h; None: no bound available
    margin: float | None
    stable: str  # "yes" | "no" | "unknown"
    stabilize: str
    grid: tuple[int, int]
    assumptions: list[str] = field(default_factory=list)
    amplification: float | None = None  # max |R(h^m λ)| of one linearized step; None: not available
    block_amplification: float | None = None  # product over the block's steps

    def as_dict(self) -> dict:
        """JSON-safe: an infinite bound or margin is written as the string ``"inf"``."""
        row = asdict(self)
        row["grid"] = list(self.grid)
        for key in ("bound", "margin", "norm", "h", "amplification", "block_amplification"):
            if isinstance(row[key], float) and math.isinf(row[key]):
                row[key] = "inf" if row[key] > 0 else "-inf"
        return row


@dataclass
class StabilityReport:
    rows: list[StabilityRow]
    input_shape: tuple[int, ...]
    method: str

    @property
    def stable(self) -> bool:
        """Every block has a bound and satisfies it."""
        return all(r.stable == "yes" for r in self.rows)

    def as_dicts(self) -> list[dict]:
        return [r.as_dict() for r in self.rows]

    def to_json(self, path=None) -> str:
        """The rows as JSON (written to ``path`` when given)."""
        text = json.dumps({"input_shape": list(self.input_shape), "norm_method": self.method,
                           "rows": self.as_dicts()}, indent=2, ensure_ascii=False)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    def table(self) -> str:
        return format_table(self.as_dicts())

    def __str__(self) -> str:
        return self.table()


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.4g}"


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width table of report rows (as dicts, e.g. read back from JSON), assumptions as footnotes."""
    if not rows:
        return "no time-stepping or residual blocks"
    header = ["block", "scheme", "operator", "‖K‖", "h", "bound", "margin", "stable", "amp/step", "amp/block",
              "stabilize"]
    body = [[_fmt(r.get(c)) if c != "margin" or r[c] is None or isinstance(r[c], str) else f"{100 * r[c]:+.1f}%"
             for c in COLUMNS] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
             for line in [header, ["-" * w for w in widths], *body]]
    total = [float(r["block_amplification"]) for r in rows if r.get("block_amplification") is not None]
    if total:
        lines.append(f"amplification over the network (product over the {len(total)} blocks with a value): "
                     f"{_fmt(math.prod(total))}  (amp: max |R(h^m λ)| of the linearized step; ≤ 1 means no "
                     "perturbation grows)")
    readings = [_reading(r) for r in rows if r["stable"] != "yes"]
    if readings:
        lines.append("reading:")
        lines += [f"  {text}" for text in readings]
    notes = list(dict.fromkeys(a for r in rows for a in r["assumptions"]))
    lines.append("assumptions:")
    for r in rows:
        refs = ",".join(str(notes.index(a) + 1) for a in r["assumptions"])
        lines.append(f"  {r['block']} ({r['grid'][0]}x{r['grid'][1]} grid): [{refs}]")
    lines += [f"  [{i + 1}] {a}" for i, a in enumerate(notes)]
    return "\n".join(lines)


def _reading(row: dict) -> str:
    """One line on a block that is not a stable time step: what the numbers say."""
    name, h = row["block"], _fmt(row["h"])
    amp = row.get("amplification")
    growth = (f"; the linearized step amplifies perturbations by up to {_fmt(amp)} per step"
              + (f" ({_fmt(row['block_amplification'])} over the block)" if row.get("block_amplification") else "")
              if amp is not None else "")
    if row["stable"] == "unknown":
        return f"{name}: no step bound for this block ({row['assumptions'][0] if row['assumptions'] else 'see below'})"
    bound = row["bound"]
    if bound in (0, 0.0):
        return (f"{name}: no step size is stable — the linearized step has an eigenvalue outside the region "
                f"for every h (not a time step of a stable ODE); h = {h}{growth}")
    return f"{name}: h = {h} exceeds the bound {_fmt(bound)}{growth}"


@contextmanager
def eval_mode(model: nn.Module):
    """Run ``model`` in eval mode (batch norm uses its running statistics), restoring the mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_input(model: nn.Module, input_shape: Sequence[int], batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A random input ``(batch, C, H, W)`` in the model's dtype and device; ``input_shape`` is ``(C, H, W)``
    or ``(B, C, H, W)`` (whose ``B`` is then replaced by ``batch``)."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) or (B, C, H, W) with positive sizes, got {tuple(input_shape)}")
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = p.dtype if p is not None else torch.get_default_dtype()
    device = p.device if p is not None else None
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=gen, dtype=dtype).to(device)


def first_inputs(model: nn.Module, x: torch.Tensor, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``{name: the input modules[name] receives}`` when ``model(x)`` runs (first call of each module)."""
    inputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args):
            inputs.setdefault(name, args[0].detach())
        return hook

    handles = [module.register_forward_pre_hook(keep(name)) for name, module in modules.items()]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def block_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{block name: the input it receives}`` for every time-stepping block when ``model(x)`` runs."""
    return first_inputs(model, x, dict(time_stepping_blocks(model)))


def analysed_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, block)`` for every time-stepping block and every ResNet basic block of ``model``, in order."""
    for name, module in model.named_modules():
        if isinstance(module, (TimeSteppingBlock, BasicBlock)):
            yield name or type(module).__name__, module


def block_grids(model: nn.Module, input_shape: Sequence[int]) -> dict[str, tuple[int, int]]:
    """``{block name: (n1, n2)}``: the grid the operators of each analysed block act on for an input of
    ``input_shape`` (after the pooling of a downsampling ResNet block)."""
    blocks = list(analysed_blocks(model))
    # a time-stepping block keeps its grid; a basic block's operators see its input after any pooling
    grid_modules = {name: block.conv1 if isinstance(block, BasicBlock) else block for name, block in blocks}
    with eval_mode(model), torch.no_grad():
        inputs = first_inputs(model, model_input(model, input_shape), grid_modules)
    grids = {name: tuple(y.shape[-2:]) for name, y in inputs.items()}
    missing = [name for name, _ in blocks if name not in grids]
    if missing:
        raise ValueError(f"blocks {missing} were not run by the model's forward pass on {tuple(input_shape)}")
    return grids


def block_row(name: str, block: TimeSteppingBlock | BasicBlock, grid, method: str = "symbol") -> StabilityRow:
    """The report row of one block on the ``(n1, n2)`` grid it acts on."""
    result = block.stability(grid, method)
    h, bound = float(block.h), result.bound
    if bound is None:
        margin, stable = None, "unknown"
    else:
        margin = (1 - h / bound) if bound > 0 else -math.inf
        stable = "yes" if h <= bound else "no"
    kinds = "+".join(dict.fromkeys(op.kind for op in block.operators()))
    return StabilityRow(name, block.scheme, kinds, result.norm, h, bound, margin, stable,
                        block.stabilize or "-", tuple(grid), list(result.assumptions),
                        getattr(result, "step_amplification", None), getattr(result, "block_amplification", None))


def report(model: nn.Module, input_shape: Sequence[int], method: str = "symbol",
           progress: bool = False) -> StabilityReport:
    """Stability rows of every time-stepping block and ResNet basic block of ``model`` at the grids an
    ``input_shape`` input gives.

    ``method``: how ``‖K‖`` is computed, ``"symbol"`` (exact on periodic grids, a guaranteed upper bound for
    zero padding) or ``"power"`` (power iteration, exact on the grid for either boundary). ``progress``: report
    each analysed block on stderr.
    """
    if method not in ("symbol", "power"):
        raise ValueError(f"unknown norm method {method!r}; expected 'symbol' or 'power'")
    from .progress import Progress

    blocks = list(analysed_blocks(model))
    grids = block_grids(model, input_shape) if blocks else {}
    rows = []
    with Progress(len(blocks), "stability report", unit="blocks", enabled=progress) as bar:
        for name, block in blocks:
            rows.append(block_row(name, block, grids[name], method))
            bar.update(1)
    return StabilityReport(rows, tuple(int(s) for s in input_shape), method)
