# cython: language_level=3, embedsignature=True, binding=False
"""`TimingWheel`: the hierarchical timing wheel, usable from Python.

A wrapper of `csrc/mqs_wheel.h` for Python objects. The C wheel stores
each timer's slab index as its payload, and the item itself sits at that
index in a Python list, so the garbage collector sees every pending item.
Times cross the boundary as int64 nanoseconds: seconds are rounded to the
nearest nanosecond and saturate at about +-292 years.
"""

import array as _array_module
import types

cimport cython
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_AsDouble
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.exc cimport PyErr_Clear
from cpython cimport array
from cpython.mem cimport (
    PyMem_Free,
    PyMem_Malloc,
    PyMem_RawFree,
    PyMem_RawMalloc,
    PyMem_RawRealloc,
)
from libc.math cimport isfinite, nearbyint
from libc.stdint cimport (
    INT64_MAX,
    INT64_MIN,
    UINT64_MAX,
    int64_t,
    uint32_t,
    uint64_t,
)
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from mqs.includes.mqs_atomic cimport MQS_EFULL, MQS_OK
from mqs.includes.mqs_wheel cimport (
    MQS_WHEEL_MAX_CAPACITY,
    MQS_WHEEL_NIL,
    mqs_wheel_add_ns,
    mqs_wheel_advance,
    mqs_wheel_cancel,
    mqs_wheel_check,
    mqs_wheel_grow,
    mqs_wheel_init,
    mqs_wheel_insert,
    mqs_wheel_next_deadline,
    mqs_wheel_next_index,
    mqs_wheel_size_bytes,
    mqs_wheel_t,
)

__all__ = ["TimingWheel"]


cdef extern from "Python.h":
    # Declared without an exception clause, because cancel() checks the
    # result itself.
    unsigned long long _PyLong_AsUnsignedLongLong \
        "PyLong_AsUnsignedLongLong" (object value)

# Payloads fetched per mqs_wheel_advance call.
cdef enum:
    FIRE_CHUNK = 256

cdef int64_t _NS_PER_S = 1_000_000_000
# Whole seconds whose nanoseconds still fit in int64.
cdef long long _MAX_WHOLE_SECONDS = 9_223_372_036


# Empty template for the handle arrays that schedule_many returns.
cdef array.array _HANDLE_ARRAY = _array_module.array("Q")


cdef inline int64_t _finite_to_ns(double seconds) noexcept:
    cdef double ns = seconds * 1e9
    if ns >= 9.223372036854775807e18:
        return INT64_MAX
    if ns <= -9.223372036854775808e18:
        return INT64_MIN
    return <int64_t>nearbyint(ns)


cdef str _argument_name(str name, Py_ssize_t index):
    return name if index < 0 else f"{name}[{index}]"


cdef double _as_seconds(object value, str name, Py_ssize_t index) except? -1.0:
    """Return value as a float via __float__ or __index__, never parsing text."""
    if not isinstance(value, (bool, str, bytes, bytearray)):
        try:
            return PyFloat_AsDouble(value)
        except OverflowError:
            # An integer too large for a float: saturate.
            return float("inf") if value > 0 else float("-inf")
        except TypeError:
            pass
    raise TypeError(
        f"{_argument_name(name, index)} must be a real number of seconds, "
        f"got {type(value).__name__} {value!r}")


cdef int64_t _to_ns(object value, str name, Py_ssize_t index) except? -1:
    """Convert finite seconds to int64 ns, rounding to nearest, saturating.

    `name` (with `index` when it is 0 or more) names the argument in errors.
    """
    cdef double seconds
    cdef long long whole
    cdef int overflow = 0
    if type(value) is float:
        seconds = PyFloat_AS_DOUBLE(value)
    elif type(value) is int:
        whole = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0 and -_MAX_WHOLE_SECONDS <= whole <= _MAX_WHOLE_SECONDS:
            return whole * _NS_PER_S
        return INT64_MAX if overflow > 0 or whole > 0 else INT64_MIN
    else:
        seconds = _as_seconds(value, name, index)
        if seconds == float("inf") and isinstance(value, int):
            return INT64_MAX
        if seconds == float("-inf") and isinstance(value, int):
            return INT64_MIN
    if not isfinite(seconds):
        raise ValueError(
            f"{_argument_name(name, index)} must be a finite number of "
            f"seconds, got {value!r}")
    return _finite_to_ns(seconds)


