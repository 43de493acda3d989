"""Crash ordering: a block's bytes are durable before the index row that vouches for them commits.

``kill -9`` keeps the page cache, so only a power-loss model can see this rule
break; tests/support/powerloss.py checks it at every commit of the index.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import trio

from scicatfs.cache.fetcher import Fetcher
from scicatfs.cache.store import BlobStore, FileSpec
from scicatfs.catalog.models import Checksum
from scicatfs.transfer.sftp import SFTPTransfer
from tests.support.powerloss import power_loss_model
from tests.support.sshd import OpenSSHServer

BLOCK = 1024
CHUNK = 4 * BLOCK


def spec_for(data: bytes, path: str) -> FileSpec:
    digest = Checksum("md5", hashlib.md5(data).hexdigest())
    return FileSpec("10.1/durable", path, f"sftp:///durable/{path}", f"/durable/{path}", len(data), 1_700_000_000.0, digest)


def test_blocks_and_chunks_are_synced_before_their_rows_commit(tmp_path: Path, monkeypatch) -> None:
    data = random.Random(1).randbytes(3 * CHUNK + 100)
    spec = spec_for(data, "direct.bin")
    with BlobStore(tmp_path / "cache", budget=1 << 30, chunk_size=CHUNK, block_size=BLOCK) as store:
        with power_loss_model(store, monkeypatch) as model:
            blob = store.open_blob(spec)
            store.write_blocks(blob, 5, data[5 * BLOCK : 7 * BLOCK])  # two blocks inside chunk 1
            store.write_chunk(blob, 0, data[:CHUNK])
            store.write_chunk(blob, 2, data[2 * CHUNK : 3 * CHUNK])
            store.write_chunk(blob, 3, data[3 * CHUNK :])  # the short last chunk
            store.write_blocks(blob, 4, data[4 * BLOCK : 5 * BLOCK])
            store.write_blocks(blob, 7, data[7 * BLOCK : 8 * BLOCK])
            store.complete(blob, spec)
            store.release_blob(blob)
        assert store.entries()[0].complete
    model.assert_held(min_rows=13)


def test_fetched_reads_and_prefetch_keep_the_order(sshd: OpenSSHServer, tmp_path: Path, monkeypatch) -> None:
    """The same rule on the fetcher's paths: single blocks, growing read-ahead, prefetch."""
    data = random.Random(2).randbytes(40 * CHUNK + 333)
    remote = sshd.put("/durable/fetched.bin", data)
    spec = FileSpec("10.1/durable", "fetched.bin", "sftp://" + remote, remote, len(data), 1_700_000_000.0,
                    Checksum("md5", hashlib.md5(data).hexdigest()))  # fmt: skip
    rng = random.Random(3)

    async def main() -> None:
        with BlobStore(tmp_path / "cache", 1 << 30, CHUNK, BLOCK) as store:
            with power_loss_model(store, monkeypatch) as model:
                async with SFTPTransfer(sshd.sftp_settings(timeout=5, connect_timeout=3)) as transfer:
                    async with Fetcher(store, transfer) as fetcher:
                        handle = await fetcher.open(spec)
                        try:
                            for _ in range(10):  # random small reads: one block each
                                offset = rng.randrange(len(data))
                                assert await fetcher.read(handle, offset, 100) == data[offset : offset + 100]
                            for offset in range(0, 20 * CHUNK, 64 * 1024):  # sequential: read-ahead
                                assert await fetcher.read(handle, offset, 64 * 1024) == data[offset : offset + 65536]
                        finally:
                            await fetcher.release(handle)
                        await fetcher.prefetch(spec)
                        assert fetcher.cached_bytes(spec) == len(data)
            model.assert_held(min_rows=-(-len(data) // BLOCK))

    trio.run(main)

