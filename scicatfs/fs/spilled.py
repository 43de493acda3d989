"""The inode table's tier on disk: inodes the kernel holds and nobody has asked about lately.

One sqlite table ``inodes (ino INTEGER PRIMARY KEY, key BLOB UNIQUE, refs,
hash)`` in a private database: a file created in the given directory and unlinked
as soon as it is open, so that it is gone when the mount ends, however it
ends (nothing in it means anything to another mount: inode numbers and keys
are the process's own, see :mod:`scicatfs.fs.nodekeys`). Written without a
journal, without syncs, in exclusive locking mode and with a small page
cache: losing it loses nothing that outlives the process.

In front of the key index sits a Bloom filter of the nodes' hashes, so that
a node that was never spilled (nearly every node a listing shows) is known
to be new without a query, and without writing its key. The hashes are
Python's own (``hash(node)``, which differs from process to process, as the
file does), kept in the table only to rebuild the filter.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path

__all__ = ["SpilledInodes"]

#: The database's page cache (KiB): the key index is appended to at its end by a listing.
CACHE_KIB = 2048
#: The filter's bits per key it is sized for (two probes: about 5 % false positives when full).
_BITS_PER_KEY = 8
_MIN_BITS = 1 << 20
#: Rows per INSERT statement of a spilled batch.
_ROWS = 50
_INSERT = "INSERT INTO inodes (ino, key, refs, hash) VALUES (?, ?, ?, ?)"
_INSERT_MANY = _INSERT + ", (?, ?, ?, ?)" * (_ROWS - 1)


class _HashFilter:
    """A Bloom filter of the spilled nodes' hashes: "maybe on disk" or "certainly not".

    Rows leave the table without leaving the filter (a Bloom filter cannot
    forget), so it is rebuilt from the table, four times the size of what is
    live then, once it has taken as many hashes as it was sized for.
    """

    def __init__(self, hashes: Iterable[int], live: int) -> None:
        bits = _MIN_BITS
        while bits < 4 * live * _BITS_PER_KEY:
            bits <<= 1
        self.mask = bits - 1
        self.bits = bytearray(bits >> 3)
        self.room = bits // _BITS_PER_KEY
        self.add_all(hashes)

    def add_all(self, hashes: Iterable[int]) -> None:
        """Set the two bits of each hash: its low and its high 32 bits, each masked to the size."""
        bits, mask = self.bits, self.mask
        added = 0
        for h in hashes:
            a, b = h & mask, (h >> 32) & mask
            bits[a >> 3] |= 1 << (a & 7)
            bits[b >> 3] |= 1 << (b & 7)
            added += 1
        self.room -= added


class SpilledInodes:
    """Rows of (inode, node key, lookup count, node hash), all in one unlinked sqlite file under ``directory``."""

    def __init__(self, directory: Path | None = None) -> None:
        fd, path = tempfile.mkstemp(prefix="inodes-", suffix=".sqlite", dir=directory)
        os.close(fd)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, cached_statements=16)
            for pragma in ("journal_mode = OFF", "synchronous = OFF", "locking_mode = EXCLUSIVE",
                           f"cache_size = -{CACHE_KIB}", "temp_store = MEMORY"):
                self._db.execute(f"PRAGMA {pragma}")
            self._db.execute("CREATE TABLE inodes (ino INTEGER PRIMARY KEY, key BLOB NOT NULL UNIQUE, "
                             "refs INTEGER NOT NULL, hash INTEGER NOT NULL)")
        finally:
            os.unlink(path)  # the open database stays usable; the file goes with the process
        self._count = 0
        self._filter = _HashFilter((), 0)

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        self._db.close()

    def add(self, rows: list[tuple[int, bytes, int, int]]) -> None:
        """Store (ino, key, refs, hash) rows: one transaction for the lot, ``_ROWS`` rows per statement
        (a third less time per row than one row per statement)."""
        whole = len(rows) - len(rows) % _ROWS
        with self._transaction():
            self._db.executemany(_INSERT_MANY, [tuple(chain.from_iterable(rows[at:at + _ROWS]))
                                                for at in range(0, whole, _ROWS)])
            self._db.executemany(_INSERT, rows[whole:])
        self._count += len(rows)
        if self._filter.room < len(rows):
            self._filter = _HashFilter((h for (h,) in self._db.execute("SELECT hash FROM inodes")), self._count)
        else:
            self._filter.add_all(row[3] for row in rows)

    def may_hold(self, h: int) -> bool:
        """False if no node with hash ``h`` is here (True: maybe; ask with its key).

        Asked for every node a listing shows, so the filter's test is written out here.
        """
        bits, mask = self._filter.bits, self._filter.mask
        a, b = h & mask, (h >> 32) & mask
        return bool(bits[a >> 3] & (1 << (a & 7)) and bits[b >> 3] & (1 << (b & 7)))

    def find(self, key: bytes) -> int | None:
        """The inode stored under ``key``, if any."""
        row = self._db.execute("SELECT ino FROM inodes WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def take(self, key: bytes) -> tuple[int, int] | None:
        """Remove the row of ``key`` and return its (ino, refs), if there is one."""
        row = self._db.execute("DELETE FROM inodes WHERE key = ? RETURNING ino, refs", (key,)).fetchone()
        if row is not None:
            self._count -= 1
        return row

    def key_of(self, ino: int) -> bytes | None:
        row = self._db.execute("SELECT key FROM inodes WHERE ino = ?", (ino,)).fetchone()
        return None if row is None else row[0]

    def refs(self, ino: int) -> int:
        """References the kernel holds on ``ino`` (0 if it is not here)."""
        row = self._db.execute("SELECT refs FROM inodes WHERE ino = ?", (ino,)).fetchone()
        return 0 if row is None else row[0]

    def forget(self, counts: dict[int, int]) -> dict[int, int]:
        """Drop ``counts[ino]`` references of each ino; returns by how many each ino was overdrawn
        (the kernel forgot more than it held, or an inode that is not here)."""
        # One statement whatever the batch's size (a statement per size would fill the statement cache).
        found: dict[int, int] = dict(self._db.execute(
            "SELECT ino, refs FROM inodes WHERE ino IN (SELECT value FROM json_each(?))", (json.dumps(list(counts)),)
        ))
        overdrawn: dict[int, int] = {}
        gone: list[tuple[int]] = []
        left: list[tuple[int, int]] = []
        for ino, count in counts.items():
            remaining = found.get(ino, 0) - count
            if remaining > 0:
                left.append((remaining, ino))
                continue
            if remaining < 0:
                overdrawn[ino] = -remaining
            if ino in found:
                gone.append((ino,))
        with self._transaction():
            self._db.executemany("DELETE FROM inodes WHERE ino = ?", gone)
            self._db.executemany("UPDATE inodes SET refs = ? WHERE ino = ?", left)
        self._count -= len(gone)
        return overdrawn

    def rows(self, tag: bytes) -> list[tuple[int, bytes]]:
        """(ino, key) of every row whose key starts with the byte ``tag`` (one class of node, see NodeCodec.tag)."""
        after = bytes((tag[0] + 1,))
        return self._db.execute("SELECT ino, key FROM inodes WHERE key >= ? AND key < ?", (tag, after)).fetchall()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
