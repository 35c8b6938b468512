"""``LeanConv2d``: a drop-in for ``nn.Conv2d`` whose kernel is lean, ``W = P δ + S`` (LeanConvNets)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .base import Grid, check_positive_int
from .lean import LeanConv

#: the padding modes ``nn.Conv2d`` takes, and those a lean convolution can represent
CONV2D_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
LEAN_PADDING_MODES = ("zeros", "circular")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _pair(name: str, value) -> tuple[int, int]:
    """``3 -> (3, 3)`` and ``(3, 3) -> (3, 3)``, as ``nn.Conv2d`` reads its size arguments."""
    pair = (value, value) if _is_int(value) else tuple(value) if isinstance(value, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(_is_int(v) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def _output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """Channels-last for a channels-last input, else NCHW (also where both layouts coincide)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class LeanConv2d(nn.Module):
    """``nn.Conv2d`` with a lean kernel: the same constructor and arithmetic, ``c²/g + 5c`` weights instead of ``9c²``.

    Notes
    -----
    The kernel is ``W[o, i] = P[o, i] δ + [o = i < m] s_o`` (``δ`` the ``k x k`` centre tap, ``s_o`` channel
    ``o``'s stencil: ``"cross"``, ``"full"`` or ``"none"``, ``m = min(c_in, c_out)``), the kernel of the lean
    operator ``K = P + S`` held as ``self.operator`` (an :class:`operators.LeanConv` with this stride and the
    boundary of ``padding_mode``). ``forward(x)`` equals ``F.conv2d(x, self.weight, self.bias, stride, padding, 1,
    groups)`` (after ``nn.Conv2d``'s periodic pad for ``padding_mode="circular"``) and runs as the lean operator:
    with padding ``k // 2``, ``K_s x + b`` (the compiled kernel at stride 1, float32 on the CPU), any other padding
    as two convolutions (``LeanConv.padded_forward``). ``groups`` are those of the coupling ``P``.

    ``weight`` is the equivalent ``(c_out, c_in/g, k, k)`` kernel computed from the lean parameters
    ``operator.pointwise`` and ``operator.stencil``; it is not a Parameter, so writing into it changes nothing:
    initialisers target ``operator.pointwise`` and ``operator.stencil``, or call ``reset_parameters()`` (every weight
    and the bias uniform in ``±1/√fan_in``, ``fan_in = c_in/g + points``). ``bias`` is a Parameter or ``None``, as
    in ``nn.Conv2d``. The analysis methods (``symbol``, ``singular_values``, ``spectral_norm``,
    ``equivalent_dense_weight``) are the operator's: the linear part of the layer for padding ``k // 2``.

    The output has the input's memory format (NCHW in, NCHW out; channels-last in, channels-last out).

    ``ValueError`` where ``nn.Conv2d`` raises one, and for what a lean kernel cannot represent: dilation other
    than 1, even or non-square kernels, different strides per axis, ``padding_mode`` ``"reflect"`` or
    ``"replicate"``, ``groups > 1`` with ``in_channels ≠ out_channels`` (the stencil joins input ``j`` to output
    ``j``, which then lie in different groups).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 stencil: str = "cross"):
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_positive_int("out_channels", out_channels)
        kernel, strides, dilations = _pair("kernel_size", kernel_size), _pair("stride", stride), _pair("dilation",
                                                                                                      dilation)
        # what nn.Conv2d rejects
        check_positive_int("groups", groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must be divisible by "
                             f"groups={groups}")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"invalid padding string {padding!r}; expected 'same', 'valid' or an int or pair")
            if padding == "same" and strides != (1, 1):
                raise ValueError(f"padding='same' is not supported for strided convolutions (stride {strides})")
        else:
            padding = _pair("padding", padding)
        if padding_mode not in CONV2D_PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {CONV2D_PADDING_MODES}, got {padding_mode!r}")
        # what a lean kernel cannot represent
        if kernel[0] != kernel[1]:
            raise ValueError(f"kernel_size {kernel}: a lean kernel is square (k x k)")
        if kernel[0] < 1 or kernel[0] % 2 == 0:
            raise ValueError(f"kernel_size {kernel}: a lean stencil needs an odd size (1, 3, 5, ...)")
        if dilations != (1, 1):
            raise ValueError(f"dilation {dilations}: lean convolutions take dilation 1")
        if strides[0] != strides[1]:
            raise ValueError(f"stride {strides}: lean convolutions take the same stride on both axes")
        if strides[0] < 1:
            raise ValueError(f"stride must be positive, got {strides}")
        if not isinstance(padding, str) and min(padding) < 0:
            raise ValueError(f"padding must be non-negative, got {padding}")
        if padding_mode not in LEAN_PADDING_MODES:
            raise ValueError(f"padding_mode {padding_mode!r}: lean convolutions take {LEAN_PADDING_MODES}")
        if groups > 1 and in_channels != out_channels:
            raise ValueError(f"groups={groups} with in_channels={in_channels} != out_channels={out_channels}: the "
                             "stencil joins input channel j to output channel j, which then lie in different groups")

        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding, self.dilation = kernel, strides, padding, dilations
        self.padding_mode, self.stencil_type = padding_mode, stencil
        r = kernel[0] // 2
        self._padding = {"same": (r, r), "valid": (0, 0)}[padding] if isinstance(padding, str) else padding
        boundary = "circular" if padding_mode == "circular" else "zeros"
        self.operator = LeanConv(in_channels, out_channels, kernel[0], boundary, stencil=stencil, groups=groups,
                                 stride=strides[0])
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        """The operator's weights and the bias uniform in ``±1/√fan_in``, ``fan_in = c_in/g + points``."""
        self.operator.reset_parameters()
        if self.bias is not None:
            bound = self.operator.fan_in ** -0.5
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def weight(self) -> torch.Tensor:
        """The equivalent ``nn.Conv2d`` kernel ``(c_out, c_in/g, k, k)``, computed from the lean parameters."""
        w = self.operator.equivalent_dense_weight()
        g = self.groups
        if g == 1:
            return w
        c_out, c_in, k, _ = w.shape  # block-diagonal over the groups: keep the diagonal blocks
        blocks = w.view(g, c_out // g, g, c_in // g, k, k).diagonal(dim1=0, dim2=2)
        return blocks.permute(4, 0, 1, 2, 3).reshape(c_out, c_in // g, k, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F.conv2d(x, weight, bias, stride, padding, 1, groups)``, by the lean operator; the input's layout.

        ``x`` is ``(B, c_in, n1, n2)``, or ``(c_in, n1, n2)`` unbatched, as for ``nn.Conv2d``."""
        if isinstance(x, torch.Tensor) and x.dim() == 3:
            return self.forward(x[None])[0]
        out = self.operator.padded_forward(x, self._padding).contiguous(memory_format=_output_memory_format(x))
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)

    # ------------------------------------------------------------------ the operator's analysis
    def equivalent_dense_weight(self) -> torch.Tensor:
        """The operator's full ``(c_out, c_in, k, k)`` kernel (``weight`` is its grouped layout)."""
        return self.operator.equivalent_dense_weight()

    def symbol(self, grid: Grid) -> torch.Tensor:
        """The operator's symbol on a periodic grid (polyphase for a stride): ``LeanConv.symbol``."""
        return self.operator.symbol(grid)

    def singular_values(self, grid: Grid) -> torch.Tensor:
        """The operator's singular values on a periodic grid: ``LeanConv.singular_values``."""
        return self.operator.singular_values(grid)

    def spectral_norm(self, grid: Grid | None = None, method: str = "symbol", **options) -> float:
        """The operator's ``‖K_s‖₂`` (exact, bound or Lanczos): ``LeanConv.spectral_norm``."""
        return self.operator.spectral_norm(grid, method, **options)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + f", stencil={self.stencil_type!r}"
