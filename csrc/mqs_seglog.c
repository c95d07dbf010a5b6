/*
 * mqs_seglog.c: the segment log; the file format is in mqs_seglog.h.
 */
#define _GNU_SOURCE
#include "mqs_seglog.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "mqs_crc32c.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the segment log format is little-endian; this host is not"
#endif

#define SEG_NAME_BYTES 32           /* 20 digits + ".seg.tmp" + NUL */
#define CHECKPOINT_NAME "recovery-point"
#define CHECKPOINT_MAGIC "MQSCKPT1"
#define CHECKPOINT_BYTES 48
/* A checkpoint written before it recorded next_offset has only its
 * first 32 bytes. */
#define CHECKPOINT_V1_BYTES 32
#define LOCK_NAME "lock"
/* The writer drops page table entries of what it wrote every this many
 * bytes of a segment. */
#define RELEASE_STEP ((uint64_t)8 << 20)
/*
 * Under "never" and "interval", zeros are write()n into the pages of the
 * active segment ahead of its end. Without that, the first store to each
 * page of the preallocated file faults, and the kernel zero-fills a new
 * page-cache page in the fault. A write() of whole pages creates those
 * pages from its own bytes instead, and the later store only maps a
 * cached page. The bytes stay zero, so readers, syncs and recovery see
 * the same file.
 *
 * A thread owned by the log (the toucher) does that work, so that the
 * appending thread does not pay for it: it keeps TOUCH_AHEAD bytes past
 * the end zeroed, TOUCH_CHUNK bytes per write(). On a 2-vCPU KVM guest
 * (ext4, Linux 6.18) a 4 KiB append spent about 550 ns of its 1,100 ns
 * in the kernel writing those zeros when the appending thread wrote them
 * itself, ZEROS_STEP bytes at a time, at least ZEROS_MARGIN bytes ahead.
 * The appending thread still does that when the toucher cannot start.
 *
 * The toucher must never write a page the appender has stored into:
 * `touch_done` is the position below which it never writes again, and
 * `touch_busy_from` where its write() in progress starts. The appender
 * stores below `touch_done` without a lock. Before it stores past it, it
 * takes touch_mu, waits for the write() in progress, writes the zeros up
 * to TOUCH_CHUNK past its end itself and raises `touch_done` there, so a
 * toucher that fell behind (no free CPU) costs what the appender writing
 * its own zeros costs, and starts again ahead of the appender.
 */
#define ZEROS_STEP ((size_t)2 << 20)
#define ZEROS_MARGIN ((uint64_t)512 << 10)
#define TOUCH_CHUNK ((uint64_t)1 << 20)
#define TOUCH_BEHIND ((uint64_t)256 << 10)
#define TOUCH_AHEAD ((uint64_t)8 << 20)

/* Never written. Not const, so that it sits in .bss and not in the
 * library file; reads of its untouched pages map the zero page. */
static uint8_t zeros[ZEROS_STEP];

typedef struct index_entry {
    uint32_t rel;                   /* offset - base_offset */
    uint32_t pos;
} index_entry_t;

typedef struct time_entry {
    int64_t max_ts;                 /* max timestamp up to this record */
    uint32_t rel;
    uint32_t pos;
} time_entry_t;

/*
 * Damaged bytes that a resync skipped (see segment_resync): the records
 * with offsets [first, end) lay in [pos, resume_pos) and cannot be read.
 * The record at resume_pos has offset `end`. first == end when the
 * damaged bytes held no record of their own.
 */
typedef struct gap {
    int64_t first;
    int64_t end;
    uint64_t pos;
    uint64_t resume_pos;
} gap_t;

struct mqs_segment {
    _Atomic int32_t refs;
    int fd;
    uint8_t *map;
    uint64_t map_bytes;
    int64_t base_offset;
    uint64_t epoch;
    uint32_t seed;
    char name[SEG_NAME_BYTES];

    /* Seal block, valid when sealed. */
    int sealed;
    uint64_t seal_end_pos;
    int64_t seal_next_offset;

    /* Walk state: records [base, next_offset) at [HEADER, end_pos) have
     * been checked and indexed, except the offsets in `gaps` (in order).
     * For a sealed segment whose records cannot be resynchronized with
     * the seal, the walk stops early at a damaged record, and the rest
     * up to the seal is unreadable. */
    int indexed;
    uint64_t end_pos;
    int64_t next_offset;
    int64_t min_ts;
    int64_t max_ts;

    uint64_t synced_pos;            /* writer, under sync_mu */
    uint64_t released_pos;          /* writer: page entries dropped below */
    uint64_t zeroed_pos;            /* writer: zeros written up to here */
    uint64_t extended_bytes;        /* file was short; zeros added at open */

    index_entry_t *idx;
    size_t idx_n, idx_cap;
    time_entry_t *tix;
    size_t tix_n, tix_cap;
    gap_t *gaps;
    size_t gaps_n, gaps_cap;
};

enum failpoint {
    FP_MID_RECORD,
    FP_AFTER_APPEND,
    FP_AFTER_SYNC,
    FP_ROLL_SEALED,
    FP_ROLL_CREATED,
    FP_SYNC_EIO,
    FP_CREATE_ENOSPC,
    FP_COUNT,
};

#ifdef MQS_FAILPOINTS
static const char *const failpoint_names[FP_COUNT] = {
    "seglog.mid_record",  "seglog.after_append", "seglog.after_sync",
    "seglog.roll_sealed", "seglog.roll_created", "seglog.sync_eio",
    "seglog.create_enospc",
};
#endif

/* Threads that gather_callers remembers; more concurrent callers than
 * this only make it wait for fewer of them. */
#define MQS_GATHER_SLOTS 64

struct mqs_seglog {
    mqs_seglog_config_t cfg;
    int dir_fd;
    int lock_fd;
    long page_bytes;

    mqs_segment_t **segs;
    size_t nsegs, segs_cap;

    /* Writer: the segment appends go to, switched under sync_mu. */
    mqs_segment_t *active;
    _Atomic int64_t pub_offset;     /* offset after the last appended */
    _Atomic int64_t pub_pos;        /* end position in the active segment */

    pthread_mutex_t sync_mu;
    pthread_cond_t sync_cv;         /* CLOCK_MONOTONIC */
    int sync_running;
    /* While a leader gathers: the arrivals it waits for, else 0. */
    int sync_gathering;
    /* Gathers started, and the last one that an arrival took over. */
    uint64_t gather_gen, taken_gen;
    _Atomic int64_t syncs_taken_over, gather_timeouts;
    int arrivals;                   /* callers since the last snapshot */
    uint64_t sync_round;            /* snapshots taken so far */
    struct sync_caller {            /* who called recently (gather_callers) */
        pthread_t thread;
        uint64_t round;             /* sync_round at its last call */
        int used;
    } seen[MQS_GATHER_SLOTS];
    int64_t last_sync_ns;
    /* Records per sync, times 8, averaged over about 8 syncs (note_round);
     * below SMALL_ROUNDS_X8 the appender writes with pwrite(). */
    _Atomic int64_t round_records_x8;
    _Atomic int64_t synced_offset;
    mqs_segment_t **pending;        /* sealed, not yet synced ("never") */
    size_t pending_n, pending_cap;
    _Atomic int poison_errno;
    mqs_seglog_sync_hook_t hook;
    void *hook_ctx;

    pthread_t flusher;
    int flusher_started;
    pthread_mutex_t flush_mu;
    pthread_cond_t flush_cv;
    int flush_stop;
    int flush_requested;

    /* Segment whose pages the last read mapped in; cleared with hint_seg. */
    mqs_segment_t *resident_seg;

    /* Read hint: where the record after the last one read starts. */
    mqs_segment_t *hint_seg;
    int64_t hint_offset;
    uint64_t hint_pos;

#ifdef MQS_FAILPOINTS
    _Atomic int64_t fp_left[FP_COUNT];
#endif

    int write_zeros;                /* writer: write zeros ahead (ZEROS_STEP) */

    /* The toucher thread (see ZEROS_STEP); fields under touch_mu. */
    pthread_t toucher;
    int toucher_started;
    pthread_mutex_t touch_mu;
    pthread_cond_t touch_cv;
    int touch_stop;
    int touch_busy;                 /* a write() of zeros is running */
    uint64_t touch_busy_from;
    mqs_segment_t *touch_seg;       /* reference held; NULL when detached */
    uint64_t touch_target;          /* zero up to here */
    _Atomic uint64_t touch_done;    /* never writes below here again */
    mqs_seglog_touch_hook_t touch_hook;
    void *touch_hook_ctx;
    int64_t zeros_by_toucher;       /* bytes, under touch_mu */
    int64_t zeros_by_appender;      /* bytes, under touch_mu */
    mqs_segment_t *touch_writer_seg; /* writer: the segment it attached */
    uint64_t touch_writer_target;   /* writer: the target it last set */
    _Atomic int64_t syncs;
    int64_t appended;
    int64_t records_by_write;       /* writer: appended with pwrite() */
    int64_t segments_deleted;
    int64_t records_deleted;
    int last_errno;
};

static int sync_as(mqs_seglog_t *log, int64_t end_offset, int caller);

/*
 * When the syncs of the last rounds covered fewer than 32 records each on
 * average, appends go through pwrite() (see pwrite_record). A pwrite()
 * costs about 1.3 us more per 100-byte record than a store (3.5 million
 * against 650,000 appends per second on a 2-vCPU KVM guest), and saves a
 * write fault and a TLB shootdown per sync.
 */
#define SMALL_ROUNDS_X8 (32 * 8)

/* Add a sync that covered `records` to the average. Under sync_mu. */
static void note_round(mqs_seglog_t *log, int64_t records)
{
    int64_t avg = atomic_load_explicit(&log->round_records_x8,
                                       memory_order_relaxed);
    atomic_store_explicit(&log->round_records_x8, avg - avg / 8 + records,
                          memory_order_relaxed);
}

/* ---- small helpers ---------------------------------------------------- */

static inline uint64_t align_up(uint64_t n)
{
    return (n + MQS_SEGLOG_ALIGN - 1) & ~(uint64_t)(MQS_SEGLOG_ALIGN - 1);
}

static inline uint32_t get_u32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint64_t get_u64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline void put_u32(uint8_t *p, uint32_t v)
{
    memcpy(p, &v, 4);
}

static inline void put_u64(uint8_t *p, uint64_t v)
{
    memcpy(p, &v, 8);
}

/* The length word is aligned to 8 bytes, so it can be accessed atomically;
 * the acquire pairs with the appender's release store. */
static inline uint32_t load_length_acquire(const uint8_t *record)
{
    return mqs_load_acquire_u32((const _Atomic uint32_t *)record);
}

static int64_t wall_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static uint64_t random_epoch(void)
{
    uint64_t e = 0;
    struct timespec ts;

    if (getrandom(&e, sizeof e, GRND_NONBLOCK) == (ssize_t)sizeof e && e)
        return e;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    e = (uint64_t)ts.tv_nsec * 0x9E3779B97F4A7C15ull ^
        (uint64_t)ts.tv_sec << 32 ^ (uint64_t)getpid();
    return e ? e : 1;
}

static uint32_t seed_of(uint64_t epoch)
{
    return (uint32_t)epoch ^ (uint32_t)(epoch >> 32);
}

static void segment_name(char *out, int64_t base, int temp)
{
    snprintf(out, SEG_NAME_BYTES, "%020lld.seg%s", (long long)base,
             temp ? ".tmp" : "");
}

static int is_durable(const mqs_seglog_t *log)
{
    return log->cfg.fsync_mode != MQS_SEGLOG_FSYNC_NEVER;
}

static int fail_errno(mqs_seglog_t *log, int status)
{
    log->last_errno = errno;
    return status;
}

/* ---- failpoints ------------------------------------------------------- */

/*
 * MQS_FAILPOINT="name" or "name:N" (several separated by commas): the
 * Nth time (default the first) a named point is reached, it fires. Kill
 * points raise SIGKILL in the calling process, as an outside kill at
 * that instruction would; seglog.sync_eio makes that sync fail with
 * EIO, and seglog.create_enospc the preallocation of a new segment
 * fail with ENOSPC. The same variable drives csrc/mqs_failpoint.h, and like those
 * points these are compiled in only when MQS_FAILPOINTS is defined
 * (setup.py: MQS_FAILPOINTS=1). The variable is read once per open log,
 * so each log counts its own passes.
 */
#ifdef MQS_FAILPOINTS
static void failpoints_parse(mqs_seglog_t *log)
{
    const char *spec = getenv("MQS_FAILPOINT");

    for (int i = 0; i < FP_COUNT; i++)
        atomic_store_explicit(&log->fp_left[i], 0, memory_order_relaxed);
    if (!spec)
        return;
    for (int i = 0; i < FP_COUNT; i++) {
        size_t len = strlen(failpoint_names[i]);
        for (const char *at = spec; (at = strstr(at, failpoint_names[i]));
             at += len) {
            long long n = 1;
            if (at != spec && at[-1] != ',')
                continue;
            if (at[len] == ':')
                n = atoll(at + len + 1);
            else if (at[len] != '\0' && at[len] != ',')
                continue;
            atomic_store_explicit(&log->fp_left[i], n > 0 ? n : 1,
                                  memory_order_relaxed);
            break;
        }
    }
}

static int failpoint_hit(mqs_seglog_t *log, enum failpoint fp)
{
    if (atomic_load_explicit(&log->fp_left[fp], memory_order_relaxed) <= 0)
        return 0;
    return atomic_fetch_sub_explicit(&log->fp_left[fp], 1,
                                     memory_order_relaxed) == 1;
}

static void failpoint_kill(mqs_seglog_t *log, enum failpoint fp)
{
    if (failpoint_hit(log, fp))
        raise(SIGKILL);
}
#else
static void failpoints_parse(mqs_seglog_t *log)
{
    (void)log;
}

static int failpoint_hit(mqs_seglog_t *log, enum failpoint fp)
{
    (void)log;
    (void)fp;
    return 0;
}

static void failpoint_kill(mqs_seglog_t *log, enum failpoint fp)
{
    (void)log;
    (void)fp;
}
#endif

/* ---- records ---------------------------------------------------------- */

