"""The SciCat client the filesystem uses: datasets, listings, prefixes, counts.

Routes follow scicat-backend-next (docs/scicat-facts.md). v4 is preferred
(one request gives a dataset with all its origdatablocks); a server whose v4
routes do not exist (Nest answers 404 "Cannot GET /api/v4/…", unlike a missing
dataset's "dataset: … not found") is detected on the first such answer, and
the client uses v3 for the rest of its life. On v3 a dataset also comes in one
request, with ``include`` (all blocks, anonymous too); only a server that
ignores ``include`` costs the capped block route and, past its 100 blocks,
paging. Anonymous callers use v4's ``/public`` routes, where a missing dataset
is a 200 with an empty body.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote, urlsplit

import trio

from scicatfs.catalog.auth import Credentials, Secret, TokenKeeper
from scicatfs.catalog.errors import (
    AuthenticationError,
    BadResponse,
    CatalogUnavailable,
    DatasetForbidden,
    DatasetNotFound,
)
from scicatfs.catalog.jsdate import parse_js_date
from scicatfs.catalog.models import Dataset, parse_dataset, parse_size, parse_time
from scicatfs.catalog.paging import Child, Pager, PidRange, RangeRefused, RecentTimes
from scicatfs.catalog.singleflight import SingleFlightCache
from scicatfs.catalog.transport import Reply, Transport

log = logging.getLogger(__name__)

T = TypeVar("T")

#: backend-next's v3 ``/datasets/{pid}/origdatablocks`` never returns more blocks than this.
V3_BLOCK_CAP = 100
#: Records up to this many bytes of JSON (a few dozen files, well under a
#: millisecond of parsing) are parsed on the event loop; bigger ones in a thread.
INLINE_PARSE_BYTES = 16 * 1024
_REGEX_SPECIAL = frozenset("\\^$.|?*+()[]{}")


@dataclass(frozen=True, slots=True)
class CatalogSettings:
    """How to reach the catalog, and how patient and how cache-happy to be."""

    url: str
    credentials: Credentials = field(default_factory=Credentials)
    record_ttl: float = 60.0
    listing_ttl: float = 30.0
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    retries: int = 3
    retry_backoff: float = 0.5
    max_requests: int = 8
    page_size: int = 1000

    def __post_init__(self) -> None:
        positive = {
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
            "max_requests": self.max_requests,
            "page_size": self.page_size,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"catalog setting {name} must be positive, got {value!r}")
        for name, value in {"record_ttl": self.record_ttl, "listing_ttl": self.listing_ttl,
                            "retries": self.retries, "retry_backoff": self.retry_backoff}.items():
            if not value >= 0:
                raise ValueError(f"catalog setting {name} must not be negative, got {value!r}")


@dataclass(frozen=True, slots=True)
class ListedDataset:
    """One row of a filtered dataset list: just what a link to the dataset needs."""

    pid: str
    name: str | None
    created: float | None


@dataclass(frozen=True, slots=True)
class Selection:
    """Datasets to list: a ``where`` clause in each API's language, an order, a cap.

    ``v3_where`` is None when the selection cannot be said in v3's filter
    language (saved queries are written for v4); ``sort`` is v4's
    ``{"field": "asc"|"desc"}``; ``limit`` caps the number of datasets (None:
    all of them).
    """

    v4_where: str
    v3_where: str | None
    sort: str = '{"pid":"asc"}'
    limit: int | None = None


class _NoV4(Exception):
    """A v4 route does not exist on this server."""


class CatalogClient:
    """Async (trio) SciCat client; use as ``async with CatalogClient(settings) as catalog``."""

    def __init__(self, settings: CatalogSettings) -> None:
        self._settings = settings
        self._transport = Transport(
            settings.url,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            retries=settings.retries,
            backoff=settings.retry_backoff,
            max_requests=settings.max_requests,
        )
        self._tokens = TokenKeeper(settings.credentials, self._login)
        if not settings.credentials.anonymous and _cleartext(self._transport.base_url):
            log.warning("the catalog URL %s is not https: credentials travel unencrypted", self.base_url)
        self._v4 = True
        self._datasets: SingleFlightCache[str, Dataset] = SingleFlightCache(1024, settings.record_ttl)
        self._pages: SingleFlightCache[tuple[object, ...], tuple[str, ...]] = SingleFlightCache(
            16, settings.listing_ttl
        )
        self._pager = Pager(self._range_page, self._skip_page, settings.page_size, self.base_url)
        self._prefixes: SingleFlightCache[str, bool] = SingleFlightCache(4096, settings.listing_ttl)
        self._counts: SingleFlightCache[None, int] = SingleFlightCache(1, settings.listing_ttl)
        self._facets: SingleFlightCache[tuple[str, tuple[str, ...]], dict[str, str]] = SingleFlightCache(
            64, settings.listing_ttl
        )
        self._hidden_hinted: set[str] = set()
        # creationTime of each PID on the listing pages fetched lately (see listed_creation_time)
        self._listed_times = RecentTimes(65536, settings.listing_ttl)

    @property
    def base_url(self) -> str:
        return self._transport.base_url

    async def __aenter__(self) -> CatalogClient:
        """Check credentials now, so a wrong password or an expired token stops the mount early.

        An unreachable catalog does not: the login is retried on first use,
        and that use reports the failure to whoever asked (the mount's start-up
        probe, a read, an fsspec call), so it is only noted here at INFO: a
        warning now would say the same thing twice.
        """
        try:
            self._tokens.check_startup()
            if self._settings.credentials.can_login:
                try:
                    await self._tokens.headers()
                except CatalogUnavailable as error:
                    log.info("cannot log in yet, will retry on first use: %s", error)
        except BaseException:
            await self._transport.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._transport.aclose()

    @property
    def token_expiry(self) -> float | None:
        """POSIX time the token in use expires (None: anonymous, or no expiry known)."""
        return self._tokens.expiry

    @property
    def stats(self) -> dict[str, int]:
        """Counters: requests, retries, logins, and errors by kind."""
        return dict(self._transport.stats)

    def cached_dataset(self, pid: str) -> Dataset | None:
        """The dataset if ``get_dataset`` has it cached now; no request."""
        return self._datasets.peek(pid)

    async def get_dataset(self, pid: str) -> Dataset:
        """The dataset with all its files; cached for ``record_ttl``, one request in flight per PID."""
        if not pid:
            raise DatasetNotFound("an empty PID names no dataset", pid)
        return await self._datasets.get(pid, lambda: self._either(self._dataset_v4, self._dataset_v3, pid))

    def iter_pids(self, prefix: str = "") -> AsyncIterator[str]:
        """PIDs visible to the caller that start with ``prefix``, in PID order, one page at a time.

        Pages are fetched as the iteration asks for them (see :mod:`scicatfs.catalog.paging`).
        """
        return self._pager.pids(prefix)

    def iter_children(self, prefix: str = "") -> AsyncIterator[Child]:
        """The names of PID level ``prefix`` (``""`` or ending in ``/``), in PID order, by skip scan."""
        return self._pager.children(prefix)

    def listed_creation_time(self, pid: str) -> float | None:
        """The creation time (POSIX seconds) a listing page showed for ``pid`` lately; no request.

        Lets a listing give its datasets real attributes without fetching
        each record. None if no page within the listing TTL showed it.
        """
        return self._listed_times.get(pid)

    async def is_pid_prefix(self, name: str) -> bool:
        """True if some visible PID starts with ``name + "/"``; one small request, cached."""
        return await self._prefixes.get(name, lambda: self._has_prefix(name + "/"))

    async def count(self) -> int:
        """Number of datasets visible to the caller (cached for ``listing_ttl``)."""
        return await self._counts.get(None, self._count)

    def cached_facet(self, v4_field: str, v3_fields: tuple[str, ...]) -> dict[str, str] | None:
        """What ``facet_values`` has cached now for these fields; no request."""
        return self._facets.peek((v4_field, v3_fields))

    async def facet_values(self, v4_field: str, v3_fields: tuple[str, ...]) -> dict[str, str]:
        """The distinct values of a field among the datasets the caller can read, each with the
        field it was found under; cached for ``listing_ttl``.

        From the ``fullfacet`` route, never by listing datasets. A logged-in
        caller asks twice and merges: the route counts only the caller's
        groups' datasets, and published ones only when asked for them alone.
        Anonymous callers get 403 from v4's route but published datasets from
        v3's, so they always use v3. On v3 every name in ``v3_fields`` is
        asked (the stored documents of a v4-era backend have the plural
        fields, an older one the singular): the catalog leaves out a facet on
        a field its schema lacks.
        """
        key = (v4_field, v3_fields)
        return await self._facets.get(key, lambda: self._facet(v4_field, v3_fields))

    async def iter_selected(self, selection: Selection) -> AsyncIterator[ListedDataset]:
        """The datasets of ``selection`` visible to the caller, one page of names and times at a time.

        A selection in PID order (every by-field view, and saved queries that
        do not sort) pages by PID range, ``pid > last`` beside its own
        condition, as the PID listings do (see catalog.paging): a value with
        many datasets costs the catalog O(n), not O(n²) with ``skip``. Another
        order pages by ``skip``, as does a catalog that refused or ignored a
        range (the pager is told, once for the client).
        """
        size = self._settings.page_size
        by_range = json.loads(selection.sort) == {"pid": "asc"} and self._pager.ranges
        given = 0
        last: str | None = None
        while selection.limit is None or given < selection.limit:
            limit = size if selection.limit is None else min(size, selection.limit - given)
            if by_range:
                try:
                    rows = await self._selected_page(selection, limit, after=last)
                except RangeRefused as error:
                    self._pager.give_up_ranges(f"it refused a range filter on pid ({error})")
                    by_range = False
                    continue
                if last is not None and rows and rows[0].pid <= last:
                    self._pager.give_up_ranges("it answered a range filter on pid with PIDs outside that range")
                    by_range = False
                    continue
            else:  # in PID order the datasets given so far are the first ``given``
                rows = await self._selected_page(selection, limit, skip=given)
            for row in rows:
                yield row
            if len(rows) < limit:
                return
            given += len(rows)
            last = rows[-1].pid

    async def any_selected(self, selection: Selection) -> bool:
        """Whether ``selection`` holds any visible dataset: one request for one PID."""
        return bool(await self._selected_page(selection, 1))

    # -- routes ---------------------------------------------------------------

    async def _dataset_v4(self, pid: str) -> Dataset:
        public = "public/" if self._tokens.anonymous else ""
        reply = await self._get(
            f"/v4/datasets/{public}{quote(pid, safe='')}", {"include": "origdatablocks"}, pid=pid
        )
        if public and reply.status == 200 and not reply.body.strip():
            self._fail_missing(pid)
        return await self._build(pid, await self._decode(pid, reply), size=len(reply.body))

    async def _dataset_v3(self, pid: str) -> Dataset:
        """One request: v3 ``include`` returns every block, uncapped, to anonymous callers too."""
        segment = quote(pid, safe="")
        reply = await self._get(f"/v3/datasets/{segment}", _filter({"include": ["origdatablocks"]}), pid=pid)
        raw = await self._decode(pid, reply)
        if isinstance(raw, dict) and isinstance(raw.get("origdatablocks"), list):
            return await self._build(pid, raw, size=len(reply.body))
        return await self._build(pid, raw, await self._blocks_v3(pid, segment))

    async def _blocks_v3(self, pid: str, segment: str) -> list[Any]:
        """The blocks from a server that ignored ``include``: the capped route, then paging."""
        blocks = self._json(
            await self._get(f"/v3/datasets/{segment}/origdatablocks", pid=pid),
            f"origdatablocks of {pid!r}",
            pid,
        )
        if not isinstance(blocks, list):
            raise BadResponse(f"catalog sent origdatablocks of {pid!r} that are not a JSON list", pid)
        if len(blocks) < V3_BLOCK_CAP:
            return blocks
        total = await self._block_count_v3(pid, segment)
        if total is not None and total <= len(blocks):
            return blocks
        if self._tokens.anonymous:  # /v3/origdatablocks is 403 for anonymous callers
            log.warning(
                "dataset %r has %s origdatablocks but the catalog shows anonymous callers only the "
                "first %d: some of its files are missing; log in to see them all",
                pid, total if total is not None else "more than 100", len(blocks),
            )
            return blocks
        return await self._all_blocks_v3(pid, total)

    async def _block_count_v3(self, pid: str, segment: str) -> int | None:
        """``/v3/datasets/{pid}/origdatablocks/count``; None when the server cannot say (no such route)."""
        headers = await self._tokens.headers()
        path = f"/v3/datasets/{segment}/origdatablocks/count"
        reply = await self._transport.request("GET", path, headers=headers, pid=pid)
        if reply.status != 200:
            return None
        try:
            count = json.loads(reply.body).get("count")
        except (ValueError, AttributeError):
            return None
        return count if isinstance(count, int) and not isinstance(count, bool) else None

    async def _all_blocks_v3(self, pid: str, total: int | None) -> list[Any]:
        """Page ``/v3/origdatablocks`` past the cap; blocks are deduplicated by ``_id``.

        Paging stops at a short page, or once ``total`` blocks (when known) are in.
        """
        blocks: dict[Any, Any] = {}
        skip = 0
        while True:
            query = {
                "where": {"datasetId": pid},
                "limits": {"limit": V3_BLOCK_CAP, "skip": skip, "order": "_id:asc"},
            }
            page = self._json(
                await self._get("/v3/origdatablocks", _filter(query), pid=pid),
                f"origdatablocks of {pid!r}",
                pid,
            )
            if not isinstance(page, list):
                raise BadResponse(f"catalog sent origdatablocks of {pid!r} that are not a JSON list", pid)
            for index, block in enumerate(page):
                key = block.get("_id") if isinstance(block, dict) else None
                blocks[key if key is not None else (skip, index)] = block
            if len(page) < V3_BLOCK_CAP or (total is not None and len(blocks) >= total):
                return list(blocks.values())
            skip += V3_BLOCK_CAP

    async def _range_page(self, keys: PidRange, limit: int) -> tuple[str, ...]:
        """The PIDs in ``keys``, sorted, at most ``limit``: one index range scan for the catalog."""

        async def v4(_: None) -> tuple[str, ...]:
            public = "/public" if self._tokens.anonymous else ""
            bounds = _bounds(keys, "$")
            query = {"where": {"pid": bounds} if bounds else {}, "fields": ["pid", "creationTime"],
                     "limits": {"limit": limit, "skip": 0, "sort": {"pid": "asc"}}}
            return self._pids(await self._refusable(f"/v4/datasets{public}", _filter(query)))

        async def v3(_: None) -> tuple[str, ...]:
            query = {"where": _v3_bounds(keys), "fields": ["pid", "creationTime"],
                     "limits": {"limit": limit, "skip": 0, "order": "pid:asc"}}
            return self._pids(await self._refusable("/v3/datasets", _filter(query)))

        return await self._pages.get(("range", keys, limit), lambda: self._either(v4, v3, None))

    async def _skip_page(self, prefix: str, skip: int, limit: int) -> tuple[str, ...]:
        """Page ``skip // limit`` of the PIDs under ``prefix``: for a catalog that takes no ranges."""
        where = {"pid": {"$regex": _prefix_pattern(prefix)}} if prefix else {}

        async def v4(_: None) -> tuple[str, ...]:
            public = "/public" if self._tokens.anonymous else ""
            limits = {"limit": limit, "skip": skip, "sort": {"pid": "asc"}}
            query = {"where": where, "fields": ["pid", "creationTime"], "limits": limits}
            return self._pids(await self._get(f"/v4/datasets{public}", _filter(query)))

        async def v3(_: None) -> tuple[str, ...]:
            v3_where = {"pid": {"like": where["pid"]["$regex"]}} if prefix else {}  # never a bare string
            limits = {"limit": limit, "skip": skip, "order": "pid:asc"}
            query = {"where": v3_where, "fields": ["pid", "creationTime"], "limits": limits}
            return self._pids(await self._get("/v3/datasets", _filter(query)))

        return await self._pages.get(("skip", prefix, skip, limit), lambda: self._either(v4, v3, None))

    async def _facet(self, v4_field: str, v3_fields: tuple[str, ...]) -> dict[str, str]:
        async def ask(path: str, facets: tuple[str, ...], asks: tuple[dict[str, Any], ...]) -> dict[str, str]:
            values: dict[str, str] = {}
            for fields in asks:
                answer = await self._facet_answer(path, facets, fields)
                for facet in facets:
                    for value in _facet_column(answer, facet):
                        values.setdefault(value, facet)
            return values

        if self._tokens.anonymous:  # the v3 route adds isPublished itself
            return await ask("/v3/datasets/fullfacet", v3_fields, ({},))
        asks: tuple[dict[str, Any], ...] = ({}, {"isPublished": True})
        return await self._either(
            lambda _: ask("/v4/datasets/fullfacet", (v4_field,), asks),
            lambda _: ask("/v3/datasets/fullfacet", v3_fields, asks),
            None,
        )

    async def _facet_answer(self, path: str, facets: tuple[str, ...], fields: dict[str, Any]) -> Any:
        params = {"facets": json.dumps(list(facets), separators=(",", ":")),
                  "fields": json.dumps(fields, separators=(",", ":"))}
        answer = self._json(await self._get(path, params), "the facet counts")
        if not isinstance(answer, list) or (answer and not isinstance(answer[0], dict)):
            self._transport.stats["bad_responses"] += 1
            raise BadResponse(f"the catalog sent facet counts that are not a list of objects: {answer!r:.100}")
        return answer[0] if answer else {}

    async def _selected_page(
        self, selection: Selection, limit: int, *, skip: int = 0, after: str | None = None
    ) -> list[ListedDataset]:
        """A page of ``selection``: ``skip`` datasets on, or (raising RangeRefused) those with PIDs above ``after``."""
        fields = ["pid", "datasetName", "creationTime"]
        get = self._get if after is None else self._refusable

        async def v4(_: None) -> list[ListedDataset]:
            public = "/public" if self._tokens.anonymous else ""
            sort = json.loads(selection.sort)
            where = _both(json.loads(selection.v4_where), {"pid": {"$gt": after}} if after else {}, "$and")
            query = {"where": where, "fields": sorted(set(fields) | set(sort)),
                     "limits": {"limit": limit, "skip": skip, "sort": sort}}
            return self._listed(await get(f"/v4/datasets{public}", _filter(query)))

        async def v3(_: None) -> list[ListedDataset]:
            if selection.v3_where is None:
                raise BadResponse(
                    f"SciCat at {self.base_url} has no v4 API, and this selection is written in v4's "
                    "filter language"
                )
            sort = json.loads(selection.sort)
            order = ",".join(f"{key}:{direction}" for key, direction in sort.items())
            bound = _v3_bounds(PidRange(after, False, None)) if after else {}
            query = {"where": _both(json.loads(selection.v3_where), bound, "and"),
                     "fields": sorted(set(fields) | set(sort)),
                     "limits": {"limit": limit, "skip": skip, "order": order}}
            return self._listed(await get("/v3/datasets", _filter(query)))

        return await self._either(v4, v3, None)

    def _listed(self, reply: Reply) -> list[ListedDataset]:
        listed = []
        for row, created in self._rows(reply):
            name = row.get("datasetName")
            listed.append(ListedDataset(row["pid"], name if isinstance(name, str) and name else None, created))
        return listed

    def _rows(self, reply: Reply) -> list[tuple[dict[str, Any], float | None]]:
        """The rows of a dataset list that have a PID, each with its creation time (kept a while for the listed datasets' attributes)."""
        rows = self._json(reply, "the dataset list")
        if not isinstance(rows, list):
            self._transport.stats["bad_responses"] += 1
            raise BadResponse("the catalog sent a dataset list that is not a JSON list")
        usable = [(row, parse_time(row.get("creationTime")))
                  for row in rows if isinstance(row, dict) and isinstance(row.get("pid"), str)]
        if len(usable) != len(rows):
            log.warning("the catalog listed %d entries without a usable pid; skipped", len(rows) - len(usable))
        self._listed_times.note_all((row["pid"], created) for row, created in usable if created is not None)
        return usable

    async def _has_prefix(self, prefix: str) -> bool:
        return await self._pager.first(prefix) is not None

    async def _count(self) -> int:
        async def v4(_: None) -> int:
            public = "/public" if self._tokens.anonymous else ""
            return self._count_of(await self._get(f"/v4/datasets{public}/count"))

        async def v3(_: None) -> int:
            return self._count_of(await self._get("/v3/datasets/count"))

        return await self._either(v4, v3, None)

    async def _login(self, username: str, password: Secret) -> Secret:
        self._transport.stats["logins"] += 1
        reply = await self._transport.request(
            "POST", "/v3/auth/login", json_body={"username": username, "password": password.reveal()}
        )
        if reply.status in (400, 401, 403):
            self._transport.stats["auth_errors"] += 1
            raise AuthenticationError(
                f"SciCat at {self.base_url} refused the login as {username!r} "
                f"(HTTP {reply.status}): check the username and the password file"
            )
        self._check(reply, "the login")
        data = self._json(reply, "the login")
        token = (data.get("access_token") or data.get("id")) if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise BadResponse(f"SciCat at {self.base_url} answered the login without an access_token")
        return Secret(token)

    # -- plumbing -------------------------------------------------------------

    async def _either(
        self, v4: Callable[[Any], Awaitable[T]], v3: Callable[[Any], Awaitable[T]], argument: Any
    ) -> T:
        """Run the v4 variant of an operation, or v3 once the server turned out to lack v4."""
        if self._v4:
            try:
                return await v4(argument)
            except _NoV4:
                if self._v4:
                    self._v4 = False
                    log.info("SciCat at %s has no v4 API; using v3 routes from now on", self.base_url)
        return await v3(argument)

    async def _send(self, path: str, params: dict[str, str] | None = None, pid: str | None = None) -> Reply:
        """A GET, its answer unchecked but for a missing v4 route."""
        headers = await self._tokens.headers()
        reply = await self._transport.request("GET", path, params=params, headers=headers, pid=pid)
        log.debug("GET %s -> %d (%d bytes)", path, reply.status, len(reply.body))
        if reply.status == 404 and path.startswith("/v4/") and _route_missing(reply):
            raise _NoV4(path)
        return reply

    async def _refusable(self, path: str, params: dict[str, str]) -> Reply:
        """A list request with a range filter: a 400 is the catalog refusing the range."""
        reply = await self._send(path, params)
        if reply.status == 400:
            raise RangeRefused(f"HTTP 400: {reply.message}")
        self._check(reply, path)
        return reply

    async def _get(self, path: str, params: dict[str, str] | None = None, pid: str | None = None) -> Reply:
        reply = await self._send(path, params, pid)
        if reply.status == 404 and pid is not None:
            self._fail_missing(pid)
        self._check(reply, f"dataset {pid!r}" if pid is not None else path, pid)
        return reply

    def _check(self, reply: Reply, what: str, pid: str | None = None) -> None:
        """Turn a non-2xx answer into the matching CatalogError."""
        if 200 <= reply.status < 300:
            return
        stats = self._transport.stats
        if 300 <= reply.status < 400:
            stats["bad_responses"] += 1
            raise BadResponse(
                f"the catalog redirects {what} to {reply.location}; give the redirected address "
                "as the catalog URL",
                pid,
            )
        if reply.status == 403:
            if self._tokens.expired:
                stats["auth_errors"] += 1
                raise AuthenticationError(self._tokens.expired_message(), pid)
            stats["forbidden"] += 1
            if pid is None:
                raise DatasetForbidden(
                    f"the catalog refused {what}: {reply.message}; log in or check the token"
                )
            raise DatasetForbidden(
                f"dataset {pid!r} exists but the credentials in use "
                f"({self._settings.credentials.source}) may not read it; "
                "log in or check its ownerGroup/accessGroups",
                pid,
            )
        if reply.status == 401:
            stats["auth_errors"] += 1
            raise AuthenticationError(f"the catalog wants authentication for {what}: {reply.message}", pid)
        if 400 <= reply.status < 500:
            stats["bad_responses"] += 1
            raise BadResponse(
                f"the catalog rejected the request for {what} (HTTP {reply.status}): {reply.message}", pid
            )
        stats["server_errors"] += 1
        raise CatalogUnavailable(f"the catalog failed on {what} (HTTP {reply.status}): {reply.message}", pid)

    def _fail_missing(self, pid: str) -> NoReturn:
        self._transport.stats["not_found"] += 1
        if self._tokens.expired:
            message = f"dataset {pid!r} is not visible: {self._tokens.expired_message()}"
            raise AuthenticationError(message, pid)
        hint = "; it may exist but not be public (log in to see more)" if self._tokens.anonymous else ""
        raise DatasetNotFound(f"no dataset {pid!r} in the catalog at {self.base_url}{hint}", pid)

    def _json(self, reply: Reply, what: str, pid: str | None = None) -> Any:
        try:
            return reply.json(what, pid)
        except BadResponse:
            self._transport.stats["bad_responses"] += 1
            raise

    async def _decode(self, pid: str, reply: Reply) -> Any:
        """The JSON of a dataset record (it can be megabytes: see ``_off_loop``)."""
        return await self._off_loop(pid, lambda: reply.json(f"dataset {pid!r}", pid), len(reply.body))

    async def _build(
        self, pid: str, raw: Any, blocks: list[Any] | None = None, *, size: int | None = None
    ) -> Dataset:
        """Validate a decoded dataset; ``size``: bytes of JSON it came from, if known."""

        def build() -> Dataset:
            if isinstance(raw, dict) and raw.get("pid") != pid:
                raise BadResponse(f"asked for dataset {pid!r}, the catalog sent {raw.get('pid')!r}", pid)
            return parse_dataset(raw, blocks)

        dataset = await self._off_loop(pid, build, INLINE_PARSE_BYTES + 1 if size is None else size)
        if not dataset.files:
            self._hint_hidden_files(pid, raw, blocks)
        return dataset

    async def _off_loop(self, pid: str, work: Callable[[], T], size: int) -> T:
        """``work()`` on the event loop if ``size`` (bytes of JSON behind it) is small, else in a thread.

        A dataset with 100,000 files takes seconds of pure Python, which on the
        event loop would stall every other filesystem request. A record of a
        few files takes tens of microseconds, less than the hop to a worker
        thread and back (about 0.3 ms of latency on a 2-core VM, on the first
        lookup of every dataset).
        """
        try:
            if size <= INLINE_PARSE_BYTES:
                return work()
            return await trio.to_thread.run_sync(work)
        except BadResponse as error:
            self._transport.stats["bad_responses"] += 1
            error.pid = pid
            log.warning("%s", error)
            raise

    def _hint_hidden_files(self, pid: str, raw: Any, blocks: list[Any] | None) -> None:
        """Say once per PID why a dataset that counts files shows none.

        v4 filters origdatablocks by their own ownerGroup/accessGroups/isPublished,
        which need not match the dataset's: a published dataset can come with
        no visible blocks at all.
        """
        expected = parse_size(raw.get("numberOfFiles")) if isinstance(raw, dict) else None
        if not expected:
            return
        if blocks is None:
            blocks = raw.get("origdatablocks") or []
        if any(isinstance(b, dict) and b.get("dataFileList") for b in blocks) or pid in self._hidden_hinted:
            return
        self._hidden_hinted.add(pid)
        log.warning(
            "dataset %r counts %d files but the catalog shows none of them to the credentials in use "
            "(%s): SciCat hides origdatablocks by their own access fields; log in, or ask the "
            "dataset's owner to share or publish its origdatablocks",
            pid, expected, self._settings.credentials.source,
        )

    def _pids(self, reply: Reply) -> tuple[str, ...]:
        return tuple(row["pid"] for row, _ in self._rows(reply))

    def _count_of(self, reply: Reply) -> int:
        data = self._json(reply, "the dataset count")
        count = data.get("count") if isinstance(data, dict) else None
        if isinstance(count, bool) or not isinstance(count, int):
            self._transport.stats["bad_responses"] += 1
            raise BadResponse(f"the catalog sent a dataset count without an integer 'count': {data!r:.100}")
        return count


