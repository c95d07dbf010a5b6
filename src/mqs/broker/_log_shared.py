"""The ``log`` backend shared by processes: the shm journal, made durable.

``Broker(backend="log", path=...)`` may be opened by any number of
processes at once. They share one broker: topics, groups, in-flight
tables, rate buckets, dedup ids, dead letters and counters.

Design
    The processes coordinate exactly as those of the ``shm`` backend
    (`mqs.broker._shm`) do. A journal in /dev/shm has a robust
    process-shared mutex; `journal_name` names it after the real path of
    the log directory and the directory's identity. Every
    process keeps a replica of the state and replays the records of the
    others before it runs its own operation. The records are the ones
    the single-process `LogBackend` writes, so the same bytes go into
    the journal and into the segment log.

    One process at a time is the writer: it holds an exclusive `flock`
    on ``<path>/lock``. It appends its own records to the log as it
    journals them, and the records of the other processes when it
    replays them, so the log holds the journal's records in journal
    order. A thread of the writer wakes on every journal commit of
    another process (they signal the journal's ``writer`` word; the
    writer's own threads append their records themselves), catches up
    and, under ``fsync="always"``, syncs the log; one sync covers every
    record appended meanwhile, by any process (group commit). It then
    stores how far the log is durable, as the journal position
    ``generation << 32 | offset``, in a small file next to the journal
    (``mqs.broker.<name>.durable``) and wakes the waiters on the
    journal's ``durable`` word. The writer's own threads sync their
    publishes themselves, sharing syncs in the segment log.

    Plain topics (no rate, ttl, retry backoff, retention or
    ``drop_oldest``) live on a C topic core in /dev/shm, as on the shm
    backend, and stay there until an operation needs what a core lacks
    (a key, a delay, a dedup id, a large body, a 9th group); then the
    topic moves to the journal for good. A core operation that changes
    what a restore must rebuild (publish, delivery, ack, nack, release,
    group creation) runs inside the section and appends a record with
    its result: the seqs a publish got, the seqs and attempts a fetch
    delivered, the seq an ack settled. Other processes skip these
    records, since they see the core itself, but the writer copies them
    into the log like any other. Snapshots of the log hold each core's
    state (`TopicCore.export_image`), and a restore replays the records
    after it into a `CoreImage` and loads that into a new core
    (`mqs.broker._coreimage`). A move to the journal hands over state
    that the records do not carry (the scheduler's place, tickets), so
    the writer writes a snapshot right after each move. A process killed
    inside the section between a core change and the commit of its
    record leaves the log without that change. So once a process finds
    the mutex's previous holder dead, the writer writes a snapshot too
    (`_lock_recovered`), and a reboot before it loses the change.

    A process that is not the writer tries the lock every
    `TAKEOVER_INTERVAL_S`. When the writer dies, the kernel drops its
    lock and the next process that takes it becomes the writer: it
    writes its replica (which is the journal's state) as a snapshot
    into a new log and switches ``CURRENT`` to it, so records the dead
    writer appended or not do not matter. When a journal restart by
    another process dropped records that the writer had not appended
    yet, the writer appends them from the journal's tail files (see
    `mqs.broker._shm`), or writes a snapshot the same way when it loads
    the journal's snapshot instead.

    The first process to open a broker whose journal does not exist (no
    process has it open, after a reboot, or after every process closed
    it) becomes the writer, replays the log into its replica, closes
    the consumers it finds (their processes are gone) and publishes
    the state as the journal's first generation. The last process to
    close the broker (it finds no other user through a shared `flock`
    on ``<path>/users``) writes a final snapshot and removes the
    journal, so the log alone holds the broker while nobody uses it.

What survives what
    ``fsync="always"``: publish, topic and DLQ changes return after the
    writer synced a log that holds their record, in whichever process
    they ran. They survive SIGKILL of any process, the writer included,
    and a power loss. A publish whose process is killed while it waits
    for that sync committed its record to the journal before the wait,
    so its message is delivered all the same. Only a power loss before a
    sync covers the record loses it. Ack, ack_many, nack and auto_ack
    deliveries return once their record is in the journal, without
    waiting for a sync.
    The next sync makes them durable: the writer's log thread syncs
    those of other processes at once, a publish of any process syncs
    every record before its own (the log keeps the journal's order),
    and the segment log syncs by itself every `fsync_interval_s`, so
    none stays unsynced longer than that. Losing one of those records
    can only cause a redelivery, which at-least-once delivery allows.
    So SIGKILL of any process loses no ack (the journal, or the page
    cache once the writer appended it, keeps it), but a power loss may
    undo the acks that no completed sync covered yet, at most those of
    the last `fsync_interval_s`: their messages are delivered again
    with ``attempts + 1``.
    ``sync_acks=True`` makes them wait for a covering sync as publishes
    do. Manual deliveries, extend, release and consumer open and close
    never wait, as in `LogBackend` (a restart returns every in-flight
    message anyway).
    `fsync` is a setting of each open. A process that passes
    ``"always"`` gets its syncs also when the writer passed another
    mode: from its open until the last close removes the journal, every
    writer syncs before it reports records durable.
    A process that passes ``"interval"`` makes a writer that passed
    ``"never"`` sync every `fsync_interval_s` (the writer's) in its log
    thread, which wakes every `TAKEOVER_INTERVAL_S`, so such records
    wait up to the sum of both.
    ``"interval"`` and ``"never"``: every operation that returned
    survives SIGKILL of any process, because the journal keeps it until
    a writer has it in the log; a power loss loses what the writer had
    not synced (at most `fsync_interval_s` for ``"interval"``) and what
    was still only in the journal.
    Every process killed and the machine still up: the journal stays in
    /dev/shm, and the next process goes on from it (nothing that
    returned is lost in any mode). Reboot: the log alone restores the
    state, as for `LogBackend`: the consumers are closed and their
    in-flight messages are ready again with their attempts kept.
    The directory removed, emptied or replaced by a copy: its identity
    (`directory_identity`) changes, so the next open creates a new
    journal and restores the broker from the log alone, and it removes
    the journals of earlier identities that no process has open (each
    open broker holds a shared `flock` on its ``.durable`` file).
    Processes that still have the old directory open find out within
    `DIRECTORY_CHECK_INTERVAL_S`; from then on their operations raise
    `BackendUnavailable`. They check the identity before they write a
    snapshot or take the writer lock, so they write nothing into the
    new directory unless it replaces the old one between that check and
    the write. Their segment appends go to the old files, which the
    segment log reaches through a descriptor of the old directory.
    A backup restored in place into the same directory, with the same
    ``broker.id`` file, keeps the identity, so the log itself tells it
    apart. Every log that a writer starts (at a compaction, a takeover,
    a restore and the last close) gets a random incarnation id in the
    key of its first snapshot record. The durable file stores the name
    and incarnation id of the log that the journal's writer appends to,
    and that log's end offset after each append. The first process to
    open a journal that no process has open compares them with the log
    that ``CURRENT`` names. A journal may be ahead of its log (records a
    dead writer had not appended), but never behind it. So if the log
    is another one, or shorter than the writer left it, the process
    removes the journal, logs a WARNING and restores the broker from the
    log alone. The restored backup wins, and operations that were only
    in the journal are lost. A log without an incarnation id (an older
    mqs wrote it) passes the check.
    NOTE: a backup taken after the writer's last append before the
    crash contains the same log, so the journal still goes on from it.
    A restore while processes have the broker open stops them. The
    writer checks every `DIRECTORY_CHECK_INTERVAL_S` that ``CURRENT``
    still names its log, and before each snapshot (a compaction, a
    takeover, the last close) a writer compares the log with the
    durable file as above. On a mismatch every operation raises
    `BackendUnavailable` and nothing more is written. The last process
    to close removes the journal, so the next open restores from the
    restored log. Operations between the restore and its detection are
    lost with the journal.

Limits
    A `publish_many` to a topic on its core stores one message after
    the other, so a process killed in the middle leaves the messages it
    stored so far (a topic on the journal takes the whole batch in one
    record, or none of it).
    Those of the shm backend (at most 256 processes at once, one record
    in half the journal) and of the log backend (bodies must be
    picklable; the directory is owner-only). A process stopped while it
    holds the journal mutex stalls every other process. Each change of
    writer (a close or a death) writes the whole state into a new log
    while it holds the mutex, so it costs what a compaction costs, and so
    does the death of a process that held the mutex. Under
    ``"always"`` a call waits for the writer, so a stopped writer stalls
    the durable calls of every process until it continues or dies.
"""

from __future__ import annotations

import asyncio
import atexit
import errno
import fcntl
import hashlib
import logging
import dataclasses
import mmap
import os
import pickle
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from mqs._journal import (
    DURABLE,
    DURABLE_LOG_END,
    MAX_BYTES,
    MIN_BYTES,
    WRITER,
    SharedJournal,
)
from mqs._seglog import SegmentLog
from mqs._topiccore import LoggedPath, TopicCore, TopicRetired
from mqs.broker._backend import (
    Backend,
    Delivery,
    Envelope,
    decode_each,
)
from mqs.broker._log import (
    _SNAPSHOT_KEY,
    CURRENT,
    FORMAT,
    LOCK,
    OBJECT_FORMAT,
    LogBackend,
    _check_empty,
    _check_log_options,
    _fetch_is_idle,
    _fetch_is_quiet,
    _make_directory,
    _read_current,
    close_segment_log,
    encode_record,
    lock_holder,
    max_record_bytes,
    read_checked_current,
)
from mqs.broker._coreimage import CoreImage, count_returned
from mqs.broker._memory import MemoryBackend, _sample_every
from mqs.broker._shm import (
    DEFAULT_JOURNAL_BYTES,
    PREFIX,
    SHM_DIR,
    CORE_SLOT_BYTES,
    ShmBackend,
    _adopt_core_state,
    _ChangeWait,
    _instances,
    _JournalOp,
    _SharedSection,
)
from mqs.broker._policy import TopicConfig
from mqs.errors import (
    BackendUnavailable,
    LogCorrupted,
    LogLocked,
    LogVersionError,
    ShutDown,
)

__all__ = ["SharedLogBackend", "TAKEOVER_INTERVAL_S", "directory_identity",
           "journal_files", "journal_name", "remove_stale_journals",
           "unlink_journal"]

logger = logging.getLogger(__name__)

