"""Accuracy against cost: train a grid of networks with one training budget each and draw every family's Pareto
frontier of accuracy against FLOPs, parameters and measured training time.

Grid (``default_grid``): lean ResNets (widths 1x-4x of 16/32/64, depths 20/32/56, cross and full stencils), dense
ResNets (widths 0.5x-1.5x), MobileNetV2 and ShuffleNetV2 (width multipliers spanning the same FLOPs) and a
PDE-ResNet (the parabolic lean layer) at two widths. Every point has a tier: tier 1 spans the FLOP range, tiers 2
and 3 fill it in and add the largest networks. Data: Fashion-MNIST (all 60,000 training images, tested on its
10,000) and the CIFAR-10 development copy, read where ``pdenet.data`` finds them. Every run trains with
``pdenet``'s Trainer (SGD, cosine schedule, the data set's augmentation, channels-last, as ``pdenet train``;
``--warmup-epochs`` adds a linear warm-up).

Budget. Before training, a few training steps of each network are timed on each data set, tier by tier; from
these images/s the plan takes the most tiers that fit in ``--budget-minutes`` (at ``--epochs`` epochs when given,
else at one; a tier is timed only when the tiers below it fit), then the most epochs that fit (equal epochs for
every network), and prints its estimate. With ``--equal-time`` every run gets the same share of the budget
instead, as whole epochs (at least one) at its measured speed. ``--networks`` keeps only the named networks of the
grid.

Resumable. The plan is kept in ``plan.json`` and every finished run is appended to ``results.csv`` at once; the
same command run again skips the finished runs (an interrupted grid loses at most the run in progress). Runs go
seed by seed, so an interrupted grid has every network at its first seeds.

Output (``--out``): ``results.csv`` (one row per run, with the test accuracy after every epoch), ``results.md``
(mean ± standard deviation over the seeds per network, its family's frontiers it lies on, the frontier across the
families, and how stable the ranking is: Kendall's τ of seed against seed and of the last epoch against the one
before), ``accuracy_vs_flops.png``, ``accuracy_vs_params.png`` and ``accuracy_vs_train_time.png`` (one panel per
data set, each family's frontier drawn through its points).

    python benchmarks/frontier.py                          # the default grid, planned for two hours
    python benchmarks/frontier.py --budget-minutes 480     # more tiers and epochs
    python benchmarks/frontier.py --equal-time             # the same training time for every run
    python benchmarks/frontier.py --networks 'lean-resnet20 w1 d20 cross' 'resnet20 w1 d20'   # part of the grid
    python benchmarks/frontier.py --quick                  # a few tiny networks on a few hundred images
    python benchmarks/frontier.py --report-only            # results.md and the plots from results.csv
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# benchmarks/operators.py shares its name with the operators package: keep this folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
from pdenet.allocator import keep_freed_memory  # noqa: E402
from pdenet.commands._common import CommandError, load_split, plural  # noqa: E402
from pdenet.commands.train import format_row  # noqa: E402
from pdenet.configs import LEAN_KWARGS, build_model  # noqa: E402
from pdenet.costs import (count_parameters, fastest_threads, flops_per_image, measure_latency,  # noqa: E402
                          measure_train_step)
from pdenet.data import BatchLoader  # noqa: E402
from pdenet.training import ClassificationTask, TrainConfig, Trainer, seed_everything  # noqa: E402

DATA = ("fashion-mnist", "cifar10")
COLUMNS = ("data", "family", "config", "width", "depth", "stencil", "seed", "epochs", "accuracy", "parameters",
           "flops", "train_images_per_s", "latency_ms", "train_time_s", "threads", "accuracy_by_epoch")
NUMBERS = {"width": float, "seed": int, "epochs": int, "accuracy": float, "parameters": int, "flops": int,
           "train_images_per_s": float, "latency_ms": float, "train_time_s": float, "threads": int}
#: the plots: x column, its scale, axis label, file name
AXES = (("flops", 1e-6, "MFLOPs per image (PyTorch's counter)", "accuracy_vs_flops.png"),
        ("parameters", 1, "parameters", "accuracy_vs_params.png"),
        ("train_time_s", 1, "training time per run (s)", "accuracy_vs_train_time.png"))
#: the costs' short names in results.md
NAMES = {"flops": "FLOPs", "parameters": "parameters", "train_time_s": "time"}
#: the estimate: training at the timed steps' images/s, evaluation at this multiple of it, and this many seconds
#: more per run (building the model, counting its FLOPs, timing its batch-1 latency)
EVAL_SPEEDUP, RUN_SECONDS = 3.0, 3.0
QUICK_IMAGES = (384, 256)  # training and test images of --quick


@dataclass(frozen=True)
class Point:
    """One network of the grid: ``build_model(config, width=width, depth=depth)``, with the lean operator's
    ``stencil`` where given; ``tier`` 1 is the core of the grid."""

    family: str
    config: str
    width: float
    depth: int | None = None
    stencil: str | None = None
    tier: int = 1

    def overrides(self) -> dict:
        knobs = {"width": self.width} | ({} if self.depth is None else {"depth": self.depth})
        return knobs | ({} if self.stencil is None else {"operator_kwargs": {**LEAN_KWARGS, "stencil": self.stencil}})

    @property
    def label(self) -> str:
        depth = "" if self.depth is None else f" d{self.depth}"
        return f"{self.config} w{self.width:g}{depth}{'' if self.stencil is None else ' ' + self.stencil}"


def default_grid() -> list[Point]:
    """Lean ResNets (cross and full stencils), dense ResNets, MobileNetV2, ShuffleNetV2 and a PDE-ResNet, in tiers."""
    lean = [((1, 20, "cross"), 1), ((2, 20, "cross"), 1), ((4, 20, "cross"), 1), ((1, 56, "cross"), 1),
            ((1, 20, "full"), 1), ((2, 20, "full"), 1),
            ((1, 32, "cross"), 2), ((2, 32, "cross"), 2), ((2, 56, "cross"), 2), ((4, 20, "full"), 2),
            ((4, 32, "cross"), 3), ((4, 56, "cross"), 3), ((1, 56, "full"), 3), ((2, 56, "full"), 3)]
    grid = [Point("lean ResNet", "lean-resnet20", w, d, s, tier) for (w, d, s), tier in lean]
    grid += [Point("dense ResNet", "resnet20", w, 20, None, tier) for w, tier in ((0.5, 1), (1, 1), (1.5, 2))]
    grid += [Point("MobileNetV2", "mobilenetv2", w, tier=tier) for w, tier in ((0.1, 1), (0.25, 1), (0.5, 1),
                                                                               (0.35, 2), (0.75, 3))]
    grid += [Point("ShuffleNetV2", "shufflenetv2", w, tier=tier) for w, tier in ((0.25, 1), (0.5, 1), (1, 1),
                                                                                 (0.75, 2), (1.5, 3))]
    grid += [Point("PDE-ResNet", "pde-parabolic-lean", w, 3, "cross", tier) for w, tier in ((0.5, 1), (1, 2))]
    return grid


def quick_grid() -> list[Point]:
    """A handful of tiny networks, one or two per family."""
    return [Point("lean ResNet", "lean-resnet20", 0.5, 8, "cross"),
            Point("lean ResNet", "lean-resnet20", 1, 8, "cross"), Point("lean ResNet", "lean-resnet20", 0.5, 8, "full"),
            Point("dense ResNet", "resnet20", 0.25, 8),
            Point("MobileNetV2", "mobilenetv2", 0.1), Point("ShuffleNetV2", "shufflenetv2", 0.1),
            Point("PDE-ResNet", "pde-parabolic-lean", 0.25, 1, "cross")]


# ------------------------------------------------------------------------------------------------ the frontier
def pareto_front(costs, accuracies) -> list[int]:
    """Indices of the points no other point dominates (cost no higher and accuracy no lower, one of them strictly),
    by increasing cost; of identical points the first."""
    if len(costs) != len(accuracies):
        raise ValueError(f"{len(costs)} costs for {len(accuracies)} accuracies")
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -accuracies[i], i))
    front, best = [], -math.inf
    for i in order:
        if accuracies[i] > best:
            front.append(i)
            best = accuracies[i]
    return front


# ------------------------------------------------------------------------------------------------ the plan
def point_of(run: dict) -> Point:
    """The grid point of a planned run."""
    return Point(**{k: run[k] for k in Point.__dataclass_fields__})


def run_key(data: str, point: Point, seed: int) -> str:
    return f"{data}/{point.label}/seed {seed}"


def measure_rates(points, datasets, batch_size: int, quick: bool) -> dict[str, dict[str, float]]:
    """Training images/s of every network on every data set, timed on a few fused training steps."""
    rates = {}
    for data, (train_set, _) in datasets.items():
        rates[data] = {}
        for point in points:
            model = build(point, train_set)
            step = measure_train_step(model, train_set.image_shape, batch_size, warmup=0 if quick else 2,
                                      repeats=1 if quick else 3, channels_last=True)
            rates[data][point.label] = batch_size / step
    return rates


def run_seconds(epochs: int, rate: float, sizes: tuple[int, int]) -> float:
    """Estimated wall time of one run: ``epochs`` over ``sizes[0]`` training images, one evaluation, overhead."""
    return epochs * sizes[0] / rate + sizes[1] / (EVAL_SPEEDUP * rate) + RUN_SECONDS


def assign_epochs(points, rates, sizes, seeds: int, budget_s: float, epochs: int | None,
                  equal_time: bool) -> tuple[dict, float, bool]:
    """Epochs per ``(data, label)`` for ``points``, the estimated seconds of the whole grid and whether it fits.

    Equal epochs: ``epochs``, or the most that fit (at least one). Equal time: every run's share of the budget
    as whole epochs at its rate (at least one; the grid does not fit where the slowest network needs more than its
    share for one epoch)."""
    keys = [(data, p.label) for data in rates for p in points]
    one = {k: run_seconds(1, rates[k[0]][k[1]], sizes[k[0]]) for k in keys}
    fixed = {k: run_seconds(0, rates[k[0]][k[1]], sizes[k[0]]) for k in keys}
    if equal_time:
        share = budget_s / (seeds * len(keys))
        fits = all(one[k] <= share for k in keys)
        chosen = {k: max(1, math.floor((share - fixed[k]) / (one[k] - fixed[k]))) for k in keys}
    else:
        per_epoch = seeds * sum(one[k] - fixed[k] for k in keys)
        most = math.floor((budget_s - seeds * sum(fixed.values())) / per_epoch)
        fits = (epochs or 1) <= most
        chosen = dict.fromkeys(keys, epochs or max(1, most))
    total = seeds * sum(fixed[k] + chosen[k] * (one[k] - fixed[k]) for k in keys)
    return chosen, total, fits


def make_plan(grid, measure, sizes, args) -> dict:
    """The most tiers that fit in the budget (or tiers 1..``--tiers``), their epochs, and the runs in order (seed
    by seed). ``measure(points)`` gives ``{data: {label: images/s}}``; a tier's networks are timed only when the
    tiers below it fit."""
    rates = {data: {} for data in sizes}
    tiers = [t for t in sorted({p.tier for p in grid}) if not args.tiers or t <= args.tiers]
    chosen = None
    for tier in tiers:
        points = [p for p in grid if p.tier <= tier]
        for data, measured in measure([p for p in points if p.tier == tier]).items():
            rates[data].update(measured)
        fit = assign_epochs(points, rates, sizes, len(args.seeds), 60 * args.budget_minutes, args.epochs,
                            args.equal_time)
        if chosen is None or fit[2] or args.tiers:
            chosen = (tier, points, *fit)
        if not fit[2] and not args.tiers:
            break
    tier, points, epochs, total, fits = chosen
    runs = [{"data": data, **asdict(p), "seed": seed, "epochs": epochs[data, p.label], "key": run_key(data, p, seed)}
            for seed in args.seeds for data in sizes for p in points]
    return {"settings": plan_settings(args), "tiers": tier, "fits": fits, "estimate_s": total, "rates": rates,
            "runs": runs}


def plan_settings(args) -> dict:
    """The options that define a plan: a rerun with the same ones continues it."""
    keys = ("data", "seeds", "budget_minutes", "epochs", "equal_time", "tiers", "networks", "quick", "batch_size",
            "warmup_epochs", "train_images", "test_images")
    return {k: getattr(args, k) for k in keys}


def format_plan(plan: dict, grid, sizes) -> str:
    """The estimate: per network and data set its measured speed, epochs and minutes over all seeds."""
    seeds = len(plan["settings"]["seeds"])
    chosen = {(r["data"], point_of(r).label): r["epochs"] for r in plan["runs"]}
    lines = [f"{'data':<14} {'network':<34} {'train img/s':>11} {'epochs':>6} {'minutes':>8}"]
    for (data, label), epochs in chosen.items():
        rate = plan["rates"][data][label]
        lines.append(f"{data:<14} {label:<34} {rate:>11.0f} {epochs:>6} "
                     f"{seeds * run_seconds(epochs, rate, sizes[data]) / 60:>8.1f}")
    left_out = len(grid) - len({label for _, label in chosen})
    budget = plan["settings"]["budget_minutes"]
    lines.append(f"{len(plan['runs'])} runs ({seeds} seeds), tiers 1-{plan['tiers']} of the grid"
                 f"{f' ({left_out} networks of higher tiers left out)' if left_out else ''}: estimated "
                 f"{plan['estimate_s'] / 60:.0f} minutes for a budget of {budget:g}")
    if not plan["fits"] and not plan["settings"]["quick"]:
        lines.append("warning: the estimate exceeds the budget; raise --budget-minutes, or lower --tiers, --epochs "
                     "or --train-images")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ training
def build(point: Point, dataset):
    return build_model(point.config, num_classes=dataset.num_classes, in_channels=dataset.image_shape[0],
                       **point.overrides())


def train_run(run: dict, datasets, args) -> dict:
    """Train one network with pdenet's Trainer; its row of results.csv."""
    train_set, test_set = datasets[run["data"]]
    point = point_of(run)
    seed_everything(run["seed"])
    model = build(point, train_set)
    shape = train_set.image_shape
    parameters, flops = count_parameters(model), flops_per_image(model, shape)
    loader = BatchLoader(train_set, args.batch_size, shuffle=True, augment=True, seed=run["seed"], drop_last=True,
                         channels_last=True)
    test_loader = BatchLoader(test_set, 1000, shuffle=False, channels_last=True)
    config = TrainConfig(epochs=run["epochs"], batch_size=args.batch_size, seed=run["seed"],
                         warmup_epochs=min(args.warmup_epochs, run["epochs"] / 2))
    trainer = Trainer(model, ClassificationTask(train_set.num_classes), config, len(loader), channels_last=True)

    def report_epoch(_, row):
        print(f"    {format_row(row, 'accuracy')}", flush=True)

    history = trainer.fit(loader, test_loader, eval_every=1, callbacks=[report_epoch], show_progress=False)
    train_time = sum(r["train_time"] for r in history)
    repeats = 3 if args.quick else 20
    latency = measure_latency(trainer.model, shape, 1, warmup=repeats // 4 + 1, repeats=repeats, channels_last=True)
    return {"data": run["data"], "family": point.family, "config": point.config, "width": point.width,
            "depth": "-" if point.depth is None else point.depth, "stencil": point.stencil or "-",
            "seed": run["seed"], "epochs": run["epochs"], "accuracy": history[-1]["test_accuracy"],
            "parameters": parameters, "flops": flops,
            "train_images_per_s": sum(r["train_images_per_s"] * r["train_time"] for r in history) / train_time,
            "latency_ms": 1e3 * latency, "train_time_s": train_time, "threads": torch.get_num_threads(),
            "accuracy_by_epoch": " ".join(f"{r['test_accuracy']:.4f}" for r in history)}


# ------------------------------------------------------------------------------------------------ results
def read_results(path: Path) -> list[dict]:
    """The finished runs of ``results.csv`` (numbers parsed); a row cut short by an interruption is left out."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames and tuple(reader.fieldnames) != COLUMNS:
            raise CommandError(f"{path} has the columns {reader.fieldnames}, not this benchmark's {list(COLUMNS)}; "
                               "use another --out")
        rows = []
        for row in reader:
            try:
                rows.append({k: NUMBERS[k](v) if k in NUMBERS else v for k, v in row.items()})
            except (TypeError, ValueError):
                print(f"skipping an incomplete row of {path}: {row}", file=sys.stderr)
    return rows


def append_result(path: Path, row: dict) -> None:
    """Append ``row`` to ``results.csv`` (the header first in a new file; a row cut short by an interruption is
    dropped first) and flush it to disk."""
    if path.is_file():
        text = path.read_bytes()
        if text and not text.endswith(b"\n"):
            with path.open("r+b") as f:
                f.truncate(text.rfind(b"\n") + 1)
    new = not path.is_file() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def row_point(row: dict) -> Point:
    """The grid point of a row of ``results.csv`` (or of a network's summary)."""
    depth = None if row["depth"] == "-" else int(row["depth"])
    return Point(row["family"], row["config"], row["width"], depth, None if row["stencil"] == "-" else row["stencil"])


def row_key(row: dict) -> str:
    return run_key(row["data"], row_point(row), row["seed"])


def summarize(rows: list[dict]) -> dict[str, list[dict]]:
    """Per data set, one entry per network: means over its seeds, the accuracies' standard deviation, and on
    which of its family's frontiers (``AXES``) it lies."""
    network = ("data", "family", "config", "width", "depth", "stencil")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in network), []).append(row)
    out: dict[str, list[dict]] = {}
    for key, members in groups.items():
        accuracies = [r["accuracy"] for r in members]
        entry = dict(zip(network, key))
        entry.update({k: statistics.fmean(r[k] for r in members) for k in
                      ("parameters", "flops", "train_images_per_s", "latency_ms", "train_time_s", "epochs")})
        entry.update(accuracy=statistics.fmean(accuracies), spread=statistics.stdev(accuracies) if len(members) > 1
                     else 0.0, seeds=len(members), frontier=[])
        out.setdefault(entry["data"], []).append(entry)
    for entries in out.values():
        entries.sort(key=lambda e: (e["family"], e["flops"]))
        for family in {e["family"] for e in entries}:
            mine = [e for e in entries if e["family"] == family]
            for axis, *_ in AXES:
                for i in pareto_front([e[axis] for e in mine], [e["accuracy"] for e in mine]):
                    mine[i]["frontier"].append(axis)
    return out


