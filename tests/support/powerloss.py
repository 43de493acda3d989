"""A model of power loss for the blob store: which bytes would survive, checked at every commit.

Killing a process keeps the page cache, so a ``kill -9`` test cannot see a
missing ``fdatasync``; only power loss (or a kernel crash) drops writes that
were never synced. This module models that loss instead of causing it (the
machine that runs the tests has no device-mapper for dm-flakey):

* a file's *durable image* is its content as of its last ``os.fsync`` or
  ``os.fdatasync`` (a never-synced file has an empty image);
* every time the index commits (an explicit ``COMMIT``, ``commit()``, or a
  write statement in autocommit mode), each block row in ``chunks`` must be
  backed by its blob's durable image: after a power loss at that instant, the
  row would survive (the worst case for ``synchronous=NORMAL``) and vouch for
  exactly those durable bytes.

The rule is about the outcome, not the calls: writing many blocks, syncing
once and committing them in one transaction satisfies it; a missing sync, or
one that comes after the commit, does not. Directory entries (whether the
blob file itself survives) are outside the model.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from scicatfs.cache.store import BlobStore

__all__ = ["PowerLoss", "power_loss_model"]

_READ_ONLY = ("SELECT", "PRAGMA", "BEGIN", "SAVEPOINT", "RELEASE", "ROLLBACK", "WITH")


@dataclass
class PowerLoss:
    """What the model saw: commits checked, rows checked, and every violation of the rule."""

    store: BlobStore
    durable: dict[str, bytes] = field(default_factory=dict)
    commits: int = 0
    rows_checked: int = 0
    violations: dict[tuple[str, int], str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _sequence: int = 0
    _synced_at: dict[str, int] = field(default_factory=dict)

    def sync(self, fd: int, real_sync: Callable[[int], None]) -> None:
        """Sync ``fd``: what it held when the sync began survives a power loss once it returns.

        Concurrent syncs of one file may return out of order; the image read
        last (the highest sequence number) is the newest and wins.
        """
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            real_sync(fd)
            return
        path = os.readlink(f"/proc/self/fd/{fd}")
        with self._lock:
            self._sequence += 1
            sequence = self._sequence
            image = os.pread(fd, os.fstat(fd).st_size, 0)
        real_sync(fd)
        with self._lock:
            if sequence > self._synced_at.get(path, 0):
                self.durable[path] = image
                self._synced_at[path] = sequence

    def committed(self, db: sqlite3.Connection) -> None:
        """The index just committed: every recorded block must be durable already."""
        rows = db.execute("SELECT key, idx, length FROM chunks").fetchall()
        block = self.store.block_size
        with self._lock:
            self.commits += 1
            for key, index, length in rows:
                path = os.path.realpath(self.store.blob_file(key))
                start = index * block
                durable = self.durable.get(path, b"")[start : start + length]
                with open(path, "rb") as blob:
                    blob.seek(start)
                    current = blob.read(length)
                self.rows_checked += 1
                if len(current) != length or durable != current:
                    survived = len(durable)
                    self.violations[(key, index)] = (
                        f"block {index} of {key} is in the index, but after a power loss only"
                        f" {survived} of its {length} bytes would be the ones written"
                        if durable == current[:survived]
                        else f"block {index} of {key} is in the index, but its durable bytes differ"
                        " from what was written"
                    )

    def assert_held(self, min_rows: int) -> None:
        """The rule held at every commit, and the run really recorded ``min_rows`` rows."""
        assert not self.violations, "\n".join(list(self.violations.values())[:10])
        assert self.rows_checked >= min_rows, (
            f"only {self.rows_checked} block rows were checked in {self.commits} commits"
        )


class _CommitWatcher:
    """Stands in for the store's sqlite connection and reports each commit to the model."""

    def __init__(self, db: sqlite3.Connection, model: PowerLoss) -> None:
        self._db = db
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    def _after(self, sql: str | None) -> None:
        if self._db.in_transaction:
            return
        if sql is None or not sql.lstrip().upper().startswith(_READ_ONLY):
            self._model.committed(self._db)

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        cursor = self._db.execute(sql, *args)
        self._after(sql)
        return cursor

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:
        cursor = self._db.executemany(sql, *args)
        self._after(sql)
        return cursor

    def executescript(self, script: str) -> sqlite3.Cursor:
        cursor = self._db.executescript(script)
        self._after(None)
        return cursor

    def commit(self) -> None:
        self._db.commit()
        self._after(None)

    def __enter__(self) -> _CommitWatcher:
        self._db.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> Any:
        result = self._db.__exit__(*exc_info)
        self._after(None)
        return result


@contextmanager
def power_loss_model(store: BlobStore, monkeypatch: pytest.MonkeyPatch) -> Iterator[PowerLoss]:
    """Watch ``store`` (its syncs and its index commits) until the block ends."""
    model = PowerLoss(store)
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def spy(fd: int, real: Callable[[int], None] = real) -> None:
            model.sync(fd, real)

        monkeypatch.setattr(os, name, spy)
    real_db = store._db
    monkeypatch.setattr(store, "_db", _CommitWatcher(real_db, model))
    try:
        yield model
    finally:
        monkeypatch.setattr(store, "_db", real_db)
