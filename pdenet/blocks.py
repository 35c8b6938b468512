"""Time-stepping residual blocks: ``nt`` steps of size ``h`` of a discretized ODE ``∂_t Y = F(Y, θ(t))``.

Each scheme is a small class registered by name in :data:`SCHEMES` (torchdiffeq style): it says how to start
(``initial_state``), how to take step ``j`` (``step``), what to output (``output``), how to linearize a step
for the Jacobian analysis (``linearize``) and how large ``h`` may be from its current weights
(``step_stability``). Everything else lives once in :class:`TimeSteppingBlock`.

========================  ==========================================================================
scheme                    step ``j`` (``F_j(Y) = −K_jᵀ σ(N(K_j Y + b_j))``, ``G_j(Y) = K₂σ(N(K₁Y + b))``)
========================  ==========================================================================
``"parabolic"``           ``Y ← Y + h F_j(Y)``                     bound ``h ≤ 2 / (g ‖K‖²)``
``"euler"``               ``Y ← Y + h G_j(Y)``                     bound from the eigenvalues of ``K₂K₁``
``"leapfrog"``            ``Y⁺ = 2Y − Y⁻ + h² F_j(Y)``, ``Y⁻ = Y₀``  bound ``h ≤ 2 / (√g ‖K‖)``
``"hamiltonian"``         ``Z ← Z + h F¹_j(Y)``, ``Y ← Y − h F²_j(Z)``, ``Z₀ = 0`` (Verlet)
``"diffusion-reaction"``  Lie ``D_h ∘ R_h``, Strang ``D_{h/2} ∘ R_h ∘ D_{h/2}``; ``R_h Y = Y + h f(Y)``
                          with pointwise operators, ``D_h`` a diffusion step with a depthwise ``K``
========================  ==========================================================================

``g`` bounds ``σ'·N'`` (see :meth:`pdenet.layers.SymmetricLayer.slope`). The bounds come from the scheme
stability functions in :mod:`operators.stability`; the assumptions behind each are returned with it.
:func:`build_block` is the factory used by the networks.
"""
from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
from torch import nn

from operators import ConvOperator
from operators.base import as_grid, check_positive_int
from operators.registry import make_operator
from operators.stability import max_stable_step, step_bound as scheme_step_bound

from .diffusion import diffusion_step, fourier_diffusion_flops
from .layers import GeneralLayer, SymmetricLayer

OperatorSpec = str | Callable[[int, int], ConvOperator]
STABILIZERS = ("rescale-h", "project-norm")
SPLITTINGS = ("lie", "strang")
#: grid on which the eigenvalues of ``K̂₂(ω)K̂₁(ω)`` are sampled when no grid is given.
EIGENVALUE_GRID = (16, 16)


@dataclass(frozen=True)
class StepStability:
    """The stability of one step (or a whole block): the largest stable ``h`` (``inf``: every ``h``;
    ``None``: no bound available), the largest operator norm involved, and the assumptions used."""

    bound: float | None
    norm: float
    assumptions: tuple[str, ...]


