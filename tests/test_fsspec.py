"""``scicat://`` through fsspec against the project's catalog server and a real OpenSSH sshd.

The dataset's files are made here (CSV, raw float64, HDF5, NetCDF-4), put into
the sshd chroot and into the catalog with sha256 checksums; every read is
compared with those exact bytes or values.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import distributed
import fsspec
import h5py
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from scicatfs.config import ConfigError
from scicatfs.errors import ScicatfsError
from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.server import CatalogServer
from scicatfs.fsspec import ScicatFileSystem
from tests.support.options import scicat_options
from tests.support.records import dataset_record
from tests.support.sshd import OpenSSHServer

PID = "20.500.12269/fsspec-analysis"
FOLDER = "/fsspec/analysis"
VALUES = np.linspace(0.0, 1.0, 300_000)  # 2.4 MB of float64: several cache blocks
BIG = np.random.default_rng(17).bytes(3 * 1024 * 1024 + 123)


def _hdf5() -> bytes:
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as file:
        file.create_dataset("entry/counts", data=np.arange(1000, dtype=np.int32).reshape(10, 100))
        file["entry"].attrs["title"] = "flux scan"
    return buffer.getvalue()


def _netcdf(work: Path) -> bytes:
    path = work / "scan.nc"
    temperature = xr.DataArray(np.arange(24.0).reshape(4, 6), dims=("time", "x"), attrs={"units": "K"})
    xr.Dataset({"temperature": temperature}, coords={"x": np.arange(6)}).to_netcdf(path, engine="h5netcdf")
    return path.read_bytes()


def _contents(work: Path) -> dict[str, bytes]:
    return {
        "table.csv": b"sample,temperature,flux\nA,123.5,7\nB,98.25,11\nC,4.0,-3\n",
        "raw/values.f8": VALUES.tobytes(),
        "raw/big.bin": BIG,
        "nexus/scan.h5": _hdf5(),
        "nexus/scan.nc": _netcdf(work),
    }


@pytest.fixture(scope="module")
def contents(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return _contents(tmp_path_factory.mktemp("files"))


@pytest.fixture(scope="module")
def analysis_catalog(contents: dict[str, bytes]) -> Catalog:
    catalog = Catalog.load_default()
    catalog.add_dataset(dataset_record(PID, FOLDER), [{"path": path} for path in contents],
                        chk_alg="sha256", contents=contents)  # fmt: skip
    return catalog


@pytest.fixture(scope="module")
def served(analysis_catalog: Catalog, sshd: OpenSSHServer) -> Iterator[CatalogServer]:
    analysis_catalog.materialize(sshd.root)
    with CatalogServer(analysis_catalog) as server:
        yield server


@pytest.fixture(scope="module")
def options(analysis_catalog: Catalog, served: CatalogServer, sshd: OpenSSHServer,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # fmt: skip
    return scicat_options(analysis_catalog, served, sshd, tmp_path_factory.mktemp("fsspec"))


@pytest.fixture(scope="module")
def fs(options: dict[str, Any]) -> Iterator[ScicatFileSystem]:
    filesystem = fsspec.filesystem("scicat", **options)
    yield filesystem
    filesystem.close()


# -- the tree ---------------------------------------------------------------------------


def test_the_protocol_is_registered_and_the_tree_is_the_mounts(fs: ScicatFileSystem, contents):
    assert isinstance(fs, ScicatFileSystem)
    assert "20.500.12269" in fs.ls("", detail=False)
    assert f"scicat://{PID}" in [fs.unstrip_protocol(p) for p in fs.ls("scicat://20.500.12269", detail=False)]
    top = {entry["name"]: entry for entry in fs.ls(f"scicat://{PID}")}
    assert set(top) == {f"{PID}/{name}" for name in ("metadata.json", ".scicat", "table.csv", "raw", "nexus")}
    assert top[f"{PID}/table.csv"] | {"mtime": 0} == {
        "name": f"{PID}/table.csv", "size": len(contents["table.csv"]), "type": "file", "mtime": 0, "pid": PID,
        "cached": 0, "source": f"sftp://127.0.0.1{FOLDER}/table.csv",
        "checksum": f"sha256:{hashlib.sha256(contents['table.csv']).hexdigest()}",
    }  # fmt: skip
    assert top[f"{PID}/raw"]["type"] == "directory"
    assert fs.info(f"{PID}/raw/big.bin")["size"] == len(BIG)
    assert fs.isdir("20.500.12269") and fs.isfile(f"{PID}/nexus/scan.h5")
    assert sorted(fs.find(PID)) == sorted(
        [f"{PID}/{path}" for path in contents] + [f"{PID}/metadata.json", f"{PID}/.scicat/metadata.json",
                                                  f"{PID}/.scicat/files.json"])  # fmt: skip
    assert fs.glob(f"scicat://{PID}/nexus/*.h5") == [f"{PID}/nexus/scan.h5"]
    assert fs.exists(f"{PID}/raw/values.f8")
    assert not fs.exists(f"{PID}/raw/nothing") and not fs.exists("20.500.12269/no-such-dataset")


def test_the_views_lead_to_the_datasets(fs: ScicatFileSystem, contents):
    """by-group/uu/ holds links; a path through one reads the dataset's files, as through the mount."""
    assert {"by-proposal", "by-instrument", "by-sample", "by-group", "views"} <= set(fs.ls("", detail=False))
    links = [entry for entry in fs.ls("by-group/uu", detail=True) if entry["type"] == "link"]
    assert links, "the demo user's group shows no dataset"
    [link] = [entry["name"] for entry in links if "fsspec-analysis" in entry["name"]]
    assert fs.cat_file(f"{link}/table.csv") == contents["table.csv"]
    assert fs.cat_file(f"{link}/table.csv", start=3, end=40) == contents["table.csv"][3:40]
    assert fs.info(f"{link}/table.csv")["type"] == "file"


