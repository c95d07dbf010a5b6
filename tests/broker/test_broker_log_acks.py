"""Acks of the log broker under fsync="always": they return before their
sync, and what SIGKILL and a power loss do to them.

A publish returns after a sync that covers its record. An ack, nack or
auto_ack delivery returns once its record is appended; the next sync
covers it, at most `fsync_interval_s` later. ``sync_acks=True`` makes
it wait like a publish. The sync test hook of `mqs.SegmentLog` holds
syncs back, so the tests can see which calls wait for one.

The crash tests run the broker in a child process and kill it with
SIGKILL. A power loss is simulated by zeroing every record of the log
that the last completed sync did not cover (the child reports each
sync's end offset from the hook) and removing the /dev/shm journal, so
the log alone restores the broker.
"""

import asyncio
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import mqs
from mqs.broker._log_shared import unlink_journal

SEGMENT = 4 << 20
HEADER_BYTES = 4096


@pytest.fixture
def path(tmp_path):
    directory = tmp_path / "broker"
    yield directory
    unlink_journal(directory)


def open_broker(path, **options):
    return mqs.Broker(backend="log", path=path, fsync="always",
                      segment_bytes=SEGMENT, **options)


def wait_synced(log, timeout=30):
    """Wait until a sync covers every record of `log`."""
    deadline = time.monotonic() + timeout
    while log.synced_offset < log.end_offset:
        assert time.monotonic() < deadline, (log.synced_offset,
                                             log.end_offset)
        time.sleep(0.005)


class SyncGate:
    """A sync hook that blocks every sync before its I/O until `open`."""

    def __init__(self, log):
        self.log = log
        self.released = threading.Event()
        self.entered = threading.Event()
        self.synced = []
        log._set_sync_hook(self._hook)

    def _hook(self, end, phase):
        if phase == 0:
            self.entered.set()
            assert self.released.wait(60), "sync gate never opened"
        else:
            self.synced.append(end)
        return 0

    def open(self):
        self.released.set()

    def remove(self):
        self.released.set()
        # Closing the broker closed the log, and its hook with it.
        if not self.log.closed:
            self.log._set_sync_hook(None)


@pytest.fixture
def sync_gate():
    """Return a function that puts a `SyncGate` on the log of a broker,
    once a sync covers every record so far; the gates and their timers
    are removed after the test.

    With `fallback_s`, a timer opens the gate after that many seconds,
    in case the thread held in the sync is the event loop's, so that a
    failing run ends.
    """
    gates = []
    timers = []

    def install(broker, fallback_s=None):
        log = broker._backend._log
        wait_synced(log)
        gate = SyncGate(log)
        gates.append(gate)
        if fallback_s is not None:
            timer = threading.Timer(fallback_s, gate.open)
            timers.append(timer)
            timer.start()
        return gate

    yield install
    for timer in timers:
        timer.cancel()
    for gate in gates:
        gate.remove()


def run_in_thread(function, *args):
    result = {}

    def run():
        result["value"] = function(*args)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_always_publish_waits_ack_returns_before_sync(path, sync_gate):
    broker = open_broker(path)
    consumer = broker.consume("t", "g", prefetch=2, ack_timeout=600)
    broker.publish_many("t", ["a", "b"])
    first, second = consumer.get_many(2, timeout=5)
    gate = sync_gate(broker)
    log = gate.log
    assert first.ack()
    assert second.nack(requeue=True)
    # Both records are appended, and no sync has covered them.
    assert log.end_offset == log.synced_offset + 2
    assert gate.entered.wait(30)

    thread, result = run_in_thread(broker.publish, "t", "c")
    thread.join(0.5)
    assert thread.is_alive(), "publish returned before its sync"
    end = log.end_offset
    gate.open()
    thread.join(30)
    assert not thread.is_alive()
    assert result["value"]
    assert log.synced_offset >= end
    assert max(gate.synced) >= end
    consumer.close(drain=False)
    broker.close()


def test_always_auto_ack_delivery_returns_before_sync(path, sync_gate):
    broker = open_broker(path)
    broker.publish("t", "a")
    consumer = broker.consume("t", "g", prefetch=1, ack_timeout=600,
                              auto_ack=True)
    gate = sync_gate(broker)
    log = gate.log
    assert consumer.get(timeout=5).body == "a"
    assert log.synced_offset < log.end_offset
    gate.open()
    consumer.close(drain=False)
    broker.close()


