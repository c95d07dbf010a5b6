"""Tests of TopicCore.export_image and TopicCore.import_image.

An image is the whole state of a topic core as plain values. Importing
it into a fresh core must keep every message's seq, priority, timestamp
and payload, each group's entries with their attempts, the dead entries
and the counters. In-flight entries come back ready at their lanes'
tails, as a closed consumer's deliveries do.
"""

import itertools

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, event, given, settings

from mqs._topiccore import (
    COUNTER_NAMES,
    ENTRY_DEAD,
    ENTRY_IN_FLIGHT,
    ENTRY_READY,
    GROUP_COUNTER_NAMES,
    TopicCore,
    TopicRetired,
)

LANES = ((9, 3), (5, 2), (0, 1))
NOW = 1000.0
ACK_TIMEOUT = 30.0
SIZES = {"capacity": 32, "slot_bytes": 64, "max_groups": 4,
         "max_consumers": 8}
_names = itertools.count()


@pytest.fixture
def make_core(tmp_path):
    """Return a function that creates a small TopicCore file in tmp_path;
    every core it made is closed after the test."""
    cores = []

    def make(strict=False, **sizes):
        path = tmp_path / f"core-{next(_names)}"
        core = TopicCore(str(path), LANES, strict=strict,
                         **{**SIZES, **sizes})
        cores.append(core)
        return core

    yield make
    for core in cores:
        core.close()


def requeued(image):
    """Return `image` as `import_image` loads it: each group's in-flight
    entries turned ready behind its ready ones, dead entries last."""
    groups = []
    for name, max_attempts, counters, entries in image["groups"]:
        live = [(seq, ENTRY_READY, reason, attempts)
                for seq, state, reason, attempts in entries
                if state != ENTRY_DEAD]
        dead = [entry for entry in entries if entry[1] == ENTRY_DEAD]
        groups.append((name, max_attempts, counters, live + dead))
    return {**image, "groups": groups}


def states(image, group):
    """Return {seq: (state, reason, attempts)} of a group of an image."""
    for name, _, _, entries in image["groups"]:
        if name == group:
            return {seq: (state, reason, attempts)
                    for seq, state, reason, attempts in entries}
    raise AssertionError(f"the image has no group {group!r}")


def drive(core):
    """Drive `core` through the cases an image must keep; return the
    indexes of groups "a" and "b" and of a consumer of each."""
    # Seqs 1-3: kept for the first group, which starts at "earliest".
    for number, priority in enumerate((9, 5, 0)):
        assert core.publish(b"early%d" % number, priority, 1.0 + number,
                            now=NOW) == number + 1
    a = core.open_group("a", True, now=NOW)
    b = core.open_group("b", True, max_attempts=1, now=NOW)
    # Seqs 4-12, three in each lane.
    for number in range(9):
        core.publish(b"m%d" % number, (9, 5, 0)[number % 3], 10.0 + number,
                     now=NOW)
    consumer_a = core.open_consumer(a, 32, 1, now=NOW)
    consumer_b = core.open_consumer(b, 32, 2, now=NOW)

    got_a = core.fetch(consumer_a, 7, ACK_TIMEOUT, now=NOW)
    tags_a = [(item[1], item[2]) for item in got_a]
    assert core.ack(a, *tags_a[0], now=NOW)
    assert core.ack(a, *tags_a[1], now=NOW)
    assert core.nack(a, *tags_a[2], True, now=NOW)
    assert core.nack(a, *tags_a[3], False, now=NOW)
    assert core.release(a, tags_a[4:6], now=NOW) == 2
    # got_a[6] stays in flight.

    # Group b delivers in the same order: the first two seqs are acked
    # by both groups, the third by b only.
    got_b = core.fetch(consumer_b, 4, ACK_TIMEOUT, now=NOW)
    assert [item[0] for item in got_b] == [item[0] for item in got_a[:4]]
    for item in got_b[:3]:
        assert core.ack(b, item[1], item[2], now=NOW)
    # max_attempts 1: a nack with requeue dead-letters it.
    assert core.nack(b, got_b[3][1], got_b[3][2], True, now=NOW)
    assert len(core.fetch(consumer_b, 1, ACK_TIMEOUT, now=NOW)) == 1
    return a, b, consumer_a, consumer_b


