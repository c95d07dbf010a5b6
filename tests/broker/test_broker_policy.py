"""Shared broker semantics: lanes, backoff, token buckets, circuit breaker.

Timing behaviour runs on simulated clocks and is counted, never timed.
"""

import asyncio
import collections
import math
import random
import time

import pytest

import mqs
from mqs.broker._policy import LaneScheduler, TokenBucket, TopicConfig


class Clock:
    def __init__(self, now=100.0):
        self.now = now

    def __call__(self):
        return self.now


# Lane scheduler.

def test_scheduler_weighted_share_is_exact_per_round():
    config = TopicConfig.build("t", weights={9: 8, 5: 4, 0: 1})
    scheduler = LaneScheduler(config)
    picks = collections.Counter(scheduler.pick({9, 5, 0})
                                for _ in range(13 * 100))
    assert picks == {9: 800, 5: 400, 0: 100}


def test_scheduler_skips_empty_lanes_without_banking_credit():
    config = TopicConfig.build("t", weights={9: 2, 0: 2})
    scheduler = LaneScheduler(config)
    assert [scheduler.pick({0}) for _ in range(5)] == [0] * 5
    # Lane 9 saved nothing while it was empty: the share stays 1:1.
    picks = collections.Counter(scheduler.pick({9, 0}) for _ in range(400))
    assert picks == {9: 200, 0: 200}


def test_scheduler_first_round_starts_at_highest_lane():
    config = TopicConfig.build("t", weights={9: 3, 5: 2, 0: 1})
    scheduler = LaneScheduler(config)
    picks = [scheduler.pick({9, 5, 0}) for _ in range(12)]
    assert picks == [9, 9, 9, 5, 5, 0] * 2


def test_scheduler_restarts_round_after_single_lane():
    config = TopicConfig.build("t", weights={9: 3, 5: 2, 0: 1})
    scheduler = LaneScheduler(config)
    assert [scheduler.pick({9}) for _ in range(4)] == [9] * 4
    # Lane 9 was alone: the next round starts at the highest ready lane.
    assert [scheduler.pick({5, 0}) for _ in range(3)] == [5, 5, 0]
    assert [scheduler.pick({0}) for _ in range(2)] == [0, 0]
    assert [scheduler.pick({9, 0}) for _ in range(4)] == [9, 9, 9, 0]


def test_scheduler_idle_lane_gets_one_turn_per_round():
    config = TopicConfig.build("t", weights={9: 3, 5: 2, 0: 1})
    scheduler = LaneScheduler(config)
    for _ in range(40):
        scheduler.pick({9, 0})
    assert max(scheduler.deficits) <= 3
    # Lane 5 was idle for ten rounds and comes back with its weight only.
    picks = [scheduler.pick({9, 5, 0}) for _ in range(12)]
    assert picks == [9, 9, 9, 5, 5, 0] * 2


def test_scheduler_strict_always_highest():
    config = TopicConfig.build("t", weights={9: 1, 0: 100}, policy="strict")
    scheduler = LaneScheduler(config)
    assert {scheduler.pick({9, 0}) for _ in range(50)} == {9}
    assert scheduler.pick(set()) is None


@pytest.mark.parametrize("clock", [1, 0, "monotonic", 2.5])
def test_memory_broker_rejects_bad_clock(clock):
    with pytest.raises(TypeError, match="clock must be a callable") \
            as raised:
        mqs.Broker(clock=clock)
    assert repr(clock) in str(raised.value)


def test_memory_broker_default_clock_is_monotonic():
    broker = mqs.Broker(clock=None)
    assert broker.backend.clock is time.monotonic
    broker.publish("t", 1, delay=0.05)
    message = broker.consume("t", "g").get(timeout=5)
    assert message.body == 1
    broker.close()


def test_broker_weighted_share_on_simulated_clock():
    clock = Clock()
    broker = mqs.Broker(clock=clock)
    weights = {9: 5, 4: 3, 0: 2}
    broker.declare_topic("t", weights=weights)
    for priority in weights:
        broker.publish_many("t", [priority] * 3000, priority=priority)
    consumer = broker.consume("t", "g", prefetch=64)
    counts = collections.Counter()
    for _ in range(100):
        batch = consumer.get_many(50, timeout=0)
        counts.update(message.body for message in batch)
        for message in batch:
            message.ack()
    assert counts == {9: 2500, 4: 1500, 0: 1000}


# Backoff.

def test_backoff_grows_and_caps():
    backoff = mqs.Backoff(base=1, factor=3, max=20, jitter=0)
    assert [backoff.delay(n) for n in range(1, 6)] == [1, 3, 9, 20, 20]
    assert backoff.delay(10_000) == 20


