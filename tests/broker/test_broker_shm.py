"""Tests of the shm backend across real processes and shared memory.

The contract suite (test_broker_contract.py) covers the broker's rules;
these tests cover what only the shm backend has: processes sharing one
broker by name, its lifetime in /dev/shm, dead consumers' messages, a
journal that wraps into snapshots, and replicas that stay equal.
"""

import collections
import os
import pickle
import queue
import signal
import stat
import struct
import threading
import time
import uuid

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

import mqs
from broker_children import FORK, join, start
from mqs.broker import _shm as shm_module
from mqs.broker._shm import CORE_SLOT_BYTES, SHM_DIR, ShmBackend


@pytest.fixture
def name():
    """Return a fresh broker name, unlinked after the test."""
    fresh = f"test-shm-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield fresh
    mqs.Broker.unlink(fresh)


def open_broker(name, **options):
    return mqs.Broker(backend="shm", name=name, **options)


def drain(consumer, count, timeout=30):
    """Get `count` messages (acking each) or fail after `timeout`."""
    messages = []
    deadline = time.monotonic() + timeout
    while len(messages) < count and time.monotonic() < deadline:
        try:
            batch = consumer.get_many(count - len(messages), timeout=0.2)
        except mqs.Empty:
            continue
        for message in batch:
            message.ack()
        messages += batch
    return messages


# Byte offset of the layout version in a journal or topic core file:
# after the 64-bit magic (mqs_journal.h, mqs_topiccore.h).
VERSION_OFFSET = 8


def patch_version(path, delta):
    """Add `delta` to the layout version of the file at `path`; return
    the version it had."""
    with open(path, "r+b") as file:
        file.seek(VERSION_OFFSET)
        (version,) = struct.unpack("<I", file.read(4))
        file.seek(VERSION_OFFSET)
        file.write(struct.pack("<I", version + delta))
    return version


def snapshot_files(name):
    prefix = f"mqs.broker.{name}.snapshot-"
    return [entry for entry in os.listdir(SHM_DIR)
            if entry.startswith(prefix)]


# Children. Module level, so that they are plain functions in the fork.

def publish_bodies(name, count):
    broker = open_broker(name)
    for number in range(count):
        broker.publish("t", {"n": number})
    broker.close()


def consume_group(name, group, ready, stop, results):
    broker = open_broker(name)
    consumer = broker.consume("t", group, prefetch=16, ack_timeout=60)
    ready.set()
    seen = []
    while not stop.is_set():
        try:
            batch = consumer.get_many(16, timeout=0.05)
        except mqs.Empty:
            continue
        for message in batch:
            seen.append(message.body)
            message.ack()
    consumer.close()
    results.put((group, os.getpid(), seen))
    broker.close()


def consume_rated(name, start_at, seconds, results):
    broker = open_broker(name)
    consumer = broker.consume("t", "g", auto_ack=True, prefetch=64)
    while time.monotonic() < start_at:
        time.sleep(0.001)
    taken = 0
    while time.monotonic() < start_at + seconds:
        try:
            taken += len(consumer.get_many(64, timeout=0.01))
        except mqs.Empty:
            pass
    results.put(taken)
    consumer.close()
    broker.close()


def publish_keys(name, keys, per_key):
    broker = open_broker(name)
    for number in range(per_key):
        for key in keys:
            broker.publish("t", (key, number), key=key)
    broker.close()


def consume_keys(name, stop, results):
    broker = open_broker(name)
    consumer = broker.consume("t", "g", prefetch=4, ack_timeout=60)
    log = []
    while not stop.is_set():
        try:
            message = consumer.get(timeout=0.05)
        except mqs.Empty:
            continue
        got = time.monotonic()
        time.sleep(0.0005)
        done = time.monotonic()
        message.ack()
        log.append((message.body, got, done))
    consumer.close()
    results.put(log)
    broker.close()


def fetch_then_die(name, results):
    broker = open_broker(name)
    consumer = broker.consume("t", "g", prefetch=10, ack_timeout=600)
    messages = consumer.get_many(5, timeout=10)
    results.put(sorted(message.body for message in messages))
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)


def publish_later(name, delay_s):
    broker = open_broker(name)
    time.sleep(delay_s)
    broker.publish("t", "late")
    broker.close()


# Processes sharing one broker.

def test_shm_publish_in_one_process_consume_in_another(name):
    broker = open_broker(name)
    broker.declare_topic("t")
    consumer = broker.consume("t", "g")
    join(start(publish_bodies, name, 200))

    messages = drain(consumer, 200)
    assert [message.body for message in messages] == \
        [{"n": number} for number in range(200)]
    assert all(message.attempts == 1 for message in messages)
    stats = broker.stats("t")
    assert stats["published"] == 200
    assert stats["acked"] == 200
    assert stats["stored"] == 0
    consumer.close()
    broker.close()


def test_shm_groups_split_and_copy_across_processes(name):
    broker = open_broker(name)
    broker.declare_topic("t")
    stop = FORK.Event()
    results = FORK.Queue()
    readies = []
    children = []
    for group in ("a", "a", "b"):
        ready = FORK.Event()
        readies.append(ready)
        children.append(start(consume_group, name, group, ready, stop,
                              results))
    for ready in readies:
        assert ready.wait(30)
    broker.publish_many("t", range(300))
    deadline = time.monotonic() + 60
    while broker.stats("t")["acked"] < 600 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    found = [results.get(timeout=30) for _ in children]
    for child in children:
        join(child)

    group_a = [seen for group, _, seen in found if group == "a"]
    group_b = [seen for group, _, seen in found if group == "b"]
    # Competing consumers of "a" split the messages without overlap.
    assert sorted(group_a[0] + group_a[1]) == list(range(300))
    assert not set(group_a[0]) & set(group_a[1])
    # "b" gets its own copy of every message, in publish order.
    assert group_b[0] == list(range(300))
    assert broker.stats("t")["acked"] == 600
    broker.close()


def test_shm_rate_limit_shared_by_three_processes(name):
    broker = open_broker(name)
    rate, burst, seconds = 100, 10, 1.5
    broker.declare_topic("t", rate=mqs.Rate(rate, burst=burst))
    consumer = broker.consume("t", "g")
    consumer.close()
    broker.publish_many("t", range(2000))
    results = FORK.Queue()
    start_at = time.monotonic() + 1.0
    children = [start(consume_rated, name, start_at, seconds, results)
                for _ in range(3)]
    taken = [results.get(timeout=60) for _ in children]
    for child in children:
        join(child)

    # One bucket for the group, whatever the number of processes: the
    # total stays near rate * seconds + burst, never three times it.
    total = sum(taken)
    assert total <= rate * seconds * 1.3 + burst + 10
    assert total >= rate * seconds * 0.3
    assert broker.stats("t")["delivered"] == total
    broker.close()


