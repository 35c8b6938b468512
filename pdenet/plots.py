"""Stability plots, drawn with matplotlib's Agg canvas (no display, no pyplot state).

- :func:`plot_eigenvalues`: ``z = h^m λ`` of every step's linearization against the scheme's stability region
  (shaded where ``|R(z)| ≤ 1``, its boundary from ``operators.stability.region_boundary``);
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

from operators.stability import get_scheme, in_stability_region, region_boundary

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


def plot_eigenvalues(spectra: Sequence[StepSpectrum], path, title: str | None = None) -> str:
    """One panel per (block, scheme): the points ``z`` (one colour per step) over the shaded stability region."""
    if not spectra:
        raise ValueError("no spectra to plot")
    panels: dict[tuple[str, str], list[StepSpectrum]] = {}
    for s in spectra:
        panels.setdefault((s.block, s.scheme), []).append(s)
    fig, axes = _grid_of_axes(len(panels))
    for ax, ((block, scheme), group) in zip(axes, panels.items()):
        z = np.concatenate([s.z for s in group])
        boundary = region_boundary(scheme)
        finite = boundary[np.isfinite(boundary)]
        reach = 1.15 * max(np.abs(finite).max(initial=0.0), np.abs(z).max(initial=0.0), 1e-3)
        xs = np.linspace(-reach, reach, 301)
        grid = xs[None, :] + 1j * xs[:, None]
        inside = np.asarray(in_stability_region(scheme, grid), dtype=float)
        ax.contourf(xs, xs, inside, levels=[0.5, 1.5], colors=["#cfe8cf"])
        ax.plot(finite.real, finite.imag, color="#2a7a2a", lw=1.2, label=f"|R(z)| = 1 ({scheme})")
        colours = iter(_colours(len(group)))
        for s in group:
            ax.scatter(s.z.real, s.z.imag, s=18, color=next(colours), label=s.label, zorder=3,
                       edgecolors=np.where(s.inside, "none", "red"))
        ax.axhline(0, color="0.6", lw=0.6)
        ax.axvline(0, color="0.6", lw=0.6)
        ax.set_xlim(-reach, reach)
        ax.set_ylim(-reach, reach)
        ax.set_aspect("equal")
        ax.set_xlabel("Re z")
        ax.set_ylabel("Im z")
        outside = sum(int((~s.inside).sum()) for s in group)
        power = "h²" if get_scheme(scheme).derivative_order == 2 else "h"
        ax.set_title(f"{block}: {scheme}, z = {power}·λ ({outside} of {z.size} outside)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
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
        ax.set_xlabel("fraction of singular values")
        ax.set_ylabel("σ")
        ax.set_title(f"{name}: {block.scheme}, {grids[name][0]}x{grids[name][1]} periodic grid", fontsize=9)
        if len(ops) <= 8:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
