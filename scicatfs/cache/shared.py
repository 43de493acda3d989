"""The shared cache tier: immutable chunk objects on a directory that many nodes mount.

Behind each node's local cache (sqlite index, budget, crash rules) sits an
optional directory on the cluster filesystem (NFS, Lustre, GPFS, CephFS) that
every node mounts. A chunk fetched from the source by one node is written there
once; every other node then copies it from there instead of the source. The
lookup order is page cache -> local cache -> shared tier -> source.

Nothing in the directory is ever modified in place and nothing needs a lock, a
database or a shared mutable index (sqlite's WAL and fcntl locks are not
dependable on those filesystems):

- An object is one whole chunk (4 MiB, the last one shorter) of one blob,
  named by the SHA-256 of the blob key and chunk size plus the chunk number. It
  is written as a temporary file ``.tmp-<host>-<pid>-<random>`` in its final
  directory, fsynced, then renamed into place. A reader opens exactly the
  object's name and trusts it only when its size is the chunk's length; so a
  temporary file of a writer killed mid-write is never taken for data, and two
  nodes writing the same object just replace identical bytes. A file assembled
  from shared objects is verified against the catalog checksum like any other
  before it counts as complete; a blob that fails verification has its objects
  removed (:meth:`SharedTier.discard`).
- A node about to fetch a whole chunk from the source first creates the
  marker ``.fetching-<n>`` next to the object (``O_EXCL``, holding the time).
  Others that find a fresh marker (younger than ``lease``) wait for the object
  instead of fetching it too, at most ``lease`` seconds, then fetch it
  themselves. Correctness never depends on the marker: it only saves transfers.
- Access is recorded without touching objects: the first read of a blob per
  day and process creates the empty file ``access/<YYYY-MM-DD>/<blob hash>``.
  :func:`prune` (``scicatfs cache prune --shared DIR --to SIZE``, meant for a
  timer on one node) removes whole blobs, least recently used first, plus
  stale temporary files and markers.

The transfer unit is the chunk, not the flight: a flight (a run of blocks in
one chunk) that covers its whole chunk publishes it; any flight, whole or
partial, is served from a chunk object that exists. Random readers whose
flights cover part of a chunk therefore share what sequential readers and
prefetch published, but do not publish themselves.

A tier that cannot be written (read-only directory, foreign owner) is used for
reading only; a full one (ENOSPC, EDQUOT) is not written to for
``FULL_RETRY`` seconds. Both are logged once. A tier that does not answer
within ``ANSWER_TIMEOUT`` (a hung NFS server: hard mounts block forever) is
left alone for ``HUNG_PAUSE`` seconds and reads go to the source; the stuck
worker thread is abandoned. Everyone who can read the
directory can read every object in it: see docs/cluster.md for ownership.
"""

from __future__ import annotations

import calendar
import errno
import functools
import hashlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal, TypeVar

import trio

if TYPE_CHECKING:
    from scicatfs.cache.store import Blob

__all__ = ["PruneResult", "SharedCache", "SharedTier", "prune", "shared_usage"]

log = logging.getLogger(__name__)

#: The tier's top directory inside DIR; a new format gets a new name.
FORMAT_DIR = "scicatfs-shared-v1"
TEMP_PREFIX = ".tmp-"
MARKER_PREFIX = ".fetching-"
#: Seconds a "being fetched" marker keeps others waiting for its object.
LEASE = 10.0
#: Seconds between looks for an object that another node is fetching.
WAIT_POLL = 0.05
#: Seconds after a full shared filesystem before writing is tried again.
FULL_RETRY = 60.0
#: A look into the shared tier that takes longer than this (a hung NFS server) falls back to the source...
ANSWER_TIMEOUT = 5.0
#: ... and the tier is left alone for this many seconds.
HUNG_PAUSE = 60.0
#: Seconds that publishes under way may still take when the mount stops.
STOP_GRACE = 5.0
#: Temporary files and markers older than this are leftovers of dead writers.
STALE_AFTER = 3600.0
DIR_MODE = 0o2750  # setgid: objects inherit the directory's group
FILE_MODE = 0o640

