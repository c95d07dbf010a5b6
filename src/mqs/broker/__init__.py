"""Message broker: topics, priority lanes, acks, retries, DLQ and groups.

`Broker` is the entry point; `mqs.broker._backend` documents the contract
that storage backends implement.
"""

from mqs.broker._backend import Backend, DeadLetter, GroupStats
from mqs.broker._broker import Broker, Consumer, Message, Producer
from mqs.broker._circuit import CircuitBreaker
from mqs.broker._policy import Backoff, Rate, TopicConfig

__all__ = [
    "Broker",
    "Consumer",
    "Message",
    "Producer",
    "Backoff",
    "Rate",
    "CircuitBreaker",
    "TopicConfig",
    "DeadLetter",
    "GroupStats",
    "Backend",
]
