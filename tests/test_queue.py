"""Behaviour tests of mqs.Queue and mqs.SimpleQueue against the stdlib rules.

Each test checks returned values or raised exceptions. Waits use real
threads and real processes, and time checks use lower bounds (a call never
returns before its timeout) with generous upper bounds only, so a busy
machine makes them slower but never makes them fail.
"""

import gc
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
import types
import weakref
from collections import deque

import pytest

import mqs

# Upper bound for anything that should happen "promptly": far above what
# an idle machine needs, so that only a hang or a lost wake-up fails.
PROMPT_S = 5.0

# How long a test lets another thread run into a blocking call before it
# acts on the queue. A thread that has not reached the call yet only makes
# the test weaker, never wrong.
SETTLE_S = 0.2

QUEUE_KINDS = {
    "Queue": mqs.Queue,
    "Queue-bounded": lambda: mqs.Queue(maxsize=1_000_000),
    "SimpleQueue": mqs.SimpleQueue,
}


@pytest.fixture(params=list(QUEUE_KINDS), ids=list(QUEUE_KINDS))
def make_queue(request):
    """Factory of an empty queue of each kind that never fills in a test."""
    return QUEUE_KINDS[request.param]


class Payload:
    """A weak-referenceable item, to watch when the queue lets go of it."""

    def __init__(self, value):
        self.value = value


class Worker(threading.Thread):
    """Thread that keeps its target's return value or exception."""

    def __init__(self, target, *args):
        super().__init__(daemon=True)
        self._target_fn = target
        self._target_args = args
        self.result = None
        self.error = None
        self.elapsed = None

    def run(self):
        start = time.monotonic()
        try:
            self.result = self._target_fn(*self._target_args)
        except Exception as exc:  # noqa: BLE001 (the test inspects it)
            self.error = exc
        finally:
            self.elapsed = time.monotonic() - start

    def finish(self, timeout=PROMPT_S):
        """Join the thread and fail the test if it is still blocked."""
        self.join(timeout)
        assert not self.is_alive(), f"thread still blocked after {timeout} s"
        return self


def start_worker(target, *args):
    worker = Worker(target, *args)
    worker.start()
    return worker


def drain(q):
    """Get every queued item without waiting, also from a shut-down queue."""
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except (queue.Empty, mqs.ShutDown):
            return items


# Class names, generic aliases and exception types


def test_queue_class_names_match_stdlib():
    assert mqs.Queue.__name__ == queue.Queue.__name__
    assert mqs.SimpleQueue.__name__ == queue.SimpleQueue.__name__


@pytest.mark.parametrize("cls", [mqs.Queue, mqs.SimpleQueue])
def test_queue_generic_alias_names_class_and_argument(cls):
    alias = cls[int]
    assert isinstance(alias, types.GenericAlias)
    assert alias.__origin__ is cls
    assert alias.__args__ == (int,)


def test_queue_generic_alias_creates_instances():
    bounded = mqs.Queue[int](3)
    simple = mqs.SimpleQueue[str]()
    assert type(bounded) is mqs.Queue
    assert bounded.maxsize == 3
    assert type(simple) is mqs.SimpleQueue


def test_errors_derive_from_stdlib_queue_errors():
    assert issubclass(mqs.Empty, queue.Empty)
    assert issubclass(mqs.Full, queue.Full)
    assert issubclass(mqs.Empty, mqs.MqsError)
    assert issubclass(mqs.Full, mqs.MqsError)
    assert issubclass(mqs.ShutDown, mqs.MqsError)


@pytest.mark.skipif(not hasattr(queue, "ShutDown"), reason="Python < 3.13")
def test_shutdown_error_derives_from_stdlib_shutdown():
    assert issubclass(mqs.ShutDown, queue.ShutDown)


def test_get_nowait_raises_empty_when_empty(make_queue):
    q = make_queue()
    with pytest.raises(mqs.Empty):
        q.get_nowait()


def test_get_nowait_error_caught_by_stdlib_empty(make_queue):
    q = make_queue()
    caught = None
    try:
        q.get_nowait()
    except queue.Empty as exc:
        caught = exc
    assert type(caught) is mqs.Empty


def test_put_nowait_raises_full_when_full():
    q = mqs.Queue(maxsize=2)
    q.put_nowait("a")
    q.put_nowait("b")
    with pytest.raises(mqs.Full) as excinfo:
        q.put_nowait("c")
    assert excinfo.value.accepted == 0
    assert q.qsize() == 2


def test_put_nowait_error_caught_by_stdlib_full():
    q = mqs.Queue(maxsize=1)
    q.put_nowait("a")
    caught = None
    try:
        q.put_nowait("b")
    except queue.Full as exc:
        caught = exc
    assert type(caught) is mqs.Full


# FIFO order, sizes and non-blocking calls


def test_get_returns_items_in_fifo_order(make_queue):
    q = make_queue()
    # 5000 items span several ring segments of every queue kind.
    for i in range(5000):
        q.put(i)
    assert [q.get() for _ in range(5000)] == list(range(5000))


def test_get_keeps_fifo_when_interleaved(make_queue):
    q = make_queue()
    model = deque()
    counter = 0
    # Uneven bursts make the reader follow the writer across segment
    # boundaries and through recycled segments.
    for burst in range(400):
        for _ in range(burst % 37 + 1):
            q.put(counter)
            model.append(counter)
            counter += 1
        for _ in range(burst % 29 + 1):
            if not model:
                break
            assert q.get_nowait() == model.popleft()
    assert drain(q) == list(model)


