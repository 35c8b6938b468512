"""Colour-coded segmentation maps: predictions next to the ground truth, saved as PNG.

Colours follow the CamVid/SegNet palette (void in black). The figure has one row per image: the input, the
ground truth, and the prediction with the image's own mIoU in its title, plus a legend of the classes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .metrics import confusion_matrix, mean_iou

#: RGB colours of CamVid classes 0..10 (Sky, Building, Pole, Road, Pavement, Tree, SignSymbol, Fence, Car,
#: Pedestrian, Bicyclist) as in the SegNet tutorial; void (11) is drawn black.
CAMVID_PALETTE = np.array([
    [128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
    [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192],
], dtype=np.uint8)
VOID_COLOUR = np.array([0, 0, 0], dtype=np.uint8)


def colorize(mask, palette: np.ndarray = CAMVID_PALETTE, ignore_index: int | None = 11) -> np.ndarray:
    """``(H, W)`` class ids -> ``(H, W, 3)`` uint8 RGB; ``ignore_index`` (and only it) is drawn black."""
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"colorize expects a 2-D mask (H, W), got shape {m.shape}")
    m = m.astype(np.int64)
    void = m == ignore_index if ignore_index is not None else np.zeros(m.shape, dtype=bool)
    bad = (~void) & ((m < 0) | (m >= len(palette)))
    if bad.any():
        raise ValueError(f"mask holds class ids outside [0, {len(palette)}) that are not the ignore index "
                         f"{ignore_index}: {sorted(set(m[bad].tolist()))[:5]}")
    out = palette[np.where(void, 0, m)]
    out[void] = VOID_COLOUR
    return out


def save_prediction_grid(images, targets, preds, path, class_names: list[str],
                         palette: np.ndarray = CAMVID_PALETTE, ignore_index: int | None = 11) -> Path:
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
    if len(class_names) != len(palette):
        raise ValueError(f"{len(class_names)} class names for a palette of {len(palette)} colours")
    n, (h, w) = images.shape[0], images.shape[2:]
    fig = Figure(figsize=(3 * 3.2, n * 3.4 * h / w + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(n, 3, squeeze=False)
    for i in range(n):
        miou = mean_iou(confusion_matrix(preds[i], targets[i], len(palette), ignore_index))
        panels = [(images[i].permute(1, 2, 0).numpy(), "image"),
                  (colorize(targets[i], palette, ignore_index), "ground truth"),
                  (colorize(preds[i], palette, ignore_index), f"prediction (mIoU {100 * miou:.1f})")]
        for ax, (picture, title) in zip(axes[i], panels):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    handles = [Patch(color=c / 255.0, label=name) for c, name in zip(palette, class_names)]
    handles.append(Patch(color=VOID_COLOUR / 255.0, label="void"))
    fig.legend(handles=handles, loc="outside lower center", ncol=6, fontsize=8, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
