"""Producer and consumer processes of the broker crash tests, and the
checks of what they logged.

Every process appends what it did to its own file with one write(2) per
step, which a SIGKILL cannot tear. A producer logs the bodies of each
publish that returned. A consumer logs each delivery as
``G body attempts`` before it acks it, and each ack after it returned
as ``A body`` (``L body`` if the broker no longer had the message).
The file of a process is named after its role, index and incarnation
(``p0-1``, ``c3-2``), so the checks can tell producers from consumers
and killed processes from the others.
"""

import collections
import multiprocessing
import os
import random
import signal
import time

import mqs

FORK = multiprocessing.get_context("fork")


def append_line(fd, text):
    os.write(fd, text.encode())


def open_step_log(log_path):
    return os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)


def producer(open_broker, log_path, seed, stop):
    """Publish batches of 1 to 16 numbered bodies until `stop.value` is
    set (or forever if `stop` is None) and log each one that returned."""
    rng = random.Random(seed)
    broker = open_broker()
    fd = open_step_log(log_path)
    number = 0
    tag = os.path.basename(log_path)
    while stop is None or not stop.value:
        count = rng.choice([1, 1, 1, 4, 16])
        bodies = [f"{tag}.{number + i}" for i in range(count)]
        priority = rng.choice([0, 5, 9])
        if count == 1:
            broker.publish("t", bodies[0], priority=priority)
        else:
            broker.publish_many("t", bodies, priority=priority)
        append_line(fd, "".join(f"{body}\n" for body in bodies))
        number += count
        time.sleep(rng.random() * 0.01)
    broker.close()


def consumer(open_broker, log_path, seed, stop, ack_timeout):
    """Get batches of 1 or 8 from group "g" of topic "t" and ack them,
    logging each delivery and each ack, until `stop.value` is set (or
    forever if `stop` is None)."""
    rng = random.Random(seed)
    broker = open_broker()
    fd = open_step_log(log_path)
    source = broker.consume("t", "g", prefetch=8, ack_timeout=ack_timeout)
    while stop is None or not stop.value:
        try:
            batch = source.get_many(rng.choice([1, 8]), timeout=0.05)
        except mqs.Empty:
            continue
        append_line(fd, "".join(f"G {message.body} {message.attempts}\n"
                                for message in batch))
        # Hold the batch a while, so that kills find messages in flight.
        time.sleep(rng.random() * 0.01)
        for message in batch:
            done = message.ack()
            append_line(fd, f"{'A' if done else 'L'} {message.body}\n")
    source.close()
    broker.close()


def publish_and_ack_forever(broker, report_fd):
    """Publish 0, 1, 2, ... to topic "t" and write one byte to `report_fd`
    after each publish returned. Between publishes, ack what group "g"
    has ready, up to 2 messages. Runs until the process is killed."""
    source = broker.consume("t", "g", prefetch=4, ack_timeout=600)
    number = 0
    while True:
        broker.publish("t", number)
        os.write(report_fd, b"p")
        number += 1
        try:
            for message in source.get_many(2, timeout=0):
                message.ack()
        except mqs.Empty:
            pass


class Crew:
    """Producer and consumer processes, forked, each replaced by a new
    incarnation when it is killed.

    `open_broker` is called in each child to open its broker. `stop` is
    a shared flag that ends the loops, or None for processes that run
    until they are killed.
    """

    def __init__(self, log_dir, rng, open_broker, *, ack_timeout,
                 stop=None):
        self.log_dir = log_dir
        self.rng = rng
        self.open_broker = open_broker
        self.ack_timeout = ack_timeout
        self.stop = stop
        self.workers = {}       # (role, index) -> (process, log path)
        self.incarnations = collections.Counter()
        self.killed = set()     # log paths of killed processes

    def launch(self, role, index):
        self.incarnations[role, index] += 1
        incarnation = self.incarnations[role, index]
        log_path = str(self.log_dir / f"{role[0]}{index}-{incarnation}")
        seed = self.rng.getrandbits(32)
        if role == "producer":
            target = producer
            args = (self.open_broker, log_path, seed, self.stop)
        else:
            target = consumer
            args = (self.open_broker, log_path, seed, self.stop,
                    self.ack_timeout)
        process = FORK.Process(target=target, daemon=True, args=args)
        process.start()
        self.workers[role, index] = (process, log_path)

    def launch_all(self, producers, consumers):
        for index in range(producers):
            self.launch("producer", index)
        for index in range(consumers):
            self.launch("consumer", index)

    def kill(self, key):
        """SIGKILL the process of `key`, wait for it and return its exit
        code (-SIGKILL unless it had already exited)."""
        process, log_path = self.workers[key]
        if process.is_alive():
            os.kill(process.pid, signal.SIGKILL)
        process.join(30)
        self.killed.add(log_path)
        return process.exitcode

    def kill_and_replace(self, key):
        exitcode = self.kill(key)
        self.launch(*key)
        return exitcode


def read_lines(path):
    try:
        with open(path, encoding="ascii") as file:
            return file.read().splitlines()
    except FileNotFoundError:
        return []


def read_step_logs(log_dir):
    """Return the bodies whose publish returned, and for each delivered
    body its deliveries as [(attempts, log path, acked)].

    A consumer's delivery counts as acked when the same incarnation
    logged its ack. No consumer may have logged a lost ack.
    """
    returned = set()
    deliveries = collections.defaultdict(list)
    for path in sorted(log_dir.iterdir()):
        lines = read_lines(path)
        if path.name.startswith("p"):
            returned.update(lines)
            continue
        acked = {line[2:] for line in lines if line.startswith("A ")}
        assert not [line for line in lines if line.startswith("L ")]
        for line in lines:
            if line.startswith("G "):
                _, body, attempts = line.split()
                deliveries[body].append(
                    (int(attempts), str(path), body in acked))
    return returned, deliveries


def check_redeliveries(deliveries, killed):
    """Check that a body was delivered again only after a delivery to a
    consumer that was killed before it logged the ack, and that its
    attempts count every delivery. Sorts each body's deliveries."""
    for body, seen in deliveries.items():
        seen.sort()
        for _, log, acked in seen[:-1]:
            assert log in killed, (body, seen)
            assert not acked, (body, seen)
        counts = [attempts for attempts, _, _ in seen]
        assert counts == sorted(set(counts)), (body, seen)
