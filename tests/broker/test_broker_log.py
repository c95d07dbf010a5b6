"""Durability of the log backend: restarts, SIGKILLed processes, torn
records, compaction and bad input.

The contract suite (test_broker_contract.py) runs against the log backend
too; these tests cover what only a durable backend has. Each crash test
runs the broker in a real child process and kills it with SIGKILL.
"""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import mqs
from mqs.broker._log import LogBackend
from mqs.broker._log_shared import journal_files, unlink_journal

SEGMENT = 1 << 20


@pytest.fixture(autouse=True)
def remove_journal(tmp_path):
    """Remove the shm journals that brokers of killed children left
    behind, for every directory of the test."""
    yield
    for directory in [tmp_path, *tmp_path.rglob("*")]:
        if directory.is_dir():
            unlink_journal(directory)


def open_broker(path, **options):
    return mqs.Broker(backend="log", path=path, segment_bytes=SEGMENT,
                      **options)


def start_child(code, *args):
    """Run `code` in a child Python with `args` in sys.argv[1:]; the child
    reports by printing one JSON object per line."""
    script = "import json, sys, time\nimport mqs\n" + textwrap.dedent(code)
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_report(child, timeout=60):
    """Return the next JSON line of the child, failing on its exit."""
    deadline = time.monotonic() + timeout
    line = child.stdout.readline()
    assert line, child.stderr.read()
    assert time.monotonic() < deadline
    return json.loads(line)


def kill(child):
    """SIGKILL the child; return the reports it printed that were not
    read yet."""
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    unread = [json.loads(line) for line in child.stdout]
    child.stdout.close()
    child.stderr.close()
    return unread


def bodies_of(messages):
    return [message.body for message in messages]


def take(consumer, max_items, timeout=0):
    """Return up to `max_items` messages, or [] when none came."""
    try:
        return consumer.get_many(max_items, timeout=timeout)
    except mqs.Empty:
        return []


HOLD_AND_DIE = """
path, fsync = sys.argv[1], sys.argv[2]
broker = mqs.Broker(backend="log", path=path, fsync=fsync,
                    segment_bytes=1 << 20)
broker.declare_topic("t", max_attempts=5, dedup_window=600)
for i in range(10):
    broker.publish("t", i, dedup_id=f"d{i}")
consumer = broker.consume("t", "g", prefetch=10, ack_timeout=600)
got = consumer.get_many(10, timeout=5)
assert [m.body for m in got] == list(range(10))
for message in got[:4]:
    message.ack()
# Read before the nack, so at or below the due time the broker sets.
due = time.time() + 3.0
got[4].nack(delay=3.0)
got[5].nack(requeue=False, error="bad input")
print(json.dumps({"due": due, "id0": got[0].id}), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("reboot", [False, True],
                         ids=["journal_kept", "reboot"])
@pytest.mark.parametrize("fsync", ["always", "interval"])
def test_log_sigkill_keeps_acks_flight_delay_dlq_dedup(tmp_path, fsync,
                                                       reboot):
    path = tmp_path / "broker"
    child = start_child(HOLD_AND_DIE, path, fsync)
    report = read_report(child)
    kill(child)
    if reboot:
        # A reboot empties /dev/shm: the log alone restores the broker.
        assert unlink_journal(path)

    broker = open_broker(path)
    stats = broker.stats("t")
    assert stats["published"] == 10
    assert stats["acked"] == 4
    assert stats["dlq"] == 1
    letters = broker.dlq_list("t")
    assert [letter.body for letter in letters] == [5]
    assert letters[0].reason == "rejected"
    assert letters[0].error == "bad input"

    # The in-flight ones are ready again at once, attempts kept.
    consumer = broker.consume("t", "g", prefetch=20, ack_timeout=600)
    redelivered = consumer.get_many(10, timeout=0)
    assert bodies_of(redelivered) == [6, 7, 8, 9]
    assert [m.attempts for m in redelivered] == [2, 2, 2, 2]
    for message in redelivered:
        assert message.ack()

    # The delayed one comes at its due time, not before.
    if time.time() < report["due"] - 0.5:
        with pytest.raises(mqs.Empty):
            consumer.get(timeout=0)
    delayed = consumer.get(timeout=30)
    assert time.time() >= report["due"]
    assert delayed.body == 4
    assert delayed.attempts == 2
    assert delayed.ack()

    # Acked messages never come back; dedup ids are still remembered.
    assert broker.publish("t", "again", dedup_id="d0") == report["id0"]
    assert broker.stats("t")["deduplicated"] == 1
    with pytest.raises(mqs.Empty):
        consumer.get(timeout=0.2)
    consumer.close()
    broker.close()


PUBLISH_LOOP = """
path = sys.argv[1]
broker = mqs.Broker(backend="log", path=path, fsync="interval",
                    segment_bytes=1 << 20, compact_bytes=64 << 10)
