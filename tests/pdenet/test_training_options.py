"""The trainer's inputs and options: any iterable of batches (pdenet's loader, a list, a ``DataLoader`` with or
without a ``DistributedSampler``), mixed precision on every named configuration, gradient accumulation against
the large batch, gradient clipping, the fp16 scaler in checkpoints, ``torch.compile``, and their errors."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pdenet import build_model, list_configs
from pdenet.checkpoint import load_checkpoint
from pdenet.segmentation.task import SegmentationTask
from pdenet.training import ClassificationTask, TrainConfig, Trainer


def small_net():
    """A network without batch norm, whose gradient is an exact sum over images."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def batches(n, size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 6, 6, generator=gen), torch.randint(0, 3, (size,), generator=gen))
            for _ in range(n)]


def trained(loader, steps_per_epoch, epochs=1, **options):
    config = TrainConfig(epochs=epochs, batch_size=options.pop("batch_size", 4), lr=0.05, weight_decay=0.0,
                         schedule="constant", **options)
    trainer = Trainer(small_net(), ClassificationTask(3), config, steps_per_epoch)
    trainer.fit(loader, show_progress=False)
    return trainer


def weights(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_any_iterable_of_batches_trains_alike():
    """The same batches in the same order, as a list, a generator's list per epoch, a plain ``DataLoader`` and one
    with a ``DistributedSampler`` (whose epoch the trainer sets): the same weights."""
    data = batches(5, 4)
    reference = weights(trained(data, 5, epochs=2))
    dataset = TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))

    class Epochs:  # an iterable without len or set_epoch, a fresh generator each epoch
        def __iter__(self):
            return (batch for batch in data)

    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=False)
    for loader in (Epochs(), DataLoader(dataset, batch_size=4, shuffle=False),
                   DataLoader(dataset, batch_size=4, sampler=sampler)):
        for a, b in zip(weights(trained(loader, 5, epochs=2)), reference):
            torch.testing.assert_close(a, b)
    assert sampler.epoch == 1


