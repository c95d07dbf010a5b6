"""Crash tests of the shm broker: SIGKILL of processes that share it.

`test_shm_crash_producers_and_consumers` runs 4 producer and 4 consumer
processes on one broker and kills one of them with SIGKILL at random
moments (a new one takes its place), then stops the rest and drains
the topic. Every process appends what it did to its own file with one
write(2) per step, which a SIGKILL cannot tear: producers the bodies of
each publish that returned, consumers each delivery before they ack it
and each ack after it returned. The checks: every returned publish was
delivered and the broker acked every message it accepted (nothing
lost); a message was delivered again only after a delivery to a
consumer that was killed before it logged the ack; attempts grow with
each delivery; the stats counters agree with the logs.

`test_shm_kill_inside_mutex_recovers` kills a process at random points
while it holds the broker mutex (replaying, applying its operation,
appending, compacting), and `test_shm_failpoint_inside_append_recovers`
at the instruction between writing a record and committing it, in the
copy of mqs built with failpoints. After each kill the next process
must take the mutex over (EOWNERDEAD), see exactly the committed
operations, and redeliver the dead consumer's messages.
`test_shm_consumer_killed_in_close_redelivered` kills a consumer inside
its close and checks that the repair counts what it puts back.

MQS_TEST_SCALE multiplies the run time and the number of kills
(default: 8 s of kills, about 20 of them, and 8 + 8 mutex kills).
Random choices use fixed seeds.
"""

import collections
import functools
import os
import random
import signal
import subprocess
import sys
import time
import uuid

import pytest

import mqs
from broker_workers import (
    FORK,
    Crew,
    check_redeliveries,
    publish_and_ack_forever,
    read_step_logs,
)
from mqs.broker._shm import ShmBackend

pytestmark = pytest.mark.stress

PRODUCERS = 4
CONSUMERS = 4
RUN_S = 8.0
ACK_TIMEOUT_S = 120.0


@pytest.fixture
def name():
    fresh = f"test-shm-crash-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield fresh
    mqs.Broker.unlink(fresh)


def open_broker(name):
    return mqs.Broker(backend="shm", name=name)


def test_shm_crash_producers_and_consumers(name, tmp_path, scale):
    broker = open_broker(name)
    broker.declare_topic("t", weights={9: 3, 5: 2, 0: 1})
    broker.consume("t", "g").close()
    # A plain shared byte, not an Event: Event.is_set takes a lock shared
    # by every process, and a child SIGKILLed while holding it would
    # leave the others and stop.set() blocked for good.
    stop = FORK.RawValue("b", 0)
    rng = random.Random(1234)
    crew = Crew(tmp_path, rng, functools.partial(open_broker, name),
                ack_timeout=ACK_TIMEOUT_S, stop=stop)
    crew.launch_all(PRODUCERS, CONSUMERS)

    end = time.monotonic() + RUN_S * scale
    while time.monotonic() < end:
        time.sleep(rng.uniform(0.1, 0.6))
        key = rng.choice(sorted(crew.workers))
        assert crew.kill_and_replace(key) == -signal.SIGKILL, key

    stop.value = 1
    for process, _ in crew.workers.values():
        process.join(60)
        assert process.exitcode == 0, process.exitcode

    # Drain what is left; the dead consumers' messages come back.
    drained = []
    last = broker.consume("t", "g", prefetch=64)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            batch = last.get_many(64, timeout=0.5)
        except mqs.Empty:
            if broker.stats("t")["stored"] == 0:
                break
            continue
        for message in batch:
            assert message.ack()
            drained.append((message.body, message.attempts))
    last.close()
    stats = broker.stats("t")

    returned, deliveries = read_step_logs(tmp_path)
    for body, attempts in drained:
        deliveries[body].append((attempts, "drain", True))

    # Nothing lost: every returned publish was delivered, and the broker
    # acked every message it accepted, so none is left anywhere.
    assert returned <= set(deliveries)
    assert stats["published"] == len(deliveries)
    assert stats["acked"] == stats["published"]
    for gauge in ("stored", "ready", "in_flight", "delayed", "dlq"):
        assert stats[gauge] == 0, gauge
    assert stats["delivered"] >= sum(map(len, deliveries.values()))
    assert stats["late_acks"] == 0
    unlogged_acks = collections.Counter()
    # Duplicates only after a delivery to a consumer that was killed
    # before it logged the ack, and attempts count every delivery.
    check_redeliveries(deliveries, crew.killed)
    for body, seen in deliveries.items():
        # The last delivery was acked, or its consumer was killed between
        # the ack and the log line (the ack counts above prove it).
        _, log, acked = seen[-1]
        if not acked:
            assert log in crew.killed, (body, seen)
            unlogged_acks[log] += 1
    # A killed consumer held at most one batch (prefetch 8).
    assert max(unlogged_acks.values(), default=0) <= 8
    assert crew.killed
    broker.close()


