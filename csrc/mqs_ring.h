/*
 * mqs_ring.h: a Disruptor-style sequenced ring of pointer slots.
 *
 * Layout of one ring (one allocation, 128-byte aligned):
 *
 *   offset                     contents
 *   0                          config: capacity, mask, shift, flags, ...
 *   MQS_PAD_BYTES * 1          cursor      producers' claim position
 *   MQS_PAD_BYTES * 2          published   single producer: next unpublished
 *   MQS_PAD_BYTES * 3          gate_cache  last computed min of the gates
 *   MQS_PAD_BYTES * 4          work_claim  next sequence the work pool hands out
 *   MQS_PAD_BYTES * 5          consumers[max_consumers], one block each
 *   ...                        workers[max_workers], one block each
 *   ...                        slots[capacity]           (void *, 8 bytes)
 *   ...                        available[capacity]       (int32, multi-
 *                                                         producer only)
 *
 *   slot for sequence s:   slots[s & mask]
 *   marker for sequence s: available[s & mask] == (int32_t)(s >> shift)
 *                          (the lap number; -1 before the first lap)
 *
 * Sequences are 64-bit and only grow. A producer claims [lo, hi), writes
 * the slots, then publishes the range. With one producer, publishing is a
 * release store of `published`; with several, each slot's lap marker is
 * stored with release and a reader scans the markers, so a slow producer
 * never makes a fast one wait to publish.
 *
 * Consumers come in two kinds, and both gate the producers (a slot is
 * reused only after every gate has passed it):
 *   broadcast consumer  sees every record; its sequence is the next
 *                       sequence it will read.
 *   work-pool worker    competes with the other workers: each record goes
 *                       to exactly one of them. The pool hands out ranges
 *                       from work_claim by CAS; a worker's own sequence is
 *                       the start of the range it is still reading, or
 *                       INT64_MAX when it holds none, so an idle worker
 *                       never holds the producers back.
 */
#ifndef MQS_RING_H
#define MQS_RING_H

#include <stddef.h>
#include <stdint.h>

#include "mqs_atomic.h"

#define MQS_RING_MULTI_PRODUCER 1
#define MQS_RING_MAX_CAPACITY ((int64_t)1 << 40)
#define MQS_RING_IDLE INT64_MAX

typedef struct mqs_ring {
    /* Read-only after mqs_ring_create, shared by every thread. */
    alignas(MQS_PAD_BYTES) int64_t capacity;
    int64_t mask;
    int32_t shift;
    int32_t flags;
    int32_t max_consumers;
    int32_t max_workers;
    _Atomic int32_t n_consumers;
    _Atomic int32_t n_workers;
    void **slots;
    _Atomic int32_t *available;
    mqs_padded_i64_t *consumers;
    mqs_padded_i64_t *workers;

    mqs_padded_i64_t cursor;
    mqs_padded_i64_t published;
    mqs_padded_i64_t gate_cache;
    mqs_padded_i64_t work_claim;
} mqs_ring_t;

/*
 * Allocate a ring of `capacity` slots (a power of two, 1 to
 * MQS_RING_MAX_CAPACITY) with room for the given numbers of broadcast
 * consumers and work-pool workers. Slots start NULL.
 * Returns MQS_OK, MQS_EINVAL for a bad capacity or count, MQS_ENOMEM.
 */
int mqs_ring_create(mqs_ring_t **out, int64_t capacity, int flags,
                    int32_t max_consumers, int32_t max_workers);

/*
 * Rewind an idle ring to its state after mqs_ring_create, keeping its
 * registered consumers and workers. Only when no thread uses the ring;
 * slots are left as they are.
 */
void mqs_ring_reset(mqs_ring_t *ring);

/* Free a ring made by mqs_ring_create; pointers in slots are not freed. */
void mqs_ring_free(mqs_ring_t *ring);

/* Bytes one mqs_ring_create call allocates for these arguments. */
size_t mqs_ring_size_bytes(int64_t capacity, int flags,
                           int32_t max_consumers, int32_t max_workers);

/*
 * Register a broadcast consumer, starting at the current cursor. Call
 * before producers claim, or while no claim is in flight.
 * Returns its index (>= 0) or MQS_EINVAL when all are taken.
 */
