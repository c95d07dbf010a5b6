"""Start and join forked children in the broker tests.

Children are forked, so their targets may be any module-level function
of the test file and see the parent's imports.
"""

import multiprocessing

import pytest

FORK = multiprocessing.get_context("fork")


def start(target, *args):
    """Start `target(*args)` in a forked daemon process; return it."""
    process = FORK.Process(target=target, args=args, daemon=True)
    process.start()
    return process


def join(process, timeout=60):
    """Join a child; kill it and fail if it outlives `timeout`."""
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        pytest.fail(f"child {process.pid} did not finish in {timeout} s")
    assert process.exitcode == 0, f"child exit code {process.exitcode}"
