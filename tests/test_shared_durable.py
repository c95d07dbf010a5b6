"""Tests of a durable SharedQueue's consumer groups, retention, maxsize
and delayed messages, across real processes, restarts and SIGKILL.

Children run as separate interpreters on a real segment log in a
temporary directory. Each is joined with a time bound, and killed by PID
before a test fails.
"""

import glob
import json
import logging
import os
import queue
import random
import signal
import subprocess
import sys
import time

import pytest

import mqs
from durable_helpers import (  # noqa: F401 (fixtures)
    CHILD_TIMEOUT_S,
    SHM_DIR,
    drain,
    finish,
    kill_all,
    log_dir,
    run_child,
    shm_name,
)
from mqs.shared import SharedQueue

SEGMENT_BYTES = 64 * 1024


def segment_files(path):
    return sorted(glob.glob(os.path.join(path, "*.seg")))


def deleted_segment_mappings(pid):
    """Segment files that process `pid` maps although they were deleted."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            lines = maps.read().splitlines()
    except FileNotFoundError:
        return set()
    return {line.split()[-2] for line in lines
            if line.endswith("(deleted)") and ".seg" in line}


def numbers(messages):
    return [int(m) for m in messages]


def numbers_prefix(messages):
    return [int(m[:6]) for m in messages]


# -- consumer groups -------------------------------------------------------


def test_durable_groups_each_see_every_message(log_dir):
    q = SharedQueue(persist=log_dir, groups=3)
    assert q.groups == 3
    handles = [q] + [q.for_group(g) for g in (1, 2)]
    q.put_many([b"%d" % n for n in range(500)])
    for group, handle in enumerate(handles):
        assert handle.group == group
        assert handle.qsize() == 500
    assert numbers(drain(handles[1])) == list(range(500))
    assert handles[1].qsize() == 0
    assert handles[2].qsize() == 500
    assert numbers(drain(handles[0])) == list(range(500))
    assert numbers(drain(handles[2])) == list(range(500))
    for handle in handles:
        handle.close()


def test_durable_group_cursors_survive_restart(log_dir):
    q = SharedQueue(persist=log_dir, groups=2)
    second = q.for_group(1)
    q.put_many([b"%d" % n for n in range(100)])
    assert numbers(q.get_many(60, timeout=5)) == list(range(60))
    assert numbers(second.get_many(20, timeout=5)) == list(range(20))
    second.close()
    q.close()

    # Reopened without groups=: the stored count and both cursors.
    again = SharedQueue(persist=log_dir)
    assert again.groups == 2
    again_second = again.for_group(1)
    assert again.qsize() == 40
    assert again_second.qsize() == 80
    assert numbers(drain(again)) == list(range(60, 100))
    assert numbers(drain(again_second)) == list(range(20, 100))
    again_second.close()
    again.close()


def test_durable_group_count_mismatch_raises(log_dir, shm_name):
    q = SharedQueue(name=shm_name, persist=log_dir, groups=2)
    with pytest.raises(mqs.QueueLayoutError, match="runs with groups=2, "
                       "not 3; attach without groups="):
        SharedQueue(name=shm_name, create=False, persist=log_dir, groups=3)
    with pytest.raises(ValueError, match="group must be 0 to 1"):
        SharedQueue(name=shm_name, create=False, persist=log_dir, group=2)
    attached = SharedQueue(name=shm_name, create=False, persist=log_dir,
                           group=1)
    q.put(b"both")
    assert attached.get(timeout=5) == b"both"
    assert q.get(timeout=5) == b"both"
    attached.close()
    q.close()


def test_durable_group_added_on_restart_starts_at_oldest(log_dir):
    q = SharedQueue(persist=log_dir)
    q.put_many([b"%d" % n for n in range(10)])
    assert numbers(q.get_many(4, timeout=5)) == [0, 1, 2, 3]
    q.close()
    again = SharedQueue(persist=log_dir, groups=2)
    added = again.for_group(1)
    assert numbers(drain(again)) == list(range(4, 10))
    assert numbers(drain(added)) == list(range(10))
    added.close()
    again.close()


def test_durable_segment_size_kept_for_group_handles(log_dir, shm_name):
    q = SharedQueue(name=shm_name, persist=log_dir,
                    segment_bytes=SEGMENT_BYTES)
    second = q.for_group(0)
    with pytest.raises(mqs.QueueLayoutError, match="runs with segment_bytes"
                       "=65536, not 131072"):
        SharedQueue(name=shm_name, create=False, persist=log_dir,
                    segment_bytes=2 * SEGMENT_BYTES)
    # The first handle hands the writer lock over on close; the one
    # that takes over keeps writing segments of the queue's size.
    q.close()
    second.put_many([b"%06d" % n + b"z" * 500 for n in range(400)])
    assert numbers_prefix(drain(second)) == list(range(400))
    sizes = {os.path.getsize(path) for path in segment_files(log_dir)}
    assert sizes == {SEGMENT_BYTES}
    second.close()

    # Reopened without segment_bytes: the size it last ran with.
    again = SharedQueue(persist=log_dir)
    again.put_many([b"%06d" % n + b"z" * 500 for n in range(400)])
    assert len(drain(again)) == 400
    sizes = {os.path.getsize(path) for path in segment_files(log_dir)}
    assert sizes == {SEGMENT_BYTES}
    again.close()


# -- retention --------------------------------------------------------------


PRODUCER_PACED = """
    import time
    import mqs
    q = mqs.SharedQueue(name={name!r}, create=False, persist={path!r},
                        segment_bytes={segment})
    per_segment = {per_segment}
    for n in range({count}):
        q.put(b"%08d" % n + b"p" * 1000)
        if n % per_segment == per_segment - 1:
            # Keep the backlog near two segments: a consumer keeping up.
            while q.qsize() > 2 * per_segment:
                time.sleep(0.01)
            time.sleep(0.05)
    q.close()
    print("done", flush=True)
