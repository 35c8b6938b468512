"""Stability plots, drawn with matplotlib's Agg canvas (no display, no pyplot state).

- :func:`plot_region`: the stability regions ``{z : |R(z)| ≤ 1}`` of any schemes, drawn as the set itself
  (filled contour of ``|R|`` on a grid, and its level line ``|R| = 1``), so regions with several branches
  (RK4's lobes, the outside of a disc for backward Euler) come out right; a region without interior (the
  leapfrog segment) is drawn as its real interval;
- :func:`plot_eigenvalues`: ``z = h^m λ`` of every step's linearization against the scheme's stability region,
  zoomed to the points;
- :func:`plot_growth`: perturbation growth ``‖Φ_l(Y + δ) − Φ_l(Y)‖ / ‖δ‖`` through the time steps;
- :func:`plot_singular_values`: the singular values of every operator of every block, on the periodic
  version of the grid the block acts on.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from torch import nn

from operators.stability import Scheme, get_scheme, region_reach

from .blocks import time_stepping_blocks
from .jacobian import PerturbationGrowth, StepSpectrum
from .stability import block_grids


def _grid_of_axes(n: int, width: float = 4.5, height: float = 4.0) -> tuple[Figure, list]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n)]


def _save(fig: Figure, path) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def draw_region(ax, scheme: str | Scheme, xlim: tuple[float, float], ylim: tuple[float, float], n: int = 401,
                colour: str = "#2a7a2a", label: str | None = None) -> None:
    """Shade ``{z : |R(z)| ≤ 1}`` of ``scheme`` inside the window ``xlim x ylim`` of ``ax`` and draw ``|R(z)| = 1``.

    The set is evaluated on an ``n x n`` grid of the window (a filled contour of ``|R|`` at level 1), never
    traced as a curve ``z(ξ)``. When no grid point is strictly inside (a region without interior, such as
    leapfrog's segment ``[−4, 0]``), the scheme's real interval is drawn as a thick line instead.
    """
    contract = get_scheme(scheme)
    xs = np.linspace(*xlim, n)
    ys = np.linspace(*ylim, n)
    z = xs[None, :] + 1j * ys[:, None]
    with np.errstate(all="ignore"):
        modulus = np.abs(np.asarray(contract.amplification(z)))
    modulus = np.where(np.isfinite(modulus), modulus, np.inf)
    label = label or f"|R(z)| ≤ 1 ({contract.name})"
    if (modulus < 1 - 1e-9).any():
        ax.contourf(xs, ys, np.minimum(modulus, 2.0), levels=[0.0, 1.0], colors=[colour], alpha=0.22)
        ax.contour(xs, ys, np.minimum(modulus, 2.0), levels=[1.0], colors=[colour], linewidths=1.2)
        ax.plot([], [], color=colour, lw=6, alpha=0.4, label=label)  # legend entry of the filled set
    else:
        a, b = contract.real_interval
        ax.plot([max(a, xlim[0]), min(b, xlim[1])], [0, 0], color=colour, lw=4, alpha=0.6,
                label=f"{label}: the segment [{a:g}, {b:g}]")


def _window(z: np.ndarray, reach: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Limits holding 0, every point of ``z`` and, when the points spread over more than a fifth of it, the
    region's reach (otherwise the window zooms to the points, inside or outside the shaded region)."""
    re = np.concatenate([z.real, [0.0]])
    im = np.concatenate([z.imag, [0.0]])
    span = max(np.ptp(re), np.ptp(im), 1e-6)
    if reach and reach < 5 * span:
        re = np.concatenate([re, [-reach, min(reach, 0.25 * reach + span)]])
        im = np.concatenate([im, [-0.6 * reach, 0.6 * reach]])
        span = max(np.ptp(re), np.ptp(im))
    pad = 0.08 * span
    return (float(re.min() - pad), float(re.max() + pad)), (float(im.min() - pad), float(im.max() + pad))


def plot_region(schemes: Sequence[str | Scheme] | str | Scheme, path=None, reach: float | None = None,
                title: str | None = None, ax=None):
    """The stability regions ``|R(z)| ≤ 1`` of one or more schemes on one set of axes (see :func:`draw_region`).

    ``reach``: half the width of the window (default: 1.2 times the largest :func:`operators.stability.region_reach`
    of the schemes, at least 3). Draws into ``ax`` when given (returns it), else into a new figure saved at
    ``path`` (returns the path).
    """
    schemes = [schemes] if isinstance(schemes, (str, Scheme)) else list(schemes)
    if not schemes:
        raise ValueError("no scheme to draw")
    contracts = [get_scheme(s) for s in schemes]
    if reach is None:
        reach = 1.2 * max(3.0, *(region_reach(c) for c in contracts))
    if not reach > 0:
        raise ValueError(f"reach must be positive, got {reach}")
    if ax is None and path is None:
        raise ValueError("give path= (to save a new figure) or ax= (to draw into)")
    target = ax
    if target is None:
        fig = Figure(figsize=(6.0, 5.0), layout="constrained")
        target = fig.add_subplot()
    for contract, colour in zip(contracts, _colours(len(contracts))):
        draw_region(target, contract, (-reach, 0.5 * reach), (-0.75 * reach, 0.75 * reach), colour=colour)
    target.axhline(0, color="0.6", lw=0.6)
    target.axvline(0, color="0.6", lw=0.6)
    target.set_aspect("equal")
    target.set_xlabel("Re z  (z = h^m·λ)")
    target.set_ylabel("Im z")
    target.set_title(title or "stability regions |R(z)| ≤ 1", fontsize=10)
    target.legend(fontsize=8, loc="upper left")
    return target if ax is not None else _save(fig, path)


_MARKERS = "os^vD<>ph*"


def plot_eigenvalues(spectra: Sequence[StepSpectrum], path, title: str | None = None) -> str:
    """One panel per (block, scheme): the points ``z`` of each step (own colour and marker, hollow so that
    coinciding points stay visible) over the shaded stability region, zoomed to the points and 0."""
    if not spectra:
        raise ValueError("no spectra to plot")
    panels: dict[tuple[str, str], list[StepSpectrum]] = {}
    for s in spectra:
        panels.setdefault((s.block, s.scheme), []).append(s)
    fig, axes = _grid_of_axes(len(panels))
    for ax, ((block, scheme), group) in zip(axes, panels.items()):
        z = np.concatenate([s.z for s in group])
        xlim, ylim = _window(z, region_reach(scheme))
        draw_region(ax, scheme, xlim, ylim)
        for i, (s, colour) in enumerate(zip(group, _colours(len(group)))):
            ax.scatter(s.z.real, s.z.imag, s=30, marker=_MARKERS[i % len(_MARKERS)], facecolors="none",
                       edgecolors=colour, linewidths=1.2, label=s.label, zorder=3)
            outside = ~s.inside
            if outside.any():
                ax.scatter(s.z.real[outside], s.z.imag[outside], s=70, marker="x", color="red", lw=1, zorder=4)
        ax.axhline(0, color="0.6", lw=0.6)
        ax.axvline(0, color="0.6", lw=0.6)
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        power = "h²" if get_scheme(scheme).derivative_order == 2 else "h"
        ax.set_xlabel(f"Re z,  z = {power}·λ(Jacobian)")
        ax.set_ylabel("Im z")
        outside = sum(int((~s.inside).sum()) for s in group)
        distinct = np.unique(np.round(z, 6)).size
        ax.set_title(f"{block}: {scheme}, {z.size} eigenvalues ({distinct} distinct), {outside} outside (red x)",
                     fontsize=9)
        ax.legend(fontsize=7, loc="best", ncol=2 if len(group) > 6 else 1)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1) * 0.9) for i in range(n)]


