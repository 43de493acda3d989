"""What to fetch and when: single-flight block fetches, growing read-ahead, deadlines.

Runs on the trio thread. Reads of cached blocks are served inline with ``pread``
(a thread hop per small read halves throughput); writes, index commits,
hashing and eviction run in worker threads. Fetches run as tasks in the
fetcher's own nursery, not in the reader's task, so a reader that gives up (its
deadline passed, FUSE interrupted it) does not cancel a transfer that other
readers share.

Granularity: the store records presence per block (128 KiB); a *flight*
fetches a run of missing blocks that never crosses a chunk (4 MiB) boundary.
A random read fetches the blocks it touches (one SFTP request for a small
read) and, on a long RTT, the fetch unit around them that ``ReadAhead``
sizes from the RTT and throughput timed on these transfers, as separate
flights; a sequential reader's read-ahead fetches the rest of the current
chunk and whole chunks after it, each with one request, one sync and one index
transaction.

Concurrency bounds:
- At most ``max_in_flight`` bytes of blocks are held by read-ahead and prefetch
  flights (being fetched or being written); demand reads add what FUSE asks for
  concurrently. Speculative flights (read-ahead, prefetch) use the network at
  most (max_in_flight / chunk / 2) at once: a ``trio.CapacityLimiter`` taken
  only around the transfer, so cache hits never queue behind the network and a
  slow disk write does not hold a slot. A flight that a reader waits for does
  not take it: parallel readers of small files (a data loader's threads) keep
  the connection pool busy instead of queueing four at a time; FUSE and
  ``max_reads`` in fs bound their number.
- Every transfer attempt has a deadline, and every reader waits at most
  ``read_timeout`` before getting ``FetchTimeout`` (EIO): never a hang.

Integrity: a file version whose bytes failed verification (checksum or size)
is recorded in the cache index by the store, and from then on every open and
every read of it, in any process, raises its IntegrityError; listeners (the
mount) are told so that they drop the kernel's cached pages. Failures that
other processes record are picked up by a poll every ``FAILURE_POLL`` seconds.
After the retry time the next open re-fetches the whole file and verifies it
before serving a byte (``_refetch``). docs/failure-behaviour.md says what users see.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

import trio

from scicatfs.cache.digest import RunningDigest
from scicatfs.cache.errors import CacheError, FetchTimeout, IntegrityError, report_integrity
from scicatfs.cache.local import LocalBlob, LocalFiles
from scicatfs.cache.readahead import DatasetWalk, ReadAhead, Stream
from scicatfs.cache.store import RETRY_FAILED_AFTER, Blob, BlobStore, BlockWrite, FileSpec, is_disk_full
from scicatfs.cache.tiers import TierStats
from scicatfs.transfer.base import Transfer
from scicatfs.transfer.errors import ConnectionLost, SourceChanged, TransferError, TransferTimeout

if TYPE_CHECKING:
    from scicatfs.cache.shared import SharedCache

__all__ = ["Fetcher", "Handle"]

log = logging.getLogger(__name__)

LOCK_POLL_INTERVAL = 0.02
#: How long the event loop waits for the store's lock to drop a pin inline, before a worker thread does.
INLINE_LOCK_WAIT = 0.005
#: Files fetched ahead whose blob stays open until they are opened (the oldest is let go first).
PARKED_MAX = 64
#: Seconds between looks at the index for failures that other processes recorded.
FAILURE_POLL = 2.0
Progress = Callable[[int, int], None]
#: Told the blob key of a file version that just failed verification (run in the fetcher's nursery).
FailureListener = Callable[[str], Awaitable[None]]
T = TypeVar("T")


@dataclass(eq=False)
class Handle:
    """One open file: its blob (pinned while the handle lives) and its access pattern."""

    spec: FileSpec
    blob: Blob
    stream: Stream = field(default_factory=Stream)


@dataclass(eq=False)
class _Flight:
    """A run of blocks being fetched; every reader of those blocks waits on it.

    ``ready`` is set as soon as ``data`` (the run's bytes, from block ``first``)
    or ``error`` is known, before the blocks are written: readers need not wait
    for the fsync, and can be served when nothing can be cached (disk full).
    ``settled`` is set when the flight is over (blocks recorded, or given up).
    ``data`` stays None when another process cached the blocks: read the blob.
    """

    first: int
    count: int
    demand: bool  # a reader waits for it (else read-ahead or prefetch)
    ready: trio.Event = field(default_factory=trio.Event)
    settled: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BaseException | None = None


class Fetcher:
    """Serves reads of dataset files from the blob store, fetching missing chunks.

    Use as ``async with Fetcher(store, transfer) as fetcher:``; leaving the block
    cancels background fetches (chunks already written stay valid).
    """

    def __init__(
        self,
        store: BlobStore,
        transfer: Transfer,
        *,
        max_in_flight: int = 32 * 1024 * 1024,
        readahead_max: int = 64 * 1024 * 1024,
        read_timeout: float = 60.0,
        transfer_timeout: float = 35.0,
        attempts: int = 2,
        retry_wait: float = 10.0,
        retry_failed_after: float = RETRY_FAILED_AFTER,
        shared: SharedCache | None = None,
    ) -> None:
        if read_timeout <= 0 or transfer_timeout <= 0 or attempts < 1:
            raise ValueError("timeouts must be positive and attempts at least 1")
        self.store = store
        self.transfer = transfer
        self._local = LocalFiles(store)
        chunk = store.chunk_size
        self._max_flights = max(2, max_in_flight // chunk)
        self._max_blocks = max(2 * chunk, max_in_flight) // store.block_size
        self._limiter = trio.CapacityLimiter(self._max_flights // 2)
        self.readahead = ReadAhead(store.block_size, chunk, readahead_max)
        self.walk = DatasetWalk()
        #: Per directory being walked: the fetches ahead still running (cancelled when the walk breaks).
        self._walk_fetches: dict[tuple[str, str], set[trio.CancelScope]] = {}
        #: Blobs of files fetched ahead, still pinned so that their open needs no worker thread.
        self._parked: OrderedDict[str, Blob] = OrderedDict()
        #: Blob keys being fetched ahead whose file has not been opened since (only those are parked).
        self._ahead_unopened: set[str] = set()
        self.read_timeout = read_timeout
        self.transfer_timeout = transfer_timeout
        self.attempts = attempts
        self.retry_wait = retry_wait
        self.retry_failed_after = retry_failed_after
        self.failure_listeners: list[FailureListener] = []
        self.shared = shared  # the shared cache tier between this cache and the source (cache.shared)
        self.tiers = TierStats()
        self._retries: dict[str, trio.Event] = {}  # blob key -> its verified re-fetch, under way
        self._failures_seen = time.time()
        self._flights: dict[tuple[str, int], _Flight] = {}  # (blob key, block) -> its flight
        self._unevicted = 0  # bytes written since the last eviction pass
        #: Block writes waiting for the next batch, and whether the writer task runs (``_write``).
        self._writes: list[tuple[BlockWrite, trio.Event]] = []
        self._writing = False
        self._downloading = 0  # transfers from the source under way
        self._verifications: dict[str, trio.Event] = {}
        self._digests: weakref.WeakKeyDictionary[Blob, RunningDigest] = weakref.WeakKeyDictionary()
        self._evicting = False
        #: The last eviction pass left blobs it could not evict because they were open:
        #: only then may an unpin let the next pass free more (see ``_unpin``).
        self._blocked_by_pins = True
        self._nursery: trio.Nursery | None = None
        self._nursery_manager = trio.open_nursery()
        # chunks_fetched / chunks_uncached: blocks fetched / not cached (disk
        # full); reads_from_cache / reads_fetched: cache hits and misses (a miss
        # waits for the network); fetch_errors: flights that failed, whatever
        # the cause; integrity_errors: size or checksum mismatches.
        self.stats = dict.fromkeys(
            ("chunks_fetched", "chunks_uncached", "reads_from_cache", "reads_fetched",
             "fetch_errors", "integrity_errors"),
            0,
        )  # fmt: skip

    async def __aenter__(self) -> Fetcher:
        self._nursery = await self._nursery_manager.__aenter__()
        self._nursery.start_soon(self._evict)  # start-up eviction, in the background
        self._nursery.start_soon(self._watch_failures)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        assert self._nursery is not None
        while self._parked:
            await self._unpin(self._parked.popitem()[1])
        self._nursery.cancel_scope.cancel()
        self._nursery = None
        try:
            return await self._nursery_manager.__aexit__(exc_type, exc, traceback)
        except BaseExceptionGroup as group:
            # The caller's own exception, grouped only by our nursery: let it out as it was
            # raised (a MountError or CommandError must reach its handler unwrapped).
            if exc is not None and len(group.exceptions) == 1 and group.exceptions[0] is exc:
                raise exc from exc.__cause__
            raise

    # -- the contract used by fs ----------------------------------------------

    async def open(self, spec: FileSpec, following: Sequence[FileSpec] = ()) -> Handle:
        """Pin the file's blob for reading; a small file starts being fetched whole.

        ``following``: the files after this one in its directory's listing
        order, so that a reader walking the directory gets the next files
        fetched ahead (``DatasetWalk``). A file version that failed
        verification raises its IntegrityError, unless its retry time has come
        (see ``_retry_failed``).
        """
        if spec.size < 0:
            raise CacheError(f"{spec.pid} {spec.path}: negative size {spec.size} in the catalog")
        blob = self.store.pin_open(spec) if not self.transfer.is_local(spec.source) else None
        if blob is None:
            blob = await trio.to_thread.run_sync(self._open_blob, spec)
        parked = self._parked.pop(blob.key, None)
        if parked is not None:  # fetched ahead for this open: the handle's pin replaces the walk's
            await self._unpin(parked)
        self._ahead_unopened.discard(blob.key)  # a fetch ahead under way need not park it for this open
        if blob.error is not None:
            try:
                await self._retry_failed(spec, blob)
            except BaseException:
                await self._unpin(blob)
                raise
        elif blob.all_present and not blob.complete:  # filled by another process, or unverified
            self._start_verification(spec, blob)
        handle = Handle(spec, blob)
        if blob.error is None and self._nursery is not None:
            whole = self.readahead.on_open(blob.size, all_present=blob.all_present)
            if whole is not None:
                self._start_flights(handle, whole.start, whole.demand, whole.stop)
            self._walk_on(spec, following)
        return handle

    def _walk_on(self, spec: FileSpec, following: Sequence[FileSpec]) -> None:
        """Fetch the next files of a directory being walked; stop fetching ahead when the walk breaks."""
        assert self._nursery is not None
        step = self.walk.opened(spec, following)
        key = self.walk.key(spec)
        if step.broken:
            for scope in self._walk_fetches.pop(key, ()):
                scope.cancel()
        if step.fetch:
            self._nursery.start_soon(self._fetch_ahead, step.fetch, self._walk_fetches.setdefault(key, set()))

    async def _fetch_ahead(self, specs: Sequence[FileSpec], running: set[trio.CancelScope]) -> None:
        """Fetch small files ahead of a walking reader: their blobs opened by one worker-thread job."""
        with trio.CancelScope(shield=True):  # opens that finished must be released
            opened = await trio.to_thread.run_sync(self._open_ahead, specs)
        for spec, blob in opened:
            if self._nursery is None:  # shut down meanwhile
                await self._unpin(blob)
            else:
                self._nursery.start_soon(self._fetch_one_ahead, Handle(spec, blob), running)

    def _open_ahead(self, specs: Sequence[FileSpec]) -> list[tuple[FileSpec, Blob]]:
        """The blobs of files to fetch ahead, those that could be opened (worker thread)."""
        opened = []
        for spec in specs:
            try:
                opened.append((spec, self.store.open_blob(spec)))
            except (CacheError, OSError) as error:
                log.debug("fetching %s %s ahead: %s", spec.pid, spec.path, error)
        return opened

    async def _fetch_one_ahead(self, handle: Handle, running: set[trio.CancelScope]) -> None:
        """Fetch one file ahead of a walking reader (its flights count as demand: it will be read).

        A broken walk cancels the wait, not the flights: they are at most the
        walk's budget and their blocks stay cached. A file fetched whole keeps
        its blob pinned (``_parked``, at most ``PARKED_MAX``) until it is
        opened, so the open finds it in memory instead of opening the blob
        file and its index rows again in a worker thread; unless it was opened
        while being fetched (the reader was served from the flight), which
        would leave a parked pin that no open takes over.
        """
        spec, blob = handle.spec, handle.blob
        parked = False
        self._ahead_unopened.add(blob.key)
        try:
            if blob.error is None and not blob.all_present:
                self._start_flights(handle, 0, blob.block_count, blob.block_count)
                flights = {
                    index: self._flights[blob.key, index]
                    for index in range(blob.block_count)
                    if (blob.key, index) in self._flights
                }
                with trio.CancelScope() as scope:
                    running.add(scope)
                    try:
                        await self._wait(handle, flights, settled=True)
                    finally:
                        running.discard(scope)
            if blob.error is None and blob.all_present and blob.key in self._ahead_unopened:
                self._parked[blob.key] = blob
                parked = True
                if len(self._parked) > PARKED_MAX:
                    await self._unpin(self._parked.popitem(last=False)[1])
        except (CacheError, TransferError, OSError) as error:
            log.debug("fetching %s %s ahead: %s", spec.pid, spec.path, error)
        finally:
            self._ahead_unopened.discard(blob.key)
            if not parked:
                await self._unpin(blob)

    def _open_blob(self, spec: FileSpec) -> Blob:
        """The blob of ``spec``: a local source file in place, else the store's (worker thread)."""
        if self.transfer.is_local(spec.source):
            return self._local.open(spec, self.transfer.open_local(spec.source))
        return self.store.open_blob(spec)

    async def _retry_failed(self, spec: FileSpec, blob: Blob) -> None:
        """Open a failed file version: its error, or, once its retry time has come, a verified re-fetch.

        The re-fetch runs in the background (one per blob across processes:
        ``claim_retry``) and serves no byte until the whole file has verified;
        the open waits for it at most ``retry_wait`` seconds, then answers the
        error as before.
        """
        assert blob.error is not None
        running = self._retries.get(blob.key)
        if running is None:
            due = blob.retry_at is not None and time.time() >= blob.retry_at
            if not due or self._nursery is None or not await trio.to_thread.run_sync(
                self.store.claim_retry, blob, self.retry_failed_after
            ):
                raise blob.error
            running = self._retries[blob.key] = trio.Event()
            self.store.retain(blob)
            self._nursery.start_soon(self._refetch, spec, blob, running)
        with trio.move_on_after(self.retry_wait):
            await running.wait()
        if blob.error is not None:
            raise blob.error

    async def _refetch(self, spec: FileSpec, blob: Blob, done: trio.Event) -> None:
        """Fetch a failed file again from scratch and verify it; success clears the failure."""
        again = "hashing" if isinstance(blob, LocalBlob) else "fetching"
        log.info("%s %s %s again to verify it (it failed verification before)", again, spec.pid, spec.path)
        handle = Handle(spec, blob)
        try:
            if not isinstance(blob, LocalBlob):  # a local file is the source itself: only hashed again
                await trio.to_thread.run_sync(self.store.discard, blob)
                await self._fetch_all(handle)
            await self._verify(handle)
        except IntegrityError:  # recorded and reported again; stays failed until the next retry time
            pass
        except (CacheError, OSError) as error:  # stays failed until the next retry time
            log.warning("re-fetching %s %s failed: %s", spec.pid, spec.path, error)
        finally:
            del self._retries[blob.key]
            done.set()
            await self._unpin(blob)

    async def release(self, handle: Handle) -> None:
        await self._unpin(handle.blob)

    def cached_bytes(self, spec: FileSpec) -> int:
        """Bytes readable without the network: all of a local source file."""
        return spec.size if self.transfer.is_local(spec.source) else self.store.cached_bytes(spec)

    @property
    def chunks_in_flight(self) -> int:
        """Flights (runs of blocks) under way right now, demand and read-ahead, for status."""
        return len(set(self._flights.values()))

    async def read(self, handle: Handle, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (fewer only at end of file)."""
        blob = handle.blob
        if blob.error is not None:
            raise blob.error
        if offset < 0 or size < 0:
            raise CacheError(f"invalid read of {size} bytes at offset {offset}")
        end = min(offset + size, blob.size)
        if offset >= end:
            return b""
        block = blob.block_size
        first, last = offset // block, (end - 1) // block
        present = blob.present
        cached = all(index in present for index in range(first, last + 1))
        if not cached:  # the transfer's own round trips (its warm-up probe, remote opens)
            self.readahead.link.seed(self.transfer.stats.get("round_trip_us", 0) / 1e6)
        plan = self.readahead.plan(handle.stream, offset, end, blob.size, hit=cached, all_present=blob.all_present)
        if plan is not None:
            reached = self._start_flights(handle, plan.start, plan.demand, plan.stop)
            self.readahead.started(handle.stream, plan, reached)
            if plan.around and self._nursery is not None:  # after the read's own flight: it stays small
                self.store.retain(blob)  # for the task: the handle may be released first
                self._nursery.start_soon(self._fetch_around, handle.spec, blob, plan.around, plan.demand, plan.piece)
        if cached:
            self.stats["reads_from_cache"] += 1
            self.tiers.served_locally(end - offset)
            if isinstance(blob, LocalBlob):  # a worker thread: a cluster filesystem may stall
                data = await trio.to_thread.run_sync(blob.local.read, offset, end - offset)
                return await self._checked(handle, end, data)
            return await self._checked(handle, end, self.store.read(blob, offset, end - offset))
        self.stats["reads_fetched"] += 1
        flights = {
            index: self._flights[blob.key, index]
            for index in range(first, last + 1)
            if index not in present and (blob.key, index) in self._flights
        }
        await self._wait(handle, flights)
        return await self._checked(handle, end, self._assemble(blob, flights, offset, end))

    def _assemble(self, blob: Blob, flights: dict[int, _Flight], offset: int, end: int) -> bytes:
        """The bytes [offset, end) from the flights' data and, for the other blocks, the blob.

        Consecutive blocks with the same source are taken in one piece, so a
        read inside one flight costs one copy of its bytes (a join of one
        piece is that piece), not a copy per block and another to join them.
        """

        def source_of(index: int) -> _Flight | None:  # None: the block is read from the blob
            flight = flights.get(index)
            return flight if flight is not None and flight.data is not None else None

        block = blob.block_size
        parts = []
        index, last = offset // block, (end - 1) // block
        while index <= last:
            source = source_of(index)
            run_end = index + 1
            while run_end <= last and source_of(run_end) is source:
                run_end += 1
            start, stop = max(offset, index * block), min(end, run_end * block)
            if source is not None:
                assert source.data is not None
                base = source.first * block
                parts.append(source.data[start - base : stop - base])
            else:
                parts.append(self.store.read(blob, start, stop - start))
            index = run_end
        return b"".join(parts)

    async def _checked(self, handle: Handle, end: int, data: bytes) -> bytes:
        """``data``, unless the blob failed verification; the read that ends the file waits for it.

        So a sequential reader of a file whose bytes do not match the catalog's
        checksum gets EIO from its last read instead of a silent success. A file
        not fully cached (only its tail was read, or the disk is full) cannot be
        verified and is not waited for.
        """
        blob = handle.blob
        if end == blob.size and blob.checksum is not None and not blob.complete:
            under_way = {flight for (key, _), flight in self._flights.items() if key == blob.key}
            with trio.move_on_after(self.read_timeout):
                for flight in under_way:
                    await flight.settled.wait()
            if blob.all_present:
                await self._verify(handle)
        if blob.error is not None:  # verification failed (and truncated the blob) meanwhile
            raise blob.error
        return data

    async def _wait(
        self, handle: Handle, flights: dict[int, _Flight], *, settled: bool = False
    ) -> None:
        """Wait until the flights' data (or, if ``settled``, their end) is there.

        At most ``read_timeout`` in all; raises the first flight's error.
        """
        with trio.move_on_after(self.read_timeout):
            for flight in flights.values():
                await (flight.settled if settled else flight.ready).wait()
        for index, flight in flights.items():
            if not (flight.settled if settled else flight.ready).is_set():
                raise FetchTimeout(
                    f"{handle.spec.pid} {handle.spec.path}: chunk {index} not fetched"
                    f" within {self.read_timeout:g} s"
                )
            if flight.error is not None:
                raise flight.error

    async def prefetch(self, spec: FileSpec, progress: Progress | None = None) -> None:
        """Fetch and verify a whole file; ``progress(cached_bytes, size)`` after each flight."""
        handle = await self.open(spec)
        try:
            blob = handle.blob
            await self._fetch_all(handle, progress)
            await self._verify(handle)
            if blob.error is not None:
                raise blob.error
            if not blob.complete:
                raise CacheError(f"{spec.pid} {spec.path}: could not cache the whole file")
        finally:
            await self.release(handle)

    async def _fetch_all(self, handle: Handle, progress: Progress | None = None) -> None:
        """Fetch every missing block of a file, ``max_in_flight`` bytes at a time."""
        blob = handle.blob
        pending: deque[_Flight] = deque()
        per_chunk = blob.blocks_per_chunk
        chunks = -(-blob.block_count // per_chunk)
        for chunk in range(chunks):
            low, high = chunk * per_chunk, min(blob.block_count, (chunk + 1) * per_chunk)
            self._start_flights(handle, low, high, high)
            started = (self._flights.get((blob.key, index)) for index in range(low, high))
            pending.extend(dict.fromkeys(flight for flight in started if flight is not None))
            while pending and (len(pending) >= self._max_flights or chunk == chunks - 1):
                flight = pending.popleft()
                await self._wait(handle, {flight.first: flight}, settled=True)
                if progress is not None:
                    progress(blob.present_bytes, blob.size)

    # -- fetching ----------------------------------------------------------------

    def _start_flights(self, handle: Handle, start: int, demand: int, stop: int, piece: int = 0) -> int:
        """Start flights for the missing blocks in [start, stop); return where it stopped.

        Blocks before ``demand`` are being read and always fetched; the rest are
        read-ahead, started only while fewer than ``max_in_flight`` bytes are in
        flight. Blocks under way join their flight. A flight is a run of
        consecutive missing blocks within one chunk, so it is one transfer, one
        sync and one index transaction; with ``piece``, at most that many blocks.
        """
        blob = handle.blob
        key, present, flights = blob.key, blob.present, self._flights
        per_chunk = blob.blocks_per_chunk
        index = start
        while index < stop:
            if index in present or (key, index) in flights:
                index += 1
                continue
            if index >= demand and len(flights) >= self._max_blocks:
                return index
            limit = min(stop, (index // per_chunk + 1) * per_chunk, index + piece if piece else stop)
            run_end = index + 1
            while run_end < limit and run_end not in present and (key, run_end) not in flights:
                run_end += 1
            self._launch(handle, index, run_end - index, demand=index < demand)
            index = run_end
        return stop

    def _launch(self, handle: Handle, first: int, count: int, *, demand: bool) -> None:
        """Start fetching ``count`` blocks from ``first`` in the background."""
        if self._nursery is None:
            raise CacheError("the fetcher is not running (use it as an async context manager)")
        flight = _Flight(first, count, demand)
        for index in range(first, first + count):
            self._flights[handle.blob.key, index] = flight
        self.store.retain(handle.blob)
        self._nursery.start_soon(self._run_flight, flight, handle.spec, handle.blob)

    async def _fetch_around(self, spec: FileSpec, blob: Blob, around: range, demand: int, piece: int) -> None:
        """Start the flights beside a read, ``piece`` blocks each, nearest after the read first.

        One at a time, each let run to its request before the next starts, so
        the requests leave in that order (tasks started together run in any
        order) and the blocks the reader is likely to want next come first.
        Bounded by the policy, they do not queue behind read-ahead for a slot:
        reads to come will wait for them.
        """
        try:
            handle = Handle(spec, blob)
            after = max(around.start, min(demand, around.stop))
            for start, stop in ((after, around.stop), (around.start, after)):
                for first in range(start, stop, piece or blob.blocks_per_chunk):
                    if blob.error is not None:
                        return
                    self._start_flights(handle, first, stop, min(stop, first + (piece or stop)), piece)
                    await trio.lowlevel.checkpoint()
        finally:
            await self._unpin(blob)

    async def _run_flight(self, flight: _Flight, spec: FileSpec, blob: Blob) -> None:
        try:
            await self._fetch_blocks(flight, spec, blob)
        except Exception as error:
            flight.error = error
            self.stats["fetch_errors"] += 1
        except trio.Cancelled:
            if not flight.ready.is_set():
                flight.error = CacheError("fetch cancelled: scicatfs is shutting down")
            raise
        finally:
            for index in range(flight.first, flight.first + flight.count):
                del self._flights[blob.key, index]
            flight.ready.set()
            flight.settled.set()
            await self._unpin(blob)

    async def _fetch_blocks(self, flight: _Flight, spec: FileSpec, blob: Blob) -> None:
        """Fetch, hand to readers, write and record a flight's blocks (unless another process did)."""
        first, count = flight.first, flight.count
        with trio.move_on_after(self.read_timeout) as waiting:
            while not self.store.try_lock_blocks(blob, first, count):
                if self.store.refresh_blocks(blob, first, count):
                    return
                await trio.sleep(LOCK_POLL_INTERVAL)
        if waiting.cancelled_caught:
            raise FetchTimeout(
                f"{spec.pid} {spec.path}: blocks {first}..{first + count - 1}"
                " stayed locked by another process"
            )
        try:
            if self.store.refresh_blocks(blob, first, count):
                return
            try:
                data = await self._from_tiers(spec, blob, first, count, demand=flight.demand)
            except SourceChanged:
                await self._forget_version(blob, flight)
                raise
            self.stats["chunks_fetched"] += count
            flight.data = data
            flight.ready.set()
            write = BlockWrite(blob, first, data, whole=spec)  # a whole small file is also completed
            try:
                await self._write(write)
            except IntegrityError as error:  # recorded by the store; nothing was written
                self._failed(blob, error)
                return
            except OSError as error:
                self.stats["chunks_uncached"] += count
                if self.readahead.write_failed():
                    log.warning(
                        "cannot cache %s %s (%s): serving reads uncached, read-ahead off",
                        spec.pid, spec.path, error,
                    )  # fmt: skip
                if is_disk_full(error):
                    self._start(self._evict, self.store.budget // 2)
                return
            if self.readahead.write_succeeded():
                log.warning("caching works again")
        finally:
            self.store.unlock_blocks(blob, first, count)
        self._unevicted += len(data)
        if self._unevicted >= self.store.chunk_size:  # not per block: eviction sums the index
            self._unevicted = 0
            self._start(self._evict)
        if blob.all_present and not blob.complete:
            self._start_verification(spec, blob)
        elif blob.checksum is not None:
            self._hash_ahead(blob)

    async def _write(self, write: BlockWrite) -> None:
        """Have the store write and record ``write``; raises the run's error.

        Writes that arrive while a batch is with the store go to it together
        in the next batch (``_write_batches``): many small files cost one
        worker-thread job and one group commit, not a thread each. Not
        cancellable: the caller's pin must outlive the write of its blob.
        """
        done = trio.Event()
        self._writes.append((write, done))
        if not self._writing:
            self._writing = True
            if self._nursery is not None:
                self._nursery.start_soon(self._write_batches)
            else:  # shutting down: this flight's write still ends before its pin goes
                await self._write_batches()
        with trio.CancelScope(shield=True):
            await done.wait()
        if write.error is not None:
            raise write.error

    async def _write_batches(self) -> None:
        """Hand the waiting writes to the store, a batch at a time, until none is left."""
        with trio.CancelScope(shield=True):  # every waiter must be woken, also at shutdown
            try:
                while self._writes:
                    batch, self._writes = self._writes, []
                    writes = [write for write, _ in batch]
                    try:
                        await trio.to_thread.run_sync(self.store.write_many, writes, self.retry_failed_after)
                    except Exception as error:  # a bug, not a full disk: each of these flights fails with it
                        for write in writes:
                            if not write.done:
                                write.error = error
                    for _, done in batch:
                        done.set()
            finally:
                self._writing = False

    async def _from_tiers(self, spec: FileSpec, blob: Blob, first: int, count: int, *, demand: bool) -> bytes:
        """A flight's bytes from the shared tier if there is one and it has them, else from the source.

        Only a speculative flight's source transfer takes a network slot: a
        reader's own flight never queues behind read-ahead.
        """
        started = time.monotonic()

        async def download() -> bytes:
            if demand:
                return await self._download(spec, blob, first, count)
            async with self._limiter:
                return await self._download(spec, blob, first, count)

        if self.shared is None:
            data, tier = await download(), "source"
        else:
            data, tier = await self.shared.read_or_fetch(blob, first, count, download)
        self.tiers.fetched(tier, len(data), time.monotonic() - started)
        return data

    async def _download(self, spec: FileSpec, blob: Blob, first: int, count: int) -> bytes:
        """Blocks from the server, checking them against the catalog's size.

        A run that ends the file is asked for with one byte more, so that a server
        file longer than the catalog says is noticed, not silently truncated.
        """
        offset = first * blob.block_size
        length = min(count * blob.block_size, blob.size - offset)
        ask = length + 1 if first + count == blob.block_count else length
        started, sharing = time.monotonic(), self._downloading + 1
        self._downloading += 1
        try:
            data = await self._with_deadline(lambda: self.transfer.read(spec.source, offset, ask), spec)
        finally:
            self._downloading -= 1
        # the fetch unit follows the link; transfers at the same time share its bandwidth
        self.readahead.link.observe(len(data), time.monotonic() - started, max(sharing, self._downloading + 1))
        if len(data) != length:
            actual = await self._with_deadline(
                lambda: self.transfer.size(spec.source), spec
            )
            error = IntegrityError(
                f"{spec.pid} {spec.path}: catalog says {spec.size} bytes,"
                f" server has {actual} ({spec.source})"
            )
            await trio.to_thread.run_sync(self.store.record_failure, blob, spec, error, self.retry_failed_after)
            self._failed(blob, error)
            raise error
        return data

    async def _forget_version(self, blob: Blob, flight: _Flight) -> None:
        """The file changed at its source: drop every block of the old version, so that the
        next read fetches the new one from scratch and old and new bytes never mix.

        Waits (at most ``read_timeout``) until the blob's other flights are over,
        since one may still be writing old bytes that it fetched before the change.
        """
        others = {other for (key, _), other in self._flights.items() if key == blob.key and other is not flight}
        with trio.move_on_after(self.read_timeout):
            for other in others:
                await other.settled.wait()
        await trio.to_thread.run_sync(self.store.discard, blob)

    async def _with_deadline(self, call: Callable[[], Awaitable[T]], spec: FileSpec) -> T:
        """Run one transfer call under ``transfer_timeout``, retrying ``attempts`` times.

        Only timeouts and dropped connections are retried; the transfer layer
        reconnects, so a retry may use a fresh connection.
        """
        problem: str = ""
        for attempt in range(1, self.attempts + 1):
            try:
                with trio.move_on_after(self.transfer_timeout):
                    return await call()
                problem = f"no answer within {self.transfer_timeout:g} s"
            except (TransferTimeout, ConnectionLost) as error:
                problem = str(error)
            log.warning(
                "fetching %s %s failed (attempt %d of %d): %s",
                spec.pid, spec.path, attempt, self.attempts, problem,
            )  # fmt: skip
        raise FetchTimeout(f"{spec.pid} {spec.path}: {problem}")

    def _start(self, function: Callable[..., Awaitable[object]], *args: object) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(function, *args)

    # -- completion and eviction ---------------------------------------------

    async def _verify(self, handle: Handle) -> None:
        """Verify a blob whose chunks are all present, at most once at a time per blob."""
        blob = handle.blob
        running = self._verifications.get(blob.key)
        if running is not None:
            await running.wait()
            return
        if blob.complete or not blob.all_present:
            return
        done = self._verifications[blob.key] = trio.Event()
        running = self._digests.pop(blob, None)
        try:
            digest = None
            if running is not None:
                async with running.lock:
                    digest = await trio.to_thread.run_sync(running.finish, self.store, blob)
            if isinstance(blob, LocalBlob):  # hashed in place; nothing to re-fetch after a failure
                await trio.to_thread.run_sync(self._local.complete, blob, handle.spec, self.retry_failed_after)
            else:
                await trio.to_thread.run_sync(
                    self.store.complete, blob, handle.spec, digest, self.retry_failed_after
                )
        except IntegrityError as error:
            self._failed(blob, error)
        except (CacheError, OSError) as error:  # stays incomplete; the next open retries
            log.warning("could not verify %s %s: %s", handle.spec.pid, handle.spec.path, error)
        finally:
            del self._verifications[blob.key]
            done.set()

    def _failed(self, blob: Blob, error: IntegrityError) -> None:
        """A file version just failed verification here or elsewhere: count, log, tell listeners."""
        self.stats["integrity_errors"] += 1
        report_integrity(error)
        if self.shared is not None:  # the shared objects may be what was wrong
            self._start(self.shared.discard, blob.key)
        for listener in self.failure_listeners:
            self._start(listener, blob.key)

    async def _watch_failures(self) -> None:
        """Apply failures recorded by other processes (a second mount, ``cache verify``) to open blobs.

        So once a mismatch is known anywhere, every handle open here answers
        EIO from its next read, within ``FAILURE_POLL`` seconds.
        """
        while True:
            await trio.sleep(FAILURE_POLL)
            try:
                failures = await trio.to_thread.run_sync(self.store.failures_since, self._failures_seen)
            except CacheError as error:
                log.debug("looking for recorded failures: %s", error)
                continue
            if not failures:
                continue
            self._failures_seen = failures[-1].failed_at
            open_blobs = {blob.key: blob for blob in self.store.open_blobs()}
            for failure in failures:
                blob = open_blobs.get(failure.key)
                if blob is None or blob.error is not None or failure.key in self._retries:
                    continue
                blob.error, blob.retry_at, blob.complete = IntegrityError(failure.message), failure.retry_at, False
                self._failed(blob, blob.error)

    def _hash_ahead(self, blob: Blob) -> None:
        """Hash the blob's newly recorded prefix in the background (see cache.digest)."""
        running = self._digests.get(blob)
        if running is None:
            assert blob.checksum is not None
            try:
                running = self._digests[blob] = RunningDigest(blob.checksum.algorithm)
            except ValueError:  # store.complete reports the unknown algorithm
                return
        if (
            self._nursery is not None
            and not running.lock.locked()
            and running.position // blob.block_size in blob.present  # else nothing to hash yet
        ):
            self.store.retain(blob)  # the blob's descriptor must outlive the hashing
            self._nursery.start_soon(self._hash_in_background, blob, running)

    async def _hash_in_background(self, blob: Blob, running: RunningDigest) -> None:
        try:
            async with running.lock:
                await trio.to_thread.run_sync(running.advance, self.store, blob)
        except (CacheError, OSError) as error:  # verification will hash the whole blob
            log.debug("hashing %s ahead failed: %s", blob.key, error)
            if self._digests.get(blob) is running:
                del self._digests[blob]
        finally:
            await self._unpin(blob)

    def _start_verification(self, spec: FileSpec, blob: Blob) -> None:
        if self._nursery is not None and blob.key not in self._verifications:
            self.store.retain(blob)  # now, not when the task starts: the caller may unpin first
            self._nursery.start_soon(self._verify_in_background, spec, blob)

    async def _verify_in_background(self, spec: FileSpec, blob: Blob) -> None:
        """Verify and then drop the pin that the starter took for this task."""
        try:
            await self._verify(Handle(spec, blob))
        finally:
            await self._unpin(blob)

    async def _unpin(self, blob: Blob) -> None:
        """Drop one pin (even while cancelled: a leaked pin would keep the blob forever).

        A cache blob's last pin closes its file inline: its access time waits in
        memory for the store's next index transaction (``BlobStore.release_blob``);
        only if the store's lock stays busy for ``INLINE_LOCK_WAIT`` does it go
        to a worker thread. The last pin of a local source file always does,
        since closing a file on a cluster filesystem may stall.
        """
        if isinstance(blob, LocalBlob):
            done = self.store.unpin_unless_last(blob)
        else:
            done = self.store.release_blob(blob, timeout=INLINE_LOCK_WAIT)
        if not done:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.store.release_blob, blob)
        if blob.pins == 0 and self._blocked_by_pins:
            self._start(self._evict)  # the blob may now be evictable

    async def _evict(self, target: int | None = None) -> None:
        """Shrink the cache to ``target`` (default: the budget); one eviction at a time."""
        if self._evicting:
            return
        self._evicting = True
        try:
            eviction = await trio.to_thread.run_sync(self.store.evict, target)
            self._blocked_by_pins = eviction.skipped_in_use > 0
        except (CacheError, OSError) as error:  # never let housekeeping take the mount down
            log.warning("cache eviction failed: %s", error)
        finally:
            self._evicting = False
