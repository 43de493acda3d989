"""Catalog client benchmark (a script, not a test): ``python -m tests.benchmarks.bench_catalog``.

1. Listing 500 and then 5,000 datasets: peak RSS of this process after each,
   which stays flat because PIDs stream page by page (measured first, before
   anything else raises the peak).
2. Resolving one dataset with 10,000 files: how many requests, how long.

The catalog server runs in a child process so that its own memory (it holds
the whole catalog) does not count in this process's RSS.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time
from multiprocessing.connection import Connection

import trio

from scicatfs.catalog.auth import Credentials, Secret
from scicatfs.catalog.client import CatalogClient, CatalogSettings

USER, PASSWORD = "bench", "bench-password"


def _serve(datasets: int, files: int, channel: Connection) -> None:
    """Child process: serve a generated catalog until the parent says stop."""
    from scicatfs.demo.fixtures import Catalog
    from scicatfs.demo.server import CatalogServer

    catalog = Catalog()
    catalog.add_user(USER, PASSWORD, ["bench"], "bench@example.org")
    created = "2024-01-01T00:00:00Z"
    for index in range(datasets):
        pid = f"20.500.12269/bench-{index:06d}"
        entries = [{"path": f"d{i % 100:02d}/f{i:06d}.dat", "size": i} for i in range(files if index == 0 else 0)]
        catalog.add_dataset(
            {"pid": pid, "ownerGroup": "bench", "sourceFolder": f"/data/{index}", "creationTime": created},
            entries,
            blocks=max(1, len(entries) // 1000),
        )
    with CatalogServer(catalog) as server:
        channel.send(server.url)
        channel.recv()  # blocks until the parent closes the pipe or kills us


class ServedCatalog:
    """A catalog server in a child process, as a context manager yielding its URL."""

    def __init__(self, datasets: int, files: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._channel, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(datasets, files, child), daemon=True)

    def __enter__(self) -> ServedCatalog:
        self._process.start()
        if not self._channel.poll(120):
            raise RuntimeError("catalog server did not start")
        self.url: str = self._channel.recv()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._process.kill()
        self._process.join(10)


def _settings(url: str) -> CatalogSettings:
    return CatalogSettings(url, Credentials(username=USER, password=Secret(PASSWORD), source="bench"))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def resolve(url: str) -> tuple[int, float, dict[str, int]]:
    async with CatalogClient(_settings(url)) as client:
        started = time.perf_counter()
        dataset = await client.get_dataset("20.500.12269/bench-000000")
        return len(dataset.files), time.perf_counter() - started, client.stats


async def list_all(url: str) -> tuple[int, float, dict[str, int]]:
    async with CatalogClient(_settings(url)) as client:
        started = time.perf_counter()
        count = 0
        async for _ in client.iter_pids():
            count += 1
        return count, time.perf_counter() - started, client.stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--datasets", type=int, nargs=2, default=[500, 5_000])
    args = parser.parse_args()

    baseline = peak_rss_mib()
    print(f"peak RSS before listing: {baseline:.1f} MiB")
    for datasets in args.datasets:
        with ServedCatalog(datasets, 0) as served:
            count, seconds, stats = trio.run(list_all, served.url)
            print(f"list {count} datasets: {seconds:.2f} s, {stats['requests'] - stats['logins']} page request(s), "
                  f"peak RSS {peak_rss_mib():.1f} MiB (+{peak_rss_mib() - baseline:.1f} MiB)")

    with ServedCatalog(1, args.files) as served:
        files, seconds, stats = trio.run(resolve, served.url)
        print(f"resolve 1 dataset, {files} files: {seconds * 1000:.0f} ms, "
              f"{stats['requests'] - stats['logins']} data request(s) + {stats['logins']} login")


if __name__ == "__main__":
    main()
