"""Metrics of mqs queues and logs, and the registry the exporter reads.

Every queue keeps its counters always. They are derived from the
sequences and positions the structures keep anyway (messages put ever,
messages got ever per group): an in-process queue adds one increment per
put and one compare per put and get. Latency comes from sampled
messages: one in `sample_every` is timestamped when it becomes ready and
again when it is got, into an HDR histogram
(`hdrhistogram` package).

The registry lists every source the Prometheus exporter exports:

- the in-process `Queue` and `SimpleQueue` objects, found through weak
  references without registering;
- the shared-memory queues of the machine, read through a read-only
  mapping of their header (`scan_shared_queues`);
- `SegmentLog` objects passed to `register`;
- collectors added with `add_collector`: any callable that returns
  `Sample` objects. This is the hook for components with metrics of their
  own, such as topics, lanes and consumer groups::

      def collect():
          yield Sample(TOPIC_DEPTH, {"topic": "orders", "lane": "9"}, 12)

      handle = mqs.metrics.REGISTRY.add_collector(collect)
      ...
      handle.remove()

  A collector may define its own `Metric` (name with the ``mqs_`` prefix,
  type, help text); the exporter groups samples by metric.
  `register_broker(broker, topics)` is such a collector for the topics
  of an `mqs.Broker`.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from mqs.errors import ShutDown

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
SHM_PREFIX = "mqs."

# HDR histogram range: 1 ns to 1 hour, 2 significant digits (values are
# kept within 1% of what was recorded).
HISTOGRAM_LOWEST_NS = 1
HISTOGRAM_HIGHEST_NS = 3600 * 10**9
HISTOGRAM_DIGITS = 2

# Bucket bounds (seconds) of the exported Prometheus histograms.
LATENCY_BUCKETS_S = (
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3,
    2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0)

DEFAULT_SAMPLE_EVERY = 1024



# ------------------------------------------------------------ stats records


@dataclass(frozen=True)
class LatencySummary:
    """Percentiles of the sampled latencies of one queue, in seconds."""

    count: int
    sample_every: int
    mean_s: float
    p50_s: float
    p99_s: float
    p999_s: float
    max_s: float
    # (upper bound in seconds, cumulative count) per LATENCY_BUCKETS_S.
    buckets: tuple[tuple[float, int], ...]
    sum_s: float


@dataclass(frozen=True)
class QueueStats:
    """Snapshot of an in-process `Queue` or `SimpleQueue`.

    `enqueued` counts items put ever (delayed ones included, from their
    put), and `dequeued` counts items got ever. `dropped` maps a reason to the
    number of items lost for it (``"shutdown"``: discarded by
    ``shutdown(immediate=True)``).
    """

    kind: str
    depth: int
    delayed: int
    maxsize: int
    enqueued: int
    dequeued: int
    unfinished_tasks: int | None
    dropped: Mapping[str, int]
    latency: LatencySummary | None


@dataclass(frozen=True)
class SharedQueueStats:
    """Snapshot of a `SharedQueue`, read from its shared mapping.

    Per-group tuples are indexed by group number. `lag[g]` is the number
    of messages group g has not got yet. `depth` is the lag of the group
    that the reading handle gets from, or of group 0 for a read-only
    inspection.
    `dropped` maps a reason to a count: ``"repaired_record"`` for records
    of producers that died while publishing, turned into padding by a
    reader; ``"consumer_died"`` for an upper bound on messages taken by
    consumers that died before returning them or while lending them as
    views (`SharedQueue.get_view`);
    ``"decode_failed"`` for messages dropped because their payload
    failed to deserialize (raised as `mqs.MessageDecodeError`);
    ``"damaged_record"``, on a durable queue, for messages taken whose
    log record failed its CRC check (damaged on disk) or was missing (a
    segment deleted by hand), which the get skips.
    `delayed` is None for a queue without delayed delivery.

    A durable queue (``persist=``) reports its log: `groups`, `lag` and
    `depth` count the messages in the log and in its inbox ring that a
    group has not taken, `dequeued` the log offsets each group took,
    `enqueued` every message appended or waiting in the inbox, and
    `maxsize` the durable bound. It also fills `persist` (the log
    directory), `committed` (per group, the offset last written to the
    log, where the group restarts after a crash of every process) and
    `lag_seconds` (per group, the age of the oldest message it has not
    taken, 0.0 with no lag). `inspect_shared_queue` and
    `scan_shared_queues` find a named durable queue's log through the
    file ``/dev/shm/mqs-persist.<name>`` that its handles write. The
    ring fields (`capacity_bytes`,
    `used_bytes`, `attached_processes`, the repair counters) describe
    the inbox; read from the directory alone they are 0.
    """

    name: str | None
    capacity_bytes: int
    max_message_size: int
    maxsize: int
    groups: int
    group: int
    depth: int
    delayed: int | None
    enqueued: int
    dequeued: tuple[int, ...]
    lag: tuple[int, ...]
    used_bytes: int
    attached_processes: int
    repaired_records: int
    repaired_bytes: int
    lost_records: int
    stalls_reported: int
    # Enqueue-to-deliver latency of sampled messages, all groups
    # together; None while sampling is off and nothing was recorded.
    latency: LatencySummary | None = None
    persist: str | None = None
    committed: tuple[int | None, ...] | None = None
    lag_seconds: tuple[float, ...] | None = None
    # Messages taken whose payload failed to deserialize, so the get
    # that took them raised MessageDecodeError and they were dropped.
    decode_failures: int = 0
    # Durable queue: messages taken whose log record was damaged or
    # missing.
    damaged_records: int = 0

    @property
    def dropped(self) -> Mapping[str, int]:
        """Messages lost, by reason."""
        return MappingProxyType({"repaired_record": self.repaired_records,
                                 "consumer_died": self.lost_records,
                                 "decode_failed": self.decode_failures,
                                 "damaged_record": self.damaged_records})


@dataclass(frozen=True)
class SegmentLogStats:
    """Snapshot of a `SegmentLog`.

    `appended_records`, `syncs` and `sync_errno` count what this
    process's handle did; offsets, `segments` and `bytes` describe the
    log. `records_dropped` counts records of a torn tail zeroed by the
    recovery on open, and `committed` maps each consumer group to its
    committed offset.
    """

    path: str
    start_offset: int
    end_offset: int
    synced_offset: int
    segments: int
    bytes: int
    appended_records: int
    syncs: int
    sync_errno: int
    segments_deleted: int
    records_deleted: int
    records_dropped: int
    committed: Mapping[str, int]

    @property
    def consumer_lag(self) -> Mapping[str, int]:
        """Records after each group's committed offset."""
        return MappingProxyType(
            {group: max(0, self.end_offset - max(offset, self.start_offset))
             for group, offset in self.committed.items()})


