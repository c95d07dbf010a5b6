# The section of the shm and log brokers, for the per-message paths of
# `mqs._topiccore` (`LoggedPath`), which run it from C.

cdef class JournalSection:
    cdef object _backend
    cdef dict _state
    cdef readonly object thread_lock
    cdef object _acquire
    cdef object _release

    cdef int enter_section(self) except -1
    cdef int leave_section(self) except -1
    cdef int _enter(self) except -1
    cdef int _leave(self) except -1
    cdef int _append_record(self, bytes data) except -1
    cdef object _reserve(self, op, bytes data)
    cdef int log_record(self, str op, tuple args) except -1
    cdef double _tick(self) except? -1.0
