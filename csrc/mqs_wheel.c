#include "mqs_wheel.h"

#include <string.h>

#define TOP_BITS (MQS_WHEEL_SLOT_BITS * MQS_WHEEL_LEVELS)
#define EPOCH_MASK (((uint64_t)1 << TOP_BITS) - 1)

/* Empty a list and return its entries as a chain ending in NIL, in list
 * order. The entries keep stale list ids until they are placed again. */
static uint32_t list_detach(mqs_wheel_t *w, uint32_t list)
{
    uint32_t head = w->heads[list];

    if (head != MQS_WHEEL_NIL) {
        w->entries[w->entries[head].prev].next = MQS_WHEEL_NIL;
        mqs_wheel_list_emptied(w, list);
    }
    return head;
}

/* Cut the longest non-decreasing run starting at `start` off the chain;
 * store its last entry in *tail and return the rest (NIL at the end). */
static uint32_t cut_run(mqs_wheel_entry_t *e, uint32_t start, uint32_t *tail)
{
    uint32_t i = start;
    uint32_t rest;

    while (e[i].next != MQS_WHEEL_NIL &&
           e[e[i].next].deadline_ns >= e[i].deadline_ns)
        i = e[i].next;
    rest = e[i].next;
    e[i].next = MQS_WHEEL_NIL;
    *tail = i;
    return rest;
}

/* Merge two sorted chains. On equal deadlines `a` goes first, which keeps
 * the sort stable since `a` came earlier in the list. */
static uint32_t merge_runs(mqs_wheel_entry_t *e, uint32_t a, uint32_t a_tail,
                           uint32_t b, uint32_t b_tail, uint32_t *tail)
{
    uint32_t head = MQS_WHEEL_NIL;
    uint32_t last = MQS_WHEEL_NIL;
    uint32_t pick;

    while (a != MQS_WHEEL_NIL && b != MQS_WHEEL_NIL) {
        if (e[b].deadline_ns < e[a].deadline_ns) {
            pick = b;
            b = e[b].next;
        } else {
            pick = a;
            a = e[a].next;
        }
        if (last == MQS_WHEEL_NIL)
            head = pick;
        else
            e[last].next = pick;
        last = pick;
    }

    if (a != MQS_WHEEL_NIL) {
        e[last].next = a;
        *tail = a_tail;
    } else {
        e[last].next = b;
        *tail = b_tail;
    }
    return head;
}

/*
 * Sort a list by deadline, stably, with a natural merge sort: each pass
 * merges neighbouring runs, so a sorted list costs one walk and a sorted
 * list with a few entries appended costs a few.
 */
static void list_sort(mqs_wheel_t *w, uint32_t list)
{
    mqs_wheel_entry_t *e = w->entries;
    uint32_t head = w->heads[list];
    uint32_t tail = MQS_WHEEL_NIL;

    if (head == MQS_WHEEL_NIL)
        return;
    e[e[head].prev].next = MQS_WHEEL_NIL;

    for (;;) {
        uint32_t rest = head;
        uint32_t out = MQS_WHEEL_NIL;
        uint32_t out_tail = MQS_WHEEL_NIL;
        int runs = 0;

        while (rest != MQS_WHEEL_NIL) {
            uint32_t a = rest, a_tail, b, b_tail, merged, merged_tail;

            rest = cut_run(e, a, &a_tail);
            merged = a;
            merged_tail = a_tail;
            if (rest != MQS_WHEEL_NIL) {
                b = rest;
                rest = cut_run(e, b, &b_tail);
                merged = merge_runs(e, a, a_tail, b, b_tail, &merged_tail);
            }
            if (out == MQS_WHEEL_NIL)
                out = merged;
            else
                e[out_tail].next = merged;
            out_tail = merged_tail;
            runs++;
        }
        head = out;
        tail = out_tail;
        if (runs == 1)
            break;
    }

    /* Rebuild the prev links and close the circle. */
    {
        uint32_t prev = tail;
        uint32_t i;

        for (i = head; i != MQS_WHEEL_NIL; i = e[i].next) {
            e[i].prev = prev;
            prev = i;
        }
        e[tail].next = head;
    }
    w->heads[list] = head;
    w->min_deadline_ns[list] = e[head].deadline_ns;
    mqs_wheel_mark_sorted(w, list);
}

/*
 * Precompute mqs_wheel_div for divisor d >= 1 (figure 4.1 of Granlund and
 * Montgomery): l = ceil(log2 d), magic = floor(2^64 * (2^l - d) / d) + 1,
 * shift1 = min(l, 1), shift2 = max(l - 1, 0). d < 2^63, so l <= 63 and
 * the magic fits in 64 bits.
 */