def test_qsize_counts_queued_items(make_queue):
    q = make_queue()
    sizes = [q.qsize()]
    for i in range(3):
        q.put(i)
        sizes.append(q.qsize())
    q.get()
    sizes.append(q.qsize())
    assert sizes == [0, 1, 2, 3, 2]


def test_empty_tracks_queued_items(make_queue):
    q = make_queue()
    assert q.empty()
    q.put("a")
    assert not q.empty()
    q.get()
    assert q.empty()


def test_full_true_only_at_maxsize():
    q = mqs.Queue(maxsize=2)
    assert not q.full()
    q.put(1)
    assert not q.full()
    q.put(2)
    assert q.full()


def test_full_false_when_unbounded():
    q = mqs.Queue()
    for i in range(100):
        q.put(i)
    assert not q.full()


@pytest.mark.parametrize("maxsize", [0, -1, -100])
def test_queue_unbounded_when_maxsize_not_positive(maxsize):
    q = mqs.Queue(maxsize=maxsize)
    for i in range(2000):
        q.put_nowait(i)
    assert q.qsize() == 2000
    assert not q.full()


def test_get_nonblocking_raises_empty_when_empty(make_queue):
    q = make_queue()
    with pytest.raises(mqs.Empty):
        q.get(block=False)


def test_get_zero_timeout_raises_empty_when_empty(make_queue):
    q = make_queue()
    with pytest.raises(mqs.Empty):
        q.get(timeout=0)


@pytest.mark.parametrize(
    "put", [
        lambda q: q.put("x", block=False),
        lambda q: q.put("x", timeout=0),
        lambda q: q.put_nowait("x"),
    ],
    ids=["block=False", "timeout=0", "put_nowait"],
)
def test_put_raises_full_without_adding_when_full(put):
    q = mqs.Queue(maxsize=1)
    q.put("first")
    with pytest.raises(mqs.Full):
        put(q)
    assert q.qsize() == 1
    assert q.unfinished_tasks == 1
    assert q.get() == "first"


def test_simple_queue_put_ignores_block_and_timeout():
    q = mqs.SimpleQueue()
    reference = queue.SimpleQueue()
    for target in (q, reference):
        target.put("a", block=False)
        target.put("b", timeout=-1)
        target.put("c", False, "not a number")
    assert drain(q) == drain(reference) == ["a", "b", "c"]


def test_get_nonblocking_ignores_timeout(make_queue):
    q = make_queue()
    q.put("a")
    assert q.get(block=False, timeout=-1) == "a"


def test_put_unbounded_ignores_negative_timeout():
    # queue.Queue only checks the timeout of a put on a bounded queue.
    q = mqs.Queue()
    reference = queue.Queue()
    q.put("a", timeout=-1)
    reference.put("a", timeout=-1)
    assert q.get_nowait() == reference.get_nowait() == "a"


# Timeouts


@pytest.mark.parametrize("timeout", [0.01, 0.05, 0.2])
def test_get_timeout_never_returns_early(make_queue, timeout):
    q = make_queue()
    start = time.monotonic()
    with pytest.raises(mqs.Empty):
        q.get(timeout=timeout)
    elapsed = time.monotonic() - start
    assert elapsed >= timeout
    assert elapsed < timeout + PROMPT_S


@pytest.mark.parametrize("timeout", [0.01, 0.05, 0.2])
def test_put_timeout_never_returns_early_when_full(timeout):
    q = mqs.Queue(maxsize=1)
    q.put("a")
    start = time.monotonic()
    with pytest.raises(mqs.Full):
        q.put("b", timeout=timeout)
    elapsed = time.monotonic() - start
    assert elapsed >= timeout
    assert elapsed < timeout + PROMPT_S


def test_get_many_timeout_never_returns_early(make_queue):
    q = make_queue()
    start = time.monotonic()
    with pytest.raises(mqs.Empty):
        q.get_many(10, timeout=0.1)
    elapsed = time.monotonic() - start
    assert elapsed >= 0.1
    assert elapsed < 0.1 + PROMPT_S


def test_put_many_timeout_never_returns_early_when_full():
    q = mqs.Queue(maxsize=3)
    start = time.monotonic()
    with pytest.raises(mqs.Full) as excinfo:
        q.put_many(range(5), timeout=0.1)
    elapsed = time.monotonic() - start
    assert elapsed >= 0.1
    assert elapsed < 0.1 + PROMPT_S
    assert excinfo.value.accepted == 3


def test_get_timeout_returns_item_put_during_wait(make_queue):
    q = make_queue()
    producer = threading.Timer(SETTLE_S, q.put, args=("late",))
    producer.start()
    try:
        assert q.get(timeout=30) == "late"
    finally:
        producer.join()


def test_get_huge_timeout_waits_like_no_timeout(make_queue):
    # queue.Queue raises OverflowError for a timeout past the lock limit;
    # mqs waits without a deadline instead.
    q = make_queue()
    producer = threading.Timer(SETTLE_S, q.put, args=("late",))
    producer.start()
    try:
        assert q.get(timeout=1e12) == "late"
    finally:
        producer.join()


# maxsize on a live queue


def test_queue_maxsize_reads_back_constructor_value():
    assert mqs.Queue(7).maxsize == 7
    assert mqs.Queue().maxsize == 0


@pytest.mark.parametrize("maxsize", [-1, -100])
def test_queue_nonpositive_maxsize_reads_back_as_stdlib(maxsize):
    q = mqs.Queue(maxsize)
    assert q.maxsize == queue.Queue(maxsize).maxsize == maxsize
    q.maxsize = 1
    assert q.maxsize == 1
    q.maxsize = maxsize
    assert q.maxsize == maxsize
    # Still unbounded.
    for i in range(2000):
        q.put_nowait(i)
    assert not q.full()


