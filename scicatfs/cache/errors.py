"""Errors raised by the cache layer; the fs layer maps every one of them to EIO."""

from __future__ import annotations

from scicatfs.errors import ScicatfsError


class CacheError(ScicatfsError):
    """The cache could not serve a read (timeout, unusable cache directory, ...)."""


class IntegrityError(CacheError):
    """The bytes on the server disagree with the catalog (checksum or size).

    Raised instead of returning data that cannot be trusted; the offending blob
    has already been discarded when a reader sees this.
    """


class FetchTimeout(CacheError):
    """A chunk could not be fetched before its deadline: the reader gets EIO, not a hang."""
