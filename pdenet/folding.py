"""Inference fusion: every batch norm folded into the operator before it, lean layers run as one kernel call.

In inference mode a batch norm is an affine map per channel, ``B z = a ⊙ z + c`` with ``a = γ/√(σ² + ε)`` and
``c = β − a μ`` from its running statistics. After an operator ``K`` (with an optional bias ``b₀``) it folds into
the operator: ``B(K x + b₀) = K' x + b'`` with ``K' = diag(a) K`` (each output channel's weights scaled) and
``b' = a ⊙ b₀ + c``. For a lean operator ``K = P + S`` that is ``P' = diag(a) P`` and each stencil ``s_j`` scaled
by ``a_j``; a dense operator or ``nn.Conv2d`` becomes an ``nn.Conv2d`` with a bias. The folded layer
(:class:`FoldedConv`) computes ``act(K' x + b' [+ r])``; for a lean operator on inputs the compiled kernels take
(float32 CPU, stride 1) that is one call of ``torch.ops.pdenet.lean_conv_affine``, which adds the bias, the
residual and applies the ReLU as it stores ``y``.

Patterns folded:

- a ResNet ``BasicBlock``: ``ReLU(BN₂(K₂ ReLU(BN₁(K₁ x))) + Q x)`` becomes two folded layers,
  ``ReLU(K₂' ReLU(K₁' x + b₁') + b₂' + Q' x)`` (the projection shortcut folded too), with lean operators one
  ``residual_block_inference`` call; an ``nn.Sequential`` of two or more such lean blocks with identity or
  zero-channel shortcuts (the stages of a lean CIFAR ResNet) becomes a :class:`FoldedChain`, one
  ``residual_chain_inference`` call for all of them;
- in an ``nn.Sequential``, an operator or ``nn.Conv2d`` directly followed by ``nn.BatchNorm2d`` and optionally
  ``nn.ReLU``/``nn.ReLU6`` (stems, MobileNetV2 and ShuffleNetV2 layers): one folded layer, the places of the
  batch norm and the activation left as ``nn.Identity`` so that the other indices keep their meaning.

Everything else runs as it is; the report says what was left and why. Folding is one-way (the batch norms are
gone, the state dict has other keys): keep the trained model or its checkpoint to train further.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from operators import DenseConv, LeanConv, LeanConv2d
from pdenet_kernels.ops import lean_conv_affine, residual_block_inference, residual_chain_inference

from .networks.layers import downsample2x
from .normalization import inference_scale
from .networks.resnet import BasicBlock

ACTIVATIONS = (nn.ReLU, nn.ReLU6)


def batch_norm_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, c)`` with ``bn(z) = a ⊙ z + c`` in inference mode: ``a = γ/√(σ² + ε)``, ``c = β − a μ``."""
    scale = inference_scale(bn)
    shift = -bn.running_mean * scale
    if bn.affine:
        shift = shift + bn.bias
    return scale.detach(), shift.detach()


def why_not_foldable(conv: nn.Module, bn: nn.Module) -> str:
    """Why the batch norm ``bn`` cannot be folded into ``conv``, or ``""``."""
    if type(bn) is not nn.BatchNorm2d:
        return f"{type(bn).__name__} is not a plain nn.BatchNorm2d"
    if not bn.track_running_stats or bn.running_mean is None:
        return "batch norm without running statistics (it normalizes with the batch's statistics)"
    if type(conv) in (LeanConv, LeanConv2d, DenseConv, nn.Conv2d):
        return ""
    return (f"folding a batch norm into {type(conv).__name__} is not implemented (lean, LeanConv2d, dense and "
            "nn.Conv2d are)")


@torch.no_grad()
def fold(conv: nn.Module, bn: nn.BatchNorm2d) -> tuple[nn.Module, torch.Tensor | None]:
    """``(K', b')``: the operator with the batch norm folded into it (see the module notes); ``b'`` is ``None``
    where it went into an ``nn.Conv2d``'s own bias."""
    scale, shift = batch_norm_affine(bn)
    if type(conv) is LeanConv:
        lean = copy.deepcopy(conv)
        _scale_lean(lean, scale)
        return lean, nn.Parameter(shift.to(lean.pointwise.dtype))
    if type(conv) is LeanConv2d:
        layer = copy.deepcopy(conv)
        _scale_lean(layer.operator, scale)
        dtype = layer.operator.pointwise.dtype
        layer.bias = nn.Parameter(shift.to(dtype) + (0 if conv.bias is None else scale.to(dtype) * conv.bias))
        return layer, None
    if type(conv) is DenseConv:
        k = conv.kernel_size
        dense = nn.Conv2d(conv.in_channels, conv.out_channels, k, padding=k // 2, padding_mode=conv.boundary,
                          bias=True, device=conv.weight.device, dtype=conv.weight.dtype)
        weight, bias = conv.weight, None
    else:
        dense, weight, bias = copy.deepcopy(conv), conv.weight, conv.bias
        if bias is None:
            dense.bias = nn.Parameter(torch.zeros_like(shift, dtype=weight.dtype))
    dense.weight.copy_(weight * scale.to(weight.dtype).view(-1, *[1] * (weight.dim() - 1)))
    dense.bias.copy_(shift.to(weight.dtype) + (0 if bias is None else scale.to(weight.dtype) * bias))
    return dense, None


