"""The broker contract, run against every backend of conftest.py.

Times use the real clock with short ack timeouts and generous upper
bounds, so that the same tests fit backends in other processes.
"""

import asyncio
import collections
import copy
import gc
import json
import logging
import multiprocessing
import os
import pickle
import random
import re
import subprocess
import sys
import signal
import threading
import time
import uuid
import weakref

import pytest

import mqs
from loop_ticks import ticking
from mqs.broker._backend import Backend
from mqs.broker._memory import MemoryBackend

import broker_children


def drain(consumer, limit=10_000):
    """Get and ack everything ready now; return the bodies in order."""
    bodies = []
    while len(bodies) < limit:
        try:
            message = consumer.get(timeout=0)
        except mqs.Empty:
            return bodies
        bodies.append(message.body)
        assert message.ack()
    return bodies


class Unorderable:
    """A body that raises if anything compares it."""

    def __init__(self, n):
        self.n = n

    def __lt__(self, other):
        raise AssertionError("payloads must never be compared")

    __gt__ = __le__ = __ge__ = __lt__


# Lanes and order.

def test_fifo_within_priority(broker):
    broker.publish_many("t", range(50))
    consumer = broker.consume("t", "g")
    assert drain(consumer) == list(range(50))


def test_equal_priorities_never_compare_payloads(broker):
    bodies = [Unorderable(i) for i in range(20)]
    for body in bodies:
        broker.publish("t", body, priority=4)
    consumer = broker.consume("t", "g")
    assert [body.n for body in drain(consumer)] == list(range(20))


def test_strict_policy_serves_highest_lane_first(broker):
    broker.declare_topic("t", policy="strict")
    for i in range(30):
        broker.publish("t", i, priority=i % 10)
    consumer = broker.consume("t", "g")
    got = drain(consumer)
    priorities = [body % 10 for body in got]
    assert priorities == sorted(priorities, reverse=True)
    assert [body for body in got if body % 10 == 3] == [3, 13, 23]


def test_priority_maps_to_highest_lane_at_or_below(broker):
    broker.declare_topic("t", weights={9: 1, 5: 1, 0: 1}, policy="strict")
    broker.publish("t", "p3", priority=3)
    broker.publish("t", "p7", priority=7)
    broker.publish("t", "p5", priority=5)
    broker.publish("t", "p9", priority=9)
    consumer = broker.consume("t", "g")
    # 7 and 5 share lane 5 in publish order; 3 is in lane 0.
    assert drain(consumer) == ["p9", "p7", "p5", "p3"]


def test_weighted_share_within_five_percent_under_saturation(broker):
    weights = {9: 8, 5: 4, 0: 1}
    broker.declare_topic("t", weights=weights)
    per_lane = 2000
    for priority in weights:
        broker.publish_many("t", [priority] * per_lane, priority=priority)
    consumer = broker.consume("t", "g", auto_ack=True)
    taken = 1300  # every lane stays non-empty for all of these
    counts = collections.Counter(
        message.body for message in consumer.get_many(taken, timeout=0))
    assert sum(counts.values()) == taken
    total_weight = sum(weights.values())
    for priority, weight in weights.items():
        share = counts[priority] / taken
        assert abs(share - weight / total_weight) <= 0.05 * weight \
            / total_weight, (priority, counts)


def test_weighted_policy_never_starves_lowest_lane(broker):
    broker.declare_topic("t")
    broker.publish_many("t", ["high"] * 500, priority=9)
    broker.publish("t", "low", priority=0)
    consumer = broker.consume("t", "g", auto_ack=True)
    bodies = [m.body for m in consumer.get_many(60, timeout=0)]
    # Default weights: lane 9 gets 10 turns, lane 0 gets 1 per round.
    assert "low" in bodies


def get_one_at_a_time(consumer, count):
    """Get and ack `count` messages one by one; return their bodies."""
    bodies = []
    for _ in range(count):
        message = consumer.get(timeout=5)
        bodies.append(message.body)
        assert message.ack()
    return bodies


@pytest.mark.parametrize("weights, priorities, expected", [
    ({9: 8, 5: 4, 0: 1}, (0, 5, 9, 0, 5, 9), (9, 9, 5, 5, 0, 0)),
    (None, (0, 1, 5, 9), (9, 5, 1, 0)),
])
def test_weighted_first_round_highest_first(
        broker, weights, priorities, expected):
    if weights is not None:
        broker.declare_topic("t", weights=weights)
    for priority in priorities:
        broker.publish("t", priority, priority=priority)
    consumer = broker.consume("t", "g", prefetch=1)
    assert get_one_at_a_time(consumer, len(priorities)) == list(expected)


def test_weighted_rounds_exact_from_start(broker):
    broker.declare_topic("t", weights={9: 8, 5: 4, 0: 1})
    for priority in (0, 5, 9):
        broker.publish_many("t", [priority] * 300, priority=priority)
    consumer = broker.consume("t", "g", auto_ack=True)
    bodies = [m.body for m in consumer.get_many(13 * 20, timeout=0)]
    assert bodies[:13] == [9] * 8 + [5] * 4 + [0]
    assert collections.Counter(bodies) == {9: 160, 5: 80, 0: 20}


def test_idle_lane_returns_without_burst(broker):
    broker.declare_topic("t", weights={9: 3, 5: 2, 0: 1})
    broker.publish_many("t", [9] * 200, priority=9)
    broker.publish_many("t", [0] * 200, priority=0)
    consumer = broker.consume("t", "g", prefetch=1)
    # Ten rounds of 9, 9, 9, 0 while lane 5 is idle.
    assert get_one_at_a_time(consumer, 40) == [9, 9, 9, 0] * 10
    broker.publish_many("t", [5] * 100, priority=5)
    bodies = get_one_at_a_time(consumer, 60)
    # Lane 5 gets its weight per round and no credit for the idle rounds.
    assert bodies[:6] == [9, 9, 9, 5, 5, 0]
    assert collections.Counter(bodies) == {9: 30, 5: 20, 0: 10}
    longest_run = max(len(run) for run in "".join(
        "x" if body == 5 else " " for body in bodies).split())
    assert longest_run == 2


# Keys.

def test_key_delivers_in_publish_order_one_at_a_time(broker):
    for i in range(3):
        broker.publish("t", f"a{i}", key="a", priority=i * 4)
    broker.publish("t", "b0", key="b")
    first = broker.consume("t", "g", prefetch=10)
    second = broker.consume("t", "g", prefetch=10)
    got = first.get_many(10, timeout=0)
    assert sorted(m.body for m in got) == ["a0", "b0"]
    with pytest.raises(mqs.Empty):
        second.get(timeout=0)
    for message in got:
        message.ack()
    assert second.get(timeout=0).body == "a1"
    with pytest.raises(mqs.Empty):
        first.get(timeout=0)


def test_key_keeps_order_across_nack(broker):
    for i in range(3):
        broker.publish("t", i, key="k")
    consumer = broker.consume("t", "g", prefetch=5)
    message = consumer.get(timeout=0)
    assert message.body == 0
    message.nack(delay=0)
    again = consumer.get_many(5, timeout=0)
    assert [(m.body, m.attempts) for m in again] == [(0, 2)]
    again[0].ack()
    assert drain(consumer) == [1, 2]


# TTL and capacity.

def test_ttl_drops_and_counts(broker):
    broker.declare_topic("t", ttl=0.05)
    broker.publish("t", "old")
    broker.publish("t", "fresh", ttl=30)
    time.sleep(0.1)
    consumer = broker.consume("t", "g")
    assert drain(consumer) == ["fresh"]
    assert broker.stats("t")["expired"] == 1


def test_ttl_dead_letters_when_asked(broker):
    broker.declare_topic("t", ttl=0.05, on_expire="dead_letter")
    consumer = broker.consume("t", "g")
    broker.publish("t", "old")
    time.sleep(0.1)
    assert drain(consumer) == []
    letters = broker.dlq_list("t")
    assert [letter.body for letter in letters] == ["old"]
    assert letters[0].headers["mqs.dead_letter_reason"] == "expired"
    assert broker.stats("t")["dead_lettered.expired"] == 1


def test_ttl_expires_when_group_reaches_message(broker):
    """A message past its ttl stays counted as ready until a get of its
    group reaches it. It then expires for that group alone, and each
    group counts it in `expired`."""
    broker.declare_topic("t", ttl=0.05)
    first = broker.consume("t", "A")
    second = broker.consume("t", "B")
    broker.publish("t", "old")
    time.sleep(0.1)
    stats = broker.stats("t")
    assert stats["ready"] == 2
    assert stats["expired"] == 0
    assert drain(first) == []
    stats = broker.stats("t")
    assert stats["ready"] == 1
    assert stats["expired"] == 1
    assert drain(second) == []
    stats = broker.stats("t")
    assert stats["ready"] == 0
    assert stats["stored"] == 0
    assert stats["expired"] == 2


def test_delay_past_topic_ttl_rejected(broker):
    """The ttl counts from the publish, so a message delayed as long as
    its ttl or longer could never be delivered."""
    broker.declare_topic("t", ttl=0.2)
    consumer = broker.consume("t", "g")
    match = (r"delay 1 s is not shorter than the ttl 0.2 s of topic 't'.*"
             r"pass a ttl longer than the delay")
    with pytest.raises(ValueError, match=match):
        broker.publish("t", "never", delay=1)
    with pytest.raises(ValueError, match="delay 0.2 s is not shorter"):
        broker.publish("t", "never", delay=0.2)
    with pytest.raises(ValueError, match="than the ttl 0.2 s of topic"):
        broker.publish("t", "never", at=time.time() + 5)
    with pytest.raises(ValueError, match=match):
        broker.publish_many("t", ["never", "never"], delay=1)
    with pytest.raises(ValueError, match=match):
        asyncio.run(broker.publish_async("t", "never", delay=1))
    producer = broker.producer("t", linger=0)
    with pytest.raises(ValueError, match=match):
        producer.publish("never", delay=1)
    producer.close()
    stats = broker.stats("t")
    assert stats["published"] == 0
    assert stats["expired"] == 0

    # A ttl of the message's own, longer than the delay, makes it valid.
    broker.publish("t", "due", delay=0.3, ttl=30)
    message = consumer.get(timeout=10)
    assert message.body == "due"
    assert message.ack()
    assert broker.stats("t")["expired"] == 0


def test_delay_past_message_ttl_rejected(broker):
    consumer = broker.consume("t", "g")
    with pytest.raises(ValueError, match=(
            r"delay 1 s is not shorter than the message's ttl 0.5 s")):
        broker.publish("t", "never", delay=1, ttl=0.5)
    broker.publish("t", "due", delay=0.1, ttl=30)
    message = consumer.get(timeout=10)
    assert message.body == "due"
    assert message.ack()
    assert broker.stats("t")["published"] == 1


def test_when_full_raise(broker):
    broker.declare_topic("t", maxsize=2, when_full="raise")
    broker.publish_many("t", [1, 2])
    with pytest.raises(mqs.Full, match="maxsize 2"):
        broker.publish("t", 3)
    with pytest.raises(mqs.Full) as info:
        broker.publish_many("t", [4, 5])
    assert info.value.accepted == 0


def test_when_full_block_times_out_then_succeeds(broker):
    broker.declare_topic("t", maxsize=1)
    consumer = broker.consume("t", "g")
    broker.publish("t", 1)
    started = time.monotonic()
    with pytest.raises(mqs.Full):
        broker.publish("t", 2, timeout=0.1)
    assert time.monotonic() - started >= 0.1
    consumer.get(timeout=0).ack()
    broker.publish("t", 2, timeout=0)


def test_when_full_block_wakes_on_ack(broker):
    broker.declare_topic("t", maxsize=1)
    consumer = broker.consume("t", "g")
    broker.publish("t", 1)
    message = consumer.get(timeout=0)
    timer = threading.Timer(0.1, message.ack)
    timer.start()
    broker.publish("t", 2, timeout=10)
    timer.join()
    assert consumer.get(timeout=1).body == 2


def test_when_full_drop_oldest_counts(broker):
    broker.declare_topic("t", maxsize=3, when_full="drop_oldest")
    consumer = broker.consume("t", "g", prefetch=5)
    broker.publish_many("t", range(3))
    held = consumer.get(timeout=0)  # in flight, so never dropped
    broker.publish_many("t", [3, 4])
    assert broker.stats("t")["dropped_full"] == 2
    assert held.ack()
    assert drain(consumer) == [3, 4]


# Acknowledgement.

def test_prefetch_caps_unacked_messages(broker):
    broker.publish_many("t", range(10))
    consumer = broker.consume("t", "g", prefetch=3)
    got = consumer.get_many(10, timeout=0)
    assert [m.body for m in got] == [0, 1, 2]
    assert consumer.in_flight == 3
    with pytest.raises(mqs.Empty):
        consumer.get(timeout=0.05)
    got[0].ack()
    assert consumer.get(timeout=0).body == 3


def test_auto_ack_is_never_redelivered(broker):
    broker.publish_many("t", range(3))
    consumer = broker.consume("t", "g", auto_ack=True, ack_timeout=0.05)
    assert [m.body for m in consumer.get_many(5, timeout=0)] == [0, 1, 2]
    time.sleep(0.1)
    with pytest.raises(mqs.Empty):
        consumer.get(timeout=0)
    stats = broker.stats("t")
    assert stats["acked"] == 3
    assert stats["in_flight"] == 0


def test_missed_ack_deadline_redelivers_with_attempts_plus_one(broker):
    broker.publish("t", "job")
    # Long enough that a loaded machine acks the second delivery in time.
    consumer = broker.consume("t", "g", ack_timeout=0.5)
    first = consumer.get(timeout=0)
    assert first.attempts == 1
    second = consumer.get(timeout=5)
    assert second.body == "job"
    assert second.attempts == 2
    assert not first.ack()  # stale delivery
    assert second.ack()
    stats = broker.stats("t")
    assert stats["redelivered"] == 1
    assert stats["late_acks"] == 1