cdef int64_t _tick_to_ns(object tick_s) except -1:
    cdef double seconds = _as_seconds(tick_s, "tick_s", -1)
    if not seconds > 0:
        raise ValueError(
            f"tick_s must be a positive number of seconds, got {tick_s!r}")
    if not seconds <= 9.2e9:
        raise ValueError(
            f"tick_s must be at most 9.2e9 seconds, got {tick_s!r}")
    if nearbyint(seconds * 1e9) < 1:
        raise ValueError(
            f"tick_s must be at least 1e-09 (one nanosecond), got {tick_s!r}")
    return <int64_t>nearbyint(seconds * 1e9)


cdef inline object _insert_item(TimingWheel wheel, int64_t deadline_ns,
                                object item):
    """Schedule `item` at deadline_ns (wheel clock); return its handle.

    A function rather than a cdef method, so `schedule_at` (one timer per
    call) reaches it without a vtable lookup.
    """
    cdef uint64_t handle = 0
    cdef uint32_t index = mqs_wheel_next_index(wheel._wheel)
    if index == MQS_WHEEL_NIL:
        wheel._reserve(1)
        index = mqs_wheel_next_index(wheel._wheel)
    mqs_wheel_insert(wheel._wheel, deadline_ns, index, &handle)
    wheel._items[index] = item
    return handle


