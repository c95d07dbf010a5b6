"""The ``redis`` backend: the broker's state in Redis, shared by processes.

Every broker that names the same server, database and `namespace` shares
the topics, so producers and consumers may run in many processes and
hosts. Each operation of the contract runs as one call of a Lua script
(``_redis.lua``, loaded once as a library of functions and called with
FCALL, or with EVALSHA on servers before Redis 7), so it is atomic
however many clients run it. That file lists every key.

Mapping
    Each lane of a topic is a Redis Stream, and a message id is its
    stream entry id. A broker group is a consumer group on each lane's
    stream. The first delivery reads an entry with XREADGROUP and an ack
    is XACK. In the group's pending entries list, an in-flight entry
    belongs to its consumer, with the delivery count equal to its
    attempts. Its idle time is set so that it reaches a fixed XAUTOCLAIM
    min idle time at the ack deadline, and `extend` resets it with XCLAIM
    IDLE. A delivery past its deadline is taken back with XAUTOCLAIM, then
    redelivered with its delivery count raised or dead-lettered at
    `max_attempts`.
    Ack deadlines, delays and nack delays are also scores in one sorted
    set per topic. The script handles whatever is due before every
    operation, so no timer process is needed, and XAUTOCLAIM scans a
    group's pending entries only when one of its deadlines passed. Dead
    letters go to a stream with their reason. A dedup id is claimed with
    one ``SET NX PX`` (PX because windows are float seconds, which EX
    would round to whole ones) and released again if the topic turns out
    full. Token buckets live in the group's hash, so every client shares
    one rate limit. Each group keeps the counters and sampled latency
    histograms of `group_stats` in hashes of its own. All keys of a topic
    start with ``{<namespace>:<topic>}``, a Redis Cluster hash tag, so
    each topic lives in one slot.

Bodies
    By default a body must be ``bytes``, ``bytearray``, ``memoryview`` or
    ``str`` (sent as UTF-8 and returned as ``str``); headers must be JSON
    values that come back as sent (dicts with ``str`` keys, lists, ``str``,
    ``int``, ``float``, ``bool`` and None; a tuple or an ``int`` key
    raises `TypeError`); keys and dedup ids must be ``str``, ``bytes`` or
    ``int``.
    A body or headers longer than the server's proto-max-bulk-len (512
    MiB by default) raise `MessageTooLarge`.
    ``serializer="pickle"`` accepts any picklable body, header and key.
    It is off by default because unpickling runs code: anyone who can
    write to the Redis server could run code in every consumer. A broker
    without it delivers a pickled body as the raw ``bytes`` and never
    unpickles it.

Connections
    `url` gives the server, database, user (an ACL user, or none for
    ``requirepass``), password and TLS (``rediss://``, with the CA and
    client certificate as query parameters such as ``ssl_ca_certs=``), as
    for ``redis.Redis.from_url``; redis-py parses replies with hiredis
    when it is installed. A lost connection, a timed-out read or a
    server that is still loading its data is retried with exponential
    backoff and full jitter, each retry logged, until `retry_timeout`
    seconds have passed since the call started; then
    `BackendConnectionError` is raised. A server certificate that fails
    TLS verification is not retried: its subclass
    `CertificateVerifyError` is raised at once.
    A script that ran before the connection dropped may therefore run
    twice: a publish may store its batch twice (use ``dedup_id`` for
    exactly-once). An ack or nack that is retried and finds the message
    settled returns True, as its first attempt most likely settled it. A
    fetch is safe to run twice: its retry first puts back, unseen, the
    messages that the lost attempt took (except with ``auto_ack``, which
    acked them already), then takes messages again.
    Each attempt waits for a reply (and to connect and send) for
    `socket_timeout` seconds, or for the part of `retry_timeout` that
    is left if that is shorter, but at least 1 s (or `socket_timeout`
    if that is shorter). So a server that accepts connections but does
    not reply (stopped with SIGSTOP, or stuck behind a long command)
    fails a call within about `retry_timeout` plus 1 s.
    Blocking waits (XREAD BLOCK on the topic's ``wake`` stream) last at
    most the smaller of 1 s and half of `socket_timeout`, and their
    reply wait adds the block time. So a healthy connection never times
    out while it waits, and a long `get` is a series of short waits. A
    wait that loses its connection ends early and is not retried: the
    script call after it retries instead.

asyncio
    `fetch_async` and `Broker.publish_async` (through `run_blocking`)
    run their calls, retries included, in the backend's executor of
    `_ASYNC_WORKERS` threads. An awaiting fetch parks on a `Wakeups`
    thread per topic, which blocks on the topic's wake stream (XREAD
    BLOCK) while any coroutine waits for that topic.

Retention
    A message stays in its lane's stream until every group that had it
    finished it (and `retention` passed), then the script deletes it
    with XDEL. `stream_maxlen` adds ``MAXLEN ~ N`` to every XADD, and
    operators may also XTRIM with MAXLEN or MINID. Neither looks at
    pending entries: trimming deletes entries that groups still hold
    (in flight, delayed, waiting behind their key, or not read yet). An
    entry that a group had read and that is found trimmed when it is
    about to be delivered again goes to the dead-letter stream with
    reason ``"trimmed"`` (without its body), counted as
    ``dead_lettered.trimmed``; an in-flight one is acked normally. One
    trimmed before any group read it is lost without being counted, so
    set `stream_maxlen` well above the backlog consumers may build.

Consumer leases
    Each consumer has a lease of 3 times its ack_timeout, at least 5 s,
    which its fetches renew (a waiting get fetches at least every half
    lease). When a lease ends, the next script call on the topic by
    any client removes the consumer, unless it still holds deliveries
    (extended past their deadline; it is checked again one lease
    later). Its group fields, its lease timer and its consumer in each
    lane's stream group go, `stats` counts it as
    ``consumers_expired``, and the client that removed it logs a
    WARNING. So a consumer whose process died (SIGKILL) stops counting
    in `group_stats` about one lease after its last fetch, and its
    deliveries came back at their ack deadlines before that. A live
    consumer that made no get for a lease is removed too; its next get
    registers it again and logs that at INFO.

Memory
    A server whose used memory is above its ``maxmemory`` and that may
    evict nothing (the ``noeviction`` policy) rejects writes that add
    data. A publish, the declare of a new topic, the first consumer of a
    new group and a redrive then raise `BackendOutOfMemory` (a `Full`)
    at once, whatever `when_full`, naming the topic and the fixes. Such
    a call stores nothing; ``accepted`` counts the messages of a batch
    that earlier script calls stored. Getting, acking, nacking,
    extending, closing consumers, deleting topics, purging dead letters
    and reading stats keep working, so consumers can free memory: their
    scripts may take the server a little past ``maxmemory``.

Drops
    Every other message dropped (ttl passed, ``when_full="drop_oldest"``,
    duplicate dedup id, skipped by a first group at ``"latest"``) or
    moved to or purged from the dead-letter stream is counted in the
    topic's counters on the server (`stats`). Each script call returns
    the drop counters it changed, and the client logs a WARNING when a
    total passes 1, 10, 100 and so on, as the other backends do. The
    totals are shared by every client of the topic, so each of these
    warnings is logged once, by the client whose call passed it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import hashlib
import importlib.resources
import itertools
import json
import logging
import os
import pickle
import random
import re
import ssl
import threading
import time
import urllib.parse
import uuid
import weakref
from collections.abc import Sequence
from typing import Any

from mqs.broker._backend import (
    COUNTER_KEYS,
    GAUGE_KEYS,
    Backend,
    DeadLetter,
    Delivery,
    Envelope,
    GroupStats,
    decode_each,
    undecodable_letter,
    undecodable_part,
)
from mqs import metrics
from mqs.broker._memory import (
    _deleted_while_full,
    _redeclare_changes,
    _sample_every,
    _stayed_full,
)
from mqs.broker._policy import Backoff, Rate, TopicConfig
from mqs.broker._state import _log_point, warn_drop_count
from mqs.broker._wakeup import Wakeups
from mqs.errors import (
    BackendConnectionError,
    BackendOutOfMemory,
    BackendUnavailable,
    CertificateVerifyError,
    Full,
    MessageTooLarge,
    ShutDown,
    UnknownTopic,
)

__all__ = ["RedisBackend"]

logger = logging.getLogger(__name__)

_SERIALIZERS = (None, "pickle")
# Messages per script call: Redis runs one script at a time, so a larger
# batch would hold up every other client of the server for longer.
_MAX_BATCH = 1000
# Bytes of bodies per publish call, for the same reason. A publish sends
# a run's bodies joined into one argument, and Redis rejects an argument
# longer than its proto-max-bulk-len (512 MiB by default), so a batch of
# bodies that are each small enough must not be joined beyond that.
_MAX_BATCH_BYTES = 8 << 20
# Redis's default proto-max-bulk-len, assumed when CONFIG GET is refused.
_DEFAULT_MAX_BULK = 512 << 20
# Body encodings stored in the entry's "e" field.
_BYTES, _STR, _PICKLE = b"b", b"s", b"p"
# Arguments of each run of a publish after its message count, up to the
# bodies (the list of _settings_args).
_RUN_SETTINGS = 10


# Threads that run the Redis calls of `fetch_async` and `publish_async`
# for one backend, so that an event loop never waits on the network. The
# waits for a change run in `Wakeups` threads instead, one per topic.
_ASYNC_WORKERS = 8

# Max connections of the pool that the backend builds from `url`. Every
# waiting get uses one for its blocking XREAD, so the pool needs one per
# waiting thread and awaited topic, plus those of the other calls.
# redis-py 8.2 caps a pool at 100 when max_connections is not given. With
# that cap, 100 waiting gets took every connection, and publishes and the
# other gets only retried until they timed out.
_MAX_CONNECTIONS = 2 ** 31

# A consumer's lease: the seconds after its last fetch (or its open) at
# which the server removes it, unless it holds deliveries, so that the
# consumers of a process that died do not stay registered. The lease is
# _LEASE_FACTOR times the consumer's ack_timeout, at least _LEASE_MIN_S,
# which is well above the longest wait between two fetches of a waiting
# get (see `_wait_left`).
_LEASE_FACTOR = 3
_LEASE_MIN_S = 5.0

# Counters of `stats` that only this backend has: "consumers_expired"
# counts the consumers removed when their lease ended.
_REDIS_COUNTER_KEYS = ("consumers_expired",)

# Seconds a redis backend retries a lost connection by default
# (`RedisBackend` retry_timeout).
DEFAULT_RETRY_TIMEOUT_S = 30.0

# Minimum seconds each attempt of a call waits for a reply (capped at
# socket_timeout), even when less of retry_timeout is left. A server busy
# with another client's command for a moment should not fail a call with
# a short retry_timeout.
_MIN_REPLY_WAIT_S = 1.0

# Seconds the Redis call running in this thread (or task) may wait to
# connect, send or read one reply. `RedisBackend._call` sets it; the
# connections of `_bounded_connection_class` apply it. When it is None,
# the connection's own socket timeouts apply.
_reply_timeout: contextvars.ContextVar[float | None] = \
    contextvars.ContextVar("mqs_redis_reply_timeout", default=None)

# The fix named in the TypeError of a body, header, key or dedup id that
# the default serializer cannot store. `mqs bridge` replaces it with the
# name of its command-line option.
PICKLE_HINT = "pass serializer='pickle' to the Broker"

_JSON_SCALARS = (str, int, float, bool, type(None))


def _check_json_exact(value: Any, where: str) -> None:
    """Raise TypeError unless `value` comes back from JSON as it went in:
    dicts with str keys, lists and str, int, float, bool or None, by
    exact type. JSON would silently turn other keys into strings and
    tuples into lists."""
    kind = type(value)
    if kind in _JSON_SCALARS:
        return
    if kind is list:
        for index, item in enumerate(value):
            _check_json_exact(item, f"{where}[{index}]")
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(
                    f"{where} has the {type(key).__name__} key {key!r}; "
                    f"backend='redis' stores headers as JSON, which keeps "
                    f"only str keys; use str keys, or {PICKLE_HINT} to "
                    f"keep any key")
            _check_json_exact(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} is a {kind.__name__} ({value!r:.60}); backend='redis' "
        f"stores headers as JSON, which returns only dict, list, str, int, "
        f"float, bool and None as they were sent; convert it, or "
        f"{PICKLE_HINT} to keep any object")


# The warning logged for the 1st, 10th, 100th ... pickled body read
# without serializer='pickle' (arguments: the message id and the count).
# `mqs dlq list` adds the name of its -o option to it.
PICKLED_BODY_WARNING = (
    "message %s has a pickled body, but this broker was opened without "
    "serializer='pickle': delivering the raw bytes (%d such bodies so "
    "far)")


def _load_script() -> str:
    return importlib.resources.files("mqs.broker").joinpath(
        "_redis.lua").read_text(encoding="utf-8")


# The operations that a server above its maxmemory still runs: the
# MAY_EXCEED_MAXMEMORY table of _redis.lua. Their library function has
# the allow-oom flag.
_MAY_EXCEED_MAXMEMORY = frozenset({
    "fetch", "ack", "ack_many", "nack", "extend", "release", "put_back",
    "close", "in_flight", "dlq_list", "dlq_purge", "stats", "group_stats"})


# Seconds after which a backend that runs EVALSHA because a server out
# of memory rejected FUNCTION LOAD tries to load the library again.
_LIBRARY_RETRY_S = 30.0

# FUNCTION LOADs that one operation makes at most when FCALL finds the
# library gone, as a FUNCTION FLUSH or restart may remove it again
# before the call.
_LIBRARY_LOADS = 3

# The operations that a server above its maxmemory runs only for an
# existing group or topic. They go through the plain function first, and
# after its OOM error through the allow-oom one, where the script rejects
# them unless the group or topic exists.
_RETRIED_WITH_ALLOW_OOM = frozenset({"open", "declare"})


# The lines after the script's body that register the library's two
# functions: NAME, and NAME_oom with the allow-oom flag.
_LIBRARY_FUNCTIONS = (
    "redis.register_function{{function_name='{name}', "
    "callback=function(keys, args) "
    "return run_call(keys, args, false) end}}\n"
    "redis.register_function{{function_name='{name}_oom', "
    "callback=function(keys, args) "
    "return run_call(keys, args, true) end, "
    "flags={{'allow-oom'}}}}\n")


def _library_name(body: str) -> str:
    """Return the name of the library that loads `body`: a digest of the
    body and of _LIBRARY_FUNCTIONS, so that clients of different mqs
    versions on one server each call their own."""
    code = body + "\n" + _LIBRARY_FUNCTIONS
    return "mqs_" + hashlib.sha1(code.encode("utf-8")).hexdigest()[:16]


def _eval_script(body: str) -> str:
    """Return `body` as a script for EVAL, which passes the keys and
    arguments in the globals KEYS and ARGV."""
    return ("local CALL_KEYS, CALL_ARGV = KEYS, ARGV\n" + body
            + "\nreturn run_call(CALL_KEYS, CALL_ARGV, false)\n")


def _library_code(body: str) -> str:
    """Return `body` as a library for FUNCTION LOAD, with the functions
    of _LIBRARY_FUNCTIONS."""
    name = _library_name(body)
    return (f"#!lua name={name}\n{body}\n"
            + _LIBRARY_FUNCTIONS.format(name=name))


def _redis_module():
    try:
        import redis
    except ImportError:
        raise BackendUnavailable(
            "backend='redis' needs redis-py, which is not installed: "
            "pip install 'mqs[redis]' (or 'redis>=5'), and hiredis for "
            "faster replies") from None
    return redis


def _check_retry_seconds(option: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not value >= 0:
        raise ValueError(
            f"{option} must be 0 or more seconds (0: no retry), got "
            f"{value!r}")


def _certificate_failed(exc: BaseException) -> bool:
    """Return whether a redis-py connection error comes from a failed
    TLS certificate check (redis-py 8.2 keeps the `ssl` error as the cause)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def _bounded_socket(connection: Any):
    """Apply the current call's reply timeout to `connection`'s socket
    inside the ``with`` body, then restore the connection's own."""
    limit = _reply_timeout.get()
    # redis-py keeps the socket in `_sock` (5.x to 8.x); None while the
    # connection is closed.
    sock = getattr(connection, "_sock", None)
    if limit is None or sock is None:
        yield
        return
    sock.settimeout(limit)
    try:
        yield
    finally:
        try:
            sock.settimeout(connection.socket_timeout)
        except OSError:
            # redis-py closed the socket after an error, so there is
            # nothing to restore.
            pass


