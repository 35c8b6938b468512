"""The lean operator of LeanConvNets: ``K = P + S``, a 1x1 channel coupling plus a per-channel stencil.

Speed is the point of this operator, so the forward and backward passes are written by hand
(``_LeanConvFunction``). On CPU in float32 the input is taken in channels-last layout and, in order of
preference:

1. the compiled kernels of ``operators.native`` compute ``P x + S x`` in one pass over ``x`` and ``y`` (the
   1x1 coupling and the stencil taps accumulate in registers before one store), and both weight gradients
   in one pass over the output gradient and ``x``;
2. without them, two oneDNN kernels: the 1x1 convolution writes the output and the depthwise stencil is added
   into it by a convolution with a "sum" post-op;
3. everywhere else (float64, CUDA, oneDNN disabled, inside ``torch.func`` transforms) plain ``F.conv2d``.

The input gradient reuses the forward (``P^T g + S^T g``). All paths are checked against the dense
reference ``conv_same(x, equivalent_dense_weight())`` in the tests.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .base import ConvOperator, check_positive_int
from .functional import adjoint_weight, conv_same, kernel_symbol, pad_same
from .spectral import batched_lapack, half_spectrum, max_hermitian_eigenvalue

STENCILS = ("cross", "full", "none")


# ---------------------------------------------------------------------------------------- primitives
def _onednn_conv(x: torch.Tensor, weight: torch.Tensor, padding: int, groups: int) -> torch.Tensor:
    """``conv2d(x, weight)`` by oneDNN directly (PyTorch may route a 1x1 convolution elsewhere)."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, None, [padding, padding], [1, 1], [1, 1], groups, "none", [], "")


def _onednn_conv_add_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding: int,
                      groups: int) -> torch.Tensor:
    """``out += conv2d(x, weight)`` in place: one oneDNN convolution with a "sum" post-op."""
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        out, x, weight, None, [padding, padding], [1, 1], [1, 1], groups, "add", None, None, [], None)


@functools.cache
def _onednn_works() -> bool:
    """Whether the two oneDNN entry points exist here and agree with ``F.conv2d``; probed once on tiny
    inputs, so a PyTorch without them (or with a changed signature) falls back cleanly."""
    if not hasattr(torch.ops.mkldnn, "_convolution_pointwise_") or not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    pointwise, stencil = torch.randn(4, 2, 1, 1, generator=gen), torch.randn(4, 1, 3, 3, generator=gen)
    try:
        out = _onednn_conv_add_(_onednn_conv(x, pointwise, 0, 2), x, stencil, 1, 4)
    except (RuntimeError, TypeError):
        return False
    expected = F.conv2d(x, pointwise, groups=2) + F.conv2d(x, stencil, padding=1, groups=4)
    return bool(torch.allclose(out, expected, rtol=1e-5, atol=1e-5))


def _use_fused(t: torch.Tensor) -> bool:
    """The oneDNN fast path applies to float32 CPU tensors with oneDNN enabled."""
    return (t.device.type == "cpu" and t.dtype == torch.float32 and torch.backends.mkldnn.enabled
            and _onednn_works())


def _fast_device(t: torch.Tensor) -> bool:
    """Float32 CPU tensors, where the compiled kernels or the oneDNN pair run."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and (native.available() or _use_fused(t))


def _fast_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last layout where a fast path will run (a no-op if it already is); unchanged
    elsewhere and inside ``torch.func`` transforms (``vmap`` has no memory formats)."""
    if _fast_device(x) and not torch._C._functorch.is_functorch_wrapped_tensor(x):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def stencil_as_kernel(stencil: torch.Tensor, taps: torch.Tensor, k: int) -> torch.Tensor:
    """The depthwise ``(m, 1, k, k)`` kernel of the stencil weights ``(m, ntaps)`` on the flat indices
    ``taps`` of the ``k x k`` square (zeros elsewhere)."""
    m = stencil.shape[0]
    return stencil.new_zeros(m, k * k).index_copy(1, taps, stencil).view(m, 1, k, k)