broker.declare_topic("t", dedup_window=0)
consumer = broker.consume("t", "g", prefetch=100, ack_timeout=600)
i = 0
while True:
    broker.publish_many("t", range(i, i + 10))
    i += 10
    for message in consumer.get_many(5, timeout=0):
        message.ack()
    print(json.dumps({"published": i}), flush=True)
"""


@pytest.mark.parametrize("reboot", [False, True],
                         ids=["journal_kept", "reboot"])
def test_log_sigkill_during_publish_loop_recovers_prefix(tmp_path, reboot):
    path = tmp_path / "broker"
    rng = random.Random(7)
    child = start_child(PUBLISH_LOOP, path)
    published = read_report(child)["published"]
    deadline = time.monotonic() + rng.uniform(0.2, 1.0)
    while time.monotonic() < deadline:
        published = read_report(child)["published"]
    for report in kill(child):
        published = report["published"]
    if reboot:
        assert unlink_journal(path)

    broker = open_broker(path)
    stats = broker.stats("t")
    # Every publish that returned is there, and part or all of one more
    # batch may be (a topic core stores a batch one message at a time).
    assert published <= stats["published"] <= published + 10
    assert stats["stored"] == stats["published"] - stats["acked"]
    consumer = broker.consume("t", "g", prefetch=100_000, ack_timeout=600)
    rest = bodies_of(consumer.get_many(100_000, timeout=0))
    assert sorted(rest) == list(range(stats["acked"], stats["published"]))
    # Messages the child held unacked (at most one get_many of 5) went
    # back to the lane's tail at the restart; the others kept their order.
    in_order = [body for body in rest if body >= rest[0]]
    assert in_order == sorted(in_order)
    assert len(rest) - len(in_order) <= 5
    consumer.close(drain=False)
    broker.close()


OPS_THEN_HOLD = """
path = sys.argv[1]
broker = mqs.Broker(backend="log", path=path, fsync="always",
                    segment_bytes=1 << 20)
