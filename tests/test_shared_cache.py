"""The shared cache tier on its own (real files) and behind the fetcher (real sshd, real SFTP transfer)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from scicatfs.cache.errors import IntegrityError
from scicatfs.cache.fetcher import Fetcher
from scicatfs.cache.shared import ANSWER_TIMEOUT, FORMAT_DIR, SharedCache, SharedTier, prune, shared_usage
from scicatfs.cache.store import BlobStore, FileSpec
from scicatfs.catalog.models import Checksum
from scicatfs.transfer.base import source_url
from scicatfs.transfer.sftp import SFTPTransfer
from tests.support.requirements import skip_or_fail
from tests.support.sshd import OpenSSHServer

T = TypeVar("T")
KiB, MiB = 1024, 1024 * 1024
CHUNK = 256 * KiB
BLOCK = 64 * KiB


def _tier(directory: Path, lease: float = 10.0) -> SharedTier:
    directory.mkdir(exist_ok=True)
    return SharedTier(directory, CHUNK, lease=lease)


# -- the tier's files --------------------------------------------------------------


def test_publish_is_atomic_group_readable_and_read_back_exactly(tmp_path: Path) -> None:
    os.umask(0o077)  # the modes must not depend on the umask
    try:
        tier = _tier(tmp_path / "shared")
        data = os.urandom(CHUNK)
        assert tier.publish("k", 0, data)
        path = tier.object_path("k", 0)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o2750
        assert tier.read("k", 0, CHUNK, 100, 1000) == data[100:1100]
        assert [entry.name for entry in path.parent.iterdir()] == ["0"], "no temporary file is left"
    finally:
        os.umask(0o022)


def test_temporary_files_and_wrong_sizes_are_never_taken_for_data(tmp_path: Path) -> None:
    tier = _tier(tmp_path / "shared")
    folder = tier.object_path("k", 0).parent
    folder.mkdir(parents=True)
    (folder / ".tmp-node-1-abc").write_bytes(os.urandom(CHUNK))  # a killed writer's leftover
    assert tier.read("k", 0, CHUNK, 0, CHUNK) is None
    tier.object_path("k", 0).write_bytes(os.urandom(CHUNK - 1))  # truncated: not trusted
    assert tier.read("k", 0, CHUNK, 0, 10) is None
    assert shared_usage(tier.directory) == CHUNK - 1


def test_a_fresh_marker_is_theirs_a_stale_one_is_replaced(tmp_path: Path) -> None:
    one, two = _tier(tmp_path / "shared", lease=5), _tier(tmp_path / "shared", lease=5)
    assert one.claim("k", 3) == "ours"
    assert two.being_fetched("k", 3) and not one.being_fetched("k", 3)
    assert two.claim("k", 3) == "theirs"
    marker = next(one.blob_dir("k").glob(".fetching-3"))
    os.utime(marker, (time.time() - 60, time.time() - 60))  # its writer died long ago
    assert not two.being_fetched("k", 3)
    assert two.claim("k", 3) == "ours"
    one.release("k", 3)  # not its marker any more: left alone
    assert marker.exists()
    two.release("k", 3)
    assert not marker.exists()


def test_prune_removes_least_recently_used_blobs_and_leftovers(tmp_path: Path) -> None:
    tier = _tier(tmp_path / "shared")
    now = time.time()
    for age, key in enumerate(("newest", "middle", "oldest")):
        for chunk in range(2):
            assert tier.publish(key, chunk, bytes(CHUNK))
            os.utime(tier.object_path(key, chunk), (now - age * 3 * 86400, now - age * 3 * 86400))
    # "oldest" was written first but read today: it counts as the most recently used.
    assert tier.read("oldest", 0, CHUNK, 0, 1) == b"\0"
    leftover = tier.blob_dir("middle") / ".tmp-dead-1-x"
    leftover.write_bytes(b"partial")
    os.utime(leftover, (now - 7200, now - 7200))
    result = prune(tier.directory, 4 * CHUNK)
    assert (result.removed_blobs, result.freed, result.used, result.leftovers) == (1, 2 * CHUNK, 4 * CHUNK, 1)
    assert not tier.object_path("middle", 0).exists() and not leftover.exists()
    assert tier.object_path("oldest", 1).exists() and tier.object_path("newest", 1).exists()
    assert prune(tier.directory, 0).used == 0
    assert shared_usage(tier.directory) == 0


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        SharedTier(tmp_path / "missing", CHUNK)


# -- behind the fetcher ---------------------------------------------------------------


def _run(
    server: OpenSSHServer, cache: Path, shared: Path, body: Callable[[Fetcher], Awaitable[T]]
) -> T:
    async def main() -> T:
        with BlobStore(cache, 1 << 40, CHUNK, BLOCK) as store:
            async with SharedCache(SharedTier(shared, CHUNK)) as tier, SFTPTransfer(
                server.sftp_settings(timeout=5, connect_timeout=3)
            ) as transfer, Fetcher(store, transfer, shared=tier) as fetcher:
                return await body(fetcher)

    return trio.run(main)


async def _read_all(fetcher: Fetcher, spec: FileSpec) -> bytes:
    handle = await fetcher.open(spec)
    try:
        parts, offset = [], 0
        while offset < spec.size:
            parts.append(await fetcher.read(handle, offset, 128 * KiB))
            offset += len(parts[-1])
        return b"".join(parts)
    finally:
        await fetcher.release(handle)


def _spec(sshd: OpenSSHServer, name: str, data: bytes, digest: bytes | None = None) -> FileSpec:
    path = sshd.put(f"/shared-tests/{name}", data)
    checksum = Checksum("md5", hashlib.md5(digest if digest is not None else data).hexdigest())
    return FileSpec("10.1/shared", name, source_url("sftp", "", path), path, len(data), 1_700_000_000.0, checksum)


def _published(sshd: OpenSSHServer, tmp_path: Path, name: str, data: bytes) -> tuple[FileSpec, Path, SharedTier, str]:
    """A file on the server, read once through a first fetcher so that its chunks are in a shared tier.

    Returns its spec, the shared directory, the tier and the file's blob key.
    """
    spec = _spec(sshd, name, data)
    shared = tmp_path / "shared"
    shared.mkdir()
    assert _run(sshd, tmp_path / "first", shared, lambda fetcher: _read_all(fetcher, spec)) == data
    return spec, shared, SharedTier(shared, CHUNK), f"md5:{hashlib.md5(data).hexdigest()}:{len(data)}"


def test_objects_that_vanish_or_shrink_fall_back_to_the_source(sshd: OpenSSHServer, tmp_path: Path) -> None:
    data = os.urandom(5 * CHUNK + 999)
    spec, shared, tier, key = _published(sshd, tmp_path, "vanish.bin", data)
    tier.object_path(key, 1).unlink()  # pruned
    with open(tier.object_path(key, 2), "r+b") as file:  # cut short by a failing disk
        file.truncate(CHUNK // 2)

    async def read_and_count(fetcher: Fetcher) -> tuple[bytes, dict[str, int]]:
        return await _read_all(fetcher, spec), dict(fetcher.tiers.bytes)

    read, counted = _run(sshd, tmp_path / "second", shared, read_and_count)
    assert read == data
    assert counted["source"] == 2 * CHUNK and counted["shared"] == len(data) - 2 * CHUNK


def test_wrong_bytes_in_the_shared_tier_fail_verification_and_are_removed(
    sshd: OpenSSHServer, tmp_path: Path
) -> None:
    data = os.urandom(3 * CHUNK)
    spec, shared, tier, key = _published(sshd, tmp_path, "corrupt.bin", data)
    tier.object_path(key, 1).write_bytes(os.urandom(CHUNK))  # same size, wrong bytes

    async def read_expecting_failure(fetcher: Fetcher) -> None:
        with pytest.raises(IntegrityError):
            await _read_all(fetcher, spec)
        with trio.fail_after(10):
            while any(tier.object_path(key, chunk).exists() for chunk in range(3)):
                await trio.sleep(0.05)

    _run(sshd, tmp_path / "second", shared, read_expecting_failure)
    assert not list((shared / FORMAT_DIR / "objects").rglob("[0-9]"))


@pytest.fixture
def hanging_shared(make_sshd, tmp_path: Path) -> Iterator[tuple[Path, OpenSSHServer]]:  # type: ignore[no-untyped-def]
    """A shared directory on sshfs over a test-owned sshd: SIGSTOP its connections and it hangs, as a dead NFS server's."""
    if shutil.which("sshfs") is None:
        skip_or_fail("sshfs is not installed")
    server: OpenSSHServer = make_sshd()
    (server.root / "shared").mkdir()
    mountpoint = tmp_path / "sshfs"
    mountpoint.mkdir()
    options = [option for option in server.ssh_options() if option != "-o" and not option.startswith("User=")]
    subprocess.run(
        ["sshfs", "root@127.0.0.1:/shared", str(mountpoint), "-o", ",".join(options)], check=True, timeout=30
    )
    try:
        yield mountpoint, server
    finally:
        server.signal_connections(signal.SIGCONT)
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], timeout=30)


