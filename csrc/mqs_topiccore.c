/*
 * mqs_topiccore.c: operations and crash repair of a shared topic core
 * (layout and rules in mqs_topiccore.h).
 */
#define _GNU_SOURCE
#include "mqs_topiccore.h"
#include "mqs_failpoint.h"
#include "mqs_robust.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* ---- layout ------------------------------------------------------------ */

static mqs_tc_config_t *config_of(mqs_tc_header_t *h)
{
    return &h->config.v;
}

static mqs_tc_state_t *state_of(mqs_tc_header_t *h)
{
    return &h->state.v;
}

mqs_tc_slot_t *mqs_tc_slot(mqs_tc_header_t *h, uint32_t slot)
{
    mqs_tc_config_t *c = config_of(h);

    return (mqs_tc_slot_t *)((char *)h + c->slots_offset
                             + (uint64_t)slot * c->slot_stride);
}

static unsigned char *body_of(mqs_tc_slot_t *s)
{
    return (unsigned char *)(s + 1);
}

mqs_tc_group_t *mqs_tc_group(mqs_tc_header_t *h, uint32_t group)
{
    return (mqs_tc_group_t *)((char *)h + config_of(h)->groups_offset)
           + group;
}

mqs_tc_entry_t *mqs_tc_entry(mqs_tc_header_t *h, uint32_t group,
                             uint32_t slot)
{
    mqs_tc_config_t *c = config_of(h);

    return (mqs_tc_entry_t *)((char *)h + c->entries_offset)
           + (uint64_t)group * c->params.capacity + slot;
}

static uint32_t *ring_of(mqs_tc_header_t *h, uint32_t group, uint32_t lane)
{
    mqs_tc_config_t *c = config_of(h);

    return (uint32_t *)((char *)h + c->rings_offset)
           + ((uint64_t)group * c->params.lane_count + lane)
             * c->params.capacity;
}

mqs_tc_consumer_t *mqs_tc_consumer(mqs_tc_header_t *h, uint32_t consumer)
{
    return (mqs_tc_consumer_t *)((char *)h + config_of(h)->consumers_offset)
           + consumer;
}

int mqs_tc_may_fetch(mqs_tc_header_t *h, uint32_t consumer, uint32_t group,
                     uint64_t owner, int auto_ack, double now)
{
    const mqs_tc_params_t *p = &config_of(h)->params;
    mqs_tc_state_t *s = state_of(h);
    mqs_tc_consumer_t *c;
    mqs_tc_group_t *g;
    double next_deadline;

    /* Racy reads of fields that holders of the mutex write: relaxed
     * atomic loads, each of an aligned word. */
    if (atomic_load_explicit(&s->retired, memory_order_acquire))
        return 1;
    if (consumer >= p->max_consumers || group >= p->max_groups)
        return 1;
    c = mqs_tc_consumer(h, consumer);
    if (!atomic_load_explicit(&c->used, memory_order_acquire) ||
        __atomic_load_n(&c->group, __ATOMIC_RELAXED) != group ||
        (owner && __atomic_load_n(&c->owner, __ATOMIC_RELAXED) != owner))
        return 1;
    __atomic_load(&s->next_deadline, &next_deadline, __ATOMIC_RELAXED);
    if (now >= next_deadline)
        return 1;
    g = mqs_tc_group(h, group);
    if (__atomic_load_n(&g->dead, __ATOMIC_RELAXED))
        return 1;
    if (!__atomic_load_n(&g->ready, __ATOMIC_RELAXED))
        return 0;
    return auto_ack || __atomic_load_n(&c->prefetch, __ATOMIC_RELAXED) >
                           __atomic_load_n(&c->in_flight, __ATOMIC_RELAXED);
}

static uint64_t round_up(uint64_t n)
{
    return (n + MQS_PAD_BYTES - 1) / MQS_PAD_BYTES * MQS_PAD_BYTES;
}

static int params_valid(const mqs_tc_params_t *p)
{
    if (p->capacity < 1 || p->capacity > (1u << 24) || p->slot_bytes < 1
        || p->slot_bytes > (1u << 20) || p->max_groups < 1
        || p->max_groups > 64 || p->max_consumers < 1
        || p->max_consumers > 4096 || p->lane_count < 1
        || p->lane_count > MQS_TC_MAX_LANES || p->strict > 1)
        return 0;
    for (uint32_t i = 0; i < p->lane_count; i++) {
        if (p->lanes[i] < 0 || p->lanes[i] > 9 || p->weights[i] < 1)
            return 0;
        if (i > 0 && p->lanes[i] >= p->lanes[i - 1])
            return 0;
    }
    return 1;
}

/* Fill the offsets of `c` from its params; return the total bytes. */
static uint64_t plan(mqs_tc_config_t *c)
{
    const mqs_tc_params_t *p = &c->params;
    uint64_t at = round_up(sizeof(mqs_tc_header_t));

    c->slot_stride = (sizeof(mqs_tc_slot_t) + p->slot_bytes + 7) & ~7ull;
    c->slots_offset = at;
    at = round_up(at + c->slot_stride * p->capacity);
    c->groups_offset = at;
    at = round_up(at + sizeof(mqs_tc_group_t) * p->max_groups);
    c->entries_offset = at;
    at = round_up(at + sizeof(mqs_tc_entry_t) * p->max_groups
                  * (uint64_t)p->capacity);
    c->rings_offset = at;
    at = round_up(at + sizeof(uint32_t) * p->max_groups * p->lane_count
                  * (uint64_t)p->capacity);
    c->consumers_offset = at;
    at = round_up(at + sizeof(mqs_tc_consumer_t) * p->max_consumers);
    c->total_bytes = at;
    return at;
}

uint64_t mqs_tc_layout_bytes(const mqs_tc_params_t *params)
{
    mqs_tc_config_t c;

    if (!params_valid(params))
        return 0;
    memset(&c, 0, sizeof(c));
    c.params = *params;
    return plan(&c);
}

_Static_assert(sizeof(mqs_tc_config_t) <= 2 * MQS_PAD_BYTES,
               "max_stored must stay in the config block's padding");
_Static_assert(sizeof(mqs_tc_state_t) <= 2 * MQS_PAD_BYTES,
               "the pending fields must stay in the state block's padding");

int mqs_tc_format(mqs_tc_header_t *h, const mqs_tc_params_t *params)
{
    mqs_tc_config_t *c = config_of(h);
    mqs_tc_state_t *s = state_of(h);

    if (!params_valid(params))
        return MQS_EINVAL;
    c->magic = MQS_TC_MAGIC;
    c->version = MQS_TC_VERSION;
    c->params = *params;
    plan(c);
    for (int priority = 0; priority < 10; priority++) {
        /* The highest lane at or below the priority, else the lowest. */
        uint32_t index = params->lane_count - 1;
        for (uint32_t i = 0; i < params->lane_count; i++) {
            if (params->lanes[i] <= priority) {
                index = i;
                break;
            }
        }
        c->lane_of[priority] = (uint8_t)index;
    }
    mqs_wait_init(&h->changed.v);
    s->slot_limit = params->capacity < MQS_TC_GROW_SLOTS
                    ? params->capacity : MQS_TC_GROW_SLOTS;
    s->next_deadline = INFINITY;
    for (uint32_t g = 0; g < params->max_groups; g++)
        mqs_tc_group(h, g)->next_deadline = INFINITY;

    if (mqs_robust_init(&h->lock.v) != MQS_OK)
        return MQS_EINVAL;
    mqs_store_release_u32(&c->init_state, MQS_TC_INIT_READY);
    return MQS_OK;
}

int mqs_tc_validate(const mqs_tc_header_t *h, uint64_t file_bytes)
{
    const mqs_tc_config_t *c = &h->config.v;
    mqs_tc_config_t check;

    if (file_bytes < sizeof(mqs_tc_header_t))
        return MQS_ECORRUPT;
    if (mqs_load_acquire_u32((_Atomic uint32_t *)&c->init_state)
        != MQS_TC_INIT_READY)
        return c->magic == 0 ? MQS_EINTR : MQS_ECORRUPT;
    if (c->magic != MQS_TC_MAGIC)
        return MQS_ECORRUPT;
    if (c->version != MQS_TC_VERSION)
        return MQS_TC_EVERSION;
    if (!params_valid(&c->params))
        return MQS_ECORRUPT;
    memset(&check, 0, sizeof(check));
    check.params = c->params;
    if (plan(&check) != file_bytes || c->total_bytes != file_bytes
        || check.rings_offset != c->rings_offset)
        return MQS_ECORRUPT;
    return MQS_OK;
}

int mqs_tc_lock(mqs_tc_header_t *h, int64_t timeout_ns)
{
    int rc = mqs_robust_lock(&h->lock.v, timeout_ns);

    if (rc == MQS_ROBUST_OWNER_DIED) {
        mqs_tc_repair(h);
        pthread_mutex_consistent(&h->lock.v);
        return 1;
    }
    return rc;
}

