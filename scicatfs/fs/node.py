"""What every node of the mount's tree can be asked, and the answers' shapes.

A node is a plain hashable value whose identity is its inode key (see
:mod:`scicatfs.fs.inodes`): two equal nodes are the same file to the kernel.
Each kind of node is one class that answers for itself, given the
:class:`~scicatfs.fs.namespace.Namespace` that holds the catalog, the record
caches and the mount's settings:

* ``lookup(ns, name)``: the child under ``name`` (directories only);
* ``attributes(ns)``: what ``stat`` shows;
* ``listing(ns)``: the entries of a directory;
* ``content(ns)``: the bytes of a generated file;
* ``target(ns)``: where a symbolic link points;
* ``parent()``: the directory that holds it (what ``..`` names in a listing);
* ``where()``, ``where_child(name)``: (pid, path) for log lines;
* ``xattrs(ns)``: ``user.scicat.*`` attributes.

Defaults answer as POSIX does for a node that is not of the matching type,
so a class only implements what its kind has.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from scicatfs.fs.noentry import NoEntry, WrongKind

if TYPE_CHECKING:
    from scicatfs.fs.namespace import Namespace

__all__ = ["Attributes", "Entry", "Kind", "Listing", "Node"]


class Kind(enum.Enum):
    """The file type a node shows (``st_mode``'s S_IFMT part)."""

    DIRECTORY = "directory"
    FILE = "file"
    SYMLINK = "symlink"


@dataclass(frozen=True, slots=True)
class Attributes:
    """What ``stat`` shows, plus how long the kernel may trust it (``ttl`` seconds)."""

    kind: Kind
    size: int
    mtime: float
    nlink: int
    ttl: float
    cached: int | None = None

    @property
    def is_dir(self) -> bool:
        return self.kind is Kind.DIRECTORY


Entry = tuple[str, "Node", Attributes]
#: A directory's entries: a snapshot, or a source restarted to re-read them (see fs.dirstream).
Listing = tuple[Entry, ...] | Callable[[], AsyncIterator[Entry]]


class Node:
    """Base of every node class; subclasses are frozen dataclasses (hashable values)."""

    __slots__ = ()

    kind: ClassVar[Kind]
    #: Generated files whose content follows the cache are read with direct I/O (no page cache).
    direct_io: ClassVar[bool] = False

    async def lookup(self, ns: Namespace, name: str) -> Node:
        raise NoEntry(name)

    async def attributes(self, ns: Namespace) -> Attributes:
        raise NotImplementedError

    async def listing(self, ns: Namespace) -> Listing:
        raise WrongKind(errno.ENOTDIR, self)

    async def content(self, ns: Namespace) -> bytes:
        raise WrongKind(errno.EISDIR, self)

    async def target(self, ns: Namespace) -> str:
        raise WrongKind(errno.EINVAL, self)

    def parent(self) -> Node:
        raise NotImplementedError

    def where(self) -> tuple[str | None, str | None]:
        return None, None

    def where_child(self, name: str) -> tuple[str | None, str | None]:
        """(pid, path) of this directory's child ``name`` for log lines, before it is looked up."""
        pid, path = self.where()
        return pid, f"{path.rstrip('/')}/{name}" if path else name

    async def xattrs(self, ns: Namespace) -> dict[str, str]:
        return {}
