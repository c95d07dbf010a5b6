/*
 * mqs_seglog.h: a durable log of records in memory-mapped segment files.
 *
 * A log is a directory:
 *
 *   lock                            flock(LOCK_EX) held by the one writer
 *   00000000000000000000.seg        segment whose first record is offset 0
 *   00000000000000004711.seg        next segment, first offset 4711
 *   recovery-point                  checkpoint, see below
 *   consumer-<group>.offset         committed group offsets (Python layer)
 *
 * Offsets count records, starting at 0, and never repeat; a segment file
 * is named by its first offset, zero-padded to 20 digits, so lexical
 * order is offset order. Each segment is created at its full size with
 * posix_fallocate (a full disk fails here, never later as SIGBUS), under
 * a temporary name that is renamed once its header is written, and then
 * mapped. Files are never shrunk while mapped: recovery zeroes a torn
 * tail inside the file, and retention unlinks whole sealed segments.
 *
 * Segment header, the first MQS_SEGLOG_HEADER_BYTES (4096) of the file:
 *
 *   +0    char[8]  magic "MQSLOGSG"
 *   +8    u32      version (MQS_SEGLOG_VERSION)
 *   +12   u32      header_bytes (4096: records start here)
 *   +16   i64      base_offset, the offset of the first record
 *   +24   u64      epoch, random per file; the record CRC seed is
 *                  (u32)epoch ^ (u32)(epoch >> 32)
 *   +32   u64      segment_bytes, the file size
 *   +40   i64      created_ns, wall clock
 *   +48   u32      flags (0)
 *   +52   u32      header_crc, CRC-32C of bytes [0, 52)
 *   +64   seal block, all zero until the segment is sealed:
 *   +64   u64      end_position, first byte after the last record
 *   +72   i64      next_offset, offset after the last record
 *   +80   i64      min_timestamp_ns of its records (INT64_MAX if none)
 *   +88   i64      max_timestamp_ns of its records (INT64_MIN if none)
 *   +96   u32      seal_crc, CRC-32C seeded with the segment seed of
 *                  bytes [64, 96); a segment is sealed iff it matches
 *   +100  zero up to 4096
 *
 * Record, 8-byte aligned, from the header to the end of the file:
 *
 *   +0   u32  length      MQS_SEGLOG_RECORD_HEADER_BYTES + key_len +
 *                         value_len; 0 means no record (yet). Stored last,
 *                         with release order, after everything below.
 *   +4   u32  crc         CRC-32C seeded with the segment seed over bytes
 *                         [8, length), then over the 4 length bytes
 *   +8   i64  offset
 *   +16  i64  timestamp_ns
 *   +24  u32  key_len
 *   +28  u16  attributes  bit 0: the record has a key (possibly empty)
 *   +30  u16  reserved, 0
 *   +32  key bytes, then value bytes, then zero padding to 8 bytes
 *
 *   +--------+-------+----------+--------------+---------+-------+-----+
 *   | length |  crc  |  offset  | timestamp_ns | key_len | attrs | key |
 *   |   4    |   4   |    8     |      8       |    4    |  2+2  | ... |
 *   +--------+-------+----------+--------------+---------+-------+-----+
 *   | value ...                                      | pad to 8 bytes  |
 *   +------------------------------------------------+-----------------+
 *
 * A record is valid when its length fits the segment, its CRC matches
 * and its offset is the one after the previous record. The seed differs
 * per file, so bytes left from another file never pass as a record.
 * Because the length is written last, a reader in another process that
 * acquires a non-zero length sees the whole record (the same publication
 * rule as the ring).
 *
 * recovery-point (48 bytes), written by a clean close of a writer for
 * the end of its last segment, and replaced atomically (write, fsync,
 * rename, fsync of the directory). The "always" and "interval" modes
 * write it only after a sync covering the records succeeded. "never"
 * syncs neither the records nor the file and directory:
 *
 *   +0 char[8] "MQSCKPT1"  +8 i64 segment base_offset  +16 u64 position
 *   +24 u32 epoch low bits  +28 u32 CRC-32C of bytes [0, 28)
 *   +32 i64 next_offset, the offset after the last record
 *   +40 u32 CRC-32C of bytes [0, 40)  +44 u32 zero
 *
 * Versions that wrote only the first 32 bytes read the first 32 bytes
 * of this one. A file of 32 bytes is still read, and then recovery
 * does not know next_offset.
 *
 * Records of that segment below `position` were complete when the log
 * closed, so recovery walks them by length and offset only and checks
 * CRCs from `position` on. A record damaged later stays in place and
 * its reads return MQS_ECORRUPT, while the records after it stay
 * readable.
 * The walk must end exactly at `position`. If it does not (a damaged
 * length or offset), recovery walks the segment again from its start
 * and checks every CRC. At each record that fails, it searches
 * forward, 8 bytes at a time, for the first record with a valid CRC
 * and an offset at or after the expected one, and goes on from there
 * (a resync). The resync holds only if that walk, through valid
 * records, ends exactly at `position` (and at next_offset, when
 * recorded). The records skipped in between stay in place, their
 * offsets read as MQS_ECORRUPT, and the report counts them
 * (records_skipped). Pages that an OS crash lost under "never" read
 * as zeros and are skipped the same way when valid records follow
 * them. If no valid record follows the last damaged one, the damaged
 * records were the last ones below `position`, and only next_offset
 * gives their offsets: without it, or when the length there is zero
 * (lost pages rather than damage), the resync fails. When it fails, or
 * the file was truncated below `position`, recovery verifies the whole
 * segment, cuts it at its first invalid record and removes the
 * recovery point.
 * Logs written before "never" wrote a recovery point have none and are
 * verified in full. Sealed segments are not re-verified on open (in the
 * "always" and "interval" modes their records were synced before the
 * seal was written), and every read still checks the CRC of the record
 * it returns. A sealed segment whose walk stops before the seal's end
 * on its first read resynchronizes with the seal's end_position and
 * next_offset by the same rule.
 *
 * Threads: every function below that takes a log must be called by one
 * thread at a time (the Python binding holds the GIL), except
 * mqs_seglog_sync, which any number of threads may call concurrently
 * with each other and with that one thread. In the "interval" mode a
 * flusher thread owned by the log calls it too. In the "never" and
 * "interval" modes a writer handle also owns a toucher thread, which
 * writes zeros into the active segment's file ahead of its end so the
 * pages exist before the appender stores into them (mqs_seglog.c).
 */
