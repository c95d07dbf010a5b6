/*
 * Unit tests of csrc/mqs_seglog.h and csrc/mqs_crc32c.h on real files in
 * a temporary directory (removed at the end unless a check failed).
 *
 * Build and run (tests/test_c_seglog.py does this in two builds):
 *   gcc -std=c11 -O2 -Wall -Wextra -Werror -Icsrc -pthread \
 *       tests/c/test_seglog.c csrc/mqs_seglog.c csrc/mqs_crc32c.c \
 *       -o test_seglog && ./test_seglog
 *
 * Every failed check prints its function, line and values to stderr. The
 * last line on stdout is "N passed, M failed" and the exit status is 1
 * when M > 0.
 */
#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mqs_crc32c.h"
#include "mqs_seglog.h"

#include "check.h"

static char root[256];

static mqs_seglog_config_t config(uint64_t segment_bytes, int fsync_mode)
{
    mqs_seglog_config_t c = {
        .segment_bytes = segment_bytes,
        .fsync_mode = fsync_mode,
        .readonly = 0,
        .fsync_interval_ns = 10 * 1000 * 1000,
        .fsync_interval_records = 0,
        .retention_bytes = -1,
        .retention_ns = -1,
    };
    return c;
}

static void log_dir(char *out, size_t size, const char *name)
{
    snprintf(out, size, "%s/%s", root, name);
}

/* Open a log or stop the run: no later check means anything. */
static mqs_seglog_t *open_log(const char *path, mqs_seglog_config_t c,
                              mqs_seglog_recovery_t *report)
{
    mqs_seglog_t *log = NULL;
    int os_errno = 0;
    int rc = mqs_seglog_open(&log, path, &c, report, &os_errno);

    if (rc != MQS_OK) {
        fprintf(stderr, "failed to open %s: status %d, errno %d\n", path, rc,
                os_errno);
        exit(2);
    }
    return log;
}

static int64_t append_text(mqs_seglog_t *log, const char *key,
                           const char *value, int64_t ts)
{
    mqs_seglog_entry_t e = {
        .key = key,
        .value = value,
        .key_len = key ? (uint32_t)strlen(key) : 0,
        .value_len = (uint32_t)strlen(value),
        .timestamp_ns = ts,
        .has_key = key != NULL,
    };
    int64_t offset = -1;
    int rc = mqs_seglog_append(log, &e, 1, &offset);

    CHECK_EQ(rc, MQS_OK);
    return offset;
}

static int64_t append_sized(mqs_seglog_t *log, uint32_t size, int64_t i)
{
    static uint8_t buf[1 << 16];
    mqs_seglog_entry_t e = {0};
    int64_t offset = -1;

    for (uint32_t k = 0; k < size; k++)
        buf[k] = (uint8_t)(i * 31 + k);
    e.value = buf;
    e.value_len = size;
    e.timestamp_ns = 1000 + i;
    CHECK_EQ(mqs_seglog_append(log, &e, 1, &offset), MQS_OK);
    return offset;
}

static int value_matches(const mqs_seglog_record_t *r, uint32_t size,
                         int64_t i)
{
    if (r->value_len != size)
        return 0;
    for (uint32_t k = 0; k < size; k++)
        if (r->value[k] != (uint8_t)(i * 31 + k))
            return 0;
    return 1;
}

static uint64_t file_size(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? (uint64_t)st.st_size : 0;
}

/* ---- CRC-32C ------------------------------------------------------------ */

static void test_crc32c_known_values(void)
{
    uint8_t zeros[32] = {0}, ones[32];

    memset(ones, 0xFF, sizeof ones);
    CHECK_EQ(mqs_crc32c_extend(0, "", 0), 0);
    CHECK_EQ(mqs_crc32c_extend(0, "123456789", 9), 0xE3069283u);
    CHECK_EQ(mqs_crc32c_extend(0, zeros, 32), 0x8A9136AAu);
    CHECK_EQ(mqs_crc32c_extend(0, ones, 32), 0x62A8AB43u);
    CHECK_EQ(mqs_crc32c_extend_sw(0, "123456789", 9), 0xE3069283u);
    /* Chaining equals one pass. */
    CHECK_EQ(mqs_crc32c_extend(mqs_crc32c_extend(0, "1234", 4), "56789", 5),
             0xE3069283u);
}

static void test_crc32c_hardware_matches_software(void)
{
    /* Past 3 x 1024 bytes, so the interleaved long and short blocks of
     * the hardware versions and their merge run too. */
    static uint8_t buf[7000];
    int mismatches = 0;

    for (size_t i = 0; i < sizeof buf; i++)
        buf[i] = (uint8_t)(i * 7 + 3 + (i >> 8));
    for (size_t start = 0; start < 9; start++)
        for (size_t n = 0; n + start <= sizeof buf; n += 13)
            if (mqs_crc32c_extend(0x1234, buf + start, n) !=
                mqs_crc32c_extend_sw(0x1234, buf + start, n))
                mismatches++;
    CHECK_EQ(mismatches, 0);
    /* Every implementation, at every length up to 2,100 bytes (the
     * folding one starts at 512 and takes 256-byte steps) and at
     * lengths around 4 KiB, from unaligned starts. */
    CHECK(mqs_crc32c_impl_count() >= 1);
    for (int impl = 1; impl < mqs_crc32c_impl_count(); impl++) {
        mismatches = 0;
        for (size_t start = 0; start < 5; start++) {
            size_t n = 0;
            while (n + start <= sizeof buf) {
                if (mqs_crc32c_extend_with(impl, 0xABCD, buf + start, n) !=
                    mqs_crc32c_extend_sw(0xABCD, buf + start, n))
                    mismatches++;
                /* Every length below 2,100 and between 4,000 and 4,300,
                 * every 97th elsewhere. */
                if (n < 2100 || (n > 4000 && n < 4300))
                    n += 1;
                else
                    n += 97;
            }
        }
        if (mismatches)
            fprintf(stderr, "crc32c %s differs from software\n",
                    mqs_crc32c_impl_name(impl));
        CHECK_EQ(mismatches, 0);
    }
    printf("crc32c implementation: %s (of %d)\n", mqs_crc32c_impl(),
           mqs_crc32c_impl_count());
}

/* ---- append and read ---------------------------------------------------- */

static void test_append_read_round_trip(void)
{
    char path[300];
    mqs_seglog_t *log;
    mqs_seglog_record_t r;

    log_dir(path, sizeof path, "roundtrip");
    log = open_log(path, config(65536, MQS_SEGLOG_FSYNC_NEVER), NULL);
    CHECK_EQ(append_text(log, NULL, "first", 11), 0);
    CHECK_EQ(append_text(log, "k", "second", 22), 1);
    CHECK_EQ(append_text(log, "", "", 33), 2);

    CHECK_EQ(mqs_seglog_read(log, 0, &r), MQS_OK);
    CHECK_EQ(r.offset, 0);
    CHECK_EQ(r.timestamp_ns, 11);
    CHECK_EQ(r.has_key, 0);
    CHECK_EQ(r.value_len, 5);
    CHECK(memcmp(r.value, "first", 5) == 0);
    CHECK_EQ(mqs_seglog_read(log, 1, &r), MQS_OK);
    CHECK_EQ(r.has_key, 1);
    CHECK_EQ(r.key_len, 1);
    CHECK(memcmp(r.key, "k", 1) == 0);
    CHECK(memcmp(r.value, "second", 6) == 0);
    CHECK_EQ(mqs_seglog_read(log, 2, &r), MQS_OK);
    CHECK_EQ(r.has_key, 1);
    CHECK_EQ(r.key_len, 0);
    CHECK_EQ(r.value_len, 0);
    CHECK_EQ(mqs_seglog_read(log, 3, &r), MQS_EEMPTY);
    CHECK_EQ(mqs_seglog_read(log, -1, &r), MQS_ERANGE);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);

    /* Files are owner-only. */
    {
        struct stat st;
        char seg[400];
        snprintf(seg, sizeof seg, "%s/%020d.seg", path, 0);
        CHECK_EQ(stat(path, &st), 0);
        CHECK_EQ(st.st_mode & 0777, 0700);
        CHECK_EQ(stat(seg, &st), 0);
        CHECK_EQ(st.st_mode & 0777, 0600);
        CHECK_EQ((uint64_t)st.st_size, 65536);
    }

    log = open_log(path, config(65536, MQS_SEGLOG_FSYNC_NEVER), NULL);
    CHECK_EQ(append_text(log, NULL, "after reopen", 44), 3);
    CHECK_EQ(mqs_seglog_read(log, 1, &r), MQS_OK);
    CHECK(memcmp(r.value, "second", 6) == 0);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
}

