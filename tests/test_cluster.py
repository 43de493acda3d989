"""Several mounts as separate processes, each with its own local cache, sharing one shared tier.

As on a cluster: each "node" is a ``scicatfs mount`` process with its own
cache directory; all of them get ``--shared-cache`` on one directory. The
shared directory is a local directory here (this machine's kernel has no NFS
server or client), a small tmpfs for the full-filesystem case, and a
read-only bind mount for the read-only case.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from scicatfs.cache.shared import FORMAT_DIR, TEMP_PREFIX
from scicatfs.cache.store import CHUNK_SIZE
from scicatfs.demo.fixtures import Catalog
from tests.support.filesystems import small_tmpfs
from tests.support.mounts import Mount
from tests.support.probes import bounded, read_uncached
from tests.support.records import dataset_record
from tests.support.sshd import OpenSSHServer

MiB = 1024 * 1024
READ_BOUND = 120.0


def _status(mount: Mount) -> dict:
    return json.loads((mount.path / ".scicat" / "status.json").read_text())


def _objects(shared: Path) -> list[Path]:
    return sorted(path for path in (shared / FORMAT_DIR / "objects").rglob("*") if path.is_file())


def _data_objects(shared: Path) -> list[Path]:
    return [path for path in _objects(shared) if path.name.isdigit()]


def _kill_while_writing(mount: Mount, shared: Path, timeout: float = 30.0) -> bool:
    """SIGKILL the mount the moment a file that is to become an object is there but not whole yet.

    Polls without sleeping: a 4 MiB write takes milliseconds. False if no write was caught.
    """
    deadline = time.monotonic() + timeout
    objects = shared / FORMAT_DIR / "objects"
    while time.monotonic() < deadline:
        for folder in objects.glob("*/*"):
            for entry in os.scandir(folder):
                try:
                    partial = not entry.name.startswith(".fetching-") and entry.stat().st_size < CHUNK_SIZE
                except FileNotFoundError:  # renamed meanwhile
                    continue
                if partial:
                    mount.process.send_signal(signal.SIGKILL)
                    return True
    return False


def _catalog(pid: str, files: dict[str, int]) -> Catalog:
    """The demo catalog plus one dataset of random files (with md5 checksums) of these sizes."""
    catalog = Catalog.load_default()
    catalog.add_dataset(
        dataset_record(pid, f"/{pid}"), [{"path": name, "size": size} for name, size in files.items()],
        chk_alg="md5", contents={name: os.urandom(size) for name, size in files.items()},
    )  # fmt: skip
    return catalog


def _shared_args(shared: Path, *extra: str) -> list[str]:
    return ["--shared-cache", str(shared), *extra]


def test_second_and_third_mount_read_from_the_shared_tier_with_sshd_stopped(
    make_mount, make_sshd, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    sshd: OpenSSHServer = make_sshd()
    pid = "cluster/three"
    files = {"a.bin": 9 * MiB + 123, "b.bin": 300 * 1024, "empty.bin": 0}
    catalog = _catalog(pid, files)
    shared = tmp_path / "shared"
    shared.mkdir()
    first: Mount = make_mount(catalog, sftp=sshd, args=_shared_args(shared))
    for name in files:
        assert bounded(READ_BOUND, lambda name=name: read_uncached(first.dataset(pid) / name)) == catalog.content(
            pid, name)
    expected_objects = sum(-(-size // CHUNK_SIZE) for size in files.values())
    assert bounded(15, lambda: _wait(lambda: len(_data_objects(shared)) == expected_objects))

    sshd.stop()
    for _ in range(2):
        node: Mount = make_mount(catalog, sftp=sshd, args=_shared_args(shared))
        for name in files:
            assert bounded(READ_BOUND, lambda name=name: read_uncached(node.dataset(pid) / name)) == catalog.content(
                pid, name)
        tiers = _status(node)["tiers"]
        assert tiers["source_bytes"] == 0 and tiers["shared_bytes"] == sum(files.values())
        assert _status(node)["transfer"]["bytes_read"] == 0
        assert "Traceback" not in node.log_text()


def _wait(condition, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_four_mounts_reading_one_cold_file_at_once_fetch_it_about_once(make_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pid, name, size = "cluster/four", "big.bin", 256 * MiB
    catalog = _catalog(pid, {name: size})
    digest = hashlib.md5(catalog.content(pid, name)).hexdigest()
    shared = tmp_path / "shared"
    shared.mkdir()
    mounts: list[Mount] = [make_mount(catalog, args=_shared_args(shared)) for _ in range(4)]
    start = threading.Barrier(len(mounts))
    digests: dict[int, str] = {}

    def reader(index: int) -> None:
        hasher = hashlib.md5()
        start.wait(30)
        with open(mounts[index].dataset(pid) / name, "rb") as file:
            while piece := file.read(MiB):
                hasher.update(piece)
        digests[index] = hasher.hexdigest()

    threads = [threading.Thread(target=reader, args=(index,), daemon=True) for index in range(len(mounts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(400)
    assert digests == dict.fromkeys(range(len(mounts)), digest)
    transferred = sum(_status(mount)["transfer"]["bytes_read"] for mount in mounts)
    shared_bytes = sum(_status(mount)["tiers"]["shared_bytes"] for mount in mounts)
    print(f"4 mounts: {transferred / MiB:.1f} MiB over SFTP, {shared_bytes / MiB:.1f} MiB from the shared tier")
    assert transferred <= 1.3 * size
    assert shared_bytes >= 2 * size


def test_kill_9_while_writing_leaves_nothing_a_reader_takes_for_data(make_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pid, name, size = "cluster/killed", "big.bin", 160 * MiB
    catalog = _catalog(pid, {name: size})
    content = catalog.content(pid, name)
    shared = tmp_path / "shared"
    shared.mkdir()
    victim: Mount = make_mount(catalog, args=_shared_args(shared))
    reader = subprocess.Popen(
        [sys.executable, "-c", f"with open({str(victim.dataset(pid) / name)!r}, 'rb') as f:\n"
         "    while f.read(1 << 20): pass"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert _wait(lambda: len(_data_objects(shared)) >= 2, 60), "the mount never published objects"
        assert _kill_while_writing(victim, shared), "no object was being written"
        victim.process.wait(10)
    finally:
        reader.kill()
        reader.wait(30)
        victim.unmount()
    for path in _data_objects(shared):  # every object a reader would take is whole and exact
        chunk = int(path.name)
        assert path.read_bytes() == content[chunk * CHUNK_SIZE : (chunk + 1) * CHUNK_SIZE], path
    assert len(_data_objects(shared)) < size // CHUNK_SIZE, "the kill must come mid-read"

    survivor: Mount = make_mount(catalog, args=_shared_args(shared))
    assert bounded(READ_BOUND, lambda: read_uncached(survivor.dataset(pid) / name)) == content
    assert _status(survivor)["tiers"]["shared_bytes"] > 0
    stale = [path for path in _objects(shared) if path.name.startswith(TEMP_PREFIX)]
    for path in stale:  # as a later prune finds them
        os.utime(path, (time.time() - 2 * 3600, time.time() - 2 * 3600))
    result = subprocess.run(
        [sys.executable, "-m", "scicatfs", "cache", "prune", "--shared", str(shared), "--to", "1G"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not [path for path in _objects(shared) if path.name.startswith(TEMP_PREFIX)]


def test_prune_keeps_the_shared_tier_under_budget_while_mounts_read(make_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pid = "cluster/prune"
    files = {f"f{index}.bin": 6 * MiB for index in range(6)}
    catalog = _catalog(pid, files)
    shared = tmp_path / "shared"
    shared.mkdir()
    budget = 12 * MiB
    mounts = [make_mount(catalog, args=_shared_args(shared)) for _ in range(2)]
    stop = threading.Event()
    failures: list[str] = []
    prune = [sys.executable, "-m", "scicatfs", "cache", "prune", "--shared", str(shared), "--to", str(budget)]

    def pruner() -> None:
        while not stop.is_set():
            result = subprocess.run(prune, capture_output=True, text=True, timeout=60)
            if result.returncode != 0:
                failures.append(result.stderr)

    thread = threading.Thread(target=pruner, daemon=True)
    thread.start()
    try:
        for round_ in range(2):
            for mount in mounts:
                for name in files:
                    assert bounded(READ_BOUND, lambda m=mount, n=name: read_uncached(m.dataset(pid) / n)) == (
                        catalog.content(pid, name)), (round_, name)
    finally:
        stop.set()
        thread.join(120)
    assert not failures
    result = subprocess.run(prune, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sum(path.stat().st_size for path in _data_objects(shared)) <= budget
    assert _data_objects(shared), "prune keeps what fits"
    assert "Traceback" not in "".join(mount.log_text() for mount in mounts)


@pytest.fixture
def read_only_shared(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(writable path, read-only bind mount of it); unmounted after the test."""
    source, view = tmp_path / "shared", tmp_path / "shared-ro"
    source.mkdir()
    view.mkdir()
    subprocess.run(["mount", "--bind", str(source), str(view)], check=True, timeout=30)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True, timeout=30)
        yield source, view
    finally:
        subprocess.run(["umount", "-l", str(view)], check=True, timeout=30)


