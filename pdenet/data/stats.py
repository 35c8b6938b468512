"""Statistics of a data set: channel mean/std for normalization and median-frequency class weights."""
from __future__ import annotations

import torch


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images (N, C, H, W) on the [0, 1] scale.

    Over all pixels of all images: ``mean_c = E[x/255]``, ``std_c = sqrt(E[(x/255)^2] - mean_c^2)``,
    accumulated in float64 over chunks of ``chunk`` images.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"channel_stats needs non-empty uint8 images (N, C, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64, device=images.device)
    squares = torch.zeros_like(total)
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].transpose(0, 1).reshape(c, -1).double()
        total += x.sum(1)
        squares += (x * x).sum(1)
    count = images.numel() // c
    mean = total / count / 255
    std = (squares / count / 255**2 - mean**2).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def median_frequency_weights(masks: torch.Tensor, num_classes: int, ignore_index: int | None = None) -> torch.Tensor:
    """Median-frequency balancing (Eigen and Fergus, 2015), as used by SegNet for CamVid.

    ``freq_c = (pixels of class c) / (pixels of the images in which c occurs)`` and
    ``w_c = median_c(freq_c) / freq_c``; ``ignore_index`` pixels are not counted, and classes that never occur
    get weight 0. Returns float64 weights (num_classes,).
    """
    if masks.ndim != 3 or masks.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise ValueError(f"median_frequency_weights needs integer masks (N, H, W), got {masks.dtype} "
                         f"{tuple(masks.shape)}")
    flat = masks.reshape(masks.shape[0], -1).long()
    valid = (flat >= 0) & (flat < num_classes)
    bad = ~valid if ignore_index is None else ~valid & (flat != ignore_index)
    if bool(bad.any()):
        raise ValueError(f"mask values {torch.unique(flat[bad])[:10].tolist()} outside 0..{num_classes - 1}")
    offsets = torch.arange(flat.shape[0], device=flat.device)[:, None] * num_classes
    counts = torch.bincount((flat + offsets)[valid], minlength=flat.shape[0] * num_classes)
    counts = counts.reshape(-1, num_classes).double()
    per_image = counts.sum(1, keepdim=True)
    present = counts > 0
    class_pixels = counts.sum(0)
    image_pixels = (per_image * present).sum(0)
    occurs = class_pixels > 0
    freq = torch.where(occurs, class_pixels / image_pixels.clamp_min(1), torch.zeros_like(class_pixels))
    median = freq[occurs].quantile(0.5) if bool(occurs.any()) else freq.new_tensor(0.0)
    return torch.where(occurs, median / freq.clamp_min(1e-300), torch.zeros_like(freq))
