"""The kernels as registered PyTorch operators (``torch.ops.pdenet.*``), each with a fake implementation, an
autograd formula and a FLOP formula, so that ``torch.compile(fullgraph=True)``, ``torch.export``, autocast,
``torch.func`` and ``torch.utils.flop_counter.FlopCounterMode`` see them like PyTorch's own operators.

``lean_conv``: ``y = P x + S x``, the lean operator of LeanConvNets. ``P`` (c_out, c_in/g) is a 1x1 coupling in
``g`` groups; ``S`` a stencil (m, ntaps) on the flat indices ``taps`` of the ``k x k`` square, acting on the first
``m = min(c_in, c_out)`` channels: ``(S x)_j(n) = Σ_t s_j[t] x_j(n + t)`` (cross-correlation), zero or periodic
boundary. Where the compiled kernel applies (``lean_kernel_applies``: CPU, float32, the kernels loaded, whole
register blocks per group) it computes ``P x + S x`` in one pass over channels-last ``x`` and ``y``; elsewhere
(other devices and dtypes) it is ``F.conv2d`` twice. That choice, from the tensors, is made in this one place;
the fake implementation makes the same choice, so strides agree. The computation runs in ``x``'s dtype (the
weights cast to it), so under autocast the operator follows its input as a convolution does.
``lean_conv_backward``: ``(∂x, ∂P, ∂s)`` for an output gradient ``g``: ``∂x = P^T g + S^T g`` (the same kernel on
the adjoint's weights and flipped taps), ``∂P[o, i] = Σ_n g_o x_i``, ``∂s_j[t] = Σ_n g_j(n) x_j(n + t)``: one pass
of the compiled kernel. Each operator's autograd formula is written with the other, so gradients of any order
exist. FLOPs are counted as PyTorch counts the plain convolutions (the stencil as a dense ``k x k`` depthwise
kernel): ``2 B n1 n2 (c_out c_in/g + k² m)`` forward, twice that backward with the input gradient.

``batch_norm_relu``: ``y = max(0, γ (z − μ)/√(σ² + ε) + β [+ r])`` with the batch's statistics (training mode),
running statistics updated in place as ``nn.BatchNorm2d`` updates them; two passes each way.
``residual_block``: a ResNet basic block's body in training mode, ``y = ReLU(BN₂(K₂ ReLU(BN₁(K₁ x))) + r)`` with
lean ``K₁, K₂`` (zero boundary) and the shortcut ``r = Q x`` (``x`` with zero channels appended) or a given
``shortcut``: the lean kernels sum each batch norm's moments as they write ``K x``; in the backward, batch norm's
output gradient is formed tile by tile inside the lean kernel, and the shortcut's gradient is added to ``∂x`` as
the kernel stores it. These two run on the compiled kernels only (``fused_kernels_apply``); a model uses them
through ``pdenet.fuse``.

In eager mode ``lean_conv(...)`` (the function) applies the operator through an ``autograd.Function`` with the
same backward plus a forward-mode derivative and a ``vmap`` rule: PyTorch's registered custom operators support
neither forward-mode AD nor ``torch.func``'s gradient transforms. While ``torch.compile`` or ``torch.export``
trace, it calls the registered operator directly.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad
from torch.utils.flop_counter import register_flop_formula

from . import binding

NAMESPACE = "pdenet"


# ---------------------------------------------------------------------------------------------- helpers
def stencil_as_kernel(stencil: Tensor, taps: Tensor, k: int) -> Tensor:
    """The depthwise ``(m, 1, k, k)`` kernel of the stencil weights ``(m, ntaps)`` on the flat indices ``taps``
    of the ``k x k`` square (zeros elsewhere)."""
    m = stencil.shape[0]
    return stencil.new_zeros(m, k * k).index_copy(1, taps, stencil).view(m, 1, k, k)


def flipped_taps(taps: Tensor, k: int) -> Tensor:
    """The support of the flipped ``k x k`` stencil (the adjoint's): ``p k + q ↦ k² − 1 − (p k + q)``."""
    return k * k - 1 - taps


def adjoint_coupling(pointwise: Tensor, groups: int) -> Tensor:
    """``P^T`` in the layout of a coupling: ``(c_out, c_in/g) -> (c_in, c_out/g)``, transposed within each group."""
    c_out, cig = pointwise.shape
    return pointwise.view(groups, c_out // groups, cig).transpose(1, 2).reshape(groups * cig, c_out // groups)


def _padded(x: Tensor, r: int, circular: bool) -> tuple[Tensor, int]:
    """``x`` and the padding a convolution still has to add: periodic padding done here, zero padding left."""
    return (F.pad(x, (r, r, r, r), mode="circular"), 0) if circular and r else (x, r)


def _check_lean(xs, pointwise: Tensor, stencil: Tensor, taps: Tensor, kernel_size: int, groups: int,
                name: str = "lean_conv") -> None:
    """A clear ``ValueError`` for arguments that do not make a lean operator on an input of shape ``xs`` (each
    shape read once: this runs on every call)."""
    ps, ss, ts = pointwise.shape, stencil.shape, taps.shape
    problem = ""
    if len(xs) != 4:
        problem = f"x must be 4-D (batch, channels, n1, n2), got shape {tuple(xs)}"
    elif len(ps) != 2 or len(ss) != 2 or len(ts) != 1:
        problem = (f"pointwise (c_out, c_in/groups), stencil (m, ntaps) and taps (ntaps,) must be 2-D, 2-D and 1-D, "
                   f"got {tuple(ps)}, {tuple(ss)} and {tuple(ts)}")
    elif groups < 1 or xs[1] % groups or ps[0] % groups or ps[1] * groups != xs[1]:
        problem = f"pointwise of shape {tuple(ps)} with groups={groups} does not take {xs[1]} input channels"
    elif ss[0] > min(xs[1], ps[0]) or ss[1] != ts[0]:
        problem = (f"stencil of shape {tuple(ss)} needs at most min(c_in, c_out) = {min(xs[1], ps[0])} rows and "
                   f"one column per tap ({ts[0]})")
    elif kernel_size < 1 or kernel_size % 2 == 0 or kernel_size > 9 or taps.dtype is not torch.int64:
        problem = f"kernel_size must be odd in 1..9 and taps int64, got {kernel_size} and {taps.dtype}"
    if problem:
        raise ValueError(f"pdenet::{name}: {problem}")


def _signed(function_class: type) -> type:
    """``function_class`` with its ``forward``'s signature computed once: ``autograd.Function.apply`` binds the
    arguments to it on every call, and ``inspect.signature`` takes longer than a small layer's kernel."""
    forward = function_class.forward
    forward.__signature__ = inspect.signature(forward)
    return function_class


def lean_kernel_applies(x: Tensor, pointwise: Tensor, stencil: Tensor, groups: int) -> bool:
    """Whether the compiled lean kernel computes ``lean_conv`` for these tensors: 4-D non-empty float32 CPU
    tensors, the kernels loaded, and ``groups == 1`` or whole register blocks per group (other group widths would
    run the kernel's scalar path, slower than PyTorch's convolutions)."""
    f32 = torch.float32
    if not (x.dtype is f32 and pointwise.dtype is f32 and stencil.dtype is f32 and x.is_cpu and x.dim() == 4
            and x.numel() > 0 and binding.available()):
        return False
    if groups == 1:
        return True
    c_out, cig = pointwise.shape
    block = binding.block_channels()
    return (c_out // groups) % block == 0 and cig % block == 0


def fused_kernels_apply(x: Tensor) -> bool:
    """Whether the fused training operators (``batch_norm_relu``, ``residual_block``) run for an input like
    ``x``: 4-D non-empty float32 CPU, the kernels loaded."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and x.numel() > 0
            and binding.available())


def _require_fused(x: Tensor, name: str) -> None:
    if not fused_kernels_apply(x):
        raise ValueError(f"pdenet::{name} runs on the compiled CPU kernels only (4-D float32 CPU tensors, kernels "
                         f"loaded); got {x.dtype} {tuple(x.shape)} on {x.device} ({binding.status()}). "
                         "Use the unfused model (pdenet.unfuse) here.")


def _check_batch_norm(z: Tensor, residual: Tensor | None, vectors: tuple, name: str) -> None:
    """A clear ``ValueError`` where ``residual`` (if any) is not like ``z`` or a per-channel vector is not
    ``(C,)``."""
    if z.dim() != 4 or (residual is not None and residual.shape != z.shape):
        raise ValueError(f"pdenet::{name}: z must be 4-D and the residual like it, got {tuple(z.shape)} and "
                         f"{None if residual is None else tuple(residual.shape)}")
    if any(v.shape != (z.shape[1],) for v in vectors):
        raise ValueError(f"pdenet::{name}: batch norm's weight, bias and statistics must have shape "
                         f"({z.shape[1]},), got {[tuple(v.shape) for v in vectors]}")


def _updatable(statistic: Tensor) -> Tensor:
    """A contiguous copy of a running statistic, for the kernel to update (the operators are functional)."""
    return statistic.clone(memory_format=torch.contiguous_format)


def _lean_output(x: Tensor, c_out: int) -> Tensor:
    """An empty channels-last ``(B, c_out, n1, n2)`` like ``x``: what the compiled lean kernels return."""
    return x.new_empty((x.shape[0], c_out, *x.shape[2:])).contiguous(memory_format=torch.channels_last)


def _lean_flops(x_shape, pointwise_shape, stencil_shape, k: int) -> int:
    b, _, n1, n2 = x_shape
    c_out, cig = pointwise_shape
    return 2 * b * n1 * n2 * (c_out * cig + k * k * stencil_shape[0])


# ---------------------------------------------------------------------------------------------- lean_conv
def lean_conv_reference(x: Tensor, pointwise: Tensor, stencil: Tensor, taps: Tensor, kernel_size: int,
                        circular: bool, groups: int) -> Tensor:
    """``P x + S x`` by ``F.conv2d`` (in ``x``'s dtype): the plain composition the compiled kernel replaces."""
    m, r = stencil.shape[0], kernel_size // 2
    out = F.conv2d(x, pointwise.to(x.dtype)[:, :, None, None], groups=groups)
    head, padding = _padded(x if m == x.shape[1] else x[:, :m], r, circular)
    smooth = F.conv2d(head, stencil_as_kernel(stencil.to(x.dtype), taps, kernel_size), padding=padding, groups=m)
    if m == out.shape[1]:
        return out + smooth
    return torch.cat([out[:, :m] + smooth, out[:, m:]], 1)


def _lean_contiguous(x, pointwise, stencil, taps):
    return binding.channels_last(x), pointwise.contiguous(), stencil.contiguous(), taps.contiguous()


@torch.library.custom_op(f"{NAMESPACE}::lean_conv", mutates_args=())
def lean_conv_op(x: Tensor, pointwise: Tensor, stencil: Tensor, taps: Tensor, kernel_size: int, circular: bool,
                 groups: int) -> Tensor:
    _check_lean(x.shape, pointwise, stencil, taps, kernel_size, groups)
    if lean_kernel_applies(x, pointwise, stencil, groups):
        return binding.lean_forward(*_lean_contiguous(x, pointwise, stencil, taps), kernel_size, circular, groups)
    with torch.autocast(x.device.type, enabled=False):
        return lean_conv_reference(x, pointwise, stencil, taps, kernel_size, circular, groups)


@lean_conv_op.register_fake
def _(x, pointwise, stencil, taps, kernel_size, circular, groups):
    _check_lean(x.shape, pointwise, stencil, taps, kernel_size, groups)
    if lean_kernel_applies(x, pointwise, stencil, groups):
        return _lean_output(x, pointwise.shape[0])
    return lean_conv_reference(x, pointwise, stencil, taps, kernel_size, circular, groups)


@register_flop_formula(torch.ops.pdenet.lean_conv)
def _(x_shape, pointwise_shape, stencil_shape, taps_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    return _lean_flops(x_shape, pointwise_shape, stencil_shape, kernel_size)


def _check_lean_backward(grad, x, pointwise, stencil, taps, kernel_size, groups) -> None:
    _check_lean(x.shape, pointwise, stencil, taps, kernel_size, groups, "lean_conv_backward")
    if grad.shape != (x.shape[0], pointwise.shape[0], *x.shape[2:]):
        raise ValueError(f"pdenet::lean_conv_backward: the output gradient must have the output's shape "
                         f"{(x.shape[0], pointwise.shape[0], *x.shape[2:])}, got {tuple(grad.shape)}")


def _weight_grad(grad: Tensor, x: Tensor, weight: Tensor, padding: int, groups: int) -> Tensor:
    """``∂<grad, conv2d(x, W, padding)>/∂W``."""
    return torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [padding, padding], [1, 1], False,
                                               [0, 0], groups, [False, True, False])[1]


@torch.library.custom_op(f"{NAMESPACE}::lean_conv_backward", mutates_args=())
def lean_conv_backward_op(grad: Tensor, x: Tensor, pointwise: Tensor, stencil: Tensor, taps: Tensor,
                          kernel_size: int, circular: bool, groups: int,
                          input_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    _check_lean_backward(grad, x, pointwise, stencil, taps, kernel_size, groups)
    if lean_kernel_applies(x, pointwise, stencil, groups) and grad.dtype == torch.float32:
        x, pointwise, stencil, taps = _lean_contiguous(x, pointwise, stencil, taps)
        gx, gp, gs = binding.lean_backward(binding.channels_last(grad), x, pointwise, stencil, taps, kernel_size,
                                           circular, groups, input_grad)
        return (gx if input_grad else x.new_empty(0)), gp, gs
    with torch.autocast(x.device.type, enabled=False):
        grad = grad.to(x.dtype)
        gx = (lean_conv_reference(grad, adjoint_coupling(pointwise, groups), stencil,
                                  flipped_taps(taps, kernel_size), kernel_size, circular, groups)
              if input_grad else x.new_empty(0))
        m, r = stencil.shape[0], kernel_size // 2
        gp = _weight_grad(grad, x, pointwise.to(x.dtype)[:, :, None, None], 0, groups)
        head, padding = _padded(x[:, :m], r, circular)
        kernel = stencil_as_kernel(stencil.to(x.dtype), taps, kernel_size)
        gs = _weight_grad(grad[:, :m], head, kernel, padding, m).view(m, -1).index_select(1, taps)
        return gx, gp.view(pointwise.shape).to(pointwise.dtype), gs.to(stencil.dtype)


@lean_conv_backward_op.register_fake
def _(grad, x, pointwise, stencil, taps, kernel_size, circular, groups, input_grad):
    _check_lean_backward(grad, x, pointwise, stencil, taps, kernel_size, groups)
    if not input_grad:
        gx = x.new_empty(0)
    elif lean_kernel_applies(x, pointwise, stencil, groups) and grad.dtype == torch.float32:
        gx = torch.empty_like(x, memory_format=torch.channels_last)
    else:
        gx = lean_conv_reference(grad.to(x.dtype), adjoint_coupling(pointwise, groups), stencil,
                                 flipped_taps(taps, kernel_size), kernel_size, circular, groups)
    return gx, pointwise.new_empty(pointwise.shape), stencil.new_empty(stencil.shape)


@register_flop_formula(torch.ops.pdenet.lean_conv_backward)
def _(grad_shape, x_shape, pointwise_shape, stencil_shape, taps_shape, kernel_size, circular, groups, input_grad,
      *args, out_shape=None, **kwargs) -> int:
    return (1 + int(input_grad)) * _lean_flops(x_shape, pointwise_shape, stencil_shape, kernel_size)


def _lean_conv_setup(ctx, inputs, output) -> None:
    x, pointwise, stencil, taps, kernel_size, circular, groups = inputs
    ctx.save_for_backward(x, pointwise, stencil, taps)
    ctx.save_for_forward(x, pointwise, stencil, taps)
    ctx.kernel_size, ctx.circular, ctx.groups = kernel_size, circular, groups


def _lean_conv_grad(ctx, grad):
    x, pointwise, stencil, taps = ctx.saved_tensors
    gx, gp, gs = lean_conv_backward(grad, x, pointwise, stencil, taps, ctx.kernel_size, ctx.circular, ctx.groups,
                                    ctx.needs_input_grad[0])
    return (gx if ctx.needs_input_grad[0] else None), gp, gs, None, None, None, None


lean_conv_op.register_autograd(_lean_conv_grad, setup_context=_lean_conv_setup)


def _lean_conv_backward_setup(ctx, inputs, output) -> None:
    grad, x, pointwise, stencil, taps, kernel_size, circular, groups, input_grad = inputs
    ctx.save_for_backward(grad, x, pointwise, stencil, taps)
    ctx.kernel_size, ctx.circular, ctx.groups, ctx.input_grad = kernel_size, circular, groups, input_grad


def _lean_conv_backward_grad(ctx, grad_gx, grad_gp, grad_gs):
    """The derivative of ``(∂x, ∂P, ∂s)``, bilinear in ``(g, x)`` and linear in ``g`` for fixed weights:
    ``∂g = K G_x + K'(x)``, ``∂x = K'^T g`` with ``K'`` the lean operator of the weights ``(G_P, G_s)``, and the
    weights' part the coupling and stencil gradients of ``(g, G_x)``."""
    grad, x, pointwise, stencil, taps = ctx.saved_tensors
    k, circular, groups = ctx.kernel_size, ctx.circular, ctx.groups
    use_gx = ctx.input_grad and grad_gx is not None and grad_gx.numel() > 0
    gp_in = torch.zeros_like(pointwise) if grad_gp is None else grad_gp
    gs_in = torch.zeros_like(stencil) if grad_gs is None else grad_gs
    d_grad = d_x = d_p = d_s = None
    if ctx.needs_input_grad[0]:
        d_grad = lean_conv(x, gp_in, gs_in, taps, k, circular, groups)
        if use_gx:
            d_grad = d_grad + lean_conv(grad_gx, pointwise, stencil, taps, k, circular, groups)
    if ctx.needs_input_grad[1]:
        d_x = lean_conv(grad, adjoint_coupling(gp_in, groups), gs_in, flipped_taps(taps, k), k, circular, groups)
    if use_gx and (ctx.needs_input_grad[2] or ctx.needs_input_grad[3]):
        _, d_p, d_s = lean_conv_backward(grad, grad_gx, pointwise, stencil, taps, k, circular, groups, False)
    return d_grad, d_x, d_p, d_s, None, None, None, None, None


lean_conv_backward_op.register_autograd(_lean_conv_backward_grad, setup_context=_lean_conv_backward_setup)


def _item(t, dim, i):
    return t if dim is None else t.select(dim, i)


@lean_conv_op.register_vmap
def _(info, in_dims, x, pointwise, stencil, taps, kernel_size, circular, groups):
    """A mapped input alone joins the batch axis (one call); mapped weights are applied one slice at a time."""
    x_dim, p_dim, s_dim = in_dims[:3]
    rest = (taps, kernel_size, circular, groups)
    if p_dim is None and s_dim is None:
        x = x.movedim(x_dim, 0)
        return torch.ops.pdenet.lean_conv(x.flatten(0, 1), pointwise, stencil, *rest).unflatten(0, x.shape[:2]), 0
    return torch.stack([torch.ops.pdenet.lean_conv(_item(x, x_dim, i), _item(pointwise, p_dim, i),
                                                   _item(stencil, s_dim, i), *rest)
                        for i in range(info.batch_size)]), 0


@lean_conv_backward_op.register_vmap
def _(info, in_dims, grad, x, pointwise, stencil, taps, kernel_size, circular, groups, input_grad):
    """One call per mapped slice: each has weight gradients of its own."""
    slices = [torch.ops.pdenet.lean_conv_backward(*(_item(t, d, i) for t, d in zip((grad, x, pointwise, stencil),
                                                                                    in_dims)),
                                                  taps, kernel_size, circular, groups, input_grad)
              for i in range(info.batch_size)]
    return tuple(torch.stack(parts) for parts in zip(*slices)), (0, 0, 0)


@_signed
class _LeanConv(torch.autograd.Function):
    """``lean_conv`` in eager mode: the registered operator and its backward, plus a forward-mode derivative
    (``P`` and ``S`` enter bilinearly: ``ẏ = K ẋ + K̇ x``)."""

    @staticmethod
    def forward(x, pointwise, stencil, taps, kernel_size, circular, groups):
        return torch.ops.pdenet.lean_conv(x, pointwise, stencil, taps, kernel_size, circular, groups)

    setup_context = staticmethod(_lean_conv_setup)
    backward = staticmethod(_lean_conv_grad)

    @staticmethod
    def jvp(ctx, tx, tp, ts, *_):
        x, pointwise, stencil, taps = ctx.saved_tensors
        rest = (taps, ctx.kernel_size, ctx.circular, ctx.groups)
        out = 0
        if tx is not None:
            out = out + torch.ops.pdenet.lean_conv(tx, pointwise, stencil, *rest)
        if tp is not None or ts is not None:
            tp = torch.zeros_like(pointwise) if tp is None else tp
            ts = torch.zeros_like(stencil) if ts is None else ts
            out = out + torch.ops.pdenet.lean_conv(x, tp, ts, *rest)
        return out

    generate_vmap_rule = True  # the registered operator's rule


@_signed
class _LeanConvBackward(torch.autograd.Function):
    """``lean_conv_backward`` in eager mode: the registered operator with its derivative, for ``torch.func``."""

    @staticmethod
    def forward(grad, x, pointwise, stencil, taps, kernel_size, circular, groups, input_grad):
        return torch.ops.pdenet.lean_conv_backward(grad, x, pointwise, stencil, taps, kernel_size, circular, groups,
                                                   input_grad)

    setup_context = staticmethod(_lean_conv_backward_setup)
    backward = staticmethod(_lean_conv_backward_grad)
    generate_vmap_rule = True


def _eager(op, setup_context, backward) -> type:
    """An ``autograd.Function`` that applies the registered operator ``op`` with ``op``'s own autograd formula: what
    eager mode runs. Inside its ``forward`` autograd is off, so the operator skips its autograd layer, whose
    per-call cost (filling in the schema's arguments) is a large share of a small layer's time."""
    return _signed(type(f"_Eager_{op.__name__}", (torch.autograd.Function,), {
        "forward": staticmethod(lambda *args: op(*args)), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward)}))


def lean_conv(x: Tensor, pointwise: Tensor, stencil: Tensor, taps: Tensor, kernel_size: int, circular: bool,
              groups: int) -> Tensor:
    """``P x + S x`` (see the module notes), differentiable in every mode PyTorch offers. The registered operator is
    called directly where nothing is to be differentiated (inference; ``vmap``, through its rule), while compiling
    and while ``torch.jit.trace`` records (its autograd formula then serves); otherwise through ``_LeanConv``."""
    args = (x, pointwise, stencil, taps, kernel_size, circular, groups)
    if not _differentiated(x, pointwise, stencil):
        return torch.ops.pdenet.lean_conv(*args)
    return _apply(torch.ops.pdenet.lean_conv, _LeanConv, args)


def _apply(op, function_class: type, args: tuple):
    """``op(*args)`` with autograd: the registered operator itself while ``torch.compile``/``torch.export`` or
    ``torch.jit.trace`` record (its registered formula serves), else ``function_class`` (eager mode)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return op(*args)
    return function_class.apply(*args)


def _differentiated(*tensors: Tensor) -> bool:
    """Whether reverse-mode autograd records an operation on ``tensors`` (``torch.func.grad`` included), or one of
    them carries a forward-mode tangent (``torch.func.jvp``, ``jacfwd``, ``forward_ad``); never in inference
    mode."""
    if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return True
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def lean_conv_backward(grad: Tensor, x: Tensor, pointwise: Tensor, stencil: Tensor, taps: Tensor, kernel_size: int,
                       circular: bool, groups: int, input_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(∂x, ∂P, ∂s)`` of ``lean_conv`` for the output gradient ``grad`` (``∂x`` empty unless ``input_grad``),
    itself differentiable."""
    args = (grad, x, pointwise, stencil, taps, kernel_size, circular, groups, input_grad)
    return _apply(torch.ops.pdenet.lean_conv_backward, _LeanConvBackward, args)


# ---------------------------------------------------------------------------------------------- lean_conv_affine
def lean_conv_affine_reference(x: Tensor, pointwise: Tensor, stencil: Tensor, taps: Tensor, kernel_size: int,
                               circular: bool, groups: int, bias: Tensor, residual: Tensor | None,
                               relu: bool) -> Tensor:
    """``act(P x + S x + b [+ r])`` by PyTorch's operations (differentiable): the plain composition
    ``lean_conv_affine`` replaces."""
    y = lean_conv_reference(x, pointwise, stencil, taps, kernel_size, circular, groups)
    return _bias_residual_relu(y, bias.to(x.dtype), residual, relu)


def _bias_residual_relu(y: Tensor, bias: Tensor, residual: Tensor | None, relu: bool) -> Tensor:
    """``act(y + b [+ r])``, ``act`` the ReLU where ``relu``: the epilogue of the affine lean layer."""
    y = y + bias[:, None, None]
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


def _check_affine(x_shape, pointwise: Tensor, bias: Tensor, residual_shape, name: str = "lean_conv_affine") -> None:
    """A named error where the bias is not ``(c_out,)`` or the residual's shape (``None``: no residual) is not the
    output's."""
    c_out, out_shape = pointwise.shape[0], (x_shape[0], pointwise.shape[0], *x_shape[2:])
    if bias.shape != (c_out,) or (residual_shape is not None and tuple(residual_shape) != out_shape):
        raise ValueError(f"pdenet::{name}: the bias must have shape ({c_out},) and the residual the output's shape "
                         f"{out_shape}, got {tuple(bias.shape)} and "
                         f"{None if residual_shape is None else tuple(residual_shape)}")


def _affine_kernel_applies(x, pointwise, stencil, groups, bias, residual) -> bool:
    return (lean_kernel_applies(x, pointwise, stencil, groups) and bias.dtype is torch.float32
            and (residual is None or (residual.dtype is torch.float32 and residual.is_cpu)))


@torch.library.custom_op(f"{NAMESPACE}::lean_conv_affine", mutates_args=())
def lean_conv_affine_op(x: Tensor, pointwise: Tensor, stencil: Tensor, taps: Tensor, kernel_size: int,
                        circular: bool, groups: int, bias: Tensor, residual: Tensor | None, relu: bool) -> Tensor:
    _check_lean(x.shape, pointwise, stencil, taps, kernel_size, groups, "lean_conv_affine")
    _check_affine(x.shape, pointwise, bias, None if residual is None else residual.shape)
    if _affine_kernel_applies(x, pointwise, stencil, groups, bias, residual):
        return binding.lean_forward(*_lean_contiguous(x, pointwise, stencil, taps), kernel_size, circular, groups,
                                    bias=bias.contiguous(),
                                    residual=None if residual is None else binding.channels_last(residual),
                                    relu=relu)
    with torch.autocast(x.device.type, enabled=False):
        return lean_conv_affine_reference(x, pointwise, stencil, taps, kernel_size, circular, groups, bias, residual,
                                          relu)


@lean_conv_affine_op.register_fake
def _(x, pointwise, stencil, taps, kernel_size, circular, groups, bias, residual, relu):
    _check_lean(x.shape, pointwise, stencil, taps, kernel_size, groups, "lean_conv_affine")
    _check_affine(x.shape, pointwise, bias, None if residual is None else residual.shape)
    if _affine_kernel_applies(x, pointwise, stencil, groups, bias, residual):
        return _lean_output(x, pointwise.shape[0])
    return lean_conv_affine_reference(x, pointwise, stencil, taps, kernel_size, circular, groups, bias, residual,
                                      relu)


@register_flop_formula(torch.ops.pdenet.lean_conv_affine)
def _(x_shape, pointwise_shape, stencil_shape, taps_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    return _lean_flops(x_shape, pointwise_shape, stencil_shape, kernel_size)


def lean_conv_affine(x: Tensor, pointwise: Tensor, stencil: Tensor, taps: Tensor, kernel_size: int, circular: bool,
                     groups: int, bias: Tensor, residual: Tensor | None = None, relu: bool = False) -> Tensor:
    """``act(P x + S x + b [+ r])`` (``act`` the ReLU where ``relu``): the inference layer of a lean operator with
    a batch norm folded into it, one pass of the compiled kernel that applies bias, residual and ReLU as it stores
    ``y``. Where something is differentiated it is the plain composition of ``lean_conv`` and PyTorch's
    operations (the registered operator has no autograd formula: it serves inference)."""
    if _differentiated(x, pointwise, stencil, bias, *(() if residual is None else (residual,))):
        _check_affine(x.shape, pointwise, bias, None if residual is None else residual.shape)
        y = lean_conv(x, pointwise, stencil, taps, kernel_size, circular, groups)
        return _bias_residual_relu(y, bias, residual, relu)
    return torch.ops.pdenet.lean_conv_affine(x, pointwise, stencil, taps, kernel_size, circular, groups, bias,
                                             residual, relu)


def _block_kernel_applies(x, residual, groups, pointwise1, stencil1, bias1, pointwise2, stencil2, bias2) -> bool:
    """Whether both layers of ``residual_block_inference`` run on the compiled kernel (the second's input, the
    first's output, is like ``x`` in device and dtype)."""
    return (_affine_kernel_applies(x, pointwise1, stencil1, groups, bias1, None)
            and _affine_kernel_applies(x, pointwise2, stencil2, groups, bias2, residual))


@torch.library.custom_op(f"{NAMESPACE}::residual_block_inference", mutates_args=())
def residual_block_inference_op(x: Tensor, residual: Tensor, taps: Tensor, kernel_size: int, circular: bool,
                                groups: int, pointwise1: Tensor, stencil1: Tensor, bias1: Tensor, pointwise2: Tensor,
                                stencil2: Tensor, bias2: Tensor) -> Tensor:
    """``ReLU(K₂ ReLU(K₁ x + b₁) + b₂ + r)``: a residual block with its batch norms folded, two lean kernel calls
    (each applying its bias, the residual and the ReLU as it stores) in one operator call."""
    _check_block_inference(x.shape, residual.shape, taps, kernel_size, groups, pointwise1, stencil1, bias1,
                           pointwise2, stencil2, bias2)
    if _block_kernel_applies(x, residual, groups, pointwise1, stencil1, bias1, pointwise2, stencil2, bias2):
        x, taps = binding.channels_last(x), taps.contiguous()
        h = binding.lean_forward(x, pointwise1.contiguous(), stencil1.contiguous(), taps, kernel_size, circular,
                                 groups, bias=bias1.contiguous(), relu=True)
        return binding.lean_forward(h, pointwise2.contiguous(), stencil2.contiguous(), taps, kernel_size, circular,
                                    groups, bias=bias2.contiguous(), residual=binding.channels_last(residual),
                                    relu=True)
    with torch.autocast(x.device.type, enabled=False):
        return residual_block_inference_reference(x, residual, taps, kernel_size, circular, groups, pointwise1,
                                                   stencil1, bias1, pointwise2, stencil2, bias2)


def _check_block_inference(x_shape, residual_shape, taps, kernel_size, groups, pointwise1, stencil1, bias1,
                           pointwise2, stencil2, bias2) -> None:
    """``_check_lean`` and ``_check_affine`` for both layers: ``x -> h`` and ``h -> y`` with the residual."""
    h_shape = (x_shape[0], pointwise1.shape[0], *x_shape[2:])
    for shape, pointwise, stencil, bias, addend in ((x_shape, pointwise1, stencil1, bias1, None),
                                                    (h_shape, pointwise2, stencil2, bias2, residual_shape)):
        _check_lean(shape, pointwise, stencil, taps, kernel_size, groups, "residual_block_inference")
        _check_affine(shape, pointwise, bias, addend, "residual_block_inference")


def residual_block_inference_reference(x, residual, taps, kernel_size, circular, groups, pointwise1, stencil1, bias1,
                                       pointwise2, stencil2, bias2):
    """``ReLU(K₂ ReLU(K₁ x + b₁) + b₂ + r)`` by PyTorch's operations: the composition the operator replaces."""
    h = lean_conv_affine_reference(x, pointwise1, stencil1, taps, kernel_size, circular, groups, bias1, None, True)
    return lean_conv_affine_reference(h, pointwise2, stencil2, taps, kernel_size, circular, groups, bias2, residual,
                                      True)


@residual_block_inference_op.register_fake
def _(x, residual, taps, kernel_size, circular, groups, pointwise1, stencil1, bias1, pointwise2, stencil2, bias2):
    _check_block_inference(x.shape, residual.shape, taps, kernel_size, groups, pointwise1, stencil1, bias1,
                           pointwise2, stencil2, bias2)
    if _block_kernel_applies(x, residual, groups, pointwise1, stencil1, bias1, pointwise2, stencil2, bias2):
        return _lean_output(x, pointwise2.shape[0])
    return residual_block_inference_reference(x, residual, taps, kernel_size, circular, groups, pointwise1,
                                               stencil1, bias1, pointwise2, stencil2, bias2)


@register_flop_formula(torch.ops.pdenet.residual_block_inference)
def _(x_shape, residual_shape, taps_shape, kernel_size, circular, groups, pointwise1_shape, stencil1_shape,
      bias1_shape, pointwise2_shape, stencil2_shape, *args, out_shape=None, **kwargs) -> int:
    h_shape = (x_shape[0], pointwise1_shape[0], *x_shape[2:])
    return (_lean_flops(x_shape, pointwise1_shape, stencil1_shape, kernel_size)
            + _lean_flops(h_shape, pointwise2_shape, stencil2_shape, kernel_size))


def residual_block_inference(x: Tensor, residual: Tensor, taps: Tensor, kernel_size: int, circular: bool,
                             groups: int, layer1: tuple, layer2: tuple) -> Tensor:
    """``ReLU(K₂ ReLU(K₁ x + b₁) + b₂ + r)`` for ``layer = (pointwise, stencil, bias)`` (lean operators with their
    batch norms folded): one operator call in inference, the composition of ``lean_conv_affine`` where something
    is differentiated."""
    if _differentiated(x, residual, *layer1, *layer2):
        h = lean_conv_affine(x, *layer1[:2], taps, kernel_size, circular, groups, layer1[2], None, True)
        return lean_conv_affine(h, *layer2[:2], taps, kernel_size, circular, groups, layer2[2], residual, True)
    return torch.ops.pdenet.residual_block_inference(x, residual, taps, kernel_size, circular, groups, *layer1,
                                                     *layer2)


def chain_weight_shapes(in_channels: int, widths: list[int], groups: int, ntaps: int) -> list[tuple]:
    """The shapes of a chain's weights, six per block ``c -> c'`` in order: ``P₁ (c', c/g)``, ``s₁ (min(c, c'),
    ntaps)``, ``b₁ (c',)``, ``P₂ (c', c'/g)``, ``s₂ (c', ntaps)``, ``b₂ (c',)``; packed one after another."""
    shapes, c = [], in_channels
    for co in widths:
        shapes += [(co, c // groups), (min(c, co), ntaps), (co,), (co, co // groups), (co, ntaps), (co,)]
        c = co
    return shapes


def unpack_chain(packed: Tensor, in_channels: int, widths: list[int], groups: int, ntaps: int) -> list[Tensor]:
    """The chain's weights as views of the packed vector (see ``chain_weight_shapes``)."""
    shapes = chain_weight_shapes(in_channels, widths, groups, ntaps)
    sizes = [math.prod(shape) for shape in shapes]
    return [part.view(shape) for part, shape in zip(packed.split(sizes), shapes)]


def _check_chain(x: Tensor, taps: Tensor, kernel_size: int, groups: int, strides: list[int], widths: list[int],
                 packed: Tensor) -> tuple[int, int, int, int]:
    """Named errors where the chain cannot run on ``x``; the output's shape."""
    problem = ""
    if x.dim() != 4 or not strides or len(strides) != len(widths) or packed.dim() != 1:
        problem = (f"x must be 4-D, strides and widths one per block and the weights one packed vector; got x of "
                   f"shape {tuple(x.shape)}, {len(strides)} strides, {len(widths)} widths, weights of shape "
                   f"{tuple(packed.shape)}")
    elif groups < 1 or kernel_size < 1 or kernel_size % 2 == 0 or kernel_size > 9 or taps.dtype is not torch.int64:
        problem = f"groups={groups}, kernel_size={kernel_size} and {taps.dtype} taps do not make lean operators"
    elif any(s not in (1, 2) for s in strides) or any(
            co < c or co % groups for c, co in zip([x.shape[1], *widths], widths)) or x.shape[1] % groups:
        problem = (f"each block needs stride 1 or 2 and at least its input's channels, divisible by groups={groups}; "
                   f"got strides {list(strides)} and widths {x.shape[1]} -> {list(widths)}")
    else:
        expected = sum(math.prod(shape) for shape in chain_weight_shapes(x.shape[1], widths, groups, taps.shape[0]))
        if packed.numel() != expected:
            problem = f"the packed weights must hold {expected} numbers for these blocks, got {packed.numel()}"
    if problem:
        raise ValueError(f"pdenet::residual_chain_inference: {problem}")
    return (x.shape[0], widths[-1], *_block_grids(x.shape[2:], strides)[-1])


def _block_grids(grid, strides: list[int]) -> list[tuple[int, int]]:
    """Each block's grid: the previous one, halved (rounding up) where the block's stride is 2."""
    n1, n2 = grid
    grids = []
    for stride in strides:
        if stride == 2:
            n1, n2 = (n1 + 1) // 2, (n2 + 1) // 2
        grids.append((n1, n2))
    return grids


def _blockwise(x: Tensor, taps: Tensor, kernel_size: int, circular: bool, groups: int, strides: list[int],
               widths: list[int], packed: Tensor, block) -> Tensor:
    """The chain one block at a time: ``D`` where the stride is 2, then ``block(x, Q x, taps, kernel_size,
    circular, groups, P₁, s₁, b₁, P₂, s₂, b₂)`` with ``Q x`` the zero-channel shortcut, on views of ``packed``."""
    weights = unpack_chain(packed, x.shape[1], widths, groups, taps.shape[0])
    for i, (stride, width) in enumerate(zip(strides, widths)):
        if stride == 2:
            x = F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
        shortcut = F.pad(x, (0, 0, 0, 0, 0, width - x.shape[1]))
        x = block(x, shortcut, taps, kernel_size, circular, groups, *weights[6 * i: 6 * i + 6])
    return x


def _chain_kernel_applies(x: Tensor, groups: int, widths: list[int], packed: Tensor) -> bool:
    """Whether the compiled chain runs: float32 CPU tensors, the kernels loaded, whole register blocks per group."""
    f32 = torch.float32
    if not (x.dtype is f32 and packed.dtype is f32 and x.is_cpu and packed.is_cpu and x.numel() > 0
            and binding.available()):
        return False
    block = binding.block_channels()
    return groups == 1 or all(c // groups % block == 0 for c in (x.shape[1], *widths))


def residual_chain_inference_reference(x: Tensor, taps: Tensor, kernel_size: int, circular: bool, groups: int,
                                       strides: list[int], widths: list[int], packed: Tensor) -> Tensor:
    """The chain by PyTorch's operations: per block ``D`` where the stride is 2, then
    ``residual_block_inference_reference`` with the shortcut ``x`` with zero channels appended."""
    return _blockwise(x, taps, kernel_size, circular, groups, strides, widths, packed,
                      residual_block_inference_reference)


@torch.library.custom_op(f"{NAMESPACE}::residual_chain_inference", mutates_args=())
def residual_chain_inference_op(x: Tensor, taps: Tensor, kernel_size: int, circular: bool, groups: int,
                                strides: list[int], widths: list[int], packed: Tensor) -> Tensor:
    """A chain of residual blocks with their batch norms folded, ``x ← ReLU(K₂ ReLU(K₁ D x + b₁) + b₂ + Q D x)``
    per block (``D`` 2x2 average pooling where its stride is 2, ``Q`` zero channels appended up to the block's
    width), the weights packed in one vector (``chain_weight_shapes``): one call of the compiled kernels for the
    whole chain."""
    out_shape = _check_chain(x, taps, kernel_size, groups, strides, widths, packed)
    if _chain_kernel_applies(x, groups, widths, packed):
        shapes = chain_weight_shapes(x.shape[1], widths, groups, taps.shape[0])
        return binding.lean_chain_forward(binding.channels_last(x), taps.contiguous(), kernel_size, circular, groups,
                                          strides, shapes, packed.contiguous(), out_shape)
    with torch.autocast(x.device.type, enabled=False):
        return residual_chain_inference_reference(x, taps, kernel_size, circular, groups, strides, widths, packed)


@residual_chain_inference_op.register_fake
def _(x, taps, kernel_size, circular, groups, strides, widths, packed):
    shape = _check_chain(x, taps, kernel_size, groups, strides, widths, packed)
    if _chain_kernel_applies(x, groups, widths, packed):
        return x.new_empty(shape).contiguous(memory_format=torch.channels_last)
    return residual_chain_inference_reference(x, taps, kernel_size, circular, groups, strides, widths, packed)


@register_flop_formula(torch.ops.pdenet.residual_chain_inference)
def _(x_shape, taps_shape, kernel_size, circular, groups, strides, widths, packed_shape, *args, out_shape=None,
      **kwargs) -> int:
    shapes = chain_weight_shapes(x_shape[1], widths, groups, taps_shape[0])
    total = 0
    for i, grid in enumerate(_block_grids(x_shape[2:], strides)):
        p1, s1, _, p2, s2, _ = shapes[6 * i: 6 * i + 6]
        total += _lean_flops((x_shape[0], 0, *grid), p1, s1, kernel_size) + _lean_flops(
            (x_shape[0], 0, *grid), p2, s2, kernel_size)
    return total


def residual_chain_inference(x: Tensor, taps: Tensor, kernel_size: int, circular: bool, groups: int,
                             strides: list[int], widths: list[int], packed: Tensor) -> Tensor:
    """The chain of folded residual blocks (see ``residual_chain_inference_op``): one operator call in inference,
    block by block through ``residual_block_inference`` on views of ``packed`` where something is
    differentiated."""
    if not _differentiated(x, packed):
        return torch.ops.pdenet.residual_chain_inference(x, taps, kernel_size, circular, groups, strides, widths,
                                                         packed)
    _check_chain(x, taps, kernel_size, groups, strides, widths, packed)

    def block(x, shortcut, taps, kernel_size, circular, groups, *weights):
        return residual_block_inference(x, shortcut, taps, kernel_size, circular, groups, weights[:3], weights[3:])

    return _blockwise(x, taps, kernel_size, circular, groups, strides, widths, packed, block)


# ---------------------------------------------------------------------------------------------- batch_norm_relu
def _plain_batch_norm_relu(z, residual, weight, bias, eps):
    """``max(0, BN(z) [+ r])`` with the batch's statistics by PyTorch's operations (differentiable)."""
    out = F.batch_norm(z, None, None, weight, bias, True, 0.0, eps)
    return F.relu(out if residual is None else out + residual)


@torch.library.custom_op(f"{NAMESPACE}::batch_norm_relu", mutates_args=())
def batch_norm_relu_op(z: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor, running_mean: Tensor,
                       running_var: Tensor, momentum: float,
                       eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Outputs ``(y, μ, 1/σ, running mean, running variance)``, the last two updated (new tensors)."""
    _require_fused(z, "batch_norm_relu")
    _check_batch_norm(z, residual, (weight, bias, running_mean, running_var), "batch_norm_relu")
    residual = None if residual is None else binding.channels_last(residual)
    running_mean, running_var = _updatable(running_mean), _updatable(running_var)
    y, mean, invstd, _ = binding.bn_relu_forward(binding.channels_last(z), residual, weight.contiguous(),
                                                 bias.contiguous(), running_mean, running_var, momentum, eps)
    return y, mean, invstd, running_mean, running_var


@batch_norm_relu_op.register_fake
def _(z, residual, weight, bias, running_mean, running_var, momentum, eps):
    c = z.shape[1]
    return (torch.empty_like(z, memory_format=torch.channels_last), z.new_empty(c), z.new_empty(c),
            running_mean.new_empty(running_mean.shape), running_var.new_empty(running_var.shape))


@torch.library.custom_op(f"{NAMESPACE}::batch_norm_relu_backward", mutates_args=())
def batch_norm_relu_backward_op(grad: Tensor, z: Tensor, y: Tensor | None, weight: Tensor, bias: Tensor,
                                mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _require_fused(z, "batch_norm_relu_backward")
    _check_batch_norm(z, y if y is None else grad, (weight, bias, mean, invstd), "batch_norm_relu_backward")
    y = None if y is None else binding.channels_last(y)
    dz, dr, dw, db = binding.bn_relu_backward(binding.channels_last(grad), binding.channels_last(z), y,
                                              weight.contiguous(), bias.contiguous(), mean.contiguous(),
                                              invstd.contiguous())
    return dz, (z.new_empty(0) if dr is None else dr), dw, db


@batch_norm_relu_backward_op.register_fake
def _(grad, z, y, weight, bias, mean, invstd):
    dr = z.new_empty(0) if y is None else torch.empty_like(z, memory_format=torch.channels_last)
    return (torch.empty_like(z, memory_format=torch.channels_last), dr, weight.new_empty(weight.shape),
            bias.new_empty(bias.shape))


def _batch_norm_relu_setup(ctx, inputs, output) -> None:
    z, residual, weight, bias, _, _, _, eps = inputs
    y, mean, invstd, _, _ = output
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.has_residual, ctx.eps = residual is not None, eps
    ctx.save_for_backward(z, weight, bias, mean, invstd, y if residual is not None else None)


def _batch_norm_relu_grad(ctx, grad, *_):
    z, weight, bias, mean, invstd, y = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: PyTorch's differentiable batch norm on the batch statistics
        with torch.enable_grad():
            t = F.batch_norm(z, None, None, weight, bias, True, 0.0, ctx.eps)
        masked = grad * ((t if y is None else y) > 0)
        dz, dw, db = torch.autograd.grad(t, (z, weight, bias), masked, create_graph=True)
        return dz, (masked if ctx.has_residual else None), dw, db, None, None, None, None
    dz, dr, dw, db = torch.ops.pdenet.batch_norm_relu_backward(grad, z, y, weight, bias, mean, invstd)
    return dz, (dr if ctx.has_residual else None), dw, db, None, None, None, None


batch_norm_relu_op.register_autograd(_batch_norm_relu_grad, setup_context=_batch_norm_relu_setup)
_BatchNormReLU = _eager(torch.ops.pdenet.batch_norm_relu, _batch_norm_relu_setup, _batch_norm_relu_grad)


def batch_norm_relu(z: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor, running_mean: Tensor,
                    running_var: Tensor, momentum: float, eps: float) -> Tensor:
    """``max(0, BN(z) [+ residual])`` in training mode on the compiled kernels (see the module notes), the
    running statistics updated."""
    args = (z, residual, weight, bias, running_mean, running_var, momentum, eps)
    y, _, _, new_mean, new_var = _apply(torch.ops.pdenet.batch_norm_relu, _BatchNormReLU, args)
    with torch.no_grad():
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
    return y


# ---------------------------------------------------------------------------------------------- residual_block
@torch.library.custom_op(f"{NAMESPACE}::residual_block", mutates_args=())
def residual_block_op(x: Tensor, shortcut: Tensor | None, channels: int, taps: Tensor, kernel_size: int,
                      groups: int, pointwise1: Tensor, stencil1: Tensor, weight1: Tensor, bias1: Tensor,
                      running_mean1: Tensor, running_var1: Tensor, momentum1: float, eps1: float,
                      pointwise2: Tensor, stencil2: Tensor, weight2: Tensor, bias2: Tensor, running_mean2: Tensor,
                      running_var2: Tensor, momentum2: float,
                      eps2: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                            Tensor, Tensor, Tensor, Tensor]:
    """Outputs ``(y, z₁, h₁, μ₁, 1/σ₁, z₂, mask₂, μ₂, 1/σ₂)``: the block's output, each layer's operator output
    ``z``, the first layer's output ``h₁``, the batch statistics, and (shortcut ``Q x``) the second layer's ReLU
    mask in the kernels' mask format (empty with a given shortcut, whose mask comes from ``y``); then the two
    layers' running means and variances, updated (new tensors)."""
    _require_fused(x, "residual_block")
    _check_lean(x.shape, pointwise1, stencil1, taps, kernel_size, groups, "residual_block")
    c = pointwise1.shape[0]
    if pointwise2.shape != (channels, c // groups) or stencil2.shape != (min(c, channels), taps.shape[0]):
        raise ValueError(f"pdenet::residual_block: the second layer's pointwise {tuple(pointwise2.shape)} and stencil "
                         f"{tuple(stencil2.shape)} do not map {c} to channels={channels} channels")
    if channels < x.shape[1] or (shortcut is not None and shortcut.shape != (x.shape[0], channels, *x.shape[2:])):
        raise ValueError(f"pdenet::residual_block: channels={channels} must be at least x's {x.shape[1]} and a "
                         f"shortcut of shape {(x.shape[0], channels, *x.shape[2:])}, got "
                         f"{None if shortcut is None else tuple(shortcut.shape)}")
    for layer, vectors, width in ((1, (weight1, bias1, running_mean1, running_var1), c),
                                  (2, (weight2, bias2, running_mean2, running_var2), channels)):
        if any(v.shape != (width,) for v in vectors):
            raise ValueError(f"pdenet::residual_block: layer {layer}'s batch-norm vectors must have shape ({width},), "
                             f"got {[tuple(v.shape) for v in vectors]}")
    running_mean1, running_var1 = _updatable(running_mean1), _updatable(running_var1)
    running_mean2, running_var2 = _updatable(running_mean2), _updatable(running_var2)
    weight1, bias1, weight2, bias2 = (v.contiguous() for v in (weight1, bias1, weight2, bias2))
    x, taps = binding.channels_last(x), taps.contiguous()
    # each layer's moments about its running mean, which batch norm's kernel reads before it updates it
    z1, sums1 = binding.lean_forward(x, pointwise1.contiguous(), stencil1.contiguous(), taps, kernel_size, False,
                                     groups, moments_about=running_mean1)
    h1, mean1, invstd1, _ = binding.bn_relu_forward(z1, None, weight1, bias1, running_mean1, running_var1, momentum1,
                                                    eps1, moments=(running_mean1, sums1))
    z2, sums2 = binding.lean_forward(h1, pointwise2.contiguous(), stencil2.contiguous(), taps, kernel_size, False,
                                     groups, moments_about=running_mean2)
    residual = shortcut if shortcut is not None else x if channels == x.shape[1] else F.pad(
        x, (0, 0, 0, 0, 0, channels - x.shape[1]))
    y, mean2, invstd2, mask2 = binding.bn_relu_forward(z2, binding.channels_last(residual), weight2, bias2,
                                                       running_mean2, running_var2, momentum2, eps2,
                                                       moments=(running_mean2, sums2), mask=shortcut is None)
    mask2 = x.new_empty(0, dtype=torch.int8) if mask2 is None else mask2
    return (y, z1, h1, mean1, invstd1, z2, mask2, mean2, invstd2, running_mean1, running_var1, running_mean2,
            running_var2)


@residual_block_op.register_fake
def _(x, shortcut, channels, taps, kernel_size, groups, pointwise1, stencil1, weight1, bias1, running_mean1,
      running_var1, momentum1, eps1, pointwise2, stencil2, weight2, bias2, running_mean2, running_var2, momentum2,
      eps2):
    b, _, n1, n2 = x.shape
    c1, c2 = pointwise1.shape[0], pointwise2.shape[0]

    def image(c, dtype=x.dtype):
        return x.new_empty((b, c, n1, n2), dtype=dtype).contiguous(memory_format=torch.channels_last)

    mask2 = x.new_empty(0, dtype=torch.int8) if shortcut is not None else image(c2, torch.int8)
    return (image(c2), image(c1), image(c1), x.new_empty(c1), x.new_empty(c1), image(c2), mask2, x.new_empty(c2),
            x.new_empty(c2), *(t.new_empty(t.shape) for t in (running_mean1, running_var1, running_mean2,
                                                               running_var2)))


@torch.library.custom_op(f"{NAMESPACE}::residual_block_backward", mutates_args=())
def residual_block_backward_op(grad: Tensor, x: Tensor, y: Tensor, has_shortcut: bool, input_grad: bool,
                               taps: Tensor, kernel_size: int, groups: int, pointwise1: Tensor, stencil1: Tensor,
                               weight1: Tensor, bias1: Tensor, z1: Tensor, h1: Tensor, mean1: Tensor,
                               invstd1: Tensor, pointwise2: Tensor, stencil2: Tensor, weight2: Tensor, bias2: Tensor,
                               z2: Tensor, mask2: Tensor, mean2: Tensor,
                               invstd2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                         Tensor, Tensor, Tensor]:
    """``(∂x, ∂shortcut, ∂P₁, ∂s₁, ∂γ₁, ∂β₁, ∂P₂, ∂s₂, ∂γ₂, ∂β₂)`` (``∂x`` empty unless ``input_grad``,
    ``∂shortcut`` empty without a given shortcut): the second layer's batch-norm reduction, its lean backward on
    batch norm's output gradient formed tile by tile, then the first layer's the same way, with the shortcut's
    gradient ``g ⊙ mask₂`` added to ``∂x`` by the kernel as it stores it."""
    _require_fused(x, "residual_block_backward")
    grad, x, taps = binding.channels_last(grad), binding.channels_last(x), taps.contiguous()
    p1, s1, p2, s2 = pointwise1.contiguous(), stencil1.contiguous(), pointwise2.contiguous(), stencil2.contiguous()
    weight1, bias1, mean1, invstd1, weight2, bias2, mean2, invstd2 = (
        v.contiguous() for v in (weight1, bias1, mean1, invstd1, weight2, bias2, mean2, invstd2))
    z1, h1, z2 = binding.channels_last(z1), binding.channels_last(h1), binding.channels_last(z2)
    y, mask2 = binding.channels_last(y), binding.channels_last(mask2) if mask2.dim() == 4 else mask2
    if has_shortcut:  # the mask from y; the reduction stores gm = ∂shortcut
        coef2, d_shortcut, dw2, db2 = binding.bn_relu_backward_coefficients(grad, z2, y, None, weight2, bias2,
                                                                            mean2, invstd2)
        gradient2 = (d_shortcut, (z2, coef2, binding.MASK_APPLIED, None))
    else:  # the mask from its bytes; the shortcut's gradient g ⊙ mask₂ is never formed
        coef2, _, dw2, db2 = binding.bn_relu_backward_coefficients(grad, z2, None, mask2, weight2, bias2, mean2,
                                                                   invstd2)
        d_shortcut, gradient2 = x.new_empty(0), (grad, (z2, coef2, binding.MASK_BYTES, mask2))
    dh1, gp2, gs2 = binding.lean_backward(gradient2[0], h1, p2, s2, taps, kernel_size, False, groups, True,
                                          bn_gradient=gradient2[1])
    coef1, _, dw1, db1 = binding.bn_relu_backward_coefficients(dh1, z1, None, None, weight1, bias1, mean1, invstd1)
    addend, addend_mask = (None, None) if has_shortcut or not input_grad else (grad, mask2)
    gx, gp1, gs1 = binding.lean_backward(dh1, x, p1, s1, taps, kernel_size, False, groups, input_grad,
                                         bn_gradient=(z1, coef1, binding.MASK_FROM_OUTPUT, None), addend=addend,
                                         addend_mask=addend_mask)
    return (x.new_empty(0) if gx is None else gx), d_shortcut, gp1, gs1, dw1, db1, gp2, gs2, dw2, db2


@residual_block_backward_op.register_fake
def _(grad, x, y, has_shortcut, input_grad, taps, kernel_size, groups, pointwise1, stencil1, weight1, bias1, z1, h1,
      mean1, invstd1, pointwise2, stencil2, weight2, bias2, z2, mask2, mean2, invstd2):
    gx = torch.empty_like(x, memory_format=torch.channels_last) if input_grad else x.new_empty(0)
    d_shortcut = torch.empty_like(z2, memory_format=torch.channels_last) if has_shortcut else x.new_empty(0)
    return (gx, d_shortcut, *(t.new_empty(t.shape) for t in (pointwise1, stencil1, weight1, bias1, pointwise2,
                                                              stencil2, weight2, bias2)))


@register_flop_formula(torch.ops.pdenet.residual_block)
def _(x_shape, shortcut_shape, channels, taps_shape, kernel_size, groups, pointwise1_shape, stencil1_shape,
      *args, out_shape=None, **kwargs) -> int:
    pointwise2_shape, stencil2_shape = args[6], args[7]
    h1_shape = (x_shape[0], pointwise1_shape[0], *x_shape[2:])
    return (_lean_flops(x_shape, pointwise1_shape, stencil1_shape, kernel_size)
            + _lean_flops(h1_shape, pointwise2_shape, stencil2_shape, kernel_size))


@register_flop_formula(torch.ops.pdenet.residual_block_backward)
def _(grad_shape, x_shape, y_shape, has_shortcut, input_grad, taps_shape, kernel_size, groups, pointwise1_shape,
      stencil1_shape, *args, out_shape=None, **kwargs) -> int:
    h1_shape, pointwise2_shape, stencil2_shape = args[3], args[6], args[7]
    return ((1 + int(input_grad)) * _lean_flops(x_shape, pointwise1_shape, stencil1_shape, kernel_size)
            + 2 * _lean_flops(h1_shape, pointwise2_shape, stencil2_shape, kernel_size))


_BLOCK_PARAMETERS = (6, 7, 8, 9, 14, 15, 16, 17)  # pointwise1, stencil1, weight1, bias1, and the second layer's


def _residual_block_setup(ctx, inputs, output) -> None:
    (x, shortcut, channels, taps, kernel_size, groups, p1, s1, w1, b1, _, _, _, eps1, p2, s2, w2, b2, _, _, _,
     eps2) = inputs
    y, z1, h1, mean1, invstd1, z2, mask2, mean2, invstd2 = output[:9]
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, y, taps, p1, s1, w1, b1, z1, h1, mean1, invstd1, p2, s2, w2, b2, z2, mask2, mean2,
                          invstd2, shortcut)
    ctx.channels, ctx.kernel_size, ctx.groups, ctx.eps = channels, kernel_size, groups, (eps1, eps2)
    ctx.has_shortcut = shortcut is not None


def _residual_block_grad(ctx, grad, *_):
    (x, y, taps, p1, s1, w1, b1, z1, h1, mean1, invstd1, p2, s2, w2, b2, z2, mask2, mean2, invstd2,
     shortcut) = ctx.saved_tensors
    k, groups = ctx.kernel_size, ctx.groups
    grads = [None] * 22
    if torch.is_grad_enabled():  # create_graph: the block's plain composition, differentiably
        with torch.enable_grad():
            inputs = [x, shortcut, p1, s1, w1, b1, p2, s2, w2, b2]
            h = _plain_batch_norm_relu(lean_conv(x, p1, s1, taps, k, False, groups), None, w1, b1, ctx.eps[0])
            r = shortcut if ctx.has_shortcut else F.pad(x, (0, 0, 0, 0, 0, ctx.channels - x.shape[1]))
            out = _plain_batch_norm_relu(lean_conv(h, p2, s2, taps, k, False, groups), r, w2, b2, ctx.eps[1])
        wanted = [i for i, needed in zip((0, 1, *_BLOCK_PARAMETERS), ctx.needs_input_grad[:2] + tuple(
            ctx.needs_input_grad[i] for i in _BLOCK_PARAMETERS)) if needed]
        position = dict(zip((0, 1, *_BLOCK_PARAMETERS), inputs))
        for i, g in zip(wanted, torch.autograd.grad(out, [position[i] for i in wanted], grad, create_graph=True)):
            grads[i] = g
        return tuple(grads)
    result = torch.ops.pdenet.residual_block_backward(grad, x, y, ctx.has_shortcut, ctx.needs_input_grad[0], taps, k,
                                                      groups, p1, s1, w1, b1, z1, h1, mean1, invstd1, p2, s2, w2,
                                                      b2, z2, mask2, mean2, invstd2)
    gx, d_shortcut = result[:2]
    grads[0] = gx if ctx.needs_input_grad[0] else None
    grads[1] = d_shortcut if ctx.has_shortcut else None
    for i, g in zip(_BLOCK_PARAMETERS, result[2:]):
        grads[i] = g
    return tuple(grads)


residual_block_op.register_autograd(_residual_block_grad, setup_context=_residual_block_setup)
_ResidualBlock = _eager(torch.ops.pdenet.residual_block, _residual_block_setup, _residual_block_grad)


def residual_block(x: Tensor, shortcut: Tensor | None, channels: int, taps: Tensor, kernel_size: int, groups: int,
                   layer1: tuple, layer2: tuple) -> Tensor:
    """``ReLU(BN₂(K₂ ReLU(BN₁(K₁ x))) + r)`` in training mode on the compiled kernels (see the module notes),
    each ``layer = (pointwise, stencil, weight, bias, running_mean, running_var, momentum, eps)``; the running
    statistics updated."""
    out = _apply(torch.ops.pdenet.residual_block, _ResidualBlock,
                 (x, shortcut, channels, taps, kernel_size, groups, *layer1, *layer2))
    with torch.no_grad():
        for buffer, new in zip((layer1[4], layer1[5], layer2[4], layer2[5]), out[9:]):
            buffer.copy_(new)
    return out[0]