def test_ack_many_acks_every_message(broker):
    broker.publish_many("t", ["a", "b", "c"])
    consumer = broker.consume("t", "g", prefetch=3)
    got = consumer.get_many(3, timeout=0)
    assert consumer.ack_many(got) == 3
    assert consumer.in_flight == 0
    assert broker.stats("t")["acked"] == 3
    with pytest.raises(mqs.AlreadySettled):
        consumer.ack_many(got[:1])


def test_ack_many_counts_late_acks(broker):
    broker.publish_many("t", ["a", "b"])
    consumer = broker.consume("t", "g", prefetch=2, ack_timeout=0.05)
    got = consumer.get_many(2, timeout=0)
    time.sleep(0.15)
    assert consumer.ack_many(got) == 0
    assert broker.stats("t")["late_acks"] == 2


def test_ack_many_rejects_other_consumers_message(broker):
    broker.publish("t", "a")
    mine = broker.consume("t", "g")
    other = broker.consume("t", "g")
    message = mine.get(timeout=0)
    with pytest.raises(ValueError, match="another consumer"):
        other.ack_many([message])
    assert message.ack()


def test_ack_many_rejects_non_message(broker):
    broker.publish("t", "a")
    consumer = broker.consume("t", "g")
    message = consumer.get(timeout=0)
    with pytest.raises(TypeError, match="ack_many takes Message objects "
                                        "received from this consumer, "
                                        "got int 1"):
        consumer.ack_many([message, 1, 2])
    assert consumer.in_flight == 1
    assert consumer.ack_many([message]) == 1


def test_extend_pushes_deadline(broker):
    broker.publish("t", "job")
    consumer = broker.consume("t", "g", ack_timeout=0.1)
    message = consumer.get(timeout=0)
    assert message.extend(30)
    time.sleep(0.25)
    with pytest.raises(mqs.Empty):
        consumer.get(timeout=0)
    assert message.ack()
    assert broker.stats("t")["redelivered"] == 0


def test_second_ack_raises(broker):
    broker.publish("t", 1)
    message = broker.consume("t", "g").get(timeout=0)
    message.ack()
    with pytest.raises(mqs.AlreadySettled, match="once"):
        message.nack()
    assert message.extend(10) is False


