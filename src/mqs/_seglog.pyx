# cython: language_level=3, embedsignature=True, binding=False
"""`SegmentLog`: the durable segment log of `csrc/mqs_seglog.h`.

Records live in memory-mapped segment files; reads return read-only views
into the mapping (a `memoryview` per record, or a `pyarrow.RecordBatch`
whose value column points into the segment). Every call holds the GIL
except the waits for a sync, so appends and reads from several threads
are serialised and syncs under ``fsync="always"`` are shared among the
threads waiting at the time (group commit).
"""

cimport cython
from cpython.buffer cimport (
    PyBUF_SIMPLE,
    PyBuffer_FillInfo,
    PyBuffer_Release,
    PyObject_CheckBuffer,
    PyObject_GetBuffer,
)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from libc.stdint cimport INT64_MAX, int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

import collections
import errno as _errno
import io
import logging
import os
import re
import struct
import tempfile
import time
import types

from mqs._dirkind import (
    LOG_BROKER, SEGMENT_LOG, check_directory_kind, directory_kind)
from mqs.metrics import SegmentLogStats
from mqs.errors import (
    LogCorrupted,
    LogLocked,
    LogPoisoned,
    LogVersionError,
    MessageTooLarge,
    MqsError,
    OffsetOutOfRange,
    RecoveryPointError,
)
from mqs.includes.mqs_atomic cimport (
    MQS_ECORRUPT,
    MQS_EEMPTY,
    MQS_EINVAL,
    MQS_ENOMEM,
    MQS_ETOOBIG,
    MQS_OK,
)
from mqs.includes.mqs_seglog cimport (
    MQS_EIO,
    MQS_ELOCKED,
    MQS_ENOSPACE,
    MQS_EPOISONED,
    MQS_ERANGE,
    MQS_EREADONLY,
    MQS_ELOGVERSION,
    MQS_SEGLOG_FSYNC_ALWAYS,
    MQS_SEGLOG_FSYNC_INTERVAL,
    MQS_SEGLOG_FSYNC_NEVER,
    MQS_SEGLOG_MAX_SEGMENT_BYTES,
    MQS_SEGLOG_MIN_SEGMENT_BYTES,
    MQS_SEGLOG_VERSION,
    mqs_crc32c_extend,
    mqs_crc32c_impl,
    mqs_seglog_append,
    mqs_seglog_abandon,
    mqs_seglog_close_errno,
    mqs_seglog_config_t,
    mqs_seglog_entry_t,
    mqs_seglog_find_time,
    mqs_seglog_get_stats,
    mqs_seglog_last_errno,
    mqs_seglog_max_value_bytes,
    mqs_seglog_open,
    mqs_seglog_read,
    mqs_seglog_read_batch,
    mqs_seglog_record_t,
    mqs_seglog_recovery_t,
    mqs_seglog_refresh,
    mqs_seglog_retain,
    mqs_seglog_retain_below,
    mqs_seglog_roll,
    mqs_seglog_segment_acquire,
    mqs_seglog_segment_base,
    mqs_seglog_segment_data,
    mqs_seglog_segment_release,
    mqs_seglog_set_sync_hook,
    mqs_seglog_stats_t,
    mqs_seglog_sync,
    mqs_seglog_sync_starts_now,
)

__all__ = ["SegmentLog", "LogRecord", "SegmentLogStats", "RecoveryReport"]

logger = logging.getLogger(__name__)

LogRecord = collections.namedtuple(
    "LogRecord", ["offset", "timestamp", "key", "value"], module="mqs")
LogRecord.__doc__ = """One record of a SegmentLog.

`timestamp` is in nanoseconds since the Unix epoch; `key` is None for a
record appended without a key; `key` and `value` are read-only
memoryviews into the segment mapping."""

_RawStats = collections.namedtuple(
    "_RawStats",
    ["start_offset", "end_offset", "synced_offset", "segments", "bytes",
     "appended_records", "syncs", "sync_errno", "segments_deleted",
     "records_deleted", "syncs_taken_over", "gather_timeouts"])

RecoveryReport = collections.namedtuple(
    "RecoveryReport",
    ["segments_scanned", "records_verified", "torn_segments",
     "bytes_zeroed", "records_dropped", "first_bad_offset",
     "first_bad_segment", "first_bad_position", "temp_files_removed",
     "ended_before_checkpoint", "records_skipped", "damaged_ranges",
     "first_skipped_offset", "first_skipped_segment",
     "first_skipped_position"],
    defaults=(False, 0, 0, -1, -1, 0), module="mqs")

_FSYNC_MODES = {
    "never": MQS_SEGLOG_FSYNC_NEVER,
    "interval": MQS_SEGLOG_FSYNC_INTERVAL,
    "always": MQS_SEGLOG_FSYNC_ALWAYS,
}
_FSYNC_NAMES = {v: k for k, v in _FSYNC_MODES.items()}
_GROUP_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")
_COMMIT_MAGIC = b"MQSGROUP"
_COMMIT_FORMAT = struct.Struct("<8sqI")
_COMMIT_FILE = re.compile(r"consumer-([A-Za-z0-9_-][A-Za-z0-9._-]{0,199})\.offset")
_pyarrow = None

# Counts forks in this process's ancestry line: a writer handle whose
# generation differs was opened by a parent (see SegmentLog._forked).
cdef unsigned long _fork_generation = 0


def _count_fork():
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_count_fork)


cdef inline int64_t _wall_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


def _crc32c(data, crc=0):
    """Return the CRC-32C of a bytes-like object, continuing from `crc`."""
    cdef const uint8_t[::1] view = memoryview(data).cast("B")
    cdef uint32_t start = crc
    if view.shape[0] == 0:
        return mqs_crc32c_extend(start, NULL, 0)
    return mqs_crc32c_extend(start, &view[0], view.shape[0])


def _crc32c_impl():
    """Name of the CRC-32C implementation in use: sse4.2, armv8, software."""
    return mqs_crc32c_impl().decode()


def _arrow():
    global _pyarrow
    if _pyarrow is None:
        import pyarrow
        _pyarrow = pyarrow
    return _pyarrow


