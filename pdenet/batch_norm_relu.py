"""``ReLU(BN(z) + r)``: batch norm in training mode, an optional residual ``r`` and ReLU in two passes each way.

``batch_norm_relu(bn, z, residual)`` computes ``max(0, γ (z − μ)/√(σ² + ε) + β + r)`` with the batch's
per-channel mean ``μ`` and biased variance ``σ²``, and updates ``bn``'s running statistics exactly as
``nn.BatchNorm2d`` does (``momentum``, or the cumulative average when it is ``None``; the unbiased variance). On
the CPU in float32 channels-last, in training mode and with the compiled kernels available
(``operators.native``), it runs ``batch_norm_relu.c``: the forward is one reduction and one elementwise pass,
the backward one reduction (the ReLU mask, ``Σ g``, ``Σ g (z − μ)``) and one elementwise pass. Separately,
PyTorch's batch norm, addition and ReLU take five passes forward and four backward. ``conv_batch_norm_relu(conv,
bn, x, residual)`` goes further where ``conv`` is a lean operator: its kernel sums the batch's moments about the
running mean as it writes ``z = conv(x)``, so that the forward is the elementwise pass alone, and (zero boundary)
the lean backward computes ``∂z = a gm + e z + f`` tile by tile from batch norm's coefficients, so that the
backward is the reduction alone and ``∂z`` is never stored. ``residual_block(conv1, bn1, conv2, bn2, x, channels)``
runs a residual block's two such layers with the shortcut ``Q x`` (identity or zero channels), the shortcut's
gradient handed between their kernels instead of formed and added by autograd. Elsewhere (evaluation, other
devices and dtypes, ``torch.func`` transforms, forward-mode AD, a ``bn`` with hooks or its own ``forward`` such as
the distributed ``GlobalBatchNorm2d``) it is that composition, through ``bn`` itself.
Under ``create_graph`` the backward is PyTorch's, so double backward works.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from operators import LeanConv, native
from operators.lean import _LeanConvFunction

SOURCE = Path(__file__).with_name("batch_norm_relu.c")


def _configure(lib) -> None:
    p, i64, c_int, c_double = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    lib.bn_relu_forward.argtypes = [p] * 6 + [c_double, c_double] + [p] * 6 + [i64, i64, c_int]
    lib.bn_relu_backward.argtypes = [p] * 11 + [i64, i64, c_int]
    lib.bn_relu_backward_coefficients.argtypes = [p] * 12 + [i64, i64, c_int]
    for kernel in (lib.bn_relu_forward, lib.bn_relu_backward, lib.bn_relu_backward_coefficients):
        kernel.restype = c_int


def status() -> str:
    """One line: where the kernels were loaded from, or why they are not in use."""
    if not native.available():
        return f"not in use: the compiled lean kernels are not ({native.status()})"
    KERNELS.get()
    return KERNELS.status


def _reference(x, r, gamma, beta, eps, g):
    """numpy in float64: ``y = max(0, γ x̂ + β + r)`` over (P, C) and its gradients ``(dx, dr, dγ, dβ)``."""
    mean, var = x.mean(0), x.var(0)
    xhat = (x - mean) / np.sqrt(var + eps)
    y = np.maximum(gamma * xhat + beta + r, 0)
    gm = g * (y > 0)
    dbeta, dgamma = gm.sum(0), (gm * xhat).sum(0)
    dx = gamma / np.sqrt(var + eps) * (gm - dbeta / len(x) - xhat * dgamma / len(x))
    return y, dx, gm, dgamma, dbeta


def _self_check(lib) -> str:
    """Both kernels against numpy on a small problem (odd channel count, with and without a residual, running
    statistics, the moments summed here or given, the mask bytes out and back in); the first mismatch as text, or
    ``""``. Numpy, not torch, as in ``operators.native``."""
    rng = np.random.default_rng(0)
    P, C, eps, momentum = 70, 19, 1e-5, 0.1
    x = (rng.standard_normal((P, C)) * 3 + 5).astype(np.float32)
    g, residual = rng.standard_normal((P, C), dtype=np.float32), rng.standard_normal((P, C), dtype=np.float32)
    gamma, beta = rng.uniform(0.5, 1.5, C).astype(np.float32), rng.uniform(-1, 1, C).astype(np.float32)
    for r in (None, residual):
        rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
        y, mean, invstd = np.empty_like(x), np.empty(C, np.float32), np.empty(C, np.float32)
        dx, dr, dgamma, dbeta = np.empty_like(x), np.empty_like(x), np.empty(C, np.float32), np.empty(C, np.float32)
        ptr = (lambda a: None if a is None else a.ctypes.data)
        shift = None if r is None else np.full(C, 4.0, np.float32)  # with the residual: moments given
        given = None if r is None else np.stack([(x - shift).sum(0, dtype=np.float64),
                                                 ((x - shift).astype(np.float64) ** 2).sum(0)])
        mask = np.empty((P, C), np.int8)
        ok = (lib.bn_relu_forward(ptr(x), ptr(r), ptr(gamma), ptr(beta), ptr(rm), ptr(rv), momentum, eps,
                                  ptr(given), ptr(shift), ptr(y), ptr(mask), ptr(mean), ptr(invstd), P, C, 2)
              and lib.bn_relu_backward(ptr(g), ptr(x), None if r is None else ptr(y), ptr(gamma), ptr(beta),
                                       ptr(mean), ptr(invstd), None if r is None else ptr(dr), ptr(dx),
                                       ptr(dgamma), ptr(dbeta), P, C, 2))
        coef = np.empty((4, C), np.float32)
        dgamma_from_mask, dbeta_from_mask = np.empty(C, np.float32), np.empty(C, np.float32)
        ok = ok and lib.bn_relu_backward_coefficients(ptr(g), ptr(x), None, ptr(mask), ptr(gamma), ptr(beta),
                                                      ptr(mean), ptr(invstd), None, ptr(coef), ptr(dgamma_from_mask),
                                                      ptr(dbeta_from_mask), P, C, 2)
        if not ok:
            return "the kernels refused a small problem"
        ref = _reference(x.astype(np.float64), 0 if r is None else r, gamma, beta, eps, g)
        checks = [("output", y, ref[0]), ("mask bytes", mask, np.where(ref[0] > 0, -1, 0)),
                  ("weight gradient from the mask bytes", dgamma_from_mask, ref[3]),
                  ("bias gradient from the mask bytes", dbeta_from_mask, ref[4]),
                  ("input gradient", dx, ref[1]), ("weight gradient", dgamma, ref[3]),
                  ("bias gradient", dbeta, ref[4]), ("running mean", rm, momentum * x.mean(0)),
                  ("running variance", rv, 1 - momentum + momentum * x.astype(np.float64).var(0, ddof=1))]
        if r is not None:
            checks.append(("residual gradient", dr, ref[2]))
        for name, a, b in checks:
            if not np.allclose(a, b, rtol=1e-4, atol=1e-4):
                return f"{name} differs from numpy ({'with' if r is not None else 'without'} a residual)"
    return ""


KERNELS = native.CompiledLibrary(SOURCE, _configure, _self_check, "fused batch norm kernels",
                                 "batch norm and ReLU run on PyTorch's kernels")


def _composite(bn: nn.BatchNorm2d, z: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    out = bn(z)
    return F.relu(out if residual is None else out + residual)


def _plain(module: nn.Module) -> bool:
    """Whether calling ``module`` would run its class's ``forward`` and nothing else: no hooks; for batch norm,
    not a subclass with its own forward (``GlobalBatchNorm2d``, ``SyncBatchNorm`` gather statistics over
    processes)."""
    from torch.nn.modules import module as modules

    return ((not isinstance(module, nn.BatchNorm2d) or type(module).forward is nn.BatchNorm2d.forward)
            and not (module._forward_hooks or module._forward_pre_hooks)
            and not (modules._global_forward_hooks or modules._global_forward_pre_hooks))


def _kernels_take(bn: nn.BatchNorm2d, t: torch.Tensor) -> bool:
    """Whether the compiled kernels would take ``bn`` in a call on tensors like ``t`` (channels aside)."""
    return (bn.training and bn.affine and _plain(bn) and t.dim() == 4 and t.numel() > 0 and t.device.type == "cpu"
            and t.dtype == torch.float32 and t.is_contiguous(memory_format=torch.channels_last)
            and torch.autograd.forward_ad._current_level < 0 and not torch._C._functorch.is_functorch_wrapped_tensor(t)
            and native.available() and KERNELS.get() is not None)


def _residual_fits(residual: torch.Tensor | None, t: torch.Tensor) -> bool:
    """Whether the kernels take ``residual`` (or none) beside tensors like ``t``: same dtype and device, plain."""
    return residual is None or (residual.dtype == t.dtype and residual.device == t.device
                                and not torch._C._functorch.is_functorch_wrapped_tensor(residual))


def _fast(bn: nn.BatchNorm2d, z: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Whether the compiled kernels take this call."""
    return z.dim() == 4 and z.shape[1] == bn.num_features and _kernels_take(bn, z) and _residual_fits(residual, z)


