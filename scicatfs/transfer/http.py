"""``https://`` (and ``http://``) sources: ranged GETs with httpx, from trio.

Each read is one ``GET`` with ``Range: bytes=a-b`` on a keep-alive pool of up
to ``connections`` connections per origin; the fetcher keeps several reads in
flight, so several connections carry one file at once.

Versions never mix. The first answer for a URL pins its validator: the strong
``ETag``, else ``Last-Modified``. Every later request carries it in
``If-Range``, so a server whose file changed answers ``200`` with the new
version instead of a ``206`` slice of it; any answer whose validator differs
from the pinned one raises :class:`SourceChanged` (the reader gets EIO, the
cache drops what it holds of the file) and pins the new version, so the next
read fetches the new version from scratch.

Other answers: ``206`` is checked against the range asked for; ``200`` to a
range request from a server that ignores ranges (same validator) is streamed
and sliced (logged once per origin: every such read downloads from the file's
start); ``416`` means the range starts at or after the end: ``b""``, as EOF
is for every transfer. ``404``/``410`` is a missing file, ``401``/``403`` a
refusal, ``5xx`` and network failures ``ConnectionLost`` (retried by the
fetcher), and every call has a deadline.

A bearer token, if configured, is read from its file once and sent only over
https or to a loopback address; it is never the SciCat token unless the user
points ``--http-token-file`` at that file.
"""

from __future__ import annotations

import logging
import re
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import httpcore
import httpx
import trio

from scicatfs.transfer.base import LocalFile, is_loopback, origin
from scicatfs.transfer.errors import (
    ConnectionLost,
    RemoteFileNotFound,
    SourceChanged,
    TransferError,
    TransferTimeout,
)

