/*
 * mqs_durable.h: the control block of a durable SharedQueue
 * (SharedQueue(persist=path)), shared by every process that uses the
 * queue through a 4 KiB file, `queue.ctl`, in the log directory.
 *
 * A durable queue has three parts: the shared ring (the inbox) that
 * producers put into, the segment log that holds every message, and
 * this block. The process that holds the log's writer lock (the
 * appender) moves records from the inbox into the log in order and
 * publishes how far it got; consumers take log offsets from `cursor`.
 *
 *   block  field             written by   meaning
 *   0      magic, version    appender     identifies the file
 *   1      ring_secret       appender     secret of the inbox ring this
 *                                         state belongs to; 0 before the
 *                                         first appender of that ring
 *   2      cursor            consumers    next log offset to hand out
 *   3      appended_offset   appender     log end offset: consumers take
 *                                         offsets below it
 *   4      appended_pos      appender     inbox position up to which every
 *                                         record is in the log
 *   5      durable_pos       appender     inbox position up to which every
 *                                         record is flushed to disk
 *   6      not_empty         appender     consumers wait on it
 *   7      progress          appender     producers of fsync="always" wait
 *                                         on it for durable_pos
 *   8      groups            appender     consumer groups, 1 to 8
 *   9      maxsize           appender     bound on stored messages, 0: none
 *   10     retained_offset   appender     first offset still in the log;
 *                                         readers drop mappings below it
 *   11     delayed           appender     delayed messages not yet due
 *   12     lost              consumers    messages a consumer took but
 *                                         found deleted by retention
 *                                         (`reading` should keep it 0)
 *   13-19  group_cursor[7]   consumers    `cursor` of groups 1 to 7
 *   20     segment_bytes     appender     size of new segment files
 *   21     stored            producers,   messages reserved by puts and
 *                            consumers    not yet taken by every group
 *                                         (bounded queues only)
 *   22     taken_floor       consumers    smallest group cursor already
 *                                         subtracted from `stored`
 *   23..   reading[256]      consumers    per ring participant slot: the
 *                                         lowest offset one of its claims
 *                                         may still read, plus 1; 0: none
 *   then   gather_count      appender     fsync="always": inbox records
 *                                         the appender waits for before
 *                                         its next sync; 0: none
 *   then   gathered          producers    the appender waits on it for
 *                                         gather_count
 *   then   damaged           consumers    messages a consumer took and
 *                                         could not read: their log
 *                                         record failed its CRC check
 *                                         (zero in files of older mqs)
 *
 * Group 0 uses `cursor`, so a version 1 file (blocks 0-7) reads as a
 * one-group queue. A version 2 file (4 KiB) grows to 8 KiB with zero
 * bytes, which read as "no reservation" and "no claim being read".
 *
 * Claims and retention. A consumer stores the cursor it is about to
 * claim from in its `reading` word, then claims by CAS on the cursor,
 * reads the records, and clears the word. Retention deletes segments
 * below min(cursors read before, every live slot's `reading`), with a
 * seq_cst fence between its cursor loads and its `reading` loads, and
 * the consumer has one between its store and its cursor load. So
 * either retention sees the consumer's word, or the consumer's cursor
 * load comes later and returns a cursor (hence claims offsets) at or
 * above the floor retention computed. A paused consumer therefore
 * keeps its record on disk however long it pauses.
 * A process whose ring secret differs from ring_secret waits until an
 * appender of its ring has set the block up. The block lives in a file,
 * not in the ring, so it outlives a ring that every process closed; its
 * cursor is also committed to the log (consumer group "queue") so that
 * it survives a reboot.
 */
#ifndef MQS_DURABLE_H
#define MQS_DURABLE_H

#include <stdint.h>

#include "mqs_atomic.h"
#include "mqs_wait.h"

#define MQS_DQ_MAGIC 0x3154434451534d51ULL /* "QMSQDCT1" little-endian */
#define MQS_DQ_VERSION 3
#define MQS_DQ_MAX_GROUPS 8
#define MQS_DQ_FILE_BYTES 8192
/* One `reading` word per participant slot of the inbox ring
 * (MQS_BR_MAX_PARTICIPANTS in mqs_bytering.h). */
#define MQS_DQ_READERS 256

#define MQS_DQ_BLOCK(type) \
    union { type v; char pad[MQS_PAD_BYTES]; }

typedef struct mqs_dq_id {
    uint64_t magic;
    uint32_t version;
} mqs_dq_id_t;

