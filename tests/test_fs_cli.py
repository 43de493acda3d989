"""The ``scicatfs`` command: background and foreground mounts, signals, errors, unmount, demo."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.server import CatalogServer
from scicatfs.mountpoint import find_mount
from tests.support.checklogs import LogChecker, watch_file
from tests.support.mounts import (
    Mount,
    daemons_of,
    stop_process,
    unmount_quietly,
    wait_for_mount,
    wait_until,
)
from tests.support.sshd import OpenSSHServer

THAUM = "20.500.12269/72fe3ff6-105b-4c7f-b9d0-073b67c90ec3"
SCICATFS = [sys.executable, "-m", "scicatfs"]
TIMEOUT = 60


def scicatfs(*args: str | Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SCICATFS, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def mount_args(server: CatalogServer, sshd: OpenSSHServer, tmp_path: Path, password: str = "demo") -> list[str]:
    password_file = tmp_path / "password"
    password_file.touch(mode=0o600)
    password_file.write_text(password + "\n")
    return [
        "--url", server.url, "--username", "stibbons", "--password-file", str(password_file),
        "--sftp-host", sshd.host, "--sftp-port", str(sshd.port), "--sftp-user", sshd.username,
        "--identity-file", str(sshd.client_key), "--known-hosts", str(sshd.known_hosts),
        "--cache-dir", str(tmp_path / "cache"), "--log-file", str(daemon_log(tmp_path)),
    ]


def daemon_log(tmp_path: Path) -> Path:
    """Where a mount started by :func:`mount_args` logs; the log checker reads it at teardown."""
    path = tmp_path / "daemon.log"
    watch_file(path)
    return path


def wait_gone(path: Path, timeout: float = 15.0) -> bool:
    return wait_until(lambda: not daemons_of(path), timeout)


def test_background_mount_returns_once_it_answers(
    catalog_server: CatalogServer, demo_sftp_files: OpenSSHServer, demo_catalog: Catalog,
    mountpoint: Path, tmp_path: Path,
) -> None:
    result = scicatfs("mount", mountpoint, *mount_args(catalog_server, demo_sftp_files, tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # quiet on success, like sshfs
    # No polling: the command returned only after the mount answered.
    assert (mountpoint / THAUM / "flux.dat").read_bytes() == demo_catalog.content(THAUM, "flux.dat")
    assert daemons_of(mountpoint), "the daemon should keep running"

    result = scicatfs("unmount", mountpoint)
    assert result.returncode == 0, result.stderr
    assert find_mount(mountpoint) is None
    assert wait_gone(mountpoint), "the daemon should exit after unmount"


def test_background_mount_logs_to_its_log_file_after_it_detaches(
    catalog_server: CatalogServer, demo_sftp_files: OpenSSHServer, mountpoint: Path, tmp_path: Path,
) -> None:
    result = scicatfs("mount", mountpoint, *mount_args(catalog_server, demo_sftp_files, tmp_path))
    assert result.returncode == 0, result.stderr
    try:
        (mountpoint / THAUM / "flux.dat").read_bytes()
    finally:
        assert scicatfs("unmount", mountpoint).returncode == 0
    assert wait_gone(mountpoint)
    log = daemon_log(tmp_path).read_text()
    # The whole daemon's life is in the file: before the fork, and after it let go of the terminal.
    assert f"INFO scicatfs.mount: mounted {catalog_server.url}" in log
    assert "INFO scicatfs.mount: unmounted" in log
    assert result.stderr == ""


def test_a_log_file_that_cannot_be_written_is_refused_before_mounting(
    catalog_server: CatalogServer, demo_sftp_files: OpenSSHServer, mountpoint: Path, tmp_path: Path,
) -> None:
    args = mount_args(catalog_server, demo_sftp_files, tmp_path)
    args[args.index("--log-file") + 1] = str(tmp_path / "no-such-dir" / "daemon.log")
    result = scicatfs("mount", mountpoint, *args)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"scicatfs: cannot write the log file {tmp_path / 'no-such-dir' / 'daemon.log'}: No such file or directory"
    )
    assert find_mount(mountpoint) is None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_unmount_cleanly(make_mount, signum: int) -> None:  # type: ignore[no-untyped-def]
    mount: Mount = make_mount()
    os.listdir(mount.path)
    mount.process.send_signal(signum)
    assert mount.process.wait(timeout=15) == 0
    assert find_mount(mount.path) is None
    assert os.listdir(mount.path) == []


def test_stale_mountpoint_is_refused_then_cleaned_by_unmount(
    make_mount, catalog_server: CatalogServer, demo_sftp_files: OpenSSHServer, tmp_path: Path,
) -> None:  # type: ignore[no-untyped-def]
    mount: Mount = make_mount()
    mount.process.kill()
    mount.process.wait(timeout=10)
    with pytest.raises(OSError) as raised:
        os.listdir(mount.path)
    assert raised.value.errno == errno.ENOTCONN

    result = scicatfs("mount", mount.path, *mount_args(catalog_server, demo_sftp_files, tmp_path))
    assert result.returncode == 1
    assert "stale" in result.stderr and f"scicatfs unmount {mount.path}" in result.stderr

    result = scicatfs("unmount", mount.path)
    assert result.returncode == 0, result.stderr
    assert find_mount(mount.path) is None
    assert os.listdir(mount.path) == []


def test_unmount_of_something_not_mounted(tmp_path: Path) -> None:
    result = scicatfs("unmount", tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == f"scicatfs: {tmp_path} is not mounted"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing mountpoint", "does not exist"),
        ("mountpoint is a file", "is not a directory"),
        ("mountpoint not empty", "is not empty"),
        ("catalog unreachable", "catalog at http://127.0.0.1"),
        ("wrong password", "stibbons"),
        ("token file readable by others", "chmod 600"),
        ("bad url", "must start with http:// or https://"),
        ("identity file missing", "cannot read identity file"),
    ],
)
def test_mount_errors_are_one_clear_line(
    case: str, expected: str, catalog_server: CatalogServer, demo_sftp_files: OpenSSHServer,
    mountpoint: Path, tmp_path: Path, log_checker: LogChecker,
) -> None:
    args = mount_args(catalog_server, demo_sftp_files, tmp_path, password="wrong" if case == "wrong password" else "demo")
    target = mountpoint
    if case == "missing mountpoint":
        target = tmp_path / "absent"
    elif case == "mountpoint is a file":
        target = tmp_path / "file"
        target.write_text("x")
    elif case == "mountpoint not empty":
        (mountpoint / "something").write_text("x")
    elif case == "catalog unreachable":
        args[args.index("--url") + 1] = f"http://127.0.0.1:{_free_port()}"
    elif case == "token file readable by others":
        token = tmp_path / "token"
        token.write_text(catalog_server.issue_token("stibbons"))
        token.chmod(0o644)
        start = args.index("--username")
        args[start:start + 4] = ["--token-file", str(token)]
    elif case == "bad url":
        args[args.index("--url") + 1] = "ftp://example.org"
    elif case == "identity file missing":
        args[args.index("--identity-file") + 1] = str(tmp_path / "no-such-key")

    started = time.monotonic()
    result = scicatfs("mount", target, *args)
    assert result.returncode == (2 if case == "bad url" else 1)  # a usage error, or a failure to mount
    (line,) = result.stderr.strip().splitlines()  # one line, nothing said twice
    assert line.startswith("scicatfs: ") and expected in line, result.stderr
    log_checker.check_output(result.stderr, "stderr")
    assert time.monotonic() - started < 45
    assert find_mount(target) is None
    assert wait_gone(target)


def test_mount_helper_form(
    catalog_server: CatalogServer, demo_sftp_files: OpenSSHServer, demo_catalog: Catalog,
    mountpoint: Path, tmp_path: Path,
) -> None:
    """``scicatfs URL MOUNTPOINT -o key=value,...`` is what mount.fuse3 runs for fstab lines."""
    args = mount_args(catalog_server, demo_sftp_files, tmp_path)
    pairs = dict(zip(args[::2], args[1::2]))
    url = pairs.pop("--url")
    options = ",".join(f"{key[2:].replace('-', '_')}={value}" for key, value in pairs.items())
    result = scicatfs(url, mountpoint, "-o", f"{options},_netdev,noauto,xattrs")
    assert result.returncode == 0, result.stderr
    assert find_mount(mountpoint).fstype == "fuse.scicatfs"  # type: ignore[union-attr]
    assert os.getxattr(mountpoint / THAUM / "flux.dat", "user.scicat.pid") == THAUM.encode()


def test_demo_command(tmp_path: Path, demo_catalog: Catalog) -> None:
    mountpoint = tmp_path / "demo"  # created by the demo, and removed again
    log = tmp_path / "demo.log"
    with open(log, "wb") as output:
        process = subprocess.Popen([*SCICATFS, "demo", str(mountpoint)], stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for_mount(mountpoint, process, log, timeout=30)
        deadline = time.monotonic() + 10
        while "Press Ctrl-C" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        text = log.read_text()
        flux = mountpoint / THAUM / "flux.dat"
        assert f"cat {flux}" in text and f"cat {mountpoint / THAUM}/metadata.json" in text
        listing = subprocess.run(["ls", str(mountpoint)], capture_output=True, text=True, timeout=TIMEOUT, check=True)
        assert "20.500.12269" in listing.stdout.split()
        cat = subprocess.run(["cat", str(flux)], capture_output=True, timeout=TIMEOUT, check=True)
        assert cat.stdout == demo_catalog.content(THAUM, "flux.dat")

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
        assert find_mount(mountpoint) is None
        assert not mountpoint.exists()
    finally:
        unmount_quietly(mountpoint)
        stop_process(process)


def test_unmount_of_a_busy_mount_says_so(make_mount) -> None:  # type: ignore[no-untyped-def]
    mount: Mount = make_mount()
    with open(mount.dataset(THAUM) / "flux.dat", "rb"):
        result = scicatfs("unmount", mount.path)
        assert result.returncode == 1
        assert result.stderr.startswith(f"scicatfs: cannot unmount {mount.path}") and "busy" in result.stderr
        assert find_mount(mount.path) is not None
    assert scicatfs("unmount", mount.path).returncode == 0
    assert mount.process.wait(timeout=15) == 0
