"""The ``shm`` backend: one broker shared by every process of a machine.

``Broker(backend="shm", name=...)`` opens the broker called `name`,
creating it if missing. Every process that opens the same name shares
its topics, settings, messages, groups, in-flight tables, dead letters,
counters and rate-limit buckets.

Design: topic cores for the common path, a replicated journal for the rest
    The broker is one file in /dev/shm, ``mqs.broker.<name>`` (mode
    0600, created under a private name and linked into place, so no process
    maps a half-formatted file), laid out by ``csrc/mqs_journal.h``: a
    robust process-shared mutex, a change wait word (a futex), the
    liveness slots of the processes, and a journal of operations. Each
    record is one operation exactly as the ``log`` backend records it:
    the pickled tuple ``(op, now, args)`` with its broker time ``now``,
    message and consumer ids from replicated counters and the seed of
    each topic's retry jitter. Every process keeps a replica of the
    state recorded there (a `TopicState` per topic). Under the mutex it
    first replays the records it has not applied yet, then runs its own
    operation on its replica and appends the record, so all replicas
    pass through the same states in the same order. A commit bumps the
    wait word, which wakes a blocked `fetch` or `publish` in any process.

    Topic cores. A topic declared without rate limits, ttl, retry
    backoff, retention or ``when_full="drop_oldest"`` starts on a topic
    core (a maxsize that blocks or raises is kept there): a second file,
    ``mqs.broker.<name>.core-<token>`` (`mqs._topiccore.TopicCore`,
    ``csrc/mqs_topiccore.h``), that holds the topic's messages, lanes,
    in-flight table, deadlines, counters and latency histograms as C
    data under its own robust mutex. Publish, fetch, ack, nack (requeue
    at once), extend, release, stats and group stats of such a topic are
    one C call each in the calling process: nothing is replayed and the
    journal mutex is not taken. Declaring the topic, opening and closing
    consumers still go through the journal (so every replica knows the
    core file and which process owns each core consumer), and the
    opening process registers the group and consumer in the core first.
    Message ids on a core are ``s<seq>``; bodies are pickled once and
    stored with headers, reply_to and correlation_id in the core slot.

    The rule of the two paths: a topic is on its core or on the journal,
    never both, and it moves at most once, from core to journal. It
    moves when an operation needs what the core lacks: a message with a
    key, delay, ttl or dedup_id (on a topic with a dedup window), a
    payload over CORE_SLOT_BYTES, a full core (up to CORE_CAPACITY
    messages, fewer when /dev/shm is small: see CORE_MIN_CAPACITY),
    a nack with a delay, an error text or requeue=False, a dead letter
    (the core's max_attempts or ack deadline dead-lettered one), a group,
    consumer or group name past the core's limits, or a new
    configuration. The mover holds the journal mutex, takes the core's
    whole state and marks it retired in one critical section of the core
    (`TopicCore.retire_and_export`), builds the `TopicState` that running
    the same operations would have built (ids, attempts, tickets, lane
    order, deadlines, consumers, counters, histograms, dead letters),
    writes it to ``mqs.broker.<name>.adopt-<token>`` and appends an
    ``adopt`` record naming that file; every replica replaces its
    placeholder state by it on replay. A process still using the core
    gets `TopicRetired` and retries through the journal. The operation
    that caused the move then runs on the journal, behind every message
    the core held, so FIFO within a priority lane holds across the move,
    and tags handed out by the core keep working (``(s<seq>, ticket)`` on
    the journal).

    When the journal has no room for a record, the mutex holder copies
    its records to ``mqs.broker.<name>.tail-<generation>`` in /dev/shm
    and restarts the journal empty under the next generation. Once the
    tails since the last snapshot add up to that snapshot's size, the
    restart also writes its replica (`TopicState.snapshot`, with the core
    files and core consumers) to ``mqs.broker.<name>.snapshot-<next
    generation>`` and removes the older snapshots and tails. A replica
    that had applied every record of the old journal goes on as it is,
    and one that had not applies the rest from the tails. A new replica,
    or one for which that costs less, loads the newest snapshot and
    applies the tails after it. A generation that contains an ``adopt``
    record gets no tail, because the adopted state's file goes with the
    snapshot that its restart then writes. The snapshot lives in its own
    file because its size is that of the stored state, which the fixed
    mapping cannot bound.

    Why both: the broker's rules (weighted lanes, key ordering, per-group
    rate buckets, dedup windows, retry jitter, DLQ headers) live in
    `TopicState` and `mqs.broker._policy`, tested once for every
    backend; the core repeats only the rules of the common path, and a
    hypothesis test drives it against `TopicState`. The journal costs
    throughput: every operation holds one mutex across all topics, and
    every process replays every other process's operations. `mqs bench
    --case broker` measures both.

Time
    Broker time is `time.monotonic`, which is one clock for every
    process on the machine, never below the last recorded ``now``.

Consumers and dead processes
    Each process that opens the broker takes a participant slot (an
    open-file-description lock on one byte of the file, held until the
    process closes the broker or dies) and a token that no later holder
    of the slot gets. A consumer is registered with its process's slot
    and token. Any process that finds a consumer's slot released or
    taken by another token closes that consumer through the journal:
    its in-flight messages go back to the tail of their lanes with
    their attempts kept (the next delivery has ``attempts + 1``). The
    check runs when a process opens the broker, when it finds the
    mutex's previous owner dead, and every `REAP_INTERVAL_S` seconds in
    the operations of each process, a waiting `fetch` included.

What survives what
    A process killed at any instruction: every operation that returned
    before the kill stays. An operation whose record was not committed
    (the mutex holder died before storing the journal position, the
    last step of an append) never happened; one that was committed
    happened, even if its caller never saw the result (a publish whose
    id was not returned is delivered; messages fetched for a consumer of
    the dead process are redelivered). The mutex holder stores shared
    state only as single words, so the next process to take the mutex
    (it gets EOWNERDEAD) marks it consistent and goes on; the dead
    process's consumers are closed as above. A compaction killed before
    it restarted the journal leaves the old journal in force. A process
    killed inside a core's mutex leaves each entry's state in one word
    and commits each publish by one store; the next locker rebuilds the
    lanes and counts from those words (`mqs_tc_repair`), so a publish
    is stored exactly when its commit store happened, and a delivery is
    in flight exactly when its entry word says so. A move to the journal
    killed before its ``adopt`` record leaves the core retired but
    intact: the next process that meets the retired core moves the topic
    again from the same frozen state.
    All processes exit: the broker stays in /dev/shm with its state,
    and the next process to open the name goes on from it, closing the
    consumers of the processes that are gone. `Broker.close` never
    removes it; ``mqs.Broker.unlink(name)`` does.
    Reboot, or /dev/shm cleared: everything is gone; use the ``log``
    backend for messages that must outlive the machine.

Limits
    Bodies, keys, headers and dedup ids must be picklable; anyone who
    can write the broker's files can run code in the processes that
    open it, hence mode 0600. One record must fit in half the journal
    (`journal_bytes`); a bigger publish batch is split, and a bigger
    message raises `MessageTooLarge`. At most 256 processes have a
    broker of one name open at once. A consumer belongs to the process
    that opened it; a child forked after that takes its own slot and
    must open its own consumers. A snapshot holds the mutex while it
    pickles and writes the whole state, so every process waits that long
    (it grows with the messages stored on the journal; those of a topic
    on its core are not part of it), at most about once per
    `journal_bytes` of records: about 0.5 s per million stored messages
    on a 2-vCPU VM. A replica that reloads the snapshot instead of
    applying tails takes longer (see `TopicState.snapshot`). Moving a topic from its core to the journal
    takes a time that grows with its stored messages too. A process stopped
    (SIGSTOP, a debugger) while it holds the mutex stalls every other
    process until it continues or dies.
    A topic core holds at most CORE_GROUPS groups and CORE_CONSUMERS
    open consumers at once, and group names of up to GROUP_NAME_BYTES
    bytes. A consumer past these limits moves the topic to the journal,
    which has none of them. A core consumer whose
    process died between registering it and appending its ``open``
    record stays idle in the core. Repairing a core after a process
    died inside its mutex scans and sorts its stored messages, so that
    pause grows with the backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import pickle
import random
import secrets
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Collection, Sequence
from typing import Any

from mqs import metrics
from mqs._journal import (
    MAX_BYTES,
    MIN_BYTES,
    WRITER,
    JournalSection,
    SharedJournal,
    read_records,
)
from mqs._topiccore import (
    DEAD_REASONS,
    ENTRY_IN_FLIGHT,
    ENTRY_READY,
    GROUP_NAME_BYTES,
    PAYLOAD_BYTES,
    PAYLOAD_EXTRAS,
    CorePath,
    CoreReader,
    TopicCore,
    TopicCoreFull,
    TopicCoreVersionError,
    TopicRetired,
    LIMIT as CORE_LIMIT,
    decode_payload,
)
from mqs.broker._backend import (
    COUNTER_KEYS,
    Backend,
    DeadLetter,
    Delivery,
    Envelope,
    GroupStats,
    decode_each,
    decode_error,
    unpickled_letter,
)
from mqs.broker._log import (
    LogBackend,
    _fetch_is_idle,
    _fetch_is_quiet,
    encode_record,
)
from mqs.broker._memory import (
    MemoryBackend,
    _deleted_while_full,
    _redeclare_changes,
    _stayed_full,
)
from mqs.broker._policy import TopicConfig
from mqs.broker._state import (
    _DEADLINE,
    IN_FLIGHT,
    READY,
    TopicState,
    _Entry,
    _Group,
    _Record,
    replaying,
    warn_drop_count,
)
from mqs.broker._state import logger as _state_logger
from mqs.broker._wakeup import Wakeups
from mqs.errors import (
    BackendUnavailable,
    Full,
    MessageTooLarge,
    ShutDown,
    UnknownTopic,
)

__all__ = ["ShmBackend", "REAP_INTERVAL_S"]

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
PREFIX = "mqs.broker."
# The first field of every snapshot; another format raises. Version 2
# stores each topic as `TopicState.snapshot` columns; version 1, still
# read, stored the `TopicState` objects themselves.
FORMAT = ("mqs.broker.shm", 2)
_FORMATS_READ = (("mqs.broker.shm", 1), FORMAT)
# How often each process checks that the consumers' processes live.
REAP_INTERVAL_S = 0.05
DEFAULT_JOURNAL_BYTES = 16 << 20
# Sizes of each topic core. Files in /dev/shm are sparse and a core uses
# its slots from the lowest up, so a core takes memory for the largest
# backlog it held since it last drained (about 0.6 KiB per message with
# one group), not for its capacity. A core of CORE_CAPACITY maps 5.5 GiB of address space
# with ten lanes.
CORE_CAPACITY = 1 << 22
CORE_SLOT_BYTES = 480
CORE_GROUPS = 8
CORE_CONSUMERS = 512
# A store into a page that /dev/shm has no room for kills the process
# with SIGBUS. So a new core gets the largest power-of-two capacity,
# from CORE_MIN_CAPACITY to CORE_CAPACITY, whose full use (every group
# and lane) takes at most half of the free space of /dev/shm. A topic
# whose core is full moves to the journal, in the heap of each process.
CORE_MIN_CAPACITY = 65536
# Estimate of a full core's bytes per message, from the structs of
# csrc/mqs_topiccore.h: a slot (24 byte header and body), and per group
# an entry (72 bytes) and a 4 byte lane ring index per lane.
CORE_BYTES_PER_MESSAGE = 24 + CORE_SLOT_BYTES + CORE_GROUPS * (72 + 10 * 4)
_EXTRAS = PAYLOAD_EXTRAS

# The fields of an Envelope after body and priority, at their defaults,
# for building one without the keyword handling of Envelope.__new__.
_ENVELOPE_DEFAULTS = Envelope(None)[2:]
_new_tuple = tuple.__new__
_dumps = pickle.dumps
_loads = pickle.loads
_PROTOCOL = pickle.HIGHEST_PROTOCOL

# Every open ShmBackend of this process, given its own slot in a child.
_instances: weakref.WeakSet[ShmBackend] = weakref.WeakSet()


def _check_name(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__} "
                        f"{name!r}")
    if not name or "/" in name or "\0" in name or name in (".", "..") \
            or len(name) > 200:
        raise ValueError(
            f"name must be 1 to 200 characters, not '.' or '..', without "
            f"'/' or NUL, got {name!r}")
    return name


def _journal_path(name: str) -> str:
    return os.path.join(SHM_DIR, PREFIX + name)


def _core_capacity(free_bytes: int) -> int:
    """Return the capacity of a new topic core when /dev/shm has
    `free_bytes` free (see CORE_MIN_CAPACITY)."""
    capacity = CORE_CAPACITY
    while capacity > CORE_MIN_CAPACITY \
            and capacity * CORE_BYTES_PER_MESSAGE > free_bytes // 2:
        capacity //= 2
    return capacity


def _shm_free_bytes() -> int:
    stats = os.statvfs(SHM_DIR)
    return stats.f_bavail * stats.f_frsize


def _core_topic(config: TopicConfig) -> bool:
    """Return whether a topic of `config` starts on a topic core."""
    return (config.rate is None and not config.lane_rates
            and config.ttl is None and config.retry is None
            and config.retention is None
            and (not config.maxsize or config.when_full != "drop_oldest"))


def _core_envelope(envelope: Envelope, config: TopicConfig) -> bool:
    """Return whether a topic core can store `envelope` as it is."""
    return (envelope.key is None and not envelope.delay
            and envelope.ttl is None
            and (envelope.dedup_id is None or not config.dedup_window))


def _encode(envelope: Envelope) -> tuple[bytes, bytes]:
    """Return the core payload of an envelope and its pickled body."""
    body = pickle.dumps(envelope.body, protocol=pickle.HIGHEST_PROTOCOL)
    if not envelope.headers and envelope.reply_to is None \
            and envelope.correlation_id is None:
        return body, body
    extras = pickle.dumps(
        (body, dict(envelope.headers or ()), envelope.reply_to,
         envelope.correlation_id), protocol=pickle.HIGHEST_PROTOCOL)
    return bytes([_EXTRAS]) + extras, body


def _decode(payload: bytes) -> tuple[bytes, dict, str | None, str | None]:
    """Return the pickled body, headers, reply_to and correlation_id of a
    core payload."""
    if payload[0] == PAYLOAD_BYTES:
        return (pickle.dumps(payload[1:], protocol=pickle.HIGHEST_PROTOCOL),
                {}, None, None)
    if payload[0] != _EXTRAS:
        return payload, {}, None, None
    return pickle.loads(memoryview(payload)[1:])


# The backend's `_lock`: this process's thread lock, then the shared mutex
# with the replica brought up to date (in C, see `JournalSection`). The
# inherited `MemoryBackend` and `LogBackend` methods run their operations
# inside ``with self._lock:``, so they need no change.
_SharedSection = JournalSection


class _ChangeWait:
    """The backend's `_changed`: waits for a commit by any process.

    NOTE: it parks on the journal word only, so a change of a topic core
    ends the wait only at the caller's next slice (50 ms in `wait_changed`).
    """

    def __init__(self, backend: ShmBackend) -> None:
        self.backend = backend

    def wait(self, timeout: float) -> None:
        self.backend._wait_for_change(timeout)

    def notify_all(self) -> None:
        # Every commit wakes the waiters when the mutex is released.
        pass


class ShmBackend(LogBackend):
    """Broker state replicated in every process through a shared journal.

    Parameters
    ----------
    name : str
        Broker name; processes that pass the same name share the broker.
    journal_bytes : int
        Size of the journal when this call creates the broker (a
        multiple of 8 from 4096 to 2**31); an existing broker keeps its
        own. A fuller journal means rarer snapshots.

    Raises
    ------
    TypeError, ValueError
        If `name` or `journal_bytes` is invalid.
    mqs._journal.JournalLayoutError
        If the /dev/shm file of that name is not an shm broker of this
        mqs version.
    mqs.LayoutVersionError
        If the journal has another layout version than this mqs reads
        (a subclass of JournalLayoutError), or, at the first use of a
        topic, its topic core has. Every process of one broker must run
        the same mqs version.
    """

    name = "shm"
    # Defaults for subclasses whose __init__ does not run this one's: they
    # keep every topic on the journal.
    _core_topics = False
    _cores: dict[str, TopicCore] = types.MappingProxyType({})  # type: ignore
    _replaying = False
    _guard = None
    _journal_op_context: contextlib.AbstractContextManager[None] = \
        contextlib.nullcontext()
    # The threads that wake awaiting coroutines (made on the first await)
    # and how many journal waiter registrations those coroutines hold.
    _async_wakeups: Wakeups | None = None
    _async_registered = 0
    # `JournalSection` reads these at every section. `_enter_slow` sends
    # entering down the Python path. `_wakes_writer` makes leaving after
    # an append wake the log backend's writer thread. A log backend
    # writer whose log is behind (`_log_behind`) writes a snapshot first.
    _enter_slow = False
    _wakes_writer = False
    # The journal direct paths (`_publish_journal_one` and others) read
    # these. Only the log backend sets them, because only it has a log
    # to compact and to sync.
    _bytes_since_snapshot = 0
    _compact_bytes = math.inf
    _sync_acks = False
    # `JournalSection.append_record` stores each record's position as the
    # thread's mark when this is true (the log backend under "always").
    _marks_records = False
    # Set by an operation that makes nothing deliverable and frees no
    # room (a plain delivery). Leaving the section then wakes no waiter
    # for messages, and clears it.
    _quiet = False
    _log_behind = False
    _writer = False

    def __init__(self, name: str, *,
                 journal_bytes: int = DEFAULT_JOURNAL_BYTES) -> None:
        _check_name(name)
        if isinstance(journal_bytes, bool) or not isinstance(
                journal_bytes, int):
            raise TypeError(
                f"journal_bytes must be an int, got "
                f"{type(journal_bytes).__name__} {journal_bytes!r}")
        if not MIN_BYTES <= journal_bytes <= MAX_BYTES \
                or journal_bytes % 8:
            raise ValueError(
                f"journal_bytes must be a multiple of 8 from {MIN_BYTES} "
                f"to {MAX_BYTES}, got {journal_bytes!r}")
        MemoryBackend.__init__(self, clock=self._read_clock)
        self.shm_name = name
        self.path = _journal_path(name)
        self._offset = 0.0
        self._last = 0.0
        self._now = 0.0
        self._log = None
        self._failed = None
        self._closed = False
        # Open handles of this process on the cores of core topics, and
        # whether the records being applied come from other processes.
        self._core_topics = True
        self._cores = {}
        self._replaying = False
        self._guard = threading.local()
        self._journal_op_context = _JournalOp(self._guard)
        self._reset_state()
        self._generation = -1
        self._applied = 0
        self._held = False
        self._appended = False
        # In the instance dict, where the section reads them first.
        self._enter_slow = False
        self._quiet = False
        self._waiting = 0
        self._next_reap = 0.0
        # The per-message paths on the topic cores, in C. The instance
        # attribute hides the `publish_one` method, so `Broker` calls C
        # directly. `CorePath` reads `_closed`, `_next_reap` and `_cores`
        # on every call.
        self._fast = CorePath(self)
        self.publish_one = self._fast.publish_one  # type: ignore[method-assign]
        self._lock = _SharedSection(self)  # type: ignore[assignment]
        self._bind_section_paths()
        self._changed = _ChangeWait(self)  # type: ignore[assignment]
        self._journal = SharedJournal(self.path, journal_bytes)
        self._max_record = self._journal.journal_bytes // 2
        try:
            self._slot, self._token = self._journal.attach()
        except BaseException:
            self._journal.close()
            raise
        _instances.add(self)
        # Catch up and close the consumers of processes that are gone.
        with self._lock:
            pass

    def _reset_state(self) -> None:
        self._topics = {}
        # The generation in which this replica applied an `adopt` record:
        # the compaction that ends it writes no tail (see `_compact`).
        self._adopted_generation = -1
        self._next_message = 0
        self._next_consumer = 0
        # consumer id -> (topic, group, slot, token) of its process.
        self._owners: dict[str, tuple[str, str, int, int]] = {}
        # Core topics: topic -> core file; consumer id -> (topic, group
        # index, consumer index, owner token) in the core.
        self._core_paths: dict[str, str] = {}
        self._core_consumers: dict[str, tuple[str, int, int, int]] = {}

    # The shared mutex and the replica.

    def _enter_shared(self) -> None:
        """Take the mutex and apply the records this replica lacks."""
        if self._closed:
            raise ShutDown(f"{self._label} is closed")
        if self._journal.lock():
            self._lock_recovered()
        self._enter_locked()

    def _lock_recovered(self) -> None:
        logger.warning("%s: a process died holding the broker mutex; "
                       "checking its consumers", self._label)
        self._next_reap = 0.0

    def _enter_locked(self) -> None:
        """Apply the records this replica lacks; the caller took the
        mutex. `JournalSection` skips this call when nothing is due."""
        self._held = True
        self._appended = False
        generation, used = self._journal.position()
        if generation != self._generation:
            self._catch_up(generation)
            self._generation = generation
            self._applied = 0
        if used > self._applied:
            self._replay_records(self._journal.read(self._applied, used))
            self._applied = used
        if time.monotonic() >= self._next_reap:
            self._reap()

    def _leave_shared(self) -> None:
        # `JournalSection` does the same in C when the section ends.
        if not self._held:
            return
        self._held = False
        self._journal.unlock()
        if self._appended:
            if self._quiet:
                self._quiet = False
            else:
                self._journal.signal()
            if self._wakes_writer:
                self._journal.signal(WRITER)

    def _wait_for_change(self, timeout: float) -> None:
        """Release the section, wait for a commit by anyone (at most
        `timeout` seconds, 50 ms per call) and take the section again."""
        epoch = self._journal.wait_prepare()
        self._waiting += 1
        section = self._lock
        assert isinstance(section, _SharedSection)
        try:
            self._leave_shared()
            section.thread_lock.release()
            try:
                self._journal.wait(epoch, timeout)
            finally:
                section.thread_lock.acquire()
        finally:
            self._waiting -= 1
        self._enter_shared()

    def _replay_records(self, records: list[bytes]) -> None:
        self._replaying = True
        try:
            with replaying():
                self._replay_each(records)
        finally:
            self._replaying = False

    def _replay_each(self, records: list[bytes]) -> None:
        for data in records:
            op, now, args = pickle.loads(data)
            # Exactly the recorded time, even when this process read a
            # later clock for an operation that changed nothing: rate
            # buckets refilled at another time would diverge.
            self._now = now
            self._last = max(self._last, now)
            try:
                self._apply(op, args)
            except Exception:
                # It raised the same way where it first ran.
                logger.debug("replayed %s raised", op, exc_info=True)

    def _catch_up(self, generation: int) -> None:
        """Bring this replica to the start of journal generation
        `generation`: from the tail files of the generations it missed
        when they are complete and cheaper than the snapshot, otherwise
        from the snapshot and the tails after it. The caller holds the
        mutex."""
        if (generation == self._generation + 1
                and self._applied == self._journal.restart_used):
            return
        if 0 <= self._generation < generation:
            snapshots, tails = self._stored_generations()
            needed = range(self._generation, generation)
            base = max((number for number in snapshots
                        if number <= generation), default=None)
            if base is None or base <= self._generation:
                cheaper = True
            else:
                from_tails = sum(tails.get(number, 0) for number in needed)
                from_snapshot = snapshots[base] + sum(
                    tails.get(number, 0)
                    for number in range(base, generation))
                cheaper = from_tails - self._applied <= from_snapshot
            if cheaper and self._apply_tails(needed, self._applied, tails):
                return
        self._load_snapshot_file(generation)

    def _apply_tails(self, generations: range, offset: int,
                     tails: dict[int, int]) -> bool:
        """Apply the records of the tail files of `generations`, the first
        from byte `offset`. Return False when one is missing, does not
        match the journal or is damaged.

        It checks that every file exists and that the last one has the
        size that the last restart ended at before it applies anything,
        so a missing file changes nothing. A damaged file found later
        leaves the replica part way, and the caller then loads the
        snapshot, which resets it."""
        if any(number not in tails for number in generations):
            return False
        if tails[generations[-1]] != self._journal.restart_used \
                or tails[generations[0]] < offset:
            return False
        for number in generations:
            path = self._tail_path(number)
            try:
                with open(path, "rb") as file:
                    file.seek(offset if number == generations[0] else 0)
                    records = read_records(file.read(), 0)
            except (FileNotFoundError, ValueError) as exc:
                logger.warning("%s: tail file %s is unusable (%s); loading "
                               "the snapshot instead", self._label, path,
                               exc)
                return False
            self._replay_records(records)
        return True

    def _load_snapshot_file(self, generation: int) -> None:
        self._reset_state()
        if generation == 0:
            for handle in self._cores.values():
                handle.close()
            self._cores = {}
            return
        snapshots, tails = self._stored_generations()
        base = max((number for number in snapshots if number <= generation),
                   default=generation)
        path = self._snapshot_path(base)
        try:
            with open(path, "rb") as file:
                snapshot = pickle.load(file)
        except FileNotFoundError:
            raise BackendUnavailable(
                f"{self._label}: snapshot {path} is missing "
                f"(the broker was unlinked, or /dev/shm was cleared); "
                f"close it and open it again") from None
        if snapshot[0] not in _FORMATS_READ:
            raise BackendUnavailable(
                f"{self._label} has snapshot format "
                f"{snapshot[0]!r}, this mqs reads {FORMAT!r}; use the mqs "
                f"version that created it")
        (_, self._next_message, self._next_consumer, now, topics,
         self._owners, *cores) = snapshot
        # A snapshot without core topics ends at the owners.
        self._core_paths, self._core_consumers = cores or ({}, {})
        self._now = self._last = max(self._last, now)
        self._topics = {
            name: TopicState.restore(data, self._pinned, self._next_id)
            for name, data in topics.items()}
        for topic in list(self._cores):
            if self._cores[topic].path != self._core_paths.get(topic):
                self._cores.pop(topic).close()
        if base < generation and not self._apply_tails(
                range(base, generation), 0, tails):
            raise BackendUnavailable(
                f"{self._label}: the tail files after snapshot {path} are "
                f"missing or damaged (the broker was unlinked, or /dev/shm "
                f"was cleared); close it and open it again")

    def _files_base(self) -> str:
        """Return the path that this broker's snapshot and tail file names
        start with."""
        return self.path

    def _snapshot_path(self, generation: int) -> str:
        return f"{self._files_base()}.snapshot-{generation}"

    def _tail_path(self, generation: int) -> str:
        return f"{self._files_base()}.tail-{generation}"

    def _stored_generations(self) -> tuple[dict[int, int], dict[int, int]]:
        """Return the sizes of the snapshot files and of the tail files
        in /dev/shm, by generation."""
        base = os.path.basename(self._files_base())
        prefixes = (base + ".snapshot-", base + ".tail-")
        found: tuple[dict[int, int], dict[int, int]] = ({}, {})
        for entry in os.listdir(SHM_DIR):
            for kind, prefix in enumerate(prefixes):
                number = entry[len(prefix):]
                if not (entry.startswith(prefix) and number.isdigit()):
                    continue
                try:
                    size = os.stat(os.path.join(SHM_DIR, entry)).st_size
                except FileNotFoundError:
                    continue
                found[kind][int(number)] = size
        return found

    def _compact(self, tail: bool = True) -> None:
        """Restart the journal under the next generation; the caller holds
        the mutex and is caught up.

        The old generation's records go to a tail file, from which lagging
        replicas catch up. The replica's state goes to a snapshot file
        for the new generation once the tails since the last snapshot add
        up to that snapshot's size. So a new replica, which loads the
        snapshot and applies those tails, pays at most about twice the
        cost of loading a snapshot, and a large state is not written at
        every restart. Pass `tail` False when the replica changed outside the
        journal's records (a restore from the log): then only a snapshot
        is written. A generation with an `adopt` record gets no tail
        either, because the snapshot removes the adopted state's file,
        which a replay of that record would need."""
        old_generation, used = self._journal.position()
        generation = old_generation + 1
        snapshots, tails = self._stored_generations()
        # A file of a later generation is left by a compaction that died
        # before its restart. Records may have followed it into this
        # generation, so it must not pass for the state at its start.
        for number in [number for number in snapshots
                       if number > old_generation]:
            _unlink_quietly(self._snapshot_path(number))
            del snapshots[number]
        wrote_tail = (tail and self._adopted_generation != old_generation
                      and self._write_tail(old_generation, used))
        snapshot = None
        if not wrote_tail or self._snapshot_due(used, snapshots, tails):
            snapshot = self._snapshot_path(generation)
            size = self._write_snapshot_file(snapshot)
        self._generation = self._journal.restart()
        self._applied = 0
        if snapshot is not None:
            keep = {snapshot}
            if wrote_tail:
                # For replicas that lag by less than the whole generation.
                keep.add(self._tail_path(old_generation))
            self._remove_snapshots(keep)
            logger.debug("%s: wrote a snapshot of %d bytes for "
                         "generation %d", self._label, size,
                         self._generation)

    @staticmethod
    def _snapshot_due(used: int, snapshots: dict[int, int],
                      tails: dict[int, int]) -> bool:
        """Return whether a restart that ends a generation of `used` bytes
        writes a snapshot."""
        if not snapshots:
            return True
        base = max(snapshots)
        since = used + sum(size for number, size in tails.items()
                           if number >= base)
        return since >= snapshots[base]

    def _write_snapshot_file(self, path: str) -> int:
        """Write the replica to snapshot file `path`; return its size."""
        topics = {name: state.snapshot()
                  for name, state in self._topics.items()}
        fields = (FORMAT, self._next_message, self._next_consumer,
                  self._now, topics, self._owners)
        if self._core_paths or self._core_consumers:
            fields += (self._core_paths, self._core_consumers)
        temp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                     | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                # Straight into the file: CPython's pickler passes large
                # bytes (the snapshot's bodies) to write() uncopied.
                pickle.dump(fields, file, protocol=pickle.HIGHEST_PROTOCOL)
                size = file.tell()
            os.replace(temp, path)
        except BaseException:
            _unlink_quietly(temp)
            raise
        return size

    def _write_tail(self, generation: int, used: int) -> bool:
        """Copy the `used` bytes of records of generation `generation` to
        its tail file; return False if that failed."""
        path = self._tail_path(generation)
        temp = f"{path}.{os.getpid()}.tmp"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                         | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(self._journal.copy_records(used))
            os.replace(temp, path)
        except OSError as exc:
            # Then the restart writes a snapshot.
            logger.warning("%s: failed to write tail file %s: %s",
                           self._label, path, exc)
            _unlink_quietly(temp)
            return False
        return True

    def _remove_snapshots(self, keep: Collection[str]) -> None:
        """Remove the snapshot, tail and adopted state files not in `keep`.
        Adopted topic states are in the new snapshot too."""
        base = os.path.basename(self._files_base())
        prefixes = (base + ".snapshot-", base + ".tail-", base + ".adopt-")
        for entry in os.listdir(SHM_DIR):
            path = os.path.join(SHM_DIR, entry)
            if entry.startswith(prefixes) and path not in keep:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    # Recording operations (the caller holds the section).

    def _logged(self, op: str, *args: Any) -> Any:
        """Apply an operation at `_now` and append its record."""
        data = self._encoded(op, args)
        try:
            return self._apply(op, args)
        finally:
            self._append(data)

    def _encoded(self, op: str, args: tuple) -> bytes:
        """Return the record of `op` at `_now`, after making room for it
        in the journal; raise `MessageTooLarge` if it can never fit."""
        return self._reserve(op, encode_record(op, self._now, args))

    def _reserve(self, op: str, data: bytes) -> bytes:
        """Return `data`, the record of `op`, after making room for it in
        the journal; raise `MessageTooLarge` if it can never fit."""
        if len(data) > self._max_record:
            raise MessageTooLarge(
                f"a {op} record of {len(data)} bytes is larger than the "
                f"{self._max_record} bytes that {self._label} accepts. "
                f"{self._size_advice()}")
        if not self._journal.has_room(len(data)):
            self._compact()
        return data

    def _size_advice(self) -> str:
        """Return the advice of `MessageTooLarge`: where `_max_record`
        comes from and how to raise it."""
        return (
            f"That is half its journal of {self._journal.journal_bytes} "
            f"bytes. An existing broker keeps its journal size and ignores "
            f"the journal_bytes passed to open it, so to enlarge it close "
            f"the broker in every process, call "
            f"mqs.Broker.unlink({self.shm_name!r}), which discards its "
            f"topics and messages, and create it again with a larger "
            f"journal_bytes. Or send smaller messages.")

    def _bind_section_paths(self) -> None:
        """Make `_append`, `_reserve` and `_tick`, which run in every
        operation, the section's C versions (instance attributes hide
        the methods, which do the same)."""
        section = self._lock
        assert isinstance(section, _SharedSection)
        self._append = section.append_record  # type: ignore[method-assign]
        self._reserve = section.reserve  # type: ignore[method-assign]
        self._tick = section.tick  # type: ignore[method-assign]

    def _append(self, data: bytes) -> None:
        end = self._journal.append(data)
        if end < 0:
            raise AssertionError("journal full after a compaction")
        self._applied = end
        self._appended = True

    def _after_write(self) -> None:
        pass

    def _notify(self) -> None:
        # Waiters in any process wake when the section is left after an
        # append (`_leave_shared`), and async waiters through `Wakeups`,
        # so no future of MemoryBackend's is ever pending here.
        pass

    def _sync(self, log: Any) -> None:
        pass

    def _check_open(self) -> None:
        if self._closed:
            raise ShutDown(f"{self._label} is closed")

    def _reap(self) -> None:
        """Close the consumers whose processes are gone."""
        self._next_reap = time.monotonic() + REAP_INTERVAL_S
        dead = [(consumer, owner) for consumer, owner in self._owners.items()
                if not self._journal.alive(owner[2], owner[3])]
        if not dead:
            return
        self._tick()
        returned = 0
        for consumer, (topic, group, _, _) in dead:
            returned += self._logged("close", topic, group, consumer)
        logger.info("shm broker %s: closed %d consumer(s) of processes that "
                    "are gone; %d in-flight message(s) are ready again",
                    self.shm_name, len(dead), returned)

    # Replicated operations that also track consumer owners.

    def _do_declare(self, config: TopicConfig, seed: int,
                    core_path: str | None = None) -> None:
        new = config.name not in self._topics
        super()._do_declare(config, seed)
        if new and core_path is not None:
            self._core_paths[config.name] = core_path

    def _do_open(self, topic: str, group: str, consumer: str, start: str,
                 prefetch: int, max_attempts: int | None, slot: int = -1,
                 token: int = 0, core: tuple[int, int, int] | None = None
                 ) -> None:
        if core is None:
            super()._do_open(topic, group, consumer, start, prefetch,
                             max_attempts)
        else:
            # The opening process registered it in the core already.
            self._next_consumer = max(self._next_consumer,
                                      int(consumer[1:]))
            self._core_consumers[consumer] = (topic, *core)
        self._owners[consumer] = (topic, group, slot, token)

    def _do_close(self, topic: str, group: str, consumer: str) -> int:
        self._owners.pop(consumer, None)
        entry = self._core_consumers.pop(consumer, None)
        if entry is None:
            return super()._do_close(topic, group, consumer)
        if self._replaying:
            return 0
        # Only the process that logged the close changes the core.
        return self._core(topic).close_consumer(entry[2])

    def _do_ack_many(self, topic: str, group: str, tags: list[Any]
                     ) -> list[bool]:
        state = self._topic(topic)
        return [state.ack(group, tag, self._now) for tag in tags]

    def _do_delete(self, topic: str) -> None:
        super()._do_delete(topic)
        for consumer, owner in list(self._owners.items()):
            if owner[0] == topic:
                del self._owners[consumer]
        path = self._core_paths.pop(topic, None)
        if path is None:
            return
        for consumer, entry in list(self._core_consumers.items()):
            if entry[0] == topic:
                del self._core_consumers[consumer]
        handle = self._cores.pop(topic, None)
        if not self._replaying:
            if handle is None:
                handle = self._open_core(path)
            try:
                handle.retire()
            except TopicRetired:
                pass
            _unlink_quietly(path)
        if handle is not None:
            handle.close()

    def _do_adopt(self, topic: str, path: str) -> None:
        """Replace a core topic's state by the one its core handed over
        (see `_move_to_journal`)."""
        self._adopted_generation = self._generation
        with open(path, "rb") as file:
            data = pickle.load(file)
        self._topics[topic] = TopicState.restore(data, self._pinned,
                                                 self._next_id)
        self._core_paths.pop(topic, None)
        for consumer, entry in list(self._core_consumers.items()):
            if entry[0] == topic:
                del self._core_consumers[consumer]
        handle = self._cores.pop(topic, None)
        if handle is not None:
            handle.close()

    # Topic cores.

    def _journal_op(self) -> contextlib.AbstractContextManager[None]:
        """Return a context that marks this thread as running a journal
        operation, in which `_topic` raises _OnCore for a topic on its
        core."""
        return self._journal_op_context

    def _open_core(self, path: str) -> TopicCore:
        # The sizes only matter to the process that creates the file.
        try:
            return TopicCore(path, ((0, 1),))
        except TopicCoreVersionError as exc:
            # Raised again to name the broker in the error and its fix.
            raise TopicCoreVersionError(
                f"{self._label}: its topic core {path} has layout version "
                f"{exc.version}, and this mqs reads version "
                f"{exc.expected_version}: processes of two mqs versions "
                f"share the broker. Run every process of the broker on the "
                f"mqs version that created it, or close them all and "
                f"remove the broker with mqs.Broker.unlink("
                f"{self.shm_name!r}) to start it again on this version (its "
                f"stored messages are lost)", path=path, version=exc.version,
                expected_version=exc.expected_version) from None

    def _core(self, topic: str) -> TopicCore:
        """Return this process's handle on a core topic's core; the caller
        holds the section and the topic is on its core."""
        handle = self._cores.get(topic)
        if handle is None:
            handle = self._cores[topic] = self._open_core(
                self._core_paths[topic])
        return handle

    def _fast_core(self, topic: str) -> TopicCore | None:
        """Return the core handle of `topic` if this process knows it as a
        core topic, after the periodic check for dead consumers."""
        if self._closed:
            raise ShutDown(f"{self._label} is closed")
        if time.monotonic() >= self._next_reap:
            with self._lock:
                if topic in self._core_paths:
                    self._core(topic)
        return self._cores.get(topic)

    def _create_core(self, config: TopicConfig) -> str:
        path = f"{self._files_base()}.core-{secrets.token_hex(8)}"
        weights = config.weight_map
        handle = TopicCore(
            path, [(lane, weights[lane]) for lane in config.lanes],
            strict=config.policy == "strict",
            capacity=_core_capacity(_shm_free_bytes()),
            slot_bytes=CORE_SLOT_BYTES, max_groups=CORE_GROUPS,
            max_consumers=CORE_CONSUMERS, max_attempts=config.max_attempts,
            sample_every=self.sample_every, max_stored=config.maxsize or 0)
        self._cores[config.name] = handle
        return path

    def _move_to_journal(self, topic: str) -> None:
        """Move a core topic with all its state to the journal for good;
        the caller holds the section.

        Every process switches when it applies the ``adopt`` record. A
        process that still holds the core handle gets `TopicRetired`
        from it first, so it takes the section, which applies the record.
        """
        if topic not in self._core_paths:
            return
        core = self._core(topic)
        core_path = core.path
        data = _shift_core_times(core.retire_and_export(), self._offset)
        now = self._tick()
        consumers = {entry[2]: consumer for consumer, entry
                     in self._core_consumers.items() if entry[0] == topic}
        state = self._topics[topic]
        _adopt_core_state(state, data, consumers, now)
        # Next to the journal, where `_remove_snapshots` finds it. The
        # log backend's `path` is its log directory, not the journal.
        path = f"{self._files_base()}.adopt-{secrets.token_hex(8)}"
        temp = f"{path}.{os.getpid()}.tmp"
        # Owner-only, as every mqs file in /dev/shm, because it contains
        # the message bodies.
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                     | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                pickle.dump(state.snapshot(), file,
                            protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(temp, path)
        except BaseException:
            _unlink_quietly(temp)
            raise
        self._logged("adopt", topic, path)
        _unlink_quietly(core_path)
        logger.info("shm broker %s: topic %r moved from its shared core to "
                    "the journal with %d stored message(s)", self.shm_name,
                    topic, len(data["slots"]))

    def _leave_core(self, topic: str) -> None:
        """Move `topic` to the journal if it is still on its core."""
        with self._lock:
            self._check_open()
            self._move_to_journal(topic)

    def _core_or_journal(self, topic: str,
                         on_core: Callable[[TopicCore], Any],
                         on_journal: Callable[[], Any]) -> Any:
        """Return `on_core` of the topic's core while the topic is on one,
        else `on_journal` run as a journal operation.

        `on_core` returns `_MOVED` to move the topic to the journal first;
        a retired core moves it too. When the topic is on a core again by
        the time the journal operation runs (deleted and declared anew),
        the whole choice is made again.
        """
        while True:
            core = self._fast_core(topic)
            if core is None:
                try:
                    with self._journal_op():
                        return on_journal()
                except _OnCore:
                    continue
            try:
                result = on_core(core)
            except TopicRetired:
                result = _MOVED
            if result is not _MOVED:
                return result
            self._leave_core(topic)

    def _settle_tag(self, topic: str, tag: Any,
                    on_core: Callable[[TopicCore, Any], Any],
                    on_journal: Callable[[Any], bool]) -> bool:
        """Settle a delivery's `tag` and return the result, or False for a
        stale tag.

        `on_core` settles on the core that delivered the tag. It gets the
        core tag and returns `_MOVED` to move the topic to the journal
        first. Once the topic is on the journal, `on_journal` settles
        there with the journal form of the tag, which keeps the core's ids
        and tickets.
        """
        while True:
            core, current = self._core_tag(topic, tag)
            if current is None:
                return False
            if core is not None:
                try:
                    result = on_core(core, current)
                except TopicRetired:
                    result = _MOVED
                if result is not _MOVED:
                    return bool(result)
                self._leave_core(topic)
                continue
            try:
                return on_journal(current)
            except _OnCore:
                if _stale_on_core(tag):
                    return False

    # Operations that differ from the log backend's.

    def declare_topic(self, config: TopicConfig, replace: bool = False
                      ) -> TopicConfig:
        with self._lock:
            self._check_open()
            state = self._topics.get(config.name)
            if state is None and self._core_topics and _core_topic(config):
                self._tick()
                path = self._create_core(config)
                self._logged("declare", config, random.getrandbits(64),
                             path)
                return config
            # A core keeps the settings it was created with, so a change
            # moves the topic, but only once the redeclare is accepted.
            if state is not None and _redeclare_changes(
                    state.config, config, replace):
                self._move_to_journal(config.name)
        return super().declare_topic(config, replace)

    def publish(self, topic: str, envelopes: Sequence[Envelope],
                timeout: float | None) -> list[str]:
        ids: list[str] = []
        journal_publish = super().publish
        # Pickle the whole batch before storing any of it: a body that
        # cannot be pickled fails the call with nothing published, as on
        # the other backends, so a retry of the batch adds no duplicates.
        encoded = [_encode(envelope) for envelope in envelopes]
        deadline = None if timeout is None else time.monotonic() + timeout
        waited = False

        def publish_on_core(core: TopicCore) -> Any:
            nonlocal waited
            while True:
                done = len(ids)
                stored, limited = self._publish_core(
                    core, topic, envelopes[done:], encoded[done:])
                ids.extend(stored)
                if len(ids) == len(envelopes):
                    return ids
                if not limited:
                    # A feature the core lacks, a full core or a large
                    # body: the topic moves to the journal, behind the
                    # messages stored so far.
                    return _MOVED
                waited = True
                if not self._wait_core_room(core, topic, len(ids),
                                            len(envelopes), deadline):
                    return _MOVED

        def publish_on_journal() -> list[str]:
            # Bodies travel as bytes; receivers unpickle them (see
            # `fetch`).
            done = len(ids)
            if waited and topic not in self._topics:
                # The core retired because the topic was deleted.
                raise _deleted_while_full(topic, done, len(envelopes))
            moved = [Envelope(body, *envelope[1:]) for envelope, (_, body)
                     in zip(envelopes[done:], encoded[done:])]
            try:
                return ids + journal_publish(topic, moved, timeout)
            except UnknownTopic as exc:
                if not exc.deleted:
                    raise
                raise _deleted_while_full(topic, done + exc.published,
                                          len(envelopes)) from None

        return self._core_or_journal(topic, publish_on_core,
                                     publish_on_journal)

    def publish_one(self, topic: str, body: Any, priority: int
                    ) -> str | None:
        # `__init__` hides this method behind `CorePath.publish_one`,
        # which does the same without a Python frame. On a full core and
        # on a pickle larger than a slot it returns None, and `publish`
        # moves the topic to the journal.
        message_id: str | None = self._fast.publish_one(topic, body,
                                                        priority)
        return message_id

    # The direct paths of a topic on the journal, per message: `publish`,
    # `fetch` and `ack` for the common case, with the checks that the
    # section already makes left out and the record built here.
    # SharedLogBackend, whose topics are all on the journal, uses them
    # too.

    def _publish_journal_one(self, topic: str, body: Any, priority: int
                             ) -> str | None:
        """Publish one message without options to a topic on the
        journal, as `publish_one` does, and return its id, or None to
        make the caller use `publish`. `CorePath` calls it for a topic
        without a core in this process."""
        body = _dumps(body, _PROTOCOL)
        envelope = _new_tuple(Envelope, (body, priority,
                                         *_ENVELOPE_DEFAULTS))
        # `LogBackend.publish` without its wait loop: a full topic that
        # blocks, an unknown topic and a topic on a core return None, so
        # `publish` waits for room, declares the topic or uses the core.
        with self._lock:
            if topic in self._core_paths:
                return None
            state = self._topics.get(topic)
            if state is None:
                return None
            now = self._tick()
            # A topic without a maxsize never blocks a publish.
            if state.config.maxsize and self._publish_blocked(
                    state, envelope, now):
                return None
            # `_logged("publish", ...)` for one envelope. The record is
            # built here, because `encode_record` takes twice as long, and
            # `_reserve` raises MessageTooLarge if it does not fit. It
            # stores the envelope as ``(body, priority)``, since replay
            # builds ``Envelope(*fields)`` and the other fields are at
            # their defaults.
            wall = time.time()
            data = self._reserve("publish", _dumps(
                ("publish", now, (topic, [(body, priority)], wall, 0)),
                _PROTOCOL))
            try:
                ids = state.publish((envelope,), now, wall)
            finally:
                self._append(data)
            if self._bytes_since_snapshot > self._compact_bytes:
                self._after_write()
        return ids[0] if ids else None

    def fetch_one(self, topic: str, group: str, consumer: str,
                  ack_timeout: float, auto_ack: bool) -> Delivery | None:
        # `_try_fetch` for one message of a topic on the journal, without
        # the next wake time that `fetch_one` does not use. `_topic`,
        # `_after_write` and `_unpickled` are inlined, because this runs
        # per message. Consumers of core topics read through `CoreReader`.
        try:
            with self._lock:
                if topic in self._core_paths:
                    return None
                state = self._topics.get(topic)
                if state is None:
                    # `fetch` raises UnknownTopic.
                    return None
                now = self._tick()
                if _fetch_is_idle(state, group, consumer, auto_ack, now):
                    return None
                data = self._reserve("fetch", _dumps(
                    ("fetch", now, (topic, group, consumer, 1, ack_timeout,
                                    auto_ack)), _PROTOCOL))
                quiet = _fetch_is_quiet(state, auto_ack, now)
                try:
                    # As `_do_fetch` does, without its `next_wake`.
                    found = state.fetch(group, consumer, 1, ack_timeout,
                                        auto_ack, now)
                finally:
                    self._append(data)
                self._quiet = quiet
                if self._bytes_since_snapshot > self._compact_bytes:
                    self._after_write()
        except ShutDown:
            # `fetch` raises it again, with its own checks first.
            return None
        if not found:
            return None
        if auto_ack and self._sync_acks:
            self._sync(self._log)
        delivery = found[0]
        try:
            body = _loads(delivery[4])
        except Exception as exc:  # whatever the body's unpickling raised
            raise decode_error(topic, delivery[0], exc, auto_ack) from exc
        return _new_tuple(Delivery, (*delivery[:4], body, *delivery[5:]))

    def _ack_journal(self, topic: str, group: str, tag: Any
                     ) -> bool | None:
        """Ack a journal tag of a topic on the journal and return the
        result, or None when the topic is on a core, where the caller
        settles it."""
        # `LogBackend._settle` for an ack, without the checks that the
        # section already makes (ShutDown once closed), and with
        # `_logged` and `_after_write` inlined.
        with self._lock:
            if topic in self._core_paths:
                return None
            state = self._topics.get(topic)
            if state is None:
                state = self._topic(topic)
            now = self._tick()
            data = self._reserve("ack", _dumps(
                ("ack", now, (topic, group, tag)), _PROTOCOL))
            try:
                result = state.ack(group, tag, now)
            finally:
                self._append(data)
            if self._bytes_since_snapshot > self._compact_bytes:
                self._after_write()
            log = self._log
        if self._sync_acks:
            self._sync(log)
        return result

    def _publish_core(self, core: TopicCore, topic: str,
                      envelopes: Sequence[Envelope],
                      encoded: Sequence[tuple[bytes, bytes]]
                      ) -> tuple[list[str], bool]:
        """Store envelopes (with their `_encode` results) in a topic core
        until one does not fit; return the ids of those stored, and
        whether the topic's maxsize stopped them (the others move the
        topic to the journal)."""
        config = self._topics[topic].config
        wall = time.time()
        ids = []
        stored = []
        limited = False
        try:
            for envelope, (payload, _) in zip(envelopes, encoded):
                if not _core_envelope(envelope, config):
                    break
                if len(payload) > CORE_SLOT_BYTES:
                    break
                seq = core.publish(payload, envelope.priority, wall)
                if seq == CORE_LIMIT:
                    limited = True
                    break
                if seq < 0:
                    break
                ids.append(f"s{seq}")
                stored.append((seq, envelope.priority, wall, payload))
        except TopicRetired:
            pass
        finally:
            if stored:
                self._core_published(topic, stored)
        return ids, limited

    def _core_published(self, topic: str, stored: list[tuple]) -> None:
        """Called after `_publish_core` stored messages ``(seq, priority,
        timestamp, payload)`` in the core of `topic`."""

    def _wait_core_room(self, core: TopicCore, topic: str, published: int,
                        total: int, deadline: float | None) -> bool:
        """Handle a core topic at its maxsize: raise `Full` for
        ``when_full="raise"``, or wait until an operation on the core
        may have made room and return True, raising `Full` at
        `deadline`. Return False when the core was retired meanwhile."""
        config = self._topics[topic].config
        if core.has_dead():
            # Dead entries hold their slots until they move to the
            # dead-letter queue, as a journal topic's leave the store.
            self._collect_dead(topic)
            return self._fast_core(topic) is core
        if config.when_full == "raise":
            raise Full(
                f"topic {topic!r} is full (maxsize {config.maxsize}); "
                f"consume faster, raise maxsize or use when_full='block'",
                published)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise _stayed_full(topic, config.maxsize, published, total)
        try:
            epoch = core.wait_prepare()
        except TopicRetired:
            return False
        try:
            # A change after `wait_prepare` ends the wait at once, so
            # an ack between the failed publish and here is not missed.
            room = core.stats()["stored"] < core.max_stored
        except BaseException:
            core.cancel_wait()
            raise
        if room:
            core.cancel_wait()
        else:
            core.wait(epoch, 0.05 if left is None else min(left, 0.05))
        # The periodic check for dead consumers, and ShutDown once
        # closed.
        return self._fast_core(topic) is core

    def _topic(self, topic: str) -> TopicState:
        # Journal operations never run on a core topic's placeholder state:
        # in them (see `_journal_path`) _OnCore makes the caller retry on
        # the core.
        if self._guard is not None and getattr(self._guard, "active", False) \
                and not self._replaying \
                and topic in self._core_paths:
            self._core(topic)
            raise _OnCore(topic)
        return super()._topic(topic)

    def has_topic(self, topic: str) -> bool:
        handle = self._cores.get(topic)
        if handle is not None and not handle.retired and not self._closed:
            # Deleting a core topic retires its core first.
            return True
        return super().has_topic(topic)

    def open_consumer(self, topic: str, group: str, *, start: str,
                      prefetch: int, max_attempts: int | None,
                      ack_timeout: float | None = None) -> str:
        with self._lock:
            self._check_open()
            core = None
            if topic in self._core_paths:
                core = self._core(topic)
            else:
                self._topic(topic)
            self._next_consumer += 1
            consumer = f"c{self._next_consumer}"
            self._tick()
            if core is None:
                self._logged("open", topic, group, consumer, start, prefetch,
                             max_attempts, self._slot, self._token)
                return consumer
            # The core first: a process killed between the two steps
            # leaves an idle core consumer, never a record of a consumer
            # the core does not have.
            registered = self._open_on_core(core, topic, group, start,
                                            prefetch, max_attempts)
            if registered is None:
                # The journal has no limit on groups, consumers or group
                # names.
                self._move_to_journal(topic)
                self._logged("open", topic, group, consumer, start,
                             prefetch, max_attempts, self._slot, self._token)
            else:
                self._logged("open", topic, group, consumer, start,
                             prefetch, max_attempts, self._slot, self._token,
                             registered)
        return consumer

    def _open_on_core(self, core: TopicCore, topic: str, group: str,
                      start: str, prefetch: int, max_attempts: int | None
                      ) -> tuple[int, int, int] | None:
        """Register a consumer of `group` in `core` and return ``(group
        index, consumer index, owner)``, or None when the core cannot
        take it (too many groups or consumers, or a long group name).

        A group that open_group created before open_consumer failed
        moves with the rest of the core's state to the journal.
        """
        name_bytes = len(group.encode())
        if name_bytes > GROUP_NAME_BYTES:
            reason = (f"group name of {name_bytes} bytes is longer than "
                      f"the {GROUP_NAME_BYTES} bytes a core stores")
        else:
            try:
                index = core.open_group(group, start == "earliest",
                                        max_attempts)
                owner = secrets.randbits(63) or 1
                return index, core.open_consumer(index, prefetch, owner), owner
            except TopicCoreFull as exc:
                reason = str(exc)
        logger.info("shm broker %s: topic %r leaves its core: %s",
                    self.shm_name, topic, reason)
        return None

    def close_consumer(self, topic: str, group: str, consumer: str) -> int:
        with self._lock:
            if self._closed or topic not in self._topics:
                return 0
            self._tick()
            return self._logged("close", topic, group, consumer)

    def fetch(self, topic: str, group: str, consumer: str, max_items: int,
              *, ack_timeout: float, auto_ack: bool,
              timeout: float | None) -> list[Delivery]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            entry = self._core_consumers.get(consumer)
            core = self._fast_core(topic) if entry is not None else None
            if core is not None:
                found = self._fetch_core(core, entry, topic, group,
                                         max_items, ack_timeout, auto_ack,
                                         deadline)
                if found is not None:
                    return found
                continue
            left = None if deadline is None else max(
                0.0, deadline - time.monotonic())
            try:
                with self._journal_op():
                    found = super().fetch(topic, group, consumer, max_items,
                                          ack_timeout=ack_timeout,
                                          auto_ack=auto_ack, timeout=left)
            except _OnCore:
                if consumer not in self._core_consumers:
                    # Topics never move back onto a core, so a consumer
                    # the core does not know was closed.
                    raise ShutDown(
                        f"consumer of group {group!r} on topic {topic!r} "
                        f"is closed") from None
                continue
            # Not `_replace`, which takes twice as long.
            return decode_each(
                topic, found,
                lambda delivery: Delivery(*delivery[:4],
                                          pickle.loads(delivery.body),
                                          *delivery[5:]),
                _delivery_id, auto_ack)

    def message_reader(self, consumer: Any, message_type: type
                       ) -> Callable[[float, bool], Any] | None:
        entry = self._core_consumers.get(consumer._id) \
            if self._core_topics else None
        if entry is None:
            # A topic on the journal never moves onto a core.
            return super().message_reader(consumer, message_type)
        topic, group_index, number, owner = entry
        reader: Callable[[float, bool], Any] = CoreReader(
            self._fast, consumer, message_type, Delivery, topic,
            consumer.group, group_index, number, owner)
        return reader

    def _fetch_core(self, core: TopicCore, entry: tuple, topic: str,
                    group: str, max_items: int, ack_timeout: float,
                    auto_ack: bool, deadline: float | None
                    ) -> list[Delivery] | None:
        """Fetch from a topic core, waiting until `deadline`; return None
        when the topic left its core meanwhile."""
        _, group_index, number, owner = entry
        # The first try registers no waiter: a message is usually there.
        waiting = False
        epoch = 0
        while True:
            if self._closed:
                if waiting:
                    core.cancel_wait()
                raise ShutDown(f"{self._label} is closed")
            try:
                found = core.fetch(number, max_items, ack_timeout, auto_ack,
                                   None, owner)
            except TopicRetired:
                if waiting:
                    core.cancel_wait()
                self._leave_core(topic)
                return None
            except ShutDown:
                if waiting:
                    core.cancel_wait()
                raise ShutDown(
                    f"consumer of group {group!r} on topic {topic!r} is "
                    f"closed") from None
            if core.has_dead():
                if found:
                    self._collect_dead_after_delivery(topic)
                else:
                    self._collect_dead(topic)
            if found:
                if waiting:
                    core.cancel_wait()
                return decode_each(
                    topic, found,
                    lambda item: _core_delivery(core.path, topic, group,
                                                group_index, item),
                    _core_item_id, auto_ack)
            if not waiting:
                # Register, then look again, so a publish in between is
                # not missed.
                epoch = core.wait_prepare()
                waiting = True
                continue
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                core.cancel_wait()
                return []
            if now >= self._next_reap:
                core.cancel_wait()
                waiting = False
                with self._lock:
                    pass
                continue
            core.wait(epoch, 0.05 if deadline is None
                      else min(0.05, deadline - now))
            waiting = False
            if self._cores.get(topic) is not core:
                # Deleted or moved by another thread while this one
                # waited, which may have closed this handle.
                return None

    def _core_tag(self, topic: str, tag: Any
                  ) -> tuple[TopicCore | None, Any]:
        """Return ``(core handle, tag)`` for a tag the core can settle.

        Returns ``(None, journal tag)`` when the topic is on the journal,
        and ``(None, None)`` for a tag of an earlier core of a topic that
        is on a newer one.
        """
        if len(tag) != 5:
            return None, tag
        core = self._fast_core(topic)
        if core is not None:
            if core.path == tag[0]:
                return core, tag
            return None, None
        # The topic left its core: the journal keeps the core's ids and
        # tickets.
        return None, (f"s{tag[4]}", tag[3])

    def ack(self, topic: str, group: str, tag: Any) -> bool:
        core = self._cores.get(topic)
        if core is not None and len(tag) == 5 and core.path == tag[0] \
                and not self._closed and time.monotonic() < self._next_reap:
            try:
                return core.ack(tag[1], tag[2], tag[3])
            except TopicRetired:
                pass
        if len(tag) != 5:
            result = self._ack_journal(topic, group, tag)
            if result is not None:
                return result
        # A partial, not a lambda: a closure over the arguments would
        # slow the fast path above too.
        return self._settle_tag(
            topic, tag, _ack_on_core,
            functools.partial(self._settle, "ack", topic, group))

    def ack_many(self, topic: str, group: str, tags: Sequence[Any]
                 ) -> list[bool]:
        tags = list(tags)
        if tags and all(len(tag) == 5 for tag in tags):
            return [self.ack(topic, group, tag) for tag in tags]
        journal = [tag if len(tag) != 5 else (f"s{tag[4]}", tag[3])
                   for tag in tags]
        if any(len(tag) == 5 for tag in tags):
            self._leave_core(topic)
        # One record per part, so one mutex round and one replay for
        # each, in parts that fit a record of the journal.
        names = len(topic.encode()) + len(group.encode())
        step = max(1, (self._max_record - names - 256) // _ACK_TAG_BYTES)
        results: list[bool] = []
        for start in range(0, len(journal), step):
            try:
                results += self._settle("ack_many", topic, group,
                                        journal[start:start + step])
            except _OnCore:
                # The topic is on a core now; each tag left settles
                # there or is stale.
                return results + [self.ack(topic, group, tag)
                                  for tag in tags[start:]]
        return results

    def nack(self, topic: str, group: str, tag: Any, *, requeue: bool,
             delay: float | None, error: str | None) -> bool:
        def nack_on_core(core: TopicCore, core_tag: Any) -> Any:
            if delay or error is not None:
                # A delay or an error text: the journal keeps those.
                return _MOVED
            done = core.nack(*core_tag[1:4], requeue)
            if core.has_dead():
                self._collect_dead(topic)
            return done

        return self._settle_tag(
            topic, tag, nack_on_core,
            lambda journal_tag: self._settle("nack", topic, group,
                                             journal_tag, requeue, delay,
                                             error))

    def extend(self, topic: str, group: str, tag: Any, seconds: float
               ) -> bool:
        return self._settle_tag(
            topic, tag,
            lambda core, core_tag: core.extend(*core_tag[1:4], seconds),
            lambda journal_tag: self._settle("extend", topic, group,
                                             journal_tag, seconds,
                                             sync=False))

    def release(self, topic: str, group: str, tags: Sequence[Any]) -> int:
        tags = list(tags)
        while True:
            pairs = [pair for pair in (self._core_tag(topic, tag)
                                       for tag in tags)
                     if pair[1] is not None]
            cores = {id(core) for core, _ in pairs}
            core = pairs[0][0] if pairs else None
            if core is not None and len(cores) == 1:
                try:
                    return core.release(
                        pairs[0][1][1],
                        [(tag[2], tag[3]) for _, tag in pairs])
                except TopicRetired:
                    self._leave_core(topic)
                    continue
            if core is not None:
                self._leave_core(topic)
                continue
            try:
                with self._journal_op():
                    return super().release(topic, group,
                                           [tag for _, tag in pairs])
            except _OnCore:
                if all(_stale_on_core(tag) for tag in tags):
                    return 0
                tags = [tag for tag in tags if not _stale_on_core(tag)]

    def in_flight(self, topic: str, group: str, consumer: str) -> int:
        entry = self._core_consumers.get(consumer)
        core = self._fast_core(topic) if entry is not None else None
        if core is not None:
            return core.consumer_in_flight(entry[2])
        with self._lock:
            state = self._topics.get(topic)
            return 0 if state is None or topic in self._core_paths \
                else state.in_flight(group, consumer)

    def stats(self, topic: str) -> dict[str, int]:
        def stats_on_core(core: TopicCore) -> Any:
            core.advance()
            found = self._collect_dead(topic)
            if found is None:
                return _MOVED
            return _core_stats(core.counters(), core.stats(), *found)

        return self._core_or_journal(topic, stats_on_core,
                                     functools.partial(super().stats, topic))

    def group_stats(self, topic: str) -> list[GroupStats]:
        def group_stats_on_core(core: TopicCore) -> Any:
            now = time.monotonic()
            groups = core.group_stats(now)
            if core.has_dead() and self._collect_dead(topic) is None:
                return _MOVED
            return [_core_group_stats(topic, item, now, self.sample_every)
                    for item in groups]

        return self._core_or_journal(
            topic, group_stats_on_core,
            functools.partial(super().group_stats, topic))

    def dlq_list(self, topic: str, limit: int | None = None
                 ) -> list[DeadLetter]:
        def list_on_core(core: TopicCore) -> Any:
            found = self._collect_dead(topic, limit)
            return _MOVED if found is None else found[0]

        letters = self._core_or_journal(
            topic, list_on_core,
            functools.partial(super().dlq_list, topic, limit))
        return [unpickled_letter(letter) for letter in letters]

    def dlq_redrive(self, topic: str, ids: Sequence[str] | None = None
                    ) -> int:
        # A redriven message goes back to the one group that
        # dead-lettered it, which a core cannot do: the topic moves to
        # the journal when it has dead letters.
        found = self._collect_dead(topic)
        if found is not None and found[0]:
            self._leave_core(topic)
        return super().dlq_redrive(topic, ids)

    def dlq_purge(self, topic: str) -> int:
        self._collect_dead(topic)
        return super().dlq_purge(topic)

    def _collect_dead(self, topic: str, limit: int | None = None
                      ) -> tuple[list[DeadLetter], dict[str, int]] | None:
        """Move the dead entries of a core topic's core into the topic's
        dead-letter queue in the journal, where every process reads them.
        The topic stays on its core.

        Return that queue's letters (at most `limit`) and the counters of
        the placeholder state that contains them, or None when the topic
        is not on a core.

        The record is appended before the entries leave the core, so a
        process killed in between leaves them to the next call, which
        adds the same letters again under the same keys (no duplicate).
        """
        with self._lock:
            self._check_open()
            if topic not in self._core_paths:
                return None
            core = self._core(topic)
            try:
                dead = core.peek_dead()
            except TopicRetired:
                return None
            if dead:
                self._tick()
                for chunk in _dead_chunks(dead, self._max_record // 2):
                    self._logged("core_dead", topic,
                                 [item[2:] for item in chunk])
                if _after_dead_record_hook is not None:
                    _after_dead_record_hook()
                try:
                    core.drop_dead([item[:2] for item in dead])
                except TopicRetired:
                    return None
                # The core counted them; log as a journal topic would,
                # on the same logger.
                total = core.counters()["dead_lettered"]
                warn_drop_count(_state_logger, topic, "dead_lettered",
                                total - len(dead), total)
            state = self._topics[topic]
            letters = [letter for letter, _ in state.dlq.values()]
            counters = dict(state.counters)
        return (letters if limit is None else letters[:limit]), counters

    def _collect_dead_after_delivery(self, topic: str) -> None:
        """Run `_collect_dead` after a fetch of the core delivered
        messages, logging its failure instead of raising it.

        The core has delivered those messages (and settled them under
        auto_ack), so raising here would lose them for the caller. The
        dead letters stay on the core until the next call moves them.
        """
        try:
            self._collect_dead(topic)
        except (ShutDown, BackendUnavailable, OSError) as exc:
            logger.warning("%s: moving the dead letters of topic %r to "
                           "its dead-letter queue failed (%s); the next "
                           "call on the topic tries again", self._label,
                           topic, exc)

    def _do_core_dead(self, topic: str, letters: list[tuple]) -> None:
        """Apply a ``core_dead`` record: dead letters that a topic core
        counted, moved into the topic's placeholder state."""
        state = self._topics.get(topic)
        if state is None:
            return
        for (group, seq, attempts, reason, priority, timestamp, timed_out,
             payload) in letters:
            body, headers, reply_to, correlation_id = _decode(payload)
            envelope = Envelope(body, priority, headers=headers,
                                reply_to=reply_to,
                                correlation_id=correlation_id)
            record = _Record(f"s{seq}", envelope, state.lane_of[priority],
                             self._now, timestamp, None)
            state.add_dead_letter(
                record, group, attempts, reason,
                "ack deadline passed" if timed_out else None)

    def _settle(self, op: str, topic: str, *args: Any, sync: bool = True
                ) -> Any:
        if op in ("redrive", "purge"):
            with self._lock:
                if topic in self._core_paths:
                    self._check_open()
                    if op == "redrive":
                        # `dlq_redrive` moves a topic with dead letters
                        # to the journal first.
                        return 0
                    # The dead letters of a topic on its core are in
                    # its placeholder state (`_collect_dead`).
                    self._tick()
                    return self._logged("purge", topic)
        with self._journal_op():
            return super()._settle(op, topic, *args, sync=sync)

    async def fetch_async(self, topic: str, group: str, consumer: str,
                          max_items: int, *, ack_timeout: float,
                          auto_ack: bool, timeout: float | None
                          ) -> list[Delivery]:
        """Like `fetch`, without blocking the running event loop.

        Waits on the wait word that a publish bumps (the topic core's or
        the journal's) through a `Wakeups` thread, and checks again at
        least every REAP_INTERVAL_S for ack deadlines and dead consumers,
        as `fetch` does.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            word = self._async_word(topic, consumer)
            try:
                epoch = self._prepare_async(word)
            except TopicRetired:
                continue  # the core handle was closed meanwhile
            try:
                found = self._fetch_now(topic, group, consumer, max_items,
                                        ack_timeout, auto_ack)
                if found:
                    return found
                wait = REAP_INTERVAL_S
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        return []
                if word is self._async_word(topic, consumer):
                    await self._wakeups.wait(word, epoch, wait)
            finally:
                self._finish_async(word)

    def _fetch_now(self, topic: str, group: str, consumer: str,
                   max_items: int, ack_timeout: float, auto_ack: bool
                   ) -> list[Delivery]:
        """Fetch what is ready now, for `fetch_async`."""
        return self.fetch(topic, group, consumer, max_items,
                          ack_timeout=ack_timeout, auto_ack=auto_ack,
                          timeout=0)

    async def wait_changed_async(self, timeout: float) -> None:
        """Await a commit to the journal or to a topic core that this
        process has open, or `timeout` seconds.

        NOTE: `Wakeups` watches each word with a thread of its own, so a
        process with many open cores runs that many threads while it
        waits here (each ends 1 s after its last waiter).
        """
        prepared = []
        try:
            for word in (self._journal, *tuple(self._cores.values())):
                try:
                    prepared.append((word, self._prepare_async(word)))
                except TopicRetired:
                    continue  # the core handle was closed meanwhile
            waits = [asyncio.ensure_future(
                         self._wakeups.wait(word, epoch, timeout))
                     for word, epoch in prepared]
            try:
                await asyncio.wait(waits,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
                await asyncio.gather(*waits, return_exceptions=True)
        finally:
            for word, _ in prepared:
                self._finish_async(word)

    def _async_word(self, topic: str, consumer: str) -> Any:
        """Return the wait word a change for `consumer` bumps: its topic
        core's, or the journal's for a topic on the journal."""
        if consumer in self._core_consumers:
            core = self._fast_core(topic)
            if core is not None:
                return core
        return self._journal

    @property
    def _wakeups(self) -> Wakeups:
        wakeups = self._async_wakeups
        if wakeups is None:
            section = self._lock
            assert isinstance(section, _SharedSection)
            with section.thread_lock:
                self._check_open()
                if self._async_wakeups is None:
                    self._async_wakeups = Wakeups(self.shm_name)
                wakeups = self._async_wakeups
        return wakeups

    def _prepare_async(self, word: Any) -> int:
        wakeups = self._wakeups
        if word is not self._journal:
            # A core handle stays mapped while it has registered waiters
            # and raises TopicRetired once closed.
            return wakeups.prepare(word)
        # close() unmaps the journal under the thread lock, after it has
        # finished the registrations counted here.
        section = self._lock
        assert isinstance(section, _SharedSection)
        with section.thread_lock:
            self._check_open()
            epoch = wakeups.prepare(word)
            self._async_registered += 1
            return epoch

    def _finish_async(self, word: Any) -> None:
        wakeups = self._async_wakeups
        assert wakeups is not None
        if word is not self._journal:
            wakeups.finish(word)
            return
        section = self._lock
        assert isinstance(section, _SharedSection)
        with section.thread_lock:
            if self._async_registered:
                self._async_registered -= 1
                wakeups.finish(word)

    def close(self) -> None:
        """Release this process's slot and mapping; the broker and its
        state stay for other processes (see `unlink`). Idempotent.
        Consumers of this process that are still open are closed by the
        next process that checks, as for a process that died."""
        section = self._lock
        assert isinstance(section, _SharedSection)
        with section.thread_lock:
            if self._closed:
                return
            self._closed = True
            self._journal.signal()
        if self._async_wakeups is not None:
            self._async_wakeups.close()
        # Threads of this process that wait for a change return within
        # 50 ms, then see the broker closed.
        deadline = time.monotonic() + 1.0
        while self._waiting and time.monotonic() < deadline:
            time.sleep(0.001)
        with section.thread_lock:
            # Coroutines still awaiting find the broker closed and finish
            # nothing, so their journal registrations end here.
            for _ in range(self._async_registered):
                self._journal.cancel_wait()
            self._async_registered = 0
            self._journal.close()
            # Dropped, not closed: a thread still in a core wait holds its
            # handle, which unmaps when the last reference goes.
            self._cores = {}
        _instances.discard(self)

    @staticmethod
    def unlink(name: str) -> bool:
        """Remove the shm broker `name` from /dev/shm; return whether it
        existed. Processes that have it open keep using their mapping;
        the next open of the name creates a new, empty broker."""
        path = _journal_path(_check_name(name))
        try:
            os.unlink(path)
            existed = True
        except FileNotFoundError:
            existed = False
        base = os.path.basename(path)
        prefixes = (base + ".snapshot-", base + ".tail-", base + ".core-",
                    base + ".adopt-")
        for entry in os.listdir(SHM_DIR):
            if entry.startswith(prefixes):
                try:
                    os.unlink(os.path.join(SHM_DIR, entry))
                except FileNotFoundError:
                    pass
        return existed

    def _after_fork_in_child(self) -> None:
        self._lock = _SharedSection(self)  # type: ignore[assignment]
        self._bind_section_paths()
        self._held = False
        self._waiting = 0
        # The parent's coroutines hold their own registrations.
        self._async_wakeups = None
        self._async_registered = 0
        if self._closed:
            return
        self._journal.reopen()
        self._slot, self._token = self._journal.attach()

    @property
    def _label(self) -> str:
        """Name the broker in messages: "shm broker 'name'"."""
        return f"shm broker {self.shm_name!r}"

    def __repr__(self) -> str:
        return f"<ShmBackend {self.shm_name!r}>"


def _ack_on_core(core: TopicCore, tag: Any) -> bool:
    done: bool = core.ack(tag[1], tag[2], tag[3])
    return done


# Tests only: called by `_collect_dead` between appending its record and
# removing the dead entries from the core.
_after_dead_record_hook: Callable[[], None] | None = None

# Bytes that `ack_many` allows for each tag in a journal record. A tag
# with an id of a few digits pickles to about 11 bytes.
_ACK_TAG_BYTES = 40
# Bytes a dead letter adds to a ``core_dead`` record besides its body.
_DEAD_LETTER_OVERHEAD = 128


def _dead_chunks(dead: list[tuple], budget: int) -> list[list[tuple]]:
    """Split `peek_dead` entries into ``core_dead`` records whose bodies
    and overhead add up to at most `budget` bytes, one entry at least."""
    chunks: list[list[tuple]] = []
    size = budget
    for item in dead:
        cost = len(item[-1]) + _DEAD_LETTER_OVERHEAD
        if size + cost > budget:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += cost
    return chunks

# Returned by the `on_core` functions of `_core_or_journal` and
# `_settle_tag` to move the topic to the journal and run there.
_MOVED = object()


class _JournalOp:
    """The context of `ShmBackend._journal_op`: a class, because a
    generator-based context manager costs about 1 µs more per operation.
    """

    __slots__ = ("flags",)

    def __init__(self, flags: threading.local) -> None:
        self.flags = flags

    def __enter__(self) -> None:
        self.flags.active = True

    def __exit__(self, *exc_info: object) -> None:
        self.flags.active = False


class _OnCore(Exception):
    """Raised inside the section when a journal operation meets a topic
    that is on its core; the caller retries on the core."""


def _stale_on_core(tag: Any) -> bool:
    """Return whether a tag that met a topic on its core is stale: a
    journal tag is (the topic was deleted and declared again), and a core
    tag is not (the journal form was only a guess of this process)."""
    return len(tag) != 5


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _delivery_id(delivery: Delivery) -> str:
    return delivery.id


def _core_item_id(item: tuple) -> str:
    """Return the message id of a delivery item of a topic core."""
    return f"s{item[0]}"


def _core_delivery(path: str, topic: str, group: str, group_index: int,
                   item: tuple) -> Delivery:
    seq, slot, ticket, attempts, priority, timestamp, payload = item
    body, headers, reply_to, correlation_id = decode_payload(payload)
    # The tag names the core file, so a tag of a deleted topic's core
    # never settles a delivery of a later core of the same name. The
    # fields go by position, because keywords make the named tuple about
    # three times slower to build (measured on CPython 3.11).
    return Delivery(f"s{seq}", (path, group_index, slot, ticket, seq), topic,
                    group, body, priority, attempts, None, headers,
                    timestamp, reply_to, correlation_id)


def _core_stats(counters: dict[str, int], counts: dict[str, int],
                letters: list[DeadLetter], journal_counters: dict[str, int]
                ) -> dict[str, int]:
    """Return `TopicState.stats` of a topic on its core, whose dead
    letters in the journal are `letters`, counted there in
    `journal_counters` (redrives and purges)."""
    result = dict.fromkeys(COUNTER_KEYS, 0)
    for name, value in journal_counters.items():
        if value:
            result[name] = value
    for name, value in counters.items():
        if name in result or (value and name.startswith("dead_lettered.")):
            result[name] = value
    result.update(stored=counts["stored"], ready=counts["ready"], delayed=0,
                  in_flight=counts["in_flight"], dlq=len(letters),
                  groups=counts["groups"])
    return result


def _histogram(state: tuple) -> metrics.LogLinearHistogram:
    histogram = metrics.LogLinearHistogram()
    histogram.__setstate__(state)
    return histogram


def _summary(state: tuple, sample_every: int | None
             ) -> metrics.LatencySummary | None:
    histogram = _histogram(state)
    if sample_every is None and not histogram.count:
        return None
    return histogram.summary(sample_every or 0)


def _core_group_stats(topic: str, item: tuple, now: float,
                      sample_every: int | None) -> GroupStats:
    (_, group, consumers, ready, oldest, in_flight, counters,
     enqueue_to_deliver, deliver_to_ack) = item
    return GroupStats(
        topic=topic, group=group, consumers=consumers, lag_messages=ready,
        lag_seconds=0.0 if oldest is None else max(0.0, now - oldest),
        delayed=0, in_flight=in_flight, sample_every=sample_every,
        enqueue_to_deliver=_summary(enqueue_to_deliver, sample_every),
        deliver_to_ack=_summary(deliver_to_ack, sample_every), **counters)


def _shift_core_times(data: dict, offset: float) -> dict:
    """Return a core's export (`TopicCore.retire_and_export`) with its
    monotonic times (deadlines, ready and sample times) moved to broker
    time, which is the monotonic clock plus `offset` (0 for the shm
    backend, the wall clock's lead for the log backend)."""
    if not offset:
        return data
    groups = []
    for group in data["groups"]:
        entries = [(*entry[:6], entry[6] + offset, entry[7], entry[8],
                    entry[9] + offset,
                    entry[10] + offset if entry[10] else 0.0, entry[11])
                   for entry in group[6]]
        groups.append((*group[:6], entries, *group[7:]))
    return {**data, "groups": groups}


def _adopt_core_state(state: TopicState, data: dict,
                      consumers: dict[int, str], now: float) -> None:
    """Fill the placeholder state of a core topic with the state its core
    exported (`TopicCore.retire_and_export`), as `TopicState` would hold
    it had it run every operation itself.

    `consumers` maps core consumer indexes to consumer ids.
    """
    records = {}
    seqs = {}
    for slot, seq, priority, timestamp, retained, payload in sorted(
            data["slots"], key=lambda item: item[1]):
        body, headers, reply_to, correlation_id = _decode(payload)
        envelope = Envelope(body, priority, headers=headers,
                            reply_to=reply_to,
                            correlation_id=correlation_id)
        record = _Record(f"s{seq}", envelope, state.lane_of[priority], now,
                         timestamp, None)
        record.retain_until = math.inf if retained else 0.0
        state.store[record.id] = record
        records[slot] = record
        seqs[slot] = seq
    owners = {index: group for index, group, _, _ in data["consumers"]}
    prefetches = {index: prefetch for index, _, prefetch, _
                  in data["consumers"]}
    timers: list[tuple] = []
    dead: list[tuple] = []
    group_counters = []
    for (index, name, max_attempts, cursor, deficits, counters, entries,
         countdown, enqueue_to_deliver, deliver_to_ack) in data["groups"]:
        group = _Group(name, state.config)
        state.groups[name] = group
        group.max_attempts = max_attempts or None
        group.scheduler.cursor = cursor
        group.scheduler.deficits = list(deficits)
        group.countdown = min(countdown, sys.maxsize)
        group.enqueue_to_deliver = _histogram(enqueue_to_deliver)
        group.deliver_to_ack = _histogram(deliver_to_ack)
        for number, consumer in consumers.items():
            if owners.get(number) == index:
                group.consumers[consumer] = [prefetches[number], 0]
        entries = sorted(entries, key=lambda item: seqs[item[0]])
        _adopt_entries(group, records, entries, consumers, timers, dead)
        group_counters.append((group, counters))
    # Deadlines and dead letters in the order the core set them across
    # groups: equal deadlines fire in that order, and the dead-letter
    # queue keeps it.
    for _, deadline, entry in sorted(timers, key=lambda item: item[0]):
        state._set_timer(entry, deadline, _DEADLINE)
    for _, entry, reason in sorted(dead, key=lambda item: item[0]):
        entry.state = IN_FLIGHT
        state._dead_letter(entry, reason, now)
    # The core counted everything already, dead letters included.
    for group, counters in group_counters:
        for key, value in counters.items():
            setattr(group, key, value)
    totals = dict(data["counters"])
    totals.pop("recoveries", None)
    for name, value in totals.items():
        if name in state.counters or value:
            state.counters[name] = value


def _adopt_entries(group: _Group, records: dict, entries: list,
                   consumers: dict[int, str], timers: list,
                   dead: list) -> None:
    """Add a group's entries in publish order; its ready ones go to their
    lanes, its timers and dead entries to `timers` and `dead`."""
    ready = []
    for (slot, kind, reason, attempts, ticket, ready_seq, deadline,
         deadline_seq, number, ready_at, sampled_at, timed_out) in entries:
        record = records[slot]
        entry = _Entry(record, group)
        group.entries[record.id] = entry
        record.refs += 1
        entry.attempts = attempts
        entry.ticket = ticket
        entry.ready_at = ready_at
        if timed_out:
            entry.last_error = "ack deadline passed"
        consumer = consumers.get(number)
        if kind == ENTRY_IN_FLIGHT and consumer in group.consumers:
            entry.state = IN_FLIGHT
            entry.consumer = consumer
            entry.sampled_at = sampled_at or None
            group.consumers[consumer][1] += 1
            timers.append((deadline_seq, deadline, entry))
        elif kind == ENTRY_IN_FLIGHT:
            # Its consumer's open record never landed: ready again, as a
            # closed consumer's deliveries are.
            ready.append((math.inf, entry))
        elif kind == ENTRY_READY:
            ready.append((ready_seq, entry))
        else:
            dead.append((deadline_seq, entry, DEAD_REASONS[reason]))
    for _, entry in sorted(ready, key=lambda item: item[0]):
        entry.state = READY
        group.ready += 1
        group.lanes[entry.record.lane].append((entry, entry.ticket))


def _after_fork() -> None:
    for backend in list(_instances):
        backend._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork)
