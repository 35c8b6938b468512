"""The GPU side of training, checked on the CPU: ``enforce_stability`` reads no device value back to the host (and
gives the weights of the host-side algorithm it replaces), a training step reads only the logged loss, batches reach
a CUDA device from page-locked memory without blocking (code written for CUDA, run on the CPU by a mode that fakes
the device), and the GPU benchmark runs. One test needs a real GPU: it checks the first and third claims there with
CUDA's own synchronization check."""
import copy
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from operators import ConvOperator
from pdenet.blocks import build_block

#: Tensor methods that bring a value to the host (on a GPU they wait for the device to finish its queued work).
HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__bool__, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__format__}


class HostReads(TorchFunctionMode):
    """Records every call that brings a tensor's value to the host: ``HOST_READS``, and ``cpu``/``to`` the CPU
    from another device."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_cpu = (func is torch.Tensor.cpu or func is torch.Tensor.to and any(
            str(a) == "cpu" for a in (*args[1:], kwargs.get("device")))) and args[0].device.type != "cpu"
        if func in HOST_READS or to_cpu:
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


@torch.no_grad()
def host_enforce(block, grid):
    """The step-size control as a host-side loop: bounds read back as floats, Python branches (what
    ``enforce_stability`` computed before it stayed on the device); the reference its results must equal."""
    h = float(block.h)
    if block.stabilize == "rescale-h":
        bounds = [block.step_stability(j, grid, "tracked").bound for j in range(len(block.steps))]
        if None not in bounds and h > block.safety * min(bounds):
            block.set_h(block.safety * min(bounds))
        return
    for j in range(len(block.steps)):
        ops = [m for m in block.weights(j).modules() if isinstance(m, ConvOperator)]
        for _ in range(3):
            bound = block.step_stability(j, grid, "tracked").bound
            if bound is None or h <= block.safety * bound * (1 + 1e-9):
                break
            factor = (block.safety * bound / h) ** (1 / block.bound_degree)
            for op in ops:
                for p in op.parameters():
                    p.mul_(factor)


BLOCKS = [  # (scheme, options): every scheme with a step bound from symmetric layers, and both stabilizers
    ("parabolic", dict(operator="dense", stabilize="project-norm")),
    ("parabolic", dict(operator="lean", stabilize="project-norm")),
    ("parabolic", dict(operator="separable", stabilize="project-norm")),  # bilinear: up to three passes
    ("parabolic", dict(operator="dense", stabilize="rescale-h", nt=3)),
    ("parabolic", dict(operator="lean", stabilize="rescale-h", normalization="batch")),  # g from running stats
    ("parabolic", dict(operator="dense", stabilize="project-norm", shared_weights=True)),
    ("rk4", dict(operator="dense", stabilize="rescale-h")),
    ("leapfrog", dict(operator="dense", stabilize="project-norm")),  # bound_degree 1
    ("leapfrog", dict(operator="lean", stabilize="rescale-h")),
    ("hamiltonian", dict(operator="dense", stabilize="project-norm")),
    ("hamiltonian", dict(operator="dense", stabilize="rescale-h")),
    ("theta", dict(operator="dense", stabilize="rescale-h")),  # A-stable: the bound is inf
    ("diffusion-reaction", dict(stabilize="project-norm")),
    ("diffusion-reaction", dict(stabilize="rescale-h", splitting="strang")),
    ("diffusion-reaction", dict(stabilize="rescale-h", diffusion="implicit",
                                operator_kwargs={"boundary": "circular"})),
]


@pytest.mark.parametrize("h", [0.02, 50.0], ids=["inside-bound", "outside-bound"])
@pytest.mark.parametrize("scheme, options", BLOCKS, ids=[f"{s}-{'-'.join(map(str, o.values()))}" for s, o in BLOCKS])
def test_enforce_stability_stays_on_the_device_and_matches_the_host_algorithm(scheme, options, h):
    """Five optimizer-like steps (a forward pass, a weight change, ``enforce_stability``) on two copies of a block:
    one enforced by ``enforce_stability`` under a mode that records host reads, one by the host-side loop. Same
    weights and ``h`` to the bit after each step; no host read. ``h = 50`` needs rescaling at every step, ``0.02``
    at none."""
    options = dict(options)
    torch.manual_seed(0)
    block = build_block(scheme, 3, nt=options.pop("nt", 2), h=h, learn_h=True, **options)
    grid = (6, 6)
    reference = copy.deepcopy(block)
    for step in range(5):
        x = torch.randn(2, 3, *grid, generator=torch.Generator().manual_seed(step))
        with torch.no_grad():
            for b in (block, reference):
                b(x)  # the grid of the last forward pass; batch norm's running statistics
                for op in b.operators():
                    for p in op.parameters():
                        p.mul_(1.05)  # an optimizer step that makes the operators larger
        torch.manual_seed(step)  # a cold power iteration starts from a random vector
        with HostReads() as reads:
            block.enforce_stability()
        torch.manual_seed(step)
        host_enforce(reference, grid)
        assert reads.calls == [], f"host reads in enforce_stability: {reads.calls}"
        for (name, a), b in zip(block.state_dict().items(), reference.state_dict().values()):
            assert torch.equal(a, b), f"step {step}: {name} differs from the host algorithm's"
    final_h = float(block.h.detach())
    assert (final_h < h) if (h == 50.0 and options["stabilize"] == "rescale-h" and scheme != "theta") else \
        final_h == pytest.approx(h)


def test_the_host_read_recorder_sees_the_reads_it_forbids():
    """The recorder of the test above catches ``float``, ``.item()``, a branch on a tensor and a copy to the CPU
    (from the meta device here, which has no values to copy), not a CPU tensor's ``to("cpu")``."""
    t = torch.ones(())
    with HostReads() as reads:
        float(t), t.item(), t.to("cpu")
        if t > 0:
            pass
        with pytest.raises(NotImplementedError):
            torch.ones((), device="meta").to("cpu")
    assert reads.calls == ["__float__", "item", "__bool__", "to"]