def _pixels(z: torch.Tensor) -> int:
    return z.shape[0] * z.shape[2] * z.shape[3]


def _forward_kernel(z, residual, weight, bias, running_mean, running_var, momentum, eps, shift, sums,
                    mask_out=None):
    """``(y, μ, 1/√(σ² + ε))`` from ``bn_relu_forward``; ``shift`` and ``sums``: moments given, or ``None``;
    ``mask_out`` (int8, like ``z``) receives ``[y > 0]`` as -1 or 0 unless ``None``."""
    c = z.shape[1]
    y = torch.empty_like(z, memory_format=torch.channels_last)
    mean, invstd = z.new_empty(c), z.new_empty(c)
    track = running_mean is not None
    ok = KERNELS.get().bn_relu_forward(
        z.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(), bias.data_ptr(),
        running_mean.data_ptr() if track else None, running_var.data_ptr() if track else None, momentum, eps,
        None if sums is None else sums.data_ptr(), None if shift is None else shift.data_ptr(),
        y.data_ptr(), None if mask_out is None else mask_out.data_ptr(), mean.data_ptr(), invstd.data_ptr(),
        _pixels(z), c, torch.get_num_threads())
    if not ok:
        raise MemoryError(f"fused batch norm: out of memory for input {tuple(z.shape)}")
    return y, mean, invstd


