"""pdenet's compiled CPU kernels and the PyTorch operators they implement.

The layer below ``operators`` and ``pdenet`` (it imports neither): C sources in ``csrc/`` (the lean operator
``y = P x + S x`` and its backward in one pass each, batch norm with ReLU in two passes each way), built with the
machine's C compiler on first use or by ``pdenet kernels --build`` (``build``), loaded and checked against numpy
(``binding``, ``self_check``), and registered as ``torch.ops.pdenet.*`` operators with fake implementations,
autograd and FLOP formulas (``ops``). ``status()`` says which path runs and why.
"""
from .binding import available, block_channels, status
from .build import KernelsUnavailable, cache_dir
from .ops import (batch_norm_relu, fused_kernels_apply, lean_conv, lean_conv_reference, lean_kernel_applies,
                  stencil_as_kernel)

__all__ = ["available", "block_channels", "status", "KernelsUnavailable", "cache_dir", "batch_norm_relu",
           "fused_kernels_apply", "lean_conv", "lean_conv_reference", "lean_kernel_applies", "stencil_as_kernel"]
