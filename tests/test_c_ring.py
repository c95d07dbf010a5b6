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

import pytest

import c_build

pytestmark = pytest.mark.c

RECORDS_PER_SCALE = {"plain": None, "asan-ubsan": 200_000, "tsan": 200_000}
UNIT_TIMEOUT_SECONDS = 120


@pytest.fixture(scope="module", params=list(c_build.BUILD_FLAGS))
def build(request, tmp_path_factory):
    """Compile both C tests in one build; return (name, {binary: path}).

    Binaries go to a fresh temporary directory, so test runs started at
    the same time in one checkout never overwrite each other's files.
    """
    name = request.param
    out_dir = tmp_path_factory.mktemp(f"c-{name}")
    binaries = {}
    for source in ("test_ring", "stress_ring"):
        binaries[source] = c_build.compile_c(
            name, [c_build.C_TESTS / f"{source}.c",
                   c_build.CSRC / "mqs_ring.c"],
            out_dir / source)
    return name, binaries


def test_c_ring_unit_tests_pass(build):
    name, binaries = build
    result = c_build.run_c([str(binaries["test_ring"])], UNIT_TIMEOUT_SECONDS)
    c_build.assert_clean(result, f"test_ring ({name} build)")
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line.endswith(" passed, 0 failed"), result.stdout


@pytest.mark.stress
def test_c_ring_stress_passes(build):
    name, binaries = build
    scale = c_build.scale_factor()
    # The binary's own watchdog fires first and prints each thread's
    # progress; the subprocess timeout is the backstop.
    watchdog_seconds = int(100 * max(1.0, scale))
    command = [str(binaries["stress_ring"]),
               "--timeout-seconds", str(watchdog_seconds)]
    if RECORDS_PER_SCALE[name] is not None:
        records = max(1000, int(RECORDS_PER_SCALE[name] * scale))
        command += ["--records", str(records)]
    result = c_build.run_c(command, watchdog_seconds + 60)
    c_build.assert_clean(result, f"stress_ring ({name} build)")
    assert result.stdout.strip().splitlines()[-1] == (
        "passed: 0 failed checks"), result.stdout