static void set_divisor(mqs_wheel_t *w, uint64_t d)
{
    int l = d == 1 ? 0 : 64 - __builtin_clzll(d - 1);
    mqs_u128 scaled = (mqs_u128)(((uint64_t)1 << l) - d) << 64;

    w->tick_magic = (uint64_t)(scaled / d) + 1;
    w->tick_shift1 = (uint8_t)(l < 1 ? l : 1);
    w->tick_shift2 = (uint8_t)(l > 1 ? l - 1 : 0);
}

int mqs_wheel_init(mqs_wheel_t *w, size_t size_bytes, int64_t tick_ns,
                   int64_t start_ns)
{
    uint32_t i;

    if (w == NULL || ((uintptr_t)w & 7) != 0 || tick_ns < 1
        || size_bytes < mqs_wheel_size_bytes(1))
        return MQS_EINVAL;

    memset(w, 0, MQS_WHEEL_HEADER_BYTES);
    w->layout_version = MQS_WHEEL_LAYOUT_VERSION;
    w->tick_ns = tick_ns;
    set_divisor(w, (uint64_t)tick_ns);
    w->origin_ns = start_ns;
    w->now_ns = start_ns;
    w->now_tick = 0;
    for (i = 0; i < MQS_WHEEL_LISTS; i++) {
        w->heads[i] = MQS_WHEEL_NIL;
        w->min_deadline_ns[i] = INT64_MAX;
    }
    w->capacity = 0;
    w->free_head = MQS_WHEEL_NIL;
    return mqs_wheel_grow(w, size_bytes);
}

int mqs_wheel_grow(mqs_wheel_t *w, size_t size_bytes)
{
    size_t fits;
    uint32_t capacity, i;

    if (size_bytes < MQS_WHEEL_HEADER_BYTES)
        return MQS_EINVAL;
    fits = (size_bytes - MQS_WHEEL_HEADER_BYTES) / MQS_WHEEL_ENTRY_BYTES;
    capacity = fits > MQS_WHEEL_MAX_CAPACITY ? MQS_WHEEL_MAX_CAPACITY
                                             : (uint32_t)fits;
    if (capacity < w->capacity)
        return MQS_EINVAL;

    /* Push the new entries so the lowest index comes out first. */
    for (i = capacity; i > w->capacity; i--) {
        mqs_wheel_entry_t *entry = &w->entries[i - 1];

        memset(entry, 0, sizeof(*entry));
        entry->generation = 1;
        entry->list = MQS_WHEEL_FREE;
        entry->prev = MQS_WHEEL_NIL;
        entry->next = w->free_head;
        w->free_head = i - 1;
    }
    w->capacity = capacity;
    return MQS_OK;
}

/*
 * Find the next wheel slot with timers after the current tick. With the
 * XOR placement every timer on level k shares now_tick's bits above level
 * k and has a larger index on level k, so only the bits after the current
 * index can be set, and the lowest level with one contains the earliest
 * timers. Returns the list id and stores the slot's first tick in *start,
 * or returns MQS_WHEEL_NIL when every level is empty.
 */
static uint32_t next_slot(const mqs_wheel_t *w, uint64_t *start)
{
    int level;

    for (level = 0; level < MQS_WHEEL_LEVELS; level++) {
        int shift = level * MQS_WHEEL_SLOT_BITS;
        uint64_t index = (w->now_tick >> shift) & MQS_WHEEL_SLOT_MASK;
        uint64_t later = 0;
        uint64_t block_mask =
            ((uint64_t)1 << (shift + MQS_WHEEL_SLOT_BITS)) - 1;
        uint32_t slot;

        if (index < MQS_WHEEL_SLOT_MASK)
            later = w->occupied[level] & (~(uint64_t)0 << (index + 1));
        if (later == 0)
            continue;
        slot = (uint32_t)__builtin_ctzll(later);
        *start = (w->now_tick & ~block_mask) | ((uint64_t)slot << shift);
        return (uint32_t)level * MQS_WHEEL_SLOTS + slot;
    }
    return MQS_WHEEL_NIL;
}

/*
 * First tick of the earliest top-level span (epoch) that may contain an
 * overflow timer; never at or before now_tick. When now_tick gets there,
 * the whole overflow list is placed again.
 * NOTE: that walk is O(overflow timers), once per epoch that has one of
 * them. Epochs are 2^36 ticks (795 days at 1 ms), but with a 1 ns tick
 * they are 69 s, and many far timers mixed with near ones get walked
 * each time; a coarser tick avoids it.
 */
