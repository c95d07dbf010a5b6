# Durable SharedQueue: included at the end of _shared.pyx, so it shares
# that module's cimports and reaches SharedQueue's C fields.
#
# SharedQueue(persist=path) keeps every message in a segment log at
# `path`. Producers put into the shared ring as usual (the inbox). In one
# process at a time, the one holding the log's writer lock, a thread (the
# appender) copies inbox records into the log in ring order, then frees
# their ring space. Consumers take log offsets from a cursor in the
# control block (csrc/mqs_durable.h) and read the records from the log.
# Each log record's key holds the inbox ring's secret, the record's ring
# position and its record type, so an appender that takes over after
# another died skips what that one appended but had not yet freed.
#
# Consumer groups: each group has its own cursor in the control block,
# committed to the log as the consumer offset of group "queue" (group 0)
# or "queue-<n>". Segments below every group's committed cursor are
# deleted (retention), one commit round late, and never at or above an
# offset that a live consumer announced in its `reading` word before it
# claimed (see mqs_durable.h), so a consumer that pauses between its
# claim and its read still finds its record.
#
# A bounded queue (maxsize > 0) counts its messages in the control
# block's `stored` word: a put reserves one by CAS before it writes into
# the inbox, and the rise of the smallest group cursor gives them back.
#
# Delayed messages travel through the inbox like others (their record
# type has RTYPE_DELAYED set and the payload starts with the due time in
# wall-clock ns) and the appender writes them to a second log in the
# `delayed` subdirectory, keyed with that due time. The appender keeps
# the schedule in memory, rebuilt from that log when it takes over, and
# when a message is due copies it into the main log, then appends a
# mark record listing the released offsets to the delayed log.

from libc.stdint cimport uint8_t
from libc.stdlib cimport free, malloc
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec
from posix.mman cimport (
    MAP_FAILED,
    MAP_SHARED,
    PROT_READ,
    PROT_WRITE,
    mmap,
    munmap,
)

from mqs.includes.mqs_durable cimport (
    MQS_DQ_APPENDED_OFFSET,
    MQS_DQ_APPENDED_POS,
    MQS_DQ_CURSOR,
    MQS_DQ_DAMAGED,
    MQS_DQ_DELAYED,
    MQS_DQ_DURABLE_POS,
    MQS_DQ_FILE_BYTES,
    MQS_DQ_GROUPS,
    MQS_DQ_LOST,
    MQS_DQ_MAX_GROUPS,
    MQS_DQ_MAXSIZE,
    MQS_DQ_RETAINED_OFFSET,
    MQS_DQ_READERS,
    MQS_DQ_SEGMENT_BYTES,
    MQS_DQ_STORED,
    mqs_dq_add,
    mqs_dq_claim,
    mqs_dq_control_t,
    mqs_dq_get,
    mqs_dq_get_cursor,
    mqs_dq_gather_count,
    mqs_dq_gathered,
    mqs_dq_get_reading,
    mqs_dq_min_cursor,
    mqs_dq_not_empty,
    mqs_dq_progress,
    mqs_dq_progress_waiters,
    mqs_dq_reading_fence,
    mqs_dq_release_taken,
    mqs_dq_reserve,
    mqs_dq_secret,
    mqs_dq_set,
    mqs_dq_set_gather,
    mqs_dq_set_reading,
    mqs_dq_setup,
    mqs_dq_unreserve,
)
from mqs.includes.mqs_seglog cimport (
    MQS_SEGLOG_FSYNC_ALWAYS,
    mqs_seglog_entry_t,
)
from mqs.includes.mqs_wait cimport mqs_wait_sleep
from mqs._seglog cimport SegmentLog as _SegmentLogType

import atexit
import collections
import heapq
import struct
import threading

# Consumer group of the log that stores the cursor of group 0; group n
# uses DURABLE_GROUP-n.
DURABLE_GROUP = "queue"
CONTROL_FILE = QUEUE_CONTROL_FILE
DELAYED_DIR = "delayed"
_KEY = struct.Struct("<QqH")  # ring secret, ring position, record type
# _KEY.size, for the appender's C path that writes keys without _KEY.
DEF KEY_BYTES = 18
# fsync="always": after a sync, the appender waits for the producers it
# woke to put again before it syncs again, for at most twice the last
# append and sync took, bounded to 20 us - 1 ms (see _gather).
DEF GATHER_FACTOR = 2
DEF GATHER_MIN_NS = 20000
DEF GATHER_MAX_NS = 1000000
# Gathers in a row that must reach their count before the appender
# counts one more of the waiters again (see _gather).
DEF GATHER_TRUST_ROUNDS = 64
# The key of a delayed message (in the delayed log: the due time, wall
# clock ns), of a released copy (in the main log: its offset in the
# delayed log) and of a mark (0). A released copy and a mark hold the
# ring position before the inbox head in place of their own.
_KEY_EXTRA = struct.Struct("<QqHq")
_TIME = struct.Struct("<q")
# Record type of a mark in the delayed log: its value lists the offsets
# released (int64 each).
DEF TYPE_MARK = 0xfffe
# Flag on the record type of a delayed message in the inbox ring.
DEF RTYPE_DELAYED = 0x8000
_FSYNC_MODES = ("always", "interval", "never")
# Records the appender moves per log append, at most.
DEF APPEND_BATCH = 1024
# How often a process without the writer lock tries to take it, and how
# often the appender commits the cursor to the log.
DEF TAKEOVER_POLL_NS = 50000000
DEF COMMIT_EVERY_NS = 200000000
# How long close() spends moving what is left in the inbox into the log.
DEF CLOSE_DRAIN_NS = 5000000000
# How long a new handle waits for the appender of its ring to show up.
DEF JOIN_TIMEOUT_NS = 2000000000
DEF DEFAULT_SEGMENT_BYTES = 64 << 20

_durables = weakref.WeakSet()
# Tests only: called by a consumer between claiming offsets and reading
# them, to pause it there.
_after_claim_hook = None


def _close_durables_at_exit():
    for durable in list(_durables):
        try:
            (<_Durable>durable).close()
        except Exception:
            logger.exception("closing a durable queue at exit failed")


atexit.register(_close_durables_at_exit)


def _appender_main(ref):
    """Body of the appender thread; holds the _Durable only weakly."""
    while True:
        durable = ref()
        if durable is None or (<_Durable>durable)._stopping:
            return
        try:
            (<_Durable>durable)._run_once()
        except Exception:
            logger.exception("durable queue %s: appender step failed",
                             (<_Durable>durable).path)
            time.sleep(0.5)
        del durable


cdef inline int64_t _wall_clock_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline void _store_le(uint8_t *out, uint64_t value,
                           int size) noexcept nogil:
    cdef int i
    for i in range(size):
        out[i] = <uint8_t>(value >> (8 * i))


cdef inline void _store_key(uint8_t *out, uint64_t secret, int64_t position,
                            uint16_t rtype) noexcept nogil:
    """Write the key of an immediate message as _KEY.pack does."""
    _store_le(out, secret, 8)
    _store_le(out + 8, <uint64_t>position, 8)
    _store_le(out + 16, rtype, 2)


