"""The training loop: tasks (loss and metrics), optimizers, learning-rate schedules, seeding, and a Trainer.

A :class:`Task` decides what is learned: the loss, the metrics, and which metric is the run's headline
number (``metric``; "accuracy" for classification). Metrics are accumulated in one tensor of sums, so that
batches and processes combine by addition (one all-reduce in distributed runs). Adding a task (segmentation,
for example) is one subclass plus one entry in ``TASKS``.

The :class:`Trainer` runs epochs of mini-batch optimization: for every batch ``(x, y)``,
``loss = task.loss(model(x), y)``, ``loss.backward()``, an optimizer step, ``enforce_stability()`` on every
module that defines it, and one learning-rate scheduler step (schedules are per step, warm-up included).
Everything that changes during training (weights, optimizer, scheduler, generators, epoch, history) is in
its checkpoint, so a resumed run continues bit for bit where it stopped.
"""
from __future__ import annotations

import importlib
import itertools
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from .data import BatchLoader
from .data.transfer import to_device
from .distributed import DistContext
from .fusion import fuse
from .progress import Progress

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
AMP_MODES = ("off", "bf16", "fp16")


# --------------------------------------------------------------------------------------------- tasks
class Task:
    """What a network learns: loss, metrics and the headline metric.

    Subclasses set ``name`` and ``metric`` (the headline key of ``summarize``; ``metric_label`` is how the
    report names it) and implement ``from_dataset``, ``loss``, ``state_size``, ``update`` and ``summarize``;
    ``add_arguments`` and ``save_artifacts`` are optional hooks. The metric state is a float64 tensor of sums over samples (so it adds across batches and
    ranks); ``summarize`` turns it into named numbers that include ``"loss"`` and ``metric``.
    """

    name: str = "task"
    metric: str = "accuracy"
    metric_label: str = "accuracy"

    @classmethod
    def add_arguments(cls, parser) -> None:
        """Task-specific command-line options of ``pdenet train`` (none by default)."""

    @classmethod
    def from_dataset(cls, dataset, options: dict) -> "Task":
        """The task for a training set (checks it fits) with the run's ``options`` (command-line values)."""
        raise NotImplementedError

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_size(self) -> int:
        raise NotImplementedError

    def new_state(self, device) -> torch.Tensor:
        return torch.zeros(self.state_size(), dtype=torch.float64, device=device)

    def update(self, state: torch.Tensor, output: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> None:
        """Add one batch's sums to ``state`` in place."""
        raise NotImplementedError

    def summarize(self, state: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError

    def save_artifacts(self, model: nn.Module, dataset, out) -> list[str]:
        """Files the task writes into the run directory ``out`` after training (for example predicted
        masks next to the ground truth); returns their names. None by default."""
        return []


class ClassificationTask(Task):
    """Cross-entropy with optional label smoothing ``ε``: targets ``(1 − ε) e_y + ε/K``.

    Metrics: mean loss and top-1 accuracy ``#{argmax_k f_k(x) = y} / N``; state ``[Σ loss, Σ correct, N]``.
    Outputs ``(B, K)`` logits, targets ``(B,)`` class indices.
    """

    name = "classification"
    metric = "accuracy"
    metric_label = "test accuracy"

    def __init__(self, num_classes: int, label_smoothing: float = 0.0):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.num_classes = int(num_classes)
        self.label_smoothing = float(label_smoothing)

    @classmethod
    def from_dataset(cls, dataset, options: dict) -> "ClassificationTask":
        if getattr(dataset, "task", "classification") != "classification":
            raise ValueError(f"data set {dataset.name!r} has {dataset.task} targets, not class labels; "
                             f"use --task {dataset.task}")
        return cls(dataset.num_classes, options.get("label_smoothing", 0.0))

    def loss(self, output, target):
        if output.dim() != 2 or output.shape[1] != self.num_classes:
            raise ValueError(f"classification expects logits (batch, {self.num_classes}), got {tuple(output.shape)}")
        return F.cross_entropy(output, target, label_smoothing=self.label_smoothing)

    def state_size(self):
        return 3

    def update(self, state, output, target, loss):
        n = target.shape[0]
        correct = (output.argmax(dim=1) == target).sum()
        count = correct.new_full((), n, dtype=torch.float64)  # made on the device: no copy from the host
        state += torch.stack([loss.detach().double() * n, correct.double(), count])

    def summarize(self, state):
        total, correct, n = state.tolist()
        n = max(n, 1.0)
        return {"loss": total / n, "accuracy": correct / n}


TASKS: dict[str, str] = {
    "classification": "pdenet.training:ClassificationTask",
    "segmentation": "pdenet.segmentation.task:SegmentationTask",
}


def task_class(name: str) -> type[Task]:
    """The Task subclass registered under ``name`` in ``TASKS`` (imported on first use)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    module, attr = TASKS[name].split(":")
    return getattr(importlib.import_module(module), attr)


# --------------------------------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """Optimization settings.

    ``lr`` and ``weight_decay`` default by optimizer: SGD (momentum ``momentum``, Nesterov) ``lr = 0.1``,
    ``weight_decay = 5e-4``; AdamW ``lr = 2e-3``, ``weight_decay = 0.05``. Weight decay applies to weights
    with at least 2 dimensions (not to biases, normalization scales or step sizes). ``schedule``:
    ``"cosine"`` ``η_t = η (1 + cos(π t/T))/2``; ``"step"`` multiplies by ``gamma`` at each of
    ``milestones`` (fractions of the run); ``"constant"``. An optional linear warm-up over ``warmup_epochs``
    ramps from ``η/W`` to ``η``. The schedule advances once per optimizer step.

    ``amp``: mixed precision, ``"off"``, ``"bf16"`` (autocast to bfloat16) or ``"fp16"`` (autocast to float16
    with a ``GradScaler``, whose state the checkpoints keep). ``grad_accum``: batches whose gradients are summed
    (each loss divided by their number) before one optimizer step, so that a step sees ``grad_accum x batch_size``
    images. ``clip_grad``: the largest norm of all gradients together at a step (``None``: no clipping).
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float | None = None
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: Sequence[float] = (0.5, 0.75)
    gamma: float = 0.1
    label_smoothing: float = 0.0
    seed: int = 0
    amp: str = "off"
    grad_accum: int = 1
    clip_grad: float | None = None

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {SCHEDULES}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"unknown amp mode {self.amp!r}; expected one of {AMP_MODES}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"clip_grad must be positive (or None for no clipping), got {self.clip_grad}")
        for name in ("epochs", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.lr is None:
            self.lr = 0.1 if self.optimizer == "sgd" else 2e-3
        if self.weight_decay is None:
            self.weight_decay = 5e-4 if self.optimizer == "sgd" else 0.05
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"need weight_decay >= 0 and 0 <= momentum < 1, got {self.weight_decay}, {self.momentum}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        self.milestones = tuple(float(m) for m in self.milestones)
        if any(not 0 < m < 1 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing fractions of the run in (0, 1), got {self.milestones}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def as_dict(self) -> dict:
        return asdict(self)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW; weight decay only on parameters with ``ndim >= 2``. Both update all
    parameters with PyTorch's ``foreach`` kernels (PyTorch picks them only on GPUs by default): the same results,
    half the time of a per-parameter loop on the CPU (0.74 against 1.40 ms per step for ResNet-20's 77
    parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0, foreach=True)
    return torch.optim.AdamW(groups, lr=config.lr, foreach=True)


class LRFactor:
    """The multiplier of the base learning rate after ``step`` optimizer steps (see ``TrainConfig``)."""

    def __init__(self, schedule: str, total_steps: int, warmup_steps: int = 0,
                 milestones: Sequence[float] = (), gamma: float = 0.1):
        self.schedule = schedule
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.milestones = [int(round(m * total_steps)) for m in milestones]
        self.gamma = gamma

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "cosine":
            t = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
        if self.schedule == "step":
            return self.gamma ** sum(step >= m for m in self.milestones)
        return 1.0


def build_scheduler(optimizer, config: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` following ``config``'s schedule over ``epochs * steps_per_epoch`` steps."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch} (is the training set "
                         f"smaller than one batch?)")
    factor = LRFactor(config.schedule, config.epochs * steps_per_epoch,
                      round(config.warmup_epochs * steps_per_epoch), config.milestones, config.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------- loops
@torch.no_grad()
def evaluate(model: nn.Module, task: Task, loader, dist: DistContext | None = None,
             memory_format: torch.memory_format = torch.contiguous_format) -> dict[str, float]:
    """The task's metrics of ``model`` in eval mode over ``loader`` (each rank its shard, sums all-reduced),
    plus ``"time"`` in seconds. Batches are moved to ``dist.device`` (see :func:`model_input`). The model's
    train/eval mode is restored afterwards."""
    dist = dist or DistContext()
    was_training = model.training
    model.eval()
    state = task.new_state(dist.device)
    start = time.perf_counter()
    try:
        for x, y in loader:
            x, y = model_input(x, dist.device, memory_format), to_device(y, dist.device)
            out = model(x)
            task.update(state, out, y, task.loss(out, y))
    finally:
        model.train(was_training)
    return {**task.summarize(dist.all_reduce_(state)), "time": time.perf_counter() - start}


def model_input(x: torch.Tensor, device: torch.device, memory_format: torch.memory_format) -> torch.Tensor:
    """A batch's input on ``device`` (to a GPU from page-locked memory, without blocking: see
    :func:`pdenet.data.transfer.to_device`), images (4-d) in ``memory_format``."""
    x = to_device(x, device)
    return x.contiguous(memory_format=memory_format) if x.dim() == 4 else x


def _widened(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 where mixed precision made it float16 or bfloat16 (metrics are summed in full precision)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def set_epoch(loader, epoch: int, start_batch: int = 0):
    """Tell ``loader`` the epoch where it can be told: its own ``set_epoch`` (pdenet's ``BatchLoader``, which also
    starts at batch ``start_batch``), or its sampler's (a ``DataLoader`` with a ``DistributedSampler``); any
    other iterable is left as it is. Returns an iterator over the epoch's batches from ``start_batch`` on
    (skipping them where the loader cannot start there itself)."""
    if isinstance(loader, BatchLoader):
        loader.set_epoch(epoch, start_batch)
        return iter(loader)
    for target in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None),
                                                                     "sampler", None)):
        if callable(getattr(target, "set_epoch", None)):
            target.set_epoch(epoch)
            break
    return itertools.islice(iter(loader), start_batch, None)


def compiled(module: nn.Module, backend: bool | str) -> nn.Module:
    """``torch.compile(module)`` (``backend`` ``True``: PyTorch's default, or a backend's name), with a clear error
    where the backend is unknown."""
    options = {} if backend is True else {"backend": backend}
    try:
        return torch.compile(module, **options)
    except Exception as err:  # an unknown or unloadable backend
        raise RuntimeError(f"torch.compile backend {backend!r} is unavailable here ({err}); train without compile, "
                           "or name another backend") from err


@dataclass
class Trainer:
    """Trains ``model`` for ``task`` with the settings of ``config``.

    ``loaders`` are any iterables of ``(x, y)`` batches: pdenet's ``BatchLoader``, a ``torch.utils.data.DataLoader``
    (with or without a ``DistributedSampler``; pdenet's data sets are map-style ``Dataset``s), a list or a
    generator. Their ``set_epoch`` (or their sampler's) is called where it exists; batches are moved to the
    model's device, ``dist.device`` (to a GPU from page-locked memory without blocking: give a ``DataLoader``
    ``pin_memory=True`` and its batches arrive pinned, else they are pinned here). ``steps_per_epoch`` is the
    number of batches an epoch yields (the schedule's length). ``dist`` makes it data-parallel (the model is
    wrapped in DistributedDataParallel and metrics are summed over ranks). ``channels_last`` trains in the NHWC
    memory layout. With ``fuse`` (default) the model is rewritten by ``pdenet.fuse`` for the fused CPU training
    path (``fusion`` holds its report); parameters and ``state_dict`` keys stay as they are. ``compile``
    (``True`` or a backend's name) trains through ``torch.compile``. ``config`` sets mixed precision, gradient
    accumulation and clipping (see ``TrainConfig``). With ``checkpoint_every = N`` the trainer calls
    ``on_checkpoint(trainer)`` every ``N`` optimizer steps inside an epoch (the callback saves, ``save``/``restore``
    keep the position in the epoch and its partial metrics, so a run resumed there ends with the weights of an
    uninterrupted one).
    """

    model: nn.Module
    task: Task
    config: TrainConfig
    steps_per_epoch: int
    dist: DistContext = field(default_factory=DistContext)
    channels_last: bool = False
    log_every: int = 10
    fuse: bool = True
    compile: bool | str = False
    checkpoint_every: int = 0
    on_checkpoint: Callable[["Trainer"], None] | None = None

    def __post_init__(self):
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        self.fusion = fuse(self.model) if self.fuse else None
        self.net = self.dist.wrap(self.model)
        if self.compile:
            self.net = compiled(self.net, self.compile)
        self.optimizer = build_optimizer(self.model, self.config)
        self.optimizer_steps_per_epoch = -(-self.steps_per_epoch // self.config.grad_accum)
        self.scheduler = build_scheduler(self.optimizer, self.config, self.optimizer_steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.dist.device.type, enabled=self.config.amp == "fp16")
        self.stabilized = [m for m in self.model.modules() if callable(getattr(m, "enforce_stability", None))]
        self.epoch = 0
        self.history: list[dict] = []
        # the position inside epoch ``epoch + 1`` at a mid-epoch checkpoint: batches trained, the task's partial
        # sums, images and seconds so far
        self.batch_in_epoch, self.epoch_state, self.epoch_images, self.epoch_time = 0, None, 0, 0.0

    @property
    def done(self) -> bool:
        return self.epoch >= self.config.epochs

    def _autocast(self):
        """The forward's autocast region: ``config.amp``'s dtype on the model's device, or none."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.amp)
        return torch.autocast(self.dist.device.type, dtype=dtype, enabled=dtype is not None)

    def _optimizer_step(self) -> None:
        """Unscale (fp16), clip, step, update the scale, clear the gradients, keep the blocks stable, advance the
        schedule."""
        if self.config.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.stabilized:
            with torch.no_grad():
                for m in self.stabilized:
                    m.enforce_stability()
        self.scheduler.step()

    def train_epoch(self, loader, show_progress: bool = True) -> dict[str, float]:
        """One pass over ``loader``; returns the epoch's training metrics (summed over ranks). Every
        ``config.grad_accum`` batches (and after the last) make one optimizer step."""
        first = self.batch_in_epoch
        batches = set_epoch(loader, self.epoch, first)
        remaining = None  # batches left in the epoch, where the loader knows
        if hasattr(loader, "__len__"):
            remaining = len(loader) - (0 if isinstance(loader, BatchLoader) else first)
        self.net.train()
        state = self.epoch_state if self.epoch_state is not None else self.task.new_state(self.dist.device)
        bar = Progress(None if remaining is None else (first + remaining) * self.config.batch_size,
                       desc=f"epoch {self.epoch + 1}/{self.config.epochs}", enabled=show_progress and self.dist.is_main)
        accum, pending, steps = self.config.grad_accum, 0, 0
        self.optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter() - self.epoch_time
        bar.count = self.epoch_images
        for step, (x, y) in enumerate(batches, start=first):
            x, y = model_input(x, self.dist.device, self.memory_format), to_device(y, self.dist.device)
            with self._autocast():
                out = self.net(x)
                loss = self.task.loss(out, y)
            self.scaler.scale(loss / accum if accum > 1 else loss).backward()
            pending += 1
            with torch.no_grad():
                self.task.update(state, _widened(out), y, _widened(loss))
            images = x.shape[0] * self.dist.world_size  # this rank's share of the global batch
            if step % self.log_every == 0 or step == first + (remaining or 0) - 1:
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"training loss became {value} at epoch {self.epoch + 1}, step "
                                             f"{step + 1}; lower the learning rate (--lr)")
                bar.update(images, loss=value, lr=self.optimizer.param_groups[0]["lr"])
            else:
                bar.update(images)
            if pending == accum:
                self._optimizer_step()
                pending, steps = 0, steps + 1
                if self.checkpoint_every and steps % self.checkpoint_every == 0 and self.on_checkpoint is not None:
                    self.batch_in_epoch, self.epoch_state = step + 1, state
                    self.epoch_images, self.epoch_time = bar.count, time.perf_counter() - start
                    self.on_checkpoint(self)
        if pending:  # the epoch's last, partial accumulation
            self._optimizer_step()
        bar.close()
        elapsed = time.perf_counter() - start
        self.batch_in_epoch, self.epoch_state, self.epoch_images, self.epoch_time = 0, None, 0, 0.0
        metrics = self.task.summarize(self.dist.all_reduce_(state))
        return {**metrics, "time": elapsed, "images_per_s": bar.count / elapsed if elapsed > 0 else 0.0}

    def evaluate(self, loader) -> dict[str, float]:
        """Metrics of the model in eval mode over ``loader`` (see :func:`evaluate`)."""
        return evaluate(self.model, self.task, loader, self.dist, self.memory_format)

    def scheduled_lr(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (counted from 0 over the run) on the schedule."""
        return self.scheduler.base_lrs[0] * self.scheduler.lr_lambdas[0](max(step, 0))

    def fit(self, train_loader, eval_loader=None, eval_every: int = 1,
            callbacks: Iterable[Callable[["Trainer", dict], None]] = (), show_progress: bool = True) -> list[dict]:
        """Train from ``self.epoch`` to ``config.epochs``; after each epoch append a row to ``history`` and
        call each ``callback(trainer, row)`` (checkpointing, logging). A row holds the learning rate at the epoch's
        start (``lr``) and that of its last step (``lr_end``), the training metrics (``train_*``) and, when the
        epoch was evaluated, the test metrics (``test_*``). Evaluates every ``eval_every`` epochs and after the
        last."""
        callbacks = list(callbacks)
        while not self.done:
            # the epoch's first optimizer step, also where a run resumed inside the epoch has taken some already
            first_step = self.scheduler.last_epoch - self.batch_in_epoch // self.config.grad_accum
            threads = torch.get_num_threads()
            train = self.train_epoch(train_loader, show_progress)
            self.epoch += 1
            row = {"epoch": self.epoch, "lr": self.scheduled_lr(first_step),
                   "lr_end": self.scheduled_lr(self.scheduler.last_epoch - 1), "threads": threads,
                   **{f"train_{k}": v for k, v in train.items()}}
            if eval_loader is not None and (self.epoch % eval_every == 0 or self.done):
                row.update({f"test_{k}": v for k, v in self.evaluate(eval_loader).items()})
            self.history.append(row)
            for cb in callbacks:
                cb(self, row)
        return self.history

    # ----------------------------------------------------------------------------- checkpoints
    def save(self, path, meta: dict):
        """Atomic checkpoint of the whole training state after ``self.epoch`` epochs (main rank writes)."""
        if self.dist.is_main:
            position = None if self.epoch_state is None else {
                "batch": self.batch_in_epoch, "state": self.epoch_state.detach().cpu(), "images": self.epoch_images,
                "time": self.epoch_time}
            ckpt.save_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                 scaler=self.scaler, epoch=self.epoch, meta={**meta, "train": self.config.as_dict()},
                                 history=self.history, position=position)
        self.dist.barrier()

    def restore(self, checkpoint: dict) -> None:
        """Continue from a checkpoint dict (``pdenet.checkpoint.load_checkpoint``)."""
        self.epoch = ckpt.restore(checkpoint, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                  scaler=self.scaler)
        position = checkpoint.get("position")
        if position is not None:  # saved inside an epoch
            self.batch_in_epoch, self.epoch_images = position["batch"], position["images"]
            self.epoch_time = position["time"]
            self.epoch_state = position["state"].to(self.dist.device)
        self.history = list(checkpoint["history"])