def test_shm_key_order_holds_across_processes(name):
    broker = open_broker(name)
    broker.declare_topic("t")
    broker.consume("t", "g").close()
    stop = FORK.Event()
    results = FORK.Queue()
    consumers = [start(consume_keys, name, stop, results) for _ in range(3)]
    producers = [start(publish_keys, name, ["k1", "k2"], 40),
                 start(publish_keys, name, ["k3", "k4"], 40)]
    for producer in producers:
        join(producer)
    deadline = time.monotonic() + 60
    while broker.stats("t")["acked"] < 160 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    logs = [results.get(timeout=30) for _ in consumers]
    for child in consumers:
        join(child)

    by_key = collections.defaultdict(list)
    for log in logs:
        for (key, number), got, done in log:
            by_key[key].append((got, done, number))
    assert sorted(by_key) == ["k1", "k2", "k3", "k4"]
    for key, deliveries in by_key.items():
        deliveries.sort()
        # Each key's messages went out in publish order...
        assert [number for _, _, number in deliveries] == list(range(40)), \
            key
        # ...and one was never taken before the previous one was done.
        for before, after in zip(deliveries, deliveries[1:]):
            assert after[0] >= before[1], key
    broker.close()


def test_shm_fetch_wakes_on_publish_of_other_process(name):
    broker = open_broker(name)
    broker.declare_topic("t")
    consumer = broker.consume("t", "g")
    child = start(publish_later, name, 0.3)
    began = time.monotonic()
    message = consumer.get(timeout=20)
    waited = time.monotonic() - began
    join(child)
    assert message.body == "late"
    # Woken by the commit, long before the timeout.
    assert waited < 10
    message.ack()
    consumer.close()
    broker.close()


# Dead processes and lifetime.

def test_shm_killed_consumer_messages_redelivered(name):
    broker = open_broker(name)
    broker.declare_topic("t")
    broker.publish_many("t", range(5))
    results = FORK.Queue()
    child = start(fetch_then_die, name, results)
    assert results.get(timeout=30) == [0, 1, 2, 3, 4]
    child.join(30)
    assert child.exitcode == -signal.SIGKILL

    consumer = broker.consume("t", "g")
    messages = drain(consumer, 5, timeout=30)
    assert sorted(message.body for message in messages) == list(range(5))
    # The attempt made by the dead consumer counts.
    assert [message.attempts for message in messages] == [2] * 5
    assert broker.stats("t")["in_flight"] == 0
    consumer.close()
    broker.close()


def test_shm_consumer_left_open_at_close_is_reclaimed(name):
    first = open_broker(name)
    first.declare_topic("t")
    first.publish_many("t", ["a", "b"])
    held = first.consume("t", "g", prefetch=10,
                         ack_timeout=600).get_many(2, timeout=5)
    assert len(held) == 2
    first.close()

    second = open_broker(name)
    consumer = second.consume("t", "g")
    messages = drain(consumer, 2, timeout=10)
    assert [message.body for message in messages] == ["a", "b"]
    assert [message.attempts for message in messages] == [2, 2]
    consumer.close()
    second.close()


def test_shm_state_outlives_every_process_until_unlink(name):
    broker = open_broker(name)
    broker.declare_topic("t", max_attempts=7)
    broker.publish_many("t", ["x", "y", "z"])
    broker.close()
    mode = os.stat(os.path.join(SHM_DIR, f"mqs.broker.{name}")).st_mode
    assert stat.S_IMODE(mode) == 0o600

    reopened = open_broker(name)
    assert reopened.topic_config("t").max_attempts == 7
    assert reopened.stats("t")["published"] == 3
    consumer = reopened.consume("t", "g")
    assert [m.body for m in drain(consumer, 3)] == ["x", "y", "z"]
    consumer.close()
    reopened.close()

    assert mqs.Broker.unlink(name) is True
    assert mqs.Broker.unlink(name) is False
    fresh = open_broker(name)
    assert not fresh.backend.has_topic("t")
    fresh.close()


def test_shm_rejects_bad_name_and_journal_size(name):
    with pytest.raises(ValueError, match="without '/'"):
        open_broker("a/b")
    with pytest.raises(TypeError, match="name must be a str"):
        open_broker(5)
    with pytest.raises(TypeError, match="journal_bytes must be an int, "
                                        "got str '1M'"):
        open_broker(name, journal_bytes="1M")
    with pytest.raises(ValueError, match="journal_bytes must be a multiple"):
        open_broker(name, journal_bytes=1000)
    with pytest.raises(ValueError, match="got 4100"):
        open_broker(name, journal_bytes=4100)


def test_shm_message_larger_than_half_journal_raises(name):
    broker = open_broker(name, journal_bytes=8192)
    broker.declare_topic("t")
    with pytest.raises(mqs.MessageTooLarge, match="larger journal_bytes"):
        broker.publish("t", b"x" * 5000)
    # A batch of small messages that does not fit one record is split.
    ids = broker.publish_many("t", [b"y" * 1000] * 12)
    assert len(ids) == 12
    assert broker.stats("t")["published"] == 12
    broker.close()


def test_shm_too_large_advice_for_existing_broker(name):
    open_broker(name, journal_bytes=8192).close()
    # An existing broker keeps its journal: the larger size is ignored.
    broker = open_broker(name, journal_bytes=1 << 20)
    with pytest.raises(mqs.MessageTooLarge) as too_large:
        broker.publish("t", b"x" * 5000)
    message = str(too_large.value)
    assert "4096 bytes that shm broker" in message
    assert "half its journal of 8192 bytes" in message
    assert "ignores the journal_bytes passed to open it" in message
    assert f"mqs.Broker.unlink({name!r})" in message
    assert "discards its topics and messages" in message
    broker.close()

    # The advice works: after unlink the larger journal takes the message.
    assert mqs.Broker.unlink(name)
    broker = open_broker(name, journal_bytes=1 << 20)
    broker.publish("t", b"x" * 5000)
    assert broker.stats("t")["published"] == 1
    broker.close()


# Journal wrap and replicas.

def test_shm_journal_wraps_into_snapshots(name):
    writer = open_broker(name, journal_bytes=4096)
    # A ttl keeps the topic on the journal (a topic core has no ttl).
    writer.declare_topic("t", weights={9: 2, 0: 1}, ttl=3600)
    idle = open_broker(name)
    journal = writer.backend._journal
    for number in range(300):
        writer.publish("t", number, priority=9 if number % 3 else 0)
    generation, _ = journal.position()
    assert generation >= 5
    # One snapshot is kept, with the tails of every generation since
    # (and of the one before it, for replicas that lag less).
    [snapshot] = snapshot_files(name)
    base = int(snapshot.rsplit("-", 1)[1])
    assert base <= generation
    assert sorted(tail_files(name)) == sorted(
        f"mqs.broker.{name}.tail-{number}"
        for number in range(base - 1, generation))

    # A replica that missed several generations catches up; a new one
    # starts from the snapshot and the tails after it.
    late = open_broker(name)
    for broker in (idle, late):
        stats = broker.stats("t")
        assert stats["published"] == 300
        assert stats["stored"] == 300
    consumer = idle.consume("t", "g", start="earliest", prefetch=400)
    messages = drain(consumer, 300)
    ninth = [number for number in range(300) if number % 3]
    assert sorted(m.body for m in messages if m.priority == 9) == ninth
    assert writer.stats("t")["acked"] == 300
    assert late.stats("t") == writer.stats("t")
    consumer.close()
    for broker in (writer, idle, late):
        broker.close()


def tail_files(name):
    prefix = f"mqs.broker.{name}.tail-"
    return [entry for entry in os.listdir(SHM_DIR)
            if entry.startswith(prefix)]


