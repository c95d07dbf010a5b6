"""Operations subcommands of the `mqs` command: stat, top, dump, purge,
clean, tail and metrics.

`add_parsers` registers them with the `mqs` parser. Every handler returns
an exit status; an expected failure (bad name or path, corrupted log)
prints one line on stderr and returns EXIT_FAILED, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from mqs import metrics
from mqs._dirkind import DURABLE_QUEUE, LOG_BROKER, directory_kind
from mqs.errors import Empty, LogCorrupted, MqsError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# Bytes of a record's value that `mqs tail` and `mqs dump --records` show.
PREVIEW_BYTES = 64


class CommandError(Exception):
    """An expected failure of a subcommand, printed as one line."""


def add_parsers(subparsers: Any) -> None:
    """Add the operations subcommands to the `mqs` subparsers."""
    _add_stat_parser(subparsers)
    _add_top_parser(subparsers)
    _add_dump_parser(subparsers)
    _add_purge_parser(subparsers)
    _add_clean_parser(subparsers)
    _add_tail_parser(subparsers)
    _add_metrics_parser(subparsers)


def _handler(name: str,
             run: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """Wrap `run` so that expected errors print one line and exit 1."""

    def handle(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except BrokenPipeError:
            # The reader of the output went away (`mqs ... | head`):
            # `mqs.cli.main` ends quietly.
            raise
        except (CommandError, MqsError, OSError) as exc:
            message = str(exc) or type(exc).__name__
            Console(stderr=True, highlight=False).print(
                f"[bold red]mqs {name}: error:[/bold red] {escape(message)}",
                soft_wrap=True)
            return EXIT_FAILED

    return handle


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid number {text!r}; give seconds such as 1.5") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"must be a finite number of at least 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid integer {text!r}; give a whole number such as 10"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid integer {text!r}; give a whole number such as 0"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text!r}")
    return value


def _console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=120, highlight=False)
    return console


# -------------------------------------------------------------- resolving


def _is_log_dir(target: str) -> bool:
    return os.path.isdir(target)


def _open_log(path: str) -> Any:
    """Open an existing segment log directory read-only."""
    from mqs import SegmentLog

    if not os.path.isdir(path):
        if os.path.exists(path):
            raise CommandError(f"{path!r} is not a directory; give a segment "
                               f"log directory")
        raise CommandError(f"segment log directory {path!r} not found")
    if directory_kind(path) == LOG_BROKER:
        # A log broker keeps its segments in subdirectories, and its
        # records are broker operations, not messages.
        raise CommandError(
            f"{path!r} is a log broker directory, not a segment log; list "
            f"a topic's dead letters with `mqs dlq list {path} TOPIC`, or "
            f"read its counters with `mqs stat {path}`")
    if not any(name.endswith(".seg") for name in os.listdir(path)):
        raise CommandError(f"{path!r} has no segment files (*.seg); it is "
                           f"not a segment log")
    return SegmentLog(path, readonly=True)


def _queue_stats(name: str) -> metrics.SharedQueueStats:
    """Read a shared queue's stats, with errors worded for the CLI."""
    from mqs.cli_broker import shm_broker_exists
    from mqs.shared import QueueLayoutError, QueueNotFound

    try:
        return metrics.inspect_shared_queue(name)
    except QueueNotFound:
        if shm_broker_exists(name):
            raise CommandError(
                f"{name!r} is an shm broker, not a shared queue, and this "
                f"command works on shared queues only; read the broker's "
                f"counters with `mqs stat {name}` and a topic's dead "
                f"letters with `mqs dlq list {name} TOPIC`") from None
        if os.path.isdir(name):
            raise CommandError(_directory_not_queue(name)) from None
        raise CommandError(
            f"no shared queue named {name!r}, no shm broker of that name "
            f"and no directory {name!r}; list the queues with `mqs top "
            f"--once`") from None
    except QueueLayoutError as exc:
        raise CommandError(str(exc)) from None
    except ValueError as exc:  # a name with '/' or NUL
        raise CommandError(str(exc)) from None


