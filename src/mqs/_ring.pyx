# cython: language_level=3, embedsignature=True, binding=False
"""`RingBuffer`: the fixed-capacity sequenced ring, usable from Python.

A thin wrapper of `csrc/mqs_ring.h` holding Python objects: producers push,
broadcast consumers each see every item, work-pool workers share items so
each goes to exactly one of them. All calls hold the GIL; the value is the
Disruptor topology (gating on the slowest reader, batch reads up to the
cursor), not parallelism.
"""

cimport cython
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF
from libc.stdint cimport int64_t

from mqs.includes.mqs_atomic cimport MQS_EFULL, MQS_ETOOBIG, MQS_OK
from mqs.includes.mqs_ring cimport (
    MQS_RING_MAX_CAPACITY,
    MQS_RING_MULTI_PRODUCER,
    mqs_ring_add_consumer,
    mqs_ring_add_worker,
    mqs_ring_consumer_poll,
    mqs_ring_consumer_release,
    mqs_ring_create,
    mqs_ring_free,
    mqs_ring_publish,
    mqs_ring_size_bytes,
    mqs_ring_slot,
    mqs_ring_try_claim,
    mqs_ring_work_claim,
    mqs_ring_work_release,
)

__all__ = ["RingBuffer"]


def _next_power_of_two(n):
    return 1 << (n - 1).bit_length()