def publish_past_one_restart(broker, **options):
    """Publish until the journal restarts once; return the generation
    that the restart ended and the bodies published."""
    journal = broker.backend._journal
    ended, _ = journal.position()
    bodies = []
    while journal.position()[0] == ended:
        bodies.append(len(bodies))
        broker.publish("t", bodies[-1], **options)
    return ended, bodies


def count_snapshot_loads(monkeypatch, broker):
    loads = []
    backend = broker.backend
    load = backend._load_snapshot_file

    def counted(generation):
        loads.append(generation)
        load(generation)

    monkeypatch.setattr(backend, "_load_snapshot_file", counted)
    return loads


STORED = 400


def store_large_state(broker):
    """Store `STORED` messages of 1 KiB on a journal topic, so that the
    snapshot (over 400 KiB) is larger than several 64 KiB journals."""
    # A ttl keeps the topic on the journal (a topic core has no ttl).
    broker.declare_topic("t", ttl=3600)
    broker.publish_many("t", [b"x" * 1024] * STORED)


def test_shm_lagging_replica_replays_tail(name, monkeypatch):
    writer = open_broker(name, journal_bytes=1 << 16)
    store_large_state(writer)
    lagging = open_broker(name)
    loads = count_snapshot_loads(monkeypatch, lagging)
    ended, bodies = publish_past_one_restart(writer, priority=5)
    assert f"mqs.broker.{name}.tail-{ended}" in tail_files(name)

    # The lagging replica applies the rest of the old generation from
    # the tail, then the new generation's records.
    assert lagging.stats("t") == writer.stats("t")
    assert loads == []
    assert lagging.backend._generation == ended + 1
    consumer = lagging.consume("t", "g", start="earliest",
                               prefetch=len(bodies) + STORED)
    messages = drain(consumer, len(bodies) + STORED)
    assert [m.body for m in messages if m.priority == 5] == bodies
    assert writer.stats("t")["acked"] == len(bodies) + STORED
    consumer.close()
    writer.close()
    lagging.close()


def test_shm_large_state_skips_snapshots(name, monkeypatch):
    writer = open_broker(name, journal_bytes=1 << 16)
    store_large_state(writer)
    lagging = open_broker(name)
    loads = count_snapshot_loads(monkeypatch, lagging)
    first, _ = writer.backend._journal.position()
    bodies = []
    snapshots = set()
    # A snapshot is due once the tails since the last one add up to its
    # size: 3 journals of small records (192 KiB) cross that at most once.
    for _ in range(3):
        _, more = publish_past_one_restart(writer)
        bodies += more
        snapshots.update(snapshot_files(name))
    assert len(snapshots) <= 2
    # Then restart until the newest snapshot is older than the journal,
    # so that a new replica needs tails after it.
    for _ in range(10):
        generation, _ = writer.backend._journal.position()
        [snapshot] = snapshot_files(name)
        base = int(snapshot.rsplit("-", 1)[1])
        if base < generation:
            break
        _, more = publish_past_one_restart(writer)
        bodies += more
    assert base < generation
    assert generation >= first + 3
    assert sorted(tail_files(name)) == sorted(
        f"mqs.broker.{name}.tail-{number}"
        for number in range(base - 1, generation))

    # Three generations behind, the replica catches up from the tails.
    assert lagging.stats("t") == writer.stats("t")
    assert loads == []
    # A new replica loads the snapshot and applies the tails after it.
    late = open_broker(name)
    assert late.stats("t") == writer.stats("t")
    consumer = late.consume("t", "g", start="earliest",
                            prefetch=len(bodies) + STORED)
    messages = drain(consumer, len(bodies) + STORED)
    assert [m.body for m in messages[STORED:]] == bodies
    assert lagging.stats("t")["acked"] == len(bodies) + STORED
    consumer.close()
    for broker in (writer, lagging, late):
        broker.close()


def test_shm_snapshot_of_dead_compaction_is_dropped(name):
    writer = open_broker(name, journal_bytes=1 << 16)
    store_large_state(writer)
    skipped = False
    for _ in range(6):
        generation, _ = writer.backend._journal.position()
        # What a compaction killed between its snapshot and its restart
        # leaves: a snapshot of the next generation that misses the
        # records appended after it.
        stale = os.path.join(
            SHM_DIR, f"mqs.broker.{name}.snapshot-{generation + 1}")
        with open(stale, "wb") as file:
            file.write(b"not a snapshot")
        publish_past_one_restart(writer)
        if not os.path.exists(stale):
            skipped = True
            break
        # This restart wrote a snapshot of its own over it.
        with open(stale, "rb") as file:
            assert pickle.load(file)[0] == ("mqs.broker.shm", 2)
    assert skipped
    late = open_broker(name)
    assert late.stats("t") == writer.stats("t")
    writer.close()
    late.close()


def die_in_compaction(name, results):
    """Publish until a compaction writes its snapshot, then die by
    SIGKILL before the journal restarts; put the bodies published."""
    broker = open_broker(name)
    backend = broker.backend
    write = backend._write_snapshot_file

    def write_then_die(path):
        write(path)
        results.put(published)
        os.kill(os.getpid(), signal.SIGKILL)

    backend._snapshot_due = lambda *args: True
    backend._write_snapshot_file = write_then_die
    published = []
    # A 20 KiB body finds no room in a fuller journal sooner than the
    # parent's small ones, so the parent appends after the death.
    while True:
        body = ("child", len(published), b"y" * 20_000)
        broker.publish("t", body)
        published.append(body[:2])


def test_shm_compaction_killed_before_restart(name):
    writer = open_broker(name, journal_bytes=1 << 16)
    store_large_state(writer)
    generation, _ = writer.backend._journal.position()
    results = FORK.SimpleQueue()
    child = start(die_in_compaction, name, results)
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    from_child = results.get()
    stale = os.path.join(
        SHM_DIR, f"mqs.broker.{name}.snapshot-{generation + 1}")
    assert writer.backend._journal.position()[0] == generation
    assert os.path.exists(stale)

    # The dead process held the mutex: the next call recovers it. Small
    # records still fit into the old generation, then it restarts.
    bodies = []
    while writer.backend._journal.position()[0] == generation:
        bodies.append(("parent", len(bodies)))
        writer.publish("t", bodies[-1])
    assert len(bodies) > 1
    late = open_broker(name)
    assert late.stats("t") == writer.stats("t")
    consumer = late.consume("t", "g", start="earliest",
                            prefetch=STORED + len(from_child) + len(bodies))
    messages = drain(consumer, STORED + len(from_child) + len(bodies))
    found = [m.body[:2] for m in messages[STORED:]]
    assert sorted(found) == sorted(from_child + bodies)
    consumer.close()
    writer.close()
    late.close()


def test_shm_missing_tails_raise_backend_unavailable(name):
    writer = open_broker(name, journal_bytes=1 << 16)
    store_large_state(writer)
    lagging = open_broker(name)
    ended, _ = publish_past_one_restart(writer)
    assert snapshot_files(name) != [f"mqs.broker.{name}.snapshot-"
                                    f"{ended + 1}"]
    for entry in tail_files(name):
        os.unlink(os.path.join(SHM_DIR, entry))

    with pytest.raises(mqs.BackendUnavailable, match="tail files"):
        lagging.stats("t")
    writer.close()
    lagging.close()


