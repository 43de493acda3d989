"""Faults under a real mount: the file server or the catalog goes away, the process dies,
the disk fills, the server's bytes disagree with the catalog, many readers at once.

Every case checks the same three promises: no hang (each probe has a
deadline), no wrong bytes (every byte compared), and the mount keeps serving
what it can afterwards. docs/failure-behaviour.md states what users get; the
bounds asserted here are the ones it documents.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.server import CatalogServer
from scicatfs.fs.namespace import LOOKUP_TIMEOUT, STALE_WAIT
from scicatfs.mountpoint import find_mount
from tests.support.checklogs import LogChecker
from tests.support.filesystems import small_tmpfs
from tests.support.mounts import Mount, wait_until
from tests.support.probes import Background, bounded, read_uncached
from tests.support.records import dataset_record
from tests.support.sshd import OpenSSHServer

MiB = 1024 * 1024
#: A failing read must answer within this (the fetcher's read_timeout is 60 s; refused connections fail at once).
EIO_BOUND = 75.0
#: Operations that need no network must answer within this, whatever the servers do.
PROMPT = 5.0
#: docs/failure-behaviour.md: with sshd down (connection refused) an uncached read is EIO
#: after about 1 s. Measured at mount level: 0.71-0.72 s (3 runs, load average ~9 on 2
#: cores); 2 s leaves room for a machine twice as busy.
REFUSED_EIO_WITHIN = 2.0


def _files_json(mount: Mount, pid: str) -> dict[str, dict]:
    document = json.loads((mount.dataset(pid) / ".scicat" / "files.json").read_text())
    return {entry["path"]: entry for entry in document["files"]}


def _wait_cached(mount: Mount, pid: str, path: str, timeout: float = 15.0) -> None:
    """Wait until the cache has recorded the whole file (chunk rows follow the reader)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = _files_json(mount, pid)[path]
        if entry["cached"] == entry["size"]:
            return
        time.sleep(0.05)
    raise AssertionError(f"{pid} {path} not fully cached after {timeout} s")


def _eio(action: Callable[[], object], seconds: float = EIO_BOUND) -> float:
    """Assert that ``action`` fails with EIO within ``seconds``; returns how long it took."""
    outcome = Background(action).outcome(seconds)
    assert isinstance(outcome.error, OSError), f"expected EIO, got {outcome.value!r:.80}"
    assert outcome.error.errno == errno.EIO, outcome.error
    return outcome.elapsed


# -- the file server fails ------------------------------------------------------------

#: The line that says a dropped transfer is tried again (docs/failure-behaviour.md).
RETRIED = r"WARNING scicatfs\.cache\.fetcher: fetching h5faults/killed big\.bin failed \(attempt 1 of 2\): "


@pytest.mark.allow_log(
    RETRIED,
    # The kernel's own read-ahead requests may land while sshd is down; the reader's read retries them.
    r"WARNING scicatfs\.cache\.fetcher: fetching h5faults/killed big\.bin failed \(attempt 2 of 2\)", optional=True)
@pytest.mark.allow_log(r"WARNING scicatfs\.fs\.errors: read pid='h5faults/killed' path='big\.bin': .*\(EIO\)", optional=True)
def test_sshd_killed_mid_read_then_restarted(make_mount, make_sshd) -> None:  # type: ignore[no-untyped-def]
    sshd: OpenSSHServer = make_sshd()
    pid = "h5faults/killed"
    catalog = Catalog.load_default()
    catalog.add_dataset(dataset_record(pid, "/h5faults/killed"),
                        [{"path": "big.bin", "size": 32 * MiB}, {"path": "other.bin", "size": MiB}])
    mount: Mount = make_mount(catalog, sftp=sshd)
    big = mount.dataset(pid) / "big.bin"
    expected = catalog.content(pid, "big.bin")
    started, resume = threading.Event(), threading.Event()

    def sequential_reader() -> bytes:
        with open(big, "rb") as file:
            pieces = [file.read(MiB)]
            started.set()
            resume.wait(30)
            while piece := file.read(MiB):
                pieces.append(piece)
        return b"".join(pieces)

    reader = Background(sequential_reader)
    if not started.wait(30):
        reader.outcome(5).unwrap()  # the reader's own error, if it failed
        raise AssertionError("the first MiB did not arrive within 30 s")
    assert _files_json(mount, pid)["big.bin"]["cached"] < 32 * MiB, "the kill must come mid-read"
    sshd.kill()
    resume.set()
    time.sleep(1.0)
    sshd.start()
    # The dropped transfer is retried once on a fresh connection: the reader gets exact bytes.
    assert reader.outcome(EIO_BOUND).unwrap() == expected
    assert re.search(RETRIED, mount.log_text())

    # The mount is not poisoned: the same file and another one read exactly now.
    assert bounded(EIO_BOUND, lambda: read_uncached(big)) == expected
    assert bounded(EIO_BOUND, lambda: (mount.dataset(pid) / "other.bin").read_bytes()) == catalog.content(
        pid, "other.bin")


