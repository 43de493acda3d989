"""The `filter` query parameter of SciCat list routes: parse, validate, match, sort, page.

scicat-backend-next takes Mongo-style `where` clauses on v4, after a key
whitelist (`check_v4_filter`), and hands them to MongoDB as they are. On v3 a
pipe rewrites the clause first (`v3_where`): LoopBack operators (`inq`, `and`,
`or`, `like`, `gt`, ...) become Mongo's, and every string that JavaScript's
`new Date()` accepts becomes a Date; a Date equals no string, so
`{"pid": "noprefix-1"}` matches nothing on v3, and a `like` pattern that became
a Date is a 400. The matcher then knows Mongo's operators only and evaluates a
clause against a plain dict in Python. `key_range` reads the bounds a clause
puts on one key (``pid``), so that the server can walk a sorted index from the
lower bound to the upper one, as MongoDB does, and match the rest of the clause
against the documents it meets there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from scicatfs.catalog.jsdate import parse_js_date

__all__ = ["FilterError", "JsDate", "KeyRange", "RANGE_OPERATORS", "check_v4_filter", "key_range", "limits",
           "matches", "operators_in", "parse_filter", "project", "reject_unknown_keys", "sort_v3", "sort_v4",
           "v3_where"]


class FilterError(ValueError):
    """A filter the real server answers with 400 Bad Request; the message is its message."""


_UNSET = object()

#: How the fixtures store what MongoDB holds as Dates (createdAt, creationTime, ...).
_STORED_DATE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})", re.ASCII)


@dataclass(frozen=True, order=True, slots=True)
class JsDate:
    """A `where` value the v3 filter pipe turned into a JavaScript Date."""

    epoch_ms: float

_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "$gt": lambda a, b: a > b,
    "$gte": lambda a, b: a >= b,
    "$lt": lambda a, b: a < b,
    "$lte": lambda a, b: a <= b,
}

#: LoopBack operator -> Mongo operator: the v3 pipe renames these keys, at any depth, and no
#: others (a `neq` or `exists` stays a field of a literal sub-document that nothing equals).
_LOOPBACK = {"inq": "$in", "nin": "$nin", "and": "$and", "or": "$or", "like": "$regex",
             "ilike": "$regex", "gte": "$gte", "lte": "$lte", "gt": "$gt", "lt": "$lt"}

#: The comparison operators (what a server without range support refuses).
RANGE_OPERATORS = frozenset({"$gt", "$gte", "$lt", "$lte"})

#: The key names a v4 dataset filter may use, outside arrays: the fields of the output DTO,
#: of the lifecycle, relationships and techniques (backend-next ``ALLOWED_DATASET_KEYS``).
_V4_DATASET_KEYS = frozenset({
    "ownerGroup", "accessGroups", "instrumentGroup", "owner", "ownerEmail", "orcidOfOwner", "contactEmail",
    "sourceFolder", "sourceFolderHost", "size", "packedSize", "numberOfFiles", "numberOfFilesArchived",
    "creationTime", "validationStatus", "keywords", "description", "datasetName", "classification", "license",
    "isPublished", "techniques", "sharedWith", "relationships", "datasetlifecycle", "scientificMetadata",
    "scientificMetadataSchema", "scientificMetadataValid", "comment", "dataQualityMetrics",
    "principalInvestigators", "startTime", "endTime", "creationLocation", "dataFormat", "proposalIds",
    "sampleIds", "instrumentIds", "inputDatasets", "usedSoftware", "jobParameters", "jobLogData", "runNumber",
    "pid", "type", "createdBy", "updatedBy", "createdAt", "updatedAt", "version", "_id", "id",
    "archivable", "retrievable", "publishable", "dateOfDiskPurging", "archiveRetentionTime",
    "dateOfPublishing", "publishedOn", "isOnCentralDisk", "archiveStatusMessage", "retrieveStatusMessage",
    "archiveReturnMessage", "retrieveReturnMessage", "exportedTo", "retrieveIntegrityCheck",
    "storageLocation", "relationship", "name",
})
#: What each section of a v4 filter adds to them (``ALLOWED_DATASET_FILTER_KEYS``).
_V4_SECTION_KEYS = {
    "where": ("where", "$in", "$or", "$and", "$nor", "$match", "$eq", "$gt", "$gte", "$lt", "$lte", "$ne",
              "$nin", "$not", "$exists", "$regex", "$options"),
    "include": ("include",),
    "limits": ("limits", "limit", "skip", "sort"),
    "fields": ("fields",),
}
#: Below these keys any name passes.
_V4_FREE_FORM = frozenset({"scientificMetadata", "jobParameters", "jobParams", "jobResultObject"})
_EXPRESSION_OPERATORS = ("$and", "$or", "$eq", "$ne", *_COMPARISONS)


def parse_filter(raw: str | None) -> dict[str, Any]:
    """The decoded `filter` parameter ({} when absent); FilterError when it is not a JSON object."""
    if raw is None or raw == "":
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise FilterError(f"Invalid JSON in filter: {exc}") from None
    if not isinstance(value, dict):
        raise FilterError("filter must be a JSON object")
    return value


def v3_where(value: Any) -> Any:
    """A v3 `where` clause as the backend's pipe hands it to MongoDB.

    At any depth, inside arrays too: LoopBack operators get their Mongo names
    (`ilike` also sets ``$options: "i"`` beside it), and every string held by an
    object key that `new Date()` parses becomes a `JsDate` (operands of `like`,
    `gt`, clauses inside `or`). Strings that are items of an array (`inq` lists)
    stay strings. Nothing else is parsed: `"12345"` becomes a Date, not a number.
    """
    if isinstance(value, list):
        return [v3_where(item) for item in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key == "ilike":
            out["$options"] = "i"
        out[_LOOPBACK.get(key, key)] = _as_date(v3_where(item))
    return out


def _as_date(value: Any) -> Any:
    if isinstance(value, str):
        epoch_ms = parse_js_date(value)
        if epoch_ms is not None:
            return JsDate(epoch_ms)
    return value


def _stored_as_date(value: Any) -> Any:
    """A stored timestamp string as the Date MongoDB would hold; anything else unchanged."""
    if isinstance(value, str) and _STORED_DATE.fullmatch(value):
        epoch_ms = parse_js_date(value)
        if epoch_ms is not None:
            return JsDate(epoch_ms)
    return value


def check_v4_filter(spec: Mapping[str, Any], sections: Iterable[str]) -> None:
    """Raise the v4 dataset routes' 400 for the first key path the whitelist refuses.

    Like the backend, this flattens nested objects (never arrays: whatever an
    `$or` list holds passes) and checks every part of each leaf's path against
    one set, the dataset's field names plus the `sections`' keys, so a
    LoopBack `gt` or an `$expr` is refused while `limits.pid` is not. Below a
    free-form field (`scientificMetadata`) any name passes; an empty object or
    a null holds no leaf and is not checked.
    """
    allowed = _V4_DATASET_KEYS.union(*(_V4_SECTION_KEYS[section] for section in sections))

    def walk(value: Mapping[str, Any], path: str, free: bool) -> None:
        for key, item in value.items():
            leaf = next(_leaf_paths(item), None)
            if leaf is None:
                continue
            if not free and key not in allowed:
                raise FilterError(f"Property {path}{key}{leaf} should not exist in the filter object")
            if isinstance(item, Mapping):
                walk(item, f"{path}{key}.", free or key in _V4_FREE_FORM)

    walk(spec, "", False)


def _leaf_paths(value: Any) -> Iterable[str]:
    """The ``.a.b`` suffixes that lead from `value` to its leaves (one empty suffix for a leaf)."""
    if not isinstance(value, Mapping):
        if value is not None:
            yield ""
        return
    for key, item in value.items():
        for rest in _leaf_paths(item):
            yield f".{key}{rest}"


def reject_unknown_keys(value: Mapping[str, Any], allowed: Iterable[str], *, prefix: str = "") -> None:
    """Raise the v4 whitelist error for the first key of `value` not in `allowed`."""
    allowed = set(allowed)
    for key in value:
        if key not in allowed:
            raise FilterError(f"Property {prefix}{key} should not exist in the filter object")


def _lookup(doc: Any, dotted: str) -> Any:
    """The value at a dotted path; lists along the way fan out into a list of values."""
    current = doc
    for part in dotted.split("."):
        if isinstance(current, list):
            current = [item.get(part, _UNSET) for item in current if isinstance(item, dict)]
            current = [item for item in current if item is not _UNSET]
        elif isinstance(current, dict):
            current = current.get(part, _UNSET)
            if current is _UNSET:
                return _UNSET
        else:
            return _UNSET
    return current


def _candidates(value: Any) -> list[Any]:
    """Mongo semantics: a condition on an array field holds if it holds for any element.

    Stored timestamps are Dates to MongoDB: they compare with Dates (what v3's pipe makes of
    date-like strings) and never equal, order against or match a string (v4 hands strings on
    unconverted, so a v4 ``{"creationTime": {"$gte": "2024-…"}}`` matches nothing).
    """
    if value is _UNSET:
        return []
    found = [value, *value] if isinstance(value, list) else [value]
    return [_stored_as_date(candidate) for candidate in found]


def _regex(pattern: Any, options: str = "") -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise FilterError("$regex has to be a string")
    flags = re.IGNORECASE if "i" in options else 0
    flags |= re.MULTILINE if "m" in options else 0
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise FilterError(f"Invalid regular expression: {exc}") from None


def _compare(op: Callable[[Any, Any], bool], a: Any, b: Any) -> bool:
    try:
        return op(a, b)
    except TypeError:
        return False


def _field_matches(value: Any, condition: Any) -> bool:
    if not isinstance(condition, dict) or not condition or not all(k.startswith("$") for k in condition):
        return any(candidate == condition for candidate in _candidates(value))
    for op, operand in condition.items():
        found = _candidates(value)
        if op == "$eq":
            ok = operand in found
        elif op == "$ne":
            ok = operand not in found
        elif op in ("$in", "$nin"):
            if not isinstance(operand, list):
                raise FilterError(f"{op} needs an array")
            hit = any(candidate in operand for candidate in found)
            ok = hit if op == "$in" else not hit
        elif op == "$regex":
            pattern = _regex(operand, condition.get("$options", ""))
            ok = any(isinstance(c, str) and pattern.search(c) for c in found)
        elif op == "$options":
            continue
        elif op == "$exists":
            ok = (value is not _UNSET) == bool(operand)
        elif op in _COMPARISONS:
            ok = any(_compare(_COMPARISONS[op], c, operand) for c in found)
        else:
            raise FilterError(f"unknown operator: {op}")
        if not ok:
            return False
    return True


def _evaluate(doc: Mapping[str, Any], expression: Any) -> Any:
    """An aggregation expression of `$expr`: "$field" paths, literals, and/or, comparisons."""
    if isinstance(expression, str) and expression.startswith("$"):
        value = _lookup(doc, expression[1:])
        return None if value is _UNSET else value
    if not isinstance(expression, dict):
        return expression
    if len(expression) != 1 or next(iter(expression)) not in _EXPRESSION_OPERATORS:
        raise FilterError(f"Unsupported expression {json.dumps(expression)[:80]}")
    [(op, arguments)] = expression.items()
    if not isinstance(arguments, list):
        raise FilterError(f"{op} needs an array")
    values = [_evaluate(doc, argument) for argument in arguments]
    if op in ("$and", "$or"):
        return all(values) if op == "$and" else any(values)
    if len(values) != 2:
        raise FilterError(f"Expression {op} takes exactly 2 arguments")
    if op in ("$eq", "$ne"):
        return (values[0] == values[1]) == (op == "$eq")
    return _compare(_COMPARISONS[op], *values)


def matches(doc: Mapping[str, Any], where: Any) -> bool:
    """Whether `doc` satisfies a Mongo- or LoopBack-style `where` clause."""
    if not isinstance(where, dict):
        raise FilterError("where must be an object")
    for key, condition in where.items():
        if key == "$expr":
            if not _evaluate(doc, condition):
                return False
        elif key in ("$and", "$or"):
            if not isinstance(condition, list):
                raise FilterError(f"{key} needs an array")
            results = (matches(doc, clause) for clause in condition)
            if not (all(results) if key == "$and" else any(results)):
                return False
        elif key.startswith("$"):
            raise FilterError(f"unknown top level operator: {key}")
        elif not _field_matches(_lookup(doc, key), condition):
            return False
    return True


def operators_in(value: Any) -> Iterable[str]:
    """Every key of `value`, at any depth (to find operators a server does not take)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from operators_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from operators_in(item)


