"""Jacobian spectra and perturbation growth, matrix-free.

- :func:`jacobian_operator`: the Jacobian ``J = ∂f/∂x`` at ``x`` as a ``scipy.sparse.linalg.LinearOperator``
  (``matvec`` a Jacobian-vector product by ``torch.func.jvp``, ``rmatvec`` a vector-Jacobian product by
  ``torch.func.vjp``); no dense Jacobian is ever formed.
- :func:`jacobian_eigenvalues`: the ``k`` eigenvalues of largest modulus by ``scipy.sparse.linalg.eigs``.
- :func:`step_spectra`: for every step of a block, ``z = h^m·λ`` for the leading eigenvalues ``λ`` of each
  linearized term (see :meth:`pdenet.blocks.TimeSteppingBlock.linearizations`), and whether each ``z`` lies
  in the scheme's stability region.
- :func:`perturbation_growth`: ``‖Φ_l(Y + δ) − Φ_l(Y)‖ / ‖δ‖`` after every time step ``l`` of every block of a
  model, for a random ``δ`` and for ``δ`` along the leading right singular vector of the Jacobian of the map
  from the input to the last step (the most amplified direction, by ``scipy.sparse.linalg.svds``).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigs, svds
from torch import nn

from operators.stability import get_scheme, in_stability_region

from .blocks import TimeSteppingBlock, time_stepping_blocks
from .stability import block_inputs, eval_mode


def jacobian_operator(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> LinearOperator:
    """``J = ∂fn/∂x`` at ``x`` as a LinearOperator of shape ``(fn(x).numel(), x.numel())`` (C-order flattening)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    x = x.detach()
    out, vjp_fn = torch.func.vjp(fn, x)
    out_shape = out.shape

    def to_torch(v, shape):
        return torch.as_tensor(np.ascontiguousarray(v).reshape(shape), dtype=x.dtype, device=x.device)

    def matvec(v):
        return torch.func.jvp(fn, (x,), (to_torch(v, x.shape),))[1].detach().reshape(-1).cpu().numpy()

    def rmatvec(v):
        return vjp_fn(to_torch(v, out_shape))[0].detach().reshape(-1).cpu().numpy()

    dtype = np.float64 if x.dtype == torch.float64 else np.float32
    return LinearOperator((out.numel(), x.numel()), matvec=matvec, rmatvec=rmatvec, dtype=dtype)


def _start_vector(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n)


def jacobian_eigenvalues(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, k: int = 6,
                         tol: float = 0.0, seed: int = 0) -> np.ndarray:
    """The ``k`` eigenvalues of ``∂fn/∂x`` at ``x`` of largest modulus (complex, sorted by modulus, descending).

    ``fn`` must map ``x`` to a tensor of the same number of entries. Needs ``k < x.numel() − 1`` (ARPACK).
    """
    op = jacobian_operator(fn, x)
    n = op.shape[1]
    if op.shape[0] != n:
        raise ValueError(f"eigenvalues need a square Jacobian; fn maps {n} entries to {op.shape[0]}")
    if not 1 <= k < n - 1:
        raise ValueError(f"k must satisfy 1 <= k < n - 1 = {n - 1} for eigs on a {n} x {n} Jacobian, got {k}")
    ncv = min(n - 1, max(2 * k + 1, 20))  # a larger Krylov space than ARPACK's default: fewer restarts
    values = eigs(op, k=k, which="LM", tol=tol, ncv=ncv, v0=_start_vector(n, seed), return_eigenvectors=False)
    return values[np.argsort(-np.abs(values), kind="stable")]


@dataclass
class StepSpectrum:
    """``z = h^m·λ`` for the leading eigenvalues of one linearized term, and whether each is in the region."""

    block: str
    label: str
    scheme: str
    h: float
    z: np.ndarray
    inside: np.ndarray

    def as_dict(self) -> dict:
        return {"block": self.block, "label": self.label, "scheme": self.scheme, "h": self.h,
                "z_real": self.z.real.tolist(), "z_imag": self.z.imag.tolist(), "inside": self.inside.tolist()}