"""

CONSUMER_COUNTS = """
    import mqs
    q = mqs.SharedQueue(name={name!r}, create=False, persist={path!r},
                        segment_bytes={segment})
    expected = 0
    while expected < {count}:
        for message in q.get_many(100, timeout=30):
            assert int(message[:8]) == expected, (message[:8], expected)
            expected += 1
    q.close()
    print(expected, flush=True)
"""


def test_durable_retention_bounds_disk_use(log_dir, shm_name, scale):
    """A producer and a consumer process move many times the segment
    size through the queue: the segment files, and the deleted files
    that any process still maps, stay within the documented bound."""
    per_segment = SEGMENT_BYTES // 1100
    segments = max(30, int(60 * scale))
    count = per_segment * segments
    creator = SharedQueue(name=shm_name, persist=log_dir,
                          segment_bytes=SEGMENT_BYTES)
    arguments = dict(name=shm_name, path=log_dir, segment=SEGMENT_BYTES,
                     per_segment=per_segment, count=count)
    consumer = run_child(CONSUMER_COUNTS.format(**arguments))
    producer = run_child(PRODUCER_PACED.format(**arguments))
    max_files = max_mapped = max_disk = 0
    try:
        while producer.poll() is None or consumer.poll() is None:
            files = len(segment_files(log_dir))
            mapped = set()
            for pid in (producer.pid, consumer.pid, os.getpid()):
                mapped |= deleted_segment_mappings(pid)
            max_files = max(max_files, files)
            max_mapped = max(max_mapped, len(mapped))
            max_disk = max(max_disk, files + len(mapped))
            time.sleep(0.02)
        assert finish(producer).strip() == "done"
        assert int(finish(consumer)) == count
    finally:
        kill_all([producer, consumer])
    # Bound: the backlog (two segments), what was taken in the last
    # commit rounds (generous under load), the active segment. Deleted
    # segments stay mapped until each reader's next get or poll.
    assert max_files <= 16, max_files
    assert max_disk <= 18, (max_files, max_mapped, max_disk)
    assert max_files + max_mapped < segments
    stats = mqs.SegmentLog(log_dir, readonly=True)
    try:
        assert stats.start_offset > count - 16 * per_segment
    finally:
        stats.close()
    # The writer (this process) keeps no deleted segment mapped.
    deadline = time.monotonic() + 5
    while deleted_segment_mappings(os.getpid()) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert deleted_segment_mappings(os.getpid()) == set()
    creator.close()


def process_state(pid):
    """State letter of process `pid` from /proc (T: stopped)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def test_durable_paused_consumer_keeps_claimed_message(log_dir, shm_name):
    """A consumer stopped (SIGSTOP) between claiming an offset and
    reading it, while other gets move retention far past it, still gets
    its message, exactly once, and nothing is counted lost."""
    q = SharedQueue(name=shm_name, persist=log_dir,
                    segment_bytes=SEGMENT_BYTES)
    q.put(b"claimed")
    child = run_child(f"""
        import os
        import signal
        import mqs
        import mqs._shared

        def pause():
            mqs._shared._after_claim_hook = None
            os.kill(os.getpid(), signal.SIGSTOP)

        mqs._shared._after_claim_hook = pause
        q = mqs.SharedQueue(name={shm_name!r}, create=False,
                            persist={log_dir!r})
        print(q.get(timeout=30).decode(), flush=True)
        print(q.stats().lost_records, flush=True)
        q.close()
    """)
    try:
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while process_state(child.pid) != "T":
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "consumer never paused"
            time.sleep(0.01)
        first_segment = segment_files(log_dir)[0]
        messages = [b"%06d" % n + b"p" * 1000 for n in range(600)]
        q.put_many(messages)
        assert drain(q) == messages
        # Several commit rounds: retention would delete segment 0 now if
        # the paused claim did not hold it.
        time.sleep(1.5)
        assert segment_files(log_dir)[0] == first_segment
        os.kill(child.pid, signal.SIGCONT)
        assert finish(child).split() == ["claimed", "0"]
    finally:
        kill_all([child])
    assert q.stats().lost_records == 0
    # With the claim read, retention frees the segments everyone took.
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while segment_files(log_dir)[0] == first_segment:
        assert time.monotonic() < deadline, "retention never resumed"
        time.sleep(0.05)
    q.close()


def _consumer_killed_after_claim(shm_name, log_dir, take):
    """Run a child that attaches to the durable queue and SIGKILLs
    itself right after its claim, inside `take` (code that uses `q`);
    return once it is dead."""
    child = run_child(f"""
        import os
        import signal
        import mqs
        import mqs._shared

        def die():
            os.kill(os.getpid(), signal.SIGKILL)

        mqs._shared._after_claim_hook = die
        q = mqs.SharedQueue(name={shm_name!r}, create=False,
                            persist={log_dir!r})
        {take}
        print("not killed", flush=True)
    """)
    try:
        out, err = child.communicate(timeout=CHILD_TIMEOUT_S)
    finally:
        kill_all([child])
    assert child.returncode == -signal.SIGKILL, (out, err)


