/*
 * Multi-threaded stress test of csrc/mqs_ring.h (and of csrc/mqs_wait.h,
 * which the broadcast runs use to wait).
 *
 * Usage: stress_ring [--records N] [--timeout-seconds S]
 *
 * N defaults to 1,000,000 * MQS_TEST_SCALE (MQS_TEST_SCALE is a float,
 * default 1.0), so MQS_TEST_SCALE=10 is the full-scale run of 10 million
 * records per run. tests/test_c_ring.py passes a smaller --records to the
 * sanitizer builds. Runs, in order:
 *
 *   run           ring              threads                    slots
 *   pool          multi-producer    4 producers, 2 workers     16
 *   broadcast     multi-producer    4 producers, 3 consumers   64
 *   pool-sp       single-producer   1 producer, 2 workers      16
 *   broadcast-sp  single-producer   1 producer, 2 consumers    64
 *   ping-pong     single-producer   1 producer, 1 consumer     1
 *
 * Small rings keep the producers at the gate, where claims race with
 * releases. ping-pong pushes N / 50 records: each one waits for the
 * other side, so most of its time goes to waking threads.
 *
 * Producers claim random batches of 1 to 16 records (at most the ring's
 * capacity); readers take random batches of 1 to 64. Every record
 * carries its producer id, that producer's own sequence number and a
 * random payload. The checks:
 *   - pool: every record reaches exactly one worker (per-worker bitmaps,
 *     merged after the run), and each worker sees each producer's
 *     records in increasing sequence order;
 *   - broadcast: each consumer sees each producer's records as exactly
 *     0, 1, 2, ..., which proves exactly once and in order;
 *   - the sum of payloads each reader saw (all workers together, or each
 *     consumer alone) equals the sum the producers wrote.
 * Records live in an array indexed like the slots (sequence & mask), so a
 * producer rewrites a record only after every reader released it; a stale
 * or torn read shows up as a wrong sequence or checksum, and under
 * ThreadSanitizer as a data race.
 *
 * Pool runs wait by spinning and sched_yield. Broadcast runs wait on two
 * mqs_wait event words (records published, space released) with a 2 s
 * park timeout; a park that times out while its condition already holds
 * means a wake-up was lost, and fails the run.
 *
 * A watchdog bounds the whole program (default 100 s): when a join times
 * out, the program prints each thread's progress and exits with status 3
 * instead of hanging. Exit status 0 means every check passed; 1 means a
 * check failed; 2 means bad arguments or a failed allocation.
 */
#define _GNU_SOURCE

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "mqs_ring.h"
#include "mqs_wait.h"

#define MAX_THREADS 8
#define MAX_CLAIM 16
#define MAX_READ 64
#define RECORDS_PER_SCALE 1000000.0
#define PARK_TIMEOUT_NS 2000000000

typedef struct record {
    uint32_t producer;
    uint64_t sequence;
    uint64_t payload;
} record_t;

enum delivery { WORK_POOL, BROADCAST };

struct run;

/* One producer or reader thread and what it saw. */
struct actor {
    struct run *run;
    pthread_t thread;
    int index;
    uint64_t random_state;
    _Atomic int64_t progress;  /* records produced or read so far */
    uint64_t checksum;
    int64_t errors;
    int64_t lost_wakeups;
    /* Readers: next expected (broadcast) or last seen (pool) sequence of
     * each producer, and one bitmap per producer (pool only). */
    int64_t per_producer[MAX_THREADS];
    uint8_t *seen[MAX_THREADS];
};

struct run {
    const char *name;
    enum delivery delivery;
    int flags;
    int n_producers;
    int n_readers;
    int use_wait_word;
    int64_t capacity;
    int64_t records_divisor;  /* run --records / divisor (0 counts as 1) */
    int64_t records;
    int64_t per_producer_count[MAX_THREADS];

    mqs_ring_t *ring;
    record_t *records_by_slot;
    mqs_waitword_t published_word;
    mqs_waitword_t space_word;
    _Atomic int64_t taken_total;  /* work pool: records fully processed */
    _Atomic int abort;