def _directory_not_queue(name: str) -> str:
    """Return the error message for a directory given to a command that
    works on shared queues only."""
    kind = directory_kind(name)
    if kind == LOG_BROKER:
        return (f"{name!r} is a log broker directory, not a shared queue, "
                f"and this command works on shared queues only; delete a "
                f"topic's dead letters with `mqs dlq purge {name} TOPIC` "
                f"and read the broker's counters with `mqs stat {name}`")
    description = f"a {kind} directory" if kind else "a directory"
    return (f"{name!r} is {description}, not a shared queue, and this command "
            f"works on shared queues only; give the name the queue was "
            f"created with (SharedQueue(name=...)), or read the directory "
            f"with `mqs stat {name}`")


def _check_queue_name(name: str) -> None:
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise CommandError(
            f"invalid queue name {name!r}: give the name the queue was "
            f"created with, without '/'")


# ------------------------------------------------------------------- stat


def _add_stat_parser(subparsers: Any) -> None:
    from mqs.cli_broker import (
        RETRY_TIMEOUT_S,
        add_retry_timeout_option,
        parse_backend_option,
        parse_interval,
    )

    parser = subparsers.add_parser(
        "stat", help="show the counters of a shared queue, segment log or "
                     "broker",
        description="Print one table of the counters of a named shared "
                    "queue (read through a read-only mapping; the queue "
                    "is not disturbed), of a durable shared queue's "
                    "directory (its groups, lag and committed offsets, "
                    "read-only), of a segment log directory (opened "
                    "read-only), or of an shm, log or redis broker: for "
                    "every topic its ready, in-flight, delayed and dead-letter "
                    "counts and counters, and for every consumer group "
                    "its lag, in-flight messages and counters. The "
                    "broker is opened as one more process (never "
                    "created). Opening a log broker that no process has "
                    "open closes the consumers that its last processes "
                    "left, as every restart does.")
    parser.add_argument("target", metavar="NAME|PATH", nargs="?",
                        help="shm broker name (Broker(backend='shm', "
                             "name=...)), log broker directory, shared "
                             "queue name (SharedQueue(name=...)), durable "
                             "queue directory (persist=...) or segment "
                             "log directory")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--shm", metavar="NAME",
                       help="name of an shm broker, for a name that is "
                            "also a shared queue or a directory")
    where.add_argument("--path", metavar="LOGDIR",
                       help="directory of a log broker, for a name that is "
                            "also an shm broker")
    where.add_argument("--url", metavar="URL",
                       help="Redis URL of a redis broker (backend 'redis')")
    parser.add_argument("-o", "--option", action="append", default=[],
                        metavar="KEY=VALUE", type=parse_backend_option,
                        help="pass KEY=VALUE (a str) to a broker's backend, "
                             "such as namespace=orders for a redis broker; "
                             "repeat for several")
    parser.add_argument("--interval", metavar="SECONDS", type=parse_interval,
                        help="for a broker: read the stats twice, SECONDS "
                             "apart, and add the per-second rates of "
                             "published, delivered and acked messages of "
                             "every topic")
    add_retry_timeout_option(
        parser, f"for a redis broker: seconds to retry an unreachable "
                f"server before failing (default: {RETRY_TIMEOUT_S:g})")
    parser.add_argument("--json", action="store_true",
                        help="print the stats as JSON instead of a table")
    parser.set_defaults(handler=_handler("stat", _run_stat), parser=parser)


def _stat_broker_location(args: argparse.Namespace
                          ) -> tuple[str, str] | None:
    """Return the location option and value of the broker that `mqs
    stat` was given, or None when the target is no broker."""
    from mqs.cli_broker import locate_broker

    for option in ("shm", "path", "url"):
        value = getattr(args, option)
        if value is None:
            continue
        if args.target is not None:
            args.parser.error(f"give either NAME|PATH or --{option}, not "
                              f"both")
        return option, value
    if args.target is None:
        args.parser.error("give a NAME|PATH, --shm NAME, --path LOGDIR or "
                          "--url URL")
    target = args.target
    option = locate_broker(target)
    if option != "shm":
        return None if option is None else (option, target)
    queue_path = os.path.join(metrics.SHM_DIR, metrics.SHM_PREFIX + target)
    if os.path.exists(queue_path):
        raise CommandError(
            f"{target!r} is both an shm broker and a shared queue; give "
            f"--shm {target} for the broker or {queue_path} for the queue")
    if directory_kind(target) is not None:
        raise CommandError(
            f"{target!r} is both an shm broker and a "
            f"{directory_kind(target)} directory; give --shm {target} for "
            f"the broker or ./{target} for the directory")
    return option, target


