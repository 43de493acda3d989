"""scicatfs against the tools users would otherwise pick, on one server, in one run.

    python -m tests.benchmarks.compare [--size 1G] [--runs 3] [--rtt 0,20,50] [--json out.json]

Sets up the project's catalog server, a real OpenSSH sshd on 127.0.0.1
(tests/support/sshd.py) holding one random file of ``--size`` and a dataset of
``--meta-files`` small files, then measures:

1. cold sequential read of the whole file: scicatfs (empty cache, fresh mount),
   sshfs (fresh mount), OpenSSH ``sftp get`` and Scitacean ``download_files``;
2. time to the first 4 KiB at offset size/2, cold: scicatfs, sshfs, and
   Scitacean (catalog lookup + whole download + read, from the runs of 1);
3. warm sequential read: scicatfs on a fully cached file (first open after a
   remount, then re-read), a plain read of the cached blob file, and sshfs
   ``-o kernel_cache`` re-reading what it just read;
4. random 4 KiB reads (fio, else a Python loop), cold then warm (after one
   full read through the same mount): scicatfs vs sshfs;
5. ``ls -lR`` and ``find | wc -l`` over the many-file dataset, first and
   second time on a fresh mount: scicatfs vs sshfs on the same tree;
6. peak RSS (VmHWM) of every scicatfs process.

Measures 1 and 2 repeat for each ``--rtt`` above 0 with every client going
through ``tests/benchmarks/delay_proxy.py`` (run as a separate process, so its
CPU use does not share a GIL with the readers here). Tools alternate run by
run (A B C A B C ...) so that drift on the machine hits all of them alike;
every figure is a median with its min-max. The page cache is dropped before
every cold run when /proc/sys/vm/drop_caches is writable (root); otherwise
only fresh mounts and caches separate the runs, and the output says so.

Needs root (sshd with a chroot, drop_caches), sshd, sftp, sshfs, fusermount3;
fio is optional. Not part of the test suite's pass/fail: the smoke test
(tests/test_benchmark_smoke.py) only keeps it from rotting.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import paramiko
from scitacean import Client
from scitacean.transfer.sftp import SFTPFileTransfer

import scicatfs
from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.server import CatalogServer
from scicatfs.mountpoint import find_mount
from tests.support.mounts import stop_process, unmount_quietly, wait_for_mount
from tests.support.sshd import OpenSSHServer

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

USER, PASSWORD, GROUP = "bench", "bench-password", "bench"
BIG_NAME = "random.bin"
META_FILE_SIZE = 256
META_FILES_PER_DIR = 100

PROBE_SIZE = 4 * KiB
READ_BUFFER = 1 * MiB
FIO = Path("/usr/bin/fio")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
#: Tools compared at added RTT (Scitacean's paramiko download is measured at 0 ms only).
MOUNTS = ("scicatfs", "sshfs")
COLD_TOOLS = (*MOUNTS, "sftp", "scitacean")
LATENCY_TOOLS = ("scicatfs", "sshfs", "sftp")
MOUNT_TIMEOUT = 60.0
COMMAND_TIMEOUT = 120.0
#: Slowest transfer rate that still counts as progress (sshfs at +50 ms RTT is far above it).
SLOWEST_RATE = 1 * MiB
#: At most this many entries scicatfs shows in a dataset beyond its files and directories.
SCICATFS_EXTRA_ENTRIES = 5

T = TypeVar("T")


class BenchmarkError(RuntimeError):
    """A tool failed or misbehaved; the message names it."""


# -- numbers -------------------------------------------------------------------------------


@dataclass
class Series:
    """Repeated measurements of one figure."""

    unit: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "median": self.median,
            "min": min(self.values),
            "max": max(self.values),
            "runs": self.values,
        }

    def __str__(self) -> str:
        if len(self.values) == 1:
            return f"{_fmt(self.median)} {self.unit}"
        return (
            f"{_fmt(self.median)} {self.unit} "
            f"({_fmt(min(self.values))}-{_fmt(max(self.values))})"
        )


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def parse_size(text: str) -> int:
    """``"1G"`` -> 1073741824; accepts K, M, G suffixes (binary) or plain bytes."""
    units = {"K": KiB, "M": MiB, "G": GiB}
    number, unit = (text[:-1], units[text[-1].upper()]) if text[-1:].upper() in units else (text, 1)
    try:
        size = int(float(number) * unit)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256M, 1G)") from None
    if size < 2 * PROBE_SIZE:
        raise argparse.ArgumentTypeError(f"size must be at least {2 * PROBE_SIZE} bytes")
    return size


def parse_rtts(text: str) -> list[int]:
    """``"0,20,50"`` -> [0, 20, 50] (milliseconds; 0 is always measured first)."""
    try:
        rtts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of milliseconds: {text!r}") from None
    if not rtts or rtts[0] < 0:
        raise argparse.ArgumentTypeError(f"RTTs must be >= 0 ms: {text!r}")
    return rtts if rtts[0] == 0 else [0, *rtts]


# -- helpers that cannot hang --------------------------------------------------------------


def bounded(action: Callable[[], T], timeout: float, what: str) -> T:
    """Run ``action`` in a thread; raise instead of waiting past ``timeout``.

    A read from a wedged FUSE mount blocks in the kernel; the caller's
    ``finally`` then unmounts lazily, which fails the read and frees the thread.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(action())
        except BaseException as error:  # handed to the caller below
            failure.append(error)

    thread = threading.Thread(target=run, name=what, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise BenchmarkError(f"{what} did not finish within {timeout:.0f} s")
    if failure:
        raise failure[0]
    return outcome[0]


def run_command(argv: list[str], timeout: float = COMMAND_TIMEOUT, **kwargs: Any) -> str:
    """Run a command to completion; its stdout, or BenchmarkError with its stderr."""
    try:
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, **kwargs
        )
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"{shlex.join(argv)} timed out after {timeout:.0f} s") from None
    if result.returncode != 0:
        raise BenchmarkError(
            f"{shlex.join(argv)} exited with {result.returncode}: {result.stderr.strip()}"
        )
    return result.stdout