def test_always_sync_acks_true_ack_waits(path, sync_gate):
    broker = open_broker(path, sync_acks=True)
    consumer = broker.consume("t", "g", prefetch=1, ack_timeout=600)
    broker.publish("t", "a")
    message = consumer.get(timeout=5)
    gate = sync_gate(broker)
    log = gate.log
    thread, result = run_in_thread(message.ack)
    thread.join(0.5)
    assert thread.is_alive(), "ack returned before its sync"
    end = log.end_offset
    gate.open()
    thread.join(30)
    assert not thread.is_alive()
    assert result["value"] is True
    assert log.synced_offset >= end
    consumer.close(drain=False)
    broker.close()


def test_always_sync_acks_auto_ack_get_waits(path, sync_gate):
    """An auto_ack get of a core topic (the C reader) under sync_acks
    returns only after a sync that covers its delivery record."""
    broker = open_broker(path, sync_acks=True)
    broker.publish("t", "a")
    consumer = broker.consume("t", "g", prefetch=1, ack_timeout=600,
                              auto_ack=True)
    assert type(consumer._read_one).__name__ == "CoreReader"
    gate = sync_gate(broker)
    log = gate.log
    thread, result = run_in_thread(consumer.get, 5)
    thread.join(0.5)
    assert thread.is_alive(), "auto_ack get returned before its sync"
    end = log.end_offset
    gate.open()
    thread.join(30)
    assert not thread.is_alive()
    assert result["value"].body == "a"
    assert log.synced_offset >= end
    consumer.close(drain=False)
    broker.close()


def test_sync_acks_get_async_frees_loop(path, sync_gate):
    broker = open_broker(path, sync_acks=True)
    broker.publish("t", "a")
    consumer = broker.consume("t", "g", prefetch=1, ack_timeout=600,
                              auto_ack=True)
    gate = sync_gate(broker, fallback_s=10.0)
    log = gate.log

    async def run():
        loop = asyncio.get_running_loop()
        ticks = [loop.time()]

        async def tick():
            while True:
                await asyncio.sleep(0.01)
                ticks.append(loop.time())

        ticker = asyncio.create_task(tick())
        get = asyncio.create_task(consumer.get_async(timeout=30))
        deadline = loop.time() + 30
        while not gate.entered.is_set():
            assert loop.time() < deadline, "no sync started"
            await asyncio.sleep(0.01)
        # The ticker goes on while the delivery's sync is held.
        count = len(ticks)
        await asyncio.sleep(0.5)
        held_ticks = len(ticks) - count
        done_while_held = get.done()
        end = log.end_offset
        gate.open()
        message = await asyncio.wait_for(get, 30)
        ticker.cancel()
        gaps = [later - earlier for earlier, later in zip(ticks, ticks[1:])]
        return message, held_ticks, done_while_held, end, max(gaps)

    message, held_ticks, done_while_held, end, max_gap = asyncio.run(run())
    assert max_gap < 5.0, "the event loop was blocked during the sync"
    assert held_ticks >= 2
    assert not done_while_held, "get_async returned before its sync"
    assert message.body == "a"
    assert log.synced_offset >= end
    consumer.close(drain=False)
    broker.close()


def test_sync_acks_get_async_cancel_keeps_message(path, sync_gate):
    broker = open_broker(path, sync_acks=True)
    broker.publish("t", "a")
    consumer = broker.consume("t", "g", prefetch=1, ack_timeout=600,
                              auto_ack=True)
    gate = sync_gate(broker, fallback_s=10.0)
    received = []

    async def receive():
        message = await consumer.get_async(timeout=30)
        received.append(message.body)
        await asyncio.sleep(30)

    async def run():
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(receive())
        deadline = loop.time() + 30
        while not gate.entered.is_set():
            assert loop.time() < deadline, "no sync started"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.sleep(0.2)
        # The auto-acked message is taken, so the get waits for its sync.
        received_while_held = list(received)
        gate.open()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        return received_while_held

    received_while_held = asyncio.run(run())
    assert received_while_held == []
    # The cancellation reached the next await, after the get returned.
    assert received == ["a"]
    consumer.close(drain=False)
    broker.close()


