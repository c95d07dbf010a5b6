from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from mqs.broker._backend import Delivery
from mqs.broker._broker import Consumer
from mqs.broker._log_shared import SharedLogBackend
from mqs.broker._shm import ShmBackend
from mqs.errors import LayoutVersionError

__all__ = ["TopicCore", "TopicCoreLayoutError", "TopicCoreVersionError",
           "TopicRetired", "LAYOUT_VERSION",
           "COUNTER_NAMES", "GROUP_COUNTER_NAMES", "DEAD_REASONS",
           "ENTRY_READY", "ENTRY_IN_FLIGHT", "ENTRY_DEAD", "PAYLOAD_EXTRAS",
           "PAYLOAD_BYTES", "LIMIT", "GROUP_NAME_BYTES", "TopicCoreFull",
           "decode_payload", "fork_count", "MessageBase", "CorePath",
           "CoreReader", "LoggedPath"]

_DeliveryT = TypeVar("_DeliveryT", bound=tuple[Any, ...])

# The state of a `mqs.metrics.LogLinearHistogram`: sparse bucket counts,
# count, sum_ns and max_ns.
_Histogram = tuple[dict[int, int], int, int, int]
# `TopicCore.fetch`: (seq, slot, ticket, attempts, priority, timestamp,
# payload).
_Fetched = tuple[int, int, int, int, int, float, bytes]
# `TopicCore.take_dead`: (group, seq, attempts, reason, priority,
# timestamp, payload).
_TakenDead = tuple[int, int, int, str | None, int, float, bytes]
# `TopicCore.peek_dead`: (group, slot, group name, seq, attempts, reason,
# priority, timestamp, timed_out, payload).
_PeekedDead = tuple[int, int, str, int, int, str | None, int, float, bool,
                    bytes]
# `TopicCore.group_stats`: (index, name, consumers, ready, oldest ready_at,
# in_flight, counters, enqueue_to_deliver, deliver_to_ack).
_GroupStats = tuple[int, str, int, int, float | None, int, dict[str, int],
                    _Histogram, _Histogram]

COUNTER_NAMES: tuple[str, ...]
GROUP_COUNTER_NAMES: tuple[str, ...]
ENTRY_READY: int
ENTRY_IN_FLIGHT: int
ENTRY_DEAD: int
GROUP_NAME_BYTES: int
DEAD_REASONS: tuple[None, str, str, str]
LIMIT: int
LAYOUT_VERSION: int
PAYLOAD_EXTRAS: int
PAYLOAD_BYTES: int

class TopicCoreLayoutError(ValueError): ...
class TopicCoreVersionError(TopicCoreLayoutError, LayoutVersionError): ...
class TopicCoreFull(OSError): ...
class TopicRetired(Exception): ...

def decode_payload(
    payload: bytes,
) -> tuple[Any, dict[str, Any], str | None, str | None]: ...
def fork_count() -> int: ...

class _MappedFile:
    @property
    def path(self) -> str: ...
    @property
    def created(self) -> bool: ...

