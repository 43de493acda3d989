"""What the prefetch, cache and status commands share: errors, cache options, logging."""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import logging.handlers
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from scicatfs.config import (
    LOG_LEVELS,
    ConfigError,
    default_cache_dir,
    load_profile,
    parse_size,
)
from scicatfs.mountpoint import find_mount

__all__ = [
    "CommandError",
    "add_cache_options",
    "add_connection_options",
    "cache_location",
    "guarded",
    "read_from_mount",
    "setup_logging",
]

MOUNT_TIMEOUT = 10.0

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


def add_connection_options(parser: argparse.ArgumentParser, when: str = "") -> None:
    """The options ``scicatfs mount`` takes to reach the catalog and the file server.

    Two groups, catalog and file server; ``when`` is added to their titles
    (prefetch: " (without --mount)"). Values stay None unless given, so that
    a profile's values are not overridden.
    """
    catalog = parser.add_argument_group(
        f"catalog{when}", "credentials, the first that is given: --token-file, $SCICAT_TOKEN, the systemd"
        " credential scicat-token, --username with --password-file; else anonymous",
    )
    catalog.add_argument(
        "--url", metavar="URL", help="catalog URL, e.g. https://scicat.ess.eu/api/v3 (with or without /api/v3)"
    )
    catalog.add_argument(
        "--token-file", type=Path, metavar="FILE", help="file holding a SciCat token (must not be group/world-readable)"
    )
    catalog.add_argument("--username", metavar="USER", help="log in with this user name (needs --password-file)")
    catalog.add_argument(
        "--password-file", type=Path, metavar="FILE", help="file holding the password (must not be group/world-readable)"
    )
    sftp = parser.add_argument_group(f"file server (SFTP){when}")
    sftp.add_argument(
        "--sftp-host", metavar="HOST", help="SFTP host for every dataset (default: each dataset's sourceFolderHost)"
    )
    sftp.add_argument("--sftp-port", metavar="PORT", help="SFTP port (default: ssh config, else 22)")
    sftp.add_argument("--sftp-user", metavar="USER", help="SFTP user name (default: ssh config, else your login name)")
    sftp.add_argument(
        "--identity-file", type=Path, metavar="FILE", help="SSH private key (default: ssh-agent and ~/.ssh keys)"
    )
    sftp.add_argument("--known-hosts", type=Path, metavar="FILE", help="known_hosts file (default: ~/.ssh/known_hosts)")
    sftp.add_argument(
        "--insecure-no-host-key-check", action="store_const", const=True, default=None,
        help="accept any host key (INSECURE: only for throw-away test servers)",
    )  # fmt: skip
    sftp.add_argument("--sftp-connections", metavar="N", help="SSH connections per host (default 4)")
    sources = parser.add_argument_group(
        f"sources{when}", "where each file's bytes come from, by the folder its remote path is in: the longest"
        " matching PREFIX wins; without a match, SFTP as above",
    )
    sources.add_argument(
        "--source", dest="sources", action="append", metavar="PREFIX=URL",
        help="read remote paths under PREFIX from URL (file:///path, sftp://[user@]host[:port]/path, "
        "https://host/path); repeatable, e.g. --source /ess/data=file:///ess/data",
    )  # fmt: skip
    sources.add_argument(
        "--http-token-file", type=Path, metavar="FILE",
        help="bearer token for https:// sources (must not be group/world-readable; not the SciCat token)",
    )  # fmt: skip
    sources.add_argument(
        "--insecure-http", action="store_const", const=True, default=None,
        help="allow http:// sources on other machines (unencrypted: only on a trusted network)",
    )  # fmt: skip


def add_cache_options(parser: argparse.ArgumentParser) -> None:
    """``--profile``, ``--config``, ``--cache-dir``, ``--cache-size`` and ``--log-level``."""
    group = parser.add_argument_group("configuration")
    group.add_argument("--profile", help="named profile from the config file (options given here override it)")
    group.add_argument("--config", type=Path, help="config file (default: ~/.config/scicatfs/config.toml)")
    group.add_argument(
        "--cache-dir", type=Path, help="cache directory (default: the profile's, else ~/.cache/scicatfs)"
    )
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


#: Commands run by hand log short lines; the mount daemon passes its own format.
COMMAND_LOG_FORMAT = "scicatfs: %(levelname)s: %(message)s"


def _late_reply(record: logging.LogRecord) -> bool | logging.LogRecord:
    """pyfuse3's ERROR for a reply the kernel no longer waited for, as DEBUG.

    ``fuse_reply_*`` fails with ENOENT when the kernel dropped the request first:
    a file closed just before the unmount, or a request interrupted by a signal.
    Nothing is lost, so it is no error a user should be shown.
    """
    if record.levelno >= logging.ERROR and "fuse_reply_* failed with No such file or directory" in record.getMessage():
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG) and record
    return True


def setup_logging(
    level: str, *, fmt: str = COMMAND_LOG_FORMAT, quiet: bool = False, log_file: Path | None = None
) -> None:
    """Log at ``level`` to stderr, or to ``log_file`` when one is given.

    ``quiet`` shows only warnings and errors on stderr; with a log file, a
    quiet stderr is kept beside it (a background mount still tells the
    terminal what goes wrong while it starts). A file is opened with
    WatchedFileHandler so that logrotate's move-and-recreate is followed.
    Raises OSError when the file cannot be opened for appending.
    """
    formatter = logging.Formatter(fmt)
    handlers: list[logging.Handler] = []
    if log_file is not None:
        handlers.append(logging.handlers.WatchedFileHandler(log_file, encoding="utf-8"))
    if log_file is None or quiet:
        handlers.append(logging.StreamHandler(sys.stderr))
        if quiet:
            handlers[-1].setLevel(logging.WARNING)
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=handlers)
    logging.getLogger("pyfuse3").addFilter(_late_reply)
    if level != "debug":
        # Both log every request or connection at INFO; scicatfs logs what matters itself.
        for chatty in ("httpx", "asyncssh"):
            logging.getLogger(chatty).setLevel(logging.WARNING)


def read_from_mount(mountpoint: Path, name: str, missing: str) -> bytes:
    """The bytes of control file ``name`` under a running scicatfs mount, or a CommandError.

    ``missing`` is the message when the file does not exist.

    Read in a daemon thread with a deadline: a hung mount gives a message, not
    a hung command. A mount whose process died answers ENOTCONN, which gets
    the fix in the message.
    """
    entry = find_mount(mountpoint)
    if entry is None or entry.fstype != "fuse.scicatfs":
        raise CommandError(f"{mountpoint} is not a scicatfs mount")
    path = mountpoint / name
    outcome: list[bytes | OSError] = []

    def read() -> None:
        try:
            outcome.append(path.read_bytes())
        except OSError as error:
            outcome.append(error)

    reader = threading.Thread(target=read, daemon=True)  # a hung mount may keep it forever
    reader.start()
    reader.join(MOUNT_TIMEOUT)
    if not outcome:
        raise CommandError(f"the mount at {mountpoint} did not answer within {MOUNT_TIMEOUT:g} s")
    result = outcome[0]
    if isinstance(result, bytes):
        return result
    if result.errno == errno.ENOTCONN:
        raise CommandError(f"the scicatfs process of {mountpoint} is gone: run 'scicatfs unmount {mountpoint}'")
    if result.errno == errno.ENOENT:
        raise CommandError(missing)
    raise CommandError(f"cannot read {path}: {result.strerror}")
