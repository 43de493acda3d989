"""Random reads through a real mount over a long round trip (a delay proxy in front of sshd)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from scicatfs.demo.fixtures import Catalog
from tests.benchmarks.delay_proxy import DelayProxy
from tests.support.mounts import Mount
from tests.support.records import dataset_record
from tests.support.sshd import OpenSSHServer


MiB = 1024 * 1024
RTT = 0.04


def _cached(mount: Mount, pid: str, path: str) -> int:
    files = json.loads((mount.dataset(pid) / ".scicat" / "files.json").read_text())["files"]
    return next(entry["cached"] for entry in files if entry["path"] == path)


def _pread(path: Path, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, 4096, offset)
    finally:
        os.close(fd)


def test_a_random_read_over_a_long_round_trip_fetches_a_file_of_a_few_mib_whole(
    demo_sftp_files: OpenSSHServer, make_mount: Callable[..., Mount], tmp_path: Path
) -> None:
    """At 40 ms RTT, two random 4 KiB reads of a 10 MiB file: the first fetches its block
    (and measures the link), the second the whole file, so a later read anywhere needs
    no round trip. With one block per miss, 256 KiB of the file would be cached."""
    pid, name, size = "20.500.12269/long-rtt", "scan.h5", 10 * MiB
    catalog = Catalog()
    catalog.add_user("stibbons", "stibbons-password", ["uu"], "stibbons@example.org")
    catalog.add_dataset(dataset_record(pid, "/long-rtt"), [{"path": name, "size": size}])
    sshd = demo_sftp_files
    with DelayProxy(sshd.host, sshd.port, rtt=RTT) as proxy:
        known_hosts = tmp_path / "known_hosts"
        key = sshd.known_hosts.read_text().split(None, 1)[1]
        known_hosts.write_text(f"[{sshd.host}]:{proxy.port} {key}")
        mount = make_mount(catalog, args=["--sftp-port", str(proxy.port), "--known-hosts", str(known_hosts)])
        path = mount.dataset(pid) / name
        expected = catalog.content(pid, name)
        for offset in (9 * MiB + 12345, MiB + 4321):  # far apart: random, not sequential
            assert _pread(path, offset) == expected[offset : offset + 4096]
        deadline = time.monotonic() + 20
        while _cached(mount, pid, name) < size and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _cached(mount, pid, name) == size
        status = json.loads((mount.path / ".scicat" / "status.json").read_text())
        # the two reads' own blocks, then the file in pieces of a round trip's worth (not 80 blocks)
        assert status["transfer"]["requests"] <= 2 + 10
        offset = 5 * MiB + 999
        assert _pread(path, offset) == expected[offset : offset + 4096]
        after = json.loads((mount.path / ".scicat" / "status.json").read_text())
        assert after["transfer"]["requests"] == status["transfer"]["requests"]
