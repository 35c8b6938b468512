"""The in-memory data set every reader returns, and the error raised for unusable data files.

A :class:`Dataset` holds the whole split as tensors:

- ``images``: ``(N, C, H, W)`` ``uint8`` (pixel values ``0..255``);
- ``targets``: ``(N,)`` ``int64`` class labels (classification) or ``(N, H, W)`` ``int64`` masks
  (segmentation), with values in ``0..num_classes-1`` or ``ignore_index``;

plus what a training script needs to use it: class names, the per-channel ``mean``/``std`` of the training
split on the ``[0, 1]`` scale (normalization is ``(x / 255 - mean) / std``), the ignore index, the
augmentation a data set takes by default (``crop_padding``, ``hflip``, ``zoom_range``, ``color_jitter``: see
:class:`pdenet.data.augment.Augmentation`) and the files that were read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch


class DatasetError(ValueError):
    """A data file exists but cannot be used (corrupt, truncated, wrong shape or values); names the file."""


@dataclass(eq=False, repr=False)
class Dataset(torch.utils.data.Dataset):
    """A split of a data set held in memory; ``ds[i]`` is ``(image (C, H, W) uint8, target)``."""

    name: str
    split: str
    images: torch.Tensor
    targets: torch.Tensor
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    ignore_index: int | None = None
    crop_padding: int = 0
    hflip: bool = False
    zoom_range: float = 0.0
    color_jitter: float = 0.0
    class_weights: tuple[float, ...] | None = None
    palette: tuple[tuple[int, int, int], ...] | None = None
    files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        x, t = self.images, self.targets
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 4:
            raise TypeError(f"{self.name}: images must be a uint8 tensor (N, C, H, W), got "
                            f"{getattr(x, 'dtype', type(x))} of shape {tuple(getattr(x, 'shape', ()))}")
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
            raise TypeError(f"{self.name}: targets must be an int64 tensor, got {getattr(t, 'dtype', type(t))}")
        n, c, h, w = x.shape
        if t.shape not in ((n,), (n, h, w)):
            raise ValueError(f"{self.name}: targets of shape {tuple(t.shape)} fit neither labels ({n},) "
                             f"nor masks ({n}, {h}, {w}) for images of shape {tuple(x.shape)}")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")
        if len(self.mean) != c or len(self.std) != c or min(self.std) <= 0:
            raise ValueError(f"{self.name}: mean {self.mean} and std {self.std} must have one entry per channel "
                             f"({c}) and std > 0")
        if self.class_weights is not None and len(self.class_weights) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_weights)} class weights for {self.num_classes} classes")
        if t.numel():
            valid = (t >= 0) & (t < self.num_classes)
            if self.ignore_index is not None:
                valid |= t == self.ignore_index
            if not bool(valid.all()):
                bad = torch.unique(t[~valid])[:10].tolist()
                raise ValueError(f"{self.name}: target values {bad} are outside 0..{self.num_classes - 1}"
                                 + (f" and not the ignore index {self.ignore_index}" if self.ignore_index is not None
                                    else ""))

    @property
    def task(self) -> str:
        """``"segmentation"`` when the targets are masks, else ``"classification"``."""
        return "segmentation" if self.targets.ndim == 3 else "classification"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index):
        return self.images[index], self.targets[index]

    def subset(self, indices) -> Dataset:
        """The samples at ``indices`` (a sequence, tensor or slice) with the same metadata."""
        if isinstance(indices, slice):
            return replace(self, images=self.images[indices], targets=self.targets[indices])
        index = torch.as_tensor(indices, dtype=torch.int64)
        if index.ndim != 1:
            raise ValueError(f"subset indices must be one-dimensional, got shape {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < -len(self) or int(index.max()) >= len(self)):
            raise IndexError(f"subset indices out of range for {len(self)} samples")
        return replace(self, images=self.images[index], targets=self.targets[index])

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        kind = "masks" if self.task == "segmentation" else "labels"
        if len(self.files) <= 6:
            read = ", ".join(os.path.basename(f) for f in self.files)
        else:
            read = f"{len(self.files)} files under {os.path.commonpath(self.files)}"
        return (f"Dataset({self.name}/{self.split}: {len(self)} images {c}x{h}x{w}, {kind}, "
                f"{self.num_classes} classes; read {read or 'no files'})")
