"""Route handlers of the demo catalog server: what each SciCat route answers.

Each handler takes a parsed `Request` and returns a `Reply`; HTTP plumbing,
routing and fault injection live in `server.py`. The semantics follow
scicat-backend-next as DESIGN.md "Facts about SciCat" and docs/scicat-facts.md
record them:

    GET  /api/v3/health                          {"status": "ok", "info": {"mongodb": ...}, ...}
    POST /api/v3/auth/login                      201 login DTO with a signed JWT; 401 on bad credentials
    GET  /api/v3/auth/whoami                     the user; 200 with an empty body when anonymous
    GET  /api/v3/datasets[/count]                filter: where (LoopBack or Mongo; date-like strings
                                                 become Dates), fields, include,
                                                 limits {limit (100), skip, order "f:asc"}
    GET  /api/v3/datasets/fullfacet              facets=[...]&fields={...} (see facets.py); anonymous
                                                 callers get published datasets only
    GET  /api/v3/datasets/{pid}                  404 "dataset: <pid> not found" / 403 "Unauthorized access";
                                                 filter {"include": ["origdatablocks"]} adds every block
    GET  /api/v3/datasets/{pid}/origdatablocks   same checks; at most 100 blocks
    GET  /api/v3/datasets/{pid}/origdatablocks/count
    GET  /api/v3/origdatablocks                  filter: where, limits {limit (100), skip}; anonymous 403
    GET  /api/v4/datasets[/count]                whitelisted filter (Mongo operators only, strings
                                                 unconverted), limits {limit (10), skip, sort
                                                 "asc" or else descending}; anonymous 403
    GET  /api/v4/datasets/fullfacet              the same; a caller's groups unless fields has
                                                 isPublished; anonymous 403
    GET  /api/v4/datasets/{pid}?include=...      404 "dataset: null not found" / 403; anonymous 403
    GET  /api/v4/datasets/public[/count|/{pid}]  published data only; a missing PID is 200 + empty body
    GET  /api/v4/origdatablocks[/files]          blocks, or one row per file; anonymous 403
    GET  /api/v4/origdatablocks/public[/files]   the same for published blocks, anonymous allowed

v3 checks the dataset's access only and returns all of its blocks; v4 also
filters blocks by their own ownerGroup / accessGroups / isPublished /
sharedWith. Lists project (`fields`) before they sort, as the backend's
aggregation pipeline does.

Lists sorted by PID ascending are answered as MongoDB answers them from the
PID index: a walk from the lower bound of the `where` clause's PID range
(`filters.key_range`) to its upper bound, matching the rest of the clause on
the way, so a range page costs O(log n + limit) and a `skip` page
O(skip + limit). `CatalogServer.range_filters = False` makes the list routes
refuse comparison operators, as a server that does not take them would.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from http import HTTPStatus
from itertools import islice
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from scicatfs.demo import filters
from scicatfs.demo.facets import full_facet
from scicatfs.demo.filters import FilterError
from scicatfs.demo.fixtures import Catalog, User

if TYPE_CHECKING:
    from scicatfs.demo.server import CatalogServer

__all__ = ["Api", "Reply", "Request", "nest_error"]

_V4_LIMIT_KEYS = ("limit", "skip", "sort")
_V4_BLOCK_KEYS = ("where", "fields", "limits")
#: What the v4 block routes use when the filter has no `limits` at all.
_V4_BLOCK_LIMITS = {"limit": 10, "skip": 0, "sort": {"createdAt": "desc"}}
_INCLUDABLE = ("instruments", "proposals", "origdatablocks", "datablocks", "attachments", "samples", "all")
_V3_BLOCK_CAP = 100
#: v4 names -> the singular v3 names the obsolete view adds (it keeps the plural ones too).
_V3_SINGULARS = (("principalInvestigators", "principalInvestigator"), ("proposalIds", "proposalId"),
                 ("sampleIds", "sampleId"), ("instrumentIds", "instrumentId"))


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
    body: Any = None                 # JSON-serialisable; None = empty body (sent without Content-Type)
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
    """The v3 ("obsolete") view of a dataset: legacy singular fields added, metadata keys decoded.

    The backend spreads the stored document and then sets the singulars from
    the first item of each plural, so the wire carries both (the OpenAPI DTO
    lists only the singulars).
    """
    out = {"_id": record["pid"], **record}
    for plural, singular in _V3_SINGULARS:
        values = out.get(plural)
        if values:
            out[singular] = values[0]
    if "scientificMetadata" in record:
        out["scientificMetadata"] = _decode_keys(record["scientificMetadata"])
    return out


def _check_includes(names: Iterable[Any]) -> set[str]:
    """The relation names, or the backend's 400 for the first it does not know."""
    found = set()
    for name in names:
        relation = name.get("relation") if isinstance(name, dict) else name
        if relation not in _INCLUDABLE:
            raise FilterError(f"Provided include field {json.dumps(relation)} is not part of the dataset relations")
        found.add(relation)
    return found


