/*
 * mqs_wheel.h: a hierarchical timing wheel for delayed items and
 * redelivery deadlines.
 *
 * Layout of one wheel: one block that the caller allocates, 8-byte
 * aligned. It contains slab indexes but no pointers, so it may live in a
 * shared mapping and may be moved by realloc.
 *
 *   offset                   contents
 *   0                        header, MQS_WHEEL_HEADER_BYTES (4752):
 *                              layout_version, capacity, count, free_head,
 *                              tick_ns, tick_magic, origin_ns, now_ns,
 *                              now_tick, unsorted0, due_unsorted,
 *                              tick_shift1, tick_shift2,
 *                              occupied[MQS_WHEEL_LEVELS]   (bitmaps)
 *                              min_deadline_ns[MQS_WHEEL_LISTS]
 *                              heads[MQS_WHEEL_LISTS]
 *   MQS_WHEEL_HEADER_BYTES   entries[capacity], MQS_WHEEL_ENTRY_BYTES each
 *
 *   one entry (the slab record of one timer):
 *   +-------------+-------------+--------+--------+------------+------+-----+
 *   | deadline_ns | payload     | next   | prev   | generation | list | pad |
 *   | int64       | uint64      | uint32 | uint32 | uint32     | u16  | u16 |
 *   +-------------+-------------+--------+--------+------------+------+-----+
 *   0             8             16       20       24           28     30    32
 *
 * Bytes per pending timer: MQS_WHEEL_ENTRY_BYTES (32). The header is fixed
 * whatever the capacity; mqs_wheel_size_bytes(capacity) is the whole block.
 *
 * Time is int64 nanoseconds on the caller's clock: the wheel never reads a
 * clock, so tests pass in any time they like. Ticks count tick_ns steps
 * from origin_ns (the start time given to mqs_wheel_init). Tick t contains
 * the deadlines in (origin_ns + (t - 1) * tick_ns, origin_ns + t * tick_ns].
 *
 * Lists: every timer sits on one circular doubly linked list threaded
 * through next/prev. heads[list] is its first entry, whose prev is the
 * last one. List ids:
 *   level * 64 + slot    a wheel slot (MQS_WHEEL_LEVELS levels of 64)
 *   MQS_WHEEL_DUE        timers inserted with deadline <= now_ns
 *   MQS_WHEEL_OVERFLOW   timers beyond the top level
 * Lists are kept in insertion order. unsorted0 (a bit per level-0 slot)
 * and due_unsorted mark the lists that may be out of deadline order; a
 * stable merge sort fixes such a list just before it fires.
 *
 * Placement: a timer due in tick t goes to level k = msb(t ^ now_tick) / 6,
 * slot (t >> 6k) & 63, where now_tick is the wheel's current tick. So each
 * level-k timer is later than every level-(k-1) timer, and the next slot
 * with work is the first set bit after the current index in the lowest
 * non-empty bitmap. When now_tick reaches the start of a level-k slot, its
 * timers move down to lower levels (cascading), and a timer reaches
 * level 0 in its own tick. Level 0 slot (now_tick & 63), the current slot,
 * contains the timers due in the current tick. It is sorted by deadline
 * before it fires, so mqs_wheel_advance(now) fires exactly the timers whose
 * deadline is at or before now: never early, and not a tick late either. The tick
 * sets the bucket width only: a coarse tick puts more timers in one slot
 * to sort, a fine one cascades more often and reaches the overflow list
 * sooner (the levels span 2^36 ticks: 795 days at 1 ms).
 *
 * Ordering: timers fire in deadline order, and timers with equal deadlines
 * in insertion order, across one advance and across chunked calls.
 *
 * Threads: the wheel is single-threaded. Every function may be called from
 * any thread as long as the caller serialises all calls on one wheel (for
 * example with a mutex); none of them blocks or allocates.
 */
#ifndef MQS_WHEEL_H
#define MQS_WHEEL_H

#include <stddef.h>
#include <stdint.h>

#include "mqs_atomic.h"

