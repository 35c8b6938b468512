"""Time-stepping residual blocks: ``nt`` steps of size ``h`` of a discretized ODE ``∂_t Y = F(Y, θ(t))``.

Each scheme is a small class registered by name in :data:`SCHEMES` (torchdiffeq style) with
:func:`register_scheme`: it says how to start (``initial_state``), how to take step ``j`` (``step``), what to
output (``output``), and carries its stability contract (``contract``, an :class:`operators.stability.Scheme`
with ``R(z)``). From the contract, :class:`LayerBlock` derives how to linearize a step for the Jacobian analysis
(``linearize``) and how large ``h`` may be from the current weights (``step_stability``); a scheme overrides
them only where its steps are not one layer evaluated at ``Y``. Everything else lives once in
:class:`TimeSteppingBlock`.

========================  ==========================================================================
scheme                    step ``j`` (``F_j(Y) = −K_jᵀ σ(N(K_j Y + b_j))``, ``G_j(Y) = K₂σ(N(K₁Y + b))``)
========================  ==========================================================================
``"parabolic"``           ``Y ← Y + h F_j(Y)``                     bound ``h ≤ 2 / (g ‖K‖²)``
``"euler"``               ``Y ← Y + h G_j(Y)``                     bound from the eigenvalues of ``K₂K₁``
``"rk2"``, ``"rk4"``      Heun / classical Runge–Kutta on ``F_j`` (``layer="symmetric"``) or ``G_j``
                          (``"general"``); symmetric bound ``h ≤ 2/(g‖K‖²)`` (RK2), ``2.785…/(g‖K‖²)`` (RK4)
``"antisymmetric"``       ``Y ← Y + h σ(N((K − Kᵀ − γI)Y + b))``    bound ``h ≤ 2γ / (g(γ² + ‖K − Kᵀ‖²))``
``"theta"``               ``Y⁺ = Y + h[θF_j(Y⁺) + (1 − θ)F_j(Y)]``   every ``h`` for ``θ ≥ ½`` (A-stable)
``"leapfrog"``            ``Y⁺ = 2Y − Y⁻ + h² F_j(Y)``, ``Y⁻ = Y₀``  bound ``h ≤ 2 / (√g ‖K‖)``
``"hamiltonian"``         ``Z ← Z + h F¹_j(Y)``, ``Y ← Y − h F²_j(Z)``, ``Z₀ = 0`` (Verlet)
``"diffusion-reaction"``  Lie ``D_h ∘ R_h``, Strang ``D_{h/2} ∘ R_h ∘ D_{h/2}``; ``R_h Y = Y + h f(Y)``
                          with pointwise operators, ``D_h`` a diffusion step with a depthwise ``K``
========================  ==========================================================================

``g`` bounds ``σ'·N'`` (see :meth:`pdenet.layers.SymmetricLayer.slope`). The bounds come from the scheme
stability functions in :mod:`operators.stability`; the assumptions behind each are returned with it.
:func:`build_block` is the factory used by the networks.

``reversible=True`` (leapfrog and Hamiltonian blocks) backpropagates by reconstructing the states from the last
two instead of storing them, so the activation memory of a block does not grow with ``nt`` (see
:class:`ReversibleIntegration`).
"""
from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
from torch import nn

from operators import ConvOperator
from operators.base import as_grid, check_positive_int
from operators.registry import make_operator
from operators.stability import SCHEMES as CONTRACTS
from operators.stability import Scheme, get_scheme, max_stable_step, register_scheme as register_contract
from operators.stability import step_bound as scheme_step_bound

from .diffusion import diffusion_step, fourier_diffusion_flops
from .layers import ACTIVATIONS, AntisymmetricLayer, GeneralLayer, SymmetricLayer
from .normalization import inference_scale

OperatorSpec = str | Callable[[int, int], ConvOperator]
STABILIZERS = ("rescale-h", "project-norm")
SPLITTINGS = ("lie", "strang")
#: grid on which the eigenvalues of ``K̂₂(ω)K̂₁(ω)`` are sampled when no grid is given.
EIGENVALUE_GRID = (16, 16)


@dataclass(frozen=True)
class StepStability:
    """The stability of one step (or a whole block): the largest stable ``h`` (``inf``: every ``h``;
    ``None``: no bound available), the largest operator norm involved, and the assumptions used.

    ``amplification``: for one step, ``h ↦ max |R(h^m λ)|`` over the linearized spectrum the bound is derived
    from (how much the linearized step can amplify a perturbation at step size ``h``; at most 1 exactly when
    ``h`` is within the bound); ``None`` where there is no such spectrum. For a whole block (see
    :meth:`TimeSteppingBlock.stability`), ``step_amplification`` is its largest value over the steps at the block's
    ``h`` and ``block_amplification`` their product over the ``nt`` steps (a bound on the block's linearized
    growth).
    """

    bound: float | None
    norm: float
    assumptions: tuple[str, ...]
    amplification: Callable[[float], float] | None = None
    step_amplification: float | None = None
    block_amplification: float | None = None


def _amplification(scheme: str | Scheme, spectrum) -> Callable[[float], float]:
    """``h ↦ max |R(h^m λ)|`` over the (sampled) spectrum ``λ``."""
    contract = get_scheme(scheme)
    lam = np.asarray(spectrum, dtype=np.complex128).ravel()

    def amplification(h: float) -> float:
        with np.errstate(all="ignore"):
            return float(np.nan_to_num(np.abs(contract.amplification((h ** contract.derivative_order) * lam)),
                                       nan=np.inf).max())

    return amplification


class Linearization(NamedTuple):
    """One term of a step, linearized: ``z = h^m·λ`` for the eigenvalues ``λ`` of ``∂fn/∂x`` at ``point``
    must lie in the stability region of ``scheme`` (a registered name of :mod:`operators.stability`, whose
    test equation ``y^(m) = λ y`` fixes ``m``: 2 for leapfrog and Verlet, whose ``fn`` is the second-order
    right-hand side, 1 otherwise)."""

    label: str
    scheme: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    point: torch.Tensor
    h: float


# ---------------------------------------------------------------------------------------- helpers
def operator_factory(spec: OperatorSpec, operator_kwargs: dict | None = None) -> Callable[[int, int], ConvOperator]:
    """``(in_ch, out_ch) -> ConvOperator`` from a kind name (via ``make_operator``) or a callable."""
    kwargs = dict(operator_kwargs or {})
    if isinstance(spec, str):
        return lambda cin, cout: make_operator(spec, cin, cout, **kwargs)
    if callable(spec):
        if kwargs:
            raise TypeError("operator_kwargs only apply when the operator is given by name, not by a factory")
        return spec
    raise TypeError(f"operator must be a kind name or a callable (in_ch, out_ch) -> ConvOperator, got {spec!r}")


def _new_operator(factory, cin: int, cout: int, role: str) -> ConvOperator:
    op = factory(cin, cout)
    if not isinstance(op, ConvOperator):
        raise TypeError(f"the operator factory for {role} returned {type(op).__name__}, not an operators.ConvOperator")
    if (op.in_channels, op.out_channels) != (cin, cout):
        raise ValueError(
            f"the operator for {role} maps {op.in_channels} -> {op.out_channels} channels, "
            f"but the block needs {cin} -> {cout}"
        )
    return op


#: warm-start vectors of the tracked power iterations, one per operator (dropped with the operator).
_POWER_VECTORS: "weakref.WeakKeyDictionary[ConvOperator, torch.Tensor]" = weakref.WeakKeyDictionary()


def _tracked_norm(op: ConvOperator, grid: tuple[int, int], active: torch.Tensor | None = None,
                  warm_iterations: int = 2, cold_iterations: int = 100) -> torch.Tensor:
    """``‖K‖`` on ``grid`` by power iteration on ``KᵀK`` warm-started from the previous call's vector, as a 0-d
    float64 tensor on the weights' device (nothing is read back to the host).

    As in spectral normalization: while the weights change slowly between optimizer steps, two iterations
    per call keep the estimate (a lower estimate, ``√‖KᵀKv‖`` for a unit ``v``) close to the norm. An iteration
    that finds ``KᵀKv = 0`` keeps ``v`` (the estimate is then 0); where the 0-d bool tensor ``active`` is false,
    the stored vector is left as it was (a pass that a host-side loop would have skipped).
    """
    p = next(op.parameters())
    v = _POWER_VECTORS.get(op)
    iterations = warm_iterations
    if v is None or tuple(v.shape[-2:]) != grid or v.dtype != p.dtype or v.device != p.device:
        v = torch.randn(1, op.in_channels, *grid, dtype=p.dtype, device=p.device)
        iterations = cold_iterations
    for _ in range(iterations):
        w = op.adjoint(op(v / v.norm()))
        sigma2 = w.norm()
        keep = sigma2 > 0 if active is None else (sigma2 > 0) & active
        v = torch.where(keep, w, v)
    _POWER_VECTORS[op] = v
    return sigma2.double().sqrt()


