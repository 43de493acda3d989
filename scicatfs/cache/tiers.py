"""Where the fetcher's bytes came from: counters and latency histograms per cache tier.

Tiers: ``local`` (reads answered from the node's own cache without waiting),
``shared`` (flights copied from the shared tier) and ``source`` (flights
downloaded from the file server). Latency is per flight, from its start to its
bytes being there, for ``shared`` and ``source`` (a local hit is one ``pread``
and is not timed). The mount's status (``.scicat/status.json``) and its
Prometheus metrics both show these numbers.
"""

from __future__ import annotations

import bisect
from typing import Any

__all__ = ["LATENCY_BUCKETS", "TIERS", "TierStats"]

TIERS = ("local", "shared", "source")
#: Upper bounds (seconds) of the latency histogram's buckets; the last bucket is +Inf.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class TierStats:
    """Bytes and fetches per tier, and a latency histogram per tier that fetches.

    Updated only on the trio thread; read by status on the same thread.
    """

    def __init__(self) -> None:
        self.bytes = dict.fromkeys(TIERS, 0)
        self.fetches = dict.fromkeys(TIERS[1:], 0)
        self._buckets = {tier: [0] * (len(LATENCY_BUCKETS) + 1) for tier in TIERS[1:]}
        self._seconds = dict.fromkeys(TIERS[1:], 0.0)

    def served_locally(self, size: int) -> None:
        self.bytes["local"] += size

    def fetched(self, tier: str, size: int, seconds: float) -> None:
        self.bytes[tier] += size
        self.fetches[tier] += 1
        self._seconds[tier] += seconds
        self._buckets[tier][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def as_status(self) -> dict[str, Any]:
        """``{"local_bytes": ..., ..., "latency": {tier: {"buckets": {le: cumulative}, "sum", "count"}}}``."""
        document: dict[str, Any] = {f"{tier}_bytes": value for tier, value in self.bytes.items()}
        document.update({f"{tier}_fetches": value for tier, value in self.fetches.items()})
        latency = {}
        for tier, counts in self._buckets.items():
            cumulative, running = {}, 0
            for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), counts, strict=True):
                running += count
                cumulative[bound] = running
            latency[tier] = {"buckets": cumulative, "sum_seconds": round(self._seconds[tier], 6), "count": running}
        document["latency"] = latency
        return document
