"""Training-step time of one configuration under several source trees of this project (checkouts, for example
``git worktree add /tmp/before <commit>``), side by side on a host whose speed drifts.

Each tree gets a worker process (``PYTHONPATH`` and working directory set to the tree, so that its ``pdenet`` and
``operators`` and its compiled kernels are the ones imported) that builds the configuration and then, on each
request, times ``--steps`` training steps (``pdenet.costs.training_step``: forward, backward, SGD update on a
random channels-last batch) and answers their median. The workers take turns, one at a time, for ``--rounds``
rounds; the report is each tree's median step and the median of its per-round ratios to the first tree's, so
that drift longer than a round cancels out. Only one worker computes at a time, but the idle ones' OpenMP threads
spin for a moment after their turn, which costs the next worker about the same each round: compare trees on the
same configuration, not configurations against each other (``benchmarks/train_step.py --rounds`` does that in
one process).

    git worktree add /tmp/before HEAD~3
    python benchmarks/compare_trees.py /tmp/before .                         # lean-resnet20, 28x28, batch 128
    python benchmarks/compare_trees.py /tmp/before . --config resnet20 --rounds 30
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = """
import statistics, sys, time, torch
from pdenet.allocator import keep_freed_memory
from pdenet.configs import build_model
from pdenet.costs import training_step
keep_freed_memory()
torch.manual_seed(0)
c, h, w, batch = (int(v) for v in sys.argv[2:6])
model = build_model(sys.argv[1], num_classes=10, in_channels=c).to(memory_format=torch.channels_last)
step, _ = training_step(model, (c, h, w), batch, channels_last=True)
for _ in range(3):
    step()
print("ready", flush=True)
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(statistics.median(times), flush=True)
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", help="source trees (the first is the reference)")
    parser.add_argument("--config", default="lean-resnet20")
    parser.add_argument("--input-shape", nargs=3, type=int, default=[1, 28, 28], metavar=("C", "H", "W"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per worker and round (default 3)")
    args = parser.parse_args(argv)
    trees = [Path(t).resolve() for t in args.trees]
    missing = [str(t) for t in trees if not (t / "pdenet").is_dir() or not (t / "operators").is_dir()]
    if missing:
        parser.error(f"not a source tree of this project (no pdenet/ and operators/): {', '.join(missing)}")
    if min(args.rounds, args.steps, args.batch_size, *args.input_shape) < 1:
        parser.error("--rounds, --steps, --batch-size and --input-shape must be positive")
    shape = [str(v) for v in (*args.input_shape, args.batch_size)]
    workers = []
    try:
        for tree in trees:
            env = dict(os.environ, PYTHONPATH=str(tree))
            worker = subprocess.Popen([sys.executable, "-c", WORKER, args.config, *shape], cwd=tree, env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            if worker.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the worker for {tree} failed to build {args.config} (its error is above)")
            workers.append(worker)
        times = [[] for _ in trees]
        for r in range(args.rounds):
            for worker, column in zip(workers, times):
                worker.stdin.write(f"{args.steps}\n")
                worker.stdin.flush()
                column.append(float(worker.stdout.readline()))
            print(f"\rround {r + 1}/{args.rounds}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    finally:
        for worker in workers:
            worker.stdin.close()
            worker.wait()
    print(f"{args.config}, batch {args.batch_size}, input {'x'.join(map(str, args.input_shape))}, "
          f"{args.rounds} rounds of {args.steps} steps")
    for tree, column in zip(trees, times):
        ratio = statistics.median(a / b for a, b in zip(column, times[0]))
        print(f"{tree}: median step {1e3 * statistics.median(column):.1f} ms, per-round ratio to the first "
              f"{ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
