"""CatalogClient against the project's real SciCat-compatible HTTP server.

Every test drives a real server on 127.0.0.1 through httpx under trio. The
fakes play what the demo server cannot be configured into: `V3OnlyServer`
hides the v4 routes (an older backend), `_Redirecting` is a front end that moved.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from scicatfs.catalog.auth import Credentials, Secret
from scicatfs.catalog.client import CatalogClient, CatalogSettings, _prefix_pattern
from scicatfs.catalog.errors import (
    AuthenticationError,
    BadResponse,
    CatalogUnavailable,
    DatasetForbidden,
    DatasetNotFound,
)
from scicatfs.catalog.jsdate import parse_js_date
from scicatfs.catalog.singleflight import SingleFlightCache
from scicatfs.catalog.transport import normalise_base_url
from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.routes import Reply
from scicatfs.demo.server import CatalogServer
from tests.support.catalog import V3OnlyServer

PASSWORD = "demo-password-0xC0FFEE"
LOGIN = Credentials(username="stibbons", password=Secret(PASSWORD), source="login as 'stibbons'")
PIDS = ["plainpid", "20.500.12269/one-slash", "20.500.12269/BRIGHTNESS/V200053", "with space/run 1+2"]


class V3WithoutIncludeServer(V3OnlyServer):
    """A v3 server that ignores `include`: blocks only come from the block routes."""

    def dispatch(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Any:
        reply = super().dispatch(method, target, headers, body)
        if isinstance(reply.body, dict) and "origdatablocks" in reply.body:
            return Reply(reply.status, {k: v for k, v in reply.body.items() if k != "origdatablocks"})
        return reply


def record(pid: str, **fields: Any) -> dict[str, Any]:
    return {
        "pid": pid,
        "datasetName": f"dataset {pid}",
        "ownerGroup": "uu",
        "sourceFolder": f"/data/{pid}",
        "creationTime": "2024-05-01T12:00:00Z",
        **fields,
    }


def files(count: int, prefix: str = "f") -> list[dict[str, Any]]:
    return [{"path": f"{prefix}/{i:06d}.dat", "size": i} for i in range(count)]


def small_catalog() -> Catalog:
    catalog = Catalog()
    catalog.add_user("stibbons", PASSWORD, ["uu"], "s@uu.am")
    catalog.add_user("ridcully", "wizzard", ["archchancellor"], "r@uu.am")
    for pid in PIDS:
        catalog.add_dataset(record(pid), files(3), chk_alg="md5")
    catalog.add_dataset(record("public/one", ownerGroup="ankh", isPublished=True), files(2))
    catalog.add_dataset(record("secret/one", ownerGroup="archchancellor"), files(1))
    return catalog


def settings(server: CatalogServer, credentials: Credentials = LOGIN, **overrides: Any) -> CatalogSettings:
    values: dict[str, Any] = {"connect_timeout": 2.0, "read_timeout": 5.0, "retry_backoff": 0.01}
    values.update(overrides)
    return CatalogSettings(server.url, credentials, **values)


def run(server: CatalogServer, body: Callable[[CatalogClient], Awaitable[Any]], **options: Any) -> Any:
    """Run `body(client)` under trio with a hard deadline."""

    async def main() -> Any:
        with trio.fail_after(30):
            async with CatalogClient(settings(server, **options)) as client:
                return await body(client)

    return trio.run(main)


def data_paths(server: CatalogServer) -> list[str]:
    """Decoded paths of the dataset requests the server saw (login excluded)."""
    return [unquote(urlsplit(path).path) for _, path, _ in server.requests if "/auth/" not in path]


def test_base_url_forms_normalise_to_api():
    for url in ("https://h", "https://h/", "https://h/api", "https://h/api/", "https://h/api/v3",
                "https://h/api/v4/", "https://h/API/V3"):
        assert normalise_base_url(url).lower() == "https://h/api"
    assert normalise_base_url("https://h/scicat/api/v3") == "https://h/scicat/api"
    with pytest.raises(ValueError, match="not an http"):
        normalise_base_url("scicat.example.org")


@pytest.mark.parametrize("server_class", [CatalogServer, V3OnlyServer])
def test_get_dataset_with_slashes_and_spaces(server_class):
    with server_class(small_catalog()) as server:
        async def body(client: CatalogClient):
            prefixes = [await client.is_pid_prefix(name) for name in ("with space", "20.500.12269/BRIGHTNESS",
                                                                       "20.500.12269/BRIGHTNESS/V200053", "with")]
            listed = [pid async for pid in client.iter_pids("with space/run 1+")]
            return [await client.get_dataset(pid) for pid in PIDS], prefixes, listed

        datasets, prefixes, listed = run(server, body)
        assert prefixes == [True, True, False, False]
        assert listed == ["with space/run 1+2"]
        assert [d.pid for d in datasets] == PIDS
        for dataset in datasets:
            assert [f.path for f in dataset.files] == ["f/000000.dat", "f/000001.dat", "f/000002.dat"]
            assert dataset.files[1].remote_path == f"/data/{dataset.pid}/f/000001.dat"
            assert dataset.files[1].checksum is not None and dataset.files[1].checksum.algorithm == "md5"
        raw_paths = [path for _, path, _ in server.requests]
        assert any("with%20space%2Frun%201%2B2" in p for p in raw_paths)
        assert not any("+" in urlsplit(p).path for p in raw_paths)


def test_v3_fallback_is_detected_once_and_gets_150_blocks_in_one_request():
    catalog = small_catalog()
    catalog.add_dataset(record("many/blocks"), files(300), blocks=150)
    with V3OnlyServer(catalog) as server:
        async def body(client: CatalogClient):
            dataset = await client.get_dataset("many/blocks")
            pids = [pid async for pid in client.iter_pids("20.500.12269/")]
            return dataset, pids, await client.count(), await client.is_pid_prefix("20.500.12269")

        dataset, pids, count, is_prefix = run(server, body)
    assert len(dataset.files) == 300
    assert pids == ["20.500.12269/BRIGHTNESS/V200053", "20.500.12269/one-slash"]
    assert count == 6 and is_prefix
    paths = data_paths(server)
    assert sum(p.startswith("/api/v4/") for p in paths) == 1, paths
    assert paths[1] == "/api/v3/datasets/many/blocks" and "/origdatablocks" not in " ".join(paths)


def test_anonymous_v3_reads_a_published_dataset_past_the_block_cap():
    """v3's /origdatablocks is 403 for anonymous callers; `include` is not."""
    catalog = small_catalog()
    catalog.add_dataset(record("pub/many", isPublished=True), files(120), blocks=120)
    with V3OnlyServer(catalog) as server:
        dataset = run(server, lambda client: client.get_dataset("pub/many"), credentials=Credentials())
    assert len(dataset.files) == 120
    assert data_paths(server)[1:] == ["/api/v3/datasets/pub/many"]


