"""Tests of mqs._topiccore.TopicCore beyond the model test: files,
attaching, retiring and exporting."""

import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

import mqs
from mqs._topiccore import (
    LAYOUT_VERSION,
    PAYLOAD_BYTES,
    PAYLOAD_EXTRAS,
    TopicCore,
    TopicCoreLayoutError,
    TopicCoreVersionError,
    TopicRetired,
    decode_payload,
)
from mqs.broker._backend import Delivery
from mqs.errors import ShutDown

LANES = ((9, 8), (5, 4), (0, 1))


@pytest.fixture
def path():
    name = f"/dev/shm/mqs.test-core.{os.getpid()}.{uuid.uuid4().hex}"
    yield name
    if os.path.exists(name):
        os.unlink(name)


def test_topiccore_second_handle_shares_state(path):
    first = TopicCore(path, LANES)
    second = TopicCore(path, LANES, capacity=8)
    assert first.created
    assert not second.created
    group = first.open_group("g", False)
    consumer = second.open_consumer(group, 4, 1)
    assert first.publish(b"x", 5, 1.0) == 1
    found = second.fetch(consumer, 4, 30.0)
    assert [item[0] for item in found] == [1]
    assert found[0][6] == b"x"
    assert first.ack(group, found[0][1], found[0][2])
    first.close()
    second.close()


def test_topiccore_rejects_foreign_file(path):
    with open(path, "wb") as file:
        file.write(b"\0" * 8192)
    with pytest.raises(TopicCoreLayoutError, match="not a topic core"):
        TopicCore(path, LANES)


# Byte offset of the layout version in a topic core file: after the
# 64-bit magic (mqs_tc_config_t in mqs_topiccore.h).
VERSION_OFFSET = 8


@pytest.mark.parametrize("delta", [-1, 1])
def test_topiccore_rejects_other_layout_version(path, delta):
    TopicCore(path, LANES).close()
    with open(path, "rb") as file:
        file.seek(VERSION_OFFSET)
        (ours,) = struct.unpack("<I", file.read(4))
    assert ours == LAYOUT_VERSION
    with open(path, "r+b") as file:
        file.seek(VERSION_OFFSET)
        file.write(struct.pack("<I", ours + delta))

    with pytest.raises(TopicCoreVersionError, match=(
            rf"{path} has topic core layout version {ours + delta}, and "
            rf"this mqs reads version {ours}: processes of two mqs "
            rf"versions share its shm broker. Run every process")) as raised:
        TopicCore(path, LANES)
    error = raised.value
    assert isinstance(error, TopicCoreLayoutError)
    assert isinstance(error, mqs.LayoutVersionError)
    assert (error.path, error.version, error.expected_version) == (
        path, ours + delta, ours)


def test_topiccore_rejects_bad_sizes(path):
    with pytest.raises(ValueError, match="invalid topic core sizes"):
        TopicCore(path, LANES, capacity=0)
    with pytest.raises(ValueError, match="1 to 10 lanes"):
        TopicCore(path, [])


def test_topiccore_rejects_large_body(path):
    core = TopicCore(path, LANES, slot_bytes=16)
    with pytest.raises(ValueError, match="larger than the 16 bytes"):
        core.publish(b"x" * 17, 0, 0.0)
    core.close()


def test_topiccore_fetch_checks_owner(path):
    core = TopicCore(path, LANES)
    group = core.open_group("g", False)
    consumer = core.open_consumer(group, 4, 77)
    core.publish(b"x", 0, 0.0)
    with pytest.raises(ShutDown):
        core.fetch(consumer, 1, 30.0, owner=78)
    assert len(core.fetch(consumer, 1, 30.0, owner=77)) == 1
    core.close()


def test_topiccore_publish_pickled_stores_pickle(path):
    core = TopicCore(path, LANES, slot_bytes=64)
    group = core.open_group("g", True)
    consumer = core.open_consumer(group, 4, 1)
    before = time.time()
    assert core.publish_pickled({"n": 1}, 5) == 1
    after = time.time()
    (item,) = core.fetch(consumer, 4, 30.0)
    seq, _, _, attempts, priority, timestamp, payload = item
    assert (seq, attempts, priority) == (1, 1, 5)
    assert before <= timestamp <= after
    assert payload == pickle.dumps({"n": 1},
                                   protocol=pickle.HIGHEST_PROTOCOL)
    core.close()


