"""Blobs on disk: sparse files, the sqlite index of present blocks, eviction.

Presence is recorded per *block* (128 KiB), so a random small read fetches and
records one block; sequential readers fetch whole *chunks* (4 MiB, a run of
blocks) and record them with one sync and one transaction.

Everything here is synchronous and thread-safe so that the fetcher can call cheap
operations inline on the trio thread and push slow ones (fsync, hashing, eviction)
to worker threads. One sqlite connection and the table of open blobs are guarded
by one ``threading.Lock`` (``BlobStore._lock``); it is held for single index
transactions and for the open/evict decisions, never during network I/O, chunk
writes, hashing, ``fsync``, ``unlink`` or a sleep (docs/concurrency.md states the
rule and who may wait on whom). Questions the event loop asks (``cached_bytes``,
``usage``, the failure poll) go to a second, read-only connection with its own
lock, so they never wait for a writer. The on-disk format and the cross-process
rules are described in docs/cache-format.md.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from scicatfs.cache.errors import CacheError, IntegrityError

__all__ = [
    "BLOCK_SIZE",
    "CHUNK_SIZE",
    "INDEX_FILE",
    "Blob",
    "BlockWrite",
    "BlobInfo",
    "BlobStore",
    "Checksum",
    "Eviction",
    "Failure",
    "FileSpec",
    "Forgotten",
    "VerifyProblem",
    "blob_key",
    "default_budget",
    "is_disk_full",
]

log = logging.getLogger(__name__)

CHUNK_SIZE = 4 * 1024 * 1024
#: One SFTP request on OpenSSH (whose limit is 255 KiB) and a cheap random read.
BLOCK_SIZE = 128 * 1024
#: The index inside a cache directory (its presence marks the directory as a cache).
INDEX_FILE = "index.sqlite3"
DEFAULT_BUDGET = 10 * 1024**3
#: Format 1 recorded whole chunks; its rows are dropped on upgrade (refetched).
#: Format 3 added ``failures``: a scicatfs that does not know it would serve a failed file again.
SCHEMA_VERSION = 3
# A one-byte region far beyond any real file offset: every process that has a
# blob open holds a shared fcntl lock on it; an evictor needs the exclusive lock.
PIN_OFFSET = 1 << 62
OPEN_RETRIES = 50
#: How long a file version that failed verification answers EIO before one verified re-fetch is tried.
RETRY_FAILED_AFTER = 600.0
#: How long opening a blob waits for this process's own open or eviction of it, at most.
BUSY_WAIT = 30.0
#: How long the first process to create an index may hold it while switching it to WAL.
SETUP_WAIT = 30.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    key      TEXT PRIMARY KEY,
    size     INTEGER NOT NULL,
    checksum TEXT,
    complete INTEGER NOT NULL DEFAULT 0,
    atime    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    key    TEXT NOT NULL REFERENCES blobs(key) ON DELETE CASCADE,
    idx    INTEGER NOT NULL,
    length INTEGER NOT NULL,
    PRIMARY KEY (key, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS files (
    pid  TEXT NOT NULL,
    path TEXT NOT NULL,
    key  TEXT NOT NULL REFERENCES blobs(key) ON DELETE CASCADE,
    PRIMARY KEY (pid, path)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS files_by_key ON files(key);
CREATE TABLE IF NOT EXISTS local_files (
    path     TEXT PRIMARY KEY,
    version  TEXT NOT NULL,
    checksum TEXT NOT NULL,
    atime    REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS failures (
    key       TEXT PRIMARY KEY,
    pid       TEXT NOT NULL,
    path      TEXT NOT NULL,
    message   TEXT NOT NULL,
    failed_at REAL NOT NULL,
    retry_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS failures_by_time ON failures(failed_at);
"""


class Checksum(Protocol):
    """What the cache needs of a checksum: a hashlib name and a hex digest; str() is "algorithm:hex"."""

    @property
    def algorithm(self) -> str: ...

    @property
    def hexdigest(self) -> str: ...


@dataclass(frozen=True, slots=True)
class FileSpec:
    """What the cache needs to know about one dataset file (see docs/architecture.md).

    ``source`` is the URL its bytes are read from (``sftp://host/path``,
    ``file:///path``, ``https://...``); every process sharing a cache must
    build it the same way (``scicatfs.stack``), because a file without a
    checksum is keyed on it.
    """

    pid: str
    path: str
    source: str
    remote_path: str
    size: int
    mtime: float
    checksum: Checksum | None


