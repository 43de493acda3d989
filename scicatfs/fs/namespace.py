"""The tree the mount shows, built from catalog answers.

Layout::

    /                                   PID level "" (datasets and PID prefixes)
    /.scicat/status.json                the mount's counters (for ``scicatfs status``)
    /20.500.12269/                      PID level "20.500.12269/"
    /20.500.12269/72fe.../              a dataset
        metadata.json                   the catalog record (unless a data file has that name)
        .scicat/metadata.json           the catalog record, always
        .scicat/files.json              remote path, size, checksum, cached bytes of each file
        flux.dat, logs/measurement.log  the dataset's files in their directories

PIDs nest by ``/``: a PID level lists the next component of every visible PID
that starts with its prefix. A name that is both a dataset and the prefix of
longer PIDs shows as the dataset.

The metadata.json rule: a real data file called ``metadata.json`` at the top
of a dataset keeps its name (data is never hidden); the record is then only at
``.scicat/metadata.json``, which exists in every dataset. ``.scicat`` itself
is reserved: a data file or directory of that name at the top level is not
shown (logged once).

The root also holds the mount's top-level directories (``.scicat`` and the
views the mount was given, see :mod:`scicatfs.fs.views`): their names are
reserved there, and a PID with no prefix that equals one is not listed at the
root (logged once).

Everything here is independent of FUSE. Each kind of node is one class (see
:mod:`scicatfs.fs.node`) answering its own lookup, attributes, listing and
content; :class:`Namespace` holds what they share (the catalog, the dataset
trees built from its records, the caches) and is what the FUSE layer calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import trio
from cachetools import LRUCache, TTLCache

from scicatfs.cache.store import FileSpec
from scicatfs.catalog.client import CatalogClient
from scicatfs.catalog.errors import BadResponse, CatalogUnavailable, DatasetForbidden, DatasetNotFound
from scicatfs.catalog.models import DataFile, Dataset, metadata_json
from scicatfs.catalog.singleflight import SingleFlightCache
from scicatfs.fs.node import Attributes, Entry, Kind, Listing, Node
from scicatfs.fs.noentry import NoEntry

__all__ = [
    "Attributes",
    "ControlDir",
    "DataFileNode",
    "DatasetDir",
    "Entry",
    "Kind",
    "Listing",
    "MountDir",
    "Namespace",
    "Node",
    "PidAlias",
    "PidLevel",
    "ROOT",
    "RecordFile",
    "StatusFile",
    "parent_of",
    "reachable_pid",
]

log = logging.getLogger(__name__)

CONTROL_DIR = ".scicat"
METADATA = "metadata.json"
FILES = "files.json"
STATUS = "status.json"
#: ``/.scicat/pid``: the PID tree without the root's reserved names (see PidAlias).
PID_ALIAS = "pid"
#: After the catalog gave no usable answer, known datasets and PID prefixes are
#: served from their last version for this many seconds without asking again:
#: each attempt costs the client's retries, and `ls -l` would pay them per file.
OFFLINE_RETRY = 10.0
#: How long a lookup that has a last known answer waits for the catalog before
#: using that answer (the client's own retries and deadlines can take minutes
#: against a catalog that accepts requests and never answers).
STALE_WAIT = 5.0
#: How long resolving a name with no last known answer (a PID or prefix never
#: seen) may take in all, the client's retries and backoff included, before it
#: is EIO; the client alone may take 4 tries of 35 s. 8 s keeps the lookup's
#: answer within 10 s with room for the FUSE round trip.
LOOKUP_TIMEOUT = 8.0
#: Built listings of dataset directories are kept for the record TTL, up to
#: this many entries in all: a second ``ls -lR`` or ``find`` then costs no
#: per-entry work (cached-bytes look-ups in the cache index above all). A
#: directory larger than this is streamed from the dataset's tree every time.
LISTING_CACHE_ENTRIES = 20_000
#: How long the size of a ``files.json`` (rendered over every file of a dataset)
#: is reused for its attributes; its content is rendered afresh on every open.
FILES_JSON_TTL = 1.0
#: Catalog answers that mean "no usable answer now" (down, overloaded, garbage), as
#: opposed to "no such dataset" or "not yours": the last known version stands in.
_NO_ANSWER = (CatalogUnavailable, BadResponse)

T = TypeVar("T")


# -- the nodes of the PID tree ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PidLevel(Node):
    """A directory of PID components: the root (prefix ``""``) or a PID prefix ending in ``/``."""

    prefix: str
    kind: ClassVar[Kind] = Kind.DIRECTORY

    async def lookup(self, ns: Namespace, name: str) -> Node:
        if not self.prefix and name in ns.top:
            return ns.top[name]
        return await ns._lookup_pid(self.prefix + name)

    async def attributes(self, ns: Namespace) -> Attributes:
        return ns.level_attributes()

    async def listing(self, ns: Namespace) -> Listing:
        """Streamed page by page from the catalog on each (re)start, so no
        listing of the whole catalog is ever held in memory."""
        return lambda: ns._pid_entries(self.prefix)

    def parent(self) -> Node:
        head, slash, _ = self.prefix[:-1].rpartition("/")
        return PidLevel(head + slash) if slash else ROOT

    def where(self) -> tuple[str | None, str | None]:
        return None, self.prefix or "/"

    def where_child(self, name: str) -> tuple[str | None, str | None]:
        return self.prefix + name, None


ROOT = PidLevel("")


@dataclass(frozen=True, slots=True)
class DatasetDir(Node):
    """A dataset (``path == ""``) or a directory inside it."""

    pid: str
    path: str = ""
    kind: ClassVar[Kind] = Kind.DIRECTORY

    async def lookup(self, ns: Namespace, name: str) -> Node:
        view = await ns.view(self.pid)
        entries = self._entries(view)
        if name in entries:
            return ns.child(view, self.path, name, entries[name])
        if self.path == "" and name == CONTROL_DIR:
            return ControlDir(self.pid)
        if self.path == "" and name == METADATA:
            return RecordFile(self.pid, METADATA, view.version)
        raise NoEntry(name)

    async def attributes(self, ns: Namespace) -> Attributes:
        view = await ns.view(self.pid)
        self._entries(view)
        extra = 1 if self.path == "" else 0  # .scicat
        nlink = 2 + extra + view.subdirectories(self.path)
        return Attributes(Kind.DIRECTORY, 0, view.dataset.creation_time, nlink, ns.record_ttl)

    async def listing(self, ns: Namespace) -> Listing:
        """Fixed now, at opendir: a tuple, or for a directory too large to keep a
        source that replays the same version on every restart."""
        view = await ns.view(self.pid)
        self._entries(view)
        entries = ns._built_listing(view, self.path)
        if entries is None:
            return lambda: _replay(ns._dataset_entries(view, self.path))
        return entries

    def _entries(self, view: _DatasetView) -> dict[str, DataFile | None]:
        entries = view.dirs.get(self.path)
        if entries is None:
            raise NoEntry(f"{self.path} is no longer a directory of {self.pid}")
        return entries

    def parent(self) -> Node:
        if self.path:
            return DatasetDir(self.pid, self.path.rpartition("/")[0])
        head, slash, _ = self.pid.rpartition("/")
        return PidLevel(head + slash) if slash else ROOT

    def where(self) -> tuple[str | None, str | None]:
        return self.pid, self.path

    async def xattrs(self, ns: Namespace) -> dict[str, str]:
        view = await ns.view(self.pid)
        folder = view.dataset.source_folder.rstrip("/") or "/"
        remote = f"{folder}/{self.path}" if self.path else folder
        return {"user.scicat.pid": self.pid, "user.scicat.remote_path": remote}


@dataclass(frozen=True, slots=True)
class ControlDir(Node):
    """``<dataset>/.scicat``: the record and the file list of one dataset."""

    pid: str
    kind: ClassVar[Kind] = Kind.DIRECTORY

    async def lookup(self, ns: Namespace, name: str) -> Node:
        if name == METADATA:
            view = await ns.view(self.pid)
            return RecordFile(self.pid, f"{CONTROL_DIR}/{METADATA}", view.version)
        if name == FILES:
            return RecordFile(self.pid, f"{CONTROL_DIR}/{FILES}")
        raise NoEntry(name)

    async def attributes(self, ns: Namespace) -> Attributes:
        view = await ns.view(self.pid)
        return Attributes(Kind.DIRECTORY, 0, view.dataset.creation_time, 2, ns.record_ttl)

    async def listing(self, ns: Namespace) -> Listing:
        return tuple(ns._control_entries(await ns.view(self.pid)))

    def parent(self) -> Node:
        return DatasetDir(self.pid)

    def where(self) -> tuple[str | None, str | None]:
        return self.pid, CONTROL_DIR

    async def xattrs(self, ns: Namespace) -> dict[str, str]:
        return {"user.scicat.pid": self.pid}


@dataclass(frozen=True, slots=True)
class RecordFile(Node):
    """A generated file of a dataset: ``metadata.json`` (either place) or ``.scicat/files.json``.

    ``version`` is a digest of metadata.json's bytes, so a changed record is a
    new node (and a new inode, whose page cache cannot hold the old text).
    files.json changes all the time; it has no version and is read with
    direct I/O instead.
    """

    pid: str
    path: str
    version: str = ""
    kind: ClassVar[Kind] = Kind.FILE

    @property
    def live(self) -> bool:
        return self.path.endswith(FILES)

    @property
    def direct_io(self) -> bool:  # type: ignore[override]
        return self.live

    async def attributes(self, ns: Namespace) -> Attributes:
        view = await ns.view(self.pid)
        if self.live:
            return Attributes(Kind.FILE, ns._files_json_size(view), time.time(), 1, FILES_JSON_TTL)
        return Attributes(Kind.FILE, len(self._bytes(view)), view.dataset.creation_time, 1, ns.record_ttl)

    async def content(self, ns: Namespace) -> bytes:
        view = await ns.view(self.pid)
        return ns._files_json(view) if self.live else self._bytes(view)

    def _bytes(self, view: _DatasetView) -> bytes:
        if self.version != view.version:
            raise NoEntry(f"{self.path} of {self.pid} changed in the catalog; look it up again")
        return view.metadata

    def parent(self) -> Node:
        return ControlDir(self.pid) if "/" in self.path else DatasetDir(self.pid)

    def where(self) -> tuple[str | None, str | None]:
        return self.pid, self.path

    async def xattrs(self, ns: Namespace) -> dict[str, str]:
        return {"user.scicat.pid": self.pid}


@dataclass(frozen=True, slots=True)
class DataFileNode(Node):
    """A dataset file; the spec holds everything that identifies its version."""

    spec: FileSpec
    kind: ClassVar[Kind] = Kind.FILE

    async def attributes(self, ns: Namespace) -> Attributes:
        return ns.file_attributes(self.spec)

    def parent(self) -> Node:
        return DatasetDir(self.spec.pid, self.spec.path.rpartition("/")[0])

    def where(self) -> tuple[str | None, str | None]:
        return self.spec.pid, self.spec.path

    async def xattrs(self, ns: Namespace) -> dict[str, str]:
        spec = self.spec
        values = {
            "user.scicat.pid": spec.pid,
            "user.scicat.remote_path": spec.remote_path,
            "user.scicat.source": spec.source,
            "user.scicat.cached": str(ns.cached_bytes(spec)),
        }
        if spec.checksum is not None:
            values["user.scicat.checksum"] = str(spec.checksum)
        return values


# -- the mount's own /.scicat ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MountDir(Node):
    """The mount's own ``/.scicat``."""

    kind: ClassVar[Kind] = Kind.DIRECTORY

    async def lookup(self, ns: Namespace, name: str) -> Node:
        if name == STATUS and ns.has_status:
            return StatusFile()
        if name == PID_ALIAS and ns.has_views:
            return PidAlias()
        raise NoEntry(name)

    async def attributes(self, ns: Namespace) -> Attributes:
        return Attributes(Kind.DIRECTORY, 0, ns.started, 3 if ns.has_views else 2, ns.listing_ttl)

    async def listing(self, ns: Namespace) -> Listing:
        entries: list[Entry] = []
        if ns.has_status:
            status = StatusFile()
            entries.append((STATUS, status, await status.attributes(ns)))
        if ns.has_views:
            entries.append((PID_ALIAS, PidAlias(), ns.level_attributes()))
        return tuple(entries)

    def parent(self) -> Node:
        return ROOT

    def where(self) -> tuple[str | None, str | None]:
        return None, f"/{CONTROL_DIR}"


