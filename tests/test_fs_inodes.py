"""The inode table's two tiers: a bounded set in memory, the oldest inodes beyond it on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scicatfs.cache.store import FileSpec
from scicatfs.catalog.client import Selection
from scicatfs.catalog.models import Checksum
from scicatfs.fs.inodes import InodeTable
from scicatfs.fs.namespace import (
    ROOT,
    ControlDir,
    DataFileNode,
    DatasetDir,
    MountDir,
    Node,
    PidAlias,
    PidLevel,
    RecordFile,
    StatusFile,
)
from scicatfs.fs.nodekeys import NodeCodec
from scicatfs.fs.views import FACETS, FacetDir, FacetValueDir, Link, QueriesDir, QueryControlDir, QueryDir, QueryFile

SPEC = FileSpec("20.500.12269/abc", "raw/a.dat", "sftp://files.test/data/raw/a.dat", "/data/raw/a.dat", 1234, 1.5e9,
                Checksum("md5", "0" * 32))
QUERIES = QueriesDir((("recent", Selection('{"x":1}', None, '{"pid":"asc"}', 10)),))
QUERY = QueryDir(QUERIES, "recent", QUERIES.queries[0][1])
#: One node of every class the mount shows.
NODES: list[Node] = [
    ROOT, PidLevel("20.500.12269/"), DatasetDir("20.500.12269/abc"), DatasetDir("20.500.12269/abc", "raw"),
    ControlDir("20.500.12269/abc"), RecordFile("20.500.12269/abc", "metadata.json", "0123456789abcdef"),
    RecordFile("20.500.12269/abc", ".scicat/files.json"), DataFileNode(SPEC),
    DataFileNode(FileSpec("p", "b", "file:///b", "/b", 0, -0.0, None)), MountDir(), StatusFile(), PidAlias(),
    FacetDir(FACETS[0]), FacetValueDir(FACETS[0], "proposal 1"), Link(FacetValueDir(FACETS[0], "p"), "name", "pid/1", 2.5),
    QUERIES, QUERY, QueryControlDir(QUERY), QueryFile(QUERY),
    DatasetDir("with\0nul", "and/\udcff surrogate"), DatasetDir("x" * 300, "é" * 200),
]


def _table(tmp_path: Path, resident: int = 4) -> InodeTable[str]:
    return InodeTable("root", resident=resident, directory=tmp_path)


def test_every_node_class_round_trips_through_its_key() -> None:
    codec = NodeCodec()
    keys = [codec.encode(node) for node in NODES]
    assert [codec.decode(key) for key in keys] == NODES
    assert len(set(keys)) == len(NODES)
    # equal nodes, built from other string objects, have the same key (pickle's memo would differ)
    pid = "".join(["20.500", ".12269/abc"])
    assert codec.encode(Link(DatasetDir(pid), pid, pid, 1.0)) == codec.encode(
        Link(DatasetDir("20.500.12269/abc"), "20.500.12269/abc", "20.500.12269/abc", 1.0))
    assert codec.encode(DataFileNode(FileSpec("p", "b", "file:///b", "/b", 0, 0.0, None))) == keys[8]


def test_the_oldest_inodes_spill_beyond_the_bound_and_keep_their_numbers(tmp_path: Path) -> None:
    table = _table(tmp_path)
    inos = {f"n{i}": table.acquire(f"n{i}") for i in range(20)}
    assert len(set(inos.values())) == 20 and len(table) == 21
    assert table.resident <= 4 + 1 and table.spilled == 21 - table.resident
    for name, ino in inos.items():  # the spilled ones come back from disk, unchanged and not moved
        assert table.node(ino) == name and table.ino_of(name) == ino and table.lookup_count(ino) == 1
    assert table.spilled == 21 - table.resident
    assert os.listdir(tmp_path) == []  # the file is unlinked as soon as it is open
    with pytest.raises(KeyError):
        table.node(max(inos.values()) + 1)
    table.close()


def test_a_spilled_node_acquired_again_gets_its_inode_and_moves_back(tmp_path: Path) -> None:
    table = _table(tmp_path)
    first = table.acquire("first")
    for i in range(10):
        table.acquire(f"n{i}")
    spilled = table.spilled
    assert table.lookup_count(first) == 1 and spilled > 0

    assert table.acquire("first") == first  # found on disk, not numbered anew
    assert table.lookup_count(first) == 2 and table.spilled == spilled - 1
    table.forget(first, 1)
    assert table.node(first) == "first" and table.lookup_count(first) == 1
    table.forget(first, 1)
    assert table.ino_of("first") is None and table.lookup_count(first) == 0
    again = table.acquire("first")
    assert again > first and again > table.acquire("n9")  # numbers are never reused


def test_counts_above_one_survive_the_spill(tmp_path: Path) -> None:
    table = _table(tmp_path)
    ino = table.acquire("held")
    table.acquire("held")
    table.acquire("held")
    for i in range(10):
        table.acquire(f"n{i}")
    assert table.spilled and table.lookup_count(ino) == 3
    table.forget(ino, 2)
    assert table.lookup_count(ino) == 1 and table.node(ino) == "held"
    table.forget(ino, 1)
    assert table.lookup_count(ino) == 0 and table.ino_of("held") is None


def test_one_forget_batch_drops_spilled_and_resident_inodes(tmp_path: Path) -> None:
    table = _table(tmp_path)
    inos = [table.acquire(f"n{i}") for i in range(12)]
    table.acquire("n11")  # count 2, resident
    resident, spilled = table.resident, table.spilled
    table.forget_all([(inos[0], 1), (inos[1], 1), (inos[11], 1), (inos[10], 1), (1, 3)])
    assert table.spilled == spilled - 2 and table.resident == resident - 1
    for ino in inos[:2] + inos[10:11]:
        with pytest.raises(KeyError):
            table.node(ino)
    assert table.node(inos[11]) == "n11" and table.lookup_count(inos[11]) == 1
    assert table.node(1) == "root" and len(table) == 1 + 12 - 3


@pytest.mark.allow_log(r"ERROR scicatfs\.fs\.inodes: inode \d+ forgotten 1 more times than looked up")
def test_forgetting_a_spilled_inode_too_often_is_an_error_in_the_log(tmp_path: Path) -> None:
    table = _table(tmp_path)
    ino = table.acquire("a")
    for i in range(10):
        table.acquire(f"n{i}")
    assert table.lookup_count(ino) == 1 and table.ino_of("a") == ino
    table.forget(ino, 2)
    assert table.ino_of("a") is None


def test_nodes_of_a_class_are_found_in_both_tiers(tmp_path: Path) -> None:
    table: InodeTable[Node] = InodeTable(ROOT, resident=3, directory=tmp_path)
    files = {table.acquire(DataFileNode(FileSpec("p", f"f{i}", "file:///x", "/x", i, 0.0, None))) for i in range(8)}
    datasets = {table.acquire(DatasetDir(f"p{i}")) for i in range(8)}
    assert table.spilled > 0
    assert {ino for ino, _ in table.items_of(DataFileNode)} == files
    assert {ino for ino, _ in table.items_of(DatasetDir)} == datasets
    assert all(table.node(ino) == node for ino, node in table.items_of(DataFileNode))


def test_a_million_style_listing_stays_bounded_and_consistent(tmp_path: Path) -> None:
    """More spilled keys than the first key filter holds: it is rebuilt, and no spilled node is missed."""
    table = _table(tmp_path, resident=1000)
    count = 80_000
    inos = [table.acquire(f"dataset-{i:06d}") for i in range(count)]
    assert table.resident <= 1000 + 1000 // 16 and len(table) == count + 1
    for i in range(0, count, 997):
        assert table.ino_of(f"dataset-{i:06d}") == inos[i]
    assert table.acquire("dataset-000000") == inos[0]  # a second reference: back in memory
    table.forget_all((ino, 1) for ino in inos)
    assert table.lookup_count(inos[0]) == 1 and len(table) == 2


@pytest.mark.allow_log(r"WARNING scicatfs\.fs\.inodes: cannot move inodes to disk, \d+ stay in memory: .*")
def test_inodes_stay_in_memory_when_their_file_cannot_be_made(tmp_path: Path) -> None:
    table = InodeTable("root", resident=4, directory=tmp_path / "missing")
    inos = [table.acquire(f"n{i}") for i in range(20)]
    assert table.spilled == 0 and table.resident == 21
    assert [table.node(ino) for ino in inos] == [f"n{i}" for i in range(20)]
