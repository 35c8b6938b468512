"""The lean operator of LeanConvNets: ``K = P + S``, a 1x1 channel coupling plus a per-channel stencil.

``K x`` runs through the registered operator ``torch.ops.pdenet.lean_conv`` (``pdenet_kernels``): on the CPU in
float32 a compiled kernel computes ``P x + S x`` in one pass over channels-last ``x`` and ``y`` (the 1x1 coupling
and the stencil taps accumulate in registers before one store), and its backward both weight gradients and the
input gradient in one pass; elsewhere two ``F.conv2d`` calls. The operator carries its fake implementation,
autograd and FLOP formulas, so ``torch.compile``, ``torch.export``, autocast, ``torch.func`` and PyTorch's FLOP
counter see it. The adjoint is the same operator with ``P^T`` and the flipped stencil. A strided operator
(``stride=s``) runs as two ``F.conv2d`` calls with stride ``s``. All paths are checked against the dense reference
``F.conv2d(x, equivalent_dense_weight(), stride=s, padding=k // 2)`` in the tests.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pdenet_kernels import lean_conv, stencil_as_kernel
from pdenet_kernels.ops import adjoint_coupling, flipped_taps

from .base import ConvOperator, check_positive_int
from .functional import kernel_symbol
from .spectral import batched_lapack, half_spectrum, max_hermitian_eigenvalue

STENCILS = ("cross", "full", "none")


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
    depthwise kernel (the cross with zero corners), so that is what they execute and what is counted, by
    ``flops`` and by the registered operator's FLOP formula that PyTorch's counter uses (the compiled kernel
    skips the zero taps: ``c_out c_in/g + points · m``).

    Stride ``s`` (``stride=s``): ``K_s x = P x[..., ::s, ::s] + S_s x``, ``S_s`` the depthwise stencil
    correlation with stride ``s`` and padding ``k // 2`` (zeros, or periodic padding first): the coupling and the
    stencil evaluated on the coarse grid only, ``ceil(n/s)`` pixels per axis, as
    ``nn.Conv2d(k, stride=s, padding=k // 2)``; equal to ``F.conv2d(x, equivalent_dense_weight(), stride=s,
    padding=k // 2)``. Its adjoint is the transposed convolution, its symbol the polyphase symbol of
    ``operators.base.polyphase_symbol`` (``(n1/s, n2/s, c_out, s² c_in)``), its multiply-adds per output pixel
    those of stride 1.

    Memory format: where the compiled kernel runs (CPU, float32, stride 1) the output is channels-last, as
    ``nn.Conv2d`` returns with a channels-last weight; a network that keeps channels-last pays no conversion.
    Elsewhere the output follows ``F.conv2d``'s choice. (``operators.LeanConv2d`` returns the input's format.)

    Initialisation as ``nn.Conv2d``: every weight uniform in ``±1/√fan_in`` with
    ``fan_in = c_in/g + points`` (the number of terms summed into one output).
    """

    kind = "lean"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, boundary: str = "zeros",
                 stencil: str = "cross", groups: int = 1, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, boundary, stride)
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
        else:
            r = k // 2
            grid = torch.arange(k * k)
            index = grid if stencil == "full" else grid[(grid // k == r) | (grid % k == r)]
            self.register_buffer("stencil_index", index, persistent=False)
            self.stencil = nn.Parameter(torch.empty(min(in_channels, out_channels), index.numel()))
        self.reset_parameters()

    @property
    def fan_in(self) -> int:
        """The number of terms summed into one output: ``c_in/g + points``."""
        points = 0 if self.stencil is None else self.stencil.shape[1]
        return self.in_channels // self.groups + points

    def reset_parameters(self) -> None:
        """Every weight uniform in ``±1/√fan_in`` (``nn.Conv2d``'s default rule with the lean ``fan_in``)."""
        bound = 1.0 / math.sqrt(self.fan_in)
        with torch.no_grad():
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
        """The ``(c_out, c_in, k, k)`` kernel of the same operator as a dense convolution (the reference):
        ``W[:, :, r, r] = P`` plus ``W[j, j] = s_j`` for ``j < m``; ``K_s x = F.conv2d(x, W, stride=s,
        padding=r)`` for the zero boundary."""
        k, r = self.kernel_size, self.kernel_size // 2
        w = self.pointwise_matrix().new_zeros(self.out_channels, self.in_channels, k, k)
        w[:, :, r, r] = self.pointwise_matrix()
        s = self.stencil_kernel()
        if s is not None:
            m = s.shape[0]
            w[torch.arange(m), torch.arange(m)] += s[:, 0]
        return w

    # ------------------------------------------------------------------ operator hooks
    def _forward(self, x):
        if self.stride > 1:
            r = self.kernel_size // 2
            return self._two_convolutions(x, (r, r))
        if self.stencil is None:
            return F.conv2d(x, self.pointwise_kernel().to(x.dtype), groups=self.groups)
        return lean_conv(x, self.pointwise, self.stencil, self.stencil_index, self.kernel_size,
                         self.boundary == "circular", self.groups)

    def padded_forward(self, x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
        """``nn.Conv2d``'s arithmetic with the equivalent kernel ``W`` and another padding ``(p1, p2)``.

        ``F.conv2d(x, W, stride=s, padding=(p1, p2))`` for the zero boundary; for the circular one ``x`` is first
        padded periodically by ``(p1, p2)`` and the correlation takes no padding (``padding_mode="circular"``).
        ``padding = (k // 2, k // 2)`` is ``forward``; any other runs as two convolutions: the coupling ``P`` on
        the pixels under the kernel centres, the stencil depthwise with that padding.
        """
        self._check_input(x, self.in_channels, "padded_forward")
        p1, p2 = (int(p) for p in padding)
        if min(p1, p2) < 0:
            raise ValueError(f"padding must be non-negative, got {(p1, p2)}")
        r = self.kernel_size // 2
        return self._forward(x) if (p1, p2) == (r, r) else self._two_convolutions(x, (p1, p2))

    def _two_convolutions(self, x, padding):
        """``P`` and ``S`` as two strided ``F.conv2d`` calls, ``nn.Conv2d``'s padding ``(p1, p2)``."""
        (p1, p2), r, s = padding, self.kernel_size // 2, self.stride
        if self.boundary == "circular":
            x = F.pad(x, (p2, p2, p1, p1), mode="circular")
            p1 = p2 = 0
        centres = x if (p1, p2) == (r, r) else F.pad(x, (p2 - r, p2 - r, p1 - r, p1 - r))  # negative: crops
        out = F.conv2d(centres, self.pointwise_kernel().to(x.dtype), stride=s, groups=self.groups)
        kernel = self.stencil_kernel()
        if kernel is None:
            return out
        m = kernel.shape[0]
        smooth = F.conv2d(x[:, :m], kernel.to(x.dtype), stride=s, padding=(p1, p2), groups=m)
        if m == out.shape[1]:
            return out + smooth
        return torch.cat([out[:, :m] + smooth, out[:, m:]], 1)

    def _adjoint(self, y):
        pt = adjoint_coupling(self.pointwise, self.groups)
        if self.stencil is None:
            return F.conv2d(y, pt[:, :, None, None].to(y.dtype), groups=self.groups)
        taps = flipped_taps(self.stencil_index, self.kernel_size)
        return lean_conv(y, pt, self.stencil, taps, self.kernel_size, self.boundary == "circular", self.groups)

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

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stencil={self.stencil_type!r}, groups={self.groups}"
