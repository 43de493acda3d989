"""PID listings page by key range, skip past deeper prefixes, and fall back to skip.

Against the project's catalog server, whose PID-ordered lists walk a PID
index; `_RangeBlindServer` plays a catalog that accepts range filters and
ignores them, which the demo server cannot be configured into.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from scicatfs.catalog.client import CatalogClient
from scicatfs.catalog.paging import Child, PidRange, prefix_end
from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.server import CatalogServer
from scicatfs.fs.views import FACETS
from tests.test_catalog_client import LOGIN, V3OnlyServer, record, run, small_catalog

SERVERS = [CatalogServer, V3OnlyServer]


class _RangeBlindServer(CatalogServer):
    """A catalog that takes range filters on pid and silently drops them."""

    def dispatch(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Any:
        parts = urlsplit(target)
        query = parse_qs(parts.query)
        if "filter" in query:
            spec = json.loads(query["filter"][-1])
            where = spec.get("where", {})
            if isinstance(where.get("pid"), dict):
                where["pid"] = {k: v for k, v in where["pid"].items() if k not in ("$gt", "$gte", "$lt")}
                if not where["pid"]:
                    del where["pid"]
            target = f"{parts.path}?{urlencode({'filter': json.dumps(spec)})}"
        return super().dispatch(method, target, headers, body)


def list_filters(server: CatalogServer) -> list[dict[str, Any]]:
    """The filters of the dataset list requests the server saw, in order."""
    found = []
    for _, target, status in server.requests:
        parts = urlsplit(target)
        if status != 404 and parts.path.rstrip("/").endswith(("/datasets", "/datasets/public")):
            found.append(json.loads(parse_qs(parts.query)["filter"][-1]))
    return found


def skips(server: CatalogServer) -> list[int]:
    return [spec["limits"].get("skip", 0) for spec in list_filters(server)]


def with_generated(prefix: str, count: int) -> Catalog:
    catalog = small_catalog()
    catalog.add_generated(prefix, count, owner_group="uu")
    return catalog


def test_prefix_end_is_the_least_string_past_the_prefix():
    assert prefix_end("a/b/") == "a/b0"
    assert prefix_end("a\U0010ffff") == "b"
    assert prefix_end("\ud7ff") == "\ue000"
    assert prefix_end("") is None and prefix_end("\U0010ffff") is None
    keys = PidRange("a/", True, prefix_end("a/"))
    assert "a/" in keys and "a/\U0010ffff\U0010ffff" in keys and "a0" not in keys and "a" not in keys


@pytest.mark.parametrize("server_class", SERVERS)
def test_listing_pages_by_pid_range_never_by_skip(server_class):
    catalog = with_generated("gen/", 2_345)
    with server_class(catalog) as server:
        everything = run(server, lambda client: _collect(client.iter_pids()), page_size=500)
        under = run(server, lambda client: _collect(client.iter_pids("gen/")), page_size=500)
    visible = sorted(pid for pid in catalog.pids() if pid != "secret/one")
    assert everything == visible
    assert under == [f"gen/{i:04d}" for i in range(2_345)]
    assert set(skips(server)) == {0}
    assert len(list_filters(server)) == 5 + 5  # ceil(2,351 / 500) pages, ceil(2,345 / 500) pages
    assert "gen/1999" in json.dumps(list_filters(server)[-1]["where"])  # the last PID of page 4


@pytest.mark.parametrize("server_class", SERVERS)
def test_a_pid_level_skips_past_its_deeper_prefixes(server_class):
    catalog = small_catalog()
    for pid in ("lvl/a", "lvl/a-b", "lvl/c1", "lvl/c2"):
        catalog.add_dataset(record(pid), [])
    catalog.add_generated("lvl/a/", 3_000, owner_group="uu")
    catalog.add_generated("lvl/b/", 2_000, owner_group="uu")
    with server_class(catalog) as server:
        children = run(server, lambda client: _collect(client.iter_children("lvl/")), page_size=100)
    assert children == [Child("a", "lvl/a"), Child("a-b", "lvl/a-b"), Child("b", None),
                        Child("c1", "lvl/c1"), Child("c2", "lvl/c2")]
    # one page that reaches into lvl/a/, one starting at lvl/b/, one after it: not 51 pages
    assert len(list_filters(server)) == 3


@pytest.mark.allow_log('WARNING scicatfs\\.catalog\\.paging: the catalog at \\S+ cannot list by PID range: it refused a range filter')
def test_a_catalog_that_refuses_ranges_is_listed_with_skip_after_one_warning(caplog):
    catalog = with_generated("gen/", 1_234)
    with CatalogServer(catalog) as server:
        server.range_filters = False

        async def body(client: CatalogClient) -> Any:
            return (await _collect(client.iter_pids("gen/")), await _collect(client.iter_pids()),
                    await client.is_pid_prefix("gen"), await _collect(client.iter_children()))

        with caplog.at_level(logging.WARNING, logger="scicatfs.catalog.paging"):
            under, everything, is_prefix, children = run(server, body, page_size=500)
    assert under == [f"gen/{i:04d}" for i in range(1_234)]
    assert everything == sorted(pid for pid in catalog.pids() if pid != "secret/one")
    assert is_prefix and Child("gen", None) in children
    warnings = [r for r in caplog.records if "cannot list by PID range" in r.getMessage()]
    assert len(warnings) == 1 and "HTTP 400" in warnings[0].getMessage()
    statuses = [status for _, target, status in server.requests if "/datasets?" in target]
    assert statuses.count(400) == 1 and statuses[0] == 400  # detected once, on the first page
    assert max(skips(server)) == 1_000


@pytest.mark.allow_log('WARNING scicatfs\\.catalog\\.paging: the catalog at \\S+ cannot list by PID range: it answered a range filter on pid with PIDs outside that range')
def test_a_catalog_that_ignores_ranges_is_listed_with_skip_not_forever(caplog):
    catalog = with_generated("gen/", 1_234)
    with _RangeBlindServer(catalog) as server:
        with caplog.at_level(logging.WARNING, logger="scicatfs.catalog.paging"):
            under = run(server, lambda client: _collect(client.iter_pids("gen/")), page_size=500)
    assert under == [f"gen/{i:04d}" for i in range(1_234)]
    assert [r for r in caplog.records if "PIDs outside that range" in r.getMessage()]
    assert len(list_filters(server)) == 1 + 3


def _with_group(prefix: str, count: int) -> Catalog:
    """The small catalog, and ``count`` datasets of owner group "loaders" that the test user may read."""
    catalog = small_catalog()
    catalog.add_generated(prefix, count, owner_group="loaders", access_groups=["uu"])
    return catalog


def _group_listing(server: CatalogServer, group: str, **options: Any) -> list[str]:
    """The PIDs the by-group view's selection for ``group`` lists, in the order given."""
    selection = next(facet for facet in FACETS if facet.directory == "by-group").selection(group)
    return run(server, lambda client: _collect(p.pid async for p in client.iter_selected(selection)), **options)