def _norm_of(op: ConvOperator, grid, method: str) -> tuple[float, str]:
    """``‖K‖`` and the sentence saying what kind of number it is."""
    if method == "tracked":
        text = f"‖K‖ tracked by warm-started power iteration on the {grid[0]}x{grid[1]} grid"
        return float(_tracked_norm(op, grid)), text
    norm = op.spectral_norm(grid, method=method)
    if method == "power":
        return norm, f"‖K‖ by power iteration on the {grid[0]}x{grid[1]} grid (this grid, {op.boundary} boundary)"
    if grid is None:
        return norm, "‖K‖ ≈ sup_ω ‖K̂(ω)‖ (sampled on 64x64 frequencies), which bounds ‖K‖ on every grid"
    if op.boundary == "circular":
        return norm, f"‖K‖ = max‖K̂(ω)‖ on the periodic {grid[0]}x{grid[1]} grid (exact)"
    return norm, f"‖K‖ ≤ max‖K̂(ω)‖ on the {grid[0]}x{grid[1]} grid padded by k-1 (zero padding: upper bound)"


def _slope_text(layer) -> str:
    g = layer.slope()
    norm = {"none": "identity", "batch": "batch norm", "tv": "TV normalization"}[layer.norm.kind]
    text = f"σ'·N' ∈ [0, g] with σ = {layer.activation}, N = {norm}"
    if layer.norm.kind == "batch" and g is not None:
        text += " (linearized at its running statistics, inference mode)"
    return text + (f": g = {g:.4g}" if g is not None else ": no bound on g, so none on h")


def symmetric_stability(scheme: str | Scheme, layers: list[SymmetricLayer], grid, method: str,
                        law: str | None = None) -> StepStability:
    """Bound of a scheme whose linearized step involves ``−K_iᵀ D_i K_i`` only: the scheme's ``step_bound`` at
    ``Π_i √g_i ‖K_i‖``. ``law``: the sentence saying why; by default the one-layer law of ``scheme``'s contract
    (eigenvalues of the Jacobian in ``[−g‖K‖², 0]``, ``h ≤ |a|/(g‖K‖²)`` for its real interval ``[a, 0]``)."""
    contract = get_scheme(scheme)
    a = contract.real_interval[0]
    if law is None and a == -math.inf:
        law = (f"Jacobian −KᵀDK has eigenvalues in [−g‖K‖², 0]; {contract.name} is stable on the whole negative "
               "real axis (A-stable): every h")
    elif law is None:
        law = (f"Jacobian −KᵀDK has eigenvalues in [−g‖K‖², 0]; {contract.name} (real interval "
               f"[{a:.6g}, 0]): h ≤ {-a:.6g}/(g‖K‖²)")
    norms, texts = [], [law]
    scale = 1.0
    for layer in layers:
        norm, text = _norm_of(layer.op, grid, method)
        norms.append(norm)
        texts += [text, _slope_text(layer)]
        g = layer.slope()
        scale = None if (g is None or scale is None) else scale * math.sqrt(g) * norm
    if scale is None:
        return StepStability(None, max(norms), tuple(dict.fromkeys(texts)))
    spectrum = -np.linspace(0.0, 1.0, 2001) ** 2 * scale ** 2  # [−scale², 0], denser near 0
    return StepStability(scheme_step_bound(contract, scale), max(norms), tuple(dict.fromkeys(texts)),
                         _amplification(contract, spectrum))


def _device_slope(layer) -> torch.Tensor | float:
    """``layer.slope()`` without reading a device value (NaN where it is None): batch norm's gain
    ``max_c γ_c/√(σ²_c + ε)`` (none where some is negative) as a 0-d float64 tensor computed on the device, times
    the activation's largest slope; the other normalizations' gains are constants known on the host."""
    if layer.norm.kind != "batch":
        g = layer.slope()
        return math.nan if g is None else g
    scale = inference_scale(layer.norm)
    gain = torch.where((scale >= 0).all(), scale.max(), math.nan).double()
    return ACTIVATIONS[layer.activation][1] * gain


def _device_step_bound(scheme: str | Scheme, norm: torch.Tensor) -> torch.Tensor:
    """``operators.stability.step_bound(scheme, norm)`` for a 0-d float64 tensor ``norm``, on its device: the
    largest ``h`` keeping ``h^m·(−norm²)`` in the scheme's real interval ``[a, 0]``, ``h = (a/(−norm²))^(1/m)``
    (``inf`` for ``norm = 0`` or ``a = −∞``; NaN stays NaN)."""
    contract = get_scheme(scheme)
    a = norm.new_full((), contract.real_interval[0])
    return torch.div(a, -(norm * norm)).pow(1.0 / contract.derivative_order)


def _device_symmetric_bound(scheme: str | Scheme, layers: list[SymmetricLayer], grid: tuple[int, int],
                            active: torch.Tensor | None) -> torch.Tensor:
    """``symmetric_stability(scheme, layers, grid, "tracked").bound`` as a 0-d float64 tensor on the weights'
    device (NaN: no bound), without reading a device value: ``step_bound`` at ``Π_i √g_i ‖K_i‖``."""
    scale = 1.0
    for layer in layers:
        norm = _tracked_norm(layer.op, grid, active)
        g = _device_slope(layer)
        scale = scale * (g.sqrt() if isinstance(g, torch.Tensor) else math.sqrt(g)) * norm
    return _device_step_bound(scheme, scale)


def general_stability(layer: GeneralLayer, grid, method: str, scheme: str | Scheme = "euler") -> StepStability:
    """``scheme`` (forward Euler by default) on ``K₂ D K₁``: linearized at ``D = g I``, the largest ``h`` keeping
    ``h·λ`` in the region for the eigenvalues ``λ`` of ``g K̂₂(ω) K̂₁(ω)`` over a periodic grid's frequencies."""
    norms = [_norm_of(op, grid, method) for op in layer.operators()]
    n1, n2 = EIGENVALUE_GRID if grid is None else grid
    texts = [
        f"linearized at D = g·I: eigenvalues of g·K̂₂(ω)K̂₁(ω) on the periodic {n1}x{n2} grid "
        "(not a guarantee when D varies; check the Jacobian eigenvalues)",
        *(t for _, t in norms), _slope_text(layer),
    ]
    g = layer.slope()
    if g is None:
        return StepStability(None, max(n for n, _ in norms), tuple(texts))
    with torch.no_grad():
        product = layer.op2.symbol((n1, n2)) @ layer.op1.symbol((n1, n2))
        eigenvalues = g * torch.linalg.eigvals(product).flatten().cpu().numpy()
    return StepStability(float(max_stable_step(scheme, eigenvalues)), max(n for n, _ in norms), tuple(texts),
                         _amplification(scheme, eigenvalues))


def antisymmetric_stability(layer: AntisymmetricLayer, grid, method: str,
                            scheme: str | Scheme = "euler") -> StepStability:
    """``scheme`` on ``F(Y) = σ(N((K − Kᵀ − γI)Y + b))``, linearized at ``D = g I``: the eigenvalues
    ``g(−γ ± i‖K − Kᵀ‖)`` are the extreme ones of ``g(A − γI)`` for the region of a forward Euler step
    (``|1 + hg(−γ + iμ)|`` grows with ``|μ|``), giving ``h ≤ 2γ / (g(γ² + ‖K − Kᵀ‖²))``."""
    norm, text = _norm_of(layer.antisymmetric_operator(), grid, "symbol" if method == "tracked" else method)
    texts = [f"linear part K − Kᵀ − γI (γ = {layer.gamma:g}) has eigenvalues −γ + iμ, |μ| ≤ ‖K − Kᵀ‖; linearized "
             f"at D = g·I: {get_scheme(scheme).name} needs h·g(−γ ± i‖K − Kᵀ‖) in its region",
             text.replace("‖K‖", "‖K − Kᵀ‖"), _slope_text(layer)]
    g = layer.slope()
    if g is None:
        return StepStability(None, norm, tuple(texts))
    spectrum = g * (-layer.gamma + 1j * norm * np.linspace(-1.0, 1.0, 401))
    return StepStability(float(max_stable_step(scheme, [g * complex(-layer.gamma, norm)])), norm, tuple(texts),
                         _amplification(scheme, spectrum))


