"""``scicat://`` (fsspec, no FUSE) against the mount, on the same test bed and the same caches.

    python -m tests.benchmarks.bench_fsspec [--size 1G] [--runs 3] [--meta-files 2000] [--json out.json]

The test bed of :mod:`tests.benchmarks.compare` (a real OpenSSH sshd on
127.0.0.1 with one random file and a many-file dataset, the project's catalog
server). Workloads, each run by both ways in alternation (mount, fsspec,
mount, ...), every figure a median with its min-max:

1. sequential, cold: the whole big file in 1 MiB reads, empty cache (a fresh
   mount; a fresh filesystem instance);
2. sequential, warm: the same, from a cache that holds the whole file;
3. small files, cold: list the many-file dataset recursively and read every file.

The ratio is fsspec over the mount (goal: at least 0.8). The page cache is
dropped before every run when that is allowed (root).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scicatfs.fsspec import ScicatFileSystem
from tests.benchmarks.compare import Series, machine, mib_per_s, parse_size
from tests.benchmarks.testbed import (
    BIG,
    BIG_NAME,
    MANY,
    META_FILE_SIZE,
    PASSWORD,
    USER,
    BenchmarkError,
    GiB,
    TestBed,
    bounded,
    read_whole,
)

GOAL = 0.8
WAYS = ("mount", "fsspec")


def filesystem(bed: TestBed, cache_dir: Path) -> ScicatFileSystem:
    """A new ``scicat://`` instance (its own thread and connections) with the mount's options."""
    assert bed.server is not None
    password = bed.workdir / "fsspec-password"
    if not password.exists():
        password.touch(mode=0o600)
        password.write_text(PASSWORD + "\n")
    endpoint = bed.direct
    return ScicatFileSystem(
        url=bed.server.url, username=USER, password_file=str(password), sftp_host=endpoint.host,
        sftp_port=endpoint.port, sftp_user=bed.sshd.username, identity_file=str(bed.sshd.client_key),
        known_hosts=str(endpoint.known_hosts), cache_dir=str(cache_dir), cache_size=max(4 * bed.size, GiB),
        skip_instance_cache=True,
    )  # fmt: skip


def mount_small_files(root: Path) -> int:
    count = 0
    for directory, _, names in os.walk(root):
        for name in names:
            if not directory.endswith(".scicat") and name != "metadata.json":
                count += len((Path(directory) / name).read_bytes()) // META_FILE_SIZE
    return count


def fsspec_small_files(fs: ScicatFileSystem, root: str) -> int:
    paths = [path for path in fs.find(root) if "/.scicat/" not in path and not path.endswith("/metadata.json")]
    return sum(len(fs.cat_file(path)) // META_FILE_SIZE for path in paths)


def timed_files(action: Callable[[], int], files: int, way: str) -> float:
    """Files per second of ``action`` (which returns how many full files it read)."""
    start = time.perf_counter()
    found = bounded(action, 600, f"reading the small files through {way}")
    elapsed = time.perf_counter() - start
    if found != files:
        raise BenchmarkError(f"{way} read {found} small files, the dataset has {files}")
    return files / elapsed


def run_once(bed: TestBed, way: str, workload: str, cache: Path) -> float:
    """One measurement of ``workload`` through ``way`` with the cache at ``cache``."""
    bed.cold()
    if way == "mount":
        place = MANY if workload == "small" else BIG
        with bed.view("scicatfs", bed.direct, place, cache_dir=cache) as path:
            if workload == "small":
                return timed_files(lambda: mount_small_files(path), bed.args.meta_files, way)
            return mib_per_s(bed.size, read_whole(path / BIG_NAME, bed.size))
    fs = filesystem(bed, cache)
    try:
        if workload == "small":
            return timed_files(lambda: fsspec_small_files(fs, MANY.pid), bed.args.meta_files, way)
        return mib_per_s(bed.size, read_whole(f"{BIG.pid}/{BIG_NAME}", bed.size, fs.open))
    finally:
        fs.close()


def run_all(bed: TestBed, runs: int) -> dict[str, dict[str, Series]]:
    results: dict[str, dict[str, Series]] = {}
    for workload, unit in (("sequential cold", "MiB/s"), ("sequential warm", "MiB/s"), ("small", "files/s")):
        series = results[workload] = {way: Series(unit) for way in WAYS}
        for _ in range(runs):
            for way in WAYS:
                cache = bed.fresh_dir(f"cache-{way}")
                try:
                    if workload == "sequential warm":
                        run_once(bed, way, "sequential", cache)  # fill the cache the same way
                    series[way].values.append(run_once(bed, way, workload.split()[0], cache))
                finally:
                    shutil.rmtree(cache, ignore_errors=True)
        print(f"{workload}: " + ", ".join(f"{way} {series[way]}" for way in WAYS), file=sys.stderr, flush=True)
    return results


def report(results: dict[str, dict[str, Series]]) -> tuple[str, dict[str, float]]:
    ratios = {workload: series["fsspec"].median / series["mount"].median for workload, series in results.items()}
    lines = ["| workload | mount | scicat:// | ratio (goal >= 0.8) |", "|---|---|---|---|"]
    for workload, series in results.items():
        mark = "met" if ratios[workload] >= GOAL else "missed"
        lines.append(f"| {workload} | {series['mount']} | {series['fsspec']} | {ratios[workload]:.2f} ({mark}) |")
    return "\n".join(lines), ratios


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_fsspec",
                                     description="scicat:// through fsspec against the scicatfs mount.")  # fmt: skip
    parser.add_argument("--size", type=parse_size, default=GiB, help="size of the random file (default 1G)")
    parser.add_argument("--runs", type=int, default=3, help="runs per way and workload (default 3)")
    parser.add_argument("--meta-files", type=int, default=2000, help="files in the small-file dataset (default 2000)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--workdir", type=Path, help="where mounts and caches go (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.meta_files < 1:
        parser.error("--runs and --meta-files must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    described = machine()
    if os.geteuid() != 0:
        print("bench_fsspec: run as root: sshd needs it for its chroot (and drop_caches)", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="scicatfs-bench-fsspec-", dir=args.workdir))
    try:
        with TestBed(args, workdir) as bed:
            results = run_all(bed, args.runs)
            can_drop = bed.can_drop_caches
    except BenchmarkError as error:
        print(f"bench_fsspec: {error}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    table, ratios = report(results)
    print(table)
    if args.json is not None:
        document: dict[str, Any] = {
            "machine": described,
            "config": {"size": args.size, "runs": args.runs, "meta_files": args.meta_files, "drop_caches": can_drop},
            "results": {w: {way: s.to_json() for way, s in series.items()} for w, series in results.items()},
            "ratios": ratios,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
