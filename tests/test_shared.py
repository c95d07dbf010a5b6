"""Tests of mqs.SharedQueue: the multiprocessing.Queue drop-in on shared memory.

Every test runs real processes on real shared memory. Named queues get a
unique name per test, and the fixture removes their /dev/shm files.
Multi-process tests join their children with a time bound and kill
what is left by PID before failing.
"""

import array
import gc
import fcntl
import glob
import json
import multiprocessing
import os
import pickle
import queue
import random
import resource
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import zlib

import pytest

import mqs
from durable_helpers import communicate
from mqs.shared import QueueLayoutError, QueueNotFound, SharedQueue

SHM_DIR = "/dev/shm"
PAGE = os.sysconf("SC_PAGESIZE")
CHILD_TIMEOUT_S = 60

# Header layout of csrc/mqs_bytering.h, for the tests that read or
# corrupt a queue file.
HEADER_BYTES = 65536
CONFIG_VERSION_OFFSET = 8
CONFIG_CAPACITY_OFFSET = 16
PARTICIPANTS_OFFSET = 16 * 128
PARTICIPANT_BLOCK = 128
PARTICIPANT_PID_OFFSET = 40
PARTICIPANT_COPIES_OFFSET = 56
MAX_PARTICIPANTS = 256
LOCK_BASE = 1 << 40
# struct flock on LP64 Linux: l_type, l_whence, l_start, l_len, l_pid.
FLOCK_FORMAT = "hhxxxxqqixxxx"


# -- fixtures and helpers ---------------------------------------------------


@pytest.fixture
def shm_name():
    """Return a queue name unique to this test; remove its files after."""
    name = f"test-shared-{uuid.uuid4().hex[:16]}"
    yield name
    for path in glob.glob(os.path.join(SHM_DIR, f"mqs.{name}*")):
        os.unlink(path)


@pytest.fixture
def make_queue():
    """Return a SharedQueue factory; every queue made is closed after."""
    made = []

    def make(*args, **kwargs):
        q = SharedQueue(*args, **kwargs)
        made.append(q)
        return q

    yield make
    for q in made:
        q.close()


def shm_path(name):
    return os.path.join(SHM_DIR, f"mqs.{name}")


def finish_process(process, timeout=CHILD_TIMEOUT_S):
    """Join a multiprocessing.Process; kill it and fail past `timeout`."""
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join(10)
        pytest.fail(f"child process {process.pid} did not finish in "
                    f"{timeout} s; killed it")
    return process.exitcode


def wait_for_pid(pid, timeout=CHILD_TIMEOUT_S):
    """Reap a child made with os.fork; kill it and fail past `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"forked child {pid} did not finish in {timeout} s; "
                f"killed it")


def process_state(pid):
    """Return the one-letter state of a process from /proc (R, S, T...)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def wait_until_sleeping(pid, timeout=30.0):
    """Wait until the process sleeps in the kernel (state S)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_state(pid) == "S":
            return
        time.sleep(0.01)
    pytest.fail(f"process {pid} never went to sleep in {timeout} s")


def participant_pids(path):
    """Return {slot: pid} of the participant blocks that name a pid."""
    with open(path, "rb") as file:
        header = file.read(HEADER_BYTES)
    pids = {}
    for slot in range(MAX_PARTICIPANTS):
        offset = (PARTICIPANTS_OFFSET + slot * PARTICIPANT_BLOCK
                  + PARTICIPANT_PID_OFFSET)
        pid = struct.unpack_from("<q", header, offset)[0]
        if pid:
            pids[slot] = pid
    return pids


def participant_copies(path):
    """Return {slot: copies} of the participant blocks whose `copies`
    word (copied out, not yet returned) is not zero."""
    with open(path, "rb") as file:
        header = file.read(HEADER_BYTES)
    copies = {}
    for slot in range(MAX_PARTICIPANTS):
        offset = (PARTICIPANTS_OFFSET + slot * PARTICIPANT_BLOCK
                  + PARTICIPANT_COPIES_OFFSET)
        count = struct.unpack_from("<q", header, offset)[0]
        if count:
            copies[slot] = count
    return copies


def slot_locked(path, slot):
    """Whether some open file description holds slot's liveness lock."""
    fd = os.open(path, os.O_RDONLY)
    try:
        request = struct.pack(FLOCK_FORMAT, fcntl.F_WRLCK, os.SEEK_SET,
                              LOCK_BASE + slot, 1, 0)
        result = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, request)
    finally:
        os.close(fd)
    return struct.unpack(FLOCK_FORMAT, result)[0] != fcntl.F_UNLCK


