"""`TopicState.snapshot` and `restore`: a restored state is the same state.

Random operations run on a `TopicState`; at random points its snapshot
goes through pickle into a twin. From then on both get the same
operations, and every result, the stats, the dead letters and a full
dump of the state must match, delivery tags, attempts, timers and lane
order included. Snapshots of encoding 1 (the objects themselves, as mqs
wrote them before the column encoding) must restore the same way.
"""

import collections
import itertools
import pickle
import random

import pytest

from mqs.broker._backend import Envelope
from mqs.broker._policy import Backoff, Rate, TopicConfig
from mqs.broker._state import (
    HIDDEN,
    READY,
    SNAPSHOT_ENCODING,
    TopicState,
    _ENTRY_FIELDS,
    _Entry,
    _RECORD_FIELDS,
    _Record,
)

CONFIGS = {
    "plain": TopicConfig.build("t"),
    "keys_and_retries": TopicConfig.build(
        "t", weights={9: 3, 4: 2, 0: 1}, max_attempts=3,
        retry=Backoff(base=0.25, factor=2.0, max=2.0, jitter=0.5),
        on_expire="dead_letter", dedup_window=5.0),
    "bounded_retained": TopicConfig.build(
        "t", weights={5: 1, 0: 1}, policy="strict", retention=3.0,
        maxsize=40, when_full="drop_oldest", ttl=4.0),
    "rate_limited": TopicConfig.build(
        "t", rate=Rate(20.0, adaptive=True)),
}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Ids:
    def __init__(self, start=0):
        self.next = start

    def __call__(self):
        self.next += 1
        return str(self.next)


def legacy_snapshot(state):
    """Return the snapshot of encoding 1: the state's attributes, objects
    included, as `TopicState.snapshot` returned it before encoding 2."""
    data = dict(state.__dict__)
    for name in ("wheel", "clock", "next_id"):
        del data[name]
    return data


def dump(state):
    """Return everything a state contains as plain data, for comparison.

    Lane pairs and key queue entries that every operation skips (see
    `TopicState.snapshot`) are left out, as a snapshot leaves them out.
    """
    def record_row(record):
        return tuple(getattr(record, name) for name in _RECORD_FIELDS)

    def entry_row(entry):
        return (entry.record.id, entry.group.name,
                entry.handle is not None,
                *(getattr(entry, name) for name in _ENTRY_FIELDS))

    groups = {}
    for name, group in state.groups.items():
        for key, entry in group.entries.items():
            assert entry.record.id == key
            assert entry.record is state.store[key]
        groups[name] = {
            "entries": [entry_row(entry)
                        for entry in group.entries.values()],
            "lanes": {lane: [(entry.record.id, ticket)
                             for entry, ticket in queue
                             if entry.ticket == ticket
                             and entry.state == READY]
                      for lane, queue in group.lanes.items()},
            "key_heads": {key: entry.record.id
                          for key, entry in group.key_heads.items()},
            "key_waiting": {key: [entry.record.id for entry in waiting
                                  if entry.state == HIDDEN]
                            for key, waiting in group.key_waiting.items()},
            "consumers": group.consumers,
            "scheduler": (group.scheduler.cursor,
                          list(group.scheduler.deficits)),
            "counters": (group.delivered, group.acked, group.nacked,
                         group.redelivered, group.dead_lettered,
                         group.errors, group.ready, group.countdown,
                         group.max_attempts),
            "histograms": (group.enqueue_to_deliver.count,
                           group.deliver_to_ack.count),
            "buckets": (None if group.bucket is None
                        else dict(vars(group.bucket))),
        }
    return {
        "store": [record_row(record) for record in state.store.values()],
        "retained": [record_row(record) for record in state.retained],
        "dlq": [(key, letter, record_row(record))
                for key, (letter, record) in state.dlq.items()],
        "dedup": list(state.dedup.items()),
        "counters": state.counters,
        "timer_seq": state.timer_seq,
        "rng": state.rng.getstate(),
        "next_wake": state.wheel.next_deadline(),
        "groups": groups,
    }


