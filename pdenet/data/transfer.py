"""Copies from the host to the training device that do not make the host wait.

A copy from ordinary (pageable) host memory to a GPU blocks the host until the GPU has run everything queued before
it. From page-locked ("pinned") memory the copy is queued on the GPU like a kernel (``non_blocking=True``), and the
host goes on preparing the next batch while the GPU computes. So on CUDA devices every batch, and every small tensor
an augmentation sends along, comes from page-locked memory, copied without blocking; pdenet's loader gathers its
batches straight into page-locked buffers (from PyTorch's cache of pinned blocks, which hands a block out again only
after the copy that read it has finished). On other devices the copies are plain ones.
"""
from __future__ import annotations

import torch


def pinned_copies(device: str | torch.device) -> bool:
    """Whether copies to ``device`` go through page-locked host memory without blocking: on CUDA devices."""
    return torch.device(device).type == "cuda"


def to_device(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """``t`` on ``device``. A CPU tensor bound for a CUDA device is copied from page-locked memory without blocking
    (``t`` itself when it is pinned already, as a ``DataLoader(pin_memory=True)`` batch is)."""
    if pinned_copies(device) and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def gather(source: torch.Tensor, index: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """``source[index]`` (rows of a CPU tensor) on ``device``; for a CUDA device gathered into page-locked memory
    and copied from there without blocking."""
    pinned = pinned_copies(device)
    out = torch.empty((len(index), *source.shape[1:]), dtype=source.dtype, pin_memory=pinned)
    torch.index_select(source, 0, index, out=out)
    return out.to(device, non_blocking=pinned)
