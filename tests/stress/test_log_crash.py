"""Crash test of a log broker shared by processes: SIGKILL of producers,
consumers and the writer, then every process killed or a reboot.

4 producer and 4 consumer processes share one log broker with
``fsync="always"``. At random moments one of them is killed with SIGKILL
(half of the time the one that holds the writer lock) and a new one
takes its place. Every process appends what it did to its own file with
one write(2) per step, which a SIGKILL cannot tear. Producers log the
bodies of each publish that returned. Consumers log each delivery
before they ack it and each ack after it returned. Then every process
is killed and a new process drains the broker. In the "kill" case it
goes on from the /dev/shm journal, as after any crash that leaves the
machine up. In the "reboot" case the journal is removed first, as a
reboot would, so the log alone restores the broker. That case runs
with ``sync_acks=True``, because without it an ack that is still only
in the journal may be undone by a reboot.

The checks: every returned publish is in the log, delivered before or
drained after. No message whose ack returned is delivered again. A
message was delivered again only after a delivery to a consumer that
was killed before it logged the ack.

MQS_TEST_SCALE multiplies the run time (default: 5 s of kills). Random
choices use fixed seeds.
"""

import functools
import random
import signal
import time

import pytest

import mqs
from broker_workers import Crew, check_redeliveries, read_step_logs
from mqs.broker._log import lock_holder
from mqs.broker._log_shared import unlink_journal

pytestmark = pytest.mark.stress

PRODUCERS = 4
CONSUMERS = 4
RUN_S = 5.0


def open_broker(path, sync_acks=False):
    return mqs.Broker(backend="log", path=path, fsync="always",
                      segment_bytes=1 << 20, sync_acks=sync_acks)


@pytest.mark.parametrize("ending", ["kill", "reboot"])
def test_log_crash_writer_producers_consumers(tmp_path, scale, ending):
    path = tmp_path / "broker"
    logs = tmp_path / "logs"
    logs.mkdir()
    broker = open_broker(path)
    broker.declare_topic("t", weights={9: 3, 5: 2, 0: 1})
    broker.consume("t", "g").close()
    broker.close()
    rng = random.Random(4321)
    crew = Crew(logs, rng,
                functools.partial(open_broker, path,
                                  sync_acks=ending == "reboot"),
                ack_timeout=600)
    writer_kills = 0
    try:
        crew.launch_all(PRODUCERS, CONSUMERS)
        end = time.monotonic() + RUN_S * scale
        while time.monotonic() < end:
            time.sleep(rng.uniform(0.1, 0.5))
            holder = lock_holder(path)
            pick = [key for key, (process, _) in crew.workers.items()
                    if process.pid == holder]
            if pick and rng.random() < 0.5:
                key = pick[0]
                writer_kills += 1
            else:
                key = rng.choice(sorted(crew.workers))
            assert crew.kill_and_replace(key) == -signal.SIGKILL, key
    finally:
        for key in list(crew.workers):
            crew.kill(key)
    assert writer_kills >= 1
    if ending == "reboot":
        # The log alone restores the broker.
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

    returned, delivered = read_step_logs(logs)
    assert stats["stored"] == 0
    assert len(drained) == len(set(drained))
    for body in drained:
        # An acked message never comes back.
        assert not any(acked for _, _, acked in delivered[body]), body
    # Nothing published that returned is lost.
    assert returned <= set(delivered) | set(drained)
    # Delivered again only after a consumer died before logging its ack,
    # and attempts count every delivery.
    check_redeliveries(delivered, crew.killed)
