/*
 * mqs_delay.h: the delayed area of a shared queue, where messages put
 * with a delay wait until they are due, in the queue's own mapping.
 *
 * The area follows the ring's data region in the queue file
 * (offset MQS_BR_HEADER_BYTES + capacity, `area_bytes` long, a multiple
 * of the page size). It holds no pointers, only offsets from its start,
 * so every process may map it anywhere.
 *
 *   0                        header, MQS_DELAY_HEADER_BYTES (8 KiB):
 *     block 0                config: magic, version, area_bytes, tick_ns
 *     block 1                next_due_ns  earliest deadline waiting, or
 *                                         INT64_MAX; getters read it
 *     block 2                count        messages waiting (maxsize)
 *     block 3-4              lock         process-shared robust mutex
 *     block 5..              state under the lock: wheel_bytes,
 *                            arena_low, held[], counters, free_heads[]
 *   MQS_DELAY_HEADER_BYTES   timing wheel (mqs_wheel.h), `wheel_bytes`
 *                            long; it grows upwards as needed
 *   ...                      free space
 *   arena_low                blocks, allocated downwards from the end
 *   area_bytes
 *
 * One block per waiting message, its size a size class (four classes per
 * power of two from 64 bytes, so at most 25% is rounding):
 *
 *   +-------------+-----------+------------+--------+--------------+-----------+---------+
 *   | state (u32) | type (u16)| class (u16)| length | deadline_ns  | next_free | payload |
 *   |             |           |            | (i64)  | (i64)        | (i64)     |         |
 *   +-------------+-----------+------------+--------+--------------+-----------+---------+
 *   0             4           6            8        16             24          32
 *
 * A waiting message therefore costs MQS_WHEEL_ENTRY_BYTES (32) in the
 * wheel plus mqs_delay_block_bytes(length): 96 bytes for a payload of
 * up to 32 bytes, 192 bytes for 100 bytes.
 *
 * Freed blocks go onto a free list per size class and are reused by the
 * same class (or, when the area is otherwise full, by a smaller one);
 * blocks are never split or merged, so a mix of sizes can leave free
 * bytes that a new message cannot use.
 *
 * Locking. Every change happens under `lock`, a PTHREAD_PROCESS_SHARED,
 * PTHREAD_MUTEX_ROBUST mutex, taken with trylock so that no caller ever
 * blocks behind a stopped process. A producer allocates a block, copies
 * the payload, inserts it into the wheel and only then marks it WAITING.
 * Whoever calls mqs_delay_promote moves the due messages into the ring:
 * it fires them from the wheel into held[] (marking them MOVING), puts
 * each into the ring, then frees its block. When the ring has no room
 * the rest stay in held[], first in line for the next call, so the
 * delivery order is the due order.
 *
 * Crash repair. When a process dies holding the lock, the next locker
 * gets EOWNERDEAD and rebuilds the whole state from the blocks alone: a
 * fresh wheel, every WAITING or MOVING block inserted again, every other
 * block freed. A producer killed before its block was WAITING loses
 * only the message it was putting (its put never returned). A mover
 * killed after the ring published a message and before the block was
 * freed leaves it MOVING, so the message is delivered a second time:
 * delayed delivery is at least once across a crash of the mover, never
 * lost. The rebuild keeps deadline order but not the put order of
 * messages with equal deadlines.
 *
 * Time is CLOCK_MONOTONIC in ns, which is one clock for every process
 * on the machine; callers pass `now_ns`, so tests choose the time.
 */
#ifndef MQS_DELAY_H
#define MQS_DELAY_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "mqs_atomic.h"
#include "mqs_bytering.h"
#include "mqs_wheel.h"

#define MQS_DELAY_MAGIC 0x31594c4544535153ULL /* "SQSDELY1" little-endian */
#define MQS_DELAY_VERSION 1
#define MQS_DELAY_HEADER_BYTES 8192
#define MQS_DELAY_NODE_BYTES 32
#define MQS_DELAY_MIN_BLOCK 64
#define MQS_DELAY_CLASSES 160
#define MQS_DELAY_BATCH 64
#define MQS_DELAY_TICK_NS 1000000
/* The smallest area: the header, a wheel of 64 entries, one page. */
#define MQS_DELAY_MIN_AREA_BYTES 16384

/* Another process holds the lock now: try again a little later. */
#define MQS_EAGAIN_LOCKED (-23)

/* Block states. Anything but WAITING and MOVING is free after a crash. */
#define MQS_DELAY_FREE 0u
#define MQS_DELAY_WRITING 1u
#define MQS_DELAY_WAITING 2u
#define MQS_DELAY_MOVING 3u

typedef struct mqs_delay_node {
    _Atomic uint32_t state;
    uint16_t type;       /* the ring record type it is published with */
    uint16_t size_class;
    int64_t length;      /* payload bytes */
    int64_t deadline_ns;
    int64_t next_free;   /* offset of the next free block, 0 for none */
} mqs_delay_node_t;

typedef struct mqs_delay_config {
    uint64_t magic;
    uint32_t version;
    uint32_t header_bytes;
    int64_t area_bytes;
    int64_t tick_ns;
} mqs_delay_config_t;

