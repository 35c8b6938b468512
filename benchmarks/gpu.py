"""Training throughput on a GPU: the lean ResNet-20, the dense ResNet-20 and the depthwise-separable ResNet-20,
each in float32 and in mixed precision (bf16; fp16 with a gradient scaler), eager and through ``torch.compile``,
side by side in one run.

A step is the trainer's (``pdenet.training.Trainer``: forward, cross-entropy, backward, SGD with Nesterov momentum,
the learning-rate schedule; the model fused as the trainer fuses it, which changes nothing off the CPU, and in the
channels-last layout) on one random CIFAR-sized batch (3x32x32, batch 128) that is already on the device, so the
numbers measure the network and the optimizer, not the data path. Every variant is a fresh copy of the model with
the same seed. After ``--warmup`` epochs of ``--steps`` steps (compilation happens there and is not timed),
``--repeats`` epochs are each timed between two ``torch.cuda.synchronize()`` calls; the table reports the median
time per step, images per second and the throughput relative to the dense ResNet-20 at the same precision and
compilation. "separable" is the ResNet-20 with MobileNet's depthwise-separable operator (a 3x3 depthwise
convolution, then 1x1) in place of each 3x3 convolution (``build_model("resnet20", operator="separable")``).

Without a CUDA device the script says so and exits (status 0) unless ``--device cpu`` is given; ``--quick`` is a
smoke run of every variant (batch 8, 2 timed epochs of 2 steps, one CPU thread, ``torch.compile`` with the ``eager``
backend: graph capture without code generation) that takes well under a minute on a CPU.

    python benchmarks/gpu.py                                   # all 18 variants on the first GPU
    python benchmarks/gpu.py --batch-size 256 --amp off bf16 --compile off
    python benchmarks/gpu.py --device cpu --quick              # every variant, briefly, on the CPU
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# benchmarks/operators.py shares its name with the package: keep this folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
from pdenet.allocator import keep_freed_memory  # noqa: E402
from pdenet.configs import build_model  # noqa: E402
from pdenet.distributed import DistContext, resolve_device  # noqa: E402
from pdenet.training import AMP_MODES, ClassificationTask, TrainConfig, Trainer, seed_everything  # noqa: E402

#: name in the table -> (configuration, overrides)
MODELS = {"lean-resnet20": ("lean-resnet20", {}), "resnet20": ("resnet20", {}),
          "separable-resnet20": ("resnet20", {"operator": "separable"})}
DENSE = "resnet20"
COMPILE = ("off", "on")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--amp", nargs="+", default=list(AMP_MODES), choices=AMP_MODES, help="precisions (default all)")
    p.add_argument("--compile", nargs="+", default=list(COMPILE), choices=COMPILE,
                   help="eager (off) and/or torch.compile (on); default both")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile's backend (default inductor; eager with --quick)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default 128; 8 with --quick)")
    p.add_argument("--input-shape", nargs=3, type=int, default=[3, 32, 32], metavar=("C", "H", "W"))
    p.add_argument("--steps", type=int, default=None, help="steps per timed epoch (default 10; 2 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed epochs (default 7; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed epochs first (default 2; 1 with --quick)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="NCHW layout instead")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="a smoke run of every variant (see above)")
    args = p.parse_args(argv)
    defaults = dict(batch_size=(8, 128), steps=(2, 10), repeats=(2, 7), warmup=(1, 2),
                    compile_backend=("eager", "inductor"), threads=(1, None))
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if min(args.batch_size, args.steps, args.repeats, *args.input_shape, args.threads or 1) < 1 or args.warmup < 0:
        p.error("--batch-size, --steps, --repeats, --input-shape and --threads must be positive, --warmup not "
                "negative")
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{platform.processor() or platform.machine()} CPU, {threads} thread{'s' if threads > 1 else ''}"


def step_time(name: str, amp: str, compiled: bool, args, device: torch.device, batches) -> float:
    """Median seconds per training step of model ``name`` in precision ``amp``, eager or compiled."""
    config_name, overrides = MODELS[name]
    seed_everything(0)
    model = build_model(config_name, num_classes=10, in_channels=args.input_shape[0], **overrides).to(device)
    if compiled:
        torch.compiler.reset()  # a fresh cache: each variant compiles its own graphs, none hits a recompile limit
    config = TrainConfig(epochs=1, batch_size=args.batch_size, amp=amp, schedule="constant")
    trainer = Trainer(model, ClassificationTask(10), config, len(batches), DistContext(device=device),
                      channels_last=args.channels_last, compile=args.compile_backend if compiled else False)
    for _ in range(args.warmup):
        trainer.train_epoch(batches, show_progress=False)
    times = []
    for _ in range(args.repeats):
        synchronize(device)
        start = time.perf_counter()
        trainer.train_epoch(batches, show_progress=False)
        synchronize(device)
        times.append((time.perf_counter() - start) / len(batches))
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        if args.device.split(":")[0] == "cuda":  # the documented way out on a machine without a GPU
            print(f"benchmarks/gpu.py: no CUDA device here ({exc}); pass --device cpu to time on the CPU")
            return 0
        print(f"benchmarks/gpu.py: {exc}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        keep_freed_memory()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, *args.input_shape, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)
    batches = [(x, y)] * args.steps
    compile_text = f"torch.compile ({args.compile_backend})"
    print(f"{device_name(device)}, PyTorch {torch.__version__}, {time.strftime('%Y-%m-%d')}; batch {args.batch_size}, "
          f"input {'x'.join(map(str, args.input_shape))}, {'channels-last' if args.channels_last else 'NCHW'}, "
          f"median of {args.repeats} epochs of {args.steps} steps after {args.warmup} warm-up epochs")
    rates, failed = {}, []
    for compiled in (c == "on" for c in args.compile):
        for amp in args.amp:
            for name in args.models:
                try:
                    rates[(name, amp, compiled)] = args.batch_size / step_time(name, amp, compiled, args, device,
                                                                               batches)
                except (RuntimeError, TypeError, ValueError) as exc:  # one variant the device or backend cannot run
                    failed.append(f"{name}, amp {amp}, {compile_text if compiled else 'eager'}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    print(f"| model | amp | compile | ms/step | images/s | images/s / {DENSE}'s |")
    print("|---|---|---|---:|---:|---:|")
    for (name, amp, compiled), rate in rates.items():
        dense = rates.get((DENSE, amp, compiled))
        ratio = f"{rate / dense:.2f}" if dense else "-"
        print(f"| {name} | {amp} | {compile_text if compiled else 'eager'} | {1e3 * args.batch_size / rate:.2f} "
              f"| {rate:,.0f} | {ratio} |")
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
