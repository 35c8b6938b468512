"""Turn the 3x3 convolutions of any model into lean operators (``K = P + S``), in place.

A dense 3x3 kernel ``W`` (``c_out x c_in x 3 x 3``) has ``9 c_in c_out`` weights; the lean operator keeps
only those of a structured part: the centre taps ``W[o, i, 1, 1]`` become the 1x1 coupling ``P`` (within its
groups) and each channel's own kernel ``W[j, j]`` restricted to the stencil becomes the depthwise part ``S``
(for ``j < min(c_in, c_out)``). With ``init="dense"`` the lean operator is initialised with exactly these
weights: its equivalent dense kernel is ``M ⊙ W`` for the 0/1 mask ``M`` of that structure, the orthogonal
projection of ``W`` onto the lean operators, so a kernel that already has the structure is reproduced
exactly. ``captured = ‖M ⊙ W‖_F / ‖W‖_F`` reports how much of each kernel survived.

Eligible: ``nn.Conv2d`` with a 3x3 kernel, stride 1, dilation 1, one group, padding 1 (or ``"same"``) and
padding mode ``"zeros"`` or ``"circular"`` (which become the operator's boundary condition), and
``operators.DenseConv`` with a 3x3 kernel. With ``strided=True`` also such convolutions with a stride ``s`` (the
same on both axes), which become strided lean operators ``K_s x = P x[..., ::s, ::s] + S_s x``
(``LeanConv(stride=s)``: the same arithmetic as ``nn.Conv2d(3, stride=s, padding=1)`` with the kernel ``M ⊙ W``).
A convolution bias is kept, as a separate per-channel add (:class:`BiasedOperator`). Everything else is left
alone and listed with the reason.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from operators import ConvOperator, DenseConv
from operators.base import check_positive_int
from operators.lean import STENCILS, LeanConv

INITS = ("dense", "random")


class BiasedOperator(nn.Module):
    """``x ↦ K x + b``: an operator followed by a per-channel bias ``b`` of shape ``(c_out,)``."""

    def __init__(self, operator: ConvOperator, bias: torch.Tensor):
        super().__init__()
        self.operator = operator
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.operator(x) + self.bias.view(1, -1, 1, 1)


@dataclass
class Replacement:
    """One convolution turned into a lean operator."""

    name: str
    kind: str  # the class that was replaced
    in_channels: int
    out_channels: int
    boundary: str
    bias: bool
    params_before: int
    params_after: int
    captured: float | None  # ‖M ⊙ W‖ / ‖W‖ with init="dense", else None
    stride: int = 1


@dataclass
class Skip:
    """A convolution left alone, and why."""

    name: str
    kind: str
    reason: str


@dataclass
class LeanifyReport:
    """What :func:`leanify` replaced and what it skipped."""

    stencil: str
    groups: int
    init: str
    strided: bool = False
    replaced: list[Replacement] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.replaced)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.replaced)

    def to_dict(self) -> dict:
        return {**asdict(self), "params_before": self.params_before, "params_after": self.params_after}

    def __str__(self) -> str:
        options = f"stencil={self.stencil!r}, groups={self.groups}, init={self.init!r}"
        options += ", strided=True" if self.strided else ""
        lines = [f"leanify ({options}): "
                 f"replaced {len(self.replaced)}, skipped {len(self.skipped)}; parameters of the replaced "
                 f"layers {self.params_before} -> {self.params_after}"]
        for r in self.replaced:
            kept = "" if r.captured is None else f", captured {r.captured:.3f}"
            stride = f", stride {r.stride}" if r.stride != 1 else ""
            lines.append(f"  replaced {r.name}: {r.kind} {r.in_channels}->{r.out_channels} ({r.boundary}{stride}"
                         f"{', bias' if r.bias else ''}), {r.params_before} -> {r.params_after} weights{kept}")
        lines += [f"  skipped  {s.name}: {s.kind}, {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def _conv2d_problems(conv: nn.Conv2d, strided: bool) -> list[str]:
    problems = []
    if tuple(conv.kernel_size) != (3, 3):
        problems.append(f"kernel {conv.kernel_size[0]}x{conv.kernel_size[1]} (only 3x3)")
    stride = tuple(conv.stride)
    if stride != (1, 1) and not strided:
        problems.append(f"stride {stride} (only 1; pass strided=True for strided lean operators)")
    elif stride[0] != stride[1]:
        problems.append(f"stride {stride} (only the same stride on both axes)")
    if tuple(conv.dilation) != (1, 1):
        problems.append(f"dilation {tuple(conv.dilation)} (only 1)")
    if conv.groups != 1:
        problems.append(f"groups={conv.groups} (only 1)")
    if conv.padding not in ((1, 1), "same"):
        problems.append(f"padding {conv.padding} (only 1, the same-size convolution)")
    if conv.padding_mode not in ("zeros", "circular"):
        problems.append(f"padding_mode {conv.padding_mode!r} (only 'zeros' or 'circular')")
    return problems


@torch.no_grad()
def init_from_dense(lean: LeanConv, weight: torch.Tensor) -> float:
    """Set ``lean``'s weights to the lean part of the dense kernel ``weight`` (``c_out x c_in/1 x k x k``).

    ``P[o, i] = W[o, i, r, r]`` for ``o, i`` in the same group; ``s_j = W[j, j]`` on the stencil for
    ``j < m``, with its centre tap 0 when ``W[j, j, r, r]`` already went to ``P`` (``j`` in its own group).
    Returns ``‖M ⊙ W‖_F / ‖W‖_F`` (1 for a zero kernel).
    """
    c_out, c_in, k, _ = weight.shape
    if (c_out, c_in, k) != (lean.out_channels, lean.in_channels, lean.kernel_size):
        raise ValueError(f"dense kernel of shape {tuple(weight.shape)} does not fit {lean}")
    g, r = lean.groups, k // 2
    blocks = weight[:, :, r, r].reshape(g, c_out // g, g, c_in // g)
    lean.pointwise.copy_(blocks.diagonal(dim1=0, dim2=2).permute(2, 0, 1).reshape(c_out, c_in // g))
    if lean.stencil is not None:
        m = lean.stencil.shape[0]
        j = torch.arange(m, device=weight.device)
        own = weight[j, j].reshape(m, k * k)[:, lean.stencil_index].clone()
        centre = (lean.stencil_index == r * k + r).nonzero().flatten()
        in_group = (j // (c_out // g)) == (j // (c_in // g))
        own[in_group.nonzero().flatten()[:, None], centre] = 0
        lean.stencil.copy_(own)
    total = weight.norm()
    return float(lean.equivalent_dense_weight().norm() / total) if total > 0 else 1.0


def _make_lean(weight: torch.Tensor, boundary: str, stencil: str, groups: int, init: str,
               stride: int) -> tuple[LeanConv, float | None]:
    c_out, c_in = weight.shape[:2]
    lean = LeanConv(c_in, c_out, 3, boundary, stencil=stencil, groups=groups, stride=stride)
    lean = lean.to(weight.device, weight.dtype)
    captured = init_from_dense(lean, weight) if init == "dense" else None
    return lean, captured


def leanify(model: nn.Module, stencil: str = "cross", groups: int = 1, init: str = "dense",
            strided: bool = False) -> LeanifyReport:
    """Replace, in place, every eligible 3x3 convolution of ``model`` by a :class:`~operators.LeanConv`.

    ``stencil`` (``"cross"``, ``"full"``, ``"none"``) and ``groups`` are the lean operator's tuning
    parameters; ``init="dense"`` projects the dense weights onto the lean structure (see the module notes),
    ``init="random"`` keeps the lean operator's own initialisation. ``strided=True`` also replaces 3x3
    convolutions with a stride ``s`` by strided lean operators (``LeanConv(stride=s)``); by default they are
    skipped. A module used at several places is
    replaced by one lean operator (weights stay shared). Operators of ``operators`` other than 3x3
    ``DenseConv`` are not looked into. Returns a :class:`LeanifyReport`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"leanify expects an nn.Module, got {type(model).__name__}")
    if stencil not in STENCILS:
        raise ValueError(f"unknown stencil {stencil!r}; expected one of {STENCILS}")
    groups = check_positive_int("groups", groups)
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
    if not isinstance(strided, bool):
        raise TypeError(f"strided must be a bool, got {strided!r}")
    report = LeanifyReport(stencil, groups, init, strided)
    done: dict[int, nn.Module] = {}

    def convert(name: str, module: nn.Module) -> nn.Module | None:
        """The replacement of ``module``, or ``None`` (with a skip recorded where it is a convolution)."""
        if isinstance(module, DenseConv):
            k = module.kernel_size
            problems = [] if k == 3 else [f"kernel {k}x{k} (only 3x3)"]
            weight, boundary, bias, stride = module.weight, module.boundary, None, module.stride
        elif isinstance(module, nn.Conv2d):
            problems = _conv2d_problems(module, strided)
            weight, bias, stride = module.weight, module.bias, module.stride[0]
            boundary = "circular" if module.padding_mode == "circular" else "zeros"
        else:
            return None
        c_out, c_in = weight.shape[:2]
        if not problems and (c_in % groups or c_out % groups):
            problems.append(f"groups={groups} does not divide {c_in} -> {c_out} channels")
        if problems:
            report.skipped.append(Skip(name, type(module).__name__, "; ".join(problems)))
            return None
        lean, captured = _make_lean(weight.detach(), boundary, stencil, groups, init, stride)
        new = lean if bias is None else BiasedOperator(lean, bias)
        report.replaced.append(Replacement(
            name, type(module).__name__, c_in, c_out, boundary, bias is not None,
            sum(p.numel() for p in module.parameters()), sum(p.numel() for p in new.parameters()), captured, stride))
        return new

    def walk(prefix: str, parent: nn.Module) -> None:
        for child_name, child in list(parent._modules.items()):  # named_children() hides repeated modules
            if child is None:
                continue
            name = f"{prefix}{child_name}"
            if id(child) in done:
                if done[id(child)] is not child:
                    setattr(parent, child_name, done[id(child)])
                continue
            new = convert(name, child)
            done[id(child)] = child if new is None else new
            if new is not None:
                setattr(parent, child_name, new)
            elif not isinstance(child, ConvOperator):
                walk(f"{name}.", child)

    if isinstance(model, (nn.Conv2d, ConvOperator)):
        raise TypeError("leanify replaces convolutions inside a model; the model is itself a convolution "
                        "(wrap it, e.g. in nn.Sequential, or build an operators.LeanConv directly)")
    walk("", model)
    return report
