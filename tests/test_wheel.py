"""Tests of mqs.TimingWheel: the native timing wheel driven from Python.

Most tests inject a simulated clock, so nothing sleeps. The model tests
compare the wheel with a sorted list: a timer fires at the first advance
whose time is at or past its deadline, in (deadline, scheduling order).
"""

import gc
import math
import pathlib
import pickle
import random
import subprocess
import sys
import time
import tracemalloc
import weakref

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import mqs

NS_PER_S = 1_000_000_000
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
ENTRY_BYTES = 32 + 8  # C slab entry plus the item reference
HEADER_BYTES = 4752


class Clock:
    """A settable clock in seconds."""

    def __init__(self, now=0.0):
        self.now = now

    def __call__(self):
        return self.now


class Item:
    """A weak-referenceable payload, to watch when the wheel lets go."""

    def __init__(self, value=None):
        self.value = value


def to_ns(seconds):
    """Convert seconds as the wheel does: nearest ns, saturating at int64."""
    if isinstance(seconds, int):
        ns = seconds * NS_PER_S
    else:
        product = seconds * 1e9
        if abs(product) >= 2.0**63:
            return INT64_MAX if product > 0 else INT64_MIN
        ns = round(product)
    return max(INT64_MIN, min(INT64_MAX, ns))


def make_wheel(tick_s=0.001, capacity=16, now=0.0):
    clock = Clock(now)
    return mqs.TimingWheel(tick_s, capacity, clock=clock), clock


# ---- construction and bad input ----


def test_wheel_defaults():
    wheel = mqs.TimingWheel()
    assert wheel.tick_s == 0.001
    assert wheel.capacity == 1024
    assert len(wheel) == 0
    assert wheel.next_deadline() is None
    assert wheel.advance() == []


def test_wheel_is_exported():
    assert "TimingWheel" in mqs.__all__
    assert mqs.TimingWheel.__module__ == "mqs._wheel"


@pytest.mark.parametrize("tick_s", [-1, 0, 0.0, -0.5, math.nan])
def test_wheel_rejects_tick_not_positive(tick_s):
    with pytest.raises(
            ValueError,
            match=f"tick_s must be a positive number of seconds, got {tick_s}"):
        mqs.TimingWheel(tick_s)


def test_wheel_rejects_tick_below_one_nanosecond():
    with pytest.raises(ValueError, match=r"at least 1e-09.*got 1e-12"):
        mqs.TimingWheel(1e-12)


@pytest.mark.parametrize("tick_s", [math.inf, 1e10, 10**30])
def test_wheel_rejects_tick_too_large(tick_s):
    with pytest.raises(ValueError, match="tick_s must be at most 9.2e9"):
        mqs.TimingWheel(tick_s)


@pytest.mark.parametrize("tick_s", ["0.001", None, True, b"1"])
def test_wheel_rejects_tick_of_wrong_type(tick_s):
    with pytest.raises(TypeError,
                       match="tick_s must be a real number of seconds"):
        mqs.TimingWheel(tick_s)


@pytest.mark.parametrize("capacity", [0, -1, 2**32 - 1, 2**40])
def test_wheel_rejects_capacity_out_of_range(capacity):
    with pytest.raises(ValueError,
                       match=f"from 1 to 4294967294, got {capacity}"):
        mqs.TimingWheel(0.001, capacity)


@pytest.mark.parametrize("capacity", ["8", 8.0, None, True])
def test_wheel_rejects_capacity_of_wrong_type(capacity):
    with pytest.raises(TypeError, match="capacity must be an int, got"):
        mqs.TimingWheel(0.001, capacity)


def test_wheel_rejects_clock_not_callable():
    with pytest.raises(TypeError, match="clock must be a callable.*got int 5"):
        mqs.TimingWheel(clock=5)


def test_wheel_rejects_clock_returning_nan():
    clock = Clock(0.0)
    wheel = mqs.TimingWheel(clock=clock)
    clock.now = math.nan
    with pytest.raises(ValueError,
                       match="clock.. result must be a finite number of "
                             "seconds, got nan"):
        wheel.schedule(1.0, "x")
    assert len(wheel) == 0


def test_wheel_rejects_clock_returning_text():
    with pytest.raises(TypeError, match="clock.. result must be a real number"):
        mqs.TimingWheel(clock=lambda: "now")


