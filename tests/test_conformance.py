"""The demo servers against clients nobody here wrote.

- PyPI `scitacean` logs in, reads the Thaum flux dataset (strict validation)
  and downloads files over SFTP from `DemoSFTPServer`, verifying checksums;
- responses validate against the pydantic models of PyPI `scicat-sdk-py`,
  which are generated from scicat-backend-next's OpenAPI document; fields the
  models do not know are reported, apart from the ones the real server also
  adds outside its DTOs (`_id`, included relations);
- asyncssh reads a file from `DemoSFTPServer` with host-key verification on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from urllib.parse import quote

import asyncssh
import httpx
import paramiko
import pytest
from pydantic import BaseModel
from scicat_sdk_py.models import (
    CountApiResponse,
    DataFile,
    HealthControllerCheckV3200Response,
    OrigDatablock,
    OutputDatasetDto,
    OutputDatasetObsoleteDto,
    ReturnedAuthLoginDto,
)
from scitacean import Client
from scitacean.transfer.sftp import SFTPFileTransfer

from scicatfs.demo.fixtures import Catalog
from scicatfs.demo.server import CatalogServer
from scicatfs.demo.sftp_server import DemoSFTPServer

THAUM = "20.500.12269/72fe3ff6-105b-4c7f-b9d0-073b67c90ec3"
OCTARINE = "20.500.12269/0b9a6b7e-3c61-4d8e-9f0e-5a1d2c3b4e5f"

#: Keys the real server returns beside its DTOs: the Mongo id of an aggregate,
#: included relations, and the v3 `history`.
_OUTSIDE_DTO = {"_id", "origdatablocks", "history"}
#: The v3 record spreads the stored (v4) document before adding the singular
#: fields its DTO names, so a live backend also sends these plurals.
_V3_PLURALS = {"principalInvestigators", "instrumentIds", "proposalIds", "sampleIds"}


def validate(model: type[BaseModel], document: dict) -> BaseModel:
    """Parse with the SDK model and insist that it knows every field we sent."""
    known = {field.alias or name for name, field in model.model_fields.items()}
    if model is OutputDatasetObsoleteDto:
        known |= _V3_PLURALS
    assert set(document) - known - _OUTSIDE_DTO == set(), model.__name__
    parsed = model.from_dict(document)
    assert parsed is not None
    return parsed


@pytest.fixture
def sdk_http(catalog_server: CatalogServer):
    with httpx.Client(base_url=catalog_server.url, timeout=10, verify=False) as client:
        login = client.post("/api/v3/auth/login", json={"username": "stibbons", "password": "demo"})
        assert login.status_code == 201
        validate(ReturnedAuthLoginDto, login.json())
        client.headers["Authorization"] = f"Bearer {login.json()['id']}"
        yield client


@pytest.fixture
def sftp_server(demo_catalog: Catalog, tmp_path: Path):
    root = tmp_path / "sftp-root"
    root.mkdir()
    demo_catalog.materialize(root)
    with DemoSFTPServer(root) as server:
        yield server


def scitacean_client(server: CatalogServer, transfer: SFTPFileTransfer | None = None) -> Client:
    return Client.from_credentials(url=f"{server.url}/api/v3", username="stibbons", password="demo",
                                   file_transfer=transfer, allow_http=True)


def test_scitacean_reads_thaum_flux(catalog_server: CatalogServer):
    dataset = scitacean_client(catalog_server).get_dataset(THAUM, strict_validation=True)
    assert dataset.name == "Thaum flux"
    assert dataset.type == "raw"
    assert dataset.owner == "Ponder Stibbons"
    assert dataset.owner_group == "uu" and dataset.access_groups == ["faculty"]
    assert dataset.contact_email == "p.stibbons@uu.am"
    assert dataset.creation_location == "UnseenUniversity"
    assert dataset.description == "Measured the thaum flux"
    assert dataset.source_folder.posix == "/hex/ps/thaum"
    assert dataset.creation_time.isoformat() == "2022-06-29T14:01:05+00:00"
    assert dataset.meta == {"data_type": "histogram", "temperature": {"value": "123", "unit": "K"}}
    assert sorted((f.remote_path.posix, f.size) for f in dataset.files) == [
        ("flux.dat", 20), ("logs/measurement.log", 75)]
    assert dataset.size == 95 and dataset.number_of_files == 2


def test_scitacean_sees_403_and_404(catalog_server: CatalogServer):
    client = scitacean_client(catalog_server)
    with pytest.raises(Exception, match="403|Unauthorized"):
        client.get_dataset("20.500.12269/d3a4e5f6-0000-4000-8000-dea15ec2e701")
    with pytest.raises(Exception, match="404|not found"):
        client.get_dataset("20.500.12269/no-such-dataset")


def test_scitacean_downloads_and_verifies_over_sftp(catalog_server, sftp_server, demo_catalog, tmp_path):
    def connect(host: str, port: int) -> paramiko.SFTPClient:
        ssh = paramiko.SSHClient()
        ssh.load_host_keys(str(sftp_server.known_hosts_path))
        ssh.set_missing_host_key_policy(paramiko.RejectPolicy())
        ssh.connect(host, port=port, username="scitacean", key_filename=str(sftp_server.client_key_path),
                    allow_agent=False, look_for_keys=False, timeout=10)
        return ssh.open_sftp()

    transfer = SFTPFileTransfer(host="127.0.0.1", port=sftp_server.port, connect=connect)
    client = scitacean_client(catalog_server, transfer)
    target = tmp_path / "download"
    for pid in (THAUM, OCTARINE):  # no checksums, then md5 checked by scitacean after download
        dataset = client.download_files(client.get_dataset(pid), target=target)
        for file in dataset.files:
            assert file.local_path.read_bytes() == demo_catalog.content(pid, file.remote_path.posix)


def test_sdk_models_accept_v4_dataset_and_blocks(sdk_http: httpx.Client):
    body = sdk_http.get(f"/api/v4/datasets/{quote(THAUM, safe='')}",
                        params={"include": "origdatablocks"}).json()
    dataset = validate(OutputDatasetDto, body)
    assert dataset.pid == THAUM and dataset.size == 95
    for block in body["origdatablocks"]:
        parsed = validate(OrigDatablock, block)
        assert parsed.dataset_id == THAUM
        for entry in block["dataFileList"]:
            validate(DataFile, entry)


def test_sdk_models_accept_every_fixture_everywhere(sdk_http: httpx.Client, demo_catalog: Catalog):
    ridcully = "Bearer " + sdk_http.post("/api/v3/auth/login", json={
        "username": "ridcully", "password": "wizzard"}).json()["id"]
    for pid in demo_catalog.pids():
        segment = quote(pid, safe="")
        response = sdk_http.get(f"/api/v4/datasets/{segment}?include=origdatablocks")
        if response.status_code == 403:
            response = sdk_http.get(f"/api/v4/datasets/{segment}?include=origdatablocks",
                                    headers={"Authorization": ridcully})
        validate(OutputDatasetDto, response.json())
        for block in response.json()["origdatablocks"]:
            validate(OrigDatablock, block)
    listed = sdk_http.get("/api/v4/datasets", params={"filter": json.dumps({"limits": {"limit": 100}})})
    assert len(listed.json()) == len(demo_catalog.pids()) - 1
    for item in listed.json():
        validate(OutputDatasetDto, item)
    for item in sdk_http.get("/api/v3/datasets").json():
        validate(OutputDatasetObsoleteDto, item)
    for block in sdk_http.get(f"/api/v3/datasets/{quote(OCTARINE, safe='')}/origdatablocks").json():
        validate(OrigDatablock, block)
    for block in sdk_http.get("/api/v4/origdatablocks", params={"filter": json.dumps(
            {"where": {"datasetId": OCTARINE}})}).json():
        validate(OrigDatablock, block)
    for route in ("/api/v4/datasets/count", "/api/v3/datasets/count", "/api/v4/datasets/public/count",
                  f"/api/v3/datasets/{quote(OCTARINE, safe='')}/origdatablocks/count"):
        validate(CountApiResponse, sdk_http.get(route).json())
    validate(HealthControllerCheckV3200Response, sdk_http.get("/api/v3/health").json())


def test_sdk_v3_obsolete_dataset(sdk_http: httpx.Client):
    body = sdk_http.get(f"/api/v3/datasets/{quote(THAUM, safe='')}").json()
    parsed = validate(OutputDatasetObsoleteDto, body)
    assert parsed.principal_investigator == "p.stibbons@uu.am"


def test_asyncssh_reads_flux_dat_with_host_key_verification(sftp_server: DemoSFTPServer):
    async def read(known_hosts: str) -> bytes:
        async with asyncssh.connect("127.0.0.1", sftp_server.port, username="anyone",
                                    client_keys=[str(sftp_server.client_key_path)],
                                    known_hosts=known_hosts, connect_timeout=10) as conn:
            async with conn.start_sftp_client() as sftp:
                async with sftp.open("/hex/ps/thaum/flux.dat", "rb") as remote:
                    return await remote.read()

    assert asyncio.run(asyncio.wait_for(read(str(sftp_server.known_hosts_path)), 20)) == \
        b"5 4 9 11 15 12 7 6 1"
    stranger = sftp_server.known_hosts_path.parent / "stranger_known_hosts"
    other_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    stranger.write_text(f"[127.0.0.1]:{sftp_server.port} {other_key}")
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        asyncio.run(asyncio.wait_for(read(str(stranger)), 20))


def test_sftp_server_is_read_only_and_chrooted(sftp_server: DemoSFTPServer):
    async def probe() -> list[str]:
        async with asyncssh.connect("127.0.0.1", sftp_server.port, username="demo",
                                    client_keys=[str(sftp_server.client_key_path)],
                                    known_hosts=str(sftp_server.known_hosts_path)) as conn:
            async with conn.start_sftp_client() as sftp:
                with pytest.raises(asyncssh.SFTPPermissionDenied):
                    async with sftp.open("/hex/new.txt", "wb"):
                        pass
                with pytest.raises(asyncssh.SFTPPermissionDenied):
                    await sftp.remove("/hex/ps/thaum/flux.dat")
                with pytest.raises(asyncssh.SFTPPermissionDenied):
                    await sftp.mkdir("/hex/dir")
                return sorted(await sftp.listdir("/../.."))

    assert asyncio.run(asyncio.wait_for(probe(), 20)) == [".", "..", "hex"]


def test_sftp_server_refuses_unknown_client_keys(sftp_server: DemoSFTPServer, tmp_path: Path):
    intruder = tmp_path / "intruder"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(intruder)

    async def attempt() -> None:
        async with asyncssh.connect("127.0.0.1", sftp_server.port, username="demo",
                                    client_keys=[str(intruder)], agent_path=None, password=None,
                                    known_hosts=str(sftp_server.known_hosts_path)):
            pass

    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(asyncio.wait_for(attempt(), 20))


def test_sftp_server_stop_removes_keys(tmp_path: Path):
    server = DemoSFTPServer(tmp_path).start()
    keydir = server.client_key_path.parent
    assert oct(server.client_key_path.stat().st_mode & 0o777) == "0o600"
    server.stop()
    assert not keydir.exists()
    with pytest.raises(FileNotFoundError):
        DemoSFTPServer(tmp_path / "missing").start()


def test_materialized_md5_matches_catalog(demo_catalog: Catalog, sftp_server: DemoSFTPServer):
    """The SFTP side serves what the catalog claims, down to the checksum."""
    async def fetch(path: str) -> bytes:
        async with asyncssh.connect("127.0.0.1", sftp_server.port, username="demo",
                                    client_keys=[str(sftp_server.client_key_path)],
                                    known_hosts=str(sftp_server.known_hosts_path)) as conn:
            async with conn.start_sftp_client() as sftp:
                async with sftp.open(path, "rb") as remote:
                    return await remote.read()

    entry = next(f for f in demo_catalog.files(OCTARINE) if f["path"].endswith("dark.bin"))
    data = asyncio.run(asyncio.wait_for(fetch("/hex/ps/octarine/" + entry["path"]), 20))
    assert hashlib.md5(data).hexdigest() == entry["chk"] and len(data) == entry["size"]
