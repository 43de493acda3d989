"""``scicatfs status MOUNTPOINT``: what a running mount is doing, from its ``.scicat/status.json``.

The file is read with a deadline (:func:`read_from_mount`): a hung or dead
mount gives a message naming the fix, never a hung command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from scicatfs.commands.common import CommandError, guarded, read_from_mount
from scicatfs.progress import human_duration, human_size

__all__ = ["read_status", "register", "render"]

STATUS_FILE = ".scicat/status.json"


def register(subparsers: Any) -> None:
    """Add ``status`` to the ``scicatfs`` subcommands."""
    parser = subparsers.add_parser(
        "status",
        help="show what a running mount is doing",
        description=f"Show the counters of the scicatfs mount at MOUNTPOINT (from MOUNTPOINT/{STATUS_FILE}).",
    )
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    parser.add_argument("--json", action="store_true", help="print the status as JSON, as the mount serves it")
    parser.set_defaults(func=guarded(run))


def run(args: argparse.Namespace) -> int:
    status = read_status(args.mountpoint)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(render(status), end="")
    return 0


def read_status(mountpoint: Path) -> dict[str, Any]:
    """The parsed status document of the mount at ``mountpoint``; CommandError says why not."""
    mountpoint = mountpoint.absolute()
    raw = read_from_mount(
        mountpoint, STATUS_FILE, missing=f"the mount at {mountpoint} serves no {STATUS_FILE} (an older scicatfs?)"
    )
    try:
        document = json.loads(raw)
    except ValueError as error:
        raise CommandError(f"{mountpoint / STATUS_FILE} is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise CommandError(f"{mountpoint / STATUS_FILE} is not a JSON object")
    return document


def render(status: dict[str, Any]) -> str:
    """A page for people: a headline, then each section's counters with human units.

    Sections and counters are shown as the mount reports them, so new counters
    need no change here; counters of ``bytes`` get sizes, of ``seconds`` durations.
    """
    uptime = _value("uptime_seconds", status.get("uptime_seconds", 0))
    where = f"{status.get('mountpoint', '?')} (process {status.get('process', '?')}, up {uptime})"
    lines = [f"scicatfs {status.get('scicatfs', '?')} at {where}"]
    token = status.get("token")
    if token is None:
        lines.append("token: none (anonymous, or no expiry known)")
    else:
        state = "EXPIRED" if token["expired"] else f"in {human_duration(token['expires_in_seconds'])}"
        lines.append(f"token: expires {token['expires']} ({state})")
    errors = status.get("errors", {})
    failing = [
        f"{layer} {name.replace('_', ' ')} {count}"
        for layer, counters in errors.items()
        for name, count in counters.items()
        if count
    ]
    lines.append(f"errors: {', '.join(failing) if failing else 'none'}")
    for section in ("catalog", "transfer", "cache", "tiers", "inodes"):
        counters = status.get(section)
        if not isinstance(counters, dict):
            continue
        lines.append(f"{section}:")
        width = max((len(name) for name in counters), default=0)
        lines.extend(f"  {name.ljust(width)}  {_value(name, value)}" for name, value in counters.items())
    sources = status.get("sources")
    if isinstance(sources, dict) and sources:
        lines.append("sources (bytes read, requests, errors):")
        width = max(len(name) for name in sources)
        lines.extend(
            f"  {name.ljust(width)}  {_value('bytes', counters.get('bytes_read', 0))},"
            f" {counters.get('requests', 0)} requests, {counters.get('errors', 0)} errors"
            for name, counters in sources.items()
        )
    return "\n".join(lines) + "\n"


def _latency(histograms: dict[str, Any]) -> str:
    """Fetch latency per tier as count, mean and the bucket that holds the median."""
    parts = []
    for tier, histogram in histograms.items():
        count = histogram.get("count", 0)
        if not count:
            parts.append(f"{tier}: none")
            continue
        median = next(bound for bound, below in histogram["buckets"].items() if below * 2 >= count)
        mean = histogram["sum_seconds"] / count
        parts.append(f"{tier}: {count} fetches, mean {mean * 1000:.1f} ms, median <= {median} s")
    return "; ".join(parts)


def _value(name: str, value: Any) -> str:
    if name == "latency" and isinstance(value, dict):
        return _latency(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        words = name.split("_")
        if "bytes" in words:
            return f"{human_size(value)} ({value} bytes)" if value >= 1024 else f"{value} bytes"
        if "seconds" in words:
            return human_duration(value)
    return str(value)
