/*
 * mqs_topiccore.h: the hot state of one broker topic as C data in shared
 * memory, with the delivery rules of mqs.broker._state.TopicState for
 * the features it covers.
 *
 * One mapping per topic, formatted by mqs_tc_format and used by every
 * process under the robust process-shared mutex in the header. It stores
 * offsets, never pointers, so each process may map it anywhere. Layout:
 *   header        config, mutex, change wait word, counters
 *   slots         capacity messages: seq, priority, lane, length, body
 *   groups        max_groups consumer groups: name, lane cursors,
 *                 scheduler credits, counters
 *   entries       max_groups x capacity: the state of each message in
 *                 each group (ready, in flight, dead), its attempts,
 *                 ticket, ready order, deadline and consumer
 *   lane rings    max_groups x lanes x capacity slot indices: the ready
 *                 entries of each lane in delivery order
 *   consumers     max_consumers: group, prefetch, in-flight count, owner
 *
 * Covered: lanes by priority with the weighted (deficit round robin) or
 * strict scheduler, groups started at "earliest" or "latest", records
 * published before any group (dropped when the first group starts at
 * "latest"), prefetch, manual and auto ack, nack with requeue at once
 * or dead-lettering (requeue=False, max_attempts), ack deadlines with
 * redelivery at the lane's tail, extend, release to the lane's head,
 * closing a consumer, latency samples (enqueue-to-deliver and
 * deliver-to-ack histograms per group), and dead entries kept until the
 * caller takes them for its dead-letter queue, and a bound on stored
 * messages (config.max_stored: the publish fails, and the caller blocks
 * or raises). Not covered (a caller keeps these on another path): keys,
 * dedup, ttl, delays and retry backoff, rate limits, retention,
 * dropping the oldest message when full.
 *
 * Crash repair. Each entry's state and attempts live in one 64-bit word
 * (`word`), and a message slot is committed by storing its `seq` last.
 * Every operation stores the word of an entry in one step after the
 * other fields of that entry; lane rings, ready counts, dead counts,
 * consumers' in-flight counts and deadline hints only mirror the words.
 * A process that gets EOWNERDEAD (mqs_tc_lock returns 1) calls
 * mqs_tc_repair, which rebuilds the mirrors (in-flight lists too) from
 * the words: ready entries go back to their lanes in ready order,
 * entries of an uncommitted publish are cleared, a slot no group needs
 * is freed, and in-flight entries of a closed consumer are requeued
 * (and counted as redelivered).
 * The published counter is next_seq, which the repair takes from the
 * committed slots.
 *
 * Size. The file is sized for `capacity` messages but is sparse: only
 * slots below state.slot_limit, which grows with the largest backlog
 * seen, and the entries and lane rings of used groups and lanes are
 * touched. Every scan stops at slot_limit. When the topic has drained
 * (no message stored), an ack, a dead-letter drop or the next publish
 * gives the pages of the slots and lane rings past MQS_TC_GROW_SLOTS
 * back with madvise MADV_REMOVE, which a tmpfs file honours. The
 * entries keep their pages, so that tickets keep growing. Creating a group at
 * "earliest" and repair put a whole backlog in order with one sort in a
 * scratch array, so they cost O(n log n) in the stored messages. Ack
 * deadlines and closing a consumer walk the group's in-flight list. NOTE: the other cumulative counters (acked, ...) are
 * bumped apart from the commit, so one may miss or double-count the
 * operation a dead holder was running.
 */
#ifndef MQS_TOPICCORE_H
#define MQS_TOPICCORE_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "mqs_atomic.h"
#include "mqs_hist.h"
#include "mqs_wait.h"

#define MQS_TC_MAGIC 0x3145524f43435451ULL /* "QTCCORE1" little-endian */
/* Version 2 stores a body that is exactly `bytes` raw behind the marker
 * byte PAYLOAD_BYTES (mqs/_topiccore.pyx), which a version 1 reader would
 * unpickle wrongly. It adds state.slot_limit, state.stored and
 * state.opening_group, and the in-flight list of each group (which makes
 * an entry 72 bytes, not 64). */
