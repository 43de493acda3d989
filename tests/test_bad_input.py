"""Bad input: hostile or broken catalog records under a real mount, a fuzzed record
parser, and command-line mistakes. Each gives one clear log line or error line,
and everything else keeps working.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scicatfs.catalog.errors import BadResponse
from scicatfs.catalog.models import Dataset, parse_dataset
from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.server import CatalogServer
from scicatfs.mountpoint import find_mount
from tests.support.checklogs import LogChecker
from tests.support.mounts import Mount
from tests.support.probes import bounded
from tests.support.records import dataset_record
from tests.support.sshd import OpenSSHServer

THAUM = "20.500.12269/72fe3ff6-105b-4c7f-b9d0-073b67c90ec3"
HOSTILE = "h5bad/hostile"
UNKNOWN_ALGORITHM = "h5bad/crc32"
NO_FOLDER = "h5bad/no-source-folder"
BAD_TIME = "h5bad/bad-creation-time"
HUGE = "h5bad/huge"
PROMPT = 10.0

HOSTILE_ENTRIES: list[dict[str, Any]] = [
    {"path": "../x", "size": 5},
    {"path": "/etc/passwd", "size": 5},
    {"path": "a/../../b", "size": 5},
    {"path": "dir//x", "size": 5},
    {"path": "x/./y", "size": 5},
    {"path": "", "size": 5},
    {"path": "nul\0name", "size": 5},
    {"path": "n" * 4096, "size": 5},
    {"path": "deep/" + "b" * 256, "size": 5},
    {"path": "negative.bin", "size": -1},
    {"path": "absurd.bin", "size": 1e30},
    {"path": "beyond-off_t.bin", "size": str(2**64)},
    {"path": "words.bin", "size": "many"},
    {"path": 42, "size": 3},
    {"path": ["list"], "size": 3},
    {"size": 3},
]


def _hostile_catalog() -> Catalog:
    catalog = Catalog.load_default()
    good = [{"path": "ok.txt", "size": 7}, {"path": "dup.txt", "size": 5}, {"path": "dup.txt", "size": 9}]
    catalog.add_dataset(dataset_record(HOSTILE, "/h5bad/hostile"), good + HOSTILE_ENTRIES,
                        contents={"dup.txt": b"123456789"})
    catalog.add_dataset(dataset_record(UNKNOWN_ALGORITHM, "/h5bad/crc32"),
                        [{"path": "data.bin", "size": 1000, "chk": "1234abcd"}], chk_alg="crc32")
    record = dataset_record(NO_FOLDER, "unused")
    del record["sourceFolder"]
    catalog.add_dataset(record, [{"path": "x.bin", "size": 1}])
    catalog.add_dataset(dataset_record(BAD_TIME, "/h5bad/bad-time", creationTime=["yesterday"]),
                        [{"path": "x.bin", "size": 1}])
    for pid in ("h5bad/" + "p" * 300, "h5bad/../evil"):
        catalog.add_dataset(dataset_record(pid, "/h5bad/elsewhere"), [{"path": "x.bin", "size": 1}])
    return catalog


@pytest.mark.allow_log(
    r"WARNING scicatfs\.catalog\.models: dataset 'h5bad/hostile'(: dropped file| lists 1 duplicate file path)",
    r"WARNING scicatfs\.catalog\.models: dataset 'h5bad/hostile': \d+ problems with file entries in total",
    r"WARNING scicatfs\.catalog\.models: catalog uses checksum algorithm 'crc32'",
    r"WARNING scicatfs\.catalog\.client: dataset 'h5bad/(no-source-folder|bad-creation-time)': field",
    r"WARNING scicatfs\.fs\.errors: lookup pid='h5bad/(no-source-folder|bad-creation-time)'.*\(EIO\)",
    r"WARNING scicatfs\.fs\.namespace: PID 'h5bad/.*' cannot be shown: .* is not a usable file name",
)
def test_hostile_records_are_logged_and_the_rest_keeps_working(make_mount) -> None:  # type: ignore[no-untyped-def]
    catalog = _hostile_catalog()
    mount: Mount = make_mount(catalog)
    hostile = mount.dataset(HOSTILE)

    assert sorted(bounded(PROMPT, lambda: os.listdir(hostile))) == [".scicat", "dup.txt", "metadata.json", "ok.txt"]
    assert (hostile / "ok.txt").read_bytes() == catalog.content(HOSTILE, "ok.txt")
    assert (hostile / "dup.txt").read_bytes() == b"123456789"  # the larger of two equally new entries
    listed = json.loads((hostile / ".scicat" / "files.json").read_text())["files"]
    assert [entry["path"] for entry in listed] == ["dup.txt", "ok.txt"]
    assert json.loads((hostile / "metadata.json").read_text())["pid"] == HOSTILE

    unverified = mount.dataset(UNKNOWN_ALGORITHM) / "data.bin"
    assert unverified.read_bytes() == catalog.content(UNKNOWN_ALGORITHM, "data.bin")
    for broken in (NO_FOLDER, BAD_TIME):
        with pytest.raises(OSError) as raised:
            bounded(PROMPT, lambda broken=broken: os.stat(mount.dataset(broken)))
        assert raised.value.errno == errno.EIO

    # Hostile PIDs are not listed; the rest of the catalog is untouched.
    assert sorted(bounded(PROMPT, lambda: os.listdir(mount.path / "h5bad"))) == [
        "bad-creation-time", "crc32", "hostile", "no-source-folder"]
    assert (mount.dataset(THAUM) / "flux.dat").read_bytes() == catalog.content(THAUM, "flux.dat")

    log = mount.log_text()
    for expected in ("dropped file '../x'", "dropped file '/etc/passwd'", "dropped file 'a/../../b'",
                     "duplicate file path", "'crc32', which scicatfs does not know",
                     "field 'sourceFolder' is missing", "field 'creationTime' is missing or not a timestamp",
                     "problems with file entries in total", "is not a usable file name"):
        assert expected in log, expected
    assert len(log.splitlines()) < 60, "a hostile catalog must not flood the log"


def test_a_dataset_of_100000_files(make_mount, make_catalog_server, make_sshd) -> None:  # type: ignore[no-untyped-def]
    """The catalog lists 100,000 files; the file server holds only the three that are read."""
    catalog = Catalog.load_default()
    names = [f"d{index // 1000:03d}/f{index:06d}" for index in range(100_000)]
    catalog.add_dataset(dataset_record(HUGE, "/h5bad/huge"), [{"path": name, "size": 8} for name in names], blocks=20)
    sshd: OpenSSHServer = make_sshd()
    read = (names[0], names[54_321], names[-1])
    for name in read:
        sshd.put(f"/h5bad/huge/{name}", catalog.content(HUGE, name))
    mount: Mount = make_mount(server=make_catalog_server(catalog), sftp=sshd)
    dataset = mount.dataset(HUGE)
    directories = bounded(60, lambda: os.listdir(dataset))
    assert len(directories) == 100 + 2
    assert len(os.listdir(dataset / "d042")) == 1000
    for name in read:
        assert (dataset / name).read_bytes() == catalog.content(HUGE, name)
    # The other datasets stay prompt while the big one is served.
    assert bounded(PROMPT, lambda: (mount.dataset(THAUM) / "flux.dat").read_bytes()) == catalog.content(
        THAUM, "flux.dat")


# -- the record parser, fuzzed ----------------------------------------------------------

_json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
_json = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
_path_parts = st.sampled_from(["a", "b.txt", "..", ".", "", "/", "\0", "é", "x" * 256, "sub/dir", "%2e%2e"])
_paths = st.lists(_path_parts, min_size=0, max_size=5).map("/".join) | _json
_entries = st.fixed_dictionaries(
    {"path": _paths},
    optional={"size": st.integers(-5, 2**64) | _json, "chk": st.text("0123456789abcdef", max_size=64) | _json,
              "time": st.sampled_from(["2023-01-01T00:00:00Z", "yesterday", 12.5]) | _json},
) | _json
_blocks = st.lists(st.fixed_dictionaries(
    {"dataFileList": st.lists(_entries, max_size=6) | _json},
    optional={"chkAlg": st.sampled_from(["md5", "sha2", "SHA-256", "crc32", ""]) | _json,
              "createdAt": st.sampled_from(["2023-01-01T00:00:00Z", "bad"]) | _json},
) | _json, max_size=3)
_records = st.fixed_dictionaries(
    {"pid": st.text(min_size=1, max_size=10) | _json},
    optional={"sourceFolder": st.sampled_from(["/data/set", "data/set", "/", "/data/set/"]) | _json,
              "creationTime": st.sampled_from(["2023-05-01T10:00:00Z", 1.7e9]) | _json,
              "sourceFolderHost": st.sampled_from(["fileserver", None]) | _json,
              "origdatablocks": _blocks},
) | _json


def _check_invariants(dataset: Dataset) -> None:
    folder = dataset.source_folder.rstrip("/") + "/"
    paths = [datafile.path for datafile in dataset.files]
    assert paths == sorted(set(paths))
    for datafile in dataset.files:
        parts = datafile.path.split("/")
        assert datafile.path and not datafile.path.startswith("/") and "\0" not in datafile.path
        assert all(part not in ("", ".", "..") and len(part.encode()) <= 255 for part in parts)
        assert datafile.remote_path == folder + datafile.path
        assert posixpath.normpath(datafile.remote_path).startswith(posixpath.normpath(folder))
        assert isinstance(datafile.size, int) and 0 <= datafile.size < 2**63
    directories = {"/".join(path.split("/")[:end]) for path in paths for end in range(1, path.count("/") + 1)}
    assert not directories & set(paths)


@settings(max_examples=400, deadline=500, suppress_health_check=[HealthCheck.too_slow])
@given(_records)
@pytest.mark.allow_log(r"WARNING scicatfs\.catalog\.models: (dataset .*: (dropped file|skipped)|.*\d+ problems with file entries|catalog uses checksum algorithm)", optional=True)
def test_fuzzed_records_parse_or_fail_cleanly(raw: Any) -> None:
    try:
        dataset = parse_dataset(raw)
    except BadResponse as error:
        assert str(error)
        return
    _check_invariants(dataset)


# -- the command line -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _base_args(server: CatalogServer, sshd: OpenSSHServer, tmp_path: Path) -> list[str]:
    password = tmp_path / "password"
    password.write_text("demo\n")
    password.chmod(0o600)
    return ["--url", server.url, "--username", "stibbons", "--password-file", str(password),
            "--sftp-host", sshd.host, "--sftp-port", str(sshd.port), "--sftp-user", sshd.username,
            "--identity-file", str(sshd.client_key), "--known-hosts", str(sshd.known_hosts),
            "--cache-dir", str(tmp_path / "cache"), "--foreground"]


def _replace(args: list[str], option: str, *values: str) -> list[str]:
    """``args`` with ``option``'s value replaced by ``values`` (nothing: the option removed)."""
    index = args.index(option)
    return args[:index] + ([option, *values] if values else []) + args[index + 2:]


