"""Views: the datasets grouped the way people look for them, as symbolic links into the PID tree.

Layout::

    /by-proposal/<proposalId>/<link>     -> ../../<pid>
    /by-instrument/<instrumentId>/<link> -> ../../<pid>
    /by-sample/<sampleId>/<link>         -> ../../<pid>
    /by-group/<ownerGroup>/<link>        -> ../../<pid>
    /views/<name>/<link>                 -> ../../<pid>     one per saved query of the profile
    /views/<name>/.scicat/query.json     the catalog filter the view stands for
    /.scicat/pid/<pid>                   the PID tree again, without the reserved names

A ``by-X`` directory lists the values the catalog's ``fullfacet`` route
reports for the field (never by listing datasets); a value's directory lists
the datasets the filtered list route returns, one page of names and creation
times at a time. Links are relative, so they resolve under any mountpoint,
bind mount or container path.

Names (docs/filesystem.md states the same rules):

* A value becomes a directory name with ``%`` written ``%25`` and ``/``
  written ``%2F``; a value that is exactly ``.`` or ``..`` is written ``%2E``
  or ``%2E%2E``. Values with NUL, and values whose name would exceed 255
  bytes, are not shown.
* A link is named after the dataset's ``datasetName``, with ``/``, NUL and
  control characters replaced by ``_``, cut to 255 bytes of UTF-8; a dataset
  without a name, or whose name would be ``.`` or ``..``, is named after its
  PID the same way. When several datasets of one directory get the same name,
  each of them gets ``~`` and a part of its PID appended (``/`` and control
  characters again as ``_``): the first 8 characters of the PID's last ``/``
  component; if another dataset of the group has the same, the whole last
  component; if that is shared too, the whole PID; if even that is taken,
  the whole PID and ``~2``, ``~3``, ... in PID order. Names that are unique
  stay bare; the names depend only on the set of datasets in the directory.
* A PID whose first component is a reserved root name (``by-proposal``,
  ``views``, ``.scicat``, ...) is not listed at the root; it is reachable as
  ``/.scicat/pid/<pid>``, and links to it point there.

Adding a view is one class (a directory node with its lookup and listing)
and one row in :data:`FACETS` or :func:`top_level_views`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from scicatfs.catalog.client import ListedDataset, Selection
from scicatfs.fs.noentry import NoEntry
from scicatfs.fs.namespace import (
    CONTROL_DIR,
    PID_ALIAS,
    ROOT,
    Attributes,
    Entry,
    Kind,
    Listing,
    Namespace,
    Node,
    reachable_pid,
)

__all__ = [
    "FACETS",
    "Facet",
    "FacetDir",
    "FacetValueDir",
    "Link",
    "QueriesDir",
    "QueryDir",
    "SAVED_QUERIES",
    "link_names",
    "top_level_views",
    "value_name",
]

SAVED_QUERIES = "views"
QUERY_FILE = "query.json"
#: Appended to a shared name before part of the PID.
SEPARATOR = "~"
_MAX_NAME = 255
#: Names a saved query's links may not take: its directory also holds .scicat/query.json.
_QUERY_RESERVED = frozenset({CONTROL_DIR})
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/]")
_ESCAPE = re.compile(r"%(25|2F|2E)")


@dataclass(frozen=True, slots=True)
class Facet:
    """One ``by-X`` view: the field on v4, and the names it may have on v3 (plural first)."""

    directory: str
    v4_field: str
    v3_fields: tuple[str, ...]

    def selection(self, value: str) -> Selection:
        """The datasets with ``value``: a list field holds it, or the field equals it (Mongo's rule)."""
        v4 = json.dumps({self.v4_field: value}, separators=(",", ":"))
        # v3's filter pipe turns strings that `new Date()` parses into Dates, but not array items.
        clauses = [{name: {"inq": [value]}} for name in self.v3_fields]
        v3 = clauses[0] if len(clauses) == 1 else {"or": clauses}
        return Selection(v4, json.dumps(v3, separators=(",", ":")))


#: The by-field views: one row each (on v3 both spellings of a field are asked, see facet_values).
FACETS = (
    Facet("by-proposal", "proposalIds", ("proposalIds", "proposalId")),
    Facet("by-instrument", "instrumentIds", ("instrumentIds", "instrumentId")),
    Facet("by-sample", "sampleIds", ("sampleIds", "sampleId")),
    Facet("by-group", "ownerGroup", ("ownerGroup",)),
)


def top_level_views(saved: Iterable[tuple[str, Selection]] = ()) -> dict[str, Node]:
    """The views a mount shows at its root, by name (the table the namespace reserves)."""
    views: dict[str, Node] = {facet.directory: FacetDir(facet) for facet in FACETS}
    views[SAVED_QUERIES] = QueriesDir(tuple(saved))
    return views


# -- names ----------------------------------------------------------------------------------


def value_name(value: str) -> str | None:
    """The directory name of a field value (see the module docstring), None if it cannot be one."""
    if "\0" in value or not value:
        return None
    if value in (".", ".."):
        name = "%2E" * len(value)
    else:
        name = value.replace("%", "%25").replace("/", "%2F")
    return name if len(name.encode("utf-8", "surrogatepass")) <= _MAX_NAME else None


def _value_of(name: str) -> str | None:
    """The value a directory name stands for; None for a name :func:`value_name` never gives."""
    value = _ESCAPE.sub(lambda match: {"25": "%", "2F": "/", "2E": "."}[match.group(1)], name)
    return value if value_name(value) == name else None


def _fit(text: str, suffix: str = "") -> str:
    """``text`` cut so that ``text + suffix`` fits in a file name (255 bytes of UTF-8)."""
    room = _MAX_NAME - len(suffix.encode("utf-8", "surrogatepass"))
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) > room:
        text = encoded[:room].decode("utf-8", "ignore")
    return text + suffix


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text)