@dataclass(frozen=True, slots=True)
class StatusFile(Node):
    """``/.scicat/status.json``: the mount's counters, rendered on every open (direct I/O)."""

    kind: ClassVar[Kind] = Kind.FILE
    direct_io: ClassVar[bool] = True

    async def attributes(self, ns: Namespace) -> Attributes:
        return Attributes(Kind.FILE, len(await self.content(ns)), time.time(), 1, ttl=1.0)

    async def content(self, ns: Namespace) -> bytes:
        return ns.status()

    def parent(self) -> Node:
        return MountDir()

    def where(self) -> tuple[str | None, str | None]:
        return None, f"/{CONTROL_DIR}/{STATUS}"


@dataclass(frozen=True, slots=True)
class PidAlias(Node):
    """``/.scicat/pid``: the root's PID tree without its reserved names, so that a PID that
    equals one (or starts with one and a ``/``) stays reachable. It only answers lookups:
    listing it shows nothing, the root lists every other PID."""

    kind: ClassVar[Kind] = Kind.DIRECTORY

    async def lookup(self, ns: Namespace, name: str) -> Node:
        return await ns._lookup_pid(name)

    async def attributes(self, ns: Namespace) -> Attributes:
        return ns.level_attributes()

    async def listing(self, ns: Namespace) -> Listing:
        return ()

    def parent(self) -> Node:
        return MountDir()

    def where(self) -> tuple[str | None, str | None]:
        return None, f"/{CONTROL_DIR}/{PID_ALIAS}"