def lag_small_state(name, monkeypatch):
    """Open a writer and a replica, and make the replica lag behind a
    restart of a journal whose state is small, so that the restart
    writes a snapshot. Return both brokers, the replica's snapshot
    loads, the generation that the restart ended and the bodies."""
    writer = open_broker(name, journal_bytes=4096)
    writer.declare_topic("t", ttl=3600)
    lagging = open_broker(name)
    loads = count_snapshot_loads(monkeypatch, lagging)
    ended, bodies = publish_past_one_restart(writer)
    return writer, lagging, loads, ended, bodies


def test_shm_replica_without_tail_loads_snapshot(name, monkeypatch):
    writer, lagging, loads, ended, bodies = lag_small_state(
        name, monkeypatch)
    for entry in tail_files(name):
        os.unlink(os.path.join(SHM_DIR, entry))

    assert lagging.stats("t") == writer.stats("t")
    assert loads == [ended + 1]
    consumer = lagging.consume("t", "g", start="earliest",
                               prefetch=len(bodies))
    assert [m.body for m in drain(consumer, len(bodies))] == bodies
    consumer.close()
    writer.close()
    lagging.close()


def test_shm_tail_of_wrong_size_is_ignored(name, monkeypatch):
    writer, lagging, loads, ended, _ = lag_small_state(name, monkeypatch)
    [entry] = tail_files(name)
    with open(os.path.join(SHM_DIR, entry), "r+b") as file:
        file.truncate(8)

    assert lagging.stats("t") == writer.stats("t")
    assert loads == [ended + 1]
    writer.close()
    lagging.close()


def test_shm_generation_with_adopt_writes_no_tail(name, monkeypatch):
    writer = open_broker(name, journal_bytes=1 << 16)
    writer.declare_topic("t")
    assert "t" in writer.backend._core_paths
    writer.publish("t", "on the core")
    # A key moves the topic from its core to the journal (an adopt
    # record, whose state file the next compaction removes).
    writer.publish("t", "keyed", key="k")
    assert "t" not in writer.backend._core_paths
    lagging = open_broker(name)
    loads = count_snapshot_loads(monkeypatch, lagging)
    # The lagging replica applied the adopt record when it opened.
    ended, bodies = publish_past_one_restart(writer)
    assert tail_files(name) == []

    assert lagging.stats("t") == writer.stats("t")
    assert loads == [ended + 1]
    # The next generation has no adopt record: its compaction writes
    # a tail again.
    ended, more = publish_past_one_restart(writer)
    assert f"mqs.broker.{name}.tail-{ended}" in tail_files(name)
    assert lagging.stats("t") == writer.stats("t")
    writer.close()
    lagging.close()


def test_shm_unlink_removes_tail_files(name):
    writer = open_broker(name, journal_bytes=4096)
    writer.declare_topic("t", ttl=3600)
    publish_past_one_restart(writer)
    assert len(tail_files(name)) == 1
    writer.close()
    assert mqs.Broker.unlink(name)
    assert tail_files(name) == []


# Topic cores and the journal.

def core_files(name):
    prefix = f"mqs.broker.{name}.core-"
    return [entry for entry in os.listdir(SHM_DIR)
            if entry.startswith(prefix)]


def test_shm_plain_topic_runs_on_its_core(name):
    broker = open_broker(name)
    other = open_broker(name)
    broker.declare_topic("t")
    assert len(core_files(name)) == 1
    consumer = other.consume("t", "g", prefetch=10)
    broker.publish("t", {"n": 1}, headers={"h": 1}, reply_to="r",
                   correlation_id="c")
    message = consumer.get(timeout=5)
    assert message.body == {"n": 1}
    assert message.headers == {"h": 1}
    assert (message.reply_to, message.correlation_id) == ("r", "c")
    assert message.id.startswith("s")
    assert message.ack()
    assert broker.stats("t")["acked"] == 1
    # Nothing but the declare and the open went through the journal.
    assert "t" in broker.backend._core_paths
    assert "t" in other.backend._core_paths
    consumer.close()
    broker.close()
    other.close()


def publish_to_journal_topic(name, count):
    broker = open_broker(name)
    for number in range(count):
        broker.publish("j", {"n": number})
    broker.close()


@pytest.mark.parametrize("settings", [
    {"maxsize": 1000, "when_full": "drop_oldest"},
    {"retry": mqs.Backoff(base=1), "max_attempts": 3},
])
def test_shm_journal_topic_direct_paths_across_processes(name, settings,
                                                         monkeypatch):
    """On a topic that the core does not cover, publish, get and ack
    without options take the journal's direct paths (the general ones
    raise here), in this process and in a child, and both replicas
    agree on every count."""
    broker = open_broker(name)
    broker.declare_topic("j", **settings)
    assert "j" not in broker.backend._core_paths
    consumer = broker.consume("j", "g", prefetch=1, ack_timeout=60)

    def general_path(*args, **kwargs):
        raise AssertionError("took the general path")

    join(start(publish_to_journal_topic, name, 50))
    monkeypatch.setattr(ShmBackend, "publish", general_path)
    monkeypatch.setattr(ShmBackend, "fetch", general_path)
    monkeypatch.setattr(ShmBackend, "_settle", general_path)
    for number in range(50, 60):
        broker.publish("j", {"n": number})
    bodies = []
    for _ in range(60):
        message = consumer.get(timeout=5)
        bodies.append(message.body)
        assert message.ack()
    assert bodies == [{"n": number} for number in range(60)]
    monkeypatch.undo()
    other = open_broker(name)
    for replica in (broker, other):
        stats = replica.stats("j")
        assert (stats["published"], stats["delivered"], stats["acked"],
                stats["stored"]) == (60, 60, 60, 0)
    consumer.close()
    other.close()
    broker.close()


def publish_keyed_with_ttl(name):
    broker = open_broker(name)
    for number in range(4):
        broker.publish("j", number, key=f"k{number % 2}")
    broker.close()


def test_shm_journal_ttl_expires_across_processes(name):
    """Messages of a journal topic with a ttl and keys, published by a
    child, expire at the ttl in this process too: the broker time of
    both replicas (`JournalSection.tick`) agrees, the keys free up, and
    every replica counts the expiries."""
    broker = open_broker(name)
    broker.declare_topic("j", ttl=0.3, maxsize=10)
    assert "j" not in broker.backend._core_paths
    consumer = broker.consume("j", "g", prefetch=10, ack_timeout=60)
    join(start(publish_keyed_with_ttl, name))
    first = consumer.get(timeout=5)
    assert first.body == 0
    time.sleep(0.6)
    # The first message was in flight, so only the three others expired.
    with pytest.raises(mqs.Empty):
        consumer.get(timeout=0.2)
    assert first.ack() is True
    broker.publish("j", "after", key="k0")
    assert consumer.get(timeout=5).body == "after"
    other = open_broker(name)
    for replica in (broker, other):
        stats = replica.stats("j")
        assert stats["published"] == 5
        assert stats["expired"] == 3
        assert stats["stored"] == 1
    consumer.close()
    other.close()
    broker.close()