def _filter_includes(value: Any) -> set[str]:
    """The ``include`` of a JSON filter: an array of relation names (or {"relation": ...})."""
    if not isinstance(value, list):
        raise FilterError("include must be an array")
    return _check_includes(value)


def _keeps_pid(fields: Any) -> bool:
    """Whether a projection keeps `pid` (the backend projects before it sorts)."""
    return not fields or (isinstance(fields, list) and "pid" in fields)


def _wants_blocks(includes: set[str]) -> bool:
    return "origdatablocks" in includes or "all" in includes


def _file_rows(blocks: Iterable[dict[str, Any]], skip: int = 0) -> Iterator[dict[str, Any]]:
    """MongoDB's `$unwind` of `dataFileList`, from row `skip` on, skipping whole blocks cheaply.

    A block without a file list gives no rows, as `$unwind` drops it; every
    file gets the `_id` MongoDB gives subdocuments.
    """
    for block in blocks:
        entries = block.get("dataFileList")
        if not isinstance(entries, list):
            continue
        if skip >= len(entries):
            skip -= len(entries)
            continue
        for index in range(skip, len(entries)):
            entry = entries[index]
            if isinstance(entry, dict):
                entry = {"_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{block['_id']}/{index}")), **entry}
            yield {**block, "dataFileList": entry}
        skip = 0