def patch_file(path, offset, data):
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def run_python(code, timeout=CHILD_TIMEOUT_S):
    """Run code in a new Python interpreter; return (status, out, err)."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    return communicate(proc, timeout)


# Children of multiprocessing tests. Module level, so spawn and forkserver
# children can import them.


def echo_child(inbox, outbox):
    item = inbox.get(timeout=30)
    outbox.put(("echo", item, os.getpid()))


def put_range_then_report_qsize(q, count, conn):
    for i in range(count):
        q.put(i)
    conn.send(q.qsize())
    conn.recv()
    conn.send(q.qsize())


def idle_get_child(q, conn):
    # A short wait first: a child forked from a large process pays
    # copy-on-write page faults on the first pages it touches, which
    # says nothing about the cost of staying blocked.
    try:
        q.get(timeout=0.2)
    except queue.Empty:
        pass
    # A collection in the child walks the whole heap inherited from the
    # test process and faults its pages in: interpreter cost, not the
    # queue's. Move every object out of the collector's reach first.
    gc.collect()
    gc.freeze()
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.monotonic()
    try:
        q.get(timeout=2.0)
        outcome = "got a message"
    except queue.Empty:
        outcome = "empty"
    elapsed = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    conn.send((outcome, cpu, elapsed))


def get_one_after_delay(q, delay):
    time.sleep(delay)
    q.get(timeout=30)


class JsonSerializer:
    """Serializer that counts its calls, to prove the queue used it."""

    def __init__(self):
        self.dumps_calls = 0
        self.loads_calls = 0

    def dumps(self, obj):
        self.dumps_calls += 1
        return json.dumps(obj).encode()

    def loads(self, data):
        self.loads_calls += 1
        return json.loads(data)


class FailingSerializer:
    def dumps(self, obj):
        raise RuntimeError(f"cannot serialize {obj!r}")

    def loads(self, data):
        raise AssertionError("loads must not be called")


class TaggedBytes(bytes):
    """A bytes subclass: not the exact type, so it travels by pickle."""


# -- construction ---------------------------------------------------------


def test_shared_queue_rejects_capacity_not_power_of_two():
    with pytest.raises(ValueError, match=(
            rf"capacity_bytes must be a power of two from {PAGE} to 2\*\*40, "
            rf"got {PAGE + 1000} \(try {PAGE * 2}\)")):
        SharedQueue(capacity_bytes=PAGE + 1000)


@pytest.mark.parametrize("capacity", [0, PAGE // 2, -PAGE, 2**41])
def test_shared_queue_rejects_capacity_out_of_range(capacity):
    with pytest.raises(ValueError,
                       match=rf"power of two from {PAGE} to 2\*\*40, "
                             rf"got {capacity}$"):
        SharedQueue(capacity_bytes=capacity)


@pytest.mark.parametrize("size", [-1, 0, PAGE - 15, PAGE])
def test_shared_queue_rejects_max_message_size_out_of_range(size):
    with pytest.raises(ValueError, match=(
            rf"max_message_size must be 1 to {PAGE - 16} for a ring of "
            rf"{PAGE} bytes, got {size}; raise capacity_bytes")):
        SharedQueue(capacity_bytes=PAGE, max_message_size=size)


@pytest.mark.parametrize("field, value, text", [
    ("maxsize", 2**70, r"maxsize must be at most 2\*\*63 - 1, got "
                       r"1180591620717411303424; pass 0 for a queue bounded "
                       r"only by capacity_bytes"),
    ("max_message_size", 2**70, r"max_message_size must be 1 to "),
])
def test_shared_queue_rejects_sizes_beyond_64_bits(field, value, text):
    with pytest.raises(ValueError, match=text):
        SharedQueue(**{field: value})


@pytest.mark.parametrize("field, value, text", [
    ("maxsize", "3", "maxsize must be an int, got str '3'"),
    ("maxsize", True, "maxsize must be an int, got bool True"),
    ("capacity_bytes", 4096.0, "capacity_bytes must be an int, got float"),
    ("max_message_size", "10", "max_message_size must be an int, got str"),
])
def test_shared_queue_rejects_sizes_of_wrong_type(field, value, text):
    with pytest.raises(TypeError, match=text):
        SharedQueue(**{field: value})


def test_shared_queue_rejects_unknown_wait_strategy():
    with pytest.raises(ValueError, match=(
            "wait_strategy must be 'block', 'spin' or 'yield', "
            "got 'busy'")):
        SharedQueue(wait_strategy="busy")


def test_shared_queue_rejects_serializer_without_loads():
    class DumpsOnly:
        def dumps(self, obj):
            return b""

    with pytest.raises(TypeError, match="serializer must have dumps"):
        SharedQueue(serializer=DumpsOnly())


@pytest.mark.parametrize("name", ["", "a/b", ".", "..", "x" * 201])
def test_shared_queue_rejects_invalid_name(name):
    with pytest.raises(ValueError, match="name must be 1 to 200 characters"):
        SharedQueue(name=name)


def test_shared_queue_rejects_name_of_wrong_type():
    with pytest.raises(TypeError, match="name must be a str, got bytes"):
        SharedQueue(name=b"queue")


def test_shared_queue_reports_its_sizes(make_queue):
    q = make_queue(5, capacity_bytes=2 * PAGE)
    assert q.maxsize == 5
    assert q.capacity_bytes == 2 * PAGE
    assert q.max_message_size == 2 * PAGE - 16
    assert q.name is None


def test_shared_queue_negative_maxsize_means_unbounded(make_queue):
    q = make_queue(-3, capacity_bytes=PAGE)
    assert q.maxsize == 0
    assert q.full() is False


def test_shared_queue_repr_shows_name_and_state(make_queue, shm_name):
    q = make_queue(name=shm_name, capacity_bytes=PAGE)
    assert repr(q) == f"<mqs.SharedQueue name={shm_name!r} open>"
    q.close()
    assert repr(q) == f"<mqs.SharedQueue name={shm_name!r} closed>"


def test_shared_errors_subclass_the_builtins_callers_catch():
    assert issubclass(mqs.Empty, queue.Empty)
    assert issubclass(mqs.Full, queue.Full)
    assert issubclass(mqs.MessageTooLarge, ValueError)
    assert issubclass(QueueNotFound, FileNotFoundError)
    assert issubclass(QueueLayoutError, ValueError)
    for error in (mqs.Empty, mqs.Full, mqs.MessageTooLarge, QueueNotFound,
                  QueueLayoutError):
        assert issubclass(error, mqs.MqsError)
    assert mqs.QueueNotFound is QueueNotFound
    assert mqs.SharedQueue is SharedQueue


# -- put and get ----------------------------------------------------------


def test_put_get_keep_fifo_order(make_queue):
    q = make_queue(capacity_bytes=PAGE * 4)
    items = [b"first", bytearray(b"second"), {"third": 3}, 4, None, "five"]
    for item in items:
        q.put(item)
    assert q.qsize() == len(items)
    received = [q.get(timeout=5) for _ in items]
    assert received == items
    assert q.qsize() == 0


def test_get_nowait_raises_empty_on_empty_queue(make_queue):
    q = make_queue(capacity_bytes=PAGE)
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(mqs.Empty):
        q.get(block=False)


def test_put_nowait_raises_full_at_maxsize(make_queue):
    q = make_queue(2, capacity_bytes=PAGE)
    q.put_nowait(b"a")
    q.put_nowait(b"b")
    with pytest.raises(queue.Full):
        q.put_nowait(b"c")
    with pytest.raises(mqs.Full):
        q.put(b"c", block=False)
    assert q.qsize() == 2
    assert q.get_nowait() == b"a"
    q.put_nowait(b"c")
    assert [q.get_nowait(), q.get_nowait()] == [b"b", b"c"]


@pytest.mark.parametrize("strategy", ["block", "spin", "yield"])
def test_get_waits_whole_timeout_before_empty(make_queue, strategy):
    q = make_queue(capacity_bytes=PAGE, wait_strategy=strategy)
    for timeout in (0.0, 0.05, 0.3):
        start = time.monotonic()
        with pytest.raises(queue.Empty):
            q.get(timeout=timeout)
        elapsed = time.monotonic() - start
        assert elapsed >= timeout
        assert elapsed < timeout + 5.0


@pytest.mark.parametrize("strategy", ["block", "spin", "yield"])
def test_put_waits_whole_timeout_before_full(make_queue, strategy):
    q = make_queue(1, capacity_bytes=PAGE, wait_strategy=strategy)
    q.put(b"only")
    for timeout in (0.0, 0.05, 0.3):
        start = time.monotonic()
        with pytest.raises(queue.Full):
            q.put(b"more", timeout=timeout)
        elapsed = time.monotonic() - start
        assert elapsed >= timeout
        assert elapsed < timeout + 5.0
    assert q.qsize() == 1


def test_get_view_waits_whole_timeout_before_empty(make_queue):
    q = make_queue(capacity_bytes=PAGE)
    start = time.monotonic()
    with pytest.raises(queue.Empty), q.get_view(timeout=0.3):
        pass
    assert time.monotonic() - start >= 0.3


def test_put_rejects_negative_timeout_when_room(make_queue):
    q = make_queue(capacity_bytes=PAGE)
    with pytest.raises(ValueError, match=(
            "timeout must be a non-negative number of seconds, got -1")):
        q.put(b"x", timeout=-1)
    assert q.qsize() == 0


def test_put_rejects_negative_timeout_when_full(make_queue):
    q = make_queue(1, capacity_bytes=PAGE)
    q.put(b"x")
    with pytest.raises(ValueError, match="got -0.5"):
        q.put(b"y", timeout=-0.5)
    assert q.qsize() == 1


def test_get_rejects_negative_timeout_and_keeps_message(make_queue):
    q = make_queue(capacity_bytes=PAGE)
    q.put(b"kept")
    with pytest.raises(ValueError, match="got -1"):
        q.get(timeout=-1)
    assert q.qsize() == 1
    assert q.get_nowait() == b"kept"
    with pytest.raises(ValueError, match="got -1"):
        q.get(timeout=-1)


def test_batch_and_view_calls_reject_negative_timeout(make_queue):
    q = make_queue(capacity_bytes=PAGE)
    with pytest.raises(ValueError, match="got -2"):
        q.put_many([b"a", b"b"], timeout=-2)
    assert q.qsize() == 0
    q.put(b"a")
    with pytest.raises(ValueError, match="got -2"):
        q.get_many(5, timeout=-2)
    with pytest.raises(ValueError, match="got -2"), q.get_view(timeout=-2):
        pass
    assert q.qsize() == 1


def test_nonblocking_calls_ignore_timeout(make_queue):
    q = make_queue(1, capacity_bytes=PAGE)
    q.put(b"x", block=False, timeout=-1)
    assert q.get(block=False, timeout=-1) == b"x"


@pytest.mark.parametrize("timeout", ["soon", float("nan")])
def test_get_rejects_timeout_that_is_not_a_number(make_queue, timeout):
    q = make_queue(capacity_bytes=PAGE)
    error = TypeError if isinstance(timeout, str) else ValueError
    with pytest.raises(error, match="timeout must be a"):
        q.get(timeout=timeout)


def test_qsize_is_exact_from_another_process(make_queue):
    q = make_queue(capacity_bytes=PAGE * 4)
    context = multiprocessing.get_context("fork")
    parent_end, child_end = context.Pipe()
    child = context.Process(target=put_range_then_report_qsize,
                            args=(q, 37, child_end))
    child.start()
    assert parent_end.poll(CHILD_TIMEOUT_S)
    assert parent_end.recv() == 37
    assert q.qsize() == 37
    assert [q.get(timeout=5) for _ in range(10)] == list(range(10))
    assert q.qsize() == 27
    parent_end.send("report")
    assert parent_end.poll(CHILD_TIMEOUT_S)
    assert parent_end.recv() == 27
    assert finish_process(child) == 0


def test_empty_and_full_follow_contents(make_queue):
    q = make_queue(2, capacity_bytes=PAGE)
    assert q.empty() is True
    assert q.full() is False
    q.put(b"a")
    assert q.empty() is False
    assert q.full() is False
    q.put(b"b")
    assert q.full() is True
    q.get()
    assert q.full() is False


def test_queue_is_usable_from_several_threads(make_queue):
    q = make_queue(capacity_bytes=PAGE * 16)
    per_thread = 2000
    received = []
    lock = threading.Lock()

    def produce(base):
        for i in range(per_thread):
            q.put((base, i), timeout=30)

    def consume():
        for _ in range(per_thread):
            item = q.get(timeout=30)
            with lock:
                received.append(item)

    threads = [threading.Thread(target=produce, args=(b,)) for b in range(3)]
    threads += [threading.Thread(target=consume) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CHILD_TIMEOUT_S)
    assert not any(thread.is_alive() for thread in threads)
    assert sorted(received) == [(b, i) for b in range(3)
                                for i in range(per_thread)]
    assert q.qsize() == 0


# -- closing ----------------------------------------------------------------


@pytest.mark.parametrize("call", [
    lambda q: q.put(b"x"),
    lambda q: q.put_nowait(b"x"),
    lambda q: q.put_many([b"x"]),
    lambda q: q.get(),
    lambda q: q.get_nowait(),
    lambda q: q.get_many(3),
    lambda q: q.get_view(),
    lambda q: q.qsize(),
    lambda q: q.empty(),
    lambda q: q.full(),
    lambda q: q.stats(),
], ids=["put", "put_nowait", "put_many", "get", "get_nowait", "get_many",
        "get_view", "qsize", "empty", "full", "stats"])
def test_closed_queue_raises_value_error(make_queue, call):
    q = make_queue(capacity_bytes=PAGE)
    q.put(b"left behind")
    q.close()
    with pytest.raises(ValueError,
                       match=r"Queue <mqs.SharedQueue name=None closed> "
                             r"is closed"):
        call(q)


CLOSE_WHILE_WAITING = """
import json, sys, threading, time
import mqs