def _combine(parts: list[StepStability], composite: bool = False) -> StepStability:
    """The parts' smallest bound, largest norm and all assumptions. ``composite``: the parts are sub-steps of one
    step (splitting), whose amplification is at most the product of theirs."""
    bounds = [p.bound for p in parts]
    amplification = None
    if composite and all(p.amplification is not None for p in parts):
        amplification = lambda h: math.prod(p.amplification(h) for p in parts)  # noqa: E731
    return StepStability(
        None if any(b is None for b in bounds) else min(bounds),
        max(p.norm for p in parts),
        tuple(dict.fromkeys(a for p in parts for a in p.assumptions)),
        amplification,
    )


# ---------------------------------------------------------------------------------------- base class
class TimeSteppingBlock(nn.Module):
    """``nt`` steps of size ``h`` at fixed width ``channels``: ``(B, c, n1, n2) -> (B, c, n1, n2)``.

    Parameters
    ----------
    channels, nt, h : width, number of steps (≥ 1), step size (> 0).
    shared_weights : one set of weights for all steps (``θ`` constant in time) instead of one per step.
    learn_h : ``h = exp(log_h)`` with ``log_h`` a parameter (positive by construction); else a buffer.
    stabilize : ``None``, ``"rescale-h"`` (``h ← min(h, safety·bound)``) or ``"project-norm"`` (scale the
        operators of every step whose bound is below ``h / safety``); applied by :meth:`enforce_stability`,
        which a trainer calls after each optimizer step.
    safety : fraction of the bound that ``enforce_stability`` targets.
    reversible : backpropagate by reconstructing the states (schemes with an exact ``inverse_step`` only): in
        training mode with gradients enabled, ``forward`` keeps no activations of its steps (see
        :class:`ReversibleIntegration`); in eval mode or without gradients it is the plain forward.

    A scheme subclass sets ``scheme`` (its registered name) and ``contract`` (its stability contract: an
    :class:`operators.stability.Scheme` or the name of a registered one) and implements ``step``; see
    :func:`register_scheme`.
    """

    scheme: str = ""
    #: the stability contract: an ``operators.stability.Scheme`` or a registered name (``None``: the scheme
    #: writes its own ``linearize`` and ``step_stability``, as diffusion–reaction splitting does).
    contract: Scheme | str | None = None
    #: ``bound(c·K) = bound(K) / c**bound_degree`` when every operator of a step is scaled by ``c``.
    bound_degree: int = 2
    #: the scheme has an exact ``inverse_step`` (``Y_j`` from ``Y_{j+1}``), so ``reversible=True`` is possible.
    invertible: bool = False

    def __init__(self, channels: int, nt: int = 3, h: float = 1.0, *, shared_weights: bool = False,
                 learn_h: bool = False, stabilize: str | None = None, safety: float = 0.9, reversible: bool = False):
        super().__init__()
        if reversible and not self.invertible:
            raise ValueError(f"reversible=True needs a scheme with an exact inverse step (leapfrog, hamiltonian); "
                             f"the {self.scheme!r} scheme has none")
        self.reversible = bool(reversible)
        self.channels = check_positive_int("channels", channels)
        self.nt = check_positive_int("nt", nt)
        if isinstance(h, bool) or not isinstance(h, (int, float, np.floating)) or not math.isfinite(h) or h <= 0:
            raise ValueError(f"step size h must be a positive finite number, got {h!r}")
        if stabilize is not None and stabilize not in STABILIZERS:
            raise ValueError(f"unknown stabilize option {stabilize!r}; expected None or one of {STABILIZERS}")
        if not 0 < safety <= 1:
            raise ValueError(f"safety must be in (0, 1], got {safety}")
        self.shared_weights = bool(shared_weights)
        self.stabilize = stabilize
        self.safety = float(safety)
        log_h = torch.tensor(math.log(h), dtype=torch.get_default_dtype())
        if learn_h:
            self.log_h = nn.Parameter(log_h)
        else:
            self.register_buffer("log_h", log_h)
        self._step_hooks: list[Callable] = []
        self._grid: tuple[int, int] | None = None  # grid of the last forward pass

    def _build_steps(self, make_step: Callable[[int], nn.Module]) -> None:
        self.steps = nn.ModuleList(make_step(j) for j in range(1 if self.shared_weights else self.nt))

    def _check_stabilize(self, has_bound: bool, scale_invariant: bool) -> None:
        if self.stabilize is not None and not has_bound:
            raise ValueError(f"stabilize={self.stabilize!r} needs a step bound, which the {self.scheme!r} block "
                             "with these options does not have")
        if self.stabilize == "project-norm" and scale_invariant:
            raise ValueError("stabilize='project-norm' has no effect through a batch or TV normalization (they undo "
                             "the operator's scale); use stabilize='rescale-h' or normalization='none'")

    # ------------------------------------------------------------ step size
    @property
    def h(self) -> torch.Tensor:
        """The step size, ``exp(log_h)`` (a 0-d tensor, differentiable when ``learn_h``)."""
        return self.log_h.exp()

    @torch.no_grad()
    def set_h(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"step size h must be positive, got {value}")
        self.log_h.fill_(math.log(value))

    # ------------------------------------------------------------ hooks for schemes
    def initial_state(self, y: torch.Tensor):
        return y

    def step(self, j: int, state):
        raise NotImplementedError

    def inverse_step(self, j: int, state):
        raise NotImplementedError(f"the {self.scheme!r} scheme is not reversible")

    def output(self, state) -> torch.Tensor:
        return state

    def linearize(self, j: int, state) -> list[Linearization]:
        raise NotImplementedError

    def step_stability(self, j: int, grid, method: str) -> StepStability:
        raise NotImplementedError

    # ------------------------------------------------------------ running
    def weights(self, j: int) -> nn.Module:
        """The module holding step ``j``'s weights."""
        return self.steps[0 if self.shared_weights else j]

    def _check_input(self, y) -> None:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor, got {type(y).__name__}")
        if y.dim() != 4 or y.shape[1] != self.channels:
            raise ValueError(f"{type(self).__name__} expects (batch, {self.channels}, n1, n2), got {tuple(y.shape)}")

    @property
    def capture_limit(self) -> str:
        """Why ``torch.compile(fullgraph=True)``, ``torch.export`` and ``torch.jit.trace`` cannot record this block
        as one graph in its present mode, or ``""``. ``torch.compile`` without ``fullgraph`` runs such a part
        eagerly; ``torch.export`` and ``torch.jit.trace`` refuse it with this reason."""
        if self.reversible and self.training:
            return ("reversible backpropagation reconstructs the states in a hand-written backward that calls "
                    "autograd itself")
        return ""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        self._check_input(y)
        self._grid = tuple(y.shape[-2:])
        if (torch.jit.is_tracing() or torch.compiler.is_exporting()) and self.capture_limit:
            raise RuntimeError(f"{type(self).__name__} cannot be recorded as a graph: {self.capture_limit}; run it "
                               "eagerly, or through torch.compile without fullgraph")
        if self.reversible and self.training and torch.is_grad_enabled():
            params = [p for p in self.parameters() if p.requires_grad]
            return ReversibleIntegration.apply(self, y, *params)
        return self.output(self.run_steps(self.initial_state(y)))

    def run_steps(self, state):
        """All ``nt`` steps from a full state, calling the step hooks after each; returns the last state."""
        for j in range(self.nt):
            state = self.step(j, state)
            for hook in self._step_hooks:
                hook(self, j, self.output(state))
        return state

    def integrate(self, state, reverse: bool = False):
        """All ``nt`` steps from a full state; ``reverse=True`` undoes them (reversible schemes only)."""
        if reverse:
            for j in reversed(range(self.nt)):
                state = self.inverse_step(j, state)
        else:
            for j in range(self.nt):
                state = self.step(j, state)
        return state

    def add_step_hook(self, hook: Callable) -> Callable[[], None]:
        """Call ``hook(block, j, Y_{j+1})`` after every step; returns a function that removes it."""
        self._step_hooks.append(hook)
        return lambda: self._step_hooks.remove(hook)

    def linearizations(self, y: torch.Tensor) -> list[Linearization]:
        """The linearized terms of every step along the trajectory from ``y`` (no gradients kept)."""
        self._check_input(y)
        terms = []
        with torch.no_grad():
            state = self.initial_state(y)
            for j in range(self.nt):
                terms += self.linearize(j, state)
                state = self.step(j, state)
        return terms

    # ------------------------------------------------------------ analysis
    def named_operators(self) -> list[tuple[str, ConvOperator]]:
        return [(name, m) for name, m in self.named_modules() if isinstance(m, ConvOperator)]

    def operators(self) -> list[ConvOperator]:
        """Every convolution operator of the block (each shared one once)."""
        return [op for _, op in self.named_operators()]

    def stability(self, grid=None, method: str = "symbol") -> StepStability:
        """Largest stable ``h`` over all steps from the current weights, with ``max ‖K‖`` and the assumptions.

        ``grid``: the ``(n1, n2)`` the block runs on (``None``: a bound for every grid); ``method``: how
        ``‖K‖`` is computed (``"symbol"`` or ``"power"``, see ``ConvOperator.spectral_norm``).
        """
        grid = None if grid is None else as_grid(grid)
        if method == "power" and grid is None:
            raise ValueError("method='power' needs the grid the block runs on")
        parts = [self.step_stability(j, grid, method) for j in range(len(self.steps))]
        result = _combine(parts)
        if any(p.amplification is None for p in parts):
            return result
        h = float(self.h.detach())
        per_step = [p.amplification(h) for p in parts]
        over_block = math.prod(per_step) if len(per_step) == self.nt else per_step[0] ** self.nt
        return replace(result, step_amplification=max(per_step), block_amplification=over_block)

    def step_bound(self, grid=None, method: str = "symbol") -> float | None:
        """Largest stable ``h`` from the current weights (``inf``: every ``h``; ``None``: unknown)."""
        return self.stability(grid, method).bound

    @torch.no_grad()
    def enforce_stability(self, grid=None) -> None:
        """Apply the ``stabilize`` option so that ``h ≤ safety · bound``; a no-op when ``stabilize`` is None.

        Cheap enough for every optimizer step: the norms are tracked by warm-started power iteration on
        ``grid`` (default: the grid of the last forward pass; before any, the 64x64 symbol bound is used).
        ``stability(grid, method="power")`` recomputes the same norms exactly; the default symbol method is
        an upper bound for zero padding, so it may still show a (conservative) violation on small grids.

        The control stays on the device, with no value read back to the host (which would make the host wait
        for the device at every step): ``"rescale-h"`` sets ``log h ← log(safety · bound)`` where
        ``h > safety · bound``, ``"project-norm"`` multiplies step ``j``'s operators by
        ``c = (safety · bound_j / h)^(1/bound_degree)`` where ``h > safety · bound_j``, then recomputes the bound,
        up to three passes (one is exact for operators linear in their weights), each a ``torch.where`` rather
        than a branch. Where no bound is known (a batch norm whose scale has turned negative), ``h`` and the
        weights stay as they are; ``stability()`` says why. Bounds that are not a function of symmetric layers'
        norms (antisymmetric layers, schemes with their own ``step_stability``) are still computed on the host.
        """
        if self.stabilize is None:
            return
        grid = self._grid if grid is None else as_grid(grid)
        bound_of = self._device_bound if self._device_bound_mirrors_step_stability() else \
            partial(TimeSteppingBlock._device_bound, self)
        h = self.h.double()
        if self.stabilize == "rescale-h":
            limit = self.safety * torch.stack([bound_of(j, grid) for j in range(len(self.steps))]).min()
            self.log_h.copy_(torch.where(h > limit, limit.log(), self.log_h.double()))
            return
        for j in range(len(self.steps)):
            params = [p for m in self.weights(j).modules() if isinstance(m, ConvOperator) for p in m.parameters()]
            active = None  # whether every pass so far found h above the bound
            for _ in range(3):
                bound = bound_of(j, grid, active)
                above = h > self.safety * bound * (1 + 1e-9)
                active = above if active is None else active & above
                factor = torch.where(active, (self.safety * bound / h) ** (1 / self.bound_degree), 1.0)
                for p in params:
                    p.mul_(factor)

    def _device_bound(self, j: int, grid, active: torch.Tensor | None = None) -> torch.Tensor:
        """Step ``j``'s bound (``step_stability(j, grid, "tracked").bound``; the symbol bound when ``grid`` is
        None) as a 0-d float64 tensor on the weights' device, NaN where there is none. A pass of
        :meth:`enforce_stability` that the 0-d bool tensor ``active`` marks as skipped must leave the tracked
        norms' state as it is. This default computes the bound on the host; a scheme whose bound follows from
        norms computes it on the device instead."""
        if active is not None and not bool(active):
            return self.log_h.new_full((), math.nan, dtype=torch.float64)
        bound = self.step_stability(j, grid, "symbol" if grid is None else "tracked").bound
        return self.log_h.new_full((), math.nan if bound is None else bound, dtype=torch.float64)

    def _device_bound_mirrors_step_stability(self) -> bool:
        """Whether the ``_device_bound`` in use is written for the ``step_stability`` in use (defined by the same
        class): a subclass that overrides ``step_stability`` alone gets the host computation."""
        def owner(name):
            return next(c for c in type(self).__mro__ if name in vars(c))

        return owner("_device_bound") is owner("step_stability")

    def extra_repr(self) -> str:
        text = f"scheme={self.scheme!r}, channels={self.channels}, nt={self.nt}, h={float(self.h):.4g}"
        if self.shared_weights:
            text += ", shared_weights=True"
        if isinstance(self.log_h, nn.Parameter):
            text += ", learn_h=True"
        if self.stabilize:
            text += f", stabilize={self.stabilize!r}"
        if self.reversible:
            text += ", reversible=True"
        return text


