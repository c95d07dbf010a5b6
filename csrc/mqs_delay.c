#define _GNU_SOURCE
#include "mqs_delay.h"
#include "mqs_failpoint.h"
#include "mqs_robust.h"
#include "mqs_wait.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>

_Static_assert(sizeof(mqs_delay_node_t) == MQS_DELAY_NODE_BYTES,
               "block header must be 32 bytes");
_Static_assert(sizeof(mqs_delay_header_t) <= MQS_DELAY_HEADER_BYTES,
               "delay header must fit its reserved bytes");
/* src/mqs/_shared.pyx reads the ring's config block with the struct
 * format "<QIIqqqqiIq" before mapping the file; keep the two in step. */
_Static_assert(offsetof(mqs_br_config_t, delayed_bytes) == 56
                   && sizeof(mqs_br_config_t) == 64,
               "config block layout changed");

/*
 * Keep the compiler from moving stores across this point. A process
 * killed here leaves every store before it in the mapping, and the next
 * lock holder (after EOWNERDEAD) sees them in order.
 */
#define STEP_BARRIER() atomic_signal_fence(memory_order_seq_cst)

static mqs_delay_state_t *state_of(mqs_delay_t *d)
{
    return &d->header->state;
}

static mqs_wheel_t *wheel_of(mqs_delay_t *d)
{
    return (mqs_wheel_t *)(d->base + MQS_DELAY_HEADER_BYTES);
}

static mqs_delay_node_t *node_at(mqs_delay_t *d, int64_t offset)
{
    return (mqs_delay_node_t *)(d->base + offset);
}

int64_t mqs_delay_class_bytes(int class_index)
{
    int k = class_index / 4;
    int j = class_index % 4;

    return ((int64_t)MQS_DELAY_MIN_BLOCK << k) + ((int64_t)j << (4 + k));
}

int mqs_delay_class_of(int64_t bytes)
{
    uint64_t t;
    int k, j;

    if (bytes <= MQS_DELAY_MIN_BLOCK)
        return 0;
    /* 64 << k <= t < 128 << k, then j quarters of 64 << k above it. */
    t = (uint64_t)bytes - 1;
    k = (63 - __builtin_clzll(t)) - 6;
    j = (int)((t - ((uint64_t)MQS_DELAY_MIN_BLOCK << k)) >> (4 + k)) + 1;
    if (j == 4) {
        k++;
        j = 0;
    }
    return 4 * k + j;
}

int64_t mqs_delay_block_bytes(int64_t length)
{
    return mqs_delay_class_bytes(
        mqs_delay_class_of(MQS_DELAY_NODE_BYTES + length));
}

/* Bytes of blocks that fit beside a wheel of one entry. */
static int64_t arena_room(int64_t area_bytes)
{
    return area_bytes - MQS_DELAY_HEADER_BYTES
           - (int64_t)mqs_wheel_size_bytes(1);
}

int64_t mqs_delay_max_payload(int64_t area_bytes)
{
    int64_t room = arena_room(area_bytes);
    int c = mqs_delay_class_of(room);

    while (c > 0 && mqs_delay_class_bytes(c) > room)
        c--;
    if (mqs_delay_class_bytes(c) > room)
        return -1;
    return mqs_delay_class_bytes(c) - MQS_DELAY_NODE_BYTES;
}

int mqs_delay_map(mqs_delay_t *d, int fd, int64_t offset,
                  int64_t area_bytes)
{
    void *base = mmap(NULL, (size_t)area_bytes, PROT_READ | PROT_WRITE,
                      MAP_SHARED, fd, offset);

    if (base == MAP_FAILED)
        return MQS_ENOMEM;
    d->base = base;
    d->header = base;
    d->area_bytes = area_bytes;
    d->rebuilds_seen = 0;
    return MQS_OK;
}

int mqs_delay_remap(mqs_delay_t *d, int fd, int64_t offset)
{
    void *base = mmap(d->base, (size_t)d->area_bytes,
                      PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd,
                      offset);

    return base == MAP_FAILED ? MQS_ENOMEM : MQS_OK;
}

void mqs_delay_unmap(mqs_delay_t *d)
{
    if (d->base != NULL)
        munmap(d->base, (size_t)d->area_bytes);
    d->base = NULL;
    d->header = NULL;
}

