"""Time-stepping blocks: step bounds that hold (and are tight), reversibility, options, every operator kind."""
import math

import pytest
import torch

from operators import ConvOperator, DenseConv
from pdenet.blocks import SCHEMES, TimeSteppingBlock, build_block
from pdenet.layers import GeneralLayer, SymmetricLayer
from pdenet.normalization import TVNorm, make_normalization

DT = torch.float64
KINDS = ["dense", "lean", "grouped", "separable", "depthwise", "pointwise", "circulant"]
LAYER_SCHEMES = ["parabolic", "euler", "leapfrog", "hamiltonian"]


def _parabolic(boundary, activation, c=3, nt=3, normalization="none", seed=0):
    torch.manual_seed(seed)
    return build_block("parabolic", c, nt=nt, h=1.0, operator="dense", activation=activation,
                       normalization=normalization, operator_kwargs={"boundary": boundary}).to(DT)


def _top_direction(block, grid):
    """Leading right singular vector of step 0's K on the grid (the direction the bound is about)."""
    m = block.weights(0).op.to_matrix(grid)
    return torch.linalg.svd(m)[2][0].reshape(1, block.channels, *grid)


def _ratios(block, y, z):
    with torch.no_grad():
        num = (block(y) - block(z)).flatten(1).norm(dim=1)
    return num / (y - z).flatten(1).norm(dim=1)


