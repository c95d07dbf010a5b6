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
    MQS_DQ_DURABLE_POS,
    MQS_DQ_FILE_BYTES,
    mqs_dq_claim,
    mqs_dq_control_t,
    mqs_dq_get,
    mqs_dq_not_empty,
    mqs_dq_progress,
    mqs_dq_secret,
    mqs_dq_set,
    mqs_dq_setup,
)

import atexit
import struct
import threading

# Consumer group of the log that stores the queue's cursor.
DURABLE_GROUP = "queue"
CONTROL_FILE = "queue.ctl"
_KEY = struct.Struct("<QqH")  # ring secret, ring position, record type
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

_durables = weakref.WeakSet()


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


def _check_queue_log(log, path):
    """Raise if the log at `path` holds records a durable queue did not
    write (their key is not a queue key)."""
    if log.end_offset <= log.start_offset:
        return
    key = log.read_record(log.end_offset - 1).key
    if key is None or len(key) != _KEY.size:
        raise ValueError(
            f"persist={path!r} holds a segment log that a durable "
            f"SharedQueue did not write; give the queue its own directory")


@cython.final
cdef class _Durable:
    """The durable part of one SharedQueue handle (one per process)."""

    cdef SharedQueue _queue
    cdef readonly str path
    cdef readonly str fsync
    cdef mqs_dq_control_t *_control
    cdef object _reader
    cdef object _writer
    cdef object _thread
    cdef object _lock
    cdef bint _stopping
    cdef bint _closed
    cdef int _pid
    cdef int64_t _next_takeover_ns
    cdef int64_t _last_commit_ns
    cdef int64_t _committed
    cdef int64_t _last_repair_ns
    cdef object __weakref__

    def __cinit__(self):
        self._control = NULL
        self._committed = -1

    cdef int _open(self, SharedQueue queue, object path,
                   object fsync) except -1:
        cdef int fd
        cdef void *address
        if fsync not in _FSYNC_MODES:
            raise ValueError(
                f"fsync must be 'always', 'interval' or 'never', got "
                f"{fsync!r}")
        path = os.fspath(path)
        if not isinstance(path, str):
            raise TypeError(f"persist must be a str or os.PathLike path, "
                            f"got {type(path).__name__} {path!r}")
        if os.path.exists(path) and not os.path.isdir(path):
            raise NotADirectoryError(
                f"persist={path!r} is a file; give a directory for the "
                f"queue's segment log (it is created if missing)")
        os.makedirs(path, mode=0o700, exist_ok=True)
        self._queue = queue
        self.path = path
        self.fsync = fsync
        self._pid = os.getpid()
        self._lock = threading.Lock()
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
        self._reader = SegmentLog(path, readonly=True)
        _check_queue_log(self._reader, path)
        self._join_or_take_over()
        _durables.add(self)
        self._start_thread()
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
        if self._pid != os.getpid():
            # A forked child: start this process's own appender thread.
            self._pid = os.getpid()
            self._start_thread()
        return 0

    # -- appender -----------------------------------------------------------

    cdef int _run_once(self) except -1:
        """One appender step: take the lock if free, move records, or wait."""
        cdef SharedQueue queue = self._queue
        cdef uint32_t epoch
        cdef int moved = 0
        if self._writer is None:
            if mqs_monotonic_ns() < self._next_takeover_ns:
                time.sleep(TAKEOVER_POLL_NS / 1e9)
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
                    self._commit_cursor(False)
        except BaseException:
            mqs_wait_finish(mqs_br_not_empty(&queue._ring))
            raise
        if moved:
            mqs_wait_finish(mqs_br_not_empty(&queue._ring))
            return 0
        park(mqs_br_not_empty(&queue._ring), epoch, mqs_monotonic_ns()
             + WAIT_SLICE_NS, 1, STRATEGY_BLOCK)
        return 0

    cdef bint _try_take_over(self) except -1:
        cdef SharedQueue queue = self._queue
        cdef uint64_t secret = queue._ring.secret
        cdef int64_t head = 0, end = 0, cursor
        try:
            writer = SegmentLog(self.path, fsync=self.fsync)
        except LogLocked:
            return False
        with self._lock:
            if self._stopping:
                writer.close()
                return False
            self._writer = writer
            head = self._skip_appended(writer)
            end = writer.end_offset
            if mqs_dq_secret(self._control) != secret:
                # A new inbox ring: start where the last cursor commit is.
                committed = writer.committed(DURABLE_GROUP)
                cursor = writer.start_offset if committed is None \
                    else committed
                cursor = min(max(cursor, writer.start_offset), end)
                mqs_dq_setup(self._control, secret, cursor, end, head)
                self._committed = cursor
            else:
                # The same ring after its appender died: make what it
                # appended durable, then continue from there.
                if self.fsync == "always":
                    writer.flush()
                mqs_dq_set(self._control, MQS_DQ_APPENDED_OFFSET, end)
                mqs_dq_set(self._control, MQS_DQ_APPENDED_POS, head)
                mqs_dq_set(self._control, MQS_DQ_DURABLE_POS, head)
            self._last_commit_ns = mqs_monotonic_ns()
        logger.info("durable queue %s: this process (pid %d) appends to the "
                    "log from ring position %d, log offset %d", self.path,
                    os.getpid(), head, end)
        mqs_wait_signal(mqs_dq_not_empty(self._control), 1)
        mqs_wait_signal(mqs_dq_progress(self._control), 1)
        return True

    cdef int64_t _skip_appended(self, writer) except -1:
        """Free inbox records that a dead appender already put in the log.

        Returns the inbox head afterwards.
        """
        cdef SharedQueue queue = self._queue
        cdef int64_t head = mqs_br_head(&queue._ring, 0)
        cdef int64_t position = head, last
        cdef int64_t messages = 0
        cdef mqs_br_record_t record
        if writer.end_offset <= writer.start_offset:
            return head
        secret, last, _ = _KEY.unpack(
            bytes(writer.read_record(writer.end_offset - 1).key))
        if secret != queue._ring.secret or last < head:
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

    cdef int _append_batch(self) except -1:
        """Move up to APPEND_BATCH inbox records into the log.

        Returns how many ring records (padding included) were passed.
        """
        cdef SharedQueue queue = self._queue
        cdef uint64_t secret = queue._ring.secret
        cdef int64_t head = mqs_br_head(&queue._ring, 0)
        cdef int64_t position = head
        cdef int64_t messages = 0
        cdef int passed = 0
        cdef int rc = MQS_OK
        cdef mqs_br_record_t record
        cdef list entries = []
        while passed < APPEND_BATCH:
            rc = mqs_br_peek(&queue._ring, position, &record)
            if rc != MQS_OK:
                break
            if record.type != MQS_BR_TYPE_PAD:
                entries.append((
                    _KEY.pack(secret, position, record.type),
                    PyBytes_FromStringAndSize(
                        <const char *>record.payload, record.length)))
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
        if entries:
            # With fsync="always" this syncs once for the whole batch:
            # the group commit of every producer waiting in wait_durable.
            self._writer.append_many(entries)
        mqs_br_advance(&queue._ring, 0, position, messages)
        mqs_dq_set(self._control, MQS_DQ_APPENDED_OFFSET,
                   self._writer.end_offset)
        mqs_dq_set(self._control, MQS_DQ_APPENDED_POS, position)
        if self.fsync == "always":
            mqs_dq_set(self._control, MQS_DQ_DURABLE_POS, position)
            mqs_wait_signal(mqs_dq_progress(self._control), 1)
        mqs_wait_signal(mqs_dq_not_empty(self._control), 1)
        return passed

    cdef int _commit_cursor(self, bint now) except -1:
        """Store the cursor in the log, every COMMIT_EVERY_NS or `now`."""
        cdef int64_t cursor
        if self._writer is None or not self._ready():
            return 0
        if not now and mqs_monotonic_ns() - self._last_commit_ns \
                < COMMIT_EVERY_NS:
            return 0
        self._last_commit_ns = mqs_monotonic_ns()
        cursor = mqs_dq_get(self._control, MQS_DQ_CURSOR)
        if cursor != self._committed:
            self._writer.commit(DURABLE_GROUP, cursor)
            self._committed = cursor
        return 0

    # -- producers ----------------------------------------------------------

    cdef int wait_durable(self, int64_t position) except -1:
        """With fsync="always": wait until the record at `position` is
        flushed. Waits without a limit (the message is already accepted),
        waking every WAIT_SLICE_NS for Ctrl-C."""
        cdef uint32_t epoch
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
            park(word, epoch, -1, 1, STRATEGY_SLEEP)

    # -- consumers ----------------------------------------------------------

    cdef int64_t _claim(self, int64_t max_n, int64_t *first):
        if not self._ready():
            return 0
        return mqs_dq_claim(self._control, max_n, first)

    cdef int64_t _wait_claim(self, int64_t max_n, int64_t *first,
                             bint block, object timeout) except -1:
        cdef int64_t deadline = deadline_ns(timeout) if block else 0
        cdef mqs_waitword_t *word = mqs_dq_not_empty(self._control)
        cdef uint32_t epoch
        cdef int64_t n
        cdef int strategy = self._queue._strategy
        self._check_process()
        n = self._claim(max_n, first)
        if n:
            return n
        while True:
            epoch = mqs_wait_prepare(word)
            n = self._claim(max_n, first)
            if n:
                mqs_wait_finish(word)
                return n
            if not block:
                mqs_wait_finish(word)
                raise Empty()
            if park(word, epoch, deadline, 1, strategy):
                raise Empty()
            if strategy == STRATEGY_BLOCK:
                strategy = STRATEGY_SLEEP

    cdef object _read(self, int64_t offset, bint view):
        """Return the message at log `offset` (or its bytes, as a view)."""
        reader = self._reader
        try:
            record = reader.read_record(offset)
        except OffsetOutOfRange:
            reader.refresh()
            record = reader.read_record(offset)
        if view:
            return record.value
        rtype = _KEY.unpack(bytes(record.key))[2]
        data = bytes(record.value) if rtype == TYPE_BYTES \
            else bytearray(record.value)
        return self._queue._finish(rtype, data)

    cdef object get(self, bint block, object timeout):
        cdef int64_t first = 0
        self._wait_claim(1, &first, block, timeout)
        return self._read(first, False)

    cdef list get_many(self, int64_t max_items, bint block, object timeout):
        cdef int64_t first = 0
        cdef int64_t n = self._wait_claim(max_items, &first, block, timeout)
        return [self._read(first + i, False) for i in range(n)]

    cdef object get_view(self, object timeout):
        cdef int64_t first = 0
        self._wait_claim(1, &first, True, timeout)
        return self._read(first, True)

    cdef int64_t backlog(self):
        """Messages in the log that no consumer has taken yet."""
        if not self._ready():
            return 0
        return max(0, mqs_dq_get(self._control, MQS_DQ_APPENDED_OFFSET)
                   - mqs_dq_get(self._control, MQS_DQ_CURSOR))

    # -- closing ------------------------------------------------------------

    cdef int close(self) except -1:
        """Move what is left in the inbox into the log, commit the cursor,
        release the writer lock (another process takes over) and stop."""
        cdef int64_t deadline
        if self._closed:
            return 0
        self._closed = True
        self._stopping = True
        _durables.discard(self)
        if self._pid == os.getpid():
            if self._thread is not None:
                mqs_wait_signal(mqs_br_not_empty(&self._queue._ring), 1)
                self._thread.join()
            with self._lock:
                if self._writer is not None:
                    deadline = mqs_monotonic_ns() + CLOSE_DRAIN_NS
                    while self._append_batch() and \
                            mqs_monotonic_ns() < deadline:
                        pass
                    self._commit_cursor(True)
                    self._writer.close()
                    self._writer = None
        else:
            self._after_fork()
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
        if self._reader is not None:
            self._reader._abandon_after_fork()
            self._reader = SegmentLog(self.path, readonly=True)
        self._thread = None
        self._lock = threading.Lock()
        return 0

    def __dealloc__(self):
        if self._control != NULL:
            munmap(self._control, MQS_DQ_FILE_BYTES)
