"""N mounts reading one dataset at once, with and without the shared cache tier.

Each mount is its own ``scicatfs mount`` process with its own local cache (a
"node"); with the shared tier they all get ``--shared-cache`` on one
directory. For N = 1, 2, 4 (``--mounts``) it reports the bytes that came from
the source (the sum of every mount's SFTP ``bytes_read``) and the wall time
until the last mount has read the whole dataset, cold (fresh caches, fresh
shared directory). Run as root, from the repository:

    .venv/bin/python -m tests.benchmarks.bench_cluster --size 256M --files 4 --mounts 1,2,4

The machine's load is part of the wall time: compare runs made side by side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from scicatfs.config import parse_size
from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.server import CatalogServer
from tests.support.mounts import Mount, start_mount
from tests.support.records import dataset_record
from tests.support.sshd import OpenSSHServer

PID = "bench/cluster"
READ_TIMEOUT = 1800.0


def _catalog(size: int, files: int) -> Catalog:
    catalog = Catalog.load_default()
    each = size // files
    names = {f"part{index}.bin": os.urandom(each) for index in range(files)}
    catalog.add_dataset(
        dataset_record(PID, f"/{PID}"), [{"path": name, "size": each} for name in names],
        chk_alg="md5", contents=names,
    )  # fmt: skip
    return catalog


def _read_dataset(mount: Mount, names: list[str], digests: dict[str, str], failures: list[str]) -> None:
    for name in names:
        hasher = hashlib.md5()
        with open(mount.dataset(PID) / name, "rb") as file:
            while piece := file.read(1 << 20):
                hasher.update(piece)
        if hasher.hexdigest() != digests[name]:
            failures.append(f"{mount.path}: {name} read wrong bytes")


def run_once(
    catalog: Catalog, server: CatalogServer, sshd: OpenSSHServer, work: Path, mounts: int, shared: bool
) -> dict[str, Any]:
    """One cold run: start ``mounts`` mounts, read the dataset from all at once, unmount."""
    names = [entry["path"] for entry in catalog.files(PID)]
    digests = {name: hashlib.md5(catalog.content(PID, name)).hexdigest() for name in names}
    shared_dir = work / "shared"
    shared_dir.mkdir()
    args = ["--shared-cache", str(shared_dir)] if shared else []
    started: list[Mount] = []
    try:
        for index in range(mounts):
            node = work / f"node{index}"
            node.mkdir()
            started.append(start_mount(catalog, server, sshd, node, args=args))
        failures: list[str] = []
        threads = [
            threading.Thread(target=_read_dataset, args=(mount, names, digests, failures), daemon=True)
            for mount in started
        ]
        begin = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(READ_TIMEOUT)
        wall = time.monotonic() - begin
        if failures or any(thread.is_alive() for thread in threads):
            raise RuntimeError("; ".join(failures) or "a reader did not finish in time")
        statuses = [json.loads((mount.path / ".scicat" / "status.json").read_text()) for mount in started]
    finally:
        for mount in started:
            mount.unmount()
    dataset = sum(entry["size"] for entry in catalog.files(PID))
    source = sum(status["transfer"]["bytes_read"] for status in statuses)
    return {
        "mounts": mounts,
        "shared": shared,
        "dataset_bytes": dataset,
        "source_bytes": source,
        "source_per_dataset": round(source / dataset, 3),
        "shared_bytes": sum(status["tiers"]["shared_bytes"] for status in statuses),
        "wall_seconds": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="256M", help="dataset size (default 256M)")
    parser.add_argument("--files", type=int, default=4, help="files in the dataset (default 4)")
    parser.add_argument("--mounts", default="1,2,4", help="comma-separated mount counts (default 1,2,4)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    counts = [int(part) for part in args.mounts.split(",")]
    catalog = _catalog(parse_size(args.size), args.files)
    results = []
    sshd = OpenSSHServer()
    sshd.start()
    try:
        catalog.materialize(sshd.root)
        with CatalogServer(catalog) as server, tempfile.TemporaryDirectory(prefix="bench-cluster-") as scratch:
            for mounts in counts:
                for shared in (False, True):
                    work = Path(scratch) / f"{mounts}-{'shared' if shared else 'local'}"
                    work.mkdir()
                    result = run_once(catalog, server, sshd, work, mounts, shared)
                    results.append(result)
                    print(
                        f"N={mounts} shared={'yes' if shared else 'no '}: {result['source_bytes'] / 2**20:8.1f} MiB"
                        f" from the source ({result['source_per_dataset']:.2f} x the dataset),"
                        f" {result['wall_seconds']:6.2f} s", flush=True,
                    )  # fmt: skip
    finally:
        sshd.close()
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
