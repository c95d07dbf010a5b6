"""Tests of the fixed-rate latency measurement in `mqs.bench_latency`."""

import pytest

from mqs import bench_latency
from mqs.bench_latency import FixedRateSchedule, LatencyRecorder

MS = 1_000_000
US = 1_000


class FakeClock:
    """A nanosecond clock that moves only when told to."""

    def __init__(self, now_ns=0):
        self.now_ns = now_ns
        self.idle_calls = []

    def __call__(self):
        return self.now_ns

    def idle(self, remaining_ns):
        """Stand in for a sleep: record the wait and jump to the due time."""
        self.idle_calls.append(remaining_ns)
        self.now_ns += remaining_ns


def test_schedule_intended_times_follow_rate():
    schedule = FixedRateSchedule(1000, start_ns=5 * MS)
    assert schedule.interval_ns == MS
    assert schedule.intended_ns(0) == 5 * MS
    assert schedule.intended_ns(7) == 12 * MS


@pytest.mark.parametrize("rate", [0, -5, float("nan")])
def test_schedule_rejects_rate_not_above_zero(rate):
    with pytest.raises(ValueError, match=r"rate_per_s must be > 0, got"):
        FixedRateSchedule(rate, start_ns=0)


def test_schedule_wait_idles_until_due():
    clock = FakeClock(now_ns=500 * US)
    schedule = FixedRateSchedule(1000, start_ns=0)
    sent_ns = schedule.wait(3, clock, clock.idle)
    assert sent_ns == 3 * MS
    assert clock.idle_calls == [2500 * US]


def test_schedule_wait_returns_at_once_when_late():
    clock = FakeClock(now_ns=10 * MS)
    schedule = FixedRateSchedule(1000, start_ns=0)
    assert schedule.wait(3, clock, clock.idle) == 10 * MS
    assert clock.idle_calls == []


def run_with_stall(count, stall_index, stall_ns, delivery_ns):
    """Send `count` messages at 1,000/s on a fake clock; one put stalls.

    Every put takes `delivery_ns` until the receiver has the message; the
    put of message `stall_index` takes `stall_ns` more.
    """
    clock = FakeClock()
    schedule = FixedRateSchedule(1000, start_ns=0)
    recorder = LatencyRecorder()
    for index in range(count):
        sent_ns = schedule.wait(index, clock, clock.idle)
        if index == stall_index:
            clock.now_ns += stall_ns
        clock.now_ns += delivery_ns
        recorder.record(schedule.intended_ns(index), sent_ns, clock())
    return recorder


def test_recorder_counts_stall_for_every_message_due_during_it():
    recorder = run_with_stall(count=100, stall_index=10, stall_ns=50 * MS,
                              delivery_ns=10 * US)
    corrected = list(recorder.corrected_ns)
    uncorrected = list(recorder.uncorrected_ns)
    assert len(recorder) == 100
    # Message 10 waited out the stall; messages 11 to 60 were due during
    # it and went out back to back, each 0.99 ms less late than the one
    # before, until the sender caught up with its schedule.
    assert corrected[10] == 50 * MS + 10 * US
    assert corrected[11] == 49 * MS + 20 * US
    assert corrected[60] == 510 * US
    assert corrected[61] == 10 * US
    assert sum(value >= MS for value in corrected) == 50
    # A benchmark that timed each put from its actual send sees one stall.
    assert uncorrected[10] == 50 * MS + 10 * US
    assert sum(value >= MS for value in uncorrected) == 1
    assert uncorrected[11] == 10 * US


def test_recorder_summary_shows_stall_in_corrected_percentiles():
    recorder = run_with_stall(count=100, stall_index=10, stall_ns=50 * MS,
                              delivery_ns=10 * US)
    summary = recorder.summary()
    assert summary["corrected"]["count"] == 100
    assert summary["corrected"]["p50_ns"] == 510 * US
    assert summary["corrected"]["p90_ns"] == 40 * MS + 110 * US
    assert summary["corrected"]["p99_ns"] == 49 * MS + 20 * US
    assert summary["corrected"]["max_ns"] == 50 * MS + 10 * US
    assert summary["uncorrected"]["p99_ns"] == 10 * US
    assert summary["uncorrected"]["max_ns"] == 50 * MS + 10 * US


def test_recorder_equals_uncorrected_when_sender_on_time():
    recorder = run_with_stall(count=50, stall_index=-1, stall_ns=0,
                              delivery_ns=7 * US)
    assert list(recorder.corrected_ns) == [7 * US] * 50
    assert list(recorder.uncorrected_ns) == [7 * US] * 50


def test_recorder_extend_appends_both_series():
    first = LatencyRecorder()
    first.record(0, 5, 10)
    second = LatencyRecorder()
    second.record(100, 100, 130)
    first.extend(second)
    assert list(first.corrected_ns) == [10, 30]
    assert list(first.uncorrected_ns) == [5, 30]


def test_percentile_uses_nearest_rank():
    values = list(range(1, 1001))
    assert bench_latency.percentile(values, 0.5) == 500
    assert bench_latency.percentile(values, 0.999) == 999
    assert bench_latency.percentile(values, 1.0) == 1000
    assert bench_latency.percentile([42], 0.99) == 42


def test_percentile_rejects_empty_and_bad_fraction():
    with pytest.raises(ValueError, match=r"no values"):
        bench_latency.percentile([], 0.5)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], "
                                         r"got 1.5"):
        bench_latency.percentile([1], 1.5)


def test_summarize_reports_every_percentile():
    summary = bench_latency.summarize([40, 10, 30, 20])
    assert summary == {"count": 4, "p50_ns": 20, "p90_ns": 40, "p99_ns": 40,
                       "p99.9_ns": 40, "min_ns": 10, "max_ns": 40,
                       "mean_ns": 25.0}


def test_run_once_measures_thread_queue_in_order():
    peer = next(peer for peer in bench_latency.PEERS
                if peer.label == "mqs.SimpleQueue")
    recorder, late = bench_latency.run_once(peer, 50, rate_per_s=20_000)
    assert len(recorder) == 50
    assert 0 <= late <= 50
    assert all(value > 0 for value in recorder.uncorrected_ns)
    assert all(corrected >= uncorrected for corrected, uncorrected
               in zip(recorder.corrected_ns, recorder.uncorrected_ns,
                      strict=True))