def _scale_lean(lean: LeanConv, scale: torch.Tensor) -> None:
    """``K ← diag(a) K`` for a lean ``K``: the coupling's rows and the stencils scaled by ``a`` in place."""
    lean.pointwise.mul_(scale.to(lean.pointwise.dtype)[:, None])
    if lean.stencil is not None:
        lean.stencil.mul_(scale[: lean.stencil.shape[0], None].to(lean.stencil.dtype))


class FoldedConv(nn.Module):
    """``act(K x + b [+ r])``: an operator with an inference-mode batch norm folded into it (``K``, ``b``), then
    an optional residual ``r`` and activation (``None``, ``nn.ReLU`` or ``nn.ReLU6``).

    A lean ``K`` of stride 1 with its bias ``b`` runs as ``pdenet_kernels.lean_conv_affine``: one compiled-kernel
    call on float32 CPU inputs, the ReLU included. An ``nn.Conv2d`` or ``LeanConv2d`` ``K`` holds ``b`` as its own
    bias."""

    def __init__(self, operator: nn.Module, bias: torch.Tensor | None, activation: nn.Module | None):
        super().__init__()
        self.operator = operator
        self.bias = bias
        self.activation = activation

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        op, relu = self.operator, type(self.activation) is nn.ReLU
        if type(op) is LeanConv and op.stencil is not None and op.stride == 1:
            y = lean_conv_affine(x, op.pointwise, op.stencil, op.stencil_index, op.kernel_size,
                                 op.boundary == "circular", op.groups, self.bias, residual, relu)
            return y if relu or self.activation is None else self.activation(y)
        y = op(x)
        if self.bias is not None:
            y = y + self.bias[:, None, None]
        if residual is not None:
            y = y + residual
        return y if self.activation is None else self.activation(y)


class FoldedBasicBlock(nn.Module):
    """A ResNet ``BasicBlock`` with its batch norms folded: ``y = ReLU(K₂' ReLU(K₁' D x + b₁) + b₂ + Q' D x)``
    (``D`` the block's 2x2 average pooling at stride 2; ``Q'`` the identity, zero channels appended, or the folded
    1x1 projection). With lean operators (``one_call``, see ``_one_call``) the two layers are one
    ``residual_block_inference`` call."""

    def __init__(self, block: BasicBlock):
        super().__init__()
        self.stride, self.pad_channels = block.stride, block.pad_channels
        self.conv1 = FoldedConv(*fold(block.conv1, block.bn1), nn.ReLU())
        self.conv2 = FoldedConv(*fold(block.conv2, block.bn2), nn.ReLU())
        self.projection = None if block.projection is None else FoldedConv(*fold(*block.projection), None)
        self.one_call = _one_call(self.conv1.operator, self.conv2.operator)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.projection is not None:
            return self.projection(x)
        return nn.functional.pad(x, (0, 0, 0, 0, 0, self.pad_channels)) if self.pad_channels else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            x = downsample2x(x)
        if self.one_call:
            k = self.conv1.operator
            return residual_block_inference(x, self.shortcut(x), k.stencil_index, k.kernel_size,
                                            k.boundary == "circular", k.groups, *self.lean_layers())
        return self.conv2(self.conv1(x), residual=self.shortcut(x))

    def lean_layers(self) -> tuple[tuple, tuple]:
        """``((P₁, s₁, b₁), (P₂, s₂, b₂))``: the folded lean layers' weights (``one_call`` blocks)."""
        k1, k2 = self.conv1.operator, self.conv2.operator
        return (k1.pointwise, k1.stencil, self.conv1.bias), (k2.pointwise, k2.stencil, self.conv2.bias)


def _one_call(k1: nn.Module, k2: nn.Module) -> bool:
    """Whether a folded block with the operators ``k1, k2`` runs as one ``residual_block_inference`` call: two lean
    operators of stride 1 with stencils, alike in stencil, kernel size, groups and boundary."""
    return (type(k1) is type(k2) is LeanConv and k1.stencil is not None and k2.stencil is not None
            and k1.stride == k2.stride == 1 and _one_call_signature(k1) == _one_call_signature(k2))


