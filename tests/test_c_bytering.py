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

import pytest

import c_build

pytestmark = pytest.mark.c

# history_size=7 keeps enough history to show both stacks of a report,
# which the suppression file needs to match.
TSAN_OPTIONS = (
    "halt_on_error=1:history_size=7:"
    f"suppressions={c_build.C_TESTS / 'bytering.tsan.supp'}"
)
MESSAGES_PER_SCALE = {"plain": 200_000, "asan-ubsan": 50_000, "tsan": 50_000}


@pytest.fixture(scope="module", params=list(c_build.BUILD_FLAGS))
def binary(request, tmp_path_factory):
    """Compile tests/c/test_bytering.c in one build; return (name, path).

    Each build goes to a fresh temporary directory, so test runs started
    at the same time in one checkout never overwrite each other's files.
    """
    name = request.param
    path = tmp_path_factory.mktemp(f"c-bytering-{name}") / "test_bytering"
    c_build.compile_c(name, [c_build.C_TESTS / "test_bytering.c",
                             c_build.CSRC / "mqs_bytering.c"], path)
    return name, path


def test_c_bytering_passes_clean(binary):
    name, path = binary
    scale = c_build.scale_factor()
    messages = max(1000, int(MESSAGES_PER_SCALE[name] * scale))
    # The binary's own deadline fires first and prints each producer's
    # progress; the subprocess timeout is the backstop.
    deadline_seconds = int(120 * max(1.0, scale))
    result = c_build.run_c(
        [str(path), "--records", str(messages),
         "--timeout-seconds", str(deadline_seconds)],
        deadline_seconds + 60, env={"TSAN_OPTIONS": TSAN_OPTIONS})
    output = c_build.assert_clean(result, f"test_bytering ({name} build)")
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line.endswith(" passed, 0 failed"), output
