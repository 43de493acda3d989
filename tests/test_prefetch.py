"""``scicatfs prefetch`` end to end: real catalog server, real OpenSSH sshd, real cache, real mounts.

The command runs as a subprocess (as a user runs it), so interrupting it is a
real SIGINT or SIGKILL. To interrupt at a known point, the test waits for the
first "file done" line and then freezes the sshd processes serving the
prefetch (SIGSTOP) before signalling it: the cache then holds some files,
maybe part of one, and certainly not all.
"""

from __future__ import annotations

import io
import os
import pty
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from scicatfs.cache.store import BlobStore, FileSpec
from scicatfs.catalog.models import Checksum
from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.server import CatalogServer
from scicatfs.progress import Progress, human_duration, human_size
from tests.support.checklogs import LogChecker
from tests.support.mounts import DEMO_USER, Mount
from tests.support.sshd import OpenSSHServer

MiB = 1024 * 1024
BIG = "prefetch/big-0001"
FILES = {f"raw/scan_{n:02d}.dat": 6 * MiB + n for n in range(5)} | {"notes.txt": 100, "empty.txt": 0}
RUN_TIMEOUT = 60


def big_catalog() -> Catalog:
    """The demo catalog plus one multi-chunk dataset (md5 checksums, one file without)."""
    catalog = Catalog.load_default()
    catalog.add_dataset(
        {
            "pid": BIG, "owner": "Ponder Stibbons", "ownerEmail": "p.stibbons@uu.am", "ownerGroup": "uu",
            "contactEmail": "p.stibbons@uu.am", "principalInvestigators": ["p.stibbons@uu.am"],
            "creationLocation": "UnseenUniversity", "sourceFolder": "/prefetch/big",
            "creationTime": "2024-01-01T00:00:00.000Z", "datasetName": "big",
        },
        [{"path": path, "size": size} for path, size in FILES.items()],
        chk_alg="md5",
    )  # fmt: skip
    return catalog


@pytest.fixture(scope="module")
def catalog(sshd: OpenSSHServer) -> Catalog:
    catalog = big_catalog()
    catalog.materialize(sshd.root)
    return catalog


@pytest.fixture
def server(catalog: Catalog, make_catalog_server: Callable[..., CatalogServer]) -> CatalogServer:
    return make_catalog_server(catalog)


@dataclass
class Prefetch:
    """Runs ``scicatfs prefetch`` against the test servers with one cache directory."""

    server: CatalogServer
    sshd: OpenSSHServer
    cache: Path
    password: Path

    def argv(self, *args: str) -> list[str]:
        s = self.sshd
        return [
            sys.executable, "-m", "scicatfs", "prefetch", *args,
            "--url", self.server.url, "--username", DEMO_USER, "--password-file", str(self.password),
            "--sftp-host", s.host, "--sftp-port", str(s.port), "--sftp-user", s.username,
            "--identity-file", str(s.client_key), "--known-hosts", str(s.known_hosts),
            "--cache-dir", str(self.cache), "--cache-size", "1G",
        ]  # fmt: skip

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=RUN_TIMEOUT)

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.fixture
def prefetch(server: CatalogServer, sshd: OpenSSHServer, catalog: Catalog, tmp_path: Path) -> Prefetch:
    password = tmp_path / "password"
    password.write_text(catalog.users[DEMO_USER].password)
    password.chmod(0o600)
    return Prefetch(server, sshd, tmp_path / "cache", password)


def transferred(stderr: str) -> int:
    match = re.search(r"\((\d+) bytes\) transferred", stderr)  # by us, or by the mount
    assert match, stderr
    return int(match.group(1))


def cached(cache: Path, pid: str = BIG) -> dict[str, tuple[int, bool]]:
    """path -> (bytes present, complete) for every file of ``pid`` the index knows."""
    with BlobStore(cache, 1 << 40) as store:
        return {e.path: (e.present_bytes, e.complete) for e in store.entries() if e.pid == pid}


def assert_exact(cache: Path, catalog: Catalog, paths: list[str]) -> None:
    """Every non-empty file of ``paths`` is complete and byte-exact (empty files need no blob)."""
    with BlobStore(cache, 1 << 40) as store:
        for path in (p for p in paths if FILES[p]):
            info = store.where(BIG, path)
            assert info is not None and info.complete, path
            assert info.file.read_bytes() == catalog.content(BIG, path), path


@pytest.fixture
def frozen(sshd: OpenSSHServer) -> Iterator[Callable[[], None]]:
    """``freeze()`` stops the sshd connection processes; they always continue after the test."""
    yield lambda: sshd.signal_connections(signal.SIGSTOP)
    sshd.signal_connections(signal.SIGCONT)


def test_prefetch_fetches_exact_bytes_once(prefetch: Prefetch, catalog: Catalog) -> None:
    first = prefetch.run(BIG)
    assert first.returncode == 0, first.stderr
    total = sum(FILES.values())
    # every byte once, plus the one byte asked beyond each file's last chunk (EOF check)
    assert total <= transferred(first.stderr) <= total + len(FILES)
    assert_exact(prefetch.cache, catalog, list(FILES))
    assert "7/7 files" in first.stderr  # plain lines: stderr is no terminal

    again = prefetch.run(BIG)
    assert again.returncode == 0, again.stderr
    assert transferred(again.stderr) == 0
    assert "7 files (30.0 MiB) cached" in again.stderr


