"""PID listings page by page: key ranges, skip scans, and ``skip`` as the last resort.

A listing is a sequence of pages sorted by PID, each asking for the PIDs above
the last one seen (``pid > last``, ``limit N``). The catalog's database
answers that from its PID index in O(log n + N) whatever the position, where
``skip`` walks past every skipped document: listing a million datasets in
pages of 1,000 by ``skip`` walks ~500 million documents; by range, a million.

A PID level lists the distinct next components of the PIDs under its prefix.
When a page shows that ``a/b/`` is a deeper prefix, nothing else under
``a/b/`` can add a name, so the rest of that prefix is skipped: the next page
starts at :func:`prefix_end` of ``a/b/`` (a "skip scan"). A level with a few
big prefixes below it then costs one page per prefix instead of one per 1,000
datasets; it never costs more pages than listing every PID under it.

A server that answers a range filter with 400, or with PIDs outside the range
it was asked for (it ignored the filter), is detected once per client, told
once at WARNING, and listed with ``skip`` from then on (restarting the
listing that noticed, and dropping what it already gave).

The page fetching is pulled by the consumer (a readdir), one page ahead: the
next page is on its way while the kernel takes the entries of this one, and
an abandoned listing costs at most that one page more.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import aclosing
from typing import NamedTuple

import trio
from dataclasses import dataclass

__all__ = ["Child", "Pager", "PidRange", "RangeRefused", "RecentTimes", "prefix_end"]

log = logging.getLogger(__name__)

_MAX_CHAR = chr(0x10FFFF)
_SURROGATES = range(0xD800, 0xE000)


class RecentTimes:
    """The creation time of each PID on the pages listed lately: at most ``size`` PIDs, for ``ttl`` seconds.

    Written once per listed PID, a million times for a million datasets: an
    OrderedDict drops the oldest in O(1) (a TTLCache insertion costs tens of
    microseconds, and a plain dict's first key gets slower to find with every
    deletion at its front).
    """

    def __init__(self, size: int, ttl: float) -> None:
        self._size = size
        self._ttl = ttl
        self._times: OrderedDict[str, tuple[float, float]] = OrderedDict()  # pid -> (created, when listed)

    def note_all(self, times: Iterable[tuple[str, float]]) -> None:
        """Note ``(pid, created)`` pairs listed now (a page's worth: one clock reading for all)."""
        now = time.monotonic()
        kept = self._times
        for pid, created in times:
            if pid in kept:
                kept.move_to_end(pid)
            kept[pid] = (created, now)
        while len(kept) > self._size:
            kept.popitem(last=False)

    def get(self, pid: str) -> float | None:
        found = self._times.get(pid)
        if found is None or time.monotonic() - found[1] > self._ttl:
            return None
        return found[0]


class RangeRefused(Exception):
    """The catalog rejected a range filter on ``pid`` (its message says why)."""


@dataclass(frozen=True, slots=True)
class PidRange:
    """The PIDs above ``start`` (from it, if ``inclusive``) and below ``stop``; None: unbounded."""

    start: str | None
    inclusive: bool
    stop: str | None

    def __contains__(self, pid: object) -> bool:
        if not isinstance(pid, str):
            return False
        if self.start is not None and (pid < self.start or (pid == self.start and not self.inclusive)):
            return False
        return self.stop is None or pid < self.stop


class Child(NamedTuple):
    """One name of a PID level: a dataset (``pid`` is its PID) or a deeper prefix (``pid`` None).

    A tuple, not a dataclass: one is made per listed name, and a tuple is made faster.
    """

    name: str
    pid: str | None


def prefix_end(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix``; None if there is none.

    Strings compare by code point here, and by UTF-8 bytes in MongoDB, which
    is the same order. Surrogates are stepped over (they cannot travel in JSON).
    """
    stem = prefix.rstrip(_MAX_CHAR)
    if not stem:
        return None
    following = ord(stem[-1]) + 1
    if following in _SURROGATES:
        following = _SURROGATES.stop
    return stem[:-1] + chr(following)


def prefix_range(prefix: str) -> PidRange:
    """Every PID that starts with ``prefix``."""
    return PidRange(prefix or None, True, prefix_end(prefix))


#: ``(keys, limit)`` -> the PIDs of that page, sorted; raises RangeRefused.
RangePage = Callable[[PidRange, int], Awaitable[Sequence[str]]]
#: ``(prefix, skip, limit)`` -> the PIDs of that page of the prefix's listing, sorted.
SkipPage = Callable[[str, int, int], Awaitable[Sequence[str]]]


class Pager:
    """Lists PIDs and PID levels for one catalog client (which owns the page fetches)."""

    def __init__(self, range_page: RangePage, skip_page: SkipPage, page_size: int, where: str) -> None:
        self._range_page = range_page
        self._skip_page = skip_page
        self._size = page_size
        self._where = where
        self._ranges = True  # until the catalog refuses or ignores a range filter

    @property
    def ranges(self) -> bool:
        """Whether the catalog is still listed by PID range (not after it refused or ignored one)."""
        return self._ranges

    async def pids(self, prefix: str = "") -> AsyncIterator[str]:
        """Every visible PID that starts with ``prefix``, in PID order."""
        async for page in self._pages(prefix, self._size, deeper=True):
            for pid in page:
                yield pid

    async def first(self, prefix: str) -> str | None:
        """The first visible PID that starts with ``prefix``, if any: a page of one."""
        async with aclosing(self._pages(prefix, 1, deeper=True, ahead=False)) as pages:
            async for page in pages:
                return page[0]
        return None

    async def children(self, prefix: str = "") -> AsyncIterator[Child]:
        """The distinct next components of the PIDs under ``prefix``, in PID order.

        A name that is a dataset and also the prefix of longer PIDs comes once,
        as the dataset (it sorts first). ``open_names`` holds the names given
        so far that the current PID still starts with: between dataset ``a``
        and ``a/…`` come ``a-b``, ``a.c`` and the like, so it is a short chain.
        """
        open_names: list[str] = []
        skip_to: str | None = None  # the end of the deeper prefix being passed over
        async for page in self._pages(prefix, self._size, deeper=False):
            for pid in page:
                if skip_to is not None and pid < skip_to:
                    continue
                rest = pid[len(prefix):]
                name, slash, _ = rest.partition("/")
                if slash:
                    skip_to = prefix_end(f"{prefix}{name}/")
                if open_names:
                    open_names = [n for n in open_names if rest.startswith(n)]
                if name in open_names:
                    continue
                open_names.append(name)
                yield Child(name, None if slash else pid)

    async def _pages(self, prefix: str, size: int, *, deeper: bool, ahead: bool = True
                     ) -> AsyncIterator[Sequence[str]]:
        """Pages of ``size`` PIDs under ``prefix``; without ``deeper``, ranges skip deeper prefixes.

        Every page yielded holds only PIDs under the prefix, above the ones
        before it; a page that breaks that turns the client to ``skip``.
        With ``ahead``, the next page is fetched while this one is consumed.
        """
        keys = prefix_range(prefix)
        last: str | None = None
        coming: _ReadAhead | None = None
        while self._ranges:
            try:
                page = await (coming.result() if coming else self._range_page(keys, size))
            except RangeRefused as error:
                self.give_up_ranges(f"it refused a range filter on pid ({error})")
                break
            if page and not (page[0] in keys and page[-1] in keys and all(map(str.__lt__, page, page[1:]))):
                self.give_up_ranges("it answered a range filter on pid with PIDs outside that range")
                break
            if len(page) < size:
                if page:
                    yield page
                return
            last = page[-1]
            keys = _after(prefix, last, keys.stop, deeper)
            coming = _ReadAhead(self._range_page, keys, size) if ahead else None
            yield page
        async for page in self._skip_pages(prefix, last, size):
            yield page

    async def _skip_pages(self, prefix: str, after: str | None, size: int) -> AsyncIterator[Sequence[str]]:
        """The ``skip`` listing, from the start, without the PIDs up to ``after`` (given already)."""
        skip = 0
        while True:
            page = await self._skip_page(prefix, skip, size)
            fresh = [pid for pid in page if pid.startswith(prefix) and (after is None or pid > after)]
            if fresh:
                yield fresh
                after = fresh[-1]
            if len(page) < size:
                return
            skip += size

    def give_up_ranges(self, why: str) -> None:
        """List with ``skip`` from now on, saying once at WARNING ``why`` the catalog cannot list by range."""
        if self._ranges:
            self._ranges = False
            log.warning("the catalog at %s cannot list by PID range: %s; listing with skip, which "
                        "costs the catalog more with every page", self._where, why)


def _after(prefix: str, last: str, stop: str | None, deeper: bool) -> PidRange:
    """Where the page after the one ending in ``last`` starts.

    Without ``deeper``, a ``last`` below a deeper prefix (``prefix + "b/…"``)
    means the rest of that prefix can add no name: the next page starts at
    its end. That is the only jump the page's consumer can want, so the
    next page is known as soon as this one arrives.
    """
    name, slash, _ = last[len(prefix):].partition("/")
    if slash and not deeper:
        end = prefix_end(f"{prefix}{name}/")
        return PidRange(end, True, stop)
    return PidRange(last, False, stop)


class _ReadAhead:
    """One page fetched in the background, for the listing to pick up when it gets there.

    It runs as a trio system task because a listing's pages are consumed by
    successive readdir requests, each its own task: no nursery spans them.
    An abandoned listing thus costs at most this one page more. Errors are
    kept for the listing to raise in its own task; if the fetch was cancelled
    (the program is ending), the listing fetches the page itself.
    """

    def __init__(self, fetch: RangePage, keys: PidRange, size: int) -> None:
        self._fetch = lambda: fetch(keys, size)
        self._done = trio.Event()
        self._page: Sequence[str] | None = None
        self._error: Exception | None = None
        trio.lowlevel.spawn_system_task(self._run)

    async def _run(self) -> None:
        try:
            self._page = await self._fetch()
        except Exception as error:  # raised in the listing's task, not here (it would end the program)
            self._error = error
        finally:
            self._done.set()

    async def result(self) -> Sequence[str]:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        if self._page is None:
            return await self._fetch()
        return self._page
