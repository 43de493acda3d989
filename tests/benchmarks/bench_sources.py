"""Benchmark: reading through a ``file://`` or ``http://`` source vs reading the bytes directly.

Two peers measured in the same run, on the same file:

* local: a cold sequential read through a mount with ``--source /=file://DIR``
  vs ``read()`` of the file itself (goal >= 0.8x), then a second read of
  each from the page cache (the mount's warm re-read vs the file's);
* HTTP: the same read through a mount with ``--source /=http://127.0.0.1:PORT/``
  (a real nginx) vs ``curl`` of the same URL (goal >= 0.8x), at each RTT
  (the delay proxy in front of nginx serves both).

The two sides of each comparison alternate run by run (A B A B ...).

"Cold" means: the source file's pages are dropped from the page cache
(``posix_fadvise(DONTNEED)``, only for that file, never the machine's whole
cache) and every scicatfs read uses a fresh mount and a fresh cache directory.
Run (as root, for FUSE)::

    .venv/bin/python -m tests.benchmarks.bench_sources --size 256M --runs 3 --rtt 0,20
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.server import CatalogServer
from tests.benchmarks.compare import parse_rtts, parse_size
from tests.benchmarks.delay_proxy import DelayProxy
from tests.support.mounts import start_mount
from tests.support.nginx import NginxServer

MiB = 1024 * 1024
READ_SIZE = 1 * MiB
PID = "bench/sources"
FOLDER = "/bench/sources"
NAME = "random.bin"
GOAL = 0.8


def _drop_pages(path: Path) -> None:
    """Drop this file's pages from the page cache, so the next read comes from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _timed_read(path: Path) -> float:
    """Seconds to read ``path`` sequentially in 1 MiB reads."""
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as file:
        while file.read(READ_SIZE):
            pass
    return time.perf_counter() - started


class Bench:
    """The data, the catalog server describing it, and a fresh mount per measurement."""

    def __init__(self, work: Path, size: int) -> None:
        self.work = work
        self.size = size
        self.root = work / "root"
        self.file = self.root / FOLDER.lstrip("/") / NAME
        self.file.parent.mkdir(parents=True)
        with open(self.file, "wb") as out:
            rng = random.Random(0)
            for offset in range(0, size, 16 * MiB):
                out.write(rng.randbytes(min(16 * MiB, size - offset)))
        catalog = Catalog()
        catalog.add_dataset(
            {"pid": PID, "owner": "bench", "ownerGroup": "bench", "contactEmail": "bench@example.org",
             "creationLocation": "bench", "sourceFolder": FOLDER, "isPublished": True,
             "creationTime": "2024-01-01T00:00:00.000Z"},
            [{"path": NAME, "size": size}],
        )  # fmt: skip
        self.catalog = catalog
        self.server = CatalogServer(catalog).start()
        self._mounts = 0

    def close(self) -> None:
        self.server.stop()

    def through_mount(self, source: str, rereads: list[float] | None = None) -> float:
        """Seconds for a cold read of the file through a fresh mount reading from ``source``.

        With ``rereads``, the file is read once more through the same mount
        (from the kernel's page cache) and that time appended.
        """
        self._mounts += 1
        work = self.work / f"mount{self._mounts}"
        work.mkdir()
        _drop_pages(self.file)
        mount = start_mount(self.catalog, self.server, None, work, user=None, args=["--source", f"/={source}"])
        try:
            seconds = _timed_read(mount.path / PID / NAME)
            if rereads is not None:
                rereads.append(_timed_read(mount.path / PID / NAME))
            return seconds
        finally:
            mount.unmount()
            shutil.rmtree(work, ignore_errors=True)

    def directly(self, rereads: list[float] | None = None) -> float:
        _drop_pages(self.file)
        seconds = _timed_read(self.file)
        if rereads is not None:  # from the page cache, like the re-read through the mount
            rereads.append(_timed_read(self.file))
        return seconds

    def curl(self, url: str) -> float:
        _drop_pages(self.file)
        started = time.perf_counter()
        subprocess.run(["curl", "-sSf", "-o", "/dev/null", url], check=True, timeout=600)
        return time.perf_counter() - started


def _rate(size: int, seconds: list[float]) -> float:
    return size / MiB / statistics.median(seconds)


@contextmanager
def _endpoint(nginx: NginxServer, rtt_ms: int) -> Iterator[str]:
    """nginx's URL, through a delay proxy when ``rtt_ms`` > 0."""
    if rtt_ms == 0:
        yield nginx.url
        return
    with DelayProxy("127.0.0.1", nginx.port, rtt=rtt_ms / 1000) as proxy:
        yield f"http://127.0.0.1:{proxy.port}"


def run(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    """(comparison, scicatfs MiB/s, peer MiB/s) for every measure."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="scicatfs-bench-sources-") as temp:
        work = Path(temp)
        bench = Bench(work, args.size)
        nginx = NginxServer(bench.root, work / "nginx").start()
        try:
            local, direct, local_again, direct_again = [], [], [], []
            for _ in range(args.runs):  # alternating, so that drift hits both alike
                local.append(bench.through_mount(f"file://{bench.root}/", local_again))
                direct.append(bench.directly(direct_again))
            rows.append(("file:// mount / read()", _rate(args.size, local), _rate(args.size, direct)))
            rows.append(("warm re-read mount / file", _rate(args.size, local_again), _rate(args.size, direct_again)))
            for rtt in args.rtt:
                with _endpoint(nginx, rtt) as base:
                    mounted, curl = [], []
                    for _ in range(args.runs):
                        mounted.append(bench.through_mount(f"{base}/"))
                        curl.append(bench.curl(f"{base}{FOLDER}/{NAME}"))
                rows.append((f"http:// mount / curl @{rtt}ms", _rate(args.size, mounted), _rate(args.size, curl)))
        finally:
            nginx.stop()
            bench.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_sources", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=256 * MiB, help="file size (default 256M)")
    parser.add_argument("--runs", type=int, default=3, help="runs per measure; the median counts (default 3)")
    parser.add_argument("--rtt", type=parse_rtts, default=[0, 20], help="comma-separated RTTs in ms (default 0,20)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if shutil.which("curl") is None:
        parser.error("curl is not installed")
    print(f"{'comparison':32} {'scicatfs':>12} {'peer':>12} {'ratio':>7}  (goal >= {GOAL}x)")
    for name, ours, peer in run(args):
        print(f"{name:32} {ours:9.1f} MiB/s {peer:9.1f} MiB/s {ours / peer:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
