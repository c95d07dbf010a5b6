/*
 * Plain C tests of csrc/mqs_delay.c, built and run by tests/test_c_delay.py.
 *
 *   test_delay units     size classes and targeted cases
 *   test_delay script    read operations from stdin (one per line), print
 *                        what happened; tests/test_c_delay.py generates
 *                        the scripts with hypothesis and checks the output
 *                        against a model
 *   test_delay threads P C N
 *                        P producer and C consumer threads, N messages
 *                        with random delays on the real clock: every
 *                        message exactly once, never before it is due
 *                        (for ThreadSanitizer)
 *
 * Script operations (times in ms on a simulated clock):
 *   time T               the clock is now T
 *   put ID DUE LEN       put message ID (LEN >= 8 payload bytes) due at DUE;
 *                        prints "put ID STATUS"
 *   promote              move what is due and drain the ring; prints
 *                        "got ID" per message, in delivery order, then
 *                        "promoted"
 *   kill POINT ID DUE LEN
 *                        a child process with its own participant slot
 *                        puts ID (POINT delay_put_before_insert) or
 *                        promotes (POINT delay_before_move or
 *                        delay_after_move) and is SIGKILLed at POINT;
 *                        prints "killed POINT" when it died there, else
 *                        "survived POINT"
 * After every operation the area's invariants are checked (which also
 * runs the repair after a kill). The last line is "N passed, M failed"
 * (tests/c/check.h).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "mqs_bytering.h"
#include "mqs_delay.h"
#include "mqs_wait.h"

#define MS 1000000LL

typedef struct queue_file {
    int fd;
    mqs_bytering_t ring;
    mqs_delay_t delay;
} queue_file_t;

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static void queue_create(queue_file_t *q, int64_t capacity,
                         int64_t delay_bytes, int64_t maxsize)
{
    q->fd = memfd_create("test-delay", MFD_CLOEXEC);
    if (q->fd < 0)
        die("memfd_create");
    if (ftruncate(q->fd, mqs_br_file_bytes(capacity) + delay_bytes) != 0)
        die("ftruncate");
    if (mqs_br_map(&q->ring, q->fd, capacity) != MQS_OK)
        die("mqs_br_map");
    mqs_br_config(&q->ring)->delayed_bytes = delay_bytes;
    if (mqs_delay_map(&q->delay, q->fd, mqs_br_file_bytes(capacity),
                      delay_bytes) != MQS_OK)
        die("mqs_delay_map");
    if (mqs_delay_format(&q->delay, 0) != MQS_OK)
        die("mqs_delay_format");
    if (mqs_br_format(&q->ring, capacity - 16, maxsize, 1, 0x1234567) != 0)
        die("mqs_br_format");
    CHECK(mqs_br_validate(q->ring.header, mqs_br_file_bytes(capacity)
                                              + delay_bytes) == MQS_OK);
    CHECK(mqs_delay_validate(&q->delay) == MQS_OK);
}

/* A participant of the same queue with its own open file description. */
static void participant_attach(queue_file_t *q, mqs_bytering_t *ring)
{
    char path[64];
    int fd;

    snprintf(path, sizeof(path), "/proc/self/fd/%d", q->fd);
    fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        die("open");
    *ring = q->ring;
    ring->fd = fd;
    ring->slot = -1;
    if (mqs_br_attach(ring) < 0)
        die("mqs_br_attach");
}

static void participant_detach(mqs_bytering_t *ring)
{
    mqs_br_detach(ring);
    close(ring->fd);
}

static int put_id(mqs_delay_t *d, mqs_bytering_t *ring, uint64_t id,
                  int64_t due_ns, int64_t length, int64_t now_ns)
{
    static unsigned char filler[1 << 16];
    const void *parts[2] = {&id, filler};
    size_t lengths[2] = {sizeof(id), (size_t)(length - 8)};

    return mqs_delay_try_put(d, ring, parts, lengths, 2, 7, due_ns, now_ns);
}

