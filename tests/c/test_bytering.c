/*
 * Tests of csrc/mqs_bytering.h: unit and crash-repair tests on one
 * thread, then a stress run of producer and consumer threads.
 *
 * Every participant has its own open file description of the ring's
 * memfd (opened through /proc/self/fd/N), so each holds its own liveness
 * lock, as a separate process would. All participants share one mapping,
 * so ThreadSanitizer sees their accesses at the same addresses. A
 * participant "dies" when its file descriptor is closed without a
 * detach: the kernel drops its lock and its shared state stays behind,
 * as after SIGKILL.
 *
 * Build and run (tests/test_c_bytering.py does this in three builds):
 *   gcc -std=c11 -O2 -Wall -Wextra -Werror -Icsrc -pthread \
 *       tests/c/test_bytering.c csrc/mqs_bytering.c -o test_bytering
 *   ./test_bytering [--records N] [--timeout-seconds S]
 *
 * --records is the total number of messages of each stress run (default
 * 200000). Every failed check prints its function, line and values to
 * stderr. The last line on stdout is "N passed, M failed" and the exit
 * status is 1 when M > 0.
 */
#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "mqs_bytering.h"

#include "check.h"

/* Record header as documented in mqs_bytering.h, for the tests that play
 * a producer step by step. */
typedef struct test_record_header {
    _Atomic uint64_t commit;
    _Atomic uint32_t length;
    _Atomic uint16_t type;
    _Atomic uint16_t owner;
} test_record_header_t;

#define TYPE_DATA 1
#define SECRET 0x5eed5eed12345678ULL

static void die(const char *what, int status)
{
    fprintf(stderr, "%s failed with status %d (errno %d: %s)\n", what,
            status, errno, strerror(errno));
    exit(2);
}

/*
 * The shared mapping of one ring (the base handle) and its memfd. Each
 * participant copies the base handle and swaps in its own descriptor.
 */
typedef struct ring_file {
    mqs_bytering_t base;
    int fd;
} ring_file_t;

static void ring_file_create(ring_file_t *file, int64_t capacity,
                             int64_t max_message_size, int64_t maxsize)
{
    int rc;

    file->fd = memfd_create("test-bytering", MFD_CLOEXEC);
    if (file->fd < 0)
        die("memfd_create", file->fd);
    if (ftruncate(file->fd, mqs_br_file_bytes(capacity)) != 0)
        die("ftruncate", -1);
    rc = mqs_br_map(&file->base, file->fd, capacity);
    if (rc != MQS_OK)
        die("mqs_br_map", rc);
    rc = mqs_br_format(&file->base, max_message_size, maxsize, 1, SECRET);
    if (rc != MQS_OK)
        die("mqs_br_format", rc);
}

static void ring_file_destroy(ring_file_t *file)
{
    mqs_br_unmap(&file->base);
    close(file->fd);
}

/* Attach a new participant with its own open file description. */
static void participant_open(mqs_bytering_t *ring, const ring_file_t *file)
{
    char path[64];
    int fd, rc;

    snprintf(path, sizeof(path), "/proc/self/fd/%d", file->fd);
    fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        die("open /proc/self/fd", fd);
    *ring = file->base;
    ring->fd = fd;
    ring->slot = -1;
    ring->gate_cache = 0;
    rc = mqs_br_attach(ring);
    if (rc < 0)
        die("mqs_br_attach", rc);
}

static void participant_close(mqs_bytering_t *ring)
{
    mqs_br_detach(ring);
    close(ring->fd);
    ring->fd = -1;
}

/* Die as SIGKILL would: the lock goes, the shared state stays. */
static void participant_kill(mqs_bytering_t *ring)
{
    close(ring->fd);
    ring->fd = -1;
}

static int put_bytes(mqs_bytering_t *ring, const void *data, size_t length)
{
    const void *parts[1] = {data};
    size_t lengths[1] = {length};

    return mqs_br_try_put(ring, parts, lengths, 1, TYPE_DATA);
}

/* Take one record, copy it to out (at most out_size bytes), unpin.
 * Returns the try_take status; *length gets the record's length. */
static int take_bytes(mqs_bytering_t *ring, void *out, size_t out_size,
                      uint32_t *length)
{
    mqs_br_record_t record;
    int rc = mqs_br_try_take(ring, 0, 0, &record);

    if (rc != MQS_OK)
        return rc;
    *length = record.length;
    memcpy(out, record.payload,
           record.length < out_size ? record.length : out_size);
    mqs_br_unpin(ring, 0, MQS_BR_NO_PIN);
    return MQS_OK;
}

static int64_t aligned_size(int64_t payload)
{
    return (MQS_BR_RECORD_HEADER + payload + MQS_BR_ALIGN - 1)
           & ~(int64_t)(MQS_BR_ALIGN - 1);
}

static int64_t ring_tail(const ring_file_t *file)
{
    return atomic_load(&file->base.header->tail.v.first);
}

static int64_t ring_head(const ring_file_t *file)
{
    return atomic_load(&file->base.header->groups[0].v.cursor.first);
}

/*
 * Play the claim steps of mqs_br_try_put for `ring` at the current tail:
 * announce, then (when `win`) move the tail and confirm. Returns the
 * claimed position.
 */
static int64_t claim_by_hand(mqs_bytering_t *ring, int64_t payload,
                             int win, int confirm)
{
    mqs_br_participant_t *p = mqs_br_participant(ring, ring->slot);
    int64_t size = aligned_size(payload);
    int64_t tail = atomic_load(&ring->header->tail.v.first);
    int64_t claimed = atomic_load(&ring->header->tail.v.second);

    atomic_store(&p->claim_size, size);
    atomic_store(&p->claim_pos, tail);
    atomic_store(&p->claim_state, MQS_BR_CLAIM_INTENT);
    if (win) {
        if (!mqs_pair_cas(&ring->header->tail.v, &tail, &claimed,
                          tail + size, claimed + 1))
            die("tail CAS in claim_by_hand", -1);
        if (confirm)
            atomic_store(&p->claim_state, MQS_BR_CLAIM_WON);
    }
    return tail;
}

