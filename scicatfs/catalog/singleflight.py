"""A TTL cache in front of an async fetch, where concurrent misses share one fetch.

Without it, a burst of ``stat`` calls on a freshly listed directory would send
one identical catalog request per call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import trio
from cachetools import TTLCache

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Flight(Generic[V]):
    __slots__ = ("done", "result", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: V | None = None
        self.error: BaseException | None = None


class SingleFlightCache(Generic[K, V]):
    """Results are cached for ``ttl`` seconds; errors are not cached.

    If the task doing a fetch is cancelled, a waiting task starts its own
    fetch instead of inheriting the cancellation.
    """

    def __init__(self, maxsize: int, ttl: float) -> None:
        self._cache: TTLCache[K, V] = TTLCache(maxsize=maxsize, ttl=ttl)
        self._flights: dict[K, _Flight[V]] = {}

    def peek(self, key: K) -> V | None:
        """The cached value, if any; never fetches."""
        return self._cache.get(key)

    async def get(self, key: K, fetch: Callable[[], Awaitable[V]]) -> V:
        while True:
            try:
                return self._cache[key]
            except KeyError:
                pass
            flight = self._flights.get(key)
            if flight is None:
                return await self._lead(key, fetch)
            await flight.done.wait()
            if flight.error is None:
                return flight.result  # type: ignore[return-value]
            if not isinstance(flight.error, trio.Cancelled):
                raise flight.error

    async def _lead(self, key: K, fetch: Callable[[], Awaitable[V]]) -> V:
        flight: _Flight[V] = _Flight()
        self._flights[key] = flight
        try:
            flight.result = result = await fetch()
            self._cache[key] = result
            return result
        except BaseException as error:
            flight.error = error
            raise
        finally:
            del self._flights[key]
            flight.done.set()