@pytest.mark.parametrize("take, taken", [
    ("q.get(timeout=30)", 1),
    ("q.get_many(5, timeout=30)", 5),
    ("q.get_many(50, timeout=30)", 10),
])
def test_durable_consumer_killed_after_claim_is_counted(
        log_dir, shm_name, take, taken):
    """A consumer of a durable queue killed between its claim and the
    return loses what it claimed, and consumer_died counts exactly
    that; the others stay queued."""
    q = SharedQueue(name=shm_name, persist=log_dir,
                    segment_bytes=SEGMENT_BYTES)
    messages = [b"m%02d" % n for n in range(10)]
    q.put_many(messages)
    assert q.stats().dropped["consumer_died"] == 0
    _consumer_killed_after_claim(shm_name, log_dir, take)
    assert q.stats().dropped["consumer_died"] == taken
    assert drain(q) == messages[taken:]
    # Counted once, however often stats runs.
    assert q.stats().dropped["consumer_died"] == taken
    q.close()


def test_durable_consumer_killed_inside_view_is_counted(log_dir, shm_name):
    """A death inside a durable queue's get_view block counts the
    message; a block that ends uncounts it."""
    q = SharedQueue(name=shm_name, persist=log_dir,
                    segment_bytes=SEGMENT_BYTES)
    q.put_many([b"kept", b"viewed", b"rest"])
    with q.get_view(timeout=5) as view:
        assert bytes(view) == b"kept"
        assert q.stats().dropped["consumer_died"] == 0
    child = run_child(f"""
        import os
        import signal
        import mqs

        q = mqs.SharedQueue(name={shm_name!r}, create=False,
                            persist={log_dir!r})
        with q.get_view(timeout=30) as view:
            print(bytes(view).decode(), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    try:
        out, err = child.communicate(timeout=CHILD_TIMEOUT_S)
    finally:
        kill_all([child])
    assert child.returncode == -signal.SIGKILL, err
    assert out.split() == ["viewed"]
    assert q.stats().dropped["consumer_died"] == 1
    assert drain(q) == [b"rest"]
    q.close()


def test_durable_consumers_that_return_leave_nothing_counted(
        log_dir, shm_name):
    """Gets, batches, views and a message that fails to decode, in a
    child that then exits without closing (so its slot is reaped):
    nothing is counted as consumer_died."""
    q = SharedQueue(name=shm_name, persist=log_dir,
                    segment_bytes=SEGMENT_BYTES)
    q.put_many([b"a", b"b", b"c", b"d", b"e"])
    q.put({"n": 1})
    child = run_child(f"""
        import os
        import pickle
        import mqs

        q = mqs.SharedQueue(name={shm_name!r}, create=False,
                            persist={log_dir!r})
        got = [q.get(timeout=30)]
        got += q.get_many(2, timeout=30)
        with q.get_view(timeout=30) as view:
            got.append(bytes(view))
        got.append(q.get(timeout=30))
        got.append(q.get(timeout=30))
        print(got, flush=True)
        os._exit(0)
    """)
    assert finish(child).strip() == \
        "[b'a', b'b', b'c', b'd', b'e', {'n': 1}]"
    assert q.stats().dropped["consumer_died"] == 0
    q.close()


def _damage_message(log_dir, marker):
    """Flip one byte of the body that starts with `marker` in the
    queue's segment files."""
    for path in segment_files(log_dir):
        with open(path, "r+b") as file:
            data = bytearray(file.read())
            at = data.find(marker)
            if at >= 0:
                data[at + len(marker)] ^= 0xFF
                file.seek(0)
                file.write(data)
                return
    raise AssertionError(f"{marker!r} not found")


@pytest.mark.parametrize("batch", [False, True])
def test_durable_damaged_record_is_skipped_and_counted(log_dir, batch):
    """A message whose log record was damaged on disk is dropped and
    counted in damaged_record. A get goes on with the next message, a
    get_many returns the others of its claim, and stats still work."""
    q = SharedQueue(persist=log_dir, fsync="always",
                    segment_bytes=SEGMENT_BYTES)
    messages = [b"m%d-" % n + b"x" * 100 for n in range(5)]
    q.put_many(messages)
    q.close()
    _damage_message(log_dir, b"m2-")
    q = SharedQueue(persist=log_dir, segment_bytes=SEGMENT_BYTES)
    assert q.stats().dropped["damaged_record"] == 0
    if batch:
        got = q.get_many(10, timeout=5)
    else:
        got = [q.get(timeout=5) for _ in range(4)]
    assert got == messages[:2] + messages[3:]
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)
    stats = q.stats()
    assert stats.dropped["damaged_record"] == 1
    assert stats.dropped["consumer_died"] == 0
    q.close()


