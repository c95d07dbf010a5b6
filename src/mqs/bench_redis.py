"""Redis peer loops for the broker and Redis-backend benchmarks.

Each function drives one loop through redis-py (which parses replies
with hiredis when that is installed) against the server at `url`, checks
what arrived, and returns a `RedisRunResult`. None of them starts a
server: pass the URL of one you own, such as the `url` of a
`mqs._redis_server.RedisServer`, or call `run_redis_peers`, which starts
a throwaway server on 127.0.0.1 and runs every loop against it.

Loops (messages of `body_bytes` bytes, 100 by default):

- ``xadd``: one XADD per message, each waiting for its reply.
- ``xadd_pipelined``: XADD sent in pipelines of `batch` commands
  (no MULTI/EXEC), one round trip per batch.
- ``xreadgroup_xack``: a consumer group reads a prefilled stream with
  XREADGROUP COUNT 1 and acknowledges each entry with its own XACK.
- ``xreadgroup_xack_batched``: XREADGROUP COUNT `batch`, then one XACK
  naming every entry of the batch.
- ``lpush_brpop``: the list pattern of Dramatiq-style queues, LPUSH per
  message, then BRPOP per message (time for both phases).
- ``stream_roundtrip``: publish -> consume -> ack across processes: a
  child process XADDs (pipelined by `batch`) while this process reads
  with XREADGROUP COUNT `batch` and acknowledges each read with one
  XACK; timed from the child's start until the last XACK.
- ``broker_publish``, ``broker_publish_batched``: `mqs.Broker` on the
  redis backend, one `publish` per message, or `publish_many` of `batch`
  messages (one script call per batch).
- ``broker_consume_ack``, ``broker_consume_ack_batched``: the same
  broker, `get` and `ack` per message, or `get_many` of `batch` and one
  `ack_many` per batch.

Pipelining (``xadd_pipelined``) and batching inside one script call
(``broker_*_batched``) are separate rows, so each gain shows on its own.

Only the loop itself is timed with `time.perf_counter_ns`, with the
garbage collector off; prefilling and checking are outside the clock.
Every loop writes keys under a fresh ``mqs-bench:<random>:`` prefix
and deletes them afterwards.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from mqs.bench import BenchmarkError, timed_ns

__all__ = [
    "LOOPS",
    "RedisRunResult",
    "lpush_brpop",
    "run_broker_comparison",
    "run_redis_peers",
    "stream_roundtrip",
    "xadd",
    "xadd_pipelined",
    "xreadgroup_xack",
    "xreadgroup_xack_batched",
    "broker_publish",
    "broker_publish_batched",
    "broker_consume_ack",
    "broker_consume_ack_batched",
]

DEFAULT_BODY_BYTES = 100
DEFAULT_BATCH = 100
GROUP = "bench"
CONSUMER = "c1"
# A consumer that receives no entry for this long stops and fails the run.
STALL_TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True)
class RedisRunResult:
    """One timed loop against Redis.

    Attributes
    ----------
    loop : str
        Name of the loop (a key of `LOOPS`).
    count : int
        Messages moved in the timed part.
    elapsed_ns : int
        Wall time of the timed part.
    params : dict
        ``body_bytes``, ``batch``, ``hiredis`` (True when redis-py parsed
        replies with hiredis) and ``url`` (password removed), plus
        ``appendfsync`` when `run_redis_peers` started the server.
    """

    loop: str
    count: int
    elapsed_ns: int
    params: dict[str, Any]

    @property
    def rate_per_s(self) -> float:
        """Messages per second of the timed part."""
        return self.count / max(self.elapsed_ns, 1) * 1e9


def _check_arguments(count: int, body_bytes: int, batch: int) -> None:
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    if not isinstance(body_bytes, int) or body_bytes < 1:
        raise ValueError(f"body_bytes must be an int >= 1, got {body_bytes!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")


def _body(body_bytes: int) -> bytes:
    return bytes((i * 7 + 1) & 0xFF for i in range(body_bytes))


def _public_url(url: str) -> str:
    """Return `url` with any password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        userinfo, _, host = rest.rpartition("@")
        user = userinfo.split(":", 1)[0]
        rest = f"{user}:***@{host}"
    return f"{scheme}{sep}{rest}"


