"""Peak memory and time of a training step of one PDE-ResNet stage against its number of time steps, with stored
activations (plain autograd) and with reversible backpropagation.

A stage is one time-stepping block (leapfrog or Hamiltonian, lean operators, batch norm in the layers) at a fixed
width; a training step is ``block(Y)`` forward and a backward pass of a scalar loss. Every measurement runs in a
fresh process: it first runs a one-step block of the same kind forward and backward (every kernel loaded, the
allocator warm), resets the kernel's record of its peak resident set (``/proc/self/clear_refs``, Linux), then runs
the measured block once; the peak is ``VmHWM`` after it minus ``VmRSS`` before it. Alongside it, the bytes autograd keeps for
the backward pass (every saved tensor's storage, counted once) and the best time of a few further steps (the
minimum: on a shared host the others are the same step slowed down by other processes).

    python benchmarks/memory.py                                  # leapfrog and Hamiltonian, nt = 4, 8, 16, 32, 64
    python benchmarks/memory.py --schemes leapfrog --steps 4 64  # a shorter run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/operators.py shares its name with the operators package: keep this folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def child(scheme: str, nt: int, reversible: bool, channels: int, size: int, batch: int, repeats: int) -> dict:
    """One measurement, in this (fresh) process."""
    import re

    import torch

    from pdenet.blocks import build_block

    def block_of(steps, reversible):
        torch.manual_seed(0)
        return build_block(scheme, channels, nt=steps, h=0.1, operator="lean", normalization="batch",
                           reversible=reversible)

    y = torch.randn(batch, channels, size, size, requires_grad=True)
    warm = block_of(1, reversible)
    warm(y).square().mean().backward()
    block = block_of(nt, reversible)
    def status(key):
        return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1))

    Path("/proc/self/clear_refs").write_text("5")  # the peak resident set starts again from the current one
    before = status("VmRSS")
    block(y).square().mean().backward()
    peak_kib = status("VmHWM") - before

    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = block(y).square().mean()
    loss.backward()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(y).square().mean().backward()
        times.append(time.perf_counter() - start)
    return {"scheme": scheme, "nt": nt, "reversible": reversible, "peak_mib": peak_kib / 1024,
            "saved_mib": sum(storages.values()) / 2 ** 20, "step_ms": 1000 * min(times),
            "median_step_ms": 1000 * statistics.median(times),
            "state_mib": y.numel() * y.element_size() / 2 ** 20}


def measure(args, scheme: str, nt: int, reversible: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", scheme, str(nt), str(int(reversible)),
               "--channels", str(args.channels), "--size", str(args.size), "--batch", str(args.batch),
               "--repeats", str(args.repeats)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    by = {(r["scheme"], r["nt"], r["reversible"]): r for r in rows}
    lines = ["| scheme | nt | peak MiB, stored | peak MiB, reversible | saved for backward MiB, stored / reversible "
             "| best step ms, stored | best step ms, reversible | time overhead |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for scheme, nt in dict.fromkeys((r["scheme"], r["nt"]) for r in rows):
        s, r = by[(scheme, nt, False)], by[(scheme, nt, True)]
        lines.append(f"| {scheme} | {nt} | {s['peak_mib']:.1f} | {r['peak_mib']:.1f} | "
                     f"{s['saved_mib']:.1f} / {r['saved_mib']:.1f} | {s['step_ms']:.0f} | {r['step_ms']:.0f} | "
                     f"{r['step_ms'] / s['step_ms']:.2f}x |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemes", nargs="+", default=["leapfrog", "hamiltonian"], choices=["leapfrog", "hamiltonian"])
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="numbers of time steps nt")
    p.add_argument("--channels", type=int, default=32, help="width of the stage (default 32)")
    p.add_argument("--size", type=int, default=32, help="grid n x n (default 32)")
    p.add_argument("--batch", type=int, default=32, help="batch (default 32)")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per measurement, best of (default 7)")
    p.add_argument("--threads", type=int, help="torch threads of the measuring processes (default: all cores)")
    p.add_argument("--out", default="benchmarks/results/memory", help="output folder")
    p.add_argument("--child", nargs=3, metavar=("SCHEME", "NT", "REVERSIBLE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        scheme, nt, reversible = args.child
        print(json.dumps(child(scheme, int(nt), reversible == "1", args.channels, args.size, args.batch,
                               args.repeats)))
        return 0
    rows = []
    for scheme in args.schemes:
        for nt in args.steps:
            for reversible in (False, True):
                rows.append(measure(args, scheme, nt, reversible))
                r = rows[-1]
                print(f"{scheme} nt={nt} {'reversible' if reversible else 'stored'}: peak {r['peak_mib']:.1f} MiB, "
                      f"saved {r['saved_mib']:.1f} MiB, {r['step_ms']:.0f} ms", flush=True)
    state = rows[0]["state_mib"]
    text = (f"# Memory of a training step of one stage against nt\n\n{args.batch}x{args.channels}x{args.size}x"
            f"{args.size} float32 states ({state:.1f} MiB each), lean operators, batch norm, h = 0.1\n\n{table(rows)}\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
