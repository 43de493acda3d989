"""A syslog socket of the tests' own: what programs send to a /dev/log that the tests bind.

Used where the program under test logs to syslog and no syslog daemon listens:
inside sshd's chroot (internal-sftp's log of opens) and, on machines without
journald, at the real /dev/log (a background mount's log).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

__all__ = ["SyslogSocket"]


class SyslogSocket:
    """A datagram socket bound at ``path``; keeps every message, in the order received."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._messages: list[str] = []
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        threading.Thread(target=self._receive, name=f"syslog {path}", daemon=True).start()

    def messages(self) -> list[str]:
        """Everything received so far (``<priority>tag[pid]: text``, as syslog(3) sends it)."""
        return list(self._messages)

    def _receive(self) -> None:
        while True:
            try:
                message = self._socket.recv(65536)
            except OSError:
                return
            if not message:
                return
            self._messages.append(message.decode(errors="replace"))

    def close(self) -> None:
        """Stop receiving and remove the socket file."""
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
