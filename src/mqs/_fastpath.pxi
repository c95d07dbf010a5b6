# Per-message paths of `mqs.Broker`, compiled into `mqs._topiccore`
# (included at its end) so that they reach `TopicCore` at the C level.
#
# `MessageBase` keeps the fields of `mqs.Message` in C fields, so a
# delivery becomes a message without a Python frame and `Message.ack`
# runs in C up to the backend call. `CorePath` and `CoreReader` run
# `Broker.publish` of a message without options, `Consumer.get` of a
# message that is ready now and its `Message.ack` straight on a topic
# core of the shm backend (`mqs.broker._shm`), and `LoggedPath` runs
# them on a core of the log backend (`mqs.broker._log_shared`), in its
# section and with their records. They return None for every case they
# leave to the backend's own methods, which do every check (topic moved
# to the journal, broker closed, consumers to reap).

cimport cython
from cpython.dict cimport PyDict_GetItemWithError
from cpython.object cimport PyObject, PyTypeObject
from cpython.tuple cimport PyTuple_Check, PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII

from mqs._journal cimport JournalSection

cdef enum:
    # Fields of `mqs.broker.Delivery`, and the position of its tag.
    DELIVERY_FIELDS = 12
    DELIVERY_TAG = 1


cdef tuple _NO_ARGS = ()

# How long a consumer of a log broker under fsync="always" stays awake
# (spinning, then yielding) before it sleeps, in ns. Its next message
# comes about one disk sync later, and a guest whose vCPUs all sleep
# through a sync finishes the sync later. With 4 producer threads and 1
# consumer the broker moved 21,900 messages per second with 200 us
# against 18,600 with the default 50 us (alternating runs, 2-vCPU guest,
# 120 us syncs); 150 us and 250 us gave about the same gain.
cdef int64_t _ALWAYS_AWAKE_NS = 200000

# Forks in this process's ancestry line since this module was imported.
# A `Producer` or `Consumer` whose count differs was created by a parent
# process. A count is used rather than a pid, because a pid can be reused
# once its process ended.
cdef Py_ssize_t _forks = 0


def _count_fork():
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


def fork_count():
    """Return the forks in this process's ancestry line since mqs was
    imported."""
    return _forks


cdef str _message_id(uint64_t seq):
    """Return the id that `ShmBackend` gives a core message: "s" and its
    seq in decimal. PyUnicode_FromFormat took about 1,400 instructions
    per call under callgrind, several times this loop's count."""
    cdef char digits[24]
    cdef int start = 23
    while True:
        digits[start] = <char>(48 + seq % 10)
        seq //= 10
        start -= 1
        if seq == 0:
            break
    digits[start] = b"s"
    return PyUnicode_DecodeASCII(&digits[start], 24 - start, NULL)


