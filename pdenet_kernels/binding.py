"""The compiled kernels as Python functions on tensors: argument structures, calls, and errors.

Each function takes float32 CPU tensors in channels-last layout (``(B, C, H, W)`` tensors whose channels are
contiguous), allocates its outputs and calls the C kernel with the calling thread's ``torch.get_num_threads()``
OpenMP threads. None of them records autograd: the registered operators (``pdenet_kernels.ops``) do. A kernel's
refusal becomes ``ValueError`` (arguments outside its range) or ``MemoryError`` (an allocation failed); the
library is built, loaded and self-checked on first use (``library()``).
"""
from __future__ import annotations

import ctypes
import math
import threading
import warnings

import torch

from . import build

_I64, _PTR, _INT, _DOUBLE = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_double
KERNEL_OK, KERNEL_INVALID, KERNEL_NO_MEMORY = 0, 1, 2

# the ReLU mask's modes in the lean backward's batch-norm output gradient (csrc/lean.c, bn_gradient)
MASK_FROM_OUTPUT, MASK_APPLIED, MASK_BYTES = 0, 1, 2


class LeanShape(ctypes.Structure):
    """``lean_shape`` of ``csrc/lean.c``."""
    _fields_ = [(name, _I64) for name in ("batch", "height", "width", "in_channels", "out_channels",
                                          "stencil_channels", "kernel_size", "groups", "circular", "threads",
                                          "ntaps")] + [("taps", _PTR)]


class BnGradient(ctypes.Structure):
    """``bn_gradient`` of ``csrc/lean.c``: the output gradient ``a gm + e z + f`` of batch norm's backward."""
    _fields_ = [("g", _PTR), ("z", _PTR), ("coef", _PTR), ("masked", _INT), ("mask", _PTR)]


class Addend(ctypes.Structure):
    """``addend`` of ``csrc/lean.c``: channels added to the input gradient as it is stored."""
    _fields_ = [("add", _PTR), ("pitch", _I64), ("mask", _PTR)]


class Epilogue(ctypes.Structure):
    """``epilogue`` of ``csrc/lean.c``: ``y = act(P x + S x + add [mask] + bias)`` as the forward stores ``y``."""
    _fields_ = [("add", _PTR), ("pitch", _I64), ("mask", _PTR), ("bias", _PTR), ("relu", _I64)]


class ChainBlock(ctypes.Structure):
    """``chain_block`` of ``csrc/chain.c``: one folded residual block of a chain."""
    _fields_ = [(name, _I64) for name in ("stride", "in_channels", "out_channels", "stencil_channels")] + [
        (name, _PTR) for name in ("p1", "s1", "b1", "p2", "s2", "b2")]


class BnLayer(ctypes.Structure):
    """``bn_layer`` of ``csrc/batch_norm.c``."""
    _fields_ = [("pixels", _I64), ("channels", _I64), ("threads", _I64), ("gamma", _PTR), ("beta", _PTR),
                ("running_mean", _PTR), ("running_var", _PTR), ("momentum", _DOUBLE), ("eps", _DOUBLE)]


def configure(lib: ctypes.CDLL) -> None:
    """The kernels' argument and result types."""
    ref = ctypes.POINTER
    lib.lean_forward.argtypes = [ref(LeanShape)] + [_PTR] * 3 + [ref(Epilogue)] + [_PTR] * 3
    lib.lean_chain_forward.argtypes = [ref(LeanShape), _I64, ref(ChainBlock), _PTR, _PTR]
    lib.lean_backward.argtypes = [ref(LeanShape), _PTR, ref(BnGradient)] + [_PTR] * 4 + [ref(Addend), _PTR, _PTR]
    lib.bn_relu_forward.argtypes = [ref(BnLayer)] + [_PTR] * 8
    lib.bn_relu_backward_coefficients.argtypes = [ref(BnLayer)] + [_PTR] * 10
    lib.bn_relu_backward.argtypes = [ref(BnLayer)] + [_PTR] * 9
    lib.kernel_fail_allocation.argtypes = [_I64]
    lib.kernel_fail_allocation.restype = None
    for kernel in (lib.lean_forward, lib.lean_chain_forward, lib.lean_backward, lib.bn_relu_forward, lib.bn_relu_backward_coefficients,
                   lib.bn_relu_backward, lib.lean_block_channels):
        kernel.restype = _INT