def test_metadata_json_and_files_json(fs: ScicatFileSystem, contents):
    record = json.loads(fs.cat_file(f"{PID}/metadata.json"))
    assert record["pid"] == PID and record["sourceFolder"] == FOLDER
    assert fs.cat_file(f"{PID}/.scicat/metadata.json") == fs.cat_file(f"{PID}/metadata.json")
    listed = json.loads(fs.cat_file(f"scicat://{PID}/.scicat/files.json"))
    assert {item["path"]: item["size"] for item in listed["files"]} == {p: len(b) for p, b in contents.items()}


def test_bad_names_and_writes_are_clear_errors(fs: ScicatFileSystem, options):
    with pytest.raises(FileNotFoundError, match="no-such-dataset"):
        fs.info("20.500.12269/no-such-dataset")
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{PID}/../{PID}/table.csv")
    with pytest.raises(IsADirectoryError):
        fs.open(f"{PID}/raw")
    with pytest.raises(OSError) as error:
        fs.open(f"{PID}/table.csv", "wb")
    assert error.value.errno == errno.EROFS
    with pytest.raises(ConfigError, match="unknown scicat option 'sftp_hots'"):
        ScicatFileSystem(**{**options, "sftp_hots": "x"}, skip_instance_cache=True)
    with pytest.raises(ConfigError, match="sftp_port 0"):
        ScicatFileSystem(**{**options, "sftp_port": 0}, skip_instance_cache=True)


# -- bytes ------------------------------------------------------------------------------


def test_cat_file_and_ranges_are_exact(fs: ScicatFileSystem, contents):
    for path, data in contents.items():
        assert fs.cat_file(f"scicat://{PID}/{path}") == data, path
    path = f"{PID}/raw/big.bin"
    for start, end in ((0, 10), (1_000_000, 2_500_000), (len(BIG) - 5, None), (-100, None), (-300, -200),
                       (5, 5), (len(BIG) + 10, None)):  # fmt: skip
        assert fs.cat_file(path, start=start, end=end) == BIG[start:end], (start, end)
    assert fs.cat(f"scicat://{PID}/table.csv") == contents["table.csv"]


def test_open_seeks_and_reads_into(fs: ScicatFileSystem):
    with fs.open(f"scicat://{PID}/raw/big.bin") as file:
        assert file.size == len(BIG)
        file.seek(2_000_000)
        assert file.read(4096) == BIG[2_000_000:2_004_096]
        file.seek(-10, os.SEEK_END)
        assert file.read() == BIG[-10:]
        file.seek(17)
        buffer = bytearray(1_500_000)
        assert file.readinto(buffer) == len(buffer)
        assert bytes(buffer) == BIG[17:1_500_017]
        assert file.tell() == 1_500_017
        file.seek(100, os.SEEK_CUR)
        assert file.read(10) == BIG[1_500_117:1_500_127]