@cython.auto_pickle(False)
cdef class MessageBase:
    # The first docstring lines are the text signature that
    # inspect.signature reads; tests/test_introspection.py checks them.
    """MessageBase(consumer, delivery, settled)\n--\n
    The fields of one delivered message and its `ack`.

    `mqs.Message` subclasses it with the rest of the public API.
    Subclasses must not add a ``__dict__`` (``__slots__ = ()``), so that
    a message stays one allocation.
    """

    cdef public object _consumer
    cdef public bint _settled
    cdef public object body, id, topic, group, priority, attempts, key
    cdef public object headers, timestamp, reply_to, correlation_id
    # The backend's `Delivery`, which a `CoreReader` leaves to `_delivery`
    # to build on first use.
    cdef object _delivery_value
    # Set by a `CoreReader`: the reader and the core that delivered the
    # message, and its tag as C values.
    cdef CoreReader _reader
    cdef TopicCore _core
    cdef uint32_t _slot
    cdef uint64_t _ticket
    cdef uint64_t _seq

    def __init__(self, consumer, delivery, bint settled):
        # Any tuple type: `Delivery` is a named tuple.
        if not PyTuple_Check(delivery) \
                or PyTuple_GET_SIZE(delivery) != DELIVERY_FIELDS:
            raise TypeError(f"delivery must be a Delivery of "
                            f"{DELIVERY_FIELDS} fields, got {delivery!r}")
        self._consumer = consumer
        self._delivery_value = delivery
        self._settled = settled
        # The tag (field 1) stays in `_delivery`.
        self.id = <object>PyTuple_GET_ITEM(delivery, 0)
        self.topic = <object>PyTuple_GET_ITEM(delivery, 2)
        self.group = <object>PyTuple_GET_ITEM(delivery, 3)
        self.body = <object>PyTuple_GET_ITEM(delivery, 4)
        self.priority = <object>PyTuple_GET_ITEM(delivery, 5)
        self.attempts = <object>PyTuple_GET_ITEM(delivery, 6)
        self.key = <object>PyTuple_GET_ITEM(delivery, 7)
        self.headers = <object>PyTuple_GET_ITEM(delivery, 8)
        self.timestamp = <object>PyTuple_GET_ITEM(delivery, 9)
        self.reply_to = <object>PyTuple_GET_ITEM(delivery, 10)
        self.correlation_id = <object>PyTuple_GET_ITEM(delivery, 11)

    @property
    def _delivery(self):
        """The backend's `Delivery` of this message (its tag settles it)."""
        return self._get_delivery()

    cdef object _get_delivery(self):
        if self._delivery_value is None and self._reader is not None:
            self._delivery_value = self._reader._delivery_of(self)
        return self._delivery_value

    def __reduce__(self):
        # Used by pickle, copy.copy and copy.deepcopy (which deep-copies
        # these arguments). The consumer stays behind: see `_detached`.
        fields = {name: getattr(self, name) for name in _MESSAGE_FIELDS}
        return (_detached_message, (type(self), fields))

    def _check_attached(self, str verb):
        """Raise `MessageDetached` if this message is a copy."""
        if self._consumer is None:
            raise MessageDetached(
                f"message {self.id} of topic {self.topic!r} is a copy (made "
                f"by copy, deepcopy or pickle), which cannot {verb}; "
                f"{verb} the original message in the process that got it")

    def _settle(self, str verb):
        self._check_attached(verb)
        if self._settled:
            how = ("at delivery (auto_ack=True)"
                   if self._consumer.auto_ack else "already")
            raise AlreadySettled(
                f"message {self.id} of topic {self.topic!r} was settled "
                f"{how}; {verb} each message once, after get")
        self._settled = True

    def ack(self):
        """Acknowledge the message: it is done and never redelivered.

        Returns
        -------
        bool
            False if the ack came too late: the ack deadline had passed and
            the message was redelivered (counted as ``late_acks``). With
            ``auto_ack=True`` this does nothing and returns True.

        Raises
        ------
        AlreadySettled
            If the message was acked or nacked before.
        ShutDown, ConnectionError, ...
            The backend's error when the ack failed. The message stays
            unsettled then, so the ack can be tried again.
        """
        consumer = self._consumer
        if consumer is None:
            self._check_attached("ack")
        if consumer._fork_count != _forks:
            consumer._check_process("Message.ack")
        if self._settled:
            if consumer.auto_ack:
                return True
            self._settle("ack")
        # Marked before the backend call, so that a second thread's ack
        # of this message raises AlreadySettled instead of racing it.
        self._settled = True
        try:
            return self._ack_in_backend(consumer)
        except BaseException:
            self._settled = False
            raise

    cdef object _ack_in_backend(self, consumer):
        if self._core is not None and self._reader._logged:
            result = (<LoggedPath>self._reader._path)._ack(self)
            if result is not None:
                return result
        elif self._core is not None and self._reader._path._usable_core(
                self._reader._topic) is self._core:
            try:
                return self._core._ack(self._reader._group_index, self._slot,
                                       self._ticket,
                                       self._reader._path._checked_at) == 1
            except TopicRetired:
                pass
        return consumer._backend.ack(consumer.topic, consumer.group,
                                     self._get_delivery()[DELIVERY_TAG])


# The public fields of a message, which its copies carry.
cdef tuple _MESSAGE_FIELDS = (
    "id", "topic", "group", "body", "priority", "attempts", "key",
    "headers", "timestamp", "reply_to", "correlation_id")


def _detached_message(type message_type, dict fields):
    """Return a `message_type` with `fields` and no consumer: a copy or an
    unpickled message, whose `ack`, `nack` and `extend` raise
    `MessageDetached`."""
    cdef MessageBase message
    if not issubclass(message_type, MessageBase):
        raise TypeError(f"message_type must subclass MessageBase, got "
                        f"{message_type!r}")
    message = message_type.__new__(message_type)
    for name in _MESSAGE_FIELDS:
        setattr(message, name, fields.get(name))
    return message


