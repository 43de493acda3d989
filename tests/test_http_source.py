"""``https://``/``http://`` sources against a real nginx on 127.0.0.1.

Ranged reads (206), end of file and 416, a location that ignores ranges (200),
a server that is down, missing files, a bearer token, and a file that changes
between two reads: never mixed bytes.
"""

from __future__ import annotations

import errno
import json
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import httpcore._backends.trio
import pytest
import trio

from scicatfs.cache.errors import FetchTimeout
from scicatfs.cache.fetcher import Fetcher
from scicatfs.cache.store import BlobStore, FileSpec
from scicatfs.demo.fixtures import Catalog
from scicatfs.transfer.dispatch import Dispatcher
from scicatfs.transfer.errors import (
    ConnectionLost,
    RemoteFileNotFound,
    SourceChanged,
    TransferError,
)
from scicatfs.transfer.http import HTTPSettings, HTTPTransfer
from tests.support.mounts import Mount, start_mount
from tests.support.nginx import NginxServer

T = TypeVar("T")
KiB, MiB = 1024, 1024**2


def with_http(body: Callable[[HTTPTransfer], Awaitable[T]], token_file: Path | None = None) -> T:
    async def main() -> T:
        async with HTTPTransfer(HTTPSettings(timeout=5, connect_timeout=2, token_file=token_file)) as transfer:
            return await body(transfer)

    return trio.run(main)


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def test_ranged_reads_are_exact(make_nginx: Callable[..., NginxServer]) -> None:
    nginx = make_nginx()
    data = payload(5 * MiB + 17)
    url = nginx.url + nginx.put("/d/a b#%.bin", data).replace(" ", "%20").replace("#", "%23").replace("%.", "%25.")

    async def body(transfer: HTTPTransfer) -> dict[str, int]:
        assert await transfer.size(url) == len(data)
        rng = random.Random(1)
        for _ in range(40):
            offset, length = rng.randrange(len(data)), rng.randrange(1, 2 * MiB)
            assert await transfer.read(url, offset, length) == data[offset : offset + length]
        assert await transfer.read(url, len(data) - 5, 100) == data[-5:]  # EOF comes first
        assert await transfer.read(url, len(data), 10) == b""  # 416
        assert await transfer.read(url, len(data) + 1000, 10) == b""
        assert await transfer.read(url, 3, 0) == b""
        return transfer.stats

    stats = with_http(body)
    assert stats["unranged"] == 0 and stats["errors"] == 0 and stats["version_changes"] == 0