#define MQS_TC_VERSION 2
/* mqs_tc_validate: the file has another MQS_TC_VERSION. */
#define MQS_TC_EVERSION (-32)
/* mqs_tc_publish: the topic stores max_stored messages already. */
#define MQS_TC_ELIMIT (-33)
#define MQS_TC_INIT_READY 0x52454459u
#define MQS_TC_MAX_LANES 10
#define MQS_TC_NAME_BYTES 120
#define MQS_TC_NO_CONSUMER UINT32_MAX
#define MQS_TC_NO_SLOT UINT32_MAX
/* How many slots a full topic core adds to its used region at a time. */
#define MQS_TC_GROW_SLOTS 4096u

/* Entry states (low 8 bits of an entry's word). */
enum {
    MQS_TC_FREE = 0,
    MQS_TC_READY = 1,
    MQS_TC_IN_FLIGHT = 2,
    MQS_TC_DEAD = 3,
};

/* Why a dead entry was dead-lettered (bits 8-15 of its word). */
enum {
    MQS_TC_REASON_NONE = 0,
    MQS_TC_REASON_REJECTED = 1,
    MQS_TC_REASON_MAX_ATTEMPTS = 2,
    MQS_TC_REASON_ACK_TIMEOUT = 3,
};

/* Indexes of the topic's cumulative counters. */
enum {
    MQS_TC_PUBLISHED,
    MQS_TC_DELIVERED,
    MQS_TC_ACKED,
    MQS_TC_NACKED,
    MQS_TC_REDELIVERED,
    MQS_TC_LATE_ACKS,
    MQS_TC_DEAD_LETTERED,
    MQS_TC_DEAD_REJECTED,
    MQS_TC_DEAD_MAX_ATTEMPTS,
    MQS_TC_DEAD_ACK_TIMEOUT,
    MQS_TC_DROPPED_UNSUBSCRIBED,
    MQS_TC_RECOVERIES,
    MQS_TC_COUNTERS,
};

/* Indexes of a group's counters. */
enum {
    MQS_TC_GROUP_DELIVERED,
    MQS_TC_GROUP_ACKED,
    MQS_TC_GROUP_NACKED,
    MQS_TC_GROUP_REDELIVERED,
    MQS_TC_GROUP_DEAD_LETTERED,
    MQS_TC_GROUP_ERRORS,
    MQS_TC_GROUP_COUNTERS,
};

/* Sizes and rules fixed when the topic is formatted. */
typedef struct mqs_tc_params {
    uint32_t capacity;       /* messages stored at once */
    uint32_t slot_bytes;     /* largest body */
    uint32_t max_groups;
    uint32_t max_consumers;
    uint32_t lane_count;     /* 1..MQS_TC_MAX_LANES */
    int32_t lanes[MQS_TC_MAX_LANES];   /* lane priorities, highest first */
    uint32_t weights[MQS_TC_MAX_LANES];
    uint32_t strict;         /* 1: strict priority, 0: weighted */
    uint32_t max_attempts;   /* topic default, 0 for no limit */
    uint32_t sample_every;   /* latency sample of one delivery in this
                                many per group, 0 for none */
} mqs_tc_params_t;

typedef struct mqs_tc_config {
    uint64_t magic;
    uint32_t version;
    _Atomic uint32_t init_state;
    mqs_tc_params_t params;
    uint8_t lane_of[10];     /* priority -> lane index */
    uint64_t slot_stride;
    uint64_t slots_offset;
    uint64_t groups_offset;
    uint64_t entries_offset;
    uint64_t rings_offset;
    uint64_t consumers_offset;
    uint64_t total_bytes;
    /* Bound on stored messages (the topic's maxsize), 0 for none: a
     * publish that finds this many returns MQS_TC_ELIMIT. Set before
     * mqs_tc_format publishes the file. It sits in the config block's
     * padding, so files formatted before it read 0. */
    uint64_t max_stored;
} mqs_tc_config_t;