/* Take every message in the ring; report ids through `got`. */
static int drain(mqs_bytering_t *ring, void (*got)(uint64_t, void *),
                 void *arg)
{
    mqs_br_record_t record;
    int n = 0;

    for (;;) {
        int rc = mqs_br_try_take(ring, 0, 0, &record);
        uint64_t id;

        if (rc == MQS_EAGAIN_STUCK) {
            mqs_br_repair(ring);
            continue;
        }
        if (rc != MQS_OK)
            return n;
        CHECK(record.type == 7);
        memcpy(&id, record.payload, sizeof(id));
        mqs_br_unpin(ring, 0, MQS_BR_NO_PIN);
        got(id, arg);
        n++;
    }
}

/* -- units ---------------------------------------------------------------- */

static void test_size_classes(void)
{
    for (int64_t bytes = 1; bytes < (1 << 20); bytes += 1 + bytes / 64) {
        int c = mqs_delay_class_of(bytes);

        CHECK(mqs_delay_class_bytes(c) >= bytes);
        CHECK(c == 0 || mqs_delay_class_bytes(c - 1) < bytes);
        CHECK(mqs_delay_class_bytes(c) % 16 == 0);
        /* At most a quarter is rounding, past the 64-byte minimum. */
        CHECK(bytes <= 64 || mqs_delay_class_bytes(c) * 4 <= bytes * 5 + 64);
    }
    CHECK(mqs_delay_block_bytes(0) == 64);
    CHECK(mqs_delay_block_bytes(32) == 64);
    CHECK(mqs_delay_block_bytes(100) == 160);
    CHECK(mqs_delay_class_of((int64_t)1 << 41) < MQS_DELAY_CLASSES);
}

static void ignore_id(uint64_t id, void *arg)
{
    (void)id;
    (void)arg;
}

static void test_fill_and_reuse(void)
{
    queue_file_t q;
    int64_t moved = 0;
    int n = 0;

    queue_create(&q, 1 << 16, MQS_DELAY_MIN_AREA_BYTES, 0);
    if (mqs_br_attach(&q.ring) < 0)
        die("mqs_br_attach");
    CHECK(put_id(&q.delay, &q.ring, 1, 5 * MS, 1 << 20, 0) == MQS_ETOOBIG);
    CHECK(put_id(&q.delay, &q.ring, 1, 5 * MS,
                 mqs_delay_max_payload(MQS_DELAY_MIN_AREA_BYTES) + 1, 0)
          == MQS_ETOOBIG);
    while (put_id(&q.delay, &q.ring, (uint64_t)n, 5 * MS, 8, 0) == MQS_OK)
        n++;
    /* 8 KiB of header, a 4752-byte wheel header, then 64-byte blocks
     * and 32-byte wheel entries: (8192 - 4752) / 96 = 35. */
    CHECK_EQ(n, 35);
    CHECK(mqs_delay_count(&q.delay) == n);
    CHECK(mqs_delay_next_due(&q.delay) == 5 * MS);
    CHECK(mqs_delay_check(&q.delay, 0) == MQS_OK);
    CHECK(mqs_delay_promote(&q.delay, &q.ring, 5 * MS - 1, &moved)
          == MQS_OK);
    CHECK(moved == 0);
    CHECK(mqs_delay_promote(&q.delay, &q.ring, 5 * MS, &moved) == MQS_OK);
    CHECK(moved == n);
    CHECK(drain(&q.ring, ignore_id, NULL) == n);
    CHECK(mqs_delay_count(&q.delay) == 0);
    CHECK(mqs_delay_next_due(&q.delay) == INT64_MAX);
    CHECK(mqs_delay_stats(&q.delay)->used_bytes == 0);
    /* Freed blocks are reused: the same number fits again. */
    for (int i = 0; i < n; i++)
        CHECK(put_id(&q.delay, &q.ring, (uint64_t)i, 9 * MS, 8, 0)
              == MQS_OK);
    CHECK(put_id(&q.delay, &q.ring, 99, 9 * MS, 8, 0) == MQS_EFULL);
    CHECK(mqs_delay_check(&q.delay, 0) == MQS_OK);
    participant_detach(&q.ring);
    mqs_delay_unmap(&q.delay);
    mqs_br_unmap(&q.ring);
}