class _Session:
    """A client and a fresh key prefix; deletes the keys on close."""

    def __init__(self, url: str) -> None:
        import redis
        import redis.utils

        # Any: redis-py's reply types are unions over RESP2 and RESP3.
        self.client: Any = redis.Redis.from_url(url)
        self.prefix = f"mqs-bench:{uuid.uuid4().hex[:12]}:"
        self.hiredis = bool(redis.utils.HIREDIS_AVAILABLE)
        self.url = url

    def key(self, name: str) -> str:
        return self.prefix + name

    def params(self, body_bytes: int, batch: int) -> dict[str, Any]:
        return {"body_bytes": body_bytes, "batch": batch,
                "hiredis": self.hiredis, "url": _public_url(self.url)}

    def close(self) -> None:
        try:
            keys = list(self.client.scan_iter(match=self.prefix + "*"))
            if keys:
                self.client.delete(*keys)
        finally:
            self.client.close()

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _prefill(session: _Session, stream: str, count: int, body: bytes) -> None:
    """Add `count` entries to `stream` and create the consumer group."""
    client = session.client
    for start in range(0, count, 1000):
        pipe = client.pipeline(transaction=False)
        for _ in range(min(1000, count - start)):
            pipe.xadd(stream, {"b": body})
        pipe.execute()
    client.xgroup_create(stream, GROUP, id="0")


def _check_stream(session: _Session, stream: str, count: int,
                  body: bytes) -> None:
    length = session.client.xlen(stream)
    if length != count:
        raise BenchmarkError(f"stream {stream} contains {length} entries, "
                             f"expected {count}")
    for entry_id, fields in session.client.xrange(stream, count=1) + \
            session.client.xrevrange(stream, count=1):
        if fields != {b"b": body}:
            raise BenchmarkError(f"entry {entry_id!r} of {stream} has the "
                                 f"wrong fields")


def _check_acked(session: _Session, stream: str, consumed: int,
                 count: int) -> None:
    if consumed != count:
        raise BenchmarkError(f"consumed {consumed} entries of {stream}, "
                             f"expected {count}")
    pending = session.client.xpending(stream, GROUP)["pending"]
    if pending:
        raise BenchmarkError(f"{pending} entries of {stream} are still "
                             f"pending after the acks")


def _check_and_ack(client: Any, stream: str, entries: list,
                   body: bytes) -> int:
    """Check the bodies of `entries` read from `stream`, then XACK them
    all in one call; return how many there were."""
    for entry_id, fields in entries:
        if fields[b"b"] != body:
            raise BenchmarkError(f"entry {entry_id!r} has the wrong body")
    client.xack(stream, GROUP, *[entry[0] for entry in entries])
    return len(entries)


# ---- publish --------------------------------------------------------------

def xadd(url: str, count: int, *, body_bytes: int = DEFAULT_BODY_BYTES
         ) -> RedisRunResult:
    """Time `count` XADD calls, one round trip per message."""
    _check_arguments(count, body_bytes, 1)
    body = _body(body_bytes)
    with _Session(url) as session:
        stream = session.key("stream")
        add = session.client.xadd
        fields = {"b": body}

        def loop() -> None:
            for _ in range(count):
                add(stream, fields)

        elapsed = timed_ns(loop)
        _check_stream(session, stream, count, body)
        return RedisRunResult("xadd", count, elapsed,
                              session.params(body_bytes, 1))


def xadd_pipelined(url: str, count: int, *,
                   body_bytes: int = DEFAULT_BODY_BYTES,
                   batch: int = DEFAULT_BATCH) -> RedisRunResult:
    """Time `count` XADD calls sent in pipelines of `batch` commands."""
    _check_arguments(count, body_bytes, batch)
    body = _body(body_bytes)
    with _Session(url) as session:
        stream = session.key("stream")
        client = session.client
        fields = {"b": body}

        def loop() -> None:
            for start in range(0, count, batch):
                pipe = client.pipeline(transaction=False)
                for _ in range(min(batch, count - start)):
                    pipe.xadd(stream, fields)
                pipe.execute()

        elapsed = timed_ns(loop)
        _check_stream(session, stream, count, body)
        return RedisRunResult("xadd_pipelined", count, elapsed,
                              session.params(body_bytes, batch))


# ---- consume and ack --------------------------------------------------------

def xreadgroup_xack(url: str, count: int, *,
                    body_bytes: int = DEFAULT_BODY_BYTES) -> RedisRunResult:
    """Time reading `count` entries one at a time, each with its own XACK.

    The stream is filled before the clock starts.
    """
    return _read_and_ack("xreadgroup_xack", url, count, body_bytes, 1)