class _Library:
    """The compiled library, built, loaded and self-checked on the first ``get()`` (once per process,
    thread-safe); ``None`` with ``status`` saying why where it cannot be used (a warning the first time)."""

    def __init__(self):
        self.lib, self.status, self._tried, self._lock = None, "not loaded yet", False, threading.Lock()

    def _load(self) -> None:
        from .self_check import self_check

        try:
            path = build.build()
            lib = build.load(path)
        except build.KernelsUnavailable as err:
            self.status = str(err)
            return
        configure(lib)
        mismatch = self_check(lib)
        if mismatch:
            self.status = f"self-check failed: {mismatch}"
        else:
            self.lib, self.status = lib, f"compiled kernels loaded from {path}"

    def get(self):
        if not self._tried:
            with self._lock:
                if not self._tried:
                    self._load()
                    self._tried = True
                    if self.lib is None and not self.status.startswith("disabled"):
                        warnings.warn(f"pdenet: the compiled kernels are unavailable ({self.status}); PyTorch's "
                                      "operations run instead", RuntimeWarning, stacklevel=4)
        return self.lib


LIBRARY = _Library()


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the compiled kernels are built, loaded and self-checked (a constant to ``torch.compile``)."""
    return LIBRARY.get() is not None


def status() -> str:
    """One line: where the kernels were loaded from, or why they are not in use."""
    LIBRARY.get()
    return LIBRARY.status


def library() -> ctypes.CDLL:
    """The loaded library; ``RuntimeError`` naming why where it is unavailable."""
    lib = LIBRARY.get()
    if lib is None:
        raise RuntimeError(f"the compiled kernels are unavailable: {LIBRARY.status}")
    return lib


@torch.compiler.assume_constant_result
def block_channels() -> int:
    """Channels of the lean kernels' narrowest register block, one vector (8 with AVX2, 16 with AVX-512)."""
    return library().lean_block_channels()


def check(code: int, what: str) -> None:
    """A kernel's return code as the error it stands for (``what`` names the call)."""
    if code == KERNEL_NO_MEMORY:
        raise MemoryError(f"compiled kernel {what}: out of memory")
    if code != KERNEL_OK:
        raise ValueError(f"compiled kernel {what}: arguments outside the kernel's range")


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def lean_shape(x: torch.Tensor, c_out: int, stencil_channels: int, taps: torch.Tensor, k: int, circular: bool,
               groups: int) -> LeanShape:
    b, c_in, n1, n2 = x.shape
    return LeanShape(b, n1, n2, c_in, c_out, stencil_channels, k, groups, int(circular), torch.get_num_threads(),
                     len(taps), taps.data_ptr())


def lean_forward(x, pointwise, stencil, taps, k: int, circular: bool, groups: int, moments_about=None, bias=None,
                 residual=None, relu: bool = False):
    """``y = P x + S x`` (``pointwise`` (c_out, c_in/g), ``stencil`` (m, ntaps) on the int64 flat indices ``taps``
    of the ``k x k`` square), or ``y = act(P x + S x + r + b)`` with a ``residual`` ``r`` like ``y``, a ``bias``
    ``b`` (c_out,) and ``act`` the ReLU where ``relu``, applied as the kernel stores ``y``; with ``moments_about``
    (c_out,) also float64 (2, c_out) sums of ``y − shift`` and ``(y − shift)²`` over the batch and the pixels,
    summed as the kernel writes ``y``."""
    c_out = pointwise.shape[0]
    y = torch.empty((x.shape[0], c_out, *x.shape[2:]), dtype=x.dtype, memory_format=torch.channels_last)
    moments = None if moments_about is None else torch.empty(2, c_out, dtype=torch.float64)
    shape = lean_shape(x, c_out, stencil.shape[0], taps, k, circular, groups)
    epilogue = None
    if bias is not None or residual is not None or relu:
        epilogue = ctypes.byref(Epilogue(_ptr(residual), c_out, None, _ptr(bias), int(relu)))
    check(library().lean_forward(ctypes.byref(shape), x.data_ptr(), pointwise.data_ptr(), stencil.data_ptr(),
                                 epilogue, y.data_ptr(), _ptr(moments_about), _ptr(moments)), "lean_forward")
    return y if moments_about is None else (y, moments)


