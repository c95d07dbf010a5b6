"""Broker semantics that every backend shares: pure functions and small state.

Nothing here stores messages. Backends keep the state (in Python objects,
in shared memory, in log records, in Redis) and call these helpers under
their own lock, so lane choice, retry delays, rate limits and validation
behave the same on every backend. Each stateful helper keeps its state in
a few numbers (`LaneScheduler.deficits`, `TokenBucket` fields) so that a
backend with a fixed layout can store them as plain fields.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping
from typing import Any

from mqs._limits import MAX_DELAY_SECONDS, check_max_delay
from mqs.errors import InvalidPriority, TopicConfigError

__all__ = [
    "PRIORITIES",
    "POLICIES",
    "WHEN_FULL",
    "DEFAULT_WEIGHTS",
    "Backoff",
    "Rate",
    "TopicConfig",
    "LaneScheduler",
    "TokenBucket",
    "lane_of",
    "check_priority",
    "retry_delay",
]

PRIORITIES = range(10)
POLICIES = ("weighted", "strict")
WHEN_FULL = ("block", "raise", "drop_oldest")
ON_EXPIRE = ("drop", "dead_letter")
# Ten lanes, priority p weighted p + 1: under saturation priority 9 gets
# 10/55 of the deliveries and priority 0 gets 1/55, none gets nothing.
DEFAULT_WEIGHTS = {p: p + 1 for p in PRIORITIES}
# Maximum length of a topic name in UTF-8 bytes. Every backend can store
# longer ones, but this limit (NAME_MAX of Linux file names) catches a
# body or a key passed as the topic by mistake.
MAX_TOPIC_BYTES = 255
# Largest max_attempts and lane weight. The shm backend's topic core
# stores both as 32-bit unsigned ints, and every backend rejects larger
# values so that a topic config works on all of them.
MAX_ATTEMPTS = 2**32 - 1
MAX_WEIGHT = 2**32 - 1
# Largest prefetch of a consumer, for the same reason: the topic core of
# the shm and log backends stores it as a 32-bit unsigned int.
MAX_PREFETCH = 2**32 - 1
# Largest maxsize of a topic. The topic core stores it as a 64-bit
# unsigned int, and mqs.Queue takes the same bound.
MAX_MAXSIZE = 2**63 - 1


def check_priority(priority: object) -> int:
    """Return `priority` if it is an int from 0 to 9, else raise."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(
            f"priority must be an int from 0 to 9, got "
            f"{type(priority).__name__} {priority!r}")
    if not 0 <= priority <= 9:
        raise InvalidPriority(
            f"priority must be from 0 to 9 (9 highest), got {priority!r}")
    return priority


