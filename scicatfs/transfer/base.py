"""The one interface every source of bytes implements, and the URLs that name the bytes.

A dataset file's bytes are named by one URL (its *source*): ``sftp://host/path``,
``file:///path`` or ``https://host/path``. The cache asks a :class:`Transfer`
for byte ranges of such a URL and never looks at the scheme itself; which
implementation answers is chosen by scheme (:mod:`scicatfs.transfer.dispatch`).

The path part of a source URL is percent-encoded (``quote``), so that a remote
path holding ``%``, ``#``, ``?`` or spaces survives the round trip; :func:`split`
gives it back decoded. Source URLs never carry a password (the rules that build
them refuse one), so they may be shown in logs, ``files.json`` and xattrs.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Protocol, Self
from urllib.parse import quote, unquote, urlsplit

__all__ = ["LocalFile", "SourceStats", "Transfer", "is_loopback", "origin", "source_url", "split"]


class Parts(NamedTuple):
    """A source URL taken apart: scheme, ``[user@]host[:port]`` as written, decoded path."""

    scheme: str
    netloc: str
    path: str


def split(url: str) -> Parts:
    parts = urlsplit(url)
    return Parts(parts.scheme, parts.netloc, unquote(parts.path) or "/")


def source_url(scheme: str, netloc: str, path: str) -> str:
    """The URL of ``path`` (a decoded absolute POSIX path) at ``scheme://netloc``."""
    return f"{scheme}://{netloc}{quote(path)}"


def origin(url: str) -> str:
    """``scheme://netloc`` of a source URL: the key of the per-source counters."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.partition('/')[0]}"


def is_loopback(url: str) -> bool:
    """Does ``url`` name this machine (localhost, 127.0.0.0/8, ::1)?"""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(slots=True)
class SourceStats:
    """What one origin (``scheme://[user@]host[:port]``) delivered and how often it failed."""

    bytes_read: int = 0
    requests: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"bytes_read": self.bytes_read, "requests": self.requests, "errors": self.errors}


class LocalFile:
    """A file on this machine, open for reading: the cache serves it in place of a blob.

    ``read`` is a plain blocking ``pread`` (the cache calls it from a worker
    thread); it counts into ``stats`` (the dispatcher hands in its counters
    for the origin).
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.stat = os.fstat(fd)
        self.stats = SourceStats()

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        self.stats.bytes_read += len(data)
        return data

    def close(self) -> None:
        os.close(self.fd)


class Transfer(Protocol):
    """Ranged reads of source URLs; an async context manager used from trio.

    Errors are :class:`scicatfs.transfer.errors.TransferError` subclasses;
    the fetcher retries only ``TransferTimeout`` and ``ConnectionLost``.
    """

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...

    async def read(self, url: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``; fewer only at end of file, ``b""`` at or after it."""
        ...

    async def size(self, url: str) -> int:
        """The file's size as the source reports it now."""
        ...

    async def warm_up(self, url: str | None = None, *, wait: float = 0.0) -> None:
        """Start connecting to the source of ``url`` (None: the default one); never raises."""
        ...

    def is_local(self, url: str) -> bool:
        """Are the bytes at ``url`` a file on this machine (no I/O: a look at the URL)?"""
        ...

    def open_local(self, url: str) -> LocalFile:
        """The local file at ``url``, opened (only where ``is_local``).

        Blocking (open and fstat): call it from a worker thread.
        """
        ...

    @property
    def stats(self) -> dict[str, int]:
        """Counters since start; at least ``bytes_read``, ``requests`` and ``errors``."""
        ...