class Driver:
    """Random operations, applied the same way to several states."""

    def __init__(self, seed, config_name):
        self.random = random.Random(seed)
        self.config = CONFIGS[config_name]
        self.clock = Clock()
        self.tags = collections.defaultdict(list)
        self.consumers = {"g": ["c1"], "h": []}
        self.sequence = itertools.count()

    def new_state(self):
        ids = Ids()
        state = TopicState(self.config, self.clock, ids, sample_every=3)
        state.rng = random.Random(7)
        state.open_consumer("g", "c1", "earliest", 5, None,
                            self.clock.now)
        return state, ids

    def operation(self):
        """Return a random operation: a function of a state."""
        rnd = self.random
        now = self.clock.now
        kind = rnd.choice(["publish"] * 6 + ["fetch"] * 4 + ["ack"] * 3 + [
            "nack", "extend", "release", "advance", "advance", "open",
            "close", "redrive", "purge", "stats"])

        if kind == "publish":
            envelopes = [self.envelope() for _ in range(rnd.randint(1, 4))]
            return lambda state: state.publish(envelopes, now, 1.7e9 + now)
        if kind == "fetch":
            group, consumer = self.consumer()
            if consumer is None:
                return None
            count = rnd.randint(1, 4)
            auto_ack = rnd.random() < 0.2
            return lambda state: self.fetch(state, group, consumer, count,
                                            auto_ack, now)
        if kind in ("ack", "nack", "extend", "release"):
            return self.settle(kind, now)

        if kind == "advance":
            self.clock.now += rnd.choice([0.125, 0.5, 1.0, 2.5])
            later = self.clock.now
            return lambda state: state.advance(later)

        if kind == "open":
            group = rnd.choice(["g", "h"])
            consumer = f"c{next(self.sequence)}"
            self.consumers[group].append(consumer)
            start = rnd.choice(["earliest", "latest"])
            return lambda state: state.open_consumer(
                group, consumer, start, 4, None, now)
        if kind == "close":
            group, consumer = self.consumer()
            if consumer is None or len(self.consumers[group]) < 2:
                return None
            self.consumers[group].remove(consumer)
            return lambda state: state.close_consumer(group, consumer, now)

        if kind == "redrive":
            return lambda state: state.dlq_redrive(None, now)
        if kind == "purge":
            if rnd.random() < 0.5:
                return None
            return lambda state: state.dlq_purge()
        return lambda state: (state.stats(), state.group_stats(now))

    def envelope(self):
        rnd = self.random
        return Envelope(
            pickle.dumps(next(self.sequence)),
            priority=rnd.choice([0, 0, 4, 5, 9]),
            delay=rnd.choice([0.0, 0.0, 0.0, 0.5, 1.25]),
            key=rnd.choice([None, None, None, "a", "b"]),
            headers=rnd.choice([None, None, {"h": 1}]),
            dedup_id=rnd.choice([None, None, None, rnd.randint(0, 5)]),
            reply_to=rnd.choice([None, "replies"]),
            ttl=rnd.choice([None, None, 2.0]))

    def consumer(self):
        group = self.random.choice(["g", "h"])
        if not self.consumers[group]:
            return group, None
        return group, self.random.choice(self.consumers[group])

    def fetch(self, state, group, consumer, count, auto_ack, now):
        if group not in state.groups \
                or consumer not in state.groups[group].consumers:
            return None
        found = state.fetch(group, consumer, count, 1.0, auto_ack, now)
        if not auto_ack and state is self.leader:
            self.tags[group].extend(delivery.tag for delivery in found)
        return found

    def settle(self, kind, now):
        rnd = self.random
        group = rnd.choice(["g", "h"])
        if not self.tags[group]:
            return None
        tag = self.tags[group].pop(rnd.randrange(len(self.tags[group])))
        if kind == "ack":
            return lambda state: state.ack(group, tag, now)
        if kind == "nack":
            requeue = rnd.random() < 0.7
            delay = rnd.choice([None, 0.0, 0.75])
            return lambda state: state.nack(group, tag, requeue, delay,
                                            "failed", now)
        if kind == "extend":
            self.tags[group].append(tag)
            return lambda state: state.extend(group, tag, 1.5, now)
        return lambda state: state.release(group, [tag], now)


def restored(state, ids, clock, encode):
    data = pickle.loads(pickle.dumps(encode(state),
                                     protocol=pickle.HIGHEST_PROTOCOL))
    twin_ids = Ids(ids.next)
    return TopicState.restore(data, clock, twin_ids), twin_ids


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("encode", [TopicState.snapshot, legacy_snapshot],
                         ids=["columns", "objects"])
def test_snapshot_restore_continues_identically(config_name, seed, encode):
    driver = Driver(seed, config_name)
    state, ids = driver.new_state()
    driver.leader = state
    twins = []
    for step in range(400):
        if driver.random.random() < 0.03:
            twin, twin_ids = restored(state, ids, driver.clock, encode)
            assert dump(twin) == dump(state), f"restore at step {step}"
            twins.append(twin)
        operation = driver.operation()
        if operation is None:
            continue
        expected = operation(state)
        for twin in twins:
            assert operation(twin) == expected, f"step {step}"
    for twin in twins:
        assert dump(twin) == dump(state)
        assert twin.dlq_list(None) == state.dlq_list(None)


