"""Building, caching and loading the compiled kernels (``csrc/``) with the machine's C compiler.

The C sources are compiled together into one shared library with ``cc -O3 -march=native -fopenmp`` (``$CC``
overrides the compiler) into ``cache_dir()``, named by a hash of the sources, the flags, the compiler and the
processor, so that a library is built once per machine and processor and rebuilt when a source changes. The build
writes a temporary file and renames it, so concurrent builds (several ``torchrun`` ranks) never load a partial
library. No torch headers are involved: the kernels see plain pointers, and a build takes a few seconds with
nothing but a C compiler. ``PDENET_NATIVE=0`` switches the kernels off.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE_DIR = Path(__file__).with_name("csrc")
SOURCES = ("common.c", "lean.c", "chain.c", "batch_norm.c")
HEADERS = ("kernels.h",)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=gnu11", "-shared", "-fPIC")


class KernelsUnavailable(RuntimeError):
    """The compiled kernels cannot be used here; the message says why."""


def cache_dir() -> Path:
    """Where the compiled library lives: ``$PDENET_CACHE_DIR``, else ``$XDG_CACHE_HOME/pdenet``, else
    ``~/.cache/pdenet``."""
    if os.environ.get("PDENET_CACHE_DIR"):
        return Path(os.environ["PDENET_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pdenet"


def _processor() -> str:
    """The processor model and its instruction-set flags (``-march=native`` makes the library specific to them)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def compiler() -> str:
    """The C compiler: ``$CC``, else ``cc`` or ``gcc`` on the path; ``KernelsUnavailable`` if there is none."""
    found = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not found:
        raise KernelsUnavailable("no C compiler found (install gcc or set CC)")
    return found


def library_path(cc: str, source_dir: Path = SOURCE_DIR, flags: tuple[str, ...] = FLAGS) -> Path:
    """The cached library's path for these sources, flags, compiler and processor (built or not)."""
    parts = [(source_dir / name).read_bytes() for name in (*SOURCES, *HEADERS)]
    key = hashlib.sha256(b"\0".join([*parts, " ".join(flags).encode(), cc.encode(), platform.machine().encode(),
                                     _processor().encode()])).hexdigest()[:16]
    return cache_dir() / f"pdenet_kernels-{key}.so"


def build(cc: str | None = None, source_dir: Path = SOURCE_DIR, flags: tuple[str, ...] = FLAGS) -> Path:
    """Compile the kernels unless the cache holds them; return the library's path. ``KernelsUnavailable`` names
    why not: disabled by ``PDENET_NATIVE=0``, no compiler, an unwritable cache, or the compiler's own errors."""
    if os.environ.get("PDENET_NATIVE", "1") == "0":
        raise KernelsUnavailable("disabled by PDENET_NATIVE=0")
    cc = cc or compiler()
    target = library_path(cc, source_dir, flags)
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    except OSError as err:
        raise KernelsUnavailable(f"cannot write the kernel cache {target.parent} ({err}); set PDENET_CACHE_DIR")
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, f"-I{source_dir}", "-o", partial,
                               *(str(source_dir / name) for name in SOURCES)],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise KernelsUnavailable(f"{cc} failed: {done.stderr.strip()[-2000:]}")
        os.replace(partial, target)  # atomic: a concurrent build writes the same file
    except (OSError, subprocess.SubprocessError) as err:
        raise KernelsUnavailable(f"{cc} could not run: {err}") from err
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def load(path: Path) -> ctypes.CDLL:
    """The library at ``path``, loaded."""
    try:
        return ctypes.CDLL(str(path))
    except OSError as err:
        raise KernelsUnavailable(f"cannot load {path}: {err}") from err
