"""The read-ahead policy on its own: access patterns in, block ranges out (no server, no cache)."""

from __future__ import annotations

import random

import pytest

from scicatfs.cache.readahead import (
    DEFAULT_THROUGHPUT,
    WHOLE_FILE_MAX,
    DatasetWalk,
    Link,
    Plan,
    ReadAhead,
    Stream,
    WalkStep,
)
from scicatfs.cache.store import FileSpec

KiB = 1024
MiB = 1024 * KiB
BLOCK = 128 * KiB
CHUNK = 4 * BLOCK  # 512 KiB: four blocks per chunk
PER_CHUNK = CHUNK // BLOCK
SIZE = 64 * CHUNK


def policy(readahead_max: int = 8 * CHUNK) -> ReadAhead:
    return ReadAhead(BLOCK, CHUNK, readahead_max)


def test_a_first_read_at_the_start_reads_ahead_one_chunk_beyond_its_own() -> None:
    stream = Stream()
    plan = policy().plan(stream, 0, 4 * KiB, SIZE, hit=False, all_present=False)
    assert plan == Plan(0, 1, 2 * PER_CHUNK, True)  # its block, the rest of chunk 0, chunk 1


def test_the_window_doubles_per_new_chunk_and_is_capped() -> None:
    readahead, stream = policy(), Stream()
    windows = []
    for offset in range(0, 6 * CHUNK, CHUNK // 2):
        readahead.plan(stream, offset, offset + CHUNK // 2, SIZE, hit=False, all_present=False)
        windows.append(stream.window)
    assert windows == [1, 1, 2, 2, 4, 4, 8, 8, 8, 8, 8, 8]


def test_a_seek_drops_the_window_and_fetches_only_the_blocks_read() -> None:
    readahead, stream = policy(), Stream()
    for offset in range(0, 3 * CHUNK, CHUNK):
        plan = readahead.plan(stream, offset, offset + CHUNK, SIZE, hit=False, all_present=False)
        assert plan is not None
        readahead.started(stream, plan, plan.stop)
    assert stream.window and stream.ahead
    plan = readahead.plan(stream, 40 * CHUNK, 40 * CHUNK + 10, SIZE, hit=False, all_present=False)
    assert plan == Plan(40 * PER_CHUNK, 40 * PER_CHUNK + 1, 40 * PER_CHUNK + 1, False)
    assert stream.window == 0
    readahead.started(stream, plan, plan.stop)
    assert stream.ahead == 0


def test_reordered_kernel_reads_within_a_chunk_still_count_as_sequential() -> None:
    readahead, stream = policy(), Stream()
    for offset in (0, 2 * BLOCK, BLOCK, 3 * BLOCK):  # the kernel's block 2 request overtook block 1
        plan = readahead.plan(stream, offset, offset + BLOCK, SIZE, hit=False, all_present=False)
        assert plan is not None and plan.speculative
        readahead.started(stream, plan, plan.stop)
    assert stream.window == 1 and stream.ahead == 2 * PER_CHUNK
    readahead.plan(stream, 10 * BLOCK, 11 * BLOCK, SIZE, hit=False, all_present=False)  # 6 blocks past the last read: a seek
    assert stream.window == 0


def test_a_cache_hit_plans_only_read_ahead_not_yet_started() -> None:
    readahead, stream = policy(), Stream()
    plan = readahead.plan(stream, 0, BLOCK, SIZE, hit=False, all_present=False)
    assert plan is not None
    readahead.started(stream, plan, plan.stop)
    # the next block is cached and within the same chunk: the window covers nothing new
    assert readahead.plan(stream, BLOCK, 2 * BLOCK, SIZE, hit=True, all_present=False) is None
    # a hit in the next chunk moves the window on, starting where the last one ended
    plan = readahead.plan(stream, CHUNK, CHUNK + BLOCK, SIZE, hit=True, all_present=False)
    assert plan == Plan(2 * PER_CHUNK, PER_CHUNK + 1, 4 * PER_CHUNK, True)


def test_the_fetcher_stopping_early_is_remembered_so_the_next_read_resumes_there() -> None:
    readahead, stream = policy(), Stream()
    plan = readahead.plan(stream, 0, BLOCK, SIZE, hit=False, all_present=False)
    assert plan is not None
    readahead.started(stream, plan, 3)  # the in-flight budget ran out at block 3
    assert stream.ahead == 3
    plan = readahead.plan(stream, BLOCK, 2 * BLOCK, SIZE, hit=True, all_present=False)
    assert plan == Plan(3, 2, 2 * PER_CHUNK, True)


def test_read_ahead_never_passes_the_end_of_the_file() -> None:
    size = 2 * CHUNK + 10
    blocks = -(-size // BLOCK)
    readahead, stream = policy(), Stream()
    for offset in range(0, size, CHUNK):
        plan = readahead.plan(stream, offset, min(size, offset + CHUNK), size, hit=False, all_present=False)
        assert plan is not None and plan.stop <= blocks


def test_nothing_is_read_ahead_while_writes_fail_and_again_once_they_work() -> None:
    readahead, stream = policy(), Stream()
    assert readahead.write_failed() is True
    assert readahead.write_failed() is False  # said once
    plan = readahead.plan(stream, 0, BLOCK, SIZE, hit=False, all_present=False)
    assert plan == Plan(0, 1, 1, False)
    assert readahead.write_succeeded() is True
    assert readahead.write_succeeded() is False
    plan = readahead.plan(stream, BLOCK, 2 * BLOCK, SIZE, hit=False, all_present=False)
    assert plan is not None and plan.speculative and plan.stop > 2


def test_a_file_already_all_cached_is_not_read_ahead() -> None:
    stream = Stream()
    assert policy().plan(stream, 0, BLOCK, SIZE, hit=True, all_present=True) is None


def _seek(readahead: ReadAhead, block: int, size: int = SIZE) -> Plan | None:
    """A random miss: a stream that has been elsewhere reads 4 KiB of ``block``."""
    stream = Stream(next_offset=size, last_chunk=size // CHUNK)
    return readahead.plan(stream, block * BLOCK, block * BLOCK + 4 * KiB, size, hit=False, all_present=False)


def test_the_link_takes_the_least_round_trip_and_the_most_throughput_of_recent_transfers() -> None:
    link = Link(samples=4)
    assert link.rtt is None and link.bytes_per_round_trip() == 0.0 and link.throughput == DEFAULT_THROUGHPUT
    link.observe(4 * MiB, 0.2)  # 20 MiB/s, round trip included
    link.observe(8 * MiB, 0.2)  # 40 MiB/s: the most wins
    assert link.throughput == 40 * MiB
    for seconds in (0.05, 0.021, 0.08):  # queued transfers only ever look slower
        link.observe(BLOCK, seconds + BLOCK / (40 * MiB))
    assert link.rtt == pytest.approx(0.021)
    assert link.bytes_per_round_trip() == pytest.approx(0.021 * 40 * MiB)
    for _ in range(4):  # the window moves on: an old minimum is forgotten
        link.observe(BLOCK, 0.03 + BLOCK / (40 * MiB))
    assert link.rtt == pytest.approx(0.03)


def test_a_random_miss_on_a_short_round_trip_fetches_only_its_own_blocks() -> None:
    readahead = policy()
    assert _seek(readahead, 41) == Plan(41, 42, 42, False)  # nothing measured yet
    readahead.link.observe(BLOCK, 0.001)  # loopback: a round trip is cheaper than the CPU of more bytes
    assert _seek(readahead, 41) == Plan(41, 42, 42, False)


def test_a_random_miss_on_a_long_round_trip_fetches_a_round_trips_worth_around_it() -> None:
    readahead = policy()
    readahead.link.observe(2 * MiB, 0.1)  # 20 MiB/s
    readahead.link.observe(BLOCK, 0.016 + BLOCK / (20 * MiB))  # 16 ms: 2.6 blocks per round trip
    assert _seek(readahead, 41) == Plan(41, 42, 42, False, range(40, 42), 2)  # two blocks, aligned
    readahead.link.observe(2 * MiB, 0.02)  # 100 MiB/s: more than a chunk per round trip
    assert _seek(readahead, 41) == Plan(41, 42, 42, False, range(40, 44), 4)  # the chunk, never beyond


def test_a_random_miss_on_a_long_round_trip_fetches_a_file_of_a_few_round_trips_whole() -> None:
    readahead = policy()
    readahead.link.observe(BLOCK, 0.02 + BLOCK / DEFAULT_THROUGHPUT)  # 20 ms at 64 MiB/s: 1.28 MiB
    size = 3 * MiB + 1  # under eight round trips' worth and the read-ahead cap (4 MiB here)
    assert _seek(readahead, 9, size) == Plan(9, 10, 10, False, range(25), 4)  # in flights of a chunk at most
    assert _seek(readahead, 9, 5 * MiB).around == range(8, 12)  # above the cap: a chunk
    readahead.write_failed()  # nothing beyond the read while the cache cannot keep it
    assert _seek(readahead, 9, size) == Plan(9, 10, 10, False)


def test_a_chunk_that_is_not_a_multiple_of_the_block_is_refused() -> None:
    with pytest.raises(ValueError, match="multiple"):
        ReadAhead(BLOCK, BLOCK * 3 + 1, CHUNK)


# -- small files and walks through a directory -----------------------------------


def test_a_small_file_is_fetched_whole_on_open_a_large_one_is_not() -> None:
    readahead = policy()
    assert readahead.on_open(3 * BLOCK + 1, all_present=False) == Plan(0, 4, 4, False)
    assert readahead.on_open(WHOLE_FILE_MAX + 1, all_present=False) is None
    assert readahead.on_open(BLOCK, all_present=True) is None
    readahead.write_failed()
    assert readahead.on_open(BLOCK, all_present=False) is None


def files(count: int, size: int = 64 * KiB, directory: str = "frames") -> list[FileSpec]:
    return [
        FileSpec("pid/1", f"{directory}/{number:04}.tif", f"sftp:///d/{number}", f"/d/{number}", size, 0.0, None)
        for number in range(count)
    ]


def test_a_walk_in_listing_order_fetches_the_next_files_within_the_budget() -> None:
    walk, listing = DatasetWalk(budget=10 * 64 * KiB, max_files=32), files(100)
    assert walk.opened(listing[0], listing[1:]) == WalkStep()  # one open is no pattern yet
    step = walk.opened(listing[1], listing[2:])
    assert [spec.path for spec in step.fetch] == [spec.path for spec in listing[2:12]]  # ten fit the budget
    assert walk.opened(listing[2], listing[3:]).fetch == (listing[12],)  # one opened, one more fits
    # parallel readers open slightly out of order: still the walk
    assert walk.opened(listing[5], listing[6:]).fetch == (listing[13], listing[14], listing[15])


def test_an_open_out_of_order_breaks_the_walk_and_fetches_nothing() -> None:
    walk, listing = DatasetWalk(), files(200)
    walk.opened(listing[0], listing[1:])
    assert walk.opened(listing[1], listing[2:]).fetch
    step = walk.opened(listing[150], listing[151:])
    assert step.broken and not step.fetch
    assert walk.opened(listing[10], listing[11:]) == WalkStep()  # not after 150: no walk either


def test_a_large_file_ends_the_look_ahead_and_directories_are_walked_apart() -> None:
    walk = DatasetWalk()
    small, other = files(3), files(5, directory="other")
    big = FileSpec("pid/1", "frames/big.h5", "sftp:///d/big", "/d/big", WHOLE_FILE_MAX + 1, 0.0, None)
    listing = [*small, big, *files(3, directory="frames2")]
    walk.opened(listing[0], listing[1:])
    walk.opened(other[0], other[1:])
    assert walk.opened(listing[1], listing[2:]).fetch == (listing[2],)  # stops before the big file
    assert walk.opened(other[1], other[2:]).fetch == tuple(other[2:])


def test_parallel_readers_out_of_order_keep_the_walk_and_get_each_file_handed_out_once() -> None:
    """16 threads over a sorted list: each open is up to 16 places off, some behind earlier ones."""
    walk, listing = DatasetWalk(), files(400)
    order = list(range(400))
    rng = random.Random(7)
    for start in range(0, 400, 16):  # each batch of 16 opens arrives shuffled
        batch = order[start : start + 16]
        rng.shuffle(batch)
        order[start : start + 16] = batch
    handed: list[str] = []
    broken = 0
    for number in order:
        step = walk.opened(listing[number], listing[number + 1 :])
        handed += [spec.path for spec in step.fetch]
        broken += step.broken
    assert broken == 0
    assert len(handed) == len(set(handed))  # never the same file twice
    assert len(handed) > 300  # nearly every file was fetched ahead of its open


def test_a_second_pass_over_the_directory_hands_files_out_again() -> None:
    walk, listing = DatasetWalk(budget=4 * 64 * KiB), files(20)
    for number in range(3):
        walk.opened(listing[number], listing[number + 1 :])
    walk.opened(listing[0], listing[1:])  # tar again: an opened file, out of order
    assert walk.opened(listing[1], listing[2:]).fetch == tuple(listing[2:6])


def test_a_first_read_on_a_long_round_trip_waits_for_its_own_block_and_gets_a_small_file_whole() -> None:
    readahead = policy()
    readahead.link.seed(0.02)  # the transfer's probe: 1.28 MiB per round trip at the assumed throughput
    plan = readahead.plan(Stream(), 0, 4 * KiB, 3 * MiB, hit=False, all_present=False)
    assert plan == Plan(0, 1, 1, True, range(24), 4)  # its block; the whole file beside it
    stream = Stream()
    plan = readahead.plan(stream, 0, 4 * KiB, SIZE, hit=False, all_present=False)
    assert plan == Plan(0, 1, 1, True, range(1, 2 * PER_CHUNK), 4)  # its block; the read-ahead beside it
    readahead.started(stream, plan, 1)
    plan = readahead.plan(stream, 4 * KiB, 8 * KiB, SIZE, hit=True, all_present=False)
    assert plan == Plan(1, 1, 2 * PER_CHUNK, True)  # a hit then records the read-ahead as started
    readahead.link.seed(0.001)  # on a short RTT the read's flight takes the rest of the chunk, as before
    assert readahead.plan(Stream(), 0, 4 * KiB, SIZE, hit=False, all_present=False) == Plan(0, 1, 2 * PER_CHUNK, True)


def test_flights_beside_a_read_are_a_round_trips_worth_each() -> None:
    readahead = ReadAhead(BLOCK, 32 * BLOCK, 64 * MiB)  # the mount's 128 KiB blocks, 4 MiB chunks
    assert readahead.piece() == 1  # nothing measured: a block
    readahead.link.seed(0.02)  # 20 ms at the assumed 64 MiB/s: 1.28 MiB per round trip
    assert readahead.piece() == 10
    readahead.link.observe(8 * MiB, 0.05)  # 160 MiB/s: 3.2 MiB per round trip
    assert readahead.piece() == 25
    readahead.link.observe(8 * MiB, 0.02)  # 400 MiB/s: more than a chunk per round trip
    assert readahead.piece() == 32


def test_transfers_sharing_the_link_count_for_its_throughput() -> None:
    link = Link()
    link.observe(2 * MiB, 0.1, sharing=4)  # four at once, each at a quarter of the link
    assert link.throughput == 80 * MiB
