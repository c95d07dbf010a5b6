"""Delayed delivery of mqs.SharedQueue: put(delay=, at=) across processes.

Times are compared across processes on CLOCK_MONOTONIC (time.monotonic),
which every process on the machine shares. Lower bounds ("never early")
are exact; upper bounds are generous, because the 2-core CI machine is
shared with other jobs.
"""

import datetime
import math
import os
import queue
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import durable_helpers
import mqs
from mqs.shared import QueueLayoutError, SharedQueue

PAGE = os.sysconf("SC_PAGESIZE")
CHILD_TIMEOUT_S = 120
# A delayed message must arrive within this long after it is due; far
# above one tick (1 ms) because a loaded machine delays any wake-up.
LATE_BOUND_S = 1.0


@pytest.fixture
def shm_name():
    name = f"test-delay-{uuid.uuid4().hex[:16]}"
    yield name
    for path in Path("/dev/shm").glob(f"mqs.{name}*"):
        path.unlink()


def run_child(code):
    """Start `code` in a fresh interpreter; return the Popen."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def finish(proc):
    """Wait for `proc`, check that it exited with status 0, return its
    stdout."""
    return durable_helpers.finish(proc, CHILD_TIMEOUT_S)


# -- one process -----------------------------------------------------------


def test_shared_delay_orders_by_due_time():
    q = SharedQueue(capacity_bytes=1 << 16)
    start = time.monotonic()
    q.put(b"third", delay=0.3)
    q.put(b"first", delay=0.1)
    q.put({"second": 2}, delay=0.2)
    assert q.qsize() == 0
    assert q.delayed == 3
    assert q.get(timeout=5) == b"first"
    assert time.monotonic() - start >= 0.1
    assert q.get(timeout=5) == {"second": 2}
    assert time.monotonic() - start >= 0.2
    assert q.get(timeout=5) == b"third"
    assert time.monotonic() - start >= 0.3
    assert q.delayed == 0
    q.close()


def test_shared_delay_put_many_shares_one_deadline():
    q = SharedQueue(capacity_bytes=1 << 16)
    start = time.monotonic()
    q.put_many([b"a", b"b", b"c"], delay=0.1)
    assert q.delayed == 3
    got = [q.get(timeout=5) for _ in range(3)]
    assert got == [b"a", b"b", b"c"]
    assert time.monotonic() - start >= 0.1
    q.close()


def test_shared_delay_zero_is_ready_at_once():
    q = SharedQueue(capacity_bytes=1 << 16)
    q.put(b"now", delay=0)
    assert q.delayed == 0
    assert q.get_nowait() == b"now"
    q.put(b"past", at=time.time() - 60)
    assert q.get_nowait() == b"past"
    q.close()


def test_shared_delay_never_early_when_polled():
    q = SharedQueue(capacity_bytes=1 << 16)
    due = time.monotonic() + 0.2
    q.put(b"x", delay=0.2)
    while True:
        try:
            item = q.get_nowait()
        except queue.Empty:
            continue
        assert time.monotonic() >= due
        assert item == b"x"
        break
    q.close()


def test_shared_delay_blocked_get_wakes_without_producer():
    q = SharedQueue(capacity_bytes=1 << 16)
    q.put(b"x", delay=0.2)
    start = time.monotonic()
    # The getter parks until the message is due; no other process runs.
    assert q.get(timeout=30) == b"x"
    elapsed = time.monotonic() - start
    assert elapsed >= 0.2 - 0.001
    assert elapsed < 0.2 + LATE_BOUND_S
    q.close()


@pytest.mark.parametrize("strategy", ["block", "spin", "yield"])
@pytest.mark.parametrize("delay", [1e-5, 0.05])
def test_shared_delay_blocked_get_wakes_for_each_strategy(strategy, delay):
    # 10 us is due within the spin window of a "spin" get, 50 ms after it.
    q = SharedQueue(capacity_bytes=1 << 16, wait_strategy=strategy)
    due = time.monotonic() + delay
    q.put(b"x", delay=delay)
    assert q.get(timeout=30) == b"x"
    assert time.monotonic() >= due
    assert q.delayed == 0
    q.close()


def test_shared_delay_get_timeout_before_due_raises_empty():
    q = SharedQueue(capacity_bytes=1 << 16)
    q.put(b"x", delay=5)
    start = time.monotonic()
    with pytest.raises(mqs.Empty):
        q.get(timeout=0.1)
    assert time.monotonic() - start >= 0.1
    assert q.delayed == 1
    q.close()


def test_shared_delay_maxsize_counts_delayed_messages():
    q = SharedQueue(maxsize=2, capacity_bytes=1 << 16)
    q.put(b"1", delay=60)
    q.put(b"2")
    assert q.full()
    assert q.qsize() == 1
    assert q.delayed == 1
    with pytest.raises(mqs.Full):
        q.put(b"3", timeout=0.05)
    with pytest.raises(mqs.Full):
        q.put(b"3", delay=1, block=False)
    assert q.get_nowait() == b"2"
    q.put(b"3", delay=60)
    assert q.full()
    q.close()


def test_shared_delay_full_area_blocks_then_raises_full():
    q = SharedQueue(capacity_bytes=1 << 16, delayed_capacity_bytes=16384)
    accepted = 0
    while True:
        try:
            q.put_nowait(b"x" * 16, delay=60)
        except mqs.Full:
            break
        accepted += 1
    assert accepted == 35
    start = time.monotonic()
    with pytest.raises(mqs.Full):
        q.put(b"x" * 16, delay=60, timeout=0.1)
    assert time.monotonic() - start >= 0.1
    assert q.delayed_stats()["used_bytes"] == accepted * 96
    q.close()


def test_shared_delay_area_full_put_waits_for_room():
    q = SharedQueue(capacity_bytes=1 << 16, delayed_capacity_bytes=16384)
    # Taken before the first put: its delay runs from there, so a clock
    # read after the puts could see less than 0.2 s pass (CI saw 0.1993).
    start = time.monotonic()
    for i in range(35):
        q.put(b"%d" % i, delay=0.2 if i == 0 else 60)
    # Room appears once a get moves the first message into the ring.
    with pytest.raises(mqs.Full):
        q.put(b"late", delay=60, block=False)
    assert q.get(timeout=5) == b"0"
    q.put(b"late", delay=60, timeout=5)
    assert time.monotonic() - start >= 0.2
    q.close()


def test_shared_delay_reaches_get_view_and_get_many():
    q = SharedQueue(capacity_bytes=1 << 16)
    q.put(b"view", delay=0.05)
    with q.get_view(timeout=5) as view:
        assert bytes(view) == b"view"
    q.put_many([b"a", b"b"], delay=0.05)
    assert q.get_many(5, timeout=5) in ([b"a", b"b"], [b"a"])
    q.close()


def test_shared_delay_bytes_per_message_in_stats():
    q = SharedQueue(capacity_bytes=1 << 16)
    q.put(b"x" * 32, delay=60)
    assert q.delayed_stats()["used_bytes"] == 96
    q.put(b"x" * 100, delay=60)
    assert q.delayed_stats()["used_bytes"] == 96 + 192
    assert q.delayed_stats()["delayed"] == 2
    assert q.stats().delayed == 2
    q.close()


# -- bad input -------------------------------------------------------------


@pytest.mark.parametrize(("value", "error", "message"), [
    (-1, ValueError, (r"delayed_capacity_bytes must be 0 \(no delayed "
                     r"messages\) or 16384 to 2\*\*40, got -1")),
    (100, ValueError, (r"delayed_capacity_bytes must be 0 \(no delayed "
                      r"messages\) or 16384 to 2\*\*40, got 100")),
    (1.5, TypeError, r"delayed_capacity_bytes must be an int, got float 1.5"),
])
def test_shared_delay_rejects_bad_capacity(value, error, message):
    with pytest.raises(error, match=message):
        SharedQueue(capacity_bytes=PAGE, delayed_capacity_bytes=value)


def test_shared_delay_rounds_capacity_up_to_pages():
    q = SharedQueue(capacity_bytes=PAGE, delayed_capacity_bytes=16385)
    assert q.delayed_capacity_bytes == -(-16385 // PAGE) * PAGE
    q.close()


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"delay": math.nan}, ValueError,
     r"delay must be a finite number of seconds >= 0, got nan"),
    ({"delay": -1}, ValueError,
     r"delay must be a finite number of seconds >= 0, got -1"),
    ({"delay": "1"}, TypeError, r"delay must be a number of seconds, got str '1'"),
    ({"at": "tomorrow"}, TypeError,
     r"at must be a datetime or epoch seconds, got str 'tomorrow'"),
    ({"at": math.inf}, ValueError,
     r"at must be a finite epoch time in seconds, got inf"),
    ({"delay": 1, "at": 2}, ValueError,
     r"pass delay or at, not both \(got delay=1, at=2\)"),
    ({"delay": 1e300}, ValueError,
     r"delay must be at most mqs.MAX_DELAY_SECONDS = 315576000 seconds "
     r"\(10 years\), got 1e\+300"),
    ({"at": 1e300}, ValueError,
     r"at must be at most .* \(10 years\) from now, got 1e\+300"),
])
def test_shared_delay_rejects_bad_delay_and_at(kwargs, error, message):
    q = SharedQueue(capacity_bytes=PAGE)
    with pytest.raises(error, match=message):
        q.put(b"x", **kwargs)
    assert q.delayed == 0
    assert q.qsize() == 0
    q.close()


def test_shared_delay_without_area_rejects_delay():
    q = SharedQueue(capacity_bytes=PAGE, delayed_capacity_bytes=0)
    with pytest.raises(ValueError, match=(
            r"has no delayed area \(delayed_capacity_bytes=0\), so it "
            r"cannot take delay= or at=; create it with a "
            r"delayed_capacity_bytes of 16384 to 2\*\*40")):
        q.put(b"x", delay=1)
    q.put(b"now")
    assert q.get_nowait() == b"now"
    q.close()


def test_shared_delay_too_large_names_both_sizes():
    q = SharedQueue(capacity_bytes=1 << 16, delayed_capacity_bytes=16384)
    with pytest.raises(mqs.MessageTooLarge, match=(
            r"message is 5000 bytes and needs 5120 bytes in the delayed "
            r"area, delayed_capacity_bytes is 16384 \(room for a payload of "
            r"\d+ bytes at most\); raise delayed_capacity_bytes")):
        q.put(b"x" * 5000, delay=1)
    q.close()


def test_shared_delay_attach_checks_delayed_capacity(shm_name):
    q = SharedQueue(name=shm_name, capacity_bytes=PAGE,
                    delayed_capacity_bytes=1 << 16)
    with pytest.raises(QueueLayoutError, match=(
            "delayed_capacity_bytes=65536, not 131072")):
        SharedQueue(name=shm_name, create=False,
                    delayed_capacity_bytes=1 << 17)
    other = SharedQueue(name=shm_name, create=False)
    assert other.delayed_capacity_bytes == 1 << 16
    other.close()
    q.close()


# -- wall clock ------------------------------------------------------------


def test_shared_at_converted_once_on_wall_clock_step(monkeypatch):
    q = SharedQueue(capacity_bytes=1 << 16)
    real_time_ns = time.time_ns
    start = time.monotonic()
    q.put(b"at", at=time.time() + 0.3)
    q.put(b"delay", delay=0.4)
    # The wall clock jumps an hour ahead: nothing is released early.
    monkeypatch.setattr(time, "time_ns", lambda: real_time_ns() + 3600 * 10**9)
    with pytest.raises(mqs.Empty):
        q.get(timeout=0.1)
    # And an hour back: nothing is held back either.
    monkeypatch.setattr(time, "time_ns", lambda: real_time_ns() - 3600 * 10**9)
    assert q.get(timeout=5) == b"at"
    assert time.monotonic() - start >= 0.3
    assert q.get(timeout=5) == b"delay"
    elapsed = time.monotonic() - start
    assert 0.4 <= elapsed < 0.4 + LATE_BOUND_S
    q.close()


def test_shared_at_reads_wall_clock_when_put(monkeypatch):
    q = SharedQueue(capacity_bytes=1 << 16)
    real_time_ns = time.time_ns
    # With the wall clock an hour ahead, at= an hour and 0.2 s ahead of
    # the real time is 0.2 s away; delay= does not look at it.
    monkeypatch.setattr(time, "time_ns", lambda: real_time_ns() + 3600 * 10**9)
    start = time.monotonic()
    q.put(b"at", at=datetime.datetime.fromtimestamp(
        real_time_ns() / 1e9 + 3600.2, tz=datetime.timezone.utc))
    q.put(b"delay", delay=0.3)
    assert q.get(timeout=5) == b"at"
    assert 0.2 <= time.monotonic() - start < 0.2 + LATE_BOUND_S
    assert q.get(timeout=5) == b"delay"
    assert time.monotonic() - start >= 0.3
    q.close()


# -- across processes ------------------------------------------------------


def test_shared_delay_survives_producer_exit(shm_name):
    q = SharedQueue(name=shm_name, capacity_bytes=1 << 16)
    producer = run_child(f"""
        import time
        from mqs.shared import SharedQueue
        q = SharedQueue(name={shm_name!r}, create=False)
        q.put(b"from A", delay=2)
        print(time.monotonic())
        q.close()
    """)
    put_at = float(finish(producer))
    # A has exited; its message waits in the mapping only.
    assert q.delayed == 1
    consumer = run_child(f"""
        import time
        from mqs.shared import SharedQueue
        q = SharedQueue(name={shm_name!r}, create=False)
        item = q.get(timeout=60)
        print(time.monotonic(), item.decode())
    """)
    got_at, item = finish(consumer).strip().split(maxsplit=1)
    assert item == "from A"
    assert float(got_at) - put_at >= 2.0
    assert float(got_at) - put_at < 2.0 + LATE_BOUND_S + 1.0
    q.close()


def test_shared_delay_many_processes_exactly_once(shm_name, scale):
    producers, consumers = 3, 2
    per_producer = max(50, int(400 * scale))
    q = SharedQueue(name=shm_name, capacity_bytes=1 << 16,
                    delayed_capacity_bytes=1 << 20)
    producer_code = """
        import random, struct, time
        from mqs.shared import SharedQueue
        item = struct.Struct("<qd")
        q = SharedQueue(name={name!r}, create=False)
        rng = random.Random({p})
        for i in range({n}):
            delay = rng.choice([0.0, rng.uniform(0, 0.5)])
            due = time.monotonic() + delay
            q.put(item.pack({p} * 1_000_000 + i, due), delay=delay,
                  timeout=60)
        q.close()
    """
    consumer_code = """
        import struct, time
        from mqs.shared import SharedQueue
        item = struct.Struct("<qd")
        q = SharedQueue(name={name!r}, create=False)
        while True:
            data = q.get(timeout=60)
            if data == b"stop":
                break
            now = time.monotonic()
            ident, due = item.unpack(data)
            print(ident, now - due)
    """
    running = [run_child(consumer_code.format(name=shm_name))
               for _ in range(consumers)]
    makers = [run_child(producer_code.format(name=shm_name, p=p,
                                             n=per_producer))
              for p in range(producers)]
    for proc in makers:
        finish(proc)
    deadline = time.monotonic() + 60
    while q.delayed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert q.delayed == 0
    for _ in running:
        q.put(b"stop", timeout=30)
    seen = []
    for proc in running:
        for line in finish(proc).split("\n"):
            if line:
                ident, lateness = line.split()
                seen.append(int(ident))
                # Never before it is due.
                assert float(lateness) >= 0, line
    expected = sorted(p * 1_000_000 + i for p in range(producers)
                      for i in range(per_producer))
    assert sorted(seen) == expected
    q.close()


def test_shared_delay_million_waiting_keep_consumer_heap_flat(shm_name,
                                                               scale):
    count = max(10_000, int(20_000 * scale))
    q = SharedQueue(name=shm_name, capacity_bytes=1 << 16,
                    delayed_capacity_bytes=count * 96 + (1 << 20))
    consumer = run_child(f"""
        import sys, tracemalloc
        import mqs
        from mqs.shared import SharedQueue
        q = SharedQueue(name={shm_name!r}, create=False)
        tracemalloc.start()
        # Warm up the calls measured below.
        for _ in range(3):
            try:
                q.get(timeout=0.001)
            except mqs.Empty:
                pass
            q.qsize(), q.delayed, q.stats()
        before = tracemalloc.get_traced_memory()[0]
        print("ready", flush=True)
        sys.stdin.readline()
        for _ in range(1000):
            try:
                q.get(timeout=0.001)
            except mqs.Empty:
                pass
            q.qsize(), q.delayed, q.stats()
        after, peak = tracemalloc.get_traced_memory()
        print(q.delayed, after - before, peak - before)
    """)
    assert consumer.stdout.readline().strip() == "ready"
    payload = b"x" * 16
    for i in range(count):
        q.put(payload, delay=3600 + i * 1e-6)
    assert q.delayed == count
    assert q.delayed_stats()["used_bytes"] == count * 96
    # The consumer waits for a line on stdin before it measures.
    consumer.stdin.write("go\n")
    consumer.stdin.flush()
    delayed, grown, peak = map(int, finish(consumer).split())
    assert delayed == count
    assert grown < 64 * 1024
    assert peak < 256 * 1024
    q.close()
