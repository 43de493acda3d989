"""What a test needs from the machine: skipped where it is missing, a failure in CI.

CI is any run with a non-empty ``CI`` environment variable, whatever its value
(``CI=false`` too): ``.ci/run`` exports ``CI=1`` itself, so a runner that
forgets to set it still cannot turn a missing sshd into a green, empty run.
Only a run with ``CI`` unset or empty skips.
"""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["in_ci", "missing_program", "needs_root", "skip_or_fail"]


def in_ci() -> bool:
    """A non-empty ``CI``, of any value, means every requirement must be met."""
    return bool(os.environ.get("CI"))


def skip_or_fail(problem: str | None) -> None:
    """Skip the test for ``problem`` locally; fail it in CI, where it must run.

    A CI run that quietly skips the tests of a missing sshd or sshfs would look
    green while testing nothing.
    """
    if problem is None:
        return
    if in_ci():
        pytest.fail(f"{problem} (CI is set, so this is a failure, not a skip)")
    pytest.skip(problem)


def missing_program(name: str, package: str) -> str | None:
    """The problem of ``name`` not being on PATH (and which Debian package has it), or None."""
    if shutil.which(name) is None:
        return f"{name} is not installed (apt-get install {package}, or run .ci/setup)"
    return None


def needs_root(why: str) -> str | None:
    """The problem of not being root (CI runs as root), or None."""
    return None if os.geteuid() == 0 else f"needs root: {why}"
