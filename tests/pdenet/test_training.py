"""The training loop: loss goes down on generated data, schedules, optimizer groups, tasks, stability hook."""
import math

import pytest
import torch
from torch import nn

from pdenet.data import BatchLoader, Dataset
from pdenet.training import (ClassificationTask, LRFactor, TrainConfig, Trainer, build_optimizer,
                             build_scheduler, evaluate, seed_everything, task_class)


def toy_dataset(n=256, size=12, classes=4, seed=0, split="train"):
    """Class k: a bright 4x4 square in quadrant k, plus noise (uint8, 1 channel)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    x = torch.randint(0, 90, (n, 1, size, size), generator=g)
    h = size // 2
    for k in range(classes):
        r, c = divmod(k, 2)
        x[y == k, :, r * h + 1:r * h + 5, c * h + 1:c * h + 5] += 150
    return Dataset(name="toy", split=split, images=x.to(torch.uint8), targets=y, num_classes=classes,
                   class_names=tuple("abcd"[:classes]), mean=(0.3,), std=(0.3,), crop_padding=1)


class ToyNet(nn.Module):
    """A stand-in classifier: conv, BN, ReLU, dropout, global pooling, linear."""

    def __init__(self, classes=4, width=8, dropout=0.1):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Dropout(dropout), nn.Conv2d(width, width, 3, padding=1, stride=2),
                                      nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Linear(width * 4, classes)

    def forward(self, x):
        return self.head(nn.functional.adaptive_avg_pool2d(self.features(x), 2).flatten(1))


def make_trainer(config, data, model=None, **kw):
    seed_everything(config.seed)
    model = model or ToyNet()
    loader = BatchLoader(data, config.batch_size, shuffle=True, augment=True, seed=config.seed, drop_last=True)
    return Trainer(model, ClassificationTask(data.num_classes), config, len(loader), **kw), loader


def test_short_run_lowers_the_loss():
    data, test = toy_dataset(), toy_dataset(128, seed=1, split="test")
    config = TrainConfig(epochs=4, batch_size=32, lr=0.05, seed=3)
    trainer, loader = make_trainer(config, data)
    test_loader = BatchLoader(test, 64, shuffle=False)
    before = trainer.evaluate(test_loader)
    history = trainer.fit(loader, test_loader, show_progress=False)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert history[-1]["test_loss"] < 0.5 * before["loss"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_accuracy"] > 0.9 > before["accuracy"]
    assert trainer.done and trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_same_seed_same_weights_different_seed_different_weights():
    data = toy_dataset(96)
    finals = []
    for seed in (5, 5, 6):
        trainer, loader = make_trainer(TrainConfig(epochs=1, batch_size=32, seed=seed), data)
        trainer.fit(loader, show_progress=False)
        finals.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    assert torch.equal(finals[0], finals[1])
    assert not torch.equal(finals[0], finals[2])


class StableBlock(nn.Module):
    """Records the norm of its weight each time ``enforce_stability`` runs, then clips it to 1."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.seen = []

    def enforce_stability(self):
        self.seen.append(float(self.conv.weight.norm()))
        self.conv.weight.mul_(min(1.0, 1.0 / float(self.conv.weight.norm())))

    def forward(self, x):
        return self.conv(x)


def test_enforce_stability_runs_after_every_optimizer_step():
    block = StableBlock()
    model = nn.Sequential(block, nn.Flatten(), nn.Linear(144, 4))
    with torch.no_grad():
        block.conv.weight.fill_(3.0)
    data = toy_dataset(64)
    trainer, loader = make_trainer(TrainConfig(epochs=2, batch_size=16, lr=0.01), data, model=model)
    trainer.fit(loader, show_progress=False)
    assert len(block.seen) == 2 * len(loader)
    # the first call sees the weight 9 after one optimizer step (not before it), later ones the clipped weight
    assert 8 < block.seen[0] and block.seen[0] != pytest.approx(9.0, abs=1e-7)
    assert max(block.seen[1:]) < 2
    assert float(block.conv.weight.detach().norm()) <= 1.0 + 1e-6


def test_history_rows_hold_the_learning_rate_of_the_epochs_last_step(capsys):
    """``lr`` is the rate at an epoch's start, ``lr_end`` that of its last step, the one its progress bar ends with
    (warm-up, then cosine: the two differ in every epoch)."""
    trainer, loader = make_trainer(TrainConfig(epochs=3, batch_size=16, lr=0.1, warmup_epochs=1), toy_dataset(96))
    history = trainer.fit(loader, show_progress=True)
    lines = capsys.readouterr().err.splitlines()
    factor, steps = LRFactor("cosine", 3 * len(loader), len(loader)), len(loader)
    for epoch, row in enumerate(history):
        assert row["lr"] == pytest.approx(0.1 * factor(epoch * steps))
        assert row["lr_end"] == pytest.approx(0.1 * factor((epoch + 1) * steps - 1)) != row["lr"]
        bar = [line for line in lines if line.startswith(f"epoch {epoch + 1}/3")][-1]
        assert bar.endswith(f"lr={row['lr_end']:.4g}"), bar


