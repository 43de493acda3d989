"""Bounded probes of a mounted filesystem: actions that a hung mount cannot hang.

A read from a FUSE mount that stopped answering blocks in the kernel, and no
Python timeout can interrupt it. So every probe runs in a daemon thread and
the test waits for it with a deadline: a hang becomes a test failure that
names the deadline instead of a frozen test run.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Background", "Outcome", "bounded", "read_uncached"]


@dataclass
class Outcome:
    """What an action returned or raised, and how long it took."""

    value: Any = None
    error: BaseException | None = None
    elapsed: float = 0.0

    def unwrap(self) -> Any:
        """The value, or the action's exception re-raised in the caller's thread."""
        if self.error is not None:
            raise self.error
        return self.value


class Background:
    """Run ``action`` in a daemon thread now; collect its outcome later with a deadline."""

    def __init__(self, action: Callable[[], Any]) -> None:
        self._outcome = Outcome()
        self._thread = threading.Thread(target=self._run, args=(action,), daemon=True)
        self._started = time.monotonic()
        self._thread.start()

    def _run(self, action: Callable[[], Any]) -> None:
        try:
            self._outcome.value = action()
        except BaseException as error:  # handed to the test's thread by outcome()
            self._outcome.error = error
        self._outcome.elapsed = time.monotonic() - self._started

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def outcome(self, timeout: float) -> Outcome:
        """The outcome; fails the test if the action is still running after ``timeout`` s."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"still no answer after {timeout:g} s: the mount hangs"
        return self._outcome


def bounded(seconds: float, action: Callable[[], Any]) -> Any:
    """``action()``, failing the test if it takes longer than ``seconds``; its exception propagates."""
    outcome = Background(action).outcome(seconds)
    result = outcome.unwrap()
    assert outcome.elapsed < seconds, f"took {outcome.elapsed:.1f} s, more than {seconds:g} s"
    return result


def read_uncached(path: Path) -> bytes:
    """The whole file, read through the filesystem rather than the kernel's page cache."""
    with open(path, "rb") as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return file.read()
