/*
 * Plain C tests of csrc/mqs_wheel.c, built and run by tests/test_c_wheel.py
 * (once with -O2 -Wall -Wextra -Werror, once under ASan and UBSan).
 *
 * Besides targeted cases, a seeded random run compares the wheel with a
 * brute-force model: every pending timer in an array, and an advance fires
 * those with deadline <= now sorted by (deadline, insertion number).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mqs_wheel.h"

#include "check.h"

#define MS 1000000LL

static mqs_wheel_t *new_wheel(uint32_t capacity, int64_t tick_ns,
                              int64_t start_ns)
{
    size_t bytes = mqs_wheel_size_bytes(capacity);
    mqs_wheel_t *w = malloc(bytes);

    if (w == NULL) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    if (mqs_wheel_init(w, bytes, tick_ns, start_ns) != MQS_OK) {
        fprintf(stderr, "mqs_wheel_init failed\n");
        exit(2);
    }
    return w;
}

static uint64_t insert(mqs_wheel_t *w, int64_t deadline_ns, uint64_t payload)
{
    uint64_t handle = 0;

    CHECK(mqs_wheel_insert(w, deadline_ns, payload, &handle) == MQS_OK);
    return handle;
}

/* Advance and collect every fired payload in one array of up to `max`. */
static size_t advance_all(mqs_wheel_t *w, int64_t now_ns, uint64_t *out,
                          size_t max)
{
    size_t n = 0;
    int rc = mqs_wheel_advance(w, now_ns, out, max, &n);

    CHECK(rc == MQS_OK);
    return n;
}

static void test_init_rejects_bad_arguments(void)
{
    size_t bytes = mqs_wheel_size_bytes(4);
    mqs_wheel_t *w = malloc(bytes);

    CHECK(mqs_wheel_init(NULL, bytes, MS, 0) == MQS_EINVAL);
    CHECK(mqs_wheel_init(w, bytes, 0, 0) == MQS_EINVAL);
    CHECK(mqs_wheel_init(w, bytes, -1, 0) == MQS_EINVAL);
    CHECK(mqs_wheel_init(w, MQS_WHEEL_HEADER_BYTES, MS, 0) == MQS_EINVAL);
    CHECK(mqs_wheel_init(w, bytes, MS, 0) == MQS_OK);
    CHECK(w->capacity == 4);
    CHECK(mqs_wheel_count(w) == 0);
    CHECK(mqs_wheel_check(w) == MQS_OK);
    CHECK(mqs_wheel_size_bytes(4) == MQS_WHEEL_HEADER_BYTES + 4 * 32);
    free(w);
}

static void test_empty_wheel(void)
{
    mqs_wheel_t *w = new_wheel(8, MS, 0);
    uint64_t out[4];
    int64_t deadline = 123;

    CHECK(mqs_wheel_next_deadline(w, &deadline) == MQS_EEMPTY);
    CHECK(deadline == 123);
    CHECK(advance_all(w, INT64_MAX, out, 4) == 0);
    CHECK(mqs_wheel_next_deadline(w, &deadline) == MQS_EEMPTY);
    CHECK(mqs_wheel_check(w) == MQS_OK);
    free(w);
}

static void test_fires_in_deadline_then_insertion_order(void)
{
    mqs_wheel_t *w = new_wheel(16, MS, 0);
    uint64_t out[16];
    size_t n;

    /* Three in tick 5 with sub-tick deadlines out of order, two equal. */
    insert(w, 5 * MS, 0);
    insert(w, 4 * MS + 1, 1);
    insert(w, 5 * MS, 2);
    insert(w, 2 * MS, 3);
    insert(w, 4 * MS + 500, 4);
    n = advance_all(w, 10 * MS, out, 16);
    CHECK(n == 5);
    CHECK(out[0] == 3);
    CHECK(out[1] == 1);
    CHECK(out[2] == 4);
    CHECK(out[3] == 0);
    CHECK(out[4] == 2);
    CHECK(mqs_wheel_count(w) == 0);
    CHECK(mqs_wheel_check(w) == MQS_OK);
    free(w);
}