static uint32_t record_crc(uint32_t seed, const uint8_t *record,
                           uint32_t length)
{
    uint32_t crc = mqs_crc32c_extend(seed, record + MQS_SEGLOG_R_OFFSET,
                                     length - MQS_SEGLOG_R_OFFSET);
    return mqs_crc32c_extend(crc, &length, 4);
}

enum frame_result { FRAME_EMPTY = 0, FRAME_VALID = 1, FRAME_BAD = -1 };

/*
 * Check the record at `pos`: its length must fit below `limit`, its key
 * inside it, its offset must be `expected` (unless expected < 0) and,
 * with verify_crc, its CRC must match.
 */
static enum frame_result frame_check(const mqs_segment_t *seg, uint64_t pos,
                                     uint64_t limit, int64_t expected,
                                     int verify_crc, uint32_t *length_out)
{
    const uint8_t *p = seg->map + pos;
    uint32_t length;

    if (pos + MQS_SEGLOG_RECORD_HEADER_BYTES > limit)
        return FRAME_EMPTY;
    length = load_length_acquire(p);
    if (length == 0)
        return FRAME_EMPTY;
    if (length < MQS_SEGLOG_RECORD_HEADER_BYTES || pos + length > limit)
        return FRAME_BAD;
    if (expected >= 0 && (int64_t)get_u64(p + MQS_SEGLOG_R_OFFSET) != expected)
        return FRAME_BAD;
    if (get_u32(p + MQS_SEGLOG_R_KEY_LEN) >
        length - MQS_SEGLOG_RECORD_HEADER_BYTES)
        return FRAME_BAD;
    if (verify_crc && get_u32(p + MQS_SEGLOG_R_CRC) !=
                          record_crc(seg->seed, p, length))
        return FRAME_BAD;
    *length_out = length;
    return FRAME_VALID;
}

static void fill_record(mqs_segment_t *seg, uint64_t pos,
                        mqs_seglog_record_t *r)
{
    const uint8_t *p = seg->map + pos;
    uint32_t length = get_u32(p + MQS_SEGLOG_R_LENGTH);

    r->offset = (int64_t)get_u64(p + MQS_SEGLOG_R_OFFSET);
    r->timestamp_ns = (int64_t)get_u64(p + MQS_SEGLOG_R_TIMESTAMP);
    r->key_len = get_u32(p + MQS_SEGLOG_R_KEY_LEN);
    r->has_key = (p[MQS_SEGLOG_R_ATTRIBUTES] & MQS_SEGLOG_ATTR_HAS_KEY) != 0;
    r->key = p + MQS_SEGLOG_RECORD_HEADER_BYTES;
    r->value = r->key + r->key_len;
    r->value_len = length - MQS_SEGLOG_RECORD_HEADER_BYTES - r->key_len;
    r->segment = seg;
    r->position = pos;
}

int64_t mqs_seglog_max_value_bytes(uint64_t segment_bytes, uint32_t key_len)
{
    uint64_t room;

    if (segment_bytes <= MQS_SEGLOG_HEADER_BYTES)
        return -1;
    room = (segment_bytes - MQS_SEGLOG_HEADER_BYTES) &
           ~(uint64_t)(MQS_SEGLOG_ALIGN - 1);
    if (room > UINT32_MAX)
        room = UINT32_MAX & ~(uint64_t)(MQS_SEGLOG_ALIGN - 1);
    if (room < (uint64_t)MQS_SEGLOG_RECORD_HEADER_BYTES + key_len)
        return -1;
    return (int64_t)(room - MQS_SEGLOG_RECORD_HEADER_BYTES - key_len);
}

/* ---- indexes ---------------------------------------------------------- */

/* Indexes are sparse, so a failed allocation only drops an entry and
 * makes later lookups walk further; it never fails an append. */
static void index_add(mqs_segment_t *seg, int64_t offset, uint64_t pos,
                      int64_t ts)
{
    uint32_t rel = (uint32_t)(offset - seg->base_offset);

    if (ts < seg->min_ts)
        seg->min_ts = ts;
    if (seg->idx_n == 0 || pos - seg->idx[seg->idx_n - 1].pos >=
                               MQS_SEGLOG_INDEX_INTERVAL_BYTES) {
        if (seg->idx_n == seg->idx_cap) {
            size_t cap = seg->idx_cap ? seg->idx_cap * 2 : 64;
            index_entry_t *grown = realloc(seg->idx, cap * sizeof *grown);
            if (grown) {
                seg->idx = grown;
                seg->idx_cap = cap;
            }
        }
        if (seg->idx_n < seg->idx_cap)
            seg->idx[seg->idx_n++] = (index_entry_t){rel, (uint32_t)pos};
    }
    if (ts <= seg->max_ts)
        return;
    seg->max_ts = ts;
    if (seg->tix_n > 0 && pos - seg->tix[seg->tix_n - 1].pos <
                              MQS_SEGLOG_INDEX_INTERVAL_BYTES) {
        /* Too close to the last entry, so skip this one. Every entry
         * still gives the max timestamp of the records up to it, which
         * is all a lookup needs. */
        return;
    }
    if (seg->tix_n == seg->tix_cap) {
        size_t cap = seg->tix_cap ? seg->tix_cap * 2 : 64;
        time_entry_t *grown = realloc(seg->tix, cap * sizeof *grown);
        if (grown) {
            seg->tix = grown;
            seg->tix_cap = cap;
        }
    }
    if (seg->tix_n < seg->tix_cap)
        seg->tix[seg->tix_n++] = (time_entry_t){ts, rel, (uint32_t)pos};
}

static void index_reset(mqs_segment_t *seg)
{
    seg->idx_n = 0;
    seg->tix_n = 0;
    seg->gaps_n = 0;
    seg->min_ts = INT64_MAX;
    seg->max_ts = INT64_MIN;
    seg->end_pos = MQS_SEGLOG_HEADER_BYTES;
    seg->next_offset = seg->base_offset;
}

/*
 * Walk records from the segment's current walk end, checking lengths and
 * offset continuity, and CRCs from position `verify_from` on. Stops at
 * the first empty or invalid record and returns which it was.
 */
static enum frame_result segment_walk(mqs_segment_t *seg, uint64_t limit,
                                      uint64_t verify_from,
                                      int64_t *verified)
{
    enum frame_result r;
    uint32_t length = 0;

    for (;;) {
        uint64_t pos = seg->end_pos;
        int verify = pos >= verify_from;
        r = frame_check(seg, pos, limit, seg->next_offset, verify, &length);
        if (r != FRAME_VALID)
            return r;
        index_add(seg, seg->next_offset, pos,
                  (int64_t)get_u64(seg->map + pos + MQS_SEGLOG_R_TIMESTAMP));
        seg->end_pos = pos + align_up(length);
        seg->next_offset++;
        if (verify && verified)
            (*verified)++;
    }
}

static int gap_add(mqs_segment_t *seg, int64_t first, int64_t end,
                   uint64_t pos, uint64_t resume_pos)
{
    if (seg->gaps_n == seg->gaps_cap) {
        size_t cap = seg->gaps_cap ? seg->gaps_cap * 2 : 4;
        gap_t *grown = realloc(seg->gaps, cap * sizeof *grown);
        if (!grown)
            return MQS_ENOMEM;
        seg->gaps = grown;
        seg->gaps_cap = cap;
    }
    seg->gaps[seg->gaps_n++] = (gap_t){first, end, pos, resume_pos};
    return MQS_OK;
}

/*
 * First 8-byte aligned position after `from` and below `limit` where a
 * record with a valid CRC starts whose offset lies in [expected,
 * next_limit) (next_limit < 0: no upper bound). Each skipped record
 * takes at least MQS_SEGLOG_RECORD_HEADER_BYTES of [from, pos), which
 * bounds how far above `expected` the offset may be. Returns 0 if none.
 */
static uint64_t resync_candidate(const mqs_segment_t *seg, uint64_t from,
                                 uint64_t limit, int64_t expected,
                                 int64_t next_limit, int64_t *offset_out)
{
    uint64_t pos;

    for (pos = from + MQS_SEGLOG_ALIGN;
         pos + MQS_SEGLOG_RECORD_HEADER_BYTES <= limit;
         pos += MQS_SEGLOG_ALIGN) {
        const uint8_t *p = seg->map + pos;
        int64_t offset = (int64_t)get_u64(p + MQS_SEGLOG_R_OFFSET);
        uint32_t length;
        /* The attributes and reserved fields (0 or 1 together, from
         * every writer) reject most bytes before the CRC, which costs a
         * pass over `length` bytes. NOTE: values that look like record
         * headers at many positions (lengths, offsets near `expected`
         * and these fields) still cost one CRC each, so a search through
         * such data is quadratic in the worst case. */
        if ((get_u32(p + MQS_SEGLOG_R_ATTRIBUTES) &
             ~(uint32_t)MQS_SEGLOG_ATTR_HAS_KEY) != 0)
            continue;
        if (offset < expected ||
            (uint64_t)(offset - expected) >
                (pos - from) / MQS_SEGLOG_RECORD_HEADER_BYTES)
            continue;
        if (next_limit >= 0 && offset >= next_limit)
            continue;
        if (frame_check(seg, pos, limit, -1, 1, &length) == FRAME_VALID) {
            *offset_out = offset;
            return pos;
        }
    }
    return 0;
}

/*
 * Re-index `seg` from its header up to `end_pos`, checking every CRC and
 * skipping damaged records. Where the walk stops before end_pos, the
 * next record that passes its checks (resync_candidate) resumes it, and
 * the offsets in between become a gap. The result counts only if the
 * walk then ends exactly at end_pos, with `next_offset` next when it is
 * known (>= 0). Random bytes cannot pass: every resumed walk starts at a
 * record with this file's CRC seed and must arrive at the end that a
 * clean close or the seal recorded.
 *
 * When no record passes between the stop and end_pos, the damaged
 * records were the last ones. That is accepted only with a known
 * next_offset, which gives the offsets skipped, and only when the walk
 * stopped at a non-zero length. Pages that an OS crash lost read as
 * zeros, and recovery cuts those instead.
 * Returns 1 on success, 0 if the records cannot be resynchronized (the
 * walk state is then partial, and the caller resets it), MQS_ENOMEM.
 */
static int segment_resync(mqs_segment_t *seg, uint64_t end_pos,
                          int64_t next_offset, int64_t *verified)
{
    index_reset(seg);
    for (;;) {
        enum frame_result stop = segment_walk(seg, end_pos, 0, verified);
        uint64_t from = seg->end_pos;
        int64_t expected = seg->next_offset;
        int64_t resume_offset = -1;
        uint64_t resume;

        if (from == end_pos)
            break;
        resume = resync_candidate(seg, from, end_pos, expected, next_offset,
                                  &resume_offset);
        if (resume == 0) {
            if (next_offset <= expected || stop != FRAME_BAD ||
                (uint64_t)(next_offset - expected) >
                    (end_pos - from) / MQS_SEGLOG_RECORD_HEADER_BYTES)
                return 0;
            resume = end_pos;
            resume_offset = next_offset;
        }
        if (gap_add(seg, expected, resume_offset, from, resume) != MQS_OK)
            return MQS_ENOMEM;
        seg->end_pos = resume;
        seg->next_offset = resume_offset;
    }
    return next_offset < 0 || seg->next_offset == next_offset;
}

/*
 * Build the index of a sealed segment the first time it is read. A walk
 * that stops before the seal's end resynchronizes with it, so a record
 * damaged after the seal costs only its own offsets.
 */
static void segment_ensure_indexed(mqs_segment_t *seg)
{
    uint64_t limit = seg->sealed ? seg->seal_end_pos : seg->map_bytes;

    if (seg->indexed)
        return;
    index_reset(seg);
    segment_walk(seg, limit, UINT64_MAX, NULL);
    if (seg->sealed && seg->end_pos != limit &&
        segment_resync(seg, limit, seg->seal_next_offset, NULL) != 1) {
        /* Reads past the damage return MQS_ECORRUPT. */
        index_reset(seg);
        segment_walk(seg, limit, UINT64_MAX, NULL);
    }
    seg->indexed = 1;
}

/* Return the gap that contains `offset`, or NULL. *floor (may be NULL)
 * gets the last gap that ends at or below it, or NULL. */
static const gap_t *gap_lookup(const mqs_segment_t *seg, int64_t offset,
                               const gap_t **floor)
{
    const gap_t *below = NULL;

    for (size_t i = 0; i < seg->gaps_n; i++) {
        const gap_t *g = &seg->gaps[i];
        if (offset < g->first)
            break;
        if (offset < g->end)
            return g;
        below = g;
    }
    if (floor)
        *floor = below;
    return NULL;
}

/* Offset after the last record in the segment (by its seal, if any). */
static int64_t segment_end_offset(const mqs_segment_t *seg)
{
    return seg->sealed ? seg->seal_next_offset : seg->next_offset;
}

/* Newest timestamp in the segment: from the seal while it is not
 * indexed, else from the walk. */
static int64_t segment_max_ts(mqs_segment_t *seg)
{
    if (!seg->indexed && !seg->sealed)
        segment_ensure_indexed(seg);
    return seg->max_ts;
}

/* ---- segment files ---------------------------------------------------- */

static void segment_free(mqs_segment_t *seg)
{
    if (seg->map && seg->map != MAP_FAILED)
        munmap(seg->map, seg->map_bytes);
    if (seg->fd >= 0)
        close(seg->fd);
    free(seg->idx);
    free(seg->tix);
    free(seg->gaps);
    free(seg);
}

void mqs_seglog_segment_acquire(mqs_segment_t *segment)
{
    atomic_fetch_add_explicit(&segment->refs, 1, memory_order_relaxed);
}

void mqs_seglog_segment_release(mqs_segment_t *segment)
{
    if (atomic_fetch_sub_explicit(&segment->refs, 1, memory_order_acq_rel) ==
        1)
        segment_free(segment);
}

const uint8_t *mqs_seglog_segment_data(mqs_segment_t *segment,
                                       uint64_t *size)
{
    if (size)
        *size = segment->map_bytes;
    return segment->map;
}

int64_t mqs_seglog_segment_base(mqs_segment_t *segment)
{
    return segment->base_offset;
}

static mqs_segment_t *segment_alloc(int64_t base)
{
    mqs_segment_t *seg = calloc(1, sizeof *seg);

    if (!seg)
        return NULL;
    atomic_init(&seg->refs, 1);
    seg->fd = -1;
    seg->map = NULL;
    seg->base_offset = base;
    segment_name(seg->name, base, 0);
    index_reset(seg);
    return seg;
}

