from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

from mqs.includes.mqs_hist cimport mqs_hist_t
from mqs.includes.mqs_wait cimport mqs_waitword_t


cdef extern from "mqs_topiccore.h" nogil:
    enum:
        MQS_TC_MAX_LANES
        MQS_TC_NAME_BYTES
        MQS_TC_FREE
        MQS_TC_READY
        MQS_TC_IN_FLIGHT
        MQS_TC_DEAD
        MQS_TC_COUNTERS
        MQS_TC_GROUP_COUNTERS
        MQS_TC_VERSION
        MQS_TC_EVERSION
        MQS_TC_ELIMIT

    ctypedef struct mqs_tc_params_t:
        uint32_t capacity
        uint32_t slot_bytes
        uint32_t max_groups
        uint32_t max_consumers
        uint32_t lane_count
        int32_t lanes[10]
        uint32_t weights[10]
        uint32_t strict
        uint32_t max_attempts
        uint32_t sample_every

    ctypedef struct mqs_tc_config_t:
        mqs_tc_params_t params
        uint64_t max_stored

    ctypedef struct mqs_tc_state_t:
        uint64_t next_seq
        uint32_t groups_used
        uint32_t retired
        uint32_t slot_limit
        int64_t counters[12]
        uint32_t stored

    ctypedef struct mqs_tc_config_block:
        mqs_tc_config_t v

    ctypedef struct mqs_tc_state_block:
        mqs_tc_state_t v

    ctypedef struct mqs_tc_header_t:
        mqs_tc_config_block config
        mqs_tc_state_block state

    ctypedef struct mqs_tc_group_t:
        uint32_t used
        uint32_t name_length
        char name[120]
        uint32_t max_attempts
        uint32_t cursor
        int64_t deficits[10]
        uint32_t ready
        uint32_t in_flight
        uint32_t dead
        int64_t countdown
        int64_t counters[6]
        mqs_hist_t enqueue_to_deliver
        mqs_hist_t deliver_to_ack

    ctypedef struct mqs_tc_slot_t:
        uint64_t seq
        uint32_t length
        uint8_t priority
        uint8_t retained
        double timestamp

    ctypedef struct mqs_tc_entry_t:
        uint64_t word
        uint64_t ticket
        int64_t ready_seq
        double deadline
        uint64_t deadline_seq
        uint32_t consumer
        uint32_t timed_out
        double ready_at
        double sampled_at

    ctypedef struct mqs_tc_consumer_t:
        uint32_t used
        uint32_t group
        uint32_t prefetch
        uint32_t in_flight
        uint64_t owner

    ctypedef struct mqs_tc_delivery_t:
        uint32_t slot
        uint32_t length
        uint64_t seq
        uint64_t ticket
        uint64_t attempts
        uint32_t priority
        double timestamp
        const unsigned char *body

    ctypedef struct mqs_tc_dead_t:
        uint32_t group
        uint32_t slot
        uint64_t seq
        uint64_t attempts
        uint32_t reason
        uint32_t priority
        uint32_t length
        double timestamp
        const unsigned char *body

    ctypedef struct mqs_tc_stats_t:
        uint64_t stored
        uint64_t ready
        uint64_t in_flight
        uint64_t dead

    uint64_t mqs_tc_layout_bytes(const mqs_tc_params_t *params)
    int mqs_tc_format(mqs_tc_header_t *h, const mqs_tc_params_t *params)
    uint32_t mqs_tc_version(const mqs_tc_header_t *h)
    int mqs_tc_validate(const mqs_tc_header_t *h, uint64_t file_bytes)
    int mqs_tc_lock(mqs_tc_header_t *h, int64_t timeout_ns)
    void mqs_tc_unlock(mqs_tc_header_t *h)
    mqs_waitword_t *mqs_tc_changed(mqs_tc_header_t *h)
    void mqs_tc_repair(mqs_tc_header_t *h)
    void mqs_tc_advance(mqs_tc_header_t *h, double now)
    int64_t mqs_tc_publish(mqs_tc_header_t *h, const void *body,
                           uint32_t length, uint32_t priority,
                           double timestamp, double now, uint32_t *slot_out)
    int64_t mqs_tc_find_group(mqs_tc_header_t *h, const char *name,
                              uint32_t name_length)
    int64_t mqs_tc_open_group(mqs_tc_header_t *h, const char *name,
                              uint32_t name_length, int earliest, double now)
    void mqs_tc_set_group_attempts(mqs_tc_header_t *h, uint32_t group,
                                   uint32_t max_attempts)
    int64_t mqs_tc_open_consumer(mqs_tc_header_t *h, uint32_t group,
                                 uint32_t prefetch, uint64_t owner,
                                 double now)
    int64_t mqs_tc_close_consumer(mqs_tc_header_t *h, uint32_t consumer,
                                  double now)
    int64_t mqs_tc_fetch(mqs_tc_header_t *h, uint32_t consumer,
                         uint32_t max_items, double ack_timeout,
                         int auto_ack, double now, mqs_tc_delivery_t *out)
    int mqs_tc_ack(mqs_tc_header_t *h, uint32_t group, uint32_t slot,
                   uint64_t ticket, double now)
    int mqs_tc_nack(mqs_tc_header_t *h, uint32_t group, uint32_t slot,
                    uint64_t ticket, int requeue, double now)
    int mqs_tc_extend(mqs_tc_header_t *h, uint32_t group, uint32_t slot,
                      uint64_t ticket, double seconds, double now)
    int64_t mqs_tc_release(mqs_tc_header_t *h, uint32_t group,
                           const uint32_t *slots, const uint64_t *tickets,
                           uint32_t count, double now)
    int mqs_tc_next_dead(mqs_tc_header_t *h, mqs_tc_dead_t *out)
    void mqs_tc_drop_dead(mqs_tc_header_t *h, uint32_t group, uint32_t slot)
    void mqs_tc_stats(mqs_tc_header_t *h, mqs_tc_stats_t *out)
    int mqs_tc_oldest_ready(mqs_tc_header_t *h, uint32_t group, double *out)
    mqs_tc_group_t *mqs_tc_group(mqs_tc_header_t *h, uint32_t group)
    mqs_tc_slot_t *mqs_tc_slot(mqs_tc_header_t *h, uint32_t slot)
    mqs_tc_entry_t *mqs_tc_entry(mqs_tc_header_t *h, uint32_t group,
                                 uint32_t slot)
    mqs_tc_consumer_t *mqs_tc_consumer(mqs_tc_header_t *h, uint32_t consumer)
    int mqs_tc_may_fetch(mqs_tc_header_t *h, uint32_t consumer,
                         uint32_t group, uint64_t owner, int auto_ack,
                         double now) nogil