    struct actor producers[MAX_THREADS];
    struct actor readers[MAX_THREADS];
};

static struct timespec watchdog_deadline;

static uint64_t next_random(uint64_t *state)
{
    /* xorshift64 with fixed per-thread seeds: every run uses the same
     * batch sizes and payloads, though thread timing still varies. */
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    return *state;
}

/* Count a failed check and print the first five of each thread. */
static void report_failure(struct actor *actor, const char *what,
                           const char *kind, int64_t detail)
{
    if (actor->errors++ < 5)
        fprintf(stderr, "FAIL %s: %s %d: %s (%" PRId64 ")\n",
                actor->run->name, kind, actor->index, what, detail);
}

static void backoff(unsigned *spins)
{
    if (++*spins < 64)
        mqs_cpu_relax();
    else
        sched_yield();
}

/*
 * Park on `word` until it is signalled, unless `ready` already holds
 * after registering (the re-check the wait protocol requires). Returns
 * the re-check's result: 1 when ready held, 0 after a wake-up. A park
 * that times out and then finds `ready` true counts as a lost wake-up.
 */
static int wait_on_word(struct actor *actor, mqs_waitword_t *word,
                        int (*ready)(struct actor *, void *), void *arg)
{
    uint32_t epoch = mqs_wait_prepare(word);
    int rc;

    if (ready(actor, arg)) {
        mqs_wait_finish(word);
        return 1;
    }
    rc = mqs_wait_park(word, epoch, PARK_TIMEOUT_NS, 0);
    if (rc == MQS_ETIMEDOUT && !atomic_load(&actor->run->abort)
        && ready(actor, arg)) {
        actor->lost_wakeups++;
        mqs_wait_finish(word);
        return 1;
    }
    mqs_wait_finish(word);
    return 0;
}

struct claim_request {
    int64_t n;
    int64_t lo;
    int status;
};

static int try_claim_ready(struct actor *actor, void *arg)
{
    struct claim_request *request = arg;

    request->status = mqs_ring_try_claim(actor->run->ring, request->n,
                                         &request->lo);
    return request->status != MQS_EFULL;
}

/* Claim n sequences, waiting while the ring is full. Returns the status
 * of the last try: MQS_OK, or MQS_ECLOSED when the run was aborted. */
static int claim_waiting(struct actor *actor, int64_t n, int64_t *lo)
{
    struct run *run = actor->run;
    struct claim_request request = {n, -1, MQS_EFULL};
    unsigned spins = 0;

    for (;;) {
        if (atomic_load_explicit(&run->abort, memory_order_relaxed))
            return MQS_ECLOSED;
        if (run->use_wait_word) {
            if (try_claim_ready(actor, &request)
                || wait_on_word(actor, &run->space_word, try_claim_ready,
                                &request))
                break;
        } else if (try_claim_ready(actor, &request)) {
            break;
        } else {
            backoff(&spins);
        }
    }
    *lo = request.lo;
    return request.status;
}

static void *produce_records(void *arg)
{
    struct actor *actor = arg;
    struct run *run = actor->run;
    int64_t count = run->per_producer_count[actor->index];
    int64_t sequence = 0, lo = -1;

    while (sequence < count) {
        int64_t n = 1 + (int64_t)(next_random(&actor->random_state)
                                  % MAX_CLAIM);
        int rc;

        if (n > run->capacity)
            n = run->capacity;
        if (n > count - sequence)
            n = count - sequence;
        rc = claim_waiting(actor, n, &lo);
        if (rc == MQS_ECLOSED)
            return NULL;
        if (rc != MQS_OK) {
            report_failure(actor, "claim failed with status", "producer", rc);
            atomic_store(&run->abort, 1);
            return NULL;
        }

        for (int64_t s = lo; s < lo + n; s++) {
            record_t *record = &run->records_by_slot[s & run->ring->mask];

            record->producer = (uint32_t)actor->index;
            record->sequence = (uint64_t)sequence++;
            record->payload = next_random(&actor->random_state);
            actor->checksum += record->payload;
            *mqs_ring_slot(run->ring, s) = record;
        }
        mqs_ring_publish(run->ring, lo, lo + n);
        if (run->use_wait_word)
            mqs_wait_signal(&run->published_word, 0);
        atomic_store_explicit(&actor->progress, sequence,
                              memory_order_relaxed);
    }
    return NULL;
}