def _pairs(block, grid, n=32, seed=1):
    """``(Y, Ỹ)``: ``n`` random pairs at distances 1e-4..10, and ``n/2`` along the top singular direction."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(n, block.channels, *grid, generator=gen, dtype=DT)
    scales = torch.logspace(-4, 1, n, dtype=DT).view(n, 1, 1, 1)
    random = y + scales * torch.randn(y.shape, generator=gen, dtype=DT)
    worst = y + scales * _top_direction(block, grid)
    return torch.cat([y, y[: n // 2]]), torch.cat([random, worst[: n // 2]])


@pytest.mark.parametrize("boundary", ["zeros", "circular"])
@pytest.mark.parametrize("activation", ["relu", "identity", "tanh"])
def test_parabolic_block_is_nonexpansive_below_the_bound(boundary, activation):
    grid = (6, 5)
    block = _parabolic(boundary, activation)
    bound = block.step_bound(grid)
    block.set_h(0.99 * bound)
    y, z = _pairs(block, grid)
    assert float(_ratios(block, y, z).max()) <= 1 + 1e-6


def test_parabolic_block_grows_above_the_bound():
    grid = (6, 5)
    block = _parabolic("zeros", "identity")
    block.set_h(3 * block.step_bound(grid))
    y, z = _pairs(block, grid)
    random = _ratios(block, y[:32], z[:32])  # random pairs only
    assert float(random.max()) > 1.5


def test_bound_is_tight_on_a_periodic_grid():
    """Circular boundary: ‖K‖ is exact, so 1% above the bound the top singular direction grows."""
    grid = (6, 5)
    block = _parabolic("circular", "identity", nt=1)
    bound = block.step_bound(grid)
    v = _top_direction(block, grid)
    y = torch.randn_like(v)
    block.set_h(1.01 * bound)
    assert float(_ratios(block, y + v, y)) > 1.005
    block.set_h(0.99 * bound)
    assert float(_ratios(block, y + v, y)) <= 1 + 1e-9


def test_batch_norm_folded_into_the_bound():
    """In eval mode batch norm is a per-channel scale s; the bound 2/(max s ‖K‖²) keeps the block non-expansive."""
    grid = (5, 5)
    block = _parabolic("circular", "relu", normalization="batch")
    torch.manual_seed(3)
    for layer in block.steps:
        layer.norm.running_var.uniform_(0.2, 2.0)
        layer.norm.weight.data.uniform_(0.5, 2.0)
    block.eval()
    bound = block.step_bound(grid)
    expected = min(2 / (float((layer.norm.weight.detach() / torch.sqrt(layer.norm.running_var + layer.norm.eps)).max())
                        * layer.op.spectral_norm(grid) ** 2) for layer in block.steps)
    assert bound == pytest.approx(expected, rel=1e-9)
    block.set_h(0.99 * bound)
    y, z = _pairs(block, grid)
    assert float(_ratios(block, y, z).max()) <= 1 + 1e-6
    assert any("batch norm" in a for a in block.stability(grid).assumptions)
    # a negative scale makes the slope change sign: no bound
    block.steps[0].norm.weight.data[0] = -1.0
    assert block.step_bound(grid) is None


def test_tv_normalization_divides_each_pixel_by_its_length():
    x = torch.randn(2, 5, 3, 4, dtype=DT)
    n = TVNorm(5, eps=1e-6, affine=False)(x)
    lengths = n.norm(dim=1)
    expected = x.norm(dim=1) / torch.sqrt(x.norm(dim=1) ** 2 + 1e-6)
    assert torch.allclose(lengths, expected)
    assert torch.allclose(n / n.norm(dim=1, keepdim=True), x / x.norm(dim=1, keepdim=True))
    block = build_block("parabolic", 3, operator="dense", normalization="tv").to(DT)
    assert block.step_bound((4, 4)) is None
    assert block(torch.randn(1, 3, 4, 4, dtype=DT)).shape == (1, 3, 4, 4)


@pytest.mark.parametrize("scheme", ["leapfrog", "hamiltonian"])
def test_reversible_schemes_run_backward_to_the_input(scheme):
    torch.manual_seed(0)
    block = build_block(scheme, 3, nt=5, h=0.3, operator="dense", activation="tanh").to(DT)
    for p in block.parameters():  # non-zero biases
        p.data.add_(0.1 * torch.randn_like(p))
    y = torch.randn(2, 3, 6, 6, dtype=DT)
    with torch.no_grad():
        start = block.initial_state(y)
        end = block.integrate(start)
        back = block.integrate(end, reverse=True)
    assert not torch.allclose(block.output(end), y)
    for a, b in zip(back, start):
        assert torch.allclose(a, b, rtol=0, atol=1e-12 * float(y.abs().max()))
    assert torch.equal(block(y), block.output(end))


def test_schemes_without_inverse_refuse_to_reverse():
    block = build_block("parabolic", 2, operator="dense")
    with pytest.raises(NotImplementedError, match="not reversible"):
        block.integrate(torch.zeros(1, 2, 3, 3), reverse=True)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("kind", KINDS)
def test_every_operator_kind_plugs_into_every_block(scheme, kind):
    kwargs = {"groups": 2} if kind == "grouped" else {}
    torch.manual_seed(0)
    # for diffusion-reaction the operator is the diffusion K; the reaction stays pointwise
    block = build_block(scheme, 4, nt=1, h=0.1, operator=kind, operator_kwargs=kwargs)
    assert {op.kind for op in block.operators()} >= {kind}
    y = torch.randn(2, 4, 5, 5, requires_grad=True)
    out = block(y)
    assert out.shape == y.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    assert y.grad is not None and all(p.grad is not None for p in block.parameters() if p.requires_grad)
    bound = block.step_bound((5, 5))
    assert bound is not None and bound >= 0


def test_diffusion_reaction_defaults_are_depthwise_and_pointwise():
    block = build_block("diffusion-reaction", 4, nt=2, diffusion="implicit", operator_kwargs={"boundary": "circular"})
    step = block.weights(0)
    assert step.diffusion.kind == "depthwise"
    assert {op.kind for op in step.reaction.operators()} == {"pointwise"}
    assert math.isfinite(block.step_bound((6, 6)))  # implicit diffusion: only the explicit reaction limits h
    assert block(torch.randn(1, 4, 6, 6)).shape == (1, 4, 6, 6)


@pytest.mark.parametrize("shared", [False, True])
def test_weights_per_step_or_shared(shared):
    block = build_block("parabolic", 4, nt=3, operator="dense", shared_weights=shared)
    ops = block.operators()
    assert len(ops) == (1 if shared else 3)
    assert block.nt == 3 and block.scheme == "parabolic"


def test_learnable_h_stays_positive_and_gets_gradients():
    block = build_block("parabolic", 2, nt=2, h=0.5, operator="dense", learn_h=True)
    assert any(p is block.log_h for p in block.parameters())
    assert float(block.h.detach()) == pytest.approx(0.5)
    block(torch.randn(1, 2, 4, 4)).sum().backward()
    assert block.log_h.grad is not None
    with torch.no_grad():
        block.log_h -= 100.0  # any update keeps h > 0
    assert float(block.h) > 0
    fixed = build_block("parabolic", 2, nt=2, h=0.5, operator="dense")
    assert all(p is not fixed.log_h for p in fixed.parameters())


@pytest.mark.parametrize("scheme, stabilize, kind", [
    *((scheme, stabilize, "dense") for scheme in ("parabolic", "leapfrog", "hamiltonian", "diffusion-reaction")
      for stabilize in ("rescale-h", "project-norm")),
    ("parabolic", "project-norm", "separable"),  # bilinear in its weights
])
def test_enforce_stability_restores_h_below_the_bound(scheme, stabilize, kind):
    """After a forward pass on a 6x6 grid the norms are tracked there by warm-started power iteration
    (periodic grid: the symbol gives the exact bound to compare with)."""
    torch.manual_seed(0)
    grid = (6, 6)
    operator = {"operator": kind} if scheme != "diffusion-reaction" else {}
    block = build_block(scheme, 3, nt=1, h=50.0, stabilize=stabilize, safety=0.9, learn_h=True,
                        operator_kwargs={"boundary": "circular"}, **operator).to(DT)
    block(torch.randn(1, 3, *grid, dtype=DT))
    assert block.step_bound(grid) < 50.0
    block.enforce_stability()
    h, bound = float(block.h.detach()), block.step_bound(grid)
    assert h <= 0.9 * bound * (1 + 1e-2)  # the tracked norm is an estimate from below
    if stabilize == "rescale-h":
        assert h == pytest.approx(0.9 * bound, rel=1e-2)
    else:
        assert h == pytest.approx(50.0)
        if kind == "dense" or scheme == "diffusion-reaction":  # linear in its weights: hits the target
            assert h == pytest.approx(0.9 * bound, rel=1e-2)


def test_enforce_stability_before_any_forward_uses_the_symbol_bound():
    block = build_block("parabolic", 3, nt=2, h=50.0, operator="dense", stabilize="project-norm")
    block.enforce_stability()
    assert float(block.h) == pytest.approx(50.0)
    assert block.step_bound() == pytest.approx(50.0 / 0.9, rel=1e-6)
    block.stabilize = None
    block.enforce_stability()  # no option: nothing changes
    assert block.step_bound() == pytest.approx(50.0 / 0.9, rel=1e-6)


def test_stabilize_without_a_bound_is_refused():
    with pytest.raises(ValueError, match="needs a step bound"):
        build_block("euler", 2, operator="dense", stabilize="rescale-h")
    with pytest.raises(ValueError, match="needs a step bound"):
        build_block("parabolic", 2, operator="dense", normalization="tv", stabilize="rescale-h")
    with pytest.raises(ValueError, match="batch or TV"):
        build_block("parabolic", 2, operator="dense", normalization="batch", stabilize="project-norm")
    with pytest.raises(ValueError, match="unknown stabilize"):
        build_block("parabolic", 2, operator="dense", stabilize="clip")


@pytest.mark.parametrize("h", [0, -1.0, float("nan"), float("inf"), "1", True])
def test_bad_step_size(h):
    with pytest.raises(ValueError, match="step size h"):
        build_block("parabolic", 2, h=h, operator="dense")


@pytest.mark.parametrize("nt", [0, -2, 1.5])
def test_bad_number_of_steps(nt):
    with pytest.raises(ValueError, match="nt must be a positive integer"):
        build_block("parabolic", 2, nt=nt, operator="dense")


def test_bad_names():
    with pytest.raises(ValueError, match=r"unknown scheme 'rk5'.*parabolic"):
        build_block("rk5", 2)
    with pytest.raises(ValueError, match="nonexistent"):
        build_block("parabolic", 2, operator="nonexistent")
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        build_block("parabolic", 2, operator="dense", activation="swish")
    with pytest.raises(ValueError, match="unknown normalization 'layer'"):
        build_block("parabolic", 2, operator="dense", normalization="layer")
    with pytest.raises(ValueError, match="unknown splitting"):
        build_block("diffusion-reaction", 2, splitting="yoshida")
    with pytest.raises(ValueError, match="unknown diffusion step"):
        build_block("diffusion-reaction", 2, diffusion="crank-nicolson")
    with pytest.raises(TypeError, match="operator must be a kind name or a callable"):
        build_block("parabolic", 2, operator=3)


def test_operator_channels_must_fit_the_block():
    with pytest.raises(ValueError, match=r"maps 2 -> 3 channels, but the block needs 2 -> 2"):
        build_block("parabolic", 2, operator=lambda cin, cout: DenseConv(cin, cout + 1))
    with pytest.raises(ValueError, match=r"needs 4 -> 4"):
        build_block("diffusion-reaction", 4, operator=lambda cin, cout: DenseConv(2, 2))
    with pytest.raises(TypeError, match="not an operators.ConvOperator"):
        build_block("parabolic", 2, operator=lambda cin, cout: torch.nn.Conv2d(cin, cout, 3, padding=1))
    with pytest.raises(ValueError):  # grouped: groups must divide the channels
        build_block("parabolic", 3, operator="grouped", operator_kwargs={"groups": 2})
    with pytest.raises(ValueError, match="K₁: c -> m and K₂: m -> c"):
        GeneralLayer(DenseConv(2, 3), DenseConv(2, 2))
    with pytest.raises(TypeError, match="ConvOperator"):
        SymmetricLayer(torch.nn.Conv2d(2, 2, 3))


def test_forward_checks_its_input():
    block = build_block("parabolic", 3, operator="dense")
    with pytest.raises(ValueError, match=r"expects \(batch, 3, n1, n2\)"):
        block(torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"expects \(batch, 3, n1, n2\)"):
        block(torch.randn(3, 4, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        block([1.0])


def test_hidden_width_and_factory():
    made = []

    def factory(cin, cout):
        made.append((cin, cout))
        return DenseConv(cin, cout)

    block = build_block("euler", 3, nt=2, operator=factory, hidden_channels=5)
    assert made == [(3, 5), (5, 3)] * 2
    assert isinstance(block, TimeSteppingBlock)
    assert all(isinstance(op, ConvOperator) for op in block.operators())
    assert block(torch.randn(1, 3, 4, 4)).shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="TVNorm eps"):
        make_normalization("tv", 3, eps=0)