#ifndef MQS_SEGLOG_H
#define MQS_SEGLOG_H

#include <stddef.h>
#include <stdint.h>

#include "mqs_atomic.h"

#define MQS_SEGLOG_VERSION 1
#define MQS_SEGLOG_MAGIC "MQSLOGSG"
#define MQS_SEGLOG_HEADER_BYTES 4096
#define MQS_SEGLOG_RECORD_HEADER_BYTES 32
#define MQS_SEGLOG_ALIGN 8
#define MQS_SEGLOG_MIN_SEGMENT_BYTES ((uint64_t)8192)
#define MQS_SEGLOG_MAX_SEGMENT_BYTES ((uint64_t)1 << 30)
#define MQS_SEGLOG_INDEX_INTERVAL_BYTES 4096

/* Header field offsets. */
#define MQS_SEGLOG_H_MAGIC 0
#define MQS_SEGLOG_H_VERSION 8
#define MQS_SEGLOG_H_HEADER_BYTES 12
#define MQS_SEGLOG_H_BASE_OFFSET 16
#define MQS_SEGLOG_H_EPOCH 24
#define MQS_SEGLOG_H_SEGMENT_BYTES 32
#define MQS_SEGLOG_H_CREATED_NS 40
#define MQS_SEGLOG_H_FLAGS 48
#define MQS_SEGLOG_H_CRC 52
#define MQS_SEGLOG_H_SEAL 64
#define MQS_SEGLOG_H_SEAL_END_POSITION 64
#define MQS_SEGLOG_H_SEAL_NEXT_OFFSET 72
#define MQS_SEGLOG_H_SEAL_MIN_TS 80
#define MQS_SEGLOG_H_SEAL_MAX_TS 88
#define MQS_SEGLOG_H_SEAL_CRC 96