def _run_stat(args: argparse.Namespace) -> int:
    console = _console()
    broker = _stat_broker_location(args)
    if broker is None and (args.option or args.interval is not None):
        args.parser.error(f"--option and --interval apply only to a "
                          f"broker, and {args.target!r} is not one")
    if broker is not None:
        from mqs.cli_broker import broker_stats, broker_table

        options = dict(args.option)
        result = broker_stats(*broker, options, args.interval,
                              args.retry_timeout)
        if broker[0] == "url" and not result["topics"]:
            # A namespace is not checked when the broker opens, so a
            # wrong one shows as an empty broker.
            namespace = options.get("namespace", "mqs")
            print(f"mqs stat: note: the redis broker at {broker[1]} has no "
                  f"topics in namespace {namespace!r}; if its clients use "
                  f"another namespace, give it with -o namespace=NAME",
                  file=sys.stderr)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            console.print(broker_table(result))
        return EXIT_OK
    if _is_log_dir(args.target) and directory_kind(args.target) \
            == DURABLE_QUEUE:
        stats = metrics.inspect_durable_queue(args.target)
        table = _queue_table(stats)
    elif _is_log_dir(args.target):
        log = _open_log(args.target)
        try:
            stats = log.stats()
        finally:
            log.close()
        table = _log_table(stats)
    elif os.sep in args.target \
            and not args.target.startswith(metrics.SHM_DIR + os.sep):
        # A path: mqs stat reads directories only.
        kinds = "a log broker, durable queue or segment log directory"
        if os.path.exists(args.target):
            raise CommandError(f"{args.target!r} is not a directory; give "
                               f"{kinds}")
        raise CommandError(f"{args.target!r} not found; give {kinds}, or "
                           f"the name of an shm broker or shared queue")
    else:
        stats = _queue_stats(args.target)
        table = _queue_table(stats)
    if args.json:
        print(json.dumps(metrics.stats_as_dict(stats), indent=2))
    else:
        console.print(table)
    return EXIT_OK


def _queue_table(stats: metrics.SharedQueueStats) -> Table:
    if stats.persist is None:
        title = f"shared queue {escape(str(stats.name))}"
    else:
        title = f"durable shared queue {escape(stats.persist)}"
    table = Table(title=title)
    table.add_column("counter")
    table.add_column("value", justify="right")
    rows: list[tuple[str, Any]] = [
        ("groups", stats.groups),
        ("enqueued (messages put, ever)", stats.enqueued),
    ]
    for group in range(stats.groups):
        rows.append((f"group {group}: dequeued", stats.dequeued[group]))
        rows.append((f"group {group}: lag (messages)", stats.lag[group]))
        if stats.lag_seconds is not None:
            rows.append((f"group {group}: lag (seconds)",
                         f"{stats.lag_seconds[group]:.3f}"))
        if stats.committed is not None:
            committed = stats.committed[group]
            rows.append((f"group {group}: committed offset",
                         "-" if committed is None else committed))
    rows += [
        ("delayed", "-" if stats.delayed is None else stats.delayed),
        ("maxsize (0: ring bound)", stats.maxsize),
        ("capacity bytes", stats.capacity_bytes),
        ("used bytes", stats.used_bytes),
        ("max message size", stats.max_message_size),
        ("attached processes", stats.attached_processes),
        ("dropped: repaired records", stats.repaired_records),
        ("dropped: consumer died", stats.lost_records),
        ("dropped: decode failed", stats.decode_failures),
        ("stalls reported", stats.stalls_reported),
    ]
    rows += _latency_rows(stats.latency)
    for label, value in rows:
        table.add_row(label, _format_value(value))
    return table


def _latency_rows(latency: metrics.LatencySummary | None
                  ) -> list[tuple[str, Any]]:
    if latency is None:
        return [("latency sampling", "off")]
    every = latency.sample_every
    rows: list[tuple[str, Any]] = [
        ("latency sampling", f"1 in {every:,}" if every else "off"),
        ("latency samples", latency.count),
    ]
    if latency.count:
        rows += [(f"latency {label}", f"{value * 1e6:,.1f} us")
                 for label, value in (("p50", latency.p50_s),
                                      ("p99", latency.p99_s),
                                      ("p99.9", latency.p999_s),
                                      ("max", latency.max_s))]
    return rows


