"""The benchmark's latency proxy adds the round-trip time it claims and keeps bandwidth."""

from __future__ import annotations

import socket
import socketserver
import statistics
import threading
import time
from collections.abc import Iterator

import pytest

from tests.benchmarks.delay_proxy import DelayProxy

ROUND_TRIPS = 15


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _SinkHandler(socketserver.BaseRequestHandler):
    """Reads until EOF, then answers with the byte count (8 bytes, big-endian)."""

    def handle(self) -> None:
        total = 0
        while data := self.request.recv(1 << 20):
            total += len(data)
        self.request.sendall(total.to_bytes(8, "big"))


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def echo_port() -> Iterator[int]:
    yield from _serve(_EchoHandler)


@pytest.fixture
def sink_port() -> Iterator[int]:
    yield from _serve(_SinkHandler)


def _serve(handler: type[socketserver.BaseRequestHandler]) -> Iterator[int]:
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _median_round_trip(port: int) -> float:
    """Median seconds for a 64-byte request to come back from the echo server."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        samples = []
        for _ in range(ROUND_TRIPS):
            start = time.perf_counter()
            sock.sendall(b"x" * 64)
            received = 0
            while received < 64:
                chunk = sock.recv(64 - received)
                assert chunk, "echo connection closed early"
                received += len(chunk)
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("rtt_ms", [20, 50])
def test_adds_the_claimed_round_trip_time(echo_port: int, rtt_ms: int) -> None:
    direct = _median_round_trip(echo_port)
    with DelayProxy("127.0.0.1", echo_port, rtt=rtt_ms / 1000) as proxy:
        proxied = _median_round_trip(proxy.port)
    added_ms = (proxied - direct) * 1000
    assert rtt_ms - 1 <= added_ms <= rtt_ms + 8, f"added {added_ms:.1f} ms, claimed {rtt_ms} ms"


@pytest.mark.timeout(30)
def test_zero_rtt_forwards_without_delay(echo_port: int) -> None:
    with DelayProxy("127.0.0.1", echo_port, rtt=0) as proxy:
        assert _median_round_trip(proxy.port) < 0.005


@pytest.mark.timeout(60)
def test_streams_far_faster_than_a_window_limited_link(sink_port: int) -> None:
    """At 20 ms RTT a 64 KiB window would allow ~3 MB/s; the proxy must not be that link."""
    total = 256 * 1024 * 1024
    block = b"\xa5" * (1 << 20)
    with DelayProxy("127.0.0.1", sink_port, rtt=0.020) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as sock:
            start = time.perf_counter()
            for _ in range(total // len(block)):
                sock.sendall(block)
            sock.shutdown(socket.SHUT_WR)
            reply = sock.recv(8)
            elapsed = time.perf_counter() - start
    assert int.from_bytes(reply, "big") == total, "the proxy lost or invented bytes"
    megabytes_per_second = total / elapsed / 1e6
    assert megabytes_per_second >= 50, f"{megabytes_per_second:.0f} MB/s through a 20 ms proxy"
    assert elapsed >= 0.020, "the end-of-stream round trip was not delayed"


def test_refuses_a_negative_rtt() -> None:
    with pytest.raises(ValueError, match="rtt"):
        DelayProxy("127.0.0.1", 1, rtt=-0.001)


@pytest.mark.timeout(15)
def test_an_unreachable_target_closes_the_client_connection() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_port = unused.getsockname()[1]  # bound but not listening: connect is refused
        with DelayProxy("127.0.0.1", dead_port, rtt=0.010) as proxy:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
                assert sock.recv(1) == b""
