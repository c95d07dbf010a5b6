/*
 * test_topiccore.c: the shared topic core (csrc/mqs_topiccore.h).
 *
 *   test_topiccore units           single-process rules
 *   test_topiccore crash POINT     a child killed at failpoint POINT while
 *                                  it holds the mutex; the parent repairs
 *                                  and checks that nothing was lost
 *   test_topiccore threads N       a producer and a consumer thread move
 *                                  N messages, each acked exactly once
 *
 * Built with -DMQS_FAILPOINTS=1 (tests/test_c_topiccore.py).
 */
#define _GNU_SOURCE
#include "check.h"
#include "mqs_topiccore.h"

#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define NOW 100.0

static mqs_tc_params_t params_of(uint32_t capacity, uint32_t lanes,
                                 int strict)
{
    mqs_tc_params_t p;

    memset(&p, 0, sizeof(p));
    p.capacity = capacity;
    p.slot_bytes = 64;
    p.max_groups = 4;
    p.max_consumers = 8;
    p.lane_count = lanes;
    for (uint32_t i = 0; i < lanes; i++) {
        p.lanes[i] = 9 - (int32_t)i * 4;      /* 9, 5, 1 */
        p.weights[i] = lanes - i;              /* 3, 2, 1 */
    }
    p.strict = (uint32_t)strict;
    return p;
}

/* A formatted topic in MAP_SHARED memory, so a forked child shares it. */
static mqs_tc_header_t *topic_new(const mqs_tc_params_t *p, uint64_t *bytes)
{
    uint64_t size = mqs_tc_layout_bytes(p);
    void *at;

    CHECK(size > 0);
    at = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
              -1, 0);
    if (at == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    CHECK_EQ(mqs_tc_format(at, p), MQS_OK);
    CHECK_EQ(mqs_tc_validate(at, size), MQS_OK);
    if (bytes != NULL)
        *bytes = size;
    return at;
}

static void topic_free(mqs_tc_header_t *h, const mqs_tc_params_t *p)
{
    pthread_mutex_destroy(&h->lock.v);
    munmap(h, mqs_tc_layout_bytes(p));
}

static int64_t publish_number(mqs_tc_header_t *h, uint32_t number,
                              uint32_t priority)
{
    return mqs_tc_publish(h, &number, sizeof(number), priority, 1.0, NOW,
                          NULL);
}

static uint32_t number_of(const mqs_tc_delivery_t *d)
{
    uint32_t number;

    memcpy(&number, d->body, sizeof(number));
    return number;
}

static int64_t counter(mqs_tc_header_t *h, int which)
{
    return h->state.v.counters[which];
}

/* The build links with -Wl,--wrap=malloc, so every malloc call of the
 * core and of this file comes here, and a test can make it fail. */
void *__real_malloc(size_t size);
void *__wrap_malloc(size_t size);
static int malloc_fails;

void *__wrap_malloc(size_t size)
{
    if (malloc_fails)
        return NULL;
    return __real_malloc(size);
}

static void test_layout_rejects_bad_params(void)
{
    mqs_tc_params_t p = params_of(16, 3, 0);

    CHECK(mqs_tc_layout_bytes(&p) > 0);
    p.capacity = 0;
    CHECK_EQ(mqs_tc_layout_bytes(&p), 0);
    p = params_of(16, 3, 0);
    p.lanes[1] = 9;                            /* not descending */
    CHECK_EQ(mqs_tc_layout_bytes(&p), 0);
    p = params_of(16, 3, 0);
    p.weights[2] = 0;
    CHECK_EQ(mqs_tc_layout_bytes(&p), 0);
}

static void test_publish_fetch_ack(void)
{
    mqs_tc_params_t p = params_of(8, 1, 0);
    mqs_tc_header_t *h = topic_new(&p, NULL);
    mqs_tc_delivery_t out[8];
    mqs_tc_stats_t stats;
    int64_t g = mqs_tc_open_group(h, "g", 1, 0, NOW);
    int64_t c = mqs_tc_open_consumer(h, (uint32_t)g, 4, 7, NOW);

    CHECK_EQ(g, 0);
    CHECK_EQ(mqs_tc_open_group(h, "g", 1, 0, NOW), 0);
    CHECK_EQ(c, 0);
    for (uint32_t i = 0; i < 6; i++)
        CHECK_EQ(publish_number(h, i, 0), i + 1);
    /* Prefetch 4 caps the batch. */
    CHECK_EQ(mqs_tc_fetch(h, 0, 8, 30.0, 0, NOW, out), 4);
    for (uint32_t i = 0; i < 4; i++) {
        CHECK_EQ(number_of(&out[i]), i);
        CHECK_EQ(out[i].attempts, 1);
        CHECK_EQ(out[i].seq, i + 1);
    }
    CHECK_EQ(mqs_tc_fetch(h, 0, 8, 30.0, 0, NOW, out + 4), 0);
    CHECK_EQ(mqs_tc_ack(h, 0, out[0].slot, out[0].ticket, NOW), 1);
    CHECK_EQ(mqs_tc_ack(h, 0, out[0].slot, out[0].ticket, NOW), 0);
    CHECK_EQ(counter(h, MQS_TC_LATE_ACKS), 1);
    CHECK_EQ(mqs_tc_fetch(h, 0, 8, 30.0, 0, NOW, out + 4), 1);
    CHECK_EQ(number_of(&out[4]), 4);
    mqs_tc_stats(h, &stats);
    CHECK_EQ(stats.stored, 5);
    CHECK_EQ(stats.ready, 1);
    CHECK_EQ(stats.in_flight, 4);
    /* The topic has 8 slots: 5 stored, so 3 more fit. */
    CHECK_EQ(publish_number(h, 6, 0), 7);
    CHECK_EQ(publish_number(h, 7, 0), 8);
    CHECK_EQ(publish_number(h, 8, 0), 9);
    CHECK_EQ(publish_number(h, 9, 0), MQS_EFULL);
    CHECK_EQ(mqs_tc_fetch(h, 1, 1, 30.0, 0, NOW, out), MQS_ECLOSED);
    CHECK_EQ(counter(h, MQS_TC_PUBLISHED), 9);
    CHECK_EQ(counter(h, MQS_TC_DELIVERED), 5);
    CHECK_EQ(counter(h, MQS_TC_ACKED), 1);
    topic_free(h, &p);
}

/* mqs_tc_may_fetch is 0 only when a fetch by the consumer would find
 * nothing and raise nothing. */
