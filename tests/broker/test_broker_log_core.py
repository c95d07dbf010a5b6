"""The log backend's plain topics on topic cores, and their restore from
the log (`mqs.broker._coreimage`, `SharedLogBackend._rebuild_cores`).

A restore from the log alone is what a reboot leaves: the tests remove
the broker's /dev/shm files (journal and cores) with
`mqs.broker._log_shared.unlink_journal` after every process that used it
is gone, then open the directory again.
"""

import functools
import multiprocessing
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mqs
from mqs._topiccore import CoreReader, LoggedPath, TopicCore
from mqs.broker import _log_shared
from mqs.broker._coreimage import DEAD, IN_FLIGHT, READY, CoreImage
from mqs.broker._log import _read_current
from mqs.broker._log_shared import _journal_files, unlink_journal

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/dev/shm"), reason="needs /dev/shm")

CTX = multiprocessing.get_context("fork")


def _open(path, **options):
    return mqs.Broker(backend="log", path=path, **options)


def _core_files(path):
    return [name for files in _journal_files(path).values()
            for name in files if ".core-" in name]


def _drain(consumer, limit=1000):
    """Return (body, attempts) of every message ready now, acked."""
    found = []
    while len(found) < limit:
        try:
            message = consumer.get(timeout=0.2)
        except mqs.Empty:
            return found
        found.append((message.body, message.attempts))
        message.ack()
    return found


# ---- the image model against a real core ----------------------------------

def _new_core(path, max_attempts=0):
    return TopicCore(str(path), [(9, 3), (5, 2), (0, 1)], capacity=64,
                     slot_bytes=64, max_groups=4, max_consumers=8,
                     max_attempts=max_attempts)


def _normal(image):
    """Comparable form of an image: messages, and per group its entries
    as {seq: (state, attempts)} with dead reasons left out."""
    messages = {item[0]: item[1:] for item in image["messages"]}
    groups = {name: (max_attempts,
                     {seq: (state, attempts)
                      for seq, state, _, attempts in entries})
              for name, max_attempts, _, entries in image["groups"]}
    return messages, groups


OPS = st.lists(st.tuples(
    st.sampled_from(["publish", "group", "fetch", "ack", "nack", "reject",
                     "release"]),
    st.integers(0, 9), st.integers(0, 2)), max_size=40)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, max_attempts=st.sampled_from([0, 2]))
def test_image_replays_core_operations(tmp_path, ops, max_attempts):
    """Every record the backend writes, applied to a `CoreImage`, gives
    the state and the counters that the core itself exports."""
    path = tmp_path / f"core-{os.urandom(4).hex()}"
    core = _new_core(path, max_attempts)
    image = CoreImage(max_attempts=max_attempts)
    consumers = {}
    held = {}
    now = 1.0
    try:
        for op, number, which in ops:
            now += 0.001
            group = f"g{which}"
            if op == "publish":
                payload = pickle.dumps(number)
                seq = core.publish(payload, number, 100.0 + now, now)
                if seq > 0:
                    image.publish(seq, number, 100.0 + now, payload)
            elif op == "group":
                index = core.open_group(group, number % 2 == 0, None, now)
                image.open_group(group, number % 2 == 0, None)
                # One consumer per group: a core takes at most 8.
                if group not in consumers:
                    consumers[group] = (index, core.open_consumer(
                        index, 100, 1, now))
            elif group not in consumers:
                continue
            elif op == "fetch":
                index, consumer = consumers[group]
                found = core.fetch(consumer, 1 + number % 3, 3600.0, False,
                                   now, 0)
                image.deliver(index, [(item[0], item[3], item[2])
                                      for item in found], False)
                for item in found:
                    held.setdefault(group, []).append(item)
            elif held.get(group):
                index, _ = consumers[group]
                seq, slot, ticket = held[group].pop(
                    number % len(held[group]))[:3]
                if op == "ack":
                    assert core.ack(index, slot, ticket, now)
                    image.ack(index, seq)
                elif op in ("nack", "reject"):
                    assert core.nack(index, slot, ticket, op == "nack", now)
                    image.nack(index, seq, op == "nack")
                else:
                    assert core.release(index, [(slot, ticket)], now) == 1
                    image.release(index, [seq])
        exported = core.export_image()
        assert _normal(image.image()) == _normal(exported)
        for name, count in exported["counters"].items():
            if name != "late_acks":
                assert image.counters.get(name, 0) == count, name
        restored = {name: counters
                    for name, _, counters, _ in image.image()["groups"]}
        for name, _, counters, _ in exported["groups"]:
            assert restored[name] == counters, name
    finally:
        core.close()


def _counters(image):
    """Topic and group counters of an image, late acks left out (a
    stale ack writes no record)."""
    counters = {name: count for name, count in image["counters"].items()
                if name != "late_acks"}
    return counters, {name: dict(group_counters)
                      for name, _, group_counters, _ in image["groups"]}


