"""Colour-coded segmentation maps: predictions next to the ground truth, saved as PNG.

Colours follow the data set's palette (by default CamVid's SegNet colour code, void in black). The figure
has one row per image: the input, the ground truth, and the prediction with the image's own mIoU in its
title, plus a legend of the classes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.camvid import IGNORE_INDEX, PALETTE
from .metrics import confusion_matrix, mean_iou


def _palette(palette) -> np.ndarray:
    pal = np.asarray(palette, dtype=np.uint8)
    if pal.ndim != 2 or pal.shape[1] != 3:
        raise ValueError(f"palette must be a sequence of RGB triples, got shape {pal.shape}")
    return pal


def colorize(mask, palette=PALETTE, ignore_index: int | None = IGNORE_INDEX) -> np.ndarray:
    """``(H, W)`` class ids -> ``(H, W, 3)`` uint8 RGB: id ``i`` gets ``palette[i]``; ``ignore_index`` gets
    its palette entry when the palette has one (CamVid's void: black), else black."""
    pal = _palette(palette)
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"colorize expects a 2-D mask (H, W), got shape {m.shape}")
    m = m.astype(np.int64)
    void = m == ignore_index if ignore_index is not None else np.zeros(m.shape, dtype=bool)
    bad = (~void) & ((m < 0) | (m >= len(pal)))
    if bad.any():
        raise ValueError(f"mask holds class ids outside [0, {len(pal)}) that are not the ignore index "
                         f"{ignore_index}: {sorted(set(m[bad].tolist()))[:5]}")
    out = pal[np.where(void, 0, m)]
    out[void] = _void_colour(pal, ignore_index)
    return out


def _void_colour(pal: np.ndarray, ignore_index: int | None) -> np.ndarray:
    return pal[ignore_index] if ignore_index is not None and 0 <= ignore_index < len(pal) else np.zeros(3, np.uint8)


def save_prediction_grid(images, targets, preds, path, class_names, palette=PALETTE,
                         ignore_index: int | None = IGNORE_INDEX) -> Path:
    """Write a PNG with rows ``image | ground truth | prediction`` for each of the ``N`` images.

    ``images``: uint8 ``(N, 3, H, W)``; ``targets`` and ``preds``: class ids ``(N, H, W)``.
    Returns the path written.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    images, targets, preds = (torch.as_tensor(t).cpu() for t in (images, targets, preds))
    if images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if targets.shape != preds.shape or targets.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"targets {tuple(targets.shape)} and predictions {tuple(preds.shape)} must both be "
                         f"(N, H, W) = {(images.shape[0], *images.shape[2:])}")
    pal = _palette(palette)
    if len(pal) < len(class_names):
        raise ValueError(f"a palette of {len(pal)} colours for {len(class_names)} classes")
    n, (h, w) = images.shape[0], images.shape[2:]
    fig = Figure(figsize=(3 * 3.2, n * 3.4 * h / w + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(n, 3, squeeze=False)
    for i in range(n):
        miou = mean_iou(confusion_matrix(preds[i], targets[i], len(class_names), ignore_index))
        panels = [(images[i].permute(1, 2, 0).numpy(), "image"),
                  (colorize(targets[i], pal, ignore_index), "ground truth"),
                  (colorize(preds[i], pal, ignore_index), f"prediction (mIoU {100 * miou:.1f})")]
        for ax, (picture, title) in zip(axes[i], panels):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    handles = [Patch(color=c / 255.0, label=name) for c, name in zip(pal, class_names)]
    if ignore_index is not None:
        handles.append(Patch(color=_void_colour(pal, ignore_index) / 255.0, label="void"))
    fig.legend(handles=handles, loc="outside lower center", ncol=6, fontsize=8, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
