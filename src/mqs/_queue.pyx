# cython: language_level=3, embedsignature=True, binding=False
"""In-process queues on the native ring: `Queue` and `SimpleQueue`.

Items live in a chain of ring segments (`csrc/mqs_ring.h`), each a
power-of-two array of object pointers. The GIL serialises every put and
get, so the chain drives each segment as a ring with one producer and one
broadcast consumer: a put is a claim, a pointer store and a release store;
a get is an acquire load, a pointer load and a release store. No lock is
taken anywhere, which is why a put from a signal handler or a ``__del__``
that runs in the middle of another put or get cannot deadlock.

Blocking waits park on futex event words (`csrc/mqs_wait.h`) with the GIL
released, in slices of at most 50 ms so Ctrl-C gets through.
"""

cimport cython
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport INT64_MAX, int64_t, uint32_t
from libc.stdlib cimport free, malloc

from mqs._waiting cimport STRATEGY_BLOCK, STRATEGY_SLEEP, deadline_ns, park
from mqs._wheel cimport TimingWheel
from mqs.includes.mqs_atomic cimport MQS_OK
from mqs.includes.mqs_ring cimport (
    mqs_ring_add_consumer,
    mqs_ring_consumer_poll,
    mqs_ring_consumer_release,
    mqs_ring_create,
    mqs_ring_free,
    mqs_ring_reset,
    mqs_ring_publish,
    mqs_ring_slot,
    mqs_ring_sp_push,
    mqs_ring_t,
    mqs_ring_try_claim,
)
from mqs.includes.mqs_wait cimport (
    mqs_monotonic_ns,
    mqs_wait_finish,
    mqs_wait_init,
    mqs_wait_prepare,
    mqs_waitword_t,
    mqs_wait_signal_locked,
)

import datetime
import math
import numbers
import time
import types
import weakref

from mqs import _aio
from mqs import metrics as _metrics
from mqs._limits import check_max_delay
from mqs.errors import Empty, Full, ShutDown

__all__ = ["Queue", "SimpleQueue"]

# Smallest and largest segment, in slots. Segments double from the first
# size up to the largest; a bounded queue starts at its maxsize.
DEF MIN_SEGMENT = 16
DEF UNBOUNDED_FIRST_SEGMENT = 1024
DEF MAX_SEGMENT = 65536
# Drained segments kept for reuse. A producer that runs ahead of its
# consumer for a whole GIL switch interval (5 ms) fills a few of the
# largest segments; keeping them spares the allocator and page faults
# on every such burst.
DEF MAX_SPARES = 4


cdef struct segment_t:
    mqs_ring_t *ring
    segment_t *next


cdef struct chain_t:
    segment_t *head      # the consumer reads here
    segment_t *tail      # the producer writes here
    segment_t *spare     # drained segments kept to avoid malloc churn
    int n_spares
    int64_t count        # items in the chain
    int64_t pushed       # items pushed ever; items popped = pushed - count
    int64_t next_slots   # size of the next segment to allocate


cdef inline int64_t _round_up_pow2(int64_t n) nogil:
    cdef int64_t size = MIN_SEGMENT
    while size < n and size < MAX_SEGMENT:
        size <<= 1
    return size


cdef segment_t *_segment_new(int64_t slots) noexcept nogil:
    cdef segment_t *seg = <segment_t *>malloc(sizeof(segment_t))
    if seg == NULL:
        return NULL
    seg.next = NULL
    if mqs_ring_create(&seg.ring, slots, 0, 1, 0) != MQS_OK:
        free(seg)
        return NULL
    mqs_ring_add_consumer(seg.ring)
    return seg


cdef void _segment_free(segment_t *seg) noexcept nogil:
    mqs_ring_free(seg.ring)
    free(seg)


cdef int _chain_init(chain_t *chain, int64_t first_slots) except -1:
    cdef segment_t *seg = _segment_new(_round_up_pow2(first_slots))
    if seg == NULL:
        raise MemoryError("cannot allocate the first queue segment")
    chain.head = seg
    chain.tail = seg
    chain.spare = NULL
    chain.n_spares = 0
    chain.count = 0
    chain.pushed = 0
    chain.next_slots = seg.ring.capacity * 2
    if chain.next_slots > MAX_SEGMENT:
        chain.next_slots = MAX_SEGMENT
    return 0


cdef int _chain_grow(chain_t *chain) except -1:
    """Link a fresh segment after the full tail."""
    cdef segment_t *seg = chain.spare
    if seg != NULL:
        chain.spare = seg.next
        chain.n_spares -= 1
        seg.next = NULL
    else:
        seg = _segment_new(chain.next_slots)
        if seg == NULL:
            raise MemoryError(
                f"cannot allocate a queue segment of {chain.next_slots} slots")
        if chain.next_slots < MAX_SEGMENT:
            chain.next_slots *= 2
    chain.tail.next = seg
    chain.tail = seg
    return 0


cdef inline int _chain_push(chain_t *chain, PyObject *item) except -1:
    # The reference is taken after the push, so a MemoryError from the
    # grow leaks nothing; under the GIL no reader runs in between.
    if mqs_ring_sp_push(chain.tail.ring, <void *>item) != MQS_OK:
        _chain_grow(chain)
        mqs_ring_sp_push(chain.tail.ring, <void *>item)
    Py_INCREF(<object>item)
    chain.count += 1
    chain.pushed += 1
    return 0