void mqs_tc_unlock(mqs_tc_header_t *h)
{
    pthread_mutex_unlock(&h->lock.v);
}

/* ---- entries ------------------------------------------------------------ */

static uint64_t load_word(mqs_tc_entry_t *e)
{
    return atomic_load_explicit(&e->word, memory_order_relaxed);
}

/* The commit step of every entry change: fields stored before it are
 * never reordered after it. */
static void store_word(mqs_tc_entry_t *e, uint64_t word)
{
    atomic_store_explicit(&e->word, word, memory_order_release);
}

static uint64_t load_seq(mqs_tc_slot_t *s)
{
    return atomic_load_explicit(&s->seq, memory_order_relaxed);
}

/* The end of the slots ever used (see state.slot_limit). */
static uint32_t slot_limit(mqs_tc_header_t *h)
{
    uint32_t limit = state_of(h)->slot_limit;
    uint32_t capacity = config_of(h)->params.capacity;

    return limit < capacity ? limit : capacity;
}

static void push_tail(mqs_tc_header_t *h, uint32_t g, uint32_t lane,
                      uint32_t slot)
{
    mqs_tc_lane_t *l = &mqs_tc_group(h, g)->lanes[lane];
    uint32_t capacity = config_of(h)->params.capacity;

    ring_of(h, g, lane)[(l->head + l->count) % capacity] = slot;
    l->count++;
}

static void push_front(mqs_tc_header_t *h, uint32_t g, uint32_t lane,
                       uint32_t slot)
{
    mqs_tc_lane_t *l = &mqs_tc_group(h, g)->lanes[lane];
    uint32_t capacity = config_of(h)->params.capacity;

    l->head = (l->head + capacity - 1) % capacity;
    ring_of(h, g, lane)[l->head] = slot;
    l->count++;
}

static uint32_t pop_head(mqs_tc_header_t *h, uint32_t g, uint32_t lane)
{
    mqs_tc_lane_t *l = &mqs_tc_group(h, g)->lanes[lane];
    uint32_t slot = ring_of(h, g, lane)[l->head];

    l->head = (l->head + 1) % config_of(h)->params.capacity;
    l->count--;
    return slot;
}

/* Put an entry on its lane: at the tail as ready since `now`, or back at
 * the head unseen with the ready time it had. */
static void make_ready(mqs_tc_header_t *h, uint32_t g, uint32_t slot,
                       uint64_t attempts, int front, double now)
{
    mqs_tc_group_t *group = mqs_tc_group(h, g);
    mqs_tc_entry_t *e = mqs_tc_entry(h, g, slot);
    uint32_t lane = mqs_tc_slot(h, slot)->lane;

    if (!front)
        e->ready_at = now;
    e->ready_seq = front ? --group->front_seq : ++group->tail_seq;
    store_word(e, mqs_tc_word(MQS_TC_READY, 0, attempts));
    if (front)
        push_front(h, g, lane, slot);
    else
        push_tail(h, g, lane, slot);
    group->ready++;
}

static void set_deadline(mqs_tc_header_t *h, uint32_t g, mqs_tc_entry_t *e,
                         double at)
{
    mqs_tc_group_t *group = mqs_tc_group(h, g);
    mqs_tc_state_t *s = state_of(h);

    e->deadline = at;
    e->deadline_seq = ++s->timer_seq;
    if (at < group->next_deadline)
        group->next_deadline = at;
    if (at < s->next_deadline)
        s->next_deadline = at;
}

/* Append the entry of `slot` to group g's in-flight list. */
static void link_flight(mqs_tc_header_t *h, uint32_t g, uint32_t slot)
{
    mqs_tc_group_t *group = mqs_tc_group(h, g);
    mqs_tc_entry_t *e = mqs_tc_entry(h, g, slot);

    e->flight_prev = group->flight_tail;
    e->flight_next = MQS_TC_NO_SLOT;
    if (group->flight_tail == MQS_TC_NO_SLOT)
        group->flight_head = slot;
    else
        mqs_tc_entry(h, g, group->flight_tail)->flight_next = slot;
    group->flight_tail = slot;
}

static void unlink_flight(mqs_tc_header_t *h, uint32_t g, uint32_t slot)
{
    mqs_tc_group_t *group = mqs_tc_group(h, g);
    mqs_tc_entry_t *e = mqs_tc_entry(h, g, slot);

    if (e->flight_prev == MQS_TC_NO_SLOT)
        group->flight_head = e->flight_next;
    else
        mqs_tc_entry(h, g, e->flight_prev)->flight_next = e->flight_next;
    if (e->flight_next == MQS_TC_NO_SLOT)
        group->flight_tail = e->flight_prev;
    else
        mqs_tc_entry(h, g, e->flight_next)->flight_prev = e->flight_prev;
    e->flight_prev = e->flight_next = MQS_TC_NO_SLOT;
}

/* The first slot to look at for entries of group g in `state`, and the
 * one after `slot`: in-flight entries are on the group's in-flight
 * list, the others need a scan of every used slot. */
static uint32_t first_slot(mqs_tc_header_t *h, uint32_t g, uint32_t state)
{
    if (state == MQS_TC_IN_FLIGHT)
        return mqs_tc_group(h, g)->flight_head;
    return slot_limit(h) > 0 ? 0 : MQS_TC_NO_SLOT;
}

static uint32_t next_slot(mqs_tc_header_t *h, uint32_t g, uint32_t state,
                          uint32_t slot)
{
    if (state == MQS_TC_IN_FLIGHT)
        return mqs_tc_entry(h, g, slot)->flight_next;
    return slot + 1 < slot_limit(h) ? slot + 1 : MQS_TC_NO_SLOT;
}

/* Take an in-flight entry off its group's in-flight list and its
 * consumer's count. */
static void leave_flight(mqs_tc_header_t *h, uint32_t g, mqs_tc_entry_t *e)
{
    mqs_tc_group_t *group = mqs_tc_group(h, g);
    uint32_t consumer = e->consumer;

    unlink_flight(h, g, (uint32_t)(e - mqs_tc_entry(h, g, 0)));
    if (consumer < config_of(h)->params.max_consumers) {
        mqs_tc_consumer_t *c = mqs_tc_consumer(h, consumer);
        if (c->in_flight > 0)
            c->in_flight--;
    }
    e->consumer = MQS_TC_NO_CONSUMER;
    e->sampled_at = 0;
    if (group->in_flight > 0)
        group->in_flight--;
}

/* Entries of unused groups are free, so only used groups are read:
 * reading an untouched page of the file would allocate it. */
static int slot_needed(mqs_tc_header_t *h, uint32_t slot)
{
    uint32_t groups = config_of(h)->params.max_groups;

    if (mqs_tc_slot(h, slot)->retained)
        return 1;
    for (uint32_t g = 0; g < groups; g++) {
        if (!atomic_load_explicit(&mqs_tc_group(h, g)->used,
                                  memory_order_relaxed))
            continue;
        if (mqs_tc_word_state(load_word(mqs_tc_entry(h, g, slot)))
            != MQS_TC_FREE)
            return 1;
    }
    return 0;
}

static void free_slot(mqs_tc_header_t *h, uint32_t slot)
{
    mqs_tc_state_t *s = state_of(h);

    atomic_store_explicit(&mqs_tc_slot(h, slot)->seq, 0,
                          memory_order_release);
    if (s->stored > 0)
        s->stored--;
}

/* Give the pages wholly inside [from, to) of the mapping back to the
 * file system. A tmpfs file frees them, and later reads see zeros.
 * Other file systems reject the advice, so their pages stay. */
static void discard_range(mqs_tc_header_t *h, uint64_t from, uint64_t to)
{
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    uint64_t start = (from + page - 1) & ~(page - 1);
    uint64_t end = to & ~(page - 1);

    if (end > start)
        (void)madvise((char *)h + start, (size_t)(end - start), MADV_REMOVE);
}

/*
 * Once the topic stores no message, take slot_limit back to
 * MQS_TC_GROW_SLOTS and give the memory of the slots past it, and of the
 * lane rings past that many positions, back to /dev/shm. Without it a
 * topic that once held a large backlog keeps that memory for good. With
 * no message stored every entry is free and every lane empty, so each
 * ring restarts at position 0. Entries keep their memory (72 bytes per
 * slot and group), because their tickets must keep growing: a consumer
 * may still hold a stale tag of a slot. Called with the mutex held at
 * the end of an operation that freed slots and at the start of a
 * publish, never while a caller may still read a body it was given.
 */