@pytest.mark.parametrize("blocks, paging", [(150, 2), (100, 0)])
def test_v3_without_include_counts_then_pages_past_the_block_cap(blocks, paging):
    catalog = small_catalog()
    catalog.add_dataset(record("many/blocks"), files(2 * blocks), blocks=blocks)
    with V3WithoutIncludeServer(catalog) as server:
        dataset = run(server, lambda client: client.get_dataset("many/blocks"))
    assert len(dataset.files) == 2 * blocks
    assert data_paths(server)[1:] == [
        "/api/v3/datasets/many/blocks", "/api/v3/datasets/many/blocks/origdatablocks",
        "/api/v3/datasets/many/blocks/origdatablocks/count"] + ["/api/v3/origdatablocks"] * paging


@pytest.mark.allow_log(r"WARNING .*: dataset 'pub/many' has 120 origdatablocks but the catalog shows anonymous callers only the first 100")
def test_anonymous_v3_without_include_keeps_the_first_100_blocks_and_says_so(caplog):
    catalog = small_catalog()
    catalog.add_dataset(record("pub/many", isPublished=True), files(120), blocks=120)
    with V3WithoutIncludeServer(catalog) as server, caplog.at_level(logging.WARNING, logger="scicatfs.catalog"):
        dataset = run(server, lambda client: client.get_dataset("pub/many"), credentials=Credentials())
    assert len(dataset.files) == 100
    assert "'pub/many' has 120 origdatablocks" in caplog.text and "log in" in caplog.text
    assert "/api/v3/origdatablocks" not in data_paths(server)


