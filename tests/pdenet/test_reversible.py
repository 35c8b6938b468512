"""Reversible backpropagation of leapfrog and Hamiltonian blocks: gradients equal plain autograd, batch norm's
running statistics are updated once, the reconstruction drift is small, and the memory held for the backward pass
does not grow with the number of steps (saved tensors counted, and the peak resident memory of a fresh process)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pdenet.blocks import build_block

ROOT = Path(__file__).resolve().parents[2]
SCHEMES = ["leapfrog", "hamiltonian"]


def _pair(scheme, nt, dtype, h=0.2, **kwargs):
    """The same block twice: plain autograd and reversible, identical weights."""
    options = dict(operator="dense", activation="tanh", normalization="batch", learn_h=True, **kwargs)
    torch.manual_seed(0)
    plain = build_block(scheme, 4, nt=nt, h=h, **options).to(dtype)
    reversible = build_block(scheme, 4, nt=nt, h=h, reversible=True, **options).to(dtype)
    reversible.load_state_dict(plain.state_dict())
    return plain, reversible


def _gradients(block, y, weight):
    x = y.clone().requires_grad_()
    (block(x) * weight).sum().backward()
    return torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in block.parameters()])


def _relative_gradient_error(scheme, nt, dtype, seed=0, **kwargs):
    plain, reversible = _pair(scheme, nt, dtype, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(3, 4, 6, 6, generator=gen, dtype=dtype)
    weight = torch.randn(3, 4, 6, 6, generator=gen, dtype=dtype)
    expected, got = _gradients(plain, y, weight), _gradients(reversible, y, weight)
    return float((got - expected).norm() / expected.norm()), plain, reversible


@pytest.mark.parametrize("scheme, start", [("leapfrog", "rest"), ("leapfrog", "taylor"), ("hamiltonian", None)])
def test_gradients_equal_plain_autograd_in_float64(scheme, start):
    error, plain, reversible = _relative_gradient_error(scheme, 8, torch.float64,
                                                        **({"start": start} if start else {}))
    assert error < 1e-10
    # batch norm ran in training mode in both, and its running statistics were updated once per forward
    for a, b in zip(plain.modules(), reversible.modules()):
        if isinstance(a, torch.nn.BatchNorm2d):
            assert int(b.num_batches_tracked) == int(a.num_batches_tracked) >= 1
            torch.testing.assert_close(b.running_mean, a.running_mean, rtol=0, atol=0)
            torch.testing.assert_close(b.running_var, a.running_var, rtol=0, atol=0)
            assert b.track_running_stats


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gradients_in_float32_over_64_steps(scheme):
    """Measured relative errors (2-norm over the input and all parameter gradients) on this problem: about
    5e-6 (leapfrog) and 1e-6 (Hamiltonian); the stated tolerance is 1e-4."""
    error, _, _ = _relative_gradient_error(scheme, 64, torch.float32)
    assert error < 1e-4


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_reconstruction_drift_over_64_steps(scheme, dtype, tolerance):
    """Undoing 64 steps from the last state returns to the first one up to rounding (relative max error)."""
    _, block = _pair(scheme, 64, dtype)
    block.eval()
    y = torch.randn(3, 4, 6, 6, dtype=dtype, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        start = block.initial_state(y)
        back = block.integrate(block.integrate(start), reverse=True)
    drift = max(float((a - b).abs().max()) for a, b in zip(back, start)) / float(y.abs().max())
    assert drift < tolerance


def test_plain_forward_where_no_gradient_is_recorded():
    plain, reversible = _pair("leapfrog", 5, torch.float64)
    y = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    plain.eval(), reversible.eval()
    with torch.no_grad():
        torch.testing.assert_close(reversible(y), plain(y), rtol=0, atol=0)
    reversible.train()
    with torch.no_grad():
        out = reversible(y)
    assert out.grad_fn is None


def test_only_invertible_schemes_are_reversible():
    with pytest.raises(ValueError, match="reversible=True needs a scheme with an exact inverse.*'parabolic'"):
        build_block("parabolic", 2, operator="dense", reversible=True)
    assert "reversible=True" in repr(build_block("leapfrog", 2, operator="dense", reversible=True))


def _saved_bytes(block, y):
    """Bytes of the distinct tensors autograd keeps for the backward pass of ``block(y)``."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(y).sum()
    return sum(storages.values())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_saved_activations_do_not_grow_with_the_number_of_steps(scheme):
    y = torch.randn(2, 4, 8, 8, requires_grad=True)
    saved = {}
    for nt in (4, 16, 32):
        plain, reversible = _pair(scheme, nt, torch.float32)
        saved[nt] = (_saved_bytes(plain, y), _saved_bytes(reversible, y))
    assert saved[4][1] == saved[16][1] == saved[32][1] <= 3 * y.numel() * 4   # the last state only
    assert saved[32][0] > 6 * saved[4][0] > 0                                # plain autograd: linear in nt


CHILD = textwrap.dedent("""
    import json, re, sys
    import torch
    from pdenet.blocks import build_block

    def status(key):
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    scheme, nt, reversible = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    torch.manual_seed(0)
    block = build_block(scheme, 16, nt=nt, h=0.1, operator="dense", activation="tanh", reversible=reversible)
    y = torch.randn(8, 16, 32, 32, requires_grad=True)
    small = build_block(scheme, 16, nt=1, h=0.1, operator="dense", activation="tanh", reversible=reversible)
    small(y).square().sum().backward()   # warm: one step of the same kind forward and backward, kernels loaded
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                     # reset the peak resident set (VmHWM) to the current one
    before = status("VmRSS")
    block(y).square().sum().backward()
    print(json.dumps({"peak_kib": status("VmHWM") - before}))
""")


def _peak_kib(scheme, nt, reversible):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, scheme, str(nt), "1" if reversible else "0"], env=env,
                         capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"]


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_peak_memory_of_a_training_step_is_flat_in_the_number_of_steps():
    """Peak resident memory of forward + backward over the warm process (peak set reset just before; a fresh
    process per run, 8x16x32x32 float32
    states of 512 KiB): with stored activations 28 more steps took 59 to 75 MiB more (over four states per step);
    reversible, 9 to 12 MiB at both 4 and 32 steps."""
    reversible = {nt: _peak_kib("leapfrog", nt, True) for nt in (4, 32)}
    plain = {nt: _peak_kib("leapfrog", nt, False) for nt in (4, 32)}
    state_kib = 8 * 16 * 32 * 32 * 4 / 1024
    assert plain[32] - plain[4] > 28 * state_kib                     # at least a state per step stored
    # reversible: flat up to the allocator's noise (a few MiB between runs), far below the stored growth
    assert reversible[32] - reversible[4] < 0.2 * (plain[32] - plain[4]), (reversible, plain)
