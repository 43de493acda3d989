"""A loopback TCP proxy that adds round-trip time without capping throughput.

Remote filesystems differ most on real networks, where every request waits a
round trip; containers rarely have ``tc netem``, so the benchmark emulates
latency with this proxy between the clients and sshd.

Each direction of each connection delays its bytes by ``rtt / 2``: a reader
task timestamps every chunk on arrival and queues it, a writer task releases
it at ``arrival + delay``. Because reading continues while earlier chunks wait,
the link behaves like a long pipe (a bandwidth-delay product in flight), not
like a stop-and-wait link whose throughput would be ``chunk / delay``. The
queue is bounded, so a slow receiver pushes back on the sender through TCP.

The proxy runs its own asyncio loop in a daemon thread, so it can sit behind
synchronous benchmark code and behind trio tests alike::

    with DelayProxy("127.0.0.1", sshd.port, rtt=0.020) as proxy:
        ...  # connect to 127.0.0.1:proxy.port
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
from typing import Self

#: Largest chunk read at once. Small enough that release times stay fine-grained.
CHUNK_SIZE = 256 * 1024
#: Chunks queued per direction and connection: bounds memory to 64 MiB per
#: direction, which is still ~3 GB/s of bandwidth-delay product at 20 ms.
MAX_QUEUED_CHUNKS = 256

_EOF = b""


class DelayProxy:
    """Forward 127.0.0.1:``port`` to ``target_host:target_port`` with added RTT.

    ``rtt`` is in seconds and is split evenly between the two directions.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        rtt: float,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        if rtt < 0:
            raise ValueError(f"rtt must be >= 0 seconds, got {rtt}")
        self.target_host = target_host
        self.target_port = target_port
        self.rtt = rtt
        self.listen_host = listen_host
        self.port = listen_port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> Self:
        """Start listening; returns once the port is bound (``self.port``)."""
        if self._thread is not None:
            raise RuntimeError("DelayProxy already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(
                        self._on_client, self.listen_host, self.port, limit=CHUNK_SIZE
                    )
                )
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                ready.set()
                loop.close()
                return
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._shutdown())
                loop.close()

        self._thread = threading.Thread(target=run, name="delay-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(timeout=10):
            raise RuntimeError("DelayProxy did not start within 10 s")
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close the listener and every proxied connection; idempotent."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        # Aborting the sockets ends every pipe the way a dropped link would;
        # the connection tasks then finish on their own within rtt / 2.
        for writer in self._writers:
            writer.transport.abort()
        if self._connections:
            await asyncio.wait(self._connections, timeout=self.rtt + 5)
        await self._server.wait_closed()

    async def _on_client(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self._writers.add(client_writer)
        try:
            try:
                upstream_reader, upstream_writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        self.target_host, self.target_port, limit=CHUNK_SIZE
                    ),
                    timeout=10,
                )
            except (OSError, TimeoutError):
                return
            self._writers.add(upstream_writer)
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._pipe(client_reader, upstream_writer))
                    group.create_task(self._pipe(upstream_reader, client_writer))
            except* (OSError, asyncio.IncompleteReadError):
                pass  # a reset on either side ends the connection, as it would on a wire
            finally:
                upstream_writer.close()
                self._writers.discard(upstream_writer)
        finally:
            client_writer.close()
            self._writers.discard(client_writer)
            self._connections.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction, delaying every chunk by half the RTT."""
        loop = asyncio.get_running_loop()
        delay = self.rtt / 2
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(MAX_QUEUED_CHUNKS)

        async def receive() -> None:
            while True:
                chunk = await reader.read(CHUNK_SIZE)
                await queue.put((loop.time() + delay, chunk))
                if chunk == _EOF:
                    return

        async def release() -> None:
            while True:
                due, chunk = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if chunk == _EOF:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(chunk)
                await writer.drain()

        async with asyncio.TaskGroup() as group:
            group.create_task(receive())
            group.create_task(release())


def main(argv: list[str] | None = None) -> None:
    """Run a proxy in the foreground, e.g. to try a client by hand at 50 ms RTT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="HOST:PORT to forward to")
    parser.add_argument("--rtt-ms", type=float, required=True, help="added round-trip time")
    parser.add_argument("--port", type=int, default=0, help="listen port (default: any free)")
    args = parser.parse_args(argv)
    host, sep, port = args.target.rpartition(":")
    if not sep or not port.isdigit():
        parser.error(f"target must be HOST:PORT, got {args.target!r}")
    with DelayProxy(host, int(port), args.rtt_ms / 1000, listen_port=args.port) as proxy:
        print(f"127.0.0.1:{proxy.port} -> {args.target} (+{args.rtt_ms:g} ms RTT); Ctrl-C stops", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
