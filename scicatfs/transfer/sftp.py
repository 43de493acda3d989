"""Ranged reads of remote files over SFTP, from a pool of asyncssh connections.

``SFTPTransfer`` is the trio-facing object (one implementation of
:class:`scicatfs.transfer.base.Transfer`, for ``sftp://[user@]host[:port]/path``
URLs); everything asyncssh lives in one asyncio thread
(``bridge.AsyncioThread``) and is only touched there. Per ``[user@]host[:port]``
a ``_Pool`` keeps up to ``connections`` SSH connections, opened lazily:
a second connection is opened only while the first is busy, and in the
background: the operation that found every connection busy shares the least
busy one instead of waiting for a handshake (several round trips). A read is issued in
the server's maximum request size (``limits@openssh.com``; 255 KiB on OpenSSH)
with many requests in flight, and a large read is split across connections,
because SFTP throughput is bytes in flight divided by round-trip time and one
connection is bound to one CPU for its cipher.

A server may answer a read request with fewer bytes than asked without being at
end of file (the SFTP spec allows it; some servers cut answers below the size
they advertise). Such a short answer is followed by a request for the rest; only
an empty answer (``SSH_FX_EOF``) ends the file. The requests are issued here,
one at a time per pipeline slot, rather than by asyncssh's ``read_parallel``,
so that this holds whatever the asyncssh version does with short answers.

Every public operation runs under ``SFTPSettings.timeout``. A read whose
connection drops is retried once on a fresh connection within that deadline;
failed connects back off exponentially so a dead server is not hammered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import unquote

import asyncssh
import cachetools
import trio

from scicatfs.transfer.base import LocalFile, split
from scicatfs.transfer.bridge import AsyncioThread
from scicatfs.transfer.errors import (
    ConnectionLost,
    HostKeyError,
    RemoteFileNotFound,
    SSHAuthError,
    TransferError,
    TransferTimeout,
)

__all__ = ["SFTPSettings", "SFTPTransfer"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_Operation = Callable[["_Connection"], Awaitable[T]]  # one step run on one connection
MiB = 1024 * 1024

#: Hardware-accelerated AES first: at zero RTT one connection is cipher-bound
#: (measured ~236 MiB/s with aes128-ctr vs ~101 MiB/s with chacha20-poly1305).
DEFAULT_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes128-ctr",
    "aes256-gcm@openssh.com",
    "aes256-ctr",
    "chacha20-poly1305@openssh.com",
)
#: Reads at least this long are split over several connections.
SPLIT_THRESHOLD = 8 * MiB
#: Smallest piece of a split read; smaller pieces cost more in overhead than they gain.
SPLIT_PIECE = 4 * MiB
#: What a dead connection raises mid-operation (the operation may be retried elsewhere).
_CONNECTION_ERRORS = (
    asyncssh.SFTPConnectionLost,
    asyncssh.SFTPNoConnection,
    asyncssh.DisconnectError,
    asyncssh.ChannelOpenError,
    OSError,
)
#: What a failed connect raises: refused, unreachable, timed out, refused keys, bad options.
_CONNECT_ERRORS = (OSError, TimeoutError, ValueError, asyncssh.Error, asyncssh.KeyImportError)
#: Parsed URLs kept (``SFTPTransfer._host``); all are forgotten at once when it is reached.
HOSTS_KEPT = 4096
#: Reconnect backoff after a failed connect: first delay, growth factor, cap (seconds).
BACKOFF_FIRST, BACKOFF_FACTOR, BACKOFF_MAX = 0.1, 2.0, 5.0


@dataclass(frozen=True, slots=True)
class SFTPSettings:
    """How to reach file servers; ``None`` fields fall back to ~/.ssh/config, then ssh defaults."""

    host: str | None = None
    port: int | None = None
    username: str | None = None
    identity_files: tuple[Path, ...] = ()
    known_hosts: Path | None = None  # None: ~/.ssh/known_hosts, as ssh does
    check_host_keys: bool = True
    connections: int = 4
    timeout: float = 30.0  # deadline of each read/size call, retries included
    connect_timeout: float = 10.0
    window: int = 16 * MiB
    max_requests: int = 16  # outstanding read requests per read and connection
    ciphers: tuple[str, ...] = DEFAULT_CIPHERS
    ssh_config: Path | None = None  # None: ~/.ssh/config if readable
    open_files: int = 16  # remote handles kept open per connection
    keepalive_interval: float = 5.0  # a silent server is dropped after 3 unanswered probes

    def __post_init__(self) -> None:
        positive = {
            "connections": self.connections,
            "timeout": self.timeout,
            "connect_timeout": self.connect_timeout,
            "window": self.window,
            "max_requests": self.max_requests,
            "open_files": self.open_files,
            "keepalive_interval": self.keepalive_interval,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"SFTP setting {name} must be positive, got {value!r}")
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"SFTP port must be between 1 and 65535, got {self.port}")
        if not self.ciphers:
            raise ValueError("SFTP settings need at least one cipher")

    @property
    def known_hosts_description(self) -> str:
        return str(self.known_hosts) if self.known_hosts else "~/.ssh/known_hosts"


class SFTPTransfer:
    """Reads byte ranges of ``sftp://`` URLs; an async context manager used from trio.

    A URL without a host (``sftp:///path``) means the configured default host;
    a user or port in the URL overrides the settings' for that host.
    """

    def __init__(self, settings: SFTPSettings) -> None:
        self._settings = settings
        self._thread = AsyncioThread()
        self._pools: dict[str, _Pool] = {}  # touched only on the asyncio thread
        self._background: set[asyncio.Task[None]] = set()  # warm-ups, asyncio thread only
        self._stats = _Stats()
        #: (pool key, remote path) by URL, up to HOSTS_KEPT: parsing a URL per read showed in the per-file cost.
        self._hosts: dict[str, tuple[str, str]] = {}
        if not settings.check_host_keys:
            log.warning(
                "SSH host key checking is DISABLED: any server can pose as the file server "
                "and read your credentials or feed you wrong data"
            )

    async def __aenter__(self) -> SFTPTransfer:
        self._thread.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(self._settings.connect_timeout):
            await self._thread.run(self._close_pools)
        self._thread.stop()

    async def read(self, url: str, offset: int, length: int) -> bytes:
        """Return ``length`` bytes of the file at ``url`` from ``offset``, fewer only at end of file."""
        if offset < 0 or length < 0:
            raise ValueError(f"bad range: offset {offset}, length {length}")
        host, path = self._host(url)
        if length == 0:
            return b""
        data = await self._run(host, path, lambda pool: pool.read(path, offset, length))
        self._stats.bytes_read += len(data)
        return data

    async def warm_up(self, url: str | None = None, *, wait: float = 0.0) -> None:
        """Start opening the first connection to ``url``'s host (default: the configured host).

        Waits at most ``wait`` seconds for it; the connect goes on in the
        background after that. Never raises: a server that is down must not
        fail a mount, which still serves the cache offline (the failure is
        logged, and reads later fail or succeed as usual). A mount calls this so
        that its first read does not pay for the SSH handshake, as sshfs
        connects before its mount is ready.
        """
        host = split(url).netloc if url else ""
        host = host or self._settings.host or ""
        if host:
            await self._thread.run(lambda: self._warm_up(host, wait))

    async def _warm_up(self, host: str, wait: float) -> None:
        async def connect() -> None:
            try:
                await self._pool(host).warm_up()
            except TransferError as error:
                log.info("could not connect to %s ahead of the first read: %s", host, error)

        task = asyncio.get_running_loop().create_task(connect())
        self._background.add(task)  # the loop holds tasks only weakly
        task.add_done_callback(self._background.discard)
        await asyncio.wait([task], timeout=wait)  # a timeout leaves the task running

    async def size(self, url: str) -> int:
        """The remote file's size in bytes (one SFTP stat)."""
        host, path = self._host(url)
        return await self._run(host, path, lambda pool: pool.size(path))

    def is_local(self, url: str) -> bool:
        return False

    def open_local(self, url: str) -> LocalFile:
        raise TransferError(f"{url}: an SFTP file is not local")

    @property
    def stats(self) -> dict[str, int]:
        """Counters since start: bytes_read, requests, reconnects, connects, errors; and
        round_trip_us, the least time an SFTP open or the warm-up's probe took (0: none yet)."""
        return self._stats.as_dict()

    def _host(self, url: str) -> tuple[str, str]:
        """``[user@]host[:port]`` (the pool's key) and the remote path of an sftp URL."""
        known = self._hosts.get(url)
        if known is None:
            if len(self._hosts) >= HOSTS_KEPT:
                self._hosts.clear()
            known = self._hosts[url] = self._parse(url)
        return known

    def _parse(self, url: str) -> tuple[str, str]:
        scheme, host, path = split(url)
        if scheme != "sftp":
            raise TransferError(f"{url}: not an SFTP URL", path=path)
        host = host or self._settings.host or ""
        if not host:
            raise TransferError(
                f"no SFTP host known for {path}: the dataset names no sourceFolderHost; "
                "pass --sftp-host or a --source rule",
                path=path,
            )
        return host, path

    async def _run(self, host: str, path: str, operation: Callable[[_Pool], Awaitable[T]]) -> T:
        self._stats.requests += 1

        async def on_asyncio() -> T:
            try:
                async with asyncio.timeout(self._settings.timeout):
                    return await operation(self._pool(host))
            except TimeoutError:
                raise TransferTimeout(
                    f"{host}:{path}: no answer within {self._settings.timeout:g} s",
                    host=host,
                    path=path,
                ) from None

        try:
            return await self._thread.run(on_asyncio)
        except TransferError as error:
            self._stats.errors += 1
            error.host = error.host or host
            error.path = error.path or path
            raise

    def _pool(self, netloc: str) -> _Pool:
        """The pool of ``[user@]host[:port]``, created on first use; call on the asyncio thread only."""
        pool = self._pools.get(netloc)
        if pool is None:
            user, _, address = netloc.rpartition("@")
            host, port = _host_port(address)
            user, host = unquote(user), unquote(host)  # a catalog's host name arrives %-encoded
            settings = dataclasses.replace(
                self._settings, username=user or self._settings.username, port=port or self._settings.port
            )
            pool = self._pools[netloc] = _Pool(host, settings, self._stats)
        return pool

    async def _close_pools(self) -> None:
        for pool in self._pools.values():
            await pool.close()


@dataclass(slots=True)
class _Stats:
    bytes_read: int = 0
    requests: int = 0
    reconnects: int = 0
    connects: int = 0
    errors: int = 0
    round_trip_us: int = 0

    def round_trip(self, seconds: float) -> None:
        """A request that moves no data (an open, a realpath) took ``seconds``: one round trip."""
        micros = max(1, round(seconds * 1e6))
        self.round_trip_us = min(self.round_trip_us, micros) if self.round_trip_us else micros

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


class _Pool:
    """Up to ``settings.connections`` connections to one host; lives on the asyncio loop."""

    def __init__(self, host: str, settings: SFTPSettings, stats: _Stats) -> None:
        self.host = host
        self._settings = settings
        self.stats = stats
        self._slots = [_Slot(self) for _ in range(settings.connections)]
        self._backoff = 0.0
        self._retry_at = 0.0
        self._growing: set[asyncio.Task[None]] = set()  # background connects (see ``_choose``)

    async def read(self, path: str, offset: int, length: int) -> bytes:
        pieces = _split(offset, length, self._settings.connections)
        if len(pieces) == 1:
            return await self._on_connection(path, lambda conn: conn.read(path, offset, length))
        return b"".join(
            await _gather(
                self._on_connection(path, lambda conn, o=o, n=n: conn.read(path, o, n))
                for o, n in pieces
            )
        )

    async def size(self, path: str) -> int:
        return await self._on_connection(path, lambda conn: conn.size(path))

    async def warm_up(self) -> None:
        """Connect the slot that the next operation picks, without leasing it, and time one
        round trip on it (``round_trip_us``: the fetcher sizes its first fetches by it).

        Not leased, so a read arriving meanwhile chooses this slot too and waits
        for this connect (under the slot's lock) instead of opening another.
        """
        conn = await min(self._slots, key=_Slot.preference).connection()
        await conn.probe()

    async def close(self) -> None:
        for task in self._growing:
            task.cancel()
        for slot in self._slots:
            await slot.close()

    def _choose(self) -> _Slot:
        """The slot for the next operation: the least busy one, but never one still to connect
        while another is connected. SFTP requests share a connection well, and a handshake costs
        several round trips (350 ms and more at 50 ms RTT): an idle slot without a connection
        is connected in the background for the operations after this one."""
        best = min(self._slots, key=_Slot.preference)
        connected = [slot for slot in self._slots if slot.connected]
        if best.connected or best.busy or not connected:
            return best
        if not best.connecting:
            task = asyncio.get_running_loop().create_task(self._grow(best))
            self._growing.add(task)  # the loop holds tasks only weakly
            task.add_done_callback(self._growing.discard)
        return min(connected, key=_Slot.preference)

    async def _grow(self, slot: _Slot) -> None:
        try:
            await slot.connection()
        except TransferError as error:  # the next operation that needs this slot reports it
            log.info("%s: could not open another connection: %s", self.host, error)

    async def connect(self) -> _Connection:
        """Open one connection with its SFTP session, waiting out any backoff first."""
        loop = asyncio.get_running_loop()
        delay = self._retry_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            async with asyncio.timeout(self._settings.connect_timeout):
                ssh = await asyncssh.connect(self.host, **self._connect_options())
                try:
                    sftp = await ssh.start_sftp_client()
                except BaseException:
                    ssh.close()
                    raise
        except _CONNECT_ERRORS as error:
            self._backoff = min(max(self._backoff * BACKOFF_FACTOR, BACKOFF_FIRST), BACKOFF_MAX)
            self._retry_at = loop.time() + self._backoff
            raise self._connect_error(error) from error
        self._backoff = 0.0
        self.stats.connects += 1
        return _Connection(ssh, sftp, self._settings, self.stats)

    async def _on_connection(self, path: str, operation: _Operation[T]) -> T:
        """Run ``operation`` on the least busy connection; retry once if that connection drops."""
        try:
            return await self._attempt(path, operation, self._choose())
        except _Dropped as dropped:
            log.info("%s: connection lost (%s); retrying on a fresh one", self.host, dropped.cause)
            retry_on = dropped.slot  # emptied by the drop, so it reconnects
        try:
            return await self._attempt(path, operation, retry_on)
        except _Dropped as dropped:
            raise ConnectionLost(
                f"{self.host}: connection lost while reading {path} ({dropped.cause}), "
                "and again on a fresh connection"
            ) from dropped.cause

    async def _attempt(self, path: str, operation: _Operation[T], slot: _Slot) -> T:
        with slot.lease():
            conn = await slot.connection()
            try:
                return await operation(conn)
            except asyncssh.SFTPNoSuchFile:
                raise RemoteFileNotFound(
                    f"{self.host}:{path}: no such file on the server; the catalog lists this "
                    "file but the server does not have it (it may be archived)"
                ) from None
            except asyncssh.SFTPPermissionDenied:
                message = f"{self.host}:{path}: permission denied on the server"
                raise TransferError(message) from None
            except _CONNECTION_ERRORS as error:
                slot.drop(conn)
                raise _Dropped(error, slot) from error
            except asyncssh.SFTPError as error:
                raise TransferError(f"{self.host}:{path}: {error.reason}") from error

    def _connect_options(self) -> dict[str, Any]:
        settings = self._settings
        options: dict[str, Any] = {
            "known_hosts": _known_hosts_option(settings),
            "encryption_algs": list(settings.ciphers),
            "compression_algs": None,  # data files rarely compress; zlib would cap throughput
            "window": settings.window,
            "keepalive_interval": settings.keepalive_interval,
            "keepalive_count_max": 3,
        }
        if settings.port is not None:
            options["port"] = settings.port
        if settings.username is not None:
            options["username"] = settings.username
        if settings.identity_files:
            options["client_keys"] = [str(path) for path in settings.identity_files]
        if settings.ssh_config is not None:
            options["config"] = [str(settings.ssh_config)]
        return options

    def _connect_error(self, error: Exception) -> TransferError:
        where = f"{self.host}:{self._settings.port}" if self._settings.port else self.host
        if isinstance(error, asyncssh.HostKeyNotVerifiable):
            return HostKeyError(
                f"{where}: host key not verified against {self._settings.known_hosts_description}: "
                "the key is unknown or has CHANGED (possible man-in-the-middle). Check the key "
                "and add it to known_hosts, or pass --known-hosts FILE",
                host=self.host,
            )
        if isinstance(error, asyncssh.PermissionDenied):
            return SSHAuthError(
                f"{where}: authentication failed for the SSH user; check --identity-file, "
                "ssh-agent (SSH_AUTH_SOCK) and the User in ~/.ssh/config",
                host=self.host,
            )
        if isinstance(error, TimeoutError):
            return TransferTimeout(
                f"{where}: could not connect within {self._settings.connect_timeout:g} s",
                host=self.host,
            )
        if isinstance(error, (OSError, asyncssh.DisconnectError)):
            return ConnectionLost(f"{where}: cannot connect: {error}", host=self.host)
        if isinstance(error, (ValueError, asyncssh.KeyImportError)):
            # asyncssh reports unreadable key files and bad config values this way.
            return TransferError(f"{where}: bad SSH configuration: {error}", host=self.host)
        return TransferError(f"{where}: cannot connect: {error}", host=self.host)


def _host_port(address: str) -> tuple[str, int | None]:
    """``host``, ``host:22`` or ``[::1]:22`` -> (host, port or None)."""
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or (host.startswith("[") != host.endswith("]")):
        return address.strip("[]"), None
    return host.strip("[]"), int(port)


def _known_hosts_option(settings: SFTPSettings) -> str | tuple[()] | None:
    """asyncssh's spelling: a file name, () for ssh's default files, None for no checking."""
    if not settings.check_host_keys:
        return None
    return str(settings.known_hosts) if settings.known_hosts else ()


class _Dropped(Exception):
    """Internal: the connection broke under an operation, which may be retried elsewhere."""

    def __init__(self, cause: Exception, slot: _Slot) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.slot = slot


class _Slot:
    """One place in a pool: at most one live connection, (re)opened on demand."""

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self._conn: _Connection | None = None
        self._lost = False
        self._lock = asyncio.Lock()
        self.busy = 0

    def preference(self) -> tuple[int, int]:
        """Sort key: idle connected slots first, then idle empty ones, then the least busy."""
        return (self.busy, 0 if self._conn is not None else 1)

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    @property
    def connecting(self) -> bool:
        return self._lock.locked()

    @contextmanager
    def lease(self) -> Iterator[None]:
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1

    async def connection(self) -> _Connection:
        async with self._lock:
            if self._conn is not None and self._conn.closed:  # the server hung up while idle
                self.drop(self._conn)
            if self._conn is None:
                self._conn = await self._pool.connect()
                if self._lost:
                    self._pool.stats.reconnects += 1
                    self._lost = False
            return self._conn

    def drop(self, conn: _Connection) -> None:
        """Forget a broken connection (if still ours) so the next lease reconnects."""
        if self._conn is conn:
            self._conn = None
            self._lost = True
        conn.abort()

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


class _Connection:
    """One SSH connection with one SFTP session and a small LRU of open remote files."""

    def __init__(
        self, ssh: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient, settings: SFTPSettings, stats: _Stats
    ) -> None:
        self._ssh = ssh
        self._sftp = sftp
        self._stats = stats
        self._max_requests = settings.max_requests
        # The server's limits@openssh.com answer, else asyncssh's safe 16 KiB.
        self._request_size = sftp.limits.max_read_len
        self._files = _OpenFiles(settings.open_files, self._evicted)
        #: Opens under way, by path, set when each ends (see ``_acquire``).
        self._opening: dict[str, asyncio.Event] = {}
        self._closing: set[asyncio.Task[None]] = set()

    async def read(self, path: str, offset: int, length: int) -> bytes:
        entry = await self._acquire(path)
        try:
            return await _Pipeline(entry.file, offset, length, self._request_size).run(
                self._max_requests
            )
        finally:
            entry.users -= 1
            if entry.evicted and entry.users == 0:
                self._close_later(entry.file)

    async def probe(self) -> None:
        """One round trip that moves no data, timed into ``round_trip_us``; failures are ignored."""
        started = asyncio.get_running_loop().time()
        with suppress(asyncssh.Error, OSError):
            await self._sftp.realpath(".")
            self._stats.round_trip(asyncio.get_running_loop().time() - started)

    async def size(self, path: str) -> int:
        attrs = await self._sftp.stat(path)
        if attrs.size is None:
            raise TransferError(f"{path}: the server did not report a size")
        return attrs.size

    @property
    def closed(self) -> bool:
        return self._ssh.is_closed()

    def abort(self) -> None:
        self._ssh.abort()

    async def close(self) -> None:
        self._ssh.close()
        with suppress(Exception):
            await self._ssh.wait_closed()

    async def _acquire(self, path: str) -> _OpenFile:
        """The open handle of ``path``, opening it if needed.

        Opens of different paths are in flight together (16 readers of 16
        small files need 16 opens, one round trip each, not one after the
        other); readers of one path wait for its one open and share the handle.
        """
        entry = self._files.get(path)
        while entry is None:
            opening = self._opening.get(path)
            if opening is not None:  # another reader's open of this path: share its handle
                await opening.wait()
            else:
                self._opening[path] = opening = asyncio.Event()
                try:
                    # block_size 0: each file.read() is one SFTP request; _Pipeline splits.
                    started = asyncio.get_running_loop().time()
                    file = await self._sftp.open(path, "rb", block_size=0)
                    self._stats.round_trip(asyncio.get_running_loop().time() - started)
                    self._files[path] = _OpenFile(file)
                finally:
                    del self._opening[path]
                    opening.set()
            entry = self._files.get(path)  # None if that open failed: this reader tries its own
        entry.users += 1
        return entry

    def _evicted(self, entry: _OpenFile) -> None:
        entry.evicted = True
        if entry.users == 0:
            self._close_later(entry.file)

    def _close_later(self, file: asyncssh.SFTPClientFile) -> None:
        task = asyncio.get_running_loop().create_task(_close_quietly(file))
        self._closing.add(task)  # the loop holds tasks only weakly
        task.add_done_callback(self._closing.discard)


@dataclass(eq=False, slots=True)
class _OpenFile:
    """A remote handle shared by concurrent readers; closed once evicted and unused."""

    file: asyncssh.SFTPClientFile
    users: int = 0
    evicted: bool = False


class _OpenFiles(cachetools.LRUCache[str, _OpenFile]):
    """LRU of open handles that reports the ones it evicts, so they can be closed."""

    def __init__(self, maxsize: int, on_evict: Callable[[_OpenFile], None]) -> None:
        super().__init__(maxsize)
        self._on_evict = on_evict

    def popitem(self) -> tuple[str, _OpenFile]:
        path, entry = super().popitem()
        self._on_evict(entry)
        return path, entry


async def _close_quietly(file: asyncssh.SFTPClientFile) -> None:
    with suppress(asyncssh.Error, OSError):
        await file.close()


class _Pipeline:
    """One ranged read as ``workers`` requests in flight, each at most ``request_size`` bytes.

    Each worker claims the next range and keeps asking until that range is
    complete: a short answer is followed at once by a request for the rest, and
    only an empty answer (end of file) stops it, and lowers the end for all
    workers. The answers are joined in file order, one copy of the data (none
    for a single answer), where asyncssh's own ``read`` makes two (into a
    bytearray, then to bytes): at zero RTT the asyncio thread is CPU-bound and
    that copy was a sixth of its time.
    """

    def __init__(
        self, file: asyncssh.SFTPClientFile, offset: int, length: int, request_size: int
    ) -> None:
        self._file = file
        self._offset = offset
        self._next = offset  # start of the first range no worker has claimed
        self._end = offset + length  # lowered to the end of file once an answer shows it
        self._request_size = request_size
        self._answers: list[tuple[int, bytes]] = []

    async def run(self, workers: int) -> bytes:
        workers = min(workers, math.ceil((self._end - self._offset) / self._request_size))
        if workers == 1:
            await self._worker()  # no task for the common small read
        else:
            await _gather(self._worker() for _ in range(workers))
        return self._joined()

    async def _worker(self) -> None:
        while self._next < self._end:
            start = self._next
            stop = self._next = min(start + self._request_size, self._end)
            while start < min(stop, self._end):  # after a short answer: ask for the rest
                asked = min(stop, self._end) - start
                data: bytes = await self._file.read(asked, start)
                if not data:  # SSH_FX_EOF: the file ends here
                    self._end = min(self._end, start)
                    return
                if len(data) > asked:  # reported like any other broken SFTP message
                    message = f"the server answered {len(data)} bytes for {asked} asked"
                    raise asyncssh.SFTPBadMessage(message)
                self._answers.append((start, data))
                start += len(data)

    def _joined(self) -> bytes:
        """The answers in file order up to the end of file (an answer past it is dropped)."""
        self._answers.sort(key=lambda answer: answer[0])
        parts = []
        position = self._offset
        for start, data in self._answers:
            if start != position or start >= self._end:
                break
            parts.append(data)
            position += len(data)
        if not parts:
            return b""
        return parts[0] if len(parts) == 1 else b"".join(parts)


async def _gather(coroutines: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``coroutines`` concurrently; their results in order.

    The first failure cancels the others and is raised as itself, not inside
    the ExceptionGroup of a TaskGroup: callers map single SFTP and connection
    errors to TransferErrors.
    """
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(coroutine) for coroutine in coroutines]
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


def _split(offset: int, length: int, connections: int) -> list[tuple[int, int]]:
    """Cut a long read into contiguous pieces, one per connection, none below SPLIT_PIECE."""
    if length < SPLIT_THRESHOLD or connections == 1:
        return [(offset, length)]
    count = min(connections, max(1, length // SPLIT_PIECE))
    piece = math.ceil(length / count)
    end = offset + length
    return [(start, min(piece, end - start)) for start in range(offset, end, piece)]