int mqs_ring_add_consumer(mqs_ring_t *ring);

/*
 * Register a work-pool worker. Any thread. The first worker starts the
 * pool at the current cursor, so records claimed before it never reach
 * the pool; as for a consumer, add it before producers claim or while no
 * claim is in flight, and before any other worker claims. Later workers
 * join the pool where it stands, at any time.
 * Returns its index (>= 0) or MQS_EINVAL when all are taken.
 */
int mqs_ring_add_worker(mqs_ring_t *ring);

/* Smallest sequence any gate still needs; producers may not pass it by
 * more than the capacity. Any thread. */
int64_t mqs_ring_min_gate(mqs_ring_t *ring);

static inline void **mqs_ring_slot(mqs_ring_t *ring, int64_t seq)
{
    return &ring->slots[seq & ring->mask];
}

/*
 * Claim `n` consecutive sequences without waiting; *lo gets the first.
 * Single producer: only one thread may claim. Multi producer: any thread.
 * Returns MQS_OK, MQS_EFULL when the slowest gate leaves fewer than n free
 * slots, MQS_ETOOBIG when n exceeds the capacity, MQS_EINVAL when n < 1.
 */
static inline int mqs_ring_try_claim(mqs_ring_t *ring, int64_t n,
                                     int64_t *lo)
{
    int64_t current, next, gate;

    if (n < 1)
        return MQS_EINVAL;
    if (n > ring->capacity)
        return MQS_ETOOBIG;

    if (!(ring->flags & MQS_RING_MULTI_PRODUCER)) {
        current = mqs_load_relaxed_i64(&ring->cursor.value);
        next = current + n;
        if (next - ring->capacity >
            mqs_load_relaxed_i64(&ring->gate_cache.value)) {
            gate = mqs_ring_min_gate(ring);
            mqs_store_relaxed_i64(&ring->gate_cache.value, gate);
            if (next - ring->capacity > gate)
                return MQS_EFULL;
        }
        mqs_store_relaxed_i64(&ring->cursor.value, next);
        *lo = current;
        return MQS_OK;
    }

    /* gate_cache may come from another producer: its release store pairs
     * with this acquire load, so the readers' releases that producer
     * acquired in mqs_ring_min_gate happen before this producer rewrites
     * their slots. */
    current = mqs_load_relaxed_i64(&ring->cursor.value);
    do {
        next = current + n;
        if (next - ring->capacity >
            mqs_load_acquire_i64(&ring->gate_cache.value)) {
            gate = mqs_ring_min_gate(ring);
            mqs_store_release_i64(&ring->gate_cache.value, gate);
            if (next - ring->capacity > gate)
                return MQS_EFULL;
        }
    } while (!mqs_cas_acq_rel_i64(&ring->cursor.value, &current, next));
    *lo = current;
    return MQS_OK;
}

/*
 * Single-producer fast path: claim one slot, store `item` in it and
 * publish it, in one call. Same rules and statuses as mqs_ring_try_claim
 * with n = 1 followed by mqs_ring_publish; only for rings created
 * without MQS_RING_MULTI_PRODUCER, from their one producer thread.
 */
static inline int mqs_ring_sp_push(mqs_ring_t *ring, void *item)
{
    int64_t current = mqs_load_relaxed_i64(&ring->cursor.value);
    int64_t gate;

    if (current + 1 - ring->capacity >
        mqs_load_relaxed_i64(&ring->gate_cache.value)) {
        gate = mqs_ring_min_gate(ring);
        mqs_store_relaxed_i64(&ring->gate_cache.value, gate);
        if (current + 1 - ring->capacity > gate)
            return MQS_EFULL;
    }
    ring->slots[current & ring->mask] = item;
    mqs_store_relaxed_i64(&ring->cursor.value, current + 1);
    /* The slot store above happens before a reader sees `published`. */
    mqs_store_release_i64(&ring->published.value, current + 1);
    return MQS_OK;
}

/*
 * Publish the claimed range [lo, hi) after its slots are written. The
 * release stores make the slot writes visible to a reader that acquires
 * the marker (or `published`). Called by the producer that claimed it.
 */