#define MQS_WHEEL_LAYOUT_VERSION 1u
#define MQS_WHEEL_SLOT_BITS 6
#define MQS_WHEEL_SLOTS 64
#define MQS_WHEEL_LEVELS 6
#define MQS_WHEEL_DUE (MQS_WHEEL_LEVELS * MQS_WHEEL_SLOTS)
#define MQS_WHEEL_OVERFLOW (MQS_WHEEL_DUE + 1)
#define MQS_WHEEL_LISTS (MQS_WHEEL_OVERFLOW + 1)
#define MQS_WHEEL_FREE 0xFFFFu /* list id of an entry on the free list */
#define MQS_WHEEL_NIL UINT32_MAX /* no entry */
#define MQS_WHEEL_MAX_CAPACITY (UINT32_MAX - 1u)
#define MQS_WHEEL_ENTRY_BYTES 32
#define MQS_WHEEL_HEADER_BYTES 4752

typedef struct mqs_wheel_entry {
    int64_t deadline_ns;
    uint64_t payload;   /* the caller's value: a pointer or an index */
    uint32_t next;      /* slab index; free entries chain through it */
    uint32_t prev;
    uint32_t generation; /* never 0; bumped each time the entry is freed */
    uint16_t list;      /* list id, or MQS_WHEEL_FREE */
    uint16_t reserved;
} mqs_wheel_entry_t;

typedef struct mqs_wheel {
    uint32_t layout_version;
    uint32_t capacity;   /* entries in the slab */
    uint32_t count;      /* pending timers */
    uint32_t free_head;  /* first free entry, or MQS_WHEEL_NIL */
    int64_t tick_ns;
    uint64_t tick_magic; /* division by tick_ns: see mqs_wheel_div */
    int64_t origin_ns;   /* time of tick 0 */
    /* Every timer with deadline <= now_ns has fired, except those on the
     * due list. Updated only when an advance completes. */
    int64_t now_ns;
    uint64_t now_tick;   /* current tick: level 0 slot now_tick & 63 */
    uint64_t unsorted0;  /* level-0 slots that may be out of order */
    uint32_t due_unsorted;
    uint8_t tick_shift1;
    uint8_t tick_shift2;
    uint16_t reserved;
    uint64_t occupied[MQS_WHEEL_LEVELS]; /* bit s: slot s is not empty */
    /* Per list, at or below the earliest deadline on it: exact unless the
     * earliest timer was cancelled. INT64_MAX when the list is empty. */
    int64_t min_deadline_ns[MQS_WHEEL_LISTS];
    uint32_t heads[MQS_WHEEL_LISTS];
    mqs_wheel_entry_t entries[];
} mqs_wheel_t;

_Static_assert(sizeof(mqs_wheel_entry_t) == MQS_WHEEL_ENTRY_BYTES,
               "entry layout changed");
_Static_assert(offsetof(mqs_wheel_t, entries) == MQS_WHEEL_HEADER_BYTES,
               "header layout changed");

/* Bytes of a wheel block with `capacity` entries (header included). */
static inline size_t mqs_wheel_size_bytes(uint32_t capacity)
{
    return MQS_WHEEL_HEADER_BYTES + (size_t)capacity * MQS_WHEEL_ENTRY_BYTES;
}

/* Add two times or durations in ns, saturating at INT64_MIN/INT64_MAX,
 * so a huge delay gives a deadline that is late, never early. */
static inline int64_t mqs_wheel_add_ns(int64_t a, int64_t b)
{
    int64_t sum;

    if (__builtin_add_overflow(a, b, &sum))
        return b > 0 ? INT64_MAX : INT64_MIN;
    return sum;
}

static inline uint32_t mqs_wheel_count(const mqs_wheel_t *w)
{
    return w->count;
}

/* Slab index the next mqs_wheel_insert will take, or MQS_WHEEL_NIL when
 * the slab is full. A caller that keeps a side table by slab index (as
 * the Python wrapper does) passes this index as the payload. */
static inline uint32_t mqs_wheel_next_index(const mqs_wheel_t *w)
{
    return w->free_head;
}

static inline uint32_t mqs_wheel_handle_index(uint64_t handle)
{
    return (uint32_t)handle;
}