def lean_apply(x: torch.Tensor, pointwise: torch.Tensor, stencil: torch.Tensor, taps: torch.Tensor, k: int,
               boundary: str, groups: int) -> torch.Tensor:
    """``P x + S x`` without autograd bookkeeping of its own.

    ``pointwise`` is the 1x1 kernel ``(c_out, c_in/g, 1, 1)``; ``stencil`` ``(m, ntaps)`` holds the weights
    of the ``k x k`` stencil at the flat indices ``taps``, acting on channels ``j < m``:
    ``(S x)_j = s_j ⋆ x_j``. With channels-last float32 CPU input it runs the compiled kernel of
    ``operators.native``; without it, and if ``m = c_out``, two oneDNN kernels, the 1x1 convolution into a
    new channels-last tensor and the stencil added into it by a depthwise convolution with a "sum" post-op
    (the post-op costs the memory-bound stencil about 25%, the compute-bound 1x1 kernel about 60%, so this
    order); otherwise plain ``F.conv2d`` calls.
    """
    if native.applies(x, pointwise.shape[0], groups):
        return native.lean_forward(x, pointwise, stencil, taps, k, boundary == "circular", groups)
    m, r = stencil.shape[0], k // 2
    kernel = stencil_as_kernel(stencil, taps, k)
    head = x if m == x.shape[1] else x[:, :m]
    if m == pointwise.shape[0] and x.is_contiguous(memory_format=torch.channels_last) and _use_fused(x):
        out = _onednn_conv(x, pointwise, 0, groups)
        if boundary == "circular":
            head, r = pad_same(head, r, boundary).contiguous(memory_format=torch.channels_last), 0
        return _onednn_conv_add_(out, head, kernel, r, m)
    out = F.conv2d(x, pointwise, groups=groups)
    if m == out.shape[1]:
        return out + conv_same(head, kernel, boundary, groups=m)
    out.narrow(1, 0, m).add_(conv_same(head, kernel, boundary, groups=m))
    return out


def _conv_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, boundary: str,
                     groups: int) -> torch.Tensor:
    """``∂<grad_out, conv_same(x, W)>/∂W``: ``Σ_{b,n} grad_out[b, o, n] x[b, i, n + (p − r, q − r)]``."""
    r = weight.shape[-1] // 2
    if boundary == "circular":
        x, padding = pad_same(x, r, boundary), 0
    else:
        padding = r
    return torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, [1, 1], [padding, padding], [1, 1], False, [0, 0], groups,
        [False, True, False])[1]


def flipped_taps(taps: torch.Tensor, k: int) -> torch.Tensor:
    """The support of the flipped ``k x k`` stencil (the adjoint's): index ``p k + q`` goes to
    ``(k − 1 − p) k + (k − 1 − q) = k² − 1 − (p k + q)``."""
    return k * k - 1 - taps