cdef int _chain_push_many(chain_t *chain, list items, Py_ssize_t start,
                          Py_ssize_t stop) except -1:
    """Push items[start:stop], claiming one range per segment."""
    cdef int64_t lo = 0
    cdef int64_t n, i
    cdef mqs_ring_t *ring
    cdef PyObject *item
    while start < stop:
        ring = chain.tail.ring
        n = stop - start
        if n > ring.capacity:
            n = ring.capacity
        # Halve the claim until it fits in what the tail has left.
        while n > 0 and mqs_ring_try_claim(ring, n, &lo) != MQS_OK:
            n >>= 1
        if n == 0:
            _chain_grow(chain)
            continue
        for i in range(n):
            item = <PyObject *>items[start + i]
            Py_INCREF(<object>item)
            mqs_ring_slot(ring, lo + i)[0] = <void *>item
        mqs_ring_publish(ring, lo, lo + n)
        chain.count += n
        chain.pushed += n
        start += n
    return 0


cdef inline PyObject *_chain_pop(chain_t *chain) noexcept:
    """Take the oldest item, returning a new reference, or NULL if empty."""
    cdef int64_t lo, hi
    cdef void **slot
    cdef PyObject *item
    cdef segment_t *seg = chain.head
    while True:
        if mqs_ring_consumer_poll(seg.ring, 0, 1, &lo, &hi) == MQS_OK:
            slot = mqs_ring_slot(seg.ring, lo)
            item = <PyObject *>slot[0]
            slot[0] = NULL
            mqs_ring_consumer_release(seg.ring, 0, hi)
            chain.count -= 1
            return item
        if seg == chain.tail:
            return NULL
        # The producer only moves to the next segment once this one is
        # full, and both sides run under the GIL, so an empty head that is
        # not the tail is drained for good.
        chain.head = seg.next
        _chain_recycle(chain, seg)
        seg = chain.head


cdef int64_t _chain_pop_many(chain_t *chain, list out,
                             int64_t max_items) except -1:
    """Append up to max_items items to out; return how many."""
    cdef int64_t lo, hi, s, taken = 0
    cdef void **slot
    cdef segment_t *seg = chain.head
    while taken < max_items:
        if mqs_ring_consumer_poll(seg.ring, 0, max_items - taken,
                                  &lo, &hi) == MQS_OK:
            for s in range(lo, hi):
                slot = mqs_ring_slot(seg.ring, s)
                # The list takes over the queue's reference.
                out.append(<object>slot[0])
                Py_DECREF(<object>slot[0])
                slot[0] = NULL
            mqs_ring_consumer_release(seg.ring, 0, hi)
            chain.count -= hi - lo
            taken += hi - lo
            continue
        if seg == chain.tail:
            break
        chain.head = seg.next
        _chain_recycle(chain, seg)
        seg = chain.head
    return taken


cdef inline void _chain_recycle(chain_t *chain, segment_t *seg) noexcept:
    if chain.n_spares < MAX_SPARES:
        # Drained and unreachable by any producer: rewind it for reuse.
        mqs_ring_reset(seg.ring)
        seg.next = chain.spare
        chain.spare = seg
        chain.n_spares += 1
    else:
        _segment_free(seg)


cdef void _chain_clear(chain_t *chain) noexcept:
    """Drop every item and free every segment (used by dealloc)."""
    cdef PyObject *item
    cdef segment_t *seg
    cdef segment_t *nxt
    if chain.head == NULL:
        return
    item = _chain_pop(chain)
    while item != NULL:
        Py_DECREF(<object>item)
        item = _chain_pop(chain)
    seg = chain.head
    while seg != NULL:
        nxt = seg.next
        _segment_free(seg)
        seg = nxt
    seg = chain.spare
    while seg != NULL:
        nxt = seg.next
        _segment_free(seg)
        seg = nxt
    chain.head = NULL
    chain.tail = NULL
    chain.spare = NULL


cdef inline int _check_timeout(bint block, object timeout) except -1:
    """Reject a bad timeout even when the call need not wait.

    `queue.Queue.get`, `queue.SimpleQueue.get` and a bounded
    `queue.Queue.put` check the timeout before they look at the queue, so
    a bad timeout raises even when an item or a free slot is at hand.
    """
    if block and timeout is not None:
        deadline_ns(timeout)
    return 0


cdef int64_t _check_max_items(object max_items) except -1:
    if not isinstance(max_items, int) or isinstance(max_items, bool):
        raise TypeError(
            f"max_items must be an int, got {type(max_items).__name__} "
            f"{max_items!r}")
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1, got {max_items!r}")
    if max_items > INT64_MAX:
        raise ValueError(
            f"max_items must be at most 2**63 - 1, got {max_items!r}")
    return max_items


# ---- metrics -------------------------------------------------------------
#
# Counters cost nothing extra: items got ever is chain.pushed - chain.count.
# Latency sampling costs one compare per put and per get. A put stamps the
# sampled sequences among its items in a small C ring, with no Python code,
# so nothing can run between a bounded queue's room check and its push,
# and a put from a signal handler stays lock-free. A get that passes a
# stamped sequence turns it into a latency for the sampler's histogram.

# Stamped puts whose get has not happened yet. While a consumer is this
# many samples behind, new puts are not sampled.
DEF MAX_PENDING_SAMPLES = 64

cdef struct sampling_t:
    int64_t every          # sample one sequence in `every`; 0 while off
    int64_t put_next       # next sequence to stamp; INT64_MAX while off
    int64_t get_next       # gets past this many items record latencies
    int64_t head           # pending stamps are [head, tail) of the ring
    int64_t tail
    bint recording         # a get is handing latencies to the sampler
    int64_t pending_sequence[MAX_PENDING_SAMPLES]
    int64_t pending_ns[MAX_PENDING_SAMPLES]


# Every live in-process queue, for the metrics registry.
_live = weakref.WeakSet()


def _live_queues():
    """Return the live `Queue` and `SimpleQueue` objects of the process."""
    return list(_live)


cdef int _sampling_off(sampling_t *sampling) except -1:
    sampling.every = 0
    sampling.put_next = INT64_MAX
    sampling.get_next = INT64_MAX
    sampling.head = sampling.tail
    return 0