@pytest.mark.allow_log(
    r"WARNING scicatfs\.cache\.fetcher: fetching h5faults/offline sub/uncached\.bin failed \(attempt [12] of 2\): 127\.0\.0\.1:\d+: cannot connect: \[Errno 111\]",
    r"WARNING scicatfs\.fs\.errors: read pid='h5faults/offline' path='sub/uncached\.bin': .*cannot connect: \[Errno 111\].*\(EIO\)",
)
def test_sshd_down_cached_files_read_uncached_files_eio(make_mount, make_sshd) -> None:  # type: ignore[no-untyped-def]
    sshd: OpenSSHServer = make_sshd()
    pid, other = "h5faults/offline", "h5faults/offline-unseen"
    catalog = Catalog.load_default()
    catalog.add_dataset(dataset_record(pid, "/h5faults/offline"),
                        [{"path": "cached.bin", "size": 5 * MiB}, {"path": "sub/uncached.bin", "size": 3 * MiB}])
    catalog.add_dataset(dataset_record(other, "/h5faults/offline-unseen"), [{"path": "x.bin", "size": 10}])
    mount: Mount = make_mount(catalog, sftp=sshd)
    dataset = mount.dataset(pid)
    assert (dataset / "cached.bin").read_bytes() == catalog.content(pid, "cached.bin")
    _wait_cached(mount, pid, "cached.bin")

    sshd.stop()
    assert bounded(PROMPT, lambda: read_uncached(dataset / "cached.bin")) == catalog.content(pid, "cached.bin")
    refused = _eio(lambda: (dataset / "sub" / "uncached.bin").read_bytes())
    assert refused < REFUSED_EIO_WITHIN, f"EIO after {refused:.2f} s"
    # The catalog is up: listings, stat and records keep working without the file server.
    assert sorted(bounded(PROMPT, lambda: os.listdir(dataset))) == [".scicat", "cached.bin", "metadata.json", "sub"]
    assert bounded(PROMPT, lambda: os.stat(dataset / "sub" / "uncached.bin").st_size) == 3 * MiB
    assert sorted(bounded(PROMPT, lambda: os.listdir(mount.dataset(other)))) == [".scicat", "metadata.json", "x.bin"]
    log = mount.log_text()
    assert "uncached.bin" in log

    sshd.start()
    assert bounded(EIO_BOUND, lambda: (dataset / "sub" / "uncached.bin").read_bytes()) == catalog.content(
        pid, "sub/uncached.bin")


# -- the catalog fails ----------------------------------------------------------------


#: How to break the catalog, and what the log then says.
CATALOG_FAULTS: dict[str, tuple[Callable[[CatalogServer], None], str]] = {
    "down": (lambda server: server.stop(), "connection failed"),
    "503 storm": (lambda server: setattr(server, "failure_rate", 1.0), "HTTP 503"),
    "malformed JSON": (lambda server: setattr(server, "malformed", True), "invalid JSON"),
}


def _heal(server: CatalogServer, fault: str) -> None:
    if fault == "down":
        server.start()
    server.failure_rate, server.malformed = 0.0, False


