"""The views (by-proposal/, by-instrument/, by-sample/, by-group/, views/) on real mounts.

Every expectation is computed from the catalog with SciCat's read rule, so
"exactly the visible datasets" means: hidden ones absent, published ones of
other groups present, each once per value it holds.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from scicatfs.catalog.auth import Credentials, Secret
from scicatfs.catalog.client import CatalogClient, CatalogSettings, ListedDataset
from scicatfs.config import mount_options
from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.server import CatalogServer
from scicatfs.fs.namespace import ROOT, Namespace
from scicatfs.fs.views import _value_of, link_names, top_level_views, value_name
from scicatfs.stack import FileSpecs
from tests.support.catalog import V3OnlyServer
from tests.support.records import dataset_record

PROPOSAL = "2024-0123"
#: What views_catalog() makes the mount log, as it should: its PID "by-proposal" is shadowed by
#: the view at the root, and the PID that is no path gets no link.
SHADOWED = r"WARNING scicatfs\.fs\.namespace: PID 'by-proposal' is hidden by the mount's reserved /by-proposal/"
UNLINKABLE = r"WARNING scicatfs\.fs\.namespace: PID 'vt/\.\./\.\./\.\./etc' cannot be linked to: it is no path in the tree"
GROUPS = {"uu", "faculty"}  # the demo user's


def _add(catalog: Catalog, pid: str, **fields: Any) -> None:
    catalog.add_dataset(dataset_record(pid, f"/h5views/{pid.replace('/', '_')}", **fields),
                        [{"path": "run.dat", "size": 4}])


def views_catalog(*, singular: bool = False) -> Catalog:
    """Shared names, a value with a slash, a nameless dataset, a published dataset of another
    group, a hidden one, and a PID that collides with a view name. ``singular``: stored as an
    older (v3-era) backend stores them, proposalId instead of proposalIds."""

    def ids(field: str, *values: str) -> dict[str, Any]:
        return {field[:-1]: values[0]} if singular else {field: list(values)}

    catalog = Catalog.load_default()
    _add(catalog, "vt/run-a1", datasetName="run", **ids("proposalIds", PROPOSAL),
         **ids("instrumentIds", "LoKI"), **ids("sampleIds", "LaB6"))
    _add(catalog, "vt/run-a2", datasetName="run", **ids("proposalIds", PROPOSAL, "ESS/2024"),
         **ids("instrumentIds", "LoKI"))
    _add(catalog, "vt/odd", datasetName="a/b\nc", **ids("proposalIds", "ESS/2024"))
    _add(catalog, "vt/nameless", datasetName="", **ids("proposalIds", PROPOSAL))
    _add(catalog, "vt/public", datasetName="Published run", ownerGroup="ankh", isPublished=True,
         **ids("proposalIds", PROPOSAL), **ids("instrumentIds", "ODIN"))
    _add(catalog, "vt/hidden", datasetName="Secret run", ownerGroup="archchancellor",
         **ids("proposalIds", PROPOSAL), **ids("instrumentIds", "SECRET"))
    _add(catalog, "by-proposal", datasetName="Collides", **ids("proposalIds", PROPOSAL))
    # A PID that is no path in the tree: a link to it would lead out of the mount.
    _add(catalog, "vt/../../../etc", datasetName="Escape", **ids("proposalIds", PROPOSAL))
    return catalog


def _visible(record: dict[str, Any], anonymous: bool) -> bool:
    if record.get("isPublished"):
        return True
    return not anonymous and (record.get("ownerGroup") in GROUPS or bool(GROUPS & set(record.get("accessGroups") or [])))


def _values(record: dict[str, Any], field: str) -> list[str]:
    value = record.get(field, record.get(field[:-1]) if field.endswith("s") else None)
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def expected_values(catalog: Catalog, field: str, *, anonymous: bool = False) -> set[str]:
    return {value for record in catalog.datasets() if _visible(record, anonymous) for value in _values(record, field)}


def expected_pids(catalog: Catalog, field: str, value: str, *, anonymous: bool = False) -> set[str]:
    return {record["pid"] for record in catalog.datasets()
            if _visible(record, anonymous) and value in _values(record, field) and ".." not in record["pid"]}


def value_dir(value: str) -> str:
    """The directory name of a field value, by the documented rule."""
    return value.replace("%", "%25").replace("/", "%2F")


def links(directory: Path) -> Iterator[tuple[str, Path]]:
    for name in os.listdir(directory):
        yield name, directory / name


def resolved_pid(mount_path: Path, link: Path) -> str:
    """The PID a link leads to, checked to be a dataset directory of this mount."""
    real = Path(os.path.realpath(link))
    relative = real.relative_to(mount_path).as_posix()
    pid = relative.removeprefix(".scicat/pid/")
    record = json.loads((link / ".scicat" / "metadata.json").read_text())
    assert record["pid"] == pid
    return pid


def data_requests(server: CatalogServer, since: int = 0) -> list[str]:
    return [unquote(urlsplit(path).path) for _, path, _ in server.requests[since:] if "/auth/" not in path]


# -- names, without a mount -----------------------------------------------------------------

_texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
_rows = st.lists(st.builds(ListedDataset, st.text(min_size=1, max_size=80), st.none() | _texts, st.none()),
                 max_size=40)


@given(_rows, st.randoms())
def test_link_names_are_safe_unique_and_deterministic(rows: list[ListedDataset], random: Any) -> None:
    names = link_names(rows)
    distinct = {row.pid: row for row in rows}
    assert sorted(row.pid for row in names.values()) == sorted(distinct)
    for name in names:
        assert name not in ("", ".", "..") and "/" not in name and "\0" not in name
        assert len(name.encode("utf-8")) <= 255
    shuffled = list(rows)
    random.shuffle(shuffled)
    if len(distinct) == len(rows):  # the same datasets in another order
        assert link_names(shuffled) == names


def test_link_name_rule() -> None:
    def row(pid: str, name: str | None) -> ListedDataset:
        return ListedDataset(pid, name, None)

    names = link_names([row("20.500.12269/72fe3ff6-105b", "run"), row("20.500.12269/0b9a6b7e-3c61", "run"),
                        row("x/abcdefgh-1", "scan"), row("y/abcdefgh-2", "scan"), row("p/q", None),
                        row("r", "a/b\x00c\n"), row("s", ".."), row("t/1", "long" * 100), row("t/2", "only")])
    assert sorted(names) == sorted(["run~72fe3ff6", "run~0b9a6b7e", "scan~abcdefgh-1", "scan~abcdefgh-2",
                                    "p_q", "a_b_c_", "s", "long" * 63 + "lon", "only"])
    # "b" is shared, and "a/b" and "a_b" both make "a_b": the last resort numbers it.
    assert link_names([row("a/b", "x"), row("a_b", "x"), row("c/b", "x")]) == {
        "x~a_b~2": row("a/b", "x"), "x~a_b": row("a_b", "x"), "x~c_b": row("c/b", "x")}
    assert ".scicat~s" in link_names([row("s", ".scicat")], frozenset({".scicat"}))


@given(st.text(max_size=300))
def test_value_names_round_trip(value: str) -> None:
    name = value_name(value)
    if name is None:
        assert "\0" in value or not value or len(value.encode("utf-8", "surrogatepass")) > 85
        return
    assert "/" not in name and name not in (".", "..") and _value_of(name) == value


@pytest.mark.allow_log(UNLINKABLE)
def test_view_listings_are_kept_for_the_listing_ttl(make_catalog_server) -> None:  # type: ignore[no-untyped-def]
    """Within the listing TTL a view is answered from memory; after it, the catalog is asked again
    and a dataset added meanwhile appears."""
    catalog = views_catalog()
    server = make_catalog_server(catalog)
    ttl = 0.5

    async def main() -> None:
        credentials = Credentials(token=Secret(server.issue_token("stibbons")), source="test token")
        settings = CatalogSettings(url=server.url, credentials=credentials, listing_ttl=ttl)
        async with CatalogClient(settings) as client:
            specs = FileSpecs(mount_options({"url": server.url, "mountpoint": "/", "sftp_host": "files.test"}))
            namespace = Namespace(client, cached_bytes=lambda spec: 0, file_spec=specs, listing_ttl=ttl,
                                  views=top_level_views())
            proposals = await namespace.lookup(ROOT, "by-proposal")
            values = await namespace.listing(proposals)
            value = await namespace.lookup(proposals, PROPOSAL)
            first = [name for name, _, _ in await namespace.listing(value)]
            before = len(server.requests)
            assert [name for name, _, _ in await namespace.listing(value)] == first
            assert await namespace.listing(proposals) == values and len(server.requests) == before
            _add(catalog, "vt/late", datasetName="Late run", proposalIds=[PROPOSAL])
            await trio.sleep(ttl + 0.1)
            assert "Late run" in [name for name, _, _ in await namespace.listing(value)]
            assert len(server.requests) > before

    trio.run(main)


# -- on a mount ------------------------------------------------------------------------------


@pytest.mark.allow_log(SHADOWED)
@pytest.mark.allow_log(UNLINKABLE)
def test_by_field_views_list_exactly_the_visible_datasets(make_mount) -> None:  # type: ignore[no-untyped-def]
    catalog = views_catalog()
    mount = make_mount(catalog)
    root = mount.path

    assert {"by-proposal", "by-instrument", "by-sample", "by-group", "views"} <= set(os.listdir(root))
    for directory, field in (("by-proposal", "proposalIds"), ("by-instrument", "instrumentIds"),
                             ("by-sample", "sampleIds"), ("by-group", "ownerGroup")):
        values = expected_values(catalog, field)
        assert sorted(os.listdir(root / directory)) == sorted(value_dir(v) for v in values)
        for value in values:
            folder = root / directory / value_dir(value)
            pids = []
            for name, link in links(folder):
                assert name not in (".", "..") and "/" not in name and len(name.encode()) <= 255
                info = os.lstat(link)
                assert stat.S_ISLNK(info.st_mode)
                target = os.readlink(link)
                assert not target.startswith("/") and target.startswith("../../")
                assert os.path.isdir(link)
                pids.append(resolved_pid(root, link))
            assert sorted(pids) == sorted(expected_pids(catalog, field, value)), (directory, value)

    proposal = root / "by-proposal" / PROPOSAL
    names = sorted(os.listdir(proposal))
    assert names == sorted(["run~run-a1", "run~run-a2", "vt_nameless", "Published run", "Collides"])
    assert "Secret run" not in names and "SECRET" not in os.listdir(root / "by-instrument")
    assert "archchancellor" not in os.listdir(root / "by-group") and "ankh" in os.listdir(root / "by-group")
    assert sorted(os.listdir(root / "by-proposal" / "ESS%2F2024")) == ["a_b_c", "run"]
    assert os.readlink(proposal / "run~run-a1") == "../../vt/run-a1"
    # The PID "by-proposal" is shadowed by the view: reachable under /.scicat/pid, where its link points.
    assert os.readlink(proposal / "Collides") == "../../.scicat/pid/by-proposal"
    assert (root / ".scicat" / "pid" / "by-proposal" / "metadata.json").is_file()

    # Links have inodes like every other node: readdir and lstat agree, and they stay put.
    inodes = {entry.name: entry.inode() for entry in os.scandir(proposal)}
    assert all(os.lstat(proposal / name).st_ino == ino for name, ino in inodes.items())
    assert len(set(inodes.values())) == len(inodes)
    physical = subprocess.run(["sh", "-c", 'cd "$1" && pwd -P', "sh", str(proposal / "run~run-a1")],
                              capture_output=True, timeout=30, check=True).stdout.decode().strip()
    assert physical == str(root / "vt" / "run-a1")
    subprocess.run(["du", "-L", "-s", str(proposal)], capture_output=True, timeout=60, check=True)
    archive = subprocess.run(["tar", "-h", "-cf", "-", "-C", str(proposal), "."],
                             capture_output=True, timeout=60, check=True).stdout
    assert b"metadata.json" in archive
    listing = subprocess.run(["ls", "-l", str(proposal)], capture_output=True, timeout=60, check=True).stdout.decode()
    rows = [line for line in listing.splitlines() if not line.startswith("total")]
    assert len(rows) == len(names) and all(line.startswith("l") and " -> ../../" in line for line in rows)
    found = subprocess.run(["find", "-L", str(proposal), "-name", "metadata.json", "-path", "*/.scicat/*"],
                           capture_output=True, timeout=60, check=True).stdout.decode().splitlines()
    assert len(found) == len(names)
    walked = {Path(top).relative_to(root / "by-instrument").parts[:2]
              for top, _, files in os.walk(root / "by-instrument", followlinks=True) if "metadata.json" in files}
    assert walked == {("LoKI", "run~run-a1"), ("LoKI", "run~run-a2"), ("ODIN", "Published run")}


@pytest.mark.allow_log(UNLINKABLE)
def test_unknown_values_are_enoent_after_at_most_one_small_request(make_mount) -> None:  # type: ignore[no-untyped-def]
    catalog = views_catalog()
    mount = make_mount(catalog)
    before = len(mount.server.requests)
    for path in ("by-sample/no-such-sample", "by-proposal/no-such-proposal", "by-group/archchancellor"):
        with pytest.raises(FileNotFoundError):
            os.stat(mount.path / path)
    asked = data_requests(mount.server, before)
    assert len(asked) == 3 and all(path == "/api/v4/datasets" for path in asked)
    assert all('"limit":1,' in unquote(query) for _, query, _ in mount.server.requests[before:] if "/auth/" not in query)
    with pytest.raises(FileNotFoundError):
        os.stat(mount.path / "by-proposal" / PROPOSAL / "no-such-link")
    # Once a view is listed, its values answer from the listing: no request at all.
    os.listdir(mount.path / "by-instrument")
    before = len(mount.server.requests)
    with pytest.raises(FileNotFoundError):
        os.stat(mount.path / "by-instrument" / "SECRET")
    assert data_requests(mount.server, before) == []


def test_anonymous_mount_shows_published_datasets_in_views(make_mount) -> None:  # type: ignore[no-untyped-def]
    catalog = views_catalog()
    mount = make_mount(catalog, user=None)
    assert sorted(os.listdir(mount.path / "by-proposal")) == sorted(expected_values(catalog, "proposalIds", anonymous=True))
    proposal = mount.path / "by-proposal" / PROPOSAL
    assert os.listdir(proposal) == ["Published run"]
    assert resolved_pid(mount.path, proposal / "Published run") == "vt/public"
    assert "/api/v4/datasets/fullfacet" not in data_requests(mount.server)  # v4 refuses anonymous callers


@pytest.mark.allow_log(UNLINKABLE)
@pytest.mark.allow_log(r"WARNING scicatfs\.fs\.errors: opendir path='/views/mine': SciCat at .* has no v4 API, and this selection is written in v4's filter language \(EIO\)")
def test_views_on_a_v3_only_server_with_singular_fields(make_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    catalog = views_catalog(singular=True)
    config = tmp_path / "config.toml"
    config.write_text('[profiles.old.views.mine]\nwhere = { ownerGroup = "uu" }\n')
    server = V3OnlyServer(catalog).start()
    try:
        mount = make_mount(catalog, server=server, args=["--config", str(config), "--profile", "old"])
        assert sorted(os.listdir(mount.path / "by-proposal")) == sorted(
            value_dir(value) for value in expected_values(catalog, "proposalIds"))
        proposal = mount.path / "by-proposal" / PROPOSAL
        pids = [resolved_pid(mount.path, link) for _, link in links(proposal)]
        assert sorted(pids) == sorted(expected_pids(catalog, "proposalIds", PROPOSAL))
        assert sorted(os.listdir(mount.path / "by-instrument" / "LoKI")) == ["run~run-a1", "run~run-a2"]
        assert "/api/v3/datasets/fullfacet" in data_requests(server)
        # Saved queries are written in v4's filter language: an error that says so, not a guess.
        with pytest.raises(OSError) as failure:
            os.listdir(mount.path / "views" / "mine")
        assert failure.value.errno == errno.EIO and "v4's filter language" in mount.log_text()
    finally:
        server.stop()  # the mount is unmounted by its fixture


def test_a_ten_thousand_dataset_proposal_lists_completely_without_per_dataset_requests(make_mount) -> None:  # type: ignore[no-untyped-def]
    catalog = Catalog.load_default()
    count = 10_000
    for index in range(count):
        _add(catalog, f"big/run-{index:05d}", datasetName="frame", proposalIds=["BIG"])
    mount = make_mount(catalog)
    before = len(mount.server.requests)
    listing = subprocess.run(["ls", "-l", str(mount.path / "by-proposal" / "BIG")],
                             capture_output=True, timeout=120, check=True).stdout.decode().splitlines()
    rows = [line for line in listing if line.startswith("l")]
    assert len(rows) == count
    names = {line.split(" -> ")[0].rsplit(" ", 1)[1] for line in rows}
    assert len(names) == count and "frame~run-00042" in names
    asked = data_requests(mount.server, before)
    assert asked.count("/api/v4/datasets") <= count // 1000 + 2
    assert not any(path.startswith("/api/v4/datasets/big") for path in asked)


def test_saved_query_from_a_profile(make_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    catalog = views_catalog()
    config = tmp_path / "config.toml"
    config.write_text(
        "[profiles.lab.views.loki]\n"
        'where = { instrumentIds = "LoKI" }\n'
        'sort = { pid = "desc" }\n'
        "[profiles.lab.views.first-two]\n"
        'where = { ownerGroup = { "$in" = ["uu", "ankh"] } }\n'
        "limit = 2\n"
    )
    mount = make_mount(catalog, args=["--config", str(config), "--profile", "lab"])
    views = mount.path / "views"
    assert sorted(os.listdir(views)) == ["first-two", "loki"]
    assert sorted(os.listdir(views / "loki")) == [".scicat", "run~run-a1", "run~run-a2"]
    assert resolved_pid(mount.path, views / "loki" / "run~run-a2") == "vt/run-a2"
    query = json.loads((views / "loki" / ".scicat" / "query.json").read_text())
    assert query == {"where": {"instrumentIds": "LoKI"}, "limits": {"sort": {"pid": "desc"}}}
    first = [name for name in os.listdir(views / "first-two") if name != ".scicat"]
    assert len(first) == 2
    uu_or_ankh = sorted(r["pid"] for r in catalog.datasets() if r.get("ownerGroup") in ("uu", "ankh"))[:2]
    assert sorted(resolved_pid(mount.path, views / "first-two" / name) for name in first) == uu_or_ankh
    with pytest.raises(FileNotFoundError):
        os.stat(views / "no-such-view")
