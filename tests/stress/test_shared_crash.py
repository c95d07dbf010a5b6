"""Crash tests of mqs.SharedQueue: processes killed or stopped mid-way.

Three kinds of test:

- Random-time SIGKILL of producer (and of consumer) processes while the
  others run. Messages of the processes that survive must arrive exactly
  once and in order. A killed producer's messages arrive at most once
  and intact, and all of those it published before it died arrive.
- Failpoints (csrc/mqs_failpoint.h): a copy of the package built once per
  session with MQS_FAILPOINTS=1 (conftest.py), run by child interpreters with
  MQS_FAILPOINT set, dies exactly at a named step of a put or a take.
- Delayed delivery: a consumer killed while it holds the delay lock,
  moving due messages into the ring, and a producer killed inside a
  delayed put. The next process repairs the delayed area; nothing
  accepted is lost.
- A producer stopped between claim and publish (failpoint stop mode): a
  reader waits for it, logs a WARNING, never repairs its record, and
  gets the message once the producer continues.

MQS_TEST_SCALE (default 1, sized for CI on 2 cores) multiplies the
number of random kills and the messages of the surviving producers.
"""

import logging
import multiprocessing
import os
import queue
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import zlib
from collections import Counter
from pathlib import Path

import pytest
import shared_workers
from durable_helpers import communicate
from shared_workers import (
    BAD_BODY,
    HEADER,
    make_message,
    read_records,
    sequences_of,
    stop_message,
)

from mqs.shared import SharedQueue

pytestmark = pytest.mark.stress

SEED = 11
CHILD_TIMEOUT_S = 60
PUT_FAILPOINTS = ["put_after_cas", "put_after_claim", "put_mid_payload",
                  "put_before_publish"]
# Stall reports come after a reader waited this long (STALL_REPORT_NS in
# src/mqs/_shared.pyx), plus a margin.
STALL_WAIT_S = 6.5


# -- helpers ---------------------------------------------------------------


@pytest.fixture
def shm_name():
    """Return a queue name unique to this test; remove its files after."""
    name = f"test-crash-{uuid.uuid4().hex[:16]}"
    yield name
    for path in Path("/dev/shm").glob(f"mqs.{name}*"):
        path.unlink()


def kill_all(processes):
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(10)


