"""pyfuse3 request handlers: FUSE call -> namespace / fetcher call -> errno.

Rules this module keeps (the measurements behind them are in
docs/performance.md and docs/filesystem.md):

* Never a zero timeout for things that have attributes: each answer carries
  the namespace's TTL (catalog record or listing TTL). Unknown names are
  answered with ``st_ino = 0`` and the listing TTL, which the kernel caches as
  a negative entry, so repeated probes for ``.git`` or ``__pycache__`` do not
  reach the catalog.
* Data files are opened with ``keep_cache`` (their inode is their version, see
  :mod:`scicatfs.fs.inodes`) and never with ``direct_io``, so re-reads come
  from the page cache and shared ``mmap`` works. Only ``.scicat/files.json``,
  whose content follows the cache, is read with direct I/O.
* A data file whose cached copy is complete and verified when it is opened
  is read with one inline ``pread`` per request (:mod:`scicatfs.fs.localfile`),
  without the fetcher.
* A file version that failed verification answers EIO to every open and read
  (the fetcher and the cache index keep that state), and the kernel's cached
  pages of every inode showing it are dropped (``_drop_pages``), so neither a
  new open nor an ``mmap`` can see a byte of it.
* Reads that may need the network are capped (``max_reads``) below
  pyfuse3's worker count, so however many readers wait for a slow file
  server, some workers are always free to answer ``stat``, ``lookup``,
  ``readdir`` and reads of fully cached files (which skip the cap).
* Without ``-o xattrs`` getxattr/listxattr answer ENOSYS, which the kernel
  remembers for the whole mount, so ``ls -l`` costs no xattr round trips.
* Every write-type request answers EROFS.
* Node kinds are the nodes' own business (:mod:`scicatfs.fs.node`): the
  handlers ask a node for its attributes, listing, content or link target
  and map its :class:`~scicatfs.fs.node.Kind` to ``st_mode``; only the data
  file handlers below know :class:`DataFileNode`, because only they talk to
  the fetcher.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import os
import stat
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from scicatfs.cache.errors import IntegrityError, report_integrity
from scicatfs.cache.fetcher import Fetcher, Handle
from scicatfs.cache.store import blob_key
from scicatfs.fs.dirstream import DirectoryStream
from scicatfs.fs.errors import fuse_errors
from scicatfs.fs.inodes import RESIDENT, InodeTable
from scicatfs.fs.localfile import LocalFile
from scicatfs.fs.namespace import (
    ROOT,
    Attributes,
    ControlDir,
    DataFileNode,
    DatasetDir,
    Entry,
    Kind,
    Namespace,
    Node,
    parent_of,
)

__all__ = ["MAX_TASKS", "FsOptions", "ScicatOperations"]

log = logging.getLogger(__name__)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT
_BLOCK = 4096
_MODES = {
    Kind.DIRECTORY: stat.S_IFDIR | 0o555,
    Kind.FILE: stat.S_IFREG | 0o444,
    Kind.SYMLINK: stat.S_IFLNK | 0o777,  # a link's own mode is never checked; 0o777 is what ls shows
}

#: Request handlers to give ``pyfuse3.main`` (its ``max_tasks``).
MAX_TASKS = 64


@dataclass(frozen=True, slots=True)
class FsOptions:
    """Knobs of the filesystem itself (the mount's other options live elsewhere).

    ``max_reads`` must stay below :data:`MAX_TASKS` so that metadata requests
    always find a free handler. ``resident_inodes`` and ``inode_dir`` are the
    inode table's bound in memory and where its spilled tier's file goes
    (see :mod:`scicatfs.fs.inodes`).
    """

    xattrs: bool = False
    max_reads: int = MAX_TASKS * 3 // 4
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    negative_ttl: float = 30.0
    resident_inodes: int = RESIDENT
    inode_dir: Path | None = None


def _name(raw: bytes) -> str:
    """Names in the catalog are JSON text; a name that is not UTF-8 cannot be in it."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise pyfuse3.FUSEError(errno.ENOENT) from None


class ScicatOperations(pyfuse3.Operations):
    """The read-only filesystem over a :class:`Namespace` and a :class:`Fetcher`."""

    supports_dot_lookup = False  # no NFS export: "." and ".." are the kernel's business

    def __init__(self, namespace: Namespace, fetcher: Fetcher, options: FsOptions) -> None:
        super().__init__()
        self.namespace = namespace
        self.fetcher = fetcher
        self.options = options
        self.inodes: InodeTable[Node] = InodeTable(ROOT, resident=options.resident_inodes, directory=options.inode_dir)
        self._handles = itertools.count(1)
        self._files: dict[int, Handle] = {}
        self._local: dict[int, LocalFile] = {}  # the handles in _files whose blob is complete
        self._records: dict[int, bytes] = {}
        self._dirs: dict[int, tuple[tuple[Entry, ...] | DirectoryStream[Entry], Node]] = {}
        self._reads = trio.CapacityLimiter(options.max_reads)
        fetcher.failure_listeners.append(self._drop_pages)

    def close(self) -> None:
        """Let go of what outlives no mount (the inode table's file), once the kernel has unmounted."""
        self.inodes.close()

    # -- helpers -----------------------------------------------------------------

    def _node(self, ino: int) -> Node:
        try:
            return self.inodes.node(ino)
        except KeyError:
            # The kernel asked about an inode it had forgotten: a bug somewhere,
            # but the caller should get an error, not a crash.
            log.error("request for unknown inode %d", ino)
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _entry(self, ino: int, attributes: Attributes) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = ino
        entry.generation = 0
        entry.entry_timeout = attributes.ttl
        entry.attr_timeout = attributes.ttl
        entry.st_mode = _MODES[attributes.kind]
        entry.st_nlink = attributes.nlink
        entry.st_uid = self.options.uid
        entry.st_gid = self.options.gid
        entry.st_size = attributes.size
        entry.st_blksize = _BLOCK
        stored = attributes.size if attributes.cached is None else attributes.cached
        entry.st_blocks = math.ceil(stored / 512)
        mtime_ns = int(attributes.mtime * 1e9)
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = mtime_ns
        return entry

    async def _drop_pages(self, key: str) -> None:
        """Drop the kernel's cached pages of every inode that shows blob ``key`` (it failed verification).

        ``invalidate_inode`` waits for pages locked by reads in flight, and those
        reads are answered by this very event loop: called here it could
        deadlock with the request that found the failure. So it runs in a
        worker thread (pyfuse3 releases the GIL for it) while the loop goes on
        answering; the reads that are still pending get EIO, not bytes.
        """
        inodes = [ino for ino, node in self.inodes.items_of(DataFileNode) if blob_key(node.spec) == key]
        for ino in inodes:
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino)
            except OSError as error:  # the kernel has forgotten the inode meanwhile: nothing cached
                log.debug("invalidating inode %d: %s", ino, error)

    def forget_dataset(self, pid: str, names: dict[str, list[str]]) -> None:
        """Drop the kernel's cached entries for names that changed in the catalog.

        The next lookup of each name then reaches the namespace and finds the
        new version's node (a new inode for every changed file). Only the
        asynchronous invalidation is safe here: this runs inside a request
        handler, and the synchronous one can deadlock against it.
        """
        for path, entries in names.items():
            node = ControlDir(pid) if path == ".scicat" else DatasetDir(pid, path)
            ino = self.inodes.ino_of(node)
            if ino is None:
                continue  # the kernel knows nothing below a directory it never looked up
            for name in entries:
                pyfuse3.invalidate_entry_async(ino, name.encode("utf-8"), ignore_enoent=True)

    # -- names and attributes ------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        text = _name(name)
        try:
            with fuse_errors("lookup", *parent.where_child(text)):
                node = await self.namespace.lookup(parent, text)
                attributes = await self.namespace.attributes(node)
        except pyfuse3.FUSEError as error:
            if error.errno != errno.ENOENT:
                raise
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = self.options.negative_ttl
            return negative
        return self._entry(self.inodes.acquire(node), attributes)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self.inodes.forget_all(inode_list)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        with fuse_errors("stat", *node.where()):
            return self._entry(inode, await self.namespace.attributes(node))

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """``df`` shows the local cache: its budget as the size, cached bytes as used.

        The remote data has no meaningful size here, and what a user wants to
        know from ``df`` on this mount is how full the cache is.
        """
        store = self.fetcher.store
        used = await trio.to_thread.run_sync(store.usage)  # a sum over the index: keep it off the loop
        free = max(0, store.budget - used)
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = _BLOCK
        data.f_blocks = store.budget // _BLOCK
        data.f_bfree = data.f_bavail = free // _BLOCK
        data.f_files = data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    # -- directories --------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        with fuse_errors("opendir", *node.where()):
            if node.kind is not Kind.DIRECTORY:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            listing = await self.namespace.listing(node)
        fh = next(self._handles)
        self._dirs[fh] = (listing if isinstance(listing, tuple) else DirectoryStream(listing), node)
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """``.`` and ``..`` at offsets 0 and 1, then the listing's entry i at i + 2.

        The kernel takes no reference for the two dot entries, so they are
        not counted; every other accepted entry is (readdirplus). A snapshot
        is indexed directly; a stream is read from where the kernel resumes.
        """
        listing, directory = self._dirs[fh]
        dots = ((".", directory), ("..", parent_of(directory)))
        for index, (name, node) in enumerate(dots):
            if index >= start_id:
                ino = self.inodes.ino_of(node) or pyfuse3.ROOT_INODE
                if not pyfuse3.readdir_reply(token, name.encode(), self._dot_entry(ino), index + 1):
                    return
        first = max(0, start_id - len(dots))
        if isinstance(listing, tuple):
            for index in range(first, len(listing)):
                if not self._reply(token, listing[index], index + len(dots) + 1):
                    return
            return
        replied = 0
        try:
            async with aclosing(listing.entries_from(first)) as entries:
                async for index, entry in entries:
                    if not self._reply(token, entry, index + len(dots) + 1):
                        return
                    replied += 1
        except Exception as error:
            if replied:
                # Hand over what we have; the kernel's next readdir retries the rest.
                log.warning("listing %s interrupted after %d entries: %s", directory.where(), replied, error)
                return
            with fuse_errors("readdir", *directory.where()):
                raise

    def _reply(self, token: pyfuse3.ReaddirToken, entry: Entry, next_id: int) -> bool:
        """Offer one entry to the kernel; False when its buffer is full (the entry was not taken)."""
        name, node, attributes = entry
        ino = self.inodes.acquire(node)
        if pyfuse3.readdir_reply(token, name.encode("utf-8"), self._entry(ino, attributes), next_id):
            return True
        self.inodes.forget(ino, 1)  # not delivered: the kernel holds no reference
        return False

    def _dot_entry(self, ino: int) -> pyfuse3.EntryAttributes:
        """A ``.`` or ``..`` entry: only its inode number and type reach the reader."""
        return self._entry(ino, Attributes(Kind.DIRECTORY, 0, 0.0, 2, ttl=0.0))

    async def releasedir(self, fh: int) -> None:
        listing, _ = self._dirs.pop(fh)
        if isinstance(listing, DirectoryStream):
            await listing.aclose()

    # -- symbolic links ----------------------------------------------------------------

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        with fuse_errors("readlink", *node.where()):
            return os.fsencode(await self.namespace.target(node))

    # -- files --------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self._node(inode)
        fh = next(self._handles)
        with fuse_errors("open", *node.where()):
            if isinstance(node, DataFileNode):
                # the files listed after this one: a reader walking the directory gets them fetched ahead
                following = self.namespace.following(node.spec)
                handle = self._files[fh] = await self.fetcher.open(node.spec, following)
                if handle.blob.complete:  # verified: reads need no fetcher while it stays open
                    self._local[fh] = LocalFile(handle.blob)
                return pyfuse3.FileInfo(fh=fh, keep_cache=True)
            if node.kind is Kind.FILE:
                self._records[fh] = await self.namespace.content(node)
                if node.direct_io:
                    return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
                return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        raise pyfuse3.FUSEError(errno.EISDIR)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        local = self._local.get(fh)
        if local is not None:
            try:
                return local.read(off, size)
            except OSError as error:
                spec = self._files[fh].spec
                log.error("reading the cached copy of %s %s: %s", spec.pid, spec.path, error)
                raise pyfuse3.FUSEError(errno.EIO) from None
            except IntegrityError as error:
                report_integrity(error)
                raise pyfuse3.FUSEError(errno.EIO) from None
        record = self._records.get(fh)
        if record is not None:
            return record[off:off + size]
        handle = self._files[fh]
        with fuse_errors("read", handle.spec.pid, handle.spec.path):
            if handle.blob.all_present:
                return await self.fetcher.read(handle, off, size)  # no network: never queued
            async with self._reads:
                return await self.fetcher.read(handle, off, size)

    async def release(self, fh: int) -> None:
        if self._records.pop(fh, None) is not None:
            return
        self._local.pop(fh, None)
        handle = self._files.pop(fh)
        with fuse_errors("release", handle.spec.pid, handle.spec.path):
            await self.fetcher.release(handle)

    # -- extended attributes ---------------------------------------------------------

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        values = await self._xattrs(inode)
        try:
            return values[name.decode("utf-8", "surrogateescape")]
        except KeyError:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [key.encode("utf-8") for key in await self._xattrs(inode)]

    async def _xattrs(self, inode: int) -> dict[str, bytes]:
        if not self.options.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        node = self._node(inode)
        with fuse_errors("getxattr", *node.where()):
            return await self.namespace.xattrs(node)

    # -- everything that would write -------------------------------------------------

    async def _read_only(self, *args: object) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _read_only  # type: ignore[assignment]
    write = create = setxattr = removexattr = _read_only  # type: ignore[assignment]