def check_topic_name(name: object) -> str:
    """Return `name` if every backend can store it as a topic name.

    Raises TypeError for a non-str or empty name. Raises ValueError for
    a NUL, which no command line can pass to the mqs CLI, for a lone
    surrogate, which redis cannot encode as UTF-8, and for a name of
    more than `MAX_TOPIC_BYTES` bytes.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"topic must be a non-empty str, got {name!r}")
    if "\0" in name:
        raise ValueError(
            f"topic cannot contain a NUL character, got {name!r}")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(
            f"topic must be valid UTF-8 text, got {name!r} with a lone "
            f"surrogate") from None
    if size > MAX_TOPIC_BYTES:
        raise ValueError(
            f"topic must be at most {MAX_TOPIC_BYTES} bytes in UTF-8, got "
            f"{size} bytes: {name[:40]!r}...")
    return name


def check_max_attempts(max_attempts: object,
                       error: type[Exception] = ValueError) -> int | None:
    """Return `max_attempts` if it is None or an int from 1 to MAX_ATTEMPTS.

    Raises `error` for any other value: TopicConfigError for a topic
    setting, ValueError for the override of one consumer group.
    """
    if max_attempts is None:
        return None
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) \
            or max_attempts < 1:
        raise error(
            f"max_attempts must be an int of 1 or more or None "
            f"(unlimited), got {max_attempts!r}")
    if max_attempts > MAX_ATTEMPTS:
        raise error(
            f"max_attempts must be from 1 to {MAX_ATTEMPTS} (2**32 - 1) or "
            f"None (unlimited), got {max_attempts!r}")
    return max_attempts


def _is_number(value: object) -> bool:
    """Return whether `value` is an int or a float, but not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_seconds(name: str, value: object, *, allow_none: bool = True,
                   allow_zero: bool = True,
                   bounded: bool = False) -> float | None:
    """Return `value` as float seconds, or raise for an invalid one.

    `bounded` values schedule a delivery or an expiry, so they must also
    be at most `MAX_DELAY_SECONDS`, which rejects infinity.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a number of seconds, got "
            f"{type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value) or value < 0 or (value == 0 and not allow_zero):
        bound = "0 or more" if allow_zero else "above 0"
        raise TopicConfigError(
            f"{name} must be {bound} seconds, got {value!r}")
    if bounded:
        check_max_delay(name, value, value, TopicConfigError)
    return value


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Retry delays that grow by `factor` from `base` up to `max` seconds.

    The delay before delivery attempt ``n + 1`` after ``n`` failed ones is
    ``min(max, base * factor ** (n - 1))``, then scaled by a random factor
    from ``1 - jitter`` to ``1 + jitter`` and capped at `max` again.

    Parameters
    ----------
    base : float
        Delay after the first failure, in seconds (0 or more).
    factor : float
        Growth per further failure, 1 or more.
    max : float
        Largest delay in seconds, at least `base` and at most
        `mqs.MAX_DELAY_SECONDS` (10 years).
    jitter : float
        Relative spread from 0 (none) to 1, so that many messages that
        failed together are not retried together.
    """

    base: float = 1.0
    factor: float = 2.0
    max: float = 300.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        _check_seconds("Backoff base", self.base, allow_none=False,
                       bounded=True)
        # An infinite retry delay cannot be scheduled, and a log or shm
        # broker would replay the failing nack at every open.
        if isinstance(self.max, (int, float)) and math.isinf(self.max):
            raise TopicConfigError(
                f"Backoff max must be a finite number of seconds, got "
                f"{self.max!r}")
        _check_seconds("Backoff max", self.max, allow_none=False,
                       bounded=True)
        if not _is_number(self.factor) or not self.factor >= 1 \
                or math.isinf(self.factor):
            raise TopicConfigError(
                f"Backoff factor must be a finite number of 1 or more, got "
                f"{self.factor!r}")
        if isinstance(self.jitter, bool) or not isinstance(
                self.jitter, (int, float)) or not 0 <= self.jitter <= 1:
            raise TopicConfigError(
                f"Backoff jitter must be from 0 to 1, got {self.jitter!r}")
        if self.max < self.base:
            raise TopicConfigError(
                f"Backoff max must be at least base, got max={self.max!r} "
                f"and base={self.base!r}")

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Return the delay in seconds after `failures` failed attempts."""
        exponent = max(0, failures - 1)
        try:
            raw = self.base * self.factor ** exponent
        except OverflowError:
            raw = self.max
        delay = min(self.max, raw)
        if self.jitter:
            spread = (rng or random).uniform(1 - self.jitter, 1 + self.jitter)
            delay = min(self.max, delay * spread)
        return delay


@dataclasses.dataclass(frozen=True)
class Rate:
    """A token-bucket rate limit on deliveries.

    Parameters
    ----------
    per_second : float
        Tokens added per second, above 0. One delivery takes one token.
    burst : int, optional
        Bucket size: deliveries allowed at once after an idle spell. The
        default is one second of tokens (at least 1).
    adaptive : bool
        Additive increase, multiplicative decrease (AIMD): each nack or
        missed ack deadline cuts the current rate by `decrease` (at most
        once per `cut_interval` seconds), each ack raises it by
        ``per_second * increase`` up to `per_second`, never below
        `min_per_second`.
    min_per_second : float, optional
        Floor of the adaptive rate, above 0 and at most `per_second`.
        The default is ``per_second / 100``.
    decrease : float
        Factor that a cut multiplies the current rate by, between 0 and 1.
    increase : float
        Share of `per_second` that each ack adds back, above 0 and at
        most 1.
    cut_interval : float
        Minimum seconds between two cuts, from 0 to
        `mqs.MAX_DELAY_SECONDS`.

    Raises
    ------
    TopicConfigError
        For a field of the wrong type or outside its range.
    """

    per_second: float
    burst: int | None = None
    adaptive: bool = False
    min_per_second: float | None = None
    decrease: float = 0.5
    increase: float = 0.01
    cut_interval: float = 0.1

    def __post_init__(self) -> None:
        # Every field is checked here because each backend stores the
        # record as it is and reads the adaptive fields only at the first
        # nack, where a bad value would fail that nack instead.
        rate = self.per_second
        if not _is_number(rate) or not rate > 0 or math.isinf(rate):
            raise TopicConfigError(
                f"rate must be a finite number of deliveries per second "
                f"above 0, got {rate!r}")
        if self.burst is not None and (
                isinstance(self.burst, bool)
                or not isinstance(self.burst, int) or self.burst < 1):
            raise TopicConfigError(
                f"rate burst must be an int of 1 or more or None (one "
                f"second of tokens), got {self.burst!r}")
        if not isinstance(self.adaptive, bool):
            raise TopicConfigError(
                f"rate adaptive must be True or False, got "
                f"{type(self.adaptive).__name__} {self.adaptive!r}")
        if not _is_number(self.decrease) or not 0 < self.decrease < 1:
            raise TopicConfigError(
                f"rate decrease must be a number between 0 and 1 (the "
                f"factor that a cut multiplies the rate by), got "
                f"{self.decrease!r}")
        if not _is_number(self.increase) or not 0 < self.increase <= 1:
            raise TopicConfigError(
                f"rate increase must be a number above 0 and at most 1 "
                f"(the share of per_second that an ack adds back), got "
                f"{self.increase!r}")
        interval = self.cut_interval
        if not _is_number(interval) or not 0 <= interval \
                <= MAX_DELAY_SECONDS:
            raise TopicConfigError(
                f"rate cut_interval must be a number of seconds from 0 to "
                f"{MAX_DELAY_SECONDS:.0f} (mqs.MAX_DELAY_SECONDS), got "
                f"{interval!r}")
        low = self.min_per_second
        if low is not None and (not _is_number(low) or not 0 < low <= rate):
            raise TopicConfigError(
                f"rate min_per_second must be a number above 0 and at most "
                f"per_second ({rate!r}), or None (per_second / 100), got "
                f"{low!r}")

    @property
    def capacity(self) -> float:
        """Bucket size in tokens."""
        if self.burst is not None:
            return float(self.burst)
        return max(1.0, float(self.per_second))

    @property
    def floor(self) -> float:
        """Lowest rate the adaptive mode cuts down to."""
        if self.min_per_second is not None:
            return self.min_per_second
        return self.per_second / 100


def _as_rate(value: object, where: str) -> Rate | None:
    if value is None or isinstance(value, Rate):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Rate(float(value))
    raise TypeError(
        f"{where} must be a number of deliveries per second or mqs.Rate, "
        f"got {type(value).__name__} {value!r}")


@dataclasses.dataclass(frozen=True)
class TopicConfig:
    """Settings of one topic, as `Broker.declare_topic` validated them.

    Backends store this record (it is picklable and compares by value) so
    that every process attached to a broker sees the same settings.
    """

    name: str
    weights: tuple[tuple[int, int], ...] = tuple(DEFAULT_WEIGHTS.items())
    policy: str = "weighted"
    rate: Rate | None = None
    lane_rates: tuple[tuple[int, Rate], ...] = ()
    dedup_window: float = 300.0
    max_attempts: int | None = None
    retry: Backoff | None = None
    ttl: float | None = None
    on_expire: str = "drop"
    retention: float | None = None
    maxsize: int = 0
    when_full: str = "block"

    @property
    def lanes(self) -> tuple[int, ...]:
        """Lane priorities, highest first."""
        return tuple(sorted((p for p, _ in self.weights), reverse=True))

    @property
    def weight_map(self) -> dict[int, int]:
        return dict(self.weights)

    @classmethod
    def build(cls, name: str, *, weights: Mapping[int, int] | None = None,
              policy: str = "weighted", rate: Any = None,
              dedup_window: float | None = 300.0,
              max_attempts: int | None = None, retry: Backoff | None = None,
              ttl: float | None = None, on_expire: str = "drop",
              retention: float | None = None, maxsize: int = 0,
              when_full: str = "block") -> TopicConfig:
        """Validate keyword settings and return the record."""
        check_topic_name(name)
        if policy not in POLICIES:
            raise TopicConfigError(
                f"policy must be 'weighted' or 'strict', got {policy!r}")
        if when_full not in WHEN_FULL:
            raise TopicConfigError(
                f"when_full must be 'block', 'raise' or 'drop_oldest', got "
                f"{when_full!r}")
        if on_expire not in ON_EXPIRE:
            raise TopicConfigError(
                f"on_expire must be 'drop' or 'dead_letter', got "
                f"{on_expire!r}")
        lanes = _check_weights(weights)
        topic_rate, lane_rates = _check_rates(rate, lanes)
        check_max_attempts(max_attempts, TopicConfigError)
        if retry is not None and not isinstance(retry, Backoff):
            raise TypeError(
                f"retry must be an mqs.Backoff or None, got "
                f"{type(retry).__name__} {retry!r}")
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) \
                or maxsize < 0:
            raise TopicConfigError(
                f"maxsize must be an int of 0 (unbounded) or more, got "
                f"{maxsize!r}")
        if maxsize > MAX_MAXSIZE:
            raise TopicConfigError(
                f"maxsize must be at most {MAX_MAXSIZE} (2**63 - 1), got "
                f"{maxsize}; pass 0 for an unbounded topic")
        window = _check_seconds("dedup_window", dedup_window, bounded=True)
        return cls(
            name=name, weights=lanes, policy=policy, rate=topic_rate,
            lane_rates=lane_rates, dedup_window=window or 0.0,
            max_attempts=max_attempts, retry=retry,
            ttl=_check_seconds("ttl", ttl, allow_zero=False, bounded=True),
            on_expire=on_expire,
            retention=_check_seconds("retention", retention),
            maxsize=maxsize, when_full=when_full)


def _check_weights(weights: Mapping[int, int] | None
                   ) -> tuple[tuple[int, int], ...]:
    if weights is None:
        return tuple(DEFAULT_WEIGHTS.items())
    if not isinstance(weights, Mapping) or not weights:
        raise TopicConfigError(
            f"weights must be a non-empty dict of priority (0-9) to weight, "
            f"for example {{9: 8, 5: 4, 0: 1}}, got {weights!r}")
    checked = []
    for priority, weight in weights.items():
        try:
            check_priority(priority)
        except (TypeError, InvalidPriority):
            raise TopicConfigError(
                f"weights keys must be priorities from 0 to 9, got "
                f"{priority!r} in {weights!r}") from None
        if isinstance(weight, bool) or not isinstance(weight, int) \
                or weight < 1:
            raise TopicConfigError(
                f"weights values must be ints of 1 or more, got {weight!r} "
                f"for priority {priority} (use strict policy to starve a "
                f"lane)")
        if weight > MAX_WEIGHT:
            raise TopicConfigError(
                f"weights values must be from 1 to {MAX_WEIGHT} (2**32 - "
                f"1), got {weight!r} for priority {priority}")
        checked.append((priority, weight))
    return tuple(sorted(checked, reverse=True))


def _check_rates(rate: Any, weights: tuple[tuple[int, int], ...]
                 ) -> tuple[Rate | None, tuple[tuple[int, Rate], ...]]:
    if not isinstance(rate, Mapping):
        return _as_rate(rate, "rate"), ()
    lanes = {p for p, _ in weights}
    per_lane = []
    for priority, value in rate.items():
        if priority not in lanes:
            raise TopicConfigError(
                f"rate keys must be lane priorities {sorted(lanes)}, got "
                f"{priority!r}; a lane is a key of weights")
        lane_rate = _as_rate(value, f"rate[{priority}]")
        if lane_rate is not None:
            per_lane.append((priority, lane_rate))
    return None, tuple(sorted(per_lane, reverse=True))


def lane_of(priority: int, lanes: tuple[int, ...]) -> int:
    """Return the lane of `priority`: the highest lane at or below it.

    `lanes` are sorted highest first. A priority below every lane goes to
    the lowest lane, so weights {9: 8, 5: 4, 0: 1} put priority 7 in lane
    5 and priority 3 in lane 0.
    """
    for lane in lanes:
        if lane <= priority:
            return lane
    return lanes[-1]


class LaneScheduler:
    """Choose the lane of the next delivery: deficit round robin or strict.

    Weighted: lanes take turns from the highest priority down. A lane
    gets `weight` credits when its turn starts and delivers one message
    per credit while it has eligible messages. A lane with nothing to
    deliver loses its credits, so a busy lane cannot save up turns and a
    lane that was idle comes back with at most `weight` credits. Under
    saturation each lane gets ``weight / sum(weights)`` of the
    deliveries, and no lane waits more than one round. A round starts
    over at the highest lane on a new scheduler and whenever only one
    lane is eligible, so the highest ready lane goes first. Strict: the
    highest eligible lane always goes first, which starves lower lanes
    while it has messages.

    The state is `cursor` (index into `lanes`) and `deficits` (credits
    per lane, same order): a fixed-size backend can store those numbers.
    A new round is `cursor` on the last (lowest) lane with no credits,
    so the next step moves to the highest lane and starts its turn.
    """

    __slots__ = ("lanes", "weights", "strict", "cursor", "deficits")

    def __init__(self, config: TopicConfig) -> None:
        self.lanes = config.lanes
        weight_map = config.weight_map
        self.weights = [weight_map[lane] for lane in self.lanes]
        self.strict = config.policy == "strict"
        self.cursor = 0
        self.deficits: list[int] = []
        self.restart()

    def restart(self) -> None:
        """Start a new round, which begins at the highest lane."""
        self.cursor = len(self.lanes) - 1
        self.deficits = [0] * len(self.lanes)

    def pick(self, eligible: set[int] | frozenset[int]) -> int | None:
        """Return the lane to deliver from next, charging it one credit.

        `eligible` holds the lanes that can deliver now (they have a
        ready message, not locked by its key, not held by a rate limit).
        """
        if not eligible:
            return None
        if len(eligible) == 1 and not self.strict:
            # Only this lane has messages, so no other lane's share needs
            # keeping. A new round lets the highest lane go first the next
            # time several lanes are ready.
            (lane,) = eligible
            self.restart()
            return lane
        if self.strict:
            for lane in self.lanes:
                if lane in eligible:
                    return lane
        count = len(self.lanes)
        # At most one full round passes before an eligible lane gets
        # credits, because every weight is at least 1.
        for _ in range(2 * count + 1):
            index = self.cursor
            lane = self.lanes[index]
            if lane in eligible:
                if self.deficits[index] >= 1:
                    self.deficits[index] -= 1
                    return lane
            else:
                self.deficits[index] = 0
            self.cursor = (index + 1) % count
            if self.lanes[self.cursor] in eligible:
                self.deficits[self.cursor] += self.weights[self.cursor]
        raise AssertionError("lane scheduler found no lane to deliver from")


@dataclasses.dataclass
class TokenBucket:
    """Token-bucket state for one `Rate`, with the adaptive (AIMD) rule.

    Four numbers: `tokens`, `stamp` (clock time of the last refill),
    `current` (the rate now, below `rate.per_second` after cuts) and
    `last_cut` (clock time of the last cut).
    """

    rate: Rate
    tokens: float = 0.0
    stamp: float | None = None
    current: float = 0.0
    last_cut: float = -math.inf

    def __post_init__(self) -> None:
        self.current = self.rate.per_second
        self.tokens = self.rate.capacity

    def _refill(self, now: float) -> None:
        if self.stamp is not None and now > self.stamp:
            self.tokens = min(self.rate.capacity,
                              self.tokens + (now - self.stamp) * self.current)
        if self.stamp is None or now > self.stamp:
            self.stamp = now

    def available(self, now: float) -> bool:
        """Return whether a token is there to take at `now`."""
        self._refill(now)
        return self.tokens >= 1

    def take(self, now: float) -> None:
        """Take one token; the caller checked `available` first."""
        self._refill(now)
        self.tokens -= 1

    def ready_at(self, now: float) -> float:
        """Return the clock time when the next token is there."""
        self._refill(now)
        if self.tokens >= 1:
            return now
        return now + (1 - self.tokens) / self.current

    def on_success(self) -> None:
        """Raise an adaptive rate additively after an ack."""
        if self.rate.adaptive and self.current < self.rate.per_second:
            self.current = min(
                self.rate.per_second,
                self.current + self.rate.per_second * self.rate.increase)

    def on_failure(self, now: float) -> None:
        """Cut an adaptive rate after a nack or a missed ack deadline."""
        if not self.rate.adaptive:
            return
        if now - self.last_cut < self.rate.cut_interval:
            return
        self._refill(now)
        self.last_cut = now
        self.current = max(self.rate.floor,
                           self.current * self.rate.decrease)


def retry_delay(config: TopicConfig, attempts: int, delay: float | None,
                rng: random.Random | None = None) -> float:
    """Return the redelivery delay after a nack of attempt `attempts`.

    An explicit `delay` wins; otherwise the topic's `retry` backoff gives
    it, and without one the message is ready again at once.
    """
    if delay is not None:
        return delay
    if config.retry is None:
        return 0.0
    return config.retry.delay(attempts, rng)


def attempts_exhausted(config: TopicConfig, attempts: int,
                       max_attempts: int | None = None) -> bool:
    """Return whether a message delivered `attempts` times may not retry."""
    limit = max_attempts if max_attempts is not None else config.max_attempts
    return limit is not None and attempts >= limit