def _base_name(row: ListedDataset) -> str:
    name = _safe(row.name) if row.name else ""
    if name in ("", ".", ".."):
        name = _safe(row.pid)
    return _fit(name)


def _suffixes(pid: str) -> tuple[str, str, str]:
    """The parts of a PID a shared name gets, shortest first (see the module docstring)."""
    last = _safe(pid.rpartition("/")[2]) or _safe(pid)
    return last[:8], last, _safe(pid)


def link_names(rows: Iterable[ListedDataset], reserved: frozenset[str] = frozenset()) -> dict[str, ListedDataset]:
    """Unique, safe link names for ``rows`` by the rule in the module docstring. The result
    depends only on the set of datasets, not on the order they came in."""
    ordered = sorted({row.pid: row for row in rows}.values(), key=lambda row: row.pid)
    groups: dict[str, list[ListedDataset]] = {}
    for row in ordered:
        groups.setdefault(_base_name(row), []).append(row)
    names: dict[str, ListedDataset] = {}
    for base, members in groups.items():
        if len(members) == 1 and base not in reserved:
            names[base] = members[0]
    taken = set(reserved) | names.keys()
    for base, members in groups.items():
        if len(members) == 1 and base not in reserved:
            continue
        levels = [Counter(_suffixes(row.pid)[level] for row in members) for level in range(3)]
        for row in members:
            parts = _suffixes(row.pid)
            candidates = [_fit(base, SEPARATOR + parts[level]) for level in range(3) if levels[level][parts[level]] == 1]
            chosen = next((name for name in candidates if name not in taken), None)
            number = 2
            while chosen is None:
                numbered = _fit(base, f"{SEPARATOR}{parts[2]}{SEPARATOR}{number}")
                chosen = numbered if numbered not in taken else None
                number += 1
            taken.add(chosen)
            names[chosen] = row
    return names


