"""Property test: the redis backend makes the same choices as the memory
backend, which is the contract's reference.

Random operations (publishes with priorities and keys, fetches of two
groups, acks, nacks, releases, closes, redrives) run against both; every
fetch must return the same bodies with the same attempts, every ack the
same result, and the counters must agree at the end. No timer fires: the
ack timeout is long and nacks retry at once.
"""

import os
import uuid

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

import mqs

redis = pytest.importorskip("redis")

WEIGHTS = {9: 3, 4: 2, 0: 1}
COMPARED = ("published", "delivered", "acked", "nacked", "late_acks",
            "dead_lettered", "dead_lettered.max_attempts",
            "dead_lettered.rejected", "redriven", "stored", "ready",
            "in_flight", "dlq", "groups")

operations = st.lists(st.one_of(
    st.tuples(st.just("publish"), st.integers(0, 9),
              st.sampled_from([None, "a", "b"])),
    st.tuples(st.just("fetch"), st.integers(0, 3), st.integers(1, 4)),
    st.tuples(st.just("ack"), st.integers(0, 20)),
    st.tuples(st.just("nack"), st.integers(0, 20), st.booleans()),
    st.tuples(st.just("release"), st.integers(0, 20)),
    st.tuples(st.just("close"), st.integers(0, 3)),
    st.tuples(st.just("join"), st.sampled_from(["earliest", "latest"])),
    st.tuples(st.just("redrive"),),
), max_size=60)


class Side:
    """One broker with its consumers and the messages they hold."""

    def __init__(self, broker):
        self.broker = broker
        broker.declare_topic("t", weights=WEIGHTS, max_attempts=3)
        self.consumers = [self._open("g", "earliest")]
        self.held = []
        self.serial = 0

    def _open(self, group, start):
        return self.broker.consume("t", group, prefetch=3, ack_timeout=600,
                                   start=start)

    def apply(self, operation):
        kind = operation[0]
        if kind == "publish":
            self.serial += 1
            self.broker.publish("t", b"%d" % self.serial,
                                priority=operation[1], key=operation[2])
            return None
        if kind == "fetch":
            consumer = self.consumers[operation[1] % len(self.consumers)]
            try:
                got = consumer.get_many(operation[2], timeout=0)
            except mqs.Empty:
                return []
            self.held += got
            return [(m.group, m.body, m.attempts) for m in got]
        if kind in ("ack", "nack", "release"):
            if not self.held:
                return None
            message = self.held.pop(operation[1] % len(self.held))
            if kind == "ack":
                return message.ack()
            if kind == "nack":
                return message.nack(requeue=operation[2], delay=0)
            consumer = message._consumer
            return self.broker.backend.release(
                "t", consumer.group, [message._delivery.tag])
        if kind == "close":
            index = operation[1] % len(self.consumers)
            consumer = self.consumers[index]
            self.held = [m for m in self.held if m._consumer is not consumer]
            returned = consumer.close(drain=False)
            self.consumers[index] = self._open(consumer.group, "earliest")
            return returned
        if kind == "join":
            if len(self.consumers) >= 3:
                return None
            self.consumers.append(self._open("h", operation[1]))
            return None
        return self.broker.dlq_redrive("t")

    def stats(self):
        stats = self.broker.stats("t")
        return {name: stats[name] for name in COMPARED}


@settings(max_examples=int(150 * float(os.environ.get("MQS_TEST_SCALE",
                                                      "1"))), deadline=None,
          suppress_health_check=[HealthCheck.too_slow,
                                 HealthCheck.function_scoped_fixture])
@given(operations)
def test_redis_matches_memory_backend(redis_url, steps):
    namespace = f"mqs-test-{uuid.uuid4().hex[:12]}"
    memory = Side(mqs.Broker(backend="memory"))
    remote = Side(mqs.Broker(backend="redis", url=redis_url,
                             namespace=namespace))
    try:
        for step, operation in enumerate(steps):
            expected = memory.apply(operation)
            got = remote.apply(operation)
            assert got == expected, (step, operation)
        assert remote.stats() == memory.stats()
    finally:
        remote.broker.close()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{{{namespace}:*"))
        if keys:
            client.unlink(*keys)
        client.close()
