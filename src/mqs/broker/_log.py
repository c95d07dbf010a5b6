"""The log broker of one process: the memory backend's state, made durable.

`Broker(backend="log")` uses `mqs.broker._log_shared.SharedLogBackend`,
which lets several processes share one log directory and builds on the
record format, replay and compaction of `LogBackend` defined here. The
shm backend builds on it too. Used alone (as below), `LogBackend` is one
process's broker.

Every topic lives in a `TopicState`, as in the memory backend. Every
operation that changes a state is also appended to a `SegmentLog` as a
control record before the operation returns, and opening the broker
replays those records into fresh `TopicState` objects.

Records
    Each record is one operation with its arguments and the broker time
    ``now`` it ran at: declare (with the `TopicConfig` and the seed of
    the topic's retry jitter), delete, publish (the `Envelope` batch as
    plain tuples, which may leave out trailing fields at their defaults,
    and its wall-clock time; older logs hold `Envelope` objects, which
    replay too), open and close of a consumer, fetch (consumer,
    batch size, ack timeout, auto_ack: the deliveries it made), ack,
    nack, extend, release, dlq redrive, dlq purge and tick (timers fired
    by a `stats` call). The value is the pickled tuple ``(op, now,
    args)``. Pickle stores only mqs's own records (`TopicConfig`,
    `Envelope`, tuples of str, int and float) and the values the broker
    already takes from users (body, key, headers, dedup_id), which must
    therefore be picklable, as for the memory backend. Anyone who can
    write the log directory can run code in the broker's process, so
    the directory is created owner-only (mode 0700).

Replay
    `TopicState` is deterministic given its inputs: the clock it reads
    is pinned to each operation's recorded ``now``, message and consumer
    ids come from counters, and the retry jitter from a seeded
    generator. Replaying the records in order therefore rebuilds the
    exact state, delivery tags included, and redeliveries, expiries and
    dead letters happen again by themselves. A fetch that cannot change
    anything (no timer due, and nothing ready or no prefetch room) is
    neither run nor logged, so idle consumers add no records.

Broker time
    ``now`` is `time.monotonic` plus an offset fixed when the broker
    opens, chosen so that broker time equals `time.time`, and never
    below the last recorded ``now``. Delays and ack deadlines are
    therefore kept as wall-clock times across restarts: a delay due
    during the downtime fires at the first operation after the restart,
    and none fires before its due time unless the wall clock is moved
    forward meanwhile.

Restarts
    The consumers that held messages belong to the process that is
    gone, so opening the broker closes every consumer it replayed: its
    in-flight messages go back to the tail of their lanes at once, with
    their attempts kept (the next delivery has ``attempts + 1``).
    Delayed messages keep their due time; DLQ contents, dedup ids (for
    the rest of their window), counters, groups and topic settings
    survive as they were.

Durability
    ``fsync="always"``: publish, ack, nack, auto_ack deliveries, topic
    and DLQ changes return after a sync that covers their record;
    threads share syncs (the sync runs outside the broker lock, so it
    covers every record appended meanwhile). Manual deliveries, extend,
    release and consumer open and close are not synced by themselves,
    because a restart returns every in-flight message anyway; a later
    synced record covers them. If one is lost with the power, the
    message's next delivery counts one attempt less. ``"interval"``
    (default): records survive kill -9 of the process at once and a
    power loss after `fsync_interval_s` at most. ``"never"``: kill -9
    as "interval"; a power loss may lose what was not synced at close.
    A torn last record (kill during the append) is cut by the log's
    recovery, so the broker opens in the state before that operation.

Compaction
    The directory at `path` holds ``CURRENT`` (the name of the active
    log) and that log, ``log-NNNNNN``. A log starts with a snapshot of
    the whole broker (pickled `TopicState.snapshot` dicts, split into
    records of at most half a segment). When the records after it pass
    `compact_bytes`, at open after a replay of any record, and at
    close, the broker writes a snapshot into a new log, syncs it,
    switches ``CURRENT`` to it (atomic rename) and deletes the old log.
    Replay time and disk use are thus bounded by the live state plus
    `compact_bytes`. Compaction holds the broker lock for the time the
    snapshot takes to write, which grows with the stored messages (about
    1 s per million on a 2-vCPU VM, most of it building and appending
    the columns of `TopicState.snapshot`).
    `SharedLogBackend` appends a random incarnation id to the key of the
    first snapshot record, so that it can tell two logs of the same name
    apart; replay reads every keyed record as a snapshot part.

Limits
    One `LogBackend` per `path`: it holds a lock file, and a second one
    on the same path (in this process or another) raises `LogLocked`.
    `SharedLogBackend` takes the same lock as its writer lock, so the
    two must not be mixed on one path. A `LogBackend` must not be used
    in a child forked from the process that opened it.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Sequence
from typing import Any

from mqs._dirkind import LOG_BROKER, check_directory_kind
from mqs._seglog import SegmentLog, check_options
from mqs.broker._backend import Backend, Delivery, Envelope, GroupStats
from mqs.broker._memory import (
    MemoryBackend,
    _deleted_while_full,
    _redeclare_changes,
    _sample_every,
    _slice,
    _stayed_full,
)
from mqs.broker._policy import TopicConfig
from mqs.broker._state import TopicState, replaying
from mqs.errors import (
    BackendUnavailable,
    LogCorrupted,
    LogLocked,
    LogVersionError,
    MessageTooLarge,
    RecoveryPointError,
    ShutDown,
)

__all__ = ["LogBackend"]

logger = logging.getLogger(__name__)

FSYNC_MODES = ("always", "interval", "never")
# The first field of every snapshot; a newer format raises LogVersionError.
# Version 3 stores each topic as `TopicState.snapshot` columns; version 1,
# still read, stored the `TopicState` objects themselves. (Version 2 is
# SharedLogBackend's.)
FORMAT = ("mqs.broker.log", 3)
OBJECT_FORMAT = ("mqs.broker.log", 1)
CURRENT = "CURRENT"
# Names of log directories: "log-" and a number of at least six digits.
_LOG_NAME = re.compile(r"log-[0-9]{6,}")
LOCK = "lock"
# Record keys: snapshot parts carry one, operations none. Replay reads
# any key as a snapshot part, so the first part may carry more bytes.
_SNAPSHOT_KEY = b"s"
# Segment layout (csrc/mqs_seglog.h): a header of 4096 bytes, then
# records that each start with a header of 32 bytes. The longest record
# key is the first key of a snapshot: _SNAPSHOT_KEY and an 8-byte
# incarnation id (see `_log_shared._incarnation_key`).
_SEGMENT_HEADER_BYTES = 4096
_RECORD_HEADER_BYTES = 32
_MAX_KEY_BYTES = len(_SNAPSHOT_KEY) + 8
# Operations whose lost record can only cause a redelivery: with
# sync_acks=False they return without waiting for a sync.
_ACK_OPS = frozenset({"ack", "ack_many", "nack"})


class LogBackend(MemoryBackend):
    """Broker state in memory, made durable by control records in a log.

    Parameters
    ----------
    path : str or os.PathLike
        Directory of the broker, created (mode 0700) if missing.
    fsync : {"interval", "always", "never"}
        When records reach the device; see the module docs.
    fsync_interval_s : float
        "interval" only: max age in seconds of an unsynced record.
    segment_bytes : int
        Size of each log segment file (a multiple of 4096). A publish
        batch is split into records of at most half a segment; one
        message that does not fit raises `MessageTooLarge`.
    compact_bytes : int
        Bytes of records after the last snapshot that trigger a new
        snapshot.
    sample_every : int, None or "default"
        Latency sampling of new topics, as for `MemoryBackend`. Replay
        records the sampled latencies again, so the histograms survive
        a restart.

    Raises
    ------
    LogLocked
        If another broker (in this or another process) has `path` open.
    NotADirectoryError
        If `path` is a file.
    DirectoryKindError
        If `path` is a durable SharedQueue's or a bare segment log's
        directory.
    TypeError, ValueError
        If an option is invalid, checked before anything is created, or
        if `path` contains files that are not a log broker's.
    LogVersionError
        If the log was written by a newer mqs.
    """

    name = "log"
    pickles_messages = True
    # The format this class writes into snapshots, and those it reads.
    _snapshot_format = FORMAT
    _formats_read: tuple[tuple, ...] = (OBJECT_FORMAT, FORMAT)
    # Whether acks, nacks and auto_ack deliveries wait for a sync under
    # fsync="always" (SharedLogBackend makes it an option).
    _sync_acks = True
    # MemoryBackend's direct paths skip the records that this class and
    # its subclasses write, so they get the defaults back (which leave
    # everything to `publish` and `fetch`) unless they override them.
    publish_one = Backend.publish_one
    fetch_one = Backend.fetch_one

    def __init__(self, path: str | os.PathLike[str], *,
                 fsync: str = "interval", fsync_interval_s: float = 0.05,
                 segment_bytes: int = 16 << 20,
                 compact_bytes: int = 64 << 20,
                 sample_every: int | None | str = "default") -> None:
        _check_log_options(path, fsync, fsync_interval_s, segment_bytes,
                           compact_bytes, sample_every)
        super().__init__(clock=self._read_clock,
                         sample_every=_sample_every(sample_every))
        self.path = os.fspath(path)
        self.fsync = fsync
        self._fsync_interval_s = fsync_interval_s
        self._segment_bytes = segment_bytes
        self._compact_bytes = compact_bytes
        self._max_record = max_record_bytes(segment_bytes)
        # Broker time: see the module docs.
        self._offset = time.time() - time.monotonic()
        self._last = 0.0
        self._now = 0.0
        self._next_message = 0
        self._next_consumer = 0
        self._log: SegmentLog | None = None
        self._log_name = ""
        self._bytes_since_snapshot = 0
        self._failed: BaseException | None = None
        self._closed = False
        self._lock_fd = _lock_directory(self.path)
        try:
            self._open()
        except BaseException:
            if self._log is not None:
                self._log.close()
            os.close(self._lock_fd)
            raise

    # Clocks and ids.

    def _read_clock(self) -> float:
        now = max(time.monotonic() + self._offset, self._last)
        self._last = now
        return now

    def _pinned(self) -> float:
        """Return the time of the running operation (every TopicState's
        clock)."""
        return self._now

    def _tick(self) -> float:
        """Set the time of the next operation; the caller holds the lock."""
        # `_read_clock` inlined: this runs in every operation.
        now = time.monotonic() + self._offset
        if now < self._last:
            now = self._last
        self._last = now
        if now < self._now:
            now = self._now
        self._now = now
        return now

    def _next_id(self) -> str:
        self._next_message += 1
        return str(self._next_message)

    def _new_state(self, config: TopicConfig, seed: int) -> TopicState:
        state = TopicState(config, self._pinned, self._next_id,
                           self.sample_every)
        state.rng = random.Random(seed)
        return state

    # Opening, replay and compaction.

    def _open(self) -> None:
        name = read_checked_current(self.path)
        if name is None:
            _check_empty(self.path)
            self._compact()
            return
        self._remove_stale_logs(name)
        replayed = self._replay(name)
        with self._lock:
            closed = self._close_stale_consumers()
            if replayed or closed:
                self._compact()

    def _close_stale_consumers(self) -> int:
        """Close every consumer that the replay restored and return how
        many there were. Their processes are gone, so their in-flight
        messages go back to their lanes. The caller holds the lock."""
        stale = [(topic, group, consumer)
                 for topic, state in self._topics.items()
                 for group, group_state in state.groups.items()
                 for consumer in group_state.consumers]
        self._tick()
        for topic, group, consumer in stale:
            self._logged("close", topic, group, consumer)
        if stale:
            logger.info("log broker %s: closed %d consumers of processes "
                        "that are gone; their in-flight messages are ready "
                        "again", self.path, len(stale))
        return len(stale)

    def _replay(self, name: str) -> int:
        """Open log `name` and apply its records; return how many
        operations it replayed after the snapshot."""
        log = SegmentLog(os.path.join(self.path, name),
                         segment_bytes=self._segment_bytes,
                         fsync=self._segment_fsync(),
                         fsync_interval_s=self._fsync_interval_s)
        self._log = log
        self._log_name = name
        with replaying():
            return self._apply_log_records(log, name)

    def _apply_log_records(self, log: SegmentLog, name: str) -> int:
        """Apply the records of `log` (named `name`) to the state; return
        how many operations it applied after the snapshot."""
        parts = []
        replayed = 0
        records = iter(log)
        while True:
            try:
                record = next(records, None)
            except LogCorrupted as exc:
                raise LogCorrupted(
                    f"log broker {self.path}: {exc}. Its state cannot be "
                    f"restored past a damaged record: restore the "
                    f"directory from a backup, or see what is left with "
                    f"`mqs dump {os.path.join(self.path, name)} "
                    f"--verify`") from exc
            if record is None:
                break
            if record.key is not None:
                parts.append(bytes(record.value))
                continue
            if parts:
                self._load_snapshot(b"".join(parts))
                parts = []
            op, now, args = pickle.loads(record.value)
            self._now = self._last = max(self._last, now)
            try:
                self._apply(op, args)
            except Exception:
                # The operation raised the same way when it first ran;
                # its record stays because it may have changed the state
                # before raising (a partial publish).
                logger.debug("replayed %s raised", op, exc_info=True)
            self._bytes_since_snapshot += len(record.value)
            replayed += 1
        if parts:
            self._load_snapshot(b"".join(parts))
        return replayed

    def _load_snapshot(self, data: bytes) -> tuple:
        """Restore the state from a snapshot and return its format."""
        snapshot = pickle.loads(data)
        if snapshot[0] not in self._formats_read:
            raise LogVersionError(
                f"log broker {self.path!r} has format {snapshot[0]!r}, this "
                f"mqs reads {self._snapshot_format!r}; upgrade mqs to open "
                f"it")
        (_, self._next_message, self._next_consumer, now, topics,
         *extra) = snapshot
        self._now = self._last = max(self._last, now)
        self._topics = {
            name: TopicState.restore(data, self._pinned, self._next_id)
            for name, data in topics.items()}
        self._load_snapshot_extra(extra)
        return snapshot[0]

    def _load_snapshot_extra(self, extra: list) -> None:
        """Load the fields a subclass added after the topics (see
        `_snapshot_extra`)."""

    def _snapshot_extra(self) -> tuple:
        """Return the fields that follow the topics in a snapshot."""
        return ()

    def _snapshot_parts(self) -> list[Any]:
        """Return the pickled snapshot as bytes-like parts of at most
        `_max_record` bytes each, in order."""
        topics = {name: state.snapshot()
                  for name, state in self._topics.items()}
        parts = _Parts(self._max_record)
        pickle.dump(
            (self._snapshot_format, self._next_message,
             self._next_consumer, self._now, topics,
             *self._snapshot_extra()),
            parts, protocol=pickle.HIGHEST_PROTOCOL)
        return parts.finish()

    def _compact(self, first_key: bytes = _SNAPSHOT_KEY) -> None:
        """Write the state into a new log, switch CURRENT to it and
        delete the old one. The caller holds the lock (or is __init__).

        `first_key` is the key of the first snapshot record; it must
        start with ``_SNAPSHOT_KEY`` (SharedLogBackend appends the log's
        incarnation id to it).
        """
        parts = self._snapshot_parts()
        number = int(self._log_name[4:]) + 1 if self._log_name else 1
        name = f"log-{number:06d}"
        directory = os.path.join(self.path, name)
        if os.path.exists(directory):
            shutil.rmtree(directory)
        log = SegmentLog(directory, segment_bytes=self._segment_bytes,
                         fsync=self._segment_fsync(),
                         fsync_interval_s=self._fsync_interval_s)
        try:
            records = [(_SNAPSHOT_KEY, part) for part in parts] \
                or [(_SNAPSHOT_KEY, b"")]
            records[0] = (first_key, records[0][1])
            log.append_many(records)
            log.flush()
            _write_current(self.path, name)
        except BaseException:
            log.close()
            shutil.rmtree(directory, ignore_errors=True)
            raise
        old, old_name = self._log, self._log_name
        self._log, self._log_name = log, name
        self._bytes_since_snapshot = 0
        if old is not None:
            try:
                old.close()
            except RecoveryPointError as exc:
                # The directory is removed next, recovery point and all.
                logger.debug("log broker %s: %s", self.path, exc)
            shutil.rmtree(os.path.join(self.path, old_name),
                          ignore_errors=True)
        logger.debug("log broker %s: wrote a snapshot of %d bytes to %s",
                     self.path, sum(map(len, parts)), name)

    def _remove_stale_logs(self, current: str) -> None:
        """Delete logs that a compaction left behind when it was killed."""
        for entry in os.listdir(self.path):
            if entry.startswith("log-") and entry != current:
                shutil.rmtree(os.path.join(self.path, entry),
                              ignore_errors=True)

    # Logging operations.

    def _logged(self, op: str, *args: Any) -> Any:
        """Apply an operation at the current `_now` and append its record.

        The record is encoded first, so that a body pickle cannot store
        raises before the state changes. The caller holds the lock.
        """
        if self._failed is not None:
            raise self._failed_error()
        data = encode_record(op, self._now, args)
        if len(data) > self._max_record:
            raise MessageTooLarge(
                f"a {op} record of {len(data)} bytes does not fit in half "
                f"a log segment ({self._max_record} bytes); raise "
                f"segment_bytes or send smaller messages")
        try:
            return self._apply(op, args)
        finally:
            self._append(data)

    def _append(self, data: bytes) -> None:
        assert self._log is not None
        try:
            self._log.append(data)
        except BaseException as exc:
            self._fail_append(exc)
            raise
        self._bytes_since_snapshot += len(data)

    def _failed_error(self) -> BackendUnavailable:
        return BackendUnavailable(
            f"log broker {self.path!r} failed to append a record "
            f"({self._failed}); close it and open it again")

    def _fail_append(self, exc: BaseException) -> None:
        # The state already contains the operation, and later records
        # would not replay the same way without this one.
        self._failed = exc
        logger.exception("log broker %s: append failed; the broker "
                         "takes no more operations", self.path)

    def _segment_fsync(self) -> str:
        """Return the fsync mode of the segment logs this broker opens."""
        return _log_fsync(self.fsync)

    def _apply(self, op: str, args: tuple) -> Any:
        return getattr(self, "_do_" + op)(*args)

    def _after_write(self) -> None:
        """Compact when due; the caller holds the lock."""
        if self._bytes_since_snapshot > self._compact_bytes:
            self._compact()

    def _sync(self, log: SegmentLog | None) -> None:
        """Sync under fsync="always", outside the lock, so that threads
        share syncs."""
        if self.fsync != "always" or log is None:
            return
        try:
            log.flush()
        except ValueError:
            # A compaction closed this log after syncing its records.
            if not log.closed:
                raise

    def _check_open(self) -> None:
        if self._closed:
            raise ShutDown(f"log broker {self.path!r} is closed")

    # Operations, as applied live and in replay (the clock is `_now`).

    def _do_declare(self, config: TopicConfig, seed: int) -> None:
        state = self._topics.get(config.name)
        if state is None:
            self._topics[config.name] = self._new_state(config, seed)
        else:
            state.config = config

    def _do_delete(self, topic: str) -> None:
        del self._topics[topic]

    def _do_publish(self, topic: str, envelopes: list[Envelope],
                    wall: float, accepted: int) -> list[str]:
        if envelopes and type(envelopes[0]) is tuple:
            # A replayed record (see `encode_record`).
            envelopes = [Envelope(*fields) for fields in envelopes]
        return self._topic(topic).publish(envelopes, self._now, wall,
                                          accepted)

    def _do_open(self, topic: str, group: str, consumer: str, start: str,
                 prefetch: int, max_attempts: int | None) -> None:
        number = int(consumer[1:])
        self._next_consumer = max(self._next_consumer, number)
        self._topic(topic).open_consumer(group, consumer, start, prefetch,
                                         max_attempts, self._now)

    def _do_close(self, topic: str, group: str, consumer: str) -> int:
        state = self._topics.get(topic)
        if state is None:
            return 0
        return state.close_consumer(group, consumer, self._now)

    def _do_fetch(self, topic: str, group: str, consumer: str,
                  max_items: int, ack_timeout: float, auto_ack: bool
                  ) -> tuple[list[Delivery], float | None]:
        state = self._topic(topic)
        found = state.fetch(group, consumer, max_items, ack_timeout,
                            auto_ack, self._now)
        return found, state.next_wake(group, self._now)

    def _do_ack(self, topic: str, group: str, tag: Any) -> bool:
        return self._topic(topic).ack(group, tag, self._now)

    def _do_nack(self, topic: str, group: str, tag: Any, requeue: bool,
                 delay: float | None, error: str | None) -> bool:
        return self._topic(topic).nack(group, tag, requeue, delay, error,
                                       self._now)

    def _do_extend(self, topic: str, group: str, tag: Any, seconds: float
                   ) -> bool:
        return self._topic(topic).extend(group, tag, seconds, self._now)

    def _do_release(self, topic: str, group: str, tags: list[Any]) -> int:
        state = self._topics.get(topic)
        return 0 if state is None else state.release(group, tags, self._now)

    def _do_redrive(self, topic: str, ids: list[str] | None) -> int:
        return self._topic(topic).dlq_redrive(ids, self._now)

    def _do_purge(self, topic: str) -> int:
        return self._topic(topic).dlq_purge()

    def _do_tick(self, topic: str) -> None:
        self._topic(topic).advance(self._now)

    # Topics.

    def declare_topic(self, config: TopicConfig, replace: bool = False
                      ) -> TopicConfig:
        with self._lock:
            self._check_open()
            state = self._topics.get(config.name)
            if state is not None and not _redeclare_changes(
                    state.config, config, replace):
                return config
            self._tick()
            self._logged("declare", config, random.getrandbits(64))
            self._notify()
            log = self._log
        self._sync(log)
        return config

    def delete_topic(self, topic: str) -> None:
        with self._lock:
            self._check_open()
            self._topic(topic)
            self._tick()
            self._logged("delete", topic)
            self._notify()
            log = self._log
        self._sync(log)

    # Producing.

    def publish(self, topic: str, envelopes: Sequence[Envelope],
                timeout: float | None) -> list[str]:
        deadline = None if timeout is None else self.clock() + timeout
        ids: list[str] = []
        waited = False
        try:
            with self._lock:
                while True:
                    self._check_open()
                    if waited and topic not in self._topics:
                        raise _deleted_while_full(topic, len(ids),
                                                  len(envelopes))
                    state = self._topic(topic)
                    now = self._tick()
                    if not self._publish_blocked(state, envelopes[len(ids)],
                                                 now):
                        ids += self._publish_chunks(
                            topic, list(envelopes[len(ids):]), len(ids))
                        self._notify()
                        self._after_write()
                    if len(ids) == len(envelopes):
                        return ids
                    wait = None if deadline is None else deadline - now
                    if wait is not None and wait <= 0:
                        raise _stayed_full(topic, state.config.maxsize,
                                           len(ids), len(envelopes))
                    self._wait(_slice(wait))
                    waited = True
        finally:
            self._sync(self._log)

    def _publish_chunks(self, topic: str, envelopes: list[Envelope],
                        accepted: int) -> list[str]:
        """Publish in records that fit the log; stop where the topic
        filled up."""
        wall = time.time()
        try:
            return self._logged("publish", topic, envelopes, wall, accepted)
        except MessageTooLarge:
            if len(envelopes) == 1:
                raise
        half = len(envelopes) // 2
        ids = self._publish_chunks(topic, envelopes[:half], accepted)
        if len(ids) < half:
            return ids
        return ids + self._publish_chunks(topic, envelopes[half:],
                                          accepted + half)

    @staticmethod
    def _publish_blocked(state: TopicState, first: Envelope, now: float
                         ) -> bool:
        """Return whether a publish would store nothing and change nothing
        (a full topic that blocks), so it need not run or be logged."""
        config = state.config
        if config.when_full != "block" or state.room() != 0:
            return False
        if first.dedup_id is not None and config.dedup_window:
            return False
        wake = state.wheel.next_deadline()
        if wake is not None and wake <= now:
            return False
        return not (state.retained and state.retained[0].retain_until <= now)

    # Consuming.

    def open_consumer(self, topic: str, group: str, *, start: str,
                      prefetch: int, max_attempts: int | None,
                      ack_timeout: float | None = None) -> str:
        with self._lock:
            self._check_open()
            self._topic(topic)
            self._next_consumer += 1
            consumer = f"c{self._next_consumer}"
            self._tick()
            self._logged("open", topic, group, consumer, start, prefetch,
                         max_attempts)
            self._notify()
        return consumer

    def close_consumer(self, topic: str, group: str, consumer: str) -> int:
        with self._lock:
            if self._closed or topic not in self._topics:
                return 0
            self._tick()
            returned = self._logged("close", topic, group, consumer)
            self._notify()
        return returned

    def fetch(self, topic: str, group: str, consumer: str, max_items: int,
              *, ack_timeout: float, auto_ack: bool,
              timeout: float | None) -> list[Delivery]:
        found = super().fetch(topic, group, consumer, max_items,
                              ack_timeout=ack_timeout, auto_ack=auto_ack,
                              timeout=timeout)
        if found and auto_ack and self._sync_acks:
            # Only an auto_ack delivery must not be lost: the message is
            # finished. A lost manual delivery is undone by the restart,
            # which returns every in-flight message anyway.
            self._sync(self._log)
        return found

    async def fetch_async(self, topic: str, group: str, consumer: str,
                          max_items: int, *, ack_timeout: float,
                          auto_ack: bool, timeout: float | None
                          ) -> list[Delivery]:
        found = await super().fetch_async(
            topic, group, consumer, max_items, ack_timeout=ack_timeout,
            auto_ack=auto_ack, timeout=timeout)
        if found and auto_ack and self.fsync == "always" \
                and self._sync_acks:
            await asyncio.get_running_loop().run_in_executor(
                None, self._sync, self._log)
        return found

    def _try_fetch(self, topic, group, consumer, max_items, ack_timeout,
                   auto_ack) -> tuple[list[Delivery], float | None]:
        """Fetch without waiting; the caller holds the lock."""
        self._check_open()
        state = self._topic(topic)
        now = self._tick()
        if _fetch_is_idle(state, group, consumer, auto_ack, now):
            return [], state.wheel.next_deadline()
        quiet = _fetch_is_quiet(state, auto_ack, now)
        found, wake = self._logged("fetch", topic, group, consumer,
                                   max_items, ack_timeout, auto_ack)
        if found or state.config.maxsize:
            # Deliveries, expiries and dead letters may free room.
            self._notify()
        # The shm backends wake the waiters of every process when the
        # section ends, except after a fetch that can only take messages.
        self._quiet = quiet
        self._after_write()
        return found, wake

    def ack(self, topic: str, group: str, tag: Any) -> bool:
        return self._settle("ack", topic, group, tag)

    def nack(self, topic: str, group: str, tag: Any, *, requeue: bool,
             delay: float | None, error: str | None) -> bool:
        return self._settle("nack", topic, group, tag, requeue, delay, error)

    def extend(self, topic: str, group: str, tag: Any, seconds: float
               ) -> bool:
        return self._settle("extend", topic, group, tag, seconds, sync=False)

    def release(self, topic: str, group: str, tags: Sequence[Any]) -> int:
        with self._lock:
            if self._closed or topic not in self._topics:
                return 0
            self._tick()
            returned = self._logged("release", topic, group, list(tags))
            self._notify()
        return returned

    def _settle(self, op: str, topic: str, *args: Any, sync: bool = True
                ) -> Any:
        with self._lock:
            self._check_open()
            self._topic(topic)
            self._tick()
            result = self._logged(op, topic, *args)
            self._notify()
            self._after_write()
            log = self._log
        if sync and (self._sync_acks or op not in _ACK_OPS):
            self._sync(log)
        return result

    # Dead letters.

    def dlq_redrive(self, topic: str, ids: Sequence[str] | None = None
                    ) -> int:
        return self._settle("redrive", topic,
                            None if ids is None else list(ids))

    def dlq_purge(self, topic: str) -> int:
        return self._settle("purge", topic)

    # State.

    def stats(self, topic: str) -> dict[str, int]:
        with self._lock:
            state, _ = self._advanced_topic(topic)
            return state.stats()

    def group_stats(self, topic: str) -> list[GroupStats]:
        with self._lock:
            state, now = self._advanced_topic(topic)
            return state.group_stats(now)

    def _advanced_topic(self, topic: str) -> tuple[TopicState, float]:
        """Return the state of `topic` and the operation's time, after
        logging a tick if a timer of the topic is due, so that the stats
        count its expiries. The caller holds the lock."""
        self._check_open()
        state = self._topic(topic)
        now = self._tick()
        wake = state.wheel.next_deadline()
        if wake is not None and wake <= now:
            self._logged("tick", topic)
        return state, now

    def close(self) -> None:
        """Write a snapshot, close the log and release the directory.

        Idempotent. Consumers and producers must be closed first.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._failed is None and self._bytes_since_snapshot:
                    self._compact()
            finally:
                try:
                    if self._log is not None:
                        close_segment_log(self._log, self.path)
                finally:
                    os.close(self._lock_fd)
            self._notify()

    def __repr__(self) -> str:
        return f"<LogBackend {self.path!r} fsync={self.fsync!r}>"


