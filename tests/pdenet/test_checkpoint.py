"""Checkpoints: exact resume of an interrupted run, atomic writes, validation, rebuilding the model."""
import os

import pytest
import torch

from pdenet import checkpoint as ckpt
from pdenet.data import BatchLoader
from pdenet.training import TrainConfig
from test_training import ToyNet, make_trainer, toy_dataset

META = {"config": "toy", "overrides": {}, "num_classes": 4, "in_channels": 1}


class Killed(Exception):
    """Stands for the process being killed right after a checkpoint was written."""


def run(tmp_path, config, data, kill_after=None, resume=False, restore_rng=True):
    """Train with a checkpoint after every epoch; optionally die after ``kill_after`` epochs or resume."""
    path = tmp_path / ckpt.CHECKPOINT_NAME
    if resume:
        torch.manual_seed(12345)  # a fresh process: different generator state and initial weights
        trainer, loader = make_trainer(config, data)
        torch.rand(7)
        saved = ckpt.load_checkpoint(path)
        if restore_rng:
            trainer.restore(saved)
        else:
            trainer.epoch = ckpt.restore(saved, model=trainer.model, optimizer=trainer.optimizer,
                                         scheduler=trainer.scheduler, rng=False)
            trainer.history = saved["history"]
    else:
        trainer, loader = make_trainer(config, data)

    def save(tr, row):
        tr.save(path, META)
        if kill_after is not None and tr.epoch == kill_after:
            raise Killed

    test_loader = BatchLoader(toy_dataset(64, seed=9, split="test"), 32, shuffle=False)
    try:
        trainer.fit(loader, test_loader, callbacks=[save], show_progress=False)
    except Killed:
        return None
    return trainer


def weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_resume_after_interruption_reproduces_uninterrupted_weights(tmp_path):
    data = toy_dataset(128)
    config = TrainConfig(epochs=2, batch_size=32, lr=0.05, warmup_epochs=0.5, seed=1)
    full = run(tmp_path / "full", config, data)
    assert run(tmp_path / "killed", config, data, kill_after=1) is None
    assert ckpt.load_checkpoint(tmp_path / "killed" / ckpt.CHECKPOINT_NAME)["epoch"] == 1
    resumed = run(tmp_path / "killed", config, data, resume=True)
    a, b = weights(full), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:  # exactly, including batch-norm statistics
        assert torch.equal(a[k], b[k]), k
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert resumed.history[-1]["test_loss"] == full.history[-1]["test_loss"]
    assert resumed.optimizer.state_dict()["state"].keys() == full.optimizer.state_dict()["state"].keys()

    # the test can fail: without the generator states the dropout masks differ and so do the weights
    stale = run(tmp_path / "killed-again", config, data, kill_after=1)
    assert stale is None
    different = run(tmp_path / "killed-again", config, data, resume=True, restore_rng=False)
    assert any(not torch.equal(a[k], v) for k, v in weights(different).items())


def test_checkpoint_contents_and_load_checkpoint(tmp_path):
    trainer, _ = make_trainer(TrainConfig(epochs=3, batch_size=8), toy_dataset(16))
    trainer.epoch = 2
    trainer.save(tmp_path / ckpt.CHECKPOINT_NAME, META)
    obj = ckpt.load_checkpoint(tmp_path)  # a run directory stands for its checkpoint
    assert obj["epoch"] == 2 and obj["meta"]["config"] == "toy" and obj["meta"]["train"]["epochs"] == 3
    assert {"model", "optimizer", "scheduler", "rng", "history"} <= obj.keys()
    assert obj["model"].keys() == trainer.model.state_dict().keys()


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    ckpt.atomic_save({"value": torch.arange(3)}, path)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial garbage")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        ckpt.atomic_save({"value": torch.arange(5)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.equal(torch.load(path, weights_only=True)["value"], torch.arange(3))
    assert os.listdir(tmp_path) == ["state.pt"]  # no temp file left behind


def test_atomic_write_text_replaces_whole_file(tmp_path):
    path = tmp_path / "metrics.json"
    ckpt.atomic_write_text(path, "old")
    ckpt.atomic_write_text(path, "new content")
    assert path.read_text() == "new content" and os.listdir(tmp_path) == ["metrics.json"]


def test_bad_checkpoint_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint .*garbage.pt"):
        ckpt.load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not a pdenet checkpoint"):
        ckpt.load_checkpoint(foreign)
    model = ToyNet()
    with pytest.raises(ValueError, match="must contain 'num_classes'"):
        ckpt.save_checkpoint(tmp_path / "x.pt", model=model, epoch=0, meta={"config": "toy"})


def test_output_directory_is_never_silently_overwritten(tmp_path):
    out = tmp_path / "run"
    assert ckpt.prepare_output_dir(out, resume=False).is_dir()
    assert ckpt.prepare_output_dir(out, resume=False) == out  # empty: fine
    (out / "metrics.json").write_text("[]")
    with pytest.raises(FileExistsError, match="already exists and is not empty; use --resume"):
        ckpt.prepare_output_dir(out, resume=False)
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        ckpt.prepare_output_dir(out, resume=True)


def test_load_model_rebuilds_the_network(tmp_path):
    from pdenet.configs import build_model

    torch.manual_seed(0)
    model = build_model("lean-resnet20", num_classes=10, in_channels=1)
    meta = {"config": "lean-resnet20", "overrides": {}, "num_classes": 10, "in_channels": 1}
    ckpt.save_checkpoint(tmp_path / "m.pt", model=model, epoch=3, meta=meta)
    loaded, info = ckpt.load_model(tmp_path / "m.pt")
    assert info["epoch"] == 3 and info["config"] == "lean-resnet20" and not loaded.training
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    assert torch.equal(loaded(x), model(x))
