"""Route handlers of the demo catalog server: what each SciCat route answers.

Each handler takes a parsed `Request` and returns a `Reply`; HTTP plumbing,
routing and fault injection live in `server.py`. The semantics follow
scicat-backend-next as DESIGN.md "Facts about SciCat" records them:

    GET  /api/v3/health                          {"status": "ok", ...}
    POST /api/v3/auth/login                      201 login DTO with a signed JWT; 401 on bad credentials
    GET  /api/v3/auth/whoami                     the user; 200 with an empty body when anonymous
    GET  /api/v3/datasets[/count]                filter: where (LoopBack or Mongo), fields,
                                                 limits {limit (100), skip, order "f:asc"}
    GET  /api/v3/datasets/{pid}                  404 "dataset: <pid> not found" / 403 "Unauthorized access"
    GET  /api/v3/datasets/{pid}/origdatablocks   same checks; at most 100 blocks
    GET  /api/v3/origdatablocks                  filter: where, limits {limit (100), skip}
    GET  /api/v4/datasets[/count]                whitelisted filter, limits {limit (10), skip, sort};
                                                 403 "Forbidden resource" for anonymous callers
    GET  /api/v4/datasets/{pid}?include=...      404 "dataset: null not found" / 403; anonymous 403
    GET  /api/v4/datasets/public[/count|/{pid}]  published data only; a missing PID is 200 + empty body
    GET  /api/v4/origdatablocks/files            one row per file, paged; anonymous 403

Datasets and origdatablocks are filtered by their own ownerGroup / accessGroups /
isPublished / sharedWith against the caller's groups.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from scicatfs.demo import filters
from scicatfs.demo.filters import FilterError
from scicatfs.demo.fixtures import Catalog, User

if TYPE_CHECKING:
    from scicatfs.demo.server import CatalogServer

__all__ = ["Api", "Reply", "Request", "nest_error"]

_V4_LIST_KEYS = ("where", "fields", "include", "limits")
_V4_LIMIT_KEYS = ("limit", "skip", "sort")
_INCLUDABLE = ("instruments", "proposals", "origdatablocks", "datablocks", "attachments", "samples", "all")
_V3_BLOCK_CAP = 100


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    pid: str | None                  # the decoded {pid} segment, if the route has one
    query: dict[str, list[str]]
    user: User | None                # None = anonymous (also for bad or expired tokens)
    body: bytes

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: Any = None                 # JSON-serialisable; None = empty body
    raw: bool = False                # body is already bytes

    def encode(self) -> bytes:
        if self.raw:
            return self.body
        return b"" if self.body is None else json.dumps(self.body).encode()


def nest_error(status: int, message: str) -> Reply:
    """An error in NestJS's shape: {"statusCode", "message", "error"}."""
    return Reply(status, {"statusCode": status, "message": message,
                          "error": HTTPStatus(status).phrase})


def _can_read(user: User | None, doc: dict[str, Any]) -> bool:
    """SciCat's read rule for a dataset or an origdatablock."""
    if doc.get("isPublished"):
        return True
    if user is None:
        return False
    groups = set(user.groups)
    return (doc.get("ownerGroup") in groups or bool(groups & set(doc.get("accessGroups") or []))
            or user.email in (doc.get("sharedWith") or []))


def _decode_key(key: str) -> str:
    return unquote(key.replace("%2E", ".").replace("%2e", "."))


def _decode_keys(value: Any) -> Any:
    """scientificMetadata keys as v3 returns them (stored URL-encoded since backend PR #2092)."""
    if isinstance(value, dict):
        return {_decode_key(k): _decode_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_keys(item) for item in value]
    return value


def _v3_record(record: dict[str, Any]) -> dict[str, Any]:
    """The v3 ("obsolete") view of a dataset: singular legacy fields, decoded metadata keys.

    The plural v4 fields are replaced by their singular v3 names, the shape of
    OutputDatasetObsoleteDto in the server's OpenAPI document.
    """
    out = dict(record)
    for plural, singular in (("principalInvestigators", "principalInvestigator"),
                             ("proposalIds", "proposalId"), ("sampleIds", "sampleId"),
                             ("instrumentIds", "instrumentId")):
        values = out.pop(plural, None)
        if values:
            out[singular] = values[0]
    if "scientificMetadata" in record:
        out["scientificMetadata"] = _decode_keys(record["scientificMetadata"])
    return out


