"""Build the plain C tests of the timing wheel with a C compiler and run them.

tests/c/test_wheel.c (unit tests of csrc/mqs_wheel.h and a seeded random
comparison with a brute-force model) is compiled two ways: an optimised
build with warnings as errors, and AddressSanitizer with
UndefinedBehaviorSanitizer and the MQS_DEBUG assertions. Each binary must
exit with status 0 and print no sanitizer report. The wheel is
single-threaded, so there is no ThreadSanitizer build.
"""

import pytest

import c_build

pytestmark = pytest.mark.c

SOURCES = [c_build.C_TESTS / "test_wheel.c", c_build.CSRC / "mqs_wheel.c"]
# The sanitizer build also turns on the wheel's MQS_DEBUG assertions.
EXTRA_FLAGS = {"plain": [], "asan-ubsan": ["-DMQS_DEBUG=1"]}
TIMEOUT_SECONDS = 300


@pytest.mark.parametrize("build", sorted(EXTRA_FLAGS))
def test_c_wheel(build, tmp_path):
    binary = c_build.compile_c(build, SOURCES, tmp_path / f"test_wheel_{build}",
                               EXTRA_FLAGS[build])
    result = c_build.run_c([str(binary)], TIMEOUT_SECONDS)
    output = c_build.assert_clean(result, f"test_wheel ({build} build)")
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line.endswith(" passed, 0 failed"), output