cdef object _sampling_on(sampling_t *sampling, chain_t *chain,
                         object sample_every):
    """Return a new sampler; later puts and gets feed it."""
    sampler = _metrics.LatencySampler(sample_every)
    sampling.every = sample_every
    sampling.head = sampling.tail
    sampling.put_next = _round_up(chain.pushed, sampling.every)
    sampling.get_next = sampling.put_next
    return sampler


cdef inline int64_t _round_up(int64_t value, int64_t step) noexcept:
    return (value + step - 1) // step * step


cdef inline void _stamp_puts(sampling_t *sampling, chain_t *chain,
                             int64_t n) noexcept:
    """Stamp the sampled sequences among the n items about to be pushed."""
    cdef int64_t end = chain.pushed + n
    cdef int64_t now, index
    if end <= sampling.put_next:
        return
    now = mqs_monotonic_ns()
    while sampling.put_next < end \
            and sampling.tail - sampling.head < MAX_PENDING_SAMPLES:
        index = sampling.tail % MAX_PENDING_SAMPLES
        sampling.pending_sequence[index] = sampling.put_next
        sampling.pending_ns[index] = now
        sampling.tail += 1
        sampling.put_next += sampling.every
    if sampling.put_next < end:
        sampling.put_next = _round_up(end, sampling.every)


cdef inline void _drop_stamps(sampling_t *sampling) noexcept:
    """Forget the stamps of items dropped without a get."""
    sampling.head = sampling.tail
    sampling.get_next = sampling.put_next


cdef inline int _after_pop(sampling_t *sampling, chain_t *chain,
                           object sampler) except -1:
    if chain.pushed - chain.count > sampling.get_next:
        _record_gets(sampling, chain.pushed - chain.count, sampler)
    return 0


cdef int _record_gets(sampling_t *sampling, int64_t got,
                      object sampler) except -1:
    """Hand the latencies of the stamped sequences below `got` to the
    sampler. Runs after the get has updated the queue, because the
    sampler's Python code may let another thread run."""
    cdef int64_t now = mqs_monotonic_ns()
    cdef int64_t index
    cdef list latencies = []
    if sampling.recording:
        return 0
    while sampling.head < sampling.tail:
        index = sampling.head % MAX_PENDING_SAMPLES
        if sampling.pending_sequence[index] >= got:
            break
        latencies.append(now - sampling.pending_ns[index])
        sampling.head += 1
    if sampling.head < sampling.tail:
        index = sampling.head % MAX_PENDING_SAMPLES
        sampling.get_next = sampling.pending_sequence[index]
    else:
        sampling.get_next = sampling.put_next
    sampling.recording = True
    try:
        sampler.record_many(latencies)
    finally:
        sampling.recording = False
    return 0


cdef object _latency_summary(object sampler):
    return None if sampler is None else sampler.summary()


# Wall-clock time minus monotonic time, in ns, as last measured.
cdef int64_t _wall_offset_ns = 0


cdef int64_t _wall_offset():
    """Return wall-clock ns minus monotonic ns, never above the truth.

    The monotonic clock is read after the wall clock, so the offset is
    low by the time between the two reads and a deadline made from it is
    late by that time, never early. The pair is read again (up to five
    times) while the reads were more than 20 us apart, as happens when
    the thread is preempted between them. The offset is kept unless it
    moved by more than a millisecond (a real clock step), so equal `at`
    times map to equal deadlines and keep their put order.
    """
    global _wall_offset_ns
    cdef int64_t before, wall, after, offset = 0
    cdef int64_t gap = INT64_MAX
    cdef int attempt
    for attempt in range(5):
        before = mqs_monotonic_ns()
        wall = time.time_ns()
        after = mqs_monotonic_ns()
        if after - before < gap:
            gap = after - before
            offset = wall - after
        if gap <= 20000:
            break
    if offset - _wall_offset_ns > 1000000 or _wall_offset_ns - offset > 1000000:
        _wall_offset_ns = offset
    return _wall_offset_ns


cdef int64_t _due_ns(object delay, object at) except? -1:
    """Monotonic deadline in ns for put(delay=...) or put(at=...)."""
    cdef double seconds
    cdef int64_t now = mqs_monotonic_ns()
    cdef int64_t due
    if delay is not None and at is not None:
        raise ValueError(
            f"pass delay or at, not both (got delay={delay!r}, at={at!r})")
    if delay is not None:
        if isinstance(delay, bool) or not isinstance(delay, numbers.Real):
            raise TypeError(
                f"delay must be a number of seconds, got "
                f"{type(delay).__name__} {delay!r}")
        seconds = float(delay)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(
                f"delay must be a finite number of seconds >= 0, got "
                f"{delay!r}")
        check_max_delay("delay", seconds, delay)
        return now + <int64_t>(seconds * 1e9)

    if isinstance(at, datetime.datetime):
        seconds = at.timestamp()
    elif isinstance(at, numbers.Real) and not isinstance(at, bool):
        seconds = float(at)
        if not math.isfinite(seconds):
            raise ValueError(
                f"at must be a finite epoch time in seconds, got {at!r}")
    else:
        raise TypeError(
            f"at must be a datetime or epoch seconds, got "
            f"{type(at).__name__} {at!r}")
    check_max_delay("at", seconds - time.time(), at)
    if seconds <= 0:
        return now
    # Converted once, here: later wall-clock steps do not move it.
    due = <int64_t>(seconds * 1e9) - _wall_offset()
    return due if due > now else now


def due_monotonic_ns(delay=None, at=None):
    """Return the CLOCK_MONOTONIC deadline in ns of ``put(delay=, at=)``.

    For the other queue modules, so that every queue checks and converts
    `delay` and `at` alike (same rules and messages as `Queue.put`).
    """
    return _due_ns(delay, at)


