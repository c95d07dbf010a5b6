"""Build the plain C tests of the ring with gcc and run them.

tests/c/test_ring.c (single-threaded unit tests of csrc/mqs_ring.h and
csrc/mqs_wait.h) and tests/c/stress_ring.c (producers and readers on
threads) are compiled three ways: an optimised build with warnings as
errors, AddressSanitizer with UndefinedBehaviorSanitizer, and
ThreadSanitizer. Each binary must exit with status 0 and print no
sanitizer report.

MQS_TEST_SCALE scales the stress runs: the optimised build pushes up to
1,000,000 * MQS_TEST_SCALE records per run, each sanitizer build up to
200,000 * MQS_TEST_SCALE (tests/c/stress_ring.c lists the runs).
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
    # atomic_thread_fence. The seq_cst fences in mqs_wait.h only order a
    # store before a load between waiter and signaller. The ring's data
    # is published with release/acquire pairs, which TSan does check.
    "tsan": ["-O1", "-g", "-fsanitize=thread", "-Wno-tsan"],
}
SANITIZER_ENV = {
    "ASAN_OPTIONS": "halt_on_error=1:detect_leaks=1",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    "TSAN_OPTIONS": "halt_on_error=1:second_deadlock_stack=1",
}
# Text that only a sanitizer report contains.
SANITIZER_MARKERS = ("Sanitizer", "runtime error:")

RECORDS_PER_SCALE = {"plain": None, "asan-ubsan": 200_000, "tsan": 200_000}
UNIT_TIMEOUT_SECONDS = 120


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
def build(request, tmp_path_factory):
    """Compile both C tests in one build; return (name, {binary: path}).

    Binaries go to a fresh temporary directory, so test runs started at
    the same time in one checkout never overwrite each other's files.
    """
    if GCC is None:
        pytest.skip("gcc not found on PATH; the C tests of the ring need it")
    name = request.param
    out_dir = tmp_path_factory.mktemp(f"c-{name}")
    binaries = {}
    for source in ("test_ring", "stress_ring"):
        binary = out_dir / source
        command = [
            GCC, *COMMON_FLAGS, *BUILD_FLAGS[name], f"-I{CSRC}",
            str(C_TESTS / f"{source}.c"), str(CSRC / "mqs_ring.c"),
            "-o", str(binary),
        ]
        result = subprocess.run(command, capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            pytest.fail(f"gcc failed for {source} ({name} build):\n"
                        f"{' '.join(command)}\n{result.stderr}")
        binaries[source] = binary
    return name, binaries


def _run(command, timeout):
    env = {**os.environ, **SANITIZER_ENV}
    result = subprocess.run(command, capture_output=True, text=True,
                            timeout=timeout, env=env)
    # gcc 12's ThreadSanitizer supports at most 30 bits of mmap ASLR
    # entropy on x86_64. Kernels configured with vm.mmap_rnd_bits=32 can
    # place a mapping inside its fixed shadow range, and it aborts at
    # start with "unexpected memory mapping". Running the binary without
    # ASLR (setarch -R) avoids that and needs no privileges; newer LLVM
    # runtimes re-exec themselves this way. See
    # https://github.com/google/sanitizers/issues/1716
    if (result.returncode != 0
            and "unexpected memory mapping" in result.stderr
            and shutil.which("setarch")):
        result = subprocess.run(
            ["setarch", platform.machine(), "-R", *command],
            capture_output=True, text=True, timeout=timeout, env=env)
    return result


def _assert_clean(result, what):
    output = f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-8000:]}"
    assert result.returncode == 0, (
        f"{what} exited with status {result.returncode}\n{output}")
    for marker in SANITIZER_MARKERS:
        assert marker not in result.stderr, (
            f"{what} printed a sanitizer report\n{output}")


def test_c_ring_unit_tests_pass(build):
    name, binaries = build
    result = _run([str(binaries["test_ring"])], UNIT_TIMEOUT_SECONDS)
    _assert_clean(result, f"test_ring ({name} build)")
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line.endswith(" passed, 0 failed"), result.stdout


@pytest.mark.stress
def test_c_ring_stress_passes(build):
    name, binaries = build
    scale = _scale()
    # The binary's own watchdog fires first and prints each thread's
    # progress; the subprocess timeout is the backstop.
    watchdog_seconds = int(100 * max(1.0, scale))
    command = [str(binaries["stress_ring"]),
               "--timeout-seconds", str(watchdog_seconds)]
    if RECORDS_PER_SCALE[name] is not None:
        records = max(1000, int(RECORDS_PER_SCALE[name] * scale))
        command += ["--records", str(records)]
    result = _run(command, watchdog_seconds + 60)
    _assert_clean(result, f"stress_ring ({name} build)")
    assert result.stdout.strip().splitlines()[-1] == (
        "passed: 0 failed checks"), result.stdout
