# cython: language_level=3
"""Deadline and park helpers shared by the queue modules."""

from cpython.exc cimport PyErr_CheckSignals
from libc.math cimport isnan
from libc.stdint cimport int64_t, uint32_t

from mqs.includes.mqs_wait cimport (
    mqs_monotonic_ns,
    mqs_wait_finish,
    mqs_wait_park,
    mqs_wait_sleep,
    mqs_wait_spin,
    mqs_waitword_t,
)

# A blocked call wakes at least this often to run signal handlers.
cdef enum:
    WAIT_SLICE_NS = 50000000

# Wait strategies: park on a futex after a short spin, or never park.
# STRATEGY_SLEEP is BLOCK without the spin, for the later slices of a
# wait that already spun once: an idle waiter then costs only its
# wake-ups every WAIT_SLICE_NS.
cdef enum:
    STRATEGY_BLOCK = 0
    STRATEGY_SPIN = 1
    STRATEGY_YIELD = 2
    STRATEGY_SLEEP = 3


cdef inline int64_t deadline_ns(object timeout) except -2:
    """Turn a stdlib-style timeout into a monotonic deadline (-1: none)."""
    cdef double seconds
    if timeout is None:
        return -1
    try:
        seconds = timeout
    except TypeError:
        raise TypeError(
            f"timeout must be a number of seconds or None, got {timeout!r}"
        ) from None
    if seconds < 0 or isnan(seconds):
        raise ValueError(
            f"timeout must be a non-negative number of seconds, "
            f"got {timeout!r}")
    if seconds > 1e9:
        return -1
    return mqs_monotonic_ns() + <int64_t>(seconds * 1e9)


cdef inline int park(mqs_waitword_t *word, uint32_t epoch, int64_t deadline,
                     int shared, int strategy) except -1:
    """Wait on word with the GIL released, deregister, run signal handlers.

    The caller registered with mqs_wait_prepare; this call always ends
    that registration (mqs_wait_finish), right when the wait ends and
    before the GIL is taken back, so signallers stop paying for a waiter
    that is only queueing for the GIL. Returns 1 when the deadline has
    passed, 0 otherwise; raises what a signal handler raised
    (KeyboardInterrupt for Ctrl-C).
    """
    cdef int64_t now = mqs_monotonic_ns()
    cdef int64_t left = WAIT_SLICE_NS
    if deadline >= 0:
        if now >= deadline:
            mqs_wait_finish(word)
            return 1
        if deadline - now < left:
            left = deadline - now
    with nogil:
        if strategy == STRATEGY_BLOCK:
            mqs_wait_park(word, epoch, left, shared)
        elif strategy == STRATEGY_SLEEP:
            mqs_wait_sleep(word, epoch, left, shared)
        else:
            mqs_wait_spin(word, epoch, left, strategy == STRATEGY_YIELD)
        mqs_wait_finish(word)
    if PyErr_CheckSignals() < 0:
        return -1
    return 0