static void test_may_fetch(void)
{
    mqs_tc_params_t p = params_of(8, 1, 0);
    mqs_tc_header_t *h = topic_new(&p, NULL);
    mqs_tc_delivery_t out[2];
    mqs_tc_dead_t dead;

    CHECK_EQ(mqs_tc_open_group(h, "g", 1, 0, NOW), 0);
    CHECK_EQ(mqs_tc_open_group(h, "h", 1, 0, NOW), 1);
    CHECK_EQ(mqs_tc_open_consumer(h, 0, 1, 7, NOW), 0);
    CHECK_EQ(mqs_tc_may_fetch(h, 0, 0, 7, 0, NOW), 0);
    CHECK_EQ(mqs_tc_may_fetch(h, 0, 0, 0, 0, NOW), 0);
    /* The fetch would raise: another group, owner or consumer. */
    CHECK_EQ(mqs_tc_may_fetch(h, 0, 1, 7, 0, NOW), 1);
    CHECK_EQ(mqs_tc_may_fetch(h, 0, 0, 8, 0, NOW), 1);
    CHECK_EQ(mqs_tc_may_fetch(h, 1, 0, 7, 0, NOW), 1);
    CHECK_EQ(mqs_tc_may_fetch(h, 99, 0, 7, 0, NOW), 1);
    publish_number(h, 1, 0);
    CHECK_EQ(mqs_tc_may_fetch(h, 0, 0, 7, 0, NOW), 1);
    CHECK_EQ(mqs_tc_fetch(h, 0, 1, 1.0, 0, NOW, out), 1);
    publish_number(h, 2, 0);
    /* Ready, but prefetch 1 is used up, unless the fetch auto-acks. */
    CHECK_EQ(mqs_tc_may_fetch(h, 0, 0, 7, 0, NOW), 0);
    CHECK_EQ(mqs_tc_may_fetch(h, 0, 0, 7, 1, NOW), 1);
    /* The in-flight message's deadline is due. */
    CHECK_EQ(mqs_tc_may_fetch(h, 0, 0, 7, 0, NOW + 1.0), 1);
    CHECK_EQ(mqs_tc_ack(h, 0, out[0].slot, out[0].ticket, NOW), 1);
    CHECK_EQ(mqs_tc_may_fetch(h, 0, 0, 7, 0, NOW), 1);
    /* A dead letter waits for collection. */
    CHECK_EQ(mqs_tc_fetch(h, 0, 1, 1.0, 0, NOW, out), 1);
    CHECK_EQ(mqs_tc_nack(h, 0, out[0].slot, out[0].ticket, 0, NOW), 1);
    CHECK_EQ(mqs_tc_may_fetch(h, 0, 0, 7, 0, NOW), 1);
    CHECK_EQ(mqs_tc_next_dead(h, &dead), 1);
    mqs_tc_drop_dead(h, dead.group, dead.slot);
    CHECK_EQ(mqs_tc_may_fetch(h, 0, 0, 7, 0, NOW), 0);
    atomic_store(&h->state.v.retired, 1);
    CHECK_EQ(mqs_tc_may_fetch(h, 0, 0, 7, 0, NOW), 1);
    topic_free(h, &p);
}

static void test_weighted_and_strict_lanes(void)
{
    for (int strict = 0; strict <= 1; strict++) {
        mqs_tc_params_t p = params_of(64, 3, strict);
        mqs_tc_header_t *h = topic_new(&p, NULL);
        mqs_tc_delivery_t out[64];
        uint32_t priorities[3] = {9, 5, 0};
        int64_t n;

        mqs_tc_open_group(h, "g", 1, 0, NOW);
        mqs_tc_open_consumer(h, 0, 64, 1, NOW);
        for (uint32_t i = 0; i < 30; i++)
            publish_number(h, i, priorities[i % 3]);
        n = mqs_tc_fetch(h, 0, 12, 30.0, 1, NOW, out);
        CHECK_EQ(n, 12);
        if (strict) {
            /* Only lane 9 until it is empty. */
            for (int i = 0; i < 10; i++)
                CHECK_EQ(out[i].priority, 9);
            CHECK_EQ(out[10].priority, 5);
        } else {
            /* Weights 3:2:1 in rounds of 6, the first round starting
             * at the highest lane. */
            uint32_t first_round[6] = {9, 9, 9, 5, 5, 0};
            for (int i = 0; i < 6; i++)
                CHECK_EQ(out[i].priority, first_round[i]);
            int per_lane[10] = {0};
            for (int i = 0; i < 12; i++)
                per_lane[out[i].priority]++;
            CHECK_EQ(per_lane[9], 6);
            CHECK_EQ(per_lane[5], 4);
            CHECK_EQ(per_lane[0], 2);
        }
        /* FIFO within each lane. */
        uint32_t last[10] = {0};
        int seen[10] = {0};
        for (int i = 0; i < 12; i++) {
            uint32_t number = number_of(&out[i]);
            if (seen[out[i].priority])
                CHECK(number > last[out[i].priority]);
            seen[out[i].priority] = 1;
            last[out[i].priority] = number;
        }
        topic_free(h, &p);
    }
}

