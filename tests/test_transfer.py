"""The transfer layer against a real OpenSSH sshd on 127.0.0.1 (tests/support/sshd.py)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from scicatfs.transfer.bridge import AsyncioThread
from scicatfs.transfer.errors import (
    ConnectionLost,
    HostKeyError,
    RemoteFileNotFound,
    SSHAuthError,
    TransferError,
    TransferTimeout,
)
from scicatfs.transfer.base import source_url
from scicatfs.transfer.sftp import SFTPSettings, SFTPTransfer
from tests.benchmarks.delay_proxy import DelayProxy
from tests.support.sshd import OpenSSHServer

T = TypeVar("T")


def sftp(path: str | Path) -> str:
    """The URL of ``path`` on the default host of the settings."""
    return source_url("sftp", "", str(path))
KiB, MiB = 1024, 1024 * 1024
OPENSSH_MAX_READ = 255 * KiB


def with_transfer(settings: SFTPSettings, body: Callable[[SFTPTransfer], Awaitable[T]]) -> T:
    async def main() -> T:
        async with SFTPTransfer(settings) as transfer:
            return await body(transfer)

    return trio.run(main)


@pytest.fixture
def remote_dir(sshd: OpenSSHServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A directory on the shared server that only this test writes to."""
    name = f"/tests/{request.node.name}".replace("[", "_").replace("]", "")
    yield name
    subprocess.run(["rm", "-rf", str(sshd.local_path(name))], check=True)


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


