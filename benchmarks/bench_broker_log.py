"""Publish -> consume -> ack through the durable log backend of `mqs.Broker`
against persist-queue's SQLiteAckQueue and Redis Streams.

N small dicts (``--bench-count`` / 50) go through each subject, one
message per call, in three shapes:

- one thread that publishes, gets and acks each message in turn;
- 4 producer threads with 1 consumer thread;
- 4 producer threads with 4 consumer threads.

In the threaded shapes concurrent callers share the syncs of
``fsync="always"`` (group commit). Subjects:

- `Broker(backend="log")` with ``fsync="always"`` (every publish and
  ack returns after a sync that covers its record) and ``"interval"``
  (synced every 50 ms);
- SQLiteAckQueue with ``auto_commit=True`` (every call commits; SQLite
  in WAL mode with its default ``synchronous=FULL`` syncs the WAL at
  each commit), the peer of ``"always"``;
- Redis Streams, XADD, then XREADGROUP COUNT 1 and XACK, through
  redis-py on a throwaway redis-server on 127.0.0.1 with ``appendonly
  yes`` and ``appendfsync everysec`` (data in a temporary directory),
  the peer of ``"interval"``.

Each round uses a fresh directory or stream and is checked: every item
arrives exactly once. ``--benchmark-json`` stores ``messages_per_s``.

Run ``python benchmarks/bench_broker_log.py`` to measure every subject
and shape in one run and print the ratios ``log always /
SQLiteAckQueue`` and ``log interval / Redis Streams`` per shape (medians
of ``--rounds`` rounds after a warm-up round).
"""

import argparse
import os
import pickle
import platform
import statistics
import tempfile
import threading
import time
import uuid

import mqs

PRODUCERS = 4
CONSUMERS = 4
# Ratio targets: "always" against SQLiteAckQueue with 4 producers, and
# "interval" against Redis Streams with appendfsync everysec.
TARGETS = {"always": 10.0, "interval": 20.0}


class LogSubject:
    def __init__(self, path, fsync):
        self.broker = mqs.Broker(backend="log", path=path, fsync=fsync)
        self.local = threading.local()
        self.lock = threading.Lock()
        self.consumers = []

    def _consumer(self):
        consumer = getattr(self.local, "consumer", None)
        if consumer is None:
            consumer = self.broker.consume("t", "g", prefetch=1,
                                           ack_timeout=600)
            self.local.consumer = consumer
            with self.lock:
                self.consumers.append(consumer)
        return consumer

    def prepare(self):
        self._consumer()

    def put(self, item):
        self.broker.publish("t", item)

    def get_ack(self):
        message = self._consumer().get(timeout=60)
        message.ack()
        return message.body

    def close(self):
        for consumer in self.consumers:
            consumer.close(drain=False)
        self.broker.close()


class SQLiteSubject:
    def __init__(self, path):
        import persistqueue

        self.queue = persistqueue.SQLiteAckQueue(
            path, multithreading=True, auto_commit=True)

    def prepare(self):
        pass

    def put(self, item):
        self.queue.put(item)

    def get_ack(self):
        item = self.queue.get(block=True, timeout=60)
        self.queue.ack(item)
        return item

    def close(self):
        self.queue.close()


class RedisStreamSubject:
    """XADD, XREADGROUP COUNT 1 and XACK of pickled items; each thread
    reads as its own consumer of one group."""

    def __init__(self, url):
        import redis

        self.client = redis.Redis.from_url(url)
        self.stream = f"mqs-bench:{uuid.uuid4().hex[:8]}:log"
        self.client.xgroup_create(self.stream, "g", id="$", mkstream=True)

    def prepare(self):
        pass

    def put(self, item):
        self.client.xadd(self.stream,
                         {"b": pickle.dumps(item, pickle.HIGHEST_PROTOCOL)})

    def get_ack(self):
        name = f"c{threading.get_ident()}"
        reply = self.client.xreadgroup("g", name, {self.stream: ">"},
                                       count=1, block=60_000)
        if not reply:
            raise TimeoutError(f"redis stream {self.stream} returned no entry "
                               f"within 60 s")
        entry_id, fields = reply[0][1][0]
        self.client.xack(self.stream, "g", entry_id)
        return pickle.loads(fields[b"b"])

    def close(self):
        self.client.delete(self.stream)
        self.client.close()


def _sequential(subject, items):
    received = []
    for item in items:
        subject.put(item)
        received.append(subject.get_ack())
    return received