def xreadgroup_xack_batched(url: str, count: int, *,
                            body_bytes: int = DEFAULT_BODY_BYTES,
                            batch: int = DEFAULT_BATCH) -> RedisRunResult:
    """Time reading `count` entries `batch` at a time, one XACK per batch.

    The stream is filled before the clock starts.
    """
    return _read_and_ack("xreadgroup_xack_batched", url, count, body_bytes,
                         batch)


def _read_and_ack(name: str, url: str, count: int, body_bytes: int,
                  batch: int) -> RedisRunResult:
    """Time XREADGROUP COUNT `batch` then one XACK of what it read, until
    `count` entries are acknowledged (two round trips per read)."""
    _check_arguments(count, body_bytes, batch)
    body = _body(body_bytes)
    with _Session(url) as session:
        stream = session.key("stream")
        _prefill(session, stream, count, body)
        client = session.client
        streams = {stream: ">"}
        consumed = [0]

        def loop() -> None:
            done = 0
            while done < count:
                reply = client.xreadgroup(GROUP, CONSUMER, streams,
                                          count=batch)
                if not reply:
                    break
                done += _check_and_ack(client, stream, reply[0][1], body)
            consumed[0] = done

        elapsed = timed_ns(loop)
        _check_acked(session, stream, consumed[0], count)
        return RedisRunResult(name, count, elapsed,
                              session.params(body_bytes, batch))


# ---- lists ----------------------------------------------------------------

def lpush_brpop(url: str, count: int, *,
                body_bytes: int = DEFAULT_BODY_BYTES) -> RedisRunResult:
    """Time LPUSH of `count` messages, then BRPOP of each of them.

    The list is FIFO (pushed on the left, popped on the right); the
    result's params add ``push_ns`` and ``pop_ns`` for the two phases.
    """
    _check_arguments(count, body_bytes, 1)
    body = _body(body_bytes)
    with _Session(url) as session:
        queue = session.key("list")
        client = session.client
        popped = [0]

        def push() -> None:
            for _ in range(count):
                client.lpush(queue, body)

        def pop() -> None:
            done = 0
            for _ in range(count):
                reply = client.brpop([queue], timeout=STALL_TIMEOUT_S)
                if reply is None or reply[1] != body:
                    break
                done += 1
            popped[0] = done

        push_ns = timed_ns(push)
        pop_ns = timed_ns(pop)
        if popped[0] != count or client.llen(queue) != 0:
            raise BenchmarkError(f"popped {popped[0]} of {count} messages "
                                 f"pushed to {queue}")
        params = session.params(body_bytes, 1)
        params.update(push_ns=push_ns, pop_ns=pop_ns)
        return RedisRunResult("lpush_brpop", count, push_ns + pop_ns, params)


# ---- across processes -------------------------------------------------------

def _produce(url: str, stream: str, count: int, body: bytes, batch: int,
             ready_event: Any, start_event: Any) -> None:
    import redis

    client: Any = redis.Redis.from_url(url)
    client.ping()
    ready_event.set()
    start_event.wait()
    fields = {"b": body}
    for start in range(0, count, batch):
        pipe = client.pipeline(transaction=False)
        for _ in range(min(batch, count - start)):
            pipe.xadd(stream, fields)
        pipe.execute()
    client.close()