/* Write and publish a record claimed by claim_by_hand. */
static void publish_by_hand(mqs_bytering_t *ring, int64_t position,
                            const void *data, uint32_t length)
{
    mqs_br_participant_t *p = mqs_br_participant(ring, ring->slot);
    test_record_header_t *rec = (test_record_header_t *)(
        ring->data + (position & (ring->capacity - 1)));

    atomic_store_explicit(&rec->length, length, memory_order_relaxed);
    atomic_store_explicit(&rec->type, TYPE_DATA, memory_order_relaxed);
    atomic_store_explicit(&rec->owner, (uint16_t)ring->slot,
                          memory_order_relaxed);
    memcpy((unsigned char *)rec + MQS_BR_RECORD_HEADER, data, length);
    atomic_store_explicit(&rec->commit, SECRET ^ (uint64_t)position,
                          memory_order_release);
    atomic_store(&p->claim_state, MQS_BR_CLAIM_NONE);
    atomic_store(&p->claim_pos, MQS_BR_NO_CLAIM);
}

static int64_t counter_repaired(const ring_file_t *file)
{
    return atomic_load(&file->base.header->counters.v.repaired_records);
}

/* -- unit tests ----------------------------------------------------------- */

static void test_put_take_round_trip_sizes(void)
{
    static const size_t sizes[] = {0, 1, 15, 16, 17, 100, 1000, 2032};
    unsigned char in[2048], out[2048];
    ring_file_t file;
    mqs_bytering_t p;
    uint32_t length = 0;

    ring_file_create(&file, 4096, 2032, 0);
    participant_open(&p, &file);
    for (size_t i = 0; i < sizeof(in); i++)
        in[i] = (unsigned char)(i * 7 + 3);
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        CHECK_EQ(put_bytes(&p, in, sizes[i]), MQS_OK);
        CHECK_EQ(mqs_br_count(&p, 0), 1);
        memset(out, 0, sizeof(out));
        CHECK_EQ(take_bytes(&p, out, sizeof(out), &length), MQS_OK);
        CHECK_EQ(length, sizes[i]);
        CHECK(memcmp(in, out, sizes[i]) == 0);
        CHECK_EQ(mqs_br_count(&p, 0), 0);
    }
    CHECK_EQ(take_bytes(&p, out, sizeof(out), &length), MQS_EEMPTY);
    participant_close(&p);
    ring_file_destroy(&file);
}

static void test_put_gathers_parts_in_order(void)
{
    const void *parts[3] = {"abc", "", "defgh"};
    size_t lengths[3] = {3, 0, 5};
    unsigned char out[16];
    ring_file_t file;
    mqs_bytering_t p;
    uint32_t length = 0;

    ring_file_create(&file, 4096, 1024, 0);
    participant_open(&p, &file);
    CHECK_EQ(mqs_br_try_put(&p, parts, lengths, 3, TYPE_DATA), MQS_OK);
    CHECK_EQ(take_bytes(&p, out, sizeof(out), &length), MQS_OK);
    CHECK_EQ(length, 8);
    CHECK(memcmp(out, "abcdefgh", 8) == 0);
    participant_close(&p);
    ring_file_destroy(&file);
}

/* Drive the tail to every 16-byte offset of a one-page ring, then put a
 * record that starts there and runs past the end of the buffer. */
static void test_record_wraps_at_every_aligned_offset(void)
{
    const int64_t capacity = 4096;
    unsigned char in[600], out[600], filler[4096];
    ring_file_t file;
    mqs_bytering_t p;
    uint32_t length = 0;

    memset(filler, 0xee, sizeof(filler));
    for (size_t i = 0; i < sizeof(in); i++)
        in[i] = (unsigned char)(i ^ 0x5a);
    ring_file_create(&file, capacity, capacity - 16, 0);
    participant_open(&p, &file);
    for (int64_t offset = 0; offset < capacity; offset += 16) {
        int64_t gap = (offset - ring_tail(&file)) & (capacity - 1);

        /* A filler record of `gap` bytes moves the tail to `offset`. */
        if (gap > 0) {
            CHECK_EQ(put_bytes(&p, filler, (size_t)(gap - 16)), MQS_OK);
            CHECK_EQ(take_bytes(&p, out, 0, &length), MQS_OK);
        }
        CHECK_EQ(ring_tail(&file) & (capacity - 1), offset);
        CHECK_EQ(put_bytes(&p, in, sizeof(in)), MQS_OK);
        memset(out, 0, sizeof(out));
        CHECK_EQ(take_bytes(&p, out, sizeof(out), &length), MQS_OK);
        CHECK_EQ(length, sizeof(in));
        CHECK(memcmp(in, out, sizeof(in)) == 0);
    }
    participant_close(&p);
    ring_file_destroy(&file);
}

/* The head is published only between a record's commit and its take,
 * and a commit word left from an earlier lap of the ring never counts. */
static void test_head_published_follows_commit_and_take(void)
{
    unsigned char in[100], out[100];
    ring_file_t file;
    mqs_bytering_t p;
    uint32_t length = 0;
    int64_t position;

    memset(in, 0x3c, sizeof(in));
    ring_file_create(&file, 4096, 1024, 0);
    participant_open(&p, &file);
    CHECK_EQ(mqs_br_head_published(&p, 0), 0);

    position = claim_by_hand(&p, sizeof(in), 1, 1);
    CHECK_EQ(mqs_br_head_published(&p, 0), 0);
    publish_by_hand(&p, position, in, sizeof(in));
    CHECK_EQ(mqs_br_head_published(&p, 0), 1);
    CHECK_EQ(take_bytes(&p, out, sizeof(out), &length), MQS_OK);
    CHECK_EQ(mqs_br_head_published(&p, 0), 0);

    /* Three laps, so that every head position has an older commit word. */
    while (ring_tail(&file) < 3 * 4096) {
        CHECK_EQ(put_bytes(&p, in, sizeof(in)), MQS_OK);
        CHECK_EQ(mqs_br_head_published(&p, 0), 1);
        CHECK_EQ(take_bytes(&p, out, sizeof(out), &length), MQS_OK);
        CHECK_EQ(length, sizeof(in));
        CHECK_EQ(mqs_br_head_published(&p, 0), 0);
    }
    CHECK_EQ(ring_head(&file), ring_tail(&file));
    participant_close(&p);
    ring_file_destroy(&file);
}