def _backward_coefficients(grad, z, y, weight, bias, mean, invstd, mask=None):
    """The backward's reduction (``bn_relu_backward_coefficients``): ``(coefficients, dr, dγ, dβ)`` with
    ``coefficients`` (4, C) the ``a, b, e, f`` of ``dz = a gm + e z + f`` and ``dr = gm`` where the forward had a
    residual (``y`` given), else ``None``; with the forward's ``mask`` bytes instead of ``y``, the mask comes from
    them and ``dr`` is not formed."""
    coefficients = torch.empty(4, z.shape[1], dtype=z.dtype)
    dr = torch.empty_like(z, memory_format=torch.channels_last) if y is not None else None
    dw, db = torch.empty_like(weight), torch.empty_like(bias)
    ok = KERNELS.get().bn_relu_backward_coefficients(
        grad.data_ptr(), z.data_ptr(), None if y is None else y.data_ptr(),
        None if mask is None else mask.data_ptr(), weight.data_ptr(), bias.data_ptr(),
        mean.data_ptr(), invstd.data_ptr(), None if dr is None else dr.data_ptr(), coefficients.data_ptr(),
        dw.data_ptr(), db.data_ptr(), _pixels(z), z.shape[1], torch.get_num_threads())
    if not ok:
        raise MemoryError(f"fused batch norm: out of memory for input {tuple(z.shape)}")
    return coefficients, dr, dw, db