@cython.auto_pickle(False)
@cython.no_gc_clear
cdef class TimingWheel:
    # The first docstring lines are the text signature that
    # inspect.signature reads; tests/test_introspection.py checks them.
    """TimingWheel(tick_s=0.001, capacity=1024, *, clock=None)\n--\n
    Timers that carry Python objects and fire in due order.

    A hierarchical timing wheel: six levels of 64 slots, occupancy bitmaps,
    and timers that move down a level as their time comes (cascading).
    Scheduling and cancelling are O(1), and `advance` costs time in
    proportion to the timers it fires, never to the ticks that passed.

    Parameters
    ----------
    tick_s : float
        Width of one slot in seconds, from 1e-09 to 9.2e9. It does not
        change when timers fire (see Notes), only the cost: a coarse tick
        puts more timers in one slot to sort, a fine one cascades more
        often and sends far timers to the overflow list sooner (the levels
        span 2**36 ticks: 795 days at the default 1 ms).
    capacity : int
        Timers the wheel has room for before it grows, from 1 to
        4294967294. The wheel doubles its room when it is full.
    clock : callable, optional
        Function returning the current time in seconds, called by
        `schedule`, `schedule_many` and `advance()` without `now`. The
        default reads CLOCK_MONOTONIC, the clock `time.monotonic` reads on
        Linux. Pass a simulated clock to test without sleeping.

    Raises
    ------
    TypeError
        If an argument has the wrong type or `clock` is not callable.
    ValueError
        If `tick_s` or `capacity` is out of range.

    Notes
    -----
    Firing rule: ``advance(now)`` returns exactly the pending items whose
    deadline is at or before `now` (or the largest `now` passed so far),
    in deadline order and, for equal deadlines, in scheduling order. An
    item is never returned early, and returned at the first advance at or
    past its deadline, so a delay of 0 or below fires at the next
    `advance` (unless that call passes an explicit `now` earlier than the
    clock reading at scheduling). Deadlines are rounded to the nearest
    nanosecond. A deadline past 2**63 ns (about 292 years) saturates
    there and never fires, so a huge delay is never early.

    Memory: 40 bytes per timer the wheel has room for (a 32-byte C slab
    entry and an 8-byte item reference), plus a 4,752-byte header. Since
    the room doubles when full, that is 40 to 80 bytes per pending timer;
    create the wheel with the capacity you need to stay at 40. `nbytes`
    gives the total. The items themselves and any handles you keep are
    extra.

    Not thread-safe by itself: no method releases the GIL, so on a
    regular (GIL) build calls from several threads are serialised.
    """

    __class_getitem__ = classmethod(types.GenericAlias)

    def __cinit__(self, tick_s=0.001, capacity=1024, *, clock=None):
        cdef int64_t tick_ns = _tick_to_ns(tick_s)
        cdef int64_t start_ns
        cdef size_t size
        if not isinstance(capacity, int) or isinstance(capacity, bool):
            raise TypeError(
                f"capacity must be an int, got {type(capacity).__name__} "
                f"{capacity!r}")
        if not 1 <= capacity <= MQS_WHEEL_MAX_CAPACITY:
            raise ValueError(
                f"capacity must be from 1 to {MQS_WHEEL_MAX_CAPACITY}, got "
                f"{capacity!r}")
        if clock is not None and not callable(clock):
            raise TypeError(
                f"clock must be a callable returning monotonic seconds, or "
                f"None, got {type(clock).__name__} {clock!r}")
        self._clock = clock
        start_ns = self._now_ns()

        self._items = [None] * capacity
        size = mqs_wheel_size_bytes(capacity)
        self._wheel = <mqs_wheel_t *>PyMem_RawMalloc(size)
        if self._wheel == NULL:
            raise MemoryError(
                f"cannot allocate a timing wheel of {capacity} entries "
                f"({size} bytes)")
        if mqs_wheel_init(self._wheel, size, tick_ns, start_ns) != MQS_OK:
            raise ValueError(
                f"timing wheel rejected tick_s={tick_s!r}, "
                f"capacity={capacity!r}")

    def __dealloc__(self):
        # The item references live in self._items, which Cython releases.
        PyMem_RawFree(self._wheel)

    cdef int64_t _now_ns(self) except? -1:
        cdef timespec ts
        if self._clock is None:
            clock_gettime(CLOCK_MONOTONIC, &ts)
            return <int64_t>ts.tv_sec * _NS_PER_S + ts.tv_nsec
        return _to_ns(self._clock(), "clock() result", -1)

    cdef int _reserve(self, Py_ssize_t extra) except -1:
        """Grow the slab, if needed, so `extra` more timers fit."""
        cdef Py_ssize_t capacity = self._wheel.capacity
        cdef Py_ssize_t needed = <Py_ssize_t>self._wheel.count + extra
        cdef Py_ssize_t new_capacity
        cdef size_t size
        cdef mqs_wheel_t *grown
        if needed <= capacity:
            return 0
        if needed > MQS_WHEEL_MAX_CAPACITY:
            raise OverflowError(
                f"a timing wheel takes at most {MQS_WHEEL_MAX_CAPACITY} "
                f"pending timers, {needed} requested; advance or cancel "
                f"some first")
        new_capacity = max(needed, min(2 * capacity, MQS_WHEEL_MAX_CAPACITY))

        # The item table grows first: if the slab cannot follow, the table
        # is merely longer than the slab, which is harmless.
        if len(self._items) < new_capacity:
            self._items.extend([None] * (new_capacity - len(self._items)))
        size = mqs_wheel_size_bytes(<uint32_t>new_capacity)
        grown = <mqs_wheel_t *>PyMem_RawRealloc(self._wheel, size)
        if grown == NULL:
            raise MemoryError(
                f"cannot grow the timing wheel to {new_capacity} entries "
                f"({size} bytes)")
        # The block contains slab indexes but no pointers, so moving it is
        # safe.
        self._wheel = grown
        mqs_wheel_grow(grown, size)
        return 0

    cdef object _insert(self, int64_t deadline_ns, object item):
        return _insert_item(self, deadline_ns, item)

    @property
    def tick_s(self):
        """Slot width in seconds."""
        return self._wheel.tick_ns / 1e9

    @property
    def capacity(self):
        """Timers the wheel has room for before it grows again."""
        return self._wheel.capacity

    @property
    def nbytes(self):
        """Bytes of memory the wheel uses: its C block plus 8 per item slot."""
        return (mqs_wheel_size_bytes(self._wheel.capacity)
                + 8 * len(self._items))

    def __len__(self):
        return self._wheel.count

    def schedule(self, delay_s, item):
        """Schedule `item` to fire `delay_s` seconds from now; return a handle.

        Parameters
        ----------
        delay_s : float
            Seconds from the clock's current reading. 0 or below fires at
            the next `advance`; a huge delay saturates, never firing early.
        item : object
            Returned by the `advance` call that fires it.

        Returns
        -------
        int
            Handle for `cancel`, unique among pending timers. A handle of a
            timer that fired or was cancelled can match a later timer only
            after its slab entry has been reused 2**32 - 1 times.

        Raises
        ------
        TypeError
            If `delay_s` is not a real number.
        ValueError
            If `delay_s` is NaN or infinite.
        """
        cdef int64_t delay_ns = _to_ns(delay_s, "delay_s", -1)
        return self._insert(mqs_wheel_add_ns(self._now_ns(), delay_ns), item)

    def schedule_at(self, deadline_s, item):
        """Schedule `item` to fire at `deadline_s`; return a handle.

        `deadline_s` is in seconds on the wheel's clock (the
        `time.monotonic` clock by default); a deadline already passed fires
        at the next `advance`. Raises like `schedule`.
        """
        cdef int64_t deadline_ns
        # A finite float skips the checks and the call of _to_ns.
        if type(deadline_s) is float and isfinite(PyFloat_AS_DOUBLE(deadline_s)):
            deadline_ns = _finite_to_ns(PyFloat_AS_DOUBLE(deadline_s))
        else:
            deadline_ns = _to_ns(deadline_s, "deadline_s", -1)
        return _insert_item(self, deadline_ns, item)

    def schedule_many(self, delays_s, items):
        """Schedule items[i] to fire delays_s[i] seconds from now.

        All delays count from one clock reading. The batch is all or
        nothing: a bad delay raises before any item is scheduled.

        Returns
        -------
        array.array
            The handles, typecode ``'Q'``, in the order of `items`: an
            array rather than a list of ints, which would cost as much to
            build as the scheduling itself. Indexing it gives an int that
            `cancel` accepts.

        Raises
        ------
        ValueError
            If the lengths differ, or a delay is NaN or infinite (the
            message names its index).
        TypeError
            If a delay is not a real number.
        """
        cdef list delays = delays_s if type(delays_s) is list else list(delays_s)
        cdef list values = items if type(items) is list else list(items)
        cdef Py_ssize_t n = len(delays)
        cdef Py_ssize_t i
        cdef int64_t *deadlines
        cdef int64_t now_ns
        cdef uint64_t handle = 0
        cdef uint32_t index
        cdef object delay
        cdef array.array handles
        if len(values) != n:
            raise ValueError(
                f"delays_s and items must have the same length, got {n} "
                f"delays and {len(values)} items")
        if n == 0:
            return array.clone(_HANDLE_ARRAY, 0, False)

        deadlines = <int64_t *>PyMem_Malloc(n * sizeof(int64_t))
        if deadlines == NULL:
            raise MemoryError(f"cannot allocate room for {n} deadlines")
        try:
            # Convert every delay first: this may run Python code
            # (__float__), which must not see a half-inserted batch.
            for i in range(n):
                delay = delays[i]
                if type(delay) is float and isfinite(PyFloat_AS_DOUBLE(delay)):
                    deadlines[i] = _finite_to_ns(PyFloat_AS_DOUBLE(delay))
                else:
                    deadlines[i] = _to_ns(delay, "delays_s", i)
            if len(values) != n:
                raise ValueError(
                    f"items changed length while delays_s was read, from "
                    f"{n} to {len(values)}; pass a list nothing else changes")
            now_ns = self._now_ns()
            self._reserve(n)

            handles = array.clone(_HANDLE_ARRAY, n, False)
            for i in range(n):
                index = mqs_wheel_next_index(self._wheel)
                mqs_wheel_insert(self._wheel,
                                 mqs_wheel_add_ns(now_ns, deadlines[i]),
                                 index, &handle)
                self._items[index] = values[i]
                handles.data.as_ulonglongs[i] = handle
        finally:
            PyMem_Free(deadlines)
        return handles

    @cython.always_allow_keywords(False)
    def cancel(self, handle):
        """Cancel a pending timer; return True if it was pending.

        A handle whose timer already fired or was cancelled returns False
        and never touches a later timer, so a double cancel is harmless.

        Raises
        ------
        TypeError
            If `handle` is not an int.
        """
        cdef uint64_t native_handle
        cdef uint64_t index = 0
        if type(handle) is not int:
            if not isinstance(handle, int) or isinstance(handle, bool):
                raise TypeError(
                    f"handle must be an int returned by schedule(), got "
                    f"{type(handle).__name__} {handle!r}")
        native_handle = _PyLong_AsUnsignedLongLong(handle)
        # UINT64_MAX is never a handle (its index is past any slab), so it
        # also marks a negative or too wide int, for which the call raised
        # OverflowError.
        if native_handle == UINT64_MAX:
            PyErr_Clear()
            return False
        if mqs_wheel_cancel(self._wheel, native_handle, &index) != MQS_OK:
            return False
        self._items[index] = None
        return True

    def advance(self, now=None):
        """Fire the timers due at `now` and return their items in due order.

        Parameters
        ----------
        now : float, optional
            Current time in seconds on the wheel's clock; None reads the
            clock. A `now` below an earlier one counts as the earlier one.

        Returns
        -------
        list
            The items whose deadline is at or before `now`, earliest first;
            items with equal deadlines in scheduling order. Empty when
            nothing is due.

        Raises
        ------
        TypeError, ValueError
            If `now` is not a finite real number.
        """
        cdef int64_t now_ns
        if now is None:
            now_ns = self._now_ns()
        else:
            now_ns = _to_ns(now, "now", -1)
        return self._advance_ns(now_ns)

    cdef list _advance_ns(self, int64_t now_ns):
        """Fire what is due at now_ns (wheel clock) and return the items."""
        cdef uint64_t fired[FIRE_CHUNK]
        cdef size_t n = 0
        cdef size_t i
        cdef int rc = MQS_EFULL
        cdef list out = []
        cdef list items = self._items
        cdef object item
        # INT64_MAX is every deadline past 2**63 ns, so it must never be
        # due: a saturated now would fire a saturated deadline early.
        if now_ns == INT64_MAX:
            now_ns = INT64_MAX - 1
        while rc == MQS_EFULL:
            rc = mqs_wheel_advance(self._wheel, now_ns, fired, FIRE_CHUNK, &n)
            for i in range(n):
                item = items[fired[i]]
                out.append(item)
                items[fired[i]] = None
        return out

    cdef int64_t _next_deadline_ns(self) noexcept:
        """Earliest deadline in ns (a lower bound), or INT64_MAX if none."""
        cdef int64_t deadline_ns
        if mqs_wheel_next_deadline(self._wheel, &deadline_ns) != MQS_OK:
            return INT64_MAX
        return deadline_ns

    def next_deadline(self):
        """Return a time at or before the earliest deadline, or None.

        In seconds on the wheel's clock. It is exact unless the timer with
        the earliest deadline in its slot was cancelled, in which case an
        `advance` at that time may return nothing; call again after it.
        Returns None when no timer is pending.
        """
        cdef int64_t deadline_ns
        if mqs_wheel_next_deadline(self._wheel, &deadline_ns) != MQS_OK:
            return None
        return deadline_ns / 1e9

    def _check(self):
        """Return whether the native wheel passes its invariant check."""
        return mqs_wheel_check(self._wheel) == MQS_OK

    def __repr__(self):
        return (f"<mqs.TimingWheel pending={self._wheel.count} "
                f"tick_s={self.tick_s!r} capacity={self._wheel.capacity}>")