def _log_table(stats: metrics.SegmentLogStats) -> Table:
    table = Table(title=f"segment log {escape(stats.path)}")
    table.add_column("counter")
    table.add_column("value", justify="right")
    rows: list[tuple[str, Any]] = [
        ("start offset", stats.start_offset),
        ("end offset", stats.end_offset),
        ("records", stats.end_offset - stats.start_offset),
        ("segments", stats.segments),
        ("bytes", stats.bytes),
        ("records deleted by retention", stats.records_deleted),
        ("dropped: torn tail on open", stats.records_dropped),
    ]
    lag = stats.consumer_lag
    for group, offset in stats.committed.items():
        rows.append((f"group {group}: committed offset", offset))
        rows.append((f"group {group}: lag (records)", lag[group]))
    for label, value in rows:
        table.add_row(escape(label), _format_value(value))
    return table


def _format_value(value: Any) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# -------------------------------------------------------------------- top


def _add_top_parser(subparsers: Any) -> None:
    from mqs.cli_broker import parse_interval

    parser = subparsers.add_parser(
        "top", help="live view of every shared queue on this machine",
        description="Show every named shared queue of this machine "
                    "(/dev/shm/mqs.*) in a table refreshed every "
                    "--interval seconds, with put and get rates since the "
                    "previous refresh. Queues are read through a "
                    "read-only mapping and are not disturbed. Stop with "
                    "Ctrl-C.")
    # Above 0, because an interval of 0 redraws the table in a busy loop.
    parser.add_argument("--interval", type=parse_interval, default=1.0,
                        metavar="SECONDS",
                        help="seconds between refreshes, above 0 and at "
                             "most 3600 (default: 1)")
    parser.add_argument("--once", action="store_true",
                        help="print one table and exit (no rates)")
    parser.add_argument("--iterations", type=_positive_int, metavar="N",
                        help="print N tables, --interval apart, then exit")
    parser.set_defaults(handler=_handler("top", _run_top))


def _run_top(args: argparse.Namespace) -> int:
    console = _console()
    iterations = 1 if args.once else args.iterations
    previous: dict[str, tuple[float, metrics.SharedQueueStats]] = {}

    def render() -> Table:
        now = time.monotonic()
        current = {stats.name or "": (now, stats)
                   for stats in metrics.scan_shared_queues()}
        table = _top_table(current, previous)
        previous.clear()
        previous.update(current)
        return table

    if iterations is not None or not console.is_terminal:
        count = 0
        while iterations is None or count < iterations:
            if count:
                time.sleep(args.interval)
            console.print(render())
            count += 1
        return EXIT_OK
    with Live(render(), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(args.interval)
            live.update(render(), refresh=True)


def _top_table(current: dict[str, tuple[float, metrics.SharedQueueStats]],
               previous: dict[str, tuple[float, metrics.SharedQueueStats]],
               ) -> Table:
    table = Table(title=f"mqs shared queues on this machine: {len(current)} "
                        f"({time.strftime('%H:%M:%S')})")
    for column in ("queue", "groups", "max lag", "enqueued", "put/s",
                   "get/s", "used", "procs", "dropped"):
        table.add_column(column, justify="left" if column == "queue"
                         else "right")
    for name, (now, stats) in sorted(current.items()):
        put_rate = get_rate = "-"
        if name in previous:
            then, old = previous[name]
            elapsed = max(now - then, 1e-9)
            put_rate = f"{(stats.enqueued - old.enqueued) / elapsed:,.0f}"
            got = sum(stats.dequeued) - sum(old.dequeued)
            get_rate = f"{got / elapsed / stats.groups:,.0f}"
        used = 100.0 * stats.used_bytes / stats.capacity_bytes
        dropped = sum(stats.dropped.values())
        table.add_row(escape(name), str(stats.groups), f"{max(stats.lag):,}",
                      f"{stats.enqueued:,}", put_rate, get_rate,
                      f"{used:.1f}%", str(stats.attached_processes),
                      f"{dropped:,}")
    return table


# ------------------------------------------------------------------- dump


def _add_dump_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dump", help="list a segment log's segments and verify every record",
        description="List the segments of a segment log directory (file, "
                    "first and last offset, records, bytes), read every "
                    "record and verify its CRC-32C. Exits with status 1 "
                    "when a record is damaged or offsets are missing. "
                    "The log is opened read-only.")
    parser.add_argument("logdir", metavar="LOGDIR",
                        help="segment log directory")
    parser.add_argument("--records", action="store_true",
                        help="also print every record: offset, timestamp, "
                             f"key and the first {PREVIEW_BYTES} bytes of "
                             f"the value")
    parser.add_argument("--verify", action="store_true",
                        help="accepted for clarity: every dump verifies")
    parser.set_defaults(handler=_handler("dump", _run_dump))