def test_gradient_accumulation_equals_the_large_batch():
    """Two batches of 4 accumulated per step train as one batch of 8 (no batch norm), to float tolerance; an odd
    batch at the end of the epoch makes a step of its own."""
    small, large = batches(6, 4), batches(3, 8)
    large = [(torch.cat([small[2 * i][0], small[2 * i + 1][0]]), torch.cat([small[2 * i][1], small[2 * i + 1][1]]))
             for i in range(3)]
    accumulated = trained(small, 6, grad_accum=2)
    for a, b in zip(weights(accumulated), weights(trained(large, 3, batch_size=8))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert accumulated.scheduler.last_epoch == 3
    assert trained(small[:5], 5, grad_accum=2).scheduler.last_epoch == 3  # 2 + 2 + 1


def test_gradient_clipping_bounds_each_step():
    """With plain SGD (no momentum) a step moves the weights by ``lr`` times the clipped gradient: at most
    ``lr · clip`` in norm, and exactly that where the gradient is larger."""
    data = batches(1, 4)
    config = TrainConfig(epochs=1, batch_size=4, lr=0.05, momentum=0.0, weight_decay=0.0, schedule="constant",
                         clip_grad=1e-3)
    trainer = Trainer(small_net(), ClassificationTask(3), config, 1)
    before = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    trainer.fit(data, show_progress=False)
    after = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    assert (after - before).norm().item() == pytest.approx(0.05 * 1e-3, rel=1e-3)


@pytest.mark.parametrize("name", list_configs())
def test_bfloat16_autocast_lowers_the_loss(name):
    """Mixed precision (bf16 on the CPU) trains every named configuration: the loss on a fixed batch falls."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, in_channels=3)
    segmentation = name.endswith("segnet")
    x = torch.randn(8, 3, 16, 16)
    y = torch.randint(0, 5, (8, 16, 16) if segmentation else (8,))
    task = SegmentationTask(5, ignore_index=None) if segmentation else ClassificationTask(5)
    config = TrainConfig(epochs=1, batch_size=8, lr=0.02, schedule="constant", amp="bf16")
    trainer = Trainer(model, task, config, 8, channels_last=True)
    with torch.no_grad():
        before = task.loss(model.train()(x), y).item()
    trainer.fit([(x, y)] * 8, show_progress=False)
    with torch.no_grad():
        after = task.loss(model.train()(x), y).item()
    assert after < before, (before, after)


def test_fp16_scaler_state_is_checkpointed(tmp_path):
    """fp16 training keeps a gradient scaler; its state is saved with the checkpoint and restored on resume."""
    data = batches(3, 4)
    trainer = trained(data, 3, amp="fp16")
    assert trainer.scaler.is_enabled()
    trainer.scaler.update(1234.0)  # a scale no fresh scaler has
    trainer.save(tmp_path / "checkpoint.pt", {"config": "small", "num_classes": 3, "in_channels": 1})
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["scaler"]["scale"] == 1234.0
    config = TrainConfig(epochs=2, batch_size=4, lr=0.05, weight_decay=0.0, schedule="constant", amp="fp16")
    resumed = Trainer(small_net(), ClassificationTask(3), config, 3)
    resumed.restore(saved)
    assert resumed.scaler.get_scale() == 1234.0 and resumed.epoch == 1


def test_compile_trains_like_eager_and_names_an_unknown_backend():
    data = batches(3, 4)
    for a, b in zip(weights(trained(data, 3)), weights(trained_compiled(data))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    config = TrainConfig(epochs=1, batch_size=4)
    with pytest.raises(RuntimeError, match="torch.compile backend 'no-such-backend' is unavailable"):
        Trainer(small_net(), ClassificationTask(3), config, 3, compile="no-such-backend")


def trained_compiled(data):
    config = TrainConfig(epochs=1, batch_size=4, lr=0.05, weight_decay=0.0, schedule="constant")
    trainer = Trainer(small_net(), ClassificationTask(3), config, len(data), compile="aot_eager")
    trainer.fit(data, show_progress=False)
    return trainer


@pytest.mark.parametrize("option,value,message", [("amp", "fp8", "unknown amp mode"),
                                                  ("grad_accum", 0, "grad_accum must be a positive integer"),
                                                  ("clip_grad", -1.0, "clip_grad must be positive")])
def test_bad_options_are_named(option, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{option: value})


def test_a_mid_epoch_checkpoint_resumes_exactly(tmp_path):
    """Checkpoints every 2 optimizer steps; a run stopped right after the one at batch 4 of its second epoch and
    resumed from it ends with the weights and the epoch metrics of an uninterrupted run (a plain list loader: the
    resumed epoch skips the batches already trained)."""
    data = batches(6, 4)
    meta = {"config": "small", "num_classes": 3, "in_channels": 1}
    config = dict(epochs=2, batch_size=4, lr=0.05, weight_decay=0.0)
    straight = Trainer(small_net(), ClassificationTask(3), TrainConfig(**config), 6)
    straight.fit(data, show_progress=False)

    class Stopped(Exception):
        pass

    def save_then_stop(trainer):
        trainer.save(tmp_path / "checkpoint.pt", meta)
        if (trainer.epoch, trainer.batch_in_epoch) == (1, 4):
            raise Stopped

    stopped = Trainer(small_net(), ClassificationTask(3), TrainConfig(**config), 6, checkpoint_every=2,
                      on_checkpoint=save_then_stop)
    with pytest.raises(Stopped):
        stopped.fit(data, show_progress=False)
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["epoch"] == 1 and saved["position"]["batch"] == 4
    resumed = Trainer(small_net(), ClassificationTask(3), TrainConfig(**config), 6)
    resumed.restore(saved)
    resumed.fit(data, show_progress=False)
    for a, b in zip(weights(resumed), weights(straight)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed.history[-1]["train_loss"] == pytest.approx(straight.history[-1]["train_loss"], rel=1e-12)
    assert resumed.scheduler.last_epoch == straight.scheduler.last_epoch == 12
    # the resumed epoch's row names the rates of its first and last steps, as the uninterrupted run's does
    assert (resumed.history[-1]["lr"], resumed.history[-1]["lr_end"]) == \
        (straight.history[-1]["lr"], straight.history[-1]["lr_end"])