/* Record field offsets. */
#define MQS_SEGLOG_R_LENGTH 0
#define MQS_SEGLOG_R_CRC 4
#define MQS_SEGLOG_R_OFFSET 8
#define MQS_SEGLOG_R_TIMESTAMP 16
#define MQS_SEGLOG_R_KEY_LEN 24
#define MQS_SEGLOG_R_ATTRIBUTES 28
#define MQS_SEGLOG_R_RESERVED 30

#define MQS_SEGLOG_ATTR_HAS_KEY 1u

/*
 * Statuses of the segment log, beyond the common ones in mqs_atomic.h
 * (which it also returns: MQS_EINVAL, MQS_ENOMEM, MQS_EEMPTY,
 * MQS_ECORRUPT, MQS_ETOOBIG, MQS_ECLOSED). Where a system call failed,
 * mqs_seglog_last_errno() or the open call's os_errno gives its errno.
 */
#define MQS_EIO (-101)       /* a system call failed */
#define MQS_ELOCKED (-102)   /* another process holds the writer lock */
#define MQS_ENOSPACE (-103)  /* preallocation failed: disk full or limit */
#define MQS_ELOGVERSION (-104) /* written by a newer format version */
#define MQS_EPOISONED (-105) /* a sync failed earlier; no more appends */
#define MQS_EREADONLY (-106) /* the log was opened read-only */
#define MQS_ERANGE (-107)    /* offset below the first retained record */

enum mqs_seglog_fsync {
    MQS_SEGLOG_FSYNC_NEVER = 0,
    MQS_SEGLOG_FSYNC_INTERVAL = 1,
    MQS_SEGLOG_FSYNC_ALWAYS = 2,
};

typedef struct mqs_seglog mqs_seglog_t;
typedef struct mqs_segment mqs_segment_t;

typedef struct mqs_seglog_config {
    uint64_t segment_bytes;     /* multiple of 4096, 8 KiB to 1 GiB */
    int fsync_mode;             /* enum mqs_seglog_fsync */
    int readonly;               /* no lock, no recovery writes, no append */
    int64_t fsync_interval_ns;  /* "interval": max age of an unsynced record */
    int64_t fsync_interval_records; /* "interval": or this many, if > 0 */
    int64_t retention_bytes;    /* < 0: keep every segment by size */
    int64_t retention_ns;       /* < 0: keep every segment by age */
} mqs_seglog_config_t;

/* What recovery found and did on open; all zero after a clean close. */
typedef struct mqs_seglog_recovery {
    int64_t segments_scanned;   /* segments whose records were checked */
    int64_t records_verified;   /* records whose CRC recovery checked */
    int64_t torn_segments;      /* segments with bytes zeroed */
    int64_t bytes_zeroed;       /* from the first invalid record on */
    int64_t records_dropped;    /* complete-looking records in that range */
    int64_t first_bad_offset;   /* offset expected at the first cut, or -1 */
    int64_t first_bad_base;     /* base offset of that segment, or -1 */
    uint64_t first_bad_position;
    int64_t temp_files_removed; /* half-created segments from a crash */
    int64_t checkpoint_offset;  /* offset the checkpoint covered, or -1 */
    /* 1 if the records of the checkpoint's segment ended before the
     * checkpoint's position: records there were damaged or lost after
     * the close that wrote it. first_bad_* then give where they end,
     * read-only handles included, and a writer cut the segment there
     * and removed the checkpoint. */
    int64_t ended_before_checkpoint;
    /* Damaged records below a checkpoint that recovery skipped to
     * resynchronize with it (see the header comment): reads of their
     * offsets return MQS_ECORRUPT. */
    int64_t damaged_ranges;     /* runs of consecutive damaged bytes */
    int64_t records_skipped;    /* offsets in those ranges */
    int64_t first_skipped_offset; /* first offset of the first, or -1 */
    int64_t first_skipped_base; /* base offset of its segment, or -1 */
    uint64_t first_skipped_position;
} mqs_seglog_recovery_t;

