/*
 * Unit tests of csrc/mqs_ring.h and csrc/mqs_wait.h, one thread at a time
 * (the wait tests add one helper thread to park or signal).
 *
 * Build and run (tests/test_c_ring.py does this in three builds):
 *   gcc -std=c11 -O2 -Wall -Wextra -Werror -Icsrc -pthread \
 *       tests/c/test_ring.c csrc/mqs_ring.c -o test_ring && ./test_ring
 *
 * Every failed check prints its function, line and values to stderr. The
 * last line on stdout is "N passed, M failed" and the exit status is 1
 * when M > 0.
 */
#define _GNU_SOURCE

#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mqs_ring.h"
#include "mqs_wait.h"

#include "check.h"

/* Create a ring, or exit with status 2: no later check means anything
 * without it. */
static mqs_ring_t *new_ring(int64_t capacity, int flags,
                            int32_t max_consumers, int32_t max_workers)
{
    mqs_ring_t *ring = NULL;
    int rc = mqs_ring_create(&ring, capacity, flags, max_consumers,
                             max_workers);

    if (rc != MQS_OK) {
        fprintf(stderr, "mqs_ring_create(%" PRId64 ", %d, %d, %d) failed "
                "with status %d\n", capacity, flags, max_consumers,
                max_workers, rc);
        exit(2);
    }
    return ring;
}

static void *encode_value(int64_t value)
{
    return (void *)(uintptr_t)value;
}

static int64_t slot_value(mqs_ring_t *ring, int64_t seq)
{
    return (int64_t)(uintptr_t)*mqs_ring_slot(ring, seq);
}

/* Write value_of(seq) = seq * 10 + 7 into every slot of [lo, hi). */
static int64_t value_of(int64_t seq)
{
    return seq * 10 + 7;
}

static void write_range(mqs_ring_t *ring, int64_t lo, int64_t hi)
{
    for (int64_t s = lo; s < hi; s++)
        *mqs_ring_slot(ring, s) = encode_value(value_of(s));
}

/* Claim n, write value_of into the slots and publish; return the first
 * sequence, or -1 when the claim failed. */
static int64_t produce(mqs_ring_t *ring, int64_t n)
{
    int64_t lo = -1;

    if (mqs_ring_try_claim(ring, n, &lo) != MQS_OK)
        return -1;
    write_range(ring, lo, lo + n);
    mqs_ring_publish(ring, lo, lo + n);
    return lo;
}

/* Count the slots of [lo, hi) whose value is not value_of(seq). */
static int64_t count_wrong_values(mqs_ring_t *ring, int64_t lo, int64_t hi)
{
    int64_t wrong = 0;

    for (int64_t s = lo; s < hi; s++)
        if (slot_value(ring, s) != value_of(s))
            wrong++;
    return wrong;
}

static uint64_t next_random(uint64_t *state)
{
    /* xorshift64: deterministic, so a failure reproduces. */
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    return *state;
}

/* Move the ring's counters to `seq` as if that many records had passed.
 * White-box: only for an idle ring whose multi-producer markers still
 * hold their initial -1, which no lap near `seq` can match. */
static void start_ring_at(mqs_ring_t *ring, int64_t seq)
{
    int32_t n_consumers = atomic_load(&ring->n_consumers);

    mqs_store_relaxed_i64(&ring->cursor.value, seq);
    mqs_store_relaxed_i64(&ring->published.value, seq);
    mqs_store_relaxed_i64(&ring->gate_cache.value, seq);
    mqs_store_relaxed_i64(&ring->work_claim.value, seq);
    for (int32_t i = 0; i < n_consumers; i++)
        mqs_store_relaxed_i64(&ring->consumers[i].value, seq);
}

static const int producer_kinds[] = {0, MQS_RING_MULTI_PRODUCER};
#define N_PRODUCER_KINDS 2

static void test_create_rejects_bad_capacity(void)
{
    static const int64_t bad[] = {
        0, -1, -8, 3, 6, 1000, (int64_t)1 << 41, MQS_RING_MAX_CAPACITY + 1,
        INT64_MAX, INT64_MIN,
    };

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        for (int k = 0; k < N_PRODUCER_KINDS; k++) {
            mqs_ring_t *ring = NULL;
            int rc = mqs_ring_create(&ring, bad[i], producer_kinds[k], 1, 0);

            CHECK_EQ(rc, MQS_EINVAL);
            CHECK(ring == NULL);
        }
    }
}

static void test_create_accepts_powers_of_two(void)
{
    static const int64_t good[] = {1, 2, 4, 1024, 65536};

    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        for (int k = 0; k < N_PRODUCER_KINDS; k++) {
            mqs_ring_t *ring = NULL;
            int rc = mqs_ring_create(&ring, good[i], producer_kinds[k], 1, 1);

            CHECK_EQ(rc, MQS_OK);
            if (ring == NULL)
                continue;
            CHECK_EQ(ring->capacity, good[i]);
            CHECK_EQ(ring->mask, good[i] - 1);
            CHECK_EQ((int64_t)1 << ring->shift, good[i]);
            CHECK(mqs_ring_slot(ring, 0)[0] == NULL);
            CHECK(mqs_ring_slot(ring, good[i] - 1)[0] == NULL);
            mqs_ring_free(ring);
        }
    }
}

/*
 * Consumer and worker counts: each 0 to 4096, at least one of them. The
 * huge pairs prove the check cannot overflow int32 (a signed overflow
 * there is undefined behaviour that UBSan reports).
 */