def _check_int(name, value, low, high, hint=""):
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(
            f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ValueError(
            f"{name} must be from {low} to {high}, got {value!r}{hint}")
    return value


def _check_seconds(name, value, allow_none):
    if value is None and allow_none:
        return -1
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(
            f"{name} must be a number of seconds"
            f"{' or None' if allow_none else ''}, got "
            f"{type(value).__name__} {value!r}")
    if not value >= 0 or value > 2**62 / 1e9:
        raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
    return int(value * 1e9)


def check_options(segment_bytes, fsync, fsync_interval_s):
    """Check the SegmentLog options that a log broker passes on.

    Returns `fsync_interval_s` in ns (at least 1). Raises TypeError or
    ValueError, naming the value, for an invalid option, so a caller can
    check them before it creates any file.
    """
    if not isinstance(fsync, str):
        raise TypeError(
            f"fsync must be a str, got {type(fsync).__name__} {fsync!r}")
    if fsync not in _FSYNC_MODES:
        raise ValueError(
            f"fsync must be 'always', 'interval' or 'never', got "
            f"{fsync!r}")
    hint = ""
    if isinstance(segment_bytes, int) and not isinstance(
            segment_bytes, bool):
        # Suggest the nearest valid size: a multiple of 4096 within
        # the allowed range.
        suggestion = -(-segment_bytes // 4096) * 4096
        suggestion = max(MQS_SEGLOG_MIN_SEGMENT_BYTES,
                         min(MQS_SEGLOG_MAX_SEGMENT_BYTES, suggestion))
        if suggestion != segment_bytes:
            hint = f" (try {suggestion})"
    _check_int("segment_bytes", segment_bytes,
               MQS_SEGLOG_MIN_SEGMENT_BYTES, MQS_SEGLOG_MAX_SEGMENT_BYTES,
               hint)
    if segment_bytes % 4096:
        raise ValueError(
            f"segment_bytes must be a multiple of 4096, got "
            f"{segment_bytes!r}{hint}")
    return max(1, _check_seconds("fsync_interval_s", fsync_interval_s, False))


cdef object _as_bytes(object value, str what):
    """Return a bytes-like object that supports the simple buffer API."""
    if PyBytes_CheckExact(value):
        return value
    if not PyObject_CheckBuffer(value):
        raise TypeError(
            f"{what} must be a bytes-like object, got "
            f"{type(value).__name__}")
    view = memoryview(value)
    if not view.c_contiguous:
        return view.tobytes()
    return view


@cython.final
@cython.auto_pickle(False)
cdef class _SegmentBuffer:
    """A segment mapping exported read-only through the buffer protocol.

    Holds a reference on the segment, so the mapping stays valid after
    retention unlinks the file or the log is closed, until every view
    and Arrow buffer made from it is gone.
    """

    def __dealloc__(self):
        if self._segment != NULL:
            mqs_seglog_segment_release(self._segment)

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        PyBuffer_FillInfo(buffer, self, <void *>self._data,
                          <Py_ssize_t>self._size, 1, flags)

    def __releasebuffer__(self, Py_buffer *buffer):
        pass

    @property
    def address(self):
        """Start address of the mapping."""
        return <uintptr_t>self._data


cdef _SegmentBuffer _segment_buffer(mqs_segment_t *segment):
    cdef _SegmentBuffer buf = _SegmentBuffer.__new__(_SegmentBuffer)
    mqs_seglog_segment_acquire(segment)
    buf._segment = segment
    buf._data = mqs_seglog_segment_data(segment, &buf._size)
    return buf


cdef int _sync_hook_trampoline(void *ctx, int64_t end_offset,
                               int phase) noexcept with gil:
    cdef SegmentLog log = <SegmentLog>ctx
    try:
        result = log._sync_hook(end_offset, phase)
        return int(result or 0)
    except BaseException:
        logger.exception("sync hook of %s raised; failing the sync with EIO",
                         log.path)
        return _errno.EIO


@cython.auto_pickle(False)
cdef class SegmentLog:
    # The first docstring lines are the text signature that
    # inspect.signature reads; tests/test_introspection.py checks them.
    """SegmentLog(path, segment_bytes=67108864, fsync='interval',
               fsync_interval_s=0.05, retention_bytes=None,
               retention_s=None, readonly=False, *,
               fsync_interval_records=10000)\n--\n
    A durable, append-only log of records in memory-mapped segments.

    Parameters
    ----------
    path : str or os.PathLike
        Log directory, created (mode 0700) if missing.
    segment_bytes : int
        Size of each segment file, a multiple of 4096 from 8 KiB to 1 GiB.
        A record (32-byte header, key and value) must fit in one segment.
    fsync : {"interval", "always", "never"}
        When appended records are synced to the device (msync):

        - ``"always"``: before `append` and `append_many` return. A
          returned offset survives kill -9 and power loss. Threads that
          append at the same time share one sync (group commit).
        - ``"interval"`` (default): a background thread syncs every
          `fsync_interval_s`, or sooner once `fsync_interval_records`
          records are unsynced. Every returned offset survives kill -9
          of the process, because the data is in the kernel's page cache
          when `append` returns; a power loss may lose the records of the
          last interval.
        - ``"never"``: only `flush` syncs; `close` records where the
          records end but syncs nothing. Survives kill -9 like
          "interval"; a power loss may lose anything not flushed, even
          after a clean close.
    fsync_interval_s : float
        "interval" only: max age in seconds of an unsynced record.
    retention_bytes : int or None
        Delete the oldest sealed segments while all segments together
        exceed this many bytes. Checked when a segment fills up, and by
        `enforce_retention`.
    retention_s : float or None
        Delete sealed segments whose newest record is older than this.
    readonly : bool
        Open without the writer lock, for reading only, e.g. in another
        process while a writer appends. Reads past the known end look
        for new records first.
    fsync_interval_records : int
        "interval" only: sync early once this many records are unsynced
        (0 disables the count).

    Raises
    ------
    LogLocked
        If another writer (another SegmentLog object, in this process or
        another) holds the writer lock.
    NotADirectoryError, FileNotFoundError, PermissionError, OSError
        If the directory cannot be created, opened or read.
    LogVersionError
        If a segment was written by a newer format version.
    LogCorrupted
        If a segment header fails its CRC or size check.

    Notes
    -----
    A clean close (`close`, or leaving the ``with`` block) of a writer
    records where the records of the last segment end, in every mode.
    "always" and "interval" sync the records first; "never" does not.
    What recovery on open does depends on that record:

    - After a clean close, the records up to the recorded end are
      trusted by their lengths and offsets, and their CRCs are not
      checked on open. A record damaged after the close stays in the
      log: reading it raises `LogCorrupted`, the records after it stay
      readable, `mqs dump` counts it as damaged, and appends continue
      after the last record. Nothing is cut.
    - After a crash (kill -9, or an OS crash or power loss), the
      records written since the last clean close, or all records of
      the last segment if it never had one, are verified. Recovery
      stops at the first record whose length, CRC or offset is wrong,
      zeroes everything after it inside the preallocated file (files
      are never shrunk) and logs a WARNING with the bytes and records
      cut. Such a cut in the middle of a segment drops the records
      after it too, as Kafka does; a cut in a segment that is not the
      last leaves a gap of offsets, and reading them raises
      `LogCorrupted`.
    - If the walk by lengths no longer ends exactly at the recorded
      end (a damaged length or offset, or under "never" pages that an
      OS crash or power loss lost after the close), recovery checks the
      CRC of every record and skips each damaged range to the next
      valid record. It keeps the result only if the valid records then
      end exactly at the recorded end and offset. The skipped offsets
      raise `LogCorrupted`, the records after them stay readable,
      `recovery.records_skipped` counts them, and a WARNING is logged.
    - If that fails too (no valid record leads to the recorded end,
      a truncated file, or zeros from lost pages at the end), recovery
      treats the segment as after a crash, verifies all of it and cuts
      it at its first invalid record. It logs a WARNING that the
      records end before the end recorded at the last clean close, and
      sets `recovery.ended_before_checkpoint`; a read-only handle
      reports the same but cuts nothing. Under "never", bytes lost
      inside one record's value leave the walk intact, so that record
      stays in the log and raises `LogCorrupted`.

    A sealed segment is not re-verified on open, but every read checks
    the CRC of the record it returns, so a damaged record raises
    `LogCorrupted` and is never returned as data.

    A sync error poisons the log: every later append raises
    `LogPoisoned` (the kernel may have dropped the failed pages, so a
    retry could report success for lost data). Reads keep working.

    Views returned by `read`, `read_record` and `read_batch` keep their
    segment mapped, even past retention or `close`, until released. A
    read-only handle keeps every segment it has opened mapped until it
    is closed, so the disk space of segments that retention deleted
    meanwhile is freed only then.
    Only one process may write a log. In a child forked from the
    writer, the inherited handle raises `LogLocked` on every write, and
    closing it there leaves the parent's log and lock alone.

    A writer handle under ``fsync="never"`` or ``"interval"`` runs a
    thread that writes zeros into the active segment's file 8 MiB ahead
    of the last record, so the page-cache pages exist before `append`
    stores into them. With a free CPU that made 4 KiB appends about 1.5
    times as fast (BENCHMARKS.md); when the thread falls behind,
    `append` writes the zeros itself, as it would without the thread.

    While syncs come every few records (``fsync="always"``, or a caller
    that flushes after each append), `append` writes each record with
    ``pwrite()`` instead of storing it into the mapping, because a sync
    write-protects the page it ends in and the next store would fault.
    Readers see the same bytes either way.

    Resident memory follows the pages in use, not the size of the log:
    the writer releases the pages behind it as it goes, and a reader
    keeps resident about the segment it reads plus the views it holds.
    On a 2 GiB log of 4 KiB records with 64 MiB segments the peaks were
    10 MiB while writing, 63 MiB while reading with `read` and 42 MiB
    with `read_batch` of 10,000 records
    (``benchmarks/seglog_resident_memory.py``).
    """

    def __cinit__(self, path, segment_bytes=64 << 20, fsync="interval",
                  fsync_interval_s=0.05, retention_bytes=None,
                  retention_s=None, readonly=False, *,
                  fsync_interval_records=10_000):
        cdef mqs_seglog_config_t config
        cdef mqs_seglog_recovery_t report
        cdef int os_errno = 0
        cdef int rc
        cdef bytes encoded
        cdef const char *c_path

        if not isinstance(path, (str, bytes, os.PathLike)):
            raise TypeError(
                f"path must be a str or os.PathLike, got "
                f"{type(path).__name__} {path!r}")
        # os.path.abspath would turn an empty path into the working
        # directory.
        if not os.fspath(path):
            raise ValueError(
                f"path must name the segment log's directory, got "
                f"{path!r}; pass a directory such as 'events'")
        # Absolute, so that commits after a chdir of the process still go
        # to this log's directory.
        self.path = os.path.abspath(os.fsdecode(os.fspath(path)))
        if not readonly and directory_kind(self.path) == LOG_BROKER:
            # A log broker keeps its segment logs in subdirectories, so
            # segments and a lock file at its top would corrupt it.
            check_directory_kind(self.path, SEGMENT_LOG)
        interval_ns = check_options(segment_bytes, fsync, fsync_interval_s)
        _check_int("fsync_interval_records", fsync_interval_records, 0,
                   2**62)
        if retention_bytes is not None:
            _check_int("retention_bytes", retention_bytes, 0, 2**62)

        config.segment_bytes = segment_bytes
        config.fsync_mode = _FSYNC_MODES[fsync]
        config.readonly = bool(readonly)
        config.fsync_interval_ns = interval_ns
        config.fsync_interval_records = fsync_interval_records
        config.retention_bytes = (
            -1 if retention_bytes is None else retention_bytes)
        config.retention_ns = _check_seconds("retention_s", retention_s, True)
        self.readonly = config.readonly
        self._fork_generation = _fork_generation
        self._opener_pid = os.getpid()
        self._fsync_mode = config.fsync_mode
        self._segment_bytes = config.segment_bytes
        self._views = {}

        encoded = os.fsencode(self.path)
        c_path = encoded
        with nogil:
            rc = mqs_seglog_open(&self._log, c_path, &config, &report,
                                 &os_errno)
        if rc != MQS_OK:
            self._log = NULL
            _raise_open_error(rc, os_errno, self.path, segment_bytes)
        self._recovery = RecoveryReport(
            report.segments_scanned, report.records_verified,
            report.torn_segments, report.bytes_zeroed,
            report.records_dropped, report.first_bad_offset,
            report.first_bad_base, report.first_bad_position,
            report.temp_files_removed,
            bool(report.ended_before_checkpoint), report.records_skipped,
            report.damaged_ranges, report.first_skipped_offset,
            report.first_skipped_base, report.first_skipped_position)
        _log_recovery(self.path, self._recovery)

    def __dealloc__(self):
        cdef mqs_seglog_t *log = self._log
        cdef int os_errno = 0
        cdef int rc
        if log == NULL:
            return
        self._log = NULL
        if self._forked():
            # The writer's threads and lock belong to the parent.
            mqs_seglog_abandon(log)
            return
        # The flusher thread may be waiting for the GIL inside a sync
        # hook; closing joins it, so the GIL must be free meanwhile.
        with nogil:
            mqs_seglog_set_sync_hook(log, NULL, NULL)
            rc = mqs_seglog_close_errno(log, &os_errno)
        if rc != MQS_OK:
            logger.warning("closing segment log %s on garbage collection "
                           "failed: %s",
                           self.path, _close_error(rc, os_errno, self.path))

    # ---- helpers ---------------------------------------------------------

    cdef int _check_open(self) except -1:
        if self._closing:
            # Raise only once the close has synced, because callers that
            # find the log closed rely on that sync for their records.
            while self._log != NULL:
                time.sleep(0.001)
        if self._log == NULL:
            raise ValueError(f"segment log {self.path!r} is closed")
        return 0

    cdef bint _forked(self):
        """True for a writer handle inherited through fork."""
        return not self.readonly and \
            self._fork_generation != _fork_generation

    cdef int _check_writer(self) except -1:
        self._check_open()
        if self._forked():
            raise LogLocked(
                _errno.EAGAIN,
                f"this SegmentLog writer was opened by process "
                f"{self._opener_pid}, which this process was forked from, "
                f"and that process holds the writer lock; a forked child "
                f"cannot write through it. Open the log with readonly=True "
                f"in the child, or close it in the parent and open a new "
                f"writer in the child", self.path)
        return 0

    cdef object _view_for(self, mqs_segment_t *segment):
        cdef int64_t base = mqs_seglog_segment_base(segment)
        cdef _SegmentBuffer buf
        entry = self._views.get(base)
        if entry is not None and entry[0] == <uintptr_t>segment:
            return entry[1]
        buf = _segment_buffer(segment)
        view = memoryview(buf)
        if len(self._views) >= 8:
            start = self._raw_stats().start_offset
            for old in [b for b in self._views if b < start]:
                del self._views[old]
        self._views[base] = (<uintptr_t>segment, view, buf)
        return view

    cdef int _raise_status(self, int rc, object offset=None) except -1:
        cdef int err = mqs_seglog_last_errno(self._log)
        if rc == MQS_ERANGE:
            raise OffsetOutOfRange(
                f"offset {offset} was removed by retention; the first "
                f"retained offset is {self._raw_stats().start_offset}")
        if rc == MQS_EEMPTY:
            raise OffsetOutOfRange(
                f"offset {offset} is not written yet; the end offset is "
                f"{self._raw_stats().end_offset}")
        if rc == MQS_ECORRUPT:
            raise LogCorrupted(
                f"record at offset {offset} in {self.path!r} failed its "
                f"length, offset or CRC check and is not returned; "
                f"continue from a later offset", offset, self.path)
        if rc == MQS_EPOISONED:
            err = self._raw_stats().sync_errno or _errno.EIO
            raise LogPoisoned(
                err,
                f"a sync of this log failed earlier ({os.strerror(err)}), "
                f"so it takes no more appends; close and reopen it to "
                f"recover what reached the disk", self.path)
        if rc == MQS_EREADONLY:
            raise io.UnsupportedOperation(
                f"segment log {self.path!r} was opened with readonly=True; "
                f"only the writer can append, flush, roll or apply "
                f"retention")
        if rc == MQS_ENOSPACE:
            raise OSError(
                err,
                f"failed to preallocate a segment of {self._segment_bytes} "
                f"bytes: {os.strerror(err)}; free disk space or lower "
                f"segment_bytes", self.path)
        if rc == MQS_EIO:
            raise OSError(err, f"segment log I/O failed: {os.strerror(err)}",
                          self.path)
        if rc == MQS_ENOMEM:
            raise MemoryError(f"segment log {self.path!r}: out of memory")
        if rc == MQS_EINVAL:
            raise ValueError(f"invalid argument for segment log {self.path!r}")
        raise MqsError(f"segment log {self.path!r}: unexpected status {rc}")

    cdef int _sync(self, int64_t end_offset) except -1:
        cdef int rc
        self._inflight += 1
        try:
            with nogil:
                rc = mqs_seglog_sync(self._log, end_offset)
        finally:
            self._inflight -= 1
        if rc != MQS_OK:
            if rc == MQS_EPOISONED:
                logger.error("sync of segment log %s failed: %s; the log "
                             "takes no more appends", self.path,
                             os.strerror(self._raw_stats().sync_errno or 5))
            self._raise_status(rc)
        return 0

    cdef int64_t _append_entries(self, void *entries, size_t n) except -1:
        cdef mqs_seglog_entry_t *e = <mqs_seglog_entry_t *>entries
        cdef int64_t first = 0
        cdef int rc = mqs_seglog_append(self._log, e, n, &first)
        cdef size_t i
        cdef int64_t max_value
        if rc == MQS_ETOOBIG:
            for i in range(n):
                max_value = mqs_seglog_max_value_bytes(
                    self._segment_bytes, e[i].key_len if e[i].has_key else 0)
                if max_value < 0 or e[i].value_len > max_value:
                    raise MessageTooLarge(
                        f"record value is {e[i].value_len} bytes with a "
                        f"{e[i].key_len}-byte key, but at most "
                        f"{max(max_value, 0)} value bytes fit in a segment "
                        f"of {self._segment_bytes} bytes with that key; "
                        f"raise segment_bytes or split the record")
        if rc != MQS_OK:
            if rc == MQS_EPOISONED:
                logger.error("segment log %s is poisoned by a failed sync; "
                             "append rejected", self.path)
            self._raise_status(rc)
        return first

    # ---- writing ---------------------------------------------------------

    def append(self, data, key=None, timestamp=None):
        """Append one record and return its offset.

        Parameters
        ----------
        data : bytes-like
            The value, copied into the log.
        key : bytes-like or None
            Optional key; ``b""`` is a key, None is none.
        timestamp : int or None
            Nanoseconds since the Unix epoch, 0 or more; None takes the
            wall clock.

        Returns
        -------
        int
            The offset, one more than the previous record's.

        Raises
        ------
        TypeError
            If `data` or `key` is not bytes-like, or `timestamp` not an int.
        MessageTooLarge
            If the record cannot fit in one segment.
        LogPoisoned
            If this or an earlier sync failed.
        io.UnsupportedOperation
            If the log was opened read-only.
        OSError
            If a new segment cannot be created (disk full: errno ENOSPC).

        Notes
        -----
        With ``fsync="always"`` the call returns only after a sync that
        covers the record, releasing the GIL while it waits.
        """
        cdef mqs_seglog_entry_t e
        cdef Py_buffer value_buf, key_buf
        cdef bint value_held = False, key_held = False
        cdef int64_t offset
        if key is None and timestamp is None and PyBytes_CheckExact(data):
            return self.append_bytes(data)
        self._check_writer()
        if PyBytes_CheckExact(data):
            e.value = PyBytes_AS_STRING(data)
            size = PyBytes_GET_SIZE(data)
        else:
            if not PyObject_CheckBuffer(data):
                raise TypeError(
                    f"data must be a bytes-like object, got "
                    f"{type(data).__name__}")
            PyObject_GetBuffer(data, &value_buf, PyBUF_SIMPLE)
            value_held = True
            e.value = value_buf.buf
            size = value_buf.len
        try:
            e.has_key = key is not None
            e.key = NULL
            e.key_len = 0
            if key is not None:
                if not PyObject_CheckBuffer(key):
                    raise TypeError(
                        f"key must be a bytes-like object or None, got "
                        f"{type(key).__name__}")
                PyObject_GetBuffer(key, &key_buf, PyBUF_SIMPLE)
                key_held = True
                e.key = key_buf.buf
                if key_buf.len > 0xFFFFFFFF:
                    raise MessageTooLarge(
                        f"key is {key_buf.len} bytes; max is 4294967295")
                e.key_len = key_buf.len
            if size > 0xFFFFFFFF:
                raise MessageTooLarge(
                    f"record value is {size} bytes; max is 4294967295")
            e.value_len = size
            e.timestamp_ns = _timestamp_ns(timestamp)
            offset = self._append_entries(&e, 1)
        finally:
            if value_held:
                PyBuffer_Release(&value_buf)
            if key_held:
                PyBuffer_Release(&key_buf)
        if self._fsync_mode == MQS_SEGLOG_FSYNC_ALWAYS:
            self._sync(offset + 1)
        return offset

    cdef int64_t append_bytes(self, bytes data) except -1:
        """`append` of a bytes value without key or timestamp, callable
        from Cython without argument parsing (the log broker appends
        three records per message this way)."""
        cdef mqs_seglog_entry_t e
        cdef int64_t offset
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
        self._check_writer()
        if size > 0xFFFFFFFF:
            raise MessageTooLarge(
                f"record value is {size} bytes; max is 4294967295")
        e.value = PyBytes_AS_STRING(data)
        e.value_len = size
        e.has_key = 0
        e.key = NULL
        e.key_len = 0
        e.timestamp_ns = _timestamp_ns(None)
        offset = self._append_entries(&e, 1)
        if self._fsync_mode == MQS_SEGLOG_FSYNC_ALWAYS:
            self._sync(offset + 1)
        return offset

    def append_many(self, items):
        """Append records in one call and return the first offset.

        Parameters
        ----------
        items : iterable
            Values (bytes-like), or ``(key, value)`` tuples. All records
            get one timestamp, the wall clock at the call.

        Returns
        -------
        int
            Offset of the first record; the others follow in order. For
            an empty `items`, the end offset (nothing is appended).

        Raises
        ------
        The exceptions of `append`. Sizes are checked before anything is
        written, so a record too large for a segment appends nothing.

        Notes
        -----
        With ``fsync="always"`` one sync covers the whole batch.
        """
        cdef list batch = items if type(items) is list else list(items)
        cdef size_t n = len(batch)
        cdef size_t i
        cdef mqs_seglog_entry_t *entries
        cdef int64_t now, first
        cdef const uint8_t[::1] value_view
        cdef const uint8_t[::1] key_view
        cdef list keep = []
        self._check_writer()
        if n == 0:
            return self.end_offset
        entries = <mqs_seglog_entry_t *>malloc(n * sizeof(mqs_seglog_entry_t))
        if entries == NULL:
            raise MemoryError(f"cannot allocate a batch of {n} records")
        try:
            now = _wall_ns()
            for i in range(n):
                item = batch[i]
                key = None
                if type(item) is tuple:
                    if len(item) != 2:
                        raise TypeError(
                            f"a tuple item must be (key, value), got a "
                            f"tuple of {len(item)}")
                    key, item = item
                value = _as_bytes(item, "each item")
                keep.append(value)
                value_view = value
                entries[i].value = &value_view[0] if len(value_view) else NULL
                if len(value_view) > 0xFFFFFFFF:
                    raise MessageTooLarge(
                        f"record value is {len(value_view)} bytes; max is "
                        f"4294967295")
                entries[i].value_len = len(value_view)
                entries[i].timestamp_ns = now
                entries[i].has_key = key is not None
                entries[i].key = NULL
                entries[i].key_len = 0
                if key is not None:
                    key = _as_bytes(key, "a key")
                    keep.append(key)
                    key_view = key
                    entries[i].key = &key_view[0] if len(key_view) else NULL
                    entries[i].key_len = len(key_view)
            first = self._append_entries(entries, n)
        finally:
            free(entries)
        if self._fsync_mode == MQS_SEGLOG_FSYNC_ALWAYS:
            self._sync(first + <int64_t>n)
        return first

    def flush(self):
        """Sync every appended record to the device, in any fsync mode.

        Raises
        ------
        LogPoisoned
            If this or an earlier sync failed.
        io.UnsupportedOperation
            If the log was opened read-only.
        """
        self._check_writer()
        if self.readonly:
            self._raise_status(MQS_EREADONLY)
        self._sync(-1)

    def _sync_starts_now(self):
        """Whether a `flush` called now would start its sync without
        waiting for other callers (group commit under "always"): it would
        complete the group that a leader gathers, or lead alone. False
        while a sync runs. A hint, for a caller that has work to do just
        before the sync starts; other threads may call first. False on
        a closed or closing log (the GIL keeps `close` from freeing the
        handle during the call)."""
        if self._closing or self._log == NULL:
            return False
        return mqs_seglog_sync_starts_now(self._log) != 0

    def roll(self):
        """Seal the active segment and start a new one (no-op if empty)."""
        cdef int rc
        self._check_writer()
        rc = mqs_seglog_roll(self._log)
        if rc != MQS_OK:
            self._raise_status(rc)

    def enforce_retention(self):
        """Delete sealed segments past `retention_bytes` or `retention_s`.

        Returns
        -------
        int
            Number of segments deleted.
        """
        cdef int64_t deleted = 0
        cdef int rc
        self._check_writer()
        rc = mqs_seglog_retain(self._log, _wall_ns(), &deleted)
        if rc != MQS_OK:
            self._raise_status(rc)
        if deleted:
            logger.debug("retention deleted %d segments of %s", deleted,
                         self.path)
        return deleted

    def delete_before(self, offset):
        """Delete sealed segments whose every record is below `offset`.

        The active segment (a read-only handle: the last one it knows)
        is kept, so `start_offset` may stay below `offset`. A read-only
        handle only drops its own mappings of such segments, which frees
        their disk space once the writer has deleted them. Views already
        returned keep their segment mapped until released.

        Returns
        -------
        int
            Number of segments deleted (or dropped).

        Raises
        ------
        ValueError
            If `offset` is negative, or the log is closed.
        """
        cdef int64_t deleted = 0
        cdef int rc
        self._check_writer()
        _check_int("offset", offset, 0, INT64_MAX)
        rc = mqs_seglog_retain_below(self._log, offset, &deleted)
        if rc != MQS_OK:
            self._raise_status(rc)
        if deleted:
            # The view cache holds a reference on each segment it has a
            # view of; drop those of deleted segments (every segment,
            # when a read-only handle dropped all it had).
            raw = self._raw_stats()
            start = raw.start_offset if raw.segments else INT64_MAX
            for base in [b for b in self._views if b < start]:
                del self._views[base]
        if deleted and not self.readonly:
            logger.debug("deleted %d segments of %s below offset %d",
                         deleted, self.path, offset)
        return deleted

    def refresh(self):
        """Pick up records and segments a writer added; return end offset.

        Only a read-only handle needs this, and reads past the end call
        it already. A writer handle returns its end offset at once.
        """
        cdef int rc
        self._check_open()
        rc = mqs_seglog_refresh(self._log)
        if rc != MQS_OK:
            self._raise_status(rc)
        return self._raw_stats().end_offset

    # ---- reading ---------------------------------------------------------

    def read(self, offset):
        """Return the value at `offset` as a read-only memoryview.

        The view points into the segment mapping (no copy) and keeps it
        mapped until released.

        Raises
        ------
        OffsetOutOfRange
            If retention removed the offset or it is not written yet.
        LogCorrupted
            If the record fails its checks.
        """
        cdef mqs_seglog_record_t record
        cdef int rc
        self._check_open()
        _check_int("offset", offset, 0, INT64_MAX)
        rc = mqs_seglog_read(self._log, offset, &record)
        if rc != MQS_OK:
            self._raise_status(rc, offset)
        view = self._view_for(record.segment)
        start = record.value - mqs_seglog_segment_data(record.segment, NULL)
        return view[start:start + record.value_len]

    def read_record(self, offset):
        """Return the record at `offset` as a `LogRecord`.

        Raises
        ------
        The exceptions of `read`.
        """
        self._check_open()
        _check_int("offset", offset, 0, INT64_MAX)
        return self._record(offset, False)

    def _record(self, int64_t offset, bint none_at_end):
        cdef mqs_seglog_record_t record
        cdef int rc = mqs_seglog_read(self._log, offset, &record)
        cdef const uint8_t *base
        if rc == MQS_EEMPTY and none_at_end:
            return None
        if rc != MQS_OK:
            self._raise_status(rc, offset)
        view = self._view_for(record.segment)
        base = mqs_seglog_segment_data(record.segment, NULL)
        start = record.value - base
        key = None
        if record.has_key:
            key_start = record.key - base
            key = view[key_start:key_start + record.key_len]
        return LogRecord(record.offset, record.timestamp_ns, key,
                         view[start:start + record.value_len])

    def read_batch(self, offset, max_records=65536):
        """Read up to `max_records` records from `offset` as Arrow.

        Returns
        -------
        pyarrow.RecordBatch
            Columns ``offset`` (int64), ``timestamp`` (int64, nanoseconds
            since the Unix epoch, as in `LogRecord`), ``key``
            (binary_view, null without a key) and ``value``
            (binary_view). Values and keys longer than 12 bytes are not
            copied: their views point into the segment mapping, which
            the batch keeps alive. Empty at the end offset.

        Raises
        ------
        The exceptions of `read`, for the first record.

        Notes
        -----
        A batch stops at the end of a segment, so it may hold fewer than
        `max_records` records while more follow: continue from
        ``offset + batch.num_rows``. It also stops before a record that
        fails its checks; reading that offset then raises.

        The timestamps are plain int64 so that ``to_pylist()`` and
        ``to_pydict()`` work with pyarrow alone: pyarrow turns
        timestamp[ns] values into Python objects only through pandas,
        since `datetime.datetime` stops at microseconds. For an Arrow
        timestamp column, ``batch.column("timestamp").cast(
        pyarrow.timestamp("ns"))`` reinterprets the values without a
        copy.
        """
        cdef int64_t count = 0
        cdef int64_t first
        cdef mqs_segment_t *segment = NULL
        cdef int rc
        cdef uint8_t *validity
        cdef uint64_t size = 0
        cdef const uint8_t *data
        self._check_open()
        _check_int("offset", offset, 0, INT64_MAX)
        _check_int("max_records", max_records, 1, 1 << 24)
        pa = _arrow()
        first = offset
        values = pa.allocate_buffer(16 * max_records)
        keys = pa.allocate_buffer(16 * max_records)
        valid = pa.allocate_buffer((max_records + 7) // 8)
        offsets = pa.allocate_buffer(8 * max_records)
        stamps = pa.allocate_buffer(8 * max_records)
        validity = <uint8_t *><uintptr_t>valid.address
        memset(validity, 0, (max_records + 7) // 8)
        rc = mqs_seglog_read_batch(
            self._log, first, max_records,
            <uint8_t *><uintptr_t>values.address,
            <uint8_t *><uintptr_t>keys.address, validity,
            <int64_t *><uintptr_t>offsets.address,
            <int64_t *><uintptr_t>stamps.address, &count, &segment)
        if rc == MQS_EEMPTY and first == self._raw_stats().end_offset:
            return _empty_batch(pa)
        if rc != MQS_OK:
            self._raise_status(rc, offset)
        data = mqs_seglog_segment_data(segment, &size)
        owner = _segment_buffer(segment)
        mapped = pa.foreign_buffer(<uintptr_t>data, size, base=owner)
        value_col = pa.Array.from_buffers(
            pa.binary_view(), count, [None, values[:16 * count], mapped])
        key_col = pa.Array.from_buffers(
            pa.binary_view(), count,
            [valid[:(count + 7) // 8], keys[:16 * count], mapped],
            null_count=-1)
        offset_col = pa.Array.from_buffers(
            pa.int64(), count, [None, offsets[:8 * count]])
        stamp_col = pa.Array.from_buffers(
            pa.int64(), count, [None, stamps[:8 * count]])
        return pa.RecordBatch.from_arrays(
            [offset_col, stamp_col, key_col, value_col],
            schema=_batch_schema(pa))

    def iter_from(self, offset=None, *, timestamp=None):
        """Iterate over `LogRecord` items from an offset or a timestamp.

        Parameters
        ----------
        offset : int or None
            First offset; None (with no `timestamp`) starts at the first
            retained record.
        timestamp : int or None
            Start at the first record whose timestamp (ns since the
            epoch) is at or after this one.

        Returns
        -------
        iterator of LogRecord
            Stops at the end offset current when each step runs, so
            records appended while iterating are included.

        Raises
        ------
        ValueError
            If both `offset` and `timestamp` are given.
        OffsetOutOfRange, LogCorrupted
            While iterating, as `read` does.
        """
        cdef int64_t start
        cdef int rc
        self._check_open()
        if offset is not None and timestamp is not None:
            raise ValueError(
                f"pass offset or timestamp, not both (got offset={offset!r}, "
                f"timestamp={timestamp!r})")
        if timestamp is not None:
            rc = mqs_seglog_find_time(self._log, _timestamp_ns(timestamp),
                                      &start)
            if rc != MQS_OK:
                self._raise_status(rc)
        elif offset is not None:
            start = _check_int("offset", offset, 0, INT64_MAX)
        else:
            start = self.start_offset
        return _LogIterator(self, start)

    def __iter__(self):
        return self.iter_from()

    def __len__(self):
        """Records retained: ``end_offset - start_offset``.

        On a read-only handle this (like `start_offset` and `end_offset`)
        first picks up what the writer appended or retention deleted.
        """
        stats = self._current_stats()
        return stats.end_offset - stats.start_offset

    # ---- consumer groups -------------------------------------------------

    def commit(self, group, offset):
        """Store `offset` as the committed position of consumer `group`.

        The file is replaced atomically (temporary file, fsync, rename,
        fsync of the directory), so after a crash `committed` returns
        this offset or the previous one. Read-only handles may commit.

        Raises
        ------
        ValueError
            If `group` is not 1-200 of ``A-Z a-z 0-9 . _ -`` (not
            starting with a dot), `offset` is negative or past the end of
            the log (the next offset to be written), or the log is closed.
        """
        cdef mqs_seglog_stats_t s
        self._check_open()
        _check_group(group)
        _check_int("offset", offset, 0, INT64_MAX)
        mqs_seglog_get_stats(self._log, &s)
        if offset > s.end_offset:
            raise ValueError(
                f"offset {offset} is past the end of the log (next offset "
                f"{s.end_offset}); commit the offset after the last record "
                f"read")
        body = _COMMIT_MAGIC + struct.pack("<q", offset)
        data = _COMMIT_FORMAT.pack(_COMMIT_MAGIC, offset, _crc32c(body))
        fd, temp = tempfile.mkstemp(prefix=f".consumer-{group}.",
                                    suffix=".tmp", dir=self.path)
        try:
            os.write(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(temp)
            raise
        os.close(fd)
        os.replace(temp, os.path.join(self.path, f"consumer-{group}.offset"))
        dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def committed(self, group):
        """Return the offset committed for `group`, or None if none was.

        Raises
        ------
        LogCorrupted
            If the stored offset fails its CRC check.
        """
        _check_group(group)
        name = os.path.join(self.path, f"consumer-{group}.offset")
        try:
            with open(name, "rb") as f:
                data = f.read(_COMMIT_FORMAT.size + 1)
        except FileNotFoundError:
            return None
        if len(data) == _COMMIT_FORMAT.size:
            magic, offset, crc = _COMMIT_FORMAT.unpack(data)
            if magic == _COMMIT_MAGIC and crc == _crc32c(data[:16]):
                return offset
        raise LogCorrupted(
            f"committed offset file {name!r} failed its CRC check; "
            f"commit the group's offset again to replace it", None, name)

    # ---- state -----------------------------------------------------------

    def stats(self):
        """Return a `mqs.metrics.SegmentLogStats` snapshot.

        Offsets and counters come from the log's state in this process;
        `committed` is read from the consumer offset files of the
        directory, and `records_dropped` from the recovery on open.
        """
        raw = self._raw_stats()._asdict()
        # The group commit's counts stay in `_raw_stats`.
        del raw["syncs_taken_over"], raw["gather_timeouts"]
        return SegmentLogStats(
            path=self.path, **raw,
            records_dropped=self._recovery.records_dropped,
            committed=types.MappingProxyType(self._committed_offsets()))

    def _current_stats(self):
        """`_raw_stats`, after a refresh on a read-only handle."""
        cdef int rc
        self._check_open()
        if self.readonly:
            rc = mqs_seglog_refresh(self._log)
            if rc != MQS_OK:
                self._raise_status(rc)
        return self._raw_stats()

    def _raw_stats(self):
        cdef mqs_seglog_stats_t s
        self._check_open()
        mqs_seglog_get_stats(self._log, &s)
        return _RawStats(
            s.start_offset, s.end_offset, s.synced_offset, s.segments,
            s.bytes, s.appended_records, s.syncs, s.sync_errno,
            s.segments_deleted, s.records_deleted, s.syncs_taken_over,
            s.gather_timeouts)

    def _committed_offsets(self):
        """Return {group: committed offset} of every consumer group.

        A group whose offset file fails its CRC check is left out (and
        logged); `committed(group)` raises for it.
        """
        offsets = {}
        for entry in sorted(os.listdir(self.path)):
            match = _COMMIT_FILE.fullmatch(entry)
            if match is None:
                continue
            group = match.group(1)
            try:
                offset = self.committed(group)
            except LogCorrupted:
                logger.warning("segment log %s: offset file of group %r "
                               "failed its CRC check", self.path, group)
                continue
            if offset is not None:
                offsets[group] = offset
        return offsets

    @property
    def start_offset(self):
        """First retained offset."""
        return self._current_stats().start_offset

    @property
    def end_offset(self):
        """Offset the next append gets (one past the last record)."""
        return self._current_stats().end_offset

    @property
    def synced_offset(self):
        """Every offset below this one has been synced."""
        return self._raw_stats().synced_offset

    @property
    def recovery(self):
        """`RecoveryReport` of what recovery found and repaired on open.

        `ended_before_checkpoint` is true when the records of the last
        segment ended before the end recorded at the last clean close;
        `first_bad_offset` then gives the offset where they end.
        `records_skipped` counts the offsets of damaged records that
        recovery skipped to reach that end (in `damaged_ranges` runs,
        the first at `first_skipped_offset`): reading them raises
        `LogCorrupted`, and the records after them stay readable.
        """
        return self._recovery

    @property
    def fsync(self):
        """The durability mode: "always", "interval" or "never"."""
        return _FSYNC_NAMES[self._fsync_mode]

    @property
    def segment_bytes(self):
        """Size of new segment files in bytes."""
        return self._segment_bytes

    @property
    def closed(self):
        """True after `close`."""
        return self._log == NULL

    def _set_sync_hook(self, hook):
        """Test hook: call ``hook(end_offset, phase)`` around every sync.

        Phase 0 runs before the I/O; a non-zero int return fails the sync
        with that errno. Phase 1 runs after a successful sync. None
        removes the hook.
        """
        self._check_open()
        self._sync_hook = hook
        with nogil:
            if hook is None:
                mqs_seglog_set_sync_hook(self._log, NULL, NULL)
            else:
                mqs_seglog_set_sync_hook(self._log, _sync_hook_trampoline,
                                         <void *>self)

    def close(self):
        """Sync (unless fsync="never"), write the checkpoint and unlock.

        The checkpoint records where the records end, so the next open
        keeps the records after a damaged one (see the class Notes).
        Idempotent: the handle is closed even when this raises, and a
        second call does nothing. Views into the log stay valid. The
        close waits for the syncs already running. Calls by other threads
        that start meanwhile wait for the close, then raise ValueError.

        Raises
        ------
        LogPoisoned
            If the final sync failed: records since the last successful
            sync may be lost.
        RecoveryPointError
            If writing the checkpoint failed. The records stay readable,
            and the next open checks the CRCs of the records the last
            checkpoint written does not cover.
        """
        cdef mqs_seglog_t *log = self._log
        cdef int os_errno = 0
        cdef int rc
        if log == NULL:
            return
        if self._forked():
            # No sync, checkpoint or unlock: those belong to the parent.
            self._abandon_after_fork()
            return
        if self._closing:
            # Another thread's close owns `log`: a second close of it
            # would free it twice.
            while self._log != NULL:
                time.sleep(0.001)
            return
        # New calls wait from here on (see `_check_open`). Otherwise
        # threads that keep calling flush or append keep a sync in
        # flight at every check below, and close never returns.
        self._closing = True
        while self._inflight:
            time.sleep(0.001)
        self._log = NULL
        with nogil:
            rc = mqs_seglog_close_errno(log, &os_errno)
        self._views = {}
        if rc != MQS_OK:
            raise _close_error(rc, os_errno, self.path)

    def _abandon_after_fork(self):
        """Drop a handle inherited through fork without touching the log.

        For a forked child only: no sync, no checkpoint, and the parent's
        writer lock stays held (the child closes only its own copy of
        the lock file descriptor). Views taken before the fork stay
        valid.
        """
        cdef mqs_seglog_t *log = self._log
        if log == NULL:
            return
        self._log = NULL
        self._inflight = 0
        mqs_seglog_abandon(log)

    def __enter__(self):
        self._check_open()
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        if self._log == NULL:
            return f"<mqs.SegmentLog {self.path!r} closed>"
        stats = self._raw_stats()
        return (f"<mqs.SegmentLog {self.path!r} fsync={self.fsync!r} "
                f"offsets={stats.start_offset}..{stats.end_offset}"
                f"{' readonly' if self.readonly else ''}>")


@cython.final
@cython.auto_pickle(False)
cdef class _LogIterator:
    cdef SegmentLog _log
    cdef int64_t _next

    def __cinit__(self, SegmentLog log, int64_t start):
        self._log = log
        self._next = start

    def __iter__(self):
        return self

    def __next__(self):
        self._log._check_open()
        record = self._log._record(self._next, True)
        if record is None:
            raise StopIteration
        self._next += 1
        return record


cdef int64_t _timestamp_ns(object timestamp) except? -1:
    if timestamp is None:
        return _wall_ns()
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        raise TypeError(
            f"timestamp must be an int of nanoseconds since the epoch or "
            f"None, got {type(timestamp).__name__} {timestamp!r}")
    # A segment header stores INT64_MIN as its max timestamp when it has
    # no records, so negative timestamps are rejected.
    if not 0 <= timestamp < 2**63:
        raise ValueError(
            f"timestamp must be 0 to 2**63 - 1 nanoseconds since the epoch, "
            f"got {timestamp!r}")
    return timestamp


def _check_group(group):
    if not isinstance(group, str):
        raise TypeError(
            f"group must be a str, got {type(group).__name__} {group!r}")
    if not _GROUP_NAME.fullmatch(group):
        raise ValueError(
            f"group must be 1 to 200 of A-Z a-z 0-9 . _ - and not start "
            f"with a dot, got {group!r}")


def _batch_schema(pa):
    return pa.schema([
        ("offset", pa.int64()),
        ("timestamp", pa.int64()),
        ("key", pa.binary_view()),
        ("value", pa.binary_view()),
    ])


def _empty_batch(pa):
    schema = _batch_schema(pa)
    return pa.RecordBatch.from_arrays(
        [pa.array([], type=f.type) for f in schema], schema=schema)


def _raise_open_error(int rc, int os_errno, str path, segment_bytes):
    if rc == MQS_ELOCKED:
        raise LogLocked(
            _errno.EAGAIN,
            "another writer holds the lock of this log (an open SegmentLog "
            "in this or another process); close it, or open this one "
            "with readonly=True to read while it writes",
            os.path.join(path, "lock"))
    if rc == MQS_ELOGVERSION:
        raise LogVersionError(
            f"segment log {path!r} has segments of a format version newer "
            f"than {MQS_SEGLOG_VERSION}; upgrade mqs to open it")
    if rc == MQS_ECORRUPT:
        raise LogCorrupted(
            f"a segment header in {path!r} failed its magic, CRC or size "
            f"check; move the damaged .seg file away to open the rest",
            None, path)
    if rc == MQS_ENOSPACE:
        raise OSError(
            os_errno,
            f"failed to preallocate a segment of {segment_bytes} bytes: "
            f"{os.strerror(os_errno)}; free disk space or lower "
            f"segment_bytes", path)
    if rc == MQS_ENOMEM:
        raise MemoryError(f"out of memory opening segment log {path!r}")
    if rc == MQS_EIO:
        raise OSError(
            os_errno,
            f"failed to open segment log: {os.strerror(os_errno)}", path)
    raise ValueError(f"invalid configuration for segment log {path!r}")


def _close_error(int rc, int os_errno, str path):
    """Return the exception for a failed mqs_seglog_close."""
    err = os_errno or _errno.EIO
    if rc == MQS_EPOISONED:
        return LogPoisoned(
            err,
            f"the final sync of this log failed ({os.strerror(err)}); "
            f"records since the last successful sync may be lost", path)
    if rc == MQS_EIO:
        return RecoveryPointError(
            err,
            f"failed to write the recovery point of segment log {path!r} "
            f"at close ({os.strerror(err)}). The records are intact, and "
            f"the next open checks the CRCs of the records after the last "
            f"recovery point written", os.path.join(path, "recovery-point"))
    return MqsError(f"segment log {path!r}: unexpected status {rc} "
                    f"from close")


def _log_recovery(path, report):
    if report.temp_files_removed:
        logger.debug("removed %d half-created segment files from %s",
                     report.temp_files_removed, path)
    if report.records_skipped or report.damaged_ranges:
        logger.warning(
            "segment log %s: skipped %d damaged record(s) in %d range(s) "
            "below the end recorded at its last clean close, from offset "
            "%d (segment %020d, position %d); reading those offsets raises "
            "LogCorrupted, and the records after them are kept",
            path, report.records_skipped, report.damaged_ranges,
            report.first_skipped_offset, report.first_skipped_segment,
            report.first_skipped_position)
    if report.ended_before_checkpoint:
        logger.warning(
            "segment log %s: records end at offset %d (segment %020d, "
            "position %d), before the end recorded at its last clean "
            "close; the record there is damaged or missing",
            path, report.first_bad_offset, report.first_bad_segment,
            report.first_bad_position)
    if not report.torn_segments:
        return
    logger.warning(
        "recovered segment log %s: zeroed %d bytes in %d segment(s) from "
        "offset %d (segment %020d, position %d); %d record(s) dropped",
        path, report.bytes_zeroed, report.torn_segments,
        report.first_bad_offset, report.first_bad_segment,
        report.first_bad_position, report.records_dropped)