static void shrink_if_drained(mqs_tc_header_t *h)
{
    mqs_tc_config_t *c = config_of(h);
    mqs_tc_state_t *s = state_of(h);
    uint32_t limit = slot_limit(h);
    uint32_t keep = MQS_TC_GROW_SLOTS;

    if (s->stored != 0 || limit <= keep)
        return;
    s->slot_limit = keep;
    s->alloc_hint = 0;
    for (uint32_t g = 0; g < c->params.max_groups; g++) {
        mqs_tc_group_t *group = mqs_tc_group(h, g);
        for (uint32_t lane = 0; lane < c->params.lane_count; lane++) {
            uint64_t ring;

            group->lanes[lane].head = 0;
            ring = (uint64_t)((char *)ring_of(h, g, lane) - (char *)h);
            discard_range(h, ring + (uint64_t)keep * sizeof(uint32_t),
                          ring + (uint64_t)c->params.capacity
                                 * sizeof(uint32_t));
        }
    }
    discard_range(h, c->slots_offset + (uint64_t)keep * c->slot_stride,
                  c->slots_offset + (uint64_t)limit * c->slot_stride);
}

/* Remove an entry from its group, freeing the slot once no group needs
 * it. */
static void finish(mqs_tc_header_t *h, uint32_t g, uint32_t slot)
{
    store_word(mqs_tc_entry(h, g, slot), mqs_tc_word(MQS_TC_FREE, 0, 0));
    MQS_FAILPOINT("tc_finish_before_free");
    if (!slot_needed(h, slot))
        free_slot(h, slot);
}

static void dead_letter(mqs_tc_header_t *h, uint32_t g, uint32_t slot,
                        uint64_t attempts, uint32_t reason)
{
    mqs_tc_group_t *group = mqs_tc_group(h, g);
    mqs_tc_state_t *s = state_of(h);
    mqs_tc_entry_t *e = mqs_tc_entry(h, g, slot);

    /* deadline_seq orders the dead entries for mqs_tc_next_dead. */
    e->deadline_seq = ++s->timer_seq;
    store_word(e, mqs_tc_word(MQS_TC_DEAD, reason, attempts));
    group->dead++;
    s->counters[MQS_TC_DEAD_LETTERED]++;
    group->counters[MQS_TC_GROUP_DEAD_LETTERED]++;
    if (reason == MQS_TC_REASON_REJECTED)
        s->counters[MQS_TC_DEAD_REJECTED]++;
    else if (reason == MQS_TC_REASON_MAX_ATTEMPTS)
        s->counters[MQS_TC_DEAD_MAX_ATTEMPTS]++;
    else
        s->counters[MQS_TC_DEAD_ACK_TIMEOUT]++;
}

static int exhausted(mqs_tc_header_t *h, uint32_t g, uint64_t attempts)
{
    uint32_t limit = mqs_tc_group(h, g)->max_attempts;

    if (limit == 0)
        limit = config_of(h)->params.max_attempts;
    return limit != 0 && attempts >= limit;
}

/* ---- deadlines ---------------------------------------------------------- */

typedef struct timed {
    double at;
    uint64_t order;
    uint32_t slot;
    uint32_t group;
} timed_t;

static int compare_timed(const void *a, const void *b)
{
    const timed_t *x = a, *y = b;

    if (x->at != y->at)
        return x->at < y->at ? -1 : 1;
    if (x->order != y->order)
        return x->order < y->order ? -1 : 1;
    return 0;
}

/* Entries are taken in batches of at most BATCH_ITEMS, smallest key
 * first, so that no operation allocates. A larger set costs one scan of
 * the entries per batch. 512 items take 12 KiB of stack. */
#define BATCH_ITEMS 512

typedef struct batch {
    timed_t items[BATCH_ITEMS];
    uint32_t count;
    int started;    /* whether `after` is the last key of a batch */
    timed_t after;
} batch_t;

typedef void (*key_fn)(mqs_tc_header_t *, uint32_t, uint32_t, timed_t *);
typedef int (*keep_fn)(mqs_tc_header_t *, uint32_t, mqs_tc_entry_t *,
                       const void *);

static void batch_init(batch_t *b)
{
    b->count = 0;
    b->started = 0;
}

static void swap_timed(timed_t *x, timed_t *y)
{
    timed_t t = *x;

    *x = *y;
    *y = t;
}

/* Offer an item to the batch, a max-heap of the BATCH_ITEMS smallest
 * keys above `after`. */
static void batch_offer(batch_t *b, const timed_t *item)
{
    uint32_t i;

    if (b->started && compare_timed(item, &b->after) <= 0)
        return;
    if (b->count < BATCH_ITEMS) {
        i = b->count++;
        b->items[i] = *item;
        while (i > 0 && compare_timed(&b->items[(i - 1) / 2],
                                      &b->items[i]) < 0) {
            swap_timed(&b->items[(i - 1) / 2], &b->items[i]);
            i = (i - 1) / 2;
        }
        return;
    }
    if (compare_timed(item, &b->items[0]) >= 0)
        return;
    b->items[0] = *item;
    i = 0;
    for (;;) {
        uint32_t left = 2 * i + 1, right = left + 1, largest = i;
        if (left < b->count
            && compare_timed(&b->items[left], &b->items[largest]) > 0)
            largest = left;
        if (right < b->count
            && compare_timed(&b->items[right], &b->items[largest]) > 0)
            largest = right;
        if (largest == i)
            break;
        swap_timed(&b->items[i], &b->items[largest]);
        i = largest;
    }
}

/* Sort the batch by key and move `after` to its last key; return its
 * count. A full batch may have more items after it. */
static uint32_t batch_finish(batch_t *b)
{
    if (b->count > 1)
        qsort(b->items, b->count, sizeof(timed_t), compare_timed);
    if (b->count > 0) {
        b->after = b->items[b->count - 1];
        b->started = 1;
    }
    return b->count;
}

/* Fill `b` with the next batch of the slots of group g whose entry is in
 * state `state` and passes `keep`, ordered by `key`. */
static uint32_t next_batch(mqs_tc_header_t *h, uint32_t g, uint32_t state,
                           keep_fn keep, const void *arg, key_fn key,
                           batch_t *b)
{
    b->count = 0;
    for (uint32_t slot = first_slot(h, g, state); slot != MQS_TC_NO_SLOT;
         slot = next_slot(h, g, state, slot)) {
        mqs_tc_entry_t *e = mqs_tc_entry(h, g, slot);
        timed_t item;
        if (mqs_tc_word_state(load_word(e)) != state
            || !keep(h, slot, e, arg))
            continue;
        key(h, g, slot, &item);
        item.slot = slot;
        item.group = g;
        batch_offer(b, &item);
    }
    return batch_finish(b);
}

/* Key: the message's seq (publish order). */
static void publish_key(mqs_tc_header_t *h, uint32_t g, uint32_t slot,
                        timed_t *out)
{
    (void)g;
    out->at = 0;
    out->order = load_seq(mqs_tc_slot(h, slot));
}

/* Key: the entry's ready_seq (lane order), which is negative for head
 * pushes, so its sign bit is flipped to keep the order unsigned. */
static void ready_key(mqs_tc_header_t *h, uint32_t g, uint32_t slot,
                      timed_t *out)
{
    out->at = 0;
    out->order = (uint64_t)mqs_tc_entry(h, g, slot)->ready_seq
                 ^ ((uint64_t)1 << 63);
}

typedef void (*visit_fn)(mqs_tc_header_t *, uint32_t, uint32_t, void *);

static int matches(mqs_tc_header_t *h, uint32_t g, uint32_t slot,
                   uint32_t state, keep_fn keep, const void *arg)
{
    mqs_tc_entry_t *e = mqs_tc_entry(h, g, slot);

    return mqs_tc_word_state(load_word(e)) == state
           && keep(h, slot, e, arg);
}

/* Call `visit` on each slot of group g whose entry is in state `state`
 * and passes `keep`, in `key` order, and return how many. `visit` may
 * change the entry. The slots are sorted in a scratch array; when it
 * cannot be allocated, each batch of BATCH_ITEMS costs one more scan. */
static int64_t visit_in_order(mqs_tc_header_t *h, uint32_t g,
                              uint32_t state, keep_fn keep, const void *arg,
                              key_fn key, visit_fn visit, void *context)
{
    uint64_t count = 0, filled = 0;
    timed_t *items;
    batch_t batch;

    for (uint32_t slot = first_slot(h, g, state); slot != MQS_TC_NO_SLOT;
         slot = next_slot(h, g, state, slot))
        count += matches(h, g, slot, state, keep, arg);
    if (count == 0)
        return 0;
    items = malloc(count * sizeof(timed_t));
    if (items != NULL) {
        for (uint32_t slot = first_slot(h, g, state);
             slot != MQS_TC_NO_SLOT && filled < count;
             slot = next_slot(h, g, state, slot)) {
            if (!matches(h, g, slot, state, keep, arg))
                continue;
            key(h, g, slot, &items[filled]);
            items[filled].slot = slot;
            items[filled].group = g;
            filled++;
        }
        qsort(items, filled, sizeof(timed_t), compare_timed);
        for (uint64_t i = 0; i < filled; i++)
            visit(h, g, items[i].slot, context);
        free(items);
        return (int64_t)filled;
    }
    batch_init(&batch);
    do {
        next_batch(h, g, state, keep, arg, key, &batch);
        for (uint32_t i = 0; i < batch.count; i++)
            visit(h, g, batch.items[i].slot, context);
        filled += batch.count;
    } while (batch.count == BATCH_ITEMS);
    return (int64_t)filled;
}

