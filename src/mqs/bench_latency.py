"""One-way latency at a fixed rate, measured from the intended send times.

A benchmark that sends a message, waits for it and only then sends the
next one hides the stalls it suffers. While a put blocks, the messages
that should have gone out in the meantime are never sent, so their long
waits are never counted. This error is called coordinated omission.

Here a sender runs at a fixed rate: message i is due at ``start + i *
interval``. The sender waits for that time (or goes at once when it is
late), puts the message, and writes its index, intended send time and
actual send time into the payload. The receiver takes each message,
reads the clock (`time.perf_counter_ns`, CLOCK_MONOTONIC on Linux, so
the same clock in every process) and records two latencies:

- corrected: receive time minus intended send time, what a caller that
  produced a message on schedule would see; a stall of the sender or of
  the queue counts for every message that was due during it;
- uncorrected: receive time minus actual send time, what a naive
  benchmark reports.

Percentiles use the nearest-rank method. The rate must stay well below
what every queue sustains, or the corrected latencies grow with the run
length (the queue is saturated, which the output then shows).

Peers: over threads `mqs.Queue`, `mqs.SimpleQueue`, `queue.Queue` (the
reference) and `queue.SimpleQueue`; over processes `mqs.SharedQueue`,
`multiprocessing.Queue` (the reference), `faster_fifo.Queue`, pyzmq
PUSH/PULL and Redis (LPUSH and BRPOP on a list, one command per message,
with a throwaway redis-server on 127.0.0.1), each skipped with a reason
when it is not installed. This module only measures; `mqs.cli_bench`
prints the results.
"""

from __future__ import annotations

import array
import dataclasses
import importlib.util
import logging
import math
import statistics
import struct
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from mqs import bench_ipc, bench_shapes
from mqs.bench import BenchmarkError

logger = logging.getLogger(__name__)

DEFAULT_RATE_PER_S = 5_000
PAYLOAD_BYTES = 64
START_LEAD_NS = 2_000_000
# Below this much time to wait, the sender calls time.sleep(0) in a loop
# instead of one longer sleep, whose wake-up can be late by tens of
# microseconds. sleep(0) releases the GIL, so a receiving thread can run,
# and yields the CPU: on a busy 2-core machine a sender process that spins
# on the clock instead delayed its receiver by milliseconds.
SPIN_BELOW_NS = 2_000_000
PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99),
               ("p99.9", 0.999))
METHOD = ("one sender at a fixed rate; latency = receive time - intended "
          "send time (coordinated omission corrected); uncorrected = "
          "receive time - actual send time")
REFERENCES = {"threads": "queue.Queue",
              "processes": bench_ipc.REFERENCE_QUEUE}

_HEADER = struct.Struct("<qqq")


class FixedRateSchedule:
    """The intended send times of a sender at `rate_per_s` from `start_ns`."""

    def __init__(self, rate_per_s: float, start_ns: int):
        if not rate_per_s > 0:
            raise ValueError(f"rate_per_s must be > 0, got {rate_per_s!r}")
        self.interval_ns = max(1, round(1e9 / rate_per_s))
        self.start_ns = start_ns

    def intended_ns(self, index: int) -> int:
        """Return when message `index` (from 0) is due."""
        return self.start_ns + index * self.interval_ns

    def wait(self, index: int, clock: Callable[[], int],
             idle: Callable[[int], Any]) -> int:
        """Wait until message `index` is due; return the clock reading.

        `idle(remaining_ns)` is called until `clock()` reaches the due
        time; a sender that is late returns at once.
        """
        due_ns = self.intended_ns(index)
        now_ns = clock()
        while now_ns < due_ns:
            idle(due_ns - now_ns)
            now_ns = clock()
        return now_ns