def _bounded_connection_class(base: type) -> type:
    """Return a subclass of the redis-py connection class `base` whose
    connect, send and reply waits last at most the current call's reply
    timeout (`_reply_timeout`).

    redis-py applies one socket timeout to every command. A backend call
    needs its own: what is left of retry_timeout, plus the block time of
    a blocking read.
    """

    class BoundedConnection(base):  # type: ignore[misc, valid-type]
        def _connect(self):
            limit = _reply_timeout.get()
            configured = self.socket_connect_timeout
            if limit is not None and (configured is None
                                      or configured > limit):
                self.socket_connect_timeout = limit
            try:
                return super()._connect()
            finally:
                self.socket_connect_timeout = configured

        def send_packed_command(self, *args, **kwargs):
            if getattr(self, "_sock", None) is None:
                # Connect first, so that the send has a socket to bound.
                self.connect()
            with _bounded_socket(self):
                return super().send_packed_command(*args, **kwargs)

        def read_response(self, *args, **kwargs):
            with _bounded_socket(self):
                return super().read_response(*args, **kwargs)

    BoundedConnection.__name__ = f"Bounded{base.__name__}"
    BoundedConnection.__qualname__ = BoundedConnection.__name__
    return BoundedConnection


def _server_busy(exc: BaseException) -> bool:
    """Return whether a redis-py error is the BUSY reply of a server that
    runs a script past its busy-reply-threshold (lua-time-limit): the
    server runs no other command until the script ends."""
    return str(exc).startswith("BUSY ")


def _public_url(url: str) -> str:
    """Return `url` with its password replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urllib.parse.urlunsplit(
        (parts.scheme, f"{user}:***@{host}{port}", parts.path, parts.query,
         parts.fragment))


def _masked_url(url: str) -> str:
    """Return `url` with its password replaced by ``***``, also for a URL
    that `urllib.parse` rejects (such as one with an invalid port)."""
    try:
        return _public_url(url)
    except ValueError:
        return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


def _check_database_path(url: str) -> None:
    """Raise ValueError if the path of a redis:// or rediss:// `url` is not
    a database number: redis-py (checked on 8.2) ignores such a path and
    uses database 0."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        # redis-py's own parse of the URL raises the clearer error.
        return
    if parts.scheme not in ("redis", "rediss"):
        return
    path = parts.path.replace("/", "")
    if path and not re.fullmatch(r"[0-9]+", path):
        raise ValueError(
            f"invalid Redis URL {_masked_url(url)!r}: the path "
            f"{parts.path!r} is not a database number; use "
            f"redis://[user:password@]host:port/db with db a number such "
            f"as 0")


# ---- topic settings as JSON ---------------------------------------------

def _rate_for_script(rate: Rate) -> dict[str, Any]:
    return {"per_second": rate.per_second, "capacity": rate.capacity,
            "adaptive": rate.adaptive, "floor": rate.floor,
            "decrease": rate.decrease, "increase": rate.increase,
            "cut_interval_ms": rate.cut_interval * 1000}