/* Check one record a reader got for ring sequence `s` and add it to the
 * reader's checksum, bitmap and order state. */
static void check_record(struct actor *actor, int64_t s)
{
    struct run *run = actor->run;
    record_t *record = *mqs_ring_slot(run->ring, s);
    int64_t sequence;
    uint32_t producer;

    if (record != &run->records_by_slot[s & run->ring->mask]) {
        report_failure(actor, "slot does not point at its record at", "reader", s);
        return;
    }
    producer = record->producer;
    sequence = (int64_t)record->sequence;
    if (producer >= (uint32_t)run->n_producers
        || sequence >= run->per_producer_count[producer]) {
        report_failure(actor, "record has an unknown producer or sequence at",
               "reader", s);
        return;
    }
    actor->checksum += record->payload;

    if (run->delivery == BROADCAST) {
        if (sequence != actor->per_producer[producer])
            report_failure(actor, "broadcast record out of order or repeated, "
                   "sequence", "consumer", sequence);
        actor->per_producer[producer] = sequence + 1;
        return;
    }
    if (sequence <= actor->per_producer[producer])
        report_failure(actor, "pool record out of producer order, sequence",
               "worker", sequence);
    actor->per_producer[producer] = sequence;
    if (actor->seen[producer][sequence / 8] & (1u << (sequence % 8)))
        report_failure(actor, "pool record seen twice by one worker, sequence",
               "worker", sequence);
    actor->seen[producer][sequence / 8] |= (uint8_t)(1u << (sequence % 8));
}

static void *take_from_pool(void *arg)
{
    struct actor *actor = arg;
    struct run *run = actor->run;
    unsigned spins = 0;
    int64_t lo, hi;

    while (atomic_load(&run->taken_total) < run->records) {
        int64_t max_n = 1 + (int64_t)(next_random(&actor->random_state)
                                      % MAX_READ);

        if (atomic_load_explicit(&run->abort, memory_order_relaxed))
            return NULL;
        if (mqs_ring_work_claim(run->ring, actor->index, max_n, &lo, &hi)
            != MQS_OK) {
            backoff(&spins);
            continue;
        }
        spins = 0;
        if (hi - lo > max_n || hi <= lo)
            report_failure(actor, "work claim returned a bad range, size", "worker",
                   hi - lo);
        for (int64_t s = lo; s < hi; s++)
            check_record(actor, s);
        mqs_ring_work_release(run->ring, actor->index);
        atomic_fetch_add(&run->taken_total, hi - lo);
        atomic_fetch_add_explicit(&actor->progress, hi - lo,
                                  memory_order_relaxed);
    }
    return NULL;
}

struct poll_request {
    int64_t max_n;
    int64_t lo;
    int64_t hi;
};

static int poll_ready(struct actor *actor, void *arg)
{
    struct poll_request *request = arg;

    return mqs_ring_consumer_poll(actor->run->ring, actor->index,
                                  request->max_n, &request->lo,
                                  &request->hi) == MQS_OK;
}

static void *consume_broadcast(void *arg)
{
    struct actor *actor = arg;
    struct run *run = actor->run;
    int64_t consumed = 0;
    unsigned spins = 0;

    while (consumed < run->records) {
        struct poll_request request = {0, -1, -1};
        int got_records;

        request.max_n = 1 + (int64_t)(next_random(&actor->random_state)
                                      % MAX_READ);
        if (atomic_load_explicit(&run->abort, memory_order_relaxed))
            return NULL;
        got_records = poll_ready(actor, &request);
        if (!got_records && run->use_wait_word)
            got_records = wait_on_word(actor, &run->published_word,
                                       poll_ready, &request);
        if (!got_records) {
            if (!run->use_wait_word)
                backoff(&spins);
            continue;
        }
        spins = 0;
        if (request.lo != consumed || request.hi - request.lo > request.max_n)
            report_failure(actor, "poll returned a bad range, lo", "consumer",
                   request.lo);
        for (int64_t s = request.lo; s < request.hi; s++)
            check_record(actor, s);
        mqs_ring_consumer_release(run->ring, actor->index, request.hi);
        if (run->use_wait_word)
            mqs_wait_signal(&run->space_word, 0);
        consumed = request.hi;
        atomic_store_explicit(&actor->progress, consumed,
                              memory_order_relaxed);
    }
    return NULL;
}