def test_queue_maxsize_raise_unblocks_waiting_producer():
    q = mqs.Queue(maxsize=1)
    q.put("a")
    producer = start_worker(q.put, "b")
    time.sleep(SETTLE_S)
    assert producer.is_alive()

    q.maxsize = 2
    producer.finish()
    assert producer.error is None
    assert q.qsize() == 2
    assert drain(q) == ["a", "b"]


def test_queue_maxsize_zero_unblocks_waiting_producers():
    q = mqs.Queue(maxsize=1)
    q.put("a")
    producers = [start_worker(q.put, i) for i in range(3)]
    time.sleep(SETTLE_S)
    assert all(p.is_alive() for p in producers)

    q.maxsize = 0
    for producer in producers:
        producer.finish()
        assert producer.error is None
    assert q.qsize() == 4
    assert not q.full()


def test_queue_maxsize_lowered_makes_queue_full():
    q = mqs.Queue(maxsize=4)
    for i in range(3):
        q.put(i)
    q.maxsize = 2
    assert q.full()
    with pytest.raises(mqs.Full):
        q.put_nowait(3)
    assert q.get() == 0
    assert q.full()
    assert q.get() == 1
    q.put_nowait(3)
    assert drain(q) == [2, 3]


def test_queue_maxsize_raised_past_first_segment_keeps_fifo():
    q = mqs.Queue(maxsize=4)
    for i in range(4):
        q.put_nowait(i)
    q.maxsize = 5000
    for i in range(4, 5000):
        q.put_nowait(i)
    assert q.full()
    assert drain(q) == list(range(5000))


# task_done and join


def test_queue_join_returns_at_once_when_nothing_put():
    q = mqs.Queue()
    joiner = start_worker(q.join).finish()
    assert joiner.error is None


def test_queue_join_waits_for_every_task_done():
    q = mqs.Queue()
    for i in range(50):
        q.put(i)
    joiner = start_worker(q.join)
    processed = []
    for _ in range(49):
        processed.append(q.get())
        q.task_done()
    processed.append(q.get())
    time.sleep(SETTLE_S)
    assert joiner.is_alive()

    q.task_done()
    joiner.finish()
    assert joiner.error is None
    assert processed == list(range(50))
    assert q.unfinished_tasks == 0


def test_queue_join_returns_when_consumer_threads_finish():
    q = mqs.Queue(maxsize=8)
    results = []

    def consume():
        while True:
            item = q.get()
            if item is None:
                q.task_done()
                return
            results.append(item * 2)
            q.task_done()

    consumers = [start_worker(consume) for _ in range(4)]
    for i in range(1000):
        q.put(i)
    for _ in consumers:
        q.put(None)
    start_worker(q.join).finish(timeout=30)
    for consumer in consumers:
        consumer.finish()
        assert consumer.error is None
    assert sorted(results) == [i * 2 for i in range(1000)]


def test_queue_task_done_counts_put_many_items():
    q = mqs.Queue()
    q.put_many(range(5))
    assert q.unfinished_tasks == 5
    q.get_many(5)
    for _ in range(5):
        q.task_done()
    assert q.unfinished_tasks == 0


def test_queue_task_done_rejects_extra_call_like_stdlib():
    q = mqs.Queue()
    reference = queue.Queue()
    for target in (q, reference):
        target.put("a")
        target.get()
        target.task_done()
    with pytest.raises(ValueError) as reference_error:
        reference.task_done()
    message = r"^task_done\(\) called too many times$"
    with pytest.raises(ValueError, match=message):
        q.task_done()
    assert q.unfinished_tasks == 0
    assert str(reference_error.value) == "task_done() called too many times"


# shutdown


@pytest.mark.parametrize("cls", [mqs.Queue, mqs.SimpleQueue])
def test_shutdown_makes_put_raise(cls):
    q = cls()
    q.shutdown()
    with pytest.raises(mqs.ShutDown, match="^put on a shut-down queue$"):
        q.put("a")
    with pytest.raises(mqs.ShutDown, match="^put on a shut-down queue$"):
        q.put_nowait("a")
    with pytest.raises(mqs.ShutDown, match="^put_many on a shut-down queue$"):
        q.put_many(["a", "b"])
    assert q.qsize() == 0


@pytest.mark.parametrize("cls", [mqs.Queue, mqs.SimpleQueue])
def test_shutdown_error_of_put_many_accepts_nothing(cls):
    q = cls()
    q.shutdown()
    with pytest.raises(mqs.ShutDown) as excinfo:
        q.put_many(["a", "b"])
    assert excinfo.value.accepted == 0


@pytest.mark.parametrize("cls", [mqs.Queue, mqs.SimpleQueue])
def test_shutdown_lets_get_drain_then_raise(cls):
    q = cls()
    q.put_many([1, 2, 3])
    q.shutdown()
    assert q.is_shutdown
    assert q.get() == 1
    assert q.get_many(10) == [2, 3]
    message = "^get on a shut-down and empty queue$"
    with pytest.raises(mqs.ShutDown, match=message):
        q.get()
    with pytest.raises(mqs.ShutDown, match=message):
        q.get_nowait()
    with pytest.raises(mqs.ShutDown, match=message):
        q.get(timeout=0)
    with pytest.raises(mqs.ShutDown, match=message):
        q.get_many(4)


@pytest.mark.parametrize("cls", [mqs.Queue, mqs.SimpleQueue])
def test_shutdown_wakes_blocked_getters(cls):
    q = cls()
    getters = [start_worker(q.get) for _ in range(3)]
    getters.append(start_worker(q.get, True, 60))
    getters.append(start_worker(q.get_many, 5))
    time.sleep(SETTLE_S)
    assert all(g.is_alive() for g in getters)

    q.shutdown()
    for getter in getters:
        getter.finish()
        assert type(getter.error) is mqs.ShutDown