static void test_deadline_redelivers_then_dead_letters(void)
{
    mqs_tc_params_t p = params_of(8, 1, 0);
    mqs_tc_header_t *h = topic_new(&p, NULL);
    mqs_tc_delivery_t out[4];
    mqs_tc_dead_t dead;

    p.max_attempts = 0;
    mqs_tc_open_group(h, "g", 1, 0, NOW);
    mqs_tc_set_group_attempts(h, 0, 2);
    mqs_tc_open_consumer(h, 0, 4, 1, NOW);
    publish_number(h, 1, 0);
    publish_number(h, 2, 0);
    CHECK_EQ(mqs_tc_fetch(h, 0, 1, 1.0, 0, NOW, out), 1);
    CHECK_EQ(number_of(&out[0]), 1);
    /* The deadline passes: back at the tail, behind message 2. */
    CHECK_EQ(mqs_tc_ack(h, 0, out[0].slot, out[0].ticket, NOW + 1.5), 0);
    CHECK_EQ(counter(h, MQS_TC_REDELIVERED), 1);
    CHECK_EQ(counter(h, MQS_TC_LATE_ACKS), 1);
    CHECK_EQ(mqs_tc_fetch(h, 0, 2, 1.0, 0, NOW + 1.5, out), 2);
    CHECK_EQ(number_of(&out[0]), 2);
    CHECK_EQ(number_of(&out[1]), 1);
    CHECK_EQ(out[1].attempts, 2);
    CHECK_EQ(mqs_tc_extend(h, 0, out[0].slot, out[0].ticket, 10.0,
                           NOW + 2.0), 1);
    /* Message 1 missed its second deadline: max_attempts 2 reached. */
    mqs_tc_advance(h, NOW + 3.0);
    CHECK_EQ(counter(h, MQS_TC_DEAD_ACK_TIMEOUT), 1);
    /* A dead letter is not a redelivery. */
    CHECK_EQ(counter(h, MQS_TC_REDELIVERED), 1);
    CHECK_EQ(mqs_tc_next_dead(h, &dead), 1);
    CHECK_EQ(dead.reason, MQS_TC_REASON_ACK_TIMEOUT);
    CHECK_EQ(dead.attempts, 2);
    CHECK_EQ(dead.seq, 1);
    mqs_tc_drop_dead(h, dead.group, dead.slot);
    CHECK_EQ(mqs_tc_next_dead(h, &dead), 0);
    /* Message 2 was extended, so it is still in flight. */
    CHECK_EQ(mqs_tc_ack(h, 0, out[0].slot, out[0].ticket, NOW + 3.0), 1);
    mqs_tc_stats_t stats;
    mqs_tc_stats(h, &stats);
    CHECK_EQ(stats.stored, 0);
    topic_free(h, &p);
}

static void test_nack_release_and_close(void)
{
    mqs_tc_params_t p = params_of(8, 1, 0);
    mqs_tc_header_t *h = topic_new(&p, NULL);
    mqs_tc_delivery_t out[8];
    mqs_tc_dead_t dead;
    uint32_t slots[2];
    uint64_t tickets[2];

    mqs_tc_open_group(h, "g", 1, 0, NOW);
    mqs_tc_open_consumer(h, 0, 8, 1, NOW);
    for (uint32_t i = 0; i < 4; i++)
        publish_number(h, i, 0);
    CHECK_EQ(mqs_tc_fetch(h, 0, 4, 30.0, 0, NOW, out), 4);
    /* 0 requeued at the tail, 1 rejected, 2 and 3 released to the head. */
    CHECK_EQ(mqs_tc_nack(h, 0, out[0].slot, out[0].ticket, 1, NOW), 1);
    CHECK_EQ(mqs_tc_nack(h, 0, out[1].slot, out[1].ticket, 0, NOW), 1);
    slots[0] = out[2].slot;
    slots[1] = out[3].slot;
    tickets[0] = out[2].ticket;
    tickets[1] = out[3].ticket;
    CHECK_EQ(mqs_tc_release(h, 0, slots, tickets, 2, NOW), 2);
    CHECK_EQ(mqs_tc_next_dead(h, &dead), 1);
    CHECK_EQ(dead.reason, MQS_TC_REASON_REJECTED);
    CHECK_EQ(dead.seq, 2);
    /* Only the requeued nack is a redelivery. */
    CHECK_EQ(counter(h, MQS_TC_REDELIVERED), 1);
    CHECK_EQ(mqs_tc_fetch(h, 0, 8, 30.0, 0, NOW, out), 3);
    CHECK_EQ(number_of(&out[0]), 2);
    CHECK_EQ(out[0].attempts, 1);       /* released unseen */
    CHECK_EQ(number_of(&out[1]), 3);
    CHECK_EQ(number_of(&out[2]), 0);
    CHECK_EQ(out[2].attempts, 2);
    /* Closing the consumer puts all three back, in publish order. */
    CHECK_EQ(mqs_tc_close_consumer(h, 0, NOW), 3);
    CHECK_EQ(counter(h, MQS_TC_REDELIVERED), 4);
    CHECK_EQ(mqs_tc_open_consumer(h, 0, 8, 2, NOW), 0);
    CHECK_EQ(mqs_tc_fetch(h, 0, 8, 30.0, 0, NOW, out), 3);
    CHECK_EQ(number_of(&out[0]), 0);
    CHECK_EQ(number_of(&out[1]), 2);
    CHECK_EQ(number_of(&out[2]), 3);
    CHECK_EQ(out[0].attempts, 3);
    topic_free(h, &p);
}

static void test_groups_start_and_backlog(void)
{
    mqs_tc_params_t p = params_of(8, 1, 0);
    mqs_tc_header_t *h = topic_new(&p, NULL);
    mqs_tc_delivery_t out[8];
    mqs_tc_stats_t stats;

    /* Kept for the first group, which starts at "latest": dropped. */
    publish_number(h, 0, 0);
    publish_number(h, 1, 0);
    mqs_tc_open_group(h, "late", 4, 0, NOW);
    CHECK_EQ(counter(h, MQS_TC_DROPPED_UNSUBSCRIBED), 2);
    publish_number(h, 2, 0);
    /* A second group at "earliest" gets what is stored. */
    CHECK_EQ(mqs_tc_open_group(h, "early", 5, 1, NOW), 1);
    publish_number(h, 3, 0);
    mqs_tc_open_consumer(h, 0, 8, 1, NOW);
    mqs_tc_open_consumer(h, 1, 8, 1, NOW);
    CHECK_EQ(mqs_tc_fetch(h, 0, 8, 30.0, 1, NOW, out), 2);
    CHECK_EQ(number_of(&out[0]), 2);
    mqs_tc_stats(h, &stats);
    CHECK_EQ(stats.stored, 2);          /* group "early" still needs them */
    CHECK_EQ(mqs_tc_fetch(h, 1, 8, 30.0, 1, NOW, out), 2);
    CHECK_EQ(number_of(&out[0]), 2);
    CHECK_EQ(number_of(&out[1]), 3);
    mqs_tc_stats(h, &stats);
    CHECK_EQ(stats.stored, 0);
    topic_free(h, &p);
}

/* ---- no allocation ------------------------------------------------------ */

/* More entries than one batch of the core (512), so every scan that
 * orders entries takes several batches. */
#define MANY 1300

/* Fetch MANY messages for `consumer` and check that they are the numbers
 * 0..MANY-1 in publish order, with `attempts`. */
static void fetch_all_in_order(mqs_tc_header_t *h, uint32_t consumer,
                               uint64_t attempts)
{
    static mqs_tc_delivery_t out[MANY];
    uint32_t wrong_order = 0, wrong_attempts = 0;

    CHECK_EQ(mqs_tc_fetch(h, consumer, MANY, 10.0, 0, NOW, out), MANY);
    for (uint32_t i = 0; i < MANY; i++) {
        wrong_order += number_of(&out[i]) != i;
        wrong_attempts += out[i].attempts != attempts;
    }
    CHECK_EQ(wrong_order, 0);
    CHECK_EQ(wrong_attempts, 0);
}