def lean_chain_forward(x, taps, k: int, circular: bool, groups: int, strides, shapes, packed, out_shape):
    """A chain of folded lean residual blocks (``csrc/chain.c``) on channels-last ``x``, into a new channels-last
    tensor of ``out_shape``: ``strides`` one per block, the weights one contiguous vector ``packed`` holding six
    tensors per block of the given ``shapes`` (``P₁, s₁, b₁, P₂, s₂, b₂``)."""
    count, base, offset = len(strides), packed.data_ptr(), 0
    blocks = (ChainBlock * count)()
    for i, stride in enumerate(strides):
        pointers = []
        for shape in shapes[6 * i: 6 * i + 6]:
            pointers.append(base + packed.element_size() * offset)
            offset += math.prod(shape)
        p1_shape, s1_shape = shapes[6 * i], shapes[6 * i + 1]
        blocks[i] = ChainBlock(stride, p1_shape[1] * groups, p1_shape[0], s1_shape[0], *pointers)
    y = torch.empty(out_shape, dtype=x.dtype, memory_format=torch.channels_last)
    shape = lean_shape(x, 0, 0, taps, k, circular, groups)
    check(library().lean_chain_forward(ctypes.byref(shape), count, blocks, x.data_ptr(), y.data_ptr()),
          "lean_chain_forward")
    return y


def lean_backward(grad, x, pointwise, stencil, taps, k: int, circular: bool, groups: int, input_grad: bool,
                  bn_gradient=None, addend=None, addend_mask=None):
    """``(∂x, ∂P, ∂s)`` of ``y = P x + S x`` for the output gradient ``grad`` (``∂x`` ``None`` unless
    ``input_grad``), or, with ``bn_gradient = (z, coefficients, mode, mask)`` and ``grad`` batch norm's output
    gradient, for ``a gm + e z + f`` (``coefficients`` (4, c_out): ``a, b, e, f``; ``gm`` by ``mode``:
    ``MASK_FROM_OUTPUT`` ``grad [a z + b > 0]``, ``MASK_APPLIED`` ``grad``, ``MASK_BYTES`` ``grad`` where the
    int8 ``mask`` is set). With ``addend`` (B, ≥ c_in, n1, n2) its first c_in channels (where ``addend_mask`` is
    set, unless ``None``) are added to ``∂x`` as it is stored."""
    c_out, m = pointwise.shape[0], stencil.shape[0]
    gx = torch.empty_like(x, memory_format=torch.channels_last) if input_grad else None
    gp, gs = torch.empty(pointwise.shape, dtype=x.dtype), torch.empty(stencil.shape, dtype=x.dtype)
    shape = lean_shape(x, c_out, m, taps, k, circular, groups)
    bn = None
    if bn_gradient is not None:
        z, coefficients, mode, mask = bn_gradient
        bn = ctypes.byref(BnGradient(grad.data_ptr(), z.data_ptr(), coefficients.data_ptr(),
                                     int(mode == MASK_APPLIED), _ptr(mask if mode == MASK_BYTES else None)))
    add = None if addend is None else ctypes.byref(Addend(addend.data_ptr(), addend.shape[1], _ptr(addend_mask)))
    check(library().lean_backward(ctypes.byref(shape), None if bn is not None else grad.data_ptr(), bn,
                                  x.data_ptr(), pointwise.data_ptr(), stencil.data_ptr(), _ptr(gx), add,
                                  gp.data_ptr(), gs.data_ptr()), "lean_backward")
    return gx, gp, gs


