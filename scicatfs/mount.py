"""One mount's life: connect the layers, mount, serve, unmount.

Order of events, and why:

1. Cheap local checks (FUSE usable, mountpoint empty and not stale,
   credentials readable) and one catalog request, *before* mounting: a mount
   that cannot work must fail with one clear line, not leave a directory that
   answers EIO.
2. ``pyfuse3.init`` mounts; ``pyfuse3.main`` serves requests.
3. Readiness is "the root answers ``stat``" (checked from a thread, since the
   loop that answers runs in this one). Only then: the bdi read-ahead is
   raised, systemd is told READY=1, and a parent waiting in :func:`run`
   (background mode) is released with exit status 0, as sshfs does.
4. SIGINT/SIGTERM/SIGHUP end the loop; ``pyfuse3.close(unmount=True)`` then
   detaches the mount (lazily, so a busy mount cannot keep a stopped process
   around), also when something failed.
"""

from __future__ import annotations

import errno
import json
import logging
import logging.handlers
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyfuse3
import trio

from scicatfs.config import MountOptions
from scicatfs.errors import ScicatfsError
from scicatfs.fs.operations import MAX_TASKS, FsOptions, ScicatOperations
from scicatfs.metrics import MetricsError, MetricsExporter
from scicatfs.mountpoint import MountpointError, check_fuse, check_mountpoint
from scicatfs.notify import notify_ready, notify_stopping
from scicatfs.stack import Stack, open_stack
from scicatfs.stack import namespace as build_namespace
from scicatfs.status import collect_status

__all__ = ["MountError", "fuse_options", "run", "serve"]

log = logging.getLogger(__name__)

#: The root must answer stat within this time after mounting, or the mount is abandoned.
READY_TIMEOUT = 30.0
WARM_UP_WAIT = 2.0  # seconds the mount waits for its first SSH connection
READ_AHEAD_KB = 1024


class MountError(Exception):
    """The mount could not be set up; the message is the one line the user sees."""


def fuse_options(options: MountOptions) -> set[str]:
    """libfuse mount options: read-only, named ``scicat:<host>`` of type ``fuse.scicatfs``."""
    parts = urlsplit(options.url)
    host = parts.hostname or "catalog"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    result = {f"fsname=scicat:{host}", "subtype=scicatfs", "ro", "nosuid", "nodev", "noatime"}
    if options.allow_other:
        # Other users' access must then be checked by the kernel against our modes.
        result |= {"allow_other", "default_permissions"}
    result.update(options.fuse_options)
    return result


async def serve(options: MountOptions, ready: Callable[[], None] = lambda: None) -> None:
    """Mount according to ``options`` and serve until unmounted or signalled.

    ``ready`` is called once the mount answers. Raises :class:`MountError`
    for every failure before that point.
    """
    try:
        check_fuse()
        check_mountpoint(options.mountpoint)
    except MountpointError as error:
        raise MountError(str(error)) from None
    for what, path in (("identity file", options.identity_file), ("known_hosts file", options.known_hosts)):
        # SSH is only used on the first read; a typo here would otherwise surface as EIO much later.
        if path is not None and not os.access(path, os.R_OK):
            raise MountError(f"cannot read {what} {path}")

    async with AsyncExitStack() as exits:
        try:
            stack = await exits.enter_async_context(open_stack(options))
        except (ScicatfsError, OSError) as error:
            raise MountError(str(error)) from None
        try:
            await stack.catalog.count()
        except ScicatfsError as error:
            raise MountError(f"catalog at {options.url}: {error}") from None
        # Like sshfs, be connected before the mount is ready (so the first read
        # skips the SSH handshake), but never wait long for a server that is down.
        await stack.transfer.warm_up(wait=WARM_UP_WAIT)
        operations, status = _filesystem(options, stack)
        exporter = None
        if options.metrics_port is not None or options.metrics_textfile is not None:
            exporter = MetricsExporter(status, port=options.metrics_port, textfile=options.metrics_textfile)
            try:
                exporter.start()
            except MetricsError as error:
                raise MountError(str(error)) from None
        await _mount_and_serve(operations, options, ready, exporter)


def _filesystem(options: MountOptions, stack: Stack) -> tuple[ScicatOperations, Callable[[], dict[str, Any]]]:
    """The filesystem over the connected layers, and its status document (``/.scicat/status.json``, metrics)."""
    started = time.time()
    catalog, fetcher = stack.catalog, stack.fetcher

    def document() -> dict[str, Any]:
        return collect_status(
            catalog=catalog, transfer=stack.transfer, fetcher=fetcher, mountpoint=options.mountpoint, started=started,
            inodes=operations.inodes.stats,
        )

    def status() -> bytes:
        return (json.dumps(document(), indent=2, sort_keys=True) + "\n").encode()

    namespace = build_namespace(stack, options, status)
    fs_options = FsOptions(xattrs=options.xattrs, negative_ttl=options.listing_ttl,
                           resident_inodes=options.resident_inodes, inode_dir=options.cache_dir)
    operations = ScicatOperations(namespace, fetcher, fs_options)
    namespace.on_change = operations.forget_dataset
    return operations, document