def _filter(query: dict[str, Any]) -> dict[str, str]:
    """The ``filter`` query parameter, compact (it travels in every list URL)."""
    return {"filter": json.dumps(query, separators=(",", ":"))}


def _facet_column(answer: Any, field: str) -> list[str]:
    """The string values of one facet of a ``fullfacet`` answer (absent facet: none)."""
    column = answer.get(field) if isinstance(answer, dict) else None
    if not isinstance(column, list):
        return []
    return [row["_id"] for row in column if isinstance(row, dict) and isinstance(row.get("_id"), str) and row["_id"]]


def _route_missing(reply: Reply) -> bool:
    """A 404 that means "no such route" (Nest: "Cannot GET /api/v4/…"), not "no such dataset"."""
    try:
        data = json.loads(reply.body)
    except ValueError:
        return True
    if not isinstance(data, dict) or not isinstance(data.get("message"), str):
        return True
    return data["message"].startswith("Cannot ")


def _cleartext(url: str) -> bool:
    """True for plain http to anything but this machine."""
    parts = urlsplit(url)
    return parts.scheme == "http" and parts.hostname not in ("localhost", "127.0.0.1", "::1")


def _bounds(keys: PidRange, sigil: str) -> dict[str, str]:
    """The comparison operators of ``keys``: Mongo's (``sigil`` "$") or LoopBack's ("").

    Empty for the whole catalog: the caller sends no ``pid`` condition then,
    since ``{"pid": {}}`` asks for a PID equal to ``{}``.
    """
    bounds = {}
    if keys.start is not None:
        bounds[sigil + ("gte" if keys.inclusive else "gt")] = keys.start
    if keys.stop is not None:
        bounds[sigil + "lt"] = keys.stop
    return bounds


