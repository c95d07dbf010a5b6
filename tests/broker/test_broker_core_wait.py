"""`Consumer.get` waiting on a topic core (`CoreReader.wait_read`).

On the shm and log backends a `get` that finds nothing ready waits on
the topic core's change word without the GIL and takes the message in
C when it comes, without the backend's Python `fetch`. Every case that
the backend must handle (a closed consumer or broker, the topic leaving
its core, the periodic check for dead consumers) goes back to `fetch`
with the time left. These tests check that the wait is the C one, that
it ends on a publish, a timeout, a close and a signal, and that it
never takes a message it does not return. It also gets a message that
comes back after an ack deadline or from a SIGKILLed process, and one
published after the topic moved off its core.
"""

import os
import signal
import threading
import time

import pytest

import mqs
from mqs._topiccore import CoreReader


@pytest.fixture
def broker(core_broker):
    """The shm and the log broker (conftest), the two with topic cores."""
    return core_broker


def count_fetches(consumer):
    """Count the calls of the backend's Python `fetch` by `consumer`."""
    backend = consumer._backend
    calls = []
    original = backend.fetch

    def fetch(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    backend.fetch = fetch
    return calls


def publish_later(broker, body, delay, topic="t"):
    thread = threading.Timer(delay, broker.publish, (topic, body))
    thread.start()
    return thread


@pytest.mark.parametrize("backend, fsync, awake_ns", [
    ("shm", None, 0), ("log", "interval", 0), ("log", "always", 200_000)])
def test_always_consumers_stay_awake_longer(tmp_path, backend, fsync,
                                            awake_ns):
    """Only the consumers of a log broker under fsync="always", whose
    next message comes about one disk sync later, stay awake 200 us
    before they sleep; the others keep the default."""
    name = f"test-awake-{os.getpid()}-{tmp_path.name}"
    if backend == "shm":
        opened = mqs.Broker(backend="shm", name=name)
    else:
        opened = mqs.Broker(backend="log", path=str(tmp_path / "b"),
                            fsync=fsync)
    try:
        consumer = opened.consume("t", "g")
        assert type(consumer._read_one) is CoreReader
        assert consumer._read_one._awake_wait_ns == awake_ns
        opened.publish("t", "x")
        assert consumer.get(timeout=5).body == "x"
    finally:
        opened.close()
        if backend == "shm":
            mqs.Broker.unlink(name)


def test_get_runs_due_reap_in_c(broker):
    """A get that finds the periodic check for dead consumers due runs
    it and waits in C, without the backend's Python `fetch` (on a busy
    machine 50 ms pass easily between the last check and a get)."""
    consumer = broker.consume("t", "g", ack_timeout=60)
    calls = count_fetches(consumer)
    timer = publish_later(broker, "late", 0.2)
    consumer._backend._next_reap = 0.0
    message = consumer.get(timeout=30)
    timer.join()
    assert message.body == "late"
    assert calls == []
    assert consumer._backend._next_reap > 0.0


def test_wait_ignores_changes_for_others(broker):
    """A consumer with no room (prefetch 1, one message unacked) waits
    through the publishes, deliveries and acks of another consumer of its
    group. They do not send it back to take nothing each time, and only
    the ends of its 50 ms slices wake it. Once its message is acked it
    has room, and the next publish reaches it."""
    count = 80
    waiting = broker.consume("t", "g", prefetch=1, ack_timeout=60)
    other = broker.consume("t", "g", prefetch=100, ack_timeout=60)
    broker.publish("t", "first")
    unacked = waiting.get(timeout=5)
    reader = waiting._read_one
    outcome = []

    def wait():
        try:
            waiting.get(timeout=1.0)
        except mqs.Empty:
            outcome.append("empty")
        else:
            outcome.append("message")

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.05)
    # Spread over about 0.4 s, with the GIL free in between, so that
    # each change could wake the waiting thread.
    for n in range(count):
        broker.publish("t", n)
        other.get(timeout=5).ack()
        time.sleep(0.005)
    thread.join(30)
    assert outcome == ["empty"]
    # About one wake per 50 ms slice of its 1 s wait, not one per change
    # (240 of them).
    assert reader._empty_wakes <= 30
    unacked.ack()
    broker.publish("t", "after")
    assert waiting.get(timeout=5).body == "after"