# -- nodes ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Link(Node):
    """A symbolic link to dataset ``pid``, ``up`` levels below the root."""

    home: Node
    name: str
    pid: str
    mtime: float
    up: int = 2
    kind: ClassVar[Kind] = Kind.SYMLINK

    async def attributes(self, ns: Namespace) -> Attributes:
        target = await self.target(ns)
        return Attributes(Kind.SYMLINK, len(target.encode("utf-8", "surrogatepass")), self.mtime, 1, ns.listing_ttl)

    async def target(self, ns: Namespace) -> str:
        first = self.pid.partition("/")[0]
        path = f"{CONTROL_DIR}/{PID_ALIAS}/{self.pid}" if first in ns.top else self.pid
        return "../" * self.up + path

    def parent(self) -> Node:
        return self.home

    def where(self) -> tuple[str | None, str | None]:
        home = self.home.where()[1] or ""
        return self.pid, f"{home}/{self.name}"

    async def xattrs(self, ns: Namespace) -> dict[str, str]:
        return {"user.scicat.pid": self.pid}


@dataclass(frozen=True, slots=True)
class _Links:
    """A view directory's links, built once per listing TTL."""

    entries: tuple[Entry, ...]
    by_name: dict[str, Entry]


async def _links(ns: Namespace, home: Node, selection: Selection, reserved: frozenset[str] = frozenset()) -> _Links:
    async def build() -> _Links:
        rows = []
        async for row in ns.catalog.iter_selected(selection):
            if reachable_pid(row.pid):
                rows.append(row)
            else:
                ns.report_once(row.pid, f"PID {row.pid!r} cannot be linked to: it is no path in the tree")
        entries = []
        for name, row in link_names(rows, reserved).items():
            link = Link(home, name, row.pid, ns.started if row.created is None else row.created)
            entries.append((name, link, await link.attributes(ns)))
        return _Links(tuple(entries), {entry[0]: entry for entry in entries})

    return await ns.remembered(("links", home), build)


async def _link(ns: Namespace, home: Node, selection: Selection, name: str,
                reserved: frozenset[str] = frozenset()) -> Node:
    entry = (await _links(ns, home, selection, reserved)).by_name.get(name)
    if entry is None:
        raise NoEntry(name)
    return entry[1]


def _directory(ns: Namespace, nlink: int = 2) -> Attributes:
    return Attributes(Kind.DIRECTORY, 0, ns.started, nlink, ns.listing_ttl)


@dataclass(frozen=True, slots=True)
class FacetDir(Node):
    """``/by-X``: one directory per value of the field among the visible datasets."""

    facet: Facet
    kind: ClassVar[Kind] = Kind.DIRECTORY

    async def lookup(self, ns: Namespace, name: str) -> Node:
        value = _value_of(name)
        if value is None:
            raise NoEntry(name)
        facet = self.facet
        known = ns.catalog.cached_facet(facet.v4_field, facet.v3_fields)
        if known is not None:
            exists = value in known
        else:  # one small request (a one-row list), remembered either way
            exists = await ns.remembered(
                ("has", facet, value), lambda: ns.ask_new(lambda: ns.catalog.any_selected(facet.selection(value)))
            )
        if not exists:
            raise NoEntry(f"no visible dataset has {facet.v4_field} {value!r}")
        return FacetValueDir(facet, value)

    async def attributes(self, ns: Namespace) -> Attributes:
        return ns.level_attributes()

    async def listing(self, ns: Namespace) -> Listing:
        values = await ns.catalog.facet_values(self.facet.v4_field, self.facet.v3_fields)
        entries = []
        for value in sorted(values):
            name = value_name(value)
            if name is None:
                ns.report_once(f"value:{self.facet.directory}:{value}",
                               f"{self.facet.v4_field} {value!r} cannot be a directory name; not shown")
                continue
            entries.append((name, FacetValueDir(self.facet, value), _directory(ns)))
        return tuple(entries)

    def parent(self) -> Node:
        return ROOT

    def where(self) -> tuple[str | None, str | None]:
        return None, f"/{self.facet.directory}"


@dataclass(frozen=True, slots=True)
class FacetValueDir(Node):
    """``/by-X/<value>``: a link to every visible dataset with that value."""

    facet: Facet
    value: str
    kind: ClassVar[Kind] = Kind.DIRECTORY

    async def lookup(self, ns: Namespace, name: str) -> Node:
        return await _link(ns, self, self.facet.selection(self.value), name)

    async def attributes(self, ns: Namespace) -> Attributes:
        return _directory(ns)

    async def listing(self, ns: Namespace) -> Listing:
        return (await _links(ns, self, self.facet.selection(self.value))).entries

    def parent(self) -> Node:
        return FacetDir(self.facet)

    def where(self) -> tuple[str | None, str | None]:
        return None, f"/{self.facet.directory}/{value_name(self.value)}"