# How often a process that is not the writer tries the writer lock.
TAKEOVER_INTERVAL_S = 0.05
# How often the log thread checks that the directory at `path` is still
# the one the process opened.
DIRECTORY_CHECK_INTERVAL_S = 0.5
USERS = "users"
# The random id that, with the directory's inode, names the journal of
# one incarnation of the directory (see `directory_identity`).
DIRECTORY_ID = "broker.id"
# Words (int64) of the durable file:
# _DURABLE     The durable journal position.
# _FAILED      0, or why every operation raises: _WRITE_FAILED (the
#              writer failed to append or sync), _DIRECTORY_REPLACED (a
#              process found the directory replaced) or _LOG_REPLACED (a
#              writer found a log that this journal's writers did not
#              write).
# _VERSION     _DURABLE_VERSION, or 0 in the two-word files of older mqs.
# _LOG_NUMBER  The NNNNNN of the name of the log the writer appends to.
# _LOG_ID      The incarnation id of that log (0 before the first
#              snapshot of this journal).
# _LOG_END     That log's end offset after the writer's last append.
# _NEXT_LOG_ID The incarnation id of the log that a snapshot is writing,
#              from before CURRENT names it until _LOG_ID is that id.
# _ALWAYS_USED 1 once a process opened the journal with fsync="always",
#              which makes every writer sync before it advances _DURABLE,
#              whatever its own mode. It stays 1 until the journal is
#              removed, because a process that dies cannot clear it.
# _INTERVAL_USED 1 once a process opened it with fsync="interval", which
#              makes a writer that opened with "never" sync every
#              `fsync_interval_s` (its own); kept as _ALWAYS_USED is.
# _SEGMENT_BYTES segment_bytes of the first process that opened the
#              broker since every process closed it, which the others
#              take too (`_claim_segment_bytes`); 0 in journals of older
#              mqs versions.
# _SNAPSHOT_DUE 1 once a process found the journal mutex's previous
#              holder dead. That holder may have changed a topic core
#              without committing the record of the change, so the writer
#              writes the state as a snapshot, which stores 0. Older mqs
#              versions neither set nor read it.
# `_log_mismatch` compares the log words with the directory's log.
_DURABLE, _FAILED, _VERSION = 0, 1, 2
# `JournalSection.append_record` stores _LOG_END (DURABLE_LOG_END).
_LOG_NUMBER, _LOG_ID, _LOG_END, _NEXT_LOG_ID = 3, 4, DURABLE_LOG_END, 6
_ALWAYS_USED, _INTERVAL_USED, _SNAPSHOT_DUE, _SEGMENT_BYTES = 7, 8, 9, 10
_WRITE_FAILED, _DIRECTORY_REPLACED, _LOG_REPLACED = 1, 2, 3
# Processes of an older mqs can share a journal with this one (the
# journal layout is the same). They leave the log words as they are,
# and their logs have no incarnation id, which `_log_mismatch` accepts.
_DURABLE_VERSION = 2
_DURABLE_FILE_BYTES = 4096
# The first field of every snapshot this backend writes. Versions 1 and
# 3 are the single-process LogBackend's, whose records hold bodies as
# objects; this backend keeps them pickled (as bytes), like the shm
# backend. Version 4 stores each topic as `TopicState.snapshot` columns;
# version 2, still read, stored the `TopicState` objects themselves.
# Version 5 adds a field after the topics: the `TopicCore.export_image`
# of each topic kept on a topic core (see `mqs.broker._coreimage`).
SHARED_FORMAT = (FORMAT[0], 5)
COLUMN_SHARED_FORMAT = (FORMAT[0], 4)
OBJECT_SHARED_FORMAT = (FORMAT[0], 2)
# Formats whose bodies are objects, pickled once on replay.
_OBJECT_BODY_FORMATS = (OBJECT_FORMAT, FORMAT)
# Objects a forked child inherited and must neither use nor free.
_inherited: list[Any] = []
# The fields of an Envelope after body and priority, at their defaults,
# for building one without the keyword handling of Envelope.__new__.
_ENVELOPE_DEFAULTS = Envelope(None)[2:]
_new_tuple = tuple.__new__
_dumps = pickle.dumps
_loads = pickle.loads
_PROTOCOL = pickle.HIGHEST_PROTOCOL


def _path_prefix(path: str | os.PathLike[str]) -> str:
    """Return the start of the shm names of every journal that served the
    log broker at `path`, whatever the directory's identity."""
    real = os.path.realpath(os.fspath(path))
    return "log." + hashlib.sha256(real.encode()).hexdigest()[:32]


