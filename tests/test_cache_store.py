"""The blob store alone, on real files: chunk bookkeeping, crash safety, eviction, permissions."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scicatfs.cache.digest import RunningDigest
from scicatfs.cache.errors import CacheError, IntegrityError
from scicatfs.cache.store import BlobStore, BlockWrite, FileSpec, blob_key
from scicatfs.catalog.models import Checksum

CHUNK = 1024


def spec_for(data: bytes, pid: str = "pid/1", path: str = "a.bin", checksum: bool = True) -> FileSpec:
    digest = Checksum("md5", hashlib.md5(data).hexdigest()) if checksum else None
    return FileSpec(pid, path, f"sftp:///data/{pid}/{path}", f"/data/{pid}/{path}", len(data), 1_700_000_000.0, digest)


def fill(store: BlobStore, spec: FileSpec, data: bytes) -> None:
    blob = store.open_blob(spec)
    try:
        for index in range(blob.chunk_count):
            store.write_chunk(blob, index, data[index * CHUNK : (index + 1) * CHUNK])
        store.complete(blob, spec)
    finally:
        store.release_blob(blob)


@pytest.fixture
def store(tmp_path: Path):
    with BlobStore(tmp_path / "cache", budget=1 << 30, chunk_size=CHUNK) as store:
        yield store


def test_chunks_are_recorded_and_read_back(store: BlobStore) -> None:
    data = os.urandom(3 * CHUNK + 10)
    spec = spec_for(data)
    blob = store.open_blob(spec)
    assert blob.chunk_count == 4 and blob.present == set()
    store.write_chunk(blob, 1, data[CHUNK : 2 * CHUNK])
    store.write_chunk(blob, 3, data[3 * CHUNK :])
    assert blob.present == {1, 3}
    assert store.read(blob, CHUNK + 5, 100) == data[CHUNK + 5 : CHUNK + 105]
    assert store.read(blob, 3 * CHUNK, 10) == data[3 * CHUNK :]
    assert store.cached_bytes(spec) == CHUNK + 10
    with pytest.raises(ValueError, match="must be 10 bytes"):
        store.write_chunk(blob, 3, data[3 * CHUNK :] + b"x")
    store.release_blob(blob)
    assert store.cached_bytes(spec) == CHUNK + 10
    [entry] = store.entries()
    assert (entry.pid, entry.path, entry.present_bytes, entry.complete) == (
        "pid/1", "a.bin", CHUNK + 10, False,
    )  # fmt: skip
    assert store.where("pid/1", "a.bin") == entry
    assert store.where("pid/1", "other") is None


def test_recorded_chunks_survive_reopen(tmp_path: Path) -> None:
    data = os.urandom(2 * CHUNK)
    spec = spec_for(data)
    with BlobStore(tmp_path, budget=1 << 20, chunk_size=CHUNK) as first:
        blob = first.open_blob(spec)
        first.write_chunk(blob, 0, data[:CHUNK])
        first.release_blob(blob)
    with BlobStore(tmp_path, budget=1 << 20, chunk_size=CHUNK) as second:
        blob = second.open_blob(spec)
        assert blob.present == {0}
        assert second.read(blob, 0, CHUNK) == data[:CHUNK]
        second.write_chunk(blob, 1, data[CHUNK:])
        second.complete(blob, spec)
        assert blob.complete
        second.release_blob(blob)
    with BlobStore(tmp_path, budget=1 << 20, chunk_size=CHUNK) as third:
        blob = third.open_blob(spec)
        assert blob.complete and third.read(blob, 0, 2 * CHUNK) == data
        third.release_blob(blob)


def test_blocks_within_a_chunk_are_recorded_one_by_one(tmp_path: Path) -> None:
    data = os.urandom(4 * CHUNK + 10)
    spec = spec_for(data, checksum=False)
    with BlobStore(tmp_path, budget=1 << 20, chunk_size=4 * CHUNK, block_size=CHUNK) as store:
        blob = store.open_blob(spec)
        assert (blob.chunk_count, blob.block_count, blob.blocks_per_chunk) == (2, 5, 4)
        store.write_blocks(blob, 2, data[2 * CHUNK : 3 * CHUNK])
        store.write_blocks(blob, 4, data[4 * CHUNK :])  # the short last block
        assert blob.present == {2, 4}
        assert store.cached_bytes(spec) == CHUNK + 10
        with pytest.raises(ValueError, match="not whole blocks"):
            store.write_blocks(blob, 0, data[: CHUNK + 1])
        store.release_blob(blob)
    with BlobStore(tmp_path, budget=1 << 20, chunk_size=4 * CHUNK, block_size=CHUNK) as store:
        blob = store.open_blob(spec)
        assert blob.present == {2, 4} and store.refresh_blocks(blob, 2, 1)
        assert not store.refresh_blocks(blob, 2, 2)
        assert store.read(blob, 2 * CHUNK, CHUNK) == data[2 * CHUNK : 3 * CHUNK]
        store.release_blob(blob)


def set_format(cache: Path, version: int) -> None:
    db = sqlite3.connect(cache / "index.sqlite3")
    try:
        db.execute(f"PRAGMA user_version = {version}")
    finally:
        db.close()


def test_a_format_1_index_forgets_its_chunks(tmp_path: Path) -> None:
    """Format 1 rows counted whole chunks; read as blocks they would vouch for holes."""
    data = os.urandom(2 * CHUNK)
    spec = spec_for(data)
    with BlobStore(tmp_path, budget=1 << 20, chunk_size=CHUNK) as store:
        fill(store, spec, data)
    set_format(tmp_path, 1)
    with BlobStore(tmp_path, budget=1 << 20, chunk_size=CHUNK) as store:
        blob = store.open_blob(spec)
        assert blob.present == set() and not blob.complete and store.usage() == 0
        store.release_blob(blob)
    set_format(tmp_path, 99)
    with pytest.raises(CacheError, match="has format 99"):
        BlobStore(tmp_path, budget=1 << 20)


def test_running_digest_hashes_the_recorded_prefix_only(store: BlobStore) -> None:
    data = os.urandom(4 * CHUNK + 10)
    spec = spec_for(data)
    blob = store.open_blob(spec)
    running = RunningDigest("md5")
    store.write_chunk(blob, 1, data[CHUNK : 2 * CHUNK])
    running.advance(store, blob)
    assert running.position == 0  # block 0 is missing: nothing contiguous to hash
    store.write_chunk(blob, 0, data[:CHUNK])
    store.write_chunk(blob, 3, data[3 * CHUNK : 4 * CHUNK])
    running.advance(store, blob)
    assert running.position == 2 * CHUNK  # up to the gap at block 2
    store.write_chunk(blob, 2, data[2 * CHUNK : 3 * CHUNK])
    store.write_chunk(blob, 4, data[4 * CHUNK :])
    digest = running.finish(store, blob)
    assert digest == hashlib.md5(data).hexdigest()
    store.complete(blob, spec, digest)
    assert blob.complete
    store.release_blob(blob)


def test_a_wrong_running_digest_is_a_mismatch(store: BlobStore) -> None:
    data = os.urandom(CHUNK)
    spec = spec_for(data)
    blob = store.open_blob(spec)
    store.write_chunk(blob, 0, data)
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        store.complete(blob, spec, "0" * 32)
    assert blob.present == set() and not blob.complete
    store.release_blob(blob)


def test_torn_write_is_not_trusted(tmp_path: Path) -> None:
    """Bytes on disk without an index row (a crash before the commit) count for nothing."""
    data = os.urandom(2 * CHUNK)
    spec = spec_for(data)
    with BlobStore(tmp_path, budget=1 << 20, chunk_size=CHUNK) as store:
        blob = store.open_blob(spec)
        os.pwrite(blob.fd, b"\xff" * CHUNK, CHUNK)  # written, never recorded
        store.write_chunk(blob, 0, data[:CHUNK])
        store.release_blob(blob)
    with BlobStore(tmp_path, budget=1 << 20, chunk_size=CHUNK) as store:
        blob = store.open_blob(spec)
        assert blob.present == {0}
        assert store.cached_bytes(spec) == CHUNK
        store.write_chunk(blob, 1, data[CHUNK:])
        store.complete(blob, spec)
        assert store.read(blob, 0, 2 * CHUNK) == data
        store.release_blob(blob)


def test_rows_without_their_file_are_dropped(tmp_path: Path) -> None:
    data = os.urandom(CHUNK)
    spec = spec_for(data)
    with BlobStore(tmp_path, budget=1 << 20, chunk_size=CHUNK) as store:
        fill(store, spec, data)
        store.blob_file(blob_key(spec)).unlink()  # removed behind the cache's back
        blob = store.open_blob(spec)
        assert blob.present == set() and not blob.complete
        store.release_blob(blob)


def test_checksum_mismatch_discards_the_blob(store: BlobStore) -> None:
    data = os.urandom(2 * CHUNK)
    spec = spec_for(data)
    blob = store.open_blob(spec)
    store.write_chunk(blob, 0, data[:CHUNK])
    store.write_chunk(blob, 1, bytes(CHUNK))  # what a corrupt server would send
    with pytest.raises(IntegrityError) as caught:
        store.complete(blob, spec)
    message = str(caught.value)
    assert "pid/1" in message and "a.bin" in message
    assert f"md5:{hashlib.md5(data).hexdigest()}" in message
    assert hashlib.md5(data[:CHUNK] + bytes(CHUNK)).hexdigest() in message
    assert blob.error is caught.value
    assert not blob.complete and blob.present == set()
    assert store.cached_bytes(spec) == 0
    assert os.fstat(blob.fd).st_size == 0
    store.release_blob(blob)
    assert not store.entries()[0].complete


def test_blob_without_checksum_is_complete_when_all_chunks_are_present(store: BlobStore) -> None:
    data = os.urandom(CHUNK + 1)
    spec = spec_for(data, checksum=False)
    fill(store, spec, data)
    assert store.entries()[0].complete


@pytest.mark.allow_log(r"WARNING scicatfs\.cache\.store: cannot verify pid/1 a\.bin: unknown algorithm 'sha2'")
def test_unknown_checksum_algorithm_is_not_verified(
    store: BlobStore, caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(CHUNK)
    spec = dataclasses.replace(spec_for(data), checksum=Checksum("sha2", "00"))
    fill(store, spec, data)
    assert store.entries()[0].complete
    assert "unknown algorithm 'sha2'" in caplog.text


def test_identical_checksums_share_one_blob_and_identity_keys_track_versions(
    store: BlobStore,
) -> None:
    data = os.urandom(CHUNK)
    one, two = spec_for(data, pid="p/1"), spec_for(data, pid="p/2", path="copy.bin")
    fill(store, one, data)
    assert store.cached_bytes(two) == CHUNK
    assert blob_key(one) == blob_key(two)
    plain = spec_for(data, checksum=False)
    touched = dataclasses.replace(plain, mtime=1.0)
    assert blob_key(plain) != blob_key(touched) != blob_key(one)


def test_eviction_is_lru_and_skips_open_blobs(tmp_path: Path) -> None:
    blobs = [os.urandom(2 * CHUNK) for _ in range(4)]
    specs = [spec_for(data, path=f"f{i}") for i, data in enumerate(blobs)]
    with BlobStore(tmp_path, budget=5 * CHUNK, chunk_size=CHUNK) as store:
        pinned = store.open_blob(specs[0])  # oldest, but open: must survive
        for index in range(2):
            store.write_chunk(pinned, index, blobs[0][index * CHUNK : (index + 1) * CHUNK])
        for spec, data in zip(specs[1:], blobs[1:], strict=True):
            fill(store, spec, data)
        assert store.usage() == 8 * CHUNK
        freed = store.evict().freed
        assert freed == 4 * CHUNK and store.usage() == 4 * CHUNK
        remaining = {entry.path for entry in store.entries()}
        assert remaining == {"f0", "f3"}  # f1 and f2 were least recently used
        assert not store.blob_file(blob_key(specs[1])).exists()
        assert store.read(pinned, 0, 2 * CHUNK) == blobs[0]
        store.release_blob(pinned)
        assert store.evict(0).freed == 4 * CHUNK and store.entries() == []


def test_eviction_skips_blobs_open_in_another_process(tmp_path: Path) -> None:
    data = os.urandom(CHUNK)
    spec = spec_for(data)
    with BlobStore(tmp_path, budget=0, chunk_size=CHUNK) as store:
        fill(store, spec, data)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from pathlib import Path
            from scicatfs.cache.store import BlobStore, FileSpec
            from scicatfs.catalog.models import Checksum
            spec = FileSpec(*{[spec.pid, spec.path, spec.source, spec.remote_path, spec.size,
                               spec.mtime]!r}, Checksum(*{[spec.checksum.algorithm,
                               spec.checksum.hexdigest]!r}))
            store = BlobStore(Path({str(tmp_path)!r}), budget=0, chunk_size={CHUNK})
            blob = store.open_blob(spec)
            print("open", flush=True)
            sys.stdin.readline()
            store.release_blob(blob)
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "open\n"
        with BlobStore(tmp_path, budget=0, chunk_size=CHUNK) as store:
            assert store.evict().freed == 0
            assert store.cached_bytes(spec) == CHUNK
            holder.communicate("\n", timeout=10)
            assert store.evict().freed == CHUNK
    finally:
        holder.kill()
        holder.wait()


def test_permissions_ignore_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with BlobStore(tmp_path / "cache", budget=1 << 20, chunk_size=CHUNK) as store:
            data = os.urandom(10)
            fill(store, spec_for(data), data)
            blob_file = store.blob_file(blob_key(spec_for(data)))
            modes = {
                path: stat.S_IMODE(path.stat().st_mode)
                for path in [store.directory, blob_file.parent, blob_file]
                + list(store.directory.glob("index.sqlite3*"))
            }
    finally:
        os.umask(old)
    assert modes[tmp_path / "cache"] == 0o700
    assert modes[blob_file.parent] == 0o700
    assert modes[blob_file] == 0o600
    assert modes[tmp_path / "cache" / "index.sqlite3"] == 0o600


def test_verify_finds_tampered_blobs(store: BlobStore) -> None:
    data = os.urandom(CHUNK)
    spec = spec_for(data)
    fill(store, spec, data)
    assert store.verify() == []
    with open(store.blob_file(blob_key(spec)), "r+b") as tamper:
        tamper.write(b"X")
    [problem] = store.verify()
    assert hashlib.md5(data).hexdigest() in str(problem) and not problem.in_use
    assert store.cached_bytes(spec) == 0 and not store.entries()[0].complete


def test_bad_configuration_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(CacheError, match="not a directory"):
        BlobStore(tmp_path / "file", budget=1)
    with pytest.raises(ValueError, match="budget"):
        BlobStore(tmp_path / "c", budget=-1)
    with pytest.raises(ValueError, match="chunk and block size"):
        BlobStore(tmp_path / "c", budget=1, chunk_size=0)
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        BlobStore(tmp_path / "c", budget=1, chunk_size=3 * 1024, block_size=2 * 1024)


def count_commits(store: BlobStore) -> list[str]:
    """Every statement that ends a write transaction on the store's own connection, from now on."""
    commits: list[str] = []
    store._db.set_trace_callback(lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None)
    return commits


