"""The comparison benchmark runs end to end on a tiny file, so it cannot rot.

Its numbers are not judged here (that is the benchmark's own job); only that
every measure is present, plausible, and that nothing is left mounted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scicatfs.mountpoint import mount_table
from tests.support.checklogs import LogChecker
from tests.support.requirements import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("/usr/sbin/sshd", "sftp", "sshfs", "fusermount3")


def _compare(*args: str, timeout: float, module: str = "compare") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", f"tests.benchmarks.{module}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _tiny_run(module: str, tmp_path: Path, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess[str], dict]:
    """Run benchmark ``module`` with ``args``; check it succeeded and left nothing behind; its JSON report."""
    _require_tools()
    out = tmp_path / "bench.json"
    work = tmp_path / "work"
    work.mkdir()
    result = _compare(*args, "--json", str(out), "--workdir", str(work), timeout=timeout, module=module)
    assert result.returncode == 0, result.stderr
    assert not [m for m in mount_table() if Path(m.mountpoint).is_relative_to(tmp_path)]
    assert list(work.iterdir()) == [], "the benchmark left files behind"
    return result, json.loads(out.read_text())


def _require_tools() -> None:
    """Skip locally without root or the peers; in CI their absence is a failure."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    problem = f"missing {', '.join(missing)}" if missing else None
    if os.geteuid() != 0:
        problem = "the benchmark's sshd chroot needs root"
    skip_or_fail(problem)