def test_backoff_jitter_stays_within_spread():
    backoff = mqs.Backoff(base=10, factor=1, max=100, jitter=0.2)
    rng = random.Random(7)
    delays = [backoff.delay(1, rng) for _ in range(1000)]
    assert min(delays) >= 8
    assert max(delays) <= 12
    assert max(delays) - min(delays) > 3


@pytest.mark.parametrize("kwargs, match", [
    ({"factor": 0.5}, "factor must be a finite number of 1 or more, got 0.5"),
    ({"jitter": 2}, "jitter must be from 0 to 1, got 2"),
    ({"base": 5, "max": 1}, "max must be at least base"),
    ({"base": -1}, "base must be 0 or more"),
    ({"base": 1e300, "max": 1e300},
     r"base must be at most mqs.MAX_DELAY_SECONDS = 315576000 seconds "
     r"\(10 years\), got 1e\+300"),
    ({"max": 1e300}, r"Backoff max must be at most .*, got 1e\+300"),
    ({"max": float("inf")}, "Backoff max must be a finite number"),
])
def test_backoff_rejects_bad_values(kwargs, match):
    with pytest.raises(mqs.TopicConfigError, match=match):
        mqs.Backoff(**kwargs)


def test_backoff_accepts_max_delay():
    backoff = mqs.Backoff(base=mqs.MAX_DELAY_SECONDS,
                          max=mqs.MAX_DELAY_SECONDS, jitter=0)
    assert backoff.delay(1) == mqs.MAX_DELAY_SECONDS


# Token bucket and rate limits.

def test_rate_limit_within_two_percent_over_ten_seconds():
    clock = Clock()
    broker = mqs.Broker(clock=clock)
    broker.declare_topic("t", rate=mqs.Rate(500, burst=10))
    broker.publish_many("t", range(20_000))
    consumer = broker.consume("t", "g", auto_ack=True)
    delivered = 0
    for _ in range(10_000):  # 10 s in 1 ms steps
        clock.now += 0.001
        try:
            delivered += len(consumer.get_many(1000, timeout=0))
        except mqs.Empty:
            pass
    # 10 s at 500/s plus the initial burst of 10.
    assert abs(delivered - 5010) <= 0.02 * 5000


def test_adaptive_rate_cuts_on_failure_and_recovers():
    bucket = TokenBucket(mqs.Rate(100, adaptive=True, min_per_second=10))
    bucket.on_failure(1.0)
    assert bucket.current == 50
    bucket.on_failure(1.01)  # within cut_interval: ignored
    assert bucket.current == 50
    bucket.on_failure(1.2)
    bucket.on_failure(1.4)
    bucket.on_failure(1.6)
    assert bucket.current == 10  # the floor
    for _ in range(89):
        bucket.on_success()
    assert bucket.current == pytest.approx(99)
    bucket.on_success()
    bucket.on_success()
    assert bucket.current == 100


def test_adaptive_rate_slows_deliveries_after_nacks():
    clock = Clock()
    broker = mqs.Broker(clock=clock)
    broker.declare_topic("t", rate=mqs.Rate(100, burst=1, adaptive=True))
    broker.publish_many("t", range(1000))
    consumer = broker.consume("t", "g", prefetch=1000)

    def delivered_in(seconds, nack):
        count = 0
        for _ in range(int(seconds * 1000)):
            clock.now += 0.001
            try:
                batch = consumer.get_many(100, timeout=0)
            except mqs.Empty:
                continue
            for message in batch:
                count += 1
                if nack:
                    message.nack(delay=0)
                else:
                    message.ack()
        return count

    assert delivered_in(1, nack=False) == pytest.approx(100, abs=3)
    delivered_in(1, nack=True)  # cuts the rate down to the floor
    assert delivered_in(1, nack=False) < 50


def test_rate_rejects_bad_values():
    with pytest.raises(mqs.TopicConfigError, match="above 0, got -1"):
        mqs.Rate(-1)
    with pytest.raises(mqs.TopicConfigError, match="burst"):
        mqs.Rate(10, burst=0)
    with pytest.raises(mqs.TopicConfigError,
                       match="adaptive must be True or False, got str 'no'"):
        mqs.Rate(10, adaptive="no")