def test_image_counts_as_the_core(tmp_path):
    """Redeliveries, errors and dead letters (a reject, a requeue at
    max_attempts, a missed ack deadline, an auto_ack delivery) count as
    in the core."""
    core = _new_core(tmp_path / "core", max_attempts=2)
    image = CoreImage(max_attempts=2)
    try:
        index = core.open_group("g", True, None, 1.0)
        image.open_group("g", True, None)
        consumer = core.open_consumer(index, 100, 1, 1.0)
        auto = core.open_consumer(index, 100, 1, 1.0)

        def publish(count):
            for n in range(count):
                seq = core.publish(pickle.dumps(n), 0, 1.0, 1.0)
                image.publish(seq, 0, 1.0, pickle.dumps(n))

        def fetch(number, count, now, auto_ack=False):
            found = core.fetch(number, count, 0.5, auto_ack, now, 0)
            image.deliver(index, [(item[0], item[3], item[2])
                                  for item in found], auto_ack)
            return found

        def nack(item, requeue):
            assert core.nack(index, item[1], item[2], requeue, 1.0)
            image.nack(index, item[0], requeue)

        publish(2)
        first, second = fetch(consumer, 2, 1.0)
        nack(first, False)          # rejected
        nack(second, True)          # redelivered, attempts 1
        # Delivered again with attempts 2: its requeue reaches
        # max_attempts, and the core dead-letters it.
        [again] = fetch(consumer, 1, 1.0)
        assert again[0] == second[0]
        nack(again, True)

        # A missed ack deadline puts the message back (no record), and
        # the next one, at max_attempts, dead-letters it.
        publish(1)
        [late] = fetch(consumer, 1, 1.0)
        [late_again] = fetch(consumer, 1, 2.0)
        assert (late_again[0], late_again[3]) == (late[0], 2)
        assert fetch(consumer, 1, 3.0) == []
        dead = core.peek_dead()
        for _, _, group, seq, _, reason, *_ in dead:
            image.drop_dead(group, seq, reason)
        core.drop_dead([item[:2] for item in dead])

        publish(2)
        assert len(fetch(auto, 5, 4.0, auto_ack=True)) == 2
        exported = core.export_image()
        assert _normal(image.image()) == _normal(exported)
        assert _counters(image.image()) == _counters(exported)
        assert exported["counters"]["dead_lettered.max_attempts"] == 1
        assert exported["counters"]["dead_lettered.ack_timeout"] == 1
    finally:
        core.close()


def test_image_skips_records_it_already_holds():
    """A snapshot taken while an operation ran already contains it: the
    record applied again changes nothing."""
    image = CoreImage()
    image.open_group("g", True, None)
    image.publish(1, 0, 5.0, b"a")
    image.publish(2, 0, 6.0, b"b")
    image.deliver(0, [(1, 1, 1)], False)
    image.ack(0, 1)
    before = image.image()
    image.open_group("g", False, None)
    image.publish(2, 0, 6.0, b"b")
    image.ack(0, 1)
    image.drop_dead("g", 1)
    assert image.image() == before
    assert image.image()["messages"] == [(2, 0, 6.0, False, b"b")]


def test_image_skips_deliveries_it_holds():
    """A compaction between the records of one fetch (a get_many split
    into several records) writes a snapshot that contains them all: the
    later records, applied again, count nothing more."""
    image = CoreImage()
    image.open_group("g", True, None)
    for seq in (1, 2, 3):
        image.publish(seq, 0, 5.0, b"m")
    image.deliver(0, [(1, 1, 1), (2, 1, 1)], False)
    image.deliver(0, [(3, 1, 1)], True)
    snapshot = CoreImage(image.image())
    snapshot.deliver(0, [(2, 1, 1)], False)
    snapshot.deliver(0, [(3, 1, 1)], True)
    assert snapshot.image() == image.image()
    assert snapshot.counters["delivered"] == 3
    assert snapshot.counters["redelivered"] == 0
    # A later delivery (more attempts) of an entry that no record put
    # back: its ack deadline passed.
    snapshot.deliver(0, [(1, 2, 2)], False)
    assert snapshot.counters["redelivered"] == 1
    assert snapshot.counters["delivered"] == 4


def test_image_first_group_drops_retained():
    image = CoreImage()
    image.publish(1, 0, 5.0, b"a")
    assert image.image()["messages"][0][3] is True  # retained
    image.open_group("late", False, None)
    assert image.image()["messages"] == []
    assert image.counters["dropped_unsubscribed"] == 1


def test_image_export_data_is_adoptable():
    """A move to the journal during a restore builds the journal state
    from the image: in-flight entries are ready again, dead ones are dead
    letters."""
    image = CoreImage()
    image.open_group("g", True, 3)
    for seq in (1, 2, 3):
        image.publish(seq, 0, float(seq), pickle.dumps(seq))
    image.deliver(0, [(1, 1, 7), (2, 1, 8)], False, 3, 80.0)
    image.nack(0, 2, False)
    data = image.export_data(1, 50.0, [(3, 0, 5, 99)])
    entries = {entry[0]: entry for entry in data["groups"][0][6]}
    assert {seq: entry[1] for seq, entry in entries.items()} == \
        {1: IN_FLIGHT, 2: DEAD, 3: READY}
    # Ticket, deadline and consumer of the delivery in flight.
    assert (entries[1][4], entries[1][6], entries[1][8]) == (7, 80.0, 3)
    assert [slot[1] for slot in data["slots"]] == [1, 2, 3]
    assert data["consumers"] == [(3, 0, 5, 99)]


# ---- the broker ------------------------------------------------------------

def test_replicas_skip_core_records_unread(tmp_path):
    """Other processes skip core records by their op name's bytes; every
    other record is applied."""
    from mqs.broker._log import encode_record

    for op in ("image_publish", "image_ack", "image_deliver"):
        data = encode_record(op, 12.5, ("t", 1, [(1, 2, 3)] * 100))
        assert data[_log_shared._OP_AT:].startswith(_log_shared._IMAGE_OP)
    for op in ("core_dead", "delete", "adopt"):
        data = encode_record(op, 12.5, ("t",))
        assert not data[_log_shared._OP_AT:].startswith(
            _log_shared._IMAGE_OP)
    broker = _open(str(tmp_path / "b"))
    applied = []
    backend = broker._backend
    backend._apply = lambda op, args: applied.append(op)
    try:
        backend._replay_each([encode_record("image_ack", 1.0, ("t", "g", 1)),
                              encode_record("delete", 1.0, ("x",))])
    finally:
        del backend._apply
        broker.close()
    assert applied == ["delete"]


