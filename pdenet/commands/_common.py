"""Helpers shared by the ``pdenet`` commands: clean errors, threads, data and model loading, stability rows."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import torch


class CommandError(Exception):
    """A problem with the user's input (unknown name, missing file, conflicting options): one line, exit 2."""


def fail(command: str, exc: BaseException) -> int:
    """Print ``pdenet COMMAND: error: ...`` as one line on stderr (no traceback) and return exit code 2."""
    print(f"pdenet {command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
    return 2


def plural(count: int, noun: str) -> str:
    """``"1 thread"``, ``"2 threads"``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def set_threads(threads: int | None, dist=None) -> int:
    """Use ``threads`` torch CPU threads; default: the usable cores shared evenly by local processes."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size if dist is not None else 1))
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // max(local, 1))
    if threads < 1:
        raise CommandError(f"--threads must be a positive integer, got {threads}")
    torch.set_num_threads(threads)
    return threads


@contextmanager
def restored_threads():
    """Give torch its thread count back on exit (for commands run in-process: tests, notebooks); also a
    decorator, ``@restored_threads()``."""
    previous = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def load_split(name: str, split: str, data_dir: str | None):
    """``pdenet.data.load_dataset`` with its errors (unknown name, missing or corrupt files) as CommandError."""
    from ..data import load_dataset

    try:
        return load_dataset(name, split, data_dir)
    except (ValueError, OSError) as exc:
        raise CommandError(str(exc)) from None


def build_named_model(config: str, num_classes: int, in_channels: int, overrides: dict | None = None):
    """``pdenet.configs.build_model`` with unknown names and options as CommandError."""
    from ..configs import build_model

    try:
        return build_model(config, num_classes=num_classes, in_channels=in_channels, **(overrides or {}))
    except (ValueError, TypeError) as exc:
        raise CommandError(str(exc)) from None


def parse_override_args(items) -> dict:
    """``["nt=2", "h=0.5"]`` -> ``{"nt": 2, "h": 0.5}`` (see ``pdenet.configs.parse_overrides``)."""
    from ..configs import parse_overrides

    try:
        return parse_overrides(items or [])
    except ValueError as exc:
        raise CommandError(str(exc)) from None