/* Wheel of `capacity` entries, or as many as fit below arena_low. */
static int wheel_reset(mqs_delay_t *d, int64_t wheel_bytes, int64_t now_ns)
{
    mqs_delay_state_t *s = state_of(d);

    s->wheel_bytes = wheel_bytes;
    return mqs_wheel_init(wheel_of(d), (size_t)wheel_bytes,
                          MQS_DELAY_TICK_NS, now_ns);
}

int mqs_delay_format(mqs_delay_t *d, int64_t now_ns)
{
    mqs_delay_header_t *h = d->header;

    if (d->area_bytes < MQS_DELAY_MIN_AREA_BYTES)
        return MQS_EINVAL;
    h->config.v.magic = MQS_DELAY_MAGIC;
    h->config.v.version = MQS_DELAY_VERSION;
    h->config.v.header_bytes = MQS_DELAY_HEADER_BYTES;
    h->config.v.area_bytes = d->area_bytes;
    h->config.v.tick_ns = MQS_DELAY_TICK_NS;
    atomic_store_explicit(&h->next_due_ns.v, INT64_MAX,
                          memory_order_relaxed);
    atomic_store_explicit(&h->count.v, 0, memory_order_relaxed);
    memset(&h->state, 0, sizeof(h->state));
    h->state.arena_low = d->area_bytes;
    if (wheel_reset(d, (int64_t)mqs_wheel_size_bytes(16),
                    now_ns) != MQS_OK)
        return MQS_EINVAL;

    return mqs_robust_init(&h->lock.v);
}

int mqs_delay_validate(const mqs_delay_t *d)
{
    const mqs_delay_config_t *config = &d->header->config.v;

    if (config->magic != MQS_DELAY_MAGIC)
        return MQS_ECORRUPT;
    if (config->version != MQS_DELAY_VERSION)
        return MQS_EVERSION;
    if (config->header_bytes != MQS_DELAY_HEADER_BYTES
        || config->area_bytes != d->area_bytes
        || config->tick_ns != MQS_DELAY_TICK_NS)
        return MQS_ECORRUPT;
    return MQS_OK;
}

static void free_block(mqs_delay_t *d, int64_t offset)
{
    mqs_delay_state_t *s = state_of(d);
    mqs_delay_node_t *node = node_at(d, offset);

    atomic_store_explicit(&node->state, MQS_DELAY_FREE,
                          memory_order_relaxed);
    node->next_free = s->free_heads[node->size_class];
    s->free_heads[node->size_class] = offset;
}

static int64_t wheel_end(mqs_delay_t *d)
{
    return MQS_DELAY_HEADER_BYTES + state_of(d)->wheel_bytes;
}

/* Recompute next_due_ns from held[] and the wheel. Under the lock. */
static void publish_next_due(mqs_delay_t *d)
{
    mqs_delay_state_t *s = state_of(d);
    int64_t next = INT64_MAX;

    if (s->held_next < s->held_count)
        next = node_at(d, (int64_t)s->held[s->held_next])->deadline_ns;
    else if (mqs_wheel_next_deadline(wheel_of(d), &next) != MQS_OK)
        next = INT64_MAX;
    atomic_store_explicit(&d->header->next_due_ns.v, next,
                          memory_order_release);
}

/*
 * Rebuild everything from the blocks after a lock owner died (see the
 * header). Under the lock. Returns MQS_OK or MQS_ECORRUPT.
 */
static int rebuild(mqs_delay_t *d, int64_t now_ns)
{
    mqs_delay_state_t *s = state_of(d);
    int64_t offset = s->arena_low;
    int64_t count = 0;
    int64_t used = 0;

    if (offset < MQS_DELAY_HEADER_BYTES || offset > d->area_bytes
        || s->wheel_bytes < (int64_t)mqs_wheel_size_bytes(1)
        || wheel_end(d) > offset)
        return MQS_ECORRUPT;
    if (wheel_reset(d, s->wheel_bytes, now_ns) != MQS_OK)
        return MQS_ECORRUPT;
    memset(s->free_heads, 0, sizeof(s->free_heads));
    s->held_next = 0;
    s->held_count = 0;

    while (offset < d->area_bytes) {
        mqs_delay_node_t *node = node_at(d, offset);
        uint32_t st = atomic_load_explicit(&node->state,
                                           memory_order_relaxed);
        int64_t bytes;

        if (node->size_class >= MQS_DELAY_CLASSES)
            return MQS_ECORRUPT;
        bytes = mqs_delay_class_bytes(node->size_class);
        if (offset + bytes > d->area_bytes)
            return MQS_ECORRUPT;
        if (st == MQS_DELAY_WAITING || st == MQS_DELAY_MOVING) {
            if (mqs_wheel_insert(wheel_of(d), node->deadline_ns,
                                 (uint64_t)offset, NULL) != MQS_OK)
                return MQS_ECORRUPT;
            if (st == MQS_DELAY_MOVING) {
                s->requeued++;
                atomic_store_explicit(&node->state, MQS_DELAY_WAITING,
                                      memory_order_relaxed);
            }
            count++;
            used += bytes + MQS_WHEEL_ENTRY_BYTES;
        } else {
            if (st == MQS_DELAY_WRITING)
                s->dropped++;
            free_block(d, offset);
        }
        offset += bytes;
    }
    s->used_bytes = used;
    s->rebuilds++;
    atomic_store_explicit(&d->header->count.v, count, memory_order_release);
    publish_next_due(d);
    return MQS_OK;
}