def _group_log_name(group):
    """Name of the log consumer group that stores `group`'s cursor."""
    return DURABLE_GROUP if group == 0 else f"{DURABLE_GROUP}-{group}"


def _check_queue_log(log, path):
    """Raise if the log at `path` holds records a durable queue did not
    write (their key is not a queue key)."""
    if log.end_offset <= log.start_offset:
        return
    key = log.read_record(log.end_offset - 1).key
    if key is None or len(key) not in (_KEY.size, _KEY_EXTRA.size):
        raise ValueError(
            f"persist={path!r} holds a segment log that a durable "
            f"SharedQueue did not write; give the queue its own directory")


cdef dict _durable_stats_fields(mqs_dq_control_t *control, object reader,
                                str path, int64_t inbox):
    """Return the SharedQueueStats fields of a durable queue: per group
    lag in messages (log plus `inbox`) and seconds, cursors and
    committed offsets. Only loads from the control block."""
    cdef int groups = <int>mqs_dq_get(control, MQS_DQ_GROUPS)
    cdef int64_t end = mqs_dq_get(control, MQS_DQ_APPENDED_OFFSET)
    cdef int64_t now = time.time_ns()
    groups = min(max(groups, 1), MQS_DQ_MAX_GROUPS)
    cursors = [mqs_dq_get_cursor(control, g) for g in range(groups)]
    lag_seconds = []
    for cursor in cursors:
        lag_seconds.append(
            _age_seconds(reader, cursor, now) if cursor < end else 0.0)
    return dict(
        persist=path, groups=groups,
        lag=tuple(max(0, end - cursor) + inbox for cursor in cursors),
        dequeued=tuple(cursors), enqueued=end + inbox,
        maxsize=mqs_dq_get(control, MQS_DQ_MAXSIZE),
        delayed=mqs_dq_get(control, MQS_DQ_DELAYED),
        committed=tuple(reader.committed(_group_log_name(g))
                        for g in range(groups)),
        lag_seconds=tuple(lag_seconds),
        damaged_records=(mqs_dq_get(control, MQS_DQ_DAMAGED)
                         + mqs_dq_get(control, MQS_DQ_LOST)))


cdef double _age_seconds(object reader, int64_t offset, int64_t now_ns):
    """Seconds since the record at `offset` was appended, 0.0 if it is
    gone or not visible yet."""
    try:
        timestamp = reader.read_record(offset).timestamp
    except LogCorrupted:
        return 0.0
    except OffsetOutOfRange:
        try:
            reader.refresh()
            timestamp = reader.read_record(offset).timestamp
        except (OffsetOutOfRange, LogCorrupted):
            return 0.0
    return max(0.0, (now_ns - timestamp) / 1e9)


def _persist_note_path(name):
    """File next to a named queue's ring that stores its log directory,
    so that tools reading the ring find the durable queue behind it."""
    return os.path.join(SHM_DIR, f"mqs-persist.{name}")


def _is_power_of_ten(int64_t number):
    while number >= 10 and number % 10 == 0:
        number //= 10
    return number == 1


def _same_directory(first, second):
    """Return whether two paths name one directory (the second may not
    exist yet)."""
    try:
        return os.path.samefile(first, second)
    except OSError:
        return os.path.abspath(first) == os.path.abspath(second)


def _write_persist_note(name, path):
    """Store the log directory of durable queue `name` (atomic rename)."""
    note = _persist_note_path(name)
    data = os.path.abspath(path).encode()
    try:
        with open(note, "rb") as existing:
            if existing.read() == data:
                return
    except OSError:
        pass
    temp = f"{note}.{os.getpid()}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                     | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(temp, note)
    except OSError:
        # Only tools (mqs stat, top, the exporter) read it.
        logger.debug("durable queue %s: cannot write %s", path, note,
                     exc_info=True)