/*
 * Make an empty wheel in the caller's block of `size_bytes` bytes, which
 * gives (size_bytes - MQS_WHEEL_HEADER_BYTES) / MQS_WHEEL_ENTRY_BYTES
 * entries, at most MQS_WHEEL_MAX_CAPACITY. `start_ns` is the current time
 * and becomes now_ns; tick 0 starts there. Only while no other call uses
 * the block.
 * Returns MQS_OK, or MQS_EINVAL when w is NULL or not 8-byte aligned,
 * tick_ns < 1, or the block has no room for one entry.
 */
int mqs_wheel_init(mqs_wheel_t *w, size_t size_bytes, int64_t tick_ns,
                   int64_t start_ns);

/*
 * Take in more entries after the caller made the block larger (realloc,
 * or a larger mapping with the old contents copied) to `size_bytes`.
 * Pending timers and their handles stay valid; the new entries are free.
 * Returns MQS_OK, or MQS_EINVAL when size_bytes gives fewer entries than
 * the wheel has now.
 */
int mqs_wheel_grow(mqs_wheel_t *w, size_t size_bytes);

/*
 * Fire the timers whose deadline is at or before `now_ns`: remove them
 * and write their payloads to payloads[0 .. *n_fired), in deadline order
 * and, for equal deadlines, insertion order. A now_ns below the largest
 * one already passed counts as that one. The work grows with the timers
 * fired or cascaded, never with the ticks passed.
 * Returns MQS_OK when every due timer is out, or MQS_EFULL when
 * `max_fired` payloads are out and at least one more is due: call again
 * with the same or a later now_ns to get the rest, in order.
 */
int mqs_wheel_advance(mqs_wheel_t *w, int64_t now_ns, uint64_t *payloads,
                      size_t max_fired, size_t *n_fired);

/*
 * Store in *deadline_ns a time at or before the earliest pending deadline.
 * It is exact unless the timer with the earliest deadline on its list was
 * cancelled, in which case an advance at that time may fire nothing. For
 * timers on the due list it is in the past. O(levels): a few bit scans.
 * Returns MQS_OK, or MQS_EEMPTY when no timer is pending.
 */
int mqs_wheel_next_deadline(const mqs_wheel_t *w, int64_t *deadline_ns);

/*
 * Remove up to `max_payloads` pending timers in no particular order and
 * write their payloads to `payloads`; for tearing a wheel down.
 * Returns the number removed (0 when none is pending).
 */
size_t mqs_wheel_drain(mqs_wheel_t *w, uint64_t *payloads,
                       size_t max_payloads);

/*
 * Walk the whole wheel and verify its invariants: list links, list ids,
 * placement by tick, bitmaps, sort flags, minimum deadlines, the free list
 * and the count. O(capacity). For tests, and for a wheel found in a shared
 * mapping after its owner died.
 * Returns MQS_OK or MQS_ECORRUPT.
 */
int mqs_wheel_check(const mqs_wheel_t *w);

/*
 * Internals of the two hot paths, mqs_wheel_insert and mqs_wheel_cancel,
 * which are static inline at the end of this header; mqs_wheel.c uses
 * them too. Callers use the documented functions instead.
 */
#define MQS_WHEEL_SLOT_MASK ((uint64_t)MQS_WHEEL_SLOTS - 1)

__extension__ typedef unsigned __int128 mqs_u128; /* GCC and Clang */

static inline int mqs_wheel_is_level0(uint32_t list)
{
    return list < MQS_WHEEL_SLOTS;
}

static inline int mqs_wheel_is_slot(uint32_t list)
{
    return list < MQS_WHEEL_DUE;
}

static inline uint64_t mqs_wheel_bit(uint32_t index)
{
    return (uint64_t)1 << index;
}

/*
 * n / tick_ns, exact for every uint64 n, without a divide instruction
 * (20 to 90 cycles on x86-64 for 64 bits). This is the unsigned division
 * by an invariant integer of Granlund and Montgomery, "Division by
 * Invariant Integers using Multiplication" (PLDI 1994), figure 4.1:
 * q = (t + ((n - t) >> shift1)) >> shift2 with t = mulhi(magic, n).
 */