static void test_no_allocation_when_malloc_fails(void)
{
    mqs_tc_params_t p = params_of(MANY, 1, 0);
    mqs_tc_header_t *h = topic_new(&p, NULL);
    mqs_tc_stats_t stats;
    uint32_t slots[1] = {0};
    uint64_t tickets[1] = {1};
    uint32_t consumer;

    malloc_fails = 1;
    /* Kept for the first group, which starts at the earliest. */
    for (uint32_t i = 0; i < MANY; i++)
        CHECK(publish_number(h, i, 0) > 0);
    CHECK_EQ(mqs_tc_open_group(h, "g", 1, 1, NOW), 0);
    mqs_tc_stats(h, &stats);
    CHECK_EQ(stats.ready, MANY);
    consumer = (uint32_t)mqs_tc_open_consumer(h, 0, MANY, 1, NOW);
    fetch_all_in_order(h, consumer, 1);

    /* Missed deadlines put them back in deadline order. */
    mqs_tc_advance(h, NOW + 20.0);
    mqs_tc_stats(h, &stats);
    CHECK_EQ(stats.ready, MANY);
    CHECK_EQ(stats.in_flight, 0);
    CHECK_EQ(counter(h, MQS_TC_REDELIVERED), MANY);
    fetch_all_in_order(h, consumer, 2);

    /* Only the release of unseen messages needs memory. */
    CHECK_EQ(mqs_tc_release(h, 0, slots, tickets, 1, NOW), MQS_ENOMEM);

    /* A close puts them back in publish order. */
    CHECK_EQ(mqs_tc_close_consumer(h, consumer, NOW), MANY);
    consumer = (uint32_t)mqs_tc_open_consumer(h, 0, MANY, 2, NOW);
    fetch_all_in_order(h, consumer, 3);

    /* So does the repair, for a consumer that died before its close. */
    atomic_store(&mqs_tc_consumer(h, consumer)->used, 0);
    mqs_tc_repair(h);
    mqs_tc_stats(h, &stats);
    CHECK_EQ(stats.ready, MANY);
    CHECK_EQ(stats.in_flight, 0);
    CHECK_EQ(counter(h, MQS_TC_REDELIVERED), 3 * MANY);
    consumer = (uint32_t)mqs_tc_open_consumer(h, 0, MANY, 3, NOW);
    fetch_all_in_order(h, consumer, 4);
    malloc_fails = 0;
    topic_free(h, &p);
}

/* ---- importing an image ------------------------------------------------ */

static void check_consistent(mqs_tc_header_t *h);
static void check_counters(mqs_tc_header_t *h);

static int64_t import_number(mqs_tc_header_t *h, uint64_t seq,
                             uint32_t number, uint32_t priority, int retained)
{
    return mqs_tc_import_message(h, seq, &number, sizeof(number), priority,
                                 2.0, retained);
}