def test_section_log_core_matches_python(tmp_path):
    """The section's C `log_core`, which the backend binds as
    `_log_core`, appends the record that the Python method appends: the
    op, the broker time of the operation and the arguments."""
    broker = _open(str(tmp_path / "b"))
    backend = broker._backend
    found = []
    try:
        broker.declare_topic("t")
        assert backend._log_core == backend._lock.log_core
        for log_core in (backend._lock.log_core,
                         functools.partial(
                             _log_shared.SharedLogBackend._log_core,
                             backend)):
            with backend._lock:
                log_core("image_ack", "t", "g", 7)
                now = backend._now
            log = backend._log
            op, at, args = pickle.loads(log.read(log.end_offset - 1))
            found.append((op, args, at == now))
    finally:
        broker.close()
    assert found == [("image_ack", ("t", "g", 7), True)] * 2


def _last_records(log, count):
    return [pickle.loads(log.read(offset))
            for offset in range(log.end_offset - count, log.end_offset)]


def test_c_paths_append_the_core_records(tmp_path):
    """Publish, get and ack of a plain message run in C (`LoggedPath`
    and its `CoreReader`), and append the records that `_LoggedCore`
    appends: the publish with its seq, priority, timestamp and payload,
    the delivery with its seq, attempts and ticket, and the ack."""
    broker = _open(str(tmp_path / "b"))
    backend = broker._backend
    try:
        broker.declare_topic("t")
        consumer = broker.consume("t", "g", ack_timeout=30)
        assert backend.publish_one.__self__ is backend._fast
        assert type(backend._fast) is LoggedPath
        assert type(consumer._read_one) is CoreReader
        assert broker.publish("t", {"n": 1}, priority=4) == "s1"
        message = consumer.get(timeout=1)
        assert message.ack() is True
        published, delivered, acked = _last_records(backend._log, 3)
    finally:
        broker.close()
    op, _, (topic, seq, priority, wall, payload) = published
    assert (op, topic, seq, priority) == ("image_publish", "t", 1, 4)
    assert pickle.loads(payload) == {"n": 1}
    assert wall == message.timestamp
    op, _, (topic, group, auto_ack, items, number, ack_timeout) = delivered
    assert (op, topic, group, auto_ack, ack_timeout) == \
        ("image_deliver", "t", "g", False, 30)
    assert [(seq, attempts) for seq, attempts, _ in items] == [(1, 1)]
    assert acked[0] == "image_ack"
    assert acked[2] == ("t", "g", 1)


def test_c_get_moves_dead_letters_to_the_dlq(tmp_path):
    """A get whose core dead-letters a message at its ack deadline
    (max_attempts reached) moves the letter into the topic's dead-letter
    queue at once, and the letter survives a reopen."""
    path = str(tmp_path / "b")
    broker = _open(path)
    try:
        broker.declare_topic("t", max_attempts=1)
        consumer = broker.consume("t", "g", ack_timeout=0.05, prefetch=10)
        broker.publish("t", "lost")
        assert consumer.get(timeout=1).body == "lost"
        time.sleep(0.2)
        broker.publish("t", "next")
        assert consumer.get(timeout=1).body == "next"
        # Moved by the get, not left for the next call that collects.
        assert not broker._backend._cores["t"]._core.has_dead()
        assert broker.stats("t")["dlq"] == 1
        assert [letter.body for letter in broker.dlq_list("t")] == ["lost"]
    finally:
        broker.close()
    broker = _open(path)
    try:
        assert [letter.body for letter in broker.dlq_list("t")] == ["lost"]
    finally:
        broker.close()


@pytest.mark.parametrize("backend", ["log", "shm"])
def test_c_get_keeps_message_when_dlq_move_fails(tmp_path, backend):
    """An auto_ack get whose fetch dead-letters another message returns
    the message it delivered, also when moving the dead letter into the
    dead-letter queue fails (a close by another thread, a failed log
    write). The core has delivered and settled that message, so raising
    would lose it. The next call moves the dead letter."""
    if backend == "log":
        broker = _open(str(tmp_path / "b"))
    else:
        name = f"test-dlq-move-{os.getpid()}-{tmp_path.name}"
        mqs.Broker.unlink(name)
        broker = mqs.Broker(backend="shm", name=name)
    try:
        broker.declare_topic("t", max_attempts=1)
        timed = broker.consume("t", "g", ack_timeout=0.05)
        auto = broker.consume("t", "g", auto_ack=True)
        assert type(auto._read_one) is CoreReader
        broker.publish("t", "lost")
        assert timed.get(timeout=1).body == "lost"
        time.sleep(0.2)
        broker.publish("t", "kept")
        backend_object = broker._backend
        collect = backend_object._collect_dead
        failures = []

        def failing_collect(topic, limit=None):
            failures.append(topic)
            raise mqs.ShutDown("closed by another thread")

        backend_object._collect_dead = failing_collect
        try:
            assert auto.get(timeout=1).body == "kept"
        finally:
            backend_object._collect_dead = collect
        assert failures == ["t"]
        assert [letter.body for letter in broker.dlq_list("t")] == ["lost"]
    finally:
        broker.close()
        if backend == "shm":
            mqs.Broker.unlink(name)


