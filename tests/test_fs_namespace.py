"""The filesystem's layers without FUSE: inode counts, directory streams, and the namespace
over a real CatalogClient talking to the project's catalog server."""

from __future__ import annotations

import errno
import logging
from datetime import datetime
from collections.abc import AsyncIterator

import pyfuse3
import pytest
import trio

from scicatfs.cache.errors import IntegrityError
from scicatfs.cache.store import FileSpec
from scicatfs.catalog.auth import Credentials, Secret
from scicatfs.catalog.client import CatalogClient, CatalogSettings
from scicatfs.catalog.errors import (
    AuthenticationError,
    BadResponse,
    CatalogUnavailable,
    DatasetForbidden,
    DatasetNotFound,
)
from scicatfs.config import mount_options
from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.server import CatalogServer
from scicatfs.fs.dirstream import WINDOW, DirectoryStream
from scicatfs.fs.errors import NoEntry, fuse_errors, to_errno
from scicatfs.fs.inodes import InodeTable
from scicatfs.fs.namespace import (
    LISTING_CACHE_ENTRIES,
    ROOT,
    ControlDir,
    DataFileNode,
    DatasetDir,
    Entry,
    MountDir,
    Namespace,
    PidLevel,
    RecordFile,
    parent_of,
)
from scicatfs.stack import FileSpecs
from scicatfs.transfer.errors import RemoteFileNotFound, TransferTimeout
from tests.support.checklogs import LogChecker

#: Specs as a mount with --sftp-host files.test builds them.
SPECS = FileSpecs(mount_options({"url": "http://127.0.0.1", "mountpoint": "/", "sftp_host": "files.test"}))
THAUM = "20.500.12269/72fe3ff6-105b-4c7f-b9d0-073b67c90ec3"
FORBIDDEN = "20.500.12269/d3a4e5f6-0000-4000-8000-dea15ec2e701"
LIBRARY = "20.500.12269/e1f2a3b4-0000-4000-8000-11b4a4a7e7ad"


# -- inodes --------------------------------------------------------------------------


def test_inode_counts_and_forget() -> None:
    table: InodeTable[str] = InodeTable("root")
    first = table.acquire("a")
    assert table.acquire("a") == first and table.lookup_count(first) == 2
    second = table.acquire("b")
    assert second != first and table.node(second) == "b"
    table.forget(first, 1)
    assert table.node(first) == "a" and table.ino_of("a") == first
    table.forget(first, 1)
    with pytest.raises(KeyError):
        table.node(first)
    assert table.ino_of("a") is None
    assert table.acquire("a") not in (first, second)  # numbers are never reused


def test_counts_above_one_go_down_by_what_the_kernel_forgets() -> None:
    table: InodeTable[str] = InodeTable("root")
    ino = table.acquire("a")
    assert table.lookup_count(ino) == 1
    for _ in range(3):
        table.acquire("a")
    assert table.lookup_count(ino) == 4
    table.forget(ino, 3)
    assert table.lookup_count(ino) == 1 and table.node(ino) == "a"
    table.acquire("a")
    table.forget(ino, 2)
    assert table.lookup_count(ino) == 0 and table.ino_of("a") is None and len(table) == 1


def test_root_is_pinned() -> None:
    table: InodeTable[str] = InodeTable("root")
    assert table.acquire("root") == 1
    table.forget(1, 5)
    assert table.node(1) == "root" and len(table) == 1


# -- directory streams ---------------------------------------------------------------


