"""Progress of a long download: a redrawn bar on a terminal, plain lines in a log.

A terminal gets one line, rewritten in place at most ten times a second::

    [##########..........]  50%  24.0 MiB of 48.0 MiB  31.2 MiB/s  ETA 1 s  3/6 files

Anything else (a pipe, a file, the journal) gets one line per finished or
failed file and, during long stretches without one, a progress line every
``interval`` seconds, because carriage returns make unreadable logs.

The rate counts only bytes moved in this run: a re-run that finds most of a
dataset cached must not claim gigabytes per second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress", "human_duration", "human_size"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
BAR_WIDTH = 20
REDRAW_INTERVAL = 0.1


def human_size(count: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: powers of 1024, as ``du -h`` and the cache sizes use."""
    value = float(count)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """``75`` -> ``"1 min 15 s"``; whole seconds, two units at most."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


class Progress:
    """Bytes and files done out of a known total, reported to ``stream``.

    ``done`` and ``files_done`` are what was already there at the start (cached
    files); :meth:`add` counts bytes moved now, :meth:`finished` one file.
    """

    def __init__(
        self,
        total: int,
        files: int,
        stream: TextIO,
        *,
        done: int = 0,
        files_done: int = 0,
        tty: bool | None = None,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.files = files
        self.done = done
        self.files_done = files_done
        self.moved = 0
        self._stream = stream
        self._tty = stream.isatty() if tty is None else tty
        self._interval = interval
        self._clock = clock
        self._started = clock()
        self._last_output = self._started
        self._bar_shown = False

    # -- events ------------------------------------------------------------------

    def add(self, count: int) -> None:
        """``count`` more bytes are in place."""
        self.done += count
        self.moved += count
        now = self._clock()
        if self._tty:
            if now - self._last_output >= REDRAW_INTERVAL:
                self._draw(now)
        elif now - self._last_output >= self._interval:
            self._line(self._summary(now))

    def finished(self, path: str) -> None:
        """One file is complete."""
        self.files_done += 1
        now = self._clock()
        if self._tty:
            self._draw(now)
        else:
            self._line(f"{self._counts()}: {path}")

    def failed(self, path: str, reason: str) -> None:
        """One file could not be fetched; always its own line, also on a terminal."""
        self._line(f"FAILED {path}: {reason}")
        if self._tty:
            self._draw(self._clock())

    def close(self) -> None:
        """End the bar's line, so that what follows starts on a fresh one."""
        if self._tty and self._bar_shown:
            self._draw(self._clock())
            self._stream.write("\n")
            self._stream.flush()
            self._bar_shown = False

    # -- numbers -------------------------------------------------------------------

    def rate(self, now: float | None = None) -> float:
        """Bytes per second moved in this run (0 before any time has passed)."""
        elapsed = (self._clock() if now is None else now) - self._started
        return self.moved / elapsed if elapsed > 0 else 0.0

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left at the current rate; None while the rate is unknown."""
        rate = self.rate(now)
        return (self.total - self.done) / rate if rate > 0 else None

    # -- output --------------------------------------------------------------------

    def _counts(self) -> str:
        return f"{self.files_done}/{self.files} files, {human_size(self.done)} of {human_size(self.total)}"

    def _summary(self, now: float) -> str:
        eta = self.eta(now)
        remaining = "" if eta is None else f", ETA {human_duration(eta)}"
        return f"{self._counts()}, {human_size(self.rate(now))}/s{remaining}"

    def _line(self, text: str) -> None:
        prefix = "\r\x1b[K" if self._tty and self._bar_shown else ""
        self._stream.write(f"{prefix}prefetch: {text}\n")
        self._stream.flush()
        self._bar_shown = False
        self._last_output = self._clock()

    def _draw(self, now: float) -> None:
        fraction = self.done / self.total if self.total else 1.0
        filled = min(BAR_WIDTH, int(fraction * BAR_WIDTH))
        eta = self.eta(now)
        bar = (
            f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction:4.0%}"
            f"  {human_size(self.done)} of {human_size(self.total)}"
            f"  {human_size(self.rate(now))}/s"
            f"  ETA {'?' if eta is None else human_duration(eta)}"
            f"  {self.files_done}/{self.files} files"
        )
        self._stream.write(f"\r\x1b[K{bar}")
        self._stream.flush()
        self._bar_shown = True
        self._last_output = now