static uint64_t overflow_start(const mqs_wheel_t *w)
{
    uint64_t earliest =
        mqs_wheel_tick_of(w, w->min_deadline_ns[MQS_WHEEL_OVERFLOW]);
    uint64_t start = earliest & ~EPOCH_MASK;
    uint64_t next_epoch = (w->now_tick | EPOCH_MASK) + 1;

    /* next_epoch wraps to 0 only when now_tick is in the last epoch, and
     * then no overflow timer can exist. */
    return start > next_epoch ? start : next_epoch;
}

/* Take every timer off a list and place it again for the current tick:
 * a cascade (wheel slot) or an overflow check. List order is kept, so
 * timers of one tick stay in insertion order. */
static void replace_list(mqs_wheel_t *w, uint32_t list)
{
    uint32_t i = list_detach(w, list);

    while (i != MQS_WHEEL_NIL) {
        uint32_t next = w->entries[i].next;

        mqs_wheel_place(w, i);
        i = next;
    }
}

/* Pop due timers off the head of a sorted list into the output. Returns
 * MQS_EFULL when the output filled up with a due timer left. */
static int fire_list(mqs_wheel_t *w, uint32_t list, int64_t now_ns,
                     uint64_t *payloads, size_t max_fired, size_t *n)
{
    uint32_t i;

    if (!mqs_wheel_list_sorted(w, list))
        list_sort(w, list);
    while ((i = w->heads[list]) != MQS_WHEEL_NIL
           && w->entries[i].deadline_ns <= now_ns) {
        if (*n == max_fired)
            return MQS_EFULL;
        payloads[(*n)++] = w->entries[i].payload;
        mqs_wheel_list_remove(w, i);
        mqs_wheel_entry_free(w, i);
    }
    return MQS_OK;
}

int mqs_wheel_advance(mqs_wheel_t *w, int64_t now_ns, uint64_t *payloads,
                      size_t max_fired, size_t *n_fired)
{
    uint64_t target, start;
    uint32_t list;
    size_t n = 0;
    int rc = MQS_OK;

    if (now_ns < w->now_ns)
        now_ns = w->now_ns;
    target = mqs_wheel_tick_of(w, now_ns);

    /* Due timers are at or before the old now_ns, so before all others. */
    if (w->heads[MQS_WHEEL_DUE] != MQS_WHEEL_NIL)
        rc = fire_list(w, MQS_WHEEL_DUE, now_ns, payloads, max_fired, &n);

    while (rc == MQS_OK) {
        list = mqs_wheel_current_list(w);
        if (w->occupied[0] & mqs_wheel_bit(list)) {
            rc = fire_list(w, list, now_ns, payloads, max_fired, &n);
            /* What is left is due after now_ns, so in tick `target`. */
            if (rc != MQS_OK || w->heads[list] != MQS_WHEEL_NIL)
                break;
        }
        if (w->now_tick >= target)
            break;

        list = next_slot(w, &start);
        if (list == MQS_WHEEL_NIL) {
            if (w->heads[MQS_WHEEL_OVERFLOW] == MQS_WHEEL_NIL)
                break;
            start = overflow_start(w);
            list = MQS_WHEEL_OVERFLOW;
        }
        if (start > target)
            break;

        /* Moving now_tick to the start of the earliest slot with work keeps
         * every other timer's level and slot valid. */
        w->now_tick = start;
        if (!mqs_wheel_is_level0(list))
            replace_list(w, list);
    }

    if (rc == MQS_OK) {
        /* No slot with work starts before target, so the jump is safe. */
        if (w->now_tick < target)
            w->now_tick = target;
        w->now_ns = now_ns;
    }
    *n_fired = n;
    return rc;
}

int mqs_wheel_next_deadline(const mqs_wheel_t *w, int64_t *deadline_ns)
{
    uint32_t list = mqs_wheel_current_list(w);
    uint64_t start;

    if (w->heads[MQS_WHEEL_DUE] != MQS_WHEEL_NIL)
        list = MQS_WHEEL_DUE;
    else if (!(w->occupied[0] & mqs_wheel_bit(list))) {
        list = next_slot(w, &start);
        if (list == MQS_WHEEL_NIL) {
            if (w->heads[MQS_WHEEL_OVERFLOW] == MQS_WHEEL_NIL)
                return MQS_EEMPTY;
            list = MQS_WHEEL_OVERFLOW;
        }
    }
    *deadline_ns = w->min_deadline_ns[list];
    return MQS_OK;
}

