from libc.stdint cimport int64_t, uint32_t, uint64_t

from mqs.includes.mqs_wait cimport mqs_waitword_t


cdef extern from "mqs_durable.h" nogil:
    int MQS_DQ_FILE_BYTES
    enum:
        MQS_DQ_CURSOR
        MQS_DQ_APPENDED_OFFSET
        MQS_DQ_APPENDED_POS
        MQS_DQ_DURABLE_POS
        MQS_DQ_GROUPS
        MQS_DQ_MAXSIZE
        MQS_DQ_RETAINED_OFFSET
        MQS_DQ_DELAYED
        MQS_DQ_LOST
        MQS_DQ_SEGMENT_BYTES
        MQS_DQ_STORED
        MQS_DQ_DAMAGED
        MQS_DQ_MAX_GROUPS
        MQS_DQ_READERS

    ctypedef struct mqs_dq_control_t:
        pass

    int64_t mqs_dq_get(mqs_dq_control_t *c, int field)
    void mqs_dq_set(mqs_dq_control_t *c, int field, int64_t v)
    mqs_waitword_t *mqs_dq_not_empty(mqs_dq_control_t *c)
    mqs_waitword_t *mqs_dq_progress(mqs_dq_control_t *c)
    uint64_t mqs_dq_secret(mqs_dq_control_t *c)
    uint32_t mqs_dq_progress_waiters(mqs_dq_control_t *c)
    void mqs_dq_set_gather(mqs_dq_control_t *c, int64_t count)
    int64_t mqs_dq_gather_count(mqs_dq_control_t *c)
    mqs_waitword_t *mqs_dq_gathered(mqs_dq_control_t *c)
    int64_t mqs_dq_get_cursor(mqs_dq_control_t *c, int group)
    void mqs_dq_set_cursor(mqs_dq_control_t *c, int group, int64_t v)
    void mqs_dq_add(mqs_dq_control_t *c, int field, int64_t n)
    int64_t mqs_dq_min_cursor(mqs_dq_control_t *c, int groups)
    void mqs_dq_setup(mqs_dq_control_t *c, uint64_t secret,
                      const int64_t *cursors, int groups, int64_t maxsize,
                      int64_t appended_offset, int64_t position,
                      int64_t retained_offset, int64_t delayed,
                      int64_t stored)
    int64_t mqs_dq_claim(mqs_dq_control_t *c, int group, int64_t max_n,
                         int64_t *first)
    void mqs_dq_release_taken(mqs_dq_control_t *c, int groups)
    int mqs_dq_reserve(mqs_dq_control_t *c, int groups, int64_t maxsize)
    void mqs_dq_unreserve(mqs_dq_control_t *c)
    void mqs_dq_set_reading(mqs_dq_control_t *c, int slot, int64_t offset)
    int64_t mqs_dq_get_reading(mqs_dq_control_t *c, int slot)
    void mqs_dq_reading_fence()
