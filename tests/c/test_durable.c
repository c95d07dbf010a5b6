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
 * usage: test_durable threads RECORDS
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

int main(int argc, char **argv)
{
    if (argc != 3 || strcmp(argv[1], "threads") != 0) {
        fprintf(stderr, "usage: test_durable threads RECORDS\n");
        return 2;
    }
    records = strtoll(argv[2], NULL, 10);
    test_threads();
    printf("%d passed, %d failed\n", atomic_load(&checks_passed),
           atomic_load(&checks_failed));
    return atomic_load(&checks_failed) ? 1 : 0;
}