static void test_create_rejects_bad_consumer_counts(void)
{
    static const int32_t bad[][2] = {
        {0, 0}, {-1, 1}, {1, -1}, {INT32_MIN, 2}, {4097, 0}, {0, 4097},
        {INT32_MAX, 1}, {1, INT32_MAX}, {INT32_MAX, INT32_MAX},
    };
    static const int32_t good[][2] = {{1, 0}, {0, 1}, {4096, 4096}};

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        mqs_ring_t *ring = NULL;
        int rc = mqs_ring_create(&ring, 8, 0, bad[i][0], bad[i][1]);

        CHECK_EQ(rc, MQS_EINVAL);
        CHECK(ring == NULL);
    }
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        mqs_ring_t *ring = NULL;
        int rc = mqs_ring_create(&ring, 2, 0, good[i][0], good[i][1]);

        CHECK_EQ(rc, MQS_OK);
        mqs_ring_free(ring);
    }
}

static void test_add_rejects_past_max(void)
{
    mqs_ring_t *ring = new_ring(8, 0, 2, 3);

    CHECK_EQ(mqs_ring_add_consumer(ring), 0);
    CHECK_EQ(mqs_ring_add_consumer(ring), 1);
    CHECK_EQ(mqs_ring_add_consumer(ring), MQS_EINVAL);
    CHECK_EQ(mqs_ring_add_consumer(ring), MQS_EINVAL);
    CHECK_EQ(mqs_ring_add_worker(ring), 0);
    CHECK_EQ(mqs_ring_add_worker(ring), 1);
    CHECK_EQ(mqs_ring_add_worker(ring), 2);
    CHECK_EQ(mqs_ring_add_worker(ring), MQS_EINVAL);
    CHECK_EQ(atomic_load(&ring->n_consumers), 2);
    CHECK_EQ(atomic_load(&ring->n_workers), 3);
    mqs_ring_free(ring);
}

static void test_size_bytes_counts_markers(void)
{
    size_t single = mqs_ring_size_bytes(1024, 0, 1, 1);
    size_t multi = mqs_ring_size_bytes(1024, MQS_RING_MULTI_PRODUCER, 1, 1);

    CHECK(single >= 1024 * sizeof(void *));
    CHECK_EQ(multi - single, 1024 * sizeof(int32_t));
    CHECK_EQ(single % MQS_PAD_BYTES, 0);
    CHECK_EQ(multi % MQS_PAD_BYTES, 0);
}

/*
 * One producer: a claimed range stays invisible until published, then a
 * poll returns exactly that range with the values written into it.
 */
static void test_single_producer_claim_publish(void)
{
    mqs_ring_t *ring = new_ring(8, 0, 1, 0);
    int consumer = mqs_ring_add_consumer(ring);
    int64_t lo = -1, hi = -1;

    CHECK_EQ(mqs_ring_try_claim(ring, 0, &lo), MQS_EINVAL);
    CHECK_EQ(mqs_ring_try_claim(ring, -1, &lo), MQS_EINVAL);
    CHECK_EQ(mqs_ring_try_claim(ring, INT64_MIN, &lo), MQS_EINVAL);

    CHECK_EQ(mqs_ring_try_claim(ring, 3, &lo), MQS_OK);
    CHECK_EQ(lo, 0);
    write_range(ring, 0, 3);
    CHECK_EQ(mqs_ring_consumer_poll(ring, consumer, 8, &lo, &hi),
             MQS_EEMPTY);

    mqs_ring_publish(ring, 0, 3);
    CHECK_EQ(mqs_ring_consumer_poll(ring, consumer, 8, &lo, &hi), MQS_OK);
    CHECK_EQ(lo, 0);
    CHECK_EQ(hi, 3);
    CHECK_EQ(count_wrong_values(ring, 0, 3), 0);

    /* Polling again without a release returns the same range. */
    CHECK_EQ(mqs_ring_consumer_poll(ring, consumer, 8, &lo, &hi), MQS_OK);
    CHECK_EQ(lo, 0);
    CHECK_EQ(hi, 3);
    mqs_ring_consumer_release(ring, consumer, hi);
    CHECK_EQ(mqs_ring_consumer_poll(ring, consumer, 8, &lo, &hi),
             MQS_EEMPTY);

    CHECK_EQ(produce(ring, 2), 3);
    CHECK_EQ(mqs_ring_consumer_poll(ring, consumer, 8, &lo, &hi), MQS_OK);
    CHECK_EQ(lo, 3);
    CHECK_EQ(hi, 5);
    CHECK_EQ(count_wrong_values(ring, 3, 5), 0);
    mqs_ring_free(ring);
}

/*
 * Several producers: claims hand out consecutive, non-overlapping ranges,
 * and a poll returns all of them once every one is published.
 */
