"""Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017) from its four IDX files.

``train`` is 60,000 and ``test`` 10,000 grayscale 28x28 images of 10 clothing classes. The files
(``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each optionally ``.gz``) are looked for in ``data_dir`` or, by default, in
``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .dataset import Dataset, DatasetError
from .idx import read_idx
from .paths import locate

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
# Channel mean and std of the 60,000 training images on the [0, 1] scale (checked against the files in the tests).
MEAN, STD = (0.2860,), (0.3530,)
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FOLDERS = ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw")
HOW_TO_GET = ("Install them with `apt-get install dataset-fashion-mnist` (into /usr/share/datasets/fashion-mnist) "
              "or copy them from https://github.com/zalandoresearch/fashion-mnist (data/fashion) and pass "
              "data_dir.")
EXPECTED = "the IDX files " + ", ".join(f"{f}[.gz]" for pair in FILES.values() for f in pair)


def _find(folder: Path, stem: str) -> Path | None:
    return next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST ``split`` ("train" or "test"): images (N, 1, 28, 28) uint8, labels (N,) int64."""
    if split not in FILES:
        raise ValueError(f"Fashion-MNIST has no split {split!r}; choose one of {tuple(FILES)}")
    folder = locate("Fashion-MNIST", data_dir, FOLDERS,
                    lambda d: any(_find(d, s) for pair in FILES.values() for s in pair), EXPECTED, HOW_TO_GET)
    paths = []
    for stem in FILES[split]:
        path = _find(folder, stem)
        if path is None:
            raise FileNotFoundError(f"Fashion-MNIST file {folder / stem}[.gz] is missing (expected {EXPECTED}). "
                                    f"{HOW_TO_GET}")
        paths.append(path)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.dtype != torch.uint8 or images.ndim != 3:
        raise DatasetError(f"{paths[0]}: expected uint8 images of shape (N, H, W), got {images.dtype} "
                           f"{tuple(images.shape)}")
    if labels.dtype != torch.uint8 or labels.ndim != 1:
        raise DatasetError(f"{paths[1]}: expected uint8 labels of shape (N,), got {labels.dtype} "
                           f"{tuple(labels.shape)}")
    if len(labels) != len(images):
        raise DatasetError(f"{paths[1]}: {len(labels)} labels for {len(images)} images in {paths[0]}")
    if len(labels) and int(labels.max()) >= len(CLASSES):
        raise DatasetError(f"{paths[1]}: label {int(labels.max())} out of range 0..{len(CLASSES) - 1}")
    return Dataset("fashion-mnist", split, images.unsqueeze(1), labels.long(), len(CLASSES), CLASSES, MEAN, STD,
                   crop_padding=2, hflip=True, files=tuple(str(p) for p in paths))