def test_shm_core_topic_moves_to_journal_keeping_order(name):
    broker = open_broker(name)
    other = open_broker(name)
    broker.declare_topic("t", weights={9: 1, 0: 1})
    consumer = other.consume("t", "g", prefetch=10, ack_timeout=600)
    for number in range(4):
        broker.publish("t", number)
    held = consumer.get(timeout=5)
    assert held.body == 0
    # A keyed message needs the journal: the topic moves with its state,
    # and the new message queues behind the ones the core held.
    broker.publish("t", 4, key="k")
    assert "t" not in broker.backend._core_paths
    assert core_files(name) == []
    assert [message.body for message in drain(consumer, 4)] == [1, 2, 3, 4]
    # A tag from the core settles the same delivery on the journal.
    assert held.ack()
    stats = other.stats("t")
    assert stats["published"] == 5
    assert stats["acked"] == 5
    assert stats["stored"] == 0
    assert other.stats("t") == broker.stats("t")
    consumer.close()
    broker.close()
    other.close()


def test_shm_core_dead_letter_stays_on_core(name):
    """A dead letter leaves the topic on its core. The letter goes to
    the topic's dead-letter queue in the journal, which every process
    lists. A purge runs there, and only a redrive moves the topic."""
    broker = open_broker(name)
    other = open_broker(name)
    broker.declare_topic("t", max_attempts=2)
    consumer = broker.consume("t", "g", ack_timeout=0.2)
    broker.publish("t", "poison", headers={"trace": 1})
    assert consumer.get(timeout=5).nack()
    # The second delivery misses its deadline: max_attempts is reached
    # when a fetch runs the timers.
    assert consumer.get(timeout=5).attempts == 2
    with pytest.raises(mqs.Empty):
        consumer.get(timeout=0.5)
    for replica in (broker, other):
        (letter,) = replica.dlq_list("t")
        assert letter.body == "poison"
        assert letter.reason == "ack_timeout"
        assert letter.attempts == 2
        assert letter.headers["trace"] == 1
        assert letter.headers["mqs.group"] == "g"
        assert letter.error == "ack deadline passed"
    assert "t" in broker.backend._core_paths
    assert "t" in other.backend._core_paths
    stats = other.stats("t")
    assert stats["redelivered"] == 1
    assert stats["dead_lettered"] == 1
    assert stats["dlq"] == 1
    assert other.stats("t") == broker.stats("t")

    # Rejected on the core too, then purged there.
    broker.publish("t", "rejected")
    assert consumer.get(timeout=5).nack(requeue=False)
    assert [letter.body for letter in other.dlq_list("t")] == \
        ["poison", "rejected"]
    assert other.dlq_purge("t") == 2
    assert broker.dlq_list("t") == []
    assert broker.stats("t")["dlq_purged"] == 2
    assert "t" in broker.backend._core_paths

    # A redrive returns the letter to its group, on the journal.
    broker.publish("t", "again")
    assert consumer.get(timeout=5).nack(requeue=False)
    assert broker.dlq_redrive("t") == 1
    assert "t" not in broker.backend._core_paths
    message = consumer.get(timeout=5)
    assert message.body == "again"
    assert message.ack()
    assert other.stats("t")["stored"] == 0
    consumer.close()
    broker.close()
    other.close()


def reject_then_die(name):
    broker = open_broker(name)
    consumer = broker.consume("t", "g", ack_timeout=600)
    message = consumer.get(timeout=10)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    shm_module._after_dead_record_hook = die
    message.nack(requeue=False)


def test_shm_core_dead_letter_record_applies_once(name):
    """A process killed (holding the mutex) between appending the dead
    letters' record and removing them from the core leaves them to the
    next collection. That collection adds the same letters again, the
    queue contains each once, and the topic stays on its core."""
    broker = open_broker(name)
    broker.declare_topic("t")
    broker.consume("t", "g").close()
    broker.publish("t", "x")
    child = start(reject_then_die, name)
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert broker.backend._cores["t"].has_dead()
    (letter,) = broker.dlq_list("t")
    assert (letter.body, letter.reason) == ("x", "rejected")
    assert not broker.backend._cores["t"].has_dead()
    stats = broker.stats("t")
    assert stats["dlq"] == 1
    assert stats["dead_lettered"] == 1
    assert stats["stored"] == 0
    assert "t" in broker.backend._core_paths
    broker.close()


def test_shm_core_dead_letters_split_into_small_records(name):
    """Dead letters taken from a core at once fit the smallest journal:
    they go into several records."""
    broker = open_broker(name, journal_bytes=4096)
    broker.declare_topic("t", max_attempts=1)
    consumer = broker.consume("t", "g", prefetch=10, ack_timeout=0.2)
    bodies = [str(number) * 300 for number in range(8)]
    broker.publish_many("t", bodies)
    assert len(consumer.get_many(8, timeout=5)) == 8
    time.sleep(0.4)
    with pytest.raises(mqs.Empty):
        consumer.get(timeout=0.2)
    letters = broker.dlq_list("t")
    assert sorted(letter.body for letter in letters) == sorted(bodies)
    assert {letter.reason for letter in letters} == {"ack_timeout"}
    assert "t" in broker.backend._core_paths
    consumer.close()
    broker.close()


def publish_until_full(name, results):
    broker = open_broker(name)
    accepted = 0
    for number in range(500):
        try:
            broker.publish("b", number)
        except mqs.Full:
            continue
        accepted += 1
    results.put(accepted)
    broker.close()


def test_shm_core_maxsize_bound_holds_across_processes(name):
    """A topic with maxsize stays on its core, and three processes that
    publish into it at once store exactly maxsize messages."""
    broker = open_broker(name)
    broker.declare_topic("b", maxsize=300, when_full="raise")
    assert "b" in broker.backend._core_paths
    results = FORK.Queue()
    children = [start(publish_until_full, name, results) for _ in range(3)]
    for child in children:
        join(child)
    accepted = [results.get(timeout=10) for _ in children]
    assert sum(accepted) == 300
    stats = broker.stats("b")
    assert stats["stored"] == 300
    assert stats["published"] == 300
    assert "b" in broker.backend._core_paths
    broker.close()


def consume_one_later(name, delay_s):
    broker = open_broker(name)
    consumer = broker.consume("b", "g", start="earliest")
    time.sleep(delay_s)
    assert consumer.get(timeout=10).ack()
    consumer.close()
    broker.close()


def test_shm_core_blocked_publish_wakes_on_ack(name):
    """A publish blocked on a full core topic returns once a consumer
    in another process acks, and times out with Full otherwise."""
    broker = open_broker(name)
    broker.declare_topic("b", maxsize=2)
    broker.publish_many("b", [1, 2])
    with pytest.raises(mqs.Full) as caught:
        broker.publish("b", 3, timeout=0.2)
    assert caught.value.accepted == 0
    child = start(consume_one_later, name, 0.3)
    started = time.monotonic()
    broker.publish("b", 3, timeout=30)
    assert time.monotonic() - started < 20
    join(child)
    stats = broker.stats("b")
    assert (stats["stored"], stats["acked"]) == (2, 1)
    assert "b" in broker.backend._core_paths
    broker.close()