consumer = broker.consume("t", "g", prefetch=10, ack_timeout=600)
broker.publish_many("t", ["a", "b", "c"])
got = consumer.get_many(3, timeout=5)
got[0].ack()
got[1].ack()
print(json.dumps({"ok": True}), flush=True)
time.sleep(600)
"""


def last_segment(path):
    current = (path / "CURRENT").read_text().strip()
    segments = sorted((path / current).glob("*.seg"))
    return segments[-1]


def test_log_torn_last_record_opens_state_before_it(tmp_path):
    path = tmp_path / "broker"
    child = start_child(OPS_THEN_HOLD, path)
    read_report(child)
    kill(child)
    # As after a reboot: the torn log alone restores the broker.
    assert unlink_journal(path)

    # Tear the last record (the second ack) in the middle of its value.
    segment = last_segment(path)
    data = bytearray(segment.read_bytes())
    with mqs.SegmentLog(segment.parent, readonly=True) as log:
        last = bytes(log.read(log.end_offset - 1))
    position = data.rfind(last)
    assert position > 0
    data[position + len(last) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))

    broker = open_broker(path)
    stats = broker.stats("t")
    assert stats["published"] == 3
    assert stats["acked"] == 1
    consumer = broker.consume("t", "g", prefetch=10, ack_timeout=600)
    again = consumer.get_many(10, timeout=0)
    assert bodies_of(again) == ["b", "c"]
    assert [m.attempts for m in again] == [2, 2]
    consumer.close(drain=False)
    broker.close()


def test_log_damaged_snapshot_raises_with_fix(tmp_path):
    """A damaged record that the restore cannot get past (here the
    final snapshot of a clean close) raises LogCorrupted naming the
    broker and what to do, instead of opening without its state."""
    path = tmp_path / "broker"
    broker = open_broker(path, fsync="always")
    broker.declare_topic("t")
    for number in range(5):
        broker.publish("t", b"body-%d" % number + b"x" * 100)
    broker.close()
    segment = last_segment(path)
    data = bytearray(segment.read_bytes())
    position = data.find(b"body-2")
    assert position > 0
    data[position + 3] ^= 0xFF
    segment.write_bytes(bytes(data))

    with pytest.raises(mqs.LogCorrupted) as caught:
        open_broker(path)
    message = str(caught.value)
    assert f"log broker {path}" in message
    assert "backup" in message
    assert "mqs dump" in message


def test_log_close_and_reopen_keeps_everything(tmp_path):
    path = tmp_path / "broker"
    broker = open_broker(path)
    config = broker.declare_topic("t", weights={9: 2, 0: 1}, max_attempts=1,
                                  policy="strict",
                                  retry=mqs.Backoff(0.5, 2, 5, 0.5))
    broker.publish_many("t", ["low1", "low2"], priority=0)
    broker.publish("t", "high", priority=9)
    broker.publish("t", "later", delay=60)
    consumer = broker.consume("t", "g", auto_ack=False, ack_timeout=600)
    first = consumer.get(timeout=0)
    assert first.body == "high"
    assert first.nack()  # max_attempts=1: dead-lettered
    consumer.close()
    broker.close()

    again = open_broker(path)
    assert again.topic_config("t") == config
    assert [letter.body for letter in again.dlq_list("t")] == ["high"]
    stats = again.stats("t")
    assert stats["delayed"] == 1
    assert stats["ready"] == 2
    assert stats["dead_lettered.max_attempts"] == 1
    consumer = again.consume("t", "g", auto_ack=True)
    assert bodies_of(consumer.get_many(10, timeout=0)) == ["low1", "low2"]
    assert again.dlq_redrive("t") == 1
    assert consumer.get(timeout=0).body == "high"
    consumer.close()
    again.close()


def test_log_compaction_bounds_log_and_keeps_timers(tmp_path):
    path = tmp_path / "broker"
    broker = open_broker(path, compact_bytes=4096)
    broker.declare_topic("t", dedup_window=0)
    consumer = broker.consume("t", "g", prefetch=1000, ack_timeout=600)
    broker.publish("t", "delayed", delay=1.0)
    first_log = (path / "CURRENT").read_text().strip()
    for round_ in range(30):
        broker.publish_many("t", [f"{round_}-{i}" for i in range(10)])
        for message in take(consumer, 10):
            if message.body != f"{round_}-9":
                assert message.ack()
    # The last message of each round stays in flight, its deadline pending.
    assert (path / "CURRENT").read_text().strip() != first_log
    logs = sorted(entry.name for entry in path.iterdir()
                  if entry.name.startswith("log-"))
    assert logs == [(path / "CURRENT").read_text().strip()]
    held = broker.stats("t")["in_flight"]
    assert held >= 1
    broker.close()

    again = open_broker(path)
    consumer = again.consume("t", "g", prefetch=1000, ack_timeout=600)
    rest = take(consumer, 1000)
    later = []
    deadline = time.monotonic() + 30
    while "delayed" not in bodies_of(rest + later) \
            and time.monotonic() < deadline:
        later += take(consumer, 1000, timeout=0.1)
    bodies = bodies_of(rest + later)
    assert sorted(bodies) == sorted(
        ["delayed"] + [f"{round_}-9" for round_ in range(30)])
    assert again.stats("t")["acked"] == 270
    consumer.close(drain=False)
    again.close()


SHARE_AND_HOLD = """
broker = mqs.Broker(backend="log", path=sys.argv[1], segment_bytes=1 << 20)
consumer = broker.consume("t", "g", prefetch=10, ack_timeout=600)
got = consumer.get_many(2, timeout=30)
got[0].ack()
broker.publish("t", "from child")
print(json.dumps({"bodies": [m.body for m in got]}), flush=True)
time.sleep(600)
"""


def test_log_second_process_shares_the_broker(tmp_path):
    path = tmp_path / "broker"
    broker = open_broker(path)
    broker.declare_topic("t")
    broker.consume("t", "g").close()
    broker.publish_many("t", ["a", "b", "c"])
    child = start_child(SHARE_AND_HOLD, path)
    try:
        assert read_report(child) == {"bodies": ["a", "b"]}
        stats = broker.stats("t")
        assert stats["published"] == 4
        assert stats["acked"] == 1
        assert stats["in_flight"] == 1
        consumer = broker.consume("t", "g", prefetch=10, ack_timeout=600)
        assert bodies_of(take(consumer, 10)) == ["c", "from child"]
    finally:
        kill(child)
    # The child's consumer is closed by this process: "b" comes back.
    again = consumer.get(timeout=30)
    assert again.body == "b"
    assert again.attempts == 2
    consumer.close(drain=False)
    broker.close()


def test_log_second_broker_in_process_shares(tmp_path):
    path = tmp_path / "broker"
    with open_broker(path) as first, open_broker(path) as second:
        first.declare_topic("t")
        consumer = second.consume("t", "g", ack_timeout=600)
        first.publish("t", "x")
        message = consumer.get(timeout=30)
        assert message.body == "x"
        assert message.ack()
        assert first.stats("t")["acked"] == 1
        consumer.close()


def test_log_publish_declares_topic_deleted_elsewhere(tmp_path):
    path = tmp_path / "broker"
    with open_broker(path) as first, open_broker(path) as second:
        first.publish("t", "old")
        second.delete_topic("t")
        # The publish finds the topic gone in the shared state and
        # declares it again, instead of publishing to its stale replica.
        first.publish("t", "new")
        assert second.stats("t")["stored"] == 1
        strict = mqs.Broker(first.backend, auto_declare=False)
        second.delete_topic("t")
        with pytest.raises(mqs.UnknownTopic, match="declare it first"):
            strict.publish("t", "lost")
        assert not second.backend.has_topic("t")


DURABLE_QUEUE_HOLDER = """
queue = mqs.SharedQueue(persist=sys.argv[1], fsync="always")
queue.put(b"kept")
print(json.dumps({"open": True}), flush=True)
time.sleep(600)
"""


def test_log_rejects_durable_queue_directory(tmp_path):
    """A log broker on a durable SharedQueue's directory, while another
    process runs the queue and after it exits, raises DirectoryKindError
    (not LogLocked) and leaves the queue's files alone."""
    path = tmp_path / "queue"
    child = start_child(DURABLE_QUEUE_HOLDER, path)
    try:
        read_report(child)
        with pytest.raises(mqs.DirectoryKindError,
                           match="durable SharedQueue") as raised:
            open_broker(path)
        assert raised.value.path == str(path)
        assert raised.value.kind == "durable SharedQueue"
        assert str(path) in str(raised.value)
        assert "persist=path" in str(raised.value)
    finally:
        kill(child)
    with pytest.raises(mqs.DirectoryKindError, match="directory of its own"):
        open_broker(path)
    assert "CURRENT" not in os.listdir(path)
    queue = mqs.SharedQueue(persist=str(path))
    assert queue.get(timeout=10) == b"kept"
    queue.close()