static void test_append_rolls_segments(void)
{
    char path[300], seg[400];
    mqs_seglog_t *log;
    mqs_seglog_record_t r;
    mqs_seglog_stats_t s;
    int bad = 0;
    const int n = 400;

    log_dir(path, sizeof path, "roll");
    log = open_log(path, config(8192, MQS_SEGLOG_FSYNC_INTERVAL), NULL);
    for (int i = 0; i < n; i++)
        CHECK_EQ(append_sized(log, 100 + (uint32_t)(i % 50), i), i);
    mqs_seglog_get_stats(log, &s);
    CHECK(s.segments > 10);
    CHECK_EQ(s.end_offset, n);
    for (int i = 0; i < n; i++)
        if (mqs_seglog_read(log, i, &r) != MQS_OK ||
            !value_matches(&r, 100 + (uint32_t)(i % 50), i))
            bad++;
    CHECK_EQ(bad, 0);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);

    snprintf(seg, sizeof seg, "%s/%020d.seg", path, 0);
    CHECK_EQ(file_size(seg), 8192);

    /* Reopened: sealed segments are indexed lazily and read back. */
    log = open_log(path, config(8192, MQS_SEGLOG_FSYNC_INTERVAL), NULL);
    bad = 0;
    for (int i = n - 1; i >= 0; i--)
        if (mqs_seglog_read(log, i, &r) != MQS_OK ||
            !value_matches(&r, 100 + (uint32_t)(i % 50), i))
            bad++;
    CHECK_EQ(bad, 0);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
}

static void test_append_rejects_record_larger_than_segment(void)
{
    char path[300];
    mqs_seglog_t *log;
    int64_t max = mqs_seglog_max_value_bytes(8192, 0);

    log_dir(path, sizeof path, "toobig");
    log = open_log(path, config(8192, MQS_SEGLOG_FSYNC_NEVER), NULL);
    CHECK_EQ(max, 8192 - 4096 - 32);
    CHECK_EQ(append_sized(log, (uint32_t)max, 0), 0);
    {
        static uint8_t big[8192];
        mqs_seglog_entry_t e = {.value = big, .value_len = (uint32_t)max + 1};
        int64_t offset;
        CHECK_EQ(mqs_seglog_append(log, &e, 1, &offset), MQS_ETOOBIG);
        CHECK_EQ(mqs_seglog_append(log, &e, 0, &offset), MQS_EINVAL);
    }
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
}

static void test_read_batch_fills_views(void)
{
    char path[300];
    mqs_seglog_t *log;
    mqs_segment_t *seg = NULL;
    uint8_t values[16 * 8], keys[16 * 8], valid[1] = {0};
    int64_t offsets[8], stamps[8], count = 0;
    const uint8_t *data;
    uint32_t len, pos;

    log_dir(path, sizeof path, "batch");
    log = open_log(path, config(65536, MQS_SEGLOG_FSYNC_NEVER), NULL);
    append_text(log, NULL, "short", 1);
    append_text(log, "key-longer-than-12", "a value longer than twelve", 2);
    append_text(log, "k", "v", 3);
    CHECK_EQ(mqs_seglog_read_batch(log, 0, 8, values, keys, valid, offsets,
                                   stamps, &count, &seg),
             MQS_OK);
    CHECK_EQ(count, 3);
    CHECK_EQ(valid[0], 6);
    CHECK_EQ(offsets[2], 2);
    CHECK_EQ(stamps[1], 2);
    data = mqs_seglog_segment_data(seg, NULL);
    memcpy(&len, values, 4);
    CHECK_EQ(len, 5);
    CHECK(memcmp(values + 4, "short", 5) == 0);
    memcpy(&len, values + 16, 4);
    memcpy(&pos, values + 28, 4);
    CHECK_EQ(len, 26);
    CHECK(memcmp(data + pos, "a value longer than twelve", 26) == 0);
    CHECK(memcmp(values + 20, "a va", 4) == 0);
    memcpy(&pos, keys + 28, 4);
    CHECK(memcmp(data + pos, "key-longer-than-12", 18) == 0);

    CHECK_EQ(mqs_seglog_read_batch(log, 1, 1, values, NULL, NULL, NULL, NULL,
                                   &count, &seg),
             MQS_OK);
    CHECK_EQ(count, 1);
    CHECK_EQ(mqs_seglog_read_batch(log, 3, 1, values, NULL, NULL, NULL, NULL,
                                   &count, &seg),
             MQS_EEMPTY);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
}

static void test_find_time_returns_first_at_or_after(void)
{
    char path[300];
    mqs_seglog_t *log;
    int64_t offset = -1;

    log_dir(path, sizeof path, "time");
    log = open_log(path, config(8192, MQS_SEGLOG_FSYNC_NEVER), NULL);
    for (int i = 0; i < 300; i++)
        append_sized(log, 64, i);    /* timestamps 1000 + i */
    CHECK_EQ(mqs_seglog_find_time(log, 0, &offset), MQS_OK);
    CHECK_EQ(offset, 0);
    CHECK_EQ(mqs_seglog_find_time(log, 1150, &offset), MQS_OK);
    CHECK_EQ(offset, 150);
    CHECK_EQ(mqs_seglog_find_time(log, 1299, &offset), MQS_OK);
    CHECK_EQ(offset, 299);
    CHECK_EQ(mqs_seglog_find_time(log, 5000, &offset), MQS_OK);
    CHECK_EQ(offset, 300);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
}

/* ---- locking, read-only handles, retention ------------------------------ */

static void test_second_writer_gets_locked(void)
{
    char path[300];
    mqs_seglog_t *log, *other = NULL;
    mqs_seglog_config_t c = config(65536, MQS_SEGLOG_FSYNC_NEVER);
    int os_errno = 0;

    log_dir(path, sizeof path, "lock");
    log = open_log(path, c, NULL);
    CHECK_EQ(mqs_seglog_open(&other, path, &c, NULL, &os_errno), MQS_ELOCKED);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
    log = open_log(path, c, NULL);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
}

static void test_readonly_handle_follows_writer(void)
{
    char path[300];
    mqs_seglog_t *log, *reader;
    mqs_seglog_config_t rc = config(8192, MQS_SEGLOG_FSYNC_NEVER);
    mqs_seglog_record_t r;
    int64_t offset;
    int bad = 0;

    log_dir(path, sizeof path, "follow");
    log = open_log(path, config(8192, MQS_SEGLOG_FSYNC_NEVER), NULL);
    append_sized(log, 50, 0);
    rc.readonly = 1;
    reader = open_log(path, rc, NULL);
    CHECK_EQ(mqs_seglog_read(reader, 0, &r), MQS_OK);
    CHECK_EQ(mqs_seglog_read(reader, 1, &r), MQS_EEMPTY);
    for (int i = 1; i < 200; i++)
        append_sized(log, 120, i);
    for (int i = 1; i < 200; i++)
        if (mqs_seglog_read(reader, i, &r) != MQS_OK ||
            !value_matches(&r, 120, i))
            bad++;
    CHECK_EQ(bad, 0);
    CHECK_EQ(mqs_seglog_append(reader, NULL, 1, &offset), MQS_EREADONLY);
    CHECK_EQ(mqs_seglog_sync(reader, -1), MQS_EREADONLY);
    CHECK_EQ(mqs_seglog_close(reader), MQS_OK);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
}

static void test_reader_follows_replaced_empty_segment(void)
{
    char path[300];
    mqs_seglog_t *log, *reader;
    mqs_seglog_config_t rc = config(8192, MQS_SEGLOG_FSYNC_NEVER);
    mqs_seglog_record_t r;

    log_dir(path, sizeof path, "replace");
    log = open_log(path, config(8192, MQS_SEGLOG_FSYNC_NEVER), NULL);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
    rc.readonly = 1;
    reader = open_log(path, rc, NULL);
    CHECK_EQ(mqs_seglog_read(reader, 0, &r), MQS_EEMPTY);

    /* Reopened with larger segments: a record too large for the empty
     * 8 KiB active segment makes the writer replace that file. */
    log = open_log(path, config(65536, MQS_SEGLOG_FSYNC_NEVER), NULL);
    CHECK_EQ(append_sized(log, 10000, 0), 0);
    CHECK_EQ(mqs_seglog_read(reader, 0, &r), MQS_OK);
    CHECK(value_matches(&r, 10000, 0));
    CHECK_EQ(mqs_seglog_close(reader), MQS_OK);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
}

/* Count the non-zero bytes of a file in [from, to). */
static uint64_t nonzero_bytes(const char *path, uint64_t from, uint64_t to)
{
    static uint8_t buf[1 << 16];
    uint64_t count = 0;
    int fd = open(path, O_RDONLY);

    if (fd < 0)
        return UINT64_MAX;
    while (from < to) {
        size_t want = to - from < sizeof buf ? (size_t)(to - from) : sizeof buf;
        ssize_t n = pread(fd, buf, want, (off_t)from);
        if (n <= 0)
            break;
        for (ssize_t k = 0; k < n; k++)
            count += buf[k] != 0;
        from += (uint64_t)n;
    }
    close(fd);
    return count;
}

/*
 * Under "never" and "interval" the writer writes zeros ahead of the end
 * of the active segment in steps of 2 MiB. Records of 1-12 KiB go through
 * several of those steps and two rolls. A reader handle must see each
 * record right after its append, and the files must keep their size.
 * The bytes after the last record must stay zero, and a reopen must
 * recover every record with nothing cut.
 */
