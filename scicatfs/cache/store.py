"""Blobs on disk: sparse files, the sqlite index of present blocks, eviction.

Presence is recorded per *block* (128 KiB), so a random small read fetches and
records one block; sequential readers fetch whole *chunks* (4 MiB, a run of
blocks) and record them with one sync and one transaction.

Everything here is synchronous and thread-safe so that the fetcher can call cheap
operations inline on the trio thread and push slow ones (fsync, hashing, eviction)
to worker threads. One sqlite connection and the table of open blobs are guarded
by one ``threading.Lock`` (``BlobStore._lock``); it is held for single index
transactions and for the open/evict decisions, never during network I/O, chunk
writes or hashing. The on-disk format and the cross-process rules are described
in docs/cache-format.md.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from scicatfs.cache.errors import CacheError, IntegrityError

__all__ = [
    "BLOCK_SIZE",
    "CHUNK_SIZE",
    "INDEX_FILE",
    "Blob",
    "BlobInfo",
    "BlobStore",
    "Checksum",
    "FileSpec",
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
SCHEMA_VERSION = 2
# A one-byte region far beyond any real file offset: every process that has a
# blob open holds a shared fcntl lock on it; an evictor needs the exclusive lock.
PIN_OFFSET = 1 << 62
OPEN_RETRIES = 50

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
        try:
            _make_private_dir(self.directory)
            _make_private_dir(self._blobs_dir)
            self._db = self._connect(self.directory / INDEX_FILE)
        except (OSError, sqlite3.Error) as error:
            raise CacheError(f"cannot use cache directory {self.directory}: {error}") from error

    def _connect(self, path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash; after power loss the
        # newest transactions may be lost, which only forgets chunks (safe).
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, 1, SCHEMA_VERSION):
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
            self._open.clear()
            self._db.close()

    def __enter__(self) -> BlobStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on the shared connection; caller holds ``_lock``."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
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

    def open_blob(self, spec: FileSpec) -> Blob:
        """Pin the blob for ``spec`` (creating it empty if new) and record (pid, path) -> blob."""
        key = blob_key(spec)
        touch: list[tuple[str, tuple[object, ...]]] = [
            ("UPDATE blobs SET atime = ? WHERE key = ?", (time.time(), key)),
            ("INSERT OR REPLACE INTO files (pid, path, key) VALUES (?, ?, ?)", (spec.pid, spec.path, key)),
        ]
        with self._lock, self._index_errors():
            blob = self._open.get(key)
            if blob is None:
                blob = self._open[key] = self._open_file(key, spec, touch)
            else:
                self._touch(touch)
            blob.pins += 1
            return blob

    def _open_file(self, key: str, spec: FileSpec, touch: list[tuple[str, tuple[object, ...]]]) -> Blob:
        """Open and pin-lock the blob file, then load what the index says is present.

        Order matters against an evictor in another process: we hold the shared
        pin lock and have checked that the path still names our inode *before*
        trusting any chunk rows, and the evictor deletes rows before unlinking.
        """
        path = self.blob_file(key)
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
            except (BlockingIOError, PermissionError, FileNotFoundError):
                os.close(fd)
                time.sleep(0.01)
                continue
            try:
                os.fchmod(fd, 0o600)
                return self._load(key, spec, path, fd, created, touch)
            except BaseException:
                os.close(fd)
                raise
        raise CacheError(f"cannot open cache blob {path}: it keeps being evicted")

    def _load(
        self, key: str, spec: FileSpec, path: Path, fd: int, created: bool,
        touch: list[tuple[str, tuple[object, ...]]],
    ) -> Blob:  # fmt: skip
        """Read the blob's rows; ``touch`` (open's bookkeeping) shares the one transaction."""
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
                return Blob(key, path, fd, spec.size, spec.checksum, self.chunk_size, self.block_size)
        state = self._db.execute("SELECT complete FROM blobs WHERE key = ?", (key,)).fetchone()
        present = {row[0] for row in self._db.execute("SELECT idx FROM chunks WHERE key = ?", (key,))}
        blob = Blob(key, path, fd, spec.size, spec.checksum, self.chunk_size, self.block_size, present)
        blob.complete = bool(state and state[0]) and blob.all_present
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

    def release_blob(self, blob: Blob) -> None:
        """Unpin; the last release closes the file (which drops this process's locks)."""
        with self._lock:
            blob.pins -= 1
            if blob.pins > 0:
                return
            del self._open[blob.key]
            os.close(blob.fd)
            self._touch([("UPDATE blobs SET atime = ? WHERE key = ?", (time.time(), blob.key))])

    def retain(self, blob: Blob) -> None:
        """One more pin on an already open blob (background work outliving a handle)."""
        with self._lock:
            blob.pins += 1

    # -- chunks ----------------------------------------------------------------

    def read(self, blob: Blob, offset: int, size: int) -> bytes:
        """pread from the blob; the caller has checked that the blocks are present."""
        return os.pread(blob.fd, size, offset)

    def write_chunk(self, blob: Blob, index: int, data: bytes) -> None:
        """Durably write and record one whole chunk (``write_blocks`` of its blocks)."""
        if len(data) != blob.chunk_length(index):
            raise ValueError(f"chunk {index} of {blob.key} must be {blob.chunk_length(index)} bytes")
        self.write_blocks(blob, index * blob.blocks_per_chunk, data)

    def write_blocks(self, blob: Blob, first: int, data: bytes) -> None:
        """Durably write consecutive blocks from block ``first``, then record them.

        Data first (one ``fdatasync``), index rows second (one transaction): a
        crash between the two leaves bytes that no row vouches for, which the
        next start ignores. ``data`` must end on a block boundary or at the end
        of the file. Raises OSError (e.g. ENOSPC) with nothing recorded.
        """
        offset = first * self.block_size
        count = -(-len(data) // self.block_size)
        if not data or offset + len(data) != min(offset + count * self.block_size, blob.size):
            raise ValueError(f"{len(data)} bytes at block {first} of {blob.key} are not whole blocks")
        view = memoryview(data)
        while view:
            written = os.pwrite(blob.fd, view, offset)
            view = view[written:]
            offset += written
        os.fdatasync(blob.fd)
        rows = [(blob.key, index, blob.block_length(index)) for index in range(first, first + count)]
        try:
            with self._lock, self._transaction() as db:
                db.executemany("INSERT OR IGNORE INTO chunks (key, idx, length) VALUES (?, ?, ?)", rows)
        except sqlite3.Error as error:  # the index shares the disk: it fills up too
            full = getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            raise OSError(errno.ENOSPC if full else errno.EIO, f"cache index: {error}") from error
        blob.present.update(range(first, first + count))

    def refresh_blocks(self, blob: Blob, first: int, count: int) -> bool:
        """Are these blocks present, also counting what other processes recorded meanwhile?"""
        wanted = range(first, first + count)
        if blob.present.issuperset(wanted):
            return True
        with self._lock:
            rows = self._db.execute(
                "SELECT idx FROM chunks WHERE key = ? AND idx >= ? AND idx < ?",
                (blob.key, first, first + count),
            ).fetchall()
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

    # -- completion and verification -----------------------------------------

    def complete(self, blob: Blob, spec: FileSpec, digest: str | None = None) -> None:
        """Mark a blob whose blocks are all present complete, after checking its checksum.

        Hashes the whole blob unless ``digest`` (the caller hashed the recorded
        blocks as they arrived) is given: call it from a worker thread. On a
        mismatch the blob's blocks are forgotten, ``blob.error`` is set and
        IntegrityError raised.
        """
        if blob.complete or not blob.all_present:
            return
        if blob.checksum is not None:
            try:
                actual = digest or self._digest(blob.file, blob.checksum.algorithm)
            except ValueError:  # the catalog layer should have dropped such checksums
                log.warning("cannot verify %s %s: unknown algorithm %r", spec.pid, spec.path,
                            blob.checksum.algorithm)  # fmt: skip
                actual = blob.checksum.hexdigest.lower()
            if actual != blob.checksum.hexdigest.lower():
                # error first: a reader racing with the truncation sees it after its pread
                blob.error = IntegrityError(
                    f"checksum mismatch for {spec.pid} {spec.path}: catalog says"
                    f" {blob.checksum.algorithm}:{blob.checksum.hexdigest.lower()},"
                    f" server sent {blob.checksum.algorithm}:{actual}; cached copy discarded"
                )
                self.discard(blob)
                raise blob.error
        with self._lock, self._index_errors(), self._transaction() as db:
            db.execute("UPDATE blobs SET complete = 1 WHERE key = ?", (blob.key,))
        blob.complete = True

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

    def verify(self) -> list[str]:
        """Re-hash every complete blob that has a checksum; discard and report mismatches."""
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
            if actual != expected.lower():
                problems.append(f"{key}: expected {checksum}, found {algorithm}:{actual}")
                with self._lock, self._transaction() as db:
                    _forget_blocks(db, key)
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

    # -- accounting ------------------------------------------------------------

    def usage(self) -> int:
        """Bytes of recorded blocks over all blobs (holes and torn writes not counted)."""
        with self._lock:
            return self._db.execute("SELECT COALESCE(SUM(length), 0) FROM chunks").fetchone()[0]

    def cached_bytes(self, spec: FileSpec) -> int:
        key = blob_key(spec)
        blob = self._open.get(key)
        if blob is not None:
            return blob.present_bytes
        # Called for every file that stat, ls -l and readdir show, on the event
        # loop: a complete blob is answered from its one row, not a sum over
        # its (up to thousands of) block rows.
        with self._lock:
            row = self._db.execute(f"SELECT {_CACHED_BYTES} FROM blobs b WHERE b.key = ?", (key,)).fetchone()
        return row[0] if row else 0

    def entries(self, pid: str | None = None) -> list[BlobInfo]:
        """Every (pid, path) the index knows (of dataset ``pid`` only, if given), with how much is cached."""
        return self._entries("", ()) if pid is None else self._entries("WHERE f.pid = ?", (pid,))

    def where(self, pid: str, path: str) -> BlobInfo | None:
        """The blob file behind one dataset file, if the index maps it."""
        found = self._entries("WHERE f.pid = ? AND f.path = ?", (pid, path))
        return found[0] if found else None

    def _entries(self, condition: str, parameters: tuple[str, ...]) -> list[BlobInfo]:
        with self._lock:
            rows = self._db.execute(
                f"""SELECT f.pid, f.path, b.key, b.size, b.complete, b.atime, b.checksum, {_CACHED_BYTES}
                    FROM files f JOIN blobs b ON b.key = f.key {condition} ORDER BY f.pid, f.path""",
                parameters,
            ).fetchall()
        return [
            BlobInfo(pid, path, key, self.blob_file(key), size, present, bool(complete), atime, checksum)
            for pid, path, key, size, complete, atime, checksum, present in rows
        ]

    # -- eviction --------------------------------------------------------------

    def evict(self, target: int | None = None) -> int:
        """Delete least recently used blobs, never pinned ones, until usage <= target.

        ``target`` defaults to the budget. Returns the bytes freed. Blobs open in
        another process are recognised by their shared pin lock and skipped.
        """
        target = self.budget if target is None else target
        freed = 0
        with self._lock, self._index_errors():
            usage = self._db.execute("SELECT COALESCE(SUM(length), 0) FROM chunks").fetchone()[0]
            if usage <= target:
                return 0
            candidates = self._db.execute(
                """SELECT b.key, (SELECT COALESCE(SUM(length), 0) FROM chunks c WHERE c.key = b.key)
                   FROM blobs b ORDER BY b.atime"""
            ).fetchall()
            for key, size in candidates:
                if usage - freed <= target:
                    break
                if key not in self._open and self._delete_unpinned(key):
                    freed += size
        if freed:
            log.info("cache eviction freed %d bytes (budget %d bytes)", freed, target)
        return freed

    def _delete_unpinned(self, key: str) -> bool:
        """Delete one blob unless another process has it open; caller holds ``_lock``."""
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
            with self._transaction() as db:
                db.execute("DELETE FROM blobs WHERE key = ?", (key,))
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return True
        finally:
            if fd is not None:
                os.close(fd)


#: Bytes cached of blob ``b``: all of it once complete (set only when every block is recorded).
_CACHED_BYTES = (
    "CASE WHEN b.complete THEN b.size"
    " ELSE (SELECT COALESCE(SUM(length), 0) FROM chunks c WHERE c.key = b.key) END"
)


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
