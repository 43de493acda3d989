"""Typed SciCat records, parsed from JSON and validated.

Real catalogs are sloppy, so parsing is lenient about what cannot hurt (missing
optional fields, numbers sent as strings or floats, missing file times) and
strict about what can: every file path comes from an untrusted server and ends
up as a path in the mounted tree and on the file server, so a path that could
leave the dataset's ``sourceFolder`` is dropped, never repaired.

A record that is unusable as a whole (no PID, a ``sourceFolder`` that is not a
string, ...) raises :class:`BadResponse` naming the PID and the field; only that
dataset is affected. A bad *file entry* is dropped and logged, and the rest of
the dataset stays usable.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import posixpath
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote

from scicatfs.catalog.errors import BadResponse

log = logging.getLogger(__name__)

#: Catalog spellings of checksum algorithms, mapped to hashlib names.
ALGORITHM_ALIASES: Mapping[str, str] = {
    "md5": "md5",
    "sha1": "sha1",
    "sha-1": "sha1",
    "sha2": "sha256",
    "sha-2": "sha256",
    "sha224": "sha224",
    "sha-224": "sha224",
    "sha256": "sha256",
    "sha-256": "sha256",
    "sha384": "sha384",
    "sha-384": "sha384",
    "sha512": "sha512",
    "sha-512": "sha512",
    "sha3-256": "sha3_256",
    "sha3_256": "sha3_256",
    "sha3-512": "sha3_512",
    "sha3_512": "sha3_512",
    "blake2b": "blake2b",
    "blake2s": "blake2s",
}

#: Largest size a file may claim; anything above cannot be a real file (off_t is signed 64-bit).
MAX_FILE_SIZE = 2**63 - 1

#: Dropped entries logged one by one per dataset; the rest are summarised in one line.
_LOGGED_PER_DATASET = 10

_HEX_DIGITS = frozenset(string.hexdigits)

#: Keys that hold file lists; they are not part of the record shown as metadata.json.
_FILE_LIST_KEYS = ("origdatablocks", "datablocks")


@dataclass(frozen=True, slots=True)
class Checksum:
    """A file checksum; ``algorithm`` is a name ``hashlib.new`` accepts."""

    algorithm: str
    hexdigest: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hexdigest}"


@dataclass(frozen=True, slots=True)
class DataFile:
    """One file of a dataset, as the catalog lists it."""

    path: str
    remote_path: str
    size: int
    mtime: float
    checksum: Checksum | None


@dataclass(frozen=True, slots=True)
class Dataset:
    """A dataset record with its validated files (unique by path, sorted by path)."""

    pid: str
    record: Mapping[str, Any]  # as the catalog sent it, without the file lists
    source_folder: str
    source_folder_host: str | None
    creation_time: float
    files: tuple[DataFile, ...]


def metadata_json(dataset: Dataset) -> bytes:
    """Render the record as ``metadata.json``: stable, readable, and diff-friendly.

    scientificMetadata keys are stored URL-encoded by newer servers (``%20``,
    ``%2E``) and v4 routes return them raw, so they are decoded here.
    """
    record = dict(dataset.record)  # parse_dataset already left the file lists out
    if "scientificMetadata" in record:
        record["scientificMetadata"] = _decode_keys(record["scientificMetadata"])
    text = json.dumps(record, sort_keys=True, indent=2, ensure_ascii=False)
    return (text + "\n").encode("utf-8", errors="surrogatepass")


def _decode_keys(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {unquote(str(k)): _decode_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_keys(v) for v in value]
    return value


def parse_dataset(raw: Any, blocks: Iterable[Any] | None = None) -> Dataset:
    """Build a :class:`Dataset` from a dataset record and its origdatablocks.

    ``blocks`` defaults to the record's own ``origdatablocks`` (v4 with
    ``include=origdatablocks``); v3 callers pass the blocks they fetched
    separately. Raises :class:`BadResponse` if the record itself is unusable.
    """
    if not isinstance(raw, Mapping):
        raise BadResponse(f"catalog returned a dataset record that is not a JSON object: {_brief(raw)}")
    pid = raw.get("pid")
    if not isinstance(pid, str) or not pid:
        raise BadResponse(f"catalog returned a dataset record without a valid 'pid' (got {_brief(pid)})")
    source_folder = _required_str(raw, "sourceFolder", pid)
    if "\0" in source_folder:
        raise BadResponse(f"dataset {pid!r}: field 'sourceFolder' contains NUL", pid)
    host = raw.get("sourceFolderHost")
    if host is not None and not isinstance(host, str):
        raise BadResponse(f"dataset {pid!r}: field 'sourceFolderHost' is not a string", pid)
    creation_time = parse_time(raw.get("creationTime"))
    if creation_time is None:
        raise BadResponse(
            f"dataset {pid!r}: field 'creationTime' is missing or not a timestamp "
            f"(got {_brief(raw.get('creationTime'))})",
            pid,
        )
    if blocks is None:
        blocks = raw.get("origdatablocks") or ()
    if not isinstance(blocks, Iterable) or isinstance(blocks, (str, bytes, Mapping)):
        raise BadResponse(f"dataset {pid!r}: field 'origdatablocks' is not a list", pid)
    record = {k: v for k, v in raw.items() if k not in _FILE_LIST_KEYS}
    files = _FileListParser(pid, source_folder, creation_time).parse(blocks)
    return Dataset(
        pid=pid,
        record=record,
        source_folder=source_folder,
        source_folder_host=host or None,
        creation_time=creation_time,
        files=files,
    )


def parse_time(value: Any) -> float | None:
    """POSIX seconds from an RFC 3339 string (naive means UTC) or a number; None if unusable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def parse_size(value: Any) -> int | None:
    """A byte count from an int, an integral float or a string of digits; None if unusable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            return None
    if isinstance(value, float):
        if not value.is_integer():
            return None
        value = int(value)
    if not isinstance(value, int) or value < 0 or value > MAX_FILE_SIZE:
        return None
    return value


def parse_checksum(algorithm: Any, digest: Any) -> Checksum | None:
    """A :class:`Checksum`, or None when the catalog gives none or an unknown
    algorithm (warned once per name). A digest of the wrong shape raises ValueError."""
    if digest in (None, "") or algorithm in (None, ""):
        return None
    known = _algorithm(str(algorithm))
    if known is None:
        return None
    name, expected = known
    if not isinstance(digest, str):
        raise ValueError(f"checksum is not a string: {_brief(digest)}")
    hexdigest = digest.strip().lower()
    if len(hexdigest) != expected or not _HEX_DIGITS.issuperset(hexdigest):
        raise ValueError(f"{name} checksum {digest!r} is not {expected} hex digits")
    return Checksum(name, hexdigest)


@functools.cache
def _algorithm(spelling: str) -> tuple[str, int] | None:
    """(hashlib name, hex digest length) for a catalog spelling; warns once per unknown one."""
    name = ALGORITHM_ALIASES.get(spelling.strip().lower())
    if name is None:
        log.warning(
            "catalog uses checksum algorithm %r, which scicatfs does not know; "
            "files with it are not verified",
            spelling,
        )
        return None
    return name, hashlib.new(name).digest_size * 2


def relative_path(path: Any, source_folder: str) -> str:
    """The validated path of a file relative to ``source_folder``.

    Raises ValueError (with the reason) for anything that could name a file
    outside the dataset or that is not a plain relative path.
    """
    if not isinstance(path, str):
        raise ValueError("path is not a string")
    if "\0" in path:
        raise ValueError("path contains NUL")
    if path.startswith("/"):
        folder = posixpath.normpath(source_folder) if source_folder.startswith("/") else None
        if folder is None:
            raise ValueError("absolute path with a relative sourceFolder")
        prefix = folder.rstrip("/") + "/"
        if not path.startswith(prefix):
            raise ValueError("absolute path outside sourceFolder")
        path = path[len(prefix) :]
    if not path:
        raise ValueError("empty path")
    for component in path.split("/"):
        if component in ("", ".", ".."):
            raise ValueError(f"path component {component!r} is not allowed")
        try:
            encoded = component.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("path is not valid Unicode") from None
        if len(encoded) > 255:
            raise ValueError("path component longer than 255 bytes")
    return path


class _FileListParser:
    """Merges a dataset's origdatablocks into one validated, deduplicated file list.

    Duplicate paths: the entry from the block with the newest ``createdAt``
    wins; between entries of equally new blocks the larger one wins, then the
    first listed. A path that is also a directory of other files is dropped
    (a name cannot be both), keeping the files below it.
    """

    def __init__(self, pid: str, source_folder: str, creation_time: float) -> None:
        self.pid = pid
        self.source_folder = source_folder
        self.folder = source_folder.rstrip("/") + "/"  # remote_path = folder + path
        self.creation_time = creation_time
        self.problems = 0

    def parse(self, blocks: Iterable[Any]) -> tuple[DataFile, ...]:
        best: dict[str, tuple[tuple[float, int, int], DataFile]] = {}
        duplicates = 0
        order = 0
        for block in blocks:
            if not isinstance(block, Mapping):
                self._report(f"skipped an origdatablock that is not a JSON object: {_brief(block)}")
                continue
            entries = block.get("dataFileList") or ()
            if not isinstance(entries, list):
                self._report(f"skipped origdatablock {_brief(block.get('_id'))}: dataFileList is not a list")
                continue
            block_time = parse_time(block.get("createdAt")) or 0.0
            for entry in entries:
                datafile = self._parse_entry(entry, block.get("chkAlg"))
                if datafile is None:
                    continue
                order -= 1
                rank = (block_time, datafile.size, order)
                previous = best.get(datafile.path)
                if previous is not None:
                    duplicates += 1
                    if previous[0] >= rank:
                        continue
                best[datafile.path] = (rank, datafile)
        if duplicates:
            log.warning(
                "dataset %r lists %d duplicate file path(s); kept the entry from the newest block",
                self.pid,
                duplicates,
            )
        directories = {parent for path in best for parent in _parents(path)}
        for path in directories.intersection(best):
            self._drop("path is both a file and a directory", path)
            del best[path]
        if self.problems > _LOGGED_PER_DATASET:
            log.warning(
                "dataset %r: %d problems with file entries in total (first %d logged above)",
                self.pid,
                self.problems,
                _LOGGED_PER_DATASET,
            )
        return tuple(best[path][1] for path in sorted(best))

    def _parse_entry(self, entry: Any, algorithm: Any) -> DataFile | None:
        if not isinstance(entry, Mapping):
            self._drop("file entry is not a JSON object", entry)
            return None
        raw_path = entry.get("path")
        try:
            path = relative_path(raw_path, self.source_folder)
        except ValueError as reason:
            self._drop(str(reason), raw_path)
            return None
        size = parse_size(entry.get("size"))
        if size is None:
            self._drop(f"unusable size {_brief(entry.get('size'))}", raw_path)
            return None
        try:
            checksum = parse_checksum(algorithm, entry.get("chk"))
        except ValueError as reason:
            self._report(f"file {_brief(raw_path)} kept without checksum: {reason}")
            checksum = None
        mtime = parse_time(entry.get("time"))
        return DataFile(
            path=path,
            remote_path=self.folder + path,
            size=size,
            mtime=self.creation_time if mtime is None else mtime,
            checksum=checksum,
        )

    def _drop(self, reason: str, path: Any) -> None:
        self._report(f"dropped file {_brief(path)}: {reason}")

    def _report(self, problem: str) -> None:
        """Log one problem, up to a limit per dataset: a hostile list must not flood the log."""
        self.problems += 1
        if self.problems <= _LOGGED_PER_DATASET:
            log.warning("dataset %r: %s", self.pid, problem)


def _parents(path: str) -> Iterable[str]:
    parts = path.split("/")
    for end in range(1, len(parts)):
        yield "/".join(parts[:end])


def _required_str(raw: Mapping[str, Any], field: str, pid: str) -> str:
    value = raw.get(field)
    if not isinstance(value, str) or not value:
        raise BadResponse(
            f"dataset {pid!r}: field {field!r} is missing or not a non-empty string "
            f"(got {_brief(value)})",
            pid,
        )
    return value


def _brief(value: Any, limit: int = 120) -> str:
    """repr() cut short: hostile values can be huge, log lines should not be."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