@contextmanager
def frozen_running_stats(module: nn.Module):
    """Inside the context, batch norms of ``module`` in training mode normalize by the batch's statistics as
    usual but do not update their running statistics (for recomputing steps that already counted once)."""
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def _zeros_for_none(grads, like):
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, like))


class ReversibleIntegration(torch.autograd.Function):
    """Backpropagation through ``nt`` invertible steps without storing their states (Chang et al., "Reversible
    architectures for arbitrarily deep residual neural networks", AAAI 2018).

    Notes
    -----
    The forward pass runs the steps without recording a graph and keeps only the last state (two tensors of
    the input's shape for leapfrog ``(Y_{nt−1}, Y_nt)`` and Verlet ``(Y_nt, Z_nt)``). The backward pass walks
    the steps in reverse: it reconstructs ``S_j = inverse_step(j, S_{j+1})`` (leapfrog:
    ``Y_{j−1} = 2Y_j − Y_{j+1} − h² F_j(Y_j)``; Verlet: the two half steps undone in reverse order), recomputes
    step ``j`` from ``S_j`` with a graph, and takes the vector-Jacobian product of that one step with the
    incoming gradient. Activation memory is that of one step, whatever ``nt``; the cost is one inverse step
    and one recomputed step per step (about twice the forward). The gradient is exact up to the rounding of
    the reconstruction (its drift is measured by ``tests/pdenet/test_reversible.py``). Batch norm inside the
    steps normalizes by batch statistics again in the recomputation but updates its running statistics only
    in the forward pass. Higher derivatives are not supported.
    """

    @staticmethod
    def forward(ctx, block: TimeSteppingBlock, y: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.block = block
        with torch.no_grad():
            state = block.run_steps(block.initial_state(y))
            out = block.output(state)
        ctx.save_for_backward(*state)
        ctx.n_state = len(state)
        return out.clone() if any(out is t for t in state) else out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        block, saved = ctx.block, ctx.saved_tensors
        params = [p for p in block.parameters() if p.requires_grad]
        state = tuple(t.detach() for t in saved)
        with torch.enable_grad():
            leaves = tuple(t.requires_grad_() for t in (s.clone() for s in state))
            grads = _zeros_for_none(torch.autograd.grad(block.output(leaves), leaves, grad_out, allow_unused=True),
                                    leaves)
        param_grads = [torch.zeros_like(p) for p in params]
        with frozen_running_stats(block):
            for j in reversed(range(block.nt)):
                with torch.no_grad():
                    state = block.inverse_step(j, state)
                with torch.enable_grad():
                    leaves = tuple(t.detach().requires_grad_() for t in state)
                    recomputed = block.step(j, leaves)
                    found = torch.autograd.grad(recomputed, (*leaves, *params), grads, allow_unused=True)
                grads = _zeros_for_none(found[:len(leaves)], leaves)
                for acc, g in zip(param_grads, found[len(leaves):]):
                    if g is not None:
                        acc += g
            with torch.enable_grad():  # the start may use the weights too (leapfrog's Taylor start)
                y = block.output(state).detach().requires_grad_()
                pairs = [(s, g) for s, g in zip(block.initial_state(y), grads) if s.requires_grad]
                found = torch.autograd.grad([s for s, _ in pairs], (y, *params), [g for _, g in pairs],
                                            allow_unused=True)
        for acc, g in zip(param_grads, found[1:]):
            if g is not None:
                acc += g
        return (None, found[0], *param_grads)


SCHEMES: dict[str, type[TimeSteppingBlock]] = {}


def register_scheme(cls: type[TimeSteppingBlock]) -> type[TimeSteppingBlock]:
    """Register the block class ``cls`` under ``cls.scheme`` with its stability contract (usable as a decorator).

    One call makes the scheme reachable everywhere a scheme is named: :func:`build_block`, ``PDEResNet(scheme=...)``,
    the named configurations and the ``pdenet`` commands. ``cls.contract`` is an
    :class:`operators.stability.Scheme` (registered in :data:`operators.stability.SCHEMES` by this call when its
    name is new) or the name of one registered there; ``None`` only for a class that writes its own
    ``linearize`` and ``step_stability``. Raises ``TypeError`` for a class that is no ``TimeSteppingBlock``,
    lacks a ``step`` or a contract, and ``ValueError`` for a name already taken by another block or contract.
    """
    if not (isinstance(cls, type) and issubclass(cls, TimeSteppingBlock)):
        raise TypeError(f"register_scheme expects a subclass of pdenet.TimeSteppingBlock, got {cls!r}")
    name = cls.scheme
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__}.scheme must be a non-empty string naming the scheme, got {name!r}")
    if name in SCHEMES:
        raise ValueError(f"a scheme named {name!r} is already registered ({SCHEMES[name].__name__})")
    if cls.step is TimeSteppingBlock.step:
        raise TypeError(f"{cls.__name__} must implement step(self, j, state)")
    contract = cls.contract
    if contract is None:
        if cls.step_stability is TimeSteppingBlock.step_stability or cls.linearize is TimeSteppingBlock.linearize:
            raise TypeError(f"{cls.__name__} has no stability contract: set contract = an operators.stability.Scheme "
                            "(or a registered name), or implement linearize and step_stability")
    elif isinstance(contract, Scheme):
        known = CONTRACTS.get(contract.name)
        if known is None:
            register_contract(contract)
        elif known is not contract:
            raise ValueError(f"{cls.__name__}.contract is named {contract.name!r}, but a different stability "
                             "contract of that name is already registered")
    elif isinstance(contract, str):
        get_scheme(contract)  # ValueError naming the known contracts
    else:
        raise TypeError(f"{cls.__name__}.contract must be an operators.stability.Scheme, a registered name or None, "
                        f"got {type(contract).__name__}")
    SCHEMES[name] = cls
    return cls


