"""Fusion as an explicit model transform: ``fuse(model)`` rewrites a plain model for the fused CPU training path,
``unfuse(model)`` undoes it; ``fuse(model, inference=True)`` folds the batch norms for inference instead
(``pdenet.folding``, one-way).

A fused module is its plain module with another ``forward`` (the same submodules, parameters, buffers and
``state_dict`` keys, so checkpoints load either way and an optimizer built before fusing keeps its parameters).
In training mode, on inputs the compiled kernels take (float32 CPU), its forward is one registered operator of
``pdenet_kernels`` instead of the plain arithmetic; anywhere else (evaluation, other devices or dtypes) it runs
the plain module's ``forward``. Two patterns are understood:

- a ResNet ``BasicBlock`` with lean operators (zero boundary, a stencil, plain ``nn.BatchNorm2d`` layers with
  running statistics): ``ReLU(BN₂(K₂ ReLU(BN₁(K₁ x))) + Q x)`` becomes ``torch.ops.pdenet.residual_block`` (the
  lean kernels sum batch norm's moments as they write ``K x``; the backward forms batch norm's output gradient
  tile by tile inside the lean kernel and adds the shortcut's gradient as it stores ``∂x``);
- an ``nn.Sequential`` holding ``nn.BatchNorm2d`` then ``nn.ReLU`` (a stem): that pair becomes
  ``torch.ops.pdenet.batch_norm_relu`` (two passes each way instead of five and four).

Batch norm's running statistics and ``num_batches_tracked`` are updated exactly as ``nn.BatchNorm2d`` updates
them. A fused block calls neither its operators' nor its batch norms' ``forward``, so hooks registered on those
inner modules do not run in the fused path (hooks on the block itself do); ``unfuse`` the model to probe them.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from operators import LeanConv
from pdenet_kernels import batch_norm_relu, fused_kernels_apply, lean_kernel_applies
from pdenet_kernels.ops import residual_block

from .folding import FoldedBasicBlock, FoldedChain, FoldedConv, fold_model
from .networks.layers import downsample2x
from .networks.resnet import BasicBlock


def _plain_batch_norm(bn: nn.Module) -> str:
    """Why ``bn`` cannot be fused, or ``""``."""
    if type(bn) is not nn.BatchNorm2d:
        return f"{type(bn).__name__} is not a plain nn.BatchNorm2d"
    if not (bn.affine and bn.track_running_stats):
        return "batch norm without affine weights or running statistics"
    return ""


def _plain_lean(conv: nn.Module) -> str:
    """Why ``conv`` cannot be a fused lean layer, or ``""``."""
    if type(conv) is not LeanConv:
        return f"{type(conv).__name__} is not a lean operator"
    if conv.stencil is None:
        return "lean operator without a stencil"
    if conv.stride != 1:
        return f"stride {conv.stride} (the fused layers keep the resolution)"
    if conv.boundary != "zeros":
        return f"{conv.boundary!r} boundary (the fused layers take the zero boundary)"
    return ""


def _block_reason(block: BasicBlock) -> str:
    """Why ``block`` cannot run as ``residual_block``, or ``""``."""
    reason = (_plain_lean(block.conv1) or _plain_lean(block.conv2) or _plain_batch_norm(block.bn1)
              or _plain_batch_norm(block.bn2))
    if reason:
        return reason
    c1, c2 = block.conv1, block.conv2
    if (c1.kernel_size, c1.groups, c1.stencil_type) != (c2.kernel_size, c2.groups, c2.stencil_type):
        return "its two operators differ in stencil or groups"
    return ""


def _step_momentum(bn: nn.BatchNorm2d) -> float:
    """Count the step in ``bn.num_batches_tracked`` and return the momentum of its running-statistics update, as
    ``nn.BatchNorm2d`` does: ``bn.momentum``, or the cumulative average's ``1/steps`` when it is ``None``."""
    bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else float(bn.momentum)


def _layer(conv: LeanConv, bn: nn.BatchNorm2d) -> tuple:
    return (conv.pointwise, conv.stencil, bn.weight, bn.bias, bn.running_mean, bn.running_var, _step_momentum(bn),
            bn.eps)


