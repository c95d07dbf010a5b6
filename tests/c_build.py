"""Compile and run the plain C tests in tests/c/ (shared by test_c_*.py).

Builds: "plain" (-O2), "asan-ubsan" (AddressSanitizer with
UndefinedBehaviorSanitizer) and "tsan" (ThreadSanitizer). All builds use
-Wall -Wextra -Werror. A run passes when it exits with status 0 and
prints no sanitizer report.
"""

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
C_TESTS = ROOT / "tests" / "c"
GCC = shutil.which("gcc")

COMMON_FLAGS = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-pthread",
                f"-I{CSRC}"]
if platform.machine() == "x86_64":
    COMMON_FLAGS.append("-mcx16")  # 16-byte CAS in mqs_atomic.h
BUILD_FLAGS = {
    "plain": ["-O2"],
    "asan-ubsan": [
        "-O1",
        "-g",
        "-fno-omit-frame-pointer",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
    ],
    # -Wno-tsan: gcc warns that ThreadSanitizer does not model
    # atomic_thread_fence. The seq_cst fences in mqs_wait.h only order a
    # store before a load between waiter and signaller; data is published
    # with release/acquire pairs, which ThreadSanitizer does check.
    "tsan": ["-O1", "-g", "-fsanitize=thread", "-Wno-tsan"],
}
SANITIZER_ENV = {
    "ASAN_OPTIONS": "halt_on_error=1:detect_leaks=1",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    "TSAN_OPTIONS": "halt_on_error=1:second_deadlock_stack=1",
}
# Text that only a sanitizer report contains.
SANITIZER_MARKERS = ("Sanitizer", "runtime error:")
COMPILE_TIMEOUT_SECONDS = 300


def scale_factor():
    """Return MQS_TEST_SCALE as a float, failing the test if it is bad."""
    text = os.environ.get("MQS_TEST_SCALE", "1")
    try:
        scale = float(text)
    except ValueError:
        scale = -1.0
    if not 0 < scale <= 1000:
        pytest.fail(f"MQS_TEST_SCALE must be a number above 0 and at most "
                    f"1000, got {text!r}")
    return scale


def compile_c(build, sources, binary, extra_flags=()):
    """Compile `sources` (paths) in `build` into `binary`; return binary.

    Skips the test when gcc is missing and fails it when gcc fails.
    """
    if GCC is None:
        pytest.skip("gcc not found on PATH; the C tests need it")
    command = [GCC, *COMMON_FLAGS, *BUILD_FLAGS[build], *extra_flags,
               *map(str, sources), "-o", str(binary)]
    result = subprocess.run(command, capture_output=True, text=True,
                            timeout=COMPILE_TIMEOUT_SECONDS, check=False)
    if result.returncode != 0:
        pytest.fail(f"gcc failed ({build} build):\n{' '.join(command)}\n"
                    f"{result.stderr}")
    return binary


def run_c(command, timeout, env=None, stdin=None):
    """Run a compiled test with the sanitizer options; return the result.

    `stdin`, a str, is written to the test's standard input.
    """
    env = {**os.environ, **SANITIZER_ENV, **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True,
                            timeout=timeout, env=env, check=False,
                            input=stdin)
    # gcc 12's ThreadSanitizer supports at most 30 bits of mmap ASLR
    # entropy on x86_64. Kernels configured with vm.mmap_rnd_bits=32 can
    # place a mapping inside its fixed shadow range, and it aborts at
    # start with "unexpected memory mapping". Running the binary without
    # ASLR (setarch -R) avoids that and needs no privileges. See
    # https://github.com/google/sanitizers/issues/1716
    if (result.returncode != 0
            and "unexpected memory mapping" in result.stderr
            and shutil.which("setarch")):
        result = subprocess.run(
            ["setarch", platform.machine(), "-R", *command],
            capture_output=True, text=True, timeout=timeout, env=env,
            check=False, input=stdin)
    return result


def assert_clean(result, what):
    """Assert exit status 0 and no sanitizer report, showing the output."""
    output = (f"stdout:\n{result.stdout[-4000:]}\n"
              f"stderr:\n{result.stderr[-8000:]}")
    assert result.returncode == 0, (
        f"{what} exited with status {result.returncode}\n{output}")
    for marker in SANITIZER_MARKERS:
        assert marker not in result.stderr, (
            f"{what} printed a sanitizer report\n{output}")
    return output
