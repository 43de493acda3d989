"""PyPI Scitacean's ``Client.download_files`` with :class:`ScicatfsFileTransfer`.

Scitacean logs in to the project's catalog server and downloads two demo
datasets (one without checksums, one whose md5 sums Scitacean checks after
the download) through scicatfs: from its own layers over the real sshd, and
from a running mount (copies, and symlinks into the mount).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from scitacean import Client, FileNotAccessibleError

from scicatfs.demo.fixtures import Catalog
from scicatfs.scitacean import ScicatfsFileTransfer
from tests.support.mounts import Mount
from tests.support.options import scicat_options
from tests.support.records import dataset_record
from tests.support.sshd import OpenSSHServer

THAUM = "20.500.12269/72fe3ff6-105b-4c7f-b9d0-073b67c90ec3"
OCTARINE = "20.500.12269/0b9a6b7e-3c61-4d8e-9f0e-5a1d2c3b4e5f"


def client(url: str, transfer: ScicatfsFileTransfer) -> Client:
    return Client.from_credentials(url=f"{url}/api/v3", username="stibbons", password="demo",
                                   file_transfer=transfer, allow_http=True)  # fmt: skip


def download_both(scitacean: Client, target: Path, demo_catalog: Catalog, **kwargs: object) -> list[Path]:
    """Download THAUM and OCTARINE into ``target``; check every file's bytes; return the local paths."""
    paths = []
    for pid in (THAUM, OCTARINE):
        dataset = scitacean.download_files(scitacean.get_dataset(pid), target=target / pid, **kwargs)
        assert dataset.files
        for file in dataset.files:
            assert file.local_path == target / pid / file.remote_path.name  # Scitacean's rule: no directories
            assert file.local_path.read_bytes() == demo_catalog.content(pid, file.remote_path.posix)
            paths.append(file.local_path)
    return paths


def test_downloads_through_its_own_layers_then_from_the_cache(
    catalog_server, demo_sftp_files: OpenSSHServer, demo_catalog: Catalog, tmp_path: Path
):
    transfer = ScicatfsFileTransfer(**scicat_options(demo_catalog, catalog_server, demo_sftp_files, tmp_path))
    scitacean = client(catalog_server.url, transfer)
    try:
        paths = download_both(scitacean, tmp_path / "first", demo_catalog)
        assert not list((tmp_path / "first").rglob("*.scicatfs-partial"))
        fetched = transfer.filesystem.background.stack.transfer.stats["bytes_read"]
        assert fetched == sum(path.stat().st_size for path in paths)
        download_both(scitacean, tmp_path / "second", demo_catalog, force=True)
        assert transfer.filesystem.background.stack.transfer.stats["bytes_read"] == fetched  # all from the cache
        # Called directly, the connection keeps the dataset's directories (Scitacean's client flattens them).
        dataset = scitacean.get_dataset(THAUM)
        remote = [file.remote_access_path(dataset.source_folder) for file in dataset.files]
        local = [tmp_path / "tree" / file.remote_path.posix for file in dataset.files]
        with transfer.connect_for_download(dataset, dataset.files[0].remote_path) as connection:
            connection.download_files(remote=remote, local=local)
        assert (tmp_path / "tree/logs/measurement.log").read_bytes() == demo_catalog.content(THAUM, "logs/measurement.log")
        assert transfer.filesystem.background.stack.transfer.stats["bytes_read"] == fetched
    finally:
        transfer.filesystem.close()


def test_downloads_from_a_running_mount(mounted: Mount, demo_catalog: Catalog, tmp_path: Path):
    scitacean = client(mounted.server.url, ScicatfsFileTransfer(mountpoint=mounted.path))
    for path in download_both(scitacean, tmp_path / "copies", demo_catalog):
        assert not path.is_symlink()


def test_links_into_a_running_mount_instead_of_copying(mounted: Mount, demo_catalog: Catalog, tmp_path: Path):
    scitacean = client(mounted.server.url, ScicatfsFileTransfer(mountpoint=mounted.path, link=True))
    for path in download_both(scitacean, tmp_path / "links", demo_catalog):
        assert path.is_symlink() and Path(path.readlink()).is_relative_to(mounted.path)


def test_a_dataset_the_mount_does_not_show_is_not_accessible(mounted: Mount, tmp_path: Path):
    scitacean = client(mounted.server.url, ScicatfsFileTransfer(mountpoint=tmp_path))  # not a mount
    with pytest.raises(FileNotAccessibleError, match="not in the mount"):
        scitacean.download_files(scitacean.get_dataset(THAUM), target=tmp_path / "nothing")


def test_wrong_arguments_and_uploads_are_refused(tmp_path: Path):
    with pytest.raises(TypeError, match="not both"):
        ScicatfsFileTransfer(mountpoint=tmp_path, url="http://127.0.0.1:1")
    with pytest.raises(TypeError, match="needs a mountpoint"):
        ScicatfsFileTransfer(link=True, url="http://127.0.0.1:1")
    with pytest.raises(NotImplementedError, match="read-only"):
        with ScicatfsFileTransfer(mountpoint=tmp_path).connect_for_upload(None, None):  # type: ignore[arg-type]
            pass


@pytest.mark.allow_log(r"ERROR scicatfs\.cache: checksum mismatch for 20\.500\.12269/scitacean-corrupt bad\.dat")
def test_a_file_that_does_not_match_its_checksum_is_not_downloaded(make_catalog_server, sshd: OpenSSHServer,
                                                                   tmp_path: Path):  # fmt: skip
    pid = "20.500.12269/scitacean-corrupt"
    catalog = Catalog.load_default()
    catalog.add_dataset(dataset_record(pid, "/scitacean/corrupt"),
                        [{"path": "good.dat"}, {"path": "bad.dat", "chk": "0" * 32}], chk_alg="md5",
                        contents={"good.dat": b"fine bytes\n", "bad.dat": b"not what the catalog says\n"})  # fmt: skip
    catalog.materialize(sshd.root)
    server = make_catalog_server(catalog)
    transfer = ScicatfsFileTransfer(**scicat_options(catalog, server, sshd, tmp_path))
    scitacean = client(server.url, transfer)
    try:
        with pytest.raises(OSError, match="checksum|md5|integrity"):
            scitacean.download_files(scitacean.get_dataset(pid), target=tmp_path / "out", select="bad.dat")
        assert list((tmp_path / "out").iterdir()) == []  # neither the file nor a partial copy
        dataset = scitacean.download_files(scitacean.get_dataset(pid), target=tmp_path / "out", select="good.dat")
        assert [file.local_path.read_bytes() for file in dataset.files if file.local_path] == [b"fine bytes\n"]
    finally:
        transfer.filesystem.close()
