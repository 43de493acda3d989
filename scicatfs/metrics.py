"""Prometheus metrics of a running mount, for a fleet of nodes (opt-in, ``scicatfs[metrics]``).

Two ways out, both through ``prometheus_client``: an HTTP endpoint on
``127.0.0.1:PORT`` (``--metrics-port``) and a textfile for node_exporter's
textfile collector (``--metrics-textfile``, rewritten atomically every
``TEXTFILE_INTERVAL`` seconds). The numbers are the mount's status document
(:func:`scicatfs.status.collect_status`, what ``scicatfs status`` shows),
translated at each scrape by a custom collector: the layers keep their own
counters and nothing is counted twice. The collector runs in the HTTP
server's thread or a worker thread and asks the trio loop for the document,
because the layers' counters belong to that thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from scicatfs.status import ERROR_COUNTERS

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["MetricsError", "MetricsExporter", "families"]

log = logging.getLogger(__name__)

TEXTFILE_INTERVAL = 10.0
Status = Callable[[], dict[str, Any]]


class MetricsError(Exception):
    """Metrics were asked for but cannot be served; the message says why."""


class _StatusCollector:
    """Metric families from one status document, fetched from the trio loop per collection."""

    def __init__(self, status: Status, token: trio.lowlevel.TrioToken) -> None:
        self._status = status
        self._token = token

    def collect(self) -> Iterator[Metric]:
        try:
            document = trio.from_thread.run_sync(self._status, trio_token=self._token)
        except trio.RunFinishedError:  # the mount is stopping
            return
        yield from families(document)


def families(status: dict[str, Any]) -> Iterator[Metric]:
    """The metric families of a status document (the same numbers ``scicatfs status`` shows)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    catalog = status.get("catalog", {})
    yield CounterMetricFamily("scicatfs_catalog_requests", "Requests sent to the catalog", catalog.get("requests", 0))
    errors = CounterMetricFamily("scicatfs_errors", "Failures by layer and kind", labels=["layer", "kind"])
    for layer, counters in status.get("errors", {}).items():
        for kind in ERROR_COUNTERS.get(layer, ()):
            errors.add_metric([layer, kind], counters.get(kind, 0))
    yield errors
    transfer = status.get("transfer", {})
    yield CounterMetricFamily("scicatfs_transfer_read_bytes", "Bytes read from file servers", transfer.get("bytes_read", 0))
    tiers = status.get("tiers", {})
    served = CounterMetricFamily("scicatfs_tier_bytes", "Bytes by the cache tier they came from", labels=["tier"])
    for tier in ("local", "shared", "source"):
        served.add_metric([tier], tiers.get(f"{tier}_bytes", 0))
    yield served
    latency = HistogramMetricFamily(
        "scicatfs_fetch_seconds", "Time from a flight's start to its bytes, by tier", labels=["tier"]
    )
    for tier, histogram in tiers.get("latency", {}).items():
        latency.add_metric([tier], list(histogram["buckets"].items()), histogram["sum_seconds"])
    yield latency
    cache = status.get("cache", {})
    yield GaugeMetricFamily("scicatfs_cache_used_bytes", "Bytes in the local cache", cache.get("used_bytes", 0))
    yield GaugeMetricFamily("scicatfs_cache_budget_bytes", "The local cache's budget", cache.get("budget_bytes", 0))
    yield GaugeMetricFamily(
        "scicatfs_flights_in_flight", "Runs of blocks being fetched now", cache.get("chunks_in_flight", 0)
    )
    token = status.get("token")
    if token is not None:
        yield GaugeMetricFamily(
            "scicatfs_token_expires_in_seconds", "Seconds until the catalog token expires", token["expires_in_seconds"]
        )
    yield GaugeMetricFamily("scicatfs_uptime_seconds", "Seconds since the mount started", status.get("uptime_seconds", 0))


class MetricsExporter:
    """Serve ``status()`` as Prometheus metrics while :meth:`run` runs (in the mount's nursery).

    ``start`` (called before mounting, on the trio thread) binds the port, so
    a port in use or a missing library fails the mount with one line.
    """

    def __init__(self, status: Status, *, port: int | None, textfile: Path | None) -> None:
        self._status = status
        self.port = port
        self.textfile = textfile
        self._server: Any = None
        self._registry: Any = None

    def start(self) -> None:
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError:
            raise MetricsError("metrics need the prometheus_client library: pip install 'scicatfs[metrics]'") from None
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_StatusCollector(self._status, trio.lowlevel.current_trio_token()))
        if self.port is not None:
            try:
                self._server, _ = start_http_server(self.port, addr="127.0.0.1", registry=self._registry)
            except OSError as error:
                raise MetricsError(f"cannot serve metrics on 127.0.0.1:{self.port}: {error.strerror}") from None
            log.info("serving metrics on http://127.0.0.1:%d/metrics", self.port)

    async def run(self) -> None:
        """Rewrite the textfile every ``TEXTFILE_INTERVAL`` seconds until cancelled; then stop serving."""
        from prometheus_client import write_to_textfile

        try:
            while self.textfile is not None:
                try:
                    await trio.to_thread.run_sync(write_to_textfile, str(self.textfile), self._registry)
                except OSError as error:
                    log.warning("cannot write the metrics textfile %s: %s", self.textfile, error)
                await trio.sleep(TEXTFILE_INTERVAL)
            await trio.sleep_forever()
        finally:
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
