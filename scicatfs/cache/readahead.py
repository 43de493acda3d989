"""Read-ahead decisions: which blocks a read should fetch beyond what it asks for.

Pure bookkeeping, no I/O: the fetcher asks ``ReadAhead.plan`` on every read
and starts flights for the range it gets back, then tells the policy how far
it got (``started``). Keeping the decisions here, apart from the fetching,
lets them be tested without a server and changed in one place.

The rules:

- A handle's reads are *sequential* while each starts within one chunk of
  where the last one ended. The tolerance is needed because the kernel issues
  its own read-ahead requests concurrently and they may arrive reordered.
- On sequential access the window doubles with every new chunk reached, up to
  ``readahead_max`` bytes; the read then fetches the rest of its chunk and
  ``window`` whole chunks after it. A seek drops the window to nothing.
- Nothing is read ahead while the cache cannot keep what it fetches (the last
  write failed, e.g. a full disk), nor for a file that is already all cached.
- A file of at most ``WHOLE_FILE_MAX`` bytes is fetched whole when opened.
- The fetch unit of a miss follows the link (``Link``: round-trip time
  and throughput, measured on the fetcher's transfers and the transfer's own
  round trips): one block where a
  round trip is cheap (below ``LONG_RTT``), else the blocks one round trip's
  worth of bandwidth carries around a random read, and, sequential or not,
  the whole file where it takes at most ``WHOLE_FILE_ROUND_TRIPS`` round
  trips to transfer (each open starts a new stream that looks sequential at
  first: its first miss cannot tell). The extra blocks, and on a long RTT
  the sequential read-ahead too, are fetched beside the read's own, not in
  the flight it waits for, in flights of a round trip's worth (``piece``),
  so the read itself costs one round trip.
- Across files (``DatasetWalk``): a reader that opens a directory's files in
  listing order (tar, cp -r, a loader over a sorted list) gets the next small
  files fetched ahead, within a byte budget; an open out of order stops it.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from scicatfs.cache.store import FileSpec

__all__ = ["DatasetWalk", "Link", "Plan", "ReadAhead", "Stream", "WalkStep"]

#: Files up to this size are fetched whole as soon as they are opened.
WHOLE_FILE_MAX = 1024 * 1024
#: Below this round-trip time a random miss fetches only its own blocks: a flight then costs
#: the daemon's CPU (1-3 ms per miss on loopback, 5 ms and more on a loaded machine), which
#: more bytes per miss would add to.
LONG_RTT = 0.010
#: On a long RTT a random miss fetches the whole file if moving it takes at most this many round trips.
WHOLE_FILE_ROUND_TRIPS = 8
#: Throughput assumed until a transfer of at least ``RATE_SAMPLE_MIN`` bytes has been timed.
DEFAULT_THROUGHPUT = 64 * 1024 * 1024
RATE_SAMPLE_MIN = 1024 * 1024


class Link:
    """The source's round-trip time and throughput, from timed transfers (``observe``).

    The round-trip time is the least over recent small transfers (below
    ``RATE_SAMPLE_MIN``) of their time less what their bytes took at the
    estimated throughput; the throughput the most over recent large transfers
    (bytes / seconds times the transfers sharing the link, a round trip
    included, so it errs low). The least and
    the most, not means: transfers that queue behind others (on the
    connection, on the CPU) only ever look slower than the link is. A file's
    first transfer includes its remote open, one round trip more; the next
    ones correct it.
    """

    def __init__(self, samples: int = 32) -> None:
        self._rtts: deque[float] = deque(maxlen=samples)
        self._rates: deque[float] = deque(maxlen=samples)
        self._probed: float | None = None

    def seed(self, seconds: float) -> None:
        """The least round trip the transfer timed itself (its warm-up probe, its remote opens):
        known before any transfer here, and a floor the transfers' own samples cannot lower."""
        if seconds > 0:
            self._probed = seconds

    def observe(self, size: int, seconds: float, sharing: int = 1) -> None:
        """A transfer of ``size`` bytes took ``seconds`` from request to its last byte, while
        ``sharing`` transfers (itself included) were under way at its start or end."""
        if size >= RATE_SAMPLE_MIN:
            if seconds > 0:
                self._rates.append(sharing * size / seconds)
        else:
            self._rtts.append(max(0.0, seconds - size / self.throughput))

    @property
    def rtt(self) -> float | None:
        """Seconds per round trip; None before the first transfer."""
        if self._probed is None:
            return min(self._rtts, default=None)
        return min(self._probed, min(self._rtts, default=self._probed))

    @property
    def throughput(self) -> float:
        """Bytes per second."""
        return max(self._rates, default=DEFAULT_THROUGHPUT)

    def bytes_per_round_trip(self) -> float:
        """What one round trip's worth of bandwidth carries; 0 on a short (or unknown) RTT."""
        rtt = self.rtt
        return 0.0 if rtt is None or rtt < LONG_RTT else rtt * self.throughput