typedef struct mqs_tc_state {
    uint64_t next_seq;        /* seq of the last published message */
    uint64_t timer_seq;       /* order in which deadlines were set */
    uint32_t alloc_hint;      /* where the search for a free slot starts */
    uint32_t groups_used;
    /* Set once when the caller moves the topic elsewhere; callers check
     * it under the mutex before every operation. */
    _Atomic uint32_t retired;
    /* Slots at or above it were never used, so scans stop there and the
     * file's untouched pages take no memory. A publish that finds every
     * slot below it taken raises it by MQS_TC_GROW_SLOTS (up to
     * capacity) before it writes the new slot. Once the topic stores no
     * message it goes back to MQS_TC_GROW_SLOTS, and the memory of the
     * slots and lane ring positions past it goes back to the file
     * system. */
    uint32_t slot_limit;
    double next_deadline;     /* no in-flight deadline is earlier */
    int64_t counters[MQS_TC_COUNTERS];
    uint32_t stored;          /* committed slots (a mirror) */
    /* 1 + the index of the group mqs_tc_open_group is creating, else 0:
     * the only unused group whose entries may be other than free. */
    uint32_t opening_group;
    /* The ack or delivery in progress (MQS_TC_PENDING_*, 0 for none) and
     * the counters it changes as they were before it. A holder that dies
     * between the entry's commit and its counters leaves counters that
     * disagree with the entries; mqs_tc_repair sets them from these.
     * Files formatted before these fields read 0 here. */
    _Atomic uint32_t pending_kind;
    uint32_t pending_group;
    uint32_t pending_slot;
    uint32_t pending_reserved;
    uint64_t pending_ticket;    /* the delivery's ticket after the op */
    int64_t pending_before[4];  /* MQS_TC_BEFORE_* */
} mqs_tc_state_t;

enum {
    MQS_TC_PENDING_ACK = 1,
    MQS_TC_PENDING_FETCH = 2,
    MQS_TC_PENDING_FETCH_AUTO_ACK = 3,
};

enum {
    MQS_TC_BEFORE_DELIVERED,
    MQS_TC_BEFORE_ACKED,
    MQS_TC_BEFORE_GROUP_DELIVERED,
    MQS_TC_BEFORE_GROUP_ACKED,
};

#define MQS_TC_BLOCK(type) \
    union { type v; char pad[((sizeof(type) + MQS_PAD_BYTES - 1) \
                              / MQS_PAD_BYTES) * MQS_PAD_BYTES]; }

typedef struct mqs_tc_header {
    MQS_TC_BLOCK(mqs_tc_config_t) config;
    union {
        pthread_mutex_t v;
        char pad[2 * MQS_PAD_BYTES];
    } lock;
    MQS_TC_BLOCK(mqs_waitword_t) changed;
    MQS_TC_BLOCK(mqs_tc_state_t) state;
} mqs_tc_header_t;

/* A message; the body follows this header in its slot. */
typedef struct mqs_tc_slot {
    _Atomic uint64_t seq;     /* 0: free; stored last by a publish */
    uint32_t length;
    uint8_t priority;
    uint8_t lane;             /* lane index */
    uint8_t retained;         /* published while the topic had no group */
    uint8_t reserved;
    double timestamp;         /* wall clock of the publish */
} mqs_tc_slot_t;

typedef struct mqs_tc_lane {
    uint32_t head;            /* ring index of the first ready entry */
    uint32_t count;
} mqs_tc_lane_t;

typedef struct mqs_tc_group {
    _Atomic uint32_t used;    /* stored last when a group is created */
    uint32_t name_length;
    char name[MQS_TC_NAME_BYTES];
    uint32_t max_attempts;    /* 0: the topic's */
    uint32_t cursor;          /* weighted scheduler: lane on its turn */
    int64_t deficits[MQS_TC_MAX_LANES];
    int64_t tail_seq;         /* ready order of the last tail push */
    int64_t front_seq;        /* ready order of the last head push */
    uint32_t ready;
    uint32_t in_flight;
    uint32_t dead;
    /* In-flight entries in delivery order, linked through their
     * flight_prev and flight_next (MQS_TC_NO_SLOT ends it), so that
     * deadlines cost O(in flight), not O(stored). A mirror. */
    uint32_t flight_head;
    uint32_t flight_tail;
    uint32_t reserved;
    double next_deadline;     /* no in-flight deadline is earlier */
    int64_t countdown;        /* deliveries left until the next sample */
    mqs_tc_lane_t lanes[MQS_TC_MAX_LANES];
    int64_t counters[MQS_TC_GROUP_COUNTERS];
    mqs_hist_t enqueue_to_deliver;
    mqs_hist_t deliver_to_ack;
} mqs_tc_group_t;