def test_durable_handle_without_persist_puts_but_cannot_get(log_dir,
                                                           shm_name):
    """A handle opened by name without persist= on a durable queue puts
    into the inbox, which the log keeps, but its gets raise: they would
    take messages before the appender writes them to the log."""
    q = SharedQueue(name=shm_name, persist=log_dir)
    producer = SharedQueue(name=shm_name, create=False)
    # The handle reports the queue's log, but not an fsync mode: its puts
    # do not wait for a sync.
    assert producer.persist == q.persist == log_dir
    assert producer.fsync is None
    assert q.fsync == "interval"
    producer.put(b"logged")
    takes = [lambda: producer.get(timeout=1), producer.get_nowait,
             lambda: producer.get_many(5, timeout=1),
             lambda: producer.get_view(timeout=1).__enter__()]
    for take in takes:
        with pytest.raises(mqs.QueueLayoutError) as caught:
            take()
        assert f"persist={log_dir!r}" in str(caught.value)
    assert q.get(timeout=5) == b"logged"
    producer.close()
    q.close()


def test_durable_record_damaged_while_open_is_counted(log_dir, caplog):
    """A record damaged while the queue is open is dropped, and so are
    the records after it when the live reader cannot pass it: each is
    counted in damaged_record (not consumer_died) and logged at 1, 10,
    100 ... drops, not once per message."""
    q = SharedQueue(persist=log_dir, fsync="always",
                    segment_bytes=SEGMENT_BYTES)
    messages = [b"m%02d-" % n + b"z" * 50 for n in range(10)]
    q.put_many(messages)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while q.stats().enqueued < 10 or q.stats().lag[0] < 10:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    _damage_message(log_dir, b"m05-")
    got = []
    with caplog.at_level(logging.WARNING):
        while True:
            try:
                got.append(q.get(timeout=0.5))
            except queue.Empty:
                break
    # Whether the reader passes the damaged record depends on how far it
    # had indexed the segment before the damage.
    assert got in (messages[:5], messages[:5] + messages[6:])
    stats = q.stats()
    assert stats.dropped["damaged_record"] == len(messages) - len(got)
    assert stats.dropped["consumer_died"] == 0
    warnings = [record for record in caplog.records
                if "damaged or missing in the log" in record.getMessage()]
    assert len(warnings) == 1
    q.close()


def test_durable_named_queue_rejects_second_log(log_dir, shm_name,
                                                tmp_path):
    """Attaching to a named durable queue with another persist directory
    raises and names the queue's directory. The same directory by
    another spelling attaches, and nothing was split between logs."""
    first = SharedQueue(name=shm_name, persist=log_dir)
    other = str(tmp_path / "other-log")
    with pytest.raises(mqs.QueueLayoutError) as caught:
        SharedQueue(name=shm_name, persist=other)
    assert f"persist={log_dir!r}" in str(caught.value)
    assert other in str(caught.value)
    # The failed attach left the queue's ring in place.
    assert os.path.exists(os.path.join(SHM_DIR, "mqs." + shm_name))
    same = SharedQueue(name=shm_name, create=False,
                       persist=os.path.join(log_dir, "."))
    same.put_many([1, 2, 3])
    assert [first.get(timeout=5) for _ in range(3)] == [1, 2, 3]
    same.close()
    first.close()


def test_durable_restart_after_retention_delivers_unconsumed(log_dir):
    messages = [b"%06d" % n + b"r" * 500 for n in range(3000)]
    q = SharedQueue(persist=log_dir, segment_bytes=SEGMENT_BYTES)
    q.put_many(messages)
    got = []
    while len(got) < 2000:
        got.extend(q.get_many(2000 - len(got), timeout=5))
    assert got == messages[:2000]
    # Two commit rounds pass, so retention deletes what was taken.
    time.sleep(1.0)
    q.close()
    files = segment_files(log_dir)
    assert files and int(os.path.basename(files[0])[:-4]) > 0

    child = run_child(f"""
        import queue
        import mqs
        q = mqs.SharedQueue(persist={log_dir!r}, segment_bytes={SEGMENT_BYTES})
        print(q.qsize(), flush=True)
        while True:
            try:
                for message in q.get_many(1000, timeout=1.0):
                    print(int(message[:6]), flush=True)
            except queue.Empty:
                break
        q.close()
    """)
    lines = [int(x) for x in finish(child).split()]
    assert lines[0] == 1000
    assert lines[1:] == list(range(2000, 3000))


def test_durable_retention_waits_for_slowest_group(log_dir):
    q = SharedQueue(persist=log_dir, groups=2, segment_bytes=SEGMENT_BYTES)
    slow = q.for_group(1)
    q.put_many([b"%06d" % n + b"s" * 500 for n in range(1500)])
    assert len(drain(q)) == 1500
    time.sleep(1.0)
    before = segment_files(log_dir)
    assert os.path.basename(before[0]) == "0" * 20 + ".seg"
    assert len(before) > 5
    assert len(drain(slow)) == 1500
    deadline = time.monotonic() + 10
    while len(segment_files(log_dir)) > 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(segment_files(log_dir)) <= 2
    slow.close()
    q.close()


# -- maxsize ----------------------------------------------------------------


