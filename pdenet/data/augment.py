"""Batch augmentation in torch: colour jitter, zoom, random crop with padding and horizontal flip, joint
for image and mask.

Everything acts on whole batches, no loop over images. In order, for uint8 images ``x`` of shape
``(B, C, H, W)`` (and masks ``(B, H, W)``):

1. colour jitter of strength ``j`` (images only), with ``μ_b`` the mean of image ``b``::

       x'[b, c] = clamp(g[b, c] (μ_b + κ_b (x[b, c] − μ_b)), 0, 255)    κ_b ~ U(1−j, 1+j) (contrast)
       g[b, c] = β_b γ[b, c]        β_b ~ U(1−j, 1+j) (brightness),   γ[b, c] ~ U(1−j/2, 1+j/2) (colour)

2. zoom of range ``z`` about the image centre: ``out(q) = in(centre + (q − centre)/ζ_b)`` with
   ``ζ_b ~ U(1−z, 1+z)`` (one ``grid_sample``: bilinear for images, nearest for masks; what comes in from
   outside is 0 in the image and the ignore label in the mask);

3. crop and flip, with one gather. For padding ``p`` and crop size ``(h, w)``::

    xp = x padded by p on every side with `fill`
    out[b, ..., i, j] = xp[b, ..., top[b] + i, left[b] + j']     j' = w - 1 - j if flip[b] else j

with ``0 <= top[b] <= H + 2p - h`` and ``0 <= left[b] <= W + 2p - w``. With ``h, w = H, W`` this is a random
shift by ``(top - p, left - p)`` with zeros shifted in (the standard CIFAR augmentation). Images and masks
given together get the same ``top``, ``left`` and ``flip`` (masks padded with the ignore label), so they
stay aligned. The parameters are drawn on the CPU from a ``torch.Generator``, so they are reproducible
and independent of the device the images live on; they reach a CUDA device from page-locked memory without
blocking (:func:`pdenet.data.transfer.to_device`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .transfer import to_device


class AugmentParams(NamedTuple):
    """Per-sample augmentation parameters: crop corners ``top``, ``left`` (B,) int64, ``flip`` (B,) bool and,
    when enabled, ``zoom`` ζ (B,), ``contrast`` κ (B,) and ``gain`` g (B, C) float (see the module docstring)."""

    top: torch.Tensor
    left: torch.Tensor
    flip: torch.Tensor
    zoom: torch.Tensor | None = None
    contrast: torch.Tensor | None = None
    gain: torch.Tensor | None = None

    def select(self, index) -> AugmentParams:
        """The parameters of the samples at ``index`` (a slice or index tensor)."""
        return AugmentParams(*(None if t is None else t[index] for t in self))


def color_jitter(x: torch.Tensor, contrast: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """``clamp(g[b, c] (μ_b + κ_b (x[b, c] − μ_b)), 0, 255)`` for uint8 images ``x`` (B, C, H, W), contrast κ
    (B,) and gains g (B, C); ``μ_b`` is the mean of image ``b``. Returns uint8 (B, C, H, W), rounded."""
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"color_jitter expects uint8 images (B, C, H, W), got {x.dtype} {tuple(x.shape)}")
    if contrast.shape != x.shape[:1] or gain.shape != x.shape[:2]:
        raise ValueError(f"contrast {tuple(contrast.shape)} and gain {tuple(gain.shape)} must have shapes "
                         f"({x.shape[0]},) and {tuple(x.shape[:2])}")
    f = x.float()
    mean = f.mean(dim=(1, 2, 3), keepdim=True)
    kappa = to_device(contrast, f.device).to(f.dtype).view(-1, 1, 1, 1)
    g = to_device(gain, f.device).to(f.dtype)[:, :, None, None]
    return (g * (mean + kappa * (f - mean))).round_().clamp_(0, 255).to(torch.uint8)


def zoom(x: torch.Tensor, factor: torch.Tensor, fill: float = 0) -> torch.Tensor:
    """``out[b](q) = x[b](centre + (q − centre)/factor[b])`` for images (B, C, H, W) (bilinear, result in
    ``x``'s dtype, rounded for integers) or masks (B, H, W) (nearest); outside points give ``fill``."""
    if x.ndim not in (3, 4):
        raise ValueError(f"zoom expects a batch (B, C, H, W) or (B, H, W), got shape {tuple(x.shape)}")
    if factor.shape != x.shape[:1] or not bool((factor > 0).all()):
        raise ValueError(f"zoom factors must be positive with shape ({x.shape[0]},), got {tuple(factor.shape)}")
    mask = x.ndim == 3
    f = (x[:, None] if mask else x).float()
    inverse = 1 / to_device(factor, x.device).to(f.dtype)
    theta = torch.zeros(x.shape[0], 2, 3, dtype=f.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = inverse
    grid = F.affine_grid(theta, list(f.shape), align_corners=False)
    # sample x − fill with zeros outside, then add fill back: outside points get exactly ``fill``
    out = F.grid_sample(f - fill, grid, mode="nearest" if mask else "bilinear", padding_mode="zeros",
                        align_corners=False) + fill
    out = out[:, 0] if mask else out
    return out if x.is_floating_point() else out.round_().to(x.dtype)


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
        j = torch.where(to_device(flip, device)[:, None], w - 1 - j, j)
    rows = to_device(top, device)[:, None, None] + torch.arange(h, device=device)[None, :, None]
    cols = (to_device(left, device)[:, None] + j)[:, None, :]
    flat = (rows * wp + cols).reshape(b, 1, h * w).expand(b, c, h * w)
    return xp.gather(2, flat).reshape(*x.shape[:-2], h, w)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32,
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """``(x / 255 - mean_c) / std_c`` for uint8 images (B, C, H, W), as ``dtype`` in ``memory_format``."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"normalize expects uint8 images (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if len(mean) != images.shape[1] or len(std) != images.shape[1]:
        raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} need one entry per channel ({images.shape[1]})")
    m = to_device(torch.tensor(mean, dtype=dtype), images.device).view(1, -1, 1, 1)
    s = to_device(torch.tensor(std, dtype=dtype), images.device).view(1, -1, 1, 1)
    out = images.to(dtype=dtype, memory_format=memory_format)
    return out.mul_(1 / (255 * s)).sub_(m / s)


@dataclass(frozen=True)
class Augmentation:
    """Colour jitter of strength ``jitter``, zoom by ``U(1−zoom, 1+zoom)``, random crop of size ``size``
    (default: the input size) after zero padding by ``padding``, and a horizontal flip with probability 1/2
    when ``flip``; geometry applied jointly to images and masks (see the module docstring)."""

    padding: int = 0
    flip: bool = False
    size: tuple[int, int] | None = None
    zoom: float = 0.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.padding, int) or self.padding < 0:
            raise ValueError(f"Augmentation padding must be an int >= 0, got {self.padding!r}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) <= 0):
            raise ValueError(f"Augmentation size must be (h, w) with positive entries, got {self.size!r}")
        for name in ("zoom", "jitter"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"Augmentation {name} must be a number in [0, 1), got {value!r}")

    @classmethod
    def for_dataset(cls, dataset, flip: bool | None = None, zoom: float | None = None,
                    jitter: float | None = None) -> Augmentation:
        """The data set's standard augmentation (its ``crop_padding``, ``hflip``, ``zoom_range`` and
        ``color_jitter``); ``flip``, ``zoom`` and ``jitter`` override."""
        return cls(padding=dataset.crop_padding, flip=dataset.hflip if flip is None else flip,
                   zoom=dataset.zoom_range if zoom is None else zoom,
                   jitter=dataset.color_jitter if jitter is None else jitter)

    def output_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return tuple(self.size) if self.size is not None else tuple(image_size)

    def is_identity(self, image_size: tuple[int, int]) -> bool:
        return (not self.flip and self.padding == 0 and self.zoom == 0 and self.jitter == 0
                and self.output_size(image_size) == tuple(image_size))

    def sample(self, n: int, image_size: tuple[int, int], generator: torch.Generator | None = None,
               channels: int = 3) -> AugmentParams:
        """Parameters for ``n`` images of ``channels`` channels and size ``image_size`` = (H, W), drawn on the
        CPU from ``generator`` (crop and flip first, so they do not depend on ``zoom`` and ``jitter``)."""
        h, w = self.output_size(image_size)
        span_h, span_w = image_size[0] + 2 * self.padding - h, image_size[1] + 2 * self.padding - w
        if span_h < 0 or span_w < 0:
            raise ValueError(f"crop size {h}x{w} larger than images {image_size[0]}x{image_size[1]} "
                             f"padded by {self.padding}")
        top = torch.randint(span_h + 1, (n,), generator=generator)
        left = torch.randint(span_w + 1, (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < 0.5

        def uniform(shape, amplitude):
            return 1 + amplitude * (2 * torch.rand(shape, generator=generator, dtype=torch.float64) - 1)

        factor = uniform(n, self.zoom) if self.zoom else None
        contrast, gain = None, None
        if self.jitter:
            contrast = uniform(n, self.jitter)
            gain = uniform((n, 1), self.jitter) * uniform((n, channels), self.jitter / 2)
        return AugmentParams(top, left, flip if self.flip else torch.zeros_like(flip), factor, contrast, gain)

    def apply(self, images: torch.Tensor, params: AugmentParams, masks: torch.Tensor | None = None,
              mask_fill: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Jitter, zoom and crop/flip uint8 ``images`` (B, C, H, W) and, with the same geometry, ``masks``
        (B, H, W), whose points from outside the image get ``mask_fill``."""
        image_size = tuple(images.shape[-2:])
        if masks is not None and (masks.ndim != 3 or masks.shape[0] != images.shape[0]
                                  or tuple(masks.shape[-2:]) != image_size):
            raise ValueError(f"masks of shape {tuple(masks.shape)} do not match images {tuple(images.shape)}")
        if self.is_identity(image_size):
            return images, masks
        if masks is not None and (self.padding or self.zoom) and mask_fill is None:
            raise ValueError("padding or zooming masks needs a fill label (the ignore index); pass mask_fill")
        if self.jitter:
            images = color_jitter(images, params.contrast, params.gain)
        if self.zoom:
            images = zoom(images, params.zoom)
            masks = None if masks is None else zoom(masks, params.zoom, mask_fill)
        size = self.output_size(image_size)
        out = crop(images, params.top, params.left, size, self.padding, 0, params.flip)
        if masks is not None:
            masks = crop(masks, params.top, params.left, size, self.padding, mask_fill or 0, params.flip)
        return out, masks

    def __call__(self, images: torch.Tensor, masks: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, mask_fill: int | None = None):
        """Sample parameters for the batch and apply them; returns ``(images, masks)``."""
        params = self.sample(images.shape[0], tuple(images.shape[-2:]), generator, images.shape[1])
        return self.apply(images, params, masks, mask_fill)