static void print_progress(struct run *run)
{
    fprintf(stderr, "%s: cursor %" PRId64 ", min gate %" PRId64 "\n",
            run->name, atomic_load(&run->ring->cursor.value),
            mqs_ring_min_gate(run->ring));
    for (int i = 0; i < run->n_producers; i++)
        fprintf(stderr, "  producer %d: %" PRId64 " of %" PRId64 "\n", i,
                atomic_load(&run->producers[i].progress),
                run->per_producer_count[i]);
    for (int i = 0; i < run->n_readers; i++)
        fprintf(stderr, "  reader %d: %" PRId64 " read\n", i,
                atomic_load(&run->readers[i].progress));
}

/* Join a thread before the watchdog deadline, or print every thread's
 * progress and exit with status 3: a hung run fails instead of hanging
 * (its threads may be stuck anywhere, so they are not joined). */
static void join_or_exit(struct run *run, pthread_t thread)
{
    int rc = pthread_timedjoin_np(thread, NULL, &watchdog_deadline);

    if (rc == 0)
        return;
    atomic_store(&run->abort, 1);
    if (rc == ETIMEDOUT)
        fprintf(stderr, "FAIL %s: watchdog: threads still running at the "
                "--timeout-seconds deadline\n", run->name);
    else
        fprintf(stderr, "FAIL %s: pthread_timedjoin_np failed: %s\n",
                run->name, strerror(rc));
    print_progress(run);
    fflush(stderr);
    _exit(3);
}

static void start_thread(struct run *run, pthread_t *thread,
                         void *(*body)(void *), void *arg)
{
    int rc = pthread_create(thread, NULL, body, arg);

    if (rc != 0) {
        fprintf(stderr, "%s: pthread_create failed: %s\n", run->name,
                strerror(rc));
        exit(2);
    }
}

static void *allocate_zeroed(size_t n, size_t size)
{
    void *p = calloc(n, size);

    if (p == NULL) {
        fprintf(stderr, "out of memory allocating %zu x %zu bytes\n", n,
                size);
        exit(2);
    }
    return p;
}

static void setup_run(struct run *run)
{
    int64_t share = run->records / run->n_producers;

    for (int i = 0; i < run->n_producers; i++)
        run->per_producer_count[i] = share;
    run->per_producer_count[0] += run->records - share * run->n_producers;

    if (mqs_ring_create(&run->ring, run->capacity, run->flags,
                        run->delivery == BROADCAST ? run->n_readers : 0,
                        run->delivery == WORK_POOL ? run->n_readers : 0)
        != MQS_OK) {
        fprintf(stderr, "%s: mqs_ring_create failed\n", run->name);
        exit(2);
    }
    run->records_by_slot = allocate_zeroed((size_t)run->capacity,
                                         sizeof(record_t));
    mqs_wait_init(&run->published_word);
    mqs_wait_init(&run->space_word);
    atomic_init(&run->taken_total, 0);
    atomic_init(&run->abort, 0);

    for (int i = 0; i < run->n_producers; i++) {
        struct actor *p = &run->producers[i];

        p->run = run;
        p->index = i;
        p->random_state = 0x2545f4914f6cdd1du + (uint64_t)i * 7919;
        atomic_init(&p->progress, 0);
    }
    for (int i = 0; i < run->n_readers; i++) {
        struct actor *r = &run->readers[i];

        r->run = run;
        r->index = run->delivery == BROADCAST
                       ? mqs_ring_add_consumer(run->ring)
                       : mqs_ring_add_worker(run->ring);
        r->random_state = 0x9e3779b97f4a7c15u + (uint64_t)i * 104729;
        atomic_init(&r->progress, 0);
        for (int p = 0; p < run->n_producers; p++) {
            r->per_producer[p] = run->delivery == BROADCAST ? 0 : -1;
            if (run->delivery == WORK_POOL)
                r->seen[p] = allocate_zeroed(
                    (size_t)run->per_producer_count[p] / 8 + 1, 1);
        }
    }
}

