"""Catalog benchmark (a script, not a test; needs root for sshd): ``python -m tests.benchmarks.bench_catalog``.

1. Listing a PID level of 100,000 and of 1,000,000 datasets through a mount
   (``ls -1U``, which prints entries as it reads them): wall time, time to the
   first entry, catalog requests, peak RSS of the mount daemon; against the
   same range pages fetched with httpx in a loop (the least any client can
   spend). The ``skip`` pages of the smallest size are timed too, to show
   what range paging saves the catalog. CPU seconds of the catalog server,
   the daemon and the direct loop are printed per entry: on a busy two-core
   machine the listing is bound by their sum, not by the slowest of them.
2. Resolving one dataset with 10,000 files through the client: requests, time.

The catalog server runs in a child process (its records are generated on
demand, and its own CPU and memory stay out of the measured processes); the
mount needs an sshd, which is started and never used.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import trio

from scicatfs.catalog.auth import Credentials, Secret
from scicatfs.catalog.client import CatalogClient, CatalogSettings
from tests.benchmarks.testbed import peak_rss_mib
from tests.support.mounts import stop_process, unmount_quietly, wait_for_mount
from tests.support.sshd import OpenSSHServer

USER, PASSWORD = "bench", "bench-password"
PREFIX = "20.500.12269/"
RUN = f"{PREFIX}bench-"
FILES_PID = f"{PREFIX}files"
PAGE = 1000


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _serve(datasets: int, files: int, channel: Connection) -> None:
    """Child process: serve a generated catalog; answer "requests" with the list-page count, until told to stop."""
    from scicatfs.demo.fixtures import Catalog
    from scicatfs.demo.server import CatalogServer

    catalog = Catalog()
    catalog.add_user(USER, PASSWORD, ["bench"], "bench@example.org")
    catalog.add_generated(RUN, datasets, owner_group="bench")
    entries = [{"path": f"d{i % 100:02d}/f{i:06d}.dat", "size": i} for i in range(files)]
    catalog.add_dataset({"pid": FILES_PID, "ownerGroup": "bench", "sourceFolder": "/data/files",
                         "creationTime": "2024-01-01T00:00:00Z"}, entries, blocks=max(1, files // 1000))
    with CatalogServer(catalog) as server:
        channel.send(server.url)
        while (command := channel.recv()) != "stop":
            if command == "reset":
                server.reset_requests()
            channel.send(sum(1 for _, path, _ in server.requests if "/datasets?" in path))


class ServedCatalog:
    """A catalog server in a child process, as a context manager."""

    def __init__(self, datasets: int, files: int = 0) -> None:
        context = multiprocessing.get_context("spawn")
        self._channel, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(datasets, files, child), daemon=True)

    def __enter__(self) -> ServedCatalog:
        self._process.start()
        if not self._channel.poll(120):
            raise RuntimeError("catalog server did not start")
        self.url: str = self._channel.recv()
        return self

    @property
    def cpu(self) -> float:
        """CPU seconds the server process has used so far."""
        assert self._process.pid is not None
        return cpu_seconds(self._process.pid)

    def list_requests(self, *, reset: bool = False) -> int:
        """Dataset list requests since the last reset."""
        self._channel.send("reset" if reset else "count")
        return self._channel.recv()

    def __exit__(self, *exc_info: object) -> None:
        self._process.kill()
        self._process.join(10)


def _settings(url: str) -> CatalogSettings:
    return CatalogSettings(url, Credentials(username=USER, password=Secret(PASSWORD), source="bench"))


def direct_pages(served: ServedCatalog, *, by_skip: bool = False) -> dict[str, float]:
    """The pages the client asks for, fetched one after another with httpx: seconds, first page, count, CPU."""
    url = served.url
    with httpx.Client(base_url=f"{url}/api", timeout=600) as http:
        token = http.post("/v3/auth/login", json={"username": USER, "password": PASSWORD}).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        started, cpu, server_cpu = time.perf_counter(), time.process_time(), served.cpu
        first, count, pages, last = 0.0, 0, 0, None
        while True:
            if by_skip:
                where = {"pid": {"$regex": f"^(?:{PREFIX.replace('.', chr(92) + '.')})"}}
                limits = {"limit": PAGE, "skip": pages * PAGE, "sort": {"pid": "asc"}}
            else:
                where = {"pid": {"$gt": last, "$lt": "20.500.122690"} if last else {"$gte": PREFIX, "$lt": "20.500.122690"}}
                limits = {"limit": PAGE, "skip": 0, "sort": {"pid": "asc"}}
            query = {"where": where, "fields": ["pid", "creationTime"], "limits": limits}
            rows = http.get("/v4/datasets", params={"filter": json.dumps(query, separators=(",", ":"))},
                            headers=headers).json()
            pages += 1
            first = first or time.perf_counter() - started
            count += len(rows)
            if len(rows) < PAGE:
                return {"seconds": time.perf_counter() - started, "first": first, "entries": count, "pages": pages,
                        "cpu": time.process_time() - cpu, "server_cpu": served.cpu - server_cpu}
            last = rows[-1]["pid"]


def mounted_listing(served: ServedCatalog, sshd: OpenSSHServer, work: Path) -> dict[str, float]:
    """``ls -1U`` of the PID level through a fresh mount: seconds, first entry, requests, daemon RSS."""
    mountpoint, log, password = work / "mnt", work / "scicatfs.log", work / "password"
    mountpoint.mkdir()
    password.write_text(PASSWORD + "\n")
    password.chmod(0o600)
    argv = [sys.executable, "-m", "scicatfs", "mount", str(mountpoint), "--url", served.url,
            "--username", USER, "--password-file", str(password), "--sftp-host", sshd.host,
            "--sftp-port", str(sshd.port), "--sftp-user", sshd.username, "--identity-file", str(sshd.client_key),
            "--known-hosts", str(sshd.known_hosts), "--cache-dir", str(work / "cache"),
            "--foreground", "--log-level", "warning"]
    with open(log, "wb") as log_file:
        daemon = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_for_mount(mountpoint, daemon, log, timeout=120)
        served.list_requests(reset=True)
        daemon_cpu, server_cpu = cpu_seconds(daemon.pid), served.cpu
        started = time.perf_counter()
        ls = subprocess.Popen(["ls", "-1U", str(mountpoint / PREFIX.rstrip("/"))], stdout=subprocess.PIPE)
        assert ls.stdout is not None
        first_line = ls.stdout.readline()
        first = time.perf_counter() - started
        entries = (1 if first_line else 0) + ls.stdout.read().count(b"\n")
        ls.wait(600)
        seconds = time.perf_counter() - started
        rss = peak_rss_mib(daemon.pid)
        return {"seconds": seconds, "first": first, "entries": entries,
                "pages": served.list_requests(), "rss_mib": rss or 0.0,
                "cpu": cpu_seconds(daemon.pid) - daemon_cpu, "server_cpu": served.cpu - server_cpu}
    finally:
        unmount_quietly(mountpoint)
        stop_process(daemon)


async def resolve(url: str) -> tuple[int, float, dict[str, int]]:
    async with CatalogClient(_settings(url)) as client:
        started = time.perf_counter()
        dataset = await client.get_dataset(FILES_PID)
        return len(dataset.files), time.perf_counter() - started, client.stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--datasets", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--no-skip", action="store_true", help="do not time skip paging (O(n²) on the catalog)")
    args = parser.parse_args()

    sshd = OpenSSHServer()
    sshd.start()
    rss: list[float] = []
    try:
        for datasets in args.datasets:
            with ServedCatalog(datasets) as served, tempfile.TemporaryDirectory() as work:
                direct = direct_pages(served)
                mount = mounted_listing(served, sshd, Path(work))
                rss.append(mount["rss_mib"])
                print(f"{datasets:>9,} datasets: direct range pages {direct['seconds']:.2f} s "
                      f"({direct['pages']} pages, first after {direct['first'] * 1000:.0f} ms); "
                      f"mount ls -1U {mount['seconds']:.2f} s = {mount['seconds'] / direct['seconds']:.2f}x "
                      f"({mount['entries']:,} entries, {mount['pages']} requests, first entry after "
                      f"{mount['first'] * 1000:.0f} ms, daemon peak RSS {mount['rss_mib']:.1f} MiB)", flush=True)
                per = 1e6 / datasets
                print(f"{datasets:>9,} datasets: CPU µs per entry: direct loop {direct['cpu'] * per:.1f} + server "
                      f"{direct['server_cpu'] * per:.1f}; mount daemon {mount['cpu'] * per:.1f} + server "
                      f"{mount['server_cpu'] * per:.1f}", flush=True)
                if datasets == min(args.datasets) and not args.no_skip:
                    skip = direct_pages(served, by_skip=True)
                    print(f"{datasets:>9,} datasets: direct skip pages {skip['seconds']:.2f} s "
                          f"({skip['pages']} pages): {skip['seconds'] / direct['seconds']:.1f}x the range pages",
                          flush=True)
    finally:
        sshd.close()
    if len(rss) > 1:
        print(f"daemon peak RSS spread over the sizes: {max(rss) - min(rss):.1f} MiB")

    with ServedCatalog(1, args.files) as served:
        files, seconds, stats = trio.run(resolve, served.url)
        print(f"resolve 1 dataset, {files} files: {seconds * 1000:.0f} ms, "
              f"{stats['requests'] - stats['logins']} data request(s) + {stats['logins']} login")


if __name__ == "__main__":
    main()