class FusedBasicBlock(BasicBlock):
    """``BasicBlock`` whose training forward on float32 CPU inputs is one ``residual_block`` operator."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and fused_kernels_apply(x) and not _block_reason(self)
                and lean_kernel_applies(x, self.conv1.pointwise, self.conv1.stencil, self.conv1.groups)
                and lean_kernel_applies(x, self.conv2.pointwise, self.conv2.stencil, self.conv2.groups)):
            return super().forward(x)
        if self.stride == 2:
            x = downsample2x(x)
        shortcut = None if self.projection is None else self.projection(x)
        conv1 = self.conv1
        return residual_block(x, shortcut, self.conv2.out_channels, conv1.stencil_index, conv1.kernel_size,
                              conv1.groups, _layer(conv1, self.bn1), _layer(self.conv2, self.bn2))


def _batch_norm_relu_pairs(sequence: nn.Sequential) -> list[int]:
    """Positions ``i`` of ``sequence`` holding a plain batch norm followed by ``nn.ReLU``."""
    modules = list(sequence)
    return [i for i in range(len(modules) - 1)
            if not _plain_batch_norm(modules[i]) and type(modules[i + 1]) is nn.ReLU]


class FusedSequential(nn.Sequential):
    """``nn.Sequential`` that runs each plain ``nn.BatchNorm2d`` directly followed by ``nn.ReLU`` as one
    ``batch_norm_relu`` operator in training mode on float32 CPU inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules, pairs = list(self), set(_batch_norm_relu_pairs(self))
        i = 0
        while i < len(modules):
            bn = modules[i]
            if i in pairs and bn.training and fused_kernels_apply(x) and x.shape[1] == bn.num_features:
                x = batch_norm_relu(x, None, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                    _step_momentum(bn), bn.eps)
                i += 2
            else:
                x, i = bn(x), i + 1
        return x


_FUSED = {BasicBlock: FusedBasicBlock, nn.Sequential: FusedSequential}
_PLAIN = {fused: plain for plain, fused in _FUSED.items()}
_KINDS = {FusedBasicBlock: "residual block", FusedSequential: "batch norm + ReLU sequence"}


@dataclass
class FusionReport:
    """What ``fuse`` rewrote (``fused``: module name -> what it runs as) and what it left as it is (``left``: module
    name -> why), for ``purpose`` ``"training"`` or ``"inference"``."""

    fused: dict[str, str] = field(default_factory=dict)
    left: dict[str, str] = field(default_factory=dict)
    purpose: str = "training"

    def __str__(self) -> str:
        if not self.fused and not self.left:
            return "fuse: nothing in this model has a fused form (it runs as it is)"
        kinds = Counter(self.fused.values())
        target = "CPU training" if self.purpose == "training" else "inference (batch norms folded)"
        lines = ["fuse: " + (", ".join(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in kinds.items())
                             + f" fused for {target}" if kinds else "nothing fused")]
        lines += [f"  left as is: {name or '(model)'}: {reason}" for name, reason in self.left.items()]
        return "\n".join(lines)


def fuse(model: nn.Module, inference: bool = False) -> FusionReport:
    """Rewrite ``model`` in place for the fused CPU training path (see the module notes) and report what was
    fused and what was left, with why. Idempotent; ``unfuse`` undoes it.

    ``inference=True``: fold every batch norm into the operator before it and run lean layers with their bias,
    residual and ReLU as one kernel call (``pdenet.folding``); the model must be in eval mode, and the rewrite is
    one-way (its outputs equal the eval-mode model's, its parameters and state dict differ)."""
    if inference:
        if not _is_folded(model):
            unfuse(model)
        report = FusionReport(purpose="inference")
        fold_model(model, report)
        return report
    if _is_folded(model):
        raise ValueError("this model's batch norms are folded for inference (fuse(model, inference=True)); it "
                         "cannot be fused for training: rebuild it or load its checkpoint")
    report = FusionReport()
    for name, module in model.named_modules():
        if type(module) is BasicBlock:
            reason = _block_reason(module)
            if reason:
                report.left[name] = reason
            else:
                module.__class__ = FusedBasicBlock
        elif type(module) is nn.Sequential and _batch_norm_relu_pairs(module):
            module.__class__ = FusedSequential
        if type(module) in _PLAIN:
            report.fused[name] = _KINDS[type(module)]
    return report


def _is_folded(model: nn.Module) -> bool:
    return any(type(m) in (FoldedBasicBlock, FoldedChain, FoldedConv) for m in model.modules())


def unfuse(model: nn.Module) -> nn.Module:
    """Undo ``fuse`` in place: every fused module becomes its plain module again (same parameters, buffers and
    ``state_dict`` keys). Returns ``model``. A model folded for inference cannot be unfolded (``ValueError``)."""
    if _is_folded(model):
        raise ValueError("this model's batch norms are folded for inference (fuse(model, inference=True)), which "
                         "cannot be undone: rebuild the model or load its checkpoint")
    for module in model.modules():
        if type(module) in _PLAIN:
            module.__class__ = _PLAIN[type(module)]
    return model


def is_fused(model: nn.Module) -> bool:
    """Whether any module of ``model`` is in a fused form (for training, or folded for inference)."""
    return any(type(m) in _PLAIN for m in model.modules()) or _is_folded(model)