static inline uint64_t mqs_wheel_div(const mqs_wheel_t *w, uint64_t n)
{
    uint64_t t = (uint64_t)(((mqs_u128)w->tick_magic * n) >> 64);

    return (t + ((n - t) >> w->tick_shift1)) >> w->tick_shift2;
}

/* Tick of a deadline later than origin_ns: ceil((d - origin) / tick). The
 * difference is taken in uint64, where it is exact for any d > origin. */
static inline uint64_t mqs_wheel_tick_of(const mqs_wheel_t *w,
                                         int64_t deadline_ns)
{
    uint64_t since = (uint64_t)deadline_ns - (uint64_t)w->origin_ns;
    uint64_t quotient = mqs_wheel_div(w, since);

    return quotient + (since != quotient * (uint64_t)w->tick_ns);
}

static inline int mqs_wheel_level_of(uint64_t tick, uint64_t now_tick)
{
    return (63 - __builtin_clzll(tick ^ now_tick)) / MQS_WHEEL_SLOT_BITS;
}

static inline uint32_t mqs_wheel_current_list(const mqs_wheel_t *w)
{
    return (uint32_t)(w->now_tick & MQS_WHEEL_SLOT_MASK);
}

/* Whether a list is known to be in deadline order. */
static inline int mqs_wheel_list_sorted(const mqs_wheel_t *w, uint32_t list)
{
    if (mqs_wheel_is_level0(list))
        return !(w->unsorted0 & mqs_wheel_bit(list));
    if (list == MQS_WHEEL_DUE)
        return !w->due_unsorted;
    return 0;
}

static inline void mqs_wheel_mark_unsorted(mqs_wheel_t *w, uint32_t list)
{
    if (mqs_wheel_is_level0(list))
        w->unsorted0 |= mqs_wheel_bit(list);
    else if (list == MQS_WHEEL_DUE)
        w->due_unsorted = 1;
}

static inline void mqs_wheel_mark_sorted(mqs_wheel_t *w, uint32_t list)
{
    if (mqs_wheel_is_level0(list))
        w->unsorted0 &= ~mqs_wheel_bit(list);
    else if (list == MQS_WHEEL_DUE)
        w->due_unsorted = 0;
}

/* Bookkeeping for a list that just became empty. */
static inline void mqs_wheel_list_emptied(mqs_wheel_t *w, uint32_t list)
{
    w->heads[list] = MQS_WHEEL_NIL;
    w->min_deadline_ns[list] = INT64_MAX;
    if (mqs_wheel_is_slot(list))
        w->occupied[list / MQS_WHEEL_SLOTS] &=
            ~mqs_wheel_bit(list % MQS_WHEEL_SLOTS);
    mqs_wheel_mark_sorted(w, list);
}

static inline void mqs_wheel_list_append(mqs_wheel_t *w, uint32_t list,
                                         uint32_t i)
{
    mqs_wheel_entry_t *e = w->entries;
    uint32_t head = w->heads[list];
    uint32_t tail;
    int64_t deadline = e[i].deadline_ns;

    e[i].list = (uint16_t)list;
    if (head == MQS_WHEEL_NIL) {
        e[i].next = i;
        e[i].prev = i;
        w->heads[list] = i;
        w->min_deadline_ns[list] = deadline;
        if (mqs_wheel_is_slot(list))
            w->occupied[list / MQS_WHEEL_SLOTS] |=
                mqs_wheel_bit(list % MQS_WHEEL_SLOTS);
        return;
    }

    tail = e[head].prev;
    e[i].prev = tail;
    e[i].next = head;
    e[tail].next = i;
    e[head].prev = i;
    if (deadline < w->min_deadline_ns[list])
        w->min_deadline_ns[list] = deadline;
    /* An equal deadline after the tail keeps the order: insertion order
     * is the tie-break. */
    if (deadline < e[tail].deadline_ns)
        mqs_wheel_mark_unsorted(w, list);
}

static inline void mqs_wheel_list_remove(mqs_wheel_t *w, uint32_t i)
{
    mqs_wheel_entry_t *e = w->entries;
    uint32_t list = e[i].list;
    uint32_t next = e[i].next;

    if (next == i) {
        mqs_wheel_list_emptied(w, list);
        return;
    }
    e[e[i].prev].next = next;
    e[next].prev = e[i].prev;
    if (w->heads[list] == i) {
        w->heads[list] = next;
        /* The head of a sorted list has its minimum deadline. */
        if (mqs_wheel_list_sorted(w, list))
            w->min_deadline_ns[list] = e[next].deadline_ns;
    }
}