typedef struct mqs_seglog_stats {
    int64_t start_offset;       /* first retained offset */
    int64_t end_offset;         /* offset the next append gets */
    int64_t synced_offset;      /* every offset below it was synced */
    int64_t segments;
    int64_t bytes;              /* sum of segment file sizes */
    int64_t appended_records;   /* by this handle */
    int64_t syncs;              /* successful sync calls that did I/O */
    int64_t sync_errno;         /* errno that poisoned the log, or 0 */
    int64_t segments_deleted;   /* by retention, through this handle */
    int64_t records_deleted;
    /* Bytes of zeros written ahead of the end ("never", "interval"), by
     * the log's toucher thread and by the appending thread when it caught
     * up with the toucher. */
    int64_t zeros_by_toucher;
    int64_t zeros_by_appender;
    /* Records appended with pwrite() instead of stores into the mapping,
     * because syncs came every few records (see mqs_seglog_append). */
    int64_t records_by_write;
    /* Group commit under "always": syncs run by the caller that
     * completed a gathering leader's group, and gathers that ran out of
     * time before their group was complete (gather_callers in
     * mqs_seglog.c). */
    int64_t syncs_taken_over;
    int64_t gather_timeouts;
} mqs_seglog_stats_t;

/* One record to append; key may be NULL with has_key 0. */
typedef struct mqs_seglog_entry {
    const void *key;
    const void *value;
    uint32_t key_len;
    uint32_t value_len;
    int64_t timestamp_ns;
    int has_key;
} mqs_seglog_entry_t;

/* A record found by a read: pointers into the segment mapping. */
typedef struct mqs_seglog_record {
    int64_t offset;
    int64_t timestamp_ns;
    const uint8_t *key;
    const uint8_t *value;
    uint32_t key_len;
    uint32_t value_len;
    int has_key;
    mqs_segment_t *segment;     /* borrowed from the log */
    uint64_t position;          /* of the record header in the segment */
} mqs_seglog_record_t;

/*
 * Test hook run around every sync: before the I/O with phase 0 (a
 * non-zero return is taken as that errno and the sync fails without
 * I/O), and after a successful sync with phase 1 (return ignored).
 * end_offset is the offset after the last record the sync covers.
 */
typedef int (*mqs_seglog_sync_hook_t)(void *ctx, int64_t end_offset,
                                      int phase);

/*
 * Open (creating if missing, mode 0700) the log directory `path`. A
 * writer takes the lock, removes half-created segment files, verifies
 * and repairs the tail (see mqs_seglog_recovery_t) and rebuilds the
 * indexes; a read-only handle does neither write. `report` (may be
 * NULL) gets what recovery did; `os_errno` (may be NULL) gets the errno
 * of a failed system call. Any thread, no log exists yet.
 * Returns MQS_OK, MQS_EINVAL (bad config), MQS_ENOMEM, MQS_EIO (path is
 * not a directory, cannot be created or read), MQS_ELOCKED, MQS_ELOGVERSION,
 * MQS_ECORRUPT (a segment header failed its CRC), MQS_ENOSPACE (the first
 * segment cannot be preallocated).
 */
int mqs_seglog_open(mqs_seglog_t **out, const char *path,
                    const mqs_seglog_config_t *config,
                    mqs_seglog_recovery_t *report, int *os_errno);

/*
 * Stop the flusher, sync (unless the mode is "never"), write the
 * recovery point (unless the log is poisoned), unmap and release the
 * lock. The handle is freed even when a step fails. Segments still
 * referenced through mqs_seglog_segment_acquire stay mapped until
 * released.
 * Returns MQS_OK, MQS_EPOISONED (the final sync failed) or MQS_EIO
 * (writing the recovery point failed). Either way the recovery point
 * may not cover the last records, so the next open checks their CRCs.
 * After MQS_EIO every record stays readable.
 */