def test_globs_select_files(prefetch: Prefetch, catalog: Catalog) -> None:
    result = prefetch.run(BIG, "raw/scan_0[01].dat", "*.txt")
    assert result.returncode == 0, result.stderr
    wanted = ["raw/scan_00.dat", "raw/scan_01.dat", "notes.txt", "empty.txt"]
    assert_exact(prefetch.cache, catalog, wanted)
    assert set(cached(prefetch.cache)) == set(wanted) - {"empty.txt"}

    nothing = prefetch.run(BIG, "*.nxs")
    assert nothing.returncode == 1
    assert "no file of the dataset matches '*.nxs'" in nothing.stderr


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_prefetch_resumes(
    prefetch: Prefetch, catalog: Catalog, frozen: Callable[[], None], stop: signal.Signals
) -> None:
    process = prefetch.start(BIG, "--jobs", "1")
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "files" in line and ": raw/" in line:  # the first big file is done
                break
        frozen()
        process.send_signal(stop)
        rest = process.communicate(timeout=RUN_TIMEOUT)[1]
    finally:
        process.kill()
        process.wait()
    if stop == signal.SIGINT:
        assert process.returncode == 130, rest
        # (asyncssh may log "Task exception was never retrieved" for reads cut
        # off by the shutdown: transfer-layer noise, reported, not checked here)
        lines = rest.splitlines()
        assert "scicatfs: prefetch interrupted; what was fetched stays cached, run it again to continue" in lines
    prefetch.sshd.signal_connections(signal.SIGCONT)

    present = sum(size for size, _ in cached(prefetch.cache).values())
    assert 6 * MiB <= present < sum(FILES.values())  # some, not all
    with BlobStore(prefetch.cache, 1 << 40) as store:
        assert store.verify() == []  # what is marked complete is right
    # The re-run fetches only unrecorded chunks, so a wrongly recorded one
    # would surface below as wrong bytes (and a checksum failure).
    resumed = prefetch.run(BIG)
    assert resumed.returncode == 0, resumed.stderr
    missing = sum(FILES.values()) - present
    assert missing <= transferred(resumed.stderr) <= missing + len(FILES)
    assert_exact(prefetch.cache, catalog, list(FILES))


def test_prefetch_while_mounted_shares_the_cache(
    prefetch: Prefetch, catalog: Catalog, make_mount: Callable[..., Mount]
) -> None:
    mount = make_mount(catalog, cache_dir=prefetch.cache, server=prefetch.server)
    first = "raw/scan_03.dat"
    assert (mount.dataset(BIG) / first).read_bytes() == catalog.content(BIG, first)

    result = prefetch.run(BIG)
    assert result.returncode == 0, result.stderr
    missing = sum(FILES.values()) - FILES[first]
    assert missing <= transferred(result.stderr) <= missing + len(FILES)
    assert_exact(prefetch.cache, catalog, list(FILES))


