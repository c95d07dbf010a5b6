"""Scheduled delivery in mqs.Queue: put(item, delay=...) and put(at=...)."""

import datetime
import threading
import time

import pytest

import mqs

# Generous upper bound on how late a delayed item may arrive on a busy
# 2-core machine; the lower bound (never early) is exact.
LATE_BOUND_S = 0.5


def test_delay_item_invisible_until_due():
    q = mqs.Queue()
    q.put("later", delay=0.2)
    assert q.qsize() == 0
    assert q.empty()
    assert q.delayed == 1
    with pytest.raises(mqs.Empty):
        q.get_nowait()


def test_delay_item_never_early():
    q = mqs.Queue()
    start = time.monotonic()
    q.put("x", delay=0.15)
    assert q.get(timeout=5) == "x"
    waited = time.monotonic() - start
    assert waited >= 0.15
    assert waited < 0.15 + LATE_BOUND_S


def test_delay_items_come_in_due_order():
    q = mqs.Queue()
    q.put("c", delay=0.30)
    q.put("a", delay=0.10)
    q.put("now")
    q.put("b", delay=0.20)
    got = [q.get(timeout=5) for _ in range(4)]
    assert got == ["now", "a", "b", "c"]


def test_delay_equal_deadlines_keep_put_order():
    q = mqs.Queue()
    at = time.time() + 0.1
    for value in range(20):
        q.put(value, at=at)
    got = [q.get(timeout=5) for _ in range(20)]
    assert got == list(range(20))


def test_delay_zero_is_ready_on_next_get():
    q = mqs.Queue()
    q.put("x", delay=0)
    assert q.get_nowait() == "x"


def test_delay_due_item_not_starved_by_ready_items():
    q = mqs.Queue()
    q.put("delayed", delay=0.05)
    time.sleep(0.1)
    for value in range(10):
        q.put(value)
    assert q.get_nowait() == "delayed"


def test_delay_blocked_get_wakes_for_new_earlier_item():
    q = mqs.Queue()
    q.put("late", delay=30)
    result = []

    def consume():
        result.append((q.get(timeout=10), time.monotonic()))

    consumer = threading.Thread(target=consume)
    consumer.start()
    time.sleep(0.05)
    put_at = time.monotonic()
    q.put("soon", delay=0.1)
    consumer.join(timeout=10)
    assert not consumer.is_alive()
    assert result[0][0] == "soon"
    assert result[0][1] - put_at >= 0.1
    assert result[0][1] - put_at < 0.1 + LATE_BOUND_S


def test_delay_get_timeout_before_due_raises_empty():
    q = mqs.Queue()
    q.put("x", delay=1.0)
    start = time.monotonic()
    with pytest.raises(mqs.Empty):
        q.get(timeout=0.1)
    assert time.monotonic() - start >= 0.1
    assert q.delayed == 1


def test_at_datetime_aware_and_naive():
    q = mqs.Queue()
    now = datetime.datetime.now(datetime.timezone.utc)
    q.put("aware", at=now + datetime.timedelta(seconds=0.1))
    q.put("naive", at=datetime.datetime.now() + datetime.timedelta(seconds=0.2))
    start = time.monotonic()
    assert q.get(timeout=5) == "aware"
    assert q.get(timeout=5) == "naive"
    assert time.monotonic() - start >= 0.15


def test_at_in_past_is_ready_at_once():
    q = mqs.Queue()
    q.put("x", at=time.time() - 3600)
    assert q.get_nowait() == "x"


def test_at_ignores_wall_clock_step_after_put(monkeypatch):
    q = mqs.Queue()
    q.put("x", at=time.time() + 0.2)
    real_time = time.time
    # The wall clock jumps an hour ahead, then an hour back: the item
    # keeps its monotonic deadline either way.
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
    with pytest.raises(mqs.Empty):
        q.get_nowait()
    monkeypatch.setattr(time, "time", lambda: real_time() - 3600)
    start = time.monotonic()
    assert q.get(timeout=5) == "x"
    assert time.monotonic() - start < LATE_BOUND_S + 0.2


def test_delay_maxsize_counts_delayed_items():
    q = mqs.Queue(maxsize=2)
    q.put(1, delay=60)
    q.put(2)
    assert q.full()
    assert q.qsize() == 1
    with pytest.raises(mqs.Full):
        q.put(3, timeout=0.05)
    with pytest.raises(mqs.Full):
        q.put(4, delay=1, block=False)


