"""A real nginx on 127.0.0.1 serving a directory, started and stopped by the tests.

Each server has its own config, pid file, logs and temp paths in its work
directory and runs in the foreground (``-g 'daemon off;'``), so nothing of the
system's nginx (whose service the package must not start) is used. Locations:

    /            the root, with Range support (206)
    /norange/    the same files, ranges ignored (``max_ranges 0``: always 200)
    /private/    the same files, 403 without ``Authorization: Bearer <token>``
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.requirements import skip_or_fail

__all__ = ["NginxServer", "make_nginx"]

START_TIMEOUT = 10.0

CONFIG = """\
user root;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/tmp/body;
    proxy_temp_path {work}/tmp/proxy;
    fastcgi_temp_path {work}/tmp/fastcgi;
    uwsgi_temp_path {work}/tmp/uwsgi;
    scgi_temp_path {work}/tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location /norange/ {{ alias {root}/; max_ranges 0; }}
        location /private/ {{
            alias {root}/;
            if ($http_authorization != "Bearer {token}") {{ return 403; }}
        }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class NginxServer:
    """nginx serving ``root`` on 127.0.0.1; ``start()``/``stop()`` (also a context manager)."""

    def __init__(self, root: Path, work: Path, token: str = "test-token", port: int | None = None) -> None:
        self.root = root
        self.work = work
        self.token = token
        self.port = port or _free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def put(self, path: str, data: bytes) -> str:
        """Write ``data`` at ``path`` under the root; returns ``path``."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return path

    def start(self) -> NginxServer:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        skip_or_fail(None if Path(binary).exists() else "nginx is not installed (apt-get install nginx-light)")
        (self.work / "tmp").mkdir(parents=True, exist_ok=True)
        config = self.work / "nginx.conf"
        config.write_text(CONFIG.format(work=self.work, root=self.root, port=self.port, token=self.token))
        self._process = subprocess.Popen(
            [binary, "-c", str(config), "-p", str(self.work), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                assert self._process.stderr is not None
                raise RuntimeError(f"nginx exited: {self._process.stderr.read().decode(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not listen on 127.0.0.1:{self.port} within {START_TIMEOUT:g} s")

    def stop(self) -> None:
        """Stop at once (SIGTERM: open connections are cut); harmless to call twice."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()

    def __enter__(self) -> NginxServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@pytest.fixture
def make_nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., NginxServer]]:
    """Factory ``make_nginx(root=None, **kwargs) -> NginxServer`` (started); all stopped after the test."""
    servers: list[NginxServer] = []

    def make(root: Path | None = None, **kwargs: object) -> NginxServer:
        work = tmp_path_factory.mktemp("nginx")
        server = NginxServer(root or work / "root", work, **kwargs)  # type: ignore[arg-type]
        server.root.mkdir(parents=True, exist_ok=True)
        servers.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in servers:
            server.stop()