def test_c_paths_follow_a_topic_deleted_by_another_process(tmp_path):
    """After another process deletes and declares the topic again, the C
    paths of this process use the new core. A publish lands there, a
    message of the old core cannot be acked into the new one, and the
    consumer of the old core gets ShutDown."""
    path = str(tmp_path / "b")
    broker = _open(path)
    other = _open(path)
    try:
        broker.declare_topic("t")
        consumer = broker.consume("t", "g")
        broker.publish("t", "old")
        message = consumer.get(timeout=1)
        other.delete_topic("t")
        other.declare_topic("t")
        fresh = other.consume("t", "g")
        broker.publish("t", "new")
        assert fresh.get(timeout=1).body == "new"
        assert message.ack() is False
        with pytest.raises(mqs.ShutDown):
            consumer.get(timeout=0.2)
    finally:
        other.close()
        broker.close()


def test_c_publish_syncs_its_record(tmp_path):
    """Under fsync="always" a publish on a core returns with its record
    synced and the durable position past it, through the C sync of the
    writer, without the backend's Python `_sync`."""
    broker = _open(str(tmp_path / "b"), fsync="always")
    backend = broker._backend
    python_syncs = []
    original = backend._sync

    def counted_sync(*args):
        python_syncs.append(args)
        return original(*args)

    try:
        broker.declare_topic("t")
        backend._sync = counted_sync
        for n in range(5):
            broker.publish("t", n)
            log = backend._log
            assert log.synced_offset == log.end_offset
            mark = backend._local.mark
            assert backend._durable[_log_shared._DURABLE] >= mark
        assert python_syncs == []
        # The durable word and the failure word it reads are the ones
        # the backend writes.
        assert backend._durable[_log_shared._FAILED] == 0
    finally:
        broker.close()


def test_publish_wakes_at_sync_start(tmp_path):
    """Under fsync="always" a publish on a core wakes the consumers when
    the sync that covers its record starts, not after that sync: the
    signal is given and a consumer waiting in `get` has the message
    while the sync is still held before its I/O."""
    broker = _open(str(tmp_path / "b"), fsync="always")
    backend = broker._backend
    entered, release = threading.Event(), threading.Event()
    got, published = [], []

    def hook(end, phase):
        if phase == 0:
            entered.set()
            assert release.wait(60)
        return 0

    try:
        broker.declare_topic("t")
        consumer = broker.consume("t", "g")
        broker.publish("t", "before")
        consumer.get(timeout=5).ack()
        core = backend._cores["t"]._core
        # Nothing left to sync, so the hook blocks the publish's own sync.
        backend._log.flush()
        backend._log._set_sync_hook(hook)

        def consume():
            message = consumer.get(timeout=30)
            got.append(message.body)
            message.ack()

        reader = threading.Thread(target=consume)
        reader.start()
        # Let the reader park in its wait first.
        time.sleep(0.2)
        writer = threading.Thread(
            target=lambda: published.append(broker.publish("t", "held")))
        writer.start()
        assert entered.wait(30)
        # Woken before the sync's I/O, by the call that started it.
        assert core._quiet_pending == 0
        reader.join(30)
        assert got == ["held"], "the consumer waited for the sync to end"
        assert published == []
        release.set()
        writer.join(30)
        assert len(published) == 1
        assert core._quiet_pending == 0
    finally:
        release.set()
        backend._log._set_sync_hook(None)
        broker.close()