@pytest.mark.parametrize("delay", [math.nan, math.inf, -math.inf])
def test_schedule_rejects_non_finite_delay(delay):
    wheel, _ = make_wheel()
    with pytest.raises(ValueError,
                       match=f"delay_s must be a finite number of seconds, "
                             f"got {delay}"):
        wheel.schedule(delay, "x")
    assert len(wheel) == 0


@pytest.mark.parametrize("delay", ["1", None, True, 1j, [1.0]])
def test_schedule_rejects_delay_of_wrong_type(delay):
    wheel, _ = make_wheel()
    with pytest.raises(TypeError,
                       match="delay_s must be a real number of seconds, got"):
        wheel.schedule(delay, "x")
    assert len(wheel) == 0


def test_schedule_at_rejects_non_finite_deadline():
    wheel, _ = make_wheel()
    with pytest.raises(ValueError, match="deadline_s must be a finite number"):
        wheel.schedule_at(math.nan, "x")


def test_advance_rejects_non_finite_now():
    wheel, _ = make_wheel()
    with pytest.raises(ValueError, match="now must be a finite number.*inf"):
        wheel.advance(math.inf)
    with pytest.raises(TypeError, match="now must be a real number.*str"):
        wheel.advance("1")


def test_cancel_rejects_handle_of_wrong_type():
    wheel, _ = make_wheel()
    with pytest.raises(TypeError,
                       match="handle must be an int returned by schedule.., "
                             "got str 'x'"):
        wheel.cancel("x")
    with pytest.raises(TypeError, match="got float 1.0"):
        wheel.cancel(1.0)


def test_schedule_many_rejects_length_mismatch():
    wheel, _ = make_wheel()
    with pytest.raises(ValueError,
                       match="same length, got 3 delays and 2 items"):
        wheel.schedule_many([1, 2, 3], ["a", "b"])
    assert len(wheel) == 0


def test_schedule_many_bad_delay_is_atomic():
    wheel, _ = make_wheel()
    with pytest.raises(ValueError, match=r"delays_s\[2\] must be a finite"):
        wheel.schedule_many([1.0, 2.0, math.nan], ["a", "b", "c"])
    with pytest.raises(TypeError, match=r"delays_s\[1\] must be a real number"):
        wheel.schedule_many([1.0, "2"], ["a", "b"])
    assert len(wheel) == 0
    assert wheel._check()


def test_wheel_cannot_be_pickled():
    wheel, _ = make_wheel()
    with pytest.raises(TypeError):
        pickle.dumps(wheel)


# ---- behaviour ----


def test_advance_fires_in_due_order():
    wheel, clock = make_wheel()
    for name, delay in [("c", 0.3), ("a", 0.1), ("d", 5.0), ("b", 0.2)]:
        wheel.schedule(delay, name)
    assert len(wheel) == 4
    clock.now = 1.0
    assert wheel.advance() == ["a", "b", "c"]
    assert len(wheel) == 1
    assert wheel.advance(10.0) == ["d"]
    assert len(wheel) == 0


def test_same_tick_fires_by_deadline_then_insertion():
    wheel, _ = make_wheel(tick_s=0.001)
    wheel.schedule_at(0.0019, "late")
    wheel.schedule_at(0.0011, "early")
    wheel.schedule_at(0.0015, "mid-1")
    wheel.schedule_at(0.0015, "mid-2")
    assert wheel.advance(0.002) == ["early", "mid-1", "mid-2", "late"]


def test_advance_never_fires_early():
    wheel, _ = make_wheel(tick_s=0.001)
    wheel.schedule_at(2.000000001, "x")
    assert wheel.advance(2.0) == []
    assert wheel.advance(2.000000001) == ["x"]


def test_advance_fires_exactly_within_tick():
    wheel, _ = make_wheel(tick_s=1.0)
    wheel.schedule_at(0.25, "quarter")
    wheel.schedule_at(0.75, "three-quarters")
    assert wheel.advance(0.2499) == []
    assert wheel.advance(0.25) == ["quarter"]
    assert wheel.advance(0.7) == []
    assert wheel.advance(0.75) == ["three-quarters"]


@pytest.mark.parametrize("delay", [0, 0.0, -1, -0.5, -1e300, -(10**400)])
def test_nonpositive_delay_fires_next_advance(delay):
    wheel, clock = make_wheel(now=5.5)
    wheel.schedule(delay, "now")
    assert wheel.advance() == ["now"]
    assert len(wheel) == 0