# Kills while the mutex is held.

class KillingJournal:
    """A proxy of the SharedJournal that SIGKILLs this process just
    before or after its `when`-th call of `method`."""

    def __init__(self, journal, method, when, after):
        self._journal = journal
        self._method = method
        self._left = when
        self._after = after

    def __getattr__(self, attribute):
        value = getattr(self._journal, attribute)
        if attribute != self._method:
            return value

        def call(*args):
            self._left -= 1
            if self._left == 0 and not self._after:
                os.kill(os.getpid(), signal.SIGKILL)
            result = value(*args)
            if self._left == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return call


def work_until_killed(name, point, when, report_fd):
    if point == "replay":
        original_replay = ShmBackend._replay_records

        def replay(self, records):
            # The first replay catches up at open, under the mutex.
            original_replay(self, records[:len(records) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        # This forked child's own copy of the class.
        ShmBackend._replay_records = replay
    broker = mqs.Broker(backend="shm", name=name)
    backend = broker.backend
    if point == "apply":
        original = backend._apply

        def apply(op, args, left=[when]):
            left[0] -= 1
            if left[0] == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(op, args)
        backend._apply = apply
    elif point != "replay":
        method, _, after = point.partition(":")
        backend._journal = KillingJournal(backend._journal, method, when,
                                          after == "after")
    publish_and_ack_forever(broker, report_fd)


POINTS = ["apply", "replay", "append:before", "append:after",
          "restart:before", "restart:after"]


def test_shm_kill_inside_mutex_recovers(name, scale):
    rng = random.Random(99)
    broker = mqs.Broker(backend="shm", name=name, journal_bytes=4096)
    # A ttl keeps the topic on the journal, whose mutex this test kills in.
    broker.declare_topic("t", ttl=3600)
    kept = broker.consume("t", "g", prefetch=1000, ack_timeout=600)
    journal = broker.backend._journal
    returned = 0
    for round_number in range(int(8 * scale)):
        point = POINTS[round_number % len(POINTS)]
        when = rng.randint(1, 3 if point.startswith("restart") else 40)
        # Leave a record for the child to replay when it opens.
        broker.publish("t", "before")
        returned += 1
        read_fd, write_fd = os.pipe()
        child = FORK.Process(target=work_until_killed, daemon=True,
                             args=(name, point, when, write_fd))
        recoveries = journal.recoveries
        child.start()
        os.close(write_fd)
        child.join(60)
        assert child.exitcode == -signal.SIGKILL, (point, child.exitcode)
        returned += count_reports(read_fd)

        # The next locker takes the mutex over, and the broker works.
        stats = broker.stats("t")
        assert journal.recoveries == recoveries + 1, point
        assert returned <= stats["published"] <= returned + 1, point
        broker.publish("t", "after")
        returned += 1

    # Every message is there once; the dead consumers' ones come back.
    bodies = []
    deadline = time.monotonic() + 60
    while broker.stats("t")["stored"] and time.monotonic() < deadline:
        try:
            batch = kept.get_many(100, timeout=0.5)
        except mqs.Empty:
            continue
        for message in batch:
            message.ack()
            bodies.append(message.body)
    stats = broker.stats("t")
    assert stats["stored"] == 0
    assert stats["acked"] == stats["published"]
    assert stats["in_flight"] == 0
    kept.close()
    broker.close()


# Run by the failpoint tests with PYTHONPATH set to the failpoint copy
# of mqs and this directory.
CHILD = r"""
import sys
import mqs
from broker_workers import publish_and_ack_forever

name, report = sys.argv[1], int(sys.argv[2])
publish_and_ack_forever(mqs.Broker(backend="shm", name=name), report)
"""


def count_reports(read_fd):
    """Read the pipe until every writer closed it, close it and return
    how many publishes the child reported (one byte each)."""
    returned = 0
    while chunk := os.read(read_fd, 4096):
        returned += len(chunk)
    os.close(read_fd)
    return returned


def run_until_failpoint(name, failpoint, failpoint_path):
    """Run CHILD on broker `name` in the copy of mqs built with
    failpoints, with `failpoint` armed. Check that it killed the child
    and return how many publishes returned."""
    read_fd, write_fd = os.pipe()
    env = dict(os.environ, PYTHONPATH=failpoint_path,
               MQS_FAILPOINT=failpoint)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, name, str(write_fd)], env=env,
        pass_fds=(write_fd,))
    os.close(write_fd)
    assert child.wait(60) == -signal.SIGKILL, failpoint
    return count_reports(read_fd)