def test_a_large_range_takes_few_socket_reads(
    make_nginx: Callable[..., NginxServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-piece cost of httpcore bounds a range's speed: pieces are up to 1 MiB, not 64 KiB."""
    nginx = make_nginx()
    data = payload(8 * MiB, seed=9)
    url = nginx.url + nginx.put("/big.bin", data)
    reads: list[int] = []
    receive = httpcore._backends.trio.TrioStream.read

    async def counted(stream: httpcore._backends.trio.TrioStream, max_bytes: int, timeout: float | None = None) -> bytes:
        piece = await receive(stream, max_bytes, timeout)
        reads.append(len(piece))
        return piece

    monkeypatch.setattr(httpcore._backends.trio.TrioStream, "read", counted)

    async def body(transfer: HTTPTransfer) -> None:
        await transfer.read(url, 0, 1)  # connected, the first answer's headers are behind us
        reads.clear()
        for _ in range(20):  # best of several: the sender may hand over small pieces when busy
            assert await transfer.read(url, 0, len(data)) == data
            if len(reads) <= len(data) // (128 * KiB):
                return
            reads.clear()
        pytest.fail(f"{len(reads)} socket reads for an 8 MiB range (at most {len(data) // (128 * KiB)} expected)")

    with_http(body)


@pytest.mark.allow_log(r"127\.0\.0\.1:\d+ ignores Range requests")
def test_a_server_that_ignores_ranges_is_sliced(
    make_nginx: Callable[..., NginxServer], caplog: pytest.LogCaptureFixture
) -> None:
    nginx = make_nginx()
    data = payload(3 * MiB, seed=2)
    url = nginx.url + "/norange" + nginx.put("/f.bin", data)

    async def body(transfer: HTTPTransfer) -> dict[str, int]:
        assert await transfer.read(url, 0, 10) == data[:10]  # first answer pins the version
        assert await transfer.read(url, MiB + 3, 1000) == data[MiB + 3 : MiB + 1003]
        assert await transfer.read(url, len(data) - 10, 100) == data[-10:]
        return transfer.stats

    stats = with_http(body)
    assert stats["unranged"] == 3 and stats["version_changes"] == 0
    assert sum("ignores Range requests" in record.message for record in caplog.records) == 1


def test_missing_down_and_refused(make_nginx: Callable[..., NginxServer], tmp_path: Path) -> None:
    nginx = make_nginx()
    nginx.put("/f.bin", b"secret bytes")
    token = tmp_path / "token"
    token.write_text(nginx.token + "\n")
    token.chmod(0o600)

    async def anonymous(transfer: HTTPTransfer) -> None:
        with pytest.raises(RemoteFileNotFound, match="HTTP 404"):
            await transfer.read(nginx.url + "/nothing.bin", 0, 10)
        with pytest.raises(TransferError, match="HTTP 403: access refused"):
            await transfer.read(nginx.url + "/private/f.bin", 0, 10)

    async def with_token(transfer: HTTPTransfer) -> bytes:
        return await transfer.read(nginx.url + "/private/f.bin", 0, 6)

    with_http(anonymous)
    assert with_http(with_token, token_file=token) == b"secret"
    token.chmod(0o644)
    with pytest.raises(TransferError, match="readable by other users"):
        with_http(with_token, token_file=token)
    url = nginx.url + "/f.bin"
    nginx.stop()

    async def down(transfer: HTTPTransfer) -> None:
        with pytest.raises(ConnectionLost):
            await transfer.read(url, 0, 10)

    with_http(down)


def write_version(path: Path, data: bytes, version: int) -> None:
    """Write ``data`` with mtime ``version``: nginx's ETag is mtime-size, so same-size versions differ only there."""
    path.write_bytes(data)
    os.utime(path, (1_700_000_000 + version, 1_700_000_000 + version))


def test_a_changed_file_is_an_error_never_mixed_bytes(make_nginx: Callable[..., NginxServer]) -> None:
    nginx = make_nginx()
    old, new = payload(2 * MiB, seed=3), payload(2 * MiB, seed=4)
    path = nginx.root / "v.bin"
    write_version(path, old, 0)
    url = nginx.url + "/v.bin"

    async def body(transfer: HTTPTransfer) -> None:
        assert await transfer.read(url, 0, 100) == old[:100]
        write_version(path, new, 100)
        with pytest.raises(SourceChanged, match="changed at its source"):
            await transfer.read(url, MiB, 100)  # If-Range: nginx sends the whole new file, 200
        assert await transfer.read(url, MiB, 100) == new[MiB : MiB + 100]  # the new version, pinned

    with_http(body)


@pytest.mark.allow_log(r"fetching p c\.bin failed \(attempt \d of 2\)")
def test_the_cache_drops_a_changed_file_and_fetches_the_new_version(
    make_nginx: Callable[..., NginxServer], tmp_path: Path
) -> None:
    nginx = make_nginx()
    old, new = payload(3 * MiB, seed=5), payload(3 * MiB, seed=6)
    path = nginx.root / "c.bin"
    write_version(path, old, 0)
    url = nginx.url + "/c.bin"
    spec = FileSpec("p", "c.bin", url, "/c.bin", len(old), 0.0, None)

    async def main() -> None:
        with BlobStore(tmp_path / "cache", 1 << 30, chunk_size=MiB) as store:
            web = HTTPTransfer(HTTPSettings(timeout=5, connect_timeout=2))
            async with Dispatcher({"http": web}) as transfer, Fetcher(store, transfer) as fetcher:
                handle = await fetcher.open(spec)
                assert await fetcher.read(handle, 0, 1000) == old[:1000]
                write_version(path, new, 100)
                with pytest.raises(SourceChanged):
                    await fetcher.read(handle, 2 * MiB + 5, 1000)
                assert await fetcher.read(handle, 0, 1000) == new[:1000]  # refetched, not the old block
                assert await fetcher.read(handle, 2 * MiB + 5, 1000) == new[2 * MiB + 5 : 2 * MiB + 1005]
                await fetcher.release(handle)
                assert transfer.sources[nginx.url]["errors"] == 1
                nginx.stop()
                handle = await fetcher.open(spec)
                with pytest.raises(FetchTimeout):  # ConnectionLost twice: the fetcher gives up in time
                    await fetcher.read(handle, MiB + 7, 10)
                await fetcher.release(handle)

    trio.run(main)


# -- through a mount ----------------------------------------------------------------


@pytest.mark.allow_log(r"fetching thaumometer-frames-0042 frame_big\.raw failed \(attempt \d of 2\)")
@pytest.mark.allow_log(r"path='frame_big\.raw'.*\(EIO\)")
def test_mount_reads_every_file_from_the_web_server(
    make_nginx: Callable[..., NginxServer], make_catalog_server, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    from tests.test_fs_mount import catalog_files, is_generated

    catalog = Catalog.load_default()
    nginx = make_nginx()
    catalog.materialize(nginx.root)
    server = make_catalog_server(catalog)
    (tmp_path / "work").mkdir()
    mount: Mount = start_mount(catalog, server, None, tmp_path / "work", args=["--source", f"/={nginx.url}/"])
    big = "thaumometer-frames-0042/frame_big.raw"  # read last: while the server is down, then after
    try:
        seen: dict[str, bytes] = {}
        for directory, _, files in os.walk(mount.path):
            for name in files:
                relative = str((Path(directory) / name).relative_to(mount.path))
                if not is_generated(relative) and relative != big:
                    seen[relative] = (Path(directory) / name).read_bytes()
        nginx.stop()
        with pytest.raises(OSError) as raised:
            (mount.path / big).read_bytes()
        assert raised.value.errno == errno.EIO
        nginx.start()  # the same port: the mount recovers
        seen[big] = (mount.path / big).read_bytes()
        expected = catalog_files(mount)
        assert sorted(seen) == sorted(expected)
        for relative, data in expected.items():
            assert seen[relative] == data, relative
        status = json.loads((mount.path / ".scicat" / "status.json").read_bytes())
        assert set(status["sources"]) == {nginx.url}
        assert status["sources"][nginx.url]["errors"] >= 1  # while it was down
        assert status["sources"][nginx.url]["bytes_read"] >= sum(len(data) for data in expected.values())
    finally:
        mount.unmount()