def test_log_rejects_bare_segment_log(tmp_path):
    path = tmp_path / "log"
    log = mqs.SegmentLog(str(path))
    log.append(b"record")
    log.close()
    with pytest.raises(mqs.DirectoryKindError, match="segment log"):
        open_broker(path)


def test_log_rejects_bad_input(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match="not a file") as raised:
        open_broker(a_file)
    # The path shows once, as the error's filename.
    assert str(raised.value).count(str(a_file)) == 1
    assert raised.value.filename == str(a_file)
    with pytest.raises(ValueError, match="fsync must be .*got 'sometimes'"):
        open_broker(tmp_path / "b", fsync="sometimes")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a log broker's"):
        open_broker(foreign)
    with pytest.raises(TypeError, match="path must be a str"):
        mqs.Broker(backend="log", path=42)
    with pytest.raises(ValueError, match="path must name the log broker's "
                                         "directory, got ''"):
        mqs.Broker(backend="log", path="")


BAD_OPTIONS = [
    ({"fsync_interval_s": -1}, ValueError, "fsync_interval_s must be >= 0"),
    ({"fsync_interval_s": float("nan")}, ValueError, "got nan"),
    ({"fsync_interval_s": "1"}, TypeError, "number of seconds"),
    ({"segment_bytes": 5}, ValueError, r"from 8192 to .*got 5 \(try 8192\)"),
    ({"segment_bytes": 8192 + 1}, ValueError, "multiple of 4096"),
    ({"sample_every": -5}, ValueError, "at least 1"),
    ({"sample_every": "x"}, TypeError, "sample_every must be an int"),
    ({"compact_bytes": 0}, ValueError, "compact_bytes must be"),
    ({"compact_bytes": "64M"}, TypeError,
     "compact_bytes must be an int, got str '64M'"),
    ({"compact_bytes": True}, TypeError,
     "compact_bytes must be an int, got bool True"),
    ({"fsync": "sometimes"}, ValueError, "fsync must be"),
    ({"fsync": 1}, TypeError, r"fsync must be a str \('always', "
                              r"'interval' or 'never'\), got int 1"),
]