static void test_import_state(void)
{
    mqs_tc_params_t p = params_of(16, 2, 1);   /* strict lanes 9 and 5 */
    uint64_t size;
    mqs_tc_header_t *h = topic_new(&p, &size);
    int64_t group_counters[MQS_TC_GROUP_COUNTERS] = {7, 3, 2, 1, 2, 1};
    int64_t counters[MQS_TC_COUNTERS] = {0};
    int64_t slots[6];
    uint64_t unneeded = 0;
    mqs_tc_delivery_t out[8];
    mqs_tc_dead_t dead;
    mqs_tc_stats_t stats;
    unsigned char *copy;

    /* The import allocates nothing. */
    malloc_fails = 1;
    for (int i = 0; i < MQS_TC_COUNTERS; i++)
        counters[i] = 10 + i;
    CHECK_EQ(mqs_tc_import_group(h, "a", 1, 3, group_counters), 0);
    CHECK_EQ(mqs_tc_import_group(h, "b", 1, 0, group_counters), 1);
    /* Seqs 3, 5, 6, 8, 9, 12: gaps left by messages acked before. */
    uint64_t seqs[6] = {3, 5, 6, 8, 9, 12};
    uint32_t priorities[6] = {5, 9, 5, 9, 5, 9};
    for (int i = 0; i < 6; i++) {
        slots[i] = import_number(h, seqs[i], (uint32_t)i, priorities[i], 0);
        CHECK_EQ(slots[i], i);
    }
    /* Group a: 8 and 3 ready in that order, 6 was in flight (now ready
     * at the tail of lane 5), 5 dead after 3 attempts. */
    CHECK_EQ(mqs_tc_import_entry(h, 0, 3, MQS_TC_READY, 0, 1, NOW), MQS_OK);
    CHECK_EQ(mqs_tc_import_entry(h, 0, 0, MQS_TC_READY, 0, 2, NOW), MQS_OK);
    CHECK_EQ(mqs_tc_import_entry(h, 0, 2, MQS_TC_IN_FLIGHT, 0, 1, NOW),
             MQS_OK);
    CHECK_EQ(mqs_tc_import_entry(h, 0, 1, MQS_TC_DEAD,
                                 MQS_TC_REASON_MAX_ATTEMPTS, 3, NOW), MQS_OK);
    /* Group b: 12 and 9 ready, 8 dead as rejected. */
    CHECK_EQ(mqs_tc_import_entry(h, 1, 5, MQS_TC_READY, 0, 0, NOW), MQS_OK);
    CHECK_EQ(mqs_tc_import_entry(h, 1, 4, MQS_TC_READY, 0, 0, NOW), MQS_OK);
    CHECK_EQ(mqs_tc_import_entry(h, 1, 3, MQS_TC_DEAD,
                                 MQS_TC_REASON_REJECTED, 1, NOW), MQS_OK);
    CHECK_EQ(mqs_tc_import_finish(h, 20, counters, &unneeded), MQS_OK);
    malloc_fails = 0;

    CHECK_EQ(h->state.v.next_seq, 20);
    CHECK_EQ(counter(h, MQS_TC_PUBLISHED), 20);
    CHECK_EQ(counter(h, MQS_TC_ACKED), counters[MQS_TC_ACKED]);
    CHECK_EQ(counter(h, MQS_TC_RECOVERIES), counters[MQS_TC_RECOVERIES]);
    CHECK_EQ(mqs_tc_group(h, 0)->max_attempts, 3);
    CHECK_EQ(mqs_tc_group(h, 1)->counters[MQS_TC_GROUP_ACKED], 3);
    mqs_tc_stats(h, &stats);
    CHECK_EQ(stats.stored, 6);
    CHECK_EQ(stats.ready, 5);
    CHECK_EQ(stats.in_flight, 0);
    CHECK_EQ(stats.dead, 2);
    check_consistent(h);

    /* A repair rebuilds the same mirrors: only its own counter and the
     * slot search hint change. */
    copy = malloc(size);
    CHECK(copy != NULL);
    if (copy != NULL) {
        int64_t recoveries = counter(h, MQS_TC_RECOVERIES);
        uint32_t hint = h->state.v.alloc_hint;
        memcpy(copy, h, size);
        mqs_tc_repair(h);
        CHECK_EQ(counter(h, MQS_TC_RECOVERIES), recoveries + 1);
        h->state.v.counters[MQS_TC_RECOVERIES] = recoveries;
        h->state.v.alloc_hint = hint;
        CHECK_EQ(memcmp(copy, h, size), 0);
        free(copy);
    }

    /* Dead entries in the order they were imported. */
    CHECK_EQ(mqs_tc_next_dead(h, &dead), 1);
    CHECK_EQ(dead.group, 0);
    CHECK_EQ(dead.seq, 5);
    CHECK_EQ(dead.attempts, 3);
    CHECK_EQ(dead.reason, MQS_TC_REASON_MAX_ATTEMPTS);
    mqs_tc_drop_dead(h, dead.group, dead.slot);
    CHECK_EQ(mqs_tc_next_dead(h, &dead), 1);
    CHECK_EQ(dead.group, 1);
    CHECK_EQ(dead.seq, 8);
    CHECK_EQ(dead.reason, MQS_TC_REASON_REJECTED);
    mqs_tc_drop_dead(h, dead.group, dead.slot);
    CHECK_EQ(mqs_tc_next_dead(h, &dead), 0);

    /* Strict lanes: lane 9 (seq 8), then lane 5 in import order. */
    CHECK_EQ(mqs_tc_open_consumer(h, 0, 8, 1, NOW), 0);
    CHECK_EQ(mqs_tc_fetch(h, 0, 8, 30.0, 0, NOW, out), 3);
    CHECK_EQ(out[0].seq, 8);
    CHECK_EQ(out[0].attempts, 2);
    CHECK_EQ(out[1].seq, 3);
    CHECK_EQ(out[1].attempts, 3);
    CHECK_EQ(out[2].seq, 6);
    CHECK_EQ(out[2].attempts, 2);
    CHECK_EQ(number_of(&out[2]), 2);
    for (int i = 0; i < 3; i++)
        CHECK_EQ(mqs_tc_ack(h, 0, out[i].slot, out[i].ticket, NOW), 1);
    mqs_tc_stats(h, &stats);
    CHECK_EQ(stats.stored, 2);          /* group b still needs 9 and 12 */

    /* A publish continues the seq; a new group at "earliest" enters
     * every stored message. */
    CHECK_EQ(publish_number(h, 100, 5), 21);
    CHECK_EQ(mqs_tc_open_group(h, "c", 1, 1, NOW), 2);
    CHECK_EQ(mqs_tc_open_consumer(h, 2, 8, 1, NOW), 1);
    CHECK_EQ(mqs_tc_fetch(h, 1, 8, 30.0, 1, NOW, out), 3);
    CHECK_EQ(out[0].seq, 12);
    CHECK_EQ(out[1].seq, 9);
    CHECK_EQ(out[2].seq, 21);
    /* Group b delivers its imported entries, then the new message. */
    CHECK_EQ(mqs_tc_open_consumer(h, 1, 8, 1, NOW), 2);
    CHECK_EQ(mqs_tc_fetch(h, 2, 8, 30.0, 1, NOW, out), 3);
    CHECK_EQ(out[0].seq, 12);
    CHECK_EQ(out[0].attempts, 1);
    CHECK_EQ(out[1].seq, 9);
    CHECK_EQ(out[2].seq, 21);
    CHECK_EQ(mqs_tc_fetch(h, 0, 8, 30.0, 1, NOW, out), 1);
    CHECK_EQ(out[0].seq, 21);
    mqs_tc_stats(h, &stats);
    CHECK_EQ(stats.stored, 0);
    topic_free(h, &p);
}

static void test_import_retained_without_groups(void)
{
    mqs_tc_params_t p = params_of(8, 1, 0);
    mqs_tc_header_t *h = topic_new(&p, NULL);
    int64_t counters[MQS_TC_COUNTERS] = {0};
    mqs_tc_delivery_t out[4];

    CHECK_EQ(import_number(h, 4, 0, 0, 1), 0);
    CHECK_EQ(import_number(h, 7, 1, 0, 1), 1);
    /* A next_seq below the last seq stored becomes that seq. */
    CHECK_EQ(mqs_tc_import_finish(h, 2, counters, NULL), MQS_OK);
    CHECK_EQ(h->state.v.next_seq, 7);
    CHECK_EQ(counter(h, MQS_TC_PUBLISHED), 7);
    CHECK_EQ(mqs_tc_open_group(h, "g", 1, 1, NOW), 0);
    CHECK_EQ(mqs_tc_open_consumer(h, 0, 4, 1, NOW), 0);
    CHECK_EQ(mqs_tc_fetch(h, 0, 4, 30.0, 1, NOW, out), 2);
    CHECK_EQ(out[0].seq, 4);
    CHECK_EQ(out[1].seq, 7);
    topic_free(h, &p);
}