static void seal_encode(const mqs_segment_t *seg, uint8_t *block,
                        uint64_t end_pos, int64_t next_offset)
{
    memset(block, 0, 36);
    put_u64(block + 0, end_pos);
    put_u64(block + 8, (uint64_t)next_offset);
    put_u64(block + 16, (uint64_t)seg->min_ts);
    put_u64(block + 24, (uint64_t)seg->max_ts);
    put_u32(block + 32, mqs_crc32c_extend(seg->seed, block, 32));
}

/* Read the seal block; sets the seal fields when its CRC matches. */
static void seal_load(mqs_segment_t *seg)
{
    const uint8_t *block = seg->map + MQS_SEGLOG_H_SEAL;
    uint64_t end_pos = get_u64(block);
    int64_t next = (int64_t)get_u64(block + 8);

    if (get_u32(block + 32) != mqs_crc32c_extend(seg->seed, block, 32))
        return;
    if (end_pos < MQS_SEGLOG_HEADER_BYTES || end_pos > seg->map_bytes ||
        next < seg->base_offset)
        return;
    seg->sealed = 1;
    seg->seal_end_pos = end_pos;
    seg->seal_next_offset = next;
    if (!seg->indexed) {
        seg->min_ts = (int64_t)get_u64(block + 16);
        seg->max_ts = (int64_t)get_u64(block + 24);
    }
}

/*
 * Read-only: load the seal a writer may have added since this handle
 * walked the segment, and then finish the walk up to the seal. Reads
 * trust a sealed segment's walk (an offset past it is damage), so a
 * seal must never be taken without the records it covers.
 */
static void seal_load_and_walk(mqs_segment_t *seg)
{
    seal_load(seg);
    if (seg->sealed)
        segment_walk(seg, seg->seal_end_pos, 0, NULL);
}

/*
 * Write the seal block for the walked records and, in a durable mode,
 * sync the header page. Writer only.
 */
static int segment_seal(mqs_seglog_t *log, mqs_segment_t *seg)
{
    uint8_t block[36];

    seal_encode(seg, block, seg->end_pos, seg->next_offset);
    memcpy(seg->map + MQS_SEGLOG_H_SEAL, block, sizeof block);
    seg->sealed = 1;
    seg->seal_end_pos = seg->end_pos;
    seg->seal_next_offset = seg->next_offset;
    if (is_durable(log) &&
        msync(seg->map, (size_t)log->page_bytes, MS_SYNC) != 0)
        return fail_errno(log, MQS_EIO);
    return MQS_OK;
}

static void header_encode(uint8_t *h, int64_t base, uint64_t epoch,
                          uint64_t segment_bytes)
{
    memset(h, 0, MQS_SEGLOG_HEADER_BYTES);
    memcpy(h + MQS_SEGLOG_H_MAGIC, MQS_SEGLOG_MAGIC, 8);
    put_u32(h + MQS_SEGLOG_H_VERSION, MQS_SEGLOG_VERSION);
    put_u32(h + MQS_SEGLOG_H_HEADER_BYTES, MQS_SEGLOG_HEADER_BYTES);
    put_u64(h + MQS_SEGLOG_H_BASE_OFFSET, (uint64_t)base);
    put_u64(h + MQS_SEGLOG_H_EPOCH, epoch);
    put_u64(h + MQS_SEGLOG_H_SEGMENT_BYTES, segment_bytes);
    put_u64(h + MQS_SEGLOG_H_CREATED_NS, (uint64_t)wall_ns());
    put_u32(h + MQS_SEGLOG_H_CRC, mqs_crc32c_extend(0, h, MQS_SEGLOG_H_CRC));
}

static int segment_map(mqs_seglog_t *log, mqs_segment_t *seg)
{
    int prot = PROT_READ | (log->cfg.readonly ? 0 : PROT_WRITE);

    seg->map = mmap(NULL, seg->map_bytes, prot, MAP_SHARED, seg->fd, 0);
    if (seg->map == MAP_FAILED) {
        seg->map = NULL;
        return fail_errno(log, errno == ENOMEM ? MQS_ENOMEM : MQS_EIO);
    }
    return MQS_OK;
}

static int sync_dir(mqs_seglog_t *log)
{
    if (is_durable(log) && fsync(log->dir_fd) != 0)
        return fail_errno(log, MQS_EIO);
    return MQS_OK;
}

/*
 * Create the segment starting at `base`: a temporary file, preallocated
 * in full, header written (and synced in a durable mode), then renamed
 * into place, so no reader ever maps a short file. Writer only.
 */
static int segment_create(mqs_seglog_t *log, int64_t base,
                          mqs_segment_t **out)
{
    char temp[SEG_NAME_BYTES];
    uint8_t header[MQS_SEGLOG_HEADER_BYTES];
    mqs_segment_t *seg = segment_alloc(base);
    int err, rc;

    if (!seg)
        return MQS_ENOMEM;
    seg->map_bytes = log->cfg.segment_bytes;
    seg->epoch = random_epoch();
    seg->seed = seed_of(seg->epoch);
    segment_name(temp, base, 1);
    unlinkat(log->dir_fd, temp, 0);
    seg->fd = openat(log->dir_fd, temp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC,
                     0600);
    if (seg->fd < 0) {
        rc = fail_errno(log, MQS_EIO);
        goto fail;
    }
    err = posix_fallocate(seg->fd, 0, (off_t)seg->map_bytes);
    if (err == 0 && failpoint_hit(log, FP_CREATE_ENOSPC))
        err = ENOSPC;
    if (err != 0) {
        errno = err;
        rc = fail_errno(log, (err == ENOSPC || err == EFBIG || err == EDQUOT)
                                 ? MQS_ENOSPACE
                                 : MQS_EIO);
        goto fail_unlink;
    }
    header_encode(header, base, seg->epoch, seg->map_bytes);
    if (pwrite(seg->fd, header, sizeof header, 0) != (ssize_t)sizeof header ||
        (is_durable(log) && fdatasync(seg->fd) != 0)) {
        rc = fail_errno(log, errno == ENOSPC ? MQS_ENOSPACE : MQS_EIO);
        goto fail_unlink;
    }
    if (renameat(log->dir_fd, temp, log->dir_fd, seg->name) != 0) {
        rc = fail_errno(log, MQS_EIO);
        goto fail_unlink;
    }
    rc = sync_dir(log);
    if (rc == MQS_OK)
        rc = segment_map(log, seg);
    if (rc != MQS_OK)
        goto fail;
    seg->indexed = 1;
    seg->synced_pos = MQS_SEGLOG_HEADER_BYTES;
    *out = seg;
    return MQS_OK;

fail_unlink:
    unlinkat(log->dir_fd, temp, 0);
fail:
    segment_free(seg);
    return rc;
}

/*
 * Open and map an existing segment file and check its header.
 * Returns MQS_OK, MQS_EIO, MQS_ENOMEM, MQS_ELOGVERSION, MQS_ECORRUPT.
 */
