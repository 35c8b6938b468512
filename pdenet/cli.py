"""The ``pdenet`` command: one subcommand per module under ``pdenet.commands``.

Each command module exposes ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``. Every
command takes ``--import MODULE`` (repeatable): the module is imported before the command line is read, so the
operators, schemes, configurations and data sets it registers are known to the command (and listed in its help).
The current directory is searched first, so ``--import my_additions`` finds ``./my_additions.py``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .allocator import keep_freed_memory

DESCRIPTION = ("Convolutional networks written as discretized PDEs: train a network, evaluate a checkpoint, compare "
               "costs, check stability, build the compiled CPU kernels. 'pdenet COMMAND --help' describes each.")
COMMANDS = ("train", "evaluate", "cost", "stability", "export", "kernels")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdenet", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"pdenet.commands.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.add_argument("--import", dest="_imports", action="append", default=[], metavar="MODULE",
                       help="import MODULE first (its register_* calls add operators, schemes, configurations "
                            "and data sets); repeatable")
        p.set_defaults(_run=module.run)
    return parser


def import_user_modules(argv: list[str]) -> None:
    """Import every ``--import MODULE`` of ``argv`` (current directory first on the search path)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--import", dest="imports", action="append", default=[])
    imports = pre.parse_known_args(argv)[0].imports
    if imports and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in imports:
        importlib.import_module(name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        import_user_modules(argv)
    except Exception as exc:  # the user's module: report what failed in one line, as for bad options
        print(f"pdenet: error: --import failed: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