# ---------------------------------------------------------------- histogram


class LatencyHistogram:
    """HDR histogram of latencies in nanoseconds.

    `record_ns` only appends to a list, which is safe from any thread
    under the GIL. Recording into the HDR histogram costs about 2 us per
    value (hdrhistogram 0.10.8, measured on a 2-core x86_64 machine), so
    values move there in batches of `FOLD_EVERY` or when a summary is
    read.
    """

    FOLD_EVERY = 4096

    def __init__(self) -> None:
        self._histogram: Any = None
        self._recent: list[int] = []
        self._lock = threading.Lock()
        self._sum_ns = 0

    def record_ns(self, value_ns: int) -> None:
        """Record one latency; values are clamped to the histogram range."""
        self._recent.append(value_ns)
        if len(self._recent) >= self.FOLD_EVERY:
            with self._lock:
                self._fold()

    def _fold(self) -> None:
        """Move the recent values into the HDR histogram (lock held)."""
        recent, self._recent = self._recent, []
        if self._histogram is None:
            from hdrh.histogram import HdrHistogram

            self._histogram = HdrHistogram(
                HISTOGRAM_LOWEST_NS, HISTOGRAM_HIGHEST_NS, HISTOGRAM_DIGITS)
        for value_ns in recent:
            value_ns = min(max(value_ns, HISTOGRAM_LOWEST_NS),
                           HISTOGRAM_HIGHEST_NS)
            self._histogram.record_value(value_ns)
            self._sum_ns += value_ns

    def summary(self, sample_every: int) -> LatencySummary:
        """Return the percentiles and the Prometheus buckets."""
        with self._lock:
            self._fold()
            h = self._histogram
            count = h.get_total_count()
            if count == 0:
                return LatencySummary(
                    0, sample_every, 0.0, 0.0, 0.0, 0.0, 0.0,
                    tuple((bound, 0) for bound in LATENCY_BUCKETS_S), 0.0)
            percentiles = h.get_percentile_to_value_dict([50, 99, 99.9])
            return LatencySummary(
                count=count, sample_every=sample_every,
                mean_s=h.get_mean_value() / 1e9,
                p50_s=percentiles[50] / 1e9, p99_s=percentiles[99] / 1e9,
                p999_s=percentiles[99.9] / 1e9,
                max_s=h.get_max_value() / 1e9, buckets=_buckets(h),
                sum_s=self._sum_ns / 1e9)


def _buckets(histogram: Any) -> tuple[tuple[float, int], ...]:
    """Return (bound in seconds, cumulative count) per LATENCY_BUCKETS_S.

    A value counts in the first bound at or above the highest value of
    its HDR bucket, so a count may land one Prometheus bucket late (by
    at most 1%, the histogram's precision).
    """
    buckets = []
    cumulative = 0
    values = iter(histogram.get_recorded_iterator())
    pending = next(values, None)
    for bound in LATENCY_BUCKETS_S:
        while pending is not None \
                and pending.value_iterated_to <= bound * 1e9:
            cumulative += pending.count_at_value_iterated_to
            pending = next(values, None)
        buckets.append((bound, cumulative))
    return tuple(buckets)


