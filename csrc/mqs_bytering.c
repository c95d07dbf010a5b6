#define _GNU_SOURCE
#include "mqs_bytering.h"
#include "mqs_failpoint.h"
#include "mqs_robust.h"

/*
 * mqs_br_try_take reads a record header at the head it loaded before its
 * CAS confirms the take. With a stale head those bytes may be the middle
 * of a newer record whose payload a producer is copying in; the CAS then
 * fails and nothing read is used. Under ThreadSanitizer these reads are
 * excluded from race checks (atomic loads keep their acquire effect), so
 * a report that lost the consumer's stack cannot slip past the
 * suppression file. NOTE: under the C11 memory model the overlap of an
 * atomic load and a plain memcpy is still a data race; it is benign on
 * the compilers and CPUs mqs supports, not proven by the standard.
 */
#if defined(__SANITIZE_THREAD__)
void AnnotateIgnoreReadsBegin(const char *file, int line);
void AnnotateIgnoreReadsEnd(const char *file, int line);
#define MQS_OPTIMISTIC_READS_BEGIN() \
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__)
#define MQS_OPTIMISTIC_READS_END() AnnotateIgnoreReadsEnd(__FILE__, __LINE__)
#else
#define MQS_OPTIMISTIC_READS_BEGIN() ((void)0)
#define MQS_OPTIMISTIC_READS_END() ((void)0)
#endif

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef struct mqs_br_rec_header {
    _Atomic uint64_t commit;
    _Atomic uint32_t length;
    _Atomic uint16_t type;
    _Atomic uint16_t owner;
} mqs_br_rec_header_t;

_Static_assert(sizeof(mqs_br_rec_header_t) == MQS_BR_RECORD_HEADER,
               "record header must be 16 bytes");
_Static_assert(sizeof(mqs_br_header_t) <= MQS_BR_HEADER_BYTES,
               "shared header must fit its reserved bytes");

static int64_t align_record(int64_t payload)
{
    return (MQS_BR_RECORD_HEADER + payload + MQS_BR_ALIGN - 1)
           & ~(int64_t)(MQS_BR_ALIGN - 1);
}

static mqs_br_rec_header_t *record_at(const mqs_bytering_t *ring,
                                      int64_t position)
{
    return (mqs_br_rec_header_t *)(ring->data + (position & ring->mask));
}

static uint64_t commit_tag(const mqs_bytering_t *ring, int64_t position)
{
    return ring->secret ^ (uint64_t)position;
}

static mqs_br_participant_t *participant(const mqs_bytering_t *ring,
                                         int slot)
{
    return &ring->header->participants[slot].v;
}

static int64_t tail_position(const mqs_bytering_t *ring)
{
    return atomic_load_explicit(
        (_Atomic int64_t *)&ring->header->tail.v.first,
        memory_order_acquire);
}

static int64_t group_head(const mqs_bytering_t *ring, int group)
{
    return atomic_load_explicit(
        (_Atomic int64_t *)&ring->header->groups[group].v.cursor.first,
        memory_order_acquire);
}

/* Whether some group's head has passed `position`. */
static int any_head_past(const mqs_bytering_t *ring, int64_t position)
{
    for (int g = 0; g < ring->header->config.v.n_groups; g++)
        if (group_head(ring, g) > position)
            return 1;
    return 0;
}

int64_t mqs_br_file_bytes(int64_t capacity)
{
    return MQS_BR_HEADER_BYTES + capacity;
}

int mqs_br_check_sizes(int64_t capacity, int64_t max_message_size,
                       int64_t maxsize, int32_t n_groups)
{
    long page = sysconf(_SC_PAGESIZE);

    if (capacity < page || capacity > ((int64_t)1 << 40)
        || (capacity & (capacity - 1)) != 0)
        return MQS_EINVAL;
    if (max_message_size < 0
        || align_record(max_message_size) > capacity)
        return MQS_EINVAL;
    if (maxsize < 0 || n_groups < 1 || n_groups > MQS_BR_MAX_GROUPS)
        return MQS_EINVAL;
    return MQS_OK;
}

