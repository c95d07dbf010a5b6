"""Stateful tests: mqs.Queue and mqs.SimpleQueue against the stdlib queues.

Hypothesis runs random sequences of non-blocking calls on an mqs queue and
on a reference built on `queue.Queue` or `queue.SimpleQueue`. After every
step both must have returned the same value or raised the same exception
class, with mqs exceptions mapped to the stdlib classes they derive from.
The stdlib has no `put_many`, `get_many` or (before Python 3.13)
`shutdown`, so the reference implements them from the stdlib calls.
"""

import queue

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import mqs


class ReferenceShutDown(Exception):
    """Raised by the reference queues where Python 3.13 raises ShutDown."""


# Exception classes the reference raises, keyed by the mqs class that must
# raise in their place.
EXPECTED_ERROR = {
    mqs.Empty: queue.Empty,
    mqs.Full: queue.Full,
    mqs.ShutDown: ReferenceShutDown,
    ValueError: ValueError,
}

# Timeout of blocking calls made only when they need not wait: a wrong
# wait then ends in Empty or Full, which fails the comparison, instead of
# hanging the test.
WRONG_WAIT_S = 5.0

# A shutdown is final, so it takes effect in one of eight draws only:
# otherwise most steps of a run would test a shut-down queue.
SHUTDOWN_ROLL = st.integers(min_value=0, max_value=7)

# Deterministic and small: the same examples on every run, a few seconds.
MODEL_SETTINGS = settings(
    max_examples=150,
    stateful_step_count=50,
    derandomize=True,
    deadline=None,
    database=None,
)


class ReferenceQueue:
    """`queue.Queue` plus put_many, get_many and Python 3.13's shutdown.

    Every call is non-blocking or made only when it cannot block, so the
    stdlib queue never waits.
    """

    def __init__(self, maxsize):
        self.q = queue.Queue(maxsize)
        self.is_shutdown = False

    @property
    def maxsize(self):
        return self.q.maxsize

    @maxsize.setter
    def maxsize(self, value):
        self.q.maxsize = value

    @property
    def unfinished_tasks(self):
        return self.q.unfinished_tasks

    def put(self, item, block=True, timeout=None):
        if self.is_shutdown:
            raise ReferenceShutDown
        self.q.put(item, block, timeout)

    def put_nowait(self, item):
        self.put(item, block=False)

    def put_many(self, items):
        """Put items one by one; on failure report how many went in."""
        if self.is_shutdown:
            raise ReferenceShutDown
        for accepted, item in enumerate(items):
            try:
                self.put(item, block=False)
            except (queue.Full, ReferenceShutDown) as exc:
                exc.accepted = accepted
                raise

    def get(self, block=True, timeout=None):
        if self.is_shutdown and self.q.empty():
            raise ReferenceShutDown
        return self.q.get(block, timeout)

    def get_nowait(self):
        return self.get(block=False)

    def get_many(self, max_items):
        first = self.get(block=False)
        more = min(max_items - 1, self.q.qsize())
        return [first] + [self.q.get_nowait() for _ in range(more)]

    def task_done(self):
        self.q.task_done()

    def qsize(self):
        return self.q.qsize()

    def empty(self):
        return self.q.empty()

    def full(self):
        return self.q.full()

    def shutdown(self, immediate=False):
        # The rules of queue.Queue.shutdown in Python 3.13: drop what is
        # queued when immediate, one unfinished task per dropped item.
        self.is_shutdown = True
        if immediate:
            while not self.q.empty():
                self.q.get_nowait()
                if self.q.unfinished_tasks > 0:
                    self.q.unfinished_tasks -= 1


class ReferenceSimpleQueue:
    """`queue.SimpleQueue` plus put_many, get_many and shutdown."""

    def __init__(self):
        self.q = queue.SimpleQueue()
        self.is_shutdown = False

    def put(self, item):
        if self.is_shutdown:
            raise ReferenceShutDown
        self.q.put(item)

    put_nowait = put

    def put_many(self, items):
        if self.is_shutdown:
            raise ReferenceShutDown
        for item in items:
            self.q.put(item)

    def get(self, block=True, timeout=None):
        if self.is_shutdown and self.q.empty():
            raise ReferenceShutDown
        return self.q.get(block, timeout)

    def get_nowait(self):
        return self.get(block=False)

    def get_many(self, max_items):
        first = self.get(block=False)
        more = min(max_items - 1, self.q.qsize())
        return [first] + [self.q.get_nowait() for _ in range(more)]

    def qsize(self):
        return self.q.qsize()

    def empty(self):
        return self.q.empty()

    def shutdown(self, immediate=False):
        self.is_shutdown = True
        if immediate:
            while not self.q.empty():
                self.q.get_nowait()