@dataclass(frozen=True, slots=True)
class KeyRange:
    """Bounds a `where` clause puts on one key: documents outside them cannot match.

    ``prefix``: every match starts with it (from an anchored literal regex).
    """

    low: str | None = None
    low_inclusive: bool = True
    high: str | None = None
    high_inclusive: bool = False
    prefix: str = ""

    def below_high(self, value: str) -> bool:
        """False once `value` (walking upwards) is past every possible match."""
        if not value.startswith(self.prefix) and value > self.prefix:
            return False
        if self.high is None:
            return True
        return value <= self.high if self.high_inclusive else value < self.high

    def tighter(self, other: KeyRange) -> KeyRange:
        """The intersection of two ranges (both must hold)."""
        merged = self
        if other.low is not None and (merged.low is None or other.low > merged.low
                                      or (other.low == merged.low and not other.low_inclusive)):
            merged = replace(merged, low=other.low, low_inclusive=other.low_inclusive)
        if other.high is not None and (merged.high is None or other.high < merged.high
                                       or (other.high == merged.high and not other.high_inclusive)):
            merged = replace(merged, high=other.high, high_inclusive=other.high_inclusive)
        if len(other.prefix) > len(merged.prefix):
            merged = replace(merged, prefix=other.prefix)
            if merged.low is None or merged.low < merged.prefix:
                merged = replace(merged, low=merged.prefix, low_inclusive=True)
        return merged


