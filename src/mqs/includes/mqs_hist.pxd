from libc.stdint cimport int64_t


cdef extern from "mqs_hist.h" nogil:
    int MQS_HIST_BUCKETS
    int MQS_HIST_SUB_BUCKETS
    int64_t MQS_HIST_MAX_NS

    ctypedef struct mqs_hist_t:
        int64_t sample_every
        int64_t count
        int64_t sum_ns
        int64_t max_ns
        int64_t buckets[1]

    int mqs_hist_index(int64_t value_ns)
    void mqs_hist_record(mqs_hist_t *hist, int64_t value_ns)
    void mqs_hist_reset(mqs_hist_t *hist)
