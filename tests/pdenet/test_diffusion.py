"""Diffusion steps against dense matrices, gradcheck, and the order of Lie and Strang splitting."""
import copy

import numpy as np
import pytest
import torch

from operators import DenseConv
from operators.registry import make_operator
from pdenet.blocks import build_block
from pdenet.diffusion import exact_diffusion, explicit_diffusion, implicit_diffusion

DT = torch.float64


def _operator(kind, c, boundary="circular", seed=0):
    torch.manual_seed(seed)
    op = make_operator(kind, c, c, boundary=boundary).to(DT)
    with torch.no_grad():
        for p in op.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return op


def _dense(op, grid):
    m = op.to_matrix(grid)
    return m.T @ m  # L = KᵀK


@pytest.mark.parametrize("kind", ["depthwise", "dense", "lean"])
@pytest.mark.parametrize("grid", [(5, 6), (6, 5), (4, 4)])
def test_implicit_and_exact_match_dense_solves(kind, grid):
    c, h = 3, 0.7
    op = _operator(kind, c)
    y = torch.randn(2, c, *grid, dtype=DT)
    L = _dense(op, grid)
    eye = torch.eye(L.shape[0], dtype=DT)
    flat = y.reshape(2, -1).T
    implicit = torch.linalg.solve(eye + h * L, flat).T.reshape(y.shape)
    exact = (torch.linalg.matrix_exp(-h * L) @ flat).T.reshape(y.shape)
    explicit = (flat - h * L @ flat).T.reshape(y.shape)
    for got, want in [(implicit_diffusion(y, op, h), implicit), (exact_diffusion(y, op, h), exact),
                      (explicit_diffusion(y, op, h), explicit)]:
        assert float((got - want).detach().norm() / want.norm()) < 1e-10


def test_implicit_step_decays_every_fourier_mode_by_its_factor():
    """A plane wave e^{iω·n} on channel j is multiplied by 1/(1 + h|ŝ_j(ω)|²)."""
    op = _operator("depthwise", 2)
    n1, n2, h = 8, 6, 0.3
    m1, m2 = 3, 1
    i1, i2 = torch.meshgrid(torch.arange(n1, dtype=DT), torch.arange(n2, dtype=DT), indexing="ij")
    phase = 2 * torch.pi * (m1 * i1 / n1 + m2 * i2 / n2)
    s = op.symbol((n1, n2))[m1, m2].diagonal()  # ŝ_j(ω)
    factor = 1 / (1 + h * s.abs() ** 2)
    y = torch.stack([torch.cos(phase), torch.sin(phase)])[None]
    want = y * factor.real.view(1, 2, 1, 1)
    assert torch.allclose(implicit_diffusion(y, op, h), want, atol=1e-12)


def _with_parameter(op, name, w):
    """A copy of ``op`` whose parameter ``name`` is the tensor ``w`` (so gradients reach ``w``)."""
    clone = copy.deepcopy(op)
    delattr(clone, name)
    setattr(clone, name, w)
    return clone


@pytest.mark.parametrize("step, kind", [(implicit_diffusion, "depthwise"), (exact_diffusion, "depthwise"),
                                        (implicit_diffusion, "dense"), (exact_diffusion, "dense")])
def test_fourier_steps_pass_gradcheck(step, kind):
    op = _operator(kind, 2)
    y = torch.randn(1, 2, 3, 4, dtype=DT, requires_grad=True)
    h = torch.tensor(0.4, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, h: step(y, op, h), (y, h))
    name, weight = next(iter(op.named_parameters()))
    w = weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: step(y.detach(), _with_parameter(op, name, w), 0.4), (w,))


def test_fourier_steps_need_a_periodic_grid():
    op = _operator("depthwise", 2, boundary="zeros")
    y = torch.randn(1, 2, 4, 4, dtype=DT)
    for step in (implicit_diffusion, exact_diffusion):
        with pytest.raises(ValueError, match="circular"):
            step(y, op, 0.5)
    explicit_diffusion(y, op, 0.5)  # fine with zero padding
    with pytest.raises(ValueError, match="circular"):
        build_block("diffusion-reaction", 2, diffusion="implicit", operator_kwargs={"boundary": "zeros"})