def _config_json(config: TopicConfig) -> str:
    """Return the settings as the JSON the script reads, plus the
    `TopicConfig` fields under "py" to rebuild it."""
    lanes = config.lanes
    weights = config.weight_map
    retry = config.retry
    script = {
        "lanes": list(lanes),
        "weights": [weights[lane] for lane in lanes],
        "strict": config.policy == "strict",
        "rate": _rate_for_script(config.rate) if config.rate else False,
        "lane_rates": [[lane, _rate_for_script(rate)]
                       for lane, rate in config.lane_rates],
        "max_attempts": config.max_attempts or 0,
        "retry": dataclasses.asdict(retry) if retry else False,
        "ttl_ms": (config.ttl or 0) * 1000,
        "on_expire": config.on_expire,
        "retention_ms": (config.retention or 0) * 1000,
        "maxsize": config.maxsize,
        "when_full": config.when_full,
        "dedup_ms": config.dedup_window * 1000,
        "py": dataclasses.asdict(config),
    }
    return json.dumps(script, sort_keys=True)


def _config_from_json(raw: bytes | str) -> TopicConfig:
    fields = json.loads(raw)["py"]
    fields["weights"] = tuple(tuple(pair) for pair in fields["weights"])
    if fields["rate"] is not None:
        fields["rate"] = Rate(**fields["rate"])
    fields["lane_rates"] = tuple((lane, Rate(**rate))
                                 for lane, rate in fields["lane_rates"])
    if fields["retry"] is not None:
        fields["retry"] = Backoff(**fields["retry"])
    return TopicConfig(**fields)


# ---- values as Redis strings --------------------------------------------

def _build_surrogate_error(what: str, value: str,
                           error: UnicodeEncodeError) -> ValueError:
    return ValueError(
        f"{what} {value!r} has a lone surrogate at index {error.start}, "
        f"which is not valid UTF-8 on backend='redis'; pass it as bytes "
        f"(os.fsencode reverses os.fsdecode), or {PICKLE_HINT} to store "
        f"the str as it is")


def _token(value: Any, what: str, allow_pickle: bool) -> bytes:
    """Encode a key or dedup id as a type-tagged byte string."""
    if isinstance(value, str):
        try:
            return b"s:" + value.encode()
        except UnicodeEncodeError as exc:
            if not allow_pickle:
                raise _build_surrogate_error(what, value, exc) from None
            return b"p:" + pickle.dumps(value, protocol=4)
    if isinstance(value, bytes):
        return b"b:" + value
    if isinstance(value, int) and not isinstance(value, bool):
        return b"i:" + str(value).encode()
    if allow_pickle:
        return b"p:" + pickle.dumps(value, protocol=4)
    raise TypeError(
        f"{what} must be a str, bytes or int on backend='redis', got "
        f"{type(value).__name__} {value!r}; {PICKLE_HINT} to allow other "
        f"picklable values")


def _untoken(token: bytes, allow_pickle: bool) -> Any:
    kind, value = token[:2], token[2:]
    if kind == b"s:":
        return value.decode()
    if kind == b"i:":
        return int(value)
    if kind == b"p:" and allow_pickle:
        return pickle.loads(value)
    return value


