from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t


cdef extern from "mqs_wheel.h" nogil:
    int MQS_WHEEL_LEVELS
    int MQS_WHEEL_SLOTS
    int MQS_WHEEL_DUE
    int MQS_WHEEL_OVERFLOW
    int MQS_WHEEL_LISTS
    int MQS_WHEEL_FREE
    uint32_t MQS_WHEEL_NIL
    uint32_t MQS_WHEEL_MAX_CAPACITY
    int MQS_WHEEL_ENTRY_BYTES
    int MQS_WHEEL_HEADER_BYTES

    ctypedef struct mqs_wheel_entry_t:
        int64_t deadline_ns
        uint64_t payload
        uint32_t next
        uint32_t prev
        uint32_t generation
        uint16_t list

    ctypedef struct mqs_wheel_t:
        uint32_t capacity
        uint32_t count
        uint32_t free_head
        int64_t tick_ns
        int64_t origin_ns
        int64_t now_ns
        uint64_t now_tick

    size_t mqs_wheel_size_bytes(uint32_t capacity)
    int64_t mqs_wheel_add_ns(int64_t a, int64_t b)
    uint32_t mqs_wheel_count(const mqs_wheel_t *w)
    uint32_t mqs_wheel_next_index(const mqs_wheel_t *w)
    uint32_t mqs_wheel_handle_index(uint64_t handle)
    int mqs_wheel_init(mqs_wheel_t *w, size_t size_bytes, int64_t tick_ns,
                       int64_t start_ns)
    int mqs_wheel_grow(mqs_wheel_t *w, size_t size_bytes)
    int mqs_wheel_insert(mqs_wheel_t *w, int64_t deadline_ns,
                         uint64_t payload, uint64_t *handle)
    int mqs_wheel_cancel(mqs_wheel_t *w, uint64_t handle, uint64_t *payload)
    int mqs_wheel_advance(mqs_wheel_t *w, int64_t now_ns, uint64_t *payloads,
                          size_t max_fired, size_t *n_fired)
    int mqs_wheel_next_deadline(const mqs_wheel_t *w, int64_t *deadline_ns)
    size_t mqs_wheel_drain(mqs_wheel_t *w, uint64_t *payloads,
                           size_t max_payloads)
    int mqs_wheel_check(const mqs_wheel_t *w)
