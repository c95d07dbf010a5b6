"""Stateful test: the memory backend against a plain model of the contract.

The broker runs on a simulated clock. The model tracks each message's
state (hidden behind its key, delayed, ready in its lane, in flight,
finished, dead-lettered) and its timers, and fires them in (due time,
scheduling order), as the timing wheel does. Every delivery must be the
head of a model lane; an empty fetch means every model lane is empty or
the consumer's credit is used up.
"""

import itertools

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

import mqs
from mqs.broker._policy import lane_of

ACK_TIMEOUT = 1.0
MAX_ATTEMPTS = 3
PREFETCH = 4
WEIGHTS = {9: 3, 4: 2, 0: 1}
LANES = tuple(sorted(WEIGHTS, reverse=True))


class Clock:
    """Times are multiples of 1/8 s, exact in binary floating point, so a
    deadline and the clock meet exactly: with steps of 0.1 s the clock
    read 1001.9999999999999 where a deadline was 1002.0, and the model
    and the broker (which rounds to whole nanoseconds) disagreed on
    whether it had passed."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class BrokerModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.clock = Clock()
        self.broker = mqs.Broker(backend="memory", clock=self.clock)
        self.broker.declare_topic("t", weights=WEIGHTS,
                                  max_attempts=MAX_ATTEMPTS)
        self.consumer = self.broker.consume(
            "t", "g", prefetch=PREFETCH, ack_timeout=ACK_TIMEOUT)
        self.seq = itertools.count()
        # id -> {"lane", "key", "attempts", "state", "handle"}
        self.messages = {}
        self.lanes = {lane: [] for lane in LANES}
        self.keys = {}          # key -> unfinished ids in publish order
        self.timers = []        # (due, seq, kind, id, handle)
        self.held = []          # Message objects not acked or nacked
        self.acked = 0
        self.dead = 0

    # Model helpers.

    def _timer(self, due, kind, message_id):
        handle = next(self.seq)
        self.messages[message_id]["handle"] = handle
        self.timers.append((due, handle, kind, message_id))

    def _visible(self, message_id, due):
        message = self.messages[message_id]
        if due > self.clock.now:
            message["state"] = "delayed"
            self._timer(due, "due", message_id)
        else:
            message["state"] = "ready"
            self.lanes[message["lane"]].append(message_id)

    def _finish(self, message_id, dead):
        message = self.messages[message_id]
        message["state"] = "dead" if dead else "done"
        if dead:
            self.dead += 1
        key = message["key"]
        if key is None:
            return
        queue = self.keys[key]
        assert queue[0] == message_id
        queue.pop(0)
        if queue:
            following = queue[0]
            self._visible(following, self.messages[following]["due"])

    def _fire(self):
        """Fire model timers due now, in due order then scheduling order."""
        self.timers.sort()
        while self.timers and self.timers[0][0] <= self.clock.now:
            _, handle, kind, message_id = self.timers.pop(0)
            message = self.messages[message_id]
            if message["handle"] != handle:
                continue
            message["handle"] = None
            if kind == "due":
                message["state"] = "ready"
                self.lanes[message["lane"]].append(message_id)
            elif message["attempts"] >= MAX_ATTEMPTS:
                self._finish(message_id, dead=True)
            else:
                message["state"] = "ready"
                self.lanes[message["lane"]].append(message_id)

    def _current(self, message):
        model = self.messages[message.id]
        return model["state"] == "flight" \
            and model["attempts"] == message.attempts

    # Rules.

    @rule(priority=st.integers(0, 9),
          key=st.sampled_from([None, None, "a", "b"]),
          delay=st.sampled_from([0.0, 0.0, 0.5]))
    def publish(self, priority, key, delay):
        self._fire()
        message_id = self.broker.publish("t", (priority, key), key=key,
                                         priority=priority, delay=delay)
        self.messages[message_id] = {
            "lane": lane_of(priority, LANES), "key": key, "attempts": 0,
            "state": "hidden", "handle": None,
            "due": self.clock.now + delay}
        if key is not None:
            queue = self.keys.setdefault(key, [])
            queue.append(message_id)
            if len(queue) > 1:
                return
        self._visible(message_id, self.clock.now + delay)

    @rule()
    def fetch(self):
        self._fire()
        try:
            found = self.consumer.get_many(1, timeout=0)
        except mqs.Empty:
            found = []
        in_flight = sum(m["state"] == "flight"
                        for m in self.messages.values())
        if not found:
            assert in_flight >= PREFETCH or not any(self.lanes.values())
            return
        (message,) = found
        model = self.messages[message.id]
        assert model["state"] == "ready"
        assert self.lanes[model["lane"]][0] == message.id
        assert in_flight < PREFETCH
        self.lanes[model["lane"]].pop(0)
        model["attempts"] += 1
        assert message.attempts == model["attempts"]
        model["state"] = "flight"
        self._timer(self.clock.now + ACK_TIMEOUT, "deadline", message.id)
        self.held.append(message)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def ack(self, data):
        message = self.held.pop(data.draw(
            st.integers(0, len(self.held) - 1)))
        self._fire()
        current = self._current(message)
        assert message.ack() == current
        if current:
            self.acked += 1
            self.messages[message.id]["handle"] = None
            self._finish(message.id, dead=False)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), requeue=st.booleans(),
          delay=st.sampled_from([0.0, 0.25]))
    def nack(self, data, requeue, delay):
        message = self.held.pop(data.draw(
            st.integers(0, len(self.held) - 1)))
        self._fire()
        current = self._current(message)
        assert message.nack(requeue=requeue, delay=delay) == current
        if not current:
            return
        model = self.messages[message.id]
        model["handle"] = None
        if not requeue or model["attempts"] >= MAX_ATTEMPTS:
            self._finish(message.id, dead=True)
        else:
            self._visible(message.id, self.clock.now + delay)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), seconds=st.sampled_from([0.5, 2.0]))
    def extend(self, data, seconds):
        message = data.draw(st.sampled_from(self.held))
        self._fire()
        current = self._current(message)
        assert message.extend(seconds) == current
        if current:
            self._timer(self.clock.now + seconds, "deadline", message.id)

    @rule(seconds=st.sampled_from([0.125, 0.375, 1.0]))
    def advance(self, seconds):
        self.clock.now += seconds

    @invariant()
    def stats_match(self):
        self._fire()
        stats = self.broker.stats("t")
        states = [m["state"] for m in self.messages.values()]
        assert stats["in_flight"] == states.count("flight")
        assert stats["delayed"] == states.count("delayed")
        assert stats["ready"] == states.count("ready") + states.count(
            "hidden")
        assert stats["acked"] == self.acked
        assert stats["dead_lettered"] == self.dead
        assert stats["dlq"] == self.dead
        assert stats["published"] == len(self.messages)

    def teardown(self):
        self.broker.close()


BrokerModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None)
test_broker_matches_model = BrokerModel.TestCase
