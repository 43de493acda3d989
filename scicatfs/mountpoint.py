"""Mountpoints: is this one usable, is it mounted, is it stale, unmount it.

A FUSE mount whose process died leaves a "Transport endpoint is not
connected" (ENOTCONN) directory behind that every later ``stat`` trips over.
These checks run before mounting, so the user gets one sentence saying what
is wrong instead of libfuse's message or a half-mounted filesystem, and
``scicatfs unmount`` can clean up whatever a crash left.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MountEntry",
    "MountpointError",
    "check_fuse",
    "check_mountpoint",
    "find_mount",
    "is_stale",
    "mount_table",
    "unmount",
]

_MOUNTINFO = Path("/proc/self/mountinfo")
_ESCAPE = re.compile(rb"\\([0-7]{3})")
_UNMOUNT_TIMEOUT = 30.0


class MountpointError(Exception):
    """The mountpoint cannot be used or unmounted; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of /proc/self/mountinfo that matters here."""

    mountpoint: str
    fstype: str
    source: str

    @property
    def is_fuse(self) -> bool:
        return self.fstype == "fuse" or self.fstype.startswith(("fuse.", "fuseblk"))


def _unescape(field: bytes) -> str:
    # The kernel writes space, tab, newline and backslash as \ooo.
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def mount_table(mountinfo: Path = _MOUNTINFO) -> list[MountEntry]:
    """Every mount this process can see."""
    entries = []
    for line in mountinfo.read_bytes().splitlines():
        fields = line.split(b" ")
        separator = fields.index(b"-")
        entries.append(
            MountEntry(
                mountpoint=_unescape(fields[4]),
                fstype=_unescape(fields[separator + 1]),
                source=_unescape(fields[separator + 2]),
            )
        )
    return entries


def _canonical(path: Path) -> str:
    """Absolute path with symlinks resolved in the parents only.

    The last component is left alone: resolving it would ``stat`` through a
    possibly stale mount and fail with ENOTCONN.
    """
    absolute = Path(os.path.abspath(path))
    return os.path.join(os.path.realpath(absolute.parent), absolute.name)


def find_mount(path: Path) -> MountEntry | None:
    """The topmost mount at ``path``, if any."""
    target = _canonical(path)
    found = None
    for entry in mount_table():
        if entry.mountpoint == target:
            found = entry  # later lines are mounted on top of earlier ones
    return found


def is_stale(path: Path) -> bool:
    """True if ``path`` is a FUSE mount whose filesystem process is gone.

    ``statfs`` is asked because the kernel always forwards it to the
    filesystem; ``stat`` may be answered from cached attributes for a while
    after the process died.
    """
    try:
        os.statvfs(path)
    except OSError as error:
        return error.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def check_mountpoint(path: Path) -> None:
    """Refuse a mountpoint that is missing, stale, mounted, not a directory, not empty or not ours."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise MountpointError(f"mountpoint {path} does not exist; create it with: mkdir -p {path}") from None
    except OSError as error:
        if error.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            raise MountpointError(_stale_message(path)) from None
        raise MountpointError(f"cannot use mountpoint {path}: {error.strerror}") from None
    if not stat.S_ISDIR(status.st_mode):
        raise MountpointError(f"mountpoint {path} is not a directory")
    mounted = find_mount(path)
    if mounted is not None:
        if mounted.is_fuse and is_stale(path):
            raise MountpointError(_stale_message(path))
        raise MountpointError(
            f"{path} is already a mount point ({mounted.fstype} from {mounted.source}); "
            f"unmount it first (scicatfs unmount {path})"
        )
    try:
        if any(os.scandir(path)):
            raise MountpointError(f"mountpoint {path} is not empty; mount on an empty directory")
    except PermissionError:
        raise MountpointError(f"mountpoint {path} is not readable by you") from None
    if os.getuid() != 0 and (status.st_uid != os.getuid() or not os.access(path, os.W_OK)):
        raise MountpointError(f"mountpoint {path} must be a directory you own and can write to")


def _stale_message(path: Path) -> str:
    return (
        f"mountpoint {path} is a stale FUSE mount (Transport endpoint is not connected); "
        f"clean it up with: scicatfs unmount {path}"
    )


def check_fuse() -> None:
    """Refuse early when FUSE cannot work here at all.

    Root opens /dev/fuse itself; everyone else mounts through the setuid
    ``fusermount3``, which opens it for them (so /dev/fuse may be 0600).
    """
    if not os.path.exists("/dev/fuse"):
        raise MountpointError(
            "FUSE is not available: /dev/fuse does not exist; install fuse3 and load the fuse kernel "
            "module, or in a container pass --device /dev/fuse"
        )
    if os.getuid() != 0:
        if shutil.which("fusermount3") is None:
            raise MountpointError("FUSE is not usable: fusermount3 is not installed (Debian/Ubuntu: apt install fuse3)")
        return
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as error:
        raise MountpointError(f"FUSE is not available: cannot open /dev/fuse ({error.strerror})") from None


def unmount(path: Path) -> None:
    """Unmount the FUSE filesystem at ``path``; a stale mount is detached lazily.

    Raises :class:`MountpointError` if nothing is mounted there, if it is not a
    FUSE mount, or if the kernel refuses (busy: some process still uses it).
    """
    entry = find_mount(path)
    if entry is None:
        raise MountpointError(f"{path} is not mounted")
    if not entry.is_fuse:
        raise MountpointError(f"{path} is a {entry.fstype} mount, not a FUSE one; use umount")
    lazy = is_stale(path)
    result = _fusermount(path, lazy)
    if result.returncode != 0 and not lazy and is_stale(path):
        result = _fusermount(path, lazy=True)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit status {result.returncode}"
        raise MountpointError(f"cannot unmount {path}: {reason}")


def _fusermount(path: Path, lazy: bool) -> subprocess.CompletedProcess[str]:
    command = ["fusermount3", "-u"] + (["-z"] if lazy else []) + ["--", str(path)]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=_UNMOUNT_TIMEOUT)
    except FileNotFoundError:
        raise MountpointError("cannot unmount: fusermount3 is not installed (apt install fuse3)") from None
    except subprocess.TimeoutExpired:
        raise MountpointError(f"cannot unmount {path}: fusermount3 did not finish within {_UNMOUNT_TIMEOUT:.0f} s") from None