def _segment_bases(path: str) -> list[int]:
    bases = []
    for name in os.listdir(path):
        stem, dot, extension = name.partition(".")
        if extension == "seg" and dot and stem.isdigit():
            bases.append(int(stem))
    return sorted(bases)


def _run_dump(args: argparse.Namespace) -> int:
    console = _console()
    log = _open_log(args.logdir)
    try:
        stats = log.stats()
        bases = _segment_bases(args.logdir)
        table = Table(title=f"segments of {escape(args.logdir)}")
        for column in ("segment", "first offset", "last offset", "records",
                       "bytes", "verified", "damaged"):
            table.add_column(column, justify="left" if column == "segment"
                             else "right")
        damaged_total = 0
        verified_total = 0
        records = []
        for index, base in enumerate(bases):
            end = bases[index + 1] if index + 1 < len(bases) \
                else stats.end_offset
            first = max(base, stats.start_offset)
            verified, damaged = _verify_range(log, first, end, records,
                                              args.records)
            damaged += _end_before_checkpoint(log.recovery, base)
            verified_total += verified
            damaged_total += len(damaged)
            name = f"{base:020d}.seg"
            size = os.path.getsize(os.path.join(args.logdir, name))
            table.add_row(
                name, f"{first:,}", f"{end - 1:,}" if end > first else "-",
                f"{end - first:,}", f"{size:,}", f"{verified:,}",
                f"[red]{len(damaged):,}[/red]" if damaged else "0")
            for offset, reason in damaged:
                records.append(f"[red]offset {offset}: {escape(reason)}"
                               f"[/red]")
        console.print(table)
        for line in records:
            console.print(line, soft_wrap=True)
        # The end offset is the next one to be written, so the last
        # record has end_offset - 1.
        if stats.end_offset > stats.start_offset:
            span = (f"offsets {stats.start_offset:,} to "
                    f"{stats.end_offset - 1:,}")
        else:
            span = f"no records (next offset {stats.end_offset:,})"
        console.print(f"{span}: {verified_total:,} records verified, "
                      f"{damaged_total:,} damaged")
        skipped = _skipped_line(log.recovery)
        if skipped:
            console.print(f"[red]{escape(skipped)}[/red]", soft_wrap=True)
    finally:
        log.close()
    if damaged_total:
        Console(stderr=True).print(
            f"[bold red]mqs dump: error:[/bold red] {damaged_total} damaged "
            f"or missing record(s) in {escape(args.logdir)}")
        return EXIT_FAILED
    if skipped:
        # Damaged bytes between records, with no offset of their own.
        Console(stderr=True).print(
            f"[bold red]mqs dump: error:[/bold red] damaged bytes between "
            f"records in {escape(args.logdir)}")
        return EXIT_FAILED
    return EXIT_OK


def _skipped_line(report: Any) -> str:
    """Describe the damaged records that recovery skipped, or return "".

    After a clean close, recovery skips damaged records up to the next
    valid one when the valid records then end where the close recorded.
    Reads of the skipped offsets fail too.
    """
    if not report.damaged_ranges:
        return ""
    return (f"recovery skipped {report.records_skipped:,} damaged "
            f"record(s) in {report.damaged_ranges:,} range(s), the first "
            f"at offset {report.first_skipped_offset:,} (segment "
            f"{report.first_skipped_segment:020d}, position "
            f"{report.first_skipped_position:,}), and kept the records "
            f"after them")


def _end_before_checkpoint(report: Any,
                           base: int) -> list[tuple[int, str]]:
    """Return the damage where segment `base` ends short of its checkpoint.

    The checkpoint records where the records of the last segment ended
    at the last clean close. A read-only open stops at the first record
    whose length or offset is wrong, so when that is below the recorded
    end, the record there and the ones after it cannot be read.
    """
    if not report.ended_before_checkpoint or report.first_bad_segment != base:
        return []
    return [(report.first_bad_offset,
             f"record fails its length or offset check at position "
             f"{report.first_bad_position:,}, before the end recorded at "
             f"the last clean close; the records after it cannot be "
             f"located, and opening the log for writing cuts them")]