def test_delay_join_waits_for_delayed_items():
    q = mqs.Queue()
    q.put("x", delay=0.1)
    done = threading.Event()

    def joiner():
        q.join()
        done.set()

    thread = threading.Thread(target=joiner)
    thread.start()
    assert not done.wait(0.05)
    assert q.get(timeout=5) == "x"
    q.task_done()
    assert done.wait(5)
    thread.join(timeout=5)


def test_delay_shutdown_immediate_drops_delayed():
    q = mqs.Queue()
    q.put("x", delay=60)
    q.put("y")
    q.shutdown(immediate=True)
    assert q.delayed == 0
    assert q.unfinished_tasks == 0
    with pytest.raises(mqs.ShutDown):
        q.get_nowait()


def test_delay_shutdown_keeps_delivering_delayed():
    q = mqs.Queue()
    q.put("x", delay=0.1)
    q.shutdown()
    assert q.get(timeout=5) == "x"
    with pytest.raises(mqs.ShutDown):
        q.get(timeout=1)


def test_delay_put_on_shut_down_queue_raises():
    q = mqs.Queue()
    q.shutdown()
    with pytest.raises(mqs.ShutDown, match="put on a shut-down queue"):
        q.put("x", delay=1)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"delay": -1}, ValueError, "delay must be a finite number of seconds >= 0, got -1"),
        ({"delay": float("inf")}, ValueError, "got inf"),
        ({"delay": "1"}, TypeError, "delay must be a number of seconds, got str '1'"),
        ({"delay": True}, TypeError, "got bool True"),
        ({"at": "tomorrow"}, TypeError, "at must be a datetime or epoch seconds"),
        ({"at": float("nan")}, ValueError, "at must be a finite epoch time"),
        ({"delay": 1, "at": 1}, ValueError, "pass delay or at, not both"),
        ({"delay": 1e300}, ValueError,
         r"delay must be at most mqs.MAX_DELAY_SECONDS = 315576000 seconds "
         r"\(10 years\), got 1e\+300"),
        ({"delay": mqs.MAX_DELAY_SECONDS + 1}, ValueError, "got 315576001.0"),
        ({"at": 1e300}, ValueError,
         r"at must be at most .* \(10 years\) from now, got 1e\+300"),
        ({"at": datetime.datetime(9999, 1, 1)}, ValueError,
         r"from now, got datetime.datetime\(9999, 1, 1, 0, 0\)"),
    ],
)
def test_delay_rejects_bad_input(kwargs, error, message):
    q = mqs.Queue()
    with pytest.raises(error, match=message):
        q.put("x", **kwargs)
    assert q.qsize() == 0
    assert q.delayed == 0
    assert q.unfinished_tasks == 0


def test_delay_max_delay_stays_pending():
    q = mqs.Queue()
    q.put("x", delay=mqs.MAX_DELAY_SECONDS)
    q.put("y", at=time.time() + mqs.MAX_DELAY_SECONDS - 60)
    assert q.delayed == 2
    with pytest.raises(mqs.Empty):
        q.get(timeout=0.05)


def test_delay_lateness_has_no_cumulative_drift():
    """600 items due every 2 ms reach a busy consumer on time."""
    q = mqs.Queue()
    count = 600
    spacing = 0.002
    start = time.monotonic() + 0.05
    for index in range(count):
        q.put((index, start + index * spacing), delay=start + index * spacing - time.monotonic())
    lateness = []
    since_due = []
    for _ in range(count):
        called = time.monotonic()
        index, due = q.get(timeout=10)
        arrived = time.monotonic()
        since_due.append(arrived - due)
        # On a loaded machine the consumer can fall behind and call get
        # after the item was due. The queue's part of the lateness counts
        # from the later of the two.
        lateness.append(arrived - max(due, called))
        # Keep the consumer busy for about half of each interval.
        busy_until = time.monotonic() + spacing / 2
        while time.monotonic() < busy_until:
            pass
    assert min(since_due) >= 0
    assert sorted(lateness)[count // 2] < LATE_BOUND_S
    # Drift would make the last items later than the first ones; a
    # machine busy with other work only adds noise to both ends.
    tenth = count // 10
    first = sum(lateness[:tenth]) / tenth
    last = sum(lateness[-tenth:]) / tenth
    assert last - first < LATE_BOUND_S
