"""Prometheus exporter of mqs metrics, on `prometheus_client`.

`start_metrics_server` serves every source of `mqs.metrics.REGISTRY`:
the in-process queues, the machine's named shared-memory queues (read
through a read-only mapping), registered logs and added collectors.
`MqsCollector` can also be registered with an application's own
`prometheus_client` registry, next to its other metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from mqs import metrics

logger = logging.getLogger(__name__)

__all__ = ["MqsCollector", "MetricsServer", "start_metrics_server"]


class MqsCollector(Collector):
    """A `prometheus_client` collector of one `mqs.metrics.MetricsRegistry`.

    Parameters
    ----------
    registry : MetricsRegistry, optional
        The sources to read; the process's `mqs.metrics.REGISTRY` by
        default.
    scan_shared : bool
        Also export every named shared-memory queue of the machine
        (True by default).
    """

    def __init__(self, registry: metrics.MetricsRegistry | None = None,
                 scan_shared: bool = True) -> None:
        self._registry = registry if registry is not None \
            else metrics.REGISTRY
        self._scan_shared = scan_shared

    def collect(self) -> Iterator[Any]:
        samples = self._registry.collect(scan_shared=self._scan_shared)
        by_metric: dict[metrics.Metric, list[metrics.Sample]] = {}
        for sample in samples:
            by_metric.setdefault(sample.metric, []).append(sample)
        for metric, group in by_metric.items():
            yield _family(metric, group)


def _family(metric: metrics.Metric, samples: list[metrics.Sample]) -> Any:
    """Build one metric family; label sets are padded to one key set."""
    label_names = sorted({key for sample in samples for key in sample.labels})
    if metric.type == "counter":
        family: Any = CounterMetricFamily(metric.name, metric.help,
                                          labels=label_names)
    elif metric.type == "gauge":
        family = GaugeMetricFamily(metric.name, metric.help,
                                   labels=label_names)
    else:
        family = HistogramMetricFamily(metric.name, metric.help,
                                       labels=label_names)
    for sample in samples:
        values = [sample.labels.get(name, "") for name in label_names]
        if metric.type == "histogram":
            summary = sample.value
            buckets = [(_bound(bound), count)
                       for bound, count in summary.buckets]
            buckets.append(("+Inf", summary.count))
            family.add_metric(values, buckets, summary.sum_s)
        else:
            family.add_metric(values, sample.value)
    return family


def _bound(seconds: float) -> str:
    return repr(float(seconds))


class MetricsServer:
    """A running exporter; `close` stops it."""

    def __init__(self, server: Any, thread: Any, addr: str) -> None:
        self._server = server
        self._thread = thread
        self.addr = addr
        self.port: int = server.server_address[1]

    def close(self) -> None:
        """Stop serving and wait for the server thread to end."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        logger.debug("metrics server on %s:%d stopped", self.addr, self.port)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def start_metrics_server(port: int, addr: str = "127.0.0.1", *,
                         scan_shared: bool = True) -> MetricsServer:
    """Serve the mqs metrics for Prometheus at ``http://addr:port/``.

    The server runs in a daemon thread. Each scrape reads every queue of
    this process, and with `scan_shared` every named shared-memory queue
    of the machine (a read-only mapping of its header: nothing in the
    queue is written and no process is slowed down).

    Parameters
    ----------
    port : int
        TCP port, 0 to 65535; 0 picks a free port (see
        ``MetricsServer.port``).
    addr : str
        Address to listen on; the loopback address by default. Give
        ``"0.0.0.0"`` to accept scrapes from other hosts.

    Returns
    -------
    MetricsServer
        Call ``close()`` to stop it.

    Raises
    ------
    ValueError
        If `port` is out of range.
    OSError
        If the address cannot be bound (port in use, unknown address).
    """
    if not isinstance(port, int) or isinstance(port, bool) \
            or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int from 0 to 65535, got "
                         f"{port!r}")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MqsCollector(scan_shared=scan_shared))
    server, thread = start_http_server(port, addr=addr, registry=registry)
    result = MetricsServer(server, thread, addr)
    logger.debug("metrics server listening on %s:%d", addr, result.port)
    return result
