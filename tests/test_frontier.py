"""benchmarks/frontier.py: the Pareto frontier on hand-made points, the budget's plan on made-up speeds, and the
``--quick`` grid end to end on the real data sets (table, plots, resuming)."""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import itertools
import math
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_frontier():
    spec = importlib.util.spec_from_file_location("frontier_benchmark", ROOT / "benchmarks" / "frontier.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


frontier = load_frontier()


# ------------------------------------------------------------------------------------------- the frontier
@pytest.mark.parametrize("costs, accuracies, front", [
    ([1, 2, 3, 4, 5], [0.5, 0.4, 0.7, 0.7, 0.9], [0, 2, 4]),   # 1 is beaten by 0, 3 ties 2's accuracy at more cost
    ([5, 4, 3, 2, 1], [0.9, 0.7, 0.7, 0.4, 0.5], [4, 2, 0]),   # the same points in another order
    ([1, 1, 2], [0.3, 0.6, 0.5], [1]),                         # equal cost: only the more accurate one
    ([2, 2], [0.5, 0.5], [0]),                                 # identical points: the first
    ([1, 2, 3], [0.1, 0.2, 0.3], [0, 1, 2]),                   # accuracy grows with cost: all of them
    ([3], [0.4], [0]),
    ([], [], []),
])
def test_pareto_front_on_hand_made_points(costs, accuracies, front):
    assert frontier.pareto_front(costs, accuracies) == front


def test_pareto_front_is_exactly_the_undominated_points():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 12)
        costs = [rng.choice([1, 2, 3, 5, 8]) for _ in range(n)]
        accuracies = [rng.choice([0.1, 0.5, 0.6, 0.9]) for _ in range(n)]
        points = list(zip(costs, accuracies))

        def dominated(i):
            return any(c <= points[i][0] and a >= points[i][1] and (c, a) != points[i] for c, a in points)

        undominated = {points[i] for i in range(n) if not dominated(i)}
        front = frontier.pareto_front(costs, accuracies)
        assert {points[i] for i in front} == undominated and len(front) == len(undominated)
        assert [costs[i] for i in front] == sorted(costs[i] for i in front)


def test_pareto_front_needs_matching_lengths():
    with pytest.raises(ValueError, match="2 costs for 1 accuracies"):
        frontier.pareto_front([1, 2], [0.5])


# ------------------------------------------------------------------------------------------- the plan
GRID = [frontier.Point("lean ResNet", "lean-resnet20", 1, 20, "cross", 1),
        frontier.Point("dense ResNet", "resnet20", 1, 20, None, 2),
        frontier.Point("MobileNetV2", "mobilenetv2", 0.5, None, None, 3)]
RATES = {"fashion-mnist": {GRID[0].label: 1000.0, GRID[1].label: 250.0, GRID[2].label: 100.0},
         "cifar10": {GRID[0].label: 800.0, GRID[1].label: 200.0, GRID[2].label: 80.0}}
SIZES = {"fashion-mnist": (60000, 10000), "cifar10": (10000, 2000)}


def plan_for(*argv, timed=None):
    """The plan for these options, with the made-up speeds; ``timed`` collects the networks timed."""
    def measure(points):
        (timed if timed is not None else []).extend(p.label for p in points)
        return {data: {p.label: RATES[data][p.label] for p in points} for data in RATES}

    return frontier.make_plan(GRID, measure, SIZES, frontier.parse_args(list(argv)))


def test_the_budget_takes_the_most_tiers_then_the_most_epochs():
    seconds = {tier: frontier.assign_epochs(GRID[:tier], RATES, SIZES, 2, 1e12, 1, False)[1] for tier in (1, 2, 3)}
    timed = []
    plan = plan_for("--budget-minutes", str(seconds[2] / 60 + 1), timed=timed)  # tiers 1-2 at one epoch, not 3
    assert timed == [p.label for p in GRID]  # each once; tier 3 too, to find that it does not fit
    assert plan["tiers"] == 2 and plan["fits"] and plan["estimate_s"] <= 60 * plan["settings"]["budget_minutes"]
    assert {r["epochs"] for r in plan["runs"]} == {1} and len(plan["runs"]) == 2 * 2 * 2
    assert [r["seed"] for r in plan["runs"]] == [0] * 4 + [1] * 4  # seed by seed
    roomy = plan_for("--budget-minutes", str(5 * seconds[3] / 60))
    (epochs,) = {r["epochs"] for r in roomy["runs"]}
    assert roomy["tiers"] == 3 and epochs >= 5 and roomy["estimate_s"] <= 5 * seconds[3]
    assert frontier.assign_epochs(GRID, RATES, SIZES, 2, 1e12, epochs + 1, False)[1] > 5 * seconds[3]
    timed.clear()
    tight = plan_for("--budget-minutes", "1", timed=timed)
    assert timed == [GRID[0].label]  # tier 1 does not fit: the others are not timed
    assert tight["tiers"] == 1 and not tight["fits"] and {r["epochs"] for r in tight["runs"]} == {1}
    assert "warning: the estimate exceeds the budget" in frontier.format_plan(tight, GRID, SIZES)
    assert plan_for("--tiers", "3", "--epochs", "2")["runs"][0]["epochs"] == 2


