"""``load_dataset``: the one entry point to the data sets, by name; ``register_dataset`` adds one."""
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


def register_dataset(name: str, loader=None, eval_split: str = "test"):
    """Make ``loader`` the reader of data set ``name`` (usable as a decorator factory: ``@register_dataset("x")``).

    ``loader(split, data_dir, **options)`` returns a :class:`~pdenet.data.Dataset` of split ``split`` read from
    ``data_dir`` (a folder, or ``None`` for its default place); ``eval_split`` is the split a training run
    evaluates on by default. Then ``load_dataset(name, ...)`` and ``pdenet train --data NAME`` (with ``--import``)
    read it. ``TypeError`` for a loader that is not callable, ``ValueError`` for a name already registered.
    """
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise TypeError(f"a data set name must be a non-empty string without spaces, got {name!r}")
    if name in DATASETS:
        raise ValueError(f"a data set named {name!r} is already registered")
    if not isinstance(eval_split, str) or not eval_split:
        raise TypeError(f"eval_split must be a split name, got {eval_split!r}")
    if loader is None:
        return lambda fn: register_dataset(name, fn, eval_split)
    if not callable(loader):
        raise TypeError(f"data set {name!r}: loader must be callable as loader(split, data_dir, **options), got "
                        f"{type(loader).__name__}")
    DATASETS[name] = loader
    if eval_split != "test":
        EVAL_SPLITS[name] = eval_split
    return loader


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
