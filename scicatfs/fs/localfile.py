"""Reads of a file whose cached copy is complete and verified: one ``pread`` each.

Such a file needs nothing from the fetcher (no block map, no read-ahead, no
network limiter, no verification wait), so the FUSE handler reads the blob's
descriptor directly, inline on the trio thread (a thread hop per read halves
throughput). With the mount's 1 MiB requests that is one ``pread`` and one
reply per MiB.

The one thing checked per read is the blob's error: ``cache verify`` (or a
second mount) may find later that the cached copy no longer matches its
checksum, and from then on no byte of it is served.

Asking the disk for the blob ahead of a sequential reader
(``POSIX_FADV_WILLNEED``, 4 or 16 MiB ahead) was tried: first reads after a
remount were slower in most runs, so the kernel's own read-ahead on the blob
is left to do that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from scicatfs.cache.store import Blob

__all__ = ["LocalFile"]


@dataclass(frozen=True, slots=True)
class LocalFile:
    """One open handle on a complete blob.

    The blob's descriptor belongs to the cache (the blob is pinned while the
    handle is open) and is only read here, never closed.
    """

    blob: Blob

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset``; short only at the end of the file."""
        blob = self.blob
        if blob.error is not None:
            raise blob.error
        return os.pread(blob.fd, max(0, min(size, blob.size - offset)), offset)