@pytest.mark.parametrize("options, error, match", BAD_OPTIONS + [
    ({"sync_acks": "yes"}, TypeError, "sync_acks must be True or False"),
    # Only "always" syncs acks, so elsewhere sync_acks=True would do
    # nothing.
    ({"sync_acks": True}, ValueError,
     "sync_acks=True needs fsync='always', got fsync='interval'"),
    ({"sync_acks": True, "fsync": "never"}, ValueError,
     "sync_acks=True needs fsync='always', got fsync='never'"),
    ({"journal_bytes": 5}, ValueError, "journal_bytes must be"),
    ({"journal_bytes": "1M"}, TypeError, "journal_bytes must be an int"),
])
def test_log_bad_option_creates_nothing(tmp_path, options, error, match):
    path = tmp_path / "broker"
    with pytest.raises(error, match=match):
        mqs.Broker(backend="log", path=path, **options)
    assert not path.exists()
    assert journal_files(path) == []


@pytest.mark.parametrize("options, error, match", BAD_OPTIONS)
def test_log_backend_bad_option_creates_nothing(tmp_path, options, error,
                                                match):
    """The single-process LogBackend checks its options up front too."""
    path = tmp_path / "broker"
    with pytest.raises(error, match=match):
        LogBackend(path, **options)
    assert not path.exists()


def test_log_unpicklable_body_changes_nothing(tmp_path):
    with open_broker(tmp_path / "broker") as broker:
        broker.publish("t", "fine")
        with pytest.raises((TypeError, AttributeError,
                            pickle.PicklingError)):
            broker.publish("t", lambda: None)
        assert broker.stats("t")["published"] == 1


def test_log_errors_name_the_directory(tmp_path):
    path = str(tmp_path / "broker")
    broker = mqs.Broker(backend="log", path=path, journal_bytes=1 << 16)
    with pytest.raises(mqs.MessageTooLarge) as too_large:
        broker.publish("t", b"x" * (1 << 16))
    assert f"log broker {path!r}" in str(too_large.value)
    assert "journal_bytes" in str(too_large.value)
    consumer = broker.consume("t", "g")
    broker.publish("t", "m")
    message = consumer.get(timeout=5)
    broker.close()
    with pytest.raises(mqs.ShutDown) as closed:
        message.ack()
    assert str(closed.value) == f"log broker {path!r} is closed"
    assert "shm broker" not in str(closed.value)


def test_log_too_large_advice_names_limit(tmp_path):
    path = tmp_path / "broker"
    broker = mqs.Broker(backend="log", path=path, journal_bytes=1 << 16,
                        segment_bytes=1 << 20)
    broker.publish("t", "kept")
    with pytest.raises(mqs.MessageTooLarge) as too_large:
        broker.publish("t", b"x" * (1 << 16))
    message = str(too_large.value)
    assert "half its journal of 65536 bytes" in message
    assert "Close the broker in every process" in message
    assert "larger journal_bytes" in message
    broker.close()

    # The advice works: the next open makes a new journal of the new size.
    broker = mqs.Broker(backend="log", path=path, journal_bytes=1 << 20,
                        segment_bytes=1 << 20)
    broker.publish("t", b"x" * (1 << 16))
    assert broker.stats("t")["published"] == 2
    broker.close()

    broker = mqs.Broker(backend="log", path=path, segment_bytes=1 << 14)
    with pytest.raises(mqs.MessageTooLarge) as too_large:
        broker.publish("t", b"x" * (1 << 16))
    message = str(too_large.value)
    assert "half a log segment (segment_bytes=16384, which" in message
    assert "larger segment_bytes" in message
    broker.close()