static void test_never_fires_early(void)
{
    mqs_wheel_t *w = new_wheel(8, MS, 0);
    uint64_t out[8];

    insert(w, 3 * MS + 1, 7);
    CHECK(advance_all(w, 3 * MS, out, 8) == 0);
    CHECK(advance_all(w, 3 * MS + 1, out, 8) == 1);
    CHECK(out[0] == 7);

    /* Inside the current tick: fires exactly at its deadline. */
    insert(w, 3 * MS + 400, 8);
    CHECK(advance_all(w, 3 * MS + 399, out, 8) == 0);
    CHECK(advance_all(w, 3 * MS + 400, out, 8) == 1);
    CHECK(out[0] == 8);
    CHECK(mqs_wheel_check(w) == MQS_OK);
    free(w);
}

static void test_due_deadlines_fire_on_next_advance(void)
{
    mqs_wheel_t *w = new_wheel(8, MS, 100 * MS);
    uint64_t out[8];
    int64_t deadline;

    insert(w, 100 * MS, 1);
    insert(w, 40 * MS, 2);
    insert(w, INT64_MIN, 3);
    CHECK(mqs_wheel_next_deadline(w, &deadline) == MQS_OK);
    CHECK(deadline == INT64_MIN);
    /* An earlier now than the wheel's own counts as the wheel's own. */
    CHECK(advance_all(w, 0, out, 8) == 3);
    CHECK(out[0] == 3);
    CHECK(out[1] == 2);
    CHECK(out[2] == 1);
    CHECK(mqs_wheel_check(w) == MQS_OK);
    free(w);
}

/* Deadlines at each level's edge, one nanosecond either side, fire at
 * their deadline and not one nanosecond before. */
static void test_level_boundaries(void)
{
    static const int64_t ticks[] = {1, 2, 63, 64, 65, 4095, 4096, 4097,
                                    262143, 262144, 262145, 16777215,
                                    16777216, 16777217, 1073741823,
                                    1073741824, 1073741825, 68719476735LL,
                                    68719476736LL, 68719476737LL};
    const size_t count = sizeof(ticks) / sizeof(ticks[0]);
    int64_t tick_ns[] = {1, 7, MS};
    size_t t, k, n;
    int offset;

    for (t = 0; t < 3; t++) {
        for (offset = -1; offset <= 1; offset++) {
            int64_t start = 5 * tick_ns[t] + 3;
            mqs_wheel_t *w = new_wheel(64, tick_ns[t], start);
            uint64_t out[64];
            int64_t next;

            for (k = 0; k < count; k++)
                insert(w, start + ticks[k] * tick_ns[t] + offset, k);
            CHECK(mqs_wheel_check(w) == MQS_OK);
            for (k = 0; k < count; k++) {
                int64_t due = start + ticks[k] * tick_ns[t] + offset;

                CHECK(mqs_wheel_next_deadline(w, &next) == MQS_OK);
                CHECK(next == due);
                /* A deadline at the start time is due at once. */
                n = advance_all(w, due - 1, out, 64);
                CHECK(n == (due <= start));
                if (due > start)
                    n = advance_all(w, due, out, 64);
                CHECK(n == 1);
                if (n == 1)
                    CHECK(out[0] == k);
                CHECK(mqs_wheel_check(w) == MQS_OK);
            }
            CHECK(mqs_wheel_count(w) == 0);
            free(w);
        }
    }
}

