"""A read-only asyncssh SFTP server chrooted to a directory, for `scicatfs demo`.

The demo must run without root and without a system sshd, so it serves the
materialized fixture files itself. It behaves like a locked-down OpenSSH
`internal-sftp`: public-key authentication only (any user name, one generated
client key), SFTP subsystem only, no writes. Host and client keys are
generated per instance in a private temporary directory together with a
known_hosts file, so clients connect with host-key verification on, exactly as
they would to a real server.

asyncssh needs an asyncio loop; the server runs one in its own thread so that
the caller (a trio program, or plain synchronous test code) never touches it.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NoReturn

import asyncssh

__all__ = ["DemoSFTPServer", "ReadOnlySFTPServer"]

_START_TIMEOUT = 10.0
_WRITE_FLAGS = asyncssh.FXF_WRITE | asyncssh.FXF_APPEND | asyncssh.FXF_CREAT | asyncssh.FXF_TRUNC


class ReadOnlySFTPServer(asyncssh.SFTPServer):
    """An SFTP server that refuses every call that would change the tree."""

    def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> object:
        if pflags & _WRITE_FLAGS:
            self._deny()
        return super().open(path, pflags, attrs)

    @staticmethod
    def _deny(*_args: Any) -> NoReturn:
        raise asyncssh.SFTPPermissionDenied("read-only file server")

    setstat = fsetstat = remove = rename = posix_rename = mkdir = rmdir = _deny
    symlink = link = lsetstat = _deny


class DemoSFTPServer:
    """A chrooted, read-only SFTP server on 127.0.0.1 in its own asyncio thread.

    After `start()`: `port`, `client_key_path` (private key, OpenSSH format),
    `known_hosts_path` (``[host]:port <host key>``) and `username` (any name is
    accepted; this is merely a suggestion for clients) describe how to connect.
    ``sftp_server(chan, chroot=...)`` makes the server of each SFTP session: a
    `ReadOnlySFTPServer` unless a test needs one that misbehaves.
    """

    username = "demo"

    def __init__(
        self,
        root: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        sftp_server: Callable[..., ReadOnlySFTPServer] = ReadOnlySFTPServer,
    ) -> None:
        self.root = Path(root)
        self.host = host
        self._sftp_server = sftp_server
        self._requested_port = port
        self._keydir: Path | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._acceptor: asyncssh.SSHAcceptor | None = None

    @property
    def port(self) -> int:
        if self._acceptor is None:
            raise RuntimeError("DemoSFTPServer is not running")
        return self._acceptor.get_port()

    @property
    def client_key_path(self) -> Path:
        return self._require_keydir() / "client_key"

    @property
    def known_hosts_path(self) -> Path:
        return self._require_keydir() / "known_hosts"

    def _require_keydir(self) -> Path:
        if self._keydir is None:
            raise RuntimeError("DemoSFTPServer is not running")
        return self._keydir

    def start(self) -> DemoSFTPServer:
        """Generate keys, start listening and return once connections are accepted."""
        if self._loop is not None:
            raise RuntimeError("DemoSFTPServer already started")
        if not self.root.is_dir():
            raise FileNotFoundError(f"SFTP root {self.root} is not a directory")
        self._keydir = Path(tempfile.mkdtemp(prefix="scicatfs-sftp-keys-"))
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key.write_private_key(self.client_key_path)
        self.client_key_path.chmod(0o600)
        client_key.write_public_key(self._keydir / "authorized_keys")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="demo-sftp", daemon=True)
        self._thread.start()
        future: Future[asyncssh.SSHAcceptor] = asyncio.run_coroutine_threadsafe(
            self._listen(host_key), self._loop)
        try:
            self._acceptor = future.result(timeout=_START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        host = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        public = host_key.export_public_key().decode().strip()
        self.known_hosts_path.write_text(f"{host} {public}\n")
        return self

    async def _listen(self, host_key: asyncssh.SSHKey) -> asyncssh.SSHAcceptor:
        root, server = str(self.root), self._sftp_server
        return await asyncssh.listen(
            self.host, self._requested_port,
            server_host_keys=[host_key],
            authorized_client_keys=str(self._require_keydir() / "authorized_keys"),
            password_auth=False, kbdint_auth=False,
            sftp_factory=lambda chan: server(chan, chroot=root),
            allow_scp=False)

    def stop(self) -> None:
        """Close the listener and all sessions, end the thread, delete the keys."""
        loop, self._loop = self._loop, None
        if loop is not None:
            acceptor, self._acceptor = self._acceptor, None
            if acceptor is not None:
                async def close() -> None:
                    acceptor.close()
                    await acceptor.wait_closed()
                asyncio.run_coroutine_threadsafe(close(), loop).result(timeout=_START_TIMEOUT)
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=_START_TIMEOUT)
            loop.close()
        if self._keydir is not None:
            shutil.rmtree(self._keydir, ignore_errors=True)
            self._keydir = None

    def __enter__(self) -> DemoSFTPServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
