"""HTTP to SciCat: one keep-alive connection pool, deadlines, retries, a concurrency cap.

Everything here is about *getting an answer*; what the answer means is the
client's business. Transient failures (connection errors, timeouts,
502/503/504) are retried a bounded number of times with exponential backoff
and full jitter; a 4xx is never retried, it will not change.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import trio

from scicatfs.catalog.errors import BadResponse, CatalogUnavailable

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({502, 503, 504})


def normalise_base_url(url: str) -> str:
    """``https://host``, ``…/api``, ``…/api/v3``, ``…/api/v4`` (any trailing slashes) -> ``…/api``."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"catalog URL {url!r} is not an http(s) URL such as https://scicat.example.org/api/v3")
    segments = [s for s in parts.path.split("/") if s]
    if segments and segments[-1].lower() in ("v3", "v4"):
        segments.pop()
    if not segments or segments[-1].lower() != "api":
        segments.append("api")
    return urlunsplit((parts.scheme, parts.netloc, "/" + "/".join(segments), "", ""))


@dataclass(frozen=True, slots=True)
class Reply:
    """A non-retryable answer: status, raw body, and where a redirect points."""

    status: int
    body: bytes
    location: str | None = None

    def json(self, what: str, pid: str | None = None) -> Any:
        try:
            return json.loads(self.body)
        except ValueError as error:
            raise BadResponse(f"catalog sent invalid JSON for {what}: {error}", pid) from None

    @property
    def message(self) -> str:
        """The ``message`` of a Nest error body, else the start of the body."""
        try:
            data = json.loads(self.body)
        except ValueError:
            data = None
        if isinstance(data, Mapping) and isinstance(data.get("message"), str):
            return data["message"]
        return self.body[:200].decode("utf-8", errors="replace").strip()


class Transport:
    """Retrying, capped, deadline-bound requests against one catalog."""

    def __init__(
        self,
        base_url: str,
        connect_timeout: float,
        read_timeout: float,
        retries: int,
        backoff: float,
        max_requests: int,
    ) -> None:
        self.base_url = normalise_base_url(base_url)
        self._deadline = connect_timeout + read_timeout
        self._retries = retries
        self._backoff = backoff
        self._limiter = trio.CapacityLimiter(max_requests)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_requests, max_keepalive_connections=max_requests),
            headers={"Accept": "application/json"},
            follow_redirects=False,
        )
        self.stats: Counter[str] = Counter()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        pid: str | None = None,
    ) -> Reply:
        """Send ``method base_url + path``; retry transient failures, then raise CatalogUnavailable."""
        url = self.base_url + path
        problem = ""
        for attempt in range(self._retries + 1):
            if attempt:
                self.stats["retries"] += 1
                await trio.sleep(random.uniform(0, self._backoff * 2 ** (attempt - 1)))
            self.stats["requests"] += 1
            async with self._limiter:
                with trio.move_on_after(self._deadline) as scope:
                    try:
                        response = await self._client.request(
                            method, url, params=params, json=json_body, headers=headers
                        )
                    except httpx.TimeoutException:
                        self.stats["timeouts"] += 1
                        problem = f"no answer within {self._deadline:g} s"
                        continue
                    except httpx.TransportError as error:
                        self.stats["connection_errors"] += 1
                        problem = f"connection failed ({type(error).__name__}: {error})"
                        continue
                if scope.cancelled_caught:
                    self.stats["timeouts"] += 1
                    problem = f"no complete answer within {self._deadline:g} s"
                    continue
            if response.status_code in RETRYABLE_STATUS:
                self.stats["server_errors"] += 1
                problem = f"HTTP {response.status_code} {response.reason_phrase}"
                continue
            return Reply(response.status_code, response.content, response.headers.get("location"))
        self.stats["unavailable"] += 1
        raise CatalogUnavailable(
            f"SciCat at {self.base_url} is unavailable: {problem} "
            f"(tried {self._retries + 1} times); check the URL and the network, or try again later",
            pid,
        )
