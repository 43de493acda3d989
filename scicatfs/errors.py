"""The one base class of every error a layer raises for a user to read.

Catalog, transfer and cache errors all derive from :class:`ScicatfsError`, and
each layer phrases its messages for users (which server, which file, what to
do). The filesystem maps errors to errno and logs them without knowing which
layer they came from: it imports this module and the layer directly below it,
never one further down (a transfer error reaches it through the cache
unchanged, as a ``ScicatfsError``).
"""

from __future__ import annotations

__all__ = ["ScicatfsError"]


class ScicatfsError(Exception):
    """A failure a layer below the filesystem has described for the user."""
