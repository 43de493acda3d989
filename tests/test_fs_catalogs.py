"""Mounts of catalogs built for one purpose: a 10,000-file dataset, hostile paths, many datasets."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from scicatfs.demo.fixtures import Catalog
from scicatfs.fs.views import top_level_views
from tests.support.records import dataset_record

#: The root's own directories, listed before the PID tree.
VIEWS = [".scicat", *top_level_views()]

BIG = "h5test/big-10000"
HOSTILE = "h5test/hostile"
CHANGING = "h5test/changing"
MANY_PREFIX = "h5many"
FILES = 10_000
DATASETS = 1_200  # more than one catalog page (1000 PIDs)


def test_ten_thousand_files_list_completely(make_mount) -> None:  # type: ignore[no-untyped-def]
    catalog = Catalog.load_default()
    names = [f"frame_{index:05d}.dat" for index in range(FILES)]
    catalog.add_dataset(dataset_record(BIG, "/h5test/big"), [{"path": name, "size": 16} for name in names], blocks=7)
    mount = make_mount(catalog)
    dataset = mount.dataset(BIG)

    assert sorted(os.listdir(dataset)) == sorted(names + [".scicat", "metadata.json"])
    listing = subprocess.run(["ls", "-l", str(dataset)], capture_output=True, timeout=60, check=True).stdout
    assert listing.count(b"\n-r--r--r--") == FILES + 1  # data files + metadata.json
    found = subprocess.run(["find", str(dataset), "-name", "frame_*"], capture_output=True, timeout=60, check=True)
    assert len(found.stdout.splitlines()) == FILES
    for name in (names[0], names[4321], names[-1]):
        assert (dataset / name).read_bytes() == catalog.content(BIG, name)


@pytest.mark.allow_log(r"WARNING scicatfs\.catalog\.models: dataset 'h5test/hostile': (dropped file |\d+ problems with file entries)")
def test_hostile_paths_never_appear(make_mount) -> None:  # type: ignore[no-untyped-def]
    catalog = Catalog.load_default()
    hostile = ["../escape.txt", "/etc/passwd", "a/../../b.txt", "dir//double.txt", "./dot.txt",
               "nul\0name.txt", "/h5test/elsewhere/outside.txt", ""]
    files = [{"path": "ok.txt", "size": 7}, {"path": "/h5test/hostile/inside.txt", "size": 9}]
    catalog.add_dataset(dataset_record(HOSTILE, "/h5test/hostile"), files + [{"path": p, "size": 5} for p in hostile])
    mount = make_mount(catalog)
    dataset = mount.dataset(HOSTILE)

    found = subprocess.run(["find", str(dataset)], capture_output=True, timeout=60, check=True).stdout.decode()
    shown = sorted(str(Path(line).relative_to(dataset)) for line in found.splitlines()[1:])
    assert shown == [".scicat", ".scicat/files.json", ".scicat/metadata.json", "inside.txt", "metadata.json", "ok.txt"]
    assert (dataset / "ok.txt").read_bytes() == catalog.content(HOSTILE, "ok.txt")
    assert (dataset / "inside.txt").read_bytes() == catalog.content(HOSTILE, "/h5test/hostile/inside.txt")
    assert "escape" not in (dataset / ".scicat" / "files.json").read_text()
    assert "dropped file" in mount.log_text()


def test_root_listing_spans_catalog_pages(make_mount) -> None:  # type: ignore[no-untyped-def]
    catalog = Catalog.load_default()
    expected = [f"ds-{index:04d}" for index in range(DATASETS)]
    for name in expected:
        catalog.add_dataset(dataset_record(f"{MANY_PREFIX}/{name}", f"/h5test/many/{name}"), [])
    mount = make_mount(catalog)
    assert sorted(os.listdir(mount.path / MANY_PREFIX)) == expected
    assert sorted(os.listdir(mount.path)) == sorted(
        [*VIEWS, "20.500.12269", MANY_PREFIX, "thaumometer-frames-0042"])


def test_changed_file_gets_new_inode_and_new_bytes(make_mount, make_catalog_server) -> None:  # type: ignore[no-untyped-def]
    def catalog_with(content: bytes) -> Catalog:
        catalog = Catalog.load_default()
        files = [{"path": "data.txt", "size": len(content)}, {"path": "same.txt", "size": 4}]
        catalog.add_dataset(dataset_record(CHANGING, "/h5test/changing"), files,
                            contents={"data.txt": content, "same.txt": b"same"})
        return catalog

    old, new = catalog_with(b"version one\n"), catalog_with(b"version two, longer\n")
    server = make_catalog_server(old, jwt_secret="changing")  # the new server must accept our token
    mount = make_mount(old, server=server, args=["--record-ttl", "1", "--listing-ttl", "1"])
    data, same = mount.dataset(CHANGING) / "data.txt", mount.dataset(CHANGING) / "same.txt"
    assert data.read_bytes() == b"version one\n"
    old_inode = os.stat(data).st_ino

    port = server.port
    server.stop()
    new.materialize(mount.sshd.root)
    make_catalog_server(new, port=port, jwt_secret="changing")
    time.sleep(1.5)  # both TTLs expire

    assert data.read_bytes() == b"version two, longer\n"
    assert os.stat(data).st_ino != old_inode  # a new version is a new inode: no stale page cache
    assert same.read_bytes() == b"same"
    assert "changed in the catalog" in mount.log_text()


@pytest.mark.allow_log(r"WARNING scicatfs\.fs\.namespace: PID 'h5bad/.*' cannot be shown: .* is not a usable file name")
def test_pids_that_cannot_be_names_are_not_listed(make_mount) -> None:  # type: ignore[no-untyped-def]
    catalog = Catalog.load_default()
    for suffix in ("ok", "..", ".", "/double", "nul\0name", "y" * 256):
        catalog.add_dataset(dataset_record(f"h5bad/{suffix}", "/h5test/bad"), [])
    mount = make_mount(catalog)
    assert os.listdir(mount.path / "h5bad") == ["ok"]
    assert "cannot be shown" in mount.log_text()