def bn_layer(z, weight, bias, running_mean=None, running_var=None, momentum: float = 0.0,
             eps: float = 1e-5) -> BnLayer:
    """The C structure of a batch-norm layer; every vector must be contiguous (the running statistics are updated
    in place)."""
    if not all(v is None or v.is_contiguous() for v in (weight, bias, running_mean, running_var)):
        raise ValueError("batch norm's weight, bias and running statistics must be contiguous")
    return BnLayer(z.shape[0] * z.shape[2] * z.shape[3], z.shape[1], torch.get_num_threads(), weight.data_ptr(),
                   bias.data_ptr(), _ptr(running_mean), _ptr(running_var), momentum, eps)


def bn_relu_forward(z, residual, weight, bias, running_mean, running_var, momentum: float, eps: float,
                    moments=None, mask: bool = False):
    """``(y, μ, 1/√(σ² + ε), mask)``: ``y = max(0, γ (z − μ)/√(σ² + ε) + β + r)`` over the batch's statistics,
    the running statistics updated in place (unless ``None``); ``moments = (shift, sums)`` where ``z``'s producer
    summed them; with ``mask`` also ``[y > 0]`` as int8 mask bytes, else ``None``."""
    c = z.shape[1]
    y = torch.empty_like(z, memory_format=torch.channels_last)
    mean, invstd = z.new_empty(c), z.new_empty(c)
    mask_bytes = torch.empty(z.shape, dtype=torch.int8, memory_format=torch.channels_last) if mask else None
    shift, sums = (None, None) if moments is None else moments
    layer = bn_layer(z, weight, bias, running_mean, running_var, momentum, eps)
    check(library().bn_relu_forward(ctypes.byref(layer), z.data_ptr(), _ptr(residual), _ptr(sums), _ptr(shift),
                                    y.data_ptr(), _ptr(mask_bytes), mean.data_ptr(), invstd.data_ptr()),
          "bn_relu_forward")
    return y, mean, invstd, mask_bytes


def bn_relu_backward_coefficients(grad, z, y, mask, weight, bias, mean, invstd):
    """The backward's reduction: ``(coefficients, dr, dγ, dβ)``, ``coefficients`` (4, C) the ``a, b, e, f`` of
    ``dz = a gm + e z + f``; the mask from ``y`` (then ``dr = gm`` is stored), from the mask bytes ``mask``, or
    (both ``None``) recomputed from ``z``."""
    coefficients = torch.empty(4, z.shape[1], dtype=z.dtype)
    dr = torch.empty_like(z, memory_format=torch.channels_last) if y is not None else None
    dw, db = weight.new_empty(weight.shape), bias.new_empty(bias.shape)
    layer = bn_layer(z, weight, bias)
    check(library().bn_relu_backward_coefficients(ctypes.byref(layer), grad.data_ptr(), z.data_ptr(), _ptr(y),
                                                  _ptr(mask), mean.data_ptr(), invstd.data_ptr(), _ptr(dr),
                                                  coefficients.data_ptr(), dw.data_ptr(), db.data_ptr()),
          "bn_relu_backward_coefficients")
    return coefficients, dr, dw, db


def bn_relu_backward(grad, z, y, weight, bias, mean, invstd):
    """``(dz, dr, dγ, dβ)`` of ``bn_relu_forward``: ``y`` the forward's output where it had a residual (then
    ``dr`` is its gradient), else ``None`` (and ``dr`` too)."""
    dz = torch.empty_like(z, memory_format=torch.channels_last)
    dr = torch.empty_like(z, memory_format=torch.channels_last) if y is not None else None
    dw, db = weight.new_empty(weight.shape), bias.new_empty(bias.shape)
    layer = bn_layer(z, weight, bias)
    check(library().bn_relu_backward(ctypes.byref(layer), grad.data_ptr(), z.data_ptr(), _ptr(y), mean.data_ptr(),
                                     invstd.data_ptr(), _ptr(dr), dz.data_ptr(), dw.data_ptr(), db.data_ptr()),
          "bn_relu_backward")
    return dz, dr, dw, db


def fail_allocation(after: int) -> None:
    """Make the kernels' allocation ``after`` calls from now fail once (0: the next one; negative: cancel), for
    testing how an out-of-memory kernel is reported."""
    library().kernel_fail_allocation(after)