def test_prefetch_through_a_mount(catalog: Catalog, make_mount: Callable[..., Mount], tmp_path: Path) -> None:
    mount = make_mount(catalog, cache_dir=tmp_path / "cache")
    argv = [sys.executable, "-m", "scicatfs", "prefetch", "--mount", str(mount.path), BIG, "raw/*"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr + mount.log_text()
    assert "5/5 files" in result.stderr
    moved = transferred(result.stderr)
    wanted = sum(size for path, size in FILES.items() if path.startswith("raw/"))
    assert wanted <= moved <= wanted + 4 * MiB  # + at most one racing direct read per file
    state = cached(mount.cache_dir)
    assert {path for path, (size, _) in state.items() if size == FILES[path]} == {p for p in FILES if p.startswith("raw/")}

    again = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert again.returncode == 0
    assert "5/5 files" not in again.stderr  # nothing read: every file was complete
    assert "5 files (30.0 MiB) cached, 0 B (0 bytes) transferred by the mount meanwhile" in again.stderr

    with_url = subprocess.run([*argv, "--url", "http://x"], capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert with_url.returncode == 1 and "do not combine" in with_url.stderr

    unknown = subprocess.run([*argv[:-2], "no/such-pid"], capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert unknown.returncode == 1
    assert unknown.stderr == f"scicatfs: no dataset 'no/such-pid' in {mount.path}\n"


def test_clear_errors(prefetch: Prefetch, tmp_path: Path, log_checker: LogChecker) -> None:
    unknown = prefetch.run("no/such-dataset")
    assert unknown.returncode == 1
    log_checker.check_output(unknown.stderr, "stderr")
    assert "no/such-dataset" in unknown.stderr

    not_mounted = subprocess.run(
        [sys.executable, "-m", "scicatfs", "prefetch", "--mount", str(tmp_path), BIG],
        capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert not_mounted.returncode == 1 and "is not a scicatfs mount" in not_mounted.stderr

    small = subprocess.run(
        [*prefetch.argv(BIG)[:-1], "10M"], capture_output=True, text=True, timeout=RUN_TIMEOUT
    )
    assert small.returncode == 1 and "cache budget is 10.0 MiB" in small.stderr

    no_url = subprocess.run(
        [sys.executable, "-m", "scicatfs", "prefetch", BIG], capture_output=True, text=True, timeout=RUN_TIMEOUT
    )
    assert no_url.returncode == 2 and "--url" in no_url.stderr


def test_progress_bar_on_a_terminal(prefetch: Prefetch) -> None:
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(prefetch.argv(BIG), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal)
        os.close(terminal)
        output = b""
        while chunk := _read_pty(controller):
            output += chunk
        assert process.wait(timeout=RUN_TIMEOUT) == 0
    finally:
        os.close(controller)
    text = output.decode()
    assert "\r\x1b[K[####################] 100%" in text
    assert "7/7 files" in text and "MiB/s" in text


def _read_pty(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the other side closed
        return b""


# -- the progress display itself -------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_plain_lines_rate_and_eta() -> None:
    clock, out = Clock(), io.StringIO()
    progress = Progress(100 * MiB, 4, out, done=20 * MiB, files_done=1, tty=False, interval=10, clock=clock)
    clock.now = 4
    progress.add(40 * MiB)  # no line yet: less than the interval, no file finished
    assert out.getvalue() == ""
    assert progress.rate() == 10 * MiB  # only what moved in this run
    assert progress.eta() == 4
    progress.finished("a.dat")
    assert out.getvalue() == "prefetch: 2/4 files, 60.0 MiB of 100.0 MiB: a.dat\n"
    clock.now = 20
    progress.add(1)
    assert out.getvalue().splitlines()[-1].startswith("prefetch: 2/4 files, 60.0 MiB of 100.0 MiB, 2.0 MiB/s, ETA 20 s")
    progress.failed("b.dat", "checksum mismatch")
    assert out.getvalue().endswith("prefetch: FAILED b.dat: checksum mismatch\n")


def test_progress_bar_redraws_in_place() -> None:
    clock, out = Clock(), io.StringIO()
    progress = Progress(10 * MiB, 2, out, tty=True, clock=clock)
    clock.now = 1
    progress.add(5 * MiB)
    assert out.getvalue() == "\r\x1b[K[##########..........]  50%  5.0 MiB of 10.0 MiB  5.0 MiB/s  ETA 1 s  0/2 files"
    progress.failed("x", "gone")
    assert "\r\x1b[Kprefetch: FAILED x: gone\n" in out.getvalue()
    progress.close()
    assert out.getvalue().endswith("\n")


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (10 * 1024**3, "10.0 GiB"), (2**70, "1024.0 EiB")],
)
def test_human_size(count: int, text: str) -> None:
    assert human_size(count) == text


@pytest.mark.parametrize(("seconds", "text"), [(0, "0 s"), (59.6, "1 min 0 s"), (75, "1 min 15 s"), (7300, "2 h 1 min")])
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


@pytest.mark.allow_log(
    r"stderr: scicatfs: WARNING: fetching prefetch/big-0001 (raw/scan_00\.dat|notes\.txt) failed \(attempt [12] of 2\):"
    r" 127\.0\.0\.1:1: cannot connect: \[Errno 111\]")
def test_file_server_down(prefetch: Prefetch, log_checker: LogChecker) -> None:
    argv = prefetch.argv(BIG, "raw/scan_00.dat", "notes.txt")
    argv[argv.index("--sftp-port") + 1] = "1"  # nothing listens there
    result = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 1, result.stderr
    failed = [line for line in result.stderr.splitlines() if line.startswith("prefetch: FAILED ")]
    assert sorted(line.split(":")[1] for line in failed) == [" FAILED notes.txt", " FAILED raw/scan_00.dat"]
    assert "scicatfs: 2 of 2 files could not be cached, 0 B (0 bytes) transferred" in result.stderr
    log_checker.check_output(result.stderr, "stderr")
    assert cached(prefetch.cache) == {"notes.txt": (0, False), "raw/scan_00.dat": (0, False)}


def test_unverified_complete_file_is_verified_not_refetched(prefetch: Prefetch, catalog: Catalog) -> None:
    """All chunks on disk but no verification yet (a kill -9 in between): hash, do not fetch."""
    entry = next(f for f in catalog.files(BIG) if f["path"] == "notes.txt")
    spec = FileSpec(BIG, "notes.txt", "sftp://127.0.0.1/prefetch/big/notes.txt", "/prefetch/big/notes.txt", 100, 0.0, Checksum("md5", entry["chk"]))
    with BlobStore(prefetch.cache, 1 << 30) as store:
        blob = store.open_blob(spec)
        store.write_chunk(blob, 0, catalog.content(BIG, "notes.txt"))
        store.release_blob(blob)
    assert cached(prefetch.cache) == {"notes.txt": (100, False)}

    result = prefetch.run(BIG, "notes.txt")
    assert result.returncode == 0, result.stderr
    assert transferred(result.stderr) == 0
    assert cached(prefetch.cache) == {"notes.txt": (100, True)}