def test_snapshot_keeps_lanes_reordered_by_release():
    clock = Clock()
    state = TopicState(TopicConfig.build("t"), clock, Ids())
    state.open_consumer("g", "c", "earliest", 10, None, clock.now)
    state.publish([Envelope(pickle.dumps(n)) for n in range(6)],
                  clock.now, 1.7e9)
    tags = [delivery.tag for delivery
            in state.fetch("g", "c", 3, 30.0, False, clock.now)]
    # Released unseen, back at the head in their old order, ahead of
    # messages published earlier than their release.
    state.release("g", tags[1:], clock.now)
    twin = TopicState.restore(
        pickle.loads(pickle.dumps(state.snapshot())), clock, Ids(6))
    assert dump(twin) == dump(state)
    order = [delivery.id for delivery
             in twin.fetch("g", "c", 10, 30.0, False, clock.now)]
    assert order == ["2", "3", "4", "5", "6"]


def test_snapshot_restores_records_no_longer_stored():
    clock = Clock()
    config = TopicConfig.build("t", max_attempts=1)
    state = TopicState(config, clock, Ids())
    state.open_consumer("g", "c", "earliest", 10, None, clock.now)
    state.publish([Envelope(pickle.dumps("bad")), Envelope(b"ok")],
                  clock.now, 1.7e9)
    first = state.fetch("g", "c", 1, 30.0, False, clock.now)[0]
    state.nack("g", first.tag, False, None, "broken", clock.now)
    # The dead letter's record left the store with its last entry.
    assert "1" not in state.store

    twin = TopicState.restore(
        pickle.loads(pickle.dumps(state.snapshot())), clock, Ids(2))
    assert dump(twin) == dump(state)
    assert twin.dlq_list(None) == state.dlq_list(None)
    assert twin.dlq_redrive(None, clock.now) == 1
    redriven = twin.fetch("g", "c", 10, 30.0, False, clock.now)
    assert [delivery.id for delivery in redriven] == ["2", "1"]
    assert redriven[1].body == pickle.dumps("bad")


def test_snapshot_shares_records_between_groups():
    clock = Clock()
    state = TopicState(TopicConfig.build("t"), clock, Ids())
    state.open_consumer("g", "c", "earliest", 10, None, clock.now)
    state.open_consumer("h", "d", "earliest", 10, None, clock.now)
    state.publish([Envelope(b"x")] * 3, clock.now, 1.7e9)
    state.fetch("g", "c", 1, 30.0, True, clock.now)

    twin = TopicState.restore(
        pickle.loads(pickle.dumps(state.snapshot())), clock, Ids(3))
    for message_id, record in twin.store.items():
        for group in twin.groups.values():
            entry = group.entries.get(message_id)
            if entry is not None:
                assert entry.record is record
    assert twin.store["1"].refs == 1
    assert twin.store["2"].refs == 2


def test_snapshot_stores_columns_not_objects():
    clock = Clock()
    state = TopicState(TopicConfig.build("t"), clock, Ids())
    state.open_consumer("g", "c", "earliest", 10, None, clock.now)
    state.publish([Envelope(b"x" * 10)] * 100, clock.now, 1.7e9)
    data = state.snapshot()
    assert data["encoding"] == SNAPSHOT_ENCODING

    class NoRecords(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, (_Record, _Entry)):
                raise AssertionError(f"snapshot pickles {obj!r}")
            return NotImplemented

    NoRecords(__import__("io").BytesIO()).dump(data)


def test_snapshot_record_fields_cover_slots():
    assert set(_RECORD_FIELDS) == set(_Record.__slots__)
    assert set(_ENTRY_FIELDS) | {"record", "group", "handle"} \
        == set(_Entry.__slots__)


def test_restore_rejects_newer_encoding():
    clock = Clock()
    data = TopicState(TopicConfig.build("t"), clock, Ids()).snapshot()
    data["encoding"] = SNAPSHOT_ENCODING + 1
    with pytest.raises(ValueError, match="upgrade mqs"):
        TopicState.restore(data, clock, Ids())


def test_snapshot_keeps_objects_outside_their_tables():
    """References that the store or a group's entries do not resolve
    (no operation makes them) restore as the same objects."""
    clock = Clock()
    state = TopicState(TopicConfig.build("t"), clock, Ids())
    state.open_consumer("g", "c", "earliest", 10, None, clock.now)
    state.publish([Envelope(pickle.dumps(n)) for n in range(4)],
                  clock.now, 1.7e9)
    group = state.groups["g"]
    # A ready entry that only its lane refers to, whose record is no
    # longer stored either.
    outside = group.entries.pop("2")
    del state.store["2"]

    twin = TopicState.restore(
        pickle.loads(pickle.dumps(state.snapshot())), clock, Ids(4))
    twin_group = twin.groups["g"]
    assert "2" not in twin_group.entries
    assert "2" not in twin.store
    lane = twin_group.lanes[outside.record.lane]
    assert [(entry.record.id, ticket) for entry, ticket in lane] \
        == [("1", 1), ("2", 1), ("3", 1), ("4", 1)]
    restored = lane[1][0]
    assert restored.record.body == pickle.dumps(1)
    assert restored.group is twin_group
    assert restored.state == READY
