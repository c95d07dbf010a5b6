"""The `mqs` command line tool.

`build_parser` adds one subparser per subcommand through an
``_add_<name>_parser`` function, or the ``add_parser`` function of a
``cli_<name>`` module (`mqs.cli_bench`; `mqs.cli_ops` has ``add_parsers``
for its several subcommands). That function sets the
``handler`` default: a function that takes the parsed arguments, runs the subcommand
and returns the exit status.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from rich.console import Console

import mqs

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# As a process killed by SIGPIPE reports itself to a shell (128 + 13).
EXIT_BROKEN_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `mqs` command with `argv` (default: sys.argv[1:])."""
    if argv is None:
        argv = sys.argv[1:]
    args = build_parser().parse_args(argv)
    args.argv = list(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        Console(stderr=True).print("[red]interrupted[/red]")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout closed it (`mqs dlq list | head`): stop
        # without a message, as a process killed by SIGPIPE would, and
        # point stdout at /dev/null so that the flush at exit does not
        # fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqs",
        description="Tools for mqs, the message queue scheduler.")
    parser.add_argument("--version", action="version",
                        version=f"mqs {mqs.__version__}")
    subparsers = parser.add_subparsers(
        title="commands", dest="command", required=True, metavar="COMMAND")
    # Imported here: cli_bench imports this module for the exit statuses,
    # and the other subcommands need none of the benchmark modules.
    from mqs import cli_bench, cli_bridge, cli_dlq, cli_ops

    cli_bench.add_parser(subparsers)
    cli_ops.add_parsers(subparsers)
    cli_bridge.add_parser(subparsers)
    cli_dlq.add_parser(subparsers)
    return parser


def _positive_int(text: str) -> int:
    """Parse a count of at least 1 for argparse (accepts 1_000 and 1,000)."""
    try:
        value = int(text.replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid integer {text!r}; give a whole number such as "
            f"1000") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be at least 1, got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