static int segment_open(mqs_seglog_t *log, int64_t base, mqs_segment_t **out)
{
    uint8_t h[MQS_SEGLOG_H_SEAL];
    struct stat st;
    mqs_segment_t *seg = segment_alloc(base);
    int rc;

    if (!seg)
        return MQS_ENOMEM;
    seg->fd = openat(log->dir_fd, seg->name,
                     (log->cfg.readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    if (seg->fd < 0) {
        rc = fail_errno(log, MQS_EIO);
        goto fail;
    }
    if (fstat(seg->fd, &st) != 0 ||
        pread(seg->fd, h, sizeof h, 0) != (ssize_t)sizeof h) {
        errno = errno ? errno : EIO;
        rc = fail_errno(log, MQS_EIO);
        goto fail;
    }
    rc = MQS_ECORRUPT;
    if (memcmp(h + MQS_SEGLOG_H_MAGIC, MQS_SEGLOG_MAGIC, 8) != 0)
        goto fail;
    if (get_u32(h + MQS_SEGLOG_H_VERSION) > MQS_SEGLOG_VERSION) {
        rc = MQS_ELOGVERSION;
        goto fail;
    }
    if (get_u32(h + MQS_SEGLOG_H_CRC) !=
            mqs_crc32c_extend(0, h, MQS_SEGLOG_H_CRC) ||
        get_u32(h + MQS_SEGLOG_H_VERSION) != MQS_SEGLOG_VERSION ||
        get_u32(h + MQS_SEGLOG_H_HEADER_BYTES) != MQS_SEGLOG_HEADER_BYTES ||
        (int64_t)get_u64(h + MQS_SEGLOG_H_BASE_OFFSET) != base)
        goto fail;
    seg->map_bytes = get_u64(h + MQS_SEGLOG_H_SEGMENT_BYTES);
    if (seg->map_bytes < MQS_SEGLOG_MIN_SEGMENT_BYTES ||
        seg->map_bytes > MQS_SEGLOG_MAX_SEGMENT_BYTES)
        goto fail;
    /* A file shorter than its header records was truncated by someone else,
     * and mapping it in full would fault past the end. A writer extends
     * it with zeros, which recovery then treats as a torn tail; a reader
     * cannot. */
    if ((uint64_t)st.st_size < seg->map_bytes) {
        if (log->cfg.readonly)
            goto fail;
        int err = posix_fallocate(seg->fd, 0, (off_t)seg->map_bytes);
        if (err != 0) {
            errno = err;
            rc = fail_errno(log, err == ENOSPC ? MQS_ENOSPACE : MQS_EIO);
            goto fail;
        }
        seg->extended_bytes = seg->map_bytes - (uint64_t)st.st_size;
    }
    seg->epoch = get_u64(h + MQS_SEGLOG_H_EPOCH);
    seg->seed = seed_of(seg->epoch);
    rc = segment_map(log, seg);
    if (rc != MQS_OK)
        goto fail;
    seal_load(seg);
    *out = seg;
    return MQS_OK;

fail:
    segment_free(seg);
    return rc;
}

static int segs_push(mqs_seglog_t *log, mqs_segment_t *seg)
{
    if (log->nsegs == log->segs_cap) {
        size_t cap = log->segs_cap ? log->segs_cap * 2 : 16;
        mqs_segment_t **grown = realloc(log->segs, cap * sizeof *grown);
        if (!grown)
            return MQS_ENOMEM;
        log->segs = grown;
        log->segs_cap = cap;
    }
    log->segs[log->nsegs++] = seg;
    return MQS_OK;
}

/* ---- directory listing ------------------------------------------------ */

static int parse_segment_name(const char *name, int64_t *base, int *temp)
{
    size_t len = strlen(name);
    int64_t v = 0;

    for (int i = 0; i < 20; i++) {
        if (name[i] < '0' || name[i] > '9')
            return 0;
        if (v > (INT64_MAX - 9) / 10)
            return 0;
        v = v * 10 + (name[i] - '0');
    }
    if (len == 24 && strcmp(name + 20, ".seg") == 0)
        *temp = 0;
    else if (len == 28 && strcmp(name + 20, ".seg.tmp") == 0)
        *temp = 1;
    else
        return 0;
    *base = v;
    return 1;
}

static int compare_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/*
 * List segment base offsets above `min_base` (exclusive; -1 for all) in
 * order; a writer removes temporary files left by a crash.
 */
static int list_segments(mqs_seglog_t *log, int64_t min_base,
                         int64_t **bases_out, size_t *n_out,
                         int64_t *temps_removed)
{
    int fd = dup(log->dir_fd);
    DIR *dir;
    struct dirent *ent;
    int64_t *bases = NULL;
    size_t n = 0, cap = 0;

    if (fd < 0)
        return fail_errno(log, MQS_EIO);
    dir = fdopendir(fd);
    if (!dir) {
        close(fd);
        return fail_errno(log, MQS_EIO);
    }
    rewinddir(dir);
    while ((ent = readdir(dir)) != NULL) {
        int64_t base;
        int temp;
        if (!parse_segment_name(ent->d_name, &base, &temp))
            continue;
        if (temp) {
            if (!log->cfg.readonly &&
                unlinkat(log->dir_fd, ent->d_name, 0) == 0 && temps_removed)
                (*temps_removed)++;
            continue;
        }
        if (base <= min_base)
            continue;
        if (n == cap) {
            size_t c = cap ? cap * 2 : 16;
            int64_t *grown = realloc(bases, c * sizeof *grown);
            if (!grown) {
                free(bases);
                closedir(dir);
                return MQS_ENOMEM;
            }
            bases = grown;
            cap = c;
        }
        bases[n++] = base;
    }
    closedir(dir);
    if (n)
        qsort(bases, n, sizeof *bases, compare_i64);
    *bases_out = bases;
    *n_out = n;
    return MQS_OK;
}

/* ---- checkpoint ------------------------------------------------------- */

/* Read the checkpoint; *next_offset gets -1 if it does not record one. */
static int checkpoint_read(mqs_seglog_t *log, int64_t *base, uint64_t *pos,
                           uint32_t *epoch_low, int64_t *next_offset)
{
    uint8_t b[CHECKPOINT_BYTES];
    int fd = openat(log->dir_fd, CHECKPOINT_NAME, O_RDONLY | O_CLOEXEC);
    ssize_t got;

    if (fd < 0)
        return 0;
    got = pread(fd, b, sizeof b, 0);
    close(fd);
    if (got < CHECKPOINT_V1_BYTES || memcmp(b, CHECKPOINT_MAGIC, 8) != 0 ||
        get_u32(b + 28) != mqs_crc32c_extend(0, b, 28))
        return 0;
    *base = (int64_t)get_u64(b + 8);
    *pos = get_u64(b + 16);
    *epoch_low = get_u32(b + 24);
    *next_offset = -1;
    if (got == CHECKPOINT_BYTES &&
        get_u32(b + 40) == mqs_crc32c_extend(0, b, 40) &&
        (int64_t)get_u64(b + 32) >= *base)
        *next_offset = (int64_t)get_u64(b + 32);
    return 1;
}

/*
 * Replace the checkpoint atomically: temp file, fsync, rename, fsync.
 * The "never" mode skips both fsyncs, as it skips every other sync.
 */
static int checkpoint_write(mqs_seglog_t *log, const mqs_segment_t *seg,
                            uint64_t pos, int64_t next_offset)
{
    uint8_t b[CHECKPOINT_BYTES];
    const char *temp = CHECKPOINT_NAME ".tmp";
    int fd;

    memset(b, 0, sizeof b);
    memcpy(b, CHECKPOINT_MAGIC, 8);
    put_u64(b + 8, (uint64_t)seg->base_offset);
    put_u64(b + 16, pos);
    put_u32(b + 24, (uint32_t)seg->epoch);
    put_u32(b + 28, mqs_crc32c_extend(0, b, 28));
    put_u64(b + 32, (uint64_t)next_offset);
    put_u32(b + 40, mqs_crc32c_extend(0, b, 40));
    fd = openat(log->dir_fd, temp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC,
                0600);
    if (fd < 0)
        return fail_errno(log, MQS_EIO);
    if (pwrite(fd, b, sizeof b, 0) != (ssize_t)sizeof b ||
        (is_durable(log) && fsync(fd) != 0)) {
        close(fd);
        return fail_errno(log, MQS_EIO);
    }
    close(fd);
    if (renameat(log->dir_fd, temp, log->dir_fd, CHECKPOINT_NAME) != 0)
        return fail_errno(log, MQS_EIO);
    return sync_dir(log);
}

/*
 * Remove a checkpoint whose position lies past the records recovery
 * kept. Records appended over the cut are not covered by it, so the
 * next recovery must verify them. Writer only.
 */
static int checkpoint_remove(mqs_seglog_t *log)
{
    if (unlinkat(log->dir_fd, CHECKPOINT_NAME, 0) != 0 && errno != ENOENT)
        return fail_errno(log, MQS_EIO);
    return sync_dir(log);
}

/* ---- recovery --------------------------------------------------------- */

/*
 * End of the last non-zero 8-byte word at or after `from`, or `from` if
 * all is zero. SEEK_DATA skips ranges the file system reports as holes
 * or unwritten; where it is not supported the whole range is read.
 */
static uint64_t last_nonzero_end(const mqs_segment_t *seg, uint64_t from)
{
    uint64_t result = from, pos = from;

    while (pos < seg->map_bytes) {
        off_t data = lseek(seg->fd, (off_t)pos, SEEK_DATA);
        off_t hole;
        uint64_t end;
        if (data < 0) {
            if (errno == ENXIO)
                break;
            data = (off_t)pos;
            hole = (off_t)seg->map_bytes;
        } else {
            hole = lseek(seg->fd, data, SEEK_HOLE);
            if (hole < 0)
                hole = (off_t)seg->map_bytes;
        }
        pos = (uint64_t)data & ~(uint64_t)7;
        if (pos < from)
            pos = from;
        end = (uint64_t)hole < seg->map_bytes ? (uint64_t)hole
                                               : seg->map_bytes;
        for (; pos + 8 <= end; pos += 8) {
            if (get_u64(seg->map + pos) != 0)
                result = pos + 8;
        }
        pos = end;
    }
    return result;
}

/* Count records after a cut that still pass length and CRC checks: they
 * are dropped by the cut, and the report counts them. */
static int64_t count_intact_after(const mqs_segment_t *seg, uint64_t from,
                                  uint64_t until)
{
    int64_t found = 0;
    uint64_t pos = from;
    uint32_t length;

    while (pos < until) {
        if (frame_check(seg, pos, until, -1, 1, &length) == FRAME_VALID) {
            found++;
            pos += align_up(length);
        } else {
            pos += MQS_SEGLOG_ALIGN;
        }
    }
    return found;
}

/* 1 if the bytes at `pos` look like the record `expected` with a bad CRC:
 * a published length that fits and the right offset. A torn write never
 * publishes its length, and garbage rarely carries the right offset. */
static int damaged_at(const mqs_segment_t *seg, uint64_t pos,
                      int64_t expected)
{
    uint32_t length;

    if (frame_check(seg, pos, seg->map_bytes, expected, 0, &length) !=
        FRAME_VALID)
        return 0;
    return 1;
}

/* Add the gaps of a resynchronized segment to the report. */
static void report_gaps(const mqs_segment_t *seg, mqs_seglog_recovery_t *rep)
{
    for (size_t i = 0; i < seg->gaps_n; i++) {
        const gap_t *g = &seg->gaps[i];
        if (rep->first_skipped_offset < 0) {
            rep->first_skipped_offset = g->first;
            rep->first_skipped_base = seg->base_offset;
            rep->first_skipped_position = g->pos;
        }
        rep->damaged_ranges++;
        rep->records_skipped += g->end - g->first;
    }
}

/*
 * Verify an unsealed segment and, for a writer, zero everything after
 * its last valid record, so that stale or torn bytes can never be taken
 * as records later. Records below `verify_from` (the checkpoint) are
 * walked by their lengths and offsets only, so a damaged record there
 * stays in place and its reads fail. If that walk ends before
 * verify_from, the records are resynchronized with the checkpoint
 * (segment_resync, with `verify_next` the offset it recorded or -1).
 * If that fails too, or the file was truncated below verify_from, the
 * segment lost records since the checkpoint was written: the whole
 * segment is verified and cut at its first invalid record, and a writer
 * removes the checkpoint.
 */
static int segment_recover(mqs_seglog_t *log, mqs_segment_t *seg,
                           uint64_t verify_from, int64_t verify_next,
                           mqs_seglog_recovery_t *rep)
{
    uint64_t garbage_end;
    uint64_t file_bytes = seg->map_bytes - seg->extended_bytes;
    int ended_early = 0;

    if (verify_from < MQS_SEGLOG_HEADER_BYTES)
        verify_from = MQS_SEGLOG_HEADER_BYTES;
    index_reset(seg);
    /* Records below the checkpoint must end exactly at it. */
    if (file_bytes >= verify_from) {
        segment_walk(seg, verify_from, UINT64_MAX, NULL);
        if (seg->end_pos != verify_from) {
            int64_t checked = 0;
            int rc = segment_resync(seg, verify_from, verify_next, &checked);
            if (rc < 0)
                return rc;
            if (rc == 1) {
                rep->records_verified += checked;
                report_gaps(seg, rep);
            } else {
                index_reset(seg);
            }
        }
    }
    if (seg->end_pos == verify_from) {
        segment_walk(seg, seg->map_bytes, verify_from,
                     &rep->records_verified);
    } else {
        index_reset(seg);
        segment_walk(seg, seg->map_bytes, 0, &rep->records_verified);
        ended_early = 1;
        rep->ended_before_checkpoint = 1;
        rep->first_bad_offset = seg->next_offset;
        rep->first_bad_base = seg->base_offset;
        rep->first_bad_position = seg->end_pos;
    }
    seg->indexed = 1;
    rep->segments_scanned++;
    if (log->cfg.readonly)
        return MQS_OK;
    if (ended_early) {
        int rc = checkpoint_remove(log);
        if (rc != MQS_OK)
            return rc;
    }

    garbage_end = last_nonzero_end(seg, seg->end_pos);
    if (seg->extended_bytes && garbage_end == seg->end_pos) {
        /* Truncated exactly after a record: report the cut all the same. */
        if (rep->torn_segments == 0) {
            rep->first_bad_offset = seg->next_offset;
            rep->first_bad_base = seg->base_offset;
            rep->first_bad_position = seg->end_pos;
        }
        rep->torn_segments++;
    }
    if (garbage_end > seg->end_pos) {
        uint64_t page_start = seg->end_pos & ~(uint64_t)(log->page_bytes - 1);
        if (rep->torn_segments == 0) {
            rep->first_bad_offset = seg->next_offset;
            rep->first_bad_base = seg->base_offset;
            rep->first_bad_position = seg->end_pos;
        }
        rep->torn_segments++;
        rep->bytes_zeroed += (int64_t)(garbage_end - seg->end_pos);
        rep->records_dropped +=
            damaged_at(seg, seg->end_pos, seg->next_offset) +
            count_intact_after(seg, seg->end_pos, garbage_end);
        memset(seg->map + seg->end_pos, 0, garbage_end - seg->end_pos);
        if (msync(seg->map + page_start, garbage_end - page_start, MS_SYNC))
            return fail_errno(log, MQS_EIO);
    }
    return MQS_OK;
}

/*
 * Read-only: open the segments that the seals of the last ones name, up
 * to (not including) base `below`. A roll seals the old segment with
 * its next offset and then creates the next segment at that base, so a
 * sealed last segment names the file that follows it. The listing
 * alone is not enough: readdir() may skip a file that is renamed into
 * the directory while it runs, even when it returns a file renamed
 * later. POSIX leaves such entries unspecified, and ext4 returns them in
 * hash order. A skipped segment's offsets would then read as damaged.
 * No file at that base is a gap of offsets (a recovery cut or
 * retention), and the listing goes on after it. Unsealed segments are
 * walked when `walk` is set; open_existing walks them later itself.
 */
static int open_sealed_successors(mqs_seglog_t *log, int64_t below, int walk)
{
    while (log->nsegs > 0) {
        mqs_segment_t *last = log->segs[log->nsegs - 1], *seg;
        mqs_seglog_recovery_t unused;
        int64_t next = last->seal_next_offset;
        int rc;

        if (!last->sealed || next <= last->base_offset || next >= below)
            return MQS_OK;
        rc = segment_open(log, next, &seg);
        if (rc == MQS_EIO && log->last_errno == ENOENT)
            return MQS_OK;
        if (rc != MQS_OK)
            return rc;
        if (walk && !seg->sealed) {
            memset(&unused, 0, sizeof unused);
            segment_recover(log, seg, 0, -1, &unused);
        }
        rc = segs_push(log, seg);
        if (rc != MQS_OK) {
            segment_free(seg);
            return rc;
        }
    }
    return MQS_OK;
}

static int open_existing(mqs_seglog_t *log, mqs_seglog_recovery_t *rep)
{
    int64_t *bases = NULL, ck_base = -1, ck_next = -1;
    size_t n = 0;
    uint64_t ck_pos = 0;
    uint32_t ck_epoch = 0;
    int have_ck, rc;

    rc = list_segments(log, -1, &bases, &n, &rep->temp_files_removed);
    if (rc != MQS_OK)
        return rc;
    for (size_t i = 0; i < n; i++) {
        mqs_segment_t *seg;
        rc = MQS_OK;
        if (log->cfg.readonly)
            rc = open_sealed_successors(log, bases[i], 0);
        if (rc == MQS_OK) {
            rc = segment_open(log, bases[i], &seg);
            /* A reader lists without the writer lock, so retention may
             * have removed the file since. */
            if (rc == MQS_EIO && log->cfg.readonly &&
                log->last_errno == ENOENT)
                continue;
        }
        if (rc == MQS_OK && segs_push(log, seg) != MQS_OK) {
            segment_free(seg);
            rc = MQS_ENOMEM;
        }
        if (rc != MQS_OK) {
            free(bases);
            return rc;
        }
    }
    free(bases);

    have_ck = checkpoint_read(log, &ck_base, &ck_pos, &ck_epoch, &ck_next);
    for (size_t i = 0; i < log->nsegs; i++) {
        mqs_segment_t *seg = log->segs[i];
        uint64_t verify_from = MQS_SEGLOG_HEADER_BYTES;
        int64_t verify_next = -1;
        if (seg->sealed)
            continue;
        if (have_ck && ck_base == seg->base_offset &&
            ck_epoch == (uint32_t)seg->epoch && ck_pos <= seg->map_bytes) {
            verify_from = ck_pos;
            verify_next = ck_next;
            rep->checkpoint_offset = ck_base;
        }
        rc = segment_recover(log, seg, verify_from, verify_next, rep);
        /* A writer seals every segment but the last, so appends go to
         * exactly one unsealed segment. */
        if (rc == MQS_OK && !log->cfg.readonly && i + 1 < log->nsegs)
            rc = segment_seal(log, seg);
        if (rc != MQS_OK)
            return rc;
    }
    return MQS_OK;
}

/* ---- open and close --------------------------------------------------- */

static int config_check(const mqs_seglog_config_t *c)
{
    if (c->segment_bytes < MQS_SEGLOG_MIN_SEGMENT_BYTES ||
        c->segment_bytes > MQS_SEGLOG_MAX_SEGMENT_BYTES ||
        c->segment_bytes % 4096 != 0)
        return MQS_EINVAL;
    if (c->fsync_mode < MQS_SEGLOG_FSYNC_NEVER ||
        c->fsync_mode > MQS_SEGLOG_FSYNC_ALWAYS)
        return MQS_EINVAL;
    if (c->fsync_mode == MQS_SEGLOG_FSYNC_INTERVAL &&
        c->fsync_interval_ns <= 0)
        return MQS_EINVAL;
    return MQS_OK;
}

static int open_directory(mqs_seglog_t *log, const char *path)
{
    if (!log->cfg.readonly && mkdir(path, 0700) != 0 && errno != EEXIST)
        return fail_errno(log, MQS_EIO);
    log->dir_fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (log->dir_fd < 0)
        return fail_errno(log, MQS_EIO);
    if (log->cfg.readonly)
        return MQS_OK;
    log->lock_fd = openat(log->dir_fd, LOCK_NAME,
                          O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (log->lock_fd < 0)
        return fail_errno(log, MQS_EIO);
    if (flock(log->lock_fd, LOCK_EX | LOCK_NB) != 0)
        return fail_errno(log, errno == EWOULDBLOCK ? MQS_ELOCKED : MQS_EIO);
    return MQS_OK;
}

static void *flusher_main(void *arg);
static int start_toucher(mqs_seglog_t *log);
static void stop_toucher(mqs_seglog_t *log);

static int start_writer(mqs_seglog_t *log)
{
    mqs_segment_t *last = log->nsegs ? log->segs[log->nsegs - 1] : NULL;
    int rc;

    if (!last || last->sealed) {
        mqs_segment_t *seg;
        rc = segment_create(log, last ? segment_end_offset(last) : 0, &seg);
        if (rc != MQS_OK)
            return rc;
        if (segs_push(log, seg) != MQS_OK) {
            segment_free(seg);
            return MQS_ENOMEM;
        }
        last = seg;
    }
    log->active = last;
    /* Make what recovery kept durable, so synced_offset is true. */
    if (is_durable(log) && last->end_pos > MQS_SEGLOG_HEADER_BYTES &&
        msync(last->map, last->end_pos, MS_SYNC) != 0)
        return fail_errno(log, MQS_EIO);
    last->synced_pos = last->end_pos;
    atomic_store(&log->pub_pos, (int64_t)last->end_pos);
    atomic_store(&log->pub_offset, last->next_offset);
    /* "never" claims nothing synced until a flush. */
    atomic_store(&log->synced_offset, is_durable(log)
                                          ? last->next_offset
                                          : log->segs[0]->base_offset);
    /* Under "always" every append waits for a sync, which the zeros
     * would not shorten. */
    log->write_zeros = log->cfg.fsync_mode != MQS_SEGLOG_FSYNC_ALWAYS;
    if (log->write_zeros && start_toucher(log))
        log->write_zeros = 0;
    if (log->cfg.fsync_mode == MQS_SEGLOG_FSYNC_INTERVAL) {
        if (pthread_create(&log->flusher, NULL, flusher_main, log) != 0)
            return MQS_ENOMEM;
        log->flusher_started = 1;
    }
    return MQS_OK;
}

/* Release the segments and close the descriptors of `log`, but leave
 * its mutexes and condition variables and the struct itself. */
static void release_segments_and_fds(mqs_seglog_t *log)
{
    for (size_t i = 0; i < log->nsegs; i++)
        mqs_seglog_segment_release(log->segs[i]);
    for (size_t i = 0; i < log->pending_n; i++)
        mqs_seglog_segment_release(log->pending[i]);
    free(log->segs);
    free(log->pending);
    if (log->lock_fd >= 0)
        close(log->lock_fd);
    if (log->dir_fd >= 0)
        close(log->dir_fd);
}

static void log_free(mqs_seglog_t *log)
{
    release_segments_and_fds(log);
    pthread_mutex_destroy(&log->sync_mu);
    pthread_cond_destroy(&log->sync_cv);
    pthread_mutex_destroy(&log->flush_mu);
    pthread_cond_destroy(&log->flush_cv);
    pthread_mutex_destroy(&log->touch_mu);
    pthread_cond_destroy(&log->touch_cv);
    free(log);
}

int mqs_seglog_open(mqs_seglog_t **out, const char *path,
                    const mqs_seglog_config_t *config,
                    mqs_seglog_recovery_t *report, int *os_errno)
{
    mqs_seglog_recovery_t local;
    mqs_seglog_t *log;
    pthread_condattr_t attr;
    int rc;

    if (!report)
        report = &local;
    memset(report, 0, sizeof *report);
    report->first_bad_offset = -1;
    report->first_bad_base = -1;
    report->checkpoint_offset = -1;
    report->first_skipped_offset = -1;
    report->first_skipped_base = -1;
    if (os_errno)
        *os_errno = 0;
    rc = config_check(config);
    if (rc != MQS_OK)
        return rc;
    log = calloc(1, sizeof *log);
    if (!log)
        return MQS_ENOMEM;
    log->cfg = *config;
    log->dir_fd = -1;
    log->lock_fd = -1;
    log->page_bytes = sysconf(_SC_PAGESIZE);
    pthread_mutex_init(&log->sync_mu, NULL);
    pthread_mutex_init(&log->flush_mu, NULL);
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&log->sync_cv, &attr);
    pthread_cond_init(&log->flush_cv, &attr);
    atomic_init(&log->round_records_x8, 4 * SMALL_ROUNDS_X8);
    atomic_init(&log->syncs_taken_over, 0);
    atomic_init(&log->gather_timeouts, 0);
    pthread_mutex_init(&log->touch_mu, NULL);
    pthread_cond_init(&log->touch_cv, NULL);
    pthread_condattr_destroy(&attr);
    failpoints_parse(log);
    mqs_crc32c_init();

    rc = open_directory(log, path);
    if (rc == MQS_OK)
        rc = open_existing(log, report);
    if (rc == MQS_OK && !log->cfg.readonly)
        rc = start_writer(log);
    if (rc != MQS_OK) {
        if (os_errno)
            *os_errno = log->last_errno;
        if (log->flusher_started) {
            log->flush_stop = 1;
            pthread_cond_signal(&log->flush_cv);
            pthread_join(log->flusher, NULL);
        }
        stop_toucher(log);
        log_free(log);
        return rc;
    }
    *out = log;
    return MQS_OK;
}

static void stop_flusher(mqs_seglog_t *log)
{
    if (!log->flusher_started)
        return;
    pthread_mutex_lock(&log->flush_mu);
    log->flush_stop = 1;
    pthread_cond_signal(&log->flush_cv);
    pthread_mutex_unlock(&log->flush_mu);
    pthread_join(log->flusher, NULL);
    log->flusher_started = 0;
}

void mqs_seglog_abandon(mqs_seglog_t *log)
{
    if (!log)
        return;
    release_segments_and_fds(log);
    /* No pthread_*_destroy: the parent's threads may have been waiting on
     * these condition variables at the fork, and destroying one that has
     * waiters blocks for ever in the child. */
    free(log);
}

int mqs_seglog_close(mqs_seglog_t *log)
{
    return mqs_seglog_close_errno(log, NULL);
}

int mqs_seglog_close_errno(mqs_seglog_t *log, int *os_errno)
{
    int rc = MQS_OK;

    if (os_errno)
        *os_errno = 0;
    if (!log)
        return MQS_OK;
    stop_flusher(log);
    stop_toucher(log);
    if (!log->cfg.readonly && is_durable(log)) {
        rc = sync_as(log, -1, 0);
        if (rc == MQS_OK)
            rc = checkpoint_write(log, log->active, log->active->end_pos,
                                  log->active->next_offset);
    } else if (!log->cfg.readonly && !atomic_load(&log->poison_errno)) {
        /* "never": record the end without a sync, so that the next open
         * treats a damaged record below it as damage and keeps the
         * records after it, as in the other modes. */
        rc = checkpoint_write(log, log->active, log->active->end_pos,
                              log->active->next_offset);
    }
    if (os_errno && rc == MQS_EIO)
        *os_errno = log->last_errno;
    else if (os_errno && rc == MQS_EPOISONED)
        *os_errno = atomic_load(&log->poison_errno);
    log_free(log);
    return rc;
}

/* ---- sync ------------------------------------------------------------- */

static int sync_range(mqs_seglog_t *log, mqs_segment_t *seg, uint64_t from,
                      uint64_t to)
{
    uint64_t start = from & ~(uint64_t)(log->page_bytes - 1);

    if (to <= from)
        return 0;
    if (msync(seg->map + start, to - start, MS_SYNC) != 0)
        return errno ? errno : EIO;
    return 0;
}

static int64_t monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void deadline_after(struct timespec *ts, int64_t ns);

/*
 * Note the calling thread as a recent caller of mqs_seglog_sync. Called
 * with sync_mu held.
 */
static void note_caller(mqs_seglog_t *log)
{
    pthread_t self = pthread_self();
    struct sync_caller *slot = NULL;

    log->arrivals++;
    for (int i = 0; i < MQS_GATHER_SLOTS; i++) {
        struct sync_caller *c = &log->seen[i];
        if (c->used && pthread_equal(c->thread, self)) {
            slot = c;
            break;
        }
        if (!slot || !c->used || (slot->used && c->round < slot->round))
            slot = c;
    }
    slot->thread = self;
    slot->used = 1;
    slot->round = log->sync_round;
}

/* Return how many distinct threads called in the last two rounds. */
static int recent_callers(const mqs_seglog_t *log)
{
    int n = 0;

    for (int i = 0; i < MQS_GATHER_SLOTS; i++)
        if (log->seen[i].used && log->seen[i].round + 2 > log->sync_round)
            n++;
    return n;
}

/*
 * Leader of a sync: wait up to two sync durations (20 us to 2 ms) for
 * the threads that called in the last two rounds to arrive with their
 * records. Each thread has one record in flight. Without this wait the
 * threads split into two groups whose syncs alternate, each covering the
 * group that arrived during the other's sync. The count is of arrivals
 * since the last snapshot, not of the threads inside this function,
 * because the callers that the last sync covered may not have left yet.
 * Counting those made 4 threads settle at 2.3 records per sync. Now 4
 * threads reach 4.0 and 8 threads 7.9 (Python threads that append 60
 * bytes under "always", 2-vCPU KVM guest). Called with sync_mu held.
 *
 * The arrival that completes the group runs the sync itself (sync_as)
 * and the leader waits for it like any other caller: waking the leader
 * to run it put one more wake-up between the last record and its sync.
 * Return 1 when an arrival took the sync over, 0 when this thread is to
 * run it (the group is complete, or the wait ran out).
 */
static int gather_callers(mqs_seglog_t *log)
{
    struct timespec deadline;
    int64_t wait_ns = 2 * log->last_sync_ns;
    int goal = recent_callers(log);
    uint64_t gen;

    if (goal < 2 || log->arrivals >= goal)
        return 0;
    if (wait_ns < 20000)
        wait_ns = 20000;
    if (wait_ns > 2000000)
        wait_ns = 2000000;
    deadline_after(&deadline, wait_ns);
    gen = ++log->gather_gen;
    log->sync_gathering = goal;
    /* taken_gen reaches gen only when this gather is taken over, because
     * until then sync_running stays set for this thread and no later
     * gather can start. A later gather may have been taken over too by
     * the time this thread wakes, so the test is >=, not ==. */
    while (log->taken_gen < gen) {
        if (pthread_cond_timedwait(&log->sync_cv, &log->sync_mu,
                                   &deadline) == ETIMEDOUT)
            break;
    }
    /* Taken over: the taker cleared sync_gathering, and it may belong to
     * a later gather by now. */
    if (log->taken_gen >= gen)
        return 1;
    log->sync_gathering = 0;
    atomic_fetch_add(&log->gather_timeouts, 1);
    return 0;
}

static int sync_leave(mqs_seglog_t *log, int status)
{
    pthread_mutex_unlock(&log->sync_mu);
    return status;
}

/*
 * mqs_seglog_sync. `caller` is 0 for the log's own syncs (the "interval"
 * flusher's timer, close, a roll): no leader waits for them, and they
 * lead without waiting for others. The first two have no record in
 * flight. A roll runs in the appending thread, which holds the lock that
 * the other callers need before they can arrive.
 */
static int sync_as(mqs_seglog_t *log, int64_t end_offset, int caller)
{
    mqs_segment_t *seg, **pending;
    size_t pending_n;
    int64_t target_offset, covered_offset, pub, started;
    uint64_t from, to;
    int err = 0;

    int noted = 0, took_over = 0;

    if (log->cfg.readonly)
        return MQS_EREADONLY;
    pthread_mutex_lock(&log->sync_mu);
    pub = atomic_load_explicit(&log->pub_offset, memory_order_acquire);
    target_offset = (end_offset < 0 || end_offset > pub) ? pub : end_offset;
wait:
    for (;; noted = 1) {
        if (atomic_load(&log->poison_errno))
            return sync_leave(log, MQS_EPOISONED);
        if (atomic_load(&log->synced_offset) >= target_offset &&
            (end_offset >= 0 || log->pending_n == 0))
            return sync_leave(log, MQS_OK);
        if (!noted && caller) {
            /* A caller with records to sync: the leader may wait for it. */
            note_caller(log);
            /* The arrival the gathering leader waits for: run the sync
             * in its place (gather_callers). sync_running stays set. */
            if (log->sync_gathering &&
                log->arrivals >= log->sync_gathering) {
                log->sync_gathering = 0;
                log->taken_gen = log->gather_gen;
                took_over = 1;
                atomic_fetch_add(&log->syncs_taken_over, 1);
                break;
            }
        }
        if (!log->sync_running)
            break;
        pthread_cond_wait(&log->sync_cv, &log->sync_mu);
    }

    /* This thread syncs for everyone: it covers every record published
     * before the snapshot below, including those of waiting threads.
     * pub_pos is stored before pub_offset, so loading in the opposite
     * order gives a position at or past that offset's record. */
    if (!took_over) {
        log->sync_running = 1;
        if (caller && gather_callers(log)) {
            /* Counted once already: a second count would make the next
             * leader's group look complete one arrival early. */
            noted = 1;
            goto wait;
        }
    }
    log->arrivals = 0;
    log->sync_round++;
    seg = log->active;
    mqs_seglog_segment_acquire(seg);
    covered_offset = atomic_load_explicit(&log->pub_offset,
                                          memory_order_acquire);
    to = (uint64_t)atomic_load_explicit(&log->pub_pos, memory_order_acquire);
    from = seg->synced_pos;
    pending = log->pending;
    pending_n = log->pending_n;
    log->pending = NULL;
    log->pending_n = log->pending_cap = 0;
    pthread_mutex_unlock(&log->sync_mu);

    started = monotonic_ns();
    if (log->hook)
        err = log->hook(log->hook_ctx, covered_offset, 0);
    if (!err && failpoint_hit(log, FP_SYNC_EIO))
        err = EIO;
    for (size_t i = 0; !err && i < pending_n; i++)
        err = sync_range(log, pending[i], 0, pending[i]->map_bytes);
    if (!err)
        err = sync_range(log, seg, from, to);
    if (!err && log->hook)
        log->hook(log->hook_ctx, covered_offset, 1);

    pthread_mutex_lock(&log->sync_mu);
    log->sync_running = 0;
    log->last_sync_ns = monotonic_ns() - started;
    if (err) {
        /* After a failed msync the kernel may have marked the pages
         * clean, so a retry could report success for lost data
         * (PostgreSQL's "fsyncgate"). Never sync this log again. */
        atomic_store(&log->poison_errno, err);
        log->last_errno = err;
    } else {
        int64_t before = atomic_load(&log->synced_offset);
        if (to > seg->synced_pos)
            seg->synced_pos = to;
        if (covered_offset > before) {
            atomic_store(&log->synced_offset, covered_offset);
            note_round(log, covered_offset - before);
        }
        atomic_fetch_add(&log->syncs, 1);
    }
    /* After the unlock, so that the woken waiters do not block at once
     * on the mutex that this thread still holds. */
    sync_leave(log, MQS_OK);
    pthread_cond_broadcast(&log->sync_cv);

    for (size_t i = 0; i < pending_n; i++)
        mqs_seglog_segment_release(pending[i]);
    free(pending);
    mqs_seglog_segment_release(seg);
    if (err)
        return MQS_EPOISONED;
    failpoint_kill(log, FP_AFTER_SYNC);
    return MQS_OK;
}

int mqs_seglog_sync(mqs_seglog_t *log, int64_t end_offset)
{
    return sync_as(log, end_offset, 1);
}

int mqs_seglog_sync_starts_now(mqs_seglog_t *log)
{
    int starts, goal;

    pthread_mutex_lock(&log->sync_mu);
    if (log->sync_gathering) {
        /* This caller would take the gathering leader's sync over. */
        starts = log->arrivals + 1 >= log->sync_gathering;
    } else if (log->sync_running) {
        starts = 0;
    } else {
        /* This caller would lead, gathering only when at least two
         * threads called in the last rounds. */
        goal = recent_callers(log);
        starts = goal < 2 || log->arrivals + 1 >= goal;
    }
    pthread_mutex_unlock(&log->sync_mu);
    return starts;
}

static void deadline_after(struct timespec *ts, int64_t ns)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ns += ts->tv_nsec;
    ts->tv_sec += ns / 1000000000;
    ts->tv_nsec = ns % 1000000000;
}

/* "interval": sync whatever is unsynced every fsync_interval_ns, or
 * sooner when an appender requests it because fsync_interval_records
 * piled up. Stops for good once the log is poisoned. */
static void *flusher_main(void *arg)
{
    mqs_seglog_t *log = arg;
    struct timespec deadline;

    pthread_mutex_lock(&log->flush_mu);
    while (!log->flush_stop) {
        deadline_after(&deadline, log->cfg.fsync_interval_ns);
        while (!log->flush_stop && !log->flush_requested) {
            if (pthread_cond_timedwait(&log->flush_cv, &log->flush_mu,
                                       &deadline) == ETIMEDOUT)
                break;
        }
        if (log->flush_stop)
            break;
        log->flush_requested = 0;
        pthread_mutex_unlock(&log->flush_mu);
        int rc = sync_as(log, -1, 0);
        pthread_mutex_lock(&log->flush_mu);
        if (rc != MQS_OK)
            break;
    }
    pthread_mutex_unlock(&log->flush_mu);
    return NULL;
}

static void request_flush(mqs_seglog_t *log)
{
    pthread_mutex_lock(&log->flush_mu);
    if (!log->flush_requested) {
        log->flush_requested = 1;
        pthread_cond_signal(&log->flush_cv);
    }
    pthread_mutex_unlock(&log->flush_mu);
}

/* ---- append, roll, retention ------------------------------------------ */

static void remove_pending(mqs_seglog_t *log, mqs_segment_t *seg)
{
    pthread_mutex_lock(&log->sync_mu);
    for (size_t i = 0; i < log->pending_n; i++) {
        if (log->pending[i] == seg) {
            log->pending[i] = log->pending[--log->pending_n];
            mqs_seglog_segment_release(seg);
            break;
        }
    }
    pthread_mutex_unlock(&log->sync_mu);
}

/* Forget the oldest segment: unlink its file (writer) and drop this
 * handle's reference. Views into it keep the mapping alive. */
static int drop_oldest(mqs_seglog_t *log)
{
    mqs_segment_t *seg = log->segs[0];

    if (!log->cfg.readonly && unlinkat(log->dir_fd, seg->name, 0) != 0 &&
        errno != ENOENT)
        return fail_errno(log, MQS_EIO);
    log->records_deleted += segment_end_offset(seg) - seg->base_offset;
    memmove(log->segs, log->segs + 1, (log->nsegs - 1) * sizeof *log->segs);
    log->nsegs--;
    if (log->hint_seg == seg)
        log->hint_seg = NULL;
    if (log->resident_seg == seg)
        log->resident_seg = NULL;
    if (!log->cfg.readonly)
        remove_pending(log, seg);
    mqs_seglog_segment_release(seg);
    log->segments_deleted++;
    return MQS_OK;
}

int mqs_seglog_retain(mqs_seglog_t *log, int64_t now_ns, int64_t *deleted)
{
    int64_t total = 0, count = 0;
    int rc = MQS_OK;

    if (deleted)
        *deleted = 0;
    if (log->cfg.readonly)
        return MQS_EREADONLY;
    for (size_t i = 0; i < log->nsegs; i++)
        total += (int64_t)log->segs[i]->map_bytes;
    while (log->nsegs > 1) {
        mqs_segment_t *seg = log->segs[0];
        int64_t bytes = (int64_t)seg->map_bytes;
        int by_size = log->cfg.retention_bytes >= 0 &&
                      total > log->cfg.retention_bytes;
        int by_age = log->cfg.retention_ns >= 0 &&
                     segment_max_ts(seg) < now_ns - log->cfg.retention_ns;
        if (seg == log->active || !(by_size || by_age))
            break;
        rc = drop_oldest(log);
        if (rc != MQS_OK)
            break;
        total -= bytes;
        count++;
    }
    if (deleted)
        *deleted = count;
    if (count && rc == MQS_OK)
        rc = sync_dir(log);
    return rc;
}

int mqs_seglog_retain_below(mqs_seglog_t *log, int64_t offset,
                            int64_t *deleted)
{
    int64_t count = 0;
    int rc = MQS_OK;

    if (deleted)
        *deleted = 0;
    /* A read-only handle may drop its last segment too: it maps the
     * next ones again on refresh. */
    while (log->nsegs > (log->cfg.readonly ? 0u : 1u)) {
        mqs_segment_t *seg = log->segs[0];
        if (log->cfg.readonly && !seg->sealed)
            seal_load_and_walk(seg);
        if (seg == log->active || !seg->sealed ||
            seg->seal_next_offset > offset)
            break;
        rc = drop_oldest(log);
        if (rc != MQS_OK)
            break;
        count++;
    }
    if (deleted)
        *deleted = count;
    if (count && rc == MQS_OK && !log->cfg.readonly)
        rc = sync_dir(log);
    return rc;
}

/*
 * The active segment is empty but smaller than segment_bytes (it was
 * created with a smaller setting) and the next record does not fit:
 * create a full-size file under the same name, renamed over the old one.
 */
static void toucher_detach(mqs_seglog_t *log);

static int replace_empty_active(mqs_seglog_t *log)
{
    mqs_segment_t *old = log->active, *seg;
    int rc = segment_create(log, old->base_offset, &seg);

    if (rc != MQS_OK)
        return rc;
    toucher_detach(log);
    pthread_mutex_lock(&log->sync_mu);
    while (log->sync_running)
        pthread_cond_wait(&log->sync_cv, &log->sync_mu);
    log->segs[log->nsegs - 1] = seg;
    log->active = seg;
    atomic_store_explicit(&log->pub_pos, (int64_t)seg->end_pos,
                          memory_order_release);
    pthread_mutex_unlock(&log->sync_mu);
    if (log->hint_seg == old)
        log->hint_seg = NULL;
    if (log->resident_seg == old)
        log->resident_seg = NULL;
    mqs_seglog_segment_release(old);
    return MQS_OK;
}

/*
 * Drop this process's page table entries for [from, to) of a segment,
 * rounded to whole pages. The pages stay in the page cache (dirty ones
 * are still written back), so views and later reads fault them in again.
 * Resident memory then follows the pages in use, not the log's size.
 */
static void segment_release_pages(const mqs_seglog_t *log,
                                  mqs_segment_t *seg, uint64_t from,
                                  uint64_t to)
{
    uint64_t page_mask = (uint64_t)log->page_bytes - 1;
    uint64_t start = from & ~page_mask;
    uint64_t end = to & ~page_mask;

    if (end > seg->map_bytes)
        end = seg->map_bytes & ~page_mask;
    if (end > start)
        (void)madvise(seg->map + start, end - start, MADV_DONTNEED);
}

static int roll_locked(mqs_seglog_t *log)
{
    mqs_segment_t *old = log->active, *seg;
    int rc;

    if (old->next_offset == old->base_offset) {
        if (old->map_bytes >= log->cfg.segment_bytes)
            return MQS_OK;
        return replace_empty_active(log);
    }
    if (is_durable(log)) {
        /* The appending thread syncs here, holding whatever lock its
         * caller serialises appends with (the GIL for SegmentLog), so
         * no other caller could arrive while it waited for them. */
        rc = sync_as(log, old->next_offset, 0);
        if (rc != MQS_OK)
            return rc;
    }
    rc = segment_seal(log, old);
    if (rc != MQS_OK) {
        atomic_store(&log->poison_errno, log->last_errno ? log->last_errno
                                                         : EIO);
        return MQS_EPOISONED;
    }
    failpoint_kill(log, FP_ROLL_SEALED);
    toucher_detach(log);
    segment_release_pages(log, old, 0, old->map_bytes);
    rc = segment_create(log, old->next_offset, &seg);
    if (rc != MQS_OK)
        return rc;
    failpoint_kill(log, FP_ROLL_CREATED);
    if (segs_push(log, seg) != MQS_OK) {
        segment_free(seg);
        return MQS_ENOMEM;
    }

    pthread_mutex_lock(&log->sync_mu);
    while (log->sync_running)
        pthread_cond_wait(&log->sync_cv, &log->sync_mu);
    if (!is_durable(log)) {
        mqs_segment_t **grown = log->pending;
        if (log->pending_n == log->pending_cap) {
            size_t cap = log->pending_cap ? log->pending_cap * 2 : 8;
            grown = realloc(log->pending, cap * sizeof *grown);
            if (grown) {
                log->pending = grown;
                log->pending_cap = cap;
            }
        }
        /* NOTE: if this allocation fails, a later flush() in the "never"
         * mode skips the old segment; the OS still writes it back. */
        if (grown) {
            mqs_seglog_segment_acquire(old);
            log->pending[log->pending_n++] = old;
        }
    }
    log->active = seg;
    atomic_store_explicit(&log->pub_pos, (int64_t)seg->end_pos,
                          memory_order_release);
    pthread_mutex_unlock(&log->sync_mu);

    return mqs_seglog_retain(log, wall_ns(), NULL);
}

int mqs_seglog_roll(mqs_seglog_t *log)
{
    if (log->cfg.readonly)
        return MQS_EREADONLY;
    if (atomic_load(&log->poison_errno))
        return MQS_EPOISONED;
    return roll_locked(log);
}

/*
 * Write zeros from the first whole page after the segment's end (or from
 * where the last call stopped) up to `to`, capped at the segment's last
 * whole page. Writer only. Every byte past the end of the active segment
 * is already zero (new segments are preallocated, and recovery zeroes a
 * torn tail), so this never changes a record. A failed write turns the
 * zeros off for this handle, and the mapping fills the pages as before.
 */
static void write_zeros_ahead(mqs_seglog_t *log, mqs_segment_t *seg,
                              uint64_t to)
{
    uint64_t page_mask = (uint64_t)log->page_bytes - 1;
    uint64_t limit = seg->map_bytes & ~page_mask;
    uint64_t from = (seg->end_pos + page_mask) & ~page_mask;

    if (from < seg->zeroed_pos)
        from = seg->zeroed_pos;
    if (to > limit)
        to = limit;
    while (from < to) {
        size_t len = ZEROS_STEP - (size_t)(from % ZEROS_STEP);
        if (len > to - from)
            len = (size_t)(to - from);
        ssize_t n = pwrite(seg->fd, zeros, len, (off_t)from);
        if (n <= 0) {
            log->write_zeros = 0;
            break;
        }
        from += (uint64_t)n;
    }
    seg->zeroed_pos = limit > from ? from : limit;
}

/* ---- the toucher thread (see ZEROS_STEP) ------------------------------ */

static uint64_t page_up(const mqs_seglog_t *log, uint64_t pos)
{
    uint64_t page_mask = (uint64_t)log->page_bytes - 1;
    return (pos + page_mask) & ~page_mask;
}

static void *toucher_main(void *arg)
{
    mqs_seglog_t *log = arg;
    int hooked = 0;

    pthread_mutex_lock(&log->touch_mu);
    while (!log->touch_stop) {
        mqs_segment_t *seg = log->touch_seg;
        uint64_t from = atomic_load_explicit(&log->touch_done,
                                             memory_order_relaxed);
        uint64_t to = log->touch_target;

        if (seg) {
            uint64_t limit = seg->map_bytes & ~((uint64_t)log->page_bytes - 1);
            if (to > limit)
                to = limit;
            if (to > (from | (TOUCH_CHUNK - 1)) + 1)
                to = (from | (TOUCH_CHUNK - 1)) + 1;
        }
        if (!seg || from >= to) {
            pthread_cond_wait(&log->touch_cv, &log->touch_mu);
            continue;
        }
        if (log->touch_hook && !hooked) {
            /* The appender may move on meanwhile: pick the range again. */
            mqs_seglog_touch_hook_t hook = log->touch_hook;
            void *hook_ctx = log->touch_hook_ctx;
            pthread_mutex_unlock(&log->touch_mu);
            hook(hook_ctx, from, to, 0);
            pthread_mutex_lock(&log->touch_mu);
            hooked = 1;
            continue;
        }
        hooked = 0;
        mqs_seglog_touch_hook_t hook = log->touch_hook;
        void *hook_ctx = log->touch_hook_ctx;
        log->touch_busy = 1;
        log->touch_busy_from = from;
        pthread_mutex_unlock(&log->touch_mu);
        if (hook)
            hook(hook_ctx, from, to, 1);
        ssize_t n = pwrite(seg->fd, zeros, (size_t)(to - from), (off_t)from);
        pthread_mutex_lock(&log->touch_mu);
        log->touch_busy = 0;
        if (n > 0)
            log->zeros_by_toucher += n;
        if (n > 0 && from + (uint64_t)n >
                         atomic_load_explicit(&log->touch_done,
                                              memory_order_relaxed))
            atomic_store_explicit(&log->touch_done, from + (uint64_t)n,
                                  memory_order_release);
        else if (n <= 0)
            /* Leave the pages to the faults from now on. */
            log->touch_target = 0;
        pthread_cond_broadcast(&log->touch_cv);
    }
    pthread_mutex_unlock(&log->touch_mu);
    return NULL;
}

/* Wait until no write() of zeros that starts below `end` is running.
 * The caller must have locked touch_mu. */
static void toucher_wait_below(mqs_seglog_t *log, uint64_t end)
{
    while (log->touch_busy && log->touch_busy_from < end)
        pthread_cond_wait(&log->touch_cv, &log->touch_mu);
}

/* Stop zeroing the segment the toucher works on, waiting for a write()
 * in progress. Writer only; before the active segment changes. */
static void toucher_detach(mqs_seglog_t *log)
{
    if (!log->toucher_started)
        return;
    pthread_mutex_lock(&log->touch_mu);
    toucher_wait_below(log, UINT64_MAX);
    if (log->touch_seg)
        mqs_seglog_segment_release(log->touch_seg);
    log->touch_seg = NULL;
    pthread_mutex_unlock(&log->touch_mu);
    log->touch_writer_seg = NULL;
}

/* Point the toucher at `seg`, from the first whole page after its end.
 * Writer only. */
static void toucher_attach(mqs_seglog_t *log, mqs_segment_t *seg)
{
    toucher_detach(log);
    pthread_mutex_lock(&log->touch_mu);
    mqs_seglog_segment_acquire(seg);
    log->touch_seg = seg;
    atomic_store_explicit(&log->touch_done, page_up(log, seg->end_pos),
                          memory_order_release);
    log->touch_target = seg->end_pos + TOUCH_AHEAD;
    pthread_cond_signal(&log->touch_cv);
    pthread_mutex_unlock(&log->touch_mu);
    log->touch_writer_seg = seg;
    log->touch_writer_target = seg->end_pos + TOUCH_AHEAD;
}

/*
 * Before the appender stores into [seg->end_pos, end): keep the toucher
 * out of that range, and ask it to stay TOUCH_AHEAD ahead. The common
 * case is one atomic load and two compares.
 */
static inline void toucher_before_store(mqs_seglog_t *log,
                                        mqs_segment_t *seg, uint64_t end)
{
    int behind;

    if (log->touch_writer_seg != seg)
        toucher_attach(log, seg);
    behind = end > atomic_load_explicit(&log->touch_done,
                                        memory_order_acquire);
    if (!behind && end + TOUCH_AHEAD - TOUCH_CHUNK <= log->touch_writer_target)
        return;
    pthread_mutex_lock(&log->touch_mu);
    if (behind) {
        /* Wait for any write() in progress, even one that starts past
         * `end`: the zeros written below may reach into its range. Then
         * write the next chunk here, as the toucher would have. */
        toucher_wait_below(log, UINT64_MAX);
        uint64_t from = atomic_load_explicit(&log->touch_done,
                                             memory_order_relaxed);
        uint64_t to = page_up(log, end) + TOUCH_BEHIND;
        uint64_t limit = seg->map_bytes & ~((uint64_t)log->page_bytes - 1);
        if (from < page_up(log, seg->end_pos))
            from = page_up(log, seg->end_pos);
        if (to > limit)
            to = limit;
        if (log->touch_target && from < to) {
            if (pwrite(seg->fd, zeros, (size_t)(to - from), (off_t)from) > 0)
                log->zeros_by_appender += (int64_t)(to - from);
            else
                log->touch_target = 0;
        }
        if (to > atomic_load_explicit(&log->touch_done,
                                      memory_order_relaxed))
            atomic_store_explicit(&log->touch_done, to,
                                  memory_order_release);
    }
    if (log->touch_target) {
        log->touch_target = end + TOUCH_AHEAD;
        pthread_cond_signal(&log->touch_cv);
    }
    pthread_mutex_unlock(&log->touch_mu);
    log->touch_writer_target = end + TOUCH_AHEAD;
}

static int start_toucher(mqs_seglog_t *log)
{
    if (pthread_create(&log->toucher, NULL, toucher_main, log) != 0)
        return 0;
    log->toucher_started = 1;
    return 1;
}

static void stop_toucher(mqs_seglog_t *log)
{
    if (!log->toucher_started)
        return;
    toucher_detach(log);
    pthread_mutex_lock(&log->touch_mu);
    log->touch_stop = 1;
    pthread_cond_signal(&log->touch_cv);
    pthread_mutex_unlock(&log->touch_mu);
    pthread_join(log->toucher, NULL);
    log->toucher_started = 0;
}

/*
 * Write all of `iov` at `pos` of the segment file. Return 0, or -1 when a
 * write failed (the caller stores the record through the mapping then).
 */
static int pwrite_all(int fd, struct iovec *iov, int n, uint64_t pos)
{
    while (n > 0) {
        ssize_t done = pwritev(fd, iov, n, (off_t)pos);
        if (done < 0 && errno == EINTR)
            continue;
        if (done <= 0)
            return -1;
        pos += (uint64_t)done;
        while (n > 0 && (size_t)done >= iov->iov_len) {
            done -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + done;
            iov->iov_len -= (size_t)done;
        }
    }
    return 0;
}

/*
 * Write the record at the segment's end with pwrite(): its bytes after
 * the length word, then the length. Return 0, or -1 when a write failed
 * (nothing is published then: the length word is still zero).
 *
 * Why: a sync cleans the page it ends in and write-protects its mapping,
 * so the next store into that page faults. The sync after it must then
 * clear the writable entry again, with a TLB shootdown across the CPUs
 * that run the process's threads. When a sync follows every few records
 * ("always", or a broker that syncs each publish), both costs come every
 * round. A write() into the page cache leaves the mapping read-only, so
 * neither happens: with 4 threads publishing to a log broker under
 * fsync="always" and one consuming, an msync took 200 us instead of 415
 * and the broker moved 8,000 messages per second instead of 6,000
 * (2-vCPU KVM guest). While syncs cover many records each, stores stay
 * the rule, because a write() per record costs more than one fault per
 * page.
 */
static int pwrite_record(mqs_seglog_t *log, mqs_segment_t *seg,
                         const mqs_seglog_entry_t *e, uint32_t length)
{
    uint8_t header[MQS_SEGLOG_RECORD_HEADER_BYTES];
    uint64_t stride = align_up(length);
    uint32_t key_len = e->has_key ? e->key_len : 0;
    size_t half = e->value_len / 2;
    uint32_t crc;
    struct iovec iov[5];
    int n = 0, first = 0;
    uint64_t skipped = 0;           /* bytes the first write took */

    memset(header, 0, sizeof header);
    put_u64(header + MQS_SEGLOG_R_OFFSET, (uint64_t)seg->next_offset);
    put_u64(header + MQS_SEGLOG_R_TIMESTAMP, (uint64_t)e->timestamp_ns);
    put_u32(header + MQS_SEGLOG_R_KEY_LEN, key_len);
    put_u32(header + MQS_SEGLOG_R_ATTRIBUTES,
            e->has_key ? MQS_SEGLOG_ATTR_HAS_KEY : 0);
    /* record_crc over the pieces, in the order they sit in the record. */
    crc = mqs_crc32c_extend(seg->seed, header + MQS_SEGLOG_R_OFFSET,
                            MQS_SEGLOG_RECORD_HEADER_BYTES -
                                MQS_SEGLOG_R_OFFSET);
    if (key_len)
        crc = mqs_crc32c_extend(crc, e->key, key_len);
    if (e->value_len)
        crc = mqs_crc32c_extend(crc, e->value, e->value_len);
    crc = mqs_crc32c_extend(crc, &length, 4);
    put_u32(header + MQS_SEGLOG_R_CRC, crc);

    iov[n].iov_base = header + MQS_SEGLOG_R_CRC;
    iov[n++].iov_len = MQS_SEGLOG_RECORD_HEADER_BYTES - MQS_SEGLOG_R_CRC;
    if (key_len) {
        iov[n].iov_base = (void *)e->key;
        iov[n++].iov_len = key_len;
    }
    if (half) {
        iov[n].iov_base = (void *)e->value;
        iov[n++].iov_len = half;
    }
#ifdef MQS_FAILPOINTS
    /* Two writes, so that the failpoint finds half a record written.
     * pwrite_all moves the entries it wrote, so sum them before. */
    for (int i = 0; i < n; i++)
        skipped += iov[i].iov_len;
    if (pwrite_all(seg->fd, iov, n, seg->end_pos + MQS_SEGLOG_R_CRC) != 0)
        return -1;
    failpoint_kill(log, FP_MID_RECORD);
    first = n;
#else
    (void)log;
#endif
    if (e->value_len - half) {
        iov[n].iov_base = (uint8_t *)e->value + half;
        iov[n++].iov_len = e->value_len - half;
    }
    if (stride > length) {
        iov[n].iov_base = zeros;
        iov[n++].iov_len = stride - length;
    }
    if (n > first) {
        if (pwrite_all(seg->fd, iov + first, n - first,
                       seg->end_pos + MQS_SEGLOG_R_CRC + skipped) != 0)
            return -1;
    }
    /* Order the bytes written above before the length word, for readers
     * of the mapping in other threads and processes: the kernel copied
     * them in this thread, so a fence here orders them. */
    atomic_thread_fence(memory_order_release);
    put_u32(header, length);
    iov[0].iov_base = header;
    iov[0].iov_len = 4;
    return pwrite_all(seg->fd, iov, 1, seg->end_pos);
}

static void write_record(mqs_seglog_t *log, mqs_segment_t *seg,
                         const mqs_seglog_entry_t *e, uint32_t length)
{
    uint8_t *p = seg->map + seg->end_pos;
    uint64_t stride = align_up(length);
    uint8_t *body = p + MQS_SEGLOG_RECORD_HEADER_BYTES;

    if (atomic_load_explicit(&log->round_records_x8, memory_order_relaxed) <
            SMALL_ROUNDS_X8 &&
        pwrite_record(log, seg, e, length) == 0) {
        log->records_by_write++;
        goto written;
    }
    put_u64(p + MQS_SEGLOG_R_OFFSET, (uint64_t)seg->next_offset);
    put_u64(p + MQS_SEGLOG_R_TIMESTAMP, (uint64_t)e->timestamp_ns);
    put_u32(p + MQS_SEGLOG_R_KEY_LEN, e->has_key ? e->key_len : 0);
    put_u32(p + MQS_SEGLOG_R_ATTRIBUTES,
            e->has_key ? MQS_SEGLOG_ATTR_HAS_KEY : 0);
    if (e->has_key && e->key_len) {
        memcpy(body, e->key, e->key_len);
        body += e->key_len;
    }
    if (e->value_len / 2)
        memcpy(body, e->value, e->value_len / 2);
    failpoint_kill(log, FP_MID_RECORD);
    if (e->value_len - e->value_len / 2)
        memcpy(body + e->value_len / 2,
               (const uint8_t *)e->value + e->value_len / 2,
               e->value_len - e->value_len / 2);
    if (stride > length)
        memset(p + length, 0, stride - length);
    put_u32(p + MQS_SEGLOG_R_CRC, record_crc(seg->seed, p, length));
    /* Publish: a reader that acquires a non-zero length sees all of the
     * above. */
    mqs_store_release_u32((_Atomic uint32_t *)p, length);

written:
    index_add(seg, seg->next_offset, seg->end_pos, e->timestamp_ns);
    seg->end_pos += stride;
    seg->next_offset++;
}

int mqs_seglog_append(mqs_seglog_t *log, const mqs_seglog_entry_t *entries,
                      size_t n, int64_t *first_offset)
{
    int rc;

    if (n < 1)
        return MQS_EINVAL;
    if (log->cfg.readonly)
        return MQS_EREADONLY;
    if (atomic_load(&log->poison_errno))
        return MQS_EPOISONED;
    for (size_t i = 0; i < n; i++) {
        uint32_t key_len = entries[i].has_key ? entries[i].key_len : 0;
        int64_t max = mqs_seglog_max_value_bytes(log->cfg.segment_bytes,
                                                 key_len);
        if (max < 0 || entries[i].value_len > (uint64_t)max)
            return MQS_ETOOBIG;
    }

    *first_offset = log->active->next_offset;
    for (size_t i = 0; i < n; i++) {
        const mqs_seglog_entry_t *e = &entries[i];
        uint32_t length = MQS_SEGLOG_RECORD_HEADER_BYTES +
                          (e->has_key ? e->key_len : 0) + e->value_len;
        mqs_segment_t *seg = log->active;
        /* A sealed active segment is one whose roll failed because its
         * new segment could not be created. Readers stop at its seal, so
         * nothing more may go into it, and the roll is tried again. */
        if (seg->sealed ||
            seg->end_pos + align_up(length) > seg->map_bytes) {
            /* Publish what is written so a sync in the roll covers it. */
            atomic_store_explicit(&log->pub_pos, (int64_t)seg->end_pos,
                                  memory_order_release);
            atomic_store_explicit(&log->pub_offset, seg->next_offset,
                                  memory_order_release);
            rc = roll_locked(log);
            if (rc != MQS_OK)
                return rc;
            seg = log->active;
        }
        if (log->toucher_started)
            toucher_before_store(log, seg, seg->end_pos + align_up(length));
        else if (log->write_zeros &&
            seg->end_pos + align_up(length) + ZEROS_MARGIN > seg->zeroed_pos &&
            seg->zeroed_pos < seg->map_bytes)
            write_zeros_ahead(log, seg, seg->end_pos + align_up(length) +
                                            ZEROS_MARGIN + ZEROS_STEP);
        write_record(log, seg, e, length);
        log->appended++;
    }
    atomic_store_explicit(&log->pub_pos, (int64_t)log->active->end_pos,
                          memory_order_release);
    atomic_store_explicit(&log->pub_offset, log->active->next_offset,
                          memory_order_release);
    if (log->active->end_pos - log->active->released_pos >= RELEASE_STEP) {
        /* The writer only moves forward: drop what is written, up to the
         * page it is still filling. */
        segment_release_pages(log, log->active, log->active->released_pos,
                              log->active->end_pos);
        log->active->released_pos = log->active->end_pos
                                    & ~((uint64_t)log->page_bytes - 1);
    }
    failpoint_kill(log, FP_AFTER_APPEND);
    if (log->cfg.fsync_mode == MQS_SEGLOG_FSYNC_INTERVAL &&
        log->cfg.fsync_interval_records > 0 &&
        log->active->next_offset - atomic_load(&log->synced_offset) >=
            log->cfg.fsync_interval_records)
        request_flush(log);
    return MQS_OK;
}

/* ---- reads ------------------------------------------------------------ */

static int open_new_segments(mqs_seglog_t *log);

/*
 * Read-only: a writer that needs a larger segment than its empty active
 * one renames a new file over it (replace_empty_active). When the file
 * under the last segment's name is no longer the one mapped here, map
 * the new one in its place.
 */
static int reopen_if_replaced(mqs_seglog_t *log)
{
    mqs_segment_t *old = log->segs[log->nsegs - 1], *seg;
    struct stat named, mapped;
    int rc;

    if (fstatat(log->dir_fd, old->name, &named, 0) != 0 ||
        fstat(old->fd, &mapped) != 0 || named.st_ino == mapped.st_ino)
        return MQS_OK;
    rc = segment_open(log, old->base_offset, &seg);
    if (rc != MQS_OK)
        return rc == MQS_EIO && log->last_errno == ENOENT ? MQS_OK : rc;
    log->segs[log->nsegs - 1] = seg;
    if (log->hint_seg == old)
        log->hint_seg = NULL;
    if (log->resident_seg == old)
        log->resident_seg = NULL;
    mqs_seglog_segment_release(old);
    segment_walk(seg, seg->map_bytes, 0, NULL);
    seg->indexed = 1;
    return MQS_OK;
}

/* Read-only: extend the last segment's walk, and follow its seal to the
 * next segment file. */
int mqs_seglog_refresh(mqs_seglog_t *log)
{
    int rc;

    if (!log->cfg.readonly)
        return MQS_OK;
    for (;;) {
        mqs_segment_t *last;
        if (log->nsegs == 0)
            return open_new_segments(log);
        last = log->segs[log->nsegs - 1];
        if (!last->sealed) {
            int64_t before = last->next_offset;
            segment_walk(last, last->map_bytes, 0, NULL);
            seal_load_and_walk(last);
            if (!last->sealed) {
                if (last->next_offset == before &&
                    before == last->base_offset)
                    return reopen_if_replaced(log);
                return MQS_OK;
            }
        }
        rc = open_new_segments(log);
        if (rc != MQS_OK || log->segs[log->nsegs - 1] == last)
            return rc;
    }
}

/*
 * Read-only: walk `last` to its end before a segment is added after it,
 * because refresh walks only the last segment. A writer seals a segment
 * before it creates the next one, so the seal is there to load now even
 * when `last` was opened unsealed (by open_sealed_successors, just
 * after the roll that created it).
 */
static void finish_walk(mqs_segment_t *last)
{
    if (last->sealed)
        return;
    segment_walk(last, last->map_bytes, 0, NULL);
    seal_load_and_walk(last);
}

static int open_new_segments(mqs_seglog_t *log)
{
    int64_t *bases = NULL;
    size_t n = 0;
    int64_t after;
    int rc = open_sealed_successors(log, INT64_MAX, 1);

    if (rc != MQS_OK)
        return rc;
    after = log->nsegs ? log->segs[log->nsegs - 1]->base_offset : -1;
    rc = list_segments(log, after, &bases, &n, NULL);
    for (size_t i = 0; rc == MQS_OK && i < n; i++) {
        mqs_segment_t *seg;
        mqs_seglog_recovery_t unused;
        if (log->nsegs)
            finish_walk(log->segs[log->nsegs - 1]);
        rc = open_sealed_successors(log, bases[i], 1);
        if (rc != MQS_OK)
            break;
        rc = segment_open(log, bases[i], &seg);
        if (rc == MQS_EIO && log->last_errno == ENOENT) {
            rc = MQS_OK;    /* removed by retention meanwhile */
            continue;
        }
        if (rc != MQS_OK)
            break;
        if (!seg->sealed) {
            memset(&unused, 0, sizeof unused);
            segment_recover(log, seg, 0, -1, &unused);
        }
        rc = segs_push(log, seg);
        if (rc != MQS_OK)
            segment_free(seg);
    }
    free(bases);
    return rc;
}

static int64_t log_end_offset(const mqs_seglog_t *log)
{
    if (log->nsegs == 0)
        return 0;
    return segment_end_offset(log->segs[log->nsegs - 1]);
}

static int64_t log_start_offset(const mqs_seglog_t *log)
{
    return log->nsegs ? log->segs[0]->base_offset : log_end_offset(log);
}

/* Index of the segment holding `offset`, or -1 if below the first. */
static ssize_t find_segment(const mqs_seglog_t *log, int64_t offset)
{
    ssize_t lo = 0, hi = (ssize_t)log->nsegs - 1, found = -1;

    while (lo <= hi) {
        ssize_t mid = lo + (hi - lo) / 2;
        if (log->segs[mid]->base_offset <= offset) {
            found = mid;
            lo = mid + 1;
        } else {
            hi = mid - 1;
        }
    }
    return found;
}

/*
 * Find where the record at `offset` starts. The walk to it trusts the
 * lengths because they were checked when the segment was indexed and
 * records below the walk end never change. It never crosses a gap: an
 * offset after one is walked to from the record that ends it.
 */
static int locate(mqs_seglog_t *log, int64_t offset, mqs_segment_t **seg_out,
                  uint64_t *pos_out)
{
    mqs_segment_t *seg;
    const gap_t *floor = NULL;
    ssize_t i;
    uint64_t pos;
    int64_t at;

    if (offset >= log_end_offset(log)) {
        int rc = mqs_seglog_refresh(log);
        if (rc != MQS_OK)
            return rc;
        if (offset >= log_end_offset(log))
            return MQS_EEMPTY;
    }
    i = find_segment(log, offset);
    if (i < 0)
        return MQS_ERANGE;
    seg = log->segs[i];
    segment_ensure_indexed(seg);
    if (offset >= seg->next_offset)
        return MQS_ECORRUPT;   /* damaged in a sealed segment, or a gap */
    if (gap_lookup(seg, offset, &floor) != NULL)
        return MQS_ECORRUPT;   /* skipped by a resync */
    if (log->resident_seg != seg) {
        /* Reads move on to another segment: the last one's pages leave
         * this process's resident set (views still fault them back). */
        if (log->resident_seg != NULL)
            segment_release_pages(log, log->resident_seg, 0,
                                  log->resident_seg->map_bytes);
        log->resident_seg = seg;
    }

    if (log->hint_seg == seg && log->hint_offset == offset &&
        (floor == NULL || log->hint_pos >= floor->resume_pos)) {
        *seg_out = seg;
        *pos_out = log->hint_pos;
        return MQS_OK;
    }
    {
        uint32_t rel = (uint32_t)(offset - seg->base_offset);
        size_t lo = 0, hi = seg->idx_n;
        while (lo < hi) {
            size_t mid = lo + (hi - lo) / 2;
            if (seg->idx[mid].rel <= rel)
                lo = mid + 1;
            else
                hi = mid;
        }
        if (lo == 0) {
            pos = MQS_SEGLOG_HEADER_BYTES;
            at = seg->base_offset;
        } else {
            pos = seg->idx[lo - 1].pos;
            at = seg->base_offset + seg->idx[lo - 1].rel;
        }
        if (floor != NULL && at < floor->end) {
            pos = floor->resume_pos;
            at = floor->end;
        }
    }
    while (at < offset) {
        pos += align_up(get_u32(seg->map + pos));
        at++;
    }
    *seg_out = seg;
    *pos_out = pos;
    return MQS_OK;
}

int mqs_seglog_read(mqs_seglog_t *log, int64_t offset,
                    mqs_seglog_record_t *record)
{
    mqs_segment_t *seg;
    uint64_t pos;
    uint32_t length;
    int rc = locate(log, offset, &seg, &pos);

    if (rc != MQS_OK)
        return rc;
    if (frame_check(seg, pos, seg->end_pos, offset, 1, &length) !=
        FRAME_VALID)
        return MQS_ECORRUPT;
    fill_record(seg, pos, record);
    log->hint_seg = seg;
    log->hint_offset = offset + 1;
    log->hint_pos = pos + align_up(length);
    return MQS_OK;
}

/* One Arrow binary_view entry: inline up to 12 bytes, else a 4-byte
 * prefix, buffer index 0 and the position in the segment. */
static void put_view(uint8_t *view, const uint8_t *data, uint32_t len,
                     uint64_t position)
{
    memset(view, 0, 16);
    put_u32(view, len);
    if (len <= 12) {
        memcpy(view + 4, data, len);
        return;
    }
    memcpy(view + 4, data, 4);
    put_u32(view + 12, (uint32_t)position);
}

int mqs_seglog_read_batch(mqs_seglog_t *log, int64_t offset,
                          int64_t max_records, uint8_t *value_views,
                          uint8_t *key_views, uint8_t *key_valid,
                          int64_t *offsets, int64_t *timestamps,
                          int64_t *count, mqs_segment_t **segment)
{
    mqs_segment_t *seg;
    uint64_t pos;
    int64_t n = 0, end;
    int rc;

    *count = 0;
    if (max_records < 1)
        return MQS_EINVAL;
    rc = locate(log, offset, &seg, &pos);
    if (rc != MQS_OK)
        return rc;
    end = seg->next_offset;
    for (size_t g = 0; g < seg->gaps_n; g++) {
        if (seg->gaps[g].first > offset) {
            end = seg->gaps[g].first;
            break;
        }
    }
    while (n < max_records && offset + n < end) {
        const uint8_t *p = seg->map + pos;
        uint32_t length, key_len;
        if (frame_check(seg, pos, seg->end_pos, offset + n, 1, &length) !=
            FRAME_VALID) {
            if (n == 0)
                return MQS_ECORRUPT;
            break;
        }
        key_len = get_u32(p + MQS_SEGLOG_R_KEY_LEN);
        if (value_views)
            put_view(value_views + 16 * n,
                     p + MQS_SEGLOG_RECORD_HEADER_BYTES + key_len,
                     length - MQS_SEGLOG_RECORD_HEADER_BYTES - key_len,
                     pos + MQS_SEGLOG_RECORD_HEADER_BYTES + key_len);
        if (key_views)
            put_view(key_views + 16 * n, p + MQS_SEGLOG_RECORD_HEADER_BYTES,
                     key_len, pos + MQS_SEGLOG_RECORD_HEADER_BYTES);
        if (key_valid && (p[MQS_SEGLOG_R_ATTRIBUTES] & MQS_SEGLOG_ATTR_HAS_KEY))
            key_valid[n / 8] |= (uint8_t)(1u << (n % 8));
        if (offsets)
            offsets[n] = offset + n;
        if (timestamps)
            timestamps[n] = (int64_t)get_u64(p + MQS_SEGLOG_R_TIMESTAMP);
        pos += align_up(length);
        n++;
    }
    *count = n;
    *segment = seg;
    log->hint_seg = seg;
    log->hint_offset = offset + n;
    log->hint_pos = pos;
    return MQS_OK;
}

int mqs_seglog_find_time(mqs_seglog_t *log, int64_t timestamp_ns,
                         int64_t *offset)
{
    mqs_seglog_refresh(log);
    for (size_t i = 0; i < log->nsegs; i++) {
        mqs_segment_t *seg = log->segs[i];
        uint64_t pos = MQS_SEGLOG_HEADER_BYTES;
        int64_t at = seg->base_offset;
        size_t lo = 0, hi, gap;
        if (segment_max_ts(seg) < timestamp_ns)
            continue;
        /* A sealed segment is indexed on its first read, and its seal
         * alone gave the max timestamp above. */
        segment_ensure_indexed(seg);
        /* Last entry whose running maximum is still below the target:
         * every record up to it is too old, so start after it. */
        hi = seg->tix_n;
        while (lo < hi) {
            size_t mid = lo + (hi - lo) / 2;
            if (seg->tix[mid].max_ts < timestamp_ns)
                lo = mid + 1;
            else
                hi = mid;
        }
        if (lo > 0) {
            pos = seg->tix[lo - 1].pos;
            at = seg->base_offset + seg->tix[lo - 1].rel;
        }
        gap = 0;
        while (gap < seg->gaps_n && seg->gaps[gap].first < at)
            gap++;
        for (; at < seg->next_offset; at++) {
            const uint8_t *p;
            /* Skip the offsets of damaged records: their timestamps are
             * unknown. */
            while (gap < seg->gaps_n && seg->gaps[gap].first == at) {
                pos = seg->gaps[gap].resume_pos;
                at = seg->gaps[gap].end;
                gap++;
            }
            if (at >= seg->next_offset)
                break;
            p = seg->map + pos;
            if ((int64_t)get_u64(p + MQS_SEGLOG_R_TIMESTAMP) >= timestamp_ns) {
                *offset = at;
                return MQS_OK;
            }
            pos += align_up(get_u32(p));
        }
    }
    *offset = log_end_offset(log);
    return MQS_OK;
}

/* ---- misc ------------------------------------------------------------- */

void mqs_seglog_get_stats(mqs_seglog_t *log, mqs_seglog_stats_t *s)
{
    memset(s, 0, sizeof *s);
    s->start_offset = log_start_offset(log);
    s->end_offset = log_end_offset(log);
    s->synced_offset = log->cfg.readonly ? s->end_offset
                                         : atomic_load(&log->synced_offset);
    s->segments = (int64_t)log->nsegs;
    for (size_t i = 0; i < log->nsegs; i++)
        s->bytes += (int64_t)log->segs[i]->map_bytes;
    s->appended_records = log->appended;
    s->records_by_write = log->records_by_write;
    s->syncs_taken_over = atomic_load(&log->syncs_taken_over);
    s->gather_timeouts = atomic_load(&log->gather_timeouts);
    s->syncs = atomic_load(&log->syncs);
    s->sync_errno = atomic_load(&log->poison_errno);
    s->segments_deleted = log->segments_deleted;
    s->records_deleted = log->records_deleted;
    if (log->toucher_started)
        pthread_mutex_lock(&log->touch_mu);
    s->zeros_by_toucher = log->zeros_by_toucher;
    s->zeros_by_appender = log->zeros_by_appender;
    if (log->toucher_started)
        pthread_mutex_unlock(&log->touch_mu);
}

void mqs_seglog_set_touch_hook(mqs_seglog_t *log,
                               mqs_seglog_touch_hook_t hook, void *ctx)
{
    pthread_mutex_lock(&log->touch_mu);
    log->touch_hook = hook;
    log->touch_hook_ctx = ctx;
    pthread_mutex_unlock(&log->touch_mu);
}

int mqs_seglog_last_errno(mqs_seglog_t *log)
{
    return log->last_errno;
}

void mqs_seglog_set_sync_hook(mqs_seglog_t *log, mqs_seglog_sync_hook_t hook,
                              void *ctx)
{
    pthread_mutex_lock(&log->sync_mu);
    while (log->sync_running)
        pthread_cond_wait(&log->sync_cv, &log->sync_mu);
    log->hook = hook;
    log->hook_ctx = ctx;
    pthread_mutex_unlock(&log->sync_mu);
}