static void test_import_rejects_bad_input(void)
{
    mqs_tc_params_t p = params_of(4, 1, 0);
    mqs_tc_header_t *h = topic_new(&p, NULL);
    int64_t counters[MQS_TC_COUNTERS] = {0};
    int64_t group_counters[MQS_TC_GROUP_COUNTERS] = {0};
    unsigned char big[65] = {0};
    uint64_t unneeded = 0;
    char long_name[MQS_TC_NAME_BYTES + 1];

    memset(long_name, 'x', sizeof(long_name));
    CHECK_EQ(mqs_tc_import_group(h, "", 0, 0, group_counters), MQS_EINVAL);
    CHECK_EQ(mqs_tc_import_group(h, long_name, sizeof(long_name), 0,
                                 group_counters), MQS_EINVAL);
    for (uint32_t g = 0; g < p.max_groups; g++) {
        char name = (char)('a' + g);
        CHECK_EQ(mqs_tc_import_group(h, &name, 1, 0, group_counters), g);
    }
    CHECK_EQ(mqs_tc_import_group(h, "a", 1, 0, group_counters), MQS_EINVAL);
    CHECK_EQ(mqs_tc_import_group(h, "z", 1, 0, group_counters), MQS_EFULL);

    CHECK_EQ(import_number(h, 0, 0, 0, 0), MQS_EINVAL);
    CHECK_EQ(import_number(h, 5, 0, 10, 0), MQS_EINVAL);
    CHECK_EQ(import_number(h, 5, 0, 0, 1), MQS_EINVAL);   /* retained */
    CHECK_EQ(mqs_tc_import_message(h, 5, big, sizeof(big), 0, 2.0, 0),
             MQS_ETOOBIG);
    CHECK_EQ(import_number(h, 5, 0, 0, 0), 0);
    CHECK_EQ(import_number(h, 5, 1, 0, 0), MQS_EINVAL);   /* not above */
    CHECK_EQ(import_number(h, 4, 1, 0, 0), MQS_EINVAL);
    CHECK_EQ(import_number(h, 6, 1, 0, 0), 1);
    CHECK_EQ(import_number(h, 7, 2, 0, 0), 2);
    CHECK_EQ(import_number(h, 8, 3, 0, 0), 3);
    CHECK_EQ(import_number(h, 9, 4, 0, 0), MQS_EFULL);

    CHECK_EQ(mqs_tc_import_entry(h, 0, 0, MQS_TC_FREE, 0, 0, NOW),
             MQS_EINVAL);
    CHECK_EQ(mqs_tc_import_entry(h, 0, 0, 4, 0, 0, NOW), MQS_EINVAL);
    CHECK_EQ(mqs_tc_import_entry(h, 0, 0, MQS_TC_READY, 1, 0, NOW),
             MQS_EINVAL);
    CHECK_EQ(mqs_tc_import_entry(h, 0, 0, MQS_TC_DEAD, 4, 0, NOW),
             MQS_EINVAL);
    CHECK_EQ(mqs_tc_import_entry(h, 0, 0, MQS_TC_READY, 0,
                                 (uint64_t)1 << 48, NOW), MQS_EINVAL);
    CHECK_EQ(mqs_tc_import_entry(h, p.max_groups, 0, MQS_TC_READY, 0, 0,
                                 NOW), MQS_EINVAL);
    CHECK_EQ(mqs_tc_import_entry(h, 0, p.capacity, MQS_TC_READY, 0, 0,
                                 NOW), MQS_EINVAL);
    CHECK_EQ(mqs_tc_import_entry(h, 0, 0, MQS_TC_READY, 0, 0, NOW), MQS_OK);
    /* The same entry twice. */
    CHECK_EQ(mqs_tc_import_entry(h, 0, 0, MQS_TC_DEAD, 1, 0, NOW),
             MQS_EINVAL);
    CHECK_EQ(mqs_tc_import_entry(h, 1, 1, MQS_TC_DEAD, 1, 1, NOW), MQS_OK);
    CHECK_EQ(mqs_tc_import_entry(h, 2, 3, MQS_TC_IN_FLIGHT, 0, 1, NOW),
             MQS_OK);
    /* Seq 7 (slot 2) has no entry. */
    counters[MQS_TC_ACKED] = 5;
    CHECK_EQ(mqs_tc_import_finish(h, 0, counters, &unneeded), MQS_EINVAL);
    CHECK_EQ(unneeded, 7);
    CHECK_EQ(counter(h, MQS_TC_ACKED), 0);
    CHECK_EQ(mqs_tc_import_entry(h, 3, 2, MQS_TC_READY, 0, 0, NOW), MQS_OK);
    CHECK_EQ(mqs_tc_import_finish(h, 0, counters, &unneeded), MQS_OK);
    CHECK_EQ(counter(h, MQS_TC_ACKED), 5);
    check_consistent(h);
    topic_free(h, &p);
}

/* ---- crash repair ------------------------------------------------------- */

/* Run `body` in a child with MQS_FAILPOINT=point; expect it killed. */
static void run_killed(const char *point, void (*body)(mqs_tc_header_t *),
                       mqs_tc_header_t *h)
{
    int status = 0;
    pid_t pid = fork();

    if (pid < 0) {
        perror("fork");
        exit(2);
    }
    if (pid == 0) {
        setenv("MQS_FAILPOINT", point, 1);
        body(h);
        _exit(0);
    }
    waitpid(pid, &status, 0);
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
}

static void child_publish(mqs_tc_header_t *h)
{
    mqs_tc_lock(h, 0);
    publish_number(h, 100, 0);
    mqs_tc_unlock(h);
}

static void child_fetch(mqs_tc_header_t *h)
{
    mqs_tc_delivery_t out[4];
    mqs_tc_lock(h, 0);
    mqs_tc_fetch(h, 1, 4, 30.0, 0, NOW, out);
    mqs_tc_unlock(h);
}

static void child_fetch_ack(mqs_tc_header_t *h)
{
    mqs_tc_delivery_t out[4];
    mqs_tc_lock(h, 0);
    int64_t n = mqs_tc_fetch(h, 1, 4, 30.0, 0, NOW, out);
    for (int64_t i = 0; i < n; i++)
        mqs_tc_ack(h, 0, out[i].slot, out[i].ticket, NOW);
    mqs_tc_unlock(h);
}

static void child_fetch_close(mqs_tc_header_t *h)
{
    mqs_tc_delivery_t out[4];
    mqs_tc_lock(h, 0);
    mqs_tc_fetch(h, 1, 4, 30.0, 0, NOW, out);
    mqs_tc_close_consumer(h, 1, NOW);
    mqs_tc_unlock(h);
}

static void child_open_group(mqs_tc_header_t *h)
{
    mqs_tc_lock(h, 0);
    mqs_tc_open_group(h, "new", 3, 1, NOW);
    mqs_tc_unlock(h);
}

/* Check the counters of group 0, the only group of the crash tests,
 * against the topic's and the entries: what is stored was published
 * and not acked. */