def test_shm_failpoint_inside_append_recovers(name, scale, failpoint_path):
    rng = random.Random(7)
    broker = mqs.Broker(backend="shm", name=name, journal_bytes=4096)
    # A ttl keeps the topic on the journal (a topic core has no ttl).
    broker.declare_topic("t", ttl=3600)
    journal = broker.backend._journal
    returned = 0
    for round_number in range(int(8 * scale)):
        if round_number % 2:
            failpoint = f"journal.restart:{rng.randint(1, 4)}"
        else:
            failpoint = f"journal.append:{rng.randint(1, 60)}"
        recoveries = journal.recoveries
        returned += run_until_failpoint(name, failpoint, failpoint_path)

        # Killed before its commit: the operation never happened.
        stats = broker.stats("t")
        assert journal.recoveries == recoveries + 1, failpoint
        assert stats["published"] == returned, failpoint

    consumer = broker.consume("t", "g", prefetch=1000)
    deadline = time.monotonic() + 60
    while broker.stats("t")["stored"] and time.monotonic() < deadline:
        try:
            for message in consumer.get_many(100, timeout=0.5):
                message.ack()
        except mqs.Empty:
            pass
    stats = broker.stats("t")
    assert stats["stored"] == 0
    assert stats["acked"] == stats["published"] == returned
    consumer.close()
    broker.close()


CORE_POINTS = ["tc_publish_before_commit", "tc_publish_after_commit",
               "tc_fetch_after_commit", "tc_finish_before_free",
               "tc_fetch_after_count", "tc_ack_after_count"]


def test_shm_failpoint_inside_core_recovers(name, scale, failpoint_path):
    """Kill a process inside the topic core's mutex, at the failpoints
    between its stores, in the copy of mqs built with failpoints. The
    next locker repairs the core (EOWNERDEAD): a publish killed before
    its commit never happened, one killed after it did, every message
    the dead consumer held comes back, and the counters match the
    entries (stored = published - acked)."""
    rng = random.Random(11)
    broker = mqs.Broker(backend="shm", name=name)
    broker.declare_topic("t")
    kept = broker.consume("t", "g", prefetch=1000, ack_timeout=600)
    returned = 0
    recoveries = 0
    for round_number in range(int(8 * scale)):
        point = CORE_POINTS[round_number % len(CORE_POINTS)]
        failpoint = f"{point}:{rng.randint(1, 30)}"
        returned += run_until_failpoint(name, failpoint, failpoint_path)
        stats = broker.stats("t")
        core = broker.backend._cores["t"]
        recoveries += 1
        assert core.counters()["recoveries"] == recoveries, failpoint
        # A publish that returned is stored; one killed after its commit
        # is too, although its process never saw the id.
        expected = returned + (point == "tc_publish_after_commit")
        assert stats["published"] == expected, failpoint
        assert stats["stored"] == stats["published"] - stats["acked"], \
            failpoint
        returned = expected

    # Drain with the consumer of this process once the dead children's
    # consumers are closed (the reaper runs within REAP_INTERVAL_S).
    deadline = time.monotonic() + 60
    while broker.stats("t")["stored"] and time.monotonic() < deadline:
        try:
            for message in kept.get_many(100, timeout=0.5):
                message.ack()
        except mqs.Empty:
            pass
    stats = broker.stats("t")
    assert stats["stored"] == 0
    assert stats["in_flight"] == 0
    assert stats["acked"] == stats["published"] == returned
    assert "t" in broker.backend._core_paths
    kept.close()
    broker.close()


