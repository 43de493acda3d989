"""Commands for living with a mount: ``prefetch``, ``cache ...`` and ``status``.

Each module's ``register(subparsers)`` adds its subcommand with a handler
``args.func(args) -> int`` that prints its own errors, so the ``scicatfs``
front end wires them all with :func:`register_all` and calls ``args.func``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from scicatfs.commands import cache, prefetch, status

__all__ = ["main", "register_all"]


def register_all(subparsers: Any) -> None:
    """Add ``prefetch``, ``cache`` and ``status`` to an argparse subparsers object."""
    for module in (prefetch, cache, status):
        module.register(subparsers)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one of these commands on its own (``python -m scicatfs.commands ...``)."""
    parser = argparse.ArgumentParser(prog="scicatfs")
    register_all(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return args.func(args)
