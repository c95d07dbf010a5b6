from libc.stdint cimport int64_t


cdef extern from "mqs_atomic.h" nogil:
    ctypedef enum mqs_status_t:
        MQS_OK
        MQS_EFULL
        MQS_EEMPTY
        MQS_EINVAL
        MQS_ENOMEM
        MQS_ETIMEDOUT
        MQS_EINTR
        MQS_ECORRUPT
        MQS_ETOOBIG
        MQS_ECLOSED

    int MQS_CACHE_LINE
    int MQS_PAD_BYTES

    void mqs_cpu_relax()