static void recompute_deadlines(mqs_tc_header_t *h)
{
    mqs_tc_params_t *p = &config_of(h)->params;
    double next = INFINITY;

    for (uint32_t g = 0; g < p->max_groups; g++) {
        mqs_tc_group_t *group = mqs_tc_group(h, g);
        double group_next = INFINITY;
        if (atomic_load_explicit(&group->used, memory_order_relaxed)) {
            for (uint32_t slot = group->flight_head;
                 slot != MQS_TC_NO_SLOT;
                 slot = mqs_tc_entry(h, g, slot)->flight_next) {
                mqs_tc_entry_t *e = mqs_tc_entry(h, g, slot);
                if (e->deadline < group_next)
                    group_next = e->deadline;
            }
        }
        group->next_deadline = group_next;
        if (group_next < next)
            next = group_next;
    }
    state_of(h)->next_deadline = next;
}

/* Count a delivered message put back for another delivery: after a nack
 * with requeue, a missed ack deadline, or the close of the consumer that
 * held it (a release of unseen messages is not one). Lock held. */
static void count_redelivery(mqs_tc_header_t *h, uint32_t g)
{
    state_of(h)->counters[MQS_TC_REDELIVERED]++;
    mqs_tc_group(h, g)->counters[MQS_TC_GROUP_REDELIVERED]++;
}

static void expire(mqs_tc_header_t *h, uint32_t g, uint32_t slot,
                   double now)
{
    mqs_tc_group_t *group = mqs_tc_group(h, g);
    mqs_tc_entry_t *e = mqs_tc_entry(h, g, slot);
    uint64_t attempts = mqs_tc_word_attempts(load_word(e));

    leave_flight(h, g, e);
    e->timed_out = 1;
    if (exhausted(h, g, attempts)) {
        group->counters[MQS_TC_GROUP_ERRORS]++;
        dead_letter(h, g, slot, attempts, MQS_TC_REASON_ACK_TIMEOUT);
    } else {
        count_redelivery(h, g);
        make_ready(h, g, slot, attempts, 0, now);
    }
}

void mqs_tc_advance(mqs_tc_header_t *h, double now)
{
    mqs_tc_params_t *p = &config_of(h)->params;
    batch_t batch;

    if (now < state_of(h)->next_deadline)
        return;
    /* Fire in deadline order across every group, then in the order the
     * deadlines were set (timer_seq is shared by the groups), as
     * TopicState's timing wheel does. An expired entry leaves the
     * in-flight state, so the next batch starts after it. */
    batch_init(&batch);
    do {
        batch.count = 0;
        for (uint32_t g = 0; g < p->max_groups; g++) {
            mqs_tc_group_t *group = mqs_tc_group(h, g);
            if (!atomic_load_explicit(&group->used, memory_order_relaxed)
                || group->next_deadline > now)
                continue;
            for (uint32_t slot = group->flight_head;
                 slot != MQS_TC_NO_SLOT;
                 slot = mqs_tc_entry(h, g, slot)->flight_next) {
                mqs_tc_entry_t *e = mqs_tc_entry(h, g, slot);
                timed_t item;
                if (e->deadline > now)
                    continue;
                item.at = e->deadline;
                item.order = e->deadline_seq;
                item.slot = slot;
                item.group = g;
                batch_offer(&batch, &item);
            }
        }
        batch_finish(&batch);
        for (uint32_t i = 0; i < batch.count; i++)
            expire(h, batch.items[i].group, batch.items[i].slot, now);
    } while (batch.count == BATCH_ITEMS);
    recompute_deadlines(h);
}

/* ---- publishing --------------------------------------------------------- */

/* Find a free slot for a new message and set *out to it, growing
 * slot_limit when every slot below it is taken. Returns MQS_OK, or
 * MQS_EFULL when all `capacity` slots are taken. */
static int take_slot(mqs_tc_header_t *h, uint32_t *out)
{
    mqs_tc_state_t *s = state_of(h);
    uint32_t capacity = config_of(h)->params.capacity;
    uint32_t limit = slot_limit(h);
    uint32_t slot = UINT32_MAX;

    /* Acks mostly come in publish order, so the slot after the last one
     * taken is usually free. NOTE: a search among scattered free slots
     * costs O(slot_limit). */
    if (s->stored < limit) {
        for (uint32_t i = 0; i < limit; i++) {
            uint32_t candidate = (s->alloc_hint + i) % limit;
            if (load_seq(mqs_tc_slot(h, candidate)) == 0) {
                slot = candidate;
                break;
            }
        }
    }
    if (slot == UINT32_MAX) {
        /* Every used slot is taken: grow the used region. The new limit
         * is stored before the slot is written, so repair, which scans
         * up to the limit, finds every slot a dead publisher touched. */
        if (limit >= capacity)
            return MQS_EFULL;
        slot = limit;
        s->slot_limit = capacity - limit < MQS_TC_GROW_SLOTS
                        ? capacity : limit + MQS_TC_GROW_SLOTS;
    }
    *out = slot;
    return MQS_OK;
}

int64_t mqs_tc_publish(mqs_tc_header_t *h, const void *body,
                       uint32_t length, uint32_t priority, double timestamp,
                       double now, uint32_t *slot_out)
{
    mqs_tc_config_t *c = config_of(h);
    mqs_tc_state_t *s = state_of(h);
    uint32_t slot = UINT32_MAX;
    mqs_tc_slot_t *stored;
    uint64_t seq;

    if (priority > 9)
        return MQS_EINVAL;
    if (length > c->params.slot_bytes)
        return MQS_ETOOBIG;
    mqs_tc_advance(h, now);
    /* A fetch with auto_ack may have emptied the topic: its bodies were
     * copied by now. */
    shrink_if_drained(h);
    if (c->max_stored && s->stored >= c->max_stored)
        return MQS_TC_ELIMIT;
    if (take_slot(h, &slot) != MQS_OK)
        return MQS_EFULL;
    stored = mqs_tc_slot(h, slot);
    stored->length = length;
    stored->priority = (uint8_t)priority;
    stored->lane = c->lane_of[priority];
    stored->retained = s->groups_used == 0;
    stored->timestamp = timestamp;
    if (length > 0)
        memcpy(body_of(stored), body, length);
    for (uint32_t g = 0; g < c->params.max_groups; g++) {
        mqs_tc_group_t *group = mqs_tc_group(h, g);
        if (!atomic_load_explicit(&group->used, memory_order_relaxed))
            continue;
        mqs_tc_entry_t *e = mqs_tc_entry(h, g, slot);
        e->ready_at = now;
        e->timed_out = 0;
        e->ready_seq = ++group->tail_seq;
        store_word(e, mqs_tc_word(MQS_TC_READY, 0, 0));
    }
    MQS_FAILPOINT("tc_publish_before_commit");
    seq = s->next_seq + 1;
    atomic_store_explicit(&stored->seq, seq, memory_order_release);
    MQS_FAILPOINT("tc_publish_after_commit");
    /* The published counter is next_seq, so mqs_tc_repair can redo both
     * from the committed slots. */
    s->next_seq = seq;
    s->counters[MQS_TC_PUBLISHED] = (int64_t)seq;
    s->stored++;
    for (uint32_t g = 0; g < c->params.max_groups; g++) {
        mqs_tc_group_t *group = mqs_tc_group(h, g);
        if (!atomic_load_explicit(&group->used, memory_order_relaxed))
            continue;
        push_tail(h, g, stored->lane, slot);
        group->ready++;
    }
    s->alloc_hint = slot + 1;
    if (slot_out != NULL)
        *slot_out = slot;
    return (int64_t)seq;
}

/* ---- groups and consumers ----------------------------------------------- */

int64_t mqs_tc_find_group(mqs_tc_header_t *h, const char *name,
                          uint32_t name_length)
{
    uint32_t groups = config_of(h)->params.max_groups;

    for (uint32_t g = 0; g < groups; g++) {
        mqs_tc_group_t *group = mqs_tc_group(h, g);
        if (atomic_load_explicit(&group->used, memory_order_acquire)
            && group->name_length == name_length
            && memcmp(group->name, name, name_length) == 0)
            return g;
    }
    return -1;
}

static int stored_slot(mqs_tc_header_t *h, uint32_t slot, mqs_tc_entry_t *e,
                       const void *arg)
{
    (void)e;
    (void)arg;
    return load_seq(mqs_tc_slot(h, slot)) != 0;
}