static void test_multi_producer_claim_publish(void)
{
    mqs_ring_t *ring = new_ring(16, MQS_RING_MULTI_PRODUCER, 1, 0);
    int consumer = mqs_ring_add_consumer(ring);
    int64_t a = -1, b = -1, c = -1, lo = -1, hi = -1;

    CHECK_EQ(mqs_ring_try_claim(ring, 0, &a), MQS_EINVAL);
    CHECK_EQ(mqs_ring_try_claim(ring, 2, &a), MQS_OK);
    CHECK_EQ(mqs_ring_try_claim(ring, 3, &b), MQS_OK);
    CHECK_EQ(mqs_ring_try_claim(ring, 1, &c), MQS_OK);
    CHECK_EQ(a, 0);
    CHECK_EQ(b, 2);
    CHECK_EQ(c, 5);
    CHECK_EQ(mqs_ring_consumer_poll(ring, consumer, 16, &lo, &hi),
             MQS_EEMPTY);

    write_range(ring, 0, 6);
    mqs_ring_publish(ring, a, a + 2);
    mqs_ring_publish(ring, b, b + 3);
    mqs_ring_publish(ring, c, c + 1);
    CHECK_EQ(mqs_ring_consumer_poll(ring, consumer, 16, &lo, &hi), MQS_OK);
    CHECK_EQ(lo, 0);
    CHECK_EQ(hi, 6);
    CHECK_EQ(count_wrong_values(ring, 0, 6), 0);
    mqs_ring_free(ring);
}

static void test_claim_larger_than_capacity_is_toobig(void)
{
    for (int k = 0; k < N_PRODUCER_KINDS; k++) {
        mqs_ring_t *ring = new_ring(8, producer_kinds[k], 1, 0);
        int64_t lo = -1;

        mqs_ring_add_consumer(ring);
        CHECK_EQ(mqs_ring_try_claim(ring, 9, &lo), MQS_ETOOBIG);
        CHECK_EQ(mqs_ring_try_claim(ring, INT64_MAX, &lo), MQS_ETOOBIG);
        CHECK_EQ(lo, -1);
        CHECK_EQ(mqs_ring_try_claim(ring, 8, &lo), MQS_OK);
        CHECK_EQ(lo, 0);

        /* Too big stays too big on a full ring: no amount of waiting
         * would make it fit, so it must not look like EFULL. */
        CHECK_EQ(mqs_ring_try_claim(ring, 9, &lo), MQS_ETOOBIG);
        CHECK_EQ(mqs_ring_try_claim(ring, 1, &lo), MQS_EFULL);
        mqs_ring_free(ring);
    }
}

/*
 * EFULL exactly when the claim would move the cursor more than one
 * capacity past the slowest gate: a random walk of claims and releases,
 * each claim's status compared with the model cursor + n - gate > cap.
 * Covers both producer kinds and capacities 1, 2 and 8, so the gate cache
 * is both hit and refreshed.
 */
static void test_claim_full_exactly_one_capacity_behind(void)
{
    static const int64_t capacities[] = {1, 2, 8};
    uint64_t random_state = 0x9e3779b97f4a7c15u;

    for (int k = 0; k < N_PRODUCER_KINDS; k++) {
        for (size_t c = 0; c < 3; c++) {
            int64_t capacity = capacities[c];
            mqs_ring_t *ring = new_ring(capacity, producer_kinds[k], 1, 0);
            int consumer = mqs_ring_add_consumer(ring);
            int64_t cursor = 0, gate = 0, mismatches = 0;

            for (int step = 0; step < 20000; step++) {
                uint64_t r = next_random(&random_state);
                int64_t n = 1 + (int64_t)(r % (uint64_t)capacity);
                int64_t lo = -1, hi = -1;
                int expected, rc;

                if (r & (1u << 20)) {
                    expected = cursor + n - gate > capacity ? MQS_EFULL
                                                            : MQS_OK;
                    rc = mqs_ring_try_claim(ring, n, &lo);
                    if (rc != expected || (rc == MQS_OK && lo != cursor))
                        mismatches++;
                    if (rc == MQS_OK) {
                        write_range(ring, lo, lo + n);
                        mqs_ring_publish(ring, lo, lo + n);
                        cursor += n;
                    }
                    continue;
                }
                if (mqs_ring_consumer_poll(ring, consumer, n, &lo, &hi)
                    != MQS_OK)
                    continue;
                if (lo != gate || count_wrong_values(ring, lo, hi) != 0)
                    mismatches++;
                mqs_ring_consumer_release(ring, consumer, hi);
                gate = hi;
                if (mqs_ring_min_gate(ring) != gate)
                    mismatches++;
            }
            CHECK_EQ(mismatches, 0);
            CHECK(cursor > 1000);
            mqs_ring_free(ring);
        }
    }
}

/*
 * Broadcast: three consumers reading at different paces each see every
 * record once and in order, and the slowest one alone holds producers
 * back.
 */
static void test_broadcast_consumers_see_every_record(void)
{
    for (int k = 0; k < N_PRODUCER_KINDS; k++) {
        mqs_ring_t *ring = new_ring(8, producer_kinds[k], 3, 0);
        int64_t next_expected[3] = {0, 0, 0};
        int64_t wrong = 0, lo, hi;

        for (int i = 0; i < 3; i++)
            CHECK_EQ(mqs_ring_add_consumer(ring), i);

        /* Consumer i reads at most i + 1 records per round; consumer 2
         * reads 3 per round and keeps up with a producer writing 3. */
        for (int round = 0; round < 200; round++) {
            produce(ring, 1);
            produce(ring, 2);
            for (int i = 0; i < 3; i++) {
                if (mqs_ring_consumer_poll(ring, i, i + 1, &lo, &hi)
                    != MQS_OK)
                    continue;
                if (lo != next_expected[i])
                    wrong++;
                wrong += count_wrong_values(ring, lo, hi);
                mqs_ring_consumer_release(ring, i, hi);
                next_expected[i] = hi;
            }
        }
        CHECK_EQ(wrong, 0);
        CHECK(next_expected[2] > next_expected[0]);
        CHECK_EQ(mqs_ring_min_gate(ring), next_expected[0]);

        /* Consumer 0 is the slowest: the cursor stops a capacity ahead
         * of it even though the others have read everything. */
        while (produce(ring, 1) >= 0)
            ;
        for (int i = 1; i < 3; i++) {
            while (mqs_ring_consumer_poll(ring, i, 8, &lo, &hi) == MQS_OK)
                mqs_ring_consumer_release(ring, i, hi);
        }
        CHECK_EQ(atomic_load(&ring->cursor.value), next_expected[0] + 8);
        CHECK_EQ(produce(ring, 1), -1);

        CHECK_EQ(mqs_ring_consumer_poll(ring, 0, 1, &lo, &hi), MQS_OK);
        mqs_ring_consumer_release(ring, 0, hi);
        CHECK_EQ(produce(ring, 1), next_expected[0] + 8);
        mqs_ring_free(ring);
    }
}