_LITERAL = re.compile(r"(?:[^\\^$.|?*+()\[\]{}]|\\[^A-Za-z0-9])*")


def _literal_prefix(pattern: Any) -> str:
    """The literal text an anchored regex (``^abc``, ``^(?:a\\.b)``) requires at the start, or ""."""
    if not isinstance(pattern, str) or not pattern.startswith("^"):
        return ""
    body = pattern[1:]
    if body.startswith("(?:") and body.endswith(")"):
        body = body[3:-1]
    if not _LITERAL.fullmatch(body):
        return ""
    return re.sub(r"\\(.)", r"\1", body)


def key_range(where: Any, key: str) -> KeyRange:
    """The bounds `where` puts on `key` through comparisons and anchored regexes, at its top or in `and`s.

    Anything else (`or`, `$expr`, ...) is left to `matches`: the range is only
    where to look, never the answer.
    """
    found = KeyRange()
    if not isinstance(where, dict):
        return found
    for name, condition in where.items():
        if name == "$and" and isinstance(condition, list):
            for clause in condition:
                found = found.tighter(key_range(clause, key))
        if name != key or not isinstance(condition, dict):
            continue
        for op, operand in condition.items():
            if op == "$regex" and "i" not in str(condition.get("$options", "")):
                found = found.tighter(KeyRange(prefix=_literal_prefix(operand)))
            elif isinstance(operand, str) and op in ("$gt", "$gte"):
                found = found.tighter(KeyRange(low=operand, low_inclusive=op == "$gte"))
            elif isinstance(operand, str) and op in ("$lt", "$lte"):
                found = found.tighter(KeyRange(high=operand, high_inclusive=op == "$lte"))
    return found