case, directory = sys.argv[1], sys.argv[2]
if case == "durable_get":
    q = mqs.SharedQueue(persist=directory, capacity_bytes=65536)
else:
    q = mqs.SharedQueue(capacity_bytes=4096)
view = None
if case == "put":
    while True:
        try:
            q.put_nowait(b"x" * 100)
        except mqs.Full:
            break
elif case == "get_with_view":
    q.put(b"viewed")
    view = q.get_view(timeout=5)
    record = view.__enter__()
outcome = []


def call():
    try:
        if case == "put":
            q.put(b"y" * 100, timeout=30)
        else:
            q.get(timeout=30)
        outcome.append("returned")
    except ValueError as exc:
        outcome.append(str(exc))


waiter = threading.Thread(target=call)
waiter.start()
time.sleep(0.3)
q.close()
waiter.join(10)
if view is not None:
    # The view outlives the close and the waiter: its record stays.
    outcome.append(bytes(record).decode())
    view.__exit__(None, None, None)
print(json.dumps(outcome))
"""


@pytest.mark.parametrize("case",
                         ["get", "put", "durable_get", "get_with_view"])
def test_close_while_thread_waits(case, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", CLOSE_WHILE_WAITING, case,
         str(tmp_path / "q")],
        capture_output=True, text=True, timeout=60)
    # A close() that unmapped the ring under the waiting thread would
    # kill the process with SIGSEGV.
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert "closed by another thread" in outcome[0]
    if case == "get_with_view":
        assert outcome[1:] == ["viewed"]


CLOSE_WHILE_SERIALIZING = """
import json, sys, threading, time
import mqs

case = sys.argv[1]


def load_slowly():
    time.sleep(0.3)
    return "loaded"


class SlowToLoad:
    def __reduce__(self):
        return (load_slowly, ())


class SlowToDump:
    def __reduce__(self):
        time.sleep(0.3)
        return (str, ("dumped",))


q = mqs.SharedQueue(capacity_bytes=65536)
outcome = []


def call():
    try:
        if case == "put":
            outcome.append(q.put(SlowToDump()))
        elif case == "get_after_wait":
            outcome.append(q.get(timeout=30))
        else:
            outcome.append(q.get_many(10, timeout=30))
    except ValueError as exc:
        outcome.append(str(exc))


if case == "get_many":
    for _ in range(3):
        q.put(SlowToLoad())
caller = threading.Thread(target=call)
caller.start()
time.sleep(0.1)
if case == "get_after_wait":
    # Wakes the waiting get, which then deserializes for 0.3 s.
    q.put(SlowToLoad())
    time.sleep(0.1)
q.close()
caller.join(10)
print(json.dumps(outcome))
"""


@pytest.mark.parametrize("case", ["put", "get_after_wait", "get_many"])
def test_close_while_thread_serializes(case):
    result = subprocess.run(
        [sys.executable, "-c", CLOSE_WHILE_SERIALIZING, case],
        capture_output=True, text=True, timeout=60)
    # The serializer runs Python code, so close() can run in between. A
    # ring unmapped under the caller killed the process with SIGSEGV.
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    if case == "put":
        assert "closed by another thread" in outcome[0]
    elif case == "get_after_wait":
        # The message was taken before the close, so it is returned.
        assert outcome == ["loaded"]
    else:
        # The batch stops at the close, and the rest stays queued.
        assert outcome == [["loaded"]]


CLOSE_IN_FORKED_CHILD = """
import os, sys, threading, time
import mqs

q = mqs.SharedQueue(name=sys.argv[1], capacity_bytes=65536)


def wait():
    try:
        q.get(timeout=30)
    except ValueError:
        pass


waiter = threading.Thread(target=wait)
waiter.start()
time.sleep(0.2)
pid = os.fork()
if pid == 0:
    q.close()
    try:
        q.stats()
        os._exit(3)
    except ValueError:
        pass
    # The child's slot is free again: close left no participant behind.
    other = mqs.SharedQueue(name=sys.argv[1])
    attached = other.stats().attached_processes
    other.close()
    os._exit(0 if attached == 2 else 4)
_, status = os.waitpid(pid, 0)
q.close()
waiter.join(10)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_close_in_child_forked_during_wait(shm_name):
    result = subprocess.run(
        [sys.executable, "-c", CLOSE_IN_FORKED_CHILD, shm_name],
        capture_output=True, text=True, timeout=60)
    # The child inherited the count of the parent's waiting thread, so
    # its close() never unmapped the queue nor freed its slot.
    assert result.returncode == 0, result.stderr


CTRL_C_DURING_CLOSE = """
import os, signal, threading, time
import mqs

q = mqs.SharedQueue(capacity_bytes=4096)


def interrupt_and_close():
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGINT)
    q.close()


threading.Thread(target=interrupt_and_close).start()
try:
    q.get(timeout=30)
except KeyboardInterrupt:
    print("KeyboardInterrupt")
except ValueError as exc:
    print(f"ValueError: {exc}")
"""