static void test_put_reports_full_too_big_and_reserved_type(void)
{
    unsigned char data[4096] = {0};
    ring_file_t file;
    mqs_bytering_t p;
    uint32_t length = 0;
    const void *parts[1] = {data};
    size_t lengths[1] = {1};
    int puts = 0;

    ring_file_create(&file, 4096, 1000, 0);
    participant_open(&p, &file);
    CHECK_EQ(put_bytes(&p, data, 1001), MQS_ETOOBIG);
    CHECK_EQ(mqs_br_try_put(&p, parts, lengths, 1, MQS_BR_TYPE_PAD),
             MQS_EINVAL);
    /* 112 payload bytes take 128 bytes: exactly 32 fit in 4096. */
    while (put_bytes(&p, data, 112) == MQS_OK)
        puts++;
    CHECK_EQ(puts, 32);
    CHECK_EQ(mqs_br_count(&p, 0), 32);
    CHECK_EQ(put_bytes(&p, data, 0), MQS_EFULL);
    CHECK_EQ(take_bytes(&p, data, sizeof(data), &length), MQS_OK);
    CHECK_EQ(put_bytes(&p, data, 112), MQS_OK);
    CHECK_EQ(put_bytes(&p, data, 0), MQS_EFULL);
    participant_close(&p);
    ring_file_destroy(&file);
}

static void test_maxsize_bounds_records(void)
{
    unsigned char data[16] = {0};
    ring_file_t file;
    mqs_bytering_t p;
    uint32_t length = 0;

    ring_file_create(&file, 4096, 1000, 3);
    participant_open(&p, &file);
    for (int i = 0; i < 3; i++)
        CHECK_EQ(put_bytes(&p, data, 1), MQS_OK);
    CHECK_EQ(put_bytes(&p, data, 1), MQS_EFULL);
    CHECK_EQ(take_bytes(&p, data, sizeof(data), &length), MQS_OK);
    CHECK_EQ(put_bytes(&p, data, 1), MQS_OK);
    CHECK_EQ(put_bytes(&p, data, 1), MQS_EFULL);
    participant_close(&p);
    ring_file_destroy(&file);
}

static void test_participant_alive_follows_the_lock(void)
{
    ring_file_t file;
    mqs_bytering_t a, b;
    int slot_b;

    ring_file_create(&file, 4096, 1000, 0);
    participant_open(&a, &file);
    participant_open(&b, &file);
    slot_b = b.slot;
    CHECK(a.slot != b.slot);
    CHECK_EQ(mqs_br_participant_alive(&a, slot_b), 1);
    participant_kill(&b);
    CHECK_EQ(mqs_br_participant_alive(&a, slot_b), 0);
    participant_close(&a);
    ring_file_destroy(&file);
}

/* -- crash repair ---------------------------------------------------------- */

static void test_repair_pads_won_claim_of_dead_producer(void)
{
    unsigned char out[64];
    ring_file_t file;
    mqs_bytering_t dead, producer, reader;
    uint32_t length = 0;
    int64_t position;

    ring_file_create(&file, 4096, 1000, 0);
    participant_open(&dead, &file);
    participant_open(&producer, &file);
    participant_open(&reader, &file);
    position = claim_by_hand(&dead, 40, 1, 1);
    CHECK_EQ(put_bytes(&producer, "after", 5), MQS_OK);
    participant_kill(&dead);

    CHECK_EQ(take_bytes(&reader, out, sizeof(out), &length),
             MQS_EAGAIN_STUCK);
    /* The dead claim counts until a repair turns it into padding. */
    CHECK_EQ(mqs_br_count(&reader, 0), 2);
    CHECK_EQ(mqs_br_stalled_owner(&reader, 0), -1);
    CHECK_EQ(mqs_br_repair(&reader), 1);
    CHECK_EQ(counter_repaired(&file), 1);
    /* The padding is no message: the count shows only "after". */
    CHECK_EQ(mqs_br_count(&reader, 0), 1);
    CHECK_EQ(atomic_load(&file.base.header->counters.v.repaired_bytes),
             aligned_size(40));
    CHECK_EQ(take_bytes(&reader, out, sizeof(out), &length), MQS_OK);
    CHECK_EQ(length, 5);
    CHECK(memcmp(out, "after", 5) == 0);
    CHECK_EQ(ring_head(&file), position + aligned_size(40) + aligned_size(5));
    CHECK_EQ(mqs_br_count(&reader, 0), 0);
    CHECK_EQ(mqs_br_repair(&reader), 0);
    participant_close(&producer);
    participant_close(&reader);
    ring_file_destroy(&file);
}

/* Attaching to the slot of a dead producer repairs its record and says
 * so, so the caller can log it. */
static void test_attach_repairs_dead_slot_and_reports_it(void)
{
    char path[64];
    unsigned char out[64];
    ring_file_t file;
    mqs_bytering_t dead, reader, newcomer;
    uint32_t length = 0;
    int dead_slot;

    ring_file_create(&file, 4096, 1000, 0);
    participant_open(&dead, &file);
    participant_open(&reader, &file);
    dead_slot = dead.slot;
    claim_by_hand(&dead, 64, 1, 1);
    CHECK_EQ(put_bytes(&reader, "behind", 6), MQS_OK);
    participant_kill(&dead);

    snprintf(path, sizeof(path), "/proc/self/fd/%d", file.fd);
    newcomer = file.base;
    newcomer.fd = open(path, O_RDWR | O_CLOEXEC);
    CHECK(newcomer.fd >= 0);
    CHECK_EQ(mqs_br_attach(&newcomer), 1);
    CHECK_EQ(newcomer.slot, dead_slot);
    CHECK_EQ(counter_repaired(&file), 1);
    CHECK_EQ(take_bytes(&reader, out, sizeof(out), &length), MQS_OK);
    CHECK(length == 6 && memcmp(out, "behind", 6) == 0);
    participant_close(&newcomer);
    participant_close(&reader);
    ring_file_destroy(&file);
}

/* A producer that died right after winning the CAS, before it stored
 * CLAIM_WON: its claim is still INTENT, and the tail or the record after
 * it shows that it won. */
