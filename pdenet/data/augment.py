"""Batch augmentation in torch: random crop with padding and horizontal flip, joint for image and mask.

Everything acts on whole batches with one gather, no loop over images. For a batch ``x`` of shape
``(B, C, H, W)`` (or masks ``(B, H, W)``), padding ``p`` and crop size ``(h, w)``::

    xp = x padded by p on every side with `fill`
    out[b, ..., i, j] = xp[b, ..., top[b] + i, left[b] + j']     j' = w - 1 - j if flip[b] else j

with ``0 <= top[b] <= H + 2p - h`` and ``0 <= left[b] <= W + 2p - w``. With ``h, w = H, W`` this is a random
shift by ``(top - p, left - p)`` with zeros shifted in (the standard CIFAR augmentation). Images and masks
given together get the same ``top``, ``left`` and ``flip`` (masks padded with the ignore label), so they
stay aligned. The parameters are drawn on the CPU from a ``torch.Generator``, so they are reproducible
and independent of the device the images live on.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


class CropFlip(NamedTuple):
    """Per-sample augmentation parameters: crop corners ``top``, ``left`` (B,) int64 and ``flip`` (B,) bool."""

    top: torch.Tensor
    left: torch.Tensor
    flip: torch.Tensor

    def select(self, index) -> CropFlip:
        """The parameters of the samples at ``index`` (a slice or index tensor)."""
        return CropFlip(self.top[index], self.left[index], self.flip[index])


def crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: tuple[int, int], padding: int = 0,
         fill: float = 0, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample crop (and optional horizontal flip) of a batch, see the module docstring.

    ``x``: (B, C, H, W) or (B, H, W); ``top``, ``left``: (B,) integers; ``flip``: (B,) bool or None.
    Returns a contiguous tensor (B, C, h, w) or (B, h, w) of ``x``'s dtype on ``x``'s device.
    """
    if x.ndim not in (3, 4):
        raise ValueError(f"crop expects a batch (B, C, H, W) or (B, H, W), got shape {tuple(x.shape)}")
    b = x.shape[0]
    h, w = size
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if not (0 < h <= x.shape[-2] + 2 * padding and 0 < w <= x.shape[-1] + 2 * padding):
        raise ValueError(f"crop size {h}x{w} does not fit images {x.shape[-2]}x{x.shape[-1]} padded by {padding}")
    for name, t in (("top", top), ("left", left)) + ((("flip", flip),) if flip is not None else ()):
        if t.shape != (b,):
            raise ValueError(f"{name} must have shape ({b},), got {tuple(t.shape)}")
    span_h, span_w = x.shape[-2] + 2 * padding - h, x.shape[-1] + 2 * padding - w
    if b and (int(top.min()) < 0 or int(top.max()) > span_h or int(left.min()) < 0 or int(left.max()) > span_w):
        raise ValueError(f"crop corners outside the padded images: need 0 <= top <= {span_h}, 0 <= left <= {span_w}")
    device = x.device
    xp = F.pad(x, (padding,) * 4, value=fill) if padding else x
    c, wp = (x.shape[1] if x.ndim == 4 else 1), x.shape[-1] + 2 * padding
    xp = xp.reshape(b, c, xp.shape[-2] * wp)
    j = torch.arange(w, device=device)
    if flip is not None:
        j = torch.where(flip.to(device)[:, None], w - 1 - j, j)
    rows = top.to(device)[:, None, None] + torch.arange(h, device=device)[None, :, None]
    cols = (left.to(device)[:, None] + j)[:, None, :]
    flat = (rows * wp + cols).reshape(b, 1, h * w).expand(b, c, h * w)
    return xp.gather(2, flat).reshape(*x.shape[:-2], h, w)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32,
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """``(x / 255 - mean_c) / std_c`` for uint8 images (B, C, H, W), as ``dtype`` in ``memory_format``."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"normalize expects uint8 images (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if len(mean) != images.shape[1] or len(std) != images.shape[1]:
        raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} need one entry per channel ({images.shape[1]})")
    m = torch.tensor(mean, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    out = images.to(dtype=dtype, memory_format=memory_format)
    return out.mul_(1 / (255 * s)).sub_(m / s)


@dataclass(frozen=True)
class Augmentation:
    """Random crop of size ``size`` (default: the input size) after zero padding by ``padding``, and a
    horizontal flip with probability 1/2 when ``flip``; applied jointly to images and masks."""

    padding: int = 0
    flip: bool = False
    size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.padding, int) or self.padding < 0:
            raise ValueError(f"Augmentation padding must be an int >= 0, got {self.padding!r}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) <= 0):
            raise ValueError(f"Augmentation size must be (h, w) with positive entries, got {self.size!r}")

    @classmethod
    def for_dataset(cls, dataset, flip: bool | None = None) -> Augmentation:
        """The data set's standard augmentation (its ``crop_padding`` and ``hflip``; ``flip`` overrides)."""
        return cls(padding=dataset.crop_padding, flip=dataset.hflip if flip is None else flip)

    def output_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return tuple(self.size) if self.size is not None else tuple(image_size)

    def is_identity(self, image_size: tuple[int, int]) -> bool:
        return not self.flip and self.padding == 0 and self.output_size(image_size) == tuple(image_size)

    def sample(self, n: int, image_size: tuple[int, int], generator: torch.Generator | None = None) -> CropFlip:
        """Parameters for ``n`` images of size ``image_size`` = (H, W), drawn on the CPU from ``generator``."""
        h, w = self.output_size(image_size)
        span_h, span_w = image_size[0] + 2 * self.padding - h, image_size[1] + 2 * self.padding - w
        if span_h < 0 or span_w < 0:
            raise ValueError(f"crop size {h}x{w} larger than images {image_size[0]}x{image_size[1]} "
                             f"padded by {self.padding}")
        top = torch.randint(span_h + 1, (n,), generator=generator)
        left = torch.randint(span_w + 1, (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < 0.5
        return CropFlip(top, left, flip if self.flip else torch.zeros_like(flip))

    def apply(self, images: torch.Tensor, params: CropFlip, masks: torch.Tensor | None = None,
              mask_fill: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Crop/flip ``images`` (B, C, H, W) and, identically, ``masks`` (B, H, W) padded with ``mask_fill``."""
        image_size = tuple(images.shape[-2:])
        if masks is not None and (masks.ndim != 3 or masks.shape[0] != images.shape[0]
                                  or tuple(masks.shape[-2:]) != image_size):
            raise ValueError(f"masks of shape {tuple(masks.shape)} do not match images {tuple(images.shape)}")
        if self.is_identity(image_size):
            return images, masks
        size = self.output_size(image_size)
        out = crop(images, params.top, params.left, size, self.padding, 0, params.flip)
        if masks is not None:
            if self.padding and mask_fill is None:
                raise ValueError("padding masks needs a fill label (the ignore index); pass mask_fill")
            masks = crop(masks, params.top, params.left, size, self.padding, mask_fill or 0, params.flip)
        return out, masks

    def __call__(self, images: torch.Tensor, masks: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, mask_fill: int | None = None):
        """Sample parameters for the batch and apply them; returns ``(images, masks)``."""
        return self.apply(images, self.sample(images.shape[0], tuple(images.shape[-2:]), generator), masks, mask_fill)
