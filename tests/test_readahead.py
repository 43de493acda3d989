"""The read-ahead policy on its own: access patterns in, block ranges out (no server, no cache)."""

from __future__ import annotations

import pytest

from scicatfs.cache.readahead import Plan, ReadAhead, Stream

KiB = 1024
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


def test_a_chunk_that_is_not_a_multiple_of_the_block_is_refused() -> None:
    with pytest.raises(ValueError, match="multiple"):
        ReadAhead(BLOCK, BLOCK * 3 + 1, CHUNK)