int mqs_seglog_close(mqs_seglog_t *log);

/* mqs_seglog_close, and *os_errno (may be NULL) gets the errno of the
 * failed step, or 0. */
int mqs_seglog_close_errno(mqs_seglog_t *log, int *os_errno);

/*
 * Free a log handle inherited by a forked child without touching the
 * files: no flush, no checkpoint, no join of the flusher thread (which
 * exists only in the parent), and no destroy of the mutexes and condition
 * variables that parent threads may have held at the fork. Closing the
 * child's copy of the lock file descriptor leaves the parent's writer
 * lock held, because flock locks belong to the open file description the
 * parent still has open.
 */
void mqs_seglog_abandon(mqs_seglog_t *log);

/*
 * Append `n` records with consecutive offsets; *first_offset gets the
 * first. Sizes are checked first, so either all are appended or none
 * (except when a roll fails midway: the records before it stay). Rolls
 * to a new segment when the active one is full and then applies
 * retention. Does not sync, except what a roll needs: call
 * mqs_seglog_sync for "always". Records go into the mapping by stores,
 * or by pwrite() while recent syncs covered few records each (a sync
 * write-protects the page it ends in, and the next store would fault).
 * Readers see the same bytes either way.
 * Returns MQS_OK, MQS_EINVAL (n < 1), MQS_ETOOBIG (a record larger than
 * fits in a segment), MQS_EREADONLY, MQS_EPOISONED, MQS_ENOSPACE or
 * MQS_EIO (a new segment could not be created).
 */
int mqs_seglog_append(mqs_seglog_t *log, const mqs_seglog_entry_t *entries,
                      size_t n, int64_t *first_offset);

/*
 * Make every record below `end_offset` durable (msync of the mapped
 * range), sharing one sync among all callers waiting at the time (group
 * commit). end_offset < 0 means everything appended so far. A failure
 * poisons the log: every later append and sync returns MQS_EPOISONED.
 * Any thread, concurrently with appends.
 * Returns MQS_OK, MQS_EPOISONED (this or an earlier sync failed),
 * MQS_EREADONLY.
 */
int mqs_seglog_sync(mqs_seglog_t *log, int64_t end_offset);

/*
 * Whether a caller of mqs_seglog_sync arriving now would have its sync
 * start without waiting: it would complete a gathering leader's group,
 * or lead without gathering. 0 while a sync runs, or when it would wait
 * for others. A hint: other callers may arrive first. Lets a caller do,
 * just before the sync starts, work that should not run while the group
 * gathers (the log broker wakes its consumers there).
 */
int mqs_seglog_sync_starts_now(mqs_seglog_t *log);

/*
 * Find the record at `offset` and check its CRC.
 * Returns MQS_OK, MQS_ERANGE (offset below the first retained record),
 * MQS_EEMPTY (offset at or past the end; a read-only handle first looks
 * for new records), MQS_ECORRUPT (the record, or the way to it, failed
 * its checks; nothing is returned), MQS_ENOMEM (index growth).
 */
int mqs_seglog_read(mqs_seglog_t *log, int64_t offset,
                    mqs_seglog_record_t *record);

/*
 * Read up to `max_records` records from `offset`, stopping at the end of
 * the segment that contains it. For Arrow binary_view columns, value_views
 * and key_views (16 bytes per record, may be NULL) get views whose
 * buffer index is 0 and whose offsets are positions in *segment's
 * mapping; key_valid (a bitmap of max_records bits, zeroed by the
 * caller, may be NULL) gets a bit per record with a key. offsets and
 * timestamps (may be NULL) get one int64 per record. *count gets the
 * number read. Every record's CRC is checked; a failing record ends the
 * batch before it, or returns MQS_ECORRUPT if it is the first.
 * Returns the statuses of mqs_seglog_read.
 */
int mqs_seglog_read_batch(mqs_seglog_t *log, int64_t offset,
                          int64_t max_records, uint8_t *value_views,
                          uint8_t *key_views, uint8_t *key_valid,
                          int64_t *offsets, int64_t *timestamps,
                          int64_t *count, mqs_segment_t **segment);