typedef struct mqs_dq_control {
    MQS_DQ_BLOCK(mqs_dq_id_t) id;
    MQS_DQ_BLOCK(_Atomic uint64_t) ring_secret;
    MQS_DQ_BLOCK(_Atomic int64_t) cursor;
    MQS_DQ_BLOCK(_Atomic int64_t) appended_offset;
    MQS_DQ_BLOCK(_Atomic int64_t) appended_pos;
    MQS_DQ_BLOCK(_Atomic int64_t) durable_pos;
    MQS_DQ_BLOCK(mqs_waitword_t) not_empty;
    MQS_DQ_BLOCK(mqs_waitword_t) progress;
    MQS_DQ_BLOCK(_Atomic int64_t) groups;
    MQS_DQ_BLOCK(_Atomic int64_t) maxsize;
    MQS_DQ_BLOCK(_Atomic int64_t) retained_offset;
    MQS_DQ_BLOCK(_Atomic int64_t) delayed;
    MQS_DQ_BLOCK(_Atomic int64_t) lost;
    MQS_DQ_BLOCK(_Atomic int64_t) group_cursor[MQS_DQ_MAX_GROUPS - 1];
    MQS_DQ_BLOCK(_Atomic int64_t) segment_bytes;
    MQS_DQ_BLOCK(_Atomic int64_t) stored;
    MQS_DQ_BLOCK(_Atomic int64_t) taken_floor;
    /* Dense: each word is written twice per claim by one process, and
     * read by the appender once per commit round. */
    _Atomic int64_t reading[MQS_DQ_READERS];
    MQS_DQ_BLOCK(_Atomic int64_t) gather_count;
    MQS_DQ_BLOCK(mqs_waitword_t) gathered;
    MQS_DQ_BLOCK(_Atomic int64_t) damaged;
} mqs_dq_control_t;

_Static_assert(sizeof(mqs_dq_control_t) <= MQS_DQ_FILE_BYTES,
               "control block must fit its file");

/* Fields read and written with mqs_dq_get and mqs_dq_set. */
enum {
    MQS_DQ_CURSOR = 0,
    MQS_DQ_APPENDED_OFFSET = 1,
    MQS_DQ_APPENDED_POS = 2,
    MQS_DQ_DURABLE_POS = 3,
    MQS_DQ_GROUPS = 4,
    MQS_DQ_MAXSIZE = 5,
    MQS_DQ_RETAINED_OFFSET = 6,
    MQS_DQ_DELAYED = 7,
    MQS_DQ_LOST = 8,
    MQS_DQ_SEGMENT_BYTES = 9,
    MQS_DQ_STORED = 10,
    MQS_DQ_DAMAGED = 11,
};

static inline _Atomic int64_t *mqs_dq_field(mqs_dq_control_t *c, int field)
{
    switch (field) {
    case MQS_DQ_CURSOR:
        return &c->cursor.v;
    case MQS_DQ_APPENDED_OFFSET:
        return &c->appended_offset.v;
    case MQS_DQ_APPENDED_POS:
        return &c->appended_pos.v;
    case MQS_DQ_GROUPS:
        return &c->groups.v;
    case MQS_DQ_MAXSIZE:
        return &c->maxsize.v;
    case MQS_DQ_RETAINED_OFFSET:
        return &c->retained_offset.v;
    case MQS_DQ_DELAYED:
        return &c->delayed.v;
    case MQS_DQ_LOST:
        return &c->lost.v;
    case MQS_DQ_SEGMENT_BYTES:
        return &c->segment_bytes.v;
    case MQS_DQ_STORED:
        return &c->stored.v;
    case MQS_DQ_DAMAGED:
        return &c->damaged.v;
    default:
        return &c->durable_pos.v;
    }
}

/* Cursor of consumer group `group` (0 to MQS_DQ_MAX_GROUPS - 1). */
static inline _Atomic int64_t *mqs_dq_cursor(mqs_dq_control_t *c, int group)
{
    return group == 0 ? &c->cursor.v : &c->group_cursor[group - 1].v;
}

static inline int64_t mqs_dq_get_cursor(mqs_dq_control_t *c, int group)
{
    return atomic_load_explicit(mqs_dq_cursor(c, group),
                                memory_order_acquire);
}

static inline void mqs_dq_set_cursor(mqs_dq_control_t *c, int group,
                                     int64_t v)
{
    atomic_store_explicit(mqs_dq_cursor(c, group), v, memory_order_release);
}

