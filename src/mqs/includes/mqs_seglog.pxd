from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t


cdef extern from "mqs_crc32c.h" nogil:
    uint32_t mqs_crc32c_extend(uint32_t crc, const void *data, size_t n)
    uint32_t mqs_crc32c_extend_sw(uint32_t crc, const void *data, size_t n)
    const char *mqs_crc32c_impl()


cdef extern from "mqs_seglog.h" nogil:
    int MQS_SEGLOG_VERSION
    int MQS_SEGLOG_HEADER_BYTES
    int MQS_SEGLOG_RECORD_HEADER_BYTES
    uint64_t MQS_SEGLOG_MIN_SEGMENT_BYTES
    uint64_t MQS_SEGLOG_MAX_SEGMENT_BYTES

    int MQS_EIO
    int MQS_ELOCKED
    int MQS_ENOSPACE
    int MQS_ELOGVERSION
    int MQS_EPOISONED
    int MQS_EREADONLY
    int MQS_ERANGE

    int MQS_SEGLOG_FSYNC_NEVER
    int MQS_SEGLOG_FSYNC_INTERVAL
    int MQS_SEGLOG_FSYNC_ALWAYS

    ctypedef struct mqs_seglog_t:
        pass

    ctypedef struct mqs_segment_t:
        pass

    ctypedef struct mqs_seglog_config_t:
        uint64_t segment_bytes
        int fsync_mode
        int readonly
        int64_t fsync_interval_ns
        int64_t fsync_interval_records
        int64_t retention_bytes
        int64_t retention_ns

    ctypedef struct mqs_seglog_recovery_t:
        int64_t segments_scanned
        int64_t records_verified
        int64_t torn_segments
        int64_t bytes_zeroed
        int64_t records_dropped
        int64_t first_bad_offset
        int64_t first_bad_base
        uint64_t first_bad_position
        int64_t temp_files_removed
        int64_t checkpoint_offset
        int64_t ended_before_checkpoint
        int64_t damaged_ranges
        int64_t records_skipped
        int64_t first_skipped_offset
        int64_t first_skipped_base
        uint64_t first_skipped_position

    ctypedef struct mqs_seglog_stats_t:
        int64_t start_offset
        int64_t end_offset
        int64_t synced_offset
        int64_t segments
        int64_t bytes
        int64_t appended_records
        int64_t syncs
        int64_t sync_errno
        int64_t segments_deleted
        int64_t records_deleted
        int64_t syncs_taken_over
        int64_t gather_timeouts

    ctypedef struct mqs_seglog_entry_t:
        const void *key
        const void *value
        uint32_t key_len
        uint32_t value_len
        int64_t timestamp_ns
        int has_key

    ctypedef struct mqs_seglog_record_t:
        int64_t offset
        int64_t timestamp_ns
        const uint8_t *key
        const uint8_t *value
        uint32_t key_len
        uint32_t value_len
        int has_key
        mqs_segment_t *segment
        uint64_t position

    ctypedef int (*mqs_seglog_sync_hook_t)(void *ctx, int64_t end_offset,
                                           int phase)

    int mqs_seglog_open(mqs_seglog_t **out, const char *path,
                        const mqs_seglog_config_t *config,
                        mqs_seglog_recovery_t *report, int *os_errno)
    int mqs_seglog_close(mqs_seglog_t *log)
    int mqs_seglog_close_errno(mqs_seglog_t *log, int *os_errno)
    void mqs_seglog_abandon(mqs_seglog_t *log)
    int mqs_seglog_append(mqs_seglog_t *log,
                          const mqs_seglog_entry_t *entries, size_t n,
                          int64_t *first_offset)
    int mqs_seglog_sync(mqs_seglog_t *log, int64_t end_offset)
    int mqs_seglog_sync_starts_now(mqs_seglog_t *log)
    int mqs_seglog_read(mqs_seglog_t *log, int64_t offset,
                        mqs_seglog_record_t *record)
    int mqs_seglog_read_batch(mqs_seglog_t *log, int64_t offset,
                              int64_t max_records, uint8_t *value_views,
                              uint8_t *key_views, uint8_t *key_valid,
                              int64_t *offsets, int64_t *timestamps,
                              int64_t *count, mqs_segment_t **segment)
    int mqs_seglog_find_time(mqs_seglog_t *log, int64_t timestamp_ns,
                             int64_t *offset)
    int mqs_seglog_roll(mqs_seglog_t *log)
    int mqs_seglog_retain_below(mqs_seglog_t *log, int64_t offset,
                                int64_t *deleted)
    int mqs_seglog_retain(mqs_seglog_t *log, int64_t now_ns,
                          int64_t *deleted)
    int mqs_seglog_refresh(mqs_seglog_t *log)
    void mqs_seglog_get_stats(mqs_seglog_t *log, mqs_seglog_stats_t *stats)
    int mqs_seglog_last_errno(mqs_seglog_t *log)
    void mqs_seglog_set_sync_hook(mqs_seglog_t *log,
                                  mqs_seglog_sync_hook_t hook, void *ctx)
    int64_t mqs_seglog_max_value_bytes(uint64_t segment_bytes,
                                       uint32_t key_len)
    void mqs_seglog_segment_acquire(mqs_segment_t *segment)
    void mqs_seglog_segment_release(mqs_segment_t *segment)
    const uint8_t *mqs_seglog_segment_data(mqs_segment_t *segment,
                                           uint64_t *size)
    int64_t mqs_seglog_segment_base(mqs_segment_t *segment)