def test_topiccore_publish_pickled_reports_full_and_too_big(path):
    core = TopicCore(path, LANES, capacity=2, slot_bytes=64)
    assert core.publish_pickled(b"x" * 64, 0) == -2
    assert core.publish_pickled("a", 0) == 1
    assert core.publish_pickled("b", 0) == 2
    assert core.publish_pickled("c", 0) == -1
    with pytest.raises(ValueError, match="priority must be 0 to 9"):
        TopicCore(path, LANES).publish_pickled("d", 10)
    with pytest.raises(TypeError, match="cannot pickle"):
        core.publish_pickled(threading.Lock(), 0)
    core.close()


def test_topiccore_closed_handle_raises(path):
    core = TopicCore(path, LANES)
    group = core.open_group("g", True)
    consumer = core.open_consumer(group, 2, 7)
    core.close()
    with pytest.raises(ValueError, match="is closed"):
        core.publish_pickled("x", 0)
    with pytest.raises(ValueError, match="is closed"):
        fetch_one(core, consumer)
    assert not core.has_dead()
    for read in (lambda: core.consumer_owner(consumer),
                 lambda: core.consumer_in_flight(consumer),
                 core.counters, lambda: core.group_counters(group)):
        with pytest.raises(ValueError, match="is closed"):
            read()


def test_topiccore_group_counters_rejects_unknown_index(path):
    core = TopicCore(path, LANES, max_groups=4)
    with pytest.raises(ValueError, match="group index 4 is out of range"):
        core.group_counters(4)
    core.close()


def fetch_one(core, consumer, owner=7):
    return core.fetch_one(consumer, 30.0, False, owner, Delivery, "t", "g",
                          0)


def test_topiccore_fetch_one_delivers_one_at_a_time(path):
    core = TopicCore(path, LANES)
    group = core.open_group("g", True)
    consumer = core.open_consumer(group, 2, 7)
    assert fetch_one(core, consumer) is None
    for body in ("a", "b", "c"):
        core.publish_pickled(body, 0)
    first = fetch_one(core, consumer)
    second = fetch_one(core, consumer)
    assert isinstance(first, Delivery)
    assert first.id == "s1"
    assert first.tag[0] == path
    assert first.tag[1] == group
    assert first.tag[4] == 1
    assert (first.topic, first.group) == ("t", "g")
    assert first.body == "a"
    assert (first.priority, first.attempts, first.key) == (0, 1, None)
    assert first.headers == {}
    assert (first.reply_to, first.correlation_id) == (None, None)
    assert second.id == "s2"
    assert second.body == "b"
    # Two in flight is the prefetch: nothing more until an ack.
    assert fetch_one(core, consumer) is None
    assert core.ack(group, first.tag[2], first.tag[3])
    assert fetch_one(core, consumer).body == "c"
    with pytest.raises(ShutDown, match="is closed"):
        fetch_one(core, consumer, owner=8)
    core.close()


def test_topiccore_fetch_one_unpacks_extras(path):
    core = TopicCore(path, LANES)
    group = core.open_group("g", True)
    consumer = core.open_consumer(group, 2, 7)
    extras = pickle.dumps((pickle.dumps([1, 2]), {"h": 1}, "reply", "c1"))
    core.publish(bytes([PAYLOAD_EXTRAS]) + extras, 3, 1.0)
    delivery = fetch_one(core, consumer)
    assert delivery.priority == 3
    assert delivery.timestamp == 1.0
    assert delivery.body == [1, 2]
    assert delivery.headers == {"h": 1}
    assert (delivery.reply_to, delivery.correlation_id) == ("reply", "c1")
    core.close()


class BytesSubclass(bytes):
    pass


def test_topiccore_bytes_body_stored_unpickled(path):
    core = TopicCore(path, LANES, slot_bytes=64)
    group = core.open_group("g", True)
    consumer = core.open_consumer(group, 8, 7)
    assert core.publish_pickled(b"abc", 0) == 1
    assert core.publish_pickled(b"", 0) == 2
    assert core.publish_pickled(BytesSubclass(b"sub"), 0) == 3
    # A bytes body fills its slot with one byte more than its length.
    assert core.publish_pickled(b"x" * 63, 0) == 4
    assert core.publish_pickled(b"x" * 64, 0) == -2
    payloads = [item[6] for item in core.fetch(consumer, 2, 30.0)]
    assert payloads == [bytes([PAYLOAD_BYTES]) + b"abc",
                        bytes([PAYLOAD_BYTES])]
    third = fetch_one(core, consumer)
    assert third.body == b"sub"
    assert type(third.body) is BytesSubclass
    fourth = fetch_one(core, consumer)
    assert fourth.body == b"x" * 63
    assert type(fourth.body) is bytes
    core.close()