def test_equal_time_gives_every_run_its_share_in_whole_epochs():
    budget_s = 4 * 3600
    plan = plan_for("--equal-time", "--tiers", "2", "--budget-minutes", str(budget_s / 60))
    share = budget_s / len(plan["runs"])
    for run in plan["runs"]:
        rate, sizes = RATES[run["data"]][frontier.point_of(run).label], SIZES[run["data"]]
        assert frontier.run_seconds(run["epochs"], rate, sizes) <= share < frontier.run_seconds(run["epochs"] + 1,
                                                                                                  rate, sizes)
    epochs = {(r["data"], r["config"]): r["epochs"] for r in plan["runs"]}
    for data in SIZES:  # the faster network trains for more epochs
        assert epochs[data, "lean-resnet20"] > epochs[data, "resnet20"] >= 1


def test_networks_keeps_only_the_named_points_of_the_grid():
    args = frontier.parse_args(["--networks", "resnet20 w1 d20", "lean-resnet20 w1 d20 cross"])
    assert args.networks == ["resnet20 w1 d20", "lean-resnet20 w1 d20 cross"]
    assert frontier.plan_settings(args)["networks"] == args.networks  # a rerun with others is another grid


@pytest.mark.parametrize("argv, message", [
    (["--networks", "resnet20 w1 d20", "resnet20 w7"], "--networks: no network of the grid is named 'resnet20 w7'"),
    (["--quick", "--networks", "resnet20 w1 d20"], "the grid holds 'lean-resnet20 w0.5 d8 cross'"),
    (["--epochs", "2", "--equal-time"], "--epochs and --equal-time exclude each other"),
    (["--epochs", "2", "--warmup-epochs", "2"], "--warmup-epochs must be at least 0 and below the epochs, got 2.0"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be at least 0"),
    (["--seeds", "0", "0"], "--seeds must be distinct"),
    (["--budget-minutes", "0"], "--budget-minutes must be positive"),
    (["--train-images", "0"], "--train-images must be a positive integer"),
    (["--tiers", "4"], "invalid choice: 4"),
])
def test_bad_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        frontier.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- a run
def tiny_split(n: int):
    from pdenet.data.dataset import Dataset

    generator = torch.Generator().manual_seed(0)
    return Dataset("tiny", "train", torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=generator),
                   torch.arange(n) % 2, 2, ("a", "b"), (0.5,), (0.25,))


@pytest.mark.parametrize("warmup", ["0", "1", "5"])
def test_a_run_warms_up_for_at_most_half_of_its_epochs(warmup, capsys):
    args = frontier.parse_args(["--batch-size", "16", "--warmup-epochs", warmup])
    run = {"data": "tiny", **dataclasses.asdict(frontier.quick_grid()[0]), "seed": 0, "epochs": 2}
    row = frontier.train_run(run, {"tiny": (tiny_split(64), tiny_split(32))}, args)
    epochs = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("epoch")]
    starts = [float(line.split("lr ")[1].split("->")[0]) for line in epochs]  # each epoch's first learning rate
    assert len(starts) == 2 and len(row["accuracy_by_epoch"].split()) == 2
    if warmup == "0":
        assert starts[0] == 0.1 and starts[1] < 0.1
    else:  # 5 warm-up epochs are cut to 1 of the run's 2: the peak is reached when the second epoch starts
        assert starts[0] == pytest.approx(0.1 / 4) and starts[1] == pytest.approx(0.1)  # 4 steps per epoch


# ------------------------------------------------------------------------------------------- the ranking
def made_up_row(data, config, seed, curve):
    return {"data": data, "family": "f", "config": config, "width": 1.0, "depth": "-", "stencil": "-", "seed": seed,
            "accuracy": curve[-1], "accuracy_by_epoch": " ".join(map(str, curve))}


def test_ranking_agreement_is_kendalls_tau_between_seeds_and_between_the_last_epochs():
    rows = [made_up_row("a", "n1", 0, [0.5, 0.9]), made_up_row("a", "n2", 0, [0.6, 0.8]),
            made_up_row("a", "n3", 0, [0.7, 0.7]),
            made_up_row("a", "n1", 1, [0.5, 0.91]), made_up_row("a", "n2", 1, [0.6, 0.81]),
            made_up_row("a", "n3", 1, [0.7, 0.71]),
            made_up_row("b", "n1", 0, [0.3, 0.4]), made_up_row("b", "n2", 0, [0.5, 0.6]),
            made_up_row("b", "n1", 1, [0.3, 0.8]), made_up_row("b", "n2", 1, [0.5, 0.7])]
    tau = frontier.ranking_agreement(rows)
    assert tau["a"]["seeds"] == pytest.approx(1.0)    # both seeds order n1 > n2 > n3
    assert tau["a"]["epochs"] == pytest.approx(-1.0)  # the last epoch reversed the order of the one before
    assert tau["b"]["seeds"] == pytest.approx(-1.0)   # the seeds disagree
    assert tau["b"]["epochs"] == pytest.approx(1.0)   # means over seeds: n2 ahead after both epochs
    one_epoch = frontier.ranking_agreement([made_up_row("a", "n1", 0, [0.5]), made_up_row("a", "n2", 0, [0.6])])
    assert math.isnan(one_epoch["a"]["seeds"]) and math.isnan(one_epoch["a"]["epochs"])