class FoldedChain(nn.Module):
    """A chain of folded lean residual blocks (an ``nn.Sequential`` of them, directly or in nested stages, with
    identity or zero-channel shortcuts), with all their weights packed in one vector: one
    ``residual_chain_inference`` call runs every block's arithmetic in the compiled kernels without a return to
    Python in between. ``y = B_n ∘ … ∘ B₁ (x)``, each ``B`` a :class:`FoldedBasicBlock`."""

    def __init__(self, blocks: list):
        super().__init__()
        first = blocks[0].conv1.operator
        self.in_channels, self.kernel_size = first.in_channels, first.kernel_size
        self.circular, self.groups = first.boundary == "circular", first.groups
        self.strides = [block.stride for block in blocks]
        self.widths = [block.conv2.operator.out_channels for block in blocks]
        self.register_buffer("taps", first.stencil_index.clone(), persistent=False)
        self.packed = nn.Parameter(torch.cat([w.detach().reshape(-1) for block in blocks
                                              for layer in block.lean_layers() for w in layer]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return residual_chain_inference(x, self.taps, self.kernel_size, self.circular, self.groups, self.strides,
                                        self.widths, self.packed)

    def extra_repr(self) -> str:
        return (f"{self.in_channels} -> {' -> '.join(map(str, self.widths))} channels, strides {self.strides}, "
                f"{self.packed.numel()} packed weights")


def _chain(sequence: nn.Sequential) -> list | None:
    """The folded blocks of ``sequence`` in order (through nested ``nn.Sequential``) where every module is a folded
    block that runs as one call with a zero-channel or identity shortcut, all alike; else ``None``."""
    blocks = []
    for module in sequence:
        if type(module) is nn.Sequential:
            inner = _chain(module)
            if inner is None:
                return None
            blocks += inner
        elif type(module) is FoldedBasicBlock and module.one_call and module.projection is None:
            blocks.append(module)
        else:
            return None
    if not blocks or len({_one_call_signature(b.conv1.operator) for b in blocks}) > 1:
        return None
    return blocks


def _one_call_signature(k: LeanConv) -> tuple:
    return k.stencil_type, k.kernel_size, k.groups, k.boundary


def _block_reason(block: BasicBlock) -> str:
    reasons = [why_not_foldable(block.conv1, block.bn1), why_not_foldable(block.conv2, block.bn2)]
    if block.projection is not None:
        reasons.append(why_not_foldable(*block.projection))
    return "; ".join(r for r in reasons if r)


def _fold_sequence(sequence: nn.Sequential) -> list[int]:
    """Fold every (operator, batch norm[, ReLU/ReLU6]) run of ``sequence`` in place; the positions folded."""
    modules, folded, i = list(sequence), [], 0
    while i + 1 < len(modules):
        conv, bn = modules[i], modules[i + 1]
        if why_not_foldable(conv, bn):
            i += 1
            continue
        activation = modules[i + 2] if i + 2 < len(modules) and type(modules[i + 2]) in ACTIVATIONS else None
        sequence[i] = FoldedConv(*fold(conv, bn), None if activation is None else type(activation)())
        sequence[i + 1] = nn.Identity()
        if activation is not None:
            sequence[i + 2] = nn.Identity()
        folded.append(i)
        i += 2 + (activation is not None)
    return folded


def _replace_chains(parent: nn.Module, report, prefix: str = "") -> None:
    """Replace each outermost ``nn.Sequential`` of ``parent`` that is a chain of two or more folded lean blocks
    (``_chain``) by a :class:`FoldedChain`; the report lists the chain instead of its blocks."""
    for name, child in list(parent.named_children()):
        full = f"{prefix}{name}"
        blocks = _chain(child) if type(child) is nn.Sequential else None
        if blocks is not None and len(blocks) > 1:
            setattr(parent, name, FoldedChain(blocks).train(False))
            for inner in [n for n in report.fused if n.startswith(f"{full}.")]:
                del report.fused[inner]
            report.fused[full] = "chain of residual blocks"
        else:
            _replace_chains(child, report, f"{full}.")


def fold_model(model: nn.Module, report) -> None:
    """Fold ``model``'s batch norms in place (see the module notes), recording in ``report`` (a
    ``pdenet.fusion.FusionReport``) what became what and what was left, with why."""
    if model.training:
        raise ValueError("inference fusion folds the running statistics of batch norm: call model.eval() first "
                         "(in training mode batch norm normalizes with each batch's statistics)")

    def walk(prefix: str, parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            full = f"{prefix}{name}"
            if type(child) is BasicBlock:
                reason = _block_reason(child)
                if reason:
                    report.left[full] = reason
                else:
                    setattr(parent, name, FoldedBasicBlock(child).train(False))
                    report.fused[full] = "residual block"
                    continue
            if type(child) is nn.Sequential:
                for i in _fold_sequence(child):
                    report.fused[f"{full}.{i}"] = "operator + batch norm pair"
            walk(f"{full}.", child)

    walk("", model)
    _replace_chains(model, report)
    for name, module in model.named_modules():
        if type(module) is nn.BatchNorm2d and name.rsplit(".", 1)[0] not in report.left:
            report.left.setdefault(name, "a batch norm that does not directly follow an operator it can fold into")