class Api:
    """The handlers; one instance per server, sharing its catalog and token issuer."""

    def __init__(self, catalog: Catalog, server: CatalogServer) -> None:
        self.catalog = catalog
        self.server = server

    # -- helpers -------------------------------------------------------------------

    def _visible(self, user: User | None) -> Iterator[dict[str, Any]]:
        return (record for record in self.catalog.datasets() if _can_read(user, record))

    def _selected(self, user: User | None, where: Any) -> Iterator[dict[str, Any]]:
        """The visible records that match `where`, in PID order, walked along the PID index."""
        self._check_ranges(where)
        keys = filters.key_range(where, "pid")
        for pid in self.catalog.pids_from(keys.low, inclusive=keys.low_inclusive):
            if not keys.below_high(pid):
                return
            record = self.catalog.dataset(pid)
            if record is not None and _can_read(user, record) and filters.matches(record, where):
                yield record

    def _count(self, user: User | None, where: Any) -> int:
        """How many visible records match `where`; without a clause, generated runs count as a whole."""
        if where:
            return sum(1 for _ in self._selected(user, where))
        explicit = sum(1 for record in self.catalog.explicit_datasets() if _can_read(user, record))
        return explicit + sum(count for access, count in self.catalog.generated_runs() if _can_read(user, access))

    def _check_ranges(self, where: Any) -> None:
        if self.server.range_filters:
            return
        refused = next((op for op in filters.operators_in(where) if op in filters.RANGE_OPERATORS), None)
        if refused is not None:
            raise FilterError(f"Property where.pid.{refused} should not exist in the filter object")

    def _listed(self, user: User | None, where: Any, by_pid: bool,
                order: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
                skip: int, limit: int) -> list[dict[str, Any]]:
        """Page `skip // limit` of the matches: along the PID index when sorted by PID, else sorted in full."""
        if by_pid:
            return list(islice(self._selected(user, where), skip, skip + limit))
        self._check_ranges(where)
        return order([r for r in self._visible(user) if filters.matches(r, where)])[skip:skip + limit]

    def _blocks(self, pid: str, user: User | None) -> list[dict[str, Any]]:
        """The blocks a v4 caller sees: filtered by their own access fields."""
        return [block for block in self.catalog.origdatablocks(pid) if _can_read(user, block)]

    def _includes(self, request: Request) -> set[str]:
        names = [part.strip() for value in request.query.get("include", [])
                 for part in value.split(",") if part.strip()]
        return _check_includes(names)

    def _v4_record(self, record: dict[str, Any], includes: set[str], user: User | None) -> dict[str, Any]:
        out = {"_id": record["pid"], **record}
        if _wants_blocks(includes):
            out["origdatablocks"] = self._blocks(record["pid"], user)
        return out

    def _v3_view(self, record: dict[str, Any], includes: set[str]) -> dict[str, Any]:
        """The v3 record; an included `origdatablocks` holds every block, uncapped and unfiltered."""
        out = _v3_record(record)
        if _wants_blocks(includes):
            out["origdatablocks"] = list(self.catalog.origdatablocks(record["pid"]))
        return out

    # -- auth and health -----------------------------------------------------------

    def health(self, request: Request) -> Reply:
        status = {"mongodb": {"status": "up"}}
        return Reply(200, {"status": "ok", "info": status, "error": {}, "details": status})

    def login(self, request: Request) -> Reply:
        try:
            credentials = json.loads(request.body or b"{}")
        except ValueError:
            return nest_error(400, "Unexpected token in JSON body")
        user = self.catalog.users.get(str(credentials.get("username"))) if isinstance(credentials, dict) else None
        if user is None or credentials.get("password") != user.password:
            return Reply(401, {"message": "Unauthorized", "statusCode": 401})  # Passport's body: no "error"
        token = self.server.issue_token(user.username)
        lifetime = self.server.token_lifetime
        created = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return Reply(201, {"access_token": token, "id": token, "expires_in": lifetime,
                           "ttl": lifetime, "created": created, "userId": user.id,
                           "user": user.profile()})

    def whoami(self, request: Request) -> Reply:
        if request.user is None:
            return Reply(200)
        profile = {key: value for key, value in request.user.profile().items() if key != "id"}
        return Reply(200, profile | {"currentGroups": list(request.user.groups)})

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
        out = self._v3_view(record, _filter_includes(spec.get("include", [])))
        if spec.get("fields"):
            return Reply(200, filters.project(out, spec["fields"]))
        return Reply(200, out | {"history": []})

    def v3_dataset_blocks(self, request: Request) -> Reply:
        record, error = self._v3_check(request)
        if error:
            return error
        return Reply(200, self.catalog.origdatablocks(record["pid"])[:_V3_BLOCK_CAP])

    def v3_dataset_block_count(self, request: Request) -> Reply:
        record, error = self._v3_check(request)
        if error:
            return error
        return Reply(200, {"count": len(self.catalog.origdatablocks(record["pid"]))})

    def v3_datasets(self, request: Request) -> Reply:
        spec = filters.parse_filter(request.param("filter"))
        where = filters.v3_where(spec.get("where", {}))
        includes = _filter_includes(spec.get("include", []))
        fields = spec.get("fields")
        limits = spec.get("limits")
        skip, limit = filters.limits(limits, default_limit=100)
        order = limits.get("order") if isinstance(limits, dict) else None
        by_pid = isinstance(order, str) and order.replace(" ", "") in ("pid", "pid:asc") and _keeps_pid(fields)
        page = self._listed(request.user, where, by_pid,
                            lambda records: records if order is None else filters.sort_v3(records, order, fields),
                            skip, limit)
        return Reply(200, [filters.project(self._v3_view(r, includes), fields) for r in page])

    def v3_count(self, request: Request) -> Reply:
        spec = filters.parse_filter(request.param("filter"))
        return Reply(200, {"count": self._count(request.user, filters.v3_where(spec.get("where", {})))})

    def _fullfacet(self, request: Request) -> Reply:
        """Both versions' ``fullfacet``: the caller's groups are added to ``fields`` unless it
        asks for published datasets (so published datasets of other groups are not counted),
        and an anonymous caller gets ``isPublished`` (the v4 route refuses it first)."""
        try:
            fields = json.loads(request.param("fields") or "{}")
            facets = json.loads(request.param("facets") or "[]")
        except ValueError as exc:
            raise FilterError(f"Invalid JSON: {exc}") from None
        if not isinstance(fields, dict):
            raise FilterError("fields must be a JSON object")
        if not fields.get("isPublished"):
            if request.user is None:
                fields["isPublished"] = True
            else:
                fields["userGroups"] = [*(fields.get("userGroups") or []), *request.user.groups]
        return Reply(200, full_facet(self.catalog.datasets(), fields, facets))

    def v3_fullfacet(self, request: Request) -> Reply:
        return self._fullfacet(request)

    def v3_origdatablocks(self, request: Request) -> Reply:
        if request.user is None:
            return nest_error(403, "Forbidden resource")
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

    def v4_fullfacet(self, request: Request) -> Reply:
        if request.user is None:
            return nest_error(403, "Forbidden resource")
        return self._fullfacet(request)

    def v4_public_dataset(self, request: Request) -> Reply:
        includes = self._includes(request)
        record = self.catalog.dataset(request.pid or "")
        if record is None or not record.get("isPublished"):
            return Reply(200)
        return Reply(200, self._v4_record(record, includes, None))

    def _v4_list(self, request: Request, user: User | None) -> Reply:
        spec = filters.parse_filter(request.param("filter"))
        filters.check_v4_filter(spec, ("where", "include", "fields", "limits"))
        limits = spec.get("limits")
        skip, limit = filters.limits(limits, default_limit=10)
        sort = {"createdAt": "desc"}
        if isinstance(limits, dict):
            sort = limits.get("sort", sort)
        where = spec.get("where", {})
        fields = spec.get("fields")
        by_pid = sort == {"pid": "asc"} and _keeps_pid(fields)
        records = self._listed(user, where, by_pid, lambda found: filters.sort_v4(found, sort, fields), skip, limit)
        includes = _filter_includes(spec.get("include") or [])
        page = [self._v4_record(r, includes, user) for r in records]
        return Reply(200, [filters.project(r, fields) for r in page])

    def _v4_count(self, request: Request, user: User | None) -> Reply:
        spec = filters.parse_filter(request.param("filter"))
        filters.check_v4_filter(spec, ("where",))
        return Reply(200, {"count": self._count(user, spec.get("where", {}))})

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

    def _v4_blocks(self, request: Request, *, public: bool, unwind: bool) -> Reply:
        """The v4 block routes: match, project, (unwind one row per file), sort, skip, limit.

        A filter without `limits` gets the 10 newest blocks or rows. Rows are
        only built for the requested page unless a sort key lies inside
        `dataFileList`, so paging through 100,000 files stays cheap.
        """
        if not public and request.user is None:
            return nest_error(403, "Forbidden resource")
        spec = filters.parse_filter(request.param("filter"))
        filters.reject_unknown_keys(spec, _V4_BLOCK_KEYS)
        limits = spec.get("limits", _V4_BLOCK_LIMITS)
        if isinstance(limits, dict):
            filters.reject_unknown_keys(limits, _V4_LIMIT_KEYS, prefix="limits.")
        skip, limit = filters.limits(limits, default_limit=10)
        sort = limits.get("sort") if isinstance(limits, dict) else None
        where = spec.get("where", {})
        if not isinstance(where, dict):
            raise FilterError("where must be an object")
        if public:
            where = {**where, "isPublished": True}
        fields = spec.get("fields")
        blocks = [filters.project(block, fields) for block in self.catalog.all_origdatablocks()
                  if (public or _can_read(request.user, block)) and filters.matches(block, where)]
        if not unwind:
            if sort:
                blocks = filters.sort_v4(blocks, sort, fields)
            return Reply(200, blocks[skip:skip + limit])
        for block in blocks:
            block["datasetExist"] = self.catalog.dataset(str(block.get("datasetId"))) is not None
        if isinstance(sort, dict) and any(key.startswith("dataFileList") for key in sort):
            rows = filters.sort_v4(list(_file_rows(blocks)), sort, fields)
            return Reply(200, rows[skip:skip + limit])
        if sort:
            blocks = filters.sort_v4(blocks, sort, fields)  # rows of one block share its sort keys
        return Reply(200, list(islice(_file_rows(blocks, skip), limit)))

    def v4_origdatablocks(self, request: Request) -> Reply:
        return self._v4_blocks(request, public=False, unwind=False)

    def v4_origdatablock_files(self, request: Request) -> Reply:
        return self._v4_blocks(request, public=False, unwind=True)

    def v4_public_origdatablocks(self, request: Request) -> Reply:
        return self._v4_blocks(request, public=True, unwind=False)

    def v4_public_origdatablock_files(self, request: Request) -> Reply:
        return self._v4_blocks(request, public=True, unwind=True)