static void test_maxsize_counts_waiting(void)
{
    queue_file_t q;
    const void *parts[1] = {"x"};
    size_t lengths[1] = {1};

    queue_create(&q, 1 << 16, 1 << 16, 3);
    if (mqs_br_attach(&q.ring) < 0)
        die("mqs_br_attach");
    CHECK(mqs_br_try_put(&q.ring, parts, lengths, 1, 7) == MQS_OK);
    CHECK(put_id(&q.delay, &q.ring, 1, MS, 8, 0) == MQS_OK);
    CHECK(put_id(&q.delay, &q.ring, 2, MS, 8, 0) == MQS_OK);
    CHECK(put_id(&q.delay, &q.ring, 3, MS, 8, 0) == MQS_EFULL);
    participant_detach(&q.ring);
    mqs_delay_unmap(&q.delay);
    mqs_br_unmap(&q.ring);
}

/* -- script --------------------------------------------------------------- */

static void print_id(uint64_t id, void *arg)
{
    (void)arg;
    printf("got %llu\n", (unsigned long long)id);
}

static void promote_all(queue_file_t *q, int64_t now_ns)
{
    for (;;) {
        int64_t moved = 0;
        int rc = mqs_delay_promote(&q->delay, &q->ring, now_ns, &moved);

        drain(&q->ring, print_id, NULL);
        if (rc == MQS_OK)
            return;
        CHECK(rc == MQS_EFULL);
        if (rc != MQS_EFULL)
            return;
    }
}

static void kill_child(queue_file_t *q, const char *point, uint64_t id,
                       int64_t due_ns, int64_t length, int64_t now_ns)
{
    int status;
    pid_t pid;

    fflush(stdout);
    pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        mqs_bytering_t ring;
        int64_t moved = 0;

        participant_attach(q, &ring);
        setenv("MQS_FAILPOINT", point, 1);
        if (strcmp(point, "delay_put_before_insert") == 0)
            put_id(&q->delay, &ring, id, due_ns, length, now_ns);
        else
            mqs_delay_promote(&q->delay, &ring, now_ns, &moved);
        _exit(0);
    }
    if (waitpid(pid, &status, 0) != pid)
        die("waitpid");
    if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
        printf("killed %s\n", point);
    else
        printf("survived %s\n", point);
}

static int run_script(void)
{
    queue_file_t q;
    char line[256], op[64], point[64];
    int64_t now = 0;

    queue_create(&q, 1 << 14, 1 << 16, 0);
    if (mqs_br_attach(&q.ring) < 0)
        die("mqs_br_attach");
    while (fgets(line, sizeof(line), stdin) != NULL) {
        unsigned long long id;
        long long t, due, length;

        if (sscanf(line, "%63s", op) != 1)
            continue;
        if (strcmp(op, "time") == 0 && sscanf(line, "%*s %lld", &t) == 1) {
            now = t * MS;
        } else if (strcmp(op, "put") == 0
                   && sscanf(line, "%*s %llu %lld %lld", &id, &due,
                             &length) == 3) {
            printf("put %llu %d\n", id,
                   put_id(&q.delay, &q.ring, id, due * MS, length, now));
        } else if (strcmp(op, "promote") == 0) {
            promote_all(&q, now);
            printf("promoted\n");
        } else if (strcmp(op, "kill") == 0
                   && sscanf(line, "%*s %63s %llu %lld %lld", point, &id,
                             &due, &length) == 4) {
            kill_child(&q, point, id, due * MS, length, now);
        } else {
            fprintf(stderr, "bad script line: %s", line);
            return 2;
        }
        CHECK(mqs_delay_check(&q.delay, now) == MQS_OK);
        CHECK(mqs_delay_next_due(&q.delay) == INT64_MAX
              || mqs_delay_count(&q.delay) > 0);
    }
    printf("rebuilds %lld requeued %lld dropped %lld\n",
           (long long)mqs_delay_stats(&q.delay)->rebuilds,
           (long long)mqs_delay_stats(&q.delay)->requeued,
           (long long)mqs_delay_stats(&q.delay)->dropped);
    participant_detach(&q.ring);
    mqs_delay_unmap(&q.delay);
    mqs_br_unmap(&q.ring);
    return 0;
}

/* -- threads -------------------------------------------------------------- */

typedef struct shared_run {
    queue_file_t q;
    int64_t messages;
    int producers;
    _Atomic int64_t next_id;
    _Atomic int64_t received;
    _Atomic int64_t *due_of;      /* due time by id, set before the put */
    _Atomic uint8_t *seen;
} shared_run_t;