@pytest.mark.parametrize("topic_options", [{}, {"ttl": 600}],
                         ids=["core", "journal"])
def test_log_smallest_segment_largest_record(tmp_path, topic_options):
    """With the smallest segment_bytes, the segment header leaves less
    than half a segment for one record. A publish just below the limit
    the broker names must be stored, not break the broker, and the
    snapshot that the close writes must fit too."""
    path = tmp_path / "broker"
    broker = mqs.Broker(backend="log", path=path, segment_bytes=8192)
    broker.declare_topic("t", **topic_options)
    broker.consume("t", "g").close()
    with pytest.raises(mqs.MessageTooLarge) as too_large:
        broker.publish("t", b"x" * 5000)
    limit = int(str(too_large.value).split(" bytes that ")[0].split()[-1])
    assert limit <= 4055
    # A body of 100 bytes less than the limit leaves room for the rest
    # of the publish record.
    broker.publish("t", b"b" * (limit - 100))
    broker.publish("t", "after")
    bodies = [b"%d" % i * 500 for i in range(10)]
    broker.publish_many("t", bodies)
    broker.close()

    again = mqs.Broker(backend="log", path=path, segment_bytes=8192)
    consumer = again.consume("t", "g", auto_ack=True)
    got = [message.body for message in consumer.get_many(20, timeout=5)]
    assert got == [b"b" * (limit - 100), "after", *bodies]
    consumer.close()
    again.close()


@pytest.mark.parametrize("segment_bytes", [8192, 12288, 1 << 20])
def test_log_max_record_fits_segment(tmp_path, segment_bytes):
    """`max_record_bytes` repeats the segment layout of the C log; a
    record of that size with the longest key must fit in one segment."""
    from mqs.broker._log import max_record_bytes

    limit = max_record_bytes(segment_bytes)
    assert limit <= segment_bytes // 2
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=segment_bytes,
                        fsync="never") as log:
        log.append_many([(b"s" + bytes(8), b"v" * limit)])
        log.append(b"v" * limit)


@pytest.mark.parametrize("current", ["log-999999\n", "", "garbage\x00",
                                     "log-\xe9"],
                         ids=["missing-log", "empty", "not-a-name",
                              "not-ascii"])
def test_log_bad_current_raises_keeps_log(tmp_path, current):
    """A CURRENT file that names no log directory of the broker (a
    partial copy, a manual edit) must stop the open with an error that
    names the file. The open must not start an empty broker and delete
    the real log as a leftover of a compaction."""
    path = tmp_path / "broker"
    broker = mqs.Broker(backend="log", path=path)
    broker.publish("t", "kept")
    broker.close()
    logs = sorted(entry.name for entry in path.glob("log-*"))
    good = (path / "CURRENT").read_text()
    (path / "CURRENT").write_text(current)

    with pytest.raises(mqs.LogCorrupted, match="CURRENT") as raised:
        mqs.Broker(backend="log", path=path)
    assert logs[0] in str(raised.value)
    assert sorted(entry.name for entry in path.glob("log-*")) == logs
    # The failed open removed the journal it created in /dev/shm.
    assert journal_files(str(path)) == []

    # The fix that the error names works.
    (path / "CURRENT").write_text(good)
    broker = mqs.Broker(backend="log", path=path)
    consumer = broker.consume("t", "g", auto_ack=True)
    assert consumer.get(timeout=5).body == "kept"
    consumer.close()
    broker.close()


def test_log_directory_is_owner_only(tmp_path):
    path = tmp_path / "broker"
    open_broker(path).close()
    assert os.stat(path).st_mode & 0o077 == 0


