# cython: language_level=3, embedsignature=True, binding=False
"""`TopicCore`: the hot state of one broker topic in a shared mapping.

A thin wrapper of `csrc/mqs_topiccore.h`: a /dev/shm file that every
process of one broker maps, holding one topic's messages, lanes,
in-flight table, deadlines and counters as C data under a robust
process-shared mutex. Each method takes the mutex, runs one operation
in C and releases it, so every process sees the same state without
replaying anything. `now` arguments are monotonic seconds; None reads
CLOCK_MONOTONIC.

Tags are ``(slot, ticket)`` pairs: a slot is reused after every group
settled its message, and the ticket of a (group, slot) entry only grows,
so a stale tag never matches a later delivery.
"""

from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

from mqs.includes.mqs_atomic cimport (
    MQS_ECLOSED,
    MQS_EFULL,
    MQS_EINTR,
    MQS_EINVAL,
    MQS_ETIMEDOUT,
    MQS_ETOOBIG,
    MQS_OK,
)
from mqs.includes.mqs_topiccore cimport (
    MQS_TC_COUNTERS,
    MQS_TC_DEAD,
    MQS_TC_GROUP_COUNTERS,
    MQS_TC_IN_FLIGHT,
    MQS_TC_NAME_BYTES,
    MQS_TC_READY,
    MQS_TC_ELIMIT,
    MQS_TC_EVERSION,
    MQS_TC_VERSION,
    mqs_tc_entry,
    mqs_tc_entry_t,
    mqs_tc_group_t,
    mqs_tc_slot,
    mqs_tc_slot_t,
    mqs_tc_ack,
    mqs_tc_advance,
    mqs_tc_changed,
    mqs_tc_close_consumer,
    mqs_tc_consumer,
    mqs_tc_dead_t,
    mqs_tc_delivery_t,
    mqs_tc_drop_dead,
    mqs_tc_extend,
    mqs_tc_fetch,
    mqs_tc_may_fetch,
    mqs_tc_find_group,
    mqs_tc_format,
    mqs_tc_group,
    mqs_tc_header_t,
    mqs_tc_layout_bytes,
    mqs_tc_lock,
    mqs_tc_nack,
    mqs_tc_next_dead,
    mqs_tc_oldest_ready,
    mqs_tc_open_consumer,
    mqs_tc_open_group,
    mqs_tc_params_t,
    mqs_tc_publish,
    mqs_tc_release,
    mqs_tc_set_group_attempts,
    mqs_tc_stats,
    mqs_tc_stats_t,
    mqs_tc_unlock,
    mqs_tc_validate,
    mqs_tc_version,
)
from mqs.includes.mqs_hist cimport MQS_HIST_BUCKETS, mqs_hist_t
from mqs.includes.mqs_journal cimport MQS_JOURNAL_DURABLE

# The import functions, declared here rather than in
# mqs/includes/mqs_topiccore.pxd because only this module calls them.
cdef extern from "mqs_topiccore.h" nogil:
    int64_t mqs_tc_import_group(mqs_tc_header_t *h, const char *name,
                                uint32_t name_length, uint32_t max_attempts,
                                const int64_t *counters)
    int64_t mqs_tc_import_message(mqs_tc_header_t *h, uint64_t seq,
                                  const void *body, uint32_t length,
                                  uint32_t priority, double timestamp,
                                  int retained)
    int mqs_tc_import_entry(mqs_tc_header_t *h, uint32_t group,
                            uint32_t slot, uint32_t state, uint32_t reason,
                            uint64_t attempts, double now)
    int mqs_tc_import_finish(mqs_tc_header_t *h, uint64_t next_seq,
                             const int64_t *counters,
                             uint64_t *unneeded_seq)
from mqs.includes.mqs_wait cimport (
    mqs_monotonic_ns,
    mqs_wait_epoch,
    mqs_wait_finish,
    mqs_wait_park,
    mqs_wait_park_awake,
    mqs_wait_prepare,
    mqs_wait_signal,
    mqs_wait_sleep,
    mqs_waitword_t,
)

import os
import pickle
import secrets

from mqs.errors import (
    AlreadySettled,
    LayoutVersionError,
    MessageDetached,
    ShutDown,
)

include "_mapped_file.pxi"

__all__ = ["TopicCore", "TopicCoreLayoutError", "TopicCoreVersionError",
           "TopicRetired", "LAYOUT_VERSION",
           "COUNTER_NAMES", "GROUP_COUNTER_NAMES", "DEAD_REASONS",
           "ENTRY_READY", "ENTRY_IN_FLIGHT", "ENTRY_DEAD", "PAYLOAD_EXTRAS",
           "PAYLOAD_BYTES", "LIMIT", "GROUP_NAME_BYTES", "TopicCoreFull",
           "decode_payload", "fork_count", "MessageBase", "CorePath",
           "CoreReader", "LoggedPath"]

# The order of the topic's counters in the header (mqs_topiccore.h).
COUNTER_NAMES = ("published", "delivered", "acked", "nacked", "redelivered",
                 "late_acks", "dead_lettered", "dead_lettered.rejected",
                 "dead_lettered.max_attempts", "dead_lettered.ack_timeout",
                 "dropped_unsubscribed", "recoveries")
GROUP_COUNTER_NAMES = ("delivered", "acked", "nacked", "redelivered",
                       "dead_lettered", "errors")
# Entry states in `retire_and_export` and `export_image`.
ENTRY_READY = MQS_TC_READY
ENTRY_IN_FLIGHT = MQS_TC_IN_FLIGHT
ENTRY_DEAD = MQS_TC_DEAD
# The maximum length of a group name in a topic core, in UTF-8 bytes.
GROUP_NAME_BYTES = MQS_TC_NAME_BYTES
# Dead reasons by their code.
DEAD_REASONS = (None, "rejected", "max_attempts", "ack_timeout")
# `TopicCore.publish`: the topic stores `max_stored` messages already.
LIMIT = -4

# A lock wait returns to Python this often, so that Ctrl-C gets through.
DEF SLICE_NS = 50000000
DEF FETCH_BATCH = 256


class TopicCoreLayoutError(ValueError):
    """Raised when a /dev/shm file is not a topic core of this layout."""


class TopicCoreVersionError(TopicCoreLayoutError, LayoutVersionError):
    """Raised when a topic core file has another layout version than
    `LAYOUT_VERSION`."""


# The layout version of the topic core files this mqs creates and reads.
LAYOUT_VERSION = MQS_TC_VERSION


class TopicCoreFull(OSError):
    """Raised when a topic core has no free group or consumer entry left;
    the caller can move the topic to a store without that limit."""


class TopicRetired(Exception):
    """Raised by every operation once `retire_and_export` moved the topic
    out of the core; the caller goes on with the exported state."""


# First byte of a payload that carries headers, reply_to or
# correlation_id besides the body: the pickle of ``(pickled body, headers,
# reply_to, correlation_id)`` follows it. A plain pickle starts with 0x80.
PAYLOAD_EXTRAS = 0
# First byte of a payload whose body is a `bytes` object (not a subclass),
# stored as it is after this byte: no pickle on either side.
PAYLOAD_BYTES = 1

# Bound once: `publish_pickled` and `fetch_one` run per message.
cdef object _dumps = pickle.dumps
cdef object _loads = pickle.loads
cdef object _PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL


cdef inline double _wall_clock():
    """Return `time.time()`: CLOCK_REALTIME in seconds."""
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return ts.tv_sec + ts.tv_nsec / 1e9


cdef inline double _now(object now):
    if now is None:
        return mqs_monotonic_ns() / 1e9
    return <double>now


def decode_payload(bytes payload):
    """Return the body, headers, reply_to and correlation_id of a core
    payload (a pickle, or one that starts with `PAYLOAD_EXTRAS` or
    `PAYLOAD_BYTES`). Without extras, headers is a new empty dict and
    the other two are None."""
    return _decode_payload(payload)


cdef tuple _decode_payload(bytes payload):
    # Unpickling runs arbitrary code, so callers never hold the mutex.
    cdef Py_ssize_t length = len(payload)
    cdef unsigned char *data = <unsigned char *>PyBytes_AS_STRING(payload)
    if length and data[0] == PAYLOAD_BYTES:
        return (PyBytes_FromStringAndSize(<char *>data + 1, length - 1), {},
                None, None)
    if length and data[0] == PAYLOAD_EXTRAS:
        body, headers, reply_to, correlation_id = _loads(
            memoryview(payload)[1:])
        return _loads(body), headers, reply_to, correlation_id
    return _loads(payload), {}, None, None


cdef int _set_histogram(mqs_hist_t *hist, tuple state) except -1:
    """Load the state that `_histogram` returns into `hist`."""
    counts, count, sum_ns, max_ns = state
    for index, value in counts.items():
        if not 0 <= index < MQS_HIST_BUCKETS:
            raise ValueError(f"histogram bucket {index!r} is out of range "
                             f"0..{MQS_HIST_BUCKETS - 1}")
    for index in range(MQS_HIST_BUCKETS):
        hist.buckets[index] = counts.get(index, 0)
    hist.count = count
    hist.sum_ns = sum_ns
    hist.max_ns = max_ns
    return 0


cdef tuple _histogram(mqs_hist_t *hist):
    """Return a histogram as the state of a `mqs.metrics.LogLinearHistogram`
    (sparse bucket counts, count, sum_ns, max_ns)."""
    counts = {index: hist.buckets[index] for index in range(MQS_HIST_BUCKETS)
              if hist.buckets[index]}
    return (counts, hist.count, hist.sum_ns, hist.max_ns)


def _first(item):
    return item[0]


# The largest attempts count an entry word holds (bits 16-63).
_MAX_ENTRY_ATTEMPTS = (1 << 48) - 1
_STATE_NAMES = {MQS_TC_READY: "ready", MQS_TC_IN_FLIGHT: "in flight",
                MQS_TC_DEAD: "dead"}


def _image_int(value, str what, low, high):
    """Return `value` as an int in low..high, else raise ValueError
    naming `what`."""
    if isinstance(value, float) or not hasattr(value, "__index__"):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    number = value.__index__()
    if not low <= number <= high:
        raise ValueError(f"{what} must be {low} to {high}, got {number}")
    return number


def _image_tuple(item, names, str what):
    """Return `item` as a tuple of len(names) fields, else raise
    ValueError naming `what`."""
    fields = tuple(item) if isinstance(item, (tuple, list)) else None
    if fields is None or len(fields) != len(names):
        raise ValueError(f"{what} must be a tuple ({', '.join(names)}), got "
                         f"{item!r}")
    return fields


def _image_counters(counters, names, str what):
    """Return the values of a counters dict of an image in `names`
    order."""
    if not isinstance(counters, dict):
        raise ValueError(f"{what} must be a dict of counters, got "
                         f"{counters!r}")
    for name in counters:
        if name not in names:
            raise ValueError(f"{what} has the unknown counter {name!r}; "
                             f"known: {', '.join(names)}")
    values = []
    for name in names:
        if name not in counters:
            raise ValueError(f"{what} has no counter {name!r}")
        values.append(_image_int(counters[name], f"{what}[{name!r}]",
                                 -(1 << 63), (1 << 63) - 1))
    return values


def _check_image(image, str path, uint32_t capacity, uint32_t slot_bytes,
                 uint32_t max_groups):
    """Validate an image for `TopicCore.import_image`; return it as
    ``(next_seq, counters, messages, groups)`` with plain values, the
    group names encoded and the counters as lists."""
    if not isinstance(image, dict):
        raise ValueError(f"an image is a dict from TopicCore.export_image, "
                         f"got {type(image).__name__}")
    for key in ("next_seq", "counters", "messages", "groups"):
        if key not in image:
            raise ValueError(f"the image has no {key!r} key")
    next_seq = _image_int(image["next_seq"], "next_seq", 0, (1 << 64) - 1)
    counters = _image_counters(image["counters"], COUNTER_NAMES, "counters")
    groups_in = list(image["groups"])
    messages_in = list(image["messages"])
    if len(groups_in) > max_groups:
        raise ValueError(f"the image has {len(groups_in)} groups, more than "
                         f"the {max_groups} of topic core {path}")
    if len(messages_in) > capacity:
        raise ValueError(f"the image has {len(messages_in)} messages, more "
                         f"than the capacity {capacity} of topic core "
                         f"{path}")

    messages = []
    last = 0
    for item in messages_in:
        seq, priority, timestamp, retained, payload = _image_tuple(
            item, ("seq", "priority", "timestamp", "retained", "payload"),
            "a message")
        seq = _image_int(seq, "a message seq", 1, (1 << 64) - 1)
        if seq <= last:
            raise ValueError(f"message seqs must be strictly ascending, got "
                             f"{seq} after {last}")
        last = seq
        priority = _image_int(priority, f"the priority of message {seq}",
                              0, 9)
        if not isinstance(timestamp, (int, float)):
            raise ValueError(f"the timestamp of message {seq} must be a "
                             f"number, got {timestamp!r}")
        if not isinstance(payload, bytes):
            raise ValueError(f"the payload of message {seq} must be bytes, "
                             f"got {type(payload).__name__}")
        if len(payload) > slot_bytes:
            raise ValueError(
                f"a body of {len(payload)} bytes is larger than the "
                f"{slot_bytes} bytes of a topic core slot (message {seq})")
        if retained and groups_in:
            raise ValueError(
                f"message {seq} is retained, but the image has groups: a "
                f"core keeps messages for its first group only while it "
                f"has no group")
        messages.append((seq, priority, float(timestamp), bool(retained),
                         payload))

    known = {message[0] for message in messages}
    needed = set()
    names = set()
    groups = []
    for item in groups_in:
        name, max_attempts, group_counters, entries_in = _image_tuple(
            item, ("name", "max_attempts", "counters", "entries"), "a group")
        if not isinstance(name, str):
            raise ValueError(f"a group name must be a str, got {name!r}")
        encoded = name.encode()
        if not 0 < len(encoded) <= MQS_TC_NAME_BYTES:
            raise ValueError(f"group names of a topic core are 1 to "
                             f"{MQS_TC_NAME_BYTES} bytes, got {name!r}")
        if encoded in names:
            raise ValueError(f"the image lists group {name!r} twice")
        names.add(encoded)
        max_attempts = _image_int(max_attempts,
                                  f"max_attempts of group {name!r}", 0,
                                  (1 << 32) - 1)
        group_values = _image_counters(group_counters, GROUP_COUNTER_NAMES,
                                       f"the counters of group {name!r}")
        entries = []
        seen = set()
        for entry in entries_in:
            seq, state, reason, attempts = _image_tuple(
                entry, ("seq", "state", "reason", "attempts"),
                f"an entry of group {name!r}")
            if seq not in known:
                raise ValueError(f"group {name!r} has an entry for seq "
                                 f"{seq!r}, which is not among the image's "
                                 f"messages")
            if seq in seen:
                raise ValueError(f"group {name!r} lists its entry for seq "
                                 f"{seq} twice")
            seen.add(seq)
            state = _image_int(state, f"the state of the entry for seq "
                               f"{seq} in group {name!r}", MQS_TC_READY,
                               MQS_TC_DEAD)
            reason = _image_int(
                reason, f"the dead reason of the entry for seq {seq} in "
                f"group {name!r} ({_STATE_NAMES[state]})", 0,
                len(DEAD_REASONS) - 1 if state == MQS_TC_DEAD else 0)
            attempts = _image_int(attempts, f"the attempts of the entry for "
                                  f"seq {seq} in group {name!r}", 0,
                                  _MAX_ENTRY_ATTEMPTS)
            entries.append((seq, state, reason, attempts))
        needed |= seen
        groups.append((encoded, max_attempts, group_values, entries))

    for seq, _, _, retained, _ in messages:
        if not retained and seq not in needed:
            raise ValueError(f"message {seq} has no entry in any group and "
                             f"is not retained, so a core would not keep "
                             f"it")
    return next_seq, counters, messages, groups