static void test_zeros_ahead_keep_records_and_size(void)
{
    const uint64_t segment = (uint64_t)4 << 20;
    const int modes[] = {MQS_SEGLOG_FSYNC_NEVER, MQS_SEGLOG_FSYNC_INTERVAL};

    for (size_t m = 0; m < sizeof modes / sizeof modes[0]; m++) {
        char path[300], seg[400];
        mqs_seglog_t *log, *reader;
        mqs_seglog_config_t rc = config(segment, modes[m]);
        mqs_seglog_recovery_t report;
        mqs_seglog_record_t r;
        mqs_seglog_stats_t s;
        int64_t n = 0, last_base = 0;
        int bad = 0, unseen = 0;
        uint64_t tail = 0;

        snprintf(path, sizeof path, "%s/zeros-%zu", root, m);
        log = open_log(path, config(segment, modes[m]), NULL);
        rc.readonly = 1;
        reader = open_log(path, rc, NULL);
        for (uint64_t written = 0; written < 3 * segment; n++) {
            uint32_t size = 1000 + (uint32_t)((n * 2654435761u) % 11000);
            CHECK_EQ(append_sized(log, size, n), n);
            written += size;
            if (mqs_seglog_read(reader, n, &r) != MQS_OK ||
                !value_matches(&r, size, n))
                unseen++;
        }
        CHECK_EQ(unseen, 0);
        for (int64_t i = 0; i < n; i++)
            if (mqs_seglog_read(log, i, &r) != MQS_OK ||
                !value_matches(&r, 1000 + (uint32_t)((i * 2654435761u) % 11000),
                               i))
                bad++;
        CHECK_EQ(bad, 0);
        mqs_seglog_get_stats(log, &s);
        CHECK(s.segments >= 3);
        CHECK_EQ(s.end_offset, n);
        CHECK_EQ(mqs_seglog_read(log, n - 1, &r), MQS_OK);
        tail = r.position + MQS_SEGLOG_RECORD_HEADER_BYTES + r.value_len;
        last_base = mqs_seglog_segment_base(r.segment);
        CHECK_EQ(mqs_seglog_close(reader), MQS_OK);
        CHECK_EQ(mqs_seglog_close(log), MQS_OK);

        snprintf(seg, sizeof seg, "%s/%020" PRId64 ".seg", path, last_base);
        CHECK_EQ(file_size(seg), segment);
        CHECK_EQ(nonzero_bytes(seg, (tail + 7) & ~(uint64_t)7, segment), 0);
        snprintf(seg, sizeof seg, "%s/%020d.seg", path, 0);
        CHECK_EQ(file_size(seg), segment);

        log = open_log(path, config(segment, modes[m]), &report);
        CHECK_EQ(report.bytes_zeroed, 0);
        CHECK_EQ(report.records_dropped, 0);
        mqs_seglog_get_stats(log, &s);
        CHECK_EQ(s.end_offset, n);
        /* Appends after the reopen start mid-page: the zeros must not
         * reach the records already in that page. */
        for (int64_t i = n; i < n + 3; i++)
            CHECK_EQ(append_sized(log, 100, i), i);
        bad = 0;
        for (int64_t i = n - 20; i < n; i++)
            if (mqs_seglog_read(log, i, &r) != MQS_OK ||
                !value_matches(&r, 1000 + (uint32_t)((i * 2654435761u) % 11000),
                               i))
                bad++;
        for (int64_t i = n; i < n + 3; i++)
            if (mqs_seglog_read(log, i, &r) != MQS_OK ||
                !value_matches(&r, 100, i))
                bad++;
        CHECK_EQ(bad, 0);
        CHECK_EQ(mqs_seglog_close(log), MQS_OK);
    }
}

static void test_retention_unlinks_old_sealed_segments(void)
{
    char path[300];
    mqs_seglog_config_t c = config(8192, MQS_SEGLOG_FSYNC_NEVER);
    mqs_seglog_t *log;
    mqs_seglog_stats_t s;
    mqs_seglog_record_t r;

    log_dir(path, sizeof path, "retain");
    c.retention_bytes = 4 * 8192;
    log = open_log(path, c, NULL);
    for (int i = 0; i < 500; i++)
        append_sized(log, 100, i);
    mqs_seglog_get_stats(log, &s);
    CHECK(s.segments <= 5);
    CHECK(s.start_offset > 0);
    CHECK(s.segments_deleted > 0);
    CHECK_EQ(s.records_deleted, s.start_offset);
    CHECK_EQ(mqs_seglog_read(log, 0, &r), MQS_ERANGE);
    CHECK_EQ(mqs_seglog_read(log, s.start_offset, &r), MQS_OK);
    CHECK(value_matches(&r, 100, s.start_offset));
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
}

/* ---- durability --------------------------------------------------------- */

typedef struct hook_state {
    int64_t covered_before[64];
    int64_t n;
    int fail_with;
} hook_state_t;

static int record_hook(void *ctx, int64_t end_offset, int phase)
{
    hook_state_t *h = ctx;

    if (phase == 0)
        return h->fail_with;
    if (h->n < 64)
        h->covered_before[h->n++] = end_offset;
    return 0;
}

static void test_always_sync_covers_each_record(void)
{
    char path[300];
    mqs_seglog_t *log;
    mqs_seglog_stats_t s;
    hook_state_t h = {.n = 0, .fail_with = 0};
    int64_t offset;

    log_dir(path, sizeof path, "always");
    log = open_log(path, config(65536, MQS_SEGLOG_FSYNC_ALWAYS), NULL);
    mqs_seglog_set_sync_hook(log, record_hook, &h);
    for (int i = 0; i < 5; i++) {
        offset = append_text(log, NULL, "durable", i);
        CHECK_EQ(mqs_seglog_sync(log, offset + 1), MQS_OK);
        CHECK_EQ(h.n, i + 1);
        CHECK(h.covered_before[h.n - 1] >= offset + 1);
    }
    /* Already covered: no second sync. */
    CHECK_EQ(mqs_seglog_sync(log, offset + 1), MQS_OK);
    CHECK_EQ(h.n, 5);
    mqs_seglog_get_stats(log, &s);
    CHECK_EQ(s.synced_offset, 5);

    h.fail_with = EIO;
    offset = append_text(log, NULL, "lost", 9);
    CHECK_EQ(mqs_seglog_sync(log, offset + 1), MQS_EPOISONED);
    CHECK_EQ(mqs_seglog_sync(log, offset + 1), MQS_EPOISONED);
    {
        mqs_seglog_entry_t e = {.value = "x", .value_len = 1};
        CHECK_EQ(mqs_seglog_append(log, &e, 1, &offset), MQS_EPOISONED);
    }
    mqs_seglog_get_stats(log, &s);
    CHECK_EQ(s.sync_errno, EIO);
    CHECK_EQ(s.synced_offset, 5);
    CHECK_EQ(mqs_seglog_close(log), MQS_EPOISONED);
}

typedef struct group_arg {
    mqs_seglog_t *log;
    pthread_mutex_t *append_mu;
    int records;
    int pause_us;                   /* before each record after the first */
    int errors;
} group_arg_t;

static void *group_appender(void *p)
{
    group_arg_t *a = p;
    mqs_seglog_entry_t e = {.value = "0123456789", .value_len = 10};

    for (int i = 0; i < a->records; i++) {
        int64_t offset;
        if (i > 0 && a->pause_us)
            usleep((useconds_t)a->pause_us);
        pthread_mutex_lock(a->append_mu);
        int rc = mqs_seglog_append(a->log, &e, 1, &offset);
        pthread_mutex_unlock(a->append_mu);
        if (rc != MQS_OK || mqs_seglog_sync(a->log, offset + 1) != MQS_OK)
            a->errors++;
    }
    return NULL;
}

static void test_group_commit_shares_syncs(void)
{
    char path[300];
    mqs_seglog_t *log;
    mqs_seglog_stats_t s;
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_t threads[8];
    group_arg_t args[8];
    int errors = 0;

    log_dir(path, sizeof path, "group");
    log = open_log(path, config(1 << 20, MQS_SEGLOG_FSYNC_ALWAYS), NULL);
    for (int t = 0; t < 8; t++) {
        args[t] = (group_arg_t){log, &mu, 200, 0, 0};
        pthread_create(&threads[t], NULL, group_appender, &args[t]);
    }
    for (int t = 0; t < 8; t++) {
        pthread_join(threads[t], NULL);
        errors += args[t].errors;
    }
    mqs_seglog_get_stats(log, &s);
    CHECK_EQ(errors, 0);
    CHECK_EQ(s.end_offset, 1600);
    CHECK_EQ(s.synced_offset, 1600);
    CHECK(s.syncs < 1600);
    printf("group commit: 1600 records, %" PRId64 " syncs\n", s.syncs);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
}

/*
 * After syncs of one record each, appends go through pwrite(). Records of
 * every size (with and without keys, across pages and a roll) read back
 * the same from this handle, from a read-only handle, and after a
 * reopen, whose recovery finds every record intact.
 */