@pytest.mark.parametrize("server_class", [CatalogServer, V3OnlyServer])
def test_prefixes_that_javascript_reads_as_dates(server_class):
    """v3 turns `where` strings that `new Date()` parses into Dates: "noprefix-1" is one."""
    catalog = small_catalog()
    for pid in ("noprefix-1/a", "noprefix-1/b", "run 1/x", "noprefix-12"):
        catalog.add_dataset(record(pid), [])
    with server_class(catalog) as server:
        async def body(client: CatalogClient):
            answers = [await client.is_pid_prefix(name) for name in ("noprefix-1", "run 1", "x-12", "noprefix")]
            return answers, [pid async for pid in client.iter_pids("noprefix-1/")]

        for credentials in (LOGIN, Credentials()):
            answers, listed = run(server, body, credentials=credentials)
            if credentials.anonymous:
                assert answers == [False] * 4 and listed == []
            else:
                assert answers == [True, True, False, False]
                assert listed == ["noprefix-1/a", "noprefix-1/b"]
    assert not [path for _, path, status in server.requests if status == 400]


@given(st.text(max_size=40))
def test_prefix_patterns_never_parse_as_dates(prefix):
    assert parse_js_date(_prefix_pattern(prefix)) is None


def test_twenty_thousand_files_in_one_dataset_one_request():
    catalog = small_catalog()
    catalog.add_dataset(record("big"), files(20_000), blocks=7)
    with CatalogServer(catalog) as server:
        dataset = run(server, lambda client: client.get_dataset("big"))
        assert len(dataset.files) == 20_000
        assert dataset.files[-1].size == 19_999
        assert data_paths(server) == ["/api/v4/datasets/big"]


def test_concurrent_lookups_share_one_request_and_the_cache_expires():
    with CatalogServer(small_catalog()) as server:
        server.latency = 0.1

        async def burst(client: CatalogClient):
            found = []

            async def one():
                found.append(await client.get_dataset(PIDS[1]))

            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(one)
            await client.get_dataset(PIDS[1])  # cached
            first = len(data_paths(server))
            await trio.sleep(0.3)  # past record_ttl
            await client.get_dataset(PIDS[1])
            return found, first, len(data_paths(server))

        found, first, second = run(server, burst, record_ttl=0.2)
        assert len(found) == 20 and all(d is found[0] for d in found)
        assert (first, second) == (1, 2)


def test_listing_pages_in_pid_order_and_prefix_checks_are_cached():
    catalog = small_catalog()
    for i in range(23):
        catalog.add_dataset(record(f"bulk/{i:03d}"), [])
    with CatalogServer(catalog) as server:
        async def body(client: CatalogClient):
            everything = [pid async for pid in client.iter_pids()]
            bulk = [pid async for pid in client.iter_pids("bulk/")]
            answers = [await client.is_pid_prefix(name) for name in ("bulk", "bulk", "bul", "20.500.12269", "nope")]
            return everything, bulk, answers

        everything, bulk, answers = run(server, body, page_size=5)
    assert everything == sorted(everything) and len(everything) == 28
    assert "secret/one" not in everything
    assert bulk == [f"bulk/{i:03d}" for i in range(23)]
    assert answers == [True, True, False, True, False]
    prefix_requests = [p for _, p, _ in server.requests if "%22limit%22%3A1%2C" in p]
    assert len(prefix_requests) == 4  # "bulk" answered from the cache the second time
    list_requests = [p for _, p, _ in server.requests if "%22limit%22%3A5%2C" in p]
    assert len(list_requests) == 6 + 5


def test_anonymous_sees_public_data_only():
    with CatalogServer(small_catalog()) as server:
        async def body(client: CatalogClient):
            pids = [pid async for pid in client.iter_pids()]
            public = await client.get_dataset("public/one")
            with pytest.raises(DatasetNotFound, match="not be public") as missing:
                await client.get_dataset(PIDS[0])
            return pids, public, await client.count(), missing.value, client.token_expiry

        pids, public, count, missing, expiry = run(server, body, credentials=Credentials())
    assert pids == ["public/one"] and count == 1 and len(public.files) == 2
    assert missing.pid == PIDS[0] and expiry is None
    assert all("/public" in p for p in data_paths(server))


