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
 *
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
#define MQS_DQ_VERSION 1
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
} mqs_dq_control_t;

_Static_assert(sizeof(mqs_dq_control_t) <= MQS_DQ_FILE_BYTES,
               "control block must fit its file");

/* Fields read and written with mqs_dq_get and mqs_dq_set. */
enum {
    MQS_DQ_CURSOR = 0,
    MQS_DQ_APPENDED_OFFSET = 1,
    MQS_DQ_APPENDED_POS = 2,
    MQS_DQ_DURABLE_POS = 3,
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
    default:
        return &c->durable_pos.v;
    }
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
 * Set the block up for the inbox ring with `secret`: positions and
 * offsets first, then the secret with release, so a process that reads
 * its secret also reads the rest. The wait words are left alone: processes may
 * already wait on them, and a new file's zero bytes are a valid start.
 */
static inline void mqs_dq_setup(mqs_dq_control_t *c, uint64_t secret,
                                int64_t cursor, int64_t appended_offset,
                                int64_t position)
{
    atomic_store_explicit(&c->ring_secret.v, 0, memory_order_release);
    c->id.v.magic = MQS_DQ_MAGIC;
    c->id.v.version = MQS_DQ_VERSION;
    mqs_dq_set(c, MQS_DQ_CURSOR, cursor);
    mqs_dq_set(c, MQS_DQ_APPENDED_OFFSET, appended_offset);
    mqs_dq_set(c, MQS_DQ_APPENDED_POS, position);
    mqs_dq_set(c, MQS_DQ_DURABLE_POS, position);
    atomic_store_explicit(&c->ring_secret.v, secret, memory_order_release);
}

/*
 * Take up to `max_n` log offsets for a consumer: returns how many
 * (0 when every appended offset is taken) and the first in *first.
 */
static inline int64_t mqs_dq_claim(mqs_dq_control_t *c, int64_t max_n,
                                   int64_t *first)
{
    int64_t cursor = mqs_dq_get(c, MQS_DQ_CURSOR);

    for (;;) {
        int64_t end = mqs_dq_get(c, MQS_DQ_APPENDED_OFFSET);
        int64_t n = end - cursor;

        if (n <= 0)
            return 0;
        if (n > max_n)
            n = max_n;
        if (atomic_compare_exchange_weak_explicit(
                &c->cursor.v, &cursor, cursor + n, memory_order_acq_rel,
                memory_order_acquire)) {
            *first = cursor;
            return n;
        }
    }
}

#endif /* MQS_DURABLE_H */