typedef struct mqs_delay_state {
    int64_t wheel_bytes;     /* size of the wheel block */
    int64_t arena_low;       /* offset of the lowest block */
    int64_t used_bytes;      /* blocks and wheel entries of waiting ones */
    int64_t held_next;       /* next held[] entry to move */
    int64_t held_count;
    int64_t moved;           /* messages moved into the ring, ever */
    int64_t rebuilds;        /* crash repairs */
    int64_t requeued;        /* MOVING messages requeued by a repair */
    int64_t dropped;         /* unfinished puts freed by a repair */
    uint64_t held[MQS_DELAY_BATCH];
    int64_t free_heads[MQS_DELAY_CLASSES];
} mqs_delay_state_t;

#define MQS_DELAY_BLOCK(type) \
    union { type v; char pad[MQS_PAD_BYTES]; }

typedef struct mqs_delay_header {
    MQS_DELAY_BLOCK(mqs_delay_config_t) config;
    MQS_DELAY_BLOCK(_Atomic int64_t) next_due_ns;
    MQS_DELAY_BLOCK(_Atomic int64_t) count;
    union {
        pthread_mutex_t v;
        char pad[2 * MQS_PAD_BYTES];
    } lock;
    mqs_delay_state_t state;
} mqs_delay_header_t;

/* Process-local handle. */
typedef struct mqs_delay {
    mqs_delay_header_t *header;
    unsigned char *base;
    int64_t area_bytes;
    int64_t rebuilds_seen;   /* header rebuilds when this handle last looked */
} mqs_delay_t;

/* Bytes of one block for a payload of `length` bytes (node included). */
int64_t mqs_delay_block_bytes(int64_t length);

/* Size class of a block of at least `bytes` bytes, and its size. */
int mqs_delay_class_of(int64_t bytes);
int64_t mqs_delay_class_bytes(int class_index);

/* Largest payload that fits an empty area of `area_bytes`. */
int64_t mqs_delay_max_payload(int64_t area_bytes);

/*
 * Map `area_bytes` of fd at `offset` (both page multiples). The handle
 * takes no ownership of fd. Returns MQS_OK or MQS_ENOMEM.
 */
int mqs_delay_map(mqs_delay_t *d, int fd, int64_t offset,
                  int64_t area_bytes);

/* Unmap what mqs_delay_map mapped; safe on a handle never mapped. */
void mqs_delay_unmap(mqs_delay_t *d);

/*
 * Map the area again from fd, a new open file description of the same
 * file, at the same address and `offset` (see mqs_br_remap). Returns
 * MQS_OK, or MQS_ENOMEM, after which the area must not be used.
 */
int mqs_delay_remap(mqs_delay_t *d, int fd, int64_t offset);

/*
 * Write an empty area into a mapped, zero-filled region. Only the
 * creating process, before anyone attaches. Returns MQS_OK, or
 * MQS_EINVAL when the area is too small or the mutex cannot be set up.
 */
int mqs_delay_format(mqs_delay_t *d, int64_t now_ns);

/* Check magic, version and sizes. MQS_OK, MQS_EVERSION or MQS_ECORRUPT. */
int mqs_delay_validate(const mqs_delay_t *d);

/*
 * Put a message gathered from `parts` into the area, to be moved into
 * `ring` at `due_ns`. Any thread of a process attached to the ring;
 * callers in one process serialise their calls (the GIL).
 * Returns MQS_OK; MQS_EFULL when the area has no room now or the ring's
 * maxsize (which counts waiting messages) is reached; MQS_ETOOBIG when
 * the message exceeds the ring's max_message_size or could never fit the
 * area; MQS_EAGAIN_LOCKED when another process holds the lock;
 * MQS_ECORRUPT when a repair found the area damaged.
 */
int mqs_delay_try_put(mqs_delay_t *d, mqs_bytering_t *ring,
                      const void *const *parts, const size_t *part_lengths,
                      int n_parts, uint16_t type, int64_t due_ns,
                      int64_t now_ns);

/*
 * Move every message due at `now_ns` into `ring`, in due order, and add
 * how many were moved to *moved. Any thread of an attached process.
 * Returns MQS_OK when none is due any more, MQS_EFULL when the ring ran
 * out of room (the rest move on a later call, first), MQS_EAGAIN_LOCKED
 * when another process holds the lock, MQS_ECORRUPT as above.
 */
int mqs_delay_promote(mqs_delay_t *d, mqs_bytering_t *ring, int64_t now_ns,
                      int64_t *moved);

/*
 * Walk the area and check its invariants: the wheel (mqs_wheel_check),
 * the blocks between arena_low and the end, the free lists, count and
 * used_bytes. O(blocks). For tests. Takes the lock (repairing first if
 * its owner died). Returns MQS_OK, MQS_ECORRUPT or MQS_EAGAIN_LOCKED.
 */
int mqs_delay_check(mqs_delay_t *d, int64_t now_ns);

/* Earliest deadline waiting, INT64_MAX when none: one acquire load, for
 * the get fast path. It may be in the past while due messages wait for
 * ring room or for the lock. */
static inline int64_t mqs_delay_next_due(const mqs_delay_t *d)
{
    return atomic_load_explicit(
        (_Atomic int64_t *)&d->header->next_due_ns.v, memory_order_acquire);
}

/* Messages waiting (not yet moved into the ring). */
static inline int64_t mqs_delay_count(const mqs_delay_t *d)
{
    return atomic_load_explicit((_Atomic int64_t *)&d->header->count.v,
                                memory_order_acquire);
}

/* Statistics under the lock are read without it: for reporting only. */
static inline const mqs_delay_state_t *mqs_delay_stats(const mqs_delay_t *d)
{
    return &d->header->state;
}

#endif /* MQS_DELAY_H */
