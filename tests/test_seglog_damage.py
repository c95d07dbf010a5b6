"""Random damage to a cleanly closed segment log, checked on reopen.

Bytes of records on disk are overwritten after a clean close. Whatever
recovery decides, a read must return the record as written or raise
`LogCorrupted`, never other data. When recovery reaches the end that the
close recorded (directly or by resynchronizing past damaged records),
every record whose bytes were not touched must read back.
"""

import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mqs

SEGMENT = 65536
HEADER = 4096
RECORD_HEADER = 32
SEALED_RECORDS = 40
RECORDS = 80


def value_for(offset):
    """Payload of record `offset`: its offset, then a pattern."""
    size = 20 + (offset * 7919) % 180
    return (offset.to_bytes(8, "little") + bytes(range(1, 256)) * 2)[:size]


def stride(value):
    return (RECORD_HEADER + len(value) + 7) // 8 * 8


def layout():
    """Return [(segment base, first offset, end offset, positions)]."""
    segments = []
    for first, end in ((0, SEALED_RECORDS), (SEALED_RECORDS, RECORDS)):
        positions, pos = [], HEADER
        for offset in range(first, end):
            positions.append(pos)
            pos += stride(value_for(offset))
        segments.append((first, first, end, positions))
    return segments


@pytest.fixture(scope="module")
def pristine():
    """A closed log: records 0-39 in a sealed segment, 40-79 in the last."""
    directory = tempfile.mkdtemp(prefix="mqs-seglog-damage-")
    path = os.path.join(directory, "log")
    with mqs.SegmentLog(path, segment_bytes=SEGMENT, fsync="never") as log:
        for offset in range(RECORDS):
            if offset == SEALED_RECORDS:
                log.roll()
            assert log.append(value_for(offset)) == offset
    yield path
    shutil.rmtree(directory)


def segment_path(path, base):
    return os.path.join(path, f"{base:020d}.seg")


# Each damage: (segment index, fraction of its record bytes, new byte).
damage_strategy = st.lists(
    st.tuples(st.integers(0, 1), st.floats(0, 1, exclude_max=True),
              st.integers(0, 255)),
    min_size=1, max_size=8)


def apply_damage(path, damage):
    """Overwrite bytes; return {segment index: set of damaged positions}."""
    damaged = {0: set(), 1: set()}
    segments = layout()
    for index, fraction, byte in damage:
        base, first, end, positions = segments[index]
        records_end = positions[-1] + stride(value_for(end - 1))
        position = HEADER + int(fraction * (records_end - HEADER))
        with open(segment_path(path, base), "r+b") as f:
            f.seek(position)
            old = f.read(1)[0]
            if old == byte:
                byte = byte % 255 + 1
            f.seek(position)
            f.write(bytes([byte]))
        damaged[index].add(position)
    return damaged


def intact_offsets(segment, damaged_positions):
    """Offsets of the segment whose bytes (padding aside) were not hit."""
    _, first, end, positions = segment
    intact = set()
    for offset, pos in zip(range(first, end), positions):
        record_end = pos + RECORD_HEADER + len(value_for(offset))
        if not any(pos <= p < record_end for p in damaged_positions):
            intact.add(offset)
    return intact


def read_all_offsets(log, end):
    """Return {offset: bytes or None for LogCorrupted} below `end`."""
    values = {}
    for offset in range(end):
        try:
            values[offset] = bytes(log.read(offset))
        except mqs.LogCorrupted:
            values[offset] = None
    return values


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=damage_strategy, readonly=st.booleans())
def test_damaged_log_never_returns_wrong_data(pristine, damage, readonly):
    with tempfile.TemporaryDirectory(prefix="mqs-seglog-damage-") as tmp:
        path = os.path.join(tmp, "log")
        shutil.copytree(pristine, path)
        damaged = apply_damage(path, damage)
        with mqs.SegmentLog(path, segment_bytes=SEGMENT, fsync="never",
                            readonly=readonly) as log:
            report = log.recovery
            end = log.end_offset
            values = read_all_offsets(log, end)
            if not readonly:
                assert log.append(b"after") == end

    assert end <= RECORDS
    for offset, value in values.items():
        assert value is None or value == value_for(offset), offset

    # The sealed segment is never cut, and its records end where its
    # seal records.
    assert end >= SEALED_RECORDS
    if report.ended_before_checkpoint:
        assert report.records_skipped == 0
        assert end == report.first_bad_offset
        return
    # The walk reached the recorded end, directly or by resyncs: nothing
    # intact in the last segment is lost.
    last = layout()[1]
    assert end == RECORDS
    for offset in intact_offsets(last, damaged[1]):
        assert values[offset] == value_for(offset), offset
    lost = [o for o in range(SEALED_RECORDS, RECORDS) if values[o] is None]
    if report.damaged_ranges:
        assert report.records_skipped <= len(lost)
        assert report.first_skipped_offset in lost


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=st.lists(st.tuples(st.just(0),
                                 st.floats(0, 1, exclude_max=True),
                                 st.integers(1, 255)),
                       min_size=1, max_size=4))
def test_damaged_sealed_segment_keeps_intact_records(pristine, damage):
    # Non-zero bytes only: a zero written over a length can read as
    # the end of the records, which the seal does not resync past.
    with tempfile.TemporaryDirectory(prefix="mqs-seglog-damage-") as tmp:
        path = os.path.join(tmp, "log")
        shutil.copytree(pristine, path)
        damaged = apply_damage(path, damage)
        with mqs.SegmentLog(path, readonly=True) as log:
            assert log.end_offset == RECORDS
            values = read_all_offsets(log, RECORDS)
    for offset, value in values.items():
        assert value is None or value == value_for(offset), offset
    for offset in intact_offsets(layout()[0], damaged[0]):
        assert values[offset] == value_for(offset), offset
    for offset in range(SEALED_RECORDS, RECORDS):
        assert values[offset] == value_for(offset), offset