class _BatchNormReLUFunction(torch.autograd.Function):
    """``y = max(0, a z + b + r)`` with ``a = γ/√(σ² + ε)``, ``b = β − μ a`` from the batch; see the module
    notes. Saves ``z``, the batch's ``μ`` and ``1/√(σ² + ε)``, and ``y`` when there is a residual (its mask)."""

    @staticmethod
    def forward(ctx, z, residual, weight, bias, running_mean, running_var, momentum, eps, shift, sums):
        y, mean, invstd = _forward_kernel(z, residual, weight, bias, running_mean, running_var, momentum, eps,
                                          shift, sums)
        ctx.save_for_backward(z, weight, bias, mean, invstd, y if residual is not None else None)
        ctx.eps, ctx.has_residual = eps, residual is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        z, weight, bias, mean, invstd, y = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: PyTorch's differentiable batch norm on the batch statistics
            t = F.batch_norm(z, None, None, weight, bias, True, 0.0, ctx.eps)
            masked = grad * ((t if y is None else y) > 0)
            dz, dw, db = torch.autograd.grad(t, (z, weight, bias), masked, create_graph=True)
            return dz, masked if ctx.has_residual else None, dw, db, None, None, None, None, None, None
        grad = grad.contiguous(memory_format=torch.channels_last)
        dz = torch.empty_like(z, memory_format=torch.channels_last)
        dr = torch.empty_like(z, memory_format=torch.channels_last) if ctx.has_residual else None
        dw, db = torch.empty_like(weight), torch.empty_like(bias)
        ok = KERNELS.get().bn_relu_backward(
            grad.data_ptr(), z.data_ptr(), None if y is None else y.data_ptr(), weight.data_ptr(), bias.data_ptr(),
            mean.data_ptr(), invstd.data_ptr(), None if dr is None else dr.data_ptr(), dz.data_ptr(), dw.data_ptr(),
            db.data_ptr(), _pixels(z), z.shape[1], torch.get_num_threads())
        if not ok:
            raise MemoryError(f"fused batch norm: out of memory for input {tuple(z.shape)}")
        return dz, dr, dw, db, None, None, None, None, None, None


def _pad_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """``Q x``: ``x`` (B, c, n1, n2) with zero channels appended up to ``channels`` (B, channels, n1, n2), in ``x``'s
    memory format; ``x`` itself when ``channels == c``."""
    return x if channels == x.shape[1] else F.pad(x, (0, 0, 0, 0, 0, channels - x.shape[1]))


class _ShortcutLink:
    """A residual block's shortcut gradient, handed from its second fused layer's backward to its first's (which
    runs after it: the second layer's input is the first's output). ``gradient = (g, mask)``: the shortcut's
    gradient is ``g ⊙ mask`` (``mask`` the second layer's ReLU mask as int8 bytes, or ``None`` where ``g`` is
    masked already), or ``None`` before that backward."""

    __slots__ = ("gradient",)

    def __init__(self):
        self.gradient = None


