"""Differential test: the shared topic core against TopicState.

Hypothesis drives `mqs._topiccore.TopicCore` (C, in a /dev/shm file) and
`mqs.broker._state.TopicState` (the reference model of every backend)
with the same operations on the same simulated clock. The operations are
publishes in several lanes, groups started at "earliest" or "latest",
consumers with prefetch, fetches with and without auto_ack, acks, nacks,
extends, releases, closes and clock moves past ack deadlines. Every delivery
(id, attempts, priority, body), every settle result, the dead letters
(id, group, reason, attempts) and the counters must agree.

Times are whole tenths of a second and ack deadlines fall on odd
twentieths, so no deadline ever equals a clock reading: the timing
wheel's 1 ms ticks and the core's exact comparison then agree.
"""

import os
import uuid

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from mqs._topiccore import COUNTER_NAMES, TopicCore
from mqs.broker._backend import Envelope
from mqs.broker._policy import TopicConfig
from mqs.broker._state import TopicState
from mqs.errors import ShutDown

GROUPS = ("g1", "g2")
ACK_TIMEOUTS = (0.25, 0.55, 1.05)
EXTENSIONS = (0.35, 2.05)
# Counters both keep; TopicState adds others the core never changes.
COMPARED = [name for name in COUNTER_NAMES if name != "recoveries"]


class Clock:
    def __init__(self):
        self.ticks = 1000

    def __call__(self):
        return self.ticks / 10