def stream_roundtrip(url: str, count: int, *,
                     body_bytes: int = DEFAULT_BODY_BYTES,
                     batch: int = 1) -> RedisRunResult:
    """Time publish -> consume -> ack of `count` messages across processes.

    A child process (multiprocessing "spawn") connects, waits for the
    start, then XADDs the messages in pipelines of `batch`; this process
    reads them with XREADGROUP COUNT
    `batch` (blocking up to 1 s per call) and acknowledges each read with
    one XACK. With ``batch=1`` every step is one round trip per message.
    """
    _check_arguments(count, body_bytes, batch)
    body = _body(body_bytes)
    context = multiprocessing.get_context("spawn")
    with _Session(url) as session:
        stream = session.key("stream")
        client = session.client
        client.xgroup_create(stream, GROUP, id="0", mkstream=True)
        ready_event = context.Event()
        start_event = context.Event()
        producer = context.Process(
            target=_produce,
            args=(url, stream, count, body, batch, ready_event, start_event),
            daemon=True)
        producer.start()
        if not ready_event.wait(STALL_TIMEOUT_S):
            producer.kill()
            producer.join()
            raise BenchmarkError(f"the producer process did not connect to "
                                 f"Redis within {STALL_TIMEOUT_S} s")
        streams = {stream: ">"}
        consumed = [0]

        def loop() -> None:
            done = 0
            idle_since = time.monotonic()
            start_event.set()
            while done < count:
                reply = client.xreadgroup(GROUP, CONSUMER, streams,
                                          count=batch, block=1000)
                if not reply:
                    if time.monotonic() - idle_since > STALL_TIMEOUT_S:
                        break
                    continue
                idle_since = time.monotonic()
                done += _check_and_ack(client, stream, reply[0][1], body)
            consumed[0] = done

        try:
            elapsed = timed_ns(loop)
        finally:
            producer.join(STALL_TIMEOUT_S)
            if producer.is_alive():
                producer.kill()
                producer.join()
        if producer.exitcode != 0:
            raise BenchmarkError(f"the producer process exited with "
                                 f"{producer.exitcode}")
        _check_acked(session, stream, consumed[0], count)
        return RedisRunResult("stream_roundtrip", count, elapsed,
                              session.params(body_bytes, batch))


# ---- the mqs broker's redis backend -------------------------------------------

class _BrokerSession:
    """A redis-backend `mqs.Broker` in a fresh namespace; deletes its keys
    on close."""

    def __init__(self, url: str) -> None:
        import mqs

        self.session = _Session(url)
        self.namespace = f"mqs-bench-{uuid.uuid4().hex[:12]}"
        self.broker = mqs.Broker(backend="redis", url=url,
                                 namespace=self.namespace)
        self.broker.declare_topic("bench", dedup_window=0)

    def params(self, body_bytes: int, batch: int) -> dict[str, Any]:
        return self.session.params(body_bytes, batch)

    def check_stored(self, count: int, body: bytes | None = None) -> None:
        """Check the count of stored messages and, given `body`, the body
        of the first and the last entry of the topic's lane 0 stream."""
        stored = self.broker.stats("bench")["stored"]
        if stored != count:
            raise BenchmarkError(f"the topic stores {stored} messages, "
                                 f"expected {count}")
        if body is None:
            return
        stream = f"{{{self.namespace}:bench}}:s:0"
        client = self.session.client
        for entry_id, fields in client.xrange(stream, count=1) + \
                client.xrevrange(stream, count=1):
            if fields.get(b"b") != body:
                raise BenchmarkError(f"entry {entry_id!r} of {stream} has "
                                     f"the wrong body")

    def close(self) -> None:
        self.broker.close()
        client = self.session.client
        keys = list(client.scan_iter(match=f"{{{self.namespace}:*",
                                     count=1000))
        for start in range(0, len(keys), 500):
            client.unlink(*keys[start:start + 500])
        self.session.close()

    def __enter__(self) -> _BrokerSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def broker_publish(url: str, count: int, *,
                   body_bytes: int = DEFAULT_BODY_BYTES,
                   batch: int = 1) -> RedisRunResult:
    """Time `Broker.publish_many` of `count` messages in batches of
    `batch` on the redis backend (``batch=1``: one `publish` per
    message). Each batch is one script call, so one round trip."""
    _check_arguments(count, body_bytes, batch)
    body = _body(body_bytes)
    with _BrokerSession(url) as bench:
        broker = bench.broker
        # A group, so that the messages are stored for a consumer.
        broker.consume("bench", "g").close()

        def loop() -> None:
            if batch == 1:
                for _ in range(count):
                    broker.publish("bench", body)
                return
            for start in range(0, count, batch):
                broker.publish_many("bench",
                                    [body] * min(batch, count - start))

        elapsed = timed_ns(loop)
        bench.check_stored(count, body)
        name = "broker_publish" if batch == 1 else "broker_publish_batched"
        return RedisRunResult(name, count, elapsed,
                              bench.params(body_bytes, batch))