def close_segment_log(log: SegmentLog, broker_path: str,
                      directory_gone: bool = False) -> None:
    """Close the broker's `log`, logging a failed recovery point write.

    The records are intact then, so the broker closes anyway, and the
    next open checks the CRCs of the records the recovery point does not
    cover. A failed final sync (`LogPoisoned`) may have lost records and
    is raised. With `directory_gone` (the broker directory was removed
    or replaced, which the caller reported already), no open reads this
    log again, so the failure is logged at DEBUG level only.
    """
    try:
        log.close()
    except RecoveryPointError as exc:
        level = logging.DEBUG if directory_gone else logging.WARNING
        logger.log(level, "log broker %s: %s", broker_path, exc)


def encode_record(op: str, now: float, args: tuple) -> bytes:
    """Return the record of operation `op` run at broker time `now`.

    A publish record keeps its envelopes as plain tuples, because pickle
    stores a named tuple by class reference and takes about three times
    as long for it. `_do_publish` reads both forms, so logs written with
    `Envelope` objects (before this encoding) still replay.
    """
    if op == "publish":
        args = (args[0], [tuple(envelope) for envelope in args[1]],
                *args[2:])
    return pickle.dumps((op, now, args), protocol=pickle.HIGHEST_PROTOCOL)


def _fetch_is_quiet(state: TopicState, auto_ack: bool, now: float) -> bool:
    """Return whether a fetch at `now` can only take messages, so that
    its record need not wake anyone waiting for messages.

    That holds when no timer is due (a due one makes messages ready
    again), the fetch does not finish messages (auto_ack), and the topic
    has no maxsize (an expiry during the fetch could free room).
    """
    if auto_ack or state.config.maxsize:
        return False
    wake = state.wheel.next_deadline()
    return wake is None or wake > now