def test_shutdown_wakes_blocked_putters():
    q = mqs.Queue(maxsize=1)
    q.put("a")
    putters = [start_worker(q.put, "b"), start_worker(q.put, "c", True, 60)]
    time.sleep(SETTLE_S)
    assert all(p.is_alive() for p in putters)

    q.shutdown()
    for putter in putters:
        putter.finish()
        assert type(putter.error) is mqs.ShutDown
    assert q.qsize() == 1
    assert q.get() == "a"


def test_shutdown_reports_accepted_of_blocked_put_many():
    q = mqs.Queue(maxsize=2)
    putter = start_worker(q.put_many, ["a", "b", "c", "d"])
    time.sleep(SETTLE_S)
    assert putter.is_alive()

    q.shutdown()
    putter.finish()
    assert type(putter.error) is mqs.ShutDown
    assert putter.error.accepted == 2
    assert drain(q) == ["a", "b"]


def test_shutdown_keeps_unfinished_tasks_when_not_immediate():
    q = mqs.Queue()
    q.put_many("abc")
    q.shutdown()
    assert q.unfinished_tasks == 3
    assert q.qsize() == 3


@pytest.mark.parametrize("cls", [mqs.Queue, mqs.SimpleQueue])
def test_shutdown_immediate_drops_queued_items(cls):
    q = cls()
    q.put_many(range(3000))
    q.shutdown(immediate=True)
    assert q.qsize() == 0
    assert q.empty()
    with pytest.raises(mqs.ShutDown):
        q.get_nowait()


def test_shutdown_immediate_counts_dropped_items_as_done():
    # Python 3.13's queue.Queue.shutdown(immediate=True) takes one
    # unfinished task off per dropped item; got items stay unfinished.
    q = mqs.Queue()
    q.put_many("abcd")
    q.get()
    q.shutdown(immediate=True)
    assert q.unfinished_tasks == 1


def test_shutdown_immediate_lets_blocked_join_return():
    q = mqs.Queue()
    q.put_many("abc")
    joiner = start_worker(q.join)
    time.sleep(SETTLE_S)
    assert joiner.is_alive()

    q.shutdown(immediate=True)
    joiner.finish()
    assert joiner.error is None
    assert q.unfinished_tasks == 0


def test_shutdown_immediate_keeps_join_waiting_for_got_items():
    q = mqs.Queue()
    q.put_many("abc")
    q.get()
    joiner = start_worker(q.join)
    q.shutdown(immediate=True)
    time.sleep(SETTLE_S)
    assert joiner.is_alive()

    q.task_done()
    joiner.finish()
    assert joiner.error is None


def test_shutdown_immediate_wakes_blocked_putters():
    q = mqs.Queue(maxsize=1)
    q.put("a")
    putter = start_worker(q.put, "b")
    time.sleep(SETTLE_S)
    q.shutdown(immediate=True)
    putter.finish()
    assert type(putter.error) is mqs.ShutDown
    assert q.qsize() == 0


def test_shutdown_twice_keeps_queue_shut():
    q = mqs.Queue()
    q.put("a")
    q.shutdown()
    q.shutdown()
    assert q.get() == "a"
    q.shutdown(immediate=True)
    assert q.is_shutdown
    with pytest.raises(mqs.ShutDown):
        q.get_nowait()


# put_many and get_many


@pytest.mark.parametrize(
    "make_items",
    [
        lambda: [1, 2, 3],
        lambda: (1, 2, 3),
        lambda: range(1, 4),
        lambda: (i for i in (1, 2, 3)),
    ],
    ids=["list", "tuple", "range", "generator"],
)
def test_put_many_accepts_any_iterable(make_queue, make_items):
    q = make_queue()
    q.put_many(make_items())
    assert drain(q) == [1, 2, 3]


def test_put_many_empty_batch_adds_nothing(make_queue):
    q = make_queue()
    q.put_many([])
    assert q.qsize() == 0


def test_put_many_batch_larger_than_segment_keeps_order(make_queue):
    q = make_queue()
    q.put("first")
    # More than the 65,536 slots of the largest segment.
    q.put_many(range(200_000))
    assert q.qsize() == 200_001
    assert q.get() == "first"
    assert q.get_many(200_000) == list(range(200_000))
    assert q.empty()


def test_put_many_does_not_see_later_list_changes(make_queue):
    q = make_queue()
    items = [1, 2, 3]
    q.put_many(items)
    items.append(4)
    items[0] = "changed"
    assert drain(q) == [1, 2, 3]


@pytest.mark.parametrize(
    "change",
    [list.clear, lambda items: items.append("new"),
     lambda items: items.__setitem__(slice(None), "xyz")],
    ids=["clear", "append", "replace"],
)
def test_put_many_ignores_list_changes_while_blocked(change):
    q = mqs.Queue(maxsize=2)
    items = list(range(6))
    producer = start_worker(q.put_many, items)
    time.sleep(SETTLE_S)
    assert producer.is_alive()

    # The wait releases the GIL. A list that shrinks meanwhile must not
    # leave claimed but unwritten slots in the ring (a later get_many
    # would read NULL there).
    change(items)
    received = []
    while len(received) < 6:
        received.extend(q.get_many(6, timeout=PROMPT_S))
    producer.finish()
    assert producer.error is None
    assert received == [0, 1, 2, 3, 4, 5]
    assert q.qsize() == 0
    with pytest.raises(mqs.Empty):
        q.get_many(6, block=False)


