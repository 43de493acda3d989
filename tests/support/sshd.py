"""A real OpenSSH sshd on 127.0.0.1 serving SFTP from a chroot, for tests and benchmarks.

Each server gets its own work directory under a root-owned 0755 base directory,
because sshd refuses a ``ChrootDirectory`` unless every component of its path is
root-owned and not group/world-writable (which rules out anything under /tmp).
The work directory holds generated keys, the config, the pid file, sshd's log,
and ``root/``: the chroot, whose contents are what SFTP clients see at ``/``.

The server is started with ``-D -e`` (foreground, log to stderr) so this module
owns the process; ``kill()`` also reaches sshd's per-connection children, which
live in their own sessions, by walking /proc.

The SFTP server (``internal-sftp -l INFO``) logs every file it opens, but from
inside the chroot, to syslog: ``root/dev/log`` is a datagram socket of this
module, so ``sftp_opens()`` can tell which files the server really opened.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from scicatfs.transfer.sftp import SFTPSettings
from tests.support.requirements import skip_or_fail
from tests.support.syslog import SyslogSocket

__all__ = ["OpenSSHServer", "SSHD_BINARY", "make_sshd", "sshd"]

SSHD_BINARY = Path("/usr/sbin/sshd")
#: internal-sftp's log line for an open: ``open "/path" flags READ mode 0666``.
_SFTP_OPEN = re.compile(r'\bopen "(.*)" flags ')
BASE_DIRECTORY = Path("/var/lib/scicatfs-tests")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


class OpenSSHServer:
    """One OpenSSH sshd process, restartable on the same port with the same keys."""

    host = "127.0.0.1"
    username = "root"

    def __init__(self, base: Path = BASE_DIRECTORY) -> None:
        base.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(base, 0o755)
        self.workdir = Path(tempfile.mkdtemp(prefix="sshd-", dir=base))
        os.chmod(self.workdir, 0o755)
        self.root = self.workdir / "root"
        self.root.mkdir(mode=0o755)
        self.log = self.workdir / "sshd.log"
        self.client_key = self.workdir / "client_ed25519"
        self.known_hosts = self.workdir / "known_hosts"
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.pid_file = self.workdir / "sshd.pid"
        self.config = self.workdir / "sshd_config"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        (self.root / "dev").mkdir(mode=0o755)
        self._sftp_log = SyslogSocket(self.root / "dev" / "log")
        _keygen(self.host_key)
        _keygen(self.client_key)
        (self.workdir / "authorized_keys").write_bytes(
            self.client_key.with_suffix(".pub").read_bytes()
        )

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start sshd (on a free port the first time, the same port afterwards)."""
        if self.running:
            return
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        if not self.port:
            self.port = _free_port()
        self._write_config()
        self._write_known_hosts()
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [str(SSHD_BINARY), "-D", "-e", "-f", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self._wait_until_listening()

    def stop(self) -> None:
        """Terminate sshd and its connection processes, and wait for them."""
        self._signal_all(signal.SIGTERM)
        if not self._wait(STOP_TIMEOUT):
            self._signal_all(signal.SIGKILL)
            self._wait(STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL sshd and every connection it serves: clients see the TCP stream die."""
        self._signal_all(signal.SIGKILL)
        self._wait(STOP_TIMEOUT)

    def signal_connections(self, signum: int) -> None:
        """Signal the processes serving connections, not the listener (SIGSTOP: a stall)."""
        if self._process is not None:
            for pid in _descendants(self._process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)

    def restart(self) -> None:
        """Stop and start again on the same port with the same keys."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and delete its work directory (keys, data, log)."""
        self.stop()
        self._sftp_log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- helpers for tests -----------------------------------------------------

    def put(self, remote_path: str, data: bytes) -> str:
        """Write ``data`` so that SFTP clients see it at ``remote_path``; returns that path."""
        local = self.local_path(remote_path)
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
        return remote_path

    def local_path(self, remote_path: str) -> Path:
        """The file under ``root`` that SFTP clients see at ``remote_path``."""
        relative = Path(remote_path.lstrip("/"))
        if ".." in relative.parts:
            raise ValueError(f"remote path escapes the chroot: {remote_path!r}")
        return self.root / relative

    def open_files(self) -> list[Path]:
        """Files under ``root`` that the SFTP server processes hold open right now.

        Lets a test see remote handles from the server side: an SFTP open is an
        open file descriptor in the process serving that connection.
        """
        found = []
        for pid in _descendants(self._process.pid) if self._process else []:
            with contextlib.suppress(OSError):
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    with contextlib.suppress(OSError):
                        target = Path(os.readlink(fd))
                        if target.is_relative_to(self.root):
                            found.append(target)
        return found

    def sftp_settings(self, **overrides: Any) -> SFTPSettings:
        """Transfer settings that reach this server, with ``overrides`` (short deadlines by default)."""
        settings = SFTPSettings(
            host=self.host,
            port=self.port,
            username=self.username,
            identity_files=(self.client_key,),
            known_hosts=self.known_hosts,
            ssh_config=Path(os.devnull),  # independent of the runner's ~/.ssh/config
            timeout=10,
            connect_timeout=5,
        )
        return replace(settings, **overrides)

    def ssh_options(self) -> list[str]:
        """Command-line options for OpenSSH clients (sftp, sshfs, ssh) to reach this server."""
        return [
            "-o", f"IdentityFile={self.client_key}",
            "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-o", f"Port={self.port}",
            "-o", f"User={self.username}",
        ]  # fmt: skip

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def sftp_opens(self) -> list[str]:
        """Every path an SFTP client has opened on this server so far, as the client named it."""
        return [match[1] for line in self._sftp_log.messages() if (match := _SFTP_OPEN.search(line))]

    # -- internals -------------------------------------------------------------

    def _write_config(self) -> None:
        self.config.write_text(
            f"""\
Port {self.port}
ListenAddress {self.host}
HostKey {self.host_key}
PidFile {self.pid_file}
AuthorizedKeysFile {self.workdir / "authorized_keys"}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
ChrootDirectory {self.root}
ForceCommand internal-sftp -l INFO
Subsystem sftp internal-sftp -l INFO
AllowTcpForwarding no
X11Forwarding no
PermitTTY no
MaxStartups 100
LogLevel INFO
"""
        )

    def _write_known_hosts(self) -> None:
        key_type, key = self.host_key.with_suffix(".pub").read_text().split()[:2]
        self.known_hosts.write_text(f"[{self.host}]:{self.port} {key_type} {key}\n")

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        assert self._process is not None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"sshd exited with status {self._process.returncode}:\n{self.log_text()}"
                )
            with contextlib.suppress(OSError), socket.create_connection(
                (self.host, self.port), timeout=1
            ) as probe:
                probe.settimeout(1)
                if probe.recv(64).startswith(b"SSH-"):
                    return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"sshd did not listen on port {self.port}:\n{self.log_text()}")

    def _signal_all(self, signum: int) -> None:
        if self._process is None:
            return
        for pid in [self._process.pid, *_descendants(self._process.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _wait(self, timeout: float) -> bool:
        """Reap sshd and wait for its connection processes to vanish."""
        if self._process is None:
            return True
        deadline = time.monotonic() + timeout
        children = _descendants(self._process.pid)
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        while any(_alive(pid) for pid in children):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        self._process = None
        return True


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "scicatfs-tests", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """All processes below ``pid``, found through /proc (sshd children call setsid)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    pending = [pid]
    while pending:
        children = parents.get(pending.pop(), [])
        found.extend(children)
        pending.extend(children)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _require_sshd() -> None:
    """Skip locally when sshd cannot run here; in CI a missing sshd is a failure."""
    problem = None
    if not SSHD_BINARY.exists():
        problem = f"{SSHD_BINARY} is not installed (apt-get install openssh-server)"
    elif os.geteuid() != 0:
        problem = "sshd with ChrootDirectory needs root"
    skip_or_fail(problem)


@pytest.fixture(scope="session")
def sshd() -> Iterator[OpenSSHServer]:
    """A running sshd shared by the session; tests that write use their own subdirectory."""
    _require_sshd()
    server = OpenSSHServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def make_sshd() -> Iterator[Callable[[], OpenSSHServer]]:
    """Factory for servers a test may kill or restart; all are stopped at teardown."""
    _require_sshd()
    servers: list[OpenSSHServer] = []

    def make() -> OpenSSHServer:
        server = OpenSSHServer()
        servers.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.close()