@dataclass(frozen=True, slots=True)
class QueriesDir(Node):
    """``/views``: one directory per saved query of the profile."""

    queries: tuple[tuple[str, Selection], ...]
    kind: ClassVar[Kind] = Kind.DIRECTORY

    async def lookup(self, ns: Namespace, name: str) -> Node:
        for query_name, selection in self.queries:
            if query_name == name:
                return QueryDir(self, name, selection)
        raise NoEntry(name)

    async def attributes(self, ns: Namespace) -> Attributes:
        return _directory(ns, 2 + len(self.queries))

    async def listing(self, ns: Namespace) -> Listing:
        return tuple((name, QueryDir(self, name, selection), _directory(ns, 3)) for name, selection in self.queries)

    def parent(self) -> Node:
        return ROOT

    def where(self) -> tuple[str | None, str | None]:
        return None, f"/{SAVED_QUERIES}"


@dataclass(frozen=True, slots=True)
class QueryDir(Node):
    """``/views/<name>``: a link to every visible dataset the saved query selects, and ``.scicat``."""

    home: QueriesDir
    name: str
    selection: Selection
    kind: ClassVar[Kind] = Kind.DIRECTORY

    async def lookup(self, ns: Namespace, name: str) -> Node:
        if name == CONTROL_DIR:
            return QueryControlDir(self)
        return await _link(ns, self, self.selection, name, _QUERY_RESERVED)

    async def attributes(self, ns: Namespace) -> Attributes:
        return _directory(ns, 3)

    async def listing(self, ns: Namespace) -> Listing:
        links = await _links(ns, self, self.selection, _QUERY_RESERVED)
        return ((CONTROL_DIR, QueryControlDir(self), _directory(ns)), *links.entries)

    def parent(self) -> Node:
        return self.home

    def where(self) -> tuple[str | None, str | None]:
        return None, f"/{SAVED_QUERIES}/{self.name}"


@dataclass(frozen=True, slots=True)
class QueryControlDir(Node):
    """``/views/<name>/.scicat``: what the view stands for."""

    query: QueryDir
    kind: ClassVar[Kind] = Kind.DIRECTORY

    async def lookup(self, ns: Namespace, name: str) -> Node:
        if name == QUERY_FILE:
            return QueryFile(self.query)
        raise NoEntry(name)

    async def attributes(self, ns: Namespace) -> Attributes:
        return _directory(ns)

    async def listing(self, ns: Namespace) -> Listing:
        query = QueryFile(self.query)
        return ((QUERY_FILE, query, await query.attributes(ns)),)

    def parent(self) -> Node:
        return self.query

    def where(self) -> tuple[str | None, str | None]:
        return None, f"/{SAVED_QUERIES}/{self.query.name}/{CONTROL_DIR}"


@dataclass(frozen=True, slots=True)
class QueryFile(Node):
    """``query.json``: the v4 ``filter`` object of the view, for the REST API or Scitacean."""

    query: QueryDir
    kind: ClassVar[Kind] = Kind.FILE

    async def attributes(self, ns: Namespace) -> Attributes:
        return Attributes(Kind.FILE, len(await self.content(ns)), ns.started, 1, ns.record_ttl)

    async def content(self, ns: Namespace) -> bytes:
        selection = self.query.selection
        limits: dict[str, object] = {"sort": json.loads(selection.sort)}
        if selection.limit is not None:
            limits["limit"] = selection.limit
        document = {"where": json.loads(selection.v4_where), "limits": limits}
        return (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")

    def parent(self) -> Node:
        return QueryControlDir(self.query)

    def where(self) -> tuple[str | None, str | None]:
        return None, f"/{SAVED_QUERIES}/{self.query.name}/{CONTROL_DIR}/{QUERY_FILE}"