T = TypeVar("T")
Download = Callable[[], Awaitable[bytes]]
#: The outcome of claiming an object's marker: this process holds it, another does, or none could be made.
Claim = Literal["ours", "theirs", "none"]


def _day(moment: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(moment))


class SharedTier:
    """Synchronous access to one shared directory; every method is safe in worker threads.

    Creating it creates the layout if it is missing and the directory allows;
    a directory that cannot be written is used read-only.
    """

    def __init__(self, directory: Path, chunk_size: int, *, lease: float = LEASE) -> None:
        self.directory = Path(directory)
        self.chunk_size = chunk_size
        self.lease = lease
        self.root = self.directory / FORMAT_DIR
        if not self.directory.is_dir():
            raise FileNotFoundError(errno.ENOENT, "shared cache directory does not exist", str(self.directory))
        self.writable = True
        try:
            for path in (self.root, self.root / "objects", self.root / "access"):
                _mkdir(path)
        except OSError as error:
            self._read_only(error)
        if self.writable and not os.access(self.root / "objects", os.W_OK | os.X_OK):
            self._read_only(PermissionError(errno.EACCES, "not writable", str(self.root)))
        self._full_until = 0.0
        self._seen: tuple[str, set[str]] = ("", set())  # (day, blob hashes whose access that day is recorded)
        self._claims: dict[Path, bytes] = {}  # markers this process holds -> what it wrote in them
        self._host = socket.gethostname().replace("/", "_")

    # -- names ------------------------------------------------------------------

    def blob_hash(self, key: str) -> str:
        return hashlib.sha256(f"{key}\0{self.chunk_size}".encode()).hexdigest()

    def blob_dir(self, key: str) -> Path:
        digest = self.blob_hash(key)
        return self.root / "objects" / digest[:2] / digest

    def object_path(self, key: str, chunk: int) -> Path:
        return self.blob_dir(key) / str(chunk)

    # -- reading ----------------------------------------------------------------

    def read(self, key: str, chunk: int, chunk_length: int, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset`` of a chunk object, or None if it is not there whole.

        An object of the wrong size (a foreign file, a truncation) is not
        trusted; one that vanishes between open and read is a miss (the caller
        falls back to the source).
        """
        try:
            fd = os.open(self.object_path(key, chunk), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if os.fstat(fd).st_size != chunk_length:
                return None
            data = os.pread(fd, length, offset)
        except OSError:
            return None
        finally:
            os.close(fd)
        if len(data) != length:
            return None
        self._record_access(key)
        return data

    def lookup(self, key: str, chunk: int, chunk_length: int, offset: int, length: int) -> tuple[bytes | None, bool]:
        """:meth:`read`, and whether another process is fetching the object.

        The marker is looked at first: its writer removes it only after the
        object is in place, so "no marker, then no object" means nobody had it
        under way, and a claim that follows rarely duplicates a fetch.
        """
        fetching = self.being_fetched(key, chunk)
        return self.read(key, chunk, chunk_length, offset, length), fetching

    def being_fetched(self, key: str, chunk: int) -> bool:
        """Whether another process holds a fresh "being fetched" marker for this object."""
        marker = self._marker(key, chunk)
        if marker in self._claims:
            return False
        try:
            return time.time() - _marker_time(marker) < self.lease
        except OSError:
            return False

    def _record_access(self, key: str) -> None:
        """Create today's access marker of the blob, once per day and process."""
        day, digest = _day(time.time()), self.blob_hash(key)
        if day != self._seen[0]:
            self._seen = (day, set())
        if digest in self._seen[1] or not self.writable:
            return
        self._seen[1].add(digest)
        folder = self.root / "access" / day
        try:
            _mkdir(folder)
            os.close(os.open(folder / digest, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE))
        except OSError as error:  # only recency for pruning is lost
            log.debug("recording access to %s: %s", digest, error)

    # -- writing ----------------------------------------------------------------

    @property
    def accepts_writes(self) -> bool:
        return self.writable and time.monotonic() >= self._full_until

    def claim(self, key: str, chunk: int) -> Claim:
        """Create the object's "being fetched" marker: ``"ours"``, or ``"theirs"`` if another fresh one exists.

        A stale marker (older than the lease: its writer died or is slow) is
        replaced. ``"none"``: no marker could be made (fetch without one).
        """
        if not self.accepts_writes:
            return "none"
        marker = self._marker(key, chunk)
        for _ in range(2):
            try:
                _mkdir_blob(marker.parent)
                fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            except FileExistsError:
                try:
                    if time.time() - _marker_time(marker) < self.lease:
                        return "theirs"
                    os.unlink(marker)
                except OSError:
                    pass
                continue
            except OSError as error:
                log.debug("no marker for %s: %s", marker, error)
                return "none"
            stamp = f"{time.time():.3f} {self._host} {os.getpid()} {secrets.token_hex(4)}\n".encode()
            try:
                os.write(fd, stamp)
            except OSError:
                pass  # an empty marker counts by its mtime
            finally:
                os.close(fd)
            self._claims[marker] = stamp
            return "ours"
        return "none"

    def release(self, key: str, chunk: int) -> None:
        """Remove this process's marker of the object, unless another replaced it meanwhile.

        (After the lease another node may have taken the chunk over; its
        marker is left alone. Between the look and the unlink a takeover
        can still slip in: that costs at most a duplicate fetch.)
        """
        marker = self._marker(key, chunk)
        stamp = self._claims.pop(marker, None)
        try:
            if stamp is not None and marker.read_bytes() == stamp:
                os.unlink(marker)
        except OSError:
            pass

    def publish(self, key: str, chunk: int, data: bytes) -> bool:
        """Write a whole chunk object atomically (temp file, fsync, rename); True if it is there.

        An object already present is left alone. Failures are logged (once per
        kind) and answer False: the shared tier is an optimisation.
        """
        target = self.object_path(key, chunk)
        if not self.accepts_writes:
            return False
        if target.exists():
            return True
        temp = target.parent / f"{TEMP_PREFIX}{self._host}-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            _mkdir_blob(target.parent)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            try:
                os.fchmod(fd, FILE_MODE)  # whatever the umask: the group must read it
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, target)
        except OSError as error:
            _unlink_quietly(temp)
            self._write_failed(error)
            return False
        if self._full_until:
            self._full_until = 0.0
            log.warning("shared cache %s has room again: adding to it", self.directory)
        return True

    def discard(self, key: str) -> int:
        """Remove every object of a blob (its bytes failed verification); returns how many."""
        removed = 0
        try:
            entries = list(os.scandir(self.blob_dir(key)))
        except OSError:
            return 0
        for entry in entries:
            if entry.name.isdigit():
                try:
                    os.unlink(entry.path)
                    removed += 1
                except OSError:
                    pass
        if removed:
            log.warning("removed %d objects of %s from the shared cache (they failed verification)", removed, key)
        return removed

    def _marker(self, key: str, chunk: int) -> Path:
        return self.blob_dir(key) / f"{MARKER_PREFIX}{chunk}"

    def _write_failed(self, error: OSError) -> None:
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            if not self._full_until:
                log.warning(
                    "shared cache %s is full (%s): serving from the source, not adding to it for now",
                    self.directory, os.strerror(error.errno or 0),
                )  # fmt: skip
            self._full_until = time.monotonic() + FULL_RETRY
        elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            self._read_only(error)
        else:
            log.warning("writing to the shared cache %s failed: %s", self.directory, error)

    def _read_only(self, error: OSError) -> None:
        if self.writable:
            log.warning("shared cache %s is read-only here (%s): only reading from it", self.directory, error)
        self.writable = False


