from libc.stdint cimport int64_t, uint32_t


cdef extern from "mqs_wait.h" nogil:
    ctypedef struct mqs_waitword_t:
        uint32_t epoch
        uint32_t waiters
        uint32_t sleepers

    void mqs_wait_init(mqs_waitword_t *w)
    int64_t mqs_monotonic_ns()
    uint32_t mqs_wait_prepare(mqs_waitword_t *w)
    void mqs_wait_finish(mqs_waitword_t *w)
    uint32_t mqs_wait_epoch(mqs_waitword_t *w)
    int mqs_wait_park_awake(mqs_waitword_t *w, uint32_t epoch,
                            int64_t timeout_ns, int64_t awake_ns, int shared)
    int mqs_wait_park(mqs_waitword_t *w, uint32_t epoch, int64_t timeout_ns,
                      int shared)
    int mqs_wait_sleep(mqs_waitword_t *w, uint32_t epoch,
                       int64_t timeout_ns, int shared)
    int mqs_wait_spin(mqs_waitword_t *w, uint32_t epoch, int64_t timeout_ns,
                      int yield_cpu)
    void mqs_wait_signal(mqs_waitword_t *w, int shared)
    void mqs_wait_signal_locked(mqs_waitword_t *w, int shared)
