"""The status of a running mount, as one JSON-able dict.

The mount serves it as the read-only file ``MOUNT/.scicat/status.json``
(rendered anew on each open) and ``scicatfs status MOUNT`` pretty-prints it.
Each layer's counters are copied as the layer exposes them (``.stats``), so
a counter added to a layer shows up here without touching this module;
``errors`` gathers the counters that mean something went wrong, by layer and
kind, so that "is anything failing?" is one glance; ``sources`` counts bytes,
requests and errors per source (``file://``, ``sftp://host``, ``https://host``).

Sizes are bytes and times POSIX seconds or ISO 8601 UTC strings: this is for
programs as much as for people (the command adds the human units).
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scicatfs import __version__

if TYPE_CHECKING:
    from scicatfs.cache.fetcher import Fetcher
    from scicatfs.catalog.client import CatalogClient
    from scicatfs.transfer.dispatch import Dispatcher

__all__ = ["ERROR_COUNTERS", "collect_status", "iso_time"]

#: Per layer, the counters that count failures (the rest count work done).
ERROR_COUNTERS = {
    "catalog": ("timeouts", "connection_errors", "server_errors", "unavailable", "auth_errors", "bad_responses"),
    "transfer": ("errors", "reconnects"),
    "cache": ("fetch_errors", "integrity_errors", "chunks_uncached"),
}


def iso_time(moment: float) -> str:
    """POSIX seconds as ISO 8601 UTC, to the second."""
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def collect_status(
    *,
    catalog: CatalogClient,
    transfer: Dispatcher,
    fetcher: Fetcher,
    mountpoint: Path,
    started: float,
    inodes: dict[str, int] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """Everything ``scicatfs status`` shows, from the running layers' counters.

    Called on the event loop at every stat, listing and open of status.json:
    the counters are in memory, but the cache usage is a sum over the whole
    index (about 6 ms for a full 10 GiB cache), acceptable for a file read by
    hand and by ``scicatfs status``, not for anything on a hot path.
    """
    now = time.time() if now is None else now
    store = fetcher.store
    sections = {
        "catalog": {"url": catalog.base_url, **catalog.stats},
        "transfer": dict(transfer.stats),
        "cache": {
            "directory": str(store.directory),
            "used_bytes": store.usage(),
            "budget_bytes": store.budget,
            "chunks_in_flight": fetcher.chunks_in_flight,
            **fetcher.stats,
        },
        "tiers": fetcher.tiers.as_status(),
    }
    if inodes is not None:  # the inodes the kernel holds: in memory, and waiting on disk
        sections["inodes"] = dict(inodes)
    if fetcher.shared is not None:
        tier = fetcher.shared.tier
        sections["tiers"]["shared_directory"] = str(tier.directory)
        sections["tiers"]["shared_writable"] = tier.accepts_writes
    errors = {
        layer: {name: sections[layer].get(name, 0) for name in names} for layer, names in ERROR_COUNTERS.items()
    }
    return {
        "scicatfs": __version__,
        "mountpoint": str(mountpoint),
        "process": os.getpid(),
        "started": iso_time(started),
        "uptime_seconds": round(now - started, 3),
        "token": _token(catalog.token_expiry, now),
        **sections,
        # per origin (scheme://[user@]host[:port]): bytes_read, requests, errors
        "sources": transfer.sources,
        "errors": errors,
    }


def _token(expiry: float | None, now: float) -> dict[str, Any] | None:
    """When the catalog token expires; None when anonymous or the token names no expiry."""
    if expiry is None:
        return None
    return {"expires": iso_time(expiry), "expires_in_seconds": round(expiry - now), "expired": expiry <= now}
