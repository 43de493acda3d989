""""No such name": the one answer of the tree that is not a failure, free of FUSE.

It lives apart from :mod:`scicatfs.fs.errors` (which turns errors into FUSE
errno answers and so imports pyfuse3) because the namespace raises it, and the
namespace is also used without FUSE (:mod:`scicatfs.fsspec`).
"""

from __future__ import annotations

__all__ = ["NoEntry"]


class NoEntry(LookupError):
    """The namespace has nothing under this name: ENOENT, an everyday answer, not a failure."""
