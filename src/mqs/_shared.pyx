# cython: language_level=3, embedsignature=True, binding=False
"""`SharedQueue`: a multiprocessing.Queue drop-in on a shared-memory ring.

The ring is `csrc/mqs_bytering.h`: variable-length records in a memfd or a
/dev/shm file that every process maps. No feeder thread, no pipe, no
semaphore: a put copies the record into the mapping, a get copies it out.
"""

cimport cython
from cpython.buffer cimport PyBUF_WRITABLE
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport INT64_MAX, int64_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy
from posix.unistd cimport getpid, usleep

from mqs._waiting cimport (
    STRATEGY_BLOCK,
    STRATEGY_SLEEP,
    STRATEGY_SPIN,
    STRATEGY_YIELD,
    WAIT_SLICE_NS,
    deadline_ns,
    park,
)
from mqs.includes.mqs_atomic cimport (
    MQS_EEMPTY,
    MQS_EFULL,
    MQS_EINVAL,
    MQS_ENOMEM,
    MQS_ETOOBIG,
    MQS_OK,
    mqs_cpu_relax,
)
from mqs.includes.mqs_bytering cimport (
    MQS_BR_INIT_READY,
    MQS_BR_MAGIC,
    MQS_BR_MAX_GROUPS,
    MQS_BR_NO_PIN,
    MQS_BR_RECORD_HEADER,
    MQS_BR_STAMP_BYTES,
    MQS_BR_TYPE_PAD,
    MQS_BR_TYPE_STAMPED,
    MQS_BR_VERSION,
    MQS_EAGAIN_INIT,
    MQS_EAGAIN_STUCK,
    MQS_EVERSION,
    mqs_br_check_sizes,
    mqs_br_config,
    mqs_br_config_t,
    mqs_br_count,
    mqs_br_count_decode_failure,
    mqs_br_counters,
    mqs_br_detach,
    mqs_br_file_bytes,
    mqs_br_format,
    mqs_br_latency,
    mqs_br_map,
    mqs_br_remap,
    mqs_br_not_empty,
    mqs_br_not_full,
    mqs_br_advance,
    mqs_br_head,
    mqs_br_head_published,
    mqs_br_participant,
    mqs_br_peek,
    mqs_br_record_size,
    mqs_br_set_copies,
    mqs_br_unstamp,
    mqs_br_record_t,
    mqs_br_repair,
    mqs_br_settle,
    mqs_br_stalled_owner,
    mqs_br_try_put,
    mqs_br_try_take,
    mqs_br_unmap,
    mqs_br_unpin,
    mqs_bytering_t,
    mqs_br_attach,
    mqs_br_config_t,
    mqs_br_counters_t,
    mqs_br_header_t,
    mqs_br_participant_alive,
    mqs_br_validate,
    MQS_BR_HEADER_BYTES,
    MQS_BR_MAX_PARTICIPANTS,
)
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, mmap, munmap
from mqs.includes.mqs_delay cimport (
    MQS_DELAY_MIN_AREA_BYTES,
    MQS_DELAY_VERSION,
    mqs_delay_state_t,
    MQS_EAGAIN_LOCKED,
    mqs_delay_block_bytes,
    mqs_delay_count,
    mqs_delay_format,
    mqs_delay_map,
    mqs_delay_remap,
    mqs_delay_max_payload,
    mqs_delay_next_due,
    mqs_delay_promote,
    mqs_delay_stats,
    mqs_delay_t,
    mqs_delay_try_put,
    mqs_delay_unmap,
    mqs_delay_validate,
)
from mqs.includes.mqs_hist cimport (
    MQS_HIST_BUCKETS,
    mqs_hist_reset,
    mqs_hist_t,
)
from mqs.includes.mqs_wait cimport (
    mqs_monotonic_ns,
    mqs_wait_finish,
    mqs_wait_prepare,
    mqs_wait_signal,
    mqs_waitword_t,
)

import dataclasses
import logging
import os
import pickle
import secrets
import stat
import struct
import time
import types
import weakref

from mqs import _aio
from mqs._dirkind import DURABLE_QUEUE, QUEUE_CONTROL_FILE
from mqs._dirkind import check_directory_kind
from mqs._queue import due_monotonic_ns
from mqs._seglog import SegmentLog
from mqs.errors import (
    Empty,
    Full,
    LayoutVersionError,
    LogCorrupted,
    LogLocked,
    MessageDecodeError,
    MessageTooLarge,
    MqsError,
    OffsetOutOfRange,
)

__all__ = ["SharedQueue", "QueueNotFound", "QueueLayoutError",
           "QueueVersionError"]

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
NAME_PREFIX = "mqs."
DEFAULT_CAPACITY_BYTES = 16 << 20
DEFAULT_DELAYED_CAPACITY_BYTES = 4 << 20
# The fields of the ring's config block (mqs_br_config_t), read before
# the file is mapped to learn its sizes.
_CONFIG_FORMAT = "<QIIqqqqiIq"
_CONFIG_BYTES = 64
_INIT_READY = MQS_BR_INIT_READY
_LAYOUT_VERSION = MQS_BR_VERSION
# MQS_JOURNAL_MAGIC of mqs_journal.h ("MQSJRNL1"): the first field of an
# shm broker's journal, which lives in /dev/shm as "mqs.broker.<name>".
_JOURNAL_MAGIC = 0x314C4E524A53514D

# Record types in the ring.
cdef enum:
    TYPE_BYTES = 1        # a bytes object, returned as bytes
    TYPE_BYTEARRAY = 2    # a bytearray, returned as bytearray
    TYPE_PICKLE = 3       # a pickle stream (protocol 5, buffers in band)
    TYPE_PICKLE_OOB = 4   # pickle stream plus out-of-band buffers
    TYPE_CUSTOM = 5       # bytes from a user serializer's dumps

# How long a get with the "spin" strategy retries with the GIL held
# before it waits like the other strategies.
DEF SPIN_HOLD_NS = 20000

# A put or get that waits this long behind one unpublished record logs
# the stalled producer once.
DEF STALL_REPORT_NS = 5000000000

# A delayed put retries this long while another process holds the delay
# lock (a few microseconds normally) before it waits like a full queue.
DEF LOCK_RETRY_NS = 1000000

# A get that finds due messages it cannot move yet (the delay lock is
# held, or the ring is full) looks again after this long at the latest.
DEF DUE_RETRY_NS = 1000000

# While latency sampling is off, a producer reads the shared sampling
# rate again after this many puts, so turning it on in another process
# takes effect within that many puts.
DEF SAMPLING_RECHECK_PUTS = 1024


class QueueNotFound(MqsError, FileNotFoundError):
    """Raised when attaching to a named queue that does not exist."""


class QueueLayoutError(MqsError, ValueError):
    """Raised when a shared file is not an mqs queue of this layout."""


class QueueVersionError(QueueLayoutError, LayoutVersionError):
    """Raised when a shared queue file has another layout version (of its
    ring or of its delayed area) than this mqs reads."""


def _version_error(label, part, version, expected, path=None):
    """Return the `QueueVersionError` for a queue whose `part` ("ring" or
    "delayed area") has layout `version`."""
    return QueueVersionError(
        f"{label} has {part} layout version {version}, and this mqs reads "
        f"version {expected}: processes of two mqs versions share the "
        f"queue. Run every process of the queue on the mqs version that "
        f"created it, or close them all and unlink the queue to create "
        f"it again on this version (its items are lost)", path=path,
        version=version, expected_version=expected)


_STRATEGIES = {"block": STRATEGY_BLOCK, "spin": STRATEGY_SPIN,
               "yield": STRATEGY_YIELD}

# Every live SharedQueue of this process, re-attached in a forked child.
_instances = weakref.WeakSet()


def _shm_path(name):
    return os.path.join(SHM_DIR, NAME_PREFIX + name)


def _unlink_created(name, identity):
    """Remove the queue file `name` and its persist note after a failed
    constructor created the file, if the name still refers to it.

    NOTE: a process that attached by name between the creation and this
    call keeps using a queue that no longer has a name.
    """
    path = _shm_path(name)
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return
    if (status.st_dev, status.st_ino) != identity:
        return  # unlinked and created again by another process
    for stale in (path, _persist_note_path(name)):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass


def _check_name(name):
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__} "
                        f"{name!r}")
    if not name or "/" in name or "\0" in name or name in (".", "..") \
            or len(name) > 200:
        raise ValueError(
            f"name must be 1 to 200 characters, not '.' or '..', without "
            f"'/' or NUL, got {name!r}")


def _check_int(label, value):
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{label} must be an int, got "
                        f"{type(value).__name__} {value!r}")


def _reopen_own(fd):
    """Open a new file description of the file behind fd, closing fd.

    Liveness locks belong to an open file description. A child that
    inherited the parent's would keep the parent's lock alive, so each
    process gets its own.
    """
    new_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    os.close(fd)
    return new_fd


def _after_fork_in_child():
    for q in list(_instances):
        (<SharedQueue>q)._reattach_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


ctypedef void (*_fork_handler_t)() noexcept nogil

cdef extern from "<pthread.h>" nogil:
    int pthread_atfork(_fork_handler_t prepare, _fork_handler_t parent,
                       _fork_handler_t child)

# This process's id, for the inherited-handle checks of every put and get:
# os.getpid() is a system call on glibc. A pthread_atfork handler updates
# it in the child of any fork() through glibc, os.fork() included.
cdef int _process_id = getpid()


cdef void _update_process_id() noexcept nogil:
    global _process_id
    _process_id = getpid()


pthread_atfork(NULL, NULL, _update_process_id)


@cython.final
cdef class _RecordView:
    """Read-only buffer over one record in the mapping; unpins on release."""

    cdef SharedQueue _queue
    cdef const unsigned char *_payload
    cdef Py_ssize_t _length
    cdef int64_t _position
    cdef int _exports
    cdef int _pid
    cdef bint _released
    cdef Py_ssize_t _shape[1]
    cdef Py_ssize_t _strides[1]

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("a record view is read-only")
        if self._released:
            raise ValueError("the record view was released")
        self._shape[0] = self._length
        self._strides[0] = 1
        buffer.buf = <void *>self._payload
        buffer.obj = self
        buffer.len = self._length
        buffer.readonly = 1
        buffer.itemsize = 1
        buffer.format = "B"
        buffer.ndim = 1
        buffer.shape = self._shape
        buffer.strides = self._strides
        buffer.suboffsets = NULL
        buffer.internal = NULL
        self._exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self._exports -= 1
        if self._exports == 0:
            self._release()

    cdef void _release(self):
        if self._released:
            return
        self._released = True
        if self._pid == os.getpid():
            self._queue._release_view(self._position)


cdef class _ViewContext:
    """Context manager returned by `SharedQueue.get_view`."""

    cdef SharedQueue _queue
    cdef object _timeout
    cdef object _view

    def __enter__(self):
        self._view = self._queue._take_view(self._timeout)
        return self._view

    def __exit__(self, *exc_info):
        view = self._view
        self._view = None
        if view is not None:
            view.release()
            if self._queue._durable is not None:
                self._queue._durable.end_view()
        return False


