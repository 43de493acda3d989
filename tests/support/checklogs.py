"""Every test fails on a scicatfs warning, error or traceback it did not declare.

A fault that is logged and then absorbed (a retry, a fallback, a swallowed
exception) passes every assertion on the result; only the log shows it. So the
log is checked after every test, from both places scicatfs logs to:

* in-process code: records of the ``scicatfs`` loggers at WARNING or above,
  and any record that carries a traceback;
* processes started by the tests: the log files of mount daemons
  (``watch_file``, called by tests/support/mounts.py) and captured output of
  commands (``log_checker.check_output``), line by line: a line at WARNING,
  ERROR or CRITICAL in either log format of scicatfs, a Python traceback, or a
  Python warning.

A test that provokes such lines on purpose declares each with a regular
expression (``re.search`` on the record's message or the line)::

    @pytest.mark.allow_log(r"SFTP server 127\\.0\\.0\\.1:\\d+ is not answering")
    def test_...

A declared pattern that matches nothing fails the test too, so the list stays
exact; ``optional=True`` marks patterns for lines that appear only sometimes
(a race under load). Parametrized tests can declare per case with
``log_checker.allow(...)``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["LogChecker", "check_watched_files", "log_checker", "watch_file"]

#: A scicatfs log line at WARNING or above, in the daemon's format
#: ("2026-01-01 10:00:00,000 scicatfs WARNING name: ...") or a command's/syslog's
#: ("scicatfs: ERROR: ...", "scicatfs[123]: ERROR name: ...").
_BAD_LEVEL = re.compile(r"^(?:\S+ \S+ scicatfs |scicatfs(?:\[\d+\])?: )(?:WARNING|ERROR|CRITICAL)\b")
_PYTHON_WARNING = re.compile(r"\b\w+Warning: ")
_TRACEBACK = "Traceback (most recent call last):"

#: Lines that any mount may log, each for a reason outside the test's control (none now:
#: pyfuse3's late-reply ERROR at unmount is logged at DEBUG by the mount itself).
KNOWN_ANYWHERE: tuple[re.Pattern[str], ...] = ()

# Log files of running or finished mounts, and how far each has been checked.
_watched: dict[Path, int] = {}


def watch_file(path: Path) -> None:
    """Check ``path`` (a daemon's log) from its current end at every test's teardown."""
    _watched[path] = path.stat().st_size if path.exists() else 0


def _new_lines() -> list[str]:
    """What the watched files gained since they were last checked."""
    lines: list[str] = []
    for path, offset in list(_watched.items()):
        try:
            with open(path, "rb") as stream:
                stream.seek(offset)
                chunk = stream.read()
        except FileNotFoundError:
            del _watched[path]
            continue
        end = chunk.rfind(b"\n") + 1  # a line being written is checked next time
        _watched[path] = offset + end
        lines += [f"{path.name}: {line}" for line in chunk[:end].decode(errors="replace").splitlines()]
    return lines


def problems_in(lines: Iterable[str]) -> Iterator[str]:
    """Each warning/error line, Python warning and whole traceback in ``lines``."""
    lines = list(lines)
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if _TRACEBACK in line:
            block = [line]
            while index < len(lines) and lines[index].partition(": ")[2].startswith(" "):
                block.append(lines[index])
                index += 1
            if index < len(lines):  # the exception's own line ends the block
                block.append(lines[index])
                index += 1
            yield "\n".join(block)
        elif _BAD_LEVEL.search(line.partition(": ")[2]) or _PYTHON_WARNING.search(line):
            yield line


class _Collector(logging.Handler):
    """Collects in-process scicatfs records at WARNING+ and records with a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING or record.exc_info:
            text = f"{record.levelname} {record.name}: {record.getMessage()}"
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            self.found.append(text)


@dataclass
class _Allowance:
    pattern: re.Pattern[str]
    optional: bool
    used: int = 0


@dataclass
class LogChecker:
    """The allow-list of one test and the output it was given to check."""

    allowances: list[_Allowance] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def allow(self, *patterns: str, optional: bool = False) -> None:
        """Declare lines this test provokes on purpose (see the module docstring)."""
        self.allowances += [_Allowance(re.compile(p), optional) for p in patterns]

    def check_output(self, text: str, source: str = "output") -> None:
        """Check a command's captured stdout/stderr with this test's logs."""
        self.outputs += [f"{source}: {line}" for line in text.splitlines()]

    def unexpected(self, problems: Iterable[str]) -> list[str]:
        """The problems no allowance covers (each use of an allowance is counted)."""
        left = []
        for problem in problems:
            matching = [a for a in self.allowances if a.pattern.search(problem)]
            for allowance in matching:
                allowance.used += 1
            if not matching and not any(known.search(problem) for known in KNOWN_ANYWHERE):
                left.append(problem)
        return left

    def verdict(self, in_process: list[str], from_files: list[str]) -> str | None:
        """What is wrong with this test's logs, or None."""
        unexpected = self.unexpected([*in_process, *problems_in([*from_files, *self.outputs])])
        unused = [a.pattern.pattern for a in self.allowances if not a.used and not a.optional]
        message = []
        if unexpected:
            message.append("unexpected log lines (declare them with @pytest.mark.allow_log if intended):")
            message += [f"  {line}" for line in unexpected]
        if unused:
            message.append("allow_log patterns that matched nothing: " + ", ".join(map(repr, unused)))
        return "\n".join(message) or None


def check_watched_files() -> None:
    """Fail on anything in the watched daemon logs not checked yet (for module-scoped mounts)."""
    problems = list(problems_in(_new_lines()))
    assert not problems, "unexpected log lines:\n" + "\n".join(problems)


@pytest.fixture(autouse=True)
def log_checker(request: pytest.FixtureRequest) -> Iterator[LogChecker]:
    """Fail the test on undeclared scicatfs warnings, errors and tracebacks (see the module)."""
    checker = LogChecker()
    for marker in request.node.iter_markers("allow_log"):
        checker.allow(*marker.args, optional=marker.kwargs.get("optional", False))
    collector = _Collector()
    logger = logging.getLogger("scicatfs")
    logger.addHandler(collector)
    try:
        yield checker
    finally:
        logger.removeHandler(collector)
    verdict = checker.verdict(collector.found, _new_lines())
    if verdict is not None:
        pytest.fail(verdict, pytrace=False)