# Log-linear buckets, the layout of the C histogram of shared queues too.
# Values below 2 * HIST_SUB_BUCKETS ns get one bucket each. Above that,
# every power of two splits into HIST_SUB_BUCKETS buckets, so a bucket is
# at most 1/32 (3.1%) of its values wide. Values clamp to HIST_MAX_NS
# (about 73 minutes).
HIST_SUB_BUCKETS = 32
HIST_MAX_NS = (1 << 42) - 1
HIST_BUCKETS = 1216


def hist_index(value_ns: int) -> int:
    """Return the log-linear bucket of `value_ns` (clamped to the range)."""
    value_ns = min(max(value_ns, 0), HIST_MAX_NS)
    if value_ns < 2 * HIST_SUB_BUCKETS:
        return value_ns
    shift = value_ns.bit_length() - 6
    return (shift + 1) * HIST_SUB_BUCKETS + (value_ns >> shift) \
        - HIST_SUB_BUCKETS


def hist_upper_ns(index: int) -> int:
    """Return the highest value in ns that bucket `index` holds."""
    if index < 2 * HIST_SUB_BUCKETS:
        return index
    shift = index // HIST_SUB_BUCKETS - 1
    sub = index % HIST_SUB_BUCKETS + HIST_SUB_BUCKETS
    return ((sub + 1) << shift) - 1


class LogLinearHistogram:
    """Latency histogram in log-linear buckets (see `hist_index`).

    Cheap to record into from Python, picklable, and the same bucket
    layout as the histogram a shared queue keeps in its mapping. Counts
    are kept sparse, so an idle histogram is a few empty fields.
    """

    __slots__ = ("counts", "count", "sum_ns", "max_ns")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.sum_ns = 0
        self.max_ns = 0

    def __getstate__(self) -> tuple:
        return (self.counts, self.count, self.sum_ns, self.max_ns)

    def __setstate__(self, state: tuple) -> None:
        self.counts, self.count, self.sum_ns, self.max_ns = state

    def record_ns(self, value_ns: int) -> None:
        """Record one value in ns; negative values count as 0."""
        value_ns = min(max(int(value_ns), 0), HIST_MAX_NS)
        index = hist_index(value_ns)
        self.counts[index] = self.counts.get(index, 0) + 1
        self.count += 1
        self.sum_ns += value_ns
        if value_ns > self.max_ns:
            self.max_ns = value_ns

    def record_s(self, seconds: float) -> None:
        """Record one value in seconds."""
        self.record_ns(round(seconds * 1e9))

    def summary(self, sample_every: int) -> LatencySummary:
        """Return the percentiles and the Prometheus buckets.

        Percentiles are the highest value of the bucket they fall in, so
        they read up to 3.1% high.
        """
        return summarize_buckets(sorted(self.counts.items()), self.count,
                                 self.sum_ns, self.max_ns, sample_every)


def summarize_buckets(counts: Iterable[tuple[int, int]], count: int,
                      sum_ns: int, max_ns: int,
                      sample_every: int) -> LatencySummary:
    """Build a `LatencySummary` from (bucket index, count) pairs in
    bucket order, as `LogLinearHistogram` and shared queues keep them."""
    counts = [(index, n) for index, n in counts if n]
    total = sum(n for _, n in counts)
    if total == 0:
        return LatencySummary(
            0, sample_every, 0.0, 0.0, 0.0, 0.0, 0.0,
            tuple((bound, 0) for bound in LATENCY_BUCKETS_S), 0.0)
    # Concurrent recorders update the fields one by one: trust the bucket
    # counts, which every percentile comes from.
    count = total

    def percentile(fraction: float) -> float:
        rank = max(1, math.ceil(fraction * total))
        seen = 0
        for index, n in counts:
            seen += n
            if seen >= rank:
                return min(hist_upper_ns(index), max_ns or HIST_MAX_NS) / 1e9
        return max_ns / 1e9

    buckets = []
    cumulative = 0
    pending = iter(counts)
    item = next(pending, None)
    for bound in LATENCY_BUCKETS_S:
        while item is not None and hist_upper_ns(item[0]) <= bound * 1e9:
            cumulative += item[1]
            item = next(pending, None)
        buckets.append((bound, cumulative))
    highest = max(max_ns, 0) / 1e9
    return LatencySummary(
        count=count, sample_every=sample_every, mean_s=sum_ns / count / 1e9,
        p50_s=percentile(0.5), p99_s=percentile(0.99),
        p999_s=percentile(0.999),
        max_s=highest or hist_upper_ns(counts[-1][0]) / 1e9,
        buckets=tuple(buckets), sum_s=sum_ns / 1e9)