def test_export_image_keeps_every_state(make_core):
    core = make_core()
    drive(core)
    image = core.export_image()
    assert not core.retired
    assert image["next_seq"] == 12
    assert image["counters"]["published"] == 12
    assert set(image["counters"]) == set(COUNTER_NAMES)
    seqs = [message[0] for message in image["messages"]]
    assert seqs == sorted(seqs)
    # Two seqs were acked by both groups.
    assert len(seqs) == 10
    assert [group[0] for group in image["groups"]] == ["a", "b"]
    assert image["groups"][1][1] == 1
    assert set(image["groups"][0][2]) == set(GROUP_COUNTER_NAMES)

    kinds_a = [state for state, _, _ in states(image, "a").values()]
    kinds_b = [state for state, _, _ in states(image, "b").values()]
    assert kinds_a.count(ENTRY_IN_FLIGHT) == 1
    assert kinds_a.count(ENTRY_DEAD) == 1
    assert kinds_a.count(ENTRY_READY) == 8
    assert kinds_b.count(ENTRY_IN_FLIGHT) == 1
    assert kinds_b.count(ENTRY_DEAD) == 1
    assert kinds_b.count(ENTRY_READY) == 7


def test_export_image_orders_entries(make_core):
    core = make_core()
    drive(core)
    image = core.export_image()
    entries = image["groups"][0][3]
    order = [state for _, state, _, _ in entries]
    assert order == sorted(order)
    for kind in (ENTRY_IN_FLIGHT, ENTRY_DEAD):
        seqs = [seq for seq, state, _, _ in entries if state == kind]
        assert seqs == sorted(seqs)


def test_import_image_round_trip(make_core):
    core = make_core()
    drive(core)
    image = core.export_image()
    copy = make_core()
    copy.import_image(image, now=NOW)
    assert copy.export_image() == requeued(image)
    assert copy.counters() == core.counters()
    for index in range(2):
        assert copy.group_counters(index) == core.group_counters(index)
    stats = copy.stats()
    original = core.stats()
    assert stats["stored"] == original["stored"]
    assert stats["ready"] == original["ready"] + original["in_flight"]
    assert stats["in_flight"] == 0
    assert stats["dead"] == original["dead"]
    assert stats["groups"] == 2


def test_import_keeps_partly_acked_seq(make_core):
    core = make_core()
    drive(core)
    image = core.export_image()
    only_a = set(states(image, "a")) - set(states(image, "b"))
    assert only_a
    copy = make_core()
    copy.import_image(image, now=NOW)
    copied = copy.export_image()
    assert set(states(copied, "a")) - set(states(copied, "b")) == only_a


def drain(core, group, owner):
    """Fetch and ack every ready entry of `group` through a new consumer;
    return ``(seq, attempts, priority, body)`` in delivery order."""
    consumer = core.open_consumer(group, 64, owner, now=NOW)
    found = core.fetch(consumer, 64, ACK_TIMEOUT, now=NOW)
    for item in found:
        assert core.ack(group, item[1], item[2], now=NOW)
    return [(item[0], item[3], item[4], item[6]) for item in found]


def by_priority(deliveries):
    lanes = {}
    for delivery in deliveries:
        lanes.setdefault(delivery[2], []).append(delivery)
    return lanes


@pytest.mark.parametrize("strict", [False, True], ids=["weighted", "strict"])
def test_import_image_delivery_order(make_core, strict):
    core = make_core(strict=strict)
    a, b, consumer_a, consumer_b = drive(core)
    image = core.export_image()
    copy = make_core(strict=strict)
    copy.import_image(image, now=NOW)
    # Closing the consumers puts their in-flight entries at the tails in
    # seq order, as the import does.
    core.close_consumer(consumer_a, now=NOW)
    core.close_consumer(consumer_b, now=NOW)
    for group, name in ((a, "a"), (b, "b")):
        expected = drain(core, group, 3)
        got = drain(copy, group, 3)
        assert by_priority(got) == by_priority(expected)
        if strict:
            # The weighted scheduler's place in its round is not in the
            # image, but strict lanes need none.
            assert got == expected
        saved = states(image, name)
        for seq, attempts, _, _ in got:
            assert attempts == saved[seq][2] + 1
    assert copy.stats()["stored"] == core.stats()["stored"]


