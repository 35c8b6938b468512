"""``pdenet.fuse`` / ``unfuse`` and the fused training operators against the plain models: outputs, every
gradient, running statistics, double backward, ``state_dict`` compatibility both ways, what is left unfused and
why, hooks, and the paths the fused modules must not take (evaluation, other dtypes, distributed batch norm)."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import pdenet_kernels
from pdenet import build_model, fuse, unfuse
from pdenet.distributed import GlobalBatchNorm2d
from pdenet.fusion import FusedBasicBlock, FusedSequential, is_fused
from pdenet.networks.resnet import BasicBlock

CL = torch.channels_last
compiled = pytest.mark.skipif(not pdenet_kernels.available(), reason=f"compiled kernels: {pdenet_kernels.status()}")


def bn_problem(shape, seed=0, momentum=0.1):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(shape, generator=gen) * 3 + 2).contiguous(memory_format=CL).requires_grad_()
    r = torch.randn(shape, generator=gen).contiguous(memory_format=CL).requires_grad_()
    g = torch.randn(shape, generator=gen).contiguous(memory_format=CL)
    bn = nn.BatchNorm2d(shape[1], momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.uniform_(-1, 1, generator=gen)
    return z, r, g, bn


def plain_bn_relu(bn, z, r):
    out = bn(z)
    return torch.relu(out if r is None else out + r)


def fused_bn_relu(bn, z, r):
    bn.num_batches_tracked.add_(1)
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return pdenet_kernels.batch_norm_relu(z, r, bn.weight, bn.bias, bn.running_mean, bn.running_var, momentum, bn.eps)


@compiled
@pytest.mark.parametrize("shape", [(8, 16, 5, 7), (4, 19, 3, 3), (2, 64, 1, 1), (3, 33, 5, 3)], ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_batch_norm_relu_matches_batch_norm_add_relu(shape, with_residual, momentum):
    """Two steps (the second with the first's running statistics): output, the gradients of the input, residual,
    weight and bias, running mean and variance; every channel-chunk remainder and an odd pixel count."""
    z, r, g, bn = bn_problem(shape, momentum=momentum)
    fused = copy.deepcopy(bn)
    r = r if with_residual else None
    for _ in range(2):
        y_ref, y = plain_bn_relu(bn, z, r), fused_bn_relu(fused, z, r)
        assert y.is_contiguous(memory_format=CL)
        inputs = [z] + ([r] if with_residual else [])
        ref_grads = torch.autograd.grad(y_ref, inputs + [bn.weight, bn.bias], g)
        grads = torch.autograd.grad(y, inputs + [fused.weight, fused.bias], g)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fused.running_mean, bn.running_mean)
        torch.testing.assert_close(fused.running_var, bn.running_var)


@compiled
def test_batch_norm_relu_nan_and_large_mean():
    """A NaN stays in its channel (ReLU keeps NaN, as torch.relu); a mean 3000 times the spread loses no precision
    against float64 (the shifted sums), where a naive E[x²] − E[x]² in float would lose the variance."""
    z, r, _, bn = bn_problem((2, 20, 3, 3), seed=7)
    with torch.no_grad():
        z[1, 17, 2, 0] = float("nan")
    y = fused_bn_relu(copy.deepcopy(bn), z, r)
    assert torch.isnan(y[:, 17]).all()
    torch.testing.assert_close(y, plain_bn_relu(bn, z, r), rtol=1e-5, atol=1e-5, equal_nan=True)
    z, _, _, bn = bn_problem((16, 16, 8, 8))
    with torch.no_grad():
        z.mul_(1e-3).add_(10.0)
    fused, ref64 = copy.deepcopy(bn), copy.deepcopy(bn).double()
    y = fused_bn_relu(fused, z, None)
    torch.testing.assert_close(y.double(), plain_bn_relu(ref64, z.double(), None), rtol=0, atol=5e-4)
    torch.testing.assert_close(fused.running_var.double(), ref64.running_var, rtol=1e-4, atol=0)


@compiled
def test_batch_norm_relu_double_backward():
    """The gradient of ‖∂L/∂z‖² with respect to γ, through the fused forward, equals PyTorch's."""
    z, r, g, bn = bn_problem((4, 16, 4, 4), seed=3)
    fused = copy.deepcopy(bn)
    results = []
    for y, module in ((fused_bn_relu(fused, z, r), fused), (plain_bn_relu(bn, z, r), bn)):
        (dz,) = torch.autograd.grad(y, z, g, create_graph=True)
        results.append(torch.autograd.grad(dz.square().sum(), module.weight)[0])
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)