static void test_overflow_and_saturated_deadlines(void)
{
    mqs_wheel_t *w = new_wheel(16, 1, 0);
    uint64_t out[16];
    int64_t next;
    int64_t far = (int64_t)1 << 40;

    insert(w, INT64_MAX, 0);
    insert(w, far * 3, 1);
    insert(w, far, 2);
    insert(w, mqs_wheel_add_ns(INT64_MAX - 5, 100), 3);
    CHECK(w->heads[MQS_WHEEL_OVERFLOW] != MQS_WHEEL_NIL);
    CHECK(mqs_wheel_next_deadline(w, &next) == MQS_OK);
    CHECK(next == far);
    CHECK(mqs_wheel_check(w) == MQS_OK);

    CHECK(advance_all(w, far - 1, out, 16) == 0);
    CHECK(advance_all(w, far, out, 16) == 1);
    CHECK(out[0] == 2);
    CHECK(mqs_wheel_check(w) == MQS_OK);
    CHECK(advance_all(w, INT64_MAX - 1, out, 16) == 1);
    CHECK(out[0] == 1);
    CHECK(mqs_wheel_count(w) == 2);
    CHECK(advance_all(w, INT64_MAX, out, 16) == 2);
    CHECK(out[0] == 0);
    CHECK(out[1] == 3);
    CHECK(mqs_wheel_check(w) == MQS_OK);
    free(w);
}

static void test_saturating_add(void)
{
    CHECK(mqs_wheel_add_ns(INT64_MAX, 1) == INT64_MAX);
    CHECK(mqs_wheel_add_ns(INT64_MAX - 1, INT64_MAX) == INT64_MAX);
    CHECK(mqs_wheel_add_ns(INT64_MIN, -1) == INT64_MIN);
    CHECK(mqs_wheel_add_ns(-5, 7) == 2);
}

static void test_negative_origin_covers_full_range(void)
{
    mqs_wheel_t *w = new_wheel(8, 1, INT64_MIN + 1);
    uint64_t out[8];

    insert(w, INT64_MAX, 1);
    insert(w, 0, 0);
    CHECK(mqs_wheel_check(w) == MQS_OK);
    CHECK(advance_all(w, -1, out, 8) == 0);
    CHECK(advance_all(w, 0, out, 8) == 1);
    CHECK(out[0] == 0);
    CHECK(advance_all(w, INT64_MAX - 1, out, 8) == 0);
    CHECK(advance_all(w, INT64_MAX, out, 8) == 1);
    CHECK(out[0] == 1);
    CHECK(mqs_wheel_check(w) == MQS_OK);
    free(w);
}

static void test_stale_handles_never_cancel(void)
{
    mqs_wheel_t *w = new_wheel(1, MS, 0);
    uint64_t out[2], payload = 0;
    uint64_t first, second;

    first = insert(w, 5 * MS, 10);
    CHECK(mqs_wheel_cancel(w, first, &payload) == MQS_OK);
    CHECK(payload == 10);
    CHECK(mqs_wheel_cancel(w, first, &payload) == MQS_EINVAL);

    /* The one entry is reused: the old handle must not cancel it. */
    second = insert(w, 5 * MS, 11);
    CHECK(mqs_wheel_handle_index(second) == mqs_wheel_handle_index(first));
    CHECK(second != first);
    CHECK(mqs_wheel_cancel(w, first, NULL) == MQS_EINVAL);
    CHECK(mqs_wheel_count(w) == 1);
    CHECK(advance_all(w, 5 * MS, out, 2) == 1);
    CHECK(out[0] == 11);
    CHECK(mqs_wheel_cancel(w, second, NULL) == MQS_EINVAL);

    /* Handles never issued: generation 0, index past the slab. */
    CHECK(mqs_wheel_cancel(w, 0, NULL) == MQS_EINVAL);
    CHECK(mqs_wheel_cancel(w, (uint64_t)1 << 32 | 5, NULL) == MQS_EINVAL);
    CHECK(mqs_wheel_cancel(w, UINT64_MAX, NULL) == MQS_EINVAL);
    CHECK(mqs_wheel_check(w) == MQS_OK);
    free(w);
}

