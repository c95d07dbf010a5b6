from libc.stdint cimport int64_t, uint8_t, uint64_t

from mqs.includes.mqs_seglog cimport mqs_seglog_t, mqs_segment_t


cdef class _SegmentBuffer:
    cdef mqs_segment_t *_segment
    cdef const uint8_t *_data
    cdef uint64_t _size


cdef class SegmentLog:
    cdef mqs_seglog_t *_log
    cdef readonly object path
    cdef readonly bint readonly
    cdef int _fsync_mode
    cdef uint64_t _segment_bytes
    cdef dict _views
    cdef int _inflight
    cdef bint _closing
    cdef object _sync_hook
    cdef object _recovery
    cdef object __weakref__
    cdef unsigned long _fork_generation
    cdef long _opener_pid

    cdef int _check_open(self) except -1
    cdef int _check_writer(self) except -1
    cdef bint _forked(self)
    cdef object _view_for(self, mqs_segment_t *segment)
    cdef int _raise_status(self, int rc, object offset=*) except -1
    cdef int _sync(self, int64_t end_offset) except -1
    cdef int64_t _append_entries(self, void *entries, size_t n) except -1
    cdef int64_t append_bytes(self, bytes data) except -1