def block(c_in, c_out, stride, shortcut, seed=0):
    torch.manual_seed(seed)
    b = BasicBlock(c_in, c_out, stride, "lean", {}, shortcut).to(memory_format=CL)
    with torch.no_grad():
        for bn in (b.bn1, b.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return b


@compiled
@pytest.mark.parametrize("c_in,c_out,stride,shortcut", [(16, 16, 1, "A"), (16, 32, 2, "A"), (32, 32, 1, "A"),
                                                        (16, 32, 2, "B"), (16, 16, 1, "B")])
def test_fused_block_matches_the_plain_block(c_in, c_out, stride, shortcut):
    """``residual_block`` (identity, zero-channel or projection shortcut) against the plain block in training mode,
    two steps: output, the input gradient and every parameter's, running statistics and batch counters; with an
    input that needs no gradient, the parameters' alone. Both in float32, against the float64 plain block."""
    plain = block(c_in, c_out, stride, shortcut)
    fused = copy.deepcopy(plain)
    assert str(fuse(fused)) == "fuse: 1 residual block fused for CPU training"
    reference = copy.deepcopy(plain).double()
    x = torch.randn(4, c_in, 10, 9).contiguous(memory_format=CL)
    g = torch.randn(4, c_out, *((10, 9) if stride == 1 else (5, 5))).contiguous(memory_format=CL)
    for requires_grad in (True, True, False):
        results = []
        for net, inp, grad in ((fused, x, g), (plain, x, g), (reference, x.double(), g.double())):
            inp = inp.clone().requires_grad_(requires_grad)
            with FlopCounterMode(display=False) as counter:
                y = net(inp)
            wanted = ([inp] if requires_grad else []) + list(net.parameters())
            results.append([y] + list(torch.autograd.grad(y, wanted, grad)))
            if net is fused:
                assert torch.ops.pdenet.residual_block in counter.get_flop_counts()["Global"]
        for a, b, c in zip(*results):
            scale = c.abs().max().item() + 1e-12
            assert (a.double() - c).abs().max().item() <= 1e-5 * scale + 1e-6  # the fused path: float32-exact
            assert (b.double() - c).abs().max().item() <= 1e-3 * scale + 1e-6  # PyTorch's float32 is looser
    for a, b in zip(fused.buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@compiled
def test_fused_block_double_backward():
    """Under ``create_graph`` the fused block's backward is the plain composition: a gradient penalty's gradient
    equals the plain block's."""
    plain = block(16, 16, 1, "A")
    fused = copy.deepcopy(plain)
    fuse(fused)
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=CL)
    results = []
    for net in (fused, plain):
        inp = x.clone().requires_grad_()
        (dx,) = torch.autograd.grad(net(inp).square().sum(), inp, create_graph=True)
        results.append(torch.autograd.grad(dx.square().sum(), net.conv1.pointwise)[0])
    torch.testing.assert_close(results[0], results[1], rtol=1e-3, atol=1e-4)


@compiled
def test_fuse_and_unfuse_keep_weights_outputs_and_checkpoints():
    """The fused model has the same parameters (the same objects), ``state_dict`` keys and values; its outputs
    equal the plain model's in training and evaluation; checkpoints load either way; ``unfuse`` restores the plain
    classes; fusing twice changes nothing."""
    torch.manual_seed(0)
    plain = build_model("lean-resnet20", num_classes=10, in_channels=1).to(memory_format=CL)
    fused = copy.deepcopy(plain)
    params = list(fused.parameters())
    report = fuse(fused)
    assert report.fused == {"stem": "batch norm + ReLU sequence",
                            **{f"stages.{i}.{j}": "residual block" for i in range(3) for j in range(3)}}
    assert str(report) == "fuse: 1 batch norm + ReLU sequence, 9 residual blocks fused for CPU training"
    assert not report.left
    assert isinstance(fused.stem, FusedSequential) and isinstance(fused.stages[0][0], FusedBasicBlock)
    assert list(fused.parameters()) == params and is_fused(fused) and not is_fused(plain)
    assert fuse(fused).fused == report.fused
    assert list(fused.state_dict()) == list(plain.state_dict())
    x = torch.randn(8, 1, 12, 12).contiguous(memory_format=CL)
    for mode in (True, False):
        plain.train(mode), fused.train(mode)
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-4, atol=1e-4)
    twin = build_model("lean-resnet20", num_classes=10, in_channels=1)
    twin.load_state_dict(fused.state_dict())
    fuse(twin)
    twin.load_state_dict(plain.state_dict())
    unfuse(fused)
    assert type(fused.stem) is nn.Sequential and type(fused.stages[0][0]) is BasicBlock and not is_fused(fused)