static inline void mqs_ring_publish(mqs_ring_t *ring, int64_t lo, int64_t hi)
{
    if (!(ring->flags & MQS_RING_MULTI_PRODUCER)) {
        mqs_store_release_i64(&ring->published.value, hi);
        return;
    }
    for (int64_t s = lo; s < hi; s++)
        atomic_store_explicit(&ring->available[s & ring->mask],
                              (int32_t)(s >> ring->shift),
                              memory_order_release);
}

/*
 * First sequence at or after `lo` that is not yet published, looking no
 * further than `limit` (exclusive). Everything in [lo, result) may be
 * read. Any thread.
 */
static inline int64_t mqs_ring_highest_published(mqs_ring_t *ring,
                                                 int64_t lo, int64_t limit)
{
    int64_t s;

    if (!(ring->flags & MQS_RING_MULTI_PRODUCER)) {
        int64_t published = mqs_load_acquire_i64(&ring->published.value);
        return published < limit ? published : limit;
    }
    for (s = lo; s < limit; s++) {
        int32_t lap = atomic_load_explicit(&ring->available[s & ring->mask],
                                           memory_order_acquire);
        if (lap != (int32_t)(s >> ring->shift))
            break;
    }
    return s;
}

/*
 * Broadcast consumer `index`: find up to `max_n` published records after
 * its sequence (INT64_MAX takes all of them). On MQS_OK, [*lo, *hi) may
 * be read until mqs_ring_consumer_release(ring, index, *hi). Only the
 * thread that owns this consumer may call it.
 * Returns MQS_OK, MQS_EEMPTY, or MQS_EINVAL when max_n < 1.
 */
static inline int mqs_ring_consumer_poll(mqs_ring_t *ring, int index,
                                         int64_t max_n, int64_t *lo,
                                         int64_t *hi)
{
    int64_t next, end;

    if (max_n < 1)
        return MQS_EINVAL;
    /* At most a capacity is ever published past a reader; the cap also
     * keeps next + max_n from overflowing. */
    if (max_n > ring->capacity)
        max_n = ring->capacity;
    next = mqs_load_relaxed_i64(&ring->consumers[index].value);
    end = mqs_ring_highest_published(ring, next, next + max_n);

    if (end == next)
        return MQS_EEMPTY;
    *lo = next;
    *hi = end;
    return MQS_OK;
}

/* Mark everything below `hi` read, so producers may reuse those slots. */
static inline void mqs_ring_consumer_release(mqs_ring_t *ring, int index,
                                             int64_t hi)
{
    mqs_store_release_i64(&ring->consumers[index].value, hi);
}

/*
 * Work-pool worker `index`: take up to `max_n` published records that no
 * other worker has taken (INT64_MAX takes all of them). On MQS_OK,
 * [*lo, *hi) belongs to this worker until mqs_ring_work_release(ring,
 * index). Only the thread that owns this worker may call it.
 * Returns MQS_OK, MQS_EEMPTY, or MQS_EINVAL when max_n < 1.
 */
static inline int mqs_ring_work_claim(mqs_ring_t *ring, int index,
                                      int64_t max_n, int64_t *lo,
                                      int64_t *hi)
{
    _Atomic int64_t *own = &ring->workers[index].value;
    int64_t current, end;

    if (max_n < 1)
        return MQS_EINVAL;
    /* As in mqs_ring_consumer_poll: never more than a capacity, and no
     * overflow in current + max_n. */
    if (max_n > ring->capacity)
        max_n = ring->capacity;
    current = mqs_load_acquire_i64(&ring->work_claim.value);
    for (;;) {
        end = mqs_ring_highest_published(ring, current, current + max_n);
        if (end == current) {
            mqs_store_release_i64(own, MQS_RING_IDLE);
            return MQS_EEMPTY;
        }
        /* Gate on `current` before the CAS can hand it out: a producer
         * that sees the new work_claim also sees this store. */
        mqs_store_release_i64(own, current);
        if (mqs_cas_acq_rel_i64(&ring->work_claim.value, &current, end))
            break;
    }
    *lo = current;
    *hi = end;
    return MQS_OK;
}

/* Give back the range of worker `index`: its slots may be reused. */
static inline void mqs_ring_work_release(mqs_ring_t *ring, int index)
{
    mqs_store_release_i64(&ring->workers[index].value, MQS_RING_IDLE);
}

#endif /* MQS_RING_H */
