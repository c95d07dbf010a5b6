"""Build the plain C test of the shared delayed area and run it.

tests/c/test_delay.c drives csrc/mqs_delay.h on a real shared ring in a
memfd. It is compiled with failpoints (MQS_FAILPOINTS) in three builds:
optimised with warnings as errors, AddressSanitizer with
UndefinedBehaviorSanitizer, and ThreadSanitizer (threads mode only).

- units: size classes, filling the area, reuse of freed blocks, maxsize.
- script: hypothesis writes random scripts of puts, clock moves, promotes
  and child processes SIGKILLed at a failpoint while they hold the
  delay lock; the output is checked against a model: every accepted
  message is delivered exactly once (twice only for the one a mover died
  right after publishing), never before it is due, never later than the
  first promote after it is due, and in (due time, put order) within
  one promote.
- threads: producer and consumer threads on the real clock.
"""

import c_build
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.c

SOURCES = [c_build.C_TESTS / "test_delay.c", c_build.CSRC / "mqs_delay.c",
           c_build.CSRC / "mqs_bytering.c", c_build.CSRC / "mqs_wheel.c"]
FLAGS = ["-DMQS_FAILPOINTS=1"]
TIMEOUT_SECONDS = 300
KILL_POINTS = ["delay_put_before_insert", "delay_before_move",
               "delay_after_move"]
# Script runs per build; the sanitizer builds start slower.
EXAMPLES = {"plain": 60, "asan-ubsan": 25}


@pytest.fixture(scope="module", params=list(c_build.BUILD_FLAGS))
def binary(request, tmp_path_factory):
    name = request.param
    path = tmp_path_factory.mktemp(f"c-delay-{name}") / "test_delay"
    c_build.compile_c(name, SOURCES, path, FLAGS)
    return name, path


def run(binary, args, stdin=None):
    name, path = binary
    result = c_build.run_c([str(path), *args], TIMEOUT_SECONDS,
                           stdin=stdin)
    output = c_build.assert_clean(result, f"test_delay {args[0]} ({name})")
    assert result.stdout.rstrip().endswith(" passed, 0 failed"), output
    return result.stdout


def test_c_delay_units(binary):
    if binary[0] == "tsan":
        pytest.skip("single-threaded: the other builds cover it")
    run(binary, ["units"])


def test_c_delay_threads(binary):
    scale = c_build.scale_factor()
    messages = max(2000, int(20_000 * scale))
    if binary[0] != "plain":
        messages = max(1000, messages // 4)
    run(binary, ["threads", "2", "2", str(messages)])


# -- script model ------------------------------------------------------------

put_op = st.tuples(st.just("put"), st.integers(0, 15),
                   st.sampled_from([8, 8, 24, 100, 600, 3000]))
time_op = st.tuples(st.just("time"), st.integers(0, 10))
promote_op = st.just(("promote",))
kill_op = st.tuples(st.just("kill"), st.sampled_from(KILL_POINTS),
                    st.integers(0, 15))
scripts = st.lists(st.one_of(put_op, put_op, put_op, time_op, time_op,
                             promote_op, kill_op),
                   min_size=5, max_size=80)


def render(ops):
    """Return the script text and the put ids in order."""
    now = 0
    next_id = 1
    lines = []
    for op in ops:
        if op[0] == "put":
            lines.append(f"put {next_id} {now + op[1]} {op[2]}")
            next_id += 1
        elif op[0] == "time":
            now += op[1]
            lines.append(f"time {now}")
        elif op[0] == "promote":
            lines.append("promote")
        else:
            lines.append(f"kill {op[1]} {next_id} {now + op[2]} 8")
            next_id += 1
    lines.append("time 1000000")
    lines.append("promote")
    return "\n".join(lines) + "\n"


def check_output(script, stdout):
    """Compare one script run with the model; assert on any difference."""
    due = {}
    accepted = set()
    delivered = {}
    waiting = set()
    after_move_kills = 0
    now = 0
    events = stdout.splitlines()
    position = 0
    for line in script.splitlines():
        words = line.split()
        if words[0] == "time":
            now = int(words[1])
        elif words[0] == "put":
            ident = int(words[1])
            due[ident] = int(words[2])
            result = events[position].split()
            position += 1
            assert result[:2] == ["put", words[1]], (line, result)
            # 0, or -1 (full) once large puts have filled the 64 KiB area.
            assert result[2] in ("0", "-1"), (line, result)
            if result[2] == "0":
                accepted.add(ident)
                waiting.add(ident)
        elif words[0] == "kill":
            point = words[1]
            assert events[position] in (f"killed {point}",
                                        f"survived {point}"), line
            died = events[position] == f"killed {point}"
            position += 1
            if point == "delay_put_before_insert":
                # The put dies unless the area was full before it.
                continue
            # A mover reaches its point exactly when something is due.
            assert died == any(due[i] <= now for i in waiting), line
            after_move_kills += died and point == "delay_after_move"
        else:
            while events[position].startswith("got "):
                ident = int(events[position].split()[1])
                position += 1
                assert ident in accepted, (line, ident)
                # Never early.
                assert due[ident] <= now, (line, ident, due[ident], now)
                delivered[ident] = delivered.get(ident, 0) + 1
                waiting.discard(ident)
            assert events[position] == "promoted", events[position:]
            position += 1
            # Nothing due is left behind by a promote.
            assert not [i for i in waiting if due[i] <= now], line
    assert events[position].startswith("rebuilds "), events[position:]
    # Exactly once, except a message whose mover died right after it was
    # published, which may come twice.
    assert set(delivered) == accepted
    duplicates = sum(n - 1 for n in delivered.values())
    assert duplicates <= after_move_kills


def test_c_delay_scripts_match_model(binary):
    if binary[0] not in EXAMPLES:
        pytest.skip("single-threaded: the other builds cover it")

    @settings(deadline=None, max_examples=EXAMPLES[binary[0]],
              suppress_health_check=[HealthCheck.too_slow,
                                     HealthCheck.function_scoped_fixture],
              derandomize=True)
    @given(ops=scripts)
    def check(ops):
        script = render(ops)
        stdout = run(binary, ["script"], stdin=script)
        check_output(script, stdout)

    check()
