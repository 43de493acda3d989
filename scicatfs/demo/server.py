"""A SciCat-compatible catalog server for the demo and the tests.

It answers the routes a read-only SciCat client uses the way
scicat-backend-next does (status codes, Nest error bodies, access control,
the v3 block cap, anonymous handling of bad tokens); `routes.py` lists the
routes and what they answer.

Built on the stdlib `http.server.ThreadingHTTPServer` on purpose: this is a
test and demo instrument that must start in milliseconds inside pytest and
inside `scicatfs demo`, runs in a daemon thread next to a trio or asyncio
program without touching its event loop, and needs no ASGI stack or extra
dependency.

`CatalogServer.url` is the bare origin (``http://127.0.0.1:PORT``); clients
append ``/api/v3/...`` or ``/api/v4/...`` themselves, as they would for the
real server.

Run ``python -m scicatfs.demo.server [--port N]`` to serve the packaged
fixtures for poking at with curl.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from scicatfs.demo import jwt
from scicatfs.demo.filters import FilterError
from scicatfs.demo.fixtures import Catalog, User
from scicatfs.demo.routes import Api, Reply, Request, nest_error

__all__ = ["CatalogServer", "main"]

log = logging.getLogger(__name__)

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    pattern: tuple[str, ...]          # literal segments, lower case; "{pid}" captures one segment
    handler: str                      # name of the `Api` method that answers
    data: bool                        # subject to the failure_rate / malformed knobs


_ROUTES = [
    _Route("GET", ("api", "v3", "health"), "health", False),
    _Route("POST", ("api", "v3", "auth", "login"), "login", False),
    _Route("GET", ("api", "v3", "auth", "whoami"), "whoami", False),
    _Route("GET", ("api", "v3", "datasets"), "v3_datasets", True),
    _Route("GET", ("api", "v3", "datasets", "count"), "v3_count", True),
    _Route("GET", ("api", "v3", "datasets", "fullfacet"), "v3_fullfacet", True),
    _Route("GET", ("api", "v3", "datasets", "{pid}"), "v3_dataset", True),
    _Route("GET", ("api", "v3", "datasets", "{pid}", "origdatablocks"), "v3_dataset_blocks", True),
    _Route("GET", ("api", "v3", "datasets", "{pid}", "origdatablocks", "count"), "v3_dataset_block_count", True),
    _Route("GET", ("api", "v3", "origdatablocks"), "v3_origdatablocks", True),
    _Route("GET", ("api", "v4", "datasets"), "v4_datasets", True),
    _Route("GET", ("api", "v4", "datasets", "count"), "v4_count", True),
    _Route("GET", ("api", "v4", "datasets", "fullfacet"), "v4_fullfacet", True),
    _Route("GET", ("api", "v4", "datasets", "public"), "v4_public_datasets", True),
    _Route("GET", ("api", "v4", "datasets", "public", "count"), "v4_public_count", True),
    _Route("GET", ("api", "v4", "datasets", "public", "{pid}"), "v4_public_dataset", True),
    _Route("GET", ("api", "v4", "datasets", "{pid}"), "v4_dataset", True),
    _Route("GET", ("api", "v4", "origdatablocks"), "v4_origdatablocks", True),
    _Route("GET", ("api", "v4", "origdatablocks", "files"), "v4_origdatablock_files", True),
    _Route("GET", ("api", "v4", "origdatablocks", "public"), "v4_public_origdatablocks", True),
    _Route("GET", ("api", "v4", "origdatablocks", "public", "files"), "v4_public_origdatablock_files", True),
]


def _match(method: str, segments: list[str]) -> tuple[_Route, str | None] | None:
    """The first route for (method, raw path segments) and its still-encoded PID segment."""
    for route in _ROUTES:
        if route.method != method or len(route.pattern) != len(segments):
            continue
        pid = None
        for literal, segment in zip(route.pattern, segments):
            if literal == "{pid}":
                pid = segment
            elif literal != segment.lower():
                break
        else:
            return route, pid
    return None


class _HTTPServer(ThreadingHTTPServer):
    """Remembers its open connections so that stopping the server really drops them.

    Without this, keep-alive connections would go on being served by their
    handler threads after `stop()`, and a test of "the catalog went away" would
    silently keep talking to it.
    """

    daemon_threads = True
    request_queue_size = 128  # the stdlib default of 5 drops SYNs under parallel clients (1 s retransmits)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (it gave up waiting, or cancelled) is no server error."""
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)

    def drop_connections(self) -> None:
        with self.connections_lock:
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed by the peer