cdef object _get_waiting(chain_t *chain, mqs_waitword_t *not_empty,
                         mqs_waitword_t *not_full, bint *shutdown,
                         Queue delays, bint block, object timeout):
    """Run the slow path of `get` for Queue and SimpleQueue.

    Waits on `not_empty` until an item arrives, the queue is shut down
    and empty, or the deadline passes. `not_full` (NULL for SimpleQueue)
    is signalled after a take. `delays` is the Queue whose due delayed
    items are moved into the ring first, and whose next deadline wakes
    the wait early (None for SimpleQueue).
    """
    cdef int64_t deadline = deadline_ns(timeout) if block else 0
    cdef int64_t wake
    cdef uint32_t epoch
    cdef int strategy = STRATEGY_BLOCK
    cdef PyObject *item
    cdef object result
    while True:
        epoch = mqs_wait_prepare(not_empty)
        if delays is not None:
            try:
                delays._promote_due()
            except BaseException:
                mqs_wait_finish(not_empty)
                raise
        item = _chain_pop(chain)
        if item != NULL:
            mqs_wait_finish(not_empty)
            if not_full != NULL:
                mqs_wait_signal_locked(not_full, 0)
            result = <object>item
            Py_DECREF(result)
            return result
        if shutdown[0] and (delays is None or not delays._delayed):
            mqs_wait_finish(not_empty)
            raise ShutDown("get on a shut-down and empty queue")
        if not block:
            mqs_wait_finish(not_empty)
            raise Empty()
        # Wake for the caller's deadline or the next delayed item,
        # whichever comes first.
        wake = deadline
        if delays is not None and delays._delayed and (
                wake < 0 or delays._next_due_ns < wake):
            wake = delays._next_due_ns
        if park(not_empty, epoch, wake, 0, strategy) and wake == deadline:
            raise Empty()
        strategy = STRATEGY_SLEEP


cdef list _get_many(chain_t *chain, mqs_waitword_t *not_empty,
                    mqs_waitword_t *not_full, bint *shutdown, Queue delays,
                    object max_items, bint block, object timeout):
    """Run `get_many` for Queue and SimpleQueue (arguments as _get_waiting)."""
    cdef int64_t limit = _check_max_items(max_items)
    cdef list out = []
    _check_timeout(block, timeout)
    if delays is not None and delays._delayed:
        delays._promote_due()
    if not _chain_pop_many(chain, out, limit):
        out.append(_get_waiting(chain, not_empty, not_full, shutdown, delays,
                                block, timeout))
        if limit > 1:
            _chain_pop_many(chain, out, limit - 1)
    if not_full != NULL:
        mqs_wait_signal_locked(not_full, 0)
    return out


