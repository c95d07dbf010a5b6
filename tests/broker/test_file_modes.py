"""Tests that every file mqs creates is owner-only.

The shm journal, its snapshots, tails and adopted core states, the log
broker's directory and the durable SharedQueue's files hold message
bodies, so only their owner may read them. Each test runs with umask 0,
so a file that relies on the umask for its mode shows up as readable by
others.
"""

import glob
import os
import stat
import uuid

import pytest

import mqs
from mqs.broker._log_shared import _path_prefix
from mqs.broker._shm import SHM_DIR


@pytest.fixture(autouse=True)
def no_umask():
    """Set the process umask to 0 for the test, then restore it."""
    old = os.umask(0)
    yield
    os.umask(old)


@pytest.fixture
def name():
    """Return a fresh broker or queue name; a broker of that name is
    unlinked after the test."""
    fresh = f"test-modes-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield fresh
    mqs.Broker.unlink(fresh)


def modes_under(paths):
    """Return ``{path: permission bits}`` of `paths` and, for each
    directory among them, of everything below it."""
    modes = {}
    for path in paths:
        modes[path] = stat.S_IMODE(os.stat(path).st_mode)
        for root, directories, files in os.walk(path):
            for entry in directories + files:
                full = os.path.join(root, entry)
                modes[full] = stat.S_IMODE(os.stat(full).st_mode)
    return modes


def assert_owner_only(modes):
    assert modes
    for path, mode in modes.items():
        expected = 0o700 if os.path.isdir(path) else 0o600
        assert (path, oct(mode)) == (path, oct(expected))


def shm_broker_files(name):
    return glob.glob(os.path.join(SHM_DIR, f"mqs.broker.{name}*"))


def test_shm_broker_files_owner_only(name):
    broker = mqs.Broker(backend="shm", name=name, journal_bytes=1 << 16)
    broker.declare_topic("t")
    consumer = broker.consume("t", "g", prefetch=1, ack_timeout=600)
    broker.publish("t", "on the core")
    core_modes = modes_under(shm_broker_files(name))
    assert any(".core-" in path for path in core_modes)
    assert_owner_only(core_modes)

    # A keyed message moves the topic to the journal through an adopted
    # state file, which stays until the next snapshot.
    broker.publish("t", "keyed", key="k")
    moved_modes = modes_under(shm_broker_files(name))
    assert any(".adopt-" in path for path in moved_modes)
    assert_owner_only(moved_modes)

    # Enough records to wrap the small journal: snapshots and tails.
    for number in range(3000):
        broker.publish("t", number)
    wrapped_modes = modes_under(shm_broker_files(name))
    assert any(".snapshot-" in path for path in wrapped_modes)
    assert_owner_only(wrapped_modes)
    consumer.close()
    broker.close()


def test_log_broker_files_owner_only(tmp_path):
    path = tmp_path / "broker"
    broker = mqs.Broker(backend="log", path=path, segment_bytes=1 << 20,
                        compact_bytes=1 << 16, journal_bytes=1 << 16)
    consumer = broker.consume("t", "g", prefetch=1, ack_timeout=600)
    first_log = set(os.listdir(path))
    for number in range(2000):
        broker.publish("t", b"x" * 200, key=number % 7)
    shm_files = glob.glob(os.path.join(
        SHM_DIR, f"mqs.broker.{_path_prefix(path)}*"))
    assert any(".snapshot-" in shm_file for shm_file in shm_files)
    modes = modes_under([str(path)] + shm_files)
    assert "CURRENT" in first_log
    # A compaction writes the state into a new log and points CURRENT
    # at it.
    assert set(os.listdir(path)) != first_log
    assert_owner_only(modes)
    consumer.close()
    broker.close()
    assert_owner_only(modes_under([str(path)]))


def test_durable_shared_queue_files_owner_only(tmp_path, name):
    path = tmp_path / "queue"
    queue = mqs.SharedQueue(name=name, persist=str(path))
    queue.put(b"later", delay=60)
    queue.put(b"now")
    assert queue.get(timeout=5) == b"now"
    shm_files = glob.glob(os.path.join(SHM_DIR, f"mqs*.{name}"))
    assert len(shm_files) >= 1
    assert_owner_only(modes_under([str(path)] + shm_files))
    queue.unlink()
    queue.close()