class CatalogServer:
    """Serves a `Catalog` over HTTP on 127.0.0.1 in a daemon thread.

    Runtime knobs for tests, safe to change while serving:
      latency       seconds added to every request
      failure_rate  fraction of data requests (datasets / origdatablocks routes)
                    answered 503 with a Nest error body
      malformed     data routes answer 200 with a body that is not valid JSON
      range_filters False: list routes answer 400 to comparison operators
                    ($gt, gte, ...), as a server that does not take them would
    `requests` logs (method, path with query, status) of every request.
    `stop()` drops open connections; `start()` after `stop()` listens on the
    same port again (a catalog outage and its recovery, for fault tests).
    """

    def __init__(self, catalog: Catalog, *, host: str = "127.0.0.1", port: int = 0,
                 jwt_secret: str | None = None, token_lifetime: float = 3600) -> None:
        self.catalog = catalog
        self.host = host
        self.token_lifetime = token_lifetime
        self.latency = 0.0
        self.failure_rate = 0.0
        self.malformed = False
        self.range_filters = True
        self.requests: list[tuple[str, str, int]] = []
        self._requested_port = port
        self._secret = jwt_secret or secrets.token_hex(32)
        self._api = Api(catalog, self)
        self._lock = threading.Lock()
        self._random = random.Random()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> CatalogServer:
        """Bind, start serving in a daemon thread and return once connections are accepted."""
        if self._httpd is not None:
            raise RuntimeError("CatalogServer already started")
        handler = type("_BoundHandler", (_Handler,), {"catalog_server": self})
        httpd = _HTTPServer((self.host, self._requested_port), handler)
        self._httpd = httpd
        self._requested_port = self.port
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"catalog-server:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the listening socket and drop open connections; idempotent."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        httpd.drop_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> CatalogServer:
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("CatalogServer is not running")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """The origin, e.g. http://127.0.0.1:40123 (append /api/v3 or /api/v4)."""
        return f"http://{self.host}:{self.port}"

    # -- tokens and users --------------------------------------------------------

    def issue_token(self, username: str, lifetime: float | None = None) -> str:
        """A signed JWT for `username`; a negative lifetime gives an already expired one."""
        user = self.catalog.users[username]
        now = time.time()
        lifetime = self.token_lifetime if lifetime is None else lifetime
        return jwt.encode(user.profile() | {"iat": int(now), "exp": int(now + lifetime)}, self._secret)

    def user_for(self, authorization: str | None) -> User | None:
        """The user behind an Authorization header; None (anonymous) for anything invalid."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        payload = jwt.decode(authorization[len("Bearer "):].strip(), self._secret, now=time.time())
        if payload is None:
            return None
        return self.catalog.users.get(payload.get("username", ""))

    # -- request log and fault knobs --------------------------------------------

    def reset_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))

    def _should_fail(self) -> bool:
        with self._lock:
            return self.failure_rate > 0 and self._random.random() < self.failure_rate

    def dispatch(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Reply:
        """Answer one request; never raises (a handler bug becomes a logged 500)."""
        if self.latency > 0:
            time.sleep(self.latency)
        parts = urlsplit(target)
        segments = parts.path.split("/")[1:]
        if segments and segments[-1] == "":
            segments.pop()
        found = _match(method, segments)
        if found is None:
            query = f"?{parts.query}" if parts.query else ""
            return nest_error(404, f"Cannot {method} {parts.path}{query}")
        route, raw_pid = found
        if route.data and self._should_fail():
            return nest_error(503, "Service Unavailable")
        if raw_pid is not None and _BAD_ESCAPE.search(raw_pid):
            return nest_error(400, f"Failed to decode param '{raw_pid}'")
        try:
            pid = None if raw_pid is None else unquote(raw_pid, errors="strict")
        except UnicodeDecodeError:
            return nest_error(400, f"Failed to decode param '{raw_pid}'")
        request = Request(method=method, pid=pid, query=parse_qs(parts.query, keep_blank_values=True),
                          user=self.user_for(headers.get("authorization")), body=body)
        try:
            reply = getattr(self._api, route.handler)(request)
        except FilterError as exc:
            return nest_error(400, str(exc))
        except Exception:
            log.exception("catalog server: %s %s failed", method, target)
            return nest_error(500, "Internal server error")
        if route.data and self.malformed and reply.status < 300:
            return Reply(reply.status, b'{"pid": "truncated', raw=True)
        return reply


class _Handler(BaseHTTPRequestHandler):
    """Turns HTTP/1.1 requests into `CatalogServer.dispatch` calls."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True   # headers and body are two writes; keep-alive clients would stall 40 ms
    catalog_server: CatalogServer
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def _serve(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length > 0 else b""
            reply = self.catalog_server.dispatch(
                self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        except Exception:  # the dispatcher guards handlers; this guards the dispatcher itself
            log.exception("catalog server: %s %s failed", self.command, self.path)
            reply = nest_error(500, "Internal server error")
        payload = reply.encode()
        # Logged before answering: a client that has its answer finds its request in the log.
        self.catalog_server._record(self.command, self.path, reply.status)
        self.send_response(reply.status)
        if payload:  # Express sends an empty body without a Content-Type
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("catalog server: " + format, *args)


def main(argv: list[str] | None = None) -> None:
    """Serve the packaged fixtures until interrupted (for trying the API with curl)."""
    parser = argparse.ArgumentParser(prog="python -m scicatfs.demo.server",
                                     description="Serve the demo SciCat catalog on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: any free port)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    server = CatalogServer(Catalog.load_default(), port=args.port)
    try:
        server.start()
    except OSError as exc:
        parser.exit(1, f"cannot listen on 127.0.0.1:{args.port}: {exc.strerror or exc}\n")
    with server:
        pid = "20.500.12269%2F72fe3ff6-105b-4c7f-b9d0-073b67c90ec3"
        print(f"SciCat demo catalog at {server.url}/api/v3 (and /api/v4)")
        print("users: stibbons / demo (groups uu, faculty), ridcully / wizzard (group archchancellor)")
        print(f"try:   curl -s -X POST -H 'Content-Type: application/json' "
              f"-d '{{\"username\":\"stibbons\",\"password\":\"demo\"}}' {server.url}/api/v3/auth/login")
        print(f"then:  curl -s -H \"Authorization: Bearer $TOKEN\" "
              f"'{server.url}/api/v4/datasets/{pid}?include=origdatablocks'")
        print(f"public: curl -s '{server.url}/api/v4/datasets/public'")
        print(f"started {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC; Ctrl-C stops", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
