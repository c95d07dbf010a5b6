"""Broker throughput: the shm backend against Redis Streams.

Every case moves messages of 100 bytes through publish, consume and ack
on one topic with one consumer group, in 1 or 4 processes that all run
the same loop on the same topic (or stream) and group:

- ``shm.per_message.<N>p``: `Broker.publish` of one message, then
  `Consumer.get` and `Message.ack`, `count` times per process.
- ``shm.batched.<N>p``: `publish_many` of `batch` messages, then
  `get_many` of up to `batch` and one `Consumer.ack_many`.
- ``redis.per_message.<N>p``: XADD, XREADGROUP COUNT 1 and XACK per
  message through redis-py (hiredis when installed).
- ``redis.batched.<N>p``: XADD of `batch` messages in one pipeline,
  XREADGROUP COUNT `batch`, and one XACK naming the whole batch.

Both batched loops thus make three calls per batch. Redis runs as a
throwaway redis-server on 127.0.0.1 without persistence (the shm
broker keeps nothing across a reboot either).

Each process is forked, opens its own broker or client, and waits on a
start event. The clock runs from that event until the last process
exits, and the workers run with the garbage collector off. Every process
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
PROCESSES = (1, 4)
WORKER_TIMEOUT_S = 120.0
# Messages per process and round at scale 1.
BASE_COUNTS = {"per_message": 2_000, "batched": 10_000}
TARGET = 30.0

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
    results.put(done)
    consumer.close()
    broker.close()


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
    results.put(done)
    client.close()


# ---- rounds --------------------------------------------------------------

def _run_workers(target: Callable[..., None], args: tuple, processes: int,
                 count: int) -> int:
    """Fork `processes` workers, start them together, return the wall
    time in ns until all exited."""
    start = _FORK.Event()
    results = _FORK.Queue()
    workers = [_FORK.Process(target=target,
                             args=(*args, count, start, results))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    began = time.perf_counter_ns()
    start.set()
    for worker in workers:
        worker.join(WORKER_TIMEOUT_S * 2)
    elapsed = time.perf_counter_ns() - began
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join()
    codes = [worker.exitcode for worker in workers]
    if codes != [0] * processes:
        raise BenchmarkError(f"a broker benchmark worker failed: exit codes "
                             f"{codes}")
    done = sum(results.get(timeout=10) for _ in workers)
    if done != processes * count:
        raise BenchmarkError(f"workers consumed {done} messages, expected "
                             f"{processes * count}")
    return elapsed


def _shm_round(mode: str, processes: int, count: int) -> tuple[int, int]:
    name = f"mqs-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    broker = mqs.Broker(backend="shm", name=name)
    try:
        broker.declare_topic("t")
        broker.consume("t", "g").close()
        elapsed = _run_workers(_shm_worker, (name, mode), processes, count)
        stats = broker.stats("t")
        if stats["acked"] != processes * count or stats["stored"]:
            raise BenchmarkError(
                f"shm broker acked {stats['acked']} messages and stores "
                f"{stats['stored']}, expected {processes * count} and 0")
    finally:
        broker.close()
        mqs.Broker.unlink(name)
    return processes * count, elapsed


def _redis_round(url: str, mode: str, processes: int,
                 count: int) -> tuple[int, int]:
    import redis

    stream = f"mqs-bench:{uuid.uuid4().hex[:8]}:stream"
    client = redis.Redis.from_url(url)
    try:
        client.xgroup_create(stream, "g", id="$", mkstream=True)
        elapsed = _run_workers(_redis_worker, (url, stream, mode),
                               processes, count)
        pending = client.xpending(stream, "g")["pending"]
        if pending:
            raise BenchmarkError(f"redis group has {pending} pending "
                                 f"entries after the run, expected 0")
    finally:
        client.delete(stream)
        client.close()
    return processes * count, elapsed


def case_names() -> list[str]:
    return [f"{system}.{mode}.{processes}p"
            for mode in ("per_message", "batched")
            for processes in PROCESSES
            for system in ("shm", "redis")]


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
        case against the Redis case of the same loop and processes, with
        the target and whether it was met).

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
                system, mode, processes_label = name.split(".")
                processes = int(processes_label[:-1])
                count = max(1, int(BASE_COUNTS[mode] * scale))
                if system == "shm":
                    result = _shm_round(mode, processes, count)
                else:
                    assert url is not None
                    result = _redis_round(url, mode, processes, count)
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
        ratios.append({"name": f"{name[4:]}_vs_redis_streams",
                       "numerator": name, "denominator": peer,
                       "value": value, "target": TARGET,
                       "met": None if value is None else value >= TARGET})
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
        verdict = {True: "met", False: "MISSED", None: "not measured"}[
            ratio["met"]]
        lines.append(f"{ratio['name']:36} {shown:>10}  target >= "
                     f"{ratio['target']:g}x  {verdict}")
    return "\n".join(lines)