__all__ = ["HTTPSettings", "HTTPTransfer"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")

#: Bytes asked of the socket per receive. httpcore's 64 KiB makes a 4 MiB range
#: 64 trips through h11, httpcore and trio, and that per-piece cost, not the
#: bytes, bounded a ranged GET on loopback (docs/performance.md: 1 MiB halves
#: the CPU per byte). It is an upper bound, so small answers (the catalog's,
#: which shares httpcore in this process) are read as before.
SOCKET_READ = 1024 * 1024
httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = max(httpcore.AsyncHTTP11Connection.READ_NUM_BYTES, SOCKET_READ)


@dataclass(frozen=True, slots=True)
class HTTPSettings:
    """How to reach web servers that hold dataset files."""

    connections: int = 4  # per origin
    timeout: float = 30.0  # deadline of each read/size call
    connect_timeout: float = 10.0
    token_file: Path | None = None  # bearer token for the file servers (not the catalog's)

    def __post_init__(self) -> None:
        if self.connections < 1 or self.timeout <= 0 or self.connect_timeout <= 0:
            raise ValueError("HTTP connections, timeout and connect_timeout must be positive")


@dataclass(frozen=True, slots=True)
class _Version:
    """What identifies one version of a file: the header it came in and its value."""

    header: str  # "etag" or "last-modified"
    value: str


class HTTPTransfer:
    """Reads byte ranges of ``https://`` and ``http://`` URLs."""

    def __init__(self, settings: HTTPSettings) -> None:
        self._settings = settings
        self._clients: dict[str, httpx.AsyncClient] = {}  # per origin
        self._versions: dict[str, _Version] = {}  # url -> the version pinned
        self._unranged: set[str] = set()  # origins that ignored a Range header (logged once)
        self._token: str | None = None
        self._stats = {"bytes_read": 0, "requests": 0, "errors": 0, "version_changes": 0, "unranged": 0}

    async def __aenter__(self) -> HTTPTransfer:
        if self._settings.token_file is not None:
            self._token = _read_token(self._settings.token_file)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(self._settings.connect_timeout):
            for client in self._clients.values():
                await client.aclose()
        self._clients.clear()

    async def read(self, url: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"bad range: offset {offset}, length {length}")
        if length == 0:
            return b""
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        pinned = self._versions.get(url)
        if pinned is not None:
            headers["If-Range"] = pinned.value
        data = await self._call(url, lambda: self._get(url, offset, length, headers))
        self._stats["bytes_read"] += len(data)
        return data

    async def size(self, url: str) -> int:
        async def head() -> int:
            response = await self._client(url).head(url, headers=self._headers(url))
            _check_status(url, response)
            self._check_version(url, response)
            try:
                return int(response.headers["content-length"])
            except (KeyError, ValueError):
                raise TransferError(f"{url}: the server did not report a size") from None

        return await self._call(url, head)

    async def warm_up(self, url: str | None = None, *, wait: float = 0.0) -> None:
        return None  # an HTTP connect is cheap and happens on the first read

    def is_local(self, url: str) -> bool:
        return False

    def open_local(self, url: str) -> LocalFile:
        raise TransferError(f"{url}: a file on a web server is not local")

    @property
    def stats(self) -> dict[str, int]:
        """bytes_read, requests, errors, version_changes (SourceChanged), unranged (200 to a Range)."""
        return dict(self._stats)

    # -- one request ------------------------------------------------------------------

    async def _call(self, url: str, call: Callable[[], Awaitable[T]]) -> T:
        self._stats["requests"] += 1
        try:
            with trio.fail_after(self._settings.timeout):
                return await call()
        except trio.TooSlowError:
            self._stats["errors"] += 1
            raise TransferTimeout(f"{url}: no answer within {self._settings.timeout:g} s", path=url) from None
        except httpx.TimeoutException as error:
            self._stats["errors"] += 1
            raise TransferTimeout(f"{url}: {type(error).__name__}", path=url) from None
        except httpx.TransportError as error:
            self._stats["errors"] += 1
            raise ConnectionLost(f"{url}: {error or type(error).__name__}", path=url) from None
        except TransferError:
            self._stats["errors"] += 1
            raise

    async def _get(self, url: str, offset: int, length: int, headers: dict[str, str]) -> bytes:
        client = self._client(url)
        async with client.stream("GET", url, headers={**self._headers(url), **headers}) as response:
            if response.status_code == 416:
                return b""  # the range starts at or after the end of the file
            _check_status(url, response)
            self._check_version(url, response)
            if response.status_code == 206:
                return await _ranged_body(url, response, offset, length)
            if response.status_code == 200:
                return await self._unranged_body(url, response, offset, length)
            raise TransferError(f"{url}: unexpected HTTP {response.status_code} to a range request")

    async def _unranged_body(self, url: str, response: httpx.Response, offset: int, length: int) -> bytes:
        """The slice of a whole-file answer (a server that ignores Range), read only as far as needed."""
        self._stats["unranged"] += 1
        if origin(url) not in self._unranged:
            self._unranged.add(origin(url))
            log.warning("%s ignores Range requests: every read downloads from the start of the file", origin(url))
        parts: list[bytes] = []
        position = 0
        wanted = offset + length
        async for chunk in response.aiter_raw():
            end = position + len(chunk)
            if end > offset:
                parts.append(chunk[max(0, offset - position) : wanted - position])
            position = end
            if position >= wanted:
                break
        return b"".join(parts)

    def _check_version(self, url: str, response: httpx.Response) -> None:
        """Pin the first version seen; a different one raises SourceChanged (and is pinned instead)."""
        version = _version(response)
        if version is None:
            return
        pinned = self._versions.setdefault(url, version)
        if pinned != version:
            self._versions[url] = version
            self._stats["version_changes"] += 1
            raise SourceChanged(
                f"{url} changed at its source ({pinned.header} {pinned.value} -> {version.value});"
                " its cached bytes are dropped and the new version is fetched from scratch",
                path=url,
            )

    def _client(self, url: str) -> httpx.AsyncClient:
        key = origin(url)
        client = self._clients.get(key)
        if client is None:
            settings = self._settings
            client = self._clients[key] = httpx.AsyncClient(
                timeout=httpx.Timeout(settings.timeout, connect=settings.connect_timeout),
                limits=httpx.Limits(
                    max_connections=settings.connections, max_keepalive_connections=settings.connections
                ),
                follow_redirects=False,  # a presigned URL is final; a redirect could leak the token
                trust_env=False,  # no proxies from the environment for file traffic
            )
        return client

    def _headers(self, url: str) -> dict[str, str]:
        headers = {"Accept-Encoding": "identity"}  # byte offsets are of the file, not of a gzip stream
        if self._token is not None and (url.startswith("https://") or is_loopback(url)):
            headers["Authorization"] = f"Bearer {self._token}"
        return headers


def _version(response: httpx.Response) -> _Version | None:
    """The response's strong ETag, else its Last-Modified (a weak ETag cannot go in If-Range)."""
    etag = response.headers.get("etag")
    if etag and not etag.startswith("W/"):
        return _Version("etag", etag)
    modified = response.headers.get("last-modified")
    return _Version("last-modified", modified) if modified else None


def _check_status(url: str, response: httpx.Response) -> None:
    status = response.status_code
    if status in (200, 206):
        return
    if status in (404, 410):
        raise RemoteFileNotFound(
            f"{url}: HTTP {status}: the catalog lists this file but the server does not have it", path=url
        )
    if status in (401, 403):
        raise TransferError(f"{url}: HTTP {status}: access refused (check --http-token-file)", path=url)
    if status >= 500:
        raise ConnectionLost(f"{url}: HTTP {status} from the server", path=url)
    raise TransferError(f"{url}: HTTP {status}", path=url)


async def _ranged_body(url: str, response: httpx.Response, offset: int, length: int) -> bytes:
    """A 206's body, after checking that it is the range asked for (or its end-of-file part)."""
    match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
    if match is None or int(match.group(1)) != offset:
        raise TransferError(
            f"{url}: server answered bytes {response.headers.get('content-range')!r} to a request for"
            f" {offset}-{offset + length - 1}",
            path=url,
        )
    data = await response.aread()
    if len(data) != int(match.group(2)) - offset + 1 or len(data) > length:
        raise ConnectionLost(f"{url}: {len(data)} bytes in a {response.headers['content-range']} answer", path=url)
    return data


def _read_token(path: Path) -> str:
    """The bearer token in ``path``; refused when other users could read it."""
    try:
        info = path.stat()
        token = path.read_text().strip()
    except OSError as error:
        raise TransferError(f"cannot read HTTP token file {path}: {error.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TransferError(f"HTTP token file {path} is readable by other users: chmod 600 {path}")
    if not token:
        raise TransferError(f"HTTP token file {path} is empty")
    return token