class LatencySampler:
    """The sampling rate and the latency histogram of one queue.

    The queue stamps one message in `sample_every` when it becomes ready
    and hands the latencies of the stamped messages it delivers to
    `record_many`.
    """

    def __init__(self, sample_every: int) -> None:
        if not isinstance(sample_every, int) or isinstance(sample_every, bool):
            raise TypeError(f"sample_every must be an int, got "
                            f"{type(sample_every).__name__} {sample_every!r}")
        if sample_every < 1:
            raise ValueError(f"sample_every must be at least 1 (1 samples "
                             f"every message), got {sample_every!r}")
        self.sample_every = sample_every
        self.histogram = LatencyHistogram()

    def record_many(self, latencies_ns: list[int]) -> None:
        for value_ns in latencies_ns:
            self.histogram.record_ns(value_ns)

    def summary(self) -> LatencySummary:
        return self.histogram.summary(self.sample_every)


_default_sample_every = DEFAULT_SAMPLE_EVERY


def set_default_sample_every(sample_every: int | None) -> None:
    """Set latency sampling for queues created from now on.

    Parameters
    ----------
    sample_every : int or None
        Sample one message in this many (1 samples every message); None
        turns sampling off for new queues. Existing queues keep theirs;
        change one with its ``set_latency_sampling`` method.
    """
    global _default_sample_every
    if sample_every is not None:
        LatencySampler(sample_every)  # validates
    _default_sample_every = sample_every


def default_sample_every() -> int | None:
    """Return the sampling rate given to new in-process queues."""
    return _default_sample_every


# ------------------------------------------------------- metric definitions


@dataclass(frozen=True)
class Metric:
    """A Prometheus metric family: name (``mqs_`` prefix), type, help."""

    name: str
    type: str
    help: str

    def __post_init__(self) -> None:
        if not self.name.startswith("mqs_"):
            raise ValueError(f"metric name must start with 'mqs_', got "
                             f"{self.name!r}")
        if self.type not in ("counter", "gauge", "histogram"):
            raise ValueError(f"metric type must be 'counter', 'gauge' or "
                             f"'histogram', got {self.type!r}")
        if self.type == "counter" and not self.name.endswith("_total"):
            raise ValueError(f"counter name must end in '_total', got "
                             f"{self.name!r}")


@dataclass(frozen=True)
class Sample:
    """One value of a metric with its labels; a histogram's value is a
    `LatencySummary`."""

    metric: Metric
    labels: Mapping[str, str]
    value: Any


QUEUE_DEPTH = Metric(
    "mqs_queue_depth_messages", "gauge",
    "Messages ready to be got (per consumer group for shared queues)")
QUEUE_DELAYED = Metric(
    "mqs_queue_delayed_messages", "gauge",
    "Messages put with a delay that are not due yet")
QUEUE_MAXSIZE = Metric(
    "mqs_queue_maxsize_messages", "gauge",
    "Bound on queued messages; 0 means bounded only by memory or the ring")
QUEUE_CAPACITY = Metric(
    "mqs_queue_capacity_bytes", "gauge",
    "Size of a shared queue's ring")
QUEUE_USED = Metric(
    "mqs_queue_used_bytes", "gauge",
    "Ring bytes held by messages that the slowest group has not got")
QUEUE_ENQUEUED = Metric(
    "mqs_queue_enqueued_messages_total", "counter",
    "Messages put (a delayed message counts once it is due)")
QUEUE_DEQUEUED = Metric(
    "mqs_queue_dequeued_messages_total", "counter",
    "Messages got (per consumer group for shared queues)")
QUEUE_DROPPED = Metric(
    "mqs_queue_dropped_messages_total", "counter",
    "Messages lost, by reason")
QUEUE_LAG = Metric(
    "mqs_queue_consumer_lag_messages", "gauge",
    "Messages a consumer group of a shared queue has not got yet")
QUEUE_LAG_SECONDS = Metric(
    "mqs_queue_consumer_lag_seconds", "gauge",
    "Age of the oldest message a consumer group of a durable shared "
    "queue has not got")
QUEUE_COMMITTED = Metric(
    "mqs_queue_committed_offset", "gauge",
    "Log offset where a consumer group of a durable shared queue "
    "restarts after a crash of every process")
QUEUE_ATTACHED = Metric(
    "mqs_queue_attached_processes", "gauge",
    "Live processes attached to a shared queue")
QUEUE_LATENCY = Metric(
    "mqs_queue_latency_seconds", "histogram",
    "Time from ready (put, or due) to got, of sampled messages")
LOG_START_OFFSET = Metric(
    "mqs_log_start_offset", "gauge", "First retained offset of a log")
LOG_END_OFFSET = Metric(
    "mqs_log_end_offset", "gauge",
    "Offset the next append of a log gets")
LOG_SEGMENTS = Metric(
    "mqs_log_segments", "gauge", "Segments of a log")
LOG_SIZE = Metric(
    "mqs_log_size_bytes", "gauge", "Bytes of a log's segments")
LOG_APPENDED = Metric(
    "mqs_log_appended_records_total", "counter",
    "Records appended by this process's handle")