static void push_ready_entry(mqs_tc_header_t *h, uint32_t g, uint32_t slot,
                             void *context)
{
    (void)context;
    push_tail(h, g, mqs_tc_slot(h, slot)->lane, slot);
    mqs_tc_group(h, g)->ready++;
}

/* Put every ready entry of group g at its lane's tail, in ready_seq
 * order. */
static void push_ready_in_order(mqs_tc_header_t *h, uint32_t g)
{
    visit_in_order(h, g, MQS_TC_READY, stored_slot, NULL, ready_key,
                   push_ready_entry, NULL);
}

/* Make a stored message ready in a group being created (`context` is
 * the time). */
static void enter_new_group(mqs_tc_header_t *h, uint32_t g, uint32_t slot,
                            void *context)
{
    mqs_tc_entry_t *e = mqs_tc_entry(h, g, slot);

    e->ready_at = *(const double *)context;
    e->timed_out = 0;
    e->ready_seq = ++mqs_tc_group(h, g)->tail_seq;
    store_word(e, mqs_tc_word(MQS_TC_READY, 0, 0));
}

/* Start a new round of the weighted scheduler as LaneScheduler.restart
 * does. The cursor goes to the lowest lane with no credits, so that the
 * next step moves to the highest lane and starts its turn. */
static void restart_round(mqs_tc_group_t *group, uint32_t lane_count)
{
    group->cursor = lane_count - 1;
    memset(group->deficits, 0, sizeof(group->deficits));
}

/* Return the index of the first unused group, or max_groups when every
 * group is used. */
static uint32_t unused_group(mqs_tc_header_t *h)
{
    uint32_t limit = config_of(h)->params.max_groups;
    uint32_t g;

    for (g = 0; g < limit; g++) {
        if (!atomic_load_explicit(&mqs_tc_group(h, g)->used,
                                  memory_order_relaxed))
            break;
    }
    return g;
}

/* Name an unused group and give it the fields of a new group, with no
 * entry and the topic's max_attempts. */
static void reset_group(mqs_tc_header_t *h, mqs_tc_group_t *group,
                        const char *name, uint32_t name_length)
{
    memcpy(group->name, name, name_length);
    group->name_length = name_length;
    group->max_attempts = 0;
    restart_round(group, config_of(h)->params.lane_count);
    group->tail_seq = 0;
    group->front_seq = 0;
    group->ready = group->in_flight = group->dead = 0;
    group->flight_head = group->flight_tail = MQS_TC_NO_SLOT;
    group->next_deadline = INFINITY;
    memset(group->lanes, 0, sizeof(group->lanes));
    memset(group->counters, 0, sizeof(group->counters));
    group->countdown = 1;
    mqs_hist_reset(&group->enqueue_to_deliver);
    mqs_hist_reset(&group->deliver_to_ack);
}

int64_t mqs_tc_open_group(mqs_tc_header_t *h, const char *name,
                          uint32_t name_length, int earliest, double now)
{
    mqs_tc_config_t *c = config_of(h);
    mqs_tc_state_t *s = state_of(h);
    mqs_tc_group_t *group = NULL;
    int64_t found, count = 0;
    uint32_t g;
    int first;

    if (name_length == 0 || name_length > MQS_TC_NAME_BYTES)
        return MQS_EINVAL;
    mqs_tc_advance(h, now);
    found = mqs_tc_find_group(h, name, name_length);
    if (found >= 0)
        return found;
    g = unused_group(h);
    if (g == c->params.max_groups)
        return MQS_EFULL;
    group = mqs_tc_group(h, g);
    /* Entries of an unused group are all free (mqs_tc_repair clears a
     * group whose creation did not finish); tickets stay. */
    s->opening_group = g + 1;
    reset_group(h, group, name, name_length);
    if (earliest)
        count = visit_in_order(h, g, MQS_TC_FREE, stored_slot, NULL,
                               publish_key, enter_new_group, &now);
    MQS_FAILPOINT("tc_open_group_before_commit");
    atomic_store_explicit(&group->used, 1, memory_order_release);
    s->opening_group = 0;
    if (count > 0)
        push_ready_in_order(h, g);
    first = s->groups_used == 0;
    s->groups_used++;
    if (first) {
        /* Messages kept for the first group: those it did not take are
         * dropped. */
        uint32_t limit = slot_limit(h);
        for (uint32_t slot = 0; slot < limit; slot++) {
            mqs_tc_slot_t *stored = mqs_tc_slot(h, slot);
            if (load_seq(stored) == 0 || !stored->retained)
                continue;
            stored->retained = 0;
            if (!slot_needed(h, slot)) {
                free_slot(h, slot);
                s->counters[MQS_TC_DROPPED_UNSUBSCRIBED]++;
            }
        }
    }
    return g;
}

void mqs_tc_set_group_attempts(mqs_tc_header_t *h, uint32_t group,
                               uint32_t max_attempts)
{
    mqs_tc_group(h, group)->max_attempts = max_attempts;
}

int64_t mqs_tc_open_consumer(mqs_tc_header_t *h, uint32_t group,
                             uint32_t prefetch, uint64_t owner, double now)
{
    mqs_tc_params_t *p = &config_of(h)->params;

    if (group >= p->max_groups
        || !atomic_load_explicit(&mqs_tc_group(h, group)->used,
                                 memory_order_relaxed))
        return MQS_EINVAL;
    mqs_tc_advance(h, now);
    for (uint32_t i = 0; i < p->max_consumers; i++) {
        mqs_tc_consumer_t *c = mqs_tc_consumer(h, i);
        if (atomic_load_explicit(&c->used, memory_order_relaxed))
            continue;
        c->group = group;
        c->prefetch = prefetch;
        c->in_flight = 0;
        c->owner = owner;
        atomic_store_explicit(&c->used, 1, memory_order_release);
        return i;
    }
    return MQS_EFULL;
}

static int owned_by(mqs_tc_header_t *h, uint32_t slot, mqs_tc_entry_t *e,
                    const void *arg)
{
    (void)h;
    (void)slot;
    return e->consumer == *(const uint32_t *)arg;
}

/* Requeue an in-flight entry at its lane's tail (`context` is the
 * time). */
static void requeue_entry(mqs_tc_header_t *h, uint32_t g, uint32_t slot,
                          void *context)
{
    mqs_tc_entry_t *e = mqs_tc_entry(h, g, slot);
    uint64_t attempts = mqs_tc_word_attempts(load_word(e));

    leave_flight(h, g, e);
    MQS_FAILPOINT("tc_requeue_after_leave");
    count_redelivery(h, g);
    make_ready(h, g, slot, attempts, 0, *(const double *)context);
}

/* Requeue in publish order the in-flight entries of group g that pass
 * `keep`; return how many. */
static int64_t requeue_where(mqs_tc_header_t *h, uint32_t g, keep_fn keep,
                             const void *arg, double now)
{
    return visit_in_order(h, g, MQS_TC_IN_FLIGHT, keep, arg, publish_key,
                          requeue_entry, &now);
}

int64_t mqs_tc_close_consumer(mqs_tc_header_t *h, uint32_t consumer,
                              double now)
{
    mqs_tc_consumer_t *c;

    if (consumer >= config_of(h)->params.max_consumers)
        return MQS_EINVAL;
    c = mqs_tc_consumer(h, consumer);
    if (!atomic_load_explicit(&c->used, memory_order_relaxed))
        return MQS_EINVAL;
    mqs_tc_advance(h, now);
    /* Closed first, so that if this process dies while requeueing,
     * mqs_tc_repair puts back every entry it still holds. */
    atomic_store_explicit(&c->used, 0, memory_order_release);
    return requeue_where(h, c->group, owned_by, &consumer, now);
}

/* ---- delivering --------------------------------------------------------- */

/* Pick the lane of the next delivery as LaneScheduler.pick does; return
 * its index or -1. */
static int pick_lane(mqs_tc_header_t *h, mqs_tc_group_t *group)
{
    mqs_tc_params_t *p = &config_of(h)->params;
    uint32_t lanes = p->lane_count;
    uint32_t eligible = 0, only = 0, count = 0;

    for (uint32_t i = 0; i < lanes; i++) {
        if (group->lanes[i].count > 0) {
            eligible |= 1u << i;
            only = i;
            count++;
        }
    }
    if (count == 0)
        return -1;
    if (count == 1 && !p->strict) {
        /* Only this lane has messages, so no other lane's share needs
         * keeping. A new round lets the highest lane go first the next
         * time several lanes are ready. */
        restart_round(group, lanes);
        return (int)only;
    }
    if (p->strict) {
        for (uint32_t i = 0; i < lanes; i++)
            if (eligible & (1u << i))
                return (int)i;
    }
    for (uint32_t turn = 0; turn < 2 * lanes + 1; turn++) {
        uint32_t index = group->cursor;
        if (eligible & (1u << index)) {
            if (group->deficits[index] >= 1) {
                group->deficits[index]--;
                return (int)index;
            }
        } else {
            group->deficits[index] = 0;
        }
        group->cursor = (index + 1) % lanes;
        if (eligible & (1u << group->cursor))
            group->deficits[group->cursor] += p->weights[group->cursor];
    }
    return -1;  /* unreachable: every weight is at least 1 */
}