# ---------------------------------------------------------------------------------------- schemes
class LayerBlock(TimeSteppingBlock):
    """Blocks whose steps are layers built from one operator kind (``operator``, ``operator_kwargs``,
    ``hidden_channels``, ``activation``, ``normalization``, ``bias``).

    ``make_layer`` builds step ``j``'s weights (a :class:`~pdenet.layers.SymmetricLayer` by default); with a
    ``contract`` and a step that evaluates its layer ``F_j`` near ``Y_j``, ``linearize`` and ``step_stability``
    follow from the contract: ``z = hλ`` for the eigenvalues ``λ`` of ``∂F_j/∂Y`` at ``Y_j``, and the step bound
    from ``‖K‖`` (symmetric layer), from the eigenvalues of ``g K̂₂K̂₁`` (general layer) or from ``γ`` and
    ``‖K − Kᵀ‖`` (antisymmetric layer). A new one-step scheme therefore writes only ``step``. A step bounded by
    the product ``Π_i √g_i ‖K_i‖`` of several symmetric layers (Verlet's two) names them in ``bound_layers``, and
    ``bound_law`` says why the bound holds; :meth:`enforce_stability` then computes that bound on the device.
    """

    closed_bound = True  # a guaranteed step bound exists (given a slope bound g)
    #: why the step bound from ``bound_layers`` holds (None: the one-layer law of the contract)
    bound_law: str | None = None

    def __init__(self, channels: int, nt: int = 3, h: float = 1.0, *, operator: OperatorSpec = "lean",
                 operator_kwargs: dict | None = None, hidden_channels: int | None = None, activation: str = "relu",
                 normalization: str = "none", bias: bool = True, **kwargs):
        super().__init__(channels, nt, h, **kwargs)
        self.hidden_channels = channels if hidden_channels is None else check_positive_int(
            "hidden_channels", hidden_channels)
        factory = operator_factory(operator, operator_kwargs)
        self._build_steps(lambda j: self.make_layer(factory, j, activation, normalization, bias))
        self._check_stabilize(has_bound=normalization != "tv" and self.closed_bound,
                              scale_invariant=normalization != "none")

    def _symmetric(self, factory, role: str, activation, normalization, bias) -> SymmetricLayer:
        op = _new_operator(factory, self.channels, self.hidden_channels, role)
        return SymmetricLayer(op, activation, normalization, bias)

    def make_layer(self, factory, j: int, activation, normalization, bias) -> nn.Module:
        return self._symmetric(factory, f"K of step {j}", activation, normalization, bias)

    def _general(self, factory, j: int, activation, normalization, bias) -> GeneralLayer:
        op1 = _new_operator(factory, self.channels, self.hidden_channels, f"K₁ of step {j}")
        op2 = _new_operator(factory, self.hidden_channels, self.channels, f"K₂ of step {j}")
        return GeneralLayer(op1, op2, activation, normalization, bias)

    def linearize(self, j, y):
        if self.contract is None:
            raise NotImplementedError(f"the {self.scheme!r} block has no contract; it must implement linearize")
        return [Linearization(f"step {j}", get_scheme(self.contract).name, self.weights(j), y, float(self.h))]

    def bound_layers(self, j: int) -> list[SymmetricLayer] | None:
        """The symmetric layers whose norms bound step ``j`` (``h`` from ``Π_i √g_i ‖K_i‖`` by the contract's
        real interval), or None where the bound comes from something else."""
        layer = self.weights(j)
        return [layer] if isinstance(layer, SymmetricLayer) else None

    def step_stability(self, j, grid, method):
        layer = self.weights(j)
        if self.contract is None:
            raise NotImplementedError(f"the {self.scheme!r} block has no contract; it must implement step_stability")
        layers = self.bound_layers(j)
        if layers is not None:
            return symmetric_stability(self.contract, layers, grid, method, self.bound_law)
        if isinstance(layer, GeneralLayer):
            return general_stability(layer, grid, method, self.contract)
        if isinstance(layer, AntisymmetricLayer):
            return antisymmetric_stability(layer, grid, method, self.contract)
        raise NotImplementedError(f"the {self.scheme!r} block's steps are {type(layer).__name__}, for which no "
                                  "step bound is derived from the contract; implement step_stability")

    def _device_bound(self, j, grid, active=None):
        layers = None if self.contract is None else self.bound_layers(j)
        if grid is None or layers is None or get_scheme(self.contract).norm is None:
            return super()._device_bound(j, grid, active)
        return _device_symmetric_bound(self.contract, layers, grid, active)


@register_scheme
class ParabolicBlock(LayerBlock):
    """Forward Euler with the symmetric layer: ``Y ← Y − h K_jᵀ σ(N(K_j Y + b_j))``."""

    scheme = "parabolic"
    contract = "parabolic"

    def step(self, j, y):
        return y + self.h * self.weights(j)(y)


@register_scheme
class EulerBlock(LayerBlock):
    """Forward Euler with the general layer: ``Y ← Y + h K₂ σ(N(K₁ Y + b))`` (``K₁: c -> m``, ``K₂: m -> c``)."""

    scheme = "euler"
    contract = "euler"
    closed_bound = False

    def make_layer(self, factory, j, activation, normalization, bias):
        return self._general(factory, j, activation, normalization, bias)

    def step(self, j, y):
        return y + self.h * self.weights(j)(y)


