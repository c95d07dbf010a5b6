"""The /dev/shm journal of a log broker belongs to one incarnation of its
directory: a removed, emptied or replaced directory never gets the state
of its predecessor back, and a crash of every process keeps the state of
the same directory."""

import errno
import json
import logging
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
    DIRECTORY_CHECK_INTERVAL_S,
    SHM_DIR,
    _log_mismatch,
    _path_prefix,
    _read_log,
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


def start_two_step_publisher(path, compact_bytes, go):
    """Start TWO_STEP_PUBLISHER on `path`; return the process and the
    `Reader` of its reports."""
    process = subprocess.Popen(
        [sys.executable, "-c", TWO_STEP_PUBLISHER, str(path),
         str(compact_bytes), str(go)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return process, Reader(process)


def stored_after_open(path, topic="old"):
    """Open the log broker at `path` and return how many messages `topic`
    stores."""
    broker = mqs.Broker(backend="log", path=path)
    try:
        return broker.stats(topic)["stored"]
    finally:
        broker.close()


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

    def stop(self):
        """Kill the child if it still runs, then close its pipes."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self.thread.join(30)
        self.process.stdout.close()
        self.process.stderr.close()

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
        reader.stop()



def publish_until_unavailable(broker, timeout=10):
    """Publish every 10 ms until the broker raises BackendUnavailable;
    return the error's message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            broker.publish("t", "after")
        except mqs.BackendUnavailable as exc:
            return str(exc)
        time.sleep(0.01)
    raise AssertionError(f"the broker kept working for {timeout} s")



def check_reports_removal(broker, path):
    """Check that `broker`, whose directory is partly removed, reports
    the removal, and still does once the rest goes."""
    message = publish_until_unavailable(broker)
    assert "the directory was removed or replaced" in message

    shutil.rmtree(path)
    with pytest.raises(mqs.BackendUnavailable,
                       match="the directory was removed or replaced"):
        broker.publish("t", "after the removal")


def test_log_relative_path_survives_chdir(path, tmp_path, monkeypatch):
    """A broker opened with a relative path keeps using the directory it
    opened after the process changes its working directory, as daemons
    do. The directory check must not take the chdir for a removal."""
    monkeypatch.chdir(path.parent)
    broker = mqs.Broker(backend="log", path=path.name)
    try:
        broker.publish("t", "before")
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        # Past the interval of the writer thread's directory check.
        time.sleep(DIRECTORY_CHECK_INTERVAL_S + 0.3)
        broker.publish("t", "after")
        assert not (elsewhere / path.name).exists()
    finally:
        broker.close()
    reopened = mqs.Broker(backend="log", path=path)
    try:
        consumer = reopened.consume("t", "g", auto_ack=True)
        got = [message.body for message in consumer.get_many(5, timeout=5)]
        assert got == ["before", "after"]
        consumer.close()
    finally:
        reopened.close()


def test_log_close_after_removal_quiet(path, caplog):
    """The close of a broker whose directory was removed cannot write the
    recovery point of its log, and need not: no open reads that log
    again. It must not warn that the next open checks the records."""
    broker = mqs.Broker(backend="log", path=path)
    broker.publish("t", "before")
    shutil.rmtree(path)
    publish_until_unavailable(broker)
    with caplog.at_level(logging.WARNING):
        broker.close()
    assert "recovery point" not in caplog.text
    assert "the next open" not in caplog.text
    assert journal_files(path) == []


def test_log_rmtree_removing_current_first_reports_removal(path):
    broker = mqs.Broker(backend="log", path=path)
    try:
        broker.publish("t", "before")
        # shutil.rmtree removes entries in readdir order. tmpfs on Linux
        # 6.18 lists the newest entry first, so CURRENT, which every
        # snapshot rewrites, goes long before broker.id. Removing CURRENT
        # alone keeps the broker in that state until its writer thread
        # checks the log.
        os.unlink(path / "CURRENT")
        check_reports_removal(broker, path)
    finally:
        broker.close()
    assert journal_files(path) == []


def test_log_rmtree_removing_log_first_reports_removal(path):
    # A tiny compact_bytes makes every publish write a snapshot, which
    # checks the directory's log first.
    broker = mqs.Broker(backend="log", path=path, compact_bytes=1)
    try:
        broker.publish("t", "before")
        log_name = (path / "CURRENT").read_text().strip()
        # The order of rmtree on ext4 follows name hashes, so the log can
        # go before CURRENT and broker.id.
        shutil.rmtree(path / log_name)
        check_reports_removal(broker, path)
    finally:
        broker.close()
    assert journal_files(path) == []


def run_clean(path):
    return subprocess.run(
        [sys.executable, "-m", "mqs", "clean", str(path)], check=False,
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "COLUMNS": "200"})


def test_cli_clean_after_crash_keeps_messages(path):
    crash_publisher(path, "sigkill")
    assert journal_files(path) != []
    name = journal_name(path)

    result = run_clean(path)
    assert result.returncode == 0, result.stderr
    assert "removed 1 journal(s) of this broker (moved into its log " \
        "first) and 0 of earlier directories" in result.stdout
    assert "0 in use by open brokers stay" in result.stdout
    assert f"moved into the log and removed: /dev/shm/{PREFIX}{name}*" \
        in result.stdout
    assert journal_files(path) == []
    # The journal went into the log before it was removed.
    assert stored_after_open(path) == 1


def test_cli_clean_removed_directory(path):
    crash_publisher(path, "sigkill")
    shutil.rmtree(path)

    result = run_clean(path)
    assert result.returncode == 0, result.stderr
    assert "no log broker here now; removed 1 journal(s) of earlier log " \
        "broker directories at this path" in result.stdout
    assert "of this broker" not in result.stdout
    assert "removed (earlier directory): /dev/shm/mqs.broker." \
        in result.stdout
    assert journal_files(path) == []
    assert not os.path.exists(path)

    # Nothing is left to clean at the path, and saying success would
    # hide a mistyped path.
    result = run_clean(path)
    assert result.returncode == 1
    assert f"log broker directory {str(path)!r} not found, and no " \
        f"journal of one is in /dev/shm; check the path" in result.stderr


def test_cli_clean_plain_directory_names_no_broker(tmp_path):
    """A directory without a log broker gets no report about "this
    broker"."""
    plain = tmp_path / "plain"
    plain.mkdir()
    result = run_clean(plain)
    assert result.returncode == 0, result.stderr
    assert "no log broker here now; removed 0 journal(s)" in result.stdout
    assert "of this broker" not in result.stdout
    assert os.listdir(plain) == []


def test_cli_clean_rejects_shm_broker_name(tmp_path):
    name = f"mqs-test-clean-{os.getpid()}"
    mqs.Broker.unlink(name)
    mqs.Broker(backend="shm", name=name).close()
    try:
        # Run from an empty directory, so the name is no relative path.
        # The child imports mqs from PYTHONPATH, so make its entries
        # absolute.
        python_path = os.pathsep.join(
            os.path.abspath(entry)
            for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if entry)
        result = subprocess.run(
            [sys.executable, "-m", "mqs", "clean", name], check=False,
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
            env={**os.environ, "COLUMNS": "200",
                 "PYTHONPATH": python_path})
        assert result.returncode == 1
        assert result.stdout == ""
        assert f"{name!r} is an shm broker" in result.stderr
        assert "not a log broker directory" in result.stderr
        assert f"mqs.Broker.unlink({name!r})" in result.stderr
        # The shm broker was left alone.
        assert os.path.exists(f"/dev/shm/mqs.broker.{name}")
    finally:
        mqs.Broker.unlink(name)


def test_cli_clean_keeps_journal_in_use(path):
    broker = mqs.Broker(backend="log", path=path)
    try:
        result = run_clean(path)
        assert result.returncode == 0, result.stderr
        assert "1 in use by open brokers stay" in result.stdout
        assert "in use, kept: /dev/shm/mqs.broker." in result.stdout
        assert journal_name(path) in result.stdout
        assert journal_files(path) != []
    finally:
        broker.close()
    assert journal_files(path) == []


# Opens the broker at argv[1] and kills itself with SIGKILL where the
# first log would be created, so the open dies after it created broker.id
# and the journal but before the first log, and cleans up nothing.
CRASHED_FIRST_OPEN = """
import os, signal, sys
import mqs
import mqs.broker._log as log_module

def crash(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

log_module.SegmentLog = crash
mqs.Broker(backend="log", path=sys.argv[1])
"""


def test_cli_clean_after_crashed_first_open(path):
    opened = subprocess.run(
        [sys.executable, "-c", CRASHED_FIRST_OPEN, str(path)],
        capture_output=True, text=True, timeout=60)
    assert opened.returncode == -signal.SIGKILL, opened.stderr
    assert "CURRENT" not in os.listdir(path)
    assert journal_files(path) != []

    result = run_clean(path)
    assert result.returncode == 0, result.stderr
    assert "removed 1 journal(s) of this broker" in result.stdout
    assert "0 in use by open brokers stay" in result.stdout
    assert journal_files(path) == []


# Opens the broker at argv[1] with argv[2] failing as on a full disk: an
# os function, or the SegmentLog of the first log. Prints the errno of the
# error that the open raised.
FAILING_OPEN = """
import errno, os, sys
import mqs
import mqs.broker._log as log_module

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "no space left on device (simulated)")

path, failing = sys.argv[1], sys.argv[2]
if failing == "SegmentLog":
    log_module.SegmentLog = no_space
else:
    setattr(os, failing, no_space)
try:
    mqs.Broker(backend="log", path=path)
except OSError as exc:
    print(exc.errno)
else:
    print("opened")
"""

# Where a first open fails: writing broker.id (fsync), sizing the
# journal's durable file in /dev/shm (ftruncate), preallocating the first
# log (SegmentLog) and switching CURRENT to it (replace).
OPEN_FAILURES = ["fsync", "ftruncate", "SegmentLog", "replace"]


def open_failing(path, failing):
    """Open the log broker at `path` in a child in which `failing` raises
    ENOSPC; return the errno that the open raised."""
    opened = subprocess.run(
        [sys.executable, "-c", FAILING_OPEN, str(path), failing],
        capture_output=True, text=True, timeout=60)
    assert opened.returncode == 0, opened.stderr
    return opened.stdout.strip()


@pytest.mark.parametrize("failing", OPEN_FAILURES)
@pytest.mark.parametrize("depth", [1, 3], ids=["directory", "parents"])
def test_log_failed_first_open_removes_what_it_created(tmp_path, failing,
                                                       depth):
    parent = tmp_path / "parent"
    parent.mkdir()
    path = parent.joinpath(*["new"] * depth)
    try:
        assert open_failing(path, failing) == str(errno.ENOSPC)

        assert os.listdir(parent) == []
        assert journal_files(path) == []
    finally:
        unlink_journal(path)


@pytest.mark.parametrize("failing", OPEN_FAILURES)
def test_log_failed_first_open_keeps_existing_directory(path, failing):
    path.mkdir()

    assert open_failing(path, failing) == str(errno.ENOSPC)

    assert path.is_dir()
    assert journal_files(path) == []
    # The temporary file that broker.id is written to does not stay.
    assert not [name for name in os.listdir(path)
                if name.startswith("broker.id.")]


@pytest.mark.parametrize("failing", ["ftruncate", "SegmentLog", "replace"])
def test_log_failed_open_keeps_existing_broker(path, failing):
    broker = mqs.Broker(backend="log", path=path)
    broker.publish("t", "kept")
    broker.close()
    directory_id = (path / "broker.id").read_text()
    log_name = (path / "CURRENT").read_text()

    assert open_failing(path, failing) == str(errno.ENOSPC)

    assert (path / "broker.id").read_text() == directory_id
    assert (path / "CURRENT").read_text() == log_name
    assert stored_after_open(path, "t") == 1


def test_cli_clean_rejects_file(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    result = run_clean(a_file)
    assert result.returncode == 1
    assert result.stdout == ""
    message = result.stderr.strip()
    assert "\n" not in message
    assert f"{str(a_file)!r} is not a directory" in message
    assert "Errno" not in message


def test_cli_clean_rejects_durable_queue(tmp_path):
    directory = tmp_path / "queue"
    queue = mqs.SharedQueue(persist=str(directory))
    queue.put(b"kept")
    queue.close()
    result = run_clean(directory)
    assert result.returncode == 1
    assert "is a durable SharedQueue directory, not a log broker" in \
        result.stderr
    assert "CURRENT" not in os.listdir(directory)
    queue = mqs.SharedQueue(persist=str(directory))
    assert queue.get(timeout=10) == b"kept"
    queue.close()


# Opens the broker with compact_bytes=argv[2], stores message "first" and
# prints "ready". Once the file named by argv[3] exists, it stores
# message "second", prints "second" and waits to be killed.
TWO_STEP_PUBLISHER = """
import json, os, sys, time
import mqs
path, compact_bytes, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
broker = mqs.Broker(backend="log", path=path, fsync="always",
                    compact_bytes=compact_bytes)
broker.declare_topic("old")
broker.publish("old", "first")
print(json.dumps({"ready": True}), flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
broker.publish("old", "second")
print(json.dumps({"second": True}), flush=True)
time.sleep(600)
"""


def restore_in_place(backup, path):
    """Copy every file of `backup` over `path`, keeping the directory
    (its inode) and the files that the backup lacks."""
    for root, _, files in os.walk(backup):
        target = os.path.join(path, os.path.relpath(root, backup))
        os.makedirs(target, exist_ok=True)
        for name in files:
            shutil.copy2(os.path.join(root, name),
                         os.path.join(target, name))


def read_current(path):
    with open(os.path.join(path, "CURRENT"), encoding="ascii") as file:
        return file.read().strip()


@pytest.mark.parametrize("compact_bytes", [1, 64 << 20],
                         ids=["later_log", "same_log"])
def test_log_backup_restored_in_place_wins_over_journal(
        path, tmp_path, caplog, compact_bytes):
    go = tmp_path / "go"
    backup = tmp_path / "backup"
    process, reader = start_two_step_publisher(path, compact_bytes, go)
    try:
        reader.wait_for("ready")
        shutil.copytree(path, backup)
        go.touch()
        reader.wait_for("second")
        old = journal_name(path)
        log_at_crash = read_current(path)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        reader.stop()
    # compact_bytes=1 writes a new log at every operation; the default
    # keeps appending to the log of the backup.
    same_log = read_current(backup) == log_at_crash
    assert same_log == (compact_bytes != 1)
    identity = directory_identity(path)
    restore_in_place(backup, path)
    assert directory_identity(path) == identity
    assert os.path.exists(os.path.join(SHM_DIR, PREFIX + old))

    with caplog.at_level("WARNING", logger="mqs.broker._log_shared"):
        broker = mqs.Broker(backend="log", path=path)
    try:
        assert broker.stats("old")["stored"] == 1
        consumer = broker.consume("old", "g")
        assert [message.body for message in consumer.get_many(
            10, timeout=0)] == ["first"]
        consumer.close(drain=False)
    finally:
        broker.close()
    warnings = [record.getMessage() for record in caplog.records
                if "discarded journal" in record.getMessage()]
    assert len(warnings) == 1
    assert str(path) in warnings[0]
    assert old in warnings[0]
    expected = "ends at offset" if same_log else "incarnation id"
    assert expected in warnings[0]


def test_log_crash_keeps_journal_ahead_of_log(path, tmp_path):
    """The writer is stopped, so the journal contains a publish of another
    process that the log lacks; after both die the journal wins."""
    go = tmp_path / "go"
    writer, reader = start_two_step_publisher(path, 64 << 20, go)
    other = None
    try:
        reader.wait_for("ready")
        # Let the writer's log thread go idle, then stop it.
        time.sleep(0.5)
        writer.send_signal(signal.SIGSTOP)
        other = subprocess.run(
            [sys.executable, "-c",
             "import os, sys, mqs\n"
             "broker = mqs.Broker(backend='log', path=sys.argv[1],"
             " fsync='interval')\n"
             "broker.publish('old', 'only in the journal')\n"
             "os._exit(0)\n", str(path)],
            capture_output=True, text=True, timeout=60)
        assert other.returncode == 0, other.stderr
        # The log alone (read through a copy, which gets its own journal)
        # has one message.
        copy = tmp_path / "copy"
        shutil.copytree(path, copy)
        try:
            assert stored_after_open(copy) == 1
        finally:
            unlink_journal(copy)
        writer.send_signal(signal.SIGKILL)
        writer.wait(30)
    finally:
        reader.stop()

    old = journal_name(path)
    broker = mqs.Broker(backend="log", path=path)
    try:
        assert journal_name(path) == old
        assert broker.stats("old")["stored"] == 2
    finally:
        broker.close()
    assert journal_files(path) == []


def test_log_backup_restored_while_open_stops_broker(path, tmp_path):
    backup = tmp_path / "backup"
    broker = mqs.Broker(backend="log", path=path, fsync="always",
                        compact_bytes=1)
    try:
        broker.declare_topic("old")
        broker.publish("old", "first")
        shutil.copytree(path, backup)
        # compact_bytes=1: this publish writes a new log.
        broker.publish("old", "second")
        assert read_current(path) != read_current(backup)
        restore_in_place(backup, path)

        # stats writes nothing, so the writer's thread finds the log
        # replaced (it checks CURRENT every 0.5 s).
        deadline = time.monotonic() + 30
        with pytest.raises(mqs.BackendUnavailable,
                           match="log in the directory was replaced"):
            while True:
                broker.stats("old")
                assert time.monotonic() < deadline, \
                    "no BackendUnavailable in 30 s"
                time.sleep(0.05)
        with pytest.raises(mqs.BackendUnavailable,
                           match="log in the directory was replaced"):
            broker.publish("old", "after the restore")
    finally:
        broker.close()
    # The close removed the journal and wrote nothing.
    assert journal_files(path) == []
    assert stored_after_open(path) == 1


def test_log_mismatch_cases(path):
    broker = mqs.Broker(backend="log", path=path)
    broker.declare_topic("old")
    broker.publish("old", "kept")
    broker.close()
    name = read_current(path)
    incarnation, end = _read_log(str(path), name)
    assert incarnation != 0
    number = int(name[4:])

    def words(version=2, log_id=incarnation, log_end=end, next_id=0,
              log_number=number):
        return [0, 0, version, log_number, log_id, log_end, next_id]

    accepted = {
        "same log": words(),
        "log longer than the journal knows": words(log_end=end - 1),
        "log that a snapshot was switching to": words(
            log_id=incarnation + 1, log_end=end + 5, next_id=incarnation),
        "durable file of an older mqs": words(version=0, log_id=7),
        "journal that never wrote a log": words(log_id=0),
    }
    for case, case_words in accepted.items():
        assert _log_mismatch(str(path), case_words) is None, case
    rejected = {
        "shorter log": (words(log_end=end + 1), "ends at offset"),
        "other log": (words(log_id=incarnation + 1), "incarnation id"),
    }
    for case, (case_words, reason) in rejected.items():
        problem = _log_mismatch(str(path), case_words)
        assert problem is not None, case
        assert reason in problem, case

    os.unlink(os.path.join(path, "CURRENT"))
    problem = _log_mismatch(str(path), words())
    assert problem is not None
    assert "no CURRENT file" in problem


def test_log_durable_file_of_older_mqs_keeps_journal(path):
    old = crash_publisher(path, "sigkill")
    durable = os.path.join(SHM_DIR, PREFIX + old + ".durable")
    # An older mqs stored only the first two words.
    with open(durable, "r+b") as file:
        file.seek(16)
        file.write(bytes(40))

    broker = mqs.Broker(backend="log", path=path)
    try:
        assert journal_name(path) == old
        assert broker.stats("old")["stored"] == 1
        with open(durable, "rb") as file:
            version = int.from_bytes(file.read(24)[16:], sys.byteorder)
        assert version == 2
    finally:
        broker.close()


def test_log_backup_restored_before_takeover_stops_broker(path, tmp_path,
                                                          caplog):
    """A writer dies after a backup of its own log was restored under it:
    the process that takes over finds the log shorter than the journal's
    writer left it."""
    go = tmp_path / "go"
    backup = tmp_path / "backup"
    writer, reader = start_two_step_publisher(path, 64 << 20, go)
    try:
        reader.wait_for("ready")
        broker = mqs.Broker(backend="log", path=path)
        try:
            shutil.copytree(path, backup)
            go.touch()
            reader.wait_for("second")
            assert broker.stats("old")["stored"] == 2
            # Stopped, the writer keeps its lock while the backup of its
            # log (same name, one record less) is copied back.
            writer.send_signal(signal.SIGSTOP)
            assert read_current(path) == read_current(backup)
            restore_in_place(backup, path)
            writer.send_signal(signal.SIGKILL)
            writer.wait(30)

            deadline = time.monotonic() + 30
            with caplog.at_level("ERROR", logger="mqs.broker._log_shared"), \
                    pytest.raises(mqs.BackendUnavailable,
                                  match="log in the directory was replaced"):
                while True:
                    broker.stats("old")
                    assert time.monotonic() < deadline, \
                        "no BackendUnavailable in 30 s"
                    time.sleep(0.05)
            errors = [record.getMessage() for record in caplog.records
                      if "log changed" in record.getMessage()]
            assert len(errors) == 1
            assert "ends at offset" in errors[0]
        finally:
            broker.close()
    finally:
        reader.stop()
    assert journal_files(path) == []
    assert stored_after_open(path) == 1


def test_log_backup_of_same_log_restored_before_close(path, tmp_path):
    """The backup is copied over the segments that the writer appends to;
    the snapshot of the last close finds the log shorter and writes
    nothing."""
    backup = tmp_path / "backup"
    broker = mqs.Broker(backend="log", path=path, fsync="always")
    try:
        broker.declare_topic("old")
        broker.publish("old", "first")
        shutil.copytree(path, backup)
        broker.publish("old", "second")
        assert read_current(path) == read_current(backup)
        restore_in_place(backup, path)
    finally:
        broker.close()
    assert journal_files(path) == []
    assert stored_after_open(path) == 1
