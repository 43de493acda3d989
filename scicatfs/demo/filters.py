"""The `filter` query parameter of SciCat list routes: parse, validate, match, sort, page.

scicat-backend-next takes Mongo-style `where` clauses on v4 (whitelisted keys,
`$regex`/`$options` allowed) and LoopBack-style ones on v3 (`inq`, `and`, `or`,
`like`, ... mapped to Mongo). Both spellings are accepted here by one matcher,
which evaluates a clause against a plain dict in Python. `key_range` reads
the bounds a clause puts on one key (``pid``), so that the server can walk a
sorted index from the lower bound to the upper one, as MongoDB does, and match
the rest of the clause against the documents it meets there.

The v3 pipe also turns every string that JavaScript's `new Date()` accepts
into a Date (`v3_dates`); a Date equals no string, so `{"pid": "noprefix-1"}`
matches nothing on v3, and a `like` pattern that became a Date is a 400.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from scicatfs.catalog.jsdate import parse_js_date

__all__ = ["FilterError", "JsDate", "KeyRange", "RANGE_OPERATORS", "key_range", "limits", "matches",
           "operators_in", "parse_filter", "project", "reject_unknown_keys", "sort_v3", "sort_v4", "v3_dates"]


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

#: LoopBack operator -> Mongo operator, as the v3 filter pipe maps them.
_LOOPBACK = {"inq": "$in", "nin": "$nin", "neq": "$ne", "gt": "$gt", "gte": "$gte",
             "lt": "$lt", "lte": "$lte", "like": "$regex", "ilike": "$regex",
             "and": "$and", "or": "$or", "exists": "$exists", "regexp": "$regex"}


#: Comparison operators in both spellings (what a server without range support refuses).
RANGE_OPERATORS = frozenset({"$gt", "$gte", "$lt", "$lte", "gt", "gte", "lt", "lte"})
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


def v3_dates(value: Any) -> Any:
    """A v3 `where` clause as the backend's pipe hands it to MongoDB.

    Every string held by an object key that `new Date()` parses becomes a
    `JsDate`, at any depth (operands of `like`, `gt`, clauses inside `or`);
    strings that are items of an array (`inq` lists) stay strings.
    """
    if isinstance(value, list):
        return [v3_dates(item) for item in value]
    if isinstance(value, dict):
        return {key: _as_date(v3_dates(item)) for key, item in value.items()}
    return value


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


def _candidates(value: Any, operand: Any) -> list[Any]:
    """Mongo semantics: a condition on an array field holds if it holds for any element.

    Against a Date operand, stored timestamps compare as Dates and other strings never match.
    """
    if value is _UNSET:
        return []
    found = [value, *value] if isinstance(value, list) else [value]
    if isinstance(operand, JsDate):
        return [_stored_as_date(candidate) for candidate in found]
    return found


def _regex(pattern: Any, options: str = "") -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise FilterError("$regex has to be a string")
    flags = re.IGNORECASE if "i" in options else 0
    flags |= re.MULTILINE if "m" in options else 0
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise FilterError(f"Invalid regular expression: {exc}") from None


def _like(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    return _regex(pattern, "i" if ignore_case else "")


def _compare(op: Callable[[Any, Any], bool], a: Any, b: Any) -> bool:
    try:
        return op(a, b)
    except TypeError:
        return False


def _field_matches(value: Any, condition: Any) -> bool:
    if not isinstance(condition, dict) or not condition or not all(
            isinstance(k, str) and (k.startswith("$") or k in _LOOPBACK) for k in condition):
        return any(candidate == condition for candidate in _candidates(value, condition))
    for raw_op, operand in condition.items():
        op = _LOOPBACK.get(raw_op, raw_op)
        found = _candidates(value, operand)
        if op == "$eq":
            ok = operand in found
        elif op == "$ne":
            ok = operand not in found
        elif op in ("$in", "$nin"):
            if not isinstance(operand, list):
                raise FilterError(f"{raw_op} needs an array")
            hit = any(candidate in operand for candidate in found)
            ok = hit if op == "$in" else not hit
        elif op == "$regex":
            pattern = (_like(operand, raw_op == "ilike") if raw_op in ("like", "ilike")
                       else _regex(operand, condition.get("$options", "")))
            ok = any(isinstance(c, str) and pattern.search(c) for c in found)
        elif op == "$options":
            continue
        elif op == "$exists":
            ok = (value is not _UNSET) == bool(operand)
        elif op in _COMPARISONS:
            ok = any(_compare(_COMPARISONS[op], c, operand) for c in found)
        else:
            raise FilterError(f"Unsupported operator {raw_op}")
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
        op = _LOOPBACK.get(key, key)
        if op == "$expr":
            if not _evaluate(doc, condition):
                return False
        elif op in ("$and", "$or"):
            if not isinstance(condition, list):
                raise FilterError(f"{key} needs an array")
            results = (matches(doc, clause) for clause in condition)
            if not (all(results) if op == "$and" else any(results)):
                return False
        elif key.startswith("$"):
            raise FilterError(f"Unsupported operator {key}")
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
        if _LOOPBACK.get(name, name) == "$and" and isinstance(condition, list):
            for clause in condition:
                found = found.tighter(key_range(clause, key))
        if name != key or not isinstance(condition, dict):
            continue
        for raw_op, operand in condition.items():
            op = _LOOPBACK.get(raw_op, raw_op)
            if op == "$regex" and raw_op != "ilike" and "i" not in str(condition.get("$options", "")):
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
    """Sort by a v4 `limits.sort` object: {"field": "asc" | "desc" | 1 | -1, ...} (see `_sorted`)."""
    if not isinstance(sort, dict):
        raise FilterError("limits.sort must be an object")
    order = []
    for field, direction in sort.items():
        if direction not in ("asc", "desc", 1, -1, "1", "-1"):
            raise FilterError(f"Invalid sort direction {direction!r} for {field}")
        order.append((field, direction in ("desc", -1, "-1")))
    return _sorted(docs, order, fields)


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
