"""The README's quick start must stay true: CI runs exactly its test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    test_command = ci_lines[-1].strip()
    assert test_command.startswith(".venv/bin/python -m pytest")
    assert f".ci/setup && {test_command}" in readme


def test_readme_demo_command_uses_the_setup_script() -> None:
    readme = (ROOT / "README.md").read_text()
    assert ".ci/setup && .venv/bin/scicatfs demo" in readme
