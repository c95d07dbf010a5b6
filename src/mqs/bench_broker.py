"""Broker throughput: the shm backend against Redis Streams.

Every case moves messages of 100 bytes through publish, consume and ack
on one topic with one consumer group. In the ``<N>p`` shapes, 1 or 4
processes all run the same loop on the same topic (or stream) and group;
in the ``1p1c`` shape one producer process and one consumer process run
at the same time:

- ``shm.per_message.<N>p``: `Broker.publish` of one message, then
  `Consumer.get` and `Message.ack`, `count` times per process.
- ``shm.batched.<N>p``: `publish_many` of `batch` messages, then
  `get_many` of up to `batch` and one `Consumer.ack_many`.
- ``redis.per_message.<N>p``: XADD, XREADGROUP COUNT 1 and XACK per
  message through redis-py (hiredis when installed).
- ``redis.batched.<N>p``: XADD of `batch` messages in one pipeline,
  XREADGROUP COUNT `batch`, and one XACK naming the whole batch.
- ``shm.per_message.1p1c``: the producer calls `Broker.publish` of one
  message `count` times; the consumer calls `Consumer.get` and
  `Message.ack` `count` times.
- ``redis.per_message.1p1c``: the producer runs XADD per message; the
  consumer runs XREADGROUP COUNT 1 (blocking) and XACK per message.

- ``core.per_message.1p1c``: the same shape on `mqs._topiccore.TopicCore`
  directly (publish; fetch of one and ack), without the `Broker` API and
  without pickling: the ceiling of the shared topic core on this
  machine, which the shm backend uses for plain topics.

The ratio of the two ``1p1c`` cases is the tracked one for the target of
30x Redis Streams (``tracked`` in the result). The other per-message
shapes are held to the same 30x. The batched ratios have no target:
they compare `publish_many` and `get_many` with pipelined redis-py
calls, and are kept for comparison.

Both batched loops thus make three calls per batch. Redis runs as a
throwaway redis-server on 127.0.0.1 without persistence (the shm
broker keeps nothing across a reboot either).

Each process is forked, opens its own broker or client, and waits on a
start event. Each process reads the monotonic clock after the event
and after its loop. The clock runs from the first of those starts to
the last of those ends, so process start, close and exit are not
timed. The workers run with the garbage collector off. Every process
checks the bodies it received and the total it consumed, so a run that
lost or damaged a message raises `mqs.bench.BenchmarkError`. Rounds go
round-robin over the cases (a warm-up round, then `repeat` timed ones)
and each result keeps the median, min and max rate of messages per
second (each message published, consumed and acked once).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import mqs
from mqs._redis_server import find_redis_server
from mqs.bench import BenchmarkError, machine_info

BODY_BYTES = 100
BATCH = 100
# Shape labels: N processes running the whole loop, or one producer and
# one consumer.
SHAPES = ("1p", "4p")
SPLIT_SHAPE = "1p1c"
WORKER_TIMEOUT_S = 120.0
# Messages per process and round at scale 1.
BASE_COUNTS = {"per_message": 2_000, "batched": 10_000}
TARGET = 30.0
TRACKED_RATIO = "per_message.1p1c_vs_redis_streams"
# The core case moves this many times the per-message count, because a
# round of 2,000 messages through it takes only a few milliseconds.
CORE_COUNT_FACTOR = 50
# Lanes of the core cases: the default topic weights.
CORE_LANES = ((9, 8), (5, 4), (0, 1))

_FORK = multiprocessing.get_context("fork")


def _body() -> bytes:
    return bytes((i * 7 + 1) & 0xFF for i in range(BODY_BYTES))


# ---- workers (run in forked processes) -----------------------------------

def _shm_worker(name: str, mode: str, count: int, start: Any,
                results: Any) -> None:
    body = _body()
    broker = mqs.Broker(backend="shm", name=name)
    consumer = broker.consume("t", "g", prefetch=BATCH, ack_timeout=600)
    gc.disable()
    start.wait()
    began = time.perf_counter_ns()
    done = 0
    if mode == "per_message":
        for _ in range(count):
            broker.publish("t", body)
            message = consumer.get(timeout=WORKER_TIMEOUT_S)
            if message.body != body:
                raise BenchmarkError(f"message {message.id} has the wrong "
                                     f"body")
            message.ack()
            done += 1
    else:
        published = 0
        while done < count:
            if published < count:
                size = min(BATCH, count - published)
                broker.publish_many("t", [body] * size)
                published += size
            # Never more than this process still needs, so that no
            # process takes the messages another one waits for.
            messages = consumer.get_many(min(BATCH, count - done),
                                         timeout=WORKER_TIMEOUT_S)
            for message in messages:
                if message.body != body:
                    raise BenchmarkError(f"message {message.id} has the "
                                         f"wrong body")
            done += consumer.ack_many(messages)
    results.put((done, began, time.perf_counter_ns()))
    consumer.close()
    broker.close()


def _shm_producer(name: str, count: int, start: Any, results: Any) -> None:
    body = _body()
    broker = mqs.Broker(backend="shm", name=name)
    gc.disable()
    start.wait()
    began = time.perf_counter_ns()
    for _ in range(count):
        broker.publish("t", body)
    results.put((0, began, time.perf_counter_ns()))
    broker.close()


def _shm_consumer(name: str, count: int, start: Any, results: Any) -> None:
    body = _body()
    broker = mqs.Broker(backend="shm", name=name)
    consumer = broker.consume("t", "g", prefetch=BATCH, ack_timeout=600)
    gc.disable()
    start.wait()
    began = time.perf_counter_ns()
    done = 0
    for _ in range(count):
        message = consumer.get(timeout=WORKER_TIMEOUT_S)
        if message.body != body:
            raise BenchmarkError(f"message {message.id} has the wrong body")
        message.ack()
        done += 1
    results.put((done, began, time.perf_counter_ns()))
    consumer.close()
    broker.close()


def _core_producer(path: str, count: int, start: Any, results: Any) -> None:
    from mqs._topiccore import TopicCore

    body = _body()
    core = TopicCore(path, CORE_LANES)
    gc.disable()
    start.wait()
    began = time.perf_counter_ns()
    published = 0
    while published < count:
        if core.publish(body, 0, 0.0) > 0:
            published += 1
        else:
            # Every slot is taken: let the consumer catch up.
            time.sleep(0.0001)
    results.put((0, began, time.perf_counter_ns()))
    core.close()


def _core_consumer(path: str, count: int, start: Any, results: Any) -> None:
    from mqs._topiccore import TopicCore

    body = _body()
    core = TopicCore(path, CORE_LANES)
    group = core.find_group("g")
    consumer = core.open_consumer(group, BATCH, os.getpid())
    gc.disable()
    start.wait()
    began = time.perf_counter_ns()
    done = 0
    while done < count:
        epoch = core.wait_prepare()
        found = core.fetch(consumer, 1, 600.0)
        if not found:
            core.wait(epoch, WORKER_TIMEOUT_S)
            continue
        core.cancel_wait()
        seq, slot, ticket, _, _, _, received = found[0]
        if received != body:
            raise BenchmarkError(f"core message {seq} has the wrong body")
        core.ack(group, slot, ticket)
        done += 1
    results.put((done, began, time.perf_counter_ns()))
    core.close_consumer(consumer)
    core.close()


def _redis_producer(url: str, stream: str, count: int, start: Any,
                    results: Any) -> None:
    import redis

    body = _body()
    client = redis.Redis.from_url(url)
    gc.disable()
    start.wait()
    began = time.perf_counter_ns()
    for _ in range(count):
        client.xadd(stream, {"b": body})
    results.put((0, began, time.perf_counter_ns()))
    client.close()


def _redis_consumer(url: str, stream: str, count: int, start: Any,
                    results: Any) -> None:
    import redis

    body = _body()
    client = redis.Redis.from_url(url)
    consumer_name = f"c{os.getpid()}"
    streams = {stream: ">"}
    timeout_ms = int(WORKER_TIMEOUT_S * 1000)
    gc.disable()
    start.wait()
    began = time.perf_counter_ns()
    done = 0
    while done < count:
        reply = client.xreadgroup("g", consumer_name, streams, count=1,
                                  block=timeout_ms)
        if not reply:
            raise BenchmarkError(f"redis stream {stream} gave nothing for "
                                 f"{WORKER_TIMEOUT_S} s")
        entry_id, fields = reply[0][1][0]
        if fields[b"b"] != body:
            raise BenchmarkError(f"entry {entry_id!r} has the wrong body")
        client.xack(stream, "g", entry_id)
        done += 1
    results.put((done, began, time.perf_counter_ns()))
    client.close()


def _redis_worker(url: str, stream: str, mode: str, count: int, start: Any,
                  results: Any) -> None:
    import redis

    body = _body()
    client = redis.Redis.from_url(url)
    consumer_name = f"c{os.getpid()}"
    streams = {stream: ">"}
    timeout_ms = int(WORKER_TIMEOUT_S * 1000)
    gc.disable()
    start.wait()
    began = time.perf_counter_ns()
    done = 0
    published = 0
    while done < count:
        size = 1 if mode == "per_message" else BATCH
        if published < count:
            adding = min(size, count - published)
            if adding == 1:
                client.xadd(stream, {"b": body})
            else:
                pipe = client.pipeline(transaction=False)
                for _ in range(adding):
                    pipe.xadd(stream, {"b": body})
                pipe.execute()
            published += adding
        reply = client.xreadgroup("g", consumer_name, streams,
                                  count=min(size, count - done) or 1,
                                  block=timeout_ms)
        if not reply:
            raise BenchmarkError(f"redis stream {stream} gave nothing for "
                                 f"{WORKER_TIMEOUT_S} s")
        entries = reply[0][1]
        for entry_id, fields in entries:
            if fields[b"b"] != body:
                raise BenchmarkError(f"entry {entry_id!r} has the wrong body")
        client.xack(stream, "g", *[entry[0] for entry in entries])
        done += len(entries)
    results.put((done, began, time.perf_counter_ns()))
    client.close()


# ---- rounds --------------------------------------------------------------

def _run_workers(targets: Sequence[Callable[..., None]], args: tuple,
                 count: int, expected: int) -> int:
    """Fork one worker per target, start them together, check that they
    consumed `expected` messages in all, and return the time in ns from
    the first worker's start to the last worker's last operation.

    Each worker reports ``(consumed, began, ended)`` read from
    `time.perf_counter_ns`, which is CLOCK_MONOTONIC on Linux and so
    comparable across processes. Process start, `close` and exit stay
    out of the time: they cost a few milliseconds a round, which would
    weigh on the fast cases of a round of 2,000 messages and not on
    Redis."""
    start = _FORK.Event()
    results = _FORK.Queue()
    workers = [_FORK.Process(target=target,
                             args=(*args, count, start, results))
               for target in targets]
    processes = len(workers)
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(WORKER_TIMEOUT_S * 2)
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join()
    codes = [worker.exitcode for worker in workers]
    if codes != [0] * processes:
        raise BenchmarkError(f"a broker benchmark worker failed: exit codes "
                             f"{codes}")
    reports = [results.get(timeout=10) for _ in workers]
    done = sum(report[0] for report in reports)
    if done != expected:
        raise BenchmarkError(f"workers consumed {done} messages, expected "
                             f"{expected}")
    return (max(report[2] for report in reports)
            - min(report[1] for report in reports))


def _shape_workers(shape: str, whole: Callable[..., None],
                   producer: Callable[..., None],
                   consumer: Callable[..., None]) -> list[Callable[..., None]]:
    if shape == SPLIT_SHAPE:
        return [producer, consumer]
    return [whole] * int(shape[:-1])


def _shape_messages(shape: str, count: int) -> int:
    """Return the messages one round of `shape` moves in all."""
    return count if shape == SPLIT_SHAPE else int(shape[:-1]) * count


def _shm_round(mode: str, shape: str, count: int) -> tuple[int, int]:
    name = f"mqs-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    broker = mqs.Broker(backend="shm", name=name)
    total = _shape_messages(shape, count)
    try:
        broker.declare_topic("t")
        broker.consume("t", "g").close()
        if shape == SPLIT_SHAPE:
            args: tuple = (name,)
        else:
            args = (name, mode)
        elapsed = _run_workers(
            _shape_workers(shape, _shm_worker, _shm_producer, _shm_consumer),
            args, count, total)
        stats = broker.stats("t")
        if stats["acked"] != total or stats["stored"]:
            raise BenchmarkError(
                f"shm broker acked {stats['acked']} messages and stores "
                f"{stats['stored']}, expected {total} and 0")
    finally:
        broker.close()
        mqs.Broker.unlink(name)
    return total, elapsed


def _core_round(count: int) -> tuple[int, int]:
    from mqs._topiccore import TopicCore

    path = f"/dev/shm/mqs-bench-core-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    core = TopicCore(path, CORE_LANES)
    try:
        core.open_group("g", False)
        elapsed = _run_workers([_core_producer, _core_consumer], (path,),
                               count, count)
        counters = core.counters()
        if counters["acked"] != count or core.stats()["stored"]:
            raise BenchmarkError(
                f"topic core acked {counters['acked']} messages and stores "
                f"{core.stats()['stored']}, expected {count} and 0")
    finally:
        core.close()
        os.unlink(path)
    return count, elapsed


def _redis_round(url: str, mode: str, shape: str,
                 count: int) -> tuple[int, int]:
    import redis

    stream = f"mqs-bench:{uuid.uuid4().hex[:8]}:stream"
    client = redis.Redis.from_url(url)
    total = _shape_messages(shape, count)
    try:
        client.xgroup_create(stream, "g", id="$", mkstream=True)
        if shape == SPLIT_SHAPE:
            args: tuple = (url, stream)
        else:
            args = (url, stream, mode)
        elapsed = _run_workers(
            _shape_workers(shape, _redis_worker, _redis_producer,
                           _redis_consumer),
            args, count, total)
        pending = client.xpending(stream, "g")["pending"]
        if pending:
            raise BenchmarkError(f"redis group has {pending} pending "
                                 f"entries after the run, expected 0")
    finally:
        client.delete(stream)
        client.close()
    return total, elapsed


def case_names() -> list[str]:
    names = [f"{system}.per_message.{SPLIT_SHAPE}"
             for system in ("shm", "redis", "core")]
    names += [f"{system}.{mode}.{shape}"
              for mode in ("per_message", "batched")
              for shape in SHAPES
              for system in ("shm", "redis")]
    return names


CASE_NAMES = tuple(case_names())


def _skip_reason(name: str) -> str | None:
    if not name.startswith("redis."):
        return None
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis is not installed (pip install 'mqs[bench]')"
    if find_redis_server() is None:
        return ("redis-server is not installed (Debian: apt-get install "
                "redis-server)")
    return None


def _summary(name: str, rounds: list[tuple[int, int]]) -> dict:
    rates = sorted(amount / max(elapsed, 1) * 1e9
                   for amount, elapsed in rounds)
    return {"case": name, "messages": rounds[0][0], "rounds": len(rounds),
            "rate_per_s": statistics.median(rates),
            "rate_min_per_s": rates[0], "rate_max_per_s": rates[-1]}


def run_broker_bench(scale: float = 1.0, repeat: int = 3,
                     cases: Sequence[str] | None = None,
                     progress: Callable[[str], None] | None = None,
                     url: str | None = None) -> dict:
    """Run the broker benchmark and return the results as a dict.

    Parameters
    ----------
    scale : float
        Multiplies the messages per process and round (1.0: about 20 s
        on 2 cores with Redis installed).
    repeat : int
        Timed rounds per case, after one warm-up round.
    cases : sequence of str or None
        Case names to run (default: all of `CASE_NAMES`).
    progress : callable or None
        Called with a round number and case name before each round.
    url : str or None
        Redis server of the peer cases; None starts a throwaway one on
        127.0.0.1. Only keys under ``mqs-bench:`` are written, and
        deleted afterwards.

    Returns
    -------
    dict
        ``machine`` (`mqs.bench.machine_info`), ``scale``, ``repeat``,
        ``cases`` (case, messages, rounds, median/min/max rate per
        second, or ``skipped`` with the reason) and ``ratios`` (each shm
        case against the Redis case of the same loop and shape, with
        the target, None for the batched loop, whether it was met, None
        without a target, and ``tracked``: True only for
        `TRACKED_RATIO`).

    Raises
    ------
    mqs.bench.BenchmarkError
        If a run lost or damaged a message.
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat!r}")
    names = list(cases) if cases is not None else list(CASE_NAMES)
    for name in names:
        if name not in CASE_NAMES:
            raise ValueError(f"unknown case {name!r}; expected one of "
                             f"{', '.join(CASE_NAMES)}")
    skipped = {name: _skip_reason(name) for name in names}
    rounds: dict[str, list[tuple[int, int]]] = {name: [] for name in names}
    server = None
    if url is None and any(name.startswith("redis.") and not skipped[name]
                           for name in names):
        from mqs._redis_server import RedisServer

        server = RedisServer()
        server.start()
        url = server.url
    try:
        for index in range(repeat + 1):
            for name in names:
                if skipped[name]:
                    continue
                if progress:
                    progress(f"round {index}/{repeat} {name}")
                system, mode, shape = name.split(".")
                count = max(1, int(BASE_COUNTS[mode] * scale))
                if system == "core":
                    result = _core_round(count * CORE_COUNT_FACTOR)
                elif system == "shm":
                    result = _shm_round(mode, shape, count)
                else:
                    assert url is not None
                    result = _redis_round(url, mode, shape, count)
                if index > 0:
                    rounds[name].append(result)
    finally:
        if server is not None:
            server.stop()
    results = {name: ({"case": name, "skipped": skipped[name]}
                      if skipped[name] else _summary(name, rounds[name]))
               for name in names}
    return {"machine": machine_info(), "scale": scale, "repeat": repeat,
            "cases": list(results.values()), "ratios": _ratios(results)}