@pytest.mark.parametrize("when_full", ["block", "raise"])
def test_shm_core_maxsize_room_from_dead_letter(name, when_full):
    """A message dead-lettered at its ack deadline frees its place on a
    full core topic, as on the journal: a blocked publish returns and a
    raising one is accepted once the deadline passed."""
    broker = open_broker(name)
    broker.declare_topic("t", maxsize=2, when_full=when_full,
                         max_attempts=1)
    consumer = broker.consume("t", "g", ack_timeout=0.5)
    broker.publish_many("t", [1, 2])
    assert consumer.get(timeout=5).body == 1
    if when_full == "raise":
        time.sleep(1.0)
    started = time.monotonic()
    broker.publish("t", 3, timeout=20)
    assert time.monotonic() - started < 10
    stats = broker.stats("t")
    assert (stats["dead_lettered"], stats["dlq"], stats["stored"]) == \
        (1, 1, 2)
    assert "t" in broker.backend._core_paths
    consumer.close()
    broker.close()


def test_shm_core_retired_without_adopt_moves_again(name):
    broker = open_broker(name)
    broker.declare_topic("t")
    consumer = broker.consume("t", "g", prefetch=10)
    broker.publish_many("t", ["a", "b"])
    # As if a mover died after retiring the core and before its record.
    broker.backend._cores["t"].retire_and_export()
    broker.publish("t", "c")
    assert "t" not in broker.backend._core_paths
    assert [message.body for message in drain(consumer, 3)] == [
        "a", "b", "c"]
    consumer.close()
    broker.close()


def test_shm_stale_core_tag_of_deleted_topic(name):
    broker = open_broker(name)
    broker.declare_topic("t")
    consumer = broker.consume("t", "g", ack_timeout=600)
    broker.publish("t", "old")
    old = consumer.get(timeout=5)
    consumer.close(drain=False)
    broker.delete_topic("t")
    assert core_files(name) == []
    broker.declare_topic("t")
    fresh = broker.consume("t", "g", ack_timeout=600)
    broker.publish("t", "new")
    new = fresh.get(timeout=5)
    # The old tag names the deleted core: it settles nothing.
    assert not old.ack()
    assert new.ack()
    assert broker.stats("t")["acked"] == 1
    fresh.close()
    broker.close()


def test_shm_core_body_over_slot_moves_topic(name):
    broker = open_broker(name)
    broker.declare_topic("t")
    consumer = broker.consume("t", "g", prefetch=10)
    broker.publish("t", "small")
    # Its pickle is larger than a core slot: the journal stores it.
    big = bytes(CORE_SLOT_BYTES)
    broker.publish("t", big)
    assert "t" not in broker.backend._core_paths
    assert [message.body for message in drain(consumer, 2)] == [
        "small", big]
    consumer.close()
    broker.close()


def test_shm_full_core_moves_topic(name, monkeypatch):
    monkeypatch.setattr(shm_module, "CORE_CAPACITY", 4)
    broker = open_broker(name)
    broker.declare_topic("t")
    consumer = broker.consume("t", "g", prefetch=10)
    for number in range(4):
        broker.publish("t", number)
    assert "t" in broker.backend._core_paths
    # The fifth finds every slot taken and queues behind the four.
    broker.publish("t", 4)
    assert "t" not in broker.backend._core_paths
    assert [message.body for message in drain(consumer, 5)] == [
        0, 1, 2, 3, 4]
    assert broker.stats("t")["published"] == 5
    consumer.close()
    broker.close()


@pytest.mark.parametrize("publish_first", [True, False])
def test_shm_group_past_core_limit_moves_topic(name, publish_first):
    """The group after the core's CORE_GROUPS ones moves the topic to the
    journal, with every stored message and each group's progress."""
    broker = open_broker(name)
    other = open_broker(name)
    broker.declare_topic("t")
    if publish_first:
        broker.publish_many("t", ["a", "b", "c"])
    consumers = [broker.consume("t", f"g{number}", prefetch=1,
                                ack_timeout=600)
                 for number in range(shm_module.CORE_GROUPS)]
    if not publish_first:
        broker.publish_many("t", ["a", "b", "c"])
    assert "t" in broker.backend._core_paths
    held = consumers[0].get(timeout=5)
    assert held.body == "a"
    assert [message.body for message in drain(consumers[1], 2)] == [
        "a", "b"]

    # Another process's replica opens the extra group.
    extra = other.consume("t", "extra", prefetch=10)
    assert "t" not in other.backend._core_paths
    assert core_files(name) == []
    assert [message.body for message in drain(extra, 3)] == ["a", "b", "c"]
    # The core's in-flight delivery settles on the journal.
    assert held.ack()
    assert [message.body for message in drain(consumers[0], 2)] == [
        "b", "c"]
    assert [message.body for message in drain(consumers[1], 1)] == ["c"]
    for consumer in consumers[2:]:
        assert [message.body for message in drain(consumer, 3)] == [
            "a", "b", "c"]
    assert broker.backend._core_paths.get("t") is None
    stats = broker.stats("t")
    assert stats["published"] == 3
    assert stats["acked"] == 3 * (shm_module.CORE_GROUPS + 1)
    assert stats["stored"] == 0
    assert other.stats("t") == stats
    for consumer in consumers + [extra]:
        consumer.close()
    other.close()
    broker.close()


def test_shm_consumer_past_core_limit_moves_topic(name, monkeypatch):
    """The consumer after the core's CORE_CONSUMERS open ones moves the
    topic to the journal, and the open consumers keep working."""
    monkeypatch.setattr(shm_module, "CORE_CONSUMERS", 2)
    broker = open_broker(name)
    broker.declare_topic("t")
    broker.publish_many("t", [0, 1, 2, 3])
    first = broker.consume("t", "g", prefetch=1, ack_timeout=600)
    second = broker.consume("t", "g", prefetch=1, ack_timeout=600)
    held = first.get(timeout=5)
    assert held.body == 0
    assert "t" in broker.backend._core_paths
    third = broker.consume("t", "g", prefetch=1, ack_timeout=600)
    assert "t" not in broker.backend._core_paths
    assert held.ack()
    bodies = []
    for consumer in (second, third, first):
        bodies += [message.body for message in drain(consumer, 1)]
    assert sorted(bodies) == [1, 2, 3]
    stats = broker.stats("t")
    assert stats["acked"] == 4
    assert stats["stored"] == 0
    for consumer in (first, second, third):
        consumer.close()
    broker.close()


def test_shm_long_group_name_moves_topic(name):
    """A group name longer than a core stores moves the topic to the
    journal, as the other backends take it."""
    broker = open_broker(name)
    broker.declare_topic("t")
    broker.publish("t", "a")
    short = broker.consume("t", "g", prefetch=1, ack_timeout=600)
    held = short.get(timeout=5)
    long_name = "g" * (shm_module.GROUP_NAME_BYTES + 1)
    long = broker.consume("t", long_name)
    assert "t" not in broker.backend._core_paths
    assert [message.body for message in drain(long, 1)] == ["a"]
    assert held.ack()
    assert {stats.group for stats in broker.group_stats("t")} == {
        "g", long_name}
    short.close()
    long.close()
    broker.close()


def test_shm_core_capacity_fits_free_space():
    per_message = shm_module.CORE_BYTES_PER_MESSAGE
    assert shm_module._core_capacity(1 << 50) == shm_module.CORE_CAPACITY
    assert shm_module._core_capacity(2 * per_message << 20) == 1 << 20
    assert shm_module._core_capacity((2 * per_message << 20) - 1) \
        == 1 << 19
    assert shm_module._core_capacity(64 << 20) \
        == shm_module.CORE_MIN_CAPACITY
    assert shm_module._core_capacity(0) == shm_module.CORE_MIN_CAPACITY