def _fail_once(backend, monkeypatch, name):
    """Make the backend method `name` raise ConnectionError at its first
    call and work from the second; return the list of calls."""
    method = getattr(backend, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise ConnectionError(f"{name}: connection lost")
        return method(*args, **kwargs)

    monkeypatch.setattr(backend, name, failing)
    return calls


@pytest.mark.parametrize("verb", ["ack", "nack", "ack_many"])
def test_failed_settle_can_be_retried(broker, monkeypatch, verb):
    broker.publish("t", 1)
    consumer = broker.consume("t", "g", ack_timeout=60)
    # get_many wraps the backend's Delivery, whose settling goes through
    # the backend methods patched here (also on shm).
    message = consumer.get_many(1, timeout=5)[0]
    settle = {
        "ack": message.ack,
        "nack": lambda: message.nack(requeue=False),
        "ack_many": lambda: consumer.ack_many([message]),
    }[verb]
    calls = _fail_once(broker.backend, monkeypatch, verb)

    with pytest.raises(ConnectionError, match="connection lost"):
        settle()
    assert message._settled is False
    assert settle() in (True, 1)
    assert len(calls) == 2
    with pytest.raises(mqs.AlreadySettled):
        message.ack()
    stats = broker.stats("t")
    assert stats["in_flight"] == 0
    if verb == "nack":
        assert stats["dlq"] == 1
    else:
        assert stats["acked"] == 1


@pytest.mark.parametrize("verb", ["ack", "nack", "ack_many"])
def test_settle_after_close_stays_unsettled(broker, verb):
    broker.publish("t", 1)
    consumer = broker.consume("t", "g")
    message = consumer.get(timeout=5)
    settle = {
        "ack": message.ack,
        "nack": message.nack,
        "ack_many": lambda: consumer.ack_many([message]),
    }[verb]
    broker.close()

    with pytest.raises(mqs.ShutDown):
        settle()
    # The failed call settled nothing, so the next one raises ShutDown
    # again, not AlreadySettled.
    with pytest.raises(mqs.ShutDown):
        message.ack()


def test_auto_ack_message_ack_is_noop_and_nack_raises(broker):
    broker.publish("t", 1)
    message = broker.consume("t", "g", auto_ack=True).get(timeout=0)
    assert message.ack()
    with pytest.raises(mqs.AlreadySettled, match="auto_ack"):
        message.nack()


def test_dedup_within_window(broker):
    broker.declare_topic("t", dedup_window=0.2)
    first = broker.publish("t", "a", dedup_id="x")
    assert broker.publish("t", "a again", dedup_id="x") == first
    assert broker.stats("t")["deduplicated"] == 1
    time.sleep(0.3)
    assert broker.publish("t", "a later", dedup_id="x") != first
    consumer = broker.consume("t", "g")
    assert drain(consumer) == ["a", "a later"]


def test_nack_requeues_at_lane_tail(broker):
    broker.publish_many("t", ["a", "b", "c"])
    consumer = broker.consume("t", "g")
    message = consumer.get(timeout=0)
    assert message.body == "a"
    assert message.nack(delay=0)
    assert drain(consumer) == ["b", "c", "a"]


def test_nack_delay_hides_message_until_due(broker):
    broker.publish("t", "a")
    consumer = broker.consume("t", "g")
    consumer.get(timeout=0).nack(delay=0.2)
    with pytest.raises(mqs.Empty):
        consumer.get(timeout=0.05)
    started = time.monotonic()
    again = consumer.get(timeout=5)
    assert again.attempts == 2
    assert time.monotonic() - started < 4


def test_nack_uses_topic_backoff(broker):
    broker.declare_topic("t", retry=mqs.Backoff(base=0.2, factor=2, max=1,
                                                 jitter=0))
    broker.publish("t", "a")
    consumer = broker.consume("t", "g")
    message = consumer.get(timeout=0)
    # Measured from before the nack: a loaded machine may spend longer
    # than a short get timeout inside the nack itself.
    started = time.monotonic()
    message.nack()
    again = consumer.get(timeout=5)
    assert again.attempts == 2
    # 0.19, not 0.2: the redis backend times the delay on the server.
    assert time.monotonic() - started >= 0.19


def test_max_attempts_dead_letters_with_headers(broker):
    broker.declare_topic("t", max_attempts=3)
    broker.publish("t", "poison", headers={"trace": "t1"})
    consumer = broker.consume("t", "g")
    for attempt in (1, 2, 3):
        message = consumer.get(timeout=0)
        assert message.attempts == attempt
        message.nack(delay=0, error=RuntimeError(f"boom {attempt}"))
    with pytest.raises(mqs.Empty):
        consumer.get(timeout=0)
    (letter,) = broker.dlq_list("t")
    assert letter.body == "poison"
    assert letter.reason == "max_attempts"
    assert letter.headers["mqs.attempts"] == 3
    assert letter.headers["mqs.last_error"] == "RuntimeError: boom 3"
    assert letter.headers["trace"] == "t1"
    assert broker.stats("t")["dead_lettered.max_attempts"] == 1


def test_consume_rejects_surrogate_group(broker):
    broker.declare_topic("t")
    for group in ["\udc80", "orders-\ud800"]:
        with pytest.raises(ValueError, match="lone surrogate") as caught:
            broker.consume("t", group)
        assert repr(group) in str(caught.value)
    assert broker.stats("t")["groups"] == 0
    broker.publish("t", "a")
    message = broker.consume("t", "g").get(timeout=5)
    assert message.body == "a"


def test_consume_rejects_prefetch_over_limit(broker):
    broker.declare_topic("t")
    for prefetch in [2**32, 10**12]:
        with pytest.raises(ValueError, match="prefetch must be at most "
                           "4294967295") as raised:
            broker.consume("t", "g", prefetch=prefetch)
        assert str(prefetch) in str(raised.value)
    assert broker.stats("t")["groups"] == 0
    consumer = broker.consume("t", "g", prefetch=2**32 - 1)
    broker.publish_many("t", range(3))
    messages = consumer.get_many(10, timeout=5)
    assert [message.body for message in messages] == [0, 1, 2]


def test_declare_rejects_maxsize_over_limit(broker):
    for maxsize in [2**63, 2**64]:
        with pytest.raises(mqs.TopicConfigError,
                           match="maxsize must be at most") as raised:
            broker.declare_topic("t", maxsize=maxsize)
        assert str(maxsize) in str(raised.value)
    assert "t" not in broker.topics()
    broker.declare_topic("t", maxsize=2**63 - 1, when_full="raise")
    broker.consume("t", "g").close()
    broker.publish_many("t", range(3))
    assert broker.topic_config("t").maxsize == 2**63 - 1
    assert broker.stats("t")["stored"] == 3


def test_dlq_list_takes_huge_limit(broker):
    broker.declare_topic("t", max_attempts=1)
    broker.publish_many("t", ["a", "b"])
    consumer = broker.consume("t", "g", prefetch=2)
    for message in consumer.get_many(2, timeout=5):
        message.nack(requeue=False)
    for limit in [2**53, 2**63 - 1, 2**64]:
        letters = broker.dlq_list("t", limit=limit)
        assert [letter.body for letter in letters] == ["a", "b"]
    assert len(broker.dlq_list("t", limit=1)) == 1


def test_nack_error_with_lone_surrogate(broker):
    # os.fsdecode turns undecodable bytes of a file name into lone
    # surrogates, which strict UTF-8 cannot encode.
    text = "cannot read " + os.fsdecode(b"/data/\xff") + " or \ud800"
    broker.declare_topic("t", max_attempts=1)
    broker.publish("t", "poison")
    consumer = broker.consume("t", "g")
    message = consumer.get(timeout=0)
    assert message.nack(error=OSError(text)) is True
    (letter,) = broker.dlq_list("t")
    assert letter.headers["mqs.last_error"] == f"OSError: {text}"
    assert letter.error == f"OSError: {text}"
    assert broker.stats("t")["dead_lettered.max_attempts"] == 1


def test_consume_max_attempts_overrides_topic(broker):
    broker.publish("t", "poison")
    consumer = broker.consume("t", "g", max_attempts=1, ack_timeout=0.05)
    consumer.get(timeout=0)
    deadline = time.monotonic() + 5
    while not broker.dlq_list("t") and time.monotonic() < deadline:
        with pytest.raises(mqs.Empty):
            consumer.get(timeout=0.05)
    (letter,) = broker.dlq_list("t")
    assert letter.reason == "ack_timeout"
    assert letter.attempts == 1


def test_dlq_redrive_resets_attempts(broker):
    broker.publish_many("t", ["x", "y"])
    consumer = broker.consume("t", "g", prefetch=2)
    for message in consumer.get_many(2, timeout=0):
        message.nack(requeue=False)
    letters = broker.dlq_list("t")
    assert [letter.body for letter in letters] == ["x", "y"]
    assert broker.dlq_redrive("t", [letters[1].id]) == 1
    again = consumer.get(timeout=0)
    assert (again.body, again.attempts) == ("y", 1)
    again.ack()
    assert broker.dlq_purge("t") == 1
    assert broker.dlq_list("t") == []
    assert broker.stats("t")["redriven"] == 1


def test_dlq_redrive_into_full_topic_keeps_letters(broker):
    """A redrive puts every letter back even past the topic's maxsize,
    so none is lost. Publishes then find the topic full until consumers
    bring it below maxsize again."""
    broker.declare_topic("t", maxsize=1, when_full="raise")
    consumer = broker.consume("t", "g")
    broker.publish("t", "failed")
    consumer.get(timeout=5).nack(requeue=False)
    broker.publish("t", "waiting")
    assert broker.dlq_redrive("t") == 1
    stats = broker.stats("t")
    assert stats["stored"] == 2
    assert stats["dlq"] == 0
    with pytest.raises(mqs.Full):
        broker.publish("t", "more")
    assert drain(consumer) == ["waiting", "failed"]
    broker.publish("t", "more")
    assert drain(consumer) == ["more"]


def test_dlq_list_limit(broker):
    broker.publish_many("t", ["x", "y", "z"])
    consumer = broker.consume("t", "g", prefetch=3)
    for message in consumer.get_many(3, timeout=0):
        message.nack(requeue=False)
    assert [letter.body for letter in broker.dlq_list("t")] == ["x", "y", "z"]
    assert [letter.body for letter in broker.dlq_list("t", 2)] == ["x", "y"]
    assert broker.dlq_list("t", 0) == []
    with pytest.raises(ValueError, match="limit must be 0 or more"):
        broker.dlq_list("t", -1)
    for bad in (1.5, "2", True):
        with pytest.raises(TypeError, match="limit must be an int or None"):
            broker.dlq_list("t", bad)
    assert len(broker.dlq_list("t")) == 3


def test_dlq_redrive_rejects_bare_id(broker):
    broker.publish_many("t", ["x", "y"])
    consumer = broker.consume("t", "g", prefetch=2)
    for message in consumer.get_many(2, timeout=0):
        message.nack(requeue=False)
    letters = broker.dlq_list("t")
    # A str would be iterated per character, and on the memory backend the
    # ids are "1" and "2", so "12" would redrive both messages.
    with pytest.raises(TypeError, match=r"pass \[.*\] for one id"):
        broker.dlq_redrive("t", letters[0].id + letters[1].id)
    with pytest.raises(TypeError, match="dead-letter ids must be str"):
        broker.dlq_redrive("t", [1])
    with pytest.raises(TypeError, match=r"iterable of dead-letter ids, "
                                        r"got int 5; pass a list"):
        broker.dlq_redrive("t", 5)
    assert len(broker.dlq_list("t")) == 2
    assert broker.dlq_redrive("t", []) == 0
    assert broker.dlq_redrive("t", (letter.id for letter in letters)) == 2
    assert broker.dlq_list("t") == []


# Set "broken" to make every Fragile fail to unpickle, as a body whose
# class the listing process cannot import would.
FRAGILE = {"broken": False}


def rebuild_fragile(value):
    if FRAGILE["broken"]:
        raise RuntimeError(f"cannot rebuild Fragile({value!r}) here")
    return Fragile(value)


class Fragile:
    """A body that always pickles, and unpickles only while
    FRAGILE["broken"] is false."""

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        return rebuild_fragile, (self.value,)


def dead_letter_all(broker, bodies, **publish_options):
    """Publish `bodies` to "t" and reject each one; return the group's
    consumer."""
    for body in bodies:
        broker.publish("t", body, **publish_options)
    consumer = broker.consume("t", "g", prefetch=len(bodies))
    for message in consumer.get_many(len(bodies), timeout=5):
        message.nack(requeue=False, error=ValueError("bad total"))
    return consumer


def test_dlq_list_keeps_undecodable_letter(broker, monkeypatch):
    dead_letter_all(broker, ["before", Fragile(7), "after"],
                    headers={"trace": "t1"})
    monkeypatch.setitem(FRAGILE, "broken", True)
    started = time.time()

    letters = broker.dlq_list("t")

    assert len(letters) == 3
    before, broken, after = letters
    assert (before.body, after.body) == ("before", "after")
    for letter in (before, after):
        assert letter.decode_error is None
        assert letter.raw_body is None
    assert broken.reason == "rejected"
    assert broken.attempts == 1
    assert broken.error == "ValueError: bad total"
    assert broken.headers["trace"] == "t1"
    assert broken.headers["mqs.dead_letter_reason"] == "rejected"
    assert broken.headers["mqs.attempts"] == 1
    assert broken.group == "g"
    assert started - 60 < broken.timestamp <= started
    if broker.backend.name == "memory":
        # The memory backend keeps the body object, so nothing decodes.
        assert broken.body.value == 7
        assert broken.decode_error is None
        assert broken.raw_body is None
    else:
        assert broken.body is None
        assert broken.decode_error == "RuntimeError: cannot rebuild " \
                                      "Fragile(7) here"
        monkeypatch.setitem(FRAGILE, "broken", False)
        assert pickle.loads(broken.raw_body).value == 7
        monkeypatch.setitem(FRAGILE, "broken", True)
    assert [letter.id for letter in broker.dlq_list("t", 2)] \
        == [before.id, broken.id]


def test_dlq_redrive_undecodable_letter_unchanged(broker, monkeypatch):
    consumer = dead_letter_all(broker, [Fragile(7), "other"])
    monkeypatch.setitem(FRAGILE, "broken", True)
    broken, other = broker.dlq_list("t")

    assert broker.dlq_redrive("t", [broken.id]) == 1

    assert [letter.id for letter in broker.dlq_list("t")] == [other.id]
    monkeypatch.setitem(FRAGILE, "broken", False)
    again = consumer.get(timeout=5)
    assert again.id == broken.id
    assert again.body.value == 7
    assert again.attempts == 1
    assert again.ack()


def test_dlq_purge_counts_undecodable_letters(broker, monkeypatch):
    dead_letter_all(broker, [Fragile(1), Fragile(2), "other"])
    monkeypatch.setitem(FRAGILE, "broken", True)

    assert broker.dlq_purge("t") == 3

    assert broker.dlq_list("t") == []
    assert broker.stats("t")["dlq_purged"] == 3


def test_release_returns_unseen_messages_to_lane_head(broker):
    broker.publish_many("t", range(4))
    consumer = broker.consume("t", "g", prefetch=4)
    backend = broker.backend
    found = backend.fetch("t", "g", consumer._id, 2, ack_timeout=30,
                          auto_ack=False, timeout=0)
    assert backend.release("t", "g", [d.tag for d in found]) == 2
    got = consumer.get_many(4, timeout=0)
    assert [(m.body, m.attempts) for m in got] == [
        (0, 1), (1, 1), (2, 1), (3, 1)]



MESSAGE_FIELDS = ("body", "id", "topic", "group", "priority", "attempts",
                  "key", "headers", "timestamp", "reply_to",
                  "correlation_id")
COPIERS = {
    "copy": copy.copy,
    "deepcopy": copy.deepcopy,
    "pickle": lambda message: pickle.loads(pickle.dumps(message)),
}


def test_message_copies_carry_fields(broker):
    # A plain message (an shm topic core keeps it) and one with options.
    broker.publish("t", b"raw", priority=3)
    broker.publish("t", {"n": [1, 2]}, priority=7, key="k",
                   headers={"h": "v"})
    consumer = broker.consume("t", "g", prefetch=2)
    originals = consumer.get_many(2, timeout=5)
    if len(originals) < 2:
        originals += consumer.get_many(1, timeout=5)
    assert sorted(m.priority for m in originals) == [3, 7]
    for message in originals:
        for method, copier in COPIERS.items():
            duplicate = copier(message)
            assert type(duplicate) is mqs.Message, method
            for name in MESSAGE_FIELDS:
                assert getattr(duplicate, name) == getattr(message, name), \
                    (method, name)
            assert repr(duplicate) == repr(message)
            if method == "copy":
                assert duplicate.body is message.body
            if method == "deepcopy" and message.priority == 7:
                assert duplicate.body is not message.body
                assert duplicate.headers is not message.headers
    assert [m.ack() for m in originals] == [True, True]


def test_message_copy_cannot_settle(broker):
    broker.publish("t", "x", reply_to="replies")
    consumer = broker.consume("t", "g", ack_timeout=60)
    message = consumer.get(timeout=5)
    for method, copier in COPIERS.items():
        duplicate = copier(message)
        with pytest.raises(mqs.MessageDetached, match=(
                f"message {message.id} of topic 't' is a copy .* which "
                f"cannot ack; ack the original message")):
            duplicate.ack()
        with pytest.raises(mqs.MessageDetached, match="cannot nack"):
            duplicate.nack()
        with pytest.raises(mqs.MessageDetached, match="cannot extend"):
            duplicate.extend(5)
        with pytest.raises(mqs.MessageDetached,
                           match=r"broker\.reply\(message, body\)"):
            duplicate.reply("answer")
        with pytest.raises(mqs.MessageDetached, match="cannot ack"):
            consumer.ack_many([duplicate])
        # A copy of a copy is detached too.
        with pytest.raises(mqs.MessageDetached):
            copier(duplicate).ack()

    # The copies changed nothing: the original still settles once.
    assert consumer.in_flight == 1
    assert message.ack()
    with pytest.raises(mqs.AlreadySettled):
        message.ack()
    assert broker.stats("t")["acked"] == 1
    assert broker.stats("t")["redelivered"] == 0


UNPICKLE_MESSAGE = """
import pickle, sys, mqs
message = pickle.load(sys.stdin.buffer)
assert type(message) is mqs.Message
try:
    message.ack()
except mqs.MessageDetached:
    print(message.id, message.body, message.priority, message.headers)
"""


def test_message_pickle_in_other_process(broker):
    broker.publish("t", "x", priority=4, headers={"h": 1})
    message = broker.consume("t", "g").get(timeout=5)
    result = subprocess.run(
        [sys.executable, "-c", UNPICKLE_MESSAGE],
        input=pickle.dumps(message), capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    expected = f"{message.id} x 4 {{'h': 1}}"
    assert result.stdout.decode().strip() == expected
    assert message.ack()


def _child_that_never_runs(broker):
    raise AssertionError("a broker reached a spawned child")


def test_broker_pickle_names_fix(broker):
    """Passing a broker, consumer or producer to a spawned process
    raises TypeError that names how to open the broker there."""
    name = broker.backend.name
    hint = {"shm": "open mqs.Broker(backend='shm', name=",
            "log": "open mqs.Broker(backend='log', path=",
            "redis": "open mqs.Broker(backend='redis', url=URL)",
            "memory": "open an shm or log broker in each process"}[name]
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=_child_that_never_runs, args=(broker,))
    with pytest.raises(TypeError) as raised:
        process.start()
    assert "cannot be pickled" in str(raised.value)
    assert hint in str(raised.value)
    consumer = broker.consume("t", "g")
    with pytest.raises(TypeError) as raised:
        pickle.dumps(consumer)
    assert "a consumer belongs to the process" in str(raised.value)
    assert hint in str(raised.value)
    assert "broker.consume('t', 'g') there" in str(raised.value)
    producer = broker.producer("t")
    with pytest.raises(TypeError) as raised:
        pickle.dumps(producer)
    assert "a producer belongs to the process" in str(raised.value)
    assert "broker.producer('t') there" in str(raised.value)
    producer.close()
    consumer.close()


# Delays.

def test_delay_is_never_early_and_wakes_blocked_get(broker):
    consumer = broker.consume("t", "g")
    broker.publish("t", "later", delay=0.2)
    started = time.monotonic()
    message = consumer.get(timeout=10)
    elapsed = time.monotonic() - started
    assert message.body == "later"
    assert 0.15 <= elapsed < 5


def test_delay_longer_than_ack_timeout_delivers_once(broker):
    consumer = broker.consume("t", "g", ack_timeout=0.05)
    broker.publish("t", "once", delay=0.2)
    message = consumer.get(timeout=10)
    message.ack()
    with pytest.raises(mqs.Empty):
        consumer.get(timeout=0.3)
    assert broker.stats("t")["delivered"] == 1


def test_delayed_batch_keeps_publish_order(broker):
    """Messages published together with one delay fall due at the same
    time and come out in publish order (Redis orders timers of equal
    time by their text, in which id "<ms>-10" sorts before "<ms>-9")."""
    consumer = broker.consume("t", "g", prefetch=1000)
    broker.publish_many("t", list(range(300)), delay=0.2)
    received = []
    deadline = time.monotonic() + 30
    while len(received) < 300 and time.monotonic() < deadline:
        batch = consumer.get_many(300, timeout=5)
        received += [message.body for message in batch]
        assert consumer.ack_many(batch) == len(batch)
    assert received == list(range(300))


def test_at_accepts_wall_clock_time(broker):
    consumer = broker.consume("t", "g")
    broker.publish("t", "at", at=time.time() + 0.1)
    with pytest.raises(mqs.Empty):
        consumer.get(timeout=0)
    assert consumer.get(timeout=5).body == "at"


# Groups.

def test_each_group_gets_every_message(broker):
    a = broker.consume("t", "a", auto_ack=True)
    b = broker.consume("t", "b", auto_ack=True)
    broker.publish_many("t", range(5))
    assert [m.body for m in a.get_many(10, timeout=0)] == list(range(5))
    assert [m.body for m in b.get_many(10, timeout=0)] == list(range(5))


def test_consumers_in_a_group_compete(broker):
    one = broker.consume("t", "g", prefetch=3)
    two = broker.consume("t", "g", prefetch=3)
    broker.publish_many("t", range(6))
    first = [m.body for m in one.get_many(6, timeout=0)]
    second = [m.body for m in two.get_many(6, timeout=0)]
    assert first == [0, 1, 2]
    assert second == [3, 4, 5]


def test_start_earliest_and_latest(broker):
    broker.consume("t", "first", auto_ack=True)
    broker.publish("t", "before")
    late = broker.consume("t", "late", start="latest", auto_ack=True)
    early = broker.consume("t", "early", start="earliest", auto_ack=True)
    broker.publish("t", "after")
    assert [m.body for m in late.get_many(5, timeout=0)] == ["after"]
    assert [m.body for m in early.get_many(5, timeout=0)] == [
        "before", "after"]


def test_retention_keeps_finished_messages_for_late_groups(broker):
    broker.declare_topic("t", retention=30)
    first = broker.consume("t", "first", auto_ack=True)
    broker.publish_many("t", ["a", "b"])
    assert [m.body for m in first.get_many(5, timeout=0)] == ["a", "b"]
    assert broker.stats("t")["stored"] == 2
    late = broker.consume("t", "late", start="earliest", auto_ack=True)
    assert [m.body for m in late.get_many(5, timeout=0)] == ["a", "b"]


def test_finished_messages_leave_without_retention(broker):
    first = broker.consume("t", "first", auto_ack=True)
    broker.publish_many("t", ["a", "b"])
    first.get_many(5, timeout=0)
    assert broker.stats("t")["stored"] == 0
    late = broker.consume("t", "late", start="earliest", auto_ack=True)
    with pytest.raises(mqs.Empty):
        late.get(timeout=0)


def test_latest_first_group_skips_backlog_counted(broker):
    broker.publish_many("t", [1, 2])
    consumer = broker.consume("t", "g", start="latest")
    assert drain(consumer) == []
    stats = broker.stats("t")
    assert stats["dropped_unsubscribed"] == 2
    assert stats["stored"] == 0


def test_first_group_gets_backlog(broker):
    broker.publish_many("t", [1, 2])
    consumer = broker.consume("t", "g")
    assert drain(consumer) == [1, 2]


# Rate limits.

def test_rate_limits_deliveries_after_burst(broker):
    broker.declare_topic("t", rate=mqs.Rate(20, burst=5))
    broker.publish_many("t", range(50))
    consumer = broker.consume("t", "g", auto_ack=True)
    assert len(consumer.get_many(50, timeout=0)) == 5
    with pytest.raises(mqs.Empty):
        consumer.get(timeout=0)
    # A token comes every 50 ms; a blocked get waits for it.
    assert consumer.get(timeout=5).body == 5


def test_lane_rate_limits_only_that_lane(broker):
    broker.declare_topic("t", weights={9: 1, 0: 1},
                         rate={9: mqs.Rate(1, burst=1)})
    broker.publish_many("t", ["h"] * 5, priority=9)
    broker.publish_many("t", ["l"] * 5, priority=0)
    consumer = broker.consume("t", "g", auto_ack=True)
    bodies = [m.body for m in consumer.get_many(10, timeout=0)]
    assert bodies.count("h") == 1
    assert bodies.count("l") == 5


# Request-reply.

def test_request_reply(broker):
    consumer = broker.consume("rpc", "server")

    def serve():
        message = consumer.get(timeout=10)
        message.reply(message.body * 2)
        message.ack()

    server = threading.Thread(target=serve)
    server.start()
    reply = broker.request("rpc", 21, timeout=10)
    server.join()
    assert reply.body == 42


def test_request_times_out_and_late_reply_is_dropped(broker):
    consumer = broker.consume("rpc", "server")
    with pytest.raises(mqs.RequestTimeout, match="within 0.1 s"):
        broker.request("rpc", 1, timeout=0.1)
    message = consumer.get(timeout=0)
    assert message.reply("late") is False


# asyncio.

def test_async_get_does_not_block_loop(broker):
    consumer = broker.consume("t", "g")

    async def main():
        publisher.start()
        return await ticking(consumer.get_async(timeout=10))

    # Joined below: a backend in another process may see the publish
    # before the timer's thread has its reply.
    publisher = threading.Timer(0.2, broker.publish, ("t", "x"))
    message, ticks = asyncio.run(main())
    publisher.join()
    assert message.body == "x"
    assert ticks >= 5


def test_async_get_wakes_for_delayed_message(broker):
    consumer = broker.consume("t", "g")
    broker.publish("t", "d", delay=0.1)

    async def main():
        return await consumer.get_async(timeout=10)

    assert asyncio.run(main()).body == "d"


def test_async_get_times_out(broker):
    consumer = broker.consume("t", "g")

    async def main():
        with pytest.raises(mqs.Empty):
            await consumer.get_async(timeout=0.05)

    asyncio.run(main())


def test_async_get_cancel_takes_nothing(broker):
    # A held message keeps an ack deadline pending, so the waiters await
    # with a timeout. The publish wakes them in the same loop step that
    # cancels them.
    consumer = broker.consume("t", "g", prefetch=10, ack_timeout=60)
    broker.publish("t", "held")
    held = consumer.get(timeout=5)
    published = []
    received = []
    survivors = []

    async def one_round(number):
        tasks = [asyncio.create_task(consumer.get_async(timeout=30))
                 for _ in range(20)]
        await asyncio.sleep(0.02)
        broker.publish("t", number)
        published.append(number)
        for task in tasks:
            task.cancel()
        done, pending = await asyncio.wait(tasks, timeout=5)
        survivors.extend(pending)
        for task in pending:
            task.cancel()
        for task in done:
            if not task.cancelled():
                message = task.result()
                received.append(message.body)
                message.ack()

    async def main():
        stop = time.monotonic() + 10
        for number in range(40):
            if time.monotonic() > stop:
                break
            await one_round(number)

    asyncio.run(main())
    held.ack()
    ready = drain(consumer)
    assert survivors == []
    assert len(received) == len(set(received))
    assert sorted(received + ready) == published
    assert consumer.in_flight == 0


def test_async_for_and_publish_async(broker):
    consumer = broker.consume("t", "g")

    async def main():
        for i in range(3):
            await broker.publish_async("t", i)
        seen = []
        async for message in consumer:
            seen.append(message.body)
            message.ack()
            if len(seen) == 3:
                break
        return seen

    assert asyncio.run(main()) == [0, 1, 2]


def test_publish_async_waits_for_room(broker):
    broker.declare_topic("t", maxsize=1)
    consumer = broker.consume("t", "g")
    broker.publish("t", 1)

    async def main():
        held = consumer.get(timeout=0)
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, held.ack)
        await broker.publish_async("t", 2, timeout=10)

    asyncio.run(main())
    assert consumer.get(timeout=0).body == 2