def test_publishes_leave_no_wake_pending(tmp_path):
    """Producer threads publish on a core under fsync="always" while
    consumer threads wait: every message arrives, once, and every
    publish returned with its consumers woken, by the call that started
    its sync or by its own call after the sync."""
    broker = _open(str(tmp_path / "b"), fsync="always")
    producers, consumers, per_producer = 4, 3, 150
    total = producers * per_producer
    received, errors = [], []
    lock = threading.Lock()
    try:
        broker.declare_topic("t")
        core = broker._backend._cores["t"]._core

        def produce(p):
            try:
                for n in range(per_producer):
                    broker.publish("t", (p, n))
            except Exception as exc:  # reported by the assert below
                errors.append(exc)

        def consume():
            consumer = broker.consume("t", "g")
            try:
                while True:
                    with lock:
                        if len(received) >= total:
                            return
                    try:
                        message = consumer.get(timeout=0.5)
                    except mqs.Empty:
                        continue
                    with lock:
                        received.append(message.body)
                    message.ack()
            except Exception as exc:  # reported by the assert below
                errors.append(exc)

        threads = [threading.Thread(target=consume)
                   for _ in range(consumers)]
        threads += [threading.Thread(target=produce, args=(p,))
                    for p in range(producers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert errors == []
        assert sorted(received) == sorted(
            (p, n) for p in range(producers) for n in range(per_producer))
        assert core._quiet_pending == 0
        stats = broker._backend._log._raw_stats()
        assert stats.synced_offset == stats.end_offset
    finally:
        broker.close()


class _LogWithoutHint:
    """A stand-in for the broker's SegmentLog without `_sync_starts_now`,
    as a wrapper of the crash tests may be."""

    def __init__(self, log):
        self._real = log

    def __getattr__(self, name):
        if name == "_sync_starts_now":
            raise AttributeError(name)
        return getattr(self._real, name)


def test_publish_wakes_without_log_hint(tmp_path):
    """A log without the hint gets its consumers woken before its sync,
    and the publish still returns with its record synced."""
    broker = _open(str(tmp_path / "b"), fsync="always")
    backend = broker._backend
    real = backend._log
    try:
        broker.declare_topic("t")
        consumer = broker.consume("t", "g")
        core = backend._cores["t"]._core
        backend._log = _LogWithoutHint(real)
        broker.publish("t", "one")
        assert core._quiet_pending == 0
        assert real.synced_offset == real.end_offset
        assert consumer.get(timeout=5).body == "one"
    finally:
        backend._log = real
        broker.close()


def test_groups_wake_while_syncs_are_shared(tmp_path):
    """Under fsync="always", with two producer threads of another topic
    keeping the group commit busy (gathers, takeovers), a consumer of
    each of two groups waits in `get` for every publish on the topic.
    Each get returns well before its 50 ms slice ends. A wake-up lost
    between the quiet store and the sync would show as a get that
    returns only at the slice end, about 48 ms after the publish,
    because each get starts its wait 2 ms before the publish."""
    broker = _open(str(tmp_path / "b"), fsync="always")
    rounds, slow_ms = 100, 40
    stop = threading.Event()
    errors = []
    try:
        broker.declare_topic("t")
        consumers = [broker.consume("t", group) for group in ("g1", "g2")]
        broker.publish("t", "first")
        for consumer in consumers:
            consumer.get(timeout=5).ack()
        received = [[] for _ in consumers]
        waiting = [threading.Event() for _ in consumers]

        def noise():
            try:
                while not stop.is_set():
                    broker.publish("noise", "x")
            except Exception as exc:  # reported by the assert below
                errors.append(exc)

        def consume(index):
            try:
                for _ in range(rounds):
                    waiting[index].set()
                    message = consumers[index].get(timeout=10)
                    received[index].append((message.body, time.monotonic()))
                    message.ack()
            except Exception as exc:  # reported by the assert below
                errors.append(exc)

        threads = [threading.Thread(target=noise) for _ in range(2)]
        threads += [threading.Thread(target=consume, args=(index,))
                    for index in range(len(consumers))]
        for thread in threads:
            thread.start()
        returned = {}
        for n in range(rounds):
            for event in waiting:
                assert event.wait(10)
                event.clear()
            # Let the consumers park in their waits.
            time.sleep(0.002)
            broker.publish("t", n)
            returned[n] = time.monotonic()
            deadline = time.monotonic() + 10
            while (min(len(r) for r in received) <= n
                   and time.monotonic() < deadline):
                time.sleep(0.0005)
        stop.set()
        for thread in threads:
            thread.join(30)
        assert errors == []
        for index, got in enumerate(received):
            assert [body for body, _ in got] == list(range(rounds))
            late = [round((at - returned[body]) * 1000, 1)
                    for body, at in got
                    if (at - returned[body]) * 1000 >= slow_ms]
            # A busy machine may hold a woken thread back now and then;
            # lost wake-ups would make nearly every get late.
            assert len(late) <= rounds // 4, (index, late)
    finally:
        stop.set()
        broker.close()


def _child_publish_quiet(path, count, out):
    broker = _open(path, fsync="always")
    try:
        for n in range(count):
            broker.publish("t", n)
        out.send(broker._backend._cores["t"]._core._quiet_pending)
    finally:
        broker.close()


def test_non_writer_publish_wakes_consumers(tmp_path):
    """A process that is not the log's writer publishes on a core under
    fsync="always" and waits for the writer's sync in Python: its
    publishes return with the consumers woken, and a consumer of the
    writer's process receives them."""
    path = str(tmp_path / "b")
    broker = _open(path, fsync="always")
    try:
        broker.declare_topic("t")
        consumer = broker.consume("t", "g", prefetch=10)
        receiver, sender = CTX.Pipe(duplex=False)
        child = CTX.Process(target=_child_publish_quiet,
                            args=(path, 5, sender))
        child.start()
        assert receiver.poll(60)
        assert receiver.recv() == 0
        child.join(30)
        assert child.exitcode == 0
        bodies = sorted(consumer.get(timeout=5).body for _ in range(5))
        assert bodies == list(range(5))
    finally:
        broker.close()


def test_c_publish_sync_failure_fails_backend(tmp_path):
    """A failed sync in the C path marks the durable file failed, as the
    backend's `_sync_writer_log` does, so every later operation raises."""
    broker = _open(str(tmp_path / "b"), fsync="always")
    backend = broker._backend
    try:
        broker.declare_topic("t")
        broker.publish("t", "synced")
        backend._log._set_sync_hook(lambda end, phase: 5 if phase == 0
                                    else 0)
        with pytest.raises(mqs.LogPoisoned):
            broker.publish("t", "lost")
        assert backend._durable[_log_shared._FAILED] == \
            _log_shared._WRITE_FAILED
        with pytest.raises(mqs.BackendUnavailable):
            broker.publish("t", "after")
    finally:
        # The poisoned log fails its final sync as well, and the close
        # keeps the journal in /dev/shm for the next open to replay.
        with pytest.raises(mqs.LogPoisoned):
            broker.close()
        assert unlink_journal(str(tmp_path / "b"))


def test_c_paths_take_nothing_after_failed_append(tmp_path):
    """After a log append failed, get and ack raise BackendUnavailable
    before they change the core, whose records could not be logged: the
    ready message stays ready and the held one stays in flight."""
    broker = _open(str(tmp_path / "b"))
    backend = broker._backend
    try:
        broker.declare_topic("t")
        consumer = broker.consume("t", "g", prefetch=10)
        broker.publish("t", 1)
        broker.publish("t", 2)
        held = consumer.get(timeout=1)
        backend._failed = OSError(28, "No space left on device")
        with pytest.raises(mqs.BackendUnavailable, match="failed to append"):
            consumer.get(timeout=0.2)
        with pytest.raises(mqs.BackendUnavailable, match="failed to append"):
            held.ack()
        with pytest.raises(mqs.BackendUnavailable, match="failed to append"):
            broker.publish("t", 3)
        stats = backend._cores["t"]._core.stats()
        assert (stats["ready"], stats["in_flight"]) == (1, 1)
    finally:
        backend._failed = None
        broker.close()


def test_plain_topic_core_until_last_close(tmp_path):
    path = str(tmp_path / "b")
    broker = _open(path)
    try:
        broker.declare_topic("t")
        broker.declare_topic("timed", ttl=60)
        assert "t" in broker._backend._core_paths
        assert "timed" not in broker._backend._core_paths
        assert len(_core_files(path)) == 1
    finally:
        broker.close()
    assert _core_files(path) == []


def test_state_survives_the_last_close(tmp_path):
    path = str(tmp_path / "b")
    broker = _open(path)
    broker.declare_topic("t")
    first = broker.consume("t", "first", prefetch=10)
    for n in range(6):
        broker.publish("t", n, priority=n % 3)
    second = broker.consume("t", "second", start="earliest")
    held = first.get(timeout=1)
    rejected = first.get(timeout=1)
    rejected.nack(requeue=False)
    acked = first.get(timeout=1)
    acked.ack()
    second.get(timeout=1).ack()
    broker.close()

    broker = _open(path)
    try:
        assert "t" in broker._backend._core_paths
        stats = broker.stats("t")
        assert stats["dlq"] == 1
        first = broker.consume("t", "first", prefetch=10)
        got = {body: attempts for body, attempts in _drain(first)}
        assert set(got) == set(range(6)) - {rejected.body, acked.body}
        # The message held at the close was in flight: delivered again.
        assert got[held.body] == 2
        assert [letter.body for letter in broker.dlq_list("t")] == \
            [rejected.body]
        second = broker.consume("t", "second")
        assert len(_drain(second)) == 5
        # Seqs go on where they stopped.
        assert broker.publish("t", "next") == "s7"
    finally:
        broker.close()


def _child_work(path, compact_bytes, report, steps):
    broker = _open(path, compact_bytes=compact_bytes)
    broker.declare_topic("t")
    consumer = broker.consume("t", "g", prefetch=50)
    acked = []
    for n in range(steps):
        broker.publish("t", n, priority=n % 10)
        if n % 3 == 2:
            message = consumer.get(timeout=5)
            message.ack()
            acked.append(message.body)
    held = [consumer.get(timeout=5) for _ in range(4)]
    held[0].nack()          # back to the tail
    held[1].nack(requeue=False)
    report.put((acked, [message.body for message in held]))
    signal.pause()


@pytest.mark.parametrize("compact_bytes", [64 << 20, 4096])
def test_restore_from_records_after_a_kill(tmp_path, compact_bytes):
    """SIGKILL of the only process, then /dev/shm cleared as by a reboot:
    the snapshot and the core records after it restore every message
    that was not acked, none twice. A small compact_bytes makes the
    writer take snapshots while records keep coming."""
    path = str(tmp_path / "b")
    report = CTX.Queue()
    child = CTX.Process(target=_child_work,
                        args=(path, compact_bytes, report, 60))
    child.start()
    try:
        acked, held = report.get(timeout=60)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    assert unlink_journal(path)
    broker = _open(path)
    try:
        consumer = broker.consume("t", "g", prefetch=100)
        got = dict(_drain(consumer))
        assert len(got) == 60 - len(acked) - 1
        assert set(got) == set(range(60)) - set(acked) - {held[1]}
        assert [letter.body for letter in broker.dlq_list("t")] == \
            [held[1]]
        # The nacked message and the two in flight were delivered once.
        assert {body for body, attempts in got.items()
                if attempts == 2} == {held[0], held[2], held[3]}
        stats = broker.stats("t")
        assert stats["published"] == 60
        # The requeue, and the two in flight that the restore returned.
        assert stats["redelivered"] == 3
        assert stats["dead_lettered.rejected"] == 1
    finally:
        broker.close()


def _child_writer(path, ready, go_on):
    broker = _open(path, fsync="always")
    broker.declare_topic("t")
    broker.consume("t", "g").close()
    broker.publish("t", "first")
    ready.set()
    assert go_on.wait(60)
    broker.publish("t", "second")
    ready.set()
    signal.pause()


def _child_publish_unrecorded(path):
    # What a core publish leaves when its process is killed after the core
    # stored the message and before the record reached the journal: the
    # message on the core, the journal mutex held by a dead process.
    broker = _open(path)
    backend = broker._backend
    with backend._lock:
        core = backend._core("t")._core
        core.publish(pickle.dumps("unrecorded", pickle.HIGHEST_PROTOCOL), 0,
                     time.time())
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture
def log_path(tmp_path):
    """Return a log broker path whose /dev/shm files are removed after
    the test, also when it fails before its last close."""
    path = str(tmp_path / "b")
    yield path
    unlink_journal(path)


def test_core_publish_without_record_survives_reboot(log_path):
    """A process killed inside the section after a core change whose
    record it did not commit leaves the log without that change. The
    writer writes the state into the log as a snapshot once a process
    found the mutex's holder dead, so a reboot after that snapshot keeps
    the message, and the counters add up."""
    path = log_path
    ready = CTX.Event()
    go_on = CTX.Event()
    writer = CTX.Process(target=_child_writer, args=(path, ready, go_on))
    writer.start()
    try:
        assert ready.wait(60)
        ready.clear()
        log_before = _read_current(path)
        victim = CTX.Process(target=_child_publish_unrecorded, args=(path,))
        victim.start()
        victim.join(60)
        assert victim.exitcode == -signal.SIGKILL

        # The writer's log thread or, at the latest, its next publish
        # takes the mutex and finds the holder dead. The snapshot after
        # that switches CURRENT to a new log.
        go_on.set()
        assert ready.wait(60)
        deadline = time.monotonic() + 10
        while _read_current(path) == log_before \
                and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(10)

    assert unlink_journal(path)
    broker = _open(path)
    try:
        consumer = broker.consume("t", "g", prefetch=100)
        found = sorted(_drain(consumer))
        assert found == [("first", 1), ("second", 1), ("unrecorded", 1)]
        stats = broker.stats("t")
        assert stats["published"] == 3
        assert stats["acked"] == 3
        assert stats["stored"] == 0
    finally:
        broker.close()


def _child_move(path, ready):
    broker = _open(path)
    broker.declare_topic("t")
    consumer = broker.consume("t", "g", prefetch=10)
    for n in range(5):
        broker.publish("t", n)
    consumer.get(timeout=5).ack()
    held = consumer.get(timeout=5)
    # A key needs the journal: the topic moves with its state.
    broker.publish("t", "keyed", key="k")
    held.ack()
    broker.publish("t", "after")
    ready.set()
    signal.pause()


def test_move_writes_adopt_file_in_shm(tmp_path):
    """The state a move hands over goes to a file next to the journal in
    /dev/shm, which the next snapshot removes, and not next to the log
    directory."""
    path = str(tmp_path / "b")
    broker = _open(path)
    try:
        broker.declare_topic("t")
        broker.publish("t", "plain")
        broker.publish("t", "keyed", key="k")
        assert "t" not in broker._backend._core_paths
        assert sorted(os.listdir(tmp_path)) == ["b"]
    finally:
        broker.close()
    assert sorted(os.listdir(tmp_path)) == ["b"]
    assert not [name for files in _journal_files(path).values()
                for name in files if ".adopt-" in name]


def test_restore_after_move_to_journal(tmp_path):
    path = str(tmp_path / "b")
    ready = CTX.Event()
    child = CTX.Process(target=_child_move, args=(path, ready))
    child.start()
    try:
        assert ready.wait(60)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    unlink_journal(path)
    broker = _open(path)
    try:
        assert "t" not in broker._backend._core_paths
        consumer = broker.consume("t", "g")
        assert sorted(map(str, (body for body, _ in _drain(consumer)))) == \
            ["2", "3", "4", "after", "keyed"]
    finally:
        broker.close()


def test_calls_after_another_process_moved_topic(tmp_path):
    """A second broker (as another process would) moves the topic to the
    journal. The first one's next core call catches up in the section,
    which closes its core handle: the call goes on with the journal."""
    path = str(tmp_path / "b")
    first = _open(path)
    second = _open(path)
    try:
        first.declare_topic("t")
        consumer = first.consume("t", "g", prefetch=10)
        for n in range(4):
            first.publish("t", n)
        nacked = consumer.get(timeout=1)
        released = consumer.get(timeout=1)
        second.declare_topic("t")
        second.publish("t", "keyed", key="k")
        assert "t" not in second._backend._core_paths

        found = consumer.get_many(5, timeout=1)
        assert sorted(map(str, (message.body for message in found))) == \
            ["2", "3", "keyed"]
        assert nacked.nack()
        assert "t" not in first._backend._core_paths
        other = second.consume("t", "g", prefetch=10)
        # The held message and the three of get_many go back.
        assert consumer.close(drain=False) == 4
        bodies = {message.body for message in other.get_many(10, timeout=1)}
        assert bodies == {0, 1, 2, 3, "keyed"}
        assert released.body in bodies
    finally:
        first.close()
        second.close()


def test_ack_many_small_journal_splits(tmp_path):
    """ack_many of journal deliveries (here of a topic moved from its
    core) writes records split to fit the smallest journal."""
    broker = _open(str(tmp_path / "b"), journal_bytes=4096)
    try:
        broker.declare_topic("t")
        consumer = broker.consume("t", "g", prefetch=300)
        broker.publish_many("t", range(300))
        broker.publish("t", "keyed", key="k")
        assert "t" not in broker._backend._core_paths
        held = consumer.get_many(300, timeout=1)
        assert len(held) == 300
        assert consumer.ack_many(held) == 300
        assert [message.body for message in consumer.get_many(
            10, timeout=1)] == ["keyed"]
    finally:
        broker.close()


def test_ack_many_syncs_once(tmp_path):
    """Under sync_acks, ack_many of a core's deliveries waits for one
    sync that covers the batch, not for one per ack."""
    broker = _open(str(tmp_path / "b"), fsync="always", sync_acks=True)
    backend = broker._backend
    syncs = []
    try:
        broker.declare_topic("t")
        consumer = broker.consume("t", "g", prefetch=50)
        broker.publish_many("t", range(50))
        held = consumer.get_many(50, timeout=1)
        sync = backend._sync
        backend._sync = lambda *args: syncs.append(args) or sync(*args)
        assert consumer.ack_many(held) == 50
        del backend._sync
        assert "t" in backend._core_paths
        assert len(syncs) == 1
        assert backend._durable[_log_shared._DURABLE] >= backend._local.mark
    finally:
        broker.close()


def _child_peer(path, start, ready, count):
    # Under the default fsync="interval" a call returns before the
    # writer copies its record into the log, so a kill of both and the
    # journal's removal could lose it. "always" with sync_acks makes
    # every publish and ack wait until the log has it.
    broker = _open(path, fsync="always", sync_acks=True)
    consumer = broker.consume("t", "g", prefetch=count)
    for n in range(start, start + count):
        broker.publish("t", n)
    for _ in range(count // 2):
        consumer.get(timeout=5).ack()
    ready.set()
    signal.pause()


def test_records_of_other_processes_reach_the_log(tmp_path):
    """Two processes work on one core topic. The writer copies the other's
    core records into the log, so a restore after both are killed has
    every operation of both."""
    path = str(tmp_path / "b")
    broker = _open(path)
    broker.declare_topic("t")
    broker.close()
    children = []
    for start in (0, 100):
        ready = CTX.Event()
        child = CTX.Process(target=_child_peer,
                            args=(path, start, ready, 20))
        child.start()
        children.append((child, ready))
        assert ready.wait(60)
    for child, _ in children:
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    unlink_journal(path)
    broker = _open(path)
    try:
        stats = broker.stats("t")
        assert stats["published"] == 40
        assert stats["stored"] == 20
        consumer = broker.consume("t", "g", prefetch=100)
        bodies = [body for body, _ in _drain(consumer)]
        assert len(bodies) == 20
        assert len(set(bodies)) == 20
    finally:
        broker.close()


# Publishes, gets and acks plain messages of topic "t" through the C
# paths in a loop and appends one line per finished step to its report
# file: "P body" after a publish returned, "G body attempts" after a
# get, "a body" before an ack and "A body" after it returned True. Every
# tenth message it gets stays unacked until more than four are waiting.
C_PATHS_WORKER = """
path, report = sys.argv[1], sys.argv[2]
broker = mqs.Broker(backend="log", path=path, fsync="always",
                    sync_acks=True)
consumer = broker.consume("t", "g", prefetch=8, ack_timeout=600)
out = open(report, "a", buffering=1)


def ack(message):
    out.write(f"a {message.body}\\n")
    if message.ack():
        out.write(f"A {message.body}\\n")


unacked = []
published = got = 0
while True:
    for _ in range(3):
        body = f"{os.getpid()}-{published}"
        published += 1
        broker.publish("t", body, priority=published % 10)
        out.write(f"P {body}\\n")
    for _ in range(3):
        try:
            message = consumer.get(timeout=0.01)
        except mqs.Empty:
            break
        got += 1
        out.write(f"G {message.body} {message.attempts}\\n")
        if got % 10:
            ack(message)
        else:
            unacked.append(message)
    while len(unacked) > 4:
        ack(unacked.pop(0))
"""


def _read_reports(directory):
    """Return the bodies of the workers' reports by step ("P", "G", "a",
    "A"), with the attempts of each "G". A line that a kill cut short is
    left out."""
    steps = {"P": set(), "G": {}, "a": set(), "A": set()}
    for name in os.listdir(directory):
        with open(os.path.join(directory, name)) as file:
            for line in file:
                if not line.endswith("\n"):
                    continue
                step, body, *rest = line.split()
                if step == "G":
                    steps["G"].setdefault(body, []).append(int(rest[0]))
                else:
                    steps[step].add(body)
    return steps


def _wait_published(directory, count, timeout=60):
    """Wait until the workers' reports list `count` returned publishes,
    or `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while len(_read_reports(directory)["P"]) < count \
            and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize("journal", ["kept", "removed"])
def test_c_paths_survive_repeated_kills(tmp_path, journal):
    """Two processes publish, get and ack through the C paths under
    fsync="always" with sync_acks, and are killed with SIGKILL eight
    times at random points and started again. Then every process is
    gone, the journal is kept or removed (a reboot), and the log
    restores: no returned publish is lost, no returned ack comes back,
    no message is delivered twice, the counters add up, and without a
    reboot each message that was delivered before comes with a higher
    attempts count."""
    path = str(tmp_path / "b")
    reports = tmp_path / "reports"
    reports.mkdir()
    broker = _open(path)
    broker.declare_topic("t")
    broker.close()
    script = "import os, sys\nimport mqs\n" + textwrap.dedent(
        C_PATHS_WORKER)
    rng = random.Random(5)

    def start(index):
        return subprocess.Popen(
            [sys.executable, "-c", script, path,
             str(reports / f"{index}-{rng.random()}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    workers = [start(0), start(1)]
    try:
        for _ in range(8):
            # On a busy machine a restarted worker may take longer to
            # start than the pause below: each kill comes after the
            # workers published again.
            _wait_published(reports, len(_read_reports(reports)["P"]) + 1)
            time.sleep(rng.uniform(0.1, 0.4))
            index = rng.randrange(2)
            workers[index].kill()
            workers[index].wait(30)
            workers[index] = start(index)
        _wait_published(reports, 150)
    finally:
        for worker in workers:
            worker.kill()
            worker.wait(30)
    if journal == "removed":
        assert unlink_journal(path)
    steps = _read_reports(reports)
    assert len(steps["P"]) > 100
    broker = _open(path)
    try:
        stats = broker.stats("t")
        assert stats["acked"] + stats["stored"] == stats["published"]
        consumer = broker.consume("t", "g", prefetch=1000)
        remaining = {}
        for body, attempts in _drain(consumer, limit=100000):
            assert body not in remaining
            remaining[body] = attempts
    finally:
        broker.close()
    # An ack that was started may have been done when the kill came.
    lost = steps["P"] - steps["a"] - set(remaining)
    assert lost == set()
    assert steps["A"] & set(remaining) == set()
    if journal == "kept":
        for body, attempts in remaining.items():
            if body in steps["G"]:
                assert attempts > max(steps["G"][body]), body