def test_durable_maxsize_counts_across_processes(log_dir, shm_name):
    q = SharedQueue(name=shm_name, persist=log_dir, maxsize=10)
    assert q.maxsize == 10
    producer = run_child(f"""
        import mqs
        q = mqs.SharedQueue(name={shm_name!r}, create=False,
                            persist={log_dir!r})
        for n in range(8):
            q.put(b"%d" % n)
        q.put(b"8", delay=30)
        q.put(b"9", delay=30)
        q.close()
        print("done", flush=True)
    """)
    assert finish(producer).strip() == "done"
    assert q.full()
    assert q.delayed == 2
    with pytest.raises(queue.Full):
        q.put_nowait(b"over")
    with pytest.raises(queue.Full):
        q.put(b"over", timeout=0.2)
    assert q.get(timeout=5) == b"0"
    assert not q.full()
    q.put(b"10", timeout=5)
    assert q.full()
    with pytest.raises(mqs.QueueLayoutError, match="runs with maxsize=10, "
                       "not 5"):
        SharedQueue(5, name=shm_name, create=False, persist=log_dir)
    q.close()


RACING_PRODUCER = """
import mqs
q = mqs.SharedQueue(name={name!r}, create=False, persist={path!r})
for n in range({count}):
    q.put(b"{producer}:%d" % n, timeout=60)
q.close()
print("done", flush=True)
"""


def test_durable_maxsize_exact_with_racing_producers(log_dir, shm_name,
                                                     scale):
    """Producer processes block on a full queue of maxsize 3 and race
    for each place a get frees, and the depth never exceeds maxsize.
    This thread is the only consumer and samples the depth between its
    gets, so a sample never counts a message that is already gone."""
    rng = random.Random(5)
    maxsize = 3
    producers = 4
    count = max(60, int(150 * scale))
    q = SharedQueue(maxsize, name=shm_name, persist=log_dir)
    procs = [run_child(RACING_PRODUCER.format(
        name=shm_name, path=log_dir, count=count, producer=p))
        for p in range(producers)]
    got = []
    depths = []
    try:
        while len(got) < producers * count:
            # Let the producers fill the places the last get freed.
            for _ in range(10):
                depths.append(q.qsize())
                time.sleep(0.002)
            got.extend(q.get_many(rng.randint(1, maxsize), timeout=30))
        for proc in procs:
            assert finish(proc).strip() == "done"
    finally:
        kill_all(procs)
    assert max(depths) <= maxsize, sorted(depths)[-10:]
    assert max(depths) == maxsize
    for p in range(producers):
        sent = [int(m.split(b":")[1]) for m in got
                if m.startswith(b"%d:" % p)]
        assert sent == list(range(count))
    assert q.qsize() == 0
    q.close()


def test_durable_blocked_put_wakes_on_get_in_other_process(log_dir,
                                                           shm_name):
    q = SharedQueue(name=shm_name, persist=log_dir, maxsize=5)
    q.put_many([b"%d" % n for n in range(5)])
    consumer = run_child(f"""
        import time
        import mqs
        q = mqs.SharedQueue(name={shm_name!r}, create=False,
                            persist={log_dir!r})
        time.sleep(0.3)
        print(q.get(timeout=10).decode(), flush=True)
        q.close()
    """)
    started = time.monotonic()
    q.put(b"5", timeout=30)
    assert time.monotonic() - started >= 0.2
    assert finish(consumer).strip() == "0"
    assert q.qsize() == 5
    q.close()


# -- delayed messages --------------------------------------------------------


def test_durable_delay_orders_by_due_time(log_dir):
    q = SharedQueue(persist=log_dir)
    start = time.monotonic()
    q.put(b"late", delay=0.6)
    q.put(b"early", delay=0.3)
    q.put(b"now")
    assert q.get(timeout=5) == b"now"
    assert q.get(timeout=5) == b"early"
    assert time.monotonic() - start >= 0.3
    assert q.get(timeout=5) == b"late"
    assert time.monotonic() - start >= 0.6
    assert q.delayed == 0
    q.close()


def test_durable_delay_at_past_time_is_ready_at_once(log_dir):
    q = SharedQueue(persist=log_dir)
    q.put(b"past", at=time.time() - 10)
    assert q.delayed == 0
    assert q.get(timeout=5) == b"past"
    q.close()


def test_durable_delay_log_retention_frees_released(log_dir):
    q = SharedQueue(persist=log_dir, segment_bytes=SEGMENT_BYTES)
    q.put_many([b"%06d" % n + b"d" * 500 for n in range(600)], delay=2.0)
    q.put(b"last", delay=8)
    delayed_dir = os.path.join(log_dir, "delayed")
    deadline = time.monotonic() + 1.5
    while q.delayed < 601 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(segment_files(delayed_dir)) > 2
    got = []
    while len(got) < 600:
        got.extend(q.get_many(600, timeout=5))
    assert sorted(int(m[:6]) for m in got) == list(range(600))
    deadline = time.monotonic() + 10
    while len(segment_files(delayed_dir)) > 2 \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    # The segment of the message still waiting, and the active one.
    assert len(segment_files(delayed_dir)) <= 2
    assert q.delayed == 1
    assert q.get(timeout=10) == b"last"
    q.close()


DELAYED_PRODUCER = """
    import json
    import time
    import mqs
    q = mqs.SharedQueue(name={name!r}, create=False, persist={path!r},
                        fsync="always")
    for n in range({count}):
        delay = {low} + ({high} - {low}) * n / {count}
        due = time.time() + delay
        q.put(json.dumps([n, due]).encode(), delay=delay)
        print(n, flush=True)
    {end}
"""


