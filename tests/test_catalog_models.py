"""Parsing and validating SciCat records: lenient where harmless, strict where paths are concerned."""

from __future__ import annotations

import json
import logging

import pytest

from scicatfs.catalog.errors import BadResponse
from scicatfs.catalog.models import (
    Checksum,
    metadata_json,
    parse_checksum,
    parse_dataset,
    parse_size,
    parse_time,
    relative_path,
)

MD5 = "97157d347fe9af920f5e61e96cf401cb"
SHA256 = "a" * 64


def record(files: list[dict] | None = None, **fields) -> dict:
    base = {
        "pid": "20.500.12269/72fe3ff6",
        "sourceFolder": "/hex/ps/thaum",
        "creationTime": "2022-06-29T14:01:05Z",
        "datasetName": "Thaum flux",
        "origdatablocks": [{"_id": "b1", "chkAlg": "md5", "dataFileList": files or []}],
    }
    base.update(fields)
    return base


def entry(path: str, size=20, **fields) -> dict:
    return {"path": path, "size": size, "time": "2022-06-29T14:01:05Z", **fields}


def test_files_are_typed_joined_and_sorted():
    dataset = parse_dataset(
        record([entry("logs/measurement.log", 75), entry("flux.dat", 20, chk=MD5.upper(), uid="1000", perm="777")])
    )
    assert [f.path for f in dataset.files] == ["flux.dat", "logs/measurement.log"]
    flux = dataset.files[0]
    assert flux.remote_path == "/hex/ps/thaum/flux.dat"
    assert flux.size == 20
    assert flux.mtime == parse_time("2022-06-29T14:01:05Z")
    assert flux.checksum == Checksum("md5", MD5)
    assert str(flux.checksum) == f"md5:{MD5}"
    assert dataset.files[1].checksum is None
    assert "origdatablocks" not in dataset.record


def test_sloppy_fields_are_accepted():
    dataset = parse_dataset(
        record([
            {"path": "a", "size": "300"},
            {"path": "b", "size": 12.0, "time": "not a time"},
            {"path": "c", "size": 5, "time": "2022-06-29T14:01:05"},
        ], creationTime="2020-01-01T00:00:00+00:00", sourceFolder="/data/", sourceFolderHost=None)
    )
    sizes = {f.path: (f.size, f.mtime) for f in dataset.files}
    created = parse_time("2020-01-01T00:00:00Z")
    assert sizes["a"] == (300, created)
    assert sizes["b"] == (12, created)
    assert sizes["c"][1] == parse_time("2022-06-29T14:01:05Z")
    assert dataset.files[0].remote_path == "/data/a"
    assert dataset.source_folder_host is None


def test_blocks_can_be_given_separately_v3_style():
    raw = record()
    del raw["origdatablocks"]
    blocks = [{"dataFileList": [entry("x")]}, {"dataFileList": [entry("y")]}]
    assert [f.path for f in parse_dataset(raw, blocks).files] == ["x", "y"]


@pytest.mark.parametrize(
    "path",
    [
        "../../etc/passwd",
        "a/../../b",
        "a/../b",
        "/etc/shadow",
        "/hex/ps/thaumaturgy/x",
        "a//b",
        "a/",
        "./a",
        "a/./b",
        "",
        "a\0b",
        "x" * 256,
        "ok/" + "é" * 128,
        "/hex/ps/thaum/../secret",
        "\ud800",
    ],
)
@pytest.mark.allow_log(r"WARNING scicatfs\.catalog\.models: dataset '20\.500\.12269/72fe3ff6': dropped file ")
def test_hostile_paths_are_dropped_and_logged(path, caplog):
    with caplog.at_level(logging.WARNING, logger="scicatfs.catalog.models"):
        dataset = parse_dataset(record([entry(path), entry("good.txt")]))
    assert [f.path for f in dataset.files] == ["good.txt"]
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "20.500.12269/72fe3ff6" in message
    assert repr(path)[:60] in message


