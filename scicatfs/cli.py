"""The ``scicatfs`` command: mount, unmount, demo (and prefetch, cache, status from
:mod:`scicatfs.commands`).

Also accepts the form libfuse's ``mount.fuse3`` uses for ``mount -t
fuse.scicatfs`` and fstab (``scicatfs SOURCE MOUNTPOINT -o key=value,...``),
rewritten by :func:`scicatfs.config.helper_argv_to_cli`.

Every failure a user can cause (bad option, unreadable token file, missing
mountpoint, unreachable catalog) ends in one line on stderr and a non-zero
exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Collection, Sequence
from pathlib import Path

from scicatfs import __version__
from scicatfs.commands import register_all
from scicatfs.commands.common import add_connection_options, setup_logging
from scicatfs.config import LOG_LEVELS, ConfigError, helper_argv_to_cli, mount_options, split_fuse_o

__all__ = ["main"]


def _flag(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    # None (not False) when absent, so that a profile's value is not overridden.
    parser.add_argument(name, action="store_const", const=True, default=None, help=help)


def _parser() -> tuple[argparse.ArgumentParser, Collection[str]]:
    """The parser, and the names of its commands."""
    parser = argparse.ArgumentParser(
        prog="scicatfs",
        description="Mount a SciCat data catalog as a read-only filesystem; "
        "dataset files are fetched on first read (SFTP, a local folder or a web server) and cached.",
    )
    parser.add_argument("--version", action="version", version=f"scicatfs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount = commands.add_parser("mount", help="mount a catalog", description="Mount a SciCat catalog at MOUNTPOINT.")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory you own")
    mount.add_argument("--profile", metavar="NAME", help="named profile from the config file (command-line options override it)")
    mount.add_argument("--config", type=Path, metavar="FILE", help="config file (default: ~/.config/scicatfs/config.toml)")
    add_connection_options(mount)
    cache = mount.add_argument_group("cache")
    cache.add_argument("--cache-dir", type=Path, metavar="DIR", help="persistent cache directory (default: ~/.cache/scicatfs)")
    cache.add_argument("--cache-size", metavar="SIZE", help="cache budget, e.g. 20G (default: min(10G, 10%% of its filesystem))")
    cache.add_argument(
        "--shared-cache", type=Path, metavar="DIR",
        help="a directory on the cluster filesystem shared by many nodes' mounts: chunks one node fetched are "
        "read from there by the others (docs/cluster.md)",
    )  # fmt: skip
    metrics = mount.add_argument_group("metrics (needs scicatfs[metrics])")
    metrics.add_argument("--metrics-port", metavar="PORT", help="serve Prometheus metrics on 127.0.0.1:PORT")
    metrics.add_argument(
        "--metrics-textfile", type=Path, metavar="FILE",
        help="keep FILE (*.prom) up to date for node_exporter's textfile collector",
    )  # fmt: skip
    tuning = mount.add_argument_group("behaviour")
    tuning.add_argument("--record-ttl", metavar="SECONDS", help="seconds a dataset record is trusted before asking again (default 60)")
    tuning.add_argument("--listing-ttl", metavar="SECONDS", help="seconds a listing or a 'no such name' is trusted (default 30)")
    tuning.add_argument("--lookup-timeout", metavar="SECONDS", help="seconds a name never seen may wait for the catalog, retries included, before EIO (default 8)")
    tuning.add_argument(
        "--retry-failed", metavar="SECONDS",
        help="seconds a file that failed verification answers EIO before it is fetched and verified again (default 600)",
    )  # fmt: skip
    _flag(tuning, "--xattrs", "expose user.scicat.* extended attributes (costs ls -l a round trip per file)")
    _flag(tuning, "--allow-other", "let other users read the mount (adds default_permissions)")
    _flag(tuning, "--foreground", "stay in the foreground (default: return once the mount answers)")
    tuning.add_argument("-f", dest="foreground", action="store_const", const=True, help=argparse.SUPPRESS)
    tuning.add_argument("--log-level", choices=LOG_LEVELS, help="log verbosity (default info)")
    tuning.add_argument(
        "--log-file", metavar="FILE",
        help="append the daemon's log to FILE (default: stderr in the foreground, syslog in the background)",
    )  # fmt: skip
    tuning.add_argument(
        "-o", dest="o", action="append", default=[], metavar="OPTS",
        help="comma-separated key=value options: scicatfs keys (token_file=..., xattrs, allow_other, ...) "
        "or FUSE mount options",
    )

    unmount = commands.add_parser("unmount", help="unmount (also cleans up a stale mount)")
    unmount.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)

    demo = commands.add_parser(
        "demo", help="mount a built-in demo catalog",
        description="Start the demo catalog and SFTP server, mount them, and stay until Ctrl-C.",
    )
    demo.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?", type=Path,
                      help="an empty directory (default: a temporary one)")
    demo.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="log verbosity (default warning)")

    register_all(commands)  # prefetch, cache ..., status: each sets its own handler (args.func)
    return parser, commands.choices


def _setup_logging(level: str, quiet: bool = False, log_file: Path | None = None) -> None:
    """The daemon's log: times and logger names, on stderr or in ``log_file``.

    A background mount is quiet on the terminal, like sshfs: the user sees
    problems, and the daemon's full log goes to syslog once it detaches, or
    to the log file from the start when one is given.
    """
    setup_logging(level, fmt="%(asctime)s scicatfs %(levelname)s %(name)s: %(message)s", quiet=quiet,
                  log_file=log_file)


def _mount(args: argparse.Namespace) -> int:
    from scicatfs.mount import run  # imported late: the other commands need no FUSE

    values = {key: value for key, value in vars(args).items() if key not in ("command", "o")}
    scicat_keys, fuse = split_fuse_o(args.o)
    for key, value in scicat_keys.items():
        if key == "sources":  # -o source=... adds to --source
            values[key] = [*(values.get(key) or ()), *value]  # type: ignore[misc]
        elif values.get(key) is None:
            values[key] = value
    if fuse:
        values["fuse_options"] = tuple(fuse)
    options = mount_options(values)
    try:
        _setup_logging(options.log_level, quiet=not options.foreground, log_file=options.log_file)
    except OSError as error:
        print(f"scicatfs: cannot write the log file {options.log_file}: {error.strerror or error}", file=sys.stderr)
        return 2
    return run(options)


def _unmount(args: argparse.Namespace) -> int:
    from scicatfs.mountpoint import MountpointError, unmount

    try:
        unmount(args.mountpoint)
    except MountpointError as error:
        print(f"scicatfs: {error}", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from scicatfs.demo_session import run_demo

    _setup_logging(args.log_level)
    return run_demo(args.mountpoint, args.log_level)


_HANDLERS = {"mount": _mount, "unmount": _unmount, "demo": _demo}


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser, commands = _parser()
    try:
        if arguments and arguments[0] not in commands and not arguments[0].startswith("-"):
            arguments = helper_argv_to_cli(arguments)  # scicatfs SOURCE MOUNTPOINT -o ...
        args = parser.parse_args(arguments)
        handler = _HANDLERS.get(args.command, getattr(args, "func", None))
        return handler(args)
    except ConfigError as error:
        print(f"scicatfs: {error}", file=sys.stderr)
        return 2