@pytest.mark.allow_log('WARNING scicatfs\\.cache\\.shared: shared cache \\S+ is read-only here')
def test_a_read_only_shared_directory_is_only_read(make_mount, read_only_shared) -> None:  # type: ignore[no-untyped-def]
    source, view = read_only_shared
    pid = "cluster/readonly"
    files = {"seen.bin": 5 * MiB, "unseen.bin": 3 * MiB}
    catalog = _catalog(pid, files)
    writer: Mount = make_mount(catalog, args=_shared_args(source))
    assert read_uncached(writer.dataset(pid) / "seen.bin") == catalog.content(pid, "seen.bin")
    assert _wait(lambda: len(_data_objects(source)) == 2)
    before = _objects(source)

    reader: Mount = make_mount(catalog, args=_shared_args(view))
    for name in files:
        assert bounded(READ_BOUND, lambda n=name: read_uncached(reader.dataset(pid) / n)) == catalog.content(pid, name)
    tiers = _status(reader)["tiers"]
    assert tiers["shared_bytes"] == files["seen.bin"] and tiers["source_bytes"] == files["unseen.bin"]
    assert tiers["shared_writable"] is False
    assert _objects(source) == before
    assert reader.log_text().count("read-only here") == 1
    assert "Traceback" not in reader.log_text()


