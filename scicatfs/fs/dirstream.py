"""Directory listings addressed by index, produced lazily.

The kernel reads a directory in buffer-sized pieces, each ``readdir(start)``
resuming at the ``next_id`` of the last entry it accepted. Using the entry's
index + 1 as ``next_id`` within one open directory handle keeps entries from
being skipped or repeated however big the directory is, as long as the
sequence stays the same for that handle: a dataset directory is a snapshot
taken at opendir; a PID level restarts the catalog's PID-ordered stream.

Entries are pulled from the source only as the kernel asks for them, and only
a short window of recent ones is kept, so listing a catalog of a million
datasets holds a window, not a million names. The window covers the usual
resume point (the entry that did not fit in the previous buffer); an earlier
position, as after ``rewinddir``, restarts the source and skips forward.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

__all__ = ["DirectoryStream"]

E = TypeVar("E")

WINDOW = 256


class DirectoryStream(Generic[E]):
    """The entries of one open directory, numbered from 0."""

    def __init__(self, source: Callable[[], AsyncIterator[E]]) -> None:
        self._source = source
        self._iterator: AsyncIterator[E] | None = None
        self._produced = 0
        self._window: deque[tuple[int, E]] = deque(maxlen=WINDOW)
        self._exhausted = False

    async def entries_from(self, start: int) -> AsyncIterator[tuple[int, E]]:
        """Yield ``(index, entry)`` for every entry at ``index >= start``."""
        oldest = self._window[0][0] if self._window else self._produced
        if self._iterator is None or start < oldest:
            await self._restart()
        for index, entry in list(self._window):
            if index >= start:
                yield index, entry
        assert self._iterator is not None
        while not self._exhausted:
            try:
                entry = await anext(self._iterator)
            except StopAsyncIteration:
                self._exhausted = True
                return
            index = self._produced
            self._produced += 1
            self._window.append((index, entry))
            if index >= start:
                yield index, entry

    async def _restart(self) -> None:
        await self.aclose()
        self._iterator = self._source()
        self._produced = 0
        self._window.clear()
        self._exhausted = False

    async def aclose(self) -> None:
        """Release the source (an open catalog page stream, for instance)."""
        iterator, self._iterator = self._iterator, None
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
