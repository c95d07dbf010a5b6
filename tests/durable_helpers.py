"""Fixtures of the durable SharedQueue tests (test_shared_durable.py and
test_shared_persist.py), and child-process helpers that other
SharedQueue tests use too.

Children run as separate interpreters; every helper that waits on one
has a time bound and kills it by PID before the test fails.
"""

import glob
import os
import queue
import subprocess
import sys
import textwrap
import uuid

import pytest

CHILD_TIMEOUT_S = 60
SHM_DIR = "/dev/shm"


@pytest.fixture
def shm_name():
    """Return a queue name unique to this test; remove its files after."""
    name = f"test-durable-{uuid.uuid4().hex[:16]}"
    yield name
    # The ring, and the note naming a durable queue's log directory.
    for pattern in (f"mqs.{name}*", f"mqs-persist.{name}*"):
        for path in glob.glob(os.path.join(SHM_DIR, pattern)):
            os.unlink(path)


@pytest.fixture
def log_dir(tmp_path):
    return str(tmp_path / "queue-log")


def drain(q, timeout=0.5):
    """Get messages until none arrives for `timeout` seconds."""
    out = []
    while True:
        try:
            out.extend(q.get_many(1000, timeout=timeout))
        except queue.Empty:
            return out


def run_child(code, env_extra=None):
    """Start `code` (dedented) in a new interpreter with piped output."""
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def communicate(proc, timeout=CHILD_TIMEOUT_S):
    """Wait for `proc`; return (exit status, stdout, stderr)."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"child {proc.pid} did not finish in {timeout} s\n"
                    f"stdout: {stdout}\nstderr: {stderr}")
    return proc.returncode, stdout, stderr


def finish(proc, timeout=CHILD_TIMEOUT_S):
    """Wait for `proc`, check that it exited with status 0, return its
    stdout."""
    status, stdout, stderr = communicate(proc, timeout)
    assert status == 0, stderr
    return stdout


def kill_all(procs):
    """SIGKILL and reap every process of `procs` still running."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
