"""Where data sets are looked for on disk (nothing is ever downloaded).

``data_dir`` may be the data set's own folder (the one holding its files) or a folder containing it under
one of its usual names (``fashion-mnist``, ``cifar-10-batches-py``, ``CamVid``, ...). Without ``data_dir``
the roots searched are, in order: the folders in ``$PDENET_DATA`` (``os.pathsep``-separated),
``/usr/share/datasets`` (Debian's ``dataset-*`` packages) and ``../shared/data`` next to the project
checkout (the development copies).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

SYSTEM_ROOT = Path("/usr/share/datasets")
CHECKOUT_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def default_roots() -> list[Path]:
    """The folders searched for data sets when no ``data_dir`` is given."""
    env = [Path(p) for p in os.environ.get("PDENET_DATA", "").split(os.pathsep) if p]
    return [*env, SYSTEM_ROOT, CHECKOUT_ROOT]


def locate(title: str, data_dir: str | os.PathLike | None, folders: Sequence[str],
           is_match: Callable[[Path], bool], expected: str, how_to_get: str) -> Path:
    """The first candidate folder for which ``is_match`` holds, else ``FileNotFoundError``.

    Candidates are ``data_dir`` and ``data_dir/<folder>`` when ``data_dir`` is given, otherwise
    ``root/<folder>`` for each of :func:`default_roots`. The error lists the folders examined, the files
    expected and how to obtain them.
    """
    roots = [Path(data_dir).expanduser()] if data_dir is not None else default_roots()
    candidates = []
    for root in roots:
        if data_dir is not None:
            candidates.append(root)
        candidates.extend(root / f for f in folders)
    for path in candidates:
        if path.is_dir() and is_match(path):
            return path
    looked = "\n  ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"{title} not found. Looked in:\n  {looked}\nExpected {expected}.\n{how_to_get}")