def test_no_bound_leaves_h_and_weights_alone_without_host_reads():
    """A batch norm with a negative scale has no slope bound, so no step bound: ``h`` stays, as on the host."""
    torch.manual_seed(0)
    block = build_block("parabolic", 3, nt=1, h=50.0, operator="dense", normalization="batch", stabilize="rescale-h")
    with torch.no_grad():
        block.weights(0).norm.weight[0] = -1.0
    block(torch.randn(2, 3, 6, 6))
    assert block.step_bound((6, 6)) is None
    before = copy.deepcopy(block.state_dict())
    with HostReads() as reads:
        block.enforce_stability()
    assert reads.calls == []
    for name, value in block.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_bounds_without_a_device_form_come_from_the_host():
    """An antisymmetric block's bound (‖K − Kᵀ‖ from the symbol) and a scheme that overrides ``step_stability``
    alone are computed on the host: the results equal the host algorithm's, and the override is obeyed."""
    from dataclasses import replace

    from pdenet.blocks import ParabolicBlock

    class HalvedBound(ParabolicBlock):
        def step_stability(self, j, grid, method):
            result = super().step_stability(j, grid, method)
            return replace(result, bound=result.bound / 2)

    torch.manual_seed(0)
    blocks = [build_block("antisymmetric", 3, nt=2, h=50.0, operator="dense", stabilize="project-norm"),
              build_block("antisymmetric", 3, nt=2, h=50.0, operator="dense", stabilize="rescale-h"),
              HalvedBound(3, nt=2, h=50.0, operator="dense", stabilize="rescale-h")]
    for block in blocks:
        block(torch.randn(2, 3, 6, 6))
        reference = copy.deepcopy(block)
        torch.manual_seed(1)
        block.enforce_stability()
        torch.manual_seed(1)
        host_enforce(reference, (6, 6))
        for (name, a), b in zip(block.state_dict().items(), reference.state_dict().values()):
            assert torch.equal(a, b), f"{type(block).__name__} {block.stabilize}: {name}"
    halved = blocks[-1]
    assert float(halved.h) == pytest.approx(0.9 * halved.step_bound((6, 6), method="power"), rel=1e-2)



def test_a_training_step_reads_the_device_only_to_log_the_loss():
    """25 steps of a PDE-ResNet whose blocks rescale their step size after every optimizer step: the host reads
    the loss at the logged steps (0, 10, 20 and the last) and the epoch's metric sums once, nothing else."""
    from pdenet import build_model
    from pdenet.training import ClassificationTask, TrainConfig, Trainer

    torch.manual_seed(0)
    model = build_model("pde-parabolic-lean", num_classes=4, in_channels=1, widths=(4, 8), nt=2,
                        block_kwargs={"stabilize": "rescale-h"})
    assert any(getattr(m, "stabilize", None) == "rescale-h" for m in model.modules())
    batch = (torch.randn(8, 1, 12, 12), torch.randint(0, 4, (8,)))
    trainer = Trainer(model, ClassificationTask(4), TrainConfig(epochs=1, batch_size=8), 25, log_every=10)
    with HostReads() as reads:
        trainer.train_epoch([batch] * 25, show_progress=False)
    assert sorted(reads.calls) == ["__float__"] * 4 + ["tolist"]