def test_import_image_dead_entries(make_core):
    core = make_core()
    drive(core)
    copy = make_core()
    copy.import_image(core.export_image(), now=NOW)
    dead = copy.peek_dead()
    # (group, slot, name, seq, attempts, reason, priority, timestamp,
    # timed_out, payload): slots may differ.
    expected = sorted(item[2:] for item in core.peek_dead())
    assert sorted(item[2:] for item in dead) == expected
    assert {item[5] for item in dead} == {"rejected", "max_attempts"}
    removed = copy.take_dead()
    assert sorted((item[1], item[3]) for item in removed) == sorted(
        (item[3], item[5]) for item in dead)
    assert copy.peek_dead() == []
    assert copy.stats()["dead"] == 0


def test_import_image_then_operations(make_core):
    core = make_core()
    a, b, _, _ = drive(core)
    image = core.export_image()
    copy = make_core()
    copy.import_image(image, now=NOW)
    stored = copy.stats()["stored"]
    assert copy.publish(b"next", 5, 50.0, now=NOW) == image["next_seq"] + 1
    # A new group at "earliest" enters every stored message.
    c = copy.open_group("c", True, now=NOW)
    assert c == 2
    assert copy.group_stats(now=NOW)[2][3] == stored + 1
    for group in (a, b, c):
        drain(copy, group, 4)
    copy.take_dead()
    assert copy.stats()["stored"] == 0
    assert copy.counters()["acked"] > core.counters()["acked"]


def test_import_image_publish_continues_seq(make_core):
    core = make_core()
    group = core.open_group("g", False, now=NOW)
    consumer = core.open_consumer(group, 8, 1, now=NOW)
    for number in range(3):
        core.publish(b"%d" % number, 5, 1.0, now=NOW)
    assert len(core.fetch(consumer, 8, ACK_TIMEOUT, auto_ack=True,
                          now=NOW)) == 3
    image = core.export_image()
    assert image["messages"] == []
    assert image["next_seq"] == 3
    copy = make_core()
    copy.import_image(image, now=NOW)
    assert copy.publish(b"x", 5, 2.0, now=NOW) == 4


def test_import_image_next_seq_below_last(make_core):
    core = make_core()
    group = core.open_group("g", False, now=NOW)
    core.publish(b"x", 5, 1.0, now=NOW)
    core.publish(b"y", 5, 1.0, now=NOW)
    image = core.export_image()
    image["next_seq"] = 1
    copy = make_core()
    copy.import_image(image, now=NOW)
    assert copy.export_image()["next_seq"] == 2
    assert copy.counters()["published"] == 2
    assert copy.publish(b"z", 5, 1.0, now=NOW) == 3
    assert group == 0


def test_import_image_retained_messages(make_core):
    core = make_core()
    for number, priority in enumerate((0, 9, 5)):
        core.publish(b"r%d" % number, priority, 5.0, now=NOW)
    image = core.export_image()
    assert image["groups"] == []
    assert [message[3] for message in image["messages"]] == [True] * 3
    copy = make_core()
    copy.import_image(image, now=NOW)
    assert copy.export_image() == image
    # The first group at "earliest" takes them in publish order per lane.
    group = copy.open_group("g", True, now=NOW)
    assert [item[0] for item in drain(copy, group, 1)] == [2, 3, 1]
    # A first group at "latest" drops them.
    other = make_core()
    other.import_image(image, now=NOW)
    other.open_group("g", False, now=NOW)
    assert other.stats()["stored"] == 0
    assert other.counters()["dropped_unsubscribed"] == 3