/* Round seconds to ns; mqs_hist_record clamps negative values to 0. */
static int64_t nanoseconds(double seconds)
{
    return (int64_t)(seconds * 1e9 + (seconds < 0 ? -0.5 : 0.5));
}

/*
 * Note an ack or delivery of (g, slot) that is about to change the
 * entry and then the counters, so that mqs_tc_repair can set those
 * counters to match the entry if this holder dies in between. The kind
 * is cleared first and stored last, so a repair never reads a kind with
 * the fields of another operation. A holder killed at any point has
 * stored everything before that point. Only the compiler could reorder
 * those stores, and the fences forbid it.
 */
static void pending_begin(mqs_tc_header_t *h, uint32_t kind, uint32_t g,
                          uint32_t slot, uint64_t ticket)
{
    mqs_tc_state_t *s = state_of(h);
    mqs_tc_group_t *group = mqs_tc_group(h, g);

    atomic_store_explicit(&s->pending_kind, 0, memory_order_relaxed);
    atomic_signal_fence(memory_order_seq_cst);
    s->pending_group = g;
    s->pending_slot = slot;
    s->pending_ticket = ticket;
    s->pending_before[MQS_TC_BEFORE_DELIVERED] =
        s->counters[MQS_TC_DELIVERED];
    s->pending_before[MQS_TC_BEFORE_ACKED] = s->counters[MQS_TC_ACKED];
    s->pending_before[MQS_TC_BEFORE_GROUP_DELIVERED] =
        group->counters[MQS_TC_GROUP_DELIVERED];
    s->pending_before[MQS_TC_BEFORE_GROUP_ACKED] =
        group->counters[MQS_TC_GROUP_ACKED];
    atomic_signal_fence(memory_order_seq_cst);
    atomic_store_explicit(&s->pending_kind, kind, memory_order_relaxed);
    atomic_signal_fence(memory_order_seq_cst);
}

static void pending_end(mqs_tc_header_t *h)
{
    atomic_signal_fence(memory_order_seq_cst);
    atomic_store_explicit(&state_of(h)->pending_kind, 0,
                          memory_order_relaxed);
}

/* Record the enqueue-to-deliver latency of a sampled delivery and mark
 * it for deliver-to-ack, as TopicState._sample_delivery does. */
static void sample_delivery(mqs_tc_header_t *h, mqs_tc_group_t *group,
                            mqs_tc_entry_t *e, double now, int auto_ack)
{
    uint32_t every = config_of(h)->params.sample_every;

    if (every == 0) {
        group->countdown = INT64_MAX;
        return;
    }
    group->countdown = every;
    mqs_hist_record(&group->enqueue_to_deliver,
                    nanoseconds(now - e->ready_at));
    if (!auto_ack)
        e->sampled_at = now;
}

int64_t mqs_tc_fetch(mqs_tc_header_t *h, uint32_t consumer,
                     uint32_t max_items, double ack_timeout, int auto_ack,
                     double now, mqs_tc_delivery_t *out)
{
    mqs_tc_state_t *s = state_of(h);
    mqs_tc_consumer_t *c;
    mqs_tc_group_t *group;
    uint32_t g, limit, n = 0;

    if (consumer >= config_of(h)->params.max_consumers)
        return MQS_ECLOSED;
    c = mqs_tc_consumer(h, consumer);
    if (!atomic_load_explicit(&c->used, memory_order_relaxed))
        return MQS_ECLOSED;
    mqs_tc_advance(h, now);
    g = c->group;
    group = mqs_tc_group(h, g);
    limit = max_items;
    if (!auto_ack) {
        uint32_t room = c->prefetch > c->in_flight
                        ? c->prefetch - c->in_flight : 0;
        if (room < limit)
            limit = room;
    }
    while (n < limit) {
        int lane = pick_lane(h, group);
        if (lane < 0)
            break;
        uint32_t slot = pop_head(h, g, (uint32_t)lane);
        mqs_tc_slot_t *stored = mqs_tc_slot(h, slot);
        mqs_tc_entry_t *e = mqs_tc_entry(h, g, slot);
        uint64_t attempts = mqs_tc_word_attempts(load_word(e)) + 1;
        mqs_tc_delivery_t *d = &out[n++];

        pending_begin(h, auto_ack ? MQS_TC_PENDING_FETCH_AUTO_ACK
                                  : MQS_TC_PENDING_FETCH,
                      g, slot, e->ticket + 1);
        group->ready--;
        e->ticket++;
        d->slot = slot;
        d->length = stored->length;
        d->seq = load_seq(stored);
        d->ticket = e->ticket;
        d->attempts = attempts;
        d->priority = stored->priority;
        d->reserved = 0;
        d->timestamp = stored->timestamp;
        d->body = body_of(stored);
        s->counters[MQS_TC_DELIVERED]++;
        group->counters[MQS_TC_GROUP_DELIVERED]++;
        MQS_FAILPOINT("tc_fetch_after_count");
        e->sampled_at = 0;
        if (--group->countdown <= 0)
            sample_delivery(h, group, e, now, auto_ack);
        if (auto_ack) {
            s->counters[MQS_TC_ACKED]++;
            group->counters[MQS_TC_GROUP_ACKED]++;
            /* The body stays in place until the next publish, which
             * needs the mutex this caller holds. */
            finish(h, g, slot);
            continue;
        }
        e->consumer = consumer;
        set_deadline(h, g, e, now + ack_timeout);
        link_flight(h, g, slot);
        store_word(e, mqs_tc_word(MQS_TC_IN_FLIGHT, 0, attempts));
        MQS_FAILPOINT("tc_fetch_after_commit");
        c->in_flight++;
        group->in_flight++;
    }
    pending_end(h);
    return n;
}

/* Return the entry of a live in-flight tag, or NULL (counted). */
static mqs_tc_entry_t *live(mqs_tc_header_t *h, uint32_t g, uint32_t slot,
                            uint64_t ticket, double now)
{
    mqs_tc_params_t *p = &config_of(h)->params;
    mqs_tc_entry_t *e;

    mqs_tc_advance(h, now);
    if (g >= p->max_groups || slot >= slot_limit(h)
        || !atomic_load_explicit(&mqs_tc_group(h, g)->used,
                                 memory_order_relaxed))
        goto stale;
    e = mqs_tc_entry(h, g, slot);
    if (mqs_tc_word_state(load_word(e)) != MQS_TC_IN_FLIGHT
        || e->ticket != ticket)
        goto stale;
    return e;
stale:
    state_of(h)->counters[MQS_TC_LATE_ACKS]++;
    return NULL;
}

int mqs_tc_ack(mqs_tc_header_t *h, uint32_t group, uint32_t slot,
               uint64_t ticket, double now)
{
    mqs_tc_entry_t *e = live(h, group, slot, ticket, now);

    if (e == NULL)
        return 0;
    pending_begin(h, MQS_TC_PENDING_ACK, group, slot, ticket);
    state_of(h)->counters[MQS_TC_ACKED]++;
    mqs_tc_group(h, group)->counters[MQS_TC_GROUP_ACKED]++;
    MQS_FAILPOINT("tc_ack_after_count");
    if (e->sampled_at != 0)
        mqs_hist_record(&mqs_tc_group(h, group)->deliver_to_ack,
                        nanoseconds(now - e->sampled_at));
    leave_flight(h, group, e);
    finish(h, group, slot);
    pending_end(h);
    shrink_if_drained(h);
    return 1;
}

int mqs_tc_nack(mqs_tc_header_t *h, uint32_t group, uint32_t slot,
                uint64_t ticket, int requeue, double now)
{
    mqs_tc_entry_t *e = live(h, group, slot, ticket, now);
    mqs_tc_group_t *g;
    uint64_t attempts;

    if (e == NULL)
        return 0;
    g = mqs_tc_group(h, group);
    state_of(h)->counters[MQS_TC_NACKED]++;
    g->counters[MQS_TC_GROUP_NACKED]++;
    g->counters[MQS_TC_GROUP_ERRORS]++;
    attempts = mqs_tc_word_attempts(load_word(e));
    leave_flight(h, group, e);
    if (!requeue)
        dead_letter(h, group, slot, attempts, MQS_TC_REASON_REJECTED);
    else if (exhausted(h, group, attempts))
        dead_letter(h, group, slot, attempts, MQS_TC_REASON_MAX_ATTEMPTS);
    else {
        count_redelivery(h, group);
        make_ready(h, group, slot, attempts, 0, now);
    }
    return 1;
}

