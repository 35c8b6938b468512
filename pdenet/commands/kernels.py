"""``pdenet kernels``: build the compiled CPU kernels ahead of their first use, or say which path runs and why."""
from __future__ import annotations

import argparse

from ._common import fail

HELP = "build the compiled CPU kernels now (--build), or show whether they are in use and why (--status)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    action = p.add_mutually_exclusive_group()
    action.add_argument("--build", action="store_true",
                        help="compile the kernels into the cache unless they are there, then check them")
    action.add_argument("--status", action="store_true", help="say where the kernels come from (the default)")


def run(args: argparse.Namespace) -> int:
    import pdenet_kernels
    from pdenet_kernels import build

    if args.build:
        try:
            path = build.build()
        except build.KernelsUnavailable as err:
            return fail("kernels", err)
        print(f"built: {path}")
    print(f"status: {pdenet_kernels.status()}")
    print(f"cache: {build.cache_dir()} (PDENET_CACHE_DIR)")
    if not pdenet_kernels.available():
        print("PyTorch's operations run instead of the compiled kernels")
        return 1 if args.build else 0
    print(f"register block: {pdenet_kernels.block_channels()} channels")
    return 0
