"""What the prefetch, cache and status commands share: errors, cache options, logging."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from scicatfs.config import LOG_LEVELS, ConfigError, default_cache_dir, load_profile, parse_size

__all__ = ["CommandError", "add_cache_options", "cache_location", "guarded", "setup_logging"]

Handler = Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """A failure the user can act on; the message is the one line they see."""


def guarded(handler: Handler) -> Handler:
    """Turn the errors a user can cause into one line on stderr and an exit status.

    Bad options or config (:class:`ConfigError`) exit with 2, other
    :class:`CommandError` with 1, so that the ``scicatfs`` front end only has
    to call ``args.func(args)``.
    """

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except ConfigError as error:
            print(f"scicatfs: {error}", file=sys.stderr)
            return 2
        except CommandError as error:
            print(f"scicatfs: {error}", file=sys.stderr)
            return 1

    return run


def add_cache_options(parser: argparse.ArgumentParser) -> None:
    """``--profile``, ``--config``, ``--cache-dir``, ``--cache-size`` and ``--log-level``."""
    group = parser.add_argument_group("configuration")
    group.add_argument("--profile", help="named profile from the config file (options given here override it)")
    group.add_argument("--config", type=Path, help="config file (default: ~/.config/scicatfs/config.toml)")
    group.add_argument("--cache-dir", type=Path, help="cache directory (default: the profile's, else ~/.cache/scicatfs)")
    group.add_argument(
        "--cache-size", help="cache budget, e.g. 20G (default: the profile's, else min(10G, 10%% of its filesystem))"
    )
    group.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="log verbosity (default warning)")


def cache_location(args: argparse.Namespace) -> tuple[Path, int | None]:
    """The cache directory and configured budget (None: the default) from options and profile."""
    profile = load_profile(args.profile, args.config) if args.profile else {}
    directory = args.cache_dir or profile.get("cache_dir") or default_cache_dir()
    size = parse_size(args.cache_size) if args.cache_size is not None else profile.get("cache_size")
    if size is not None and size <= 0:
        raise ConfigError(f"cache size {size} must be larger than zero")
    return Path(directory).expanduser(), size  # type: ignore[arg-type]


def setup_logging(level: str) -> None:
    """Short lines on stderr: these commands are run by hand, not as daemons."""
    logging.basicConfig(level=getattr(logging, level.upper()), format="scicatfs: %(levelname)s: %(message)s")
    if level != "debug":
        for chatty in ("httpx", "asyncssh"):  # every request or connection at INFO
            logging.getLogger(chatty).setLevel(logging.WARNING)