def idle(remaining_ns: int) -> None:
    """Sleep for most of `remaining_ns`, or yield when little is left."""
    if remaining_ns > SPIN_BELOW_NS:
        time.sleep((remaining_ns - SPIN_BELOW_NS // 2) / 1e9)
    else:
        time.sleep(0)


def percentile(sorted_values: Sequence[int], fraction: float) -> int:
    """Return the nearest-rank percentile of `sorted_values`."""
    if not sorted_values:
        raise ValueError("no values to take a percentile of")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(values: Sequence[int]) -> dict:
    """Return the count, percentiles, min, max and mean of `values` (ns)."""
    ordered = sorted(values)
    summary: dict[str, Any] = {"count": len(ordered)}
    for name, fraction in PERCENTILES:
        summary[f"{name}_ns"] = percentile(ordered, fraction)
    summary["min_ns"] = ordered[0]
    summary["max_ns"] = ordered[-1]
    summary["mean_ns"] = statistics.fmean(ordered)
    return summary


class LatencyRecorder:
    """Latencies of received messages, from intended and from actual sends.

    `record` takes three readings of one clock in nanoseconds.
    """

    def __init__(self) -> None:
        self.corrected_ns = array.array("q")
        self.uncorrected_ns = array.array("q")

    def __len__(self) -> int:
        return len(self.corrected_ns)

    def record(self, intended_ns: int, sent_ns: int,
               received_ns: int) -> None:
        """Record one message due at `intended_ns`, sent at `sent_ns`."""
        self.corrected_ns.append(received_ns - intended_ns)
        self.uncorrected_ns.append(received_ns - sent_ns)

    def extend(self, other: LatencyRecorder) -> None:
        """Add the latencies of `other`."""
        self.corrected_ns.extend(other.corrected_ns)
        self.uncorrected_ns.extend(other.uncorrected_ns)

    def summary(self) -> dict:
        """Return `summarize` of the corrected and uncorrected latencies."""
        return {"corrected": summarize(self.corrected_ns),
                "uncorrected": summarize(self.uncorrected_ns)}


# ------------------------------------------------------------------- roles


def _sender(channel: Any, count: int, rate_per_s: float) -> Callable:
    padding = bytes(PAYLOAD_BYTES - _HEADER.size)

    def role(barrier) -> dict:
        barrier.wait()
        sender = channel.open_sender()
        barrier.wait()
        put = sender.put
        pack = _HEADER.pack
        clock = time.perf_counter_ns
        schedule = FixedRateSchedule(rate_per_s, clock() + START_LEAD_NS)
        wait = schedule.wait
        late = 0
        for index in range(count):
            sent_ns = wait(index, clock, idle)
            intended_ns = schedule.intended_ns(index)
            if sent_ns - intended_ns > schedule.interval_ns:
                late += 1
            put(pack(index, intended_ns, sent_ns) + padding)
        barrier.wait()
        sender.close()
        return {"late": late}

    return role


def _receiver(channel: Any, count: int) -> Callable:
    def role(barrier) -> dict:
        receiver = channel.open_receiver()
        barrier.wait()
        barrier.wait()
        get = receiver.get
        clock = time.perf_counter_ns
        unpack = _HEADER.unpack_from
        recorder = LatencyRecorder()
        record = recorder.record
        mismatched = 0
        first_mismatch = -1
        for expected in range(count):
            message = get()
            received_ns = clock()
            index, intended_ns, sent_ns = unpack(message)
            if index != expected or len(message) != PAYLOAD_BYTES:
                mismatched += 1
                if first_mismatch < 0:
                    first_mismatch = expected
            record(intended_ns, sent_ns, received_ns)
        barrier.wait()
        receiver.close()
        return {"received": count, "mismatched": mismatched,
                "first_mismatch": first_mismatch,
                "corrected_ns": recorder.corrected_ns,
                "uncorrected_ns": recorder.uncorrected_ns}

    return role


# ------------------------------------------------------------------ redis


class _RedisChannel:
    """A Redis list: LPUSH per message, BRPOP per message.

    Each stage opens its own client, since a connection does not survive
    a fork.
    """

    def __init__(self, url: str, key: str):
        self.url = url
        self.key = key

    def _client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url)

    def open_receiver(self, reader: int = 0) -> bench_shapes._Endpoint:
        client = self._client()
        brpop = client.brpop
        key = self.key

        def get() -> bytes:
            return brpop(key)[1]

        return bench_shapes._Endpoint(get=get, close=client.close)

    def open_sender(self) -> bench_shapes._Endpoint:
        client = self._client()
        lpush = client.lpush
        key = self.key
        return bench_shapes._Endpoint(put=lambda message: lpush(key, message),
                                      close=client.close)

    def close(self) -> None:
        """Do nothing: the server goes away after the case."""


def redis_missing_reason() -> str | None:
    """Return why the Redis peer cannot run here, or None if it can."""
    if importlib.util.find_spec("redis") is None:
        return ("redis (the client) is not installed; pip install "
                "'mqs[bench]' installs the peers")
    if importlib.util.find_spec("mqs._redis_server") is None:
        return ("mqs._redis_server, the helper that starts a throwaway "
                "redis-server, is not installed in this mqs")
    from mqs._redis_server import find_redis_server

    if find_redis_server() is None:
        return ("redis-server is not installed (apt-get install "
                "redis-server, or set MQS_REDIS_SERVER)")
    return None


@dataclasses.dataclass(frozen=True)
class LatencyPeer:
    """A queue under test: its label, domain and channel factory.

    `make_channel(directory, server_url)` returns a channel; `server_url`
    is the Redis URL for the Redis peer and None otherwise.
    """

    label: str
    domain: str
    make_channel: Callable[[str, str | None], Any]
    missing_reason: Callable[[], str | None] = lambda: None
    needs_redis: bool = False


def _from_transport(transport: bench_shapes.Transport) -> LatencyPeer:
    return LatencyPeer(
        transport.label, transport.domain,
        lambda directory, url: transport.make_channel(directory, "latency",
                                                      1, 1),
        lambda: bench_ipc.peer_missing_reason(transport.peer))


PEERS: tuple[LatencyPeer, ...] = (
    *(_from_transport(transport)
      for transport in bench_shapes.THREAD_TRANSPORTS
      if transport.label != "mqs.RingBuffer"),
    *(_from_transport(transport)
      for transport in bench_shapes.PROCESS_TRANSPORTS),
    LatencyPeer("Redis LPUSH/BRPOP", "processes",
                lambda directory, url: _RedisChannel(url, "mqs-bench"),
                redis_missing_reason, needs_redis=True),
)


# ----------------------------------------------------------------- running


@dataclasses.dataclass
class LatencyRunResult:
    """Corrected and uncorrected one-way latencies of one queue."""

    domain: str
    queue: str
    rate_per_s: float
    count: int
    late_sends: int
    recorder: LatencyRecorder
    p99_ratio_to_reference: float | None = None

    def __post_init__(self) -> None:
        self._summary = self.recorder.summary()

    @property
    def corrected(self) -> dict:
        return self._summary["corrected"]

    @property
    def uncorrected(self) -> dict:
        return self._summary["uncorrected"]

    def to_dict(self) -> dict:
        return {
            "case": f"latency-{self.domain}",
            "domain": self.domain,
            "queue": self.queue,
            "rate_per_s": self.rate_per_s,
            "messages": self.count,
            "payload_bytes": PAYLOAD_BYTES,
            "late_sends": self.late_sends,
            "corrected": self.corrected,
            "uncorrected": self.uncorrected,
            "p99_ratio_to_reference": self.p99_ratio_to_reference,
        }


def run_once(peer: LatencyPeer, count: int, rate_per_s: float,
             server_url: str | None = None) -> tuple[LatencyRecorder, int]:
    """Send `count` messages at `rate_per_s` through a new channel of `peer`.

    Returns the recorder and how many sends were more than one interval
    late.

    Raises
    ------
    BenchmarkError
        If messages were lost, reordered or changed, a stage failed, or
        the run stalled.
    """
    where = f"{peer.label} in latency-{peer.domain}"
    timeout_s = (bench_shapes.STALL_TIMEOUT_BASE_S + count / rate_per_s
                 + count * bench_shapes.STALL_TIMEOUT_PER_MESSAGE_S)
    with tempfile.TemporaryDirectory(prefix="mqs-bench-") as directory:
        channel = peer.make_channel(directory, server_url)
        roles = [("receiver", _receiver(channel, count)),
                 ("sender", _sender(channel, count, rate_per_s))]
        try:
            if peer.domain == "threads":
                outcomes = bench_shapes.run_thread_roles(where, roles,
                                                         timeout_s)
            else:
                outcomes = bench_ipc._run_roles(where, roles, timeout_s)
        finally:
            channel.close()
    received = outcomes["receiver"]
    bench_ipc.check_received(f"latency-{peer.domain}", peer.label, count,
                             received)
    recorder = LatencyRecorder()
    recorder.corrected_ns = received["corrected_ns"]
    recorder.uncorrected_ns = received["uncorrected_ns"]
    return recorder, outcomes["sender"]["late"]


def available_peers(domain: str
                    ) -> tuple[list[LatencyPeer], list[bench_ipc.Skipped]]:
    """Return the peers of `domain` that can run and the skipped ones."""
    ready = []
    skipped = []
    for peer in PEERS:
        if peer.domain != domain:
            continue
        reason = peer.missing_reason()
        if reason is None:
            ready.append(peer)
        else:
            skipped.append(bench_ipc.Skipped(f"latency-{domain}",
                                             peer.label, reason))
    return ready, skipped


def count_runs(domains: Sequence[str]) -> int:
    """Return how many runs, warm-ups included, `run_latency` will make."""
    return sum(2 * len(available_peers(domain)[0]) for domain in domains)


def run_latency(domains: Sequence[str], count: int,
                rate_per_s: float = DEFAULT_RATE_PER_S,
                on_run: Callable[[str, str], None] | None = None,
                ) -> tuple[list[LatencyRunResult], list[bench_ipc.Skipped]]:
    """Measure every available peer of `domains` at `rate_per_s`.

    Each peer gets a warm-up run of a tenth of `count` messages (at least
    10), then one measured run of `count`. `on_run(case, queue)` is
    called after each run.

    Raises
    ------
    ValueError
        For an unknown domain, a `count` below 1 or a rate not above 0.
    BenchmarkError
        As `run_once`, or if the throwaway redis-server fails to start.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count!r}")
    if not rate_per_s > 0:
        raise ValueError(f"rate_per_s must be > 0, got {rate_per_s!r}")
    results: list[LatencyRunResult] = []
    skipped: list[bench_ipc.Skipped] = []
    for domain in domains:
        if domain not in REFERENCES:
            raise ValueError(f"unknown domain {domain!r}; choose from "
                             f"{', '.join(REFERENCES)}")
        peers, missing = available_peers(domain)
        skipped.extend(missing)
        domain_results = [_run_peer(peer, count, rate_per_s, on_run)
                          for peer in peers]
        reference = next((r for r in domain_results
                          if r.queue == REFERENCES[domain]), None)
        for result in domain_results:
            if reference is not None:
                result.p99_ratio_to_reference = (
                    result.corrected["p99_ns"]
                    / reference.corrected["p99_ns"])
        results.extend(domain_results)
    return results, skipped


def _run_peer(peer: LatencyPeer, count: int, rate_per_s: float,
              on_run: Callable[[str, str], None] | None) -> LatencyRunResult:
    case = f"latency-{peer.domain}"
    server = None
    url = None
    if peer.needs_redis:
        from mqs._redis_server import RedisServer, RedisServerError

        server = RedisServer()
        try:
            server.start()
        except RedisServerError as exc:
            raise BenchmarkError(f"{peer.label}: {exc}") from exc
        url = server.url
    try:
        run_once(peer, max(10, count // 10), rate_per_s, url)
        if on_run is not None:
            on_run(case, peer.label)
        recorder, late = run_once(peer, count, rate_per_s, url)
        if on_run is not None:
            on_run(case, peer.label)
    finally:
        if server is not None:
            server.stop()
    logger.debug("%s %s: %d messages, %d sent late", case, peer.label,
                 count, late)
    return LatencyRunResult(peer.domain, peer.label, rate_per_s, count, late,
                            recorder)
