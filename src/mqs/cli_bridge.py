"""The `mqs bridge` subcommand: forward a topic between two brokers."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from rich.console import Console
from rich.markup import escape

from mqs import bridge
from mqs.broker._policy import check_topic_name
from mqs.broker._redis import DEFAULT_RETRY_TIMEOUT_S, PICKLE_HINT
from mqs.cli import EXIT_FAILED, EXIT_OK, _positive_int
from mqs.cli_broker import (
    RETRY_TIMEOUT_S,
    add_retry_timeout_option,
    check_log_dir,
    check_shm_name,
    name_retry_option,
)
from mqs.cli_ops import CommandError, _non_negative_float
from mqs.errors import MqsError

logger = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bridge", help="forward a broker topic to another broker",
        description="Consume SOURCE in a consumer group and publish every "
                    "message to DESTINATION, acking it at the source only "
                    "after the destination stored it (at-least-once; the "
                    "destination drops copies within its dedup window). "
                    "Endpoints: redis://[user:password@]host:port/db#topic "
                    "(or rediss://), log:DIRECTORY#topic and "
                    "shm:NAME#topic. Runs until "
                    "interrupted, --max-messages or --idle-exit.")
    parser.add_argument("source", metavar="SOURCE", help="endpoint to read")
    parser.add_argument("destination", metavar="DESTINATION",
                        help="endpoint to write")
    parser.add_argument("--group", default="mqs.bridge",
                        help="consumer group at the source (default: "
                             "mqs.bridge)")
    parser.add_argument("--batch", type=_positive_int, default=100,
                        help="messages per publish and ack (default: 100)")
    parser.add_argument("--max-messages", type=_positive_int, default=None,
                        help="stop after forwarding this many messages")
    parser.add_argument("--idle-exit", type=_non_negative_float,
                        default=None,
                        metavar="SECONDS",
                        help="stop after this many seconds without a "
                             "message")
    parser.add_argument("--wait-for-topic", action="store_true",
                        help="wait until the source topic is declared; "
                             "without it a missing source topic is an "
                             "error")
    parser.add_argument("--pickle", action="store_true",
                        help="open redis endpoints with "
                             "serializer='pickle', for bodies other than "
                             "bytes and str (only if every client of the "
                             "server is trusted)")
    add_retry_timeout_option(
        parser, f"seconds to retry an unreachable Redis endpoint before "
                f"failing, at start-up and after a lost connection while "
                f"running (default: {RETRY_TIMEOUT_S:g} at start-up, "
                f"{DEFAULT_RETRY_TIMEOUT_S:g} while running)",
        default=None)
    parser.set_defaults(handler=_run_bridge)


def _run_bridge(args: argparse.Namespace) -> int:
    console = Console(stderr=True, highlight=False)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    source = destination = None
    try:
        source_end = bridge.parse_endpoint(args.source)
        destination_end = bridge.parse_endpoint(args.destination)
        if bridge.same_topic(source_end, destination_end):
            raise CommandError(
                f"source {args.source!r} and destination "
                f"{args.destination!r} are the same topic, so messages "
                f"would loop forever; give another destination")
        # Opening a missing log or shm source would create an empty
        # broker and wait on it forever; a destination may be new.
        if source_end.backend == "log":
            check_log_dir(source_end.location)
        elif source_end.backend == "shm":
            check_shm_name(source_end.location)
        # Without --retry-timeout, start-up fails after RETRY_TIMEOUT_S
        # and a running bridge retries for the backend's default.
        connect_retry_timeout = args.retry_timeout
        if connect_retry_timeout is None:
            connect_retry_timeout = RETRY_TIMEOUT_S
        check_topic_name(source_end.topic)
        check_topic_name(destination_end.topic)
        source = bridge.open_endpoint(
            source_end, pickle=args.pickle,
            connect_retry_timeout=connect_retry_timeout,
            retry_timeout=args.retry_timeout)
        # Opening a log or shm destination creates it, so it opens only
        # after both topic names are valid and the source topic exists.
        moved = 0
        if bridge._source_topic_ready(source, source_end.topic,
                                      args.wait_for_topic, args.idle_exit,
                                      stop):
            destination = bridge.open_endpoint(
                destination_end, pickle=args.pickle,
                connect_retry_timeout=connect_retry_timeout,
                retry_timeout=args.retry_timeout)
            logger.info("bridge %s -> %s started", args.source,
                        args.destination)
            moved = bridge.forward(
                source, source_end.topic, destination, destination_end.topic,
                group=args.group, batch=args.batch,
                max_messages=args.max_messages, idle_timeout=args.idle_exit,
                stop=stop, wait_for_topic=args.wait_for_topic)
    except (CommandError, MqsError, OSError, ValueError,
            TypeError) as exc:
        # A redis destination names the Python fix for a body it cannot
        # store, but on the command line the fix is --pickle.
        # The same holds for a missing source topic and --wait-for-topic.
        message = (str(exc) or type(exc).__name__).replace(
            PICKLE_HINT, "rerun mqs bridge with --pickle").replace(
            bridge.WAIT_HINT, "rerun mqs bridge with --wait-for-topic to "
                              "wait until a producer declares it")
        # --retry-timeout sets the retries while the brokers open and
        # while they run, so it is the fix for either error.
        message = name_retry_option(message)
        console.print(f"[bold red]mqs bridge: error:[/bold red] "
                      f"{escape(message)}", soft_wrap=True)
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, previous)
        for broker in (source, destination):
            if broker is not None:
                broker.close()
    print(f"forwarded {moved} messages", flush=True)
    return EXIT_OK