def _both(where: dict[str, Any], more: dict[str, Any], conjunction: str) -> dict[str, Any]:
    """A ``where`` that holds both conditions (``conjunction`` is v4's ``$and`` or v3's ``and``)."""
    if not more:
        return where
    if not where:
        return more
    return {conjunction: [where, more]}


def _v3_bounds(keys: PidRange) -> dict[str, Any]:
    """A v3 ``where`` for ``keys`` whose strings reach MongoDB as strings.

    v3 turns a filter string that ``new Date()`` parses into a Date: V8 reads
    ``"ds-0099"`` as 2001, ``"10099"`` as the year 10099. A Date matches no PID,
    and would end the listing early without a word. Strings inside arrays are
    left alone, so such bounds go as an ``$expr`` comparison instead.
    """
    bounds = _bounds(keys, "")
    if not bounds:
        return {}
    if not any(parse_js_date(value) is not None for value in bounds.values()):
        return {"pid": bounds}
    return {"$expr": {"$and": [{"$" + op: ["$pid", value]} for op, value in bounds.items()]}}


def _prefix_pattern(prefix: str) -> str:
    """A regex matching strings that start with ``prefix``, safe to send to v3 and v4.

    v3 turns every filter string that JavaScript's ``new Date()`` parses into a
    Date before MongoDB sees it, and ``"^noprefix\\-1/"`` parses; a Date as
    ``$regex`` is a 400 (and a bare PID string would silently match nothing).
    V8's date parser skips parenthesised text and rejects a ``)`` or a word
    after a number, so ``^(?:…)`` with escaped metacharacters never parses.
    """
    return "^(?:" + "".join("\\" + c if c in _REGEX_SPECIAL else c for c in prefix) + ")"

