"""A trained model out of Python: ONNX, a ``torch.export`` program (``.pt2``) or its weights (safetensors).

Each export starts from a copy of the model in eval mode with its batch norms folded (``fuse(model,
inference=True)``), so the exported network is the one that runs fastest here, and equals the eval-mode model.

- **ONNX** (``torch.onnx.export`` of the ``torch.export`` program): pdenet's operators are first decomposed into
  PyTorch's own (``decompositions``): a lean layer becomes a 1x1 ``Conv`` plus a depthwise ``Conv`` and an
  ``Add`` (its bias, residual and ``Relu`` after them), so any ONNX runtime runs the file without pdenet.
  Needs the optional packages ``onnx`` and ``onnxscript`` (``pip install 'pdenet[onnx]'``, which also installs
  ``onnxruntime`` to check the file).
- **pt2** (``torch.export.save``): the program keeps pdenet's registered operators (``torch.ops.pdenet.*``),
  so loading it with ``torch.export.load`` needs ``import pdenet_kernels`` first; it then runs on the compiled
  kernels.
- **safetensors**: the trained weights alone (not folded), as ``pdenet.checkpoint.save_weights`` writes them.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from pdenet_kernels.ops import (lean_conv_affine_reference, lean_conv_reference, residual_block_inference_reference,
                                residual_chain_inference_reference)

from .fusion import FusionReport, fuse

FORMATS = ("onnx", "pt2", "safetensors")


def decompositions() -> dict:
    """pdenet's registered inference operators written with PyTorch's operations, for
    ``ExportedProgram.run_decompositions``."""
    return {torch.ops.pdenet.lean_conv.default: lean_conv_reference,
            torch.ops.pdenet.lean_conv_affine.default: lean_conv_affine_reference,
            torch.ops.pdenet.residual_block_inference.default: residual_block_inference_reference,
            torch.ops.pdenet.residual_chain_inference.default: residual_chain_inference_reference}


def inference_copy(model: nn.Module) -> tuple[nn.Module, FusionReport]:
    """A copy of ``model`` in eval mode on the CPU with its batch norms folded, and the fusion report."""
    folded = copy.deepcopy(model).cpu().eval()
    return folded, fuse(folded, inference=True)


def export_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of the inference copy of ``model`` for inputs like ``example`` and any batch size,
    gradients off."""
    folded, _ = inference_copy(model)
    example = _batched(example)
    batch = torch.export.Dim("batch", min=1, max=2 ** 20)
    with torch.no_grad():
        return torch.export.export(folded, (example,), dynamic_shapes=({0: batch},))


def _batched(example: torch.Tensor) -> torch.Tensor:
    """``example`` on the CPU with a batch of at least 2 (``torch.export`` specializes a batch of 1)."""
    if example.dim() != 4:
        raise ValueError(f"the example input must be 4-D (batch, channels, n1, n2), got shape {tuple(example.shape)}")
    example = example.detach().cpu()
    return example if example.shape[0] > 1 else example.expand(2, *example.shape[1:]).contiguous()


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write ``model`` (its inference copy) as an ONNX file of standard operators (see the module notes)."""
    missing = [name for name in ("onnx", "onnxscript") if not _importable(name)]
    if missing:
        raise RuntimeError(f"ONNX export needs the optional package{'s' if len(missing) > 1 else ''} "
                           f"{' and '.join(missing)}: pip install 'pdenet[onnx]'")
    program = export_program(model, example).run_decompositions(decompositions())
    path = Path(path)
    onnx_program = torch.onnx.export(program, (_batched(example),), dynamo=True, verbose=False)
    onnx_program.save(str(path))
    return path


def export_pt2(model: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write ``model``'s inference copy as a ``torch.export`` program (load it after ``import pdenet_kernels``)."""
    path = Path(path)
    torch.export.save(export_program(model, example), str(path))
    return path


def run_onnx(path: str | os.PathLike, example: torch.Tensor):
    """The ONNX file's output on ``example`` in onnxruntime (CPU), as a numpy array."""
    if not _importable("onnxruntime"):
        raise RuntimeError("running an ONNX file needs the optional package onnxruntime: pip install 'pdenet[onnx]'")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: example.cpu().numpy()})[0]


def _importable(name: str) -> bool:
    from importlib.util import find_spec

    return find_spec(name) is not None
