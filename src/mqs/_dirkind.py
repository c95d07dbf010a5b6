"""Recognize the kind of an mqs directory from the files it contains.

A durable SharedQueue (``persist=``), a ``log`` broker and a bare
`SegmentLog` all use a lock file named ``lock`` and segment files, so
opening one kind's directory as another would mix their files or fail
later with a misleading `LogLocked`. `check_directory_kind` raises
`DirectoryKindError` up front instead.
"""

from __future__ import annotations

import os

from mqs.errors import DirectoryKindError

DURABLE_QUEUE = "durable SharedQueue"
LOG_BROKER = "log broker"
SEGMENT_LOG = "segment log"

# Marker files: a durable queue creates its control file before its log,
# and a log broker keeps CURRENT and its log-NNNNNN directories. A log
# broker writes its directory identity (broker.id) before its journal and
# log, so a directory whose first open failed still counts as one.
QUEUE_CONTROL_FILE = "queue.ctl"
BROKER_CURRENT_FILE = "CURRENT"
BROKER_ID_FILE = "broker.id"
BROKER_LOG_PREFIX = "log-"

# Call that opens each kind, named in the message of DirectoryKindError.
_OPENED_BY = {
    DURABLE_QUEUE: "mqs.SharedQueue(persist=path)",
    LOG_BROKER: "mqs.Broker(backend='log', path=path)",
    SEGMENT_LOG: "mqs.SegmentLog(path)",
}


def directory_kind(path: str) -> str | None:
    """Return the kind of mqs directory at `path`, or None when it is
    missing, empty or contains no mqs marker."""
    try:
        names = os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if QUEUE_CONTROL_FILE in names:
        return DURABLE_QUEUE
    if BROKER_CURRENT_FILE in names or BROKER_ID_FILE in names or any(
            name.startswith(BROKER_LOG_PREFIX)
            and os.path.isdir(os.path.join(path, name)) for name in names):
        return LOG_BROKER
    if any(name.endswith(".seg") for name in names):
        return SEGMENT_LOG
    return None


def check_directory_kind(path: str, expected: str) -> None:
    """Raise `DirectoryKindError` if `path` is an mqs directory of
    another kind than `expected` (one of the kinds above)."""
    kind = directory_kind(path)
    if kind is None or kind == expected:
        return
    raise DirectoryKindError(
        f"{path!r} is the directory of a {kind} (open it with "
        f"{_OPENED_BY[kind]}), not of a {expected}; give the "
        f"{expected} a directory of its own", path=path, kind=kind)
