"""Running scicatfs for real, end to end: the mount.fuse3 form and systemd readiness.

libfuse's own mount.fuse3 starts the real scicatfs; a datagram socket bound
here plays systemd's $NOTIFY_SOCKET. The catalog is the project's demo
server, the files come from a real OpenSSH sshd, and every mount is a real
FUSE mount that is always taken down again.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.server import CatalogServer
from tests.support.checklogs import watch_file
from tests.support.mounts import daemons_of, wait_until
from tests.support.requirements import missing_program, skip_or_fail
from tests.support.sshd import OpenSSHServer

THAUM_FLUX = "20.500.12269/72fe3ff6-105b-4c7f-b9d0-073b67c90ec3"
DEMO_USER = "stibbons"



@pytest.fixture(autouse=True)
def _needs_mount_fuse3_and_dev_fuse() -> None:
    skip_or_fail(missing_program("mount.fuse3", "fuse3"))
    skip_or_fail(None if os.path.exists("/dev/fuse") else "no /dev/fuse")


# mount(8) finds scicatfs in its fixed PATH; here it is this environment's.
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


def _mount_entry(mountpoint: Path) -> list[str] | None:
    """The /proc/self/mounts fields for ``mountpoint``, or None."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(mountpoint):
            return fields
    return None


@pytest.fixture
def served(tmp_path: Path, demo_catalog: Catalog, sshd: OpenSSHServer) -> dict[str, str]:
    """scicatfs options (field name -> text) for the demo catalog's files on the real sshd."""
    demo_catalog.materialize(sshd.root)
    password = tmp_path / "password"
    password.touch(mode=0o600)
    password.write_text(demo_catalog.users[DEMO_USER].password + "\n")
    log = tmp_path / "daemon.log"
    watch_file(log)  # the log checker reads what the mount logged
    return {
        "username": DEMO_USER, "password_file": str(password),
        "sftp_host": sshd.host, "sftp_port": str(sshd.port), "sftp_user": sshd.username,
        "identity_file": str(sshd.client_key), "known_hosts": str(sshd.known_hosts),
        "cache_dir": str(tmp_path / "cache"), "cache_size": "64M", "log_level": "debug",
        "log_file": str(log),
    }


def test_mount_fuse3_form_mounts_reads_and_unmounts(
    mountpoint: Path, catalog_server: CatalogServer, demo_catalog: Catalog, served: dict[str, str]
) -> None:
    options = ",".join(
        # what an fstab line would carry; mount(8) and mount.fuse3 strip the bookkeeping
        ["_netdev", "noauto", "nofail", "x-systemd.device-timeout=10s", "nodev", "nosuid"]
        + [f"{key}={value}" for key, value in served.items()]
    )
    result = subprocess.run(
        ["mount.fuse3", f"{catalog_server.url}/api/v3", str(mountpoint), "-t", "fuse.scicatfs", "-o", options],
        env=ENV, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr

    # The helper returned only once the mount answers, like sshfs.
    _, _, fstype, mount_options, *_ = _mount_entry(mountpoint) or [""] * 4
    assert fstype == "fuse.scicatfs"
    assert "ro" in mount_options.split(",") and "nosuid" in mount_options.split(",")
    dataset = mountpoint / THAUM_FLUX
    assert (dataset / "flux.dat").read_bytes() == demo_catalog.content(THAUM_FLUX, "flux.dat")
    assert THAUM_FLUX.split("/")[0] in os.listdir(mountpoint)

    daemons = daemons_of(mountpoint)
    assert daemons, "no scicatfs process serves the mount"
    # `umount` as root (what fstab users type), fusermount3 otherwise.
    unmount = ["umount"] if os.geteuid() == 0 else ["fusermount3", "-u"]
    subprocess.run([*unmount, str(mountpoint)], check=True, timeout=30)
    assert _mount_entry(mountpoint) is None
    assert wait_until(lambda: not daemons_of(mountpoint), timeout=20), "scicatfs did not exit after the unmount"


def test_mount_fuse3_form_reports_a_bad_option_in_one_line(mountpoint: Path) -> None:
    result = subprocess.run(
        ["mount.fuse3", "https://scicat.example.org", str(mountpoint), "-t", "fuse.scicatfs",
         "-o", "cache_size=lots"],
        env=ENV, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2  # a usage error, passed on by mount.fuse3
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("scicatfs: cache_size") and "invalid size 'lots'" in line
    assert _mount_entry(mountpoint) is None


def test_foreground_mount_notifies_systemd_when_it_answers(
    tmp_path: Path, mountpoint: Path, catalog_server: CatalogServer, demo_catalog: Catalog,
    served: dict[str, str],
) -> None:
    """What ``Type=notify`` in scicatfs@.service relies on: READY=1 means the files are there."""
    notify_path = tmp_path / "notify"
    flags = [arg for key, value in served.items() for arg in (f"--{key.replace('_', '-')}", value)]
    log = tmp_path / "scicatfs.log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd, log.open("wb") as stderr:
        systemd.bind(str(notify_path))
        systemd.settimeout(60)
        process = subprocess.Popen(
            [sys.executable, "-m", "scicatfs", "mount", str(mountpoint), "--foreground",
             "--url", f"{catalog_server.url}/api/v3", *flags],
            env={**ENV, "NOTIFY_SOCKET": str(notify_path)},
            stdout=subprocess.DEVNULL, stderr=stderr,  # a file: a full pipe would stall the mount
        )
        try:
            messages = [systemd.recv(4096)]
            while b"READY=1" not in messages[-1].split(b"\n"):
                messages.append(systemd.recv(4096))
            # Ready means answering: no polling, the data is readable right now.
            assert _mount_entry(mountpoint) is not None
            assert (mountpoint / THAUM_FLUX / "flux.dat").read_bytes() == demo_catalog.content(THAUM_FLUX, "flux.dat")

            process.send_signal(signal.SIGTERM)  # what systemctl stop does after ExecStop
            while b"STOPPING=1" not in messages[-1].split(b"\n"):
                messages.append(systemd.recv(4096))
            assert process.wait(timeout=30) == 0, log.read_text()
            assert _mount_entry(mountpoint) is None
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
