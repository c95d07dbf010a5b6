"""Stress tests of mqs.Queue and mqs.SimpleQueue: 8 producers, 8 consumers.

Every producer puts (producer, sequence) pairs in sequence order. The
tests check that every item arrives exactly once and that each consumer
receives the items of any one producer in increasing sequence order, which
a FIFO queue guarantees. Random choices use fixed seeds. MQS_TEST_SCALE
multiplies the item counts and the time bound. A run that exceeds the
bound fails and names the threads still running, instead of hanging.
"""

import itertools
import random
import sys
import threading
import time
from collections import Counter

import pytest

import mqs

pytestmark = pytest.mark.stress

SEED = 20240611
PRODUCERS = 8
CONSUMERS = 8
ITEMS_PER_PRODUCER = 50_000  # at MQS_TEST_SCALE=1
TIME_BOUND_S = 120.0  # at MQS_TEST_SCALE=1, for one test
MAX_BATCH = 32
YIELD_CHANCE = 1 / 64

QUEUE_KINDS = {
    "Queue": lambda: mqs.Queue(),
    "Queue-maxsize-64": lambda: mqs.Queue(maxsize=64),
    "SimpleQueue": lambda: mqs.SimpleQueue(),
}


@pytest.fixture(autouse=True)
def frequent_thread_switches():
    """Make the interpreter hand the GIL over every 10 us, not every 5 ms.

    Threads then interleave between nearly every pair of queue calls
    instead of running one long stretch each.
    """
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(interval)


class Worker(threading.Thread):
    """Daemon thread that keeps its target's return value or exception."""

    def __init__(self, name, target, *args):
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self._target_args = args
        self.result = None
        self.error = None

    def run(self):
        try:
            self.result = self._target_fn(*self._target_args)
        except Exception as exc:  # noqa: BLE001 (reported by the test)
            self.error = exc


def join_all(workers, deadline):
    """Join workers until the monotonic deadline; return those still alive."""
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    return [worker.name for worker in workers if worker.is_alive()]


def maybe_yield(rng):
    """Give up the GIL now and then, so threads interleave at random points."""
    if rng.random() < YIELD_CHANCE:
        time.sleep(0)


def produce_one_by_one(q, producer, count, rng):
    for sequence in range(count):
        q.put((producer, sequence))
        maybe_yield(rng)


def produce_in_batches(q, producer, count, rng):
    sequence = 0
    while sequence < count:
        size = min(rng.randint(1, MAX_BATCH), count - sequence)
        q.put_many([(producer, s) for s in range(sequence, sequence + size)])
        sequence += size
        maybe_yield(rng)


def consume_by_iteration(q, rng, task_done):
    received = []
    for item in q:
        received.append(item)
        if task_done:
            q.task_done()
        maybe_yield(rng)
    return received


def consume_in_batches(q, rng, task_done):
    received = []
    while True:
        try:
            batch = q.get_many(rng.randint(1, MAX_BATCH))
        except mqs.ShutDown:
            return received
        received.extend(batch)
        if task_done:
            for _ in batch:
                q.task_done()
        maybe_yield(rng)


