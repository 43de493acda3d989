"""``scicat://<pid>/<path>``: the mount's tree as an fsspec filesystem, for Python without FUSE.

pandas, xarray, h5py (through file objects), zarr and dask read fsspec URLs;
with this protocol they get the mount's lazy, verified and cached reads in
places where FUSE is not available (notebook pods, CI containers, dask
workers). It is the same code as the mount, not a second implementation:
the options are resolved by :func:`scicatfs.config.mount_options` (names and
defaults of ``scicatfs mount``, ``profile=`` included), the layers are built
by :func:`scicatfs.stack.open_stack` and the tree is the mount's
:class:`~scicatfs.fs.namespace.Namespace` (PIDs with slashes as directories,
``metadata.json``, ``.scicat/``). The layers run on a trio loop in a thread
of their own (:mod:`scicatfs.background`).

Reads: a file whose cached copy is complete and verified is read with one
``pread`` on the caller's thread, as the mount does; any other read goes to
the fetcher on the loop, which fetches, caches and verifies exactly as for
the mount (the last read of a file waits for its checksum). Writing is
refused with ``EROFS``.

Processes: an instance pickles as its options (fsspec's rule), so dask
workers build their own; an instance used in a forked child starts its own
thread and connections on first use (see :mod:`scicatfs.background`).
"""

from __future__ import annotations

import errno
import os
import posixpath
import threading
import weakref
from collections.abc import Iterable
from contextlib import aclosing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cachetools import TTLCache
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from scicatfs.background import BackgroundStack
from scicatfs.cache.fetcher import Handle
from scicatfs.catalog.errors import AuthenticationError, DatasetForbidden, DatasetNotFound
from scicatfs.config import ConfigError, MountOptions, mount_options
from scicatfs.errors import ScicatfsError
from scicatfs.fs.localfile import LocalFile
from scicatfs.fs.namespace import ROOT, Attributes, DataFileNode, Node, RecordFile
from scicatfs.fs.node import Kind
from scicatfs.fs.noentry import NoEntry, WrongKind

__all__ = ["OPTIONS", "ScicatFile", "ScicatFileSystem", "options_from"]

#: The mount's options that mean something without a mount (``-`` or ``_``), plus
#: ``profile``/``config`` and ``source`` (``--source PREFIX=URL``, a string or a list).
OPTIONS = frozenset(
    {
        "url", "token_file", "username", "password_file", "sftp_host", "sftp_port", "sftp_user",
        "identity_file", "known_hosts", "insecure_no_host_key_check", "sftp_connections", "source",
        "http_token_file", "insecure_http", "cache_dir", "cache_size", "record_ttl", "listing_ttl",
        "profile", "config",
    }
)  # fmt: skip
#: Bytes fsspec asks the fetcher for at a time (its read-ahead buffer): a
#: few cache blocks, so that small reads (h5py's) cross to the loop rarely.
BLOCK_SIZE = 4 * 1024 * 1024
#: Resolved paths remembered (for the shorter TTL): a few large datasets' worth.
NAMES_KEPT = 100_000


def options_from(given: dict[str, Any]) -> MountOptions:
    """The mount's options for these keyword arguments; ``ConfigError`` names a wrong one.

    Resolved exactly as ``scicatfs mount`` resolves its command line (the
    profile first, the arguments over it, the same validation); nothing is
    mounted, so the required mountpoint is a placeholder the layers never use.
    """
    values = {key.replace("-", "_"): value for key, value in given.items()}
    unknown = sorted(values.keys() - OPTIONS)
    if unknown:
        raise ConfigError(f"unknown scicat option {unknown[0]!r}; known: {', '.join(sorted(OPTIONS))}")
    source = values.pop("source", None)
    if source is not None:
        values["sources"] = [source] if isinstance(source, str) else list(source)
    return mount_options({**values, "mountpoint": Path.cwd()})


def _os_error(error: BaseException, path: str) -> OSError:
    """What a Python caller expects for a layer's error: FileNotFoundError, PermissionError, EIO."""
    if isinstance(error, (NoEntry, DatasetNotFound)):
        return FileNotFoundError(errno.ENOENT, f"no such file in the catalog: {error}", path)
    if isinstance(error, (DatasetForbidden, AuthenticationError)):
        return PermissionError(errno.EACCES, f"not readable with these credentials: {error}", path)
    if isinstance(error, WrongKind):  # ENOTDIR, EISDIR: the node is of another kind than the call needs
        return OSError(error.code, os.strerror(error.code), path)
    return OSError(errno.EIO, str(error) or type(error).__name__, path)


