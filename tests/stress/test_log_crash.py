"""Crash test of a log broker shared by processes: SIGKILL of producers,
consumers and the writer, then a reboot.

4 producer and 4 consumer processes share one log broker with
``fsync="always"``. At random moments one of them is killed with SIGKILL
(half of the time the one that holds the writer lock) and a new one
takes its place. Every process appends what it did to its own file with
one write(2) per step, which a SIGKILL cannot tear. Producers log the
bodies of each publish that returned. Consumers log each delivery
before they ack it and each ack after it returned. Then every process is killed and the
broker's /dev/shm journal removed, as a reboot would, and a new process
drains the broker from the log alone.

The checks: every returned publish is in the log (delivered before or
drained after); no message whose ack returned is delivered again; a
message was delivered again only after a delivery to a consumer that
was killed before it logged the ack.

MQS_TEST_SCALE multiplies the run time (default: 10 s of kills). Random
choices use fixed seeds.
"""

import collections
import multiprocessing
import os
import random
import signal
import time

import pytest

import mqs
from mqs.broker._log import lock_holder
from mqs.broker._log_shared import unlink_journal

pytestmark = pytest.mark.stress

FORK = multiprocessing.get_context("fork")
PRODUCERS = 4
CONSUMERS = 4
RUN_S = 10.0


def open_broker(path):
    return mqs.Broker(backend="log", path=path, fsync="always",
                      segment_bytes=1 << 20)


def append_line(fd, text):
    os.write(fd, text.encode())


def producer(path, log_path, seed):
    rng = random.Random(seed)
    broker = open_broker(path)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    number = 0
    tag = os.path.basename(log_path)
    while True:
        count = rng.choice([1, 1, 1, 4, 16])
        bodies = [f"{tag}.{number + i}" for i in range(count)]
        broker.publish_many("t", bodies, priority=rng.choice([0, 5, 9]))
        append_line(fd, "".join(f"{body}\n" for body in bodies))
        number += count
        time.sleep(rng.random() * 0.01)


def consumer(path, log_path, seed):
    rng = random.Random(seed)
    broker = open_broker(path)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    source = broker.consume("t", "g", prefetch=8, ack_timeout=600)
    while True:
        try:
            batch = source.get_many(rng.choice([1, 8]), timeout=0.05)
        except mqs.Empty:
            continue
        append_line(fd, "".join(f"G {message.body} {message.attempts}\n"
                                for message in batch))
        time.sleep(rng.random() * 0.01)
        for message in batch:
            done = message.ack()
            append_line(fd, f"{'A' if done else 'L'} {message.body}\n")


def read_lines(path):
    with open(path, encoding="ascii") as file:
        return file.read().splitlines()


def test_log_crash_writer_producers_consumers(tmp_path, scale):
    path = tmp_path / "broker"
    logs = tmp_path / "logs"
    logs.mkdir()
    broker = open_broker(path)
    broker.declare_topic("t", weights={9: 3, 5: 2, 0: 1})
    broker.consume("t", "g").close()
    broker.close()
    rng = random.Random(4321)
    workers = {}
    incarnations = collections.Counter()
    killed = set()
    writer_kills = 0

    def launch(role, index):
        incarnations[role, index] += 1
        log_path = str(logs / f"{role[0]}{index}-"
                              f"{incarnations[role, index]}")
        target = producer if role == "producer" else consumer
        process = FORK.Process(target=target, daemon=True,
                               args=(path, log_path, rng.getrandbits(32)))
        process.start()
        workers[role, index] = (process, log_path)

    try:
        for index in range(PRODUCERS):
            launch("producer", index)
        for index in range(CONSUMERS):
            launch("consumer", index)
        end = time.monotonic() + RUN_S * scale
        while time.monotonic() < end:
            time.sleep(rng.uniform(0.1, 0.5))
            holder = lock_holder(path)
            pick = [key for key, (process, _) in workers.items()
                    if process.pid == holder]
            if pick and rng.random() < 0.5:
                key = pick[0]
                writer_kills += 1
            else:
                key = rng.choice(sorted(workers))
            process, log_path = workers[key]
            os.kill(process.pid, signal.SIGKILL)
            process.join(30)
            killed.add(log_path)
            launch(*key)
    finally:
        for process, log_path in workers.values():
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
                process.join(30)
            killed.add(log_path)
    assert writer_kills >= 1
    # A reboot: the log alone restores the broker.
    assert unlink_journal(path)

    drained = []
    broker = open_broker(path)
    last = broker.consume("t", "g", prefetch=64, ack_timeout=600)
    while True:
        try:
            batch = last.get_many(64, timeout=1.0)
        except mqs.Empty:
            break
        for message in batch:
            assert message.ack()
            drained.append(message.body)
    stats = broker.stats("t")
    last.close()
    broker.close()
    unlink_journal(path)

    returned = set()
    # body -> [(attempts, log, acked)]
    delivered = collections.defaultdict(list)
    for log in sorted(logs.iterdir()):
        lines = read_lines(log)
        if log.name.startswith("p"):
            returned.update(lines)
            continue
        acked = {line[2:] for line in lines if line.startswith("A ")}
        assert not [line for line in lines if line.startswith("L ")]
        for line in lines:
            if line.startswith("G "):
                _, body, attempts = line.split()
                delivered[body].append((int(attempts), str(log),
                                        body in acked))
    assert stats["stored"] == 0
    assert len(drained) == len(set(drained))
    for body in drained:
        # An acked message never comes back.
        assert not any(acked for _, _, acked in delivered[body]), body
    # Nothing published that returned is lost.
    assert returned <= set(delivered) | set(drained)
    for body, seen in delivered.items():
        # Delivered again only after a consumer died before logging its
        # ack; attempts count every delivery.
        seen.sort()
        counts = [attempts for attempts, _, _ in seen]
        assert counts == sorted(set(counts)), (body, seen)
        for _, log, acked in seen[:-1]:
            assert log in killed, (body, seen)
            assert not acked, (body, seen)
