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
keeps its entries until it evicts them), nearly all with a count of one. So
only counts above one are stored: a known inode without a stored count has
one reference, which saves a dict entry per listed name.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Generic, TypeVar

import pyfuse3

__all__ = ["InodeTable"]

log = logging.getLogger(__name__)

N = TypeVar("N", bound=Hashable)


class InodeTable(Generic[N]):
    """Two-way map between nodes and inode numbers, with lookup counts.

    The root is pinned: it has no lookup count and is never forgotten.
    """

    def __init__(self, root: N) -> None:
        self._by_ino: dict[int, N] = {pyfuse3.ROOT_INODE: root}
        self._by_node: dict[N, int] = {root: pyfuse3.ROOT_INODE}
        self._counts: dict[int, int] = {}  # the counts above one
        self._next = pyfuse3.ROOT_INODE + 1

    def __len__(self) -> int:
        """Number of inodes currently known (root included)."""
        return len(self._by_ino)

    def node(self, ino: int) -> N:
        """The node behind ``ino``; KeyError if the kernel forgot it (or never had it)."""
        return self._by_ino[ino]

    def items(self) -> list[tuple[int, N]]:
        """Every (inode, node) known now (a snapshot: rare whole-table questions, not per request)."""
        return list(self._by_ino.items())

    def ino_of(self, node: N) -> int | None:
        """The inode number ``node`` has now, or None if it has none."""
        return self._by_node.get(node)

    def acquire(self, node: N) -> int:
        """Give the kernel one more reference to ``node``; returns its inode number."""
        ino = self._by_node.get(node)
        if ino is None:
            ino = self._next
            self._next += 1
            self._by_node[node] = ino
            self._by_ino[ino] = node
        elif ino != pyfuse3.ROOT_INODE:
            self._counts[ino] = self._counts.get(ino, 1) + 1
        return ino

    def forget(self, ino: int, count: int) -> None:
        """Drop ``count`` references; the node is removed when none remain."""
        if ino == pyfuse3.ROOT_INODE:
            return
        remaining = self.lookup_count(ino) - count
        if remaining > 1:
            self._counts[ino] = remaining
            return
        if remaining == 1:
            self._counts.pop(ino, None)
            return
        if remaining < 0:
            # The kernel never forgets more than it was given; if it seems to,
            # our counting is wrong, which must be visible in the log.
            log.error("inode %d forgotten %d more times than looked up", ino, -remaining)
        self._counts.pop(ino, None)
        node = self._by_ino.pop(ino, None)
        if node is not None:
            del self._by_node[node]

    def lookup_count(self, ino: int) -> int:
        """References the kernel holds on ``ino`` (0 for the root and for unknown inodes)."""
        if ino == pyfuse3.ROOT_INODE or ino not in self._by_ino:
            return 0
        return self._counts.get(ino, 1)
