"""Time the exact spectral norm of a 256-channel dense 3x3 operator on a 32x32 periodic grid (issue 2: < 2 s).

``DenseConv(256, 256, boundary="circular").spectral_norm((32, 32))`` runs the pruned Gram algorithm of
``operators.spectral`` (half the frequencies, Cholesky certificates, ``eigvalsh`` only where the maximum can
be). For reference the script also times the same batched ``bmm`` the issue's numbers were measured with,
so a reader can tell a busy machine from a slow algorithm, and checks the value against full ``svdvals``
of the symbol once (``--check``; slow).

    python benchmarks/spectral_norm.py                 # median of 5 runs
    python benchmarks/spectral_norm.py --repeats 3 --channels 128 --grid 16
    python benchmarks/spectral_norm.py --check         # also compare with svdvals of every K̂(ω)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# benchmarks/operators.py would shadow the ``operators`` package for a script run from this folder
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

from operators import DenseConv  # noqa: E402
from operators.spectral import batched_lapack  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--grid", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--check", action="store_true", help="compare with svdvals of the whole symbol")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    c, n = args.channels, args.grid
    op = DenseConv(c, c, boundary="circular")
    load = os.getloadavg()[0]
    times, value = [], None
    for _ in range(args.repeats):
        start = time.perf_counter()
        value = op.spectral_norm((n, n))
        times.append(time.perf_counter() - start)
    reference = torch.randn(n * (n // 2 + 1), c, c, dtype=torch.complex64)
    start = time.perf_counter()
    reference.mH @ reference
    bmm = time.perf_counter() - start
    print(f"DenseConv({c}, {c}, boundary='circular').spectral_norm(({n}, {n})) = {value:.7f}")
    print(f"  median {statistics.median(times):.3f} s over {args.repeats} runs "
          f"(min {min(times):.3f} s, max {max(times):.3f} s); threads {torch.get_num_threads()}, "
          f"load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"  calibration: one batched bmm of the {n * (n // 2 + 1)} Gram matrices took {bmm:.3f} s "
          f"(0.5 s for 528 on an idle machine)")
    if args.check:
        with torch.no_grad():
            sym = op.symbol((n, n)).flatten(0, 1)
        start = time.perf_counter()
        exact = float(batched_lapack(torch.linalg.svdvals, sym).max())
        print(f"  svdvals of all {len(sym)} symbols: {exact:.7f} in {time.perf_counter() - start:.1f} s, "
              f"relative difference {abs(exact - value) / exact:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