@pytest.mark.parametrize("fault", list(CATALOG_FAULTS))
@pytest.mark.allow_log(
    r"WARNING scicatfs\.fs\.namespace: (PID prefix 'h5faults'|dataset 'h5faults/catalog'): no usable answer from the catalog",
    r"WARNING scicatfs\.fs\.errors: (lookup pid='h5faults/catalog-unseen'|readdir path='h5faults/'): .*\(EIO\)",
)
def test_catalog_failure_serves_last_known_datasets(make_mount, fault: str, log_checker: LogChecker) -> None:  # type: ignore[no-untyped-def]
    """Seen datasets stay usable from the last record; unseen names are EIO after bounded retries."""
    if fault == "malformed JSON":
        log_checker.allow(r"WARNING scicatfs\.catalog\.client: catalog sent invalid JSON for dataset 'h5faults/catalog-unseen'")
    pid, unseen = "h5faults/catalog", "h5faults/catalog-unseen"
    catalog = Catalog.load_default()
    catalog.add_dataset(dataset_record(pid, "/h5faults/catalog"),
                        [{"path": "data.bin", "size": MiB}, {"path": "later.bin", "size": 1000}])
    catalog.add_dataset(dataset_record(unseen, "/h5faults/catalog-unseen"), [{"path": "x.bin", "size": 10}])
    mount: Mount = make_mount(catalog, args=["--record-ttl", "1", "--listing-ttl", "1"])
    breaks, logged = CATALOG_FAULTS[fault]
    dataset = mount.dataset(pid)
    data = (dataset / "data.bin").read_bytes()
    record = (dataset / "metadata.json").read_bytes()
    _wait_cached(mount, pid, "data.bin")

    breaks(mount.server)
    time.sleep(1.5)  # every TTL has expired: the next access asks the catalog
    assert bounded(PROMPT, lambda: read_uncached(dataset / "data.bin")) == data
    assert bounded(PROMPT, lambda: (dataset / "metadata.json").read_bytes()) == record
    assert "data.bin" in bounded(PROMPT, lambda: os.listdir(dataset))
    later = bounded(PROMPT, lambda: (dataset / "later.bin").read_bytes())  # uncached: SFTP is up
    assert later == catalog.content(pid, "later.bin")
    assert _eio(lambda: os.stat(mount.dataset(unseen)), seconds=20) < 15
    _eio(lambda: os.listdir(mount.path / "h5faults"), seconds=20)  # PID listings need the catalog
    assert "no usable answer from the catalog" in mount.log_text() and logged in mount.log_text()

    _heal(mount.server, fault)
    time.sleep(1.5)  # the failed lookup was cached as a negative entry for at most the listing TTL
    assert bounded(PROMPT, lambda: (mount.dataset(unseen) / "x.bin").read_bytes()) == catalog.content(unseen, "x.bin")


#: A name never seen must be EIO within this against a hung catalog, all retries included:
#: the lookup deadline (LOOKUP_TIMEOUT, 8 s) plus 2 s for the FUSE round trip and a loaded machine.
NEW_NAME_BOUND = 10.0