def default_budget(directory: Path) -> int:
    """The budget when none is configured: min(10 GiB, 10 % of the filesystem holding ``directory``).

    ``directory`` need not exist yet; its nearest existing parent decides.
    """
    existing = Path(directory)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    stats = os.statvfs(existing)
    return min(DEFAULT_BUDGET, stats.f_blocks * stats.f_frsize // 10)


def blob_key(spec: FileSpec) -> str:
    """The content key of a file: its checksum when the catalog has one, else its identity.

    The identity is the source URL (which names the server and the path), the
    size and the mtime, so two sources never share a blob of a file without a
    checksum. The size is part of both forms, so a catalog that pairs one checksum with two
    sizes cannot make two different files share a blob.
    """
    if spec.checksum is not None:
        return f"{spec.checksum.algorithm}:{spec.checksum.hexdigest.lower()}:{spec.size}"
    identity = f"{spec.source}\0{spec.size}\0{spec.mtime!r}"
    return f"id:{hashlib.sha256(identity.encode()).hexdigest()}:{spec.size}"


@dataclass(eq=False)
class Blob:
    """One open blob file, shared by every reader of the same content in this process.

    ``present`` (block indices) mirrors the index for this process; blocks
    written by another process appear after ``BlobStore.refresh_blocks``.
    """

    key: str
    file: Path
    fd: int
    size: int
    checksum: Checksum | None
    chunk_size: int
    block_size: int
    present: set[int] = field(default_factory=set)
    complete: bool = False
    error: IntegrityError | None = None
    #: When a recorded failure of this blob may be retried (a verified re-fetch), if it failed.
    retry_at: float | None = None
    pins: int = 0

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    @property
    def block_count(self) -> int:
        return -(-self.size // self.block_size)

    def block_length(self, index: int) -> int:
        return min(self.block_size, self.size - index * self.block_size)

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk_size // self.block_size

    @property
    def all_present(self) -> bool:
        return len(self.present) == self.block_count

    @property
    def present_bytes(self) -> int:
        # arithmetic, not iteration: worker threads add to ``present`` concurrently
        count = len(self.present)
        last = self.block_count - 1
        short = self.block_size - self.block_length(last) if last in self.present else 0
        return count * self.block_size - short


@dataclass(eq=False, slots=True)
class BlockWrite:
    """Consecutive blocks of a blob from block ``first``, to be durably written and recorded
    (``BlobStore.write_many``); ``error`` tells how it went once the call returns."""

    blob: Blob
    first: int
    data: bytes
    #: ``data`` is this whole file: verified in memory, and its rows also mark the blob complete.
    whole: FileSpec | None = None
    #: OSError (disk full, ...) or IntegrityError; the caller of ``write_many`` may put others here.
    error: Exception | None = None
    completes: bool = field(default=False, init=False)
    done: bool = field(default=False, init=False)  # synced and recorded, or given up

    @property
    def count(self) -> int:
        return -(-len(self.data) // self.blob.block_size)


@dataclass(frozen=True, slots=True)
class Failure:
    """A recorded verification failure: this blob's bytes must not be served (see ``record_failure``)."""

    key: str
    pid: str
    path: str
    message: str
    failed_at: float
    retry_at: float


@dataclass(frozen=True, slots=True)
class Forgotten:
    """What ``BlobStore.forget`` did: blobs dropped, and blobs left because a mount has them open."""

    dropped: int
    failures_cleared: int
    in_use: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Eviction:
    """What one eviction pass did."""

    freed: int
    skipped_in_use: int


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One (pid, path) -> blob mapping as the ``cache`` commands show it."""

    pid: str
    path: str
    key: str
    file: Path
    size: int
    present_bytes: int
    complete: bool
    atime: float
    checksum: str | None = None


class BlobStore:
    """The persistent cache directory: ``index.sqlite3`` plus ``blobs/xx/<name>`` files."""

    def __init__(
        self, directory: Path, budget: int, chunk_size: int = CHUNK_SIZE, block_size: int = BLOCK_SIZE
    ) -> None:
        if budget < 0:
            raise ValueError(f"cache budget must not be negative, got {budget}")
        if chunk_size <= 0 or block_size <= 0:
            raise ValueError(f"chunk and block size must be positive, got {chunk_size} and {block_size}")
        block_size = min(block_size, chunk_size)
        if chunk_size % block_size:
            raise ValueError(f"chunk size {chunk_size} is not a multiple of the block size {block_size}")
        self.directory = Path(directory)
        self.budget = budget
        self.chunk_size = chunk_size
        self.block_size = block_size
        self._blobs_dir = self.directory / "blobs"
        self._lock = threading.Lock()
        self._open: dict[str, Blob] = {}
        #: The (pid, path) names each open blob's index rows already record (see ``pin_open``).
        self._named: dict[str, set[tuple[str, str]]] = {}
        #: Keys that one thread is opening or evicting outside ``_lock``; others wait on the event.
        self._busy: dict[str, threading.Event] = {}
        #: Access times of released blobs, not yet in the index: written by the next write
        #: transaction (``_transaction``), so that a release needs neither a transaction nor a thread.
        self._atimes: dict[str, float] = {}
        self._read_lock = threading.Lock()
        _STORES.add(self)
        #: Group commit of block writes: runs written but not yet synced and recorded, and
        #: whether a thread is recording a batch right now (``write_many``).
        self._commit = threading.Condition(threading.Lock())
        self._pending: list[BlockWrite] = []
        self._committing = False
        #: syncs: fdatasync calls of blob files; commits: index transactions recording blocks.
        self.stats = {"syncs": 0, "commits": 0}
        try:
            _make_private_dir(self.directory)
            _make_private_dir(self._blobs_dir)
            self._db = self._connect(self.directory / INDEX_FILE)
            self._reader = sqlite3.connect(
                f"file:{self.directory / INDEX_FILE}?mode=ro", uri=True, check_same_thread=False,
                isolation_level=None, timeout=30,
            )  # fmt: skip
        except (OSError, sqlite3.Error) as error:
            raise CacheError(f"cannot use cache directory {self.directory}: {error}") from error

    def _connect(self, path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        _use_wal(db)
        # NORMAL in WAL mode survives a process crash; after power loss the
        # newest transactions may be lost, which only forgets chunks (safe).
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, 1, 2, SCHEMA_VERSION):
            raise CacheError(
                f"cache index {path} has format {version}, this scicatfs knows {SCHEMA_VERSION};"
                " use another --cache-dir or delete this one"
            )
        db.executescript(SCHEMA)
        if version == 1:  # rows of whole chunks: forgetting them is safe, the data is refetched
            db.executescript("DELETE FROM chunks; UPDATE blobs SET complete = 0;")
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f"{path}{suffix}", 0o600)
        return db

    def close(self) -> None:
        with self._lock:
            for blob in self._open.values():
                os.close(blob.fd)
                self._atimes[blob.key] = time.time()
            self._open.clear()
            self._named.clear()
            if self._atimes:
                self._touch([])  # writes the pending access times
            self._db.close()
        with self._read_lock:
            self._reader.close()

    def __enter__(self) -> BlobStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on the shared connection; caller holds ``_lock``.

        It also writes the access times of blobs released since the last one
        (lost with it if it rolls back: they only order eviction).
        """
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if self._atimes:
                atimes, self._atimes = self._atimes, {}
                self._db.executemany("UPDATE blobs SET atime = ? WHERE key = ?", [(t, k) for k, t in atimes.items()])
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _index_errors(self) -> Iterator[None]:
        """Turn sqlite failures (disk full, a corrupt index) into a CacheError that says where."""
        try:
            yield
        except sqlite3.Error as error:
            raise CacheError(f"cache index {self.directory / INDEX_FILE}: {error}") from error

    def _query(self, sql: str, parameters: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """A read on the read-only connection: never waits for ``_lock`` or a writer."""
        with self._read_lock, self._index_errors():
            return self._reader.execute(sql, parameters).fetchall()

    def _touch(self, statements: list[tuple[str, tuple[object, ...]]]) -> None:
        """Bookkeeping (access times, the (pid, path) map) that must not fail a read.

        On a full disk the index may refuse even these rows; reads go on.
        Caller holds ``_lock``.
        """
        try:
            with self._transaction() as db:
                for sql, parameters in statements:
                    db.execute(sql, parameters)
        except sqlite3.Error as error:  # full disk; or the blob row itself could not be written
            log.debug("cache index not updated: %s", error)

    def blob_file(self, key: str) -> Path:
        name = hashlib.sha256(key.encode()).hexdigest()
        return self._blobs_dir / name[:2] / name

    # -- open / pin ------------------------------------------------------------

    @contextlib.contextmanager
    def _claim(self, key: str) -> Iterator[Blob | None]:
        """Hold ``key`` against this process's other openers and evictors, without ``_lock``.

        Yields the blob if it is already open (pinned once more, nothing claimed),
        else None with the key claimed until the block ends. Waiting for another
        thread's claim happens outside ``_lock``, so a slow open or eviction of one
        blob never stalls the index for everyone else.
        """
        deadline = time.monotonic() + BUSY_WAIT
        while True:
            with self._lock:
                blob = self._open.get(key)
                if blob is not None:
                    blob.pins += 1
                    break
                busy = self._busy.get(key)
                if busy is None:
                    mine = self._busy[key] = threading.Event()
                    break
            if not busy.wait(max(0.0, deadline - time.monotonic())):
                raise CacheError(f"cache blob {self.blob_file(key)} stayed busy for {BUSY_WAIT:g} s")
        if blob is not None:
            yield blob
            return
        try:
            yield None
        finally:
            with self._lock:
                del self._busy[key]
            mine.set()

    def open_blob(self, spec: FileSpec) -> Blob:
        """Pin the blob for ``spec`` (creating it empty if new) and record (pid, path) -> blob.

        A recorded verification failure comes back as ``blob.error`` (and ``retry_at``).
        """
        key = blob_key(spec)
        touch: list[tuple[str, tuple[object, ...]]] = [
            ("UPDATE blobs SET atime = ? WHERE key = ?", (time.time(), key)),
            ("INSERT OR REPLACE INTO files (pid, path, key) VALUES (?, ?, ?)", (spec.pid, spec.path, key)),
        ]
        with self._claim(key) as blob:
            if blob is not None:
                with self._lock:
                    self._touch(touch)
                    self._named.setdefault(key, set()).add((spec.pid, spec.path))
                return blob
            path = self.blob_file(key)
            fd, created = self._pin_file(path)
            try:
                with self._lock, self._index_errors():
                    blob = self._load(key, spec, path, fd, created, touch)
                    blob.pins = 1
                    self._open[key] = blob
                    self._named[key] = {(spec.pid, spec.path)}
                    return blob
            except BaseException:
                os.close(fd)
                raise

    def _pin_file(self, path: Path) -> tuple[int, bool]:
        """Open and pin-lock the blob file; returns (fd, created). Called with the key claimed.

        Order matters against an evictor in another process: we hold the shared
        pin lock and have checked that the path still names our inode *before*
        trusting any chunk rows, and the evictor deletes rows before unlinking.
        The retries (another process is evicting this blob right now) sleep
        without ``_lock``.
        """
        path.parent.mkdir(mode=0o700, exist_ok=True)
        for _ in range(OPEN_RETRIES):
            created = True
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                created = False
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
            try:
                fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, PIN_OFFSET)
                if os.fstat(fd).st_ino != os.stat(path).st_ino:
                    raise FileNotFoundError(path)
                os.fchmod(fd, 0o600)
            except (BlockingIOError, PermissionError, FileNotFoundError):
                os.close(fd)
                time.sleep(0.01)
                continue
            except BaseException:
                os.close(fd)
                raise
            return fd, created
        raise CacheError(f"cannot open cache blob {path}: it keeps being evicted")

    def _load(
        self, key: str, spec: FileSpec, path: Path, fd: int, created: bool,
        touch: list[tuple[str, tuple[object, ...]]],
    ) -> Blob:  # fmt: skip
        """Read the blob's rows; ``touch`` (open's bookkeeping) shares the one transaction. Holds ``_lock``."""
        checksum = str(spec.checksum) if spec.checksum is not None else None
        try:
            with self._transaction() as db:
                if created:  # rows without their file (deleted by hand?) describe nothing
                    _forget_blocks(db, key)
                db.execute(
                    "INSERT OR IGNORE INTO blobs (key, size, checksum, atime) VALUES (?, ?, ?, ?)",
                    (key, spec.size, checksum, time.time()),
                )
                for sql, parameters in touch:
                    db.execute(sql, parameters)
        except sqlite3.OperationalError as error:
            # A full disk must not fail the open: reads are then served uncached
            # (the chunk writes fail and say so). A new file trusts no rows, since
            # the stale ones could not be deleted.
            if getattr(error, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL:
                raise
            if created:
                blob = Blob(key, path, fd, spec.size, spec.checksum, self.chunk_size, self.block_size)
                self._apply_failure(blob, self._db)
                return blob
        state = self._db.execute("SELECT complete FROM blobs WHERE key = ?", (key,)).fetchone()
        present = {row[0] for row in self._db.execute("SELECT idx FROM chunks WHERE key = ?", (key,))}
        blob = Blob(key, path, fd, spec.size, spec.checksum, self.chunk_size, self.block_size, present)
        blob.complete = bool(state and state[0]) and blob.all_present
        self._apply_failure(blob, self._db)
        return blob

    def adopt(self, key: str, make: Callable[[], Blob]) -> tuple[Blob, bool]:
        """Pin the open blob ``key``, or ``make()`` one that lives outside the blob directory.

        For blobs the store does not hold on disk (a local source file read in
        place): they share the table of open blobs, so that pins, ``retain`` and
        ``release_blob`` work as for any blob. Returns the blob and whether
        ``make`` was called.
        """
        with self._lock:
            blob = self._open.get(key)
            made = blob is None
            if blob is None:
                blob = self._open[key] = make()
            blob.pins += 1
            return blob, made

    def load_failure(self, blob: Blob) -> None:
        """Give a blob that ``adopt`` made its recorded failure, if it has one (as ``open_blob`` does)."""
        with self._lock, self._index_errors():
            self._apply_failure(blob, self._db)

    def clear_failure(self, blob: Blob) -> None:
        """Forget a blob's recorded failure: its bytes verified after all (a local file hashed again)."""
        with self._lock, self._index_errors(), self._transaction() as db:
            db.execute("DELETE FROM failures WHERE key = ?", (blob.key,))
        blob.error = blob.retry_at = None

    @staticmethod
    def _apply_failure(blob: Blob, db: sqlite3.Connection) -> None:
        row = db.execute("SELECT message, retry_at FROM failures WHERE key = ?", (blob.key,)).fetchone()
        if row is not None:
            blob.error, blob.retry_at = IntegrityError(row[0]), row[1]
            blob.complete = False

    def pin_open(self, spec: FileSpec) -> Blob | None:
        """Pin ``spec``'s blob if this process has it open under this name already; no I/O.

        The fetcher's open of a file that is being fetched ahead, or that another
        handle holds, then needs no worker thread: the blob's rows and its
        (pid, path) row were written by the open that pinned it first. Its
        access time is written when the last pin goes (``release_blob``).
        """
        key = blob_key(spec)
        with self._lock:
            blob = self._open.get(key)
            if blob is None or (spec.pid, spec.path) not in self._named.get(key, ()):
                return None
            blob.pins += 1
            return blob

    def unpin_unless_last(self, blob: Blob) -> bool:
        """Drop a pin that is not the last one (True), in memory; the last needs ``release_blob``."""
        with self._lock:
            if blob.pins <= 1:
                return False
            blob.pins -= 1
            return True

    def release_blob(self, blob: Blob, timeout: float = -1) -> bool:
        """Unpin; the last release closes the file (which drops this process's locks).

        No index I/O: the access time is written by the next write transaction
        (``_transaction``), so the event loop may call this inline, with a
        ``timeout`` for ``_lock`` (a worker may hold it while sqlite waits for
        another process): False if it was not free in time, and nothing done.
        """
        if not self._lock.acquire(timeout=timeout):
            return False
        with contextlib.ExitStack() as held:
            held.callback(self._lock.release)
            blob.pins -= 1
            if blob.pins == 0:
                del self._open[blob.key]
                self._named.pop(blob.key, None)
                os.close(blob.fd)
                self._atimes[blob.key] = time.time()
        return True

    def retain(self, blob: Blob) -> None:
        """One more pin on an already open blob (background work outliving a handle)."""
        with self._lock:
            blob.pins += 1

    def open_blobs(self) -> list[Blob]:
        """The blobs this process has open right now (a snapshot)."""
        with self._lock:
            return list(self._open.values())

    # -- chunks ----------------------------------------------------------------

    def read(self, blob: Blob, offset: int, size: int) -> bytes:
        """pread from the blob; the caller has checked that the blocks are present."""
        return os.pread(blob.fd, size, offset)

    def write_chunk(self, blob: Blob, index: int, data: bytes) -> None:
        """Durably write and record one whole chunk (``write_blocks`` of its blocks)."""
        if len(data) != blob.chunk_length(index):
            raise ValueError(f"chunk {index} of {blob.key} must be {blob.chunk_length(index)} bytes")
        self.write_blocks(blob, index * blob.blocks_per_chunk, data)

    def write_blocks(
        self, blob: Blob, first: int, data: bytes, whole: FileSpec | None = None,
        retry_after: float = RETRY_FAILED_AFTER,
    ) -> None:  # fmt: skip
        """Durably write consecutive blocks from block ``first``, then record them (``write_many`` of one run).

        Raises what ``write_many`` reports for the run: OSError (e.g. ENOSPC) or
        IntegrityError, with nothing of the run recorded.
        """
        write = BlockWrite(blob, first, data, whole)
        self.write_many([write], retry_after)
        if write.error is not None:
            raise write.error

    def write_many(self, writes: Sequence[BlockWrite], retry_after: float = RETRY_FAILED_AFTER) -> None:
        """Durably write runs of blocks, then record them; each run's ``error`` says if it failed.

        Data first (``fdatasync``), index rows second (a transaction): a crash
        between the two leaves bytes that no row vouches for, which the next
        start ignores. All the runs of one call, and the runs of other threads
        that arrive while a round is being synced and committed, are recorded
        together (group commit): one ``fdatasync`` per blob file touched, then
        one transaction for all their rows. Returns once every run is recorded
        or has failed. A run's ``data`` must end on a block boundary or at the
        end of the file.

        A run with ``whole`` holds that whole file (a small file fetched in one
        piece): it is checked against the blob's checksum in memory before
        anything is written, and the transaction that records its blocks also
        marks the blob complete, so a small file costs no separate
        ``complete``. A mismatch is recorded as ``complete`` records one and
        becomes the run's IntegrityError, with nothing written.
        """
        written = []
        for write in writes:
            try:
                self._write_run(write, retry_after)
            except (OSError, IntegrityError) as error:
                write.error, write.done = error, True
                continue
            written.append(write)
        with self._commit:
            self._pending.extend(written)
            while not all(write.done for write in written):
                if self._committing:
                    self._commit.wait()
                    continue
                batch, self._pending, self._committing = self._pending, [], True
                self._commit.release()
                try:
                    self._record(batch)
                finally:
                    self._commit.acquire()
                    self._committing = False
                    self._commit.notify_all()

    def _write_run(self, write: BlockWrite, retry_after: float) -> None:
        """Check one run (and verify it if it is a whole file), then ``pwrite`` it; no sync, no row."""
        blob, data = write.blob, write.data
        offset = write.first * self.block_size
        if not data or offset + len(data) != min(offset + write.count * self.block_size, blob.size):
            raise ValueError(f"{len(data)} bytes at block {write.first} of {blob.key} are not whole blocks")
        whole = write.whole
        write.completes = whole is not None and write.first == 0 and len(data) == blob.size and not blob.complete
        if write.completes and blob.checksum is not None:
            assert whole is not None
            self._check_digest(blob, whole, lambda algorithm: hashlib.new(algorithm, data).hexdigest(), retry_after)
        view = memoryview(data)
        while view:
            done = os.pwrite(blob.fd, view, offset)
            view = view[done:]
            offset += done

    def _record(self, batch: list[BlockWrite]) -> None:
        """Make a batch of written runs durable (one sync per blob file), then record them in one transaction.

        Called by one thread at a time (the round's leader) without any lock;
        every run of the batch is ``done`` afterwards, with ``error`` set if
        its blob could not be synced or the transaction failed.
        """
        try:
            by_blob: dict[int, list[BlockWrite]] = {}
            for run in batch:
                by_blob.setdefault(id(run.blob), []).append(run)
            synced: list[BlockWrite] = []
            for runs in by_blob.values():
                try:
                    os.fdatasync(runs[0].blob.fd)
                except OSError as error:
                    for run in runs:
                        run.error = error
                    continue
                synced.extend(runs)
            self.stats["syncs"] += len(by_blob)
            if not synced:
                return
            rows = [
                (run.blob.key, index, run.blob.block_length(index))
                for run in synced
                for index in range(run.first, run.first + run.count)
            ]
            completed = [run.blob for run in synced if run.completes]
            try:
                with self._lock, self._transaction() as db:
                    db.executemany("INSERT OR IGNORE INTO chunks (key, idx, length) VALUES (?, ?, ?)", rows)
                    for blob in completed:
                        _mark_complete(db, blob.key)
            except sqlite3.Error as error:  # the index shares the disk: it fills up too
                full = getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
                failure = OSError(errno.ENOSPC if full else errno.EIO, f"cache index: {error}")
                failure.__cause__ = error
                for run in synced:
                    run.error = failure
                return
            self.stats["commits"] += 1
            for run in synced:
                run.blob.present.update(range(run.first, run.first + run.count))
            for blob in completed:
                blob.complete = True
                blob.error = blob.retry_at = None
        finally:
            for run in batch:
                run.done = True

    def refresh_blocks(self, blob: Blob, first: int, count: int) -> bool:
        """Are these blocks present, also counting what other processes recorded meanwhile?"""
        wanted = range(first, first + count)
        if blob.present.issuperset(wanted):
            return True
        rows = self._query(
            "SELECT idx FROM chunks WHERE key = ? AND idx >= ? AND idx < ?", (blob.key, first, first + count)
        )
        blob.present.update(row[0] for row in rows)
        return blob.present.issuperset(wanted)

    def try_lock_blocks(self, blob: Blob, first: int, count: int) -> bool:
        """Take the cross-process write lock on consecutive blocks' bytes, without waiting.

        fcntl locks belong to the process, so this only excludes other processes;
        within a process the fetcher's single-flight table keeps one writer per block.
        """
        try:
            fcntl.lockf(
                blob.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, count * self.block_size, first * self.block_size
            )
        except (BlockingIOError, PermissionError):
            return False
        return True

    def unlock_blocks(self, blob: Blob, first: int, count: int) -> None:
        fcntl.lockf(blob.fd, fcntl.LOCK_UN, count * self.block_size, first * self.block_size)

    # -- completion, verification and failures ---------------------------------

    def complete(
        self, blob: Blob, spec: FileSpec, digest: str | None = None, retry_after: float = RETRY_FAILED_AFTER
    ) -> None:
        """Mark a blob whose blocks are all present complete, after checking its checksum.

        Hashes the whole blob unless ``digest`` (the caller hashed the recorded
        blocks as they arrived) is given: call it from a worker thread. On a
        mismatch the failure is recorded (``record_failure``), the blob's blocks
        are forgotten and IntegrityError raised. A success clears an earlier
        failure of the blob: this was its verified re-fetch.
        """
        if blob.complete or not blob.all_present:
            return
        if blob.checksum is not None:
            try:
                self._check_digest(
                    blob, spec, lambda algorithm: digest or _digest_of_open(blob, algorithm), retry_after
                )
            except IntegrityError:
                self.discard(blob)
                raise
        with self._lock, self._index_errors(), self._transaction() as db:
            _mark_complete(db, blob.key)
        blob.complete = True
        blob.error = blob.retry_at = None

    def _check_digest(
        self, blob: Blob, spec: FileSpec, digest: Callable[[str], str], retry_after: float
    ) -> None:
        """Compare ``digest(algorithm)`` with the blob's checksum; a mismatch is recorded and raised."""
        assert blob.checksum is not None
        expected = blob.checksum.hexdigest.lower()
        try:
            actual = digest(blob.checksum.algorithm)
        except ValueError:  # the catalog layer should have dropped such checksums
            log.warning("cannot verify %s %s: unknown algorithm %r", spec.pid, spec.path,
                        blob.checksum.algorithm)  # fmt: skip
            return
        if actual != expected:
            error = IntegrityError(
                f"checksum mismatch for {spec.pid} {spec.path}: catalog says"
                f" {blob.checksum.algorithm}:{expected},"
                f" server sent {blob.checksum.algorithm}:{actual}; cached copy discarded"
            )
            self.record_failure(blob, spec, error, retry_after)
            raise error

    def record_failure(
        self, blob: Blob, spec: FileSpec, error: IntegrityError, retry_after: float = RETRY_FAILED_AFTER
    ) -> None:
        """Remember that ``blob``'s bytes failed verification, for every process and every restart.

        ``blob.error`` is set first, so that a reader racing with this sees it
        after its pread. Until ``retry_after`` seconds have passed, opening the
        blob answers the error; after that, one open re-fetches and verifies the
        whole file before any byte is served (the fetcher). If the index cannot
        take the row (disk full), the failure still holds in this process.
        """
        blob.error, blob.retry_at = error, time.time() + retry_after
        blob.complete = False
        try:
            with self._lock, self._transaction() as db:
                _write_failure(db, blob.key, spec.pid, spec.path, str(error), blob.retry_at)
        except sqlite3.Error as problem:
            log.warning("cannot record the failure of %s %s in the cache index: %s", spec.pid, spec.path, problem)

    def claim_retry(self, blob: Blob, retry_after: float = RETRY_FAILED_AFTER) -> bool:
        """Take the turn to re-fetch a failed blob whose retry time has come (once across processes).

        Pushes ``retry_at`` forward in the same transaction that checks it, so
        two processes (or a crash half-way through) never start two re-fetches
        in one retry period.
        """
        now = time.time()
        with self._lock, self._index_errors(), self._transaction() as db:
            claimed = db.execute(
                "UPDATE failures SET retry_at = ? WHERE key = ? AND retry_at <= ?",
                (now + retry_after, blob.key, now),
            ).rowcount
        if claimed:
            blob.retry_at = now + retry_after
        return bool(claimed)

    def failures_since(self, since: float) -> list[Failure]:
        """Failures recorded after ``since`` (POSIX time), by any process: the mount polls this."""
        rows = self._query(
            "SELECT key, pid, path, message, failed_at, retry_at FROM failures WHERE failed_at > ?"
            " ORDER BY failed_at", (since,),
        )  # fmt: skip
        return [Failure(*row) for row in rows]

    @staticmethod
    def _digest(file: Path, algorithm: str) -> str:
        with open(file, "rb") as stream:
            return hashlib.file_digest(stream, algorithm).hexdigest()

    def discard(self, blob: Blob) -> None:
        """Forget every block of a blob (rows first) and punch the file back to a hole."""
        with self._lock, self._index_errors(), self._transaction() as db:
            _forget_blocks(db, blob.key)
        blob.present.clear()
        blob.complete = False
        os.ftruncate(blob.fd, 0)

    def verify(self) -> list[VerifyProblem]:
        """Re-hash every complete blob that has a checksum; report, record and drop mismatches.

        Reading never disturbs a mount that has the blob open. A mismatching blob
        that no process has open is dropped; one that is open elsewhere is left in
        place (``in_use``) and its failure recorded, which that mount notices
        within its failure poll and then refuses to serve. Either way the next
        open re-fetches the file and verifies it before serving a byte.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT key, checksum FROM blobs WHERE complete = 1 AND checksum IS NOT NULL"
            ).fetchall()
        problems = []
        for key, checksum in rows:
            algorithm, _, expected = checksum.partition(":")
            try:
                actual = self._digest(self.blob_file(key), algorithm)
            except FileNotFoundError:
                actual = "missing file"
            if actual == expected.lower():
                continue
            message = f"the cached copy of {key} is damaged: expected {checksum}, found {algorithm}:{actual}"
            with self._claim(key) as blob:
                if blob is not None:  # open in this very process
                    self.release_blob(blob)
                pinned = blob is not None or self._pinned_elsewhere(key)
                with self._lock, self._index_errors(), self._transaction() as db:
                    names = db.execute("SELECT pid, path FROM files WHERE key = ? LIMIT 1", (key,)).fetchone()
                    pid, path = names if names else ("", "")
                    _write_failure(db, key, pid, path, message, retry_at=0.0)
                    if not pinned:
                        _forget_blocks(db, key)
            problems.append(VerifyProblem(key, checksum, f"{algorithm}:{actual}", in_use=pinned))
        return problems

    # -- local files (file:// sources, read in place) -------------------------

    def local_verified(self, path: Path, version: str, checksum: str) -> bool:
        """Was this version of local file ``path`` found to match ``checksum`` before?"""
        with self._lock, self._index_errors():
            row = self._db.execute(
                "SELECT 1 FROM local_files WHERE path = ? AND version = ? AND checksum = ?",
                (str(path), version, checksum),
            ).fetchone()
        return row is not None

    def remember_local(self, path: Path, version: str, checksum: str) -> None:
        """Record that this version of ``path`` matched ``checksum`` (a full disk only forgets it)."""
        with self._lock:
            self._touch([(
                "INSERT OR REPLACE INTO local_files (path, version, checksum, atime) VALUES (?, ?, ?, ?)",
                (str(path), version, checksum, time.time()),
            )])  # fmt: skip

    def _pinned_elsewhere(self, key: str) -> bool:
        """Does another process hold the pin lock of ``key``? Caller has claimed the key."""
        try:
            fd = os.open(self.blob_file(key), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, PIN_OFFSET)
        except (BlockingIOError, PermissionError):
            return True
        finally:
            os.close(fd)  # this process has no other descriptor of it (claimed, not open)
        return False

    def forget(self, pid: str, path: str | None = None) -> Forgotten:
        """Drop the cached copies and recorded failures of a dataset's files (``cache forget``).

        The next open fetches them as new files. Blobs that another process has
        open keep their bytes (a running mount may be reading them); their
        failure records are cleared all the same, which that mount honours once
        the file is no longer open there.
        """
        condition, parameters = ("pid = ?", (pid,)) if path is None else ("pid = ? AND path = ?", (pid, path))
        with self._lock:
            keys = [row[0] for row in self._db.execute(f"SELECT DISTINCT key FROM files WHERE {condition}", parameters)]
        dropped, cleared, in_use = 0, 0, []
        for key in keys:
            with self._lock, self._index_errors(), self._transaction() as db:
                cleared += db.execute("DELETE FROM failures WHERE key = ?", (key,)).rowcount
            with self._claim(key) as blob:
                if blob is not None:  # open in this process (a mount's own store)
                    in_use.append(key)
                    self.release_blob(blob)
                elif self._delete_unpinned(key):
                    dropped += 1
                else:
                    in_use.append(key)
        return Forgotten(dropped, cleared, tuple(in_use))

    # -- accounting ------------------------------------------------------------

    def usage(self) -> int:
        """Bytes of recorded blocks over all blobs (holes and torn writes not counted)."""
        return self._query("SELECT COALESCE(SUM(length), 0) FROM chunks")[0][0]

    def cached_bytes(self, spec: FileSpec) -> int:
        key = blob_key(spec)
        blob = self._open.get(key)
        if blob is not None:
            return blob.present_bytes
        # Called for every file that stat, ls -l and readdir show, on the event
        # loop: a complete blob is answered from its one row, not a sum over
        # its (up to thousands of) block rows; and from the read connection,
        # which no writer holds.
        rows = self._query(f"SELECT {_CACHED_BYTES} FROM blobs b WHERE b.key = ?", (key,))
        return rows[0][0] if rows else 0

    def entries(self, pid: str | None = None) -> list[BlobInfo]:
        """Every (pid, path) the index knows (of dataset ``pid`` only, if given), with how much is cached."""
        return self._entries("", ()) if pid is None else self._entries("WHERE f.pid = ?", (pid,))

    def where(self, pid: str, path: str) -> BlobInfo | None:
        """The blob file behind one dataset file, if the index maps it."""
        found = self._entries("WHERE f.pid = ? AND f.path = ?", (pid, path))
        return found[0] if found else None

    def _entries(self, condition: str, parameters: tuple[str, ...]) -> list[BlobInfo]:
        rows = self._query(
            f"""SELECT f.pid, f.path, b.key, b.size, b.complete, b.atime, b.checksum, {_CACHED_BYTES}
                FROM files f JOIN blobs b ON b.key = f.key {condition} ORDER BY f.pid, f.path""",
            parameters,
        )
        return [
            BlobInfo(pid, path, key, self.blob_file(key), size, present, bool(complete), atime, checksum)
            for pid, path, key, size, complete, atime, checksum, present in rows
        ]

    # -- eviction --------------------------------------------------------------

    def evict(self, target: int | None = None) -> Eviction:
        """Delete least recently used blobs, never pinned ones, until usage <= target.

        ``target`` defaults to the budget. Blobs open in another process are
        recognised by their shared pin lock and skipped. ``_lock`` is taken per
        blob, never across the whole pass, so opens and index writes interleave.
        """
        target = self.budget if target is None else target
        usage = self.usage()
        if usage <= target:
            return Eviction(0, 0)
        with self._lock:
            if self._atimes:  # the order below needs the access times of recent releases
                self._touch([])
        candidates = self._query(
            """SELECT b.key, (SELECT COALESCE(SUM(length), 0) FROM chunks c WHERE c.key = b.key)
               FROM blobs b ORDER BY b.atime"""
        )
        freed = skipped = 0
        for key, size in candidates:
            if usage - freed <= target:
                break
            with self._claim(key) as blob:
                if blob is not None:  # open here: never evicted
                    self.release_blob(blob)
                    skipped += bool(size)
                elif self._delete_unpinned(key):
                    freed += size
                else:
                    skipped += bool(size)
        if freed:
            log.info("cache eviction freed %d bytes (budget %d bytes)", freed, target)
        return Eviction(freed, skipped)

    def _delete_rows(self, key: str) -> None:
        """Delete a blob's row (its block and file rows cascade); raises sqlite3 errors as they are."""
        with self._lock, self._transaction() as db:
            db.execute("DELETE FROM blobs WHERE key = ?", (key,))

    def _delete_unpinned(self, key: str) -> bool:
        """Delete one blob unless another process has it open. Caller has claimed ``key``.

        Only the index transaction holds ``_lock``; the unlink does not.
        """
        path = self.blob_file(key)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = None
        try:
            if fd is not None:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, PIN_OFFSET)
                except (BlockingIOError, PermissionError):
                    return False
            try:
                self._delete_rows(key)
            except sqlite3.OperationalError as error:
                if fd is None or getattr(error, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL:
                    raise CacheError(f"cache index {self.directory / INDEX_FILE}: {error}") from error
                # Not a byte left, not even for the index's own deletes: free the blob's
                # bytes first. No process can trust its rows meanwhile, since trusting
                # them needs the pin lock that this evictor holds exclusively.
                os.ftruncate(fd, 0)
                self._delete_rows(key)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return True
        finally:
            if fd is not None:
                os.close(fd)


@dataclass(frozen=True, slots=True)
class VerifyProblem:
    """One blob whose cached bytes no longer match its checksum (``BlobStore.verify``)."""

    key: str
    expected: str
    found: str
    in_use: bool

    def __str__(self) -> str:
        return f"{self.key}: expected {self.expected}, found {self.found}"


#: Every store of this process, so that a fork never lands in the middle of one of their transactions.
_STORES: weakref.WeakSet[BlobStore] = weakref.WeakSet()


def _quiesce_before_fork() -> None:
    """Hold every store's locks across ``fork``: no index transaction is then half-way through.

    sqlite keeps the state of this process's locks in memory, and a child
    inherits it: had another thread been inside a transaction at the fork,
    the child's own new connections could find that phantom writer
    ("database is locked"). A forked Dask worker or a forking data loader
    builds its own store in the child, so the parent's must be at rest.
    """
    for store in list(_STORES):
        store._lock.acquire()
        store._read_lock.acquire()


def _release_after_fork() -> None:
    for store in list(_STORES):
        if store._read_lock.locked():
            store._read_lock.release()
        if store._lock.locked():
            store._lock.release()


os.register_at_fork(
    before=_quiesce_before_fork, after_in_parent=_release_after_fork, after_in_child=_release_after_fork
)


def _use_wal(db: sqlite3.Connection) -> None:
    """Switch the index to WAL, waiting for a process that is creating it at the same moment.

    Changing the journal mode needs the database to itself, and sqlite answers
    "database is locked" at once instead of calling the busy handler when two
    processes open a brand-new index together; so retry for a bounded time.
    """
    deadline = time.monotonic() + SETUP_WAIT
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            if db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal":
                return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise sqlite3.OperationalError("could not switch the cache index to WAL mode")
        time.sleep(0.02)


#: Bytes cached of blob ``b``: all of it once complete (set only when every block is recorded).
_CACHED_BYTES = (
    "CASE WHEN b.complete THEN b.size"
    " ELSE (SELECT COALESCE(SUM(length), 0) FROM chunks c WHERE c.key = b.key) END"
)


def _digest_of_open(blob: Blob, algorithm: str) -> str:
    """Hash an open blob through its own descriptor.

    Opening the blob's path again and closing it would drop every fcntl lock
    this process holds on the file (POSIX locks die with any descriptor), the
    pin lock included: another process could then evict a blob still open here.
    """
    hasher = hashlib.new(algorithm)
    offset = 0
    while piece := os.pread(blob.fd, 1 << 20, offset):
        hasher.update(piece)
        offset += len(piece)
    return hasher.hexdigest()


def _write_failure(db: sqlite3.Connection, key: str, pid: str, path: str, message: str, retry_at: float) -> None:
    """Record (or renew) a blob's failed verification, now; caller holds the transaction."""
    db.execute(
        "INSERT OR REPLACE INTO failures (key, pid, path, message, failed_at, retry_at) VALUES (?, ?, ?, ?, ?, ?)",
        (key, pid, path, message, time.time(), retry_at),
    )


def _mark_complete(db: sqlite3.Connection, key: str) -> None:
    """Every block of the blob is recorded and verified: mark it so, and forget an earlier failure."""
    db.execute("UPDATE blobs SET complete = 1 WHERE key = ?", (key,))
    db.execute("DELETE FROM failures WHERE key = ?", (key,))


def _forget_blocks(db: sqlite3.Connection, key: str) -> None:
    """Drop a blob's block rows and its completeness together (caller holds the transaction)."""
    db.execute("DELETE FROM chunks WHERE key = ?", (key,))
    db.execute("UPDATE blobs SET complete = 0 WHERE key = ?", (key,))


def _make_private_dir(path: Path) -> None:
    """Create ``path`` if needed and make it 0700 whatever the umask (cached data is private)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError as error:
        raise CacheError(f"cannot use cache directory {path}: it exists and is not a directory") from error
    if not path.is_dir():
        raise CacheError(f"cannot use cache directory {path}: it exists and is not a directory")
    os.chmod(path, 0o700)


def is_disk_full(error: OSError) -> bool:
    """Errors that mean "no room to cache", after which reads stream uncached."""
    return error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
