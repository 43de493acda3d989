"""The demo catalog: users, dataset records, origdatablocks and the bytes of every file.

One `Catalog` feeds both sides of the demo and of the tests: `CatalogServer`
answers REST calls from it, and `Catalog.materialize` writes the same files
under an SFTP root, so every catalog entry has a real file of that size and,
where the catalog states one, that checksum.

The packaged fixtures (`catalog.json`, loaded by `Catalog.load_default`) hold:

- users ``stibbons`` / ``demo`` (groups ``uu``, ``faculty``; the demo user) and
  ``ridcully`` / ``wizzard`` (group ``archchancellor``);
- the "Thaum flux" dataset of Scitacean's documentation, exactly
  (``20.500.12269/72fe3ff6-105b-4c7f-b9d0-073b67c90ec3``, no checksums);
- datasets with md5, sha256 and the ``sha2`` alias, nested directories,
  URL-encoded scientificMetadata keys, a PID with several slashes
  (``20.500.12269/BRIGHTNESS/V200053``), a PID without a slash, a published
  dataset, one only ``ridcully`` may see, one whose top level holds a data file
  named ``metadata.json``, and a 9 MiB + 1 byte file.

File contents that the fixture file does not spell out are deterministic
pseudo-random bytes derived from (pid, path), generated on demand: a catalog
with 100,000 files holds no file bytes in memory. Likewise `add_generated`
adds a run of numbered datasets without files whose records are made when
asked for: a catalog of a million datasets holds a few numbers, not a million
records.

`pids_from` walks every PID in sorted order from a bound, as a database's
PID index would: the server answers PID-ordered pages through it.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import heapq
import json
import os
import posixpath
import random
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from itertools import chain
from typing import Any, overload

__all__ = ["Catalog", "User", "hashlib_name", "resolve_remote_path"]

#: chkAlg values seen in SciCat that hashlib does not know under that name.
_CHECKSUM_ALIASES = {"sha2": "sha256", "sha-256": "sha256", "sha-1": "sha1", "blake2": "blake2b"}

#: createdAt of datasets added without one: one second apart, in insertion order,
#: so that the server's default "newest first" order is deterministic.
_EPOCH = datetime(2023, 1, 1, tzinfo=timezone.utc)


def hashlib_name(chk_alg: str) -> str:
    """The hashlib name for a SciCat chkAlg value ("sha2" -> "sha256")."""
    name = chk_alg.lower()
    return _CHECKSUM_ALIASES.get(name, name)


def resolve_remote_path(source_folder: str, path: str) -> str | None:
    """Where a file entry lives on the file server, or None for a hostile entry.

    Mirrors the rule scicatfs itself applies: a relative path is joined to
    `source_folder`; an absolute path is accepted only if it lies inside it;
    anything that escapes it, is empty or holds a NUL has no place on disk.
    """
    if not path or "\0" in path or "\0" in source_folder:
        return None
    if any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in path.split("/")):
        return None  # no filesystem can hold such a name
    folder = posixpath.normpath("/" + source_folder.lstrip("/"))
    joined = posixpath.normpath(posixpath.join(folder, path))
    if joined == folder or not joined.startswith(folder.rstrip("/") + "/"):
        return None
    return joined


def _location(record: Mapping[str, Any], data_file: Mapping[str, Any]) -> str | None:
    """Where an entry's bytes live, or None when it has none (hostile or malformed entry)."""
    path, size, folder = data_file.get("path"), data_file.get("size"), record.get("sourceFolder")
    if not (isinstance(path, str) and isinstance(folder, str)
            and type(size) is int and size >= 0):
        return None
    return resolve_remote_path(folder, path)


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _later(stamp: Any, milliseconds: int) -> Any:
    """`stamp` plus some milliseconds: a dataset's blocks are stored one after another,
    so "newest block first" (the v4 block routes' default order) is well defined.
    A stamp that is not a timestamp is kept as given."""
    try:
        moment = datetime.fromisoformat(str(stamp))
    except ValueError:
        return stamp
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return _iso(moment + timedelta(milliseconds=milliseconds))