def test_not_found_and_forbidden_are_distinct_and_explained():
    with CatalogServer(small_catalog()) as server:
        async def body(client: CatalogClient):
            with pytest.raises(DatasetNotFound) as missing:
                await client.get_dataset("no/such/pid")
            with pytest.raises(DatasetForbidden, match="ownerGroup/accessGroups") as forbidden:
                await client.get_dataset("secret/one")
            await client.get_dataset(PIDS[0])  # still v4, still working
            return missing.value, forbidden.value, client.stats

        missing, forbidden, stats = run(server, body)
    assert missing.pid == "no/such/pid" and forbidden.pid == "secret/one"
    assert "login as 'stibbons'" in str(forbidden)
    assert all(p.startswith("/api/v4/") for p in data_paths(server))  # a 404 dataset is not "no v4"
    assert len(data_paths(server)) == 3  # 4xx are never retried
    assert stats["not_found"] == 1 and stats["forbidden"] == 1 and "retries" not in stats


def test_wrong_password_stops_at_startup():
    with CatalogServer(small_catalog()) as server:
        wrong = Credentials(username="stibbons", password=Secret("nope"), source="login")
        with pytest.raises(AuthenticationError, match="refused the login as 'stibbons'"):
            run(server, lambda client: client.count(), credentials=wrong)


def test_expired_token_is_refused_at_startup():
    with CatalogServer(small_catalog()) as server:
        token = Credentials(token=Secret(server.issue_token("stibbons", -10)), source="$SCICAT_TOKEN")
        with pytest.raises(AuthenticationError, match=r"\$SCICAT_TOKEN expired"):
            run(server, lambda client: client.count(), credentials=token)


@pytest.mark.allow_log(
    r"WARNING .*: the token from token file t expires at",
    r"ERROR .*: the token from token file t expired at .*treats this mount as anonymous",
)
def test_token_expiring_during_the_session(caplog):
    with CatalogServer(small_catalog()) as server:
        token = Credentials(token=Secret(server.issue_token("stibbons", 2)), source="token file t")

        async def body(client: CatalogClient):
            assert client.token_expiry is not None
            await client.get_dataset(PIDS[0])
            await trio.sleep(2.1)
            with pytest.raises(AuthenticationError, match="expired") as expired:
                await client.get_dataset(PIDS[1])
            public = await client.get_dataset("public/one")
            return expired.value, public

        with caplog.at_level(logging.WARNING, logger="scicatfs.catalog"):
            error, public = run(server, body, credentials=token)
    assert error.pid == PIDS[1] and "anonymous" in str(error)
    assert public.pid == "public/one"
    assert "expires at" in caplog.text
    assert [r.levelname for r in caplog.records if "treats this mount as anonymous" in r.getMessage()] == ["ERROR"]


def test_login_credentials_renew_the_token_before_it_expires():
    server = CatalogServer(small_catalog(), token_lifetime=2)
    with server:
        async def body(client: CatalogClient):
            await client.get_dataset(PIDS[0])
            await trio.sleep(1.2)
            await client.get_dataset(PIDS[1])
            return client.stats["logins"]

        assert run(server, body) == 2
        assert all(status == 200 for method, _, status in server.requests if method == "GET")


def test_503_storm_retries_then_fails_cleanly_and_recovers():
    with CatalogServer(small_catalog()) as server:
        server.failure_rate = 1.0

        async def body(client: CatalogClient):
            with pytest.raises(CatalogUnavailable, match="503") as storm:
                await client.get_dataset(PIDS[0])
            server.failure_rate = 0.0
            return storm.value, await client.get_dataset(PIDS[0]), client.stats

        error, dataset, stats = run(server, body, retries=3)
    assert error.pid == PIDS[0] and "tried 4 times" in str(error)
    assert dataset.pid == PIDS[0]
    assert [status for _, _, status in server.requests][-5:] == [503] * 4 + [200]
    assert stats["retries"] == 3 and stats["unavailable"] == 1


