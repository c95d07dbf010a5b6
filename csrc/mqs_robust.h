/*
 * mqs_robust.h: set up and take a process-shared robust mutex.
 *
 * A mutex in shared memory whose holder may die at any instruction:
 * PTHREAD_PROCESS_SHARED so that every process mapping it can use it,
 * PTHREAD_MUTEX_ROBUST so that the next locker gets EOWNERDEAD instead of
 * waiting forever. The caller repairs its shared state and then calls
 * pthread_mutex_consistent before it unlocks.
 */
#ifndef MQS_ROBUST_H
#define MQS_ROBUST_H

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <time.h>

#include "mqs_atomic.h"

/* Initialise `mutex` as process-shared and robust. Returns MQS_OK or
 * MQS_EINVAL. */
static inline int mqs_robust_init(pthread_mutex_t *mutex)
{
    pthread_mutexattr_t attr;
    int rc;

    if (pthread_mutexattr_init(&attr) != 0)
        return MQS_EINVAL;
    rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    if (rc == 0)
        rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    if (rc == 0)
        rc = pthread_mutex_init(mutex, &attr);
    pthread_mutexattr_destroy(&attr);
    return rc == 0 ? MQS_OK : MQS_EINVAL;
}

/* Return value of mqs_robust_lock when the previous holder died: the
 * mutex is held but not consistent yet. */
#define MQS_ROBUST_OWNER_DIED 1

/*
 * Take `mutex`, waiting up to `timeout_ns` (0: only try). Returns
 * MQS_OK, MQS_ROBUST_OWNER_DIED (held; repair, then call
 * pthread_mutex_consistent), MQS_ETIMEDOUT, or MQS_EINVAL when the
 * mutex is unusable.
 */
static inline int mqs_robust_lock(pthread_mutex_t *mutex, int64_t timeout_ns)
{
    struct timespec deadline;
    int64_t at;
    int rc;

    rc = pthread_mutex_trylock(mutex);
    if (rc == EBUSY && timeout_ns > 0) {
        /* pthread_mutex_timedlock takes an absolute CLOCK_REALTIME time. */
        clock_gettime(CLOCK_REALTIME, &deadline);
        at = (int64_t)deadline.tv_sec * 1000000000 + deadline.tv_nsec
             + timeout_ns;
        deadline.tv_sec = at / 1000000000;
        deadline.tv_nsec = at % 1000000000;
        rc = pthread_mutex_timedlock(mutex, &deadline);
    }
    if (rc == 0)
        return MQS_OK;
    if (rc == EBUSY || rc == ETIMEDOUT)
        return MQS_ETIMEDOUT;
    if (rc == EOWNERDEAD)
        return MQS_ROBUST_OWNER_DIED;
    return MQS_EINVAL;
}

#endif /* MQS_ROBUST_H */