@dataclass(eq=False)
class Stream:
    """One handle's access pattern, as the policy has seen it so far."""

    next_offset: int = 0
    last_chunk: int = -1
    window: int = 0  # chunks to read ahead of the current one; 0: not sequential
    ahead: int = 0  # read-ahead has been started up to this block (exclusive)


@dataclass(frozen=True, slots=True)
class Plan:
    """Start flights for the missing blocks in [start, stop); those before ``demand`` are being read.

    ``speculative``: the range includes read-ahead (else it is the read's own blocks).
    ``around``: blocks to fetch beside the read, as read-ahead (a random read's larger
    fetch unit on a long RTT, or the whole file); empty if none. ``piece``: at most this
    many blocks per flight of ``around`` (one round trip's worth: the blocks near the read
    arrive first, not with the last of a 4 MiB chunk); 0: up to a chunk.
    """

    start: int
    demand: int
    stop: int
    speculative: bool
    around: range = range(0)
    piece: int = 0


class ReadAhead:
    """The fetcher-wide read-ahead policy; one ``Stream`` per open handle carries the state."""

    def __init__(self, block_size: int, chunk_size: int, readahead_max: int) -> None:
        if block_size <= 0 or chunk_size % block_size:
            raise ValueError(f"chunk size {chunk_size} is not a multiple of the block size {block_size}")
        self.block_size = block_size
        self.chunk_size = chunk_size
        self.max_chunks = max(1, readahead_max // chunk_size)
        #: False while writes to the cache fail: speculative blocks could not be kept.
        self.caching = True
        #: The source as the fetcher's transfers showed it (it calls ``link.observe``).
        self.link = Link()

    def plan(self, stream: Stream, offset: int, end: int, size: int, *, hit: bool, all_present: bool) -> Plan | None:
        """Observe a read of [offset, end) of a ``size``-byte file; say which blocks to fetch.

        ``hit``: every block the read touches is cached. A miss always gets a
        plan (at least its own blocks); a hit gets one only when the read-ahead
        should move further than it has been started already.
        """
        chunk = self.chunk_size
        last_chunk = (end - 1) // chunk
        if abs(offset - stream.next_offset) <= chunk:
            if last_chunk > stream.last_chunk:
                stream.window = min(max(1, stream.window * 2), self.max_chunks)
            stream.next_offset = max(stream.next_offset, end)
        else:
            stream.window = 0
            stream.next_offset = end
            stream.ahead = 0
        stream.last_chunk = max(stream.last_chunk, last_chunk) if stream.window else last_chunk
        first, demand = offset // self.block_size, (end - 1) // self.block_size + 1
        ahead = 0
        if self.caching and stream.window and not all_present:
            per_chunk = chunk // self.block_size
            ahead = min(-(-size // self.block_size), (last_chunk + 1 + stream.window) * per_chunk)
        if hit:
            if ahead <= stream.ahead:
                return None
            return Plan(max(demand, stream.ahead), demand, ahead, True)
        around = range(0) if not self.caching or all_present else self.fetch_unit(first, demand, size)
        if ahead and len(around) < -(-size // self.block_size):  # the read-ahead goes further than a unit
            around = range(0)
        if ahead and self.link.bytes_per_round_trip():
            # A long RTT: the read waits for its own blocks only, not for the rest of the chunk
            # (4 MiB took 2-4 round trips more at 20 ms); the read-ahead runs beside it.
            return Plan(first, demand, demand, True, around or range(demand, ahead), self.piece())
        return Plan(first, demand, max(ahead, demand), ahead > 0, around, self.piece() if around else 0)

    def piece(self) -> int:
        """Blocks per flight beside a read: one round trip's worth, at least one, at most a chunk."""
        blocks = int(self.link.bytes_per_round_trip() // self.block_size)
        return max(1, min(blocks, self.chunk_size // self.block_size))

    def fetch_unit(self, first: int, demand: int, size: int) -> range:
        """The blocks a random miss of blocks [first, demand) should fetch beside its own.

        One round trip's worth of bytes, aligned, within the read's chunk
        (``Link.bytes_per_round_trip``; nothing more where that is at most a
        block), or the whole file where moving it takes at most
        ``WHOLE_FILE_ROUND_TRIPS`` round trips and no more than the read-ahead
        cap: on a long RTT, bandwidth is cheap and every later miss costs a
        round trip.
        """
        per_trip = self.link.bytes_per_round_trip()
        blocks = -(-size // self.block_size)
        if size <= min(WHOLE_FILE_ROUND_TRIPS * per_trip, self.max_chunks * self.chunk_size):
            return range(blocks)
        unit = min(int(per_trip // self.block_size), self.chunk_size // self.block_size)
        if unit <= 1:
            return range(0)
        start = first - first % unit
        return range(start, min(blocks, max(start + unit, demand)))

    @staticmethod
    def started(stream: Stream, plan: Plan, reached: int) -> None:
        """The fetcher started ``plan``'s flights up to block ``reached`` (it may stop early: budget)."""
        stream.ahead = max(stream.ahead, reached) if plan.speculative else 0

    def on_open(self, size: int, *, all_present: bool) -> Plan | None:
        """A small file is fetched whole when it is opened, before its first read arrives.

        One request for the whole file instead of one per block the reader
        touches, and the transfer overlaps the way from ``open`` to ``read``.
        """
        if all_present or size > WHOLE_FILE_MAX or not self.caching:
            return None
        blocks = -(-size // self.block_size)
        return Plan(0, blocks, blocks, False)

    def write_failed(self) -> bool:
        """A write to the cache failed: stop reading ahead. True if this is news (log it once)."""
        news, self.caching = self.caching, False
        return news

    def write_succeeded(self) -> bool:
        """A write to the cache worked: read ahead again. True if it had stopped."""
        news, self.caching = not self.caching, True
        return news



@dataclass(frozen=True, slots=True)
class WalkStep:
    """What an open means for its directory: files to fetch ahead, or stop (the walk broke)."""

    fetch: tuple[FileSpec, ...] = ()
    broken: bool = False


@dataclass(eq=False)
class _Walk:
    expected: set[str] = field(default_factory=set)  # paths an in-order next open may name
    queued: dict[str, int] = field(default_factory=dict)  # fetched ahead, not opened yet: path -> size
    handed: set[str] = field(default_factory=set)  # handed out for fetching in this pass: never again
    opened: set[str] = field(default_factory=set)  # opened in this pass


class DatasetWalk:
    """Recognises a walk through a directory's files and says which files to fetch ahead.

    ``opened(spec, following)`` is told every open with the files that follow
    it in listing order (the catalog knows them all, with sizes). An open is
    *in order* if it names one of the ``reorder`` files after any in-order
    open not yet opened itself, a file fetched ahead, or a file that such a
    file follows within ``reorder`` places: parallel readers of a sorted list
    (16 threads of a data loader) open files out of order by up to their
    number, each a little behind or ahead of the others. From the second
    in-order open on, the next files are fetched ahead while at most
    ``budget`` bytes and ``max_files`` files are fetched and not yet opened.
    Files larger than ``WHOLE_FILE_MAX`` end the look-ahead (sequential
    read-ahead serves them once open). A file already
    opened or handed out in the directory is never handed out again, even
    after the walk broke and started anew: its fetch is under way or done,
    and each hand-out costs the fetcher an open of the blob. Only opening a
    file a second time starts a new pass (a second ``tar``) that hands files
    out again.
    """

    def __init__(self, budget: int = 16 * 1024 * 1024, max_files: int = 32, reorder: int = 16) -> None:
        self.budget = budget
        self.max_files = max_files
        self.reorder = reorder
        self._walks: OrderedDict[tuple[str, str], _Walk] = OrderedDict()

    @staticmethod
    def key(spec: FileSpec) -> tuple[str, str]:
        """The directory a file belongs to: its dataset and parent path."""
        return spec.pid, spec.path.rpartition("/")[0]

    def opened(self, spec: FileSpec, following: Sequence[FileSpec]) -> WalkStep:
        key = self.key(spec)
        walk = self._walks.pop(key, None) or _Walk()
        self._remember(key, walk)
        nearby = {file.path for file in following[: self.reorder]}
        in_order = (
            spec.path in walk.expected
            or spec.path in walk.queued
            or not nearby.isdisjoint(walk.expected)  # a little behind an open before it
        )
        if spec.path in walk.opened:  # opened again: the directory is read anew
            walk.handed.clear()
            walk.opened.clear()
            in_order = False
        walk.opened.add(spec.path)
        walk.queued.pop(spec.path, None)
        if not in_order:
            broken = bool(walk.queued)
            walk.queued.clear()
            walk.expected = nearby
            return WalkStep(broken=broken)
        walk.expected |= nearby
        walk.expected -= walk.opened
        if len(walk.expected) > 4 * self.reorder:  # readers spread far apart: keep the newest
            walk.expected = nearby - walk.opened
        ahead = {file.path for file in following}
        walk.queued = {path: size for path, size in walk.queued.items() if path in ahead}
        outstanding = sum(walk.queued.values())
        fetch = []
        for file in following[: self.max_files]:
            if file.path in walk.handed or file.path in walk.opened:
                continue
            if file.size > WHOLE_FILE_MAX or outstanding + file.size > self.budget:
                break
            walk.queued[file.path] = file.size
            walk.handed.add(file.path)
            outstanding += file.size
            fetch.append(file)
        return WalkStep(tuple(fetch))

    def _remember(self, key: tuple[str, str], walk: _Walk) -> None:
        self._walks[key] = walk
        while len(self._walks) > 64:  # directories being walked at once, at most
            self._walks.popitem(last=False)