static void test_repair_pads_intent_claim_that_won(void)
{
    unsigned char out[64];
    ring_file_t file;
    mqs_bytering_t dead, producer, reader;
    uint32_t length = 0;

    ring_file_create(&file, 4096, 1000, 0);
    participant_open(&dead, &file);
    participant_open(&producer, &file);
    participant_open(&reader, &file);

    /* The tail ends right after the dead claim. */
    claim_by_hand(&dead, 24, 1, 0);
    participant_kill(&dead);
    CHECK_EQ(take_bytes(&reader, out, sizeof(out), &length),
             MQS_EAGAIN_STUCK);
    CHECK_EQ(mqs_br_repair(&reader), 1);
    CHECK_EQ(take_bytes(&reader, out, sizeof(out), &length), MQS_EEMPTY);

    /* A published record follows the dead claim. */
    participant_open(&dead, &file);
    claim_by_hand(&dead, 200, 1, 0);
    CHECK_EQ(put_bytes(&producer, "next", 4), MQS_OK);
    participant_kill(&dead);
    CHECK_EQ(mqs_br_repair(&reader), 1);
    CHECK_EQ(take_bytes(&reader, out, sizeof(out), &length), MQS_OK);
    CHECK(length == 4 && memcmp(out, "next", 4) == 0);
    CHECK_EQ(counter_repaired(&file), 2);
    participant_close(&producer);
    participant_close(&reader);
    ring_file_destroy(&file);
}

/* A dead producer's INTENT that lost the CAS is no claim: nothing is
 * padded, and the announcement is cleared. */
/* In a bounded ring the dead producer's reserved place comes back with
 * the repair. */
static void test_repair_returns_reserved_place(void)
{
    unsigned char out[64];
    ring_file_t file;
    mqs_bytering_t dead, producer;
    uint32_t length = 0;

    ring_file_create(&file, 4096, 1000, 2);
    participant_open(&dead, &file);
    participant_open(&producer, &file);
    CHECK_EQ(put_bytes(&dead, "a", 1), MQS_OK);
    claim_by_hand(&dead, 1, 1, 1);
    participant_kill(&dead);
    /* The dead claim counts until it is repaired. */
    CHECK_EQ(mqs_br_count(&producer, 0), 2);
    CHECK_EQ(put_bytes(&producer, "c", 1), MQS_EFULL);
    CHECK_EQ(mqs_br_repair(&producer), 1);
    CHECK_EQ(mqs_br_count(&producer, 0), 1);
    CHECK_EQ(put_bytes(&producer, "c", 1), MQS_OK);
    CHECK_EQ(put_bytes(&producer, "d", 1), MQS_EFULL);
    CHECK_EQ(take_bytes(&producer, out, sizeof(out), &length), MQS_OK);
    CHECK(length == 1 && out[0] == 'a');
    CHECK_EQ(take_bytes(&producer, out, sizeof(out), &length), MQS_OK);
    CHECK(length == 1 && out[0] == 'c');
    CHECK_EQ(mqs_br_count(&producer, 0), 0);
    CHECK_EQ(put_bytes(&producer, "e", 1), MQS_OK);
    CHECK_EQ(put_bytes(&producer, "f", 1), MQS_OK);
    CHECK_EQ(put_bytes(&producer, "g", 1), MQS_EFULL);
    participant_close(&producer);
    ring_file_destroy(&file);
}

static void test_repair_ignores_intent_claim_that_lost(void)
{
    unsigned char out[64];
    ring_file_t file;
    mqs_bytering_t dead, reader;
    uint32_t length = 0;

    ring_file_create(&file, 4096, 1000, 0);
    participant_open(&dead, &file);
    participant_open(&reader, &file);
    claim_by_hand(&dead, 24, 0, 0);
    participant_kill(&dead);
    CHECK_EQ(mqs_br_repair(&reader), 0);
    CHECK_EQ(counter_repaired(&file), 0);
    CHECK_EQ(ring_tail(&file), 0);
    CHECK_EQ(put_bytes(&reader, "x", 1), MQS_OK);
    CHECK_EQ(take_bytes(&reader, out, sizeof(out), &length), MQS_OK);
    CHECK_EQ(length, 1);
    participant_close(&reader);
    ring_file_destroy(&file);
}

static void test_repair_waits_for_live_producer(void)
{
    unsigned char out[64];
    ring_file_t file;
    mqs_bytering_t slow, reader;
    uint32_t length = 0;
    int64_t position;

    ring_file_create(&file, 4096, 1000, 0);
    participant_open(&slow, &file);
    participant_open(&reader, &file);
    position = claim_by_hand(&slow, 9, 1, 1);
    CHECK_EQ(take_bytes(&reader, out, sizeof(out), &length),
             MQS_EAGAIN_STUCK);
    CHECK_EQ(mqs_br_stalled_owner(&reader, 0), slow.slot);
    CHECK_EQ(mqs_br_repair(&reader), 0);
    CHECK_EQ(take_bytes(&reader, out, sizeof(out), &length),
             MQS_EAGAIN_STUCK);
    publish_by_hand(&slow, position, "published", 9);
    CHECK_EQ(take_bytes(&reader, out, sizeof(out), &length), MQS_OK);
    CHECK(length == 9 && memcmp(out, "published", 9) == 0);
    CHECK_EQ(counter_repaired(&file), 0);
    participant_close(&slow);
    participant_close(&reader);
    ring_file_destroy(&file);
}

/*
 * A producer that lost the CAS at position X and died before announcing
 * its next attempt leaves an INTENT at X. The live producer that won X,
 * with the same size, is still writing. Neither a repair nor a new
 * participant taking the dead slot may pad X under the live producer.
 */
static void test_repair_keeps_live_claim_at_dead_intent_position(void)
{
    unsigned char out[64];
    ring_file_t file;
    mqs_bytering_t dead, live, reader, newcomer;
    uint32_t length = 0;
    int64_t lost, won;
    int dead_slot;

    ring_file_create(&file, 4096, 1000, 0);
    participant_open(&dead, &file);
    participant_open(&live, &file);
    participant_open(&reader, &file);
    dead_slot = dead.slot;
    lost = claim_by_hand(&dead, 32, 0, 0);
    won = claim_by_hand(&live, 32, 1, 1);
    CHECK_EQ(lost, won);
    participant_kill(&dead);

    CHECK_EQ(mqs_br_repair(&reader), 0);
    CHECK_EQ(counter_repaired(&file), 0);
    CHECK_EQ(take_bytes(&reader, out, sizeof(out), &length),
             MQS_EAGAIN_STUCK);
    CHECK_EQ(mqs_br_stalled_owner(&reader, 0), live.slot);

    /* Attaching looks at the dead slot first, the lowest free one. */
    participant_open(&newcomer, &file);
    CHECK_EQ(counter_repaired(&file), 0);
    CHECK_EQ(take_bytes(&reader, out, sizeof(out), &length),
             MQS_EAGAIN_STUCK);

    publish_by_hand(&live, won, "0123456789abcdef0123456789abcdef", 32);
    CHECK_EQ(take_bytes(&reader, out, sizeof(out), &length), MQS_OK);
    CHECK_EQ(length, 32);
    CHECK(memcmp(out, "0123456789abcdef0123456789abcdef", 32) == 0);
    /* Once the live record is published, the dead announcement goes. */
    CHECK_EQ(mqs_br_repair(&reader), 0);
    CHECK_EQ(counter_repaired(&file), 0);
    CHECK_EQ(atomic_load(&mqs_br_participant(&reader, dead_slot)->claim_pos),
             MQS_BR_NO_CLAIM);
    participant_close(&newcomer);
    participant_close(&live);
    participant_close(&reader);
    ring_file_destroy(&file);
}