class ScicatFileSystem(AbstractFileSystem):
    """The catalog's datasets as a read-only fsspec filesystem (protocol ``scicat``).

    ``fsspec.filesystem("scicat", url=..., token_file=..., sftp_host=...)``
    takes the options of ``scicatfs mount`` (underscores for dashes) with its
    defaults; ``profile="ess"`` reads them from the config file's profile.
    """

    protocol = "scicat"
    root_marker = ""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)  # fsspec's base takes its own keys and ignores the rest
        self.mount_options = options_from({k: v for k, v in options.items() if k not in _FSSPEC_OWN})
        self._lock = threading.Lock()
        # As long as the mount lets the kernel keep an entry: PID levels listing_ttl, datasets record_ttl.
        self._names = _Names(min(self.mount_options.listing_ttl, self.mount_options.record_ttl))
        self._background = self._start()

    def _start(self) -> BackgroundStack:
        background = BackgroundStack(self.mount_options)
        weakref.finalize(self, background.close)
        return background

    @property
    def background(self) -> BackgroundStack:
        """This process's layers: a forked child builds its own on first use."""
        if self._background.pid != os.getpid():
            with self._lock:
                if self._background.pid != os.getpid():
                    self._background = self._start()
        return self._background

    def close(self) -> None:
        """Close the connections and end the loop's thread; the instance is unusable after."""
        self._background.close()
        type(self)._cache.pop(self._fs_token, None)  # the next fsspec.filesystem(...) builds a new one

    @classmethod
    def _strip_protocol(cls, path: str | Iterable[str]) -> Any:
        stripped = super()._strip_protocol(path)
        return [p.lstrip("/") for p in stripped] if isinstance(stripped, list) else stripped.lstrip("/")

    # -- the tree -----------------------------------------------------------------------

    def _call(self, path: str, function: Any, *args: object) -> Any:
        try:
            return self.background.call(function, *args)
        except (ScicatfsError, NoEntry, WrongKind) as error:
            raise _os_error(error, path) from error

    def _resolve(self, path: str) -> tuple[str, Node]:
        """The stripped path and its node (FileNotFoundError if there is none).

        The walk starts at the longest ancestor resolved (or listed) in the
        last ``min(listing_ttl, record_ttl)`` seconds, as the kernel's dentry
        cache lets the mount skip lookups: asking about a PID prefix again
        costs catalog requests, once per path otherwise.
        """
        path = self._strip_protocol(path)
        names = [name for name in path.split("/") if name]
        if any(name in (".", "..") for name in names):
            raise FileNotFoundError(errno.ENOENT, "'.' and '..' are not names in the catalog", path)
        known, node = self._names.nearest(names)
        if known == len(names):
            return path, node
        namespace = self.background.namespace

        async def walk(node: Node) -> tuple[list[Node], str | None]:
            """The nodes down the path, and where to go on if a view's link stands inside it."""
            found: list[Node] = []
            for index in range(known, len(names)):
                if (await namespace.attributes(node)).kind is Kind.SYMLINK:  # names follow the link
                    here = posixpath.join("/".join(names[: index - 1]), await namespace.target(node))
                    return found, posixpath.join(posixpath.normpath(here), *names[index:])
                node = await namespace.lookup(node, names[index])
                found.append(node)
            return found, None

        found, onward = self._call(path, walk, node)
        self._names.add_many(("/".join(names[: known + 1 + index]), child) for index, child in enumerate(found))
        if onward is not None:  # as the kernel follows a symlink in the middle of a path
            return self._resolve(onward)
        return path, found[-1]

    def _entry(self, path: str, node: Node, attributes: Attributes) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": path,
            "size": attributes.size,
            "type": {Kind.DIRECTORY: "directory", Kind.SYMLINK: "link"}.get(attributes.kind, "file"),
            "mtime": attributes.mtime,
        }
        if isinstance(node, DataFileNode):
            spec = node.spec
            entry.update(pid=spec.pid, cached=attributes.cached, source=spec.source,
                         checksum=None if spec.checksum is None else str(spec.checksum))  # fmt: skip
        return entry

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path, node = self._resolve(path)
        return self._entry(path, node, self._call(path, self.background.namespace.attributes, node))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        path, node = self._resolve(path)
        namespace = self.background.namespace

        async def entries() -> list[tuple[str, Node, Attributes]] | None:
            try:
                listing = await namespace.listing(node)
            except NotADirectoryError:
                return None
            if isinstance(listing, tuple):
                return list(listing)
            async with aclosing(listing()) as stream:
                return [entry async for entry in stream]

        found = self._call(path, entries)
        if found is None:  # a file lists as itself
            result = [self.info(path)]
        else:
            prefix = f"{path}/" if path else ""
            self._names.add_many((prefix + name, child) for name, child, _ in found)
            result = [self._entry(prefix + name, child, attributes) for name, child, attributes in found]
        return result if detail else [entry["name"] for entry in result]

    def modified(self, path: str) -> datetime:
        return datetime.fromtimestamp(self.info(path)["mtime"], tz=timezone.utc)

    # -- files --------------------------------------------------------------------------

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None, autocommit: bool = True,
              cache_options: dict[str, Any] | None = None, **kwargs: Any) -> ScicatFile:  # fmt: skip
        if mode != "rb":
            raise OSError(errno.EROFS, "the catalog is read-only", path)
        path, node = self._resolve(path)
        if isinstance(node, DataFileNode):
            handle: Handle | bytes = self._call(path, self.background.stack.fetcher.open, node.spec)
        elif isinstance(node, RecordFile):
            handle = self._call(path, self.background.namespace.content, node)
        else:
            raise IsADirectoryError(errno.EISDIR, "a directory", path)
        return ScicatFile(self, path, handle, block_size=block_size or BLOCK_SIZE,
                          cache_options=cache_options, **kwargs)  # fmt: skip

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        """Bytes ``start:end`` of a file (slice rules, negative from the end), one fetch for the range."""
        with self.open(path, "rb", cache_type="none", **kwargs) as file:
            begin, stop, _ = slice(start, end).indices(file.size)
            return file.read_range(begin, stop)