def project(doc: Mapping[str, Any], fields: Any) -> dict[str, Any]:
    """Only `_id` and the listed top-level fields (all of them when `fields` is empty).

    MongoDB keeps `_id` in every projection unless told otherwise, and the
    backend never tells it otherwise.
    """
    if not fields:
        return dict(doc)
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        raise FilterError("fields must be an array of strings")
    return {name: doc[name] for name in ("_id", *fields) if name in doc}


def _sort_key(field: str) -> Callable[[Mapping[str, Any]], tuple]:
    def key(doc: Mapping[str, Any]) -> tuple:
        value = _lookup(doc, field)
        if value is _UNSET or value is None:
            return (0, "", "")
        if isinstance(value, (dict, list)):
            return (1, "json", json.dumps(value, sort_keys=True))
        return (1, type(value).__name__, value)
    return key


def _sorted(docs: list[dict[str, Any]], order: list[tuple[str, bool]],
            fields: Any) -> list[dict[str, Any]]:
    """Stable sort by `order`, seen through the projection `fields`.

    The backend projects before it sorts, so a key that `fields` leaves out
    is missing from every document and sorts nothing: the documents keep
    their natural (insertion) order.
    """
    if fields:
        order = [(field, descending) for field, descending in order if field.split(".")[0] in fields]
    for field, descending in reversed(order):
        docs = sorted(docs, key=_sort_key(field), reverse=descending)
    return docs


def sort_v4(docs: list[dict[str, Any]], sort: Any, fields: Any = None) -> list[dict[str, Any]]:
    """Sort by a v4 `limits.sort` object (see `_sorted`).

    The backend maps the direction ``"asc"`` to 1 and every other value (``"desc"``, but also
    ``1`` or ``"ascending"``) to -1, without an error.
    """
    if not isinstance(sort, dict):
        raise FilterError("limits.sort must be an object")
    return _sorted(docs, [(field, direction != "asc") for field, direction in sort.items()], fields)


def sort_v3(docs: list[dict[str, Any]], order: Any, fields: Any = None) -> list[dict[str, Any]]:
    """Sort by a v3 `limits.order` string: "field:asc", "field:desc", comma separated (see `_sorted`)."""
    if not isinstance(order, str):
        raise FilterError("limits.order must be a string like 'creationTime:desc'")
    keys = []
    for part in filter(None, (p.strip() for p in order.split(","))):
        field, _, direction = part.replace(" ", ":").partition(":")
        if direction.lower() not in ("", "asc", "desc"):
            raise FilterError(f"Invalid order direction in {part!r}")
        keys.append((field, direction.lower() == "desc"))
    return _sorted(docs, keys, fields)


def limits(value: Any, *, default_limit: int) -> tuple[int, int]:
    """(skip, limit) from a `limits` object; missing values take the route's defaults."""
    if value is None:
        return 0, default_limit
    if not isinstance(value, dict):
        raise FilterError("limits must be an object")
    skip, limit = value.get("skip", 0), value.get("limit", default_limit)
    for name, number in (("skip", skip), ("limit", limit)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise FilterError(f"limits.{name} must be a non-negative integer")
    return skip, limit