static inline void mqs_dq_add(mqs_dq_control_t *c, int field, int64_t n)
{
    atomic_fetch_add_explicit(mqs_dq_field(c, field), n,
                              memory_order_acq_rel);
}

/* Smallest cursor of the first `groups` groups: every offset below it
 * has been taken by every group. */
static inline int64_t mqs_dq_min_cursor(mqs_dq_control_t *c, int groups)
{
    int64_t low = mqs_dq_get_cursor(c, 0);

    for (int g = 1; g < groups; g++) {
        int64_t v = mqs_dq_get_cursor(c, g);
        if (v < low)
            low = v;
    }
    return low;
}

static inline int64_t mqs_dq_get(mqs_dq_control_t *c, int field)
{
    return atomic_load_explicit(mqs_dq_field(c, field), memory_order_acquire);
}

static inline void mqs_dq_set(mqs_dq_control_t *c, int field, int64_t v)
{
    atomic_store_explicit(mqs_dq_field(c, field), v, memory_order_release);
}

static inline mqs_waitword_t *mqs_dq_not_empty(mqs_dq_control_t *c)
{
    return &c->not_empty.v;
}

static inline mqs_waitword_t *mqs_dq_progress(mqs_dq_control_t *c)
{
    return &c->progress.v;
}

/* Producers registered on `progress` (waiting for durable_pos). */
static inline uint32_t mqs_dq_progress_waiters(mqs_dq_control_t *c)
{
    return mqs_load_seq_cst_u32(&c->progress.v.waiters);
}

/*
 * Group commit under fsync="always". After a sync, the appender requests
 * a wake-up once the inbox contains `count` records (one per producer
 * that the sync woke), so that its next sync covers them all. It sleeps
 * on `gathered` until then or a short deadline. A producer that finds
 * gather_count > 0 after its put, and at least that many records in the
 * inbox, signals `gathered`. Both sides store or load gather_count
 * seq_cst before a full fence (mqs_wait_prepare on either side), so
 * either the producer sees the request or the appender's re-check of the
 * inbox sees the producer's record.
 */
static inline void mqs_dq_set_gather(mqs_dq_control_t *c, int64_t count)
{
    atomic_store_explicit(&c->gather_count.v, count, memory_order_seq_cst);
}

static inline int64_t mqs_dq_gather_count(mqs_dq_control_t *c)
{
    return atomic_load_explicit(&c->gather_count.v, memory_order_seq_cst);
}

static inline mqs_waitword_t *mqs_dq_gathered(mqs_dq_control_t *c)
{
    return &c->gathered.v;
}

static inline uint64_t mqs_dq_secret(mqs_dq_control_t *c)
{
    return atomic_load_explicit(&c->ring_secret.v, memory_order_acquire);
}

/*
 * Set the block up for the inbox ring with `secret`: positions, offsets
 * and the queue's settings first, then the secret with release, so a
 * process that reads its secret also reads the rest. `cursors` has
 * one cursor per group; `stored` counts the messages of a bounded
 * queue already stored (inbox, log backlog and delayed). Every
 * `reading` word is cleared: they belong to the participants of the
 * previous ring. The wait words are left alone: processes may
 * already wait on them, and a new file's zero bytes are a valid start.
 */
static inline void mqs_dq_setup(mqs_dq_control_t *c, uint64_t secret,
                                const int64_t *cursors, int groups,
                                int64_t maxsize, int64_t appended_offset,
                                int64_t position, int64_t retained_offset,
                                int64_t delayed, int64_t stored)
{
    atomic_store_explicit(&c->ring_secret.v, 0, memory_order_release);
    c->id.v.magic = MQS_DQ_MAGIC;
    c->id.v.version = MQS_DQ_VERSION;
    for (int g = 0; g < MQS_DQ_MAX_GROUPS; g++)
        mqs_dq_set_cursor(c, g, g < groups ? cursors[g] : appended_offset);
    mqs_dq_set(c, MQS_DQ_GROUPS, groups);
    mqs_dq_set(c, MQS_DQ_MAXSIZE, maxsize);
    mqs_dq_set(c, MQS_DQ_RETAINED_OFFSET, retained_offset);
    mqs_dq_set(c, MQS_DQ_DELAYED, delayed);
    mqs_dq_set(c, MQS_DQ_STORED, stored);
    atomic_store_explicit(&c->taken_floor.v, mqs_dq_min_cursor(c, groups),
                          memory_order_release);
    for (int slot = 0; slot < MQS_DQ_READERS; slot++)
        atomic_store_explicit(&c->reading[slot], 0, memory_order_release);
    mqs_dq_set_gather(c, 0);
    mqs_dq_set(c, MQS_DQ_APPENDED_OFFSET, appended_offset);
    mqs_dq_set(c, MQS_DQ_APPENDED_POS, position);
    mqs_dq_set(c, MQS_DQ_DURABLE_POS, position);
    atomic_store_explicit(&c->ring_secret.v, secret, memory_order_release);
}

