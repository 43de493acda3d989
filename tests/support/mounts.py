"""FUSE mount fixtures: ``scicatfs mount`` as a real subprocess against real servers.

Each mount runs the installed command in the foreground (``python -m scicatfs
mount ... --foreground``) against the project's catalog server and the real
OpenSSH sshd, whose chroot holds the catalog's files (``Catalog.materialize``).
The fixture returns once the mount is in the mount table and answers ``stat``;
at teardown it ALWAYS unmounts (``fusermount3 -u``, then ``-uz``) and stops the
process (SIGTERM, then SIGKILL), whatever the test did.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.server import CatalogServer
from scicatfs.mount import READ_AHEAD_KB
from scicatfs.mountpoint import find_mount
from tests.support.checklogs import check_watched_files, watch_file
from tests.support.sshd import OpenSSHServer

__all__ = [
    "Mount",
    "daemons_of",
    "demo_sftp_files",
    "make_mount",
    "mountpoint",
    "mounted",
    "start_mount",
    "stop_process",
    "unmount_quietly",
    "wait_for_mount",
    "wait_until",
]

DEMO_USER = "stibbons"
MOUNT_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


@dataclass
class Mount:
    """A running mount and everything behind it."""

    path: Path
    process: subprocess.Popen[bytes]
    catalog: Catalog
    server: CatalogServer
    sshd: OpenSSHServer | None  # None: the mount reads no file over SFTP (--source rules only)
    cache_dir: Path
    log: Path
    argv: list[str] = field(default_factory=list)

    def dataset(self, pid: str) -> Path:
        return self.path / pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def unmount(self) -> None:
        """Unmount and stop the process; harmless to call twice."""
        unmount_quietly(self.path)
        stop_process(self.process)


def unmount_quietly(path: Path) -> None:
    """``fusermount3 -u``, falling back to a lazy unmount; no error if nothing is mounted."""
    if find_mount(path) is None:
        return
    for flags in (["-u"], ["-uz"]):
        try:
            result = subprocess.run(["fusermount3", *flags, "--", str(path)], capture_output=True, timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            continue  # a hung filesystem: the lazy unmount detaches it anyway
        if result.returncode == 0 or find_mount(path) is None:
            return


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Wait briefly for ``process`` to exit, then SIGTERM, then SIGKILL."""
    for action in (None, signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            return
        if action is not None:
            process.send_signal(action)
        try:
            process.wait(timeout=STOP_TIMEOUT)
            return
        except subprocess.TimeoutExpired:
            continue


def daemons_of(path: Path) -> list[int]:
    """PIDs of other processes whose command line names ``path``: a detached mount daemon."""
    found = []
    needle = os.fsencode(path)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "cmdline").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    """An empty directory; whatever gets mounted there is unmounted and its daemon killed afterwards."""
    path = tmp_path / "mnt"
    path.mkdir()
    try:
        yield path
    finally:
        unmount_quietly(path)
        for pid in daemons_of(path):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _stat_within(path: Path, timeout: float) -> bool:
    """``os.stat(path)`` in a helper thread, so a hung filesystem cannot hang the test."""
    outcome: list[bool] = []

    def probe() -> None:
        try:
            os.stat(path)
            outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(outcome and outcome[0])