# Words of the log backend's durable file (`mqs.broker._log_shared`:
# _DURABLE, _FAILED) and the journal's wait word for durability.
cdef enum:
    _DURABLE_POSITION = 0
    _DURABLE_FAILED = 1
_DURABLE_WORD = MQS_JOURNAL_DURABLE


@cython.auto_pickle(False)
cdef class CorePath:
    """The fast paths of one `ShmBackend` on its topic cores.

    Reads the backend's ``_closed``, ``_next_reap`` and ``_cores`` on
    every call, so it never acts on state the backend has left. It reads
    them from the instance dict, which costs a few dict lookups instead
    of a full attribute lookup each.
    """

    cdef object _backend
    cdef dict _state
    # The monotonic clock in seconds at the last `_usable_core` call,
    # which the caller passes on to the core operation.
    cdef double _checked_at

    def __init__(self, backend):
        self._backend = backend
        self._state = backend.__dict__

    cdef TopicCore _usable_core(self, str topic):
        """Return the core handle of `topic`, or None when the backend is
        closed, its periodic check for dead consumers is due, or the
        topic is not on a core in this process."""
        cdef PyObject *item = PyDict_GetItemWithError(self._state, "_closed")
        if item == NULL or <object>item is not False:
            return None
        item = PyDict_GetItemWithError(self._state, "_next_reap")
        self._checked_at = mqs_monotonic_ns() / 1e9
        if item == NULL or self._checked_at >= <double><object>item:
            return None
        item = PyDict_GetItemWithError(self._state, "_cores")
        if item == NULL or type(<object>item) is not dict:
            return None
        # Borrowed references: no Python code runs until the cast.
        item = PyDict_GetItemWithError(<object>item, topic)
        if item == NULL:
            return None
        return <TopicCore?><object>item

    def publish_one(self, str topic, body, int priority):
        """Pickle and store one message without options; return its id,
        or None to make the caller use `ShmBackend.publish`.

        The same contract as `ShmBackend.publish_one`: None comes back
        when its core is full or retired, and when the pickle is larger
        than a slot. A topic without a core here goes to the backend's
        `_publish_journal_one`, which returns None in the cases that it
        leaves to `publish`.
        """
        cdef int64_t seq
        core = self._usable_core(topic)
        if core is None:
            # Also a topic on the journal, which has its own direct path.
            return self._backend._publish_journal_one(topic, body, priority)
        try:
            seq = core._publish_pickled(body, priority, self._checked_at)
        except TopicRetired:
            return None
        return _message_id(seq) if seq > 0 else None