static void test_small_syncs_append_by_write(void)
{
    char path[300];
    mqs_seglog_t *log, *reader;
    mqs_seglog_stats_t s;
    mqs_seglog_record_t r;
    mqs_seglog_recovery_t report;
    mqs_seglog_config_t ro = config(65536, MQS_SEGLOG_FSYNC_ALWAYS);
    static const uint32_t sizes[] = {0, 1, 7, 100, 4000, 5000, 9000};
    const int n = 140;

    log_dir(path, sizeof path, "bywrite");
    log = open_log(path, config(65536, MQS_SEGLOG_FSYNC_ALWAYS), NULL);
    for (int i = 0; i < n; i++) {
        int64_t offset = append_sized(log, sizes[i % 7], i);
        CHECK_EQ(offset, i);
        CHECK_EQ(mqs_seglog_sync(log, offset + 1), MQS_OK);
    }
    mqs_seglog_get_stats(log, &s);
    CHECK_EQ(s.appended_records, n);
    /* The first dozen rounds bring the average below the threshold. */
    CHECK(s.records_by_write >= n - 20);
    CHECK(s.segments >= 2);
    ro.readonly = 1;
    reader = open_log(path, ro, NULL);
    for (int i = 0; i < n; i++) {
        CHECK_EQ(mqs_seglog_read(log, i, &r), MQS_OK);
        CHECK(value_matches(&r, sizes[i % 7], i));
        CHECK_EQ(r.timestamp_ns, 1000 + i);
        CHECK_EQ(mqs_seglog_read(reader, i, &r), MQS_OK);
        CHECK(value_matches(&r, sizes[i % 7], i));
    }
    CHECK_EQ(mqs_seglog_close(reader), MQS_OK);
    /* A keyed record written the same way. */
    CHECK_EQ(append_text(log, "key", "keyed value", 77), n);
    CHECK_EQ(mqs_seglog_sync(log, n + 1), MQS_OK);
    mqs_seglog_get_stats(log, &s);
    CHECK(s.records_by_write >= n - 19);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);

    log = open_log(path, config(65536, MQS_SEGLOG_FSYNC_ALWAYS), &report);
    CHECK_EQ(report.first_bad_offset, -1);
    CHECK_EQ(report.bytes_zeroed, 0);
    for (int i = 0; i < n; i++) {
        CHECK_EQ(mqs_seglog_read(log, i, &r), MQS_OK);
        CHECK(value_matches(&r, sizes[i % 7], i));
    }
    CHECK_EQ(mqs_seglog_read(log, n, &r), MQS_OK);
    CHECK_EQ(r.key_len, 3);
    CHECK(memcmp(r.key, "key", 3) == 0);
    CHECK(memcmp(r.value, "keyed value", 11) == 0);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
}

/* Appends between rare syncs ("interval" at full speed) keep to stores. */
static void test_large_syncs_append_by_store(void)
{
    char path[300];
    mqs_seglog_t *log;
    mqs_seglog_stats_t s;

    log_dir(path, sizeof path, "bystore");
    log = open_log(path, config(1 << 20, MQS_SEGLOG_FSYNC_NEVER), NULL);
    for (int round = 0; round < 20; round++) {
        for (int i = 0; i < 100; i++)
            append_sized(log, 50, round * 100 + i);
        CHECK_EQ(mqs_seglog_sync(log, -1), MQS_OK);
    }
    mqs_seglog_get_stats(log, &s);
    CHECK_EQ(s.appended_records, 2000);
    CHECK_EQ(s.records_by_write, 0);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
}

/*
 * The leader of a sync waits for the threads that synced in the last two
 * rounds, not for as many threads as the last sync had. Thread A syncs
 * alone while B and C queue behind it. The next sync, led by B or C,
 * waits for A's next record (A appends it 0.5 ms after its sync), so it
 * covers four records. A leader that counted A as the one caller of the
 * last round would not wait, and its sync would cover three. A, whose
 * arrival completes the group, runs that sync itself. A thread can miss
 * the wait (2 ms at most here) on a busy machine, so the scenario runs
 * up to five times and one four-record sync suffices.
 */
typedef struct gather_state {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int syncs;                      /* hook calls of phase 0 */
    int first_held;                 /* the first sync waits in its hook */
    int released;
    int64_t covered[8];
    pthread_t ran[8];               /* the thread that ran each sync */
} gather_state_t;

static int gather_hook(void *ctx, int64_t end_offset, int phase)
{
    gather_state_t *g = ctx;

    if (phase != 0)
        return 0;
    pthread_mutex_lock(&g->mu);
    if (g->syncs < 8) {
        g->covered[g->syncs] = end_offset;
        g->ran[g->syncs] = pthread_self();
    }
    g->syncs++;
    if (g->syncs == 1) {
        g->first_held = 1;
        pthread_cond_broadcast(&g->cv);
        while (!g->released)
            pthread_cond_wait(&g->cv, &g->mu);
    }
    pthread_mutex_unlock(&g->mu);
    return 0;
}

static void test_sync_waits_for_recent_callers(void)
{
    int best = 0, run_by_last = 0;

    for (int attempt = 0; attempt < 5 && best < 4; attempt++) {
        char path[300], name[32];
        mqs_seglog_t *log;
        pthread_mutex_t append_mu = PTHREAD_MUTEX_INITIALIZER;
        gather_state_t g = {.syncs = 0};
        pthread_t threads[3];
        group_arg_t args[3];

        snprintf(name, sizeof name, "gather%d", attempt);
        log_dir(path, sizeof path, name);
        pthread_mutex_init(&g.mu, NULL);
        pthread_cond_init(&g.cv, NULL);
        log = open_log(path, config(65536, MQS_SEGLOG_FSYNC_ALWAYS), NULL);
        /* No thread synced yet: a caller would lead without gathering. */
        CHECK_EQ(mqs_seglog_sync_starts_now(log), 1);
        mqs_seglog_set_sync_hook(log, gather_hook, &g);
        for (int t = 0; t < 3; t++)
            args[t] = (group_arg_t){log, &append_mu, t == 0 ? 2 : 1, 500, 0};
        pthread_create(&threads[0], NULL, group_appender, &args[0]);
        pthread_mutex_lock(&g.mu);
        while (!g.first_held)
            pthread_cond_wait(&g.cv, &g.mu);
        pthread_mutex_unlock(&g.mu);
        /* A sync runs: a caller would wait for it. */
        CHECK_EQ(mqs_seglog_sync_starts_now(log), 0);
        pthread_create(&threads[1], NULL, group_appender, &args[1]);
        pthread_create(&threads[2], NULL, group_appender, &args[2]);
        /* B and C append and queue behind A's sync. */
        usleep(100 * 1000);
        pthread_mutex_lock(&g.mu);
        g.released = 1;
        pthread_cond_broadcast(&g.cv);
        pthread_mutex_unlock(&g.mu);
        for (int t = 0; t < 3; t++) {
            pthread_join(threads[t], NULL);
            CHECK_EQ(args[t].errors, 0);
        }
        CHECK_EQ(g.covered[0], 1);
        CHECK(g.syncs >= 2);
        /* Three threads synced in the last rounds: a caller would lead
         * and gather them. */
        CHECK_EQ(mqs_seglog_sync_starts_now(log), 0);
        if (g.syncs >= 2 && g.covered[1] > best)
            best = (int)g.covered[1];
        if (g.syncs >= 2 && g.covered[1] == 4)
            run_by_last = pthread_equal(g.ran[0], threads[0]) &&
                          pthread_equal(g.ran[1], threads[0]);
        mqs_seglog_set_sync_hook(log, NULL, NULL);
        CHECK_EQ(mqs_seglog_close(log), MQS_OK);
        pthread_cond_destroy(&g.cv);
        pthread_mutex_destroy(&g.mu);
    }
    printf("gather: the second sync covered %d records\n", best);
    CHECK_EQ(best, 4);
    CHECK(run_by_last);
}

/*
 * Group commit over many rounds: 4 threads append and sync 100 records
 * each while every sync takes 1 ms (a slow disk, by the hook), so a
 * leader waits up to 2 ms for the group. The arrival that completes a
 * group runs its sync. A leader whose group was taken over must leave
 * the gathering state alone when it wakes, because it belongs to the
 * next leader by then. Clearing it made about 40% of the later gathers
 * run out of time (4 Python threads on a log broker). The bounds leave
 * room for threads that a busy machine holds back for 2 ms.
 */
/* A sync hook that sleeps *(int *)ctx microseconds before the I/O. */
static int sleepy_sync_hook(void *ctx, int64_t end_offset, int phase)
{
    (void)end_offset;
    if (phase == 0)
        usleep((useconds_t)*(int *)ctx);
    return 0;
}

/* 4 threads append and sync `per_thread` records each while every sync
 * takes `sync_us`; return the log's stats and close it. */
static mqs_seglog_stats_t run_slow_group(const char *name, int sync_us,
                                         int per_thread)
{
    char path[300];
    mqs_seglog_t *log;
    mqs_seglog_stats_t s;
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_t threads[4];
    group_arg_t args[4];

    log_dir(path, sizeof path, name);
    log = open_log(path, config(1 << 20, MQS_SEGLOG_FSYNC_ALWAYS), NULL);
    mqs_seglog_set_sync_hook(log, sleepy_sync_hook, &sync_us);
    for (int t = 0; t < 4; t++) {
        args[t] = (group_arg_t){log, &mu, per_thread, 0, 0};
        pthread_create(&threads[t], NULL, group_appender, &args[t]);
    }
    for (int t = 0; t < 4; t++) {
        pthread_join(threads[t], NULL);
        CHECK_EQ(args[t].errors, 0);
    }
    mqs_seglog_set_sync_hook(log, NULL, NULL);
    mqs_seglog_get_stats(log, &s);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
    return s;
}

