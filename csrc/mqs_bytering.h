/*
 * mqs_bytering.h: a multi-producer, multi-consumer ring of variable-length
 * records that lives in shared memory and survives the death of any
 * process attached to it.
 *
 * File layout (one memfd or /dev/shm file):
 *
 *   0                     header, MQS_BR_HEADER_BYTES (64 KiB):
 *     block 0             config, read-only after init (magic, version,
 *                         sizes, secret)
 *     block 1             tail       pair: producers' claim position
 *                                    (bytes) and records claimed, ever
 *     block 2             repairs    claims turned into padding, ever,
 *                                    and the repairer's journal
 *     block 3             not_empty  event word, consumers wait on it
 *     block 4             not_full   event word, producers wait on it
 *     block 5             counters   repaired records and bytes, records
 *                                    lost with a dead consumer
 *     block 6-7           repair_lock  process-shared robust mutex that
 *                                    serialises repairs
 *     block 8..15         groups[8]  pair: head (bytes) and messages taken
 *                                    (records, padding not counted)
 *     block 16..          participants[MQS_BR_MAX_PARTICIPANTS]
 *     block 272..         latency  enqueue-to-deliver histogram of
 *                                  sampled records (mqs_hist.h)
 *   MQS_BR_HEADER_BYTES   data, `capacity` bytes (a power of two and a
 *                         multiple of the page size)
 *   + capacity            delayed area, config.delayed_bytes (a page
 *                         multiple, 0 for none): see mqs_delay.h
 *
 * Each block is MQS_PAD_BYTES (128) long, so no two counters written by
 * different sides share a cache line pair.
 *
 * The data region is mapped twice, back to back, so every record is
 * contiguous in virtual memory even when it runs past the end of the
 * buffer: no padding records at the wrap and whole-record memoryviews.
 *
 * Record (16-byte aligned, header never split):
 *
 *   +----------------+-------------+-----------+-----------+----------+
 *   | commit (u64)   | length (u32)| type (u16)| owner(u16)| payload  |
 *   +----------------+-------------+-----------+-----------+----------+
 *   0                8             12          14          16
 *
 *   A type with bit MQS_BR_TYPE_STAMPED set (padding aside) marks a
 *   sampled record: its payload starts with the producer's
 *   CLOCK_MONOTONIC time in ns (8 bytes), which mqs_br_unstamp turns
 *   into a latency in the header's histogram and strips. Unsampled
 *   records cost the consumer one bit test.
 *
 *   commit == secret ^ position once the record is published; it is
 *   written last, with release. Any other value means "not published
 *   yet". Because the tag names the record's absolute 64-bit position,
 *   stale bytes from an earlier lap never look published, and consumers
 *   need not zero what they consumed. `secret` is random per ring, so
 *   payload bytes match a tag only by a 2**-64 chance.
 *
 * Counting. Each position moves together with a count in one 16-byte
 * CAS (mqs_pair_t): a producer's claim adds one to `claimed`, a
 * consumer's take adds one to its group's `taken` (none for padding).
 * A record of group g is queued from its claim until it is taken, so
 * mqs_br_count = claimed - padded - taken, and a process killed at any
 * instruction leaves these counts exact: there is no step between moving
 * a position and counting the move. `padded` changes only under the
 * repair lock, journalled so a repairer that dies halfway is finished
 * by the next one (see repairs below). A bounded ring (maxsize > 0)
 * checks that count, against group 0, inside the claim CAS loop.
 *
 * Producers claim [tail, tail + size) by CAS on tail, gated on the slowest
 * group head and on the pins of readers still copying (see below), write,
 * then store the commit word. Each consumer group has a head; consumers
 * of a group compete for records by CAS on it. A consumer first pins the
 * position it is about to take (a word in its participant block), so a
 * producer never reuses bytes still being copied or lent as a view.
 *
 * Crash repair. Every attached process (participant) holds an open file
 * description lock on byte MQS_BR_LOCK_BASE + slot of the shared file
 * for as long as it lives; the kernel drops it when the process dies, so
 * liveness never depends on a PID. A producer writes its claim (position
 * and size) into its participant block before the CAS. A reader stuck on
 * an unpublished record looks for the participant whose claim names that
 * position; only if that participant's lock proves it dead does the
 * reader publish the record as padding (counted in repaired). A live but
 * slow producer is waited for. Pins of dead participants are dropped,
 * and what they held counted in lost_records: one for a get pin, the
 * participant's `views` for a view pin, plus its `copies`.
 * Repairs take the robust repair_lock and re-check under it that the
 * record is still unpublished at a group head, so two repairers never
 * write over a record that a producer placed after the first repair.
 * A dead producer's claim at a position that a live participant also
 * announces (the dead one may have lost the CAS to it) is left alone
 * until the live one has published or moved on.
 */