def step_spectra(block: TimeSteppingBlock, y: torch.Tensor, k: int = 6, name: str = "block",
                 seed: int = 0) -> list[StepSpectrum]:
    """Leading ``h^m·λ`` of every linearized term of every step of ``block`` along its trajectory from ``y[:1]``."""
    spectra = []
    with eval_mode(block):
        for term in block.linearizations(y[:1]):
            n = term.point.numel()
            scale = term.h ** get_scheme(term.scheme).derivative_order
            z = scale * jacobian_eigenvalues(term.fn, term.point, min(k, n - 2), seed=seed)
            inside = np.asarray(in_stability_region(term.scheme, z), dtype=bool)
            spectra.append(StepSpectrum(name, term.label, term.scheme, term.h, z, inside))
    return spectra


def model_step_spectra(model: nn.Module, x: torch.Tensor, k: int = 6, seed: int = 0,
                       progress: bool = False) -> list[StepSpectrum]:
    """:func:`step_spectra` of every time-stepping block of ``model``, each at the input it receives from ``x``;
    ``progress``: report each block on stderr as it is done."""
    from .progress import Progress

    with eval_mode(model), torch.no_grad():
        inputs = block_inputs(model, x[:1])
    blocks = list(time_stepping_blocks(model))
    spectra = []
    with Progress(len(blocks), "Jacobian eigenvalues", unit="blocks", enabled=progress) as bar:
        for name, block in blocks:
            spectra += step_spectra(block, inputs[name], k, name, seed)
            bar.update(1)
    return spectra


@contextmanager
def record_steps(model: nn.Module):
    """Collect ``(label, Y)`` after every time step of every block of ``model`` while the context is open."""
    records: list[tuple[str, torch.Tensor]] = []
    removers = [block.add_step_hook(lambda b, j, y, name=name: records.append((f"{name}[{j}]", y)))
                for name, block in time_stepping_blocks(model)]
    try:
        yield records
    finally:
        for remove in removers:
            remove()


@dataclass
class PerturbationGrowth:
    """``‖Φ_l(x + δ) − Φ_l(x)‖ / ‖δ‖`` after each step ``l`` (labels ``block[j]``), for both directions."""

    labels: list[str]
    random: np.ndarray
    adversarial: np.ndarray
    sigma_max: float  # leading singular value of the Jacobian from the input to the last step

    def as_dict(self) -> dict:
        return {"labels": self.labels, "random": self.random.tolist(), "adversarial": self.adversarial.tolist(),
                "sigma_max": self.sigma_max}


def _steps(model: nn.Module, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    with record_steps(model) as records:
        model(x)
    return list(records)


def perturbation_growth(model: nn.Module, x: torch.Tensor, eps: float = 1e-3, seed: int = 0) -> PerturbationGrowth:
    """Growth of a perturbation of relative size ``eps`` of ``x[:1]`` through every time step of ``model``.

    The adversarial direction is the leading right singular vector of ``∂Φ_L/∂x`` (``Φ_L``: input to the
    output of the last step), so its growth at the last step is about ``sigma_max``.
    """
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if not any(True for _ in time_stepping_blocks(model)):
        raise ValueError(f"{type(model).__name__} contains no time-stepping block")
    x = x[:1].detach()
    with eval_mode(model), torch.no_grad():
        base = _steps(model, x)
        labels = [label for label, _ in base]

        def growth(direction: torch.Tensor) -> np.ndarray:
            delta = eps * x.norm() * direction / direction.norm()
            moved = _steps(model, x + delta)
            return np.array([float((b - m).norm() / delta.norm()) for (_, b), (_, m) in zip(base, moved)])

        gen = torch.Generator().manual_seed(seed)
        random = growth(torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device))
        op = jacobian_operator(lambda t: _steps(model, t)[-1][1], x)
        _, s, vt = svds(op, k=1, v0=_start_vector(min(op.shape), seed))
        v = torch.as_tensor(vt[0].copy(), dtype=x.dtype, device=x.device).reshape(x.shape)
        adversarial = growth(v)
    return PerturbationGrowth(labels, random, adversarial, float(s[0]))