class TopicCore(_MappedFile):
    def __init__(
        self,
        path: str,
        lanes: Iterable[tuple[int, int]],
        strict: bool = False,
        capacity: int = 65536,
        slot_bytes: int = 256,
        max_groups: int = 16,
        max_consumers: int = 256,
        max_attempts: int | None = None,
        sample_every: int | None = None,
        max_stored: int = 0,
    ) -> None: ...
    def publish(
        self, body: bytes, priority: int, timestamp: float,
        now: float | None = None,
    ) -> int: ...
    def publish_pickled(self, body: Any, priority: int) -> int: ...
    @property
    def max_stored(self) -> int: ...
    @property
    def _quiet_pending(self) -> int: ...
    def open_group(
        self, name: str, earliest: bool, max_attempts: int | None = None,
        now: float | None = None,
    ) -> int: ...
    def find_group(self, name: str) -> int: ...
    def open_consumer(
        self, group: int, prefetch: int, owner: int, now: float | None = None
    ) -> int: ...
    def close_consumer(self, consumer: int, now: float | None = None) -> int: ...
    def consumer_owner(self, consumer: int) -> int | None: ...
    def slot_seq(self, slot: int) -> int: ...
    def consumer_in_flight(self, consumer: int) -> int: ...
    def fetch(
        self,
        consumer: int,
        max_items: int,
        ack_timeout: float,
        auto_ack: bool = False,
        now: float | None = None,
        owner: int = 0,
    ) -> list[_Fetched]: ...
    def fetch_one(
        self,
        consumer: int,
        ack_timeout: float,
        auto_ack: bool,
        owner: int,
        delivery_type: type[_DeliveryT],
        topic: str,
        group: str,
        group_index: int,
    ) -> _DeliveryT | None: ...
    def ack(
        self, group: int, slot: int, ticket: int, now: float | None = None
    ) -> bool: ...
    def nack(
        self, group: int, slot: int, ticket: int, requeue: bool,
        now: float | None = None,
    ) -> bool: ...
    def extend(
        self, group: int, slot: int, ticket: int, seconds: float,
        now: float | None = None,
    ) -> bool: ...
    def release(
        self, group: int, tags: Iterable[tuple[int, int]],
        now: float | None = None,
    ) -> int: ...
    def advance(self, now: float | None = None) -> None: ...
    def take_dead(self) -> list[_TakenDead]: ...
    def peek_dead(self) -> list[_PeekedDead]: ...
    def drop_dead(self, entries: Iterable[tuple[int, int]]) -> None: ...
    def has_dead(self) -> bool: ...
    @property
    def capacity(self) -> int: ...
    @property
    def retired(self) -> bool: ...
    def retire(self) -> None: ...
    # The value types of these dicts differ by key. The docstring of
    # export_image lists its keys.
    def retire_and_export(self) -> dict[str, Any]: ...
    def export_image(self) -> dict[str, Any]: ...
    def import_image(
        self, image: dict[str, Any], now: float | None = None
    ) -> None: ...
    def group_histograms(self) -> dict[str, tuple[_Histogram, _Histogram]]: ...
    def set_group_histograms(
        self, histograms: Mapping[str, tuple[_Histogram, _Histogram]]
    ) -> None: ...
    def group_stats(self, now: float | None = None) -> list[_GroupStats]: ...
    def counters(self) -> dict[str, int]: ...
    def group_counters(self, group: int) -> dict[str, int]: ...
    def stats(self) -> dict[str, int]: ...
    def wait_prepare(self) -> int: ...
    def wait(self, epoch: int, timeout: float) -> None: ...
    def cancel_wait(self) -> None: ...
    def signal(self) -> None: ...
    def close(self) -> None: ...

class MessageBase:
    id: str
    topic: str
    group: str
    body: Any
    priority: int
    attempts: int
    key: Any
    headers: dict[str, Any]
    timestamp: float
    reply_to: str | None
    correlation_id: str | None
    # None for both in a detached copy (see `__reduce__`). `| Any` spares
    # callers the None checks, because they first call `_check_attached`,
    # which raises for a copy.
    _consumer: Consumer | Any
    _settled: bool
    def __init__(
        self, consumer: Consumer, delivery: Delivery, settled: bool
    ) -> None: ...
    @property
    def _delivery(self) -> Delivery | Any: ...
    def _check_attached(self, verb: str) -> None: ...
    def _settle(self, verb: str) -> None: ...
    def ack(self) -> bool: ...

class CorePath:
    def __init__(self, backend: ShmBackend) -> None: ...
    def publish_one(self, topic: str, body: Any, priority: int) -> str | None: ...

class LoggedPath(CorePath):
    def __init__(self, backend: SharedLogBackend) -> None: ...
    def publish_one(self, topic: str, body: Any, priority: int) -> str | None: ...

class CoreReader:
    def __init__(
        self,
        path: CorePath,
        consumer: Consumer,
        message_type: type[MessageBase],
        delivery_type: type[Delivery],
        topic: str,
        group: str,
        group_index: int,
        number: int,
        owner: int,
    ) -> None: ...
    def __call__(
        self, ack_timeout: float, auto_ack: bool
    ) -> MessageBase | None: ...
    def wait_read(
        self, ack_timeout: float, auto_ack: bool, timeout: float
    ) -> MessageBase | None: ...
    @property
    def _empty_wakes(self) -> int: ...
    @property
    def _awake_wait_ns(self) -> int: ...