def broker_consume_ack(url: str, count: int, *,
                       body_bytes: int = DEFAULT_BODY_BYTES,
                       batch: int = 1) -> RedisRunResult:
    """Time consuming and acking `count` messages on the redis backend:
    `Consumer.get_many` of `batch` messages then one `Consumer.ack_many`
    (``batch=1``: `get` and `Message.ack` per message). The topic is
    filled before the clock starts."""
    _check_arguments(count, body_bytes, batch)
    body = _body(body_bytes)
    import mqs

    with _BrokerSession(url) as bench:
        broker = bench.broker
        consumer = broker.consume("bench", "g", prefetch=batch)
        for start in range(0, count, 1000):
            broker.publish_many("bench", [body] * min(1000, count - start))
        consumed = [0]

        def loop() -> None:
            done = 0
            while done < count:
                try:
                    messages = consumer.get_many(batch, timeout=0)
                except mqs.Empty:
                    break
                for message in messages:
                    if message.body != body:
                        raise BenchmarkError(f"message {message.id} has the "
                                             f"wrong body")
                if batch == 1:
                    messages[0].ack()
                else:
                    consumer.ack_many(messages)
                done += len(messages)
            consumed[0] = done

        elapsed = timed_ns(loop)
        if consumed[0] != count:
            raise BenchmarkError(f"consumed {consumed[0]} messages, "
                                 f"expected {count}")
        bench.check_stored(0)
        name = ("broker_consume_ack" if batch == 1
                else "broker_consume_ack_batched")
        return RedisRunResult(name, count, elapsed,
                              bench.params(body_bytes, batch))


def broker_publish_batched(url: str, count: int, *,
                           body_bytes: int = DEFAULT_BODY_BYTES,
                           batch: int = DEFAULT_BATCH) -> RedisRunResult:
    """`broker_publish` with batches of `batch` messages."""
    return broker_publish(url, count, body_bytes=body_bytes, batch=batch)


def broker_consume_ack_batched(url: str, count: int, *,
                               body_bytes: int = DEFAULT_BODY_BYTES,
                               batch: int = DEFAULT_BATCH
                               ) -> RedisRunResult:
    """`broker_consume_ack` with batches of `batch` messages."""
    return broker_consume_ack(url, count, body_bytes=body_bytes,
                              batch=batch)


# ---- all loops ----------------------------------------------------------------

LOOPS: dict[str, Callable[..., RedisRunResult]] = {
    "xadd": xadd,
    "xadd_pipelined": xadd_pipelined,
    "xreadgroup_xack": xreadgroup_xack,
    "xreadgroup_xack_batched": xreadgroup_xack_batched,
    "lpush_brpop": lpush_brpop,
    "stream_roundtrip": stream_roundtrip,
    "broker_publish": broker_publish,
    "broker_publish_batched": broker_publish_batched,
    "broker_consume_ack": broker_consume_ack,
    "broker_consume_ack_batched": broker_consume_ack_batched,
}
_BATCHED = {"xadd_pipelined", "xreadgroup_xack_batched", "stream_roundtrip",
            "broker_publish_batched", "broker_consume_ack_batched"}


# The broker comparison of `mqs bench`: loop names in table order, and the
# ratios it reports as (name, numerator loop, denominator loop, which part
# of the denominator's time: None for all of it, or a key of its params).
BROKER_COMPARISON = (
    "xadd", "xadd_pipelined", "broker_publish", "broker_publish_batched",
    "xreadgroup_xack", "xreadgroup_xack_batched", "broker_consume_ack",
    "broker_consume_ack_batched", "lpush_brpop",
)
# Speed-up over the per-message loops that the batched broker loops aim
# for.
BROKER_TARGET = 5.0
# The list loop (LPUSH, then BRPOP without acks) is in the table but not
# in a ratio: it gives no redelivery, so it is no peer of consume+ack.
BROKER_RATIOS = (
    ("publish_batched_vs_xadd", "broker_publish_batched", "xadd", None),
    ("consume_ack_batched_vs_xreadgroup_xack", "broker_consume_ack_batched",
     "xreadgroup_xack", None),
)


