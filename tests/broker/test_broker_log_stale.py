"""The /dev/shm journal of a log broker belongs to one incarnation of its
directory: a removed, emptied or replaced directory never gets the state
of its predecessor back, and a crash of every process keeps the state of
the same directory."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import mqs
from mqs.broker._log_shared import (
    SHM_DIR,
    _path_prefix,
    directory_identity,
    journal_name,
    remove_stale_journals,
    unlink_journal,
)
from mqs.broker._shm import PREFIX


@pytest.fixture
def path(tmp_path):
    directory = tmp_path / "broker"
    yield directory
    unlink_journal(directory)


def journal_files(path):
    """Return the sorted /dev/shm file names of every journal of `path`."""
    prefix = PREFIX + _path_prefix(path)
    return sorted(entry for entry in os.listdir(SHM_DIR)
                  if entry.startswith(prefix))


# Opens the broker, stores one message in topic "old", prints its journal
# name, then exits without close() or waits to be killed.
PUBLISHER = """
import json, os, sys, time
import mqs
from mqs.broker._log_shared import journal_name
path, how = sys.argv[1], sys.argv[2]
broker = mqs.Broker(backend="log", path=path, fsync="always")
broker.declare_topic("old")
broker.publish("old", "before the crash")
print(json.dumps({"journal": journal_name(path)}), flush=True)
if how == "exit":
    os._exit(0)