int mqs_br_map(mqs_bytering_t *ring, int fd, int64_t capacity)
{
    void *header, *reserve, *first, *second;

    header = mmap(NULL, MQS_BR_HEADER_BYTES, PROT_READ | PROT_WRITE,
                  MAP_SHARED, fd, 0);
    if (header == MAP_FAILED)
        return MQS_ENOMEM;

    /* Reserve 2 * capacity of address space, then map the data region
     * into both halves, so a record that runs past the end continues in
     * the second copy. */
    reserve = mmap(NULL, (size_t)(2 * capacity), PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (reserve == MAP_FAILED) {
        munmap(header, MQS_BR_HEADER_BYTES);
        return MQS_ENOMEM;
    }
    first = mmap(reserve, (size_t)capacity, PROT_READ | PROT_WRITE,
                 MAP_SHARED | MAP_FIXED, fd, MQS_BR_HEADER_BYTES);
    second = mmap((char *)reserve + capacity, (size_t)capacity,
                  PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd,
                  MQS_BR_HEADER_BYTES);
    if (first == MAP_FAILED || second == MAP_FAILED) {
        munmap(reserve, (size_t)(2 * capacity));
        munmap(header, MQS_BR_HEADER_BYTES);
        return MQS_ENOMEM;
    }

    ring->header = header;
    ring->data = reserve;
    ring->capacity = capacity;
    ring->mask = capacity - 1;
    ring->secret = ring->header->config.v.secret;
    ring->fd = fd;
    ring->slot = -1;
    ring->gate_cache = 0;
    return MQS_OK;
}

int mqs_br_remap(mqs_bytering_t *ring, int fd)
{
    size_t capacity = (size_t)ring->capacity;
    void *header, *first, *second;

    /* MAP_FIXED replaces each old mapping in one step, so the pointers
     * into the mapping stay valid throughout. */
    header = mmap(ring->header, MQS_BR_HEADER_BYTES, PROT_READ | PROT_WRITE,
                  MAP_SHARED | MAP_FIXED, fd, 0);
    if (header == MAP_FAILED)
        return MQS_ENOMEM;
    first = mmap(ring->data, capacity, PROT_READ | PROT_WRITE,
                 MAP_SHARED | MAP_FIXED, fd, MQS_BR_HEADER_BYTES);
    if (first == MAP_FAILED)
        return MQS_ENOMEM;
    second = mmap(ring->data + capacity, capacity, PROT_READ | PROT_WRITE,
                  MAP_SHARED | MAP_FIXED, fd, MQS_BR_HEADER_BYTES);
    if (second == MAP_FAILED)
        return MQS_ENOMEM;
    ring->fd = fd;
    return MQS_OK;
}

void mqs_br_unmap(mqs_bytering_t *ring)
{
    if (ring->data != NULL)
        munmap(ring->data, (size_t)(2 * ring->capacity));
    if (ring->header != NULL)
        munmap(ring->header, MQS_BR_HEADER_BYTES);
    ring->data = NULL;
    ring->header = NULL;
}

int mqs_br_format(mqs_bytering_t *ring, int64_t max_message_size,
                  int64_t maxsize, int32_t n_groups, uint64_t secret)
{
    mqs_br_header_t *h = ring->header;
    mqs_br_config_t *config = &h->config.v;

    config->magic = MQS_BR_MAGIC;
    config->version = MQS_BR_VERSION;
    config->header_bytes = MQS_BR_HEADER_BYTES;
    config->capacity = ring->capacity;
    config->max_message_size = max_message_size;
    config->maxsize = maxsize;
    config->secret = secret;
    config->n_groups = n_groups;
    ring->secret = secret;

    for (int g = 0; g < MQS_BR_MAX_GROUPS; g++) {
        atomic_store_explicit(&h->groups[g].v.cursor.first, 0,
                              memory_order_relaxed);
        atomic_store_explicit(&h->groups[g].v.cursor.second, 0,
                              memory_order_relaxed);
        atomic_store_explicit(&h->groups[g].v.active, g < n_groups,
                              memory_order_relaxed);
    }
    atomic_store_explicit(&h->repairs.v.journal_pos, MQS_BR_NO_CLAIM,
                          memory_order_relaxed);
    for (int i = 0; i < MQS_BR_MAX_PARTICIPANTS; i++) {
        mqs_br_participant_t *p = participant(ring, i);
        atomic_store_explicit(&p->claim_pos, MQS_BR_NO_CLAIM,
                              memory_order_relaxed);
        atomic_store_explicit(&p->claim_state, MQS_BR_CLAIM_NONE,
                              memory_order_relaxed);
        atomic_store_explicit(&p->get_pin, MQS_BR_NO_PIN,
                              memory_order_relaxed);
        atomic_store_explicit(&p->view_pin, MQS_BR_NO_PIN,
                              memory_order_relaxed);
        atomic_store_explicit(&p->views, 0, memory_order_relaxed);
        atomic_store_explicit(&p->copies, 0, memory_order_relaxed);
    }

    if (mqs_robust_init(&h->repair_lock.v) != MQS_OK)
        return MQS_EINVAL;

    /* Everything above becomes visible before an attacher sees READY. */
    atomic_store_explicit(&config->init_state, MQS_BR_INIT_READY,
                          memory_order_release);
    return MQS_OK;
}

int mqs_br_validate(const mqs_br_header_t *header, int64_t file_bytes)
{
    const mqs_br_config_t *config = &header->config.v;
    uint32_t state = atomic_load_explicit(
        (_Atomic uint32_t *)&config->init_state, memory_order_acquire);

    if (state != MQS_BR_INIT_READY) {
        if (config->magic == 0 && state == 0)
            return MQS_EAGAIN_INIT;
        return MQS_ECORRUPT;
    }
    if (config->magic != MQS_BR_MAGIC)
        return MQS_ECORRUPT;
    if (config->version != MQS_BR_VERSION)
        return MQS_EVERSION;
    if (config->header_bytes != MQS_BR_HEADER_BYTES
        || mqs_br_check_sizes(config->capacity, config->max_message_size,
                              config->maxsize, config->n_groups) != MQS_OK
        || config->delayed_bytes < 0
        || config->delayed_bytes % sysconf(_SC_PAGESIZE) != 0
        || mqs_br_file_bytes(config->capacity) + config->delayed_bytes
               != file_bytes)
        return MQS_ECORRUPT;
    return MQS_OK;
}

static int lock_byte(int fd, int slot, int command, short type,
                     struct flock *out)
{
    struct flock fl;

    memset(&fl, 0, sizeof(fl));
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = MQS_BR_LOCK_BASE + slot;
    fl.l_len = 1;
    if (fcntl(fd, command, &fl) != 0)
        return -errno;
    if (out != NULL)
        *out = fl;
    return 0;
}

int mqs_br_participant_alive(const mqs_bytering_t *ring, int slot)
{
    struct flock fl;
    int rc;

    memset(&fl, 0, sizeof(fl));
    if (slot == ring->slot)
        return 1;
    rc = lock_byte(ring->fd, slot, F_OFD_GETLK, F_WRLCK, &fl);
    if (rc < 0)
        return rc;
    return fl.l_type != F_UNLCK;
}

/*
 * Publish the unpublished record at `position` as padding of `size`
 * bytes, if it is still unpublished and no group has passed it. Caller
 * holds repair_lock. Returns 1 when it wrote the padding, else 0.
 */
static int pad_record_locked(mqs_bytering_t *ring, int64_t position,
                             int64_t size, int owner)
{
    mqs_br_header_t *h = ring->header;
    mqs_br_rec_header_t *rec = record_at(ring, position);

    mqs_br_repairs_t *repairs = &h->repairs.v;
    int64_t padded;

    if (atomic_load_explicit(&rec->commit, memory_order_acquire)
        == commit_tag(ring, position))
        return 0;
    if (any_head_past(ring, position))
        return 0;
    if (tail_position(ring) < position + size)
        return 0;

    padded = atomic_load_explicit(&repairs->padded, memory_order_relaxed);
    atomic_store_explicit(&repairs->journal_padded, padded,
                          memory_order_relaxed);
    atomic_store_explicit(&repairs->journal_pos, position,
                          memory_order_release);
    atomic_store_explicit(&rec->length,
                          (uint32_t)(size - MQS_BR_RECORD_HEADER),
                          memory_order_relaxed);
    atomic_store_explicit(&rec->type, MQS_BR_TYPE_PAD, memory_order_relaxed);
    atomic_store_explicit(&rec->owner, (uint16_t)owner, memory_order_relaxed);
    atomic_store_explicit(&rec->commit, commit_tag(ring, position),
                          memory_order_release);
    MQS_FAILPOINT("repair_after_pad");
    /* Padding is no message: counting it in padded takes the dead
     * producer's claim out of mqs_br_count (and gives a bounded ring its
     * place back). */
    atomic_store_explicit(&repairs->padded, padded + 1, memory_order_release);
    atomic_store_explicit(&repairs->journal_pos, MQS_BR_NO_CLAIM,
                          memory_order_release);
    atomic_fetch_add_explicit(&h->counters.v.repaired_records, 1,
                              memory_order_relaxed);
    atomic_fetch_add_explicit(&h->counters.v.repaired_bytes, size,
                              memory_order_relaxed);
    mqs_wait_signal(&h->not_empty.v, 1);
    mqs_wait_signal(&h->not_full.v, 1);
    return 1;
}

/*
 * Finish the padding a repairer died in (see mqs_br_repairs_t). A
 * published pad at journal_pos can only be the dead repairer's, because
 * the record's producer was dead (no other participant could publish
 * it) and no head passes an unpublished record.
 */
static void finish_journal_locked(mqs_bytering_t *ring)
{
    mqs_br_repairs_t *repairs = &ring->header->repairs.v;
    int64_t position = atomic_load_explicit(&repairs->journal_pos,
                                            memory_order_acquire);
    int64_t before;
    int published;

    if (position == MQS_BR_NO_CLAIM)
        return;
    before = atomic_load_explicit(&repairs->journal_padded,
                                  memory_order_acquire);
    published = atomic_load_explicit(&record_at(ring, position)->commit,
                                     memory_order_acquire)
                    == commit_tag(ring, position)
                || any_head_past(ring, position);
    atomic_store_explicit(&repairs->padded, before + published,
                          memory_order_release);
    atomic_store_explicit(&repairs->journal_pos, MQS_BR_NO_CLAIM,
                          memory_order_release);
    if (published) {
        mqs_wait_signal(&ring->header->not_empty.v, 1);
        mqs_wait_signal(&ring->header->not_full.v, 1);
    }
}

static int repair_lock(mqs_bytering_t *ring)
{
    int rc = pthread_mutex_lock(&ring->header->repair_lock.v);

    if (rc == EOWNERDEAD) {
        /* The previous repairer died inside. Its padding count is settled
         * from the journal; every other repair step re-checks the ring,
         * so its half-done work is safe to redo. */
        finish_journal_locked(ring);
        pthread_mutex_consistent(&ring->header->repair_lock.v);
        return 0;
    }
    return rc == 0 ? 0 : MQS_EINVAL;
}

static void repair_unlock(mqs_bytering_t *ring)
{
    pthread_mutex_unlock(&ring->header->repair_lock.v);
}

/*
 * Whether an INTENT claim of a dead producer at [position, position +
 * size) is the claim that won the CAS. The producer may have died after
 * winning and before storing WON (a window of a few instructions), or
 * after losing. A won claim ends where the tail is or where the next
 * record starts, so check that boundary. Two dead producers announcing
 * the same position in those windows with sizes that both end on a
 * record boundary could still mislead this check; callers prefer a WON
 * claim and then the smallest verified size.
 */
static int intent_won(const mqs_bytering_t *ring, int64_t position,
                      int64_t size)
{
    int64_t end = position + size;
    int64_t tail = tail_position(ring);

    if (tail < end)
        return 0;
    if (tail == end)
        return 1;
    if (atomic_load_explicit(&record_at(ring, end)->commit,
                             memory_order_acquire)
        == commit_tag(ring, end))
        return 1;
    for (int i = 0; i < MQS_BR_MAX_PARTICIPANTS; i++) {
        mqs_br_participant_t *p = participant(ring, i);
        if (atomic_load_explicit(&p->claim_state, memory_order_acquire)
                != MQS_BR_CLAIM_NONE
            && atomic_load_explicit(&p->claim_pos, memory_order_acquire)
                   == end)
            return 1;
    }
    return 0;
}

static int claim_owner(const mqs_bytering_t *ring, int64_t position,
                       int *alive);

/*
 * Drop the claim and pins a dead participant left, padding its claim if
 * it owns the record at that position, and count the records it held as
 * lost: one under a get pin, `views` under a view pin, and its `copies`
 * with or without a pin. A view pin without views is a take that had
 * not completed its CAS, or a release that had not cleared the pin yet.
 * The counts are cleared here, so each is added once. Caller holds
 * the repair lock.
 * Returns records repaired, or -1 (nothing changed) while a live
 * participant announces the same position: the dead claim may be an
 * attempt that lost the CAS to it, and padding would write over a record
 * the live one is still writing. Call again later.
 */
static int clear_dead_participant_locked(mqs_bytering_t *ring, int slot)
{
    mqs_br_participant_t *p = participant(ring, slot);
    int64_t position = atomic_load_explicit(&p->claim_pos,
                                            memory_order_acquire);
    int32_t state = atomic_load_explicit(&p->claim_state,
                                         memory_order_acquire);
    int repaired = 0;
    int64_t lost = 0;
    int64_t copies;

    if (position != MQS_BR_NO_CLAIM && state != MQS_BR_CLAIM_NONE) {
        int alive = 0;
        int owner;

        /* Every tail move is a CAS that follows its claimant's
         * announcement, so after this acquire load the scan in
         * claim_owner sees whoever won `position`. */
        (void)tail_position(ring);
        owner = claim_owner(ring, position, &alive);
        if (alive)
            return -1;
        if (owner == slot)
            repaired = pad_record_locked(
                ring, position,
                atomic_load_explicit(&p->claim_size, memory_order_acquire),
                slot);
    }
    if (atomic_load_explicit(&p->get_pin, memory_order_acquire)
        != MQS_BR_NO_PIN)
        lost = 1;
    if (atomic_load_explicit(&p->view_pin, memory_order_acquire)
        != MQS_BR_NO_PIN) {
        int64_t views = atomic_load_explicit(&p->views,
                                             memory_order_relaxed);
        if (views > 0)
            lost += views;
    }
    copies = atomic_load_explicit(&p->copies, memory_order_relaxed);
    if (copies > 0)
        lost += copies;
    if (lost > 0)
        atomic_fetch_add_explicit(&ring->header->counters.v.lost_records,
                                  lost, memory_order_relaxed);
    atomic_store_explicit(&p->claim_state, MQS_BR_CLAIM_NONE,
                          memory_order_relaxed);
    atomic_store_explicit(&p->claim_pos, MQS_BR_NO_CLAIM,
                          memory_order_release);
    atomic_store_explicit(&p->get_pin, MQS_BR_NO_PIN, memory_order_release);
    atomic_store_explicit(&p->view_pin, MQS_BR_NO_PIN, memory_order_release);
    atomic_store_explicit(&p->views, 0, memory_order_relaxed);
    atomic_store_explicit(&p->copies, 0, memory_order_relaxed);
    return repaired;
}

int mqs_br_attach(mqs_bytering_t *ring)
{
    for (int slot = 0; slot < MQS_BR_MAX_PARTICIPANTS; slot++) {
        int rc = lock_byte(ring->fd, slot, F_OFD_SETLK, F_WRLCK, NULL);

        if (rc == -EAGAIN || rc == -EACCES)
            continue;
        if (rc < 0)
            return MQS_EINVAL;
        /* The slot is ours; whoever had it before is gone. */
        if (repair_lock(ring) != 0)
            return MQS_EINVAL;
        rc = clear_dead_participant_locked(ring, slot);
        repair_unlock(ring);
        if (rc < 0) {
            /* Its claim cannot be settled yet: leave the slot as it is
             * for a later repair and take another. */
            lock_byte(ring->fd, slot, F_OFD_SETLK, F_UNLCK, NULL);
            continue;
        }
        atomic_store_explicit(&participant(ring, slot)->pid, getpid(),
                              memory_order_relaxed);
        ring->slot = slot;
        return rc;
    }
    return MQS_EFULL;
}

void mqs_br_detach(mqs_bytering_t *ring)
{
    mqs_br_participant_t *p;

    if (ring->slot < 0)
        return;
    p = participant(ring, ring->slot);
    atomic_store_explicit(&p->get_pin, MQS_BR_NO_PIN, memory_order_release);
    atomic_store_explicit(&p->view_pin, MQS_BR_NO_PIN, memory_order_release);
    atomic_store_explicit(&p->views, 0, memory_order_relaxed);
    atomic_store_explicit(&p->copies, 0, memory_order_relaxed);
    lock_byte(ring->fd, ring->slot, F_OFD_SETLK, F_UNLCK, NULL);
    ring->slot = -1;
    mqs_wait_signal(&ring->header->not_full.v, 1);
}

/* Smallest position some reader still needs. Heads first: a consumer
 * pins before its CAS on a head, so a head seen moved implies its pin
 * is seen too. */
static int64_t compute_gate(mqs_bytering_t *ring)
{
    mqs_br_header_t *h = ring->header;
    int64_t gate = INT64_MAX;

    for (int g = 0; g < h->config.v.n_groups; g++) {
        int64_t head = group_head(ring, g);
        if (head < gate)
            gate = head;
    }
    for (int i = 0; i < MQS_BR_MAX_PARTICIPANTS; i++) {
        mqs_br_participant_t *p = participant(ring, i);
        int64_t get_pin = atomic_load_explicit(&p->get_pin,
                                               memory_order_acquire);
        int64_t view_pin = atomic_load_explicit(&p->view_pin,
                                                memory_order_acquire);
        if (get_pin < gate)
            gate = get_pin;
        if (view_pin < gate)
            gate = view_pin;
    }
    return gate;
}

/*
 * Whether a bounded ring (maxsize > 0) has room for one more message,
 * given `claimed` from the tail pair. padded and taken are loaded after
 * claimed was, so they can only be lower than at the CAS that will use
 * `claimed`: the count is over-estimated, never under, and maxsize holds.
 */
static int has_item_room(const mqs_bytering_t *ring, int64_t claimed)
{
    const mqs_br_header_t *h = ring->header;
    int64_t maxsize = h->config.v.maxsize;
    int64_t padded, taken;

    if (maxsize == 0)
        return 1;
    padded = atomic_load_explicit(
        (_Atomic int64_t *)&h->repairs.v.padded, memory_order_acquire);
    taken = atomic_load_explicit(
        (_Atomic int64_t *)&h->groups[0].v.cursor.second,
        memory_order_acquire);
    return claimed - padded - taken < maxsize;
}

int mqs_br_try_put(mqs_bytering_t *ring, const void *const *parts,
                   const size_t *part_lengths, int n_parts, uint16_t type)
{
    mqs_br_header_t *h = ring->header;
    mqs_br_participant_t *me = participant(ring, ring->slot);
    mqs_br_rec_header_t *rec;
    unsigned char *out;
    int64_t length = 0, size, tail, claimed, gate;

    for (int i = 0; i < n_parts; i++)
        length += (int64_t)part_lengths[i];
    if (type == MQS_BR_TYPE_PAD)
        return MQS_EINVAL;
    if (length > h->config.v.max_message_size)
        return MQS_ETOOBIG;
    size = align_record(length);

    tail = atomic_load_explicit(&h->tail.v.first, memory_order_acquire);
    claimed = atomic_load_explicit(&h->tail.v.second, memory_order_acquire);
    for (;;) {
        int full = !has_item_room(ring, claimed);

        if (!full && tail + size - ring->gate_cache > ring->capacity) {
            gate = compute_gate(ring);
            ring->gate_cache = gate;
            full = tail + size - gate > ring->capacity;
        }
        if (full) {
            atomic_store_explicit(&me->claim_state, MQS_BR_CLAIM_NONE,
                                  memory_order_release);
            return MQS_EFULL;
        }
        /* Announce the claim before the CAS: a repairer that sees the
         * tail past `tail` also sees this announcement. */
        atomic_store_explicit(&me->claim_size, size, memory_order_relaxed);
        atomic_store_explicit(&me->claim_pos, tail, memory_order_relaxed);
        atomic_store_explicit(&me->claim_state, MQS_BR_CLAIM_INTENT,
                              memory_order_release);
        if (mqs_pair_cas(&h->tail.v, &tail, &claimed, tail + size,
                         claimed + 1))
            break;
    }
    MQS_FAILPOINT("put_after_cas");
    ring->last_put_position = tail;
    atomic_store_explicit(&me->claim_state, MQS_BR_CLAIM_WON,
                          memory_order_release);
    MQS_FAILPOINT("put_after_claim");

    rec = record_at(ring, tail);
    atomic_store_explicit(&rec->length, (uint32_t)length,
                          memory_order_relaxed);
    atomic_store_explicit(&rec->type, type, memory_order_relaxed);
    atomic_store_explicit(&rec->owner, (uint16_t)ring->slot,
                          memory_order_relaxed);
    out = (unsigned char *)rec + MQS_BR_RECORD_HEADER;
    for (int i = 0; i < n_parts; i++) {
        memcpy(out, parts[i], part_lengths[i]);
        out += part_lengths[i];
        MQS_FAILPOINT("put_mid_payload");
    }
    MQS_FAILPOINT("put_before_publish");
    /* Publish: the payload stores happen before the tag is seen. */
    atomic_store_explicit(&rec->commit, commit_tag(ring, tail),
                          memory_order_release);

    atomic_store_explicit(&me->claim_state, MQS_BR_CLAIM_NONE,
                          memory_order_relaxed);
    atomic_store_explicit(&me->claim_pos, MQS_BR_NO_CLAIM,
                          memory_order_release);
    mqs_wait_signal(&h->not_empty.v, 1);
    return MQS_OK;
}

int64_t mqs_br_count(const mqs_bytering_t *ring, int group)
{
    const mqs_br_header_t *h = ring->header;
    /* Loaded in this order each can only be older than the next, so the
     * difference is never below the count at the last load. */
    int64_t taken = atomic_load_explicit(
        (_Atomic int64_t *)&h->groups[group].v.cursor.second,
        memory_order_acquire);
    int64_t padded = atomic_load_explicit(
        (_Atomic int64_t *)&h->repairs.v.padded, memory_order_acquire);
    int64_t claimed = atomic_load_explicit(
        (_Atomic int64_t *)&h->tail.v.second, memory_order_acquire);

    return claimed - padded - taken;
}

int mqs_br_try_take(mqs_bytering_t *ring, int group, int view,
                    mqs_br_record_t *record)
{
    mqs_br_header_t *h = ring->header;
    mqs_br_group_t *g = &h->groups[group].v;
    mqs_br_participant_t *me = participant(ring, ring->slot);
    _Atomic int64_t *pin = view ? &me->view_pin : &me->get_pin;
    int64_t head = atomic_load_explicit(&g->cursor.first,
                                        memory_order_acquire);
    int64_t taken = atomic_load_explicit(&g->cursor.second,
                                         memory_order_acquire);
    int64_t old_view_pin = atomic_load_explicit(&me->view_pin,
                                                memory_order_relaxed);

    /* Count the view before the pin store (release) and the CAS that
     * follow, so a reaper that sees the pin also sees the count: a
     * process killed between the CAS and the return is counted. */
    if (view)
        atomic_fetch_add_explicit(&me->views, 1, memory_order_relaxed);
    for (;;) {
        mqs_br_rec_header_t *rec = record_at(ring, head);
        uint64_t commit;
        uint32_t length;
        uint16_t type;
        int64_t size;

        MQS_OPTIMISTIC_READS_BEGIN();
        commit = atomic_load_explicit(&rec->commit, memory_order_acquire);
        length = atomic_load_explicit(&rec->length, memory_order_relaxed);
        type = atomic_load_explicit(&rec->type, memory_order_relaxed);
        MQS_OPTIMISTIC_READS_END();

        if (commit != commit_tag(ring, head)) {
            int64_t now = atomic_load_explicit(&g->cursor.first,
                                               memory_order_acquire);
            if (now != head) {
                head = now;
                taken = atomic_load_explicit(&g->cursor.second,
                                             memory_order_acquire);
                continue;
            }
            if (!view || old_view_pin == MQS_BR_NO_PIN)
                atomic_store_explicit(pin, view ? old_view_pin
                                                : MQS_BR_NO_PIN,
                                      memory_order_release);
            if (view)
                atomic_fetch_sub_explicit(&me->views, 1,
                                          memory_order_relaxed);
            if (tail_position(ring) == head)
                return MQS_EEMPTY;
            return MQS_EAGAIN_STUCK;
        }
        size = align_record(length);

        /* Pin before taking: a producer that sees the head moved past
         * `head` also sees the pin and keeps off these bytes. A view pin
         * already set is older, so it stays. */
        if (!view || old_view_pin == MQS_BR_NO_PIN)
            atomic_store_explicit(pin, head, memory_order_release);
        /* The take and its count are one CAS: padding counts nothing. */
        if (!mqs_pair_cas(&g->cursor, &head, &taken, head + size,
                          taken + (type != MQS_BR_TYPE_PAD)))
            continue;
        MQS_FAILPOINT("take_after_cas");
        if (type == MQS_BR_TYPE_PAD) {
            head += size;
            continue;
        }
        record->payload = (const unsigned char *)rec + MQS_BR_RECORD_HEADER;
        record->position = head;
        record->length = length;
        record->type = type;
        return MQS_OK;
    }
}

int mqs_br_head_published(const mqs_bytering_t *ring, int group)
{
    int64_t head = group_head(ring, group);
    const mqs_br_rec_header_t *rec = record_at(ring, head);
    uint64_t commit;

    MQS_OPTIMISTIC_READS_BEGIN();
    commit = atomic_load_explicit(&rec->commit, memory_order_acquire);
    MQS_OPTIMISTIC_READS_END();
    return commit == commit_tag(ring, head);
}

void mqs_br_unpin(mqs_bytering_t *ring, int view, int64_t position)
{
    mqs_br_participant_t *me = participant(ring, ring->slot);

    if (view) {
        /* Before the pin store (release): a reaper that sees the pin
         * moved or cleared also sees this view released. */
        atomic_fetch_sub_explicit(&me->views, 1, memory_order_relaxed);
        atomic_store_explicit(&me->view_pin, position, memory_order_release);
    } else {
        atomic_store_explicit(&me->get_pin, MQS_BR_NO_PIN,
                              memory_order_release);
        MQS_FAILPOINT("unpin_after_drop");
    }
    mqs_wait_signal(&ring->header->not_full.v, 1);
}

/* Find the participant whose claim sits at `position`: a live one if
 * any (*alive = 1), else a dead WON claim, else the dead INTENT claim
 * with the smallest size that intent_won accepts. Returns the slot or
 * -1. */
static int claim_owner(const mqs_bytering_t *ring, int64_t position,
                       int *alive)
{
    int dead_owner = -1;
    int dead_intent = -1;
    int64_t intent_size = INT64_MAX;

    for (int i = 0; i < MQS_BR_MAX_PARTICIPANTS; i++) {
        mqs_br_participant_t *p = participant(ring, i);
        int32_t state = atomic_load_explicit(&p->claim_state,
                                             memory_order_acquire);
        if (state == MQS_BR_CLAIM_NONE
            || atomic_load_explicit(&p->claim_pos, memory_order_acquire)
                   != position)
            continue;
        if (mqs_br_participant_alive(ring, i) != 0) {
            /* A live participant announced this position: either it
             * owns the claim or its CAS is about to fail. Wait. */
            *alive = 1;
            return i;
        }
        if (state == MQS_BR_CLAIM_WON) {
            dead_owner = i;
        } else {
            int64_t size = atomic_load_explicit(&p->claim_size,
                                                memory_order_acquire);
            if (size < intent_size && intent_won(ring, position, size)) {
                dead_intent = i;
                intent_size = size;
            }
        }
    }
    *alive = 0;
    return dead_owner >= 0 ? dead_owner : dead_intent;
}

int mqs_br_stalled_owner(const mqs_bytering_t *ring, int group)
{
    int64_t head = group_head(ring, group);
    int64_t tail = tail_position(ring);
    int alive = 0;
    int owner;

    if (tail == head)
        return -1;
    owner = claim_owner(ring, head, &alive);
    return alive ? owner : -1;
}

/* Whether a participant, if dead, left something for the reaper: a
 * claim, a pin or copies not returned to its caller. */
static int has_leftovers(mqs_br_participant_t *p)
{
    return atomic_load_explicit(&p->get_pin, memory_order_acquire)
               != MQS_BR_NO_PIN
           || atomic_load_explicit(&p->view_pin, memory_order_acquire)
                  != MQS_BR_NO_PIN
           || atomic_load_explicit(&p->claim_state, memory_order_acquire)
                  != MQS_BR_CLAIM_NONE
           || atomic_load_explicit(&p->copies, memory_order_relaxed) != 0;
}

int mqs_br_repair(mqs_bytering_t *ring)
{
    mqs_br_header_t *h = ring->header;
    int repaired = 0;

    if (repair_lock(ring) != 0)
        return MQS_EINVAL;

    /* Unpublished records at a group head whose producer is dead. */
    for (int g = 0; g < h->config.v.n_groups; g++) {
        int64_t head = group_head(ring, g);
        int64_t tail = tail_position(ring);
        int alive = 0, owner;

        if (tail == head)
            continue;
        owner = claim_owner(ring, head, &alive);
        if (owner >= 0 && !alive) {
            int rc = clear_dead_participant_locked(ring, owner);
            if (rc > 0)
                repaired += rc;
        }
    }

    /* Pins, claims and copies of every other dead participant. */
    for (int i = 0; i < MQS_BR_MAX_PARTICIPANTS; i++) {
        if (!has_leftovers(participant(ring, i)))
            continue;
        if (mqs_br_participant_alive(ring, i) == 0) {
            int rc = clear_dead_participant_locked(ring, i);
            if (rc > 0)
                repaired += rc;
        }
    }
    repair_unlock(ring);
    ring->gate_cache = 0;
    return repaired;
}

int mqs_br_settle(mqs_bytering_t *ring)
{
    for (int i = 0; i < MQS_BR_MAX_PARTICIPANTS; i++) {
        if (i == ring->slot || !has_leftovers(participant(ring, i)))
            continue;
        if (mqs_br_participant_alive(ring, i) == 0)
            return mqs_br_repair(ring);
    }
    return 0;
}

int mqs_br_peek(const mqs_bytering_t *ring, int64_t position,
                mqs_br_record_t *record)
{
    mqs_br_rec_header_t *rec = record_at(ring, position);

    if (atomic_load_explicit(&rec->commit, memory_order_acquire)
        != commit_tag(ring, position))
        return tail_position(ring) == position ? MQS_EEMPTY
                                               : MQS_EAGAIN_STUCK;
    record->payload = (const unsigned char *)rec + MQS_BR_RECORD_HEADER;
    record->position = position;
    record->length = atomic_load_explicit(&rec->length, memory_order_relaxed);
    record->type = atomic_load_explicit(&rec->type, memory_order_relaxed);
    return MQS_OK;
}

int mqs_br_advance(mqs_bytering_t *ring, int group, int64_t position,
                   int64_t messages)
{
    mqs_br_group_t *g = &ring->header->groups[group].v;
    int64_t head = atomic_load_explicit(&g->cursor.first,
                                        memory_order_acquire);
    int64_t taken = atomic_load_explicit(&g->cursor.second,
                                         memory_order_acquire);

    do {
        if (position < head)
            return MQS_EINVAL;
    } while (!mqs_pair_cas(&g->cursor, &head, &taken, position,
                           taken + messages));
    mqs_wait_signal(&ring->header->not_full.v, 1);
    return MQS_OK;
}

int64_t mqs_br_head(const mqs_bytering_t *ring, int group)
{
    return group_head(ring, group);
}

int64_t mqs_br_record_size(int64_t length)
{
    return align_record(length);
}