def test_a_complete_file_is_read_from_the_cache(fs: ScicatFileSystem):
    fs.cat_file(f"{PID}/raw/values.f8")
    assert fs.info(f"{PID}/raw/values.f8")["cached"] == VALUES.nbytes
    transfer = fs.background.stack.transfer
    before = transfer.stats["bytes_read"]
    assert np.array_equal(np.frombuffer(fs.cat_file(f"{PID}/raw/values.f8"), dtype=np.float64), VALUES)
    assert transfer.stats["bytes_read"] == before


# -- the libraries ----------------------------------------------------------------------


def test_pandas_reads_a_csv_through_the_url(fs: ScicatFileSystem, options):
    table = pd.read_csv(f"scicat://{PID}/table.csv", storage_options=options)
    assert table.to_dict("list") == {"sample": ["A", "B", "C"], "temperature": [123.5, 98.25, 4.0], "flux": [7, 11, -3]}
    with fs.open(f"{PID}/table.csv") as file:
        assert pd.read_csv(file)["flux"].sum() == 15


def test_numpy_reads_a_binary_file(fs: ScicatFileSystem):
    values = np.frombuffer(fs.cat_file(f"scicat://{PID}/raw/values.f8"), dtype=np.float64)
    assert np.array_equal(values, VALUES)


def test_h5py_reads_an_hdf5_file(fs: ScicatFileSystem):
    with fs.open(f"scicat://{PID}/nexus/scan.h5") as handle, h5py.File(handle, "r") as file:
        assert file["entry"].attrs["title"] == "flux scan"
        assert np.array_equal(file["entry/counts"][3, 10:20], np.arange(310, 320, dtype=np.int32))


def test_xarray_reads_a_netcdf_file(fs: ScicatFileSystem):
    with fs.open(f"scicat://{PID}/nexus/scan.nc") as handle:
        with xr.open_dataset(handle, engine="h5netcdf") as dataset:
            assert dataset["temperature"].attrs["units"] == "K"
            assert float(dataset["temperature"].sel(x=4).sum()) == 4 + 10 + 16 + 22


# -- processes --------------------------------------------------------------------------


def test_importing_it_does_not_import_fuse():
    code = "import sys, scicatfs.fsspec, scicatfs.scitacean; print('pyfuse3' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_a_forked_child_reads_with_its_own_thread(fs: ScicatFileSystem, contents):
    fs.cat_file(f"{PID}/table.csv")  # the parent's loop is running when the child is forked
    parent = fs.background
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        status = 1
        try:
            with os.fdopen(write_end, "wb") as pipe:
                try:
                    data = fs.cat_file(f"{PID}/nexus/scan.h5")
                    pipe.write(b"new-thread " if fs.background is not parent else b"same-thread ")
                    pipe.write(data)
                    status = 0
                except BaseException as error:  # shown by the parent's assertion
                    pipe.write(f"child failed: {error!r}".encode())
        finally:
            os._exit(status)
    os.close(write_end)
    deadline = time.monotonic() + 60
    try:
        answer = _read_to_end(read_end, deadline)
    finally:
        os.close(read_end)
        status = None
        while status is None and time.monotonic() < deadline:
            reaped, code = os.waitpid(child, os.WNOHANG)
            status = code if reaped else time.sleep(0.05)
        if status is None:  # still running: a hang, not a result
            os.kill(child, signal.SIGKILL)
            status = os.waitpid(child, 0)[1]
    assert answer == b"new-thread " + contents["nexus/scan.h5"], answer[:300]
    assert os.waitstatus_to_exitcode(status) == 0
    assert fs.background is parent and fs.cat_file(f"{PID}/table.csv") == contents["table.csv"]


def _read_to_end(fd: int, deadline: float) -> bytes:
    chunks = []
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            if not (chunk := os.read(fd, 1 << 20)):
                return b"".join(chunks)
            chunks.append(chunk)
    raise TimeoutError("the forked child did not answer within 60 s")