/* Take the lock without blocking; rebuild when its owner died. */
static int lock_area(mqs_delay_t *d, int64_t now_ns)
{
    pthread_mutex_t *lock = &d->header->lock.v;
    int rc = pthread_mutex_trylock(lock);

    if (rc == EBUSY)
        return MQS_EAGAIN_LOCKED;
    if (rc == EOWNERDEAD) {
        rc = rebuild(d, now_ns);
        /* Even a damaged area stays usable for unlocking; a later call
         * reports ECORRUPT again. */
        pthread_mutex_consistent(lock);
        if (rc != MQS_OK) {
            pthread_mutex_unlock(lock);
            return rc;
        }
        return MQS_OK;
    }
    return rc == 0 ? MQS_OK : MQS_ECORRUPT;
}

static void unlock_area(mqs_delay_t *d)
{
    pthread_mutex_unlock(&d->header->lock.v);
}

/* Make sure the wheel has a free entry, growing it towards arena_low. */
static int reserve_wheel_entry(mqs_delay_t *d)
{
    mqs_delay_state_t *s = state_of(d);
    mqs_wheel_t *w = wheel_of(d);
    int64_t room, capacity, step;

    if (mqs_wheel_next_index(w) != MQS_WHEEL_NIL)
        return MQS_OK;
    /* Grow by a quarter (at least 16 entries), but take at most a third
     * of the free space: each message also needs a block of 64 bytes or
     * more, twice an entry. */
    room = (s->arena_low - wheel_end(d)) / MQS_WHEEL_ENTRY_BYTES / 3;
    if (room < 1)
        room = 1;
    step = w->capacity / 4 > 16 ? w->capacity / 4 : 16;
    capacity = (int64_t)w->capacity + (step < room ? step : room);
    if (wheel_end(d) + (capacity - (int64_t)w->capacity)
            * MQS_WHEEL_ENTRY_BYTES > s->arena_low)
        return MQS_EFULL;
    if (capacity > (int64_t)MQS_WHEEL_MAX_CAPACITY)
        capacity = MQS_WHEEL_MAX_CAPACITY;
    if (capacity <= (int64_t)w->capacity)
        return MQS_EFULL;
    /* wheel_bytes first: a rebuild after a crash here re-creates a wheel
     * of this size, which is free space below arena_low. */
    s->wheel_bytes = (int64_t)mqs_wheel_size_bytes((uint32_t)capacity);
    STEP_BARRIER();
    return mqs_wheel_grow(w, (size_t)s->wheel_bytes) == MQS_OK
               ? MQS_OK : MQS_ECORRUPT;
}

/* Offset of a free block of at least class `c`, or 0 when none fits. */
static int64_t alloc_block(mqs_delay_t *d, int c)
{
    mqs_delay_state_t *s = state_of(d);
    int64_t bytes = mqs_delay_class_bytes(c);
    int64_t offset = s->free_heads[c];
    mqs_delay_node_t *node;

    if (offset != 0) {
        s->free_heads[c] = node_at(d, offset)->next_free;
        return offset;
    }
    if (s->arena_low - bytes >= wheel_end(d)) {
        /* Header first, then arena_low, so a rebuild's scan from
         * arena_low always starts at a block with a valid class. */
        offset = s->arena_low - bytes;
        node = node_at(d, offset);
        atomic_store_explicit(&node->state, MQS_DELAY_FREE,
                              memory_order_relaxed);
        node->size_class = (uint16_t)c;
        STEP_BARRIER();
        s->arena_low = offset;
        return offset;
    }
    /* Out of fresh space: a free block of a larger class will do. */
    for (int larger = c + 1; larger < MQS_DELAY_CLASSES; larger++) {
        offset = s->free_heads[larger];
        if (offset != 0) {
            s->free_heads[larger] = node_at(d, offset)->next_free;
            return offset;
        }
    }
    return 0;
}

