""""No such name" and "not this kind of node": the tree's everyday answers, free of FUSE.

It lives apart from :mod:`scicatfs.fs.errors` (which turns errors into FUSE
errno answers and so imports pyfuse3) because the namespace raises it, and the
namespace is also used without FUSE (:mod:`scicatfs.fsspec`).
"""

from __future__ import annotations

import errno

__all__ = ["NoEntry", "WrongKind"]


class NoEntry(LookupError):
    """The namespace has nothing under this name: ENOENT, an everyday answer, not a failure."""


class WrongKind(Exception):
    """A request that the node's type has no answer for (``readlink`` of a directory, ``opendir``
    of a file): the POSIX errno ``code``, an everyday answer like :class:`NoEntry`."""

    def __init__(self, code: int, node: object) -> None:
        super().__init__(f"{errno.errorcode[code]}: {node}")
        self.code = code
