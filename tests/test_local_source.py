"""``file://`` sources: a local directory read in place, verified like remote files, never copied.

The fetcher runs over a real cache directory and the real local transfer (no
sshd anywhere in this module); the mount tests run a real FUSE mount with
``--source /=file://DIR`` and no SFTP option at all.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from scicatfs.cache.errors import IntegrityError
from scicatfs.cache.fetcher import Fetcher
from scicatfs.cache.local import LocalBlob, version_of
from scicatfs.cache.store import BlobStore, FileSpec
from scicatfs.catalog.models import Checksum
from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.server import CatalogServer
from scicatfs.transfer.base import source_url
from scicatfs.transfer.dispatch import Dispatcher
from scicatfs.transfer.errors import RemoteFileNotFound
from scicatfs.transfer.local import LocalTransfer
from tests.support.mounts import Mount, start_mount

T = TypeVar("T")
KiB, MiB, GiB = 1024, 1024**2, 1024**3
BIG = "local/one-gib"


def run(cache: Path, body: Callable[[Fetcher], Awaitable[T]]) -> T:
    async def main() -> T:
        with BlobStore(cache, 1 << 30) as store:
            async with Dispatcher({"file": LocalTransfer()}) as transfer, Fetcher(store, transfer) as fetcher:
                return await body(fetcher)

    return trio.run(main)


def local_file(directory: Path, name: str, data: bytes, *, checksum: str | None = "right") -> FileSpec:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    digest = {"right": hashlib.md5(data).hexdigest(), "wrong": "0" * 32, None: None}[checksum]
    return FileSpec("10.1/local", name, source_url("file", "", str(path)), str(path), len(data), 0.0,
                    None if digest is None else Checksum("md5", digest))  # fmt: skip


async def read_through(fetcher: Fetcher, spec: FileSpec, step: int = 64 * KiB) -> bytes:
    handle = await fetcher.open(spec)
    try:
        return b"".join([await fetcher.read(handle, offset, step) for offset in range(0, spec.size, step)])
    finally:
        await fetcher.release(handle)


def blob_files(cache: Path) -> list[Path]:
    return [path for path in (cache / "blobs").rglob("*") if path.is_file()]


def test_reads_are_exact_and_nothing_is_copied(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(3 * MiB + 5)
    spec = local_file(tmp_path / "src", "a b%#.bin", data)

    async def body(fetcher: Fetcher) -> None:
        assert await read_through(fetcher, spec) == data
        handle = await fetcher.open(spec)
        rng = random.Random(2)
        for _ in range(50):
            offset, size = rng.randrange(spec.size), rng.randrange(1, 300 * KiB)
            assert await fetcher.read(handle, offset, size) == data[offset : offset + size]
        assert await fetcher.read(handle, spec.size, 10) == b""
        await fetcher.release(handle)
        assert fetcher.cached_bytes(spec) == spec.size  # readable without any network
        assert fetcher.store.usage() == 0 and fetcher.stats["chunks_fetched"] == 0
        assert fetcher.transfer.sources["file://"]["bytes_read"] >= 2 * len(data)

    run(tmp_path / "cache", body)
    assert blob_files(tmp_path / "cache") == []


@pytest.mark.allow_log(r"checksum mismatch for 10\.1/local bad\.bin")
def test_wrong_checksum_is_eio_at_the_end_of_the_file(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(MiB)
    spec = local_file(tmp_path / "src", "bad.bin", data, checksum="wrong")

    async def body(fetcher: Fetcher) -> None:
        handle = await fetcher.open(spec)
        try:  # hashing started at open: once the mismatch is known no byte is served
            assert await fetcher.read(handle, 0, 10) == data[:10]
        except IntegrityError:
            pass
        with pytest.raises(IntegrityError, match="checksum mismatch"):  # the end waits for the hash
            await fetcher.read(handle, spec.size - 10, 10)
        with pytest.raises(IntegrityError):  # and stays bad while open
            await fetcher.read(handle, 0, 10)
        await fetcher.release(handle)
        with pytest.raises(IntegrityError):
            await fetcher.prefetch(spec)
        with trio.fail_after(5):  # counted once the background hash's task resumes
            while fetcher.stats["integrity_errors"] < 1:
                await trio.sleep(0.01)

    run(tmp_path / "cache", body)
    assert (tmp_path / "src" / "bad.bin").read_bytes() == data  # nothing of the source is touched


@pytest.mark.allow_log(r"checksum mismatch for 10\.1/local bad\.bin")
def test_a_failed_local_version_is_recorded_and_not_hashed_again(tmp_path: Path) -> None:
    data = random.Random(5).randbytes(MiB)
    spec = local_file(tmp_path / "src", "bad.bin", data, checksum="wrong")
    cache = tmp_path / "cache"

    async def fail(fetcher: Fetcher) -> None:
        with pytest.raises(IntegrityError, match="checksum mismatch"):
            await read_through(fetcher, spec)

    async def open_again(fetcher: Fetcher) -> list[str]:
        with pytest.raises(IntegrityError, match="checksum mismatch"):  # at open: no byte, no hash
            await fetcher.open(spec)
        return [failure.path for failure in fetcher.store.failures_since(0)]

    run(cache, fail)
    assert run(cache, open_again) == ["bad.bin"]  # a new process: the failure is in the index


def test_a_failed_local_version_is_hashed_again_after_its_retry_time(tmp_path: Path) -> None:
    data = random.Random(6).randbytes(MiB)
    spec = local_file(tmp_path / "src", "flaky.bin", data)
    cache = tmp_path / "cache"
    with BlobStore(cache, 1 << 30) as store:  # as if a flaky cluster filesystem had once returned bad bytes
        local = LocalTransfer().open_local(spec.source)
        blob = LocalBlob(spec, local, version_of(local.stat), store)
        store.record_failure(blob, spec, IntegrityError("checksum mismatch for 10.1/local flaky.bin"), 0.0)
        local.close()

    async def body(fetcher: Fetcher) -> bool:
        fetcher.retry_wait = 10.0
        assert await read_through(fetcher, spec) == data  # the open waited for the hash again
        return fetcher.store.failures_since(0) == []

    assert run(cache, body) is True


def test_size_other_than_the_catalogs_fails_the_open(tmp_path: Path) -> None:
    spec = local_file(tmp_path / "src", "short.bin", b"12345", checksum=None)
    longer = FileSpec(spec.pid, spec.path, spec.source, spec.remote_path, 6, 0.0, None)
    missing = FileSpec(spec.pid, "gone", spec.source + ".gone", spec.remote_path + ".gone", 1, 0.0, None)

    async def body(fetcher: Fetcher) -> None:
        with pytest.raises(IntegrityError, match="catalog says 6 bytes"):
            await fetcher.open(longer)
        with pytest.raises(RemoteFileNotFound, match="is the source folder mounted"):
            await fetcher.open(missing)
        assert fetcher.transfer.sources["file://"]["errors"] == 1
        assert await read_through(fetcher, spec) == b"12345"  # no checksum: the size is the check

    run(tmp_path / "cache", body)


def test_a_verified_version_is_hashed_once(tmp_path: Path) -> None:
    data = random.Random(4).randbytes(2 * MiB)
    spec = local_file(tmp_path / "src", "v.bin", data)

    async def verify(fetcher: Fetcher) -> None:
        await fetcher.prefetch(spec)

    async def is_verified_at_open(fetcher: Fetcher) -> bool:
        handle = await fetcher.open(spec)
        verified = handle.blob.complete
        await fetcher.release(handle)
        return verified

    cache = tmp_path / "cache"
    assert run(cache, is_verified_at_open) is False
    run(cache, verify)
    assert run(cache, is_verified_at_open) is True  # a new process: remembered in the index
    path = Path(spec.remote_path)
    os.utime(path, ns=(1, 1))  # a new version (mtime and ctime change), same bytes
    assert run(cache, is_verified_at_open) is False


# -- through a mount --------------------------------------------------------------------


@pytest.fixture
def local_mount(
    make_catalog_server: Callable[..., CatalogServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Mount]]:
    """Factory: the demo catalog (plus a 1 GiB sparse file) mounted with ``--source /=file://ROOT``."""
    mounts: list[Mount] = []
    root = tmp_path_factory.mktemp("local-source")
    catalog = Catalog.load_default()
    catalog.materialize(root)
    big = root / "local" / "one-gib" / "zeros.raw"
    big.parent.mkdir(parents=True)
    with open(big, "wb") as file:
        file.truncate(GiB)  # sparse: a gibibyte that takes no disk space
    zeros = hashlib.md5()
    block = bytes(MiB)
    for _ in range(1024):
        zeros.update(block)
    catalog.add_dataset(
        {"pid": BIG, "owner": "Ponder Stibbons", "ownerGroup": "uu", "contactEmail": "p.stibbons@uu.am",
         "creationLocation": "UnseenUniversity", "sourceFolder": "/local/one-gib",
         "creationTime": "2024-01-01T00:00:00.000Z"},
        [{"path": "zeros.raw", "size": GiB, "chk": zeros.hexdigest()}], chk_alg="md5",
    )  # fmt: skip

    def make(*args: str) -> Mount:
        server = make_catalog_server(catalog)
        work = tmp_path_factory.mktemp("mount")
        mount = start_mount(catalog, server, None, work, args=["--source", f"/=file://{root}", *args])
        mounts.append(mount)
        return mount

    try:
        yield make
    finally:
        for mount in mounts:
            mount.unmount()