class Linearization(NamedTuple):
    """One term of a step, linearized: ``z = h^m·λ`` for the eigenvalues ``λ`` of ``∂fn/∂x`` at ``point``
    must lie in the stability region of ``scheme`` (a name of :mod:`operators.stability`, whose test
    equation ``y^(m) = λ y`` fixes ``m``: 2 for leapfrog and Verlet, whose ``fn`` is the second-order
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


def _tracked_norm(op: ConvOperator, grid: tuple[int, int], warm_iterations: int = 2, cold_iterations: int = 100) -> float:
    """``‖K‖`` on ``grid`` by power iteration on ``KᵀK`` warm-started from the previous call's vector.

    As in spectral normalization: while the weights change slowly between optimizer steps, two iterations
    per call keep the estimate (a lower estimate, ``√‖KᵀKv‖`` for a unit ``v``) close to the norm.
    """
    p = next(op.parameters())
    v = _POWER_VECTORS.get(op)
    iterations = warm_iterations
    if v is None or tuple(v.shape[-2:]) != grid or v.dtype != p.dtype or v.device != p.device:
        v = torch.randn(1, op.in_channels, *grid, dtype=p.dtype, device=p.device)
        iterations = cold_iterations
    sigma2 = 0.0
    for _ in range(iterations):
        w = op.adjoint(op(v / v.norm()))
        sigma2 = float(w.norm())
        if sigma2 == 0.0:
            break
        v = w
    _POWER_VECTORS[op] = v
    return math.sqrt(sigma2)


def _norm_of(op: ConvOperator, grid, method: str) -> tuple[float, str]:
    """``‖K‖`` and the sentence saying what kind of number it is."""
    if method == "tracked":
        return _tracked_norm(op, grid), f"‖K‖ tracked by warm-started power iteration on the {grid[0]}x{grid[1]} grid"
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


def _symmetric_stability(scheme: str, layers: list[SymmetricLayer], grid, method: str, law: str) -> StepStability:
    """Bound of a scheme whose linearized step involves ``−K_iᵀ D_i K_i`` only: the scheme's
    ``step_bound`` at ``Π_i √g_i ‖K_i‖``."""
    norms, texts = [], [law]
    scale = 1.0
    for layer in layers:
        norm, text = _norm_of(layer.op, grid, method)
        norms.append(norm)
        texts += [text, _slope_text(layer)]
        g = layer.slope()
        scale = None if (g is None or scale is None) else scale * math.sqrt(g) * norm
    bound = None if scale is None else scheme_step_bound(scheme, scale)
    return StepStability(bound, max(norms), tuple(dict.fromkeys(texts)))


def _general_stability(layer: GeneralLayer, grid, method: str) -> StepStability:
    """Forward Euler with ``K₂ D K₁``: linearized at ``D = g I``, eigenvalues of ``g K̂₂(ω) K̂₁(ω)``."""
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
    return StepStability(float(max_stable_step("euler", eigenvalues)), max(n for n, _ in norms), tuple(texts))


def _combine(parts: list[StepStability]) -> StepStability:
    bounds = [p.bound for p in parts]
    return StepStability(
        None if any(b is None for b in bounds) else min(bounds),
        max(p.norm for p in parts),
        tuple(dict.fromkeys(a for p in parts for a in p.assumptions)),
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
    """

    scheme: str = ""
    #: ``bound(c·K) = bound(K) / c**bound_degree`` when every operator of a step is scaled by ``c``.
    bound_degree: int = 2
    reversible: bool = False

    def __init__(self, channels: int, nt: int = 3, h: float = 1.0, *, shared_weights: bool = False,
                 learn_h: bool = False, stabilize: str | None = None, safety: float = 0.9):
        super().__init__()
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

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        self._check_input(y)
        self._grid = tuple(y.shape[-2:])
        state = self.initial_state(y)
        for j in range(self.nt):
            state = self.step(j, state)
            for hook in self._step_hooks:
                hook(self, j, self.output(state))
        return self.output(state)

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
        return _combine([self.step_stability(j, grid, method) for j in range(len(self.steps))])

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
        """
        if self.stabilize is None:
            return
        grid = self._grid if grid is None else as_grid(grid)
        method = "symbol" if grid is None else "tracked"
        h = float(self.h)
        if self.stabilize == "rescale-h":
            bound = _combine([self.step_stability(j, grid, method) for j in range(len(self.steps))]).bound
            if bound is None:
                warnings.warn(f"{self.scheme!r} block: no step bound available now, h left at {h:.4g}")
            elif h > self.safety * bound:
                self.set_h(self.safety * bound)
            return
        for j in range(len(self.steps)):
            ops = [m for m in self.weights(j).modules() if isinstance(m, ConvOperator)]
            for _ in range(3):  # exact in one pass for operators linear in their weights
                bound = self.step_stability(j, grid, method).bound
                if bound is None or h <= self.safety * bound * (1 + 1e-9):
                    break
                factor = (self.safety * bound / h) ** (1 / self.bound_degree)
                for op in ops:
                    for p in op.parameters():
                        p.mul_(factor)

    def extra_repr(self) -> str:
        text = f"scheme={self.scheme!r}, channels={self.channels}, nt={self.nt}, h={float(self.h):.4g}"
        if self.shared_weights:
            text += ", shared_weights=True"
        if isinstance(self.log_h, nn.Parameter):
            text += ", learn_h=True"
        if self.stabilize:
            text += f", stabilize={self.stabilize!r}"
        return text


SCHEMES: dict[str, type[TimeSteppingBlock]] = {}


def register(cls: type[TimeSteppingBlock]) -> type[TimeSteppingBlock]:
    SCHEMES[cls.scheme] = cls
    return cls


# ---------------------------------------------------------------------------------------- schemes
class _LayerBlock(TimeSteppingBlock):
    """Blocks whose steps are layers built from one operator kind (``operator``, ``hidden_channels``)."""

    closed_bound = True  # a guaranteed step bound exists (given a slope bound g)

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


@register
class ParabolicBlock(_LayerBlock):
    """Forward Euler with the symmetric layer: ``Y ← Y − h K_jᵀ σ(N(K_j Y + b_j))``."""

    scheme = "parabolic"

    def step(self, j, y):
        return y + self.h * self.weights(j)(y)

    def linearize(self, j, y):
        return [Linearization(f"step {j}", "parabolic", self.weights(j), y, float(self.h))]

    def step_stability(self, j, grid, method):
        law = "Jacobian −KᵀDK has eigenvalues in [−g‖K‖², 0]; forward Euler: h ≤ 2/(g‖K‖²)"
        return _symmetric_stability("parabolic", [self.weights(j)], grid, method, law)


@register
class EulerBlock(_LayerBlock):
    """Forward Euler with the general layer: ``Y ← Y + h K₂ σ(N(K₁ Y + b))`` (``K₁: c -> m``, ``K₂: m -> c``)."""

    scheme = "euler"
    closed_bound = False

    def make_layer(self, factory, j, activation, normalization, bias):
        op1 = _new_operator(factory, self.channels, self.hidden_channels, f"K₁ of step {j}")
        op2 = _new_operator(factory, self.hidden_channels, self.channels, f"K₂ of step {j}")
        return GeneralLayer(op1, op2, activation, normalization, bias)

    def step(self, j, y):
        return y + self.h * self.weights(j)(y)

    def linearize(self, j, y):
        return [Linearization(f"step {j}", "euler", self.weights(j), y, float(self.h))]

    def step_stability(self, j, grid, method):
        return _general_stability(self.weights(j), grid, method)


@register
class LeapfrogBlock(_LayerBlock):
    """Second-order (hyperbolic) leapfrog: ``Y_{j+1} = 2Y_j − Y_{j−1} − h² K_jᵀ σ(N(K_j Y_j + b_j))``.

    The state is the pair ``(Y_{j−1}, Y_j)``, started at ``(Y₀, Y₀)`` (zero initial velocity). The scheme
    is time-reversible: ``Y_{j−1} = 2Y_j − Y_{j+1} + h² F_j(Y_j)``. Linearized, ``Y'' = −KᵀDK Y`` with the
    eigenvalues of ``KᵀDK`` in ``[0, g‖K‖²]``; stable while ``h²λ ∈ [−4, 0]``.
    """

    scheme = "leapfrog"
    bound_degree = 1
    reversible = True

    def initial_state(self, y):
        return (y, y)

    def output(self, state):
        return state[1]

    def step(self, j, state):
        y_prev, y = state
        return (y, 2 * y - y_prev + self.h ** 2 * self.weights(j)(y))

    def inverse_step(self, j, state):
        y, y_next = state
        return (2 * y - y_next + self.h ** 2 * self.weights(j)(y), y)

    def linearize(self, j, state):
        return [Linearization(f"step {j}", "leapfrog", self.weights(j), state[1], float(self.h))]

    def step_stability(self, j, grid, method):
        law = "Y'' = −KᵀDK Y with eigenvalues of KᵀDK in [0, g‖K‖²]; leapfrog: h ≤ 2/(√g‖K‖)"
        return _symmetric_stability("leapfrog", [self.weights(j)], grid, method, law)


class HamiltonianStep(nn.Module):
    """Weights of one Verlet step: ``F¹(Y) = −K₁ᵀσ(K₁Y + b₁)`` drives ``Z``, ``F²(Z) = −K₂ᵀσ(K₂Z + b₂)`` drives ``Y``."""

    def __init__(self, f1: SymmetricLayer, f2: SymmetricLayer):
        super().__init__()
        self.f1 = f1
        self.f2 = f2


@register
class HamiltonianBlock(_LayerBlock):
    """Verlet (symplectic Euler) for ``Y' = K₂ᵀσ(K₂Z)``, ``Z' = −K₁ᵀσ(K₁Y)``:
    ``Z ← Z − h K₁ᵀσ(N(K₁Y + b₁))``, then ``Y ← Y + h K₂ᵀσ(N(K₂Z + b₂))``, with ``Z₀ = 0``.

    Linearized, ``Y'' = −BA Y`` with ``A = K₁ᵀD₁K₁``, ``B = K₂ᵀD₂K₂``; the eigenvalues ``μ`` of ``BA`` lie in
    ``[0, g₁g₂‖K₁‖²‖K₂‖²]`` and the step is stable for ``h√μ ≤ 2``. Reversible.
    """

    scheme = "hamiltonian"
    reversible = True

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

    def step_stability(self, j, grid, method):
        w = self.weights(j)
        law = "Y'' = −K₂ᵀD₂K₂K₁ᵀD₁K₁ Y; Verlet: h ≤ 2/(√(g₁g₂)‖K₁‖‖K₂‖)"
        return _symmetric_stability("hamiltonian", [w.f1, w.f2], grid, method, law)


class DiffusionReactionStep(nn.Module):
    """Weights of one split step: ``diffusion`` (``K``, ``c -> c``) and ``reaction`` (a layer of pointwise ops)."""

    def __init__(self, diffusion: ConvOperator, reaction: nn.Module):
        super().__init__()
        self.diffusion = diffusion
        self.reaction = reaction


@register
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
            reaction = _symmetric_stability("parabolic", [w.reaction], grid, method, law)
        else:
            reaction = _general_stability(w.reaction, grid, method)
        norm, text = _norm_of(w.diffusion, grid, method)
        fraction = 1.0 if self.splitting == "lie" else 0.5
        if self.diffusion == "explicit":
            bound = scheme_step_bound("diffusion-explicit", norm) / fraction
            law = ("explicit diffusion: eigenvalues of KᵀK in [0, ‖K‖²]; "
                   + ("h ≤ 2/‖K‖²" if fraction == 1 else "sub-steps of h/2: h ≤ 4/‖K‖²"))
        else:
            bound = math.inf
            law = f"{self.diffusion} diffusion: stable for every h (KᵀK symmetric positive semi-definite)"
        return _combine([reaction, StepStability(bound, norm, (law, text))])


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