static void test_cancel_after_cascade(void)
{
    mqs_wheel_t *w = new_wheel(8, MS, 0);
    uint64_t out[8];
    uint64_t handle, payload = 0;

    handle = insert(w, 300000 * MS, 4);
    insert(w, 300000 * MS + 1, 5);
    CHECK(w->entries[mqs_wheel_handle_index(handle)].list >=
          3 * MQS_WHEEL_SLOTS);
    /* Cascade it down to level 0 without firing it. */
    CHECK(advance_all(w, 300000 * MS - 1, out, 8) == 0);
    CHECK(w->entries[mqs_wheel_handle_index(handle)].list <
          MQS_WHEEL_SLOTS);
    CHECK(mqs_wheel_cancel(w, handle, &payload) == MQS_OK);
    CHECK(payload == 4);
    CHECK(mqs_wheel_check(w) == MQS_OK);
    CHECK(advance_all(w, INT64_MAX, out, 8) == 1);
    CHECK(out[0] == 5);
    free(w);
}

static void test_full_slab_then_grow(void)
{
    size_t bytes = mqs_wheel_size_bytes(2);
    mqs_wheel_t *w = malloc(bytes), *grown;
    uint64_t out[8], handle = 0;
    int i;

    CHECK(mqs_wheel_init(w, bytes, MS, 0) == MQS_OK);
    insert(w, 3 * MS, 0);
    insert(w, 1 * MS, 1);
    CHECK(mqs_wheel_next_index(w) == MQS_WHEEL_NIL);
    CHECK(mqs_wheel_insert(w, 2 * MS, 2, &handle) == MQS_EFULL);
    CHECK(mqs_wheel_grow(w, mqs_wheel_size_bytes(1)) == MQS_EINVAL);

    grown = realloc(w, mqs_wheel_size_bytes(6));
    CHECK(grown != NULL);
    if (grown == NULL)
        return;
    w = grown;
    CHECK(mqs_wheel_grow(w, mqs_wheel_size_bytes(6)) == MQS_OK);
    CHECK(w->capacity == 6);
    CHECK(mqs_wheel_next_index(w) == 2);
    for (i = 2; i < 6; i++)
        insert(w, i * MS, (uint64_t)i);
    CHECK(mqs_wheel_check(w) == MQS_OK);
    CHECK(advance_all(w, 10 * MS, out, 8) == 6);
    CHECK(out[0] == 1);
    CHECK(out[1] == 2);
    CHECK(out[2] == 0);
    CHECK(out[3] == 3);
    CHECK(out[4] == 4);
    CHECK(out[5] == 5);
    free(w);
}

static void test_chunked_advance_keeps_order(void)
{
    mqs_wheel_t *w = new_wheel(64, MS, 0);
    uint64_t out[3];
    uint64_t seen[64];
    size_t n, total = 0, i;
    int rc, calls = 0;

    for (i = 0; i < 40; i++)
        insert(w, (int64_t)((i * 7919) % 40) * MS / 3 + 1, i);
    do {
        rc = mqs_wheel_advance(w, 20 * MS, out, 3, &n);
        CHECK(rc == MQS_OK || rc == MQS_EFULL);
        CHECK(rc == MQS_OK || n == 3);
        memcpy(seen + total, out, n * sizeof(out[0]));
        total += n;
        calls++;
        /* A timer due in the past joins while the advance is chunked. */
        if (calls == 2)
            insert(w, 0, 100);
        CHECK(mqs_wheel_check(w) == MQS_OK);
    } while (rc == MQS_EFULL && calls < 100);
    CHECK(total == 41);
    CHECK(mqs_wheel_count(w) == 0);
    /* Timer 100 was due first of those not yet fired, so it came next. */
    CHECK(seen[6] == 100);
    for (i = 1; i < total; i++) {
        if (i == 6 || i == 7)
            continue;
        CHECK(((seen[i - 1] * 7919) % 40) <= ((seen[i] * 7919) % 40));
    }
    free(w);
}

