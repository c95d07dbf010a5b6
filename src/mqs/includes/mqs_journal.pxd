from libc.stdint cimport int64_t, uint32_t, uint64_t

from mqs.includes.mqs_wait cimport mqs_waitword_t


cdef extern from "mqs_journal.h" nogil:
    int MQS_JOURNAL_HEADER_BYTES
    int MQS_JOURNAL_RECORD_HEADER
    int MQS_JOURNAL_MAX_PARTICIPANTS
    int64_t MQS_JOURNAL_MIN_BYTES
    int64_t MQS_JOURNAL_MAX_BYTES
    int MQS_JOURNAL_EVERSION
    int MQS_JOURNAL_VERSION
    int MQS_JOURNAL_EAGAIN_INIT

    ctypedef struct mqs_journal_head_t:
        uint64_t position
        int64_t restart_used
        uint64_t next_token
        int64_t recoveries

    ctypedef struct mqs_journal_header_t:
        pass

    int MQS_JOURNAL_CHANGED
    int MQS_JOURNAL_DURABLE
    int MQS_JOURNAL_WRITER

    mqs_waitword_t *mqs_journal_changed(mqs_journal_header_t *h)
    mqs_waitword_t *mqs_journal_word(mqs_journal_header_t *h, int which)
    mqs_journal_head_t *mqs_journal_head(mqs_journal_header_t *h)
    int64_t mqs_journal_bytes(const mqs_journal_header_t *h)
    int64_t mqs_journal_file_bytes(int64_t journal_bytes)
    int64_t mqs_journal_record_bytes(int64_t length)
    int mqs_journal_format(mqs_journal_header_t *h, int64_t journal_bytes)
    int mqs_journal_validate(const mqs_journal_header_t *h,
                             int64_t file_bytes)
    uint32_t mqs_journal_version(const mqs_journal_header_t *h)
    int mqs_journal_lock(mqs_journal_header_t *h, int64_t timeout_ns)
    void mqs_journal_unlock(mqs_journal_header_t *h)
    int64_t mqs_journal_append(mqs_journal_header_t *h, const void *payload,
                               uint32_t length)
    uint32_t mqs_journal_restart(mqs_journal_header_t *h)
    int mqs_journal_attach(mqs_journal_header_t *h, int fd,
                           uint64_t *token)
    int mqs_journal_alive(const mqs_journal_header_t *h, int fd,
                          int own_slot, int slot, uint64_t token)
