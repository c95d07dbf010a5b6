"""The state of a log broker's core topic, rebuilt from its log.

`SharedLogBackend` keeps plain topics on a C topic core in /dev/shm, as
the shm backend does, and appends a record of each core operation to
the journal, which its writer copies into the segment log. Processes
that share the broker skip those records: they all see the core
itself. A process that restores the broker from the log alone (after a
reboot, or after the last process closed it) starts a `CoreImage` from
the image in the log's snapshot (`TopicCore.export_image`). It replays
the records after the snapshot into it, and loads the result into a
fresh core (`TopicCore.import_image`).

Each record carries the result of its operation, so an image needs no
scheduler: the seq a publish got, the seqs and attempts a fetch
delivered, the seq an ack or nack settled. Applying a record twice
changes nothing more: a publish at or below the image's last seq, an
ack of an absent entry and a group that exists are skipped. That
matters because a snapshot written while an operation runs (a
compaction that the operation's own record triggers) already contains
the operation.

A record is appended after its core operation, in the same section.
A process killed between the two leaves a change that only the core
has. The writer's next snapshot contains it, but a reboot before that
snapshot loses it. For a publish, delivery, ack or nack that call never returned.
For a group creation, the records about that group are skipped, and
the group starts anew when a consumer opens it again after the
restore.

In-flight entries become ready again on import, with their attempts
kept, as the log backend does with every in-flight message at a
restart, and `count_returned` counts them as redelivered.

Entries that a core dead-lettered at an ack deadline have no record of
their own, so they stay in flight here until the ``core_dead`` record
that moves them to the dead-letter queue. A process writes it when it
next collects the core's dead entries: a get_many or a waiting get, a
nack, stats or dlq_list on the topic. A restore before that record
reached the log (none was written yet, or a power loss took it)
delivers the message once more, past its max_attempts.
"""

from __future__ import annotations

from typing import Any

from mqs._topiccore import COUNTER_NAMES, DEAD_REASONS, GROUP_COUNTER_NAMES

READY = 1
IN_FLIGHT = 2
DEAD = 3
# A consumer index that no consumer has (MQS_TC_NO_CONSUMER).
_NO_CONSUMER = 0xFFFFFFFF


def _ready(attempts: int) -> list:
    return [READY, 0, attempts, 0, _NO_CONSUMER, 0.0]


