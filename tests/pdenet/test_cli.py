"""The ``pdenet train``, ``evaluate`` and ``cost`` commands on a tiny generated Fashion-MNIST-format data set."""
import gzip
import json
import struct

import pytest
import torch

from pdenet import checkpoint as ckpt
from pdenet.cli import main
from pdenet.training import Trainer


def write_idx(path, array):
    """IDX file of a uint8 array: magic 0x0000080d (d = ndim), big-endian sizes, then the bytes; gzip."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype("uint8").tobytes()))


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory):
    """128 training and 64 test 28x28 images of 10 classes: class k lights up a class-specific stripe."""
    folder = tmp_path_factory.mktemp("fashion-mnist")
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 128), ("t10k", 64)):
        labels = torch.randint(10, (n,), generator=g)
        images = torch.randint(0, 60, (n, 28, 28), generator=g)
        for i, k in enumerate(labels.tolist()):
            images[i, 2 * k + 3:2 * k + 6, 4:24] += 180
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images.numpy())
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels.numpy())
    return folder


def train_args(data_dir, out, *extra):
    return ["train", "--config", "lean-resnet20", "--data", "fashion-mnist", "--data-dir", str(data_dir),
            "--epochs", "2", "--batch-size", "32", "--eval-batch-size", "32", "--threads", "1", "--no-progress",
            "--out", str(out), *extra]


def test_train_writes_metrics_checkpoint_and_report_then_evaluate(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(fmnist_dir, out)) == 0
    stdout = capsys.readouterr().out
    for text in ("epoch   2", "test accuracy", "parameters", "FLOPs per image", "latency per image (b=1)",
                 "throughput (b=32)", "training", "stability report"):
        assert text in stdout, text
    assert {p.name for p in out.iterdir()} >= {"settings.json", "checkpoint.pt", "metrics.json", "metrics.csv",
                                               "report.json"}
    history = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("epoch,lr,lr_end,threads,train_loss")
    report = json.loads((out / "report.json").read_text())
    assert report["test"]["accuracy"] == history[-1]["test_accuracy"]
    assert report["costs"]["parameters"] == sum(p.numel() for p in ckpt.load_model(out)[0].parameters())
    assert report["costs"]["flops_per_image"] > 0 and report["costs"]["latency_ms"] > 0
    assert isinstance(report["stability"], list) and report["wall_time_s"] > report["training_time_s"] > 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["epochs"] == 2 and settings["optimizer"] == "sgd" and settings["task"] == "classification"

    assert main(["evaluate", str(out), "--data-dir", str(fmnist_dir), "--json", str(tmp_path / "e.json")]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert evaluated["accuracy"] == pytest.approx(history[-1]["test_accuracy"])
    assert evaluated["loss"] == pytest.approx(history[-1]["test_loss"], rel=1e-5)


def test_resume_after_kill_reproduces_the_uninterrupted_run(fmnist_dir, tmp_path, monkeypatch, capsys):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(train_args(fmnist_dir, full, "--warmup-epochs", "0.5")) == 0

    save = Trainer.save

    def save_then_die(self, path, meta):
        save(self, path, meta)
        if self.epoch == 1:
            raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(Trainer, "save", save_then_die)
    assert main(train_args(fmnist_dir, killed, "--warmup-epochs", "0.5")) == 130
    monkeypatch.undo()
    assert ckpt.load_checkpoint(killed)["epoch"] == 1
    assert main(train_args(fmnist_dir, killed, "--warmup-epochs", "0.5")) == 2  # never overwrites a run
    assert "already exists" in capsys.readouterr().err
    assert main(["train", "--out", str(killed), "--resume", "--no-progress", "--data-dir", str(fmnist_dir)]) == 0
    stdout = capsys.readouterr().out
    assert "resuming" in stdout and "1 thread;" in stdout  # the thread count of the run, not the default
    a, b = ckpt.load_checkpoint(full), ckpt.load_checkpoint(killed)
    assert a["epoch"] == b["epoch"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    # same weights and statistics; the channels-last (oneDNN) evaluation of a fresh process has been seen to
    # round differently in the 7th digit (not with --no-channels-last), so the losses agree to float precision
    assert [r["test_loss"] for r in b["history"]] == pytest.approx([r["test_loss"] for r in a["history"]], rel=1e-6)


def test_epoch_line_shows_the_learning_rate_from_start_to_last_step():
    from pdenet.commands.train import format_row

    row = {"epoch": 2, "lr": 0.1, "lr_end": 0.0505, "train_loss": 1.0, "train_accuracy": 0.5, "train_time": 2.0,
           "train_images_per_s": 64.0}
    assert format_row(row, "accuracy").startswith("epoch   2  lr 0.1->0.0505  train loss 1.0000")
    assert "  lr 0.1  " in format_row({**row, "lr_end": 0.1}, "accuracy")  # a constant rate once
    assert "  lr 0.1  " in format_row({k: v for k, v in row.items() if k != "lr_end"}, "accuracy")  # older rows


def test_config_file_and_command_line_priority(fmnist_dir, tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"config": "lean-resnet20", "epochs": 3, "batch-size": 64, "lr": 0.05,
                                  "overrides": {"widths": [8, 16, 32]}}))
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    assert main(["train", "--config-file", str(config), "--epochs", "1", "--data-dir", str(fmnist_dir),
                 "--no-progress", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads
    probe = [line for line in capsys.readouterr().out.splitlines() if line.startswith("threads: ")]
    assert len(probe) == 1 and "training images/s by threads: 1: " in probe[0]  # default: probed
    settings = json.loads((out / "settings.json").read_text())
    assert (settings["epochs"], settings["batch_size"], settings["lr"]) == (1, 64, 0.05)
    model, meta = ckpt.load_model(out)
    assert meta["overrides"] == {"widths": [8, 16, 32]}
    assert model.state_dict().keys() == ckpt.load_checkpoint(out)["model"].keys()


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "nope"], "unknown model configuration 'nope'"),
    (["train", "--data", "mnist-digits"], "unknown data set 'mnist-digits'"),
    (["train", "--data-dir", "/nonexistent/folder"], "Fashion-MNIST not found"),
    (["train", "--epochs", "0"], "epochs must be a positive integer"),
    (["train", "--resume"], "--resume needs --out"),
    (["train", "--config-file", "/nonexistent.json"], "config file /nonexistent.json does not exist"),
    (["train", "--override", "widths"], "not of the form key=value"),
    (["cost", "--config", "lean-resnet20", "nope"], "unknown model configuration 'nope'"),
    (["cost", "--config", "resnet20", "--override", "colour=1"], "has no option(s) colour"),
    (["evaluate", "/nonexistent/checkpoint.pt"], "does not exist"),
])
def test_bad_input_gives_one_clean_line_and_exit_code_2(argv, message, capsys):
    threads = torch.get_num_threads()
    assert main(argv) == 2
    assert torch.get_num_threads() == threads  # commands give the thread count back
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith(f"pdenet {argv[0]}: error: ")


def test_augmentation_out_of_range_is_named_before_training(fmnist_dir, tmp_path, capsys):
    argv = ["train", "--data-dir", str(fmnist_dir), "--color-jitter", "1.2", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "--color-jitter: Augmentation jitter must be a number in [0, 1), got 1.2" in captured.err
    assert "threads: " not in captured.out and not (tmp_path / "run").exists()


def test_config_file_with_unknown_setting(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"epochz": 3}))
    assert main(["train", "--config-file", str(bad)]) == 2
    assert "unknown settings ['epochz']" in capsys.readouterr().err


def test_resume_refuses_changed_settings(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(fmnist_dir, out, "--epochs", "1")) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--lr", "0.5"]) == 2
    assert "do not change --lr" in capsys.readouterr().err


def test_cost_side_by_side(tmp_path, capsys):
    assert main(["cost", "--config", "lean-resnet20", "resnet20", "--input-shape", "1", "28", "28",
                 "--repeats", "2", "--batch-size", "8", "--threads", "1", "--json", str(tmp_path / "c.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("lean-resnet20: 34,986 parameters") and lines[1].startswith("resnet20: ")  # before timing
    assert lines[2] == "input 1x28x28, 10 classes, 1 thread"
    assert lines[5].startswith("lean-resnet20") and lines[6].startswith("resnet20")
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    from pdenet.configs import build_model
    from pdenet.costs import flops_per_image

    assert rows["resnet20"]["flops_per_image"] == flops_per_image(build_model("resnet20", 10, 1), (1, 28, 28))
    assert rows["lean-resnet20"]["parameters"] < rows["resnet20"]["parameters"]


def test_thread_tuner_reprobes_when_throughput_changes(capsys, monkeypatch):
    from types import SimpleNamespace

    import pdenet.costs
    from pdenet.commands.train import ThreadTuner

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(64, 2))
    threads = torch.get_num_threads()
    try:
        tuner = ThreadTuner(2, (1, 4, 4), 8, channels_last=False)
        assert tuner.candidates == {1, 2} and tuner.probe(model) in (1, 2)  # the real probe runs
        choices = iter([2, 1, 1, 1])  # what the probes below find fastest
        monkeypatch.setattr(pdenet.costs, "fastest_threads",
                            lambda *args: (b := next(choices), {1: 100.0 * (3 - b), 2: 100.0 * b}))
        trainer = SimpleNamespace(done=False, model=model)
        assert tuner.probe(model) == 2 and not tuner.recheck
        capsys.readouterr()
        tuner(trainer, {"train_images_per_s": 1000.0})  # the first epoch after a probe calibrates
        assert capsys.readouterr().out == "" and tuner.expected == 1000.0
        tuner(trainer, {"train_images_per_s": 1100.0})  # within 25%: no probe
        assert capsys.readouterr().out == ""
        tuner(trainer, {"train_images_per_s": 500.0})  # other jobs started: probe again (it chooses 1 thread)
        assert capsys.readouterr().out.startswith("threads: 1 ") and tuner.expected is None and tuner.recheck
        tuner(trainer, {"train_images_per_s": 480.0})  # fewer threads than cores: checked once more
        assert capsys.readouterr().out.startswith("threads: 1 ") and tuner.expected is None
        assert not tuner.recheck  # a recheck is not rechecked
        tuner(trainer, {"train_images_per_s": 480.0})  # steady: calibrate, no probe
        assert capsys.readouterr().out == "" and tuner.expected == 480.0
        tuner(SimpleNamespace(done=True, model=model), {"train_images_per_s": 10.0})  # finished: no probe
        assert capsys.readouterr().out == ""
        assert next(choices) == 1  # exactly three probes went through the substitute
    finally:
        torch.set_num_threads(threads)


def test_a_run_stopped_before_its_first_checkpoint_resumes(fmnist_dir, tmp_path, capsys, monkeypatch):
    """A run killed in its first epoch leaves its settings and no checkpoint: ``--resume`` starts it anew in the same
    folder with the same settings, and it then finishes as an uninterrupted run does."""
    out = tmp_path / "run"

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_epoch", killed)
        assert main(train_args(fmnist_dir, out, "--seed", "3")) == 130
    assert (out / "settings.json").is_file() and not (out / ckpt.CHECKPOINT_NAME).exists()
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "starting it anew there" in capsys.readouterr().out
    resumed = ckpt.load_checkpoint(out / ckpt.CHECKPOINT_NAME)
    assert resumed["epoch"] == 2 and resumed["meta"]["settings"]["seed"] == 3
    assert main(train_args(fmnist_dir, tmp_path / "straight", "--seed", "3")) == 0
    straight = ckpt.load_checkpoint(tmp_path / "straight" / ckpt.CHECKPOINT_NAME)
    for name, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, msg=name)


def test_unwritable_output_and_missing_device_are_named(fmnist_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(train_args(fmnist_dir, blocker / "run")) == 2
    assert "cannot write the output directory" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(train_args(fmnist_dir, tmp_path / "gpu", "--device", "cuda")) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_training_options_reach_the_trainer(fmnist_dir, tmp_path):
    """``--amp``, ``--grad-accum`` and ``--clip-grad`` are settings of the run (kept for ``--resume``)."""
    out = tmp_path / "run"
    assert main(train_args(fmnist_dir, out, "--epochs", "1", "--amp", "bf16", "--grad-accum", "2",
                           "--clip-grad", "5")) == 0
    settings = ckpt.load_checkpoint(out / ckpt.CHECKPOINT_NAME)["meta"]["train"]
    assert (settings["amp"], settings["grad_accum"], settings["clip_grad"]) == ("bf16", 2, 5.0)


def test_weights_in_safetensors_beside_the_checkpoint(fmnist_dir, tmp_path, capsys):
    """``weights.safetensors`` holds the checkpoint's weights with what rebuilds the network: ``build_model`` loads
    it with ``safetensors.torch.load_file``, ``pdenet evaluate`` reads it as it reads the checkpoint; a foreign or
    damaged file is named."""
    from safetensors.torch import load_file, save_file

    from pdenet import build_model

    out = tmp_path / "run"
    assert main(train_args(fmnist_dir, out, "--epochs", "1")) == 0
    weights = out / ckpt.WEIGHTS_NAME
    state = ckpt.load_checkpoint(out / ckpt.CHECKPOINT_NAME)["model"]
    model = build_model("lean-resnet20", num_classes=10, in_channels=1)
    model.load_state_dict(load_file(weights))
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    capsys.readouterr()
    assert main(["evaluate", str(out / ckpt.CHECKPOINT_NAME), "--data-dir", str(fmnist_dir), "--threads", "1"]) == 0
    from_checkpoint = capsys.readouterr().out
    assert main(["evaluate", str(weights), "--data-dir", str(fmnist_dir), "--threads", "1"]) == 0
    from_weights = capsys.readouterr().out
    assert from_weights.split("(")[0] == from_checkpoint.split("(")[0]  # the same metrics, before the timing
    save_file({"w": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    (tmp_path / "damaged.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    for name, message in (("foreign", "holds no pdenet metadata"), ("damaged", "not a readable safetensors file")):
        assert main(["evaluate", str(tmp_path / f"{name}.safetensors"), "--data-dir", str(fmnist_dir)]) == 2
        assert message in capsys.readouterr().err
    assert main(train_args(fmnist_dir, tmp_path / "none", "--epochs", "1", "--no-safetensors")) == 0
    assert not (tmp_path / "none" / ckpt.WEIGHTS_NAME).exists()
