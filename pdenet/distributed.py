"""Multi-process data-parallel training with ``torchrun`` (DistributedDataParallel).

``init_distributed()`` reads the variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) and joins the process group with NCCL on GPUs and gloo on CPUs; without
them it returns a single-process context, so the same training code runs either way.

Equivalence with one process: each of the ``W`` ranks gets ``B/W`` samples of every global batch of ``B``,
computes the mean loss over them, and DDP averages the gradients, which is the gradient of the mean loss over
the global batch. Batch normalization must then use the statistics of the global batch too: ``sync_batchnorm``
converts ``nn.BatchNorm2d`` layers (``torch.nn.SyncBatchNorm`` on GPUs; ``GlobalBatchNorm2d`` below on CPUs,
where PyTorch's SyncBatchNorm is not implemented).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    """Where this process sits in the job: ``rank`` of ``world_size``, and its ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in place (no-op with one process)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` with global-batch normalization inside ``DistributedDataParallel`` (multi-process only)."""
        if not self.enabled:
            return model
        model = sync_batchnorm(model)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when a GPU is present, else ``cpu``; or the device named."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; expected 'auto', 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: str = "auto") -> DistContext:
    """Join the ``torchrun`` process group if the environment describes one, else a 1-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not 0 <= rank < world_size:
        raise ValueError(f"inconsistent environment: RANK={rank} with WORLD_SIZE={world_size}")
    dev = resolve_device(device, local_rank)
    if world_size > 1:
        if not dist.is_available():
            raise RuntimeError("this PyTorch build has no torch.distributed support")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://",
                                    rank=rank, world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


class _AllReduceSum(torch.autograd.Function):
    """``y = Σ_r x_r`` on every rank; the adjoint of a sum all-reduce is a sum all-reduce of the gradients."""

    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are those of the global batch over all ranks.

    Notes
    -----
    With ``x_r`` of shape ``(B_r, C, H, W)`` on rank ``r`` and ``N = Σ_r B_r H W``:
    ``μ = Σ_r Σ x_r / N``, ``σ² = Σ_r Σ (x_r − μ)² / N`` (two differentiable all-reduces, two passes for
    accuracy), ``y = γ (x − μ)/√(σ² + ε) + β``; running statistics use ``σ² N/(N−1)`` like BatchNorm. The
    backward of a sum all-reduce is a sum all-reduce, so gradients are those of the global-batch layer. Works
    on any device and backend; outside training or without a process group it is plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        self._check_input_dim(x)
        c = x.shape[1]
        local = torch.cat([x.sum(dim=(0, 2, 3)), x.new_full((1,), x.numel() // c)])
        total = all_reduce(local)
        n = total[-1].detach()
        mean = total[:c] / n
        xc = x - mean.view(1, c, 1, 1)
        var = all_reduce((xc * xc).sum(dim=(0, 2, 3))) / n
        y = xc * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * (n / (n - 1).clamp(min=1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        return y


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` by a global-batch version (states and devices preserved)."""
    first = next(model.parameters(), None)
    if first is not None and first.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            tensors = [t for t in (*child.parameters(), *child.buffers()) if t.is_floating_point()]
            factory = {"device": tensors[0].device, "dtype": tensors[0].dtype} if tensors else {}
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats, **factory)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            if child.affine:
                new.weight.requires_grad_(child.weight.requires_grad)
                new.bias.requires_grad_(child.bias.requires_grad)
            setattr(model, name, new)
        else:
            sync_batchnorm(child)
    return model
