"""Views benchmark (a script, not a test): ``python -m tests.benchmarks.bench_views``.

Mounts a catalog with ``--proposals`` proposals of one dataset each and one
proposal (``BIG``) of ``--datasets`` datasets, then times, cold and warm
(within the listing TTL):

1. ``ls by-proposal/``: the distinct values, from the fullfacet route;
2. ``ls -l by-proposal/BIG``: every link with its attributes, from the
   filtered list route page by page.

and counts the catalog requests each one cost (login excluded). The catalog
server runs in this process (its request log is the count); the mount is the
real ``scicatfs mount`` command in a child process. No file server is needed:
views never read data files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.server import CatalogServer
from tests.support.mounts import stop_process, unmount_quietly, wait_for_mount

USER, PASSWORD = "bench", "bench-password"
BIG = "BIG"
COMMAND_TIMEOUT = 300.0


def build_catalog(proposals: int, datasets: int) -> Catalog:
    catalog = Catalog()
    catalog.add_user(USER, PASSWORD, ["bench"], "bench@example.org")

    def add(pid: str, proposal: str, name: str) -> None:
        catalog.add_dataset({"pid": pid, "datasetName": name, "ownerGroup": "bench", "proposalIds": [proposal],
                             "sourceFolder": f"/data/{pid}", "creationTime": "2024-01-01T00:00:00Z"}, [])

    for index in range(proposals):
        add(f"20.500.12269/p-{index:06d}", f"2024-{index:06d}", f"scan {index}")
    for index in range(datasets):
        add(f"20.500.12269/big-{index:06d}", BIG, "frame")  # all share one name: the collision rule at scale
    return catalog


def _requests(server: CatalogServer, since: int) -> list[str]:
    return [unquote(urlsplit(path).path) for _, path, _ in server.requests[since:] if "/auth/" not in path]


def measure(server: CatalogServer, argv: list[str]) -> dict[str, object]:
    """One command: its wall time, its output's line count, and the catalog requests it caused."""
    before = len(server.requests)
    started = time.perf_counter()
    output = subprocess.run(argv, capture_output=True, timeout=COMMAND_TIMEOUT, check=True).stdout
    seconds = time.perf_counter() - started
    asked = _requests(server, before)
    return {"seconds": round(seconds, 4), "lines": output.count(b"\n"), "requests": len(asked),
            "routes": sorted(set(asked))}


def run(proposals: int, datasets: int, workdir: Path) -> dict[str, object]:
    catalog = build_catalog(proposals, datasets)
    password = workdir / "password"
    password.write_text(PASSWORD + "\n")
    password.chmod(0o600)
    mountpoint = workdir / "mnt"
    mountpoint.mkdir()
    log = workdir / "scicatfs.log"
    with CatalogServer(catalog) as server:
        argv = [
            sys.executable, "-m", "scicatfs", "mount", str(mountpoint), "--url", server.url,
            "--username", USER, "--password-file", str(password),
            "--sftp-host", "127.0.0.1", "--sftp-port", "9", "--insecure-no-host-key-check",
            "--cache-dir", str(workdir / "cache"), "--foreground", "--log-level", "warning",
        ]  # fmt: skip
        with open(log, "wb") as log_file:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_for_mount(mountpoint, process, log)
            results: dict[str, object] = {"proposals": proposals, "datasets": datasets}
            for label, command in (("ls by-proposal", ["ls", str(mountpoint / "by-proposal")]),
                                   ("ls -l by-proposal/BIG", ["ls", "-l", str(mountpoint / "by-proposal" / BIG)])):
                results[f"{label} (cold)"] = measure(server, command)
                results[f"{label} (warm)"] = measure(server, command)
            return results
        finally:
            unmount_quietly(mountpoint)
            stop_process(process)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proposals", type=int, default=1000, help="proposals of one dataset each")
    parser.add_argument("--datasets", type=int, default=10_000, help="datasets of the one big proposal")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="scicatfs-bench-views-") as workdir:
        results = run(args.proposals, args.datasets, Path(workdir))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
