"""One :class:`~scicatfs.transfer.base.Transfer` in front of several, chosen by URL scheme.

The cache holds one transfer; this one hands each call to the implementation
registered for the URL's scheme (``sftp``, ``file``, ``https``, ``http``) and
counts bytes, requests and errors per origin (``scheme://[user@]host[:port]``),
which ``scicatfs status`` shows per source. Implementations are entered and
left with the dispatcher, so each owns its threads and connections for exactly
the dispatcher's lifetime.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from types import TracebackType
from typing import TypeVar

from scicatfs.transfer.base import LocalFile, SourceStats, Transfer, origin
from scicatfs.transfer.errors import TransferError

__all__ = ["Dispatcher"]

T = TypeVar("T")
#: Totals over all sources; implementations' other counters (reconnects, ...) are summed beside.
_PER_SOURCE = ("bytes_read", "requests", "errors")


class Dispatcher:
    """Routes each URL to the transfer registered for its scheme."""

    def __init__(self, transfers: Mapping[str, Transfer], default: str | None = None) -> None:
        """``transfers``: scheme -> implementation (one object may serve several schemes);
        ``default``: the URL that ``warm_up()`` without a URL warms up."""
        self._transfers = dict(transfers)
        self._default = default
        self._sources: dict[str, SourceStats] = {}
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Dispatcher:
        async with AsyncExitStack() as stack:
            for transfer in dict.fromkeys(self._transfers.values()):  # each once, in order
                await stack.enter_async_context(transfer)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._stack.__aexit__(exc_type, exc, traceback)

    async def read(self, url: str, offset: int, length: int) -> bytes:
        data = await self._counted(url, lambda transfer: transfer.read(url, offset, length))
        self._source(url).bytes_read += len(data)
        return data

    async def size(self, url: str) -> int:
        return await self._counted(url, lambda transfer: transfer.size(url))

    async def warm_up(self, url: str | None = None, *, wait: float = 0.0) -> None:
        url = url or self._default
        if url is not None and url.partition(":")[0] in self._transfers:
            await self._transfer(url).warm_up(url, wait=wait)

    def is_local(self, url: str) -> bool:
        transfer = self._transfers.get(url.partition(":")[0])
        return transfer is not None and transfer.is_local(url)

    def open_local(self, url: str) -> LocalFile:
        stats = self._source(url)
        stats.requests += 1
        try:
            local = self._transfer(url).open_local(url)
        except TransferError:
            stats.errors += 1
            raise
        local.stats = stats  # its reads count for this source
        return local

    @property
    def stats(self) -> dict[str, int]:
        """Totals over every source, plus the implementations' own counters (reconnects, ...)."""
        totals = {name: sum(getattr(s, name) for s in self._sources.values()) for name in _PER_SOURCE}
        for transfer in dict.fromkeys(self._transfers.values()):
            for name, value in transfer.stats.items():
                if name not in _PER_SOURCE:
                    totals[name] = totals.get(name, 0) + value
        return totals

    @property
    def schemes(self) -> frozenset[str]:
        """The URL schemes this dispatcher can read."""
        return frozenset(self._transfers)

    @property
    def sources(self) -> dict[str, dict[str, int]]:
        """Per origin (``scheme://[user@]host[:port]``, never a secret): bytes_read, requests, errors."""
        return {name: stats.as_dict() for name, stats in sorted(self._sources.items())}

    def _transfer(self, url: str) -> Transfer:
        scheme = url.partition(":")[0]
        transfer = self._transfers.get(scheme)
        if transfer is None:
            known = ", ".join(f"{name}://" for name in sorted(self._transfers))
            raise TransferError(f"{url}: no transfer for {scheme}:// here (this mount reads {known})")
        return transfer

    def _source(self, url: str) -> SourceStats:
        key = origin(url)
        stats = self._sources.get(key)
        if stats is None:
            stats = self._sources[key] = SourceStats()
        return stats

    async def _counted(self, url: str, call: Callable[[Transfer], Awaitable[T]]) -> T:
        stats = self._source(url)
        stats.requests += 1
        try:
            return await call(self._transfer(url))
        except TransferError:
            stats.errors += 1
            raise
