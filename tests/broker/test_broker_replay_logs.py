"""Tests that drop warnings come only from the process that dropped.

The shm and log backends keep a replica of the broker in every process
and replay the records of the other processes (and, when a broker
opens, the records stored before). A replayed dead letter counts again
in the replica but was already logged where it happened.
"""

import logging
import os
import uuid

import pytest

import mqs
from broker_children import FORK, join, start

STATE_LOGGER = "mqs.broker._state"
DLQ_WARNING = "moved to the dead-letter queue"


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def open_broker(backend, location):
    if backend == "shm":
        return mqs.Broker(backend="shm", name=location)
    return mqs.Broker(backend="log", path=location)


def dead_letter_one(backend, location, results):
    """Publish one message, reject it into the DLQ and send back the
    warnings that this child logged."""
    handler = _ListHandler()
    state_logger = logging.getLogger(STATE_LOGGER)
    state_logger.addHandler(handler)
    state_logger.setLevel(logging.WARNING)
    broker = open_broker(backend, location)
    consumer = broker.consume("orders", "g", ack_timeout=600)
    broker.publish("orders", "poison")
    message = consumer.get(timeout=10)
    message.nack(requeue=False)
    consumer.close()
    broker.close()
    results.put(handler.messages)


@pytest.fixture(params=["shm", "log"])
def endpoint(request, tmp_path):
    """Return ``(backend, location)`` of a fresh broker, removed after
    the test."""
    if request.param == "log":
        yield "log", str(tmp_path / "broker")
        return
    name = f"test-replay-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield "shm", name
    mqs.Broker.unlink(name)


def dlq_warnings(caplog):
    return [record.getMessage() for record in caplog.records
            if DLQ_WARNING in record.getMessage()]


def test_replayed_dead_letter_not_logged(endpoint, caplog):
    backend, location = endpoint
    broker = open_broker(backend, location)
    broker.declare_topic("orders")
    results = FORK.SimpleQueue()
    with caplog.at_level(logging.WARNING, logger=STATE_LOGGER):
        join(start(dead_letter_one, backend, location, results))
        child_warnings = results.get()
        # This replica replays the child's records here.
        assert broker.stats("orders")["dead_lettered"] == 1
        assert dlq_warnings(caplog) == []
        broker.close()

        # A new open restores the dead letter from the journal or log.
        reopened = open_broker(backend, location)
        assert reopened.stats("orders")["dead_lettered"] == 1
        assert len(reopened.dlq_list("orders")) == 1
        assert dlq_warnings(caplog) == []
        reopened.close()
    assert child_warnings == [
        f"topic 'orders': messages {DLQ_WARNING} so far: 1"]


def test_dead_letter_logged_in_own_process(endpoint, caplog):
    backend, location = endpoint
    broker = open_broker(backend, location)
    consumer = broker.consume("orders", "g", ack_timeout=600)
    broker.publish("orders", "poison")
    with caplog.at_level(logging.WARNING, logger=STATE_LOGGER):
        consumer.get(timeout=10).nack(requeue=False)
    assert dlq_warnings(caplog) == [
        f"topic 'orders': messages {DLQ_WARNING} so far: 1"]
    consumer.close()
    broker.close()
