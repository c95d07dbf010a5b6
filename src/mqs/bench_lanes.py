"""Weighted lanes under saturation and rate limits, measured in real time.

Two measurements of the broker's delivery rules (`mqs.broker._policy`),
each over a wall-clock window (10 s by default):

- `run_lane_shares`: one topic with weighted lanes, kept saturated (a
  producer tops every lane up before each fetch, so no lane is ever
  empty when the scheduler picks). A consumer fetches batches and acks
  them. Each lane's share of the deliveries in the window is compared
  with ``weight / sum(weights)``. The error is relative to that share,
  so 0.05 means within 5% of it. The worst one-second window is reported
  as well.
- `run_rate_limit`: one topic with a `Rate` and far more messages than
  the window can deliver, consumed by 1 or more processes (3 share one
  bucket on the shm and log backends). Deliveries are stamped with
  `time.monotonic` (one clock for every process of the machine) as they
  return. The first `warmup_s` seconds are left out, so the initial
  burst of the bucket does not count, and the rate is the deliveries in
  the following window divided by its length.

Both raise `mqs.bench.BenchmarkError` when a message is lost, delivered
twice or lands in the wrong lane.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import queue
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import mqs
from mqs.bench import BenchmarkError, machine_info

__all__ = ["run_lane_shares", "run_rate_limit", "LANE_WEIGHTS"]

LANE_WEIGHTS = {9: 8, 5: 4, 0: 1}
# Messages per publish_many call of the lane producer, and the backlog
# below which a lane is topped up: larger than any fetch, so every lane
# has messages whenever the scheduler picks.
TOP_UP = 512
FETCH = 64
LANE_TOLERANCE = 0.05
RATE_TOLERANCE = 0.02

_FORK = multiprocessing.get_context("fork")


@contextmanager
def _open_broker(backend: str, where: str, **options: Any
                 ) -> Iterator[mqs.Broker]:
    """Open a fresh broker of `backend`; `where` names its log directory
    or shm broker."""
    if backend == "memory":
        broker = mqs.Broker()
    elif backend == "shm":
        broker = mqs.Broker(backend="shm", name=where)
    elif backend == "log":
        broker = mqs.Broker(backend="log", path=where, **options)
    else:
        raise ValueError(f"backend must be 'memory', 'shm' or 'log', got "
                         f"{backend!r}")
    try:
        yield broker
    finally:
        broker.close()


@contextmanager
def _broker_place(backend: str) -> Iterator[str]:
    """Yield a log directory or shm broker name and remove it after."""
    if backend == "shm":
        name = f"mqs-bench-lanes-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            yield name
        finally:
            mqs.Broker.unlink(name)
        return
    with tempfile.TemporaryDirectory(prefix="mqs-bench-lanes-") as path:
        yield os.path.join(path, "broker")


def run_lane_shares(duration_s: float = 10.0,
                    weights: Mapping[int, int] | None = None,
                    backend: str = "memory") -> dict:
    """Measure each weighted lane's share of deliveries under saturation.

    Parameters
    ----------
    duration_s : float
        Length of the measured window in seconds.
    weights : mapping of int to int, optional
        Lane priority to weight (default `LANE_WEIGHTS`).
    backend : {"memory", "shm", "log"}
        Backend of the broker (``log`` with ``fsync="never"``, so that
        disk syncs do not set the pace).

    Returns
    -------
    dict
        ``lanes``: per lane its weight, expected share, measured share,
        relative error and worst one-second window share; ``delivered``,
        ``duration_s``, ``max_error`` and ``met`` (every lane within
        `LANE_TOLERANCE`).
    """
    weights = dict(weights or LANE_WEIGHTS)
    total_weight = sum(weights.values())
    with _broker_place(backend) as where, _open_broker(
            backend, where, fsync="never") as broker:
        broker.declare_topic("lanes", weights=weights)
        consumer = broker.consume("lanes", "g", prefetch=FETCH,
                                  ack_timeout=600)
        published = dict.fromkeys(weights, 0)
        delivered = dict.fromkeys(weights, 0)
        # Deliveries per lane in each second of the window.
        windows: list[collections.Counter] = []
        started = time.monotonic()
        end = started + duration_s
        while True:
            now = time.monotonic()
            if now >= end:
                break
            for lane in weights:
                if published[lane] - delivered[lane] < TOP_UP:
                    broker.publish_many("lanes", [lane] * TOP_UP,
                                        priority=lane)
                    published[lane] += TOP_UP
            messages = consumer.get_many(FETCH, timeout=5)
            second = int(now - started)
            while len(windows) <= second:
                windows.append(collections.Counter())
            for message in messages:
                if message.priority != message.body:
                    raise BenchmarkError(
                        f"message {message.id} of priority "
                        f"{message.priority} carries lane {message.body}")
                delivered[message.body] += 1
                windows[second][message.body] += 1
            consumer.ack_many(messages)
        elapsed = time.monotonic() - started
        consumer.close(drain=False)
    count = sum(delivered.values())
    if count == 0:
        raise BenchmarkError("the lane benchmark delivered nothing")
    lanes = []
    for lane, weight in sorted(weights.items(), reverse=True):
        expected = weight / total_weight
        share = delivered[lane] / count
        window_shares = [window[lane] / sum(window.values())
                         for window in windows if sum(window.values())]
        worst = max(window_shares, key=lambda value: abs(value - expected))
        lanes.append({
            "lane": lane, "weight": weight, "expected_share": expected,
            "share": share, "delivered": delivered[lane],
            "error": abs(share - expected) / expected,
            "worst_second_share": worst})
    max_error = max(lane["error"] for lane in lanes)
    return {"backend": backend, "duration_s": elapsed, "delivered": count,
            "lanes": lanes, "max_error": max_error,
            "tolerance": LANE_TOLERANCE, "met": max_error <= LANE_TOLERANCE,
            "machine": machine_info()}


START_SLACK_S = 2.0


def _consume_rate(broker: mqs.Broker, stop_at: float) -> tuple[list, list]:
    """Consume topic ``rate`` until `stop_at` (monotonic); return the
    (time, count) of each delivery batch and the delivered ids."""
    stamps = []
    ids = []
    consumer = broker.consume("rate", "g", prefetch=FETCH, auto_ack=True)
    while True:
        now = time.monotonic()
        if now >= stop_at:
            break
        try:
            messages = consumer.get_many(FETCH,
                                         timeout=min(0.05, stop_at - now))
        except mqs.Empty:
            continue
        if messages:
            stamps.append((time.monotonic(), len(messages)))
            ids.extend(message.id for message in messages)
    consumer.close(drain=False)
    return stamps, ids


def _rate_worker(backend: str, where: str, stop_at: float, results: Any
                 ) -> None:
    with _open_broker(backend, where, fsync="never") as broker:
        results.put(_consume_rate(broker, stop_at))


def run_rate_limit(duration_s: float = 10.0, per_second: float = 2_000.0,
                   processes: int = 1, backend: str = "memory",
                   warmup_s: float = 1.0, burst: int | None = None) -> dict:
    """Measure the delivery rate of a rate-limited topic against its
    target.

    Parameters
    ----------
    duration_s : float
        Length of the measured window in seconds.
    per_second : float
        The topic's `Rate`.
    burst : int or None
        The rate's burst; None is its default, one second's worth.
    processes : int
        Consumer processes; more than 1 needs the shm or log backend,
        whose processes share one bucket.
    backend : {"memory", "shm", "log"}
        Backend of the broker (``log`` with ``fsync="never"``).
    warmup_s : float
        Seconds left out after the first delivery, so the initial burst
        drains (the consumers run START_SLACK_S longer for late starts).

    Returns
    -------
    dict
        ``rate_per_s`` (measured), ``target_per_s``, ``error``
        (relative), ``delivered`` (in the window), ``met`` (error within
        `RATE_TOLERANCE`) and the settings.
    """
    if processes > 1 and backend == "memory":
        raise ValueError("processes > 1 needs backend 'shm' or 'log'; a "
                         "memory broker lives in one process")
    total = int(per_second * (warmup_s + duration_s + START_SLACK_S + 2)) \
        + 1000
    with _broker_place(backend) as where:
        with _open_broker(backend, where, fsync="never") as broker:
            broker.declare_topic("rate",
                                 rate=mqs.Rate(per_second, burst=burst))
            # Create the group before publishing, so it gets every message.
            broker.consume("rate", "g").close(drain=False)
            for start in range(0, total, 10_000):
                broker.publish_many("rate", range(start, min(
                    total, start + 10_000)))
            # The consumers run for START_SLACK_S more than the window
            # needs: on a loaded machine they may start late.
            length_s = warmup_s + duration_s + START_SLACK_S
            if processes == 1 and backend == "memory":
                began = time.monotonic()
                runs = [_consume_rate(broker, began + length_s)]
            else:
                runs, began = _run_rate_processes(
                    backend, where, processes, length_s)
    stamps = [stamp for run in runs for stamp in run[0]]
    ids = [message_id for run in runs for message_id in run[1]]
    if len(ids) != len(set(ids)):
        raise BenchmarkError("a rate-limited message was delivered twice")
    if not stamps:
        raise BenchmarkError("no rate-limited message was delivered")
    # The bucket starts full, and its burst drains at the first fetch,
    # whenever the consumers get going: the warm-up counts from then.
    window_start = min(at for at, _ in stamps) + warmup_s
    window_end = window_start + duration_s
    if window_end > began + length_s:
        raise BenchmarkError(
            f"the consumers started {window_start - warmup_s - began:.1f} s "
            f"late, after the run's slack of {START_SLACK_S} s")
    counted = sum(count for at, count in stamps
                  if window_start <= at < window_end)
    rate = counted / duration_s
    error = abs(rate - per_second) / per_second
    return {"backend": backend, "processes": processes,
            "duration_s": duration_s, "warmup_s": warmup_s,
            "target_per_s": per_second, "rate_per_s": rate,
            "delivered": counted, "error": error,
            "tolerance": RATE_TOLERANCE, "met": error <= RATE_TOLERANCE,
            "machine": machine_info()}


def _run_rate_processes(backend: str, where: str, processes: int,
                        length_s: float) -> tuple[list, float]:
    """Fork `processes` consumers for `length_s` seconds; return their
    results and the monotonic start time."""
    results = _FORK.Queue()
    # A short lead, so that every worker has opened the broker before
    # the window starts.
    began = time.monotonic() + 1.0
    workers = [_FORK.Process(target=_rate_worker,
                             args=(backend, where, began + length_s,
                                   results))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    runs = []
    deadline = time.monotonic() + length_s + 120
    try:
        while len(runs) < processes:
            try:
                runs.append(results.get(timeout=0.5))
            except queue.Empty:
                codes = [worker.exitcode for worker in workers]
                if any(code not in (None, 0) for code in codes) \
                        or time.monotonic() > deadline:
                    raise BenchmarkError(
                        f"a rate benchmark worker failed or stalled: exit "
                        f"codes {codes}") from None
    finally:
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
                worker.join()
    return runs, began


def format_lanes(result: dict) -> str:
    """Render a `run_lane_shares` result as plain text."""
    lines = [f"weighted lanes, {result['backend']} backend, "
             f"{result['duration_s']:.1f} s, {result['delivered']:,} "
             f"deliveries",
             f"{'lane':>4} {'weight':>6} {'expected':>9} {'measured':>9} "
             f"{'error':>7} {'worst 1 s':>9}"]
    for lane in result["lanes"]:
        lines.append(
            f"{lane['lane']:>4} {lane['weight']:>6} "
            f"{lane['expected_share']:>9.4f} {lane['share']:>9.4f} "
            f"{lane['error']:>7.2%} {lane['worst_second_share']:>9.4f}")
    verdict = "met" if result["met"] else "MISSED"
    lines.append(f"max error {result['max_error']:.2%}, target <= "
                 f"{result['tolerance']:.0%}: {verdict}")
    return "\n".join(lines)


def format_rate(result: dict) -> str:
    """Render a `run_rate_limit` result as plain text."""
    verdict = "met" if result["met"] else "MISSED"
    return (f"rate limit, {result['backend']} backend, "
            f"{result['processes']} consumer process(es), "
            f"{result['duration_s']:g} s after {result['warmup_s']:g} s "
            f"warm-up: {result['rate_per_s']:,.1f}/s against "
            f"{result['target_per_s']:,.1f}/s, error {result['error']:.2%}, "
            f"target <= {result['tolerance']:.0%}: {verdict}")
