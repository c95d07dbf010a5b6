/*
 * Stress test of the durable queue's control block (csrc/mqs_durable.h)
 * with threads standing in for processes.
 *
 * Producers reserve a place (mqs_dq_reserve) and then append one record
 * (a rise of appended_offset, as the appender does). Each of two groups
 * has consumers that announce their claim (mqs_dq_set_reading), claim
 * one offset, "read" it and clear the announcement, then release what
 * every group took (mqs_dq_release_taken). A retention thread computes
 * its floor as the appender does: cursor loads, the fence, then the
 * `reading` words, and raises `deleted_below` to it.
 *
 * Checks: the log never holds more than maxsize records that some group
 * has not taken; no consumer reads an offset below `deleted_below`;
 * every record reaches each group exactly once; `stored` ends at 0.
 *
 * The gather test checks the group-commit handshake (mqs_dq_set_gather).
 * Each round, an appender thread releases the producers, then requests a
 * wake-up once all of them have put, and sleeps on `gathered`. A producer
 * that sees the request after its put, with enough records in, signals.
 * A lost wake-up leaves the appender asleep until its 10 s timeout, which
 * the test counts as a failure.
 *
 * usage: test_durable threads RECORDS | gather ROUNDS
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>

#include "check.h"
#include "mqs_durable.h"

#define GROUPS 2
#define PRODUCERS 2
#define CONSUMERS_PER_GROUP 2
#define MAXSIZE 4

static mqs_dq_control_t *control;
static int64_t records;
static _Atomic int64_t produced;
static _Atomic int64_t deleted_below;
static _Atomic int consumers_left;
static _Atomic unsigned char *seen[GROUPS];

static void *produce(void *arg)
{
    (void)arg;
    for (;;) {
        if (atomic_fetch_add(&produced, 1) >= records)
            return NULL;
        while (!mqs_dq_reserve(control, GROUPS, MAXSIZE))
            sched_yield();
        mqs_dq_add(control, MQS_DQ_APPENDED_OFFSET, 1);
    }
}

static void *consume(void *arg)
{
    int slot = (int)(intptr_t)arg;
    int group = slot % GROUPS;
    int64_t first;

    for (;;) {
        int64_t start = mqs_dq_get_cursor(control, group);
        if (start >= records)
            break;
        mqs_dq_set_reading(control, slot, start);
        if (mqs_dq_claim(control, group, 1, &first) == 1) {
            /* Pause between claim and read, as a descheduled consumer
             * would. The record must still be there: retention stays
             * below the announced cursor. */
            for (int i = 0; i < 4; i++)
                sched_yield();
            CHECK(first >= start);
            CHECK(first >= atomic_load(&deleted_below));
            atomic_fetch_add(&seen[group][first], 1);
        } else {
            sched_yield();
        }
        mqs_dq_set_reading(control, slot, -1);
        mqs_dq_release_taken(control, GROUPS);
    }
    atomic_fetch_sub(&consumers_left, 1);
    return NULL;
}

static void *retain(void *arg)
{
    int64_t end, low, floor;

    (void)arg;
    while (atomic_load(&consumers_left) > 0) {
        end = mqs_dq_get(control, MQS_DQ_APPENDED_OFFSET);
        low = mqs_dq_min_cursor(control, GROUPS);
        CHECK(end - low <= MAXSIZE);
        floor = low;
        mqs_dq_reading_fence();
        for (int slot = 0; slot < MQS_DQ_READERS; slot++) {
            int64_t reading = mqs_dq_get_reading(control, slot);
            if (reading >= 0 && reading < floor)
                floor = reading;
        }
        if (floor > atomic_load(&deleted_below))
            atomic_store(&deleted_below, floor);
        sched_yield();
    }
    return NULL;
}

static void test_threads(void)
{
    int64_t cursors[GROUPS] = {0, 0};
    pthread_t producers[PRODUCERS];
    pthread_t consumers[GROUPS * CONSUMERS_PER_GROUP];
    pthread_t retention;

    control = aligned_alloc(MQS_PAD_BYTES, sizeof *control);
    memset(control, 0, sizeof *control);
    for (int g = 0; g < GROUPS; g++)
        seen[g] = calloc((size_t)records, 1);
    mqs_dq_setup(control, 1, cursors, GROUPS, MAXSIZE, 0, 0, 0, 0, 0);
    atomic_store(&consumers_left, GROUPS * CONSUMERS_PER_GROUP);

    for (int i = 0; i < PRODUCERS; i++)
        pthread_create(&producers[i], NULL, produce, NULL);
    for (int i = 0; i < GROUPS * CONSUMERS_PER_GROUP; i++)
        pthread_create(&consumers[i], NULL, consume, (void *)(intptr_t)i);
    pthread_create(&retention, NULL, retain, NULL);
    for (int i = 0; i < PRODUCERS; i++)
        pthread_join(producers[i], NULL);
    for (int i = 0; i < GROUPS * CONSUMERS_PER_GROUP; i++)
        pthread_join(consumers[i], NULL);
    pthread_join(retention, NULL);

    mqs_dq_release_taken(control, GROUPS);
    CHECK_EQ(mqs_dq_get(control, MQS_DQ_STORED), 0);
    CHECK_EQ(mqs_dq_get(control, MQS_DQ_APPENDED_OFFSET), records);
    for (int g = 0; g < GROUPS; g++) {
        int64_t once = 0;
        for (int64_t i = 0; i < records; i++)
            once += atomic_load(&seen[g][i]) == 1;
        CHECK_EQ(once, records);
        free((void *)seen[g]);
    }
    free(control);
}

