"""A blob's checksum computed while its blocks arrive, so that completing it needs no second pass.

The read that ends a checksummed file waits for its verification
(docs/cache-format.md); hashing a whole 1 GiB file only then would add seconds
to every cold sequential read. Blocks arrive roughly in order, so the fetcher
hashes the recorded prefix of the blob as it grows, in worker threads, and the
final verification only hashes what is left. Out-of-order blocks are hashed
when the prefix reaches them, at the latest by ``finish``.

Only recorded blocks are hashed, read back from the blob file: exactly the
bytes that a full re-hash would read.
"""

from __future__ import annotations

import hashlib

import trio

from scicatfs.cache.errors import CacheError
from scicatfs.cache.store import Blob, BlobStore

__all__ = ["RunningDigest"]

#: Bytes hashed per pread: large enough for hashlib to release the GIL usefully.
PIECE = 1024 * 1024


class RunningDigest:
    """The hash of a blob's bytes ``[0, position)``; one hashing step at a time (``lock``)."""

    def __init__(self, algorithm: str) -> None:
        self._hash = hashlib.new(algorithm)  # ValueError for an algorithm hashlib lacks
        self.position = 0
        self.lock = trio.Lock()

    def advance(self, store: BlobStore, blob: Blob) -> None:
        """Hash the recorded blocks that follow ``position`` without a gap (blocking I/O)."""
        index = self.position // blob.block_size
        while index < blob.block_count and index in blob.present:
            index += 1
        self._hash_to(store, blob, min(index * blob.block_size, blob.size))

    def finish(self, store: BlobStore, blob: Blob) -> str:
        """The hex digest of the whole blob, whose blocks must all be recorded (blocking I/O)."""
        self._hash_to(store, blob, blob.size)
        return self._hash.hexdigest()

    def _hash_to(self, store: BlobStore, blob: Blob, end: int) -> None:
        while self.position < end:
            data = store.read(blob, self.position, min(PIECE, end - self.position))
            if not data:  # truncated under us: discarded after a failed verification
                raise CacheError(f"cache blob {blob.file} ends at {self.position}, before {end}")
            self._hash.update(data)
            self.position += len(data)