@dataclass(frozen=True, slots=True)
class User:
    """A local account of the catalog; groups decide what it may see."""

    username: str
    password: str
    groups: tuple[str, ...]
    email: str

    @property
    def id(self) -> str:
        """A stable Mongo-style user id (the real server uses an ObjectId)."""
        return hashlib.md5(self.username.encode()).hexdigest()[:24]

    def profile(self) -> dict[str, Any]:
        """The user document as the server returns it (no password, no groups)."""
        return {"_id": self.id, "id": self.id, "username": self.username,
                "email": self.email, "authStrategy": "local"}


@dataclass(slots=True)
class _Entry:
    """One dataset: its record, its origdatablocks and the explicit file contents."""

    record: dict[str, Any]
    blocks: list[dict[str, Any]]
    contents: dict[str, bytes] = field(default_factory=dict)


def _from(run: Sequence[str], index: int) -> Iterator[str]:
    """The items of ``run`` from ``index`` on, reaching it directly (islice would walk there)."""
    return (run[i] for i in range(index, len(run)))


class _Generated(Sequence[str]):
    """Datasets ``prefix + zero-padded number``, 0 to count - 1: sorted by PID as by number.

    Records are made on demand from the number; all share one owner and access.
    """

    def __init__(self, prefix: str, count: int, access: dict[str, Any], first: datetime) -> None:
        self.prefix = prefix
        self.count = count
        self.width = len(str(max(count - 1, 0)))
        self.access = access
        self.first = first

    def __len__(self) -> int:
        return self.count

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if not -self.count <= index < self.count:
            raise IndexError(index)
        return f"{self.prefix}{index % self.count:0{self.width}d}"

    def number(self, pid: str) -> int | None:
        """The number of ``pid`` in this run, or None if it is not one of its PIDs."""
        digits = pid[len(self.prefix):]
        if not pid.startswith(self.prefix) or len(digits) != self.width or not digits.isdigit():
            return None
        number = int(digits)
        return number if number < self.count else None

    def record(self, number: int) -> dict[str, Any]:
        moment = _iso(self.first + timedelta(seconds=number))
        return {"pid": self[number], "datasetName": f"generated {number}", "type": "raw",
                "owner": "ingestor", "contactEmail": "ingestor@example.org",
                "sourceFolder": f"/generated/{number}", "creationTime": moment, "size": 0,
                "numberOfFiles": 0, "createdBy": "ingestor", "updatedBy": "ingestor",
                "createdAt": moment, "updatedAt": moment, "version": "v3", **self.access}