/* word: state (bits 0-7), dead reason (8-15), attempts (16-63). */
typedef struct mqs_tc_entry {
    _Atomic uint64_t word;
    uint64_t ticket;          /* changes whenever the entry is delivered */
    int64_t ready_seq;        /* ready order in its lane */
    double deadline;          /* in flight: the ack deadline */
    uint64_t deadline_seq;    /* in flight: when the deadline was set */
    uint32_t consumer;        /* in flight: the consumer's index */
    uint32_t timed_out;       /* 1 once an ack deadline of it passed */
    double ready_at;          /* when it last joined its lane's tail */
    double sampled_at;        /* in flight: its delivery time if sampled,
                                 else 0 */
    uint32_t flight_prev;     /* in flight: neighbours on the group's */
    uint32_t flight_next;     /* in-flight list */
} mqs_tc_entry_t;

typedef struct mqs_tc_consumer {
    _Atomic uint32_t used;
    uint32_t group;
    uint32_t prefetch;
    uint32_t in_flight;
    uint64_t owner;           /* caller's process id token */
} mqs_tc_consumer_t;

/* One delivery of mqs_tc_fetch. */
typedef struct mqs_tc_delivery {
    uint32_t slot;
    uint32_t length;
    uint64_t seq;
    uint64_t ticket;
    uint64_t attempts;
    uint32_t priority;
    uint32_t reserved;
    double timestamp;
    const unsigned char *body;  /* in the mapping: copy before unlocking */
} mqs_tc_delivery_t;

/* One dead entry found by mqs_tc_next_dead. */
typedef struct mqs_tc_dead {
    uint32_t group;
    uint32_t slot;
    uint64_t seq;
    uint64_t attempts;
    uint32_t reason;
    uint32_t priority;
    uint32_t length;
    uint32_t reserved;
    double timestamp;
    const unsigned char *body;
} mqs_tc_dead_t;

static inline uint64_t mqs_tc_word(uint32_t state, uint32_t reason,
                                   uint64_t attempts)
{
    return (uint64_t)state | ((uint64_t)reason << 8) | (attempts << 16);
}

static inline uint32_t mqs_tc_word_state(uint64_t word)
{
    return (uint32_t)(word & 0xff);
}

static inline uint32_t mqs_tc_word_reason(uint64_t word)
{
    return (uint32_t)((word >> 8) & 0xff);
}

static inline uint64_t mqs_tc_word_attempts(uint64_t word)
{
    return word >> 16;
}

/*
 * Bytes of a mapping for `params`, or 0 when a field is out of range
 * (capacity 1..2**24, slot_bytes 1..2**20, 1..64 groups, 1..4096
 * consumers, 1..MQS_TC_MAX_LANES distinct lanes of priority 0..9 sorted
 * highest first with weights of 1 or more).
 */
uint64_t mqs_tc_layout_bytes(const mqs_tc_params_t *params);

/* Format a zero-filled mapping of mqs_tc_layout_bytes(params) bytes.
 * Returns MQS_OK or MQS_EINVAL. */
int mqs_tc_format(mqs_tc_header_t *h, const mqs_tc_params_t *params);

/* Check a mapped file of `file_bytes`. Returns MQS_OK, MQS_EINTR while
 * its creator is formatting it, MQS_TC_EVERSION for another layout
 * version (see mqs_tc_version), or MQS_ECORRUPT. */
int mqs_tc_validate(const mqs_tc_header_t *h, uint64_t file_bytes);

/* Take the mutex within `timeout_ns`. Returns MQS_OK, 1 when the last
 * holder died and the state was repaired, MQS_ETIMEDOUT or MQS_EINVAL. */
int mqs_tc_lock(mqs_tc_header_t *h, int64_t timeout_ns);
void mqs_tc_unlock(mqs_tc_header_t *h);

/* The layout version a mapped file was formatted with. */
static inline uint32_t mqs_tc_version(const mqs_tc_header_t *h)
{
    return h->config.v.version;
}

static inline mqs_waitword_t *mqs_tc_changed(mqs_tc_header_t *h)
{
    return &h->changed.v;
}

/* Rebuild every mirror from the entry words (see the top of this file).
 * The caller holds the mutex. */
void mqs_tc_repair(mqs_tc_header_t *h);

/*
 * The operations below need the mutex held. `now` is monotonic seconds,
 * never below the `now` of an earlier call. Each first redelivers or
 * dead-letters the in-flight entries whose deadline is at or before
 * `now` (mqs_tc_advance).
 */

void mqs_tc_advance(mqs_tc_header_t *h, double now);

