/*
 * mqs_wait.h: an event word that threads (or processes, when the word sits
 * in shared memory) wait on: spin, then yield, then park on a futex.
 *
 *   mqs_waitword_t (12 bytes, keep it in the memory it guards):
 *   +---------------+-----------------+------------------+
 *   | epoch (u32)   | waiters (u32)   | sleepers (u32)   |
 *   +---------------+-----------------+------------------+
 *
 * epoch     bumped by a signaller after it changed the guarded state, but
 *           only while someone is registered in waiters; it is the futex
 *           word, so a sleeper whose epoch is stale never goes to sleep.
 * waiters   threads that are waiting in any phase (spin, yield or park).
 * sleepers  threads about to enter or inside FUTEX_WAIT; only these make
 *           the signaller pay for a wake system call.
 *
 * Protocol (both halves need their seq_cst step, the classic store-buffer
 * case):
 *   waiter:    e = mqs_wait_prepare(w)     (waiters++, full fence)
 *              re-check the condition; if met, mqs_wait_finish(w)
 *              otherwise mqs_wait_park(w, e, ...) until the epoch moves,
 *              then re-check, and mqs_wait_finish(w) at the end.
 *   signaller: change the state, then mqs_wait_signal(w)
 *              (full fence, read waiters, bump epoch, wake sleepers).
 * A waiter that misses the change in its re-check is registered before
 * the signaller reads waiters, so the epoch moves and the futex returns.
 */
#ifndef MQS_WAIT_H
#define MQS_WAIT_H

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "mqs_atomic.h"

typedef struct mqs_waitword {
    _Atomic uint32_t epoch;
    _Atomic uint32_t waiters;
    _Atomic uint32_t sleepers;
} mqs_waitword_t;

/*
 * How long a waiter spins, then yields, before it sleeps on the futex.
 * Waking a sleeping thread or process costs tens of microseconds on a
 * virtual machine, because the hypervisor must wake an idle vCPU. That
 * is far longer than a reply in a ping-pong or a handoff between two
 * busy threads takes, so a waiter stays awake for 50 us in all. Callers
 * spin only in the first slice of a long wait (mqs_wait_sleep after it).
 */
#define MQS_WAIT_SPIN_NS 20000
#define MQS_WAIT_YIELD_NS 50000

static inline void mqs_wait_init(mqs_waitword_t *w)
{
    atomic_init(&w->epoch, 0);
    atomic_init(&w->waiters, 0);
    atomic_init(&w->sleepers, 0);
}

static inline int64_t mqs_monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/*
 * Register the caller as a waiter and return the epoch to wait on.
 * Any thread. The caller must re-check its condition after this call.
 */
static inline uint32_t mqs_wait_prepare(mqs_waitword_t *w)
{
    uint32_t epoch = mqs_load_acquire_u32(&w->epoch);

    mqs_fetch_add_seq_cst_u32(&w->waiters, 1);
    mqs_fence_seq_cst();
    return epoch;
}

/* The current epoch, for a registered waiter that goes on waiting after
 * a wake-up: a signal after this read moves the epoch past it. */
static inline uint32_t mqs_wait_epoch(mqs_waitword_t *w)
{
    return mqs_load_acquire_u32(&w->epoch);
}

/* Deregister a waiter registered by mqs_wait_prepare. Any thread. */
static inline void mqs_wait_finish(mqs_waitword_t *w)
{
    mqs_fetch_sub_seq_cst_u32(&w->waiters, 1);
}

static inline int mqs_futex_wait(_Atomic uint32_t *word, uint32_t expected,
                                 int64_t timeout_ns, int shared)
{
    struct timespec ts;
    int op = shared ? FUTEX_WAIT : FUTEX_WAIT_PRIVATE;

    ts.tv_sec = timeout_ns / 1000000000;
    ts.tv_nsec = timeout_ns % 1000000000;
    return (int)syscall(SYS_futex, (uint32_t *)word, op, expected, &ts,
                        NULL, 0);
}

static inline void mqs_futex_wake_all(_Atomic uint32_t *word, int shared)
{
    int op = shared ? FUTEX_WAKE : FUTEX_WAKE_PRIVATE;

    syscall(SYS_futex, (uint32_t *)word, op, INT_MAX, NULL, NULL, 0);
}

/* Deadline of a wait of timeout_ns from now: a negative timeout counts
 * as 0, and a huge one (INT64_MAX) saturates instead of overflowing. */
static inline int64_t mqs_wait_deadline(int64_t now, int64_t timeout_ns)
{
    if (timeout_ns < 0)
        timeout_ns = 0;
    return timeout_ns > INT64_MAX - now ? INT64_MAX : now + timeout_ns;
}

/*
 * Sleep on the futex until the epoch differs from `epoch` or `timeout_ns`
 * passes, without spinning first. For a waiter that already spun in an
 * earlier call of the same wait. Any thread, without any lock held.
 * `shared` selects a futex that works across processes (the word must
 * then be in MAP_SHARED memory). Returns as mqs_wait_park does.
 */