def _fetch_is_idle(state: TopicState, group: str, consumer: str,
                   auto_ack: bool, now: float) -> bool:
    """Return whether a fetch would deliver nothing and change nothing:
    no timer due, and nothing ready or no prefetch room."""
    group_state = state.groups.get(group)
    if group_state is None:
        return False
    slot = group_state.consumers.get(consumer)
    if slot is None:
        return False
    wake = state.wheel.next_deadline()
    if wake is not None and wake <= now:
        return False
    return group_state.ready == 0 or (not auto_ack and slot[1] >= slot[0])


def _log_fsync(mode: str) -> str:
    # Under "always" the broker syncs by itself, outside its lock, so the
    # log must not sync inside append (under the lock).
    return "never" if mode == "always" else mode


def _lock_directory(path: str) -> int:
    """Create `path` if needed and take its lock; return the lock's fd."""
    _make_directory(path)
    lock = os.path.join(path, LOCK)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(path)
        os.close(fd)
        where = "in this or another process" if holder is None \
            else f"in process {holder}"
        raise LogLocked(
            errno.EAGAIN,
            f"another Broker(backend='log') has {path!r} open, {where}; "
            f"close it first, or give this broker its own path (one "
            f"process per log broker path)", lock) from None
    # The pid is informational, for the message above: the lock itself
    # is what proves the holder alive.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def max_record_bytes(segment_bytes: int) -> int:
    """Return the largest record value, in bytes, that the broker writes
    into segments of `segment_bytes`: half a segment, or less when the
    segment header leaves less room than that for one record (the
    smallest segments, 8192 bytes)."""
    room = segment_bytes - _SEGMENT_HEADER_BYTES - _RECORD_HEADER_BYTES
    return min(segment_bytes // 2, room - _MAX_KEY_BYTES)


def _check_log_options(path: Any, fsync: Any, fsync_interval_s: Any,
                       segment_bytes: Any, compact_bytes: Any,
                       sample_every: Any) -> None:
    """Raise TypeError or ValueError for an invalid log broker option.

    Runs before the broker creates its directory or journal, so that a
    bad option leaves nothing behind.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"path must be a str or os.PathLike, got "
            f"{type(path).__name__} {path!r}")
    if os.fspath(path) == "":
        raise ValueError("path must name the log broker's directory, got "
                         "''; pass a directory such as 'broker-data'")
    if not isinstance(fsync, str):
        raise TypeError(
            f"fsync must be a str ('always', 'interval' or 'never'), got "
            f"{type(fsync).__name__} {fsync!r}")
    if fsync not in FSYNC_MODES:
        raise ValueError(
            f"fsync must be 'always', 'interval' or 'never', got "
            f"{fsync!r}")
    check_options(segment_bytes, fsync, fsync_interval_s)
    if isinstance(compact_bytes, bool) or not isinstance(
            compact_bytes, int):
        raise TypeError(
            f"compact_bytes must be an int, got "
            f"{type(compact_bytes).__name__} {compact_bytes!r}")
    if compact_bytes < 1:
        raise ValueError(
            f"compact_bytes must be an int of 1 or more, got "
            f"{compact_bytes!r}")
    _sample_every(sample_every)


def _make_directory(path: str) -> list[str]:
    """Create the log broker directory `path` (mode 0700) and its missing
    parents, as ``os.makedirs`` does. Return the absolute paths of the
    directories that this call created, outermost first."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(
            errno.ENOTDIR,
            "a log broker needs a directory, not a file; pass a new or "
            "empty directory", path)
    check_directory_kind(path, LOG_BROKER)
    missing = []
    directory = os.path.abspath(path)
    while not os.path.isdir(directory):
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    created = []
    # One mkdir per level distinguishes the directories this call
    # created from those that a concurrent opener created first.
    for directory in reversed(missing):
        mode = 0o700 if directory == missing[0] else 0o777
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            continue
        created.append(directory)
    return created


