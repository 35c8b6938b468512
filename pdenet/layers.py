"""The right-hand sides ``F(Y)`` of the time-stepping blocks.

- :class:`SymmetricLayer`: ``F(Y) = −K^T σ(N(K Y + b))`` (``K: c -> m``). Its Jacobian ``−K^T D K``
  (``D = diag(σ' N')``) is symmetric negative semi-definite when ``0 ≤ D ≤ g``; eigenvalues lie in
  ``[−g ‖K‖², 0]``.
- :class:`GeneralLayer`: ``F(Y) = K₂ σ(N(K₁ Y + b))`` (``K₁: c -> m``, ``K₂: m -> c``); Jacobian ``K₂ D K₁``,
  no sign structure.
- :class:`AntisymmetricLayer`: ``F(Y) = σ(N((K − Kᵀ − γI) Y + b))`` (``K: c -> c``); the linear part has
  eigenvalues ``−γ + iμ`` with ``|μ| ≤ ‖K − Kᵀ‖``.

``σ`` is chosen by name from :data:`ACTIVATIONS` (each with the supremum of its slope) and ``N`` from
:mod:`pdenet.normalization`. ``slope()`` returns ``g``, the bound on ``D`` used by the step bounds, or
``None`` when the normalization admits none.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from operators import ConvOperator

from .normalization import make_normalization


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _sigmoid_slope(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s)


#: name -> (σ, sup σ'); every σ here is monotone, so σ' ∈ [0, sup σ'].
ACTIVATIONS = {
    "relu": (F.relu, 1.0),
    "tanh": (torch.tanh, 1.0),
    "sigmoid": (torch.sigmoid, 0.25),
    "identity": (_identity, 1.0),
}
#: name -> σ' (the slope at each entry; ReLU's is taken as 0 at 0).
SLOPES = {
    "relu": lambda x: (x > 0).to(x.dtype),
    "tanh": lambda x: 1 - torch.tanh(x) ** 2,
    "sigmoid": _sigmoid_slope,
    "identity": torch.ones_like,
}


def _check_operator(op, what: str) -> ConvOperator:
    if not isinstance(op, ConvOperator):
        raise TypeError(f"{what} must be an operators.ConvOperator, got {type(op).__name__}")
    return op


class _Layer(nn.Module):
    """Shared part ``σ(N(K Y + b))`` with ``K = self.inner`` (``c -> m``)."""

    def __init__(self, inner: ConvOperator, activation: str, normalization: str, bias: bool):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {tuple(ACTIVATIONS)}")
        self.activation = activation
        self._sigma, self._max_slope = ACTIVATIONS[activation]
        self.norm = make_normalization(normalization, inner.out_channels)
        self.bias = nn.Parameter(torch.zeros(inner.out_channels)) if bias else None

    def _hidden(self, op: ConvOperator, y: torch.Tensor) -> torch.Tensor:
        z = op(y)
        if self.bias is not None:
            z = z + self.bias.view(1, -1, 1, 1)
        return self._sigma(self.norm(z))

    def slope(self) -> float | None:
        """``g`` with ``0 ≤ σ'(·) N'(·) ≤ g`` (``N`` linearized at inference), or ``None`` if unknown."""
        gain = self.norm.gain()
        return None if gain is None else self._max_slope * gain


class SymmetricLayer(_Layer):
    """``F(Y) = −K^T σ(N(K Y + b))``: ``(B, c, n1, n2) -> (B, c, n1, n2)`` with ``K: c -> m``."""

    def __init__(self, op: ConvOperator, activation: str = "relu", normalization: str = "none", bias: bool = True):
        op = _check_operator(op, "SymmetricLayer operator")
        super().__init__(op, activation, normalization, bias)
        self.op = op

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return -self.op.adjoint(self._hidden(self.op, y))

    def jacobian_at(self, y: torch.Tensor):
        """``v ↦ (∂F/∂Y at y) v = −Kᵀ(D ⊙ K v)``, ``D = σ'(K y + b)``, for ``N`` the identity: the symmetric
        negative semi-definite Jacobian as a function, built from operator applications only (no autograd)."""
        if self.norm.kind != "none":
            raise ValueError(f"jacobian_at needs normalization 'none', not {self.norm.kind!r}")
        z = self.op(y)
        if self.bias is not None:
            z = z + self.bias.view(1, -1, 1, 1)
        d = SLOPES[self.activation](z)
        return lambda v: -self.op.adjoint(d * self.op(v))

    def operators(self) -> list[ConvOperator]:
        return [self.op]


class GeneralLayer(_Layer):
    """``F(Y) = K₂ σ(N(K₁ Y + b))``: ``(B, c, n1, n2) -> (B, c, n1, n2)`` with ``K₁: c -> m``, ``K₂: m -> c``."""

    def __init__(self, op1: ConvOperator, op2: ConvOperator, activation: str = "relu",
                 normalization: str = "none", bias: bool = True):
        op1 = _check_operator(op1, "GeneralLayer op1")
        op2 = _check_operator(op2, "GeneralLayer op2")
        if op2.in_channels != op1.out_channels or op2.out_channels != op1.in_channels:
            raise ValueError(
                f"GeneralLayer needs K₁: c -> m and K₂: m -> c; got K₁: {op1.in_channels} -> {op1.out_channels}, "
                f"K₂: {op2.in_channels} -> {op2.out_channels}"
            )
        super().__init__(op1, activation, normalization, bias)
        self.op1 = op1
        self.op2 = op2

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.op2(self._hidden(self.op1, y))

    def operators(self) -> list[ConvOperator]:
        return [self.op1, self.op2]


class AntisymmetricLayer(_Layer):
    """``F(Y) = σ(N((K − Kᵀ − γI) Y + b))`` (Haber and Ruthotto, "Stable architectures for deep neural networks").

    Notes
    -----
    ``K: c -> c`` is any operator kind and ``Kᵀ`` its exact adjoint, so ``A = K − Kᵀ`` is antisymmetric:
    ``Aᵀ = −A`` and its eigenvalues are ``iμ`` with ``|μ| ≤ ‖A‖``. The linear part ``A − γI`` has eigenvalues
    ``−γ + iμ``; linearized at ``D = g I`` (``σ'·N' = g``), forward Euler ``Y ← Y + h F(Y)`` amplifies mode ``μ``
    by ``|1 + hg(−γ + iμ)|``, at most 1 for ``h ≤ 2γ / (g(γ² + ‖A‖²))``. ``γ ≥ 0`` is a fixed damping.
    Shapes: ``(B, c, n1, n2) -> (B, c, n1, n2)``.
    """

    def __init__(self, op: ConvOperator, gamma: float = 0.5, activation: str = "relu", normalization: str = "none",
                 bias: bool = True):
        op = _check_operator(op, "AntisymmetricLayer operator")
        if op.in_channels != op.out_channels:
            raise ValueError(f"AntisymmetricLayer needs a square operator K: c -> c (K − Kᵀ must be defined), got "
                             f"{op.in_channels} -> {op.out_channels}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 0 or gamma == float("inf"):
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
        super().__init__(op, activation, normalization, bias)
        self.op = op
        self.gamma = float(gamma)

    def linear_part(self, y: torch.Tensor) -> torch.Tensor:
        """``(K − Kᵀ − γI) Y``."""
        return self.op(y) - self.op.adjoint(y) - self.gamma * y

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        z = self.linear_part(y)
        if self.bias is not None:
            z = z + self.bias.view(1, -1, 1, 1)
        return self._sigma(self.norm(z))

    @torch.no_grad()
    def antisymmetric_operator(self) -> ConvOperator:
        """``A = K − Kᵀ`` as a dense operator of the same stencil and boundary (a copy for analysis: the adjoint
        of a same-size convolution is the convolution with the flipped, transposed kernel ``W[i, o, −p, −q]``)."""
        from operators import DenseConv

        w = self.op.equivalent_dense_weight()
        a = DenseConv(self.op.in_channels, self.op.in_channels, w.shape[-1], self.op.boundary).to(w)
        a.weight.copy_(w - w.flip(-1, -2).transpose(0, 1))
        return a

    def operators(self) -> list[ConvOperator]:
        return [self.op]

    def extra_repr(self) -> str:
        return f"gamma={self.gamma:g}"