def wait_for_state(pid, state, timeout=30.0):
    """Wait until /proc shows the process in `state` (T: stopped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] == state:
                return
        time.sleep(0.01)
    pytest.fail(f"process {pid} did not reach state {state} in {timeout} s")


def kill_when_stopped(victim):
    """Wait until `victim` stops at its failpoint, kill it with SIGKILL
    and check that the signal ended it."""
    try:
        wait_for_state(victim.pid, "T")
        os.kill(victim.pid, signal.SIGKILL)
        status, _, stderr = communicate(victim)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait(10)
    assert status == -signal.SIGKILL, stderr


def message_length(producer, sequence, max_body):
    """Length of the message that make_message builds for that sequence."""
    rng = random.Random(SEED * 1000003 + producer)
    for seq in range(sequence + 1):
        message = make_message(producer, seq, rng, max_body)
    return len(message)


def drain(q, expected_count, poll):
    """Get expected_count messages (polling or blocking), then check that
    nothing else is queued; return (producer, sequence) pairs."""
    got = []
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while len(got) < expected_count and time.monotonic() < deadline:
        try:
            message = q.get_nowait() if poll else q.get(timeout=1)
        except queue.Empty:
            continue
        producer, sequence, crc = HEADER.unpack_from(message)
        assert zlib.crc32(message[HEADER.size:]) == crc
        got.append((producer, sequence))
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)
    return got


# -- random-time kills -------------------------------------------------------


def test_random_producer_kills_keep_survivors_exact(scale):
    survivors = 2
    # Enough messages that the survivors run through all the kills.
    per_survivor = int(50_000 * scale)
    kills = max(5, int(20 * scale))
    rng = random.Random(SEED)
    q = SharedQueue(capacity_bytes=1 << 20)
    context = multiprocessing.get_context("fork")
    pipes = [context.Pipe(duplex=False) for _ in range(2)]
    consumers = [context.Process(target=shared_workers.consume_into_pipe,
                                 args=(q, send_end)) for _, send_end in pipes]
    producers = [
        context.Process(target=shared_workers.produce,
                        args=(q, p, per_survivor, SEED, 4096))
        for p in range(survivors)
    ]
    victims = []
    try:
        for process in consumers + producers:
            process.start()

        # Each victim puts large messages (longer copies between claim and
        # publish) until it is killed after a random delay.
        for k in range(kills):
            victim = context.Process(
                target=shared_workers.produce,
                args=(q, 100 + k, 10**9, SEED, 32 * 1024))
            victim.start()
            victims.append(victim)
            time.sleep(rng.uniform(0.0, 0.05))
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(CHILD_TIMEOUT_S)
            assert victim.exitcode == -signal.SIGKILL

        for process in producers:
            process.join(CHILD_TIMEOUT_S * max(1.0, scale))
        assert [p.exitcode for p in producers] == [0] * survivors
        for _ in consumers:
            q.put(stop_message(), timeout=30)
        reports = []
        for receive_end, _ in pipes:
            assert receive_end.poll(CHILD_TIMEOUT_S), "a consumer hung"
            reports.append(receive_end.recv())
        for process in consumers:
            process.join(CHILD_TIMEOUT_S)
    finally:
        kill_all(consumers + producers + victims)

    assert [r.get("failure") for r in reports] == [None, None]
    assert sum(r["error_count"] for r in reports) == 0, [
        e for r in reports for e in r["errors"]]
    received = {}
    for report in reports:
        for producer, numbers in sequences_of(report).items():
            received.setdefault(producer, []).extend(numbers)
    for producer in range(survivors):
        assert sorted(received.get(producer, [])) == list(range(per_survivor))
    for k in range(kills):
        got = sorted(received.get(100 + k, []))
        # Published messages all arrive, so a victim's are 0..n-1.
        assert got == list(range(len(got))), f"victim {k}"
    stats = q.stats()
    assert stats.repaired_records <= kills
    assert stats.lost_records == 0
    assert stats.depth == 0
    q.put(b"still works")
    assert q.get(timeout=5) == b"still works"
    q.close()


def test_random_consumer_kills_lose_at_most_one_message_each(scale):
    per_producer = int(15_000 * scale)
    kills = max(5, int(15 * scale))
    rng = random.Random(SEED + 1)
    # A small ring, so producers wrap onto the pins dead consumers left.
    q = SharedQueue(capacity_bytes=1 << 16)
    context = multiprocessing.get_context("fork")
    receive_end, send_end = context.Pipe(duplex=False)
    survivor = context.Process(target=shared_workers.consume_into_pipe,
                               args=(q, send_end))
    producers = [
        context.Process(target=shared_workers.produce,
                        args=(q, p, per_producer, SEED, 1024))
        for p in range(2)
    ]
    victims = []
    victim_records = []
    try:
        for process in [survivor] + producers:
            process.start()
        for _ in range(kills):
            read_fd, write_fd = os.pipe()
            victim = context.Process(target=shared_workers.consume_to_fd,
                                     args=(q, write_fd))
            victim.start()
            os.close(write_fd)
            victims.append(victim)
            time.sleep(rng.uniform(0.0, 0.05))
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(CHILD_TIMEOUT_S)
            assert victim.exitcode == -signal.SIGKILL
            victim_records.append(read_records(read_fd))
            os.close(read_fd)
        for process in producers:
            process.join(CHILD_TIMEOUT_S * max(1.0, scale))
        assert [p.exitcode for p in producers] == [0, 0]
        q.put(stop_message(), timeout=30)
        assert receive_end.poll(CHILD_TIMEOUT_S), "the consumer hung"
        report = receive_end.recv()
        survivor.join(CHILD_TIMEOUT_S)
    finally:
        kill_all([survivor] + producers + victims)

    assert report.get("failure") is None
    assert report["error_count"] == 0, report["errors"]
    counts = Counter()
    for producer, numbers in sequences_of(report).items():
        counts.update((producer, n) for n in numbers)
    for records in victim_records:
        assert [r for r in records if r[0] == BAD_BODY] == []
        for producer in (0, 1):
            numbers = [n for p, n in records if p == producer]
            assert numbers == sorted(numbers)
        counts.update(records)
    duplicates = [key for key, count in counts.items() if count > 1]
    assert duplicates == []
    expected = {(p, n) for p in (0, 1) for n in range(per_producer)}
    assert set(counts) <= expected
    missing = len(expected - set(counts))
    assert missing <= kills
    stats = q.stats()
    assert stats.lost_records <= kills
    assert stats.depth == 0
    q.put(b"still works")
    assert q.get(timeout=5) == b"still works"
    q.close()


def _churn_puts(q):
    while True:
        try:
            q.put(b"p" * 200, timeout=0.01)
        except queue.Full:
            pass


def _churn_gets(q):
    while True:
        try:
            q.get(timeout=0.01)
        except queue.Empty:
            pass


def test_random_kills_leave_bounded_counts_exact(scale):
    """SIGKILL producers and consumers of a bounded queue at random
    instructions. Afterwards qsize matches what a drain finds, and the
    queue takes exactly maxsize messages again."""
    maxsize = 8
    rounds = max(10, int(30 * scale))
    rng = random.Random(SEED + 2)
    q = SharedQueue(maxsize, capacity_bytes=1 << 16)
    context = multiprocessing.get_context("fork")
    for _ in range(rounds):
        workers = [context.Process(target=target, args=(q,))
                   for target in (_churn_puts, _churn_puts, _churn_gets,
                                  _churn_gets)]
        try:
            for worker in workers:
                worker.start()
            time.sleep(rng.uniform(0.005, 0.05))
        finally:
            for worker in workers:
                os.kill(worker.pid, signal.SIGKILL)
            for worker in workers:
                worker.join(CHILD_TIMEOUT_S)
        assert [w.exitcode for w in workers] == [-signal.SIGKILL] * 4
        size = q.qsize()
        assert 0 <= size <= maxsize
        drained = 0
        while True:
            try:
                assert q.get_nowait() == b"p" * 200
            except queue.Empty:
                break
            drained += 1
        assert drained == size
        assert q.qsize() == 0
        for _ in range(maxsize):
            q.put_nowait(b"p" * 200)
        with pytest.raises(queue.Full):
            q.put_nowait(b"p" * 200)
        assert q.qsize() == maxsize
    stats = q.stats()
    assert stats.depth == maxsize
    q.close()


# -- failpoints -----------------------------------------------------------------


def start_child(failpoint_path, code, failpoint=None):
    """Start `code` in a child interpreter that imports the failpoint copy."""
    env = {**os.environ, "PYTHONPATH": failpoint_path}
    env.pop("MQS_FAILPOINT", None)
    if failpoint is not None:
        env["MQS_FAILPOINT"] = failpoint
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def produce_code(name, producer, count, max_body):
    return f"""
        import shared_workers
        shared_workers.produce_main({name!r}, {producer}, {count},
                                    {SEED}, {max_body})
    """


def test_failpoint_copy_is_the_one_children_import(failpoint_path):
    proc = start_child(failpoint_path, """
        import mqs._shared
        print(mqs._shared.__file__)
    """)
    status, stdout, stderr = communicate(proc)
    assert status == 0, stderr
    assert stdout.startswith(failpoint_path.split(os.pathsep)[0])


@pytest.mark.parametrize("poll", [False, True], ids=["get", "get_nowait"])
@pytest.mark.parametrize("failpoint", PUT_FAILPOINTS)
def test_producer_killed_at_failpoint_is_repaired(failpoint_path, shm_name,
                                                  caplog, failpoint, poll):
    q = SharedQueue(name=shm_name, capacity_bytes=1 << 16)
    # This second handle attaches before the victim, so no process takes
    # the dead victim's slot later: the reader itself must repair.
    writer = SharedQueue(name=shm_name, create=False)
    # The victim (producer 1) dies during its 5th put, sequence 4.
    victim = start_child(failpoint_path,
                         produce_code(shm_name, 1, 10, 256),
                         failpoint=f"{failpoint}:5")
    status, stdout, stderr = communicate(victim)
    assert status == -signal.SIGKILL, stderr
    assert stdout == ""
    # The surviving producer puts behind the unfinished record.
    shared_workers.produce(writer, 2, 100, SEED, 256)
    with caplog.at_level(logging.WARNING, logger="mqs._shared"):
        # qsize repairs the dead claim first, so it never counts it.
        assert q.qsize() == 4 + 100
        assert q.stats().repaired_records == 1
        got = drain(q, 4 + 100, poll)

    assert [n for p, n in got if p == 1] == [0, 1, 2, 3]
    assert [n for p, n in got if p == 2] == list(range(100))
    stats = q.stats()
    assert stats.repaired_records == 1
    assert stats.repaired_bytes == (
        16 + message_length(1, 4, 256) + 15) // 16 * 16
    assert stats.depth == 0
    assert "turned 1 unpublished record(s) of dead producer(s) into " \
           "padding" in caplog.text
    writer.put(b"still works")
    assert q.get(timeout=5) == b"still works"
    writer.close()
    q.close()


@pytest.mark.parametrize("strategy", ["block", "spin", "yield"])
def test_blocked_get_repairs_dead_producer_record(failpoint_path, shm_name,
                                                  strategy):
    q = SharedQueue(name=shm_name, capacity_bytes=1 << 16,
                    wait_strategy=strategy)
    writer = SharedQueue(name=shm_name, create=False)
    # The victim dies in its first put, after the claim and before the
    # commit, so the head record stays unpublished.
    victim = start_child(failpoint_path,
                         produce_code(shm_name, 1, 10, 256),
                         failpoint="put_before_publish:1")
    status, stdout, stderr = communicate(victim)
    assert status == -signal.SIGKILL, stderr
    writer.put(b"behind the dead record")
    assert q.get(timeout=30) == b"behind the dead record"
    assert q.stats().repaired_records == 1
    writer.close()
    q.close()


def test_process_taking_dead_producer_slot_repairs_it(failpoint_path,
                                                      shm_name):
    q = SharedQueue(name=shm_name, capacity_bytes=1 << 16)
    victim = start_child(failpoint_path,
                         produce_code(shm_name, 1, 10, 256),
                         failpoint="put_before_publish:3")
    status, _, stderr = communicate(victim)
    assert status == -signal.SIGKILL, stderr
    # (No qsize here: it would repair the dead claim itself.)
    # The next process to attach gets the lowest free slot, the victim's.
    survivor = start_child(failpoint_path,
                           produce_code(shm_name, 2, 50, 256))
    status, stdout, stderr = communicate(survivor)
    assert status == 0, stderr
    assert stdout == "50\n"
    assert "turned 1 unpublished record(s) of dead producer(s) into " \
           "padding" in stderr
    assert q.stats().repaired_records == 1
    assert q.qsize() == 2 + 50
    got = drain(q, 2 + 50, poll=True)
    assert [n for p, n in got if p == 1] == [0, 1]
    assert [n for p, n in got if p == 2] == list(range(50))
    q.close()


def test_consumer_killed_after_take_loses_only_its_record(failpoint_path,
                                                          shm_name):
    # 8 KiB ring: 64 records of 128 bytes, so the puts below wrap onto
    # the pin the dead consumer left.
    q = SharedQueue(name=shm_name, capacity_bytes=8192)
    for n in range(20):
        q.put(n.to_bytes(4, "little") + bytes(108))
    victim = start_child(failpoint_path, f"""
        import mqs
        q = mqs.SharedQueue(name={shm_name!r}, create=False)
        while True:
            message = q.get(timeout=30)
            print(int.from_bytes(message[:4], "little"), flush=True)
    """, failpoint="take_after_cas:5")
    status, stdout, stderr = communicate(victim)
    assert status == -signal.SIGKILL, stderr
    assert stdout.split() == ["0", "1", "2", "3"]

    # Records 4 (taken, still pinned) to 19 hold 16 of the 64 places.
    # The 49th put_nowait needs the pinned record's bytes: it must drop
    # the dead consumer's pin instead of raising Full.
    assert q.qsize() == 15
    for n in range(20, 69):
        q.put_nowait(n.to_bytes(4, "little") + bytes(108))
    assert q.qsize() == 64
    assert q.stats().lost_records == 1

    # Another consumer process takes the rest while this one puts more.
    consumer = start_child(failpoint_path, f"""
        import mqs
        q = mqs.SharedQueue(name={shm_name!r}, create=False)
        for _ in range(64 + 251):
            message = q.get(timeout=30)
            print(int.from_bytes(message[:4], "little"), flush=True)
    """)
    for n in range(69, 320):
        q.put(n.to_bytes(4, "little") + bytes(108), timeout=30)
    status, stdout, stderr = communicate(consumer)
    assert status == 0, stderr
    assert [int(s) for s in stdout.split()] == list(range(5, 320))
    stats = q.stats()
    assert stats.lost_records == 1
    assert stats.repaired_records == 0
    assert stats.depth == 0
    q.close()


@pytest.mark.parametrize("take", ["get", "get_view"])
def test_killed_mid_take_counts_consumer_died(failpoint_path, shm_name,
                                              take):
    """Stop a consumer between its take's CAS and the return (the record
    is off the queue, the caller has nothing yet), SIGKILL it by PID:
    one message counts as consumer_died, for a view as for a copy."""
    q = SharedQueue(name=shm_name, capacity_bytes=8192)
    for n in range(5):
        q.put(n.to_bytes(4, "little") + bytes(108))
    victim = start_child(failpoint_path, f"""
        import mqs
        q = mqs.SharedQueue(name={shm_name!r}, create=False)
        if {take!r} == "get":
            q.get(timeout=30)
        else:
            with q.get_view(timeout=30):
                pass
    """, failpoint="take_after_cas:1:stop")
    kill_when_stopped(victim)

    assert q.stats().dropped["consumer_died"] == 1
    got = [int.from_bytes(q.get(timeout=5)[:4], "little") for _ in range(4)]
    assert got == [1, 2, 3, 4]
    for n in range(5, 200):
        q.put_nowait(n.to_bytes(4, "little") + bytes(108))
        assert int.from_bytes(q.get_nowait()[:4], "little") == n
    with pytest.raises(queue.Empty):
        q.get_nowait()
    assert q.stats().dropped["consumer_died"] == 1
    q.close()


def batch_message(n, kind):
    """Message n of a 128-byte record: raw bytes, or a pickled tuple."""
    if kind == "bytes":
        return n.to_bytes(4, "little") + bytes(108)
    return (n, bytes(80))


def batch_number(message, kind):
    if kind == "bytes":
        return int.from_bytes(message[:4], "little")
    return message[0]


@pytest.mark.parametrize("call, kind, failpoint, taken, lost", [
    # The first message of a batch: taken, under the get pin.
    ("get_many", "bytes", "take_after_cas:1:stop", 1, 1),
    # Five copies unpinned, the sixth taken and still pinned.
    ("get_many", "bytes", "take_after_cas:6:stop", 6, 6),
    # Six copies unpinned, none returned to the caller.
    ("get_many", "bytes", "unpin_after_drop:6:stop", 6, 6),
    ("get_many", "pickle", "unpin_after_drop:6:stop", 6, 6),
    # A plain get after its pin drop, before it deserializes the message.
    ("get", "pickle", "unpin_after_drop:1:stop", 1, 1),
    # The same for raw bytes: the documented uncounted window.
    ("get", "bytes", "unpin_after_drop:1:stop", 1, 0),
])
def test_killed_mid_batch_counts_consumer_died(failpoint_path, shm_name,
                                               call, kind, failpoint,
                                               taken, lost):
    """Stop a consumer inside get_many (or get) at a failpoint, SIGKILL
    it by PID: the messages it took count as consumer_died, exactly
    once, except in the window that get documents for raw bytes, and
    every other message arrives exactly once."""
    q = SharedQueue(name=shm_name, capacity_bytes=8192)
    for n in range(20):
        q.put(batch_message(n, kind))
    victim = start_child(failpoint_path, f"""
        import mqs
        q = mqs.SharedQueue(name={shm_name!r}, create=False)
        if {call!r} == "get":
            q.get(timeout=30)
        else:
            q.get_many(100, timeout=30)
    """, failpoint=failpoint)
    kill_when_stopped(victim)

    assert q.stats().dropped["consumer_died"] == lost
    got = [batch_number(m, kind) for m in q.get_many(100)]
    assert got == list(range(taken, 20))
    # The 8 KiB ring wraps more than twice over the dead consumer's
    # bytes.
    for n in range(20, 200):
        q.put_nowait(batch_message(n, kind))
        assert batch_number(q.get_nowait(), kind) == n
    with pytest.raises(queue.Empty):
        q.get_nowait()
    assert q.stats().dropped["consumer_died"] == lost
    q.close()


# -- stalled producers --------------------------------------------------------


class RecordingHandler(logging.Handler):
    """Logging handler that stores every record it receives, from any
    thread."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def text_about(self, name):
        """Return the messages that contain queue name `name`, one per line."""
        messages = [record.getMessage() for record in self.records]
        return "\n".join(m for m in messages if repr(name) in m)