LOG_SYNCS = Metric(
    "mqs_log_syncs_total", "counter",
    "Flushes to disk by this process's handle")
LOG_DELETED = Metric(
    "mqs_log_deleted_records_total", "counter",
    "Records deleted by retention")
LOG_DROPPED = Metric(
    "mqs_log_dropped_records_total", "counter",
    "Records lost, by reason (torn_tail: zeroed by recovery on open)")
LOG_LAG = Metric(
    "mqs_log_consumer_lag_messages", "gauge",
    "Records after a consumer group's committed offset")


# ----------------------------------------------------------------- registry


class CollectorHandle:
    """Returned by `MetricsRegistry.add_collector`; `remove` undoes it."""

    def __init__(self, registry: MetricsRegistry, key: int) -> None:
        self._registry = registry
        self._key = key

    def remove(self) -> None:
        self._registry._remove_collector(self._key)


class MetricsRegistry:
    """The sources one exporter reads; `REGISTRY` is the process's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: weakref.WeakKeyDictionary[Any, str] = \
            weakref.WeakKeyDictionary()
        self._serials = itertools.count(1)
        self._logs: weakref.WeakSet[Any] = weakref.WeakSet()
        self._collectors: dict[int, Callable[[], Iterable[Sample]]] = {}
        self._collector_keys = itertools.count()
        # Failed scrapes in a row, per collector key.
        self._collector_failures: dict[int, int] = {}

    def register(self, source: Any, name: str | None = None) -> None:
        """Export `source` (a queue or a `SegmentLog`) under `name`.

        In-process queues are exported without this call, under a name
        such as ``Queue-3``; call it to give one a stable name. A
        `SegmentLog` is exported only once registered, labelled by its
        path unless `name` is given.
        """
        from mqs._seglog import SegmentLog

        with self._lock:
            if name is not None:
                if not isinstance(name, str) or not name:
                    raise ValueError(f"name must be a non-empty str, got "
                                     f"{name!r}")
                self._names[source] = name
            if isinstance(source, SegmentLog):
                self._logs.add(source)

    def name_of(self, source: Any) -> str:
        """Return the exported name of `source`, assigning one if needed."""
        with self._lock:
            name = self._names.get(source)
            if name is None:
                name = f"{type(source).__name__}-{next(self._serials)}"
                self._names[source] = name
            return name

    def add_collector(
            self, collect: Callable[[], Iterable[Sample]]) -> CollectorHandle:
        """Export the samples `collect()` returns, on every scrape.

        `collect` runs in the exporter's thread and must not block for
        long. An exception in it skips its samples of that scrape. The
        first failure in a row is logged at WARNING with its traceback,
        the repeats at DEBUG with their count, and the next success at
        INFO.
        """
        if not callable(collect):
            raise TypeError(f"collect must be callable, got {collect!r}")
        with self._lock:
            key = next(self._collector_keys)
            self._collectors[key] = collect
        return CollectorHandle(self, key)

    def _remove_collector(self, key: int) -> None:
        with self._lock:
            self._collectors.pop(key, None)
            self._collector_failures.pop(key, None)

    def collect(self, scan_shared: bool = True) -> list[Sample]:
        """Return the samples of every source, read now."""
        samples: list[Sample] = []
        samples.extend(self._local_queue_samples())
        samples.extend(self._local_shared_samples(scan_shared))
        if scan_shared:
            durable = _local_durable_names()
            for stats in scan_shared_queues():
                if stats.name in durable:
                    continue
                samples.extend(shared_queue_samples(stats, stats.name or ""))
        with self._lock:
            logs = list(self._logs)
            collectors = list(self._collectors.items())
        for log in logs:
            if log.closed:
                continue
            if log.readonly:
                log.refresh()
            samples.extend(log_samples(log.stats(), self._log_name(log)))
        for key, collect in collectors:
            try:
                samples.extend(collect())
            except Exception:
                self._log_collector_failure(key, collect)
            else:
                self._log_collector_recovery(key, collect)
        return samples

    def _log_collector_failure(self, key: int, collect: Callable) -> None:
        """Log a failed collector, with the traceback only the first time
        in a row, so that a collector failing on every scrape does not
        fill the log."""
        with self._lock:
            if key not in self._collectors:
                return  # removed during this scrape
            failures = self._collector_failures.get(key, 0) + 1
            self._collector_failures[key] = failures
        if failures == 1:
            logger.warning("metrics collector %r failed; its samples are "
                           "skipped until it succeeds (repeats are logged "
                           "at DEBUG)", collect, exc_info=True)
        else:
            logger.debug("metrics collector %r failed again (%d scrapes in "
                         "a row)", collect, failures, exc_info=True)

    def _log_collector_recovery(self, key: int, collect: Callable) -> None:
        with self._lock:
            failures = self._collector_failures.pop(key, 0)
        if failures:
            logger.info("metrics collector %r succeeded after %d failed "
                        "scrapes", collect, failures)

    def _log_name(self, log: Any) -> str:
        with self._lock:
            return self._names.get(log, log.path)

    def _local_queue_samples(self) -> Iterator[Sample]:
        from mqs import _queue

        for queue in _queue._live_queues():
            yield from queue_samples(queue.stats(), self.name_of(queue))

    def _local_shared_samples(self, scan_shared: bool) -> Iterator[Sample]:
        from mqs import _shared

        for queue in _shared._live_queues():
            # A named queue is read by the machine-wide scan already,
            # except a durable one, whose ring is only its inbox.
            if scan_shared and queue.name is not None \
                    and not queue._has_log:
                continue
            try:
                stats = queue.stats()
            except ValueError:  # closed meanwhile
                continue
            yield from shared_queue_samples(
                stats, queue.name or self.name_of(queue))


def _local_durable_names() -> set[str]:
    """Names of the durable shared queues open in this process."""
    from mqs import _shared

    return {queue.name for queue in _shared._live_queues()
            if queue.name is not None and queue._has_log}


REGISTRY = MetricsRegistry()


def register(source: Any, name: str | None = None) -> None:
    """Export `source` through `REGISTRY`; see `MetricsRegistry.register`."""
    REGISTRY.register(source, name)


# ------------------------------------------------------- stats to samples


def queue_samples(stats: QueueStats, name: str) -> Iterator[Sample]:
    labels = {"queue": name, "kind": stats.kind}
    group_labels = {**labels, "group": "0"}
    yield Sample(QUEUE_DEPTH, group_labels, stats.depth)
    yield Sample(QUEUE_DELAYED, labels, stats.delayed)
    yield Sample(QUEUE_MAXSIZE, labels, stats.maxsize)
    yield Sample(QUEUE_ENQUEUED, labels, stats.enqueued)
    yield Sample(QUEUE_DEQUEUED, group_labels, stats.dequeued)
    yield from _drop_and_latency_samples(stats, labels)


def shared_queue_samples(stats: SharedQueueStats,
                         name: str) -> Iterator[Sample]:
    labels = {"queue": name, "kind": "SharedQueue"}
    for group in range(stats.groups):
        group_labels = {**labels, "group": str(group)}
        yield Sample(QUEUE_DEPTH, group_labels, stats.lag[group])
        yield Sample(QUEUE_LAG, group_labels, stats.lag[group])
        yield Sample(QUEUE_DEQUEUED, group_labels, stats.dequeued[group])
        if stats.lag_seconds is not None:
            yield Sample(QUEUE_LAG_SECONDS, group_labels,
                         stats.lag_seconds[group])
        if stats.committed is not None \
                and stats.committed[group] is not None:
            yield Sample(QUEUE_COMMITTED, group_labels,
                         stats.committed[group])
    if stats.delayed is not None:
        yield Sample(QUEUE_DELAYED, labels, stats.delayed)
    yield Sample(QUEUE_MAXSIZE, labels, stats.maxsize)
    yield Sample(QUEUE_CAPACITY, labels, stats.capacity_bytes)
    yield Sample(QUEUE_USED, labels, stats.used_bytes)
    yield Sample(QUEUE_ENQUEUED, labels, stats.enqueued)
    yield Sample(QUEUE_ATTACHED, labels, stats.attached_processes)
    yield from _drop_and_latency_samples(stats, labels)


def _drop_and_latency_samples(stats: QueueStats | SharedQueueStats,
                              labels: dict[str, str]) -> Iterator[Sample]:
    for reason, count in stats.dropped.items():
        yield Sample(QUEUE_DROPPED, {**labels, "reason": reason}, count)
    if stats.latency is not None:
        yield Sample(QUEUE_LATENCY,
                     {**labels, "stage": "enqueue_to_deliver"},
                     stats.latency)


def log_samples(stats: Any, name: str) -> Iterator[Sample]:
    labels = {"log": name}
    yield Sample(LOG_START_OFFSET, labels, stats.start_offset)
    yield Sample(LOG_END_OFFSET, labels, stats.end_offset)
    yield Sample(LOG_SEGMENTS, labels, stats.segments)
    yield Sample(LOG_SIZE, labels, stats.bytes)
    yield Sample(LOG_APPENDED, labels, stats.appended_records)
    yield Sample(LOG_SYNCS, labels, stats.syncs)
    yield Sample(LOG_DELETED, labels, stats.records_deleted)
    yield Sample(LOG_DROPPED, {**labels, "reason": "torn_tail"},
                 stats.records_dropped)
    for group, lag in stats.consumer_lag.items():
        yield Sample(LOG_LAG, {**labels, "group": group}, lag)


# ---------------------------------------------------- machine-wide queues


def shared_queue_paths() -> list[str]:
    """Return the files of the named shared queues of this machine."""
    paths = []
    for path in sorted(glob.glob(os.path.join(SHM_DIR, SHM_PREFIX + "*"))):
        # A creator formats a queue under "<name>.<pid>.<hex>.tmp" and then
        # links it into place; such a file is not a queue yet.
        if path.endswith(".tmp") or not os.path.isfile(path):
            continue
        paths.append(path)
    return paths


def inspect_shared_queue(name_or_path: str) -> SharedQueueStats:
    """Read a named shared queue's stats without attaching to it.

    The header is mapped read-only: no participant slot is taken and
    nothing in the queue is written, so producers and consumers are not
    disturbed. `name_or_path` is a queue name or a path in /dev/shm.

    Raises
    ------
    QueueNotFound
        If no such queue exists.
    QueueLayoutError
        If the file is not an mqs queue of this layout.
    """
    from mqs import _shared

    if os.sep in name_or_path:
        path = name_or_path
        base = os.path.basename(path)
        name = base[len(SHM_PREFIX):] if base.startswith(SHM_PREFIX) \
            else base
    else:
        name = name_or_path
        path = os.path.join(SHM_DIR, SHM_PREFIX + name)
    return _shared._inspect_file(path, name)


def inspect_durable_queue(path: str) -> SharedQueueStats:
    """Read the stats of the durable shared queue whose log is at `path`
    (``SharedQueue(persist=path)``) without attaching to it.

    The control file is mapped read-only and the log opened read-only;
    the queue need not be running. The inbox ring is not read, so its
    fields are 0 and messages not yet moved into the log are not counted.

    Raises
    ------
    QueueNotFound
        If `path` has no durable queue's control file.
    QueueLayoutError
        If the control file was written by an older mqs.
    """
    from mqs import _shared

    return _shared._inspect_durable_dir(path)


def scan_shared_queues() -> list[SharedQueueStats]:
    """Return the stats of every named shared queue of this machine.

    Files that vanish while being read, are not mqs queues of this
    layout, or cannot be read (a damaged durable queue log, for one) are
    skipped (logged at DEBUG), so one broken queue does not hide the
    others.
    """
    from mqs.errors import MqsError

    found = []
    for path in shared_queue_paths():
        try:
            found.append(inspect_shared_queue(path))
        except (MqsError, OSError) as exc:
            logger.debug("skipping %s: %s", path, exc)
    return found


def stats_as_dict(stats: Any) -> dict[str, Any]:
    """Return a stats record as a dict of plain values (for JSON)."""
    result: dict[str, Any] = {}
    for field in dataclasses.fields(stats):
        result[field.name] = _plain(getattr(stats, field.name))
    for name in ("dropped", "consumer_lag"):
        if hasattr(type(stats), name):
            result[name] = _plain(getattr(stats, name))
    return result


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if dataclasses.is_dataclass(value):
        return stats_as_dict(value)
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


# ----------------------------------------------------------------- broker

TOPIC_MESSAGES = Metric(
    "mqs_topic_messages", "gauge",
    "Messages of a broker topic by state (stored, ready, delayed, "
    "in_flight, dlq)")
TOPIC_GROUPS = Metric(
    "mqs_topic_consumer_groups", "gauge", "Consumer groups of a topic")
TOPIC_EVENTS = Metric(
    "mqs_topic_messages_total", "counter",
    "Messages of a broker topic by event (published, delivered, acked, "
    "nacked, redelivered, late_acks, redriven)")
TOPIC_DROPPED = Metric(
    "mqs_topic_dropped_messages_total", "counter",
    "Messages of a broker topic dropped or dead-lettered, by reason")

GROUP_LAG = Metric(
    "mqs_topic_consumer_lag_messages", "gauge",
    "Ready messages a consumer group of a broker topic has not got yet")
GROUP_LAG_SECONDS = Metric(
    "mqs_topic_consumer_lag_seconds", "gauge",
    "Seconds the oldest ready message of a consumer group has waited")
GROUP_IN_FLIGHT = Metric(
    "mqs_topic_group_in_flight_messages", "gauge",
    "Messages a consumer group got and has not acked yet")
GROUP_CONSUMERS = Metric(
    "mqs_topic_group_consumers", "gauge",
    "Open consumers of a consumer group")
GROUP_EVENTS = Metric(
    "mqs_topic_group_messages_total", "counter",
    "Messages of a consumer group by event (delivered, acked, nacked, "
    "redelivered, dead_lettered)")
GROUP_ERRORS = Metric(
    "mqs_topic_group_errors_total", "counter",
    "Failed deliveries of a consumer group: nacks, and dead letters that "
    "no nack caused")
GROUP_ERROR_RATIO = Metric(
    "mqs_topic_group_error_ratio", "gauge",
    "Failed deliveries over deliveries since the group was created")
TOPIC_LATENCY = Metric(
    "mqs_topic_latency_seconds", "histogram",
    "Sampled broker latencies by stage: enqueue_to_deliver (ready to "
    "delivered) and deliver_to_ack")

_GROUP_EVENTS = ("delivered", "acked", "nacked", "redelivered",
                 "dead_lettered")
_TOPIC_EVENTS = ("published", "delivered", "acked", "nacked",
                 "redelivered", "late_acks", "redriven")
_TOPIC_STATES = ("stored", "ready", "delayed", "in_flight", "dlq")


def topic_samples(stats: Mapping[str, int], topic: str,
                  broker: str) -> Iterator[Sample]:
    """Turn the dict of `Broker.stats(topic)` into samples."""
    labels = {"broker": broker, "topic": topic}
    for state in _TOPIC_STATES:
        if state in stats:
            yield Sample(TOPIC_MESSAGES, {**labels, "state": state},
                         stats[state])
    if "groups" in stats:
        yield Sample(TOPIC_GROUPS, labels, stats["groups"])
    for event in _TOPIC_EVENTS:
        if event in stats:
            yield Sample(TOPIC_EVENTS, {**labels, "event": event},
                         stats[event])
    for key, count in stats.items():
        if key in ("deduplicated", "expired", "dropped_full",
                   "dropped_unsubscribed", "dlq_purged") \
                or key.startswith("dead_lettered."):
            yield Sample(TOPIC_DROPPED, {**labels, "reason": key}, count)


def group_samples(groups: Iterable[Any], broker: str) -> Iterator[Sample]:
    """Turn the `GroupStats` list of `Broker.group_stats` into samples."""
    for stats in groups:
        labels = {"broker": broker, "topic": stats.topic,
                  "group": stats.group}
        yield Sample(GROUP_LAG, labels, stats.lag_messages)
        yield Sample(GROUP_LAG_SECONDS, labels, stats.lag_seconds)
        yield Sample(GROUP_IN_FLIGHT, labels, stats.in_flight)
        yield Sample(GROUP_CONSUMERS, labels, stats.consumers)
        for event in _GROUP_EVENTS:
            yield Sample(GROUP_EVENTS, {**labels, "event": event},
                         getattr(stats, event))
        yield Sample(GROUP_ERRORS, labels, stats.errors)
        yield Sample(GROUP_ERROR_RATIO, labels, stats.error_ratio)
        for stage in ("enqueue_to_deliver", "deliver_to_ack"):
            summary = getattr(stats, stage)
            if summary is not None:
                yield Sample(TOPIC_LATENCY, {**labels, "stage": stage},
                             summary)


def _log_missing_topic(name: str, topic: str, exc: LookupError,
                       known_before: bool) -> None:
    if known_before:
        logger.debug("broker %s: skipping topic %r: %s", name, topic, exc)
        return
    logger.warning(
        "broker %s: topic %r not found, so no metrics are exported for "
        "it until it is declared; check the name passed to "
        "register_broker against broker.topics(): %s", name, topic, exc)


def register_broker(broker: Any, topics: Iterable[str], name: str = "default",
                    registry: MetricsRegistry | None = None
                    ) -> CollectorHandle:
    """Export the stats of `topics` of `broker` on every scrape.

    Uses the registry's collector hook. A topic need not exist yet at
    registration, because publishing may declare it later: until it
    exists, scrapes skip it, and the first such scrape logs a WARNING
    naming the topic, so a misspelt name does not go unnoticed. A topic
    deleted after it was exported is skipped (and logged at DEBUG) until
    it is declared again. The per-group metrics (lag, error ratio,
    latency histograms) come from `Broker.group_stats`; a backend
    without it exports the topic metrics only (logged at DEBUG once).
    Once the broker is closed (its stats raise `ShutDown`), the next
    scrape removes the export and logs it at INFO.
    Returns the handle whose ``remove()`` stops the export.

    Raises TypeError if `topics` is a single str rather than an iterable
    of topic names.
    """
    if isinstance(topics, str):
        raise TypeError(
            f"topics must be an iterable of topic names, got str "
            f"{topics!r}; pass [{topics!r}] for one topic")
    topics = list(topics)
    without_groups: list[bool] = []
    # Topics exported at least once, or already warned about as missing.
    known: set[str] = set()

    def collect() -> Iterator[Sample]:
        try:
            yield from collect_topics()
        except ShutDown as exc:
            handle.remove()
            logger.info("broker %s is closed, so its metrics are no longer "
                        "exported; call register_broker again for the "
                        "broker that replaces it: %s", name, exc)

    def collect_topics() -> Iterator[Sample]:
        for topic in topics:
            try:
                stats = broker.stats(topic)
            except LookupError as exc:
                _log_missing_topic(name, topic, exc, topic in known)
                known.add(topic)
                continue
            known.add(topic)
            yield from topic_samples(stats, topic, name)
            if without_groups:
                continue
            try:
                groups = broker.group_stats(topic)
            except LookupError:
                continue  # deleted since the stats call
            except NotImplementedError as exc:
                logger.debug("broker %s: no group metrics: %s", name, exc)
                without_groups.append(True)
                continue
            yield from group_samples(groups, name)

    handle = (registry or REGISTRY).add_collector(collect)
    return handle