class _LeanConvFunction(torch.autograd.Function):
    """``y = P x + S x`` with a hand-written backward and forward-mode derivative; the stencil enters as
    its weights ``(m, ntaps)`` on the flat indices ``taps`` of the ``k x k`` square.

    Backward: ``∂x = P^T g + S^T g`` (the same kernel with the transposed 1x1 and the same stencil weights
    on the flipped taps), ``∂P[o, i] = Σ g_o x_i``, ``∂s_j[t] = Σ g_j x_j(· + t)``: all three in one pass of the
    compiled kernel. Under ``create_graph`` the input gradient goes through this Function again and the weight
    gradients are differentiable convolutions, so double backward works.
    """

    @staticmethod
    def forward(x, pointwise, stencil, taps, k, boundary, groups):
        return lean_apply(x, pointwise, stencil, taps, k, boundary, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, pointwise, stencil, taps, k, boundary, groups = inputs
        ctx.save_for_backward(x, pointwise, stencil, taps)
        ctx.save_for_forward(x, pointwise, stencil, taps)
        ctx.k, ctx.boundary, ctx.groups = k, boundary, groups

    @staticmethod
    def backward(ctx, grad):
        x, pointwise, stencil, taps = ctx.saved_tensors
        k, groups = ctx.k, ctx.groups
        grad = _fast_layout(grad)
        wants_weights = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        if (wants_weights and not torch.is_grad_enabled() and native.applies(x, pointwise.shape[0], groups)
                and native.applies(grad, x.shape[1], groups)):
            gx, gp, gs = native.lean_backward(grad, x, pointwise, stencil, taps, k, ctx.boundary == "circular",
                                              groups, input_grad=ctx.needs_input_grad[0])
            return gx, gp, gs, None, None, None, None
        gx = gp = gs = None
        if ctx.needs_input_grad[0]:
            gx = _LeanConvFunction.apply(grad, adjoint_weight(pointwise, groups), stencil, flipped_taps(taps, k),
                                         k, ctx.boundary, groups)
        if wants_weights:
            m = stencil.shape[0]
            gp = _conv_weight_grad(grad, x, pointwise, "zeros", groups)
            kernel_grad = _conv_weight_grad(grad[:, :m], x[:, :m], stencil_as_kernel(stencil, taps, k),
                                            ctx.boundary, m)
            gs = kernel_grad.view(m, k * k).index_select(1, taps)
        return gx, gp, gs, None, None, None, None

    @staticmethod
    def jvp(ctx, tx, tp, ts, _taps, _k, _boundary, _groups):
        x, pointwise, stencil, taps = ctx.saved_tensors
        tx = torch.zeros_like(x) if tx is None else tx
        tp = torch.zeros_like(pointwise) if tp is None else tp
        ts = torch.zeros_like(stencil) if ts is None else ts
        args = (taps, ctx.k, ctx.boundary, ctx.groups)
        return lean_apply(tx, pointwise, stencil, *args) + lean_apply(x, tp, ts, *args)

    @staticmethod
    def vmap(info, in_dims, x, pointwise, stencil, taps, k, boundary, groups):
        """``torch.func.vmap``: a mapped input alone joins the batch axis (one call); mapped weights are
        applied one slice at a time."""
        x_dim, p_dim, s_dim = in_dims[:3]
        rest = (taps, k, boundary, groups)
        if p_dim is None and s_dim is None:
            x = x.movedim(x_dim, 0)
            y = _LeanConvFunction.apply(x.flatten(0, 1), pointwise, stencil, *rest)
            return y.unflatten(0, x.shape[:2]), 0

        def slice_(t, dim, i):
            return t if dim is None else t.select(dim, i)

        return torch.stack([_LeanConvFunction.apply(slice_(x, x_dim, i), slice_(pointwise, p_dim, i),
                                                    slice_(stencil, s_dim, i), *rest)
                            for i in range(info.batch_size)]), 0


class _LeanConvMomentsFunction(_LeanConvFunction):
    """``(y, moments)`` with ``y = P x + S x`` and its per-channel moments about ``shift`` from the compiled
    kernel tile by tile (``native.lean_forward``); the moments are not differentiable, ``y``'s backward is
    ``_LeanConvFunction``'s."""

    @staticmethod
    def forward(x, pointwise, stencil, taps, k, boundary, groups, shift):
        return native.lean_forward(x, pointwise, stencil, taps, k, boundary == "circular", groups,
                                   moments_about=shift)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _LeanConvFunction.setup_context(ctx, inputs[:-1], output[0])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad, _moments_grad):
        return _LeanConvFunction.backward(ctx, grad) + (None,)


def _lean(x, pointwise, stencil, taps: torch.Tensor, k: int, boundary: str, groups: int) -> torch.Tensor:
    """``P x + S x``: through ``_LeanConvFunction`` where autograd (reverse or forward mode) or ``torch.func``
    may differentiate it, directly otherwise (inference: the Function's bookkeeping is a large share of a
    batch-1 call)."""
    if (torch.is_grad_enabled() or torch.autograd.forward_ad._current_level >= 0
            or torch._C._functorch.is_functorch_wrapped_tensor(x)):
        return _LeanConvFunction.apply(x, pointwise, stencil, taps, k, boundary, groups)
    return lean_apply(x, pointwise, stencil, taps, k, boundary, groups)