def _verify_range(log: Any, first: int, end: int, lines: list[str],
                  show: bool) -> tuple[int, list[tuple[int, str]]]:
    """Read offsets [first, end); return (verified, [(offset, reason)])."""
    verified = 0
    damaged = []
    for offset in range(first, end):
        try:
            record = log.read_record(offset)
        except LogCorrupted as exc:
            damaged.append((offset, str(exc)))
            continue
        verified += 1
        if show:
            lines.append(_record_line(record))
            record.value.release()
            if record.key is not None:
                record.key.release()
    return verified, damaged


def _record_line(record: Any) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S",
                          time.gmtime(record.timestamp / 1e9))
    key = "-" if record.key is None else _preview(record.key)
    return (f"{record.offset:>10} {stamp}Z key={escape(key)} "
            f"{len(record.value)} B {escape(_preview(record.value))}")


def _preview(data: Any) -> str:
    raw = bytes(data[:PREVIEW_BYTES])
    text = repr(raw)
    if len(data) > PREVIEW_BYTES:
        text += "..."
    return text


# ------------------------------------------------------------------ purge


def _add_purge_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "purge", help="discard every message queued in a shared queue",
        description="Discard the messages that are queued in a named "
                    "shared queue when the command starts, in every "
                    "consumer group. Messages put meanwhile stay, and so "
                    "do delayed messages that are not due yet, which are "
                    "delivered when due. Without --yes only prints what "
                    "would be discarded and exits with status 2.")
    parser.add_argument("name", metavar="NAME", help="shared queue name")
    parser.add_argument("--yes", action="store_true",
                        help="discard the messages (required)")
    parser.set_defaults(handler=_handler("purge", _run_purge))


def _run_purge(args: argparse.Namespace) -> int:
    from mqs import SharedQueue

    console = _console()
    _check_queue_name(args.name)
    stats = _queue_stats(args.name)
    if not args.yes:
        Console(stderr=True).print(
            f"mqs purge: would discard {max(stats.lag):,} message(s) of "
            f"{escape(args.name)} (lag per group: {list(stats.lag)})"
            f"{_format_delayed_note(stats.delayed)}; run again with --yes to "
            f"discard them", soft_wrap=True)
        return EXIT_USAGE
    discarded = []
    queue = SharedQueue(name=args.name, create=False)
    try:
        for group in range(stats.groups):
            handle = queue.for_group(group)
            try:
                discarded.append(_drain(handle, stats.lag[group]))
            finally:
                handle.close()
    finally:
        queue.close()
    console.print(f"purged {escape(args.name)}: discarded "
                  f"{discarded} message(s) per group"
                  f"{_format_delayed_note(stats.delayed)}")
    return EXIT_OK


def _format_delayed_note(delayed: int) -> str:
    """Return the note that purge leaves `delayed` messages, or ''."""
    if not delayed:
        return ""
    return f"; {delayed:,} delayed message(s) not due yet stay"


# ------------------------------------------------------------------ clean


def _add_clean_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "clean", help="remove the /dev/shm journals a log broker left",
        description="Remove the /dev/shm journals of the log broker at "
                    "PATH that no process has open. If PATH is a log "
                    "broker directory, the command opens and closes the "
                    "broker first, so its journal goes into the log "
                    "before it is removed (unless other processes still "
                    "have the broker open). Journals of earlier "
                    "directories at PATH (removed, emptied or replaced "
                    "since) are removed, and PATH may no longer exist. "
                    "Shm brokers are not cleaned: they live only in "
                    "/dev/shm, so removing one loses its messages "
                    "(mqs.Broker.unlink(NAME) does that).")
    parser.add_argument("path", metavar="PATH",
                        help="log broker directory, or the path of one "
                             "that was removed")
    parser.set_defaults(handler=_handler("clean", _run_clean))


