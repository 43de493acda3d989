"""The demo catalog server over real HTTP: routes, access control, errors and knobs."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import select
import signal
import subprocess
import sys
import time
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote, quote_plus

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from scicatfs.catalog.jsdate import parse_js_date
from scicatfs.demo import jwt
from scicatfs.demo.fixtures import Catalog, hashlib_name, resolve_remote_path
from scicatfs.demo.routes import Api
from scicatfs.demo.server import CatalogServer
from tests.support.checklogs import LogChecker

THAUM = "20.500.12269/72fe3ff6-105b-4c7f-b9d0-073b67c90ec3"
OCTARINE = "20.500.12269/0b9a6b7e-3c61-4d8e-9f0e-5a1d2c3b4e5f"
BRIGHTNESS = "20.500.12269/BRIGHTNESS/V200053"
PUBLIC = "20.500.12269/c4d5e6f7-0000-4000-8000-5ca1ab1e0001"
PRIVATE = "20.500.12269/d3a4e5f6-0000-4000-8000-dea15ec2e701"
MISSING = "20.500.12269/00000000-0000-4000-8000-000000000000"


def seg(pid: str) -> str:
    """A PID as one URL path segment, the way scicatfs sends it."""
    return quote(pid, safe="")


def flt(**spec: object) -> dict[str, str]:
    return {"filter": json.dumps(spec)}


def nest(response: httpx.Response, status: int, message: str) -> None:
    assert response.status_code == status, response.text
    assert response.json() == {"statusCode": status, "message": message,
                               "error": response.reason_phrase}


def client(url: str) -> httpx.Client:
    """An HTTP client for the plain-http test server (verify=False skips building a
    CA bundle, which costs ~0.25 s per client and is useless without TLS)."""
    return httpx.Client(base_url=url, timeout=10, verify=False)


def record(pid: str, **fields: object) -> dict:
    return {"pid": pid, "datasetName": pid, "ownerGroup": "uu", "contactEmail": "a@uu.am",
            "sourceFolder": "/data/" + pid.replace("/", "_"),
            "creationTime": "2024-01-01T00:00:00.000Z", **fields}


@pytest.fixture
def http(catalog_server: CatalogServer):
    with client(catalog_server.url) as http_client:
        yield http_client


@pytest.fixture
def auth(catalog_server: CatalogServer) -> dict[str, str]:
    return {"Authorization": "Bearer " + catalog_server.issue_token("stibbons")}


def serve(make_catalog_server, catalog: Catalog, **kwargs) -> tuple[httpx.Client, dict[str, str]]:
    server = make_catalog_server(catalog, **kwargs)
    return client(server.url), {"Authorization": "Bearer " + server.issue_token("stibbons")}


def demo_users() -> Catalog:
    catalog = Catalog()
    catalog.add_user("stibbons", "demo", ["uu", "faculty"], "p.stibbons@uu.am")
    return catalog


# -- auth ---------------------------------------------------------------------------


def test_login_returns_signed_jwt_with_expiry(http, catalog_server):
    before = time.time()
    response = http.post("/api/v3/auth/login", json={"username": "stibbons", "password": "demo"})
    assert response.status_code == 201
    body = response.json()
    assert body["access_token"] == body["id"]
    assert body["expires_in"] == body["ttl"] == 3600
    assert body["user"]["username"] == "stibbons" and body["userId"] == body["user"]["_id"]
    payload = json.loads(base64.urlsafe_b64decode(body["id"].split(".")[1] + "=="))
    assert payload["username"] == "stibbons" and "groups" not in payload and "password" not in payload
    assert before + 3600 - 2 <= payload["exp"] <= time.time() + 3600 + 1
    whoami = http.get("/api/v3/auth/whoami", headers={"Authorization": f"Bearer {body['id']}"})
    assert whoami.status_code == 200 and whoami.json()["username"] == "stibbons"


@pytest.mark.parametrize("credentials", [{"username": "stibbons", "password": "wrong"},
                                         {"username": "nobody", "password": "demo"}, {}, []])
def test_bad_login_is_401(http, credentials):
    response = http.post("/api/v3/auth/login", json=credentials)
    assert response.status_code == 401
    assert response.json() == {"message": "Unauthorized", "statusCode": 401}  # Passport's body: no "error"


def test_login_with_malformed_body_is_400(http):
    response = http.post("/api/v3/auth/login", content=b"{username",
                         headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["statusCode"] == 400


def test_whoami_anonymous_is_200_with_empty_body_and_no_content_type(http, auth):
    response = http.get("/api/v3/auth/whoami")
    assert response.status_code == 200 and response.content == b""
    assert "content-type" not in response.headers and response.headers["content-length"] == "0"
    user = http.get("/api/v3/auth/whoami", headers=auth).json()
    assert set(user) == {"_id", "username", "email", "authStrategy", "currentGroups"}
    assert user["currentGroups"] == ["uu", "faculty"]


def test_health(http):
    assert http.get("/api/v3/health").json() == {
        "status": "ok", "info": {"mongodb": {"status": "up"}}, "error": {},
        "details": {"mongodb": {"status": "up"}}}


@pytest.mark.parametrize("token", ["expired", "forged", "garbage", "other-secret"])
def test_bad_token_means_anonymous_never_401(http, catalog_server, token):
    tokens = {
        "expired": catalog_server.issue_token("stibbons", lifetime=-10),
        "forged": catalog_server.issue_token("stibbons")[:-4] + "AAAA",
        "garbage": "not.a.jwt",
        "other-secret": jwt.encode({"username": "stibbons", "exp": time.time() + 60}, "other"),
    }
    headers = {"Authorization": f"Bearer {tokens[token]}"}
    nest(http.get(f"/api/v4/datasets/{seg(THAUM)}", headers=headers), 403, "Forbidden resource")
    nest(http.get(f"/api/v3/datasets/{seg(THAUM)}", headers=headers), 403, "Unauthorized access")
    assert http.get(f"/api/v3/datasets/{seg(PUBLIC)}", headers=headers).status_code == 200
    assert http.get("/api/v4/datasets", headers=headers).status_code == 403
    listed = http.get("/api/v3/datasets", headers=headers).json()
    assert [d["pid"] for d in listed] == [PUBLIC]
    assert http.get("/api/v3/auth/whoami", headers=headers).content == b""


def test_token_lifetime_and_secret_are_configurable(make_catalog_server):
    server = make_catalog_server(token_lifetime=5, jwt_secret="s3cret")
    token = server.issue_token("stibbons")
    payload = jwt.decode(token, "s3cret", now=time.time())
    assert payload is not None and payload["exp"] - payload["iat"] == 5


# -- one dataset ----------------------------------------------------------------------


def test_v4_dataset_with_origdatablocks(http, auth):
    response = http.get(f"/api/v4/datasets/{seg(THAUM)}", params={"include": "origdatablocks"},
                        headers=auth)
    assert response.status_code == 200
    body = response.json()
    assert body["pid"] == THAUM and body["datasetName"] == "Thaum flux"
    assert body["size"] == 95 and body["numberOfFiles"] == 2
    files = [f for block in body["origdatablocks"] for f in block["dataFileList"]]
    assert [(f["path"], f["size"]) for f in files] == [("flux.dat", 20), ("logs/measurement.log", 75)]
    assert all("chk" not in f for f in files)
    plain = http.get(f"/api/v4/datasets/{seg(THAUM)}", headers=auth).json()
    assert "origdatablocks" not in plain
    repeated = http.get(f"/api/v4/datasets/{seg(THAUM)}?include=samples&include=origdatablocks",
                        headers=auth).json()
    assert len(repeated["origdatablocks"]) == 1


def test_v4_dataset_errors(http, auth):
    nest(http.get(f"/api/v4/datasets/{seg(MISSING)}", headers=auth), 404, "dataset: null not found")
    nest(http.get(f"/api/v4/datasets/{seg(PRIVATE)}", headers=auth), 403, "Unauthorized access")
    for pid in (THAUM, MISSING, PUBLIC):
        nest(http.get(f"/api/v4/datasets/{seg(pid)}"), 403, "Forbidden resource")
    nest(http.get(f"/api/v4/datasets/{seg(THAUM)}", params={"include": "everything"}, headers=auth), 400,
         'Provided include field "everything" is not part of the dataset relations')


def test_other_user_sees_private_dataset(catalog_server, http):
    headers = {"Authorization": "Bearer " + catalog_server.issue_token("ridcully")}
    assert http.get(f"/api/v4/datasets/{seg(PRIVATE)}", headers=headers).status_code == 200
    nest(http.get(f"/api/v4/datasets/{seg(THAUM)}", headers=headers), 403, "Unauthorized access")


def test_v4_public_dataset(http):
    body = http.get(f"/api/v4/datasets/public/{seg(PUBLIC)}",
                    params={"include": "origdatablocks"}).json()
    assert body["pid"] == PUBLIC and body["origdatablocks"][0]["dataFileList"][0]["path"] == "census.csv"
    for pid in (MISSING, THAUM):
        response = http.get(f"/api/v4/datasets/public/{seg(pid)}")
        assert response.status_code == 200 and response.content == b""
        assert "content-type" not in response.headers


def test_v3_dataset_and_its_origdatablocks(http, auth):
    body = http.get(f"/api/v3/datasets/{seg(OCTARINE)}", headers=auth).json()
    assert body["principalInvestigator"] == "p.stibbons@uu.am" and body["history"] == []
    assert body["principalInvestigators"] == ["p.stibbons@uu.am"]  # the wire keeps the v4 plural too
    assert body["_id"] == OCTARINE
    assert body["scientificMetadata"]["sample name"] == "octarine crystal"
    assert "beam.energy" in body["scientificMetadata"]
    v4 = http.get(f"/api/v4/datasets/{seg(OCTARINE)}", headers=auth).json()
    assert "sample%20name" in v4["scientificMetadata"]
    blocks = http.get(f"/api/v3/datasets/{seg(OCTARINE)}/origdatablocks", headers=auth).json()
    assert blocks[0]["chkAlg"] == "md5" and len(blocks[0]["dataFileList"]) == 4
    fields = http.get(f"/api/v3/datasets/{seg(OCTARINE)}", params=flt(fields=["pid", "size"]),
                      headers=auth).json()
    assert fields == {"_id": OCTARINE, "pid": OCTARINE, "size": body["size"]}


def test_v3_dataset_errors(http, auth):
    nest(http.get(f"/api/v3/datasets/{seg(MISSING)}", headers=auth), 404, f"dataset: {MISSING} not found")
    nest(http.get(f"/api/v3/datasets/{seg(PRIVATE)}", headers=auth), 403, "Unauthorized access")
    nest(http.get(f"/api/v3/datasets/{seg(THAUM)}"), 403, "Unauthorized access")
    nest(http.get(f"/api/v3/datasets/{seg(MISSING)}/origdatablocks", headers=auth), 404,
         f"dataset: {MISSING} not found")
    nest(http.get(f"/api/v3/datasets/{seg(PRIVATE)}/origdatablocks", headers=auth), 403,
         "Unauthorized access")
    assert http.get(f"/api/v3/datasets/{seg(PUBLIC)}").json()["pid"] == PUBLIC


def test_pid_with_several_slashes_and_a_space(make_catalog_server):
    pid = "20.500.12269/BRIGHT NESS/V 200053+1"
    catalog = demo_users()
    catalog.add_dataset(record(pid), [{"path": "a.dat", "size": 3}])
    http, auth = serve(make_catalog_server, catalog)
    with http:
        body = http.get(f"/api/v4/datasets/{seg(pid)}", headers=auth).json()
        assert body["pid"] == pid
        assert http.get(f"/api/v3/datasets/{seg(pid)}", headers=auth).json()["pid"] == pid
        # quote_plus turns the space into "+", which Express leaves alone in paths.
        nest(http.get(f"/api/v4/datasets/{quote_plus(pid)}", headers=auth), 404, "dataset: null not found")
        raw = "/api/v3/datasets/" + pid.replace(" ", "%20")
        nest(http.get(raw, headers=auth), 404, f"Cannot GET {raw}")


def test_bad_pid_encoding_is_400(http, auth):
    for bad in ("%E0%A4%A", "abc%ZZ", "%C3%28"):
        response = http.get(f"/api/v3/datasets/{bad}", headers=auth)
        assert response.status_code == 400, bad
        assert response.json()["error"] == "Bad Request"


def test_routes_are_case_insensitive_pids_are_not(http, auth):
    assert http.get(f"/API/V4/Datasets/{seg(THAUM)}", headers=auth).status_code == 200
    assert http.get(f"/api/v3/DATASETS/{seg(THAUM)}/OrigDatablocks", headers=auth).status_code == 200
    assert http.get(f"/api/v4/datasets/{seg(THAUM.upper())}", headers=auth).status_code == 404


def test_unknown_route_is_nest_404(http):
    nest(http.get("/api/v3/nothing"), 404, "Cannot GET /api/v3/nothing")
    nest(http.get("/api/v3/nothing?filter=%7B%7D"), 404, "Cannot GET /api/v3/nothing?filter=%7B%7D")
    nest(http.delete(f"/api/v3/datasets/{seg(THAUM)}"), 404, f"Cannot DELETE /api/v3/datasets/{seg(THAUM)}")


def test_v3_caps_origdatablocks_at_100_v4_does_not(make_catalog_server):
    pid = "cap/150-blocks"
    catalog = demo_users()
    catalog.add_dataset(record(pid), [{"path": f"f{i:04}", "size": 1} for i in range(300)], blocks=150)
    http, auth = serve(make_catalog_server, catalog)
    with http:
        assert len(http.get(f"/api/v3/datasets/{seg(pid)}/origdatablocks", headers=auth).json()) == 100
        v4 = http.get(f"/api/v4/datasets/{seg(pid)}?include=origdatablocks", headers=auth).json()
        assert len(v4["origdatablocks"]) == 150
        assert v4["numberOfFiles"] == 300 and v4["size"] == 300
        rest = http.get("/api/v3/origdatablocks", headers=auth,
                        params=flt(where={"datasetId": pid}, limits={"skip": 100, "limit": 1000})).json()
        assert len(rest) == 50
        default = http.get("/api/v3/origdatablocks", headers=auth, params=flt(where={"datasetId": pid}))
        assert len(default.json()) == 100
        counted = http.get(f"/api/v3/datasets/{seg(pid)}/origdatablocks/count", headers=auth)
        assert counted.json() == {"count": 150}


def test_v3_include_gives_every_block_also_to_anonymous_callers(make_catalog_server):
    pid = "pub/150-blocks"
    catalog = demo_users()
    catalog.add_dataset(record(pid, isPublished=True), [{"path": f"f{i:04}", "size": 1} for i in range(150)],
                        blocks=150)
    http, _ = serve(make_catalog_server, catalog)
    with http:
        for spec in ({"include": ["origdatablocks"]}, {"include": [{"relation": "origdatablocks"}]},
                     {"include": ["all"]}):
            body = http.get(f"/api/v3/datasets/{seg(pid)}", params=flt(**spec)).json()
            assert len(body["origdatablocks"]) == 150, spec
        listed = http.get("/api/v3/datasets", params=flt(include=["origdatablocks"])).json()
        assert len(listed[0]["origdatablocks"]) == 150
        assert "origdatablocks" not in http.get(f"/api/v3/datasets/{seg(pid)}").json()
        assert http.get(f"/api/v3/datasets/{seg(pid)}/origdatablocks/count").json() == {"count": 150}
        nest(http.get("/api/v3/origdatablocks", params=flt(where={"datasetId": pid})), 403, "Forbidden resource")
        nest(http.get(f"/api/v3/datasets/{seg(pid)}", params=flt(include=["nonsense"])), 400,
             'Provided include field "nonsense" is not part of the dataset relations')
        nest(http.get(f"/api/v3/datasets/{seg('no/such')}/origdatablocks/count"), 404,
             "dataset: no/such not found")


def test_v4_filters_blocks_by_their_own_access_fields_v3_does_not(make_catalog_server):
    hidden = "shared/hidden-blocks"
    catalog = demo_users()
    catalog.add_dataset(record(hidden, isPublished=True), [{"path": "b", "size": 1}],
                        block_access={"ownerGroup": "other", "isPublished": False})
    http, auth = serve(make_catalog_server, catalog)
    with http:
        anonymous = http.get(f"/api/v4/datasets/public/{seg(hidden)}?include=origdatablocks")
        assert anonymous.json()["origdatablocks"] == []
        assert anonymous.json()["numberOfFiles"] == 1
        user = http.get(f"/api/v4/datasets/{seg(hidden)}?include=origdatablocks", headers=auth)
        assert user.json()["origdatablocks"] == []
        assert http.get("/api/v4/origdatablocks/public/files", params=flt(where={"datasetId": hidden})).json() == []
        # v3 checks the dataset's access only, then hands out every block
        for headers in ({}, auth):
            blocks = http.get(f"/api/v3/datasets/{seg(hidden)}/origdatablocks", headers=headers).json()
            assert [f["path"] for b in blocks for f in b["dataFileList"]] == ["b"]
            included = http.get(f"/api/v3/datasets/{seg(hidden)}", headers=headers,
                                params=flt(include=["origdatablocks"])).json()
            assert included["origdatablocks"] == blocks


# -- lists and counts ----------------------------------------------------------------


@pytest.fixture
def many(make_catalog_server):
    """25 datasets: 15 owned by uu, 10 published by another group."""
    catalog = demo_users()
    for i in range(25):
        fields = {"ownerGroup": "uu"} if i < 15 else {"ownerGroup": "ext", "isPublished": True}
        catalog.add_dataset(record(f"list/{i:02}", datasetName=f"Run {i}", **fields), [])
    http, auth = serve(make_catalog_server, catalog)
    with http:
        yield http, auth


def pids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["pid"] for item in response.json()]


def test_v4_list_defaults_to_10_newest(many):
    http, auth = many
    assert pids(http.get("/api/v4/datasets", headers=auth)) == [f"list/{i:02}" for i in range(24, 14, -1)]


def test_v4_list_filter(many):
    http, auth = many
    page = http.get("/api/v4/datasets", headers=auth, params=flt(
        where={"pid": {"$regex": "^LIST/0", "$options": "i"}}, fields=["pid"],
        limits={"limit": 3, "skip": 2, "sort": {"pid": "asc"}}))
    assert page.json() == [{"_id": f"list/0{i}", "pid": f"list/0{i}"} for i in (2, 3, 4)]
    chosen = http.get("/api/v4/datasets", headers=auth, params=flt(
        where={"$or": [{"pid": {"$in": ["list/01", "list/20"]}}, {"datasetName": "Run 7"}]},
        limits={"limit": 100, "sort": {"pid": "desc"}}))
    assert pids(chosen) == ["list/20", "list/07", "list/01"]
    both = http.get("/api/v4/datasets", headers=auth, params=flt(
        where={"$and": [{"pid": {"$regex": "^list/1"}}, {"ownerGroup": "uu"}]}, limits={"limit": 100}))
    assert sorted(pids(both)) == [f"list/{i}" for i in range(10, 15)]


def test_v4_count(many):
    http, auth = many
    assert http.get("/api/v4/datasets/count", headers=auth).json() == {"count": 25}
    count = http.get("/api/v4/datasets/count", headers=auth,
                     params=flt(where={"pid": {"$regex": "^list/0"}}))
    assert count.json() == {"count": 10}
    nest(http.get("/api/v4/datasets/count", headers=auth, params=flt(limits={"limit": 1})), 400,
         "Property limits.limit should not exist in the filter object")  # as a live backend says


def test_v4_lists_forbid_anonymous_public_lists_do_not(many):
    http, _ = many
    nest(http.get("/api/v4/datasets"), 403, "Forbidden resource")
    nest(http.get("/api/v4/datasets/count"), 403, "Forbidden resource")
    assert len(pids(http.get("/api/v4/datasets/public", params=flt(limits={"limit": 100})))) == 10
    assert http.get("/api/v4/datasets/public/count").json() == {"count": 10}


@pytest.mark.parametrize("spec, message", [
    ({"foo": 1}, "Property foo should not exist in the filter object"),
    ({"limits": {"order": "pid:asc"}}, "Property limits.order should not exist in the filter object"),
])
def test_v4_unknown_filter_keys_are_400(many, spec, message):
    http, auth = many
    nest(http.get("/api/v4/datasets", headers=auth, params=flt(**spec)), 400, message)


@pytest.mark.parametrize("raw", ["{bad json", "[1, 2]", '{"where": {"pid": {"$regex": "("}}}',
                                 '{"where": {"pid": {"$nope": 1}}}', '{"limits": {"limit": -1}}',
                                 '{"where": {"pid": {"$in": "x"}}}'])
def test_malformed_filters_are_400_everywhere(many, raw):
    http, auth = many
    for route in ("/api/v4/datasets", "/api/v3/datasets", "/api/v3/datasets/count",
                  "/api/v3/origdatablocks", "/api/v4/origdatablocks", "/api/v4/origdatablocks/files",
                  "/api/v4/origdatablocks/public/files"):
        response = http.get(route, headers=auth, params={"filter": raw})
        if route.endswith("count") and "limits" in raw:
            continue  # v3 count reads only `where`
        assert response.status_code == 400, (route, response.text)
        assert response.json()["statusCode"] == 400


def test_v3_list(many):
    http, auth = many
    assert len(pids(http.get("/api/v3/datasets", headers=auth))) == 25
    assert pids(http.get("/api/v3/datasets")) == [f"list/{i}" for i in range(15, 25)]
    page = http.get("/api/v3/datasets", headers=auth, params=flt(
        where={"pid": {"inq": ["list/03", "list/09", "list/11"]}}, fields=["pid", "datasetName"],
        limits={"order": "pid:desc", "limit": 2, "skip": 0}))
    assert page.json() == [{"_id": "list/11", "pid": "list/11", "datasetName": "Run 11"},
                           {"_id": "list/09", "pid": "list/09", "datasetName": "Run 9"}]
    assert http.get("/api/v3/datasets/count", headers=auth).json() == {"count": 25}
    assert http.get("/api/v3/datasets/count").json() == {"count": 10}


def test_v3_list_default_limit_is_100(make_catalog_server):
    catalog = demo_users()
    for i in range(120):
        catalog.add_dataset(record(f"v3/{i:03}"), [])
    http, auth = serve(make_catalog_server, catalog)
    with http:
        assert len(pids(http.get("/api/v3/datasets", headers=auth))) == 100
        rest = http.get("/api/v3/datasets", headers=auth, params=flt(limits={"skip": 100}))
        assert pids(rest) == [f"v3/{i}" for i in range(100, 120)]


def test_lists_project_before_they_sort(many):
    """A sort key that `fields` leaves out sorts nothing: rows come in insertion order."""
    http, auth = many
    projected = http.get("/api/v4/datasets", headers=auth, params=flt(fields=["pid"], limits={"limit": 3}))
    assert pids(projected) == ["list/00", "list/01", "list/02"]
    kept = http.get("/api/v4/datasets", headers=auth,
                    params=flt(fields=["pid", "createdAt"], limits={"limit": 3}))
    assert pids(kept) == ["list/24", "list/23", "list/22"]
    v3 = http.get("/api/v3/datasets", headers=auth,
                  params=flt(fields=["datasetName"], limits={"order": "pid:desc", "limit": 2}))
    assert [row["_id"] for row in v3.json()] == ["list/00", "list/01"]


@pytest.fixture
def mixed(make_catalog_server):
    """Datasets whose PIDs v3 turns into Dates ("12345", "noprefix-1") beside ordinary ones."""
    catalog = demo_users()
    catalog.add_dataset(record("10.5072/run 1", creationTime="2024-03-01T10:00:00.000Z"), [])
    catalog.add_dataset(record("12345", creationTime="2024-04-01T00:00:00.000Z"), [])
    catalog.add_dataset(record("20.500.12269/a", creationTime="2024-05-01T00:00:00.000Z"), [])
    catalog.add_dataset(record("noprefix-1", creationTime="2024-06-01T00:00:00.000Z"), [])
    http, auth = serve(make_catalog_server, catalog)
    with http:
        yield http, auth


@pytest.mark.parametrize("spec, expected", [
    # observed on a live scicat-backend-next (docs/scicat-facts.md "Filters on a live backend")
    ({"where": {"pid": {"$gt": "10", "$lt": "2"}}}, ["10.5072/run 1", "12345"]),
    ({"where": {"$or": [{"pid": {"gt": "10"}}]}}, []),              # arrays escape the whitelist: a literal
    ({"where": {"creationTime": {"$gte": "2024-04-01T00:00:00.000Z"}}}, []),  # strings stay strings
    ({"where": {"pid": {"$regex": "^1", "$options": "i"}}}, ["10.5072/run 1", "12345"]),
    ({"where": {"pid": {"$in": ["12345"]}}, "limits": {"pid": 1}}, ["12345"]),  # any allowed name, anywhere
    ({"foo": {}, "bar": None}, ["10.5072/run 1", "12345", "20.500.12269/a", "noprefix-1"]),  # no leaf
    ({"limits": {"sort": {"pid": 1}}}, ["noprefix-1", "20.500.12269/a", "12345", "10.5072/run 1"]),
    ({"limits": {"sort": {"pid": "ascending"}}}, ["noprefix-1", "20.500.12269/a", "12345", "10.5072/run 1"]),
])
def test_v4_where_goes_to_mongodb_as_sent(mixed, spec, expected):
    """Mongo operators only, no conversion; every sort direction but "asc" sorts descending."""
    http, auth = mixed
    spec = {"fields": ["pid"], "limits": {"sort": {"pid": "asc"}}} | spec
    assert pids(http.get("/api/v4/datasets", headers=auth, params=flt(**spec))) == expected


@pytest.mark.parametrize("spec, message", [
    ({"where": {"pid": {"gt": "1"}}}, "Property where.pid.gt should not exist in the filter object"),
    ({"where": {"$expr": {"$gt": ["$pid", "1"]}}}, "Property where.$expr.$gt should not exist in the filter object"),
    ({"where": {"scientificMetadata": {"a": {"gt": 1}}, "x": {"y": 1}}},
     "Property where.x.y should not exist in the filter object"),
])
def test_v4_whitelist_refuses_loopback_and_expr(mixed, spec, message):
    http, auth = mixed
    for route in ("/api/v4/datasets", "/api/v4/datasets/public"):
        nest(http.get(route, headers=auth, params=flt(**spec)), 400, message)
    nest(http.get("/api/v4/datasets/count", headers=auth, params=flt(fields=["pid"])), 400,
         "Property fields should not exist in the filter object")


@pytest.mark.parametrize("where, expected", [
    ({"pid": {"gt": "10", "lt": "2"}}, []),                         # "10" is a Date (2001-10-01)
    ({"pid": {"inq": ["12345", "noprefix-1"]}}, ["12345", "noprefix-1"]),
    ({"$expr": {"$and": [{"$gt": ["$pid", "10"]}, {"$lt": ["$pid", "2"]}]}}, ["10.5072/run 1", "12345"]),
    ({"pid": {"neq": "12345"}}, []),                                # not renamed: a literal sub-document
    ({"pid": {"ilike": "^NOPREFIX"}}, ["noprefix-1"]),
    ({"or": [{"pid": {"inq": ["12345"]}}, {"and": [{"pid": {"like": "^20"}}]}]}, ["12345", "20.500.12269/a"]),
])
def test_v3_where_renames_loopback_operators_and_nothing_else(mixed, where, expected):
    http, auth = mixed
    spec = {"where": where, "fields": ["pid"], "limits": {"order": "pid:asc"}}
    assert pids(http.get("/api/v3/datasets", headers=auth, params=flt(**spec))) == expected


@pytest.mark.parametrize("where, expected", [
    ({"pid": "noprefix-1"}, []),                                    # a Date equals no string
    ({"pid": {"inq": ["noprefix-1"]}}, ["noprefix-1"]),             # array items stay strings
    ({"pid": {"like": "^(?:noprefix\\-1)"}}, ["noprefix-1"]),       # the wrapped pattern is no date
    ({"pid": "20.500.12269/run-1"}, ["20.500.12269/run-1"]),        # real PIDs do not parse
    ({"or": [{"pid": "noprefix-1"}, {"datasetName": "Thaum"}]}, ["20.500.12269/run-1"]),
    ({"creationTime": {"gt": "2024-01-01"}}, ["noprefix-1"]),       # dates still compare as dates
    ({"creationTime": {"lt": "March 2024"}}, ["20.500.12269/run-1"]),
])
def test_v3_where_turns_date_like_strings_into_dates(make_catalog_server, where, expected):
    catalog = demo_users()
    catalog.add_dataset(record("20.500.12269/run-1", datasetName="Thaum"), [])
    catalog.add_dataset(record("noprefix-1", creationTime="2024-06-01T00:00:00.000Z"), [])
    http, auth = serve(make_catalog_server, catalog)
    with http:
        assert pids(http.get("/api/v3/datasets", headers=auth, params=flt(where=where))) == expected
        counted = http.get("/api/v3/datasets/count", headers=auth, params=flt(where=where)).json()
        assert counted == {"count": len(expected)}
        if where == {"pid": "noprefix-1"}:  # v4 and v3 /origdatablocks do not convert
            assert pids(http.get("/api/v4/datasets", headers=auth, params=flt(where=where))) == ["noprefix-1"]
            blocks = http.get("/api/v3/origdatablocks", headers=auth, params=flt(where={"datasetId": "noprefix-1"}))
            assert [b["datasetId"] for b in blocks.json()] == ["noprefix-1"]


@pytest.mark.parametrize("text, iso", [
    # seen as Dates by node 20 against the live backend
    ("noprefix-1", "2001-01-01T00:00:00"), ("run 1", "2001-01-01T00:00:00"),
    ("abc 2024", "2024-01-01T00:00:00"), ("x-12", "2001-12-01T00:00:00"), ("Tue 5", "2001-05-01T00:00:00"),
    ("-1", "2001-01-01T00:00:00"), ("^noprefix\\-1/", "2001-01-01T00:00:00"),
    # JavaScript's well-known forms
    ("2024-01-01", "2024-01-01T00:00:00"), ("2024-02-29T10:00:00.5+01:00", "2024-02-29T09:00:00.500000"),
    ("Tue Mar 05 2024 10:00:00 GMT+0100", "2024-03-05T09:00:00"), ("March 7, 2024 3:04 pm", "2024-03-07T15:04:00"),
    ("1/2", "2001-01-02T00:00:00"), ("32", "2032-01-01T00:00:00"), ("2024-01-01 10:00", "2024-01-01T10:00:00"),
    # not dates: PIDs, wrapped patterns, garbage glued to numbers, out of range parts
    ("^(?:noprefix\\-1)", None), ("20.500.12269/72fe3ff6-105b-4c7f-b9d0-073b67c90ec3", None),
    ("20.500.12269/BRIGHTNESS/", None), ("Thaum flux", None), ("abc2024", None), ("2024abc", None),
    ("x-13", None), ("2024-13-01", None), ("12:30", None), ("March", None), ("", None), ("1 2 3 4", None),
])
def test_parse_js_date(text, iso):
    epoch_ms = parse_js_date(text)
    if iso is None:
        assert epoch_ms is None
    else:
        assert epoch_ms is not None
        assert datetime.fromtimestamp(epoch_ms / 1000, timezone.utc).replace(tzinfo=None).isoformat() == iso


@given(st.text(alphabet=st.sampled_from("0123456789 -+:./()TZaAmMpPrRgGtT,^\\"), max_size=30) | st.text(max_size=30))
def test_parse_js_date_never_fails_on_any_text(text):
    epoch_ms = parse_js_date(text)
    assert epoch_ms is None or abs(epoch_ms) <= 8.64e15


def test_v3_like_pattern_that_parses_as_a_date_is_400(make_catalog_server):
    catalog = demo_users()
    catalog.add_dataset(record("noprefix-1/a"), [])
    http, auth = serve(make_catalog_server, catalog)
    with http:
        response = http.get("/api/v3/datasets", headers=auth,
                            params=flt(where={"pid": {"like": "^noprefix\\-1/"}}))
        nest(response, 400, "$regex has to be a string")
        v4 = http.get("/api/v4/datasets", headers=auth, params=flt(where={"pid": {"$regex": "^noprefix\\-1/"}}))
        assert pids(v4) == ["noprefix-1/a"]


# -- file rows ------------------------------------------------------------------------


def test_origdatablock_files_pages_one_row_per_file(make_catalog_server):
    pid = "big/20000-files"
    catalog = demo_users()
    files = [{"path": f"d{i % 7}/f{i:05}.dat", "size": i} for i in range(20_000)]
    catalog.add_dataset(record(pid), files, blocks=150)
    catalog.add_dataset(record("big/other"), [{"path": "x", "size": 1}])
    http, auth = serve(make_catalog_server, catalog)
    with http:
        seen = []
        for skip in range(0, 20_000, 5000):
            rows = http.get("/api/v4/origdatablocks/files", headers=auth, params=flt(
                where={"datasetId": pid}, limits={"limit": 5000, "skip": skip})).json()
            assert all(row["datasetId"] == pid and row["datasetExist"] is True for row in rows)
            seen += [row["dataFileList"]["path"] for row in rows]
        assert seen == [f["path"] for f in files]
        nest(http.get("/api/v4/origdatablocks/files"), 403, "Forbidden resource")
        nest(http.get("/api/v4/origdatablocks"), 403, "Forbidden resource")


def test_origdatablock_routes_default_to_the_10_newest_blocks(make_catalog_server):
    pid = "blocks/12"
    catalog = demo_users()
    catalog.add_dataset(record(pid, isPublished=True), [{"path": f"b{i:02}/f", "size": i} for i in range(12)],
                        blocks=12)
    http, auth = serve(make_catalog_server, catalog)
    with http:
        where = flt(where={"datasetId": pid})
        rows = http.get("/api/v4/origdatablocks/files", headers=auth, params=where).json()
        assert [row["dataFileList"]["path"] for row in rows] == [f"b{i:02}/f" for i in range(11, 1, -1)]
        assert len({row["dataFileList"]["_id"] for row in rows}) == 10  # every file has its own _id
        blocks = http.get("/api/v4/origdatablocks", headers=auth, params=where).json()
        assert [b["dataFileList"][0]["path"] for b in blocks] == [f"b{i:02}/f" for i in range(11, 1, -1)]
        public = http.get("/api/v4/origdatablocks/public", params=where).json()
        assert public == blocks
        public_rows = http.get("/api/v4/origdatablocks/public/files", params=where).json()
        assert [r["dataFileList"]["path"] for r in public_rows] == [r["dataFileList"]["path"] for r in rows]
        in_order = http.get("/api/v4/origdatablocks/files", headers=auth,
                            params=flt(where={"datasetId": pid}, limits={"limit": 3}))
        assert [row["dataFileList"]["path"] for row in in_order.json()] == ["b00/f", "b01/f", "b02/f"]


def test_origdatablock_files_match_blocks_then_unwind_then_sort(make_catalog_server):
    """`where` selects blocks (a condition on one file selects its whole block), `fields`
    projects blocks (keeping `_id`), then rows are unwound and sorted."""
    pid = "blocks/two"
    catalog = demo_users()
    catalog.add_dataset(record(pid), [{"path": p, "size": n} for p, n in (("a", 1), ("b", 5), ("c", 3))],
                        blocks=2)
    catalog.add_dataset(record("blocks/other"), [{"path": "b", "size": 9}])
    http, auth = serve(make_catalog_server, catalog)
    with http:
        rows = http.get("/api/v4/origdatablocks/files", headers=auth, params=flt(
            where={"datasetId": pid, "dataFileList.path": "b"}, fields=["dataFileList"],
            limits={"sort": {"dataFileList.size": "desc"}})).json()
        assert [(r["dataFileList"]["path"], r["dataFileList"]["size"]) for r in rows] == [("b", 5), ("a", 1)]
        assert all(set(r) == {"_id", "dataFileList", "datasetExist"} for r in rows)
        assert all(r["datasetExist"] is False for r in rows)  # datasetId was projected away
        no_files = http.get("/api/v4/origdatablocks/files", headers=auth,
                            params=flt(where={"datasetId": pid}, fields=["size"]))
        assert no_files.json() == []


def test_fullfacet_counts_as_backend_next_does(make_catalog_server):
    """As observed on a live backend: a logged-in caller's facets count its groups' datasets only
    (published ones of other groups need fields={"isPublished": true}); arrays are unwound; a
    facet on a field outside the schema is absent; anonymous callers get 403 on v4 and
    published datasets on v3."""
    catalog = demo_users()
    catalog.add_dataset(record("f/mine", proposalIds=["p1", "p2"]), [])
    catalog.add_dataset(record("f/shared", ownerGroup="other", accessGroups=["faculty"], proposalIds=["p1"]), [])
    catalog.add_dataset(record("f/published", ownerGroup="other", isPublished=True, proposalIds=["p3"]), [])
    catalog.add_dataset(record("f/hidden", ownerGroup="other", proposalIds=["p4"]), [])
    catalog.add_dataset(record("f/none"), [])
    http, auth = serve(make_catalog_server, catalog)

    def facet(version: str, fields: dict, headers: dict | None = None) -> httpx.Response:
        params = {"facets": json.dumps(["proposalIds", "ownerGroup", "proposalId"]), "fields": json.dumps(fields)}
        return http.get(f"/api/{version}/datasets/fullfacet", params=params, headers=headers or {})

    with http:
        [mine] = facet("v4", {}, auth).json()
        assert mine == {"proposalIds": [{"_id": "p2", "count": 1}, {"_id": "p1", "count": 2}],
                        "ownerGroup": [{"_id": "uu", "count": 2}, {"_id": "other", "count": 1}],
                        "all": [{"totalSets": 3}]}
        [published] = facet("v4", {"isPublished": True}, auth).json()
        assert published["proposalIds"] == [{"_id": "p3", "count": 1}] and published["all"] == [{"totalSets": 1}]
        assert facet("v4", {}).status_code == 403
        [anonymous] = facet("v3", {}).json()
        assert anonymous == published
        [filtered] = facet("v4", {"ownerGroup": "uu"}, auth).json()
        assert filtered["proposalIds"] == [{"_id": "p2", "count": 1}, {"_id": "p1", "count": 1}]
        assert filtered["ownerGroup"] == [{"_id": "uu", "count": 2}]  # every key of fields is a $match first
        assert facet("v4", [], auth).status_code == 400  # type: ignore[arg-type]


# -- knobs -------------------------------------------------------------------------


def test_latency_knob(catalog_server, http):
    catalog_server.latency = 0.3
    started = time.monotonic()
    assert http.get("/api/v3/health").status_code == 200
    assert time.monotonic() - started >= 0.3


def test_failure_rate_knob(catalog_server, http, auth):
    catalog_server.failure_rate = 1.0
    nest(http.get(f"/api/v4/datasets/{seg(THAUM)}", headers=auth), 503, "Service Unavailable")
    assert http.get("/api/v3/health").status_code == 200
    catalog_server.failure_rate = 0.5
    statuses = [http.get(f"/api/v3/datasets/{seg(PUBLIC)}").status_code for _ in range(60)]
    assert set(statuses) == {200, 503}


def test_malformed_knob(catalog_server, http, auth):
    catalog_server.malformed = True
    response = http.get(f"/api/v4/datasets/{seg(THAUM)}", headers=auth)
    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()
    assert http.get("/api/v3/health").json()["status"] == "ok"


def test_request_log(catalog_server, http, auth):
    catalog_server.reset_requests()
    http.get(f"/api/v4/datasets/{seg(THAUM)}?include=origdatablocks", headers=auth)
    http.get("/api/v3/nothing")
    assert catalog_server.requests == [
        ("GET", f"/api/v4/datasets/{seg(THAUM)}?include=origdatablocks", 200),
        ("GET", "/api/v3/nothing", 404)]
    catalog_server.reset_requests()
    assert catalog_server.requests == []


@pytest.mark.allow_log(r"ERROR scicatfs\.demo\.server: catalog server: GET /api/v3/datasets/\S+ failed\nTraceback(.|\n)*RuntimeError: boom")
def test_handler_exception_is_logged_500(catalog_server, http, monkeypatch, caplog):
    def explode(self, request):
        raise RuntimeError("boom")

    monkeypatch.setattr(Api, "v3_dataset", explode)
    with caplog.at_level(logging.ERROR, logger="scicatfs.demo.server"):
        nest(http.get(f"/api/v3/datasets/{seg(THAUM)}"), 500, "Internal server error")
    assert "boom" in caplog.text
    assert http.get("/api/v3/health").status_code == 200  # the connection and server survive


def test_stop_drops_keepalive_connections_and_restart_reuses_the_port(demo_catalog):
    server = CatalogServer(demo_catalog).start()
    port = server.port
    try:
        with client(server.url) as http:
            assert http.get("/api/v3/health").status_code == 200  # a kept-alive connection
            server.stop()
            server.stop()
            with pytest.raises(httpx.TransportError):
                http.get("/api/v3/health")
            with pytest.raises(RuntimeError, match="not running"):
                server.port
            server.start()
            assert server.port == port
            assert http.get("/api/v3/health").status_code == 200
    finally:
        server.stop()


# -- fixtures ------------------------------------------------------------------------


def test_thaum_flux_fixture_is_scitaceans(demo_catalog):
    assert demo_catalog.content(THAUM, "flux.dat") == b"5 4 9 11 15 12 7 6 1"
    log = demo_catalog.content(THAUM, "logs/measurement.log")
    assert len(log) == 75 and log.startswith(b"INFO Starting measurement")
    thaum = demo_catalog.dataset(THAUM)
    assert thaum["scientificMetadata"] == {"data_type": "histogram",
                                           "temperature": {"value": "123", "unit": "K"}}
    assert (thaum["ownerGroup"], thaum["accessGroups"], thaum["sourceFolder"]) == (
        "uu", ["faculty"], "/hex/ps/thaum")


def test_materialized_files_match_catalog_sizes_and_checksums(demo_catalog, tmp_path):
    demo_catalog.materialize(tmp_path)
    algorithms = set()
    for pid in demo_catalog.pids():
        record_ = demo_catalog.dataset(pid)
        for block in demo_catalog.origdatablocks(pid):
            for entry in block["dataFileList"]:
                on_disk = tmp_path / record_["sourceFolder"].lstrip("/") / entry["path"]
                data = on_disk.read_bytes()
                assert len(data) == entry["size"] and data == demo_catalog.content(pid, entry["path"])
                if "chk" in entry:
                    algorithms.add(block["chkAlg"])
                    assert hashlib.new(hashlib_name(block["chkAlg"]), data).hexdigest() == entry["chk"]
    assert algorithms == {"md5", "sha256", "sha2"}
    assert (tmp_path / "hex/ps/frames/frame_big.raw").stat().st_size == 9 * 2**20 + 1


def test_hostile_and_wrong_entries(tmp_path):
    catalog = demo_users()
    files = [{"path": p, "size": 4} for p in ("../x", "/etc/passwd", "a\0b", "", "a/../../y",
                                              "/data/src/abs.dat", "ok.dat")]
    files.append({"path": "bad.dat", "size": 4, "chk": "0" * 32})
    catalog.add_dataset(record("hostile", sourceFolder="/data/src"), files, chk_alg="md5",
                        contents={"ok.dat": b"good"})
    root = tmp_path / "root"
    root.mkdir()
    root.chmod(0o755)
    catalog.materialize(root)
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert written == ["data/src/abs.dat", "data/src/bad.dat", "data/src/ok.dat"]
    assert root.stat().st_mode & 0o777 == 0o755
    entries = {f["path"]: f for f in catalog.files("hostile")}
    assert entries["ok.dat"]["chk"] == hashlib.md5(b"good").hexdigest()
    assert entries["bad.dat"]["chk"] == "0" * 32
    assert "chk" not in entries["../x"]
    with pytest.raises(KeyError):
        catalog.content("hostile", "../x")


@pytest.mark.parametrize("path, expected", [
    ("a/b", "/src/a/b"), ("/src/a", "/src/a"), ("./a", "/src/a"), ("a/../b", "/src/b"),
    ("../x", None), ("/src", None), ("/srcx/a", None), ("/etc/passwd", None), ("a\0", None), ("", None),
])
def test_resolve_remote_path(path, expected):
    assert resolve_remote_path("/src/", path) == expected


def test_hundred_thousand_files_hold_no_contents():
    catalog = demo_users()
    tracemalloc.start()
    try:
        catalog.add_dataset(record("huge"), [{"path": f"f{i}", "size": 10_000} for i in range(100_000)],
                            blocks=40)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 150 * 2**20  # 100k x 10 kB of contents would be 1 GB
    assert len(catalog.content("huge", "f99999")) == 10_000
    assert catalog.content("huge", "f5") == catalog.content("huge", "f5")
    assert catalog.dataset("huge")["numberOfFiles"] == 100_000


def test_duplicate_pid_and_zero_blocks_are_refused():
    catalog = demo_users()
    catalog.add_dataset(record("dup"), [])
    with pytest.raises(ValueError, match="duplicate"):
        catalog.add_dataset(record("dup"), [])
    with pytest.raises(ValueError, match="origdatablock"):
        catalog.add_dataset(record("none"), [], blocks=0)
    with pytest.raises(ValueError, match="string 'pid'"):
        catalog.add_dataset({"pid": 7}, [])
    assert catalog.pids() == ["dup"]


def test_malformed_entries_are_served_as_given_but_have_no_content(make_catalog_server, tmp_path):
    catalog = demo_users()
    catalog.add_dataset(record("odd", sourceFolder="/odd"), [
        {"path": "text-size", "size": "12"}, {"path": "negative", "size": -1},
        {"size": 3}, {"path": "bad-time", "size": 2, "time": "yesterday"}, {"path": "fine", "size": 2}])
    catalog.add_dataset(record("odd/folder", sourceFolder=["not", "a", "string"]), [{"path": "a", "size": 1}])
    catalog.materialize(tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["bad-time", "fine"]
    for pid, path in (("odd", "text-size"), ("odd", "negative"), ("odd/folder", "a")):
        with pytest.raises(KeyError):
            catalog.content(pid, path)
    http, auth = serve(make_catalog_server, catalog)
    with http:
        body = http.get(f"/api/v4/datasets/{seg('odd')}?include=origdatablocks", headers=auth).json()
        assert [f["size"] for f in body["origdatablocks"][0]["dataFileList"]] == ["12", -1, 3, 2, 2]
        assert http.get(f"/api/v3/datasets/{seg('odd/folder')}", headers=auth).json()["sourceFolder"] == [
            "not", "a", "string"]


def test_default_catalog_loads_from_package(demo_catalog):
    expected = {THAUM, OCTARINE, BRIGHTNESS, PUBLIC, PRIVATE, "thaumometer-frames-0042"}
    assert expected <= set(demo_catalog.pids())
    assert set(demo_catalog.users) == {"stibbons", "ridcully"}
    assert Path(__file__).parent.parent.joinpath("scicatfs/demo/catalog.json").is_file()


def test_module_runs_a_server_for_curl(catalog_server, log_checker: LogChecker):
    command = [sys.executable, "-m", "scicatfs.demo.server", "--port", "0"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "the server printed nothing within 20 s"
        banner = proc.stdout.readline()
        url = re.search(r"(http://127\.0\.0\.1:\d+)/api/v3", banner).group(1)
        with client(url) as http:
            login = http.post("/api/v3/auth/login", json={"username": "stibbons", "password": "demo"})
            token = login.json()["id"]
            body = http.get(f"/api/v4/datasets/{seg(THAUM)}?include=origdatablocks",
                            headers={"Authorization": f"Bearer {token}"}).json()
        paths = [f["path"] for f in body["origdatablocks"][0]["dataFileList"]]
        assert paths == ["flux.dat", "logs/measurement.log"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    busy = subprocess.run([*command[:-1], str(catalog_server.port)], capture_output=True, text=True,
                          timeout=30)
    assert busy.returncode == 1
    assert f"cannot listen on 127.0.0.1:{catalog_server.port}" in busy.stderr
    log_checker.check_output(busy.stderr, "stderr")
