"""A mounted catalog of 200,000 datasets: listed completely, in order, by range pages, on demand."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from urllib.parse import urlsplit

from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.server import CatalogServer
from scicatfs.fs.views import top_level_views
from tests.support.probes import bounded
from tests.support.records import dataset_record

#: The root's own directories, listed before the PID tree.
VIEWS = [".scicat", *top_level_views()]
HUGE = "huge"
COUNT = 200_000
PAGE = 1000  # the mount's default page size


def huge_catalog(*, demo_datasets: bool = True) -> Catalog:
    users = Catalog.load_default()
    catalog = users if demo_datasets else Catalog(list(users.users.values()))
    catalog.add_generated(f"{HUGE}/", COUNT, owner_group="uu")
    return catalog


def list_requests(server: CatalogServer) -> list[str]:
    """Dataset list pages the catalog served (not the startup count, not the limit-1 prefix probes)."""
    return [target for _, target, _ in server.requests
            if urlsplit(target).path.rstrip("/").endswith("/datasets") and "%22limit%22%3A1%2C" not in target]


def record_requests(server: CatalogServer) -> list[str]:
    """Dataset records served (a lookup of ``huge`` asks for that dataset first: a 404, no record)."""
    return [target for _, target, status in server.requests
            if "/datasets/" in urlsplit(target).path and status != 404 and not target.endswith("/count")
            and not urlsplit(target).path.endswith("/fullfacet")]


def test_200000_datasets_list_completely_and_in_order(make_mount, make_catalog_server) -> None:  # type: ignore[no-untyped-def]
    catalog = huge_catalog()
    server = make_catalog_server(catalog)
    mount = make_mount(catalog, server=server)
    server.reset_requests()

    names = bounded(300, lambda: os.listdir(mount.path / HUGE))  # readdir order, not sorted here
    assert names == [f"{index:06d}" for index in range(COUNT)]
    pages = list_requests(server)
    assert len(pages) == COUNT // PAGE + 1  # the last page is empty
    assert all("%22skip%22%3A0%2C" in page for page in pages)
    assert not record_requests(server)


def test_an_interrupted_listing_stops_within_a_page(make_mount, make_catalog_server) -> None:  # type: ignore[no-untyped-def]
    catalog = huge_catalog()
    server = make_catalog_server(catalog)
    mount = make_mount(catalog, server=server)
    server.reset_requests()

    root = subprocess.run(f"ls -a {mount.path} | head -5", shell=True, capture_output=True, timeout=60, check=True)
    assert root.stdout.decode().split() == sorted([".", "..", *VIEWS, "20.500.12269", HUGE])[:5]
    assert len(list_requests(server)) <= 2  # one page reaching into huge/, one past it
    server.reset_requests()

    with os.scandir(mount.path / HUGE) as entries:  # five entries, then closedir
        assert [next(entries).name for _ in range(5)] == [f"{index:06d}" for index in range(5)]
    time.sleep(1.0)  # anything still fetching would show now
    assert len(list_requests(server)) == 2  # the page read from, and the one fetched ahead
    server.reset_requests()

    head = subprocess.run(f"ls -1U {mount.path / HUGE} | head -5", shell=True, capture_output=True,
                          timeout=60, check=True)
    assert head.stdout.decode().split() == [f"{index:06d}" for index in range(5)]
    time.sleep(1.0)  # a page fetched ahead when ls died lands now
    pages = len(list_requests(server))
    time.sleep(1.0)
    # ls reads on until its second 4 KiB of output meets the closed pipe: into the second page
    # at most (pages 1 and 2 may come from the listing cache), and the third is fetched ahead
    assert len(list_requests(server)) == pages <= 3
    assert not record_requests(server)


def test_find_to_depth_two_fetches_no_dataset_record(make_mount, make_catalog_server) -> None:  # type: ignore[no-untyped-def]
    catalog = huge_catalog(demo_datasets=False)
    for index in range(3):
        pid = f"20.500.12269/BRIGHTNESS/V{index:06d}"
        catalog.add_dataset(dataset_record(pid, f"/h5test/bright/{index}"), [{"path": "a.dat", "size": 3}])
    server = make_catalog_server(catalog)
    mount = make_mount(catalog, server=server)
    server.reset_requests()

    # The views are shown but not descended into: this is about the PID tree (each view's values
    # would cost a fullfacet scan of the 200,000 generated datasets in the demo server).
    views = [arg for name in top_level_views() for arg in ("-path", str(mount.path / name), "-o")][:-1]
    found = subprocess.run(["find", str(mount.path), "-maxdepth", "2", "(", *views, ")", "-prune", "-print",
                            "-o", "-print"], capture_output=True, timeout=300, check=True)
    shown = {os.path.relpath(line.decode(), mount.path) for line in found.stdout.splitlines()}
    assert {"huge", "huge/000000", "huge/199999", "20.500.12269", "20.500.12269/BRIGHTNESS"} <= shown
    assert {*VIEWS, ".scicat/pid"} <= shown
    # ., the root's own directories, huge, 20.500.12269; .scicat's two entries, BRIGHTNESS, huge's
    assert len(shown) == 1 + len(VIEWS) + 2 + 3 + COUNT
    detailed = subprocess.run(["ls", "-l", str(mount.path / "20.500.12269" / "BRIGHTNESS")],
                              capture_output=True, timeout=60, check=True)
    assert detailed.stdout.count(b"\ndr-x") == 3  # dataset directories, attributes from the listing
    assert not record_requests(server)


def test_a_listing_beyond_the_resident_bound_is_answered_from_disk(make_mount, make_catalog_server) -> None:  # type: ignore[no-untyped-def]
    """With room for 1,000 inodes in memory, 200,000 listed datasets wait on disk, keep their numbers,
    and a stat of one listed early (a lookup: the listing TTL is 0) finds its inode there."""
    catalog = huge_catalog(demo_datasets=False)
    server = make_catalog_server(catalog)
    mount = make_mount(catalog, server=server, args=["-o", "resident_inodes=1000", "--listing-ttl", "0"])

    def listing() -> dict[str, int]:
        with os.scandir(mount.path / HUGE) as entries:
            return {entry.name: entry.inode() for entry in entries}

    listed = bounded(300, listing)
    assert len(listed) == COUNT and len(set(listed.values())) == COUNT
    inodes = json.loads((mount.path / ".scicat" / "status.json").read_bytes())["inodes"]
    assert inodes["resident"] <= 1000 + 1000 // 16
    assert inodes["spilled"] >= COUNT // 2  # unless the kernel evicted most of the entries meanwhile
    assert not [name for name in os.listdir(mount.cache_dir) if name.startswith("inodes-")]  # unlinked while open
    for name in ("000000", "000001", "099999", f"{COUNT - 1:06d}"):
        status = os.stat(mount.path / HUGE / name)
        assert stat.S_ISDIR(status.st_mode) and status.st_ino == listed[name], name
    assert json.loads((mount.path / ".scicat" / "status.json").read_bytes())["inodes"]["resident"] <= 1000 + 1000 // 16
