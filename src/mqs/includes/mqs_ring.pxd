from libc.stdint cimport int32_t, int64_t


cdef extern from "mqs_ring.h" nogil:
    int MQS_RING_MULTI_PRODUCER
    int64_t MQS_RING_MAX_CAPACITY

    ctypedef struct mqs_ring_t:
        int64_t capacity
        int64_t mask
        int32_t shift
        int32_t flags
        int32_t max_consumers
        int32_t max_workers
        int32_t n_consumers
        int32_t n_workers

    int mqs_ring_create(mqs_ring_t **out, int64_t capacity, int flags,
                        int32_t max_consumers, int32_t max_workers)
    void mqs_ring_free(mqs_ring_t *ring)
    void mqs_ring_reset(mqs_ring_t *ring)
    size_t mqs_ring_size_bytes(int64_t capacity, int flags,
                               int32_t max_consumers, int32_t max_workers)
    int mqs_ring_add_consumer(mqs_ring_t *ring)
    int mqs_ring_add_worker(mqs_ring_t *ring)
    int64_t mqs_ring_min_gate(mqs_ring_t *ring)
    void **mqs_ring_slot(mqs_ring_t *ring, int64_t seq)
    int mqs_ring_try_claim(mqs_ring_t *ring, int64_t n, int64_t *lo)
    int mqs_ring_sp_push(mqs_ring_t *ring, void *item)
    void mqs_ring_publish(mqs_ring_t *ring, int64_t lo, int64_t hi)
    int64_t mqs_ring_highest_published(mqs_ring_t *ring, int64_t lo,
                                       int64_t limit)
    int mqs_ring_consumer_poll(mqs_ring_t *ring, int index, int64_t max_n,
                               int64_t *lo, int64_t *hi)
    void mqs_ring_consumer_release(mqs_ring_t *ring, int index, int64_t hi)
    int mqs_ring_work_claim(mqs_ring_t *ring, int index, int64_t max_n,
                            int64_t *lo, int64_t *hi)
    void mqs_ring_work_release(mqs_ring_t *ring, int index)