class SharedCache:
    """The shared tier as the fetcher uses it: look up, wait, claim, download, publish.

    Use as ``async with SharedCache(tier) as shared:``; publishing runs in the
    background (a worker thread per object) so that it never delays the
    reader that caused it. Leaving the block waits for publishes under way.
    """

    def __init__(self, tier: SharedTier) -> None:
        self.tier = tier
        self._nursery: trio.Nursery | None = None
        self._nursery_manager = trio.open_nursery()
        self._skip_until = 0.0  # trio time before which the tier is not used (it hung)

    async def __aenter__(self) -> SharedCache:
        self._nursery = await self._nursery_manager.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> bool | None:
        assert self._nursery is not None
        self._nursery.cancel_scope.deadline = trio.current_time() + STOP_GRACE  # never hang the unmount
        self._nursery = None
        return await self._nursery_manager.__aexit__(exc_type, exc, traceback)

    @property
    def answering(self) -> bool:
        """False for ``HUNG_PAUSE`` seconds after the tier took longer than ``ANSWER_TIMEOUT`` to answer."""
        return trio.current_time() >= self._skip_until

    async def _ask(self, function: Callable[..., T], *args: object) -> T | None:
        """``function(*args)`` in a worker thread, or None if the tier does not answer in time.

        A thread stuck in a hung filesystem is abandoned (it finishes or not
        on its own) and the tier is skipped for a while; said once per pause.
        """
        with trio.move_on_after(ANSWER_TIMEOUT):
            return await trio.to_thread.run_sync(functools.partial(function, *args), abandon_on_cancel=True)
        if self.answering:
            log.warning(
                "shared cache %s did not answer within %g s: using the source for %g s",
                self.tier.directory, ANSWER_TIMEOUT, HUNG_PAUSE,
            )  # fmt: skip
        self._skip_until = trio.current_time() + HUNG_PAUSE
        return None

    async def read_or_fetch(self, blob: Blob, first: int, count: int, download: Download) -> tuple[bytes, str]:
        """A flight's bytes and where they came from, ``"shared"`` or ``"source"``.

        From the chunk object if it is there (waiting up to the lease while
        another node fetches it); else ``download()``, and a whole chunk is then
        published in the background.
        """
        chunk = first // blob.blocks_per_chunk
        chunk_length = blob.chunk_length(chunk)
        offset = first * blob.block_size - chunk * blob.chunk_size
        length = min(count * blob.block_size, blob.size - first * blob.block_size)
        whole = offset == 0 and length == chunk_length
        tier = self.tier
        deadline = trio.current_time() + tier.lease
        claimed = False
        while self.answering:
            found = await self._ask(tier.lookup, blob.key, chunk, chunk_length, offset, length)
            if found is None:
                break
            data, fetching = found
            if data is not None:
                return data, "shared"
            if trio.current_time() >= deadline:
                break
            if not fetching:
                if not (whole and tier.accepts_writes):
                    break
                claim = await self._ask(tier.claim, blob.key, chunk)
                claimed = claim == "ours"
                if claim != "theirs":
                    break  # else another node claimed it just now: wait for its object
            await trio.sleep(WAIT_POLL)
        try:
            data = await download()
        except BaseException:
            if claimed:
                with trio.CancelScope(shield=True):
                    await self._ask(tier.release, blob.key, chunk)
            raise
        if whole and self._nursery is not None and tier.accepts_writes and self.answering:
            self._nursery.start_soon(self._publish, blob.key, chunk, data)
        elif claimed:
            await self._ask(tier.release, blob.key, chunk)
        return data, "source"

    async def discard(self, key: str) -> None:
        """Drop a blob's objects (it failed verification), in a worker thread."""
        await trio.to_thread.run_sync(self.tier.discard, key, abandon_on_cancel=True)

    async def _publish(self, key: str, chunk: int, data: bytes) -> None:
        """Write the object, then drop the marker; a hung filesystem is abandoned, not waited for."""
        try:
            await trio.to_thread.run_sync(self.tier.publish, key, chunk, data, abandon_on_cancel=True)
        finally:
            with trio.CancelScope(shield=True):
                await self._ask(self.tier.release, key, chunk)


