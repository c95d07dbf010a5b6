/*
 * mqs_journal.c: lock, append, restart and liveness of the shared
 * operation journal (layout and rules in mqs_journal.h).
 */
#define _GNU_SOURCE
#include "mqs_journal.h"
#include "mqs_failpoint.h"
#include "mqs_robust.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static unsigned char *records_of(mqs_journal_header_t *h)
{
    return (unsigned char *)h + MQS_JOURNAL_HEADER_BYTES;
}

int mqs_journal_format(mqs_journal_header_t *h, int64_t journal_bytes)
{
    if (journal_bytes < MQS_JOURNAL_MIN_BYTES
        || journal_bytes > MQS_JOURNAL_MAX_BYTES || journal_bytes % 8 != 0)
        return MQS_EINVAL;
    h->config.v.magic = MQS_JOURNAL_MAGIC;
    h->config.v.version = MQS_JOURNAL_VERSION;
    h->config.v.journal_bytes = journal_bytes;
    mqs_wait_init(&h->changed.v);
    mqs_wait_init(&h->durable.v);
    mqs_wait_init(&h->writer.v);
    atomic_init(&h->head.v.position, 0);
    atomic_init(&h->head.v.restart_used, 0);
    atomic_init(&h->head.v.next_token, 0);
    atomic_init(&h->head.v.recoveries, 0);
    for (int i = 0; i < MQS_JOURNAL_MAX_PARTICIPANTS; i++)
        atomic_init(&h->tokens[i], 0);

    if (mqs_robust_init(&h->lock.v) != MQS_OK)
        return MQS_EINVAL;

    /* Everything above becomes visible before an attacher sees READY. */
    mqs_store_release_u32(&h->config.v.init_state, MQS_JOURNAL_INIT_READY);
    return MQS_OK;
}

int mqs_journal_validate(const mqs_journal_header_t *h, int64_t file_bytes)
{
    const mqs_journal_config_t *config = &h->config.v;

    if (file_bytes < MQS_JOURNAL_HEADER_BYTES)
        return MQS_ECORRUPT;
    if (mqs_load_acquire_u32(
            (_Atomic uint32_t *)&config->init_state)
        != MQS_JOURNAL_INIT_READY)
        return config->magic == 0 ? MQS_JOURNAL_EAGAIN_INIT : MQS_ECORRUPT;
    if (config->magic != MQS_JOURNAL_MAGIC)
        return MQS_ECORRUPT;
    if (config->version != MQS_JOURNAL_VERSION)
        return MQS_JOURNAL_EVERSION;
    if (config->journal_bytes < MQS_JOURNAL_MIN_BYTES
        || config->journal_bytes > MQS_JOURNAL_MAX_BYTES
        || mqs_journal_file_bytes(config->journal_bytes) != file_bytes)
        return MQS_ECORRUPT;
    return MQS_OK;
}

int mqs_journal_lock(mqs_journal_header_t *h, int64_t timeout_ns)
{
    int rc = mqs_robust_lock(&h->lock.v, timeout_ns);

    if (rc == MQS_ROBUST_OWNER_DIED) {
        /* The holder stored only single words (see the header), so the
         * shared state is consistent as it is. */
        atomic_fetch_add_explicit(&h->head.v.recoveries, 1,
                                  memory_order_relaxed);
        pthread_mutex_consistent(&h->lock.v);
        return 1;
    }
    return rc;
}

void mqs_journal_unlock(mqs_journal_header_t *h)
{
    pthread_mutex_unlock(&h->lock.v);
}

int64_t mqs_journal_append(mqs_journal_header_t *h, const void *payload,
                           uint32_t length)
{
    uint64_t position = atomic_load_explicit(&h->head.v.position,
                                             memory_order_relaxed);
    int64_t used = (int64_t)(position & 0xffffffffu);
    int64_t size = mqs_journal_record_bytes(length);
    unsigned char *at = records_of(h) + used;

    if (size > h->config.v.journal_bytes - used)
        return MQS_EFULL;
    memcpy(at + MQS_JOURNAL_RECORD_HEADER, payload, length);
    memcpy(at, &length, sizeof(length));
    MQS_FAILPOINT("journal.append");
    /* The record becomes visible only with this store: a writer killed
     * before it leaves the old position. */
    atomic_store_explicit(&h->head.v.position,
                          (position & ~(uint64_t)0xffffffffu)
                              | (uint64_t)(used + size),
                          memory_order_release);
    return used + size;
}

uint32_t mqs_journal_restart(mqs_journal_header_t *h)
{
    uint64_t position = atomic_load_explicit(&h->head.v.position,
                                             memory_order_relaxed);
    uint32_t generation = (uint32_t)(position >> 32) + 1;

    atomic_store_explicit(&h->head.v.restart_used,
                          (int64_t)(position & 0xffffffffu),
                          memory_order_relaxed);
    MQS_FAILPOINT("journal.restart");
    atomic_store_explicit(&h->head.v.position, (uint64_t)generation << 32,
                          memory_order_release);
    return generation;
}

static int lock_byte(int fd, int slot, int command, struct flock *fl)
{
    memset(fl, 0, sizeof(*fl));
    fl->l_type = F_WRLCK;
    fl->l_whence = SEEK_SET;
    fl->l_start = MQS_JOURNAL_LOCK_BASE + slot;
    fl->l_len = 1;
    return fcntl(fd, command, fl) == 0 ? 0 : -errno;
}

int mqs_journal_attach(mqs_journal_header_t *h, int fd, uint64_t *token)
{
    struct flock fl;

    for (int slot = 0; slot < MQS_JOURNAL_MAX_PARTICIPANTS; slot++) {
        int rc = lock_byte(fd, slot, F_OFD_SETLK, &fl);

        if (rc == -EAGAIN || rc == -EACCES)
            continue;
        if (rc < 0)
            return rc;
        /* Tokens never repeat, so a consumer registered by the slot's
         * previous holder is seen as dead from now on. */
        *token = atomic_fetch_add_explicit(&h->head.v.next_token, 1,
                                           memory_order_relaxed) + 1;
        atomic_store_explicit(&h->tokens[slot], *token,
                              memory_order_release);
        return slot;
    }
    return MQS_EFULL;
}

int mqs_journal_alive(const mqs_journal_header_t *h, int fd, int own_slot,
                      int slot, uint64_t token)
{
    struct flock fl;
    int rc;

    if (slot < 0 || slot >= MQS_JOURNAL_MAX_PARTICIPANTS)
        return 0;
    if (atomic_load_explicit(&h->tokens[slot], memory_order_acquire)
        != token)
        return 0;
    if (slot == own_slot)
        return 1;
    rc = lock_byte(fd, slot, F_OFD_GETLK, &fl);
    if (rc < 0)
        return rc;
    return fl.l_type != F_UNLCK;
}