static void test_group_commit_taken_over(void)
{
    mqs_seglog_stats_t s = run_slow_group("takeover", 1000, 100);

    printf("takeover: 400 records, %" PRId64 " syncs, %" PRId64
           " taken over, %" PRId64 " gathers out of time\n",
           s.syncs, s.syncs_taken_over, s.gather_timeouts);
    CHECK_EQ(s.synced_offset, 400);
    CHECK(s.syncs < 200);
    CHECK(s.syncs_taken_over * 2 >= s.syncs);
    CHECK(s.gather_timeouts * 5 <= s.syncs);
}

/*
 * Group commit when each sync takes longer than a leader gathers (3 ms
 * against 2 ms), so the gathering leader's deadline passes while the
 * arrival that took its sync over runs it. The leader was counted as an
 * arrival when it called, and must not be counted again when it goes
 * back to wait. The second count made the next leader's group look
 * complete one arrival early, and 4 threads got fewer than 3 records per
 * sync instead of 4. The bound leaves room for threads that a busy
 * machine holds back for 2 ms.
 */
static void test_group_commit_slow_syncs(void)
{
    mqs_seglog_stats_t s = run_slow_group("slowsync", 3000, 80);

    printf("slow syncs: 320 records, %" PRId64 " syncs, %" PRId64
           " taken over\n", s.syncs, s.syncs_taken_over);
    CHECK_EQ(s.synced_offset, 320);
    /* At least 3.33 records per sync. */
    CHECK(s.syncs * 10 <= 320 * 3);
}

/*
 * A leader must see that its group was taken over even when a later
 * group was taken over too before it woke. Leader L gathers, and A's
 * arrival takes L's sync (S1) over. A signal handler keeps L while S1
 * runs and ends and the next group gathers. B or M takes that group's
 * sync (S2) over, and L wakes after its deadline. A leader that compared
 * its gather with the last one taken over counted that as a timeout of
 * its own gather. It then ran a sync next to S2, although S1 had covered
 * its record. The hook counts the syncs in progress. A must arrive
 * within L's gather (2 ms), so the scenario runs up to ten times and
 * counts only the runs where A took S1 over.
 */
typedef struct stale_state {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    mqs_seglog_t *log;
    pthread_mutex_t append_mu;
    pthread_t leader, taker;
    int syncs;                      /* hook calls of phase 0 */
    int running, max_running;       /* syncs between phases 0 and 1 */
    int leader_waits;               /* L is in its second sync call */
    int s1_held;                    /* A runs S1 and L is held */
    int s1_released;
    int s2_started;
    int errors;
} stale_state_t;

static _Atomic int leader_held;
static sem_t leader_thaw;

static void hold_leader(int signo)
{
    int saved = errno;

    (void)signo;
    atomic_store(&leader_held, 1);
    while (sem_wait(&leader_thaw) != 0 && errno == EINTR)
        ;
    errno = saved;
}

static int stale_hook(void *ctx, int64_t end_offset, int phase)
{
    stale_state_t *s = ctx;
    int number, taken;

    (void)end_offset;
    pthread_mutex_lock(&s->mu);
    if (phase != 0) {
        s->running--;
        pthread_mutex_unlock(&s->mu);
        return 0;
    }
    number = ++s->syncs;
    if (++s->running > s->max_running)
        s->max_running = s->running;
    /* S1 is taken over when A runs it while L waits for it. */
    taken = number == 3 && s->leader_waits &&
            pthread_equal(pthread_self(), s->taker);
    pthread_mutex_unlock(&s->mu);
    if (number <= 2) {
        /* The warm-up syncs: 2 ms each, so that a leader gathers for
         * the longest time (2 ms). */
        usleep(2000);
    } else if (taken) {
        /* S1, taken over by A: hold L, then hold S1 until the main
         * thread has M and B waiting. */
        pthread_kill(s->leader, SIGUSR1);
        while (!atomic_load(&leader_held))
            usleep(100);
        pthread_mutex_lock(&s->mu);
        s->s1_held = 1;
        pthread_cond_broadcast(&s->cv);
        while (!s->s1_released)
            pthread_cond_wait(&s->cv, &s->mu);
        pthread_mutex_unlock(&s->mu);
    } else if (number == 4 && s->s1_held) {
        /* S2: let L go, and keep S2 running while L decides. */
        pthread_mutex_lock(&s->mu);
        s->s2_started = 1;
        pthread_mutex_unlock(&s->mu);
        sem_post(&leader_thaw);
        usleep(30000);
    }
    return 0;
}

static void stale_append_sync(stale_state_t *s)
{
    mqs_seglog_entry_t e = {.value = "0123456789", .value_len = 10};
    int64_t offset;
    int rc;

    pthread_mutex_lock(&s->append_mu);
    rc = mqs_seglog_append(s->log, &e, 1, &offset);
    pthread_mutex_unlock(&s->append_mu);
    if (rc != MQS_OK || mqs_seglog_sync(s->log, offset + 1) != MQS_OK) {
        pthread_mutex_lock(&s->mu);
        s->errors++;
        pthread_mutex_unlock(&s->mu);
    }
}

/* The end offset, or the synced one. Under the append mutex, because the
 * stats read the appender's fields without a lock. */
static int64_t stale_end_offset(stale_state_t *s, int synced)
{
    mqs_seglog_stats_t stats;

    pthread_mutex_lock(&s->append_mu);
    mqs_seglog_get_stats(s->log, &stats);
    pthread_mutex_unlock(&s->append_mu);
    return synced ? stats.synced_offset : stats.end_offset;
}

static void *stale_middle(void *p)
{
    stale_append_sync(p);
    return NULL;
}

/* L: sync alone first, then once more after A's first sync. */
static void *stale_leader(void *p)
{
    stale_state_t *s = p;

    stale_append_sync(s);
    while (stale_end_offset(s, 1) < 2)
        usleep(50);
    pthread_mutex_lock(&s->mu);
    s->leader_waits = 1;
    pthread_mutex_unlock(&s->mu);
    stale_append_sync(s);
    pthread_mutex_lock(&s->mu);
    s->leader_waits = 0;
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* A: sync alone after L, then arrive 0.3 ms after L's second record,
 * while L gathers, and once more after that sync. */
static void *stale_taker(void *p)
{
    stale_state_t *s = p;

    while (stale_end_offset(s, 1) < 1)
        usleep(50);
    stale_append_sync(s);
    while (stale_end_offset(s, 0) < 3)
        usleep(50);
    usleep(300);
    stale_append_sync(s);
    stale_append_sync(s);
    return NULL;
}

/* B: arrive when that completes the group of S2's leader. */
static void *stale_completer(void *p)
{
    stale_state_t *s = p;

    for (int i = 0; i < 200000; i++) {
        if (mqs_seglog_sync_starts_now(s->log))
            break;
        pthread_mutex_lock(&s->mu);
        int started = s->s2_started;
        pthread_mutex_unlock(&s->mu);
        if (started)
            break;
        usleep(1);
    }
    stale_append_sync(s);
    return NULL;
}

static void test_takeover_seen_after_later_takeover(void)
{
    struct sigaction action, old_action;
    int runs = 0, max_running = 0;

    memset(&action, 0, sizeof action);
    action.sa_handler = hold_leader;
    sigemptyset(&action.sa_mask);
    sigaction(SIGUSR1, &action, &old_action);
    for (int attempt = 0; attempt < 10 && runs < 2; attempt++) {
        char path[300], name[32];
        stale_state_t s;
        pthread_t middle, completer;
        mqs_seglog_stats_t stats;

        memset(&s, 0, sizeof s);
        pthread_mutex_init(&s.mu, NULL);
        pthread_cond_init(&s.cv, NULL);
        pthread_mutex_init(&s.append_mu, NULL);
        sem_init(&leader_thaw, 0, 0);
        atomic_store(&leader_held, 0);
        snprintf(name, sizeof name, "stale%d", attempt);
        log_dir(path, sizeof path, name);
        s.log = open_log(path, config(1 << 20, MQS_SEGLOG_FSYNC_ALWAYS),
                         NULL);
        mqs_seglog_set_sync_hook(s.log, stale_hook, &s);

        pthread_mutex_lock(&s.mu);
        pthread_create(&s.leader, NULL, stale_leader, &s);
        pthread_create(&s.taker, NULL, stale_taker, &s);
        pthread_mutex_unlock(&s.mu);
        /* Wait for S1 to be held, or for the run to miss the scenario:
         * L's gather ran out before A arrived. */
        pthread_mutex_lock(&s.mu);
        for (int i = 0; i < 200 && !s.s1_held; i++) {
            pthread_mutex_unlock(&s.mu);
            usleep(1000);
            pthread_mutex_lock(&s.mu);
        }
        int held = s.s1_held;
        pthread_mutex_unlock(&s.mu);
        if (held) {
            pthread_create(&middle, NULL, stale_middle, &s);
            pthread_create(&completer, NULL, stale_completer, &s);
            usleep(20000);
            pthread_mutex_lock(&s.mu);
            s.s1_released = 1;
            pthread_cond_broadcast(&s.cv);
            pthread_mutex_unlock(&s.mu);
            pthread_join(middle, NULL);
            pthread_join(completer, NULL);
        }
        pthread_join(s.leader, NULL);
        pthread_join(s.taker, NULL);
        mqs_seglog_set_sync_hook(s.log, NULL, NULL);
        mqs_seglog_get_stats(s.log, &stats);
        CHECK_EQ(s.errors, 0);
        CHECK_EQ(stats.synced_offset, stats.end_offset);
        if (held && s.s2_started && stats.syncs_taken_over >= 2)
            runs++;
        if (s.max_running > max_running)
            max_running = s.max_running;
        CHECK_EQ(mqs_seglog_close(s.log), MQS_OK);
        sem_destroy(&leader_thaw);
        pthread_cond_destroy(&s.cv);
        pthread_mutex_destroy(&s.mu);
        pthread_mutex_destroy(&s.append_mu);
    }
    sigaction(SIGUSR1, &old_action, NULL);
    printf("stale takeover: %d runs of the scenario, at most %d syncs at "
           "once\n", runs, max_running);
    CHECK(runs >= 1);
    CHECK_EQ(max_running, 1);
}

/* ---- recovery ----------------------------------------------------------- */

static void test_recovery_zeroes_garbage_after_tail(void)
{
    char path[300], seg[400];
    mqs_seglog_t *log;
    mqs_seglog_recovery_t rep;
    mqs_seglog_record_t r;
    uint8_t garbage[304];
    int fd;
    uint64_t end;

    log_dir(path, sizeof path, "garbage");
    log = open_log(path, config(65536, MQS_SEGLOG_FSYNC_NEVER), NULL);
    for (int i = 0; i < 10; i++)
        append_sized(log, 40, i);
    CHECK_EQ(mqs_seglog_read(log, 9, &r), MQS_OK);
    end = r.position + 72;   /* 32-byte header + 40 */
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);

    for (size_t i = 0; i < sizeof garbage; i++)
        garbage[i] = (uint8_t)(i * 13 + 1);
    snprintf(seg, sizeof seg, "%s/%020d.seg", path, 0);
    fd = open(seg, O_WRONLY);
    CHECK(pwrite(fd, garbage, sizeof garbage, (off_t)end) ==
          (ssize_t)sizeof garbage);
    close(fd);

    log = open_log(path, config(65536, MQS_SEGLOG_FSYNC_NEVER), &rep);
    CHECK_EQ(rep.torn_segments, 1);
    CHECK_EQ(rep.bytes_zeroed, 304);
    CHECK_EQ(rep.records_dropped, 0);
    CHECK_EQ(rep.first_bad_offset, 10);
    CHECK_EQ(mqs_seglog_read(log, 9, &r), MQS_OK);
    CHECK_EQ(append_text(log, NULL, "next", 1), 10);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);

    /* Idempotent: a second recovery finds nothing to do. */
    log = open_log(path, config(65536, MQS_SEGLOG_FSYNC_NEVER), &rep);
    CHECK_EQ(rep.torn_segments, 0);
    CHECK_EQ(rep.bytes_zeroed, 0);
    CHECK_EQ(mqs_seglog_read(log, 10, &r), MQS_OK);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
}

