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
 *                                         found deleted (it paused past
 *                                         the retention delay)
 *   13-19  group_cursor[7]   consumers    `cursor` of groups 1 to 7
 *   20     segment_bytes     appender     size of new segment files
 *
 * Group 0 uses `cursor`, so a version 1 file (blocks 0-7) reads as a
 * one-group queue.
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
#define MQS_DQ_VERSION 2
#define MQS_DQ_MAX_GROUPS 8
#define MQS_DQ_FILE_BYTES 4096

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

static inline uint64_t mqs_dq_secret(mqs_dq_control_t *c)
{
    return atomic_load_explicit(&c->ring_secret.v, memory_order_acquire);
}

/*
 * Set the block up for the inbox ring with `secret`: positions, offsets
 * and the queue's settings first, then the secret with release, so a
 * process that reads its secret also reads the rest. `cursors` has
 * one cursor per group. The wait words are left alone: processes may
 * already wait on them, and a new file's zero bytes are a valid start.
 */
static inline void mqs_dq_setup(mqs_dq_control_t *c, uint64_t secret,
                                const int64_t *cursors, int groups,
                                int64_t maxsize, int64_t appended_offset,
                                int64_t position, int64_t retained_offset,
                                int64_t delayed)
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

#endif /* MQS_DURABLE_H */
