"""The unit files in systemd/: verified by systemd where present, always parse-checked.

Nothing is installed, enabled or started: ``systemd-analyze verify`` only
loads the files, and the parse checks read them as text.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from scicatfs.config import helper_argv_to_cli, mount_options, split_fuse_o
from tests.support.requirements import missing_program, skip_or_fail

UNITS = Path(__file__).resolve().parents[1] / "systemd"
SERVICE = UNITS / "scicatfs@.service"
MOUNT = UNITS / "mnt-scicat.mount"
AUTOMOUNT = UNITS / "mnt-scicat.automount"

# Directive names the units may use, per section: a typo is an error here,
# where systemd itself only warns and ignores the line.
KNOWN = {
    "Unit": {"Description", "Documentation", "Wants", "After", "Before", "Requires",
             "StartLimitIntervalSec", "StartLimitBurst", "AssertPathIsDirectory"},
    "Service": {"Type", "ExecStartPre", "ExecStart", "ExecStop", "ExecStopPost", "Restart",
                "RestartSec", "TimeoutStartSec", "TimeoutStopSec", "SyslogIdentifier",
                "LoadCredential", "Environment"},
    "Mount": {"What", "Where", "Type", "Options", "TimeoutSec"},
    "Automount": {"Where", "TimeoutIdleSec"},
    "Install": {"WantedBy"},
}
DIRECTIVE = re.compile(r"#?([A-Z][A-Za-z]+)=(.*)")


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> directive -> values, including commented-out ``#Key=value`` suggestions.

    Commented suggestions are kept under ``"#Key"`` so they are checked too:
    a user who uncomments one must get a working line.
    """
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not DIRECTIVE.fullmatch(stripped)):
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            current = sections.setdefault(stripped[1:-1], {})
            continue
        match = DIRECTIVE.fullmatch(stripped)
        assert match and current is not None, f"{path.name}:{number}: not a directive: {line!r}"
        key = ("#" if stripped.startswith("#") else "") + match.group(1)
        current.setdefault(key, []).append(match.group(2))
    return sections


@pytest.mark.parametrize("path", [SERVICE, MOUNT, AUTOMOUNT], ids=lambda p: p.name)
def test_sections_and_directives_are_known(path: Path) -> None:
    sections = parse_unit(path)
    assert set(sections) <= set(KNOWN), f"unknown section in {path.name}"
    for name, directives in sections.items():
        unknown = {key.lstrip("#") for key in directives} - KNOWN[name]
        assert not unknown, f"{path.name} [{name}]: unknown directives {unknown}"
        assert all(len(v) == 1 for k, v in directives.items() if not k.startswith(("Exec", "#"))), name
    assert sections["Unit"]["Description"]


def test_user_service_is_a_notify_service_for_the_profile_instance() -> None:
    sections = parse_unit(SERVICE)
    service = sections["Service"]
    assert service["Type"] == ["notify"]
    assert service["Restart"] == ["on-failure"]
    start = shlex.split(service["ExecStart"][0])
    assert start[:2] == ["scicatfs", "mount"]
    assert start[start.index("--profile") + 1] == "%i"
    assert "--foreground" in start  # Type=notify needs the main process to stay
    assert start[-1] == "%h/scicat/%i"
    assert shlex.split(service["ExecStop"][0]) == ["scicatfs", "unmount", start[-1]]
    assert service["#LoadCredential"][0].startswith("scicat-token:")
    assert sections["Install"]["WantedBy"] == ["default.target"]


def test_mount_unit_options_map_to_a_valid_configuration(tmp_path: Path) -> None:
    """Options= goes through the same path as a real ``mount -t fuse.scicatfs``."""
    mount = parse_unit(MOUNT)["Mount"]
    (where,) = mount["Where"]
    assert MOUNT.stem == where.strip("/").replace("-", "\\x2d").replace("/", "-")
    assert AUTOMOUNT.stem == MOUNT.stem
    assert parse_unit(AUTOMOUNT)["Automount"]["Where"] == [where]
    assert mount["Type"] == ["fuse.scicatfs"]
    assert "_netdev" in mount["Options"][0].split(",")

    cli = helper_argv_to_cli([mount["What"][0], where, "-o", mount["Options"][0]])
    assert cli[:4] == ["mount", where, "--url", mount["What"][0]]
    scicat, fuse = split_fuse_o([cli[cli.index("-o") + 1]])
    assert fuse == [], "every option in the example is a scicatfs option"
    options = mount_options({"url": cli[3], "mountpoint": where, **scicat})
    assert options.url == "https://scicat.ess.eu/api/v3"
    assert options.sftp_host == "login.esss.dk"
    assert options.cache_dir == Path("/var/cache/scicatfs")


def _verify(units: list[Path], tmp_path: Path, user: bool) -> None:
    """Run ``systemd-analyze verify``; any warning about our files fails the test."""
    skip_or_fail(missing_program("systemd-analyze", "systemd"))
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path / "runtime")}
    (tmp_path / "runtime").mkdir(mode=0o700, exist_ok=True)
    command = ["systemd-analyze", "verify", *(["--user"] if user else []), *map(str, units)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    ours = [line for line in result.stderr.splitlines() if any(u.name in line for u in units)]
    assert result.returncode == 0 and not ours, result.stderr


def test_systemd_verifies_the_user_service(tmp_path: Path) -> None:
    # verify needs an instance name and an executable that exists: use this
    # environment's scicatfs (or python -m scicatfs) in a copy of the unit.
    script = Path(sys.executable).with_name("scicatfs")
    command = str(script) if script.exists() else f"{sys.executable} -m scicatfs"
    text = re.sub(r"^(Exec\w+=)scicatfs ", rf"\g<1>{command} ", SERVICE.read_text(), flags=re.M)
    text = text.replace("#LoadCredential=", "LoadCredential=")
    instance = tmp_path / "scicatfs@test.service"
    instance.write_text(text)
    _verify([instance], tmp_path, user=True)


def test_systemd_verifies_the_mount_units(tmp_path: Path) -> None:
    _verify([MOUNT, AUTOMOUNT], tmp_path, user=False)


def test_the_verify_check_catches_a_typo(tmp_path: Path) -> None:
    broken = tmp_path / AUTOMOUNT.name
    broken.write_text(AUTOMOUNT.read_text().replace("TimeoutIdleSec", "TimeoutIdelSec"))
    with pytest.raises(AssertionError, match="Unknown key"):
        _verify([broken], tmp_path, user=False)
