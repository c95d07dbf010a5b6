/*
 * mqs_journal.h: the shared operation journal of an shm broker.
 *
 * One file in /dev/shm per broker name, mapped by every process that
 * opens the broker. It holds no pointers, only offsets, so each process
 * may map it anywhere.
 *
 *   0                          header, MQS_JOURNAL_HEADER_BYTES (64 KiB):
 *     block 0                  config: magic, version, init_state,
 *                              journal_bytes
 *     block 1-2                lock     process-shared robust mutex
 *     block 3                  changed  wait word, bumped after commits
 *     block 4                  head: position, restart_used, next_token,
 *                              recoveries (written under the lock)
 *     block 5                  durable  wait word, for the owner's
 *                              durability waiters (the log backend)
 *     block 6                  writer   wait word, for the owner's writer
 *                              thread (the log backend)
 *     block 7..                participants[MQS_JOURNAL_MAX_PARTICIPANTS]
 *                              token of the process holding each slot
 *   MQS_JOURNAL_HEADER_BYTES   records, journal_bytes long
 *
 * A record:
 *
 *   +--------------+----------------+-------------------------------+
 *   | length (u32) | reserved (u32) | payload, padded to 8 bytes    |
 *   +--------------+----------------+-------------------------------+
 *   0              4                8
 *
 * position packs the generation (high 32 bits) and the committed bytes
 * of the records area (low 32 bits) into one word, so a reader never
 * sees one without the other. An append writes the payload and the
 * length, then stores the new position with release semantics: a writer
 * killed before that store leaves nothing visible, and the next append
 * overwrites what it wrote. A restart (the broker wrote a snapshot of
 * the whole state elsewhere) stores generation + 1 with 0 bytes in one
 * step; restart_used keeps the committed bytes of the journal it ended,
 * so a reader that had applied all of them can go on without reloading
 * the snapshot.
 *
 * Locking. Every append, restart and read of the records happens under
 * `lock`, a PTHREAD_PROCESS_SHARED, PTHREAD_MUTEX_ROBUST mutex. Its
 * holder changes shared state only with single stores (position,
 * restart_used, a participant token), so a holder that dies leaves it
 * consistent: the next locker gets EOWNERDEAD, marks the mutex
 * consistent and goes on (mqs_journal_lock returns 1 then).
 *
 * Liveness. Each process that opens the broker takes a participant
 * slot by locking byte MQS_JOURNAL_LOCK_BASE + slot of the file with an
 * open-file-description lock (F_OFD_SETLK), held until it closes the
 * file or dies, and stores a fresh token in the slot. A slot whose byte
 * is unlocked, or whose token changed, belongs to no live process with
 * that token. A PID is never trusted: PIDs are reused.
 *
 * Wait words. `changed` wakes everyone waiting for any commit. The
 * owner of the journal uses `durable` and `writer` for waits that most
 * commits do not concern, so that those waiters do not wake (and, in
 * Python, take the GIL) at every commit.
 */
#ifndef MQS_JOURNAL_H
#define MQS_JOURNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "mqs_atomic.h"
#include "mqs_wait.h"

#define MQS_JOURNAL_MAGIC 0x314c4e524a53514dULL /* "MQSJRNL1" little-endian */
#define MQS_JOURNAL_VERSION 2
#define MQS_JOURNAL_HEADER_BYTES 65536
#define MQS_JOURNAL_RECORD_HEADER 8
#define MQS_JOURNAL_MAX_PARTICIPANTS 256
/* Byte offset of the participants' liveness locks: far past the end of
 * any journal file, where locking needs no file data. */
#define MQS_JOURNAL_LOCK_BASE ((int64_t)1 << 40)
/* The records area must fit the 32 low bits of the position. */
#define MQS_JOURNAL_MIN_BYTES 4096
#define MQS_JOURNAL_MAX_BYTES ((int64_t)1 << 31)

/* init_state: the creator stores READY last, with release. */
#define MQS_JOURNAL_INIT_READY 0x52454459u /* "READ" */

#define MQS_JOURNAL_EVERSION (-30)
#define MQS_JOURNAL_EAGAIN_INIT (-31)

typedef struct mqs_journal_config {
    uint64_t magic;
    uint32_t version;
    _Atomic uint32_t init_state;
    int64_t journal_bytes;
} mqs_journal_config_t;

typedef struct mqs_journal_head {
    _Atomic uint64_t position;      /* generation << 32 | committed bytes */
    _Atomic int64_t restart_used;   /* committed bytes when it restarted */
    _Atomic uint64_t next_token;
    _Atomic int64_t recoveries;     /* lock owners found dead */
} mqs_journal_head_t;

#define MQS_JOURNAL_BLOCK(type) \
    union { type v; char pad[MQS_PAD_BYTES]; }