def test_shm_small_dev_shm_gets_small_core(name, monkeypatch):
    monkeypatch.setattr(shm_module, "_shm_free_bytes", lambda: 64 << 20)
    broker = open_broker(name)
    broker.declare_topic("small")
    assert broker.backend._cores["small"].capacity \
        == shm_module.CORE_MIN_CAPACITY
    monkeypatch.setattr(shm_module, "_shm_free_bytes", lambda: 1 << 50)
    broker.declare_topic("large")
    assert broker.backend._cores["large"].capacity \
        == shm_module.CORE_CAPACITY
    broker.close()


def test_shm_rejected_redeclare_keeps_core(name):
    broker = open_broker(name)
    other = open_broker(name)
    broker.declare_topic("t")
    broker.publish_many("t", ["a", "b"])
    assert "t" in broker.backend._core_paths
    # Changed settings without replace=True are rejected, and so is a
    # changed policy with it. Neither rejection may move the topic.
    with pytest.raises(mqs.TopicConfigError, match="max_attempts"):
        other.declare_topic("t", max_attempts=7)
    with pytest.raises(mqs.TopicConfigError, match="policy"):
        other.declare_topic("t", policy="strict", replace=True)
    assert "t" in broker.backend._core_paths
    assert "t" in other.backend._core_paths
    assert len(core_files(name)) == 1
    consumer = other.consume("t", "g", prefetch=10)
    assert [message.body for message in drain(consumer, 2)] == ["a", "b"]
    assert broker.stats("t")["published"] == 2
    assert broker.stats("t")["acked"] == 2
    assert "t" in broker.backend._core_paths
    consumer.close()
    broker.close()
    other.close()


@pytest.mark.parametrize("options", [
    {}, {"headers": {"h": 1}}, {"headers": {"bad": threading.Lock()}}])
@pytest.mark.parametrize("journal", [False, True])
def test_shm_publish_many_with_unpicklable_body_publishes_nothing(
        name, options, journal):
    broker = open_broker(name)
    # maxsize keeps a topic on the journal instead of the topic core.
    broker.declare_topic("t", **({"maxsize": 100} if journal else {}))
    bodies = ["a", "b", threading.Lock(), "d"]
    if "bad" in options.get("headers", {}):
        bodies[2] = "c"
    with pytest.raises((TypeError, pickle.PicklingError)):
        broker.publish_many("t", bodies, **options)
    assert broker.stats("t")["published"] == 0
    consumer = broker.consume("t", "g")
    with pytest.raises(queue.Empty):
        consumer.get(timeout=0)
    # The same batch without the bad part goes through whole, once.
    broker.publish_many("t", ["a", "b", "c", "d"])
    assert [m.body for m in drain(consumer, 4)] == ["a", "b", "c", "d"]
    consumer.close()
    broker.close()


def test_shm_core_message_has_wall_clock_timestamp(name):
    broker = open_broker(name)
    consumer = broker.consume("t", "g")
    before = time.time()
    broker.publish("t", "x")
    after = time.time()
    message = consumer.get(timeout=5)
    assert before <= message.timestamp <= after
    assert message.topic == "t"
    assert message.group == "g"
    assert message.attempts == 1
    assert message.key is None
    assert message.headers == {}
    message.ack()
    consumer.close()
    broker.close()


@pytest.mark.parametrize("timeout, error", [
    (-1, ValueError), (float("nan"), ValueError), (True, TypeError),
    ("1", TypeError)])
def test_shm_get_checks_timeout_with_message_ready(name, timeout, error):
    broker = open_broker(name)
    consumer = broker.consume("t", "g")
    broker.publish("t", "x")
    with pytest.raises(error, match="timeout"):
        consumer.get(timeout)
    # The failed call took nothing.
    message = consumer.get(timeout=0)
    assert message.body == "x"
    assert message.attempts == 1
    message.ack()
    consumer.close()
    broker.close()


def test_shm_core_ids_and_tags_match_publish(name):
    broker = open_broker(name)
    consumer = broker.consume("t", "g", prefetch=20, ack_timeout=600)
    ids = [broker.publish("t", number) for number in range(12)]
    assert ids == [f"s{seq}" for seq in range(1, 13)]
    single = [consumer.get(timeout=5) for _ in range(6)]
    batch = consumer.get_many(6, timeout=5)
    assert [message.id for message in single + batch] == ids
    assert [message.body for message in single + batch] == list(range(12))
    # The tag of a message from the fast path names the same delivery
    # as the one `get_many` builds.
    assert single[0]._delivery.tag[4] == 1
    assert batch[0]._delivery.tag[4] == 7
    assert single[0]._delivery.tag[0] == batch[0]._delivery.tag[0]
    assert isinstance(single[0], mqs.Message)
    # Every way to settle works on messages of either path. The nack
    # comes last, because a dead letter moves the topic to the journal.
    assert single[0].extend(60)
    assert consumer.ack_many(single[1:3] + batch[:2]) == 4
    assert all(message.ack() for message in single[3:] + batch[2:])
    with pytest.raises(mqs.AlreadySettled, match="already"):
        single[3].ack()
    assert "t" in broker.backend._core_paths
    assert single[0].nack(requeue=False)
    stats = broker.stats("t")
    assert stats["acked"] == 11
    assert stats["stored"] == 0
    consumer.close()
    broker.close()


class _Blob(bytes):
    """A bytes subclass, which the core stores pickled to keep its type."""


def test_shm_core_bytes_bodies_on_every_path(name):
    broker = open_broker(name)
    consumer = broker.consume("t", "g", prefetch=20, ack_timeout=600)
    bodies = [b"", b"\x00\x80raw", _Blob(b"blob"), "text", b"moved"]
    for body in bodies[:4]:
        broker.publish("t", body)
    single = consumer.get(timeout=5)
    batch = consumer.get_many(2, timeout=5)
    assert [single.body] + [message.body for message in batch] == bodies[:3]
    assert type(batch[1].body) is _Blob
    # A keyed message moves the topic with the stored bodies to the
    # journal.
    broker.publish("t", bodies[4], key="k")
    assert "t" not in broker.backend._core_paths
    rest = drain(consumer, 2)
    assert [message.body for message in rest] == bodies[3:]
    assert type(rest[1].body) is bytes
    for message in [single, *batch]:
        assert message.ack()
    assert broker.stats("t")["acked"] == 5
    consumer.close()
    broker.close()


# The consumer that `_ReentrantBody` fetches from while it is unpickled.
_reentrant = {}


def _unpickle_reentrant(label):
    consumer = _reentrant.pop("consumer", None)
    if consumer is not None:
        _reentrant["inner"] = consumer.get(timeout=5)
    return label


class _ReentrantBody:
    """A body whose unpickling fetches the next message of a consumer."""

    def __init__(self, label):
        self.label = label

    def __reduce__(self):
        return _unpickle_reentrant, (self.label,)