def _splitting_errors(splitting, diffusion, nts=(4, 8, 16, 32), T=1.0):
    """Errors at time T of the split block against exp(T(−L + R)) Y₀ for a linear problem.

    Diffusion ``K`` depthwise with a different stencil per channel; reaction ``R = P₂P₁`` with identity
    activation, no bias, ``R`` nilpotent (so its forward Euler step is its exact flow) and not commuting
    with ``L``. With exact sub-steps the only error left is the splitting error.
    """
    c, grid = 2, (5, 4)
    diff_op = _operator("depthwise", c)
    norm = diff_op.spectral_norm(grid)
    with torch.no_grad():  # ‖K‖ = 1 on the periodic grid: L = KᵀK has its spectrum in [0, 1]
        for p in diff_op.parameters():
            p.div_(norm)
    p1 = DenseConv(c, c, kernel_size=1).to(DT)
    p2 = DenseConv(c, c, kernel_size=1).to(DT)
    with torch.no_grad():
        p1.weight.copy_(torch.tensor([[1.0, 0.3], [-0.4, 0.8]], dtype=DT).view(c, c, 1, 1))
        nil = torch.tensor([[0.0, 1.5], [0.0, 0.0]], dtype=DT)  # R = P₂P₁ = nil
        p2.weight.copy_((nil @ torch.linalg.inv(p1.weight.view(c, c))).view(c, c, 1, 1))
    y0 = torch.randn(1, c, *grid, dtype=DT)
    L = _dense(diff_op, grid)
    R = torch.kron(p2.weight.view(c, c) @ p1.weight.view(c, c), torch.eye(grid[0] * grid[1], dtype=DT))
    assert torch.allclose(R @ R, torch.zeros_like(R))
    exact = (torch.linalg.matrix_exp(T * (-L + R)) @ y0.reshape(-1)).reshape(y0.shape)
    errors = []
    for nt in nts:
        reaction_ops = iter([p1, p2])
        block = build_block(
            "diffusion-reaction", c, nt=nt, h=T / nt, shared_weights=True, splitting=splitting,
            diffusion=diffusion, reaction="general", activation="identity", bias=False,
            operator=lambda cin, cout: copy.deepcopy(diff_op),
            reaction_operator=lambda cin, cout: copy.deepcopy(next(reaction_ops)),
        ).to(DT)
        with torch.no_grad():
            errors.append(float((block(y0) - exact).norm() / exact.norm()))
    hs = T / np.array(nts)
    return np.polyfit(np.log(hs), np.log(errors), 1)[0], errors


def test_lie_splitting_is_first_order_and_strang_second_order():
    lie, lie_err = _splitting_errors("lie", "exact")
    strang, strang_err = _splitting_errors("strang", "exact")
    assert abs(lie - 1) < 0.2, (lie, lie_err)
    assert abs(strang - 2) < 0.2, (strang, strang_err)
    assert strang_err[-1] < lie_err[-1] / 10


@pytest.mark.parametrize("diffusion", ["implicit", "explicit"])
def test_euler_diffusion_substeps_make_strang_first_order(diffusion):
    """With a backward/forward Euler diffusion sub-step (error O(h²) per step) both splittings are order 1."""
    for splitting in ("lie", "strang"):
        order, errors = _splitting_errors(splitting, diffusion)
        assert abs(order - 1) < 0.25, (splitting, order, errors)


def test_fft_diffusion_costs_about_an_explicit_step():
    """The implicit step's FFT work (invisible to PyTorch's FLOP counter, reported by ``uncounted_flops``)
    is within 2x of the explicit step's two depthwise convolutions ``K`` and ``Kᵀ`` on a 32x32 grid."""
    from operators.flops import count_flops

    shape = (8, 16, 32, 32)
    explicit = build_block("diffusion-reaction", 16, nt=2, operator_kwargs={"boundary": "circular"})
    implicit = build_block("diffusion-reaction", 16, nt=2, diffusion="implicit",
                           operator_kwargs={"boundary": "circular"})
    assert explicit.uncounted_flops(shape) == 0
    fft_work = implicit.uncounted_flops(shape) / 2
    conv_work = 2 * implicit.weights(0).diffusion.flops(shape)
    assert 1 < fft_work / conv_work < 2
    strang = build_block("diffusion-reaction", 16, nt=2, diffusion="implicit", splitting="strang",
                         operator_kwargs={"boundary": "circular"})
    assert strang.uncounted_flops(shape) == 2 * implicit.uncounted_flops(shape)
    x = torch.randn(shape)
    reaction_only = count_flops(explicit, x) - 2 * 2 * explicit.weights(0).diffusion.flops(shape)
    assert count_flops(implicit, x) >= reaction_only + implicit.uncounted_flops(shape)
