"""``scicatfs cache status|prune|verify|forget|where``: look after the cache directory.

All of them work while a mount uses the same directory: the index is sqlite in
WAL mode, and blobs a mount has open are never pruned, dropped or changed
(their pin lock is held, docs/cache-format.md); each command says what it left
for that reason. A directory that holds no cache yet is reported as empty and
left alone, never created.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from scicatfs.cache.errors import CacheError
from scicatfs.cache.shared import prune as prune_shared
from scicatfs.cache.store import INDEX_FILE, BlobInfo, BlobStore
from scicatfs.commands.common import (
    CommandError,
    add_cache_options,
    cache_location,
    guarded,
    setup_logging,
)
from scicatfs.config import parse_size
from scicatfs.progress import human_size
from scicatfs.stack import open_store

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``cache`` and its subcommands to the ``scicatfs`` subcommands."""
    parser = subparsers.add_parser("cache", help="inspect, prune or verify the cache", description=__doc__)
    commands = parser.add_subparsers(dest="cache_command", required=True, metavar="ACTION")

    status = commands.add_parser("status", help="space used, complete and partial blobs, per-dataset summary")
    status.set_defaults(func=guarded(_status))

    prune = commands.add_parser("prune", help="delete least recently used blobs down to a size")
    prune.add_argument("--to", metavar="SIZE", help="target size, e.g. 5G (default: the cache budget)")
    prune.add_argument(
        "--shared", type=Path, metavar="DIR",
        help="prune the shared cache tier in DIR instead (needs --to; run it from a timer on one node)",
    )  # fmt: skip
    prune.set_defaults(func=guarded(_prune))

    verify = commands.add_parser("verify", help="re-hash complete blobs against their checksums, drop bad ones")
    verify.set_defaults(func=guarded(_verify))

    forget = commands.add_parser(
        "forget", help="drop a dataset's (or one file's) cached copy and failed-verification record"
    )
    forget.add_argument("pid", metavar="PID")
    forget.add_argument("path", metavar="PATH", nargs="?", help="one file's path inside the dataset (default: all)")
    forget.set_defaults(func=guarded(_forget))

    where = commands.add_parser("where", help="the blob file behind a dataset file, and how much of it is cached")
    where.add_argument("pid", metavar="PID")
    where.add_argument("path", metavar="PATH", help="the file's path inside the dataset")
    where.set_defaults(func=guarded(_where))

    for command in (status, prune, verify, forget, where):
        add_cache_options(command)


@contextmanager
def _store(args: argparse.Namespace) -> Iterator[BlobStore | None]:
    """The cache named by the options, or None if that directory holds no cache yet."""
    setup_logging(args.log_level)
    directory, size = cache_location(args)
    if not (directory / INDEX_FILE).exists():
        print(f"no cache in {directory} yet")
        yield None
        return
    try:
        store = open_store(directory, size)
    except CacheError as error:
        raise CommandError(str(error)) from None
    with store:
        yield store


def _blobs(entries: list[BlobInfo]) -> dict[str, BlobInfo]:
    """One entry per blob (a blob may back files of several datasets)."""
    return {entry.key: entry for entry in entries}


def _status(args: argparse.Namespace) -> int:
    with _store(args) as store:
        if store is None:
            return 0
        used = store.usage()
        entries = store.entries()
        blobs = _blobs(entries).values()
        complete = sum(1 for blob in blobs if blob.complete)
        partial = sum(1 for blob in blobs if not blob.complete and blob.present_bytes)
        share = f" ({used / store.budget:.0%})" if store.budget else ""
        print(f"cache {store.directory}")
        print(f"  used    {human_size(used)} of {human_size(store.budget)}{share}")
        print(f"  blobs   {complete} complete, {partial} partial, {len(blobs) - complete - partial} empty")
        datasets: dict[str, list[BlobInfo]] = defaultdict(list)
        for entry in entries:
            datasets[entry.pid].append(entry)
        if datasets:
            print("datasets (files complete, bytes cached):")
        for pid, files in datasets.items():
            done = sum(1 for entry in files if entry.complete)
            present = sum(entry.present_bytes for entry in files)
            size = sum(entry.size for entry in files)
            print(f"  {pid}  {done}/{len(files)} files  {human_size(present)} of {human_size(size)}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    if args.shared is not None:
        return _prune_shared(args)
    with _store(args) as store:
        if store is None:
            return 0
        target = parse_size(args.to) if args.to is not None else store.budget
        eviction = store.evict(target)
        used = store.usage()
        print(f"freed {human_size(eviction.freed)}; the cache now holds {human_size(used)}")
        if eviction.skipped_in_use:
            over = f", {human_size(used - target)} over the target" if used > target else ""
            print(f"kept {eviction.skipped_in_use} blobs that a running mount has open{over}")
    return 0


def _prune_shared(args: argparse.Namespace) -> int:
    """Least recently used blobs of the shared tier go first; mounts may keep reading meanwhile."""
    setup_logging(args.log_level)
    if args.to is None:
        raise CommandError("prune --shared needs --to SIZE: the shared tier has no budget of its own")
    target = parse_size(args.to)
    try:
        result = prune_shared(args.shared, target)
    except FileNotFoundError:
        print(f"no shared cache in {args.shared} yet")
        return 0
    except OSError as error:
        raise CommandError(f"pruning the shared cache {args.shared}: {error}") from None
    print(
        f"freed {human_size(result.freed)} ({result.removed_blobs} blobs); the shared cache now holds"
        f" {human_size(result.used)}; removed {result.leftovers} leftovers of interrupted writers"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    """Exit status 1 when bad blobs were found (and dropped), like fsck after repairs."""
    with _store(args) as store:
        if store is None:
            return 0
        entries = store.entries()
        checkable = sum(1 for blob in _blobs(entries).values() if blob.complete and blob.checksum)
        problems = store.verify()
        files: dict[str, list[str]] = defaultdict(list)
        for entry in entries:
            files[entry.key].append(f"{entry.pid} {entry.path}")
        for problem in problems:
            users = "; ".join(files[problem.key]) or "no file"
            if problem.in_use:
                fate = "open in a running mount: left in place, and that mount now refuses it"
            else:
                fate = "dropped"
            print(f"BAD {problem}; {fate} (used by: {users}); the next open fetches and verifies it again")
        print(f"verified {checkable} complete blobs with checksums: {len(problems)} bad")
    return 1 if problems else 0


def _forget(args: argparse.Namespace) -> int:
    with _store(args) as store:
        if store is None:
            return 0
        what = f"{args.pid} {args.path}" if args.path else args.pid
        result = store.forget(args.pid, args.path)
        if not (result.dropped or result.in_use or result.failures_cleared):
            raise CommandError(f"{what} is not in the cache")
        print(f"{what}: dropped {result.dropped} cached files, cleared {result.failures_cleared} failed verifications")
        if result.in_use:
            print(f"kept the cached bytes of {len(result.in_use)} files that a running mount has open"
                  " (run this again once they are closed there to drop them too)")  # fmt: skip
    return 0


def _where(args: argparse.Namespace) -> int:
    with _store(args) as store:
        info = None if store is None else store.where(args.pid, args.path)
        if info is None:
            raise CommandError(f"{args.pid} {args.path} is not in the cache (it was never opened)")
        state = "complete" if info.complete else "partial"
        print(info.file)
        print(f"  {human_size(info.present_bytes)} of {human_size(info.size)} present ({state}), key {info.key}")
    return 0