/* Write ten 40-byte records with `mode`, close, and flip a bit in the
 * value of record 5. */
static void write_ten_and_flip_5(const char *path, int mode)
{
    char seg[400];
    mqs_seglog_t *log;
    mqs_seglog_record_t r;
    uint64_t pos5;
    uint8_t byte;
    int fd;

    log = open_log(path, config(65536, mode), NULL);
    for (int i = 0; i < 10; i++)
        append_sized(log, 40, i);
    CHECK_EQ(mqs_seglog_read(log, 5, &r), MQS_OK);
    pos5 = r.position;
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);

    snprintf(seg, sizeof seg, "%s/%020d.seg", path, 0);
    fd = open(seg, O_RDWR);
    CHECK(pread(fd, &byte, 1, (off_t)pos5 + 40) == 1);
    byte ^= 0x10;
    CHECK(pwrite(fd, &byte, 1, (off_t)pos5 + 40) == 1);
    close(fd);
}

static void test_recovery_cuts_at_flipped_bit(void)
{
    char path[300], point[400];
    mqs_seglog_t *log;
    mqs_seglog_recovery_t rep;
    mqs_seglog_record_t r;

    log_dir(path, sizeof path, "flip");
    write_ten_and_flip_5(path, MQS_SEGLOG_FSYNC_NEVER);
    /* Without the recovery point a clean close writes, the log looks
     * like one whose writer crashed: the damage ends it. */
    snprintf(point, sizeof point, "%s/recovery-point", path);
    CHECK_EQ(unlink(point), 0);

    log = open_log(path, config(65536, MQS_SEGLOG_FSYNC_NEVER), &rep);
    CHECK_EQ(rep.torn_segments, 1);
    CHECK_EQ(rep.first_bad_offset, 5);
    CHECK_EQ(rep.records_dropped, 5);   /* the damaged one and four after */
    CHECK_EQ(rep.bytes_zeroed, 5 * 72);
    CHECK_EQ(mqs_seglog_read(log, 4, &r), MQS_OK);
    CHECK_EQ(mqs_seglog_read(log, 5, &r), MQS_EEMPTY);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
}

/* After a clean close, in every mode, damage below the recorded end is
 * damage: the record fails its read and the records after it stay. */
static void test_recovery_keeps_records_after_damage(void)
{
    static const int modes[] = {MQS_SEGLOG_FSYNC_NEVER,
                                MQS_SEGLOG_FSYNC_INTERVAL,
                                MQS_SEGLOG_FSYNC_ALWAYS};
    char path[300], name[32];
    mqs_seglog_t *log;
    mqs_seglog_recovery_t rep;
    mqs_seglog_record_t r;

    for (size_t m = 0; m < sizeof modes / sizeof modes[0]; m++) {
        snprintf(name, sizeof name, "keep%d", modes[m]);
        log_dir(path, sizeof path, name);
        write_ten_and_flip_5(path, modes[m]);

        log = open_log(path, config(65536, modes[m]), &rep);
        CHECK_EQ(rep.torn_segments, 0);
        CHECK_EQ(rep.records_dropped, 0);
        CHECK_EQ(rep.ended_before_checkpoint, 0);
        CHECK_EQ(rep.checkpoint_offset, 0);
        CHECK_EQ(mqs_seglog_read(log, 5, &r), MQS_ECORRUPT);
        CHECK_EQ(mqs_seglog_read(log, 6, &r), MQS_OK);
        CHECK_EQ(mqs_seglog_read(log, 9, &r), MQS_OK);
        CHECK_EQ(append_text(log, NULL, "next", 1), 10);
        CHECK_EQ(mqs_seglog_close(log), MQS_OK);
    }
}

/* ---- resync after a damaged length ------------------------------------ */

#define RESYNC_RECORDS 20
#define RESYNC_VALUE 40                 /* 72-byte records */
#define RESYNC_STRIDE 72

/* Write RESYNC_RECORDS records of RESYNC_VALUE bytes (record i at
 * MQS_SEGLOG_HEADER_BYTES + i * RESYNC_STRIDE) and close cleanly. */
static void write_resync_log(const char *path)
{
    mqs_seglog_t *log = open_log(path, config(65536, MQS_SEGLOG_FSYNC_ALWAYS),
                                 NULL);

    for (int i = 0; i < RESYNC_RECORDS; i++)
        CHECK_EQ(append_sized(log, RESYNC_VALUE, i), i);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
}

static uint64_t resync_position(int64_t offset)
{
    return MQS_SEGLOG_HEADER_BYTES + (uint64_t)offset * RESYNC_STRIDE;
}

/* Overwrite `n` bytes at `pos` of segment `base` of the log at `path`. */
static void overwrite(const char *path, int64_t base, uint64_t pos,
                      const void *bytes, size_t n)
{
    char seg[400];
    int fd;

    snprintf(seg, sizeof seg, "%s/%020" PRId64 ".seg", path, base);
    fd = open(seg, O_RDWR);
    CHECK(fd >= 0);
    CHECK(pwrite(fd, bytes, n, (off_t)pos) == (ssize_t)n);
    close(fd);
}

static void damage_length(const char *path, int64_t offset, uint32_t length)
{
    overwrite(path, 0, resync_position(offset), &length, sizeof length);
}

/* Every offset in [0, end) but those in `damaged` (a -1 terminated list)
 * reads back as written; the damaged ones return MQS_ECORRUPT. */
static void check_reads(mqs_seglog_t *log, int64_t end,
                        const int64_t *damaged)
{
    mqs_seglog_record_t r;

    for (int64_t i = 0; i < end; i++) {
        int is_damaged = 0;
        for (const int64_t *d = damaged; *d >= 0; d++)
            is_damaged |= *d == i;
        if (is_damaged) {
            CHECK_EQ(mqs_seglog_read(log, i, &r), MQS_ECORRUPT);
            continue;
        }
        CHECK_EQ(mqs_seglog_read(log, i, &r), MQS_OK);
        CHECK_EQ(r.offset, i);
        CHECK(value_matches(&r, RESYNC_VALUE, i));
    }
}