def _threaded(subject, items, consumers=1):
    received = []
    lock = threading.Lock()

    def produce(part):
        for item in items[part::PRODUCERS]:
            subject.put(item)

    def consume(part):
        subject.prepare()
        mine = [subject.get_ack() for _ in items[part::consumers]]
        with lock:
            received.extend(mine)

    threads = [threading.Thread(target=consume, args=(part,))
               for part in range(consumers)]
    threads += [threading.Thread(target=produce, args=(part,))
                for part in range(PRODUCERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return received


SHAPES = {
    "1 thread": _sequential,
    f"{PRODUCERS} producers, 1 consumer": _threaded,
    f"{PRODUCERS} producers, {CONSUMERS} consumers":
        lambda subject, items: _threaded(subject, items, CONSUMERS),
}
SUBJECT_NAMES = ("log fsync=always", "log fsync=interval", "SQLiteAckQueue",
                 "Redis Streams everysec")


def make_subject(name, directory, redis_url):
    """Return a fresh subject `name` storing its data under `directory`."""
    if name == "log fsync=always":
        return LogSubject(os.path.join(directory, "q"), "always")
    if name == "log fsync=interval":
        return LogSubject(os.path.join(directory, "q"), "interval")
    if name == "SQLiteAckQueue":
        return SQLiteSubject(os.path.join(directory, "q"))
    if redis_url is None:
        raise RuntimeError("the Redis subject needs a redis-server")
    return RedisStreamSubject(redis_url)


def run_round(name, shape, items, redis_url=None):
    """Move `items` through a fresh subject; return (seconds, received)."""
    with tempfile.TemporaryDirectory(prefix="mqs-bench-log-") as directory:
        subject = make_subject(name, directory, redis_url)
        try:
            started = time.perf_counter()
            received = SHAPES[shape](subject, items)
            elapsed = time.perf_counter() - started
        finally:
            subject.close()
    if sorted(item["n"] for item in received) != [
            item["n"] for item in items]:
        raise AssertionError(f"{name}, {shape}: items lost or duplicated")
    return elapsed, received


# ---- pytest-benchmark ----------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - the script mode needs no pytest
    pytest = None


def _redis_server_or_skip():
    from mqs._redis_server import RedisServer, find_redis_server

    pytest.importorskip("redis")
    if find_redis_server() is None:
        pytest.skip("redis-server is not installed")
    return RedisServer(appendfsync="everysec")


if pytest is not None:
    @pytest.fixture(scope="module")
    def redis_everysec_url():
        with _redis_server_or_skip() as server:
            yield server.url

    @pytest.mark.parametrize("shape", list(SHAPES))
    @pytest.mark.parametrize("subject", SUBJECT_NAMES)
    def bench_broker_log_vs_peers(benchmark, request, subject, shape):
        if subject == "SQLiteAckQueue":
            pytest.importorskip("persistqueue")
        url = request.getfixturevalue("redis_everysec_url") \
            if subject.startswith("Redis") else None
        count = max(PRODUCERS * CONSUMERS,
                    request.config.getoption("--bench-count") // 50)
        rounds = request.config.getoption("--bench-rounds")
        items = [{"n": i, "payload": "x" * 64} for i in range(count)]

        benchmark.group = f"durable publish -> consume -> ack, {shape}"
        benchmark.extra_info["count"] = count
        benchmark.pedantic(run_round, args=(subject, shape, items, url),
                           rounds=rounds, warmup_rounds=1)
        if benchmark.stats is not None:
            benchmark.extra_info["messages_per_s"] = \
                count / benchmark.stats.stats.median


# ---- one run with every ratio ----------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Measure the log broker against SQLiteAckQueue and "
                    "Redis Streams (appendfsync everysec) in one run and "
                    "print the ratios.")
    parser.add_argument("--count", type=int, default=4000,
                        help="messages per round (default: 4000)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed rounds per subject and shape, after one "
                             "warm-up round (default: 3)")
    args = parser.parse_args(argv)
    from mqs._redis_server import RedisServer, find_redis_server

    items = [{"n": i, "payload": "x" * 64} for i in range(args.count)]
    print(f"python {platform.python_version()}, {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()}, {args.count} messages, "
          f"{args.rounds} rounds")
    rates = {}
    server = None
    if find_redis_server() is not None:
        server = RedisServer(appendfsync="everysec").start()
    try:
        for shape in SHAPES:
            for name in SUBJECT_NAMES:
                if name.startswith("Redis") and server is None:
                    continue
                url = server.url if server is not None else None
                run_round(name, shape, items, url)
                times = [run_round(name, shape, items, url)[0]
                         for _ in range(args.rounds)]
                rate = args.count / statistics.median(times)
                rates[name, shape] = rate
                print(f"{shape:26} {name:24} {rate:10,.0f} msg/s  (min "
                      f"{args.count / max(times):,.0f}, max "
                      f"{args.count / min(times):,.0f})", flush=True)
    finally:
        if server is not None:
            server.stop()
    print()
    for shape in SHAPES:
        for mode, peer in (("always", "SQLiteAckQueue"),
                           ("interval", "Redis Streams everysec")):
            top = rates.get((f"log fsync={mode}", shape))
            bottom = rates.get((peer, shape))
            if top is None or bottom is None:
                continue
            ratio = top / bottom
            verdict = "met" if ratio >= TARGETS[mode] else "missed"
            print(f"{shape:26} log {mode} / {peer}: {ratio:6.2f}x  "
                  f"(target >= {TARGETS[mode]:g}x, {verdict})")
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