@pytest.mark.slow
@pytest.mark.allow_log(
    r"WARNING scicatfs\.fs\.namespace: PID prefix 'h5faults': no usable answer from the catalog, still shown as a"
    r" directory \(the catalog did not answer within 5 s\)",
    r"WARNING scicatfs\.fs\.errors: lookup pid='(10\.99999|h5faults/never-seen)': the catalog did not answer within 8 s"
    r" \(EIO\)",
)
def test_hung_catalog_serves_known_datasets_and_fails_new_names_quickly(make_mount) -> None:  # type: ignore[no-untyped-def]
    """A catalog that accepts requests but never answers: known datasets wait a few seconds, once;
    a name with no last version is EIO at the lookup deadline, not after the client's 4 tries of 35 s."""
    pid = "h5faults/hung"
    catalog = Catalog.load_default()
    catalog.add_dataset(dataset_record(pid, "/h5faults/hung"), [{"path": "data.bin", "size": MiB}])
    mount: Mount = make_mount(catalog, args=["--record-ttl", "1", "--listing-ttl", "1"])
    dataset = mount.dataset(pid)
    data = (dataset / "data.bin").read_bytes()
    _wait_cached(mount, pid, "data.bin")

    mount.server.latency = 600.0
    time.sleep(1.5)  # every TTL has expired
    # A PID whose first component was never seen: one lookup, ended by the lookup deadline
    # (the lower bound shows that the catalog really was asked and waited for).
    elapsed = _eio(lambda: os.stat(mount.path / "10.99999" / "never-seen"), seconds=NEW_NAME_BOUND + 20)
    assert LOOKUP_TIMEOUT - 0.5 <= elapsed <= NEW_NAME_BOUND, elapsed
    first = Background(lambda: read_uncached(dataset / "data.bin")).outcome(STALE_WAIT + PROMPT)
    assert first.unwrap() == data
    for _ in range(3):  # and from then on without waiting, as long as the catalog stays silent
        assert bounded(PROMPT / 2, lambda: read_uncached(dataset / "data.bin")) == data
        assert bounded(PROMPT / 2, lambda: os.stat(dataset / "data.bin").st_size) == MiB
        time.sleep(1.1)
    # A never-seen PID below the known prefix (now served from memory) is bounded alike.
    elapsed = _eio(lambda: os.stat(mount.dataset("h5faults/never-seen")), seconds=NEW_NAME_BOUND + 20)
    assert elapsed <= NEW_NAME_BOUND, elapsed
    log = mount.log_text()
    assert f"did not answer within {STALE_WAIT:g} s" in log
    assert f"did not answer within {LOOKUP_TIMEOUT:g} s" in log
    mount.server.latency = 0.0


@pytest.mark.slow
def test_slow_catalog_does_not_block_cached_reads(make_mount) -> None:  # type: ignore[no-untyped-def]
    """A lookup waiting for a slow catalog (within the lookup deadline) leaves every other operation prompt."""
    pid, unseen = "h5faults/slow", "h5faults/slow-unseen"
    catalog = Catalog.load_default()
    catalog.add_dataset(dataset_record(pid, "/h5faults/slow"), [{"path": "data.bin", "size": MiB}])
    catalog.add_dataset(dataset_record(unseen, "/h5faults/slow-unseen"), [{"path": "x.bin", "size": 10}])
    mount: Mount = make_mount(catalog)
    dataset = mount.dataset(pid)
    data = (dataset / "data.bin").read_bytes()
    _wait_cached(mount, pid, "data.bin")

    asked = threading.Event()  # the slow lookup has reached the catalog
    answer = mount.server.dispatch

    def dispatch(method: str, target: str, headers: dict[str, str], body: bytes):  # type: ignore[no-untyped-def]
        if "slow-unseen" in target:
            asked.set()
        return answer(method, target, headers, body)

    mount.server.dispatch = dispatch
    mount.server.latency = LOOKUP_TIMEOUT - 2  # slow, but answers before the lookup deadline
    slow = Background(lambda: (mount.dataset(unseen) / "x.bin").read_bytes())
    assert asked.wait(10), "the lookup never reached the catalog"
    for _ in range(5):
        assert bounded(PROMPT, lambda: read_uncached(dataset / "data.bin")) == data
        assert bounded(PROMPT, lambda: os.stat(dataset / "data.bin").st_size) == MiB
        assert "data.bin" in bounded(PROMPT, lambda: os.listdir(dataset))
    assert not slow.done
    mount.server.latency = 0.0
    assert slow.outcome(40).unwrap() == catalog.content(unseen, "x.bin")


# -- the scicatfs process dies ----------------------------------------------------------