/*
 * Take up to `max_n` log offsets for a consumer of `group`: returns how
 * many (0 when the group has taken every appended offset) and the first
 * in *first.
 */
static inline int64_t mqs_dq_claim(mqs_dq_control_t *c, int group,
                                   int64_t max_n, int64_t *first)
{
    _Atomic int64_t *word = mqs_dq_cursor(c, group);
    int64_t cursor = atomic_load_explicit(word, memory_order_acquire);

    for (;;) {
        int64_t end = mqs_dq_get(c, MQS_DQ_APPENDED_OFFSET);
        int64_t n = end - cursor;

        if (n <= 0)
            return 0;
        if (n > max_n)
            n = max_n;
        if (atomic_compare_exchange_weak_explicit(
                word, &cursor, cursor + n, memory_order_acq_rel,
                memory_order_acquire)) {
            *first = cursor;
            return n;
        }
    }
}

/*
 * Subtract from `stored` the messages that every group took since the
 * last call (the rise of the smallest cursor). Any thread may call it:
 * the CAS on taken_floor makes each rise subtracted exactly once. A
 * caller that loses the CAS to a larger floor leaves the rest to the
 * winner.
 */
static inline void mqs_dq_release_taken(mqs_dq_control_t *c, int groups)
{
    int64_t low = mqs_dq_min_cursor(c, groups);
    int64_t floor = atomic_load_explicit(&c->taken_floor.v,
                                         memory_order_acquire);

    while (low > floor) {
        if (atomic_compare_exchange_weak_explicit(
                &c->taken_floor.v, &floor, low, memory_order_acq_rel,
                memory_order_acquire)) {
            atomic_fetch_sub_explicit(&c->stored.v, low - floor,
                                      memory_order_acq_rel);
            return;
        }
    }
}

/*
 * Reserve room for one message in a queue bounded by `maxsize` (> 0):
 * returns 1 and counts it in `stored`, or 0 when `maxsize` messages are
 * stored. Between the winner's CAS on taken_floor and its subtraction,
 * `stored` is briefly too high, so a reservation may fail early but
 * never overshoots.
 */
static inline int mqs_dq_reserve(mqs_dq_control_t *c, int groups,
                                 int64_t maxsize)
{
    int64_t stored;

    mqs_dq_release_taken(c, groups);
    stored = atomic_load_explicit(&c->stored.v, memory_order_acquire);
    do {
        if (stored >= maxsize)
            return 0;
    } while (!atomic_compare_exchange_weak_explicit(
        &c->stored.v, &stored, stored + 1, memory_order_acq_rel,
        memory_order_acquire));
    return 1;
}

/* Give back a reservation whose put failed. */
static inline void mqs_dq_unreserve(mqs_dq_control_t *c)
{
    atomic_fetch_sub_explicit(&c->stored.v, 1, memory_order_acq_rel);
}

/*
 * Announce that participant `slot` may read offsets from `offset` on
 * (-1: none), before claiming from the cursor. The seq_cst fence orders
 * this store before the claim's cursor load (see "Claims and retention"
 * above).
 */
static inline void mqs_dq_set_reading(mqs_dq_control_t *c, int slot,
                                      int64_t offset)
{
    atomic_store_explicit(&c->reading[slot], offset + 1,
                          memory_order_seq_cst);
    atomic_thread_fence(memory_order_seq_cst);
}

/* Lowest offset participant `slot` may read, or -1 for none. Call
 * mqs_dq_reading_fence once after loading the cursors a retention floor
 * comes from and before these loads. */
static inline int64_t mqs_dq_get_reading(mqs_dq_control_t *c, int slot)
{
    return atomic_load_explicit(&c->reading[slot], memory_order_seq_cst) - 1;
}

static inline void mqs_dq_reading_fence(void)
{
    atomic_thread_fence(memory_order_seq_cst);
}

#endif /* MQS_DURABLE_H */
