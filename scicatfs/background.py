"""The layers of one mount, without a mount: a trio thread that serves plain Python threads.

:mod:`scicatfs.fsspec` (and through it :mod:`scicatfs.scitacean`) reads
datasets with the same catalog client, cache store, fetcher and transfers as
the mount, built by :func:`scicatfs.stack.open_stack` from the same options.
Those layers live on a trio event loop; here it runs in one daemon thread per
:class:`BackgroundStack`, and any thread hands it coroutines with
:meth:`BackgroundStack.call` (``trio.from_thread.run``: thread-safe, the
caller blocks, the loop keeps serving others). Nothing else touches the
layers, so they need no locks beyond trio's own single thread.

Processes: a forked child inherits the objects but not the thread, and its
sockets and sqlite handles belong to the parent. :meth:`BackgroundStack.call`
refuses to run in a process other than the one that started the loop
(:class:`Forked`); the owner then builds a new stack in the child and never
touches the inherited one (closing it would talk to a loop that does not run
there). The cache directory is safe to share between processes (the cache
index is built for that, see docs/cache-format.md), so a child, a mount and
a notebook can all use one.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from scicatfs.config import MountOptions
from scicatfs.errors import ScicatfsError
from scicatfs.fs.namespace import Namespace
from scicatfs.stack import Stack, open_stack
from scicatfs.stack import namespace as build_namespace

__all__ = ["BackgroundStack", "Forked", "STARTUP_TIMEOUT"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long starting waits for the layers and the first catalog answer.
STARTUP_TIMEOUT = 60.0
#: How long closing waits for the layers to shut down (SSH connections closing).
SHUTDOWN_TIMEOUT = 10.0


class Forked(RuntimeError):
    """This stack belongs to the parent of a forked process; build a new one here."""


class BackgroundStack:
    """Catalog, store, transfers, fetcher and namespace on a trio loop in a thread of their own.

    Construction blocks until the layers are up and the catalog has answered
    once, and raises what went wrong (``ScicatfsError``, ``OSError``), so that
    a wrong URL or unreadable token file fails at once with its own message.
    """

    def __init__(self, options: MountOptions) -> None:
        self.options = options
        self.pid = os.getpid()
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._stack: Stack | None = None
        self._namespace: Namespace | None = None
        self._thread = threading.Thread(target=self._run, name=f"scicatfs {options.url}", daemon=True)
        self._thread.start()
        if not self._ready.wait(STARTUP_TIMEOUT):
            raise TimeoutError(f"scicatfs: the layers for {options.url} did not start within {STARTUP_TIMEOUT:g} s")
        if self._failure is not None:
            raise self._failure
        self._closed = False

    @property
    def stack(self) -> Stack:
        assert self._stack is not None
        return self._stack

    @property
    def namespace(self) -> Namespace:
        """The tree the mount shows, without ``/.scicat`` (there are no mount counters to show)."""
        assert self._namespace is not None
        return self._namespace

    def call(self, function: Callable[..., Awaitable[T]], *args: object) -> T:
        """Run ``await function(*args)`` on the loop and return its result (or raise its error)."""
        if os.getpid() != self.pid:
            raise Forked(f"this scicatfs stack was started by process {self.pid}")
        if self._closed:
            raise ValueError("this scicatfs filesystem is closed")
        return trio.from_thread.run(function, *args, trio_token=self._token)

    def start_soon(self, function: Callable[..., Awaitable[object]], *args: object) -> None:
        """Start ``await function(*args)`` on the loop and return at once (errors are logged).

        For work the caller need not wait for, as a FUSE release does not hold
        up ``close(2)``; the loop finishes such work before it shuts down.
        """
        if os.getpid() != self.pid or self._closed:
            return
        assert self._token is not None
        self._token.run_sync_soon(self._spawn, function, args)

    def _spawn(self, function: Callable[..., Awaitable[object]], args: tuple[object, ...]) -> None:
        async def logged() -> None:
            try:
                await function(*args)
            except Exception as error:
                log.warning("scicatfs: %s failed in the background: %s", getattr(function, "__name__", function), error)

        assert self._nursery is not None
        self._nursery.start_soon(logged)

    def close(self) -> None:
        """Leave the layers in reverse order and end the thread (idempotent).

        The thread holds this object, so it is never collected while running:
        owners call this from their own ``weakref.finalize`` (which also runs
        at interpreter exit, so SSH connections are closed rather than dropped).
        Nothing happens in a forked child: the loop is not running there.
        """
        if self._closed or os.getpid() != self.pid or not self._thread.is_alive():
            return
        self._closed = True
        assert self._token is not None and self._stop is not None
        try:
            self._token.run_sync_soon(self._stop.set)
        except trio.RunFinishedError:
            return
        self._thread.join(SHUTDOWN_TIMEOUT)
        if self._thread.is_alive():
            log.warning("scicatfs: the layers for %s did not shut down within %g s", self.options.url, SHUTDOWN_TIMEOUT)

    # -- the loop's thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as error:  # reported to the constructor, or logged after start
            if self._ready.is_set():
                log.error("scicatfs layers for %s stopped: %s", self.options.url, error)
            else:
                self._failure = error
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        options = self.options
        async with open_stack(options) as stack:
            try:
                await stack.catalog.count()  # a wrong URL or refused token fails here, not at the first ls
            except ScicatfsError as error:  # kept from the nurseries below, which would wrap it in a group
                self._failure = type(error)(f"catalog at {options.url}: {error}")
                return
            await stack.transfer.warm_up()  # connect in the background: the first read skips the handshake
            self._stack = stack
            self._namespace = build_namespace(stack, options)
            self._stop = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as self._nursery:  # start_soon's tasks, finished before the layers close
                self._ready.set()
                await self._stop.wait()