def ranking_agreement(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per data set, Kendall's τ between two rankings of its networks by test accuracy (1: the same order, 0:
    unrelated): ``seeds``, the first seed's ranking against the second's, and ``epochs``, the ranking after the
    last epoch against the one after the epoch before (means over the seeds); NaN where fewer than two networks
    have both."""
    from scipy.stats import kendalltau

    def tau(pairs: list[tuple[float, float]]) -> float:
        return float(kendalltau(*zip(*pairs)).statistic) if len(pairs) > 1 else math.nan

    out = {}
    for data in dict.fromkeys(r["data"] for r in rows):
        mine = [r for r in rows if r["data"] == data]
        by_network: dict[str, dict[int, dict]] = {}
        for r in mine:
            by_network.setdefault(row_point(r).label, {})[r["seed"]] = r
        seeds = sorted({r["seed"] for r in mine})[:2]
        seed_pairs = [tuple(runs[s]["accuracy"] for s in seeds) for runs in by_network.values()
                      if len(seeds) == 2 and set(seeds) <= set(runs)]
        epoch_pairs = []
        for runs in by_network.values():
            curves = [[float(a) for a in r["accuracy_by_epoch"].split()] for r in runs.values()]
            if all(len(c) > 1 for c in curves):
                epoch_pairs.append((statistics.fmean(c[-2] for c in curves), statistics.fmean(c[-1] for c in curves)))
        out[data] = {"seeds": tau(seed_pairs), "epochs": tau(epoch_pairs)}
    return out


def markdown(summary: dict[str, list[dict]], header: str, agreement: dict[str, dict[str, float]]) -> str:
    lines = [header, ""]
    for data, entries in summary.items():
        lines += [f"## {data}", "",
                  "| family | config | width | depth | stencil | seeds | epochs | accuracy (%) | parameters | "
                  "MFLOPs/img | train img/s | latency ms (b=1) | train time s | on the family's frontier of |",
                  "|" + "---|" * 14]
        for e in entries:
            frontier = ", ".join(NAMES[a] for a in e["frontier"]) or "-"
            lines.append(f"| {e['family']} | {e['config']} | {e['width']:g} | {e['depth']} | {e['stencil']} | "
                         f"{e['seeds']} | {e['epochs']:g} | {100 * e['accuracy']:.2f} ± {100 * e['spread']:.2f} | "
                         f"{e['parameters']:,.0f} | {e['flops'] / 1e6:.2f} | {e['train_images_per_s']:.0f} | "
                         f"{e['latency_ms']:.2f} | {e['train_time_s']:.1f} | {frontier} |")
        lines += ["", "Across the families, the frontier of " + "; of ".join(
            f"{NAMES[axis]}: " + ", ".join(row_point(entries[i]).label for i in pareto_front(
                [e[axis] for e in entries], [e["accuracy"] for e in entries]))
            for axis, *_ in AXES) + "."]
        tau = agreement[data]
        lines += ["", f"Ranking by accuracy, Kendall's τ: seed against seed {tau['seeds']:.2f}, last epoch against "
                      f"the one before {tau['epochs']:.2f} (1: the same order).", ""]
    return "\n".join(lines)


def plot(summary: dict[str, list[dict]], out: Path) -> list[Path]:
    """One figure per axis of ``AXES``, one panel per data set: every network as mean ± standard deviation over
    its seeds, and each family's frontier as a line through its frontier points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted({e["family"] for entries in summary.values() for e in entries})
    colors = dict(zip(families, plt.get_cmap("tab10").colors))
    paths = []
    for axis, scale, label, name in AXES:
        fig, axes = plt.subplots(1, len(summary), figsize=(6 * len(summary), 4.5), squeeze=False)
        for ax, (data, entries) in zip(axes[0], summary.items()):
            for family in families:
                mine = sorted((e for e in entries if e["family"] == family), key=lambda e: e[axis])
                if not mine:
                    continue
                xs, ys = [scale * e[axis] for e in mine], [100 * e["accuracy"] for e in mine]
                ax.errorbar(xs, ys, yerr=[100 * e["spread"] for e in mine], fmt="o", ms=4, capsize=3,
                            color=colors[family], label=family)
                front = [e for e in mine if axis in e["frontier"]]
                ax.plot([scale * e[axis] for e in front], [100 * e["accuracy"] for e in front], "-",
                        color=colors[family], alpha=0.7)
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy (%), mean ± std over seeds")
            ax.set_title(data)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)
    return paths