#ifndef MQS_BYTERING_H
#define MQS_BYTERING_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "mqs_atomic.h"
#include "mqs_hist.h"
#include "mqs_wait.h"

#define MQS_BR_MAGIC 0x31474e495253514dULL /* "MQSRING1" little-endian */
#define MQS_BR_VERSION 4
#define MQS_BR_HEADER_BYTES 65536
#define MQS_BR_RECORD_HEADER 16
#define MQS_BR_ALIGN 16
#define MQS_BR_MAX_GROUPS 8
#define MQS_BR_MAX_PARTICIPANTS 256
#define MQS_BR_LOCK_BASE ((int64_t)1 << 40)
#define MQS_BR_TYPE_PAD 0xffff
#define MQS_BR_TYPE_STAMPED 0x4000
#define MQS_BR_STAMP_BYTES 8
#define MQS_BR_NO_CLAIM INT64_MAX
#define MQS_BR_NO_PIN INT64_MAX

/* init_state values: the creator stores READY last, with release. */
#define MQS_BR_INIT_READY 0x52454459u /* "READ" */

typedef struct mqs_br_config {
    uint64_t magic;
    uint32_t version;
    uint32_t header_bytes;
    int64_t capacity;
    int64_t max_message_size;
    int64_t maxsize;             /* records; 0 for no limit */
    uint64_t secret;
    int32_t n_groups;
    _Atomic uint32_t init_state;
    int64_t delayed_bytes;       /* delayed area after the data region
                                    (mqs_delay.h), a page multiple or 0 */
} mqs_br_config_t;

/* cursor.first: next record position to hand out (bytes);
 * cursor.second: messages taken, ever (padding is not counted). */
typedef struct mqs_br_group {
    mqs_pair_t cursor;
    _Atomic int32_t active;
} mqs_br_group_t;

/* tail.first: claim position (bytes); tail.second: records claimed. */

/*
 * padded: claims of dead producers turned into padding, ever. Only the
 * holder of repair_lock writes it. Before padding the record at
 * journal_pos it stores journal_padded (padded before this repair) and
 * journal_pos; after it stores padded + 1 and clears journal_pos. A
 * repairer that takes the lock after its holder died (EOWNERDEAD) and
 * finds journal_pos set sets padded to journal_padded + 1 if the pad was
 * published (its tag is there or a group head passed it), else to
 * journal_padded.
 */
typedef struct mqs_br_repairs {
    _Atomic int64_t padded;
    _Atomic int64_t journal_pos;
    _Atomic int64_t journal_padded;
} mqs_br_repairs_t;

/* claim_state: a claim is announced before the CAS on tail and
 * confirmed after it wins, so a repairer can tell a claim that won from
 * the leftover of a dead producer's failed attempt. */
#define MQS_BR_CLAIM_NONE 0
#define MQS_BR_CLAIM_INTENT 1
#define MQS_BR_CLAIM_WON 2

typedef struct mqs_br_participant {
    _Atomic int64_t claim_pos;   /* position of an unpublished claim */
    _Atomic int64_t claim_size;  /* its aligned size in bytes */
    _Atomic int32_t claim_state;
    _Atomic int64_t get_pin;     /* record being copied out */
    _Atomic int64_t view_pin;    /* oldest record lent as a view */
    _Atomic int64_t pid;         /* informational only, never trusted */
    /* Records lent as views and not yet released, plus one while a view
     * take is under way, so a reaper that finds view_pin set counts at
     * least every view the dead process held. Only the owner changes
     * it while it lives. An older mqs leaves it zero, so its views go
     * uncounted, as before this field. */
    _Atomic int64_t views;
    /* Records copied out and unpinned that the owner has not returned
     * to its caller yet: a get_many batch, or a get building its
     * result. The owner stores it before each get pin drop, so a reaper
     * counts these records with or without a pin. Only the owner changes
     * it while it lives. An older mqs leaves it zero, as before this
     * field. */
    _Atomic int64_t copies;
} mqs_br_participant_t;