def test_import_image_grows_past_first_slots(make_core):
    # A core uses its first 4096 slots until it needs more.
    count = 4200
    core = make_core(capacity=5000, max_groups=1)
    group = core.open_group("g", True, now=NOW)
    for number in range(count):
        core.publish(b"%d" % number, number % 10, 1.0, now=NOW)
    image = core.export_image()
    copy = make_core(capacity=5000, max_groups=1)
    copy.import_image(image, now=NOW)
    assert copy.export_image() == image
    consumer = copy.open_consumer(group, count, 1, now=NOW)
    found = copy.fetch(consumer, count, ACK_TIMEOUT, auto_ack=True, now=NOW)
    assert sorted(item[0] for item in found) == list(range(1, count + 1))
    assert copy.stats()["stored"] == 0


def test_export_image_of_retired_core(make_core):
    core = make_core()
    drive(core)
    image = core.export_image()
    core.retire()
    assert core.export_image() == image
    with pytest.raises(TopicRetired):
        core.import_image(image)


def test_export_image_of_empty_core(make_core):
    image = make_core().export_image()
    assert image == {"next_seq": 0,
                     "counters": dict.fromkeys(COUNTER_NAMES, 0),
                     "messages": [], "groups": []}


# ---- rejected imports -------------------------------------------------------

def valid_image():
    """Return a small image with two groups, three messages, and an
    entry of each state."""
    group_counters = dict.fromkeys(GROUP_COUNTER_NAMES, 0)
    return {
        "next_seq": 5,
        "counters": {**dict.fromkeys(COUNTER_NAMES, 0), "published": 5},
        "messages": [(2, 9, 1.0, False, b"a"), (3, 5, 1.0, False, b"b"),
                     (5, 0, 1.0, False, b"c")],
        "groups": [
            ("a", 0, dict(group_counters),
             [(3, ENTRY_READY, 0, 1), (2, ENTRY_IN_FLIGHT, 0, 1),
              (5, ENTRY_DEAD, 1, 2)]),
            ("b", 2, dict(group_counters), [(5, ENTRY_READY, 0, 0)]),
        ],
    }


def set_entries(image, group, entries):
    name, max_attempts, counters, _ = image["groups"][group]
    image["groups"][group] = (name, max_attempts, counters, entries)


def set_message(image, index, **fields):
    names = ("seq", "priority", "timestamp", "retained", "payload")
    values = dict(zip(names, image["messages"][index]))
    values.update(fields)
    image["messages"][index] = tuple(values[name] for name in names)


def with_groups(count):
    def change(image):
        template = image["groups"][1]
        image["groups"] = [(f"g{index}", *template[1:])
                           for index in range(count)]
        image["groups"][0] = ("g0", *valid_image()["groups"][0][1:])
    return change


def more_messages(image):
    image["messages"] = [(seq, 5, 1.0, True, b"") for seq in range(1, 6)]
    image["groups"] = []