static int put_locked(mqs_delay_t *d, mqs_bytering_t *ring,
                      const void *const *parts, const size_t *part_lengths,
                      int n_parts, uint16_t type, int64_t due_ns,
                      int64_t length)
{
    mqs_delay_state_t *s = state_of(d);
    int64_t maxsize = mqs_br_config(ring)->maxsize;
    int64_t count = atomic_load_explicit(&d->header->count.v,
                                         memory_order_relaxed);
    mqs_delay_node_t *node;
    unsigned char *out;
    int64_t offset;
    int rc;

    if (maxsize != 0 && mqs_br_count(ring, 0) + count >= maxsize)
        return MQS_EFULL;
    rc = reserve_wheel_entry(d);
    if (rc != MQS_OK)
        return rc;
    offset = alloc_block(d, mqs_delay_class_of(MQS_DELAY_NODE_BYTES
                                               + length));
    if (offset == 0)
        return MQS_EFULL;

    node = node_at(d, offset);
    atomic_store_explicit(&node->state, MQS_DELAY_WRITING,
                          memory_order_relaxed);
    STEP_BARRIER();
    node->type = type;
    node->length = length;
    node->deadline_ns = due_ns;
    out = (unsigned char *)node + MQS_DELAY_NODE_BYTES;
    for (int i = 0; i < n_parts; i++) {
        if (part_lengths[i] != 0)
            memcpy(out, parts[i], part_lengths[i]);
        out += part_lengths[i];
    }
    MQS_FAILPOINT("delay_put_before_insert");
    /* Cannot fail: reserve_wheel_entry made room. */
    mqs_wheel_insert(wheel_of(d), due_ns, (uint64_t)offset, NULL);
    STEP_BARRIER();
    atomic_store_explicit(&node->state, MQS_DELAY_WAITING,
                          memory_order_relaxed);

    s->used_bytes += mqs_delay_class_bytes(node->size_class)
                     + MQS_WHEEL_ENTRY_BYTES;
    atomic_store_explicit(&d->header->count.v, count + 1,
                          memory_order_release);
    if (due_ns < atomic_load_explicit(&d->header->next_due_ns.v,
                                      memory_order_relaxed))
        atomic_store_explicit(&d->header->next_due_ns.v, due_ns,
                              memory_order_release);
    return MQS_OK;
}

int mqs_delay_try_put(mqs_delay_t *d, mqs_bytering_t *ring,
                      const void *const *parts, const size_t *part_lengths,
                      int n_parts, uint16_t type, int64_t due_ns,
                      int64_t now_ns)
{
    int64_t length = 0;
    int64_t old_due;
    int rc;

    for (int i = 0; i < n_parts; i++)
        length += (int64_t)part_lengths[i];
    if (type == MQS_BR_TYPE_PAD)
        return MQS_EINVAL;
    if (length > mqs_br_config(ring)->max_message_size
        || length > mqs_delay_max_payload(d->area_bytes))
        return MQS_ETOOBIG;

    rc = lock_area(d, now_ns);
    if (rc != MQS_OK)
        return rc;
    old_due = atomic_load_explicit(&d->header->next_due_ns.v,
                                   memory_order_relaxed);
    rc = put_locked(d, ring, parts, part_lengths, n_parts, type, due_ns,
                    length);
    unlock_area(d);
    /* A getter parked until the old earliest deadline must wake for an
     * earlier one. */
    if (rc == MQS_OK && due_ns < old_due)
        mqs_wait_signal(mqs_br_not_empty(ring), 1);
    return rc;
}