def _ratios(results: dict[str, dict]) -> list[dict]:
    ratios = []
    for name in results:
        if not name.startswith("shm."):
            continue
        peer = "redis" + name[3:]
        top = results[name].get("rate_per_s")
        bottom = results.get(peer, {}).get("rate_per_s")
        value = None if top is None or bottom is None else top / bottom
        ratio_name = f"{name[4:]}_vs_redis_streams"
        # The 30x target is set for one call per message; batches are
        # compared with pipelined redis-py calls, without a target.
        target = TARGET if name.startswith("shm.per_message.") else None
        met = None if value is None or target is None else value >= target
        ratios.append({"name": ratio_name,
                       "numerator": name, "denominator": peer,
                       "value": value, "target": target, "met": met,
                       "tracked": ratio_name == TRACKED_RATIO})
    return ratios


def format_broker_bench(result: dict) -> str:
    """Render a `run_broker_bench` result as a plain-text table."""
    lines = [f"{'case':28} {'median/s':>12} {'min/s':>12} {'max/s':>12}"]
    for case in result["cases"]:
        if "skipped" in case:
            lines.append(f"{case['case']:28} skipped: {case['skipped']}")
            continue
        lines.append(f"{case['case']:28} {case['rate_per_s']:12,.0f} "
                     f"{case['rate_min_per_s']:12,.0f} "
                     f"{case['rate_max_per_s']:12,.0f}")
    lines.append("")
    for ratio in result["ratios"]:
        value = ratio["value"]
        shown = "n/a" if value is None else f"{value:.2f}x"
        if ratio["target"] is None:
            lines.append(f"{ratio['name']:36} {shown:>10}  no target")
            continue
        verdict = {True: "met", False: "MISSED", None: "not measured"}[
            ratio["met"]]
        tracked = "  (tracked)" if ratio["tracked"] else ""
        lines.append(f"{ratio['name']:36} {shown:>10}  target >= "
                     f"{ratio['target']:g}x  {verdict}{tracked}")
    return "\n".join(lines)
