/*
 * mqs_hist.h: a latency histogram that lives in shared memory. Any
 * process records into it with relaxed atomic adds; any process reads it,
 * also through a read-only mapping.
 *
 * Layout (MQS_HIST_BYTES, 8-byte fields):
 *
 *   +--------------+-------+--------+--------+--------------------------+
 *   | sample_every | count | sum_ns | max_ns | buckets[MQS_HIST_BUCKETS] |
 *   +--------------+-------+--------+--------+--------------------------+
 *   0              8       16       24       32
 *
 * Buckets are log-linear, as in HdrHistogram: a value v below
 * 2 * MQS_HIST_SUB_BUCKETS ns has bucket v. Above, each power of two
 * [2^k, 2^(k+1)) splits into MQS_HIST_SUB_BUCKETS equal buckets, so a
 * bucket is at most 1/32 (3.1%) of its values wide. Values clamp to
 * MQS_HIST_MAX_NS (2^42 - 1 ns, about 73 minutes). mqs.metrics
 * (hist_index, hist_upper_ns) mirrors this layout.
 *
 * The fields are updated one by one, so a reader that runs during a
 * record may see the bucket before count or sum: count and sum_ns are
 * exact only when no record is in progress.
 */
#ifndef MQS_HIST_H
#define MQS_HIST_H

#include <stdint.h>

#include "mqs_atomic.h"

#define MQS_HIST_SUB_BUCKETS 32
#define MQS_HIST_SUB_BITS 5
#define MQS_HIST_MAX_NS ((INT64_C(1) << 42) - 1)
/* The linear part (2 * MQS_HIST_SUB_BUCKETS buckets), then
 * MQS_HIST_SUB_BUCKETS buckets for each power of two from 2^6 to 2^41. */
#define MQS_HIST_BUCKETS \
    ((42 - MQS_HIST_SUB_BITS - 1) * MQS_HIST_SUB_BUCKETS \
     + 2 * MQS_HIST_SUB_BUCKETS)

typedef struct mqs_hist {
    _Atomic int64_t sample_every;  /* sample one message in this many;
                                      0 while sampling is off */
    _Atomic int64_t count;
    _Atomic int64_t sum_ns;
    _Atomic int64_t max_ns;
    _Atomic int64_t buckets[MQS_HIST_BUCKETS];
} mqs_hist_t;

#define MQS_HIST_BYTES ((int64_t)sizeof(mqs_hist_t))

/* Bucket of `value_ns`, clamped to [0, MQS_HIST_MAX_NS]. */
static inline int mqs_hist_index(int64_t value_ns)
{
    int bits;
    int shift;
    if (value_ns < 0)
        value_ns = 0;
    if (value_ns > MQS_HIST_MAX_NS)
        value_ns = MQS_HIST_MAX_NS;
    if (value_ns < 2 * MQS_HIST_SUB_BUCKETS)
        return (int)value_ns;
    bits = 64 - __builtin_clzll((unsigned long long)value_ns);
    shift = bits - MQS_HIST_SUB_BITS - 1;
    return (shift + 1) * MQS_HIST_SUB_BUCKETS
           + (int)(value_ns >> shift) - MQS_HIST_SUB_BUCKETS;
}

/*
 * Record one latency. Any thread of any process that maps the histogram
 * writable; lock-free, relaxed order (the fields are statistics and
 * order nothing else).
 */
static inline void mqs_hist_record(mqs_hist_t *hist, int64_t value_ns)
{
    int64_t seen;
    if (value_ns < 0)
        value_ns = 0;
    if (value_ns > MQS_HIST_MAX_NS)
        value_ns = MQS_HIST_MAX_NS;
    mqs_fetch_add_relaxed_i64(&hist->buckets[mqs_hist_index(value_ns)], 1);
    mqs_fetch_add_relaxed_i64(&hist->count, 1);
    mqs_fetch_add_relaxed_i64(&hist->sum_ns, value_ns);
    seen = mqs_load_relaxed_i64(&hist->max_ns);
    while (value_ns > seen
           && !mqs_cas_relaxed_i64(&hist->max_ns, &seen, value_ns)) {
    }
}

/*
 * Zero the counts and buckets (not sample_every). Records made while it
 * runs may be lost or half kept, so callers reset only when sampling is
 * turned off.
 */
static inline void mqs_hist_reset(mqs_hist_t *hist)
{
    int i;
    for (i = 0; i < MQS_HIST_BUCKETS; i++)
        mqs_store_relaxed_i64(&hist->buckets[i], 0);
    mqs_store_relaxed_i64(&hist->count, 0);
    mqs_store_relaxed_i64(&hist->sum_ns, 0);
    mqs_store_relaxed_i64(&hist->max_ns, 0);
}

#endif /* MQS_HIST_H */
