"""``scicatfs prefetch``: copy a dataset, or some of its files, into the cache ahead of use.

Two ways to reach the files, chosen by the options:

* ``--mount MOUNTPOINT`` reads them *through a running mount*. The mount's own
  process then fetches, with its own credentials (possibly a systemd
  credential or an environment variable this command cannot see), its own
  SFTP connections and its single-flight table, so nothing is fetched twice
  and no connection option has to be repeated. What is cached already comes
  from the dataset's ``.scicat/files.json``; fully cached files are skipped.
  Pages read are dropped from the page cache afterwards (``posix_fadvise``),
  so that a 100 GB prefetch does not push everyone else's pages out.
* Otherwise (``--profile`` or ``--url`` plus the mount's connection options)
  it runs its own catalog client, SFTP connections and fetcher on the cache
  directory. A mount may use that directory at the same time: chunks are
  fetched once across processes (docs/cache-format.md).

Either way a file counts as done once all its chunks are recorded, which
happens only after the bytes are on disk; so Ctrl-C or ``kill -9`` leaves a
consistent cache, and a re-run fetches exactly what is still missing.

Exit status: 0 when every selected file is cached, 1 when some failed (each
failure is one line), 2 for unusable options, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import trio

from scicatfs.cache.store import blob_key
from scicatfs.catalog.errors import CatalogError
from scicatfs.commands.common import (
    CommandError,
    add_cache_options,
    add_connection_options,
    guarded,
    read_from_mount,
    setup_logging,
)
from scicatfs.commands.status import read_status
from scicatfs.config import ConfigError, MountOptions, mount_options
from scicatfs.errors import ScicatfsError
from scicatfs.progress import Progress, human_size
from scicatfs.stack import Stack, open_stack  # specs and sources exactly as the mount builds them

__all__ = ["Item", "register", "select"]

log = logging.getLogger(__name__)

DEFAULT_JOBS = 4
#: Bytes per read through a mount: the kernel splits it into FUSE requests.
MOUNT_READ = 4 * 1024 * 1024
#: What the (pid, path) errors of the layers below look like to a user.
FETCH_ERRORS = (ScicatfsError, OSError)


@dataclass(frozen=True, slots=True)
class Item:
    """One dataset file to prefetch: its path in the dataset, size, bytes cached so far,
    and whether it needs nothing more (all there and, with a checksum, verified)."""

    path: str
    size: int
    cached: int
    complete: bool


FetchOne = Callable[[Item, Callable[[int], None]], Awaitable[None]]


def register(subparsers: Any) -> None:
    """Add ``prefetch`` to the ``scicatfs`` subcommands."""
    parser = subparsers.add_parser(
        "prefetch",
        help="download a dataset (or matching files) into the cache",
        description="Download the files of dataset PID, or those whose path in the dataset matches "
        "one of the GLOBs (fnmatch: '*' also matches '/', so '*.h5' matches at any depth), "
        "into the cache. Files already cached are not fetched again.",
    )
    parser.add_argument("pid", metavar="PID")
    parser.add_argument("globs", metavar="GLOB", nargs="*", help="e.g. '*.nxs' or 'raw/scan_00*'")
    parser.add_argument(
        "--mount", type=Path, metavar="MOUNTPOINT",
        help="fetch through this running scicatfs mount (its credentials, connections and cache)",
    )  # fmt: skip
    parser.add_argument("-j", "--jobs", type=int, default=DEFAULT_JOBS, help=f"files at once (default {DEFAULT_JOBS})")
    add_connection_options(parser, " (without --mount)")
    add_cache_options(parser)
    parser.set_defaults(func=guarded(run))


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    if args.jobs < 1:
        raise CommandError(f"--jobs must be at least 1, got {args.jobs}")
    status = trio.run(_until_interrupted, _through_mount if args.mount is not None else _standalone, args)
    if status is None:
        print(
            "scicatfs: prefetch interrupted; what was fetched stays cached, run it again to continue",
            file=sys.stderr,
        )
        return 130
    return status


async def _until_interrupted(
    work: Callable[[argparse.Namespace], Awaitable[int]], args: argparse.Namespace
) -> int | None:
    """Run ``work(args)``; SIGINT (Ctrl-C) or SIGTERM cancel it, and then the result is None.

    Cancelling, rather than letting KeyboardInterrupt fly, lets the fetcher and
    the transfer shut down in order; chunks already recorded stay valid.
    """
    outcome: list[int | CommandError | ConfigError] = []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def body() -> None:
                try:
                    outcome.append(await work(args))
                except (CommandError, ConfigError) as error:  # re-raised below, outside the nursery's group
                    outcome.append(error)
                nursery.cancel_scope.cancel()

            nursery.start_soon(body)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    if outcome and isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0] if outcome else None


def select(items: Sequence[Item], globs: Sequence[str]) -> list[Item]:
    """The items matching any glob (all without globs); a glob matching nothing is an error."""
    if not globs:
        return list(items)
    unmatched = [glob for glob in globs if not any(fnmatchcase(item.path, glob) for item in items)]
    if unmatched:
        raise CommandError(f"no file of the dataset matches {unmatched[0]!r}")
    return [item for item in items if any(fnmatchcase(item.path, glob) for glob in globs)]


# -- through a running mount --------------------------------------------------------


async def _through_mount(args: argparse.Namespace) -> int:
    if args.url is not None or args.profile is not None:
        raise CommandError("--mount takes the mount's settings: do not combine it with --url or --profile")
    mountpoint = args.mount.absolute()
    listing = await trio.to_thread.run_sync(
        read_from_mount, mountpoint, f"{args.pid}/.scicat/files.json", f"no dataset {args.pid!r} in {mountpoint}"
    )
    files = json.loads(listing)["files"]
    # The mount verifies a file once all its chunks are there: that is as
    # complete as files.json can tell.
    items = select([Item(f["path"], f["size"], f["cached"], f["cached"] >= f["size"]) for f in files], args.globs)
    dataset = mountpoint / args.pid

    async def fetch(item: Item, add: Callable[[int], None]) -> None:
        await _read_through(dataset / item.path, item, add)

    before = await _mount_bytes_read(mountpoint)
    failures = await _fetch_all(items, fetch, args.jobs)
    moved = await _mount_bytes_read(mountpoint) - before
    return _report(items, failures, f"{_bytes(moved)} transferred by the mount meanwhile")


async def _mount_bytes_read(mountpoint: Path) -> int:
    """Every byte the mount fetched so far (for all its readers, not only us)."""
    status = await trio.to_thread.run_sync(read_status, mountpoint)
    return int(status["transfer"]["bytes_read"])


async def _read_through(path: Path, item: Item, add: Callable[[int], None]) -> None:
    """Read the file through the mount (which caches it), counting new bytes for progress."""
    fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY | os.O_CLOEXEC, abandon_on_cancel=True)
    counted = item.cached
    offset = 0
    try:
        while data := await trio.to_thread.run_sync(os.pread, fd, MOUNT_READ, offset, abandon_on_cancel=True):
            offset += len(data)
            if offset > counted:
                add(offset - counted)
                counted = offset
        if offset != item.size:
            raise OSError(errno.EIO, f"read {offset} bytes, the catalog says {item.size}")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# -- on our own ------------------------------------------------------------------------


def _options(args: argparse.Namespace) -> MountOptions:
    """The mount options these arguments (and the profile) give, for the layers' settings.

    A prefetch mounts nothing, but the options are a mount's (so that profiles
    and validation are the same); the mountpoint they require is unused here.
    """
    return mount_options({**vars(args), "mountpoint": Path.cwd()})


async def _standalone(args: argparse.Namespace) -> int:
    options = _options(args)
    try:
        async with open_stack(options) as stack:
            return await _prefetch_with(stack, args)
    except ScicatfsError as error:
        raise CommandError(str(error)) from None


async def _prefetch_with(stack: Stack, args: argparse.Namespace) -> int:
    try:
        dataset = await stack.catalog.get_dataset(args.pid)
    except CatalogError as error:
        raise CommandError(f"catalog at {stack.catalog.base_url}: {error}") from None
    store, fetcher = stack.store, stack.fetcher
    specs = {datafile.path: stack.file_spec(dataset, datafile) for datafile in dataset.files}
    verified = {(e.pid, e.path, e.key) for e in store.entries(dataset.pid) if e.complete}
    items = select(
        [
            Item(path, spec.size, fetcher.cached_bytes(spec),
                 spec.size == 0 or (spec.pid, path, blob_key(spec)) in verified)
            for path, spec in specs.items()
        ],
        args.globs,
    )  # fmt: skip
    wanted = sum(item.size for item in items if not stack.transfer.is_local(specs[item.path].source))
    if wanted > store.budget:
        raise CommandError(
            f"the selected files need {human_size(wanted)} but the cache budget is {human_size(store.budget)}:"
            " pass a larger --cache-size or select fewer files with GLOBs"
        )

    async def fetch(item: Item, add: Callable[[int], None]) -> None:
        counted = item.cached

        def progress(cached: int, size: int) -> None:
            nonlocal counted
            if cached > counted:
                add(cached - counted)
                counted = cached

        await fetcher.prefetch(specs[item.path], progress)
        progress(item.size, item.size)

    failures = await _fetch_all(items, fetch, args.jobs)
    return _report(items, failures, f"{_bytes(stack.transfer.stats['bytes_read'])} transferred")


# -- common ----------------------------------------------------------------------------


async def _fetch_all(items: Sequence[Item], fetch: FetchOne, jobs: int) -> list[tuple[str, str]]:
    """Fetch the incomplete items, ``jobs`` at a time; returns (path, reason) of failures."""
    todo = [item for item in items if not item.complete]
    progress = Progress(
        total=sum(item.size for item in items),
        files=len(items),
        stream=sys.stderr,
        done=sum(min(item.cached, item.size) for item in items),
        files_done=len(items) - len(todo),
    )
    failures: list[tuple[str, str]] = []
    limiter = trio.CapacityLimiter(jobs)

    async def one(item: Item) -> None:
        async with limiter:
            try:
                await fetch(item, progress.add)
            except FETCH_ERRORS as error:
                reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
                failures.append((item.path, reason))
                progress.failed(item.path, reason)
            else:
                progress.finished(item.path)

    try:
        async with trio.open_nursery() as nursery:
            for item in todo:
                nursery.start_soon(one, item)
    finally:
        progress.close()
    return failures


def _bytes(count: int) -> str:
    return f"{human_size(count)} ({count} bytes)"


def _report(items: Sequence[Item], failures: list[tuple[str, str]], transferred: str) -> int:
    """The last line: what is cached, or how many files failed, and what moved over the network."""
    if failures:
        print(f"scicatfs: {len(failures)} of {len(items)} files could not be cached, {transferred}", file=sys.stderr)
        return 1
    files = "1 file" if len(items) == 1 else f"{len(items)} files"
    total = sum(item.size for item in items)
    print(f"scicatfs: {files} ({human_size(total)}) cached, {transferred}", file=sys.stderr)
    return 0