@cython.auto_pickle(False)
cdef class SimpleQueue:
    # The first docstring lines are the text signature that
    # inspect.signature reads; tests/test_introspection.py checks them.
    """SimpleQueue()\n--\n
    Unbounded FIFO queue, a drop-in for `queue.SimpleQueue`.

    Same methods, blocking rules and exceptions as the standard library
    class, plus `put_many`, `get_many`, `shutdown` and iteration. Items
    are held by one pointer-sized slot each in ring segments of up to
    65,536 slots; a got item is released by the queue at once.

    Notes
    -----
    `put` never blocks and takes no lock, so it is safe to call from a
    signal handler or a ``__del__`` method.
    """

    cdef chain_t _chain
    cdef mqs_waitword_t _not_empty
    cdef bint _shutdown
    cdef sampling_t _sampling
    cdef object _sampler
    cdef int64_t _dropped_shutdown
    cdef object __weakref__

    __class_getitem__ = classmethod(types.GenericAlias)

    def __cinit__(self, *args, **kwargs):
        mqs_wait_init(&self._not_empty)
        _chain_init(&self._chain, UNBOUNDED_FIRST_SEGMENT)
        _sampling_off(&self._sampling)
        sample_every = _metrics.default_sample_every()
        if sample_every is not None:
            self._sampler = _sampling_on(&self._sampling, &self._chain,
                                         sample_every)
        _live.add(self)

    def __init__(self):
        pass

    def __dealloc__(self):
        _chain_clear(&self._chain)

    def put(self, item, block=True, timeout=None):
        """Put item into the queue; never blocks.

        `block` and `timeout` are accepted for compatibility with
        `queue.Queue.put` and ignored, as in `queue.SimpleQueue`.

        Raises
        ------
        ShutDown
            If `shutdown` was called.
        """
        if self._shutdown:
            raise ShutDown("put on a shut-down queue")
        _stamp_puts(&self._sampling, &self._chain, 1)
        _chain_push(&self._chain, <PyObject *>item)
        mqs_wait_signal_locked(&self._not_empty, 0)

    def put_nowait(self, item):
        """Put item into the queue; same as ``put(item)``."""
        if self._shutdown:
            raise ShutDown("put on a shut-down queue")
        _stamp_puts(&self._sampling, &self._chain, 1)
        _chain_push(&self._chain, <PyObject *>item)
        mqs_wait_signal_locked(&self._not_empty, 0)

    def put_many(self, items, block=True, timeout=None):
        """Put every item of the iterable `items`, in order, in one call.

        Raises
        ------
        ShutDown
            If `shutdown` was called; no item of the batch is added.
        """
        cdef list batch = items if type(items) is list else list(items)
        if self._shutdown:
            raise ShutDown("put_many on a shut-down queue")
        _stamp_puts(&self._sampling, &self._chain, len(batch))
        _chain_push_many(&self._chain, batch, 0, len(batch))
        mqs_wait_signal_locked(&self._not_empty, 0)

    def get(self, bint block=True, timeout=None):
        """Remove and return the oldest item.

        With `block` true (the default) wait until an item arrives, for at
        most `timeout` seconds if it is not None. The wait never ends
        before `timeout`, releases the GIL, and lets Ctrl-C through.

        Raises
        ------
        Empty
            When no item arrived (at once if `block` is false).
        ShutDown
            When the queue is shut down and empty.
        ValueError
            If `timeout` is negative.
        """
        cdef PyObject *item
        cdef object result
        _check_timeout(block, timeout)
        item = _chain_pop(&self._chain)
        if item != NULL:
            _after_pop(&self._sampling, &self._chain, self._sampler)
            result = <object>item
            Py_DECREF(result)
            return result
        return self._get_slow(block, timeout)

    def get_nowait(self):
        """Remove and return the oldest item, or raise `Empty` at once."""
        cdef PyObject *item = _chain_pop(&self._chain)
        cdef object result
        if item != NULL:
            _after_pop(&self._sampling, &self._chain, self._sampler)
            result = <object>item
            Py_DECREF(result)
            return result
        return self._get_slow(False, None)

    def get_async(self, timeout=None):
        """Return a coroutine that gets the oldest item without blocking
        the event loop.

        The coroutine retries `get_nowait` after sleeps of 0.5 ms growing
        to 5 ms, so it sees a new item at most about 5 ms late. It raises
        `Empty` after `timeout` seconds (None: no limit), never earlier,
        and any other error of `get_nowait` at once. Cancelling it takes
        nothing.
        """
        return _aio.get_async(self, timeout)

    cdef object _get_slow(self, bint block, object timeout):
        result = _get_waiting(&self._chain, &self._not_empty, NULL,
                              &self._shutdown, None, block, timeout)
        _after_pop(&self._sampling, &self._chain, self._sampler)
        return result

    def get_many(self, max_items, bint block=True, timeout=None):
        """Remove and return a list of 1 to `max_items` oldest items.

        Waits like `get` until at least one item is there, then takes what
        is queued, up to `max_items`, without waiting for more.

        Raises
        ------
        Empty, ShutDown, ValueError
            As `get`; also ValueError if `max_items` is below 1.
        TypeError
            If `max_items` is not an int.
        """
        result = _get_many(&self._chain, &self._not_empty, NULL,
                           &self._shutdown, None, max_items, block, timeout)
        _after_pop(&self._sampling, &self._chain, self._sampler)
        return result

    def empty(self):
        """Return True if the queue is empty."""
        return self._chain.count == 0

    def qsize(self):
        """Return the exact number of items in the queue."""
        return self._chain.count

    def shutdown(self, bint immediate=False):
        """Shut the queue down, as `queue.Queue.shutdown` of Python 3.13.

        Later puts raise `ShutDown`; gets drain what is queued, then raise
        `ShutDown`. Blocked getters wake up. With `immediate` true the
        queued items are dropped at once.
        """
        cdef list dropped = []
        self._shutdown = True
        if immediate:
            self._dropped_shutdown += _chain_pop_many(
                &self._chain, dropped, self._chain.count + 1)
            _drop_stamps(&self._sampling)
        mqs_wait_signal_locked(&self._not_empty, 0)
        # `dropped` is released here, after the queue state is final, so
        # a __del__ that touches the queue sees it shut down and empty.

    @property
    def is_shutdown(self):
        """True once `shutdown` has been called."""
        return self._shutdown

    def __iter__(self):
        return self

    def __next__(self):
        """Return the next item, blocking; stop once shut down and empty."""
        try:
            return self.get()
        except ShutDown:
            raise StopIteration from None

    def set_latency_sampling(self, sample_every):
        """Sample the latency of one message in `sample_every`.

        Each sampled message is timestamped when put and when got; the
        percentiles appear in ``stats().latency``. None turns sampling
        off and drops the collected samples. New queues sample at the
        rate of `mqs.metrics.set_default_sample_every` (one in 1,024
        unless changed).

        Raises
        ------
        ValueError
            If `sample_every` is below 1.
        """
        if sample_every is None:
            _sampling_off(&self._sampling)
            self._sampler = None
        else:
            self._sampler = _sampling_on(&self._sampling, &self._chain,
                                         sample_every)

    def stats(self):
        """Return a `mqs.metrics.QueueStats` snapshot of the counters."""
        cdef int64_t dequeued = (self._chain.pushed - self._chain.count
                                 - self._dropped_shutdown)
        return _metrics.QueueStats(
            kind="SimpleQueue", depth=self._chain.count, delayed=0,
            maxsize=0, enqueued=self._chain.pushed, dequeued=dequeued,
            unfinished_tasks=None,
            dropped=types.MappingProxyType(
                {"shutdown": self._dropped_shutdown}),
            latency=_latency_summary(self._sampler))

    def __repr__(self):
        return f"<mqs.SimpleQueue qsize={self._chain.count}>"


