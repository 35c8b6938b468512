"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009) from the pickle batches of the python release.

Each batch is a pickled dict (keys are bytes in the official files; str keys are accepted too) with
``data``, an ``(N, 3072)`` uint8 array holding the red, green and blue 32x32 planes of each image in
that order, and ``labels`` (CIFAR-10) or ``fine_labels``/``coarse_labels`` (CIFAR-100).

- CIFAR-10, folder ``cifar-10-batches-py``: ``train`` reads whichever of ``data_batch_1`` ... ``data_batch_5``
  exist (the files read are in ``Dataset.files``), ``test`` reads ``test_batch``; class names from
  ``batches.meta`` when present.
- CIFAR-100, folder ``cifar-100-python``: ``train`` and ``test``; the 100 fine labels, or the 20 coarse
  ones with ``coarse=True``; class names from ``meta``.

Pickles are read with an unpickler that only admits the numpy array types, so a corrupt or hostile file
cannot run code; any failure raises ``DatasetError`` naming the file.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from .dataset import Dataset, DatasetError
from .paths import locate

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Channel means and stds of the official training sets on the [0, 1] scale (over all pixels).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
HOW_TO_GET = ("Unpack the python version of the data set (https://www.cs.toronto.edu/~kriz/cifar.html) and pass "
              "data_dir (the folder itself or its parent), or set $PDENET_DATA.")

_ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
            *((f"numpy.{core}.multiarray", f) for core in ("core", "_core") for f in ("_reconstruct", "scalar")),
            *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core"))}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")
        return super().find_class(module, name)


def read_pickle(path: Path) -> dict:
    """A CIFAR batch as a dict with str keys; ``DatasetError`` naming the file if it is not one."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError) as err:
        raise DatasetError(f"{path}: corrupt or truncated pickle ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _field(batch: dict, key: str, path: Path):
    if key not in batch:
        raise DatasetError(f"{path}: no {key!r} entry (found {sorted(batch)})")
    return batch[key]


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = read_pickle(path)
    data = np.asarray(_field(batch, "data", path))
    labels = np.asarray(_field(batch, label_key, path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: {label_key!r} must hold {len(data)} integers, got {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{path}: {label_key!r} values outside 0..{num_classes - 1} "
                           f"(min {labels.min()}, max {labels.max()})")
    return data, labels


def _names(path: Path, key: str, default: tuple[str, ...] | None, count: int) -> tuple[str, ...]:
    if not path.is_file():
        if default is None:
            raise FileNotFoundError(f"{path} is missing: it holds the class names ({key!r}). {HOW_TO_GET}")
        return default
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in _field(read_pickle(path), key, path))
    if len(names) != count:
        raise DatasetError(f"{path}: {len(names)} names in {key!r}, expected {count}")
    return names


def _assemble(name: str, split: str, paths: list[Path], label_key: str, classes: tuple[str, ...],
              mean: tuple[float, ...], std: tuple[float, ...]) -> Dataset:
    batches = [_read_batch(p, label_key, len(classes)) for p in paths]
    data = np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([b[1] for b in batches]).astype(np.int64)
    return Dataset(name, split, torch.from_numpy(data), torch.from_numpy(labels), len(classes), classes, mean,
                   std, crop_padding=4, hflip=True, files=tuple(str(p) for p in paths))


def _check_split(title: str, split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"{title} has no split {split!r}; choose 'train' or 'test'")


def load_cifar10(split: str = "train", data_dir: str | os.PathLike | None = None) -> Dataset:
    """CIFAR-10 ``split``: images (N, 3, 32, 32) uint8 and labels (N,) int64 in 0..9."""
    _check_split("CIFAR-10", split)
    expected = f"{', '.join(CIFAR10_TRAIN)} (any subset) and test_batch"
    folder = locate("CIFAR-10", data_dir, ("cifar-10-batches-py",),
                    lambda d: any((d / f).is_file() for f in (*CIFAR10_TRAIN, "test_batch")), expected, HOW_TO_GET)
    names = CIFAR10_TRAIN if split == "train" else ("test_batch",)
    paths = [folder / f for f in names if (folder / f).is_file()]
    if not paths:
        raise FileNotFoundError(f"CIFAR-10 {split} split: none of {', '.join(names)} in {folder}. {HOW_TO_GET}")
    classes = _names(folder / "batches.meta", "label_names", CIFAR10_CLASSES, 10)
    return _assemble("cifar10", split, paths, "labels", classes, CIFAR10_MEAN, CIFAR10_STD)


def load_cifar100(split: str = "train", data_dir: str | os.PathLike | None = None, coarse: bool = False) -> Dataset:
    """CIFAR-100 ``split``: images (N, 3, 32, 32) uint8, fine labels in 0..99 (or coarse in 0..19)."""
    _check_split("CIFAR-100", split)
    folder = locate("CIFAR-100", data_dir, ("cifar-100-python",),
                    lambda d: (d / "train").is_file() or (d / "test").is_file(), "the files train, test and meta",
                    HOW_TO_GET)
    path = folder / split
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-100 file {path} is missing. {HOW_TO_GET}")
    kind = "coarse" if coarse else "fine"
    classes = _names(folder / "meta", f"{kind}_label_names", None, 20 if coarse else 100)
    return _assemble("cifar100", split, [path], f"{kind}_labels", classes, CIFAR100_MEAN, CIFAR100_STD)
