"""``file://`` sources: the dataset's folder is mounted on this machine.

On an analysis cluster the source folders are often a local or cluster
filesystem mount (``/ess/data``); reading them over SSH would only add a
copy. The cache therefore asks :meth:`LocalTransfer.open_local` for the file
and serves reads from it directly, never copying it into a blob; ``read`` and
``size`` exist for callers that only want bytes (and for the protocol).

Reads of a slow network filesystem block a worker thread, never the trio
thread: the cache calls :class:`~scicatfs.transfer.base.LocalFile` reads
from worker threads too.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import trio

from scicatfs.transfer.base import LocalFile, SourceStats, split
from scicatfs.transfer.errors import RemoteFileNotFound, TransferError

__all__ = ["LocalTransfer"]

T = TypeVar("T")


class LocalTransfer:
    """Reads ``file:///path`` URLs from this machine's filesystem."""

    def __init__(self) -> None:
        self._stats = SourceStats()

    async def __aenter__(self) -> LocalTransfer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None

    async def read(self, url: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"bad range: offset {offset}, length {length}")
        path = _path(url)

        def pread() -> bytes:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)

        data = await self._run(path, lambda: trio.to_thread.run_sync(pread))
        self._stats.bytes_read += len(data)
        return data

    async def size(self, url: str) -> int:
        path = _path(url)
        return await self._run(path, lambda: trio.to_thread.run_sync(lambda: os.stat(path).st_size))

    async def warm_up(self, url: str | None = None, *, wait: float = 0.0) -> None:
        return None  # nothing to connect to

    def is_local(self, url: str) -> bool:
        return True

    def open_local(self, url: str) -> LocalFile:
        path = _path(url)
        self._stats.requests += 1
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            self._stats.errors += 1
            raise _error(path, error) from None
        try:
            return LocalFile(path, fd)
        except OSError as error:
            os.close(fd)
            self._stats.errors += 1
            raise _error(path, error) from None

    @property
    def stats(self) -> dict[str, int]:
        return self._stats.as_dict()

    async def _run(self, path: Path, call: Callable[[], Awaitable[T]]) -> T:
        self._stats.requests += 1
        try:
            return await call()
        except OSError as error:
            self._stats.errors += 1
            raise _error(path, error) from None


def _path(url: str) -> Path:
    scheme, netloc, path = split(url)
    if scheme != "file" or netloc not in ("", "localhost"):
        raise TransferError(f"{url}: not a local file URL (file:///path)")
    return Path(path)


def _error(path: Path, error: OSError) -> TransferError:
    if error.errno == errno.ENOENT:
        return RemoteFileNotFound(
            f"{path}: no such file on this machine; the catalog lists it (is the source folder mounted?)",
            path=str(path),
        )
    if error.errno in (errno.EACCES, errno.EPERM):
        return TransferError(f"{path}: permission denied", path=str(path))
    return TransferError(f"{path}: {error.strerror}", path=str(path))