class RedisBackend(Backend):
    """Broker state in a Redis server (6.2 or later, for XAUTOCLAIM;
    tested on 7.0).

    Parameters
    ----------
    url : str
        ``redis://[user:password@]host:port/db`` or ``rediss://`` for TLS.
        Required: the backend never guesses a server. redis-py's TLS
        settings go in the query string, such as
        ``rediss://user:pw@host:6380/0?ssl_ca_certs=/etc/ca.pem`` (also
        ``ssl_certfile``, ``ssl_keyfile`` and ``ssl_cert_reqs``).
    serializer : None or "pickle"
        None (default): bodies are bytes or str. ``"pickle"``: any
        picklable body, header or key; use it only when every client that
        can write to the server is trusted (see the module docs).
    namespace : str
        First part of every key (``{namespace:topic}...``). Brokers with
        different namespaces on one server do not see each other. It
        cannot contain braces or colons (topic names may contain colons).
    socket_timeout : float
        Seconds a command may wait for its reply, unless less of
        `retry_timeout` is left (see Connections in the module docs).
        Blocking waits use at most half of it.
    retry_timeout : float
        Seconds from the start of a call to keep retrying a lost
        connection or a server that does not reply before raising
        `BackendConnectionError`.
    connect_retry_timeout : float, optional
        Seconds to keep retrying the first connection, made while the
        backend opens, before raising `BackendConnectionError`. None
        (default) uses `retry_timeout`. A small value makes a wrong URL
        fail fast while later outages are still retried for
        `retry_timeout`.
    stream_maxlen : int, optional
        Cap each lane's stream at about this many entries (``XADD MAXLEN
        ~``). An entry trimmed after a group read it is dead-lettered
        with reason ``"trimmed"``. One trimmed before any group read it
        is lost without being counted. None (default) never trims.
    client : redis.Redis, optional
        Use this client instead of one built from `url` (its replies must
        be bytes: ``decode_responses=False``). The backend leaves its
        connections as they are, so each attempt waits for a reply for
        the client's own socket timeout, which can exceed what is left
        of `retry_timeout`.
    sample_every : int, None or "default"
        Sample the latencies of one delivery in this many per group
        (see `group_stats`); None turns sampling off. The default is
        `mqs.metrics.default_sample_every()` when the backend is made.

    Attributes
    ----------
    lost_auto_acked : int
        Messages that a cancelled `get_async` took under ``auto_ack``
        and that could not be given back to their group when the
        consumer closed (the topic or group was deleted, the server
        stayed unreachable, or the broker had closed). Each is logged.
    """

    name = "redis"
    # The script raises MQS_UNKNOWN before it stores anything.
    # NOTE: a batch of more than _MAX_BATCH messages takes several calls.
    # A topic deleted between two of them raises UnknownTopic after the
    # earlier calls stored messages, which the deletion removed again.
    publish_checks_topic = True

    def __init__(self, url: str | None = None, *,
                 serializer: str | None = None, namespace: str = "mqs",
                 socket_timeout: float = 5.0,
                 retry_timeout: float = DEFAULT_RETRY_TIMEOUT_S,
                 connect_retry_timeout: float | None = None,
                 stream_maxlen: int | None = None,
                 client: Any = None,
                 sample_every: int | None | str = "default") -> None:
        redis = _redis_module()
        self.sample_every = _sample_every(sample_every)
        if serializer not in _SERIALIZERS:
            raise ValueError(
                f"serializer must be None (bytes and str bodies) or "
                f"'pickle', got {serializer!r}")
        if not isinstance(namespace, str) or not namespace \
                or "{" in namespace or "}" in namespace:
            raise ValueError(
                f"namespace must be a non-empty str without braces, got "
                f"{namespace!r}")
        if ":" in namespace:
            # Topic names may contain colons, so {a:b:c} would be topic
            # "b:c" of namespace "a" and topic "c" of namespace "a:b".
            raise ValueError(
                f"namespace cannot contain ':', got {namespace!r}; use "
                f"another separator, such as "
                f"{namespace.replace(':', '.')!r}")
        if isinstance(socket_timeout, bool) \
                or not isinstance(socket_timeout, (int, float)) \
                or not socket_timeout > 0:
            raise ValueError(
                f"socket_timeout must be above 0 seconds, got "
                f"{socket_timeout!r}")
        _check_retry_seconds("retry_timeout", retry_timeout)
        if connect_retry_timeout is not None:
            _check_retry_seconds("connect_retry_timeout",
                                 connect_retry_timeout)
        if stream_maxlen is not None and (
                isinstance(stream_maxlen, bool)
                or not isinstance(stream_maxlen, int) or stream_maxlen < 1):
            raise ValueError(
                f"stream_maxlen must be an int of 1 or more or None, got "
                f"{stream_maxlen!r}")
        if client is None:
            if not isinstance(url, str) or not url:
                raise ValueError(
                    f"backend='redis' needs url= as a non-empty str, such "
                    f"as 'redis://127.0.0.1:6379/0' or "
                    f"'rediss://user:password@host:6380/0', got "
                    f"{type(url).__name__} {url!r}")
            _check_database_path(url)
            try:
                client = redis.Redis.from_url(
                    url, socket_timeout=socket_timeout,
                    socket_connect_timeout=socket_timeout,
                    max_connections=_MAX_CONNECTIONS)
            except ValueError as exc:
                # redis-py's message names neither the URL nor its form.
                raise ValueError(
                    f"invalid Redis URL {_masked_url(url)!r}: {exc}; use "
                    f"redis://[user:password@]host:port/db, rediss:// for "
                    f"TLS or unix:///path/to/redis.sock") from exc
            # from_url picks the class for the scheme (TCP, TLS or Unix
            # socket) and connects only on the first command, so every
            # connection of this pool gets the bounded class.
            pool = client.connection_pool
            pool.connection_class = _bounded_connection_class(
                pool.connection_class)
        else:
            if url is not None:
                raise ValueError(
                    f"pass url= or client=, not both: the backend would "
                    f"connect through client {client!r} and ignore url "
                    f"{_masked_url(url)!r}")
            # The backend parses replies as bytes, so a client that
            # decodes them would fail at the first publish or get.
            if client.get_connection_kwargs().get("decode_responses"):
                raise ValueError(
                    f"client {client!r} decodes replies to str; the redis "
                    f"backend needs bytes, so create the client with "
                    f"decode_responses=False (the default)")
            url = repr(client)
        self._redis = redis
        self.url = _public_url(url)
        self._client = client
        self._pickle = serializer == "pickle"
        # Pickled bodies delivered raw, for PICKLED_BODY_WARNING.
        self._raw_pickled = 0
        self.pickles_messages = self._pickle
        self._namespace = namespace
        self._socket_timeout = socket_timeout
        self._retry_timeout = retry_timeout
        # The option that set _retry_timeout, named in the error.
        self._retry_option = "retry_timeout"
        self._maxlen = stream_maxlen or 0
        self._block_cap = max(0.01, min(1.0, socket_timeout / 2))
        self._backoff = redis.backoff.FullJitterBackoff(cap=2.0, base=0.05)
        self._rng = random.Random()
        self._closed = False
        # asyncio (see `fetch_async`): the executor is made by the first
        # async call, and each awaited topic gets one wake stream word.
        self._async_lock = threading.Lock()
        self._async_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._wakeups = Wakeups(f"redis {self.url}")
        self._wake_words: dict[str, _WakeStream] = {}
        # consumer -> raw deliveries that a cancelled `fetch_async` took
        # with auto_ack, which that consumer's next fetch returns, or its
        # close gives back to the group (`_put_back`).
        self._stashed: dict[str, list] = {}
        self.lost_auto_acked = 0
        # consumer -> (topic, prefetch, max_attempts, ack_timeout) of the
        # consumers this backend opened and did not close, for `_reopen`.
        self._opened: dict[str, tuple[str, int, int | None,
                                      float | None]] = {}
        # consumer -> time.monotonic() of its last fetch, for `_reopen`.
        self._last_fetch: dict[str, float] = {}
        _backends.add(self)
        # Fetch call ids: unique per backend object and call.
        self._call_prefix = uuid.uuid4().hex[:12] + ":"
        self._call_numbers = itertools.count()
        body = _load_script()
        self._script = client.register_script(_eval_script(body))
        self._library_code = _library_code(body)
        self._library_name = _library_name(body)
        # The library's name once FUNCTION LOAD succeeded; None runs every
        # operation with EVALSHA: servers before Redis 7, an ACL that
        # denies FUNCTION or FCALL, or a server out of memory until a
        # retry at `_library_retry_at` loads the library.
        self._library: str | None = None
        # time.monotonic() at which to try FUNCTION LOAD again after a
        # server out of memory rejected it, or None.
        self._library_retry_at: float | None = None
        if connect_retry_timeout is not None:
            self._retry_timeout = connect_retry_timeout
            self._retry_option = "connect_retry_timeout"
        try:
            self._call(client.ping)
        except redis.ResponseError as exc:
            if not str(exc).startswith("DB index is out of range"):
                raise
            database = client.connection_pool.connection_kwargs.get("db")
            raise ValueError(
                f"invalid Redis URL {self.url!r}: the server has no database "
                f"{database} ({exc}); use a database number below the "
                f"server's 'databases' setting (16 by default)") from None
        finally:
            self._retry_timeout = retry_timeout
            self._retry_option = "retry_timeout"
        self._max_bulk = self._server_max_bulk()
        if self._use_functions:
            self._load_library()

    # Whether to load the script as a library of functions when the server
    # takes FUNCTION LOAD. Tests turn it off to run the EVALSHA path that
    # servers before Redis 7 take.
    _use_functions = True

    def _load_library(self) -> None:
        """Load the script as a library (FUNCTION LOAD), or leave
        `_library` None when the server does not take it."""
        try:
            self._call(self._client.function_load, self._library_code)
        except self._redis.ResponseError as exc:
            if self._out_of_memory(exc):
                self._library_out_of_memory(exc)
                return
            text = str(exc)
            if "already exists" not in text:
                if not (text.startswith("unknown command")
                        or "NOPERM" in text or "no permissions" in text):
                    raise
                logger.info(
                    "Redis at %s does not take FUNCTION LOAD (%s); mqs "
                    "runs its script with EVALSHA, which costs more per "
                    "operation", self.url, text)
                self._library = None
                self._library_retry_at = None
                return
        self._library = self._library_name
        self._library_retry_at = None

    def _library_out_of_memory(self, exc: BaseException) -> None:
        """Use the library if the server has it, after FUNCTION LOAD failed
        with the OOM error. Otherwise run EVALSHA, and try FUNCTION LOAD
        again after _LIBRARY_RETRY_S.

        A server above its maxmemory rejects FUNCTION LOAD even when the
        library exists (checked on Redis 7.0.15), but it runs the
        allow-oom function and SCRIPT LOAD, so consumers can still start
        and drain it."""
        try:
            listed = self._call(self._client.execute_command, "FUNCTION",
                                "LIST", "LIBRARYNAME", self._library_name)
        except self._redis.ResponseError:
            listed = []
        if listed:
            self._library = self._library_name
            self._library_retry_at = None
            return
        self._library = None
        self._library_retry_at = time.monotonic() + _LIBRARY_RETRY_S
        logger.warning(
            "Redis at %s is out of memory and rejected FUNCTION LOAD (%s); "
            "mqs runs its script with EVALSHA, and loads the library again "
            "in %g s", self.url, exc, _LIBRARY_RETRY_S)

    def _server_max_bulk(self) -> int:
        """Return the server's proto-max-bulk-len, or its default when the
        server does not allow CONFIG GET (managed services, ACLs)."""
        try:
            reply = self._call(self._client.config_get, "proto-max-bulk-len")
        except self._redis.ResponseError:
            return _DEFAULT_MAX_BULK
        for key, value in reply.items():
            if key in ("proto-max-bulk-len", b"proto-max-bulk-len"):
                try:
                    return int(value)
                except ValueError:
                    break
        return _DEFAULT_MAX_BULK

    def __repr__(self) -> str:
        return f"<RedisBackend {self.url} namespace={self._namespace!r}>"

    # ---- plumbing -------------------------------------------------------

    def _call(self, function, *args, wait_s: float = 0.0,
              retry_timeout: float | None = None, **kwargs):
        """Run a redis-py call, retrying lost connections with backoff
        until `_retry_timeout` seconds (or `retry_timeout`, if given) have
        passed since it started.

        `wait_s` is how long the call blocks on the server on purpose
        (XREAD BLOCK), added to the time each attempt waits for a reply.
        """
        redis = self._redis
        if retry_timeout is None:
            retry_timeout = self._retry_timeout
        deadline = time.monotonic() + retry_timeout
        failures = 0
        while True:
            left = deadline - time.monotonic()
            token = _reply_timeout.set(wait_s + min(
                self._socket_timeout, max(left, _MIN_REPLY_WAIT_S)))
            try:
                return function(*args, **kwargs)
            except redis.AuthenticationError as exc:
                raise BackendConnectionError(
                    f"Redis at {self.url} rejected the credentials ({exc}); "
                    f"check the user and password in the URL") from None
            except (redis.ConnectionError, redis.TimeoutError,
                    redis.ResponseError) as exc:
                busy = _server_busy(exc)
                if isinstance(exc, redis.ResponseError) and not busy:
                    raise
                if _certificate_failed(exc):
                    # Retrying cannot fix a certificate.
                    raise CertificateVerifyError(
                        f"Redis at {self.url}: the server's TLS certificate "
                        f"failed verification ({exc}); pass the CA that "
                        f"signed it as ssl_ca_certs=<path.pem> in the URL, "
                        f"or ssl_cert_reqs=none to skip the check (not "
                        f"for untrusted networks)") from exc
                if self._closed:
                    # A call that `close` cut off, as the other backends
                    # end theirs.
                    raise ShutDown(
                        f"the redis backend of {self.url} is closed; open a "
                        f"new Broker") from exc
                now = time.monotonic()
                if now >= deadline and busy:
                    raise BackendConnectionError(
                        f"Redis at {self.url} stayed busy running a script "
                        f"for {retry_timeout} s ({exc}); find the "
                        f"long script with SLOWLOG GET on the server, or "
                        f"raise {self._retry_option}") from exc
                if now >= deadline:
                    raise BackendConnectionError(
                        f"Redis at {self.url} unreachable for "
                        f"{retry_timeout} s ({exc}); check that the "
                        f"server runs, or raise {self._retry_option}"
                    ) from exc
                failures += 1
                # A pause that would end past the deadline is cut short,
                # so the last attempt starts at the deadline.
                pause = min(self._backoff.compute(failures), deadline - now)
                logger.warning(
                    "Redis at %s: %s: %s; retry %d in %.3f s", self.url,
                    type(exc).__name__, exc, failures, pause)
                time.sleep(pause)
            finally:
                _reply_timeout.reset(token)

    def _retry_library(self) -> None:
        """Try FUNCTION LOAD again for a backend that runs EVALSHA because
        a server out of memory rejected it. An error of this optional
        load is logged, and the call goes on with EVALSHA."""
        self._library_retry_at = time.monotonic() + _LIBRARY_RETRY_S
        try:
            self._load_library()
        except self._redis.ResponseError as exc:
            logger.warning(
                "Redis at %s: FUNCTION LOAD failed (%s); mqs runs its "
                "script with EVALSHA, and tries again in %g s", self.url,
                exc, _LIBRARY_RETRY_S)

    def _invoke(self, keys: list, args: Sequence[Any],
                allow_oom: bool) -> Any:
        """Run one operation of the script: FCALL of the library, or
        EVALSHA when the server has no library."""
        retry_at = self._library_retry_at
        if retry_at is not None and time.monotonic() >= retry_at:
            self._retry_library()
        for loads in itertools.count():
            if self._library is None:
                return self._script(keys=keys, args=args)
            name = self._library + "_oom" if allow_oom else self._library
            try:
                return self._client.fcall(name, len(keys), *keys, *args)
            except self._redis.ResponseError as exc:
                text = str(exc)
                if "'fcall' command" in text:
                    # An ACL that allows FUNCTION LOAD but denies FCALL:
                    # the NOPERM reply names the command, and a key that
                    # the ACL denies gives another text.
                    logger.info(
                        "Redis at %s denies FCALL (%s); mqs runs its "
                        "script with EVALSHA, which costs more per "
                        "operation", self.url, text)
                    self._library = None
                    return self._script(keys=keys, args=args)
                # A restart without persistence or a FUNCTION FLUSH
                # removed the library. It may be removed again between
                # the load and the call, so the load is tried a few times.
                if "Function not found" not in text \
                        or loads >= _LIBRARY_LOADS:
                    raise
            self._load_library()

    def _meta(self, topic: str) -> str:
        if "{" in topic or "}" in topic:
            raise ValueError(
                f"topic names on backend='redis' cannot contain braces, "
                f"got {topic!r}")
        return f"{{{self._namespace}:{topic}}}:meta"

    def _run(self, topic: str, *args: Any, mark_retries: bool = False
             ) -> list:
        """Run one operation of the script on `topic`; return its reply
        without the drop counts, which it logs.

        With `mark_retries`, the script gets one more argument: "0" on the
        first attempt and "1" on the retries after a lost connection.
        """
        if self._closed:
            # The client would reconnect: `close` does not stop it.
            raise ShutDown(f"the redis backend of {self.url} is closed; "
                           f"open a new Broker")
        script = self._invoke
        if mark_retries:
            attempts = itertools.count()

            def script(keys: list, args: Sequence[Any],
                       allow_oom: bool) -> Any:
                retried = "1" if next(attempts) else "0"
                return self._invoke(keys, [*args, retried], allow_oom)

        keys = [self._meta(topic)]
        try:
            try:
                reply = self._call(script, keys, args,
                                   args[0] in _MAY_EXCEED_MAXMEMORY)
            except self._redis.ResponseError as exc:
                # A server above its maxmemory runs the open of an
                # existing group and the declare of an existing topic:
                # only the function with the allow-oom flag gets to check
                # that they exist.
                if not (args[0] in _RETRIED_WITH_ALLOW_OOM
                        and self._library is not None
                        and self._out_of_memory(exc)):
                    raise
                reply = self._call(script, keys, args, True)
        except self._redis.ResponseError as exc:
            text = str(exc)
            if text.startswith("MQS_UNKNOWN"):
                raise UnknownTopic(_unknown_topic(topic), topic) from None
            if text.startswith("MQS_SHUTDOWN"):
                raise ShutDown(f"{text[13:]} on topic {topic!r}") from None
            if self._out_of_memory(exc):
                # The script stopped at its first write, so it changed
                # nothing (see the dispatch in _redis.lua).
                raise _out_of_memory_error(topic, self.url,
                                           str(args[0])) from None
            raise
        drops = reply.pop()
        for start in range(0, len(drops), 3):
            # The totals are the topic's on the server and count the
            # drops of all clients, so each power of ten is logged once,
            # by the client that passed it.
            name, before, after = drops[start:start + 3]
            if name == b"consumers_expired":
                logger.warning(
                    "redis broker %s: removed %d consumer(s) of topic %r "
                    "whose lease ended: their process died, or they made "
                    "no get for the lease (%d removed so far)", self.url,
                    after - before, topic, after)
                continue
            warn_drop_count(logger, topic, name.decode(), before, after)
        return reply

    def _out_of_memory(self, exc: BaseException) -> bool:
        """Return whether a redis-py error is the OOM reply of a server
        whose used memory is above its maxmemory."""
        oom = getattr(self._redis.exceptions, "OutOfMemoryError", None)
        return (oom is not None and isinstance(exc, oom)) \
            or "used memory > 'maxmemory'" in str(exc)

    def _wait_wake(self, topic: str, wake_id: bytes, seconds: float) -> None:
        """Block until the topic changes after `wake_id`, or `seconds`."""
        seconds = min(seconds, self._block_cap)
        if seconds <= 0:
            return
        wake = self._meta(topic)[:-4] + "wake"
        block_ms = max(1, int(seconds * 1000))
        try:
            self._call(self._client.xread, {wake: wake_id}, count=1,
                       block=block_ms, wait_s=block_ms / 1000,
                       retry_timeout=0.0)
        except CertificateVerifyError:
            raise
        except BackendConnectionError as exc:
            # The wait only paces the caller's loop, whose next script
            # call retries a lost connection for retry_timeout. Retrying
            # the wait itself would fail a get when connections drop
            # more often than the wait lasts (up to 1 s).
            logger.warning("Redis at %s: the wait for a change of topic %r "
                           "ended early (%s); the next call retries",
                           self.url, topic, exc.__cause__ or exc)

    # ---- topics ---------------------------------------------------------

    def declare_topic(self, config: TopicConfig, replace: bool = False
                      ) -> TopicConfig:
        raw = _config_json(config)
        reply = self._run(config.name, "declare", raw)
        if reply[0] == b"NEW":
            return config
        stored = _config_from_json(reply[1])
        if not _redeclare_changes(stored, config, replace):
            return config
        self._run(config.name, "replace", raw)
        return config

    def topic_config(self, topic: str) -> TopicConfig:
        raw = self._call(self._client.hget, self._meta(topic), "cfg")
        if raw is None:
            raise UnknownTopic(_unknown_topic(topic), topic)
        return _config_from_json(raw)

    def has_topic(self, topic: str) -> bool:
        return bool(self._call(self._client.hexists, self._meta(topic),
                               "cfg"))

    def topics(self) -> list[str]:
        # NOTE: like delete_topic, SCAN walks the whole database, so this
        # slows down with the number of keys on the server.
        pattern = "{" + _glob_escape(self._namespace) + ":*}:meta"
        keys = self._call(lambda: list(self._client.scan_iter(
            match=pattern, count=1000)))
        prefix = "{" + self._namespace + ":"
        names = []
        for key in keys:
            text = key.decode() if isinstance(key, bytes) else key
            name = text[len(prefix):-len("}:meta")]
            if self.has_topic(name):
                names.append(name)
        return sorted(names)

    def delete_topic(self, topic: str) -> None:
        # NOTE: SCAN walks the whole database to find the topic's keys, so
        # this (and Broker.request, which deletes its reply topic) slows
        # down with the number of keys on the server.
        meta = self._meta(topic)
        # Its consumers end with it (ShutDown), as on the other backends.
        for consumer, opened in list(self._opened.items()):
            if opened[0] == topic:
                self._opened.pop(consumer, None)
                self._last_fetch.pop(consumer, None)
        if not self.has_topic(topic):
            raise UnknownTopic(_unknown_topic(topic), topic)
        prefix = meta[:-4]
        pattern = _glob_escape(prefix) + "*"
        keys = list(self._call(lambda: list(self._client.scan_iter(
            match=pattern, count=1000))))
        wake = prefix.encode() + b"wake"
        others = [key for key in keys if key != wake]
        for start in range(0, len(others), 500):
            self._call(self._client.unlink, *others[start:start + 500])
        # Wake blocked waiters, which then find the topic gone.
        try:
            self._call(self._client.xadd, wake, {"n": 1}, maxlen=1)
        except self._redis.ResponseError as exc:
            if not self._out_of_memory(exc):
                raise
            # A server out of memory rejects the XADD. The waiters then
            # find the topic gone when their wait (at most 1 s) ends.
        self._call(self._client.unlink, wake)

    # ---- producing ------------------------------------------------------

    def _encode_body(self, body: Any) -> tuple[bytes, bytes]:
        if isinstance(body, (bytes, bytearray, memoryview)):
            return bytes(body), _BYTES
        if isinstance(body, str):
            try:
                return body.encode(), _STR
            except UnicodeEncodeError as exc:
                if not self._pickle:
                    raise _build_surrogate_error("body", body, exc) from None
        if self._pickle:
            return pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL), \
                _PICKLE
        raise TypeError(
            f"body must be bytes, bytearray, memoryview or str on "
            f"backend='redis', got {type(body).__name__}; {PICKLE_HINT} to "
            f"send other objects (only if every client of the Redis server "
            f"is trusted)")

    def _encode_headers(self, headers: dict | None) -> tuple[bytes, bytes]:
        if not headers:
            return b"", b""
        if self._pickle:
            return b"", pickle.dumps(headers, protocol=4)
        _check_json_exact(headers, "headers")
        return json.dumps(headers).encode(), b""

    def _publish_args(self, envelopes: Sequence[Envelope],
                      encoded: Sequence[tuple[bytes, bytes]]) -> list:
        """Return the script's arguments: runs of consecutive messages
        that share every setting, each with its settings once, then its
        body lengths and its bodies joined into one argument each.
        `encoded` holds each envelope's body and encoding."""
        args: list = [0]
        bodies: list[bytes] = []
        previous = None
        for envelope, (body, encoding) in zip(envelopes, encoded):
            # The types too: 1 == True, but they are different keys.
            settings = (envelope[1:], encoding, type(envelope.key),
                        type(envelope.dedup_id))
            if settings != previous:
                if bodies:
                    _end_run(args, bodies)
                    bodies = []
                args[0] += 1
                args += [0, *self._settings_args(envelope, encoding)]
                previous = settings
            bodies.append(body)
        if bodies:
            _end_run(args, bodies)
        return args

    def _settings_args(self, envelope: Envelope, encoding: bytes) -> list:
        headers_json, headers_pickle = self._encode_headers(envelope.headers)
        dedup = b"" if envelope.dedup_id is None else _token(
            envelope.dedup_id, "dedup_id", self._pickle)
        key = b"" if envelope.key is None else _token(
            envelope.key, "key", self._pickle)
        ttl = "" if envelope.ttl is None else envelope.ttl * 1000
        # A bytes body stores no "e" field: bytes is what a missing one
        # means, and an entry of b, p and t alone decodes fastest.
        stored_encoding = b"" if encoding == _BYTES else encoding
        return [dedup, key, envelope.priority, envelope.delay * 1000, ttl,
                stored_encoding, headers_json, headers_pickle,
                envelope.reply_to or "", envelope.correlation_id or ""]

    def publish(self, topic: str, envelopes: Sequence[Envelope],
                timeout: float | None) -> list[str]:
        deadline = None if timeout is None else time.monotonic() + timeout
        ids: list[str] = []
        # Every chunk is encoded before the first is sent. A body that
        # fails to pickle then fails the call with nothing published, as
        # on the other backends, so a retry of the batch adds no
        # duplicates.
        encoded = [self._encode_body(envelope.body)
                   for envelope in envelopes]
        sizes = [len(body) for body, _ in encoded]

        def chunk_from(start: int, end: int | None = None
                       ) -> tuple[int, list]:
            if end is None:
                end = _chunk_end(sizes, start)
            return end, self._publish_args(envelopes[start:end],
                                           encoded[start:end])

        chunks = {}
        start = 0
        while start < len(envelopes):
            chunks[start] = chunk_from(start)
            start = chunks[start][0]
        waited = False
        while True:
            start = len(ids)
            chunk = chunks.pop(start, None)
            if chunk is None:
                # A full topic took part of a chunk before the wait.
                chunk = chunk_from(start)
            end, (runs, *args) = chunk
            rejected = _longest_part(args) > self._max_bulk
            if not rejected:
                try:
                    reply = self._run(topic, "publish", runs, self._maxlen,
                                      *args)
                except UnknownTopic:
                    if not ids and not waited:
                        raise
                    raise _deleted_while_full(topic, len(ids),
                                              len(envelopes)) from None
                except BackendOutOfMemory as exc:
                    # Raised at once, whatever when_full: waiting frees no
                    # memory unless consumers or an operator act.
                    exc.accepted = len(ids)
                    raise
                except self._redis.ResponseError as exc:
                    # The limit was lowered since the connect: Redis
                    # rejected an argument while reading the command, before
                    # the script ran, so nothing of the chunk is stored.
                    # (Redis may also close the connection instead, which
                    # the retries then report.)
                    if "invalid bulk length" not in str(exc):
                        raise
                    rejected = True
            if rejected:
                # Smaller chunks may fit, but one message cannot.
                if end - start == 1:
                    raise _too_large_for_server(
                        topic, self.url, args, len(ids), len(envelopes))
                middle = start + (end - start) // 2
                chunks[start] = chunk_from(start, middle)
                chunks[middle] = chunk_from(middle, end)
                continue
            status, _, new_ids, wake_id = reply
            ids += new_ids.decode().split()
            if status == b"OK" and len(ids) == len(envelopes):
                return ids
            if status == b"OK":
                continue
            if status == b"FULL":
                maxsize = self.topic_config(topic).maxsize
                raise Full(
                    f"topic {topic!r} is full (maxsize {maxsize}); consume "
                    f"faster, raise maxsize or use when_full='block'",
                    len(ids))
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise _stayed_full(topic, self.topic_config(topic).maxsize,
                                   len(ids), len(envelopes))
            self._wait_wake(topic, wake_id,
                            self._block_cap if left is None else left)
            waited = True

    # ---- consuming ------------------------------------------------------

    def open_consumer(self, topic: str, group: str, *, start: str,
                      prefetch: int, max_attempts: int | None,
                      ack_timeout: float | None = None) -> str:
        consumer = f"c{uuid.uuid4().hex[:16]}"
        self._run(topic, "open", group, consumer, start, prefetch,
                  "" if max_attempts is None else max_attempts,
                  _lease_s(ack_timeout) * 1000)
        self._opened[consumer] = (topic, prefetch, max_attempts, ack_timeout)
        self._last_fetch[consumer] = time.monotonic()
        return consumer

    def _reopen(self, topic: str, group: str, consumer: str) -> bool:
        """Register again a consumer of this backend whose registration
        the server lost. Returns False for one that was closed or whose
        topic this backend deleted.

        The server removes a consumer whose lease ended (it made no
        fetch for that long). It loses the registration with its data
        (a restart without persistence), or with the topic when another
        process deleted it and a publish declared it again. The group
        comes back at "earliest": everything in the topic arrived after
        the loss."""
        opened = self._opened.get(consumer)
        if opened is None:
            return False
        _, prefetch, max_attempts, ack_timeout = opened
        lease = _lease_s(ack_timeout)
        idle = time.monotonic() - self._last_fetch.get(consumer, 0.0)
        if idle > lease:
            logger.info("redis broker %s: consumer %s of %r/%r made no get "
                        "for %.1f s, longer than its lease of %g s, so the "
                        "server removed it; registering it again", self.url,
                        consumer, topic, group, idle, lease)
        else:
            logger.warning("redis broker %s: consumer %s of %r/%r is unknown "
                           "to the server (lost with its data, or with the "
                           "topic); registering it again", self.url,
                           consumer, topic, group)
        self._run(topic, "open", group, consumer, "earliest", prefetch,
                  "" if max_attempts is None else max_attempts, lease * 1000)
        return True

    def close_consumer(self, topic: str, group: str, consumer: str) -> int:
        with self._async_lock:
            self._opened.pop(consumer, None)
            self._last_fetch.pop(consumer, None)
            stashed = self._stashed.pop(consumer, [])
        returned = self._put_back(topic, group, stashed) if stashed else 0
        try:
            return returned + int(self._run(topic, "close", group,
                                            consumer)[1])
        except UnknownTopic:
            return returned

    def _put_back(self, topic: str, group: str, found: list) -> int:
        """Give back to `group`, unseen and with the attempt refunded,
        raw deliveries that a fetch took under auto_ack for a get_async
        that was cancelled; return how many went back.

        The fetch finished them on the server, so they go back as copies
        of their fields at the head of their lanes. Those that cannot go
        back (the topic or group is gone, or the server stays
        unreachable) are counted in `lost_auto_acked` and logged.
        """
        returned = 0
        error: Exception | None = None
        try:
            for start in range(0, len(found), _MAX_BATCH):
                chunk = found[start:start + _MAX_BATCH]
                args: list = []
                for message_id, _, attempts, flat in chunk:
                    args += [message_id, attempts, len(flat), *flat]
                done = int(self._run(topic, "put_back", group, len(chunk),
                                     *args)[1])
                if done < 0:
                    error = UnknownTopic(
                        f"group {group!r} of topic {topic!r} no longer "
                        f"exists", topic)
                    break
                # An entry that is back in the group already counts as
                # given back.
                returned += len(chunk)
        except (UnknownTopic, ShutDown, BackendConnectionError) as exc:
            error = exc
        lost = found[returned:]
        if lost:
            with self._async_lock:
                self.lost_auto_acked += len(lost)
            logger.warning(
                "redis broker %s: %d auto-acked message(s) of %r/%r that a "
                "cancelled get_async took could not be given back (%s); "
                "they are lost: %s", self.url, len(lost), topic, group,
                error, ", ".join(_raw_id(raw) for raw in lost))
        return returned

    def _count_lost_give_back(self, topic: str, group: str,
                              found: list) -> None:
        """Count and log the auto-acked messages of a cancelled get_async
        that the broker closed before they could be given back."""
        with self._async_lock:
            self.lost_auto_acked += len(found)
        logger.warning(
            "redis broker %s: %d auto-acked message(s) of %r/%r that a "
            "cancelled get_async took are lost, because the broker closed "
            "before they could be given back: %s", self.url, len(found),
            topic, group, ", ".join(_raw_id(raw) for raw in found))

    def _delivery(self, topic: str, group: str, raw: list) -> Delivery:
        message_id, ticket, attempts, flat = raw
        if len(flat) == 6 and flat[4] == b"t" and flat[0] == b"b":
            # The common entry: a bytes body and no key, headers or reply
            # fields. The script writes b, p, t first and in this order.
            message_id = message_id.decode()
            return Delivery(
                message_id, (message_id, ticket), topic, group, flat[1],
                int(flat[3]), attempts, None, {}, float(flat[5]) / 1000,
                None, None)
        fields = dict(zip(flat[::2], flat[1::2]))
        message_id = message_id.decode()
        key = fields.get(b"k")
        return Delivery(
            id=message_id, tag=(message_id, ticket), topic=topic,
            group=group, body=self._decode_body(fields, message_id),
            priority=int(fields[b"p"]), attempts=attempts,
            key=None if key is None else _untoken(key, self._pickle),
            headers=self._decode_headers(fields),
            timestamp=float(fields[b"t"]) / 1000,
            reply_to=_text(fields.get(b"r")),
            correlation_id=_text(fields.get(b"c")))

    def _decode_body(self, fields: dict, message_id: str) -> Any:
        body = fields.get(b"b", b"")
        encoding = fields.get(b"e", _BYTES)
        if encoding == _STR:
            return body.decode()
        if encoding == _PICKLE:
            if self._pickle:
                return pickle.loads(body)
            self._raw_pickled += 1
            if _log_point(self._raw_pickled - 1, self._raw_pickled):
                logger.warning(PICKLED_BODY_WARNING, message_id,
                               self._raw_pickled)
        return body

    def _decode_headers(self, fields: dict) -> dict[str, Any]:
        if b"h" in fields:
            return json.loads(fields[b"h"])
        if b"hp" in fields and self._pickle:
            return pickle.loads(fields[b"hp"])
        return {}

    def _fetch_once(self, topic, group, consumer, max_items, ack_timeout,
                    auto_ack):
        """Fetch up to one chunk; return its entries undecoded."""
        # A retry of the call after a lost connection sends the same call
        # id, so the script puts back what the first attempt took.
        call_id = f"{self._call_prefix}{next(self._call_numbers)}"
        args = (topic, "fetch", group, consumer, min(max_items, _MAX_BATCH),
                ack_timeout * 1000, 1 if auto_ack else 0,
                self.sample_every or 0, call_id,
                _lease_s(ack_timeout) * 1000)
        try:
            reply = self._run(*args)
        except ShutDown:
            # The fetch script raises it only for a consumer it does not
            # know.
            if not self._reopen(topic, group, consumer):
                raise
            reply = self._run(*args)
        self._last_fetch[consumer] = time.monotonic()
        _, wait_ms, found, wake_id = reply
        return found, int(wait_ms), wake_id

    def _fetch_ready(self, topic, group, consumer, max_items, ack_timeout,
                     auto_ack):
        """Take up to `max_items` ready entries, in chunks; return them
        undecoded with the first chunk's wait time and wake id."""
        found, wait_ms, wake_id = self._fetch_once(
            topic, group, consumer, max_items, ack_timeout, auto_ack)
        # A full chunk: take more of what is ready, in further calls.
        while len(found) < max_items and len(found) % _MAX_BATCH == 0 \
                and found:
            more, _, _ = self._fetch_once(
                topic, group, consumer, max_items - len(found),
                ack_timeout, auto_ack)
            if not more:
                break
            found += more
        return found, wait_ms, wake_id

    def _decode_found(self, topic: str, group: str, found: list,
                      auto_ack: bool) -> list[Delivery]:
        # Decoded after every chunk is fetched, so that a batch keeps its
        # good messages when one body fails to unpickle.
        return decode_each(topic, found,
                           lambda raw: self._delivery(topic, group, raw),
                           _raw_id, auto_ack)

    def _wait_left(self, deadline: float | None, wait_ms: int,
                   ack_timeout: float) -> float | None:
        """Return the seconds to wait for a change, or None when the
        deadline passed.

        A wait lasts at most half the consumer's lease, so that the next
        fetch renews the lease before it ends.
        """
        left = self._block_cap
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
        if wait_ms >= 0:
            left = min(left, wait_ms / 1000)
        left = min(left, _lease_s(ack_timeout) / 2)
        return max(left, 0.001)

    def fetch(self, topic: str, group: str, consumer: str, max_items: int,
              *, ack_timeout: float, auto_ack: bool,
              timeout: float | None) -> list[Delivery]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            found = self._take_stashed(consumer, max_items)
            if not found:
                found, wait_ms, wake_id = self._fetch_ready(
                    topic, group, consumer, max_items, ack_timeout, auto_ack)
            if found:
                return self._decode_found(topic, group, found, auto_ack)
            left = self._wait_left(deadline, wait_ms, ack_timeout)
            if left is None:
                return []
            self._wait_wake(topic, wake_id, left)

    async def fetch_async(self, topic: str, group: str, consumer: str,
                          max_items: int, *, ack_timeout: float,
                          auto_ack: bool, timeout: float | None
                          ) -> list[Delivery]:
        """Like `fetch`; the Redis calls run in the backend's threads.

        The script calls that take messages run in an executor. The
        waits for a change run in a `Wakeups` thread that blocks on the
        topic's wake stream. So the event loop neither polls nor waits
        on the network, also while a lost connection is retried.

        A cancelled await cannot stop a script call already sent. When
        one took messages, they go back to the group at the head of
        their lanes with the attempt refunded (`release`). Under
        auto_ack they come back from this consumer's next fetch, or go
        back to the group in the same way when the consumer closes
        first, also when the event loop closed while the call ran.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        while True:
            found = self._take_stashed(consumer, max_items)
            if found:
                return self._decode_found(topic, group, found, auto_ack)
            fetching = self._executor().submit(
                self._fetch_ready, topic, group, consumer, max_items,
                ack_timeout, auto_ack)
            try:
                found, wait_ms, wake_id = await asyncio.shield(
                    asyncio.wrap_future(fetching, loop=loop))
            except asyncio.CancelledError:
                # On the executor's future, not the loop's: its callback
                # runs also when the loop closed before the fetch ended.
                fetching.add_done_callback(
                    lambda done: self._give_back(topic, group, consumer,
                                                 auto_ack, done))
                raise
            if found:
                return self._decode_found(topic, group, found, auto_ack)
            left = self._wait_left(deadline, wait_ms, ack_timeout)
            if left is None:
                return []
            await self._wakeups.wait(self._wake_word(topic), wake_id, left)

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._async_lock:
            if self._closed:
                raise ShutDown(f"the redis backend of {self.url} is "
                               f"closed; open a new Broker")
            if self._async_pool is None:
                self._async_pool = concurrent.futures.ThreadPoolExecutor(
                    _ASYNC_WORKERS, thread_name_prefix="mqs-redis")
            return self._async_pool

    def _wake_word(self, topic: str) -> _WakeStream:
        with self._async_lock:
            word = self._wake_words.get(topic)
            if word is None:
                word = _WakeStream(self, self._meta(topic)[:-4] + "wake")
                self._wake_words[topic] = word
            return word

    def _take_stashed(self, consumer: str, max_items: int) -> list:
        if not self._stashed:
            return []
        with self._async_lock:
            stashed = self._stashed.get(consumer)
            if not stashed:
                return []
            returned = stashed[:max_items]
            del stashed[:max_items]
            if not stashed:
                del self._stashed[consumer]
            return returned

    def _give_back(self, topic: str, group: str, consumer: str,
                   auto_ack: bool,
                   done: concurrent.futures.Future) -> None:
        """Return what the fetch of a cancelled `fetch_async` took.

        Runs in the executor thread that ran the fetch, or in the event
        loop's thread when the fetch had ended before the cancel, so it
        leaves the Redis calls to the executor.
        """
        if done.cancelled() or done.exception() is not None:
            return
        found = done.result()[0]
        if not found:
            return
        if auto_ack:
            with self._async_lock:
                if consumer in self._opened:
                    self._stashed.setdefault(consumer, []).extend(found)
                    return
            # The consumer closed while the fetch ran.
            try:
                putting = self._executor().submit(self._put_back, topic,
                                                  group, found)
            except (ShutDown, RuntimeError):
                self._count_lost_give_back(topic, group, found)
                return
            def count_if_cancelled(call: concurrent.futures.Future) -> None:
                # `close` cancels the call if it is still queued then.
                if call.cancelled():
                    self._count_lost_give_back(topic, group, found)

            putting.add_done_callback(count_if_cancelled)
            return
        tags = [(raw[0].decode(), raw[1]) for raw in found]
        try:
            self._executor().submit(self._release_taken, topic, group, tags)
        except (ShutDown, RuntimeError):
            # Closed meanwhile: the deliveries come back after their ack
            # deadline, as those of a consumer process that died.
            logger.info("redis broker %s: %d messages taken by a cancelled "
                        "get_async on %r/%r come back after their ack "
                        "deadline, because the broker closed", self.url,
                        len(tags), topic, group)

    def _release_taken(self, topic: str, group: str, tags: list) -> None:
        try:
            self.release(topic, group, tags)
        except Exception:
            logger.warning("redis broker %s: failed to put back %d messages "
                           "taken by a cancelled get_async on %r/%r; they "
                           "come back after their ack deadline", self.url,
                           len(tags), topic, group, exc_info=True)

    async def run_blocking(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor(), function, *args)

    def ack(self, topic: str, group: str, tag: Any) -> bool:
        message_id, ticket = tag
        return self._run(topic, "ack", group, message_id, ticket,
                         mark_retries=True)[1] == 1

    def ack_many(self, topic: str, group: str, tags: Sequence[Any]
                 ) -> list[bool]:
        done: list[bool] = []
        for start in range(0, len(tags), _MAX_BATCH):
            chunk = tags[start:start + _MAX_BATCH]
            # One argument, "id:ticket id:ticket ...": redis-py encodes
            # each argument on its own, which costs more than the join.
            joined = " ".join([f"{message_id}:{ticket}"
                               for message_id, ticket in chunk])
            reply = self._run(topic, "ack_many", group, len(chunk), joined,
                              mark_retries=True)
            done += [flag == 1 for flag in reply[1]]
        return done

    def nack(self, topic: str, group: str, tag: Any, *, requeue: bool,
             delay: float | None, error: str | None) -> bool:
        message_id, ticket = tag
        # "surrogatepass" keeps error texts with lone surrogates (from
        # os.fsdecode, for example), which strict UTF-8 rejects, and
        # `_dead_letter` decodes them back unchanged.
        reply = self._run(
            topic, "nack", group, message_id, ticket, 1 if requeue else 0,
            "" if delay is None else delay * 1000,
            "" if error is None
            else b"=" + error.encode("utf-8", "surrogatepass"),
            self._rng.random(), mark_retries=True)
        return reply[1] == 1

    def extend(self, topic: str, group: str, tag: Any, seconds: float
               ) -> bool:
        message_id, ticket = tag
        return self._run(topic, "extend", group, message_id, ticket,
                         seconds * 1000)[1] == 1

    def release(self, topic: str, group: str, tags: Sequence[Any]) -> int:
        args: list = []
        for message_id, ticket in tags:
            args += [message_id, ticket]
        try:
            return int(self._run(topic, "release", group, len(tags),
                                 *args)[1])
        except UnknownTopic:
            return 0

    def in_flight(self, topic: str, group: str, consumer: str) -> int:
        try:
            return int(self._run(topic, "in_flight", group, consumer)[1])
        except UnknownTopic:
            return 0

    # ---- dead letters ---------------------------------------------------

    def dlq_list(self, topic: str, limit: int | None = None
                 ) -> list[DeadLetter]:
        # The script treats a limit of 0 as no limit, so a limit of 0 requests
        # one entry, which also raises UnknownTopic for a missing topic.
        if limit == 0:
            self._run(topic, "dlq_list", 1)
            return []
        entries = self._run(topic, "dlq_list", limit or 0)[1]
        return [self._dead_letter(topic, flat) for _, flat in entries]

    def _dead_letter(self, topic: str, flat: list) -> DeadLetter:
        fields = dict(zip(flat[::2], flat[1::2]))
        message_id = fields[b"id"].decode()
        group = fields[b"g"].decode()
        reason = fields[b"why"].decode()
        attempts = int(fields[b"n"])
        error = fields[b"err"][1:].decode("utf-8", "surrogatepass") \
            if fields[b"err"] else None
        key, headers, failures = self._letter_key_and_headers(fields)
        headers["mqs.dead_letter_reason"] = reason
        headers["mqs.attempts"] = attempts
        headers["mqs.last_error"] = error
        headers["mqs.group"] = group
        letter = DeadLetter(
            id=message_id, topic=topic, group=group, body=None,
            priority=int(fields.get(b"p", 0)), key=key, headers=headers,
            timestamp=float(fields.get(b"t", 0)) / 1000,
            attempts=attempts, reason=reason, error=error)
        try:
            body = self._decode_body(fields, message_id)
        except Exception as exc:  # whatever unpickling raised
            letter = undecodable_letter(letter, fields.get(b"b", b""), exc)
        else:
            letter = dataclasses.replace(letter, body=body)
        for part, raw, exc in failures:
            letter = undecodable_part(letter, part, raw, exc)
        return letter

    def _letter_key_and_headers(self, fields: dict) -> tuple[
            Any, dict[str, Any], list[tuple[str, bytes, Exception]]]:
        """Decode the key and headers of a dead letter's `fields`.

        Return the key, the headers and the parts that failed as (part,
        stored bytes, exception). A part that fails (a class that does
        not import here) is None or empty, so that the letter is still
        listed, and can be redriven or purged, with the failure on it.
        """
        failures = []
        key = None
        raw_key = fields.get(b"k")
        if raw_key is not None:
            try:
                key = _untoken(raw_key, self._pickle)
            except Exception as exc:  # whatever unpickling raised
                failures.append(("key", raw_key[2:], exc))
        try:
            headers = dict(self._decode_headers(fields))
        except Exception as exc:  # whatever unpickling raised
            headers = {}
            raw_headers = fields.get(b"hp") or fields.get(b"h", b"")
            failures.append(("headers", raw_headers, exc))
        return key, headers, failures

    def dlq_redrive(self, topic: str, ids: Sequence[str] | None = None
                    ) -> int:
        if ids is not None and not ids:
            return 0
        return int(self._run(topic, "dlq_redrive", *(ids or ()))[1])

    def dlq_purge(self, topic: str) -> int:
        return int(self._run(topic, "dlq_purge")[1])

    # ---- state ----------------------------------------------------------

    def stats(self, topic: str) -> dict[str, int]:
        flat = self._run(topic, "stats")[1]
        result = dict.fromkeys(COUNTER_KEYS + GAUGE_KEYS
                               + _REDIS_COUNTER_KEYS, 0)
        for name, value in zip(flat[::2], flat[1::2]):
            result[name.decode()] = int(value)
        return result

    def group_stats(self, topic: str) -> list[GroupStats]:
        found = []
        for raw in self._run(topic, "group_stats")[1]:
            (name, consumers, ready, delayed, in_flight, wait_ms, counters,
             histograms) = raw
            counts = {key.decode(): int(value)
                      for key, value in zip(counters[::2], counters[1::2])}
            hist = {key.decode(): int(value)
                    for key, value in zip(histograms[::2], histograms[1::2])}
            found.append(GroupStats(
                topic=topic, group=name.decode(), consumers=consumers,
                lag_messages=ready,
                lag_seconds=0.0 if wait_ms == -1 else float(wait_ms) / 1000,
                delayed=delayed, in_flight=in_flight,
                delivered=counts.get("delivered", 0),
                acked=counts.get("acked", 0),
                nacked=counts.get("nacked", 0),
                redelivered=counts.get("redelivered", 0),
                dead_lettered=counts.get("dead_lettered", 0),
                errors=counts.get("errors", 0),
                sample_every=self.sample_every,
                enqueue_to_deliver=self._latency(hist, "e"),
                deliver_to_ack=self._latency(hist, "a")))
        return found

    def _latency(self, hist: dict[str, int], name: str
                 ) -> metrics.LatencySummary | None:
        """Return histogram `name` ("e" or "a") of a group_stats reply."""
        count = hist.get(f"{name}:n", 0)
        if self.sample_every is None and not count:
            return None
        buckets = sorted(
            (int(key[len(name) + 1:]), value) for key, value in hist.items()
            if key.startswith(name + ":") and key[len(name) + 1:].isdigit())
        return metrics.summarize_buckets(
            buckets, count, hist.get(f"{name}:sum", 0),
            hist.get(f"{name}:max", 0), self.sample_every or 0)

    def wait_changed(self, timeout: float) -> None:
        # The callers poll a topic's state; no topic is named here, so
        # this sleeps a short slice instead of waiting for a wake.
        time.sleep(max(0.0, min(timeout, 0.01)))

    def close(self) -> None:
        # Calls still running in other threads fail instead of retrying.
        with self._async_lock:
            self._closed = True
            pool, self._async_pool = self._async_pool, None
        # A wakeup thread may be inside an XREAD BLOCK of up to _block_cap.
        self._wakeups.close(timeout=self._block_cap + 1.0)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


# Every open backend, so a forked child can drop the parent's threads.
_backends: weakref.WeakSet[RedisBackend] = weakref.WeakSet()


def _after_fork() -> None:
    # The executor's threads did not survive the fork; the stashed
    # deliveries belong to the parent's consumers. (`Wakeups` resets its
    # own threads.)
    for backend in list(_backends):
        backend._async_lock = threading.Lock()
        backend._async_pool = None
        backend._stashed = {}


os.register_at_fork(after_in_child=_after_fork)


class _WakeStream:
    """A topic's wake stream as a wait word of `Wakeups`: its epoch is the
    id of the stream's one entry, which every change replaces."""

    def __init__(self, backend: RedisBackend, key: str) -> None:
        self._backend = backend
        self._key = key

    def wait_prepare(self) -> bytes:
        backend = self._backend
        last = backend._call(backend._client.xrevrange, self._key, "+", "-",
                             count=1)
        return last[0][0] if last else b"0-0"

    def wait(self, epoch: bytes, timeout: float) -> None:
        backend = self._backend
        block_ms = max(1, int(min(timeout, backend._block_cap) * 1000))
        backend._call(backend._client.xread, {self._key: epoch}, count=1,
                      block=block_ms, wait_s=block_ms / 1000)

    def cancel_wait(self) -> None:
        pass