/* Counts move with their positions. A dead consumer's take stays counted,
 * a dead producer's claim counts until a repair pads it, and a bounded
 * ring gets every place back. */
static void test_counts_stay_exact_across_deaths(void)
{
    unsigned char out[64];
    mqs_br_record_t record;
    ring_file_t file;
    mqs_bytering_t consumer, producer, dead;
    uint32_t length = 0;

    ring_file_create(&file, 4096, 1000, 3);
    participant_open(&consumer, &file);
    participant_open(&dead, &file);
    participant_open(&producer, &file);
    CHECK_EQ(put_bytes(&producer, "a", 1), MQS_OK);
    CHECK_EQ(put_bytes(&producer, "b", 1), MQS_OK);
    CHECK_EQ(mqs_br_try_take(&consumer, 0, 0, &record), MQS_OK);
    participant_kill(&consumer);
    CHECK_EQ(mqs_br_count(&producer, 0), 1);

    claim_by_hand(&dead, 8, 1, 1);
    participant_kill(&dead);
    CHECK_EQ(mqs_br_count(&producer, 0), 2);
    CHECK_EQ(put_bytes(&producer, "c", 1), MQS_OK);
    CHECK_EQ(put_bytes(&producer, "d", 1), MQS_EFULL);
    /* settle pads the dead claim although no head has reached it. */
    CHECK_EQ(mqs_br_settle(&producer), 1);
    CHECK_EQ(mqs_br_settle(&producer), 0);
    CHECK_EQ(mqs_br_count(&producer, 0), 2);
    CHECK_EQ(atomic_load(&file.base.header->repairs.v.padded), 1);
    CHECK_EQ(put_bytes(&producer, "d", 1), MQS_OK);
    CHECK_EQ(put_bytes(&producer, "e", 1), MQS_EFULL);
    CHECK_EQ(take_bytes(&producer, out, sizeof(out), &length), MQS_OK);
    CHECK_EQ(length, 1);
    CHECK_EQ(out[0], 'b');
    CHECK_EQ(take_bytes(&producer, out, sizeof(out), &length), MQS_OK);
    CHECK_EQ(length, 1);
    CHECK_EQ(out[0], 'c');
    CHECK_EQ(take_bytes(&producer, out, sizeof(out), &length), MQS_OK);
    CHECK_EQ(length, 1);
    CHECK_EQ(out[0], 'd');
    CHECK_EQ(mqs_br_count(&producer, 0), 0);
    CHECK_EQ(take_bytes(&producer, out, sizeof(out), &length), MQS_EEMPTY);
    /* The repair that settle ran also dropped the dead consumer's pin
     * and counted its record as lost. */
    CHECK_EQ(mqs_br_repair(&producer), 0);
    CHECK_EQ(atomic_load(&file.base.header->counters.v.lost_records), 1);
    participant_close(&producer);
    ring_file_destroy(&file);
}

/* Lock the repair mutex in a child process that exits holding it, so the
 * next locker gets EOWNERDEAD. */
static void die_holding_repair_lock(ring_file_t *file)
{
    pid_t pid = fork();
    int status = 0;

    if (pid < 0)
        die("fork", -1);
    if (pid == 0) {
        pthread_mutex_lock(&file->base.header->repair_lock.v);
        _exit(0);
    }
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status))
        die("waitpid", -1);
}

/* A repairer that died between publishing a pad and counting it, or
 * after journalling and before publishing, is finished from the
 * journal by the next repairer. */
static void test_repair_journal_finishes_dead_repairer(void)
{
    unsigned char out[64];
    ring_file_t file;
    mqs_bytering_t dead, producer;
    mqs_br_repairs_t *repairs;
    test_record_header_t *rec;
    uint32_t length = 0;
    int64_t position;

    for (int published = 0; published <= 1; published++) {
        ring_file_create(&file, 4096, 1000, 0);
        repairs = &file.base.header->repairs.v;
        participant_open(&dead, &file);
        participant_open(&producer, &file);
        CHECK_EQ(put_bytes(&producer, "a", 1), MQS_OK);
        position = claim_by_hand(&dead, 8, 1, 1);
        participant_kill(&dead);
        CHECK_EQ(put_bytes(&producer, "b", 1), MQS_OK);
        CHECK_EQ(mqs_br_count(&producer, 0), 3);

        /* Play the dead repairer: journal, maybe publish the pad. */
        atomic_store(&repairs->journal_padded, 0);
        atomic_store(&repairs->journal_pos, position);
        if (published) {
            rec = (test_record_header_t *)(
                file.base.data + (position & (file.base.capacity - 1)));
            atomic_store(&rec->length, (uint32_t)(aligned_size(8) - 16));
            atomic_store(&rec->type, (uint16_t)MQS_BR_TYPE_PAD);
            atomic_store(&rec->commit, SECRET ^ (uint64_t)position);
        }
        die_holding_repair_lock(&file);

        /* The repair finishes the journal, then pads the claim if the
         * dead repairer had not. */
        CHECK_EQ(mqs_br_repair(&producer), published ? 0 : 1);
        CHECK_EQ(atomic_load(&repairs->padded), 1);
        CHECK_EQ(atomic_load(&repairs->journal_pos), MQS_BR_NO_CLAIM);
        CHECK_EQ(mqs_br_count(&producer, 0), 2);
        CHECK_EQ(take_bytes(&producer, out, sizeof(out), &length), MQS_OK);
        CHECK_EQ(length, 1);
        CHECK_EQ(out[0], 'a');
        CHECK_EQ(take_bytes(&producer, out, sizeof(out), &length), MQS_OK);
        CHECK_EQ(length, 1);
        CHECK_EQ(out[0], 'b');
        CHECK_EQ(mqs_br_count(&producer, 0), 0);
        participant_close(&producer);
        ring_file_destroy(&file);
    }
}