static void *producer_main(void *arg)
{
    shared_run_t *run = arg;
    mqs_bytering_t ring;
    unsigned seed = (unsigned)(uintptr_t)&ring;

    participant_attach(&run->q, &ring);
    for (;;) {
        int64_t id = atomic_fetch_add(&run->next_id, 1);
        int64_t now, due;
        int rc;

        if (id >= run->messages)
            break;
        now = mqs_monotonic_ns();
        due = now + (int64_t)(rand_r(&seed) % 20) * MS;
        atomic_store(&run->due_of[id], due);
        do {
            rc = put_id(&run->q.delay, &ring, (uint64_t)id, due,
                        8 + rand_r(&seed) % 200, mqs_monotonic_ns());
            if (rc != MQS_OK)
                sched_yield();
        } while (rc == MQS_EFULL || rc == MQS_EAGAIN_LOCKED);
        CHECK(rc == MQS_OK);
    }
    participant_detach(&ring);
    return NULL;
}

static void got_checked(uint64_t id, void *arg)
{
    shared_run_t *run = arg;
    int64_t now = mqs_monotonic_ns();

    CHECK(id < (uint64_t)run->messages);
    if (id >= (uint64_t)run->messages)
        return;
    CHECK(now >= atomic_load(&run->due_of[id]));
    CHECK(atomic_exchange(&run->seen[id], 1) == 0);
    atomic_fetch_add(&run->received, 1);
}

static void *consumer_main(void *arg)
{
    shared_run_t *run = arg;
    mqs_bytering_t ring;
    int64_t end = mqs_monotonic_ns() + 120000 * MS;

    participant_attach(&run->q, &ring);
    while (atomic_load(&run->received) < run->messages
           && mqs_monotonic_ns() < end) {
        int64_t moved = 0;

        if (mqs_delay_next_due(&run->q.delay) <= mqs_monotonic_ns())
            mqs_delay_promote(&run->q.delay, &ring, mqs_monotonic_ns(),
                              &moved);
        if (drain(&ring, got_checked, run) == 0)
            sched_yield();
    }
    participant_detach(&ring);
    return NULL;
}

static void run_threads(int producers, int consumers, int64_t messages)
{
    shared_run_t run;
    pthread_t threads[64];
    int n = 0;

    memset(&run, 0, sizeof(run));
    run.messages = messages;
    run.due_of = calloc((size_t)messages, sizeof(*run.due_of));
    run.seen = calloc((size_t)messages, 1);
    if (run.due_of == NULL || run.seen == NULL)
        die("calloc");
    queue_create(&run.q, 1 << 16, 1 << 18, 0);
    for (int i = 0; i < producers && n < 64; i++)
        pthread_create(&threads[n++], NULL, producer_main, &run);
    for (int i = 0; i < consumers && n < 64; i++)
        pthread_create(&threads[n++], NULL, consumer_main, &run);
    for (int i = 0; i < n; i++)
        pthread_join(threads[i], NULL);
    CHECK(atomic_load(&run.received) == messages);
    CHECK(mqs_delay_count(&run.q.delay) == 0);
    CHECK(mqs_delay_check(&run.q.delay, mqs_monotonic_ns()) == MQS_OK);
    free(run.due_of);
    free((void *)run.seen);
    mqs_delay_unmap(&run.q.delay);
    mqs_br_unmap(&run.q.ring);
    close(run.q.fd);
}

int main(int argc, char **argv)
{
    int rc = 0;

    if (argc >= 2 && strcmp(argv[1], "units") == 0) {
        test_size_classes();
        test_fill_and_reuse();
        test_maxsize_counts_waiting();
    } else if (argc >= 2 && strcmp(argv[1], "script") == 0) {
        rc = run_script();
    } else if (argc >= 5 && strcmp(argv[1], "threads") == 0) {
        run_threads(atoi(argv[2]), atoi(argv[3]), atoll(argv[4]));
    } else {
        fprintf(stderr, "usage: test_delay units | script | "
                        "threads PRODUCERS CONSUMERS MESSAGES\n");
        return 2;
    }
    if (rc != 0)
        return rc;
    printf("%d passed, %d failed\n", atomic_load(&checks_passed),
           atomic_load(&checks_failed));
    return atomic_load(&checks_failed) == 0 ? 0 : 1;
}