def test_get_waits_in_c(broker):
    consumer = broker.consume("t", "g", ack_timeout=60)
    assert type(consumer._read_one) is CoreReader
    calls = count_fetches(consumer)
    timer = publish_later(broker, "late", 0.2)
    started = time.monotonic()
    message = consumer.get(timeout=30)
    elapsed = time.monotonic() - started
    timer.join()
    assert message.body == "late"
    assert elapsed >= 0.15
    # Neither the wait nor the take went through the Python path.
    assert calls == []
    assert message.ack()
    assert broker.stats("t")["acked"] == 1


def test_get_timeout_raises_empty(broker):
    consumer = broker.consume("t", "g", ack_timeout=60)
    started = time.monotonic()
    with pytest.raises(mqs.Empty):
        consumer.get(timeout=0.3)
    assert time.monotonic() - started >= 0.3
    # A message published after the timeout is still there.
    broker.publish("t", "after")
    assert consumer.get(timeout=5).body == "after"


def test_get_waits_while_prefetch_is_held(broker):
    consumer = broker.consume("t", "g", prefetch=1, ack_timeout=60)
    broker.publish_many("t", ["a", "b"])
    first = consumer.get(timeout=5)
    # "b" is ready, but the consumer has its one unacked message: the
    # get waits until the ack from another thread makes room.
    timer = threading.Timer(0.2, first.ack)
    timer.start()
    started = time.monotonic()
    second = consumer.get(timeout=30)
    timer.join()
    assert second.body == "b"
    assert time.monotonic() - started >= 0.15


def test_consumer_close_ends_waiting_get(broker):
    consumer = broker.consume("t", "g", ack_timeout=60)
    timer = threading.Timer(0.2, consumer.close)
    timer.start()
    started = time.monotonic()
    with pytest.raises(mqs.ShutDown):
        consumer.get(timeout=30)
    timer.join()
    assert time.monotonic() - started < 10
    # Nothing was taken by the closed consumer.
    broker.publish("t", "kept")
    other = broker.consume("t", "g", ack_timeout=60)
    assert other.get(timeout=5).body == "kept"


class Interrupted(Exception):
    pass


def test_signal_handler_ends_waiting_get(broker):
    def handler(signum, frame):
        raise Interrupted()

    consumer = broker.consume("t", "g", ack_timeout=60)
    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        started = time.monotonic()
        with pytest.raises(Interrupted):
            consumer.get(timeout=30)
        assert time.monotonic() - started < 10
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    # The interrupted get took nothing: the next one gets the message
    # as its first delivery.
    broker.publish("t", "once")
    message = consumer.get(timeout=5)
    assert message.body == "once"
    assert message.attempts == 1
    assert broker.stats("t")["delivered"] == 1


def test_delete_topic_ends_waiting_get(broker):
    consumer = broker.consume("t", "g", ack_timeout=60)
    timer = threading.Timer(0.2, broker.delete_topic, ("t",))
    timer.start()
    started = time.monotonic()
    # The wait goes back to the backend, which raises for the topic that
    # is gone or waits out the timeout; it never hangs past it.
    with pytest.raises((mqs.Empty, mqs.ShutDown, mqs.UnknownTopic)):
        consumer.get(timeout=1.0)
    timer.join()
    assert time.monotonic() - started < 10


