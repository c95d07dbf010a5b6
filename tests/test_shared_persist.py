"""Tests of the durable SharedQueue (persist=path): messages and the
consumer position survive the exit and SIGKILL of every process.

Every test runs real processes on a real segment log in a temporary
directory. Children are joined with a time bound and killed by PID
before a test fails.
"""

import asyncio
import glob
import multiprocessing
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
    communicate,
    drain,
    log_dir,
    run_child,
    shm_name,
)
from mqs.shared import SharedQueue

# -- one process ---------------------------------------------------------------


@pytest.mark.parametrize("fsync", ["always", "interval", "never"])
def test_messages_round_trip_through_the_log(log_dir, fsync):
    q = SharedQueue(persist=log_dir, fsync=fsync)
    assert q.persist == log_dir
    assert q.fsync == fsync
    items = [b"bytes", bytearray(b"array"), b"", {"a": [1, 2]}, "text"]
    for item in items:
        q.put(item)
    assert q.qsize() == len(items)
    got = [q.get(timeout=5) for _ in items]
    assert got == items
    assert [type(x) for x in got] == [type(x) for x in items]
    assert q.qsize() == 0
    assert q.empty()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.05)
    q.close()


def test_unconsumed_messages_and_cursor_survive_reopen(log_dir):
    q = SharedQueue(persist=log_dir)
    q.put_many([n.to_bytes(4, "little") for n in range(100)])
    assert [int.from_bytes(m, "little") for m in q.get_many(30, timeout=5)
            ] == list(range(30))
    q.close()

    # A new ring, a new process's view: only the 70 not taken remain.
    again = SharedQueue(persist=log_dir)
    assert again.qsize() == 70
    assert [int.from_bytes(m, "little") for m in drain(again)] == list(
        range(30, 100))
    again.put(b"last")
    again.close()

    third = SharedQueue(persist=log_dir)
    assert third.qsize() == 1
    assert third.get(timeout=5) == b"last"
    third.close()


def test_get_view_lends_the_logged_bytes(log_dir):
    q = SharedQueue(persist=log_dir)
    q.put(b"zero-copy")
    with q.get_view(timeout=5) as view:
        assert view.readonly
        assert bytes(view) == b"zero-copy"
    with pytest.raises(ValueError):
        bytes(view)
    q.close()


def test_put_many_and_get_many_keep_order(log_dir):
    q = SharedQueue(persist=log_dir, fsync="always")
    q.put_many([b"%d" % n for n in range(500)])
    got = []
    while len(got) < 500:
        got.extend(q.get_many(64, timeout=5))
    assert got == [b"%d" % n for n in range(500)]
    q.close()


# -- bad input ---------------------------------------------------------------


def test_persist_rejects_bad_arguments(tmp_path, log_dir):
    a_file = tmp_path / "file"
    a_file.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="is a file; give a "
                       "directory"):
        SharedQueue(persist=str(a_file))
    with pytest.raises(ValueError, match="fsync must be 'always', "
                       "'interval' or 'never', got 'sometimes'"):
        SharedQueue(persist=log_dir, fsync="sometimes")
    with pytest.raises(ValueError, match="applies only to a durable queue"):
        SharedQueue(fsync="always")
    with pytest.raises(ValueError, match="segment_bytes=65536 applies only "
                       "to a durable queue"):
        SharedQueue(segment_bytes=65536)
    with pytest.raises(ValueError, match="groups must be 1 to 8, got 9"):
        SharedQueue(persist=log_dir, groups=9)
    with pytest.raises(ValueError, match="segment_bytes must be a multiple "
                       "of 4096"):
        SharedQueue(persist=log_dir, segment_bytes=10000)
    with pytest.raises(TypeError, match="persist must be a str"):
        SharedQueue(persist=b"bytes path")