BAD_IMAGES = [
    ("entry seq unknown",
     lambda image: set_entries(image, 1, [(99, ENTRY_READY, 0, 0)]),
     r"entry for seq 99, which is not among"),
    ("entry listed twice",
     lambda image: set_entries(image, 1, [(5, ENTRY_READY, 0, 0),
                                          (5, ENTRY_DEAD, 1, 0)]),
     r"group 'b' lists its entry for seq 5 twice"),
    ("message without entry",
     lambda image: set_entries(image, 0, [(5, ENTRY_DEAD, 1, 2),
                                          (2, ENTRY_READY, 0, 0)]),
     r"message 3 has no entry in any group and is not retained"),
    ("too many groups", with_groups(5),
     r"5 groups, more than the 4 of topic core"),
    ("too many messages", more_messages,
     r"5 messages, more than the capacity 4"),
    ("state 0", lambda image: set_entries(image, 1, [(5, 0, 0, 0)]),
     r"state of the entry for seq 5 in group 'b' must be 1 to 3, got 0"),
    ("state 4", lambda image: set_entries(image, 1, [(5, 4, 0, 0)]),
     r"must be 1 to 3, got 4"),
    ("seq 0", lambda image: set_message(image, 0, seq=0),
     r"message seq must be 1 to \d+, got 0"),
    ("seqs descending", lambda image: set_message(image, 1, seq=1),
     r"strictly ascending, got 1 after 2"),
    ("seq repeated", lambda image: set_message(image, 1, seq=2),
     r"strictly ascending, got 2 after 2"),
    ("priority 10", lambda image: set_message(image, 0, priority=10),
     r"priority of message 2 must be 0 to 9, got 10"),
    ("payload too large", lambda image: set_message(image, 0,
                                                    payload=b"x" * 65),
     r"a body of 65 bytes is larger than the 64 bytes"),
    ("payload not bytes", lambda image: set_message(image, 0,
                                                    payload="text"),
     r"payload of message 2 must be bytes, got str"),
    ("retained with groups", lambda image: set_message(image, 2,
                                                       retained=True),
     r"message 5 is retained, but the image has groups"),
    ("reason on ready entry",
     lambda image: set_entries(image, 1, [(5, ENTRY_READY, 1, 0)]),
     r"dead reason of the entry for seq 5 in group 'b' \(ready\) must be "
     r"0 to 0, got 1"),
    ("reason 4", lambda image: set_entries(image, 1, [(5, ENTRY_DEAD, 4, 0)]),
     r"must be 0 to 3, got 4"),
    ("attempts too large",
     lambda image: set_entries(image, 1, [(5, ENTRY_READY, 0, 1 << 48)]),
     rf"attempts of the entry for seq 5 in group 'b' must be 0 to "
     rf"{(1 << 48) - 1}, got {1 << 48}"),
    ("group name twice",
     lambda image: image["groups"].append(image["groups"][1]),
     r"lists group 'b' twice"),
    ("group name empty",
     lambda image: image["groups"].__setitem__(
         1, ("", *image["groups"][1][1:])),
     r"group names of a topic core are 1 to 120 bytes, got ''"),
    ("max_attempts negative",
     lambda image: image["groups"].__setitem__(
         1, ("b", -1, *image["groups"][1][2:])),
     r"max_attempts of group 'b' must be 0 to \d+, got -1"),
    ("next_seq negative", lambda image: image.__setitem__("next_seq", -1),
     r"next_seq must be 0 to \d+, got -1"),
    ("key missing", lambda image: image.pop("counters"),
     r"the image has no 'counters' key"),
    ("counter unknown",
     lambda image: image["counters"].__setitem__("bogus", 1),
     r"counters has the unknown counter 'bogus'"),
    ("counter missing", lambda image: image["counters"].pop("acked"),
     r"counters has no counter 'acked'"),
    ("message too short",
     lambda image: image["messages"].__setitem__(0, (2, 9, 1.0, False)),
     r"a message must be a tuple \(seq, priority, timestamp, retained, "
     r"payload\), got \(2, 9, 1.0, False\)"),
    ("entry too long",
     lambda image: set_entries(image, 1, [(5, ENTRY_READY, 0, 0, 0)]),
     r"an entry of group 'b' must be a tuple"),
    ("timestamp not a number",
     lambda image: set_message(image, 0, timestamp="now"),
     r"timestamp of message 2 must be a number, got 'now'"),
    ("group counter missing",
     lambda image: image["groups"][0][2].pop("errors"),
     r"the counters of group 'a' has no counter 'errors'"),
]


@pytest.mark.parametrize("change, match", [case[1:] for case in BAD_IMAGES],
                         ids=[case[0] for case in BAD_IMAGES])
def test_import_image_rejects(make_core, change, match):
    core = make_core(capacity=4)
    image = valid_image()
    change(image)
    fresh = core.export_image()
    with pytest.raises(ValueError, match=match):
        core.import_image(image, now=NOW)
    # Rejected before anything changed: a valid image still loads.
    assert core.export_image() == fresh
    core.import_image(valid_image(), now=NOW)
    assert core.export_image() == requeued(valid_image())


def test_import_image_valid_image_loads(make_core):
    core = make_core(capacity=4)
    core.import_image(valid_image(), now=NOW)
    assert core.export_image() == requeued(valid_image())


@pytest.mark.parametrize("setup, match", [
    (lambda core: core.publish(b"x", 5, 1.0, now=NOW),
     r"has published messages up to seq 1"),
    (lambda core: core.open_group("g", True, now=NOW), r"has groups"),
], ids=["published", "group"])
def test_import_image_rejects_used_core(make_core, setup, match):
    core = make_core()
    setup(core)
    before = core.export_image()
    with pytest.raises(ValueError, match=rf"topic core .*core-\d+: it "
                                         rf"{match}"):
        core.import_image(valid_image(), now=NOW)
    assert core.export_image() == before


