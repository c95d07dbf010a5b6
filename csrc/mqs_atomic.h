/*
 * mqs_atomic.h: status codes, cache-line layout and the atomics every other
 * header uses.
 *
 * Every shared access goes through one of the helpers below, and each
 * helper names its memory order, so a reader sees at the call site which
 * release pairs with which acquire.
 *
 *   one padded counter (MQS_PAD_BYTES = 128):
 *   +------------------+--------------------------------------------+
 *   | int64 value (8)  | padding (120)                              |
 *   +------------------+--------------------------------------------+
 *
 * 128 bytes rather than 64 because the adjacent-line prefetcher on x86
 * pulls cache lines in pairs; two hot counters 64 bytes apart still share
 * traffic.
 */
#ifndef MQS_ATOMIC_H
#define MQS_ATOMIC_H

#include <stdalign.h>
#include <stdatomic.h>
#include <stdint.h>

#define MQS_CACHE_LINE 64
#define MQS_PAD_BYTES 128

/* All statuses: 0 is success, negative values are errors. */
typedef enum mqs_status {
    MQS_OK = 0,
    MQS_EFULL = -1,      /* no room: the slowest consumer gates the claim */
    MQS_EEMPTY = -2,     /* nothing published past the consumer */
    MQS_EINVAL = -3,     /* bad argument: capacity, count or handle */
    MQS_ENOMEM = -4,     /* allocation failed */
    MQS_ETIMEDOUT = -5,  /* a wait reached its deadline */
    MQS_EINTR = -6,      /* a wait ended early so the caller can poll */
    MQS_ECORRUPT = -7,   /* shared state failed a consistency check */
    MQS_ETOOBIG = -8,    /* request larger than the ring */
    MQS_ECLOSED = -9,    /* the ring or queue no longer accepts work */
} mqs_status_t;

/* A 64-bit counter alone on its own 128-byte block. */
typedef struct mqs_padded_i64 {
    alignas(MQS_PAD_BYTES) _Atomic int64_t value;
    char pad[MQS_PAD_BYTES - sizeof(int64_t)];
} mqs_padded_i64_t;

static inline int64_t mqs_load_relaxed_i64(const _Atomic int64_t *p)
{
    return atomic_load_explicit(p, memory_order_relaxed);
}

static inline int64_t mqs_load_acquire_i64(const _Atomic int64_t *p)
{
    return atomic_load_explicit(p, memory_order_acquire);
}

static inline void mqs_store_relaxed_i64(_Atomic int64_t *p, int64_t v)
{
    atomic_store_explicit(p, v, memory_order_relaxed);
}

static inline void mqs_store_release_i64(_Atomic int64_t *p, int64_t v)
{
    atomic_store_explicit(p, v, memory_order_release);
}

static inline int mqs_cas_acq_rel_i64(_Atomic int64_t *p, int64_t *expected,
                                      int64_t desired)
{
    return atomic_compare_exchange_weak_explicit(
        p, expected, desired, memory_order_acq_rel, memory_order_acquire);
}

static inline int64_t mqs_fetch_add_acq_rel_i64(_Atomic int64_t *p,
                                                int64_t v)
{
    return atomic_fetch_add_explicit(p, v, memory_order_acq_rel);
}

static inline int64_t mqs_fetch_add_relaxed_i64(_Atomic int64_t *p,
                                                int64_t v)
{
    return atomic_fetch_add_explicit(p, v, memory_order_relaxed);
}

static inline int mqs_cas_relaxed_i64(_Atomic int64_t *p, int64_t *expected,
                                      int64_t desired)
{
    return atomic_compare_exchange_weak_explicit(
        p, expected, desired, memory_order_relaxed, memory_order_relaxed);
}

static inline uint32_t mqs_load_acquire_u32(const _Atomic uint32_t *p)
{
    return atomic_load_explicit(p, memory_order_acquire);
}

static inline uint32_t mqs_load_seq_cst_u32(const _Atomic uint32_t *p)
{
    return atomic_load_explicit(p, memory_order_seq_cst);
}

static inline void mqs_store_release_u32(_Atomic uint32_t *p, uint32_t v)
{
    atomic_store_explicit(p, v, memory_order_release);
}

static inline uint32_t mqs_fetch_add_seq_cst_u32(_Atomic uint32_t *p,
                                                 uint32_t v)
{
    return atomic_fetch_add_explicit(p, v, memory_order_seq_cst);
}

static inline uint32_t mqs_fetch_sub_seq_cst_u32(_Atomic uint32_t *p,
                                                 uint32_t v)
{
    return atomic_fetch_sub_explicit(p, v, memory_order_seq_cst);
}

static inline void *mqs_load_acquire_ptr(void *_Atomic const *p)
{
    return atomic_load_explicit(p, memory_order_acquire);
}

static inline void mqs_store_release_ptr(void *_Atomic *p, void *v)
{
    atomic_store_explicit(p, v, memory_order_release);
}

static inline void mqs_store_relaxed_ptr(void *_Atomic *p, void *v)
{
    atomic_store_explicit(p, v, memory_order_relaxed);
}

/*
 * Two 64-bit words changed by one compare-and-swap (cmpxchg16b on x86_64,
 * built with -mcx16; a load/store-exclusive pair on aarch64). A position
 * and the count of messages it has passed live in one pair, so no process
 * can die between moving one and updating the other.
 *
 * Each half may be read alone with an ordinary 64-bit atomic load: the
 * CAS changes both at once, so a half read alone is always a value that
 * half really held. Reading both halves with two loads may mix two
 * moments; callers that need both at one instant take them from a CAS.
 */
typedef struct mqs_pair {
    alignas(16) _Atomic int64_t first;
    _Atomic int64_t second;
} mqs_pair_t;

typedef unsigned __int128 mqs_u128_t;

static inline mqs_u128_t mqs_pair_pack(int64_t first, int64_t second)
{
    return (mqs_u128_t)(uint64_t)first
           | ((mqs_u128_t)(uint64_t)second << 64);
}

/*
 * If *p contains (*first, *second), store (new_first, new_second) and
 * return 1. Otherwise load the pair's current value into *first and
 * *second and return 0. A full barrier either way (the __sync builtins
 * are sequentially consistent).
 */
static inline int mqs_pair_cas(mqs_pair_t *p, int64_t *first,
                               int64_t *second, int64_t new_first,
                               int64_t new_second)
{
    mqs_u128_t expected = mqs_pair_pack(*first, *second);
    mqs_u128_t seen = __sync_val_compare_and_swap(
        (mqs_u128_t *)(void *)p, expected,
        mqs_pair_pack(new_first, new_second));

    if (seen == expected)
        return 1;
    *first = (int64_t)(uint64_t)seen;
    *second = (int64_t)(uint64_t)(seen >> 64);
    return 0;
}

/* Load both halves as of one instant, by a CAS that stores the value it
 * finds. */
static inline void mqs_pair_load(mqs_pair_t *p, int64_t *first,
                                 int64_t *second)
{
    *first = atomic_load_explicit(&p->first, memory_order_acquire);
    *second = atomic_load_explicit(&p->second, memory_order_acquire);
    while (!mqs_pair_cas(p, first, second, *first, *second)) {
    }
}

/* Full fence: orders an earlier store before a later load (StoreLoad). */
static inline void mqs_fence_seq_cst(void)
{
    atomic_thread_fence(memory_order_seq_cst);
}

static inline void mqs_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

#endif /* MQS_ATOMIC_H */