# -- exact bytes ----------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [
        0,
        1,
        OPENSSH_MAX_READ - 1,
        OPENSSH_MAX_READ,
        OPENSSH_MAX_READ + 1,
        4 * MiB - 1,
        4 * MiB,
        4 * MiB + 1,
    ],
)
def test_reads_exact_bytes(sshd: OpenSSHServer, remote_dir: str, size: int) -> None:
    data = payload(size, seed=size)
    path = sshd.put(f"{remote_dir}/f.bin", data)

    async def body(transfer: SFTPTransfer) -> None:
        assert await transfer.size(sftp(path)) == size
        assert await transfer.read(sftp(path), 0, size) == data
        assert await transfer.read(sftp(path), 0, size + 1000) == data  # EOF comes first
        for offset in {0, 1, size // 3, max(size - 1, 0)}:
            length = min(OPENSSH_MAX_READ + 7, size)
            assert await transfer.read(sftp(path), offset, length) == data[offset : offset + length]

    with_transfer(sshd.sftp_settings(), body)


@pytest.mark.slow
def test_large_file_random_offsets_and_whole(sshd: OpenSSHServer, remote_dir: str) -> None:
    data = os.urandom(100 * MiB + 12345)
    path = sshd.put(f"{remote_dir}/big.bin", data)
    rng = random.Random(8)
    lengths = [1, 4 * KiB, 300 * KiB, 5 * MiB, 17 * MiB]
    ranges = [(rng.randrange(len(data)), rng.choice(lengths)) for _ in range(40)]

    async def body(transfer: SFTPTransfer) -> tuple[bytes, list[bytes]]:
        whole = await transfer.read(sftp(path), 0, len(data))
        pieces = [await transfer.read(sftp(path), offset, length) for offset, length in ranges]
        return whole, pieces

    whole, pieces = with_transfer(sshd.sftp_settings(), body)
    assert hashlib.sha256(whole).digest() == hashlib.sha256(data).digest()
    for (offset, length), piece in zip(ranges, pieces, strict=True):
        assert piece == data[offset : offset + length], (offset, length)


def test_reads_past_end_of_file(sshd: OpenSSHServer, remote_dir: str) -> None:
    data = payload(1000)
    path = sshd.put(f"{remote_dir}/short.bin", data)

    async def body(transfer: SFTPTransfer) -> None:
        assert await transfer.read(sftp(path), 990, 100) == data[990:]
        assert await transfer.read(sftp(path), 1000, 10) == b""
        assert await transfer.read(sftp(path), 5000, 10 * MiB) == b""
        assert await transfer.read(sftp(path), 10, 0) == b""

    with_transfer(sshd.sftp_settings(), body)


def test_rejects_negative_ranges(sshd: OpenSSHServer) -> None:
    async def body(transfer: SFTPTransfer) -> None:
        with pytest.raises(ValueError, match="bad range"):
            await transfer.read(sftp("/x"), -1, 10)

    with_transfer(sshd.sftp_settings(), body)


def test_concurrent_reads_and_exact_byte_count(sshd: OpenSSHServer, remote_dir: str) -> None:
    files = {f"{remote_dir}/f{i}.bin": payload(3 * MiB + i, seed=i) for i in range(4)}
    for path, data in files.items():
        sshd.put(path, data)
    rng = random.Random(32)
    jobs = [
        (path, rng.randrange(len(data)), rng.randrange(1, 2 * MiB))
        for path, data in (rng.choice(list(files.items())) for _ in range(32))
    ]
    results: dict[int, bytes] = {}

    async def body(transfer: SFTPTransfer) -> dict[str, int]:
        async def one(index: int, path: str, offset: int, length: int) -> None:
            results[index] = await transfer.read(sftp(path), offset, length)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for index, job in enumerate(jobs):
                    nursery.start_soon(one, index, *job)
        return transfer.stats

    stats = with_transfer(sshd.sftp_settings(connections=3), body)
    for index, (path, offset, length) in enumerate(jobs):
        assert results[index] == files[path][offset : offset + length]
    assert stats["bytes_read"] == sum(len(data) for data in results.values())
    assert stats["requests"] == 32
    assert stats["connects"] <= 3


def test_large_read_is_spread_over_connections(sshd: OpenSSHServer, remote_dir: str) -> None:
    data = payload(32 * MiB + 3)
    path = sshd.put(f"{remote_dir}/wide.bin", data)

    async def body(transfer: SFTPTransfer) -> tuple[bytes, dict[str, int]]:
        return await transfer.read(sftp(path), 1, len(data)), transfer.stats

    got, stats = with_transfer(sshd.sftp_settings(connections=4), body)
    assert got == data[1:]
    assert stats["connects"] == 4
    assert stats["bytes_read"] == len(data) - 1


# -- errors ---------------------------------------------------------------------


@pytest.mark.parametrize("length", [10, 16 * MiB])  # one connection; split over several
def test_missing_file_is_remote_file_not_found(
    sshd: OpenSSHServer, remote_dir: str, length: int
) -> None:
    missing = f"{remote_dir}/archived.h5"

    async def body(transfer: SFTPTransfer) -> None:
        with pytest.raises(RemoteFileNotFound, match="may be archived") as read_error:
            await transfer.read(sftp(missing), 0, length)
        with pytest.raises(RemoteFileNotFound):
            await transfer.size(sftp(missing))
        assert read_error.value.path == missing
        assert read_error.value.host == sshd.host

    with_transfer(sshd.sftp_settings(), body)


def test_no_host_asks_for_sftp_host(sshd: OpenSSHServer) -> None:
    async def body(transfer: SFTPTransfer) -> None:
        with pytest.raises(TransferError, match="--sftp-host"):
            await transfer.read(sftp("/data/x"), 0, 1)

    with_transfer(sshd.sftp_settings(host=None), body)


def test_unknown_host_key_is_refused(sshd: OpenSSHServer, remote_dir: str, tmp_path: Path) -> None:
    path = sshd.put(f"{remote_dir}/f", b"secret")
    empty = tmp_path / "known_hosts"
    empty.write_text("")

    async def body(transfer: SFTPTransfer) -> None:
        with pytest.raises(HostKeyError) as error:
            await transfer.read(sftp(path), 0, 6)
        message = str(error.value)
        assert f"127.0.0.1:{sshd.port}" in message
        assert str(empty) in message

    with_transfer(sshd.sftp_settings(known_hosts=empty), body)


def test_changed_host_key_is_refused(sshd: OpenSSHServer, remote_dir: str, tmp_path: Path) -> None:
    path = sshd.put(f"{remote_dir}/f", b"secret")
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    key_type, key = other.with_suffix(".pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {key_type} {key}\n")

    async def body(transfer: SFTPTransfer) -> None:
        with pytest.raises(HostKeyError, match="CHANGED"):
            await transfer.read(sftp(path), 0, 6)

    with_transfer(sshd.sftp_settings(known_hosts=known), body)


@pytest.mark.allow_log(r"WARNING scicatfs\.transfer\.sftp: SSH host key checking is DISABLED")
def test_host_key_checking_can_be_disabled_loudly(
    sshd: OpenSSHServer, remote_dir: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = sshd.put(f"{remote_dir}/f", b"payload")
    empty = tmp_path / "known_hosts"
    empty.write_text("")

    async def body(transfer: SFTPTransfer) -> bytes:
        return await transfer.read(sftp(path), 0, 7)

    with caplog.at_level(logging.WARNING, logger="scicatfs.transfer"):
        got = with_transfer(sshd.sftp_settings(known_hosts=empty, check_host_keys=False), body)
    assert got == b"payload"
    assert "host key checking is DISABLED" in caplog.text


def test_unauthorised_key_is_auth_error(
    sshd: OpenSSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)

    async def body(transfer: SFTPTransfer) -> None:
        with pytest.raises(SSHAuthError, match="authentication failed"):
            await transfer.size(sftp("/anything"))

    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)  # never borrow the runner's agent keys
    with_transfer(sshd.sftp_settings(identity_files=(stranger,)), body)


def test_ssh_config_alias_port_user_and_identity(
    sshd: OpenSSHServer, remote_dir: str, tmp_path: Path
) -> None:
    path = sshd.put(f"{remote_dir}/f", b"via alias")
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host fileserver\n"
        f"  HostName {sshd.host}\n"
        f"  Port {sshd.port}\n"
        f"  User {sshd.username}\n"
        f"  IdentityFile {sshd.client_key}\n"
    )
    settings = sshd.sftp_settings(
        host=None, port=None, username=None, identity_files=(), ssh_config=config
    )

    async def body(transfer: SFTPTransfer) -> bytes:
        return await transfer.read(source_url("sftp", "fileserver", path), 0, 100)

    assert with_transfer(settings, body) == b"via alias"