RANDOM_OPS = """
import random
path, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
broker = mqs.Broker(backend="log", path=path, fsync="never",
                    segment_bytes=1 << 20, compact_bytes=32 << 10)
broker.declare_topic("t", weights={9: 3, 5: 2, 0: 1}, max_attempts=3,
                     rate=mqs.Rate(20_000, burst=50, adaptive=True),
                     retry=mqs.Backoff(0.001, 2, 0.01, 0.5),
                     dedup_window=600, ttl=0.5, on_expire="dead_letter")
consumers = [broker.consume("t", group, prefetch=8, ack_timeout=0.02)
             for group in ("a", "a", "b")]
held = []
for step in range(int(sys.argv[3])):
    roll = rng.random()
    if roll < 0.3:
        broker.publish("t", step, priority=rng.choice([0, 5, 9]),
                       key=rng.choice([None, None, "k1", "k2"]),
                       dedup_id=rng.choice([None, step, step // 4]),
                       delay=rng.choice([None, None, 0.005]))
    elif roll < 0.6:
        try:
            held += rng.choice(consumers).get_many(4, timeout=0)
        except mqs.Empty:
            pass
    elif roll < 0.9 and held:
        message = held.pop(rng.randrange(len(held)))
        action = rng.random()
        if action < 0.5:
            message.ack()
        elif action < 0.8:
            message.nack(requeue=action < 0.75)
        else:
            message.extend(0.05)
    elif roll < 0.95:
        broker.stats("t")
    else:
        time.sleep(0.002)
stats = broker.stats("t")
letters = sorted((letter.id, letter.group, letter.reason)
                 for letter in broker.dlq_list("t"))
print(json.dumps({"stats": stats, "letters": letters}), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("reboot", [False, True],
                         ids=["journal_kept", "reboot"])
def test_log_replay_reproduces_random_operations(tmp_path, scale, reboot):
    path = tmp_path / "broker"
    child = start_child(RANDOM_OPS, path, 11, int(3000 * scale))
    report = read_report(child, timeout=120)
    kill(child)
    if reboot:
        assert unlink_journal(path)

    broker = open_broker(path)
    stats = broker.stats("t")
    before = report["stats"]
    # Counters of explicit operations are exactly those of the killed
    # process: the replay made the same deliveries, and every ack, nack
    # and stale tag matched the same delivery.
    for key in ("published", "deduplicated", "delivered", "acked",
                "nacked", "late_acks", "dead_lettered.rejected",
                "dead_lettered.max_attempts"):
        assert stats[key] == before[key], key
    # Timers that fell due after the child's last call fired at the
    # restart, so those counters can only have grown.
    for key in ("redelivered", "dead_lettered.ack_timeout",
                "dead_lettered.expired", "dead_lettered"):
        assert stats[key] >= before[key], key
    assert stats["in_flight"] == 0
    letters = {(letter.id, letter.group, letter.reason)
               for letter in broker.dlq_list("t")}
    assert {tuple(letter) for letter in report["letters"]} <= letters
    broker.close()


def test_log_snapshot_parts_match_pickle():
    from mqs.broker._log import _Parts

    value = {"small": list(range(1000)), "large": b"b" * (3 << 20),
             "medium": [b"m" * 100_000] * 12, "bytearray": bytearray(5000)}
    parts = _Parts(1 << 20)
    pickle.dump(value, parts, protocol=pickle.HIGHEST_PROTOCOL)
    found = parts.finish()
    assert b"".join(found) == pickle.dumps(
        value, protocol=pickle.HIGHEST_PROTOCOL)
    assert max(map(len, found)) <= 1 << 20
    # The large value is split into views of it, not copied.
    assert any(isinstance(part, memoryview) for part in found)


def test_log_reopens_snapshot_larger_than_segment(tmp_path):
    path = tmp_path / "broker"
    broker = open_broker(path)
    bodies = [os.urandom(20_000) for _ in range(200)]
    broker.publish_many("t", bodies)
    # The last close writes a snapshot of about 4 MB, in parts that span
    # several segments of 1 MiB, and removes the journal.
    broker.close()
    assert unlink_journal(path) is False

    again = open_broker(path)
    consumer = again.consume("t", "g", auto_ack=True)
    assert [message.body for message in consumer.get_many(500, timeout=5)] \
        == bodies
    consumer.close()
    again.close()