def _read_current(path: str) -> str | None:
    """Return the name of the active log in `path`, or None if none. A
    byte that is not ASCII reads as U+FFFD, so such a name matches no log
    (`read_checked_current` reports it)."""
    try:
        with open(os.path.join(path, CURRENT), encoding="ascii",
                  errors="replace") as file:
            return file.read().strip() or None
    except FileNotFoundError:
        return None


def read_checked_current(path: str) -> str | None:
    """Return the name of the active log in `path`, or None if there is
    no CURRENT file. Raise `LogCorrupted` if CURRENT exists but does not
    name one of the broker's log directories.

    A restore reads CURRENT this way before it deletes the other logs as
    leftovers of a killed compaction, so a damaged CURRENT costs no log.
    """
    current = os.path.join(path, CURRENT)
    try:
        with open(current, "rb") as file:
            text = file.read().strip()
    except FileNotFoundError:
        return None
    name = text.decode("ascii", errors="replace")
    if _LOG_NAME.fullmatch(name) and os.path.isdir(os.path.join(path, name)):
        return name
    logs = sorted(entry for entry in os.listdir(path)
                  if _LOG_NAME.fullmatch(entry))
    found = ", ".join(logs) if logs else "none"
    raise LogCorrupted(
        f"log broker {path!r}: {CURRENT} names {name!r}, which is not a "
        f"log directory of the broker (log directories found: {found}); "
        f"nothing was changed. Restore the directory from a backup, or "
        f"write the name of the newest log directory into {current!r}",
        path=current)


