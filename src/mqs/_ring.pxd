from mqs.includes.mqs_ring cimport mqs_ring_t


cdef class RingBuffer:
    cdef mqs_ring_t *_ring
    cdef bint _broadcast
    cdef object __weakref__

    cdef int _check_consumer(self, object index, object kind,
                             int limit) except -1
