"""An asyncio event loop in its own thread, awaited from trio without parking threads.

asyncssh runs only on asyncio and pyfuse3 only on trio. Rather than a thread per
request (``trio.to_thread``), one daemon thread runs an asyncio loop forever; the
trio side submits coroutines to it and sleeps on a ``trio.Event`` that the
asyncio side sets through the trio token when the coroutine finishes. A waiting
trio task therefore costs no thread, and thousands can wait at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class AsyncioThread:
    """Owns one asyncio loop running in one daemon thread, from ``start()`` to ``stop()``."""

    def __init__(self, name: str = "scicatfs-asyncio") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the loop thread and return once the loop is running."""
        if self._thread is not None:
            raise RuntimeError("asyncio thread already started")
        loop = asyncio.new_event_loop()
        running = threading.Event()
        loop.call_soon(running.set)
        self._loop = loop
        self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
        self._thread.start()
        running.wait()

    def stop(self) -> None:
        """Cancel whatever still runs on the loop, stop it, and join the thread."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None
        self._loop = None

    async def run(self, coro_factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``coro_factory()`` on the asyncio loop and return its result to trio.

        Exceptions propagate unchanged. Cancelling the calling trio task cancels
        the asyncio task, and ``run`` returns only once that task has finished,
        so no asyncio work outlives the trio scope that started it. One
        ``call_soon_threadsafe`` there and one ``run_sync_soon`` back, without
        ``run_coroutine_threadsafe``'s concurrent future in between: a small
        file's read crosses here once, and the crossing's cost is per file.
        """
        loop = self._loop
        if loop is None:
            raise RuntimeError("asyncio thread is not running")
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        started: list[asyncio.Task[T]] = []
        failed: list[BaseException] = []

        def wake(_: object = None) -> None:  # on the asyncio thread
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        def start() -> None:  # on the asyncio thread
            try:
                task = loop.create_task(coro_factory())
            except BaseException as error:  # handed to the trio side as it is
                failed.append(error)
                wake()
                return
            started.append(task)
            task.add_done_callback(wake)

        def cancel() -> None:  # on the asyncio thread, after start()
            for task in started:
                task.cancel()

        loop.call_soon_threadsafe(start)
        try:
            await done.wait()
        except trio.Cancelled:
            loop.call_soon_threadsafe(cancel)
            with trio.CancelScope(shield=True):
                await done.wait()
            raise
        if failed:
            raise failed[0]
        return started[0].result()

    def _main(self) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