def _check_clean_path(path: str) -> str | None:
    """Return the directory kind at `path`, or raise CommandError if
    `mqs clean` has nothing it may clean there."""
    from mqs.broker._log_shared import journal_files
    from mqs.broker._shm import _journal_path

    if os.path.exists(path) and not os.path.isdir(path):
        raise CommandError(
            f"{path!r} is not a directory; give a log broker directory, or "
            f"the path of one that was removed")
    kind = directory_kind(path)
    if kind not in (None, LOG_BROKER):
        raise CommandError(
            f"{path!r} is a {kind} directory, not a log broker; mqs clean "
            f"only removes the /dev/shm journals of log brokers")
    if os.path.exists(path) or journal_files(path):
        return kind
    if "/" not in path and os.path.exists(_journal_path(path)):
        raise CommandError(
            f"{path!r} is an shm broker ({_journal_path(path)}), not a log "
            f"broker directory; mqs clean only removes the journals of log "
            f"brokers. An shm broker exists only in /dev/shm, so removing "
            f"it loses its messages: call mqs.Broker.unlink({path!r}) if "
            f"that is what you want")
    raise CommandError(
        f"log broker directory {path!r} not found, and no journal of one "
        f"is in /dev/shm; check the path")


def _run_clean(args: argparse.Namespace) -> int:
    from mqs import Broker
    from mqs.broker._log_shared import (
        journal_files,
        remove_stale_journals,
    )

    console = _console()
    path = args.path
    kind = _check_clean_path(path)
    before = set(journal_files(path))
    if kind == LOG_BROKER:
        # The last process to close the broker snapshots the journal
        # into the log and removes it.
        Broker(backend="log", path=path).close()
    stale = remove_stale_journals(path)
    left = sorted(journal_files(path))
    moved = sorted(before - set(left) - set(stale))
    if kind == LOG_BROKER:
        lines = [f"{escape(path)}: removed {len(moved)} journal(s) of this "
                 f"broker (moved into its log first) and {len(stale)} of "
                 f"earlier directories at this path; {len(left)} in use by "
                 f"open brokers stay"]
    else:
        # The path has no log broker now (or no directory at all), so
        # only journals of earlier brokers at this path can go.
        lines = [f"{escape(path)}: no log broker here now; removed "
                 f"{len(stale)} journal(s) of earlier log broker "
                 f"directories at this path; {len(left)} in use by open "
                 f"brokers stay"]
    for label, names in (("moved into the log and removed", moved),
                         ("removed (earlier directory)", sorted(stale)),
                         ("in use, kept", left)):
        lines += [f"  {label}: /dev/shm/mqs.broker.{escape(name)}*"
                  for name in names]
    console.print("\n".join(lines), soft_wrap=True)
    return EXIT_OK


def _drain(queue: Any, limit: int) -> int:
    """Take up to `limit` messages without decoding them."""
    taken = 0
    while taken < limit:
        try:
            with queue.get_view(timeout=0):
                pass
        except Empty:
            break
        taken += 1
    return taken


# ------------------------------------------------------------------- tail


def _add_tail_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "tail", help="follow a segment log or a shared queue's group",
        description="Print records as they arrive. For a segment log "
                    "directory: read-only, starting at the last --lines "
                    "records (or at --from). For a shared queue: get the "
                    "messages of consumer group --group, which takes "
                    "them from that group, so give it a group no other "
                    "consumer reads (a queue created with groups=2 or "
                    "more). Broker topics are not supported yet.")
    parser.add_argument("target", metavar="NAME|LOGDIR",
                        help="shared queue name or segment log directory")
    parser.add_argument("--group", type=_non_negative_int, metavar="G",
                        help="shared queue: consumer group to get from "
                             "(required for a shared queue)")
    parser.add_argument("--lines", type=_non_negative_int, default=10,
                        metavar="N",
                        help="log: start with the last N records "
                             "(default: 10)")
    parser.add_argument("--from", type=_non_negative_int, dest="start",
                        metavar="OFFSET",
                        help="log: start at this offset instead")
    parser.add_argument("--count", type=_positive_int, metavar="N",
                        help="exit after N records or messages")
    parser.add_argument("--timeout", type=_non_negative_float,
                        metavar="SECONDS",
                        help="exit after this many seconds without a new "
                             "record (default: follow until Ctrl-C)")
    parser.set_defaults(handler=_handler("tail", _run_tail))