def _series_ok(series: dict, unit: str) -> None:
    assert series["unit"] == unit
    assert len(series["runs"]) == 1
    assert series["min"] == series["median"] == series["max"] > 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_tiny_run_reports_every_measure(tmp_path: Path) -> None:
    result, report = _tiny_run(
        "compare", tmp_path, "--size", "8M", "--runs", "1", "--rtt", "0,20", "--meta-files", "200",
        "--fio-runtime", "1", timeout=220,
    )  # fmt: skip
    assert report["machine"]["cores"] >= 1 and report["machine"]["date"]
    assert report["config"]["size"] == 8 * 1024 * 1024 and report["config"]["rtt_ms"] == [0, 20]
    results = report["results"]

    cold, first = results["cold_sequential"], results["first_4k"]
    assert set(cold) == set(first) == {"0ms", "20ms"}
    peers = {"sshfs", "sshfs-tuned", "sftp", "sftp-tuned"}
    assert set(cold["0ms"]) == {"scicatfs", "scitacean", *peers}
    assert set(cold["20ms"]) == {"scicatfs", *peers}
    for by_tool in cold.values():
        for series in by_tool.values():
            _series_ok(series, "MiB/s")
    assert set(first["0ms"]) == {
        "scicatfs", "sshfs", "sshfs-tuned", "scicatfs connected", "sshfs connected", "sshfs-tuned connected",
        "scitacean"}  # fmt: skip
    for by_tool in first.values():
        for series in by_tool.values():
            _series_ok(series, "ms")
    # Scitacean downloads the whole file before the probe can be read.
    assert first["0ms"]["scitacean"]["median"] > 8 / cold["0ms"]["scitacean"]["median"] * 1000 * 0.9

    assert set(results["warm_sequential"]) == {
        "scicatfs first open", "scicatfs re-read", "blob file", "blob file re-read",
        "sshfs kernel_cache re-read"}  # fmt: skip
    assert set(results["random_4k"]) == {
        f"{tool} {state}" for tool in ("scicatfs", "sshfs", "sshfs-tuned") for state in ("cold", "warm")}
    assert len(results["metadata"]) == 12
    for block, unit in (("warm_sequential", "MiB/s"), ("random_4k", "IOPS"), ("metadata", "s")):
        for series in results[block].values():
            _series_ok(series, unit)

    rss = report["peak_rss_mib"]
    assert set(rss) == {"cold @0ms", "cold @20ms", "warm", "random", "metadata"}
    assert all(10 < value < 4096 for value in rss.values())
    assert {target["name"] for target in report["targets"]} >= {
        "cold seq scicatfs/sshfs-tuned @0ms", "cold seq scicatfs/sftp-tuned @0ms",
        "cold seq scicatfs/sshfs-tuned @20ms", "first 4 KiB scitacean/scicatfs",
        "warm re-read scicatfs/blob re-read", "second ls -lR scicatfs/sshfs-tuned", "peak RSS scicatfs (MiB)"}  # fmt: skip
    assert report["machine"]["peers_tuned"]["sftp-tuned"] == "-R 64 -B 262144 -c aes128-gcm@openssh.com"
    assert "targets" in result.stdout and "scicatfs/sshfs-tuned" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "lots"], "not a size"),
        (["--rtt", "0,x"], "not a list of milliseconds"),
        (["--rtt", "-5"], ">= 0"),
        (["--runs", "0"], "at least 1"),
    ],
)
def test_bad_options_are_clear_errors(args: list[str], message: str, log_checker: LogChecker) -> None:
    result = _compare(*args, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr
    log_checker.check_output(result.stderr, "stderr")


@pytest.mark.timeout(120)
def test_views_benchmark_smoke_run(tmp_path: Path) -> None:
    """The views benchmark on a small catalog: every measure present, counts as designed."""
    if os.geteuid() != 0:
        skip_or_fail("mounting needs root here")
    out = tmp_path / "views.json"
    result = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.bench_views", "--proposals", "20", "--datasets", "1500",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=110, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["ls by-proposal (cold)"]["lines"] == 21  # 20 proposals and BIG
    assert report["ls by-proposal (cold)"]["routes"] == ["/api/v4/datasets/fullfacet"]
    assert report["ls -l by-proposal/BIG (cold)"]["lines"] == 1501  # "total" and one link each
    assert report["ls -l by-proposal/BIG (cold)"]["requests"] == 2  # two pages, no request per dataset
    assert report["ls by-proposal (warm)"]["requests"] == report["ls -l by-proposal/BIG (warm)"]["requests"] == 0
    assert not [m for m in mount_table() if "scicatfs-bench-views-" in m.mountpoint]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_fsspec_benchmark_reports_both_ways_and_the_ratios(tmp_path: Path) -> None:
    result, report = _tiny_run("bench_fsspec", tmp_path, "--size", "8M", "--runs", "1", "--meta-files", "60",
                               timeout=230)  # fmt: skip
    assert set(report["results"]) == set(report["ratios"]) == {"sequential cold", "sequential warm", "small"}
    for workload, by_way in report["results"].items():
        assert set(by_way) == {"mount", "fsspec"}
        unit = "files/s" if workload == "small" else "MiB/s"
        for series in by_way.values():
            _series_ok(series, unit)
        assert report["ratios"][workload] == pytest.approx(by_way["fsspec"]["median"] / by_way["mount"]["median"])
    assert "| small |" in result.stdout and "goal >= 0.8" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sources_benchmark_reports_each_comparison() -> None:
    """bench_sources on a tiny file: file:// rows (cold, warm) and an http:// row per RTT, each with a ratio."""
    missing = [tool for tool in ("nginx", "curl", "fusermount3") if not shutil.which(tool, path="/usr/sbin:/usr/bin")]
    skip_or_fail(f"missing {', '.join(missing)}" if missing else None)
    skip_or_fail(None if os.geteuid() == 0 else "the benchmark mounts FUSE as root")
    result = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.bench_sources", "--size", "4M", "--runs", "1", "--rtt", "0,20"],
        cwd=ROOT, capture_output=True, text=True, timeout=170, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert [" ".join(row[:-5]) for row in rows] == [
        "file:// mount / read()", "warm re-read mount / file", "http:// mount / curl @0ms",
        "http:// mount / curl @20ms"]  # fmt: skip
    for row in rows:
        assert row[-1].endswith("x") and float(row[-1][:-1]) > 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_workloads_benchmark_judges_every_workload_at_every_rtt(tmp_path: Path) -> None:
    """Small files, 16 threads, the HDF5 scan cold and warm, the first 4 KiB: each measured for
    both tools, each with its goals, at 0 and 20 ms, plus the daemon's peak RSS."""
    result, report = _tiny_run("workloads", tmp_path, "--rtt", "0,20", "--runs", "1", "--files", "20",
                               "--groups", "20", timeout=230)  # fmt: skip
    workloads = {"tar", "16 threads", "hdf5 cold", "hdf5 warm", "first 4 KiB"}
    assert set(report["results"]) == {"0ms", "20ms"}
    for by_workload in report["results"].values():
        assert set(by_workload) == workloads
        for by_tool in by_workload.values():
            assert set(by_tool) == {"scicatfs", "sshfs"}
            assert all(len(samples) == 1 and samples[0]["seconds"] > 0 for samples in by_tool.values())
    judged = {(goal["rtt"], goal["name"].rpartition(" ")[0]) for goal in report["goals"]}
    assert {(rtt, name) for rtt in (0, 20) for name in workloads} <= judged
    assert 0 < report["peak_rss_mib"] < 4096
    assert result.stdout.count("MISSED") + result.stdout.count("met ") == len(report["goals"])