def test_a_hung_shared_filesystem_falls_back_to_the_source_in_seconds(
    sshd: OpenSSHServer, hanging_shared: tuple[Path, OpenSSHServer], tmp_path: Path, caplog  # type: ignore[no-untyped-def]
) -> None:
    shared, shared_server = hanging_shared
    data = os.urandom(3 * CHUNK)
    spec = _spec(sshd, "hung.bin", data)
    assert _run(sshd, tmp_path / "first", shared, lambda fetcher: _read_all(fetcher, spec)) == data

    async def read_while_hung(fetcher: Fetcher) -> tuple[bytes, float, dict[str, int]]:
        shared_server.signal_connections(signal.SIGSTOP)
        started = time.monotonic()
        with trio.fail_after(60):
            read = await _read_all(fetcher, spec)
        return read, time.monotonic() - started, dict(fetcher.tiers.bytes)

    read, seconds, counted = _run(sshd, tmp_path / "second", shared, read_while_hung)
    assert read == data
    assert counted["source"] == len(data) and counted["shared"] == 0
    assert seconds < ANSWER_TIMEOUT + 10
    assert caplog.text.count("did not answer") == 1


def test_prune_command_needs_a_target_and_leaves_a_missing_tier_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from scicatfs.cli import main

    assert main(["cache", "prune", "--shared", str(tmp_path)]) == 1
    assert "needs --to SIZE" in capsys.readouterr().err
    assert main(["cache", "prune", "--shared", str(tmp_path), "--to", "lots"]) == 2
    assert "invalid size" in capsys.readouterr().err
    assert main(["cache", "prune", "--shared", str(tmp_path), "--to", "1G"]) == 0
    assert f"no shared cache in {tmp_path} yet" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    tier = _tier(tmp_path / "shared")
    assert tier.publish("k", 0, bytes(CHUNK))
    assert main(["cache", "prune", "--shared", str(tier.directory), "--to", "0"]) == 0
    assert "freed 256.0 KiB (1 blobs); the shared cache now holds 0 B" in capsys.readouterr().out