int mqs_tc_extend(mqs_tc_header_t *h, uint32_t group, uint32_t slot,
                  uint64_t ticket, double seconds, double now)
{
    mqs_tc_entry_t *e = live(h, group, slot, ticket, now);

    if (e == NULL)
        return 0;
    set_deadline(h, group, e, now + seconds);
    return 1;
}

int64_t mqs_tc_release(mqs_tc_header_t *h, uint32_t group,
                       const uint32_t *slots, const uint64_t *tickets,
                       uint32_t count, double now)
{
    int64_t returned = 0;
    unsigned char *alive;

    if (count == 0)
        return 0;
    alive = malloc(count);
    if (alive == NULL)
        return MQS_ENOMEM;
    for (uint32_t i = 0; i < count; i++)
        alive[i] = live(h, group, slots[i], tickets[i], now) != NULL;
    /* Reversed, so that pushing each to its lane's head keeps the order;
     * a tag named twice goes back once. */
    for (uint32_t i = count; i-- > 0;) {
        mqs_tc_entry_t *e;
        uint64_t word;
        if (!alive[i])
            continue;
        e = mqs_tc_entry(h, group, slots[i]);
        word = load_word(e);
        if (mqs_tc_word_state(word) != MQS_TC_IN_FLIGHT)
            continue;
        leave_flight(h, group, e);
        make_ready(h, group, slots[i], mqs_tc_word_attempts(word) - 1, 1,
                   now);
        returned++;
    }
    free(alive);
    return returned;
}

/* ---- dead entries and statistics ---------------------------------------- */

int mqs_tc_next_dead(mqs_tc_header_t *h, mqs_tc_dead_t *out)
{
    mqs_tc_params_t *p = &config_of(h)->params;
    uint32_t limit = slot_limit(h);
    uint64_t best_order = UINT64_MAX;
    uint32_t best_group = 0, best_slot = 0;
    int found = 0;

    for (uint32_t g = 0; g < p->max_groups; g++) {
        if (mqs_tc_group(h, g)->dead == 0)
            continue;
        for (uint32_t slot = 0; slot < limit; slot++) {
            mqs_tc_entry_t *e = mqs_tc_entry(h, g, slot);
            if (mqs_tc_word_state(load_word(e)) == MQS_TC_DEAD
                && e->deadline_seq < best_order) {
                best_order = e->deadline_seq;
                best_group = g;
                best_slot = slot;
                found = 1;
            }
        }
    }
    if (!found)
        return 0;
    mqs_tc_slot_t *stored = mqs_tc_slot(h, best_slot);
    uint64_t word = load_word(mqs_tc_entry(h, best_group, best_slot));
    out->group = best_group;
    out->slot = best_slot;
    out->seq = load_seq(stored);
    out->attempts = mqs_tc_word_attempts(word);
    out->reason = mqs_tc_word_reason(word);
    out->priority = stored->priority;
    out->length = stored->length;
    out->reserved = 0;
    out->timestamp = stored->timestamp;
    out->body = body_of(stored);
    return 1;
}

void mqs_tc_drop_dead(mqs_tc_header_t *h, uint32_t group, uint32_t slot)
{
    mqs_tc_group_t *g = mqs_tc_group(h, group);
    mqs_tc_entry_t *e = mqs_tc_entry(h, group, slot);

    if (mqs_tc_word_state(load_word(e)) != MQS_TC_DEAD)
        return;
    finish(h, group, slot);
    if (g->dead > 0)
        g->dead--;
    shrink_if_drained(h);
}

int mqs_tc_oldest_ready(mqs_tc_header_t *h, uint32_t group, double *out)
{
    mqs_tc_group_t *g = mqs_tc_group(h, group);
    int found = 0;

    for (uint32_t lane = 0; lane < config_of(h)->params.lane_count; lane++) {
        mqs_tc_lane_t *l = &g->lanes[lane];
        double ready_at;
        if (l->count == 0)
            continue;
        ready_at = mqs_tc_entry(h, group, ring_of(h, group, lane)[l->head])
                       ->ready_at;
        if (!found || ready_at < *out)
            *out = ready_at;
        found = 1;
    }
    return found;
}

void mqs_tc_stats(mqs_tc_header_t *h, mqs_tc_stats_t *out)
{
    mqs_tc_params_t *p = &config_of(h)->params;

    memset(out, 0, sizeof(*out));
    out->stored = state_of(h)->stored;
    for (uint32_t g = 0; g < p->max_groups; g++) {
        mqs_tc_group_t *group = mqs_tc_group(h, g);
        if (!atomic_load_explicit(&group->used, memory_order_relaxed))
            continue;
        out->ready += group->ready;
        out->in_flight += group->in_flight;
        out->dead += group->dead;
    }
}

/* ---- importing ---------------------------------------------------------- */

int64_t mqs_tc_import_group(mqs_tc_header_t *h, const char *name,
                            uint32_t name_length, uint32_t max_attempts,
                            const int64_t *counters)
{
    mqs_tc_config_t *c = config_of(h);
    mqs_tc_state_t *s = state_of(h);
    mqs_tc_group_t *group = NULL;
    uint32_t g;

    if (name_length == 0 || name_length > MQS_TC_NAME_BYTES
        || mqs_tc_find_group(h, name, name_length) >= 0)
        return MQS_EINVAL;
    g = unused_group(h);
    if (g == c->params.max_groups)
        return MQS_EFULL;
    group = mqs_tc_group(h, g);
    reset_group(h, group, name, name_length);
    group->max_attempts = max_attempts;
    memcpy(group->counters, counters, sizeof(group->counters));
    /* No entry of the group is touched before it is used, so a repair
     * never needs to clear it (opening_group stays 0). */
    atomic_store_explicit(&group->used, 1, memory_order_release);
    s->groups_used++;
    return g;
}

int64_t mqs_tc_import_message(mqs_tc_header_t *h, uint64_t seq,
                              const void *body, uint32_t length,
                              uint32_t priority, double timestamp,
                              int retained)
{
    mqs_tc_config_t *c = config_of(h);
    mqs_tc_state_t *s = state_of(h);
    mqs_tc_slot_t *stored;
    uint32_t slot;

    if (seq == 0 || seq <= s->next_seq || priority > 9
        || (retained && s->groups_used > 0))
        return MQS_EINVAL;
    if (length > c->params.slot_bytes)
        return MQS_ETOOBIG;
    if (take_slot(h, &slot) != MQS_OK)
        return MQS_EFULL;
    stored = mqs_tc_slot(h, slot);
    stored->length = length;
    stored->priority = (uint8_t)priority;
    stored->lane = c->lane_of[priority];
    stored->retained = retained != 0;
    stored->timestamp = timestamp;
    if (length > 0)
        memcpy(body_of(stored), body, length);
    /* Committed last, as a publish commits. Until its entries are
     * imported, a repair frees it as a slot no group needs. */
    atomic_store_explicit(&stored->seq, seq, memory_order_release);
    MQS_FAILPOINT("tc_import_message_after_commit");
    s->next_seq = seq;
    s->counters[MQS_TC_PUBLISHED] = (int64_t)seq;
    s->stored++;
    s->alloc_hint = slot + 1;
    return slot;
}

int mqs_tc_import_entry(mqs_tc_header_t *h, uint32_t group, uint32_t slot,
                        uint32_t state, uint32_t reason, uint64_t attempts,
                        double now)
{
    mqs_tc_params_t *p = &config_of(h)->params;
    mqs_tc_group_t *g;
    mqs_tc_entry_t *e;

    if (group >= p->max_groups || slot >= slot_limit(h)
        || attempts >= ((uint64_t)1 << 48))
        return MQS_EINVAL;
    g = mqs_tc_group(h, group);
    if (!atomic_load_explicit(&g->used, memory_order_relaxed)
        || load_seq(mqs_tc_slot(h, slot)) == 0)
        return MQS_EINVAL;
    e = mqs_tc_entry(h, group, slot);
    if (mqs_tc_word_state(load_word(e)) != MQS_TC_FREE)
        return MQS_EINVAL;
    switch (state) {
    case MQS_TC_READY:
    case MQS_TC_IN_FLIGHT:
        if (reason != MQS_TC_REASON_NONE)
            return MQS_EINVAL;
        e->consumer = MQS_TC_NO_CONSUMER;
        e->sampled_at = 0;
        e->timed_out = 0;
        e->flight_prev = e->flight_next = MQS_TC_NO_SLOT;
        make_ready(h, group, slot, attempts, 0, now);
        return MQS_OK;
    case MQS_TC_DEAD:
        if (reason > MQS_TC_REASON_ACK_TIMEOUT)
            return MQS_EINVAL;
        /* The image does not keep whether an earlier deadline of the
         * entry passed, only the reason of its death. */
        e->consumer = MQS_TC_NO_CONSUMER;
        e->sampled_at = 0;
        e->timed_out = reason == MQS_TC_REASON_ACK_TIMEOUT;
        e->flight_prev = e->flight_next = MQS_TC_NO_SLOT;
        /* deadline_seq orders the dead entries for mqs_tc_next_dead, so
         * they come out in the order they were imported. */
        e->deadline_seq = ++state_of(h)->timer_seq;
        store_word(e, mqs_tc_word(MQS_TC_DEAD, reason, attempts));
        MQS_FAILPOINT("tc_import_dead_after_commit");
        g->dead++;
        return MQS_OK;
    default:
        return MQS_EINVAL;
    }
}