/*
 * Work pool: three workers each get a disjoint range, a worker holding a
 * range gates the producers from its start, and releasing lets them on.
 */
static void test_work_pool_ranges_are_disjoint(void)
{
    for (int k = 0; k < N_PRODUCER_KINDS; k++) {
        mqs_ring_t *ring = new_ring(16, producer_kinds[k], 0, 3);
        int64_t lo[3], hi[3];

        for (int i = 0; i < 3; i++)
            CHECK_EQ(mqs_ring_add_worker(ring), i);
        CHECK_EQ(produce(ring, 10), 0);

        for (int i = 0; i < 3; i++)
            CHECK_EQ(mqs_ring_work_claim(ring, i, 4, &lo[i], &hi[i]),
                     MQS_OK);
        CHECK_EQ(lo[0], 0);
        CHECK_EQ(hi[0], 4);
        CHECK_EQ(lo[1], 4);
        CHECK_EQ(hi[1], 8);
        CHECK_EQ(lo[2], 8);
        CHECK_EQ(hi[2], 10);
        for (int i = 0; i < 3; i++)
            CHECK_EQ(count_wrong_values(ring, lo[i], hi[i]), 0);

        CHECK_EQ(mqs_ring_min_gate(ring), 0);
        mqs_ring_work_release(ring, 0);
        CHECK_EQ(mqs_ring_min_gate(ring), 4);
        mqs_ring_work_release(ring, 2);
        CHECK_EQ(mqs_ring_min_gate(ring), 4);
        mqs_ring_work_release(ring, 1);
        CHECK_EQ(mqs_ring_min_gate(ring), 10);

        for (int i = 0; i < 3; i++)
            CHECK_EQ(mqs_ring_work_claim(ring, i, 4, &lo[i], &hi[i]),
                     MQS_EEMPTY);

        /* Worker 1 holds [10, 12): the cursor may reach 10 + 16 only. */
        CHECK_EQ(produce(ring, 2), 10);
        CHECK_EQ(mqs_ring_work_claim(ring, 1, 16, &lo[1], &hi[1]), MQS_OK);
        CHECK_EQ(lo[1], 10);
        CHECK_EQ(hi[1], 12);
        CHECK_EQ(produce(ring, 14), 12);
        CHECK_EQ(produce(ring, 1), -1);
        mqs_ring_work_release(ring, 1);
        CHECK_EQ(produce(ring, 2), 26);
        mqs_ring_free(ring);
    }
}

/*
 * A registered worker that never claims does not gate: its sequence
 * stays MQS_RING_IDLE, so one busy worker drives 50 laps of a 4-slot
 * ring.
 */
static void test_work_pool_idle_worker_does_not_gate(void)
{
    for (int k = 0; k < N_PRODUCER_KINDS; k++) {
        mqs_ring_t *ring = new_ring(4, producer_kinds[k], 0, 2);
        int busy = mqs_ring_add_worker(ring);
        int64_t failures = 0, lo, hi;

        mqs_ring_add_worker(ring);
        for (int lap = 0; lap < 50; lap++) {
            if (produce(ring, 4) != lap * 4)
                failures++;
            if (mqs_ring_work_claim(ring, busy, 4, &lo, &hi) != MQS_OK
                || lo != lap * 4 || hi != lap * 4 + 4
                || count_wrong_values(ring, lo, hi) != 0)
                failures++;
            mqs_ring_work_release(ring, busy);
        }
        CHECK_EQ(failures, 0);
        CHECK_EQ(atomic_load(&ring->workers[1].value), MQS_RING_IDLE);
        CHECK_EQ(mqs_ring_min_gate(ring), 200);
        mqs_ring_free(ring);
    }
}

/*
 * Batch reads: one poll returns every record published past the reader,
 * however many claims they came from, capped only by max_n. A max_n of
 * INT64_MAX means "all of them" and must not overflow the limit; a max_n
 * below 1 is rejected instead of returning a range with hi < lo.
 */