#define GATHER_PRODUCERS 4
#define GATHER_TIMEOUT_NS 10000000000LL

static _Atomic int64_t gather_round;
static _Atomic int64_t inbox;

static void *gather_produce(void *arg)
{
    mqs_waitword_t *start = mqs_dq_progress(control);
    uint64_t random_state = 0x9e3779b97f4a7c15ULL * (uint64_t)(intptr_t)arg + 1;

    for (int64_t round = 1; round <= records; round++) {
        for (;;) {
            uint32_t epoch = mqs_wait_prepare(start);
            if (atomic_load(&gather_round) >= round) {
                mqs_wait_finish(start);
                break;
            }
            mqs_wait_park(start, epoch, GATHER_TIMEOUT_NS, 0);
            mqs_wait_finish(start);
        }
        /* Put after a random delay (0 to about 20 us, sometimes with a
         * yield), so that the appender also finds the inbox short and
         * sleeps. */
        random_state ^= random_state << 13;
        random_state ^= random_state >> 7;
        random_state ^= random_state << 17;
        for (uint64_t spin = random_state % 4096; spin > 0; spin--)
            mqs_cpu_relax();
        if (random_state % 8 == 0)
            sched_yield();
        /* The put, then the fence of wait_durable's mqs_wait_prepare. */
        atomic_fetch_add(&inbox, 1);
        mqs_fence_seq_cst();
        int64_t want = mqs_dq_gather_count(control);
        if (want > 0 && atomic_load(&inbox) >= want)
            mqs_wait_signal(mqs_dq_gathered(control), 0);
    }
    return NULL;
}

static void test_gather(void)
{
    int64_t cursor = 0;
    int64_t timeouts = 0, short_rounds = 0, slept = 0;
    pthread_t producers[GATHER_PRODUCERS];
    mqs_waitword_t *gathered;

    control = aligned_alloc(MQS_PAD_BYTES, sizeof *control);
    memset(control, 0, sizeof *control);
    mqs_dq_setup(control, 1, &cursor, 1, 0, 0, 0, 0, 0, 0);
    CHECK_EQ(mqs_dq_gather_count(control), 0);
    gathered = mqs_dq_gathered(control);
    for (int i = 0; i < GATHER_PRODUCERS; i++)
        pthread_create(&producers[i], NULL, gather_produce,
                       (void *)(intptr_t)i);
    for (int64_t round = 1; round <= records; round++) {
        int64_t deadline;

        atomic_store(&inbox, 0);
        atomic_store(&gather_round, round);
        mqs_wait_signal(mqs_dq_progress(control), 0);
        /* Request only now, as the appender does after its wake-up, so
         * that producers race with the request. */
        mqs_dq_set_gather(control, GATHER_PRODUCERS);
        deadline = mqs_monotonic_ns() + GATHER_TIMEOUT_NS;
        for (;;) {
            uint32_t epoch = mqs_wait_prepare(gathered);
            int64_t left = deadline - mqs_monotonic_ns();
            if (atomic_load(&inbox) >= GATHER_PRODUCERS) {
                mqs_wait_finish(gathered);
                break;
            }
            if (left <= 0) {
                mqs_wait_finish(gathered);
                timeouts++;
                break;
            }
            if (mqs_wait_sleep(gathered, epoch, left, 0) == MQS_ETIMEDOUT)
                timeouts++;
            mqs_wait_finish(gathered);
            slept++;
        }
        mqs_dq_set_gather(control, 0);
        short_rounds += atomic_load(&inbox) != GATHER_PRODUCERS;
    }
    for (int i = 0; i < GATHER_PRODUCERS; i++)
        pthread_join(producers[i], NULL);
    CHECK_EQ(timeouts, 0);
    CHECK_EQ(short_rounds, 0);
    /* The appender must have slept at least once, or the wake-up path
     * was never tested. */
    CHECK(slept > 0);

    /* Setting the block up for a new ring drops a stale request. */
    mqs_dq_set_gather(control, 7);
    mqs_dq_setup(control, 2, &cursor, 1, 0, 0, 0, 0, 0, 0);
    CHECK_EQ(mqs_dq_gather_count(control), 0);
    free(control);
}

int main(int argc, char **argv)
{
    if (argc != 3 || (strcmp(argv[1], "threads") != 0
                      && strcmp(argv[1], "gather") != 0)) {
        fprintf(stderr,
                "usage: test_durable threads RECORDS | gather ROUNDS\n");
        return 2;
    }
    records = strtoll(argv[2], NULL, 10);
    if (strcmp(argv[1], "threads") == 0)
        test_threads();
    else
        test_gather();
    printf("%d passed, %d failed\n", atomic_load(&checks_passed),
           atomic_load(&checks_failed));
    return atomic_load(&checks_failed) ? 1 : 0;
}