def test_hanging_server_times_out_instead_of_hanging():
    with CatalogServer(small_catalog()) as server:
        server.latency = 3.0
        started = time.monotonic()
        with pytest.raises(CatalogUnavailable, match="no .*answer within"):
            run(server, lambda client: client.get_dataset(PIDS[0]), credentials=Credentials(),
                connect_timeout=0.2, read_timeout=0.3, retries=1)
        assert time.monotonic() - started < 2.5


def test_refused_connection_is_unavailable():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def main():
        with trio.fail_after(10):
            settings = CatalogSettings(f"http://127.0.0.1:{port}/api/v3", retries=2, retry_backoff=0.01)
            async with CatalogClient(settings) as client:
                with pytest.raises(CatalogUnavailable, match="connection failed"):
                    await client.count()
                return client.stats

    stats = trio.run(main)
    assert stats["connection_errors"] == 3


def test_concurrent_requests_are_capped():
    with CatalogServer(small_catalog()) as server:
        server.latency = 0.2

        async def body(client: CatalogClient):
            started = time.monotonic()
            async with trio.open_nursery() as nursery:
                for pid in PIDS:
                    nursery.start_soon(client.get_dataset, pid)
            return time.monotonic() - started

        elapsed = run(server, body, max_requests=2)
    assert elapsed >= 0.39  # 4 requests, 2 at a time, 0.2 s each


@pytest.mark.allow_log(r"WARNING .*: catalog sent invalid JSON for dataset 'plainpid'")
def test_malformed_json_is_a_bad_response_and_the_rest_keeps_working():
    with CatalogServer(small_catalog()) as server:
        async def body(client: CatalogClient):
            server.malformed = True
            with pytest.raises(BadResponse, match="invalid JSON") as bad:
                await client.get_dataset(PIDS[0])
            with pytest.raises(BadResponse):
                [pid async for pid in client.iter_pids()]
            server.malformed = False
            return bad.value, await client.get_dataset(PIDS[0])

        error, dataset = run(server, body)
    assert error.pid == PIDS[0] and dataset.pid == PIDS[0]


@pytest.mark.allow_log(r"WARNING .*: dataset 'broken': field 'sourceFolder' is missing or not a non-empty string")
def test_malformed_record_names_pid_and_field(caplog):
    catalog = small_catalog()
    catalog.add_dataset(record("broken", sourceFolder=["not", "a", "string"]), [])
    with CatalogServer(catalog) as server:
        async def body(client: CatalogClient):
            with pytest.raises(BadResponse, match="sourceFolder") as bad:
                await client.get_dataset("broken")
            return bad.value, await client.get_dataset(PIDS[0])

        with caplog.at_level(logging.WARNING, logger="scicatfs.catalog"):
            error, fine = run(server, body)
    assert error.pid == "broken" and "'broken'" in caplog.text
    assert fine.pid == PIDS[0]


@pytest.mark.allow_log(r"WARNING scicatfs\.catalog\.models: dataset 'hostile': dropped file ")
def test_hostile_paths_from_the_server_are_dropped(caplog):
    catalog = small_catalog()
    hostile = ["../../etc/passwd", "/etc/shadow", "a/../../b", "x\0y", "a//b", "/data/hostile/inside.txt"]
    catalog.add_dataset(record("hostile"), [{"path": p, "size": 1} for p in hostile] + [{"path": "ok", "size": 1}])
    with CatalogServer(catalog) as server:
        with caplog.at_level(logging.WARNING, logger="scicatfs.catalog.models"):
            dataset = run(server, lambda client: client.get_dataset("hostile"))
    assert [f.path for f in dataset.files] == ["inside.txt", "ok"]
    assert all(f.remote_path.startswith("/data/hostile/") for f in dataset.files)
    assert len(caplog.records) == 5 and all("'hostile'" in r.getMessage() for r in caplog.records)