static void test_batch_poll_returns_all_published(void)
{
    for (int k = 0; k < N_PRODUCER_KINDS; k++) {
        mqs_ring_t *ring = new_ring(16, producer_kinds[k], 1, 1);
        int consumer = mqs_ring_add_consumer(ring);
        int worker = mqs_ring_add_worker(ring);
        int64_t lo = -1, hi = -1;

        /* Move both readers off 0 first, so next + max_n can overflow. */
        produce(ring, 3);
        CHECK_EQ(mqs_ring_consumer_poll(ring, consumer, 16, &lo, &hi),
                 MQS_OK);
        mqs_ring_consumer_release(ring, consumer, hi);
        CHECK_EQ(mqs_ring_work_claim(ring, worker, 16, &lo, &hi), MQS_OK);
        mqs_ring_work_release(ring, worker);

        for (int i = 0; i < 7; i++)
            produce(ring, 1);
        CHECK_EQ(mqs_ring_consumer_poll(ring, consumer, 2, &lo, &hi),
                 MQS_OK);
        CHECK_EQ(lo, 3);
        CHECK_EQ(hi, 5);
        CHECK_EQ(mqs_ring_consumer_poll(ring, consumer, INT64_MAX, &lo,
                                        &hi), MQS_OK);
        CHECK_EQ(lo, 3);
        CHECK_EQ(hi, 10);
        CHECK_EQ(count_wrong_values(ring, lo, hi), 0);

        CHECK_EQ(mqs_ring_work_claim(ring, worker, INT64_MAX, &lo, &hi),
                 MQS_OK);
        CHECK_EQ(lo, 3);
        CHECK_EQ(hi, 10);
        mqs_ring_work_release(ring, worker);

        CHECK_EQ(mqs_ring_consumer_poll(ring, consumer, 0, &lo, &hi),
                 MQS_EINVAL);
        CHECK_EQ(mqs_ring_consumer_poll(ring, consumer, -1, &lo, &hi),
                 MQS_EINVAL);
        CHECK_EQ(mqs_ring_consumer_poll(ring, consumer, INT64_MIN, &lo,
                                        &hi), MQS_EINVAL);
        CHECK_EQ(mqs_ring_work_claim(ring, worker, 0, &lo, &hi),
                 MQS_EINVAL);
        CHECK_EQ(mqs_ring_work_claim(ring, worker, -1, &lo, &hi),
                 MQS_EINVAL);
        CHECK_EQ(atomic_load(&ring->consumers[consumer].value), 3);
        CHECK_EQ(atomic_load(&ring->work_claim.value), 10);
        mqs_ring_free(ring);
    }
}

/*
 * Multi-producer publish out of claim order: readers stop at the first
 * claimed but unpublished slot even when later slots are published, and
 * get the rest once the gap is filled. Checked on the first lap and again
 * after wrapping, where the unpublished slot still contains the old
 * lap's marker.
 */
static void test_multi_producer_reader_stops_at_unpublished(void)
{
    for (int64_t start_lap = 0; start_lap < 3; start_lap += 2) {
        mqs_ring_t *ring = new_ring(8, MQS_RING_MULTI_PRODUCER, 1, 1);
        int consumer = mqs_ring_add_consumer(ring);
        int worker = mqs_ring_add_worker(ring);
        int64_t base = start_lap * 8, a = -1, b = -1, c = -1;
        int64_t lo = -1, hi = -1;

        for (int64_t i = 0; i < start_lap; i++) {
            produce(ring, 8);
            mqs_ring_consumer_poll(ring, consumer, 8, &lo, &hi);
            mqs_ring_consumer_release(ring, consumer, hi);
            mqs_ring_work_claim(ring, worker, 8, &lo, &hi);
            mqs_ring_work_release(ring, worker);
        }

        CHECK_EQ(mqs_ring_try_claim(ring, 2, &a), MQS_OK);
        CHECK_EQ(mqs_ring_try_claim(ring, 3, &b), MQS_OK);
        CHECK_EQ(mqs_ring_try_claim(ring, 1, &c), MQS_OK);
        CHECK_EQ(a, base);
        write_range(ring, a, c + 1);

        mqs_ring_publish(ring, c, c + 1);
        CHECK_EQ(mqs_ring_highest_published(ring, base, base + 8), base);
        CHECK_EQ(mqs_ring_consumer_poll(ring, consumer, 8, &lo, &hi),
                 MQS_EEMPTY);
        CHECK_EQ(mqs_ring_work_claim(ring, worker, 8, &lo, &hi),
                 MQS_EEMPTY);

        mqs_ring_publish(ring, a, a + 2);
        CHECK_EQ(mqs_ring_highest_published(ring, base, base + 8), b);
        CHECK_EQ(mqs_ring_consumer_poll(ring, consumer, 8, &lo, &hi),
                 MQS_OK);
        CHECK_EQ(lo, base);
        CHECK_EQ(hi, b);
        mqs_ring_consumer_release(ring, consumer, hi);
        CHECK_EQ(mqs_ring_work_claim(ring, worker, 8, &lo, &hi), MQS_OK);
        CHECK_EQ(hi, b);
        mqs_ring_work_release(ring, worker);
        CHECK_EQ(mqs_ring_consumer_poll(ring, consumer, 8, &lo, &hi),
                 MQS_EEMPTY);

        mqs_ring_publish(ring, b, b + 3);
        CHECK_EQ(mqs_ring_consumer_poll(ring, consumer, 8, &lo, &hi),
                 MQS_OK);
        CHECK_EQ(lo, b);
        CHECK_EQ(hi, c + 1);
        CHECK_EQ(count_wrong_values(ring, base, c + 1), 0);
        CHECK_EQ(mqs_ring_work_claim(ring, worker, 8, &lo, &hi), MQS_OK);
        CHECK_EQ(lo, b);
        CHECK_EQ(hi, c + 1);
        mqs_ring_free(ring);
    }
}

/* Push `total` records through `ring` in random batches, while one
 * consumer and one worker read them in random batches. Return how many
 * records were read out of order or with a wrong value. */