class _LeanBatchNormReLUFunction(torch.autograd.Function):
    """``y = max(0, a z + b [+ r])`` with ``z = P x + S x`` the lean operator (zero boundary) and ``a, b`` from the
    batch's statistics of ``z``, which the lean kernel sums as it writes ``z``. Backward: batch norm's reduction
    (``dγ, dβ``, ``dr``, the coefficients of ``dz = a gm + e z + f``), then the lean kernel's backward on that
    ``dz``, computed tile by tile instead of stored (``native.lean_backward`` with ``bn_gradient``): batch norm's
    elementwise pass and the tensor ``dz`` are saved.

    With a ``link`` (``residual_block``) the layer is half of a residual block ``ReLU(BN(K₂ ReLU(BN(K₁ x))) +
    Q x)``. The second half (a residual ``r = Q x``, not differentiable here) keeps its ReLU mask as bytes instead
    of ``y`` and hands the shortcut's gradient ``g ⊙ mask`` to the first half through the link, never forming it;
    the first half's kernel adds its first ``c_in`` channels to ``∂x`` as it stores it (``∂x += Q^T (g ⊙ mask)``).
    Under ``create_graph``, PyTorch's differentiable pieces."""

    @staticmethod
    def forward(ctx, x, pointwise, stencil, taps, k, groups, residual, weight, bias, running_mean, running_var,
                momentum, eps, link):
        shift = running_mean  # the kernels read each channel's shift before batch norm's kernel updates it
        z, sums = native.lean_forward(x, pointwise, stencil, taps, k, False, groups, moments_about=shift)
        mask = (torch.empty(z.shape, dtype=torch.int8, memory_format=torch.channels_last)
                if residual is not None and link is not None else None)
        y, mean, invstd = _forward_kernel(z, residual, weight, bias, running_mean, running_var, momentum, eps,
                                          shift, sums, mask)
        ctx.save_for_backward(x, pointwise, stencil, taps, z, weight, bias, mean, invstd,
                              mask if mask is not None else y if residual is not None else None)
        ctx.k, ctx.groups, ctx.eps, ctx.has_residual, ctx.link = k, groups, eps, residual is not None, link
        return y

    @staticmethod
    def backward(ctx, grad):
        x, pointwise, stencil, taps, z, weight, bias, mean, invstd, y_or_mask = ctx.saved_tensors
        link = ctx.link
        # a residual block's second half hands the shortcut's gradient on, its first half receives it
        hands_on, receives = link is not None and ctx.has_residual, link is not None and not ctx.has_residual
        shortcut = link.gradient if receives else None
        if receives:
            link.gradient = None
        if torch.is_grad_enabled():  # create_graph: the lean operator and batch norm, differentiably
            t = F.batch_norm(_LeanConvFunction.apply(x, pointwise[:, :, None, None], stencil, taps, ctx.k, "zeros",
                                                     ctx.groups),
                             None, None, weight, bias, True, 0.0, ctx.eps)
            keep = (y_or_mask != 0) if hands_on else (t if y_or_mask is None else y_or_mask) > 0  # mask, y or t
            masked = grad * keep
            inputs = dict(zip((0, 1, 2, 7, 8), (x, pointwise, stencil, weight, bias)))
            wanted = [i for i in inputs if ctx.needs_input_grad[i]]
            grads = dict(zip(wanted, torch.autograd.grad(t, [inputs[i] for i in wanted], masked, create_graph=True)))
            if shortcut is not None and 0 in grads:
                g, shortcut_mask = shortcut
                grads[0] = grads[0] + (g if shortcut_mask is None else g * (shortcut_mask != 0))[:, :x.shape[1]]
            if hands_on:
                link.gradient = (masked, None)
            dr = masked if ctx.has_residual and not hands_on else None
            return (grads.get(0), grads.get(1), grads.get(2), None, None, None, dr, grads.get(7), grads.get(8),
                    None, None, None, None, None)
        grad = grad.contiguous(memory_format=torch.channels_last)
        if hands_on:  # the mask from its bytes; the shortcut's gradient g ⊙ mask is not formed
            coefficients, dr, dw, db = _backward_coefficients(grad, z, None, weight, bias, mean, invstd, y_or_mask)
            link.gradient = (grad, y_or_mask)
            gm_mask = y_or_mask
        else:
            coefficients, dr, dw, db = _backward_coefficients(grad, z, y_or_mask, weight, bias, mean, invstd)
            gm_mask = ctx.has_residual  # with a residual the reduction stored gm = dr
        input_grad = ctx.needs_input_grad[0]
        addend, addend_mask = shortcut if input_grad and shortcut is not None else (None, None)
        gx, gp, gs = native.lean_backward(dr if dr is not None else grad, x, pointwise, stencil, taps, ctx.k, False,
                                          ctx.groups, input_grad=input_grad, bn_gradient=(z, coefficients, gm_mask),
                                          input_grad_addend=addend, addend_mask=addend_mask)
        return gx, gp, gs, None, None, None, dr, dw, db, None, None, None, None, None