# Descriptions of the script operations that a server out of memory
# rejects, for the message of BackendOutOfMemory.
_OPERATION_WORDS = {
    "publish": "a publish",
    "declare": "declaring it",
    "replace": "declaring it",
    "open": "opening the first consumer of a group",
    "dlq_redrive": "redriving dead letters",
}


def _out_of_memory_error(topic: str, url: str, operation: str
                         ) -> BackendOutOfMemory:
    """Return the error of a script call on `topic` that the server at
    `url` rejected because its used memory is above maxmemory."""
    doing = _OPERATION_WORDS.get(operation, f"the {operation} call")
    return BackendOutOfMemory(
        f"the Redis server at {url} is out of memory (used memory above "
        f"its maxmemory, and nothing it may evict), so {doing} on topic "
        f"{topic!r} was rejected and stored nothing; raise maxmemory on "
        f"the server, shorten the topic's retention, consume and ack its "
        f"backlog, or purge its dead letters with "
        f"broker.dlq_purge({topic!r}), then try again", topic=topic)


def _lease_s(ack_timeout: float | None) -> float:
    """Return the lease in seconds of a consumer with `ack_timeout`
    (None: the default of `Broker.consume`, 30 s)."""
    if ack_timeout is None:
        ack_timeout = 30.0
    return max(_LEASE_MIN_S, _LEASE_FACTOR * ack_timeout)