@cython.auto_pickle(False)
cdef class Queue:
    # The first docstring lines are the text signature that
    # inspect.signature reads; tests/test_introspection.py checks them.
    """Queue(maxsize=0)\n--\n
    FIFO queue, a drop-in for `queue.Queue`.

    Parameters
    ----------
    maxsize : int
        Upper bound on queued items; 0 or less means unbounded, as in
        `queue.Queue`. Can be changed on a live queue through the
        `maxsize` attribute; waiting producers re-check at once.

    Notes
    -----
    Same methods, blocking rules and exceptions (`queue.Empty`,
    `queue.Full`, and `ShutDown` from `shutdown`) as the standard library
    class, plus `put_many`, `get_many` and iteration. Memory: one
    pointer-sized (8-byte) slot per queued item in power-of-two ring
    segments of up to 65,536 slots, plus about 1 KiB per segment for its
    padded header; a queue bounded at N items starts with one segment of
    N slots rounded up to a power of two. `put` takes no lock, so
    `put_nowait`, and `put` on an unbounded queue, are safe in a signal
    handler or a ``__del__`` method. Subclass hooks of `queue.Queue`
    (``_put``, ``_get``, ``mutex``, the ``queue`` deque) do not exist.
    """

    cdef chain_t _chain
    cdef mqs_waitword_t _not_empty
    cdef mqs_waitword_t _not_full
    cdef mqs_waitword_t _all_done
    cdef int64_t _maxsize
    # `maxsize` as given: queue.Queue reads a bound of 0 or less back
    # unchanged, while `_maxsize` stores 0 for it.
    cdef object _maxsize_given
    cdef int64_t _unfinished
    cdef bint _shutdown
    # Delayed items wait in a timing wheel, created on the first delayed
    # put; whoever calls get (or qsize, empty, full) moves due ones into
    # the ring, so no timer thread is needed.
    cdef TimingWheel _wheel
    cdef int64_t _delayed
    cdef int64_t _next_due_ns
    # Counters not derived from the chain: delayed items put ever, those
    # moved into the chain when due, and ready items dropped by shutdown.
    cdef int64_t _delayed_puts
    cdef int64_t _promoted
    cdef int64_t _dropped_ready
    cdef int64_t _dropped_delayed
    cdef sampling_t _sampling
    cdef object _sampler
    cdef object __weakref__

    __class_getitem__ = classmethod(types.GenericAlias)

    def __cinit__(self, maxsize=0, *args, **kwargs):
        cdef int64_t first
        mqs_wait_init(&self._not_empty)
        mqs_wait_init(&self._not_full)
        mqs_wait_init(&self._all_done)
        self._next_due_ns = INT64_MAX
        self._set_maxsize(maxsize)
        first = self._maxsize if self._maxsize > 0 else UNBOUNDED_FIRST_SEGMENT
        _chain_init(&self._chain, first)
        _sampling_off(&self._sampling)
        sample_every = _metrics.default_sample_every()
        if sample_every is not None:
            self._sampler = _sampling_on(&self._sampling, &self._chain,
                                         sample_every)
        _live.add(self)

    def __init__(self, maxsize=0):
        pass

    def __dealloc__(self):
        _chain_clear(&self._chain)

    cdef int _set_maxsize(self, object maxsize) except -1:
        if not isinstance(maxsize, int) or isinstance(maxsize, bool):
            raise TypeError(
                f"maxsize must be an int (0 or less for unbounded), got "
                f"{type(maxsize).__name__} {maxsize!r}")
        if maxsize > INT64_MAX:
            raise ValueError(
                f"maxsize must be at most 2**63 - 1, got {maxsize!r}; pass 0 "
                f"for an unbounded queue")
        self._maxsize = maxsize if maxsize > 0 else 0
        self._maxsize_given = maxsize
        return 0

    @property
    def maxsize(self):
        """Bound on queued items as given; 0 or less means unbounded.
        Writable."""
        return self._maxsize_given

    @maxsize.setter
    def maxsize(self, value):
        self._set_maxsize(value)
        mqs_wait_signal_locked(&self._not_full, 0)

    @property
    def unfinished_tasks(self):
        """Items put and not yet marked done with `task_done`."""
        return self._unfinished

    @property
    def is_shutdown(self):
        """True once `shutdown` has been called."""
        return self._shutdown

    def put(self, item, bint block=True, timeout=None, *, delay=None,
            at=None):
        """Put item into the queue, now or after a delay.

        If the queue is bounded and full, with `block` true (the default)
        wait for a free slot, for at most `timeout` seconds if it is not
        None. The wait never ends before `timeout`, releases the GIL and
        lets Ctrl-C through.

        Parameters
        ----------
        delay : float, optional
            Keep the item invisible for this many seconds, measured on the
            monotonic clock.
        at : datetime.datetime or float, optional
            Keep the item invisible until this wall-clock time (an aware
            or naive local datetime, or seconds since the epoch). It is
            turned into a monotonic deadline once, when the put is
            accepted, so a later step of the wall clock neither releases
            waiting items early nor holds them back. A time in the past
            makes the item ready at once.

        Raises
        ------
        Full
            When no slot freed up (at once if `block` is false).
        ShutDown
            If `shutdown` was called, also while waiting.
        ValueError
            If `delay` is negative or not finite, if `delay` or `at` is
            more than `mqs.MAX_DELAY_SECONDS` (10 years) from now, or if
            both `delay` and `at` are given. Also if `timeout` is negative
            or NaN while the queue is bounded and `block` is true, even
            when a slot is free, as `queue.Queue.put` does. An unbounded
            queue ignores `timeout`.
        TypeError
            If `delay` or `at` has the wrong type.

        Notes
        -----
        A delayed item is never got before it is due; it becomes ready
        when a `get`, `get_many`, `qsize`, `empty` or `full` call runs
        after its deadline, and a blocked `get` wakes up for it. `maxsize`
        counts delayed items, `qsize` counts only ready ones, and `join`
        waits for both. Each delayed item costs 40 to 80 bytes in the
        timing wheel.
        """
        if self._shutdown:
            raise ShutDown("put on a shut-down queue")
        if delay is not None or at is not None:
            self._put_delayed(item, block, timeout, delay, at)
            return
        if self._delayed:
            # Items already due go ahead of this one.
            self._promote_due()
        if self._maxsize:
            _check_timeout(block, timeout)
            if self._chain.count + self._delayed >= self._maxsize:
                self._wait_not_full(block, timeout)
        _stamp_puts(&self._sampling, &self._chain, 1)
        _chain_push(&self._chain, <PyObject *>item)
        self._unfinished += 1
        mqs_wait_signal_locked(&self._not_empty, 0)

    cdef int _put_delayed(self, object item, bint block, object timeout,
                          object delay, object at) except -1:
        cdef int64_t due = _due_ns(delay, at)
        if self._maxsize:
            _check_timeout(block, timeout)
            if self._chain.count + self._delayed >= self._maxsize:
                self._wait_not_full(block, timeout)
        if self._wheel is None:
            self._wheel = TimingWheel(0.001, 64)
        self._wheel._insert(due, item)
        self._delayed += 1
        self._delayed_puts += 1
        self._unfinished += 1
        if due < self._next_due_ns:
            self._next_due_ns = due
        # A getter blocked until an older deadline must learn of this one.
        mqs_wait_signal_locked(&self._not_empty, 0)
        return 0

    cdef inline int _promote_due(self) except -1:
        """Move delayed items whose deadline has passed into the ring."""
        if self._delayed and mqs_monotonic_ns() >= self._next_due_ns:
            self._promote(mqs_monotonic_ns())
        return 0

    cdef int _promote(self, int64_t now_ns) except -1:
        cdef list due = self._wheel._advance_ns(now_ns)
        cdef Py_ssize_t n = len(due)
        if n:
            _stamp_puts(&self._sampling, &self._chain, n)
            _chain_push_many(&self._chain, due, 0, n)
            self._delayed -= n
            self._promoted += n
            mqs_wait_signal_locked(&self._not_empty, 0)
        self._next_due_ns = (self._wheel._next_deadline_ns()
                             if self._delayed else INT64_MAX)
        return 0

    def put_nowait(self, item):
        """Put item if a slot is free, else raise `Full` at once."""
        return self.put(item, False)

    def put_async(self, item, timeout=None):
        """Return a coroutine that puts `item` without blocking the event
        loop.

        The coroutine retries `put_nowait` after sleeps of 0.5 ms growing
        to 5 ms while the queue is full. It raises `Full` after `timeout`
        seconds (None: no limit), never earlier, and any other error of
        `put_nowait` at once. Cancelling it adds nothing.
        """
        return _aio.put_async(self, item, timeout)

    cdef int _wait_not_full(self, bint block, object timeout) except -1:
        """Wait until count < maxsize; raise Full or ShutDown otherwise."""
        cdef int64_t deadline = deadline_ns(timeout) if block else 0
        cdef uint32_t epoch
        cdef int strategy = STRATEGY_BLOCK
        while True:
            epoch = mqs_wait_prepare(&self._not_full)
            if self._shutdown:
                mqs_wait_finish(&self._not_full)
                raise ShutDown("put on a shut-down queue")
            if not self._maxsize \
                    or self._chain.count + self._delayed < self._maxsize:
                mqs_wait_finish(&self._not_full)
                return 0
            if not block:
                mqs_wait_finish(&self._not_full)
                raise Full()
            if park(&self._not_full, epoch, deadline, 0, strategy):
                raise Full()
            strategy = STRATEGY_SLEEP

    def put_many(self, items, bint block=True, timeout=None):
        """Put every item of the iterable `items`, in order.

        On an unbounded queue (or when the whole batch fits) this is one
        native call. On a bounded queue items are added as room frees up,
        waiting like `put`.

        Raises
        ------
        Full
            When the queue stayed full; ``exc.accepted`` items of the batch
            were added and stay queued, the rest were not.
        ShutDown
            If the queue is or gets shut down; ``exc.accepted`` as above.
        ValueError
            If the queue is bounded, `block` is true and `timeout` is
            negative or NaN; no item of the batch is added.
        """
        cdef list batch = items if type(items) is list else list(items)
        cdef Py_ssize_t n = len(batch)
        cdef Py_ssize_t done = 0
        cdef Py_ssize_t room
        cdef int64_t deadline = 0
        if self._shutdown:
            raise ShutDown("put_many on a shut-down queue", 0)
        # As in `put`, only a bounded queue checks the timeout: an
        # unbounded one never waits.
        if self._maxsize and block and timeout is not None:
            deadline = deadline_ns(timeout)
        while done < n:
            room = n - done
            if self._maxsize:
                room = self._maxsize - self._chain.count - self._delayed
                if room > n - done:
                    room = n - done
            if room > 0:
                _stamp_puts(&self._sampling, &self._chain, room)
                _chain_push_many(&self._chain, batch, done, done + room)
                done += room
                self._unfinished += room
                mqs_wait_signal_locked(&self._not_empty, 0)
                continue
            if batch is items:
                # The wait releases the GIL, so another thread may change
                # the caller's list. A shorter list would fail the push
                # after its claim and leave unwritten slots in the ring,
                # so push the rest from a private copy.
                batch = list(batch)
            try:
                self._wait_not_full(
                    block, None if deadline <= 0 else
                    max(0.0, (deadline - mqs_monotonic_ns()) / 1e9))
            except Full:
                raise Full(
                    f"queue stayed full: put {done} of {n} items; "
                    f"{_not_added(n - done)}", done) from None
            except ShutDown:
                raise ShutDown(
                    f"queue shut down: put {done} of {n} items; "
                    f"{_not_added(n - done)}", done) from None

    def get(self, bint block=True, timeout=None):
        """Remove and return the oldest item.

        With `block` true (the default) wait until an item arrives, for at
        most `timeout` seconds if it is not None. The wait never ends
        before `timeout`, releases the GIL and lets Ctrl-C through.

        Raises
        ------
        Empty
            When no item arrived (at once if `block` is false).
        ShutDown
            When the queue is shut down and empty.
        ValueError
            If `timeout` is negative.
        """
        cdef PyObject *item
        cdef object result
        _check_timeout(block, timeout)
        if self._delayed:
            self._promote_due()
        item = _chain_pop(&self._chain)
        if item != NULL:
            _after_pop(&self._sampling, &self._chain, self._sampler)
            mqs_wait_signal_locked(&self._not_full, 0)
            result = <object>item
            Py_DECREF(result)
            return result
        return self._get_slow(block, timeout)

    def get_nowait(self):
        """Remove and return the oldest item, or raise `Empty` at once."""
        return self.get(False)

    def get_async(self, timeout=None):
        """Return a coroutine that gets the oldest item without blocking
        the event loop.

        The coroutine retries `get_nowait` after sleeps of 0.5 ms growing
        to 5 ms, so it sees a new item at most about 5 ms late. It raises
        `Empty` after `timeout` seconds (None: no limit), never earlier,
        and any other error of `get_nowait` at once. Cancelling it takes
        nothing.
        """
        return _aio.get_async(self, timeout)

    cdef object _get_slow(self, bint block, object timeout):
        result = _get_waiting(&self._chain, &self._not_empty,
                              &self._not_full, &self._shutdown, self, block,
                              timeout)
        _after_pop(&self._sampling, &self._chain, self._sampler)
        return result

    def get_many(self, max_items, bint block=True, timeout=None):
        """Remove and return a list of 1 to `max_items` oldest items.

        Waits like `get` until at least one item is there, then takes what
        is queued, up to `max_items`, without waiting for more.

        Raises
        ------
        Empty, ShutDown, ValueError
            As `get`; also ValueError if `max_items` is below 1.
        TypeError
            If `max_items` is not an int.
        """
        result = _get_many(&self._chain, &self._not_empty, &self._not_full,
                           &self._shutdown, self, max_items, block, timeout)
        _after_pop(&self._sampling, &self._chain, self._sampler)
        return result

    def task_done(self):
        """Mark one earlier-got item as processed, for `join`.

        Raises
        ------
        ValueError
            If called more times than items were put.
        """
        if self._unfinished <= 0:
            raise ValueError("task_done() called too many times")
        self._unfinished -= 1
        if self._unfinished == 0:
            mqs_wait_signal_locked(&self._all_done, 0)

    def join(self):
        """Block until every item put has been marked with `task_done`.

        The wait releases the GIL and lets Ctrl-C through.
        """
        cdef uint32_t epoch
        cdef int strategy = STRATEGY_BLOCK
        while True:
            epoch = mqs_wait_prepare(&self._all_done)
            if self._unfinished == 0:
                mqs_wait_finish(&self._all_done)
                return
            park(&self._all_done, epoch, -1, 0, strategy)
            strategy = STRATEGY_SLEEP

    def qsize(self):
        """Return the exact number of ready items (delayed ones not due
        yet are not counted)."""
        self._promote_due()
        return self._chain.count

    def empty(self):
        """Return True if no item is ready."""
        self._promote_due()
        return self._chain.count == 0

    def full(self):
        """Return True if the queue is bounded and holds maxsize items,
        delayed ones included."""
        self._promote_due()
        return 0 < self._maxsize <= self._chain.count + self._delayed

    @property
    def delayed(self):
        """Items put with a delay that are not due yet."""
        self._promote_due()
        return self._delayed

    def shutdown(self, bint immediate=False):
        """Shut the queue down, as `queue.Queue.shutdown` of Python 3.13.

        Later puts raise `ShutDown`, and so do blocked ones. Gets drain
        what is queued, then raise `ShutDown`. With `immediate` true the
        queued items are dropped at once, each counted as done for
        `join`, and blocked joiners return.
        """
        cdef list dropped = []
        cdef int64_t n
        cdef object wheel = self._wheel
        self._shutdown = True
        if immediate:
            n = _chain_pop_many(&self._chain, dropped, self._chain.count + 1)
            self._dropped_ready += n
            self._dropped_delayed += self._delayed
            _drop_stamps(&self._sampling)
            n += self._delayed
            self._wheel = None
            self._delayed = 0
            self._next_due_ns = INT64_MAX
            self._unfinished -= n
            if self._unfinished < 0:
                self._unfinished = 0
            mqs_wait_signal_locked(&self._all_done, 0)
        mqs_wait_signal_locked(&self._not_empty, 0)
        mqs_wait_signal_locked(&self._not_full, 0)
        # `dropped` (and the wheel with the delayed items) is released
        # here, after the queue state is final, so a __del__ that touches
        # the queue sees it shut down and empty.
        del wheel

    def set_latency_sampling(self, sample_every):
        """Sample the latency of one message in `sample_every`.

        Each sampled message is timestamped when it becomes ready (put,
        or due for a delayed item) and when it is got; the percentiles
        appear in ``stats().latency``. None turns sampling off and drops
        the collected samples. New queues sample at the rate of
        `mqs.metrics.set_default_sample_every` (one in 1,024 unless
        changed).

        Raises
        ------
        ValueError
            If `sample_every` is below 1.
        """
        if sample_every is None:
            _sampling_off(&self._sampling)
            self._sampler = None
        else:
            self._sampler = _sampling_on(&self._sampling, &self._chain,
                                         sample_every)

    def stats(self):
        """Return a `mqs.metrics.QueueStats` snapshot of the counters.

        Delayed items that are due are moved into the queue first, as
        `qsize` does.
        """
        self._promote_due()
        enqueued = self._chain.pushed - self._promoted + self._delayed_puts
        dequeued = self._chain.pushed - self._chain.count - self._dropped_ready
        return _metrics.QueueStats(
            kind="Queue", depth=self._chain.count, delayed=self._delayed,
            maxsize=self._maxsize, enqueued=enqueued, dequeued=dequeued,
            unfinished_tasks=self._unfinished,
            dropped=types.MappingProxyType(
                {"shutdown": self._dropped_ready + self._dropped_delayed}),
            latency=_latency_summary(self._sampler))

    def __iter__(self):
        return self

    def __next__(self):
        """Return the next item, blocking; stop once shut down and empty."""
        try:
            return self.get()
        except ShutDown:
            raise StopIteration from None

    def __repr__(self):
        return (f"<mqs.Queue maxsize={self._maxsize} "
                f"qsize={self._chain.count}>")


def _not_added(left):
    """Describe the `left` items of a batch that were not added."""
    if left == 1:
        return "the other item was not added"
    return f"the other {left} were not added"