@cython.auto_pickle(False)
cdef class RingBuffer:
    # The first docstring lines are the text signature that
    # inspect.signature reads; tests/test_introspection.py checks them.
    """RingBuffer(capacity, *, max_consumers=0, max_workers=1,
               multi_producer=False)\n--\n
    Fixed-capacity ring of Python objects with Disruptor consumers.

    Parameters
    ----------
    capacity : int
        Slots, a power of two from 1 to 2**40.
    max_consumers : int
        Broadcast consumers that may be added (each sees every item).
    max_workers : int
        Work-pool workers that may be added (each item goes to one).
    multi_producer : bool
        Claim through CAS with a per-slot lap marker (4 more bytes per
        slot) instead of a plain cursor.

    Notes
    -----
    Memory: 8 bytes per slot (12 with `multi_producer`) plus one 128-byte
    block per consumer, worker and control counter. Producers stop with
    a full ring once the slowest consumer or the work pool is `capacity`
    items behind; with no consumer and no worker, pushes never fail and
    overwrite the oldest items. With only workers, the ring drops its
    reference to an item when a worker takes it; with broadcast
    consumers, when the slot is reused or the ring is freed.
    """

    def __cinit__(self, capacity, *, int max_consumers=0,
                  int max_workers=1, bint multi_producer=False):
        cdef int rc
        if not isinstance(capacity, int) or isinstance(capacity, bool):
            raise TypeError(
                f"capacity must be an int, got {type(capacity).__name__} "
                f"{capacity!r}")
        if capacity < 1 or capacity & (capacity - 1) \
                or capacity > MQS_RING_MAX_CAPACITY:
            hint = ""
            if 1 < capacity <= MQS_RING_MAX_CAPACITY:
                hint = f" (try {_next_power_of_two(capacity)})"
            raise ValueError(
                f"capacity must be a power of two from 1 to 2**40, got "
                f"{capacity!r}{hint}")
        if max_consumers < 0 or max_workers < 0 \
                or max_consumers + max_workers < 1 \
                or max_consumers > 4096 or max_workers > 4096:
            raise ValueError(
                f"max_consumers and max_workers must be 0 to 4096 with at "
                f"least one of them set, got {max_consumers!r} and "
                f"{max_workers!r}")
        rc = mqs_ring_create(
            &self._ring, capacity,
            MQS_RING_MULTI_PRODUCER if multi_producer else 0,
            max_consumers, max_workers)
        if rc != MQS_OK:
            raise MemoryError(
                f"cannot allocate a ring of {capacity} slots")

    def __dealloc__(self):
        cdef int64_t i
        if self._ring == NULL:
            return
        for i in range(self._ring.capacity):
            Py_XDECREF(<PyObject *>mqs_ring_slot(self._ring, i)[0])
        mqs_ring_free(self._ring)

    @property
    def capacity(self):
        """Slots in the ring."""
        return self._ring.capacity

    @property
    def nbytes(self):
        """Bytes of native memory the ring holds."""
        return mqs_ring_size_bytes(
            self._ring.capacity, self._ring.flags,
            self._ring.max_consumers, self._ring.max_workers)

    def add_consumer(self):
        """Register a broadcast consumer and return its index.

        The consumer starts at the current cursor and sees every item
        pushed from now on. Producers wait for it once it is `capacity`
        items behind.

        Raises
        ------
        ValueError
            If `max_consumers` consumers exist already.
        """
        cdef int index = mqs_ring_add_consumer(self._ring)
        if index < 0:
            raise ValueError(
                f"all {self._ring.max_consumers} consumers are taken; "
                f"raise max_consumers")
        self._broadcast = True
        return index

    def add_worker(self):
        """Register a work-pool worker and return its index.

        The first worker starts the pool at the current cursor: items
        pushed before it are not delivered to the pool, so add workers
        before pushing.

        Raises
        ------
        ValueError
            If `max_workers` workers exist already.
        """
        cdef int index = mqs_ring_add_worker(self._ring)
        if index < 0:
            raise ValueError(
                f"all {self._ring.max_workers} workers are taken; "
                f"raise max_workers")
        return index

    def try_push(self, item):
        """Append item if the slowest reader leaves room; return success."""
        cdef int64_t lo = 0
        cdef void **slot
        cdef PyObject *old
        if mqs_ring_try_claim(self._ring, 1, &lo) != MQS_OK:
            return False
        slot = mqs_ring_slot(self._ring, lo)
        old = <PyObject *>slot[0]
        Py_INCREF(item)
        slot[0] = <void *>item
        mqs_ring_publish(self._ring, lo, lo + 1)
        # Released only after the publish: a __del__ that pushes again
        # must find the ring consistent.
        Py_XDECREF(old)
        return True

    def try_push_many(self, items):
        """Append all of `items` in one claim if they fit; return success.

        Raises
        ------
        ValueError
            If the batch is larger than the ring, so it could never fit.
        """
        cdef list batch = items if type(items) is list else list(items)
        cdef int64_t n = len(batch)
        cdef int64_t lo, i
        cdef int rc
        cdef void **slot
        cdef list old = []
        if n == 0:
            return True
        rc = mqs_ring_try_claim(self._ring, n, &lo)
        if rc == MQS_ETOOBIG:
            raise ValueError(
                f"batch of {n} items is larger than the ring capacity "
                f"{self._ring.capacity}; split it")
        if rc != MQS_OK:
            return False
        for i in range(n):
            slot = mqs_ring_slot(self._ring, lo + i)
            if slot[0] != NULL:
                old.append(<object>slot[0])
                Py_DECREF(<object>slot[0])
            Py_INCREF(batch[i])
            slot[0] = <void *>batch[i]
        mqs_ring_publish(self._ring, lo, lo + n)
        return True

    cdef int _check_consumer(self, object index, object kind,
                             int limit) except -1:
        if not isinstance(index, int) or not 0 <= index < limit:
            raise ValueError(
                f"{kind} index must be one returned by add_{kind}(), got "
                f"{index!r}")
        return 0

    def poll(self, consumer, max_items=1 << 30):
        """Return up to `max_items` items broadcast consumer has not seen.

        Returns an empty list when nothing new is published; never waits.
        """
        cdef int64_t lo, hi, s
        cdef list out = []
        # n_consumers counts registered consumers; it can pass the
        # maximum for a moment while a rejected add_consumer backs out.
        self._check_consumer(consumer, "consumer",
                             min(self._ring.n_consumers,
                                 self._ring.max_consumers))
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items!r}")
        if mqs_ring_consumer_poll(self._ring, consumer, max_items,
                                  &lo, &hi) != MQS_OK:
            return out
        for s in range(lo, hi):
            out.append(<object>mqs_ring_slot(self._ring, s)[0])
        mqs_ring_consumer_release(self._ring, consumer, hi)
        return out

    def take(self, worker, max_items=1 << 30):
        """Return up to `max_items` items that no other worker took.

        Returns an empty list when nothing is left; never waits.
        """
        cdef int64_t lo, hi, s
        cdef void **slot
        cdef list out = []
        self._check_consumer(worker, "worker",
                             min(self._ring.n_workers, self._ring.max_workers))
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items!r}")
        if mqs_ring_work_claim(self._ring, worker, max_items,
                               &lo, &hi) != MQS_OK:
            return out
        for s in range(lo, hi):
            slot = mqs_ring_slot(self._ring, s)
            out.append(<object>slot[0])
            if not self._broadcast:
                # The list now holds the item; the ring lets go of it.
                Py_DECREF(<object>slot[0])
                slot[0] = NULL
        mqs_ring_work_release(self._ring, worker)
        return out

    def __repr__(self):
        return (f"<mqs.RingBuffer capacity={self._ring.capacity} "
                f"nbytes={self.nbytes}>")