class _DatasetView:
    """One version of a dataset as a tree: directory path -> {name: file or None (a directory)}."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.metadata = metadata_json(dataset)
        self.version = hashlib.sha256(self.metadata).hexdigest()[:16]
        self.dirs: dict[str, dict[str, DataFile | None]] = {"": {}}
        for datafile in dataset.files:
            parent, _, name = datafile.path.rpartition("/")
            self._directory(parent)[name] = datafile
        top = self.dirs[""]
        if CONTROL_DIR in top:
            log.warning(
                "dataset %r: its top-level %r is hidden by the reserved %s/ directory",
                dataset.pid, CONTROL_DIR, CONTROL_DIR,
            )
            del top[CONTROL_DIR]
        self.metadata_shadowed = METADATA in top
        self._order: dict[str, tuple[list[DataFile], dict[str, int]]] = {}  # built on first use
        #: Specs built so far, by file path: every open asks for the next files' specs (``following``).
        self.specs: dict[str, FileSpec] = {}
        # Counted once: every stat of a directory shows it (as its link count).
        self._subdirectories = {
            path: sum(1 for child in entries.values() if child is None) for path, entries in self.dirs.items()
        }

    def _directory(self, path: str) -> dict[str, DataFile | None]:
        entries = self.dirs.get(path)
        if entries is None:
            parent, _, name = path.rpartition("/")
            self._directory(parent)[name] = None
            entries = self.dirs[path] = {}
        return entries

    def subdirectories(self, path: str) -> int:
        return self._subdirectories[path]

    def files_after(self, path: str, limit: int) -> list[DataFile]:
        """Up to ``limit`` files after ``path`` in its directory, in listing order (for prefetch)."""
        parent = path.rpartition("/")[0]
        order = self._order.get(parent)
        if order is None:
            files = [child for child in self.dirs.get(parent, {}).values() if child is not None]
            order = self._order[parent] = (files, {child.path: at for at, child in enumerate(files)})
        files, positions = order
        at = positions.get(path)
        return [] if at is None else files[at + 1 : at + 1 + limit]

    def changes_since(self, old: _DatasetView) -> dict[str, list[str]]:
        """Names, by directory ("" is the dataset, ".scicat" its control dir), that
        now mean something else than in ``old``: changed, removed or added.
        Unchanged files keep their node, and so their inode and page cache."""
        changed: dict[str, list[str]] = {}
        for path in old.dirs.keys() | self.dirs.keys():
            before, after = old.dirs.get(path, {}), self.dirs.get(path, {})
            names = [name for name in before.keys() | after.keys() if before.get(name, ...) != after.get(name, ...)]
            if names:
                changed[path] = names
        if old.version != self.version:
            for directory in ("", CONTROL_DIR):
                changed.setdefault(directory, []).append(METADATA)
        return changed


class Namespace:
    """Resolves names and attributes for the filesystem, backed by the catalog.

    ``cached_bytes`` reports how much of a file the local cache holds (for
    ``st_blocks``, files.json and xattrs). ``file_spec`` turns a catalog file
    into what the cache needs, its source URL included (``scicatfs.stack``
    builds it, the same way for the mount and for ``prefetch``).
    ``status()`` renders ``/.scicat/status.json`` (the mount's counters; no
    ``/.scicat`` when None and no ``views``).
    ``views`` are the top-level directories besides the PID tree, by name
    (see :mod:`scicatfs.fs.views`).
    ``on_change(pid, names)`` is called when a dataset's record or file list
    changed since it was last seen, with the names that changed by directory
    (see ``_DatasetView.changes_since``), so the caller can drop them from the
    kernel's caches.
    """

    def __init__(
        self,
        catalog: CatalogClient,
        cached_bytes: Callable[[FileSpec], int],
        file_spec: Callable[[Dataset, DataFile], FileSpec],
        *,
        record_ttl: float = 60.0,
        listing_ttl: float = 30.0,
        status: Callable[[], bytes] | None = None,
        views: Mapping[str, Node] | None = None,
        on_change: Callable[[str, dict[str, list[str]]], None] | None = None,
        lookup_timeout: float = LOOKUP_TIMEOUT,
    ) -> None:
        self.catalog = catalog
        self.lookup_timeout = lookup_timeout
        self.cached_bytes = cached_bytes
        self._spec = file_spec
        self.record_ttl = record_ttl
        self.listing_ttl = listing_ttl
        self._status = status
        self.on_change = on_change
        self.started = time.time()
        #: The root's reserved names: the mount's own directories, then the views.
        self.top: dict[str, Node] = {}
        if status is not None or views:
            self.top[CONTROL_DIR] = MountDir()
        self.top.update(views or {})
        self.has_views = bool(views)
        # What views built from catalog answers (see remembered): a view directory's links
        # are held whole, 10,000 of them a few MB, so only the latest few are kept.
        self._remembered: SingleFlightCache[Hashable, Any] = SingleFlightCache(128, listing_ttl)
        self._views: LRUCache[str, _DatasetView] = LRUCache(maxsize=64)
        # Names a listing showed, so a lookup right after `ls` needs no request
        # to tell a PID prefix from a dataset.
        self._seen_prefixes: TTLCache[str, bool] = TTLCache(maxsize=65536, ttl=max(listing_ttl, 1e-3))
        # Every name ever found to be a PID prefix, without expiry: while the
        # catalog is unreachable, the path to the datasets already seen stays open.
        self._known_prefixes: LRUCache[str, bool] = LRUCache(maxsize=65536)
        self._offline_until = 0.0  # time.monotonic() until which the catalog is not asked (OFFLINE_RETRY)
        self._reported: LRUCache[str, bool] = LRUCache(maxsize=4096)
        # (pid, path) -> (the view it was built from, its entries); see LISTING_CACHE_ENTRIES
        self._listings: TTLCache[tuple[str, str], tuple[_DatasetView, tuple[Entry, ...]]] = TTLCache(
            maxsize=LISTING_CACHE_ENTRIES, ttl=max(record_ttl, 1e-3), getsizeof=lambda item: len(item[1])
        )
        self._files_json_sizes: TTLCache[str, tuple[_DatasetView, int]] = TTLCache(
            maxsize=1024, ttl=FILES_JSON_TTL
        )

    # -- what the FUSE layer asks ----------------------------------------------------

    async def lookup(self, parent: Node, name: str) -> Node:
        """The child ``name`` of ``parent``; :class:`NoEntry` if there is none."""
        return await parent.lookup(self, name)

    async def attributes(self, node: Node) -> Attributes:
        """``stat`` of ``node``; dataset-backed nodes may ask the catalog (TTL-cached)."""
        return await node.attributes(self)

    async def listing(self, node: Node) -> Listing:
        """The entries of directory ``node``: a snapshot, or a restartable source."""
        return await node.listing(self)

    async def content(self, node: Node) -> bytes:
        """The bytes of a generated file."""
        return await node.content(self)

    async def target(self, node: Node) -> str:
        """Where symbolic link ``node`` points."""
        return await node.target(self)

    async def xattrs(self, node: Node) -> dict[str, bytes]:
        """``user.scicat.*`` attributes of ``node`` (only with ``-o xattrs``)."""
        values = await node.xattrs(self)
        return {key: value.encode("utf-8", "surrogateescape") for key, value in values.items()}

    # -- what the nodes share ----------------------------------------------------------

    @property
    def has_status(self) -> bool:
        return self._status is not None

    def status(self) -> bytes:
        if self._status is None:
            raise NoEntry(STATUS)
        return self._status()

    def level_attributes(self) -> Attributes:
        """A directory whose subdirectory count is unknown: nlink 1 says so to find(1) and friends."""
        return Attributes(Kind.DIRECTORY, 0, self.started, 1, self.listing_ttl)

    def file_attributes(self, spec: FileSpec) -> Attributes:
        return Attributes(Kind.FILE, spec.size, spec.mtime, 1, self.record_ttl, self.cached_bytes(spec))

    def child(self, view: _DatasetView, directory: str, name: str, child: DataFile | None) -> Node:
        path = f"{directory}/{name}" if directory else name
        if child is None:
            return DatasetDir(view.dataset.pid, path)
        return DataFileNode(self._view_spec(view, child))

    def following(self, spec: FileSpec, limit: int = 64) -> tuple[FileSpec, ...]:
        """The files listed after ``spec`` in its directory, from the dataset as last seen (no request)."""
        view = self._views.get(spec.pid)
        if view is None:
            return ()
        return tuple(self._view_spec(view, datafile) for datafile in view.files_after(spec.path, limit))

    def _view_spec(self, view: _DatasetView, datafile: DataFile) -> FileSpec:
        """``datafile``'s spec, built once per view: a walk of n files would otherwise build 64 n."""
        spec = view.specs.get(datafile.path)
        if spec is None:
            spec = view.specs[datafile.path] = self._spec(view.dataset, datafile)
        return spec

    async def ask_new(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` for a name with no last known answer: CatalogUnavailable after ``lookup_timeout``."""
        return await _ask(call, self.lookup_timeout)

    async def remembered(self, key: Hashable, build: Callable[[], Awaitable[T]]) -> T:
        """``build()``, kept for the listing TTL under ``key``; concurrent callers share one build."""
        return await self._remembered.get(key, build)

    def report_once(self, key: str, message: str) -> None:
        if key not in self._reported:
            self._reported[key] = True
            log.warning("%s", message)

    # -- PIDs ----------------------------------------------------------------------------

    async def _lookup_pid(self, candidate: str) -> Node:
        """A dataset if ``candidate`` is a PID, a PID level if it is a prefix of some.

        A name once known as a prefix stays a directory while the catalog gives
        no usable answer, so the datasets below it remain reachable offline.
        """
        known = candidate in self._known_prefixes
        if self._seen_prefixes.get(candidate) or (known and self._offline):
            return PidLevel(candidate + "/")
        try:
            return await _ask(lambda: self._resolve_pid(candidate), self._wait(known))
        except _NO_ANSWER as error:
            if not known:
                raise
            self._go_offline(f"offline:{candidate}/", f"PID prefix {candidate!r}: no usable answer from "
                             f"the catalog, still shown as a directory ({error})")
            return PidLevel(candidate + "/")

    async def _resolve_pid(self, candidate: str) -> Node:
        """Is ``candidate`` a dataset, or a PID prefix? The dataset is asked first.

        At the root both questions go out at once: there, names are few and
        mostly DOI-style prefixes (``20.500.12269``), and one after the other a
        fresh mount's first path waited for a 404 before asking about the
        prefix (half of its first open). Below the root names are mostly
        datasets, so the prefix is asked only when the dataset is missing:
        asking early there would double the requests of every dataset lookup.
        The early prefix request is dropped once the name turns out to be a
        dataset.
        """
        prefix: list[bool | Exception] = []

        async def ask_prefix() -> None:
            try:
                prefix.append(await self.catalog.is_pid_prefix(candidate))
            except Exception as error:  # raised below, if the answer is needed
                prefix.append(error)

        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            if "/" not in candidate:
                nursery.start_soon(ask_prefix)
            try:
                await self.view(candidate)
            except Exception as error:  # not raised in here: the nursery would wrap it
                failure = error
            if not isinstance(failure, (DatasetNotFound, DatasetForbidden)):
                nursery.cancel_scope.cancel()  # a dataset, or no answer: the prefix does not matter
        if failure is None:
            return DatasetDir(candidate)
        if not isinstance(failure, (DatasetNotFound, DatasetForbidden)):
            raise failure
        if not prefix:
            await ask_prefix()
        [is_prefix] = prefix
        if isinstance(is_prefix, Exception):
            raise is_prefix
        if is_prefix:
            return self._prefix_level(candidate)
        if isinstance(failure, DatasetForbidden):
            # A dataset we may not read is EACCES (see docs: the catalog itself
            # says it exists); a prefix of visible PIDs above is still browsable.
            raise failure
        raise NoEntry(candidate) from None

    def _prefix_level(self, name: str) -> PidLevel:
        """A name found to be a PID prefix, by a listing or a lookup: answered from memory for
        the listing TTL (asking again would cost a dataset request that answers 404)."""
        self._seen_prefixes[name] = self._known_prefixes[name] = True
        return PidLevel(name + "/")

    async def _pid_entries(self, prefix: str) -> AsyncIterator[Entry]:
        """The names of PID level ``prefix``, from the catalog's PID-ordered skip scan.

        The catalog gives each name once (see ``CatalogClient.iter_children``);
        the root starts with the mount's own directories (:attr:`top`).
        """
        if prefix == "":
            for name, node in self.top.items():
                yield name, node, await node.attributes(self)
        async with aclosing(self.catalog.iter_children(prefix)) as children:
            async for child in children:
                name = child.name
                shown = child.pid if child.pid is not None else f"{prefix}{name}/…"
                if prefix == "" and name in self.top:
                    self.report_once(shown, f"PID {shown!r} is hidden by the mount's reserved /{name}/")
                elif not _valid_component(name):
                    self.report_once(shown, f"PID {shown!r} cannot be shown: {name!r} is not a usable file name")
                elif child.pid is None:
                    yield name, self._prefix_level(prefix + name), self.level_attributes()
                else:
                    yield name, DatasetDir(child.pid), self.listed_dataset_attributes(child.pid)

    def listed_dataset_attributes(self, pid: str) -> Attributes:
        """Attributes for a dataset seen as a PID in a listing, without fetching its record.

        The listing page carries the creation time, so ``ls -l`` of many
        datasets costs no request per dataset; the subdirectory count is then
        unknown (nlink 1, as for PID levels). Only if the page had no usable
        time does the entry get provisional attributes with a zero TTL, so
        that the kernel's next access looks the dataset up.
        """
        view = self._views.get(pid)
        if view is not None:
            nlink = 3 + view.subdirectories("")
            return Attributes(Kind.DIRECTORY, 0, view.dataset.creation_time, nlink, self.record_ttl)
        created = self.catalog.listed_creation_time(pid)
        if created is None:
            return Attributes(Kind.DIRECTORY, 0, self.started, 1, ttl=0.0)
        return Attributes(Kind.DIRECTORY, 0, created, 1, self.listing_ttl)

    # -- dataset listings ----------------------------------------------------------------

    def _built_listing(self, view: _DatasetView, path: str) -> tuple[Entry, ...] | None:
        """The entries of a dataset directory, built once per view and record TTL.

        None for a directory too large to keep: its entries are then produced
        as the kernel reads them. Attributes in a kept listing are as old as
        the listing, at most the record TTL, which is how long the kernel
        trusts them anyway.
        """
        if len(view.dirs[path]) + 2 > LISTING_CACHE_ENTRIES:
            return None
        key = (view.dataset.pid, path)
        kept = self._listings.get(key)
        if kept is not None and kept[0] is view:
            return kept[1]
        entries = tuple(self._dataset_entries(view, path))
        if self.record_ttl > 0:
            self._listings[key] = (view, entries)
        return entries

    def _dataset_entries(self, view: _DatasetView, path: str) -> Iterator[Entry]:
        pid = view.dataset.pid
        created = view.dataset.creation_time
        if path == "":
            if not view.metadata_shadowed:
                record = RecordFile(pid, METADATA, view.version)
                yield METADATA, record, Attributes(Kind.FILE, len(view.metadata), created, 1, self.record_ttl)
            yield CONTROL_DIR, ControlDir(pid), Attributes(Kind.DIRECTORY, 0, created, 2, self.record_ttl)
        for name, child in view.dirs[path].items():
            node = self.child(view, path, name, child)
            if isinstance(node, DataFileNode):
                yield name, node, self.file_attributes(node.spec)
            else:
                nlink = 2 + view.subdirectories(f"{path}/{name}" if path else name)
                yield name, node, Attributes(Kind.DIRECTORY, 0, created, nlink, self.record_ttl)

    def _control_entries(self, view: _DatasetView) -> Iterator[Entry]:
        pid = view.dataset.pid
        created = view.dataset.creation_time
        record = RecordFile(pid, f"{CONTROL_DIR}/{METADATA}", view.version)
        yield METADATA, record, Attributes(Kind.FILE, len(view.metadata), created, 1, self.record_ttl)
        files = RecordFile(pid, f"{CONTROL_DIR}/{FILES}")
        yield FILES, files, Attributes(Kind.FILE, self._files_json_size(view), time.time(), 1, FILES_JSON_TTL)

    # -- generated files -------------------------------------------------------------------

    def _files_json_size(self, view: _DatasetView) -> int:
        """The size of files.json, rendered at most once per FILES_JSON_TTL per dataset.

        ``ls -l`` and ``find`` stat it; rendering asks the cache about every
        file of the dataset. The file is read with direct I/O, so a size a
        moment old does not cut its content short.
        """
        kept = self._files_json_sizes.get(view.dataset.pid)
        if kept is not None and kept[0] is view:
            return kept[1]
        return len(self._files_json(view))

    def _files_json(self, view: _DatasetView) -> bytes:
        dataset = view.dataset
        files = []
        for datafile in dataset.files:
            if datafile.path.partition("/")[0] == CONTROL_DIR:
                continue
            spec = self._spec(dataset, datafile)
            files.append(
                {
                    "path": datafile.path,
                    "remote_path": datafile.remote_path,
                    "source": spec.source,
                    "size": datafile.size,
                    "checksum": None if datafile.checksum is None else str(datafile.checksum),
                    "cached": self.cached_bytes(spec),
                }
            )
        document = {"pid": dataset.pid, "sourceFolder": dataset.source_folder, "files": files}
        content = (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")
        self._files_json_sizes[dataset.pid] = (view, len(content))
        return content

    # -- datasets ------------------------------------------------------------------

    async def view(self, pid: str) -> _DatasetView:
        """The tree of dataset ``pid``, rebuilt only when the catalog returns a new record.

        When the catalog cannot be reached, the last version seen keeps being
        served, so browsing what was already open survives a network outage.
        """
        previous = self._views.get(pid)
        if previous is not None and self._offline:
            return previous
        # Most calls (every lookup, stat and opendir inside a dataset) find the
        # record cached: skip the deadline machinery of _ask for them.
        dataset = self.catalog.cached_dataset(pid)
        if dataset is None:
            try:
                dataset = await _ask(lambda: self.catalog.get_dataset(pid), self._wait(previous is not None))
            except _NO_ANSWER as error:
                if previous is None:
                    raise
                self._go_offline(f"offline:{pid}", f"dataset {pid!r}: no usable answer from the catalog, "
                                 f"serving the last version seen ({error})")
                return previous
        if previous is not None and previous.dataset is dataset:
            return previous
        view = _DatasetView(dataset)
        self._views[pid] = view
        changes = {} if previous is None else view.changes_since(previous)
        if changes:
            log.info("dataset %r changed in the catalog", pid)
            if self.on_change is not None:
                self.on_change(pid, changes)
        return view

    def _wait(self, known: bool) -> float:
        """How long to wait for the catalog: briefly with a last known answer to fall back on."""
        return STALE_WAIT if known else self.lookup_timeout

    @property
    def _offline(self) -> bool:
        """The catalog gave no usable answer a moment ago: do not ask it again yet."""
        return time.monotonic() < self._offline_until

    def _go_offline(self, key: str, message: str) -> None:
        """Serve what was seen last, without asking the catalog for OFFLINE_RETRY s; say so once per ``key``."""
        self._offline_until = time.monotonic() + OFFLINE_RETRY
        self.report_once(key, message)


def parent_of(node: Node) -> Node:
    """The directory that holds ``node`` (the root for the root): what ``..`` names."""
    return node.parent()


async def _ask(call: Callable[[], Awaitable[T]], wait: float) -> T:
    """``call()``, or CatalogUnavailable once it has taken ``wait`` seconds."""
    with trio.move_on_after(wait):
        return await call()
    raise CatalogUnavailable(f"the catalog did not answer within {wait:g} s")


def reachable_pid(pid: str) -> bool:
    """Whether ``pid`` has a path in the tree: every ``/`` component a usable name. A link to any
    other PID could resolve somewhere else entirely (``a/../../x``), so views leave them out."""
    return all(_valid_component(part) for part in pid.split("/"))


def _valid_component(name: str) -> bool:
    """Usable as a file name: not empty, ".", ".." or too long, no NUL, valid Unicode."""
    try:
        encoded = name.encode("utf-8")  # a JSON "\ud800" decodes to a str that cannot be a name
    except UnicodeEncodeError:
        return False
    return name not in ("", ".", "..") and b"\0" not in encoded and len(encoded) <= 255


async def _replay(entries: Iterator[Entry]) -> AsyncIterator[Entry]:
    for entry in entries:
        yield entry
