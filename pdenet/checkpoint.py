"""Checkpoints: atomic writes, exact resume, and rebuilding a trained model from its file.

A checkpoint is a dict saved with ``torch.save``::

    {"format": "pdenet-checkpoint", "version": 1, "epoch": int,      # epochs completed
     "model": state_dict, "optimizer": state_dict, "scheduler": state_dict,
     "scaler": state_dict or None,                                   # the fp16 gradient scaler's
     "rng": {"python", "numpy", "torch", "cuda"},                     # generator states after ``epoch``
     "history": [per-epoch metric dicts],
     "position": None or {"batch", "state", "images", "time"},         # inside the next epoch (mid-epoch saves)
     "meta": {"config": str, "overrides": dict, "num_classes": int, "in_channels": int, ...}}

It holds only tensors, numbers, strings and containers of them, so it loads with ``weights_only=True``.
``meta`` carries what ``pdenet.configs.build_model`` needs to rebuild the network, plus the run settings.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT = "pdenet-checkpoint"
VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper, else ``model``."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def _atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(f)`` on a temp file next to ``path``, fsync it, and ``os.replace`` it onto ``path``.

    Readers see either the previous file or the complete new one, never a partial write; if writing fails
    the previous file is left untouched and the temp file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temp file in the same directory, fsync, ``os.replace``)."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically, like ``atomic_save``."""
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state() -> dict:
    """States of Python's, NumPy's, torch's CPU and (when present) CUDA generators."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generators saved by ``rng_state``."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer=None, scheduler=None, scaler=None,
                    epoch: int, meta: dict, history: list[dict] | None = None, position: dict | None = None) -> Path:
    """Write a checkpoint of a run after ``epoch`` completed epochs (atomically, see ``atomic_save``); ``position``
    is the trainer's place inside the next epoch where it saves mid-epoch (``None`` at an epoch's end)."""
    for key in ("config", "num_classes", "in_channels"):
        if key not in meta:
            raise ValueError(f"checkpoint meta must contain {key!r} to rebuild the model; got keys {sorted(meta)}")
    obj = {
        "format": FORMAT,
        "version": VERSION,
        "epoch": int(epoch),
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        "history": list(history or []),
        "position": position,
        "meta": dict(meta),
    }
    return atomic_save(obj, path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read and validate a checkpoint written by ``save_checkpoint``."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated or foreign files: say which file and why
        raise ValueError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pdenet checkpoint (missing format tag {FORMAT!r})")
    if obj.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {obj.get('version')!r} (expected {VERSION})")
    return obj


def restore(checkpoint: dict, *, model: nn.Module, optimizer=None, scheduler=None, scaler=None,
            rng: bool = True) -> int:
    """Load a checkpoint's states into live objects (a gradient scaler's where the checkpoint has one); returns the
    number of completed epochs."""
    unwrap(model).load_state_dict(checkpoint["model"])
    if optimizer is not None and checkpoint["optimizer"] is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    if scheduler is not None and checkpoint["scheduler"] is not None:
        scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler is not None and checkpoint.get("scaler") is not None:
        scaler.load_state_dict(checkpoint["scaler"])
    if rng:
        set_rng_state(checkpoint["rng"])
    return int(checkpoint["epoch"])


WEIGHTS_NAME = "weights.safetensors"
WEIGHTS_META = ("config", "overrides", "num_classes", "in_channels", "input_shape", "task", "data", "epoch")


def save_weights(path: str | os.PathLike, model: nn.Module, meta: dict) -> Path:
    """The model's ``state_dict`` in the safetensors format (atomically), with what rebuilds the network (``meta``'s
    config, overrides, classes, channels, task, data set and epoch) as JSON under the header key ``"pdenet"``: a
    file that other tools read and that ``build_model(...).load_state_dict(safetensors.torch.load_file(path))``
    or ``load_model(path)`` loads."""
    from safetensors.torch import save

    tensors = {name: t.detach().cpu().contiguous() for name, t in unwrap(model).state_dict().items()}
    header = {"pdenet": json.dumps({k: meta[k] for k in WEIGHTS_META if k in meta})}
    return _atomic_write(path, lambda f: f.write(save(tensors, metadata=header)))


def load_weights(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(state_dict, meta)`` of a file written by ``save_weights``; ``ValueError`` for another or a corrupt file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get("pdenet")
            state = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors' own error type for a damaged file
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None
    if header is None:
        raise ValueError(f"{path} holds no pdenet metadata (it was not written by pdenet); load its tensors with "
                         "safetensors.torch.load_file into a model you build yourself")
    return state, json.loads(header)


def load_model(path: str | os.PathLike, map_location="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the network saved in a checkpoint or a ``.safetensors`` weights file: ``(model in eval mode,
    meta)``.

    The model comes from ``pdenet.configs.build_model(meta["config"], num_classes, in_channels,
    **meta["overrides"])`` with the saved weights loaded strictly.
    """
    from .configs import build_model

    if Path(path).suffix == ".safetensors":
        state, meta = load_weights(path)
        ckpt = {"model": state, "meta": meta, "epoch": meta.get("epoch"), "history": []}
    else:
        ckpt = load_checkpoint(path, map_location=map_location)
    meta = ckpt["meta"]
    model = build_model(meta["config"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
                        **meta.get("overrides", {}))
    model.load_state_dict(ckpt["model"])
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    return model.eval(), {**meta, "epoch": ckpt["epoch"], "history": ckpt["history"]}


def prepare_output_dir(out: str | os.PathLike, resume: bool) -> Path:
    """Check the output directory of a run: never overwrite an existing run silently.

    ``resume=False``: ``out`` must not exist or be empty (it is created). ``resume=True``: ``out`` must hold
    a checkpoint to continue from, or the ``settings.json`` of a run that stopped before its first checkpoint.
    """
    out = Path(out)
    if resume:
        if not (out / CHECKPOINT_NAME).is_file() and not (out / "settings.json").is_file():
            raise FileNotFoundError(f"cannot resume: {out / CHECKPOINT_NAME} does not exist")
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output directory {out} already exists and is not empty; "
                              f"use --resume to continue that run or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out