@pytest.mark.parametrize("payload, body", [
    (bytes([PAYLOAD_BYTES]) + b"raw", b"raw"),
    (bytes([PAYLOAD_BYTES]), b""),
    (pickle.dumps({"n": 1}, protocol=pickle.HIGHEST_PROTOCOL), {"n": 1}),
    (bytes([PAYLOAD_EXTRAS]) + pickle.dumps((pickle.dumps("b"), {"h": 1},
                                             "r", "c")), "b"),
])
def test_topiccore_decode_payload_kinds(payload, body):
    decoded = decode_payload(payload)
    assert decoded[0] == body
    assert type(decoded[0]) is type(body)
    if payload[0] == PAYLOAD_EXTRAS:
        assert decoded[1:] == ({"h": 1}, "r", "c")
    else:
        assert decoded[1:] == ({}, None, None)


def test_topiccore_retire_exports_state(path):
    core = TopicCore(path, LANES, strict=True, max_attempts=3)
    other = TopicCore(path, LANES)
    group = core.open_group("g", False)
    consumer = core.open_consumer(group, 4, 5)
    for number in range(3):
        core.publish(bytes([number]), 9 if number == 1 else 0, 2.0,
                     now=10.0)
    held = core.fetch(consumer, 1, 30.0, now=10.0)
    assert [item[0] for item in held] == [2]  # strict: lane 9 first

    data = core.retire_and_export()

    assert [(seq, priority, payload) for _, seq, priority, _, _, payload
            in data["slots"]] == [(1, 0, b"\0"), (2, 9, b"\1"),
                                  (3, 0, b"\2")]
    ((index, name, max_attempts, _, deficits, counters, entries, countdown,
      _, _),) = data["groups"]
    assert countdown == 2**63 - 1  # sampling off, as TopicState sets it
    assert (index, name, max_attempts) == (group, "g", 0)
    assert len(deficits) == 3
    assert counters["delivered"] == 1
    states = {slot: (state, attempts, ticket, deadline, owner)
              for slot, state, _, attempts, ticket, _, deadline, _, owner, _,
              _, _ in entries}
    in_flight = states[held[0][1]]
    assert in_flight == (2, 1, held[0][2], 40.0, consumer)
    assert sorted(state[0] for state in states.values()) == [1, 1, 2]
    assert data["consumers"] == [(consumer, group, 4, 5)]
    assert data["counters"]["published"] == 3
    for handle in (core, other):
        with pytest.raises(TopicRetired):
            handle.publish(b"y", 0, 0.0)
        with pytest.raises(TopicRetired):
            handle.fetch(consumer, 1, 30.0)
    # Retiring froze the state, so it can be exported again.
    assert other.retire_and_export()["slots"] == data["slots"]
    core.close()
    other.close()


def test_topiccore_close_waits_for_parked_waiter(path):
    core = TopicCore(path, [(0, 1)])
    epoch = core.wait_prepare()
    parked = threading.Thread(target=core.wait, args=(epoch, 0.05))
    parked.start()
    # The parked thread still holds the mapping; close defers the unmap.
    core.close()
    parked.join(10)
    assert not parked.is_alive()
    with pytest.raises(TopicRetired):
        core.wait_prepare()
    with pytest.raises(ValueError, match="closed"):
        core.publish(b"x", 0, 0.0)
    core.signal()  # a no-op on a closed handle