@pytest.mark.parametrize("field, value, match", [
    ("cut_interval", "x", "cut_interval must be a number of seconds from 0"),
    ("cut_interval", -1, "cut_interval .* got -1"),
    ("cut_interval", math.nan, "cut_interval .* got nan"),
    ("cut_interval", math.inf, "cut_interval .* got inf"),
    ("increase", math.inf, "increase must be a number above 0 and at most 1"),
    ("increase", 0, "increase .* got 0"),
    ("increase", "0.1", "increase .* got '0.1'"),
    ("decrease", "0.5", "decrease must be a number between 0 and 1 .*"
                        "got '0.5'"),
    ("decrease", math.nan, "decrease .* got nan"),
    ("min_per_second", "1", "min_per_second must be a number above 0 .* "
                            "got '1'"),
    ("min_per_second", math.nan, "min_per_second .* got nan"),
    ("burst", 1.5, "burst must be an int of 1 or more"),
])
def test_rate_rejects_bad_field(field, value, match):
    with pytest.raises(mqs.TopicConfigError, match=match):
        mqs.Rate(10, adaptive=True, **{field: value})


@pytest.mark.parametrize("field, value, error, match", [
    ("factor", math.inf, mqs.TopicConfigError,
     "factor must be a finite number of 1 or more, got inf"),
    ("factor", "2", mqs.TopicConfigError, "factor .* got '2'"),
    ("base", "x", TypeError, "base must be a number of seconds, got str"),
    ("base", math.nan, mqs.TopicConfigError, "base must be 0 or more"),
    ("max", math.inf, mqs.TopicConfigError, "max must be a finite number"),
    ("jitter", 2, mqs.TopicConfigError, "jitter must be from 0 to 1"),
    ("jitter", math.nan, mqs.TopicConfigError, "jitter .* got nan"),
])
def test_backoff_rejects_bad_field(field, value, error, match):
    with pytest.raises(error, match=match):
        mqs.Backoff(**{field: value})


def test_rate_edge_values_accepted():
    rate = mqs.Rate(10, adaptive=True, increase=1, cut_interval=0,
                    min_per_second=10)
    assert rate.floor == 10


# Circuit breaker.

def test_circuit_opens_on_failure_ratio_then_half_opens():
    clock = Clock()
    breaker = mqs.CircuitBreaker(0.5, window=10, min_calls=4,
                                 open_seconds=5, clock=clock)
    for ok in (True, False, True):
        breaker.record_success() if ok else breaker.record_failure()
    assert breaker.state == "closed"
    breaker.record_failure()  # 2 of 4 failed
    assert breaker.state == "open"
    assert not breaker.allow()
    with pytest.raises(mqs.CircuitOpen, match="retry later"):
        breaker.call(lambda: 1)
    clock.now += 5
    assert breaker.state == "half_open"
    assert breaker.allow()
    assert not breaker.allow()  # one trial call at a time
    breaker.record_failure()
    assert breaker.state == "open"
    clock.now += 5
    assert breaker.call(lambda: "ok") == "ok"
    assert breaker.state == "closed"


def test_circuit_call_records_exceptions():
    breaker = mqs.CircuitBreaker(1.0, window=2, min_calls=2)

    def fail():
        raise OSError("down")

    for _ in range(2):
        with pytest.raises(OSError):
            breaker.call(fail)
    assert breaker.state == "open"