/* A consumer killed between its take and its unpin holds back producers
 * until a repair drops its pin; the record it took counts as lost. */
static void test_repair_drops_pin_of_dead_consumer(void)
{
    unsigned char data[128] = {0};
    mqs_br_record_t record;
    ring_file_t file;
    mqs_bytering_t consumer, producer;
    int puts = 0;

    ring_file_create(&file, 4096, 1000, 0);
    participant_open(&consumer, &file);
    participant_open(&producer, &file);
    CHECK_EQ(put_bytes(&producer, data, 112), MQS_OK);
    CHECK_EQ(mqs_br_try_take(&consumer, 0, 0, &record), MQS_OK);
    participant_kill(&consumer);

    while (put_bytes(&producer, data, 112) == MQS_OK)
        puts++;
    CHECK_EQ(puts, 31);
    CHECK_EQ(mqs_br_repair(&producer), 0);
    CHECK_EQ(atomic_load(&file.base.header->counters.v.lost_records), 1);
    CHECK_EQ(put_bytes(&producer, data, 112), MQS_OK);
    participant_close(&producer);
    ring_file_destroy(&file);
}

/* A consumer killed while it lends records as views holds back
 * producers until a repair drops its view pin. Every view it had not
 * released counts as lost. Released views and a take that found nothing
 * do not count, and a later attach of its slot counts nothing again. */
static void test_repair_counts_views_of_dead_consumer(void)
{
    unsigned char data[128] = {0};
    mqs_br_record_t record;
    ring_file_t file;
    mqs_bytering_t consumer, producer, next;
    int puts = 0;

    ring_file_create(&file, 4096, 1000, 0);
    participant_open(&consumer, &file);
    participant_open(&producer, &file);
    for (int i = 0; i < 3; i++)
        CHECK_EQ(put_bytes(&producer, data, 112), MQS_OK);
    for (int i = 0; i < 3; i++)
        CHECK_EQ(mqs_br_try_take(&consumer, 0, 1, &record), MQS_OK);
    CHECK_EQ(mqs_br_try_take(&consumer, 0, 1, &record), MQS_EEMPTY);
    /* Release the newest view; the oldest stays pinned. */
    mqs_br_unpin(&consumer, 1, 0);
    CHECK_EQ(atomic_load(&mqs_br_participant(&consumer,
                                             consumer.slot)->views), 2);
    participant_kill(&consumer);

    while (put_bytes(&producer, data, 112) == MQS_OK)
        puts++;
    CHECK_EQ(puts, 29);
    CHECK_EQ(mqs_br_repair(&producer), 0);
    CHECK_EQ(atomic_load(&file.base.header->counters.v.lost_records), 2);
    CHECK_EQ(put_bytes(&producer, data, 112), MQS_OK);
    CHECK_EQ(mqs_br_repair(&producer), 0);
    participant_open(&next, &file);
    CHECK_EQ(atomic_load(&file.base.header->counters.v.lost_records), 2);

    /* A live consumer that releases every view leaves nothing to count
     * when it dies afterwards. */
    CHECK_EQ(mqs_br_try_take(&next, 0, 1, &record), MQS_OK);
    mqs_br_unpin(&next, 1, MQS_BR_NO_PIN);
    CHECK_EQ(atomic_load(&mqs_br_participant(&next, next.slot)->views), 0);
    participant_kill(&next);
    CHECK_EQ(mqs_br_repair(&producer), 0);
    CHECK_EQ(atomic_load(&file.base.header->counters.v.lost_records), 2);
    participant_close(&producer);
    ring_file_destroy(&file);
}

/* A consumer killed mid-batch loses the copies it unpinned but had not
 * returned, plus the record under its get pin: the reaper counts them
 * all, once. Copies returned or detached count nothing. */
static void test_repair_counts_copies_of_dead_consumer(void)
{
    unsigned char data[128] = {0};
    mqs_br_record_t record;
    ring_file_t file;
    mqs_bytering_t consumer, producer, next;

    ring_file_create(&file, 4096, 1000, 0);
    participant_open(&consumer, &file);
    participant_open(&producer, &file);
    for (int i = 0; i < 8; i++)
        CHECK_EQ(put_bytes(&producer, data, 112), MQS_OK);

    /* Three copies unpinned, a fourth take still pinned. */
    for (int i = 0; i < 3; i++) {
        CHECK_EQ(mqs_br_try_take(&consumer, 0, 0, &record), MQS_OK);
        mqs_br_set_copies(&consumer, i + 1);
        mqs_br_unpin(&consumer, 0, MQS_BR_NO_PIN);
    }
    CHECK_EQ(mqs_br_try_take(&consumer, 0, 0, &record), MQS_OK);
    participant_kill(&consumer);
    CHECK_EQ(mqs_br_repair(&producer), 0);
    CHECK_EQ(atomic_load(&file.base.header->counters.v.lost_records), 4);
    CHECK_EQ(atomic_load(&mqs_br_participant(&producer, 0)->copies), 0);

    /* The next owner of the slot does not count them again. */
    participant_open(&next, &file);
    CHECK_EQ(next.slot, 0);
    CHECK_EQ(mqs_br_repair(&producer), 0);
    CHECK_EQ(atomic_load(&file.base.header->counters.v.lost_records), 4);

    /* Copies returned to the caller count nothing. */
    CHECK_EQ(mqs_br_try_take(&next, 0, 0, &record), MQS_OK);
    mqs_br_set_copies(&next, 1);
    mqs_br_unpin(&next, 0, MQS_BR_NO_PIN);
    mqs_br_set_copies(&next, 0);
    participant_kill(&next);
    CHECK_EQ(mqs_br_repair(&producer), 0);
    CHECK_EQ(atomic_load(&file.base.header->counters.v.lost_records), 4);

    /* A copy without a pin counts when its owner dies... */
    participant_open(&next, &file);
    CHECK_EQ(mqs_br_try_take(&next, 0, 0, &record), MQS_OK);
    mqs_br_set_copies(&next, 1);
    mqs_br_unpin(&next, 0, MQS_BR_NO_PIN);
    participant_kill(&next);
    CHECK_EQ(mqs_br_repair(&producer), 0);
    CHECK_EQ(atomic_load(&file.base.header->counters.v.lost_records), 5);

    /* ...but not when its owner detaches. */
    participant_open(&next, &file);
    CHECK_EQ(mqs_br_try_take(&next, 0, 0, &record), MQS_OK);
    mqs_br_set_copies(&next, 1);
    mqs_br_unpin(&next, 0, MQS_BR_NO_PIN);
    participant_close(&next);
    CHECK_EQ(atomic_load(&mqs_br_participant(&producer, 0)->copies), 0);
    participant_open(&next, &file);
    CHECK_EQ(mqs_br_repair(&producer), 0);
    CHECK_EQ(atomic_load(&file.base.header->counters.v.lost_records), 5);

    /* The ring is not wedged: the record left and new ones go round. */
    for (int i = 0; i < 40; i++) {
        CHECK_EQ(mqs_br_try_take(&next, 0, 0, &record), MQS_OK);
        mqs_br_unpin(&next, 0, MQS_BR_NO_PIN);
        CHECK_EQ(put_bytes(&producer, data, 112), MQS_OK);
    }
    CHECK_EQ(mqs_br_count(&producer, 0), 1);
    participant_close(&next);
    participant_close(&producer);
    ring_file_destroy(&file);
}