def _step_momentum(bn: nn.BatchNorm2d) -> float:
    """Count the step in ``bn.num_batches_tracked`` (with running statistics) and return the momentum of its
    running-statistics update, as ``nn.BatchNorm2d`` does: ``bn.momentum``, or the cumulative average's
    ``1/steps`` when it is ``None``."""
    momentum = bn.momentum
    if bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    return float(momentum or 0.0)


def batch_norm_relu(bn: nn.BatchNorm2d, z: torch.Tensor, residual: torch.Tensor | None = None,
                    moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``ReLU(bn(z) + residual)`` (``residual`` optional), ``(B, C, n1, n2) -> (B, C, n1, n2)``: the compiled
    two-pass kernels where they apply (see the module notes), else ``bn`` itself, the addition and ReLU.
    ``moments = (shift, sums)``, where ``z``'s producer summed them (``shift`` (C,), ``sums`` float64 (2, C) of
    ``z − shift`` and ``(z − shift)²``), replace the kernels' reduction pass."""
    if residual is not None and residual.shape != z.shape:
        raise ValueError(f"residual of shape {tuple(residual.shape)} does not match the input {tuple(z.shape)}")
    if not _fast(bn, z, residual):
        return _composite(bn, z, residual)
    shift, sums = (None, None) if moments is None else moments
    if sums is not None and (shift.shape != (z.shape[1],) or sums.shape != (2, z.shape[1])
                             or sums.dtype != torch.float64 or shift.dtype != torch.float32):
        raise ValueError(f"moments for {z.shape[1]} channels must be a float32 shift ({z.shape[1]},) and float64 "
                         f"sums (2, {z.shape[1]}), got {tuple(shift.shape)} and {tuple(sums.shape)} {sums.dtype}")
    momentum = _step_momentum(bn)
    running = (bn.running_mean, bn.running_var) if bn.track_running_stats else (None, None)
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    return _BatchNormReLUFunction.apply(z, residual, bn.weight, bn.bias, *running, momentum, bn.eps, shift, sums)


def conv_batch_norm_relu(conv: nn.Module, bn: nn.BatchNorm2d, x: torch.Tensor,
                         residual: torch.Tensor | None = None) -> torch.Tensor:
    """``ReLU(bn(conv(x)) + residual)``, ``(B, c_in, n1, n2) -> (B, c_out, n1, n2)``. Where ``conv`` is a lean
    operator (``operators.LeanConv``, no hooks) on the compiled kernels and ``batch_norm_relu`` takes the call
    with running statistics, the operator's kernel sums the batch's moments about the running mean as it writes
    ``conv(x)``, so that batch norm skips its reduction pass; with the zero boundary the backward also skips
    batch norm's elementwise pass (``_LeanBatchNormReLUFunction``), otherwise it is
    ``LeanConv.forward_with_moments`` and ``batch_norm_relu``. Anything else: ``batch_norm_relu(bn, conv(x),
    residual)``."""
    if not (_fused_operator(conv, bn, x) and _residual_fits(residual, x)):
        return batch_norm_relu(bn, conv(x), residual)
    if not _lean_kernel_path(conv, bn, x):
        shift = bn.running_mean.clone()
        z, sums = conv.forward_with_moments(x, shift)
        return batch_norm_relu(bn, z, residual, (shift, sums))
    return _lean_batch_norm_relu(conv, bn, x, residual, None)