static void check_counters(mqs_tc_header_t *h)
{
    mqs_tc_group_t *group = mqs_tc_group(h, 0);
    mqs_tc_stats_t stats;

    mqs_tc_stats(h, &stats);
    CHECK_EQ(h->state.v.pending_kind, 0);
    CHECK_EQ(group->counters[MQS_TC_GROUP_ACKED], counter(h, MQS_TC_ACKED));
    CHECK_EQ(group->counters[MQS_TC_GROUP_DELIVERED],
             counter(h, MQS_TC_DELIVERED));
    CHECK_EQ((int64_t)stats.stored,
             (int64_t)h->state.v.next_seq - counter(h, MQS_TC_ACKED));
    CHECK(counter(h, MQS_TC_DELIVERED) >= counter(h, MQS_TC_ACKED));
}

/* Check the mirrors against the words after a repair. */
static void check_consistent(mqs_tc_header_t *h)
{
    mqs_tc_params_t *p = &h->config.v.params;

    for (uint32_t g = 0; g < p->max_groups; g++) {
        mqs_tc_group_t *group = mqs_tc_group(h, g);
        uint32_t ready = 0, lanes = 0;
        if (!group->used)
            continue;
        for (uint32_t slot = 0; slot < p->capacity; slot++) {
            uint64_t word = mqs_tc_entry(h, g, slot)->word;
            if (mqs_tc_word_state(word) == MQS_TC_READY)
                ready++;
            if (mqs_tc_word_state(word) != MQS_TC_FREE)
                CHECK(mqs_tc_slot(h, slot)->seq != 0);
        }
        for (uint32_t lane = 0; lane < p->lane_count; lane++)
            lanes += group->lanes[lane].count;
        CHECK_EQ(group->ready, ready);
        CHECK_EQ(lanes, ready);
    }
}

static void child_import(mqs_tc_header_t *h)
{
    int64_t counters[MQS_TC_COUNTERS] = {0};
    int64_t group_counters[MQS_TC_GROUP_COUNTERS] = {0};

    mqs_tc_lock(h, 0);
    mqs_tc_import_group(h, "g", 1, 0, group_counters);
    import_number(h, 10, 0, 9, 0);
    import_number(h, 11, 1, 0, 0);
    import_number(h, 12, 2, 9, 0);
    mqs_tc_import_entry(h, 0, 0, MQS_TC_READY, 0, 1, NOW);
    mqs_tc_import_entry(h, 0, 1, MQS_TC_DEAD, MQS_TC_REASON_REJECTED, 2,
                        NOW);
    mqs_tc_import_entry(h, 0, 2, MQS_TC_IN_FLIGHT, 0, 1, NOW);
    mqs_tc_import_finish(h, 12, counters, NULL);
    mqs_tc_unlock(h);
}

/* An import killed at `point`: the repair leaves a consistent core that
 * contains what the import committed, and frees messages that got no
 * entry before the kill. */
static void test_import_crash(const char *point)
{
    mqs_tc_params_t p = params_of(16, 2, 0);
    mqs_tc_header_t *h = topic_new(&p, NULL);
    mqs_tc_delivery_t out[4];
    mqs_tc_dead_t dead;
    mqs_tc_stats_t stats;
    int after_dead = strcmp(point, "tc_import_dead_after_commit") == 0;

    run_killed(point, child_import, h);
    CHECK_EQ(mqs_tc_lock(h, 0), 1);
    check_consistent(h);
    mqs_tc_stats(h, &stats);
    if (after_dead) {
        /* Seq 12 had no entry yet. */
        CHECK_EQ(stats.stored, 2);
        CHECK_EQ(stats.ready, 1);
        CHECK_EQ(stats.dead, 1);
        CHECK_EQ(h->state.v.next_seq, 12);
        CHECK_EQ(mqs_tc_next_dead(h, &dead), 1);
        CHECK_EQ(dead.seq, 11);
        CHECK_EQ(dead.attempts, 2);
        CHECK_EQ(dead.reason, MQS_TC_REASON_REJECTED);
        CHECK_EQ(mqs_tc_open_consumer(h, 0, 4, 1, NOW), 0);
        CHECK_EQ(mqs_tc_fetch(h, 0, 4, 30.0, 1, NOW, out), 1);
        CHECK_EQ(out[0].seq, 10);
        CHECK_EQ(out[0].attempts, 2);
    } else {
        /* Killed after committing seq 11, before any entry. */
        CHECK_EQ(stats.stored, 0);
        CHECK_EQ(stats.ready, 0);
        CHECK_EQ(h->state.v.next_seq, 11);
    }
    CHECK_EQ(publish_number(h, 100, 0), after_dead ? 13 : 12);
    mqs_tc_unlock(h);
    topic_free(h, &p);
}

