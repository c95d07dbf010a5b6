"""The `mqs dlq` subcommand: list, redrive and purge the dead letters of a
broker topic.

The broker comes first as BROKER, an shm broker name or a log broker
directory (``mqs dlq list shop orders``), or after the topic as a
location option (`BACKEND_OPTIONS`): ``--path LOGDIR`` for the log
backend, ``--shm NAME`` and ``--url URL`` for the shm and redis
backends. A redis broker needs ``--url``. A backend that this mqs does
not have fails with one line.

Processes share a log broker, so `mqs dlq` joins one that others have
open. Opening a log broker that no process has open does what every
restart does: the consumers of the processes that last had it open are
closed, so their in-flight messages are ready again.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
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
from mqs.cli_broker import (
    BACKEND_OPTIONS,
    RETRY_TIMEOUT_S,
    add_retry_timeout_option,
    broker_not_found,
    locate_broker,
    open_broker,
    parse_backend_option,
)

# Characters of a body that the table shows.
BODY_PREVIEW_CHARS = 60


def add_parser(subparsers: Any) -> None:
    """Add `mqs dlq` and its list, redrive and purge subcommands."""
    parser = subparsers.add_parser(
        "dlq", help="list, redrive or purge the dead letters of a topic",
        description="Work on the dead-letter queue of a broker topic. "
                    "Name the broker first, as an shm broker name or a "
                    "log broker directory (mqs dlq list shop orders), or "
                    "after the topic with --path, --shm or --url "
                    "(mqs dlq list orders --url redis://...). The command "
                    "joins a log or shm broker that other processes have "
                    "open.")
    commands = parser.add_subparsers(
        title="commands", dest="dlq_command", required=True,
        metavar="COMMAND")

    listing = _add_command(
        commands, "list", _run_list,
        help="print the dead letters of a topic, oldest first",
        description="Print the dead letters of TOPIC, oldest first: id, "
                    "group, reason, attempts, last error, age and body. "
                    "A body that fails to deserialize in this process "
                    "(a class in it does not import here) is shown with "
                    "its error, and --json gives it as decode_error and "
                    "raw_body_base64. A key or headers that fail (redis "
                    "with serializer=pickle) are reported the same way, "
                    "as raw_key_base64 and raw_headers_base64.",
        json_help="print a JSON list instead of a table")
    listing.add_argument("--limit", type=_positive_int, metavar="N",
                         help="print only the N oldest dead letters")

    redrive = _add_command(
        commands, "redrive", _run_redrive,
        help="move dead letters back to their consumer groups",
        description="Move dead letters of TOPIC back to the tail of their "
                    "lane in their consumer group, with attempts reset "
                    "to 0: those given with --id (repeatable), or all of "
                    "them without --id, as Broker.dlq_redrive(topic) "
                    "does. Ids that are not in the dead-letter queue "
                    "fail the command before anything moves.",
        json_help="print the result as JSON")
    selection = redrive.add_mutually_exclusive_group()
    selection.add_argument("--id", action="append", dest="ids", metavar="ID",
                           help="message id to redrive; repeat for several")
    selection.add_argument("--all", action="store_true",
                           help="redrive every dead letter of the topic "
                                "(the default without --id)")

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
    subcommand takes: BROKER, TOPIC, the location options, --option and
    --json."""
    usage = (f"mqs dlq {name} [options] BROKER TOPIC\n"
             f"       mqs dlq {name} [options] TOPIC "
             f"(--path LOGDIR | --shm NAME | --url URL)")
    parser = commands.add_parser(name, help=help, description=description,
                                 usage=usage)
    _add_common(parser)
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.set_defaults(handler=_handler(f"dlq {name}", run))
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    # argparse fills the positionals from the left, so with one positional
    # it lands in broker_or_topic; `_broker_location` sorts them out.
    parser.add_argument("broker_or_topic", metavar="BROKER",
                        help="shm broker name (as in Broker(backend='shm', "
                             "name=...)) or log broker directory; leave "
                             "it out when you give --path, --shm or --url")
    parser.add_argument("topic", metavar="TOPIC", nargs="?",
                        help="broker topic")
    parser.set_defaults(parser=parser)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--path", metavar="LOGDIR",
                       help="directory of a log broker (backend 'log')")
    where.add_argument("--shm", metavar="NAME",
                       help="name of a shared-memory broker (backend 'shm')")
    where.add_argument("--url", metavar="URL",
                       help="Redis URL of a redis broker (backend 'redis')")
    parser.add_argument("-o", "--option", action="append", default=[],
                        metavar="KEY=VALUE", type=parse_backend_option,
                        help="pass KEY=VALUE (a str) to the backend, such "
                             "as namespace=orders or serializer=pickle "
                             "for a redis broker; repeat for several")
    add_retry_timeout_option(
        parser, f"for a redis broker (--url): seconds to retry an "
                f"unreachable server before failing (default: "
                f"{RETRY_TIMEOUT_S:g})")


# ---------------------------------------------------------------- opening