static void test_next_deadline_is_lower_bound_after_cancel(void)
{
    mqs_wheel_t *w = new_wheel(8, MS, 0);
    uint64_t out[8];
    uint64_t early;
    int64_t next = 0;

    /* Ticks 100 and 120 share a level-1 slot, whose minimum goes stale
     * when the earlier timer is cancelled. */
    early = insert(w, 100 * MS, 1);
    insert(w, 120 * MS, 2);
    CHECK(mqs_wheel_next_deadline(w, &next) == MQS_OK);
    CHECK(next == 100 * MS);
    CHECK(mqs_wheel_cancel(w, early, NULL) == MQS_OK);
    CHECK(mqs_wheel_next_deadline(w, &next) == MQS_OK);
    CHECK(next == 100 * MS);
    CHECK(advance_all(w, next, out, 8) == 0);
    CHECK(mqs_wheel_next_deadline(w, &next) == MQS_OK);
    CHECK(next == 120 * MS);
    CHECK(advance_all(w, next, out, 8) == 1);
    CHECK(out[0] == 2);
    free(w);
}

static void test_drain_returns_every_payload(void)
{
    mqs_wheel_t *w = new_wheel(32, MS, 0);
    uint64_t out[32];
    uint64_t sum = 0;
    size_t n, i;

    for (i = 0; i < 30; i++)
        insert(w, (int64_t)(i % 3 == 0 ? -1 : (int64_t)i << 30), i);
    n = mqs_wheel_drain(w, out, 10);
    CHECK(n == 10);
    n += mqs_wheel_drain(w, out + 10, 32);
    CHECK(n == 30);
    for (i = 0; i < n; i++)
        sum += out[i];
    CHECK(sum == 29 * 30 / 2);
    CHECK(mqs_wheel_count(w) == 0);
    CHECK(mqs_wheel_drain(w, out, 32) == 0);
    CHECK(mqs_wheel_check(w) == MQS_OK);
    free(w);
}

static void test_check_detects_corruption(void)
{
    mqs_wheel_t *w = new_wheel(8, MS, 0);
    uint64_t handle = insert(w, 100 * MS, 1);
    uint32_t i = mqs_wheel_handle_index(handle);

    CHECK(mqs_wheel_check(w) == MQS_OK);
    w->entries[i].deadline_ns = 5000 * MS; /* now on the wrong slot */
    CHECK(mqs_wheel_check(w) == MQS_ECORRUPT);
    w->entries[i].deadline_ns = 100 * MS;
    w->count = 2;
    CHECK(mqs_wheel_check(w) == MQS_ECORRUPT);
    w->count = 1;
    w->occupied[0] = 1;
    CHECK(mqs_wheel_check(w) == MQS_ECORRUPT);
    free(w);
}

/* ---- random comparison with a brute-force model ---- */

typedef struct model_timer {
    int64_t deadline_ns;
    uint64_t handle;
    int pending;
} model_timer_t;

static uint64_t rng_state;

static uint64_t next_random(void)
{
    /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ULL;
}

static int64_t random_delay(int64_t tick_ns)
{
    static const int64_t edges[] = {0, 1, 63, 64, 65, 4095, 4096, 4097,
                                    262143, 262144, 262145, 16777216,
                                    1073741824, 68719476736LL,
                                    68719476737LL};
    uint64_t r = next_random();
    int64_t edge = edges[(r >> 8) % (sizeof(edges) / sizeof(edges[0]))];

    switch (r % 8) {
    case 0:
        return -(int64_t)(next_random() % 1000);
    case 1:
        return INT64_MAX / (1 + (int64_t)(next_random() % 3));
    case 2:
    case 3:
        return (int64_t)(next_random() % (uint64_t)(200 * tick_ns));
    case 4:
        return (int64_t)(next_random() % (uint64_t)(100000 * tick_ns));
    default:
        if (edge > INT64_MAX / tick_ns)
            return INT64_MAX;
        return edge * tick_ns + (int64_t)(next_random() % 3) - 1;
    }
}

static model_timer_t *model_sort_base;