def plot_growth(growth: PerturbationGrowth, path, title: str | None = None) -> str:
    """Growth factor after every time step for the random and the adversarial perturbation (log scale)."""
    fig = Figure(figsize=(max(6.0, 0.35 * len(growth.labels)), 4.0), layout="constrained")
    ax = fig.add_subplot()
    steps = np.arange(1, len(growth.labels) + 1)
    ax.semilogy(steps, growth.random, "o-", label="random δ")
    ax.semilogy(steps, growth.adversarial, "s-", label=f"leading singular vector (σ_max = {growth.sigma_max:.3g})")
    ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
    ax.set_xticks(steps, growth.labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("‖Φ(Y+δ) − Φ(Y)‖ / ‖δ‖")
    ax.set_title(title or "perturbation growth through the time steps")
    ax.legend()
    return _save(fig, path)


def plot_singular_values(model: nn.Module, input_shape: Sequence[int], path, title: str | None = None) -> str:
    """Sorted singular values of each operator of each block on the (periodic) grid the block acts on."""
    blocks = list(time_stepping_blocks(model))
    if not blocks:
        raise ValueError(f"{type(model).__name__} contains no time-stepping block")
    grids = block_grids(model, input_shape)
    fig, axes = _grid_of_axes(len(blocks))
    for ax, (name, block) in zip(axes, blocks):
        ops = block.named_operators()
        for (op_name, op), colour in zip(ops, _colours(len(ops))):
            s = op.singular_values(grids[name]).cpu().numpy()
            ax.semilogy(np.linspace(0, 1, s.size), np.maximum(s, 1e-12), color=colour, lw=1,
                        label=f"{op_name} ({op.kind})" if len(ops) <= 8 else None)
        ax.set_xlabel("rank of the singular value / number of singular values")
        ax.set_ylabel("singular value σ_i(K) (log scale)")
        ax.set_title(f"{name}: {block.scheme}, {grids[name][0]}x{grids[name][1]} periodic grid", fontsize=9)
        if len(ops) <= 8:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