/* Every record of producer p reached exactly one worker. */
static int64_t count_pool_delivery_errors(struct run *run)
{
    int64_t errors = 0;

    for (int p = 0; p < run->n_producers; p++) {
        for (int64_t s = 0; s < run->per_producer_count[p]; s++) {
            int copies = 0;

            for (int r = 0; r < run->n_readers; r++)
                copies += (run->readers[r].seen[p][s / 8] >> (s % 8)) & 1;
            if (copies != 1 && errors++ < 5)
                fprintf(stderr, "FAIL %s: producer %d sequence %" PRId64
                        " reached %d workers, expected 1\n", run->name, p,
                        s, copies);
        }
    }
    return errors;
}

/* Check what the readers saw against what the producers wrote; return
 * the number of failed checks. */
static int64_t check_run(struct run *run)
{
    uint64_t produced_sum = 0, pool_sum = 0;
    int64_t errors = 0;

    for (int i = 0; i < run->n_producers; i++) {
        produced_sum += run->producers[i].checksum;
        errors += run->producers[i].errors;
    }
    for (int r = 0; r < run->n_readers; r++) {
        struct actor *reader = &run->readers[r];

        errors += reader->errors;
        if (reader->lost_wakeups > 0) {
            fprintf(stderr, "FAIL %s: reader %d: %" PRId64 " parks timed "
                    "out with records already published (lost wake-up)\n",
                    run->name, r, reader->lost_wakeups);
            errors++;
        }
        if (run->delivery == WORK_POOL) {
            pool_sum += reader->checksum;
            continue;
        }
        if (reader->checksum != produced_sum) {
            fprintf(stderr, "FAIL %s: consumer %d checksum %" PRIu64
                    ", producers wrote %" PRIu64 "\n", run->name, r,
                    reader->checksum, produced_sum);
            errors++;
        }
        for (int p = 0; p < run->n_producers; p++) {
            if (reader->per_producer[p] != run->per_producer_count[p]) {
                fprintf(stderr, "FAIL %s: consumer %d saw %" PRId64
                        " records of producer %d, expected %" PRId64 "\n",
                        run->name, r, reader->per_producer[p], p,
                        run->per_producer_count[p]);
                errors++;
            }
        }
    }
    for (int i = 0; i < run->n_producers; i++) {
        if (run->producers[i].lost_wakeups > 0) {
            fprintf(stderr, "FAIL %s: producer %d: %" PRId64 " parks timed "
                    "out with space already free (lost wake-up)\n",
                    run->name, i, run->producers[i].lost_wakeups);
            errors++;
        }
    }
    if (run->delivery == WORK_POOL) {
        if (pool_sum != produced_sum) {
            fprintf(stderr, "FAIL %s: workers' checksum %" PRIu64
                    ", producers wrote %" PRIu64 "\n", run->name, pool_sum,
                    produced_sum);
            errors++;
        }
        if (atomic_load(&run->taken_total) != run->records) {
            fprintf(stderr, "FAIL %s: workers took %" PRId64 " records, "
                    "expected %" PRId64 "\n", run->name,
                    atomic_load(&run->taken_total), run->records);
            errors++;
        }
        errors += count_pool_delivery_errors(run);
    }
    return errors;
}

static void free_run(struct run *run)
{
    for (int r = 0; r < run->n_readers; r++)
        for (int p = 0; p < run->n_producers; p++)
            free(run->readers[r].seen[p]);
    free(run->records_by_slot);
    mqs_ring_free(run->ring);
}