def test_shm_core_get_inside_unpickle_keeps_fields(name):
    broker = open_broker(name)
    consumer = broker.consume("t", "g", prefetch=10, ack_timeout=600)
    first_id = broker.publish("t", _ReentrantBody("outer"), priority=3)
    second_id = broker.publish("t", "inner", priority=3)
    _reentrant["consumer"] = consumer
    outer = consumer.get(timeout=5)
    inner = _reentrant.pop("inner")
    # The fetch inside the unpickler reused the core's delivery buffer,
    # but the outer message still has its own id and tag.
    assert (outer.id, outer.body) == (first_id, "outer")
    assert (inner.id, inner.body) == (second_id, "inner")
    assert outer._delivery.tag[4] == 1
    assert inner._delivery.tag[4] == 2
    assert outer.ack()
    assert inner.ack()
    assert broker.stats("t")["acked"] == 2
    consumer.close()
    broker.close()


def test_shm_publish_checks_topic_and_priority(name):
    broker = open_broker(name)
    broker.declare_topic("t")
    with pytest.raises(TypeError, match="topic must be a non-empty str"):
        broker.publish(["t"], "x")
    with pytest.raises(mqs.InvalidPriority):
        broker.publish("t", "x", priority=10)
    with pytest.raises(TypeError, match="priority must be an int"):
        broker.publish("t", "x", priority=True)
    assert broker.stats("t")["published"] == 0
    broker.close()
    with pytest.raises(mqs.ShutDown, match="is closed"):
        broker.publish("t", "x")


def test_shm_core_consumer_of_killed_process_redelivered(name):
    broker = open_broker(name)
    broker.declare_topic("t")
    broker.consume("t", "g").close()
    broker.publish_many("t", list(range(3)))
    child = start(take_and_hang, name)
    deadline = time.monotonic() + 30
    while broker.stats("t")["in_flight"] < 3 \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    assert broker.stats("t")["in_flight"] == 3
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    consumer = broker.consume("t", "g", prefetch=10)
    messages = drain(consumer, 3)
    assert sorted(message.body for message in messages) == [0, 1, 2]
    assert all(message.attempts == 2 for message in messages)
    consumer.close()
    broker.close()


@pytest.mark.parametrize("ttl", [None, 600], ids=["core", "journal"])
def test_shm_consumer_redelivered_while_forked_child_lives(name, ttl):
    """A process that forked a child (a worker pool, say) and then died
    is seen as dead at once, although the child still maps the broker:
    its in-flight messages come back long before their ack deadline."""
    broker = open_broker(name)
    broker.declare_topic("t", ttl=ttl)
    broker.consume("t", "g").close()
    broker.publish_many("t", list(range(3)))
    results = FORK.Queue()
    child = start(take_fork_and_hang, name, results)
    grandchild = results.get(timeout=30)
    try:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        consumer = broker.consume("t", "g", prefetch=10)
        messages = drain(consumer, 3, timeout=10)
        assert sorted(message.body for message in messages) == [0, 1, 2]
        assert all(message.attempts == 2 for message in messages)
        consumer.close()
    finally:
        os.kill(grandchild, signal.SIGKILL)
    broker.close()


def take_fork_and_hang(name, results):
    broker = open_broker(name)
    consumer = broker.consume("t", "g", prefetch=10, ack_timeout=600)
    assert len(consumer.get_many(3, timeout=10)) == 3
    grandchild = os.fork()
    if grandchild == 0:
        time.sleep(600)
        os._exit(0)
    results.put(grandchild)
    time.sleep(600)


def take_and_hang(name):
    broker = open_broker(name)
    consumer = broker.consume("t", "g", prefetch=10, ack_timeout=600)
    consumer.get_many(3, timeout=10)
    time.sleep(600)


OPERATIONS = st.lists(
    st.tuples(st.integers(0, 1),
              st.sampled_from(["publish", "fetch", "ack", "nack", "stats",
                               "extend", "redrive", "ack_many"]),
              st.integers(0, 9)),
    min_size=1, max_size=60)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=OPERATIONS)
def test_shm_replicas_agree_after_any_operations(name, operations):
    """Two replicas of one broker, used in turn, show the same state after
    every operation, across journal wraps."""
    ShmBackend.unlink(name)
    brokers = [open_broker(name, journal_bytes=4096), open_broker(name)]
    brokers[0].declare_topic("t", weights={9: 2, 0: 1}, max_attempts=2,
                             dedup_window=60)
    consumers = [broker.consume("t", "g", prefetch=3, ack_timeout=60)
                 for broker in brokers]
    held = [[], []]
    for side, op, value in operations:
        broker, consumer = brokers[side], consumers[side]
        if op == "publish":
            broker.publish("t", value, priority=value, key=value % 3 or None,
                           dedup_id=value if value > 6 else None)
        elif op == "fetch":
            try:
                held[side] += consumer.get_many(2, timeout=0)
            except mqs.Empty:
                pass
        elif op in ("ack", "nack", "extend") and held[side]:
            message = held[side].pop(value % len(held[side]))
            if op == "ack":
                message.ack()
            elif op == "nack":
                message.nack(requeue=value % 2 == 0, delay=0)
            else:
                message.extend(30)
                held[side].append(message)
        elif op == "ack_many" and held[side]:
            assert consumer.ack_many(held[side]) == len(held[side])
            held[side] = []
        elif op == "redrive":
            broker.dlq_redrive("t")
        assert brokers[0].stats("t") == brokers[1].stats("t")
        assert consumers[0].in_flight == len(held[0])
        assert consumers[1].in_flight == len(held[1])
    letters = [[(letter.id, letter.reason) for letter in b.dlq_list("t")]
               for b in brokers]
    assert letters[0] == letters[1]
    for consumer in consumers:
        consumer.close(drain=False)
    for broker in brokers:
        broker.close()
    ShmBackend.unlink(name)


def _declare_topics(name):
    with open_broker(name) as broker:
        broker.declare_topic("orders")
        broker.publish("billing", 1)


def test_shm_topics_declared_by_other_process(name):
    with open_broker(name) as broker:
        broker.declare_topic("audit")
        join(start(_declare_topics, name))
        assert broker.topics() == ["audit", "billing", "orders"]


# Layout versions.

def test_shm_core_of_other_version_raises(name):
    first = open_broker(name)
    first.publish("t", b"x")
    core_path = first.backend._core_paths["t"]
    first.close()
    ours = patch_version(core_path, -1)

    again = open_broker(name)
    try:
        with pytest.raises(mqs.LayoutVersionError, match=(
                rf"its topic core {core_path} has layout version "
                rf"{ours - 1}, and this mqs reads version {ours}: processes "
                rf"of two mqs versions share the broker. .* remove the "
                rf"broker with mqs\.Broker\.unlink\('{name}'\)")) as raised:
            again.consume("t", "g").get(timeout=1)
        assert raised.value.path == core_path
        assert (raised.value.version, raised.value.expected_version) == (
            ours - 1, ours)
    finally:
        again.close()


def test_shm_journal_of_other_version_raises(name):
    first = open_broker(name)
    journal_path = first.backend.path
    first.close()
    ours = patch_version(journal_path, 1)
    with pytest.raises(mqs.LayoutVersionError, match=(
            rf"{journal_path} has shm broker layout version {ours + 1}, and "
            rf"this mqs reads version {ours}: processes of two mqs versions "
            rf"share this broker")) as raised:
        open_broker(name)
    assert isinstance(raised.value, mqs._journal.JournalLayoutError)
    assert raised.value.version == ours + 1
