"""Locate and open an existing broker for the `mqs stat` and `mqs dlq`
subcommands.

A broker is named on the command line either with a location option
(``--path LOGDIR``, ``--shm NAME``, ``--url URL``) or as one positional
BROKER: an shm broker name or a log broker directory, distinguished by
which of them exists (`locate_broker`). Opening never creates a broker.

`broker_stats` and `broker_table` build the output of `mqs stat` for a
broker: the gauges and counters of every topic and of its groups.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from typing import Any

from rich.markup import escape
from rich.table import Table

from mqs._dirkind import LOG_BROKER, directory_kind
from mqs.cli_ops import CommandError, _format_value, _non_negative_float
from mqs.errors import BackendConnectionError, BackendUnavailable, LogLocked

# Location option -> (backend name for mqs.Broker, its keyword option).
BACKEND_OPTIONS = {
    "path": ("log", "path"),
    "shm": ("shm", "name"),
    "url": ("redis", "url"),
}


# Seconds that `mqs stat`, `mqs dlq` and the start of `mqs bridge` retry
# an unreachable Redis server. The library default (30 s) suits brokers
# that run for long, not a command that someone waits for.
RETRY_TIMEOUT_S = 3.0


def add_retry_timeout_option(parser: argparse.ArgumentParser,
                             help_text: str,
                             default: float | None = RETRY_TIMEOUT_S
                             ) -> None:
    """Add ``--retry-timeout SECONDS`` with the default `default`."""
    parser.add_argument("--retry-timeout", type=_non_negative_float,
                        default=default, metavar="SECONDS",
                        help=help_text)


def name_retry_option(message: str,
                      options: tuple[str, ...] = ("connect_retry_timeout",
                                                  "retry_timeout")) -> str:
    """Replace the Python option in `options` that a redis connection
    error names as the fix with ``--retry-timeout``."""
    for option in options:
        message = message.replace(f"raise {option}",
                                  "raise --retry-timeout")
    return message


def shm_broker_exists(name: str) -> bool:
    """Return whether /dev/shm contains the shm broker `name`."""
    from mqs.broker._shm import _journal_path

    if not name or "/" in name or "\0" in name:
        return False
    return os.path.exists(_journal_path(name))


def is_log_broker_dir(path: str) -> bool:
    return os.path.isdir(path) and directory_kind(path) == LOG_BROKER


def locate_broker(target: str) -> str | None:
    """Return the location option ("shm" or "path") of the broker that
    `target` names, or None when it names neither kind.

    Raises `CommandError` when `target` is both an shm broker name and a
    log broker directory, naming the options that pick one.
    """
    is_shm = shm_broker_exists(target)
    is_log = is_log_broker_dir(target)
    if is_shm and is_log:
        raise CommandError(
            f"{target!r} is both an shm broker name and a log broker "
            f"directory; give --shm {target} or --path ./{target}")
    if is_shm:
        return "shm"
    if is_log:
        return "path"
    return None


def broker_not_found(target: str) -> CommandError:
    """Return the error for a positional BROKER that names no broker."""
    from mqs.broker._shm import _journal_path

    if os.sep in target or not target:
        if os.path.isdir(target):
            return CommandError(
                f"{target!r} is not a log broker directory (it has no "
                f"CURRENT file); give the directory of a "
                f"Broker(backend='log', path=...)")
        return CommandError(_log_dir_not_found(target))
    return CommandError(
        f"no shm broker named {target!r} (no {_journal_path(target)}) and "
        f"no log broker directory {target!r}; check the name, or give the "
        f"broker with --shm NAME, --path LOGDIR or --url URL")


def _log_dir_not_found(path: str) -> str:
    return (f"log broker directory {path!r} not found; check the path, or "
            f"create the broker first by opening "
            f"mqs.Broker(backend='log', path={path!r})")


def check_log_dir(path: str) -> None:
    """Reject a path that is not an existing log broker directory, so
    that opening it never creates one."""
    from mqs.broker._log import CURRENT

    if not os.path.exists(path):
        raise CommandError(_log_dir_not_found(path))
    if not os.path.isdir(path):
        raise CommandError(f"{path!r} is not a directory; give the path "
                           f"of a log broker (Broker(backend='log', "
                           f"path=...))")
    if not os.path.exists(os.path.join(path, CURRENT)):
        raise CommandError(f"{path!r} is not a log broker directory (it "
                           f"has no {CURRENT} file)")


def check_shm_name(name: str) -> None:
    """Reject the name of an shm broker that does not exist, because
    opening it would create an empty one."""
    from mqs.broker._shm import _journal_path

    if "/" in name or not name:
        raise CommandError(f"invalid shm broker name {name!r}: give the "
                           f"name it was opened with, without '/'")
    if not os.path.exists(_journal_path(name)):
        raise CommandError(f"shm broker {name!r} not found (no "
                           f"{_journal_path(name)}); check the name, or "
                           f"create the broker first by opening "
                           f"mqs.Broker(backend='shm', name={name!r})")


def parse_backend_option(text: str) -> tuple[str, str]:
    """Split a ``-o KEY=VALUE`` argument into (KEY, VALUE)."""
    key, equals, value = text.partition("=")
    if not equals or not key.isidentifier():
        raise argparse.ArgumentTypeError(
            f"invalid backend option {text!r}; give KEY=VALUE, such as "
            f"namespace=orders")
    return key, value


def open_broker(option: str, value: str,
                options: dict[str, str] | None = None,
                retry_timeout_s: float = RETRY_TIMEOUT_S) -> Any:
    """Open the existing broker at `value` with the backend of location
    option `option` (a key of `BACKEND_OPTIONS`) and backend `options`.

    A redis broker retries an unreachable server for `retry_timeout_s`
    seconds, at open and for every later command.
    """
    import mqs

    backend, keyword = BACKEND_OPTIONS[option]
    options: dict[str, Any] = dict(options or {})
    if keyword in options:
        raise CommandError(f"give the {keyword} with --{option}, not with "
                           f"--option")
    options[keyword] = value
    if backend == "redis":
        if "retry_timeout" in options:
            raise CommandError("give the retry_timeout with "
                               "--retry-timeout, not with --option")
        options["retry_timeout"] = retry_timeout_s
    # Opening an shm broker replays its journal, and the replayed drops
    # would log their running totals again; the commands report the
    # counters themselves.
    logging.getLogger("mqs.broker._state").setLevel(logging.ERROR)
    if backend == "log":
        check_log_dir(value)
    elif backend == "shm":
        check_shm_name(value)
    try:
        return mqs.Broker(backend, auto_declare=False, **options)
    except LogLocked as exc:
        # Raised when another process holds the writer lock of a log
        # broker that has no journal, not because the broker is open.
        raise CommandError(f"cannot open log broker {value!r}: "
                           f"{exc.strerror}") from None
    except BackendUnavailable as exc:
        raise CommandError(
            f"--{option} needs the {backend!r} backend, which this mqs "
            f"does not have ({exc})") from None
    except BackendConnectionError as exc:
        raise CommandError(name_retry_option(str(exc))) from None
    except (TypeError, ValueError) as exc:
        # A misspelt or invalid --option, or a bad location value.
        raise CommandError(
            f"cannot open the {backend} broker at {value!r}: {exc}"
        ) from None


# ------------------------------------------------------------------- stat

# Rows of `mqs stat` for a topic: gauges first, then the counters that
# the table always shows; other nonzero counters (drops by reason)
# follow them.
TOPIC_ROWS = ("ready", "in_flight", "delayed", "dlq", "stored", "groups",
              "published", "delivered", "acked", "nacked", "redelivered",
              "dead_lettered")
GROUP_ROWS = ("consumers", "lag_messages", "lag_seconds", "in_flight",
              "delayed", "delivered", "acked", "nacked", "redelivered",
              "dead_lettered", "errors", "error_ratio")


# Counters that `mqs stat --interval` turns into per-second rates.
RATE_COUNTERS = ("published", "delivered", "acked")


def broker_stats(option: str, value: str,
                 options: dict[str, str] | None = None,
                 interval_s: float | None = None,
                 retry_timeout_s: float = RETRY_TIMEOUT_S) -> dict[str, Any]:
    """Open the broker at `value` (location option `option`, backend
    `options`) and return the stats of every topic and group as plain
    values for JSON.

    With `interval_s`, sample the stats twice, that many seconds apart,
    and add ``interval_s`` (the measured time between the samples) and,
    for every topic in both samples, ``rates``: the per-second change of
    each counter of RATE_COUNTERS. The stats are those of the second
    sample.
    """
    broker = open_broker(option, value, options, retry_timeout_s)
    try:
        if interval_s is None:
            topics = _sample_topics(broker)
        else:
            began = time.monotonic()
            first = _sample_topics(broker)
            time.sleep(interval_s)
            ended = time.monotonic()
            topics = _sample_topics(broker)
    finally:
        broker.close()
    result = {"backend": BACKEND_OPTIONS[option][0], "broker": value,
              "topics": topics}
    if interval_s is not None:
        elapsed = ended - began
        result["interval_s"] = elapsed
        for topic, record in topics.items():
            if topic not in first:
                continue
            before, after = first[topic]["stats"], record["stats"]
            record["rates"] = {
                name: (after[name] - before[name]) / elapsed
                for name in RATE_COUNTERS}
    return result


def _sample_topics(broker: Any) -> dict[str, Any]:
    from mqs.errors import UnknownTopic
    from mqs.metrics import stats_as_dict

    topics: dict[str, Any] = {}
    for topic in broker.topics():
        try:
            group_stats = broker.group_stats(topic)
            stats = broker.stats(topic)
        except UnknownTopic:
            # Deleted by another process since the listing, such as the
            # reply topic of a request that finished.
            continue
        groups = []
        for group in group_stats:
            record = stats_as_dict(group)
            record["error_ratio"] = group.error_ratio
            groups.append(record)
        topics[topic] = {"stats": stats, "groups": groups}
    return topics


def parse_interval(text: str) -> float:
    """Parse the seconds of ``mqs stat --interval`` and
    ``mqs top --interval``."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= 3600:
        raise argparse.ArgumentTypeError(
            f"invalid interval {text!r}; give seconds above 0 and at most "
            f"3600, such as 1 or 0.5")
    return seconds


