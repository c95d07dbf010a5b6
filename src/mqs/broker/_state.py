"""`TopicState`: the complete broker state machine of one topic, in memory.

The memory backend runs one `TopicState` per topic under its lock; a
durable backend can rebuild one by replaying its records. The caller
holds the lock and passes the clock reading `now` (monotonic seconds) to
every operation, so the state machine itself never reads a clock except
through its timing wheel, which gets the same clock.

Lazy deletion keeps every operation O(1) amortised: lane deques hold
``(entry, ticket)`` pairs, and a pair is stale once the entry's ticket
changed (it was delivered, requeued or finished since), so it is skipped
when it reaches the head.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import itertools
import logging
import math
import operator
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

from mqs import metrics
from mqs._wheel import TimingWheel
from mqs.broker._backend import (
    COUNTER_KEYS,
    DeadLetter,
    Delivery,
    Envelope,
    GroupStats,
)
from mqs._slots import new_with_slots, slot_columns
from mqs.broker._columns import (
    decode_column,
    encode_column,
    encode_typed_column,
)
from mqs.broker._policy import (
    LaneScheduler,
    TokenBucket,
    TopicConfig,
    attempts_exhausted,
    lane_of,
    retry_delay,
)
from mqs.errors import Full, ShutDown

__all__ = ["SNAPSHOT_ENCODING", "TopicState"]

logger = logging.getLogger(__name__)

# Entry states in one group.
READY, HIDDEN, DELAYED, IN_FLIGHT, GONE = range(5)
# Timer kinds in the wheel.
_DUE, _DEADLINE = 0, 1
# The encoding that `TopicState.snapshot` writes: 2 stores records and
# group entries as columns. Snapshots of encoding 1 (the dict of the
# state's attributes, objects included) carry no encoding key and still
# restore.
SNAPSHOT_ENCODING = 2


class _Record:
    """One published message, shared by the entries of every group."""

    __slots__ = ("id", "body", "priority", "lane", "key", "headers",
                 "timestamp", "expires", "due", "reply_to",
                 "correlation_id", "refs", "retain_until")

    def __init__(self, message_id: str, envelope: Envelope, lane: int,
                 now: float, wall: float, ttl: float | None) -> None:
        self.id = message_id
        self.body = envelope.body
        self.priority = envelope.priority
        self.lane = lane
        self.key = envelope.key
        self.headers = dict(envelope.headers or ())
        self.timestamp = wall
        self.expires = None if ttl is None else now + ttl
        self.due = now + envelope.delay if envelope.delay > 0 else None
        self.reply_to = envelope.reply_to
        self.correlation_id = envelope.correlation_id
        # Group entries that still need this record.
        self.refs = 0
        # Monotonic time until which the record stays stored for groups
        # created later with start="earliest"; inf while the topic has no
        # group at all.
        self.retain_until = 0.0


class _Entry:
    """The state of one record in one group."""

    __slots__ = ("record", "group", "state", "ticket", "attempts",
                 "handle", "wake", "wake_seq", "consumer", "last_error",
                 "ready_at", "sampled_at")

    def __init__(self, record: _Record, group: _Group) -> None:
        self.record = record
        self.group = group
        self.state = GONE
        self.ticket = 0
        self.attempts = 0
        self.handle: int | None = None
        # Deadline of the pending timer and the order it was scheduled
        # in, so that a snapshot can schedule it again (see `restore`).
        self.wake = 0.0
        self.wake_seq = 0
        self.consumer: str | None = None
        self.last_error: str | None = None
        # Clock time it last joined a lane's tail (for lag_seconds and the
        # enqueue-to-deliver latency), and the time of its current
        # delivery when that delivery is sampled for deliver-to-ack.
        self.ready_at = 0.0
        self.sampled_at: float | None = None


# Per-group counters (see GroupStats) and latency histograms.
_GROUP_COUNTERS = ("delivered", "acked", "nacked", "redelivered",
                   "dead_lettered", "errors")
_GROUP_HISTOGRAMS = ("enqueue_to_deliver", "deliver_to_ack")


class _Group:
    __slots__ = ("name", "entries", "lanes", "scheduler", "key_heads",
                 "key_waiting", "consumers", "max_attempts", "lane_buckets",
                 "bucket", "ready", "countdown") \
        + _GROUP_COUNTERS + _GROUP_HISTOGRAMS

    def __init__(self, name: str, config: TopicConfig) -> None:
        self.name = name
        self.entries: dict[str, _Entry] = {}
        self.lanes: dict[int, collections.deque[tuple[_Entry, int]]] = {
            lane: collections.deque() for lane in config.lanes}
        self.scheduler = LaneScheduler(config)
        # key -> the one visible entry of that key; key -> hidden entries.
        self.key_heads: dict[Any, _Entry] = {}
        self.key_waiting: dict[Any, collections.deque] = {}
        # consumer id -> prefetch and in-flight count.
        self.consumers: dict[str, list[int]] = {}
        self.max_attempts: int | None = None
        self.bucket = None if config.rate is None else TokenBucket(config.rate)
        self.lane_buckets = {lane: TokenBucket(rate)
                             for lane, rate in config.lane_rates}
        self.ready = 0
        _init_metrics(self)


def _init_metrics(group: _Group) -> None:
    """Set the metric fields of a group (also of one restored from a
    snapshot written before they existed)."""
    for name in _GROUP_COUNTERS:
        if not hasattr(group, name):
            setattr(group, name, 0)
    for name in _GROUP_HISTOGRAMS:
        if not hasattr(group, name):
            setattr(group, name, metrics.LogLinearHistogram())
    if not hasattr(group, "countdown"):
        # Deliveries left until the next sampled one.
        group.countdown = 1


class TopicState:
    """Messages, groups, timers, DLQ, dedup ids and counters of one topic.

    Parameters
    ----------
    config : TopicConfig
        The topic's settings.
    clock : callable
        Monotonic clock in seconds, also given to the timing wheel.
    id_source : callable
        Returns the next message id (a str unique in the topic).
    sample_every : int or None
        Sample the latencies of one delivery in this many per group
        (None: no sampling).
    """

    def __init__(self, config: TopicConfig, clock: Callable[[], float],
                 id_source: Callable[[], str],
                 sample_every: int | None = None) -> None:
        self.config = config
        lanes = config.lanes
        self.lane_of = [lane_of(priority, lanes) for priority in range(10)]
        self.clock = clock
        self.next_id = id_source
        self.wheel: TimingWheel = TimingWheel(0.001, 256, clock=clock)
        # Records keyed by their id, in publish order. A plain dict,
        # because a snapshot lists its values about ten times as fast as
        # an OrderedDict's (measured with a million records).
        self.store: dict[str, _Record] = {}
        self.retained: collections.deque = collections.deque()
        self.groups: dict[str, _Group] = {}
        # (message id, group) -> the dead letter and its record.
        self.dlq: collections.OrderedDict[
            tuple[str, str], tuple[DeadLetter, _Record]] = \
            collections.OrderedDict()
        self.dedup: collections.OrderedDict[Any, tuple[float, str]] = \
            collections.OrderedDict()
        self.counters = dict.fromkeys(COUNTER_KEYS, 0)
        self.rng = random.Random()
        self.timer_seq = 0
        self.sample_every = sample_every

    # Snapshots.

    def snapshot(self) -> dict[str, Any]:
        """Return the state as a dict that pickle can store.

        Everything but the timing wheel, the clock and the id source,
        which `restore` gets anew; pending timers are kept as the
        `wake` deadline of their entries. Records and group entries are
        stored as columns (see `mqs.broker._columns`), because pickling
        millions of small objects one by one takes seconds. References
        to them are stored as message ids (see `_refer`). Lane pairs and
        hidden entries that no operation would use any more (see the
        module docs) are left out, which changes no later result.
        """
        data = {name: value for name, value in self.__dict__.items()
                if name not in _NOT_COPIED}
        store = self.store
        # Records that are referred to but no longer stored.
        extra_records = _Numbering()
        stored = list(store.values())
        data["encoding"] = SNAPSHOT_ENCODING
        data["groups"] = [
            _snapshot_group(group, store, stored, extra_records)
            for group in self.groups.values()]
        retained = list(self.retained)
        data["retained"] = _refer(store, extra_records,
                                  list(map(_id_of, retained)), retained)
        dead = [record for _, record in self.dlq.values()]
        data["dlq"] = [(key, letter) for key, (letter, _) in self.dlq.items()]
        data["dlq_records"] = _refer(store, extra_records,
                                     list(map(_id_of, dead)), dead)
        data["records"] = _record_columns(stored)
        # Last, because the references above add to it.
        data["extra_records"] = _record_columns(extra_records.items)
        return data

    @classmethod
    def restore(cls, data: dict[str, Any], clock: Callable[[], float],
                id_source: Callable[[], str]) -> TopicState:
        """Rebuild a state from `snapshot` output, timers included.

        Also reads the snapshots of earlier mqs versions, which stored
        the objects themselves.

        Raises
        ------
        ValueError
            If the snapshot was written by a newer mqs.
        """
        state = cls.__new__(cls)
        encoding = data.get("encoding")
        if encoding == SNAPSHOT_ENCODING:
            with _gc_paused():
                _restore_tables(state, data)
        elif encoding is not None:
            raise ValueError(
                f"topic snapshot has encoding {encoding!r}, this mqs "
                f"reads {SNAPSHOT_ENCODING!r}; upgrade mqs to open it")
        else:
            _restore_objects(state, data)
        state.clock = clock
        state.next_id = id_source
        state.wheel = TimingWheel(0.001, 256, clock=clock)
        if "sample_every" not in data:
            state.sample_every = None
        timers = []
        for group in state.groups.values():
            _init_metrics(group)
            for entry in group.entries.values():
                entry.handle = None
                if entry.state == DELAYED:
                    timers.append((entry.wake, entry.wake_seq, _DUE, entry))
                elif entry.state == IN_FLIGHT:
                    timers.append(
                        (entry.wake, entry.wake_seq, _DEADLINE, entry))
        # The wheel fires equal deadlines in scheduling order, so schedule
        # them again in the order they were first scheduled.
        timers.sort(key=lambda timer: timer[:2])
        for at, _, kind, entry in timers:
            entry.handle = state.wheel.schedule_at(
                at, (kind, entry, entry.ticket))
        return state

    # Counting.

    def count(self, key: str, n: int = 1) -> None:
        counters = self.counters
        value = counters.get(key, 0) + n
        counters[key] = value
        if not _replay.active:
            warn_drop_count(logger, self.config.name, key, value - n, value)

    # Publishing.

    def room(self) -> int:
        """Return how many more records fit, or -1 when unbounded."""
        if not self.config.maxsize:
            return -1
        return max(0, self.config.maxsize - len(self.store))

    def publish(self, envelopes: Sequence[Envelope], now: float,
                wall: float, accepted_before: int = 0) -> list[str]:
        """Store envelopes until the topic is full; return their ids.

        Stops early (returning fewer ids) only when ``maxsize`` is reached
        with ``when_full="block"``. Raises `Full` for ``"raise"``.
        """
        self.advance(now)
        if self.retained:
            self._trim(now)
        ids = []
        for index, envelope in enumerate(envelopes):
            if envelope.dedup_id is not None:
                duplicate = self._duplicate(envelope.dedup_id, now)
                if duplicate is not None:
                    ids.append(duplicate)
                    continue
            if self.config.maxsize and len(self.store) >= self.config.maxsize:
                if self.config.when_full == "raise":
                    raise Full(
                        f"topic {self.config.name!r} is full (maxsize "
                        f"{self.config.maxsize}); consume faster, raise "
                        f"maxsize or use when_full='block'",
                        accepted_before + index)
                if self.config.when_full == "block" or not self._drop_oldest():
                    return ids
            ids.append(self._add(envelope, now, wall))
        return ids

    def _duplicate(self, dedup_id: Any, now: float) -> str | None:
        if dedup_id is None or not self.config.dedup_window:
            return None
        while self.dedup:
            first = next(iter(self.dedup.values()))
            if first[0] > now:
                break
            self.dedup.popitem(last=False)
        seen = self.dedup.get(dedup_id)
        if seen is not None:
            self.count("deduplicated")
            return seen[1]
        return None

    def _add(self, envelope: Envelope, now: float, wall: float) -> str:
        config = self.config
        ttl = envelope.ttl if envelope.ttl is not None else config.ttl
        record = _Record(self.next_id(), envelope,
                         self.lane_of[envelope.priority], now, wall, ttl)
        if envelope.dedup_id is not None and config.dedup_window:
            self.dedup[envelope.dedup_id] = (now + config.dedup_window,
                                             record.id)
        self.store[record.id] = record
        # `count` inlined: every message bumps this counter, which is not
        # a drop counter with a log line.
        counters = self.counters
        counters["published"] = counters.get("published", 0) + 1
        if not self.groups:
            record.retain_until = math.inf
            return record.id
        if config.retention:
            record.retain_until = now + config.retention
            self.retained.append(record)
        for group in self.groups.values():
            self._enter(group, record, now)
        return record.id

    def _enter(self, group: _Group, record: _Record, now: float) -> None:
        entry = _Entry(record, group)
        group.entries[record.id] = entry
        record.refs += 1
        key = record.key
        if key is not None and key in group.key_heads:
            entry.state = HIDDEN
            group.key_waiting.setdefault(key, collections.deque()).append(
                entry)
            return
        if key is not None:
            group.key_heads[key] = entry
        self._schedule(entry, now)

    def _schedule(self, entry: _Entry, now: float) -> None:
        """Make a visible entry ready, or delayed until its due time."""
        due = entry.record.due
        if due is not None and due > now:
            self._delay_until(entry, due)
        else:
            self._make_ready(entry, front=False, now=now)

    def _make_ready(self, entry: _Entry, front: bool, now: float) -> None:
        entry.state = READY
        entry.ticket += 1
        entry.group.ready += 1
        lane = entry.group.lanes[entry.record.lane]
        if front:
            # Back at the head, unseen: it keeps the time it became ready.
            lane.appendleft((entry, entry.ticket))
        else:
            entry.ready_at = now
            lane.append((entry, entry.ticket))

    def _delay_until(self, entry: _Entry, due: float) -> None:
        entry.state = DELAYED
        entry.ticket += 1
        self._set_timer(entry, due, _DUE)

    def _set_timer(self, entry: _Entry, at: float, kind: int) -> None:
        self.timer_seq += 1
        entry.wake = at
        entry.wake_seq = self.timer_seq
        entry.handle = self.wheel.schedule_at(at, (kind, entry, entry.ticket))

    def _drop_oldest(self) -> bool:
        """Drop the oldest stored record that is nowhere in flight."""
        for record in self.store.values():
            if not any(group.entries.get(record.id) is not None
                       and group.entries[record.id].state == IN_FLIGHT
                       for group in self.groups.values()):
                break
        else:
            return False
        for group in self.groups.values():
            entry = group.entries.get(record.id)
            if entry is not None:
                self._finish(entry)
        self.store.pop(record.id, None)
        self.count("dropped_full")
        return True

    # Groups and consumers.

    def open_consumer(self, group_name: str, consumer: str, start: str,
                      prefetch: int, max_attempts: int | None,
                      now: float) -> None:
        self.advance(now)
        group = self.groups.get(group_name)
        if group is None:
            group = _Group(group_name, self.config)
            first = not self.groups
            self.groups[group_name] = group
            if start == "earliest":
                for record in list(self.store.values()):
                    self._enter(group, record, now)
            if first:
                self._end_backlog(now)
        if max_attempts is not None:
            group.max_attempts = max_attempts
        group.consumers[consumer] = [prefetch, 0]

    def _end_backlog(self, now: float) -> None:
        """Give records published before any group existed normal retention."""
        keep = self.config.retention or 0.0
        for record in list(self.store.values()):
            if record.retain_until == math.inf:
                record.retain_until = now + keep
                if keep:
                    self.retained.append(record)
                elif record.refs == 0:
                    del self.store[record.id]
                    self.count("dropped_unsubscribed")

    def close_consumer(self, group_name: str, consumer: str,
                       now: float) -> int:
        self.advance(now)
        group = self.groups.get(group_name)
        if group is None or consumer not in group.consumers:
            return 0
        returned = 0
        for entry in list(group.entries.values()):
            if entry.state == IN_FLIGHT and entry.consumer == consumer:
                self._leave_flight(entry)
                self._count_redelivery(group)
                self._make_ready(entry, front=False, now=now)
                returned += 1
        del group.consumers[consumer]
        return returned

    # Delivering.

    def advance(self, now: float) -> None:
        """Fire due timers: delayed entries become ready, missed ack
        deadlines redeliver or dead-letter."""
        for kind, entry, ticket in self.wheel.advance(now):
            if entry.ticket != ticket:
                continue
            entry.handle = None
            if kind == _DUE:
                # Ready since its due time, however late this call is.
                self._make_ready(entry, front=False,
                                 now=min(now, entry.wake))
                continue
            self._leave_flight(entry)
            entry.last_error = "ack deadline passed"
            self._on_failure(entry.group, entry.record.lane, now)
            if self._exhausted(entry):
                self._dead_letter(entry, "ack_timeout", now)
            else:
                self._count_redelivery(entry.group)
                self._make_ready(entry, front=False, now=now)

    def fetch(self, group_name: str, consumer: str, max_items: int,
              ack_timeout: float, auto_ack: bool, now: float
              ) -> list[Delivery]:
        self.advance(now)
        # A consumer opened before its topic was deleted and declared
        # again finds no group here, or a new one without it.
        group = self.groups.get(group_name)
        slot = None if group is None else group.consumers.get(consumer)
        if slot is None:
            raise ShutDown(
                f"consumer {consumer} of group {group_name!r} on topic "
                f"{self.config.name!r} is closed")
        limit = max_items if auto_ack else min(max_items, slot[0] - slot[1])
        found: list[Delivery] = []
        while len(found) < limit:
            eligible = self._eligible(group, now)
            lane = group.scheduler.pick(eligible)
            if lane is None:
                break
            # _eligible left a live pair at the head of every eligible lane.
            entry = group.lanes[lane].popleft()[0]
            group.ready -= 1
            # Off its lane now; IN_FLIGHT without a consumer or deadline
            # until the branches below settle it.
            entry.state = IN_FLIGHT
            record = entry.record
            if record.expires is not None and record.expires <= now:
                self._expire(entry, now)
                continue
            if group.bucket is not None or group.lane_buckets:
                self._take_token(group, lane, now)
            entry.attempts += 1
            entry.ticket += 1
            counters = self.counters
            counters["delivered"] = counters.get("delivered", 0) + 1
            group.delivered += 1
            group.countdown -= 1
            if group.countdown <= 0:
                self._sample_delivery(group, entry, now, auto_ack)
            found.append(self._delivery(entry))
            if auto_ack:
                self.count("acked")
                group.acked += 1
                self._finish(entry)
                continue
            entry.state = IN_FLIGHT
            entry.consumer = consumer
            slot[1] += 1
            self._set_timer(entry, now + ack_timeout, _DEADLINE)
        return found

    def _sample_delivery(self, group: _Group, entry: _Entry, now: float,
                         auto_ack: bool) -> None:
        """Record the enqueue-to-deliver latency of a sampled delivery and
        mark it for deliver-to-ack, then restart the countdown."""
        if self.sample_every is None:
            group.countdown = sys.maxsize
            return
        group.countdown = self.sample_every
        group.enqueue_to_deliver.record_s(now - entry.ready_at)
        if not auto_ack:
            entry.sampled_at = now

    def _eligible(self, group: _Group, now: float) -> set[int]:
        eligible: set[int] = set()
        if not group.ready:
            # The lanes contain only stale pairs, so a later call drops
            # them.
            return eligible
        if group.bucket is not None and not group.bucket.available(now):
            return eligible
        for lane, queue in group.lanes.items():
            if not queue:
                continue
            while queue:
                entry, ticket = queue[0]
                if entry.ticket == ticket and entry.state == READY:
                    break
                queue.popleft()
            if not queue:
                continue
            bucket = group.lane_buckets.get(lane)
            if bucket is None or bucket.available(now):
                eligible.add(lane)
        return eligible

    @staticmethod
    def _take_token(group: _Group, lane: int, now: float) -> None:
        if group.bucket is not None:
            group.bucket.take(now)
        bucket = group.lane_buckets.get(lane)
        if bucket is not None:
            bucket.take(now)

    def _delivery(self, entry: _Entry) -> Delivery:
        record = entry.record
        # Built by position through tuple.__new__, because this runs per
        # message and Delivery's keyword arguments are slower.
        return _new_tuple(Delivery, (
            record.id, (record.id, entry.ticket), self.config.name,
            entry.group.name, record.body, record.priority, entry.attempts,
            record.key, record.headers, record.timestamp, record.reply_to,
            record.correlation_id))

    def next_wake(self, group_name: str | None, now: float) -> float | None:
        """Return the clock time of the next timer or rate token, if any."""
        wake = self.wheel.next_deadline()
        group = self.groups.get(group_name) if group_name else None
        if group is None or not group.ready:
            return wake
        buckets = list(group.lane_buckets.values())
        if group.bucket is not None:
            buckets.append(group.bucket)
        for bucket in buckets:
            at = bucket.ready_at(now)
            if at > now and (wake is None or at < wake):
                wake = at
        return wake

    # Acknowledging.

    def _live(self, group_name: str, tag: Any, now: float
              ) -> _Entry | None:
        """Return the in-flight entry of `tag`, or None (counted) if the
        tag is stale. Fires due timers first, so a deadline that passed
        makes the tag stale even if no fetch noticed it yet."""
        self.advance(now)
        group = self.groups.get(group_name)
        message_id, ticket = tag
        entry = None if group is None else group.entries.get(message_id)
        if entry is None or entry.state != IN_FLIGHT or entry.ticket != ticket:
            self.count("late_acks")
            return None
        return entry

    def ack(self, group_name: str, tag: Any, now: float) -> bool:
        entry = self._live(group_name, tag, now)
        if entry is None:
            return False
        counters = self.counters
        counters["acked"] = counters.get("acked", 0) + 1
        group = entry.group
        group.acked += 1
        if entry.sampled_at is not None:
            group.deliver_to_ack.record_s(now - entry.sampled_at)
        self._leave_flight(entry)
        self._finish(entry)
        if group.bucket is not None or group.lane_buckets:
            self._on_success(group, entry.record.lane)
        return True

    def nack(self, group_name: str, tag: Any, requeue: bool,
             delay: float | None, error: str | None, now: float) -> bool:
        entry = self._live(group_name, tag, now)
        if entry is None:
            return False
        self.count("nacked")
        entry.group.nacked += 1
        entry.group.errors += 1
        self._leave_flight(entry)
        if error is not None:
            entry.last_error = error
        self._on_failure(entry.group, entry.record.lane, now)
        if not requeue:
            self._dead_letter(entry, "rejected", now)
        elif self._exhausted(entry):
            self._dead_letter(entry, "max_attempts", now)
        else:
            self._count_redelivery(entry.group)
            wait = retry_delay(self.config, entry.attempts, delay, self.rng)
            if wait > 0:
                self._delay_until(entry, now + wait)
            else:
                self._make_ready(entry, front=False, now=now)
        return True

    def extend(self, group_name: str, tag: Any, seconds: float,
               now: float) -> bool:
        entry = self._live(group_name, tag, now)
        if entry is None:
            return False
        if entry.handle is not None:
            self.wheel.cancel(entry.handle)
        self._set_timer(entry, now + seconds, _DEADLINE)
        return True

    def release(self, group_name: str, tags: Sequence[Any],
                now: float) -> int:
        entries = [self._live(group_name, tag, now) for tag in tags]
        returned = 0
        # Reversed, so that pushing each to its lane's head keeps the order.
        for entry in reversed(entries):
            if entry is None:
                continue
            self._leave_flight(entry)
            entry.attempts -= 1
            self._make_ready(entry, front=True, now=now)
            returned += 1
        return returned

    def in_flight(self, group_name: str, consumer: str) -> int:
        group = self.groups.get(group_name)
        if group is None or consumer not in group.consumers:
            return 0
        return group.consumers[consumer][1]

    def _count_redelivery(self, group: _Group) -> None:
        """Count a delivered message put back for another delivery: after
        a nack with requeue, a missed ack deadline or the close of the
        consumer that held it (a release of unseen messages is not)."""
        self.count("redelivered")
        group.redelivered += 1

    def _exhausted(self, entry: _Entry) -> bool:
        return attempts_exhausted(self.config, entry.attempts,
                                  entry.group.max_attempts)

    def _on_success(self, group: _Group, lane: int) -> None:
        for bucket in (group.bucket, group.lane_buckets.get(lane)):
            if bucket is not None:
                bucket.on_success()

    def _on_failure(self, group: _Group, lane: int, now: float) -> None:
        for bucket in (group.bucket, group.lane_buckets.get(lane)):
            if bucket is not None:
                bucket.on_failure(now)

    def _leave_flight(self, entry: _Entry) -> None:
        """Take an in-flight entry off its consumer and its deadline."""
        if entry.handle is not None:
            self.wheel.cancel(entry.handle)
            entry.handle = None
        if entry.consumer is not None:
            entry.group.consumers[entry.consumer][1] -= 1
        entry.consumer = None
        entry.sampled_at = None

    # Finishing.

    def _finish(self, entry: _Entry) -> None:
        """Remove an entry from its group and show the next one of its key."""
        group = entry.group
        if entry.state == READY:
            group.ready -= 1
        if entry.handle is not None:
            self.wheel.cancel(entry.handle)
            entry.handle = None
        if entry.state == IN_FLIGHT:
            self._leave_flight(entry)
        entry.state = GONE
        entry.ticket += 1
        record = entry.record
        del group.entries[record.id]
        key = record.key
        if key is not None and group.key_heads.get(key) is entry:
            self._show_next(group, key)
        record.refs -= 1
        if record.refs == 0 and record.retain_until <= self.clock():
            self.store.pop(record.id, None)

    def _show_next(self, group: _Group, key: Any) -> None:
        waiting = group.key_waiting.get(key)
        while waiting:
            entry = waiting.popleft()
            if entry.state == HIDDEN:
                group.key_heads[key] = entry
                self._schedule(entry, self.clock())
                break
        else:
            del group.key_heads[key]
        if waiting is not None and not waiting:
            del group.key_waiting[key]

    def _expire(self, entry: _Entry, now: float) -> None:
        if self.config.on_expire == "dead_letter":
            entry.last_error = "ttl passed before delivery"
            self._dead_letter(entry, "expired", now)
        else:
            self.count("expired")
            self._finish(entry)

    def _dead_letter(self, entry: _Entry, reason: str, now: float) -> None:
        record = entry.record
        self.add_dead_letter(record, entry.group.name, entry.attempts,
                             reason, entry.last_error)
        self.count("dead_lettered")
        self.count(f"dead_lettered.{reason}")
        group = entry.group
        group.dead_lettered += 1
        if reason in ("ack_timeout", "expired"):
            # Nacked ones were counted by nack already.
            group.errors += 1
        self._finish(entry)

    def _trim(self, now: float) -> None:
        while self.retained and self.retained[0].retain_until <= now:
            record = self.retained.popleft()
            if record.refs == 0:
                self.store.pop(record.id, None)

    # Dead letters.

    def add_dead_letter(self, record: _Record, group: str, attempts: int,
                        reason: str, error: str | None) -> None:
        """Put `record` into the dead-letter queue as dead-lettered by
        `group`, without counting it (the caller counts, or a topic core
        counted it already)."""
        headers = dict(record.headers)
        headers["mqs.dead_letter_reason"] = reason
        headers["mqs.attempts"] = attempts
        headers["mqs.last_error"] = error
        headers["mqs.group"] = group
        letter = DeadLetter(
            id=record.id, topic=self.config.name, group=group,
            body=record.body, priority=record.priority, key=record.key,
            headers=headers, timestamp=record.timestamp,
            attempts=attempts, reason=reason, error=error)
        # One record can be dead-lettered by several groups; the key
        # makes adding the same letter twice change nothing.
        self.dlq[(record.id, group)] = (letter, record)

    def dlq_list(self, limit: int | None) -> list[DeadLetter]:
        letters = [letter for letter, _ in self.dlq.values()]
        return letters if limit is None else letters[:limit]

    def dlq_redrive(self, ids: Sequence[str] | None, now: float) -> int:
        self.advance(now)
        wanted = None if ids is None else set(ids)
        moved = 0
        for dlq_key, (letter, record) in list(self.dlq.items()):
            if wanted is not None and letter.id not in wanted:
                continue
            group = self.groups.get(letter.group)
            del self.dlq[dlq_key]
            if group is None or record.id in group.entries:
                continue
            record.due = None
            record.expires = None
            if record.id not in self.store:
                self.store[record.id] = record
            self._enter(group, record, now)
            moved += 1
        self.count("redriven", moved)
        return moved

    def dlq_purge(self) -> int:
        purged = len(self.dlq)
        self.dlq.clear()
        self.count("dlq_purged", purged)
        return purged

    # Statistics.

    def stats(self) -> dict[str, int]:
        result = dict(self.counters)
        states = collections.Counter(
            entry.state for group in self.groups.values()
            for entry in group.entries.values())
        result.update(
            stored=len(self.store), ready=states[READY] + states[HIDDEN],
            delayed=states[DELAYED], in_flight=states[IN_FLIGHT],
            dlq=len(self.dlq), groups=len(self.groups))
        return result

    def group_stats(self, now: float) -> list[GroupStats]:
        """Return the lag, counters and latencies of every group."""
        found = []
        for group in self.groups.values():
            states = collections.Counter(
                entry.state for entry in group.entries.values())
            oldest = self._oldest_ready(group)
            found.append(GroupStats(
                topic=self.config.name, group=group.name,
                consumers=len(group.consumers),
                lag_messages=states[READY] + states[HIDDEN],
                lag_seconds=0.0 if oldest is None else max(0.0, now - oldest),
                delayed=states[DELAYED], in_flight=states[IN_FLIGHT],
                delivered=group.delivered, acked=group.acked,
                nacked=group.nacked, redelivered=group.redelivered,
                dead_lettered=group.dead_lettered, errors=group.errors,
                sample_every=self.sample_every,
                enqueue_to_deliver=self._summary(group.enqueue_to_deliver),
                deliver_to_ack=self._summary(group.deliver_to_ack)))
        return found

    @staticmethod
    def _oldest_ready(group: _Group) -> float | None:
        """Return the earliest `ready_at` of the live lane heads.

        Lanes are FIFO by `ready_at`, except that a message released
        unseen goes back to the head with its old, earlier time, so the
        head of each lane holds its oldest ready message.
        """
        oldest = None
        for queue in group.lanes.values():
            while queue:
                entry, ticket = queue[0]
                if entry.ticket == ticket and entry.state == READY:
                    break
                queue.popleft()
            if queue:
                ready_at = queue[0][0].ready_at
                if oldest is None or ready_at < oldest:
                    oldest = ready_at
        return oldest

    def _summary(self, histogram: metrics.LogLinearHistogram
                 ) -> metrics.LatencySummary | None:
        if self.sample_every is None and not histogram.count:
            return None
        return histogram.summary(self.sample_every or 0)


# Counter keys of dropped messages, with the words their log line uses.
_new_tuple = tuple.__new__
_DROP_KEYS = {
    "deduplicated": "dropped as duplicates (dedup_id seen)",
    "expired": "dropped because their ttl passed",
    "dropped_full": "dropped to make room (when_full='drop_oldest')",
    "dead_lettered": "moved to the dead-letter queue",
    "dlq_purged": "purged from the dead-letter queue",
    "dropped_unsubscribed": (
        "dropped because the topic's first group started at 'latest'"),
}


class _ReplayFlag(threading.local):
    active = False


# Set in a thread while it replays records that were applied and logged
# before, in another process or before this open (see `replaying`).
_replay = _ReplayFlag()


@contextlib.contextmanager
def replaying() -> Iterator[None]:
    """Turn off drop warnings in this thread for a replay, because the
    process that first ran the replayed operations logged them."""
    outer = _replay.active
    _replay.active = True
    try:
        yield
    finally:
        _replay.active = outer


def warn_drop_count(log: logging.Logger, topic: str, key: str,
                    before: int, after: int) -> None:
    """Log a WARNING on `log` when the counter `key` of `topic` counts
    dropped messages and passed a power of ten from `before` to `after`.

    Logging at 1, 10, 100 ... drops keeps a flood of drops from flooding
    the log while every cause still shows once.
    """
    if key in _DROP_KEYS and _log_point(before, after):
        log.warning("topic %r: messages %s so far: %d", topic,
                    _DROP_KEYS[key], after)


def _log_point(before: int, after: int) -> bool:
    """Return whether a power of ten lies in (before, after]."""
    power = 1
    while power <= after:
        if power > before:
            return True
        power *= 10
    return False


def wall_clock() -> float:
    return time.time()


# Snapshot tables (see `TopicState.snapshot`).

# The columns of a record and of a group entry. An entry's record is
# stored as a reference, its group is the group it is stored in, and
# its timer handle is scheduled anew by `TopicState.restore`.
_RECORD_FIELDS = ("id", "body", "priority", "lane", "key", "headers",
                  "timestamp", "expires", "due", "reply_to",
                  "correlation_id", "refs", "retain_until")
_ENTRY_FIELDS = ("state", "ticket", "attempts", "wake", "wake_seq",
                 "consumer", "last_error", "ready_at", "sampled_at")
# Group attributes that refer to entries, stored as references.
_GROUP_TABLES = ("entries", "lanes", "key_heads", "key_waiting")
# State attributes that a snapshot leaves out or stores as tables, and
# the keys of those tables in a snapshot.
_NOT_COPIED = ("wheel", "clock", "next_id", "store", "retained", "groups",
               "dlq")
_TABLE_KEYS = ("encoding", "records", "extra_records", "retained", "dlq",
               "dlq_records", "groups")
_record_of = operator.attrgetter("record")
_id_of = operator.attrgetter("id")
_ticket_of = operator.attrgetter("ticket")
_lane_of = operator.attrgetter("lane")
_first = operator.itemgetter(0)
_second = operator.itemgetter(1)
# Kinds of reference from a group snapshot to its entries' records.
_LAST_STORED, _IDS = 0, 1


class _Numbering:
    """Distinct objects numbered from 0 in the order they were added.

    Objects are distinguished by identity, as pickle's memo does, so that
    an object referred to twice is restored as one object. A numbered
    object must stay alive while the numbering is used, because it is
    keyed by `id`.
    """

    __slots__ = ("items", "_index")

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._index: dict[int, int] = {}

    def number(self, item: Any) -> int:
        """Return the number of `item`, numbering it if it is new."""
        number = self._index.get(id(item))
        if number is None:
            number = self._index[id(item)] = len(self.items)
            self.items.append(item)
        return number


def _refer(lookup: dict[str, Any], extras: _Numbering, ids: list[str],
           objects: list[Any]) -> tuple:
    """Return references to `objects`, whose message ids are `ids`.

    A reference is the message id under which `lookup` (the store, or a
    group's entries) holds the object. Objects that `lookup` does not
    hold under that id are numbered in `extras` and listed as
    exceptions ``(position, number)``. This relies on the store being
    keyed by record id and a group's entries by their record's id, as
    every insertion does.
    """
    if all(map(operator.is_, map(lookup.get, ids), objects)):
        return (encode_column(ids), [])
    exceptions = [(position, extras.number(item)) for position, (found, item)
                  in enumerate(zip(map(lookup.get, ids), objects))
                  if found is not item]
    return (encode_column(ids), exceptions)


def _resolve(lookup: dict[str, Any], extras: list[Any],
             reference: tuple) -> list[Any]:
    """Return the objects of a reference that `_refer` made."""
    ids, exceptions = reference
    objects = list(map(lookup.get, decode_column(ids)))
    for position, number in exceptions:
        objects[position] = extras[number]
    return objects


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a restore builds objects.

    Each of the collections that a million new records would trigger
    traverses every object built so far, which made a restore take about
    three times as long. The pause covers every thread of the process;
    collection resumes at the end (unless it was off before), so only
    its timing changes.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _record_columns(records: list[_Record]) -> list[tuple]:
    columns, kinds = slot_columns(_Record, records, _RECORD_FIELDS)
    return list(map(encode_typed_column, columns, kinds))


def _entry_columns(entries: list[_Entry]) -> tuple[list, list, list]:
    """Return the records of `entries`, their `_ENTRY_FIELDS` columns and
    the types of those columns (see `slot_columns`)."""
    columns, kinds = slot_columns(_Entry, entries,
                                  ("record", *_ENTRY_FIELDS))
    return columns[0], columns[1:], kinds[1:]


def _entry_ids(entries: list[_Entry]) -> list[str]:
    return list(map(_id_of, map(_record_of, entries)))


def _ready_by_lane(entries: list[_Entry], states: list[int],
                   lanes: list[int]) -> dict[int, list[_Entry]]:
    """Return the ready entries of each lane, in the order of `entries`
    (whose states and record lanes are `states` and `lanes`)."""
    ready = list(map(operator.eq, states, itertools.repeat(READY)))
    ready_lanes = list(itertools.compress(lanes, ready))
    ready_entries = list(itertools.compress(entries, ready))
    found = set(ready_lanes)
    if len(found) == 1:
        return {found.pop(): ready_entries}
    return {lane: list(itertools.compress(
                ready_entries,
                map(operator.eq, ready_lanes, itertools.repeat(lane))))
            for lane in found}


def _snapshot_group(group: _Group, store: dict[str, _Record],
                    stored: list[_Record],
                    extra_records: _Numbering) -> dict[str, Any]:
    """Return a group's snapshot, referring to records in `store` (whose
    values are `stored`) or numbering them in `extra_records`.

    A lane whose pairs are exactly the ready entries of the lane in the
    order of `group.entries` (a backlog that no redelivery reordered) is
    stored as a mark, and is built from the entries again. Any other lane
    keeps only its live pairs (the entry is ready with the pair's
    ticket), and key queues only their hidden entries, because
    `_eligible`, `_oldest_ready` and `_show_next` skip every other one.
    """
    entries = group.entries
    table = list(entries.values())
    records, columns, kinds = _entry_columns(table)
    ready = _ready_by_lane(table, columns[0], list(map(_lane_of, records)))
    extra_entries = _Numbering()
    lanes = []
    for lane, queue in group.lanes.items():
        expected = ready.get(lane, [])
        if len(queue) == len(expected) \
                and list(map(_first, queue)) == expected \
                and list(map(_second, queue)) == list(
                    map(_ticket_of, expected)):
            lanes.append((lane, None))
            continue
        live = [entry for entry, ticket in queue
                if entry.ticket == ticket and entry.state == READY]
        lanes.append((lane, _refer(entries, extra_entries,
                                   _entry_ids(live), live)))
    heads = list(group.key_heads.values())
    key_heads = (list(group.key_heads),
                 _refer(entries, extra_entries, _entry_ids(heads), heads))
    key_waiting = []
    for key, waiting in group.key_waiting.items():
        hidden = [entry for entry in waiting if entry.state == HIDDEN]
        key_waiting.append((key, _refer(entries, extra_entries,
                                        _entry_ids(hidden), hidden)))
    if extra_entries.items:
        table += extra_entries.items
        records, columns, kinds = _entry_columns(table)
    fields = {name: getattr(group, name) for name in _Group.__slots__
              if name not in _GROUP_TABLES}
    return {"fields": fields, "entries": len(entries),
            "records": _refer_records(store, stored, extra_records, records),
            "entry_columns": list(map(encode_typed_column, columns, kinds)),
            "lanes": lanes, "key_heads": key_heads,
            "key_waiting": key_waiting}


def _refer_records(store: dict[str, _Record], stored: list[_Record],
                   extra_records: _Numbering, records: list[_Record]
                   ) -> tuple[int, Any]:
    """Return references to the records of a group's entries: the count
    of the stored records they are the last of (the usual case, since
    entries join in publish order), or `_refer` ids."""
    count = len(records)
    if count <= len(stored) and records == stored[len(stored) - count:]:
        return (_LAST_STORED, count)
    return (_IDS, _refer(store, extra_records, list(map(_id_of, records)),
                         records))


def _resolve_records(store: dict[str, _Record], stored: _Stored,
                     extra_records: list[_Record], reference: tuple
                     ) -> _Stored:
    """Return the records of a `_refer_records` reference, with their ids
    and lanes."""
    kind, value = reference
    if kind == _LAST_STORED:
        start = len(stored.records) - value
        return _Stored(stored.records[start:], stored.ids[start:],
                       stored.lanes[start:])
    records = _resolve(store, extra_records, value)
    return _Stored(records, list(map(_id_of, records)),
                   list(map(_lane_of, records)))


class _Stored(NamedTuple):
    """Restored records with their id and lane columns."""

    records: list[_Record]
    ids: list[str]
    lanes: list[int]


def _restore_tables(state: TopicState, data: dict[str, Any]) -> None:
    """Set the attributes of `state` from a snapshot of columns."""
    state.__dict__.update((name, value) for name, value in data.items()
                          if name not in _TABLE_KEYS)
    stored = _new_records(data["records"])
    store = state.store = dict(zip(stored.ids, stored.records))
    extras = _new_records(data["extra_records"]).records
    state.retained = collections.deque(
        _resolve(store, extras, data["retained"]))
    dead = _resolve(store, extras, data["dlq_records"])
    state.dlq = collections.OrderedDict(
        (key, (letter, record))
        for (key, letter), record in zip(data["dlq"], dead))
    state.groups = {}
    for item in data["groups"]:
        group = _restore_group(item, store, stored, extras)
        state.groups[group.name] = group


def _restore_group(item: dict[str, Any], store: dict[str, _Record],
                   stored: _Stored, extra_records: list[_Record]
                   ) -> _Group:
    group = _Group.__new__(_Group)
    for name, value in item["fields"].items():
        setattr(group, name, value)
    records = _resolve_records(store, stored, extra_records,
                               item["records"])
    columns = [decode_column(column) for column in item["entry_columns"]]
    table = _new_entries(group, records.records, columns)
    kept = item["entries"]
    entries = group.entries = dict(zip(records.ids[:kept], table[:kept]))
    extras = table[kept:]
    # As `_snapshot_group` found them: among the entries of the dict.
    ready = _ready_by_lane(table[:kept], columns[0][:kept],
                           records.lanes[:kept])
    group.lanes = {}
    for lane, reference in item["lanes"]:
        if reference is None:
            live = ready.get(lane, [])
        else:
            live = _resolve(entries, extras, reference)
        group.lanes[lane] = collections.deque(
            zip(live, map(_ticket_of, live)))
    keys, reference = item["key_heads"]
    group.key_heads = dict(zip(keys, _resolve(entries, extras, reference)))
    group.key_waiting = {
        key: collections.deque(_resolve(entries, extras, reference))
        for key, reference in item["key_waiting"]}
    return group


def _new_records(encoded_columns: list[tuple]) -> _Stored:
    """Build records from the columns of `_RECORD_FIELDS`."""
    columns = [decode_column(column) for column in encoded_columns]
    records = new_with_slots(_Record, _RECORD_FIELDS, columns)
    return _Stored(records, columns[_RECORD_FIELDS.index("id")],
                   columns[_RECORD_FIELDS.index("lane")])


def _new_entries(group: _Group, records: list[_Record],
                 columns: list[list[Any]]) -> list[_Entry]:
    """Build the entries of `group` from their records and the columns of
    `_ENTRY_FIELDS`. Timer handles are None, because
    `TopicState.restore` schedules the timers again."""
    count = len(records)
    return new_with_slots(
        _Entry, ("record", "group", "handle", *_ENTRY_FIELDS),
        [records, [group] * count, [None] * count, *columns])


def _restore_objects(state: TopicState, data: dict[str, Any]) -> None:
    """Set the attributes of `state` from a snapshot of encoding 1,
    which contains the records, entries and groups as pickled objects."""
    state.__dict__.update(data)
    state.store = dict(state.store)
    for group in state.groups.values():
        entries = list(group.entries.values())
        entries += [entry for entry, _ in itertools.chain.from_iterable(
            group.lanes.values())]
        for entry in entries:
            # Snapshots older than the latency metrics lack these.
            if not hasattr(entry, "ready_at"):
                entry.ready_at = 0.0
                entry.sampled_at = None