def test_delay_zero_fires_when_wheel_clock_lags():
    wheel, clock = make_wheel(tick_s=1.0)
    clock.now = 100.3
    wheel.schedule(0, "now")
    assert wheel.advance() == ["now"]


def test_due_items_fire_in_deadline_order():
    wheel, clock = make_wheel(now=10.0)
    wheel.advance()
    wheel.schedule(-1, "minus-one")
    wheel.schedule(-3, "minus-three")
    wheel.schedule(0, "zero")
    wheel.schedule_at(9.5, "at-9.5")
    assert wheel.advance() == ["minus-three", "minus-one", "at-9.5", "zero"]


@pytest.mark.parametrize("delay", [1e300, 1e20, 10**400, 2**70])
def test_huge_delay_is_never_early(delay):
    wheel, clock = make_wheel()
    wheel.schedule(delay, "far")
    clock.now = 1e12
    assert wheel.advance() == []
    assert wheel.advance(1e300) == []
    assert len(wheel) == 1
    assert wheel.next_deadline() == INT64_MAX / 1e9


def test_advance_backwards_fires_nothing_new():
    wheel, _ = make_wheel()
    wheel.schedule_at(5.0, "five")
    assert wheel.advance(4.0) == []
    assert wheel.advance(1.0) == []
    assert wheel.advance(5.0) == ["five"]
    wheel.schedule_at(4.5, "past")
    assert wheel.advance(2.0) == ["past"]


def test_schedule_counts_from_clock_reading():
    wheel, clock = make_wheel()
    clock.now = 50.0
    wheel.schedule(2.0, "x")
    assert wheel.next_deadline() == 52.0
    assert wheel.advance(51.999) == []
    assert wheel.advance(52.0) == ["x"]


def test_default_clock_is_time_monotonic():
    wheel = mqs.TimingWheel()
    before = time.monotonic()
    wheel.schedule(0.05, "x")
    after = time.monotonic()
    deadline = wheel.next_deadline()
    assert before + 0.05 - 1e-6 <= deadline
    assert deadline <= after + 0.05 + 1e-6
    assert wheel.advance(before) == []
    assert wheel.advance(after + 0.06) == ["x"]


def test_handles_are_distinct_ints():
    wheel, _ = make_wheel(capacity=4)
    handles = [wheel.schedule(1.0, i) for i in range(10)]
    assert all(type(handle) is int for handle in handles)
    assert len(set(handles)) == 10


def test_cancel_returns_true_once():
    wheel, _ = make_wheel()
    handle = wheel.schedule(1.0, "x")
    other = wheel.schedule(1.0, "y")
    assert wheel.cancel(handle) is True
    assert wheel.cancel(handle) is False
    assert len(wheel) == 1
    assert wheel.advance(2.0) == ["y"]
    assert wheel.cancel(other) is False


@pytest.mark.parametrize("handle", [0, -1, 2**64, 2**70, 12345])
def test_cancel_of_unknown_handle_returns_false(handle):
    wheel, _ = make_wheel()
    wheel.schedule(1.0, "x")
    assert wheel.cancel(handle) is False
    assert len(wheel) == 1


def test_stale_handle_keeps_reused_entry():
    wheel, _ = make_wheel(capacity=1)
    old = wheel.schedule(1.0, "old")
    assert wheel.advance(1.0) == ["old"]
    new = wheel.schedule(1.0, "new")
    assert new != old
    assert wheel.capacity == 1
    assert wheel.cancel(old) is False
    assert len(wheel) == 1
    assert wheel.advance(2.0) == ["new"]


def test_cancel_after_cascade():
    wheel, _ = make_wheel(tick_s=0.001)
    handle = wheel.schedule_at(300.0, "cancelled")
    wheel.schedule_at(300.0005, "kept")
    # 299.999 s moves both timers from level 3 down to level 0 unfired.
    assert wheel.advance(299.999) == []
    assert wheel.cancel(handle) is True
    assert wheel._check()
    assert wheel.advance(301.0) == ["kept"]


def test_wheel_grows_when_full():
    wheel, _ = make_wheel(capacity=1)
    delays = [random.Random(7).random() for _ in range(100)]
    for index, delay in enumerate(delays):
        wheel.schedule(delay, index)
    assert wheel.capacity >= 100
    assert len(wheel) == 100
    assert wheel._check()
    expected = sorted(range(100), key=lambda i: (delays[i], i))
    assert wheel.advance(1.0) == expected