static void test_resync_keeps_records_after_damaged_length(void)
{
    static const int64_t damaged[] = {5, -1};
    char path[300];
    mqs_seglog_t *log;
    mqs_seglog_recovery_t rep;
    mqs_seglog_stats_t st;
    mqs_seglog_record_t r;
    mqs_segment_t *seg = NULL;
    int64_t count = 0, found = -1;

    log_dir(path, sizeof path, "resync-middle");
    write_resync_log(path);
    /* Inside the next record: the walk by lengths goes astray. */
    damage_length(path, 5, RESYNC_STRIDE + 8);

    for (int pass = 0; pass < 2; pass++) {
        log = open_log(path, config(65536, MQS_SEGLOG_FSYNC_ALWAYS), &rep);
        CHECK_EQ(rep.ended_before_checkpoint, 0);
        CHECK_EQ(rep.torn_segments, 0);
        CHECK_EQ(rep.damaged_ranges, 1);
        CHECK_EQ(rep.records_skipped, 1);
        CHECK_EQ(rep.first_skipped_offset, 5);
        CHECK_EQ(rep.first_skipped_base, 0);
        CHECK_EQ(rep.first_skipped_position, resync_position(5));
        mqs_seglog_get_stats(log, &st);
        CHECK_EQ(st.end_offset, RESYNC_RECORDS + pass);
        check_reads(log, RESYNC_RECORDS, damaged);
        /* A batch stops before the damaged record; one after it starts
         * at the record that ends the gap. */
        CHECK_EQ(mqs_seglog_read_batch(log, 3, 100, NULL, NULL, NULL, NULL,
                                       NULL, &count, &seg),
                 MQS_OK);
        CHECK_EQ(count, 2);
        CHECK_EQ(mqs_seglog_read_batch(log, 5, 100, NULL, NULL, NULL, NULL,
                                       NULL, &count, &seg),
                 MQS_ECORRUPT);
        CHECK_EQ(mqs_seglog_read_batch(log, 6, 100, NULL, NULL, NULL, NULL,
                                       NULL, &count, &seg),
                 MQS_OK);
        CHECK_EQ(count, RESYNC_RECORDS + pass - 6);
        /* The damaged record's timestamp (1005) is unknown. */
        CHECK_EQ(mqs_seglog_find_time(log, 1005, &found), MQS_OK);
        CHECK_EQ(found, 6);
        if (pass == 0)
            CHECK_EQ(append_sized(log, RESYNC_VALUE, RESYNC_RECORDS),
                     RESYNC_RECORDS);
        CHECK_EQ(mqs_seglog_read(log, RESYNC_RECORDS, &r), MQS_OK);
        CHECK(value_matches(&r, RESYNC_VALUE, RESYNC_RECORDS));
        CHECK_EQ(mqs_seglog_close(log), MQS_OK);
    }

    {
        mqs_seglog_config_t c = config(65536, MQS_SEGLOG_FSYNC_ALWAYS);
        c.readonly = 1;
        log = open_log(path, c, &rep);
        CHECK_EQ(rep.records_skipped, 1);
        check_reads(log, RESYNC_RECORDS + 1, damaged);
        CHECK_EQ(mqs_seglog_close(log), MQS_OK);
    }
}

static void test_resync_damaged_last_record(void)
{
    static const int64_t damaged[] = {RESYNC_RECORDS - 1, -1};
    char path[300];
    mqs_seglog_t *log;
    mqs_seglog_recovery_t rep;
    mqs_seglog_stats_t st;

    log_dir(path, sizeof path, "resync-last");
    write_resync_log(path);
    damage_length(path, RESYNC_RECORDS - 1, 0x00ffffff);

    log = open_log(path, config(65536, MQS_SEGLOG_FSYNC_ALWAYS), &rep);
    CHECK_EQ(rep.ended_before_checkpoint, 0);
    CHECK_EQ(rep.records_skipped, 1);
    CHECK_EQ(rep.first_skipped_offset, RESYNC_RECORDS - 1);
    mqs_seglog_get_stats(log, &st);
    CHECK_EQ(st.end_offset, RESYNC_RECORDS);
    check_reads(log, RESYNC_RECORDS, damaged);
    CHECK_EQ(append_sized(log, RESYNC_VALUE, RESYNC_RECORDS), RESYNC_RECORDS);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
}

static void test_resync_two_damaged_records(void)
{
    static const int64_t damaged[] = {5, 12, 13, -1};
    uint64_t garbage = 0x0123456789abcdefull;
    char path[300];
    mqs_seglog_t *log;
    mqs_seglog_recovery_t rep;
    mqs_seglog_stats_t st;

    log_dir(path, sizeof path, "resync-two");
    write_resync_log(path);
    damage_length(path, 5, 40);
    /* Records 12 and 13 damaged together: one range of two offsets, the
     * first with garbage for its length and offset. */
    overwrite(path, 0, resync_position(12), &garbage, sizeof garbage);
    overwrite(path, 0, resync_position(12) + 8, &garbage, sizeof garbage);
    damage_length(path, 13, 0);

    log = open_log(path, config(65536, MQS_SEGLOG_FSYNC_ALWAYS), &rep);
    CHECK_EQ(rep.ended_before_checkpoint, 0);
    CHECK_EQ(rep.damaged_ranges, 2);
    CHECK_EQ(rep.records_skipped, 3);
    CHECK_EQ(rep.first_skipped_offset, 5);
    mqs_seglog_get_stats(log, &st);
    CHECK_EQ(st.end_offset, RESYNC_RECORDS);
    check_reads(log, RESYNC_RECORDS, damaged);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
}

/* Without a recovery point the damage ends the log, as after a crash. */
static void test_resync_needs_recovery_point(void)
{
    char path[300], point[400];
    mqs_seglog_t *log;
    mqs_seglog_recovery_t rep;
    mqs_seglog_record_t r;

    log_dir(path, sizeof path, "resync-no-point");
    write_resync_log(path);
    damage_length(path, 5, RESYNC_STRIDE + 8);
    snprintf(point, sizeof point, "%s/recovery-point", path);
    CHECK_EQ(unlink(point), 0);

    log = open_log(path, config(65536, MQS_SEGLOG_FSYNC_ALWAYS), &rep);
    CHECK_EQ(rep.records_skipped, 0);
    CHECK_EQ(rep.damaged_ranges, 0);
    CHECK_EQ(rep.torn_segments, 1);
    CHECK_EQ(rep.first_bad_offset, 5);
    CHECK_EQ(mqs_seglog_read(log, 4, &r), MQS_OK);
    CHECK_EQ(mqs_seglog_read(log, 6, &r), MQS_EEMPTY);
    CHECK_EQ(append_sized(log, RESYNC_VALUE, 5), 5);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
}

/*
 * Records copied from another log have this layout but another CRC seed,
 * so they never resume a walk. With a recovery point of the first 32
 * bytes only (no next_offset), nothing resynchronizes, and the segment
 * is cut at the damage as before.
 */
static void test_resync_rejects_foreign_records(void)
{
    char path[300], other[300], point[400], other_seg[400];
    uint8_t bytes[RESYNC_RECORDS * RESYNC_STRIDE];
    mqs_seglog_t *log;
    mqs_seglog_recovery_t rep;
    mqs_seglog_stats_t st;
    mqs_seglog_record_t r;
    int fd;

    log_dir(path, sizeof path, "resync-foreign");
    log_dir(other, sizeof other, "resync-foreign-source");
    write_resync_log(path);
    write_resync_log(other);
    snprintf(other_seg, sizeof other_seg, "%s/%020d.seg", other, 0);
    fd = open(other_seg, O_RDONLY);
    CHECK(fd >= 0);
    CHECK(pread(fd, bytes, sizeof bytes, MQS_SEGLOG_HEADER_BYTES) ==
          (ssize_t)sizeof bytes);
    close(fd);
    /* Records 6 and later come from the other log, and 5 has a bad
     * length. */
    overwrite(path, 0, resync_position(6), bytes + 6 * RESYNC_STRIDE,
              (RESYNC_RECORDS - 6) * RESYNC_STRIDE);
    damage_length(path, 5, 0xfffff);

    /* With next_offset recorded, offsets 5 to 19 are known and read as
     * damaged; no foreign record is returned. */
    log = open_log(path, config(65536, MQS_SEGLOG_FSYNC_ALWAYS), &rep);
    CHECK_EQ(rep.damaged_ranges, 1);
    CHECK_EQ(rep.records_skipped, RESYNC_RECORDS - 5);
    mqs_seglog_get_stats(log, &st);
    CHECK_EQ(st.end_offset, RESYNC_RECORDS);
    for (int64_t i = 5; i < RESYNC_RECORDS; i++)
        CHECK_EQ(mqs_seglog_read(log, i, &r), MQS_ECORRUPT);
    mqs_seglog_abandon(log);    /* keep the recovery point as it was */

    snprintf(point, sizeof point, "%s/recovery-point", path);
    CHECK_EQ(truncate(point, 32), 0);
    log = open_log(path, config(65536, MQS_SEGLOG_FSYNC_ALWAYS), &rep);
    CHECK_EQ(rep.records_skipped, 0);
    CHECK_EQ(rep.ended_before_checkpoint, 1);
    CHECK_EQ(rep.first_bad_offset, 5);
    CHECK_EQ(rep.records_dropped, 0);
    mqs_seglog_get_stats(log, &st);
    CHECK_EQ(st.end_offset, 5);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
}