def transfer_timeout(size: int) -> float:
    """How long moving ``size`` bytes may take before the tool counts as hung."""
    return COMMAND_TIMEOUT + size / SLOWEST_RATE


def drop_caches() -> bool:
    """Drop the page cache (and dentries/inodes); False where not permitted."""
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    return True


def read_whole(path: Path, expected: int) -> float:
    """Read ``path`` sequentially in 1 MiB requests; seconds taken."""

    def read() -> float:
        buffer = bytearray(READ_BUFFER)
        total = 0
        start = time.perf_counter()
        with open(path, "rb", buffering=0) as file:
            while count := file.readinto(buffer):
                total += count
        elapsed = time.perf_counter() - start
        if total != expected:
            raise BenchmarkError(f"read {total} bytes from {path}, expected {expected}")
        return elapsed

    return bounded(read, transfer_timeout(expected), f"reading {path}")


def read_probe(path: Path, offset: int) -> tuple[float, bytes]:
    """Open ``path`` and read 4 KiB at ``offset``: (seconds including open, bytes)."""

    def probe() -> tuple[float, bytes]:
        start = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.pread(fd, PROBE_SIZE, offset)
        finally:
            os.close(fd)
        return time.perf_counter() - start, data

    return bounded(probe, COMMAND_TIMEOUT, f"reading 4 KiB of {path}")


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM of a live process in MiB (None once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / KiB
    return None


# -- the test bed ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetPlace:
    """A dataset's PID (its directory in scicatfs) and its sourceFolder (what sshfs mounts)."""

    pid: str
    folder: str


BIG = DatasetPlace("20.500.12269/bench-random-file", "/bench/big")
MANY = DatasetPlace("20.500.12269/bench-many-files", "/bench/many")


@dataclass(frozen=True)
class Endpoint:
    """Where SSH clients connect: sshd itself, or a delay proxy in front of it."""

    host: str
    port: int
    known_hosts: Path
    rtt_ms: int


class TestBed:
    """sshd, catalog server, data files, and the tools pointed at them."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.size: int = args.size
        self.workdir = workdir
        self.sshd = OpenSSHServer()
        self.catalog = Catalog()
        self.server: CatalogServer | None = None
        self.can_drop_caches = drop_caches()
        self.peak_rss: dict[str, float] = {}
        #: Cache directory of a scicatfs mount that read the whole file (set by measure 1).
        self.warm_cache: Path | None = None
        self.measure = "setup"
        self._counter = 0
        self._password_file = workdir / "password"

    # lifecycle

    def __enter__(self) -> TestBed:
        try:
            self.sshd.start()
            self._write_big_file()
            self._write_many_files()
            self.catalog.add_user(USER, PASSWORD, [GROUP], "bench@example.org")
            self.server = CatalogServer(self.catalog).start()
            self._password_file.touch(mode=0o600)
            self._password_file.write_text(PASSWORD + "\n")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.sshd.close()

    def _record(self, place: DatasetPlace, files: list[dict[str, Any]], **extra: Any) -> None:
        record = {
            "pid": place.pid,
            "datasetName": place.pid.rsplit("/", 1)[-1],
            "type": "raw",
            "owner": "Bench Mark",
            "ownerEmail": "bench@example.org",
            "contactEmail": "bench@example.org",
            "ownerGroup": GROUP,
            "accessGroups": [],
            "principalInvestigators": ["bench@example.org"],
            "creationLocation": "loopback",
            "sourceFolder": place.folder,
            "creationTime": "2026-01-01T00:00:00.000Z",
        }
        self.catalog.add_dataset(record, files, **extra)

    def _write_big_file(self) -> None:
        """Random bytes (incompressible), md5 computed on the way like an ingestor would."""
        path = self.sshd.local_path(f"{BIG.folder}/{BIG_NAME}")
        path.parent.mkdir(parents=True)
        digest = hashlib.md5()
        with path.open("wb") as out:
            for start in range(0, self.size, 16 * MiB):
                block = os.urandom(min(16 * MiB, self.size - start))
                digest.update(block)
                out.write(block)
        entry = {"path": BIG_NAME, "size": self.size, "chk": digest.hexdigest(),
                 "time": "2026-01-01T00:00:00.000Z"}
        self._record(BIG, [entry], chk_alg="md5")

    def _write_many_files(self) -> None:
        files = []
        root = self.sshd.local_path(MANY.folder)
        for index in range(self.args.meta_files):
            relative = f"d{index // META_FILES_PER_DIR:03d}/f{index:05d}.dat"
            target = root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(random.randbytes(META_FILE_SIZE))
            files.append({"path": relative, "size": META_FILE_SIZE,
                          "time": "2026-01-01T00:00:00.000Z"})
        self._record(MANY, files, blocks=max(1, len(files) // 1000))

    def fresh_dir(self, name: str) -> Path:
        self._counter += 1
        path = self.workdir / f"{name}-{self._counter}"
        path.mkdir()
        return path

    def cold(self) -> None:
        """Between cold runs: empty the page cache if permitted."""
        if self.can_drop_caches:
            drop_caches()

    def check_probe(self, data: bytes, offset: int, tool: str) -> None:
        with self.sshd.local_path(f"{BIG.folder}/{BIG_NAME}").open("rb") as original:
            original.seek(offset)
            if data != original.read(PROBE_SIZE):
                raise BenchmarkError(f"{tool} returned wrong bytes at offset {offset}")

    # endpoints

    @property
    def direct(self) -> Endpoint:
        """sshd itself, no added latency."""
        return Endpoint(self.sshd.host, self.sshd.port, self.sshd.known_hosts, 0)

    @contextlib.contextmanager
    def endpoint(self, rtt_ms: int) -> Iterator[Endpoint]:
        """sshd directly at 0 ms, else a delay proxy process with its own known_hosts."""
        if rtt_ms == 0:
            yield self.direct
            return
        proxy = subprocess.Popen(
            [sys.executable, "-m", "tests.benchmarks.delay_proxy",
             f"{self.sshd.host}:{self.sshd.port}", "--rtt-ms", str(rtt_ms)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            line = bounded(proxy.stdout.readline, 30, "starting the delay proxy")  # type: ignore[union-attr]
            if not line.startswith("127.0.0.1:"):
                raise BenchmarkError(f"delay proxy did not start: {line!r}")
            port = int(line.split()[0].rsplit(":", 1)[1])
            known_hosts = self.workdir / f"known_hosts-{port}"
            key = self.sshd.known_hosts.read_text().split(None, 1)[1]
            known_hosts.write_text(f"[{self.sshd.host}]:{port} {key}")
            yield Endpoint(self.sshd.host, port, known_hosts, rtt_ms)
        finally:
            proxy.terminate()
            stop_process(proxy)

    def ssh_options(self, endpoint: Endpoint) -> list[str]:
        """OpenSSH client options (sftp, sshfs's ssh) for ``endpoint``."""
        return [
            f"IdentityFile={self.sshd.client_key}", "IdentitiesOnly=yes",
            f"UserKnownHostsFile={endpoint.known_hosts}", "StrictHostKeyChecking=yes",
            "BatchMode=yes", f"Port={endpoint.port}",
        ]  # fmt: skip

    # tools

    @contextlib.contextmanager
    def view(
        self,
        tool: str,
        endpoint: Endpoint,
        place: DatasetPlace,
        *,
        cache_dir: Path | None = None,
        sshfs_options: tuple[str, ...] = (),
    ) -> Iterator[Path]:
        """The dataset's directory as ``tool`` shows it, on a fresh mount.

        scicatfs mounts the catalog and gets an empty cache unless ``cache_dir``
        is given (a cache made here is deleted afterwards); sshfs mounts the
        dataset's sourceFolder. Both are unmounted on the way out.
        """
        if tool == "sshfs":
            with self.sshfs(endpoint, place.folder, *sshfs_options) as path:
                yield path
            return
        cache = cache_dir if cache_dir is not None else self.fresh_dir("scicatfs-cache")
        try:
            with self.scicatfs(endpoint, cache) as path:
                yield path / place.pid
        finally:
            if cache_dir is None:
                shutil.rmtree(cache, ignore_errors=True)

    def keep_warm_cache(self, cache_dir: Path) -> None:
        """Remember a cache holding the whole big file (dropping the previous one)."""
        if self.warm_cache is not None:
            shutil.rmtree(self.warm_cache, ignore_errors=True)
        self.warm_cache = cache_dir

    @contextlib.contextmanager
    def scicatfs(self, endpoint: Endpoint, cache_dir: Path) -> Iterator[Path]:
        """``scicatfs mount --foreground`` as a child process; unmounted on the way out."""
        assert self.server is not None
        mountpoint = self.fresh_dir("scicatfs-mnt")
        log = mountpoint.with_suffix(".log")
        argv = [
            sys.executable, "-m", "scicatfs", "mount", str(mountpoint),
            "--url", self.server.url, "--username", USER, "--password-file", str(self._password_file),
            "--sftp-host", endpoint.host, "--sftp-port", str(endpoint.port),
            "--sftp-user", self.sshd.username, "--identity-file", str(self.sshd.client_key),
            "--known-hosts", str(endpoint.known_hosts), "--cache-dir", str(cache_dir),
            "--cache-size", str(max(4 * self.size, GiB)), "--foreground", "--log-level", "warning",
        ]  # fmt: skip
        with open(log, "wb") as log_file:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
            )
        try:
            wait_for_mount(mountpoint, process, log, timeout=MOUNT_TIMEOUT)
            yield mountpoint
            self._note_rss(process.pid)
        finally:
            unmount_quietly(mountpoint)
            stop_process(process)

    def _note_rss(self, pid: int) -> None:
        rss = peak_rss_mib(pid)
        if rss is not None:
            self.peak_rss[self.measure] = max(rss, self.peak_rss.get(self.measure, 0.0))

    @contextlib.contextmanager
    def sshfs(self, endpoint: Endpoint, folder: str, *options: str) -> Iterator[Path]:
        """``sshfs -f`` of ``folder`` as a child process; unmounted on the way out."""
        mountpoint = self.fresh_dir("sshfs-mnt")
        argv = [
            "sshfs", "-f", f"{self.sshd.username}@{endpoint.host}:{folder}", str(mountpoint),
            "-o", ",".join([*self.ssh_options(endpoint), "ro", *options]),
        ]  # fmt: skip
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            deadline = time.monotonic() + MOUNT_TIMEOUT
            # Ready like scicatfs's mount is: in the mount table and its root answers.
            while not (_is_mounted(mountpoint, "fuse.sshfs") and _answers(mountpoint)):
                if process.poll() is not None:
                    stderr = process.stderr.read().decode(errors="replace")  # type: ignore[union-attr]
                    raise BenchmarkError(f"sshfs exited with {process.returncode}: {stderr}")
                if time.monotonic() > deadline:
                    raise BenchmarkError(f"sshfs did not mount within {MOUNT_TIMEOUT:.0f} s")
                time.sleep(0.02)
            yield mountpoint
        finally:
            unmount_quietly(mountpoint)
            stop_process(process)

    def sftp_get(self, endpoint: Endpoint) -> float:
        """OpenSSH ``sftp -b`` fetching the whole file to local disk; seconds."""
        target = self.workdir / "sftp-download.bin"
        batch = self.workdir / "sftp-batch"
        batch.write_text(f"get {BIG.folder}/{BIG_NAME} {target}\n")
        argv = ["sftp", "-q", "-b", str(batch)]
        for option in self.ssh_options(endpoint):
            argv += ["-o", option]
        try:
            start = time.perf_counter()
            run_command([*argv, f"{self.sshd.username}@{endpoint.host}"], transfer_timeout(self.size))
            elapsed = time.perf_counter() - start
            if target.stat().st_size != self.size:
                raise BenchmarkError(f"sftp wrote {target.stat().st_size} bytes, expected {self.size}")
            return elapsed
        finally:
            target.unlink(missing_ok=True)

    def scitacean_download(self, endpoint: Endpoint) -> tuple[float, float]:
        """Scitacean: (download seconds, seconds from catalog lookup to the probe's bytes)."""
        assert self.server is not None

        def connect(host: str, port: int) -> paramiko.SFTPClient:
            ssh = paramiko.SSHClient()
            ssh.load_host_keys(str(endpoint.known_hosts))
            ssh.set_missing_host_key_policy(paramiko.RejectPolicy())
            ssh.connect(host, port=port, username=self.sshd.username,
                        key_filename=str(self.sshd.client_key), allow_agent=False,
                        look_for_keys=False, timeout=30)  # fmt: skip
            return ssh.open_sftp()

        transfer = SFTPFileTransfer(host=endpoint.host, port=endpoint.port, connect=connect)
        client = Client.from_credentials(
            url=f"{self.server.url}/api/v3", username=USER, password=PASSWORD,
            file_transfer=transfer, allow_http=True,
        )  # fmt: skip
        target = self.fresh_dir("scitacean")

        def download() -> tuple[float, float]:
            start = time.perf_counter()
            dataset = client.get_dataset(BIG.pid)
            looked_up = time.perf_counter()
            downloaded = client.download_files(dataset, target=target)
            done = time.perf_counter()
            local = next(iter(downloaded.files)).local_path
            with open(local, "rb") as file:  # type: ignore[arg-type]
                file.seek(self.size // 2)
                self.check_probe(file.read(PROBE_SIZE), self.size // 2, "scitacean")
            return done - looked_up, time.perf_counter() - start

        try:
            return bounded(download, transfer_timeout(self.size), "Scitacean download_files")
        finally:
            shutil.rmtree(target, ignore_errors=True)

    def random_reads(self, path: Path) -> float:
        """IOPS of 4 KiB random reads on ``path`` for ``--fio-runtime`` seconds."""
        runtime = self.args.fio_runtime
        if FIO.exists():
            output = run_command(
                [str(FIO), "--name=randread", f"--filename={path}", "--readonly",
                 "--rw=randread", "--bs=4k", "--ioengine=psync", "--direct=0", "--invalidate=0",
                 f"--runtime={runtime}", "--time_based", "--output-format=json"],
                timeout=runtime + MOUNT_TIMEOUT,
            )  # fmt: skip
            return float(json.loads(output[output.index("{"):])["jobs"][0]["read"]["iops"])

        def loop() -> float:
            rng = random.Random(0)
            blocks = self.size // PROBE_SIZE
            count = 0
            fd = os.open(path, os.O_RDONLY)
            try:
                deadline = time.perf_counter() + runtime
                while time.perf_counter() < deadline:
                    os.pread(fd, PROBE_SIZE, rng.randrange(blocks) * PROBE_SIZE)
                    count += 1
            finally:
                os.close(fd)
            return count / runtime

        return bounded(loop, runtime + MOUNT_TIMEOUT, f"random reads of {path}")


def _answers(path: Path) -> bool:
    try:
        bounded(lambda: os.stat(path), 5, f"stat {path}")
    except (OSError, BenchmarkError):
        return False
    return True


def _is_mounted(path: Path, fstype: str) -> bool:
    entry = find_mount(path)
    return entry is not None and entry.fstype == fstype


def timed_shell(command: str) -> tuple[float, str]:
    """Run a shell pipeline (paths already quoted); (seconds, stdout)."""
    start = time.perf_counter()
    output = run_command(["bash", "-o", "pipefail", "-c", command])
    return time.perf_counter() - start, output


# -- the measures ----------------------------------------------------------------------------


def mib_per_s(size: int, seconds: float) -> float:
    return size / MiB / seconds


def measure_cold(bed: TestBed, rtt_ms: int) -> tuple[dict[str, Series], dict[str, Series]]:
    """Measures 1 and 2 at one RTT: throughput (MiB/s) and time to the probe (ms) by tool."""
    bed.measure = f"cold @{rtt_ms}ms"
    tools = COLD_TOOLS if rtt_ms == 0 else LATENCY_TOOLS
    throughput = {tool: Series("MiB/s") for tool in tools}
    first = {name: Series("ms") for name in
             (*MOUNTS, *(f"{tool} connected" for tool in MOUNTS), *(("scitacean",) if rtt_ms == 0 else ()))}
    with bed.endpoint(rtt_ms) as endpoint:
        for run in range(bed.args.runs):
            _progress(f"  run {run + 1} of {bed.args.runs}")
            for tool in tools:
                bed.cold()
                if tool in MOUNTS:
                    cache = bed.fresh_dir("scicatfs-cache")
                    with bed.view(tool, endpoint, BIG, cache_dir=cache) as directory:
                        seconds = read_whole(directory / BIG_NAME, bed.size)
                    if tool == "scicatfs" and rtt_ms == 0:
                        bed.keep_warm_cache(cache)
                    else:
                        shutil.rmtree(cache)
                elif tool == "sftp":
                    seconds = bed.sftp_get(endpoint)
                else:
                    seconds, to_probe = bed.scitacean_download(endpoint)
                    first[tool].values.append(to_probe * 1000)
                throughput[tool].values.append(mib_per_s(bed.size, seconds))
            for tool in MOUNTS:
                bed.cold()
                with bed.view(tool, endpoint, BIG) as directory:
                    # On a fresh mount (SSH connections still to be made), then at
                    # another cold offset once the connections are up.
                    for offset, series in ((bed.size // 2, first[tool]),
                                           (bed.size // 4, first[f"{tool} connected"])):
                        seconds, data = read_probe(directory / BIG_NAME, offset)
                        bed.check_probe(data, offset, tool)
                        series.values.append(seconds * 1000)
    return throughput, first


def measure_warm(bed: TestBed) -> dict[str, Series]:
    """Measure 3: reads of a file that is already local, in MiB/s."""
    bed.measure = "warm"
    if bed.warm_cache is None:
        raise BenchmarkError("the warm measure needs the cache left by a cold scicatfs run")
    blob = max((p for p in (bed.warm_cache / "blobs").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    names = ("scicatfs first open", "scicatfs re-read", "blob file", "sshfs kernel_cache re-read")
    results = {name: Series("MiB/s") for name in names}

    def add(name: str, path: Path) -> None:
        results[name].values.append(mib_per_s(bed.size, read_whole(path, bed.size)))

    for _ in range(bed.args.runs):
        bed.cold()
        with bed.view("scicatfs", bed.direct, BIG, cache_dir=bed.warm_cache) as directory:
            add("scicatfs first open", directory / BIG_NAME)
            add("scicatfs re-read", directory / BIG_NAME)
        bed.cold()
        add("blob file", blob)
        with bed.view("sshfs", bed.direct, BIG, sshfs_options=("kernel_cache",)) as directory:
            read_whole(directory / BIG_NAME, bed.size)
            add("sshfs kernel_cache re-read", directory / BIG_NAME)
    return results


def measure_random(bed: TestBed) -> dict[str, Series]:
    """Measure 4: 4 KiB random-read IOPS, cold (fresh mount) then warm (after a full read)."""
    bed.measure = "random"
    results = {f"{tool} {state}": Series("IOPS") for state in ("cold", "warm") for tool in MOUNTS}
    for _ in range(bed.args.runs):
        for tool in MOUNTS:
            bed.cold()
            with bed.view(tool, bed.direct, BIG) as directory:
                path = directory / BIG_NAME
                results[f"{tool} cold"].values.append(bed.random_reads(path))
                read_whole(path, bed.size)
                results[f"{tool} warm"].values.append(bed.random_reads(path))
    return results


def measure_metadata(bed: TestBed) -> dict[str, Series]:
    """Measure 5: seconds for ``ls -lR`` and ``find | wc -l``, first and second time."""
    bed.measure = "metadata"
    commands = {"ls -lR": "ls -lR {} >/dev/null", "find | wc -l": "find {} | wc -l"}
    results = {f"{tool} {name} {nth}": Series("s") for name in commands
               for nth in ("first", "second") for tool in MOUNTS}
    for _ in range(bed.args.runs):
        for name, template in commands.items():
            for tool in MOUNTS:
                bed.cold()
                with bed.view(tool, bed.direct, MANY) as directory:
                    for nth in ("first", "second"):
                        seconds, output = timed_shell(template.format(shlex.quote(str(directory))))
                        results[f"{tool} {name} {nth}"].values.append(seconds)
                        if name == "find | wc -l":
                            _check_count(tool, int(output), bed.args.meta_files)
    return results


def _check_count(tool: str, found: int, files: int) -> None:
    """Both list the same tree: files, their directories and the top directory;
    scicatfs adds its catalog entries (metadata.json, .scicat/ and what it holds)."""
    expected = files + -(-files // META_FILES_PER_DIR) + 1
    extra = SCICATFS_EXTRA_ENTRIES if tool == "scicatfs" else 0
    if not expected <= found <= expected + extra:
        raise BenchmarkError(f"find through {tool} listed {found} entries, expected {expected}")


# -- report ----------------------------------------------------------------------------------


def _version(argv: list[str], name: str) -> str:
    """The line naming ``name`` that a tool prints about its version (stdout or stderr)."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    lines = (result.stdout + result.stderr).splitlines()
    return next((line for line in lines if name.lower() in line.lower()), "unknown")


def _commit() -> str:
    """The checked-out commit of this repository, so a result names the code it measured."""
    try:
        result = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() or "unknown"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo
                  if line.startswith("model name")), platform.processor())
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    memory_kib = int(next(line.split()[1] for line in meminfo if line.startswith("MemTotal:")))
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(memory_kib / MiB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": [round(load, 2) for load in os.getloadavg()],
        "scicatfs": f"{scicatfs.__version__} (commit {_commit()})",
        "ssh": _version(["ssh", "-V"], "OpenSSH"),
        "sshfs": _version(["sshfs", "--version"], "SSHFS"),
        "fio": _version([str(FIO), "--version"], "fio") if FIO.exists() else "absent (Python loop)",
        "scitacean": importlib.metadata.version("scitacean"),
    }


@dataclass(frozen=True)
class Target:
    """One goal from the issues, checked against this run's medians."""

    name: str
    value: float
    goal: str
    met: bool


def targets(results: dict[str, Any], peak_rss: float) -> list[Target]:
    found: list[Target] = []

    def ratio(series: dict[str, Series], a: str, b: str) -> float | None:
        return series[a].median / series[b].median if a in series and b in series else None

    def check(name: str, value: float | None, goal: str, met: Callable[[float], bool]) -> None:
        if value is not None:
            found.append(Target(name, value, goal, met(value)))

    for rtt, series in results["cold_sequential"].items():
        if rtt == "0ms":
            check("cold seq scicatfs/sshfs @0ms", ratio(series, "scicatfs", "sshfs"), ">= 1.0x", lambda v: v >= 1.0)
            check("cold seq scicatfs/sftp @0ms", ratio(series, "scicatfs", "sftp"), ">= 1.5x", lambda v: v >= 1.5)
            check("cold seq scicatfs/scitacean @0ms", ratio(series, "scicatfs", "scitacean"), ">= 1.0x",
                  lambda v: v >= 1.0)
        else:
            check(f"cold seq scicatfs/sshfs @{rtt}", ratio(series, "scicatfs", "sshfs"), ">= 3x", lambda v: v >= 3)
    first = results["first_4k"]["0ms"]
    check("first 4 KiB scitacean/scicatfs", ratio(first, "scitacean", "scicatfs"), ">= 100x", lambda v: v >= 100)
    check("first 4 KiB scicatfs/sshfs", ratio(first, "scicatfs", "sshfs"), "<= 1.5x", lambda v: v <= 1.5)
    check("first 4 KiB scicatfs (ms)", first["scicatfs"].median, "<= 30 ms", lambda v: v <= 30)
    check("first 4 KiB scicatfs connected (ms)", first["scicatfs connected"].median, "<= 30 ms",
          lambda v: v <= 30)
    warm = results["warm_sequential"]
    check("warm first open scicatfs/blob", ratio(warm, "scicatfs first open", "blob file"), ">= 0.5x",
          lambda v: v >= 0.5)
    check("warm re-read scicatfs/blob", ratio(warm, "scicatfs re-read", "blob file"), "~1x (>= 0.9x)",
          lambda v: v >= 0.9)
    meta = results["metadata"]
    check("second ls -lR scicatfs/sshfs", ratio(meta, "scicatfs ls -lR second", "sshfs ls -lR second"),
          "<= 1.0x", lambda v: v <= 1.0)
    check("peak RSS scicatfs (MiB)", peak_rss, "<= 200 MiB", lambda v: v <= 200)
    return found


def render(report: dict[str, Any], results: dict[str, Any], found: list[Target]) -> str:
    """The stdout table: one block per measure, then the targets."""
    m = report["machine"]
    lines = [
        f"scicatfs comparison, {m['date']}: {m['cores']} cores {m['cpu']}, {m['memory_gib']} GiB, "
        f"Linux {m['kernel']}, load {m['load_average_at_start'][0]} at start",
        f"file {report['config']['size'] / MiB:g} MiB, {report['config']['runs']} runs "
        f"(median, min-max), {report['config']['meta_files']} files for metadata; "
        + ("page cache dropped before every cold run" if report["config"]["drop_caches"]
           else "page cache NOT dropped (not permitted): fresh mounts and caches only"),
    ]
    titles = {
        "cold_sequential": "1. cold sequential read",
        "first_4k": "2. first 4 KiB, cold data (open + read): at size/2 on a fresh mount, "
                    "then at size/4 with connections up",
        "warm_sequential": "3. warm sequential read",
        "random_4k": f"4. random 4 KiB reads ({report['config']['random_tool']})",
        "metadata": f"5. metadata, {report['config']['meta_files']} files",
    }
    for key, title in titles.items():
        lines += ["", title]
        block = results[key]
        groups = block.items() if key in ("cold_sequential", "first_4k") else [("", block)]
        for rtt, series in groups:
            for name, values in series.items():
                ratio = ""
                tool, _, rest = name.partition(" ")
                ours = " ".join(filter(None, ("scicatfs", rest)))
                if tool != "scicatfs" and ours in series:
                    ratio = f"  scicatfs/{tool} = {series[ours].median / values.median:.2f}x"
                label = f"{name} @{rtt}" if rtt else name
                lines.append(f"  {label:<34} {values!s:<28}{ratio}")
    lines += ["", "6. peak RSS of scicatfs (VmHWM, MiB)"]
    lines += [f"  {measure:<34} {rss:.0f}" for measure, rss in report["peak_rss_mib"].items()]
    lines += ["", "targets"]
    lines += [f"  {'met   ' if t.met else 'MISSED'} {t.name:<36} {_fmt(t.value):>8}   goal {t.goal}"
              for t in found]
    return "\n".join(lines)


def run_all(bed: TestBed, rtts: list[int]) -> dict[str, Any]:
    """Every measure in order; the cold runs at 0 ms leave the cache the warm measure needs."""
    results: dict[str, Any] = {"cold_sequential": {}, "first_4k": {}}
    for rtt in rtts:
        _progress(f"measures 1-2 at +{rtt} ms RTT")
        throughput, first = measure_cold(bed, rtt)
        results["cold_sequential"][f"{rtt}ms"] = throughput
        results["first_4k"][f"{rtt}ms"] = first
    _progress("measure 3: warm sequential")
    results["warm_sequential"] = measure_warm(bed)
    _progress("measure 4: random 4 KiB reads")
    results["random_4k"] = measure_random(bed)
    _progress("measure 5: metadata")
    results["metadata"] = measure_metadata(bed)
    return results


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _to_json(value: Any) -> Any:
    if isinstance(value, Series):
        return value.to_json()
    if isinstance(value, dict):
        return {key: _to_json(item) for key, item in value.items()}
    return value


def _check_environment() -> None:
    if os.geteuid() != 0:
        raise BenchmarkError("run as root: sshd needs it for its chroot (and drop_caches)")
    for tool in ("/usr/sbin/sshd", "sftp", "sshfs", "fusermount3"):
        if shutil.which(tool) is None:
            raise BenchmarkError(f"{tool} is not installed (see .ci/setup for the packages)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.compare",
        description="Compare scicatfs with sshfs, OpenSSH sftp and Scitacean on one loopback sshd.",
    )
    parser.add_argument("--size", type=parse_size, default=GiB, help="size of the random file (default 1G)")
    parser.add_argument("--runs", type=int, default=3, help="runs per tool and measure (default 3)")
    parser.add_argument("--rtt", type=parse_rtts, default=[0, 20, 50],
                        help="added round-trip times in ms for measures 1-2 (default 0,20,50)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--meta-files", type=int, default=10_000,
                        help="files in the metadata dataset (default 10000)")
    parser.add_argument("--fio-runtime", type=int, default=10, help="seconds per random-read run (default 10)")
    parser.add_argument("--workdir", type=Path, help="where mounts and caches go (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.meta_files < 1 or args.fio_runtime < 1:
        parser.error("--runs, --meta-files and --fio-runtime must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    described = machine()  # before the run: its date and the load other work puts on the machine
    try:
        _check_environment()
        workdir = Path(tempfile.mkdtemp(prefix="scicatfs-bench-", dir=args.workdir))
        try:
            with TestBed(args, workdir) as bed:
                results = run_all(bed, args.rtt)
                can_drop = bed.can_drop_caches
                peak_rss = dict(bed.peak_rss)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    except BenchmarkError as error:
        print(f"compare: {error}", file=sys.stderr)
        return 1
    report: dict[str, Any] = {
        "machine": described,
        "config": {"size": args.size, "runs": args.runs, "rtt_ms": args.rtt,
                   "meta_files": args.meta_files, "fio_runtime": args.fio_runtime,
                   "drop_caches": can_drop,
                   "random_tool": "fio psync" if FIO.exists() else "Python pread loop",
                   "command": shlex.join([sys.executable, "-m", "tests.benchmarks.compare",
                                          *(sys.argv[1:] if argv is None else argv)])},
        "peak_rss_mib": peak_rss,
    }
    found = targets(results, max(peak_rss.values(), default=0.0))
    report["results"] = _to_json(results)
    report["targets"] = [dataclasses.asdict(t) for t in found]
    print(render(report, results, found))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