/* Store a message and set *slot_out to its slot. Returns its seq (1,
 * 2, ...), MQS_EFULL when every slot is taken, MQS_TC_ELIMIT when the
 * topic stores config.max_stored messages, MQS_ETOOBIG for a body over
 * slot_bytes, or MQS_EINVAL for a priority outside 0..9. */
int64_t mqs_tc_publish(mqs_tc_header_t *h, const void *body,
                       uint32_t length, uint32_t priority, double timestamp,
                       double now, uint32_t *slot_out);

/* Return the index of the group `name`, or -1. */
int64_t mqs_tc_find_group(mqs_tc_header_t *h, const char *name,
                          uint32_t name_length);

/* Return the index of group `name`, creating it if missing: `earliest`
 * enters every stored message, otherwise only later ones. Returns
 * MQS_EFULL when max_groups exist, MQS_EINVAL for a bad name. */
int64_t mqs_tc_open_group(mqs_tc_header_t *h, const char *name,
                          uint32_t name_length, int earliest, double now);

/* Set a group's max_attempts (0: the topic's). */
void mqs_tc_set_group_attempts(mqs_tc_header_t *h, uint32_t group,
                               uint32_t max_attempts);

/* Register a consumer of `group`; return its index or MQS_EFULL. */
int64_t mqs_tc_open_consumer(mqs_tc_header_t *h, uint32_t group,
                             uint32_t prefetch, uint64_t owner, double now);

/* Free a consumer, then requeue its in-flight entries at their lanes'
 * tails in publish order; return how many went back, or MQS_EINVAL. */
int64_t mqs_tc_close_consumer(mqs_tc_header_t *h, uint32_t consumer,
                              double now);

/* Deliver up to `max_items` into `out` and return how many, or
 * MQS_ECLOSED for a consumer that is not open. Unless `auto_ack` is set,
 * it delivers at most prefetch minus the consumer's in-flight count. */
int64_t mqs_tc_fetch(mqs_tc_header_t *h, uint32_t consumer,
                     uint32_t max_items, double ack_timeout, int auto_ack,
                     double now, mqs_tc_delivery_t *out);

/* Settle the in-flight delivery (slot, ticket) of `group`. Each returns
 * 1, or 0 for a stale tag (counted as a late ack). */
int mqs_tc_ack(mqs_tc_header_t *h, uint32_t group, uint32_t slot,
               uint64_t ticket, double now);
/* With requeue 0 the message is dead-lettered as rejected, and one
 * that used up its max_attempts as max_attempts. Otherwise it goes back
 * to its lane's tail at once. */
int mqs_tc_nack(mqs_tc_header_t *h, uint32_t group, uint32_t slot,
                uint64_t ticket, int requeue, double now);
int mqs_tc_extend(mqs_tc_header_t *h, uint32_t group, uint32_t slot,
                  uint64_t ticket, double seconds, double now);
/* Put in-flight deliveries back at their lanes' heads unseen (attempts
 * - 1), keeping their order; return how many were live, or MQS_ENOMEM
 * (nothing changed) when `count` bytes of scratch cannot be allocated.
 * Besides this one, only mqs_tc_open_group, mqs_tc_close_consumer and
 * mqs_tc_repair allocate: a scratch array to sort the entries they put
 * in order, freed before they return. When it cannot be allocated they
 * do the same work with one scan of the entries per 512 of them. */
int64_t mqs_tc_release(mqs_tc_header_t *h, uint32_t group,
                       const uint32_t *slots, const uint64_t *tickets,
                       uint32_t count, double now);

/* Find a dead entry; return 1 and fill `out`, or 0 when none is left.
 * The entry stays until mqs_tc_drop_dead. */
int mqs_tc_next_dead(mqs_tc_header_t *h, mqs_tc_dead_t *out);
void mqs_tc_drop_dead(mqs_tc_header_t *h, uint32_t group, uint32_t slot);

/* Stored messages, and entries per state over every group. */
typedef struct mqs_tc_stats {
    uint64_t stored;
    uint64_t ready;
    uint64_t in_flight;
    uint64_t dead;
} mqs_tc_stats_t;

void mqs_tc_stats(mqs_tc_header_t *h, mqs_tc_stats_t *out);

/* Set *out to the earliest ready_at of the lane heads of `group` and
 * return 1, or return 0 with *out unchanged when every lane is empty.
 * A lane's head is its oldest entry: lanes are FIFO by ready_at, and a
 * released entry goes back to the head with its older time. */