def observe_stalled_producer(failpoint_path, failpoint, name, handler):
    """Stop producer 1 at `failpoint` in its 3rd put, on new queue `name`,
    and record what a reader of the queue observes while it waits and
    after the producer continues. Returns a dict of the observations."""
    seen = {}
    q = SharedQueue(name=name, capacity_bytes=1 << 16)
    stalled = start_child(failpoint_path, produce_code(name, 1, 5, 512),
                          failpoint=f"{failpoint}:3:stop")
    try:
        wait_for_state(stalled.pid, "T")
        seen["pid"] = stalled.pid
        survivor = start_child(failpoint_path, produce_code(name, 2, 50, 512))
        seen["survivor"] = communicate(survivor)

        seen["first"] = [HEADER.unpack_from(q.get(timeout=5))[:2]
                         for _ in range(2)]
        start = time.monotonic()
        try:
            q.get(timeout=STALL_WAIT_S)
            seen["stalled_get"] = "returned a message"
        except queue.Empty:
            seen["stalled_get"] = "Empty"
        seen["waited_s"] = time.monotonic() - start
        seen["alive_after_wait"] = stalled.poll() is None
        seen["repaired_in_stall"] = q.stats().repaired_records
        seen["log"] = handler.text_about(name)

        stalled.send_signal(signal.SIGCONT)
        seen["stalled"] = communicate(stalled)
    finally:
        if stalled.poll() is None:
            stalled.kill()
            stalled.communicate()
    seen["got"] = drain(q, 3 + 50, poll=False)
    seen["repaired_after"] = q.stats().repaired_records
    q.close()
    return seen