def test_schedule_many_grows_in_order():
    wheel, _ = make_wheel(capacity=2)
    handles = wheel.schedule_many((0.3, 0.1, 0.2, 0.1), iter("abcd"))
    assert len(handles) == 4
    assert wheel.capacity == 4
    assert wheel.advance(1.0) == ["b", "d", "c", "a"]


def test_schedule_many_handles_cancel():
    wheel, _ = make_wheel()
    handles = wheel.schedule_many([1, 2, 3], ["a", "b", "c"])
    assert wheel.cancel(handles[1]) is True
    assert wheel.advance(5) == ["a", "c"]


def test_schedule_many_of_nothing():
    wheel, _ = make_wheel()
    assert list(wheel.schedule_many([], [])) == []
    assert len(wheel) == 0


def test_schedule_accepts_real_number_types():
    fractions = pytest.importorskip("fractions")
    decimal = pytest.importorskip("decimal")
    wheel, _ = make_wheel()
    wheel.schedule(fractions.Fraction(1, 4), "fraction")
    wheel.schedule(decimal.Decimal("0.5"), "decimal")
    wheel.schedule(1, "int")
    assert wheel.advance(1.0) == ["fraction", "decimal", "int"]


def test_next_deadline_is_exact_without_cancel():
    wheel, _ = make_wheel()
    wheel.schedule_at(7.25, "a")
    wheel.schedule_at(3.5, "b")
    assert wheel.next_deadline() == 3.5
    wheel.advance(4.0)
    assert wheel.next_deadline() == 7.25


def test_next_deadline_bound_after_cancel():
    wheel, _ = make_wheel(tick_s=0.001)
    early = wheel.schedule_at(0.100, "early")
    wheel.schedule_at(0.120, "late")
    wheel.cancel(early)
    bound = wheel.next_deadline()
    assert bound <= 0.120
    if bound < 0.120:
        # A stale bound: advancing to it fires nothing and refreshes it.
        assert wheel.advance(bound) == []
        assert wheel.next_deadline() == 0.120
    assert wheel.advance(0.120) == ["late"]


def test_clock_jump_fires_all_in_order():
    rng = random.Random(3)
    wheel, clock = make_wheel(capacity=1024)
    delays = [rng.choice([rng.random(), rng.random() * 1e3,
                          rng.random() * 1e7, rng.random() * 1e9])
              for _ in range(20_000)]
    handles = wheel.schedule_many(delays, range(len(delays)))
    cancelled = set(range(0, len(delays), 7))
    for index in cancelled:
        assert wheel.cancel(handles[index])
    clock.now = 1e10
    fired = wheel.advance()
    expected = sorted((i for i in range(len(delays)) if i not in cancelled),
                      key=lambda i: (to_ns(delays[i]), i))
    assert fired == expected
    assert len(wheel) == 0
    assert wheel._check()


def test_wheel_releases_items():
    wheel, _ = make_wheel()
    fired_item, cancelled_item, pending_item = Item(), Item(), Item()
    refs = [weakref.ref(x) for x in (fired_item, cancelled_item, pending_item)]
    wheel.schedule(1.0, fired_item)
    handle = wheel.schedule(1.0, cancelled_item)
    wheel.schedule(9.0, pending_item)
    del fired_item, cancelled_item, pending_item

    assert len(wheel.advance(0.5)) == 0
    wheel.cancel(handle)
    assert refs[1]() is None
    fired = wheel.advance(2.0)
    assert refs[0]() is fired[0]
    del fired
    assert refs[0]() is None
    assert refs[2]() is not None
    del wheel
    assert refs[2]() is None


def test_item_cycle_is_collected():
    wheel, _ = make_wheel()
    item = Item()
    item.value = wheel
    wheel.schedule(1.0, item)
    ref = weakref.ref(item)
    del item, wheel
    gc.collect()
    assert ref() is None


def test_item_finalizer_may_reenter_wheel():
    wheel, _ = make_wheel()

    class Rescheduler:
        def __del__(self):
            wheel.schedule(1.0, "from __del__")

    handle = wheel.schedule(1.0, Rescheduler())
    assert wheel.cancel(handle) is True
    assert len(wheel) == 1
    assert wheel._check()
    assert wheel.advance(2.0) == ["from __del__"]


def test_nbytes_counts_bytes_per_entry():
    wheel, _ = make_wheel(capacity=1000)
    assert wheel.nbytes == HEADER_BYTES + 1000 * ENTRY_BYTES