@cython.auto_pickle(False)
cdef class SharedQueue:
    # The first docstring lines are the text signature that
    # inspect.signature reads; tests/test_introspection.py checks them.
    """SharedQueue(maxsize=0, *, name=None, create=True,
                capacity_bytes=None, max_message_size=None,
                serializer=None, wait_strategy='block', groups=None,
                group=0, ctx=None, persist=None, fsync='interval',
                delayed_capacity_bytes=None, segment_bytes=None)\n--\n
    Multi-process FIFO queue in shared memory; a drop-in for
    `multiprocessing.Queue`.

    Parameters
    ----------
    maxsize : int
        Bound on queued messages; 0 means bounded only by the ring size.
    name : str, optional
        Attach by name from any process (a file in /dev/shm, mode 0600).
        Without a name the queue lives in an anonymous memfd and reaches
        child processes like a `multiprocessing.Queue`: through
        inheritance (fork, or the arguments of a spawned Process).
    create : bool
        With a name: create the queue if it does not exist (True), or
        only attach (False, raising `QueueNotFound` when missing).
    capacity_bytes : int, optional
        Ring size: a power of two, at least one page; 16 MiB by default.
        Fixed; this is all the memory the queue uses. When attaching to
        an existing named queue, `capacity_bytes`, `max_message_size`,
        a nonzero `maxsize` and `groups`, if given, must match it
        (`QueueLayoutError` otherwise).
    max_message_size : int, optional
        Largest serialized message; default: whatever fits the ring.
    serializer : object, optional
        Object with ``dumps(obj) -> bytes`` and ``loads(bytes) -> obj`` for
        non-bytes messages; default pickle protocol 5 with out-of-band
        buffers (NumPy arrays travel without an extra pickle copy).
        ``dumps`` must return a bytes-like object, so the `json` module
        does not fit as is (its ``dumps`` returns str); `put` raises
        TypeError when it gets anything else.
    wait_strategy : {"block", "spin", "yield"}
        How blocked calls wait: spin briefly then sleep on a futex
        (default), spin without sleeping, or yield the CPU in a loop.
    groups : int, optional
        Consumer groups, 1 (the default) to 8, fixed when the queue is
        created: every
        group sees every message, and the consumers of one group compete
        for them (each message goes to one consumer per group). Producers
        wait for the slowest group. A durable queue keeps the count in
        its directory: None reopens it with the stored count.
    group : int
        The group this handle gets from (0 by default); see also
        `for_group`.
    persist : str or os.PathLike, optional
        Directory of a segment log that keeps every message (created if
        missing, mode 0700): a durable queue. Puts go through the ring to
        the log; gets read from the log, so messages and the consumer
        position survive the exit or SIGKILL of every process. One
        directory serves one queue: a log broker's or a bare segment
        log's directory raises `DirectoryKindError`. See Notes.
    fsync : {"interval", "always", "never"}
        With `persist`: ``"always"`` returns from `put` only after the
        message is synced to disk (survives power loss; concurrent puts
        share one sync); ``"interval"`` (default) syncs the log every
        50 ms; ``"never"`` leaves syncing to the kernel.
    delayed_capacity_bytes : int, optional
        Size of the delayed area, where messages put with `delay` or `at`
        wait in the queue's own mapping until they are due; 4 MiB by
        default, rounded up to a page multiple. 0 turns delayed puts
        off. Memory is used only as messages wait (the file is sparse).
        Fixed when the queue is created, checked like `capacity_bytes`
        when attaching. A durable queue keeps delayed messages in its
        log instead.
    segment_bytes : int, optional
        With `persist`: size of each segment file of the log, a multiple
        of 4096 from 8 KiB to 1 GiB. Retention deletes whole segments, so
        it sets the step of the disk use. None keeps the size the queue
        last ran with (64 MiB for a new one); attaching to a running
        queue with another size raises `QueueLayoutError`.

    Notes
    -----
    Unlike `multiprocessing.Queue`, whose feeder thread buffers without
    bound, a put blocks (or raises `Full`) when the ring has no room,
    even with ``maxsize=0``. Messages of type `bytes` and `bytearray`
    travel as raw bytes and come back as the same type; a `memoryview`
    comes back as `bytes`; anything else goes through the serializer in
    the calling thread, so a pickling error is raised by `put` itself.
    Each message costs its length plus a 16-byte header, rounded up to
    16 bytes. `maxsize`, `qsize`, `empty` and `full` count the messages of
    this handle's group; `maxsize` bounds group 0. A process killed while publishing never wedges the queue:
    readers turn its unfinished record into padding once its liveness
    lock shows it is dead. A message got by a process that is killed
    before `get` returns is lost, as with `multiprocessing.Queue`.

    A durable queue (`persist`) has an appender: a thread in whichever
    process holds the log's writer lock, which moves messages from the
    ring into the log in order; when that process exits or dies, another
    process using the queue takes over within 50 ms and skips what its
    predecessor had written. A message is in the log once the appender
    moved it, and the log keeps it until a consumer takes it. The
    consumer position is written to the log every 0.2 s and on `close`.
    After every process using an anonymous queue was killed (or after
    a reboot, or once a named queue's ring is unlinked), each group
    restarts at the position last written: the messages it got after
    that write are delivered again, once, in their order, and nothing
    it had not got is skipped (at least once). These are the gets of
    the last 0.2 s before the crash, more while the process that runs
    the appender was kept from running (a loaded machine). A group's
    written position is in `stats` (``committed``). A named queue's
    ring outlives its processes and keeps each group's exact position,
    so nothing is delivered again, and a message got by a process
    killed before `get` returned is lost, as for a single crash. With
    ``fsync="interval"`` or
    ``"never"``, a `put` returns once the message is in the shared ring:
    a message not yet moved to the log is lost if every process using an
    anonymous queue dies (a named queue's ring outlives them, and the next
    appender moves it). `put` with ``fsync="always"`` waits for the sync
    without a time limit, because the message is already accepted.

    Each group of a durable queue has its own position, written with
    the others. A segment file is deleted once every group's written
    position is past its last message, one commit round (0.2 s) later,
    and never while a live consumer that took a message from it has not
    read it yet, however long that consumer pauses. The files take
    about two segments plus the segments of messages some group has not
    taken, took in the last 0.4 s, or is still reading. `maxsize` of a
    durable queue counts the messages stored and not yet taken by every
    group, delayed ones included, across processes, and is exact: a put
    reserves its place in a shared counter before it writes. A producer
    killed between that reservation and its write leaves that place
    taken for as long as the queue's shared ring exists. `maxsize` is
    set by the
    process that starts the queue, and `groups` by the first process
    that sets it (a group added later starts at the oldest message
    kept). A delayed message of a durable queue is written to the log
    with its due time in wall-clock nanoseconds and moved to the
    consumers by the appender when it is due, also after a restart of
    every process; a step of the wall clock while no process runs moves
    it by that step.

    Delayed messages (``put(obj, delay=...)`` or ``at=...``) wait in the
    delayed area, not in any process's memory, so they survive the exit
    of the process that put them. Whichever process next calls `get`,
    `get_many`, `get_view`, `qsize`, `empty` or `full` after one is due
    moves it into the ring, and a blocked `get` wakes up for it. Each
    waiting message costs 32 bytes in the timing wheel plus a block of
    32 bytes and the payload, rounded up to a size class (64 bytes at
    least, at most 25% rounding): 96 bytes for a payload of up to
    32 bytes, 192 bytes for 100 bytes. `maxsize` counts waiting messages,
    `qsize` does not. A process killed while moving due messages delays
    nothing and loses nothing: the next one repairs the area, and the
    message being moved at that instant may be delivered twice.
    """

    cdef mqs_bytering_t _ring
    cdef mqs_delay_t _delay
    cdef bint _mapped
    cdef bint _closed
    # Threads of this process inside a wait on the mapping, or inside a
    # take whose deserializer may let another thread run. close() leaves
    # the unmap to the last of them.
    cdef int _parked
    cdef bint _close_done
    cdef int _group
    cdef int _groups_wanted
    cdef int64_t _delayed_wanted
    cdef int _strategy
    cdef int _pid
    cdef readonly object name
    cdef object _serializer
    cdef list _view_positions
    # Copies this handle took and has not returned to its caller yet,
    # mirrored into the participant's `copies` word (mqs_br_set_copies)
    # so that a reaper counts them if this process dies first. Changed
    # only under the GIL, so threads sharing the handle keep one total.
    cdef int64_t _copies
    # Monotonic ns when this handle first found the head record claimed
    # but unpublished, 0 while it is not stuck; and whether that stall was
    # logged. Kept across calls, so callers with short timeouts see it too.
    cdef int64_t _stuck_since
    cdef bint _stall_reported
    cdef int64_t _last_repair_ns
    # Puts left until this handle reads the shared sampling rate and
    # stamps one (see _sample_stamp).
    cdef int64_t _sample_countdown
    # The log directory of the durable queue whose inbox ring a handle
    # opened by name without persist= attached to, else None: such a
    # handle may put but not get.
    cdef object _inbox_of
    # The log side of a durable queue (persist=), else None.
    cdef _Durable _durable
    # (messages moved, CLOCK_MONOTONIC ns after the move) per promote of
    # this handle, while a benchmark traces them; None otherwise.
    cdef list _move_trace
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        self._ring.fd = -1
        self._ring.slot = -1
        self._ring.header = NULL
        self._ring.data = NULL
        self._delay.header = NULL
        self._delay.base = NULL
        self._view_positions = []
        self._sample_countdown = 1

    # SharedQueue[int] in annotations, as queue.Queue[int].
    __class_getitem__ = classmethod(types.GenericAlias)

    def __init__(self, maxsize=0, *, name=None, create=True,
                 capacity_bytes=None, max_message_size=None,
                 serializer=None, wait_strategy="block", groups=None,
                 group=0, ctx=None, persist=None, fsync="interval",
                 delayed_capacity_bytes=None, segment_bytes=None):
        # Explicit layout arguments, checked against an existing named
        # queue; None or a default means "whatever the queue has".
        if delayed_capacity_bytes is not None:
            delayed_capacity_bytes = _delayed_area_bytes(
                delayed_capacity_bytes)
        requested = {"capacity_bytes": capacity_bytes,
                     "max_message_size": max_message_size,
                     "maxsize": maxsize or None, "groups": groups,
                     "delayed_capacity_bytes": delayed_capacity_bytes}
        if capacity_bytes is None:
            capacity_bytes = DEFAULT_CAPACITY_BYTES
        if delayed_capacity_bytes is None:
            delayed_capacity_bytes = DEFAULT_DELAYED_CAPACITY_BYTES
        self._delayed_wanted = delayed_capacity_bytes
        if groups is None:
            groups = 1
        _check_int("maxsize", maxsize)
        if maxsize > INT64_MAX:
            raise ValueError(
                f"maxsize must be at most 2**63 - 1, got {maxsize!r}; pass 0 "
                f"for a queue bounded only by capacity_bytes")
        _check_int("groups", groups)
        _check_int("group", group)
        if not 1 <= groups <= MQS_BR_MAX_GROUPS:
            raise ValueError(
                f"groups must be 1 to {MQS_BR_MAX_GROUPS}, got {groups!r}")
        if group < 0:
            raise ValueError(f"group must be 0 or more, got {group!r}")
        self._groups_wanted = groups
        durable_settings = None
        if persist is not None:
            # The log keeps the groups and maxsize; the inbox ring has
            # one group (the appender) and no bound of its own.
            durable_settings = (requested.pop("groups"),
                                requested.pop("maxsize") or 0, segment_bytes)
            self._groups_wanted = 1
            maxsize = 0
            if segment_bytes is not None:
                _check_int("segment_bytes", segment_bytes)
        elif segment_bytes is not None:
            raise ValueError(
                f"segment_bytes={segment_bytes!r} applies only to a durable "
                f"queue; pass persist=path too, or drop segment_bytes")
        _check_int("capacity_bytes", capacity_bytes)
        if max_message_size is None:
            max_message_size = max(0, capacity_bytes - MQS_BR_RECORD_HEADER)
        _check_int("max_message_size", max_message_size)
        if wait_strategy not in _STRATEGIES:
            raise ValueError(
                f"wait_strategy must be 'block', 'spin' or 'yield', got "
                f"{wait_strategy!r}")
        if serializer is not None and not (hasattr(serializer, "dumps")
                                           and hasattr(serializer, "loads")):
            raise TypeError(
                f"serializer must have dumps() and loads(), got "
                f"{serializer!r}")
        if maxsize < 0:
            maxsize = 0
        self._check_sizes(capacity_bytes, max_message_size, maxsize)
        self._strategy = _STRATEGIES[wait_strategy]
        self._serializer = serializer
        self.name = name
        created = None
        if name is None:
            self._create_anonymous(capacity_bytes, max_message_size, maxsize)
        else:
            _check_name(name)
            if create:
                created = self._create_or_attach_named(
                    name, capacity_bytes, max_message_size, maxsize)
            else:
                self._attach_named(name)
        _instances.add(self)
        try:
            if name is not None:
                self._check_layout(requested)
            if name is not None and persist is None:
                self._inbox_of = _noted_log_of(name, self._ring.secret)
            if durable_settings is not None:
                self._open_durable(persist, fsync, durable_settings[0],
                                   durable_settings[1], durable_settings[2])
            elif fsync != "interval":
                self._open_durable(persist, fsync)
            self._set_group(group)
        except BaseException:
            if created is not None:
                _unlink_created(name, created)
            raise

    cdef int _open_durable(self, object persist, object fsync,
                           object groups=None, int64_t maxsize=0,
                           object segment_bytes=None) except -1:
        cdef _Durable durable
        try:
            if persist is None:
                raise ValueError(
                    f"fsync={fsync!r} applies only to a durable queue; "
                    f"pass persist=path too, or drop fsync")
            if mqs_br_config(&self._ring).n_groups != 1:
                raise ValueError(
                    "the shared ring of a durable queue must have one "
                    "group; attach to it with persist=, as it was created")
            durable = _Durable()
            durable._open(self, persist, fsync, groups, maxsize,
                          segment_bytes)
        except BaseException:
            self.close()
            raise
        self._durable = durable
        # NOTE: durable queues keep no latency histogram; the appender
        # would have to persist or strip the stamps.
        mqs_br_latency(&self._ring).sample_every = 0
        return 0

    @property
    def persist(self):
        """Directory of the queue's segment log, or None if not durable.

        A handle opened without ``persist=`` on a durable queue reports
        the directory too: its puts reach the log through the appender,
        but its gets raise until it is opened with ``persist=``.
        """
        if self._durable is not None:
            return self._durable.path
        return self._inbox_of

    @property
    def _has_log(self):
        """Whether this handle has the log side of a durable queue (it was
        opened with ``persist=``)."""
        return self._durable is not None

    @property
    def fsync(self):
        """Durability mode of this handle's puts on a durable queue, or
        None (also for a handle opened without ``persist=``, whose puts
        return without waiting for a sync)."""
        return self._durable.fsync if self._durable is not None else None

    cdef int _check_layout(self, dict requested) except -1:
        """Raise if an existing named queue differs from explicit sizes."""
        config = mqs_br_config(&self._ring)
        actual = {"capacity_bytes": self._ring.capacity,
                  "max_message_size": config.max_message_size,
                  "maxsize": config.maxsize, "groups": config.n_groups,
                  "delayed_capacity_bytes": config.delayed_bytes}
        for key, wanted in requested.items():
            if wanted is not None and wanted >= 0 and wanted != actual[key]:
                self.close()
                raise QueueLayoutError(
                    f"shared queue {self.name!r} exists with {key}="
                    f"{actual[key]}, not {wanted}; attach without {key}, "
                    f"or unlink the queue and create it again")
        return 0

    cdef int _set_group(self, int group) except -1:
        cdef int n_groups = self._group_count()
        if not 0 <= group < n_groups:
            self.close()
            raise ValueError(
                f"group must be 0 to {n_groups - 1} for this queue of "
                f"{n_groups} group(s), got {group!r}")
        self._group = group
        return 0

    @property
    def groups(self):
        """Number of consumer groups, fixed when the queue was created."""
        self._check_mapped()
        return self._group_count()

    cdef int _group_count(self):
        if self._durable is not None:
            return self._durable.groups()
        return mqs_br_config(&self._ring).n_groups

    @property
    def group(self):
        """The consumer group this handle gets from."""
        return self._group

    def for_group(self, group):
        """Return a new handle of this queue that gets from `group`.

        The handle attaches in this process like any other (its own
        liveness lock) and is passed to child processes the same way.

        Raises
        ------
        ValueError
            If `group` is not below `groups`, or this handle is closed.
        """
        cdef SharedQueue other
        _check_int("group", group)
        self._check_open()
        other = SharedQueue.__new__(SharedQueue)
        other._strategy = self._strategy
        other._serializer = self._serializer
        other.name = self.name
        fd = os.open(f"/proc/self/fd/{self._ring.fd}",
                     os.O_RDWR | os.O_CLOEXEC)
        try:
            other._attach_fd(fd, repr(self))
        except BaseException:
            other._discard_fd(fd)
            raise
        _instances.add(other)
        if self._durable is not None:
            other._open_durable(self._durable.path, self._durable.fsync)
        other._set_group(group)
        return other

    @staticmethod
    def _check_sizes(capacity_bytes, max_message_size, maxsize):
        page = os.sysconf("SC_PAGESIZE")
        if capacity_bytes < page or capacity_bytes & (capacity_bytes - 1) \
                or capacity_bytes > 1 << 40:
            hint = ""
            if page <= capacity_bytes <= 1 << 40:
                hint = f" (try {1 << (capacity_bytes - 1).bit_length()})"
            raise ValueError(
                f"capacity_bytes must be a power of two from {page} to "
                f"2**40, got {capacity_bytes!r}{hint}")
        # 0 would allow only empty messages, and even a pickled None
        # takes bytes.
        if max_message_size < 1 or max_message_size > capacity_bytes \
                or mqs_br_check_sizes(
                capacity_bytes, max_message_size, maxsize, 1) != MQS_OK:
            raise ValueError(
                f"max_message_size must be 1 to {capacity_bytes - 16} for "
                f"a ring of {capacity_bytes} bytes, got "
                f"{max_message_size!r}; raise capacity_bytes")

    # -- creating and attaching -----------------------------------------

    cdef int _map(self, int fd, int64_t capacity,
                  int64_t delayed_bytes) except -1:
        if mqs_br_map(&self._ring, fd, capacity) != MQS_OK:
            raise OSError(
                f"cannot map a shared ring of {capacity} bytes; the address "
                f"space or /dev/shm is exhausted")
        self._mapped = True
        if delayed_bytes and mqs_delay_map(
                &self._delay, fd, mqs_br_file_bytes(capacity),
                delayed_bytes) != MQS_OK:
            self._unmap()
            raise OSError(
                f"cannot map a delayed area of {delayed_bytes} bytes; the "
                f"address space or /dev/shm is exhausted")
        return 0

    cdef int _unmap(self) except -1:
        if self._delay.base != NULL:
            mqs_delay_unmap(&self._delay)
        if self._mapped:
            mqs_br_unmap(&self._ring)
            self._mapped = False
        return 0

    cdef int _attach_slot(self) except -1:
        cdef int rc = mqs_br_attach(&self._ring)
        if rc == MQS_EFULL:
            raise OSError(
                "all 256 participant slots of the queue are held by live "
                "processes; close queues in processes that no longer use "
                "them")
        if rc < 0:
            raise OSError("cannot lock a participant slot of the queue")
        self._pid = os.getpid()
        # The first sampled put is the sample_every-th, as for later ones.
        self._sample_countdown = mqs_br_latency(&self._ring).sample_every
        if self._sample_countdown <= 0:
            self._sample_countdown = SAMPLING_RECHECK_PUTS
        # The slot's dead previous owner may have left a record to repair.
        self._log_repaired(rc)
        return 0

    cdef int _log_repaired(self, int repaired) except -1:
        """Log a repair: every dropped record is counted and logged."""
        if repaired > 0:
            logger.warning(
                "shared queue %s: turned %d unpublished record(s) of dead "
                "producer(s) into padding", self._label(), repaired)
        return 0

    cdef int _format_new(self, int fd, int64_t capacity,
                         int64_t max_message_size,
                         int64_t maxsize) except -1:
        os.ftruncate(fd, mqs_br_file_bytes(capacity) + self._delayed_wanted)
        self._map(fd, capacity, self._delayed_wanted)
        # The delayed area is ready before mqs_br_format marks the ring
        # ready, which is what attachers wait for.
        mqs_br_config(&self._ring).delayed_bytes = self._delayed_wanted
        if self._delayed_wanted and mqs_delay_format(
                &self._delay, mqs_monotonic_ns()) != MQS_OK:
            raise OSError("cannot set up the delayed area's process-shared "
                          "mutex")
        from mqs import metrics

        mqs_br_latency(&self._ring).sample_every = \
            metrics.default_sample_every() or 0
        secret = int.from_bytes(secrets.token_bytes(8), "little")
        if mqs_br_format(&self._ring, max_message_size, maxsize,
                         self._groups_wanted, secret) != MQS_OK:
            raise OSError("cannot set up the queue's process-shared mutex")
        return 0

    cdef int _create_anonymous(self, int64_t capacity,
                               int64_t max_message_size,
                               int64_t maxsize) except -1:
        fd = os.memfd_create("mqs-queue", os.MFD_CLOEXEC)
        try:
            self._format_new(fd, capacity, max_message_size, maxsize)
        except BaseException:
            self._discard_fd(fd)
            raise
        self._attach_slot()
        return 0

    cdef int _discard_fd(self, int fd) except -1:
        """Undo a failed create or attach: unmap, then close fd.

        Clears the handle's copy of fd first, so that __dealloc__ does not
        close the same number again, by then perhaps another file's.
        """
        self._unmap()
        if self._ring.fd == fd:
            self._ring.fd = -1
        os.close(fd)
        return 0

    cdef object _create_or_attach_named(self, str name, int64_t capacity,
                                        int64_t max_message_size,
                                        int64_t maxsize):
        """Create the named queue, or attach to it if it exists.

        Returns the (st_dev, st_ino) of the file when this call created
        it, so that a failed constructor can remove it, else None.
        """
        # Build the queue under a private name, then link it into place:
        # an attacher never sees a half-formatted file.
        path = _shm_path(name)
        temp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     0o600)
        try:
            self._format_new(fd, capacity, max_message_size, maxsize)
            try:
                os.link(temp, path)
            except FileExistsError:
                self._discard_fd(fd)
                fd = -1
                self._attach_named(name)
                return None
            status = os.fstat(fd)
        except BaseException:
            if fd >= 0:
                self._discard_fd(fd)
            raise
        finally:
            os.unlink(temp)
        try:
            self._attach_slot()
        except BaseException:
            _unlink_created(name, (status.st_dev, status.st_ino))
            raise
        return (status.st_dev, status.st_ino)

    cdef int _attach_named(self, str name) except -1:
        path = _shm_path(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise QueueNotFound(
                f"no shared queue named {name!r} ({path} is missing); "
                f"create it with SharedQueue(name={name!r})") from None
        try:
            self._attach_fd(fd, f"{name!r} ({path})")
        except BaseException:
            self._discard_fd(fd)
            raise
        return 0

    cdef int _attach_fd(self, int fd, str label) except -1:
        """Validate and map the queue file behind fd, then take a slot."""
        cdef int rc
        size = os.fstat(fd).st_size
        if size < mqs_br_file_bytes(4096):
            raise QueueLayoutError(
                f"{label} is {size} bytes, too small for an mqs queue")
        config = _read_config(fd)
        capacity, delayed_bytes = config[3], config[9]
        expected = mqs_br_file_bytes(capacity) + delayed_bytes
        if config[8] == _INIT_READY and config[0] == MQS_BR_MAGIC \
                and config[1] == _LAYOUT_VERSION and (
                    capacity < 4096 or capacity & (capacity - 1)
                    or delayed_bytes < 0 or expected != size):
            raise QueueLayoutError(
                f"{label} is {size} bytes, but its header gives "
                f"{expected} (capacity_bytes {capacity}, "
                f"delayed_capacity_bytes {delayed_bytes}); it was "
                f"truncated or is not an mqs queue")
        header_only = not (config[8] == _INIT_READY
                           and config[0] == MQS_BR_MAGIC
                           and config[1] == _LAYOUT_VERSION)
        if header_only:
            # Map the header with a one-page ring so that mqs_br_validate
            # names what is wrong (an unfinished creator, a foreign file, a
            # version). The ring size must be a page multiple for the
            # double mapping, whatever the size of the file.
            self._map(fd, os.sysconf("SC_PAGESIZE"), 0)
        else:
            self._map(fd, capacity, delayed_bytes)
        rc = mqs_br_validate(self._ring.header, size)
        if rc == MQS_OK and delayed_bytes and not header_only:
            rc = mqs_delay_validate(&self._delay)
            if rc == MQS_EVERSION:
                self._unmap()
                # The delayed area's config (magic, then version) starts
                # where the ring ends.
                version = struct.unpack(
                    "<I", os.pread(fd, 4, mqs_br_file_bytes(capacity) + 8))[0]
                raise _version_error(label, "delayed area", version,
                                     MQS_DELAY_VERSION)
        if rc != MQS_OK or header_only:
            version = mqs_br_config(&self._ring).version
            self._unmap()
            if rc == MQS_EVERSION:
                raise _version_error(label, "ring", version, _LAYOUT_VERSION)
            if rc == MQS_EAGAIN_INIT:
                raise QueueLayoutError(
                    f"{label} was never initialised; its creator died "
                    f"before finishing, so unlink it and create it again")
            if config[0] == _JOURNAL_MAGIC:
                raise QueueLayoutError(
                    f"{label} is an mqs shm broker, not a queue; open it "
                    f"with mqs.Broker(backend='shm', name=...), or give "
                    f"the queue another name")
            raise QueueLayoutError(
                f"{label} has a corrupted or foreign header; it is not an "
                f"mqs queue")
        self._attach_slot()
        return 0

    cdef int _reattach_after_fork(self) except -1:
        # The threads counted there are the parent's, and none of them
        # exists in this process to leave the wait and finish a close.
        self._parked = 0
        if self._closed:
            self._finish_close()
            return 0
        if not self._mapped:
            return 0
        old_fd = self._ring.fd
        fd = os.open(f"/proc/self/fd/{old_fd}", os.O_RDWR | os.O_CLOEXEC)
        # The inherited mappings reference the parent's open file
        # description, which would keep the parent's liveness lock held
        # while this child lives: map the file again from our own.
        if mqs_br_remap(&self._ring, fd) != MQS_OK or (
                self._delay.base != NULL and mqs_delay_remap(
                    &self._delay, fd,
                    mqs_br_file_bytes(self._ring.capacity)) != MQS_OK):
            os.close(fd)
            raise OSError(
                f"cannot map shared queue {self._label()} again after "
                f"fork; the address space is exhausted, and the queue is "
                f"unusable in this process")
        os.close(old_fd)
        self._ring.slot = -1
        self._view_positions = []
        self._copies = 0
        self._attach_slot()
        if self._durable is not None:
            self._durable._after_fork()
        return 0

    def __reduce__(self):
        from multiprocessing.context import get_spawning_popen
        from multiprocessing.reduction import DupFd

        serializer = self._serializer
        strategy = {v: k for k, v in _STRATEGIES.items()}[self._strategy]
        # A handle without the log side reaches the child as one too.
        persist = self._durable.path if self._durable is not None else None
        fsync = self.fsync or "interval"
        if self.name is not None:
            return (_attach_by_name,
                    (self.name, serializer, strategy, self._group, persist,
                     fsync))
        if get_spawning_popen() is None:
            raise RuntimeError(
                "an anonymous SharedQueue reaches other processes only "
                "through inheritance (pass it in Process(args=...)); give "
                "it a name= to share it any other way")
        self._check_open()
        return (_attach_by_fd,
                (DupFd(self._ring.fd), serializer, strategy, self._group,
                 persist, fsync))

    # -- state ----------------------------------------------------------

    cdef inline int _check_open(self) except -1:
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        if self._pid != _process_id:
            raise RuntimeError(
                f"Queue {self!r} was inherited by a process that could not "
                f"re-attach to it; create or pass it again in this process")
        return 0

    @property
    def maxsize(self):
        """Bound on queued messages; 0 means bounded only by the ring."""
        self._check_mapped()
        if self._durable is not None:
            return self._durable.maxsize()
        return mqs_br_config(&self._ring).maxsize

    @property
    def capacity_bytes(self):
        """Size of the ring's data region in bytes (fixed)."""
        self._check_mapped()
        return self._ring.capacity

    @property
    def max_message_size(self):
        """Largest serialized message the queue accepts, in bytes."""
        self._check_mapped()
        return mqs_br_config(&self._ring).max_message_size

    cdef int _check_mapped(self) except -1:
        if not self._mapped:
            raise ValueError(f"Queue {self!r} is closed")
        return 0

    def stats(self):
        """Return a `mqs.metrics.SharedQueueStats` snapshot.

        Every counter is read from the queue's shared mapping, so all
        processes see the same values: messages put and got ever (per
        group), the lag of each group, bytes in use, live attached
        processes, and the crash repair counters (``repaired_records``:
        unpublished records of dead producers turned into padding;
        ``lost_records``: an upper bound on messages taken by consumers
        that died before returning them or while lending them as views;
        and on a durable queue ``damaged_records``: messages taken whose
        log record was damaged or missing, as a segment file deleted by
        hand leaves them). A durable
        queue reports its log's groups, lag (messages and seconds),
        cursors and committed offsets; its ring counters (bytes,
        repairs) describe its inbox, which only the appender reads.

        Raises
        ------
        ValueError
            If the queue is closed.
        """
        self._check_mapped()
        # Settle dead claims first, as qsize does, so the counts include
        # only messages that will arrive.
        self._count()
        stats = _read_stats(&self._ring, self.name,
                            0 if self._durable is not None else self._group)
        if self._durable is not None:
            fields = self._durable.stats_fields()
            stats = dataclasses.replace(
                stats, group=self._group, depth=fields["lag"][self._group],
                **fields)
        elif self._delay.base != NULL:
            stats = dataclasses.replace(
                stats, delayed=mqs_delay_count(&self._delay))
        return stats

    def set_latency_sampling(self, sample_every):
        """Sample the enqueue-to-deliver latency of one message in
        `sample_every`, in every process of the queue.

        The rate lives in the queue's mapping, so it applies to every
        producer, which stamps one put in `sample_every` with the time
        (a delayed put with its due time). The consumer that gets a
        stamped message records its latency in a histogram in the same
        mapping, read by ``stats().latency``, `mqs stat` and the
        exporter. None turns sampling off and clears the histogram. New
        queues sample at `mqs.metrics.default_sample_every()` (one in
        1,024 unless changed).

        Raises
        ------
        ValueError
            If `sample_every` is below 1, the queue is closed or durable
            (persist=), which keeps no latency histogram.
        TypeError
            If `sample_every` is not an int or None.
        """
        from mqs import metrics

        self._check_mapped()
        if sample_every is not None:
            metrics.LatencySampler(sample_every)  # raises for a bad value
        if self._durable is not None:
            raise ValueError(
                f"latency sampling is not available on a durable queue "
                f"(persist={self._durable.path!r})")
        if sample_every is None:
            mqs_br_latency(&self._ring).sample_every = 0
            mqs_hist_reset(mqs_br_latency(&self._ring))
            self._sample_countdown = SAMPLING_RECHECK_PUTS
        else:
            mqs_br_latency(&self._ring).sample_every = sample_every
            self._sample_countdown = 1

    def delayed_stats(self):
        """Return counters of the delayed area as a dict.

        ``delayed``: messages waiting; ``used_bytes``: the bytes they
        take (wheel entries and blocks); ``moved``: messages moved into
        the ring, ever; ``repairs``: rebuilds after a process died holding
        the delay lock; ``requeued``: waiting messages those rebuilds put
        back; ``dropped``: unfinished puts they freed. All 0 without a
        delayed area. Read without the delay lock, as a snapshot.
        """
        cdef const mqs_delay_state_t *delay_stats
        self._check_mapped()
        if self._delay.base == NULL:
            return {"delayed": 0, "used_bytes": 0, "moved": 0,
                    "repairs": 0, "requeued": 0, "dropped": 0}
        delay_stats = mqs_delay_stats(&self._delay)
        return {"delayed": mqs_delay_count(&self._delay),
                "used_bytes": delay_stats.used_bytes,
                "moved": delay_stats.moved,
                "repairs": delay_stats.rebuilds,
                "requeued": delay_stats.requeued,
                "dropped": delay_stats.dropped}

    cdef int64_t _count(self) except -1:
        """Messages this handle's group has not taken, dead claims repaired.

        A put counts from the moment it claims its place in the ring, so
        a message another process is still copying in counts. The claim of
        a producer that died before publishing is turned into padding
        first and never counts.
        """
        cdef int repaired = mqs_br_settle(&self._ring)
        if repaired < 0:
            raise OSError("cannot check the liveness of the queue's "
                          "participants")
        self._log_repaired(repaired)
        if self._durable is not None:
            # The log first: the appender adds a message to the log
            # before it frees it from the ring, so this order never
            # counts one twice.
            backlog = self._durable.backlog()
            return backlog + mqs_br_count(&self._ring, 0)
        return mqs_br_count(&self._ring, self._group)

    def qsize(self):
        """Return the exact number of ready messages, from any process.

        Counted in shared memory, not estimated: a put counts once it has
        claimed its place (including one still copying its bytes), a get
        once it has taken its message; a process killed at any point
        leaves the count exact. Delayed messages count once they are due
        (this call moves the due ones into the ring first); `delayed`
        counts the others.

        NOTE: on a durable queue (`persist`), a delayed message counts
        here and in `empty`, not in `delayed`, from its `put` until the
        appender thread has moved it into the log.
        """
        self._check_open()
        self._promote_due()
        return self._count()

    def empty(self):
        """Return True if no ready message is queued."""
        self._check_open()
        self._promote_due()
        return self._count() == 0

    def full(self):
        """Return True if a bounded queue holds maxsize messages.

        Messages waiting in the delayed area count towards maxsize.
        """
        cdef int64_t maxsize
        self._check_open()
        if self._durable is not None:
            return self._durable.full()
        self._promote_due()
        maxsize = mqs_br_config(&self._ring).maxsize
        return maxsize > 0 \
            and self._count() + self._delayed_count() >= maxsize

    @property
    def delayed(self):
        """Messages put with a delay that are not in the ring yet."""
        self._check_mapped()
        return self._delayed_count()

    @property
    def delayed_capacity_bytes(self):
        """Size of the delayed area in bytes (0: no delayed puts)."""
        self._check_mapped()
        return mqs_br_config(&self._ring).delayed_bytes

    cdef int64_t _delayed_count(self):
        if self._durable is not None:
            return self._durable.delayed()
        if self._delay.base == NULL:
            return 0
        return mqs_delay_count(&self._delay)

    # -- put --------------------------------------------------------------

    cdef int _try_put(self, object obj, int64_t due=-1) except -2:
        """Serialize obj and try to publish it: MQS_OK or MQS_EFULL.

        With `due` >= 0 the message goes into the delayed area instead,
        to be moved into the ring at that CLOCK_MONOTONIC time.
        """
        # parts[0] is left for the timestamp of a sampled put.
        cdef const void *parts[65]
        cdef size_t lengths[65]
        cdef int n = 1
        cdef uint16_t rtype
        cdef int rc
        cdef const unsigned char[::1] view
        cdef list keep
        cdef Py_ssize_t total
        cdef int64_t stamp_ns = -1
        self._sample_countdown -= 1
        if self._sample_countdown <= 0:
            stamp_ns = self._sample_stamp(due)
        if type(obj) is bytes:
            parts[1] = PyBytes_AS_STRING(obj)
            lengths[1] = len(<bytes>obj)
            rtype = TYPE_BYTES
        else:
            keep = self._encode(obj)
            rtype = keep[0]
            n = len(keep) - 1
            if n > 64:
                keep = [rtype, b"".join([bytes(b) for b in keep[1:]])]
                n = 1
            for i in range(n):
                view = keep[i + 1]
                parts[i + 1] = &view[0] if view.shape[0] else NULL
                lengths[i + 1] = view.shape[0]
        if self._closed:
            # The serializer runs Python code, during which another
            # thread may have closed the handle and unmapped the ring.
            self._raise_closed_meanwhile()
        if stamp_ns < 0:
            rc = self._put_parts(&parts[1], &lengths[1], n, rtype, due)
        else:
            parts[0] = &stamp_ns
            lengths[0] = MQS_BR_STAMP_BYTES
            rc = self._put_parts(parts, lengths, n + 1,
                                 <uint16_t>(rtype | MQS_BR_TYPE_STAMPED),
                                 due)
            if rc == MQS_ETOOBIG:
                # The stamp must never make a message too large.
                rc = self._put_parts(&parts[1], &lengths[1], n, rtype, due)
        if rc == MQS_ETOOBIG:
            total = 0
            for i in range(n):
                total += lengths[i + 1]
            self._raise_too_large(total)
        if rc != MQS_OK and rc != MQS_EFULL:
            raise OSError(f"shared queue put failed with status {rc}")
        return rc

    cdef int64_t _sample_stamp(self, int64_t due):
        """Return the timestamp for this put if it is sampled, else -1.

        Reads the shared sampling rate and restarts the countdown. A
        delayed message is stamped with its due time, so its latency
        runs from when it is ready, as for the in-process queues.
        Durable queues are never sampled (their rate stays 0).
        """
        cdef int64_t every = mqs_br_latency(&self._ring).sample_every
        if every <= 0 or self._durable is not None:
            self._sample_countdown = SAMPLING_RECHECK_PUTS
            return -1
        self._sample_countdown = every
        return due if due >= 0 else mqs_monotonic_ns()

    cdef int _put_parts(self, const void **parts, size_t *lengths, int n,
                        uint16_t rtype, int64_t due) except -2:
        """Publish now (due < 0) or into the delayed area; return status."""
        cdef int64_t maxsize, delayed, end
        cdef int rc
        if self._durable is not None:
            return self._durable.put(parts, lengths, n, rtype, due)
        if due < 0:
            maxsize = mqs_br_config(&self._ring).maxsize
            if maxsize and self._delay.base != NULL:
                # maxsize counts waiting messages too. NOTE: checked
                # apart from the ring's own reservation, so racing
                # producers can overshoot by the delayed puts in flight.
                delayed = mqs_delay_count(&self._delay)
                if delayed and mqs_br_count(&self._ring, 0) + delayed \
                        >= maxsize:
                    return MQS_EFULL
            return mqs_br_try_put(&self._ring, parts, lengths, n, rtype)
        end = mqs_monotonic_ns() + LOCK_RETRY_NS
        while True:
            rc = mqs_delay_try_put(&self._delay, &self._ring, parts,
                                   lengths, n, rtype, due,
                                   mqs_monotonic_ns())
            self._log_delay_repair()
            if rc != MQS_EAGAIN_LOCKED:
                return rc
            if mqs_monotonic_ns() >= end:
                return MQS_EFULL
            self._parked += 1
            with nogil:
                usleep(20)
            self._left_wait()

    cdef int _raise_too_large(self, Py_ssize_t total) except -1:
        cdef int64_t max_size = mqs_br_config(&self._ring).max_message_size
        if total > max_size:
            raise MessageTooLarge(
                f"message is {total} bytes, max_message_size is "
                f"{max_size} (ring capacity_bytes {self._ring.capacity}); "
                f"raise the limit or split the message")
        raise MessageTooLarge(
            f"message is {total} bytes and needs "
            f"{mqs_delay_block_bytes(total)} bytes in the delayed area, "
            f"delayed_capacity_bytes is {self._delay.area_bytes} (room for "
            f"a payload of {mqs_delay_max_payload(self._delay.area_bytes)} "
            f"bytes at most); raise delayed_capacity_bytes or split the "
            f"message")

    cdef int _log_delay_repair(self) except -1:
        """Log a crash repair of the delayed area once per repair."""
        cdef const mqs_delay_state_t *stats
        if self._delay.base == NULL:
            return 0
        stats = mqs_delay_stats(&self._delay)
        if stats.rebuilds != self._delay.rebuilds_seen:
            self._delay.rebuilds_seen = stats.rebuilds
            logger.warning(
                "shared queue %s: a process died holding the delayed "
                "area's lock; rebuilt the area (repairs so far: %d, "
                "messages requeued: %d, unfinished puts dropped: %d; a "
                "message being moved into the ring at the crash may be "
                "delivered twice)", self._label(), stats.rebuilds,
                stats.requeued, stats.dropped)
        return 0

    cdef int64_t _due_for_put(self, object delay, object at) except -2:
        """Deadline for put(delay=, at=): -1 for an immediate put."""
        cdef int64_t due
        if delay is None and at is None:
            return -1
        due = due_monotonic_ns(delay, at)
        if self._durable is not None:
            # The appender keeps the message in the log until it is due.
            return due if due > mqs_monotonic_ns() else -1
        if self._delay.base == NULL:
            raise ValueError(
                f"queue {self._label()} has no delayed area "
                f"(delayed_capacity_bytes=0), so it cannot take delay= or "
                f"at=; create it with a delayed_capacity_bytes of "
                f"{MQS_DELAY_MIN_AREA_BYTES} to 2**40")
        # Already due: straight into the ring, behind what is waiting.
        if due <= mqs_monotonic_ns():
            self._promote_due()
            return -1
        return due

    cdef list _encode(self, object obj):
        """Return [record type, buffer, ...] for a non-bytes object."""
        cdef list buffers
        if type(obj) is bytearray:
            return [TYPE_BYTEARRAY, obj]
        if type(obj) is memoryview:
            return [TYPE_BYTES, (<memoryview>obj).cast("B")
                    if (<memoryview>obj).c_contiguous else obj.tobytes()]
        if self._serializer is not None:
            data = self._serializer.dumps(obj)
            try:
                view = memoryview(data)
            except TypeError:
                # Checked here, not at construction: calling dumps() on a
                # sample object could fail or have side effects.
                raise TypeError(
                    f"serializer.dumps() must return bytes, but "
                    f"{self._serializer!r} returned "
                    f"{type(data).__name__} {data!r:.80}; wrap it to "
                    f"encode the result (for text, .encode())") from None
            return [TYPE_CUSTOM, view.cast("B")]
        buffers = []
        stream = pickle.dumps(obj, protocol=5,
                              buffer_callback=buffers.append)
        if not buffers:
            return [TYPE_PICKLE, stream]
        return self._encode_oob(obj, stream, buffers)

    cdef list _encode_oob(self, object obj, bytes stream, list buffers):
        # Layout: u32 count, u64 stream length, u64 buffer lengths, then
        # the stream and each buffer at a 16-byte aligned offset.
        raws = []
        for buffer in buffers:
            try:
                raws.append(buffer.raw())
            except BufferError:
                # A non-contiguous buffer cannot travel out of band.
                return [TYPE_PICKLE, pickle.dumps(obj, protocol=5)]
        count = len(raws)
        header = bytearray(4 + 8 + 8 * count)
        header[0:4] = count.to_bytes(4, "little")
        header[4:12] = len(stream).to_bytes(8, "little")
        for i, raw in enumerate(raws):
            offset = 12 + 8 * i
            header[offset:offset + 8] = raw.nbytes.to_bytes(8, "little")
        out = [TYPE_PICKLE_OOB, header]
        used = len(header)
        for part in [stream] + raws:
            pad = -used % 16
            if pad:
                out.append(b"\0" * pad)
                used += pad
            out.append(part)
            used += memoryview(part).nbytes
        return out

    def put(self, obj, block=True, timeout=None, *, delay=None, at=None):
        """Put obj into the queue, now or after a delay.

        When the queue is full (maxsize reached, or no room in the ring
        or, for a delayed put, in the delayed area), with `block` true
        (the default) wait for room, for at most `timeout` seconds if it
        is not None. Waits release the GIL, never end before `timeout`,
        and let Ctrl-C through.

        Parameters
        ----------
        delay : float, optional
            Keep the message invisible for this many seconds, measured on
            CLOCK_MONOTONIC, which every process on the machine shares.
        at : datetime.datetime or float, optional
            Keep the message invisible until this wall-clock time (an
            aware or naive local datetime, or seconds since the epoch). It
            is turned into a CLOCK_MONOTONIC deadline once, when the put
            is accepted, so a later step of the wall clock neither
            releases waiting messages early nor holds them back. A time in
            the past makes the message ready at once.

        Raises
        ------
        Full
            When no room freed up (at once if `block` is false).
        MessageTooLarge
            At once, when the serialized message exceeds
            `max_message_size`, or for a delayed put, when it could never
            fit the delayed area: it could never fit.
        ValueError
            If the queue is closed, `timeout` or `delay` is negative or
            not finite, `delay` or `at` is more than
            `mqs.MAX_DELAY_SECONDS` (10 years) from now, both `delay` and
            `at` are given, or the queue has no delayed area
            (``delayed_capacity_bytes=0``). With ``fsync="always"``, when
            another thread closes the queue while this put waits for its
            sync and another process's appender has not synced it yet,
            the error has ``accepted = 1``: the message is in the queue
            and is written when that appender runs, so putting it again
            would duplicate it. (When this process is the appender,
            close() syncs it and the put returns.)
        TypeError
            If `delay` or `at` has the wrong type, or the serializer's
            ``dumps`` returned something other than a bytes-like object.

        Notes
        -----
        A delayed message is never got before it is due, and is moved
        into the ring by the first `get` (or `qsize`, `empty`, `full`) of
        any process that runs after that; a blocked `get` wakes up for it.
        Delayed messages due at the same time keep their put order.
        """
        cdef int64_t due
        self._check_open()
        if block:
            deadline_ns(timeout)  # a negative timeout raises even with room
        due = self._due_for_put(delay, at)
        if self._try_put(obj, due) != MQS_OK:
            self._wait_room(obj, block, timeout, due)
        if self._durable is not None:
            self._durable.wait_durable(self._ring.last_put_position)

    def put_nowait(self, obj, *, delay=None, at=None):
        """Put obj if there is room, else raise `Full` at once.

        `delay` and `at` work as in `put`.
        """
        self.put(obj, False, delay=delay, at=at)

    def put_async(self, obj, timeout=None):
        """Return a coroutine that puts `obj` without blocking the event
        loop.

        The coroutine retries `put_nowait` after sleeps of 0.5 ms growing
        to 5 ms while the queue is full. It raises `Full` after `timeout`
        seconds (None: no limit), never earlier, and any other error of
        `put_nowait` at once. Cancelling it adds nothing. On a durable
        queue with ``fsync="always"`` the put and its wait for the sync
        run in the event loop's default executor instead.
        """
        if self._durable is not None and self._durable.fsync == "always":
            return _aio.in_executor(self.put, obj, True, timeout)
        return _aio.put_async(self, obj, timeout)

    cdef int _wait_room(self, object obj, bint block, object timeout,
                        int64_t due=-1) except -1:
        cdef int64_t deadline = deadline_ns(timeout) if block else 0
        cdef int64_t last_repair = mqs_monotonic_ns()
        cdef uint32_t epoch
        cdef int strategy = self._strategy
        cdef int rc
        if not block:
            if self._retry_after_repair(obj, due) == MQS_OK:
                return 0
            raise Full()
        while True:
            epoch = mqs_wait_prepare(mqs_br_not_full(&self._ring))
            try:
                rc = self._try_put(obj, due)
            except BaseException:
                mqs_wait_finish(mqs_br_not_full(&self._ring))
                raise
            if rc == MQS_OK:
                mqs_wait_finish(mqs_br_not_full(&self._ring))
                return 0
            if self._park(mqs_br_not_full(&self._ring), epoch, deadline,
                          strategy):
                if self._retry_after_repair(obj, due) == MQS_OK:
                    return 0
                raise Full()
            if strategy == STRATEGY_BLOCK:
                strategy = STRATEGY_SLEEP
            if mqs_monotonic_ns() - last_repair >= WAIT_SLICE_NS:
                # Room may be held by pins of consumers that died.
                self._log_repaired(mqs_br_repair(&self._ring))
                last_repair = mqs_monotonic_ns()

    cdef bint _repair_due(self):
        """Whether this handle last ran a repair WAIT_SLICE_NS or more ago.

        Marks a repair as run now when it returns True. Calls that give
        up without a long wait use it, so a caller that only polls still
        repairs what dead processes left, at most 20 times a second.
        """
        cdef int64_t now = mqs_monotonic_ns()
        if now - self._last_repair_ns < WAIT_SLICE_NS:
            return False
        self._last_repair_ns = now
        return True

    cdef int _retry_after_repair(self, object obj, int64_t due) except -2:
        """Before a put gives up: drop pins of dead consumers, try again.

        Without this, producers that never wait long would never clear
        the pin a killed consumer left, and the ring would stay full. The
        settle costs a few loads per participant slot, and an fcntl only
        for slots with a claim or pin open, so it runs on every failed
        put: a put never reports Full because of a dead process.
        """
        cdef int repaired = mqs_br_settle(&self._ring)
        if repaired < 0:
            raise OSError("cannot check the liveness of the queue's "
                          "participants")
        self._log_repaired(repaired)
        return self._try_put(obj, due)

    def put_many(self, items, block=True, timeout=None, *, delay=None,
                 at=None):
        """Put every item of the iterable `items`, in order.

        Waits like `put` whenever the queue is full. With `delay` or `at`
        (as in `put`) every item gets the same deadline, computed once.

        Raises
        ------
        Full
            When the queue stayed full; ``exc.accepted`` items were added
            and stay queued, the rest were not.
        MessageTooLarge
            For an item that can never fit; ``exc.accepted`` as above.
        Exception
            Any other error of an item (one that cannot be pickled, say)
            propagates with ``exc.accepted`` set as above.

        Under ``fsync="always"`` the items put before an error are
        durable when it propagates, as they are when the call returns.
        """
        cdef Py_ssize_t done = 0
        cdef int64_t deadline = 0
        cdef int64_t due
        self._check_open()
        if block and timeout is not None:
            deadline = deadline_ns(timeout)
        due = self._due_for_put(delay, at)
        try:
            for item in items:
                try:
                    if self._try_put(item, due) != MQS_OK:
                        self._wait_room(
                            item, block, None if deadline <= 0 else
                            max(0.0, (deadline - mqs_monotonic_ns()) / 1e9),
                            due)
                except Full:
                    raise Full(f"queue stayed full: put {done} items of "
                               f"the batch; the rest were not added",
                               done) from None
                except MessageTooLarge as exc:
                    too_large = MessageTooLarge(
                        f"{exc}. put_many queued {done} earlier item(s), "
                        f"which stay queued; this item and the rest of the "
                        f"batch were not added")
                    too_large.accepted = done
                    raise too_large from None
                except Exception as exc:
                    try:
                        exc.accepted = done
                    except AttributeError:
                        pass  # a built-in exception without a __dict__
                    raise
                done += 1
        finally:
            if done and self._durable is not None:
                self._durable.wait_durable(self._ring.last_put_position)

    # -- get --------------------------------------------------------------

    cdef object _decode(self, mqs_br_record_t *record):
        """Copy the record out of the ring and rebuild the object."""
        cdef uint16_t rtype = record.type
        cdef object data
        if rtype == TYPE_BYTES:
            return PyBytes_FromStringAndSize(
                <const char *>record.payload, record.length)
        data = bytearray(record.length)
        if record.length:
            memcpy(PyByteArray_AS_STRING(data), record.payload,
                   record.length)
        return data

    cdef object _finish(self, uint16_t rtype, object data, bint copied):
        """Turn copied bytes back into the object (after the unpin).

        The record is already taken, so a payload that fails to decode
        is dropped: counted in the shared counters, then reported as
        `MessageDecodeError`. With `copied` true, the record is one of
        `_copies`; an error uncounts it there, because it will not reach
        the caller.
        """
        try:
            return self._deserialize(rtype, data)
        except QueueLayoutError:
            if copied:
                self._return_copies(1)
            raise
        except Exception as exc:
            if copied:
                self._return_copies(1)
            mqs_br_count_decode_failure(&self._ring)
            raise MessageDecodeError(
                f"message dropped: its {len(data)}-byte payload failed to "
                f"deserialize ({type(exc).__name__}: {exc}); it is counted "
                f"in stats().dropped['decode_failed']. Check that producers "
                f"and consumers use the same serializer and that every "
                f"class in the message can be imported and rebuilt here"
            ) from exc
        except BaseException:
            # KeyboardInterrupt or SystemExit inside a custom loads.
            if copied:
                self._return_copies(1)
            raise

    cdef object _deserialize(self, uint16_t rtype, object data):
        if rtype & MQS_BR_TYPE_STAMPED:
            # Only a record that a durable queue's appender copied from
            # the ring still has its stamp (a handle opened without
            # persist= put it); the latency is not recorded.
            rtype = <uint16_t>(rtype & ~MQS_BR_TYPE_STAMPED)
            data = data[MQS_BR_STAMP_BYTES:]
        if rtype == TYPE_BYTES or rtype == TYPE_BYTEARRAY:
            return data
        if rtype == TYPE_PICKLE:
            return pickle.loads(data)
        if rtype == TYPE_CUSTOM:
            return self._serializer.loads(bytes(data))
        if rtype == TYPE_PICKLE_OOB:
            return _decode_oob(data)
        raise QueueLayoutError(f"record of unknown type {rtype} in the ring")

    cdef inline int _promote_due(self) except -1:
        """Move due delayed messages into the ring, if any are due.

        The fast path is one load of the shared next-due word (and a
        clock read only while messages wait).
        """
        cdef int64_t next_due
        cdef int64_t now
        cdef int64_t moved = 0
        if self._delay.base == NULL:
            return 0
        next_due = mqs_delay_next_due(&self._delay)
        if next_due == INT64_MAX:
            return 0
        now = mqs_monotonic_ns()
        if now < next_due:
            return 0
        # MQS_EAGAIN_LOCKED: another process is moving them right now.
        # MQS_EFULL: the ring is full, the rest move after some gets.
        mqs_delay_promote(&self._delay, &self._ring, now, &moved)
        if moved and self._move_trace is not None:
            self._move_trace.append((moved, mqs_monotonic_ns()))
        self._log_delay_repair()
        return 0

    def _trace_moves(self):
        """Record when this handle moves delayed messages into the ring.

        Returns the list that each later move appends to: a tuple of
        (messages moved, CLOCK_MONOTONIC ns right after the move). For
        `mqs.bench_wheel`, which measures delayed delivery lateness.
        """
        self._move_trace = []
        return self._move_trace

    cdef object _take_copy(self, int *status, bint batch):
        """Take one record and return it decoded, or set *status.

        For a batch (`batch` true), a message returned stays counted in
        `_copies` until the caller passes it on with `_return_copies`.
        Otherwise only a message that needs deserializing is counted,
        until that is done. A take that raises leaves the count as it
        was.
        """
        cdef mqs_br_record_t record
        cdef int rc
        cdef object data
        cdef object item
        cdef bint copied = False
        self._promote_due()
        rc = mqs_br_try_take(&self._ring, self._group, 0, &record)
        status[0] = rc
        self._track_stall(rc)
        if rc != MQS_OK:
            return None
        mqs_br_unstamp(&self._ring, &record)
        try:
            data = self._decode(&record)
            # A single bytes or bytearray message reaches the caller a few
            # instructions after the unpin, so only a batch or a payload
            # to deserialize is worth counting.
            copied = batch or (record.type != TYPE_BYTES
                               and record.type != TYPE_BYTEARRAY)
        finally:
            # Counted before the pin drops, so a death from here until
            # the caller gets the message counts it in consumer_died.
            # A copy that raised (MemoryError) has nothing to count.
            if copied:
                self._copies += 1
                mqs_br_set_copies(&self._ring, self._copies)
            mqs_br_unpin(&self._ring, 0, MQS_BR_NO_PIN)
        if batch or not copied:
            return self._finish(record.type, data, copied)
        item = self._finish(record.type, data, True)
        self._return_copies(1)
        return item

    cdef inline void _return_copies(self, int64_t count) noexcept:
        """Uncount `count` copies that are about to reach the caller."""
        self._copies -= count
        # A close from another thread may have detached the slot.
        if self._mapped and self._ring.slot >= 0:
            mqs_br_set_copies(&self._ring, self._copies)

    def get(self, block=True, timeout=None):
        """Remove and return the oldest message.

        With `block` true (the default) wait until one arrives, for at
        most `timeout` seconds if it is not None. Waits release the GIL,
        never end before `timeout`, and let Ctrl-C through.

        Raises
        ------
        Empty
            When nothing arrived (at once if `block` is false).
        MessageDecodeError
            When the message taken failed to deserialize. It is dropped,
            not put back, so a message that can never be decoded cannot
            block the queue, and it is counted in
            ``stats().dropped["decode_failed"]``.
        ValueError
            If the queue is closed, or `timeout` is negative.

        Notes
        -----
        If the process dies after the message is taken and before `get`
        returns it, the message is lost, and once another process reaps
        the dead one (at the latest in its next `stats`)
        ``stats().dropped["consumer_died"]`` counts it. The count is an
        upper bound: a death in the few instructions between counting
        the copy and dropping its pin counts it twice, and a death just
        before the take's compare-and-swap counts a message that stays
        queued. One window goes uncounted, to keep the bytes path free
        of extra stores: for a `bytes` or `bytearray` message, the few
        instructions from the pin drop to the return, which run no
        Python code. A durable queue (`persist`) counts what a consumer
        claimed from the moment before its claim, so a death just before
        the claim counts up to one message too many, and leaves the few
        instructions from uncounting to the return uncounted, whatever
        the message type.
        """
        self._check_open()
        if self._inbox_of is not None:
            self._raise_inbox_get()
        if block:
            deadline_ns(timeout)  # a negative timeout raises even with items
        if self._durable is not None:
            return self._durable.get(block, timeout)
        return self._get_copy(block, timeout, False)

    cdef int _raise_inbox_get(self) except -1:
        raise QueueLayoutError(
            f"shared queue {self.name!r} is durable (its log is at "
            f"{self._inbox_of!r}). This handle was opened without "
            f"persist=, so it may put but not get: its gets would take "
            f"messages before they reach the log. Open it with "
            f"persist={self._inbox_of!r} to get")

    cdef inline object _get_copy(self, bint block, object timeout,
                                 bint batch):
        """Get one message as `get` does, counted as `_take_copy` says."""
        cdef int status
        cdef object item
        if block and self._strategy == STRATEGY_SPIN:
            item = self._spin_take(&status, batch)
        else:
            item = self._take_copy(&status, batch)
        if status == MQS_OK:
            return item
        return self._wait_item(block, timeout, False, batch)

    cdef object _spin_take(self, int *status, bint batch):
        """Retry the take for about SPIN_HOLD_NS without releasing the GIL.

        For the "spin" strategy: a reply in a ping-pong arrives within a
        microsecond or two, sooner than releasing and retaking the GIL and
        registering as a waiter would take. Other threads of this process
        wait for the GIL meanwhile, which is why the window is short.
        Between takes it polls the head record's commit word only. A take
        that finds nothing also reads the tail, so the producer's next put
        would first have to move the tail's cache line back to its core.
        The clock is first read after 64 polls, so a get that finds its
        item sooner reads no clock at all.
        """
        cdef int64_t end = 0
        cdef int64_t now
        cdef int i = 0
        cdef object item
        while True:
            self._promote_due()
            if mqs_br_head_published(&self._ring, self._group):
                item = self._take_copy(status, batch)
                if status[0] == MQS_OK:
                    return item
            i += 1
            if (i & 63) == 0:
                now = mqs_monotonic_ns()
                if end == 0:
                    end = now + SPIN_HOLD_NS
                elif now >= end:
                    status[0] = MQS_EEMPTY
                    return None
            mqs_cpu_relax()

    def get_nowait(self):
        """Remove and return the oldest message, or raise `Empty` at once."""
        return self.get(False)

    def get_async(self, timeout=None):
        """Return a coroutine that gets the oldest message without blocking
        the event loop.

        The coroutine retries `get_nowait` after sleeps of 0.5 ms growing
        to 5 ms, so it sees a new message at most about 5 ms late. It raises
        `Empty` after `timeout` seconds (None: no limit), never earlier,
        and any other error of `get_nowait` at once. Cancelling it takes
        nothing.
        """
        return _aio.get_async(self, timeout)

    cdef inline void _track_stall(self, int rc):
        if rc == MQS_EAGAIN_STUCK:
            if self._stuck_since == 0:
                self._stuck_since = mqs_monotonic_ns()
        elif self._stuck_since != 0:
            self._stuck_since = 0
            self._stall_reported = False

    cdef int64_t _wake_time(self, int64_t deadline):
        """Park deadline of a get: its own, or the next delayed message's.

        A due message that could not be moved yet (the delay lock was
        held, or the ring was full) is tried again DUE_RETRY_NS later at
        the latest; the process moving it wakes getters sooner.
        """
        cdef int64_t next_due
        cdef int64_t now
        if self._delay.base == NULL:
            return deadline
        next_due = mqs_delay_next_due(&self._delay)
        if next_due == INT64_MAX:
            return deadline
        now = mqs_monotonic_ns()
        if next_due <= now:
            next_due = now + DUE_RETRY_NS
        if deadline >= 0 and deadline <= next_due:
            return deadline
        return next_due

    cdef object _wait_item(self, bint block, object timeout, bint view,
                           bint batch):
        cdef int64_t deadline = deadline_ns(timeout) if block else 0
        cdef int64_t wake
        cdef uint32_t epoch
        cdef int strategy = self._strategy
        cdef int status
        cdef bint expired
        cdef object item
        while True:
            epoch = mqs_wait_prepare(mqs_br_not_empty(&self._ring))
            # Counted as a wait, because deserializing runs Python code,
            # during which another thread may call close(). The ring then
            # stays mapped until this thread has finished the wait below.
            self._parked += 1
            try:
                if view:
                    item = self._take_view_once(&status)
                else:
                    item = self._take_copy(&status, batch)
            except BaseException:
                mqs_wait_finish(mqs_br_not_empty(&self._ring))
                self._leave_wait()
                raise
            if status == MQS_OK or not block or self._closed:
                mqs_wait_finish(mqs_br_not_empty(&self._ring))
            if self._leave_wait():
                if status == MQS_OK:
                    # Taken already: raising would lose the message.
                    return item
                self._raise_closed_meanwhile()
            if status == MQS_OK:
                return item
            if not block:
                expired = True
            else:
                wake = self._wake_time(deadline)
                expired = self._park(mqs_br_not_empty(&self._ring), epoch,
                                     wake, strategy)
                if expired and wake != deadline:
                    # Woken for a delayed message, not by the timeout.
                    expired = False
                if strategy == STRATEGY_BLOCK:
                    strategy = STRATEGY_SLEEP
            if expired:
                # A caller that only polls must still repair a dead
                # producer's record at the head, or it never gets past
                # it. After one repair the loop ends: the next take
                # succeeds, or _repair_due is false and Empty is raised.
                if status == MQS_EAGAIN_STUCK and self._repair_due() \
                        and self._repair_stuck() > 0:
                    continue
                raise Empty()
            if status == MQS_EAGAIN_STUCK and \
                    mqs_monotonic_ns() - self._stuck_since >= WAIT_SLICE_NS:
                self._repair_stuck()

    cdef int _repair_stuck(self) except -1:
        """Repair records of dead producers; report a live stalled one.

        The stall is logged once, when the head has been stuck for
        STALL_REPORT_NS. Returns how many records were repaired.
        """
        cdef int repaired = mqs_br_repair(&self._ring)
        cdef int owner
        cdef int64_t now = mqs_monotonic_ns()
        cdef int64_t stuck_ns = now - self._stuck_since
        self._last_repair_ns = now
        if repaired > 0:
            self._log_repaired(repaired)
            return repaired
        if self._stuck_since != 0 and stuck_ns >= STALL_REPORT_NS \
                and not self._stall_reported:
            owner = mqs_br_stalled_owner(&self._ring, self._group)
            if owner >= 0:
                self._stall_reported = True
                logger.warning(
                    "shared queue %s: waiting %.1f s for a live producer "
                    "(pid %d, slot %d) to publish a record it claimed",
                    self._label(), stuck_ns / 1e9,
                    mqs_br_participant(&self._ring, owner).pid, owner)
        return 0

    def _label(self):
        return repr(self.name) if self.name is not None else "(anonymous)"

    def get_many(self, max_items, block=True, timeout=None):
        """Remove and return a list of 1 to `max_items` oldest messages.

        Waits like `get` until at least one message is there, then takes
        what is queued, up to `max_items`, without waiting for more.
        A message that fails to deserialize is dropped and counted as in
        `get`. It raises `MessageDecodeError` only when no message of the
        call decoded, because raising later would lose the messages
        already taken. Otherwise it is logged and the call returns the
        messages decoded before it (on a durable queue, also those after
        it in the same claim).

        Notes
        -----
        If the process dies before the call returns, every message it
        took is lost, and ``stats().dropped["consumer_died"]`` counts
        all of them, with the same upper bound as for `get`: at most one
        message too many. On a durable queue (`persist`) the bound is
        the number of messages that were there to claim, at most
        `max_items`.
        """
        cdef int status
        cdef list out
        cdef Py_ssize_t limit
        cdef Py_ssize_t taken
        if not isinstance(max_items, int) or isinstance(max_items, bool):
            raise TypeError(
                f"max_items must be an int, got {type(max_items).__name__} "
                f"{max_items!r}")
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items!r}")
        if max_items > (1 << 63) - 1:
            raise ValueError(
                f"max_items must be at most 2**63 - 1, got {max_items!r}")
        self._check_open()
        if self._inbox_of is not None:
            self._raise_inbox_get()
        limit = max_items
        if self._durable is not None:
            if block:
                deadline_ns(timeout)
            return self._durable.get_many(limit, block, timeout)
        if block:
            deadline_ns(timeout)  # a negative timeout raises even with items
        item = self._get_copy(block, timeout, True)
        # Every message taken stays counted in the participant's `copies`
        # until the list returns, so a death mid-batch counts them all.
        taken = 1
        try:
            out = [item]
            while taken < limit:
                if self._closed:
                    # Another thread closed the handle while the last
                    # message was deserialized, so the ring may be gone.
                    break
                try:
                    item = self._take_copy(&status, True)
                except MessageDecodeError as exc:
                    # Raising would lose the messages already taken.
                    logger.warning("queue %s: %s", self._label(), exc)
                    break
                if status != MQS_OK:
                    break
                taken += 1
                out.append(item)
        finally:
            self._return_copies(taken)
        return out

    # -- zero-copy views ------------------------------------------------------

    def get_view(self, timeout=None):
        """Lend the next message's raw bytes as a read-only memoryview.

        Use as ``with q.get_view(timeout=1) as view:``; the message is
        removed from the queue. Waits like `get` (raising `Empty` on
        timeout). The bytes stay in the ring, and producers do not
        overwrite them, until the view and every slice of it are
        released; after the ``with`` block the view raises `ValueError`.
        For a pickled object the view shows the serialized bytes.

        Notes
        -----
        A view that is kept alive holds back producers once they wrap
        around to it: release views promptly.

        The message is taken when the view is lent. If the process dies
        before the block ends, the message is lost, and once another
        process reaps the dead one (at the latest in its next `stats`)
        ``stats().dropped["consumer_died"]`` counts it, on a durable
        queue (`persist`) too.
        """
        cdef _ViewContext context = _ViewContext()
        self._check_open()
        context._queue = self
        context._timeout = timeout
        return context

    cdef object _take_view_once(self, int *status):
        cdef mqs_br_record_t record
        cdef _RecordView holder
        cdef int rc
        self._promote_due()
        rc = mqs_br_try_take(&self._ring, self._group, 1, &record)
        status[0] = rc
        self._track_stall(rc)
        if rc != MQS_OK:
            return None
        mqs_br_unstamp(&self._ring, &record)
        holder = _RecordView()
        holder._queue = self
        holder._payload = record.payload
        holder._length = record.length
        holder._position = record.position
        holder._pid = self._pid
        self._view_positions.append(record.position)
        return memoryview(holder)

    def _take_view(self, timeout):
        cdef int status
        self._check_open()
        if self._inbox_of is not None:
            self._raise_inbox_get()
        deadline_ns(timeout)  # a negative timeout raises even with items
        if self._durable is not None:
            return self._durable.get_view(timeout)
        view = self._take_view_once(&status)
        if status == MQS_OK:
            return view
        return self._wait_item(True, timeout, True, False)

    cdef void _release_view(self, int64_t position):
        try:
            self._view_positions.remove(position)
        except ValueError:
            return
        if not self._mapped or self._ring.slot < 0:
            return
        if self._closed and not self._view_positions:
            # close() kept the slot, and so the view pin, for this view.
            self._detach_and_unmap()
            return
        mqs_br_unpin(&self._ring, 1, min(self._view_positions)
                     if self._view_positions else MQS_BR_NO_PIN)

    # -- closing ---------------------------------------------------------------

    cdef int _park(self, mqs_waitword_t *word, uint32_t epoch,
                   int64_t deadline, int strategy) except -1:
        """`park` on a word of this handle's mappings, shared across
        processes. Raises ValueError when the handle was closed during
        the wait, and the last waiter to leave finishes the close."""
        cdef int expired
        self._parked += 1
        try:
            expired = park(word, epoch, deadline, 1, strategy)
        except BaseException:
            # What a signal handler raised (KeyboardInterrupt) goes to the
            # caller even when close() ran during the wait.
            self._leave_wait()
            raise
        self._left_wait()
        return expired

    cdef int _left_wait(self) except -1:
        """Count a thread out of a wait on the mappings; raise ValueError
        if close() started meanwhile."""
        if self._leave_wait():
            self._raise_closed_meanwhile()
        return 0

    cdef bint _leave_wait(self) except -1:
        """Count a thread out of a wait on the mappings. Return True if
        close() started meanwhile; the last thread out then unmaps."""
        self._parked -= 1
        if not self._closed and (self._durable is None
                                 or not self._durable._closed):
            return False
        if self._durable is not None \
                and threading.current_thread() is self._durable._thread:
            # The appender thread, which close() joins before it unmaps.
            return False
        if self._closed and self._parked == 0:
            self._finish_close()
        return True

    cdef int _raise_closed_meanwhile(self) except -1:
        raise ValueError(f"Queue {self!r} was closed by another thread "
                         f"while this call waited")

    def close(self):
        """Stop using the queue in this process, as `multiprocessing.Queue`.

        Later calls of put and get on this handle raise `ValueError`.
        Messages already put stay in the queue for other processes. While
        a view of a record (or a slice of one) is alive, this process
        keeps its participant slot, so producers still keep off that
        record; the slot and the mapping are released with the last view.
        Calls that other threads are blocked in raise `ValueError`
        within about 50 ms, and the last of them releases the mapping.
        """
        if self._closed:
            return
        if self._durable is not None:
            # Stops the appender thread before the handle is marked
            # closed. The control file stays mapped until _finish_close,
            # because waits may start while close() joins the thread.
            self._durable.close(True)
        self._closed = True
        if not self._parked:
            self._finish_close()

    cdef int _finish_close(self) except -1:
        if self._close_done:
            return 0
        self._close_done = True
        if self._durable is not None:
            self._durable.release_control()
        if not self._view_positions:
            self._detach_and_unmap()
        return 0

    cdef int _detach_and_unmap(self) except -1:
        if self._mapped and self._ring.slot >= 0 \
                and self._pid == os.getpid():
            mqs_br_detach(&self._ring)
        if self._ring.fd >= 0:
            os.close(self._ring.fd)
            self._ring.fd = -1
        self._unmap()
        return 0

    def join_thread(self):
        """Return at once: there is no feeder thread to join.

        Raises
        ------
        AssertionError
            If the queue is not closed, as `multiprocessing.Queue` does.
        """
        assert self._closed, f"Queue {self!r} not closed"

    def cancel_join_thread(self):
        """Do nothing: puts are synchronous, so exit never waits on them."""

    def unlink(self):
        """Remove the queue's name; processes attached keep using it.

        For a durable queue this also removes the file
        ``/dev/shm/mqs-persist.<name>`` that names its log directory for
        ``mqs stat``, ``mqs top`` and the metrics exporter.

        Does nothing for an anonymous queue, whose memory goes away with
        the last process that maps it.
        """
        if self.name is None:
            return
        for path in (_shm_path(self.name), _persist_note_path(self.name)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False

    def __dealloc__(self):
        if self._delay.base != NULL:
            mqs_delay_unmap(&self._delay)
        if self._mapped:
            if self._ring.slot >= 0 and self._pid == os.getpid():
                mqs_br_detach(&self._ring)
            mqs_br_unmap(&self._ring)
        if self._ring.fd >= 0:
            os.close(self._ring.fd)

    def __repr__(self):
        state = "closed" if self._closed else "open"
        if self._durable is not None:
            return (f"<mqs.SharedQueue name={self.name!r} "
                    f"persist={self._durable.path!r} {state}>")
        return f"<mqs.SharedQueue name={self.name!r} {state}>"


def _read_config(fd):
    """Read the ring's config block: waits up to 5 s for its creator.

    Returns the fields of mqs_br_config_t in order: magic, version,
    header_bytes, capacity, max_message_size, maxsize, secret, n_groups,
    init_state, delayed_bytes.
    """
    deadline = time.monotonic() + 5.0
    while True:
        config = struct.unpack(_CONFIG_FORMAT, os.pread(fd, _CONFIG_BYTES, 0))
        if config[8] == _INIT_READY or config[0] != 0 or config[8] != 0 \
                or time.monotonic() > deadline:
            return config
        time.sleep(0.001)


def _delayed_area_bytes(value):
    """Check delayed_capacity_bytes and round it up to a page multiple."""
    _check_int("delayed_capacity_bytes", value)
    if value != 0 and not MQS_DELAY_MIN_AREA_BYTES <= value <= 1 << 40:
        raise ValueError(
            f"delayed_capacity_bytes must be 0 (no delayed messages) or "
            f"{MQS_DELAY_MIN_AREA_BYTES} to 2**40, got {value!r}")
    page = os.sysconf("SC_PAGESIZE")
    return -(-value // page) * page


def _decode_oob(data):
    view = memoryview(data)
    count = int.from_bytes(view[0:4], "little")
    stream_length = int.from_bytes(view[4:12], "little")
    lengths = [int.from_bytes(view[12 + 8 * i:20 + 8 * i], "little")
               for i in range(count)]
    offset = 12 + 8 * count
    offset += -offset % 16
    stream = view[offset:offset + stream_length]
    offset += stream_length
    buffers = []
    for length in lengths:
        offset += -offset % 16
        buffers.append(view[offset:offset + length])
        offset += length
    return pickle.loads(stream, buffers=buffers)


def _attach_by_name(name, serializer, strategy, group=0, persist=None,
                    fsync="interval"):
    return SharedQueue(name=name, create=False, serializer=serializer,
                       wait_strategy=strategy, group=group, persist=persist,
                       fsync=fsync)


def _attach_by_fd(dup, serializer, strategy, group=0, persist=None,
                  fsync="interval"):
    cdef SharedQueue q = SharedQueue.__new__(SharedQueue)
    fd = _reopen_own(dup.detach())
    q._strategy = _STRATEGIES[strategy]
    q._serializer = serializer
    q.name = None
    try:
        q._attach_fd(fd, "inherited queue")
    except BaseException:
        q._discard_fd(fd)
        raise
    _instances.add(q)
    if persist is not None:
        q._open_durable(persist, fsync)
    q._set_group(group)
    return q


include "_durable.pxi"


# ---- stats and read-only inspection ----------------------------------------
#
# The header fields below are read in place. The block types are
# declared only to name fields: Cython emits ``header->tail.v.second``
# and the C compiler resolves it against the real mqs_br_header_t, so a
# changed layout fails to compile instead of reading the wrong bytes.

cdef extern from *:
    ctypedef struct _pair "_mqs_pair":
        int64_t first
        int64_t second

    ctypedef struct _pair_block "_mqs_pair_block":
        _pair v

    ctypedef struct _repairs_fields "_mqs_repairs_fields":
        int64_t padded

    ctypedef struct _repairs_block "_mqs_repairs_block":
        _repairs_fields v

    ctypedef struct _group_fields "_mqs_group_fields":
        _pair cursor

    ctypedef struct _group_block "_mqs_group_block":
        _group_fields v

    ctypedef struct _header_fields "mqs_br_header_t":
        _pair_block tail
        _repairs_block repairs
        _group_block groups[8]


cdef extern from *:
    """
    #include <stddef.h>
    #define MQS_DELAY_COUNT_OFFSET offsetof(mqs_delay_header_t, count)
    """
    size_t MQS_DELAY_COUNT_OFFSET


cdef object _read_delayed(mqs_bytering_t *ring, int fd):
    """Return the messages waiting in the delayed area of a ring mapped
    header-only, read from the file (the area follows the ring), or None
    when the queue has no delayed area."""
    cdef int64_t count
    if mqs_br_config(ring).delayed_bytes <= 0:
        return None
    data = os.pread(fd, 8, mqs_br_file_bytes(ring.capacity)
                    + MQS_DELAY_COUNT_OFFSET)
    if len(data) != 8:
        return None
    count = struct.unpack("<q", data)[0]
    return max(0, count)


cdef object _read_stats(mqs_bytering_t *ring, object name, int group):
    """Return the SharedQueueStats of the ring whose header is mapped.

    Only loads: the header may be mapped read-only. The lag of a group
    counts a message from its claim, so a message still being copied in
    counts, and so does a dead producer's claim until a repair pads it.
    """
    from mqs import metrics

    cdef _header_fields *header = <_header_fields *>ring.header
    cdef mqs_br_config_t *config = mqs_br_config(ring)
    cdef mqs_br_counters_t *counters = mqs_br_counters(ring)
    cdef int n_groups = config.n_groups
    # Plain loads without a lock: under concurrent puts and repairs the
    # values come from slightly different instants.
    cdef int64_t padded = header.repairs.v.padded
    cdef int64_t enqueued = header.tail.v.second - padded
    cdef int64_t tail = header.tail.v.first
    cdef int64_t oldest_head = tail
    dequeued = []
    lag = []
    for g in range(n_groups):
        oldest_head = min(oldest_head, header.groups[g].v.cursor.first)
        dequeued.append(header.groups[g].v.cursor.second)
        lag.append(max(0, mqs_br_count(ring, g)))
    attached = 0
    for slot in range(MQS_BR_MAX_PARTICIPANTS):
        if mqs_br_participant(ring, slot).pid != 0 \
                and mqs_br_participant_alive(ring, slot) == 1:
            attached += 1
    return metrics.SharedQueueStats(
        latency=_read_latency(mqs_br_latency(ring)),
        name=name, capacity_bytes=ring.capacity,
        max_message_size=config.max_message_size, maxsize=config.maxsize,
        groups=n_groups, group=group, depth=lag[group], delayed=None,
        enqueued=enqueued, dequeued=tuple(dequeued), lag=tuple(lag),
        used_bytes=max(0, tail - oldest_head), attached_processes=attached,
        repaired_records=counters.repaired_records,
        repaired_bytes=counters.repaired_bytes,
        lost_records=counters.lost_records,
        stalls_reported=counters.stalls_reported,
        decode_failures=counters.decode_failures)


cdef object _read_latency(mqs_hist_t *hist):
    """Return the LatencySummary of a ring's histogram, or None while
    sampling is off and nothing was recorded. Only loads."""
    from mqs import metrics

    cdef int64_t every = hist.sample_every
    cdef int64_t count = hist.count
    if every <= 0 and count == 0:
        return None
    counts = [(index, hist.buckets[index])
              for index in range(MQS_HIST_BUCKETS) if hist.buckets[index]]
    return metrics.summarize_buckets(counts, count, hist.sum_ns,
                                     hist.max_ns, max(every, 0))


def _inspect_file(path, name):
    """Return the stats of the queue file at `path` without attaching.

    Maps the header read-only and takes no participant slot: nothing in
    the file is written, and liveness is read with F_OFD_GETLK, which
    takes no lock.
    """
    cdef mqs_bytering_t ring
    cdef void *header
    cdef int rc
    cdef uint64_t secret
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise QueueNotFound(
            f"no shared queue named {name!r} ({path} is missing); list the "
            f"queues with `mqs top --once`") from None
    try:
        size = os.fstat(fd).st_size
        if size < mqs_br_file_bytes(4096):
            raise QueueLayoutError(
                f"{path} is {size} bytes, too small for an mqs queue")
        header = mmap(NULL, MQS_BR_HEADER_BYTES, PROT_READ, MAP_SHARED,
                      fd, 0)
        if header == MAP_FAILED:
            raise OSError(f"cannot map the header of {path}")
        try:
            rc = mqs_br_validate(<mqs_br_header_t *>header, size)
            if rc == MQS_EVERSION:
                # The config block is the first of the header.
                raise _version_error(
                    path, "ring", (<mqs_br_config_t *>header).version,
                    _LAYOUT_VERSION, path=path)
            if rc == MQS_EAGAIN_INIT:
                raise QueueLayoutError(
                    f"{path} is not initialised yet, or its creator died "
                    f"before finishing")
            if rc != MQS_OK:
                raise QueueLayoutError(
                    f"{path} has a corrupted or foreign header; it is not "
                    f"an mqs queue")
            ring.header = <mqs_br_header_t *>header
            ring.data = NULL
            # The file also holds the delayed area after the ring.
            ring.capacity = mqs_br_config(&ring).capacity
            ring.fd = fd
            ring.slot = -1
            stats = _read_stats(&ring, name, 0)
            stats = dataclasses.replace(
                stats, delayed=_read_delayed(&ring, fd))
            secret = mqs_br_config(&ring).secret
            return _with_durable_stats(stats, secret)
        finally:
            munmap(header, MQS_BR_HEADER_BYTES)
    finally:
        os.close(fd)


def _live_queues():
    """Return the open SharedQueue handles of this process."""
    return [q for q in list(_instances)
            if not (<SharedQueue>q)._closed and (<SharedQueue>q)._mapped]
