"""The benchmark's test bed: sshd, catalog server, data, and each tool pointed at them.

`TestBed` owns everything a comparison run starts: a real OpenSSH sshd on
127.0.0.1 (tests/support/sshd.py) whose chroot holds one random file and a
many-file tree, the project's catalog server describing both as datasets, and
per-tool helpers that mount (scicatfs, sshfs) or download (OpenSSH sftp,
Scitacean) through an `Endpoint`: sshd itself or a delay proxy in front of it.
Every mount is unmounted and every child process stopped on the way out, and
every wait is bounded, so a wedged tool fails the run instead of hanging it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import paramiko
from scitacean import Client
from scitacean.transfer.sftp import SFTPFileTransfer

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
MOUNT_TIMEOUT = 60.0
COMMAND_TIMEOUT = 120.0
#: Slowest transfer rate that still counts as progress (sshfs at +50 ms RTT is far above it).
SLOWEST_RATE = 1 * MiB
#: The cipher scicatfs negotiates (asyncssh prefers AES-GCM where the CPU has AES-NI);
#: OpenSSH clients default to chacha20-poly1305, which costs more CPU per byte.
TUNED_CIPHER = "aes128-gcm@openssh.com"
#: ``sftp`` as an expert runs it for one large file: 64 requests in flight of 256 KiB each.
SFTP_TUNED = ("-R", "64", "-B", "262144", "-c", TUNED_CIPHER)

T = TypeVar("T")


class BenchmarkError(RuntimeError):
    """A tool failed or misbehaved; the message names it."""


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


@functools.cache
def sshfs_tuned_options() -> tuple[str, ...]:
    """sshfs as an expert mounts it: the cipher scicatfs uses, and 4 connections where
    this sshfs has ``max_conns`` (3.7.0 and later)."""
    help_text = subprocess.run(["sshfs", "-h"], capture_output=True, text=True, timeout=10)
    conns = ("max_conns=4",) if "max_conns" in help_text.stdout + help_text.stderr else ()
    return (f"Ciphers={TUNED_CIPHER}", *conns)


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
        if tool in ("sshfs", "sshfs-tuned"):
            tuned = sshfs_tuned_options() if tool == "sshfs-tuned" else ()
            with self.sshfs(endpoint, place.folder, *tuned, *sshfs_options) as path:
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

    def sftp_get(self, endpoint: Endpoint, *, tuned: bool = False) -> float:
        """Seconds OpenSSH ``sftp`` spends moving the whole file to local disk.

        Process start and SSH handshake are left out: the batch comes on stdin,
        and the clock runs from the answer to a first local ``!echo`` (the
        session is up) to the answer to one after the ``get``.
        """
        target = self.workdir / "sftp-download.bin"
        argv = ["sftp", "-q", *(SFTP_TUNED if tuned else ()), "-b", "-"]
        for option in self.ssh_options(endpoint):
            argv += ["-o", option]
        process = subprocess.Popen(
            [*argv, f"{self.sshd.username}@{endpoint.host}"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        )  # fmt: skip
        assert process.stdin is not None and process.stdout is not None

        def answered(marker: str, timeout: float) -> float:
            """Send ``!echo marker``; the time its output arrives (sftp echoes each command first)."""
            process.stdin.write(f"!echo {marker}\n")  # type: ignore[union-attr]
            process.stdin.flush()  # type: ignore[union-attr]

            def wait() -> None:
                for line in process.stdout:  # type: ignore[union-attr]
                    if line.strip() == marker:
                        return
                raise BenchmarkError(f"sftp failed: {process.stderr.read().strip()}")  # type: ignore[union-attr]

            bounded(wait, timeout, f"sftp answering {marker}")
            return time.perf_counter()

        try:
            start = answered("connected", COMMAND_TIMEOUT)
            process.stdin.write(f"get {BIG.folder}/{BIG_NAME} {target}\n")
            done = answered("fetched", transfer_timeout(self.size))
            process.stdin.close()
            if process.wait(timeout=COMMAND_TIMEOUT) != 0 or target.stat().st_size != self.size:
                raise BenchmarkError(f"sftp get failed: {process.stderr.read().strip()}")  # type: ignore[union-attr]
            return done - start
        finally:
            stop_process(process)  # type: ignore[arg-type]
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