static inline int mqs_wait_sleep(mqs_waitword_t *w, uint32_t epoch,
                                 int64_t timeout_ns, int shared)
{
    int64_t left = mqs_wait_deadline(mqs_monotonic_ns(), timeout_ns)
                   - mqs_monotonic_ns();
    int rc;

    if (left <= 0)
        return MQS_ETIMEDOUT;

    /* sleepers++ must be ordered before the epoch re-read (seq_cst RMW
     * then seq_cst load), pairing with the signaller's epoch++ then
     * sleepers load. */
    mqs_fetch_add_seq_cst_u32(&w->sleepers, 1);
    if (mqs_load_seq_cst_u32(&w->epoch) != epoch) {
        mqs_fetch_sub_seq_cst_u32(&w->sleepers, 1);
        return MQS_OK;
    }
    rc = mqs_futex_wait(&w->epoch, epoch, left, shared);
    mqs_fetch_sub_seq_cst_u32(&w->sleepers, 1);
    if (rc == 0 || errno == EAGAIN)
        return MQS_OK;
    if (errno == ETIMEDOUT)
        return MQS_ETIMEDOUT;
    return MQS_EINTR;
}

/*
 * mqs_wait_park with the yield phase ending `awake_ns` after the start
 * instead of MQS_WAIT_YIELD_NS, for a waiter that expects its change
 * later than a handoff takes (the consumers of a log broker under
 * fsync="always" wait about one disk sync for the next message).
 */
static inline int mqs_wait_park_awake(mqs_waitword_t *w, uint32_t epoch,
                                      int64_t timeout_ns, int64_t awake_ns,
                                      int shared)
{
    int64_t now = mqs_monotonic_ns();
    int64_t deadline = mqs_wait_deadline(now, timeout_ns);
    int64_t spin_end, yield_end;

    spin_end = deadline - now < MQS_WAIT_SPIN_NS ? deadline
                                                 : now + MQS_WAIT_SPIN_NS;
    yield_end = deadline - now < awake_ns ? deadline : now + awake_ns;
    for (uint32_t i = 0;; i++) {
        if (mqs_load_acquire_u32(&w->epoch) != epoch)
            return MQS_OK;
        /* Reading the clock costs about as much as 64 pause loops. */
        if ((i & 63) == 0 && mqs_monotonic_ns() >= spin_end)
            break;
        mqs_cpu_relax();
    }
    while (mqs_monotonic_ns() < yield_end) {
        if (mqs_load_acquire_u32(&w->epoch) != epoch)
            return MQS_OK;
        sched_yield();
    }
    return mqs_wait_sleep(w, epoch, deadline - mqs_monotonic_ns(), shared);
}

/*
 * Wait until the epoch differs from `epoch` or `timeout_ns` passes: spin
 * for up to MQS_WAIT_SPIN_NS, yield until MQS_WAIT_YIELD_NS, then sleep
 * on the futex (mqs_wait_sleep); neither phase outlasts the timeout. Any
 * thread, without any lock held. `shared` selects a futex that works
 * across processes (the word must then be in MAP_SHARED memory).
 *
 * Returns MQS_OK when the epoch moved (or on a spurious wake-up: callers
 * re-check their condition in any case), MQS_ETIMEDOUT when the timeout
 * passed, MQS_EINTR when a signal interrupted the sleep.
 */
static inline int mqs_wait_park(mqs_waitword_t *w, uint32_t epoch,
                                int64_t timeout_ns, int shared)
{
    return mqs_wait_park_awake(w, epoch, timeout_ns, MQS_WAIT_YIELD_NS,
                               shared);
}

/*
 * Tell waiters that the guarded state changed. Any thread, after the
 * change is stored. Costs one fence and one load when nobody waits, and a
 * system call only when a waiter sleeps in the kernel.
 */
static inline void mqs_wait_signal(mqs_waitword_t *w, int shared)
{
    mqs_fence_seq_cst();
    if (mqs_load_seq_cst_u32(&w->waiters) == 0)
        return;
    mqs_fetch_add_seq_cst_u32(&w->epoch, 1);
    if (mqs_load_seq_cst_u32(&w->sleepers) != 0)
        mqs_futex_wake_all(&w->epoch, shared);
}

/*
 * Same as mqs_wait_signal, for a signaller that holds the lock the waiter
 * held across mqs_wait_prepare and its re-check (the GIL, in mqs.Queue).
 * The lock orders the two sides, so no fence is needed.
 */
static inline void mqs_wait_signal_locked(mqs_waitword_t *w, int shared)
{
    if (atomic_load_explicit(&w->waiters, memory_order_relaxed) == 0)
        return;
    mqs_fetch_add_seq_cst_u32(&w->epoch, 1);
    if (mqs_load_seq_cst_u32(&w->sleepers) != 0)
        mqs_futex_wake_all(&w->epoch, shared);
}

/*
 * Busy-wait until the epoch differs from `epoch` or `timeout_ns` passes,
 * never sleeping in the kernel: with `yield_cpu` 0 spin with a pause
 * instruction, with 1 call sched_yield between checks. For the "spin"
 * and "yield" wait strategies, which trade a core for latency. Any
 * thread. Returns MQS_OK when the epoch moved, MQS_ETIMEDOUT otherwise.
 */
static inline int mqs_wait_spin(mqs_waitword_t *w, uint32_t epoch,
                                int64_t timeout_ns, int yield_cpu)
{
    int64_t now = mqs_monotonic_ns();
    /* Saturate as mqs_wait_park does: a huge timeout must not wrap. */
    int64_t deadline = timeout_ns > INT64_MAX - now ? INT64_MAX
                                                    : now + timeout_ns;

    for (;;) {
        for (int i = 0; i < 1024; i++) {
            if (mqs_load_acquire_u32(&w->epoch) != epoch)
                return MQS_OK;
            if (yield_cpu)
                sched_yield();
            else
                mqs_cpu_relax();
        }
        if (mqs_monotonic_ns() >= deadline)
            return MQS_ETIMEDOUT;
    }
}

#endif /* MQS_WAIT_H */