def test_always_unsynced_ack_is_synced_without_a_publish(path):
    broker = open_broker(path, fsync_interval_s=0.05)
    consumer = broker.consume("t", "g", prefetch=1, ack_timeout=600)
    broker.publish("t", "a")
    message = consumer.get(timeout=5)
    assert message.ack()
    # No later publish: the segment log syncs the ack by itself within
    # fsync_interval_s.
    wait_synced(broker._backend._log)
    consumer.close(drain=False)
    broker.close()


def test_log_rejects_sync_acks_not_bool(path):
    with pytest.raises(TypeError, match="sync_acks must be True or False, "
                                        "got str 'yes'"):
        open_broker(path, sync_acks="yes")


# A process that is not the writer publishes in a thread, which waits for
# the writer's sync (held back by the test), and closes the broker
# meanwhile. The thread must end with ShutDown, not crash the process on
# the journal that the close unmapped.
CLOSE_WHILE_PUBLISH_WAITS = """
path = sys.argv[1]
broker = mqs.Broker(backend="log", path=path, fsync="always",
                    segment_bytes=4 << 20)
assert not broker._backend._writer
outcome = []


def publish():
    try:
        outcome.append(broker.publish("t", "waits"))
    except mqs.ShutDown as exc:
        outcome.append(type(exc).__name__)


thread = threading.Thread(target=publish)
thread.start()
time.sleep(0.5)
print("waiting" if thread.is_alive() else "returned", flush=True)
broker.close()
thread.join(30)
print("hung" if thread.is_alive() else outcome[0], flush=True)
"""


def test_always_close_during_publish_sync(path, sync_gate):
    broker = open_broker(path)
    broker.declare_topic("t")
    gate = sync_gate(broker)
    script = "import sys, threading, time\nimport mqs\n" + \
        textwrap.dedent(CLOSE_WHILE_PUBLISH_WAITS)
    try:
        child = subprocess.run([sys.executable, "-c", script, str(path)],
                               capture_output=True, text=True, timeout=60)
    finally:
        gate.open()
    assert child.returncode == 0, (child.returncode, child.stderr)
    assert child.stdout.split() == ["waiting", "ShutDown"]
    broker.close()


# ---- SIGKILL and power loss -------------------------------------------------

# Publishes, gets and acks one message at a time in one thread, and
# reports each step with the log's end offset after it returned (one
# record per call, so that is the call's record offset + 1). Every
# sync's end offset is reported from the sync hook. In round `rounds`
# it waits until its delivery is synced, blocks every later sync and
# acks (with sync_acks, starts acking) that last message.
ROUNDS_THEN_UNSYNCED_ACK = """
path, rounds, sync_acks = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
broker = mqs.Broker(backend="log", path=path, fsync="always",
                    segment_bytes=4 << 20, sync_acks=sync_acks)
consumer = broker.consume("t", "g", prefetch=1, ack_timeout=600)
lock = threading.Lock()
hold = threading.Event()


def report(**fields):
    with lock:
        print(json.dumps(fields), flush=True)


def hook(end, phase):
    if phase == 0 and hold.is_set():
        time.sleep(600)
    if phase == 1:
        report(synced=end)
    return 0


log = broker._backend._log
log._set_sync_hook(hook)
for number in range(rounds + 1):
    body = f"m{number}"
    broker.publish("t", body)
    report(published=body, end=log.end_offset)
    message = consumer.get(timeout=30)
    report(got=message.body, attempts=message.attempts, end=log.end_offset)
    if number == rounds:
        # The delivery is synced; every later sync is held back.
        while log.synced_offset < log.end_offset:
            time.sleep(0.001)
        hold.set()
        if sync_acks:
            threading.Thread(target=message.ack, daemon=True).start()
            time.sleep(0.2)
            report(done=True)
            time.sleep(600)
    assert message.ack()
    report(acked=message.body, end=log.end_offset)
report(done=True)
time.sleep(600)
"""


def run_child(path, rounds, sync_acks=False):
    """Run the workload until it reports done, SIGKILL it, and return its
    reports."""
    script = "import json, sys, threading, time\nimport mqs\n" + \
        textwrap.dedent(ROUNDS_THEN_UNSYNCED_ACK)
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(path), str(rounds),
         "1" if sync_acks else "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reports = []
    deadline = time.monotonic() + 120
    try:
        while not reports or "done" not in reports[-1]:
            line = child.stdout.readline()
            assert line, child.stderr.read()
            assert time.monotonic() < deadline, "child never reported done"
            reports.append(json.loads(line))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        child.stdout.close()
        child.stderr.close()
    return reports