def test_put_many_partial_when_bounded_queue_fills():
    q = mqs.Queue(maxsize=3)
    q.put("a")
    with pytest.raises(mqs.Full) as excinfo:
        q.put_many(["b", "c", "d", "e"], block=False)
    assert excinfo.value.accepted == 2
    assert q.unfinished_tasks == 3
    assert drain(q) == ["a", "b", "c"]


def test_put_many_error_message_names_counts():
    q = mqs.Queue(maxsize=2)
    message = (r"^queue stayed full: put 2 of 5 items; "
               r"the other 3 were not added$")
    with pytest.raises(mqs.Full, match=message):
        q.put_many(range(5), block=False)


def test_put_many_error_message_one_left():
    q = mqs.Queue(maxsize=2)
    message = (r"^queue stayed full: put 2 of 3 items; "
               r"the other item was not added$")
    with pytest.raises(mqs.Full, match=message):
        q.put_many(range(3), block=False)


def test_put_many_blocks_until_consumer_frees_room():
    q = mqs.Queue(maxsize=4)
    producer = start_worker(q.put_many, range(1000))
    received = [q.get(timeout=30) for _ in range(1000)]
    producer.finish()
    assert producer.error is None
    assert received == list(range(1000))


def test_get_many_returns_at_most_max_items(make_queue):
    q = make_queue()
    q.put_many(range(10))
    assert q.get_many(4) == [0, 1, 2, 3]
    assert q.get_many(1) == [4]
    assert q.get_many(100) == [5, 6, 7, 8, 9]


def test_get_many_waits_for_first_item(make_queue):
    q = make_queue()
    producer = threading.Timer(SETTLE_S, q.put_many, args=(["x", "y"],))
    producer.start()
    try:
        batch = q.get_many(10, timeout=30)
    finally:
        producer.join()
    # put_many adds both items in one call under the GIL, so the waiting
    # getter gets both.
    assert batch == ["x", "y"]


def test_get_many_nonblocking_raises_empty_when_empty(make_queue):
    q = make_queue()
    with pytest.raises(mqs.Empty):
        q.get_many(3, block=False)


def test_get_many_frees_room_for_blocked_putter():
    q = mqs.Queue(maxsize=2)
    q.put_many("ab")
    putter = start_worker(q.put, "c")
    time.sleep(SETTLE_S)
    assert putter.is_alive()

    assert q.get_many(2) == ["a", "b"]
    putter.finish()
    assert putter.error is None
    assert q.get_nowait() == "c"


# Iteration


def test_iteration_stops_when_shut_down_and_drained(make_queue):
    q = make_queue()
    q.put_many(range(5))
    q.shutdown()
    assert list(q) == [0, 1, 2, 3, 4]


def test_iteration_blocks_for_items_until_shutdown(make_queue):
    q = make_queue()
    consumer = start_worker(list, q)
    for i in range(100):
        q.put(i)
    time.sleep(SETTLE_S)
    assert consumer.is_alive()

    q.shutdown()
    consumer.finish()
    assert consumer.error is None
    assert consumer.result == list(range(100))


def test_iteration_returns_queue_itself(make_queue):
    q = make_queue()
    assert iter(q) is q


# Items are released as soon as they leave the queue


def test_get_releases_item(make_queue):
    q = make_queue()
    item = Payload(1)
    ref = weakref.ref(item)
    q.put(item)
    del item
    got = q.get()
    assert got.value == 1
    del got
    assert ref() is None


def test_get_nowait_releases_item_after_segment_reuse(make_queue):
    q = make_queue()
    # Fill and drain several segments first, so the item sits in a
    # recycled segment.
    for _ in range(3):
        q.put_many(range(3000))
        q.get_many(3000)
    item = Payload(2)
    ref = weakref.ref(item)
    q.put(item)
    del item
    got = q.get_nowait()
    del got
    assert ref() is None


def test_get_many_releases_items(make_queue):
    q = make_queue()
    items = [Payload(i) for i in range(50)]
    refs = [weakref.ref(item) for item in items]
    q.put_many(items)
    del items
    batch = q.get_many(50)
    assert [item.value for item in batch] == list(range(50))
    del batch
    assert [ref() for ref in refs] == [None] * 50


def test_iteration_releases_items(make_queue):
    q = make_queue()
    items = [Payload(i) for i in range(3)]
    refs = [weakref.ref(item) for item in items]
    q.put_many(items)
    del items
    q.shutdown()
    values = [item.value for item in q]
    assert values == [0, 1, 2]
    assert [ref() for ref in refs] == [None] * 3


@pytest.mark.parametrize("cls", [mqs.Queue, mqs.SimpleQueue])
def test_shutdown_immediate_releases_items(cls):
    q = cls()
    items = [Payload(i) for i in range(100)]
    refs = [weakref.ref(item) for item in items]
    q.put_many(items)
    del items
    q.shutdown(immediate=True)
    assert [ref() for ref in refs] == [None] * 100


def test_queue_dealloc_releases_items(make_queue):
    q = make_queue()
    item = Payload(3)
    ref = weakref.ref(item)
    q.put(item)
    del item, q
    assert ref() is None


# Re-entrant puts from __del__ and from signal handlers


class PutOnDelete:
    """Puts a token into a queue from its __del__ method.

    The object sits in a reference cycle with itself, so the cyclic garbage
    collector frees it, and so runs __del__, at whatever allocation starts
    a collection: often inside a queue method.
    """

    def __init__(self, q, token, log):
        self.q = q
        self.token = token
        self.log = log
        self.cycle = self

    def __del__(self):
        try:
            self.q.put_nowait(self.token)
        except (mqs.Full, mqs.ShutDown) as exc:
            self.log.append((self.token, type(exc).__name__))
        else:
            self.log.append((self.token, "put"))