typedef struct mqs_journal_header {
    MQS_JOURNAL_BLOCK(mqs_journal_config_t) config;
    union {
        pthread_mutex_t v;
        char pad[2 * MQS_PAD_BYTES];
    } lock;
    MQS_JOURNAL_BLOCK(mqs_waitword_t) changed;
    MQS_JOURNAL_BLOCK(mqs_journal_head_t) head;
    MQS_JOURNAL_BLOCK(mqs_waitword_t) durable;
    MQS_JOURNAL_BLOCK(mqs_waitword_t) writer;
    _Atomic uint64_t tokens[MQS_JOURNAL_MAX_PARTICIPANTS];
} mqs_journal_header_t;

/* Total file size for a records area of `journal_bytes`. */
static inline int64_t mqs_journal_file_bytes(int64_t journal_bytes)
{
    return MQS_JOURNAL_HEADER_BYTES + journal_bytes;
}

static inline mqs_waitword_t *mqs_journal_changed(mqs_journal_header_t *h)
{
    return &h->changed.v;
}

/* Wait word `which`: MQS_JOURNAL_CHANGED, _DURABLE or _WRITER. */
enum { MQS_JOURNAL_CHANGED, MQS_JOURNAL_DURABLE, MQS_JOURNAL_WRITER };

static inline mqs_waitword_t *mqs_journal_word(mqs_journal_header_t *h,
                                               int which)
{
    return which == MQS_JOURNAL_DURABLE ? &h->durable.v
         : which == MQS_JOURNAL_WRITER ? &h->writer.v
         : &h->changed.v;
}

static inline mqs_journal_head_t *mqs_journal_head(mqs_journal_header_t *h)
{
    return &h->head.v;
}

static inline int64_t mqs_journal_bytes(const mqs_journal_header_t *h)
{
    return h->config.v.journal_bytes;
}

/* Bytes a record of `length` payload bytes takes in the records area. */
static inline int64_t mqs_journal_record_bytes(int64_t length)
{
    return MQS_JOURNAL_RECORD_HEADER + ((length + 7) & ~(int64_t)7);
}

/*
 * Format a zero-filled mapping of mqs_journal_file_bytes(journal_bytes)
 * bytes; the creator calls it before anyone else can see the file.
 * Returns MQS_OK, or MQS_EINVAL for a size out of range or a mutex that
 * cannot be set up.
 */
int mqs_journal_format(mqs_journal_header_t *h, int64_t journal_bytes);

/*
 * Check a mapped file of `file_bytes`. Returns MQS_OK,
 * MQS_JOURNAL_EAGAIN_INIT while the creator has not finished,
 * MQS_JOURNAL_EVERSION for another layout version, MQS_ECORRUPT for a
 * foreign file or sizes that disagree.
 */
int mqs_journal_validate(const mqs_journal_header_t *h, int64_t file_bytes);

/* The layout version a mapped file was formatted with. */
static inline uint32_t mqs_journal_version(const mqs_journal_header_t *h)
{
    return h->config.v.version;
}

/*
 * Take the lock, waiting up to `timeout_ns`. Any thread; the caller must
 * not hold it already. Returns MQS_OK, 1 when the previous owner died
 * holding it (the lock is taken and consistent again), MQS_ETIMEDOUT, or
 * MQS_EINVAL when the mutex is unusable.
 */
int mqs_journal_lock(mqs_journal_header_t *h, int64_t timeout_ns);

/* Release the lock taken by mqs_journal_lock. */
void mqs_journal_unlock(mqs_journal_header_t *h);

/*
 * Append one record under the lock. Returns the new committed bytes, or
 * MQS_EFULL when the records area has no room for it (restart first).
 */
int64_t mqs_journal_append(mqs_journal_header_t *h, const void *payload,
                           uint32_t length);

/*
 * Start a new generation with no records, under the lock, after the
 * caller stored a snapshot of the state for it. Returns the new
 * generation.
 */
uint32_t mqs_journal_restart(mqs_journal_header_t *h);

/*
 * Take a free participant slot for the open file description `fd` (a
 * descriptor of this process's own open of the journal file) and store
 * a fresh token in it. Any thread. Returns the slot and sets *token, or
 * MQS_EFULL when every slot is held, or -errno when fcntl fails.
 */
int mqs_journal_attach(mqs_journal_header_t *h, int fd, uint64_t *token);

/*
 * Return 1 when the process that took `slot` with `token` still holds
 * it, 0 when it closed the file or died, -errno when fcntl fails. Any
 * thread. `fd` is the caller's descriptor of the journal file and
 * `own_slot` the slot it took through it (-1 for none): the caller's
 * own lock does not conflict with its own test, so that slot is alive
 * by definition.
 */
int mqs_journal_alive(const mqs_journal_header_t *h, int fd, int own_slot,
                      int slot, uint64_t token);

#endif /* MQS_JOURNAL_H */