class _Numbers:
    """A source of 0..n-1 that counts how often it was (re)started."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.starts = 0

    async def __call__(self) -> AsyncIterator[int]:
        self.starts += 1
        for number in range(self.n):
            yield number


async def _take(stream: DirectoryStream[int], start: int, count: int) -> list[tuple[int, int]]:
    taken = []
    async for item in stream.entries_from(start):
        taken.append(item)
        if len(taken) == count:
            break
    return taken


def test_stream_resumes_without_restarting_and_restarts_when_rewound() -> None:
    async def main() -> None:
        source = _Numbers(1000)
        stream = DirectoryStream(source)
        assert await _take(stream, 0, 10) == [(i, i) for i in range(10)]
        # The kernel resumes at the entry after the last one it accepted (here 7).
        assert await _take(stream, 8, 5) == [(i, i) for i in range(8, 13)]
        assert source.starts == 1
        assert [i for i, _ in await _take(stream, 13, 2000)] == list(range(13, 1000))
        assert await _take(stream, 1000, 1) == []
        # rewinddir: earlier than the window, so the source starts again.
        assert await _take(stream, 1000 - WINDOW - 5, 3) == [(i, i) for i in range(995 - WINDOW, 998 - WINDOW)]
        assert source.starts == 2
        await stream.aclose()

    trio.run(main)


# -- namespace over the real catalog server --------------------------------------------


def _namespace_test(server: CatalogServer, body, user: str | None = "stibbons", **options) -> None:  # type: ignore[no-untyped-def]
    credentials = Credentials()
    if user is not None:
        credentials = Credentials(token=Secret(server.issue_token(user)), source="test token")

    async def main() -> None:
        async with CatalogClient(CatalogSettings(url=server.url, credentials=credentials)) as catalog:
            await body(Namespace(catalog, file_spec=SPECS, cached_bytes=lambda spec: 0, **options))

    trio.run(main)


async def _entries(namespace: Namespace, node) -> list[Entry]:  # type: ignore[no-untyped-def]
    listing = await namespace.listing(node)
    return list(listing) if isinstance(listing, tuple) else [entry async for entry in listing()]


async def _names(namespace: Namespace, node) -> list[str]:  # type: ignore[no-untyped-def]
    return [name for name, _, _ in await _entries(namespace, node)]


def test_pid_levels_and_datasets(catalog_server: CatalogServer) -> None:
    async def body(namespace: Namespace) -> None:
        assert await _names(namespace, ROOT) == ["20.500.12269", "thaumometer-frames-0042"]
        prefix = await namespace.lookup(ROOT, "20.500.12269")
        assert prefix == PidLevel("20.500.12269/")
        dataset = await namespace.lookup(prefix, THAUM.split("/")[1])
        assert dataset == DatasetDir(THAUM)
        assert await _names(namespace, dataset) == ["metadata.json", ".scicat", "flux.dat", "logs"]
        attributes = await namespace.attributes(dataset)
        assert attributes.is_dir and attributes.nlink == 4 and attributes.ttl == namespace.record_ttl
        with pytest.raises(NoEntry):
            await namespace.lookup(prefix, "no-such-dataset")
        with pytest.raises(DatasetForbidden):
            await namespace.lookup(prefix, FORBIDDEN.split("/")[1])

    _namespace_test(catalog_server, body)


def test_files_and_generated_files(catalog_server: CatalogServer) -> None:
    async def body(namespace: Namespace) -> None:
        dataset = DatasetDir(THAUM)
        flux = await namespace.lookup(dataset, "flux.dat")
        assert isinstance(flux, DataFileNode)
        assert flux.spec == FileSpec(
            THAUM, "flux.dat", "sftp://files.test/hex/ps/thaum/flux.dat", "/hex/ps/thaum/flux.dat", 20, flux.spec.mtime, None
        )
        logs = await namespace.lookup(dataset, "logs")
        assert logs == DatasetDir(THAUM, "logs")
        assert isinstance(await namespace.lookup(logs, "measurement.log"), DataFileNode)

        record = await namespace.lookup(dataset, "metadata.json")
        assert isinstance(record, RecordFile) and not record.live
        content = await namespace.content(record)
        assert (await namespace.attributes(record)).size == len(content)
        control = await namespace.lookup(dataset, ".scicat")
        assert control == ControlDir(THAUM)
        assert await namespace.content(await namespace.lookup(control, "metadata.json")) == content
        files = await namespace.lookup(control, "files.json")
        assert isinstance(files, RecordFile) and files.live
        assert b'"remote_path": "/hex/ps/thaum/logs/measurement.log"' in await namespace.content(files)

    _namespace_test(catalog_server, body)


def test_real_metadata_json_file_wins(catalog_server: CatalogServer) -> None:
    async def body(namespace: Namespace) -> None:
        dataset = DatasetDir(LIBRARY)
        assert await _names(namespace, dataset) == [".scicat", "metadata.json", "shelves"]
        assert isinstance(await namespace.lookup(dataset, "metadata.json"), DataFileNode)

    _namespace_test(catalog_server, body)


def test_listed_datasets_get_their_creation_time_from_the_listing(catalog_server: CatalogServer) -> None:
    """``ls -l`` of many datasets asks for no record: the listing page carries the time."""
    created = Catalog.load_default().dataset(THAUM)["creationTime"]

    async def body(namespace: Namespace) -> None:
        prefix = PidLevel("20.500.12269/")
        catalog_server.reset_requests()
        entries = await _entries(namespace, prefix)
        assert {path.partition("?")[0] for _, path, _ in catalog_server.requests} == {"/api/v4/datasets"}  # pages only
        thaum = next(attributes for name, _, attributes in entries if name == THAUM.split("/")[1])
        assert thaum.ttl == namespace.listing_ttl and thaum.nlink == 1
        assert thaum.mtime == datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
        await namespace.lookup(prefix, THAUM.split("/")[1])
        entries = await _entries(namespace, prefix)
        thaum = next(attributes for name, _, attributes in entries if name == THAUM.split("/")[1])
        assert thaum.ttl == namespace.record_ttl and thaum.nlink == 4  # the record: its subdirectories

    _namespace_test(catalog_server, body)


def test_a_listing_is_built_once_per_record_ttl(catalog_server: CatalogServer) -> None:
    """A second ``ls`` of a dataset costs no per-file work (with a zero record TTL it does)."""
    asked: list[str] = []

    def cached_bytes(spec: FileSpec) -> int:
        asked.append(spec.path)
        return 7

    async def main() -> None:
        token = Credentials(token=Secret(catalog_server.issue_token("stibbons")), source="test token")
        async with CatalogClient(CatalogSettings(url=catalog_server.url, credentials=token)) as catalog:
            for ttl, per_listing in ((60.0, 0), (0.0, 1)):
                namespace = Namespace(catalog, file_spec=SPECS, cached_bytes=cached_bytes, record_ttl=ttl)
                first = await _entries(namespace, DatasetDir(THAUM))
                assert asked == ["flux.dat"]
                flux = next(attributes for name, _, attributes in first if name == "flux.dat")
                assert flux.cached == 7
                again = await _entries(namespace, DatasetDir(THAUM))
                assert again == first and asked == ["flux.dat"] * (1 + per_listing)
                asked.clear()

            namespace = Namespace(catalog, file_spec=SPECS, cached_bytes=cached_bytes)
            for _ in range(3):  # files.json's size: rendered once, not per stat or listing
                await _names(namespace, ControlDir(THAUM))
                await namespace.attributes(RecordFile(THAUM, ".scicat/files.json"))
            assert sorted(asked) == ["flux.dat", "logs/measurement.log"]

    trio.run(main)


def test_a_directory_too_large_to_keep_is_streamed(make_catalog_server) -> None:  # type: ignore[no-untyped-def]
    pid = "h5test/huge"
    names = [f"f{index:05d}" for index in range(LISTING_CACHE_ENTRIES)]  # + metadata.json, .scicat
    catalog = Catalog.load_default()
    record = {"pid": pid, "owner": "Ponder Stibbons", "ownerGroup": "uu", "contactEmail": "p.stibbons@uu.am",
              "creationLocation": "UnseenUniversity", "sourceFolder": "/h5test/huge",
              "creationTime": "2023-05-01T10:00:00.000Z"}
    catalog.add_dataset(record, [{"path": name, "size": 1} for name in names], blocks=4)
    server = make_catalog_server(catalog)
    token = Credentials(token=Secret(server.issue_token("stibbons")), source="test token")

    async def main() -> None:
        async with CatalogClient(CatalogSettings(url=server.url, credentials=token)) as client:
            namespace = Namespace(client, file_spec=SPECS, cached_bytes=lambda spec: 0)
            listing = await namespace.listing(DatasetDir(pid))
            assert not isinstance(listing, tuple)
            assert [name for name, _, _ in await _entries(namespace, DatasetDir(pid))][2:] == names

    trio.run(main)


def test_prefix_seen_in_a_listing_needs_no_request(catalog_server: CatalogServer) -> None:
    async def body(namespace: Namespace) -> None:
        await _names(namespace, ROOT)
        catalog_server.reset_requests()
        assert await namespace.lookup(ROOT, "20.500.12269") == PidLevel("20.500.12269/")
        assert catalog_server.requests == []

    _namespace_test(catalog_server, body)


def test_a_changed_dataset_reports_only_the_names_that_changed(make_catalog_server) -> None:  # type: ignore[no-untyped-def]
    pid = "h5test/versions"

    def catalog_with(content: bytes) -> Catalog:
        catalog = Catalog.load_default()
        record = {"pid": pid, "owner": "Ponder Stibbons", "ownerGroup": "uu", "contactEmail": "p.stibbons@uu.am",
                  "creationLocation": "UnseenUniversity", "sourceFolder": "/h5test/versions",
                  "creationTime": "2023-05-01T10:00:00.000Z"}
        catalog.add_dataset(record, [{"path": "data.txt", "size": len(content)}, {"path": "same.txt", "size": 4}],
                            contents={"data.txt": content, "same.txt": b"same"})
        return catalog

    server = make_catalog_server(catalog_with(b"one"), jwt_secret="versions")
    token = Credentials(token=Secret(server.issue_token("stibbons")), source="test token")
    changes: list[tuple[str, dict[str, set[str]]]] = []

    async def main() -> None:
        settings = CatalogSettings(url=server.url, credentials=token, record_ttl=0)
        async with CatalogClient(settings) as catalog:
            namespace = Namespace(
                catalog, file_spec=SPECS, cached_bytes=lambda spec: 0,
                on_change=lambda changed, names: changes.append((changed, {k: set(v) for k, v in names.items()})),
            )
            same = await namespace.lookup(DatasetDir(pid), "same.txt")
            data = await namespace.lookup(DatasetDir(pid), "data.txt")
            port = server.port
            server.stop()
            make_catalog_server(catalog_with(b"two!"), port=port, jwt_secret="versions")
            assert await namespace.lookup(DatasetDir(pid), "same.txt") == same
            assert await namespace.lookup(DatasetDir(pid), "data.txt") != data

    trio.run(main)
    assert changes == [(pid, {"": {"data.txt", "metadata.json"}, ".scicat": {"metadata.json"}})]


# -- errno mapping -------------------------------------------------------------------


@pytest.mark.parametrize(
    "error, code",
    [
        (NoEntry("x"), errno.ENOENT),
        (DatasetNotFound("gone", "pid"), errno.ENOENT),
        (DatasetForbidden("not yours", "pid"), errno.EACCES),
        (AuthenticationError("expired"), errno.EACCES),
        (CatalogUnavailable("down"), errno.EIO),
        (BadResponse("garbage"), errno.EIO),
        (RemoteFileNotFound("archived", host="h", path="/p"), errno.EIO),
        (TransferTimeout("slow", host="h", path="/p"), errno.EIO),
        (IntegrityError("checksum"), errno.EIO),
        (RuntimeError("a bug"), errno.EIO),
    ],
)
def test_errors_map_to_errno_and_are_logged_once(
    error: Exception, code: int, caplog: pytest.LogCaptureFixture, log_checker: LogChecker
) -> None:
    if not isinstance(error, NoEntry):
        log_checker.allow(  # an integrity error is logged where it is found, the others where they are answered
            r"ERROR scicatfs\.cache: checksum$" if isinstance(error, IntegrityError)
            else r"(WARNING|ERROR) scicatfs\.fs\.errors: read pid='some/pid' path='a/file': ")
    assert to_errno(error) == code
    with pytest.raises(pyfuse3.FUSEError) as raised, fuse_errors("read", "some/pid", "a/file"):
        raise error
    assert raised.value.errno == code
    failures = [record for record in caplog.records if record.levelno >= logging.WARNING]
    if isinstance(error, NoEntry):
        assert failures == []  # an everyday answer, not a failure
    elif isinstance(error, IntegrityError):  # its message names pid, path, expected and actual itself
        assert [(record.levelno, record.getMessage()) for record in failures] == [(logging.ERROR, str(error))]
    else:
        assert len(failures) == 1 and "'some/pid'" in failures[0].getMessage() and "'a/file'" in failures[0].getMessage()


@pytest.mark.allow_log(r"WARNING scicatfs\.fs\.errors: read pid='repeat/pid' path='same/file': no answer within 30 s \(EIO\)")
def test_a_repeated_failure_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(3):  # as when the kernel retries a read and reads ahead
        with pytest.raises(pyfuse3.FUSEError), fuse_errors("read", "repeat/pid", "same/file"):
            raise TransferTimeout("no answer within 30 s", host="h", path="/p")
    assert len([r for r in caplog.records if "repeat/pid" in r.getMessage()]) == 1


@pytest.mark.parametrize(
    "node, parent",
    [
        (ROOT, ROOT),
        (PidLevel("20.500.12269/"), ROOT),
        (PidLevel("20.500.12269/BRIGHTNESS/"), PidLevel("20.500.12269/")),
        (DatasetDir("thaumometer-frames-0042"), ROOT),
        (DatasetDir(THAUM), PidLevel("20.500.12269/")),
        (DatasetDir(THAUM, "logs/old"), DatasetDir(THAUM, "logs")),
        (DatasetDir(THAUM, "logs"), DatasetDir(THAUM)),
        (ControlDir(THAUM), DatasetDir(THAUM)),
        (RecordFile(THAUM, "metadata.json", "v"), DatasetDir(THAUM)),
        (RecordFile(THAUM, ".scicat/files.json"), ControlDir(THAUM)),
        (MountDir(), ROOT),
        (DataFileNode(FileSpec(THAUM, "logs/a.log", "sftp:///x/logs/a.log", "/x/logs/a.log", 1, 0.0, None)), DatasetDir(THAUM, "logs")),
    ],
)
def test_parent_of(node, parent) -> None:  # type: ignore[no-untyped-def]
    assert parent_of(node) == parent


@pytest.mark.parametrize(("name", "kind"), [("20.500.12269", PidLevel), ("no-such-name", None)])
def test_a_never_seen_name_is_resolved_in_one_catalog_round_trip(make_catalog_server, name, kind) -> None:
    """"Dataset?" and "PID prefix?" go out together: a prefix or a missing name costs one round trip."""
    server = make_catalog_server()
    server.latency = 0.4

    async def body(namespace: Namespace) -> None:
        started = trio.current_time()
        if kind is None:
            with pytest.raises(NoEntry):
                await namespace.lookup(ROOT, name)
        else:
            assert isinstance(await namespace.lookup(ROOT, name), kind)
        assert trio.current_time() - started < 0.75  # one after the other: at least 0.8 s
        paths = sorted(path.partition("?")[0] for _, path, _ in server.requests if "auth" not in path)
        assert paths == ["/api/v4/datasets", f"/api/v4/datasets/{name}"]

    _namespace_test(server, body)


def test_a_name_never_seen_waits_at_most_the_lookup_timeout(make_catalog_server) -> None:  # type: ignore[no-untyped-def]
    """With no last version to fall back on, the lookup deadline ends the client's retries."""
    server = make_catalog_server()

    async def body(namespace: Namespace) -> None:
        level = await namespace.lookup(ROOT, "20.500.12269")
        server.latency = 3.0  # slower than the deadline below; the client alone would wait
        for parent, name in ((ROOT, "never-seen"), (level, "never-seen")):
            started = trio.current_time()
            with pytest.raises(CatalogUnavailable, match="did not answer within 0.5 s"):
                await namespace.lookup(parent, name)
            assert trio.current_time() - started < 1.5
        server.latency = 0.0

    _namespace_test(server, body, lookup_timeout=0.5)


def test_a_dataset_below_a_prefix_costs_one_request(catalog_server: CatalogServer) -> None:
    async def body(namespace: Namespace) -> None:
        level = await namespace.lookup(ROOT, "20.500.12269")
        catalog_server.reset_requests()
        assert await namespace.lookup(level, THAUM.split("/")[1]) == DatasetDir(THAUM)
        assert [path.partition("?")[0] for _, path, _ in catalog_server.requests] == [
            "/api/v4/datasets/" + THAUM.replace("/", "%2F")
        ]

    _namespace_test(catalog_server, body)
