/*
 * test_hist.c: tests of mqs_hist.h, the shared latency histogram.
 *
 *   test_hist units     bucket bounds, clamping, count, sum, max, reset
 *   test_hist threads   4 threads record at once; every count is exact
 *   test_hist index     read one value per stdin line, print its bucket
 *                       (the Python test compares with mqs.metrics)
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "mqs_hist.h"

#define THREADS 4
#define RECORDS_PER_THREAD 100000

static mqs_hist_t shared_hist;

static void test_index_bounds(void)
{
    int64_t value;
    int previous = -1;

    CHECK_EQ(mqs_hist_index(0), 0);
    CHECK_EQ(mqs_hist_index(63), 63);
    CHECK_EQ(mqs_hist_index(64), 64);
    CHECK_EQ(mqs_hist_index(66), 65);
    CHECK_EQ(mqs_hist_index(-7), 0);
    CHECK_EQ(mqs_hist_index(MQS_HIST_MAX_NS), MQS_HIST_BUCKETS - 1);
    CHECK_EQ(mqs_hist_index(INT64_MAX), MQS_HIST_BUCKETS - 1);
    /* Buckets never go back and never skip one, at every power of two. */
    for (value = 1; value <= MQS_HIST_MAX_NS; value *= 2) {
        int below = mqs_hist_index(value - 1);
        int at = mqs_hist_index(value);

        CHECK(at == below || at == below + 1);
        CHECK(at >= previous);
        previous = at;
    }
}

static void test_record_fields(void)
{
    mqs_hist_t hist;

    memset(&hist, 0, sizeof(hist));
    mqs_hist_record(&hist, 100);
    mqs_hist_record(&hist, 5000);
    mqs_hist_record(&hist, -3);
    mqs_hist_record(&hist, MQS_HIST_MAX_NS + 1000);
    CHECK_EQ(hist.count, 4);
    CHECK_EQ(hist.sum_ns, 100 + 5000 + 0 + MQS_HIST_MAX_NS);
    CHECK_EQ(hist.max_ns, MQS_HIST_MAX_NS);
    CHECK_EQ(hist.buckets[mqs_hist_index(100)], 1);
    CHECK_EQ(hist.buckets[mqs_hist_index(5000)], 1);
    CHECK_EQ(hist.buckets[0], 1);
    CHECK_EQ(hist.buckets[MQS_HIST_BUCKETS - 1], 1);

    hist.sample_every = 7;
    mqs_hist_reset(&hist);
    CHECK_EQ(hist.count, 0);
    CHECK_EQ(hist.sum_ns, 0);
    CHECK_EQ(hist.max_ns, 0);
    CHECK_EQ(hist.buckets[mqs_hist_index(100)], 0);
    CHECK_EQ(hist.sample_every, 7);
}

static void *record_many(void *arg)
{
    int64_t offset = (int64_t)(intptr_t)arg;
    int i;

    for (i = 0; i < RECORDS_PER_THREAD; i++)
        mqs_hist_record(&shared_hist, offset + i % 1000);
    return NULL;
}

static void test_threads(void)
{
    pthread_t threads[THREADS];
    int64_t total = 0;
    int64_t sum = 0;
    int i;

    memset(&shared_hist, 0, sizeof(shared_hist));
    for (i = 0; i < THREADS; i++)
        pthread_create(&threads[i], NULL, record_many,
                       (void *)(intptr_t)(i * 1000000));
    for (i = 0; i < THREADS; i++)
        pthread_join(threads[i], NULL);
    for (i = 0; i < MQS_HIST_BUCKETS; i++)
        total += shared_hist.buckets[i];
    for (i = 0; i < THREADS; i++)
        sum += (int64_t)i * 1000000 * RECORDS_PER_THREAD
               + (int64_t)(RECORDS_PER_THREAD / 1000) * (999 * 1000 / 2);
    CHECK_EQ(total, (int64_t)THREADS * RECORDS_PER_THREAD);
    CHECK_EQ(shared_hist.count, (int64_t)THREADS * RECORDS_PER_THREAD);
    CHECK_EQ(shared_hist.sum_ns, sum);
    CHECK_EQ(shared_hist.max_ns, (int64_t)(THREADS - 1) * 1000000 + 999);
}

static int print_indexes(void)
{
    char line[64];

    while (fgets(line, sizeof(line), stdin) != NULL)
        printf("%d\n", mqs_hist_index(strtoll(line, NULL, 10)));
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: test_hist units|threads|index\n");
        return 2;
    }
    if (strcmp(argv[1], "index") == 0)
        return print_indexes();
    if (strcmp(argv[1], "units") == 0) {
        test_index_bounds();
        test_record_fields();
    } else if (strcmp(argv[1], "threads") == 0) {
        test_threads();
    } else {
        fprintf(stderr, "unknown mode %s\n", argv[1]);
        return 2;
    }
    printf("%d passed, %d failed\n", atomic_load(&checks_passed),
           atomic_load(&checks_failed));
    return atomic_load(&checks_failed) ? 1 : 0;
}