# ------------------------------------------------------------------------------------------------ data path
def is_cuda(device) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda"


def tensors_in(values):
    """The tensors among ``values``, looking into lists and tuples."""
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from tensors_in(v)


class FakeCuda(TorchFunctionMode):
    """Runs code written for a CUDA device on the CPU. Tensors copied or created "on the device", and every tensor
    computed from them, report ``cuda`` as their ``device`` but live on the CPU; page-locked allocations are
    ordinary ones. Records every copy from the host to the device as ``(from page-locked memory, non_blocking)``,
    a tensor built on the device from host data (``torch.tensor(data, device="cuda")``, ``t.new_tensor(data)``) as
    ``(False, False)``."""

    def __init__(self):
        super().__init__()
        self.pinned, self.on_device = {}, {}  # id -> tensor (kept alive, so that the ids stay theirs)
        self.copies = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if getattr(func, "__self__", None) is torch.Tensor.device:  # the ``device`` property
            return torch.device("cuda") if id(args[0]) in self.on_device else func(*args, **kwargs)
        if func is torch.Tensor.pin_memory:
            out = args[0] if id(args[0]) in self.pinned else args[0].clone()
            self.pinned[id(out)] = out
            return out
        pin, to_device = kwargs.get("pin_memory", False), is_cuda(kwargs.get("device"))
        if pin:
            kwargs["pin_memory"] = False
        if to_device:
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and any(is_cuda(a) for a in args[1:]):
            to_device, args = True, tuple("cpu" if is_cuda(a) else a for a in args)
        if to_device and func is torch.Tensor.to and id(args[0]) not in self.on_device:
            self.copies.append((id(args[0]) in self.pinned, kwargs.get("non_blocking", False)))
        elif (to_device and func in (torch.tensor, torch.as_tensor)
              or func is torch.Tensor.new_tensor and (to_device or id(args[0]) in self.on_device)):
            self.copies.append((False, False))
        out = func(*args, **kwargs)
        inputs = {id(t) for t in tensors_in((*args, *kwargs.values()))}
        if to_device:
            self.on_device.update((id(t), t) for t in tensors_in([out]))
        elif inputs & self.on_device.keys():  # new tensors computed from device tensors (not in-place results)
            self.on_device.update((id(t), t) for t in tensors_in([out]) if id(t) not in inputs)
        if pin:
            self.pinned[id(out)] = out
        return out


def test_copies_go_through_page_locked_memory_on_cuda_only():
    from pdenet.data.transfer import pinned_copies

    assert pinned_copies("cuda") and pinned_copies(torch.device("cuda", 1))
    assert not pinned_copies("cpu") and not pinned_copies("meta")


@pytest.mark.parametrize("augment", [False, True])
def test_batch_loader_on_cuda_copies_pinned_batches_without_blocking(augment):
    """On a (fake) CUDA device every batch and every augmentation tensor is copied from page-locked memory with
    ``non_blocking=True``, the images and targets gathered straight into page-locked buffers; the batches are
    those of the CPU loader."""
    from pdenet.data import Augmentation, BatchLoader
    from test_training import toy_dataset

    data = toy_dataset(40)
    augment = Augmentation(padding=2, flip=True, zoom=0.2, jitter=0.3) if augment else False
    cpu = list(BatchLoader(data, 16, augment=augment, seed=1))
    with FakeCuda() as fake:
        cuda = list(BatchLoader(data, 16, augment=augment, seed=1, device="cuda"))
    per_batch = 4 + (6 if augment else 0)  # images, targets, mean, std (+ contrast, gain, zoom, flip, top, left)
    assert len(fake.copies) == per_batch * len(cuda) and all(pinned and nb for pinned, nb in fake.copies)
    assert len(cuda) == len(cpu) == 3
    for (x, y), (x0, y0) in zip(cuda, cpu):
        assert torch.equal(x, x0) and torch.equal(y, y0)