def test_import_image_rejects_twice(make_core):
    core = make_core()
    core.import_image(valid_image(), now=NOW)
    with pytest.raises(ValueError, match=r"published messages up to seq 5"):
        core.import_image(valid_image(), now=NOW)


# ---- property ---------------------------------------------------------------

# Groups g1 and g2 open after the early publishes, and g3 opens on the
# first "open" operation. g2 dead-letters on its second failed delivery.
PUBLISH = st.tuples(st.just("publish"), st.integers(0, 9))
FETCH = st.tuples(st.just("fetch"), st.sampled_from(["g1", "g2", "g3"]),
                  st.integers(1, 3))
SETTLE = st.tuples(st.just("settle"),
                   st.sampled_from(["ack", "nack", "reject", "release"]),
                   st.integers(0, 7))
# Listed twice to draw them more often: a dead entry needs a publish, a
# fetch and a settle in that order.
OPERATIONS = st.lists(st.one_of(
    PUBLISH, PUBLISH, FETCH, FETCH, SETTLE, SETTLE,
    st.tuples(st.just("open"), st.booleans()),
    st.tuples(st.just("expire")),
), min_size=6, max_size=30)


def open_group(core, name, earliest, now, consumers):
    group = core.open_group(name, earliest,
                            max_attempts=2 if name == "g2" else None,
                            now=now)
    consumers[name] = (group, core.open_consumer(group, 4, 1, now=now))


def run_operations(core, early, earliest, operations):
    """Publish `early` priorities, open g1 and g2 (at "earliest" where
    its flag is set), then apply `operations`; return the clock at the
    end."""
    now = NOW
    consumers = {}
    in_flight_tags = []
    for priority in early:
        core.publish(b"e%d" % priority, priority, now, now=now)
    open_group(core, "g1", earliest[0], now, consumers)
    open_group(core, "g2", earliest[1], now, consumers)
    for operation in operations:
        kind = operation[0]
        if kind == "publish":
            core.publish(b"p%d" % operation[1], operation[1], now, now=now)
        elif kind == "open" and "g3" not in consumers:
            open_group(core, "g3", operation[1], now, consumers)
        elif kind == "fetch" and operation[1] in consumers:
            group, consumer = consumers[operation[1]]
            for item in core.fetch(consumer, operation[2], 1.05, now=now):
                in_flight_tags.append((group, item[1], item[2]))
        elif kind == "settle" and in_flight_tags:
            index = operation[2] % len(in_flight_tags)
            group, slot, ticket = in_flight_tags.pop(index)
            if operation[1] == "ack":
                core.ack(group, slot, ticket, now=now)
            elif operation[1] == "release":
                core.release(group, [(slot, ticket)], now=now)
            else:
                core.nack(group, slot, ticket, operation[1] == "nack",
                          now=now)
        elif kind == "expire":
            # Every delivery in flight misses its deadline.
            now += 2.0
            core.advance(now=now)
            in_flight_tags.clear()
    return now


def dead_entries(core):
    """Return the dead entries of `core` by group name and seq, without
    slots and timed_out: an image keeps only whether the last deadline
    passed (reason "ack_timeout"), not an earlier one."""
    return sorted(item[2:8] + item[9:] for item in core.peek_dead())


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(early=st.lists(st.integers(0, 9), min_size=1, max_size=4),
       earliest=st.tuples(st.booleans(), st.booleans()),
       operations=OPERATIONS)
def test_import_image_property(make_core, early, earliest, operations):
    core = make_core(capacity=16)
    now = run_operations(core, early, earliest, operations)
    image = core.export_image()
    for _, _, _, entries in image["groups"]:
        for state in {entry[1] for entry in entries}:
            event(f"entry state {state}")
    copy = make_core(capacity=16)
    copy.import_image(image, now=now)
    assert copy.export_image() == requeued(image)
    assert copy.counters() == core.counters()
    assert dead_entries(copy) == dead_entries(core)
    copy.close()
    core.close()