@cython.auto_pickle(False)
cdef class CoreReader:
    """`Consumer.get` of a message that is ready now, for one consumer of
    a topic core: call it with ``(ack_timeout, auto_ack)``.

    Returns a `message_type` built without its ``__init__``, or None when
    nothing is ready, the consumer holds `prefetch` messages, or the
    case is the backend's (see `CorePath`). A fetch that dead-lettered
    a message at its ack deadline moves the dead letter into the topic's
    dead-letter queue in the journal, and still returns the message it
    delivered.
    """

    cdef CorePath _path
    cdef object _consumer
    cdef type _message_type
    cdef type _delivery_type
    cdef str _topic
    cdef str _group
    cdef uint32_t _group_index
    cdef uint32_t _number
    cdef uint64_t _owner
    # `_path` is a `LoggedPath`.
    cdef bint _logged
    # Set by `_read`: whether its None meant that the core had nothing
    # for this consumer (nothing ready, or `prefetch` held), rather than a
    # case left to the backend.
    cdef bint _nothing_ready
    # Waits of `wait_read` that ended and found nothing (a test hook).
    cdef Py_ssize_t _empty_wake_count
    # How long a wait stays awake before it sleeps, 0 for the default.
    cdef int64_t _awake_ns

    def __init__(self, CorePath path, consumer, type message_type,
                 type delivery_type, str topic, str group,
                 uint32_t group_index, uint32_t number, uint64_t owner):
        if not issubclass(message_type, MessageBase):
            raise TypeError(f"message_type must subclass MessageBase, got "
                            f"{message_type!r}")
        self._path = path
        self._consumer = consumer
        self._message_type = message_type
        self._delivery_type = delivery_type
        self._topic = topic
        self._group = group
        self._group_index = group_index
        self._number = number
        self._owner = owner
        self._logged = type(path) is LoggedPath
        if self._logged and (<LoggedPath>path)._always:
            self._awake_ns = _ALWAYS_AWAKE_NS

    def __call__(self, double ack_timeout, bint auto_ack):
        return self._read(ack_timeout, auto_ack)

    def wait_read(self, double ack_timeout, bint auto_ack, double timeout):
        """`__call__`, waiting up to `timeout` seconds (no limit when it
        is negative) for a message on the core.

        Returns None at the timeout, and as soon as the case is the
        backend's: the backend closed, the topic off its core, the
        consumer closed. The caller then uses `fetch` with the time
        left. The periodic check for dead consumers runs in the wait,
        through the backend's `_fast_core`.

        The wait runs without the GIL on the core's change word, in
        slices of at most 50 ms, so signal handlers run between them.
        Nothing is taken while it waits.
        """
        cdef double now, deadline
        cdef uint32_t epoch
        cdef TopicCore core
        cdef bint woke = False
        message = self._read_checked(ack_timeout, auto_ack)
        if message is not None or not self._nothing_ready:
            return message
        now = mqs_monotonic_ns() / 1e9
        deadline = now + timeout if timeout >= 0 else now + 1e18
        while now < deadline:
            core = self._waitable_core(now)
            if core is None:
                return None
            try:
                epoch = core.wait_prepare()
            except TopicRetired:
                return None
            try:
                # Again after registering, so that a publish in between
                # is not missed.
                message = self._read_checked(ack_timeout, auto_ack)
            except BaseException:
                core.cancel_wait()
                raise
            if message is not None or not self._nothing_ready:
                core.cancel_wait()
                return message
            if woke:
                self._empty_wake_count += 1
            core._wait_fetchable(epoch, min(deadline - now, 0.05),
                                 self._number, self._group_index,
                                 self._owner, auto_ack, self._awake_ns)
            woke = True
            PyErr_CheckSignals()
            now = mqs_monotonic_ns() / 1e9
        return None

    @property
    def _awake_wait_ns(self):
        """Test hook: how long a wait stays awake before it sleeps (0:
        the default of `mqs_wait_park`)."""
        return self._awake_ns

    @property
    def _empty_wakes(self):
        """Test hook: waits of `wait_read` that ended (a change, a slice
        of at most 50 ms, a close) and then found nothing to take."""
        return self._empty_wake_count

    cdef object _read_checked(self, double ack_timeout, bint auto_ack):
        """`_read`, for `wait_read`: when the read left the case to the
        backend, run the periodic check for dead consumers if it is due
        (`_usable_core` leaves that to the backend, and it falls due every
        50 ms on the shm backend) and read once more. Other threads may
        hold the GIL for milliseconds between the wait's check and the
        read, so without this a get went to `fetch` now and then."""
        message = self._read(ack_timeout, auto_ack)
        if message is not None or self._nothing_ready:
            return message
        if self._waitable_core(mqs_monotonic_ns() / 1e9) is None:
            return None
        return self._read(ack_timeout, auto_ack)

    cdef TopicCore _waitable_core(self, double now):
        """Return the core to wait on for `wait_read`, or None when the
        case is the backend's (see there)."""
        cdef dict state = self._path._state
        cdef PyObject *item = PyDict_GetItemWithError(state, "_closed")
        if item == NULL or <object>item is not False:
            return None
        item = PyDict_GetItemWithError(state, "_next_reap")
        if item == NULL:
            return None
        if now >= <double><object>item:
            # The periodic check for dead consumers, under the section,
            # as the backend's `fetch` runs it; then the wait goes on.
            self._path._backend._fast_core(self._topic)
            item = PyDict_GetItemWithError(state, "_next_reap")
            if item == NULL or now >= <double><object>item:
                return None
        if getattr(self._consumer, "_closed", True) is not False:
            return None
        if self._logged:
            handle = (<LoggedPath>self._path)._handle(self._topic)
            if handle is None:
                return None
            return <TopicCore?>handle._core
        return self._path._usable_core(self._topic)

    cdef object _read(self, double ack_timeout, bint auto_ack):
        """`__call__`; sets `_nothing_ready`."""
        cdef mqs_tc_delivery_t *d
        cdef uint64_t seq, ticket, attempts
        cdef uint32_t slot, priority
        cdef double timestamp
        self._nothing_ready = False
        if self._logged:
            return (<LoggedPath>self._path)._take(self, ack_timeout, auto_ack)
        core = self._path._usable_core(self._topic)
        if core is None:
            return None
        try:
            payload = core._take_one(self._number, ack_timeout, auto_ack,
                                     self._owner, self._path._checked_at)
        except (TopicRetired, ShutDown):
            # `fetch` moves the topic or raises with the consumer named.
            return None
        if core._has_dead():
            # Into the topic's dead-letter queue in the journal, without
            # losing the message delivered here if that fails.
            if payload is None:
                self._path._backend._collect_dead(self._topic)
            else:
                self._path._backend._collect_dead_after_delivery(
                    self._topic)
        if payload is None:
            self._nothing_ready = True
            return None

        # Copied before the unpickler runs, because it may run code that
        # fetches through this handle again.
        d = core._out
        seq, slot, ticket = d.seq, d.slot, d.ticket
        attempts, priority, timestamp = d.attempts, d.priority, d.timestamp
        return self._message(core, payload, seq, slot, ticket, attempts,
                             priority, timestamp, auto_ack)

    cdef object _message(self, TopicCore core, bytes payload, uint64_t seq,
                         uint32_t slot, uint64_t ticket, uint64_t attempts,
                         uint32_t priority, double timestamp, bint auto_ack):
        """Unpickle `payload` and return the message of this delivery."""
        cdef MessageBase message
        try:
            body, headers, reply_to, correlation_id = _decode_payload(payload)
        except Exception as exc:  # whatever the body's unpickling raised
            # Imported here: mqs.broker imports this module.
            from mqs.broker._backend import decode_error
            raise decode_error(self._topic, _message_id(seq), exc,
                               auto_ack) from exc

        message = <MessageBase>(<PyTypeObject *>self._message_type).tp_new(
            self._message_type, <PyObject *>_NO_ARGS, NULL)
        message._consumer = self._consumer
        message._settled = auto_ack
        message.id = _message_id(seq)
        message.topic = self._topic
        message.group = self._group
        message.body = body
        message.priority = priority
        message.attempts = attempts
        message.key = None
        message.headers = headers
        message.timestamp = timestamp
        message.reply_to = reply_to
        message.correlation_id = correlation_id
        message._reader = self
        message._core = core
        message._slot = slot
        message._ticket = ticket
        message._seq = seq
        return message

    cdef object _delivery_of(self, MessageBase message):
        """Build the `Delivery` of a message this reader returned."""
        # The tag names the core file, so a tag of a deleted topic's core
        # never settles a delivery of a later core of the same name.
        return self._delivery_type(
            message.id, (message._core.path, self._group_index,
                         message._slot, message._ticket, message._seq),
            self._topic, self._group, message.body, message.priority,
            message.attempts, None, message.headers, message.timestamp,
            message.reply_to, message.correlation_id)


