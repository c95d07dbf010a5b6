from libc.stdint cimport int64_t, uint16_t

from mqs.includes.mqs_bytering cimport mqs_bytering_t


cdef extern from "mqs_delay.h" nogil:
    int MQS_DELAY_MIN_AREA_BYTES
    int MQS_DELAY_TICK_NS
    int MQS_DELAY_VERSION
    int MQS_EAGAIN_LOCKED

    ctypedef struct mqs_delay_header_t:
        pass

    ctypedef struct mqs_delay_state_t:
        int64_t wheel_bytes
        int64_t arena_low
        int64_t used_bytes
        int64_t moved
        int64_t rebuilds
        int64_t requeued
        int64_t dropped

    ctypedef struct mqs_delay_t:
        mqs_delay_header_t *header
        unsigned char *base
        int64_t area_bytes
        int64_t rebuilds_seen

    int64_t mqs_delay_block_bytes(int64_t length)
    int64_t mqs_delay_max_payload(int64_t area_bytes)
    int mqs_delay_map(mqs_delay_t *d, int fd, int64_t offset,
                      int64_t area_bytes)
    void mqs_delay_unmap(mqs_delay_t *d)
    int mqs_delay_remap(mqs_delay_t *d, int fd, int64_t offset)
    int mqs_delay_format(mqs_delay_t *d, int64_t now_ns)
    int mqs_delay_validate(const mqs_delay_t *d)
    int mqs_delay_try_put(mqs_delay_t *d, mqs_bytering_t *ring,
                          const void *const *parts,
                          const size_t *part_lengths, int n_parts,
                          uint16_t type, int64_t due_ns, int64_t now_ns)
    int mqs_delay_promote(mqs_delay_t *d, mqs_bytering_t *ring,
                          int64_t now_ns, int64_t *moved)
    int mqs_delay_check(mqs_delay_t *d, int64_t now_ns)
    int64_t mqs_delay_next_due(const mqs_delay_t *d)
    int64_t mqs_delay_count(const mqs_delay_t *d)
    const mqs_delay_state_t *mqs_delay_stats(const mqs_delay_t *d)
