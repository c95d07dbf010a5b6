"""Build the plain C test of the shared byte ring with gcc and run it.

tests/c/test_bytering.c contains unit and crash-repair tests of
csrc/mqs_bytering.h on one thread, then stress runs of producer and
consumer threads, each thread a participant with its own open file
description of the ring's memfd. It is compiled three ways: an optimised
build with warnings as errors, AddressSanitizer with
UndefinedBehaviorSanitizer, and ThreadSanitizer. Each binary must exit
with status 0, report no failed check and print no sanitizer report.

MQS_TEST_SCALE scales the stress runs: the optimised build sends
200,000 * MQS_TEST_SCALE messages per run, each sanitizer build
50,000 * MQS_TEST_SCALE.
"""

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.c

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
C_TESTS = ROOT / "tests" / "c"
GCC = shutil.which("gcc")

COMMON_FLAGS = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-pthread"]
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
    # atomic_thread_fence, which mqs_wait.h uses between waiter and
    # signaller. Records are published with release/acquire pairs, which
    # ThreadSanitizer does check.
    "tsan": ["-O1", "-g", "-fsanitize=thread", "-Wno-tsan"],
}
SANITIZER_ENV = {
    "ASAN_OPTIONS": "halt_on_error=1:detect_leaks=1",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    # history_size=7 keeps enough history to show both stacks of a
    # report, which the suppression file needs to match.
    "TSAN_OPTIONS": (
        "halt_on_error=1:history_size=7:"
        f"suppressions={C_TESTS / 'bytering.tsan.supp'}"
    ),
}
# Text that only a sanitizer report contains.
SANITIZER_MARKERS = ("Sanitizer", "runtime error:")
MESSAGES_PER_SCALE = {"plain": 200_000, "asan-ubsan": 50_000, "tsan": 50_000}


def _scale():
    text = os.environ.get("MQS_TEST_SCALE", "1")
    try:
        scale = float(text)
    except ValueError:
        scale = -1.0
    if not 0 < scale <= 1000:
        pytest.fail(f"MQS_TEST_SCALE must be a number above 0 and at most "
                    f"1000, got {text!r}")
    return scale


@pytest.fixture(scope="module", params=list(BUILD_FLAGS))
def binary(request, tmp_path_factory):
    """Compile tests/c/test_bytering.c in one build; return (name, path).

    Each build goes to a fresh temporary directory, so test runs started
    at the same time in one checkout never overwrite each other's files.
    """
    if GCC is None:
        pytest.skip("gcc not found on PATH; the C tests of the ring need it")
    name = request.param
    path = tmp_path_factory.mktemp(f"c-bytering-{name}") / "test_bytering"
    command = [
        GCC, *COMMON_FLAGS, *BUILD_FLAGS[name], f"-I{CSRC}",
        str(C_TESTS / "test_bytering.c"), str(CSRC / "mqs_bytering.c"),
        "-o", str(path),
    ]
    result = subprocess.run(command, capture_output=True, text=True,
                            timeout=300, check=False)
    if result.returncode != 0:
        pytest.fail(f"gcc failed for test_bytering ({name} build):\n"
                    f"{' '.join(command)}\n{result.stderr}")
    return name, path


def _run(command, timeout):
    env = {**os.environ, **SANITIZER_ENV}
    result = subprocess.run(command, capture_output=True, text=True,
                            timeout=timeout, env=env, check=False)
    # gcc 12's ThreadSanitizer supports at most 30 bits of mmap ASLR
    # entropy on x86_64; with vm.mmap_rnd_bits=32 it can abort at start
    # with "unexpected memory mapping". Running without ASLR (setarch -R)
    # avoids that and needs no privileges. See
    # https://github.com/google/sanitizers/issues/1716
    if (result.returncode != 0
            and "unexpected memory mapping" in result.stderr
            and shutil.which("setarch")):
        result = subprocess.run(
            ["setarch", platform.machine(), "-R", *command],
            capture_output=True, text=True, timeout=timeout, env=env,
            check=False)
    return result


def test_c_bytering_passes_clean(binary):
    name, path = binary
    scale = _scale()
    messages = max(1000, int(MESSAGES_PER_SCALE[name] * scale))
    # The binary's own deadline fires first and prints each producer's
    # progress; the subprocess timeout is the backstop.
    deadline_seconds = int(120 * max(1.0, scale))
    result = _run([str(path), "--records", str(messages),
                   "--timeout-seconds", str(deadline_seconds)],
                  deadline_seconds + 60)
    output = (f"stdout:\n{result.stdout[-4000:]}\n"
              f"stderr:\n{result.stderr[-8000:]}")

    assert result.returncode == 0, (
        f"test_bytering ({name} build) exited with status "
        f"{result.returncode}\n{output}")
    for marker in SANITIZER_MARKERS:
        assert marker not in result.stderr, (
            f"test_bytering ({name} build) printed a sanitizer report\n"
            f"{output}")
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line.endswith(" passed, 0 failed"), output
