# cython: language_level=3, embedsignature=True, binding=False
"""`SharedJournal`: the shared operation journal of an shm broker.

A thin wrapper of `csrc/mqs_journal.h`: a /dev/shm file that every
process of one broker maps, with a robust process-shared mutex, an
append-only records area, a change wait word and participant slots.
What the records mean is up to `mqs.broker._shm`.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.dict cimport PyDict_GetItemWithError, PyDict_SetItem
from cpython.exc cimport PyErr_CheckSignals
from cpython.object cimport PyObject
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy
from posix.mman cimport (
    MAP_FAILED,
    MAP_FIXED,
    MAP_SHARED,
    PROT_READ,
    PROT_WRITE,
    mmap,
    munmap,
)

from mqs.includes.mqs_atomic cimport MQS_EFULL, MQS_ETIMEDOUT, MQS_OK
from mqs.includes.mqs_journal cimport (
    MQS_JOURNAL_CHANGED,
    MQS_JOURNAL_DURABLE,
    MQS_JOURNAL_EAGAIN_INIT,
    MQS_JOURNAL_EVERSION,
    MQS_JOURNAL_HEADER_BYTES,
    MQS_JOURNAL_MAX_BYTES,
    MQS_JOURNAL_MAX_PARTICIPANTS,
    MQS_JOURNAL_MIN_BYTES,
    MQS_JOURNAL_RECORD_HEADER,
    MQS_JOURNAL_VERSION,
    MQS_JOURNAL_WRITER,
    mqs_journal_alive,
    mqs_journal_append,
    mqs_journal_attach,
    mqs_journal_bytes,
    mqs_journal_file_bytes,
    mqs_journal_format,
    mqs_journal_head,
    mqs_journal_header_t,
    mqs_journal_lock,
    mqs_journal_record_bytes,
    mqs_journal_restart,
    mqs_journal_unlock,
    mqs_journal_validate,
    mqs_journal_version,
    mqs_journal_word,
)
from mqs.includes.mqs_wait cimport (
    mqs_wait_finish,
    mqs_waitword_t,
    mqs_wait_park,
    mqs_wait_prepare,
    mqs_wait_signal,
)
from mqs._seglog cimport SegmentLog

import os
import pickle
import secrets
import threading
import time

from mqs.errors import LayoutVersionError

include "_mapped_file.pxi"

cdef object _dumps = pickle.dumps
cdef int _PROTOCOL = pickle.HIGHEST_PROTOCOL

__all__ = ["SharedJournal", "JournalSection", "JournalLayoutError",
           "JournalVersionError", "MIN_BYTES", "MAX_BYTES", "CHANGED",
           "DURABLE", "DURABLE_LOG_END", "WRITER"]

MIN_BYTES = MQS_JOURNAL_MIN_BYTES
MAX_BYTES = MQS_JOURNAL_MAX_BYTES
# Wait words: every commit signals CHANGED; the log backend waits for
# durability on DURABLE and wakes its writer thread through WRITER.
CHANGED = MQS_JOURNAL_CHANGED
DURABLE = MQS_JOURNAL_DURABLE
WRITER = MQS_JOURNAL_WRITER
# The word of a log broker's durable file (`mqs.broker._log_shared`)
# that holds the end offset of the writer's log after its last append.
cdef enum:
    _DURABLE_LOG_END = 5
DURABLE_LOG_END = _DURABLE_LOG_END
RECORD_HEADER = MQS_JOURNAL_RECORD_HEADER

# A lock wait and a change wait each return to Python this often, so
# that Ctrl-C (KeyboardInterrupt) gets through.
DEF SLICE_NS = 50000000


class JournalLayoutError(ValueError):
    """Raised when a /dev/shm file is not an shm broker of this layout."""


class JournalVersionError(JournalLayoutError, LayoutVersionError):
    """Raised when an shm broker's journal has another layout version
    than this mqs reads."""


cdef list _parse_records(const unsigned char *records, int64_t start,
                         int64_t end, str source):
    cdef uint32_t length
    cdef list found = []
    while start < end:
        if end - start < MQS_JOURNAL_RECORD_HEADER:
            raise ValueError(f"{source} has a truncated record header at "
                             f"byte {start}")
        memcpy(&length, records + start, sizeof(length))
        if mqs_journal_record_bytes(length) > end - start:
            raise ValueError(f"{source} has a record of {length} bytes "
                             f"past its end at byte {start}")
        found.append(PyBytes_FromStringAndSize(
            <const char *>records + start + MQS_JOURNAL_RECORD_HEADER,
            length))
        start += mqs_journal_record_bytes(length)
    return found


def read_records(bytes data, int64_t start):
    """Return the payloads of the records in `data` (the output of
    `SharedJournal.copy_records`) from byte `start` to its end.

    Raises ValueError if `start` is outside `data` or a record runs past
    its end."""
    cdef int64_t end = len(data)
    if start < 0 or start > end:
        raise ValueError(f"record offset {start} is outside the {end} "
                         f"bytes of copied journal records")
    return _parse_records(<const unsigned char *>PyBytes_AS_STRING(data),
                          start, end, "the copied journal records")


cdef class SharedJournal(_MappedFile):
    """The mapped journal file at `path`, created if missing.

    Parameters
    ----------
    path : str
        File under /dev/shm, created with mode 0600.
    journal_bytes : int
        Size of the records area when this call creates the file; an
        existing file keeps its own size.
    """

    cdef mqs_journal_header_t *_header
    cdef int _slot
    cdef uint64_t _token

    def __cinit__(self, *args, **kwargs):
        self._header = NULL
        self._slot = -1

    def __init__(self, str path, int64_t journal_bytes):
        self._min_file_bytes = MQS_JOURNAL_HEADER_BYTES
        self._kind = "an shm broker"
        self._layout_error = JournalLayoutError
        self._open(path, mqs_journal_file_bytes(journal_bytes),
                   &journal_bytes)

    cdef int _mapped(self, void *base) except -1:
        self._header = <mqs_journal_header_t *>base
        return 0

    cdef int _format(self, const void *params) except -1:
        if mqs_journal_format(self._header,
                              (<const int64_t *>params)[0]) != MQS_OK:
            raise OSError("cannot set up the journal's process-shared "
                          "mutex")
        return 0

    cdef int _validate(self, str path) except -1:
        cdef int rc = mqs_journal_validate(self._header, self._file_bytes)
        if rc == MQS_JOURNAL_EVERSION:
            version = mqs_journal_version(self._header)
            raise JournalVersionError(
                f"{path} has shm broker layout version {version}, and this "
                f"mqs reads version {MQS_JOURNAL_VERSION}: processes of two "
                f"mqs versions share this broker. Run every process of the "
                f"broker on the mqs version that created it, or close them "
                f"all and remove the broker with mqs.Broker.unlink(name) to "
                f"start it again on this version (its stored messages are "
                f"lost)", path=path, version=version,
                expected_version=MQS_JOURNAL_VERSION)
        if rc != MQS_OK:
            raise JournalLayoutError(
                f"{path} is not an shm broker of this mqs (bad header"
                f"{', never initialised' if rc == MQS_JOURNAL_EAGAIN_INIT else ''}"
                f"); unlink it or use another name")
        return 0

    cdef int _check(self) except -1:
        if self._header == NULL:
            raise ValueError(f"journal {self.path} is closed")
        return 0

    # Participants.

    def attach(self):
        """Take a participant slot; return ``(slot, token)``."""
        cdef uint64_t token = 0
        cdef int slot
        self._check()
        slot = mqs_journal_attach(self._header, self._fd, &token)
        if slot == MQS_EFULL:
            raise OSError(
                f"all {MQS_JOURNAL_MAX_PARTICIPANTS} participant slots of "
                f"{self.path} are held by live processes; close brokers in "
                f"processes that no longer use them")
        if slot < 0:
            raise OSError(-slot, f"cannot lock a participant slot of "
                                 f"{self.path}", self.path)
        self._slot = slot
        self._token = token
        return slot, token

    def alive(self, int slot, uint64_t token):
        """Return whether the holder of `slot` with `token` is alive."""
        cdef int rc
        self._check()
        rc = mqs_journal_alive(self._header, self._fd, self._slot, slot,
                               token)
        if rc < 0:
            raise OSError(-rc, f"cannot test a participant lock of "
                               f"{self.path}", self.path)
        return rc == 1

    def reopen(self):
        """Give this process its own open file description (after fork),
        dropping the slot that belonged to the parent's."""
        cdef void *base
        self._check()
        fd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDWR | os.O_CLOEXEC)
        # The inherited mapping references the parent's open file
        # description, and so keeps the parent's slot lock held while
        # this process lives: the parent would not be seen as dead. Map
        # the file again from the new description at the same address
        # (MAP_FIXED replaces the old mapping in one step). A failure may
        # leave no mapping there, so the journal counts as closed then.
        base = mmap(self._base, <size_t>self._file_bytes,
                    PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0)
        if base == MAP_FAILED:
            os.close(fd)
            self._base = NULL
            self._mapped(NULL)
            raise OSError(f"cannot map {self._file_bytes} bytes of "
                          f"{self.path} again after fork; /dev/shm or the "
                          f"address space is exhausted")
        os.close(self._fd)
        self._fd = fd
        self._slot = -1

    # Lock.

    def lock(self):
        """Take the lock; return True when its previous owner had died.

        Waits as long as it takes, in slices that let signals through.
        """
        cdef int rc
        self._check()
        rc = mqs_journal_lock(self._header, 0)
        while rc == MQS_ETIMEDOUT:
            with nogil:
                rc = mqs_journal_lock(self._header, SLICE_NS)
            if rc == MQS_ETIMEDOUT:
                PyErr_CheckSignals()
        if rc < 0:
            raise OSError(f"the process-shared mutex of {self.path} is "
                          f"unusable (status {rc})")
        return rc == 1

    def unlock(self):
        mqs_journal_unlock(self._header)

    # Records (under the lock).

    def position(self):
        """Return ``(generation, committed bytes)``."""
        cdef uint64_t position
        self._check()
        position = mqs_journal_head(self._header).position
        return position >> 32, position & 0xffffffff

    @property
    def restart_used(self):
        """Committed bytes of the journal that the last restart ended."""
        self._check()
        return mqs_journal_head(self._header).restart_used

    @property
    def recoveries(self):
        """Times a process found the lock's owner dead."""
        self._check()
        return mqs_journal_head(self._header).recoveries

    @property
    def journal_bytes(self):
        self._check()
        return mqs_journal_bytes(self._header)

    @property
    def slot(self):
        return self._slot

    @property
    def token(self):
        return self._token

    def record_bytes(self, Py_ssize_t length):
        """Bytes a record of `length` payload bytes takes."""
        return mqs_journal_record_bytes(length)

    def has_room(self, Py_ssize_t length):
        """Return whether a record of `length` payload bytes fits after
        the committed ones."""
        self._check()
        return mqs_journal_record_bytes(length) <= (
            mqs_journal_bytes(self._header)
            - <int64_t>(mqs_journal_head(self._header).position
                        & 0xffffffff))

    def append(self, bytes payload):
        """Append a record; return the new committed bytes, or -1 when
        the journal has no room for it."""
        cdef int64_t rc
        self._check()
        if len(payload) > mqs_journal_bytes(self._header):
            return -1
        rc = mqs_journal_append(self._header, PyBytes_AS_STRING(payload),
                                <uint32_t>len(payload))
        return -1 if rc == MQS_EFULL else rc

    def read(self, int64_t start, int64_t end):
        """Return the payloads of the records from byte `start` to `end`."""
        self._check()
        if start < 0 or end > mqs_journal_bytes(self._header) or start > end:
            raise ValueError(f"record range {start}..{end} is outside the "
                             f"journal of {self.path}")
        return _parse_records(
            (<unsigned char *>self._header) + MQS_JOURNAL_HEADER_BYTES,
            start, end, self.path)

    def copy_records(self, int64_t end):
        """Return the record bytes from the start of the journal to byte
        `end`, in the layout that `read_records` parses."""
        self._check()
        if end < 0 or end > mqs_journal_bytes(self._header):
            raise ValueError(f"record range 0..{end} is outside the "
                             f"journal of {self.path}")
        return PyBytes_FromStringAndSize(
            (<char *>self._header) + MQS_JOURNAL_HEADER_BYTES, end)

    def restart(self):
        """Start a new generation with no records; return it."""
        self._check()
        return mqs_journal_restart(self._header)

    # Change notification. Every commit should be followed by `signal()`;
    # the other two words are for the owner's own protocol.

    def wait_prepare(self, int which=MQS_JOURNAL_CHANGED):
        """Register as a waiter on word `which`; return the epoch to pass
        to `wait`."""
        self._check()
        return mqs_wait_prepare(mqs_journal_word(self._header, which))

    def wait(self, uint32_t epoch, double timeout, int which=MQS_JOURNAL_CHANGED):
        """Wait until word `which` is signalled after `wait_prepare` or
        `timeout` seconds pass (at most 50 ms in one call), then
        deregister."""
        cdef int64_t timeout_ns = <int64_t>(min(max(timeout, 0.0), 0.05)
                                            * 1e9)
        cdef mqs_waitword_t *word
        self._check()
        word = mqs_journal_word(self._header, which)
        with nogil:
            mqs_wait_park(word, epoch, timeout_ns, 1)
        mqs_wait_finish(word)

    def cancel_wait(self, int which=MQS_JOURNAL_CHANGED):
        """Deregister a waiter that did not call `wait`."""
        mqs_wait_finish(mqs_journal_word(self._header, which))

    def signal(self, int which=MQS_JOURNAL_CHANGED):
        """Wake every process waiting on word `which`."""
        self._check()
        mqs_wait_signal(mqs_journal_word(self._header, which), 1)

    def close(self):
        """Unmap the file and release the slot; idempotent."""
        self._close_file()
        self._slot = -1