int mqs_tc_import_finish(mqs_tc_header_t *h, uint64_t next_seq,
                         const int64_t *counters, uint64_t *unneeded_seq)
{
    mqs_tc_state_t *s = state_of(h);
    uint32_t limit = slot_limit(h);

    for (uint32_t slot = 0; slot < limit; slot++) {
        uint64_t seq = load_seq(mqs_tc_slot(h, slot));
        if (seq != 0 && !slot_needed(h, slot)) {
            if (unneeded_seq != NULL)
                *unneeded_seq = seq;
            return MQS_EINVAL;
        }
    }
    if (next_seq > s->next_seq)
        s->next_seq = next_seq;
    memcpy(s->counters, counters, sizeof(s->counters));
    /* The published counter is next_seq in every core (mqs_tc_repair
     * sets it so). */
    s->counters[MQS_TC_PUBLISHED] = (int64_t)s->next_seq;
    return MQS_OK;
}

/* ---- crash repair ------------------------------------------------------- */

static int orphaned(mqs_tc_header_t *h, uint32_t slot, mqs_tc_entry_t *e,
                    const void *arg)
{
    uint32_t g = *(const uint32_t *)arg;
    mqs_tc_consumer_t *c;

    (void)slot;
    if (e->consumer >= config_of(h)->params.max_consumers)
        return 1;
    c = mqs_tc_consumer(h, e->consumer);
    return !atomic_load_explicit(&c->used, memory_order_relaxed)
           || c->group != g;
}

/* Put an orphaned in-flight entry back at its lane's tail in repair. */
static void requeue_orphan(mqs_tc_header_t *h, uint32_t g, uint32_t slot,
                           void *context)
{
    mqs_tc_entry_t *e = mqs_tc_entry(h, g, slot);
    uint64_t attempts = mqs_tc_word_attempts(load_word(e));

    (void)context;
    unlink_flight(h, g, slot);
    e->consumer = MQS_TC_NO_CONSUMER;
    e->ready_seq = ++mqs_tc_group(h, g)->tail_seq;
    store_word(e, mqs_tc_word(MQS_TC_READY, 0, attempts));
    count_redelivery(h, g);
}

/*
 * Set the counters of an ack or delivery whose holder died (see
 * pending_begin) from the entry: to their values before it, or one
 * more where the entry shows the operation done. Runs first in repair,
 * before orphaned in-flight entries go back to their lanes.
 */
static void repair_pending(mqs_tc_header_t *h, uint32_t limit)
{
    mqs_tc_state_t *s = state_of(h);
    uint32_t kind = atomic_load_explicit(&s->pending_kind,
                                         memory_order_relaxed);
    uint32_t g = s->pending_group, slot = s->pending_slot;
    mqs_tc_group_t *group;
    int64_t done = 1, acked;

    atomic_store_explicit(&s->pending_kind, 0, memory_order_relaxed);
    if (kind < MQS_TC_PENDING_ACK || kind > MQS_TC_PENDING_FETCH_AUTO_ACK ||
        g >= config_of(h)->params.max_groups)
        return;
    group = mqs_tc_group(h, g);
    if (!atomic_load_explicit(&group->used, memory_order_relaxed))
        return;
    if (slot < limit) {
        /* Past the limit only after an ack that freed the last slot. */
        mqs_tc_entry_t *e = mqs_tc_entry(h, g, slot);
        uint32_t state = mqs_tc_word_state(load_word(e));
        int same = e->ticket == s->pending_ticket;

        if (kind == MQS_TC_PENDING_ACK)
            done = !(state == MQS_TC_IN_FLIGHT && same);
        else if (kind == MQS_TC_PENDING_FETCH)
            done = state == MQS_TC_IN_FLIGHT && same;
        else
            done = state != MQS_TC_READY;
    }
    acked = kind != MQS_TC_PENDING_FETCH ? done : 0;
    s->counters[MQS_TC_ACKED] = s->pending_before[MQS_TC_BEFORE_ACKED] + acked;
    group->counters[MQS_TC_GROUP_ACKED] =
        s->pending_before[MQS_TC_BEFORE_GROUP_ACKED] + acked;
    if (kind != MQS_TC_PENDING_ACK) {
        s->counters[MQS_TC_DELIVERED] =
            s->pending_before[MQS_TC_BEFORE_DELIVERED] + done;
        group->counters[MQS_TC_GROUP_DELIVERED] =
            s->pending_before[MQS_TC_BEFORE_GROUP_DELIVERED] + done;
    }
}

void mqs_tc_repair(mqs_tc_header_t *h)
{
    mqs_tc_params_t *p = &config_of(h)->params;
    mqs_tc_state_t *s = state_of(h);
    uint32_t limit = slot_limit(h);
    uint32_t groups_used = 0;

    s->counters[MQS_TC_RECOVERIES]++;
    repair_pending(h, limit);
    s->slot_limit = limit;
    for (uint32_t g = 0; g < p->max_groups; g++) {
        mqs_tc_group_t *group = mqs_tc_group(h, g);
        if (atomic_load_explicit(&group->used, memory_order_relaxed)) {
            groups_used++;
            continue;
        }
        if (s->opening_group != g + 1)
            continue;
        /* A group whose creation did not finish. */
        for (uint32_t slot = 0; slot < limit; slot++)
            store_word(mqs_tc_entry(h, g, slot),
                       mqs_tc_word(MQS_TC_FREE, 0, 0));
    }
    s->opening_group = 0;
    s->groups_used = groups_used;
    for (uint32_t slot = 0; slot < limit; slot++) {
        /* A publish committed its slot but died before next_seq. */
        uint64_t seq = load_seq(mqs_tc_slot(h, slot));
        if (seq > s->next_seq)
            s->next_seq = seq;
    }
    s->counters[MQS_TC_PUBLISHED] = (int64_t)s->next_seq;
    s->stored = 0;
    for (uint32_t slot = 0; slot < limit; slot++) {
        mqs_tc_slot_t *stored = mqs_tc_slot(h, slot);
        if (load_seq(stored) == 0) {
            /* An uncommitted publish, or a slot freed already. */
            for (uint32_t g = 0; g < p->max_groups; g++) {
                if (atomic_load_explicit(&mqs_tc_group(h, g)->used,
                                         memory_order_relaxed))
                    store_word(mqs_tc_entry(h, g, slot),
                               mqs_tc_word(MQS_TC_FREE, 0, 0));
            }
            continue;
        }
        s->stored++;
        if (stored->retained && groups_used > 0) {
            /* The first group was created but its holder died before
             * dropping what it did not take. */
            stored->retained = 0;
            if (!slot_needed(h, slot))
                s->counters[MQS_TC_DROPPED_UNSUBSCRIBED]++;
        }
        if (!slot_needed(h, slot))
            free_slot(h, slot);
    }
    for (uint32_t i = 0; i < p->max_consumers; i++)
        mqs_tc_consumer(h, i)->in_flight = 0;
    for (uint32_t g = 0; g < p->max_groups; g++) {
        mqs_tc_group_t *group = mqs_tc_group(h, g);
        if (!atomic_load_explicit(&group->used, memory_order_relaxed))
            continue;
        /* Entries in flight to a consumer that is gone go back to their
         * lanes' tails in publish order and count as redelivered, as
         * mqs_tc_close_consumer would have done. */
        group->ready = group->in_flight = group->dead = 0;
        group->flight_head = group->flight_tail = MQS_TC_NO_SLOT;
        memset(group->lanes, 0, sizeof(group->lanes));
        for (uint32_t slot = 0; slot < limit; slot++) {
            mqs_tc_entry_t *e = mqs_tc_entry(h, g, slot);
            uint32_t state = mqs_tc_word_state(load_word(e));
            /* Orphans too: requeue_orphan takes them off again. */
            if (state == MQS_TC_IN_FLIGHT)
                link_flight(h, g, slot);
            if (state == MQS_TC_IN_FLIGHT && !orphaned(h, slot, e, &g)) {
                group->in_flight++;
                mqs_tc_consumer(h, e->consumer)->in_flight++;
            } else if (state == MQS_TC_DEAD) {
                group->dead++;
            }
        }
        visit_in_order(h, g, MQS_TC_IN_FLIGHT, orphaned, &g, publish_key,
                       requeue_orphan, NULL);
        push_ready_in_order(h, g);
    }
    s->alloc_hint = 0;
    recompute_deadlines(h);
}