# ---------------------------------------------------------------------------------------- the operator
class LeanConv(ConvOperator):
    """Lean convolution ``K = P + S`` (LeanConvNets).

    Notes
    -----
    ``P`` is a 1x1 convolution coupling the channels in ``groups`` groups (``c_in/g -> c_out/g`` each;
    weight ``pointwise`` of shape ``(c_out, c_in/g)``), ``S`` a depthwise ``k x k`` stencil per channel:
    ``(K x)_o = Σ_i P[o, i] x_i + s_o ⋆ x_o``. If ``c_in ≠ c_out`` the stencil acts on the channels
    ``j < m = min(c_in, c_out)`` only (output ``j`` gets ``s_j ⋆ x_j``; the others get ``P x`` alone).

    ``stencil``: ``"cross"`` (the centre and the arms of the ``k x k`` square: 5 points for ``k = 3``),
    ``"full"`` (all ``k²`` points) or ``"none"`` (``K = P``). Its weights are the parameter ``stencil`` of
    shape ``(m, points)``, listed in row-major order of the ``k x k`` kernel (for the 3x3 cross: north,
    west, centre, east, south). Parameters: ``c_out c_in/g + points · m`` (``c²/g + 5c`` for the cross).

    Symbol: ``K̂(ω) = P + diag(ŝ_j(ω))`` (``P`` block-diagonal for groups), with ``ŝ_j`` the scalar symbol
    of channel ``j``'s stencil; ``K^T = P^T + S^T`` with the stencils flipped.

    Multiply-adds per pixel: ``c_out c_in/g + k² m``; PyTorch's convolutions run the stencil as a ``k x k``
    depthwise kernel (the cross with zero corners), so that is what they execute and what is counted (the
    compiled kernel skips the zero taps: ``c_out c_in/g + points · m``). On CPU in float32 the compiled
    kernel and the oneDNN pair are calls that PyTorch's FLOP counter does not see; ``uncounted_flops``
    reports them.

    Memory format: on CPU in float32 the input is converted to channels-last (free if it already is) and
    the output is channels-last, as ``nn.Conv2d`` returns with a channels-last weight; a network that keeps
    channels-last pays no conversion. Elsewhere the output follows ``F.conv2d``'s choice.

    Initialisation as ``nn.Conv2d``: every weight uniform in ``±1/√fan_in`` with
    ``fan_in = c_in/g + points`` (the number of terms summed into one output).
    """

    kind = "lean"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, boundary: str = "zeros",
                 stencil: str = "cross", groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, boundary)
        if not isinstance(stencil, str) or stencil not in STENCILS:
            raise ValueError(f"unknown stencil {stencil!r}; expected one of {STENCILS}")
        self.groups = check_positive_int("groups", groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        self.stencil_type = stencil
        k = self.kernel_size
        self.pointwise = nn.Parameter(torch.empty(out_channels, in_channels // groups))
        if stencil == "none":
            self.register_parameter("stencil", None)
            self.register_buffer("stencil_index", None)
            points = 0
        else:
            r = k // 2
            grid = torch.arange(k * k)
            index = grid if stencil == "full" else grid[(grid // k == r) | (grid % k == r)]
            points = index.numel()
            self.register_buffer("stencil_index", index, persistent=False)
            self.stencil = nn.Parameter(torch.empty(min(in_channels, out_channels), points))
        bound = 1.0 / math.sqrt(in_channels // groups + points)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    # ------------------------------------------------------------------ kernels in standard form
    def pointwise_kernel(self) -> torch.Tensor:
        """The 1x1 kernel ``(c_out, c_in/g, 1, 1)`` of ``P``."""
        return self.pointwise[:, :, None, None]

    def stencil_kernel(self) -> torch.Tensor | None:
        """The depthwise kernel ``(m, 1, k, k)`` of ``S`` (zeros off the stencil), or ``None``."""
        if self.stencil is None:
            return None
        return stencil_as_kernel(self.stencil, self.stencil_index, self.kernel_size)

    def pointwise_matrix(self) -> torch.Tensor:
        """``P`` as a dense ``(c_out, c_in)`` matrix (block-diagonal over the groups)."""
        return torch.block_diag(*self.pointwise.view(self.groups, -1, self.in_channels // self.groups))

    def equivalent_dense_weight(self) -> torch.Tensor:
        """The ``(c_out, c_in, k, k)`` kernel of the same operator as a dense convolution (the reference)."""
        k, r = self.kernel_size, self.kernel_size // 2
        w = self.pointwise_matrix().new_zeros(self.out_channels, self.in_channels, k, k)
        w[:, :, r, r] = self.pointwise_matrix()
        s = self.stencil_kernel()
        if s is not None:
            m = s.shape[0]
            w[torch.arange(m), torch.arange(m)] += s[:, 0]
        return w

    def forward_with_moments(self, x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K x, moments)``: the output ``y`` (B, c_out, n1, n2) and its moments about ``shift`` (c_out,),
        float64 (2, c_out): ``[0, j] = Σ (y_j − shift_j)``, ``[1, j] = Σ (y_j − shift_j)²`` over the batch and
        the pixels, not differentiable. The compiled kernel sums them as it writes ``y`` (batch norm's
        statistics without a pass of their own) where it runs and autograd records plainly (no forward-mode AD
        or ``torch.func``); elsewhere they are computed from ``y``. Module hooks are not called."""
        self._check_input(x, self.in_channels, "forward")
        if shift.shape != (self.out_channels,):
            raise ValueError(f"shift must have shape ({self.out_channels},), got {tuple(shift.shape)}")
        x = _fast_layout(x)
        if (self.stencil is not None and native.applies(x, self.out_channels, self.groups)
                and torch.autograd.forward_ad._current_level < 0
                and not torch._C._functorch.is_functorch_wrapped_tensor(x)):
            return _LeanConvMomentsFunction.apply(x, self.pointwise_kernel(), self.stencil, self.stencil_index,
                                                  self.kernel_size, self.boundary, self.groups, shift)
        y = self._forward(x)
        e = y.detach().double() - shift.detach().double()[:, None, None]
        return y, torch.stack([e.sum((0, 2, 3)), e.square().sum((0, 2, 3))])

    # ------------------------------------------------------------------ operator hooks
    def _forward(self, x):
        x = _fast_layout(x)
        if self.stencil is None:
            return F.conv2d(x, self.pointwise_kernel(), groups=self.groups)
        return _lean(x, self.pointwise_kernel(), self.stencil, self.stencil_index, self.kernel_size,
                     self.boundary, self.groups)

    def _adjoint(self, y):
        y = _fast_layout(y)
        pt = adjoint_weight(self.pointwise_kernel(), self.groups)
        if self.stencil is None:
            return F.conv2d(y, pt, groups=self.groups)
        taps = flipped_taps(self.stencil_index, self.kernel_size)
        return _lean(y, pt, self.stencil, taps, self.kernel_size, self.boundary, self.groups)

    def _symbol(self, n1, n2):
        p = self.pointwise_matrix()
        cdtype = torch.complex128 if p.dtype == torch.float64 else torch.complex64
        sym = p.to(cdtype).expand(n1, n2, -1, -1).clone()
        s = self.stencil_kernel()
        if s is not None:
            sym.diagonal(dim1=-2, dim2=-1)[..., : s.shape[0]] += kernel_symbol(s, n1, n2)[..., 0]
        return sym

    def _gram(self, n1: int, n2: int):
        """Hermitian Gram matrices of the symbol's blocks, built in ``O(c²)`` per frequency.

        ``A(ω) = P + D(ω)``, ``D = diag(ŝ_j(ω))``: ``A^H A = P^T P + P^T D + D^H P + |D|²`` with ``P^T P``
        computed once and ``(P^T D)[i, j] = P[j, i] ŝ_j``. With square groups ``A`` is block-diagonal and
        each ``(c/g) x (c/g)`` block is its own item; ``‖A‖ = ‖A^T‖`` lets every block be taken on its
        smaller side. Returns ``(g, size, build)``: ``build(freq, block)`` gives the complex Gram matrices
        ``(len(freq), size, size)`` at flat frequency indices ``m1 n2 + m2`` and block indices ``< g``.
        """
        g = self.groups
        if g > 1 and self.in_channels == self.out_channels:
            blocks = self.pointwise.detach().view(g, -1, self.in_channels // g)
        else:
            blocks, g = self.pointwise_matrix().detach()[None], 1
        if blocks.shape[-2] < blocks.shape[-1]:
            blocks = blocks.transpose(-1, -2)
        size = blocks.shape[-1]  # the stencil covers the smaller side: min(c_in, c_out) = g * size
        cdtype = torch.complex128 if blocks.dtype == torch.float64 else torch.complex64
        gram0 = (blocks.transpose(-1, -2) @ blocks).to(cdtype)
        s = self.stencil_kernel()
        if s is None:
            return g, size, lambda freq, block: gram0[block]
        s_hat = kernel_symbol(s.detach(), n1, n2)[..., 0].reshape(n1 * n2, g, size)
        pt = blocks[:, :size, :].transpose(-1, -2).to(cdtype)

        def build(freq, block):
            d = s_hat[freq, block]  # (F, size)
            cross = pt[block] * d[:, None, :]
            gram = gram0[block] + cross + cross.mH
            gram.diagonal(dim1=-2, dim2=-1).add_(d.abs().square())
            return gram

        return g, size, build

    def _symbol_norms(self, n1, n2):
        """``‖K̂(ω)‖₂`` at every frequency: the largest eigenvalue of each structured Gram matrix."""
        g, size, build = self._gram(n1, n2)
        cells = n1 * n2 if self.stencil is not None else 1  # without a stencil the symbol is constant
        items = torch.arange(cells * g, device=self.pointwise.device)
        top = torch.cat([batched_lapack(lambda m: torch.linalg.eigvalsh(m)[:, -1], build(i // g, i % g))
                         for i in items.split(max(1, 2 ** 22 // (size * size)))])
        return top.clamp(min=0).sqrt().reshape(cells, g).amax(-1).expand(n1 * n2).reshape(n1, n2)

    def _max_symbol_norm(self, n1, n2):
        """``max_ω ‖K̂(ω)‖₂`` exactly: the certified search of ``operators.spectral`` on the structured Gram
        matrices, over half the frequencies (``K̂(−ω) = conj K̂(ω)`` for real weights)."""
        g, size, build = self._gram(n1, n2)
        m1, m2, _ = half_spectrum(n1, n2, device=self.pointwise.device)
        freq = m1 * n2 + m2 if self.stencil is not None else m1[:1]
        lam = max_hermitian_eigenvalue(lambda i: build(freq[i // g], i % g), len(freq) * g, size,
                                       self.pointwise.device)
        return math.sqrt(max(lam, 0.0))

    def macs_per_pixel(self):
        macs = self.out_channels * self.in_channels // self.groups
        if self.stencil is not None:
            macs += self.kernel_size ** 2 * self.stencil.shape[0]
        return macs

    def uncounted_flops(self, input_shape) -> int:
        """FLOPs of ``forward`` that PyTorch's FLOP counter does not see: all of them when the forward runs
        the compiled kernel or the direct oneDNN calls (CPU, float32; for oneDNN a stencil on every output
        channel), else 0."""
        p, s = self.pointwise, self.stencil
        if s is None:
            return 0
        if native.supports(p, self.out_channels, self.groups):
            return self.flops(input_shape)
        return self.flops(input_shape) if len(s) == self.out_channels and _use_fused(p) else 0

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stencil={self.stencil_type!r}, groups={self.groups}"
