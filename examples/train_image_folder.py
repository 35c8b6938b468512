"""Train a pdenet network on your own images: a folder with one subfolder of PNG or JPEG files per class
(``root/cat/0001.png``, ``root/dog/a.jpg``, ...), read with PIL as they are needed, through a standard
``torch.utils.data.DataLoader`` with worker processes.

    python examples/train_image_folder.py ROOT --config lean-resnet20 --size 32 --epochs 5 --workers 2

Every image is converted to RGB (or grayscale with ``--gray``), resized to ``--size`` x ``--size`` and scaled to
[0, 1], then normalized by the mean and standard deviation of the first images; a random tenth is held out for
evaluation. The trainer takes the ``DataLoader`` as it is (``pdenet.training.Trainer`` accepts any iterable of
batches).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, random_split

from pdenet import build_model
from pdenet.training import ClassificationTask, TrainConfig, Trainer, seed_everything

EXTENSIONS = (".png", ".jpg", ".jpeg")


class ImageFolder(Dataset):
    """``(image, label)`` pairs of ``root/<class>/<file>``: ``image`` a float tensor ``(C, size, size)`` in [0, 1],
    ``label`` the class's index in sorted order of the class folders."""

    def __init__(self, root, size: int = 32, gray: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"no image folder at {root}")
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.files = [(path, label) for label, name in enumerate(self.classes)
                      for path in sorted((root / name).iterdir()) if path.suffix.lower() in EXTENSIONS]
        if len(self.classes) < 2 or not self.files:
            raise ValueError(f"{root} needs at least two class folders holding {'/'.join(EXTENSIONS)} files; "
                             f"found {len(self.classes)} folders and {len(self.files)} images")
        self.size, self.mode = size, "L" if gray else "RGB"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        path, label = self.files[index]
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode).resize((self.size, self.size), Image.BILINEAR)
        except OSError as err:
            raise ValueError(f"cannot read the image {path}: {err}") from None
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(pixels)), label


class Normalized(Dataset):
    """``dataset`` with each channel shifted by ``mean`` and divided by ``std``."""

    def __init__(self, dataset, mean: torch.Tensor, std: torch.Tensor):
        self.dataset, self.mean, self.std = dataset, mean[:, None, None], std[:, None, None]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return (image - self.mean) / self.std, label


def train(root, config: str = "lean-resnet20", size: int = 32, gray: bool = False, epochs: int = 5,
          batch_size: int = 64, workers: int = 0, seed: int = 0, show_progress: bool = True) -> dict:
    """Train ``config`` on the image folder ``root``; returns the last epoch's metrics."""
    seed_everything(seed)
    images = ImageFolder(root, size, gray)
    held_out = max(1, len(images) // 10)
    train_part, test_part = random_split(images, [len(images) - held_out, held_out],
                                         generator=torch.Generator().manual_seed(seed))
    sample = torch.stack([train_part[i][0] for i in range(min(len(train_part), 256))])
    mean, std = sample.mean((0, 2, 3)), sample.std((0, 2, 3)).clamp(min=1e-3)
    loader = DataLoader(Normalized(train_part, mean, std), batch_size=batch_size, shuffle=True, drop_last=False,
                        num_workers=workers, generator=torch.Generator().manual_seed(seed))
    test_loader = DataLoader(Normalized(test_part, mean, std), batch_size=batch_size, num_workers=workers)
    model = build_model(config, num_classes=len(images.classes), in_channels=1 if gray else 3)
    trainer = Trainer(model, ClassificationTask(len(images.classes)),
                      TrainConfig(epochs=epochs, batch_size=batch_size, seed=seed), len(loader), channels_last=True)
    return trainer.fit(loader, test_loader, show_progress=show_progress)[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="folder with one subfolder of images per class")
    parser.add_argument("--config", default="lean-resnet20")
    parser.add_argument("--size", type=int, default=32, help="images are resized to SIZE x SIZE (default 32)")
    parser.add_argument("--gray", action="store_true", help="read the images as grayscale")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    args = parser.parse_args(argv)
    row = train(args.root, args.config, args.size, args.gray, args.epochs, args.batch_size, args.workers)
    print(f"after {row['epoch']} epochs: test accuracy {row['test_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
