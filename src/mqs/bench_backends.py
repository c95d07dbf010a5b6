"""Broker throughput and latency per backend, against persist-queue's
SQLiteAckQueue and Redis Streams, in one run.

Each subject moves N small dicts (an ``n`` and a 64-character string)
through publish, get and ack, one message per call, in three shapes:

- ``1 thread``: one thread publishes, gets and acks each message in
  turn. The time of each message's three calls is its latency (one
  message in flight, so no queueing), reported as p50 and p99;
- ``4 producers, 1 consumer``: 4 producer threads and 1 consumer thread;
- ``4 producers, 4 consumers``: 4 producer threads and 4 consumer
  threads, each consumer in the same group.

Subjects (each one that cannot run here is skipped with the reason):

- ``memory``, ``shm``, ``log fsync=interval`` and ``log fsync=always``:
  `mqs.Broker` on that backend. Under "always" each publish returns once
  a sync covers it, and concurrent producers share syncs. "interval"
  syncs every 50 ms;
- ``redis backend``: `mqs.Broker(backend="redis",
  serializer="pickle")` on the same redis-server as the Redis Streams
  peer;
- ``SQLiteAckQueue``: persist-queue's queue with ``auto_commit=True``
  (every put, get and ack commits; SQLite syncs its WAL at each commit),
  the peer of "always";
- ``Redis Streams everysec``: XADD, then XREADGROUP COUNT 1 and XACK
  through redis-py, on a throwaway redis-server on 127.0.0.1 with
  ``appendonly yes`` and ``appendfsync everysec`` (data in a temporary
  directory), the peer of "interval" and of the other subjects.

Every round uses a fresh directory, shared memory name or stream and is
checked: every item arrives exactly once, or `mqs.bench.BenchmarkError`
is raised. Rounds go through the subjects in turn (a warm-up round,
then `repeat` timed ones) and each case keeps the median, min and max
rate. Ratios, each with its target or None for a comparison without one:
log always / SQLiteAckQueue >= 10x in the two shapes with 4 producers,
log interval / Redis Streams everysec >= 20x in every shape (these are
``tracked``), and memory, shm and the redis backend against Redis
Streams without a target.
"""

from __future__ import annotations

import os
import pickle
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import mqs
from mqs._redis_server import find_redis_server
from mqs.bench import BenchmarkError, machine_info

PRODUCERS = 4
CONSUMERS = 4
SHAPE_NAMES = ("1 thread", f"{PRODUCERS} producers, 1 consumer",
               f"{PRODUCERS} producers, {CONSUMERS} consumers")
SUBJECT_NAMES = ("memory", "shm", "log fsync=interval", "log fsync=always",
                 "redis backend", "SQLiteAckQueue", "Redis Streams everysec")
# (numerator, denominator, target, the shapes the target is set for).
# "always" has its target with 4 concurrent producers, whose publishes
# share syncs; in one thread each message waits for a sync of its own.
RATIOS = (
    ("log fsync=always", "SQLiteAckQueue", 10.0, SHAPE_NAMES[1:]),
    ("log fsync=interval", "Redis Streams everysec", 20.0, SHAPE_NAMES),
    ("memory", "Redis Streams everysec", None, ()),
    ("shm", "Redis Streams everysec", None, ()),
    ("redis backend", "Redis Streams everysec", None, ()),
)
# Seconds a consumer waits for one message before the round fails.
GET_TIMEOUT_S = 60.0


def make_items(count: int) -> list[dict]:
    """Return the `count` items of a round."""
    return [{"n": n, "payload": "x" * 64} for n in range(count)]


class _BrokerSubject:
    """`mqs.Broker` with one consumer per consuming thread (prefetch 1)."""

    def __init__(self, broker: Any, topic: str = "t") -> None:
        self.broker = broker
        self.topic = topic
        self.local = threading.local()
        self.lock = threading.Lock()
        self.consumers: list[Any] = []

    def _consumer(self) -> Any:
        consumer = getattr(self.local, "consumer", None)
        if consumer is None:
            consumer = self.broker.consume(self.topic, "g", prefetch=1,
                                           ack_timeout=600)
            self.local.consumer = consumer
            with self.lock:
                self.consumers.append(consumer)
        return consumer

    def prepare(self) -> None:
        self._consumer()

    def put(self, item: Any) -> None:
        self.broker.publish(self.topic, item)

    def get_ack(self) -> Any:
        message = self._consumer().get(timeout=GET_TIMEOUT_S)
        message.ack()
        return message.body

    def close(self) -> None:
        for consumer in self.consumers:
            consumer.close(drain=False)
        self.broker.close()