def test_mount_without_sshd_reads_every_file_exactly(local_mount: Callable[..., Mount]) -> None:
    from tests.test_fs_mount import catalog_files, is_generated

    mount = local_mount("-o", "xattrs")
    assert "--sftp-host" not in mount.argv
    seen: dict[str, bytes] = {}
    for directory, _, files in os.walk(mount.path):
        for name in files:
            path = Path(directory) / name
            relative = str(path.relative_to(mount.path))
            if not is_generated(relative) and not relative.startswith(BIG):
                seen[relative] = path.read_bytes()
    expected = catalog_files(mount)
    assert sorted(seen) == sorted(expected)
    for relative, data in expected.items():
        assert seen[relative] == data, relative
    thaum = mount.dataset("20.500.12269/72fe3ff6-105b-4c7f-b9d0-073b67c90ec3")
    listing = json.loads((thaum / ".scicat" / "files.json").read_bytes())["files"]
    flux = next(entry for entry in listing if entry["path"] == "flux.dat")
    assert flux["source"].startswith("file:///") and flux["source"].endswith("/hex/ps/thaum/flux.dat")
    assert flux["cached"] == flux["size"]
    assert os.getxattr(thaum / "flux.dat", "user.scicat.source").decode() == flux["source"]
    status = json.loads((mount.path / ".scicat" / "status.json").read_bytes())
    # (files sharing one local file version are read once, the kernel's page cache serving the rest)
    assert status["sources"]["file://"]["bytes_read"] >= 0.99 * sum(len(data) for data in expected.values())
    assert status["sources"]["file://"]["errors"] == 0
    assert "sftp" not in json.dumps(status["sources"])


