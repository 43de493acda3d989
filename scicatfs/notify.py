"""systemd readiness notifications (``sd_notify``) for ``Type=notify`` units.

The protocol is one datagram of ``KEY=VALUE`` lines sent to the AF_UNIX socket
named by ``$NOTIFY_SOCKET``; a name starting with ``@`` is in the abstract
namespace. That is a dozen lines of stdlib ``socket``, so scicatfs writes it
itself rather than depend on libsystemd bindings (a C build) or a small
third-party package for so little. Outside systemd the variable is unset and
every call is a cheap no-op, so callers never need to check.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["notify", "notify_ready", "notify_status", "notify_stopping"]

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; True if it was sent.

    Failures are logged at debug level and reported as False, never raised:
    a lost notification must not take a working mount down with it (systemd
    then times the unit out, which is the visible symptom anyway).
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.debug("ignoring NOTIFY_SOCKET %r: neither a path nor an abstract name", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as exc:
        log.debug("sd_notify %r to %r failed: %s", state, address, exc)
        return False
    return True


def notify_ready() -> bool:
    """The mount answers requests: ends ``systemctl start`` successfully."""
    return notify("READY=1")


def notify_stopping() -> bool:
    """Unmounting has begun (sent on SIGTERM / ``ExecStop``)."""
    return notify("STOPPING=1")


def notify_status(text: str) -> bool:
    """One line shown by ``systemctl status``; newlines would end the field."""
    return notify("STATUS=" + " ".join(text.splitlines()))