def test_absolute_path_inside_source_folder_becomes_relative():
    dataset = parse_dataset(record([entry("/hex/ps/thaum/sub/f.txt")], sourceFolder="/hex/ps/thaum/"))
    assert [(f.path, f.remote_path) for f in dataset.files] == [("sub/f.txt", "/hex/ps/thaum/sub/f.txt")]


def test_component_of_255_bytes_is_fine():
    assert relative_path("d/" + "x" * 255, "/s") == "d/" + "x" * 255


@pytest.mark.parametrize("size", [-1, 2**63, 1e30, "12abc", 1.5, True, None, float("nan")])
@pytest.mark.allow_log(r"WARNING scicatfs\.catalog\.models: dataset '20\.500\.12269/72fe3ff6': dropped file 'bad': unusable size ")
def test_unusable_sizes_are_dropped(size, caplog):
    with caplog.at_level(logging.WARNING, logger="scicatfs.catalog.models"):
        dataset = parse_dataset(record([entry("bad", size), entry("good")]))
    assert [f.path for f in dataset.files] == ["good"]
    assert "bad" in caplog.text


def test_size_limits():
    assert parse_size(2**63 - 1) == 2**63 - 1
    assert parse_size(0) == 0
    assert parse_size(" 42 ") == 42


@pytest.mark.allow_log(r"dataset '20\.500\.12269/72fe3ff6' lists \d duplicate file path\(s\); kept the entry from the newest block")
def test_duplicates_newest_block_wins_then_larger_then_first(caplog):
    raw = record(origdatablocks=[
        {"createdAt": "2024-01-01T00:00:00Z", "dataFileList": [entry("a", 1), entry("b", 5), entry("b", 7)]},
        {"createdAt": "2025-01-01T00:00:00Z", "dataFileList": [entry("a", 2)]},
        {"createdAt": "2023-01-01T00:00:00Z", "dataFileList": [entry("a", 99)]},
    ])
    with caplog.at_level(logging.WARNING, logger="scicatfs.catalog.models"):
        dataset = parse_dataset(raw)
    assert {f.path: f.size for f in dataset.files} == {"a": 2, "b": 7}
    assert "duplicate" in caplog.text
    # Equal blocks and equal sizes: the first listed wins, whatever the order of blocks.
    twins = record([entry("c", 3, time="2020-01-01T00:00:00Z"), entry("c", 3, time="2021-01-01T00:00:00Z")])
    assert parse_dataset(twins).files[0].mtime == parse_time("2020-01-01T00:00:00Z")


@pytest.mark.allow_log(r"dropped file 'd': path is both a file and a directory")
def test_a_path_cannot_be_file_and_directory(caplog):
    with caplog.at_level(logging.WARNING, logger="scicatfs.catalog.models"):
        dataset = parse_dataset(record([entry("d"), entry("d/inner"), entry("e")]))
    assert [f.path for f in dataset.files] == ["d/inner", "e"]
    assert "both a file and a directory" in caplog.text


@pytest.mark.allow_log(
    r"dropped file '\.\./x\d+': path component '\.\.' is not allowed",
    r"1000 problems with file entries in total \(first 10 logged above\)",
)
def test_many_bad_entries_log_a_bounded_number_of_lines(caplog):
    bad = [entry(f"../x{i}") for i in range(1000)]
    with caplog.at_level(logging.WARNING, logger="scicatfs.catalog.models"):
        dataset = parse_dataset(record(bad + [entry("ok")]))
    assert len(dataset.files) == 1
    assert len(caplog.records) == 11
    assert "1000 problems" in caplog.records[-1].getMessage()