cdef object _noted_log_of(str name, uint64_t ring_secret):
    """Return the log directory that the persist note of queue `name`
    names when that directory's control block belongs to the ring of
    `ring_secret` (the durable queue behind that ring), else None."""
    cdef void *address
    cdef uint64_t secret
    try:
        with open(_persist_note_path(name), "rb") as note:
            path = note.read().decode()
        fd = os.open(os.path.join(path, CONTROL_FILE),
                     os.O_RDONLY | os.O_CLOEXEC)
    except (OSError, UnicodeDecodeError):
        return None
    try:
        if os.fstat(fd).st_size < MQS_DQ_FILE_BYTES:
            return None
        address = mmap(NULL, MQS_DQ_FILE_BYTES, PROT_READ, MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if address == MAP_FAILED:
        return None
    secret = mqs_dq_secret(<mqs_dq_control_t *>address)
    munmap(address, MQS_DQ_FILE_BYTES)
    return path if secret != 0 and secret == ring_secret else None


def _with_durable_stats(stats, uint64_t ring_secret):
    """Return `stats` of a ring, with the log's fields if the ring is the
    inbox of a durable queue (its note names a directory whose control
    block belongs to this ring)."""
    cdef void *address
    cdef mqs_dq_control_t *control
    if stats.name is None:
        return stats
    try:
        with open(_persist_note_path(stats.name), "rb") as note:
            path = note.read().decode()
        fd = os.open(os.path.join(path, CONTROL_FILE),
                     os.O_RDONLY | os.O_CLOEXEC)
    except (OSError, UnicodeDecodeError):
        return stats
    try:
        if os.fstat(fd).st_size < MQS_DQ_FILE_BYTES:
            return stats
        address = mmap(NULL, MQS_DQ_FILE_BYTES, PROT_READ, MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if address == MAP_FAILED:
        return stats
    control = <mqs_dq_control_t *>address
    reader = None
    try:
        if mqs_dq_secret(control) != ring_secret:
            return stats
        try:
            reader = SegmentLog(path, readonly=True)
            fields = _durable_stats_fields(control, reader, path,
                                           stats.lag[0])
        except (MqsError, OSError) as exc:
            # A damaged or missing log: the ring's own stats still stand,
            # and the queue's handles raise when they read the log.
            logger.debug("durable queue %s: cannot read its log for "
                         "stats: %s", path, exc)
            return stats
    finally:
        if reader is not None:
            reader.close()
        munmap(address, MQS_DQ_FILE_BYTES)
    return dataclasses.replace(stats, depth=fields["lag"][0], **fields)


def _inspect_durable_dir(path):
    """Return the SharedQueueStats of the durable queue at `path`, read
    from its control file (mapped read-only) and its log."""
    from mqs import metrics

    cdef void *address
    cdef mqs_dq_control_t *control
    path = os.fspath(path)
    control_path = os.path.join(path, CONTROL_FILE)
    try:
        fd = os.open(control_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise QueueNotFound(
            f"{path!r} has no {CONTROL_FILE}; it is not a durable "
            f"SharedQueue's directory") from None
    try:
        if os.fstat(fd).st_size < MQS_DQ_FILE_BYTES:
            raise QueueLayoutError(
                f"{control_path!r} is {os.fstat(fd).st_size} bytes, not "
                f"{MQS_DQ_FILE_BYTES}; open the queue once with this mqs "
                f"version to upgrade it")
        address = mmap(NULL, MQS_DQ_FILE_BYTES, PROT_READ, MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if address == MAP_FAILED:
        raise OSError(f"cannot map {control_path!r}")
    control = <mqs_dq_control_t *>address
    reader = None
    try:
        reader = SegmentLog(path, readonly=True)
        fields = _durable_stats_fields(control, reader, path, 0)
    finally:
        if reader is not None:
            reader.close()
        munmap(address, MQS_DQ_FILE_BYTES)
    return metrics.SharedQueueStats(
        name=None, capacity_bytes=0, max_message_size=0, group=0,
        depth=fields["lag"][0], used_bytes=0, attached_processes=0,
        repaired_records=0, repaired_bytes=0, lost_records=0,
        stalls_reported=0, **fields)


@cython.final
cdef class _Durable:
    """The durable part of one SharedQueue handle (one per process)."""

    cdef SharedQueue _queue
    cdef readonly str path
    cdef readonly str fsync
    cdef mqs_dq_control_t *_control
    cdef object _reader
    cdef object _writer
    cdef object _delayed_log
    cdef object _thread
    cdef object _lock
    # Set by close(): ends the appender thread's wait between takeover
    # attempts, so that close() does not wait for the poll interval.
    cdef object _stop_event
    # Set once close() has moved this process's inbox records into the log
    # (when it is the appender) and synced them, for `wait_durable`.
    cdef object _drained
    cdef bint _stopping
    cdef bint _closed
    cdef int _pid
    cdef int64_t _next_takeover_ns
    cdef int64_t _last_commit_ns
    cdef list _committed
    cdef int64_t _last_repair_ns
    # Settings asked for by this handle (None: keep the stored ones).
    cdef object _groups_requested
    cdef int64_t _maxsize_requested
    # Size of new segment files: asked for by this handle (0: none), and
    # in use (the control block's, once the queue is set up).
    cdef int64_t _segment_bytes_requested
    cdef int64_t _segment_bytes
    # Appender: retention floor of the next commit round, and the
    # schedule of delayed messages, (due CLOCK_MONOTONIC ns, offset in
    # the delayed log) in a heap.
    cdef int64_t _pending_floor
    cdef list _schedule
    # Offsets of the delayed messages in the delayed log, in log order,
    # and those released but not yet popped from its front: the front
    # is the delayed log's retention floor.
    cdef object _delayed_offsets
    cdef set _released
    # Reader side: offsets below this are dropped from the reader, and
    # for each claim of this handle not read yet, the cursor it was
    # claimed from (its first offset or less), the minimum of which is
    # this handle's `reading` word.
    cdef int64_t _reader_floor
    cdef list _claims
    # Appender: the record descriptors and keys of one batch of immediate
    # messages (APPEND_BATCH each), filled without Python objects.
    cdef mqs_seglog_entry_t *_entries
    cdef uint8_t *_keys
    # Appender, fsync="always": how many inbox records the next batch
    # waits for, until when, and how long the last append and sync took.
    cdef int64_t _gather_target
    cdef int64_t _gather_deadline_ns
    cdef int64_t _sync_ns
    # Waiters left out of the count because earlier gathers timed out,
    # and gathers that reached their count since the last change.
    cdef int64_t _gather_excess
    cdef int64_t _gather_reached
    cdef object __weakref__

    def __cinit__(self):
        self._control = NULL
        self._committed = []
        self._schedule = []
        self._delayed_offsets = collections.deque()
        self._released = set()
        self._claims = []
        self._pending_floor = -1
        self._entries = <mqs_seglog_entry_t *>malloc(
            APPEND_BATCH * sizeof(mqs_seglog_entry_t))
        self._keys = <uint8_t *>malloc(APPEND_BATCH * KEY_BYTES)
        if self._entries == NULL or self._keys == NULL:
            raise MemoryError("cannot allocate the appender's batch buffers")

    cdef int _open(self, SharedQueue queue, object path, object fsync,
                   object groups, int64_t maxsize,
                   object segment_bytes) except -1:
        cdef int fd
        cdef void *address
        if fsync not in _FSYNC_MODES:
            raise ValueError(
                f"fsync must be 'always', 'interval' or 'never', got "
                f"{fsync!r}")
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"persist must be a str or os.PathLike path, "
                            f"got {type(path).__name__} {path!r}")
        path = os.fspath(path)
        if not isinstance(path, str):
            raise TypeError(f"persist must be a str or os.PathLike path, "
                            f"got {type(path).__name__} {path!r}")
        if not path:
            raise ValueError(
                "persist must name the directory of the queue's segment "
                "log, got ''; pass a directory such as 'jobs' (it is "
                "created if missing)")
        if os.path.exists(path) and not os.path.isdir(path):
            raise NotADirectoryError(
                f"persist={path!r} is a file; give a directory for the "
                f"queue's segment log (it is created if missing)")
        if queue.name is not None:
            # A named ring has one durable queue behind it: a second log
            # directory would take half of the puts each.
            noted = _noted_log_of(queue.name, queue._ring.secret)
            if noted is not None and not _same_directory(noted, path):
                raise QueueLayoutError(
                    f"shared queue {queue.name!r} keeps its messages in "
                    f"persist={noted!r}, not {path!r}; attach with "
                    f"persist={noted!r}, or use another queue name for "
                    f"another log")
        check_directory_kind(path, DURABLE_QUEUE)
        os.makedirs(path, mode=0o700, exist_ok=True)
        self._queue = queue
        self.path = path
        self.fsync = fsync
        self._groups_requested = groups
        self._maxsize_requested = maxsize
        self._segment_bytes_requested = segment_bytes or 0
        self._segment_bytes = segment_bytes or DEFAULT_SEGMENT_BYTES
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._drained = threading.Event()
        fd = os.open(os.path.join(path, CONTROL_FILE),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < MQS_DQ_FILE_BYTES:
                os.ftruncate(fd, MQS_DQ_FILE_BYTES)
            address = mmap(NULL, MQS_DQ_FILE_BYTES, PROT_READ | PROT_WRITE,
                           MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        if address == MAP_FAILED:
            raise OSError(f"cannot map {CONTROL_FILE} of {path!r}")
        self._control = <mqs_dq_control_t *>address
        # Fail now, not in the appender thread, on a log that cannot be
        # opened (a file where a segment should be, a newer format).
        self._reader = SegmentLog(path, segment_bytes=self._segment_bytes,
                                  readonly=True)
        _check_queue_log(self._reader, path)
        self._join_or_take_over()
        self._check_settings()
        # A process that held this ring slot before may have died with
        # a claim announced.
        self._publish_reading()
        if queue.name is not None:
            _write_persist_note(queue.name, path)
        _durables.add(self)
        self._start_thread()
        return 0

    cdef int _check_settings(self) except -1:
        """Raise if this handle asked for other groups or maxsize than
        the queue's appender set up."""
        cdef int64_t groups = mqs_dq_get(self._control, MQS_DQ_GROUPS)
        cdef int64_t maxsize = mqs_dq_get(self._control, MQS_DQ_MAXSIZE)
        cdef int64_t size = mqs_dq_get(self._control, MQS_DQ_SEGMENT_BYTES)
        if self._groups_requested is not None \
                and self._groups_requested != groups:
            raise QueueLayoutError(
                f"durable queue {self.path!r} runs with groups={groups}, "
                f"not {self._groups_requested}; attach without groups=, or "
                f"close every handle and open it again with the new count")
        if self._maxsize_requested and self._maxsize_requested != maxsize:
            raise QueueLayoutError(
                f"durable queue {self.path!r} runs with maxsize={maxsize}, "
                f"not {self._maxsize_requested}; attach without maxsize, or "
                f"close every handle and open it again with the new bound")
        if self._segment_bytes_requested \
                and self._segment_bytes_requested != size:
            raise QueueLayoutError(
                f"durable queue {self.path!r} runs with segment_bytes="
                f"{size}, not {self._segment_bytes_requested}; attach "
                f"without segment_bytes, or close every handle and open it "
                f"again with the new size")
        self._segment_bytes = size
        return 0

    cdef int _join_or_take_over(self) except -1:
        """Become the appender, or find one already serving our ring.

        Until then the cursor and the log end in the control block may
        belong to another ring, and qsize would be wrong. A live appender
        of a different ring means two queues share the directory: raise.
        """
        cdef int64_t deadline = mqs_monotonic_ns() + JOIN_TIMEOUT_NS
        while True:
            if self._try_take_over() or self._ready():
                return 0
            if mqs_monotonic_ns() >= deadline:
                raise LogLocked(
                    f"persist={self.path!r} is the log of another live "
                    f"durable queue; attach to that queue (by name, or by "
                    f"passing it to this process) or give this one its "
                    f"own directory")
            time.sleep(0.01)

    cdef int _start_thread(self) except -1:
        self._stopping = False
        self._next_takeover_ns = 0
        self._thread = threading.Thread(
            target=_appender_main, args=(weakref.ref(self),),
            name=f"mqs-appender {self.path}", daemon=True)
        self._thread.start()
        return 0

    cdef inline bint _ready(self):
        """Whether an appender has set the control block up for our ring."""
        return mqs_dq_secret(self._control) == self._queue._ring.secret

    cdef int _check_process(self) except -1:
        if self._pid != _process_id:
            # A forked child: start this process's own appender thread.
            self._pid = os.getpid()
            self._start_thread()
        return 0

    cdef int groups(self):
        return <int>mqs_dq_get(self._control, MQS_DQ_GROUPS)

    cdef int64_t maxsize(self):
        return mqs_dq_get(self._control, MQS_DQ_MAXSIZE)

    cdef int64_t delayed(self):
        return mqs_dq_get(self._control, MQS_DQ_DELAYED)

    # -- appender -----------------------------------------------------------

    cdef int _run_once(self) except -1:
        """One appender step: take the lock if free, move records, release
        due delayed messages, or wait."""
        cdef SharedQueue queue = self._queue
        cdef uint32_t epoch
        cdef int moved = 0
        cdef int64_t wake
        self._drop_reader_segments()
        if self._writer is None:
            if mqs_monotonic_ns() < self._next_takeover_ns:
                self._stop_event.wait(TAKEOVER_POLL_NS / 1e9)
                return 0
            self._next_takeover_ns = mqs_monotonic_ns() + TAKEOVER_POLL_NS
            if not self._try_take_over():
                return 0
        epoch = mqs_wait_prepare(mqs_br_not_empty(&queue._ring))
        try:
            with self._lock:
                if self._stopping or self._writer is None:
                    moved = 0
                else:
                    moved = self._append_batch()
                    moved += self._release_due()
                    self._commit_cursor(False)
        except BaseException:
            mqs_wait_finish(mqs_br_not_empty(&queue._ring))
            raise
        if moved:
            mqs_wait_finish(mqs_br_not_empty(&queue._ring))
            return 0
        wake = mqs_monotonic_ns() + WAIT_SLICE_NS
        if self._schedule and self._schedule[0][0] < wake:
            wake = self._schedule[0][0]
        # The appender thread, which close() stops and joins before it
        # unmaps anything.
        park(mqs_br_not_empty(&queue._ring), epoch, wake, 1, STRATEGY_BLOCK)
        return 0

    cdef int _drop_reader_segments(self) except -1:
        """Unmap segments that retention deleted from this process's
        reader, so that their disk space is freed."""
        cdef int64_t floor
        if self._control == NULL or self._reader is None \
                or not self._ready():
            return 0
        floor = mqs_dq_get(self._control, MQS_DQ_RETAINED_OFFSET)
        if self._claims:
            # Keep what a claim of this handle has yet to read.
            floor = min(floor, min(self._claims))
        if floor <= self._reader_floor:
            return 0
        self._reader.delete_before(floor)
        self._reader_floor = floor
        return 0

    cdef bint _try_take_over(self) except -1:
        cdef SharedQueue queue = self._queue
        cdef uint64_t secret = queue._ring.secret
        cdef int64_t head = 0, end = 0
        cdef int64_t stored_size = mqs_dq_get(self._control,
                                              MQS_DQ_SEGMENT_BYTES)
        if stored_size > 0 and (mqs_dq_secret(self._control) == secret
                                or not self._segment_bytes_requested):
            # A running queue keeps its segment size, and so does a
            # restart that asks for none.
            self._segment_bytes = stored_size
        try:
            writer = SegmentLog(self.path, segment_bytes=self._segment_bytes,
                                fsync=self.fsync)
        except LogLocked:
            return False
        try:
            delayed_log = SegmentLog(
                os.path.join(self.path, DELAYED_DIR),
                segment_bytes=self._segment_bytes, fsync=self.fsync)
        except BaseException:
            writer.close()
            raise
        with self._lock:
            if self._stopping:
                delayed_log.close()
                writer.close()
                return False
            self._writer = writer
            self._delayed_log = delayed_log
            head = self._skip_appended(writer, delayed_log)
            end = writer.end_offset
            self._load_schedule(writer, delayed_log, head)
            if mqs_dq_secret(self._control) != secret:
                self._set_up(writer, secret, head)
            else:
                # The same ring after its appender died: make what it
                # appended durable, then continue from there.
                if self.fsync == "always":
                    writer.flush()
                mqs_dq_set(self._control, MQS_DQ_DELAYED,
                           len(self._schedule))
                mqs_dq_set(self._control, MQS_DQ_APPENDED_OFFSET, end)
                mqs_dq_set(self._control, MQS_DQ_APPENDED_POS, head)
                mqs_dq_set(self._control, MQS_DQ_DURABLE_POS, head)
                # The dead appender may have died waiting for a gather.
                mqs_dq_set_gather(self._control, 0)
                self._committed = [-1] * self.groups()
            self._pending_floor = -1
            self._last_commit_ns = mqs_monotonic_ns()
        logger.info("durable queue %s: this process (pid %d) appends to the "
                    "log from ring position %d, log offset %d", self.path,
                    os.getpid(), head, end)
        mqs_wait_signal(mqs_dq_not_empty(self._control), 1)
        mqs_wait_signal(mqs_dq_progress(self._control), 1)
        return True

    cdef int _set_up(self, writer, uint64_t secret,
                     int64_t head) except -1:
        """Set the control block up for a new inbox ring: each group
        starts where its last cursor commit is."""
        cdef int64_t cursors[MQS_DQ_MAX_GROUPS]
        cdef int64_t start = writer.start_offset
        cdef int64_t end = writer.end_offset
        cdef int64_t stored = mqs_dq_get(self._control, MQS_DQ_GROUPS)
        cdef int groups
        if self._groups_requested is not None:
            groups = self._groups_requested
        elif 1 <= stored <= MQS_DQ_MAX_GROUPS:
            groups = <int>stored
        else:
            groups = 1
        self._committed = []
        for group in range(groups):
            committed = writer.committed(_group_log_name(group))
            # A group without a commit starts at the oldest message kept.
            cursors[group] = min(max(
                start if committed is None else committed, start), end)
            self._committed.append(cursors[group])
        low = min([cursors[group] for group in range(groups)])
        stored = mqs_br_count(&self._queue._ring, 0) + (end - low) \
            + len(self._schedule)
        mqs_dq_set(self._control, MQS_DQ_SEGMENT_BYTES, self._segment_bytes)
        mqs_dq_setup(self._control, secret, cursors, groups,
                     self._maxsize_requested, end, head, start,
                     len(self._schedule), stored)
        return 0

    cdef int64_t _skip_appended(self, writer, delayed_log) except -1:
        """Free inbox records that a dead appender already put in a log.

        Returns the inbox head afterwards.
        """
        cdef SharedQueue queue = self._queue
        cdef int64_t head = mqs_br_head(&queue._ring, 0)
        cdef int64_t position = head, last = -1
        cdef int64_t messages = 0
        cdef mqs_br_record_t record
        for log in (writer, delayed_log):
            if log.end_offset <= log.start_offset:
                continue
            secret, logged, _ = _KEY.unpack_from(
                log.read_record(log.end_offset - 1).key)
            if secret == queue._ring.secret and logged > last:
                last = logged
        if last < head:
            return head
        while position <= last:
            if mqs_br_peek(&queue._ring, position, &record) != MQS_OK:
                break
            if record.type != MQS_BR_TYPE_PAD:
                messages += 1
            position += mqs_br_record_size(record.length)
        mqs_br_advance(&queue._ring, 0, position, messages)
        if messages:
            logger.warning(
                "durable queue %s: %d record(s) the previous appender had "
                "already written were not appended again", self.path,
                messages)
        return position

    cdef int _load_schedule(self, writer, delayed_log,
                            int64_t head) except -1:
        """Rebuild the schedule from the delayed log: every delayed
        message that no mark lists and that the main log's tail does not
        hold a released copy of (its appender died before the mark)."""
        cdef int64_t offset, now_wall = time.time_ns()
        cdef int64_t now = mqs_monotonic_ns()
        cdef int64_t checked = 0
        pending = {}
        for record in delayed_log.iter_from(delayed_log.start_offset):
            _, _, rtype, due = _KEY_EXTRA.unpack(record.key)
            if rtype == TYPE_MARK:
                for (offset,) in _TIME.iter_unpack(record.value):
                    pending.pop(offset, None)
            else:
                pending[record.offset] = due
        # Released copies are appended before their mark, one batch at a
        # time, so only the last batch can lack its mark.
        unmarked = []
        offset = writer.end_offset - 1
        while offset >= writer.start_offset and checked < APPEND_BATCH:
            key = writer.read_record(offset).key
            if len(key) != _KEY_EXTRA.size:
                break
            released = _KEY_EXTRA.unpack(key)[3]
            if pending.pop(released, None) is not None:
                unmarked.append(released)
            offset -= 1
            checked += 1
        if unmarked:
            self._append_mark(unmarked, head)
        self._schedule = [(due - now_wall + now, offset)
                          for offset, due in pending.items()]
        heapq.heapify(self._schedule)
        self._delayed_offsets = collections.deque(sorted(pending))
        self._released = set()
        return 0

    cdef int _append_mark(self, list offsets, int64_t head) except -1:
        self._delayed_log.append(
            b"".join(_TIME.pack(o) for o in offsets),
            key=_KEY_EXTRA.pack(self._queue._ring.secret, head - 1,
                                TYPE_MARK, 0))
        return 0

    cdef int _append_batch(self) except -1:
        """Move up to APPEND_BATCH inbox records into the logs.

        Stops where records switch between immediate and delayed, so
        that each step appends to one log: a successor then finds every
        appended record through the last key of that log. Returns how
        many ring records (padding included) were passed.
        """
        cdef SharedQueue queue = self._queue
        cdef uint64_t secret = queue._ring.secret
        cdef int64_t head = mqs_br_head(&queue._ring, 0)
        cdef int64_t position = head
        cdef int64_t messages = 0
        cdef int passed = 0
        cdef int rc = MQS_OK
        cdef int delayed = -1
        cdef int is_delayed
        cdef mqs_br_record_t record
        cdef list entries = []
        cdef list dues = []
        cdef int64_t due
        cdef int64_t now
        cdef int64_t started
        cdef int64_t waiters
        cdef int64_t end_offset = -1
        cdef mqs_seglog_entry_t *entry
        # One waiting producer has nothing to share its sync with.
        if self._gather_target > 1:
            self._gather()
        now = _wall_clock_ns()
        while passed < APPEND_BATCH:
            rc = mqs_br_peek(&queue._ring, position, &record)
            if rc != MQS_OK:
                break
            if record.type != MQS_BR_TYPE_PAD:
                is_delayed = (record.type & RTYPE_DELAYED) != 0
                if delayed < 0:
                    delayed = is_delayed
                elif delayed != is_delayed:
                    break
                if is_delayed:
                    memcpy(&due, record.payload, 8)
                    entries.append((
                        _KEY_EXTRA.pack(secret, position,
                                        record.type & ~RTYPE_DELAYED, due),
                        PyBytes_FromStringAndSize(
                            <const char *>record.payload + 8,
                            record.length - 8)))
                    dues.append(due)
                else:
                    # The value stays in the ring until mqs_br_advance
                    # below, after the log has copied it.
                    entry = &self._entries[messages]
                    entry.key = self._keys + messages * KEY_BYTES
                    _store_key(self._keys + messages * KEY_BYTES, secret,
                               position, record.type)
                    entry.key_len = KEY_BYTES
                    entry.has_key = 1
                    entry.value = record.payload
                    entry.value_len = record.length
                    entry.timestamp_ns = now
                messages += 1
            position += mqs_br_record_size(record.length)
            passed += 1
        if rc == MQS_EAGAIN_STUCK and passed == 0:
            # A producer died between claim and publish: repair its
            # record, at most every WAIT_SLICE_NS.
            if mqs_monotonic_ns() - self._last_repair_ns >= WAIT_SLICE_NS:
                self._last_repair_ns = mqs_monotonic_ns()
                queue._log_repaired(mqs_br_repair(&queue._ring))
            return 0
        if passed == 0:
            return 0
        if entries and delayed == 1:
            self._append_delayed(entries, dues)
        elif messages:
            # With fsync="always" this syncs once for the whole batch:
            # the group commit of every producer waiting in wait_durable.
            started = mqs_monotonic_ns()
            end_offset = self._append_immediate(<int>messages)
            self._sync_ns = mqs_monotonic_ns() - started
        mqs_br_advance(&queue._ring, 0, position, messages)
        if end_offset < 0:
            end_offset = self._writer.end_offset
        mqs_dq_set(self._control, MQS_DQ_APPENDED_OFFSET, end_offset)
        mqs_dq_set(self._control, MQS_DQ_APPENDED_POS, position)
        if self.fsync == "always":
            mqs_dq_set(self._control, MQS_DQ_DURABLE_POS, position)
            # Each producer waiting now has a record in the inbox, or
            # puts one once this signal wakes it.
            waiters = mqs_dq_progress_waiters(self._control)
            mqs_wait_signal(mqs_dq_progress(self._control), 1)
            self._gather_target = waiters - self._gather_excess
            self._gather_deadline_ns = mqs_monotonic_ns() + min(max(
                GATHER_FACTOR * self._sync_ns, GATHER_MIN_NS), GATHER_MAX_NS)
        mqs_wait_signal(mqs_dq_not_empty(self._control), 1)
        return passed

    cdef int _gather(self) except -1:
        """Wait until the inbox holds _gather_target records or the
        gather deadline passes, so that one sync covers the next record
        of every producer the last sync woke (see mqs_dq_set_gather).

        Without it the appender syncs the first record that arrives
        while the others wait for the sync after, and the producers
        split into groups whose syncs alternate."""
        cdef mqs_bytering_t *ring = &self._queue._ring
        cdef mqs_waitword_t *word = mqs_dq_gathered(self._control)
        cdef int64_t target = self._gather_target
        cdef int64_t deadline = self._gather_deadline_ns
        cdef int64_t left
        cdef uint32_t epoch
        cdef bint reached = False
        self._gather_target = 0
        mqs_dq_set_gather(self._control, target)
        with nogil:
            while True:
                epoch = mqs_wait_prepare(word)
                left = deadline - mqs_monotonic_ns()
                reached = mqs_br_count(ring, 0) >= target
                if reached or left <= 0:
                    mqs_wait_finish(word)
                    break
                mqs_wait_sleep(word, epoch, left, 1)
                mqs_wait_finish(word)
        mqs_dq_set_gather(self._control, 0)
        # A producer killed while it waited stays counted in `progress`
        # for good, and would make every gather wait out its deadline.
        # So each timeout leaves one more waiter out of the count, and
        # a long run of gathers that reached theirs puts one back.
        if not reached:
            self._gather_excess += 1
            self._gather_reached = 0
        else:
            self._gather_reached += 1
            if self._gather_reached >= GATHER_TRUST_ROUNDS \
                    and self._gather_excess > 0:
                self._gather_excess -= 1
                self._gather_reached = 0
        return 0

    cdef int64_t _append_immediate(self, int n) except -1:
        """Append the first `n` records of self._entries to the main log
        and, with fsync="always", sync them (as append_many does).
        Returns the log's end offset after them."""
        cdef _SegmentLogType writer = <_SegmentLogType>self._writer
        cdef int64_t first
        writer._check_open()
        first = writer._append_entries(self._entries, n)
        if writer._fsync_mode == MQS_SEGLOG_FSYNC_ALWAYS:
            writer._sync(first + n)
        return first + n

    cdef int _append_delayed(self, list entries, list dues) except -1:
        """Write delayed messages to the delayed log and schedule them."""
        cdef int64_t first = self._delayed_log.append_many(entries)
        cdef int64_t now_wall = time.time_ns()
        cdef int64_t now = mqs_monotonic_ns()
        for i, due in enumerate(dues):
            heapq.heappush(self._schedule, (due - now_wall + now, first + i))
            self._delayed_offsets.append(first + i)
        mqs_dq_add(self._control, MQS_DQ_DELAYED, len(dues))
        return 0

    cdef int _release_due(self) except -1:
        """Copy due delayed messages into the main log, then mark them
        released in the delayed log. Returns how many were released."""
        cdef SharedQueue queue = self._queue
        cdef int64_t now = mqs_monotonic_ns()
        cdef int64_t head = mqs_br_head(&queue._ring, 0)
        cdef list offsets = []
        cdef list entries = []
        while self._schedule and self._schedule[0][0] <= now \
                and len(offsets) < APPEND_BATCH:
            _, offset = heapq.heappop(self._schedule)
            record = self._delayed_log.read_record(offset)
            rtype = _KEY_EXTRA.unpack(record.key)[2]
            entries.append((
                _KEY_EXTRA.pack(queue._ring.secret, head - 1, rtype, offset),
                record.value))
            offsets.append(offset)
        if not offsets:
            return 0
        self._writer.append_many(entries)
        self._append_mark(offsets, head)
        self._released.update(offsets)
        mqs_dq_add(self._control, MQS_DQ_DELAYED, -len(offsets))
        mqs_dq_set(self._control, MQS_DQ_APPENDED_OFFSET,
                   self._writer.end_offset)
        mqs_wait_signal(mqs_dq_not_empty(self._control), 1)
        return len(offsets)

    cdef int _commit_cursor(self, bint now) except -1:
        """Store every group's cursor in the log, every COMMIT_EVERY_NS or
        `now`, then apply retention."""
        cdef int64_t cursor
        cdef int group
        if self._writer is None or not self._ready():
            return 0
        if not now and mqs_monotonic_ns() - self._last_commit_ns \
                < COMMIT_EVERY_NS:
            return 0
        self._last_commit_ns = mqs_monotonic_ns()
        for group in range(self.groups()):
            cursor = mqs_dq_get_cursor(self._control, group)
            if cursor != self._committed[group]:
                self._writer.commit(_group_log_name(group), cursor)
                self._committed[group] = cursor
        self._retain()
        return 0

    cdef int _retain(self) except -1:
        """Delete segments every group had taken by the previous commit
        round, and delayed-log segments with no waiting message left.

        Deleting one round late gives a consumer between its claim and
        its read at least COMMIT_EVERY_NS to map the record's segment.
        """
        cdef int64_t floor = self._pending_floor
        if floor >= 0:
            floor = self._reading_floor(floor)
        if floor >= 0 and self._writer.delete_before(floor):
            mqs_dq_set(self._control, MQS_DQ_RETAINED_OFFSET,
                       self._writer.start_offset)
        self._pending_floor = min(self._committed)
        pending = self._delayed_offsets
        while pending and pending[0] in self._released:
            self._released.discard(pending.popleft())
        floor = pending[0] if pending else self._delayed_log.end_offset
        self._delayed_log.delete_before(floor)
        return 0

    cdef int64_t _reading_floor(self, int64_t floor):
        """Lower `floor` to the lowest offset a live consumer announced
        it may still read. `floor` must come from cursor loads made
        before this call."""
        cdef int64_t offset
        mqs_dq_reading_fence()
        for slot in range(MQS_DQ_READERS):
            offset = mqs_dq_get_reading(self._control, slot)
            # A dead participant's word stays until its slot's next
            # owner opens the queue; it no longer protects anything.
            if 0 <= offset < floor and mqs_br_participant_alive(
                    &self._queue._ring, slot) != 0:
                floor = offset
        return floor

    # -- producers ----------------------------------------------------------

    cdef int put(self, const void **parts, size_t *lengths, int n,
                 uint16_t rtype, int64_t due) except -2:
        """Put a message into the inbox (due >= 0: delayed until that
        CLOCK_MONOTONIC time) after reserving room for it in a bounded
        queue. Returns MQS_OK, MQS_EFULL or another status."""
        cdef int64_t maxsize = self.maxsize()
        cdef int rc
        # NOTE: a process killed between the reservation and the put
        # leaves one place reserved until a new ring sets the block up.
        if maxsize > 0 and not mqs_dq_reserve(self._control, self.groups(),
                                              maxsize):
            return MQS_EFULL
        try:
            if due >= 0:
                rc = self.put_delayed(parts, lengths, n, rtype, due)
            else:
                rc = mqs_br_try_put(&self._queue._ring, parts, lengths, n,
                                    rtype)
        except BaseException:
            if maxsize > 0:
                mqs_dq_unreserve(self._control)
            raise
        if rc != MQS_OK and maxsize > 0:
            mqs_dq_unreserve(self._control)
        return rc

    cdef int wait_durable(self, int64_t position) except -1:
        """With fsync="always": wait until the record at `position` is
        flushed. Waits without a limit (the message is already accepted),
        waking every WAIT_SLICE_NS for Ctrl-C."""
        cdef uint32_t epoch
        cdef int64_t gather
        cdef mqs_waitword_t *word = mqs_dq_progress(self._control)
        if self.fsync != "always":
            return 0
        self._check_process()
        while True:
            epoch = mqs_wait_prepare(word)
            if self._ready() and mqs_dq_get(
                    self._control, MQS_DQ_DURABLE_POS) > position:
                mqs_wait_finish(word)
                return 0
            gather = mqs_dq_gather_count(self._control)
            if gather > 0 and mqs_br_count(&self._queue._ring, 0) >= gather:
                mqs_wait_signal(mqs_dq_gathered(self._control), 1)
            # `SharedQueue._park`, except when close() ran meanwhile.
            self._queue._parked += 1
            try:
                park(word, epoch, -1, 1, STRATEGY_SLEEP)
            except BaseException:
                self._queue._leave_wait()
                raise
            if self._closed or self._queue._closed:
                return self._closed_while_waiting(position)
            self._queue._left_wait()

    cdef int _closed_while_waiting(self, int64_t position) except -1:
        """End a `wait_durable` that close() interrupted: return when the
        record at `position` is durable after all, else raise ValueError
        with ``accepted = 1``. The put's message is in the queue either
        way, so the caller must not put it again. The caller is still
        counted as waiting, so the control file is mapped."""
        cdef bint durable
        # close() moves this process's inbox into the log and syncs it
        # when this process is the appender (bounded by CLOSE_DRAIN_NS).
        self._drained.wait(CLOSE_DRAIN_NS / 1e9 + 5.0)
        durable = self._control != NULL and self._ready() and mqs_dq_get(
            self._control, MQS_DQ_DURABLE_POS) > position
        self._queue._leave_wait()
        if durable:
            return 0
        error = ValueError(
            f"Queue {self._queue!r} was closed by another thread while "
            f"this put waited for its sync; the message was accepted and "
            f"stays in the queue, where the appender of another process "
            f"writes it, so do not put it again (exc.accepted)")
        error.accepted = 1
        raise error

    cdef bint full(self):
        """Whether a bounded queue stores maxsize messages or more."""
        cdef int64_t maxsize = self.maxsize()
        if maxsize <= 0 or not self._ready():
            return False
        mqs_dq_release_taken(self._control, self.groups())
        return mqs_dq_get(self._control, MQS_DQ_STORED) >= maxsize

    cdef int put_delayed(self, const void **parts, size_t *lengths, int n,
                         uint16_t rtype, int64_t due) except -2:
        """Put a message due at CLOCK_MONOTONIC `due` into the inbox,
        with its due time in wall-clock ns in front. Returns a status."""
        cdef const void *prefixed[65]
        cdef size_t prefixed_lengths[65]
        # Read the monotonic clock first: a preemption between the two
        # reads then moves the stored due time later, never earlier.
        cdef int64_t now = mqs_monotonic_ns()
        cdef int64_t due_wall = time.time_ns() + (due - now)
        cdef int i
        prefixed[0] = &due_wall
        prefixed_lengths[0] = 8
        for i in range(n):
            prefixed[i + 1] = parts[i]
            prefixed_lengths[i + 1] = lengths[i]
        return mqs_br_try_put(&self._queue._ring, prefixed,
                              prefixed_lengths, n + 1,
                              rtype | RTYPE_DELAYED)

    # -- consumers ----------------------------------------------------------

    cdef int _publish_reading(self) except -1:
        """Store the lowest offset this handle's claims may still read
        in its `reading` word (none without claims)."""
        cdef int slot = self._queue._ring.slot
        if 0 <= slot < MQS_DQ_READERS:
            mqs_dq_set_reading(self._control, slot,
                               min(self._claims) if self._claims else -1)
        return 0

    cdef int64_t _claim(self, int64_t max_n, int64_t *first,
                        int64_t *start) except -1:
        """Claim up to max_n offsets; on success *start stays in
        self._claims (and the `reading` word) until _unclaim(*start)."""
        cdef int group = self._queue._group
        cdef int64_t n
        cdef int64_t available
        if not self._ready():
            return 0
        start[0] = mqs_dq_get_cursor(self._control, group)
        available = mqs_dq_get(self._control, MQS_DQ_APPENDED_OFFSET) \
            - start[0]
        if available <= 0:
            return 0
        # Announce before the claim: the claim's cursor load, ordered
        # after this store, returns start[0] or more.
        self._claims.append(start[0])
        self._publish_reading()
        # Count the claim as copies before it moves the cursor, so that a
        # reaper counts it in consumer_died if this process dies before
        # the messages reach the caller (`_take` uncounts them). At most
        # what was there to claim: a death before the claim completes
        # counts up to that many too many, never one too few.
        max_n = min(max_n, available)
        self._queue._copies += max_n
        mqs_br_set_copies(&self._queue._ring, self._queue._copies)
        n = mqs_dq_claim(self._control, group, max_n, first)
        if n < max_n:
            self._queue._return_copies(max_n - n)
        if n == 0:
            self._unclaim(start[0])
            return 0
        if mqs_dq_get(self._control, MQS_DQ_MAXSIZE):
            mqs_dq_release_taken(self._control, self.groups())
            mqs_wait_signal(mqs_br_not_full(&self._queue._ring), 1)
        return n

    cdef int _unclaim(self, int64_t start) except -1:
        self._claims.remove(start)
        self._publish_reading()
        return 0

    cdef int64_t _wait_claim(self, int64_t max_n, int64_t *first,
                             int64_t *start, bint block,
                             int64_t deadline) except -1:
        cdef mqs_waitword_t *word = mqs_dq_not_empty(self._control)
        cdef uint32_t epoch
        cdef int64_t n
        cdef int strategy = self._queue._strategy
        self._check_process()
        n = self._claim(max_n, first, start)
        if n:
            return n
        while True:
            epoch = mqs_wait_prepare(word)
            try:
                n = self._claim(max_n, first, start)
            except BaseException:
                mqs_wait_finish(word)
                raise
            if n:
                mqs_wait_finish(word)
                return n
            if not block:
                mqs_wait_finish(word)
                raise Empty()
            if self._queue._park(word, epoch, deadline, strategy):
                raise Empty()
            if strategy == STRATEGY_BLOCK:
                strategy = STRATEGY_SLEEP

    cdef object _read(self, int64_t offset, bint view):
        """Return the message at log `offset` (or its bytes, as a view),
        or None if its record is damaged or missing (dropped, counted in
        dropped["damaged_record"])."""
        reader = self._reader
        try:
            record = reader.read_record(offset)
        except LogCorrupted as exc:
            # The claim moved past it, so the message is dropped: counted,
            # and the get goes on with the next one.
            self._drop_unreadable(MQS_DQ_DAMAGED, offset, exc)
            return None
        except OffsetOutOfRange:
            try:
                reader.refresh()
                record = reader.read_record(offset)
            except (OffsetOutOfRange, LogCorrupted) as exc:
                # The `reading` word keeps retention below this offset,
                # so only damage gets here: a hand-deleted segment, or a
                # record damaged while the log is open, which a reader
                # cannot pass (the records after it read as missing
                # until the log is opened again).
                self._drop_unreadable(MQS_DQ_LOST, offset, exc)
                return None
        if view:
            return record.value
        rtype = _KEY.unpack_from(record.key)[2]
        data = bytes(record.value) if rtype == TYPE_BYTES \
            else bytearray(record.value)
        return self._queue._finish(rtype, data, False)

    cdef int _drop_unreadable(self, int field, int64_t offset,
                              object exc) except -1:
        """Count a taken message whose record could not be read, and log
        it at 1, 10, 100 ... such drops."""
        mqs_dq_add(self._control, field, 1)
        total = (mqs_dq_get(self._control, MQS_DQ_DAMAGED)
                 + mqs_dq_get(self._control, MQS_DQ_LOST))
        if _is_power_of_ten(total):
            logger.warning(
                "durable queue %s: message at offset %d is damaged or "
                "missing in the log and was dropped (%s); %d so far, "
                "counted in stats().dropped['damaged_record']",
                self.path, offset, exc, total)
        return 0

    cdef list _take(self, int64_t max_items, bint block, object timeout,
                    bint view):
        """Claim and read up to max_items messages, at least one.

        Counted as a wait of the queue for its whole run, because reading
        and deserializing let other threads run. A close() from one of
        them keeps the reader and the control file open until the
        messages claimed are read and returned."""
        cdef list out
        self._queue._parked += 1
        try:
            out = self._claim_and_read(max_items, block, timeout, view)
        except BaseException:
            self._queue._leave_wait()
            raise
        # Messages already claimed are returned even if close() ran.
        self._queue._leave_wait()
        return out

    cdef list _claim_and_read(self, int64_t max_items, bint block,
                              object timeout, bint view):
        cdef int64_t deadline = deadline_ns(timeout) if block else 0
        cdef int64_t first = 0
        cdef int64_t start = 0
        cdef int64_t n
        cdef list out
        failure = None
        while True:
            n = self._wait_claim(max_items, &first, &start, block, deadline)
            try:
                if _after_claim_hook is not None:
                    _after_claim_hook()
                out = []
                for i in range(n):
                    # Every claimed offset is read, because the claim
                    # already moved the group's cursor past all of them.
                    try:
                        item = self._read(first + i, view)
                    except MessageDecodeError as exc:
                        if failure is not None:
                            logger.warning("durable queue %s: %s",
                                           self.path, failure)
                        failure = exc
                        continue
                    if item is not None:
                        out.append(item)
            finally:
                self._unclaim(start)
                # A view stays counted until its block ends
                # (`end_view`); the rest reach the caller now, or never
                # (decode failures and deleted records have their own
                # counters).
                self._queue._return_copies(
                    n - 1 if view and out else n)
            self._drop_reader_segments()
            if out:
                if failure is not None:
                    # Raising would lose the messages already taken.
                    logger.warning("durable queue %s: %s", self.path,
                                   failure)
                return out
            if failure is not None:
                raise failure

    cdef object get(self, bint block, object timeout):
        return self._take(1, block, timeout, False)[0]

    cdef list get_many(self, int64_t max_items, bint block, object timeout):
        return self._take(max_items, block, timeout, False)

    cdef object get_view(self, object timeout):
        """Take one message as a view of its log record; it counts as a
        copy in consumer_died until `end_view`."""
        return self._take(1, True, timeout, True)[0]

    cdef void end_view(self) noexcept:
        """Uncount the message of a view whose block ended."""
        self._queue._return_copies(1)

    cdef int64_t backlog(self):
        """Messages in the log that no consumer of this handle's group
        has taken yet."""
        if not self._ready():
            return 0
        return max(0, mqs_dq_get(self._control, MQS_DQ_APPENDED_OFFSET)
                   - mqs_dq_get_cursor(self._control, self._queue._group))


    cdef dict stats_fields(self):
        """Return the SharedQueueStats fields that describe the log."""
        return _durable_stats_fields(self._control, self._reader, self.path,
                                     mqs_br_count(&self._queue._ring, 0))

    # -- closing ------------------------------------------------------------

    cdef int close(self, bint keep_control=False) except -1:
        """Move what is left in the inbox into the log, commit the cursor,
        release the writer lock (another process takes over) and stop.

        With `keep_control` the control file stays mapped and the reader
        open, for threads still waiting on its words or reading claimed
        messages; `release_control` closes both."""
        cdef int64_t deadline
        if self._closed:
            return 0
        self._closed = True
        self._stopping = True
        _durables.discard(self)
        try:
            if self._pid == os.getpid():
                if self._thread is not None:
                    self._stop_event.set()
                    mqs_wait_signal(mqs_br_not_empty(&self._queue._ring), 1)
                    self._thread.join()
                with self._lock:
                    if self._writer is not None:
                        deadline = mqs_monotonic_ns() + CLOSE_DRAIN_NS
                        while self._append_batch() and \
                                mqs_monotonic_ns() < deadline:
                            pass
                        self._commit_cursor(True)
                        self._delayed_log.close()
                        self._delayed_log = None
                        self._writer.close()
                        self._writer = None
            else:
                self._after_fork()
        finally:
            self._drained.set()
        if not keep_control:
            self.release_control()
        return 0

    cdef int release_control(self) except -1:
        """Close the reader and unmap the control file."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._control != NULL:
            munmap(self._control, MQS_DQ_FILE_BYTES)
            self._control = NULL
        return 0

    cdef int _after_fork(self) except -1:
        """In a forked child: drop the parent's log handles, keep the
        parent's writer lock held for it."""
        if self._writer is not None:
            self._writer._abandon_after_fork()
            self._writer = None
        if self._delayed_log is not None:
            self._delayed_log._abandon_after_fork()
            self._delayed_log = None
        if self._reader is not None:
            self._reader._abandon_after_fork()
            self._reader = SegmentLog(self.path, readonly=True)
        self._reader_floor = 0
        self._claims = []
        self._schedule = []
        self._delayed_offsets = collections.deque()
        self._released = set()
        self._thread = None
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._drained = threading.Event()
        return 0

    def __dealloc__(self):
        free(self._entries)
        free(self._keys)
        if self._control != NULL:
            munmap(self._control, MQS_DQ_FILE_BYTES)