def test_kill_9_under_load_then_unmount_and_remount_from_the_surviving_cache(make_mount) -> None:  # type: ignore[no-untyped-def]
    pid = "h5faults/crash"
    names = [f"part{index}.bin" for index in range(4)]
    catalog = Catalog.load_default()
    catalog.add_dataset(dataset_record(pid, "/h5faults/crash"), [{"path": n, "size": 16 * MiB} for n in names],
                        chk_alg="sha256")
    mount: Mount = make_mount(catalog)
    dataset = mount.dataset(pid)

    def reader(name: str) -> None:
        with open(dataset / name, "rb") as file:
            while file.read(256 * 1024):
                time.sleep(0.005)  # keep the load going until the kill

    readers = [Background(lambda name=name: reader(name)) for name in names]
    deadline = time.monotonic() + 30
    while sum(entry["cached"] for entry in _files_json(mount, pid).values()) < 8 * MiB:
        assert time.monotonic() < deadline, "nothing was cached under load"
        time.sleep(0.05)
    mount.process.kill()
    mount.process.wait(timeout=10)
    for background in readers:  # every reader ends with an error, none hangs
        outcome = background.outcome(15)
        assert outcome.error is None or isinstance(outcome.error, OSError)

    result = subprocess.run([sys.executable, "-m", "scicatfs", "unmount", str(mount.path)],
                            check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert find_mount(mount.path) is None and os.listdir(mount.path) == []

    again: Mount = make_mount(catalog, server=mount.server, cache_dir=mount.cache_dir)
    survived = sum(entry["cached"] for entry in _files_json(again, pid).values())
    assert survived >= 4 * MiB, "the chunks recorded before the crash should be reused"
    for name in names:
        assert bounded(EIO_BOUND, lambda name=name: (again.dataset(pid) / name).read_bytes()) == catalog.content(pid, name)


# -- the cache disk fills up ------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs, unmounted after the test whatever happened."""
    with small_tmpfs(tmp_path / "small-disk", "16m") as path:
        yield path


@pytest.mark.allow_log(
    r"WARNING scicatfs\.cache\.fetcher: cannot cache h5faults/diskfull f\d\.bin \(\[Errno 28\] No space left on device\): serving reads uncached, read-ahead off",
    r"WARNING scicatfs\.cache\.fetcher: caching works again",
)
def test_disk_full_reads_still_succeed_and_caching_recovers(make_mount, small_disk: Path) -> None:  # type: ignore[no-untyped-def]
    pid = "h5faults/diskfull"
    names = [f"f{index}.bin" for index in range(3)]
    catalog = Catalog.load_default()
    catalog.add_dataset(dataset_record(pid, "/h5faults/diskfull"), [{"path": n, "size": 6 * MiB} for n in names],
                        chk_alg="md5")
    mount: Mount = make_mount(catalog, cache_dir=small_disk / "cache", args=["--cache-size", "1G"])
    dataset = mount.dataset(pid)
    filler = small_disk / "filler"
    free = os.statvfs(small_disk)
    filler.write_bytes(bytes(free.f_bavail * free.f_frsize - 256 * 1024))

    for name in names:  # no room for a single chunk: every read is served from memory
        assert bounded(EIO_BOUND, lambda name=name: read_uncached(dataset / name)) == catalog.content(pid, name)
    assert "cannot cache" in mount.log_text()
    assert all(entry["cached"] < entry["size"] for entry in _files_json(mount, pid).values())

    filler.unlink()
    assert bounded(EIO_BOUND, lambda: read_uncached(dataset / names[0])) == catalog.content(pid, names[0])
    _wait_cached(mount, pid, names[0])
    assert "caching works again" in mount.log_text()


# -- the server's file is not what the catalog says -------------------------------------


def _complete_blobs(cache_dir: Path) -> int:
    with sqlite3.connect(f"file:{cache_dir / 'index.sqlite3'}?mode=ro", uri=True, timeout=10) as index:
        return index.execute("SELECT count(*) FROM blobs WHERE complete").fetchone()[0]


@pytest.mark.allow_log(
    r"ERROR scicatfs\.cache: checksum mismatch for h5faults/differs badsum\.bin: catalog says md5:0{32}, server sent md5:[0-9a-f]{32}; cached copy discarded",
    r"ERROR scicatfs\.cache: h5faults/differs (short\.bin: catalog says 6291456 bytes, server has 6290456|long\.bin: catalog says 100 bytes, server has 104)",
)
def test_server_file_differs_from_the_catalog(make_mount, make_sshd) -> None:  # type: ignore[no-untyped-def]
    sshd: OpenSSHServer = make_sshd()
    pid = "h5faults/differs"
    catalog = Catalog.load_default()
    files = [{"path": "good.bin", "size": 6 * MiB}, {"path": "badsum.bin", "size": 6 * MiB, "chk": "0" * 32},
             {"path": "short.bin", "size": 6 * MiB}, {"path": "long.bin", "size": 100}]
    catalog.add_dataset(dataset_record(pid, "/h5faults/differs"), files, chk_alg="md5")
    mount: Mount = make_mount(catalog, sftp=sshd)
    sshd.put("/h5faults/differs/short.bin", catalog.content(pid, "short.bin")[:-1000])
    sshd.put("/h5faults/differs/long.bin", catalog.content(pid, "long.bin") + b"more")
    dataset = mount.dataset(pid)

    assert (dataset / "good.bin").read_bytes() == catalog.content(pid, "good.bin")
    _eio(lambda: (dataset / "badsum.bin").read_bytes())
    _eio(lambda: (dataset / "short.bin").read_bytes())
    _eio(lambda: (dataset / "long.bin").read_bytes())
    # good.bin's verification runs in the background: once it is complete, nothing else may be.
    assert wait_until(lambda: _complete_blobs(mount.cache_dir) >= 1, 15), "good.bin was never marked complete"
    cached = _files_json(mount, pid)
    assert cached["good.bin"]["cached"] == 6 * MiB
    assert _complete_blobs(mount.cache_dir) == 1  # good.bin, and nothing else, is marked complete
    log = mount.log_text()
    assert "checksum mismatch" in log and "badsum.bin" in log
    assert "catalog says 6291456 bytes, server has 6290456" in log
    assert "catalog says 100 bytes, server has 104" in log


# -- many readers ---------------------------------------------------------------------------


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@pytest.mark.slow
def test_64_readers_over_16_files(make_mount) -> None:  # type: ignore[no-untyped-def]
    """Random ranges, around the page cache, for 10 s: every byte right, no error, RSS bounded."""
    pid = "h5faults/load"
    names = [f"file{index:02d}.bin" for index in range(16)]
    sizes = [(index % 4 + 1) * 3 * MiB + index * 4099 for index in range(16)]  # chunk-unaligned tails
    catalog = Catalog.load_default()
    catalog.add_dataset(dataset_record(pid, "/h5faults/load"),
                        [{"path": n, "size": s} for n, s in zip(names, sizes)], chk_alg="md5")
    mount: Mount = make_mount(catalog)
    dataset = mount.dataset(pid)
    expected = {name: catalog.content(pid, name) for name in names}
    stop_at = time.monotonic() + 10.0
    peak = [_rss(mount.process.pid)]

    def reader(seed: int) -> int:
        chooser = random.Random(seed)
        checked = 0
        while time.monotonic() < stop_at:
            name = chooser.choice(names)
            data = expected[name]
            offset = chooser.randrange(len(data))
            length = chooser.choice([1, 4096, 65536, MiB, 3 * MiB])
            with open(dataset / name, "rb") as file:
                os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                got = os.pread(file.fileno(), length, offset)
            assert got == data[offset:offset + length], f"{name} at {offset}+{length}"
            checked += len(got)
        return checked

    readers = [Background(lambda seed=seed: reader(seed)) for seed in range(64)]
    while not all(background.done for background in readers) and time.monotonic() < stop_at + 60:
        peak.append(_rss(mount.process.pid))
        time.sleep(0.2)
    checked = sum(background.outcome(60).unwrap() for background in readers)
    assert checked > 64 * MiB
    assert max(peak) < 400 * MiB, f"scicatfs grew to {max(peak) / MiB:.0f} MiB"
    for name in names[:2]:  # and the cache holds exact, verified copies
        assert read_uncached(dataset / name) == expected[name]