def residual_block(conv1: nn.Module, bn1: nn.BatchNorm2d, conv2: nn.Module, bn2: nn.BatchNorm2d, x: torch.Tensor,
                   channels: int) -> torch.Tensor:
    """``ReLU(bn2(conv2(ReLU(bn1(conv1(x))))) + Q x)``, a residual block's body, with the shortcut ``Q x``: ``x``
    (B, c_in, n1, n2) with zero channels appended up to ``channels`` (the identity when ``channels == c_in``).
    Where both layers take the lean kernels with the zero boundary (``_LeanBatchNormReLUFunction``), the second
    keeps its ReLU mask as bytes and the first's backward kernel adds the shortcut's gradient to ``∂x``: the
    residual's gradient is never formed and autograd adds no branches. Anything else: two
    ``conv_batch_norm_relu`` calls with ``Q x`` as the second's residual."""
    if isinstance(channels, bool) or not isinstance(channels, int) or x.dim() != 4 or channels < x.shape[1]:
        raise ValueError(f"the shortcut needs an integer channel count >= the input's for a 4-D input, got "
                         f"{channels!r} for an input of shape {tuple(x.shape)}")
    if not (_lean_kernel_path(conv1, bn1, x) and _lean_kernel_path(conv2, bn2, x) and conv2.out_channels == channels):
        return conv_batch_norm_relu(conv2, bn2, conv_batch_norm_relu(conv1, bn1, x), _pad_channels(x, channels))
    link = _ShortcutLink()
    out = _lean_batch_norm_relu(conv1, bn1, x, None, link)
    return _lean_batch_norm_relu(conv2, bn2, out, _pad_channels(x.detach(), channels), link)


def _fused_operator(conv: nn.Module, bn: nn.BatchNorm2d, x: torch.Tensor) -> bool:
    """Whether ``conv`` is a plain lean operator whose kernel sums ``bn``'s moments for inputs like ``x``."""
    return (isinstance(conv, LeanConv) and type(conv).forward is LeanConv.forward and _plain(conv)
            and conv.stencil is not None and bn.track_running_stats and conv.out_channels == bn.num_features
            and _kernels_take(bn, x) and native.applies(x, conv.out_channels, conv.groups))


def _lean_kernel_path(conv: nn.Module, bn: nn.BatchNorm2d, x: torch.Tensor) -> bool:
    """Whether ``_LeanBatchNormReLUFunction`` takes ``conv`` and ``bn`` for inputs like ``x``: zero boundary."""
    return (_fused_operator(conv, bn, x) and conv.boundary == "zeros"
            and native.supports(x, conv.in_channels, conv.groups))


def _lean_batch_norm_relu(conv, bn, x, residual, link):
    """``_LeanBatchNormReLUFunction`` on ``conv`` and ``bn`` (checked: ``_lean_kernel_path``)."""
    conv._check_input(x, conv.in_channels, "forward")
    if residual is not None:
        if residual.shape != (x.shape[0], conv.out_channels, *x.shape[2:]):
            raise ValueError(f"residual of shape {tuple(residual.shape)} does not match the output "
                             f"{(x.shape[0], conv.out_channels, *x.shape[2:])}")
        residual = residual.contiguous(memory_format=torch.channels_last)
    return _LeanBatchNormReLUFunction.apply(x, conv.pointwise, conv.stencil, conv.stencil_index, conv.kernel_size,
                                            conv.groups, residual, bn.weight, bn.bias, bn.running_mean,
                                            bn.running_var, _step_momentum(bn), bn.eps, link)


class BatchNormReLUSequential(nn.Sequential):
    """``nn.Sequential`` that runs each ``nn.BatchNorm2d`` directly followed by an ``nn.ReLU`` (without hooks) as
    one ``batch_norm_relu`` call. The same modules, state-dict keys and results as ``nn.Sequential``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules = list(self)
        i = 0
        while i < len(modules):
            module = modules[i]
            following = modules[i + 1] if i + 1 < len(modules) else None
            if (isinstance(module, nn.BatchNorm2d) and type(following) is nn.ReLU
                    and not (following._forward_hooks or following._forward_pre_hooks)):
                x, i = batch_norm_relu(module, x), i + 2
            else:
                x, i = module(x), i + 1
        return x