@cython.auto_pickle(False)
cdef class LoggedPath(CorePath):
    """The fast paths of one `SharedLogBackend` on its topic cores.

    What `CorePath` and `CoreReader` do on the shm backend, inside the
    log backend's section (`JournalSection`), appending the record of
    each core operation as the backend's `_LoggedCore` handles do
    (``image_publish``, ``image_deliver``, ``image_ack``), and waiting
    for the sync of ``fsync="always"`` where the backend's methods wait.
    The backend's ``_cores`` holds those handles; each call reads it,
    ``_lock`` (the section) and ``_failed`` from the instance dict, and
    checks after entering the section that the catch-up left the
    topic's handle in place. Every other case goes to the backend's
    methods.

    Under "always" `publish_one` stores its message without waking the
    topic's consumers, and the wake-up comes when the sync that covers
    it starts (`_sync`). The producers of a group commit then append
    their records without consumers taking the GIL and a vCPU from them,
    and the consumers work while the sync runs: with 4 producer threads
    and 1 consumer the broker moved 14,300 messages per second instead of
    11,800 (2-vCPU guest, BENCHMARKS.md). A publish returns only once a
    signal covered it (`_sync`), so no consumer sleeps past it.
    """

    cdef bint _always
    # Cores with publishes of this process that no signal covered yet.
    cdef set _quiet

    def __init__(self, backend):
        CorePath.__init__(self, backend)
        self._always = backend.fsync == "always"
        self._quiet = set()

    cdef object _item(self, str name):
        """Return the backend's instance attribute `name`, or None."""
        cdef PyObject *item = PyDict_GetItemWithError(self._state, name)
        if item == NULL:
            return None
        return <object>item

    cdef int _wake_quiet(self) except -1:
        """Signal every core with a publish that no signal covered."""
        cdef TopicCore core
        if self._quiet:
            for core in self._quiet:
                core._signal_quiet()
            self._quiet.clear()
        return 0

    cdef int _sync(self, TopicCore core, uint64_t quiet) except -1:
        """Return once this thread's last record is durable, as the
        backend's `_sync` does under fsync="always", and once the
        consumers of `core` were told of its publish number `quiet` (0
        for none).

        This process's writer syncs its own log here with the steps of
        `_sync`, `_wait_durable`, `_flush_log` and `_publish_durable`,
        without their Python frames, and wakes the consumers of every
        quiet publish when its call is the one that starts the sync.
        Every other case runs the backend's `_sync`: a closed broker,
        another process as the writer, a log that is behind the journal,
        a failed append or sync, or a mark that the log state does not
        reach yet.
        """
        try:
            self._sync_durable()
        finally:
            # The sync did not start through this process's writer, or
            # another thread started it before this one could wake the
            # consumers: wake them now.
            if quiet and core._quiet_signaled < quiet:
                self._wake_quiet()
        return 0

    cdef int _sync_durable(self) except -1:
        cdef object backend = self._backend
        cdef dict state = self._state
        durable = self._item("_durable")
        target = getattr(self._item("_local"), "mark", 0)
        if durable is None or self._item("_closed") is not False:
            backend._sync(backend._log)
            return 0
        if durable[_DURABLE_POSITION] >= target:
            return 0
        log_state = self._item("_log_state")
        if (self._item("_writer") is not True
                or self._item("_log_behind") is not False
                or self._item("_failed") is not None
                or durable[_DURABLE_FAILED]
                or type(log_state) is not tuple
                or log_state[0] is None or log_state[1] < target):
            backend._sync(backend._log)
            return 0
        log, mark = log_state
        thread_lock = self._section().thread_lock
        # Counted in `_waiting` as in `_sync`: `close` waits for counted
        # threads before it unmaps the journal and the durable words.
        with thread_lock:
            if self._item("_closed") is not False:
                backend._sync(backend._log)
                return 0
            state["_waiting"] = state["_waiting"] + 1
        try:
            if self._quiet:
                # A stand-in log (the crash tests wrap it) has no hint:
                # wake the consumers before its sync.
                starts_now = getattr(log, "_sync_starts_now", None)
                if starts_now is None or starts_now():
                    self._wake_quiet()
            backend._sync_writer_log(log)
            if mark > durable[_DURABLE_POSITION]:
                durable[_DURABLE_POSITION] = mark
            self._item("_journal").signal(_DURABLE_WORD)
        finally:
            with thread_lock:
                state["_waiting"] = state["_waiting"] - 1
        if durable[_DURABLE_POSITION] < target:
            backend._sync(backend._log)
        return 0

    cdef object _handle(self, str topic):
        """Return the backend's `_LoggedCore` of `topic`, or None."""
        cdef PyObject *item = PyDict_GetItemWithError(self._state, "_cores")
        if item == NULL or type(<object>item) is not dict:
            return None
        item = PyDict_GetItemWithError(<object>item, topic)
        if item == NULL:
            return None
        return <object>item

    cdef int _check_failed(self) except -1:
        """Raise the backend's error after a failed log append, before a
        core operation whose record could not be logged. The caller
        holds the section."""
        cdef PyObject *failed = PyDict_GetItemWithError(self._state,
                                                        "_failed")
        if failed != NULL and <object>failed is not None:
            raise self._backend._failed_error()
        return 0

    cdef JournalSection _section(self):
        cdef PyObject *item = PyDict_GetItemWithError(self._state, "_lock")
        if item == NULL:
            raise AttributeError(f"{self._backend!r} has no section")
        return <JournalSection?><object>item

    def publish_one(self, str topic, body, int priority):
        """`SharedLogBackend.publish_one`: pickle, store and log one
        message without options; return its id, or None to make the
        caller use `publish`."""
        cdef uint64_t quiet = 0
        cdef TopicCore core = None
        backend = self._backend
        try:
            handle = self._handle(topic)
            if handle is None:
                return backend._publish_journal_one(topic, body, priority)
            core = <TopicCore?>handle._core
            return self._publish(handle, topic, body, priority, &quiet)
        finally:
            if self._always:
                self._sync(core, quiet)

    cdef object _publish(self, handle, str topic, body, int priority,
                         uint64_t *quiet):
        """Store and log one message; under "always" without waking the
        consumers, setting `quiet` to the core's quiet publish number."""
        cdef TopicCore core = <TopicCore?>handle._core
        cdef bytes payload = _dumps(body, _PICKLE_PROTOCOL)
        cdef double wall
        cdef int64_t seq = 0
        cdef JournalSection section
        wall = _wall_clock()
        section = self._section()
        section.enter_section()
        try:
            self._check_failed()
            if self._handle(topic) is not handle:
                # The catch-up applied a delete or a move.
                return None
            seq = core._publish_payload(payload, priority, wall,
                                        mqs_monotonic_ns() / 1e9,
                                        not self._always)
            if seq <= 0:
                # Full, at maxsize, or larger than a slot.
                return None
            if self._always:
                quiet[0] = core._quiet_published
                self._quiet.add(core)
            section.log_record("image_publish",
                               (topic, seq, priority, wall, payload))
        except TopicRetired:
            return None
        finally:
            section.leave_section()
        return _message_id(<uint64_t>seq)

    cdef object _take(self, CoreReader reader, double ack_timeout,
                      bint auto_ack):
        """`CoreReader.__call__` on a core of the log backend."""
        cdef TopicCore core
        cdef JournalSection section
        cdef mqs_tc_delivery_t *d
        cdef uint64_t seq = 0, ticket = 0, attempts = 0
        cdef uint32_t slot = 0, priority = 0
        cdef double timestamp = 0
        handle = self._handle(reader._topic)
        if handle is None:
            return None
        core = <TopicCore?>handle._core
        payload = None
        section = self._section()
        section.enter_section()
        try:
            self._check_failed()
            if self._handle(reader._topic) is not handle:
                return None
            payload = core._take_one(reader._number, ack_timeout, auto_ack,
                                     reader._owner,
                                     mqs_monotonic_ns() / 1e9)
            if payload is not None:
                # Copied before anything else runs on the core.
                d = core._out
                seq, slot, ticket = d.seq, d.slot, d.ticket
                attempts, priority = d.attempts, d.priority
                timestamp = d.timestamp
                section.log_record("image_deliver", (
                    reader._topic, reader._group, auto_ack,
                    [(seq, attempts, ticket)], reader._number, ack_timeout))
        except (TopicRetired, ShutDown):
            # `fetch` moves the topic or raises with the consumer named.
            return None
        finally:
            section.leave_section()
        if core._has_dead():
            # Into the topic's dead-letter queue in the journal, without
            # losing the message delivered here if that fails.
            if payload is None:
                self._backend._collect_dead(reader._topic)
            else:
                self._backend._collect_dead_after_delivery(reader._topic)
        if payload is None:
            reader._nothing_ready = True
            return None
        if auto_ack and self._always and self._backend._sync_acks:
            self._backend._sync(self._backend._log)
        return reader._message(core, payload, seq, slot, ticket, attempts,
                               priority, timestamp, auto_ack)

    cdef object _ack(self, MessageBase message):
        """Ack `message` as `SharedLogBackend.ack` does; return None when
        its core is no longer the topic's, for the backend's `ack`."""
        cdef CoreReader reader = message._reader
        cdef TopicCore core = message._core
        cdef JournalSection section
        cdef bint done = False
        handle = self._handle(reader._topic)
        if handle is None or handle._core is not core:
            return None
        section = self._section()
        section.enter_section()
        try:
            self._check_failed()
            if self._handle(reader._topic) is not handle:
                return None
            done = core._ack(reader._group_index, message._slot,
                             message._ticket, mqs_monotonic_ns() / 1e9) == 1
            if done:
                section.log_record("image_ack", (reader._topic, reader._group,
                                                 message._seq))
        except TopicRetired:
            return None
        finally:
            section.leave_section()
        if self._always and self._backend._sync_acks:
            self._backend._sync(self._backend._log)
        return done