CLOSE_CHILD = r"""
import sys
import mqs

broker = mqs.Broker(backend="shm", name=sys.argv[1])
consumer = broker.consume("t", "g", prefetch=10, ack_timeout=600)
assert len(consumer.get_many(3, timeout=10)) == 3
consumer.close(drain=False)
"""


def test_shm_consumer_killed_in_close_redelivered(name, failpoint_path):
    """Kill a consumer process inside its close, after it put back one of
    its three messages and while it puts back the second. The repair puts
    back the other two and counts all three as redelivered."""
    broker = mqs.Broker(backend="shm", name=name)
    broker.declare_topic("t")
    broker.consume("t", "g").close()
    broker.publish_many("t", [0, 1, 2])
    env = dict(os.environ, PYTHONPATH=failpoint_path,
               MQS_FAILPOINT="tc_requeue_after_leave:2")
    child = subprocess.run([sys.executable, "-c", CLOSE_CHILD, name],
                           env=env, timeout=60, check=False)
    assert child.returncode == -signal.SIGKILL

    stats = broker.stats("t")
    assert broker.backend._cores["t"].counters()["recoveries"] == 1
    assert stats["in_flight"] == 0
    assert stats["ready"] == 3
    assert stats["redelivered"] == 3
    (group,) = broker.group_stats("t")
    assert group.redelivered == 3
    consumer = broker.consume("t", "g", prefetch=10)
    messages = consumer.get_many(3, timeout=10)
    assert sorted(message.body for message in messages) == [0, 1, 2]
    assert [message.attempts for message in messages] == [2, 2, 2]
    for message in messages:
        assert message.ack()
    consumer.close()
    broker.close()


# A backlog larger than the 65,536 messages that a topic core held
# before its used region could grow.
BACKLOG = 70_000
BACKLOG_BATCH = 1000

BACKLOG_CHILD = r"""
import os
import sys
import mqs

name, first, report = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
broker = mqs.Broker(backend="shm", name=name)
for number in range(first, first + 100):
    broker.publish("t", number)
    os.write(report, b"p")
"""


def publish_backlog(name, count, report_fd):
    """Publish 0 .. count - 1 to topic "t" in batches, writing the
    number published so far (8 bytes) to `report_fd` after each."""
    broker = mqs.Broker(backend="shm", name=name)
    for first in range(0, count, BACKLOG_BATCH):
        last = min(count, first + BACKLOG_BATCH)
        broker.publish_many("t", range(first, last))
        os.write(report_fd, last.to_bytes(8, "little"))
    broker.close()


def fetch_backlog_then_hang(name, count, results):
    broker = mqs.Broker(backend="shm", name=name)
    consumer = broker.consume("t", "a", prefetch=count, ack_timeout=600)
    fetched = []
    deadline = time.monotonic() + 30
    while len(fetched) < count and time.monotonic() < deadline:
        fetched += [message.body for message in
                    consumer.get_many(count - len(fetched), timeout=1)]
    results.put(fetched)
    time.sleep(600)


