"""Errors of the transfer layer; each message says what a user can do about it.

The fs layer maps these to errno (EIO for all but ``RemoteFileNotFound``, which
is also EIO but logged differently); the cache layer uses the type to decide
whether a retry on another connection can help.
"""

from __future__ import annotations

from scicatfs.errors import ScicatfsError


class TransferError(ScicatfsError):
    """A remote file could not be read; ``host`` and ``path`` name what was asked for."""

    def __init__(self, message: str, *, host: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.host = host
        self.path = path


class HostKeyError(TransferError):
    """The server's host key is not in known_hosts or differs from the recorded one."""


class SSHAuthError(TransferError):
    """The server refused every key and method offered."""


class RemoteFileNotFound(TransferError):
    """The catalog lists the file but the file server does not have it."""


class TransferTimeout(TransferError):
    """An operation did not finish within its deadline."""


class ConnectionLost(TransferError):
    """The server could not be reached, or the connection dropped and a retry failed too."""


class SourceChanged(TransferError):
    """The file changed at its source since its version was pinned: old and new bytes must not mix."""