def test_trainer_on_cuda_copies_a_data_loaders_batches_without_blocking():
    """A ``DataLoader``'s CPU batches are pinned (unless they are already) and copied with ``non_blocking=True``,
    in training and evaluation; the run gives the weights of the same run on the CPU."""
    from torch.utils.data import DataLoader, TensorDataset

    from pdenet.distributed import DistContext
    from pdenet.training import ClassificationTask, TrainConfig, Trainer
    from test_training import ToyNet

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 1, 12, 12, generator=g), torch.randint(4, (48,), generator=g))
    runs = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model, config = ToyNet(dropout=0.0), TrainConfig(epochs=1, batch_size=16, lr=0.05)
        loader = DataLoader(data, batch_size=16)
        trainer = Trainer(model, ClassificationTask(4), config, len(loader), DistContext(device=torch.device(device)),
                          fuse=False)  # the fused kernels take CPU inputs only: the same arithmetic on both devices
        with FakeCuda() as fake:
            trainer.fit(loader, loader, show_progress=False)
        runs.append((model.state_dict(), trainer.history[-1], fake.copies))
    (cpu_state, cpu_row, cpu_copies), (state, row, copies) = runs
    assert cpu_copies == [] and copies == [(True, True)] * (2 * 3 * 2)  # x and y of 3 batches, training and test
    for name, value in cpu_state.items():
        assert torch.equal(state[name], value), name
    assert row["test_loss"] == cpu_row["test_loss"]


# ------------------------------------------------------------------------------------------------ benchmark
BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


def test_gpu_benchmark_runs_every_variant_quickly_on_the_cpu():
    """``benchmarks/gpu.py --device cpu --quick``: 3 models x 3 precisions x eager/compiled, one table row each, the
    dense ResNet-20 the unit of the last column, in under a minute."""
    import subprocess
    import sys
    import time

    start = time.perf_counter()
    run = subprocess.run([sys.executable, str(BENCHMARK), "--device", "cpu", "--quick"], capture_output=True,
                         text=True, timeout=300)
    elapsed = time.perf_counter() - start
    assert run.returncode == 0, run.stdout + run.stderr
    header, *table = run.stdout.splitlines()
    assert f"PyTorch {torch.__version__}" in header and "batch 8, input 3x32x32" in header
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    assert {(r[0], r[1], r[2]) for r in rows} == {(m, a, c) for m in ("lean-resnet20", "resnet20", "separable-resnet20")
                                                  for a in ("off", "bf16", "fp16")
                                                  for c in ("eager", "torch.compile (eager)")}
    assert all(float(r[3]) > 0 and float(r[4].replace(",", "")) > 0 for r in rows)
    assert all(r[5] == "1.00" for r in rows if r[0] == "resnet20")
    assert elapsed < 60, f"--quick took {elapsed:.0f} s"


@pytest.mark.skipif(torch.cuda.is_available(), reason="says what it does on a machine without a GPU")
def test_gpu_benchmark_without_a_gpu_says_so_and_exits_cleanly(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA device" in out and "--device cpu" in out
    assert module.main(["--device", "tpu"]) == 2 and "unknown device" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheme, options", [
    ("parabolic", dict(operator="dense", stabilize="project-norm")),
    ("parabolic", dict(operator="lean", stabilize="rescale-h", normalization="batch")),
    ("hamiltonian", dict(operator="dense", stabilize="rescale-h")),
    ("diffusion-reaction", dict(stabilize="project-norm")),
])
def test_on_cuda_neither_enforce_stability_nor_the_loader_synchronizes(scheme, options):
    """With CUDA's synchronization check set to raise, a block keeps its step size on the GPU and pdenet's loader
    delivers augmented batches there."""
    from pdenet.data import Augmentation, BatchLoader
    from test_training import toy_dataset

    torch.manual_seed(0)
    block = build_block(scheme, 3, nt=2, h=50.0, learn_h=True, **options).cuda()
    block(torch.randn(2, 3, 6, 6, device="cuda"))
    loader = BatchLoader(toy_dataset(40), 16, augment=Augmentation(padding=2, flip=True, zoom=0.2, jitter=0.3),
                         device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            block.enforce_stability()
        batches = list(loader)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    h = float(block.h.detach())
    assert h <= 0.9 * block.step_bound((6, 6), method="power") * 1.02  # the tracked norm is an estimate from below
    assert (h < 50.0) == (options["stabilize"] == "rescale-h")
    assert len(batches) == 3 and all(x.is_cuda and y.is_cuda for x, y in batches)