def run_producers_and_consumers(q, produce, consume, scale, *, join=False,
                                background=()):
    """Move every item through q and return each consumer's item list.

    Producers run to the end, then the queue is joined (when `join`) and
    shut down, so consumers drain it and stop. `background` are extra
    targets that run until producers finish; each gets the queue and a
    threading.Event set when they should stop.
    """
    count = int(ITEMS_PER_PRODUCER * scale)
    deadline = time.monotonic() + TIME_BOUND_S * max(scale, 1.0)
    producers_done = threading.Event()
    producers = [
        Worker(f"producer-{p}", produce, q, p, count,
               random.Random(SEED + p))
        for p in range(PRODUCERS)
    ]
    consumers = [
        Worker(f"consumer-{c}", consume, q,
               random.Random(SEED + PRODUCERS + c), join)
        for c in range(CONSUMERS)
    ]
    helpers = [
        Worker(f"background-{i}", target, q, producers_done)
        for i, target in enumerate(background)
    ]
    for worker in consumers + producers + helpers:
        worker.start()

    try:
        stuck = join_all(producers, deadline)
        assert stuck == [], f"still running after the time bound: {stuck}"
        producers_done.set()
        stuck = join_all(helpers, deadline)
        assert stuck == [], f"still running after the time bound: {stuck}"
        if join:
            joiner = Worker("joiner", q.join)
            joiner.start()
            stuck = join_all([joiner], deadline)
            assert stuck == [], "join() did not return in the time bound"
        q.shutdown()
        stuck = join_all(consumers, deadline)
        assert stuck == [], f"still running after the time bound: {stuck}"
    finally:
        # Release any thread still blocked so the process can go on.
        producers_done.set()
        q.shutdown(immediate=True)

    for worker in producers + consumers + helpers:
        assert worker.error is None, f"{worker.name} raised {worker.error!r}"
    return count, [consumer.result for consumer in consumers]


def check_delivery(count, received_by_consumer):
    """Assert exactly-once delivery and per-producer order per consumer."""
    for c, received in enumerate(received_by_consumer):
        for p in range(PRODUCERS):
            sequences = [s for producer, s in received if producer == p]
            in_order = all(a < b for a, b in itertools.pairwise(sequences))
            assert in_order, (
                f"consumer {c} saw producer {p}'s items out of order")

    delivered = Counter(
        item for received in received_by_consumer for item in received)
    duplicates = [item for item, n in delivered.items() if n > 1]
    assert duplicates == [], f"delivered more than once: {duplicates[:10]}"
    expected = {(p, s) for p in range(PRODUCERS) for s in range(count)}
    missing = expected - delivered.keys()
    assert not missing, (
        f"{len(missing)} items lost, e.g. {sorted(missing)[:10]}")
    unexpected = delivered.keys() - expected
    assert not unexpected, f"items never put: {sorted(unexpected)[:10]}"


@pytest.mark.parametrize("make_queue", list(QUEUE_KINDS.values()),
                         ids=list(QUEUE_KINDS))
def test_put_get_delivers_each_item_once_in_order(make_queue, scale):
    q = make_queue()
    count, received = run_producers_and_consumers(
        q, produce_one_by_one, consume_by_iteration, scale,
        join=isinstance(q, mqs.Queue))
    check_delivery(count, received)
    assert q.qsize() == 0


@pytest.mark.parametrize("make_queue", list(QUEUE_KINDS.values()),
                         ids=list(QUEUE_KINDS))
def test_batches_deliver_each_item_once_in_order(make_queue, scale):
    q = make_queue()
    count, received = run_producers_and_consumers(
        q, produce_in_batches, consume_in_batches, scale,
        join=isinstance(q, mqs.Queue))
    check_delivery(count, received)
    assert q.qsize() == 0


def change_maxsize_until_done(q, done):
    """Set random maxsize values, bounded and not, until `done` is set."""
    rng = random.Random(SEED - 1)
    while not done.is_set():
        q.maxsize = rng.choice([1, 2, 3, 8, 64, 0, -1])
        time.sleep(rng.uniform(0, 0.002))
    q.maxsize = 64


@pytest.mark.parametrize("produce, consume", [
    (produce_one_by_one, consume_by_iteration),
    (produce_in_batches, consume_in_batches),
], ids=["put-get", "put_many-get_many"])
def test_maxsize_changes_keep_delivery_exact(produce, consume, scale):
    q = mqs.Queue(maxsize=64)
    count, received = run_producers_and_consumers(
        q, produce, consume, scale, join=True,
        background=[change_maxsize_until_done])
    check_delivery(count, received)
    assert q.qsize() == 0
    assert q.maxsize == 64
