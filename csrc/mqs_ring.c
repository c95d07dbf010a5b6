#include "mqs_ring.h"

#include <stdlib.h>
#include <string.h>

static int is_power_of_two(int64_t v)
{
    return v > 0 && (v & (v - 1)) == 0;
}

static size_t round_up(size_t v, size_t to)
{
    return (v + to - 1) / to * to;
}

size_t mqs_ring_size_bytes(int64_t capacity, int flags,
                           int32_t max_consumers, int32_t max_workers)
{
    size_t bytes = round_up(sizeof(mqs_ring_t), MQS_PAD_BYTES);

    bytes += sizeof(mqs_padded_i64_t) * (size_t)max_consumers;
    bytes += sizeof(mqs_padded_i64_t) * (size_t)max_workers;
    bytes += round_up(sizeof(void *) * (size_t)capacity, MQS_PAD_BYTES);
    if (flags & MQS_RING_MULTI_PRODUCER)
        bytes += round_up(sizeof(int32_t) * (size_t)capacity, MQS_PAD_BYTES);
    return bytes;
}

int mqs_ring_create(mqs_ring_t **out, int64_t capacity, int flags,
                    int32_t max_consumers, int32_t max_workers)
{
    mqs_ring_t *ring;
    char *cursor;
    size_t bytes;
    int shift = 0;

    if (!is_power_of_two(capacity) || capacity > MQS_RING_MAX_CAPACITY)
        return MQS_EINVAL;
    /* Bounds first: the sum of two unchecked int32 values can overflow. */
    if (max_consumers < 0 || max_workers < 0 || max_consumers > 4096
        || max_workers > 4096 || max_consumers + max_workers < 1)
        return MQS_EINVAL;

    bytes = mqs_ring_size_bytes(capacity, flags, max_consumers, max_workers);
    ring = aligned_alloc(MQS_PAD_BYTES, bytes);
    if (ring == NULL)
        return MQS_ENOMEM;
    memset(ring, 0, bytes);
    while (((int64_t)1 << shift) < capacity)
        shift++;

    ring->capacity = capacity;
    ring->mask = capacity - 1;
    ring->shift = shift;
    ring->flags = flags;
    ring->max_consumers = max_consumers;
    ring->max_workers = max_workers;
    atomic_init(&ring->n_consumers, 0);
    atomic_init(&ring->n_workers, 0);

    cursor = (char *)ring + round_up(sizeof(mqs_ring_t), MQS_PAD_BYTES);
    ring->consumers = (mqs_padded_i64_t *)cursor;
    cursor += sizeof(mqs_padded_i64_t) * (size_t)max_consumers;
    ring->workers = (mqs_padded_i64_t *)cursor;
    cursor += sizeof(mqs_padded_i64_t) * (size_t)max_workers;
    ring->slots = (void **)cursor;
    cursor += round_up(sizeof(void *) * (size_t)capacity, MQS_PAD_BYTES);
    ring->available = NULL;
    if (flags & MQS_RING_MULTI_PRODUCER) {
        ring->available = (_Atomic int32_t *)cursor;
        for (int64_t i = 0; i < capacity; i++)
            atomic_init(&ring->available[i], -1);
    }
    for (int32_t i = 0; i < max_workers; i++)
        atomic_init(&ring->workers[i].value, MQS_RING_IDLE);

    atomic_init(&ring->cursor.value, 0);
    atomic_init(&ring->published.value, 0);
    atomic_init(&ring->gate_cache.value, 0);
    atomic_init(&ring->work_claim.value, 0);
    *out = ring;
    return MQS_OK;
}

void mqs_ring_reset(mqs_ring_t *ring)
{
    int32_t n_consumers = atomic_load_explicit(&ring->n_consumers,
                                               memory_order_relaxed);

    if (ring->available != NULL)
        for (int64_t i = 0; i < ring->capacity; i++)
            atomic_store_explicit(&ring->available[i], -1,
                                  memory_order_relaxed);
    for (int32_t i = 0; i < ring->max_workers; i++)
        mqs_store_relaxed_i64(&ring->workers[i].value, MQS_RING_IDLE);
    for (int32_t i = 0; i < n_consumers && i < ring->max_consumers; i++)
        mqs_store_relaxed_i64(&ring->consumers[i].value, 0);
    mqs_store_relaxed_i64(&ring->cursor.value, 0);
    mqs_store_relaxed_i64(&ring->published.value, 0);
    mqs_store_relaxed_i64(&ring->gate_cache.value, 0);
    mqs_store_release_i64(&ring->work_claim.value, 0);
}

void mqs_ring_free(mqs_ring_t *ring)
{
    free(ring);
}

int mqs_ring_add_consumer(mqs_ring_t *ring)
{
    int32_t index = atomic_fetch_add_explicit(&ring->n_consumers, 1,
                                              memory_order_acq_rel);

    if (index >= ring->max_consumers) {
        atomic_fetch_sub_explicit(&ring->n_consumers, 1,
                                  memory_order_acq_rel);
        return MQS_EINVAL;
    }
    /* A new consumer starts at what producers have claimed so far and
     * does not see older records. */
    mqs_store_release_i64(&ring->consumers[index].value,
                          mqs_load_acquire_i64(&ring->cursor.value));
    return index;
}

int mqs_ring_add_worker(mqs_ring_t *ring)
{
    int32_t index = atomic_fetch_add_explicit(&ring->n_workers, 1,
                                              memory_order_acq_rel);
    int64_t start, cursor;

    if (index >= ring->max_workers) {
        atomic_fetch_sub_explicit(&ring->n_workers, 1, memory_order_acq_rel);
        return MQS_EINVAL;
    }
    if (index > 0)
        return index;

    /* Producers ignore work_claim while there is no worker, so the slots
     * after it may hold newer laps: the first worker starts the pool at
     * the cursor. The CAS only moves work_claim forward, so it never
     * undoes a claim another worker made meanwhile. */
    start = mqs_load_acquire_i64(&ring->work_claim.value);
    cursor = mqs_load_acquire_i64(&ring->cursor.value);
    while (start < cursor
           && !mqs_cas_acq_rel_i64(&ring->work_claim.value, &start, cursor))
        ;
    return index;
}

int64_t mqs_ring_min_gate(mqs_ring_t *ring)
{
    int32_t n_consumers = atomic_load_explicit(&ring->n_consumers,
                                               memory_order_acquire);
    int32_t n_workers = atomic_load_explicit(&ring->n_workers,
                                             memory_order_acquire);
    int64_t gate = INT64_MAX;

    if (n_consumers > ring->max_consumers)
        n_consumers = ring->max_consumers;
    if (n_workers > ring->max_workers)
        n_workers = ring->max_workers;

    if (n_workers > 0) {
        /* work_claim first: its acquire makes every worker's gate store
         * made before a CAS that this value includes visible below. */
        gate = mqs_load_acquire_i64(&ring->work_claim.value);
        for (int32_t i = 0; i < n_workers; i++) {
            int64_t v = mqs_load_acquire_i64(&ring->workers[i].value);
            if (v < gate)
                gate = v;
        }
    }
    for (int32_t i = 0; i < n_consumers; i++) {
        int64_t v = mqs_load_acquire_i64(&ring->consumers[i].value);
        if (v < gate)
            gate = v;
    }
    if (gate == INT64_MAX)
        gate = mqs_load_acquire_i64(&ring->cursor.value);
    return gate;
}
