"""``scicatfs cache status|prune|verify|where`` on a cache filled by a real prefetch.

The cache is filled from the demo catalog server and the real sshd by
``scicatfs prefetch`` (in-process, through the same entry point), plus one
partial blob written through the store's own API: the first chunk of a
three-chunk file.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from scicatfs.cache.store import BlobStore, FileSpec
from scicatfs.catalog.models import Checksum
from scicatfs.cli import main
from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.server import CatalogServer
from tests.support.mounts import DEMO_USER
from tests.support.sshd import OpenSSHServer

MiB = 1024 * 1024
FLUX = "20.500.12269/72fe3ff6-105b-4c7f-b9d0-073b67c90ec3"
FRAMES = "thaumometer-frames-0042"
BIG_FRAME = "frame_big.raw"  # 9 MiB + 1 byte: three 4 MiB chunks


def big_frame_spec(catalog: Catalog) -> FileSpec:
    entry = next(f for f in catalog.files(FRAMES) if f["path"] == BIG_FRAME)
    return FileSpec(FRAMES, BIG_FRAME, f"sftp:///hex/ps/frames/{BIG_FRAME}", f"/hex/ps/frames/{BIG_FRAME}", entry["size"], 0.0,
                    Checksum("sha256", entry["chk"]))  # fmt: skip


@pytest.fixture
def cache(
    demo_sftp_files: OpenSSHServer,
    demo_catalog: Catalog,
    make_catalog_server: Callable[..., CatalogServer],
    tmp_path: Path,
) -> Path:
    """A cache with 3 complete blobs (2 datasets) and one partial blob."""
    sshd, server = demo_sftp_files, make_catalog_server()
    password = tmp_path / "password"
    password.write_text(demo_catalog.users[DEMO_USER].password)
    password.chmod(0o600)
    directory = tmp_path / "cache"
    connection = [
        "--url", server.url, "--username", DEMO_USER, "--password-file", str(password),
        "--sftp-host", sshd.host, "--sftp-port", str(sshd.port), "--sftp-user", sshd.username,
        "--identity-file", str(sshd.client_key), "--known-hosts", str(sshd.known_hosts),
        "--cache-dir", str(directory), "--cache-size", "1G",
    ]  # fmt: skip
    assert main(["prefetch", FLUX, *connection]) == 0
    assert main(["prefetch", FRAMES, "frame_small.raw", *connection]) == 0
    with BlobStore(directory, 1 << 30) as store:
        blob = store.open_blob(big_frame_spec(demo_catalog))
        store.write_chunk(blob, 0, demo_catalog.content(FRAMES, BIG_FRAME)[: 4 * MiB])
        store.release_blob(blob)
    return directory


def cache_command(capsys: pytest.CaptureFixture[str], directory: Path, *args: str) -> tuple[int, str, str]:
    status = main(["cache", *args, "--cache-dir", str(directory)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_status_sums_up_blobs_and_datasets(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = cache_command(capsys, cache, "status", "--cache-size", "40M")
    assert status == 0
    assert f"cache {cache}" in out
    assert "used    4.0 MiB of 40.0 MiB (10%)" in out
    assert "blobs   3 complete, 1 partial, 0 empty" in out
    assert f"  {FLUX}  2/2 files  95 B of 95 B" in out
    assert f"  {FRAMES}  1/2 files  4.0 MiB of 9.0 MiB" in out


def test_where_names_the_blob_and_what_is_present(
    cache: Path, demo_catalog: Catalog, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = cache_command(capsys, cache, "where", FLUX, "flux.dat")
    assert status == 0
    blob = Path(out.splitlines()[0])
    assert blob.read_bytes() == demo_catalog.content(FLUX, "flux.dat")
    assert "20 B of 20 B present (complete)" in out

    status, out, _ = cache_command(capsys, cache, "where", FRAMES, BIG_FRAME)
    assert status == 0 and "4.0 MiB of 9.0 MiB present (partial)" in out

    status, _, err = cache_command(capsys, cache, "where", FRAMES, "nope.raw")
    assert status == 1 and "nope.raw is not in the cache" in err


def test_verify_drops_a_corrupted_blob(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = cache_command(capsys, cache, "verify")
    assert status == 0
    assert "verified 1 complete blobs with checksums: 0 bad" in out  # the flux files have none

    status, out, _ = cache_command(capsys, cache, "where", FRAMES, "frame_small.raw")
    blob = Path(out.splitlines()[0])
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))

    status, out, _ = cache_command(capsys, cache, "verify")
    assert status == 1
    assert "BAD sha256:" in out and f"used by: {FRAMES} frame_small.raw" in out
    _, out, _ = cache_command(capsys, cache, "where", FRAMES, "frame_small.raw")
    assert "0 B of 1.0 KiB present (partial)" in out
    assert cache_command(capsys, cache, "verify")[0] == 0


def test_prune_keeps_blobs_open_elsewhere(
    cache: Path, demo_catalog: Catalog, capsys: pytest.CaptureFixture[str]
) -> None:
    # This process pins the partial blob; fcntl pins only exclude *other*
    # processes, so the prune runs as a subprocess, as it would beside a mount.
    with BlobStore(cache, 1 << 30) as store:
        blob = store.open_blob(big_frame_spec(demo_catalog))
        result = subprocess.run(
            [sys.executable, "-m", "scicatfs", "cache", "prune", "--to", "0", "--cache-dir", str(cache)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        store.release_blob(blob)
    assert result.returncode == 0, result.stderr
    assert "freed 1.1 KiB; the cache now holds 4.0 MiB" in result.stdout
    assert "kept 1 blobs that a running mount has open, 4.0 MiB over the target" in result.stdout

    status, out, _ = cache_command(capsys, cache, "prune", "--to", "0")
    assert status == 0 and "freed 4.0 MiB; the cache now holds 0 B" in out
    assert not [path for path in (cache / "blobs").rglob("*") if path.is_file()]


def test_prune_to_the_budget_by_default(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Least recently used first: the small files, then (not needed) the partial frame.
    status, out, _ = cache_command(capsys, cache, "prune", "--cache-size", "4M")
    assert status == 0 and "freed 1.1 KiB; the cache now holds 4.0 MiB" in out
    with BlobStore(cache, 1 << 30) as store:
        assert [(e.pid, e.path) for e in store.entries()] == [(FRAMES, BIG_FRAME)]


def test_profile_names_the_cache(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[profiles.lab]\nurl = "https://x"\ncache_dir = "{cache}"\ncache_size = "8M"\n')
    assert main(["cache", "status", "--profile", "lab", "--config", str(config)]) == 0
    assert "used    4.0 MiB of 8.0 MiB (50%)" in capsys.readouterr().out

    assert main(["cache", "status", "--profile", "nope", "--config", str(config)]) == 2
    assert "no profile 'nope'" in capsys.readouterr().err


def test_no_cache_yet_is_left_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "never-used"
    for action in ("status", "prune", "verify"):
        status, out, _ = cache_command(capsys, missing, action)
        assert status == 0 and f"no cache in {missing} yet" in out
    assert not missing.exists()


def test_bad_sizes_are_usage_errors(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = cache_command(capsys, cache, "prune", "--to", "lots")
    assert status == 2 and "invalid size 'lots'" in err
    status, _, err = cache_command(capsys, cache, "status", "--cache-size", "0")
    assert status == 2 and "must be larger than zero" in err