PACED_CONSUMER = """
import time
import mqs
q = mqs.SharedQueue(name={name!r}, create={create}, persist={path!r},
                    fsync="always")
with open({out!r}, "w") as out:
    while True:
        message = q.get(timeout=60)
        out.write("%s %.6f\\n" % (message.decode(), time.time()))
        out.flush()
        time.sleep(0.001)
"""


def _lines_written(path):
    try:
        with open(path, "rb") as file:
            return file.read().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("named", [False, True], ids=["anonymous", "named"])
def test_durable_redelivery_after_crash_is_bounded(log_dir, shm_name,
                                                   tmp_path, named):
    """After SIGKILL of every process, an anonymous queue restarts at
    the last committed position: the messages delivered again are the
    last ones got before the kill, in order, each once, got within the
    commit interval (0.2 s) plus scheduling slack. A named queue's ring
    outlives the processes and keeps the exact position, so nothing
    comes back. In both, nothing that was not got is lost."""
    count = 20000
    out = str(tmp_path / "consumed.txt")
    name = shm_name if named else None
    q = SharedQueue(name=name, persist=log_dir, fsync="always")
    q.put_many([b"%d" % n for n in range(count)])
    q.close()
    # The consumer is the only process: it runs the appender and so
    # the commits.
    consumer = run_child(PACED_CONSUMER.format(
        name=name, create=not named, path=log_dir, out=out))
    try:
        # Killed once it got a few hundred messages, however long its
        # start takes on a loaded machine.
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while _lines_written(out) < 300:
            assert consumer.poll() is None, consumer.communicate()
            assert time.monotonic() < deadline, "the consumer got nothing"
            time.sleep(0.05)
        consumer.send_signal(signal.SIGKILL)
        killed_at = time.time()
        consumer.communicate(timeout=CHILD_TIMEOUT_S)
    finally:
        kill_all([consumer])
    with open(out) as lines:
        got = [line.split() for line in lines if line.endswith("\n")]
    got_numbers = [int(number) for number, _ in got]
    got_at = {int(number): float(at) for number, at in got}
    assert got_numbers == list(range(len(got)))
    assert len(got) > 100, "the consumer barely ran"

    restarted = SharedQueue(name=name, create=not named, persist=log_dir)
    rest = numbers(drain(restarted, timeout=2.0))
    restarted.close()
    # Nothing skipped: the rest is one run of offsets.
    assert rest == list(range(rest[0], count))
    redelivered = [n for n in rest if n < len(got)]
    if named:
        # The consumer may have been killed between its get and its
        # write: that one message is gone with it.
        assert rest[0] in (len(got), len(got) + 1)
        return
    assert rest[0] <= len(got)
    if redelivered:
        # 0.2 s is the commit interval; 1.8 s more covers an appender
        # thread starved on a loaded machine.
        assert killed_at - got_at[redelivered[0]] < 2.0, len(redelivered)


def check_delayed(records, received_at):
    for (n, due), at in zip(records, received_at):
        assert at >= due, f"message {n} came {due - at:.3f} s early"


def test_durable_delay_survives_restart_of_every_process(log_dir, shm_name):
    """Delayed messages put by a process that exits, with every other
    process closed too, come after a restart, never before their due
    time."""
    q = SharedQueue(name=shm_name, persist=log_dir)
    q.close()
    producer = run_child(DELAYED_PRODUCER.format(
        name=shm_name, path=log_dir, count=20, low=0.5, high=1.5,
        end="q.close()"))
    finish(producer)
    os.unlink(os.path.join(SHM_DIR, f"mqs.{shm_name}"))

    # A new ring: the schedule comes back from the delayed log.
    again = SharedQueue(persist=log_dir)
    assert again.delayed == 20
    records, received_at = [], []
    while len(records) < 20:
        message = again.get(timeout=10)
        received_at.append(time.time())
        records.append(json.loads(message))
    check_delayed(records, received_at)
    assert sorted(n for n, _ in records) == list(range(20))
    assert again.delayed == 0
    again.close()


def test_durable_delay_survives_sigkill(log_dir, shm_name):
    q = SharedQueue(name=shm_name, persist=log_dir, fsync="always")
    q.close()
    producer = run_child(DELAYED_PRODUCER.format(
        name=shm_name, path=log_dir, count=1000, low=0.5, high=1.0,
        end="time.sleep(600)"))
    # Kill it a moment after its first put returned, however long the
    # start took on a loaded machine.
    first = producer.stdout.readline()
    time.sleep(0.2)
    producer.send_signal(signal.SIGKILL)
    stdout, _ = producer.communicate(timeout=CHILD_TIMEOUT_S)
    acknowledged = {int(x) for x in (first + stdout).split()}
    assert 0 in acknowledged

    again = SharedQueue(name=shm_name, create=False, persist=log_dir)
    records, received_at = [], []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            message = again.get(timeout=2.0)
        except queue.Empty:
            break
        received_at.append(time.time())
        records.append(json.loads(message))
    again.close()
    check_delayed(records, received_at)
    got = [n for n, _ in records]
    assert len(got) == len(set(got)), "duplicates"
    assert acknowledged <= set(got)


# -- SIGKILL at random points ---------------------------------------------------