cdef class TopicCore(_MappedFile):
    """The mapped topic core file at `path`, created if missing.

    Parameters
    ----------
    path : str
        File under /dev/shm, created with mode 0600.
    lanes : sequence of (priority, weight)
        Lanes highest priority first, as `TopicConfig.lanes` orders them.
    strict : bool
        Strict priority instead of weighted lanes.
    capacity : int
        Messages stored at once (publish returns -1 beyond).
    slot_bytes : int
        Largest body.
    max_groups, max_consumers : int
        Groups and open consumers at once.
    max_attempts : int or None
        The topic's default limit of deliveries.
    sample_every : int or None
        Record the latencies of one delivery in this many per group (None:
        none).

    The sizes apply when this call creates the file; an existing file
    keeps its own.
    """

    cdef mqs_tc_header_t *_header
    cdef mqs_tc_delivery_t *_out
    # Waiters of this handle registered by `wait_prepare`, and whether
    # `close` waits for them to leave before it unmaps.
    cdef Py_ssize_t _waiters
    cdef bint _close_pending
    # The bound a new file gets (see `max_stored`).
    cdef uint64_t _max_stored
    # Publishes of this process that did not signal the change word
    # (`LoggedPath`), and how many of them a signal has covered.
    cdef uint64_t _quiet_published
    cdef uint64_t _quiet_signaled

    def __cinit__(self, *args, **kwargs):
        self._header = NULL
        self._out = <mqs_tc_delivery_t *>malloc(
            sizeof(mqs_tc_delivery_t) * FETCH_BATCH)
        if self._out == NULL:
            raise MemoryError()

    def __init__(self, str path, lanes, bint strict=False,
                 uint32_t capacity=65536, uint32_t slot_bytes=256,
                 uint32_t max_groups=16, uint32_t max_consumers=256,
                 max_attempts=None, sample_every=None,
                 uint64_t max_stored=0):
        cdef mqs_tc_params_t params
        cdef uint64_t size
        memset(&params, 0, sizeof(params))
        lanes = list(lanes)
        if not 1 <= len(lanes) <= 10:
            raise ValueError(f"a topic core has 1 to 10 lanes, got "
                             f"{len(lanes)}")
        params.capacity = capacity
        params.slot_bytes = slot_bytes
        params.max_groups = max_groups
        params.max_consumers = max_consumers
        params.lane_count = len(lanes)
        for index, (priority, weight) in enumerate(lanes):
            params.lanes[index] = priority
            params.weights[index] = weight
        params.strict = strict
        params.max_attempts = 0 if max_attempts is None else max_attempts
        params.sample_every = 0 if sample_every is None else sample_every
        size = mqs_tc_layout_bytes(&params)
        if size == 0:
            raise ValueError(
                f"invalid topic core sizes: capacity {capacity} (1 to "
                f"2**24), slot_bytes {slot_bytes} (1 to 2**20), max_groups "
                f"{max_groups} (1 to 64), max_consumers {max_consumers} (1 "
                f"to 4096), lanes {lanes!r} (priorities 0-9 highest first, "
                f"weights of 1 or more)")
        self._max_stored = max_stored
        self._min_file_bytes = sizeof(mqs_tc_header_t)
        self._kind = "a topic core"
        self._layout_error = TopicCoreLayoutError
        self._open(path, size, &params)

    cdef int _mapped(self, void *base) except -1:
        self._header = <mqs_tc_header_t *>base
        return 0

    cdef int _format(self, const void *params) except -1:
        # Before the format publishes the file to other processes.
        self._header.config.v.max_stored = self._max_stored
        if mqs_tc_format(self._header,
                         <const mqs_tc_params_t *>params) != MQS_OK:
            raise OSError("cannot set up the topic core's "
                          "process-shared mutex")
        return 0

    cdef int _validate(self, str path) except -1:
        cdef int rc = mqs_tc_validate(self._header, self._file_bytes)
        if rc == MQS_TC_EVERSION:
            version = mqs_tc_version(self._header)
            raise TopicCoreVersionError(
                f"{path} has topic core layout version {version}, and this "
                f"mqs reads version {MQS_TC_VERSION}: processes of two mqs "
                f"versions share its shm broker. Run every process of the "
                f"broker on the mqs version that created it, or close them "
                f"all and remove the broker with mqs.Broker.unlink(name) to "
                f"start it again on this version (its stored messages are "
                f"lost)", path=path, version=version,
                expected_version=MQS_TC_VERSION)
        if rc != MQS_OK:
            raise TopicCoreLayoutError(
                f"{path} is not a topic core of this mqs (bad header"
                f"{', never initialised' if rc == MQS_EINTR else ''}); "
                f"unlink it or use another name")
        return 0

    cdef int _lock(self) except -1:
        self._lock_any()
        if self._header.state.v.retired:
            mqs_tc_unlock(self._header)
            raise TopicRetired(self.path)
        return 0

    cdef int _lock_any(self) except -1:
        cdef int rc
        if self._header == NULL or self._close_pending:
            raise ValueError(f"topic core {self.path} is closed")
        rc = mqs_tc_lock(self._header, 0)
        if rc == MQS_ETIMEDOUT:
            rc = self._lock_contended()
        if rc < 0:
            raise OSError(f"the process-shared mutex of {self.path} is "
                          f"unusable (status {rc})")
        return 0

    cdef int _lock_contended(self) except? -1:
        """Wait for the mutex that another thread or process holds, in
        slices without the GIL, and return `mqs_tc_lock`'s result.

        The wait counts as a waiter (`_waiters`), so a `close` by another
        thread meanwhile leaves the file mapped until this thread is out
        of it. Raises `TopicRetired` after such a close, with the mutex
        released again.
        """
        cdef mqs_tc_header_t *header = self._header
        cdef int rc = MQS_ETIMEDOUT
        self._waiters += 1
        try:
            while rc == MQS_ETIMEDOUT:
                with nogil:
                    rc = mqs_tc_lock(header, SLICE_NS)
                if rc == MQS_ETIMEDOUT:
                    PyErr_CheckSignals()
        finally:
            self._waiters -= 1
            if self._close_pending:
                if rc == MQS_OK or rc == 1:
                    mqs_tc_unlock(header)
                    rc = MQS_ETIMEDOUT
                if self._waiters == 0:
                    self._close_file()
        if self._close_pending:
            # `close` runs only after the topic left the core (a delete,
            # a move, a new journal), so the caller goes on as for that.
            raise TopicRetired(self.path)
        return rc

    cdef inline void _unlock(self, bint changed):
        mqs_tc_unlock(self._header)
        if changed:
            mqs_wait_signal(mqs_tc_changed(self._header), 1)

    # Publishing.

    def publish(self, bytes body, int priority, double timestamp, now=None):
        """Store a message; return its seq (1, 2, ...), -1 when every
        slot is taken, or `LIMIT` when the topic stores `max_stored`
        messages."""
        cdef int64_t rc
        cdef double at = _now(now)
        cdef uint32_t slot
        self._lock()
        rc = mqs_tc_publish(self._header, PyBytes_AS_STRING(body),
                            <uint32_t>len(body), <uint32_t>priority,
                            timestamp, at, &slot)
        self._unlock(rc > 0)
        if rc == MQS_EFULL:
            return -1
        if rc == MQS_TC_ELIMIT:
            return LIMIT
        if rc == MQS_ETOOBIG:
            raise ValueError(
                f"a body of {len(body)} bytes is larger than the "
                f"{self._header.config.v.params.slot_bytes} bytes of a "
                f"topic core slot")
        if rc < 0:
            raise ValueError(f"priority must be 0 to 9, got {priority}")
        return rc

    def publish_pickled(self, object body, int priority):
        """Pickle `body` and store it stamped with the current wall clock;
        return its seq, -1 when every slot is taken, -2 when the pickle
        is larger than a slot, or `LIMIT` when the topic stores
        `max_stored` messages.

        The shm broker's publish of one plain message: the same as
        `publish` of ``pickle.dumps(body, HIGHEST_PROTOCOL)`` with
        `time.time()` as timestamp, in one call. A `bytes` body is stored
        behind `PAYLOAD_BYTES` instead of pickled.
        """
        return self._publish_pickled(body, priority, mqs_monotonic_ns() / 1e9)

    cdef int64_t _publish_pickled(self, object body, int priority,
                                  double at) except? -3:
        cdef bytes payload
        cdef Py_ssize_t length
        cdef char *data
        if PyBytes_CheckExact(body):
            # Copying costs less than pickling: see `PAYLOAD_BYTES`.
            length = PyBytes_GET_SIZE(body) + 1
            payload = PyBytes_FromStringAndSize(NULL, length)
            data = PyBytes_AS_STRING(payload)
            data[0] = PAYLOAD_BYTES
            memcpy(data + 1, PyBytes_AS_STRING(body), length - 1)
        else:
            payload = _dumps(body, _PICKLE_PROTOCOL)
        return self._publish_payload(payload, priority, _wall_clock(), at)

    cdef int64_t _publish_payload(self, bytes payload, int priority,
                                  double wall, double at,
                                  bint signal=True) except? -3:
        """Store `payload` stamped `wall`; return its seq, -1 when every
        slot is taken, -2 when it is larger than a slot, or `LIMIT`.

        With `signal` false the waiters are not told; the caller must call
        `_signal_quiet` later (see `LoggedPath`)."""
        cdef Py_ssize_t length = len(payload)
        cdef int64_t rc
        cdef uint32_t slot
        self._lock()
        # Checked here, not by mqs_tc_publish, because a length over 2**32
        # would wrap in the cast.
        if length > self._header.config.v.params.slot_bytes:
            self._unlock(False)
            return -2
        rc = mqs_tc_publish(self._header, PyBytes_AS_STRING(payload),
                            <uint32_t>length, <uint32_t>priority, wall, at,
                            &slot)
        self._unlock(rc > 0 and signal)
        if rc == MQS_EFULL:
            return -1
        if rc == MQS_TC_ELIMIT:
            return LIMIT
        if rc < 0:
            raise ValueError(f"priority must be 0 to 9, got {priority}")
        if not signal:
            self._quiet_published += 1
        return rc

    @property
    def _quiet_pending(self):
        """Test hook: publishes of this handle that no signal covered."""
        return self._quiet_published - self._quiet_signaled

    cdef int _signal_quiet(self) except -1:
        """Tell the waiters about the publishes that `_publish_payload`
        made without a signal. A handle that `close` unmapped is skipped:
        its topic left the core, and `retire` woke the file's waiters."""
        self._quiet_signaled = self._quiet_published
        if self._header != NULL:
            mqs_wait_signal(mqs_tc_changed(self._header), 1)
        return 0

    @property
    def max_stored(self):
        """Bound on stored messages (the topic's maxsize), 0 for none."""
        self._check_mapped()
        return self._header.config.v.max_stored

    # Groups and consumers.

    def open_group(self, str name, bint earliest, max_attempts=None,
                   now=None):
        """Return the index of group `name`, creating it if missing."""
        cdef bytes encoded = name.encode()
        cdef int64_t rc
        cdef double at = _now(now)
        if not 0 < len(encoded) <= MQS_TC_NAME_BYTES:
            raise ValueError(f"group names of a topic core are 1 to "
                             f"{MQS_TC_NAME_BYTES} bytes, got {name!r}")
        self._lock()
        rc = mqs_tc_open_group(self._header, PyBytes_AS_STRING(encoded),
                               <uint32_t>len(encoded), earliest, at)
        if rc >= 0 and max_attempts is not None:
            mqs_tc_set_group_attempts(self._header, <uint32_t>rc,
                                      max_attempts)
        self._unlock(rc >= 0)
        if rc == MQS_EFULL:
            raise TopicCoreFull(f"topic core {self.path} has "
                          f"{self._header.config.v.params.max_groups} "
                          f"groups already")
        return rc

    def find_group(self, str name):
        """Return the index of group `name`, or -1."""
        cdef bytes encoded = name.encode()
        cdef int64_t rc
        self._lock()
        rc = mqs_tc_find_group(self._header, PyBytes_AS_STRING(encoded),
                               <uint32_t>len(encoded))
        self._unlock(False)
        return rc

    def open_consumer(self, uint32_t group, uint32_t prefetch, uint64_t owner,
                      now=None):
        """Register a consumer of `group`; return its index."""
        cdef int64_t rc
        cdef double at = _now(now)
        self._lock()
        rc = mqs_tc_open_consumer(self._header, group, prefetch, owner, at)
        self._unlock(False)
        if rc == MQS_EFULL:
            raise TopicCoreFull(f"topic core {self.path} has "
                          f"{self._header.config.v.params.max_consumers} "
                          f"consumers open already; close some")
        if rc < 0:
            raise ValueError(f"group {group} of topic core {self.path} does "
                             f"not exist")
        return rc

    def close_consumer(self, uint32_t consumer, now=None):
        """Requeue a consumer's in-flight messages and free it; return how
        many went back (0 for a consumer that is not open)."""
        cdef int64_t rc
        cdef double at = _now(now)
        self._lock()
        rc = mqs_tc_close_consumer(self._header, consumer, at)
        self._unlock(rc > 0)
        return max(rc, 0)

    cdef inline int _check_mapped(self) except -1:
        # Reads without the mutex still need the mapping: after `close`
        # the header pointer is gone.
        if self._header == NULL:
            raise ValueError(f"topic core {self.path} is closed")
        return 0

    def consumer_owner(self, uint32_t consumer):
        """Return the owner token of an open consumer, or None."""
        self._check_mapped()
        if consumer >= self._header.config.v.params.max_consumers:
            return None
        c = mqs_tc_consumer(self._header, consumer)
        return c.owner if c.used else None

    def slot_seq(self, uint32_t slot):
        """Return the seq of the message in `slot`, or 0 for a free slot
        or one out of range (read without the mutex)."""
        self._check_mapped()
        if slot >= self._header.config.v.params.capacity:
            return 0
        return mqs_tc_slot(self._header, slot).seq

    def consumer_in_flight(self, uint32_t consumer):
        self._check_mapped()
        if consumer >= self._header.config.v.params.max_consumers:
            return 0
        c = mqs_tc_consumer(self._header, consumer)
        return c.in_flight if c.used else 0

    # Delivering and settling.

    cdef inline bint _owned_by(self, uint32_t consumer, uint64_t owner):
        # An owner of 0 skips the check. Otherwise the consumer's owner
        # token must match, because a closed consumer's index may belong
        # to a newer one. The caller holds the mutex.
        if owner == 0:
            return True
        return (consumer < self._header.config.v.params.max_consumers
                and mqs_tc_consumer(self._header, consumer).owner == owner)

    def fetch(self, uint32_t consumer, uint32_t max_items, double ack_timeout,
              bint auto_ack=False, now=None, uint64_t owner=0):
        """Deliver up to `max_items`; return a list of ``(seq, slot,
        ticket, attempts, priority, timestamp, payload)``, where `payload`
        is the stored bytes (see `decode_payload`).

        Raises `ShutDown` for a consumer that is not open, or whose owner
        token is not `owner` (unless `owner` is 0): a closed consumer's
        index may belong to a newer one.
        """
        cdef int64_t n = 0
        cdef uint32_t chunk
        cdef double at = _now(now)
        cdef mqs_tc_delivery_t *d
        cdef list found = []
        self._lock()
        try:
            if not self._owned_by(consumer, owner):
                n = MQS_ECLOSED
            # In chunks of FETCH_BATCH, all in one critical section.
            while n >= 0 and len(found) < max_items:
                chunk = min(max_items - len(found), FETCH_BATCH)
                n = mqs_tc_fetch(self._header, consumer, chunk, ack_timeout,
                                 auto_ack, at, self._out)
                for i in range(max(n, 0)):
                    d = &self._out[i]
                    found.append((d.seq, d.slot, d.ticket, d.attempts,
                                  d.priority, d.timestamp,
                                  PyBytes_FromStringAndSize(<char *>d.body,
                                                            d.length)))
                if n < chunk:
                    break
        finally:
            self._unlock(bool(found))
        if n == MQS_ECLOSED:
            raise ShutDown(f"consumer {consumer} of topic core {self.path} "
                           f"is closed")
        return found

    def fetch_one(self, uint32_t consumer, double ack_timeout,
                  bint auto_ack, uint64_t owner, type delivery_type,
                  str topic, str group, uint32_t group_index):
        """Deliver one message now as `fetch` does and unpickle it; return
        it as a `delivery_type`, or None when none is ready or the
        consumer holds `prefetch` messages.

        `delivery_type` is a tuple subclass with the fields of
        `mqs.broker.Delivery`: id ``s<seq>``, tag ``(path, group_index,
        slot, ticket, seq)``, `topic`, `group`, body, priority, attempts,
        key (None), headers, timestamp, reply_to and correlation_id. The
        payload is decoded as `decode_payload` does. Raises `ShutDown` as
        `fetch` does,
        and the unpickler's errors after the message is in flight. Never
        waits.
        """
        cdef mqs_tc_delivery_t *d = self._out
        cdef uint64_t seq, ticket, attempts
        cdef uint32_t slot, priority
        cdef double timestamp
        payload = self._take_one(consumer, ack_timeout, auto_ack, owner,
                                 mqs_monotonic_ns() / 1e9)
        if payload is None:
            return None
        # Copied before the unpickler runs, because it may run code that
        # fetches through this handle again.
        seq, slot, ticket = d.seq, d.slot, d.ticket
        attempts, priority, timestamp = d.attempts, d.priority, d.timestamp
        body, headers, reply_to, correlation_id = _decode_payload(payload)
        # What the named tuple's own __new__ does, without its Python
        # frame.
        return tuple.__new__(delivery_type, (
            f"s{seq}", (self.path, group_index, slot, ticket, seq), topic,
            group, body, priority, attempts, None, headers, timestamp,
            reply_to, correlation_id))

    cdef object _take_one(self, uint32_t consumer, double ack_timeout,
                          bint auto_ack, uint64_t owner, double at):
        """Deliver one message now; return its payload, with its other
        fields in ``self._out[0]``, or None when none is ready.

        Raises `ShutDown` for a closed consumer (or one of another
        `owner`, unless `owner` is 0) and `TopicRetired` after
        `retire_and_export`.
        """
        cdef int64_t n = 0
        cdef mqs_tc_delivery_t *d = self._out
        payload = None
        self._lock()
        try:
            if not self._owned_by(consumer, owner):
                n = MQS_ECLOSED
            else:
                n = mqs_tc_fetch(self._header, consumer, 1, ack_timeout,
                                 auto_ack, at, d)
            if n == 1:
                payload = PyBytes_FromStringAndSize(<char *>d.body,
                                                    d.length)
        finally:
            self._unlock(n == 1)
        if n == MQS_ECLOSED:
            raise ShutDown(f"consumer {consumer} of topic core {self.path} "
                           f"is closed")
        return payload

    def ack(self, uint32_t group, uint32_t slot, uint64_t ticket, now=None):
        """Acknowledge; return False for a stale tag (counted)."""
        return self._ack(group, slot, ticket, _now(now)) == 1

    cdef int _ack(self, uint32_t group, uint32_t slot, uint64_t ticket,
                  double at) except -1:
        """Return 1 for an ack in time, 0 for a stale tag (counted)."""
        cdef int rc
        self._lock()
        rc = mqs_tc_ack(self._header, group, slot, ticket, at)
        self._unlock(rc == 1)
        return rc == 1

    def nack(self, uint32_t group, uint32_t slot, uint64_t ticket,
             bint requeue, now=None):
        """Requeue at the lane's tail, or dead-letter (requeue False, or
        max_attempts reached); return False for a stale tag."""
        cdef int rc
        cdef double at = _now(now)
        self._lock()
        rc = mqs_tc_nack(self._header, group, slot, ticket, requeue, at)
        self._unlock(rc == 1)
        return rc == 1

    def extend(self, uint32_t group, uint32_t slot, uint64_t ticket,
               double seconds, now=None):
        """Move the ack deadline to `seconds` from now; return False for a
        stale tag."""
        cdef int rc
        cdef double at = _now(now)
        self._lock()
        rc = mqs_tc_extend(self._header, group, slot, ticket, seconds, at)
        self._unlock(False)
        return rc == 1

    def release(self, uint32_t group, tags, now=None):
        """Put in-flight tags back at their lanes' heads unseen; return
        how many were live."""
        cdef list items = list(tags)
        cdef uint32_t count = len(items)
        cdef uint32_t *slots
        cdef uint64_t *tickets
        cdef int64_t rc
        cdef double at = _now(now)
        if count == 0:
            return 0
        slots = <uint32_t *>malloc(sizeof(uint32_t) * count)
        tickets = <uint64_t *>malloc(sizeof(uint64_t) * count)
        try:
            if slots == NULL or tickets == NULL:
                raise MemoryError()
            for i, (slot, ticket) in enumerate(items):
                slots[i] = slot
                tickets[i] = ticket
            self._lock()
            rc = mqs_tc_release(self._header, group, slots, tickets, count,
                                at)
            self._unlock(rc > 0)
        finally:
            free(slots)
            free(tickets)
        if rc < 0:
            raise MemoryError()
        return rc

    def advance(self, now=None):
        """Redeliver or dead-letter the deliveries whose deadline passed."""
        cdef double at = _now(now)
        self._lock()
        mqs_tc_advance(self._header, at)
        self._unlock(True)

    def take_dead(self):
        """Remove the dead entries; return them in the order they died as
        ``(group, seq, attempts, reason, priority, timestamp, payload)``
        with the stored payload bytes (see `decode_payload`)."""
        cdef mqs_tc_dead_t dead
        cdef list found = []
        self._lock()
        try:
            while mqs_tc_next_dead(self._header, &dead):
                found.append((dead.group, dead.seq, dead.attempts,
                              DEAD_REASONS[dead.reason], dead.priority,
                              dead.timestamp,
                              PyBytes_FromStringAndSize(<char *>dead.body,
                                                        dead.length)))
                mqs_tc_drop_dead(self._header, dead.group, dead.slot)
        finally:
            self._unlock(bool(found))
        return found

    def peek_dead(self):
        """Return the dead entries in the order they died, leaving them
        in place, as ``(group, slot, group name, seq, attempts, reason,
        priority, timestamp, timed_out, payload)``; `drop_dead` removes
        them. Raises `TopicRetired` once the core is retired."""
        cdef mqs_tc_params_t *params
        cdef mqs_tc_slot_t *stored
        cdef mqs_tc_group_t *group
        cdef mqs_tc_entry_t *entry
        cdef uint64_t word
        cdef list found = []
        self._lock()
        try:
            params = &self._header.config.v.params
            limit = min(self._header.state.v.slot_limit, params.capacity)
            for g in range(params.max_groups):
                group = mqs_tc_group(self._header, g)
                if not group.used or group.dead == 0:
                    continue
                name = group.name[:group.name_length].decode()
                for slot in range(limit):
                    entry = mqs_tc_entry(self._header, g, slot)
                    word = entry.word
                    if word & 0xff != MQS_TC_DEAD:
                        continue
                    stored = mqs_tc_slot(self._header, slot)
                    found.append((
                        entry.deadline_seq, g, slot, name, stored.seq,
                        word >> 16, DEAD_REASONS[(word >> 8) & 0xff],
                        stored.priority, stored.timestamp,
                        bool(entry.timed_out),
                        PyBytes_FromStringAndSize(<char *>(stored + 1),
                                                  stored.length)))
        finally:
            self._unlock(False)
        found.sort(key=_first)
        return [item[1:] for item in found]

    def drop_dead(self, entries):
        """Remove the dead entries ``(group, slot)`` of `entries` (from
        `peek_dead`); an entry that is no longer dead is left alone."""
        cdef uint32_t group, slot
        pairs = [(int(g), int(s)) for g, s in entries]
        self._lock()
        try:
            for group, slot in pairs:
                mqs_tc_drop_dead(self._header, group, slot)
        finally:
            self._unlock(bool(pairs))

    def has_dead(self):
        """Return whether a group holds dead entries (read without the
        mutex, so only a hint: `retire_and_export` returns them). False
        once closed: the broker closes a handle after its topic left the
        core."""
        return self._has_dead()

    cdef bint _has_dead(self):
        cdef uint32_t groups
        cdef uint32_t g
        if self._header == NULL:
            return False
        groups = self._header.config.v.params.max_groups
        for g in range(groups):
            if mqs_tc_group(self._header, g).dead:
                return True
        return False

    @property
    def capacity(self):
        """Messages the core stores at once, fixed by its creator."""
        if self._header == NULL:
            raise ValueError(f"topic core {self.path} is closed")
        return self._header.config.v.params.capacity

    @property
    def retired(self):
        """Whether the topic moved out of the core (read without the
        mutex: False may be stale, True is final)."""
        return self._header != NULL and self._header.state.v.retired != 0

    def retire(self):
        """Mark the topic moved out of the core; later operations in every
        process raise `TopicRetired`."""
        self._lock()
        self._header.state.v.retired = 1
        self._unlock(True)

    def retire_and_export(self):
        """Retire the topic and return its whole state, in one critical
        section, as a dict of plain values (see the code for the keys).

        Works on a retired core too: retiring freezes the state, so a
        caller whose predecessor died before using the export can export
        it again."""
        cdef mqs_tc_params_t *params
        cdef mqs_tc_slot_t *stored
        cdef mqs_tc_group_t *group
        cdef mqs_tc_entry_t *entry
        cdef uint64_t word
        self._lock_any()
        try:
            params = &self._header.config.v.params
            # No slot at or above slot_limit was ever used.
            limit = min(self._header.state.v.slot_limit, params.capacity)
            slots = []
            for slot in range(limit):
                stored = mqs_tc_slot(self._header, slot)
                if stored.seq == 0:
                    continue
                slots.append((slot, stored.seq, stored.priority,
                              stored.timestamp, bool(stored.retained),
                              PyBytes_FromStringAndSize(
                                  <char *>(stored + 1), stored.length)))
            groups = []
            for g in range(params.max_groups):
                group = mqs_tc_group(self._header, g)
                if not group.used:
                    continue
                entries = []
                for slot in range(limit):
                    entry = mqs_tc_entry(self._header, g, slot)
                    word = entry.word
                    if word & 0xff == 0:
                        continue
                    entries.append((slot, word & 0xff, (word >> 8) & 0xff,
                                    word >> 16, entry.ticket,
                                    entry.ready_seq, entry.deadline,
                                    entry.deadline_seq, entry.consumer,
                                    entry.ready_at, entry.sampled_at,
                                    bool(entry.timed_out)))
                groups.append((
                    g, group.name[:group.name_length].decode(),
                    group.max_attempts, group.cursor,
                    [group.deficits[i] for i in range(params.lane_count)],
                    {name: group.counters[index] for index, name
                     in enumerate(GROUP_COUNTER_NAMES)},
                    entries, group.countdown,
                    _histogram(&group.enqueue_to_deliver),
                    _histogram(&group.deliver_to_ack)))
            consumers = []
            for index in range(params.max_consumers):
                c = mqs_tc_consumer(self._header, index)
                if c.used:
                    consumers.append((index, c.group, c.prefetch, c.owner))
            counters = {name: self._header.state.v.counters[index]
                        for index, name in enumerate(COUNTER_NAMES)}
            self._header.state.v.retired = 1
        finally:
            self._unlock(True)
        return {"slots": slots, "groups": groups, "consumers": consumers,
                "counters": counters}

    def export_image(self):
        """Return the topic's state as an image without retiring the core.

        The image is a dict of plain values, read in one critical
        section, that `import_image` loads into a fresh core::

            {"next_seq": int,
             "counters": {name: int for name in COUNTER_NAMES},
             "messages": [(seq, priority, timestamp, retained, payload)],
             "groups": [(name, max_attempts,
                         {name: int for name in GROUP_COUNTER_NAMES},
                         [(seq, state, reason, attempts)])]}

        Messages are the stored ones in ascending seq. Groups are the
        used ones in index order. A group's entries are its ready ones
        in delivery order (ascending ready order, which keeps each
        lane's order), then its in-flight ones and then its dead ones,
        each in ascending seq. state is `ENTRY_READY`,
        `ENTRY_IN_FLIGHT` or `ENTRY_DEAD`, and reason indexes
        `DEAD_REASONS`. Works on a retired core too.

        NOTE: an image leaves out consumers, tickets, deadlines, the
        weighted scheduler's place in its round, latency histograms,
        the order in which dead entries died (across groups too), and
        whether a dead entry missed an ack deadline before it died of
        another reason (`peek_dead`'s timed_out).
        """
        cdef mqs_tc_params_t *params
        cdef mqs_tc_slot_t *stored
        cdef mqs_tc_group_t *group
        cdef mqs_tc_entry_t *entry
        cdef uint64_t word
        cdef uint32_t slot, g, limit, state
        self._lock_any()
        try:
            params = &self._header.config.v.params
            # No slot at or above slot_limit was ever used.
            limit = min(self._header.state.v.slot_limit, params.capacity)
            seq_of = {}
            messages = []
            for slot in range(limit):
                stored = mqs_tc_slot(self._header, slot)
                if stored.seq == 0:
                    continue
                seq_of[slot] = stored.seq
                messages.append((stored.seq, stored.priority,
                                 stored.timestamp, bool(stored.retained),
                                 PyBytes_FromStringAndSize(
                                     <char *>(stored + 1), stored.length)))
            messages.sort(key=_first)
            groups = []
            for g in range(params.max_groups):
                group = mqs_tc_group(self._header, g)
                if not group.used:
                    continue
                ready = []
                in_flight = []
                dead = []
                for slot in range(limit):
                    entry = mqs_tc_entry(self._header, g, slot)
                    word = entry.word
                    state = word & 0xff
                    if state == 0:
                        continue
                    item = (seq_of[slot], state, (word >> 8) & 0xff,
                            word >> 16)
                    if state == MQS_TC_READY:
                        ready.append((entry.ready_seq, item))
                    elif state == MQS_TC_IN_FLIGHT:
                        in_flight.append(item)
                    else:
                        dead.append(item)
                ready.sort(key=_first)
                in_flight.sort(key=_first)
                dead.sort(key=_first)
                entries = [item for _, item in ready] + in_flight + dead
                groups.append((
                    group.name[:group.name_length].decode(),
                    group.max_attempts,
                    {name: group.counters[index] for index, name
                     in enumerate(GROUP_COUNTER_NAMES)},
                    entries))
            counters = {name: self._header.state.v.counters[index]
                        for index, name in enumerate(COUNTER_NAMES)}
            next_seq = self._header.state.v.next_seq
        finally:
            self._unlock(False)
        return {"next_seq": next_seq, "counters": counters,
                "messages": messages, "groups": groups}

    def import_image(self, image, now=None):
        """Load an image from `export_image` into this fresh core.

        The core must have no group, no stored message and next_seq 0.
        Groups get indexes 0, 1, ... in the image's order, and messages
        keep their seq. Ready and in-flight entries become ready at
        their lanes' tails in the image's order since `now`, keeping
        their attempts. Dead entries stay dead, and `take_dead` returns
        them in the image's order. next_seq becomes the larger of the
        image's and its last message seq, and the topic counters are the
        image's, except that published equals next_seq as in every core.

        Raises ValueError naming the value for a core that is not fresh
        or an invalid image, before changing anything, and `TopicRetired`
        for a retired core.
        """
        cdef double at = _now(now)
        cdef int64_t topic_counters[MQS_TC_COUNTERS]
        cdef int64_t group_counters[MQS_TC_GROUP_COUNTERS]
        cdef int64_t rc
        cdef uint64_t unneeded_seq = 0
        cdef mqs_tc_params_t *params
        cdef bytes payload
        cdef bint changed = False
        self._check_mapped()
        params = &self._header.config.v.params
        next_seq, counters, messages, groups = _check_image(
            image, self.path, params.capacity, params.slot_bytes,
            params.max_groups)
        for index, value in enumerate(counters):
            topic_counters[index] = value
        self._lock()
        try:
            reason = self._not_fresh()
            if reason is not None:
                raise ValueError(
                    f"cannot import an image into topic core {self.path}: "
                    f"it {reason}. Import only into a newly created core")
            changed = True
            slot_of = {}
            for name, max_attempts, values, _ in groups:
                for index, value in enumerate(values):
                    group_counters[index] = value
                rc = mqs_tc_import_group(self._header,
                                         PyBytes_AS_STRING(name),
                                         <uint32_t>len(name), max_attempts,
                                         group_counters)
                if rc < 0:
                    self._import_failed(f"group {name.decode()!r}", rc)
            for seq, priority, timestamp, retained, payload in messages:
                rc = mqs_tc_import_message(
                    self._header, seq, PyBytes_AS_STRING(payload),
                    <uint32_t>len(payload), priority, timestamp, retained)
                if rc < 0:
                    self._import_failed(f"message {seq}", rc)
                slot_of[seq] = rc
            for index, (name, _, _, entries) in enumerate(groups):
                for seq, state, reason, attempts in entries:
                    rc = mqs_tc_import_entry(self._header, index,
                                             slot_of[seq], state, reason,
                                             attempts, at)
                    if rc < 0:
                        self._import_failed(
                            f"the entry for seq {seq} of group "
                            f"{name.decode()!r}", rc)
            rc = mqs_tc_import_finish(self._header, next_seq,
                                      topic_counters, &unneeded_seq)
            if rc < 0:
                self._import_failed(f"message {unneeded_seq}, which no "
                                    f"group needs,", rc)
        finally:
            self._unlock(changed)

    cdef object _not_fresh(self):
        """Return why the core is not fresh for `import_image`, or None.
        The caller holds the mutex."""
        cdef mqs_tc_params_t *params = &self._header.config.v.params
        cdef uint32_t g
        if self._header.state.v.next_seq != 0:
            return (f"has published messages up to seq "
                    f"{self._header.state.v.next_seq}")
        if self._header.state.v.stored != 0:
            return f"stores {self._header.state.v.stored} messages"
        for g in range(params.max_groups):
            if mqs_tc_group(self._header, g).used:
                return "has groups"
        return None

    cdef int _import_failed(self, str what, int64_t rc) except -1:
        raise ValueError(
            f"importing {what} into topic core {self.path} failed (status "
            f"{rc}), and the core is left partly filled. Remove the file "
            f"and import the image into a new core")

    # Statistics.

    def group_histograms(self):
        """group_histograms(self)\n--\n
        Return ``{group name: (enqueue_to_deliver, deliver_to_ack)}`` of
        the used groups, each histogram as in `group_stats`."""
        cdef mqs_tc_group_t *group
        found = {}
        self._lock()
        try:
            for g in range(self._header.config.v.params.max_groups):
                group = mqs_tc_group(self._header, g)
                if group.used:
                    found[group.name[:group.name_length].decode()] = (
                        _histogram(&group.enqueue_to_deliver),
                        _histogram(&group.deliver_to_ack))
        finally:
            self._unlock(False)
        return found

    def set_group_histograms(self, histograms):
        """set_group_histograms(self, histograms)\n--\n
        Load latency histograms as `group_histograms` returns them into
        the groups of those names; names of no group are skipped. Meant
        for a core that `import_image` just filled."""
        cdef mqs_tc_group_t *group
        cdef bytes encoded
        cdef int64_t index
        self._lock()
        try:
            for name, (enqueue_to_deliver, deliver_to_ack) in \
                    histograms.items():
                encoded = name.encode()
                index = mqs_tc_find_group(self._header,
                                          PyBytes_AS_STRING(encoded),
                                          <uint32_t>len(encoded))
                if index < 0:
                    continue
                group = mqs_tc_group(self._header, <uint32_t>index)
                _set_histogram(&group.enqueue_to_deliver,
                               tuple(enqueue_to_deliver))
                _set_histogram(&group.deliver_to_ack, tuple(deliver_to_ack))
        finally:
            self._unlock(False)

    def group_stats(self, now=None):
        """Return per used group: ``(index, name, consumers, ready,
        oldest ready_at or None, in_flight, counters, enqueue_to_deliver,
        deliver_to_ack)``, histograms as in `retire_and_export`."""
        cdef mqs_tc_params_t *params
        cdef mqs_tc_group_t *group
        cdef mqs_tc_entry_t *entry
        cdef double at = _now(now)
        cdef double ready_at = 0
        found = []
        self._lock()
        try:
            mqs_tc_advance(self._header, at)
            params = &self._header.config.v.params
            for g in range(params.max_groups):
                group = mqs_tc_group(self._header, g)
                if not group.used:
                    continue
                oldest = (ready_at if mqs_tc_oldest_ready(
                    self._header, g, &ready_at) else None)
                consumers = 0
                for index in range(params.max_consumers):
                    c = mqs_tc_consumer(self._header, index)
                    if c.used and c.group == g:
                        consumers += 1
                found.append((
                    g, group.name[:group.name_length].decode(), consumers,
                    group.ready, oldest, group.in_flight,
                    {name: group.counters[index] for index, name
                     in enumerate(GROUP_COUNTER_NAMES)},
                    _histogram(&group.enqueue_to_deliver),
                    _histogram(&group.deliver_to_ack)))
        finally:
            self._unlock(False)
        return found

    def counters(self):
        """Return the topic's cumulative counters by name."""
        cdef int64_t *values
        self._check_mapped()
        values = self._header.state.v.counters
        return {name: values[index]
                for index, name in enumerate(COUNTER_NAMES)}

    def group_counters(self, uint32_t group):
        cdef int64_t *values
        self._check_mapped()
        if group >= self._header.config.v.params.max_groups:
            raise ValueError(
                f"group index {group} is out of range: the topic core "
                f"{self.path} has {self._header.config.v.params.max_groups} "
                f"group slots")
        values = mqs_tc_group(self._header, group).counters
        return {name: values[index]
                for index, name in enumerate(GROUP_COUNTER_NAMES)}

    def stats(self):
        """Return stored messages and entries per state over all groups."""
        cdef mqs_tc_stats_t stats
        self._lock()
        mqs_tc_stats(self._header, &stats)
        self._unlock(False)
        return {"stored": stats.stored, "ready": stats.ready,
                "in_flight": stats.in_flight, "dead": stats.dead,
                "groups": self._header.state.v.groups_used}

    # Change notification.

    def wait_prepare(self):
        """Register as a waiter; return the epoch to pass to `wait`.

        Raises `TopicRetired` once `close` was called: a closed handle
        takes no new waiters.
        """
        if self._header == NULL or self._close_pending:
            raise TopicRetired(self.path)
        self._waiters += 1
        return mqs_wait_prepare(mqs_tc_changed(self._header))

    def wait(self, uint32_t epoch, double timeout):
        """Wait until a change after `wait_prepare` or `timeout` seconds
        (at most 50 ms in one call), then deregister."""
        cdef int64_t timeout_ns = <int64_t>(min(max(timeout, 0.0), 0.05)
                                            * 1e9)
        # The registration keeps the file mapped (see `close`).
        with nogil:
            mqs_wait_park(mqs_tc_changed(self._header), epoch, timeout_ns, 1)
        self._finish_wait()

    cdef int _wait_fetchable(self, uint32_t epoch, double timeout,
                             uint32_t consumer, uint32_t group,
                             uint64_t owner, bint auto_ack,
                             int64_t awake_ns) except -1:
        """`wait` for `CoreReader.wait_read`: wake at a change after
        which a fetch by `consumer` may find something
        (`mqs_tc_may_fetch`), when `close` is pending, or after `timeout`
        seconds (at most 50 ms). Changes that leave nothing for it, such
        as the deliveries and acks of other consumers, do not wake the
        caller: with 4 consumers each of them woke the other three, and
        each wake-up took the GIL to find nothing.

        A positive `awake_ns` keeps the first wait awake (spinning, then
        yielding the CPU) that long before it sleeps, instead of 50 us
        (`mqs_wait_park_awake`)."""
        cdef int64_t timeout_ns = <int64_t>(min(max(timeout, 0.0), 0.05)
                                            * 1e9)
        cdef int64_t end = mqs_monotonic_ns() + timeout_ns
        cdef int64_t now
        cdef int rc
        cdef mqs_waitword_t *word = mqs_tc_changed(self._header)
        # The registration keeps the file mapped (see `close`).
        with nogil:
            if awake_ns > 0:
                rc = mqs_wait_park_awake(word, epoch, timeout_ns, awake_ns, 1)
            else:
                rc = mqs_wait_park(word, epoch, timeout_ns, 1)
            while rc == MQS_OK and not self._close_pending:
                now = mqs_monotonic_ns()
                if now >= end:
                    break
                # Read before the check: a change after it moves the
                # epoch past this value and ends the sleep below.
                epoch = mqs_wait_epoch(word)
                if mqs_tc_may_fetch(self._header, consumer, group, owner,
                                    auto_ack, now / 1e9):
                    break
                rc = mqs_wait_sleep(word, epoch, end - now, 1)
        self._finish_wait()
        return 0

    def cancel_wait(self):
        """Deregister a waiter that did not call `wait`."""
        self._finish_wait()

    cdef int _finish_wait(self) except -1:
        mqs_wait_finish(mqs_tc_changed(self._header))
        self._waiters -= 1
        if self._waiters == 0 and self._close_pending:
            self._close_file()
        return 0

    def signal(self):
        if self._header != NULL:
            mqs_wait_signal(mqs_tc_changed(self._header), 1)

    def close(self):
        """Unmap the file; idempotent.

        While threads of this process are registered waiters, the file
        stays mapped until the last of them deregisters, because a
        parked thread still writes to the wait word.
        """
        if self._waiters:
            self._close_pending = True
        else:
            self._close_file()

    def __dealloc__(self):
        free(self._out)


include "_fastpath.pxi"