static int64_t run_laps(mqs_ring_t *ring, int64_t total, uint64_t seed)
{
    int consumer = mqs_ring_add_consumer(ring);
    int worker = mqs_ring_add_worker(ring);
    int64_t start = atomic_load(&ring->cursor.value);
    int64_t produced = start, consumed = start, taken = start;
    int64_t wrong = 0, lo, hi;
    uint64_t random_state = seed;

    while (consumed < start + total || taken < start + total) {
        int64_t n = 1 + (int64_t)(next_random(&random_state)
                                  % (uint64_t)ring->capacity);

        if (n > start + total - produced)
            n = start + total - produced;
        if (n > 0 && produce(ring, n) >= 0)
            produced += n;
        n = 1 + (int64_t)(next_random(&random_state)
                          % (uint64_t)ring->capacity);
        if (mqs_ring_consumer_poll(ring, consumer, n, &lo, &hi) == MQS_OK) {
            if (lo != consumed)
                wrong++;
            wrong += count_wrong_values(ring, lo, hi);
            mqs_ring_consumer_release(ring, consumer, hi);
            consumed = hi;
        }
        if (mqs_ring_work_claim(ring, worker, n, &lo, &hi) == MQS_OK) {
            if (lo != taken)
                wrong++;
            wrong += count_wrong_values(ring, lo, hi);
            mqs_ring_work_release(ring, worker);
            taken = hi;
        }
    }
    return wrong + (produced != consumed) + (consumed != taken);
}

/*
 * Many laps: with capacities 1, 2 and 8 the slot index and the lap marker
 * wrap thousands of times and every record still arrives once, in order,
 * with its value. Capacity 1 has shift 0, so its lap marker is the
 * sequence itself.
 */
static void test_sequences_wrap_over_many_laps(void)
{
    static const int64_t capacities[] = {1, 2, 8};

    for (int k = 0; k < N_PRODUCER_KINDS; k++) {
        for (size_t c = 0; c < 3; c++) {
            mqs_ring_t *ring = new_ring(capacities[c], producer_kinds[k],
                                        1, 1);

            CHECK_EQ(run_laps(ring, 20000, 12345 + c), 0);
            CHECK_EQ(atomic_load(&ring->cursor.value), 20000);
            mqs_ring_free(ring);
        }
    }
}

/*
 * Sequences past 2**32 and lap numbers past INT32_MAX: the int32 lap
 * marker wraps to negative values and must still match exactly.
 */
static void test_sequences_past_int32_laps(void)
{
    static const int64_t capacities[] = {1, 8};

    for (int k = 0; k < N_PRODUCER_KINDS; k++) {
        for (size_t c = 0; c < 2; c++) {
            int64_t capacity = capacities[c];
            int64_t start = ((int64_t)INT32_MAX - 40) * capacity;
            mqs_ring_t *ring = new_ring(capacity, producer_kinds[k], 1, 1);

            start_ring_at(ring, start);
            CHECK_EQ(run_laps(ring, 200 * capacity, 99 + c), 0);
            CHECK_EQ(atomic_load(&ring->cursor.value),
                     start + 200 * capacity);
            mqs_ring_free(ring);
        }
    }
}

/*
 * Reset rewinds every counter and marker: after it a claim starts at 0,
 * and an old lap-0 marker left in a slot must not make sequence 0 look
 * published before it is.
 */
static void test_reset_rewinds_ring(void)
{
    for (int k = 0; k < N_PRODUCER_KINDS; k++) {
        mqs_ring_t *ring = new_ring(8, producer_kinds[k], 1, 1);
        int consumer = mqs_ring_add_consumer(ring);
        int worker = mqs_ring_add_worker(ring);
        int64_t lo = -1, hi = -1;

        produce(ring, 5);
        mqs_ring_consumer_poll(ring, consumer, 8, &lo, &hi);
        mqs_ring_consumer_release(ring, consumer, hi);
        mqs_ring_work_claim(ring, worker, 3, &lo, &hi);

        mqs_ring_reset(ring);
        CHECK_EQ(atomic_load(&ring->cursor.value), 0);
        CHECK_EQ(atomic_load(&ring->consumers[consumer].value), 0);
        CHECK_EQ(atomic_load(&ring->workers[worker].value), MQS_RING_IDLE);
        CHECK_EQ(atomic_load(&ring->work_claim.value), 0);
        CHECK_EQ(mqs_ring_min_gate(ring), 0);
        CHECK_EQ(atomic_load(&ring->n_consumers), 1);
        CHECK_EQ(atomic_load(&ring->n_workers), 1);

        CHECK_EQ(mqs_ring_try_claim(ring, 2, &lo), MQS_OK);
        CHECK_EQ(lo, 0);
        CHECK_EQ(mqs_ring_consumer_poll(ring, consumer, 8, &lo, &hi),
                 MQS_EEMPTY);
        CHECK_EQ(mqs_ring_work_claim(ring, worker, 8, &lo, &hi),
                 MQS_EEMPTY);
        write_range(ring, 0, 2);
        mqs_ring_publish(ring, 0, 2);
        CHECK_EQ(mqs_ring_consumer_poll(ring, consumer, 8, &lo, &hi),
                 MQS_OK);
        CHECK_EQ(lo, 0);
        CHECK_EQ(hi, 2);
        CHECK_EQ(mqs_ring_work_claim(ring, worker, 8, &lo, &hi), MQS_OK);
        CHECK_EQ(lo, 0);
        CHECK_EQ(hi, 2);

        /* The gates still count after the reset: a full ring is full. */
        mqs_ring_work_release(ring, worker);
        CHECK_EQ(produce(ring, 6), 2);
        CHECK_EQ(produce(ring, 1), -1);
        mqs_ring_free(ring);
    }
}

