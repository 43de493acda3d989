"""Errors raised by the cache layer; the fs layer maps every one of them to EIO."""

from __future__ import annotations

import logging

from cachetools import TTLCache

from scicatfs.errors import ScicatfsError

log = logging.getLogger("scicatfs.cache")

#: Integrity failures logged in the last seconds, so that one bad file is one line per 10 s.
_reported: TTLCache[str, bool] = TTLCache(maxsize=1024, ttl=10.0)


class CacheError(ScicatfsError):
    """The cache could not serve a read (timeout, unusable cache directory, ...)."""


class IntegrityError(CacheError):
    """The bytes on the server disagree with the catalog (checksum or size).

    Raised instead of returning data that cannot be trusted. The failure is
    recorded in the cache index, so the file version stays failed for every
    process and across restarts until its retry time (docs/failure-behaviour.md).
    """


class FetchTimeout(CacheError):
    """A chunk could not be fetched before its deadline: the reader gets EIO, not a hang."""


def report_integrity(error: IntegrityError) -> None:
    """Log an integrity failure at ERROR, once per file and message per 10 s.

    The message names the PID, the path, what the catalog expected and what
    was found. Detection and every refused open or read report through here,
    so a retrying script does not flood the log.
    """
    line = str(error)
    if line not in _reported:
        _reported[line] = True
        log.error("%s", line)