KILL_PRODUCER = """
    import json
    import random
    import time
    import mqs
    q = mqs.SharedQueue(name={name!r}, create=False, persist={path!r},
                        fsync="always", segment_bytes={segment})
    rng = random.Random({seed})
    n = 0
    while True:
        delay = rng.choice([None, None, None, 0.2, 0.6])
        due = time.time() + (delay or 0)
        body = json.dumps(["{producer}", n, due, "x" * 200]).encode()
        q.put(body, delay=delay)
        print(n, flush=True)
        n += 1
"""

KILL_CONSUMER = """
    import json
    import time
    import mqs
    q = mqs.SharedQueue(name={name!r}, create=False, persist={path!r},
                        fsync="always", segment_bytes={segment},
                        group={group})
    while True:
        message = q.get(timeout=60)
        producer, n, due, _ = json.loads(message)
        print(producer, n, due, time.time(), flush=True)
"""


def parse_consumed(stdout):
    """Return [(message id, due, received at)] from a consumer's output."""
    out = []
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 4:
            out.append(((parts[0], int(parts[1])), float(parts[2]),
                        float(parts[3])))
    return out


def lock_holder(path):
    """PID of the process holding the log's writer lock, or None."""
    inode = os.stat(os.path.join(path, "lock")).st_ino
    with open("/proc/locks") as locks:
        for line in locks:
            fields = line.split()
            if fields[1] == "FLOCK" and int(fields[5].split(":")[2]) == inode:
                return int(fields[4])
    return None


def start_producer(name, seed, settings, names):
    proc = run_child(KILL_PRODUCER.format(producer=name, seed=seed,
                                          **settings))
    names[proc.pid] = name
    return proc


def test_durable_queue_survives_random_sigkills(log_dir, shm_name, scale):
    """Producers (one of them the appender) are killed at random points
    while two consumer groups read, then every process is killed. After
    a restart: every acknowledged put reaches each group, no delayed
    message came early, and a message comes back only if its group took
    it within the last commit rounds before the final kill."""
    rng = random.Random(11)
    rounds = max(4, int(8 * scale))
    groups = 2
    settings = dict(name=shm_name, path=log_dir, segment=SEGMENT_BYTES)
    creator = SharedQueue(name=shm_name, persist=log_dir, fsync="always",
                          groups=groups, segment_bytes=SEGMENT_BYTES)
    names = {}
    producers = [start_producer(f"p{i}", i, settings, names)
                 for i in range(2)]
    consumers = []
    finished = []
    procs = list(producers)
    try:
        # The creator's handle holds the writer lock first; a producer
        # takes over once it is closed, before any consumer starts.
        time.sleep(0.3)
        creator.close()
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while lock_holder(log_dir) not in [p.pid for p in producers]:
            assert time.monotonic() < deadline, "no producer took over"
            time.sleep(0.01)
        consumers = [run_child(KILL_CONSUMER.format(group=g, **settings))
                     for g in range(groups)]
        procs += consumers
        appender_kills = 0
        for index in range(2, rounds + 2):
            time.sleep(rng.uniform(0.1, 0.4))
            # Kill the appender when a producer is it, else any producer.
            holder = lock_holder(log_dir)
            pids = [proc.pid for proc in producers]
            victim = producers.pop(pids.index(holder) if holder in pids
                                   else rng.randrange(len(producers)))
            appender_kills += victim.pid == holder
            victim.send_signal(signal.SIGKILL)
            finished.append(victim)
            producers.append(start_producer(f"p{index}", index, settings,
                                            names))
            procs.append(producers[-1])
        time.sleep(rng.uniform(0.1, 0.4))
        killed_at = time.time()
        for proc in producers + consumers:
            proc.send_signal(signal.SIGKILL)
        finished += producers
        outputs = {proc.pid: proc.communicate(timeout=CHILD_TIMEOUT_S)[0]
                   for proc in finished + consumers}
    finally:
        kill_all(procs)
    assert appender_kills >= 1
    acknowledged = {(names[proc.pid], int(line)) for proc in finished
                    for line in outputs[proc.pid].split()}
    # Replacements may die before their first put; the first two
    # producers ran for at least 0.3 s.
    assert len(acknowledged) > 0

    restarted = SharedQueue(name=shm_name, create=False, persist=log_dir,
                            fsync="always")
    handles = [restarted] + [restarted.for_group(g)
                             for g in range(1, groups)]
    for consumer, handle in zip(consumers, handles):
        before = parse_consumed(outputs[consumer.pid])
        after = []
        while True:
            try:
                message = handle.get(timeout=2.0)
            except queue.Empty:
                break
            producer, n, due, _ = json.loads(message)
            after.append(((producer, n), due, time.time()))
        for key, due, received in before + after:
            assert received >= due, f"{key} came {due - received:.3f} s early"
        ids_before = [key for key, _, _ in before]
        ids_after = [key for key, _, _ in after]
        assert len(ids_before) == len(set(ids_before)), "duplicates"
        assert len(ids_after) == len(set(ids_after)), "duplicates"
        taken_at = {key: received for key, _, received in before}
        for key in set(ids_before) & set(ids_after):
            # Only gets after the last cursor commit come back; commits
            # run every 0.2 s, later under load.
            assert killed_at - taken_at[key] < 5.0, key
        missing = acknowledged - set(ids_before) - set(ids_after)
        # The consumer may die between its get and its print.
        assert len(missing) <= 1, sorted(missing)[:10]
    stats = mqs.SegmentLog(log_dir, readonly=True)
    try:
        # On a loaded machine the producers may fill a segment or two
        # only, and retention keeps the last two.
        if stats.stats().segments >= 4:
            assert stats.start_offset > 0, "retention deleted nothing"
    finally:
        stats.close()
    for handle in handles:
        handle.close()