/*
 * *offset gets the first offset whose record has timestamp_ns >= the
 * given one (the end offset if none), using the time indexes.
 * Returns MQS_OK, MQS_ECORRUPT, MQS_ENOMEM.
 */
int mqs_seglog_find_time(mqs_seglog_t *log, int64_t timestamp_ns,
                         int64_t *offset);

/*
 * Seal the active segment and start a new one at the end offset, then
 * apply retention. A no-op on an empty active segment.
 * Returns MQS_OK, MQS_EREADONLY, MQS_EPOISONED, MQS_ENOSPACE, MQS_EIO.
 */
int mqs_seglog_roll(mqs_seglog_t *log);

/*
 * Unlink sealed segments beyond retention_bytes (oldest first) or whose
 * newest record is older than now_ns - retention_ns. Never the active
 * segment. *deleted (may be NULL) gets how many were removed.
 * Returns MQS_OK, MQS_EREADONLY, MQS_EIO.
 */
int mqs_seglog_retain(mqs_seglog_t *log, int64_t now_ns, int64_t *deleted);

/*
 * Forget sealed segments whose every record is below `offset`, oldest
 * first. A writer unlinks their files, never its active segment. A
 * read-only handle drops its mappings, down to none, because the writer
 * has unlinked those files or will; its next refresh maps later ones. Mappings that views still hold stay until those are released,
 * and no file is ever truncated. *deleted (may be NULL) gets how many.
 * Returns MQS_OK, MQS_EIO.
 */
int mqs_seglog_retain_below(mqs_seglog_t *log, int64_t offset,
                            int64_t *deleted);

/*
 * Read-only handle: pick up records and segments the writer added since
 * the last call. A writer handle returns MQS_OK at once.
 * Returns MQS_OK, MQS_ENOMEM, MQS_EIO, MQS_ELOGVERSION, MQS_ECORRUPT.
 */
int mqs_seglog_refresh(mqs_seglog_t *log);

void mqs_seglog_get_stats(mqs_seglog_t *log, mqs_seglog_stats_t *stats);

/* errno of the last failed system call through this handle, or 0. */
int mqs_seglog_last_errno(mqs_seglog_t *log);

/* Install (or with NULL remove) the sync test hook. Writer thread only,
 * while no sync runs. */
/* Test hook: called twice by the toucher thread, outside every lock of
 * the log, before each write() of zeros over [from, to) of the active
 * segment: with `writing` 0 before the range is final (it is picked
 * again after the call), and with `writing` 1 once it is, just before
 * the write() (a slow hook then keeps the write in progress longer).
 * Any thread; NULL removes it. */
typedef void (*mqs_seglog_touch_hook_t)(void *ctx, uint64_t from,
                                        uint64_t to, int writing);
void mqs_seglog_set_touch_hook(mqs_seglog_t *log,
                               mqs_seglog_touch_hook_t hook, void *ctx);

void mqs_seglog_set_sync_hook(mqs_seglog_t *log, mqs_seglog_sync_hook_t hook,
                              void *ctx);

/* Largest value_len one record can have in a segment of this size with
 * a key of key_len bytes, or -1 if even an empty record does not fit. */
int64_t mqs_seglog_max_value_bytes(uint64_t segment_bytes, uint32_t key_len);

/*
 * Keep a segment's mapping alive past retention and close, e.g. while
 * a Python memoryview or Arrow buffer points into it. Any thread.
 */
void mqs_seglog_segment_acquire(mqs_segment_t *segment);

/* Drop a reference; the last one unmaps and closes the file. Any thread. */
void mqs_seglog_segment_release(mqs_segment_t *segment);

/* Start address and size of a segment's mapping. Any thread. */
const uint8_t *mqs_seglog_segment_data(mqs_segment_t *segment,
                                       uint64_t *size);

/* First offset of a segment. Any thread. */
int64_t mqs_seglog_segment_base(mqs_segment_t *segment);

#endif /* MQS_SEGLOG_H */