@pytest.mark.parametrize(
    ("algorithm", "digest", "expected"),
    [
        ("sha2", SHA256, Checksum("sha256", SHA256)),
        ("SHA-256", SHA256.upper(), Checksum("sha256", SHA256)),
        ("md5", MD5, Checksum("md5", MD5)),
        ("sha1", "b" * 40, Checksum("sha1", "b" * 40)),
        ("sha512", "c" * 128, Checksum("sha512", "c" * 128)),
        ("blake2b", "d" * 128, Checksum("blake2b", "d" * 128)),
        (None, MD5, None),
        ("md5", None, None),
        ("md5", "", None),
    ],
)
def test_checksum_aliases(algorithm, digest, expected):
    assert parse_checksum(algorithm, digest) == expected


@pytest.mark.allow_log(r"catalog uses checksum algorithm 'crc32-unknown-test', which scicatfs does not know")
def test_unknown_algorithm_warns_once_per_name(caplog):
    with caplog.at_level(logging.WARNING, logger="scicatfs.catalog.models"):
        for _ in range(3):
            assert parse_checksum("crc32-unknown-test", "abcd") is None
    assert caplog.text.count("crc32-unknown-test") == 1


@pytest.mark.parametrize("digest", [MD5[:-1], "z" * 32, 12345])
@pytest.mark.allow_log(r"dataset '20\.500\.12269/72fe3ff6': file 'f' kept without checksum: ")
def test_malformed_checksum_keeps_file_without_checksum(digest, caplog):
    with caplog.at_level(logging.WARNING, logger="scicatfs.catalog.models"):
        dataset = parse_dataset(record([entry("f", chk=digest)]))
    assert dataset.files[0].checksum is None
    assert "without checksum" in caplog.text


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"pid": None}, "pid"),
        ({"pid": 7}, "pid"),
        ({"sourceFolder": ["a"]}, "sourceFolder"),
        ({"sourceFolder": None}, "sourceFolder"),
        ({"sourceFolder": "/a\0b"}, "sourceFolder"),
        ({"sourceFolderHost": 3}, "sourceFolderHost"),
        ({"creationTime": "yesterday"}, "creationTime"),
        ({"origdatablocks": "nope"}, "origdatablocks"),
    ],
)
def test_malformed_record_raises_bad_response_naming_the_field(change, field):
    with pytest.raises(BadResponse, match=field) as caught:
        parse_dataset(record(**change))
    if field != "pid":
        assert caught.value.pid == "20.500.12269/72fe3ff6"
        assert "20.500.12269/72fe3ff6" in str(caught.value)


def test_record_that_is_not_an_object():
    with pytest.raises(BadResponse, match="not a JSON object"):
        parse_dataset(["pid"])


@pytest.mark.allow_log(
    r"skipped an origdatablock that is not a JSON object",
    r"skipped origdatablock 'x': dataFileList is not a list",
    r"dropped file None: file entry is not a JSON object",
)
def test_malformed_blocks_and_entries_are_skipped(caplog):
    raw = record(origdatablocks=[7, {"_id": "x", "dataFileList": "no"}, {"dataFileList": [None, entry("ok")]}])
    with caplog.at_level(logging.WARNING, logger="scicatfs.catalog.models"):
        assert [f.path for f in parse_dataset(raw).files] == ["ok"]
    assert len(caplog.records) == 3


def test_metadata_json_is_stable_decoded_and_without_files():
    raw = record(
        [entry("f")],
        scientificMetadata={
            "sample%20temperature": {"value": 1, "unit": "K", "nested%2Ekey": [{"a%20b": 1}]},
            "plain": "x%20y",
        },
        description="Ünïcode",
        datablocks=[{"x": 1}],
    )
    text = metadata_json(parse_dataset(raw))
    assert text.endswith(b"}\n")
    data = json.loads(text)
    assert "origdatablocks" not in data and "datablocks" not in data
    meta = data["scientificMetadata"]
    assert meta["sample temperature"]["nested.key"] == [{"a b": 1}]
    assert meta["plain"] == "x%20y"  # values are data, only keys are encoded by the server
    assert "Ünïcode".encode() in text
    assert text == metadata_json(parse_dataset(dict(reversed(list(raw.items())))))
    assert text.decode().splitlines()[1] == '  "creationTime": "2022-06-29T14:01:05Z",'