def test_request_async_reply(broker):
    consumer = broker.consume("rpc", "server")

    async def main():
        loop = asyncio.get_running_loop()

        def serve():
            message = consumer.get(timeout=10)
            message.reply(message.body + 1)
            message.ack()

        server = loop.run_in_executor(None, serve)
        reply = await broker.request_async("rpc", 1, timeout=10)
        await server
        return reply

    reply = asyncio.run(main())
    assert reply.body == 2
    assert reply.correlation_id is not None


def test_request_async_times_out(broker):
    async def main():
        with pytest.raises(mqs.RequestTimeout):
            await broker.request_async("rpc", 1, timeout=0.05)

    asyncio.run(main())


def test_close_async_drains(broker):
    broker.publish("t", "a")
    consumer = broker.consume("t", "g")

    async def main():
        message = await consumer.get_async(timeout=1)
        asyncio.get_running_loop().call_later(0.05, message.ack)
        return await consumer.close_async(drain=True, timeout=10)

    assert asyncio.run(main()) == 0
    assert broker.stats("t")["acked"] == 1


# Close and drain.

def test_close_drain_waits_for_acks(broker):
    broker.publish("t", "a")
    consumer = broker.consume("t", "g")
    message = consumer.get(timeout=0)
    acker = threading.Timer(0.1, message.ack)
    acker.start()
    assert consumer.close(drain=True, timeout=10) == 0
    # A backend in another process may count the ack before the timer's
    # thread has its reply.
    acker.join()
    assert broker.stats("t")["acked"] == 1
    with pytest.raises(mqs.ShutDown):
        consumer.get(timeout=0)


def test_close_without_drain_returns_in_flight(broker):
    broker.publish_many("t", ["a", "b"])
    consumer = broker.consume("t", "g", prefetch=2)
    consumer.get_many(2, timeout=0)
    assert consumer.close(drain=False) == 2
    other = broker.consume("t", "g", prefetch=2)
    got = other.get_many(2, timeout=0)
    assert [(m.body, m.attempts) for m in got] == [("a", 2), ("b", 2)]


def test_close_wakes_blocked_get(broker):
    consumer = broker.consume("t", "g")
    errors = []

    def wait():
        try:
            consumer.get(timeout=10)
        except mqs.ShutDown as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.05)
    consumer.close()
    waiter.join(5)
    assert not waiter.is_alive()
    assert len(errors) == 1


def test_iteration_stops_when_closed(broker):
    broker.publish("t", 1)
    consumer = broker.consume("t", "g", auto_ack=True)
    bodies = []
    for message in consumer:
        bodies.append(message.body)
        consumer.close(drain=False)
    assert bodies == [1]


# Producer batching.

def test_producer_batch_size_and_flush(broker):
    consumer = broker.consume("t", "g", auto_ack=True)
    with broker.producer("t", linger=60, batch_size=3) as producer:
        producer.publish(1)
        producer.publish(2)
        with pytest.raises(mqs.Empty):
            consumer.get(timeout=0)
        producer.publish(3)
        assert len(producer.flush()) == 3
        producer.publish(4)
    assert [m.body for m in consumer.get_many(10, timeout=0)] == [1, 2, 3, 4]


def test_producer_linger_sends_in_background(broker):
    consumer = broker.consume("t", "g", auto_ack=True)
    producer = broker.producer("t", linger=0.05, batch_size=100)
    producer.publish("x", priority=5)
    message = consumer.get(timeout=10)
    assert (message.body, message.priority) == ("x", 5)
    producer.close()


def test_producer_full_publish_keeps_nothing(broker):
    broker.declare_topic("t", maxsize=1, when_full="raise")
    consumer = broker.consume("t", "g")
    producer = broker.producer("t", linger=60, batch_size=2)
    producer.publish(1)
    with pytest.raises(mqs.Full, match="did not keep this message"):
        producer.publish(2)  # the batch of 2 fills: 1 went in, 2 did not
    assert producer.flush() == []
    consumer.get(timeout=0).ack()
    producer.publish(2)  # the caller's retry
    assert len(producer.flush()) == 1
    assert consumer.get(timeout=0).body == 2
    with pytest.raises(mqs.Empty):
        consumer.get(timeout=0)
    producer.close()


def test_producer_full_retry_publishes_once(broker):
    broker.declare_topic("t", maxsize=2, when_full="raise")
    consumer = broker.consume("t", "g", prefetch=10)
    producer = broker.producer("t", linger=60, batch_size=1)
    producer.publish(1)
    producer.publish(2)
    with pytest.raises(mqs.Full, match="publish it again to retry"):
        producer.publish(3)
    for message in consumer.get_many(10, timeout=0):
        message.ack()
    producer.publish(3)
    producer.close()
    assert [m.body for m in consumer.get_many(10, timeout=0)] == [3]


def test_producer_full_keeps_earlier_messages(broker):
    broker.declare_topic("t", maxsize=1, when_full="raise")
    consumer = broker.consume("t", "g")
    broker.publish("t", 0)
    producer = broker.producer("t", linger=60, batch_size=2)
    producer.publish(1)
    with pytest.raises(mqs.Full, match="1 earlier message.* stay buffered"):
        producer.publish(2)
    consumer.get(timeout=0).ack()
    # 1 was accepted by its publish call, so it stays buffered.
    assert len(producer.flush()) == 1
    assert consumer.get(timeout=0).body == 1
    producer.close()



def test_producer_background_failures_logged_at_powers_of_ten(broker,
                                                              caplog):
    """A background send that keeps failing (a full topic that raises)
    logs its traceback once, then a count at 10 failures, and one line
    when the batch finally goes out."""
    broker.declare_topic("t", maxsize=1, when_full="raise")
    consumer = broker.consume("t", "g")
    broker.publish("t", 0)
    producer = broker.producer("t", linger=0.005, batch_size=100)
    logger_name = "mqs.broker._broker"
    with caplog.at_level(logging.INFO, logger=logger_name):
        producer.publish(1)
        deadline = time.monotonic() + 30
        while producer._batcher._failed_sends < 12:
            assert time.monotonic() < deadline, "the sends stopped failing"
            time.sleep(0.01)
        consumer.get(timeout=0).ack()
        assert consumer.get(timeout=30).body == 1
        deadline = time.monotonic() + 30
        while producer._batcher._failed_sends:
            assert time.monotonic() < deadline, "never counted the send"
            time.sleep(0.01)
    lines = [(record.levelno, record.getMessage()) for record in
             caplog.records if record.name == logger_name]
    failed = [message for level, message in lines
              if level == logging.WARNING]
    assert len(failed) == 2
    assert "tries again every" in failed[0]
    assert "failed to send a batch 10 times in a row" in failed[1]
    sent = [message for level, message in lines if level == logging.INFO]
    assert any("sent its batch after" in message for message in sent)
    producer.close()


def test_broker_close_publishes_producer_batches(broker, request):
    first = broker.producer("t", linger=60, batch_size=100)
    second = broker.producer("t", linger=60, batch_size=100)
    for body in ("a", "b", "c"):
        first.publish(body)
    second.publish("d", priority=5)
    other = _second_handle(broker, request)

    broker.close()
    assert first.closed
    assert second.closed
    assert (first.dropped, second.dropped) == (0, 0)
    # Their ids come back from the next flush or close.
    assert len(first.close()) == 3
    assert len(second.flush()) == 1
    with pytest.raises(mqs.ShutDown, match="closed producer"):
        first.publish("e")

    if other is None:
        return
    try:
        got = other.consume("t", "g", auto_ack=True).get_many(10, timeout=10)
        assert sorted(m.body for m in got) == ["a", "b", "c", "d"]
    finally:
        other.close()


def test_close_counts_dropped_producer_batch(broker, request, caplog):
    broker.declare_topic("t", maxsize=1, when_full="raise")
    consumer = broker.consume("t", "g")
    producer = broker.producer("t", linger=60, batch_size=100)
    for body in (1, 2, 3):
        producer.publish(body)
    other = _second_handle(broker, request)

    with caplog.at_level(logging.WARNING, logger="mqs.broker._broker"):
        with pytest.raises(mqs.ProducerFlushError,
                           match=r"dropped 2 buffered producer message") \
                as raised:
            broker.close()
    assert raised.value.dropped == 2
    assert raised.value.by_topic == {"t": 2}
    assert isinstance(raised.value.__cause__, mqs.Full)
    assert producer.dropped == 2
    assert producer.closed
    assert "dropped 2 buffered message(s)" in caplog.text
    # The rest of the close ran.
    assert consumer.closed
    with pytest.raises(mqs.ShutDown):
        broker.publish("t", 4)

    if other is None:
        return
    try:
        got = other.consume("t", "g", prefetch=5).get_many(5, timeout=10)
        assert [m.body for m in got] == [1]
    finally:
        other.close()


def test_collected_producer_publishes_batch(broker):
    consumer = broker.consume("t", "g", auto_ack=True)
    producer = broker.producer("t", linger=60, batch_size=100)
    producer.publish("a")
    producer.publish("b")
    batcher = producer._batcher
    thread = batcher._thread
    dead = weakref.ref(producer)
    del producer
    gc.collect()
    assert dead() is None

    # Sent at once, not after the 60 s linger.
    bodies = []
    while len(bodies) < 2:
        bodies += [m.body for m in consumer.get_many(10, timeout=10)]
    assert bodies == ["a", "b"]
    thread.join(10)
    assert not thread.is_alive()
    assert batcher.dropped == 0


def test_collected_idle_producer_ends_thread(broker):
    producer = broker.producer("t", linger=60, batch_size=2)
    producer.publish("a")
    producer.publish("b")  # a full batch goes out; the thread idles
    thread = producer._batcher._thread
    del producer
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()


def _use_inherited_producer(producer, results):
    """Call every method of a producer inherited through fork; send the
    name of what each call raised (or "returned") through `results`."""
    calls = {
        "publish": lambda: producer.publish("child"),
        "flush": producer.flush,
        "close": producer.close,
        "with": lambda: producer.__enter__(),
    }
    for name, call in calls.items():
        try:
            call()
            outcome = "returned"
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        results.send((name, outcome))
    # The child's copy of the batch is the parent's, so garbage collection
    # of the producer must not publish it either.
    del producer
    gc.collect()
    results.send(("done", ""))