def test_whole_small_files_written_together_are_recorded_and_completed_in_one_transaction(tmp_path: Path) -> None:
    """A batch of small files fetched whole: one sync each, then one transaction for all their
    rows and their completeness (no transaction per file to complete it)."""
    datas = [os.urandom(CHUNK // 2 + number) for number in range(8)]
    specs = [spec_for(data, path=f"f{number}.bin") for number, data in enumerate(datas)]
    with BlobStore(tmp_path, budget=1 << 20, chunk_size=CHUNK) as store:
        blobs = [store.open_blob(spec) for spec in specs]
        commits = count_commits(store)
        writes = [BlockWrite(blob, 0, data, whole=spec) for blob, data, spec in zip(blobs, datas, specs, strict=True)]
        store.write_many(writes)
        assert [write.error for write in writes] == [None] * 8
        assert len(commits) == 1 and store.stats == {"syncs": 8, "commits": 1}
        assert all(blob.complete for blob in blobs)
        for blob in blobs:
            store.release_blob(blob)
        assert len(commits) == 1  # releases write nothing themselves
    with BlobStore(tmp_path, budget=1 << 20, chunk_size=CHUNK) as store:
        assert [entry.complete for entry in store.entries()] == [True] * 8
        assert [store.cached_bytes(spec) for spec in specs] == [len(data) for data in datas]


def test_a_whole_file_that_fails_its_checksum_is_recorded_and_never_written(tmp_path: Path) -> None:
    data = os.urandom(CHUNK // 2)
    spec = spec_for(data)
    with BlobStore(tmp_path, budget=1 << 20, chunk_size=CHUNK) as store:
        blob = store.open_blob(spec)
        good = BlockWrite(blob, 0, data, whole=spec)
        with pytest.raises(IntegrityError, match="checksum mismatch"):
            store.write_blocks(blob, 0, bytes(reversed(data)), whole=spec)
        assert blob.error is not None and not blob.complete and blob.present == set()
        assert os.fstat(blob.fd).st_size == 0 and store.usage() == 0
        assert store.failures_since(0)[0].key == blob.key
        store.write_many([good])  # the next, verified fetch clears the failure with its rows
        assert good.error is None and blob.complete and blob.error is None and store.failures_since(0) == []
        store.release_blob(blob)


def test_a_release_writes_its_access_time_with_the_next_transaction(tmp_path: Path) -> None:
    """The last release closes the blob without a transaction of its own (the mount calls it on
    its event loop); the access time reaches the index with the next write, or at close."""
    first, second = (spec_for(os.urandom(100), path=name) for name in ("a.bin", "b.bin"))

    def atime(store: BlobStore, spec: FileSpec) -> float:
        return store._query("SELECT atime FROM blobs WHERE key = ?", (blob_key(spec),))[0][0]

    with BlobStore(tmp_path, budget=1 << 20, chunk_size=CHUNK) as store:
        store.release_blob(store.open_blob(first))
        opened_at = atime(store, first)
        commits = count_commits(store)
        store.release_blob(store.open_blob(first))  # open: one transaction; release: none
        assert len(commits) == 1
        assert atime(store, first) > opened_at
        touched = atime(store, first)
        store.release_blob(store.open_blob(second))  # its open's transaction carries first's release
        assert atime(store, first) > touched
        blob = store.open_blob(second)
        store.release_blob(blob)
        released = store._atimes[blob.key]
    with BlobStore(tmp_path, budget=1 << 20, chunk_size=CHUNK) as store:
        assert atime(store, second) == released  # written by close()


def test_writers_that_meet_share_one_sync_per_blob_and_one_transaction(tmp_path: Path, monkeypatch) -> None:
    """Group commit: runs written while a sync is under way are recorded together, each blob synced first."""
    import threading
    import time

    import scicatfs.cache.store as store_module

    datas = [os.urandom(2 * CHUNK) for _ in range(4)]
    specs = [spec_for(data, path=f"f{number}.bin", checksum=False) for number, data in enumerate(datas)]
    real_sync = os.fdatasync
    rows_seen: list[int] = []
    with BlobStore(tmp_path, budget=1 << 20, chunk_size=2 * CHUNK, block_size=CHUNK) as store:
        blobs = [store.open_blob(spec) for spec in specs]

        def slow_first_sync(fd: int) -> None:
            with sqlite3.connect(tmp_path / "index.sqlite3") as db:
                rows_seen.append(db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])
            if len(rows_seen) == 1:  # hold the first round until the other seven runs queue behind it
                deadline = time.monotonic() + 10
                while len(store._pending) < 7 and time.monotonic() < deadline:
                    time.sleep(0.005)
            real_sync(fd)

        monkeypatch.setattr(store_module.os, "fdatasync", slow_first_sync)
        first = threading.Thread(target=store.write_blocks, args=(blobs[0], 0, datas[0][:CHUNK]))
        first.start()
        while not rows_seen:
            time.sleep(0.001)
        others = [
            threading.Thread(target=store.write_blocks, args=(blob, index, data[index * CHUNK : (index + 1) * CHUNK]))
            for blob, data in zip(blobs, datas, strict=True)
            for index in (0, 1)
            if (blob, index) != (blobs[0], 0)
        ]
        for thread in others:
            thread.start()
        for thread in [first, *others]:
            thread.join(timeout=20)
        assert store.stats == {"syncs": 5, "commits": 2}  # one lone round, then 7 runs on 4 blobs
        assert rows_seen == [0, 1, 1, 1, 1]  # every sync came before the rows of its round
        for blob, data in zip(blobs, datas, strict=True):
            assert blob.present == {0, 1} and store.read(blob, 0, 2 * CHUNK) == data
            store.release_blob(blob)
    with BlobStore(tmp_path, budget=1 << 20, chunk_size=2 * CHUNK, block_size=CHUNK) as store:
        assert [store.cached_bytes(spec) for spec in specs] == [2 * CHUNK] * 4