typedef struct mqs_br_counters {
    _Atomic int64_t repaired_records;
    _Atomic int64_t repaired_bytes;
    _Atomic int64_t lost_records;
    _Atomic int64_t stalls_reported;
    /* Messages taken whose payload the consumer's serializer failed to
     * decode, so they were dropped. Rings mapped by an older mqs have
     * zeros in this padding, so the field needs no layout version. */
    _Atomic int64_t decode_failures;
} mqs_br_counters_t;

#define MQS_BR_BLOCK(type) \
    union { type v; char pad[MQS_PAD_BYTES]; }

typedef struct mqs_br_header {
    MQS_BR_BLOCK(mqs_br_config_t) config;
    MQS_BR_BLOCK(mqs_pair_t) tail;
    MQS_BR_BLOCK(mqs_br_repairs_t) repairs;
    MQS_BR_BLOCK(mqs_waitword_t) not_empty;
    MQS_BR_BLOCK(mqs_waitword_t) not_full;
    MQS_BR_BLOCK(mqs_br_counters_t) counters;
    union {
        pthread_mutex_t v;
        char pad[2 * MQS_PAD_BYTES];
    } repair_lock;
    MQS_BR_BLOCK(mqs_br_group_t) groups[MQS_BR_MAX_GROUPS];
    MQS_BR_BLOCK(mqs_br_participant_t) participants[MQS_BR_MAX_PARTICIPANTS];
    union {
        mqs_hist_t v;
        char pad[(sizeof(mqs_hist_t) + MQS_PAD_BYTES - 1)
                 / MQS_PAD_BYTES * MQS_PAD_BYTES];
    } latency;
} mqs_br_header_t;

/* Process-local handle: where the mapping is, and this process's slot. */
typedef struct mqs_bytering {
    mqs_br_header_t *header;
    unsigned char *data;         /* 2 * capacity bytes of address space */
    int64_t capacity;
    int64_t mask;
    uint64_t secret;
    int fd;                      /* this process's own open file description */
    int slot;                    /* participant index, -1 before attach */
    int64_t gate_cache;          /* last computed gate, local */
    int64_t last_put_position;   /* position of this handle's last put */
} mqs_bytering_t;

/* A record handed to a consumer: pointer into the mapping. */
typedef struct mqs_br_record {
    const unsigned char *payload;
    int64_t position;
    uint32_t length;
    uint16_t type;
} mqs_br_record_t;

/* Total file size for a data region of `capacity` bytes. */
int64_t mqs_br_file_bytes(int64_t capacity);

/*
 * Check capacity (power of two, >= one page, <= 2**40) and the sizes.
 * Returns MQS_OK or MQS_EINVAL.
 */
int mqs_br_check_sizes(int64_t capacity, int64_t max_message_size,
                       int64_t maxsize, int32_t n_groups);

/*
 * Map an already sized shared file: the header, and the data region
 * twice. The handle takes no ownership of fd. Returns MQS_OK, MQS_ENOMEM
 * when the address space cannot be had.
 */
int mqs_br_map(mqs_bytering_t *ring, int fd, int64_t capacity);

/* Unmap what mqs_br_map mapped. */
void mqs_br_unmap(mqs_bytering_t *ring);

/*
 * Map the header and both copies of the data region again from fd, a new
 * open file description of the same file, at the same addresses, and
 * make fd the handle's own. A forked child calls it: the mappings it
 * inherited reference the parent's description, which keeps the
 * parent's liveness lock held while the child lives. The handle takes
 * no ownership of fd. Returns MQS_OK, or MQS_ENOMEM when the address
 * space is exhausted: part of the old mappings may be gone then, so the
 * handle must not be used.
 */
int mqs_br_remap(mqs_bytering_t *ring, int fd);

/*
 * Write a fresh header into a mapped, zero-filled file, then mark it
 * ready. Only the creating process, before anyone attaches.
 * Returns MQS_OK, or MQS_EINVAL when the robust mutex cannot be set up.
 */
int mqs_br_format(mqs_bytering_t *ring, int64_t max_message_size,
                   int64_t maxsize, int32_t n_groups, uint64_t secret);

/*
 * Validate the header of a file another process created: magic, layout
 * version, sizes against `file_bytes` (header, data and delayed area),
 * init_state. Returns MQS_OK,
 * MQS_EAGAIN_INIT when the creator has not finished (retry), MQS_ECORRUPT
 * for a bad magic or inconsistent sizes, MQS_EVERSION for another layout
 * version.
 */
