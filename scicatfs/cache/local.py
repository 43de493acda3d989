"""Files of ``file://`` sources, served in place: the local file is the blob.

Copying a file that is already on this machine into the cache would double
its disk use and gain nothing, so a local source file is opened and read
directly, and never written to the cache. Its reads run in a worker thread
(unlike cache hits, which are read inline): a source folder is often a
cluster filesystem, and a stalled one must not stall the event loop that
answers every other request. What stays the same as for remote files is the trust: the size must
match the catalog's when the file is opened, and with a checksum the whole
file is hashed once, in the background from the first open, before the read
that ends the file is answered (a mismatch is EIO, exactly as for a remote
file).

A verified *version* (device, inode, size, mtime and ctime in nanoseconds)
is remembered in the cache index, so the file is hashed once, not at every
mount. A version that fails is recorded in the index's failures, keyed like
its blob, exactly as a remote file's failure is: every open of it, in any
process, answers EIO without hashing it again, until its retry time, when one
open hashes it again (the fetcher's re-fetch, without the fetch). A file that
changes while it is hashed is reported, not trusted.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from scicatfs.cache.errors import IntegrityError
from scicatfs.cache.store import RETRY_FAILED_AFTER, Blob, BlobStore, FileSpec
from scicatfs.transfer.base import LocalFile

__all__ = ["LocalBlob", "LocalFiles", "version_of"]

log = logging.getLogger(__name__)

HASH_READ = 1024 * 1024


class LocalBlob(Blob):
    """A blob that is a file of a local source: every block present, nothing to fetch or write."""

    def __init__(self, spec: FileSpec, local: LocalFile, version: str, store: BlobStore) -> None:
        super().__init__(
            key=f"local:{version}:{spec.checksum or ''}",
            file=local.path,
            fd=local.fd,
            size=spec.size,
            checksum=spec.checksum,
            chunk_size=store.chunk_size,
            block_size=store.block_size,
        )
        self.present = set(range(self.block_count))
        self.local = local
        self.version = version


def version_of(stat: os.stat_result) -> str:
    """What identifies one version of a local file, for the memory of verified files."""
    return f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"


class LocalFiles:
    """Opens and verifies local source files for the fetcher; call from worker threads."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store

    def open(self, spec: FileSpec, local: LocalFile) -> LocalBlob:
        """Pin a blob over ``local`` (closed again if this version is already open).

        Raises IntegrityError (EIO) when the file's size is not the catalog's.
        A version whose failure is recorded comes back with ``blob.error`` set.
        """
        if local.stat.st_size != spec.size:
            local.close()
            raise IntegrityError(
                f"{spec.pid} {spec.path}: catalog says {spec.size} bytes, {local.path} has {local.stat.st_size}"
            )
        version = version_of(local.stat)
        blob, made = self.store.adopt(
            f"local:{version}:{spec.checksum or ''}", lambda: LocalBlob(spec, local, version, self.store)
        )
        if not made:
            local.close()
        assert isinstance(blob, LocalBlob)
        if not made or blob.complete:
            return blob
        self.store.load_failure(blob)
        if blob.error is not None:
            return blob
        blob.complete = spec.checksum is None or self.store.local_verified(
            blob.file, version, str(spec.checksum)
        )
        return blob

    def complete(self, blob: Blob, spec: FileSpec, retry_after: float = RETRY_FAILED_AFTER) -> None:
        """Hash the file and compare with the catalog (the fetcher's ``store.complete`` for local blobs).

        On a mismatch the failure is recorded (``store.record_failure``, retried
        after ``retry_after`` seconds) and IntegrityError raised; nothing is
        discarded, because nothing was copied. A match clears an earlier failure.
        """
        assert isinstance(blob, LocalBlob)
        if blob.checksum is None:
            blob.complete = True
            return
        if blob.complete:
            return
        expected = blob.checksum.hexdigest.lower()
        try:
            hasher = hashlib.new(blob.checksum.algorithm)
        except ValueError:  # the catalog layer should have dropped such checksums
            log.warning("cannot verify %s %s: unknown algorithm %r", spec.pid, spec.path, blob.checksum.algorithm)
            blob.complete = True
            return
        offset = 0
        while data := os.pread(blob.fd, HASH_READ, offset):
            hasher.update(data)
            offset += len(data)
        if version_of(os.fstat(blob.fd)) != blob.version:
            blob.error = IntegrityError(f"{spec.pid} {spec.path}: {blob.file} changed while it was verified")
            raise blob.error
        actual = hasher.hexdigest()
        if actual != expected:
            error = IntegrityError(
                f"checksum mismatch for {spec.pid} {spec.path}: catalog says"
                f" {blob.checksum.algorithm}:{expected}, {blob.file} has {blob.checksum.algorithm}:{actual}"
            )
            self.store.record_failure(blob, spec, error, retry_after)
            raise error
        self.store.remember_local(Path(blob.file), blob.version, str(spec.checksum))
        if blob.error is not None:  # this was the hash again after a recorded failure
            self.store.clear_failure(blob)
        blob.complete = True
