"""A file whose bytes failed verification stays failed: no open, read or mmap returns any of them.

Real mounts, the real sshd, the project's catalog server. The server's copy is
replaced by wrong bytes after the catalog recorded the checksum of the right
ones (or the size), as happens when a file is rewritten behind the catalog's
back. Reads here are plain ``open().read()`` on purpose: the kernel's page
cache (``keep_cache``) is part of what must not hand out failed bytes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from scicatfs.cache.store import BlobStore, FileSpec
from scicatfs.catalog.models import Checksum
from scicatfs.demo.fixtures import Catalog
from tests.support.mounts import Mount
from tests.support.probes import Background, bounded, read_uncached
from tests.support.records import dataset_record

MiB = 1024 * 1024
PID = "h5integrity/wrong"
FOLDER = "/h5integrity/wrong"
#: A failing read or open answers within this (reads of these files need one SFTP round trip or none).
PROMPT = 15.0
#: The mount applies failures that other processes record within its poll (2 s), plus slack for a busy machine.
POLL_BOUND = 8.0


def _catalog() -> Catalog:
    catalog = Catalog.load_default()
    catalog.add_dataset(
        dataset_record(PID, FOLDER),
        [
            {"path": "badsum.bin", "size": 204_811},  # the size of the file first seen to slip through
            {"path": "short.bin", "size": 3 * MiB},
            {"path": "partial.bin", "size": 64 * MiB},
            {"path": "good.bin", "size": MiB},
        ],
        chk_alg="md5",
    )  # fmt: skip
    return catalog


def _corrupt(mount: Mount, catalog: Catalog) -> None:
    """The server's copies of badsum.bin and partial.bin differ in one byte; short.bin lost its tail."""
    for name in ("badsum.bin", "partial.bin"):
        data = bytearray(catalog.content(PID, name))
        data[len(data) // 2] ^= 0xFF
        mount.sshd.put(f"{FOLDER}/{name}", bytes(data))
    mount.sshd.put(f"{FOLDER}/short.bin", catalog.content(PID, "short.bin")[:-1000])


def _repair(mount: Mount, catalog: Catalog, name: str) -> None:
    mount.sshd.put(f"{FOLDER}/{name}", catalog.content(PID, name))


def _assert_eio(action: Callable[[], object]) -> None:
    outcome = Background(action).outcome(PROMPT)
    assert isinstance(outcome.error, OSError), f"expected EIO, got {len(outcome.value or b'')} bytes"
    assert outcome.error.errno == errno.EIO, outcome.error


def _plain_read(path: Path) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _mmap_read(path: Path) -> subprocess.CompletedProcess[str]:
    """Another process maps the file and reads it through the mapping."""
    script = textwrap.dedent(f"""
        import mmap, sys
        with open({str(path)!r}, "rb") as file:
            with mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ) as mapping:
                data = mapping[:]
        print(len(data))
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=PROMPT)


def _log_lines(mount: Mount, text: str) -> int:
    return sum(text in line for line in mount.log_text().splitlines())


def _assert_failed_everywhere(mount: Mount, name: str) -> None:
    """EIO from five opens in a row, from mmap in another process, from cat."""
    path = mount.dataset(PID) / name
    for _ in range(5):
        _assert_eio(lambda: _plain_read(path))
    mapped = _mmap_read(path)
    assert mapped.returncode != 0 and mapped.stdout == "", mapped  # EIO at open (or SIGBUS): never bytes
    assert "Input/output error" in mapped.stderr or mapped.returncode == -7, mapped.stderr
    cat = subprocess.run(["cat", str(path)], capture_output=True, timeout=PROMPT)
    assert (cat.returncode, cat.stdout) == (1, b""), cat
    assert b"Input/output error" in cat.stderr


@pytest.mark.allow_log(
    r"ERROR scicatfs\.cache: checksum mismatch for h5integrity/wrong badsum\.bin: catalog says md5:[0-9a-f]{32}, server sent md5:[0-9a-f]{32}; cached copy discarded",
    r"ERROR scicatfs\.cache: h5integrity/wrong short\.bin: catalog says 3145728 bytes, server has 3144728 ",
)
def test_a_failed_file_stays_failed_across_opens_processes_and_mounts(make_mount) -> None:  # type: ignore[no-untyped-def]
    catalog = _catalog()
    mount: Mount = make_mount(catalog)
    _corrupt(mount, catalog)
    dataset = mount.dataset(PID)
    assert _plain_read(dataset / "good.bin") == catalog.content(PID, "good.bin")

    started = time.monotonic()
    for name in ("badsum.bin", "short.bin"):
        _assert_eio(lambda name=name: _plain_read(dataset / name))  # found out by this first reader
        _assert_failed_everywhere(mount, name)
    if time.monotonic() - started < 10:  # one line per file per 10 s, however often it is asked for
        assert _log_lines(mount, f"checksum mismatch for {PID} badsum.bin") == 1
        assert _log_lines(mount, f"{PID} short.bin: catalog says 3145728 bytes, server has 3144728") == 1
    expected = hashlib.md5(catalog.content(PID, "badsum.bin")).hexdigest()
    assert f"catalog says md5:{expected}" in mount.log_text()

    # A second mount on the same cache, at the same time, and then alone after a remount.
    second: Mount = make_mount(catalog, cache_dir=mount.cache_dir)
    for name in ("badsum.bin", "short.bin"):
        _assert_failed_everywhere(second, name)
    mount.unmount()
    second.unmount()
    third: Mount = make_mount(catalog, cache_dir=mount.cache_dir)
    for name in ("badsum.bin", "short.bin"):
        _assert_failed_everywhere(third, name)
    assert bounded(PROMPT, lambda: _plain_read(third.dataset(PID) / "good.bin")) == catalog.content(PID, "good.bin")


@pytest.mark.allow_log(r"ERROR scicatfs\.cache: checksum mismatch for h5integrity/wrong partial\.bin: catalog says md5:[0-9a-f]{32}, server sent md5:[0-9a-f]{32}; cached copy discarded")
def test_readers_that_hold_the_file_learn_of_the_mismatch(make_mount) -> None:  # type: ignore[no-untyped-def]
    """A partial reader gets unverified bytes; once any reader finds the mismatch, nothing more."""
    catalog = _catalog()
    mount: Mount = make_mount(catalog)
    _corrupt(mount, catalog)
    path = mount.dataset(PID) / "partial.bin"
    mapper = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import mmap, sys, time
            file = open({str(path)!r}, "rb")
            mapping = mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ)
            print(len(mapping[:4096]), flush=True)   # a partial read: these bytes are not verified yet
            sys.stdin.readline()
            deadline = time.monotonic() + {POLL_BOUND}
            while time.monotonic() < deadline:       # SIGBUS ends this loop once the pages are dropped
                mapping[:4096]
                time.sleep(0.05)
            print("still readable", flush=True)
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert mapper.stdout is not None and mapper.stdin is not None
        assert mapper.stdout.readline().strip() == "4096"
        with open(path, "rb") as holder:
            assert holder.read(4096) == catalog.content(PID, "partial.bin")[:4096]
            _assert_eio(lambda: _plain_read(path))  # a whole-file reader finds the mismatch
            mapper.stdin.write("go\n")
            mapper.stdin.flush()
            assert mapper.wait(POLL_BOUND + 10) == -7, "the mapping still served bytes"  # SIGBUS
            holder.seek(0)
            _assert_eio(lambda: holder.read(4096))  # the open handle too, its cached page dropped
    finally:
        mapper.kill()
        mapper.wait(10)


def _cache(args: list[str], cache_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scicatfs", "cache", *args, "--cache-dir", str(cache_dir)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.allow_log(
    r"ERROR scicatfs\.cache: checksum mismatch for h5integrity/wrong badsum\.bin: catalog says md5:[0-9a-f]{32}, server sent md5:[0-9a-f]{32}; cached copy discarded",
    r"ERROR scicatfs\.cache: h5integrity/wrong short\.bin: catalog says 3145728 bytes, server has 3144728 ",
)
def test_forget_and_the_retry_time_bring_a_repaired_file_back(make_mount) -> None:  # type: ignore[no-untyped-def]
    catalog = _catalog()
    mount: Mount = make_mount(catalog, args=["--retry-failed", "3"])
    _corrupt(mount, catalog)
    dataset = mount.dataset(PID)
    _assert_eio(lambda: _plain_read(dataset / "badsum.bin"))
    _assert_eio(lambda: _plain_read(dataset / "short.bin"))

    # Repaired on the server: still EIO until the retry time, then verified before a byte is served.
    failed_at = time.monotonic()
    _repair(mount, catalog, "short.bin")
    _assert_eio(lambda: _plain_read(dataset / "short.bin"))
    time.sleep(max(0.0, 3.5 - (time.monotonic() - failed_at)))
    assert bounded(PROMPT, lambda: _plain_read(dataset / "short.bin")) == catalog.content(PID, "short.bin")
    assert "fetching h5integrity/wrong short.bin again to verify it" in mount.log_text()

    # Not repaired: the retry fails again, and the file stays failed for another period.
    time.sleep(3.5)
    _assert_eio(lambda: _plain_read(dataset / "badsum.bin"))
    _assert_eio(lambda: _plain_read(dataset / "badsum.bin"))

    # `cache forget` clears the failure at once.
    _repair(mount, catalog, "badsum.bin")
    forgotten = _cache(["forget", PID, "badsum.bin"], mount.cache_dir)
    assert forgotten.returncode == 0, forgotten.stderr
    assert "cleared 1 failed verifications" in forgotten.stdout
    assert bounded(PROMPT, lambda: _plain_read(dataset / "badsum.bin")) == catalog.content(PID, "badsum.bin")
    missing = _cache(["forget", "no/such-dataset"], mount.cache_dir)
    assert missing.returncode == 1 and "not in the cache" in missing.stderr


def _wait_complete(cache_dir: Path, name: str, catalog: Catalog) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with BlobStore(cache_dir, 1 << 40) as store:
            info = store.where(PID, name)
            if info is not None and info.complete:
                return
        time.sleep(0.1)
    raise AssertionError(f"{name} not complete in the cache after 30 s")


@pytest.mark.slow
def test_cache_verify_beside_a_reader_changes_no_byte(make_mount) -> None:  # type: ignore[no-untyped-def]
    catalog = Catalog.load_default()
    catalog.add_dataset(dataset_record(PID, FOLDER), [{"path": "big.bin", "size": 200 * MiB}], chk_alg="md5")
    mount: Mount = make_mount(catalog)
    path = mount.dataset(PID) / "big.bin"
    expected = hashlib.sha256(catalog.content(PID, "big.bin")).hexdigest()
    assert hashlib.sha256(bounded(120, lambda: _plain_read(path))).hexdigest() == expected
    _wait_complete(mount.cache_dir, "big.bin", catalog)

    digests: list[str] = []

    def reader() -> None:
        for _ in range(3):  # through the filesystem, not the page cache
            digests.append(hashlib.sha256(read_uncached(path)).hexdigest())

    reading = Background(reader)
    verified = []
    while not reading.done:
        verified.append(_cache(["verify"], mount.cache_dir))
    reading.outcome(120).unwrap()
    assert digests == [expected] * 3
    assert verified and all(run.returncode == 0 and "0 bad" in run.stdout for run in verified), verified[-1]


@pytest.mark.allow_log(r"ERROR scicatfs\.cache: the cached copy of md5:[0-9a-f]{32}:1048576 is damaged: expected md5:[0-9a-f]{32}, found md5:[0-9a-f]{32}")
def test_cache_verify_finds_damage_in_a_file_a_mount_has_open(make_mount) -> None:  # type: ignore[no-untyped-def]
    catalog = _catalog()
    mount: Mount = make_mount(catalog)
    path = mount.dataset(PID) / "good.bin"
    content = catalog.content(PID, "good.bin")
    assert _plain_read(path) == content
    _wait_complete(mount.cache_dir, "good.bin", catalog)
    with BlobStore(mount.cache_dir, 1 << 40) as store:
        info = store.where(PID, "good.bin")
        assert info is not None
    with open(info.file, "r+b") as blob:  # the disk under the cache goes bad
        blob.seek(1000)
        blob.write(b"\0" * 10)

    with open(path, "rb") as holder:
        # Until something verifies the cached copy again, the damage is unknown: a read gets the
        # page cache's bytes, or (once memory pressure evicted them) the damaged disk's.
        holder.read(4096)
        result = _cache(["verify"], mount.cache_dir)
        assert result.returncode == 1, result
        assert "open in a running mount: left in place" in result.stdout
        assert f"used by: {PID} good.bin" in result.stdout
        with open(info.file, "rb") as blob:
            assert os.fstat(blob.fileno()).st_size == len(content)  # verify did not touch the open blob

        deadline = time.monotonic() + POLL_BOUND
        while True:  # the mount learns of the failure from the index, and drops the pages it cached
            holder.seek(0)
            try:
                data = holder.read(4096)
            except OSError as error:
                assert error.errno == errno.EIO
                break
            assert len(data) == 4096
            assert time.monotonic() < deadline, "the open handle still serves the damaged file"
            time.sleep(0.1)

    # The damage was local: the next open fetches the file again and verifies it before serving it
    # (EIO until that verification is done, if it takes longer than the open's wait on a busy machine).
    deadline = time.monotonic() + 2 * PROMPT
    while True:
        outcome = Background(lambda: _plain_read(path)).outcome(PROMPT)
        if outcome.error is None:
            assert outcome.value == content
            break
        assert isinstance(outcome.error, OSError) and outcome.error.errno == errno.EIO, outcome.error
        assert time.monotonic() < deadline, "the repaired file never became readable"
        time.sleep(0.5)


def test_a_stalled_eviction_does_not_stall_the_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``_lock`` is never held across unlink: an evictor stuck on a slow disk blocks no one else."""
    import pathlib

    def spec(index: int, data: bytes) -> FileSpec:
        digest = Checksum("md5", hashlib.md5(data).hexdigest())
        return FileSpec("p", f"f{index}", f"sftp:///d/f{index}", f"/d/f{index}", len(data), 0.0, digest)

    with BlobStore(tmp_path / "cache", budget=1 << 30, chunk_size=4096, block_size=4096) as store:
        blobs = [os.urandom(4096) for _ in range(3)]
        for index, data in enumerate(blobs):
            blob = store.open_blob(spec(index, data))
            store.write_blocks(blob, 0, data)
            store.release_blob(blob)
        unlinking, release = threading.Event(), threading.Event()
        real_unlink = pathlib.Path.unlink

        def slow_unlink(self: pathlib.Path, missing_ok: bool = False) -> None:
            unlinking.set()
            release.wait(10)
            real_unlink(self, missing_ok=missing_ok)

        monkeypatch.setattr(pathlib.Path, "unlink", slow_unlink)
        evicting = Background(lambda: store.evict(0))
        try:
            assert unlinking.wait(10)
            other = os.urandom(4096)
            quick = Background(lambda: (store.cached_bytes(spec(0, blobs[0])), store.usage(), store.open_blob(spec(9, other))))
            outcome = quick.outcome(5)
            assert outcome.error is None and outcome.elapsed < 1.0, outcome
            store.write_blocks(outcome.value[2], 0, other)
            store.release_blob(outcome.value[2])
        finally:
            release.set()
        assert evicting.outcome(10).unwrap().freed >= 3 * 4096