CLOSE_DURING_DURABLE_TAKE = """
import json, sys, threading, time
import mqs


def load_slowly():
    time.sleep(0.2)
    return "loaded"


class SlowToLoad:
    def __reduce__(self):
        return (load_slowly, ())


q = mqs.SharedQueue(persist=sys.argv[1], capacity_bytes=65536)
for _ in range(3):
    q.put(SlowToLoad())
q.put("last")
# Lets the appender move all four into the log, so one get claims all.
time.sleep(1.0)
outcome = []


def call():
    try:
        outcome.append(q.get_many(10, timeout=30))
    except Exception as exc:
        outcome.append(f"{type(exc).__name__}: {exc}")


caller = threading.Thread(target=call)
caller.start()
time.sleep(0.1)
q.close()
caller.join(10)
print(json.dumps(outcome))
"""


def test_durable_close_during_take(log_dir):
    result = subprocess.run(
        [sys.executable, "-c", CLOSE_DURING_DURABLE_TAKE, log_dir],
        capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    # close() ran while the batch was deserialized. The reader it closed
    # failed the rest of the claimed messages, and they were lost.
    assert json.loads(result.stdout) == [
        ["loaded", "loaded", "loaded", "last"]]


CLOSE_DURING_SYNC_WAIT = """
import json, sys, threading, time
import mqs

q = mqs.SharedQueue(persist=sys.argv[1], fsync="always",
                    capacity_bytes=1 << 20)
outcome = {"ok": [], "accepted": [], "refused": [], "other": []}
lock = threading.Lock()


def produce(first):
    n = first
    while True:
        try:
            q.put(n)
            kind = "ok"
        except ValueError as exc:
            kind = "accepted" if getattr(exc, "accepted", 0) else "refused"
        except Exception as exc:
            kind = "other"
            n = f"{type(exc).__name__}: {exc}"
        with lock:
            outcome[kind].append(n)
        if kind != "ok":
            return
        n += 4


threads = [threading.Thread(target=produce, args=(k,)) for k in range(4)]
for thread in threads:
    thread.start()
time.sleep(0.3)
q.close()
for thread in threads:
    thread.join(10)
print(json.dumps(outcome))
"""


def test_close_during_sync_wait_keeps_puts_exact(log_dir):
    """close() while 4 threads wait in put for their sync (fsync="always",
    this process the appender): each put either returned (stored and
    synced), raised ValueError with ``accepted`` set (stored, so a retry
    would duplicate it) or raised the plain closed error (not stored).
    A put that raised the closed error while its message was stored made
    callers retry into duplicates."""
    for _ in range(3):
        result = subprocess.run(
            [sys.executable, "-c", CLOSE_DURING_SYNC_WAIT, log_dir],
            capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        assert result.returncode == 0, result.stderr
        outcome = json.loads(result.stdout)
        assert outcome["other"] == []
        assert len(outcome["ok"]) > 0
        q = SharedQueue(persist=log_dir, fsync="always")
        try:
            found = drain(q)
        finally:
            q.close()
        assert sorted(found) == sorted(outcome["ok"] + outcome["accepted"])
        assert not set(outcome["refused"]) & set(found)


APPENDER_THEN_WAIT = """
import sys, time
import mqs

q = mqs.SharedQueue(name=sys.argv[1], persist=sys.argv[2], fsync="always")
q.put("first")
print("ready", flush=True)
time.sleep(120)
"""

PUT_THEN_CLOSE = """
import json, sys, threading, time
import mqs

q = mqs.SharedQueue(name=sys.argv[1], persist=sys.argv[2], fsync="always")
outcome = []


def put():
    try:
        q.put("second")
        outcome.append("returned")
    except ValueError as exc:
        outcome.append(["ValueError", getattr(exc, "accepted", None),
                        str(exc)])


thread = threading.Thread(target=put)
thread.start()
time.sleep(0.3)
q.close()
thread.join(20)
print(json.dumps(outcome))
"""


def test_close_during_sync_wait_of_another_appender(shm_name, log_dir):
    """The appender is another process, stopped (SIGSTOP), so a put
    waits for its sync until close() ends the wait: it raises
    ValueError with ``accepted = 1``, and the message is written once
    the appender runs again, exactly once."""
    appender = run_child(APPENDER_THEN_WAIT.replace(
        "sys.argv[1]", repr(shm_name)).replace("sys.argv[2]", repr(log_dir)))
    try:
        assert appender.stdout.readline().strip() == "ready"
        os.kill(appender.pid, signal.SIGSTOP)
        try:
            result = subprocess.run(
                [sys.executable, "-c", PUT_THEN_CLOSE, shm_name, log_dir],
                capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        finally:
            os.kill(appender.pid, signal.SIGCONT)
        assert result.returncode == 0, result.stderr
        [(kind, accepted, text)] = json.loads(result.stdout)
        assert (kind, accepted) == ("ValueError", 1)
        assert "do not put it again" in text
    finally:
        kill_all([appender])
    q = SharedQueue(name=shm_name, persist=log_dir, fsync="always")
    try:
        assert drain(q) == ["first", "second"]
    finally:
        q.close()