def test_the_mount_raises_its_read_ahead_to_one_mebibyte(local_mount: Callable[..., Mount]) -> None:
    """1 MiB requests instead of the kernel's 128 KiB; in place once the mount is ready (the fixture waits)."""
    for _ in range(3):
        mount = local_mount()
        device = os.stat(mount.path).st_dev
        assert Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb").read_text().strip() == "1024"
        mount.unmount()


def test_a_gibibyte_local_file_leaves_the_cache_small(local_mount: Callable[..., Mount]) -> None:
    mount = local_mount()
    path = mount.dataset(BIG) / "zeros.raw"
    read = 0
    with open(path, "rb", buffering=0) as file:
        while chunk := file.read(4 * MiB):
            assert not chunk.strip(b"\0"), f"non-zero bytes near offset {read}"
            read += len(chunk)
    assert read == GiB
    used = sum(p.stat().st_blocks * 512 for p in mount.cache_dir.rglob("*") if p.is_file())
    assert used < 4 * MiB, f"the cache holds {used} bytes after reading a local file"
    with BlobStore(mount.cache_dir, 1 << 30) as store:
        assert store.usage() == 0


@pytest.mark.allow_log(r"checksum mismatch for \S+ README\.txt")
@pytest.mark.allow_log(r"README\.txt.*\(EIO\)", optional=True)
def test_a_wrong_checksum_on_a_local_file_is_eio_through_the_mount(
    local_mount: Callable[..., Mount],
) -> None:
    mount = local_mount()
    # octarine's README.txt has an md5 in the catalog; corrupt the local copy, same size
    octarine = mount.dataset("20.500.12269/0b9a6b7e-3c61-4d8e-9f0e-5a1d2c3b4e5f")
    listing = json.loads((octarine / ".scicat" / "files.json").read_bytes())["files"]
    readme = next(entry for entry in listing if entry["path"] == "README.txt")
    assert readme["checksum"] is not None
    local = Path(readme["source"].removeprefix("file://"))
    original = local.read_bytes()
    local.write_bytes(bytes(len(original)))
    try:
        with pytest.raises(OSError) as raised:
            (octarine / "README.txt").read_bytes()
        assert raised.value.errno == errno.EIO
        assert "checksum mismatch" in mount.log_text()
        status = json.loads((mount.path / ".scicat" / "status.json").read_bytes())
        assert status["errors"]["cache"]["integrity_errors"] >= 1
    finally:
        local.write_bytes(original)


def test_prefetch_of_a_local_dataset_verifies_in_place(
    make_catalog_server: Callable[..., CatalogServer], tmp_path: Path
) -> None:
    """prefetch builds the mount's stack: local files are verified once, nothing is copied, no sshd."""
    catalog = Catalog.load_default()
    root = tmp_path / "local"
    catalog.materialize(root)
    server = make_catalog_server(catalog)
    password = tmp_path / "password"
    password.touch(mode=0o600)
    password.write_text(catalog.users["stibbons"].password + "\n")
    cache = tmp_path / "cache"
    octarine = "20.500.12269/0b9a6b7e-3c61-4d8e-9f0e-5a1d2c3b4e5f"
    argv = [
        sys.executable, "-m", "scicatfs", "prefetch", octarine, "--url", server.url,
        "--username", "stibbons", "--password-file", str(password),
        "--source", f"/=file://{root}", "--cache-dir", str(cache), "--cache-size", "1M",
    ]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert " cached, " in result.stderr and "Traceback" not in result.stderr
    assert blob_files(cache) == []
    readme = next(f for f in catalog.files(octarine) if f["path"] == "README.txt")
    local = root / catalog.dataset(octarine)["sourceFolder"].lstrip("/") / "README.txt"
    with BlobStore(cache, 1 << 20) as store:
        version = version_of(local.stat())
        assert store.local_verified(local, version, f"md5:{readme['chk']}")
        assert store.usage() == 0