class Api:
    """The handlers; one instance per server, sharing its catalog and token issuer."""

    def __init__(self, catalog: Catalog, server: CatalogServer) -> None:
        self.catalog = catalog
        self.server = server

    # -- helpers -------------------------------------------------------------------

    def _visible(self, user: User | None) -> Iterator[dict[str, Any]]:
        return (record for record in self.catalog.datasets() if _can_read(user, record))

    def _blocks(self, pid: str, user: User | None) -> list[dict[str, Any]]:
        return [block for block in self.catalog.origdatablocks(pid) if _can_read(user, block)]

    def _includes(self, request: Request) -> set[str]:
        names: set[str] = set()
        for value in request.query.get("include", []):
            names.update(part.strip() for part in value.split(",") if part.strip())
        unknown = names - set(_INCLUDABLE)
        if unknown:
            raise FilterError(f"include must be one of {', '.join(_INCLUDABLE)}")
        return names

    def _v4_record(self, record: dict[str, Any], includes: set[str] | list,
                   user: User | None) -> dict[str, Any]:
        out = {"_id": record["pid"], **record}
        if "origdatablocks" in includes or "all" in includes:
            out["origdatablocks"] = self._blocks(record["pid"], user)
        return out

    # -- auth and health -----------------------------------------------------------

    def health(self, request: Request) -> Reply:
        return Reply(200, {"status": "ok", "info": {}, "error": {}, "details": {}})

    def login(self, request: Request) -> Reply:
        try:
            credentials = json.loads(request.body or b"{}")
        except ValueError:
            return nest_error(400, "Unexpected token in JSON body")
        if not isinstance(credentials, dict):
            return nest_error(401, "Unauthorized")
        user = self.catalog.users.get(str(credentials.get("username")))
        if user is None or credentials.get("password") != user.password:
            return nest_error(401, "Unauthorized")
        token = self.server.issue_token(user.username)
        lifetime = self.server.token_lifetime
        created = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return Reply(201, {"access_token": token, "id": token, "expires_in": lifetime,
                           "ttl": lifetime, "created": created, "userId": user.id,
                           "user": user.profile()})

    def whoami(self, request: Request) -> Reply:
        if request.user is None:
            return Reply(200)
        return Reply(200, request.user.profile() | {"currentGroups": list(request.user.groups)})

    # -- v3 ----------------------------------------------------------------------

    def _v3_check(self, request: Request) -> tuple[dict[str, Any] | None, Reply | None]:
        record = self.catalog.dataset(request.pid or "")
        if record is None:
            return None, nest_error(404, f"dataset: {request.pid} not found")
        if not _can_read(request.user, record):
            return None, nest_error(403, "Unauthorized access")
        return record, None

    def v3_dataset(self, request: Request) -> Reply:
        record, error = self._v3_check(request)
        if error:
            return error
        spec = filters.parse_filter(request.param("filter"))
        out = _v3_record(record)
        if spec.get("fields"):
            return Reply(200, filters.project(out, spec["fields"]))
        return Reply(200, out | {"history": []})

    def v3_dataset_blocks(self, request: Request) -> Reply:
        record, error = self._v3_check(request)
        if error:
            return error
        return Reply(200, self._blocks(record["pid"], request.user)[:_V3_BLOCK_CAP])

    def _v3_selected(self, request: Request) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        spec = filters.parse_filter(request.param("filter"))
        where = spec.get("where", {})
        return [r for r in self._visible(request.user) if filters.matches(r, where)], spec

    def v3_datasets(self, request: Request) -> Reply:
        records, spec = self._v3_selected(request)
        limits = spec.get("limits")
        skip, limit = filters.limits(limits, default_limit=100)
        if isinstance(limits, dict) and "order" in limits:
            records = filters.sort_v3(records, limits["order"])
        page = records[skip:skip + limit]
        return Reply(200, [filters.project(_v3_record(r), spec.get("fields")) for r in page])

    def v3_count(self, request: Request) -> Reply:
        records, _ = self._v3_selected(request)
        return Reply(200, {"count": len(records)})

    def v3_origdatablocks(self, request: Request) -> Reply:
        spec = filters.parse_filter(request.param("filter"))
        where = spec.get("where", {})
        skip, limit = filters.limits(spec.get("limits"), default_limit=100)
        blocks = [b for b in self.catalog.all_origdatablocks()
                  if _can_read(request.user, b) and filters.matches(b, where)]
        return Reply(200, blocks[skip:skip + limit])

    # -- v4 ----------------------------------------------------------------------

    def v4_dataset(self, request: Request) -> Reply:
        if request.user is None:
            return nest_error(403, "Forbidden resource")
        includes = self._includes(request)
        record = self.catalog.dataset(request.pid or "")
        if record is None:
            return nest_error(404, "dataset: null not found")
        if not _can_read(request.user, record):
            return nest_error(403, "Unauthorized access")
        return Reply(200, self._v4_record(record, includes, request.user))

    def v4_public_dataset(self, request: Request) -> Reply:
        includes = self._includes(request)
        record = self.catalog.dataset(request.pid or "")
        if record is None or not record.get("isPublished"):
            return Reply(200)
        return Reply(200, self._v4_record(record, includes, None))

    def _v4_list(self, request: Request, user: User | None) -> Reply:
        spec = filters.parse_filter(request.param("filter"))
        filters.reject_unknown_keys(spec, _V4_LIST_KEYS)
        limits = spec.get("limits")
        if isinstance(limits, dict):
            filters.reject_unknown_keys(limits, _V4_LIMIT_KEYS, prefix="limits.")
        skip, limit = filters.limits(limits, default_limit=10)
        sort = {"createdAt": "desc"}
        if isinstance(limits, dict):
            sort = limits.get("sort", sort)
        where = spec.get("where", {})
        records = filters.sort_v4([r for r in self._visible(user) if filters.matches(r, where)], sort)
        includes = spec.get("include") or []
        if not isinstance(includes, list):
            raise FilterError("include must be an array")
        page = [self._v4_record(r, includes, user) for r in records[skip:skip + limit]]
        return Reply(200, [filters.project(r, spec.get("fields")) for r in page])

    def _v4_count(self, request: Request, user: User | None) -> Reply:
        spec = filters.parse_filter(request.param("filter"))
        filters.reject_unknown_keys(spec, ("where",))
        where = spec.get("where", {})
        return Reply(200, {"count": sum(1 for r in self._visible(user) if filters.matches(r, where))})

    def v4_datasets(self, request: Request) -> Reply:
        if request.user is None:
            return nest_error(403, "Forbidden resource")
        return self._v4_list(request, request.user)

    def v4_count(self, request: Request) -> Reply:
        if request.user is None:
            return nest_error(403, "Forbidden resource")
        return self._v4_count(request, request.user)

    def v4_public_datasets(self, request: Request) -> Reply:
        return self._v4_list(request, None)

    def v4_public_count(self, request: Request) -> Reply:
        return self._v4_count(request, None)

    def v4_origdatablock_files(self, request: Request) -> Reply:
        """One row per file: the block's fields with `dataFileList` replaced by that file.

        Rows are only built for the requested page unless a sort or a condition on
        `dataFileList` needs every row, so paging through 100,000 files stays cheap.
        """
        if request.user is None:
            return nest_error(403, "Forbidden resource")
        spec = filters.parse_filter(request.param("filter"))
        filters.reject_unknown_keys(spec, ("where", "fields", "limits"))
        limits = spec.get("limits")
        if isinstance(limits, dict):
            filters.reject_unknown_keys(limits, _V4_LIMIT_KEYS, prefix="limits.")
        skip, limit = filters.limits(limits, default_limit=10)
        where = spec.get("where", {})
        if not isinstance(where, dict):
            raise FilterError("where must be an object")
        block_where = {k: v for k, v in where.items() if not k.startswith("dataFileList")}
        file_where = {k: v for k, v in where.items() if k.startswith("dataFileList")}
        sort = limits.get("sort") if isinstance(limits, dict) else None
        blocks = [b for b in self.catalog.all_origdatablocks()
                  if _can_read(request.user, b) and filters.matches(b, block_where)]

        def rows(block: dict[str, Any]) -> Iterator[dict[str, Any]]:
            for data_file in block["dataFileList"]:
                yield {**block, "dataFileList": data_file}

        if sort or file_where:
            selected = [row for b in blocks for row in rows(b) if filters.matches(row, file_where)]
            if sort:
                selected = filters.sort_v4(selected, sort)
            page = selected[skip:skip + limit]
        else:
            page = []
            for block in blocks:
                count = len(block["dataFileList"])
                if skip >= count:
                    skip -= count
                    continue
                for data_file in block["dataFileList"][skip:skip + limit - len(page)]:
                    page.append({**block, "dataFileList": data_file})
                skip = 0
                if len(page) >= limit:
                    break
        return Reply(200, [filters.project(row, spec.get("fields")) for row in page])