def write_report(out: Path, header: str) -> list[Path]:
    """``results.md`` and the plots from ``results.csv``; the files written."""
    rows = read_results(out / "results.csv")
    summary = summarize(rows)
    if not summary:
        raise CommandError(f"{out / 'results.csv'} holds no finished run yet")
    (out / "results.md").write_text(markdown(summary, header, ranking_agreement(rows)) + "\n")
    return [out / "results.md", *plot(summary, out)]


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=list(DATA), help=f"data sets (default {' '.join(DATA)})")
    p.add_argument("--data-dir", help="folder holding the data sets (default: the standard places)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds per network (default 0 1)")
    p.add_argument("--budget-minutes", type=float, default=120.0,
                   help="training time the plan aims at, all runs together (default 120)")
    p.add_argument("--epochs", type=int, help="epochs of every run (default: the most that fit in the budget)")
    p.add_argument("--equal-time", action="store_true",
                   help="the same training time for every run (its share of the budget, in whole epochs)")
    p.add_argument("--tiers", type=int, choices=(1, 2, 3), help="train the grid's tiers 1..N (default: the most "
                                                                 "that fit in the budget)")
    p.add_argument("--networks", nargs="+", metavar="LABEL",
                   help="train only these networks of the grid, named as the plan names them "
                        "(e.g. 'lean-resnet20 w1 d20 cross' 'resnet20 w1 d20')")
    p.add_argument("--train-images", type=int, help="use the first N training images (default: all)")
    p.add_argument("--test-images", type=int, help="evaluate on the first N test images (default: all)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch (default 128)")
    p.add_argument("--warmup-epochs", type=float, default=0.0,
                   help="linear learning-rate warm-up of every run, in epochs, at most half of the run's epochs "
                        "(default 0, as pdenet train)")
    p.add_argument("--threads", type=int, help="torch threads (default: the fastest of 1 and all cores, probed once)")
    p.add_argument("--quick", action="store_true", help=f"CI smoke run: {len(quick_grid())} tiny networks, "
                   f"{QUICK_IMAGES[0]} training and {QUICK_IMAGES[1]} test images, 1 epoch, batch 64")
    p.add_argument("--report-only", action="store_true", help="write results.md and the plots from results.csv")
    p.add_argument("--out", default="benchmarks/results/frontier", help="output folder")
    args = p.parse_args(argv)
    if args.epochs is not None and args.equal_time:
        p.error("--epochs and --equal-time exclude each other: equal time sets each run's epochs")
    if args.quick:
        args.epochs, args.batch_size = 1, 64
        args.train_images = args.train_images or QUICK_IMAGES[0]
        args.test_images = args.test_images or QUICK_IMAGES[1]
    for name in ("epochs", "train_images", "test_images", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if not 0 <= args.warmup_epochs < (args.epochs or math.inf):
        p.error(f"--warmup-epochs must be at least 0 and below the epochs, got {args.warmup_epochs}")
    if not args.budget_minutes > 0:
        p.error(f"--budget-minutes must be positive, got {args.budget_minutes}")
    if args.networks:
        labels = [point.label for point in (quick_grid() if args.quick else default_grid())]
        unknown = [name for name in args.networks if name not in labels]
        if unknown:
            p.error(f"--networks: no network of the grid is named {', '.join(map(repr, unknown))}; "
                    f"the grid holds {', '.join(map(repr, labels))}")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        p.error(f"--seeds must be distinct non-negative integers, got {args.seeds}")
    return args


def load_data(args) -> dict:
    """``{name: (training set, test set)}``, cut to ``--train-images`` / ``--test-images``."""
    datasets = {}
    for name in args.data:
        train_set, test_set = (load_split(name, split, args.data_dir) for split in ("train", "test"))
        if args.train_images:
            train_set = train_set.subset(slice(0, args.train_images))
        if args.test_images:
            test_set = test_set.subset(slice(0, args.test_images))
        if len(train_set) < args.batch_size:
            raise CommandError(f"{name}: {len(train_set)} training images are fewer than one batch ({args.batch_size})")
        datasets[name] = (train_set, test_set)
    return datasets


def load_plan(out: Path, args) -> dict | None:
    """The plan in ``out`` when its settings are this command's; ``None`` without one; CommandError otherwise."""
    path = out / "plan.json"
    if not path.is_file():
        return None
    plan = json.loads(path.read_text())
    ours = json.loads(json.dumps(plan_settings(args)))  # as JSON stores them (tuples as lists)
    changed = sorted(k for k in ours if plan["settings"].get(k) != ours[k])
    if changed:
        raise CommandError(f"{out} holds a grid planned with other settings ("
                           + ", ".join(f"{k}: {plan['settings'].get(k)!r} there, {ours[k]!r} here" for k in changed)
                           + "); rerun with those, or use another --out")
    return plan


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    header = (f"# Accuracy against cost: {'--quick, ' if args.quick else ''}seeds {', '.join(map(str, args.seeds))}, "
              f"batch {args.batch_size}, {'equal training time' if args.equal_time else 'equal epochs'} per network")
    try:
        if args.report_only:
            print("written:", ", ".join(str(p) for p in write_report(out, header)))
            return 0
        out.mkdir(parents=True, exist_ok=True)
        plan = load_plan(out, args)
        datasets = load_data(args)
    except CommandError as exc:
        print(f"benchmarks/frontier.py: {exc}", file=sys.stderr)
        return 2
    keep_freed_memory()  # as the pdenet commands do
    grid = [point for point in (quick_grid() if args.quick else default_grid())
            if not args.networks or point.label in args.networks]
    if args.threads:
        torch.set_num_threads(args.threads)
    elif torch.get_num_threads() > 1:  # on a busy machine one thread can be faster than all cores
        train_set = next(iter(datasets.values()))[0]
        fastest_threads(build(grid[0], train_set), train_set.image_shape, args.batch_size,
                        {1, torch.get_num_threads()}, channels_last=True)
    sizes = {name: (len(train), len(test)) for name, (train, test) in datasets.items()}
    if plan is None:
        print(f"timing training steps on {', '.join(datasets)} ({plural(torch.get_num_threads(), 'thread')}) ...",
              flush=True)
        timing = time.perf_counter()
        plan = make_plan(grid, lambda points: measure_rates(points, datasets, args.batch_size, args.quick), sizes,
                         args)
        print(f"timed {len(plan['rates'][args.data[0]])} networks in {time.perf_counter() - timing:.0f} s", flush=True)
        (out / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    print(format_plan(plan, grid, sizes), flush=True)
    done = {row_key(r) for r in read_results(out / "results.csv")}
    todo = [r for r in plan["runs"] if r["key"] not in done]
    print(f"{len(plan['runs']) - len(todo)} of {len(plan['runs'])} runs already in {out / 'results.csv'}", flush=True)
    start = time.perf_counter()
    try:
        for i, run in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {run['key']}: {run['epochs']} epoch{'s' * (run['epochs'] > 1)}", flush=True)
            row = train_run(run, datasets, args)
            append_result(out / "results.csv", row)
            print(f"  {100 * row['accuracy']:.2f}% in {row['train_time_s']:.1f} s "
                  f"({row['train_images_per_s']:.0f} images/s)", flush=True)
    except KeyboardInterrupt:
        print(f"interrupted: {len(read_results(out / 'results.csv'))} of {len(plan['runs'])} runs in "
              f"{out / 'results.csv'}; the same command continues the grid", file=sys.stderr)
        return 130
    finally:
        if read_results(out / "results.csv"):
            files = write_report(out, header)
            print(f"{time.perf_counter() - start:.0f} s; written: {', '.join(str(p) for p in files)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