class _ShmSubject(_BrokerSubject):
    def __init__(self) -> None:
        self.name = f"mqs-bench-{uuid.uuid4().hex[:12]}"
        super().__init__(mqs.Broker(backend="shm", name=self.name))

    def close(self) -> None:
        try:
            super().close()
        finally:
            mqs.Broker.unlink(self.name)


class _RedisBackendSubject(_BrokerSubject):
    def __init__(self, url: str) -> None:
        # The items are dicts, so they are pickled as the other subjects
        # do. Only the bench's own throwaway server stores them.
        broker = mqs.Broker(backend="redis", url=url, serializer="pickle")
        super().__init__(broker, f"mqs-bench-{uuid.uuid4().hex[:8]}")

    def close(self) -> None:
        for consumer in self.consumers:
            consumer.close(drain=False)
        try:
            self.broker.delete_topic(self.topic)
        finally:
            self.broker.close()


class _SQLiteSubject:
    def __init__(self, path: str) -> None:
        import persistqueue

        self.queue = persistqueue.SQLiteAckQueue(
            path, multithreading=True, auto_commit=True)

    def prepare(self) -> None:
        pass

    def put(self, item: Any) -> None:
        self.queue.put(item)

    def get_ack(self) -> Any:
        item = self.queue.get(block=True, timeout=GET_TIMEOUT_S)
        self.queue.ack(item)
        return item

    def close(self) -> None:
        self.queue.close()


class _RedisStreamSubject:
    """XADD, XREADGROUP COUNT 1 and XACK of pickled items; each thread
    reads as its own consumer of one group."""

    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.stream = f"mqs-bench:{uuid.uuid4().hex[:8]}:backends"
        self.client.xgroup_create(self.stream, "g", id="$", mkstream=True)

    def prepare(self) -> None:
        pass

    def put(self, item: Any) -> None:
        self.client.xadd(self.stream,
                         {"b": pickle.dumps(item, pickle.HIGHEST_PROTOCOL)})

    def get_ack(self) -> Any:
        name = f"c{threading.get_ident()}"
        reply = self.client.xreadgroup("g", name, {self.stream: ">"},
                                       count=1,
                                       block=int(GET_TIMEOUT_S * 1000))
        if not reply:
            raise BenchmarkError(f"redis stream {self.stream} returned no "
                                 f"entry within {GET_TIMEOUT_S:g} s")
        entry_id, fields = reply[0][1][0]
        self.client.xack(self.stream, "g", entry_id)
        return pickle.loads(fields[b"b"])

    def close(self) -> None:
        self.client.delete(self.stream)
        self.client.close()


def skip_reason(name: str) -> str | None:
    """Why subject `name` cannot run here, or None."""
    if name not in SUBJECT_NAMES:
        raise ValueError(f"unknown subject {name!r}; expected one of "
                         f"{', '.join(SUBJECT_NAMES)}")
    if name == "shm" and not os.path.isdir("/dev/shm"):
        return "/dev/shm is missing"
    if name == "SQLiteAckQueue":
        try:
            import persistqueue  # noqa: F401
        except ImportError:
            return "persist-queue is not installed (pip install 'mqs[bench]')"
    if name in ("redis backend", "Redis Streams everysec"):
        try:
            import redis  # noqa: F401
        except ImportError:
            return "redis is not installed (pip install 'mqs[bench]')"
        if find_redis_server() is None:
            return ("redis-server is not installed (Debian: apt-get "
                    "install redis-server)")
    return None


def make_subject(name: str, directory: str, redis_url: str | None) -> Any:
    """Return a fresh subject `name` that keeps its files in `directory`."""
    if name == "memory":
        return _BrokerSubject(mqs.Broker(backend="memory"))
    if name == "shm":
        return _ShmSubject()
    if name.startswith("log fsync="):
        fsync = name.split("=", 1)[1]
        return _BrokerSubject(mqs.Broker(
            backend="log", path=os.path.join(directory, "q"), fsync=fsync))
    if name == "SQLiteAckQueue":
        return _SQLiteSubject(os.path.join(directory, "q"))
    if redis_url is None:
        raise ValueError(f"subject {name!r} needs a redis-server URL")
    if name == "redis backend":
        return _RedisBackendSubject(redis_url)
    return _RedisStreamSubject(redis_url)


