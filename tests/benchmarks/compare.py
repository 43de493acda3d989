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
   remount, then re-read), the cached blob file read directly (from disk, then
   again from the page cache), and sshfs ``-o kernel_cache`` re-reading what
   it just read;
4. random 4 KiB reads (fio, else a Python loop), cold then warm (after one
   full read through the same mount): scicatfs vs sshfs with ``kernel_cache``,
   as in 3;
5. ``ls -lR`` and ``find | wc -l`` over the many-file dataset, first and
   second time on a fresh mount: scicatfs vs sshfs on the same tree;
6. peak RSS (VmHWM) of every scicatfs process.

The peers run twice: with their defaults (``sshfs``, ``sftp``) and tuned as an
expert would (``sshfs-tuned``: the cipher scicatfs negotiates and
``max_conns=4``; ``sftp-tuned``: ``-R 64 -B 262144`` and the same cipher).
The goals are judged against the tuned rows. ``sftp get`` figures are the
transfer alone: the clock starts once the session is up (process start and
SSH handshake excluded) and stops when the ``get`` has finished.

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
import dataclasses
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import scicatfs
from tests.benchmarks.testbed import (
    BIG,
    BIG_NAME,
    FIO,
    MANY,
    META_FILES_PER_DIR,
    PROBE_SIZE,
    SFTP_TUNED,
    BenchmarkError,
    GiB,
    KiB,
    MiB,
    TestBed,
    read_probe,
    read_whole,
    sshfs_tuned_options,
    timed_shell,
)

#: Tools compared at added RTT (Scitacean's paramiko download is measured at 0 ms only).
MOUNTS = ("scicatfs", "sshfs", "sshfs-tuned")
SFTP_TOOLS = ("sftp", "sftp-tuned")
COLD_TOOLS = (*MOUNTS, *SFTP_TOOLS, "scitacean")
LATENCY_TOOLS = (*MOUNTS, *SFTP_TOOLS)
#: The peer each goal is judged against: the tuned one.
SSHFS, SFTP = "sshfs-tuned", "sftp-tuned"
#: At most this many entries scicatfs shows in a dataset beyond its files and directories.
SCICATFS_EXTRA_ENTRIES = 5


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
                elif tool in SFTP_TOOLS:
                    seconds = bed.sftp_get(endpoint, tuned=tool == "sftp-tuned")
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
    names = ("scicatfs first open", "scicatfs re-read", "blob file", "blob file re-read",
             "sshfs kernel_cache re-read")
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
        add("blob file re-read", blob)  # from the page cache, like the re-reads through the mounts
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
            # sshfs keeps what it read only with kernel_cache (as in the warm sequential measure).
            options = () if tool == "scicatfs" else ("kernel_cache",)
            with bed.view(tool, bed.direct, BIG, sshfs_options=options) as directory:
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
        "peers_tuned": {"sshfs-tuned": "-o " + ",".join(sshfs_tuned_options()),
                        "sftp-tuned": shlex.join(SFTP_TUNED)},
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
            check(f"cold seq scicatfs/{SSHFS} @0ms", ratio(series, "scicatfs", SSHFS), ">= 1.0x", lambda v: v >= 1.0)
            check(f"cold seq scicatfs/{SFTP} @0ms", ratio(series, "scicatfs", SFTP), ">= 1.5x", lambda v: v >= 1.5)
            check("cold seq scicatfs/scitacean @0ms", ratio(series, "scicatfs", "scitacean"), ">= 1.0x",
                  lambda v: v >= 1.0)
        else:
            check(f"cold seq scicatfs/{SSHFS} @{rtt}", ratio(series, "scicatfs", SSHFS), ">= 3x", lambda v: v >= 3)
    first = results["first_4k"]["0ms"]
    check("first 4 KiB scitacean/scicatfs", ratio(first, "scitacean", "scicatfs"), ">= 100x", lambda v: v >= 100)
    check(f"first 4 KiB scicatfs/{SSHFS}", ratio(first, "scicatfs", SSHFS), "<= 1.5x", lambda v: v <= 1.5)
    check("first 4 KiB scicatfs (ms)", first["scicatfs"].median, "<= 30 ms", lambda v: v <= 30)
    check("first 4 KiB scicatfs connected (ms)", first["scicatfs connected"].median, "<= 30 ms",
          lambda v: v <= 30)
    warm = results["warm_sequential"]
    check("warm first open scicatfs/blob", ratio(warm, "scicatfs first open", "blob file"), ">= 0.5x",
          lambda v: v >= 0.5)
    check("warm re-read scicatfs/blob re-read", ratio(warm, "scicatfs re-read", "blob file re-read"),
          "~1x (>= 0.9x)", lambda v: v >= 0.9)  # page cache against page cache
    meta = results["metadata"]
    check(f"second ls -lR scicatfs/{SSHFS}", ratio(meta, "scicatfs ls -lR second", f"{SSHFS} ls -lR second"),
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
        "cold_sequential": "1. cold sequential read (sftp: the get alone, process start and SSH handshake excluded)",
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
