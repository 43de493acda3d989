"""Per-operation workloads against sshfs: a directory of small files read by tar and by 16 threads.

    python -m tests.benchmarks.workloads --rtt 0,20 --runs 3

Uses the comparison's test bed (sshd, catalog server, delay proxy). Each run
mounts both tools afresh (fresh scicatfs cache, page cache dropped), the tools
alternate run by run, and the report gives medians, the ratio of scicatfs's
time to sshfs's, the daemon's CPU seconds per MiB (scicatfs's mount process,
all threads; sshfs's process plus its ssh) and met/MISSED against the goals.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.benchmarks.compare import parse_rtts
from tests.benchmarks.testbed import DatasetPlace, TestBed, drop_caches

FRAMES = DatasetPlace("20.500.12269/bench-frames", "/bench/frames")
FRAME_COUNT = 400
FRAME_SIZE = 64 * 1024
TOOLS = ("scicatfs", "sshfs")
#: Goals for scicatfs's time / sshfs's time, by added RTT (ms); other RTTs use the 20 ms goals.
GOALS = {0: {"tar": 1.0, "16 threads": 1.0}, 20: {"tar": 0.15, "16 threads": 0.15}}


def write_frames(bed: TestBed) -> None:
    """400 files of 64 KiB (random, incompressible) in frames/, registered in the catalog."""
    root = bed.sshd.local_path(FRAMES.folder) / "frames"
    root.mkdir(parents=True)
    files = []
    for index in range(FRAME_COUNT):
        name = f"frames/frame_{index:04d}.tif"
        (root.parent / name).write_bytes(random.randbytes(FRAME_SIZE))
        files.append({"path": name, "size": FRAME_SIZE, "time": "2026-01-01T00:00:00.000Z"})
    bed._record(FRAMES, files)


def tar(directory: Path) -> float:
    started = time.perf_counter()
    # to a pipe: GNU tar skips reading the files when the archive is /dev/null
    subprocess.run("tar cf - . | cat >/dev/null", shell=True, cwd=directory / "frames", check=True, timeout=600)
    return time.perf_counter() - started


def threads(directory: Path) -> float:
    """16 threads read the sorted file list, as a data loader does."""
    names = sorted((directory / "frames").iterdir())
    started = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        sizes = list(pool.map(lambda path: len(path.read_bytes()), names))
    if sum(sizes) != FRAME_COUNT * FRAME_SIZE:
        raise RuntimeError(f"read {sum(sizes)} bytes, expected {FRAME_COUNT * FRAME_SIZE}")
    return time.perf_counter() - started


WORKLOADS: dict[str, Callable[[Path], float]] = {"tar": tar, "16 threads": threads}


def daemon_cpu(mountpoint: Path) -> float:
    """CPU seconds (user + system, all threads) of the processes serving ``mountpoint`` so far."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        joined = b" ".join(command)
        serves = str(mountpoint).encode() in joined and (b"scicatfs" in joined or b"sshfs" in joined)
        if serves or (b"ssh" in command[0] and b"-s" in command and b"sftp" in joined):
            total += (int(stat[11]) + int(stat[12])) / tick
    return total


def measure(bed: TestBed, rtt: int, runs: int) -> dict[str, dict[str, list[tuple[float, float]]]]:
    results: dict[str, dict[str, list[tuple[float, float]]]] = {w: {t: [] for t in TOOLS} for w in WORKLOADS}
    with bed.endpoint(rtt) as endpoint:
        for run in range(runs):
            for workload, action in WORKLOADS.items():
                for tool in TOOLS if run % 2 == 0 else reversed(TOOLS):
                    drop_caches()
                    with bed.view(tool, endpoint, FRAMES) as directory:
                        os.listdir(directory / "frames")  # both tools: the listing is not what is timed
                        mountpoint = directory.parent.parent if tool == "scicatfs" else directory
                        before = daemon_cpu(mountpoint)
                        seconds = action(directory)
                        cpu = daemon_cpu(mountpoint) - before
                    results[workload][tool].append((seconds, cpu))
                    print(f"  +{rtt} ms {workload} {tool}: {seconds * 1000:.0f} ms, cpu {cpu:.2f} s",
                          file=sys.stderr, flush=True)
    return results


def report(rtt: int, results: dict[str, dict[str, list[tuple[float, float]]]]) -> list[str]:
    lines = []
    mib = FRAME_COUNT * FRAME_SIZE / 2**20
    for workload, by_tool in results.items():
        medians = {tool: statistics.median(s for s, _ in runs) for tool, runs in by_tool.items()}
        cpu = {tool: statistics.median(c for _, c in runs) / mib for tool, runs in by_tool.items()}
        ratio = medians["scicatfs"] / medians["sshfs"]
        goal = GOALS.get(rtt, GOALS[20])[workload]
        verdict = "met" if ratio <= goal else "MISSED"
        lines.append(
            f"+{rtt} ms  {workload:<10}  scicatfs {medians['scicatfs'] * 1000:7.0f} ms"
            f"  sshfs {medians['sshfs'] * 1000:7.0f} ms  ratio {ratio:5.2f}x (goal <= {goal}x: {verdict})"
            f"  cpu s/MiB {cpu['scicatfs']:.4f} vs {cpu['sshfs']:.4f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtt", type=parse_rtts, default=[0, 20, 50])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    bed_args = argparse.Namespace(size=1024 * 1024, meta_files=10, runs=args.runs)
    workdir = Path(tempfile.mkdtemp(prefix="scicatfs-workloads-"))
    lines = []
    try:
        with TestBed(bed_args, workdir) as bed:
            write_frames(bed)
            for rtt in args.rtt:
                lines += report(rtt, measure(bed, rtt, args.runs))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