# Tries of a thread that finds the section taken by another thread of its
# process before it blocks (see `JournalSection._acquire_contended`).
DEF SECTION_SPINS = 64

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec *tp)
    int CLOCK_MONOTONIC


cdef inline object _attr(object backend, dict state, str name):
    """``backend.<name>``: from the instance dict `state` when it is
    there (the common case, and several times faster than the attribute
    lookup through the class's long MRO), else through getattr (a class
    default)."""
    cdef PyObject *item = PyDict_GetItemWithError(state, name)
    if item != NULL:
        return <object>item
    return getattr(backend, name)


cdef inline bint _true(object backend, dict state, str name) except -1:
    cdef PyObject *item = PyDict_GetItemWithError(state, name)
    if item != NULL:
        if <object>item is True:
            return True
        if <object>item is False:
            return False
        return bool(<object>item)
    return bool(getattr(backend, name))


cdef inline double _monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef class JournalSection:
    """The ``_lock`` of an shm or log broker (`mqs.broker._shm`): this
    process's thread lock, then the journal's mutex, with the process's
    replica of the state brought up to date.

    The broker's operations run inside ``with backend._lock:``, three
    times per message, so the common case runs here in C: the mutex is
    free, no record of another process is waiting, nothing is due. It
    reads the backend's attributes ``_closed``, ``_enter_slow``,
    ``_log_behind``, ``_writer``, ``_generation``, ``_applied`` and
    ``_next_reap`` to decide, and sets ``_held`` and ``_appended`` as
    ``_enter_locked`` does. Everything else goes to the backend's Python
    methods: ``_enter_shared`` (take the mutex and catch up),
    ``_lock_recovered`` (the mutex's previous owner died) and
    ``_enter_locked`` (catch up, with the mutex held). Leaving does what
    ``_leave_shared`` does: release the mutex and, after an append,
    signal the change word (unless the backend's ``_quiet`` is true,
    which it then clears), and the writer word when the backend's
    ``_wakes_writer`` is true.
    """

    def __init__(self, backend):
        self._backend = backend
        # Read and written directly: none of the attributes the section
        # uses is a descriptor (a property would make this wrong).
        self._state = backend.__dict__
        self.thread_lock = threading.Lock()
        self._acquire = self.thread_lock.acquire
        self._release = self.thread_lock.release

    def __enter__(self):
        self.enter_section()

    def __exit__(self, *exc_info):
        self.leave_section()

    cdef int enter_section(self) except -1:
        """`__enter__`, for the paths of `mqs._topiccore`."""
        if not self._acquire(False):
            self._acquire_contended()
        try:
            self._enter()
        except BaseException:
            self._backend._leave_shared()
            self._release()
            raise
        return 0

    cdef int leave_section(self) except -1:
        """`__exit__`, for the paths of `mqs._topiccore`."""
        try:
            self._leave()
        finally:
            self._release()
        return 0

    def _acquire_contended(self):
        """Take the thread lock that another thread holds.

        Threads that block in the lock wake at each release and then wait
        for the GIL, so with several busy threads nearly every operation
        costs wake-ups and context switches (a lock convoy). That cost a
        log broker with 4 producer and 4 consumer threads up to twice the
        CPU per message. So the waiter first yields the GIL
        (``time.sleep(0)``), letting the holder finish, and tries again,
        up to SECTION_SPINS times, before it blocks in the lock.
        """
        for _ in range(SECTION_SPINS):
            time.sleep(0)
            if self._acquire(False):
                return
        self._acquire()

    cdef int _enter(self) except -1:
        cdef object backend = self._backend
        cdef dict state = self._state
        cdef object found = _attr(backend, state, "_journal")
        cdef SharedJournal journal
        cdef uint64_t position
        cdef int rc
        if (_true(backend, state, "_closed")
                or _true(backend, state, "_enter_slow")
                or (_true(backend, state, "_log_behind")
                    and _true(backend, state, "_writer"))
                or type(found) is not SharedJournal
                or (<SharedJournal>found)._header == NULL):
            backend._enter_shared()
            return 0
        journal = <SharedJournal>found
        rc = mqs_journal_lock(journal._header, 0)
        if rc == 1:
            backend._lock_recovered()
        elif rc != MQS_OK:
            # Held by another process (or unusable): the Python path
            # waits in slices that let signals through, or raises.
            backend._enter_shared()
            return 0
        state["_held"] = True
        state["_appended"] = False
        position = mqs_journal_head(journal._header).position
        if (rc == 1
                or <int64_t>(position >> 32)
                    != <int64_t>_attr(backend, state, "_generation")
                or <int64_t>(position & 0xffffffffu)
                    != <int64_t>_attr(backend, state, "_applied")
                or _monotonic()
                    >= <double>_attr(backend, state, "_next_reap")):
            backend._enter_locked()
        return 0

    cdef int _leave(self) except -1:
        cdef object backend = self._backend
        cdef dict state = self._state
        cdef object found = _attr(backend, state, "_journal")
        cdef SharedJournal journal
        if type(found) is not SharedJournal:
            backend._leave_shared()
            return 0
        if not _true(backend, state, "_held"):
            return 0
        state["_held"] = False
        journal = <SharedJournal>found
        journal._check()
        mqs_journal_unlock(journal._header)
        if _true(backend, state, "_appended"):
            if _true(backend, state, "_quiet"):
                state["_quiet"] = False
            else:
                mqs_wait_signal(mqs_journal_word(journal._header,
                                                 MQS_JOURNAL_CHANGED), 1)
            if _true(backend, state, "_wakes_writer"):
                mqs_wait_signal(mqs_journal_word(journal._header,
                                                 MQS_JOURNAL_WRITER), 1)
        return 0

    def append_record(self, bytes data):
        """The log backend's ``_append`` (`mqs.broker._log_shared`), run
        in every operation: append `data` to the journal, and to the
        segment log when this process is the writer and its log is not
        behind (then store the log's new end in the durable file). The
        caller holds the section."""
        self._append_record(data)

    cdef int _append_record(self, bytes data) except -1:
        cdef object backend = self._backend
        cdef dict state = self._state
        cdef object found = _attr(backend, state, "_journal")
        cdef SharedJournal journal
        cdef int64_t end
        cdef uint64_t position
        if type(found) is not SharedJournal:
            # A stand-in (the crash tests wrap the journal).
            end = found.append(data)
        else:
            journal = <SharedJournal>found
            journal._check()
            if len(data) > mqs_journal_bytes(journal._header):
                end = -1
            else:
                end = mqs_journal_append(journal._header,
                                         PyBytes_AS_STRING(data),
                                         <uint32_t>len(data))
        if end < 0:
            raise AssertionError("journal full after a compaction")
        state["_applied"] = end
        state["_appended"] = True
        position = (<uint64_t>(<int64_t>_attr(backend, state, "_generation"))
                    << 32) | <uint64_t>end
        if _true(backend, state, "_marks_records"):
            backend._local.mark = position
        if _true(backend, state, "_writer") \
                and not _true(backend, state, "_log_behind"):
            log = _attr(backend, state, "_log")
            try:
                if type(log) is SegmentLog:
                    offset = (<SegmentLog>log).append_bytes(data)
                else:
                    # A stand-in (the crash tests wrap the log).
                    offset = log.append(data)
            except BaseException as exc:
                backend._fail_append(exc)
                raise
            # How far the log reaches, for the check of a restored backup.
            _attr(backend, state, "_durable")[_DURABLE_LOG_END] = offset + 1
            state["_bytes_since_snapshot"] = _attr(
                backend, state, "_bytes_since_snapshot") + len(data)
            state["_log_state"] = (log, position)
        return 0

    def reserve(self, op, bytes data):
        """The backends' ``_reserve`` when the record fits: return `data`
        when the backend has not failed, the record is at most
        ``_max_record`` bytes and fits in the journal after the committed
        records. Otherwise the backend class's ``_reserve`` decides
        (compaction, or MessageTooLarge). The caller holds the section."""
        return self._reserve(op, data)

    cdef object _reserve(self, op, bytes data):
        cdef object backend = self._backend
        cdef dict state = self._state
        cdef object found = _attr(backend, state, "_journal")
        cdef SharedJournal journal
        cdef Py_ssize_t length = len(data)
        if (_attr(backend, state, "_failed") is None
                and length <= _attr(backend, state, "_max_record")
                and type(found) is SharedJournal):
            journal = <SharedJournal>found
            if journal._header != NULL and mqs_journal_record_bytes(length) \
                    <= mqs_journal_bytes(journal._header) - <int64_t>(
                        mqs_journal_head(journal._header).position
                        & 0xffffffffu):
                return data
        return type(backend)._reserve(backend, op, data)

    def log_core(self, str op, *args):
        """`SharedLogBackend._log_core` (`mqs.broker._log_shared`), run
        three times per message of a core topic: append the record
        ``(op, now, args)`` of a topic core operation, as `tick`,
        `reserve` and `append_record` would, then compact when the
        records since the last snapshot pass ``_compact_bytes``. The
        caller holds the section."""
        self.log_record(op, args)

    cdef int log_record(self, str op, tuple args) except -1:
        cdef object backend = self._backend
        cdef dict state = self._state
        cdef double now = self._tick()
        self._append_record(self._reserve(op, _dumps((op, now, args),
                                                     _PROTOCOL)))
        if _attr(backend, state, "_bytes_since_snapshot") \
                > _attr(backend, state, "_compact_bytes"):
            backend._after_write()
        return 0

    def tick(self):
        """The log backends' ``_tick``: set and return the broker time of
        the next operation (`mqs.broker._log`). The caller holds the
        section."""
        return self._tick()

    cdef double _tick(self) except? -1.0:
        cdef object backend = self._backend
        cdef dict state = self._state
        cdef double now = _monotonic() + <double>_attr(backend, state,
                                                       "_offset")
        cdef double last = _attr(backend, state, "_last")
        cdef double pinned = _attr(backend, state, "_now")
        if now < last:
            now = last
        state["_last"] = now
        if now < pinned:
            now = pinned
        state["_now"] = now
        return now