def wait_for_mount(path: Path, process: subprocess.Popen[bytes], log: Path, timeout: float = MOUNT_TIMEOUT) -> None:
    """Return once ``path`` is a scicatfs mount that answers; raise with the log otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"scicatfs exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        entry = find_mount(path)
        if entry is not None and entry.fstype == "fuse.scicatfs" and _stat_within(path, 5.0):
            _wait_for_read_ahead(path, deadline)
            return
        time.sleep(0.05)
    raise RuntimeError(f"scicatfs did not mount {path} within {timeout} s:\n{log.read_text(errors='replace')}")


def _wait_for_read_ahead(path: Path, deadline: float) -> None:
    """As root, wait until the mount has raised its read-ahead, which it does right after its first answer.

    A file keeps the read-ahead that its open found: a test or benchmark that
    opened a file in that moment read it in 128 KiB requests instead of 1 MiB
    (about one run in four). ``scicatfs mount`` without ``--foreground``, and
    systemd's readiness, already wait for this.
    """
    if os.geteuid() != 0:
        return
    device = os.stat(path).st_dev
    setting = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    with contextlib.suppress(OSError, ValueError):
        while int(setting.read_text()) < READ_AHEAD_KB and time.monotonic() < deadline:
            time.sleep(0.01)


@pytest.fixture(scope="session")
def demo_sftp_files(sshd: OpenSSHServer, demo_catalog: Catalog) -> OpenSSHServer:
    """The demo catalog's files in the session's sshd chroot (written once)."""
    demo_catalog.materialize(sshd.root)
    return sshd


def start_mount(
    catalog: Catalog,
    server: CatalogServer,
    sshd: OpenSSHServer | None,
    work: Path,
    *,
    user: str | None = DEMO_USER,
    args: Sequence[str] = (),
    cache_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> Mount:
    """Run ``scicatfs mount --foreground`` in ``work/mnt`` and wait until it answers.

    Without ``sshd`` no SFTP option is passed (give ``--source`` rules in ``args``).
    ``env`` adds to the daemon's environment (e.g. ``SCICAT_TOKEN``). The caller
    must call :meth:`Mount.unmount` (the fixtures below do, always).
    """
    mountpoint = work / "mnt"
    mountpoint.mkdir()
    cache = cache_dir if cache_dir is not None else work / "cache"
    log = work / "scicatfs.log"
    argv = [
        sys.executable, "-m", "scicatfs", "mount", str(mountpoint),
        "--url", server.url, "--cache-dir", str(cache), "--foreground", "--log-level", "info",
    ]
    if sshd is not None:
        argv += [
            "--sftp-host", sshd.host, "--sftp-port", str(sshd.port), "--sftp-user", sshd.username,
            "--identity-file", str(sshd.client_key), "--known-hosts", str(sshd.known_hosts),
        ]
    if user is not None:
        password = work / "password"
        password.touch(mode=0o600)
        password.write_text(catalog.users[user].password + "\n")
        argv += ["--username", user, "--password-file", str(password)]
    argv += list(args)
    with open(log, "wb") as log_file:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
    watch_file(log)
    mount = Mount(mountpoint, process, catalog, server, sshd, cache, log, argv)
    try:
        wait_for_mount(mountpoint, process, log)
    except BaseException:
        mount.unmount()
        raise
    return mount


@pytest.fixture
def make_mount(
    demo_sftp_files: OpenSSHServer,
    demo_catalog: Catalog,
    make_catalog_server: Callable[..., CatalogServer],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Mount]]:
    """Factory: ``make_mount(catalog=None, *, user="stibbons", args=(), cache_dir=None, server=None, sftp=None, env=None)``.

    ``catalog`` defaults to the demo catalog; another catalog's files are
    materialized into the sshd chroot first (give its datasets their own
    sourceFolder). ``sftp`` is an sshd of the test's own (from ``make_sshd``,
    for tests that stop or kill it); the session's sshd otherwise. ``user=None`` mounts anonymously. ``args`` are extra
    ``scicatfs mount`` arguments (e.g. ``["-o", "xattrs"]``), ``env`` extra environment. Every mount is
    unmounted and its process stopped at teardown.
    """
    sshd = demo_sftp_files
    mounts: list[Mount] = []

    def make(
        catalog: Catalog | None = None,
        *,
        user: str | None = DEMO_USER,
        args: Sequence[str] = (),
        cache_dir: Path | None = None,
        server: CatalogServer | None = None,
        sftp: OpenSSHServer | None = None,
        env: dict[str, str] | None = None,
    ) -> Mount:
        files_from = sshd if sftp is None else sftp
        if catalog is None:
            catalog = demo_catalog
        if catalog is not demo_catalog or files_from is not sshd:
            catalog.materialize(files_from.root)
        if server is None:
            server = make_catalog_server(catalog)
        work = tmp_path_factory.mktemp("mount")
        mount = start_mount(catalog, server, files_from, work, user=user, args=args, cache_dir=cache_dir, env=env)
        mounts.append(mount)
        return mount

    try:
        yield make
    finally:
        for mount in mounts:
            mount.unmount()


@pytest.fixture(scope="module")
def mounted(
    demo_sftp_files: OpenSSHServer, demo_catalog: Catalog, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mount]:
    """The demo catalog mounted as the demo user, shared by one test module.

    Tests using it must only read; a test that needs a fresh mount, kernel
    caches or cache directory uses ``make_mount``.
    """
    with CatalogServer(demo_catalog) as server:
        mount = start_mount(demo_catalog, server, demo_sftp_files, tmp_path_factory.mktemp("mount"))
        try:
            yield mount
        finally:
            mount.unmount()
        check_watched_files()  # what unmounting logged, after the module's last test