def test_forked_child_rejects_parents_producer(broker):
    consumer = broker.consume("t", "g", auto_ack=True)
    producer = broker.producer("t", linger=60, batch_size=100)
    producer.publish("parent")
    # Fork while the producer's lock is held, as a fork during a
    # background send or a publish of another thread would. A child that
    # took the lock would wait forever.
    receiver, sender = broker_children.FORK.Pipe(duplex=False)
    with producer._batcher._lock:
        child = broker_children.start(_use_inherited_producer, producer,
                                      sender)
    broker_children.join(child, timeout=15)
    outcomes = {}
    while receiver.poll(0):
        name, outcome = receiver.recv()
        outcomes[name] = outcome
    assert set(outcomes) == {"publish", "flush", "close", "with", "done"}
    for name in ("publish", "flush", "close", "with"):
        assert outcomes[name].startswith("ProducerForked: "), outcomes[name]
        assert f"broker.producer('t')" in outcomes[name]
    assert issubclass(mqs.ProducerForked, RuntimeError)

    # The parent's producer works, and its message is published once.
    producer.publish("parent-2")
    assert len(producer.close()) == 2
    got = consumer.get_many(10, timeout=10)
    assert [message.body for message in got] == ["parent", "parent-2"]
    with pytest.raises(mqs.Empty):
        consumer.get(timeout=0.2)


@pytest.mark.stress
def test_close_races_producer_threads(broker, request, scale):
    # Every publish that returned is published by the close; the ones
    # after it raise ShutDown.
    producer = broker.producer("t", linger=0.002, batch_size=7)
    accepted = collections.Counter()
    per_thread = int(3000 * scale)
    started = threading.Barrier(5)

    def publish(thread_id):
        started.wait()
        for n in range(per_thread):
            try:
                producer.publish((thread_id, n))
            except mqs.ShutDown:
                return
            accepted[thread_id] += 1

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    other = _second_handle(broker, request)
    started.wait()
    time.sleep(0.05)
    broker.close()
    for thread in threads:
        thread.join(60)
    total = sum(accepted.values())
    assert producer.dropped == 0
    assert len(producer.close()) == total

    if other is None:
        return
    try:
        consumer = other.consume("t", "g", auto_ack=True)
        got = []
        while len(got) < total:
            got += [m.body for m in consumer.get_many(1000, timeout=10)]
        for thread_id in range(4):
            mine = [n for owner, n in got if owner == thread_id]
            assert mine == list(range(accepted[thread_id]))
    finally:
        other.close()


EXIT_PRODUCER = """
import atexit, json, sys, mqs
kind, options = sys.argv[1], json.loads(sys.argv[2])
broker = mqs.Broker(backend=kind, **options)
broker.declare_topic("full", maxsize=1, when_full="raise")
consumer = broker.consume("t", "g", auto_ack=True)

def check():
    # Registered before the producers, so it runs after their exit hook.
    got = consumer.get_many(10, timeout=10)
    print(json.dumps([[m.body for m in got], dropping.dropped]))

atexit.register(check)
producer = broker.producer("t", linger=60, batch_size=100)
producer.publish("a")
producer.publish("b")
dropping = broker.producer("full", linger=60, batch_size=100)
for body in (1, 2, 3):
    dropping.publish(body)
"""


EXIT_BLOCKED = """
import json, sys, threading, time, mqs
from mqs.broker import _broker
_broker._EXIT_TIMEOUT_S = 1.0
kind, options = sys.argv[1], json.loads(sys.argv[2])
broker = mqs.Broker(backend=kind, **options)
broker.declare_topic("full", maxsize=1, when_full="block")
broker.publish("full", 0)
# The background thread sends at once and blocks on the full topic.
stuck = broker.producer("full", linger=0, batch_size=100)
waiting = broker.producer("full", linger=60, batch_size=100)
waiting.publish(1)
threading.Thread(target=stuck.publish, args=(2,), daemon=True).start()
time.sleep(0.5)
"""


def test_exit_bounds_blocked_producer_wait(broker, request):
    backend = broker.backend
    options = _child_options(broker, request)
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", EXIT_BLOCKED, backend.name,
         json.dumps(options)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start < 60
    # One producer waited in vain for room, the other was in a publish.
    assert "dropped 1 buffered message(s)" in result.stderr
    assert "was still publishing when the interpreter exited; 1 " \
        in result.stderr


def _child_options(broker, request):
    """Return the options with which a child process opens the store of
    `broker` (a broker of its own for the memory backend)."""
    backend = broker.backend
    if backend.name == "shm":
        return {"name": backend.shm_name}
    if backend.name == "log":
        return {"path": str(backend.path)}
    if backend.name == "redis":
        return {"url": request.getfixturevalue("redis_url"),
                "namespace": request.getfixturevalue("redis_namespace"),
                "serializer": "pickle"}
    return {}