class CoreAgainstState(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.clock = Clock()
        self.core = None
        self.path = None
        self.published = 0
        # consumer name -> (group, core group index, core consumer index) of
# the open consumers.
        self.consumers = {}
        self.next_consumer = 0
        # Deliveries not settled yet: (group, state tag, core tag).
        self.held = []
        self.core_dead = []

    @initialize(lanes=st.sets(st.integers(0, 9), min_size=1, max_size=4),
                weights=st.lists(st.integers(1, 4), min_size=4, max_size=4),
                strict=st.booleans(),
                max_attempts=st.one_of(st.none(), st.integers(1, 3)),
                sample_every=st.sampled_from([None, 1, 2, 3]))
    def setup(self, lanes, weights, strict, max_attempts, sample_every):
        ordered = sorted(lanes, reverse=True)
        weight_map = dict(zip(ordered, weights))
        config = TopicConfig.build(
            "t", weights=weight_map, policy="strict" if strict else "weighted",
            max_attempts=max_attempts, dedup_window=None)
        self.state = TopicState(config, self.clock, self._next_id,
                                sample_every)
        self.path = f"/dev/shm/mqs.test-core.{os.getpid()}.{uuid.uuid4().hex}"
        self.core = TopicCore(
            self.path, [(lane, weight_map[lane]) for lane in ordered],
            strict=strict, capacity=64, slot_bytes=32, max_groups=4,
            max_consumers=16, max_attempts=max_attempts,
            sample_every=sample_every)

    def _next_id(self):
        self.published += 1
        return f"m{self.published}"

    def teardown(self):
        if self.core is not None:
            self.core.close()
            os.unlink(self.path)

    # Rules.

    @rule(priority=st.integers(0, 9), count=st.integers(1, 3))
    def publish(self, priority, count):
        for _ in range(count):
            if self.core.stats()["stored"] >= 64:
                return
            body = f"body{self.published + 1}".encode()
            now = self.clock()
            ids = self.state.publish([Envelope(body, priority)], now, 1.0)
            seq = self.core.publish(body, priority, 1.0, now=now)
            assert ids == [f"m{seq}"]

    @precondition(lambda self: len(self.consumers) < 8)
    @rule(group=st.sampled_from(GROUPS), earliest=st.booleans(),
          prefetch=st.integers(1, 4),
          max_attempts=st.one_of(st.none(), st.integers(1, 3)))
    def open_consumer(self, group, earliest, prefetch, max_attempts):
        now = self.clock()
        self.next_consumer += 1
        name = f"c{self.next_consumer}"
        start = "earliest" if earliest else "latest"
        self.state.open_consumer(group, name, start, prefetch, max_attempts,
                                 now)
        index = self.core.open_group(group, earliest, max_attempts, now=now)
        consumer = self.core.open_consumer(index, prefetch, 1, now=now)
        self.consumers[name] = (group, index, consumer)

    @precondition(lambda self: self.consumers)
    @rule(data=st.data())
    def close_consumer(self, data):
        name = data.draw(st.sampled_from(sorted(self.consumers)))
        group, _, consumer = self.consumers.pop(name)
        now = self.clock()
        expected = self.state.close_consumer(group, name, now)
        assert self.core.close_consumer(consumer, now=now) == expected

    @precondition(lambda self: self.consumers)
    @rule(data=st.data(), max_items=st.integers(1, 4),
          ack_timeout=st.sampled_from(ACK_TIMEOUTS), auto_ack=st.booleans())
    def fetch(self, data, max_items, ack_timeout, auto_ack):
        name = data.draw(st.sampled_from(sorted(self.consumers)))
        group, index, consumer = self.consumers[name]
        now = self.clock()
        expected = self.state.fetch(group, name, max_items, ack_timeout,
                                    auto_ack, now)
        found = self.core.fetch(consumer, max_items, ack_timeout, auto_ack,
                                now=now)
        assert [f"m{seq}" for seq, *_ in found] == [d.id for d in expected]
        for delivery, (seq, slot, ticket, attempts, priority, _, body) in zip(
                expected, found):
            assert attempts == delivery.attempts
            assert priority == delivery.priority
            assert body == delivery.body
            if not auto_ack:
                self.held.append((group, delivery.tag, (index, slot, ticket)))

    @precondition(lambda self: self.held)
    @rule(data=st.data(), how=st.sampled_from(
        ["ack", "requeue", "reject", "extend"]))
    def settle(self, data, how):
        position = data.draw(st.integers(0, len(self.held) - 1))
        group, tag, (index, slot, ticket) = self.held[position]
        now = self.clock()
        if how == "ack":
            expected = self.state.ack(group, tag, now)
            got = self.core.ack(index, slot, ticket, now=now)
        elif how == "extend":
            seconds = data.draw(st.sampled_from(EXTENSIONS))
            expected = self.state.extend(group, tag, seconds, now)
            got = self.core.extend(index, slot, ticket, seconds, now=now)
        else:
            requeue = how == "requeue"
            expected = self.state.nack(group, tag, requeue, None, None, now)
            got = self.core.nack(index, slot, ticket, requeue, now=now)
        assert got == expected
        if how != "extend" or not got:
            del self.held[position]

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data):
        group = data.draw(st.sampled_from(sorted({h[0] for h in self.held})))
        mine = [h for h in self.held if h[0] == group]
        chosen = data.draw(st.lists(st.sampled_from(mine), min_size=1,
                                    max_size=3, unique_by=lambda h: h[1]))
        now = self.clock()
        expected = self.state.release(group, [h[1] for h in chosen], now)
        got = self.core.release(chosen[0][2][0],
                                [h[2][1:] for h in chosen], now=now)
        assert got == expected
        for held in chosen:
            self.held.remove(held)

    @rule(tenths=st.integers(1, 15))
    def tick(self, tenths):
        self.clock.ticks += tenths
        now = self.clock()
        self.state.advance(now)
        self.core.advance(now=now)

    @rule()
    def fetch_closed(self):
        # At most 8 consumers are open, so index 15 never is. A fetch
        # there raises as TopicState's fetch for a closed consumer does.
        with pytest.raises(ShutDown):
            self.core.fetch(15, 1, 1.05, now=self.clock())

    # Checks.

    @invariant()
    def same_counters(self):
        if self.core is None:
            return
        counters = self.core.counters()
        for name in COMPARED:
            assert counters[name] == self.state.counters.get(name, 0), name

    @invariant()
    def same_dead_letters_and_store(self):
        if self.core is None:
            return
        # Taken first: the core keeps a dead entry's slot until then.
        for group, seq, attempts, reason, priority, _, body in \
                self.core.take_dead():
            self.core_dead.append(
                (f"m{seq}", self.core_group_name(group), reason, attempts,
                 priority, body))
        expected = [(letter.id, letter.group, letter.reason, letter.attempts,
                     letter.priority, letter.body)
                    for letter, _ in self.state.dlq.values()]
        assert self.core_dead == expected
        stats = self.core.stats()
        assert stats["stored"] == len(self.state.store)
        expected_stats = self.state.stats()
        assert stats["ready"] == expected_stats["ready"]
        assert stats["in_flight"] == expected_stats["in_flight"]

    @invariant()
    def same_group_stats(self):
        if self.core is None:
            return
        now = self.clock()
        expected = {stats.group: stats
                    for stats in self.state.group_stats(now)}
        found = self.core.group_stats(now=now)
        assert sorted(item[1] for item in found) == sorted(expected)
        for (_, name, consumers, ready, oldest, in_flight, counters,
             enqueue_to_deliver, deliver_to_ack) in found:
            stats = expected[name]
            assert consumers == stats.consumers
            assert ready == stats.lag_messages
            lag = 0.0 if oldest is None else max(0.0, now - oldest)
            assert lag == pytest.approx(stats.lag_seconds)
            assert in_flight == stats.in_flight
            for key, value in counters.items():
                assert value == getattr(stats, key), key
            for histogram, summary in (
                    (enqueue_to_deliver, stats.enqueue_to_deliver),
                    (deliver_to_ack, stats.deliver_to_ack)):
                count = 0 if summary is None else summary.count
                assert histogram[1] == count

    def core_group_name(self, index):
        for group in GROUPS:
            if self.core.find_group(group) == index:
                return group
        raise AssertionError(f"no group has core index {index}")


CoreAgainstState.TestCase.settings = settings(
    max_examples=int(150 * float(os.environ.get("MQS_TEST_SCALE", "1"))),
    stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestCoreAgainstState = CoreAgainstState.TestCase