/* -- stress ---------------------------------------------------------------- */

#define STRESS_PRODUCERS 3
#define STRESS_CONSUMERS 3
#define MESSAGE_HEADER 16
#define STRESS_MAX_MESSAGE 3072

/* Message: producer id, sequence, body length, CRC-32 of the body, then
 * the body. */
typedef struct message_header {
    uint32_t producer;
    uint32_t sequence;
    uint32_t body_length;
    uint32_t crc;
} message_header_t;

typedef struct stress_run {
    ring_file_t file;
    int64_t per_producer;
    int64_t total;
    int64_t deadline_ns;
    atomic_llong taken;
    atomic_llong put[STRESS_PRODUCERS];
    atomic_uchar *seen;          /* [producer * per_producer + sequence] */
    atomic_int timed_out;
} stress_run_t;

typedef struct stress_thread {
    stress_run_t *run;
    int index;
    int64_t received;
} stress_thread_t;

static uint32_t crc32_ieee(const unsigned char *data, size_t length)
{
    uint32_t crc = 0xffffffffu;

    for (size_t i = 0; i < length; i++) {
        crc ^= data[i];
        for (int bit = 0; bit < 8; bit++)
            crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

static uint64_t xorshift64(uint64_t *state)
{
    uint64_t x = *state;

    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    return x;
}

static int past_deadline(stress_run_t *run)
{
    if (mqs_monotonic_ns() < run->deadline_ns)
        return 0;
    atomic_store(&run->timed_out, 1);
    return 1;
}

static void *stress_producer(void *arg)
{
    stress_thread_t *self = arg;
    stress_run_t *run = self->run;
    static _Thread_local unsigned char body[STRESS_MAX_MESSAGE];
    uint64_t random_state = 0x9e3779b97f4a7c15ULL * (uint64_t)(self->index + 1);
    mqs_bytering_t ring;

    participant_open(&ring, &run->file);
    for (int64_t seq = 0; seq < run->per_producer; seq++) {
        message_header_t header;
        const void *parts[2] = {&header, body};
        size_t lengths[2];
        uint64_t r = xorshift64(&random_state);
        /* Mostly small bodies, now and then up to the maximum. */
        size_t body_length = (r & 7) == 0
            ? (size_t)((r >> 8) % (STRESS_MAX_MESSAGE - MESSAGE_HEADER + 1))
            : (size_t)((r >> 8) % 200);
        int rc;

        for (size_t i = 0; i < body_length; i++)
            body[i] = (unsigned char)(xorshift64(&random_state) >> 24);
        header.producer = (uint32_t)self->index;
        header.sequence = (uint32_t)seq;
        header.body_length = (uint32_t)body_length;
        header.crc = crc32_ieee(body, body_length);
        lengths[0] = sizeof(header);
        lengths[1] = body_length;

        for (;;) {
            mqs_waitword_t *word = mqs_br_not_full(&ring);
            uint32_t epoch;

            rc = mqs_br_try_put(&ring, parts, lengths, 2, TYPE_DATA);
            if (rc != MQS_EFULL)
                break;
            epoch = mqs_wait_prepare(word);
            rc = mqs_br_try_put(&ring, parts, lengths, 2, TYPE_DATA);
            if (rc == MQS_EFULL)
                mqs_wait_park(word, epoch, 10 * 1000 * 1000, 1);
            mqs_wait_finish(word);
            if (rc != MQS_EFULL || past_deadline(run))
                break;
        }
        if (rc != MQS_OK) {
            CHECK_EQ(rc, MQS_OK);
            break;
        }
        atomic_fetch_add(&run->put[self->index], 1);
    }
    participant_close(&ring);
    return NULL;
}

/* Check one message; returns 0 when it is malformed. */
static int check_message(stress_run_t *run, const unsigned char *payload,
                         uint32_t length, int64_t *last_sequence)
{
    message_header_t header;

    if (length < MESSAGE_HEADER) {
        CHECK_EQ(length, MESSAGE_HEADER);
        return 0;
    }
    memcpy(&header, payload, sizeof(header));
    if (header.producer >= STRESS_PRODUCERS
        || header.sequence >= run->per_producer
        || header.body_length != length - MESSAGE_HEADER) {
        CHECK(!"message header out of range");
        return 0;
    }
    CHECK_EQ(crc32_ieee(payload + MESSAGE_HEADER, header.body_length),
             header.crc);
    /* FIFO: one consumer sees each producer's messages in order. */
    if ((int64_t)header.sequence <= last_sequence[header.producer])
        CHECK_EQ(header.sequence, last_sequence[header.producer] + 1);
    last_sequence[header.producer] = header.sequence;
    atomic_fetch_add(&run->seen[header.producer * run->per_producer
                                + header.sequence], 1);
    return 1;
}

static void *stress_consumer(void *arg)
{
    stress_thread_t *self = arg;
    stress_run_t *run = self->run;
    static _Thread_local unsigned char copy[STRESS_MAX_MESSAGE];
    int64_t last_sequence[STRESS_PRODUCERS];
    /* Odd consumers read in place, as get_view does; even ones copy. */
    int view = self->index & 1;
    mqs_bytering_t ring;

    for (int i = 0; i < STRESS_PRODUCERS; i++)
        last_sequence[i] = -1;
    participant_open(&ring, &run->file);
    while (atomic_load(&run->taken) < run->total && !past_deadline(run)) {
        mqs_waitword_t *word = mqs_br_not_empty(&ring);
        mqs_br_record_t record;
        uint32_t epoch;
        int rc = mqs_br_try_take(&ring, 0, view, &record);

        if (rc == MQS_OK) {
            atomic_fetch_add(&run->taken, 1);
            if (view) {
                check_message(run, record.payload, record.length,
                              last_sequence);
                mqs_br_unpin(&ring, 1, MQS_BR_NO_PIN);
            } else {
                uint32_t length = record.length;
                if (length <= sizeof(copy))
                    memcpy(copy, record.payload, length);
                mqs_br_unpin(&ring, 0, MQS_BR_NO_PIN);
                if (length <= sizeof(copy))
                    check_message(run, copy, length, last_sequence);
                else
                    CHECK(length <= sizeof(copy));
            }
            self->received++;
            continue;
        }
        if (rc != MQS_EEMPTY && rc != MQS_EAGAIN_STUCK) {
            CHECK_EQ(rc, MQS_EEMPTY);
            break;
        }
        epoch = mqs_wait_prepare(word);
        if (mqs_br_count(&ring, 0) == 0
            && atomic_load(&run->taken) < run->total)
            mqs_wait_park(word, epoch, 10 * 1000 * 1000, 1);
        mqs_wait_finish(word);
    }
    participant_close(&ring);
    return NULL;
}

static void run_stress(int64_t records, int64_t maxsize, int timeout_s)
{
    stress_run_t *run = calloc(1, sizeof(*run));
    stress_thread_t producers[STRESS_PRODUCERS];
    stress_thread_t consumers[STRESS_CONSUMERS];
    pthread_t producer_ids[STRESS_PRODUCERS];
    pthread_t consumer_ids[STRESS_CONSUMERS];
    int64_t received = 0;
    int64_t missing = 0, duplicated = 0;

    if (run == NULL)
        die("calloc", -1);
    run->per_producer = records / STRESS_PRODUCERS;
    run->total = run->per_producer * STRESS_PRODUCERS;
    run->deadline_ns = mqs_monotonic_ns() + (int64_t)timeout_s * 1000000000;
    run->seen = calloc((size_t)run->total, 1);
    if (run->seen == NULL)
        die("calloc", -1);
    /* 64 KiB: small enough that the ring wraps thousands of times. */
    ring_file_create(&run->file, 1 << 16, STRESS_MAX_MESSAGE, maxsize);

    for (int i = 0; i < STRESS_CONSUMERS; i++) {
        consumers[i] = (stress_thread_t){run, i, 0};
        pthread_create(&consumer_ids[i], NULL, stress_consumer, &consumers[i]);
    }
    for (int i = 0; i < STRESS_PRODUCERS; i++) {
        producers[i] = (stress_thread_t){run, i, 0};
        pthread_create(&producer_ids[i], NULL, stress_producer, &producers[i]);
    }
    for (int i = 0; i < STRESS_PRODUCERS; i++)
        pthread_join(producer_ids[i], NULL);
    for (int i = 0; i < STRESS_CONSUMERS; i++) {
        pthread_join(consumer_ids[i], NULL);
        received += consumers[i].received;
    }

    if (atomic_load(&run->timed_out)) {
        fprintf(stderr, "FAIL stress (maxsize %" PRId64 "): not done after "
                "%d s; taken %lld of %" PRId64 "\n", maxsize, timeout_s,
                (long long)atomic_load(&run->taken), run->total);
        for (int i = 0; i < STRESS_PRODUCERS; i++)
            fprintf(stderr, "  producer %d put %lld\n", i,
                    (long long)atomic_load(&run->put[i]));
        atomic_fetch_add(&checks_failed, 1);
    }
    for (int64_t i = 0; i < run->total; i++) {
        unsigned char n = atomic_load(&run->seen[i]);
        missing += n == 0;
        duplicated += n > 1;
    }
    CHECK_EQ(received, run->total);
    CHECK_EQ(missing, 0);
    CHECK_EQ(duplicated, 0);
    CHECK_EQ(mqs_br_count(&run->file.base, 0), 0);
    CHECK_EQ(counter_repaired(&run->file), 0);
    CHECK_EQ(atomic_load(&run->file.base.header->counters.v.lost_records), 0);
    ring_file_destroy(&run->file);
    free(run->seen);
    free(run);
}

int main(int argc, char **argv)
{
    int64_t records = 200000;
    int timeout_s = 120;

    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--records") == 0)
            records = strtoll(argv[i + 1], NULL, 10);
        else if (strcmp(argv[i], "--timeout-seconds") == 0)
            timeout_s = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "unknown option %s; expected --records N or "
                    "--timeout-seconds S\n", argv[i]);
            return 2;
        }
    }
    if (records < STRESS_PRODUCERS || timeout_s < 1) {
        fprintf(stderr, "--records must be at least %d and "
                "--timeout-seconds at least 1\n", STRESS_PRODUCERS);
        return 2;
    }

    test_put_take_round_trip_sizes();
    test_put_gathers_parts_in_order();
    test_record_wraps_at_every_aligned_offset();
    test_head_published_follows_commit_and_take();
    test_put_reports_full_too_big_and_reserved_type();
    test_maxsize_bounds_records();
    test_participant_alive_follows_the_lock();
    test_repair_pads_won_claim_of_dead_producer();
    test_attach_repairs_dead_slot_and_reports_it();
    test_repair_pads_intent_claim_that_won();
    test_repair_returns_reserved_place();
    test_repair_ignores_intent_claim_that_lost();
    test_repair_waits_for_live_producer();
    test_repair_keeps_live_claim_at_dead_intent_position();
    test_repair_drops_pin_of_dead_consumer();
    test_repair_counts_views_of_dead_consumer();
    test_repair_counts_copies_of_dead_consumer();
    test_counts_stay_exact_across_deaths();
    test_repair_journal_finishes_dead_repairer();
    run_stress(records, 0, timeout_s);
    run_stress(records / 2, 64, timeout_s);

    printf("%d passed, %d failed\n", atomic_load(&checks_passed),
           atomic_load(&checks_failed));
    return atomic_load(&checks_failed) > 0;
}