static int compare_by_due(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    int64_t dx = model_sort_base[x].deadline_ns;
    int64_t dy = model_sort_base[y].deadline_ns;

    if (dx != dy)
        return dx < dy ? -1 : 1;
    return x < y ? -1 : (x > y);
}

static void run_random(uint64_t seed, int64_t tick_ns, int64_t start_ns,
                       int ops, int cancels)
{
    enum { CAPACITY = 1024 };
    mqs_wheel_t *w = new_wheel(CAPACITY, tick_ns, start_ns);
    model_timer_t *timers = calloc((size_t)ops + 1, sizeof(*timers));
    uint64_t *expected = calloc((size_t)ops + 1, sizeof(uint64_t));
    uint64_t *fired = calloc((size_t)ops + 1, sizeof(uint64_t));
    int64_t now = start_ns, max_now = start_ns;
    size_t n_timers = 0, pending = 0, i;
    int op, mismatches = 0;

    rng_state = seed;
    for (op = 0; op < ops && mismatches == 0; op++) {
        uint64_t r = next_random() % 16;

        if (r < 7 && pending < CAPACITY) {
            int64_t deadline = mqs_wheel_add_ns(now, random_delay(tick_ns));

            timers[n_timers].deadline_ns = deadline;
            timers[n_timers].handle = insert(w, deadline, n_timers);
            timers[n_timers].pending = 1;
            n_timers++;
            pending++;
        } else if (r < 10 && cancels && n_timers > 0) {
            size_t k = next_random() % n_timers;
            uint64_t payload = UINT64_MAX;
            int rc = mqs_wheel_cancel(w, timers[k].handle, &payload);

            CHECK(rc == (timers[k].pending ? MQS_OK : MQS_EINVAL));
            if (timers[k].pending) {
                CHECK(payload == k);
                timers[k].pending = 0;
                pending--;
            }
        } else {
            size_t n_expected = 0, n_fired = 0, n;
            size_t max_fired = 1 + next_random() % 5;
            uint64_t step = next_random() % 8;
            int rc;

            if (step == 0)
                now -= (int64_t)(next_random() % (uint64_t)(10 * tick_ns));
            else if (step < 4)
                now = mqs_wheel_add_ns(
                    now, (int64_t)(next_random() % (uint64_t)(90 * tick_ns)));
            else if (step < 6)
                now = mqs_wheel_add_ns(now, random_delay(tick_ns));
            else {
                /* Jump to exactly the next deadline, or 1 ns before. */
                int64_t next;

                if (mqs_wheel_next_deadline(w, &next) == MQS_OK
                    && next > INT64_MIN)
                    now = next - (int64_t)(step & 1);
            }
            if (now > max_now)
                max_now = now;

            for (i = 0; i < n_timers; i++)
                if (timers[i].pending && timers[i].deadline_ns <= max_now)
                    expected[n_expected++] = i;
            model_sort_base = timers;
            qsort(expected, n_expected, sizeof(uint64_t), compare_by_due);

            do {
                if (max_fired > 100)
                    max_fired = 100;
                rc = mqs_wheel_advance(w, now, fired + n_fired, max_fired,
                                       &n);
                n_fired += n;
            } while (rc == MQS_EFULL && n_fired <= n_expected);
            CHECK(rc == MQS_OK);
            CHECK(n_fired == n_expected);
            for (i = 0; i < n_expected && i < n_fired; i++) {
                if (fired[i] != expected[i]) {
                    mismatches++;
                    break;
                }
            }
            CHECK(mismatches == 0);
            for (i = 0; i < n_expected; i++)
                timers[expected[i]].pending = 0;
            pending -= n_expected;
        }

        CHECK(mqs_wheel_count(w) == pending);
        if (op % 7 == 0)
            CHECK(mqs_wheel_check(w) == MQS_OK);
        {
            int64_t next, earliest = INT64_MAX;
            int rc = mqs_wheel_next_deadline(w, &next);

            for (i = 0; i < n_timers; i++)
                if (timers[i].pending && timers[i].deadline_ns < earliest)
                    earliest = timers[i].deadline_ns;
            CHECK(rc == (pending ? MQS_OK : MQS_EEMPTY));
            if (pending && rc == MQS_OK) {
                CHECK(next <= earliest);
                if (!cancels)
                    CHECK(next == earliest);
            }
        }
    }
    if (mismatches)
        fprintf(stderr, "random run seed=%llu tick=%lld: order mismatch\n",
                (unsigned long long)seed, (long long)tick_ns);
    CHECK(mqs_wheel_check(w) == MQS_OK);
    free(timers);
    free(expected);
    free(fired);
    free(w);
}