def test_memory_per_timer():
    count = 100_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        wheel = mqs.TimingWheel(0.001, count, clock=Clock())
        allocated = tracemalloc.get_traced_memory()[0] - before
        wheel.schedule_many([1.0] * count, [None] * count)
        after_filling = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    per_timer = allocated / count
    assert len(wheel) == count
    assert ENTRY_BYTES <= per_timer < ENTRY_BYTES + 1
    # Filling a presized wheel allocates nothing but the handle list and
    # the handles themselves (Python ints, 32 to 36 bytes each).
    assert after_filling - allocated < count * (8 + 40)


def test_repr_shows_state():
    wheel, _ = make_wheel(capacity=8)
    wheel.schedule(1.0, "x")
    assert repr(wheel) == "<mqs.TimingWheel pending=1 tick_s=0.001 capacity=8>"


def test_wheel_type_is_generic():
    alias = mqs.TimingWheel[int]
    assert alias.__origin__ is mqs.TimingWheel


def test_wheel_stub_type_checks_usage():
    pytest.importorskip("mypy")
    usage = pathlib.Path(__file__).parent / "typing" / "wheel_usage.py"
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         "--cache-dir=/dev/null", str(usage)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- comparison with a sorted-list model ----


class Model:
    """Pending timers in a dict; advance sorts the due ones."""

    def __init__(self, start_ns):
        self.now_ns = start_ns
        self.pending = {}  # handle -> (deadline_ns, sequence, item)
        self.sequence = 0

    def schedule(self, handle, deadline_ns, item):
        self.pending[handle] = (deadline_ns, self.sequence, item)
        self.sequence += 1

    def cancel(self, handle):
        return self.pending.pop(handle, None) is not None

    def advance(self, now_ns):
        # INT64_MAX stands for "beyond 2**63 ns" and never comes due.
        self.now_ns = max(self.now_ns, min(now_ns, INT64_MAX - 1))
        due = sorted((entry for entry in self.pending.items()
                      if entry[1][0] <= self.now_ns),
                     key=lambda entry: entry[1][:2])
        for handle, _ in due:
            del self.pending[handle]
        return [entry[1][2] for entry in due]

    def earliest_ns(self):
        return min((d for d, _, _ in self.pending.values()), default=None)


TICKS = [1e-9, 1e-6, 0.001, 0.25]
LEVEL_EDGES = [1, 63, 64, 65, 4095, 4096, 4097, 2**18 - 1, 2**18, 2**24,
               2**30, 2**36 - 1, 2**36, 2**36 + 1, 2**40]


def delays_for(tick_s):
    """Delays in seconds that hit every level edge of a wheel with tick_s."""
    edge = st.builds(
        lambda ticks, nudge_ns: ticks * tick_s + nudge_ns * 1e-9,
        st.sampled_from(LEVEL_EDGES), st.sampled_from([-1, 0, 1]))
    return st.one_of(
        edge,
        st.floats(min_value=0, max_value=200 * tick_s),
        st.floats(min_value=-5.0, max_value=0.0),
        st.sampled_from([0, 0.0, -1, 1e300, 10**400, 2**63 / 1e9]),
        st.floats(min_value=0, max_value=1e7),
    )


