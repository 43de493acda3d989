"""The status of a mount: counters from the real layers, the document, and ``scicatfs status``.

``collect_status`` is fed by a real catalog client (demo server, logged in),
a real SFTP transfer (OpenSSH sshd) and a real fetcher over a real cache
directory; each step of the test does something and checks that exactly the
counters that should move, moved.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

from scicatfs.cache.fetcher import Fetcher
from scicatfs.cache.store import BlobStore
from scicatfs.catalog.auth import Credentials, Secret
from scicatfs.catalog.client import CatalogClient, CatalogSettings
from scicatfs.catalog.errors import DatasetNotFound
from scicatfs.cli import main
from scicatfs.commands.status import render
from scicatfs.config import mount_options
from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.server import CatalogServer
from scicatfs.stack import FileSpecs
from scicatfs.status import collect_status, iso_time
from scicatfs.transfer.base import source_url
from scicatfs.transfer.dispatch import Dispatcher
from scicatfs.transfer.errors import RemoteFileNotFound
from scicatfs.transfer.sftp import SFTPSettings, SFTPTransfer
from tests.support.mounts import DEMO_USER, Mount
from tests.support.sshd import OpenSSHServer

FLUX = "20.500.12269/72fe3ff6-105b-4c7f-b9d0-073b67c90ec3"
SFTP_HOST = "127.0.0.1"  # where tests.support.sshd listens


def snapshots(
    server: CatalogServer, sshd: OpenSSHServer, catalog: Catalog, cache: Path
) -> list[dict[str, Any]]:
    """Status documents taken after each step of a small session with the real layers."""
    credentials = Credentials(
        username=DEMO_USER, password=Secret(catalog.users[DEMO_USER].password), source="test"
    )
    sftp = SFTPSettings(
        host=sshd.host, port=sshd.port, username=sshd.username, identity_files=(sshd.client_key,),
        known_hosts=sshd.known_hosts, ssh_config=Path(os.devnull), timeout=5, connect_timeout=3,
    )  # fmt: skip
    specs = FileSpecs(mount_options({"url": server.url, "mountpoint": "/mnt/scicat", "sftp_host": sshd.host}))
    started = time.time()
    taken: list[dict[str, Any]] = []

    async def session() -> None:
        async with (
            CatalogClient(CatalogSettings(server.url, credentials)) as catalog_client,
            Dispatcher({"sftp": SFTPTransfer(sftp)}) as transfer,
        ):
            with BlobStore(cache, 1 << 30) as store:
                async with Fetcher(store, transfer) as fetcher:

                    def take() -> None:
                        document = collect_status(
                            catalog=catalog_client, transfer=transfer, fetcher=fetcher,
                            mountpoint=Path("/mnt/scicat"), started=started,
                        )  # fmt: skip
                        taken.append(json.loads(json.dumps(document)))  # JSON-able, as served

                    take()  # 0: logged in, nothing else
                    dataset = await catalog_client.get_dataset(FLUX)
                    spec = specs(dataset, dataset.files[0])
                    await fetcher.prefetch(spec)
                    take()  # 1: one dataset, one chunk fetched
                    for datafile in dataset.files:  # flux.dat is cached, the log is not
                        handle = await fetcher.open(specs(dataset, datafile))
                        assert await fetcher.read(handle, 5, 10) == catalog.content(FLUX, datafile.path)[5:15]
                        await fetcher.release(handle)
                    take()  # 2: a cache hit and a miss
                    with pytest.raises(DatasetNotFound):
                        await catalog_client.get_dataset("no/such-pid")
                    handle = await fetcher.open(replace(spec, source=source_url("sftp", sshd.host, "/nowhere/at/all")))
                    with pytest.raises(RemoteFileNotFound):
                        await fetcher.read(handle, 0, 10)
                    await fetcher.release(handle)
                    take()  # 3: a missing dataset (not an error) and a missing remote file (an error)

    trio.run(session)
    return taken


@pytest.fixture
def taken(
    demo_sftp_files: OpenSSHServer,
    demo_catalog: Catalog,
    make_catalog_server: Callable[..., CatalogServer],
    tmp_path: Path,
) -> list[dict[str, Any]]:
    return snapshots(make_catalog_server(), demo_sftp_files, demo_catalog, tmp_path / "cache")


def test_counters_move_as_the_layers_work(taken: list[dict[str, Any]], tmp_path: Path) -> None:
    start, fetched, hit, failed = taken
    assert start["mountpoint"] == "/mnt/scicat" and start["process"] == os.getpid()
    assert start["catalog"]["logins"] == 1
    assert start["transfer"]["bytes_read"] == 0
    assert start["cache"]["used_bytes"] == 0 and start["cache"]["budget_bytes"] == 1 << 30
    assert start["cache"]["directory"] == str(tmp_path / "cache")

    assert fetched["catalog"]["requests"] > start["catalog"]["requests"]
    assert fetched["transfer"]["bytes_read"] == 20  # flux.dat, whole (one chunk)
    assert fetched["cache"]["chunks_fetched"] == 1
    assert fetched["sources"] == {f"sftp://{SFTP_HOST}": {"bytes_read": 20, "requests": 1, "errors": 0}}
    assert fetched["cache"]["used_bytes"] == 20
    assert fetched["cache"]["reads_from_cache"] == 0

    assert fetched["cache"]["reads_fetched"] == 0  # a prefetch is no read

    assert fetched["cache"]["chunks_in_flight"] == 0
    assert fetched["tiers"]["source_bytes"] == 20 and fetched["tiers"]["shared_bytes"] == 0
    assert fetched["tiers"]["latency"]["source"]["count"] == 1
    assert fetched["tiers"]["latency"]["source"]["buckets"]["+Inf"] == 1
    assert hit["tiers"]["local_bytes"] == 10  # the cache hit

    # (the miss may be answered by a direct read racing its chunk's fetch, so
    # whether that chunk is already written is left open here)
    assert hit["cache"]["reads_from_cache"] == 1 and hit["cache"]["reads_fetched"] == 1

    assert failed["catalog"]["not_found"] == 1
    for document in (start, fetched, hit):
        assert not any(count for layer in document["errors"].values() for count in layer.values())
    errors = failed["errors"]
    assert errors["transfer"]["errors"] >= 1  # the chunk fetch (and maybe a racing direct read)
    assert failed["sources"][f"sftp://{SFTP_HOST}"]["errors"] == errors["transfer"]["errors"]
    assert errors["cache"] == {"fetch_errors": 1, "integrity_errors": 0, "chunks_uncached": 0}
    assert errors["catalog"] == dict.fromkeys(errors["catalog"], 0)
    assert failed["uptime_seconds"] >= start["uptime_seconds"] >= 0


def test_token_expiry_is_reported(taken: list[dict[str, Any]]) -> None:
    token = taken[0]["token"]
    assert token["expired"] is False
    assert 3500 < token["expires_in_seconds"] <= 3600  # the demo server's 1 h tokens
    assert token["expires"].endswith("Z")


def test_render_for_people(taken: list[dict[str, Any]]) -> None:
    page = render(taken[3])
    assert page.startswith(f"scicatfs {taken[3]['scicatfs']} at /mnt/scicat (process {os.getpid()}, up ")
    assert "errors: transfer errors " in page and "cache fetch errors 1" in page
    assert "token: expires " in page and ("(in 59 min" in page or "(in 1 h 0 min)" in page)
    assert "\ncache:\n" in page and "  used_bytes " in page
    assert f"\nsources (bytes read, requests, errors):\n  sftp://{SFTP_HOST}  " in page
    assert "\ntiers:\n" in page and "source: 2 fetches, mean " in page and "shared: none" in page
    assert render(taken[0]).count("errors: none") == 1
    expired = dict(taken[0], token={"expires": iso_time(0), "expires_in_seconds": -5, "expired": True})
    assert "(EXPIRED)" in render(expired)


def test_iso_time() -> None:
    assert iso_time(0) == "1970-01-01T00:00:00Z"
    assert iso_time(1700000000.7) == "2023-11-14T22:13:20Z"


# -- scicatfs status MOUNTPOINT --------------------------------------------------------


def status_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scicatfs", "status", *args], capture_output=True, text=True, timeout=30
    )


def test_status_of_something_else(tmp_path: Path) -> None:
    result = status_command(str(tmp_path))
    assert result.returncode == 1 and result.stderr == f"scicatfs: {tmp_path} is not a scicatfs mount\n"


def test_status_of_a_running_mount(make_mount: Callable[..., Mount]) -> None:
    mount = make_mount()
    (mount.dataset(FLUX) / "flux.dat").read_bytes()
    result = status_command(str(mount.path))
    assert result.returncode == 0, result.stderr
    assert f"at {mount.path} (process {mount.process.pid}" in result.stdout
    raw = json.loads(status_command(str(mount.path), "--json").stdout)
    assert raw["transfer"]["bytes_read"] >= 20 and raw["cache"]["chunks_fetched"] >= 1


def test_status_of_a_dead_mount(make_mount: Callable[..., Mount]) -> None:
    mount = make_mount()
    mount.process.send_signal(signal.SIGKILL)
    mount.process.wait(timeout=10)
    result = status_command(str(mount.path))
    assert result.returncode == 1
    assert f"the scicatfs process of {mount.path} is gone: run 'scicatfs unmount {mount.path}'" in result.stderr


def test_status_in_process_entry_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", str(tmp_path)]) == 1
    assert "is not a scicatfs mount" in capsys.readouterr().err
