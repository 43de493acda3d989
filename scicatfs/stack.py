"""The one place that turns mount options into the layers: catalog, store, transfers, fetcher.

``scicatfs mount``, ``scicatfs prefetch`` and the ``cache`` commands build
what they need here, so that they agree on everything that decides where a
file's bytes come from and which blob holds them (a file without a checksum
is keyed on its source URL: a prefetch that built specs differently would
fill blobs the mount never finds). Nothing here imports FUSE: only
``scicatfs.mount`` does.

Where bytes come from (:class:`FileSpecs`): the longest ``--source`` rule
that covers the file's remote path, else SFTP from ``--sftp-host``, else from
the dataset's ``sourceFolderHost``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from scicatfs.cache.errors import CacheError
from scicatfs.cache.fetcher import Fetcher
from scicatfs.cache.shared import SharedCache, SharedTier
from scicatfs.cache.store import BlobStore, FileSpec, default_budget
from scicatfs.catalog.auth import resolve_credentials
from scicatfs.catalog.client import CatalogClient, CatalogSettings, Selection
from scicatfs.catalog.models import DataFile, Dataset
from scicatfs.config import MountOptions
from scicatfs.fs.namespace import Namespace
from scicatfs.fs.views import top_level_views
from scicatfs.sources import SourceRules, default_source
from scicatfs.transfer.base import Transfer
from scicatfs.transfer.dispatch import Dispatcher
from scicatfs.transfer.http import HTTPSettings, HTTPTransfer
from scicatfs.transfer.local import LocalTransfer
from scicatfs.transfer.sftp import SFTPSettings, SFTPTransfer

__all__ = [
    "FileSpecs",
    "Stack",
    "catalog_settings",
    "open_stack",
    "open_store",
    "sftp_settings",
    "transfers",
]


def catalog_settings(options: MountOptions) -> CatalogSettings:
    """How to reach the catalog. Raises ``CatalogError`` when the credentials cannot be read."""
    credentials = resolve_credentials(options.token_file, options.username, options.password_file)
    return CatalogSettings(
        url=options.url,
        credentials=credentials,
        record_ttl=options.record_ttl,
        listing_ttl=options.listing_ttl,
    )


def sftp_settings(options: MountOptions) -> SFTPSettings:
    """How to reach SFTP servers (the default source, and ``sftp://`` rules)."""
    return SFTPSettings(
        host=options.sftp_host,
        port=options.sftp_port,
        username=options.sftp_user,
        identity_files=() if options.identity_file is None else (options.identity_file,),
        known_hosts=options.known_hosts,
        check_host_keys=not options.insecure_no_host_key_check,
        connections=options.sftp_connections,
    )


def open_store(directory: Path, size: int | None) -> BlobStore:
    """The cache at ``directory``; budget ``size``, else min(10 GiB, 10 % of its filesystem).

    Raises ``CacheError`` when the directory is unusable.
    """
    return BlobStore(directory, size if size is not None else default_budget(directory))


class FileSpecs:
    """Builds the cache's view of a catalog file, its source URL included."""

    def __init__(self, options: MountOptions) -> None:
        self.rules = SourceRules(options.sources)
        self._sftp_host = options.sftp_host

    def __call__(self, dataset: Dataset, datafile: DataFile) -> FileSpec:
        path = datafile.remote_path
        source = self.rules.locate(path) or default_source(path, self._sftp_host or dataset.source_folder_host)
        return FileSpec(
            pid=dataset.pid,
            path=datafile.path,
            source=source,
            remote_path=path,
            size=datafile.size,
            mtime=datafile.mtime,
            checksum=datafile.checksum,
        )

    @property
    def covers_everything(self) -> bool:
        """Does a rule for ``/`` leave nothing to the default SFTP source?"""
        return any(rule.prefix == "/" for rule in self.rules.rules)


def transfers(options: MountOptions, specs: FileSpecs) -> Dispatcher:
    """One transfer per scheme the mount can need: SFTP unless a ``/`` rule covers every
    file, and ``file``/``http(s)`` only when a rule names them."""
    schemes = specs.rules.schemes
    if not specs.covers_everything:
        schemes.add("sftp")
    made: dict[str, Transfer] = {}
    if "sftp" in schemes:
        made["sftp"] = SFTPTransfer(sftp_settings(options))
    if "file" in schemes:
        made["file"] = LocalTransfer()
    if schemes & {"http", "https"}:
        web = HTTPTransfer(HTTPSettings(token_file=options.http_token_file))
        made.update(dict.fromkeys(schemes & {"http", "https"}, web))
    default = default_source("/", options.sftp_host) if options.sftp_host else None
    return Dispatcher(made, default=default)


@dataclass(frozen=True, slots=True)
class Stack:
    """The connected layers of one mount or one prefetch."""

    catalog: CatalogClient
    store: BlobStore
    transfer: Dispatcher
    fetcher: Fetcher
    file_spec: FileSpecs


@asynccontextmanager
async def open_stack(options: MountOptions) -> AsyncIterator[Stack]:
    """Enter catalog client, store, shared tier (if any), transfers and fetcher (trio); leave in reverse.

    Raises ``CatalogError`` (credentials), ``CacheError`` (cache directory) or
    ``TransferError`` (an unreadable HTTP token file) before anything runs.
    """
    specs = FileSpecs(options)
    settings = catalog_settings(options)
    async with AsyncExitStack() as stack:
        catalog = await stack.enter_async_context(CatalogClient(settings))
        store = stack.enter_context(open_store(options.cache_dir, options.cache_size))
        shared = None
        if options.shared_cache is not None:
            try:
                tier = SharedTier(options.shared_cache, store.chunk_size)
            except OSError as error:
                raise CacheError(f"shared cache {options.shared_cache}: {error.strerror or error}") from None
            shared = await stack.enter_async_context(SharedCache(tier))
        transfer = await stack.enter_async_context(transfers(options, specs))
        fetcher = await stack.enter_async_context(
            Fetcher(store, transfer, retry_failed_after=options.retry_failed, shared=shared)
        )
        yield Stack(catalog, store, transfer, fetcher, specs)


def namespace(stack: Stack, options: MountOptions, status: Callable[[], bytes] | None = None) -> Namespace:
    """The tree over the stack's layers, with the views the options ask for: one for the mount and ``scicat://``."""
    return Namespace(
        stack.catalog,
        stack.fetcher.cached_bytes,
        stack.file_spec,
        record_ttl=options.record_ttl,
        listing_ttl=options.listing_ttl,
        status=status,
        views=top_level_views(
            (query.name, Selection(query.where, None, query.sort, query.limit)) for query in options.views
        ),
        lookup_timeout=options.lookup_timeout,
    )
