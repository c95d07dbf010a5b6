"""Build the plain C test of the shared topic core and run it.

tests/c/test_topiccore.c drives csrc/mqs_topiccore.h on MAP_SHARED
memory. It is compiled with failpoints (MQS_FAILPOINTS) in three builds:
optimised with warnings as errors, AddressSanitizer with
UndefinedBehaviorSanitizer, and ThreadSanitizer (threads mode only).

- units: publish, fetch, ack, prefetch, weighted and strict lanes, ack
  deadlines, max_attempts, nack, release, closing consumers, groups
  started at "earliest" and "latest", every operation but release
  working while malloc fails, and importing a saved state (mirrors that
  a repair leaves unchanged, delivery order, and rejected input).
- crash: a child SIGKILLed at a failpoint while it holds the mutex; the
  parent gets EOWNERDEAD, the repair rebuilds the lanes, and every
  message that was not acked is delivered once more, nothing twice. The
  repaired counters match the entries: a child killed after counting an
  ack or a delivery but before the entry changed leaves no count. A
  child killed while importing a saved state leaves what it committed.
- threads: a producer and a consumer thread; each message acked once.
"""

import c_build
import pytest

pytestmark = pytest.mark.c

SOURCES = [c_build.C_TESTS / "test_topiccore.c",
           c_build.CSRC / "mqs_topiccore.c"]
# --wrap=malloc lets the units make malloc fail.
FLAGS = ["-DMQS_FAILPOINTS=1", "-Wl,--wrap=malloc"]
TIMEOUT_SECONDS = 300
KILL_POINTS = ["tc_publish_before_commit", "tc_publish_after_commit",
               "tc_fetch_after_commit", "tc_fetch_after_count",
               "tc_fetch_after_count:3", "tc_ack_after_count",
               "tc_finish_before_free",
               "tc_open_group_before_commit", "tc_requeue_after_leave:2",
               "tc_import_message_after_commit:2",
               "tc_import_dead_after_commit"]


@pytest.fixture(scope="module", params=list(c_build.BUILD_FLAGS))
def binary(request, tmp_path_factory):
    name = request.param
    path = tmp_path_factory.mktemp(f"c-topiccore-{name}") / "test_topiccore"
    c_build.compile_c(name, SOURCES, path, FLAGS)
    return name, path


def run(binary, args):
    name, path = binary
    result = c_build.run_c([str(path), *args], TIMEOUT_SECONDS)
    output = c_build.assert_clean(result, f"test_topiccore {args[0]} ({name})")
    assert result.stdout.rstrip().endswith(" passed, 0 failed"), output
    return result.stdout


def test_c_topiccore_units(binary):
    if binary[0] == "tsan":
        pytest.skip("single-threaded: the other builds cover it")
    run(binary, ["units"])


@pytest.mark.parametrize("point", KILL_POINTS)
def test_c_topiccore_crash(binary, point):
    if binary[0] == "tsan":
        pytest.skip("a forked child: the other builds cover it")
    run(binary, ["crash", point])


def test_c_topiccore_threads(binary):
    messages = int(20_000 * c_build.scale_factor())
    run(binary, ["threads", str(max(messages, 100))])