def _sequential(subject: Any, items: list[dict]
                ) -> tuple[list[Any], list[int]]:
    received = []
    latencies = []
    clock = time.perf_counter_ns
    subject.prepare()
    for item in items:
        started = clock()
        subject.put(item)
        received.append(subject.get_ack())
        latencies.append(clock() - started)
    return received, latencies


def _threaded(subject: Any, items: list[dict], consumers: int
              ) -> tuple[list[Any], list[int]]:
    received: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def produce(part: int) -> None:
        try:
            for item in items[part::PRODUCERS]:
                subject.put(item)
        except BaseException as exc:  # reported after the join
            errors.append(exc)

    def consume(part: int) -> None:
        try:
            subject.prepare()
            mine = [subject.get_ack() for _ in items[part::consumers]]
            with lock:
                received.extend(mine)
        except BaseException as exc:  # reported after the join
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(part,))
               for part in range(consumers)]
    threads += [threading.Thread(target=produce, args=(part,))
                for part in range(PRODUCERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return received, []


SHAPES: dict[str, Callable[[Any, list[dict]],
                           tuple[list[Any], list[int]]]] = {
    SHAPE_NAMES[0]: _sequential,
    SHAPE_NAMES[1]: lambda subject, items: _threaded(subject, items, 1),
    SHAPE_NAMES[2]: lambda subject, items: _threaded(subject, items,
                                                     CONSUMERS),
}


def run_round(name: str, shape: str, items: list[dict],
              redis_url: str | None = None) -> tuple[float, list[int]]:
    """Move `items` through a fresh subject `name` in `shape`; return the
    seconds it took and, for ``1 thread``, each message's latency in ns.

    Raises `BenchmarkError` when an item was lost or duplicated."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of "
                         f"{', '.join(SHAPES)}")
    with tempfile.TemporaryDirectory(prefix="mqs-bench-backends-") as path:
        subject = make_subject(name, path, redis_url)
        try:
            started = time.perf_counter()
            received, latencies = SHAPES[shape](subject, items)
            elapsed = time.perf_counter() - started
        finally:
            subject.close()
    if sorted(item["n"] for item in received) != [item["n"]
                                                    for item in items]:
        raise BenchmarkError(f"{name}, {shape}: items lost or duplicated")
    return elapsed, latencies


def _percentile(ordered: list[int], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def run_backends_bench(count: int = 2000, repeat: int = 3,
                       subjects: Sequence[str] | None = None,
                       progress: Callable[[str], None] | None = None,
                       url: str | None = None) -> dict:
    """Run every subject in every shape and return the results.

    Parameters
    ----------
    count : int
        Messages per round (at least 8, so that every thread has some).
    repeat : int
        Timed rounds per case, after one warm-up round.
    subjects : sequence of str or None
        Subject names to run (default: all of `SUBJECT_NAMES`).
    progress : callable or None
        Called with a round number, subject and shape before each round.
    url : str or None
        Redis server of the redis subjects; None starts a throwaway one
        on 127.0.0.1 with ``appendfsync everysec``. Only keys under
        ``mqs-bench`` are written, and deleted afterwards.

    Returns
    -------
    dict
        ``machine``, ``count``, ``repeat``, ``cases`` and ``ratios``.
        Each case has the subject, the shape and the median, min and
        max messages per second, and for ``1 thread`` the p50 and p99
        latency in µs of one publish, get and ack (or ``skipped`` with
        the reason). Each ratio has its name, numerator, denominator,
        shape, value, target or None, met or None, and ``tracked``.

    Raises
    ------
    mqs.bench.BenchmarkError
        If a round lost or duplicated a message.
    """
    if not isinstance(count, int) or count < PRODUCERS * CONSUMERS // 2:
        raise ValueError(f"count must be an int of at least "
                         f"{PRODUCERS * CONSUMERS // 2}, got {count!r}")
    if not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be an int of at least 1, got "
                         f"{repeat!r}")
    names = list(subjects) if subjects is not None else list(SUBJECT_NAMES)
    skipped = {name: skip_reason(name) for name in names}
    items = make_items(count)
    times: dict[tuple[str, str], list[float]] = {}
    latencies: dict[str, list[int]] = {}
    server = None
    needs_redis = any(name in ("redis backend", "Redis Streams everysec")
                      and skipped[name] is None for name in names)
    if url is None and needs_redis:
        from mqs._redis_server import RedisServer

        server = RedisServer(appendfsync="everysec").start()
        url = server.url
    try:
        for index in range(repeat + 1):
            for shape in SHAPE_NAMES:
                for name in names:
                    if skipped[name]:
                        continue
                    if progress:
                        progress(f"round {index}/{repeat} {name}, {shape}")
                    elapsed, found = run_round(name, shape, items, url)
                    if index > 0:
                        times.setdefault((name, shape), []).append(elapsed)
                        if found:
                            latencies.setdefault(name, []).extend(found)
    finally:
        if server is not None:
            server.stop()
    cases = []
    rates = {}
    for name in names:
        for shape in SHAPE_NAMES:
            if skipped[name]:
                cases.append({"subject": name, "shape": shape,
                              "skipped": skipped[name]})
                continue
            per_round = sorted(count / seconds
                               for seconds in times[name, shape])
            rates[name, shape] = statistics.median(per_round)
            case = {"subject": name, "shape": shape, "messages": count,
                    "rounds": repeat, "rate_per_s": rates[name, shape],
                    "rate_min_per_s": per_round[0],
                    "rate_max_per_s": per_round[-1]}
            if shape == SHAPE_NAMES[0]:
                ordered = sorted(latencies[name])
                case["latency_p50_us"] = _percentile(ordered, 0.5) / 1e3
                case["latency_p99_us"] = _percentile(ordered, 0.99) / 1e3
            cases.append(case)
    return {"machine": machine_info(), "count": count, "repeat": repeat,
            "cases": cases, "ratios": _ratios(rates, names)}


def _ratios(rates: dict[tuple[str, str], float], names: Sequence[str]
            ) -> list[dict]:
    """Return the ratios whose two subjects were both requested."""
    ratios = []
    for top, bottom, goal, goal_shapes in RATIOS:
        if top not in names or bottom not in names:
            continue
        for shape in SHAPE_NAMES:
            numerator = rates.get((top, shape))
            denominator = rates.get((bottom, shape))
            value = (None if numerator is None or denominator is None
                     else numerator / denominator)
            target = goal if shape in goal_shapes else None
            met = None if value is None or target is None \
                else value >= target
            ratios.append({
                "name": f"{top} / {bottom}, {shape}", "numerator": top,
                "denominator": bottom, "shape": shape, "value": value,
                "target": target, "met": met,
                "tracked": target is not None})
    return ratios


def format_backends_bench(result: dict) -> str:
    """Render a `run_backends_bench` result as plain text."""
    lines = [f"{'subject':24} {'shape':26} {'median/s':>10} {'min/s':>10} "
             f"{'max/s':>10} {'p50 us':>8} {'p99 us':>8}"]
    for case in result["cases"]:
        head = f"{case['subject']:24} {case['shape']:26}"
        if "skipped" in case:
            lines.append(f"{head} skipped: {case['skipped']}")
            continue
        latency = ""
        if "latency_p50_us" in case:
            latency = (f" {case['latency_p50_us']:8.1f} "
                       f"{case['latency_p99_us']:8.1f}")
        lines.append(f"{head} {case['rate_per_s']:10,.0f} "
                     f"{case['rate_min_per_s']:10,.0f} "
                     f"{case['rate_max_per_s']:10,.0f}{latency}")
    lines.append("")
    for ratio in result["ratios"]:
        value = ratio["value"]
        shown = "n/a" if value is None else f"{value:.2f}x"
        if ratio["target"] is None:
            verdict = "no target"
        else:
            verdict = {True: "met", False: "MISSED",
                       None: "not measured"}[ratio["met"]]
            verdict = f"target >= {ratio['target']:g}x, {verdict}"
        tracked = " (tracked)" if ratio["tracked"] else ""
        lines.append(f"{ratio['name']:70} {shown:>9}  {verdict}{tracked}")
    return "\n".join(lines)