def outcome(call, *args, **kwargs):
    """Run a call and return what it returned or which error it raised."""
    try:
        return ("returned", call(*args, **kwargs))
    except (queue.Empty, queue.Full, mqs.ShutDown, ReferenceShutDown,
            ValueError) as exc:
        error_class = EXPECTED_ERROR.get(type(exc), type(exc))
        # Only put_many errors carry `accepted`; 0 stands for "none".
        return ("raised", error_class, getattr(exc, "accepted", 0))


class CommonRules(RuleBasedStateMachine):
    """Rules and invariants that Queue and SimpleQueue share.

    A subclass sets `self.q` and `self.reference` before the first rule.
    """

    def __init__(self):
        super().__init__()
        self.next_item = 0

    def new_items(self, count):
        items = list(range(self.next_item, self.next_item + count))
        self.next_item += count
        return items

    def check_same(self, name, *args, **kwargs):
        expected = outcome(getattr(self.reference, name), *args, **kwargs)
        actual = outcome(getattr(self.q, name), *args, **kwargs)
        assert actual == expected, f"{name}{args}{kwargs}"

    @rule()
    def put_nowait(self):
        self.check_same("put_nowait", *self.new_items(1))

    @rule()
    def get_nowait(self):
        self.check_same("get_nowait")

    @rule(block=st.booleans())
    def get_zero_timeout(self, block):
        self.check_same("get", block=block, timeout=0)

    @precondition(lambda self: self.reference.is_shutdown
                  or not self.reference.empty())
    @rule()
    def get_blocking_with_item(self):
        self.check_same("get", timeout=WRONG_WAIT_S)

    @rule(max_items=st.integers(min_value=1, max_value=8))
    def get_many_nonblocking(self, max_items):
        expected = outcome(self.reference.get_many, max_items)
        actual = outcome(self.q.get_many, max_items, block=False)
        assert actual == expected

    @rule(immediate=st.booleans(), roll=SHUTDOWN_ROLL)
    def shutdown(self, immediate, roll):
        if roll != 0:
            return
        self.q.shutdown(immediate=immediate)
        self.reference.shutdown(immediate=immediate)

    @invariant()
    def sizes_match(self):
        assert self.q.qsize() == self.reference.qsize()
        assert self.q.empty() == self.reference.empty()

    @invariant()
    def shutdown_flag_matches(self):
        assert self.q.is_shutdown == self.reference.is_shutdown


class QueueMachine(CommonRules):
    """Drive an mqs.Queue and a ReferenceQueue through the same calls."""

    @initialize(maxsize=st.integers(min_value=-2, max_value=6))
    def create(self, maxsize):
        self.q = mqs.Queue(maxsize)
        self.reference = ReferenceQueue(maxsize)

    @rule(block=st.booleans())
    def put_zero_timeout(self, block):
        self.check_same("put", *self.new_items(1), block=block, timeout=0)

    @precondition(lambda self: self.reference.is_shutdown
                  or not self.reference.full())
    @rule()
    def put_blocking_with_room(self):
        self.check_same("put", *self.new_items(1), timeout=WRONG_WAIT_S)

    @rule(count=st.integers(min_value=0, max_value=8),
          nonblocking=st.sampled_from([{"block": False}, {"timeout": 0}]))
    def put_many_nonblocking(self, count, nonblocking):
        items = self.new_items(count)
        expected = outcome(self.reference.put_many, items)
        actual = outcome(self.q.put_many, items, **nonblocking)
        assert actual == expected

    @rule()
    def task_done(self):
        self.check_same("task_done")

    @rule(maxsize=st.integers(min_value=-2, max_value=8))
    def change_maxsize(self, maxsize):
        self.q.maxsize = maxsize
        self.reference.maxsize = maxsize

    @invariant()
    def full_matches(self):
        assert self.q.full() == self.reference.full()

    @invariant()
    def unfinished_tasks_match(self):
        assert self.q.unfinished_tasks == self.reference.unfinished_tasks

    @invariant()
    def maxsize_matches(self):
        # As in queue.Queue, a maxsize of 0 or less reads back as given.
        assert self.q.maxsize == self.reference.maxsize


class SimpleQueueMachine(CommonRules):
    """Drive an mqs.SimpleQueue and a ReferenceSimpleQueue alike."""

    def __init__(self):
        super().__init__()
        self.q = mqs.SimpleQueue()
        self.reference = ReferenceSimpleQueue()

    @rule()
    def put(self):
        self.check_same("put", *self.new_items(1))

    @rule(count=st.integers(min_value=0, max_value=8))
    def put_many(self, count):
        self.check_same("put_many", self.new_items(count))


def test_queue_matches_stdlib_model():
    run_state_machine_as_test(QueueMachine, settings=MODEL_SETTINGS)


def test_simple_queue_matches_stdlib_model():
    run_state_machine_as_test(SimpleQueueMachine, settings=MODEL_SETTINGS)