def _unknown_topic(topic: str) -> str:
    """Return the message of `UnknownTopic`, as the memory backend words it."""
    return (f"unknown topic {topic!r}; declare it first with "
            f"broker.declare_topic({topic!r})")


def _end_run(args: list, bodies: list[bytes]) -> None:
    """Finish the run of publish arguments that `bodies` belong to."""
    # The run's message count sits right after the previous run: its
    # settings are the last RUN_SETTINGS arguments.
    args[-1 - _RUN_SETTINGS] = len(bodies)
    args.append(" ".join([str(len(body)) for body in bodies]))
    args.append(b"".join(bodies))


def _chunk_end(sizes: Sequence[int], start: int) -> int:
    """Return the end of the publish chunk that starts at `start`: at most
    _MAX_BATCH messages whose bodies total at most _MAX_BATCH_BYTES, but
    at least one message."""
    end = start + 1
    total = sizes[start]
    limit = min(len(sizes), start + _MAX_BATCH)
    while end < limit and total + sizes[end] <= _MAX_BATCH_BYTES:
        total += sizes[end]
        end += 1
    return end


def _longest_part(args: list) -> int:
    """Return the size in bytes of the longest bytes or str argument."""
    return max((len(arg if isinstance(arg, bytes) else arg.encode())
                for arg in args if isinstance(arg, (bytes, str))), default=0)


def _too_large_for_server(topic: str, url: str, args: list, published: int,
                          total: int) -> MessageTooLarge:
    """Return the error of a message whose publish arguments (body or
    headers) exceed the server's proto-max-bulk-len."""
    largest = _longest_part(args)
    return MessageTooLarge(
        f"a message to topic {topic!r} has a part (body or headers) of "
        f"{largest} bytes, more than the Redis server at {url} accepts in "
        f"one argument (its proto-max-bulk-len, 512 MiB by default); send "
        f"a smaller body, or raise proto-max-bulk-len on the server. "
        f"{published} of {total} messages were published before it")


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode()


def _glob_escape(text: str) -> str:
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


def _raw_id(raw: list) -> str:
    """Return the message id of a raw entry that the fetch script
    returned."""
    return raw[0].decode()
