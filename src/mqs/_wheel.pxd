from libc.stdint cimport int64_t, uint32_t

from mqs.includes.mqs_wheel cimport mqs_wheel_t


cdef class TimingWheel:
    cdef mqs_wheel_t *_wheel
    # Item of each slab entry, indexed by slab index (the C payload);
    # None for free entries. A list, so the garbage collector sees the
    # items and can break cycles through them.
    cdef list _items
    cdef object _clock

    cdef int64_t _now_ns(self) except? -1
    cdef int _reserve(self, Py_ssize_t extra) except -1
    cdef object _insert(self, int64_t deadline_ns, object item)
    cdef list _advance_ns(self, int64_t now_ns)
    cdef int64_t _next_deadline_ns(self) noexcept