# -- pruning (one node, from a timer) ---------------------------------------------


@dataclass(frozen=True)
class PruneResult:
    removed_blobs: int
    freed: int
    used: int
    leftovers: int  # stale temporary files and markers removed


@dataclass
class _BlobUsage:
    path: Path
    size: int
    last_used: float


def _scan(root: Path) -> Iterator[tuple[os.DirEntry[str], os.DirEntry[str]]]:
    """(blob directory, entry) for everything under ``root/objects``."""
    objects = root / "objects"
    for fan in _entries(objects):
        for blob in _entries(Path(fan.path)):
            if blob.is_dir(follow_symlinks=False):
                for entry in _entries(Path(blob.path)):
                    yield blob, entry


def _entries(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except OSError:
        return []


def shared_usage(directory: Path) -> int:
    """Bytes of objects in the shared tier at ``directory`` (a walk: for commands, not mounts)."""
    return sum(_size(entry) for _, entry in _scan(Path(directory) / FORMAT_DIR) if entry.name.isdigit())


def _size(entry: os.DirEntry[str]) -> int:
    try:
        return entry.stat(follow_symlinks=False).st_size
    except OSError:
        return 0


def prune(directory: Path, target: int, *, now: float | None = None) -> PruneResult:
    """Shrink the shared tier to at most ``target`` bytes, least recently used blobs first.

    A blob's last use is the newest day with an access marker, else the
    newest modification of its objects (when it was written). Removing objects
    that mounts are reading is safe: a reader with the file open keeps its
    bytes, one that opens it next misses and fetches from the source. Also
    removes temporary files and markers older than ``STALE_AFTER`` and access
    days whose blobs are all gone.
    """
    root = Path(directory) / FORMAT_DIR
    if not root.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no shared cache here", str(directory))
    now = time.time() if now is None else now
    blobs: dict[str, _BlobUsage] = {}
    leftovers = 0
    for blob, entry in _scan(root):
        try:
            status = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if entry.name.isdigit():
            usage = blobs.setdefault(blob.name, _BlobUsage(Path(blob.path), 0, 0.0))
            usage.size += status.st_size
            usage.last_used = max(usage.last_used, status.st_mtime)
        elif entry.name.startswith((TEMP_PREFIX, MARKER_PREFIX)) and now - status.st_mtime > STALE_AFTER:
            _unlink_quietly(Path(entry.path))
            leftovers += 1
    for day in sorted(_entries(root / "access"), key=lambda entry: entry.name):
        try:
            moment = calendar.timegm(time.strptime(day.name, "%Y-%m-%d"))
        except ValueError:
            continue
        names = _entries(Path(day.path))
        for marker in names:
            usage = blobs.get(marker.name)
            if usage is not None:
                usage.last_used = max(usage.last_used, moment + 86400 - 1)
        if not any(marker.name in blobs for marker in names):
            for marker in names:
                _unlink_quietly(Path(marker.path))
            try:
                os.rmdir(day.path)
            except OSError:
                pass
    used = sum(usage.size for usage in blobs.values())
    freed = removed = 0
    for usage in sorted(blobs.values(), key=lambda usage: usage.last_used):
        if used <= target:
            break
        for entry in _entries(usage.path):
            if entry.name.isdigit():
                size = _size(entry)
                try:
                    os.unlink(entry.path)
                except OSError:
                    continue
                used -= size
                freed += size
        removed += 1
    return PruneResult(removed, freed, used, leftovers)


# -- small file helpers -------------------------------------------------------------


def _mkdir(path: Path) -> None:
    """Create a group-shared directory (setgid, 0750), whatever the umask; exists is fine."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return
    os.chmod(path, DIR_MODE)


def _mkdir_blob(path: Path) -> None:
    """Create a blob's directory and its fan-out parent."""
    _mkdir(path.parent)
    _mkdir(path)


def _marker_time(marker: Path) -> float:
    return marker.stat().st_mtime


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
