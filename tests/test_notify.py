"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from scicatfs.notify import notify, notify_ready, notify_status, notify_stopping


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


@pytest.fixture
def systemd_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = str(tmp_path / "notify")
    with _receiver(path) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield sock


def test_ready_stopping_and_status_arrive(systemd_socket: socket.socket) -> None:
    assert notify_ready()
    assert systemd_socket.recv(4096) == b"READY=1"
    assert notify_status("mounted 3 datasets\nfrom scicat")
    assert systemd_socket.recv(4096) == b"STATUS=mounted 3 datasets from scicat"
    assert notify_stopping()
    assert systemd_socket.recv(4096) == b"STOPPING=1"


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"scicatfs-test-{os.getpid()}-{id(monkeypatch)}"
    with _receiver("\0" + name) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1\nSTATUS=ok")
        assert sock.recv(4096) == b"READY=1\nSTATUS=ok"


def test_unset_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify_ready() is False


@pytest.mark.parametrize("address", ["relative/socket", "/nonexistent/dir/notify"])
def test_bad_socket_is_reported_not_raised(
    address: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    caplog.set_level("DEBUG", logger="scicatfs.notify")
    assert notify_ready() is False
    assert address in caplog.text
