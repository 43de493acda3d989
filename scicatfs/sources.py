"""Where each dataset file's bytes come from: ``--source PREFIX=URL`` rules.

A dataset file's remote path is its ``sourceFolder`` joined with its
``path``. The rule with the longest PREFIX that contains that path (whole
path components: ``/ess/data`` covers ``/ess/data/x`` but not
``/ess/database``) replaces the prefix by the URL's path, and the URL's scheme
says how to read it::

    /ess/data=file:///ess/data              the folder is mounted here (no copy in the cache)
    /ess/data=sftp://login.ess.eu/ess/data  over SSH through a login host
    /=https://data.example.org/files        a web server with Range support

With no matching rule a file is read over SFTP from ``--sftp-host``, else the
dataset's ``sourceFolderHost`` (:func:`default_source`). Pure functions: the
config validates rules with them, the stack builder applies them.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from scicatfs.transfer.base import is_loopback, source_url

__all__ = ["SCHEMES", "SourceRule", "SourceRules", "default_source", "parse_rule"]

SCHEMES = ("sftp", "file", "https", "http")


@dataclass(frozen=True, slots=True)
class SourceRule:
    """One rule: remote paths under ``prefix`` are read from under ``url``."""

    prefix: str  # normalised absolute POSIX path
    url: str  # as validated by parse_rule: scheme://netloc/path, no password, query or fragment

    def covers(self, path: str) -> bool:
        return self.prefix == "/" or path == self.prefix or path.startswith(self.prefix + "/")

    def locate(self, path: str) -> str:
        """The source URL of remote ``path`` (which this rule covers)."""
        parts = urlsplit(self.url)
        rest = path[len(self.prefix) :].lstrip("/")
        base = unquote(parts.path) or "/"
        return source_url(parts.scheme, parts.netloc, posixpath.join(base, rest) if rest else base)

    def __str__(self) -> str:
        return f"{self.prefix}={self.url}"


def parse_rule(text: str, *, insecure_http: bool = False) -> SourceRule:
    """``PREFIX=URL`` -> a rule; ValueError with a sentence saying what is wrong."""
    prefix, sep, url = text.partition("=")
    prefix, url = prefix.strip(), url.strip()
    if not sep or not prefix or not url:
        raise ValueError(f"source rule {text!r} must look like PREFIX=URL, e.g. /ess/data=file:///ess/data")
    return SourceRule(_prefix(prefix), _url(url, insecure_http))


def _prefix(prefix: str) -> str:
    if not prefix.startswith("/") or "\0" in prefix:
        raise ValueError(f"source prefix {prefix!r} must be an absolute path such as /ess/data")
    if ".." in prefix.split("/"):
        raise ValueError(f"source prefix {prefix!r} must not contain '..'")
    return posixpath.normpath(prefix).replace("//", "/")


def _url(url: str, insecure_http: bool) -> str:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(
            f"source URL {url!r}: scheme must be one of {', '.join(s + '://' for s in SCHEMES)}"
        )
    if parts.password is not None:
        raise ValueError(
            f"source URL for {parts.hostname}: no passwords in URLs (they would show in process"
            " lists and logs); use SSH keys or --http-token-file"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"source URL {url!r} names a folder: no ?query or #fragment")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"source URL {url!r} has an invalid port") from None
    if scheme == "file" and parts.netloc not in ("", "localhost"):
        raise ValueError(f"source URL {url!r}: a file URL names this machine only (file:///path)")
    if scheme in ("http", "https") and not parts.hostname:
        raise ValueError(f"source URL {url!r} names no host")
    if scheme == "http" and not insecure_http and not is_loopback(url):
        raise ValueError(
            f"source URL {url!r}: plain http:// is only allowed to this machine; use https://,"
            " or pass --insecure-http if the network is trusted"
        )
    path = parts.path or "/"
    if not path.startswith("/"):
        raise ValueError(f"source URL {url!r} needs an absolute path")
    netloc = "" if scheme == "file" else parts.netloc
    return f"{scheme}://{netloc}{posixpath.normpath(path).replace('//', '/')}"


class SourceRules:
    """The rules of one mount, longest prefix first."""

    def __init__(self, rules: Iterable[SourceRule] = ()) -> None:
        by_prefix = {rule.prefix: rule for rule in rules}  # a later rule for a prefix wins
        self.rules = tuple(sorted(by_prefix.values(), key=lambda rule: len(rule.prefix), reverse=True))

    def locate(self, path: str) -> str | None:
        """The source URL of remote ``path``, or None when no rule covers it."""
        for rule in self.rules:
            if rule.covers(path):
                return rule.locate(path)
        return None

    @property
    def schemes(self) -> set[str]:
        return {rule.url.partition(":")[0] for rule in self.rules}


def default_source(path: str, host: str | None) -> str:
    """SFTP from ``host`` (empty: the configured default), for paths no rule covers.

    ``host`` may be the catalog's free-text ``sourceFolderHost``: it is
    percent-encoded, so that a value holding ``@``, ``/`` or ``:`` names an
    (unresolvable) host instead of a user, a port or a path.
    """
    return source_url("sftp", quote(host or "", safe=""), path)