#define MQS_EAGAIN_INIT (-20)
#define MQS_EVERSION (-21)
int mqs_br_validate(const mqs_br_header_t *header, int64_t file_bytes);

/*
 * Take a free participant slot: lock byte MQS_BR_LOCK_BASE + slot of fd
 * (an open file description of this process's own), repair what a dead
 * previous owner left, and reset the block. A free slot whose dead claim
 * cannot be settled yet (a live participant announces the same position)
 * is skipped. Returns how many records of the dead previous owner were
 * repaired (0 or 1; MQS_OK is 0), MQS_EFULL when no slot could be taken
 * (all MQS_BR_MAX_PARTICIPANTS are held by live processes), or
 * MQS_EINVAL when locking failed.
 */
int mqs_br_attach(mqs_bytering_t *ring);

/* Release this process's slot (its lock goes when its fd is closed). */
void mqs_br_detach(mqs_bytering_t *ring);

/*
 * 1 when participant `slot` is held by a live process, 0 when dead or
 * never used, negative on a fcntl error.
 */
int mqs_br_participant_alive(const mqs_bytering_t *ring, int slot);

/*
 * Producer: claim room for `length` payload bytes, write the payload
 * gathered from `parts` (n_parts pointers and lengths), publish it with
 * type `type`, and wake waiting consumers. Any thread of an attached
 * process; callers in one process serialise claim..publish (the GIL).
 * Returns MQS_OK, MQS_EFULL (no room now), MQS_ETOOBIG (larger than
 * max_message_size: never fits), MQS_EINVAL (type reserved).
 */
int mqs_br_try_put(mqs_bytering_t *ring, const void *const *parts,
                   const size_t *part_lengths, int n_parts, uint16_t type);

/*
 * Messages of `group` claimed and not yet taken: claimed - padded -
 * taken. A put counts from its claim, so a record a producer is still
 * copying in counts, as does the claim of a producer that died before
 * publishing until a repair turns it into padding. Exact when nothing
 * moves. Under concurrent puts and takes the result is at least the
 * count at return, and above it by the takes and repairs made during
 * the call.
 */
int64_t mqs_br_count(const mqs_bytering_t *ring, int group);

/*
 * Consumer: take the next published record of `group`, pinned with the
 * pin chosen by `view` (0: get pin, 1: view pin, which the caller keeps
 * at the oldest record it lends, and which counts the record in the
 * participant's `views`). The record stays valid until mqs_br_unpin.
 * Any thread of an attached process.
 * Returns MQS_OK, MQS_EEMPTY when nothing is published at the head,
 * MQS_EAGAIN_STUCK when the head record is claimed but not yet published
 * (call mqs_br_repair now and then while waiting).
 */
#define MQS_EAGAIN_STUCK (-22)
int mqs_br_try_take(mqs_bytering_t *ring, int group, int view,
                    mqs_br_record_t *record);

/*
 * Consumer: return 1 when the record at the head of `group` is published,
 * so that mqs_br_try_take may succeed, else 0. It reads the head and that
 * record's commit word and writes nothing. A consumer that spins on it
 * instead of on mqs_br_try_take reads no tail and stores no pin until a
 * record arrives. A 0 can also mean a stuck record, which only
 * mqs_br_try_take reports.
 */
int mqs_br_head_published(const mqs_bytering_t *ring, int group);

/*
 * Drop the get pin (view == 0, after mqs_br_set_copies counted the
 * copy), or release one view (view == 1) and set
 * the view pin to `position`, the oldest view still lent (MQS_BR_NO_PIN
 * when none is), then wake waiting producers. Call it once per view.
 */
void mqs_br_unpin(mqs_bytering_t *ring, int view, int64_t position);

/*
 * Repair what dead participants left: a record at a group head claimed
 * by a dead producer becomes padding, pins of dead consumers are
 * dropped. Any attached process, any time. Returns how many records
 * were repaired (>= 0), or a negative status.
 */
int mqs_br_repair(mqs_bytering_t *ring);

/*
 * Slot of the live participant whose unpublished claim blocks the head
 * of `group`, or -1. Lets a caller report a stalled producer.
 */
int mqs_br_stalled_owner(const mqs_bytering_t *ring, int group);

/*
 * Repair what dead participants left, if any: the open claims of dead
 * producers wherever they sit (so mqs_br_count counts only messages that
 * will arrive) and the pins of dead consumers (so they stop holding back
 * producers). Three loads per participant slot when no other slot has a
 * claim or pin open, plus one fcntl per open one. Returns records
 * repaired (as mqs_br_repair) or a negative status.
 */