def _read_directory_id(path: str) -> str | None:
    try:
        with open(os.path.join(path, DIRECTORY_ID), encoding="ascii") as file:
            return file.read().strip() or None
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def _create_directory_id(path: str) -> bool:
    """Write a random id into `path` unless it has one; return whether
    this call wrote it. The id is written under a temporary name and
    linked into place, so a concurrent opener reads either no id or the
    whole one, and only one id wins."""
    if _read_directory_id(path) is not None:
        return False
    temp = os.path.join(path, f"{DIRECTORY_ID}.{os.getpid()}."
                              f"{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                 0o600)
    try:
        try:
            os.write(fd, (secrets.token_hex(16) + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(temp, os.path.join(path, DIRECTORY_ID))
    except FileExistsError:
        return False
    finally:
        os.unlink(temp)
    return True


def directory_identity(path: str | os.PathLike[str]) -> str | None:
    """Return the identity of the log broker directory at `path`, or None
    if it has no id file (a new, emptied or missing directory).

    The identity hashes the directory's device and inode numbers with
    the random id in its ``broker.id`` file. A directory that was
    removed and created again, emptied, or replaced by a copy gets
    another identity, so it never meets the journal of its predecessor.
    """
    directory = os.fspath(path)
    directory_id = _read_directory_id(directory)
    if directory_id is None:
        return None
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        return None
    key = f"{info.st_dev}:{info.st_ino}:{directory_id}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def journal_name(path: str | os.PathLike[str]) -> str:
    """Return the shm journal name of the log broker at `path`: the hash
    of its real path, then its `directory_identity`.

    Raises FileNotFoundError if `path` has no id file yet (no process
    opened the broker since the directory was created or emptied).
    """
    identity = directory_identity(path)
    if identity is None:
        raise FileNotFoundError(
            errno.ENOENT, f"log broker directory {os.fspath(path)!r} has no "
            f"{DIRECTORY_ID} file; open the broker once to create it",
            os.path.join(os.fspath(path), DIRECTORY_ID))
    return f"{_path_prefix(path)}.{identity}"


def _journal_files(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Return the /dev/shm files of every journal of the log broker at
    `path`, by journal name. They include the journals of earlier
    directories and the journal that mqs versions without directory
    identities named after the path alone."""
    prefix = _path_prefix(path)
    found: dict[str, list[str]] = {}
    for entry in os.listdir(SHM_DIR):
        if not entry.startswith(PREFIX + prefix):
            continue
        rest = entry[len(PREFIX + prefix):]
        identity = ""
        if rest.startswith(".") and len(rest) >= 17 and all(
                char in "0123456789abcdef" for char in rest[1:17]):
            identity = rest[:17]
            rest = rest[17:]
        if rest and not rest.startswith((".durable", ".snapshot-",
                                         ".tail-", ".core-", ".adopt-")):
            continue
        found.setdefault(prefix + identity, []).append(
            os.path.join(SHM_DIR, entry))
    return found


def journal_files(path: str | os.PathLike[str]) -> list[str]:
    """Return the names of the /dev/shm journals of the log broker at
    `path`, of every incarnation of its directory."""
    return list(_journal_files(path))


def _unlink_files(paths: Sequence[str]) -> None:
    for file_path in paths:
        try:
            os.unlink(file_path)
        except FileNotFoundError:
            pass


def unlink_journal(path: str | os.PathLike[str]) -> bool:
    """Remove every /dev/shm journal of the log broker at `path`, as a
    reboot would; return whether one existed. It removes them even if
    processes use them: those keep their mappings, and the next open
    restores the broker from the log."""
    existed = False
    for name, files in _journal_files(path).items():
        existed |= os.path.join(SHM_DIR, PREFIX + name) in files
        _unlink_files(files)
    return existed


def remove_stale_journals(path: str | os.PathLike[str],
                          keep: str | None = None) -> list[str]:
    """Remove the /dev/shm journals of the log broker at `path` that
    belong to an earlier incarnation of its directory and that no open
    broker uses; return their names.

    `keep` defaults to the journal of the directory as it is now. Any
    other journal is in use while a process has a shared `flock` on its
    ``.durable`` file, which every process that has the broker open
    takes. A journal without that file counts as unused: its opener died
    before creating it, or an mqs version without directory identities
    made it.
    """
    if keep is None:
        identity = directory_identity(path)
        keep = None if identity is None else \
            f"{_path_prefix(path)}.{identity}"
    removed = []
    for name, files in _journal_files(path).items():
        if name == keep:
            continue
        durable = os.path.join(SHM_DIR, PREFIX + name + ".durable")
        try:
            fd = os.open(durable, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = -1
        try:
            if fd >= 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    logger.info("log broker %s: journal %s belongs to an "
                                "earlier directory at this path and is "
                                "still open in a process; kept", path, name)
                    continue
            _unlink_files(files)
            removed.append(name)
        finally:
            if fd >= 0:
                os.close(fd)
    if removed:
        logger.info("log broker %s: removed %d stale journal(s) of earlier "
                    "directories at this path: %s", path, len(removed),
                    ", ".join(removed))
    return removed


def _unlink_own_journal(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, PREFIX + name + ".durable"))
    except FileNotFoundError:
        pass
    ShmBackend.unlink(name)


def _new_incarnation() -> int:
    """Return a random incarnation id for a new log: a positive int64."""
    return secrets.randbelow((1 << 63) - 1) + 1


def _incarnation_key(incarnation: int) -> bytes:
    """Return the key of the first snapshot record of a log with
    `incarnation`. Replay reads it as any snapshot part."""
    return _SNAPSHOT_KEY + incarnation.to_bytes(8, "big")


def _read_log(path: str, name: str) -> tuple[int, int]:
    """Return the incarnation id (0 if it has none) and the end offset of
    log `name` in the log broker directory `path`.

    Raises FileNotFoundError if the log is missing, and what
    `SegmentLog` raises for a damaged one.
    """
    log = SegmentLog(os.path.join(path, name), readonly=True)
    try:
        end = log.end_offset
        if end <= log.start_offset:
            return 0, end
        key = log.read_record(log.start_offset).key
        if key is None or len(key) != 9 or key[:1] != _SNAPSHOT_KEY:
            # A log of LogBackend or of an mqs without incarnation ids.
            return 0, end
        return int.from_bytes(key[1:], "big"), end
    finally:
        log.close()


def _log_mismatch(path: str, words: Sequence[int]) -> str | None:
    """Compare the log in directory `path` with the log words of a
    durable file. Return None if the journal may go on from that log,
    else a description of what differs.

    The journal may be ahead of the log (records a crashed writer had
    not appended), but never behind it. So the directory's log must be
    the one the journal's writer last appended to, with at least the
    records it appended, or the one a snapshot was switching to. A log
    without an incarnation id passes, because an older mqs, which may
    share the journal, wrote it.
    """
    if words[_VERSION] != _DURABLE_VERSION or not words[_LOG_ID]:
        # The journal's writers never wrote a log with an id.
        return None
    expected = f"log-{words[_LOG_NUMBER]:06d}"
    name = _read_current(path)
    if name is None:
        return f"the directory has no {CURRENT} file, expected {expected}"
    try:
        incarnation, end = _read_log(path, name)
    except (LogCorrupted, LogVersionError) as exc:
        # The journal can replace a damaged log, as a takeover does.
        logger.warning("log broker %s: could not read log %s to compare it "
                       "with the journal (%s); the journal is kept", path,
                       name, exc)
        return None
    except OSError as exc:
        return f"its log {name} cannot be read ({exc})"
    if incarnation in (0, words[_NEXT_LOG_ID]):
        return None
    if incarnation != words[_LOG_ID]:
        return (f"{CURRENT} names {name} with incarnation id "
                f"{incarnation:016x}, expected {expected} with id "
                f"{words[_LOG_ID]:016x}")
    if end < words[_LOG_END]:
        return (f"its log {name} ends at offset {end}, but the journal's "
                f"writer appended up to offset {words[_LOG_END]}")
    return None


_dumps = pickle.dumps
_PROTOCOL = pickle.HIGHEST_PROTOCOL
# How long an open waits for the process that has the writer lock to
# restore a new journal before it raises LogLocked.
RESTORE_WAIT_S = 10.0
# Offset of a record's op name: after the protocol (2 bytes) and frame
# (9 bytes) opcodes of `pickle.dumps` at protocol 5 and the 2 bytes that
# open a short str. The op names of core records start with _IMAGE_OP.
_OP_AT = 13
_IMAGE_OP = b"image_"


class _LoggedCore:
    """A `TopicCore` handle of the log backend.

    The operations that change what a restore must rebuild run in the
    broker's section and append a record with their result there, so
    the log contains them in the order the core ran them. The others pass
    through. `open_group` runs in a section its caller holds.
    """

    __slots__ = ("_backend", "_topic", "_core", "path", "_groups",
                 "_consumers")

    def __init__(self, backend: SharedLogBackend, topic: str,
                 core: TopicCore) -> None:
        self._backend = backend
        self._topic = topic
        self._core = core
        self.path = core.path
        # Group index -> name, for the groups this process opened, which
        # are the only ones its consumers and tags name.
        self._groups: dict[int, str] = {}
        # Consumer index -> group index, for this process's consumers.
        self._consumers: dict[int, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)

    def _check(self) -> None:
        backend = self._backend
        if backend._failed is not None:
            raise backend._failed_error()
        if backend._cores.get(self._topic) is not self:
            # The catch-up on entering the section applied another
            # process's move or delete, which closed this handle. The
            # caller goes on as for a core that another process retired.
            raise TopicRetired(self._topic)

    def _group_name(self, index: int) -> str:
        name = self._groups.get(index)
        if name is None:
            # Not opened through this handle: the backend's consumers of
            # the topic name it.
            backend = self._backend
            for consumer, entry in backend._core_consumers.items():
                if entry[0] == self._topic and entry[1] == index:
                    name = self._groups[index] = backend._owners[consumer][1]
                    break
            else:
                raise AssertionError(
                    f"group {index} of topic core {self.path} has no "
                    f"consumer in this process")
        return name

    def _group_of(self, consumer: int) -> int:
        index = self._consumers.get(consumer)
        if index is None:
            for entry in self._backend._core_consumers.values():
                if entry[0] == self._topic and entry[2] == consumer:
                    index = self._consumers[consumer] = entry[1]
                    break
            else:
                raise AssertionError(
                    f"consumer {consumer} of topic core {self.path} is not "
                    f"this process's")
        return index

    def open_group(self, name: str, earliest: bool,
                   max_attempts: int | None = None) -> int:
        index: int = self._core.open_group(name, earliest, max_attempts)
        self._groups[index] = name
        self._backend._log_core("image_group", self._topic, name, earliest,
                                max_attempts)
        return index

    def open_consumer(self, group: int, prefetch: int, owner: int) -> int:
        number: int = self._core.open_consumer(group, prefetch, owner)
        self._consumers[number] = group
        return number

    def fetch(self, consumer: int, max_items: int, ack_timeout: float,
              auto_ack: bool = False, now: float | None = None,
              owner: int = 0) -> list:
        backend = self._backend
        with backend._lock:
            self._check()
            found: list = self._core.fetch(consumer, max_items, ack_timeout,
                                           auto_ack, now, owner)
            if found:
                group = self._group_name(self._group_of(consumer))
                items = [(item[0], item[3], item[2]) for item in found]
                # In parts that fit a record of the smallest journal.
                step = max(1, backend._max_record // 64)
                for start in range(0, len(items), step):
                    backend._log_core("image_deliver", self._topic, group,
                                      auto_ack, items[start:start + step],
                                      consumer, ack_timeout)
        return found

    def ack(self, group: int, slot: int, ticket: int) -> bool:
        backend = self._backend
        with backend._lock:
            self._check()
            seq = self._core.slot_seq(slot)
            done: bool = self._core.ack(group, slot, ticket)
            if done:
                backend._log_core("image_ack", self._topic,
                                  self._group_name(group), seq)
        return done

    def nack(self, group: int, slot: int, ticket: int, requeue: bool
             ) -> bool:
        backend = self._backend
        with backend._lock:
            self._check()
            seq = self._core.slot_seq(slot)
            done: bool = self._core.nack(group, slot, ticket, requeue)
            if done:
                backend._log_core("image_nack", self._topic,
                                  self._group_name(group), seq,
                                  bool(requeue))
        return done

    def release(self, group: int, tags: list) -> int:
        backend = self._backend
        with backend._lock:
            self._check()
            seqs = [self._core.slot_seq(slot) for slot, _ in tags]
            count: int = self._core.release(group, tags)
            if count:
                step = max(1, backend._max_record // 32)
                for start in range(0, len(seqs), step):
                    backend._log_core("image_release", self._topic,
                                      self._group_name(group),
                                      seqs[start:start + step])
        return count


class SharedLogBackend(ShmBackend):
    """A durable log broker that several processes can open at once.

    Parameters
    ----------
    path, fsync, fsync_interval_s, segment_bytes, compact_bytes,
    sample_every
        As for `LogBackend`, except that `fsync_interval_s` also bounds
        how long an ack stays unsynced under ``fsync="always"``, and
        that the processes that have the broker open share the
        `segment_bytes` of the first of them.
    journal_bytes : int
        Size of the shm journal when this call creates it, as for
        `ShmBackend`.
    sync_acks : bool
        ``fsync="always"`` only (True with another mode raises
        ValueError): make acks, nacks and auto_ack deliveries wait for a
        sync that covers their record, as publishes do. The default
        (False) returns once the record is in the journal; the next
        sync, at most `fsync_interval_s` later, makes it durable (see
        "What survives what" in the module docs).

    Raises
    ------
    NotADirectoryError
        If `path` is a file.
    DirectoryKindError
        If `path` is a durable SharedQueue's or a bare segment log's
        directory.
    TypeError, ValueError
        If an option is invalid, checked before the directory or the
        journal is created, or if `path` contains files that are not a
        log broker's.
    LogVersionError
        If the log was written by a newer mqs.
    LogLocked
        If the journal is new but another process has held the writer
        lock of `path` for 10 s (it uses a journal that was removed).
    OSError
        If the directory, its files or the journal cannot be created or
        written (a full disk, missing permissions). If this open gave
        the directory its id and no other process opened the broker
        meanwhile, it first removes the journal and the directories
        that it created. A directory that existed before keeps the
        small ``broker.id``, ``users`` and ``lock`` files.
    """

    name = "log"
    _snapshot_format = SHARED_FORMAT
    _formats_read = (OBJECT_FORMAT, OBJECT_SHARED_FORMAT, FORMAT,
                     COLUMN_SHARED_FORMAT, SHARED_FORMAT)
    # A publish looks the topic up under the journal mutex, after the
    # replay, so the Broker needs no has_topic round before it.
    publish_checks_topic = True
    # True while `_restore` replays the log: records of core operations
    # then go into `_images` (see `mqs.broker._coreimage`).
    _restoring = False
    # A topic moved from its core to the journal since the last snapshot
    # (see `_do_adopt`).
    _adopted = False

    def __init__(self, path: str | os.PathLike[str], *,
                 fsync: str = "interval", fsync_interval_s: float = 0.05,
                 segment_bytes: int = 16 << 20,
                 compact_bytes: int = 64 << 20,
                 sample_every: int | None | str = "default",
                 journal_bytes: int = DEFAULT_JOURNAL_BYTES,
                 sync_acks: bool = False) -> None:
        _check_log_options(path, fsync, fsync_interval_s, segment_bytes,
                           compact_bytes, sample_every)
        _check_journal_bytes(journal_bytes)
        if not isinstance(sync_acks, bool):
            raise TypeError(f"sync_acks must be True or False, got "
                            f"{type(sync_acks).__name__} {sync_acks!r}")
        if sync_acks and fsync != "always":
            # The other modes never wait for a sync, so the flag would be
            # ignored while the caller believes acks are synced.
            raise ValueError(
                f"sync_acks=True needs fsync='always', got fsync={fsync!r}; "
                f"pass fsync='always' to make acks wait for their sync, or "
                f"leave sync_acks False")
        # Absolute, so that a later chdir of the process neither moves
        # the broker nor looks like a removal to the directory check.
        directory = os.path.abspath(os.fspath(path))
        created = _make_directory(directory)
        MemoryBackend.__init__(self, clock=self._read_clock,
                               sample_every=_sample_every(sample_every))
        self.path = directory
        # Set by `_attach`; a failed open removes only what it created.
        self._created_id = False
        self.shm_name = ""
        self.fsync = fsync
        self._sync_acks = sync_acks
        self._fsync_interval_s = fsync_interval_s
        self._segment_bytes = segment_bytes
        self._compact_bytes = compact_bytes
        # Broker time as in LogBackend: monotonic, aligned to the wall
        # clock when the process opened the broker.
        self._offset = time.time() - time.monotonic()
        self._last = 0.0
        self._now = 0.0
        self._log = None
        self._log_name = ""
        self._bytes_since_snapshot = 0
        self._failed = None
        self._closed = False
        self._reset_state()
        # Plain topics live on topic cores in /dev/shm, as for the shm
        # backend, through `_LoggedCore` handles that log each change.
        self._core_topics = True
        self._cores = {}
        self._images: dict[str, CoreImage] = {}
        # Restore only: the prefetch of each replayed core consumer.
        self._prefetches: dict[str, int] = {}
        self._guard = threading.local()
        self._journal_op_context = _JournalOp(self._guard)
        self._generation = -1
        self._applied = 0
        self._held = False
        self._appended = False
        # In the instance dict, where the section reads them first.
        self._enter_slow = False
        self._quiet = False
        self._waiting = 0
        self._next_reap = 0.0
        self._writer = False
        # Commits of this process wake the writer's log thread.
        self._wakes_writer = True
        # Each thread's last record, which its sync waits for.
        self._marks_records = fsync == "always"
        # The writer's log misses records (a takeover, or a journal
        # compaction dropped records it had not appended): the next
        # section writes a snapshot first.
        self._log_behind = False
        # The log and the journal position of the last record in it
        # (writer only), replaced as one tuple so that a thread that syncs
        # outside the section reads a matching pair.
        self._log_state: tuple[Any, int] = (None, 0)
        # Journal position after the last record of another process that
        # the writer appended: its thread syncs up to there.
        self._others_mark = 0
        # Writer under "never": when `_sync_for_interval` syncs next.
        self._next_interval_sync = 0.0
        self._replayed = False
        self._local = threading.local()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = _SharedSection(self)  # type: ignore[assignment]
        self._bind_section_paths()
        # The per-message paths on the topic cores, in C: publish here,
        # and `Consumer.get` and `Message.ack` through the `CoreReader`
        # of `ShmBackend.message_reader`. The instance attribute hides
        # the `publish_one` method, so `Broker` calls C directly.
        self._fast = LoggedPath(self)
        self.publish_one = self._fast.publish_one  # type: ignore[method-assign]
        self._changed = _ChangeWait(self)  # type: ignore[assignment]
        self._users_fd = -1
        self._lock_fd = -1
        self._durable_fd = -1
        self._journal = None
        self._durable = None
        try:
            self._attach(journal_bytes)
        except BaseException:
            # Nothing is left to close, at exit or later.
            _instances.discard(self)
            self._closed = True
            self._release_files()
            self._remove_failed_first_open(created)
            raise
        self._start_thread()

    def _attach(self, journal_bytes: int) -> None:
        """Give the directory its id, take the shared locks, attach to the
        journal (creating it if needed) and catch up with the broker."""
        directory = self.path
        self._created_id = _create_directory_id(directory)
        self._identity = directory_identity(directory)
        if self._identity is None:
            raise FileNotFoundError(
                errno.ENOENT, f"log broker directory {directory!r} was "
                f"removed while the broker was being opened", directory)
        self.shm_name = f"{_path_prefix(directory)}.{self._identity}"
        self._journal_file = os.path.join(SHM_DIR, PREFIX + self.shm_name)
        self._users_fd = _open_file(os.path.join(directory, USERS))
        fcntl.flock(self._users_fd, fcntl.LOCK_SH)
        self._lock_fd = _open_file(os.path.join(directory, LOCK))
        self._durable_fd = self._lock_durable_file()
        remove_stale_journals(directory, keep=self.shm_name)
        self._durable = _map_durable(self._durable_fd)
        shared = self._durable[_SEGMENT_BYTES]
        if shared and shared != self._segment_bytes:
            logger.info(
                "log broker %s: segment_bytes=%d of the processes that have "
                "it open applies instead of %d (it holds until every "
                "process closed the broker)", directory, shared,
                self._segment_bytes)
            self._segment_bytes = shared
        # The writer may be a process that opened with a weaker mode;
        # these words make it sync as this process's mode promises.
        if self.fsync == "always":
            self._durable[_ALWAYS_USED] = 1
        elif self.fsync == "interval":
            self._durable[_INTERVAL_USED] = 1
        self._journal = SharedJournal(self._journal_file, journal_bytes)
        self._max_record = min(self._journal.journal_bytes // 2,
                               max_record_bytes(self._segment_bytes))
        self._slot, self._token = self._journal.attach()
        _instances.add(self)
        self._try_writer_lock()
        # Catch up; the first process restores the broker from the log.
        with self._lock:
            pass

    def _remove_failed_first_open(self, created: list[str]) -> None:
        """Remove the journal and the directories that a failed open
        created, after `_release_files`.

        The journal and a directory with files in it are removed only if
        this open wrote the directory's id (a new or emptied directory)
        and no other process has the broker open. The journal alone is
        also removed when this open created it (a restore that failed),
        unless another process has the broker open. A directory that
        existed before keeps its id and lock files. Errors of the
        removal are logged, so that the caller raises the open's error.
        """
        try:
            if self._created_id and self._remove_new_broker(created):
                logger.debug("log broker %s: removed the journal %s and "
                             "the directories %s that a failed open "
                             "created", self.path, self.shm_name, created)
            elif self._journal is not None and self._journal.created \
                    and self._remove_new_broker([]):
                # A restore that failed (LogCorrupted, a full disk): the
                # log keeps the broker, so the new journal is only a
                # partial copy of it.
                logger.debug("log broker %s: removed the journal %s that "
                             "a failed open created", self.path,
                             self.shm_name)
            # Parents of the directory, or the directory itself when it
            # failed to get an id, are removed only while they are empty.
            for directory in reversed(created):
                try:
                    os.rmdir(directory)
                except FileNotFoundError:
                    continue
                except OSError:
                    break
        except OSError:
            logger.warning("log broker %s: could not remove what a failed "
                           "open created; `mqs clean` removes the journal",
                           self.path, exc_info=True)

    def _remove_new_broker(self, created: list[str]) -> bool:
        """Remove the journal of this open's new directory id, and the
        directory if this open created it. Return False, removing
        nothing, if another process has the broker open."""
        try:
            users_fd = os.open(os.path.join(self.path, USERS),
                               os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            users_fd = -1
        try:
            if users_fd >= 0:
                try:
                    # Every process that has the broker open has a
                    # shared lock on this file.
                    fcntl.flock(users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
            if self.shm_name:
                _unlink_own_journal(self.shm_name)
            if created and created[-1] == os.path.abspath(self.path):
                try:
                    shutil.rmtree(created[-1])
                except FileNotFoundError:
                    pass
            return True
        finally:
            if users_fd >= 0:
                os.close(users_fd)

    # Files and the writer lock.

    def _claim_segment_bytes(self, fd: int) -> None:
        """Store this process's segment_bytes in the durable file at `fd`
        unless a process stored one before. The caller holds the file's
        lock exclusively, so no other process reads the word meanwhile.

        Any process of the broker may become the writer, which appends
        the records of every process into segments of its own size. So
        they all take the segment size of the first open (`_attach`), as
        a record that fits one process's segments may not fit another's.
        """
        offset = _SEGMENT_BYTES * 8
        stored = os.pread(fd, 8, offset)
        # The words are native int64 (`_map_durable`).
        if len(stored) < 8 or not int.from_bytes(stored, sys.byteorder):
            os.pwrite(fd, self._segment_bytes.to_bytes(8, sys.byteorder),
                      offset)

    def _lock_durable_file(self) -> int:
        """Open the journal's durable file and take a shared `flock` on it;
        return its descriptor.

        The shared lock marks the journal as in use, for
        `remove_stale_journals` and for this check, until the broker
        closes. A process that gets the lock exclusively first is the
        only user: it discards the journal if it does not match the
        directory's log (see `_discard_outdated_journal`).
        """
        durable_path = self._journal_file + ".durable"
        while True:
            fd = _open_file(durable_path)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    fcntl.flock(fd, fcntl.LOCK_SH)
                else:
                    if self._discard_outdated_journal(fd):
                        os.close(fd)
                        continue
                    self._claim_segment_bytes(fd)
                    # Not atomic: another opener may take the lock
                    # exclusively in between and run the same check.
                    fcntl.flock(fd, fcntl.LOCK_SH)
                # A process that discarded the journal unlinked the file
                # this descriptor may have opened before.
                opened, current = os.fstat(fd), os.stat(durable_path)
                if (opened.st_dev, opened.st_ino) == (current.st_dev,
                                                      current.st_ino):
                    return fd
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def _discard_outdated_journal(self, fd: int) -> bool:
        """Remove the journal if no process uses it and it does not match
        the directory's log; return whether it did. The caller has an
        exclusive `flock` on the durable file open at `fd`.

        A crash of every process leaves the journal to go on from, but a
        backup restored into the same directory afterwards keeps the
        directory's identity: its log must win over the journal.
        """
        if os.fstat(fd).st_size < _DURABLE_FILE_BYTES:
            # A new file: a journal without one is never restored.
            _init_durable_file(fd)
            return False
        mapping = _map_durable(fd)
        try:
            words = mapping.tolist()[:_NEXT_LOG_ID + 1]
            if words[_VERSION] < _DURABLE_VERSION:
                # Written by an older mqs: the journal cannot be checked
                # against the log, and from now on it can.
                for index in range(_LOG_NUMBER, _NEXT_LOG_ID + 1):
                    mapping[index] = 0
                mapping[_VERSION] = _DURABLE_VERSION
                return False
        finally:
            mapping.release()
        problem = _log_mismatch(self.path, words)
        if problem is None:
            return False
        if not os.path.exists(self._journal_file):
            # Left by a removal of the journal that was cut short, so
            # the new journal must not inherit its words.
            _unlink_own_journal(self.shm_name)
            return True
        logger.warning(
            "log broker %s: discarded journal %s, left by processes that "
            "ended without closing the broker, because the directory's log "
            "is not the one the journal continues (%s); the directory was "
            "probably restored from a backup. The broker restores from the "
            "log; operations that were only in the journal are lost",
            self.path, self.shm_name, problem)
        _unlink_own_journal(self.shm_name)
        return True

    def _release_files(self) -> None:
        try:
            if self._log is not None:
                log, self._log = self._log, None
                # `close` checked the directory before it got here.
                directory_gone = self._durable is not None and \
                    self._durable[_FAILED] == _DIRECTORY_REPLACED
                close_segment_log(log, self.path,
                                  directory_gone=directory_gone)
        finally:
            # A failed final sync of the log (LogPoisoned) still releases
            # the journal, the mapping and the locks.
            if self._journal is not None:
                self._journal.close()
            if self._durable is not None:
                self._durable.release()
            for fd in (self._lock_fd, self._users_fd, self._durable_fd):
                if fd >= 0:
                    os.close(fd)
            self._lock_fd = self._users_fd = self._durable_fd = -1

    def _try_writer_lock(self) -> bool:
        """Take the writer lock if it is free; return whether this process
        is the writer now. The caller runs the takeover (see module docs)."""
        if self._writer:
            return True
        if self._directory_replaced():
            # Its lock file is not the one at `path` any more, so taking
            # it would make a second writer of the new directory.
            return False
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._log_name = _read_current(self.path) or ""
        self._log_behind = True
        self._writer = True
        self._wakes_writer = False
        logger.debug("log broker %s: process %d is the writer", self.path,
                     os.getpid())
        return True

    def _directory_replaced(self) -> bool:
        """Return whether the directory at `path` is no longer the one this
        process opened (removed, emptied, or replaced by a copy). The
        first process to find out marks the journal, so that the
        operations of every process on it raise `BackendUnavailable`."""
        if directory_identity(self.path) == self._identity:
            return False
        self._mark_directory_replaced()
        return True

    def _mark_directory_replaced(self) -> None:
        """Make the operations of every process on this journal raise
        `BackendUnavailable`, saying that the directory was removed or
        replaced."""
        # Every section of this process takes the Python path from now on,
        # where it raises.
        self._enter_slow = True
        if self._durable is not None and \
                self._durable[_FAILED] != _DIRECTORY_REPLACED:
            self._durable[_FAILED] = _DIRECTORY_REPLACED
            self._journal.signal()
            self._journal.signal(DURABLE)
            logger.error("log broker %s: the directory was removed or "
                         "replaced while process %d had the broker open; "
                         "its journal %s no longer reaches the log",
                         self.path, os.getpid(), self.shm_name)

    def _replacement_marked(self) -> bool:
        """Return whether a process marked the journal because it found
        the directory or its log replaced."""
        return self._durable[_FAILED] in (_DIRECTORY_REPLACED,
                                          _LOG_REPLACED)

    def _check_directory(self) -> None:
        """Raise `BackendUnavailable` if the directory was replaced, before
        this process writes into it."""
        if self._directory_replaced():
            raise BackendUnavailable(_replaced_message(self.path))

    def _stopped_error(self) -> BackendUnavailable:
        """Return the error of every operation once a process found the
        directory or its log replaced."""
        if self._durable[_FAILED] == _LOG_REPLACED:
            return BackendUnavailable(_log_replaced_message(self.path))
        return BackendUnavailable(_replaced_message(self.path))

    def _check_log(self) -> None:
        """Raise `BackendUnavailable` if the directory's log is not the one
        this journal's writers wrote, before a snapshot replaces it.

        Someone restored a backup into the directory while processes had
        the broker open. A snapshot of the journal would overwrite the
        restored log, and a restore from it would drop the operations
        of the running processes, so every process stops instead.
        """
        # A read-only open of the log costs about 2 ms for 60 MB of
        # records, less than the snapshot that follows.
        problem = _log_mismatch(self.path, self._durable)
        if problem is None:
            return
        if _log_missing(self.path):
            # A restored backup brings CURRENT and its log along, so a
            # missing one most likely means that the directory is being
            # removed.
            self._mark_directory_replaced()
            raise BackendUnavailable(_replaced_message(self.path))
        self._mark_log_replaced(problem)
        raise BackendUnavailable(_log_replaced_message(self.path))

    def _mark_log_replaced(self, problem: str) -> None:
        """Make the operations of every process on this journal raise
        `BackendUnavailable`."""
        # Every section of this process takes the Python path from now on,
        # where it raises; the other processes' log threads find the mark.
        self._enter_slow = True
        if self._durable[_FAILED] == _LOG_REPLACED:
            return
        self._durable[_FAILED] = _LOG_REPLACED
        self._journal.signal()
        self._journal.signal(DURABLE)
        logger.error("log broker %s: the directory's log changed while "
                     "process %d had the broker open (%s); nothing more "
                     "is written to it", self.path, os.getpid(), problem)

    def _wait_writer_lock(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._try_writer_lock():
            if time.monotonic() >= deadline:
                raise LogLocked(
                    errno.EAGAIN,
                    f"timed out after {timeout:g} s waiting for the writer "
                    f"lock of log broker {self.path!r}, held by process "
                    f"{lock_holder(self.path)}; close that process",
                    os.path.join(self.path, LOCK))
            time.sleep(0.01)

    # The section: the journal mutex with the replica and the log caught up.

    def _enter_shared(self) -> None:
        # A closed broker raises ShutDown in ShmBackend._enter_shared, and
        # its durable file is unmapped. `JournalSection` skips this check
        # (and this method) in its common case, so the process finds out
        # through its log thread's checks of the directory and of the
        # durable file instead, within DIRECTORY_CHECK_INTERVAL_S.
        if not self._closed and self._durable[_FAILED] in (
                _DIRECTORY_REPLACED, _LOG_REPLACED):
            self._enter_slow = True
            raise self._stopped_error()
        ShmBackend._enter_shared(self)

    def _lock_recovered(self) -> None:
        super()._lock_recovered()
        # The dead holder may have changed a topic core (a publish, a
        # delivery, an ack) without committing the record of the change,
        # so the log misses it. The writer's log thread writes the state,
        # which includes each core's, as a snapshot.
        self._durable[_SNAPSHOT_DUE] = 1
        self._journal.signal(WRITER)

    def _enter_locked(self) -> None:
        ShmBackend._enter_locked(self)
        # Generation 0 is a journal that no process has restored yet:
        # every restore ends in a compaction to generation 1. The
        # section stored the journal's generation in _generation.
        if self._generation == 0:
            self._restore_or_wait()
        elif self._writer and self._log_behind:
            self._write_snapshot()
        elif self._replayed:
            # _replay_records appended the records of the others, which
            # the log thread syncs.
            self._set_log_mark()
            self._others_mark = self._log_state[1]
            self._replayed = False
            self._journal.signal(WRITER)

    def _load_snapshot_file(self, generation: int) -> None:
        # This replica missed records of the old generation, so the log
        # missed them too. Set first, so that the replay of the tails
        # after the snapshot does not append them to the log.
        self._log_behind = True
        super()._load_snapshot_file(generation)

    def _replay_records(self, records: list[bytes]) -> None:
        super()._replay_records(records)
        if self._writer and not self._log_behind:
            for data in records:
                LogBackend._append(self, data)
            self._durable[_LOG_END] = self._log.end_offset
            self._replayed = True
            if self._adopted:
                self._write_snapshot()

    def _replay_each(self, records: list[bytes]) -> None:
        if not self._restoring:
            # Records of core operations (ops "image_..."): the replica
            # has nothing to apply, so they are not even unpickled.
            records = [data for data in records
                       if data[_OP_AT:_OP_AT + len(_IMAGE_OP)] != _IMAGE_OP]
        super()._replay_each(records)

    def _reserve(self, op: str, data: bytes) -> bytes:
        # After a failed append the log misses a record that the journal
        # has, so no later operation may run (`_logged` checks the same).
        if self._failed is not None:
            raise self._failed_error()
        return ShmBackend._reserve(self, op, data)

    def _fail_append(self, exc: BaseException) -> None:
        super()._fail_append(exc)
        # Threads and processes that wait for the record's sync would
        # wait for ever: the log will not reach it.
        self._durable[_FAILED] = _WRITE_FAILED
        self._journal.signal(DURABLE)

    def _append(self, data: bytes) -> None:
        # Append to the journal, store the position as this thread's mark
        # under "always", and append to the log when this process is the
        # writer and its log is not behind.
        self._lock.append_record(data)

    def _position(self) -> int:
        return (self._generation << 32) | self._applied

    def _set_log_mark(self) -> None:
        self._log_state = (self._log, self._position())

    def _restore_or_wait(self) -> None:
        """Restore a new journal from the log, or wait for the process
        that has the writer lock to do it. The caller holds the mutex."""
        deadline = time.monotonic() + RESTORE_WAIT_S
        while not self._try_writer_lock():
            # The writer restores it once it gets the mutex.
            self._leave_shared()
            if time.monotonic() >= deadline:
                raise LogLocked(
                    errno.EAGAIN,
                    f"log broker {self.path!r} has a new journal, but "
                    f"another process has held its writer lock for "
                    f"{RESTORE_WAIT_S:g} s "
                    f"without restoring it (it uses a journal that was "
                    f"removed); close that process",
                    os.path.join(self.path, LOCK))
            time.sleep(0.01)
            # The restore changes the state outside the journal's records,
            # so this replica must load the snapshot that ends it.
            self._generation = -1
            self._applied = 0
            # ShmBackend._enter_shared without this class's checks after
            # the catch-up, which would call this method again.
            if self._closed:
                raise ShutDown(f"log broker {self.path!r} is closed")
            if self._journal.lock():
                self._lock_recovered()
            ShmBackend._enter_locked(self)
            if self._journal.position()[0] != 0:
                return
        self._restore()

    def _restore(self) -> None:
        """Replay the log into this replica and publish it as the first
        generation of a new journal. The caller holds the mutex and the
        writer lock."""
        self._check_directory()
        self._durable[_DURABLE] = 0
        self._durable[_FAILED] = 0
        # No log is this journal's yet: `_write_snapshot` below writes one.
        self._durable[_LOG_ID] = 0
        self._reset_state()
        if self._log is not None:
            log, self._log = self._log, None
            close_segment_log(log, self.path)

        name = read_checked_current(self.path)
        if name is None:
            _check_empty(self.path)
            self._log_name = ""
            LogBackend._compact(self)
        else:
            self._remove_stale_logs(name)
            self._raw_bodies = False
            self._images = {}
            self._prefetches = {}
            # As in a journal replay: the core files named by the records
            # belong to processes that are gone, and nothing touches them.
            self._restoring = self._replaying = True
            try:
                LogBackend._replay(self, name)
            finally:
                self._restoring = self._replaying = False
            if self._raw_bodies:
                self._pickle_bodies()
        self._log_behind = False
        self._rebuild_cores()
        self._close_stale_consumers()

        # The journal's first generation: other processes load this
        # replica from its snapshot, since the records of generation 0
        # do not contain the restore.
        ShmBackend._compact(self, tail=False)
        self._write_snapshot()

    def _load_snapshot(self, data: bytes) -> tuple:
        format_ = super()._load_snapshot(data)
        # Records of a LogBackend log, snapshot and operations alike,
        # hold bodies as objects.
        self._raw_bodies = format_ in _OBJECT_BODY_FORMATS
        return format_

    def _pickle_bodies(self) -> None:
        """Pickle the bodies of a replayed LogBackend log, once per record."""
        seen: set[int] = set()
        for state in self._topics.values():
            records = list(state.store.values())
            records += [entry.record for group in state.groups.values()
                        for entry in group.entries.values()]
            records += [record for _, record in state.dlq.values()]
            for record in records:
                if id(record) not in seen:
                    seen.add(id(record))
                    record.body = pickle.dumps(
                        record.body, protocol=pickle.HIGHEST_PROTOCOL)
            for key, (letter, record) in list(state.dlq.items()):
                state.dlq[key] = (dataclasses.replace(
                    letter, body=record.body), record)
        logger.info("log broker %s: converted a single-process log, whose "
                    "bodies are objects, to format %r", self.path,
                    SHARED_FORMAT)

    def _write_snapshot(self) -> None:
        """Write the replica into a new log with a new incarnation id and
        switch to it. The caller holds the mutex and is the writer."""
        self._check_directory()
        self._check_log()
        self._adopted = False
        old = self._log_name
        # The store order keeps the words valid for `_log_mismatch` if
        # the process dies between any two of them.
        incarnation = _new_incarnation()
        self._durable[_NEXT_LOG_ID] = incarnation
        LogBackend._compact(self, _incarnation_key(incarnation))
        self._durable[_LOG_NUMBER] = int(self._log_name[4:])
        self._durable[_LOG_ID] = incarnation
        self._durable[_LOG_END] = self._log.end_offset
        self._durable[_NEXT_LOG_ID] = 0
        self._durable[_SNAPSHOT_DUE] = 0
        self._set_log_mark()
        self._log_behind = False
        if old and old != self._log_name:
            shutil.rmtree(os.path.join(self.path, old), ignore_errors=True)
        self._publish_durable(self._log_state[1])

    def _after_write(self) -> None:
        if self._writer and not self._log_behind \
                and self._bytes_since_snapshot > self._compact_bytes:
            self._write_snapshot()

    # Operations. Plain topics are on topic cores, as for the shm
    # backend, and the others on the journal; `ShmBackend` chooses.

    def publish(self, topic: str, envelopes: Sequence[Envelope],
                timeout: float | None) -> list[str]:
        try:
            return ShmBackend.publish(self, topic, envelopes, timeout)
        finally:
            if self.fsync == "always":
                self._sync(self._log)

    def publish_one(self, topic: str, body: Any, priority: int
                    ) -> str | None:
        # `__init__` hides this method behind `LoggedPath.publish_one`,
        # which runs it in C: the section, the core's publish and its
        # ``image_publish`` record, then the sync of "always".
        message_id: str | None = self._fast.publish_one(topic, body,
                                                        priority)
        return message_id

    def _publish_core(self, core: Any, topic: str,
                      envelopes: Sequence[Envelope],
                      encoded: Sequence[tuple[bytes, bytes]]
                      ) -> tuple[list[str], bool]:
        # One section and one record (per journal-sized chunk) for the
        # batch, through `_core_published`.
        with self._lock:
            if self._failed is not None:
                raise self._failed_error()
            if topic not in self._core_paths:
                # The catch-up applied a delete or a move: `publish` goes
                # on with the journal.
                return [], False
            # The core of the topic now, which a delete and a declare by
            # another process may have replaced.
            return ShmBackend._publish_core(self, self._core(topic)._core,
                                            topic, envelopes, encoded)

    def _core_published(self, topic: str, stored: list[tuple]) -> None:
        budget = self._max_record // 2
        chunk: list[tuple] = []
        size = 0
        for item in stored:
            if chunk and size + len(item[3]) > budget:
                self._log_core("image_publish_many", topic, chunk)
                chunk, size = [], 0
            chunk.append(item)
            size += len(item[3]) + 32
        self._log_core("image_publish_many", topic, chunk)

    def fetch(self, topic: str, group: str, consumer: str, max_items: int,
              *, ack_timeout: float, auto_ack: bool,
              timeout: float | None) -> list[Delivery]:
        found = ShmBackend.fetch(self, topic, group, consumer, max_items,
                                 ack_timeout=ack_timeout, auto_ack=auto_ack,
                                 timeout=timeout)
        if found and auto_ack and self._sync_acks:
            self._sync(self._log)
        return found

    def _fetch_now(self, topic: str, group: str, consumer: str,
                   max_items: int, ack_timeout: float, auto_ack: bool
                   ) -> list[Delivery]:
        # `fetch` without the sync wait of sync_acks, which `fetch_async`
        # awaits off the event loop's thread.
        return ShmBackend.fetch(self, topic, group, consumer, max_items,
                                ack_timeout=ack_timeout, auto_ack=auto_ack,
                                timeout=0)

    async def fetch_async(self, topic: str, group: str, consumer: str,
                          max_items: int, *, ack_timeout: float,
                          auto_ack: bool, timeout: float | None
                          ) -> list[Delivery]:
        found = await super().fetch_async(
            topic, group, consumer, max_items, ack_timeout=ack_timeout,
            auto_ack=auto_ack, timeout=timeout)
        if found and auto_ack and self._sync_acks \
                and self.fsync == "always":
            # No await since the fetch, so this thread's mark is its
            # record's.
            await self._sync_async(getattr(self._local, "mark", 0))
        return found

    async def _sync_async(self, target: int) -> None:
        """Await `_sync` up to journal position `target` in a worker
        thread, so the event loop runs meanwhile.

        The deliveries being synced are acked already, so a cancellation
        does not stop the wait: it finishes, the deliveries are returned,
        and the cancellation is requested again for the caller's next
        await.
        """
        future = asyncio.get_running_loop().run_in_executor(
            None, self._sync, self._log, target)
        task = asyncio.current_task()
        assert task is not None
        cancelled = False
        while not future.done():
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError:
                # Withdrawn here and requested once more below.
                task.uncancel()
                cancelled = True
        future.result()
        if cancelled:
            task.cancel()

    def ack(self, topic: str, group: str, tag: Any) -> bool:
        if len(tag) != 5:
            result = self._ack_journal(topic, group, tag)
            if result is not None:
                return result
        result = self._ack_logged(topic, group, tag)
        if result is None:
            result = ShmBackend.ack(self, topic, group, tag)
        if self._sync_acks:
            self._sync(self._log)
        return result

    def ack_many(self, topic: str, group: str, tags: Sequence[Any]
                 ) -> list[bool]:
        tags = list(tags)
        if not tags or not all(len(tag) == 5 for tag in tags):
            return ShmBackend.ack_many(self, topic, group, tags)
        # Tags of a core: under sync_acks one sync after the last ack
        # covers every record before it, so the batch waits once.
        results = []
        for tag in tags:
            result = self._ack_logged(topic, group, tag)
            if result is None:
                result = ShmBackend.ack(self, topic, group, tag)
            results.append(result)
        if self._sync_acks:
            self._sync(self._log)
        return results

    def _ack_logged(self, topic: str, group: str, tag: Any) -> bool | None:
        """Ack a core delivery as `_LoggedCore.ack` does, without the
        slot lookup (the tag has the seq) and without the sync of
        sync_acks. Return None when
        the tag's core is not the topic's, so the caller goes on with
        `ShmBackend.ack`."""
        core = self._cores.get(topic)
        if core is None or core.path != tag[0]:
            return None
        try:
            with self._lock:
                if self._failed is not None:
                    # The ack's record could not be logged.
                    raise self._failed_error()
                if self._cores.get(topic) is not core:
                    raise TopicRetired(topic)
                result: bool = core._core.ack(tag[1], tag[2], tag[3])
                if result:
                    self._log_core("image_ack", topic, group, tag[4])
        except TopicRetired:
            return None
        return result

    def nack(self, topic: str, group: str, tag: Any, *, requeue: bool,
             delay: float | None, error: str | None) -> bool:
        result = ShmBackend.nack(self, topic, group, tag, requeue=requeue,
                                 delay=delay, error=error)
        if self._sync_acks and len(tag) == 5:
            self._sync(self._log)
        return result

    # Topic cores: each change that a restore must rebuild is logged
    # (see `mqs.broker._coreimage`).

    def _core(self, topic: str) -> Any:
        handle = self._cores.get(topic)
        if handle is None:
            handle = self._cores[topic] = _LoggedCore(
                self, topic, self._open_core(self._core_paths[topic]))
        return handle

    def _create_core(self, config: TopicConfig) -> str:
        path = ShmBackend._create_core(self, config)
        self._cores[config.name] = _LoggedCore(self, config.name,
                                               self._cores[config.name])
        return path

    def _bind_section_paths(self) -> None:
        super()._bind_section_paths()
        section = self._lock
        assert isinstance(section, _SharedSection)
        # The C version of `_log_core`, as for `_append` and the others.
        self._log_core = section.log_core

    def _log_core(self, op: str, *args: Any) -> None:
        """Append the record of a core operation; the caller holds the
        section. No replica applies it, because they share the core, and
        `_restore` replays it into `_images`. (`_bind_section_paths`
        hides this method behind the section's C version.)"""
        # `encode_record` without its check for a publish, which core
        # operations never are, because this runs three times per message.
        now = self._tick()
        self._append(self._reserve(op, _dumps((op, now, args), _PROTOCOL)))
        if self._bytes_since_snapshot > self._compact_bytes:
            self._after_write()

    def _image(self, topic: str) -> CoreImage | None:
        return self._images.get(topic) if self._restoring else None

    def _do_image_publish(self, topic: str, seq: int, priority: int,
                         timestamp: float, payload: bytes) -> None:
        image = self._image(topic)
        if image is not None:
            image.publish(seq, priority, timestamp, payload)

    def _do_image_publish_many(self, topic: str, items: list[tuple]
                              ) -> None:
        image = self._image(topic)
        if image is not None:
            for seq, priority, timestamp, payload in items:
                image.publish(seq, priority, timestamp, payload)

    def _do_image_group(self, topic: str, group: str, earliest: bool,
                       max_attempts: int | None) -> None:
        image = self._image(topic)
        if image is not None:
            image.open_group(group, earliest, max_attempts)

    def _do_image_deliver(self, topic: str, group: str, auto_ack: bool,
                         items: list[tuple[int, int, int]], consumer: int,
                         ack_timeout: float) -> None:
        image = self._image(topic)
        index = None if image is None else image.group_index(group)
        if index is not None:
            image.deliver(index, items, auto_ack, consumer,
                          self._now + ack_timeout)

    def _do_image_ack(self, topic: str, group: str, seq: int) -> None:
        image = self._image(topic)
        index = None if image is None else image.group_index(group)
        if index is not None:
            image.ack(index, seq)

    def _do_image_nack(self, topic: str, group: str, seq: int,
                      requeue: bool) -> None:
        image = self._image(topic)
        index = None if image is None else image.group_index(group)
        if index is not None:
            image.nack(index, seq, requeue)

    def _do_image_release(self, topic: str, group: str, seqs: list[int]
                         ) -> None:
        image = self._image(topic)
        index = None if image is None else image.group_index(group)
        if index is not None:
            image.release(index, seqs)

    def _do_core_dead(self, topic: str, letters: list[tuple]) -> None:
        super()._do_core_dead(topic, letters)
        image = self._image(topic)
        if image is not None:
            for letter in letters:
                image.drop_dead(letter[0], letter[1], letter[3])

    def _do_declare(self, config: TopicConfig, seed: int,
                    core_path: str | None = None) -> None:
        new = config.name not in self._topics
        super()._do_declare(config, seed, core_path)
        if self._restoring and new and core_path is not None:
            self._images[config.name] = CoreImage(
                max_attempts=config.max_attempts)

    def _do_delete(self, topic: str) -> None:
        self._images.pop(topic, None)
        super()._do_delete(topic)

    def _move_to_journal(self, topic: str) -> None:
        super()._move_to_journal(topic)
        if self._adopted and self._writer and not self._log_behind:
            self._write_snapshot()

    def _do_adopt(self, topic: str, path: str) -> None:
        if not self._restoring:
            super()._do_adopt(topic, path)
            # The state a move hands to the journal contains what the
            # records do not (the scheduler's place, tickets, the ready
            # order as deadlines left it), so a replay of the log could not
            # rebuild it exactly. The writer writes a snapshot after the move,
            # right after its own move or once it has appended another
            # process's.
            self._adopted = True
            return
        # Restoring a log whose writer stopped between a move and the
        # snapshot after it (a power loss within that time). The adopt
        # file in /dev/shm is gone, so the state comes from the image.
        # It has the messages, entries and attempts, but not the
        # scheduler's place, nor the tickets of deliveries made before
        # the last snapshot. The records after the move then replay
        # against a state in which a fetch may take another message. An
        # ack or nack whose tag no longer matches is then stale, so its
        # message is delivered again (at-least-once).
        image = self._images.pop(topic, None) or CoreImage()
        self._core_paths.pop(topic, None)
        self._adopt_image(topic, image)

    def _do_open(self, topic: str, group: str, consumer: str, start: str,
                 prefetch: int, max_attempts: int | None, slot: int = -1,
                 token: int = 0, core: tuple[int, int, int] | None = None
                 ) -> None:
        super()._do_open(topic, group, consumer, start, prefetch,
                         max_attempts, slot, token, core)
        if self._restoring and core is not None:
            self._prefetches[consumer] = prefetch

    def _adopt_image(self, topic: str, image: CoreImage) -> None:
        """Fill the placeholder state of `topic` from `image`, as a move
        to the journal does from a core's export, with the core
        consumers the replay has open (a restore closes them after)."""
        state = self._topics[topic]
        consumers = {}
        registered = []
        for consumer, entry in list(self._core_consumers.items()):
            if entry[0] == topic:
                _, group_index, number, owner = entry
                consumers[number] = consumer
                registered.append((number, group_index,
                                   self._prefetches.get(consumer, 1), owner))
                del self._core_consumers[consumer]
        data = image.export_data(len(state.config.lanes), self._now,
                                 registered)
        _adopt_core_state(state, data, consumers, self._now)

    def _load_snapshot_extra(self, extra: list) -> None:
        images = extra[0] if extra else {}
        self._images = {}
        for topic, image in images.items():
            if topic in self._topics:
                self._images[topic] = CoreImage(
                    image, self._topics[topic].config.max_attempts)
                self._core_paths[topic] = ""

    def _snapshot_extra(self) -> tuple:
        images = {}
        for topic in self._core_paths:
            if self._restoring:
                image = self._images.get(topic) or CoreImage()
                data = image.image()
                data["histograms"] = image.histograms
            else:
                core = self._core(topic)
                data = core.export_image()
                data["histograms"] = core.group_histograms()
            images[topic] = data
        return (images,)

    def _rebuild_cores(self) -> None:
        """After a restore, load each core topic's image into a new core
        (or into the journal if no core can take it). No consumer of the
        log's processes is left, so none of theirs stays registered."""
        images, self._images = self._images, {}
        for consumer, entry in list(self._core_consumers.items()):
            del self._core_consumers[consumer]
            self._owners.pop(consumer, None)
        for topic in list(self._core_paths):
            image = images.get(topic) or CoreImage()
            config = self._topics[topic].config
            path = None
            try:
                path = self._create_core(config)
                data = image.image()
                # The consumers that held the in-flight entries are gone:
                # count them as closing those consumers does.
                count_returned(data)
                self._cores[topic].import_image(data)
                self._cores[topic].set_group_histograms(image.histograms)
            except (OSError, ValueError) as exc:
                logger.warning(
                    "log broker %s: topic %r goes to the journal, because "
                    "a new topic core could not take its state: %s",
                    self.path, topic, exc)
                handle = self._cores.pop(topic, None)
                if handle is not None:
                    handle.close()
                if path is not None:
                    _unlink_files([path])
                del self._core_paths[topic]
                self._adopt_image(topic, image)
                continue
            self._core_paths[topic] = path


    # Durability.

    def _publish_durable(self, mark: int) -> None:
        if mark > self._durable[_DURABLE]:
            self._durable[_DURABLE] = mark
        self._journal.signal(DURABLE)

    def _flush_log(self) -> None:
        """Sync the log (under "always") and publish how far it is
        durable. The writer calls it outside the section."""
        log, mark = self._log_state
        if log is None or mark <= self._durable[_DURABLE]:
            return
        if self.fsync == "always" or self._durable[_ALWAYS_USED]:
            self._sync_writer_log(log)
        # Every thread whose records one sync covered gets here. Only the
        # first to store a higher position wakes the waiters, which check
        # the position after they register and before they park.
        if mark > self._durable[_DURABLE]:
            self._publish_durable(mark)

    def _sync(self, log: Any, target: int | None = None) -> None:
        """Return once the log is durable up to journal position `target`,
        by default this thread's last record (under "always").

        Raises ShutDown when the broker is closed before that, also by
        another thread while this one waits.
        """
        if self.fsync != "always":
            return
        if target is None:
            target = getattr(self._local, "mark", 0)
        if self._closed:
            raise ShutDown(f"log broker {self.path!r} is closed")
        if self._durable[_DURABLE] >= target:
            return
        # Counted in `_waiting` under the thread lock, as in
        # `ShmBackend._wait_for_change`. `close` sets `_closed`, then waits
        # up to 1 s for the counted threads before it unmaps the journal
        # that this thread parks on and releases the durable words.
        section = self._lock
        assert isinstance(section, _SharedSection)
        with section.thread_lock:
            if self._closed:
                raise ShutDown(f"log broker {self.path!r} is closed")
            self._waiting += 1
        try:
            self._wait_durable(target)
        finally:
            with section.thread_lock:
                self._waiting -= 1

    def _wait_durable(self, target: int) -> None:
        """Wait until the log is durable up to `target`, for `_sync`."""
        while True:
            # First, because `close` releases what the checks below read.
            if self._closed:
                raise ShutDown(f"log broker {self.path!r} is closed")
            if self._durable[_DURABLE] >= target:
                return
            if self._failed is not None:
                raise self._failed_error()
            if self._durable[_FAILED] in (_DIRECTORY_REPLACED,
                                          _LOG_REPLACED):
                raise self._stopped_error()
            if self._durable[_FAILED]:
                raise BackendUnavailable(
                    f"log broker {self.path!r}: the writer process failed "
                    f"to append or sync the log; close the broker in every "
                    f"process and check the disk")
            if self._writer and not self._log_behind:
                self._flush_log()
                continue
            epoch = self._journal.wait_prepare(DURABLE)
            if self._durable[_DURABLE] >= target:
                self._journal.cancel_wait(DURABLE)
                return
            self._journal.wait(epoch, TAKEOVER_INTERVAL_S, DURABLE)

    # The log thread: takeover, catch-up and group commit.

    def _segment_fsync(self) -> str:
        # Under "always" the segment log syncs by itself every
        # `fsync_interval_s` too, which makes the acks of this process
        # durable when no publish syncs after them.
        return "interval" if self.fsync == "always" else self.fsync

    def _start_thread(self) -> None:
        self._thread = threading.Thread(
            target=self._run_log_thread, daemon=True,
            name=f"mqs-log-writer-{os.path.basename(self.path)}")
        self._thread.start()

    def _caught_up(self) -> bool:
        """Return whether the log contains every journal record. It reads
        without the mutex, so a stale result costs one idle round or one
        wait of at most `TAKEOVER_INTERVAL_S`."""
        return not self._log_behind and self._journal.position() == (
            self._generation, self._applied)

    def _sync_due(self) -> bool:
        """Return whether the log thread has records of other processes
        to sync (writer only).

        This process's threads sync their own records. Its acks, which do
        not wait for a sync, are synced by the next sync of a publish or
        by the segment log's own flusher (see `_segment_fsync`)."""
        return self._others_mark > self._durable[_DURABLE]

    def _recovery_snapshot_due(self) -> bool:
        """Return whether a process found the journal mutex's holder dead
        since the last snapshot (see `_lock_recovered`), unless a failed
        append stopped every write."""
        return bool(self._durable[_SNAPSHOT_DUE]) and self._failed is None

    def _sync_for_interval(self) -> None:
        """Sync the log every `fsync_interval_s` while it has unsynced
        records, for the processes that opened with "interval" (writer
        under "never" only, from the log thread). The thread wakes at
        least every `TAKEOVER_INTERVAL_S`, which adds to the bound."""
        log = self._log_state[0]
        now = time.monotonic()
        if log is None or now < self._next_interval_sync:
            return
        if log.synced_offset >= log.end_offset:
            return
        self._next_interval_sync = now + self._fsync_interval_s
        self._sync_writer_log(log)

    def _sync_writer_log(self, log: Any) -> None:
        """Sync `log`, the writer's. A failed sync makes the operations
        of every process raise, because their records may be lost."""
        try:
            log.flush()
        except ValueError:
            # A snapshot closed this log after syncing its records.
            if not log.closed:
                raise
        except BaseException:
            self._durable[_FAILED] = _WRITE_FAILED
            self._journal.signal(DURABLE)
            raise

    def _run_log_thread(self) -> None:
        next_check = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + DIRECTORY_CHECK_INTERVAL_S
                    if self._directory_replaced() or self._log_replaced():
                        # Every section raises from now on.
                        return
                if not self._writer:
                    if not self._try_writer_lock():
                        self._stop.wait(TAKEOVER_INTERVAL_S)
                        continue
                    logger.info("log broker %s: process %d took over the "
                                "log", self.path, os.getpid())
                # Before the wait below, which may go on idle rounds
                # without reaching the end of this loop.
                if self.fsync == "never" and self._durable[_INTERVAL_USED]:
                    self._sync_for_interval()
                # Only commits of other processes wake this thread, so
                # that it does not take the GIL once per commit.
                epoch = self._journal.wait_prepare(WRITER)
                if self._caught_up() and not self._sync_due() \
                        and not self._recovery_snapshot_due():
                    self._journal.wait(epoch, TAKEOVER_INTERVAL_S, WRITER)
                    if self._caught_up() and not self._sync_due() \
                            and not self._recovery_snapshot_due():
                        continue
                else:
                    self._journal.cancel_wait(WRITER)
                if not self._caught_up() or self._recovery_snapshot_due():
                    with self._lock:
                        if self._recovery_snapshot_due():
                            self._write_snapshot()
                if self._sync_due():
                    self._flush_log()
            except ShutDown:
                return
            except Exception:
                logger.exception("log broker %s: the writer thread failed; "
                                 "retrying in 1 s", self.path)
                self._stop.wait(1.0)

    def _log_replaced(self) -> bool:
        """Return whether a process found the directory or its log
        replaced. The writer checks that CURRENT still names its log
        first."""
        if self._writer and not self._replacement_marked() \
                and _read_current(self.path) != self._log_name:
            try:
                # A snapshot switches CURRENT and `_log_name` together
                # inside the section.
                with self._lock:
                    name = _read_current(self.path)
                    if name is None:
                        # shutil.rmtree removes CURRENT before broker.id
                        # when readdir lists it first (tmpfs on Linux 6.18
                        # lists the newest entry first), so the caller's
                        # directory check still passed.
                        self._mark_directory_replaced()
                    elif name != self._log_name:
                        self._mark_log_replaced(
                            f"{CURRENT} names {name}, but this process "
                            f"appends to {self._log_name}")
            except BackendUnavailable:
                if not self._replacement_marked():
                    raise
        if not self._replacement_marked():
            return False
        # Every section of this process takes the Python path, which
        # raises.
        self._enter_slow = True
        return True

    def _stop_thread(self) -> None:
        self._stop.set()
        if self._journal is not None:
            self._journal.signal(WRITER)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(10)

    # Closing.

    def close(self) -> None:
        """Close this process's use of the broker. Idempotent.

        The writer appends and syncs what it has not yet, then frees the
        writer lock for another process. The last process writes a
        snapshot and removes the journal (see the module docs). If the
        directory or its log was replaced meanwhile, nothing is written,
        and the last process removes the journal.
        """
        if self._closed:
            return
        self._stop_thread()
        last = False
        try:
            fcntl.flock(self._users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            last = True
        except BlockingIOError:
            pass
        try:
            if self._stopped():
                if last:
                    _unlink_own_journal(self.shm_name)
            elif last:
                self._wait_writer_lock(10.0)
            if self._writer and not self._stopped():
                self._close_log(last)
        finally:
            ShmBackend.close(self)
            self._writer = False
            self._wakes_writer = True
            self._release_files()

    def _stopped(self) -> bool:
        """Return whether the directory or its log was replaced, so that
        this process must write nothing more."""
        return self._directory_replaced() or self._replacement_marked()

    def _close_log(self, last: bool) -> None:
        """Bring the log up to the journal and sync it (writer only). The
        `last` process also writes a snapshot and removes the journal."""
        try:
            with self._lock:
                changed = self._bytes_since_snapshot \
                    or self._recovery_snapshot_due()
                if self._log_behind or (last and changed):
                    self._write_snapshot()
        except BackendUnavailable:
            if not self._replacement_marked():
                raise
            # `_check_log` found a restored log or a removal in progress.
            # The next open restores from a restored log once the journal
            # is gone.
        else:
            if self._failed is None and self._log is not None:
                self._log.flush()
                self._publish_durable(self._log_state[1])
        if last:
            _unlink_own_journal(self.shm_name)

    def _after_fork_in_child(self) -> None:
        # The child shares the parent's lock descriptions: dropping them
        # here keeps the parent's locks, and the child takes its own.
        _inherited.append(self._log)
        self._log = None
        self._writer = False
        self._wakes_writer = True
        self._log_behind = False
        self._log_state = (None, 0)
        self._local = threading.local()
        self._stop = threading.Event()
        for fd in (self._lock_fd, self._users_fd):
            if fd >= 0:
                os.close(fd)
        self._lock_fd = self._users_fd = -1
        super()._after_fork_in_child()
        if self._closed:
            return
        self._users_fd = _open_file(os.path.join(self.path, USERS))
        fcntl.flock(self._users_fd, fcntl.LOCK_SH)
        self._lock_fd = _open_file(os.path.join(self.path, LOCK))
        self._start_thread()

    # Snapshot and tail files of the journal (ShmBackend names them
    # after `path`).

    def _files_base(self) -> str:
        return self._journal_file

    def _size_advice(self) -> str:
        journal_bytes = self._journal.journal_bytes
        if self._segment_bytes < journal_bytes:
            return (f"That is at most half a log segment (segment_bytes="
                    f"{self._segment_bytes}, which the broker keeps while "
                    f"any process has it open). Close the broker in every "
                    f"process and open it with a larger segment_bytes, or "
                    f"send smaller messages.")
        return (f"That is half its journal of {journal_bytes} bytes, which "
                f"keeps its size while any process has the broker open. "
                f"Close the broker in every process and open it again with "
                f"a larger journal_bytes (the log keeps its topics and "
                f"messages), or send smaller messages.")

    @property
    def _label(self) -> str:
        """Name the broker in messages by its directory, not by the shm
        broker that serves it."""
        return f"log broker {getattr(self, 'path', self.shm_name)!r}"

    def __repr__(self) -> str:
        return f"<SharedLogBackend {self.path!r} fsync={self.fsync!r}>"


def _delivery_id(delivery: Delivery) -> str:
    return delivery.id


def _unpickled(delivery: Delivery) -> Delivery:
    """Return `delivery` with its body unpickled (built by position
    through tuple.__new__, because `_replace` takes twice as long)."""
    return _new_tuple(Delivery, (*delivery[:4], pickle.loads(delivery.body),
                                 *delivery[5:]))


def _log_missing(path: str) -> bool:
    """Return whether the log broker directory `path` lacks CURRENT or
    the log that CURRENT names."""
    name = _read_current(path)
    return name is None or not os.path.isdir(os.path.join(path, name))


def _log_replaced_message(path: str) -> str:
    return (f"log broker {path!r}: the log in the directory was replaced "
            f"(a backup restored?) while processes had the broker open, "
            f"so they write nothing more into it; close the broker in "
            f"every process, and the next open restores it from the log "
            f"in the directory")


def _replaced_message(path: str) -> str:
    return (f"log broker {path!r}: the directory was removed or replaced "
            f"after this process opened the broker, so nothing reaches its "
            f"log any more; close the broker and open it again")


def _check_journal_bytes(journal_bytes: Any) -> None:
    if isinstance(journal_bytes, bool) or not isinstance(
            journal_bytes, int):
        raise TypeError(
            f"journal_bytes must be an int, got "
            f"{type(journal_bytes).__name__} {journal_bytes!r}")
    if not MIN_BYTES <= journal_bytes <= MAX_BYTES or journal_bytes % 8:
        raise ValueError(
            f"journal_bytes must be a multiple of 8 from {MIN_BYTES} "
            f"to {MAX_BYTES}, got {journal_bytes!r}")


def _open_file(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _init_durable_file(fd: int) -> None:
    """Size a new durable file and store its version."""
    os.ftruncate(fd, _DURABLE_FILE_BYTES)
    os.pwrite(fd, _DURABLE_VERSION.to_bytes(8, sys.byteorder, signed=True),
              _VERSION * 8)


def _map_durable(fd: int) -> memoryview:
    """Map the durable file open at `fd` as two int64 words.

    Only the writer stores the words, and readers compare them with
    their own positions.

    NOTE: CPython stores a memoryview item with an 8-byte memcpy, which
    compilers emit as one aligned store on x86-64 and aarch64 (atomic
    there), but no standard promises it.
    """
    if os.fstat(fd).st_size < _DURABLE_FILE_BYTES:
        os.ftruncate(fd, _DURABLE_FILE_BYTES)
    mapping = mmap.mmap(fd, _DURABLE_FILE_BYTES)
    return memoryview(mapping).cast("q")


def _close_at_exit() -> None:
    """Close the log brokers this process left open when the interpreter
    exits normally, so that the last process of a broker moves its
    journal into the log and removes it from /dev/shm, as `close` does.
    Registered at import, so it runs after the exit hooks that flush
    producers (atexit runs the last registered first)."""
    for backend in list(_instances):
        if isinstance(backend, SharedLogBackend) and not backend._closed:
            try:
                backend.close()
            except Exception:
                logger.exception("log broker %s: closing it at exit failed; "
                                 "its journal stays in /dev/shm until the "
                                 "next open or mqs clean", backend.path)


atexit.register(_close_at_exit)