class WheelMachine(RuleBasedStateMachine):
    """Random schedule/cancel/advance sequences against `Model`."""

    @initialize(tick_s=st.sampled_from(TICKS),
                start=st.sampled_from([0.0, 1234.5678, -7.25]))
    def create(self, tick_s, start):
        self.tick_s = tick_s
        self.delays = delays_for(tick_s)
        self.clock = Clock(start)
        self.wheel = mqs.TimingWheel(tick_s, 4, clock=self.clock)
        self.model = Model(to_ns(start))
        self.handles = []
        self.cancelled_any = False
        self.next_item = 0

    def _new_item(self):
        self.next_item += 1
        return self.next_item

    def _schedule_ns(self, deadline_ns, handle, item):
        self.model.schedule(handle, deadline_ns, item)
        self.handles.append(handle)

    @rule(data=st.data())
    def schedule(self, data):
        delay = data.draw(self.delays)
        item = self._new_item()
        handle = self.wheel.schedule(delay, item)
        deadline_ns = max(INT64_MIN, min(INT64_MAX,
                                         to_ns(self.clock.now) + to_ns(delay)))
        self._schedule_ns(deadline_ns, handle, item)

    @rule(data=st.data())
    def schedule_at(self, data):
        delay = data.draw(self.delays)
        if abs(delay) > 1e300:
            delay = 1e300 if delay > 0 else -1e300
        deadline = self.clock.now + delay
        item = self._new_item()
        handle = self.wheel.schedule_at(deadline, item)
        self._schedule_ns(to_ns(deadline), handle, item)

    @rule(data=st.data())
    def schedule_many(self, data):
        delays = data.draw(st.lists(self.delays, max_size=8))
        items = [self._new_item() for _ in delays]
        handles = self.wheel.schedule_many(delays, items)
        now_ns = to_ns(self.clock.now)
        for delay, handle, item in zip(delays, handles, items):
            deadline_ns = max(INT64_MIN, min(INT64_MAX, now_ns + to_ns(delay)))
            self._schedule_ns(deadline_ns, handle, item)

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def cancel(self, data):
        handle = data.draw(st.sampled_from(self.handles))
        expected = self.model.cancel(handle)
        self.cancelled_any |= expected
        assert self.wheel.cancel(handle) is expected

    @rule(handle=st.one_of(st.just(0), st.integers(-5, 2**70)))
    def cancel_unknown(self, handle):
        if handle in self.model.pending:
            return
        assert self.wheel.cancel(handle) is False

    @rule(step=st.one_of(
        st.floats(min_value=0, max_value=100),
        st.sampled_from([0.0, 1e-9, 1e3, 1e6, 1e9, 1e12])))
    def move_clock(self, step):
        self.clock.now += step

    @rule(data=st.data())
    def advance(self, data):
        choice = data.draw(st.sampled_from(
            ["clock", "next", "before-next", "back", "step", "far"]))
        if choice == "clock":
            fired = self.wheel.advance()
            expected = self.model.advance(to_ns(self.clock.now))
            assert fired == expected
            return

        earliest = self.model.earliest_ns()
        now = self.model.now_ns / 1e9
        if choice in ("next", "before-next") and earliest is not None:
            now = (earliest - (choice == "before-next")) / 1e9
        elif choice == "back":
            now -= data.draw(st.floats(min_value=0, max_value=10))
        elif choice == "step":
            now += data.draw(st.sampled_from(
                [self.tick_s, 64 * self.tick_s, 4096 * self.tick_s, 0.5]))
        elif choice == "far":
            now = 1e15
        if not math.isfinite(now):
            return
        fired = self.wheel.advance(now)
        assert fired == self.model.advance(to_ns(now))

    @invariant()
    def pending_count_matches(self):
        assert len(self.wheel) == len(self.model.pending)

    @invariant()
    def native_invariants_hold(self):
        assert self.wheel._check()

    @invariant()
    def next_deadline_is_bound(self):
        earliest = self.model.earliest_ns()
        bound = self.wheel.next_deadline()
        if earliest is None:
            assert bound is None
            return
        assert bound is not None
        assert bound <= earliest / 1e9
        if not self.cancelled_any:
            assert bound == earliest / 1e9

    def teardown(self):
        if hasattr(self, "wheel"):
            assert self.wheel.advance(1e300) == self.model.advance(INT64_MAX)
            left = len(self.model.pending)
            assert len(self.wheel) == left
            # Only deadlines saturated at 2**63 ns may stay pending.
            assert all(d == INT64_MAX for d, _, _ in self.model.pending.values())


TestWheelModel = WheelMachine.TestCase
TestWheelModel.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=200, deadline=None)
@given(tick_s=st.sampled_from(TICKS),
       timers=st.lists(st.tuples(st.floats(-10, 1e9), st.booleans()),
                       max_size=200),
       steps=st.lists(st.floats(0, 1e8), max_size=10))
def test_wheel_matches_sorted_list(tick_s, timers, steps):
    wheel, clock = make_wheel(tick_s=tick_s, capacity=8)
    model = Model(0)
    handles = []
    for index, (delay, _) in enumerate(timers):
        handle = wheel.schedule(delay, index)
        model.schedule(handle, to_ns(delay), index)
        handles.append(handle)
    for handle, (_, cancel) in zip(handles, timers):
        if cancel:
            assert wheel.cancel(handle) is True
            assert wheel.cancel(handle) is False
            model.cancel(handle)
    now = 0.0
    for step in steps:
        now += step
        assert wheel.advance(now) == model.advance(to_ns(now))
        assert len(wheel) == len(model.pending)
    assert wheel.advance(2e9) == model.advance(to_ns(2e9))
    assert len(wheel) == 0
