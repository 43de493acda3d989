"""Sequential read throughput of the transfer layer vs OpenSSH sftp and sshfs.

    python -m tests.benchmarks.bench_transfer --size 1G [--runs 3]

One sshd (tests/support/sshd.py), one file, one run: the three readers take
turns (A, B, C, A, B, C, ...) so that drift on the machine hits all of them
alike, and the medians are compared. ``Transfer`` reads the way the cache will
use it: fixed chunks (4 MiB) with several in flight. Needs root (sshd chroot),
sshd, sftp, sshfs and fusermount3.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from scicatfs.transfer.base import source_url
from scicatfs.transfer.sftp import DEFAULT_CIPHERS, SFTPSettings, SFTPTransfer
from tests.support.sshd import OpenSSHServer

MiB = 1024 * 1024
REMOTE_PATH = "/bench/data.bin"
REMOTE_URL = source_url("sftp", "", REMOTE_PATH)  # on the settings' host
SMALL_READ = 4096
#: Deadline per transfer operation: generous, a loaded machine must not fail a benchmark run.
BENCH_TIMEOUT = 30.0


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": MiB, "G": 1024 * MiB}
    suffix = text[-1:].upper()
    if suffix in units:
        return int(float(text[:-1]) * units[suffix])
    return int(text)


def write_file(server: OpenSSHServer, size: int) -> None:
    path = server.local_path(REMOTE_PATH)
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(16 * MiB)
    with path.open("wb") as out:
        for start in range(0, size, len(block)):
            out.write(block[: min(len(block), size - start)])


def transfer_reader(
    server: OpenSSHServer, args: argparse.Namespace, size: int
) -> Callable[[], None]:
    settings = server.sftp_settings(
        timeout=BENCH_TIMEOUT,
        connections=args.connections,
        max_requests=args.max_requests,
        ciphers=(args.cipher,) if args.cipher else DEFAULT_CIPHERS,
    )

    async def read_all() -> None:
        total = 0
        limiter = trio.Semaphore(args.in_flight)

        async def one(offset: int) -> None:
            nonlocal total
            try:
                data = await transfer.read(REMOTE_URL, offset, args.chunk)
                total += len(data)  # not `total += len(await ...)`: that loses updates
            finally:
                limiter.release()

        async with SFTPTransfer(settings) as transfer, trio.open_nursery() as nursery:
            for offset in range(0, size, args.chunk):
                await limiter.acquire()  # chunks start in order, at most in_flight at once
                nursery.start_soon(one, offset)
        if total != size:
            raise RuntimeError(f"Transfer read {total} bytes, expected {size}")

    return lambda: trio.run(read_all)


def sftp_reader(server: OpenSSHServer) -> Callable[[], None]:
    def run() -> None:
        subprocess.run(
            ["sftp", *server.ssh_options(), "-b", "-", server.host],
            input=f"get {REMOTE_PATH} /dev/null\n".encode(),
            check=True,
            stdout=subprocess.DEVNULL,
        )

    return run


@contextmanager
def sshfs_mount(server: OpenSSHServer) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as mountpoint:
        options = ",".join(
            option
            for option in server.ssh_options()
            if option != "-o" and not option.startswith("User=")  # sshfs takes user@host
        )
        subprocess.run(
            ["sshfs", f"{server.username}@{server.host}:/", mountpoint, "-o", f"ro,{options}"],
            check=True,
        )
        try:
            yield Path(mountpoint)
        finally:
            subprocess.run(["fusermount3", "-u", mountpoint], check=True)


def sshfs_reader(server: OpenSSHServer) -> Callable[[], None]:
    def run() -> None:
        with sshfs_mount(server) as mountpoint:
            with open(mountpoint / REMOTE_PATH.lstrip("/"), "rb") as source:
                while source.read(MiB):
                    pass

    return run


def transfer_small_reads(server: OpenSSHServer, offsets: list[int]) -> list[float]:
    """Seconds per 4 KiB read at each offset, on a warm connection (the bridge's latency)."""
    settings = server.sftp_settings(timeout=BENCH_TIMEOUT)

    async def measure() -> list[float]:
        async with SFTPTransfer(settings) as transfer:
            await transfer.read(REMOTE_URL, 0, SMALL_READ)
            seconds = []
            for offset in offsets:
                started = time.perf_counter()
                await transfer.read(REMOTE_URL, offset, SMALL_READ)
                seconds.append(time.perf_counter() - started)
            return seconds

    return trio.run(measure)


def sshfs_small_reads(server: OpenSSHServer, offsets: list[int]) -> list[float]:
    """Seconds per 4 KiB pread through a fresh sshfs mount (kernel read-ahead included)."""
    seconds = []
    with sshfs_mount(server) as mountpoint:
        fd = os.open(mountpoint / REMOTE_PATH.lstrip("/"), os.O_RDONLY)
        try:
            os.pread(fd, SMALL_READ, 0)
            for offset in offsets:
                started = time.perf_counter()
                os.pread(fd, SMALL_READ, offset)
                seconds.append(time.perf_counter() - started)
        finally:
            os.close(fd)
    return seconds


def timed(run: Callable[[], None]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", type=parse_size, default=parse_size("1G"), help="file size, e.g. 256M, 1G"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per reader (>= 3)")
    parser.add_argument("--chunk", type=parse_size, default=4 * MiB, help="Transfer read size")
    parser.add_argument("--in-flight", type=int, default=4, help="Transfer reads in flight")
    parser.add_argument("--connections", type=int, default=SFTPSettings().connections)
    parser.add_argument("--max-requests", type=int, default=SFTPSettings().max_requests)
    parser.add_argument("--cipher", help="force one cipher (default: the AES-first preference)")
    args = parser.parse_args()

    server = OpenSSHServer()
    try:
        server.start()
        write_file(server, args.size)
        readers = {
            "scicatfs Transfer": transfer_reader(server, args, args.size),
            "OpenSSH sftp": sftp_reader(server),
            "sshfs": sshfs_reader(server),
        }
        seconds: dict[str, list[float]] = {name: [] for name in readers}
        for run in range(max(args.runs, 1)):
            for name, reader in readers.items():
                seconds[name].append(timed(reader))
                rate = args.size / MiB / seconds[name][-1]
                print(f"run {run + 1} {name:18} {rate:8.1f} MiB/s", flush=True)
        offsets = [random.randrange(args.size - SMALL_READ) for _ in range(200)]
        latency = {
            "scicatfs Transfer": statistics.median(transfer_small_reads(server, offsets)),
            "sshfs": statistics.median(sshfs_small_reads(server, offsets)),
        }
    finally:
        server.close()

    speed = {name: args.size / MiB / statistics.median(values) for name, values in seconds.items()}
    print(
        f"\nmedian of {args.runs} runs, {args.size / MiB:.0f} MiB file, "
        f"chunk {args.chunk // MiB} MiB, "
        f"{args.in_flight} in flight, {args.connections} connections, "
        f"max_requests {args.max_requests}, cipher {args.cipher or 'default'}"
    )
    for name, value in speed.items():
        print(f"  {name:18} {value:8.1f} MiB/s")
    ours = speed["scicatfs Transfer"]
    print(f"  Transfer / sshfs        {ours / speed['sshfs']:.2f}x")
    print(f"  Transfer / OpenSSH sftp {ours / speed['OpenSSH sftp']:.2f}x")
    print("median latency of a 4 KiB read at a random offset (warm connection)")
    for name, value in latency.items():
        print(f"  {name:18} {value * 1000:8.2f} ms")


if __name__ == "__main__":
    main()