# A thread waits for the core's mutex, which a stopped process holds
# (inside export_image, which holds it for milliseconds), while another
# thread closes the handle. The waiter must raise TopicRetired once it
# gets the mutex, instead of touching the unmapped file. Run in a child
# process, because the failure is a crash.
CLOSE_WHILE_LOCK_WAITS = """
path = sys.argv[1]
core = TopicCore(path, [(0, 1)], capacity=1 << 15)
core.open_group("g", True)
for _ in range((1 << 15) - 1):
    core.publish(b"x", 0, 0.0)
parent = os.getpid()
holder = os.fork()
if holder == 0:
    # Ends with its parent, and keeps no pipe of the test open.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    other = TopicCore(path, [(0, 1)])
    while os.getppid() == parent:
        other.export_image()
    os._exit(0)
outcome = []


def read_stats():
    try:
        outcome.append(core.stats()["stored"])
    except TopicRetired:
        outcome.append("TopicRetired")


for _ in range(50):
    time.sleep(0.01)
    os.kill(holder, signal.SIGSTOP)
    waiter = threading.Thread(target=read_stats)
    waiter.start()
    waiter.join(0.2)
    if waiter.is_alive():
        break
    os.kill(holder, signal.SIGCONT)
else:
    raise AssertionError("the stopped process never held the mutex")
core.close()
os.kill(holder, signal.SIGCONT)
waiter.join(30)
os.kill(holder, signal.SIGKILL)
os.waitpid(holder, 0)
print("hung" if waiter.is_alive() else outcome[0], flush=True)
"""


