"""An SFTP server that answers reads short, for the transfer layer's fault tests.

The SFTP spec lets a server answer a read with fewer bytes than asked without
being at end of file, and some servers do so below the size they advertise in
``limits@openssh.com``. OpenSSH's sftp-server never does on a regular file, so
the fault is injected into the demo's asyncssh server: every answer of two bytes
or more is cut to a random, non-empty prefix (an empty answer would mean end of
file, which is not the fault under test). It can also answer one byte more
than asked, which no client may accept.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from scicatfs.demo.sftp_server import DemoSFTPServer, ReadOnlySFTPServer
from scicatfs.transfer.sftp import SFTPSettings

__all__ = ["ShortAnsweringServer", "short_sftp"]


class _ShortAnswers(ReadOnlySFTPServer):
    """One SFTP session whose read answers ``fault`` alters."""

    def __init__(self, chan: asyncssh.SSHServerChannel, chroot: str, fault: _Fault) -> None:
        super().__init__(chan, chroot=chroot)
        self._fault = fault

    def read(self, file_obj: object, offset: int, size: int) -> bytes:
        data: bytes = super().read(file_obj, offset, size)
        return self._fault.answer(data)


@dataclass
class _Fault:
    """Cuts answers short; with ``overlong``, sends one byte more than asked instead."""

    rng: random.Random
    overlong: bool = False
    short_answers: int = 0

    def answer(self, data: bytes) -> bytes:
        """What the server sends instead of ``data``, the bytes it read for a request."""
        if self.overlong:
            return data + b"!"
        if len(data) < 2:
            return data
        self.short_answers += 1
        return data[: self.rng.randrange(1, len(data))]


@dataclass
class ShortAnsweringServer:
    """A running short-answering server: files under ``root``, counters in ``fault``."""

    server: DemoSFTPServer
    root: Path
    fault: _Fault

    def put(self, name: str, data: bytes) -> str:
        """Store ``data`` as ``/name`` on the server and return that remote path."""
        (self.root / name).write_bytes(data)
        return f"/{name}"

    def sftp_settings(self, **overrides: Any) -> SFTPSettings:
        options: dict[str, Any] = {
            "host": self.server.host,
            "port": self.server.port,
            "username": self.server.username,
            "identity_files": (self.server.client_key_path,),
            "known_hosts": self.server.known_hosts_path,
            "ssh_config": Path(os.devnull),  # independent of the runner's ~/.ssh/config
            "timeout": 30,
            "connect_timeout": 5,
        }
        return SFTPSettings(**(options | overrides))

    @property
    def short_answers(self) -> int:
        return self.fault.short_answers


@pytest.fixture
def short_sftp(tmp_path: Path) -> Iterator[ShortAnsweringServer]:
    """A short-answering asyncssh SFTP server on 127.0.0.1 serving a fresh directory."""
    root = tmp_path / "short-sftp-root"
    root.mkdir()
    fault = _Fault(random.Random(20260))
    with DemoSFTPServer(root, sftp_server=functools.partial(_ShortAnswers, fault=fault)) as server:
        yield ShortAnsweringServer(server, root, fault)
