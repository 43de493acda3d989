"""A stalled file server must not stall the filesystem: metadata and cached data keep answering."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from scicatfs.demo.fixtures import Catalog
from tests.support.sshd import OpenSSHServer

PID = "h5test/stall"
FILES = 8
SIZE = 64 * 1024
ANSWER_WITHIN = 3.0


def _stall(sshd: OpenSSHServer, signum: int) -> None:
    """SIGSTOP/SIGCONT the listener and every connection: the server stops answering, sockets stay open."""
    os.kill(int(sshd.pid_file.read_text()), signum)
    sshd.signal_connections(signum)


def _within(seconds: float, action: Callable[[], object]) -> object:
    """Run ``action`` in a thread; fail if it has not returned after ``seconds``."""
    result: list[object] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(action())
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    thread = threading.Thread(target=target, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no answer within {seconds} s"
    if errors:
        raise errors[0]
    assert time.monotonic() - started < seconds
    return result[0]


def _read_uncached(path: Path) -> bytes:
    with open(path, "rb") as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # force a FUSE read
        return file.read()


def test_metadata_and_cached_reads_answer_while_transfers_hang(make_mount, make_sshd) -> None:  # type: ignore[no-untyped-def]
    sshd: OpenSSHServer = make_sshd()
    catalog = Catalog.load_default()
    names = [f"part_{index}.bin" for index in range(FILES + 1)]
    record = {
        "pid": PID, "datasetName": "stall", "owner": "Ponder Stibbons", "ownerGroup": "uu",
        "contactEmail": "p.stibbons@uu.am", "creationLocation": "UnseenUniversity",
        "sourceFolder": "/h5test/stall", "creationTime": "2023-05-01T10:00:00.000Z",
    }
    catalog.add_dataset(record, [{"path": name, "size": SIZE} for name in names])
    mount = make_mount(catalog, sftp=sshd)
    dataset = mount.dataset(PID)
    cached = dataset / names[0]
    assert cached.read_bytes() == catalog.content(PID, names[0])  # fully cached from now on

    readers: list[threading.Thread] = []
    results: dict[str, bytes | BaseException] = {}

    def reader(name: str) -> None:
        try:
            results[name] = (dataset / name).read_bytes()
        except BaseException as error:
            results[name] = error

    _stall(sshd, signal.SIGSTOP)
    try:
        for name in names[1:]:
            thread = threading.Thread(target=reader, args=(name,), daemon=True)
            thread.start()
            readers.append(thread)
        time.sleep(0.5)
        assert not results, "reads should be waiting for the stalled server"

        assert _within(ANSWER_WITHIN, lambda: os.stat(dataset / names[-1]).st_size) == SIZE
        assert sorted(_within(ANSWER_WITHIN, lambda: os.listdir(dataset))) == sorted(  # type: ignore[arg-type]
            names + [".scicat", "metadata.json"]
        )
        assert _within(ANSWER_WITHIN, lambda: (dataset / "metadata.json").read_bytes())
        assert _within(ANSWER_WITHIN, lambda: _read_uncached(cached)) == catalog.content(PID, names[0])
    finally:
        _stall(sshd, signal.SIGCONT)

    for thread in readers:
        thread.join(60)
    for name in names[1:]:
        assert results.get(name) == catalog.content(PID, name), name