REENTRANT_KINDS = {
    "Queue": mqs.Queue,
    "Queue-bounded": lambda: mqs.Queue(maxsize=64),
    "SimpleQueue": mqs.SimpleQueue,
}


@pytest.mark.parametrize("factory", list(REENTRANT_KINDS.values()),
                         ids=list(REENTRANT_KINDS))
def test_put_from_del_loses_nothing(factory):
    q = factory()
    log = []
    received = []

    def run():
        for i in range(3000):
            PutOnDelete(q, ("del", i), log)
            q.put(("main", i))
            received.extend(q.get_many(3, block=False))
            q.put_many([("many", i), ("many2", i)])
            PutOnDelete(q, ("del2", i), log)
            received.append(q.get())
            received.extend(drain(q))
        gc.collect()
        received.extend(drain(q))

    thresholds = gc.get_threshold()
    # Collect on nearly every allocation, so __del__ runs in the middle
    # of the queue's own calls.
    gc.set_threshold(1, 1, 1)
    try:
        worker = start_worker(run)
        worker.join(60)
    finally:
        gc.set_threshold(*thresholds)
    assert not worker.is_alive(), "deadlock: run() still going after 60 s"
    assert worker.error is None

    put_tokens = [token for token, outcome in log if outcome == "put"]
    assert len(log) == 6000
    assert sorted(received, key=repr) == sorted(
        [("main", i) for i in range(3000)]
        + [("many", i) for i in range(3000)]
        + [("many2", i) for i in range(3000)]
        + put_tokens,
        key=repr,
    )
    main_order = [i for tag, i in received if tag == "main"]
    assert main_order == list(range(3000))


@pytest.mark.parametrize("cls", [mqs.Queue, mqs.SimpleQueue])
def test_put_from_del_of_got_item_succeeds(cls):
    q = cls()
    log = []
    q.put(PutOnDelete(q, "reborn", log))
    item = q.get()
    item.cycle = None  # break the cycle so the drop below frees it
    del item
    assert log == [("reborn", "put")]
    assert q.get_nowait() == "reborn"


@pytest.mark.parametrize("cls", [mqs.Queue, mqs.SimpleQueue])
def test_shutdown_immediate_completes_before_item_del(cls):
    q = cls()
    log = []
    items = [PutOnDelete(q, i, log) for i in range(5)]
    for item in items:
        item.cycle = None
    q.put_many(items)
    del items, item
    q.shutdown(immediate=True)
    assert sorted(log) == [(i, "ShutDown") for i in range(5)]
    assert q.qsize() == 0


SIGNAL_KINDS = {
    "Queue-put": (mqs.Queue, "put"),
    "Queue-put_nowait": (mqs.Queue, "put_nowait"),
    "Queue-bounded-put_nowait": (lambda: mqs.Queue(maxsize=64), "put_nowait"),
    "SimpleQueue-put": (mqs.SimpleQueue, "put"),
}


@pytest.mark.parametrize("factory, method", list(SIGNAL_KINDS.values()),
                         ids=list(SIGNAL_KINDS))
def test_signal_handler_put_loses_nothing(factory, method):
    q = factory()
    put = getattr(q, method)
    handler_tokens = []
    rejected = []

    def on_alarm(signum, frame):
        token = ("alarm", len(handler_tokens) + len(rejected))
        try:
            put(token)
        except mqs.Full:
            rejected.append(token)
        else:
            handler_tokens.append(token)

    received = []
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
    try:
        deadline = time.monotonic() + 30
        i = 0
        # Run until the handler has fired often, with a time bound.
        while len(handler_tokens) < 200 and time.monotonic() < deadline:
            q.put_nowait(("main", i))
            q.put_many([("many", i)])
            received.append(q.get())
            received.extend(q.get_many(2, block=False))
            received.extend(drain(q))
            i += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)
    received.extend(drain(q))

    assert len(handler_tokens) >= 200
    assert rejected == []
    expected = ([("main", k) for k in range(i)]
                + [("many", k) for k in range(i)]
                + handler_tokens)
    assert sorted(received) == sorted(expected)
    assert [k for tag, k in received if tag == "main"] == list(range(i))
    assert [k for tag, k in received if tag == "alarm"] == [
        k for _, k in handler_tokens]


@pytest.mark.parametrize("factory", list(REENTRANT_KINDS.values()),
                         ids=list(REENTRANT_KINDS))
def test_get_wakes_for_signal_handler_put(factory):
    q = factory()

    def on_alarm(signum, frame):
        q.put_nowait("alarm")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, SETTLE_S)
    start = time.monotonic()
    try:
        item = q.get(timeout=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    elapsed = time.monotonic() - start
    assert item == "alarm"
    assert elapsed < SETTLE_S + PROMPT_S


# Ctrl-C (SIGINT) interrupts blocking calls


BLOCKING_CALLS = {
    "Queue.get": ("q = mqs.Queue()", "q.get()"),
    "Queue.get-timeout": ("q = mqs.Queue()", "q.get(timeout=600)"),
    "Queue.get_many": ("q = mqs.Queue()", "q.get_many(8)"),
    "Queue.join": ("q = mqs.Queue(); q.put(1)", "q.join()"),
    "Queue.put-bounded": ("q = mqs.Queue(1); q.put(1)", "q.put(2)"),
    "Queue.put_many-bounded": ("q = mqs.Queue(1)", "q.put_many([1, 2])"),
    "SimpleQueue.get": ("q = mqs.SimpleQueue()", "q.get()"),
    "iteration": ("q = mqs.Queue()", "for _ in q: pass"),
}

CHILD_TEMPLATE = """\
import sys
import mqs
{setup}
print("blocking", flush=True)
try:
    {call}
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(42)
print("returned", flush=True)
sys.exit(1)
"""


@pytest.mark.parametrize("setup, call", list(BLOCKING_CALLS.values()),
                         ids=list(BLOCKING_CALLS))
def test_blocking_call_raises_keyboard_interrupt_on_sigint(setup, call):
    script = CHILD_TEMPLATE.format(setup=setup, call=call)
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        first_line = child.stdout.readline()
        assert first_line == "blocking\n", child.stderr.read()
        time.sleep(SETTLE_S)
        assert child.poll() is None, "the call returned instead of blocking"

        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=PROMPT_S * 2)
        elapsed = time.monotonic() - sent
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert out == "interrupted\n", err
    assert child.returncode == 42
    assert elapsed < PROMPT_S