static void test_crash(const char *point)
{
    mqs_tc_params_t p = params_of(16, 2, 0);
    mqs_tc_header_t *h = topic_new(&p, NULL);
    mqs_tc_delivery_t out[16];
    mqs_tc_stats_t stats;
    int64_t n;
    uint32_t total = 0;

    mqs_tc_open_group(h, "g", 1, 0, NOW);
    mqs_tc_open_consumer(h, 0, 16, 1, NOW);        /* the parent's */
    mqs_tc_open_consumer(h, 0, 16, 2, NOW);        /* the child's */
    for (uint32_t i = 0; i < 4; i++)
        publish_number(h, i, i % 2 ? 9 : 0);
    if (strcmp(point, "tc_publish_before_commit") == 0
        || strcmp(point, "tc_publish_after_commit") == 0)
        run_killed(point, child_publish, h);
    else if (strcmp(point, "tc_fetch_after_commit") == 0
             || strncmp(point, "tc_fetch_after_count", 20) == 0)
        run_killed(point, child_fetch, h);
    else if (strcmp(point, "tc_open_group_before_commit") == 0)
        run_killed(point, child_open_group, h);
    else if (strncmp(point, "tc_requeue_after_leave", 22) == 0)
        run_killed(point, child_fetch_close, h);
    else
        run_killed(point, child_fetch_ack, h);
    CHECK_EQ(mqs_tc_lock(h, 0), 1);
    CHECK_EQ(counter(h, MQS_TC_RECOVERIES), 1);
    check_consistent(h);
    check_counters(h);
    if (strcmp(point, "tc_ack_after_count") == 0) {
        /* Killed in its first ack after counting it, before the entry
         * changed: the ack did not happen, nor does its count. */
        CHECK_EQ(counter(h, MQS_TC_ACKED), 0);
        CHECK_EQ(counter(h, MQS_TC_DELIVERED), 4);
    } else if (strcmp(point, "tc_fetch_after_count") == 0) {
        CHECK_EQ(counter(h, MQS_TC_DELIVERED), 0);
    } else if (strcmp(point, "tc_fetch_after_count:3") == 0) {
        /* Two deliveries committed, the third counted only. */
        CHECK_EQ(counter(h, MQS_TC_DELIVERED), 2);
    } else if (strcmp(point, "tc_finish_before_free") == 0) {
        CHECK_EQ(counter(h, MQS_TC_ACKED), 1);
    }
    /* The dead process's consumer is closed, as its owner's reaper
     * would; every message not acked comes back exactly once. */
    mqs_tc_close_consumer(h, 1, NOW);
    n = mqs_tc_fetch(h, 0, 16, 30.0, 0, NOW, out);
    int seen[128] = {0};
    for (int64_t i = 0; i < n; i++) {
        uint32_t number = number_of(&out[i]);
        CHECK(number < 128);
        if (number < 128) {
            CHECK_EQ(seen[number], 0);
            seen[number] = 1;
        }
        total++;
        CHECK_EQ(mqs_tc_ack(h, 0, out[i].slot, out[i].ticket, NOW), 1);
    }
    if (strcmp(point, "tc_publish_before_commit") == 0) {
        CHECK_EQ(total, 4);
        CHECK_EQ(seen[100], 0);
    } else if (strcmp(point, "tc_publish_after_commit") == 0) {
        CHECK_EQ(total, 5);
        CHECK_EQ(seen[100], 1);
    } else if (strcmp(point, "tc_finish_before_free") == 0) {
        /* The child acked the first delivery before it died. */
        CHECK_EQ(total, 3);
    } else {
        CHECK_EQ(total, 4);
    }
    if (strncmp(point, "tc_requeue_after_leave", 22) == 0) {
        /* The child requeued one delivery; the repair put back the one
         * it was requeueing and the two it had not reached. */
        CHECK_EQ(counter(h, MQS_TC_REDELIVERED), 4);
        CHECK_EQ(mqs_tc_group(h, 0)->counters[MQS_TC_GROUP_REDELIVERED], 4);
    }
    mqs_tc_stats(h, &stats);
    CHECK_EQ(stats.stored, 0);
    CHECK_EQ(stats.ready, 0);
    CHECK_EQ(stats.in_flight, 0);
    /* Every message was acked once, and counted once. */
    CHECK_EQ(counter(h, MQS_TC_ACKED), (int64_t)h->state.v.next_seq);
    check_counters(h);
    if (strcmp(point, "tc_open_group_before_commit") == 0)
        CHECK_EQ(mqs_tc_find_group(h, "new", 3), -1);
    mqs_tc_unlock(h);
    topic_free(h, &p);
}

/* ---- threads ------------------------------------------------------------ */

typedef struct threads_run {
    mqs_tc_header_t *h;
    uint32_t messages;
    unsigned char *seen;
} threads_run_t;

static void *producer_main(void *arg)
{
    threads_run_t *run = arg;
    uint32_t i = 0;

    while (i < run->messages) {
        mqs_tc_lock(run->h, 1000000000);
        int64_t seq = publish_number(run->h, i, i % 10);
        mqs_tc_unlock(run->h);
        if (seq > 0) {
            mqs_wait_signal(mqs_tc_changed(run->h), 1);
            i++;
        } else {
            sched_yield();
        }
    }
    return NULL;
}

static void *consumer_main(void *arg)
{
    threads_run_t *run = arg;
    mqs_tc_delivery_t out[8];
    uint32_t got = 0;

    while (got < run->messages) {
        uint32_t epoch = mqs_wait_prepare(mqs_tc_changed(run->h));
        mqs_tc_lock(run->h, 1000000000);
        int64_t n = mqs_tc_fetch(run->h, 0, 8, 30.0, 0, NOW, out);
        for (int64_t i = 0; i < n; i++) {
            uint32_t number = number_of(&out[i]);
            if (number < run->messages) {
                CHECK_EQ(run->seen[number], 0);
                run->seen[number] = 1;
            }
            CHECK_EQ(mqs_tc_ack(run->h, 0, out[i].slot, out[i].ticket, NOW),
                     1);
        }
        mqs_tc_unlock(run->h);
        if (n > 0) {
            mqs_wait_finish(mqs_tc_changed(run->h));
            got += (uint32_t)n;
        } else {
            mqs_wait_park(mqs_tc_changed(run->h), epoch, 10000000, 1);
            mqs_wait_finish(mqs_tc_changed(run->h));
        }
    }
    return NULL;
}

static void run_threads(uint32_t messages)
{
    mqs_tc_params_t p = params_of(64, 3, 0);
    mqs_tc_header_t *h = topic_new(&p, NULL);
    threads_run_t run = {h, messages, calloc(messages, 1)};
    pthread_t producer, consumer;

    mqs_tc_open_group(h, "g", 1, 0, NOW);
    mqs_tc_open_consumer(h, 0, 8, 1, NOW);
    pthread_create(&consumer, NULL, consumer_main, &run);
    pthread_create(&producer, NULL, producer_main, &run);
    pthread_join(producer, NULL);
    pthread_join(consumer, NULL);
    for (uint32_t i = 0; i < messages; i++)
        CHECK_EQ(run.seen[i], 1);
    CHECK_EQ(counter(h, MQS_TC_ACKED), messages);
    free(run.seen);
    topic_free(h, &p);
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "units") == 0) {
        test_layout_rejects_bad_params();
        test_publish_fetch_ack();
        test_may_fetch();
        test_weighted_and_strict_lanes();
        test_deadline_redelivers_then_dead_letters();
        test_nack_release_and_close();
        test_groups_start_and_backlog();
        test_no_allocation_when_malloc_fails();
        test_import_state();
        test_import_retained_without_groups();
        test_import_rejects_bad_input();
    } else if (argc >= 3 && strcmp(argv[1], "crash") == 0) {
        if (strncmp(argv[2], "tc_import_", 10) == 0)
            test_import_crash(argv[2]);
        else
            test_crash(argv[2]);
    } else if (argc >= 3 && strcmp(argv[1], "threads") == 0) {
        run_threads((uint32_t)atol(argv[2]));
    } else {
        fprintf(stderr, "usage: test_topiccore units | crash POINT | "
                        "threads MESSAGES\n");
        return 2;
    }
    printf("%d passed, %d failed\n", atomic_load(&checks_passed),
           atomic_load(&checks_failed));
    return atomic_load(&checks_failed) == 0 ? 0 : 1;
}