int mqs_br_settle(mqs_bytering_t *ring);

/*
 * Sole consumer of `group` (the appender of a durable queue): read the
 * record at `position` without taking it. The bytes stay valid until the
 * group head is moved past them with mqs_br_advance, because the head
 * gates producers. Returns MQS_OK (record filled; padding has type
 * MQS_BR_TYPE_PAD), MQS_EEMPTY when `position` is the tail, or
 * MQS_EAGAIN_STUCK when the record there is claimed but unpublished.
 */
int mqs_br_peek(const mqs_bytering_t *ring, int64_t position,
                mqs_br_record_t *record);

/*
 * Move `group`'s head forward to `position`, counting `messages` taken,
 * in one CAS. For a sole consumer after mqs_br_peek; wakes producers.
 * Returns MQS_OK, or MQS_EINVAL if `position` is behind the head.
 */
int mqs_br_advance(mqs_bytering_t *ring, int group, int64_t position,
                   int64_t messages);

/* Position of `group`'s head (bytes); aligned size of a record of
 * `length` payload bytes. */
int64_t mqs_br_head(const mqs_bytering_t *ring, int group);
int64_t mqs_br_record_size(int64_t length);

/* Accessors for the Cython layer, which does not mirror the unions. */
static inline mqs_br_config_t *mqs_br_config(mqs_bytering_t *ring)
{
    return &ring->header->config.v;
}

static inline mqs_waitword_t *mqs_br_not_empty(mqs_bytering_t *ring)
{
    return &ring->header->not_empty.v;
}

static inline mqs_waitword_t *mqs_br_not_full(mqs_bytering_t *ring)
{
    return &ring->header->not_full.v;
}

static inline mqs_br_counters_t *mqs_br_counters(mqs_bytering_t *ring)
{
    return &ring->header->counters.v;
}

/* Count one message that a consumer took but failed to decode. Any
 * thread of any attached process may call it. Relaxed, because the
 * counter orders nothing else. */
static inline void mqs_br_count_decode_failure(mqs_bytering_t *ring)
{
    atomic_fetch_add_explicit(&ring->header->counters.v.decode_failures, 1,
                              memory_order_relaxed);
}

static inline mqs_hist_t *mqs_br_latency(mqs_bytering_t *ring)
{
    return &ring->header->latency.v;
}

/*
 * Consumer, right after a take: if `record` is stamped, record now minus
 * its stamp in the ring's latency histogram and strip the stamp, so the
 * record reads as its producer passed it. Any thread of an attached
 * process; unstamped records are left alone.
 */
static inline void mqs_br_unstamp(mqs_bytering_t *ring,
                                  mqs_br_record_t *record)
{
    int64_t stamp_ns;
    if (!(record->type & MQS_BR_TYPE_STAMPED)
        || record->type == MQS_BR_TYPE_PAD
        || record->length < MQS_BR_STAMP_BYTES)
        return;
    memcpy(&stamp_ns, record->payload, MQS_BR_STAMP_BYTES);
    mqs_hist_record(mqs_br_latency(ring), mqs_monotonic_ns() - stamp_ns);
    record->payload += MQS_BR_STAMP_BYTES;
    record->length -= MQS_BR_STAMP_BYTES;
    record->type &= (uint16_t)~MQS_BR_TYPE_STAMPED;
}

static inline mqs_br_participant_t *mqs_br_participant(mqs_bytering_t *ring,
                                                       int slot)
{
    return &ring->header->participants[slot].v;
}

/*
 * Consumer: store how many records this participant copied out and has
 * not returned to its caller yet. Call it before the mqs_br_unpin that
 * drops a copy's get pin, with that copy counted, so the pin store
 * (release) orders it first and a reaper that sees the pin dropped also
 * sees the copy counted. A death between the two counts the copy twice.
 * Lower it by the records returned (to 0 for a lone caller) right
 * before they reach the caller. A plain store, not a read-modify-write,
 * because only the owner writes it while it lives: threads sharing one
 * slot must keep the total under one lock (in Python, the GIL) and
 * store that total.
 */
static inline void mqs_br_set_copies(mqs_bytering_t *ring, int64_t copies)
{
    atomic_store_explicit(&ring->header->participants[ring->slot].v.copies,
                          copies, memory_order_relaxed);
}

#endif /* MQS_BYTERING_H */