def test_producer_batch_published_at_exit(broker, request):
    backend = broker.backend
    result = subprocess.run(
        [sys.executable, "-c", EXIT_PRODUCER, backend.name,
         json.dumps(_child_options(broker, request))],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [["a", "b"], 2]
    assert "dropped 2 buffered message(s)" in result.stderr
    assert "the interpreter exited" in result.stderr


# Settings and errors.

def test_settings_are_stored_in_backend(broker):
    config = broker.declare_topic("t", weights={9: 3, 0: 1}, max_attempts=4)
    assert broker.topic_config("t") == config
    assert broker.declare_topic("t", weights={9: 3, 0: 1},
                                max_attempts=4) == config
    with pytest.raises(mqs.TopicConfigError, match="max_attempts"):
        broker.declare_topic("t", weights={9: 3, 0: 1}, max_attempts=5)
    changed = broker.declare_topic("t", weights={9: 3, 0: 1},
                                   max_attempts=5, replace=True)
    assert broker.topic_config("t").max_attempts == 5
    assert changed.max_attempts == 5


@pytest.mark.parametrize("change", [{"weights": {9: 1, 0: 1}},
                                    {"weights": {9: 3, 5: 1, 0: 1}},
                                    {"policy": "strict"}])
def test_replace_keeps_lanes_and_policy(broker, change):
    config = broker.declare_topic("t", weights={9: 3, 0: 1})
    settings = {"weights": {9: 3, 0: 1}, **change}
    with pytest.raises(mqs.TopicConfigError,
                       match="lanes and policy cannot change"):
        broker.declare_topic("t", replace=True, **settings)
    with pytest.raises(mqs.TopicConfigError, match="replace=True"):
        broker.declare_topic("t", **settings)
    assert broker.topic_config("t") == config


@pytest.mark.parametrize("kwargs, match", [
    ({"policy": "fair"}, "policy must be 'weighted' or 'strict', got 'fair'"),
    ({"weights": {10: 1}}, "priorities from 0 to 9, got 10"),
    ({"weights": {9: 0}}, "ints of 1 or more, got 0"),
    ({"weights": {}}, "non-empty dict"),
    ({"when_full": "wait"}, "got 'wait'"),
    ({"max_attempts": 0}, "max_attempts must be"),
    ({"max_attempts": 2**32},
     r"max_attempts must be from 1 to 4294967295 .*got 4294967296"),
    ({"weights": {9: 2**32, 0: 1}},
     r"from 1 to 4294967295 .*got 4294967296 for priority 9"),
    ({"ttl": 0}, "ttl must be above 0"),
    ({"ttl": 1e300}, r"ttl must be at most .*\(10 years\), got 1e\+300"),
    ({"ttl": float("inf")}, r"ttl must be at most .*, got inf"),
    # Dedup ids are kept for the window: forever would grow without end.
    ({"dedup_window": float("inf")},
     r"dedup_window must be at most .*\(10 years\), got inf"),
    ({"weights": {9: 1, 0: 1}, "rate": {5: 10}},
     r"rate keys must be lane priorities \[0, 9\], got 5"),
    ({"rate": 0}, "above 0, got 0"),
])
def test_declare_rejects_bad_settings(broker, kwargs, match):
    with pytest.raises(mqs.TopicConfigError, match=match):
        broker.declare_topic("t", **kwargs)


def test_declare_accepts_largest_counts(broker):
    config = broker.declare_topic("t", weights={9: 2**32 - 1, 0: 1},
                                  max_attempts=2**32 - 1)
    assert config.max_attempts == 2**32 - 1
    assert broker.topic_config("t").weight_map == {9: 2**32 - 1, 0: 1}
    consumer = broker.consume("t", "g", max_attempts=2**32 - 1)
    broker.publish("t", "x", priority=9)
    assert drain(consumer) == ["x"]


def test_consume_rejects_huge_max_attempts(broker):
    with pytest.raises(ValueError, match=r"from 1 to 4294967295 .*2\*\*32"):
        broker.consume("t", "g", max_attempts=2**32)
    assert broker.consume("t", "g", max_attempts=3) is not None


def test_publish_rejects_bad_priority(broker):
    with pytest.raises(mqs.InvalidPriority, match=r"0 to 9 .*got 10"):
        broker.publish("t", 1, priority=10)
    with pytest.raises(TypeError, match="priority must be an int"):
        broker.publish("t", 1, priority="high")


def test_unknown_topic_without_auto_declare(broker):
    strict = mqs.Broker(broker.backend, auto_declare=False)
    with pytest.raises(mqs.UnknownTopic, match="declare it first"):
        strict.publish("nope", 1)
    with pytest.raises(mqs.UnknownTopic, match="'nope'"):
        broker.dlq_list("nope")
    for call in (broker.dlq_list, broker.stats, broker.delete_topic):
        with pytest.raises(mqs.UnknownTopic,
                           match=r"declare_topic\('nope'\)"):
            call("nope")


@pytest.mark.parametrize("topic, match", [
    ("a\0b", "topic cannot contain a NUL character"),
    ("a\ud800", "topic must be valid UTF-8 text"),
    ("x" * 256, "topic must be at most 255 bytes in UTF-8, got 256 bytes"),
    ("\u00e9" * 128, "at most 255 bytes in UTF-8, got 256 bytes"),
])
def test_topic_name_checked(broker, topic, match):
    with pytest.raises(ValueError, match=match):
        broker.declare_topic(topic)
    with pytest.raises(ValueError, match=match):
        broker.publish(topic, 1)
    with pytest.raises(ValueError, match=match):
        broker.consume(topic, "g")
    assert broker.topics() == []


def test_topic_name_of_255_bytes_works(broker):
    topic = "\u00e9" * 127 + "x"
    broker.publish(topic, 1)
    assert drain(broker.consume(topic, "g")) == [1]
    assert broker.topics() == [topic]


@pytest.mark.parametrize("option", ["key", "dedup_id"])
def test_publish_rejects_unhashable_option(broker, option):
    broker.declare_topic("t")
    match = rf"{option} must be hashable, got list \[1\]"
    with pytest.raises(TypeError, match=match):
        broker.publish("t", 1, **{option: [1]})
    with pytest.raises(TypeError, match=match):
        broker.publish_many("t", [1, 2], **{option: [1]})
    with pytest.raises(TypeError, match=f"{option} must be hashable, got "
                                        f"tuple"):
        broker.publish("t", 1, **{option: ("a", [1])})
    assert broker.stats("t")["published"] == 0


@pytest.mark.parametrize("value", ["false", "no", 0, 1, None])
def test_bool_options_reject_non_bool(broker, value):
    match = (rf"must be True or False, got {type(value).__name__} "
             rf"{re.escape(repr(value))}")
    with pytest.raises(TypeError, match="auto_ack " + match):
        broker.consume("t", "g", auto_ack=value)
    with pytest.raises(TypeError, match="replace " + match):
        broker.declare_topic("t", replace=value)
    with pytest.raises(TypeError, match="auto_declare " + match):
        mqs.Broker(backend="memory", auto_declare=value)

    broker.publish("t", "job")
    consumer = broker.consume("t", "g", ack_timeout=60)
    message = consumer.get(timeout=5)
    with pytest.raises(TypeError, match="requeue " + match):
        message.nack(requeue=value)
    # The rejected nack settled nothing.
    assert message.nack(requeue=False) is True
    assert broker.stats("t")["dlq"] == 1

    with pytest.raises(TypeError, match="drain " + match):
        consumer.close(drain=value)
    with pytest.raises(TypeError, match="drain " + match):
        asyncio.run(consumer.close_async(drain=value))
    assert not consumer.closed
    consumer.close(drain=False)


@pytest.mark.parametrize("field", ["body", "key", "headers", "dedup_id"])
def test_unpicklable_field_raises_type_error(broker, field):
    if not broker.backend.pickles_messages:
        pytest.skip("the memory backend stores objects without pickling")
    broker.declare_topic("t")
    unpicklable = threading.Lock()
    options = {"body": "x"}
    if field == "headers":
        options["headers"] = {"lock": unpicklable}
    else:
        options[field] = unpicklable
    match = rf"{field} of a message to topic 't' cannot be pickled"

    with pytest.raises(TypeError, match=match) as raised:
        broker.publish("t", **options)
    assert raised.value.__cause__ is not None
    body = options.pop("body")
    # A dedup_id is valid for a batch of one body only.
    bodies = [body] if field == "dedup_id" else ["y", body]
    with pytest.raises(TypeError, match=match):
        broker.publish_many("t", bodies, **options)
    with pytest.raises(TypeError, match=match):
        asyncio.run(broker.publish_async("t", body, **options))
    assert broker.stats("t")["published"] == 0


class _PickleFails:
    """An object whose pickling raises an exception that pickle itself
    never raises."""

    def __reduce__(self):
        raise RuntimeError("no pickle")


@pytest.mark.parametrize("unpicklable", [threading.Lock, _PickleFails],
                         ids=["lock", "runtime_error"])
def test_producer_drops_unpicklable_message(broker, caplog, unpicklable):
    if not broker.backend.pickles_messages:
        pytest.skip("the memory backend stores objects without pickling")
    consumer = broker.consume("t", "g", auto_ack=True, prefetch=10)
    producer = broker.producer("t", linger=60, batch_size=100)
    producer.publish("a")
    producer.publish(unpicklable())
    producer.publish("b")
    with caplog.at_level(logging.WARNING, logger="mqs.broker._broker"):
        ids = producer.flush()
    # The other messages go out with the same flush.
    assert len(ids) == 2
    assert producer.dropped == 1
    warnings = [record for record in caplog.records
                if "cannot be pickled" in record.getMessage()]
    assert len(warnings) == 1
    producer.publish("c")
    assert len(producer.flush()) == 1
    producer.close()
    assert producer.dropped == 1
    got = consumer.get_many(10, timeout=5)
    assert [message.body for message in got] == ["a", "b", "c"]


def test_producer_background_drops_unpicklable(broker, caplog):
    if not broker.backend.pickles_messages:
        pytest.skip("the memory backend stores objects without pickling")
    consumer = broker.consume("t", "g", auto_ack=True, prefetch=10)
    producer = broker.producer("t", linger=0.01, batch_size=100)
    with caplog.at_level(logging.WARNING, logger="mqs.broker._broker"):
        producer.publish(_PickleFails())
        producer.publish("a")
        assert consumer.get(timeout=10).body == "a"
        time.sleep(0.1)  # several linger periods for any retry loop
        producer.publish("b")
        assert consumer.get(timeout=10).body == "b"
        producer.close()
    assert producer.dropped == 1
    logged = [record for record in caplog.records
              if record.name == "mqs.broker._broker"]
    assert len(logged) == 1
    assert "cannot be pickled (RuntimeError: no pickle)" \
        in logged[0].getMessage()


def test_producer_publish_raises_own_pickle_error(broker):
    if not broker.backend.pickles_messages:
        pytest.skip("the memory backend stores objects without pickling")
    consumer = broker.consume("t", "g", auto_ack=True, prefetch=10)
    producer = broker.producer("t", linger=60, batch_size=2)
    producer.publish("a")
    with pytest.raises(TypeError, match="body of a message to topic 't' "
                                        "cannot be pickled") as raised:
        producer.publish(_PickleFails())
    assert isinstance(raised.value.__cause__, RuntimeError)
    # The error reached the caller, so the message was not dropped later.
    assert producer.dropped == 0
    producer.close()
    assert [m.body for m in consumer.get_many(10, timeout=5)] == ["a"]


def test_publish_runtime_error_pickle_is_type_error(broker):
    if not broker.backend.pickles_messages:
        pytest.skip("the memory backend stores objects without pickling")
    broker.declare_topic("t")
    for options in ({}, {"priority": 3}):
        with pytest.raises(TypeError, match="body of a message") as raised:
            broker.publish("t", _PickleFails(), **options)
        assert isinstance(raised.value.__cause__, RuntimeError)
    with pytest.raises(TypeError, match="key of a message"):
        broker.publish("t", "x", key=_PickleFails())
    with pytest.raises(TypeError, match="headers of a message"):
        broker.publish("t", "x", headers={"h": _PickleFails()})
    with pytest.raises(TypeError, match="body of a message"):
        broker.publish_many("t", ["x", _PickleFails(), "y"])
    assert broker.stats("t")["published"] == 0


def test_backend_error_not_taken_for_pickling(broker, monkeypatch):
    broker.declare_topic("t")
    consumer = broker.consume("t", "g", auto_ack=True, prefetch=10)
    producer = broker.producer("t", linger=60, batch_size=100)
    producer.publish("a")
    producer.publish("b")
    real_publish = type(broker.backend).publish

    def unavailable(self, topic, envelopes, timeout):
        raise mqs.BackendUnavailable("backend down for the test")

    monkeypatch.setattr(type(broker.backend), "publish", unavailable)
    with pytest.raises(mqs.BackendUnavailable, match="down for the test"):
        producer.flush()
    with pytest.raises(mqs.BackendUnavailable, match="down for the test"):
        broker.publish("t", "c", key="k")
    monkeypatch.setattr(type(broker.backend), "publish", real_publish)
    # Both messages stayed buffered and nothing was dropped.
    assert producer.dropped == 0
    assert len(producer.flush()) == 2
    producer.close()
    assert [m.body for m in consumer.get_many(10, timeout=5)] == ["a", "b"]


def test_topics_lists_declared_sorted(broker):
    assert broker.topics() == []
    broker.declare_topic("orders")
    broker.declare_topic("audit:2026")
    broker.publish("billing", 1)  # declared on first use
    assert broker.topics() == ["audit:2026", "billing", "orders"]
    broker.delete_topic("orders")
    assert broker.topics() == ["audit:2026", "billing"]


def test_topics_after_close_fails(broker):
    broker.declare_topic("orders")
    broker.close()
    with pytest.raises(mqs.ShutDown, match="is closed"):
        broker.topics()


def test_unknown_backend_names_choices():
    with pytest.raises(mqs.BackendUnavailable, match="'memory'"):
        mqs.Broker(backend="sqs")
    with pytest.raises(mqs.BackendUnavailable, match="'shm'"):
        mqs.Broker(backend="sqs")


@pytest.mark.parametrize("backend, options, match", [
    ("log", {}, "missing a required argument: 'path'"),
    ("shm", {}, "missing a required argument: 'name'"),
    ("memory", {"path": "broker-dir"}, "unexpected keyword argument 'path'"),
    ("log", {"path": "broker-dir", "nmae": "x"},
     "unexpected keyword argument 'nmae'"),
])
def test_backend_options_checked(backend, options, match):
    with pytest.raises(TypeError, match=(
            rf"invalid options for backend='{backend}': .*{match}; the "
            rf"backend accepts .*; see help\(mqs.Broker\)")):
        mqs.Broker(backend=backend, **options)


@pytest.mark.parametrize("backend, accepted", [
    ("memory", "clock, sample_every"),
    ("shm", "name (required), journal_bytes"),
    ("log", "path (required), fsync, fsync_interval_s, segment_bytes, "
            "compact_bytes, sample_every, journal_bytes, sync_acks"),
])
def test_backend_option_error_lists_accepted(backend, accepted):
    with pytest.raises(TypeError) as error:
        mqs.Broker(backend=backend, colour="blue")
    message = str(error.value)
    assert "got an unexpected keyword argument 'colour'" in message
    assert f"backend='{backend}'" in message
    assert f"the backend accepts {accepted};" in message


def test_backend_option_error_suggests_name(tmp_path):
    with pytest.raises(TypeError) as error:
        mqs.Broker(backend="log", path=tmp_path / "broker", fsyncs="always")
    assert "'fsyncs' (did you mean 'fsync'?)" in str(error.value)
    assert not (tmp_path / "broker").exists()


def test_backend_option_error_names_every_unknown():
    with pytest.raises(TypeError) as error:
        mqs.Broker(backend="memory", path="x", colour="blue")
    assert ("got unexpected keyword arguments 'path', 'colour'"
            in str(error.value))


def test_backend_instance_rejects_options():
    backend = MemoryBackend()
    with pytest.raises(TypeError) as error:
        mqs.Broker(backend, clock=time.monotonic)
    message = str(error.value)
    assert "options ['clock'] apply only to a backend name" in message
    assert "MemoryBackend constructor" in message


def test_redis_backend_options_checked(redis_url):
    pytest.importorskip("redis")
    with pytest.raises(TypeError, match=(
            r"invalid options for backend='redis': got an unexpected "
            r"keyword argument 'nope'; the backend accepts url, serializer, "
            r".*; see help\(mqs.Broker\)")):
        mqs.Broker(backend="redis", url=redis_url, nope=1)


def test_delay_and_at_together_rejected(broker):
    with pytest.raises(ValueError, match="not both"):
        broker.publish("t", 1, delay=1, at=time.time())


@pytest.mark.parametrize("options", [
    {"delay": float("inf")},
    {"at": float("inf")},
])
def test_publish_rejects_infinite_delay(broker, options):
    consumer = broker.consume("t", "g")
    with pytest.raises(ValueError, match="finite"):
        broker.publish("t", "never", **options)
    with pytest.raises(ValueError, match="finite"):
        broker.publish_many("t", ["never"], **options)
    # The topic still works: nothing of the rejected publishes was stored.
    broker.publish("t", "ok")
    assert drain(consumer) == ["ok"]
    assert broker.stats("t")["published"] == 1


@pytest.mark.parametrize("options, match", [
    ({"delay": 1e300}, r"delay must be at most mqs.MAX_DELAY_SECONDS = "
                       r"315576000 seconds \(10 years\), got 1e\+300"),
    ({"delay": mqs.MAX_DELAY_SECONDS + 1}, "got 315576001"),
    ({"at": 1e300}, r"at must be at most .* from now, got 1e\+300"),
    ({"ttl": 1e300}, r"ttl must be at most .*, got 1e\+300"),
    ({"ttl": float("inf")}, "ttl must be a finite number"),
])
def test_publish_rejects_delay_past_limit(broker, options, match):
    consumer = broker.consume("t", "g")
    with pytest.raises(ValueError, match=match):
        broker.publish("t", "never", **options)
    with pytest.raises(ValueError, match=match):
        broker.publish_many("t", ["never"], **options)
    broker.publish("t", "ok")
    assert drain(consumer) == ["ok"]
    assert broker.stats("t")["published"] == 1


@pytest.mark.parametrize("options, error, match", [
    ({"reply_to": ""}, TypeError,
     "reply_to must be a topic name: topic must be a non-empty str"),
    ({"reply_to": 5}, TypeError, "reply_to must be a topic name"),
    ({"reply_to": "r\0"}, ValueError, "reply_to must be a topic name: .*NUL"),
    ({"correlation_id": 7}, TypeError,
     "correlation_id must be a str or None, got int 7"),
])
def test_publish_rejects_bad_reply_fields(broker, options, error, match):
    """A reply could never reach an empty or invalid reply_to. A
    correlation_id that is not a str would come back changed from some
    backends. Both raise before anything is stored."""
    consumer = broker.consume("t", "g")
    with pytest.raises(error, match=match):
        broker.publish("t", "never", **options)
    with pytest.raises(error, match=match):
        broker.publish_many("t", ["never"], **options)
    broker.publish("t", "ok", reply_to="r", correlation_id="c")
    message = consumer.get(timeout=5)
    assert (message.body, message.reply_to, message.correlation_id) == \
        ("ok", "r", "c")
    message.ack()
    assert broker.stats("t")["published"] == 1


def test_publish_accepts_max_delay(broker):
    consumer = broker.consume("t", "g")
    broker.publish("t", "late", delay=mqs.MAX_DELAY_SECONDS)
    broker.publish("t", "later", at=time.time() + mqs.MAX_DELAY_SECONDS - 60)
    broker.publish("t", "kept", ttl=mqs.MAX_DELAY_SECONDS)
    assert drain(consumer) == ["kept"]
    assert broker.stats("t")["published"] == 3


def test_deadlines_past_limit_rejected(broker):
    too_long = mqs.MAX_DELAY_SECONDS * 2
    with pytest.raises(ValueError, match="ack_timeout must be at most"):
        broker.consume("t", "g", ack_timeout=too_long)
    broker.publish("t", "x")
    consumer = broker.consume("t", "g")
    message = consumer.get(timeout=5)
    with pytest.raises(ValueError, match="seconds must be at most"):
        message.extend(too_long)
    with pytest.raises(ValueError, match=r"delay must be at most .*"
                                         r"\(10 years\), got 1e\+300"):
        message.nack(delay=1e300)
    assert message.nack(delay=0)
    assert consumer.get(timeout=5).body == "x"


def test_infinite_deadlines_rejected(broker):
    with pytest.raises(ValueError, match="ack_timeout must be a finite"):
        broker.consume("t", "g", ack_timeout=float("inf"))
    with pytest.raises(mqs.TopicConfigError, match="Backoff max"):
        mqs.Backoff(base=1, max=float("inf"))
    broker.publish("t", "x")
    consumer = broker.consume("t", "g")
    message = consumer.get(timeout=5)
    with pytest.raises(ValueError, match="seconds must be a finite"):
        message.extend(float("inf"))
    with pytest.raises(ValueError, match="delay must be a finite"):
        message.nack(delay=float("inf"))
    assert message.nack(delay=0)
    assert consumer.get(timeout=5).body == "x"


def test_broker_calls_after_close_fail(broker):
    broker.declare_topic("t")
    broker.close()
    with pytest.raises(mqs.ShutDown, match="is closed"):
        broker.publish("t", 1)
    with pytest.raises(mqs.ShutDown, match="is closed"):
        broker.publish_many("t", [1])
    with pytest.raises(mqs.ShutDown, match="is closed"):
        broker.consume("t", "g")
    with pytest.raises(mqs.ShutDown, match="is closed"):
        broker.declare_topic("t")


@pytest.mark.parametrize("call", [
    lambda broker: broker.stats("t"),
    lambda broker: broker.group_stats("t"),
    lambda broker: broker.topic_config("t"),
    lambda broker: broker.delete_topic("t"),
    lambda broker: broker.dlq_list("t"),
    lambda broker: broker.dlq_redrive("t"),
    lambda broker: broker.dlq_purge("t"),
], ids=["stats", "group_stats", "topic_config", "delete_topic", "dlq_list",
        "dlq_redrive", "dlq_purge"])
def test_broker_state_calls_after_close_fail(broker, call):
    broker.publish("t", 1)
    broker.close()
    with pytest.raises(mqs.ShutDown, match="is closed"):
        call(broker)


def test_reply_after_close_fails(broker):
    broker.declare_topic("replies")
    broker.publish("t", "x", reply_to="replies")
    message = broker.consume("t", "g").get(timeout=5)
    broker.close()
    with pytest.raises(mqs.ShutDown, match="is closed"):
        broker.reply(message, "y")


def test_close_with_own_unacked_messages_returns(broker):
    # No other consumer can ack them, so the drain ends at the ack timeout.
    broker.publish_many("t", [1, 2])
    consumer = broker.consume("t", "g", prefetch=10, ack_timeout=0.5)
    held = consumer.get_many(10, timeout=5)
    assert len(held) == 2
    start = time.monotonic()
    # The two go back at close, or at their ack deadline just before it.
    assert consumer.close() in (0, 2)
    assert time.monotonic() - start < 30
    again = broker.consume("t", "g", prefetch=10)
    assert sorted(drain(again)) == [1, 2]


ALONE_CLOSE = """
import sys, time, mqs
kind, where = sys.argv[1], sys.argv[2]
options = {"memory": {}, "log": {"path": where}, "shm": {"name": where}}
broker = mqs.Broker(backend=kind, **options[kind])
broker.publish("t", "held")
consumer = broker.consume("t", "g", ack_timeout=60)
assert consumer.get(timeout=5).body == "held"
start = time.monotonic()
returned = consumer.close()
waited = time.monotonic() - start
again = broker.consume("t", "g").get(timeout=5)
print(returned, round(waited, 3), again.body, again.attempts)
again.ack()
broker.close()
if kind == "shm":
    mqs.Broker.unlink(where)
"""


@pytest.mark.parametrize("kind", ["memory", "log", "shm"])
def test_close_alone_skips_drain(kind, tmp_path):
    # The program's only thread has the message, so no one else could ack
    # it. The drain returns it at once instead of after the 60 s ack
    # timeout.
    where = (str(tmp_path / "broker") if kind == "log"
             else f"test-alone-{uuid.uuid4().hex[:10]}")
    result = subprocess.run([sys.executable, "-c", ALONE_CLOSE, kind, where],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    returned, waited, body, attempts = result.stdout.split()
    assert (returned, body, attempts) == ("1", "held", "2")
    assert float(waited) < 20


async def _close_async_own_unacked(broker):
    consumer = broker.consume("t", "g", prefetch=10, ack_timeout=0.5)
    held = await consumer.get_many_async(10, timeout=5)
    assert len(held) == 1
    return await consumer.close_async()


def test_close_async_with_own_unacked_messages_returns(broker):
    broker.publish("t", 1)
    returned = asyncio.run(asyncio.wait_for(
        _close_async_own_unacked(broker), 30))
    assert returned in (0, 1)
    again = broker.consume("t", "g")
    assert drain(again) == [1]


def _second_handle(broker, request):
    """Return another Broker on the store of `broker`, or None for the
    memory backend, which no other handle can share."""
    backend = broker.backend
    if backend.name == "shm":
        return mqs.Broker(backend="shm", name=backend.shm_name)
    if backend.name == "log":
        return mqs.Broker(backend="log", path=backend.path)
    if backend.name == "redis":
        return mqs.Broker(backend="redis",
                          url=request.getfixturevalue("redis_url"),
                          serializer="pickle",
                          namespace=request.getfixturevalue(
                              "redis_namespace"))
    return None


def test_broker_close_closes_open_consumers(broker, request):
    broker.publish_many("t", ["a", "b", "c", "d"])
    consumer = broker.consume("t", "g", prefetch=4, ack_timeout=60)
    held = consumer.get_many(4, timeout=5)
    assert [m.body for m in held] == ["a", "b", "c", "d"]
    other = _second_handle(broker, request)

    broker.close()
    assert consumer.closed
    with pytest.raises(mqs.ShutDown):
        held[0].ack()
    with pytest.raises(mqs.ShutDown):
        held[1].nack()
    with pytest.raises(mqs.ShutDown):
        held[2].extend(5)
    with pytest.raises(mqs.ShutDown):
        consumer.ack_many([held[3]])
    with pytest.raises(mqs.ShutDown):
        consumer.get(timeout=0)
    assert consumer.close() == 0

    if other is None:
        return
    # The held messages went back to the group at close, long before
    # their 60 s ack deadline.
    try:
        again = other.consume("t", "g", prefetch=4)
        got = again.get_many(4, timeout=10)
        assert sorted((m.body, m.attempts) for m in got) == [
            ("a", 2), ("b", 2), ("c", 2), ("d", 2)]
        assert again.ack_many(got) == 4
        again.close()
    finally:
        other.close()


ONE_MESSAGE = r"pass \[body\] to publish it as one message"
NOT_ITERABLE = (r"publish_many takes an iterable of bodies .* got \w+ "
                r".*pass \[body\]")


@pytest.mark.parametrize("bodies, match", [
    ("abc", ONE_MESSAGE), (b"abc", ONE_MESSAGE),
    (bytearray(b"ab"), ONE_MESSAGE), ({"id": 1, "item": "tea"}, ONE_MESSAGE),
    (None, NOT_ITERABLE), (42, NOT_ITERABLE),
])
def test_publish_many_rejects_non_list_bodies(broker, bodies, match):
    """A str, bytes or dict would be published one item per message, and
    None or a number is no iterable at all: both raise before anything
    is published."""
    broker.declare_topic("t")
    with pytest.raises(TypeError, match=match):
        broker.publish_many("t", bodies)
    assert broker.stats("t")["published"] == 0
    # A generator is an iterable of bodies.
    assert len(broker.publish_many("t", (n for n in range(3)))) == 3


def test_publish_many_unknown_option_named(broker):
    broker.declare_topic("t")
    with pytest.raises(TypeError, match="publish_many got unexpected "
                                        "keyword argument.* 'bogus'; it "
                                        "accepts priority, ") as raised:
        broker.publish_many("t", [1], bogus=1)
    assert "_envelope" not in str(raised.value)
    with pytest.raises(TypeError, match=r"'priorty' \(did you mean "
                                        r"'priority'\?\)"):
        broker.publish_many("t", [1], priorty=1)
    producer = broker.producer("t")
    with pytest.raises(TypeError, match="Producer.publish got unexpected "
                                        "keyword argument.* 'timeout'"):
        producer.publish(1, timeout=1)
    producer.close()
    with pytest.raises(TypeError, match="publish_async got unexpected"):
        asyncio.run(broker.publish_async("t", 1, bogus=1))
    assert broker.stats("t")["published"] == 0


def test_publish_many_rejects_shared_dedup_id(broker):
    """Every message of a batch shares its options, so one dedup_id for
    several bodies would keep the first and drop the rest as
    duplicates."""
    broker.declare_topic("t")
    with pytest.raises(ValueError, match="dedup_id 'batch-1' would be "
                                         "shared by the 2 messages"):
        broker.publish_many("t", [1, 2], dedup_id="batch-1")
    assert broker.stats("t")["published"] == 0
    assert broker.stats("t")["deduplicated"] == 0
    # A batch of one body may carry a dedup_id.
    first = broker.publish_many("t", [1], dedup_id="batch-1")
    assert broker.publish_many("t", [1], dedup_id="batch-1") == first


def test_publish_many_of_nothing(broker):
    assert broker.publish_many("t", []) == []
    assert broker.publish_many("t", iter(())) == []
    broker.publish_many("t", [1, 2])
    assert drain(broker.consume("t", "g")) == [1, 2]


# Threads.

@pytest.mark.stress
def test_threads_exactly_once_with_acks(broker, scale):
    producers, consumers = 4, 4
    per_producer = int(2000 * scale)
    broker.declare_topic("t")
    seen = collections.Counter()
    lock = threading.Lock()
    done = threading.Event()

    def produce(p):
        for i in range(per_producer):
            broker.publish("t", (p, i), priority=i % 10)

    def consume():
        consumer = broker.consume("t", "g", prefetch=8, ack_timeout=600)
        while not done.is_set():
            try:
                batch = consumer.get_many(8, timeout=0.05)
            except mqs.Empty:
                continue
            for message in batch:
                with lock:
                    seen[message.body] += 1
                assert message.ack()
        consumer.close()

    threads = [threading.Thread(target=consume) for _ in range(consumers)]
    threads += [threading.Thread(target=produce, args=(p,))
                for p in range(producers)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60 * scale
    while sum(seen.values()) < producers * per_producer \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    done.set()
    for thread in threads:
        thread.join(30)
    assert len(seen) == producers * per_producer
    assert set(seen.values()) == {1}
    stats = broker.stats("t")
    assert stats["acked"] == producers * per_producer
    assert stats["stored"] == 0


@pytest.mark.stress
def test_threads_at_least_once_with_nacks_and_abandoned(broker, scale):
    """Consumers nack some messages and abandon others (never ack, as a
    crashed worker would); every message is still acked exactly once."""
    total = int(1500 * scale)
    broker.declare_topic("t", weights={9: 2, 0: 1})
    acked = collections.Counter()
    abandoned = collections.Counter()
    lock = threading.Lock()
    done = threading.Event()

    def consume(seed):
        rng = random.Random(seed)
        consumer = broker.consume("t", "g", prefetch=16, ack_timeout=0.2)
        while not done.is_set():
            try:
                batch = consumer.get_many(16, timeout=0.05)
            except mqs.Empty:
                continue
            for message in batch:
                roll = rng.random()
                if roll < 0.1:
                    message.nack(delay=0)
                elif roll < 0.15:
                    with lock:
                        abandoned[message.body] += 1
                elif message.ack():
                    with lock:
                        acked[message.body] += 1
        consumer.close(drain=False)

    threads = [threading.Thread(target=consume, args=(seed,))
               for seed in range(4)]
    for thread in threads:
        thread.start()
    for start in range(0, total, 100):
        broker.publish_many("t", range(start, min(total, start + 100)),
                            priority=9 if start % 200 else 0)
    deadline = time.monotonic() + 60 * scale
    while sum(acked.values()) < total and time.monotonic() < deadline:
        time.sleep(0.02)
    done.set()
    for thread in threads:
        thread.join(30)
    assert sorted(acked) == list(range(total))
    assert set(acked.values()) == {1}
    stats = broker.stats("t")
    assert stats["acked"] == total
    assert stats["redelivered"] >= sum(abandoned.values())
    assert stats["stored"] == 0
    assert stats["dead_lettered"] == 0


@pytest.mark.parametrize("timeout, error, match", [
    (-1, ValueError, "timeout must be 0 or more seconds, got -1"),
    ("x", TypeError, "timeout must be a number of seconds, got str 'x'"),
    (float("nan"), ValueError, "timeout must be 0 or more seconds"),
])
def test_producer_rejects_bad_timeout(broker, timeout, error, match):
    with pytest.raises(error, match=match):
        broker.producer("t", timeout=timeout)
    assert "t" not in broker.topics()


@pytest.mark.parametrize("linger, error, match", [
    (float("inf"), ValueError, "linger must be a finite number"),
    (1e10, ValueError, "linger must be at most mqs.MAX_DELAY_SECONDS"),
    ("x", TypeError, "linger must be a number of seconds"),
    (-1, ValueError, "linger must be 0 or more seconds"),
])
def test_producer_rejects_bad_linger(broker, linger, error, match):
    with pytest.raises(error, match=match):
        broker.producer("t", linger=linger)


def test_producer_max_linger_thread_survives(broker):
    consumer = broker.consume("t", "g", auto_ack=True)
    producer = broker.producer("t", linger=mqs.MAX_DELAY_SECONDS)
    producer.publish(1)
    thread = producer._batcher._thread
    time.sleep(0.05)
    assert thread.is_alive()
    del producer
    gc.collect()
    # The collected producer's thread publishes the batch and ends.
    assert consumer.get(timeout=10).body == 1
    thread.join(10)
    assert not thread.is_alive()


def test_producer_timeout_bounds_full_wait(broker):
    broker.declare_topic("t", maxsize=1)  # when_full="block"
    broker.publish("t", 0)
    producer = broker.producer("t", linger=60, timeout=0.2)
    producer.publish(1)
    started = time.monotonic()
    with pytest.raises(mqs.Full):
        producer.flush()
    assert time.monotonic() - started < 5
    consumer = broker.consume("t", "g", auto_ack=True)
    assert consumer.get(timeout=0).body == 0
    # The message stayed buffered and goes out now that there is room.
    assert len(producer.flush()) == 1
    producer.close()
    assert consumer.get(timeout=0).body == 1


def test_producer_linger_batches_messages(broker):
    consumer = broker.consume("t", "g", auto_ack=True)
    producer = broker.producer("t", linger=1.0, batch_size=100)
    for i in range(5):
        producer.publish(i)
        time.sleep(0.01)  # lets the background thread wait meanwhile
    # Nothing goes out before the linger time of the first message.
    with pytest.raises(mqs.Empty):
        consumer.get(timeout=0)
    # Then the five go out as one batch.
    got = consumer.get_many(10, timeout=10)
    assert [m.body for m in got] == [0, 1, 2, 3, 4]
    producer.close()


def test_redelivered_counts_every_put_back(broker):
    broker.declare_topic("t", max_attempts=3)
    group_stats_known = type(broker.backend).group_stats \
        is not Backend.group_stats
    broker.publish_many("t", ["nack", "late", "held", "reject"])
    consumer = broker.consume("t", "g", prefetch=4, ack_timeout=1.0)
    got = {m.body: m for m in consumer.get_many(4, timeout=5)}
    assert sorted(got) == ["held", "late", "nack", "reject"]

    # A nack with requeue puts the message back: one redelivery.
    assert got["nack"].nack(delay=0)
    assert broker.stats("t")["redelivered"] == 1
    # A rejected message is dead-lettered, not redelivered.
    assert got["reject"].nack(requeue=False)
    assert broker.stats("t")["redelivered"] == 1
    assert got["held"].extend(60)

    # "late" misses its ack deadline and comes back: two redeliveries.
    # Each message got again is extended, so it stays in flight.
    again = []
    deadline = time.monotonic() + 10
    while len(again) < 2 and time.monotonic() < deadline:
        try:
            found = consumer.get_many(4, timeout=1)
        except mqs.Empty:
            continue
        for message in found:
            assert message.extend(60)
        again += found
    assert sorted(m.body for m in again) == ["late", "nack"]
    assert broker.stats("t")["redelivered"] == 2

    # Closing a consumer that holds messages puts each back.
    consumer.close(drain=False)
    stats = broker.stats("t")
    assert stats["redelivered"] == 5
    assert stats["dead_lettered"] == 1
    if group_stats_known:
        (group,) = broker.group_stats("t")
        assert group.redelivered == 5


def test_redelivered_skips_dead_letter_at_deadline(broker):
    broker.declare_topic("t", max_attempts=1)
    broker.publish("t", "once")
    consumer = broker.consume("t", "g", ack_timeout=0.1)
    assert consumer.get(timeout=5).body == "once"
    deadline = time.monotonic() + 10
    while broker.stats("t")["dead_lettered"] == 0 \
            and time.monotonic() < deadline:
        with pytest.raises(mqs.Empty):
            consumer.get(timeout=0.1)
    stats = broker.stats("t")
    assert stats["dead_lettered.ack_timeout"] == 1
    assert stats["redelivered"] == 0


class Unreadable:
    """Pickles fine but fails to unpickle: int("not-an-int")."""

    def __reduce__(self):
        return (int, ("not-an-int",))


def test_undecodable_body_is_dead_lettered(broker):
    # The memory backend keeps bodies as objects, so nothing is decoded.
    if broker.backend.name == "memory":
        pytest.skip("the memory backend does not serialize bodies")
    broker.publish("t", Unreadable())
    consumer = broker.consume("t", "g", max_attempts=1, ack_timeout=0.05)
    with pytest.raises(ValueError, match="not-an-int"):
        consumer.get(timeout=5)
    # The message stays in flight, so it is not lost: its ack deadline
    # passes and max_attempts moves it to the dead-letter queue.
    deadline = time.monotonic() + 30
    while broker.stats("t")["dlq"] == 0 and time.monotonic() < deadline:
        with pytest.raises(mqs.Empty):
            consumer.get(timeout=0.05)
    stats = broker.stats("t")
    assert stats["dlq"] == 1
    assert stats["dead_lettered.ack_timeout"] == 1
    assert stats["acked"] == 0


def test_undecodable_get_raises_decode_error(broker):
    if broker.backend.name == "memory":
        pytest.skip("the memory backend does not serialize bodies")
    message_id = broker.publish("t", Unreadable())
    consumer = broker.consume("t", "g", ack_timeout=60)
    with pytest.raises(mqs.MessageDecodeError) as raised:
        consumer.get(timeout=5)
    assert raised.value.topic == "t"
    assert raised.value.message_id == message_id
    assert isinstance(raised.value.__cause__, ValueError)
    assert message_id in str(raised.value)
    assert consumer.in_flight == 1


def _wait_dead_lettered(broker, consumer, count):
    deadline = time.monotonic() + 30
    while broker.stats("t")["dlq"] < count and time.monotonic() < deadline:
        with pytest.raises(mqs.Empty):
            consumer.get_many(10, timeout=0.05)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_get_many_skips_undecodable_body(broker, caplog, mode):
    if broker.backend.name == "memory":
        pytest.skip("the memory backend does not serialize bodies")
    broker.publish("t", "good-1")
    bad_id = broker.publish("t", Unreadable())
    broker.publish("t", "good-2")
    consumer = broker.consume("t", "g", prefetch=10, max_attempts=1,
                              ack_timeout=0.3)

    with caplog.at_level(logging.ERROR, logger="mqs.broker._backend"):
        if mode == "sync":
            got = consumer.get_many(10, timeout=5)
        else:
            got = asyncio.run(consumer.get_many_async(10, timeout=5))
    assert [message.body for message in got] == ["good-1", "good-2"]
    assert consumer.ack_many(got) == 2
    assert bad_id in caplog.text
    assert "'t'" in caplog.text
    # The undecodable message stays in flight, then goes to the
    # dead-letter queue after its ack deadline and max_attempts.
    assert consumer.in_flight == 1
    _wait_dead_lettered(broker, consumer, 1)
    stats = broker.stats("t")
    assert stats["acked"] == 2
    assert stats["dlq"] == 1
    assert stats["dead_lettered.ack_timeout"] == 1


def test_auto_ack_undecodable_body_reported_lost(broker, caplog):
    if broker.backend.name == "memory":
        pytest.skip("the memory backend does not serialize bodies")
    broker.publish("t", "good")
    bad_id = broker.publish("t", Unreadable())
    consumer = broker.consume("t", "g", prefetch=10, auto_ack=True)
    with caplog.at_level(logging.ERROR, logger="mqs.broker._backend"):
        got = consumer.get_many(10, timeout=5)
    assert [message.body for message in got] == ["good"]
    assert bad_id in caplog.text
    assert "acked at delivery (auto_ack=True), so it is lost" in caplog.text
    bad_again = broker.publish("t", Unreadable())
    with pytest.raises(mqs.MessageDecodeError, match="so it is lost") \
            as raised:
        consumer.get(timeout=5)
    assert raised.value.message_id == bad_again


def test_get_many_max_items_rules(broker):
    broker.publish_many("t", [1, 2, 3])
    consumer = broker.consume("t", "g", prefetch=10)
    for value, error, match in [
            (1.5, TypeError, "max_items must be an int, got float 1.5"),
            (True, TypeError, "max_items must be an int, got bool"),
            (0, ValueError, "max_items must be at least 1, got 0"),
            (2**63, ValueError, "max_items must be at most 2\\*\\*63 - 1")]:
        with pytest.raises(error, match=match):
            consumer.get_many(value, timeout=0)
        with pytest.raises(error, match=match):
            asyncio.run(consumer.get_many_async(value, timeout=0))
    got = consumer.get_many(2**63 - 1, timeout=0)
    assert [m.body for m in got] == [1, 2, 3]


def test_get_many_max_items_matches_queue(broker):
    queue = mqs.Queue()
    consumer = broker.consume("t", "g")
    for value in (1.5, "2", 0, 2**63):
        with pytest.raises(Exception) as from_queue:
            queue.get_many(value, block=False)
        with pytest.raises(Exception) as from_broker:
            consumer.get_many(value, timeout=0)
        assert type(from_broker.value) is type(from_queue.value)
        assert str(from_broker.value) == str(from_queue.value)


def test_get_many_all_undecodable_raises(broker):
    if broker.backend.name == "memory":
        pytest.skip("the memory backend does not serialize bodies")
    first_id = broker.publish("t", Unreadable())
    broker.publish("t", Unreadable())
    consumer = broker.consume("t", "g", prefetch=10, ack_timeout=60)
    with pytest.raises(mqs.MessageDecodeError) as raised:
        consumer.get_many(10, timeout=5)
    assert raised.value.topic == "t"
    assert raised.value.message_id == first_id
    assert consumer.in_flight == 2


# Forked children.

def _forked_consumer_calls(broker, consumer, message):
    """In a forked child, run every call of `consumer` and `message` and
    close `broker`; return what each call raised, by name."""
    calls = {
        "Message.ack": message.ack,
        "Message.nack": message.nack,
        "Message.extend": lambda: message.extend(5),
        "Consumer.get": lambda: consumer.get(timeout=0.1),
        "Consumer.get_many": lambda: consumer.get_many(5, timeout=0.1),
        "Consumer.ack_many": lambda: consumer.ack_many([message]),
        "Consumer.in_flight": lambda: consumer.in_flight,
        "Consumer.close": consumer.close,
    }
    outcomes = {}
    for name, call in calls.items():
        try:
            call()
            outcomes[name] = "returned"
        except mqs.ConsumerForked as exc:
            assert name in str(exc)
            outcomes[name] = "ConsumerForked"
        except BaseException as exc:
            outcomes[name] = type(exc).__name__
    broker.close()
    return outcomes


def test_consumer_in_forked_child_raises(broker):
    broker.declare_topic("t")
    consumer = broker.consume("t", "g", ack_timeout=30)
    broker.publish("t", "held")
    broker.publish("t", "ready")
    message = consumer.get(timeout=5)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            report = _forked_consumer_calls(broker, consumer, message)
            os.write(write_end, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    outcomes = json.loads(report)
    assert set(outcomes.values()) == {"ConsumerForked"}, outcomes

    # The child's close left the parent's consumer and message alone.
    assert message.ack() is True
    assert consumer.get(timeout=5).body == "ready"
    assert broker.stats("t")["late_acks"] == 0
    assert broker.stats("t")["redelivered"] == 0


def test_close_wakes_blocked_publish(broker):
    """A publish blocked on a full topic raises ShutDown soon after the
    broker closes, instead of waiting out its timeout."""
    broker.declare_topic("t", maxsize=1)
    broker.publish("t", 1)
    raised = []

    def publish_blocked():
        started = time.monotonic()
        try:
            broker.publish("t", 2, timeout=30)
        except Exception as exc:  # the exception is the check
            raised.append((type(exc), time.monotonic() - started))

    thread = threading.Thread(target=publish_blocked)
    thread.start()
    time.sleep(0.3)
    broker.close()
    thread.join(30)
    assert not thread.is_alive()
    assert len(raised) == 1
    assert raised[0][0] is mqs.ShutDown
    assert raised[0][1] < 20


@pytest.mark.parametrize("batch", [1, 3])
def test_delete_topic_ends_blocked_publish_without_redeclaring(broker,
                                                               batch):
    """A publish blocked on a full topic that another thread deletes
    raises UnknownTopic marked `deleted`, with the count it published,
    and the topic stays deleted: the broker's auto_declare does not bring
    it back with the rest of the batch."""
    broker.declare_topic("t", maxsize=2)
    # A single message finds the topic full; of a batch of 3, the first
    # fits.
    broker.publish_many("t", ["first", "second"][:2 if batch == 1 else 1])
    raised = []

    def publish_blocked():
        try:
            if batch == 1:
                broker.publish("t", "x", timeout=30)
            else:
                broker.publish_many("t", ["a", "b", "c"], timeout=30)
        except Exception as exc:  # the exception is the check
            raised.append(exc)

    thread = threading.Thread(target=publish_blocked)
    thread.start()
    deadline = time.monotonic() + 10
    while broker.stats("t")["stored"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert thread.is_alive()
    broker.delete_topic("t")
    thread.join(30)
    assert not thread.is_alive()
    assert len(raised) == 1
    error = raised[0]
    assert type(error) is mqs.UnknownTopic
    assert error.deleted is True
    assert error.topic == "t"
    assert error.published == (0 if batch == 1 else 1)
    assert "was deleted while a publish waited" in str(error)
    assert "t" not in broker.topics()
    # A later publish declares the topic again, as for any unknown topic.
    broker.publish("t", "again")
    assert broker.stats("t")["stored"] == 1


def test_delete_topic_ends_blocked_publish_async(broker):
    """publish_async blocked on a full topic that another thread deletes
    raises as the blocking publish does: UnknownTopic marked `deleted`,
    and the topic stays deleted."""
    broker.declare_topic("t", maxsize=1)
    broker.publish("t", "first")

    def delete_later():
        time.sleep(0.5)
        broker.delete_topic("t")

    async def publish_blocked():
        with pytest.raises(mqs.UnknownTopic) as raised:
            await broker.publish_async("t", "x", timeout=30)
        return raised.value

    thread = threading.Thread(target=delete_later)
    thread.start()
    try:
        error = asyncio.run(publish_blocked())
    finally:
        thread.join(30)
    assert error.deleted is True
    assert error.topic == "t"
    assert error.published == 0
    assert "was deleted while a publish waited" in str(error)
    assert "t" not in broker.topics()


def test_consumer_of_deleted_topic_raises_shutdown_after_redeclare(broker):
    """A consumer whose topic was deleted and declared again belongs to
    no group of the new topic: its get raises ShutDown, not a bare
    KeyError, and a new consumer of the same group gets the message."""
    broker.declare_topic("t")
    stale = broker.consume("t", "g")
    broker.delete_topic("t")
    broker.publish("t", "after")
    for get in (lambda: stale.get(timeout=0.2),
                lambda: stale.get_many(5, timeout=0.2)):
        with pytest.raises(mqs.ShutDown, match="is closed"):
            get()
    fresh = broker.consume("t", "g")
    message = fresh.get(timeout=5)
    assert message.body == "after"
    assert message.ack()
    stale.close()
    fresh.close()


def test_unknown_topic_not_marked_deleted():
    broker = mqs.Broker(auto_declare=False)
    with pytest.raises(mqs.UnknownTopic) as raised:
        broker.publish("never", 1)
    assert raised.value.deleted is False
    assert raised.value.published == 0


def test_memory_broker_usable_in_child_forked_while_busy():
    """A child forked while another thread used a memory broker can use
    its copy: the lock that thread held is new in the child."""
    broker = mqs.Broker()
    broker.declare_topic("t", maxsize=3)
    consumer = broker.consume("t", "g", auto_ack=True)
    stop = threading.Event()

    def publish_and_get():
        while not stop.is_set():
            try:
                broker.publish("t", 1, timeout=0.01)
                consumer.get(timeout=0.01)
            except (mqs.Full, mqs.Empty):
                pass

    thread = threading.Thread(target=publish_and_get)
    thread.start()
    codes = []
    try:
        for _ in range(5):
            time.sleep(0.02)
            pid = os.fork()
            if pid == 0:
                signal.alarm(10)
                try:
                    broker.publish("other", "x")
                    broker.stats("other")
                finally:
                    os._exit(0)
            codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    finally:
        stop.set()
        thread.join()
    assert codes == [0] * 5
    broker.close()


def test_topic_lost_elsewhere_keeps_declared_settings(broker, caplog):
    """A topic this broker declared, then deleted behind its back (by
    another process, or lost with a Redis server's data), comes back on
    the next publish with the declared settings, not the defaults."""
    broker.declare_topic("t", max_attempts=3, weights={9: 2, 0: 1})
    broker._backend.delete_topic("t")
    caplog.set_level(logging.WARNING, logger="mqs.broker._broker")
    broker.publish("t", "after")
    config = broker.topic_config("t")
    assert config.max_attempts == 3
    assert dict(config.weights) == {0: 1, 9: 2}
    assert "declaring it again with the same settings" in caplog.text


def test_topic_deleted_by_broker_takes_defaults(broker):
    broker.declare_topic("t", max_attempts=3)
    broker.delete_topic("t")
    broker.publish("t", "after")
    assert broker.topic_config("t").max_attempts is None


def test_topic_lost_elsewhere_without_auto_declare(broker):
    strict = mqs.Broker(broker.backend, auto_declare=False)
    strict.declare_topic("t", max_attempts=3)
    broker.delete_topic("t")
    with pytest.raises(mqs.UnknownTopic,
                       match="declared by this broker, is missing"):
        strict.publish("t", "after")
    assert not broker._backend.has_topic("t")