int mqs_tc_oldest_ready(mqs_tc_header_t *h, uint32_t group, double *out);

/*
 * Loading a saved state (an image) into a fresh core, one with no used
 * group, no committed slot and next_seq 0. The caller holds the mutex
 * and calls mqs_tc_import_group for each group, then
 * mqs_tc_import_message for each message in ascending seq, then
 * mqs_tc_import_entry for each entry in the order it should join its
 * lane, and last mqs_tc_import_finish. They neither advance deadlines
 * nor bump the operation counters. Each step commits as the operations
 * above do (the entry word or slot seq last), so a repair after the
 * importer died leaves a consistent core that is partly filled.
 */

/* Create the next unused group with `max_attempts` (0: the topic's) and
 * its MQS_TC_GROUP_COUNTERS `counters`; return its index. Returns
 * MQS_EINVAL for a bad name or one that exists, or MQS_EFULL when
 * max_groups exist. */
int64_t mqs_tc_import_group(mqs_tc_header_t *h, const char *name,
                            uint32_t name_length, uint32_t max_attempts,
                            const int64_t *counters);

/* Store a message with its own `seq`, which must be above every seq
 * stored so far, and return its slot. `retained` marks a message kept
 * for the first group, so it is only valid while no group exists.
 * Returns MQS_EINVAL for a seq of 0 or not above next_seq, a priority
 * outside 0..9 or `retained` with a group, MQS_ETOOBIG for a body over
 * slot_bytes, or MQS_EFULL when every slot is taken. */
int64_t mqs_tc_import_message(mqs_tc_header_t *h, uint64_t seq,
                              const void *body, uint32_t length,
                              uint32_t priority, double timestamp,
                              int retained);

/* Set the free entry of (group, slot) from a saved entry word. A ready
 * or in-flight entry becomes ready at its lane's tail since `now` with
 * its `attempts`, and a dead entry stays dead with its `reason` behind
 * the dead entries imported before it. Returns MQS_OK or MQS_EINVAL.
 * MQS_EINVAL is for an unused group, a slot with no message, an entry
 * that is not free or a state outside 1..3. It is also for a reason
 * other than 0 on a live entry or above 3 on a dead one, and for
 * attempts of 2**48 or more. */
int mqs_tc_import_entry(mqs_tc_header_t *h, uint32_t group, uint32_t slot,
                        uint32_t state, uint32_t reason, uint64_t attempts,
                        double now);

/* Check that every stored message is retained or has an entry, then set
 * next_seq to the larger of `next_seq` and the last seq stored, and the
 * MQS_TC_COUNTERS topic `counters`, except published, which is next_seq.
 * Returns MQS_OK, or MQS_EINVAL with *unneeded_seq set to the seq of a
 * message nothing needs (the counters are left unchanged then). */
int mqs_tc_import_finish(mqs_tc_header_t *h, uint64_t next_seq,
                         const int64_t *counters, uint64_t *unneeded_seq);

/*
 * Whether mqs_tc_fetch by `consumer` (of `group`, with process token
 * `owner`) could deliver something or raise now, read without the mutex:
 * a hint for a waiter that woke at a change and decides whether to
 * return to its caller. It is 0 only in this case: the topic is not
 * retired, the consumer is open in `group` for `owner`, no deadline is
 * due at `now` and the group has no dead messages to collect. Then it
 * is 0 when the group has nothing ready, or when the consumer has no
 * room (unless `auto_ack`). Every change that makes it 1 is followed by
 * a signal of mqs_tc_changed.
 */
int mqs_tc_may_fetch(mqs_tc_header_t *h, uint32_t consumer, uint32_t group,
                     uint64_t owner, int auto_ack, double now);

/* Accessors for callers and tests. */
mqs_tc_slot_t *mqs_tc_slot(mqs_tc_header_t *h, uint32_t slot);
mqs_tc_group_t *mqs_tc_group(mqs_tc_header_t *h, uint32_t group);
mqs_tc_entry_t *mqs_tc_entry(mqs_tc_header_t *h, uint32_t group,
                             uint32_t slot);
mqs_tc_consumer_t *mqs_tc_consumer(mqs_tc_header_t *h, uint32_t consumer);

#endif /* MQS_TOPICCORE_H */