def test_topiccore_close_while_lock_waits(path):
    script = ("import os, signal, sys, threading, time\n"
              "from mqs._topiccore import TopicCore, TopicRetired\n"
              + textwrap.dedent(CLOSE_WHILE_LOCK_WAITS))
    child = subprocess.run([sys.executable, "-c", script, path],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, (child.returncode, child.stderr)
    assert child.stdout.split() == ["TopicRetired"]


def test_topiccore_closed_handle_rejects_new_waiter(path):
    core = TopicCore(path, [(0, 1)])
    core.close()
    with pytest.raises(TopicRetired):
        core.wait_prepare()


def test_topiccore_backlog_beyond_first_region(path):
    # Three times the 4,096 slots a core starts with, plus a few: the used
    # region grows three times, then the core is full.
    capacity = 3 * 4096 + 5
    core = TopicCore(path, LANES, capacity=capacity)
    for number in range(capacity):
        assert core.publish(number.to_bytes(4, "little"), 0, 0.0) \
            == number + 1
    assert core.publish(b"x", 0, 0.0) == -1
    assert core.stats()["stored"] == capacity

    # A group started at "earliest" takes the whole backlog in order.
    group = core.open_group("g", True)
    consumer = core.open_consumer(group, capacity, 1)
    found = core.fetch(consumer, capacity, 30.0)
    numbers = [int.from_bytes(item[6], "little") for item in found]
    assert numbers == list(range(capacity))

    # Closing the consumer puts every delivery back in publish order.
    assert core.close_consumer(consumer) == capacity
    consumer = core.open_consumer(group, capacity, 1)
    found = core.fetch(consumer, capacity, 30.0)
    numbers = [int.from_bytes(item[6], "little") for item in found]
    assert numbers == list(range(capacity))
    assert all(item[3] == 2 for item in found)
    for item in found:
        assert core.ack(group, item[1], item[2])
    stats = core.stats()
    assert stats["stored"] == 0
    assert stats["in_flight"] == 0

    # Freed slots are reused: the core takes `capacity` messages again.
    for number in range(capacity):
        assert core.publish(b"y", 0, 0.0) > 0
    assert core.publish(b"y", 0, 0.0) == -1
    core.close()


def test_topiccore_memory_follows_backlog_not_capacity(path):
    # A core of 2**20 slots maps about 1 GiB (sparse). A backlog of 10,000
    # messages must touch only their slots, entries and ring positions.
    core = TopicCore(path, LANES, capacity=1 << 20, slot_bytes=480,
                     max_groups=8)
    group = core.open_group("g", False)
    consumer = core.open_consumer(group, 100, 1)
    for _ in range(10_000):
        assert core.publish(b"x" * 64, 0, 0.0) > 0
    found = core.fetch(consumer, 100, 30.0)
    for item in found[:50]:
        assert core.ack(group, item[1], item[2])
    assert core.close_consumer(consumer) == 50
    assert core.stats()["stored"] == 9950
    core.group_stats()
    core.retire_and_export()
    assert os.path.getsize(path) > 1 << 30
    # About 0.6 KiB per message: slot, entry and ring index.
    assert os.stat(path).st_blocks * 512 < 16 << 20
    core.close()


def _resident_bytes(path):
    return os.stat(path).st_blocks * 512


def test_topiccore_drained_backlog_returns_memory(path):
    # 40,000 bodies of 400 bytes fill about 20 MiB of slots. Once every
    # message is acked, the pages past the first 4,096 slots go back.
    core = TopicCore(path, LANES, capacity=1 << 20, slot_bytes=480)
    group = core.open_group("g", False)
    consumer = core.open_consumer(group, 100_000, 1)
    count = 40_000
    for number in range(count):
        body = number.to_bytes(4, "little") + b"x" * 396
        assert core.publish(body, number % 10, 0.0) > 0
    peak = _resident_bytes(path)
    assert peak > 20 << 20

    found = core.fetch(consumer, count, 600.0)
    assert len(found) == count
    first_slot, first_ticket = found[0][1], found[0][2]
    for item in found:
        assert core.ack(group, item[1], item[2])
    assert core.stats()["stored"] == 0
    drained = _resident_bytes(path)
    # Entries (72 bytes per slot) and the first 4,096 slots stay.
    assert drained < peak // 3

    # The core fills its slots again from the start, in order.
    for number in range(count):
        body = number.to_bytes(4, "little") + b"y" * 396
        assert core.publish(body, 0, 0.0) > 0
    again = core.fetch(consumer, count, 600.0)
    numbers = [int.from_bytes(item[6][:4], "little") for item in again]
    assert numbers == list(range(count))
    assert all(item[6][4:] == b"y" * 396 for item in again)
    # A tag from before the drain stays stale: tickets kept growing.
    reused = [item for item in again if item[1] == first_slot]
    assert len(reused) == 1
    assert reused[0][2] > first_ticket
    assert not core.ack(group, first_slot, first_ticket)
    for item in again:
        assert core.ack(group, item[1], item[2])
    core.close()


def test_topiccore_auto_ack_drain_returns_memory_on_publish(path):
    # An auto_ack fetch hands out bodies that stay in their slots until
    # the next publish, so the memory goes back only then.
    core = TopicCore(path, LANES, capacity=1 << 20, slot_bytes=480)
    group = core.open_group("g", False)
    consumer = core.open_consumer(group, 1, 1)
    count = 40_000
    for number in range(count):
        assert core.publish(number.to_bytes(4, "little") + b"z" * 396, 0,
                            0.0) > 0
    peak = _resident_bytes(path)
    found = core.fetch(consumer, count, 600.0, auto_ack=True)
    numbers = [int.from_bytes(item[6][:4], "little") for item in found]
    assert numbers == list(range(count))
    assert all(item[6][4:] == b"z" * 396 for item in found)
    assert core.stats()["stored"] == 0
    assert _resident_bytes(path) > peak // 2

    assert core.publish(b"next", 0, 0.0) > 0
    assert _resident_bytes(path) < peak // 3
    last = core.fetch(consumer, 10, 600.0, auto_ack=True)
    assert [item[6] for item in last] == [b"next"]
    core.close()


def test_topiccore_deadlines_behind_large_backlog(path):
    # Deadlines are found through each group's in-flight list, so they
    # must fire in deadline order while most stored messages are ready.
    core = TopicCore(path, LANES, capacity=20_000)
    group = core.open_group("g", False)
    for number in range(10_000):
        assert core.publish(number.to_bytes(4, "little"), 0, 0.0) > 0
    first = core.open_consumer(group, 1000, 1)
    second = core.open_consumer(group, 100, 1)
    held_long = core.fetch(first, 1000, 10.0, now=0.0)
    held_short = core.fetch(second, 100, 5.0, now=1.0)
    # Ack the odd numbers of the first consumer, last first.
    for item in reversed(held_long[1::2]):
        assert core.ack(group, item[1], item[2], now=2.0)
    assert core.stats()["in_flight"] == 600

    core.advance(now=7.0)
    assert core.stats()["in_flight"] == 500
    core.advance(now=11.0)
    stats = core.stats()
    assert stats["in_flight"] == 0
    assert stats["ready"] == 10_000 - 500

    drain = core.open_consumer(group, 10_000, 1)
    found = core.fetch(drain, 10_000, 60.0, now=12.0)
    numbers = [int.from_bytes(item[6], "little") for item in found]
    expired_short = list(range(1000, 1100))
    expired_long = list(range(0, 1000, 2))
    assert numbers == list(range(1100, 10_000)) + expired_short \
        + expired_long
    attempts = [item[3] for item in found]
    assert attempts == [1] * 8900 + [2] * 600
    for item in found:
        assert core.ack(group, item[1], item[2], now=13.0)
    assert core.stats()["stored"] == 0
    core.close()