def test_persist_rejects_empty_or_int_path(tmp_path, monkeypatch):
    """An empty or int persist path raises an error that names persist."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="persist must name the directory "
                       "of the queue's segment log, got ''"):
        SharedQueue(persist="")
    with pytest.raises(TypeError, match="persist must be a str or "
                       "os.PathLike path, got int 5"):
        SharedQueue(persist=5)
    assert list(tmp_path.iterdir()) == []


def test_persist_rejects_a_foreign_log(log_dir):
    log = mqs.SegmentLog(log_dir)
    log.append(b"not a queue record")
    log.close()
    with pytest.raises(mqs.DirectoryKindError,
                       match="directory of a segment log"):
        SharedQueue(persist=log_dir)
    # A queue's control file beside records that a queue did not write.
    open(os.path.join(log_dir, "queue.ctl"), "wb").close()
    with pytest.raises(ValueError, match="did not write"):
        SharedQueue(persist=log_dir)


BROKER_HOLDER = """
import sys
import time
import mqs
broker = mqs.Broker(backend="log", path=sys.argv[1])
broker.publish("t", b"kept")
print("open", flush=True)
time.sleep(600)
"""


def test_persist_rejects_a_log_broker_directory(tmp_path):
    """SharedQueue(persist=) on a log broker's directory, while another
    process runs the broker and after it exits, raises
    DirectoryKindError (not LogLocked) and leaves the broker's files
    alone."""
    path = str(tmp_path / "broker")
    child = subprocess.Popen(
        [sys.executable, "-c", BROKER_HOLDER, path], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "open", child.stderr.read()
        with pytest.raises(mqs.DirectoryKindError,
                           match="directory of a log broker") as raised:
            SharedQueue(persist=path)
        assert raised.value.path == path
        assert raised.value.kind == "log broker"
        assert repr(path) in str(raised.value)
        assert "give the durable SharedQueue a directory" \
            in str(raised.value)
    finally:
        child.kill()
        child.communicate()
    with pytest.raises(mqs.DirectoryKindError, match="log broker"):
        SharedQueue(persist=path)
    assert "queue.ctl" not in os.listdir(path)
    broker = mqs.Broker(backend="log", path=path)
    consumer = broker.consume("t", "g")
    message = consumer.get(timeout=10)
    assert message.body == b"kept"
    message.ack()
    consumer.close()
    broker.close()


def test_second_queue_on_the_same_directory_raises(log_dir):
    first = SharedQueue(persist=log_dir)
    with pytest.raises(mqs.LogLocked, match="log of another live durable "
                       "queue"):
        SharedQueue(persist=log_dir)
    first.put(b"still works")
    assert first.get(timeout=5) == b"still works"
    first.close()


def shm_files(name):
    """Return the files in /dev/shm of the queue `name`."""
    return sorted(path for pattern in (f"mqs.{name}*", f"mqs-persist.{name}*")
                  for path in glob.glob(os.path.join("/dev/shm", pattern)))


def test_named_create_locked_log_no_ring(log_dir, shm_name):
    first = SharedQueue(persist=log_dir)
    try:
        with pytest.raises(mqs.LogLocked):
            SharedQueue(name=shm_name, persist=log_dir)
        assert shm_files(shm_name) == []
        with pytest.raises(mqs.QueueNotFound):
            SharedQueue(name=shm_name, create=False)
    finally:
        first.close()


def test_named_create_file_path_no_ring(tmp_path, shm_name):
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="is a file"):
        SharedQueue(name=shm_name, persist=str(path))
    assert shm_files(shm_name) == []
    assert path.read_text() == "not a directory"


def test_named_attach_failure_keeps_ring(log_dir, tmp_path, shm_name):
    existing = SharedQueue(name=shm_name, persist=log_dir)
    try:
        existing.put(b"kept")
        before = shm_files(shm_name)
        assert before != []
        path = tmp_path / "a-file"
        path.write_text("not a directory")
        with pytest.raises(NotADirectoryError, match="is a file"):
            SharedQueue(name=shm_name, persist=str(path))
        assert shm_files(shm_name) == before
        attached = SharedQueue(name=shm_name, create=False,
                               persist=log_dir)
        assert attached.get(timeout=5) == b"kept"
        attached.close()
    finally:
        existing.close()


def test_named_create_bad_group_no_ring(shm_name):
    with pytest.raises(ValueError, match="group must be 0 to 0"):
        SharedQueue(name=shm_name, group=1)
    assert shm_files(shm_name) == []


# -- several processes ----------------------------------------------------------


def _fork_child_puts(q, count):
    for n in range(count):
        q.put(b"child-%d" % n)
    q.close()


def test_forked_child_puts_through_the_parents_appender(log_dir):
    q = SharedQueue(persist=log_dir, fsync="always")
    child = multiprocessing.get_context("fork").Process(
        target=_fork_child_puts, args=(q, 50))
    child.start()
    child.join(CHILD_TIMEOUT_S)
    assert child.exitcode == 0
    assert sorted(drain(q)) == sorted(b"child-%d" % n for n in range(50))
    q.close()


def _spawn_child_gets(q, count, conn):
    conn.send([q.get(timeout=30) for _ in range(count)])
    q.close()


def test_spawned_child_gets_from_an_anonymous_durable_queue(log_dir):
    context = multiprocessing.get_context("spawn")
    q = SharedQueue(persist=log_dir)
    receive_end, send_end = context.Pipe(duplex=False)
    child = context.Process(target=_spawn_child_gets,
                            args=(q, 20, send_end))
    child.start()
    q.put_many([b"%d" % n for n in range(20)])
    assert receive_end.poll(CHILD_TIMEOUT_S)
    assert receive_end.recv() == [b"%d" % n for n in range(20)]
    child.join(CHILD_TIMEOUT_S)
    assert child.exitcode == 0
    q.close()


PRODUCER = """
    import logging
    import mqs
    logging.basicConfig(level=logging.INFO)
    q = mqs.SharedQueue(name={name!r}, create=False, persist={path!r},
                        fsync="always")
    print("ready", flush=True)
    for n in range({count}):
        q.put(b"%d:%d" % ({producer}, n))
        print(n, flush=True)
    q.close()