def _broker_location(args: argparse.Namespace) -> tuple[str, str]:
    """Return the location option and value of the broker that the
    arguments name, and set `args.topic`."""
    flags = [name for name in BACKEND_OPTIONS
             if getattr(args, name) is not None]
    if args.topic is not None:
        if flags:
            args.parser.error(
                f"give the broker either as BROKER or with --{flags[0]}, "
                f"not both")
        broker = args.broker_or_topic
        option = locate_broker(broker)
        if option is None:
            raise broker_not_found(broker)
        return option, broker
    args.topic = args.broker_or_topic
    if not flags:
        args.parser.error(
            f"give the broker: BROKER {args.topic} (an shm broker name "
            f"or a log broker directory) or {args.topic} with one of the "
            f"arguments --path --shm --url")
    return flags[0], getattr(args, flags[0])


def _open_broker(args: argparse.Namespace) -> Any:
    """Open the broker that the arguments name; check the topic."""
    option, value = _broker_location(args)
    broker = open_broker(option, value, dict(args.option),
                         args.retry_timeout)
    if not broker.backend.has_topic(args.topic):
        broker.close()
        backend = BACKEND_OPTIONS[option][0]
        if option == "url":
            # A wrong namespace hides every topic of the broker.
            namespace = dict(args.option).get("namespace", "mqs")
            raise CommandError(
                f"topic {args.topic!r} not found in namespace "
                f"{namespace!r} of redis broker {value!r}; check the "
                f"name, and give the namespace of its clients with -o "
                f"namespace=NAME")
        raise CommandError(
            f"topic {args.topic!r} not found in {backend} broker "
            f"{value!r}; check the name")
    return broker


# ------------------------------------------------------------------- list


class _NameSerializerOption(logging.Filter):
    """Rewrite the redis backend's warning about a pickled body so that
    it names the -o option of mqs dlq instead of the Python keyword."""

    def filter(self, record: logging.LogRecord) -> bool:
        from mqs.broker._redis import PICKLED_BODY_WARNING

        if record.msg == PICKLED_BODY_WARNING:
            record.msg = (
                "message %s has a pickled body, but mqs dlq opened the "
                "broker without serializer=pickle, so it shows the raw "
                "bytes (%d such bodies so far); rerun with -o "
                "serializer=pickle to unpickle them (only if every client "
                "of the server is trusted)")
        return True


def _run_list(args: argparse.Namespace) -> int:
    broker = _open_broker(args)
    redis_logger = logging.getLogger("mqs.broker._redis")
    name_option = _NameSerializerOption()
    redis_logger.addFilter(name_option)
    try:
        letters = broker.dlq_list(args.topic, args.limit)
    finally:
        redis_logger.removeFilter(name_option)
        broker.close()
    if args.json:
        print(json.dumps(
            [_json_safe(_letter_dict(letter)) for letter in letters],
            indent=2, default=repr, allow_nan=False))
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
        # Set only for a body, key or headers that failed to deserialize
        # here. A failed body or key is then null, and failed headers
        # keep only the mqs.* ones.
        "decode_error": letter.decode_error,
        "raw_body_base64": _base64(letter.raw_body),
        "raw_key_base64": _base64(letter.raw_key),
        "raw_headers_base64": _base64(letter.raw_headers),
    }


def _json_safe(value: Any) -> Any:
    """Return `value` with what JSON cannot hold as its repr: a dict key
    other than str, int, float, bool or None (such as a tuple), and NaN
    or an infinity. Other objects are left to ``default=repr``."""
    if isinstance(value, dict):
        return {key if key is None or isinstance(key, (str, int, bool))
                or (isinstance(key, float) and math.isfinite(key))
                else repr(key): _json_safe(item)
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def _base64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode("ascii")


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
            escape(letter.error or "-"), escape(_body_cell(letter)))
    table.caption = _undecodable_caption(letters)
    return table


def _undecodable_caption(letters: Sequence[Any]) -> str | None:
    """Return the table caption that counts the letters whose body, key
    or headers failed to deserialize, or None when there are none."""
    bodies = sum(letter.raw_body is not None for letter in letters)
    others = sum(letter.raw_key is not None
                 or letter.raw_headers is not None for letter in letters)
    if not bodies and not others:
        return None
    sentences = []
    if bodies:
        sentences.append(f"{bodies} dead letter(s) have a body that failed "
                         f"to deserialize in this process.")
    if others:
        sentences.append(f"{others} dead letter(s) have a key or headers "
                         f"that failed to deserialize in this process "
                         f"(--json gives their bytes).")
    sentences.append("Run mqs where the application's modules import "
                     "(with its PYTHONPATH, for example) to see them. "
                     "Redrive and purge work on them as they are.")
    return " ".join(sentences)


def _body_cell(letter: Any) -> str:
    if letter.raw_body is not None:
        return (f"<{len(letter.raw_body)} bytes that failed to "
                f"deserialize: {letter.decode_error}>")
    if letter.decode_error is not None:
        return f"{_preview(letter.body)} <{letter.decode_error}>"
    return _preview(letter.body)


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
        if args.ids:
            ids = list(dict.fromkeys(args.ids))
            stored = {letter.id for letter in broker.dlq_list(args.topic)}
            missing = [message_id for message_id in ids
                       if message_id not in stored]
            if missing:
                raise CommandError(
                    f"not in the dead-letter queue of {args.topic!r}: "
                    f"{', '.join(map(repr, missing))}; list the ids with "
                    f"`mqs dlq list`")
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