# The GIL is released while a call waits


def test_get_releases_gil_while_waiting(make_queue):
    q = make_queue()
    waiter = start_worker(q.get, True, 30)
    time.sleep(SETTLE_S)

    # If the waiter held the GIL, this loop could not run until its
    # 30 s timeout had passed, and the waiter would get Empty.
    spins = 0
    until = time.monotonic() + SETTLE_S
    while time.monotonic() < until:
        spins += 1
    q.put("wake")
    waiter.finish()
    assert spins > 0
    assert waiter.error is None
    assert waiter.result == "wake"
    assert waiter.elapsed < 30


def test_put_releases_gil_while_waiting_when_full():
    q = mqs.Queue(maxsize=1)
    q.put("a")
    waiter = start_worker(q.put, "b", True, 30)
    time.sleep(SETTLE_S)

    counter = start_worker(sum, range(1_000_000)).finish(timeout=20)
    assert counter.result == sum(range(1_000_000))
    assert q.get() == "a"
    waiter.finish()
    assert waiter.error is None
    assert waiter.elapsed < 30
    assert q.get() == "b"


def test_join_releases_gil_while_waiting():
    q = mqs.Queue()
    q.put("a")
    joiner = start_worker(q.join)
    time.sleep(SETTLE_S)

    counter = start_worker(sum, range(1_000_000)).finish(timeout=20)
    assert counter.result == sum(range(1_000_000))
    assert joiner.is_alive()
    q.get()
    q.task_done()
    joiner.finish()
    assert joiner.error is None


# Bad input


@pytest.mark.parametrize("maxsize, shown", [
    ("3", "str '3'"),
    (1.5, "float 1.5"),
    (True, "bool True"),
    (None, "NoneType None"),
])
def test_queue_rejects_maxsize_of_wrong_type(maxsize, shown):
    message = (r"^maxsize must be an int \(0 or less for unbounded\), "
               rf"got {shown}$")
    with pytest.raises(TypeError, match=message):
        mqs.Queue(maxsize)


def test_queue_rejects_maxsize_beyond_64_bits():
    with pytest.raises(ValueError, match=(
            r"^maxsize must be at most 2\*\*63 - 1, got "
            r"1180591620717411303424; pass 0 for an unbounded queue$")):
        mqs.Queue(2**70)
    q = mqs.Queue(4)
    with pytest.raises(ValueError, match="at most 2"):
        q.maxsize = 2**63
    assert q.maxsize == 4
    assert mqs.Queue(2**63 - 1).maxsize == 2**63 - 1


def test_queue_maxsize_setter_rejects_wrong_type():
    q = mqs.Queue(4)
    with pytest.raises(TypeError, match=r"got str '3'$"):
        q.maxsize = "3"
    with pytest.raises(TypeError, match=r"got bool False$"):
        q.maxsize = False
    assert q.maxsize == 4


def test_simple_queue_rejects_arguments():
    with pytest.raises(TypeError):
        queue.SimpleQueue(3)
    with pytest.raises(TypeError, match="positional argument"):
        mqs.SimpleQueue(3)


@pytest.mark.parametrize("filled", [False, True], ids=["empty", "non-empty"])
def test_get_rejects_timeout_of_wrong_type(make_queue, filled):
    q = make_queue()
    if filled:
        q.put("a")
    message = "^timeout must be a number of seconds or None, got 'x'$"
    with pytest.raises(TypeError, match=message):
        q.get(timeout="x")
    with pytest.raises(TypeError, match=message):
        q.get_many(2, timeout="x")
    assert q.qsize() == int(filled)


@pytest.mark.parametrize("timeout, shown", [(-1, "-1"), (-0.5, "-0.5"),
                                            (float("nan"), "nan")])
@pytest.mark.parametrize("filled", [False, True], ids=["empty", "non-empty"])
def test_get_rejects_negative_timeout(make_queue, filled, timeout, shown):
    q = make_queue()
    if filled:
        q.put("a")
    message = (
        f"^timeout must be a non-negative number of seconds, got {shown}$")
    with pytest.raises(ValueError, match=message):
        q.get(timeout=timeout)
    with pytest.raises(ValueError, match=message):
        q.get_many(2, timeout=timeout)
    assert q.qsize() == int(filled)


@pytest.mark.parametrize("filled", [False, True], ids=["empty", "non-empty"])
def test_get_negative_timeout_matches_stdlib(filled):
    for cls in (queue.Queue, mqs.Queue, queue.SimpleQueue, mqs.SimpleQueue):
        q = cls()
        if filled:
            q.put("a")
        with pytest.raises(ValueError):
            q.get(timeout=-1)


