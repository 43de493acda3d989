"""What a test needs from the machine: skipped where it is missing, a failure in CI."""

from __future__ import annotations

import os

import pytest


def skip_or_fail(problem: str | None) -> None:
    """Skip the test for ``problem`` locally; fail it when ``CI`` is set, where it must run.

    A CI run that quietly skips the tests of a missing sshd or sshfs would look
    green while testing nothing.
    """
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(problem)
    pytest.skip(problem)