size_t mqs_wheel_drain(mqs_wheel_t *w, uint64_t *payloads,
                       size_t max_payloads)
{
    size_t n = 0;
    uint32_t list, i;

    for (list = 0; list < MQS_WHEEL_LISTS && n < max_payloads; list++) {
        while (n < max_payloads && (i = w->heads[list]) != MQS_WHEEL_NIL) {
            payloads[n++] = w->entries[i].payload;
            mqs_wheel_list_remove(w, i);
            mqs_wheel_entry_free(w, i);
        }
    }
    return n;
}

/* Whether entry i may sit on `list` given the wheel's current tick. */
static int placement_valid(const mqs_wheel_t *w, uint32_t list, uint32_t i)
{
    int64_t deadline = w->entries[i].deadline_ns;
    uint64_t tick;
    int level;

    if (list == MQS_WHEEL_DUE)
        return deadline <= w->now_ns;
    if (deadline <= w->now_ns)
        return 0;
    tick = mqs_wheel_tick_of(w, deadline);
    if (list == mqs_wheel_current_list(w))
        return tick <= w->now_tick;
    if (tick <= w->now_tick)
        return 0;
    level = mqs_wheel_level_of(tick, w->now_tick);
    if (list == MQS_WHEEL_OVERFLOW)
        return level >= MQS_WHEEL_LEVELS;
    return level < MQS_WHEEL_LEVELS
           && list == (uint32_t)level * MQS_WHEEL_SLOTS +
                          (uint32_t)((tick >> (level * MQS_WHEEL_SLOT_BITS)) &
                                     MQS_WHEEL_SLOT_MASK);
}

/* Check one list; add its length to *seen. Returns MQS_OK or
 * MQS_ECORRUPT. */
static int check_list(const mqs_wheel_t *w, uint32_t list, uint64_t *seen)
{
    const mqs_wheel_entry_t *e = w->entries;
    uint32_t head = w->heads[list];
    uint32_t i = head;
    uint64_t length = 0;
    int sorted = mqs_wheel_list_sorted(w, list);
    int nonempty = head != MQS_WHEEL_NIL;

    if (mqs_wheel_is_slot(list)
        && nonempty != !!(w->occupied[list / MQS_WHEEL_SLOTS] &
                          mqs_wheel_bit(list % MQS_WHEEL_SLOTS)))
        return MQS_ECORRUPT;
    if (!nonempty)
        return w->min_deadline_ns[list] == INT64_MAX ? MQS_OK : MQS_ECORRUPT;
    if (head >= w->capacity)
        return MQS_ECORRUPT;

    do {
        uint32_t next = e[i].next;

        if (next >= w->capacity || e[next].prev != i || e[i].list != list
            || e[i].generation == 0 || ++length > w->capacity
            || e[i].deadline_ns < w->min_deadline_ns[list]
            || !placement_valid(w, list, i))
            return MQS_ECORRUPT;
        if (sorted && next != head && e[next].deadline_ns < e[i].deadline_ns)
            return MQS_ECORRUPT;
        i = next;
    } while (i != head);
    *seen += length;
    return MQS_OK;
}

int mqs_wheel_check(const mqs_wheel_t *w)
{
    uint64_t seen = 0, free_count = 0;
    uint32_t list, i;

    if (w->layout_version != MQS_WHEEL_LAYOUT_VERSION || w->tick_ns < 1
        || w->count > w->capacity || w->now_ns < w->origin_ns)
        return MQS_ECORRUPT;
    if ((w->unsorted0 & ~w->occupied[0]) != 0
        || (w->due_unsorted && w->heads[MQS_WHEEL_DUE] == MQS_WHEEL_NIL))
        return MQS_ECORRUPT;

    for (list = 0; list < MQS_WHEEL_LISTS; list++)
        if (check_list(w, list, &seen) != MQS_OK)
            return MQS_ECORRUPT;
    if (seen != w->count)
        return MQS_ECORRUPT;

    for (i = w->free_head; i != MQS_WHEEL_NIL; i = w->entries[i].next) {
        if (i >= w->capacity || w->entries[i].list != MQS_WHEEL_FREE
            || w->entries[i].generation == 0
            || ++free_count > w->capacity)
            return MQS_ECORRUPT;
    }
    if (free_count + w->count != w->capacity)
        return MQS_ECORRUPT;
    return MQS_OK;
}
