"""One log broker shared by several processes: hand-over of records to
the writer, a rate limit shared by all, and SIGKILL of the writer.

Each test runs real child processes on one log directory. A "reboot"
is simulated by removing the broker's /dev/shm journal while no process
has it open, so that the log alone restores the broker.
"""

import fcntl
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import mqs
from mqs import bench_lanes
from mqs.broker._log import lock_holder
from mqs.broker._log_shared import (
    journal_files, journal_name, unlink_journal)


@pytest.fixture
def path(tmp_path):
    directory = tmp_path / "broker"
    yield directory
    unlink_journal(directory)


def open_broker(path, **options):
    return mqs.Broker(backend="log", path=path, segment_bytes=1 << 20,
                      **options)


class Child:
    """A child Python running `code`; a thread collects the JSON lines it
    prints."""

    def __init__(self, code, *args):
        script = "import json, os, sys, time\nimport mqs\n" + \
            textwrap.dedent(code)
        self.process = subprocess.Popen(
            [sys.executable, "-c", script, *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.reports = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.reports.append(json.loads(line))

    def wait_report(self, timeout=60, number=1):
        """Return the child's report `number` (from 1) once it came."""
        deadline = time.monotonic() + timeout
        while len(self.reports) < number:
            assert self.process.poll() is None, self.process.stderr.read()
            assert time.monotonic() < deadline, \
                f"child sent {len(self.reports)} of {number} reports"
            time.sleep(0.01)
        return self.reports[number - 1]

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self.reader.join(30)
        self.process.stdout.close()
        self.process.stderr.close()


WORKER = """
path = sys.argv[1]
name = sys.argv[2]
sync_acks = sys.argv[3:] == ["sync_acks"]
broker = mqs.Broker(backend="log", path=path, fsync="always",
                    segment_bytes=1 << 20, sync_acks=sync_acks)
consumer = broker.consume("t", "g", prefetch=1, ack_timeout=600)
print(json.dumps({"pid": os.getpid()}), flush=True)
number = 0
while True:
    body = f"{name}-{number}"
    number += 1
    broker.publish("t", body)
    print(json.dumps({"published": body}), flush=True)
    try:
        message = consumer.get(timeout=0.1)
    except mqs.Empty:
        continue
    print(json.dumps({"got": message.body}), flush=True)
    assert message.ack()
    print(json.dumps({"acked": message.body}), flush=True)
"""


def take_all(consumer):
    """Return the set of bodies of the messages that are ready or become
    ready within 2 s of the last one, empty if none.

    Messages in flight to a killed process become ready only once a
    process reaps its consumer (every 50 ms), so one `get_many` can
    return before them.
    """
    bodies = set()
    while True:
        try:
            batch = consumer.get_many(100_000, timeout=2)
        except mqs.Empty:
            return bodies
        bodies |= {message.body for message in batch}


def reported(children, key):
    return {report[key] for child in children for report in child.reports
            if key in report}


FORKING_CONSUMER = """
broker = mqs.Broker(backend="log", path=sys.argv[1], segment_bytes=1 << 20)
consumer = broker.consume("t", "g", prefetch=10, ack_timeout=600)
assert len(consumer.get_many(3, timeout=10)) == 3
grandchild = os.fork()
if grandchild == 0:
    # Off the pipes, so that they close when the child dies.
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    time.sleep(600)
    os._exit(0)
print(json.dumps({"grandchild": grandchild}), flush=True)
time.sleep(600)
"""


def test_log_consumer_redelivered_while_forked_child_lives(path):
    """A process that forked a child and then died is seen as dead at
    once, although the child still maps the broker's journal: its
    in-flight messages come back long before their ack deadline."""
    broker = open_broker(path)
    broker.declare_topic("t")
    broker.consume("t", "g").close()
    broker.publish_many("t", [0, 1, 2])
    child = Child(FORKING_CONSUMER, path)
    grandchild = child.wait_report()["grandchild"]
    try:
        child.kill()
        consumer = broker.consume("t", "g", prefetch=10)
        messages = []
        deadline = time.monotonic() + 10
        while len(messages) < 3 and time.monotonic() < deadline:
            try:
                messages += consumer.get_many(10, timeout=0.2)
            except mqs.Empty:
                pass
        assert sorted(message.body for message in messages) == [0, 1, 2]
        assert all(message.attempts == 2 for message in messages)
        consumer.ack_many(messages)
        consumer.close()
    finally:
        os.kill(grandchild, signal.SIGKILL)
    broker.close()


def test_log_processes_share_topics_groups_and_acks(path):
    broker = open_broker(path, fsync="always")
    broker.declare_topic("t")
    broker.consume("t", "g").close()
    children = [Child(WORKER, path, f"w{index}") for index in range(3)]
    try:
        for child in children:
            child.wait_report()
        deadline = time.monotonic() + 60
        # A process that started late may have no message acked among
        # the first 60, so wait for one of each as well.
        while len(reported(children, "acked")) < 60 or len(
                {body.split("-")[0]
                 for body in reported(children, "acked")}) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        for child in children:
            child.kill()
    published = reported(children, "published")
    acked = reported(children, "acked")
    # Each process acked messages the others published: one group.
    assert {body.split("-")[0] for body in acked} == {"w0", "w1", "w2"}
    stats = broker.stats("t")
    assert stats["published"] >= len(published)
    assert stats["acked"] >= len(acked)
    consumer = broker.consume("t", "g", prefetch=100_000, ack_timeout=600)
    rest = take_all(consumer)
    assert not rest & acked
    assert published <= rest | reported(children, "got")
    consumer.close(drain=False)
    broker.close()


ALWAYS_CHILD = """
broker = mqs.Broker(backend="log", path=sys.argv[1], fsync="always",
                    segment_bytes=1 << 20)
consumer = broker.consume("t", "g", ack_timeout=600)
broker.publish("t", "from-always")
print(json.dumps({"published": 1}), flush=True)
# The parent checks the sync of the publish before the get appends more.
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
assert consumer.get(timeout=30).ack()
print(json.dumps({"acked": 1}), flush=True)
time.sleep(600)
"""


def test_log_never_writer_syncs_always(path, tmp_path):
    """fsync is an option of each open. A process that opened with
    "always" gets its publishes synced before they return, and its acks
    within about `fsync_interval_s`, also while the writer is a process
    that opened with "never" (whose own calls never sync)."""
    broker = open_broker(path, fsync="never")
    broker.declare_topic("t")
    log = broker._backend._log
    go_on = tmp_path / "go-on"
    child = Child(ALWAYS_CHILD, path, go_on)
    try:
        assert child.wait_report() == {"published": 1}
        # The writer appended the child's publish before the publish
        # returned, and synced it.
        assert log.synced_offset == log.end_offset
        go_on.touch()
        child.wait_report(30, number=2)  # acked
        _wait_synced(log)
    finally:
        child.kill()
    broker.close()


def _wait_synced(log, seconds=5.0):
    """Wait until `log` is synced up to its end now: the writer's own
    syncs and its log thread's, with room for a loaded machine."""
    end = log.end_offset
    deadline = time.monotonic() + seconds
    while log.synced_offset < end:
        assert time.monotonic() < deadline, (log.synced_offset, end)
        time.sleep(0.01)


INTERVAL_CHILD = """
broker = mqs.Broker(backend="log", path=sys.argv[1], fsync="interval",
                    segment_bytes=1 << 20)
broker.publish("t", "from-interval")
# The second publish comes within fsync_interval_s of the writer's sync
# of the first, so its sync must come after the interval has passed.
time.sleep(0.01)
broker.publish("t", "from-interval")
print(json.dumps({"published": 2}), flush=True)
time.sleep(600)
"""


def test_log_never_writer_syncs_interval(path):
    """A process that opened with "interval" gets its records synced
    within about `fsync_interval_s` also while the writer opened with
    "never"."""
    broker = open_broker(path, fsync="never")
    broker.declare_topic("t")
    log = broker._backend._log
    before = log.end_offset
    child = Child(INTERVAL_CHILD, path)
    try:
        assert child.wait_report() == {"published": 2}
        # The writer's log thread appends the child's publishes.
        deadline = time.monotonic() + 5
        while log.end_offset < before + 2:
            assert time.monotonic() < deadline, "publishes never appended"
            time.sleep(0.01)
        # 50 ms and the log thread's wake-up interval.
        _wait_synced(log)
    finally:
        child.kill()
    broker.close()


# "reboot" removes the journal after the kills, so the log alone must
# contain every ack that returned, which needs sync_acks=True. "kill"
# keeps the journal, which contains every ack that returned in any mode.
@pytest.mark.parametrize("round_seed, end", [(1, "reboot"), (2, "kill")])
def test_log_sigkill_of_writer_loses_nothing_returned(path, scale,
                                                      round_seed, end):
    rng = random.Random(round_seed)
    broker = open_broker(path, fsync="always")
    broker.declare_topic("t")
    broker.consume("t", "g").close()
    broker.close()
    extra = ["sync_acks"] if end == "reboot" else []
    children = [Child(WORKER, path, f"w{index}", *extra)
                for index in range(3)]
    killed = 0
    try:
        for child in children:
            child.wait_report()
        for round_number in range(max(2, int(4 * scale))):
            time.sleep(rng.uniform(0.1, 0.6))
            holder = lock_holder(path)
            victims = [child for child in children
                       if child.process.poll() is None
                       and child.reports[0]["pid"] == holder]
            if not victims:
                continue
            victims[0].kill()
            killed += 1
            fresh = Child(WORKER, path, f"r{round_number}", *extra)
            children.append(fresh)
            fresh.wait_report()
        # The others went on after each kill.
        time.sleep(0.3)
        progress = len(reported(children, "acked"))
        time.sleep(0.5)
        assert len(reported(children, "acked")) > progress
    finally:
        # Every process dies; then a reboot empties /dev/shm.
        for child in children:
            if child.process.poll() is None:
                child.kill()
    assert killed >= 1
    if end == "reboot":
        assert unlink_journal(path)

    published = reported(children, "published")
    acked = reported(children, "acked")
    got = reported(children, "got")
    assert len(acked) > 10
    broker = open_broker(path)
    consumer = broker.consume("t", "g", prefetch=100_000, ack_timeout=600)
    rest = take_all(consumer)
    # Nothing acked comes back, nothing published that returned is lost.
    assert not rest & acked
    assert published - got <= rest
    assert published <= rest | got
    consumer.close(drain=False)
    broker.close()


# The writer process of test_log_sigkill_during_publish_sync. It
# declares topic "t" on a topic core or on the journal, and blocks each
# sync of its log before the I/O while the file argv[3] exists. It
# prints the count of messages published to "t" whenever that changes.
HOLDING_WRITER = """
path, placement, hold = sys.argv[1:4]
broker = mqs.Broker(backend="log", path=path, fsync="always",
                    segment_bytes=1 << 20)
if placement == "core":
    broker.declare_topic("t")
else:
    # A ttl keeps the topic on the journal.
    broker.declare_topic("t", ttl=3600)
broker.consume("t", "g").close()


def hold_syncs(end, phase):
    deadline = time.monotonic() + 60
    while (phase == 0 and os.path.exists(hold)
           and time.monotonic() < deadline):
        time.sleep(0.005)
    return 0


broker._backend._log._set_sync_hook(hold_syncs)
print(json.dumps({"writer": broker._backend._writer,
                  "on_core": "t" in broker._backend._core_paths}),
      flush=True)
published = 0
while True:
    count = broker.stats("t")["published"]
    if count != published:
        published = count
        print(json.dumps({"published": count}), flush=True)
    time.sleep(0.01)
"""

ALWAYS_PUBLISHER = """
broker = mqs.Broker(backend="log", path=sys.argv[1], fsync="always",
                    segment_bytes=1 << 20)
print(json.dumps({"writer": broker._backend._writer}), flush=True)
for body in sys.argv[2:]:
    broker.publish("t", body)
    print(json.dumps({"published": body}), flush=True)
time.sleep(600)
"""


def _take_acked(consumer, count, timeout=30):
    """Get and ack the next `count` messages of `consumer` (fewer if they
    do not come within `timeout` seconds), check that no more come within
    0.5 s, and return them sorted by body."""
    messages = []
    deadline = time.monotonic() + timeout
    while len(messages) < count and time.monotonic() < deadline:
        try:
            messages += consumer.get_many(count - len(messages),
                                          timeout=0.5)
        except mqs.Empty:
            pass
    with pytest.raises(mqs.Empty):
        consumer.get_many(10, timeout=0.5)
    consumer.ack_many(messages)
    return sorted(messages, key=lambda message: message.body)


# "live" consumes while the writer runs. "reboot" kills every process
# and removes the journal, so the log alone must contain the message.
@pytest.mark.parametrize("end", ["live", "reboot"])
@pytest.mark.parametrize("placement", ["core", "journal"])
def test_log_sigkill_during_publish_sync(path, tmp_path, placement, end):
    """A producer that is not the writer, killed while its publish waits
    for the writer's sync, leaves its message published: it is delivered
    once, and the writer and the other producers go on."""
    hold = tmp_path / "hold"
    hold.touch()
    writer = Child(HOLDING_WRITER, path, placement, hold)
    children = [writer]
    try:
        assert writer.wait_report() == {"writer": True,
                                        "on_core": placement == "core"}
        victim = Child(ALWAYS_PUBLISHER, path, "victim")
        children.append(victim)
        other = Child(ALWAYS_PUBLISHER, path, "other", "after")
        children.append(other)
        assert victim.wait_report() == {"writer": False}
        assert other.wait_report() == {"writer": False}

        # Both records are in the journal and the writer blocks its
        # syncs, so both publishes wait.
        deadline = time.monotonic() + 30
        while not any(report.get("published", 0) >= 2
                      for report in writer.reports):
            assert time.monotonic() < deadline, writer.reports
            time.sleep(0.01)
        time.sleep(0.2)
        assert victim.reports == [{"writer": False}]
        assert other.reports == [{"writer": False}]

        victim.kill()
        hold.unlink()
        assert other.wait_report(30, number=2) == {"published": "other"}
        # "after" was committed after the victim's record, so the sync
        # that its publish waited for covers that record too.
        assert other.wait_report(30, number=3) == {"published": "after"}

        if end == "live":
            broker = open_broker(path)
            consumer = broker.consume("t", "g", prefetch=10,
                                      ack_timeout=600)
            messages = _take_acked(consumer, 3)
            assert [m.body for m in messages] == ["after", "other", "victim"]
            assert [m.attempts for m in messages] == [1, 1, 1]
            consumer.close()
            broker.close()
    finally:
        # The other producer dies before the writer. Otherwise it would
        # take the writer lock and write the state into the log as a
        # snapshot.
        for child in reversed(children):
            if child.process.poll() is None:
                child.kill()

    if end == "reboot":
        assert unlink_journal(path)
    broker = open_broker(path)
    consumer = broker.consume("t", "g", prefetch=10, ack_timeout=600)
    if end == "live":
        # Acked before the restart.
        with pytest.raises(mqs.Empty):
            consumer.get_many(10, timeout=0.5)
    else:
        messages = _take_acked(consumer, 3)
        assert [m.body for m in messages] == ["after", "other", "victim"]
        assert [m.attempts for m in messages] == [1, 1, 1]
    consumer.close()

    stats = broker.stats("t")
    assert stats["published"] == 3
    assert stats["acked"] == 3
    assert stats["stored"] == 0
    broker.close()
    assert journal_files(path) == []


def test_log_restart_of_every_process_keeps_state(path):
    broker = open_broker(path, fsync="interval")
    broker.declare_topic("t", max_attempts=3)
    broker.consume("t", "g").close()
    broker.close()
    children = [Child(WORKER.replace('"always"', '"interval"'), path,
                      f"w{index}") for index in range(2)]
    try:
        for child in children:
            child.wait_report()
        time.sleep(0.5)
    finally:
        for child in children:
            child.kill()
    journal = f"/dev/shm/mqs.broker.{journal_name(path)}"
    # Every process is gone, the machine is up: the journal is still there
    # and contains everything that returned, synced to the log or not.
    assert os.path.exists(journal)
    published = reported(children, "published")
    acked = reported(children, "acked")
    broker = open_broker(path)
    consumer = broker.consume("t", "g", prefetch=100_000, ack_timeout=600)
    rest = take_all(consumer)
    assert not rest & acked
    assert published <= rest | reported(children, "got")
    consumer.close(drain=False)
    broker.close()
    # The last process to close wrote a snapshot and removed the journal.
    assert not os.path.exists(journal)
    broker = open_broker(path)
    assert broker.stats("t")["acked"] >= len(acked)
    broker.close()


def test_log_rate_limit_shared_by_three_processes():
    result = bench_lanes.run_rate_limit(duration_s=1.0, per_second=300,
                                        processes=3, backend="log",
                                        warmup_s=0.5)
    assert result["processes"] == 3
    # One bucket for the three: at or below 300/s, far from the 900/s of
    # three separate buckets. The lower bound is loose because three
    # processes replaying one journal on a loaded machine may not keep up.
    assert 50 <= result["rate_per_s"] <= 320


def test_log_opens_single_process_log_format(path):
    from mqs.broker._log import LogBackend

    old = mqs.Broker(backend="memory")
    old._backend.close()
    old._backend = LogBackend(path, segment_bytes=1 << 20)
    old.declare_topic("t", max_attempts=1)
    consumer = old.consume("t", "g", prefetch=10, ack_timeout=600)
    old.publish_many("t", [{"n": 1}, ("tuple", 2), b"bytes"])
    first = consumer.get(timeout=5)
    first.nack(requeue=False, error="bad")
    consumer.close(drain=False)
    old.close()

    broker = open_broker(path)
    assert [letter.body for letter in broker.dlq_list("t")] == [{"n": 1}]
    consumer = broker.consume("t", "g", prefetch=10, ack_timeout=600)
    assert [message.body for message in consumer.get_many(10, timeout=5)] \
        == [("tuple", 2), b"bytes"]
    broker.publish("t", {"new": True})
    assert consumer.get(timeout=5).body == {"new": True}
    consumer.close(drain=False)
    broker.close()


ENVELOPE_RECORDS = """
import pickle
from mqs.broker import _shm

path = sys.argv[1]
broker = mqs.Broker(backend="log", path=path, segment_bytes=1 << 20)
broker.declare_topic("t")
broker.consume("t", "g").close()
# Publish records as mqs wrote them before plain tuples: Envelope objects.
new_encoding = _shm.encode_record
_shm.encode_record = lambda op, now, args: pickle.dumps(
    (op, now, args), protocol=pickle.HIGHEST_PROTOCOL)
broker.publish("t", {"n": 1}, headers={"h": "v"})
# A timeout takes the path through encode_record (publish_one builds
# its record by itself).
broker.publish("t", "two", priority=9, timeout=60)
_shm.encode_record = new_encoding
# Records of publish_one: the envelope as (body, priority).
broker.publish("t", "three")
broker.publish("t", "four", priority=5)
print(json.dumps({"published": 4}), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("reboot", [False, True])
def test_log_replays_envelope_object_records(path, reboot):
    child = Child(ENVELOPE_RECORDS, path)
    try:
        assert child.wait_report() == {"published": 4}
    finally:
        child.kill()
    if reboot:
        # The log's records alone restore the broker.
        assert unlink_journal(path)

    broker = open_broker(path)
    assert broker.stats("t")["published"] == 4
    consumer = broker.consume("t", "g", prefetch=10, ack_timeout=600)
    messages = {repr(message.body): message
                for message in consumer.get_many(10, timeout=5)}
    assert sorted(messages) == ["'four'", "'three'", "'two'", "{'n': 1}"]
    assert messages["{'n': 1}"].headers == {"h": "v"}
    assert messages["'two'"].priority == 9
    assert messages["'three'"].priority == 0
    assert messages["'four'"].priority == 5
    assert messages["'four'"].headers == {}
    assert messages["'four'"].key is None
    consumer.close(drain=False)
    broker.close()


def legacy_snapshot(state):
    """`TopicState.snapshot` as mqs wrote it before the column encoding:
    the state's attributes, objects included."""
    data = dict(state.__dict__)
    for name in ("wheel", "clock", "next_id"):
        del data[name]
    return data


def write_in_object_formats(monkeypatch, writer):
    """Make `writer` (SharedLogBackend or LogBackend) and the journal
    write the snapshot formats of mqs before the column encoding."""
    from mqs.broker import _log, _log_shared, _shm, _state

    monkeypatch.setattr(_state.TopicState, "snapshot", legacy_snapshot)
    monkeypatch.setattr(_shm, "FORMAT", ("mqs.broker.shm", 1))
    old = {"shared": _log_shared.OBJECT_SHARED_FORMAT,
           "single": _log.OBJECT_FORMAT}[writer]
    monkeypatch.setattr(_log.LogBackend, "_snapshot_format", old)
    monkeypatch.setattr(_log_shared.SharedLogBackend, "_snapshot_format",
                        old)


def fill_broker(broker):
    """Leave a message of each kind: dead letter, in flight, delayed,
    ready behind a key, and a dedup id."""
    broker.declare_topic("t", max_attempts=2, weights={9: 2, 0: 1})
    consumer = broker.consume("t", "g", prefetch=10, ack_timeout=600)
    broker.publish("t", "dead", priority=9)
    broker.publish("t", "held", priority=9, dedup_id="d1")
    broker.publish("t", "later", delay=600)
    broker.publish("t", "k1", key="k")
    broker.publish("t", "k2", key="k")
    dead = consumer.get(timeout=5)
    assert dead.body == "dead"
    dead.nack(requeue=False, error="bad")
    held = consumer.get(timeout=5)
    assert held.body == "held"
    return consumer


def check_filled_broker(broker, delayed_after):
    """Check what `fill_broker` left, after `delayed_after` more delayed
    messages."""
    assert [letter.body for letter in broker.dlq_list("t")] == ["dead"]
    stats = broker.stats("t")
    assert stats["published"] == 5 + delayed_after
    assert stats["delayed"] == 1 + delayed_after
    assert stats["dead_lettered.rejected"] == 1
    # The dedup id is still in its window.
    broker.publish("t", "again", dedup_id="d1")
    assert broker.stats("t")["deduplicated"] == 1
    consumer = broker.consume("t", "g", prefetch=10, ack_timeout=600)
    messages = {message.body: message
                for message in consumer.get_many(10, timeout=5)}
    # The consumer that held "held" is gone: it is ready again, with
    # its first attempt counted; "k2" waits behind "k1".
    assert sorted(messages) == ["held", "k1"]
    assert messages["held"].attempts == 2
    assert messages["k1"].attempts == 1
    assert messages["k1"].ack()
    assert consumer.get(timeout=5).body == "k2"
    consumer.close(drain=False)


@pytest.mark.parametrize("writer", ["shared", "single"])
def test_log_opens_object_snapshot_formats(path, monkeypatch, writer):
    from mqs.broker._log import LogBackend

    write_in_object_formats(monkeypatch, writer)
    if writer == "shared":
        old = open_broker(path)
    else:
        old = mqs.Broker(backend="memory")
        old._backend.close()
        old._backend = LogBackend(path, segment_bytes=1 << 20)
    consumer = fill_broker(old)
    # A compaction before the close, so the log contains a snapshot and
    # records after it.
    old._backend._compact_bytes = 0
    old.publish("t", "compacted", priority=0, delay=600)
    consumer.close(drain=False)
    old.close()
    monkeypatch.undo()

    broker = open_broker(path)
    check_filled_broker(broker, delayed_after=1)
    broker.close()


def test_log_backend_opens_object_snapshot_format(path, monkeypatch):
    from mqs.broker._log import LogBackend

    def open_single():
        broker = mqs.Broker(backend="memory")
        broker._backend.close()
        broker._backend = LogBackend(path, segment_bytes=1 << 20)
        return broker

    write_in_object_formats(monkeypatch, "single")
    old = open_single()
    consumer = fill_broker(old)
    consumer.close(drain=False)
    old.close()
    monkeypatch.undo()

    broker = open_single()
    check_filled_broker(broker, delayed_after=0)
    broker.close()


OBJECT_FORMAT_JOURNAL = """
from mqs.broker import _log_shared, _shm, _state

def legacy_snapshot(state):
    data = dict(state.__dict__)
    for name in ("wheel", "clock", "next_id"):
        del data[name]
    return data

_state.TopicState.snapshot = legacy_snapshot
_shm.FORMAT = ("mqs.broker.shm", 1)
_log_shared.SharedLogBackend._snapshot_format = (
    _log_shared.OBJECT_SHARED_FORMAT)
sys.path.insert(0, sys.argv[2])
from test_broker_log_shared import fill_broker

broker = mqs.Broker(backend="log", path=sys.argv[1], segment_bytes=1 << 20,
                    journal_bytes=16384)
consumer = fill_broker(broker)
# More records than the journal holds: it restarts from a snapshot.
for n in range(200):
    broker.publish("t", n, delay=600)
print(json.dumps({"generation": broker._backend._generation}), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("reboot", [False, True])
def test_log_opens_object_format_journal(path, reboot):
    child = Child(OBJECT_FORMAT_JOURNAL, path, os.path.dirname(__file__))
    try:
        assert child.wait_report()["generation"] > 1
    finally:
        child.kill()
    if reboot:
        assert unlink_journal(path)

    # Without a reboot the replica loads the journal's snapshot of the
    # old format; after one, the log's.
    broker = open_broker(path)
    check_filled_broker(broker, delayed_after=200)
    broker.close()


def test_log_rejects_newer_snapshot_format(path):
    from mqs.broker._log import FORMAT, LogBackend

    class NewerLogBackend(LogBackend):
        _snapshot_format = (FORMAT[0], 99)

    NewerLogBackend(path, segment_bytes=1 << 20).close()
    with pytest.raises(mqs.LogVersionError) as caught:
        open_broker(path)
    message = str(caught.value)
    assert "('mqs.broker.log', 99)" in message
    assert "upgrade mqs" in message
    # The rejected open released the writer lock.
    assert not _lock_is_held(path)


def test_log_rejected_open_leaves_no_exit_error(path):
    """A broker whose open raised is not closed again when the
    interpreter exits, which failed on its closed journal."""
    from mqs.broker._log import FORMAT, LogBackend

    class NewerLogBackend(LogBackend):
        _snapshot_format = (FORMAT[0], 99)

    NewerLogBackend(path, segment_bytes=1 << 20).close()
    code = textwrap.dedent("""
        import sys
        import mqs
        try:
            mqs.Broker(backend="log", path=sys.argv[1])
        except mqs.LogVersionError:
            print("rejected")
    """)
    result = subprocess.run([sys.executable, "-c", code, str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "rejected"
    assert "closing it at exit failed" not in result.stderr
    assert "Traceback" not in result.stderr


def _lock_is_held(path):
    import fcntl

    fd = os.open(path / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_log_section_excludes_threads(path):
    """Threads of one process hold the section one at a time, also while
    a holder sleeps in it (without the GIL) past the spins of the
    waiters, which then block until it leaves."""
    broker = open_broker(path)
    section = broker._backend._lock
    inside = []
    overlaps = []
    entered = []

    def hold(number, seconds):
        with section:
            inside.append(number)
            if len(inside) > 1:
                overlaps.append(list(inside))
            time.sleep(seconds)
            inside.remove(number)
            entered.append(number)

    first = threading.Thread(target=hold, args=(0, 0.5))
    first.start()
    while not inside:
        time.sleep(0.001)
    threads = [threading.Thread(target=hold,
                                args=(number, 0.001 * (number % 3)))
               for number in range(1, 17)]
    for thread in threads:
        thread.start()
    for thread in [first, *threads]:
        thread.join(30)
    assert overlaps == []
    assert entered[0] == 0
    assert sorted(entered) == list(range(17))
    broker.close()


class _FullDiskLog:
    """A stand-in for the broker's SegmentLog whose appends fail as on a
    full disk; everything else goes to the real log."""

    def __init__(self, log):
        self._real = log

    def append(self, data, *args, **kwargs):
        raise OSError(28, "No space left on device (simulated)")

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.mark.parametrize("fsync", ["always", "interval"])
def test_log_failed_append_raises_instead_of_waiting(path, fsync):
    broker = open_broker(path, fsync=fsync)
    try:
        broker.declare_topic("t")
        broker.publish("t", b"before")
        backend = broker._backend
        real = backend._log
        backend._log = _FullDiskLog(real)
        outcome = []

        def publish():
            try:
                broker.publish("t", b"lost")
                outcome.append("returned")
            except Exception as exc:
                outcome.append(exc)

        thread = threading.Thread(target=publish, daemon=True)
        thread.start()
        thread.join(30)
        assert not thread.is_alive(), "publish hung after a failed append"
        assert len(outcome) == 1 and isinstance(outcome[0], Exception)
        assert "No space left on device" in str(outcome[0])
        # The log now misses a record the broker state has: every later
        # operation raises at once, naming the failure.
        with pytest.raises(mqs.BackendUnavailable,
                           match="failed to append a record"):
            broker.publish("t", b"after")
        with pytest.raises(mqs.BackendUnavailable,
                           match="failed to append a record"):
            broker.consume("t", group="g").get(timeout=1)
        backend._log = real
    finally:
        try:
            broker.close()
        except Exception:
            pass
    # The journal kept the operation the log missed, and the snapshot
    # written at close put it into the log.
    broker = open_broker(path, fsync=fsync)
    try:
        assert broker.stats("t")["stored"] == 2
    finally:
        broker.close()


PUBLISH_ONCE = """
broker = mqs.Broker(backend="log", path=sys.argv[1], segment_bytes=1 << 20)
broker.publish("t", "from the child")
print(json.dumps({"published": True}), flush=True)
time.sleep(60)
"""


def test_log_writer_word_wakes_only_for_other_processes(path):
    from mqs._journal import WRITER

    broker = open_broker(path)
    broker.declare_topic("t")
    journal = broker._backend._journal
    # A registered waiter makes every signal of the word move its epoch.
    epoch = journal.wait_prepare(WRITER)
    try:
        for number in range(20):
            broker.publish("t", number)
        consumer = broker.consume("t", "g", prefetch=100)
        for message in consumer.get_many(100, timeout=5):
            message.ack()
        # Commits of the writer's own threads leave its log thread asleep.
        assert journal.wait_prepare(WRITER) == epoch
        journal.cancel_wait(WRITER)

        child = Child(PUBLISH_ONCE, path)
        try:
            assert child.wait_report() == {"published": True}
            # The child is not the writer: its commit woke the log thread.
            assert journal.wait_prepare(WRITER) != epoch
            journal.cancel_wait(WRITER)
            assert [m.body for m in consumer.get_many(100, timeout=5)] \
                == ["from the child"]
        finally:
            child.kill()
    finally:
        journal.cancel_wait(WRITER)
    consumer.close(drain=False)
    broker.close()


EXIT_WITHOUT_CLOSE = """
broker = mqs.Broker(backend="log", path=sys.argv[1], segment_bytes=1 << 20)
broker.publish("t", "kept")
"""


def test_log_exit_without_close_moves_journal_to_log(path):
    from mqs.broker._log_shared import journal_files

    child = subprocess.run(
        [sys.executable, "-c", "import sys\nimport mqs\n"
         + textwrap.dedent(EXIT_WITHOUT_CLOSE), str(path)],
        capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    # The exit hook closed the broker: the journal is in the log now.
    assert journal_files(path) == []
    broker = open_broker(path)
    consumer = broker.consume("t", "g")
    assert consumer.get(timeout=5).body == "kept"
    consumer.close()
    broker.close()


LAGGING_WRITER = """
from mqs.broker import _log_shared

snapshots = []
write_snapshot = _log_shared.SharedLogBackend._write_snapshot


def counted(self):
    snapshots.append(self._generation)
    write_snapshot(self)


_log_shared.SharedLogBackend._write_snapshot = counted
# Without its log thread the writer enters the broker's section only
# when this thread calls it, so it misses the records of the other
# process until then.
_log_shared.SharedLogBackend._start_thread = lambda self: None
broker = mqs.Broker(backend="log", path=sys.argv[1], segment_bytes=1 << 20,
                    journal_bytes=16384, fsync="interval")
# A topic on the journal from the start (a ttl keeps it off a topic
# core): a move would make the writer write a snapshot.
broker.declare_topic("t", ttl=3600)
# A state larger than the journal, so that catching up from the tail
# costs less than loading the snapshot.
broker.publish_many("t", [b"x" * 1024] * 100)
print(json.dumps({"snapshots": len(snapshots)}), flush=True)
go = sys.argv[2]
while not os.path.exists(go):
    time.sleep(0.01)
stats = broker.stats("t")
print(json.dumps({"snapshots": len(snapshots),
                  "published": stats["published"]}), flush=True)
broker.close()
"""


def test_log_lagging_writer_appends_tail(path, tmp_path):
    go = tmp_path / "go"
    child = Child(LAGGING_WRITER, path, go)
    try:
        # The restore wrote the first snapshot into the log.
        assert child.wait_report()["snapshots"] == 1
        broker = open_broker(path, fsync="interval")
        backend = broker._backend
        assert not backend._writer

        # The writer sleeps outside the section, so it cannot append the
        # records of this process to its log before the journal restarts.
        ended, _ = backend._journal.position()
        bodies = []
        while backend._journal.position()[0] == ended:
            bodies.append(len(bodies))
            broker.publish("t", bodies[-1])
        assert os.path.exists(f"{backend._journal_file}.tail-{ended}")

        go.touch()
        report = child.wait_report(60, number=2)
        assert report["published"] == len(bodies) + 100
        # The writer appended the records it missed from the tail, and
        # wrote no snapshot of the whole state into its log.
        assert report["snapshots"] == 1
        assert child.process.wait(60) == 0
        broker.close()
    finally:
        # Also closes the pipes of a child that exited.
        child.kill()

    # A reboot: the log alone contains every message.
    unlink_journal(path)
    broker = open_broker(path)
    consumer = broker.consume("t", "g", start="earliest",
                              prefetch=len(bodies) + 101)
    found = take_all(consumer)
    assert sorted(body for body in found if isinstance(body, int)) == bodies
    assert b"x" * 1024 in found
    assert broker.stats("t")["stored"] == len(bodies) + 100
    consumer.close(drain=False)
    broker.close()


def current_log(path):
    return path / (path / "CURRENT").read_text().strip()


def lock_is_free(path):
    """Return whether no open file description holds the broker's lock."""
    fd = os.open(path / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_log_close_logs_failed_recovery_point(path, caplog):
    broker = open_broker(path)
    broker.publish("t", "kept")
    broker.close()
    # Reopened and closed without an operation, the broker closes the
    # log it opened, without writing a snapshot into a new one.
    broker = open_broker(path)
    blocked = current_log(path) / "recovery-point.tmp"
    blocked.mkdir()     # the recovery point write fails with EISDIR
    with caplog.at_level(logging.WARNING, logger="mqs.broker._log"):
        broker.close()
    assert current_log(path) == blocked.parent
    assert "failed to write the recovery point" in caplog.text
    assert str(path) in caplog.text
    # The directory lock and the journal were released all the same.
    assert lock_is_free(path)
    assert journal_files(path) == []

    blocked.rmdir()
    broker = open_broker(path)
    consumer = broker.consume("t", "g")
    assert consumer.get(timeout=5).body == "kept"
    consumer.close()
    broker.close()


def test_log_backend_close_logs_failed_recovery_point(path, caplog):
    from mqs.broker._log import LogBackend

    backend = LogBackend(path, segment_bytes=1 << 20)
    backend.close()
    backend = LogBackend(path, segment_bytes=1 << 20)
    blocked = current_log(path) / "recovery-point.tmp"
    blocked.mkdir()
    with caplog.at_level(logging.WARNING, logger="mqs.broker._log"):
        backend.close()
    assert "failed to write the recovery point" in caplog.text
    assert lock_is_free(path)
    blocked.rmdir()
    LogBackend(path, segment_bytes=1 << 20).close()


def test_processes_share_first_segment_bytes(path):
    """A process that opens a broker with another segment_bytes than the
    processes that have it open takes theirs: a record that fits its own
    segments but not the writer's is rejected where it is published, and
    the writer keeps working. Once every process closed the broker, a new
    open sets the size again."""
    writer = mqs.Broker(backend="log", path=path, segment_bytes=8192)
    try:
        writer.declare_topic("t")
        consumer = writer.consume("t", "g")
        child = Child("""
            broker = mqs.Broker(backend="log", path=sys.argv[1])
            try:
                broker.publish("t", b"z" * 6000)
            except mqs.MessageTooLarge as exc:
                print(json.dumps({"error": str(exc)}), flush=True)
            broker.publish("t", b"small")
            print(json.dumps({"published": True}), flush=True)
            broker.close()
        """, path)
        child.wait_report(number=2)
        assert child.process.wait(30) == 0
        child.kill()
        error, published = child.reports
        assert "segment_bytes=8192" in error["error"]
        assert published == {"published": True}
        writer.publish("t", b"writer")
        for body in (b"small", b"writer"):
            message = consumer.get(timeout=5)
            assert message.body == body
            assert message.ack()
    finally:
        writer.close()
    reopened = mqs.Broker(backend="log", path=path)
    try:
        reopened.publish("t", b"y" * 6000)
        assert reopened.stats("t")["stored"] == 1
        assert reopened.consume("t", "g").get(timeout=5).body == b"y" * 6000
    finally:
        reopened.close()
