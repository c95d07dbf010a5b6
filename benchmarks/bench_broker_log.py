"""Publish -> consume -> ack through the durable log backend of `mqs.Broker`
against persist-queue's SQLiteAckQueue put -> get -> ack.

N small dicts (``--bench-count`` / 50) go through each subject, one
message per call, in two shapes: one thread that publishes, gets and
acks each message in turn, and 4 producer threads with 1 consumer
thread (the shape where syncs of ``fsync="always"`` are shared).
Subjects: `Broker(backend="log")` with ``fsync="always"`` (every call
returns after a sync) and ``"interval"`` (synced every 50 ms), and
SQLiteAckQueue with ``auto_commit=True`` (every call commits; SQLite in
WAL mode with its default ``synchronous=FULL`` syncs the WAL at each
commit). Each round uses a fresh directory and is checked: every item
arrives exactly once. ``--benchmark-json`` stores ``messages_per_s``.
"""

import tempfile
import threading

import pytest

import mqs

persistqueue = pytest.importorskip("persistqueue")

PRODUCERS = 4


class LogSubject:
    def __init__(self, path, fsync):
        self.broker = mqs.Broker(backend="log", path=path, fsync=fsync)
        self.consumer = self.broker.consume("t", "g", prefetch=1,
                                            ack_timeout=600)

    def put(self, item):
        self.broker.publish("t", item)

    def get_ack(self):
        message = self.consumer.get(timeout=60)
        message.ack()
        return message.body

    def close(self):
        self.consumer.close(drain=False)
        self.broker.close()


class SQLiteSubject:
    def __init__(self, path):
        self.queue = persistqueue.SQLiteAckQueue(
            path, multithreading=True, auto_commit=True)

    def put(self, item):
        self.queue.put(item)

    def get_ack(self):
        item = self.queue.get(block=True, timeout=60)
        self.queue.ack(item)
        return item

    def close(self):
        self.queue.close()


SUBJECTS = {
    "log fsync=always": lambda path: LogSubject(path, "always"),
    "log fsync=interval": lambda path: LogSubject(path, "interval"),
    "SQLiteAckQueue": SQLiteSubject,
}


def _sequential(subject, items):
    received = []
    for item in items:
        subject.put(item)
        received.append(subject.get_ack())
    return received


def _threaded(subject, items):
    received = []

    def produce(part):
        for item in items[part::PRODUCERS]:
            subject.put(item)

    def consume():
        for _ in items:
            received.append(subject.get_ack())

    threads = [threading.Thread(target=consume)]
    threads += [threading.Thread(target=produce, args=(part,))
                for part in range(PRODUCERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return received


SHAPES = {"1 thread": _sequential,
          f"{PRODUCERS} producers, 1 consumer": _threaded}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("subject", list(SUBJECTS))
def bench_broker_log_vs_sqlite_ack_queue(benchmark, request, subject, shape):
    count = max(PRODUCERS, request.config.getoption("--bench-count") // 50)
    rounds = request.config.getoption("--bench-rounds")
    items = [{"n": i, "payload": "x" * 64} for i in range(count)]
    results = []

    def run():
        with tempfile.TemporaryDirectory() as directory:
            queue = SUBJECTS[subject](directory + "/q")
            try:
                results.append(SHAPES[shape](queue, items))
            finally:
                queue.close()

    benchmark.group = f"durable publish -> consume -> ack, {shape}"
    benchmark.extra_info["count"] = count
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)
    for received in results:
        assert sorted(item["n"] for item in received) == list(range(count))
    if benchmark.stats is not None:
        benchmark.extra_info["messages_per_s"] = \
            count / benchmark.stats.stats.median