@pytest.fixture(scope="module")
def stalled_producer_runs(failpoint_path):
    """Run observe_stalled_producer for each of PUT_FAILPOINTS at once, in
    threads on queues of their own. Returns {failpoint: the dict of
    observations, or the exception that ended the run}.

    A stall is reported only after the head was stuck for 5 s, so four
    runs one after the other took 29 s. A blocked get releases the GIL,
    so the threads wait out their stalls together.
    """
    handler = RecordingHandler()
    logger = logging.getLogger("mqs._shared")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    names = {failpoint: f"test-stall-{uuid.uuid4().hex[:16]}"
             for failpoint in PUT_FAILPOINTS}
    results = {}

    def run(failpoint):
        try:
            results[failpoint] = observe_stalled_producer(
                failpoint_path, failpoint, names[failpoint], handler)
        except BaseException as exc:  # pytest.fail raises a BaseException subclass
            results[failpoint] = exc

    threads = [threading.Thread(target=run, args=(failpoint,))
               for failpoint in PUT_FAILPOINTS]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(4 * CHILD_TIMEOUT_S)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        for name in names.values():
            for path in Path("/dev/shm").glob(f"mqs.{name}*"):
                path.unlink()
    assert not [thread for thread in threads if thread.is_alive()]
    return results


@pytest.mark.parametrize("failpoint", PUT_FAILPOINTS)
def test_stalled_producer_is_waited_for_and_reported(stalled_producer_runs,
                                                     failpoint):
    seen = stalled_producer_runs[failpoint]
    if isinstance(seen, BaseException):
        raise seen
    status, _, stderr = seen["survivor"]
    assert status == 0, stderr
    assert seen["first"] == [(1, 0), (1, 1)]
    assert seen["stalled_get"] == "Empty"
    assert seen["waited_s"] >= STALL_WAIT_S
    assert seen["alive_after_wait"]
    assert seen["repaired_in_stall"] == 0
    assert re.search(rf"waiting \d+\.\d s for a live producer "
                     rf"\(pid {seen['pid']}, slot \d+\) to publish a "
                     rf"record it claimed", seen["log"])
    assert "into padding" not in seen["log"]

    status, stdout, stderr = seen["stalled"]
    assert status == 0, stderr
    assert stdout == "5\n"
    got = seen["got"]
    assert [n for p, n in got if p == 1] == [2, 3, 4]
    assert [n for p, n in got if p == 2] == list(range(50))
    assert seen["repaired_after"] == 0