def test_ssh_agent_supplies_the_key(
    sshd: OpenSSHServer, remote_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = sshd.put(f"{remote_dir}/f", b"via agent")
    socket_path = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not socket_path.exists():
            assert time.monotonic() < deadline, "ssh-agent did not start"
            time.sleep(0.02)
        environment = {**os.environ, "SSH_AUTH_SOCK": str(socket_path)}
        subprocess.run(
            ["ssh-add", "-q", str(sshd.client_key)], env=environment, check=True, timeout=10
        )
        monkeypatch.setenv("SSH_AUTH_SOCK", str(socket_path))
        monkeypatch.setenv("HOME", str(tmp_path))  # no default key files: only the agent has one

        async def body(transfer: SFTPTransfer) -> bytes:
            return await transfer.read(sftp(path), 0, 100)

        assert with_transfer(sshd.sftp_settings(identity_files=()), body) == b"via agent"
    finally:
        agent.terminate()
        agent.wait(timeout=5)


def test_connection_refused_fails_fast(make_sshd: Callable[[], OpenSSHServer]) -> None:
    server = make_sshd()
    server.stop()

    async def body(transfer: SFTPTransfer) -> None:
        started = time.monotonic()
        with pytest.raises(ConnectionLost, match="cannot connect"):
            await transfer.size(sftp("/x"))
        assert time.monotonic() - started < 3

    with_transfer(server.sftp_settings(), body)


def test_warm_up_connects_before_the_first_read(sshd: OpenSSHServer, remote_dir: str) -> None:
    path = sshd.put(f"{remote_dir}/f.bin", b"x" * 10)

    async def body(transfer: SFTPTransfer) -> None:
        await transfer.warm_up()  # returns at once
        assert transfer.stats["connects"] == 0
        assert await transfer.read(sftp(path), 0, 10) == b"x" * 10  # waits for that connect
        assert transfer.stats["connects"] == 1  # the read used the warm connection
        await transfer.warm_up(wait=5)  # nothing to do: a slot is connected
        assert transfer.stats["connects"] == 1

    with_transfer(sshd.sftp_settings(), body)


def test_warm_up_can_wait_for_the_connection(sshd: OpenSSHServer) -> None:
    async def body(transfer: SFTPTransfer) -> None:
        with trio.fail_after(5):
            await transfer.warm_up(wait=5)
        assert transfer.stats["connects"] == 1

    with_transfer(sshd.sftp_settings(), body)


def test_warm_up_of_a_dead_server_is_quiet_and_reads_still_fail_clearly(
    make_sshd: Callable[[], OpenSSHServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = make_sshd()
    server.stop()

    async def body(transfer: SFTPTransfer) -> None:
        with caplog.at_level(logging.INFO, logger="scicatfs.transfer.sftp"), trio.fail_after(5):
            await transfer.warm_up(wait=5)  # a refused connection ends the wait early
        assert "could not connect to 127.0.0.1 ahead of the first read" in caplog.text
        with trio.fail_after(5), pytest.raises(ConnectionLost, match="cannot connect"):
            await transfer.size(sftp("/x"))

    with_transfer(server.sftp_settings(), body)


# -- faults: drops, restarts, stalls, cancellation ------------------------------


@pytest.mark.parametrize("connections", [1, 3])
def test_reconnects_after_sshd_killed_and_restarted(
    make_sshd: Callable[[], OpenSSHServer], connections: int
) -> None:
    server = make_sshd()
    data = payload(12 * MiB)
    path = server.put("/d/f.bin", data)

    async def body(transfer: SFTPTransfer) -> dict[str, int]:
        assert await transfer.read(sftp(path), 0, 100) == data[:100]
        assert await transfer.read(sftp(path), 0, len(data)) == data  # warm up every connection
        server.kill()
        server.start()
        # The pooled connection is dead; the read is retried on a fresh one.
        assert await transfer.read(sftp(path), 100, MiB) == data[100 : 100 + MiB]
        server.kill()
        started = time.monotonic()
        with pytest.raises((ConnectionLost, TransferTimeout)):
            await transfer.read(sftp(path), 0, 100)
        assert time.monotonic() - started < 5
        server.start()
        assert await transfer.read(sftp(path), 0, len(data)) == data
        return transfer.stats

    stats = with_transfer(server.sftp_settings(connections=connections), body)
    assert stats["reconnects"] >= 2


def test_stalled_server_hits_deadline(make_sshd: Callable[[], OpenSSHServer]) -> None:
    server = make_sshd()
    path = server.put("/d/f.bin", payload(MiB))

    async def body(transfer: SFTPTransfer) -> None:
        await transfer.read(sftp(path), 0, 10)
        server.signal_connections(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(TransferTimeout, match="no answer within 1 s"):
                await transfer.read(sftp(path), 10, 10)
            assert time.monotonic() - started < 3
        finally:
            server.signal_connections(signal.SIGCONT)

    with_transfer(server.sftp_settings(timeout=1, connections=1), body)


def test_trio_cancellation_cancels_the_transfer(make_sshd: Callable[[], OpenSSHServer]) -> None:
    server = make_sshd()
    data = payload(MiB)
    path = server.put("/d/f.bin", data)

    async def body(transfer: SFTPTransfer) -> None:
        await transfer.read(sftp(path), 0, 10)
        server.signal_connections(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(trio.TooSlowError):
                with trio.fail_after(0.3):
                    await transfer.read(sftp(path), 10, 10)
            # run() returns only after the asyncio side finished: it was cancelled,
            # not left to run into the 30 s deadline.
            assert time.monotonic() - started < 2
        finally:
            server.signal_connections(signal.SIGCONT)
        assert await transfer.read(sftp(path), 0, len(data)) == data

    with_transfer(server.sftp_settings(timeout=30, connections=1), body)


# -- the bridge on its own ------------------------------------------------------


def test_bridge_returns_results_and_raises_errors() -> None:
    thread = AsyncioThread()
    thread.start()

    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    async def fail() -> None:
        raise KeyError("from asyncio")

    async def main() -> None:
        assert await thread.run(answer) == 42
        with pytest.raises(KeyError, match="from asyncio"):
            await thread.run(fail)

    try:
        trio.run(main)
    finally:
        thread.stop()


def test_bridge_cancellation_reaches_asyncio() -> None:
    thread = AsyncioThread()
    thread.start()
    seen: list[str] = []

    async def sleeper() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def main() -> None:
        with trio.move_on_after(0.1) as scope:
            await thread.run(sleeper)
        assert scope.cancelled_caught

    try:
        trio.run(main)
    finally:
        thread.stop()
    assert seen == ["cancelled"]


# -- remote handles -------------------------------------------------------------


def test_chunked_reader_keeps_one_remote_handle(make_sshd: Callable[[], OpenSSHServer]) -> None:
    server = make_sshd()
    data = payload(8 * MiB)
    path = server.put("/d/f.bin", data)

    async def body(transfer: SFTPTransfer) -> list[Path]:
        for offset in range(0, len(data), MiB):
            assert await transfer.read(sftp(path), offset, MiB) == data[offset : offset + MiB]
        return server.open_files()

    still_open = with_transfer(server.sftp_settings(connections=1), body)
    assert still_open == [server.local_path(path)]


def test_evicted_handles_are_closed(make_sshd: Callable[[], OpenSSHServer]) -> None:
    server = make_sshd()
    paths = [server.put(f"/d/f{i}.bin", payload(100, seed=i)) for i in range(10)]

    async def body(transfer: SFTPTransfer) -> list[Path]:
        for path in paths:
            await transfer.read(sftp(path), 0, 100)
        with trio.fail_after(5):
            while len(server.open_files()) > 3:  # closes of evicted handles are in flight
                await trio.sleep(0.02)
        return server.open_files()

    still_open = with_transfer(server.sftp_settings(connections=1, open_files=3), body)
    assert sorted(still_open) == [server.local_path(path) for path in paths[-3:]]


def test_opens_of_different_files_on_one_connection_are_in_flight_together(
    sshd: OpenSSHServer, remote_dir: str, tmp_path: Path
) -> None:
    """Eight readers of eight files over one connection at 100 ms RTT: their opens do not
    queue behind each other (one after the other they took eight round trips)."""
    paths = [sshd.put(f"{remote_dir}/f{number}.bin", payload(100, seed=number)) for number in range(9)]
    rtt = 0.1
    with DelayProxy(sshd.host, sshd.port, rtt=rtt) as proxy:
        known_hosts = tmp_path / "known_hosts"
        key = sshd.known_hosts.read_text().split(None, 1)[1]
        known_hosts.write_text(f"[{sshd.host}]:{proxy.port} {key}")

        async def body(transfer: SFTPTransfer) -> float:
            await transfer.read(sftp(paths[0]), 0, 100)  # connected: the handshake is not timed
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                for number, path in enumerate(paths[1:], start=1):
                    async def read(path: str = path, number: int = number) -> None:
                        assert await transfer.read(sftp(path), 0, 100) == payload(100, seed=number)
                    nursery.start_soon(read)
            return trio.current_time() - started

        settings = sshd.sftp_settings(port=proxy.port, known_hosts=known_hosts, connections=1)
        elapsed = with_transfer(settings, body)
    assert elapsed < 5 * rtt, f"eight opens and reads took {elapsed:.2f} s at {rtt:g} s RTT"


def test_a_read_finding_the_connection_busy_shares_it_while_another_connects_in_the_background(
    sshd: OpenSSHServer, remote_dir: str, tmp_path: Path
) -> None:
    """At 100 ms RTT a second connection's handshake takes seven round trips or more: a read
    that arrives while the only connection is busy must not wait for it."""
    big = sshd.put(f"{remote_dir}/big.bin", payload(4 * MiB))
    small = sshd.put(f"{remote_dir}/small.bin", payload(100, seed=1))
    rtt = 0.1
    with DelayProxy(sshd.host, sshd.port, rtt=rtt) as proxy:
        known_hosts = tmp_path / "known_hosts"
        key = sshd.known_hosts.read_text().split(None, 1)[1]
        known_hosts.write_text(f"[{sshd.host}]:{proxy.port} {key}")

        async def body(transfer: SFTPTransfer) -> tuple[float, int]:
            await transfer.warm_up(wait=10)  # connected: the first handshake is not timed
            async with trio.open_nursery() as nursery:
                nursery.start_soon(transfer.read, sftp(big), 0, 4 * MiB)  # keeps the connection busy
                await trio.sleep(0.01)
                started = trio.current_time()
                assert await transfer.read(sftp(small), 0, 100) == payload(100, seed=1)
                elapsed = trio.current_time() - started
            with trio.fail_after(10):  # the spare connection comes up on its own
                while transfer.stats["connects"] < 2:
                    await trio.sleep(0.05)
            return elapsed, transfer.stats["connects"]

        settings = sshd.sftp_settings(port=proxy.port, known_hosts=known_hosts, connections=2)
        elapsed, connects = with_transfer(settings, body)
    assert elapsed < 4 * rtt, f"the open and read of a small file took {elapsed:.2f} s at {rtt:g} s RTT"
    assert connects == 2