def test_ctrl_c_during_close_reaches_caller():
    result = subprocess.run(
        [sys.executable, "-c", CTRL_C_DURING_CLOSE],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # The ValueError of the close must not replace the KeyboardInterrupt.
    assert result.stdout.strip() == "KeyboardInterrupt"


def test_join_thread_requires_close(make_queue):
    q = make_queue(capacity_bytes=PAGE)
    with pytest.raises(AssertionError, match="not closed"):
        q.join_thread()
    q.cancel_join_thread()
    q.close()
    q.close()
    assert q.join_thread() is None


def test_close_keeps_messages_for_other_handles(make_queue, shm_name):
    writer = make_queue(name=shm_name, capacity_bytes=PAGE)
    reader = make_queue(name=shm_name, create=False)
    writer.put(b"survives close")
    writer.close()
    assert reader.qsize() == 1
    assert reader.get(timeout=5) == b"survives close"


def test_context_manager_closes_queue(make_queue):
    with make_queue(capacity_bytes=PAGE) as q:
        q.put(b"x")
    with pytest.raises(ValueError, match="is closed"):
        q.get()


# -- batches -----------------------------------------------------------------


def test_put_many_get_many_round_trip(make_queue):
    q = make_queue(capacity_bytes=PAGE * 4)
    q.put_many([b"a", bytearray(b"b"), {"c": 1}, 4])
    assert q.qsize() == 4
    assert q.get_many(3) == [b"a", bytearray(b"b"), {"c": 1}]
    assert q.get_many(10) == [4]
    with pytest.raises(queue.Empty):
        q.get_many(10, block=False)


def test_get_many_waits_for_first_message(make_queue):
    q = make_queue(capacity_bytes=PAGE)
    start = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get_many(5, timeout=0.2)
    assert time.monotonic() - start >= 0.2


@pytest.mark.parametrize("max_items, error, text", [
    (0, ValueError, "max_items must be at least 1, got 0"),
    (-2, ValueError, "max_items must be at least 1, got -2"),
    (2**70, ValueError,
     r"max_items must be at most 2\*\*63 - 1, got 1180591620717411303424"),
    ("3", TypeError, "max_items must be an int, got str '3'"),
    (True, TypeError, "max_items must be an int, got bool True"),
])
def test_get_many_rejects_invalid_max_items(make_queue, max_items, error,
                                            text):
    q = make_queue(capacity_bytes=PAGE)
    q.put(b"x")
    with pytest.raises(error, match=text):
        q.get_many(max_items)
    assert q.qsize() == 1


def test_put_many_full_carries_accepted_count(make_queue):
    q = make_queue(3, capacity_bytes=PAGE)
    with pytest.raises(queue.Full) as caught:
        q.put_many([b"0", b"1", b"2", b"3", b"4"], block=False)
    assert caught.value.accepted == 3
    assert q.qsize() == 3
    assert q.get_many(5) == [b"0", b"1", b"2"]


def test_put_many_timeout_carries_accepted_count(make_queue):
    q = make_queue(2, capacity_bytes=PAGE)
    start = time.monotonic()
    with pytest.raises(mqs.Full, match="put 2 items of the batch") as caught:
        q.put_many(iter([b"a", b"b", b"c"]), timeout=0.2)
    assert time.monotonic() - start >= 0.2
    assert caught.value.accepted == 2
    assert q.qsize() == 2


def test_put_many_message_too_large_carries_accepted_count(make_queue):
    q = make_queue(capacity_bytes=PAGE, max_message_size=100)
    with pytest.raises(mqs.MessageTooLarge) as caught:
        q.put_many([b"ok", b"x" * 101, b"never"])
    assert caught.value.accepted == 1
    message = str(caught.value)
    assert "message is 101 bytes" in message
    assert "queued 1 earlier item(s), which stay queued" in message
    assert "this item and the rest of the batch were not added" in message
    assert q.get_many(5) == [b"ok"]


def test_put_many_unpicklable_item_carries_accepted_count(make_queue):
    q = make_queue(capacity_bytes=PAGE)
    with pytest.raises((TypeError, pickle.PicklingError)) as caught:
        q.put_many([b"ok", {"n": 2}, threading.Lock(), b"never"])
    assert caught.value.accepted == 2
    assert q.get_many(5) == [b"ok", {"n": 2}]


def test_durable_put_many_error_keeps_earlier(tmp_path):
    q = mqs.SharedQueue(persist=str(tmp_path / "log"), fsync="always")
    with pytest.raises((TypeError, pickle.PicklingError)) as caught:
        q.put_many([b"kept", threading.Lock()])
    assert caught.value.accepted == 1
    q.close()
    again = mqs.SharedQueue(persist=str(tmp_path / "log"))
    assert again.get(timeout=5) == b"kept"
    again.close()


# -- message types -------------------------------------------------------------


@pytest.mark.parametrize("item, expected", [
    (b"raw bytes", b"raw bytes"),
    (b"", b""),
    (bytearray(b"raw bytearray"), bytearray(b"raw bytearray")),
    (bytearray(), bytearray()),
    (memoryview(b"from a view"), b"from a view"),
    (memoryview(b""), b""),
    (memoryview(b"0123456789")[2:6], b"2345"),
])
def test_binary_messages_keep_their_type(make_queue, item, expected):
    q = make_queue(capacity_bytes=PAGE)
    q.put(item)
    received = q.get(timeout=5)
    assert type(received) is type(expected)
    assert received == expected


def test_memoryview_of_other_layouts_comes_back_as_bytes(make_queue):
    q = make_queue(capacity_bytes=PAGE)
    numbers = array.array("i", range(10))
    strided = memoryview(bytes(range(20)))[::2]
    q.put(memoryview(numbers))
    q.put(strided)
    first = q.get(timeout=5)
    second = q.get(timeout=5)
    assert type(first) is bytes
    assert first == numbers.tobytes()
    assert type(second) is bytes
    assert second == strided.tobytes()


def test_zero_length_messages_round_trip_in_bulk(make_queue):
    q = make_queue(capacity_bytes=PAGE)
    # Each empty message takes a 16-byte header: 256 fill the ring.
    for _ in range(PAGE // 16):
        q.put_nowait(b"")
    with pytest.raises(queue.Full):
        q.put_nowait(b"")
    assert q.qsize() == PAGE // 16
    assert q.get_many(PAGE) == [b""] * (PAGE // 16)


def test_pickled_objects_round_trip(make_queue):
    q = make_queue(capacity_bytes=PAGE * 4)
    items = [None, 0, -7, 2**100, 1.5, "text", ("a", 1), [1, [2, [3]]],
             {"nested": {"k": [1, 2]}}, {1, 2, 3}, TaggedBytes(b"tag"),
             ValueError("kept")]
    for item in items:
        q.put(item)
    received = [q.get(timeout=5) for _ in items]
    assert received[:-2] == items[:-2]
    assert type(received[-2]) is TaggedBytes
    assert received[-2] == b"tag"
    assert type(received[-1]) is ValueError
    assert received[-1].args == ("kept",)


def test_numpy_arrays_travel_out_of_band(make_queue):
    np = pytest.importorskip("numpy")
    q = make_queue(capacity_bytes=1 << 22)
    arrays = [
        np.arange(12, dtype=np.float64).reshape(3, 4),
        np.arange(-50, 50, dtype=np.int8),
        np.array([1 + 2j, 3 - 4j], dtype=np.complex128),
        np.asfortranarray(np.arange(6, dtype=np.uint16).reshape(2, 3)),
        np.zeros(0, dtype=np.int32),
        np.array([(1, 2.5), (3, 4.5)], dtype=[("id", "<i4"), ("x", "<f8")]),
        np.random.default_rng(7).random(200_000),
    ]
    for value in arrays:
        q.put(value)
    for value in arrays:
        received = q.get(timeout=5)
        assert type(received) is np.ndarray
        assert received.dtype == value.dtype
        assert received.shape == value.shape
        assert np.array_equal(received, value)
        assert received.flags.writeable

    # The record of an array starts with the out-of-band header (a u32
    # count of buffers), not with a pickle stream's PROTO opcode.
    q.put(np.arange(100, dtype=np.int64))
    with q.get_view(timeout=5) as view:
        assert bytes(view[:2]) != b"\x80\x05"
        assert int.from_bytes(view[:4], "little") == 1


def test_numpy_non_contiguous_array_round_trips(make_queue):
    np = pytest.importorskip("numpy")
    q = make_queue(capacity_bytes=1 << 16)
    value = np.arange(100, dtype=np.float32).reshape(10, 10)[::2, ::3]
    q.put(value)
    received = q.get(timeout=5)
    assert received.dtype == np.float32
    assert received.shape == (5, 4)
    assert np.array_equal(received, value)


def test_custom_serializer_carries_other_objects(make_queue):
    serializer = JsonSerializer()
    q = make_queue(capacity_bytes=PAGE, serializer=serializer)
    q.put({"k": [1, 2]})
    q.put(b"raw stays raw")
    q.put(bytearray(b"raw too"))
    assert q.get(timeout=5) == {"k": [1, 2]}
    assert q.get(timeout=5) == b"raw stays raw"
    assert q.get(timeout=5) == bytearray(b"raw too")
    assert serializer.dumps_calls == 1
    assert serializer.loads_calls == 1


def test_serializer_error_raises_in_put_and_queue_keeps_working(make_queue):
    q = make_queue(capacity_bytes=PAGE, serializer=FailingSerializer())
    with pytest.raises(RuntimeError, match=r"cannot serialize \{'a': 1\}"):
        q.put({"a": 1})
    assert q.qsize() == 0
    q.put(b"after")
    assert q.get(timeout=5) == b"after"


def test_serializer_returning_str_raises_in_put(make_queue):
    # json.dumps returns str, so the json module is not a serializer.
    q = make_queue(capacity_bytes=PAGE, serializer=json)
    with pytest.raises(TypeError, match=r"serializer.dumps\(\) must return "
                                        r"bytes, but <module 'json'.* "
                                        r"returned str '\{\"a\": 1\}'"):
        q.put({"a": 1})
    assert q.qsize() == 0
    q.put(b"after")
    assert q.get(timeout=5) == b"after"


def test_unpicklable_object_raises_in_put_and_queue_keeps_working(
        make_queue):
    q = make_queue(capacity_bytes=PAGE)
    q.put(b"before")
    with pytest.raises(TypeError, match="cannot pickle '_thread.lock' object"):
        q.put(threading.Lock())
    with pytest.raises(TypeError, match="cannot pickle"):
        q.put_many([b"ok", threading.Lock()])
    assert q.qsize() == 2
    q.put({"after": True})
    assert q.get(timeout=5) == b"before"
    assert q.get(timeout=5) == b"ok"
    assert q.get(timeout=5) == {"after": True}
    assert q.qsize() == 0


# -- message size limits ---------------------------------------------------


def test_put_raises_message_too_large_naming_both_sizes(make_queue):
    q = make_queue(capacity_bytes=PAGE, max_message_size=100)
    with pytest.raises(mqs.MessageTooLarge, match=(
            rf"message is 101 bytes, max_message_size is 100 \(ring "
            rf"capacity_bytes {PAGE}\); raise the limit or split the "
            rf"message")):
        q.put(b"x" * 101)
    q.put(b"x" * 100)
    assert q.get(timeout=5) == b"x" * 100


def test_put_raises_message_too_large_for_ring(make_queue):
    q = make_queue(capacity_bytes=PAGE)
    with pytest.raises(mqs.MessageTooLarge,
                       match=rf"message is {PAGE} bytes, max_message_size "
                             rf"is {PAGE - 16}"):
        q.put(bytearray(PAGE))
    biggest = bytes(i % 251 for i in range(PAGE - 16))
    q.put(biggest)
    assert q.get(timeout=5) == biggest


def test_message_too_large_is_raised_at_once_when_full(make_queue):
    q = make_queue(1, capacity_bytes=PAGE, max_message_size=64)
    q.put(b"fills maxsize")
    start = time.monotonic()
    with pytest.raises(mqs.MessageTooLarge, match="message is 65 bytes"):
        q.put(b"y" * 65, timeout=30)
    assert time.monotonic() - start < 5.0


def test_message_too_large_counts_pickled_size(make_queue):
    q = make_queue(capacity_bytes=PAGE, max_message_size=200)
    with pytest.raises(mqs.MessageTooLarge,
                       match=r"message is \d+ bytes, max_message_size is 200"):
        q.put({"text": "z" * 300})
    assert q.qsize() == 0


# -- zero-copy views -----------------------------------------------------------


def test_get_view_lends_read_only_bytes(make_queue):
    q = make_queue(capacity_bytes=PAGE)
    q.put(b"look, no copy")
    with q.get_view(timeout=5) as view:
        assert type(view) is memoryview
        assert view.readonly
        assert bytes(view) == b"look, no copy"
        assert q.qsize() == 0
        with pytest.raises(TypeError):
            view[0] = 0
    with pytest.raises(ValueError, match="released"):
        bytes(view)


def test_get_view_of_pickled_message_shows_serialized_bytes(make_queue):
    q = make_queue(capacity_bytes=PAGE)
    q.put({"a": [1, 2]})
    with q.get_view(timeout=5) as view:
        assert pickle.loads(view) == {"a": [1, 2]}


def test_get_view_keeps_record_from_producers(make_queue):
    q = make_queue(capacity_bytes=PAGE)
    original = bytes(range(112))
    q.put(original)
    with q.get_view(timeout=5) as view:
        # 112 payload bytes take 128 with the header: the lent record
        # keeps 128 of the 4096 bytes, so 31 more fit.
        puts = 0
        while True:
            try:
                q.put_nowait(b"\xff" * 112)
            except queue.Full:
                break
            puts += 1
        assert puts == PAGE // 128 - 1
        assert bytes(view) == original
    # Releasing the view frees its 128 bytes.
    q.put_nowait(b"\xff" * 112)
    assert q.qsize() == PAGE // 128


def test_get_view_slice_keeps_record_after_block(make_queue):
    q = make_queue(capacity_bytes=PAGE)
    q.put(b"0123456789" * 11 + b"ab")
    with q.get_view(timeout=5) as view:
        part = view[10:20]
    with pytest.raises(ValueError):
        view[0]
    filled = 0
    while True:
        try:
            q.put_nowait(b"\xee" * 112)
        except queue.Full:
            break
        filled += 1
    assert filled == PAGE // 128 - 1
    assert bytes(part) == b"0123456789"
    del part
    q.put_nowait(b"\xee" * 112)
    assert q.qsize() == PAGE // 128


def test_get_view_keeps_record_after_close(make_queue, shm_name):
    lender = make_queue(name=shm_name, capacity_bytes=PAGE)
    writer = make_queue(name=shm_name, create=False)
    writer.put(b"A" * 112)
    with lender.get_view(timeout=5) as view:
        part = view[:]
    lender.close()
    puts = 0
    while True:
        try:
            writer.put_nowait(b"B" * 112)
        except queue.Full:
            break
        puts += 1
    assert puts == PAGE // 128 - 1
    assert bytes(part) == b"A" * 112
    del part
    # With the last view gone, the closed handle gave up its slot and
    # the record's bytes are free again.
    writer.put_nowait(b"C" * 112)
    assert writer.qsize() == PAGE // 128
    assert len(participant_pids(shm_path(shm_name))) == 2
    assert [slot_locked(shm_path(shm_name), slot) for slot in (0, 1)] == [
        False, True]


def test_nested_views_hold_the_oldest_record(make_queue):
    q = make_queue(capacity_bytes=PAGE)
    q.put(b"1" * 112)
    q.put(b"2" * 112)
    with q.get_view(timeout=5) as first:
        with q.get_view(timeout=5) as second:
            assert bytes(second) == b"2" * 112
        filled = 0
        while True:
            try:
                q.put_nowait(b"3" * 112)
            except queue.Full:
                break
            filled += 1
        # The producers stop at the older record: the younger one's
        # bytes lie after it and stay unused until the first is released.
        assert filled == PAGE // 128 - 2
        assert bytes(first) == b"1" * 112
    q.put_nowait(b"4" * 112)
    q.put_nowait(b"4" * 112)
    with pytest.raises(queue.Full):
        q.put_nowait(b"4" * 112)


def numbered(n):
    """A 112-byte message (a 128-byte record) that starts with n."""
    return n.to_bytes(4, "little") + bytes(108)


def hold_then_sleep(name, mode, ready_fd):
    """In a forked child: take messages as `mode` selects, write the
    first 4 bytes of each to ready_fd, then sleep holding what it took."""
    child = SharedQueue(name=name, create=False)
    if mode == "get":
        os.write(ready_fd, child.get(timeout=10)[:4])
        time.sleep(CHILD_TIMEOUT_S)
        return
    with child.get_view(timeout=10) as first:
        os.write(ready_fd, bytes(first[:4]))
        if mode == "two views":
            with child.get_view(timeout=10) as second:
                os.write(ready_fd, bytes(second[:4]))
                time.sleep(CHILD_TIMEOUT_S)
        time.sleep(CHILD_TIMEOUT_S)


@pytest.mark.parametrize("mode, lost", [("get", 0), ("view", 1),
                                       ("two views", 2)])
def test_killed_view_holder_counts_consumer_died(make_queue, shm_name, mode,
                                                 lost):
    # 8 KiB ring: 64 records of 128 bytes, so the puts below wrap onto
    # the bytes that the dead consumer's view pin held.
    q = make_queue(name=shm_name, capacity_bytes=8192)
    for n in range(10):
        q.put(numbered(n))
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_read)
            hold_then_sleep(shm_name, mode, ready_write)
        finally:
            os._exit(1)
    os.close(ready_write)
    prefixes = b""
    try:
        # The child exits (closing the pipe) if it fails before then.
        while len(prefixes) < 4 * max(lost, 1):
            chunk = os.read(ready_read, 4)
            if not chunk:
                break
            prefixes += chunk
    finally:
        os.close(ready_read)
    os.kill(pid, signal.SIGKILL)
    assert wait_for_pid(pid) == -signal.SIGKILL
    taken_count = len(prefixes) // 4
    assert prefixes == b"".join(numbered(n)[:4] for n in range(taken_count))
    assert taken_count == max(lost, 1)

    # A view is counted when the dead process is reaped: by a fresh
    # attach here, which may reuse its slot, or by any later repair.
    fresh = make_queue(name=shm_name, create=False)
    assert fresh.stats().dropped["consumer_died"] == lost
    assert q.stats().dropped["consumer_died"] == lost

    # No wedge: the ring wraps twice over the dead consumer's bytes and
    # every other message arrives exactly once, in order.
    got = []
    for n in range(10, 138):
        q.put_nowait(numbered(n))
        got.append(fresh.get_nowait())
    got.extend(fresh.get_nowait() for _ in range(10 - taken_count))
    with pytest.raises(queue.Empty):
        fresh.get_nowait()
    expected = list(range(taken_count, 10)) + list(range(10, 138))
    assert [int.from_bytes(m[:4], "little") for m in got] == expected
    assert q.stats().dropped["consumer_died"] == lost


class StallingNumbers:
    """Serializer of ints as `numbered` records. Its `stall_at`-th loads
    writes one byte to ready_fd and sleeps, so a parent can kill the
    process while that message is copied out but not yet returned."""

    def __init__(self, stall_at=None, ready_fd=None):
        self.stall_at = stall_at
        self.ready_fd = ready_fd
        self.loads_done = 0

    def dumps(self, n):
        return numbered(n)

    def loads(self, data):
        self.loads_done += 1
        if self.loads_done == self.stall_at:
            os.write(self.ready_fd, b"s")
            time.sleep(CHILD_TIMEOUT_S)
        return int.from_bytes(data[:4], "little")


def take_then_sleep(name, mode, stall_at, ready_fd):
    """In a forked child: get or get_many as `mode` selects, stalling in
    the `stall_at`-th decode; with stall_at None, sleep after the call
    returned."""
    child = SharedQueue(name=name, create=False,
                        serializer=StallingNumbers(stall_at, ready_fd))
    if mode == "get":
        child.get(timeout=10)
    else:
        child.get_many(100, timeout=10)
    os.write(ready_fd, b"r")
    time.sleep(CHILD_TIMEOUT_S)


@pytest.mark.parametrize("mode, stall_at, lost", [
    ("get", 1, 1),
    ("get", None, 0),
    ("get_many", 1, 1),
    ("get_many", 7, 7),
    ("get_many", 20, 20),
    ("get_many", None, 0),
])
def test_killed_batch_counts_consumer_died(make_queue, shm_name, mode,
                                           stall_at, lost):
    # 8 KiB ring: 64 records of 128 bytes, so the puts below wrap twice
    # over the bytes of the messages the dead consumer took.
    q = make_queue(name=shm_name, capacity_bytes=8192,
                   serializer=StallingNumbers())
    for n in range(20):
        q.put(n)
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_read)
            take_then_sleep(shm_name, mode, stall_at, ready_write)
        finally:
            os._exit(1)
    os.close(ready_write)
    try:
        # Empty if the child exited, closing the pipe, before then.
        ready = os.read(ready_read, 1)
    finally:
        os.close(ready_read)
    os.kill(pid, signal.SIGKILL)
    assert wait_for_pid(pid) == -signal.SIGKILL
    assert ready == (b"s" if stall_at else b"r")
    # A stalled get_many took the messages up to the stalled one only.
    taken_count = 1 if mode == "get" else stall_at or 20

    fresh = make_queue(name=shm_name, create=False,
                       serializer=StallingNumbers())
    assert fresh.stats().dropped["consumer_died"] == lost
    assert q.stats().dropped["consumer_died"] == lost

    # No wedge: every other message arrives exactly once, in order.
    got = []
    for n in range(20, 148):
        q.put_nowait(n)
        got.extend(fresh.get_many(3, block=False))
    while True:
        try:
            got.extend(fresh.get_many(100, block=False))
        except queue.Empty:
            break
    assert got == list(range(taken_count, 148))
    assert q.stats().dropped["consumer_died"] == lost


class FailsOnFive(StallingNumbers):
    """StallingNumbers whose loads raises for the number 5."""

    def loads(self, data):
        n = super().loads(data)
        if n == 5:
            raise ValueError("five does not decode")
        return n


def test_returned_copies_leave_no_count(make_queue, shm_name):
    """After get and get_many return, with a decode failure among them,
    no participant block of the file still counts copies."""
    q = make_queue(name=shm_name, capacity_bytes=8192,
                   serializer=FailsOnFive())
    for n in range(12):
        q.put(n)
    assert q.get() == 0
    assert q.get_many(3) == [1, 2, 3]
    assert participant_copies(shm_path(shm_name)) == {}
    # 5 fails to decode: the batch returns what came before it.
    assert q.get_many(100) == [4]
    assert participant_copies(shm_path(shm_name)) == {}
    assert q.get_many(100) == list(range(6, 12))
    assert participant_copies(shm_path(shm_name)) == {}
    # A get or a get_many of 5 alone raises.
    q.put(5)
    with pytest.raises(mqs.MessageDecodeError, match="five does not"):
        q.get()
    assert participant_copies(shm_path(shm_name)) == {}
    q.put(5)
    with pytest.raises(mqs.MessageDecodeError, match="five does not"):
        q.get_many(100)
    assert participant_copies(shm_path(shm_name)) == {}
    assert q.stats().dropped["decode_failed"] == 3
    assert q.stats().dropped["consumer_died"] == 0


# -- ring bound ----------------------------------------------------------------


def test_ring_size_bounds_queue_without_maxsize(make_queue):
    q = make_queue(capacity_bytes=PAGE)
    for i in range(PAGE // 128):
        q.put_nowait(bytes([i]) * 112)
    with pytest.raises(queue.Full):
        q.put_nowait(b"x" * 112)
    start = time.monotonic()
    with pytest.raises(queue.Full):
        q.put(b"x" * 112, timeout=0.2)
    assert time.monotonic() - start >= 0.2
    # A smaller message does not fit either: the ring has no byte left.
    with pytest.raises(queue.Full):
        q.put_nowait(b"")
    assert q.get_nowait() == bytes([0]) * 112
    q.put_nowait(b"x" * 112)
    assert q.qsize() == PAGE // 128


def put_large_messages(q, seed, count):
    rng = random.Random(seed)
    for _ in range(count):
        length = rng.choice([q.max_message_size - 4,
                             rng.randint(0, q.max_message_size - 4)])
        body = rng.randbytes(length)
        q.put(zlib.crc32(body).to_bytes(4, "little") + body, timeout=30)


def test_messages_up_to_ring_size_cross_processes(make_queue):
    q = make_queue(capacity_bytes=1 << 18)
    context = multiprocessing.get_context("fork")
    child = context.Process(target=put_large_messages, args=(q, 5, 30))
    child.start()
    sizes = []
    for _ in range(30):
        message = q.get(timeout=CHILD_TIMEOUT_S)
        assert zlib.crc32(message[4:]) == int.from_bytes(message[:4],
                                                         "little")
        sizes.append(len(message))
    assert finish_process(child) == 0
    # A message of max_message_size needs the whole ring: the child
    # waited for each one until the parent had taken the one before.
    assert sizes.count(q.max_message_size) >= 5
    assert q.qsize() == 0


def test_put_waits_for_room_a_consumer_frees(make_queue):
    q = make_queue(capacity_bytes=PAGE)
    for _ in range(PAGE // 128):
        q.put_nowait(b"x" * 112)
    context = multiprocessing.get_context("fork")
    child = context.Process(target=get_one_after_delay, args=(q, 0.3))
    child.start()
    start = time.monotonic()
    q.put(b"y" * 112, timeout=CHILD_TIMEOUT_S)
    assert time.monotonic() - start >= 0.2
    assert finish_process(child) == 0
    assert q.qsize() == PAGE // 128


# -- waiting -------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["block", "spin", "yield"])
def test_wait_strategy_wakes_blocked_child(make_queue, strategy):
    inbox = make_queue(capacity_bytes=PAGE, wait_strategy=strategy)
    outbox = make_queue(capacity_bytes=PAGE, wait_strategy=strategy)
    context = multiprocessing.get_context("fork")
    child = context.Process(target=echo_child, args=(inbox, outbox))
    child.start()
    time.sleep(0.2)
    inbox.put(b"wake up")
    assert outbox.get(timeout=30) == ("echo", b"wake up", child.pid)
    assert finish_process(child) == 0


def test_blocked_get_uses_almost_no_cpu(make_queue):
    q = make_queue(capacity_bytes=PAGE)
    context = multiprocessing.get_context("fork")
    parent_end, child_end = context.Pipe()
    child = context.Process(target=idle_get_child, args=(q, child_end))
    child.start()
    assert parent_end.poll(CHILD_TIMEOUT_S)
    outcome, cpu_seconds, elapsed = parent_end.recv()
    assert finish_process(child) == 0
    assert outcome == "empty"
    assert elapsed >= 2.0
    # Under 1% of one core while blocked for 2 s.
    assert cpu_seconds < 0.02 * elapsed / 2.0


@pytest.mark.parametrize("operation", ["get", "put"])
def test_blocked_call_raises_keyboard_interrupt_on_sigint(make_queue, shm_name,
                                                          operation):
    q = make_queue(1, name=shm_name, capacity_bytes=PAGE)
    if operation == "put":
        q.put(b"fills maxsize")
    code = f"""
        import sys
        import mqs
        q = mqs.SharedQueue(name={shm_name!r}, create=False)
        print("ready", flush=True)
        try:
            if {operation!r} == "get":
                q.get()
            else:
                q.put(b"blocked")
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(0)
        print("returned", flush=True)
        sys.exit(3)
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        wait_until_sleeping(proc.pid)
        time.sleep(0.2)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        status, stdout, stderr = communicate(proc, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert time.monotonic() - sent < 5.0
    assert status == 0, stderr
    assert stdout == "interrupted\n"
    assert q.qsize() == (1 if operation == "put" else 0)


# -- reaching other processes ------------------------------------------------


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_anonymous_queue_reaches_child_process(make_queue, method):
    inbox = make_queue(capacity_bytes=PAGE)
    outbox = make_queue(capacity_bytes=PAGE)
    context = multiprocessing.get_context(method)
    child = context.Process(target=echo_child, args=(inbox, outbox))
    child.start()
    inbox.put({"from": "parent", "data": b"\x00\x01"})
    assert outbox.get(timeout=CHILD_TIMEOUT_S) == (
        "echo", {"from": "parent", "data": b"\x00\x01"}, child.pid)
    assert finish_process(child) == 0


def test_anonymous_queue_rejects_pickling_outside_spawning(make_queue):
    q = make_queue(capacity_bytes=PAGE)
    with pytest.raises(RuntimeError, match=(
            "an anonymous SharedQueue reaches other processes only through "
            r"inheritance \(pass it in Process\(args=...\)\); give it a "
            "name= to share it any other way")):
        pickle.dumps(q)


def test_named_queue_pickles_by_name(make_queue, shm_name):
    q = make_queue(name=shm_name, capacity_bytes=PAGE,
                   wait_strategy="yield")
    copy = pickle.loads(pickle.dumps(q))
    try:
        assert copy.name == shm_name
        assert copy is not q
        q.put(b"through the copy")
        assert copy.get(timeout=5) == b"through the copy"
    finally:
        copy.close()


def test_forked_child_uses_inherited_queue(make_queue):
    q = make_queue(capacity_bytes=PAGE)
    q.put(b"for the child")
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            if q.get(timeout=10) == b"for the child":
                q.put(("from the child", os.getpid()))
                status = 0
        finally:
            os._exit(status)
    assert wait_for_pid(pid) == 0
    assert q.get(timeout=5) == ("from the child", pid)
    q.put(b"parent still works")
    assert q.get(timeout=5) == b"parent still works"


def test_forked_child_takes_its_own_liveness_lock(make_queue, shm_name):
    q = make_queue(name=shm_name, capacity_bytes=PAGE)
    path = shm_path(shm_name)
    ready_read, ready_write = os.pipe()
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_read)
            os.close(go_write)
            q.put(b"child attached")
            os.write(ready_write, b"r")
            os.read(go_read, 1)
        finally:
            os._exit(0)
    os.close(ready_write)
    os.close(go_read)
    try:
        assert os.read(ready_read, 1) == b"r"
        slots = {pid_: slot for slot, pid_ in participant_pids(path).items()}
        assert os.getpid() in slots
        assert pid in slots
        assert slots[pid] != slots[os.getpid()]
        assert slot_locked(path, slots[os.getpid()])
        assert slot_locked(path, slots[pid])
    finally:
        os.write(go_write, b"g")
        os.close(go_write)
        os.close(ready_read)
    assert wait_for_pid(pid) == 0
    assert not slot_locked(path, slots[pid])
    assert slot_locked(path, slots[os.getpid()])
    assert q.get(timeout=5) == b"child attached"


def test_dead_process_lock_drops_while_its_child_lives(make_queue,
                                                      shm_name):
    """A process that attached a queue, forked a child and then died is
    seen as dead, although the child still maps the queue: the child's
    inherited mapping must not hold the dead process's liveness lock."""
    q = make_queue(name=shm_name, capacity_bytes=PAGE)
    ready_read, ready_write = os.pipe()
    go_read, go_write = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(ready_read)
            os.close(go_write)
            # Its own attach, so the mapping is its own too.
            q.close()
            own = mqs.SharedQueue(name=shm_name, create=False)
            if os.fork() == 0:
                # Attached by now (at fork), so it reports itself.
                os.write(ready_write, b"r")
                os.read(go_read, 1)
                os._exit(0)
            os.read(go_read, 1)
            own.close()
        finally:
            os._exit(0)
    os.close(ready_write)
    os.close(go_read)
    try:
        assert os.read(ready_read, 1) == b"r"
        # This process, the child and the grandchild.
        assert q.stats().attached_processes == 3
        os.kill(child, signal.SIGKILL)
        assert wait_for_pid(child) == -signal.SIGKILL
        assert q.stats().attached_processes == 2
    finally:
        # The grandchild reads end of file and exits.
        os.close(go_write)
        os.close(ready_read)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while q.stats().attached_processes > 1 \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    q.put(b"still works")
    assert q.get(timeout=5) == b"still works"


def test_named_queue_attaches_from_unrelated_program(make_queue, shm_name):
    q = make_queue(name=shm_name, capacity_bytes=PAGE)
    q.put({"question": 6 * 7})
    status, _, stderr = run_python(f"""
        import mqs
        q = mqs.SharedQueue(name={shm_name!r}, create=False)
        message = q.get(timeout=30)
        q.put(("answer", message["question"]))
        q.close()
    """)
    assert status == 0, stderr
    assert q.get(timeout=5) == ("answer", 42)


def test_named_attach_raises_queue_not_found_when_missing(shm_name):
    with pytest.raises(QueueNotFound, match=(
            rf"no shared queue named '{shm_name}' \({SHM_DIR}/mqs."
            rf"{shm_name} is missing\); create it with "
            rf"SharedQueue\(name='{shm_name}'\)")):
        SharedQueue(name=shm_name, create=False)
    assert not os.path.exists(shm_path(shm_name))


def test_named_create_attaches_to_existing_queue(make_queue, shm_name):
    first = make_queue(3, name=shm_name, capacity_bytes=PAGE)
    with pytest.raises(mqs.QueueLayoutError, match="capacity_bytes="):
        make_queue(name=shm_name, capacity_bytes=PAGE * 4)
    second = make_queue(name=shm_name)
    assert second.capacity_bytes == PAGE
    assert second.maxsize == 3
    first.put(b"shared")
    assert second.get(timeout=5) == b"shared"


def test_named_queue_file_is_owner_only(make_queue, shm_name):
    make_queue(name=shm_name, capacity_bytes=PAGE)
    info = os.stat(shm_path(shm_name))
    assert info.st_mode & 0o777 == 0o600
    assert info.st_uid == os.getuid()
    assert info.st_size == HEADER_BYTES + PAGE + 4 * 1024 * 1024
    assert glob.glob(os.path.join(SHM_DIR, f"mqs.{shm_name}.*")) == []


def test_unlink_removes_name_and_keeps_handles_working(make_queue, shm_name):
    first = make_queue(name=shm_name, capacity_bytes=PAGE)
    second = make_queue(name=shm_name, create=False)
    first.unlink()
    assert not os.path.exists(shm_path(shm_name))
    first.put(b"after unlink")
    assert second.get(timeout=5) == b"after unlink"
    with pytest.raises(QueueNotFound):
        SharedQueue(name=shm_name, create=False)
    first.unlink()
    anonymous = make_queue(capacity_bytes=PAGE)
    assert anonymous.unlink() is None


# -- corrupted files -----------------------------------------------------------


def make_queue_file(name):
    q = SharedQueue(name=name, capacity_bytes=PAGE)
    q.close()
    return shm_path(name)


def test_attach_rejects_corrupted_magic(shm_name):
    path = make_queue_file(shm_name)
    patch_file(path, 0, b"NOTMQS!!")
    with pytest.raises(QueueLayoutError, match=(
            rf"'{shm_name}' \({path}\) has a corrupted or foreign header; "
            rf"it is not an mqs queue")):
        SharedQueue(name=shm_name, create=False)


def test_attach_rejects_other_layout_version(shm_name):
    path = make_queue_file(shm_name)
    with open(path, "rb") as file:
        file.seek(CONFIG_VERSION_OFFSET)
        (ours,) = struct.unpack("<I", file.read(4))
    patch_file(path, CONFIG_VERSION_OFFSET, struct.pack("<I", ours + 1))
    with pytest.raises(QueueLayoutError, match=(
            f"has ring layout version {ours + 1}, and this mqs reads "
            f"version {ours}: processes of two mqs versions share the "
            f"queue. Run every process of the queue on the mqs version "
            f"that created it")) as raised:
        SharedQueue(name=shm_name, create=False)
    assert isinstance(raised.value, mqs.LayoutVersionError)
    assert raised.value.version == ours + 1
    assert raised.value.expected_version == ours


def test_attach_rejects_other_delayed_area_version(shm_name):
    delayed_bytes = 1 << 16
    q = SharedQueue(name=shm_name, capacity_bytes=PAGE,
                    delayed_capacity_bytes=delayed_bytes)
    q.close()
    path = shm_path(shm_name)
    # The delayed area ends the file and starts with its config: a 64-bit
    # magic, then the version (mqs_delay_config_t in mqs_delay.h).
    offset = os.path.getsize(path) - delayed_bytes + CONFIG_VERSION_OFFSET
    with open(path, "rb") as file:
        file.seek(offset)
        (ours,) = struct.unpack("<I", file.read(4))
    patch_file(path, offset, struct.pack("<I", ours + 1))
    with pytest.raises(mqs.LayoutVersionError, match=(
            f"has delayed area layout version {ours + 1}, and this mqs "
            f"reads version {ours}")):
        SharedQueue(name=shm_name, create=False)


def test_attach_rejects_inconsistent_capacity(shm_name):
    path = make_queue_file(shm_name)
    patch_file(path, CONFIG_CAPACITY_OFFSET, struct.pack("<q", 2 * PAGE))
    with pytest.raises(QueueLayoutError, match="it was truncated or is not "
                                               "an mqs queue"):
        SharedQueue(name=shm_name, create=False)


def test_attach_rejects_file_too_small(shm_name):
    path = make_queue_file(shm_name)
    os.truncate(path, 1000)
    with pytest.raises(QueueLayoutError,
                       match="is 1000 bytes, too small for an mqs queue"):
        SharedQueue(name=shm_name, create=False)


def test_attach_rejects_file_size_unlike_header(shm_name):
    path = make_queue_file(shm_name)
    os.truncate(path, HEADER_BYTES + 3 * PAGE)
    with pytest.raises(QueueLayoutError, match=(
            rf"is {HEADER_BYTES + 3 * PAGE} bytes, but its header gives "
            rf"{HEADER_BYTES + PAGE + 4 * 1024 * 1024} \(capacity_bytes "
            rf"{PAGE}, delayed_capacity_bytes {4 * 1024 * 1024}\); it was "
            rf"truncated or is not an mqs queue")):
        SharedQueue(name=shm_name, create=False)


def test_attach_rejects_foreign_file(shm_name):
    path = shm_path(shm_name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, os.urandom(HEADER_BYTES + PAGE))
    finally:
        os.close(fd)
    with pytest.raises(QueueLayoutError, match="corrupted or foreign header"):
        SharedQueue(name=shm_name, create=False)


def test_attach_rejects_foreign_file_of_odd_size(shm_name):
    # A size that is no header plus a page multiple: the header-only
    # mapping must still work and name the file as foreign.
    path = shm_path(shm_name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, os.urandom(HEADER_BYTES + 3 * PAGE + 100))
    finally:
        os.close(fd)
    with pytest.raises(QueueLayoutError, match="corrupted or foreign header"):
        SharedQueue(name=shm_name, create=False)
    with pytest.raises(QueueLayoutError, match="corrupted or foreign header"):
        SharedQueue(name=shm_name)


def test_attach_names_shm_broker_file():
    broker_name = f"test-shared-{uuid.uuid4().hex[:16]}"
    mqs.Broker(backend="shm", name=broker_name, journal_bytes=1 << 20).close()
    try:
        for create in (False, True):
            with pytest.raises(QueueLayoutError, match=(
                    r"is an mqs shm broker, not a queue; open it with "
                    r"mqs.Broker\(backend='shm'")):
                SharedQueue(name=f"broker.{broker_name}", create=create)
    finally:
        assert mqs.Broker.unlink(broker_name)


def test_attach_rejects_never_initialised_file(shm_name):
    path = shm_path(shm_name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, HEADER_BYTES + PAGE)
    finally:
        os.close(fd)
    start = time.monotonic()
    with pytest.raises(QueueLayoutError, match=(
            "was never initialised; its creator died before finishing, so "
            "unlink it and create it again")):
        SharedQueue(name=shm_name, create=False)
    # The attacher waits for a creator that might still be formatting.
    assert time.monotonic() - start >= 4.0


def test_corrupted_attach_leaves_other_handles_working(make_queue, shm_name):
    q = make_queue(name=shm_name, capacity_bytes=PAGE)
    q.put(b"still fine")
    with open(shm_path(shm_name), "rb") as file:
        before = file.read(8)
    patch_file(shm_path(shm_name), 0, b"NOTMQS!!")
    with pytest.raises(QueueLayoutError):
        SharedQueue(name=shm_name, create=False)
    patch_file(shm_path(shm_name), 0, before)
    assert q.get(timeout=5) == b"still fine"


# -- stats -------------------------------------------------------------------


def test_stats_reports_repair_counters_and_depth(make_queue):
    q = make_queue(capacity_bytes=PAGE)
    q.put_many([b"a", b"b"])
    stats = q.stats()
    assert stats.repaired_records == 0
    assert stats.repaired_bytes == 0
    assert stats.lost_records == 0
    assert stats.depth == 2
    assert stats.enqueued == 2
    assert stats.dequeued == (0,)


def test_file_descriptors_are_not_leaked(make_queue, shm_name):
    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    for _ in range(20):
        q = SharedQueue(name=shm_name, capacity_bytes=PAGE)
        q.put(b"x")
        q.get(timeout=5)
        q.close()
        anonymous = SharedQueue(capacity_bytes=PAGE)
        anonymous.close()
    assert open_fds() == before


def test_participant_slots_are_reused_after_close(shm_name):
    # 300 handles one after another: more than the 256 slots, so each
    # close must give its slot back.
    for i in range(300):
        q = SharedQueue(name=shm_name, capacity_bytes=PAGE)
        q.put(i)
        assert q.get(timeout=5) == i
        q.close()


def test_too_many_live_handles_raise_os_error(shm_name):
    handles = []
    try:
        with pytest.raises(OSError, match=(
                "all 256 participant slots of the queue are held by live "
                "processes")):
            for _ in range(MAX_PARTICIPANTS + 1):
                handles.append(SharedQueue(name=shm_name,
                                           capacity_bytes=PAGE))
        assert len(handles) == MAX_PARTICIPANTS
    finally:
        for handle in handles:
            handle.close()



class Unreadable:
    """Pickles fine but fails to unpickle: int("not-an-int")."""

    def __reduce__(self):
        return (int, ("not-an-int",))


def test_undecodable_message_is_counted(make_queue, shm_name):
    q = make_queue(name=shm_name)
    q.put(Unreadable())
    q.put("next")
    with pytest.raises(mqs.MessageDecodeError,
                       match="message dropped") as info:
        q.get(timeout=5)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value.__cause__, ValueError)
    assert "decode_failed" in str(info.value)
    assert q.get(timeout=5) == "next"
    stats = q.stats()
    assert stats.decode_failures == 1
    assert stats.dropped["decode_failed"] == 1
    assert stats.dequeued == (2,)

    # The counter lives in the shared mapping, so another process reads it.
    code = textwrap.dedent(f"""
        from mqs.shared import SharedQueue
        q = SharedQueue(name={shm_name!r}, create=False)
        print(q.stats().dropped["decode_failed"])
        q.close()
    """)
    output = subprocess.run([sys.executable, "-c", code], check=True,
                            capture_output=True, text=True,
                            timeout=CHILD_TIMEOUT_S).stdout
    assert output.strip() == "1"


def test_get_many_keeps_messages_before_undecodable(make_queue, caplog):
    q = make_queue()
    q.put_many(["a", Unreadable(), "b"])
    with caplog.at_level("WARNING", logger="mqs"):
        assert q.get_many(10, timeout=5) == ["a"]
    assert "message dropped" in caplog.text
    assert q.get_many(10, timeout=5) == ["b"]
    assert q.stats().dropped["decode_failed"] == 1


def test_undecodable_custom_serializer_counted(make_queue):
    class Failing:
        def dumps(self, value):
            return pickle.dumps(value)

        def loads(self, data):
            raise KeyError("no such class")

    q = make_queue(serializer=Failing())
    q.put({"order": 1})
    with pytest.raises(mqs.MessageDecodeError) as info:
        q.get(timeout=5)
    assert isinstance(info.value.__cause__, KeyError)
    assert q.stats().decode_failures == 1