def lock_holder(path: str) -> int | None:
    """Return the pid the lock file of log broker `path` names, if any.

    The pid is written by the process that took the lock; it is stale
    once that process is gone, so trust it only while the lock is held.
    """
    try:
        with open(os.path.join(path, LOCK), encoding="ascii") as file:
            text = file.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _check_empty(path: str) -> None:
    extra = sorted(set(os.listdir(path)) - {LOCK, CURRENT + ".tmp", "users"})
    # "broker.id" and its temporary names: the directory identity of the
    # shared log backend.
    extra = [name for name in extra
             if not name.startswith(("log-", "broker.id"))]
    if extra:
        raise ValueError(
            f"path {path!r} holds files that are not a log broker's "
            f"({', '.join(extra[:5])}) and no {CURRENT} file; give the "
            f"broker its own directory")


def _write_current(path: str, name: str) -> None:
    """Point CURRENT at log `name`: temporary file, fsync, rename, fsync
    of the directory, so a crash leaves the old or the new name."""
    temp = os.path.join(path, CURRENT + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as file:
        file.write(name + "\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, os.path.join(path, CURRENT))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Parts:
    """A file-like sink that `pickle.dump` writes a snapshot into, kept as
    parts of at most `max_bytes` each.

    The C pickler of CPython 3.11 (protocol 4 and later) passes a large
    bytes value, such as the snapshot's column of bodies, to `write` as
    the object itself. This sink keeps such a value as views, instead of
    copying it into one output buffer first.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._parts: list[Any] = []
        # Small writes (pickle frames) joined into one part later.
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def write(self, data: Any) -> int:
        if type(data) is not bytes:
            # A buffer that the pickler might reuse: keep a copy.
            data = bytes(data)
        size = len(data)
        if self._pending_bytes + size > self._max_bytes:
            self._flush_pending()
        if size <= self._max_bytes:
            self._pending.append(data)
            self._pending_bytes += size
            return size
        view = memoryview(data)
        step = self._max_bytes
        self._parts += [view[start:start + step]
                        for start in range(0, size, step)]
        return size

    def _flush_pending(self) -> None:
        if self._pending:
            self._parts.append(b"".join(self._pending))
            self._pending = []
            self._pending_bytes = 0

    def finish(self) -> list[Any]:
        self._flush_pending()
        return self._parts