def _token_file(args: list[str], token: Path) -> list[str]:
    """``args`` logging in with ``token`` instead of a user name and password."""
    return _replace(_replace(args, "--password-file"), "--username") + ["--token-file", str(token)]


def _written(path: Path, text: str, mode: int) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


CLI_CASES: dict[str, tuple[Callable[[list[str], Path], list[str]], str]] = {
    "URL without scheme": (lambda a, p: _replace(a, "--url", "scicat.example.org/api/v3"), "http"),
    "URL that is not one": (lambda a, p: _replace(a, "--url", "http://"), "URL"),
    "unreachable host": (lambda a, p: _replace(a, "--url", "http://scicat.invalid/api/v3"), "scicat.invalid"),
    "closed port": (lambda a, p: _replace(a, "--url", f"http://127.0.0.1:{_free_port()}"), "unavailable"),
    "missing token file": (lambda a, p: _token_file(a, p / "absent.token"), "absent.token"),
    "token file readable by others": (
        lambda a, p: _token_file(a, _written(p / "token", "eyJhbGciOiJIUzI1NiJ9.e30.c2ln\n", 0o644)), "chmod 600"),
    "token file is a directory": (lambda a, p: _token_file(a, p), "token file"),
    "password file readable by others": (
        lambda a, p: _replace(a, "--password-file", str(_written(p / "shared-password", "demo\n", 0o640))),
        "chmod 600"),
    "cache size with a bad unit": (lambda a, p: a + ["--cache-size", "10X"], "cache"),
    "negative cache size": (lambda a, p: a + ["--cache-size=-5G"], "cache"),
    "cache size zero": (lambda a, p: a + ["--cache-size", "0"], "cache"),
    "cache dir is a file": (lambda a, p: _replace(a, "--cache-dir", str(_written(p / "plain", "x", 0o600))), "cache"),
    "bad sftp port": (lambda a, p: _replace(a, "--sftp-port", "ssh"), "sftp"),
    "negative ttl": (lambda a, p: a + ["--record-ttl", "-1"], "record"),
}
#: Values the command line itself gets wrong: a usage error, exit status 2 (the others exit 1).
USAGE_ERRORS = {"URL without scheme", "URL that is not one", "cache size with a bad unit", "negative cache size",
                "cache size zero", "bad sftp port", "negative ttl"}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_errors_are_one_clear_line(case: str, catalog_server: CatalogServer, demo_sftp_files: OpenSSHServer,
                                       tmp_path: Path, log_checker: LogChecker) -> None:
    change, expected = CLI_CASES[case]
    if case == "unreachable host":
        log_checker.allow(r"WARNING scicatfs\.catalog\.client: the catalog URL http://scicat\.invalid/api is not https")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    args = change(_base_args(catalog_server, demo_sftp_files, tmp_path), tmp_path)
    try:
        result = subprocess.run([sys.executable, "-m", "scicatfs", "mount", str(mountpoint), *args],
                                check=False, capture_output=True, text=True, timeout=60)
    finally:
        if find_mount(mountpoint) is not None:
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False, timeout=30)
    assert result.returncode == (2 if case in USAGE_ERRORS else 1), result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("scicatfs: "), result.stderr
    assert expected.lower() in lines[-1].lower(), result.stderr
    log_checker.check_output(result.stderr, "stderr")
    assert find_mount(mountpoint) is None