time.sleep(600)
"""


def crash_publisher(path, how):
    """Run PUBLISHER until it exits (``"exit"``) or is SIGKILLed
    (``"sigkill"``) and return the name of its journal."""
    process = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, str(path), how],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line, process.stderr.read()
        if how == "sigkill":
            process.send_signal(signal.SIGKILL)
        process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
        process.stdout.close()
        process.stderr.close()
    return json.loads(line)["journal"]


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_log_removed_directory_starts_empty(path, how):
    old = crash_publisher(path, how)
    assert os.path.exists(os.path.join(SHM_DIR, PREFIX + old))
    shutil.rmtree(path)

    broker = mqs.Broker(backend="log", path=path)
    try:
        with pytest.raises(mqs.UnknownTopic):
            broker.stats("old")
        assert journal_name(path) != old
        # Nobody uses the old journal, so the open removed it.
        assert not any(name.startswith(PREFIX + old)
                       for name in journal_files(path))
    finally:
        broker.close()
    assert journal_files(path) == []


def test_log_emptied_directory_starts_empty(path):
    old = crash_publisher(path, "sigkill")
    # The directory keeps its inode; only its files go.
    for entry in os.listdir(path):
        entry_path = os.path.join(path, entry)
        if os.path.isdir(entry_path):
            shutil.rmtree(entry_path)
        else:
            os.unlink(entry_path)

    broker = mqs.Broker(backend="log", path=path)
    try:
        with pytest.raises(mqs.UnknownTopic):
            broker.stats("old")
        assert journal_name(path) != old
    finally:
        broker.close()


def test_log_copied_directory_ignores_old_journal(path, tmp_path):
    crash_publisher(path, "sigkill")
    # A copy with one message in its log and the same broker.id file.
    backup = tmp_path / "backup"
    shutil.copytree(path, backup)
    # A second crash leaves a journal with two messages.
    old = crash_publisher(path, "sigkill")
    assert os.path.exists(os.path.join(SHM_DIR, PREFIX + old))
    shutil.rmtree(path)
    os.rename(backup, path)

    broker = mqs.Broker(backend="log", path=path)
    try:
        assert journal_name(path) != old
        assert broker.stats("old")["stored"] == 1
        assert not any(name.startswith(PREFIX + old)
                       for name in journal_files(path))
    finally:
        broker.close()


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_log_crash_keeps_journal_of_same_directory(path, how):
    old = crash_publisher(path, how)
    identity = directory_identity(path)

    broker = mqs.Broker(backend="log", path=path)
    try:
        assert directory_identity(path) == identity
        assert journal_name(path) == old
        assert broker.stats("old")["stored"] == 1
    finally:
        broker.close()
    assert journal_files(path) == []


def test_log_unlink_journal_after_directory_removed(path):
    old = crash_publisher(path, "sigkill")
    shutil.rmtree(path)
    assert PREFIX + old in journal_files(path)

    # No id file to read any more: it matches by the path alone.
    assert unlink_journal(path)
    assert journal_files(path) == []
    assert not unlink_journal(path)


# Opens the broker, stores one message and prints "ready". Once the file
# named by argv[2] exists, it retries a publish and then a stats call
# until each raises BackendUnavailable, prints the errors, closes the
# broker and prints "closed".
LIVE_OLD_PROCESS = """
import json, os, sys, time
import mqs
path, go = sys.argv[1], sys.argv[2]
broker = mqs.Broker(backend="log", path=path, fsync="always")
broker.declare_topic("old")
broker.publish("old", "kept in the old view")
print(json.dumps({"ready": True}), flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
deadline = time.monotonic() + 30
errors = []
for call in (lambda: broker.publish("old", "after the removal"),
             lambda: broker.stats("old")):
    while True:
        try:
            call()
        except mqs.BackendUnavailable as exc:
            errors.append(str(exc))
            break
        assert time.monotonic() < deadline, "no BackendUnavailable in 30 s"
        time.sleep(0.05)
print(json.dumps({"errors": errors}), flush=True)
broker.close()
print(json.dumps({"closed": True}), flush=True)
"""


class Reader:
    """Collect the JSON lines of a child's stdout in a thread."""

    def __init__(self, process):
        self.process = process
        self.lines = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(json.loads(line))

    def wait_for(self, key, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines:
                if key in line:
                    return line[key]
            assert self.process.poll() is None or self.lines, \
                self.process.stderr.read()
            assert time.monotonic() < deadline, f"no {key!r} from child"
            time.sleep(0.01)


def test_log_removed_directory_while_process_has_it_open(path, tmp_path):
    go = tmp_path / "go"
    process = subprocess.Popen(
        [sys.executable, "-c", LIVE_OLD_PROCESS, str(path), str(go)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader = Reader(process)
    try:
        reader.wait_for("ready")
        old = journal_name(path)
        shutil.rmtree(path)

        broker = mqs.Broker(backend="log", path=path, fsync="always")
        try:
            with pytest.raises(mqs.UnknownTopic):
                broker.stats("old")
            # The old process still has its journal open: it stays.
            assert PREFIX + old in journal_files(path)
            assert remove_stale_journals(path) == []
            broker.declare_topic("new")
            broker.publish("new", "fresh")

            go.touch()
            errors = reader.wait_for("errors")
            assert len(errors) == 2
            assert all("removed or replaced" in text for text in errors)
            reader.wait_for("closed")
            assert process.wait(30) == 0

            # The old process neither wrote into the new directory nor
            # left its journal behind.
            assert journal_files(path) == sorted(
                name for name in journal_files(path)
                if name.startswith(PREFIX + journal_name(path)))
            assert broker.stats("new")["stored"] == 1
            with pytest.raises(mqs.UnknownTopic):
                broker.stats("old")
        finally:
            broker.close()
        reopened = mqs.Broker(backend="log", path=path)
        try:
            assert reopened.stats("new")["stored"] == 1
            with pytest.raises(mqs.UnknownTopic):
                reopened.stats("old")
        finally:
            reopened.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
        reader.thread.join(30)
        process.stdout.close()
        process.stderr.close()


def run_clean(path):
    return subprocess.run(
        [sys.executable, "-m", "mqs", "clean", str(path)], check=False,
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "COLUMNS": "200"})


def test_cli_clean_after_crash_keeps_messages(path):
    crash_publisher(path, "sigkill")
    assert journal_files(path) != []

    result = run_clean(path)
    assert result.returncode == 0, result.stderr
    assert "removed 0 journal(s)" in result.stdout
    assert journal_files(path) == []
    # The journal went into the log before it was removed.
    broker = mqs.Broker(backend="log", path=path)
    try:
        assert broker.stats("old")["stored"] == 1
    finally:
        broker.close()


def test_cli_clean_removed_directory(path):
    crash_publisher(path, "sigkill")
    shutil.rmtree(path)

    result = run_clean(path)
    assert result.returncode == 0, result.stderr
    assert "removed 1 journal(s)" in result.stdout
    assert journal_files(path) == []
    assert not os.path.exists(path)


def test_cli_clean_keeps_journal_in_use(path):
    broker = mqs.Broker(backend="log", path=path)
    try:
        result = run_clean(path)
        assert result.returncode == 0, result.stderr
        assert "1 journal(s) in use" in result.stdout
        assert journal_name(path) in result.stdout
        assert journal_files(path) != []
    finally:
        broker.close()
    assert journal_files(path) == []