def test_cosine_warmup_and_step_schedules():
    cos = LRFactor("cosine", total_steps=100, warmup_steps=10)
    assert [cos(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cos(10) == pytest.approx(1.0)
    assert cos(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert cos(100) == pytest.approx(0.0, abs=1e-12)
    step = LRFactor("step", total_steps=100, milestones=(0.5, 0.75), gamma=0.1)
    assert [step(s) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert LRFactor("constant", 10)(7) == 1.0

    model = nn.Linear(2, 2)
    config = TrainConfig(epochs=4, lr=0.2, schedule="step", milestones=(0.5,), gamma=0.5)
    opt = build_optimizer(model, config)
    sched = build_scheduler(opt, config, steps_per_epoch=5)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:10] == pytest.approx([0.2] * 10) and lrs[10:] == pytest.approx([0.1] * 10)


def test_optimizer_defaults_and_weight_decay_groups():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    sgd = build_optimizer(model, TrainConfig())
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["lr"] == 0.1
    decay, no_decay = sgd.param_groups
    assert decay["weight_decay"] == 5e-4 and [p.ndim for p in decay["params"]] == [4]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # conv bias, BN weight and bias
    adamw = build_optimizer(model, TrainConfig(optimizer="adamw"))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05


@pytest.mark.parametrize("kwargs, message", [
    ({"optimizer": "rmsprop"}, "unknown optimizer"),
    ({"schedule": "linear"}, "unknown schedule"),
    ({"epochs": 0}, "epochs must be a positive integer"),
    ({"lr": -1.0}, "lr must be positive"),
    ({"warmup_epochs": 10}, "warmup_epochs"),
    ({"milestones": (0.8, 0.2)}, "milestones"),
    ({"label_smoothing": 1.0}, "label_smoothing"),
])
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_classification_loss_and_metrics():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0], [1.0, 0.5, 0.0]], dtype=torch.float64)
    target = torch.tensor([0, 1, 0])
    task = ClassificationTask(3, label_smoothing=0.1)
    logp = torch.log_softmax(logits, 1)
    smoothed = torch.full((3, 3), 0.1 / 3, dtype=torch.float64) + 0.9 * nn.functional.one_hot(target, 3)
    expected = -(smoothed * logp).sum(1).mean()
    loss = task.loss(logits, target)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    state = task.new_state("cpu")
    task.update(state, logits, target, loss)
    task.update(state, logits[:1], target[:1], task.loss(logits[:1], target[:1]))
    summary = task.summarize(state)
    assert summary["accuracy"] == pytest.approx(3 / 4)  # rows 0 and 2 correct, then row 0 again
    with pytest.raises(ValueError, match="logits"):
        task.loss(logits[:, :2], target)


def test_task_registry_and_dataset_check():
    assert task_class("classification") is ClassificationTask
    with pytest.raises(ValueError, match="unknown task 'detection'; known tasks: classification"):
        task_class("detection")
    masks = Dataset(name="seg", split="train", images=torch.zeros(2, 1, 4, 4, dtype=torch.uint8),
                    targets=torch.zeros(2, 4, 4, dtype=torch.int64), num_classes=2, class_names=("a", "b"),
                    mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="use --task segmentation"):
        ClassificationTask.from_dataset(masks, {})


def test_nan_loss_stops_with_a_clear_message():
    data = toy_dataset(64)
    trainer, loader = make_trainer(TrainConfig(epochs=1, batch_size=32, lr=1e30, momentum=0.0), data)
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        trainer.fit(loader, show_progress=False)


def test_evaluate_restores_training_mode():
    model = ToyNet().train()
    evaluate(model, ClassificationTask(4), BatchLoader(toy_dataset(32), 16, shuffle=False))
    assert model.training


class FakeStream:
    def __init__(self, tty):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_bar_on_a_terminal_and_in_a_log():
    from pdenet.progress import Progress

    log = FakeStream(tty=False)
    with Progress(100, desc="epoch 1/2", stream=log, interval=0.0) as bar:
        bar.update(40, loss=1.5)
        bar.update(60, loss=0.5)
    lines = log.text.splitlines()
    assert len(lines) == 3 and "\r" not in log.text  # two periodic lines and the final one
    assert lines[-1].startswith("epoch 1/2  100/100 img (100%)") and "loss=0.5" in lines[-1] and "img/s" in lines[-1]

    term = FakeStream(tty=True)
    with Progress(10, stream=term, interval=3600) as bar:
        bar.update(5)
    assert term.text.startswith("\r") and "[" + "#" * 12 + "." * 12 + "]  5/10" in term.text and term.text.endswith("\n")

    quiet = FakeStream(tty=False)
    with Progress(10, stream=quiet, enabled=False) as bar:
        bar.update(10)
    assert quiet.text == "" and bar.count == 10