def _run_tail(args: argparse.Namespace) -> int:
    if _is_log_dir(args.target):
        if args.group is not None:
            raise CommandError("--group applies to shared queues; a "
                               "segment log is read without a group")
        return _tail_log(args)
    _check_queue_name(args.target)
    _queue_stats(args.target)  # one clear error if it does not exist
    if args.group is None:
        raise CommandError(
            f"give --group for shared queue {args.target!r}: tail gets "
            f"(takes) the messages of that consumer group")
    return _tail_queue(args)


def _tail_log(args: argparse.Namespace) -> int:
    log = _open_log(args.target)
    printed = 0
    try:
        end = log.refresh()
        offset = args.start if args.start is not None \
            else max(log.start_offset, end - args.lines)
        idle_since = time.monotonic()
        while args.count is None or printed < args.count:
            if offset < log.refresh():
                record = log.read_record(offset)
                print(_plain_record_line(record), flush=True)
                printed += 1
                offset += 1
                idle_since = time.monotonic()
                continue
            if args.timeout is not None \
                    and time.monotonic() - idle_since >= args.timeout:
                break
            time.sleep(0.05)
    finally:
        log.close()
    return EXIT_OK


def _plain_record_line(record: Any) -> str:
    key = "" if record.key is None else f" key={_preview(record.key)}"
    return (f"{record.offset}{key} {len(record.value)} B "
            f"{_preview(record.value)}")


def _tail_queue(args: argparse.Namespace) -> int:
    from mqs import SharedQueue

    queue = SharedQueue(name=args.target, create=False)
    try:
        if args.group >= queue.groups:
            raise CommandError(
                f"--group must be 0 to {queue.groups - 1} for shared queue "
                f"{args.target!r} of {queue.groups} group(s), got "
                f"{args.group}")
        handle = queue.for_group(args.group)
    finally:
        queue.close()
    printed = 0
    try:
        while args.count is None or printed < args.count:
            try:
                message = handle.get(timeout=args.timeout)
            except Empty:
                break
            print(_message_line(message), flush=True)
            printed += 1
    finally:
        handle.close()
    return EXIT_OK


def _message_line(message: Any) -> str:
    if isinstance(message, (bytes, bytearray)):
        return f"{len(message)} B {_preview(message)}"
    text = repr(message)
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(message).__name__} {text}"


# ---------------------------------------------------------------- metrics


def _add_metrics_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "metrics", help="serve Prometheus metrics of this machine's queues",
        description="Serve the metrics of every named shared queue of "
                    "this machine, and of the segment logs given with "
                    "--log, for Prometheus at http://ADDR:PORT/metrics. "
                    "Queues are read through a read-only mapping and are "
                    "not disturbed. Stop with Ctrl-C.")
    parser.add_argument("--port", type=_port, required=True,
                        help="TCP port to listen on (0 picks a free one)")
    parser.add_argument("--addr", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1; "
                             "0.0.0.0 accepts scrapes from other hosts)")
    parser.add_argument("--log", action="append", default=[],
                        metavar="LOGDIR",
                        help="also export this segment log directory "
                             "(opened read-only); repeat for several")
    parser.add_argument("--duration", type=_non_negative_float,
                        metavar="SECONDS",
                        help="stop after this many seconds (default: run "
                             "until interrupted)")
    parser.set_defaults(handler=_handler("metrics", _run_metrics))


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid port {text!r}; give a number from 0 to 65535") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(
            f"port must be 0 to 65535, got {text!r}")
    return value


def _run_metrics(args: argparse.Namespace) -> int:
    from mqs.exporter import start_metrics_server

    logs = [_open_log(path) for path in args.log]
    for log in logs:
        metrics.register(log)
    stop = threading.Event()
    try:
        server = start_metrics_server(args.port, args.addr)
    except OSError as exc:
        reason = "port in use" if exc.errno == errno.EADDRINUSE \
            else exc.strerror or str(exc)
        raise CommandError(f"cannot listen on {args.addr}:{args.port}: "
                           f"{reason}") from None
    try:
        print(f"serving mqs metrics on http://{args.addr}:{server.port}"
              f"/metrics", flush=True)
        _stop_on_sigterm(stop)
        stop.wait(args.duration)
    finally:
        server.close()
        for log in logs:
            log.close()
    return EXIT_OK


def _stop_on_sigterm(stop: threading.Event) -> None:
    """Make SIGTERM end the server loop like Ctrl-C, with a clean exit."""
    import signal

    def handle(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handle)