static int64_t execute_run(struct run *run)
{
    int64_t start_ns = mqs_monotonic_ns(), errors;

    setup_run(run);
    for (int i = 0; i < run->n_readers; i++)
        start_thread(run, &run->readers[i].thread,
                     run->delivery == BROADCAST ? consume_broadcast
                                                : take_from_pool,
                     &run->readers[i]);
    for (int i = 0; i < run->n_producers; i++)
        start_thread(run, &run->producers[i].thread, produce_records,
                     &run->producers[i]);
    for (int i = 0; i < run->n_producers; i++)
        join_or_exit(run, run->producers[i].thread);
    for (int i = 0; i < run->n_readers; i++)
        join_or_exit(run, run->readers[i].thread);

    errors = check_run(run);
    printf("%-13s %" PRId64 " records, producers %d, %s %d: %.2f s, %s\n",
           run->name, run->records, run->n_producers,
           run->delivery == BROADCAST ? "consumers" : "workers",
           run->n_readers,
           (double)(mqs_monotonic_ns() - start_ns) / 1e9,
           errors == 0 ? "ok" : "FAILED");
    fflush(stdout);
    free_run(run);
    return errors;
}

static int64_t parse_positive(const char *text, const char *what)
{
    char *end;
    long long value;

    errno = 0;
    value = strtoll(text, &end, 10);
    if (errno != 0 || *end != '\0' || value < 1) {
        fprintf(stderr, "invalid %s %s: expected a positive integer\n", what,
                text);
        exit(2);
    }
    return value;
}

static int64_t default_records(void)
{
    const char *text = getenv("MQS_TEST_SCALE");
    double scale = 1.0;
    char *end;

    if (text != NULL && *text != '\0') {
        scale = strtod(text, &end);
        if (*end != '\0' || !(scale > 0) || scale > 1000) {
            fprintf(stderr, "invalid MQS_TEST_SCALE %s: expected a number "
                    "above 0 and at most 1000\n", text);
            exit(2);
        }
    }
    if (scale * RECORDS_PER_SCALE < 1)
        return 1;
    return (int64_t)(scale * RECORDS_PER_SCALE);
}

int main(int argc, char **argv)
{
    int64_t records = default_records(), timeout_seconds = 100;
    int64_t failed_checks = 0;
    static struct run runs[] = {
        {.name = "pool", .delivery = WORK_POOL,
         .flags = MQS_RING_MULTI_PRODUCER, .n_producers = 4,
         .n_readers = 2, .capacity = 16},
        {.name = "broadcast", .delivery = BROADCAST,
         .flags = MQS_RING_MULTI_PRODUCER, .n_producers = 4,
         .n_readers = 3, .use_wait_word = 1, .capacity = 64},
        {.name = "pool-sp", .delivery = WORK_POOL, .flags = 0,
         .n_producers = 1, .n_readers = 2, .capacity = 16},
        {.name = "broadcast-sp", .delivery = BROADCAST, .flags = 0,
         .n_producers = 1, .n_readers = 2, .use_wait_word = 1,
         .capacity = 64},
        {.name = "ping-pong", .delivery = BROADCAST, .flags = 0,
         .n_producers = 1, .n_readers = 1, .use_wait_word = 1,
         .capacity = 1, .records_divisor = 50},
    };

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--records") == 0 && i + 1 < argc) {
            records = parse_positive(argv[++i], "--records");
        } else if (strcmp(argv[i], "--timeout-seconds") == 0
                   && i + 1 < argc) {
            timeout_seconds = parse_positive(argv[++i], "--timeout-seconds");
        } else {
            fprintf(stderr, "usage: %s [--records N] [--timeout-seconds S]"
                    "\n", argv[0]);
            return 2;
        }
    }

    clock_gettime(CLOCK_REALTIME, &watchdog_deadline);
    watchdog_deadline.tv_sec += timeout_seconds;
    for (size_t i = 0; i < sizeof(runs) / sizeof(runs[0]); i++) {
        runs[i].records = records / (runs[i].records_divisor > 0
                                         ? runs[i].records_divisor : 1);
        if (runs[i].records < 1)
            runs[i].records = 1;
        failed_checks += execute_run(&runs[i]);
    }
    printf("%s: %" PRId64 " failed checks\n",
           failed_checks == 0 ? "passed" : "FAILED", failed_checks);
    return failed_checks == 0 ? 0 : 1;
}
