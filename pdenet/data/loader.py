"""Deterministic, shardable batch iterator over an in-memory :class:`~pdenet.data.dataset.Dataset`.

Convention. Epoch ``e`` of a run with seed ``s`` is fixed by ``(s, e)`` alone:

- the sample order is a permutation drawn from a generator seeded from ``(s, e)`` (or ``0..N-1`` without
  shuffling), cut into *global* batches of ``G = batch_size * world_size`` samples (the last one shorter
  unless ``drop_last``);
- the augmentation parameters of global batch ``k`` are drawn for all its samples, in order, from a
  generator seeded from ``(s, e, k)`` (see :func:`derived_seed`);
- rank ``r`` of ``world_size`` takes the samples ``r::world_size`` of each global batch, with their
  augmentation parameters.

So the union of the ranks' ``k``-th batches is exactly the ``k``-th batch of a 1-process run with
``batch_size * world_size`` (same samples, same crops and flips), every rank runs the same number of
steps, and a run resumed at epoch ``e`` (``set_epoch(e)``) or even at batch ``k`` (``start_batch=k``) sees
exactly the batches of an uninterrupted run. When the last global batch has fewer than ``world_size``
samples some ranks get an empty batch for it; use ``drop_last=True`` for training with several processes.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .augment import Augmentation, normalize
from .dataset import Dataset
from .transfer import gather


ORDER_STREAM, AUGMENT_STREAM = 0, 1


def derived_seed(seed: int, epoch: int, stream: int, batch: int = 0) -> int:
    """A 64-bit seed for one random stream of a run: numpy's SeedSequence of the fixed-length key
    ``(seed mod 2^32, seed div 2^32, epoch, stream, batch)``, so distinct keys give independent streams."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, epoch, stream, batch])
               .generate_state(1, dtype=np.uint64)[0])


class BatchLoader:
    """Batches ``(images, targets)`` of a :class:`Dataset` on ``device``, see the module docstring.

    ``images`` are float (``dtype``) normalized with the data set's mean/std, shape (b, C, h, w), in
    ``channels_last`` memory format on request; ``targets`` are int64 (b,) labels or (b, h, w) masks.
    ``augment`` is False/None (none), True (the data set's standard augmentation) or an :class:`Augmentation`.
    On a CUDA device each batch is gathered into page-locked host memory and copied without blocking, so the
    copy overlaps the training step before it (see :mod:`pdenet.data.transfer`); augmentation runs on ``device``.
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = True,
                 augment: bool | Augmentation | None = False, seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 channels_last: bool = False, dtype: torch.dtype = torch.float32) -> None:
        if not isinstance(dataset, Dataset):
            raise TypeError(f"BatchLoader needs a pdenet.data.Dataset, got {type(dataset).__name__}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        if not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        if augment is True:
            augment = Augmentation.for_dataset(dataset)
        elif augment is False or augment is None:
            augment = None
        elif not isinstance(augment, Augmentation):
            raise TypeError(f"augment must be a bool or an Augmentation, got {type(augment).__name__}")
        self.dataset, self.batch_size, self.shuffle, self.augment = dataset, batch_size, shuffle, augment
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.device, self.dtype = torch.device(device), dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.epoch, self.start_batch = 0, 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select epoch ``epoch`` for the next iteration, starting at its batch ``start_batch``."""
        if epoch < 0 or not 0 <= start_batch <= self.num_batches():
            raise ValueError(f"need epoch >= 0 and 0 <= start_batch <= {self.num_batches()}, "
                             f"got {epoch}, {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def num_batches(self) -> int:
        """Batches per epoch (the same on every rank)."""
        n, g = len(self.dataset), self.global_batch_size
        return n // g if self.drop_last else -(-n // g)

    def __len__(self) -> int:
        return self.num_batches() - self.start_batch

    def order(self) -> torch.Tensor:
        """The epoch's sample order (N,) int64, before cutting into batches and shards."""
        n = len(self.dataset)
        if not self.shuffle:
            return torch.arange(n)
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch, ORDER_STREAM))
        return torch.randperm(n, generator=generator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, g, ds = self.order(), self.global_batch_size, self.dataset
        image_size = ds.image_shape[1:]
        for k in range(self.start_batch, self.num_batches()):
            members = order[k * g:(k + 1) * g]
            local = members[self.rank::self.world_size]
            images, targets = gather(ds.images, local, self.device), gather(ds.targets, local, self.device)
            if self.augment is not None:
                generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch, AUGMENT_STREAM, k))
                params = self.augment.sample(len(members), image_size, generator, ds.image_shape[0])
                masks = targets if targets.ndim == 3 else None
                images, masks = self.augment.apply(images, params.select(slice(self.rank, None, self.world_size)),
                                                   masks, ds.ignore_index)
                if masks is not None:
                    targets = masks
            yield normalize(images, ds.mean, ds.std, self.dtype, self.memory_format), targets