/*
 * A worker added after producers went round the ring with no gate at all
 * must not read the overwritten slots from sequence 0: the pool starts at
 * the cursor, as a broadcast consumer does, and gates from then on. Also
 * with a broadcast consumer already gating, where the records before the
 * worker were read by the consumer only.
 */
static void test_first_worker_starts_at_cursor(void)
{
    for (int k = 0; k < N_PRODUCER_KINDS; k++) {
        for (int32_t consumers = 0; consumers < 2; consumers++) {
            mqs_ring_t *ring = new_ring(4, producer_kinds[k], consumers, 1);
            int64_t lo = -1, hi = -1;
            int worker;

            if (consumers == 1)
                mqs_ring_add_consumer(ring);
            for (int64_t i = 0; i < 10; i++) {
                CHECK_EQ(produce(ring, 1), i);
                if (consumers == 1) {
                    mqs_ring_consumer_poll(ring, 0, 4, &lo, &hi);
                    mqs_ring_consumer_release(ring, 0, hi);
                }
            }

            worker = mqs_ring_add_worker(ring);
            CHECK_EQ(worker, 0);
            CHECK_EQ(mqs_ring_work_claim(ring, worker, 16, &lo, &hi),
                     MQS_EEMPTY);
            CHECK_EQ(produce(ring, 4), 10);
            CHECK_EQ(produce(ring, 1), -1);
            CHECK_EQ(mqs_ring_work_claim(ring, worker, 16, &lo, &hi),
                     MQS_OK);
            CHECK_EQ(lo, 10);
            CHECK_EQ(hi, 14);
            CHECK_EQ(count_wrong_values(ring, lo, hi), 0);
            mqs_ring_free(ring);
        }
    }
}

/* Wait tests ------------------------------------------------------------ */

static void test_wait_signal_without_waiters_keeps_epoch(void)
{
    mqs_waitword_t word;

    mqs_wait_init(&word);
    mqs_wait_signal(&word, 0);
    mqs_wait_signal_locked(&word, 1);
    CHECK_EQ(atomic_load(&word.epoch), 0);
    CHECK_EQ(atomic_load(&word.waiters), 0);
}

/*
 * A signal after prepare moves the epoch, so park returns MQS_OK at once
 * instead of sleeping for its timeout, whatever the timeout (INT64_MAX
 * included: computing its deadline must not overflow).
 */
static void test_wait_park_returns_ok_when_epoch_moved(void)
{
    static const int64_t timeouts_ns[] = {0, 1000000000, INT64_MAX};

    for (int shared = 0; shared < 2; shared++) {
        for (size_t i = 0; i < 3; i++) {
            mqs_waitword_t word;
            uint32_t epoch;
            int64_t start_ns;

            mqs_wait_init(&word);
            epoch = mqs_wait_prepare(&word);
            CHECK_EQ(atomic_load(&word.waiters), 1);
            mqs_wait_signal(&word, shared);
            CHECK_EQ(atomic_load(&word.epoch), epoch + 1);

            start_ns = mqs_monotonic_ns();
            CHECK_EQ(mqs_wait_park(&word, epoch, timeouts_ns[i], shared),
                     MQS_OK);
            CHECK(mqs_monotonic_ns() - start_ns < 500000000);
            mqs_wait_finish(&word);
            CHECK_EQ(atomic_load(&word.waiters), 0);
            CHECK_EQ(atomic_load(&word.sleepers), 0);
        }
    }
}

/*
 * With no signal, park returns MQS_ETIMEDOUT and never before the
 * timeout: checked from 0 ns up to 20 ms, which covers the spin, yield
 * and futex phases. Negative timeouts, INT64_MIN included, count as 0
 * and must not overflow into a long sleep.
 */
static void test_wait_park_times_out_not_before_deadline(void)
{
    static const int64_t timeouts_ns[] = {
        INT64_MIN, -1000, 0, 1000, 100000, 1000000, 5000000, 20000000,
    };

    for (int shared = 0; shared < 2; shared++) {
        for (size_t i = 0; i < sizeof(timeouts_ns) / sizeof(timeouts_ns[0]);
             i++) {
            mqs_waitword_t word;
            uint32_t epoch;
            int64_t start_ns, elapsed_ns;
            int rc;

            mqs_wait_init(&word);
            epoch = mqs_wait_prepare(&word);
            start_ns = mqs_monotonic_ns();
            rc = mqs_wait_park(&word, epoch, timeouts_ns[i], shared);
            elapsed_ns = mqs_monotonic_ns() - start_ns;
            mqs_wait_finish(&word);

            CHECK_EQ(rc, MQS_ETIMEDOUT);
            CHECK(elapsed_ns >= timeouts_ns[i]);
            CHECK_EQ(atomic_load(&word.sleepers), 0);
        }
    }
}

struct parker {
    mqs_waitword_t word;
    _Atomic int condition;
    int shared;
    int result;
    int64_t woken_after_ns;
};