@pytest.mark.allow_log(r"WARNING .*: dataset 'pub/hidden-blocks' counts 3 files but the catalog shows none of them")
def test_files_hidden_by_block_access_get_one_hint(caplog):
    catalog = small_catalog()
    catalog.add_dataset(record("pub/hidden-blocks", isPublished=True), files(3),
                        block_access={"ownerGroup": "archchancellor", "isPublished": False})
    with CatalogServer(catalog) as server:
        async def body(client: CatalogClient):
            first = await client.get_dataset("pub/hidden-blocks")
            await trio.sleep(0.15)  # past record_ttl: fetched again, hinted once
            return first, await client.get_dataset("pub/hidden-blocks"), await client.get_dataset("public/one")

        with caplog.at_level(logging.WARNING, logger="scicatfs.catalog"):
            first, again, other = run(server, body, credentials=Credentials(), record_ttl=0.1)
    assert first.files == again.files == () and len(other.files) == 2
    hints = [r.getMessage() for r in caplog.records if "counts 3 files" in r.getMessage()]
    assert len(hints) == 1 and "'pub/hidden-blocks'" in hints[0] and "(anonymous)" in hints[0]
    assert sum("/public/pub%2Fhidden-blocks" in p for _, p, _ in server.requests) == 2


def test_secrets_never_reach_the_log(caplog):
    with CatalogServer(small_catalog(), token_lifetime=2) as server:
        token = server.issue_token("stibbons", 400)
        token_credentials = Credentials(token=Secret(token), source="$SCICAT_TOKEN")

        async def session(client: CatalogClient):
            [pid async for pid in client.iter_pids()]
            await client.get_dataset(PIDS[0])
            await trio.sleep(1.1)  # the login token (2 s) renews
            for pid in ("secret/one", "missing"):
                try:
                    await client.get_dataset(pid)
                except Exception as error:
                    logging.getLogger("test").exception("lookup failed: %r %s", error, error)
            logging.getLogger("test").debug("client %r stats %s", client, client.stats)
            return client.stats

        with caplog.at_level(logging.DEBUG):
            stats = run(server, session)
            run(server, session, credentials=token_credentials)
        assert stats["logins"] == 2
    text = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert "HTTP Request" in text or "GET" in text  # debug logging really was on
    assert PASSWORD not in text
    assert token not in text and token.split(".")[2] not in text
    assert "eyJ" not in text  # no JWT at all, including the ones the logins returned


class _Redirecting(BaseHTTPRequestHandler):
    """A front end that moved: every request is answered 301 to https."""

    def do_GET(self) -> None:
        self.send_response(301)
        self.send_header("Location", "https://scicat.example.org" + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_redirect_is_explained_not_followed():
    httpd = HTTPServer(("127.0.0.1", 0), _Redirecting)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        async def main():
            with trio.fail_after(10):
                url = f"http://127.0.0.1:{httpd.server_address[1]}"
                async with CatalogClient(CatalogSettings(url)) as client:
                    await client.get_dataset("a/b")

        with pytest.raises(BadResponse, match="redirects dataset 'a/b' to https://scicat.example.org/api/v4/"):
            trio.run(main)
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(
    ("field", "value"),
    [("read_timeout", 0), ("connect_timeout", -1), ("max_requests", 0), ("page_size", 0),
     ("retries", -1), ("record_ttl", -5)],
)
def test_settings_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        CatalogSettings("https://h", **{field: value})


def test_single_flight_cancelled_leader_and_uncached_errors():
    cache: SingleFlightCache[str, int] = SingleFlightCache(8, 60)
    calls = []

    async def slow() -> int:
        calls.append("slow")
        await trio.sleep(10)
        return 1

    async def quick() -> int:
        calls.append("quick")
        return 2

    async def failing() -> int:
        calls.append("failing")
        raise DatasetNotFound("gone", "k2")

    async def main():
        results = []
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                leader = trio.CancelScope()

                async def lead():
                    with leader:
                        await cache.get("k", slow)

                async def follow():
                    results.append(await cache.get("k", quick))

                nursery.start_soon(lead)
                await trio.sleep(0.01)
                nursery.start_soon(follow)
                await trio.sleep(0.01)
                leader.cancel()
            for _ in range(2):
                with pytest.raises(DatasetNotFound):
                    await cache.get("k2", failing)
        return results

    assert trio.run(main) == [2]
    assert calls == ["slow", "quick", "failing", "failing"]