@pytest.mark.parametrize("server_class", SERVERS)
def test_a_view_in_pid_order_pages_by_range_beside_its_condition(server_class):
    catalog = _with_group("gen/", 2_345)
    catalog.add_generated("else/", 700, owner_group="uu")
    with server_class(catalog) as server:
        listed = _group_listing(server, "loaders", page_size=500)
    assert listed == [f"gen/{i:04d}" for i in range(2_345)]
    assert set(skips(server)) == {0}
    pages = list_filters(server)
    assert len(pages) == 5
    assert "gen/1999" in json.dumps(pages[-1]["where"]) and "loaders" in json.dumps(pages[-1]["where"])


@pytest.mark.allow_log('WARNING scicatfs\\.catalog\\.paging: the catalog at \\S+ cannot list by PID range: it refused a range filter')
def test_a_view_on_a_catalog_that_refuses_ranges_goes_on_by_skip(caplog):
    catalog = _with_group("gen/", 1_234)
    with CatalogServer(catalog) as server:
        server.range_filters = False
        with caplog.at_level(logging.WARNING, logger="scicatfs.catalog.paging"):
            listed = _group_listing(server, "loaders", page_size=500)
    assert listed == [f"gen/{i:04d}" for i in range(1_234)]
    assert len([r for r in caplog.records if "cannot list by PID range" in r.getMessage()]) == 1
    assert skips(server) == [0, 0, 500, 1_000]  # page 1; page 2 by range, refused; then by skip


def test_v3_bounds_that_javascript_reads_as_dates_or_numbers_still_page():
    """v3 would turn "ds-0099" and "10099" into Dates (2001 and the year 10099): they match no PID."""
    catalog = small_catalog()
    for index in range(250):
        catalog.add_dataset(record(f"ds-{index:04d}"), [])
        catalog.add_dataset(record(f"{10_000 + index}"), [])
    with V3OnlyServer(catalog) as server:
        everything = run(server, lambda client: _collect(client.iter_pids()), page_size=100)
    assert everything == sorted(pid for pid in catalog.pids() if pid != "secret/one")
    assert any("$expr" in spec["where"] for spec in list_filters(server))
    assert not [target for _, target, status in server.requests if status >= 400 and "/v3/" in target]


async def _collect(items: Any) -> list[Any]:
    return [item async for item in items]


def test_listing_anonymously_pages_the_public_route():
    catalog = small_catalog()
    catalog.add_generated("pub/", 150, owner_group="ankh", published=True)
    with CatalogServer(catalog) as server:
        listed = run(server, lambda client: _collect(client.iter_pids()), page_size=40,
                     credentials=type(LOGIN)())
    assert listed == ["pub/" + f"{i:03d}" for i in range(150)] + ["public/one"]
    assert all("/public" in target for _, target, _ in server.requests if "/datasets" in target)