/* Wait for `condition` the documented way: prepare, re-check, park. */
static void *park_until_condition(void *arg)
{
    struct parker *p = arg;
    int64_t start_ns = mqs_monotonic_ns();
    int64_t timeout_ns = 5000000000;
    uint32_t epoch = mqs_wait_prepare(&p->word);

    p->result = MQS_OK;
    while (!atomic_load(&p->condition)) {
        int64_t left = start_ns + timeout_ns - mqs_monotonic_ns();

        p->result = mqs_wait_park(&p->word, epoch, left, p->shared);
        if (p->result == MQS_ETIMEDOUT)
            break;
        epoch = atomic_load(&p->word.epoch);
    }
    mqs_wait_finish(&p->word);
    p->woken_after_ns = mqs_monotonic_ns() - start_ns;
    return NULL;
}

/* Spin until a thread sleeps on the futex, for at most 5 s. */
static int wait_for_sleeper(mqs_waitword_t *word)
{
    int64_t deadline_ns = mqs_monotonic_ns() + 5000000000;

    while (atomic_load(&word->sleepers) == 0) {
        if (mqs_monotonic_ns() > deadline_ns)
            return 0;
        sched_yield();
    }
    return 1;
}

/*
 * A thread asleep in the kernel (sleepers == 1) is woken by a signal
 * from another thread well before its 5 s timeout.
 */
static void test_wait_signal_wakes_sleeping_thread(void)
{
    for (int shared = 0; shared < 2; shared++) {
        struct parker p;
        pthread_t thread;

        memset(&p, 0, sizeof(p));
        mqs_wait_init(&p.word);
        atomic_init(&p.condition, 0);
        p.shared = shared;
        if (pthread_create(&thread, NULL, park_until_condition, &p) != 0) {
            fprintf(stderr, "pthread_create failed\n");
            exit(2);
        }
        CHECK(wait_for_sleeper(&p.word));

        atomic_store(&p.condition, 1);
        mqs_wait_signal(&p.word, shared);
        pthread_join(thread, NULL);

        CHECK_EQ(p.result, MQS_OK);
        CHECK(p.woken_after_ns < 4000000000);
        CHECK_EQ(atomic_load(&p.word.waiters), 0);
        CHECK_EQ(atomic_load(&p.word.sleepers), 0);
    }
}

static void ignore_signal(int signo)
{
    (void)signo;
}

struct interrupted {
    mqs_waitword_t word;
    _Atomic int done;
    int result;
};

static void *park_once(void *arg)
{
    struct interrupted *p = arg;
    uint32_t epoch = mqs_wait_prepare(&p->word);

    p->result = mqs_wait_park(&p->word, epoch, 5000000000, 0);
    mqs_wait_finish(&p->word);
    atomic_store(&p->done, 1);
    return NULL;
}

/*
 * A signal handled while the waiter sleeps ends the park with MQS_EINTR,
 * so a caller can run its signal checks (Ctrl-C in Python). The signal is
 * sent every 10 ms, because the first one may land between sleepers++
 * and the futex system call.
 */
static void test_wait_park_returns_eintr_on_signal(void)
{
    struct sigaction action, previous;
    struct timespec pause = {0, 10000000};
    struct interrupted p;
    pthread_t thread;
    int64_t deadline_ns;

    memset(&action, 0, sizeof(action));
    action.sa_handler = ignore_signal;
    sigemptyset(&action.sa_mask);
    sigaction(SIGUSR1, &action, &previous);

    memset(&p, 0, sizeof(p));
    mqs_wait_init(&p.word);
    atomic_init(&p.done, 0);
    if (pthread_create(&thread, NULL, park_once, &p) != 0) {
        fprintf(stderr, "pthread_create failed\n");
        exit(2);
    }
    CHECK(wait_for_sleeper(&p.word));
    deadline_ns = mqs_monotonic_ns() + 4000000000;
    while (!atomic_load(&p.done) && mqs_monotonic_ns() < deadline_ns) {
        pthread_kill(thread, SIGUSR1);
        nanosleep(&pause, NULL);
    }
    pthread_join(thread, NULL);
    sigaction(SIGUSR1, &previous, NULL);

    CHECK_EQ(p.result, MQS_EINTR);
}

int main(void)
{
    /* A hang (a park that never returns) kills the run with SIGALRM
     * instead of blocking the test driver until its own timeout. */
    alarm(60);
    test_create_rejects_bad_capacity();
    test_create_accepts_powers_of_two();
    test_create_rejects_bad_consumer_counts();
    test_add_rejects_past_max();
    test_size_bytes_counts_markers();
    test_single_producer_claim_publish();
    test_multi_producer_claim_publish();
    test_claim_larger_than_capacity_is_toobig();
    test_claim_full_exactly_one_capacity_behind();
    test_broadcast_consumers_see_every_record();
    test_work_pool_ranges_are_disjoint();
    test_work_pool_idle_worker_does_not_gate();
    test_batch_poll_returns_all_published();
    test_multi_producer_reader_stops_at_unpublished();
    test_sequences_wrap_over_many_laps();
    test_sequences_past_int32_laps();
    test_reset_rewinds_ring();
    test_first_worker_starts_at_cursor();
    test_wait_signal_without_waiters_keeps_epoch();
    test_wait_park_returns_ok_when_epoch_moved();
    test_wait_park_times_out_not_before_deadline();
    test_wait_signal_wakes_sleeping_thread();
    test_wait_park_returns_eintr_on_signal();

    printf("%d passed, %d failed\n", atomic_load(&checks_passed),
           atomic_load(&checks_failed));
    return atomic_load(&checks_failed) == 0 ? 0 : 1;
}