def _read_on_worker(url: str, options: dict[str, Any]) -> tuple[int, bytes]:
    with fsspec.open(url, "rb", **options) as file:
        return os.getpid(), file.read()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_dask_workers_read_different_files(options, contents):
    paths = ["raw/values.f8", "nexus/scan.h5"]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, worker_dashboard_address=None) as cluster, \
            distributed.Client(cluster, timeout=60) as client:  # fmt: skip
        client.wait_for_workers(2, timeout=90)
        workers = sorted(client.scheduler_info()["workers"])
        futures = [client.submit(_read_on_worker, f"scicat://{PID}/{path}", options, workers=[worker],
                                 allow_other_workers=False, pure=False)
                   for path, worker in zip(paths, workers, strict=True)]  # fmt: skip
        results = client.gather(futures, errors="raise")
    assert [data for _, data in results] == [contents[path] for path in paths]
    assert len({pid for pid, _ in results} | {os.getpid()}) == 3  # two worker processes, neither this one


def test_threads_read_at_once(fs: ScicatFileSystem):
    ranges = [(offset, offset + 300_000) for offset in range(0, len(BIG) - 300_000, 250_000)]

    def read(bounds: tuple[int, int]) -> bytes:
        with fs.open(f"{PID}/raw/big.bin", cache_type="none") as file:
            file.seek(bounds[0])
            return file.read(bounds[1] - bounds[0])

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(read, ranges, timeout=60))
    assert results == [BIG[start:end] for start, end in ranges]


def test_a_mount_and_fsspec_share_one_cache_dir(make_mount, analysis_catalog: Catalog, contents, tmp_path: Path):
    cache = tmp_path / "shared-cache"
    mount = make_mount(analysis_catalog, cache_dir=cache)
    assert (mount.dataset(PID) / "raw/big.bin").read_bytes() == BIG  # now in the cache the mount uses
    options = scicat_options(analysis_catalog, mount.server, mount.sshd, tmp_path) | {"cache_dir": str(cache)}
    shared = ScicatFileSystem(**options, skip_instance_cache=True)
    try:
        assert shared.info(f"{PID}/raw/big.bin")["cached"] == len(BIG)
        assert shared.cat_file(f"{PID}/raw/big.bin") == BIG
        assert shared.cat_file(f"{PID}/table.csv") == contents["table.csv"]  # fetched by fsspec ...
        assert shared.background.stack.transfer.stats["bytes_read"] == len(contents["table.csv"])
        assert (mount.dataset(PID) / "table.csv").read_bytes() == contents["table.csv"]  # ... while mounted
    finally:
        shared.close()


def test_a_changed_dataset_is_seen_after_its_record_ttl(make_catalog_server, sshd: OpenSSHServer, tmp_path: Path):
    pid = "fsspec/versions"

    def catalog_with(content: bytes) -> Catalog:
        catalog = Catalog.load_default()
        catalog.add_dataset(dataset_record(pid, "/fsspec/versions"), [{"path": "data.txt"}], chk_alg="sha256",
                            contents={"data.txt": content})  # fmt: skip
        catalog.materialize(sshd.root)
        return catalog

    first = catalog_with(b"one")
    server = make_catalog_server(first, jwt_secret="versions")
    options = scicat_options(first, server, sshd, tmp_path) | {"record_ttl": 0}
    changing = ScicatFileSystem(**options, skip_instance_cache=True)
    try:
        assert changing.cat_file(f"{pid}/data.txt") == b"one"
        port = server.port
        server.stop()
        make_catalog_server(catalog_with(b"two!"), port=port, jwt_secret="versions")
        assert changing.info(f"{pid}/data.txt")["size"] == 4
        assert changing.cat_file(f"{pid}/data.txt") == b"two!"
    finally:
        changing.close()


def test_an_unreachable_catalog_fails_at_construction_with_its_url(tmp_path: Path):
    started = time.monotonic()
    with pytest.raises(ScicatfsError, match=r"catalog at http://127\.0\.0\.1:9/.*unavailable"):
        ScicatFileSystem(url="http://127.0.0.1:9/", cache_dir=str(tmp_path / "cache"), skip_instance_cache=True)
    assert time.monotonic() - started < 60
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("scicatfs http://127.0.0.1:9")]
