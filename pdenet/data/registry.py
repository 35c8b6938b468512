"""``load_dataset``: the one entry point to the data sets, by name."""
from __future__ import annotations

import os

from .camvid import load_camvid
from .cifar import load_cifar10, load_cifar100
from .dataset import Dataset
from .fashion_mnist import load_fashion_mnist

DATASETS = {"fashion-mnist": load_fashion_mnist, "cifar10": load_cifar10, "cifar100": load_cifar100,
            "camvid": load_camvid}
#: The held-out split a training run evaluates on when none is named: CamVid validates on ``val`` (the SegNet
#: protocol; the development copy has no ``test`` split), the others on ``test``.
EVAL_SPLITS = {"camvid": "val"}


def eval_split(name: str) -> str:
    """The default evaluation split of data set ``name`` (see ``EVAL_SPLITS``; ``"test"`` otherwise)."""
    return EVAL_SPLITS.get(name, "test")


def load_dataset(name: str, split: str = "train", data_dir: str | os.PathLike | None = None, **options) -> Dataset:
    """Read split ``split`` of data set ``name`` into memory.

    ``name``: "fashion-mnist" (splits train/test), "cifar10" (train/test), "cifar100" (train/test; option
    ``coarse=True`` for the 20 superclasses) or "camvid" (train/val/test). ``data_dir`` is the data set's
    folder or its parent (default: see :mod:`pdenet.data.paths`). Nothing is downloaded.
    """
    try:
        loader = DATASETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}") from None
    return loader(split, data_dir, **options)