@pytest.mark.parametrize("filled", [0, 1], ids=["empty", "non-full"])
def test_put_bounded_rejects_bad_timeout(filled):
    q = mqs.Queue(maxsize=2)
    reference = queue.Queue(maxsize=2)
    for _ in range(filled):
        q.put("a")
        reference.put("a")
    negative = "^timeout must be a non-negative number of seconds, got {}$"
    with pytest.raises(ValueError):
        reference.put("b", timeout=-1)
    with pytest.raises(ValueError, match=negative.format(-1)):
        q.put("b", timeout=-1)
    wrong_type = "^timeout must be a number of seconds or None, got 'x'$"
    with pytest.raises(TypeError, match=wrong_type):
        q.put("b", timeout="x")
    with pytest.raises(ValueError, match=negative.format(-2)):
        q.put_many(["b"], timeout=-2)
    assert q.qsize() == filled


def test_put_bounded_rejects_negative_timeout_when_full():
    q = mqs.Queue(maxsize=1)
    q.put("a")
    message = "^timeout must be a non-negative number of seconds, got -1$"
    with pytest.raises(ValueError, match=message):
        q.put("b", timeout=-1)
    assert q.qsize() == 1


# (class name, maxsize, items queued before the call); maxsize None is a
# SimpleQueue, which takes no maxsize.
STDLIB_SHAPES = [
    ("Queue", 0, 0), ("Queue", 0, 1),
    ("Queue", 2, 0), ("Queue", 2, 1), ("Queue", 2, 2),
    ("SimpleQueue", None, 0), ("SimpleQueue", None, 1),
]

# Negative timeouts, and 0 as the boundary. None is left out because a
# blocking call with it could wait forever.
EDGE_TIMEOUTS = [-1, -0.5, -0.0, float("-inf"), 0]


def _filled_pair(cls_name, maxsize, filled):
    """Return an mqs queue and a stdlib queue that contain the same items."""
    pair = []
    for module in (mqs, queue):
        cls = getattr(module, cls_name)
        q = cls() if maxsize is None else cls(maxsize)
        for number in range(filled):
            q.put(f"old{number}")
        pair.append(q)
    return pair


def _outcome(call):
    """Return ("returned", value) or ("raised", the stdlib class a caller
    catches) for `call()`."""
    try:
        return ("returned", call())
    except queue.Empty:
        return ("raised", queue.Empty)
    except queue.Full:
        return ("raised", queue.Full)
    except ValueError:
        return ("raised", ValueError)


@pytest.mark.parametrize("timeout", EDGE_TIMEOUTS)
@pytest.mark.parametrize("block", [True, False])
@pytest.mark.parametrize("verb", ["put", "get"])
@pytest.mark.parametrize("cls_name, maxsize, filled", STDLIB_SHAPES)
def test_edge_timeout_matches_stdlib(cls_name, maxsize, filled, verb,
                                     block, timeout):
    q, reference = _filled_pair(cls_name, maxsize, filled)
    if verb == "put":
        got = _outcome(lambda: q.put("new", block, timeout))
        expected = _outcome(lambda: reference.put("new", block, timeout))
    elif cls_name == "SimpleQueue" and block and timeout == float("-inf"):
        # CPython 3.11's C SimpleQueue.get raises OverflowError while it
        # converts -inf, before its sign check. mqs raises ValueError for
        # it, as queue.Queue.get does.
        got = _outcome(lambda: q.get(block, timeout))
        expected = ("raised", ValueError)
    else:
        got = _outcome(lambda: q.get(block, timeout))
        expected = _outcome(lambda: reference.get(block, timeout))

    assert got == expected
    assert drain(q) == drain(reference)


@pytest.mark.parametrize("timeout", EDGE_TIMEOUTS)
@pytest.mark.parametrize("block", [True, False])
@pytest.mark.parametrize("maxsize, filled",
                         [(0, 0), (0, 1), (2, 0), (2, 1), (2, 2)])
def test_put_many_edge_timeout_matches_stdlib_puts(maxsize, filled, block,
                                                   timeout):
    # queue.Queue has no put_many: one put per item is its equivalent.
    q, reference = _filled_pair("Queue", maxsize, filled)

    def put_each():
        for item in ["b", "c"]:
            reference.put(item, block, timeout)

    got = _outcome(lambda: q.put_many(["b", "c"], block, timeout))
    expected = _outcome(put_each)

    assert got == expected
    assert drain(q) == drain(reference)


@pytest.mark.parametrize("max_items, error, message", [
    (1.5, TypeError, "^max_items must be an int, got float 1.5$"),
    (True, TypeError, "^max_items must be an int, got bool True$"),
    ("2", TypeError, "^max_items must be an int, got str '2'$"),
    (0, ValueError, "^max_items must be at least 1, got 0$"),
    (-3, ValueError, "^max_items must be at least 1, got -3$"),
    (2**70, ValueError,
     r"^max_items must be at most 2\*\*63 - 1, got 1180591620717411303424$"),
])
def test_get_many_rejects_bad_max_items(make_queue, max_items, error, message):
    q = make_queue()
    q.put("a")
    with pytest.raises(error, match=message):
        q.get_many(max_items)
    assert q.qsize() == 1


def test_put_many_rejects_non_iterable(make_queue):
    q = make_queue()
    with pytest.raises(TypeError, match="'int' object is not iterable"):
        q.put_many(5)
    assert q.qsize() == 0


def test_queue_cannot_be_pickled_like_stdlib():
    with pytest.raises(TypeError):
        pickle.dumps(queue.Queue())
    with pytest.raises(TypeError):
        pickle.dumps(mqs.Queue())
    with pytest.raises(TypeError):
        pickle.dumps(mqs.SimpleQueue())