class RungeKuttaBlock(LayerBlock):
    """An explicit Runge–Kutta method with Butcher tableau ``(a, b)`` on the layer ``F_j`` of step ``j``.

    Notes
    -----
    ``k_i = F_j(Y + h Σ_{l<i} a_{il} k_l)``, ``Y ← Y + h Σ_i b_i k_i``. On ``y' = λy`` one step multiplies by
    ``R(hλ)``, the contract's stability function (``Σ_{m≤s} z^m/m!`` for the ``s``-stage methods of order
    ``s ≤ 4``). ``layer="symmetric"``: ``F_j(Y) = −K_jᵀσ(N(K_jY + b_j))``, whose Jacobian has eigenvalues in
    ``[−g‖K‖², 0]``, so ``h ≤ |a|/(g‖K‖²)`` with ``[a, 0]`` the real stability interval; ``layer="general"``:
    ``F_j(Y) = K₂σ(N(K₁Y + b))``, bound from the eigenvalues of ``g K̂₂K̂₁`` (no guarantee). Costs ``s`` layer
    evaluations per step.
    """

    tableau_a: tuple[tuple[float, ...], ...] = ()
    tableau_b: tuple[float, ...] = ()

    def __init__(self, channels: int, nt: int = 3, h: float = 1.0, *, layer: str = "symmetric", **kwargs):
        if layer not in ("symmetric", "general"):
            raise ValueError(f"unknown layer {layer!r} for the {self.scheme!r} block; expected 'symmetric' or 'general'")
        self.layer = layer
        self.closed_bound = layer == "symmetric"
        super().__init__(channels, nt, h, **kwargs)

    def make_layer(self, factory, j, activation, normalization, bias):
        if self.layer == "general":
            return self._general(factory, j, activation, normalization, bias)
        return self._symmetric(factory, f"K of step {j}", activation, normalization, bias)

    def step(self, j, y):
        f, h = self.weights(j), self.h
        stages = []
        for row in self.tableau_a:
            point = y
            for a, k in zip(row, stages):
                if a:
                    point = point + (h * a) * k
            stages.append(f(point))
        update = sum(b * k for b, k in zip(self.tableau_b, stages) if b)
        return y + h * update

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layer={self.layer!r}"


@register_scheme
class RK2Block(RungeKuttaBlock):
    """Heun's method (RK2): ``k₁ = F(Y)``, ``k₂ = F(Y + h k₁)``, ``Y ← Y + h/2 (k₁ + k₂)``; ``R(z) = 1 + z + z²/2``,
    real interval ``[−2, 0]``: with the symmetric layer ``h ≤ 2/(g‖K‖²)``, as forward Euler, at second order."""

    scheme = "rk2"
    contract = "rk2"
    tableau_a = ((), (1.0,))
    tableau_b = (0.5, 0.5)


@register_scheme
class RK4Block(RungeKuttaBlock):
    """Classical Runge–Kutta (RK4): ``k₁ = F(Y)``, ``k₂ = F(Y + h/2 k₁)``, ``k₃ = F(Y + h/2 k₂)``,
    ``k₄ = F(Y + h k₃)``, ``Y ← Y + h/6 (k₁ + 2k₂ + 2k₃ + k₄)``; ``R(z) = Σ_{m≤4} z^m/m!``, real interval
    ``[−2.7853, 0]``: with the symmetric layer ``h ≤ 2.7853/(g‖K‖²)``, at fourth order and four layer evaluations."""

    scheme = "rk4"
    contract = "rk4"
    tableau_a = ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0))
    tableau_b = (1 / 6, 1 / 3, 1 / 3, 1 / 6)


@register_scheme
class AntisymmetricBlock(LayerBlock):
    """Forward Euler with the antisymmetric layer: ``Y ← Y + h σ(N((K_j − K_jᵀ − γI) Y + b_j))``.

    ``gamma`` (``γ ≥ 0``, default 0.5) damps the purely oscillatory linear part ``K − Kᵀ`` (eigenvalues ``iμ``),
    which forward Euler alone would amplify at every ``h``; the step bound is ``h ≤ 2γ/(g(γ² + ‖K − Kᵀ‖²))``
    (0 for ``γ = 0``). Every operator kind with ``c -> c`` channels works: ``Kᵀ`` is its exact adjoint.
    """

    scheme = "antisymmetric"
    contract = "euler"

    def __init__(self, channels: int, nt: int = 3, h: float = 1.0, *, gamma: float = 0.5, **kwargs):
        self.gamma = gamma
        super().__init__(channels, nt, h, **kwargs)

    def make_layer(self, factory, j, activation, normalization, bias):
        op = _new_operator(factory, self.channels, self.channels, f"K of step {j}")
        return AntisymmetricLayer(op, self.gamma, activation, normalization, bias)

    def step(self, j, y):
        return y + self.h * self.weights(j)(y)


def _batched_cg(matvec: Callable, rhs: torch.Tensor, tol: float, maxiter: int) -> tuple[torch.Tensor, int]:
    """Conjugate gradients for ``A x = rhs``, one independent symmetric positive definite system per sample (the
    first axis), all advanced together; stops when every ``‖rhs − A x‖ ≤ tol ‖rhs‖`` or after ``maxiter``
    iterations. Returns ``x`` and the number of iterations (products with ``A``)."""
    def dot(a, b):
        return (a * b).flatten(1).sum(1).view(-1, *([1] * (a.dim() - 1)))

    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = dot(r, r)
    target = (tol ** 2) * rr
    for iteration in range(1, maxiter + 1):
        ap = matvec(p)
        pap = dot(p, ap)
        alpha = torch.where(pap > 0, rr / pap.clamp_min(torch.finfo(rhs.dtype).tiny), torch.zeros_like(pap))
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = dot(r, r)
        if bool((rr_new <= target).all()):
            return x, iteration
        p = r + (rr_new / rr.clamp_min(torch.finfo(rhs.dtype).tiny)) * p
        rr = rr_new
    return x, maxiter