def run_broker_comparison(count: int = 5_000, *,
                          body_bytes: int = DEFAULT_BODY_BYTES,
                          batch: int = DEFAULT_BATCH,
                          rounds: int = 3,
                          appendfsync: str | None = None,
                          progress: Callable[[str], None] | None = None
                          ) -> dict[str, Any]:
    """Run `BROKER_COMPARISON` on one throwaway server; return a report.

    Every round runs each loop once, in table order, so a burst of load
    from other processes slows the loops of one round rather than one
    loop; each loop's row is its median round.

    The report (JSON-ready) has the settings, ``results`` (one dict per
    loop: ``loop``, ``batch``, ``rate_per_s`` and ``elapsed_ns`` of the
    median round, and ``rates_per_s`` of every round) and ``ratios``:
    the batched broker loops' median rates over the per-message redis-py
    loops of `BROKER_RATIOS` (``name``, ``value``, ``target``, ``met``).
    """
    _check_arguments(count, body_bytes, batch)
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    from mqs._redis_server import RedisServer

    runs: dict[str, list[RedisRunResult]] = {
        name: [] for name in BROKER_COMPARISON}
    with RedisServer(appendfsync=appendfsync) as server:
        for round_index in range(rounds):
            for name in BROKER_COMPARISON:
                if progress is not None:
                    progress(f"{name} ({round_index + 1}/{rounds})")
                runs[name].append(_run_one(name, server.url, count,
                                           body_bytes, batch))
    results = {name: _median_run(found) for name, found in runs.items()}
    ratios = []
    for ratio, top, bottom, part in BROKER_RATIOS:
        base = results[bottom]
        elapsed = base.elapsed_ns if part is None else base.params[part]
        value = results[top].rate_per_s / (base.count / max(elapsed, 1)
                                           * 1e9)
        ratios.append({"name": ratio, "value": value,
                       "target": BROKER_TARGET,
                       "met": value >= BROKER_TARGET})
    return {
        "count": count, "body_bytes": body_bytes, "batch": batch,
        "rounds": rounds, "appendfsync": appendfsync,
        "hiredis": results["xadd"].params["hiredis"],
        "results": [{"loop": name, "batch": result.params["batch"],
                     "rate_per_s": result.rate_per_s,
                     "elapsed_ns": result.elapsed_ns,
                     "rates_per_s": [run.rate_per_s for run in runs[name]]}
                    for name, result in results.items()],
        "ratios": ratios,
    }


def _median_run(found: list[RedisRunResult]) -> RedisRunResult:
    """Return the run of median elapsed time (the upper one of two)."""
    ordered = sorted(found, key=lambda run: run.elapsed_ns)
    return ordered[len(ordered) // 2]


def run_redis_peers(count: int = 20_000, *,
                    body_bytes: int = DEFAULT_BODY_BYTES,
                    batch: int = DEFAULT_BATCH,
                    appendfsync: str | None = "everysec",
                    loops: Sequence[str] | None = None,
                    url: str | None = None) -> list[RedisRunResult]:
    """Run Redis peer loops and return their results in order.

    Parameters
    ----------
    count : int
        Messages per loop.
    body_bytes, batch : int
        Message size, and the batch of the batched loops.
    appendfsync : {"always", "everysec", "no"} or None
        Durability of the throwaway server this starts (None: no
        append-only file). Ignored when `url` is given.
    loops : sequence of str or None
        Names from `LOOPS` (default: all). ``stream_roundtrip`` runs
        with `batch` here; call `stream_roundtrip` with ``batch=1`` for
        the per-message round trip.
    url : str or None
        Use this server instead of starting one. Its keys are left alone
        apart from the ``mqs-bench:`` prefixes the loops create.

    Raises
    ------
    ValueError
        For an unknown loop name or a bad count, size or batch.
    mqs._redis_server.RedisServerError
        If no redis-server can be started.
    mqs.bench.BenchmarkError
        If a loop lost, added or damaged a message.
    """
    names = list(loops) if loops is not None else list(LOOPS)
    for name in names:
        if name not in LOOPS:
            raise ValueError(f"unknown Redis loop {name!r}; expected one of "
                             f"{', '.join(LOOPS)}")
    _check_arguments(count, body_bytes, batch)
    if url is not None:
        return [_run_one(name, url, count, body_bytes, batch)
                for name in names]

    from mqs._redis_server import RedisServer

    with RedisServer(appendfsync=appendfsync) as server:
        results = []
        for name in names:
            result = _run_one(name, server.url, count, body_bytes, batch)
            result.params["appendfsync"] = appendfsync
            results.append(result)
        return results


def _run_one(name: str, url: str, count: int, body_bytes: int,
             batch: int) -> RedisRunResult:
    if name in _BATCHED:
        return LOOPS[name](url, count, body_bytes=body_bytes, batch=batch)
    return LOOPS[name](url, count, body_bytes=body_bytes)