def _half_open_breaker(clock):
    breaker = mqs.CircuitBreaker(0.5, window=4, min_calls=2,
                                 open_seconds=10, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "open"
    clock.now += 11
    assert breaker.state == "half_open"
    return breaker


def test_circuit_interrupted_trial_frees_slot():
    clock = Clock()
    breaker = _half_open_breaker(clock)

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        breaker.call(interrupted)
    # The interrupted trial recorded nothing, and the next trial runs.
    assert breaker.state == "half_open"
    assert breaker.call(lambda: "ok") == "ok"
    assert breaker.state == "closed"


def test_circuit_unreported_trial_expires():
    clock = Clock()
    breaker = _half_open_breaker(clock)
    assert breaker.allow()  # a trial that never records an outcome
    with pytest.raises(mqs.CircuitOpen,
                       match="half_open: 1 trial call.* in progress"):
        breaker.call(lambda: "ok")
    clock.now += 10  # open_seconds later the slot is free again
    assert breaker.call(lambda: "ok") == "ok"
    assert breaker.state == "closed"


def test_circuit_stale_call_outcome_is_ignored():
    """A slow call allowed while closed that ends during a trial does not
    close or reopen the circuit: only the trial decides."""
    clock = Clock()
    breaker = mqs.CircuitBreaker(0.5, window=4, min_calls=2,
                                 open_seconds=10, clock=clock)

    async def scenario(outcome):
        release = asyncio.Event()

        async def slow():
            await release.wait()
            if outcome == "fail":
                raise OSError("down")
            return "late"

        stale = asyncio.create_task(breaker.call_async(slow))
        await asyncio.sleep(0)  # the slow call is allowed while closed
        breaker.record_failure()
        breaker.record_failure()
        assert breaker.state == "open"
        clock.now += 11
        assert breaker.allow()  # a trial starts
        release.set()
        if outcome == "fail":
            with pytest.raises(OSError):
                await stale
        else:
            assert await stale == "late"
        assert breaker.state == "half_open"
        assert not breaker.allow()  # the trial still has its slot
        breaker.record_success()
        assert breaker.state == "closed"

    asyncio.run(scenario("succeed"))
    asyncio.run(scenario("fail"))


def test_circuit_expired_trial_outcome_is_ignored():
    """A trial that outlived its slot does not count over the trial that
    took the slot after it."""
    clock = Clock()
    breaker = _half_open_breaker(clock)

    def slow_trial():
        clock.now += 10  # the slot expires while the call runs
        assert breaker.allow()  # a second trial takes the freed slot
        return "late"

    assert breaker.call(slow_trial) == "late"
    assert breaker.state == "half_open"
    assert not breaker.allow()
    breaker.record_failure()  # the second trial fails
    assert breaker.state == "open"


def test_circuit_open_message_counts_down():
    clock = Clock()
    breaker = mqs.CircuitBreaker(0.5, window=4, min_calls=2,
                                 open_seconds=10, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.now += 4
    with pytest.raises(mqs.CircuitOpen,
                       match="circuit is open: calls are rejected for "
                             "another 6 s"):
        breaker.call(lambda: "ok")


def test_circuit_call_rejects_coroutine_function():
    breaker = mqs.CircuitBreaker(1.0, window=2, min_calls=2)

    async def work():
        return 1

    with pytest.raises(TypeError, match="use await breaker.call_async"):
        breaker.call(work)
    with pytest.raises(TypeError, match="returned the awaitable"):
        breaker.call(lambda: work())
    assert breaker.state == "closed"


def test_circuit_call_async_records_outcomes():
    clock = Clock()
    breaker = mqs.CircuitBreaker(1.0, window=2, min_calls=2,
                                 open_seconds=10, clock=clock)

    async def fail():
        raise OSError("down")

    async def succeed(value):
        return value

    async def scenario():
        for _ in range(2):
            with pytest.raises(OSError):
                await breaker.call_async(fail)
        assert breaker.state == "open"
        with pytest.raises(mqs.CircuitOpen):
            await breaker.call_async(succeed, 1)
        clock.now += 10
        assert await breaker.call_async(succeed, 2) == 2
        assert breaker.state == "closed"

    asyncio.run(scenario())


def test_circuit_call_async_rejects_plain_function():
    """A plain function given to call_async is a usage error: it raises
    TypeError naming the fix and records no failure."""
    breaker = mqs.CircuitBreaker(1.0, window=2, min_calls=2,
                                 open_seconds=10, clock=Clock())

    async def scenario():
        for _ in range(3):
            with pytest.raises(TypeError, match="pass an async function, "
                               "or use breaker.call"):
                await breaker.call_async(lambda: 5)
        assert breaker.state == "closed"
        assert breaker.call(lambda: 6) == 6

    asyncio.run(scenario())


@pytest.mark.parametrize("options, error, match", [
    ({"failure_ratio": "0.5"}, TypeError,
     "failure_ratio must be a number, got str '0.5'"),
    ({"open_seconds": "5"}, TypeError,
     "open_seconds must be a number, got str '5'"),
    ({"open_seconds": math.inf}, ValueError,
     "open_seconds must be a finite number"),
    ({"open_seconds": math.nan}, ValueError, "open_seconds .* got nan"),
    ({"failure_ratio": math.nan}, ValueError, "failure_ratio .* got nan"),
    ({"window": 2.0}, TypeError, "window must be an int of 1 or more, got "
                                 "float"),
    ({"half_open_calls": 0}, ValueError, "half_open_calls .* got 0"),
    ({"clock": 5}, TypeError, "clock must be a callable"),
])
def test_circuit_rejects_bad_argument(options, error, match):
    with pytest.raises(error, match=match):
        mqs.CircuitBreaker(**options)


def test_circuit_rejects_bad_values():
    with pytest.raises(ValueError, match="failure_ratio"):
        mqs.CircuitBreaker(0)
    with pytest.raises(ValueError, match="min_calls must be at most"):
        mqs.CircuitBreaker(0.5, window=5, min_calls=6)