class CoreImage:
    """Messages, groups and entries of one core topic (see the module
    docs); `image` is a `TopicCore.export_image` dict to start from."""

    __slots__ = ("next_seq", "counters", "messages", "groups", "_names",
                 "histograms", "max_attempts")

    def __init__(self, image: dict | None = None,
                 max_attempts: int | None = None) -> None:
        self.next_seq = 0
        # The topic's max_attempts, for the groups that set none (0 or
        # None: no limit), as the core's `exhausted` check uses it.
        self.max_attempts = max_attempts or 0
        self.counters: dict[str, int] = {}
        # seq -> [priority, timestamp, retained, payload]
        self.messages: dict[int, list] = {}
        # In core index order: [name, max_attempts, counters, entries],
        # entries seq -> [state, reason, attempts, ticket, consumer,
        # deadline] in ready order. The last three are known for the
        # deliveries of records only (not for those of a snapshot), and
        # only a move to the journal uses them (see `export_data`).
        self.groups: list[list] = []
        self._names: dict[str, int] = {}
        # Group name -> (enqueue_to_deliver, deliver_to_ack) histogram
        # states as of the snapshot (records do not carry samples).
        self.histograms: dict[str, tuple] = {}
        if image is not None:
            self._load(image)

    def _load(self, image: dict) -> None:
        self.next_seq = image["next_seq"]
        self.histograms = dict(image.get("histograms", {}))
        self.counters = dict(image["counters"])
        for seq, priority, timestamp, retained, payload in image["messages"]:
            self.messages[seq] = [priority, timestamp, retained, payload]
        for name, max_attempts, counters, entries in image["groups"]:
            self._names[name] = len(self.groups)
            self.groups.append([name, max_attempts, dict(counters), {
                seq: [state, reason, attempts, 0, _NO_CONSUMER, 0.0]
                for seq, state, reason, attempts in entries}])

    def _count(self, name: str, amount: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + amount

    def _group_count(self, group: list, name: str, amount: int = 1) -> None:
        group[2][name] = group[2].get(name, 0) + amount

    def _free_if_done(self, seq: int) -> None:
        message = self.messages.get(seq)
        if message is None or message[2]:
            return
        if not any(seq in group[3] for group in self.groups):
            del self.messages[seq]

    def _exhausted(self, group: list, attempts: int) -> bool:
        limit = group[1] or self.max_attempts
        return limit != 0 and attempts >= limit

    def _count_dead(self, group: list, reason: str) -> None:
        self._count("dead_lettered")
        self._count(f"dead_lettered.{reason}")
        self._group_count(group, "dead_lettered")

    def group_index(self, name: str) -> int | None:
        return self._names.get(name)

    # Records, as `SharedLogBackend` writes them.

    def publish(self, seq: int, priority: int, timestamp: float,
                payload: bytes) -> None:
        if seq <= self.next_seq:
            return
        self.next_seq = seq
        self.messages[seq] = [priority, timestamp, not self.groups, payload]
        for group in self.groups:
            group[3][seq] = _ready(0)
        self._count("published")

    def open_group(self, name: str, earliest: bool,
                   max_attempts: int | None) -> None:
        index = self._names.get(name)
        if index is not None:
            if max_attempts is not None:
                self.groups[index][1] = max_attempts
            return
        entries = {seq: _ready(0) for seq in self.messages} \
            if earliest else {}
        first = not self.groups
        self._names[name] = len(self.groups)
        self.groups.append([name, max_attempts or 0, {}, entries])
        if first:
            # Messages kept for the first group: those it did not take
            # are dropped, as the core does.
            for seq, message in list(self.messages.items()):
                if message[2]:
                    message[2] = False
                    if seq not in entries:
                        del self.messages[seq]
                        self._count("dropped_unsubscribed")

    def deliver(self, index: int, items: list[tuple[int, int, int]],
                auto_ack: bool, consumer: int = _NO_CONSUMER,
                deadline: float = 0.0) -> None:
        """Apply deliveries of ``(seq, attempts, ticket)`` to core
        consumer `consumer`, due back at broker time `deadline`."""
        group = self.groups[index]
        entries = group[3]
        delivered = 0
        for seq, attempts, ticket in items:
            entry = entries.get(seq)
            if entry is None:
                # Acked already, by an auto_ack delivery that the image
                # contains, among others.
                continue
            if entry[0] == IN_FLIGHT:
                if entry[2] >= attempts:
                    # This delivery: the snapshot contains it.
                    continue
                # Put back without a record since its delivery: its ack
                # deadline passed or its consumer closed, and the core
                # counted a redelivery.
                self._count("redelivered")
                self._group_count(group, "redelivered")
            delivered += 1
            if auto_ack:
                del entries[seq]
                self._free_if_done(seq)
                self._count("acked")
                self._group_count(group, "acked")
            else:
                entry[:] = [IN_FLIGHT, 0, attempts, ticket, consumer,
                            deadline]
        self._count("delivered", delivered)
        self._group_count(group, "delivered", delivered)

    def ack(self, index: int, seq: int) -> None:
        group = self.groups[index]
        if group[3].pop(seq, None) is None:
            return
        self._free_if_done(seq)
        self._count("acked")
        self._group_count(group, "acked")

    def nack(self, index: int, seq: int, requeue: bool) -> None:
        group = self.groups[index]
        entry = group[3].pop(seq, None)
        if entry is None:
            return
        self._count("nacked")
        self._group_count(group, "nacked")
        self._group_count(group, "errors")
        if not requeue:
            reason = 1
        elif self._exhausted(group, entry[2]):
            # The core dead-letters a requeue at max_attempts.
            reason = 2
        else:
            # Back at its lane's tail: last in the ready order.
            group[3][seq] = _ready(entry[2])
            self._count("redelivered")
            self._group_count(group, "redelivered")
            return
        group[3][seq] = [DEAD, reason, entry[2], 0, _NO_CONSUMER, 0.0]
        self._count_dead(group, DEAD_REASONS[reason])

    def release(self, index: int, seqs: list[int]) -> None:
        entries = self.groups[index][3]
        for seq in seqs:
            entry = entries.get(seq)
            if entry is not None and entry[0] == IN_FLIGHT:
                entry[:] = _ready(max(entry[2] - 1, 0))

    def drop_dead(self, name: str, seq: int, reason: str | None = None
                  ) -> None:
        """Remove an entry that a ``core_dead`` record moved to the
        dead-letter queue, where its core dead-lettered it for `reason`
        (a name in `DEAD_REASONS`)."""
        index = self._names.get(name)
        if index is None:
            return
        group = self.groups[index]
        entry = group[3].pop(seq, None)
        if entry is None:
            return
        if entry[0] != DEAD and reason:
            # Dead-lettered at its ack deadline, which has no record of
            # its own: count it as the core did.
            if reason == "ack_timeout":
                self._group_count(group, "errors")
            self._count_dead(group, reason)
        self._free_if_done(seq)

    # Export.

    def export_data(self, lane_count: int, now: float,
                    consumers: list[tuple[int, int, int, int]]
                    ) -> dict[str, Any]:
        """Return this state as `TopicCore.retire_and_export` returns a
        core's, slots numbered by seq; `consumers` are the core's open
        consumers as ``(index, group index, prefetch, owner)``. An
        in-flight entry keeps its ticket and consumer when a record
        delivered it, so that the acks after the move settle it."""
        empty = ({}, 0, 0, 0)
        groups = []
        for index, (name, max_attempts, counters, entries) in enumerate(
                self.groups):
            items = []
            for order, (seq, entry) in enumerate(entries.items()):
                state, reason, attempts, ticket, consumer, deadline = entry
                items.append((seq, state, reason, attempts, ticket, order,
                              deadline, order, consumer, now, 0.0, False))
            enqueue_to_deliver, deliver_to_ack = self.histograms.get(
                name, (empty, empty))
            groups.append((index, name, max_attempts, 0, [0] * lane_count,
                           dict(counters), items, 1, enqueue_to_deliver,
                           deliver_to_ack))
        return {
            "slots": [(seq, seq, *message)
                      for seq, message in sorted(self.messages.items())],
            "groups": groups,
            "consumers": consumers,
            "counters": dict(self.counters),
        }

    def image(self) -> dict[str, Any]:
        """Return the `TopicCore.import_image` dict of this state."""
        groups = []
        for name, max_attempts, counters, entries in self.groups:
            ordered = [(seq, *entry[:3]) for seq, entry in entries.items()
                       if entry[0] == READY]
            ordered += sorted((seq, *entry[:3])
                              for seq, entry in entries.items()
                              if entry[0] == IN_FLIGHT)
            ordered += sorted((seq, *entry[:3])
                              for seq, entry in entries.items()
                              if entry[0] == DEAD)
            groups.append((name, max_attempts,
                           {key: counters.get(key, 0)
                            for key in GROUP_COUNTER_NAMES},
                           [tuple(item) for item in ordered]))
        return {
            "next_seq": self.next_seq,
            "counters": {key: self.counters.get(key, 0)
                         for key in COUNTER_NAMES},
            "messages": [(seq, *message) for seq, message
                         in sorted(self.messages.items())],
            "groups": groups,
        }


def count_returned(image: dict[str, Any]) -> None:
    """Count each in-flight entry of `image` (a `CoreImage.image` dict)
    as redelivered, as a core does when it closes the consumer that held
    it. `TopicCore.import_image` makes those entries ready without
    counting them."""
    for _, _, group_counters, entries in image["groups"]:
        returned = sum(1 for entry in entries if entry[1] == IN_FLIGHT)
        group_counters["redelivered"] += returned
        image["counters"]["redelivered"] += returned