/* Move held[] into the ring, refilling it from the wheel. Under the lock. */
static int promote_locked(mqs_delay_t *d, mqs_bytering_t *ring,
                          int64_t now_ns, int64_t *moved)
{
    mqs_delay_state_t *s = state_of(d);

    for (;;) {
        mqs_delay_node_t *node;
        const void *parts[1];
        size_t lengths[1];
        size_t fired = 0;
        int64_t offset;
        int rc;

        if (s->held_next == s->held_count) {
            s->held_next = 0;
            s->held_count = 0;
            mqs_wheel_advance(wheel_of(d), now_ns, s->held, MQS_DELAY_BATCH,
                              &fired);
            if (fired == 0)
                return MQS_OK;
            for (size_t i = 0; i < fired; i++)
                atomic_store_explicit(&node_at(d, (int64_t)s->held[i])->state,
                                      MQS_DELAY_MOVING, memory_order_relaxed);
            STEP_BARRIER();
            s->held_count = (int64_t)fired;
        }

        offset = (int64_t)s->held[s->held_next];
        node = node_at(d, offset);
        parts[0] = (unsigned char *)node + MQS_DELAY_NODE_BYTES;
        lengths[0] = (size_t)node->length;
        MQS_FAILPOINT("delay_before_move");
        rc = mqs_br_try_put(ring, parts, lengths, 1, node->type);
        if (rc != MQS_OK)
            return rc;
        MQS_FAILPOINT("delay_after_move");
        STEP_BARRIER();
        s->used_bytes -= mqs_delay_class_bytes(node->size_class)
                         + MQS_WHEEL_ENTRY_BYTES;
        free_block(d, offset);
        s->held_next++;
        s->moved++;
        atomic_fetch_sub_explicit(&d->header->count.v, 1,
                                  memory_order_release);
        (*moved)++;
    }
}

int mqs_delay_promote(mqs_delay_t *d, mqs_bytering_t *ring, int64_t now_ns,
                      int64_t *moved)
{
    int64_t before = *moved;
    int rc = lock_area(d, now_ns);

    if (rc != MQS_OK)
        return rc;
    rc = promote_locked(d, ring, now_ns, moved);
    publish_next_due(d);
    unlock_area(d);
    /* Freed blocks and maxsize places: wake producers waiting for room. */
    if (*moved != before)
        mqs_wait_signal(mqs_br_not_full(ring), 1);
    return rc;
}

static int check_locked(mqs_delay_t *d)
{
    mqs_delay_state_t *s = state_of(d);
    int64_t offset = s->arena_low;
    int64_t waiting = 0, moving = 0, free_count = 0, used = 0;
    int64_t listed = 0;

    if (mqs_wheel_check(wheel_of(d)) != MQS_OK || wheel_end(d) > offset)
        return MQS_ECORRUPT;
    while (offset < d->area_bytes) {
        mqs_delay_node_t *node = node_at(d, offset);
        uint32_t st = atomic_load_explicit(&node->state,
                                           memory_order_relaxed);
        int64_t bytes;

        if (node->size_class >= MQS_DELAY_CLASSES)
            return MQS_ECORRUPT;
        bytes = mqs_delay_class_bytes(node->size_class);
        if (st == MQS_DELAY_WAITING)
            waiting++;
        else if (st == MQS_DELAY_MOVING)
            moving++;
        else if (st == MQS_DELAY_FREE)
            free_count++;
        else
            return MQS_ECORRUPT;
        if (st != MQS_DELAY_FREE)
            used += bytes + MQS_WHEEL_ENTRY_BYTES;
        offset += bytes;
    }
    if (offset != d->area_bytes)
        return MQS_ECORRUPT;
    for (int c = 0; c < MQS_DELAY_CLASSES; c++)
        for (int64_t o = s->free_heads[c]; o != 0;
             o = node_at(d, o)->next_free) {
            if (node_at(d, o)->size_class != c
                || atomic_load_explicit(&node_at(d, o)->state,
                                        memory_order_relaxed)
                       != MQS_DELAY_FREE
                || ++listed > free_count)
                return MQS_ECORRUPT;
        }
    if (listed != free_count
        || waiting != (int64_t)mqs_wheel_count(wheel_of(d))
        || moving != s->held_count - s->held_next
        || waiting + moving != atomic_load_explicit(&d->header->count.v,
                                                    memory_order_relaxed)
        || used != s->used_bytes)
        return MQS_ECORRUPT;
    return MQS_OK;
}

int mqs_delay_check(mqs_delay_t *d, int64_t now_ns)
{
    int rc = lock_area(d, now_ns);

    if (rc != MQS_OK)
        return rc;
    rc = check_locked(d);
    unlock_area(d);
    return rc;
}