def drain(path):
    """Return ``{body: attempts}`` of every message the broker at `path`
    delivers, acking each."""
    broker = mqs.Broker(backend="log", path=path, segment_bytes=SEGMENT)
    consumer = broker.consume("t", "g", prefetch=1000, ack_timeout=600)
    found = {}
    while True:
        try:
            batch = consumer.get_many(1000, timeout=1.0)
        except mqs.Empty:
            break
        for message in batch:
            assert message.body not in found
            found[message.body] = message.attempts
            assert message.ack()
    consumer.close(drain=False)
    broker.close()
    return found


def zero_unsynced(path, synced_end):
    """Zero every record at offset `synced_end` or later in the log of
    broker `path`, as a power loss that kept only synced writes would.

    Walks the record framing of `mqs.SegmentLog` (see
    csrc/mqs_seglog.h): 8-byte aligned records follow the 4096-byte
    header, each with its u32 length at +0 and its i64 offset at +8. A
    zero length ends the records. Returns how many records it zeroed."""
    current = (path / "CURRENT").read_text().strip()
    segments = sorted((path / current).glob("*.seg"))
    assert len(segments) == 1, segments
    zeroed = 0
    with open(segments[0], "r+b") as file:
        data = file.read()
        position = HEADER_BYTES
        cut = None
        while position + 16 <= len(data):
            length, = struct.unpack_from("<I", data, position)
            if length == 0:
                break
            offset, = struct.unpack_from("<q", data, position + 8)
            if offset >= synced_end:
                if cut is None:
                    cut = position
                zeroed += 1
            position += (length + 7) & ~7
        if cut is not None:
            file.seek(cut)
            file.write(bytes(position - cut))
    return zeroed


def summary(reports):
    published = {r["published"]: r["end"] for r in reports
                 if "published" in r}
    got = {r["got"]: (r["attempts"], r["end"]) for r in reports
           if "got" in r}
    acked = {r["acked"]: r["end"] for r in reports if "acked" in r}
    synced = max(r["synced"] for r in reports if "synced" in r)
    return published, got, acked, synced


@pytest.mark.parametrize("journal", ["kept", "removed"])
def test_always_sigkill_loses_no_unsynced_ack(path, journal):
    reports = run_child(path, rounds=20)
    published, _, acked, synced = summary(reports)
    # The last ack returned while its sync was held back.
    assert acked["m20"] > synced
    if journal == "removed":
        # Every process gone and the journal too: the log's page cache
        # still contains the ack, which the writer appended before it
        # returned.
        assert unlink_journal(path)
    found = drain(path)
    assert set(published) == set(acked)
    assert found == {}


@pytest.mark.parametrize("rounds", [0, 5, 30])
def test_always_power_loss_only_redelivers(path, rounds):
    reports = run_child(path, rounds=rounds)
    published, got, acked, synced = summary(reports)
    last = f"m{rounds}"
    assert acked[last] > synced
    assert zero_unsynced(path, synced) >= 1
    assert unlink_journal(path)
    found = drain(path)

    # Every publish returned after a sync that covered it.
    for body, end in published.items():
        assert end <= synced, (body, end, synced)
    # Nothing published is lost: each message was acked durably or comes
    # back.
    for body in published:
        durable_ack = body in acked and acked[body] <= synced
        assert (body in found) != durable_ack, (body, found.get(body))
    # The undone ack is that of the last round, and its message comes
    # back with one more attempt than its lost delivery had.
    assert set(found) == {last}
    attempts, fetch_end = got[last]
    assert fetch_end <= synced
    assert found[last] == attempts + 1


def test_sync_acks_power_loss_keeps_acks(path):
    reports = run_child(path, rounds=10, sync_acks=True)
    published, got, acked, synced = summary(reports)
    # The last ack never returned: its sync was held back.
    assert "m10" not in acked
    for body, end in acked.items():
        assert end <= synced, (body, end, synced)
    zero_unsynced(path, synced)
    assert unlink_journal(path)
    found = drain(path)
    assert set(found) == {"m10"}
    assert found["m10"] == got["m10"][0] + 1
    assert set(published) == set(acked) | {"m10"}