class Catalog:
    """Users, datasets, origdatablocks and file bytes of a demo SciCat instance."""

    def __init__(self, users: list[User] | None = None) -> None:
        self.users: dict[str, User] = {user.username: user for user in users or []}
        self._entries: dict[str, _Entry] = {}
        self._generated: list[_Generated] = []
        self._sorted: list[str] | None = None  # the explicit PIDs, sorted (rebuilt after an addition)

    @classmethod
    def load_default(cls) -> Catalog:
        """The packaged fixtures described in this module's docstring."""
        text = resources.files(__package__).joinpath("catalog.json").read_text("utf-8")
        return cls.from_json(json.loads(text))

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Catalog:
        """Build a catalog from the layout of `catalog.json`."""
        catalog = cls([User(u["username"], u["password"], tuple(u["groups"]), u["email"])
                       for u in document.get("users", [])])
        for item in document.get("datasets", []):
            contents = {path: text.encode() for path, text in item.get("contents", {}).items()}
            catalog.add_dataset(item["record"], item["files"], chk_alg=item.get("chkAlg"),
                                blocks=item.get("blocks", 1), contents=contents)
        return catalog

    def add_user(self, username: str, password: str, groups: list[str], email: str) -> User:
        """Add (or replace) a local account."""
        user = User(username, password, tuple(groups), email)
        self.users[username] = user
        return user

    def add_dataset(self, record: dict, files: list[dict], *, chk_alg: str | None = None,
                    blocks: int = 1, contents: dict[str, bytes] | None = None,
                    block_access: dict | None = None) -> None:
        """Add a dataset whose `files` (DataFile dicts) are spread over `blocks` origdatablocks.

        Missing contents are generated from (pid, path). With `chk_alg`, each file
        without a `chk` gets the checksum of its real bytes; an explicit `chk` is
        kept as given (that is how tests make wrong checksums). Entries with a
        hostile path are stored as given and simply have no content; so are
        malformed records and entries (tests feed them to clients on purpose):
        only the pid must be a string.
        `block_access` overrides the access fields the blocks copy from the record
        (ownerGroup, accessGroups, isPublished), because SciCat filters blocks by
        their own fields.
        """
        if blocks < 1:
            raise ValueError("a dataset needs at least one origdatablock")
        pid = record.get("pid")
        if not isinstance(pid, str):
            raise ValueError(f"a dataset record needs a string 'pid', got {pid!r}")
        if pid in self._entries or self._generated_record(pid) is not None:
            raise ValueError(f"duplicate pid {pid!r}")
        self._sorted = None
        moment = _iso(_EPOCH + timedelta(seconds=len(self._entries)))
        full = {"type": "raw", "accessGroups": [], "isPublished": False,
                "createdBy": "ingestor", "updatedBy": "ingestor", "createdAt": moment,
                "updatedAt": moment, "version": "v3"} | copy.deepcopy(record)
        entry = _Entry(full, [], dict(contents or {}))
        self._entries[pid] = entry
        data_files = [self._complete_file(entry, dict(f), chk_alg) for f in files]
        access = {key: full[key] for key in ("ownerGroup", "accessGroups", "isPublished")}
        access |= block_access or {}
        per_block = -(-len(data_files) // blocks) if data_files else 0
        for index in range(blocks):
            chunk = data_files[index * per_block:(index + 1) * per_block]
            block = {"_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{pid}#{index}")),
                     "datasetId": pid,
                     "size": sum(f["size"] for f in chunk if isinstance(f["size"], int)),
                     "dataFileList": chunk, **copy.deepcopy(access),
                     "createdBy": full["createdBy"], "updatedBy": full["updatedBy"],
                     "createdAt": _later(full["createdAt"], index),
                     "updatedAt": _later(full["updatedAt"], index)}
            if chk_alg is not None:
                block["chkAlg"] = chk_alg
            entry.blocks.append(block)
        full["size"] = sum(block["size"] for block in entry.blocks if isinstance(block["size"], int))
        full["numberOfFiles"] = sum(len(block["dataFileList"]) for block in entry.blocks)

    def add_generated(self, prefix: str, count: int, *, owner_group: str,
                      access_groups: list[str] | None = None, published: bool = False) -> None:
        """Add datasets ``prefix + number`` (numbers zero-padded to one width), none with files.

        Their records are made when asked for, so a million of them cost no
        memory; their creation times are one second apart from 2024-01-01.
        """
        if count < 1:
            raise ValueError("a generated run needs at least one dataset")
        run = _Generated(prefix, count, {"ownerGroup": owner_group, "accessGroups": list(access_groups or []),
                                         "isPublished": published}, datetime(2024, 1, 1, tzinfo=timezone.utc))
        clash = next((pid for pid in self._entries if run.number(pid) is not None), None)
        clash = clash or next((other.prefix for other in self._generated
                               if other.prefix.startswith(prefix) or prefix.startswith(other.prefix)), None)
        if clash is not None:
            raise ValueError(f"generated PIDs {prefix}… clash with {clash!r}")
        self._generated.append(run)

    def _complete_file(self, entry: _Entry, data_file: dict, chk_alg: str | None) -> dict:
        path = data_file.get("path")
        if "size" not in data_file:
            data_file["size"] = len(entry.contents.get(path, b""))
        if "creationTime" in entry.record:
            data_file.setdefault("time", entry.record["creationTime"])
        if chk_alg is not None and "chk" not in data_file and _location(entry.record, data_file):
            digest = hashlib.new(hashlib_name(chk_alg))
            digest.update(self._bytes(entry, path, data_file["size"]))
            data_file["chk"] = digest.hexdigest()
        return data_file

    # -- reading ---------------------------------------------------------------

    def pids(self) -> list[str]:
        """All PIDs in insertion order (generated runs after the others)."""
        return list(chain(self._entries, *self._generated))

    def pids_from(self, start: str | None = None, *, inclusive: bool = True) -> Iterator[str]:
        """Every PID from ``start`` on (above it unless ``inclusive``), in PID order.

        Finding the start costs a binary search per run of PIDs; each PID
        after it costs O(1): what a B-tree index on the PID gives a database.
        """
        if self._sorted is None:
            self._sorted = sorted(self._entries)
        runs: list[Sequence[str]] = [self._sorted, *self._generated]
        if start is None:
            return heapq.merge(*(iter(run) for run in runs))
        find = bisect.bisect_left if inclusive else bisect.bisect_right
        return heapq.merge(*(_from(run, find(run, start)) for run in runs))

    def dataset(self, pid: str) -> dict[str, Any] | None:
        """The stored (or generated) dataset record (no origdatablocks), or None. Do not mutate."""
        entry = self._entries.get(pid)
        return entry.record if entry else self._generated_record(pid)

    def _generated_record(self, pid: str) -> dict[str, Any] | None:
        for run in self._generated:
            number = run.number(pid)
            if number is not None:
                return run.record(number)
        return None

    def generated_runs(self) -> Iterator[tuple[dict[str, Any], int]]:
        """(access fields, number of datasets) of each generated run: counts without records."""
        return ((run.access, run.count) for run in self._generated)

    def explicit_datasets(self) -> Iterator[dict[str, Any]]:
        """The records added one by one (not generated), in insertion order."""
        return (entry.record for entry in self._entries.values())

    def datasets(self) -> Iterator[dict[str, Any]]:
        """Every dataset record in insertion order (generated runs after the others)."""
        generated = (run.record(number) for run in self._generated for number in range(run.count))
        return chain(self.explicit_datasets(), generated)

    def origdatablocks(self, pid: str) -> list[dict[str, Any]]:
        """The origdatablocks of a dataset ([] when unknown). Do not mutate."""
        entry = self._entries.get(pid)
        return entry.blocks if entry else []

    def all_origdatablocks(self) -> Iterator[dict[str, Any]]:
        """Every origdatablock of every dataset."""
        return (block for entry in self._entries.values() for block in entry.blocks)

    def files(self, pid: str) -> Iterator[dict[str, Any]]:
        """Every DataFile entry of a dataset, over all its blocks."""
        return (f for block in self.origdatablocks(pid) for f in block["dataFileList"])

    def content(self, pid: str, path: str) -> bytes:
        """The exact bytes of a file entry; KeyError for unknown, hostile or malformed entries."""
        entry = self._entries[pid]
        data_file = next((f for f in self.files(pid) if f.get("path") == path), None)
        if data_file is None or _location(entry.record, data_file) is None:
            raise KeyError((pid, path))
        return self._bytes(entry, path, data_file["size"])

    @staticmethod
    def _bytes(entry: _Entry, path: str, size: int) -> bytes:
        explicit = entry.contents.get(path)
        if explicit is not None:
            return explicit
        return random.Random(f"{entry.record['pid']}\0{path}").randbytes(size)

    # -- writing to disk -------------------------------------------------------

    def materialize(self, root: Path) -> None:
        """Write every file that has content to `root / sourceFolder / path`.

        `root` itself is left alone (it is typically an sshd chroot, which must
        stay root-owned and not group/world writable); file mtimes follow the
        entries' `time`.
        """
        for entry in self._entries.values():
            seen: set[str] = set()
            for data_file in (f for block in entry.blocks for f in block["dataFileList"]):
                remote = _location(entry.record, data_file)
                if remote is None or remote in seen:
                    continue
                seen.add(remote)
                target = root / remote.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(self._bytes(entry, data_file["path"], data_file["size"]))
                try:
                    mtime = datetime.fromisoformat(str(data_file.get("time"))).timestamp()
                except ValueError:
                    continue  # a malformed time is the catalog's problem, not the file's
                os.utime(target, (mtime, mtime))
