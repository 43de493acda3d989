"""Reads from an SFTP server that answers short (fewer bytes than asked, not at EOF).

The server is the demo's asyncssh SFTP server with every read answer cut to a
random non-empty prefix (tests/support/short_sftp.py). A short answer must be
followed by a request for the rest: taking it as end of file would end a read
early, leave a hole in a pipelined read, or fail a cached file as "shorter than
the catalog says".
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from scicatfs.cache.fetcher import Fetcher
from scicatfs.cache.store import BlobStore, FileSpec
from scicatfs.catalog.models import Checksum
from scicatfs.transfer.errors import TransferError
from scicatfs.transfer.base import source_url
from scicatfs.transfer.sftp import SFTPTransfer
from tests.support.short_sftp import ShortAnsweringServer

T = TypeVar("T")
KiB, MiB = 1024, 1024 * 1024
BIG = 64 * MiB
#: Reads of these lengths land inside one request, across a few, and across connections.
LENGTHS = (1, 4 * KiB, 255 * KiB + 1, 3 * MiB, 9 * MiB)
#: Whole seconds for one test body; a 64 MiB read here takes about 2 s unloaded.
BODY_DEADLINE = 90


def with_transfer(server: ShortAnsweringServer, body: Callable[[SFTPTransfer], Awaitable[T]]) -> T:
    async def main() -> T:
        with trio.fail_after(BODY_DEADLINE):
            async with SFTPTransfer(server.sftp_settings()) as transfer:
                return await body(transfer)

    return trio.run(main)


@pytest.fixture(scope="module")
def big_file() -> bytes:
    return os.urandom(BIG + 12345)


def random_ranges(size: int, count: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randrange(size), rng.choice(LENGTHS)) for _ in range(count)]


@pytest.mark.slow
def test_transfer_reads_exact_bytes_sequentially_and_at_random_offsets(
    short_sftp: ShortAnsweringServer, big_file: bytes
) -> None:
    path = short_sftp.put("big.bin", big_file)
    ranges = random_ranges(len(big_file), 40, seed=3)

    async def body(transfer: SFTPTransfer) -> tuple[bytes, bytes, list[bytes]]:
        chunks = [
            await transfer.read(source_url("sftp", "", path), offset, 4 * MiB)
            for offset in range(0, len(big_file), 4 * MiB)
        ]
        whole = await transfer.read(source_url("sftp", "", path), 0, len(big_file) + 1)  # split over connections
        return b"".join(chunks), whole, [await transfer.read(source_url("sftp", "", path), o, n) for o, n in ranges]

    sequential, whole, pieces = with_transfer(short_sftp, body)
    assert hashlib.sha256(sequential).digest() == hashlib.sha256(big_file).digest()
    assert hashlib.sha256(whole).digest() == hashlib.sha256(big_file).digest()
    for (offset, length), piece in zip(ranges, pieces, strict=True):
        assert piece == big_file[offset : offset + length], (offset, length)
    assert short_sftp.short_answers > 100  # the fault really was injected


def test_end_of_file_is_still_end_of_file(short_sftp: ShortAnsweringServer) -> None:
    data = random.Random(5).randbytes(600 * KiB)
    path = short_sftp.put("small.bin", data)

    async def body(transfer: SFTPTransfer) -> None:
        assert await transfer.read(source_url("sftp", "", path), 0, 10 * MiB) == data
        assert await transfer.read(source_url("sftp", "", path), 100, len(data)) == data[100:]
        assert await transfer.read(source_url("sftp", "", path), len(data) - 1, 2) == data[-1:]
        assert await transfer.read(source_url("sftp", "", path), len(data), 1) == b""
        assert await transfer.read(source_url("sftp", "", path), len(data) + 5000, 10 * MiB) == b""

    with_transfer(short_sftp, body)
    assert short_sftp.short_answers > 0


def test_an_answer_longer_than_asked_is_an_error(short_sftp: ShortAnsweringServer) -> None:
    path = short_sftp.put("small.bin", bytes(1000))
    short_sftp.fault.overlong = True

    async def body(transfer: SFTPTransfer) -> None:
        with pytest.raises(TransferError, match="/small.bin: the server answered 101 bytes for 100 asked"):
            await transfer.read(source_url("sftp", "", path), 0, 100)

    with_transfer(short_sftp, body)


@pytest.mark.slow
def test_fetcher_caches_and_verifies_exact_bytes(
    short_sftp: ShortAnsweringServer, big_file: bytes, tmp_path: Path
) -> None:
    path = short_sftp.put("big.bin", big_file)
    digest = Checksum("md5", hashlib.md5(big_file).hexdigest())
    spec = FileSpec("10.1/short", "big.bin", source_url("sftp", "", path), path, len(big_file), 1_700_000_000.0, digest)
    ranges = random_ranges(len(big_file), 40, seed=4)

    async def body(fetcher: Fetcher) -> tuple[list[bytes], bytes, dict[str, int]]:
        handle = await fetcher.open(spec)
        try:
            pieces = [await fetcher.read(handle, o, n) for o, n in ranges]  # cold, random
            whole = [await fetcher.read(handle, o, MiB) for o in range(0, spec.size, MiB)]
            assert await fetcher.read(handle, spec.size, MiB) == b""
        finally:
            await fetcher.release(handle)
        return pieces, b"".join(whole), dict(fetcher.stats)

    async def main() -> tuple[list[bytes], bytes, dict[str, int]]:
        with trio.fail_after(BODY_DEADLINE):
            with BlobStore(tmp_path / "cache", 1 << 40, 4 * MiB) as store:
                async with SFTPTransfer(short_sftp.sftp_settings()) as transfer:
                    async with Fetcher(store, transfer) as fetcher:
                        return await body(fetcher)

    pieces, whole, stats = trio.run(main)
    for (offset, length), piece in zip(ranges, pieces, strict=True):
        assert piece == big_file[offset : offset + length], (offset, length)
    assert hashlib.sha256(whole).digest() == hashlib.sha256(big_file).digest()
    assert stats["integrity_errors"] == 0
    assert short_sftp.short_answers > 100
