"""The datasets ``fullfacet`` route's answer, computed as scicat-backend-next's pipeline does.

The backend (``createFullfacetPipeline`` in src/common/utils.ts) turns every
key of the ``fields`` object into a ``$match`` stage, then runs one ``$facet``
branch per requested facet: unwind the field if it is an array, apply the
conditions of the *other* facet fields again, group by value with a count,
sort by value descending. An ``all`` branch counts the documents that match
everything.

* ``userGroups``: ownerGroup or accessGroups among the given groups (the
  route fills it in with the caller's groups unless ``isPublished`` is set);
* ``text``: a full-text search (here: a case-insensitive substring of the
  name or the description);
* ``mode``: a raw Mongo condition; every other key: equality, or ``$in`` for
  a list.

A facet on a field the deployment's schema does not have is left out of the
answer (the backend logs "Facet not part of any model"); here the schema is
the backend's dataset fields plus any field a matching document has.
Documents without the field are grouped under ``null``, as ``$group`` does,
unless the field is an array (``$unwind`` drops them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from scicatfs.demo import filters
from scicatfs.demo.filters import FilterError

__all__ = ["full_facet"]

#: Top-level fields of backend-next's DatasetClass (the v4 schema): facets on them always answer.
SCHEMA = frozenset({
    "pid", "owner", "ownerEmail", "orcidOfOwner", "contactEmail", "sourceFolder", "sourceFolderHost",
    "size", "packedSize", "numberOfFiles", "numberOfFilesArchived", "creationTime", "type",
    "validationStatus", "keywords", "description", "datasetName", "classification", "license",
    "isPublished", "techniques", "sharedWith", "relationships", "datasetlifecycle", "scientificMetadata",
    "comment", "dataQualityMetrics", "principalInvestigators", "startTime", "endTime",
    "creationLocation", "dataFormat", "proposalIds", "sampleIds", "instrumentIds", "inputDatasets",
    "usedSoftware", "jobParameters", "jobLogData", "ownerGroup", "accessGroups", "instrumentGroup",
    "createdBy", "updatedBy", "createdAt", "updatedAt", "version",
})
#: The array fields among them (``$unwind`` before grouping: a document without one counts nowhere).
ARRAYS = frozenset({
    "keywords", "techniques", "sharedWith", "relationships", "principalInvestigators", "proposalIds",
    "sampleIds", "instrumentIds", "inputDatasets", "usedSoftware", "accessGroups",
})


def _condition(key: str, value: Any) -> dict[str, Any]:
    """One key of ``fields`` as a Mongo ``where`` clause."""
    if key == "userGroups":
        groups = value if isinstance(value, list) else [value]
        return {"$or": [{"ownerGroup": {"$in": groups}}, {"accessGroups": {"$in": groups}}]}
    if key == "mode":
        if not isinstance(value, dict):
            raise FilterError("mode must be an object")
        return value
    if isinstance(value, list):
        return {key: value[0]} if len(value) == 1 else {key: {"$in": value}}
    return {key: value}


def _predicate(key: str, value: Any) -> Callable[[Mapping[str, Any]], bool]:
    """One key of ``fields`` as a test of a document; the route's own keys without the generic
    matcher, which is slow over the hundreds of thousands of generated datasets tests list."""
    if key == "text":
        needle = str(value).lower()
        return lambda doc: any(needle in str(doc.get(name) or "").lower() for name in ("datasetName", "description"))
    if key == "userGroups":
        groups = set(value if isinstance(value, list) else [value])
        return lambda doc: doc.get("ownerGroup") in groups or bool(groups.intersection(doc.get("accessGroups") or ()))
    if key == "isPublished" and isinstance(value, bool):
        return lambda doc: bool(doc.get("isPublished")) is value
    clause = _condition(key, value)
    return lambda doc: filters.matches(doc, clause)


def full_facet(docs: Iterable[dict[str, Any]], fields: Mapping[str, Any], facets: list[Any]) -> list[dict[str, Any]]:
    """The route's JSON answer for the readable ``docs``: ``[{facet: [{"_id", "count"}], "all": [...]}]``."""
    if not isinstance(facets, list) or not all(isinstance(facet, str) for facet in facets):
        raise FilterError("facets must be an array of field names")
    tests = [_predicate(key, value) for key, value in fields.items()]
    facet_tests = {key: _predicate(key, value) for key, value in fields.items() if key in facets}
    base = [doc for doc in docs if all(test(doc) for test in tests)]
    answer: dict[str, Any] = {}
    for facet in facets:
        if facet not in SCHEMA and not any(facet in doc for doc in base):
            continue
        others = [test for key, test in facet_tests.items() if key != facet]
        counts: Counter[Any] = Counter()
        for doc in base:
            if not all(test(doc) for test in others):
                continue
            value = doc.get(facet)
            if isinstance(value, list):
                counts.update(_hashable(item) for item in value)
            elif facet not in ARRAYS or value is not None:
                counts[_hashable(value)] += 1
        answer[facet] = [{"_id": value, "count": count}
                         for value, count in sorted(counts.items(), key=_descending, reverse=True)]
    total = sum(1 for doc in base if all(test(doc) for test in facet_tests.values()))
    answer["all"] = [{"totalSets": total}] if total else []
    return [answer]


def _hashable(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else repr(value)


def _descending(item: tuple[Any, int]) -> tuple[int, str]:
    """Mongo's ``{_id: -1}``: values of one type together (null lowest), each type in order."""
    value = item[0]
    if value is None:
        return (0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, f"{value:030.6f}")
    return (2, str(value))