/* A sealed segment resynchronizes with its seal on its first read. */
static void test_resync_sealed_segment(void)
{
    static const int64_t damaged[] = {5, -1};
    char path[300];
    mqs_seglog_t *log;
    mqs_seglog_stats_t st;

    log_dir(path, sizeof path, "resync-sealed");
    log = open_log(path, config(65536, MQS_SEGLOG_FSYNC_ALWAYS), NULL);
    for (int i = 0; i < RESYNC_RECORDS; i++)
        append_sized(log, RESYNC_VALUE, i);
    CHECK_EQ(mqs_seglog_roll(log), MQS_OK);
    append_sized(log, RESYNC_VALUE, RESYNC_RECORDS);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
    damage_length(path, 5, 0);

    log = open_log(path, config(65536, MQS_SEGLOG_FSYNC_ALWAYS), NULL);
    mqs_seglog_get_stats(log, &st);
    CHECK_EQ(st.end_offset, RESYNC_RECORDS + 1);
    check_reads(log, RESYNC_RECORDS + 1, damaged);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
}

/* A failed write of the recovery point fails the close with MQS_EIO and
 * its errno; the records stay, and the next open verifies them. */
static void test_close_reports_recovery_point_failure(void)
{
    static const int64_t none[] = {-1};
    char path[300], temp[400];
    mqs_seglog_t *log;
    mqs_seglog_recovery_t rep;
    int os_errno = 0;

    log_dir(path, sizeof path, "close-eio");
    log = open_log(path, config(65536, MQS_SEGLOG_FSYNC_ALWAYS), NULL);
    for (int i = 0; i < 5; i++)
        append_sized(log, RESYNC_VALUE, i);
    /* The temporary file cannot be created over a directory, root or
     * not. */
    snprintf(temp, sizeof temp, "%s/recovery-point.tmp", path);
    CHECK_EQ(mkdir(temp, 0700), 0);
    CHECK_EQ(mqs_seglog_close_errno(log, &os_errno), MQS_EIO);
    CHECK_EQ(os_errno, EISDIR);
    CHECK_EQ(rmdir(temp), 0);

    log = open_log(path, config(65536, MQS_SEGLOG_FSYNC_ALWAYS), &rep);
    CHECK_EQ(rep.checkpoint_offset, -1);
    CHECK_EQ(rep.records_verified, 5);
    check_reads(log, 5, none);
    CHECK_EQ(mqs_seglog_close_errno(log, &os_errno), MQS_OK);
    CHECK_EQ(os_errno, 0);
}

static void test_open_rejects_newer_version(void)
{
    char path[300], seg[400];
    mqs_seglog_t *log = NULL;
    mqs_seglog_config_t c = config(65536, MQS_SEGLOG_FSYNC_NEVER);
    uint32_t version = MQS_SEGLOG_VERSION + 1;
    int fd;

    log_dir(path, sizeof path, "version");
    log = open_log(path, c, NULL);
    CHECK_EQ(mqs_seglog_close(log), MQS_OK);
    snprintf(seg, sizeof seg, "%s/%020d.seg", path, 0);
    fd = open(seg, O_WRONLY);
    CHECK(pwrite(fd, &version, 4, MQS_SEGLOG_H_VERSION) == 4);
    close(fd);
    CHECK_EQ(mqs_seglog_open(&log, path, &c, NULL, NULL), MQS_ELOGVERSION);
}

static void test_open_rejects_bad_arguments(void)
{
    char path[300];
    mqs_seglog_t *log = NULL;
    mqs_seglog_config_t c = config(65536, MQS_SEGLOG_FSYNC_NEVER);
    int os_errno = 0;
    int fd;

    c.segment_bytes = 5000;
    CHECK_EQ(mqs_seglog_open(&log, root, &c, NULL, NULL), MQS_EINVAL);
    c = config(65536, 7);
    CHECK_EQ(mqs_seglog_open(&log, root, &c, NULL, NULL), MQS_EINVAL);

    log_dir(path, sizeof path, "a-file");
    fd = open(path, O_CREAT | O_WRONLY, 0600);
    close(fd);
    c = config(65536, MQS_SEGLOG_FSYNC_NEVER);
    CHECK_EQ(mqs_seglog_open(&log, path, &c, NULL, &os_errno), MQS_EIO);
    CHECK_EQ(os_errno, ENOTDIR);
}

/* The toucher hook. Before every third write of zeros it waits until
 * the appender has appended 300 more records (about 7 MiB), so the
 * appender catches up and writes zeros itself. It also keeps every write
 * in progress a varying short time longer, so the appender often catches
 * up during one and must wait for it. */
static _Atomic int64_t toucher_test_appended;

static void slow_toucher(void *ctx, uint64_t from, uint64_t to, int writing)
{
    _Atomic uint64_t *calls = ctx;
    uint64_t n = atomic_fetch_add(calls, 1);

    (void)from;
    (void)to;
    if (writing) {
        usleep((useconds_t)(n * 7919 % 2000));
    } else if (n % 3 == 0) {
        int64_t goal = atomic_load(&toucher_test_appended) + 300;
        for (int i = 0; i < 5000 && atomic_load(&toucher_test_appended) < goal;
             i++)
            usleep(1000);
    }
}

/* Records of test_toucher_never_overwrites_records that do not read
 * back as written. */
static int toucher_test_damaged(mqs_seglog_t *log, int64_t n)
{
    mqs_seglog_record_t r;
    int bad = 0;

    for (int64_t i = 0; i < n; i++)
        if (mqs_seglog_read(log, i, &r) != MQS_OK ||
            !value_matches(&r, 1 + (uint32_t)((i * 2654435761u) % 49152), i))
            bad++;
    return bad;
}

static void test_toucher_never_overwrites_records(void)
{
    const uint64_t segment = (uint64_t)3 << 20;
    const int modes[] = {MQS_SEGLOG_FSYNC_NEVER, MQS_SEGLOG_FSYNC_INTERVAL};

    for (size_t m = 0; m < sizeof modes / sizeof modes[0]; m++) {
        char path[300];
        mqs_seglog_t *log;
        mqs_seglog_stats_t s;
        _Atomic uint64_t calls = 0;
        int64_t n = 0;

        snprintf(path, sizeof path, "%s/toucher-%zu", root, m);
        log = open_log(path, config(segment, modes[m]), NULL);
        mqs_seglog_set_touch_hook(log, slow_toucher, &calls);
        for (uint64_t written = 0; written < 12 * segment; n++) {
            /* Sizes from 1 byte to 48 KiB: records cross pages and
             * the toucher's chunk boundaries. */
            uint32_t size = 1 + (uint32_t)((n * 2654435761u) % 49152);
            CHECK_EQ(append_sized(log, size, n), n);
            atomic_fetch_add(&toucher_test_appended, 1);
            written += size;
            if (n % 97 == 0)
                usleep(50);
        }
        /* Release a hook still waiting for appends. */
        atomic_fetch_add(&toucher_test_appended, 1000000);
        mqs_seglog_get_stats(log, &s);
        CHECK(s.zeros_by_toucher > 0);
        CHECK(s.zeros_by_appender > 0);
        CHECK(atomic_load(&calls) > 0);
        mqs_seglog_set_touch_hook(log, NULL, NULL);
        CHECK_EQ(toucher_test_damaged(log, n), 0);
        CHECK_EQ(mqs_seglog_close(log), MQS_OK);

        log = open_log(path, config(segment, modes[m]), NULL);
        mqs_seglog_get_stats(log, &s);
        CHECK_EQ(s.end_offset, n);
        CHECK_EQ(toucher_test_damaged(log, n), 0);
        CHECK_EQ(mqs_seglog_close(log), MQS_OK);
    }
}

int main(void)
{
    const char *tmp = getenv("TMPDIR");
    char cmd[300];

    snprintf(root, sizeof root, "%s/mqs-test-seglog-XXXXXX",
             tmp ? tmp : "/tmp");
    if (!mkdtemp(root)) {
        perror("mkdtemp");
        return 2;
    }
    test_crc32c_known_values();
    test_crc32c_hardware_matches_software();
    test_append_read_round_trip();
    test_append_rolls_segments();
    test_append_rejects_record_larger_than_segment();
    test_read_batch_fills_views();
    test_find_time_returns_first_at_or_after();
    test_second_writer_gets_locked();
    test_readonly_handle_follows_writer();
    test_reader_follows_replaced_empty_segment();
    test_retention_unlinks_old_sealed_segments();
    test_zeros_ahead_keep_records_and_size();
    test_toucher_never_overwrites_records();
    test_always_sync_covers_each_record();
    test_group_commit_shares_syncs();
    test_group_commit_taken_over();
    test_group_commit_slow_syncs();
    test_takeover_seen_after_later_takeover();
    test_small_syncs_append_by_write();
    test_large_syncs_append_by_store();
    test_sync_waits_for_recent_callers();
    test_recovery_zeroes_garbage_after_tail();
    test_recovery_cuts_at_flipped_bit();
    test_recovery_keeps_records_after_damage();
    test_resync_keeps_records_after_damaged_length();
    test_resync_damaged_last_record();
    test_resync_two_damaged_records();
    test_resync_needs_recovery_point();
    test_resync_rejects_foreign_records();
    test_resync_sealed_segment();
    test_close_reports_recovery_point_failure();
    test_open_rejects_newer_version();
    test_open_rejects_bad_arguments();

    if (atomic_load(&checks_failed) == 0) {
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
        if (system(cmd) != 0)
            fprintf(stderr, "could not remove %s\n", root);
    } else {
        fprintf(stderr, "files kept in %s\n", root);
    }
    printf("%d passed, %d failed\n", atomic_load(&checks_passed),
           atomic_load(&checks_failed));
    return atomic_load(&checks_failed) ? 1 : 0;
}