class _Names:
    """Paths resolved or listed lately -> their nodes; shared by the caller threads (locked)."""

    def __init__(self, ttl: float) -> None:
        self._lock = threading.Lock()
        self._nodes: TTLCache[str, Node] | None = TTLCache(maxsize=NAMES_KEPT, ttl=ttl) if ttl > 0 else None

    def nearest(self, names: list[str]) -> tuple[int, Node]:
        """How many leading ``names`` are known, and the node they lead to (the root for none)."""
        if self._nodes is not None:
            with self._lock:
                for count in range(len(names), 0, -1):
                    node = self._nodes.get("/".join(names[:count]))
                    if node is not None:
                        return count, node
        return 0, ROOT

    def add_many(self, items: Iterable[tuple[str, Node]]) -> None:
        if self._nodes is not None:
            with self._lock:
                self._nodes.update(items)


#: Keyword arguments fsspec's base class takes itself (instance cache, listings cache).
_FSSPEC_OWN = frozenset({"use_listings_cache", "listings_expiry_time", "max_paths", "skip_instance_cache"})


class ScicatFile(AbstractBufferedFile):
    """One open catalog file: random access, ``seek``, ``readinto``; ranges come from the fetcher.

    A data file pins its cached blob while open (as a mount's open file does);
    a generated file (``metadata.json``, ``files.json``) holds its bytes.
    """

    def __init__(self, fs: ScicatFileSystem, path: str, handle: Handle | bytes, **kwargs: Any) -> None:
        self._handle = handle
        self._background = fs.background  # the loop that opened it (a forked child cannot use it)
        size = len(handle) if isinstance(handle, bytes) else handle.spec.size
        try:
            super().__init__(fs, path, mode="rb", size=size, **kwargs)
        except BaseException:
            self._release()
            raise

    def _fetch_range(self, start: int, end: int) -> bytes:
        handle = self._handle
        if isinstance(handle, bytes):
            return handle[start:end]
        try:
            if handle.blob.complete:  # verified on disk: no loop, no network
                return LocalFile(handle.blob).read(start, end - start)
            return self._background.call(self._background.stack.fetcher.read, handle, start, end - start)
        except ScicatfsError as error:  # e.g. `cache verify` found the cached copy damaged since
            raise _os_error(error, self.path) from error

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes ``start:end`` in one request to the fetcher, past fsspec's buffer."""
        data = self._fetch_range(start, end) if end > start else b""
        self.loc = start + len(data)
        return data

    def close(self) -> None:
        if not self.closed:
            try:
                super().close()
            finally:
                self._release()

    def _release(self) -> None:
        handle, self._handle = self._handle, b""
        if isinstance(handle, Handle):  # unpinning needs no waiting for (the cache index's write)
            self._background.start_soon(self._background.stack.fetcher.release, handle)