@register_scheme
class ThetaBlock(LayerBlock):
    """The implicit θ-method with the symmetric layer: ``Y⁺ = Y + h[θ F_j(Y⁺) + (1 − θ) F_j(Y)]``,
    ``F_j(Y) = −K_jᵀσ(K_jY + b_j)``; ``theta=1`` backward Euler, ``theta=0.5`` Crank–Nicolson.

    Notes
    -----
    The step solves ``G(X) = X − hθF(X) − r = 0``, ``r = Y + h(1 − θ)F(Y)``, by Newton–Krylov: the Jacobian
    ``∂G/∂X = I + hθKᵀDK`` (``D = diag σ' ≥ 0``) is symmetric positive definite, so each Newton correction is
    found by conjugate gradients with the products ``v ↦ v + hθKᵀ(D ⊙ Kv)`` (two operator applications each,
    see :meth:`pdenet.layers.SymmetricLayer.jacobian_at`), to a relative
    ``0.1·‖G‖/‖r‖`` (inexact Newton), with backtracking on ``‖G‖``; Newton stops when ``‖G(X)‖ ≤ tol·‖r‖`` for
    every sample. The gradient is the implicit function theorem's, never the solver's iterations: the output is
    ``X_out = r + hθF(X*)`` with ``X*`` the solution held constant (equal to ``X*`` at convergence), and the
    gradient arriving at ``X_out`` is replaced by ``λ = (I − hθ∂F/∂X(X*))^{-ᵀ} g`` (one conjugate-gradient solve
    with the same symmetric products), so that autograd through ``r`` and ``F(X*)`` gives ``λᵀ ∂G/∂(Y, θ_j, h)``.

    ``R(z) = (1 + (1 − θ)z)/(1 − θz)``: for ``θ ≥ ½`` every ``h`` is stable (A-stable), and the step bound is
    ``inf``. Each forward pass records ``solver_log``: per step the Newton iterations, the conjugate-gradient
    iterations (Jacobian-vector products) and the relative residual; the backward pass appends the adjoint
    solves' iterations to ``adjoint_log``. Normalization must be ``"none"`` (batch or TV normalization would
    make the Jacobian non-symmetric, and conjugate gradients need it symmetric).
    """

    scheme = "theta"
    contract = "implicit-euler"

    def __init__(self, channels: int, nt: int = 3, h: float = 1.0, *, theta: float = 1.0, tol: float = 1e-6,
                 max_newton: int = 30, max_cg: int = 100, **kwargs):
        from operators.stability import theta_scheme

        self.contract = theta_scheme(theta)
        self.theta = float(theta)
        if kwargs.get("normalization", "none") != "none":
            raise ValueError(f"the implicit {self.scheme!r} block needs normalization='none' (conjugate gradients need "
                             f"the symmetric Jacobian −KᵀDK), got {kwargs['normalization']!r}")
        if not (isinstance(tol, float) and 0 < tol < 1):
            raise ValueError(f"tol must be a float in (0, 1), got {tol!r}")
        super().__init__(channels, nt, h, **kwargs)
        self.tol = tol
        self.max_newton = check_positive_int("max_newton", max_newton)
        self.max_cg = check_positive_int("max_cg", max_cg)
        self.solver_log: list[dict] = []
        self.adjoint_log: list[dict] = []

    @property
    def capture_limit(self) -> str:
        return ("each step is solved to a tolerance by Newton iterations whose number depends on the data, and its "
                "gradient comes from a hand-written adjoint solve")

    def forward(self, y):
        self.solver_log = []
        return super().forward(y)

    def _solve(self, f, r: torch.Tensor, start: torch.Tensor, ht: float) -> tuple[torch.Tensor, dict]:
        """Newton–Krylov for ``X − ht·F(X) = r`` from ``start``."""
        def norm(t):
            return t.flatten(1).norm(dim=1)

        scale = norm(r).clamp_min(torch.finfo(r.dtype).tiny)
        x = start
        g = x - ht * f(x) - r
        cg_total = 0
        newton = 0
        while newton < self.max_newton and bool((norm(g) > self.tol * scale).any()):
            newton += 1
            forcing = min(0.1, float((norm(g) / scale).max()))
            delta, iterations = _batched_cg(self._jacobian_product(f, x, ht), -g, forcing, self.max_cg)
            cg_total += iterations
            step = 1.0
            while True:  # backtracking: accept the first step that lowers every residual (or the smallest)
                candidate = x + step * delta
                g_new = candidate - ht * f(candidate) - r
                if bool((norm(g_new) <= (1 - 1e-4 * step) * norm(g)).all()) or step < 1e-3:
                    break
                step /= 2
            x, g = candidate, g_new
        return x, {"newton": newton, "cg": cg_total, "residual": float((norm(g) / scale).max())}

    def step(self, j, y):
        f, h, theta = self.weights(j), self.h, self.theta
        r = y + (h * (1 - theta)) * f(y) if theta < 1 else y
        if theta == 0:
            return r
        ht = float(h.detach()) * theta
        with torch.no_grad():
            x, record = self._solve(f, r.detach(), r.detach(), ht)
        self.solver_log.append({"step": j, **record})
        out = r + (h * theta) * f(x)
        if out.requires_grad:
            out.register_hook(lambda grad: self._adjoint_solve(f, x, ht, grad, j))
        return out

    @staticmethod
    def _jacobian_product(f: SymmetricLayer, x: torch.Tensor, ht: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """``v ↦ (I − ht ∂F/∂X(x)) v = v + ht Kᵀ(D ⊙ K v)``: symmetric, so also the transposed product the adjoint
        solve needs."""
        with torch.no_grad():
            jacobian = f.jacobian_at(x)
        return lambda v: v - ht * jacobian(v)

    def _adjoint_solve(self, f, x: torch.Tensor, ht: float, grad: torch.Tensor, j: int) -> torch.Tensor:
        """``λ = (I − ht ∂F/∂X(x))^{-ᵀ} grad`` by conjugate gradients (the matrix is symmetric)."""
        if grad is None:  # an undefined gradient stays undefined
            return None
        lam, iterations = _batched_cg(self._jacobian_product(f, x, ht), grad, min(self.tol, 1e-3), self.max_cg)
        self.adjoint_log.append({"step": j, "cg": iterations})
        return lam

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, theta={self.theta:g}, tol={self.tol:g}"


@register_scheme
class LeapfrogBlock(LayerBlock):
    """Second-order (hyperbolic) leapfrog: ``Y_{j+1} = 2Y_j − Y_{j−1} − h² K_jᵀ σ(N(K_j Y_j + b_j))``.

    The state is the pair ``(Y_{j−1}, Y_j)`` for ``Y'' = F(Y)`` with zero initial velocity. ``start="rest"``
    starts at ``(Y₀, Y₀)``: its first step ``Y₁ = Y₀ + h²F₀(Y₀)`` is twice the Taylor step, an error that makes
    the trajectory converge at first order only. ``start="taylor"`` starts at ``(Y₀ + h²/2 F₀(Y₀), Y₀)``, so that
    ``Y₁ = Y₀ + h²/2 F₀(Y₀)`` (the Taylor start), and the scheme converges at second order (one more layer
    evaluation). The scheme is time-reversible: ``Y_{j−1} = 2Y_j − Y_{j+1} − h² F_j(Y_j)``. Linearized,
    ``Y'' = −KᵀDK Y`` with the eigenvalues of ``KᵀDK`` in ``[0, g‖K‖²]``; stable while ``h²λ ∈ [−4, 0]``.
    """

    scheme = "leapfrog"
    contract = "leapfrog"
    bound_law = "Y'' = −KᵀDK Y with eigenvalues of KᵀDK in [0, g‖K‖²]; leapfrog: h ≤ 2/(√g‖K‖)"
    bound_degree = 1
    invertible = True

    def __init__(self, channels: int, nt: int = 3, h: float = 1.0, *, start: str = "rest", **kwargs):
        if start not in ("rest", "taylor"):
            raise ValueError(f"unknown start {start!r} for the leapfrog block; expected 'rest' or 'taylor'")
        self.start = start
        super().__init__(channels, nt, h, **kwargs)

    def initial_state(self, y):
        if self.start == "taylor":
            return (y + (self.h ** 2 / 2) * self.weights(0)(y), y)
        return (y, y)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", start='taylor'" if self.start == "taylor" else "")

    def output(self, state):
        return state[1]

    def step(self, j, state):
        y_prev, y = state
        return (y, 2 * y - y_prev + self.h ** 2 * self.weights(j)(y))

    def inverse_step(self, j, state):
        y, y_next = state
        return (2 * y - y_next + self.h ** 2 * self.weights(j)(y), y)

    def linearize(self, j, state):
        return super().linearize(j, state[1])


class HamiltonianStep(nn.Module):
    """Weights of one Verlet step: ``F¹(Y) = −K₁ᵀσ(K₁Y + b₁)`` drives ``Z``, ``F²(Z) = −K₂ᵀσ(K₂Z + b₂)`` drives ``Y``."""

    def __init__(self, f1: SymmetricLayer, f2: SymmetricLayer):
        super().__init__()
        self.f1 = f1
        self.f2 = f2


@register_scheme
class HamiltonianBlock(LayerBlock):
    """Verlet (symplectic Euler) for ``Y' = K₂ᵀσ(K₂Z)``, ``Z' = −K₁ᵀσ(K₁Y)``:
    ``Z ← Z − h K₁ᵀσ(N(K₁Y + b₁))``, then ``Y ← Y + h K₂ᵀσ(N(K₂Z + b₂))``, with ``Z₀ = 0``.

    Linearized, ``Y'' = −BA Y`` with ``A = K₁ᵀD₁K₁``, ``B = K₂ᵀD₂K₂``; the eigenvalues ``μ`` of ``BA`` lie in
    ``[0, g₁g₂‖K₁‖²‖K₂‖²]`` and the step is stable for ``h√μ ≤ 2``. Reversible.
    """

    scheme = "hamiltonian"
    contract = "hamiltonian"
    bound_law = "Y'' = −K₂ᵀD₂K₂K₁ᵀD₁K₁ Y; Verlet: h ≤ 2/(√(g₁g₂)‖K₁‖‖K₂‖)"
    invertible = True

    def make_layer(self, factory, j, activation, normalization, bias):
        return HamiltonianStep(self._symmetric(factory, f"K₁ of step {j}", activation, normalization, bias),
                               self._symmetric(factory, f"K₂ of step {j}", activation, normalization, bias))

    def initial_state(self, y):
        return (y, torch.zeros_like(y))

    def output(self, state):
        return state[0]

    def step(self, j, state):
        y, z = state
        w = self.weights(j)
        z = z + self.h * w.f1(y)
        return (y - self.h * w.f2(z), z)

    def inverse_step(self, j, state):
        y, z = state
        w = self.weights(j)
        y = y + self.h * w.f2(z)
        return (y, z - self.h * w.f1(y))

    def linearize(self, j, state):
        w, (y, z) = self.weights(j), state
        f1_y = w.f1(y)
        z_new = z + self.h * f1_y  # the point where the Y-update evaluates F²

        def second_order(x):  # Jacobian at x = y: −J_F²(z_new) J_F¹(y) = −B A
            return -w.f2(z_new + w.f1(x) - f1_y)

        return [Linearization(f"step {j}", "hamiltonian", second_order, y, float(self.h))]

    def bound_layers(self, j):
        w = self.weights(j)
        return [w.f1, w.f2]