def test_fuse_reports_what_it_leaves():
    """A model with nothing to fuse is left as it is and the report says so; a lean ResNet with the periodic
    boundary keeps its blocks plain, each with the reason, and fuses its stem."""
    mobile = build_model("mobilenetv2", num_classes=10, in_channels=3)
    before = copy.deepcopy(mobile.state_dict())
    report = fuse(mobile)
    assert not report.fused and "nothing in this model has a fused form" in str(report)
    assert all(torch.equal(before[k], v) for k, v in mobile.state_dict().items())
    circular = build_model("lean-resnet20", operator_kwargs={"boundary": "circular"})
    report = fuse(circular)
    assert list(report.fused) == ["stem"] and len(report.left) == 9
    assert all("'circular' boundary" in reason for reason in report.left.values())


@compiled
def test_fused_paths_are_not_taken_where_they_do_not_apply():
    """Evaluation, float64, and a distributed batch norm (its own forward gathers statistics) run the plain
    arithmetic: same results as the plain model, and no fused operator is called."""
    plain = block(16, 16, 1, "A")
    fused = copy.deepcopy(plain)
    fuse(fused)
    x = torch.randn(2, 16, 5, 5).contiguous(memory_format=CL)
    cases = [(lambda m: m.eval(), x), (lambda m: m.double(), x.double()),
             (lambda m: setattr(m, "bn1", GlobalBatchNorm2d(16)), x)]
    for change, inp in cases:
        a, b = copy.deepcopy(fused), copy.deepcopy(plain)
        change(a), change(b)
        with FlopCounterMode(display=False) as counter:
            y = a(inp)
        assert torch.ops.pdenet.residual_block not in counter.get_flop_counts()["Global"]
        torch.testing.assert_close(y, b(inp))


@compiled
def test_a_forward_hook_changes_neither_results_nor_path():
    """A global forward hook (as a profiler or an activation probe installs) and one on a block: the fused model
    still runs its fused operators and gives the same outputs and gradients."""
    torch.manual_seed(0)
    model = build_model("lean-resnet20", num_classes=10, in_channels=1).to(memory_format=CL)
    fuse(model)
    x = torch.randn(4, 1, 10, 10).contiguous(memory_format=CL)

    def run():
        net = copy.deepcopy(model)
        with FlopCounterMode(display=False) as counter:
            y = net(x)
            y.square().sum().backward()
        return [y] + [p.grad for p in net.parameters()], counter.get_flop_counts()["Global"]

    without, counts = run()
    seen = []
    handles = [nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__)),
               model.stages[0][0].register_forward_hook(lambda m, i, o: None)]
    try:
        with_hooks, hooked_counts = run()
    finally:
        for h in handles:
            h.remove()
    assert "FusedBasicBlock" in seen and hooked_counts == counts
    assert torch.ops.pdenet.residual_block in counts
    for a, b in zip(with_hooks, without):
        torch.testing.assert_close(a, b)