@pytest.mark.allow_log('WARNING scicatfs\\.cache\\.shared: shared cache \\S+ is full \\(No space left on device\\)')
def test_a_full_shared_filesystem_serves_from_the_source_and_says_so_once(make_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pid = "cluster/full"
    files = {f"f{index}.bin": 5 * MiB for index in range(4)}
    catalog = _catalog(pid, files)
    with small_tmpfs(tmp_path / "small-shared", "8m") as small_shared:  # room for two objects
        mount: Mount = make_mount(catalog, args=_shared_args(small_shared))
        try:
            for name in files:
                assert bounded(READ_BOUND, lambda n=name: read_uncached(mount.dataset(pid) / n)) == (
                    catalog.content(pid, name))
            log = mount.log_text()
            assert log.count("is full") == 1, log
            assert not [path for path in _objects(small_shared) if path.name.startswith(TEMP_PREFIX)]
            for path in _data_objects(small_shared):
                assert path.stat().st_size in (CHUNK_SIZE, MiB)
            assert _status(mount)["tiers"]["source_bytes"] == sum(files.values())
            assert "Traceback" not in log
        finally:
            mount.unmount()  # before the tmpfs goes


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _samples(page: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus exposition text as {(sample name, sorted labels): value}, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    }


def test_metrics_endpoint_textfile_and_status_show_the_tiers(make_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("prometheus_client")
    pid = "cluster/metrics"
    catalog = _catalog(pid, {"x.bin": 2 * MiB})
    shared, textfile, port = tmp_path / "shared", tmp_path / "scicatfs.prom", _free_port()
    shared.mkdir()
    mount: Mount = make_mount(
        catalog, args=_shared_args(shared, "--metrics-port", str(port), "--metrics-textfile", str(textfile))
    )
    assert read_uncached(mount.dataset(pid) / "x.bin") == catalog.content(pid, "x.bin")
    assert read_uncached(mount.dataset(pid) / "x.bin") == catalog.content(pid, "x.bin")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        samples = _samples(response.read().decode())
    assert samples["scicatfs_tier_bytes_total", (("tier", "source"),)] == 2 * MiB
    assert samples["scicatfs_fetch_seconds_count", (("tier", "source"),)] >= 1
    assert samples["scicatfs_catalog_requests_total", ()] >= 1
    assert samples["scicatfs_cache_used_bytes", ()] == 2 * MiB
    assert samples["scicatfs_transfer_read_bytes_total", ()] >= 2 * MiB
    source = ("scicatfs_tier_bytes_total", (("tier", "source"),))
    assert _wait(lambda: textfile.exists() and _samples(textfile.read_text()).get(source) == 2 * MiB, 30)
    shown = subprocess.run(
        [sys.executable, "-m", "scicatfs", "status", str(mount.path)], capture_output=True, text=True, timeout=30
    )
    assert shown.returncode == 0, shown.stderr
    assert "tiers:" in shown.stdout and "source_bytes" in shown.stdout and "source: 1 fetches" in shown.stdout
