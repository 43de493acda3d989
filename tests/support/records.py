"""Dataset records for catalogs that tests build for one purpose."""

from __future__ import annotations

from typing import Any

__all__ = ["dataset_record"]


def dataset_record(pid: str, source_folder: str, **fields: Any) -> dict[str, Any]:
    """A minimal valid raw-dataset record owned by the demo user's group ``uu``; ``fields`` override."""
    return {
        "pid": pid,
        "datasetName": pid,
        "owner": "Ponder Stibbons",
        "ownerGroup": "uu",
        "contactEmail": "p.stibbons@uu.am",
        "creationLocation": "UnseenUniversity",
        "sourceFolder": source_folder,
        "creationTime": "2023-05-01T10:00:00.000Z",
    } | fields