def broker_table(stats: dict[str, Any]) -> Table:
    """Return the `mqs stat` table of `broker_stats` output."""
    topics = stats["topics"]
    title = (f"{stats['backend']} broker {stats['broker']}: "
             f"{len(topics)} topic(s)")
    if "interval_s" in stats:
        title += f", rates over {stats['interval_s']:.2f} s"
    # As wide as the title, so that a long broker URL or path does not
    # wrap inside the two narrow columns (the console still caps it).
    table = Table(title=escape(title), min_width=len(title))
    table.add_column("counter")
    table.add_column("value", justify="right")
    for topic, record in topics.items():
        counters = record["stats"]
        names = list(TOPIC_ROWS) + sorted(
            name for name, count in counters.items()
            if name not in TOPIC_ROWS and count)
        for name in names:
            table.add_row(escape(f"{topic}: {name}"),
                          _format_value(counters.get(name, 0)))
        for name, rate in record.get("rates", {}).items():
            table.add_row(escape(f"{topic}: {name}/s"), f"{rate:.1f}")
        for group in record["groups"]:
            for name in GROUP_ROWS:
                value = group[name]
                if isinstance(value, float):
                    text = f"{value:.3f}"
                else:
                    text = _format_value(value)
                table.add_row(escape(f"{topic} / {group['group']}: {name}"),
                              text)
        table.add_section()
    return table