class DiffusionReactionStep(nn.Module):
    """Weights of one split step: ``diffusion`` (``K``, ``c -> c``) and ``reaction`` (a layer of pointwise ops)."""

    def __init__(self, diffusion: ConvOperator, reaction: nn.Module):
        super().__init__()
        self.diffusion = diffusion
        self.reaction = reaction


@register_scheme
class DiffusionReactionBlock(TimeSteppingBlock):
    """Operator splitting of ``∂_t Y = −KᵀK Y + f(Y)``.

    Reaction ``R_h Y = Y + h f(Y)``, ``f`` a layer of 1x1 (``"pointwise"``) operators: ``reaction="symmetric"``
    ``f(Y) = −Pᵀσ(N(PY + b))`` or ``"general"`` ``f(Y) = P₂σ(N(P₁Y + b))``; it couples channels, not space.
    Diffusion ``D_h``: ``diffusion="explicit"`` ``Y − hKᵀKY``, ``"implicit"`` ``(I + hKᵀK)^{-1}Y`` or
    ``"exact"`` ``exp(−hKᵀK)Y`` (the last two by FFT on a periodic grid, see :mod:`pdenet.diffusion`), with
    ``K`` depthwise by default (space, no channel coupling). ``splitting="lie"``: ``D_h ∘ R_h`` (order 1);
    ``"strang"``: ``D_{h/2} ∘ R_h ∘ D_{h/2}`` (order 2 when the sub-steps are exact, e.g. ``"exact"``
    diffusion and a linear nilpotent reaction).
    """

    scheme = "diffusion-reaction"

    def __init__(self, channels: int, nt: int = 3, h: float = 1.0, *, operator: OperatorSpec = "depthwise",
                 operator_kwargs: dict | None = None, reaction_operator: OperatorSpec = "pointwise",
                 reaction_operator_kwargs: dict | None = None, splitting: str = "lie", diffusion: str = "explicit",
                 reaction: str = "symmetric", activation: str = "relu", normalization: str = "none",
                 bias: bool = True, **kwargs):
        super().__init__(channels, nt, h, **kwargs)
        if splitting not in SPLITTINGS:
            raise ValueError(f"unknown splitting {splitting!r}; expected one of {SPLITTINGS}")
        self.diffusion_step = diffusion_step(diffusion)
        if reaction not in ("symmetric", "general"):
            raise ValueError(f"unknown reaction {reaction!r}; expected 'symmetric' or 'general'")
        self.splitting, self.diffusion, self.reaction = splitting, diffusion, reaction
        diffusion_factory = operator_factory(operator, operator_kwargs)
        reaction_factory = operator_factory(reaction_operator, reaction_operator_kwargs)

        def make_step(j):
            k = _new_operator(diffusion_factory, channels, channels, f"diffusion K of step {j}")
            if diffusion != "explicit" and k.boundary != "circular":
                raise ValueError(f"{diffusion} diffusion is solved by FFT on a periodic grid and needs "
                                 f"boundary='circular' (pass operator_kwargs={{'boundary': 'circular'}})")
            p = _new_operator(reaction_factory, channels, channels, f"reaction P of step {j}")
            if reaction == "symmetric":
                f = SymmetricLayer(p, activation, normalization, bias)
            else:
                p2 = _new_operator(reaction_factory, channels, channels, f"reaction P₂ of step {j}")
                f = GeneralLayer(p, p2, activation, normalization, bias)
            return DiffusionReactionStep(k, f)

        self._build_steps(make_step)
        self._check_stabilize(has_bound=normalization != "tv" and reaction == "symmetric",
                              scale_invariant=normalization != "none")

    def step(self, j, y):
        w, h = self.weights(j), self.h
        if self.splitting == "lie":
            return self.diffusion_step(y + h * w.reaction(y), w.diffusion, h)
        y = self.diffusion_step(y, w.diffusion, h / 2)
        return self.diffusion_step(y + h * w.reaction(y), w.diffusion, h / 2)

    def linearize(self, j, y):
        w, h = self.weights(j), float(self.h)
        k = w.diffusion
        h_d = h if self.splitting == "lie" else h / 2
        point = y if self.splitting == "lie" else self.diffusion_step(y, k, h_d)  # where R_h is evaluated
        reaction_scheme = "parabolic" if self.reaction == "symmetric" else "euler"
        return [Linearization(f"step {j} reaction", reaction_scheme, w.reaction, point, h),
                Linearization(f"step {j} diffusion", f"diffusion-{self.diffusion}", lambda x: -k.adjoint(k(x)), y, h_d)]

    def uncounted_flops(self, input_shape) -> int:
        """FLOPs of ``forward`` that PyTorch's counter does not see: the FFTs of implicit or exact diffusion
        (see :func:`pdenet.diffusion.fourier_diffusion_flops`); 0 for explicit diffusion."""
        if self.diffusion == "explicit":
            return 0
        per_step = 1 if self.splitting == "lie" else 2
        return sum(per_step * fourier_diffusion_flops(self.weights(j).diffusion, input_shape, self.diffusion)
                   for j in range(self.nt))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, splitting={self.splitting!r}, diffusion={self.diffusion!r}, "
                f"reaction={self.reaction!r}")

    def step_stability(self, j, grid, method):
        w = self.weights(j)
        if self.reaction == "symmetric":
            law = "reaction Jacobian −PᵀDP has eigenvalues in [−g‖P‖², 0]; forward Euler: h ≤ 2/(g‖P‖²)"
            reaction = symmetric_stability("parabolic", [w.reaction], grid, method, law)
        else:
            reaction = general_stability(w.reaction, grid, method)
        norm, text = _norm_of(w.diffusion, grid, method)
        fraction = self._diffusion_fraction
        if self.diffusion == "explicit":
            bound = scheme_step_bound("diffusion-explicit", norm) / fraction
            law = ("explicit diffusion: eigenvalues of KᵀK in [0, ‖K‖²]; "
                   + ("h ≤ 2/‖K‖²" if fraction == 1 else "sub-steps of h/2: h ≤ 4/‖K‖²"))
            half = _amplification("diffusion-explicit", -np.linspace(0.0, 1.0, 2001) ** 2 * norm ** 2)
            amplification = lambda h: half(fraction * h) ** round(1 / fraction)  # noqa: E731
        else:
            bound = math.inf
            law = f"{self.diffusion} diffusion: stable for every h (KᵀK symmetric positive semi-definite)"
            amplification = lambda h: 1.0  # noqa: E731
        return _combine([reaction, StepStability(bound, norm, (law, text), amplification)], composite=True)

    @property
    def _diffusion_fraction(self) -> float:
        """The fraction of ``h`` one diffusion sub-step takes (Lie 1, Strang ½)."""
        return 1.0 if self.splitting == "lie" else 0.5

    def _device_bound(self, j, grid, active=None):
        if grid is None or self.reaction != "symmetric":
            return super()._device_bound(j, grid, active)
        w = self.weights(j)
        reaction = _device_symmetric_bound("parabolic", [w.reaction], grid, active)
        norm = _tracked_norm(w.diffusion, grid, active)
        if self.diffusion == "explicit":
            diffusion = _device_step_bound("diffusion-explicit", norm) / self._diffusion_fraction
        else:
            diffusion = torch.full_like(norm, math.inf)
        return torch.minimum(reaction, diffusion)


def build_block(scheme: str, channels: int, nt: int = 3, h: float = 1.0, operator: OperatorSpec | None = None,
                operator_kwargs: dict | None = None, **block_kwargs) -> TimeSteppingBlock:
    """The block of ``scheme`` (a name in :data:`SCHEMES`) with ``nt`` steps of size ``h`` at width ``channels``.

    ``operator``: a kind name for ``operators.registry.make_operator`` or a callable ``(in_ch, out_ch) ->
    ConvOperator``; ``None`` takes the scheme's default (``"lean"`` for the layer schemes, ``"depthwise"``
    diffusion for ``"diffusion-reaction"``, whose reaction operator is ``reaction_operator="pointwise"``).
    ``block_kwargs`` go to the scheme's class (``shared_weights``, ``learn_h``, ``stabilize``, ``activation``,
    ``normalization``, ...).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {tuple(SCHEMES)}")
    if operator is not None:
        block_kwargs["operator"] = operator
    return SCHEMES[scheme](channels, nt, h, operator_kwargs=operator_kwargs, **block_kwargs)


def time_stepping_blocks(model: nn.Module) -> Iterator[tuple[str, TimeSteppingBlock]]:
    """``(name, block)`` for every time-stepping block inside ``model`` (``model`` itself included)."""
    for name, module in model.named_modules():
        if isinstance(module, TimeSteppingBlock):
            yield name or type(module).__name__, module