def drain_group(broker, group, timeout):
    """Ack every message group `group` gets until the topic is empty;
    return (body, attempts) pairs in delivery order."""
    consumer = broker.consume("t", group, prefetch=1000, ack_timeout=600)
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            batch = consumer.get_many(1000, timeout=0.5)
        except mqs.Empty:
            (stats,) = [entry for entry in broker.group_stats("t")
                        if entry.group == group]
            if stats.lag_messages == 0 and stats.in_flight == 0:
                break
            continue
        for message in batch:
            assert message.ack()
            got.append((message.body, message.attempts))
    consumer.close()
    return got


def test_shm_large_backlog_survives_kills(name, failpoint_path):
    """Build a backlog of about 70,000 messages on a plain topic with two
    groups. Its publisher is SIGKILLed part way, and one more publisher
    is killed inside the topic core's mutex (failpoint before a commit).
    A consumer of group "a" is killed with 500 messages in flight.
    The topic stays on its core, every published message reaches each
    group exactly once, and the 500 come back with attempts 2."""
    rng = random.Random(23)
    broker = mqs.Broker(backend="shm", name=name)
    broker.declare_topic("t")
    broker.consume("t", "a").close()
    broker.consume("t", "b").close()
    core = broker.backend._cores["t"]

    # A publisher killed once its backlog is past 66,000 messages.
    read_fd, write_fd = os.pipe()
    publisher = FORK.Process(target=publish_backlog, daemon=True,
                             args=(name, BACKLOG + 10_000, write_fd))
    publisher.start()
    os.close(write_fd)
    kill_at = 66_000 + rng.randint(0, 3000)
    returned = 0
    while returned < kill_at:
        report = os.read(read_fd, 8)
        assert len(report) == 8, "the publisher ended before the kill"
        returned = int.from_bytes(report, "little")
    os.kill(publisher.pid, signal.SIGKILL)
    publisher.join(30)
    assert publisher.exitcode == -signal.SIGKILL
    while report := os.read(read_fd, 8):
        returned = int.from_bytes(report, "little")
    os.close(read_fd)
    published = broker.stats("t")["published"]
    assert returned <= published <= returned + BACKLOG_BATCH
    assert "t" in broker.backend._core_paths

    # A publisher killed before the commit of its 50th message: the next
    # locker repairs a core that stores the whole backlog.
    recoveries = core.counters()["recoveries"]
    read_fd, write_fd = os.pipe()
    env = dict(os.environ, PYTHONPATH=failpoint_path,
               MQS_FAILPOINT="tc_publish_before_commit:50")
    child = subprocess.Popen(
        [sys.executable, "-c", BACKLOG_CHILD, name, str(published),
         str(write_fd)], env=env, pass_fds=(write_fd,))
    os.close(write_fd)
    assert child.wait(60) == -signal.SIGKILL
    assert count_reports(read_fd) == 49
    stats = broker.stats("t")
    assert core.counters()["recoveries"] == recoveries + 1
    published += 49
    assert stats["published"] == published
    assert stats["stored"] == published

    # A consumer of group "a" killed with 500 deliveries in flight.
    results = FORK.Queue()
    consumer = FORK.Process(target=fetch_backlog_then_hang, daemon=True,
                            args=(name, 500, results))
    consumer.start()
    in_flight = results.get(timeout=60)
    os.kill(consumer.pid, signal.SIGKILL)
    consumer.join(30)
    assert in_flight == list(range(500))

    got_a = drain_group(broker, "a", timeout=120)
    got_b = drain_group(broker, "b", timeout=120)
    assert sorted(body for body, _ in got_a) == list(range(published))
    assert [body for body, _ in got_b] == list(range(published))
    assert sorted(body for body, attempts in got_a if attempts == 2) \
        == in_flight
    assert all(attempts == 1 for _, attempts in got_b)
    stats = broker.stats("t")
    assert stats["stored"] == 0
    assert stats["in_flight"] == 0
    assert stats["acked"] == 2 * published
    assert "t" in broker.backend._core_paths
    broker.close()