# ------------------------------------------------------------------------------------------- --quick end to end
def missing_data() -> str | None:
    from pdenet.data import load_dataset

    for name in frontier.DATA:
        try:
            load_dataset(name, "test")
        except (FileNotFoundError, ValueError) as exc:
            return str(exc).splitlines()[0]
    return None


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    reason = missing_data()
    if reason:
        pytest.skip(f"--quick reads Fashion-MNIST and the CIFAR-10 development copy: {reason}")
    out = tmp_path_factory.mktemp("frontier")
    assert frontier.main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    return out


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.realdata
def test_quick_writes_the_table(quick):
    from pdenet.configs import build_model
    from pdenet.costs import flops_per_image

    rows = read_csv(quick / "results.csv")
    grid = frontier.quick_grid()
    assert tuple(rows[0]) == frontier.COLUMNS
    assert len(rows) == len(grid) * 2 * len(frontier.DATA)
    assert {(r["data"], r["seed"]) for r in rows} == set(itertools.product(frontier.DATA, ("0", "1")))
    for row in rows:
        assert 0 <= float(row["accuracy"]) <= 1 and math.isfinite(float(row["accuracy"]))
        assert int(row["parameters"]) > 0 and int(row["flops"]) > 0 and int(row["epochs"]) == 1
        assert float(row["train_images_per_s"]) > 0 and float(row["latency_ms"]) > 0 and float(row["train_time_s"]) > 0
        assert [float(a) for a in row["accuracy_by_epoch"].split()] == [pytest.approx(float(row["accuracy"]), abs=1e-4)]
    lean = next(r for r in rows if r["config"] == "lean-resnet20" and r["data"] == "cifar10")
    model = build_model("lean-resnet20", width=float(lean["width"]), depth=int(lean["depth"]))
    assert int(lean["flops"]) == flops_per_image(model, (3, 32, 32))
    table = (quick / "results.md").read_text()
    assert table.count(" ± ") == len(grid) * len(frontier.DATA)
    assert "| family | config | width | depth | stencil | seeds |" in table
    assert table.count("Ranking by accuracy, Kendall's τ: seed against seed ") == len(frontier.DATA)
    for data, entries in frontier.summarize(frontier.read_results(quick / "results.csv")).items():
        best = max(entries, key=lambda e: (e["accuracy"], -e["flops"]))
        cheapest = min(entries, key=lambda e: (e["flops"], -e["accuracy"]))
        line = next(l for l in table.split(f"## {data}")[1].splitlines() if l.startswith("Across the families"))
        flops = line.split("the frontier of FLOPs: ")[1].split(";")[0]  # by increasing FLOPs, ending at the best
        assert flops.startswith(frontier.row_point(cheapest).label) and flops.endswith(frontier.row_point(best).label)


@pytest.mark.slow
@pytest.mark.realdata
def test_quick_draws_the_plots(quick):
    for *_, name in frontier.AXES:
        data = (quick / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, name


@pytest.mark.slow
@pytest.mark.realdata
def test_a_rerun_skips_the_finished_runs_and_finishes_the_rest(quick, capsys):
    path = quick / "results.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:20])  # the last run interrupted while it was written
    capsys.readouterr()
    assert frontier.main(["--quick", "--threads", "1", "--out", str(quick)]) == 0
    captured = capsys.readouterr()
    assert f"{len(lines) - 2} of {len(lines) - 1} runs already in" in captured.out
    assert "skipping an incomplete row" in captured.err
    rows = read_csv(path)
    assert len(rows) == len(lines) - 1 and all(r["threads"] for r in rows)
    capsys.readouterr()
    assert frontier.main(["--quick", "--threads", "1", "--out", str(quick)]) == 0
    assert f"{len(lines) - 1} of {len(lines) - 1} runs already in" in capsys.readouterr().out
    assert len(read_csv(path)) == len(lines) - 1


@pytest.mark.slow
@pytest.mark.realdata
def test_other_settings_do_not_mix_into_a_grid(quick, capsys):
    assert frontier.main(["--quick", "--seeds", "0", "1", "2", "--out", str(quick)]) == 2
    assert "planned with other settings (seeds: [0, 1] there, [0, 1, 2] here)" in capsys.readouterr().err