"""


def acked(stdout):
    lines = stdout.split()
    return [int(x) for x in lines if x.isdigit()]


def test_killed_appender_loses_no_acknowledged_put(log_dir, shm_name,
                                                   scale):
    """SIGKILL the process holding the log's writer lock while three
    producer processes put with fsync="always": another process takes
    over, and every put that returned is in the log exactly once."""
    rng = random.Random(5)
    count = max(200, int(1000 * scale))
    creator = SharedQueue(name=shm_name, persist=log_dir, fsync="always")
    appender = run_child(f"""
        import time
        import mqs
        q = mqs.SharedQueue(name={shm_name!r}, create=False,
                            persist={log_dir!r}, fsync="always")
        print("ready", flush=True)
        time.sleep(600)
    """)
    assert appender.stdout.readline().strip() == "ready"
    # Closing the creator's handle releases the writer lock; the child,
    # the only other handle, takes it within its poll interval.
    creator.close()
    time.sleep(0.5)
    producers = [run_child(PRODUCER.format(
        name=shm_name, path=log_dir, count=count, producer=p))
        for p in range(3)]
    try:
        time.sleep(rng.uniform(0.05, 0.3))
        os.kill(appender.pid, signal.SIGKILL)
        appender.communicate(timeout=CHILD_TIMEOUT_S)
        results = [communicate(p) for p in producers]
    finally:
        for proc in producers + [appender]:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for status, _, stderr in results:
        assert status == 0, stderr
    # One of the producers took the log over from the killed appender.
    assert any("appends to the log" in stderr for _, _, stderr in results)
    probe = SharedQueue(name=shm_name, create=False, persist=log_dir)
    got = drain(probe, timeout=1.0)
    probe.close()
    seen = {}
    for message in got:
        producer, n = (int(x) for x in message.split(b":"))
        seen.setdefault(producer, []).append(n)
    for producer, (_, stdout, _) in enumerate(results):
        numbers = seen.get(producer, [])
        assert len(numbers) == len(set(numbers)), "duplicates"
        assert numbers == sorted(numbers)
        assert set(acked(stdout)) <= set(numbers)
        assert len(numbers) == count


def test_killed_producers_lose_no_acknowledged_put(log_dir, shm_name,
                                                   scale):
    rng = random.Random(7)
    rounds = max(3, int(6 * scale))
    q = SharedQueue(name=shm_name, persist=log_dir, fsync="always")
    acknowledged = {}
    try:
        for producer in range(rounds):
            proc = run_child(PRODUCER.format(
                name=shm_name, path=log_dir, count=10**6,
                producer=producer))
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.01, 0.2))
            os.kill(proc.pid, signal.SIGKILL)
            stdout, _ = proc.communicate(timeout=CHILD_TIMEOUT_S)
            acknowledged[producer] = set(acked(stdout))
        got = drain(q)
    finally:
        q.close()
    seen = {}
    for message in got:
        producer, n = (int(x) for x in message.split(b":"))
        seen.setdefault(producer, []).append(n)
    for producer, numbers in acknowledged.items():
        got_numbers = seen.get(producer, [])
        assert len(got_numbers) == len(set(got_numbers)), "duplicates"
        assert numbers <= set(got_numbers)
        # Published messages arrive in order, so they are 0..n-1.
        assert got_numbers == list(range(len(got_numbers)))


def test_group_commit_survives_killed_producer(log_dir, shm_name, scale):
    """SIGKILL one of four producers putting with fsync="always". After
    each sync the appender waits for the next record of every producer
    it woke, the victim included: the other three must still finish, and
    every put that returned must be in the log exactly once."""
    rng = random.Random(9)
    count = max(300, int(1000 * scale))
    q = SharedQueue(name=shm_name, persist=log_dir, fsync="always")
    producers = [run_child(PRODUCER.format(
        name=shm_name, path=log_dir, count=10**6 if p == 0 else count,
        producer=p)) for p in range(4)]
    try:
        for proc in producers:
            assert proc.stdout.readline().strip() == "ready"
        # Kill the victim once its puts are under way, at a random point.
        assert producers[0].stdout.readline().strip().isdigit()
        time.sleep(rng.uniform(0.01, 0.2))
        os.kill(producers[0].pid, signal.SIGKILL)
        victim_stdout, _ = producers[0].communicate(timeout=CHILD_TIMEOUT_S)
        results = [communicate(p) for p in producers[1:]]
        got = drain(q)
    finally:
        for proc in producers:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        q.close()
    for status, _, stderr in results:
        assert status == 0, stderr
    seen = {}
    for message in got:
        producer, n = (int(x) for x in message.split(b":"))
        seen.setdefault(producer, []).append(n)
    victim_numbers = seen.get(0, [])
    assert len(victim_numbers) == len(set(victim_numbers)), "duplicates"
    # The victim printed 0 before the kill, so 0 was synced.
    assert set(acked(victim_stdout)) | {0} <= set(victim_numbers)
    for producer in range(1, 4):
        assert seen.get(producer) == list(range(count)), producer


def _produce_range(q, producer, count):
    for n in range(count):
        q.put(b"%d:%d" % (producer, n))
    q.close()


def _consume_until_stop(q, conn):
    got = []
    while True:
        message = q.get(timeout=30)
        if message == b"stop":
            break
        got.append(message)
    conn.send(got)
    q.close()


@pytest.mark.parametrize("fsync", ["always", "interval"])
def test_processes_share_a_durable_queue_exactly_once(log_dir, shm_name,
                                                      scale, fsync):
    producers_n, consumers_n = 3, 2
    count = max(500, int(3000 * scale))
    context = multiprocessing.get_context("fork")
    q = SharedQueue(name=shm_name, persist=log_dir, fsync=fsync)
    pipes = [context.Pipe(duplex=False) for _ in range(consumers_n)]
    consumers = [context.Process(target=_consume_until_stop,
                                 args=(q, send_end))
                 for _, send_end in pipes]
    producers = [context.Process(target=_produce_range, args=(q, p, count))
                 for p in range(producers_n)]
    processes = consumers + producers
    try:
        for process in processes:
            process.start()
        for process in producers:
            process.join(CHILD_TIMEOUT_S)
        assert [p.exitcode for p in producers] == [0] * producers_n
        for _ in consumers:
            q.put(b"stop")
        results = []
        for receive_end, _ in pipes:
            assert receive_end.poll(CHILD_TIMEOUT_S), "a consumer hung"
            results.append(receive_end.recv())
        for process in consumers:
            process.join(CHILD_TIMEOUT_S)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(10)
    received = [m for got in results for m in got]
    assert len(received) == len(set(received))
    per_producer = {}
    for got in results:
        for message in got:
            producer, n = (int(x) for x in message.split(b":"))
            per_producer.setdefault(producer, []).append(n)
    for producer in range(producers_n):
        assert sorted(per_producer[producer]) == list(range(count))
    assert q.qsize() == 0
    q.close()


def test_put_async_with_always_does_not_block_the_loop(log_dir):
    q = SharedQueue(persist=log_dir, fsync="always")

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        task = asyncio.create_task(ticker())
        await asyncio.gather(*(q.put_async(b"%d" % n) for n in range(20)))
        got = [await q.get_async(timeout=5) for _ in range(20)]
        task.cancel()
        return ticks, got

    ticks, got = asyncio.run(main())
    assert sorted(got) == sorted(b"%d" % n for n in range(20))
    assert ticks > 0
    q.close()


class Unreadable:
    """Pickles fine but fails to unpickle: int("not-an-int")."""

    def __reduce__(self):
        return (int, ("not-an-int",))


def test_undecodable_durable_message_counted(log_dir):
    q = SharedQueue(persist=log_dir)
    try:
        q.put(Unreadable())
        q.put("next")
        with pytest.raises(mqs.MessageDecodeError, match="message dropped"):
            q.get(timeout=5)
        assert q.get(timeout=5) == "next"

        q.put_many(["a", Unreadable(), "b"])
        got = []
        failures = 0
        # One get_many call claims the three messages or only some of
        # them, so the bad one is either logged or raised.
        while len(got) < 2:
            try:
                got += q.get_many(10, timeout=5)
            except mqs.MessageDecodeError:
                failures += 1
        assert got == ["a", "b"]
        assert failures <= 1
        assert q.stats().dropped["decode_failed"] == 2
    finally:
        q.close()
