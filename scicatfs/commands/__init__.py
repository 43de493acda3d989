"""Commands for living with a mount: ``prefetch``, ``cache ...`` and ``status``.

Each module's ``register(subparsers)`` adds its subcommand with a handler
``args.func(args) -> int`` that prints its own errors, so the ``scicatfs``
front end wires them all with :func:`register_all` and calls ``args.func``.
"""

from __future__ import annotations

from typing import Any

from scicatfs.commands import cache, prefetch, status

__all__ = ["register_all"]


def register_all(subparsers: Any) -> None:
    """Add ``prefetch``, ``cache`` and ``status`` to an argparse subparsers object."""
    for module in (prefetch, cache, status):
        module.register(subparsers)

