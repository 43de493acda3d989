"""Inode numbers and the kernel's lookup counts.

The kernel refers to everything by inode number and tells the filesystem,
through ``forget``, when it no longer needs one. pyfuse3 leaves the
bookkeeping to us: every successful ``lookup`` and every directory entry the
kernel accepts from ``readdir`` (readdirplus) adds one reference; ``forget``
removes n. A node's state is dropped only when its count reaches zero.

Nodes are hashable values that *are* their identity: a data file's node holds
(pid, path, size, mtime, checksum), so a file that changed in the catalog is a
different node and gets a new inode number. The kernel's page cache, which is
kept across opens, can therefore never mix the bytes of two versions.

Numbers come from a counter and are never reused, so the FUSE generation
number can stay 0 for the lifetime of the mount.

A listing of a million datasets leaves a million counted inodes (the kernel
keeps its entries until it evicts them, see docs/performance.md), and the
daemon must answer for each of them until the kernel forgets it. So the
table has two tiers (docs/architecture.md, "Where inode state lives"):

* resident: dicts both ways, holding at most ``resident`` inodes (plus one
  batch), of which only counts above one are stored (a resident inode
  without a stored count has one reference);
* spilled: beyond that, the oldest resident inodes go, a batch at a time,
  to :class:`~scicatfs.fs.spilled.SpilledInodes`, a private sqlite file,
  as (inode, key, count) rows; the key is the node written by
  :class:`~scicatfs.fs.nodekeys.NodeCodec`.

A spilled inode is read back for each request that names it (a ``stat``
of an entry listed long ago), and moves back to the resident tier when it
is acquired again (looked up, or listed again), which makes it the
youngest. Inode numbers never change between the tiers.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Hashable, Iterable
from itertools import islice, repeat
from pathlib import Path
from typing import Generic, TypeVar

import pyfuse3

from scicatfs.fs.nodekeys import NodeCodec
from scicatfs.fs.spilled import SpilledInodes

__all__ = ["RESIDENT", "InodeTable"]

log = logging.getLogger(__name__)

N = TypeVar("N", bound=Hashable)

#: Inodes kept in memory (about 235 bytes each) before the oldest go to disk.
RESIDENT = 50_000


class InodeTable(Generic[N]):
    """Two-way map between nodes and inode numbers, with lookup counts, partly on disk.

    The root is pinned: it has no lookup count, is never forgotten and never
    spilled. ``directory`` holds the spilled tier's file (created on the
    first spill; the system's temporary directory if None).
    """

    def __init__(self, root: N, *, resident: int = RESIDENT, directory: Path | None = None) -> None:
        if resident < 1:
            raise ValueError(f"resident must be at least 1, not {resident}")
        self._by_ino: dict[int, N] = {pyfuse3.ROOT_INODE: root}
        self._by_node: dict[N, int] = {root: pyfuse3.ROOT_INODE}
        self._counts: dict[int, int] = {}  # the resident counts above one
        self._next = pyfuse3.ROOT_INODE + 1
        self._resident = resident
        self._batch = max(1, resident // 16)  # spilled at once: one transaction per batch
        self._spill_above = resident + self._batch
        self._directory = directory
        self._codec = NodeCodec()
        self._spilled: SpilledInodes | None = None

    def __len__(self) -> int:
        """Number of inodes currently known (root included)."""
        return len(self._by_ino) + self.spilled

    @property
    def resident(self) -> int:
        """Inodes held in memory (root included)."""
        return len(self._by_ino)

    @property
    def spilled(self) -> int:
        """Inodes held on disk."""
        return 0 if self._spilled is None else len(self._spilled)

    @property
    def stats(self) -> dict[str, int]:
        """The inodes the kernel holds, by tier (for the mount's status document)."""
        return {"resident": self.resident, "spilled": self.spilled}

    def close(self) -> None:
        """Drop the spilled tier's file (at unmount: the kernel holds no references any more)."""
        if self._spilled is not None:
            self._spilled.close()
            self._spilled = None

    def node(self, ino: int) -> N:
        """The node behind ``ino``; KeyError if the kernel forgot it (or never had it)."""
        try:
            return self._by_ino[ino]
        except KeyError:
            key = None if self._spilled is None else self._spilled.key_of(ino)
            if key is None:
                raise
        node: N = self._codec.decode(key)
        return node

    def items_of(self, cls: type) -> list[tuple[int, N]]:
        """Every (inode, node) known now whose node is a ``cls`` (a rare question: reads the spilled ones of the class)."""
        found = [(ino, node) for ino, node in self._by_ino.items() if type(node) is cls]
        if self._spilled is not None:
            decode = self._codec.decode
            found += [(ino, decode(key)) for ino, key in self._spilled.rows(self._codec.tag(cls))]
        return found

    def ino_of(self, node: N) -> int | None:
        """The inode number ``node`` has now, or None if it has none."""
        ino = self._by_node.get(node)
        if ino is None and self._spilled is not None and self._spilled.may_hold(hash(node)):
            ino = self._spilled.find(self._codec.encode(node))
        return ino

    def acquire(self, node: N) -> int:
        """Give the kernel one more reference to ``node``; returns its inode number."""
        ino = self._by_node.get(node)
        if ino is not None:
            if ino != pyfuse3.ROOT_INODE:
                self._counts[ino] = self._counts.get(ino, 1) + 1
                del self._by_ino[ino]  # the youngest now: spilled last
                self._by_ino[ino] = node
            return ino
        spilled = self._spilled
        taken = None
        if spilled is not None and spilled.may_hold(hash(node)):
            taken = spilled.take(self._codec.encode(node))
        if taken is None:
            ino = self._next
            self._next += 1
        else:
            ino, count = taken
            self._counts[ino] = count + 1
        self._by_node[node] = ino
        self._by_ino[ino] = node
        if len(self._by_ino) > self._spill_above:
            self._spill()
        return ino

    def _spill(self) -> None:
        """Move the oldest resident inodes beyond the bound to disk, in one transaction.

        The root is the first entry of ``_by_ino`` for good (it is never removed), so the
        oldest others follow it. They leave memory only once their rows are written: a
        disk that is full (or gone) keeps them resident, and the next try waits a batch.
        """
        by_ino, by_node, counts = self._by_ino, self._by_node, self._counts
        inos = list(islice(by_ino, 1, len(by_ino) - self._resident + 1))
        nodes = [by_ino[ino] for ino in inos]
        rows = list(zip(inos, map(self._codec.encode, nodes), map(counts.get, inos, repeat(1)), map(hash, nodes)))
        try:
            if self._spilled is None:
                self._spilled = SpilledInodes(self._directory)
            self._spilled.add(rows)
        except (OSError, sqlite3.Error) as error:
            self._spill_above = len(by_ino) + self._batch
            log.warning("cannot move inodes to disk, %d stay in memory: %s", len(by_ino), error)
            return
        self._spill_above = self._resident + self._batch
        for ino, node in zip(inos, nodes):
            del by_ino[ino], by_node[node]
        if counts:
            for ino in inos:
                counts.pop(ino, None)

    def forget(self, ino: int, count: int) -> None:
        """Drop ``count`` references; the node is removed when none remain."""
        self.forget_all(((ino, count),))

    def forget_all(self, forgotten: Iterable[tuple[int, int]]) -> None:
        """Drop references of many inodes (what the kernel forgets in one message): spilled ones in one transaction."""
        elsewhere: dict[int, int] = {}
        for ino, count in forgotten:
            if ino == pyfuse3.ROOT_INODE:
                continue
            if ino not in self._by_ino:
                elsewhere[ino] = elsewhere.get(ino, 0) + count
                continue
            remaining = self._counts.get(ino, 1) - count
            if remaining > 1:
                self._counts[ino] = remaining
                continue
            if remaining == 1:
                self._counts.pop(ino, None)
                continue
            if remaining < 0:
                self._overdrawn(ino, -remaining)
            self._counts.pop(ino, None)
            del self._by_node[self._by_ino.pop(ino)]
        if elsewhere:
            overdrawn = elsewhere if self._spilled is None else self._spilled.forget(elsewhere)
            for ino, excess in overdrawn.items():
                self._overdrawn(ino, excess)

    @staticmethod
    def _overdrawn(ino: int, excess: int) -> None:
        # The kernel never forgets more than it was given; if it seems to,
        # our counting is wrong, which must be visible in the log.
        log.error("inode %d forgotten %d more times than looked up", ino, excess)

    def lookup_count(self, ino: int) -> int:
        """References the kernel holds on ``ino`` (0 for the root and for unknown inodes)."""
        if ino == pyfuse3.ROOT_INODE:
            return 0
        if ino in self._by_ino:
            return self._counts.get(ino, 1)
        return 0 if self._spilled is None else self._spilled.refs(ino)