/* The multiply-and-shift division must equal the divide instruction. */
static void test_tick_division_is_exact(void)
{
    size_t bytes = mqs_wheel_size_bytes(1);
    mqs_wheel_t *w = malloc(bytes);
    uint64_t divisors[4096];
    size_t n_divisors = 0, k, j;
    int shift, wrong = 0;

    for (k = 1; k <= 1000; k++)
        divisors[n_divisors++] = k;
    for (shift = 10; shift < 63; shift++) {
        divisors[n_divisors++] = ((uint64_t)1 << shift) - 1;
        divisors[n_divisors++] = (uint64_t)1 << shift;
        divisors[n_divisors++] = ((uint64_t)1 << shift) + 1;
    }
    divisors[n_divisors++] = 1000000;
    divisors[n_divisors++] = 999999937;
    divisors[n_divisors++] = (uint64_t)INT64_MAX;
    rng_state = 99;
    while (n_divisors < 2000)
        divisors[n_divisors++] = 1 + next_random() % (uint64_t)INT64_MAX;

    for (k = 0; k < n_divisors && !wrong; k++) {
        uint64_t d = divisors[k];
        uint64_t numerators[] = {0, 1, d - 1, d, d + 1, 2 * d - 1, 2 * d,
                                 UINT64_MAX, UINT64_MAX - 1,
                                 UINT64_MAX - d, next_random(),
                                 next_random() >> 20, next_random() >> 40};

        CHECK(mqs_wheel_init(w, bytes, (int64_t)d, 0) == MQS_OK);
        for (j = 0; j < sizeof(numerators) / sizeof(numerators[0]); j++) {
            if (mqs_wheel_div(w, numerators[j]) != numerators[j] / d) {
                fprintf(stderr, "division wrong: %llu / %llu\n",
                        (unsigned long long)numerators[j],
                        (unsigned long long)d);
                wrong = 1;
            }
        }
    }
    CHECK(!wrong);
    free(w);
}

static void test_random_against_model(void)
{
    run_random(1, MS, 0, 20000, 1);
    run_random(2, 1, 1000, 20000, 1);
    run_random(3, 7, -5000000000000000000LL, 20000, 1);
    run_random(4, MS, 123456789, 20000, 0);
    run_random(5, 1000, 0, 20000, 0);
}

int main(void)
{
    test_init_rejects_bad_arguments();
    test_empty_wheel();
    test_fires_in_deadline_then_insertion_order();
    test_never_fires_early();
    test_due_deadlines_fire_on_next_advance();
    test_level_boundaries();
    test_overflow_and_saturated_deadlines();
    test_saturating_add();
    test_negative_origin_covers_full_range();
    test_stale_handles_never_cancel();
    test_cancel_after_cascade();
    test_full_slab_then_grow();
    test_chunked_advance_keeps_order();
    test_next_deadline_is_lower_bound_after_cancel();
    test_drain_returns_every_payload();
    test_check_detects_corruption();
    test_tick_division_is_exact();
    test_random_against_model();

    printf("%d passed, %d failed\n", atomic_load(&checks_passed),
           atomic_load(&checks_failed));
    return atomic_load(&checks_failed) == 0 ? 0 : 1;
}
