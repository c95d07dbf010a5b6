"""The `mqs dlq` subcommand: list, redrive and purge the dead letters of a
broker topic.

The broker is opened through `mqs.Broker` with the backend that the
location option names (`BACKEND_OPTIONS`): ``--path LOGDIR`` for the log
backend, ``--shm NAME`` and ``--url URL`` for the shm and redis
backends. A backend that this mqs does not have fails with one line.

Processes share a log broker, so `mqs dlq` joins one that others have
open. Opening a log broker that no process has open does what every
restart does: the consumers of the processes that last had it open are
closed, so their in-flight messages are ready again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mqs.cli_ops import (
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    _console,
    _handler,
    _positive_int,
)
from mqs.errors import BackendUnavailable, LogLocked

# Location option -> (backend name for mqs.Broker, its keyword option).
BACKEND_OPTIONS = {
    "path": ("log", "path"),
    "shm": ("shm", "name"),
    "url": ("redis", "url"),
}

# Characters of a body that the table shows.
BODY_PREVIEW_CHARS = 60


def add_parser(subparsers: Any) -> None:
    """Add `mqs dlq` and its list, redrive and purge subcommands."""
    parser = subparsers.add_parser(
        "dlq", help="list, redrive or purge the dead letters of a topic",
        description="Work on the dead-letter queue of a broker topic. "
                    "The command joins a log (--path) or shm (--shm) "
                    "broker that other processes have open.")
    commands = parser.add_subparsers(
        title="commands", dest="dlq_command", required=True,
        metavar="COMMAND")

    listing = _add_command(
        commands, "list", _run_list,
        help="print the dead letters of a topic, oldest first",
        description="Print the dead letters of TOPIC, oldest first: id, "
                    "group, reason, attempts, last error, age and body.",
        json_help="print a JSON list instead of a table")
    listing.add_argument("--limit", type=_positive_int, metavar="N",
                         help="print only the N oldest dead letters")

    redrive = _add_command(
        commands, "redrive", _run_redrive,
        help="move dead letters back to their consumer groups",
        description="Move dead letters of TOPIC back to the tail of their "
                    "lane in their consumer group, with attempts reset "
                    "to 0. Give --id (repeatable) or --all. Ids that are "
                    "not in the dead-letter queue fail the command "
                    "before anything moves.",
        json_help="print the result as JSON")
    selection = redrive.add_mutually_exclusive_group(required=True)
    selection.add_argument("--id", action="append", dest="ids", metavar="ID",
                           help="message id to redrive; repeat for several")
    selection.add_argument("--all", action="store_true",
                           help="redrive every dead letter of the topic")

    purge = _add_command(
        commands, "purge", _run_purge,
        help="delete every dead letter of a topic",
        description="Delete every dead letter of TOPIC (counted as "
                    "dlq_purged). Without --yes only prints how many "
                    "would go and exits with status 2.",
        json_help="print the result as JSON")
    purge.add_argument("--yes", action="store_true",
                       help="delete the dead letters (required)")


def _add_command(commands: Any, name: str,
                 run: Callable[[argparse.Namespace], int], *, help: str,
                 description: str, json_help: str
                 ) -> argparse.ArgumentParser:
    """Add the `mqs dlq` subcommand `name` with the options that every
    subcommand takes: TOPIC, the broker location, --option and --json."""
    parser = commands.add_parser(name, help=help, description=description)
    _add_common(parser)
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.set_defaults(handler=_handler(f"dlq {name}", run))
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topic", metavar="TOPIC", help="broker topic")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--path", metavar="LOGDIR",
                       help="directory of a log broker (backend 'log')")
    where.add_argument("--shm", metavar="NAME",
                       help="name of a shared-memory broker (backend 'shm')")
    where.add_argument("--url", metavar="URL",
                       help="Redis URL of a redis broker (backend 'redis')")
    parser.add_argument("-o", "--option", action="append", default=[],
                        metavar="KEY=VALUE", type=_backend_option,
                        help="pass KEY=VALUE (a str) to the backend, such "
                             "as namespace=orders or serializer=pickle "
                             "for a redis broker; repeat for several")


def _backend_option(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key.isidentifier():
        raise argparse.ArgumentTypeError(
            f"invalid backend option {text!r}; give KEY=VALUE, such as "
            f"namespace=orders")
    return key, value


# ---------------------------------------------------------------- opening


def _open_broker(args: argparse.Namespace) -> Any:
    """Open the broker that the location option names; check the topic."""
    import mqs

    option = next(name for name in BACKEND_OPTIONS
                  if getattr(args, name) is not None)
    backend, keyword = BACKEND_OPTIONS[option]
    value = getattr(args, option)
    options = dict(args.option)
    if keyword in options:
        raise CommandError(f"give the {keyword} with --{option}, not with "
                           f"--option")
    options[keyword] = value
    # Opening an shm broker replays its journal, and the replayed drops
    # would log their running totals again; this command reports the
    # dead letters itself.
    logging.getLogger("mqs.broker._state").setLevel(logging.ERROR)
    if backend == "log":
        _check_log_dir(value)
    elif backend == "shm":
        _check_shm_name(value)
    try:
        broker = mqs.Broker(backend, auto_declare=False, **options)
    except LogLocked as exc:
        # Raised when another process holds the writer lock of a log
        # broker that has no journal, not because the broker is open.
        raise CommandError(f"cannot open log broker {value!r}: "
                           f"{exc.strerror}") from None
    except BackendUnavailable as exc:
        raise CommandError(
            f"--{option} needs the {backend!r} backend, which this mqs "
            f"does not have ({exc})") from None
    except (TypeError, ValueError) as exc:
        # A misspelt or invalid --option, or a bad location value.
        raise CommandError(
            f"cannot open the {backend} broker at {value!r}: {exc}"
        ) from None
    if not broker.backend.has_topic(args.topic):
        broker.close()
        raise CommandError(
            f"topic {args.topic!r} not found in {backend} broker "
            f"{value!r}; check the name")
    return broker


def _check_log_dir(path: str) -> None:
    """Reject a path that is not an existing log broker directory, so
    that opening it never creates one."""
    from mqs.broker._log import CURRENT

    if not os.path.exists(path):
        raise CommandError(f"log broker directory {path!r} not found")
    if not os.path.isdir(path):
        raise CommandError(f"{path!r} is not a directory; give the path "
                           f"of a log broker (Broker(backend='log', "
                           f"path=...))")
    if not os.path.exists(os.path.join(path, CURRENT)):
        raise CommandError(f"{path!r} is not a log broker directory (it "
                           f"has no {CURRENT} file)")


def _check_shm_name(name: str) -> None:
    """Reject the name of an shm broker that does not exist, because
    opening it would create an empty one."""
    from mqs.broker._shm import _journal_path

    if "/" in name or not name:
        raise CommandError(f"invalid shm broker name {name!r}: give the "
                           f"name it was opened with, without '/'")
    if not os.path.exists(_journal_path(name)):
        raise CommandError(f"shm broker {name!r} not found (no "
                           f"{_journal_path(name)})")


# ------------------------------------------------------------------- list


def _run_list(args: argparse.Namespace) -> int:
    broker = _open_broker(args)
    try:
        letters = broker.dlq_list(args.topic, args.limit)
    finally:
        broker.close()
    if args.json:
        print(json.dumps([_letter_dict(letter) for letter in letters],
                         indent=2, default=repr))
        return EXIT_OK
    _console().print(_letters_table(args.topic, letters))
    return EXIT_OK


def _letter_dict(letter: Any) -> dict[str, Any]:
    return {
        "id": letter.id,
        "topic": letter.topic,
        "group": letter.group,
        "reason": letter.reason,
        "attempts": letter.attempts,
        "error": letter.error,
        "priority": letter.priority,
        "key": letter.key,
        "timestamp": letter.timestamp,
        "headers": letter.headers,
        "body": letter.body,
    }


def _letters_table(topic: str, letters: Sequence[Any]) -> Table:
    table = Table(title=f"dead letters of {escape(topic)}: {len(letters)}")
    for column in ("id", "group", "reason", "attempts", "age", "error",
                   "body"):
        table.add_column(column, justify="right"
                         if column in ("attempts", "age") else "left")
    now = time.time()
    for letter in letters:
        table.add_row(
            escape(letter.id), escape(letter.group), escape(letter.reason),
            str(letter.attempts), _age(now - letter.timestamp),
            escape(letter.error or "-"), escape(_preview(letter.body)))
    return table


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{max(seconds, 0):.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _preview(body: Any) -> str:
    text = repr(body)
    if len(text) > BODY_PREVIEW_CHARS:
        text = text[:BODY_PREVIEW_CHARS] + "..."
    return text


# ---------------------------------------------------------------- redrive


def _run_redrive(args: argparse.Namespace) -> int:
    broker = _open_broker(args)
    try:
        ids = None
        if not args.all:
            ids = list(dict.fromkeys(args.ids))
            stored = {letter.id for letter in broker.dlq_list(args.topic)}
            missing = [message_id for message_id in ids
                       if message_id not in stored]
            if missing:
                raise CommandError(
                    f"not in the dead-letter queue of {args.topic!r}: "
                    f"{', '.join(missing)}; list the ids with `mqs dlq "
                    f"list`")
        moved = broker.dlq_redrive(args.topic, ids)
    finally:
        broker.close()
    if args.json:
        print(json.dumps({"topic": args.topic, "redriven": moved}))
    else:
        _console().print(f"redrove {moved} dead letter(s) of "
                         f"{escape(args.topic)}")
    return EXIT_OK


# ------------------------------------------------------------------ purge


def _run_purge(args: argparse.Namespace) -> int:
    broker = _open_broker(args)
    try:
        if not args.yes:
            count = len(broker.dlq_list(args.topic))
            Console(stderr=True, highlight=False).print(
                f"mqs dlq purge: would delete {count} dead letter(s) of "
                f"{escape(args.topic)}; run again with --yes to delete them",
                soft_wrap=True)
            return EXIT_USAGE
        purged = broker.dlq_purge(args.topic)
    finally:
        broker.close()
    if args.json:
        print(json.dumps({"topic": args.topic, "purged": purged}))
    else:
        _console().print(f"purged {purged} dead letter(s) of "
                         f"{escape(args.topic)}")
    return EXIT_OK
