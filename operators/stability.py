"""The stability contract of a time-stepping scheme: its stability function, its region, its step bound.

Each scheme is registered by name in ``SCHEMES`` with the linear test equation it is analysed on,

    y^(m) = λ y,   m = ``derivative_order`` (1 for first-order schemes, 2 for leapfrog and Verlet),

and its *stability function* ``R(z)``, ``z = h^m λ``: the amplification factor of one step (for a two-step
scheme, the root of largest modulus of its characteristic polynomial). The *region* is ``{z : |R(z)| ≤ 1}``.
One generic helper, :func:`max_stable_step`, turns any spectrum ``λ`` (e.g. the eigenvalues of a block's
Jacobian) and a scheme into the largest stable step; :func:`step_bound` is the same helper applied to the
extreme eigenvalue ``−‖K‖²`` of the symmetric linearizations the blocks are built on.

=====================  ======================  ==========================  ======================================
scheme                 step (linearized)       ``R(z)``                    bound from a norm
=====================  ======================  ==========================  ======================================
``euler``              y ← y + h F(y)          ``1 + z``                   none (general Jacobian: use a spectrum)
``parabolic``          F = −K^T D K            ``1 + z``                   ``h ≤ 2/‖K‖²``
``leapfrog``           y'' = −K^T D K y        root of ξ² − (2+z)ξ + 1     ``h ≤ 2/‖K‖``
``hamiltonian``        Verlet, two operators   root of ξ² − (2+z)ξ + 1     ``h ≤ 2/(‖K₁‖ ‖K₂‖)``
``diffusion-explicit`` y ← y − h K^T K y       ``1 + z``                   ``h ≤ 2/max_ω |ŝ(ω)|²``
``diffusion-implicit`` (I + hK^T K) y⁺ = y     ``1/(1 − z)``               none needed: every ``h``
``diffusion-exact``    y⁺ = exp(−hK^T K) y     ``e^z``                     none needed: every ``h``
``implicit-euler``     y⁺ = y + h F(y⁺)        ``1/(1 − z)``               every ``h`` (spectrum in Re z ≤ 0)
``crank-nicolson``     θ-method, θ = ½         ``(1 + z/2)/(1 − z/2)``     every ``h`` (spectrum in Re z ≤ 0)
``rk2``                Heun, two stages        ``1 + z + z²/2``            ``h ≤ 2/‖K‖²``
``rk4``                classical, four stages  ``Σ_{m≤4} z^m/m!``          ``h ≤ 2.785…/‖K‖²``
=====================  ======================  ==========================  ======================================

The θ-method ``y⁺ = y + h[θF(y⁺) + (1 − θ)F(y)]`` for any ``θ`` has the contract :func:`theta_scheme`. The region
of a scheme is drawn as the set ``|R(z)| ≤ 1`` itself (``pdenet.plots.plot_region``); :func:`region_reach`
frames it.

``D = diag(σ')`` with ``σ' ∈ [0, 1]`` (ReLU, tanh, ...) and no normalization: then the spectrum of
``−K^T D K`` lies in ``[−‖K‖², 0]``. For Verlet on ``Z' = −K₁^T D₁ K₁ Y``, ``Y' = K₂^T D₂ K₂ Z`` the
second-order form is ``Y'' = −A Y`` with ``A = K₂^T D₂ K₂ K₁^T D₁ K₁``, whose eigenvalues are real, ≥ 0 and
at most ``‖K₁‖² ‖K₂‖²``: the leapfrog bound with ``‖K‖`` replaced by the product of the two norms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


def _complex(z):
    """``z`` as a complex torch tensor or numpy array (keeps torch tensors on their device)."""
    if isinstance(z, torch.Tensor):
        if z.is_complex():
            return z
        return z.to(torch.complex128 if z.dtype == torch.float64 else torch.complex64)
    return np.asarray(z, dtype=np.complex128)


def _euler_R(z):
    """Forward Euler: ``R(z) = 1 + z``."""
    return 1 + _complex(z)


def _implicit_euler_R(z):
    """Backward Euler: ``R(z) = 1 / (1 − z)`` (``inf``/``nan`` at the pole ``z = 1``, outside the region)."""
    z = _complex(z)
    if isinstance(z, torch.Tensor):
        return 1 / (1 - z)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1 / (1 - z)


def _leapfrog_R(z):
    """Root of largest modulus of ``ξ² − (2 + z) ξ + 1 = 0`` (the two roots have product 1; of two on the
    unit circle, the one with ``Im ξ ≥ 0``).

    Leapfrog ``y_{n+1} = 2 y_n − y_{n−1} + h² λ y_n`` on ``y'' = λ y`` with ``z = h² λ``; Störmer–Verlet on
    the equivalent first-order system has the same characteristic polynomial.
    """
    z = _complex(z)
    sqrt, where = (torch.sqrt, torch.where) if isinstance(z, torch.Tensor) else (np.sqrt, np.where)
    b = 2 + z
    d = sqrt(b * b - 4)
    plus, minus = (b + d) / 2, (b - d) / 2
    big, small = abs(plus), abs(minus)
    tie = abs(big - small) <= 1e-12 * (big + small)  # both on the unit circle: take the one with Im ξ ≥ 0
    return where(tie, where(plus.imag >= minus.imag, plus, minus), where(big > small, plus, minus))


def _exp_R(z):
    """The exact flow: ``R(z) = e^z``."""
    z = _complex(z)
    return torch.exp(z) if isinstance(z, torch.Tensor) else np.exp(z)


def taylor_polynomial(stages: int) -> Callable:
    """``R(z) = Σ_{m=0}^{s} z^m / m!``: the stability function of every explicit ``s``-stage Runge–Kutta method of
    order ``s`` (``s ≤ 4``): forward Euler (``s = 1``), Heun and the midpoint rule (2), classical RK4 (4)."""
    coefficients = [1 / math.factorial(m) for m in range(check_stages(stages) + 1)]

    def R(z):
        out = 0 * z + coefficients[-1]
        for c in reversed(coefficients[:-1]):  # Horner
            out = out * z + c
        return out

    R.__doc__ = f"``R(z) = Σ_{{m≤{stages}}} z^m/m!`` (explicit Runge–Kutta of order {stages})."
    return R


def check_stages(stages) -> int:
    if isinstance(stages, bool) or not isinstance(stages, (int, np.integer)) or stages < 1:
        raise ValueError(f"stages must be a positive integer, got {stages!r}")
    return int(stages)


def theta_function(theta: float) -> Callable:
    """``R(z) = (1 + (1 − θ) z) / (1 − θ z)``: the θ-method ``y⁺ = y + h[θ F(y⁺) + (1 − θ) F(y)]`` (θ = 0 forward
    Euler, ½ Crank–Nicolson, 1 backward Euler). A-stable (every ``z`` with ``Re z ≤ 0``) exactly for ``θ ≥ ½``."""
    theta = check_theta(theta)

    def R(z):
        if isinstance(z, torch.Tensor):
            return (1 + (1 - theta) * z) / (1 - theta * z)
        with np.errstate(divide="ignore", invalid="ignore"):
            return (1 + (1 - theta) * z) / (1 - theta * z)

    R.__doc__ = f"``R(z) = (1 + {1 - theta:g} z) / (1 − {theta:g} z)`` (θ-method, θ = {theta:g})."
    return R


def check_theta(theta) -> float:
    if isinstance(theta, bool) or not isinstance(theta, (int, float, np.floating)) or not 0 <= theta <= 1:
        raise ValueError(f"theta must be a number in [0, 1], got {theta!r}")
    return float(theta)


@dataclass(frozen=True)
class Scheme:
    """A time-stepping scheme's stability contract.

    ``stability_function(z)``: amplification of one step on ``y^(m) = λ y`` at ``z = h^m λ``, ``m =
    derivative_order``; it receives complex numpy arrays or complex torch tensors (see :meth:`amplification`),
    so a polynomial or a rational function of ``z`` written with ``+ - * /`` is enough. ``norm``: what ``norm``
    means in :func:`step_bound` (the extreme eigenvalue of the linearization is ``−norm²``), or ``None`` when the
    scheme has no bound from a norm. ``real_interval``: the stable part ``[a, b]`` of the real ``z`` axis that
    contains 0 (used exactly for real spectra); left out, it is computed from ``stability_function`` by a scan
    and bisection along the real axis for ``|R| ≤ 1`` (to rounding; give it for a region without interior, such
    as leapfrog's segment, where rounding decides). ``order``: the order of accuracy, when known.
    """

    name: str
    description: str
    stability_function: Callable
    derivative_order: int = 1
    norm: str | None = "‖K‖₂"
    assumptions: str = ""
    real_interval: tuple[float, float] | None = None
    order: int | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"a scheme's name must be a non-empty string, got {self.name!r}")
        if not callable(self.stability_function):
            raise TypeError(f"scheme {self.name!r}: stability_function must be callable, got "
                            f"{type(self.stability_function).__name__}")
        if self.derivative_order not in (1, 2):
            raise ValueError(f"scheme {self.name!r}: derivative_order must be 1 or 2, got {self.derivative_order!r}")
        r0 = complex(np.asarray(self.amplification(np.zeros(1)))[0])
        if not abs(r0 - 1) <= 1e-12:
            raise ValueError(f"scheme {self.name!r}: R(0) must be 1 (a consistent scheme keeps constants), got {r0}")
        if self.real_interval is None:
            left, right = _ray_bounds(self, np.array([-1.0 + 0j, 1.0 + 0j]), tol=0.0)
            object.__setattr__(self, "real_interval", (-float(left), float(right)))

    def amplification(self, z):
        """``R(z)`` for ``z`` of any real or complex dtype (numpy, torch, Python numbers)."""
        return self.stability_function(_complex(z))


_SIGMA = "σ' ∈ [0, 1], no normalization (N = identity), linearized at the current weights"
_A_STABLE = "A-stable: every h for a spectrum in the closed left half-plane (symmetric layer); " + _SIGMA

SCHEMES: dict[str, Scheme] = {}


def register_scheme(scheme: Scheme) -> Scheme:
    """Add the stability contract ``scheme`` to ``SCHEMES`` under its name (a name can be registered once).

    Blocks register theirs through :func:`pdenet.register_scheme`, which calls this.
    """
    if not isinstance(scheme, Scheme):
        raise TypeError(f"register_scheme expects an operators.stability.Scheme, got {type(scheme).__name__}")
    if scheme.name in SCHEMES:
        raise ValueError(f"a stability contract named {scheme.name!r} is already registered")
    SCHEMES[scheme.name] = scheme
    return scheme


def get_scheme(scheme: str | Scheme) -> Scheme:
    """The registered :class:`Scheme` named ``scheme`` (a ``Scheme`` passes through)."""
    if isinstance(scheme, Scheme):
        return scheme
    if not isinstance(scheme, str):
        raise TypeError(f"scheme must be a name or a Scheme, got {type(scheme).__name__}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; known schemes: {', '.join(SCHEMES)}")
    return SCHEMES[scheme]


def stability_function(scheme: str | Scheme) -> Callable:
    """``R``: ``z ↦`` amplification of one step, for real or complex numpy arrays, torch tensors and numbers."""
    return get_scheme(scheme).amplification


def in_stability_region(scheme: str | Scheme, z, tol: float = 1e-12):
    """``|R(z)| ≤ 1 + tol`` elementwise: a bool for a scalar, a bool array/tensor otherwise.

    ``tol`` absorbs rounding for regions whose interior is empty (leapfrog: the segment ``[−4, 0]``,
    where both roots lie on the unit circle).
    """
    r = get_scheme(scheme).amplification(z)
    if isinstance(r, torch.Tensor):
        return r.abs() <= 1 + tol
    inside = np.abs(r) <= 1 + tol
    return bool(inside) if inside.ndim == 0 else inside


def _as_spectrum(eigenvalues) -> np.ndarray:
    if isinstance(eigenvalues, torch.Tensor):
        eigenvalues = eigenvalues.detach().cpu().numpy()
    try:
        lam = np.asarray(eigenvalues, dtype=np.complex128).ravel()
    except (TypeError, ValueError):
        raise TypeError(f"eigenvalues must be an array of (complex) numbers, got {type(eigenvalues).__name__}") \
            from None
    if lam.size == 0:
        raise ValueError("eigenvalues is empty: a stable step needs at least one eigenvalue")
    if not np.all(np.isfinite(lam)):
        raise ValueError("eigenvalues contain inf or nan")
    return lam


def _ray_bounds(scheme: Scheme, direction: np.ndarray, tol: float, s_min: float = 1e-4, s_max: float = 1e6,
                samples: int = 301, iterations: int = 64) -> np.ndarray:
    """For each unit ``direction`` ``d``: ``sup{s : s' d in the region for all s' in (0, s]}``.

    Geometric scan of ``s`` over ``[s_min, s_max]`` for the first unstable sample, then bisection between it
    and the last stable one. A ray unstable already at ``s_min`` gives 0; one stable up to ``s_max``, ``inf``.
    """
    s = np.geomspace(s_min, s_max, samples)
    bad = ~in_stability_region(scheme, direction[:, None] * s[None, :], tol)
    first = np.where(bad.any(axis=1), bad.argmax(axis=1), samples)
    out = np.where(first == samples, math.inf, 0.0)
    todo = (first > 0) & (first < samples)
    if todo.any():
        d = direction[todo]
        lo, hi = s[first[todo] - 1], s[first[todo]]
        for _ in range(iterations):
            mid = np.sqrt(lo * hi)
            ok = in_stability_region(scheme, d * mid, tol)
            lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
        out[todo] = lo
    return out


def max_stable_step(scheme: str | Scheme, eigenvalues, rtol_real: float = 1e-10, tol: float = 1e-12) -> float:
    """Largest ``h`` such that every step in ``(0, h]`` keeps ``h^m λ`` in the region for all ``λ``.

    ``eigenvalues``: any complex spectrum (numpy, torch, list), e.g. a Jacobian's. Eigenvalues with
    ``|Im λ| ≤ rtol_real |λ|`` are taken as real (eigensolver noise) and treated exactly with the scheme's
    ``real_interval [a, b]``: ``t ≤ a/λ`` for ``λ < 0``, ``t ≤ b/λ`` for ``λ > 0``. The others are bounded by
    a scan and bisection along the ray ``t λ`` for ``|R| ≤ 1 + tol`` (about 1e-10 relative for the default
    ``tol``; a ray whose stable part is shorter than ``1e-4/|λ|`` counts as unstable). Returns ``h = t^{1/m}``: ``inf`` when every ``h`` is stable, 0 when
    none is (e.g. forward Euler with an eigenvalue in the right half-plane).
    """
    s = get_scheme(scheme)
    lam = _as_spectrum(eigenvalues)
    lam = lam[lam != 0]  # R(0) = 1: a zero eigenvalue never limits the step
    if lam.size == 0:
        return math.inf
    mag = np.abs(lam)
    real = np.abs(lam.imag) <= rtol_real * mag
    a, b = s.real_interval
    lr = lam.real[real]
    bounds = [a / lr[lr < 0], b / lr[lr > 0], _ray_bounds(s, lam[~real] / mag[~real], tol) / mag[~real]]
    t = float(np.concatenate(bounds).min(initial=math.inf))
    return t ** (1.0 / s.derivative_order)


def step_bound(scheme: str | Scheme, norm: float) -> float:
    """Closed-form step bound from an operator norm: :func:`max_stable_step` on the spectrum ``{−norm²}``.

    ``norm`` is what ``SCHEMES[scheme].norm`` says (``‖K‖`` for "parabolic"/"leapfrog", ``‖K₁‖ ‖K₂‖`` for
    "hamiltonian", ``max_ω |ŝ(ω)|`` for diffusion). Gives ``2/norm²`` ("parabolic", "diffusion-explicit"),
    ``2/norm`` ("leapfrog", "hamiltonian") and ``inf`` (implicit schemes); ``inf`` when ``norm == 0``.
    """
    s = get_scheme(scheme)
    if s.norm is None:
        raise ValueError(f"scheme {s.name!r} has no step bound from an operator norm ({s.assumptions}); "
                         f"known closed forms: {', '.join(n for n, v in SCHEMES.items() if v.norm)}")
    try:
        norm = float(norm)
    except (TypeError, ValueError):
        raise TypeError(f"norm must be a real number, got {type(norm).__name__}") from None
    if not math.isfinite(norm) or norm < 0:
        raise ValueError(f"norm must be finite and non-negative, got {norm}")
    if norm == 0:
        return math.inf
    return max_stable_step(s, [-norm * norm])


def region_reach(scheme: str | Scheme, directions: int = 72) -> float:
    """The largest ``|z|`` at which a ray from 0 leaves the region ``|R(z)| ≤ 1``, over ``directions`` rays evenly
    spaced in angle (rays that stay inside up to ``|z| = 10⁶`` are left out; 0 when no ray leaves). Frames plots
    of the region: the disc of this radius holds every bounded part of it that is reached from 0."""
    if isinstance(directions, bool) or not isinstance(directions, (int, np.integer)) or directions < 4:
        raise ValueError(f"directions must be an integer >= 4, got {directions!r}")
    s = get_scheme(scheme)
    with np.errstate(over="ignore", invalid="ignore"):
        reach = _ray_bounds(s, np.exp(1j * np.linspace(0, 2 * np.pi, int(directions), endpoint=False)), tol=1e-9)
    finite = reach[np.isfinite(reach)]
    return float(finite.max(initial=0.0))


for _scheme in (
    Scheme("euler", "forward Euler y ← y + h F(y)", _euler_R, norm=None, order=1,
           assumptions="general layer K₂ σ(K₁ y): the Jacobian is not symmetric, so no bound follows from norms; "
                       "compute its eigenvalues and use max_stable_step"),
    Scheme("parabolic", "forward Euler on the symmetric layer F(y) = −K^T σ(K y + b)", _euler_R, order=1,
           assumptions="Jacobian −K^T D K with spectrum in [−‖K‖², 0]; " + _SIGMA),
    Scheme("leapfrog", "y_{j+1} = 2y_j − y_{j−1} − h² K^T σ(K y_j)", _leapfrog_R, 2, real_interval=(-4.0, 0.0),
           order=2, assumptions="linearization y'' = −K^T D K y with spectrum in [−‖K‖², 0]; at h = 2/‖K‖ a double "
                                "root −1 gives linear growth, every smaller h is strictly stable; " + _SIGMA),
    Scheme("hamiltonian", "Verlet: z ← z − h K₁^T σ(K₁ y), y ← y + h K₂^T σ(K₂ z)", _leapfrog_R, 2,
           norm="‖K₁‖₂ ‖K₂‖₂", real_interval=(-4.0, 0.0), order=2,
           assumptions="second-order form y'' = −K₂^T D₂ K₂ K₁^T D₁ K₁ y, spectrum in [−‖K₁‖²‖K₂‖², 0]; " + _SIGMA),
    Scheme("diffusion-explicit", "explicit diffusion y ← y − h K^T K y", _euler_R,
           norm="max_ω ‖K̂(ω)‖₂ (= max_{ω,j} |ŝ_j(ω)| for a depthwise K)", order=1,
           assumptions="L = K^T K has spectrum [0, max_ω ‖K̂(ω)‖²] on a periodic grid (an upper bound for zero "
                       "padding)"),
    Scheme("diffusion-implicit", "implicit diffusion (I + h K^T K) y⁺ = y", _implicit_euler_R,
           norm="max_ω ‖K̂(ω)‖₂", real_interval=(-math.inf, 0.0), order=1,
           assumptions="L = K^T K is symmetric positive semidefinite: |1/(1 + hλ)| ≤ 1 for every h > 0"),
    Scheme("diffusion-exact", "exact diffusion flow y⁺ = exp(−h K^T K) y", _exp_R, norm="max_ω ‖K̂(ω)‖₂",
           real_interval=(-math.inf, 0.0),
           assumptions="L = K^T K is symmetric positive semidefinite: |e^{−hλ}| ≤ 1 for every h > 0"),
    Scheme("implicit-euler", "backward Euler y⁺ = y + h F(y⁺)", _implicit_euler_R, real_interval=(-math.inf, 0.0),
           order=1, assumptions=_A_STABLE),
    Scheme("crank-nicolson", "Crank–Nicolson y⁺ = y + h/2 [F(y⁺) + F(y)]", theta_function(0.5),
           real_interval=(-math.inf, 0.0), order=2, assumptions=_A_STABLE),
    Scheme("rk2", "Heun (RK2): k₁ = F(y), k₂ = F(y + h k₁), y ← y + h/2 (k₁ + k₂)", taylor_polynomial(2), order=2,
           assumptions="R(z) = 1 + z + z²/2; real stability interval [−2, 0]; for a general layer use the "
                       "Jacobian's eigenvalues; " + _SIGMA),
    Scheme("rk4", "classical Runge–Kutta (RK4), four stages", taylor_polynomial(4), order=4,
           assumptions="R(z) = Σ_{m≤4} z^m/m!; real stability interval [−2.785…, 0]; for a general layer use the "
                       "Jacobian's eigenvalues; " + _SIGMA),
):
    register_scheme(_scheme)


def theta_scheme(theta: float) -> Scheme:
    """The stability contract of the θ-method ``y⁺ = y + h[θF(y⁺) + (1 − θ)F(y)]``: ``"implicit-euler"`` (θ = 1),
    ``"crank-nicolson"`` (θ = ½), ``"euler"`` (θ = 0), else ``"theta-<θ>"`` with ``R(z) = (1 + (1 − θ)z)/(1 − θz)``,
    registered on first use so that it is named like the others."""
    theta = check_theta(theta)
    named = {1.0: "implicit-euler", 0.5: "crank-nicolson", 0.0: "parabolic"}
    name = named.get(theta, f"theta-{theta:g}")
    if name not in SCHEMES:
        a_stable = theta >= 0.5
        register_scheme(Scheme(
            name, f"θ-method with θ = {theta:g}", theta_function(theta),
            real_interval=(-math.inf if a_stable else -2 / (1 - 2 * theta), 0.0), order=1,
            assumptions=_A_STABLE if a_stable else "θ < ½: not A-stable, real interval [−2/(1 − 2θ), 0]; " + _SIGMA))
    return SCHEMES[name]