async def _mount_and_serve(
    operations: ScicatOperations,
    options: MountOptions,
    ready: Callable[[], None],
    exporter: MetricsExporter | None = None,
) -> None:
    mountpoint = str(options.mountpoint)
    try:
        pyfuse3.init(operations, mountpoint, fuse_options(options))
    except RuntimeError:
        raise MountError(f"mounting {mountpoint} failed (libfuse's message above says why)") from None
    log.info("mounted %s at %s", options.url, mountpoint)
    failures: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal)
            nursery.start_soon(_announce, options.mountpoint, ready, failures)
            if exporter is not None:
                nursery.start_soon(exporter.run)
            await pyfuse3.main(min_tasks=2, max_tasks=MAX_TASKS)
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)
        operations.close()
        log.info("unmounted %s", mountpoint)
    if failures:
        raise MountError(failures[0])


async def _announce(mountpoint: Path, ready: Callable[[], None], failures: list[str]) -> None:
    """Wait until the mount answers, then tell everyone; on failure, record why and stop."""
    try:
        with trio.fail_after(READY_TIMEOUT):
            status = await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
    except (trio.TooSlowError, OSError) as error:
        failures.append(f"the mount at {mountpoint} did not answer: {error or 'timeout'}")
        pyfuse3.terminate()
        return
    _raise_read_ahead(status.st_dev)
    notify_ready()
    ready()


def _raise_read_ahead(device: int) -> None:
    """Let the kernel ask for 1 MiB at a time instead of 128 KiB (doubles first-read speed).

    Only root may write the bdi setting; anyone else keeps the default.
    """
    path = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    try:
        if int(path.read_text()) < READ_AHEAD_KB:
            path.write_text(str(READ_AHEAD_KB))
    except (OSError, ValueError) as error:
        log.debug("read-ahead left at the default: %s", error)


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for number in signals:
            log.info("%s received, unmounting", signal.Signals(number).name)
            notify_stopping()
            pyfuse3.terminate()
            return


# -- foreground and background ----------------------------------------------------


def run(options: MountOptions, ready: Callable[[], None] = lambda: None) -> int:
    """Mount; in the background unless ``options.foreground``. Returns the exit status.

    Background mode forks before any thread exists. The parent waits on a
    pipe and exits 0 only when the child reports that the mount answers, or
    prints the child's one-line error and exits 1, like sshfs.
    """
    if options.foreground:
        try:
            trio.run(serve, options, ready)
        except MountError as error:
            print(f"scicatfs: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # Ctrl-C before the mount was up: nothing to unmount
            return 130
        return 0

    read_end, write_end = os.pipe()
    child = os.fork()
    if child:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode("utf-8", "replace").strip()
        if message == "ready":
            return 0
        if not message:
            _, status = os.waitpid(child, 0)
            message = f"the mount process exited before the mount was ready (status {os.waitstatus_to_exitcode(status)})"
        print(f"scicatfs: {message}", file=sys.stderr)
        return 1

    os.close(read_end)
    os.setsid()
    os.chdir("/")  # never keep the caller's directory (and its filesystem) busy
    pipe = os.fdopen(write_end, "wb", buffering=0)

    def detach() -> None:
        pipe.write(b"ready")
        pipe.close()
        _detach_from_terminal()
        ready()

    status = 0
    try:
        trio.run(serve, options, detach)
    except MountError as error:
        if not pipe.closed:
            pipe.write(str(error).encode())
        status = 1
    except BaseException:
        log.exception("scicatfs stopped by an unexpected error")
        status = 1
    os._exit(status)


def _syslog_handler() -> logging.Handler:
    """A handler for syslog (the journal), or one that drops records where no syslog listens."""
    if not os.path.exists("/dev/log"):
        return logging.NullHandler()
    handler = logging.handlers.SysLogHandler(address="/dev/log")
    handler.setFormatter(logging.Formatter("scicatfs[%(process)d]: %(levelname)s %(name)s: %(message)s"))
    return handler


def _detach_from_terminal() -> None:
    """Let go of the terminal's stdio; logs go on to the log file, else to syslog (the journal)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if not isinstance(handler, logging.FileHandler):  # the terminal's stream handler
            root.removeHandler(handler)
    if not root.handlers:
        root.addHandler(_syslog_handler())
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        try:
            os.dup2(null, fd)
        except OSError as error:
            if error.errno != errno.EBADF:
                raise
    os.close(null)
