"""Missing requirements skip only outside CI; CI is any non-empty ``CI``, and ``.ci/run`` sets it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.requirements import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("value", ["1", "true", "false", "0"])
def test_any_non_empty_ci_turns_a_missing_requirement_into_a_failure(value: str, monkeypatch) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="no sshd here"):
        skip_or_fail("no sshd here")


@pytest.mark.parametrize("value", [None, ""])
def test_without_ci_a_missing_requirement_skips(value: str | None, monkeypatch) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception, match="no sshd here"):
        skip_or_fail("no sshd here")
    skip_or_fail(None)  # nothing missing: neither


def test_ci_run_sets_ci_before_running_the_tests() -> None:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert lines.index("export CI=1") < len(lines) - 1