def wait_out_stall(q, seconds, poll_timeout):
    """Call get(timeout=poll_timeout) for `seconds`; every call must find
    nothing, since a stalled record blocks the head."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with pytest.raises(queue.Empty):
            q.get(timeout=poll_timeout)


def test_each_stall_is_reported_to_polling_reader(failpoint_path, shm_name,
                                                  caplog):
    q = SharedQueue(name=shm_name, capacity_bytes=1 << 16)
    report = re.compile(r"waiting \d+\.\d s for a live producer \(pid "
                        r"(\d+), slot \d+\)")
    for round_number in range(2):
        stalled = start_child(failpoint_path,
                              produce_code(shm_name, round_number, 3, 64),
                              failpoint="put_before_publish:2:stop")
        try:
            wait_for_state(stalled.pid, "T")
            assert HEADER.unpack_from(q.get(timeout=5))[:2] == (
                round_number, 0)
            caplog.clear()
            # Short timeouts: no single call waits the 5 s after which a
            # stall is reported, but the stall lasts longer than that.
            with caplog.at_level(logging.WARNING, logger="mqs._shared"):
                wait_out_stall(q, STALL_WAIT_S, poll_timeout=0.25)
            assert [int(pid) for pid in report.findall(caplog.text)] == [
                stalled.pid]
            stalled.send_signal(signal.SIGCONT)
            status, _, stderr = communicate(stalled)
        finally:
            if stalled.poll() is None:
                stalled.kill()
                stalled.communicate()
        assert status == 0, stderr
        got = drain(q, 2, poll=False)
        assert got == [(round_number, 1), (round_number, 2)]
    assert q.stats().repaired_records == 0
    q.close()


# -- delayed delivery ----------------------------------------------------


def delayed_consume_code(name):
    return f"""
        from mqs.shared import SharedQueue
        q = SharedQueue(name={name!r}, create=False)
        print(q.get(timeout=30))
    """


@pytest.mark.parametrize("failpoint", ["delay_before_move",
                                       "delay_after_move"])
def test_consumer_killed_holding_delay_lock_loses_nothing(
        failpoint_path, shm_name, caplog, failpoint):
    count = 20
    q = SharedQueue(name=shm_name, capacity_bytes=1 << 16)
    for n in range(count):
        q.put(n.to_bytes(4, "little"), delay=0.2 + n * 0.001)
    # The victim's get moves the due messages; it dies holding the lock
    # before (or right after) putting the first one into the ring.
    victim = start_child(failpoint_path, delayed_consume_code(shm_name),
                         failpoint=failpoint)
    status, stdout, stderr = communicate(victim)
    assert status == -signal.SIGKILL, stderr
    assert stdout == ""

    with caplog.at_level(logging.WARNING, logger="mqs._shared"):
        got = []
        while True:
            try:
                got.append(int.from_bytes(q.get(timeout=1), "little"))
            except queue.Empty:
                break
    # Every message arrives once; the one the victim had already
    # published when it died arrives a second time.
    duplicates = 1 if failpoint == "delay_after_move" else 0
    assert sorted(set(got)) == list(range(count))
    assert len(got) == count + duplicates
    assert sorted(got) == got
    stats = q.delayed_stats()
    assert stats["delayed"] == 0
    assert q.stats().delayed == 0
    assert stats["repairs"] == 1
    assert stats["dropped"] == 0
    assert "a process died holding the delayed area's lock; rebuilt " \
           "the area" in caplog.text
    q.put(b"later", delay=0.01)
    assert q.get(timeout=5) == b"later"
    q.close()


def test_producer_killed_in_delayed_put_loses_only_its_message(
        failpoint_path, shm_name):
    q = SharedQueue(name=shm_name, capacity_bytes=1 << 16)
    q.put(b"before", delay=1.5)
    victim = start_child(failpoint_path, f"""
        from mqs.shared import SharedQueue
        q = SharedQueue(name={shm_name!r}, create=False)
        q.put(b"victim", delay=0.1)
    """, failpoint="delay_put_before_insert")
    status, _, stderr = communicate(victim)
    assert status == -signal.SIGKILL, stderr
    # The lock is not wedged: the next put repairs and goes through.
    q.put(b"after", delay=0.1)
    assert q.get(timeout=5) == b"after"
    assert q.get(timeout=5) == b"before"
    with pytest.raises(queue.Empty):
        q.get(timeout=0.3)
    stats = q.delayed_stats()
    assert stats["repairs"] == 1
    assert stats["dropped"] == 1
    q.close()