/* Put a pending entry on the list its deadline belongs to now. */
static inline void mqs_wheel_place(mqs_wheel_t *w, uint32_t i)
{
    int64_t deadline = w->entries[i].deadline_ns;
    uint64_t tick;
    int level;

    if (deadline <= w->now_ns) {
        mqs_wheel_list_append(w, MQS_WHEEL_DUE, i);
        return;
    }
    tick = mqs_wheel_tick_of(w, deadline);
    /* tick < now_tick only happens between the calls of a chunked
     * advance, after now_tick moved past the tick: the current slot is
     * the earliest place left, and sorting puts the entry first. */
    if (tick <= w->now_tick) {
        mqs_wheel_list_append(w, mqs_wheel_current_list(w), i);
        return;
    }
    level = mqs_wheel_level_of(tick, w->now_tick);
    if (level >= MQS_WHEEL_LEVELS) {
        mqs_wheel_list_append(w, MQS_WHEEL_OVERFLOW, i);
        return;
    }
    mqs_wheel_list_append(
        w,
        (uint32_t)level * MQS_WHEEL_SLOTS +
            (uint32_t)((tick >> (level * MQS_WHEEL_SLOT_BITS)) &
                       MQS_WHEEL_SLOT_MASK),
        i);
}

static inline uint32_t mqs_wheel_entry_alloc(mqs_wheel_t *w)
{
    uint32_t i = w->free_head;

    w->free_head = w->entries[i].next;
    w->count++;
    return i;
}

static inline void mqs_wheel_entry_free(mqs_wheel_t *w, uint32_t i)
{
    mqs_wheel_entry_t *entry = &w->entries[i];

    entry->generation++;
    if (entry->generation == 0)
        entry->generation = 1;
    entry->list = MQS_WHEEL_FREE;
    entry->next = w->free_head;
    entry->prev = MQS_WHEEL_NIL;
    w->free_head = i;
    w->count--;
}

/*
 * Schedule `payload` at `deadline_ns` and store its handle in *handle
 * (may be NULL). O(1): a division and a list append. A deadline at or
 * before now_ns fires at the next mqs_wheel_advance.
 * Returns MQS_OK, or MQS_EFULL when every entry is taken (grow the block
 * or cancel timers).
 */
static inline int mqs_wheel_insert(mqs_wheel_t *w, int64_t deadline_ns,
                                   uint64_t payload, uint64_t *handle)
{
    uint32_t i;

    if (w->free_head == MQS_WHEEL_NIL)
        return MQS_EFULL;

    i = mqs_wheel_entry_alloc(w);
    w->entries[i].deadline_ns = deadline_ns;
    w->entries[i].payload = payload;
    mqs_wheel_place(w, i);
    if (handle != NULL)
        *handle = (uint64_t)w->entries[i].generation << 32 | i;
    return MQS_OK;
}

/*
 * Cancel the pending timer `handle` and store its payload in *payload
 * (may be NULL). O(1). A handle carries its entry's generation, so a
 * handle whose timer already fired or was cancelled never touches a later
 * timer that reuses the entry.
 * Returns MQS_OK, or MQS_EINVAL when the handle is not pending (fired,
 * cancelled, drained, or never issued).
 */
static inline int mqs_wheel_cancel(mqs_wheel_t *w, uint64_t handle,
                                   uint64_t *payload)
{
    uint32_t i = (uint32_t)handle;
    mqs_wheel_entry_t *entry;

    if (i >= w->capacity)
        return MQS_EINVAL;
    entry = &w->entries[i];
    if (entry->generation != (uint32_t)(handle >> 32)
        || entry->list == MQS_WHEEL_FREE)
        return MQS_EINVAL;

    if (payload != NULL)
        *payload = entry->payload;
    mqs_wheel_list_remove(w, i);
    mqs_wheel_entry_free(w, i);
    return MQS_OK;
}

#endif /* MQS_WHEEL_H */
