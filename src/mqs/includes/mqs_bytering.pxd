from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t

from mqs.includes.mqs_hist cimport mqs_hist_t
from mqs.includes.mqs_wait cimport mqs_waitword_t


cdef extern from "mqs_bytering.h" nogil:
    int64_t MQS_BR_HEADER_BYTES
    int MQS_BR_VERSION
    uint64_t MQS_BR_MAGIC
    uint32_t MQS_BR_INIT_READY
    int MQS_BR_RECORD_HEADER
    int MQS_BR_MAX_GROUPS
    int MQS_BR_MAX_PARTICIPANTS
    int MQS_BR_TYPE_PAD
    int MQS_BR_TYPE_STAMPED
    int MQS_BR_STAMP_BYTES
    int64_t MQS_BR_NO_PIN
    int MQS_EAGAIN_INIT
    int MQS_EVERSION
    int MQS_EAGAIN_STUCK

    ctypedef struct mqs_br_config_t:
        uint64_t magic
        uint32_t version
        int64_t capacity
        int64_t max_message_size
        int64_t maxsize
        uint64_t secret
        int32_t n_groups
        int64_t delayed_bytes

    ctypedef struct mqs_br_counters_t:
        int64_t repaired_records
        int64_t repaired_bytes
        int64_t lost_records
        int64_t stalls_reported
        int64_t decode_failures

    ctypedef struct mqs_br_participant_t:
        int64_t pid

    ctypedef struct mqs_br_header_t:
        pass

    ctypedef struct mqs_bytering_t:
        mqs_br_header_t *header
        unsigned char *data
        int64_t capacity
        int fd
        int slot
        uint64_t secret
        int64_t last_put_position

    ctypedef struct mqs_br_record_t:
        const unsigned char *payload
        int64_t position
        uint32_t length
        uint16_t type

    int64_t mqs_br_file_bytes(int64_t capacity)
    int mqs_br_check_sizes(int64_t capacity, int64_t max_message_size,
                           int64_t maxsize, int32_t n_groups)
    int mqs_br_map(mqs_bytering_t *ring, int fd, int64_t capacity)
    void mqs_br_unmap(mqs_bytering_t *ring)
    int mqs_br_remap(mqs_bytering_t *ring, int fd)
    int mqs_br_format(mqs_bytering_t *ring, int64_t max_message_size,
                      int64_t maxsize, int32_t n_groups, uint64_t secret)
    int mqs_br_validate(const mqs_br_header_t *header, int64_t file_bytes)
    int mqs_br_attach(mqs_bytering_t *ring)
    void mqs_br_detach(mqs_bytering_t *ring)
    int mqs_br_participant_alive(const mqs_bytering_t *ring, int slot)
    int mqs_br_try_put(mqs_bytering_t *ring, const void *const *parts,
                       const size_t *part_lengths, int n_parts,
                       uint16_t type)
    int64_t mqs_br_count(const mqs_bytering_t *ring, int group)
    int mqs_br_try_take(mqs_bytering_t *ring, int group, int view,
                        mqs_br_record_t *record)
    int mqs_br_head_published(const mqs_bytering_t *ring, int group)
    void mqs_br_unpin(mqs_bytering_t *ring, int view, int64_t position)
    int mqs_br_repair(mqs_bytering_t *ring)
    int mqs_br_stalled_owner(const mqs_bytering_t *ring, int group)
    int mqs_br_settle(mqs_bytering_t *ring)
    int mqs_br_peek(const mqs_bytering_t *ring, int64_t position,
                    mqs_br_record_t *record)
    int mqs_br_advance(mqs_bytering_t *ring, int group, int64_t position,
                       int64_t messages)
    int64_t mqs_br_head(const mqs_bytering_t *ring, int group)
    int64_t mqs_br_record_size(int64_t length)

    # Accessors for header fields the Cython layer reads.
    mqs_br_config_t *mqs_br_config(mqs_bytering_t *ring)
    mqs_waitword_t *mqs_br_not_empty(mqs_bytering_t *ring)
    mqs_waitword_t *mqs_br_not_full(mqs_bytering_t *ring)
    mqs_br_counters_t *mqs_br_counters(mqs_bytering_t *ring)
    void mqs_br_count_decode_failure(mqs_bytering_t *ring)
    mqs_br_participant_t *mqs_br_participant(mqs_bytering_t *ring, int slot)
    mqs_hist_t *mqs_br_latency(mqs_bytering_t *ring)
    void mqs_br_unstamp(mqs_bytering_t *ring, mqs_br_record_t *record)
    void mqs_br_set_copies(mqs_bytering_t *ring, int64_t copies)