def test_waiting_consumers_get_every_message(broker):
    count = 400
    consumers = [broker.consume("t", "g", prefetch=1, ack_timeout=60)
                 for _ in range(3)]
    received = []
    lock = threading.Lock()
    errors = []

    def consume(consumer):
        try:
            while True:
                try:
                    message = consumer.get(timeout=2)
                except mqs.Empty:
                    return
                with lock:
                    received.append(message.body)
                assert message.ack()
        except BaseException as exc:  # reported after the join
            errors.append(exc)

    def produce(part):
        for n in range(part, count, 4):
            broker.publish("t", n)
            if n % 50 == 0:
                time.sleep(0.01)

    threads = [threading.Thread(target=consume, args=(consumer,))
               for consumer in consumers]
    threads += [threading.Thread(target=produce, args=(part,))
                for part in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert sorted(received) == list(range(count))
    stats = broker.stats("t")
    assert stats["acked"] == count
    assert stats["delivered"] == count


def reopen(broker):
    """Open the broker that `broker` opened, as another process would."""
    backend = broker.backend
    if backend.name == "log":
        return mqs.Broker(backend="log", path=backend.path,
                          segment_bytes=1 << 20)
    return mqs.Broker(backend="shm", name=backend.shm_name)


def get_in_thread(consumer, timeout):
    """Start `consumer.get(timeout)` in a thread; return the thread and a
    dict that gets "message" or "error", and "seconds"."""
    result = {}

    def get():
        started = time.monotonic()
        try:
            result["message"] = consumer.get(timeout=timeout)
        except BaseException as exc:  # checked by the caller
            result["error"] = exc
        result["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=get)
    thread.start()
    return thread, result


def test_ack_timeout_redelivers_to_waiting_get(broker):
    holder = broker.consume("t", "g", ack_timeout=0.5)
    waiter = broker.consume("t", "g", ack_timeout=60)
    broker.publish("t", "expires")
    assert holder.get(timeout=5).body == "expires"
    started = time.monotonic()
    # Nothing signals the core when the deadline passes: the waiting get
    # must look again between its wait slices.
    message = waiter.get(timeout=30)
    elapsed = time.monotonic() - started
    assert message.body == "expires"
    assert message.attempts == 2
    assert 0.3 <= elapsed < 10


def test_killed_process_redelivers_to_waiting_get(broker):
    waiter = broker.consume("t", "g", ack_timeout=600)
    broker.publish("t", "held")

    # A forked child takes the message with a consumer of its own, then
    # dies with the message in flight.
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            child = reopen(broker)
            consumer = child.consume("t", "g", ack_timeout=600)
            body = consumer.get(timeout=10).body
            os.write(write_fd, body.encode())
        finally:
            os.kill(os.getpid(), signal.SIGKILL)

    os.close(write_fd)
    try:
        _, status = os.waitpid(pid, 0)
        child_body = os.read(read_fd, 100)
    finally:
        os.close(read_fd)
    assert os.WIFSIGNALED(status)
    assert child_body == b"held"
    # The dead process's consumer is closed by the periodic check that
    # the waiting get runs, long before the 600 s ack deadline.
    started = time.monotonic()
    message = waiter.get(timeout=30)
    assert message.body == "held"
    assert message.attempts == 2
    assert time.monotonic() - started < 10
    assert message.ack()
    assert broker.stats("t")["stored"] == 0


def test_topic_moved_off_core_during_waiting_get(broker):
    consumer = broker.consume("t", "g", ack_timeout=60)
    assert "t" in broker.backend._core_paths
    thread, result = get_in_thread(consumer, 30)
    time.sleep(0.2)
    # A core stores no delayed message, so this moves the topic to the
    # journal while the get waits on the core.
    broker.publish("t", "delayed", delay=0.3)
    thread.join(60)
    assert "t" not in broker.backend._core_paths
    assert "error" not in result
    assert result["message"].body == "delayed"
    assert result["seconds"] < 10


def test_broker_close_ends_waiting_get(broker):
    consumer = broker.consume("t", "g", ack_timeout=60)
    thread, result = get_in_thread(consumer, 30)
    time.sleep(0.2)
    broker.close()
    thread.join(60)
    assert isinstance(result.get("error"), mqs.ShutDown)
    assert result["seconds"] < 10


def test_keyboard_interrupt_ends_waiting_get(broker):
    consumer = broker.consume("t", "g", ack_timeout=60)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        consumer.get(timeout=30)
    timer.join()
    assert time.monotonic() - started < 10
    broker.publish("t", "next")
    message = consumer.get(timeout=5)
    assert message.body == "next"
    assert message.attempts == 1
