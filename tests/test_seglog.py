"""Tests of mqs.SegmentLog on real files: framing, reads, durability modes,
recovery from damaged files, retention, readers in other processes, bad
input, and a Hypothesis model of append/roll/retain/reopen."""

import errno
import gc
import io
import json
import logging
import os
import pathlib
import random
import shutil
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

import mqs
from mqs._seglog import _crc32c, _crc32c_impl

SEGMENT = 65536
HEADER = 4096
RECORD_HEADER = 32


PATTERN = bytes(range(1, 256)) * 4


def value_for(offset, size=None):
    """Deterministic payload of a record, so a check can recompute it.

    It starts with the offset and ends in a non-zero byte, so zeroing or
    cutting any of its bytes damages it.
    """
    if size is None:
        size = 20 + (offset * 7919) % 180
    return (struct.pack("<Q", offset) + PATTERN[offset % 255:])[:size]


def stride(value, key=b""):
    """Bytes one record takes in a segment: header, key, value, padding."""
    return (RECORD_HEADER + len(key) + len(value) + 7) // 8 * 8


def segment_files(path):
    return sorted(p for p in pathlib.Path(path).iterdir()
                  if p.name.endswith(".seg"))


def address_of(view):
    return np.frombuffer(view, dtype=np.uint8).ctypes.data


def fill(path, count, **kwargs):
    kwargs.setdefault("segment_bytes", SEGMENT)
    kwargs.setdefault("fsync", "never")
    with mqs.SegmentLog(path, **kwargs) as log:
        for offset in range(count):
            assert log.append(value_for(offset)) == offset


def read_all(log):
    return [bytes(record.value) for record in log]


CRASHING_WRITER = """
import os, struct, sys
import mqs
log = mqs.SegmentLog(sys.argv[1], segment_bytes=int(sys.argv[2]),
                     fsync=sys.argv[3])
data = sys.stdin.buffer.read()
pos = 0
while pos < len(data):
    (size,) = struct.unpack_from("<I", data, pos)
    log.append(data[pos + 4:pos + 4 + size])
    pos += 4 + size
os._exit(0)
"""


def fill_and_crash(path, count, fsync="never", segment_bytes=SEGMENT):
    """Append like `fill` in a child process that exits without closing.

    The log is left as kill -9 of its writer leaves it: the records are
    in the page cache, and no clean close recorded where they end.
    """
    payload = b"".join(struct.pack("<I", len(value_for(i))) + value_for(i)
                       for i in range(count))
    subprocess.run([sys.executable, "-c", CRASHING_WRITER, str(path),
                    str(segment_bytes), fsync],
                   input=payload, check=True, timeout=60)


def flip_byte(path, position, mask=0x01):
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)
        f.seek(position)
        f.write(bytes([byte[0] ^ mask]))


# ---- basics -----------------------------------------------------------------

def test_crc32c_matches_known_value():
    assert _crc32c(b"123456789") == 0xE3069283
    assert _crc32c_impl() in ("avx512+vpclmulqdq", "sse4.2", "armv8",
                              "software")


def test_seglog_append_read_round_trip(tmp_path):
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT) as log:
        assert log.append(b"first") == 0
        assert log.append(bytearray(b"second"), key=b"k", timestamp=7) == 1
        assert log.append(memoryview(b"third"), key=b"") == 2
        assert bytes(log.read(0)) == b"first"
        record = log.read_record(1)
        assert record.offset == 1
        assert record.timestamp == 7
        assert bytes(record.key) == b"k"
        assert bytes(record.value) == b"second"
        assert log.read_record(0).key is None
        assert bytes(log.read_record(2).key) == b""
        assert log.end_offset == 3
        assert len(log) == 3


def test_seglog_timestamp_defaults_to_wall_clock(tmp_path):
    before = time.time_ns()
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT) as log:
        log.append(b"x")
        stamp = log.read_record(0).timestamp
    assert before <= stamp <= time.time_ns()


def test_seglog_read_view_is_readonly(tmp_path):
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT) as log:
        log.append(b"payload")
        view = log.read(0)
        assert view.readonly
        with pytest.raises(TypeError):
            view[0] = 1


def test_seglog_files_are_owner_only(tmp_path):
    path = tmp_path / "log"
    with mqs.SegmentLog(path, segment_bytes=SEGMENT) as log:
        log.append(b"x")
        log.commit("group", 1)
    assert path.stat().st_mode & 0o777 == 0o700
    for entry in path.iterdir():
        assert entry.stat().st_mode & 0o777 == 0o600, entry.name


def test_seglog_offsets_continue_after_reopen(tmp_path):
    fill(tmp_path / "log", 50)
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT) as log:
        assert log.recovery.torn_segments == 0
        assert log.append(b"next") == 50
        assert read_all(log)[:50] == [value_for(i) for i in range(50)]


def test_seglog_rolls_into_segments_named_by_offset(tmp_path):
    fill(tmp_path / "log", 2000, segment_bytes=8192)
    files = segment_files(tmp_path / "log")
    assert len(files) > 10
    assert files[0].name == "00000000000000000000.seg"
    bases = [int(f.name[:20]) for f in files]
    assert bases == sorted(bases)
    assert all(f.stat().st_size == 8192 for f in files)
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=8192) as log:
        assert read_all(log) == [value_for(i) for i in range(2000)]
        for base in bases[1:]:
            assert bytes(log.read(base)) == value_for(base)


def test_seglog_append_many_keys_and_offsets(tmp_path):
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=8192) as log:
        log.append(b"zero")
        items = [b"a", (b"key", b"b"), bytearray(b"c"), (None, b"d")]
        assert log.append_many(items) == 1
        assert log.append_many(iter([b"e"] * 300)) == 5
        assert log.append_many([]) == 305
        records = [log.read_record(i) for i in range(1, 5)]
        assert [bytes(r.value) for r in records] == [b"a", b"b", b"c", b"d"]
        assert [r.key and bytes(r.key) for r in records] == [
            None, b"key", None, None]
        assert len({r.timestamp for r in records}) == 1


def test_seglog_iter_from_offset_and_timestamp(tmp_path):
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=8192) as log:
        for i in range(500):
            log.append(value_for(i), timestamp=1_000 + 10 * i)
        assert [r.offset for r in log.iter_from(495)] == list(range(495, 500))
        first = next(log.iter_from(timestamp=1_000 + 10 * 321 - 5))
        assert first.offset == 321
        assert next(log.iter_from(timestamp=0)).offset == 0
        assert list(log.iter_from(timestamp=10**12)) == []
        with pytest.raises(ValueError, match="offset or timestamp, not both"):
            log.iter_from(1, timestamp=1)


def test_seglog_iteration_includes_records_appended_meanwhile(tmp_path):
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT) as log:
        log.append(b"0")
        seen = []
        for record in log:
            seen.append(record.offset)
            if record.offset < 3:
                log.append(b"more")
        assert seen == [0, 1, 2, 3]


# ---- Arrow ------------------------------------------------------------------

def test_seglog_read_batch_columns(tmp_path):
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT) as log:
        log.append(b"short", timestamp=5)
        log.append(b"a value longer than twelve bytes", key=b"k", timestamp=6)
        batch = log.read_batch(0, 10)
        batch.validate(full=True)
        assert batch.num_rows == 2
        assert batch.schema.names == ["offset", "timestamp", "key", "value"]
        assert batch.column("value").type == pa.binary_view()
        assert batch.column("offset").to_pylist() == [0, 1]
        assert batch.column("timestamp").type == pa.int64()
        assert batch.column("timestamp").to_pylist() == [5, 6]
        as_time = batch.column("timestamp").cast(pa.timestamp("ns"))
        assert as_time.buffers()[1].address == \
            batch.column("timestamp").buffers()[1].address
        assert batch.column("key").to_pylist() == [None, b"k"]
        assert batch.column("value").to_pylist() == [
            b"short", b"a value longer than twelve bytes"]
        assert log.read_batch(2).num_rows == 0


def test_seglog_read_batch_converts_without_pandas(tmp_path):
    stamp = 1_733_333_333_123_456_789   # not a whole microsecond
    code = f"""
import sys
sys.modules["pandas"] = None    # makes "import pandas" fail
import mqs
with mqs.SegmentLog({str(tmp_path / "log")!r}) as log:
    log.append(b"a value longer than twelve bytes", key=b"k",
               timestamp={stamp})
    batch = log.read_batch(0)
    print(batch.to_pydict())
    print(batch.to_pylist())
    print(batch.column("timestamp").cast(
        __import__("pyarrow").timestamp("ns")).cast("int64").to_pylist())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    as_dict, as_list, cast_back = result.stdout.splitlines()
    assert as_dict == repr({
        "offset": [0], "timestamp": [stamp], "key": [b"k"],
        "value": [b"a value longer than twelve bytes"]})
    assert as_list == repr([{
        "offset": 0, "timestamp": stamp, "key": b"k",
        "value": b"a value longer than twelve bytes"}])
    assert cast_back == repr([stamp])


def test_seglog_read_batch_values_point_into_mapping(tmp_path):
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT) as log:
        for i in range(100):
            log.append(value_for(i, 100))
        batch = log.read_batch(0, 100)
        data = batch.column("value").buffers()[2]
        views = np.frombuffer(batch.column("value").buffers()[1],
                              dtype=np.int32).reshape(-1, 4)
        for offset in (0, 57, 99):
            view_offset = int(views[offset][3])
            assert data.address + view_offset == address_of(log.read(offset))
        assert data.size == SEGMENT


def test_seglog_read_batch_keeps_mapping_after_close(tmp_path):
    log = mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT)
    for i in range(10):
        log.append(value_for(i, 64))
    batch = log.read_batch(0, 10)
    view = log.read(3)
    log.close()
    shutil.rmtree(tmp_path / "log")
    assert batch.column("value").to_pylist() == [
        value_for(i, 64) for i in range(10)]
    assert bytes(view) == value_for(3, 64)


def test_seglog_read_batch_stops_at_segment_end(tmp_path):
    fill(tmp_path / "log", 300, segment_bytes=8192)
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=8192) as log:
        second = int(segment_files(tmp_path / "log")[1].name[:20])
        batch = log.read_batch(0, 1000)
        assert batch.num_rows == second
        offset, values = 0, []
        while offset < log.end_offset:
            batch = log.read_batch(offset, 1000)
            values += batch.column("value").to_pylist()
            offset += batch.num_rows
        assert values == [value_for(i) for i in range(300)]


# ---- bad input --------------------------------------------------------------

def test_seglog_rejects_str_data(tmp_path):
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT) as log:
        with pytest.raises(TypeError,
                           match="data must be a bytes-like object, got str"):
            log.append("text")
        with pytest.raises(TypeError, match="key must be a bytes-like object "
                                            "or None, got int"):
            log.append(b"x", key=5)
        with pytest.raises(TypeError, match="each item must be a bytes-like "
                                            "object, got int"):
            log.append_many([b"ok", 3])
        with pytest.raises(TypeError, match="timestamp must be an int"):
            log.append(b"x", timestamp=1.5)
        with pytest.raises(ValueError, match=(
                r"timestamp must be 0 to 2\*\*63 - 1 nanoseconds since the "
                r"epoch, got -5")):
            log.append(b"x", timestamp=-5)
        assert log.end_offset == 0
        assert log.append(b"epoch", timestamp=0) == 0


def test_seglog_rejects_record_larger_than_segment(tmp_path):
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=8192) as log:
        limit = 8192 - HEADER - RECORD_HEADER
        assert log.append(b"x" * limit) == 0
        with pytest.raises(mqs.MessageTooLarge,
                           match=f"record value is {limit + 1} bytes with a "
                                 f"0-byte key, but at most {limit} value "
                                 f"bytes fit in a segment of 8192 bytes"):
            log.append(b"x" * (limit + 1))
        with pytest.raises(ValueError, match="raise segment_bytes"):
            log.append_many([b"ok", b"x" * 9000])
        assert log.end_offset == 1


def test_seglog_rejects_unknown_fsync_mode(tmp_path):
    with pytest.raises(ValueError, match="fsync must be 'always', 'interval' "
                                         "or 'never', got 'sometimes'"):
        mqs.SegmentLog(tmp_path / "log", fsync="sometimes")
    assert not (tmp_path / "log").exists()


def test_seglog_rejects_segment_size_not_page_multiple(tmp_path):
    with pytest.raises(ValueError, match=r"got 10000 \(try 12288\)"):
        mqs.SegmentLog(tmp_path / "log", segment_bytes=10000)
    with pytest.raises(ValueError, match="from 8192 to 1073741824, got 4096"):
        mqs.SegmentLog(tmp_path / "log", segment_bytes=4096)
    with pytest.raises(TypeError, match="segment_bytes must be an int"):
        mqs.SegmentLog(tmp_path / "log", segment_bytes="big")


def test_seglog_rejects_path_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"")
    with pytest.raises(NotADirectoryError,
                       match="failed to open segment log: Not a directory"):
        mqs.SegmentLog(path)


def test_seglog_rejects_empty_path(tmp_path, monkeypatch):
    """An empty path would open a log in the working directory."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="path must name the segment log's "
                       "directory, got ''"):
        mqs.SegmentLog("")
    assert list(tmp_path.iterdir()) == []


def test_seglog_rejects_newer_format_version(tmp_path):
    fill(tmp_path / "log", 3)
    segment = segment_files(tmp_path / "log")[0]
    with open(segment, "r+b") as f:
        f.seek(8)
        f.write(struct.pack("<I", 2))
    with pytest.raises(mqs.LogVersionError,
                       match="format version newer than 1; upgrade mqs"):
        mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT)


def test_seglog_rejects_damaged_segment_header(tmp_path):
    fill(tmp_path / "log", 3)
    segment = segment_files(tmp_path / "log")[0]
    with open(segment, "r+b") as f:
        f.seek(20)
        f.write(b"\xff")
    with pytest.raises(mqs.LogCorrupted, match="failed its magic, CRC or "
                                               "size check"):
        mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT)


def test_seglog_rejects_second_writer(tmp_path):
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT):
        with pytest.raises(mqs.LogLocked, match="another writer holds the "
                                                "lock of this log"):
            mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT)
        with pytest.raises(BlockingIOError):
            mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT)


def test_seglog_readonly_rejects_append(tmp_path):
    fill(tmp_path / "log", 2)
    with mqs.SegmentLog(tmp_path / "log", readonly=True) as log:
        with pytest.raises(io.UnsupportedOperation, match="readonly=True"):
            log.append(b"x")
        with pytest.raises(io.UnsupportedOperation, match="readonly=True"):
            log.flush()
        assert bytes(log.read(1)) == value_for(1)


def test_seglog_read_out_of_range(tmp_path):
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT) as log:
        log.append(b"x")
        with pytest.raises(mqs.OffsetOutOfRange,
                           match="offset 5 is not written yet; the end "
                                 "offset is 1"):
            log.read(5)
        with pytest.raises(IndexError):
            log.read(1)
        with pytest.raises(ValueError, match="offset must be from 0"):
            log.read(-1)


def test_seglog_closed_log_rejects_calls(tmp_path):
    log = mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT)
    log.close()
    log.close()
    assert log.closed
    with pytest.raises(ValueError, match="is closed"):
        log.append(b"x")


def test_seglog_preallocation_failure_is_reported(tmp_path):
    """A file size limit makes posix_fallocate fail like a full disk."""
    script = (
        "import resource, signal, sys, mqs\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "try:\n"
        "    mqs.SegmentLog(sys.argv[1], segment_bytes=4 << 20)\n"
        "except OSError as exc:\n"
        "    print(type(exc).__name__, exc.errno, exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", script,
                             str(tmp_path / "log")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"OSError {errno.EFBIG} " in result.stdout
    assert "failed to preallocate a segment of 4194304 bytes" in result.stdout
    assert list((tmp_path / "log").glob("*.seg*")) == []


# ---- durability -------------------------------------------------------------

def test_seglog_always_returns_after_covering_sync(tmp_path):
    calls = []
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT,
                        fsync="always") as log:
        log._set_sync_hook(lambda end, phase: calls.append((end, phase)))
        for expected in range(5):
            offset = log.append(b"x")
            assert offset == expected
            assert calls[-1] == (offset + 1, 1)
            assert log.synced_offset == offset + 1
        first = log.append_many([b"a"] * 10)
        assert calls[-1] == (first + 10, 1)


def test_seglog_sync_error_poisons_log(tmp_path, caplog):
    log = mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT,
                         fsync="always")
    log.append(b"kept")
    log._set_sync_hook(lambda end, phase: errno.EIO if phase == 0 else 0)
    with caplog.at_level(logging.ERROR, logger="mqs._seglog"):
        with pytest.raises(mqs.LogPoisoned, match="a sync of this log failed "
                                                  "earlier"):
            log.append(b"not durable")
    assert "sync of segment log" in caplog.text
    assert log.synced_offset == 1
    with pytest.raises(mqs.LogPoisoned) as info:
        log.append(b"later")
    assert info.value.errno == errno.EIO
    with pytest.raises(OSError):
        log.flush()
    assert bytes(log.read(0)) == b"kept"
    assert log.stats().sync_errno == errno.EIO
    with pytest.raises(mqs.LogPoisoned, match="final sync") as raised:
        log.close()
    assert raised.value.errno == errno.EIO
    assert log.closed


def block_recovery_point(path):
    """Make the next recovery point write fail with EISDIR, even as root:
    its temporary file cannot be created over a directory."""
    os.mkdir(pathlib.Path(path) / "recovery-point.tmp")


@pytest.mark.parametrize("fsync", ["never", "interval", "always"])
def test_seglog_close_raises_failed_recovery_point(tmp_path, fsync):
    path = tmp_path / "log"
    log = mqs.SegmentLog(path, segment_bytes=SEGMENT, fsync=fsync)
    log.append_many([value_for(i) for i in range(20)])
    block_recovery_point(path)
    with pytest.raises(mqs.RecoveryPointError,
                       match="failed to write the recovery point") as raised:
        log.close()
    assert isinstance(raised.value, OSError)
    assert raised.value.errno == errno.EISDIR
    assert raised.value.filename == str(path / "recovery-point")
    assert log.closed
    log.close()     # a second close does nothing
    assert not (path / "recovery-point").exists()

    (path / "recovery-point.tmp").rmdir()
    with mqs.SegmentLog(path, segment_bytes=SEGMENT, fsync=fsync) as log:
        # No recovery point covers the records, so all are verified.
        assert log.recovery.records_verified == 20
        assert read_all(log) == [value_for(i) for i in range(20)]
    assert (path / "recovery-point").exists()


def test_seglog_gc_logs_close_failure(tmp_path, caplog):
    path = tmp_path / "log"
    log = mqs.SegmentLog(path, segment_bytes=SEGMENT, fsync="never")
    log.append(b"kept")
    block_recovery_point(path)
    with caplog.at_level(logging.WARNING, logger="mqs._seglog"):
        del log
        gc.collect()
    assert "on garbage collection failed" in caplog.text
    assert "failed to write the recovery point" in caplog.text
    (path / "recovery-point.tmp").rmdir()
    with mqs.SegmentLog(path, readonly=True) as reader:
        assert bytes(reader.read(0)) == b"kept"


def test_seglog_find_time_in_unread_sealed_segment(tmp_path):
    path = tmp_path / "log"
    with mqs.SegmentLog(path, segment_bytes=8192, fsync="never") as log:
        for offset in range(100):
            log.append(b"x" * 100, timestamp=1000 + offset)
        assert log.stats().segments > 2
    # A new handle has read nothing, so its sealed segments are not
    # indexed yet.
    with mqs.SegmentLog(path, readonly=True) as reader:
        assert next(reader.iter_from(timestamp=1005)).offset == 5
    with mqs.SegmentLog(path, segment_bytes=8192, fsync="never") as log:
        assert next(log.iter_from(timestamp=1040)).offset == 40


def test_seglog_normal_build_ignores_failpoints(tmp_path, monkeypatch):
    with open(mqs._seglog.__file__, "rb") as f:
        if b"seglog.sync_eio" in f.read():
            pytest.skip("this build has failpoints (MQS_FAILPOINTS=1)")
    monkeypatch.setenv("MQS_FAILPOINT", "seglog.sync_eio:1")
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT,
                        fsync="always") as log:
        for expected in range(3):
            assert log.append(b"x") == expected
        assert log.synced_offset == 3
        assert log.stats().sync_errno == 0


def test_seglog_interval_flusher_syncs(tmp_path):
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT,
                        fsync="interval", fsync_interval_s=0.01) as log:
        log.append_many([b"x"] * 100)
        deadline = time.monotonic() + 10
        while log.synced_offset < 100 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert log.synced_offset == 100
        assert log.stats().syncs >= 1


def test_seglog_never_syncs_only_on_flush(tmp_path):
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=8192,
                        fsync="never") as log:
        log.append_many([value_for(i) for i in range(200)])
        assert log.stats().syncs == 0
        assert log.synced_offset == 0
        log.flush()
        assert log.synced_offset == 200
        assert log.stats().syncs == 1


def test_seglog_group_commit_shares_syncs(tmp_path):
    threads, per_thread = 8, 150
    errors = []
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=1 << 20,
                        fsync="always") as log:
        def work(tid):
            try:
                for i in range(per_thread):
                    log.append(struct.pack("<II", tid, i))
            except Exception as exc:  # reported by the assert below
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(t,))
                   for t in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        stats = log.stats()
        stats_raw = log._raw_stats()
        seen = sorted(struct.unpack("<II", bytes(r.value)) for r in log)
    assert errors == []
    assert stats.end_offset == threads * per_thread
    assert stats.synced_offset == threads * per_thread
    assert stats.syncs < threads * per_thread * 3 // 4
    # The group commit's own counts (mqs_seglog_stats_t).
    assert 0 <= stats_raw.syncs_taken_over <= stats_raw.syncs
    assert 0 <= stats_raw.gather_timeouts <= stats_raw.syncs
    assert seen == sorted((t, i) for t in range(threads)
                          for i in range(per_thread))


def test_seglog_sync_starts_now_hint(tmp_path):
    """`_sync_starts_now` returns whether a flush would start its sync
    at once: yes on a log that no thread synced, no while a sync runs,
    no on a closed log (no error either, because it is a hint)."""
    entered, release = threading.Event(), threading.Event()

    def hook(end, phase):
        if phase == 0:
            entered.set()
            assert release.wait(60)
        return 0

    log = mqs.SegmentLog(tmp_path / "log", segment_bytes=1 << 20,
                         fsync="always")
    try:
        assert log._sync_starts_now() is True
        log._set_sync_hook(hook)
        writer = threading.Thread(target=log.append, args=(b"x",))
        writer.start()
        assert entered.wait(30)
        assert log._sync_starts_now() is False
        release.set()
        writer.join(30)
        log._set_sync_hook(None)
    finally:
        release.set()
        log.close()
    assert log._sync_starts_now() is False


def test_seglog_close_while_threads_sync(tmp_path):
    """Close returns while other threads keep calling flush and append.

    Calls that start after close began wait for it, then raise
    ValueError. Before, they kept a sync in flight at every check of
    close, so it never returned.
    """
    log = mqs.SegmentLog(tmp_path / "log", segment_bytes=1 << 20,
                         fsync="always")
    stop = threading.Event()
    errors = []

    def work(index):
        while not stop.is_set():
            try:
                if index % 2:
                    log.flush()
                else:
                    log.append(b"r" * 100)
            except ValueError as exc:
                # Raised only once the close has synced.
                errors.append((exc, log.closed))
                return

    workers = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    closer = threading.Thread(target=log.close)
    try:
        for worker in workers:
            worker.start()
        time.sleep(0.2)
        started = time.monotonic()
        closer.start()
        closer.join(timeout=20)
        assert not closer.is_alive(), "close did not return within 20 s"
        assert time.monotonic() - started < 20
    finally:
        stop.set()
        closer.join(timeout=60)
        for worker in workers:
            worker.join(timeout=60)
    assert log.closed
    assert len(errors) == len(workers)
    assert all("is closed" in str(exc) for exc, _ in errors)
    assert all(closed for _, closed in errors)
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=1 << 20) as reopened:
        assert reopened.recovery.records_dropped == 0
        assert reopened.end_offset > 0


TWO_CLOSES_SCRIPT = r"""
import sys
import threading
import mqs

# Under "never" only the flush below syncs.
log = mqs.SegmentLog(sys.argv[1], segment_bytes=1 << 20, fsync="never")
log.append(b"x")
in_sync = threading.Event()
release = threading.Event()

def hook(end_offset, phase):
    # Hold the first sync open, so that both closes wait for it.
    if phase == 0 and not in_sync.is_set():
        in_sync.set()
        release.wait(30)
    return 0

log._set_sync_hook(hook)
log.append(b"y")
flusher = threading.Thread(target=log.flush)
flusher.start()
in_sync.wait(30)
closers = [threading.Thread(target=log.close) for _ in range(2)]
for closer in closers:
    closer.start()
threading.Timer(0.3, release.set).start()
for closer in closers + [flusher]:
    closer.join(30)
print("alive", sum(t.is_alive() for t in closers + [flusher]), log.closed)
"""


def test_seglog_two_concurrent_closes(tmp_path):
    """Two threads closing at once close the C handle once.

    Both closes wait for a flush that a sync hook keeps open. Before, the
    second close then closed the handle that the first had freed.
    """
    result = subprocess.run(
        [sys.executable, "-c", TWO_CLOSES_SCRIPT, str(tmp_path / "log")],
        capture_output=True, text=True, timeout=25)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["alive", "0", "True"]
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=1 << 20) as reopened:
        assert reopened.end_offset == 2
        assert reopened.recovery.records_dropped == 0


# ---- retention --------------------------------------------------------------

def test_seglog_retention_by_bytes(tmp_path):
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=8192,
                        retention_bytes=4 * 8192) as log:
        for i in range(1000):
            log.append(value_for(i))
        stats = log.stats()
        assert stats.segments <= 5
        assert stats.start_offset > 0
        assert stats.records_deleted == stats.start_offset
        assert len(segment_files(tmp_path / "log")) == stats.segments
        with pytest.raises(mqs.OffsetOutOfRange, match="removed by retention"):
            log.read(0)
        assert bytes(log.read(stats.start_offset)) == \
            value_for(stats.start_offset)


def test_seglog_retention_by_age_keeps_views(tmp_path):
    old = time.time_ns() - 7200 * 10**9
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=8192) as log:
        for i in range(20):
            log.append(value_for(i, 100), timestamp=old)
        log.roll()
        log.append(b"new")
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=8192,
                        retention_s=3600) as log:
        view = log.read(0)
        batch = log.read_batch(0, 10)
        assert log.enforce_retention() == 1
        assert log.start_offset == 20
        assert len(segment_files(tmp_path / "log")) == 1
        assert bytes(view) == value_for(0, 100)
        assert batch.column("value").to_pylist()[3] == value_for(3, 100)


def test_seglog_readonly_len_and_offsets_follow_the_writer(tmp_path):
    path = tmp_path / "log"
    with mqs.SegmentLog(path, segment_bytes=8192) as log, \
            mqs.SegmentLog(path, readonly=True) as reader:
        assert len(reader) == 0
        for i in range(5):
            log.append(value_for(i))
        # No read or refresh in between: len() and the offsets catch up.
        assert len(reader) == 5
        assert reader.end_offset == 5
        for i in range(5, 1000):
            log.append(value_for(i))
        assert reader.end_offset == 1000
        assert len(reader) == len(log) == 1000


def test_seglog_delete_before_keeps_segment_with_later_records(tmp_path):
    path = tmp_path / "log"
    with mqs.SegmentLog(path, segment_bytes=8192) as log, \
            mqs.SegmentLog(path, readonly=True) as reader:
        for i in range(300):
            log.append(value_for(i))
        bases = sorted(int(name.stem) for name in segment_files(path))
        assert len(bases) >= 4
        assert reader.refresh() == 300
        reader_view = reader.read(0)
        # An offset inside the third segment: the first two go.
        assert log.delete_before(bases[2] + 1) == 2
        assert log.start_offset == bases[2]
        assert len(segment_files(path)) == len(bases) - 2
        assert log.stats().records_deleted == bases[2]
        # Deleting again below the same offset finds nothing.
        assert log.delete_before(bases[2] + 1) == 0
        # Never the active segment, even below the end offset.
        assert log.delete_before(log.end_offset) == len(bases) - 3
        assert len(segment_files(path)) == 1
        assert bytes(log.read(log.start_offset)) == \
            value_for(log.start_offset)

        # The reader keeps its mappings until it deletes them itself, and
        # a view it returned stays readable after that.
        assert reader.start_offset == 0
        assert reader.delete_before(bases[2]) == 2
        assert reader.start_offset == bases[2]
        assert bytes(reader_view) == value_for(0)
        with pytest.raises(ValueError, match="offset must be"):
            log.delete_before(-1)


# ---- recovery ---------------------------------------------------------------

def reopen_and_check(path, expected_count, append=True):
    with mqs.SegmentLog(path, segment_bytes=SEGMENT) as log:
        report = log.recovery
        assert log.end_offset == expected_count
        assert read_all(log) == [value_for(i) for i in range(expected_count)]
        if append:
            assert log.append(b"after") == expected_count
    return report


def complete_before(positions, cut):
    """Records whose bytes (padding aside) all lie before `cut`."""
    return sum(1 for i, p in enumerate(positions)
               if p + RECORD_HEADER + len(value_for(i)) <= cut)


def record_positions(count):
    positions, pos = [], HEADER
    for offset in range(count):
        positions.append(pos)
        pos += stride(value_for(offset))
    return positions, pos


def test_seglog_recovers_truncation_at_every_byte(tmp_path):
    count = 40
    fill(tmp_path / "pristine", count)
    positions, end = record_positions(count)
    segment = segment_files(tmp_path / "pristine")[0].name
    for cut in range(positions[-3], end + 1):
        path = tmp_path / f"cut{cut}"
        shutil.copytree(tmp_path / "pristine", path)
        os.truncate(path / segment, cut)
        complete = complete_before(positions, cut)
        report = reopen_and_check(path, complete)
        assert report.torn_segments == 1, cut
        assert report.first_bad_offset == complete, cut
        shutil.rmtree(path)


def test_seglog_recovers_zeroed_tail_at_every_step(tmp_path):
    count = 40
    fill_and_crash(tmp_path / "pristine", count)
    positions, end = record_positions(count)
    segment = segment_files(tmp_path / "pristine")[0].name
    for cut in range(positions[-3], end, 3):
        path = tmp_path / f"zero{cut}"
        shutil.copytree(tmp_path / "pristine", path)
        with open(path / segment, "r+b") as f:
            f.seek(cut)
            f.write(bytes(end - cut))
        complete = complete_before(positions, cut)
        reopen_and_check(path, complete)
        shutil.rmtree(path)


def test_seglog_recovers_garbage_after_tail(tmp_path, caplog):
    fill(tmp_path / "log", 30)
    _, end = record_positions(30)
    segment = segment_files(tmp_path / "log")[0]
    with open(segment, "r+b") as f:
        f.seek(end)
        f.write(os.urandom(1000))
    with caplog.at_level(logging.WARNING, logger="mqs._seglog"):
        report = reopen_and_check(tmp_path / "log", 30)
    assert report.torn_segments == 1
    assert 993 <= report.bytes_zeroed <= 1000
    assert report.records_dropped == 0
    assert "zeroed" in caplog.text
    assert "from offset 30" in caplog.text
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT) as log:
        again = log.recovery
        assert log.end_offset == 31
    assert again.torn_segments == 0
    assert again.bytes_zeroed == 0


def read_or_damaged(log, offset):
    """Return the value at `offset` as bytes, or None if it is damaged."""
    try:
        return bytes(log.read(offset))
    except mqs.LogCorrupted:
        return None


def test_seglog_skips_zeroed_page_in_last_mib(tmp_path, caplog):
    # A page lost after a clean close (as under "never" when the OS
    # crashes): the records on it are skipped, the ones after it kept.
    path = tmp_path / "log"
    count = 12000
    fill(path, count, segment_bytes=4 << 20)
    positions, end = record_positions(count)
    page = (end - (1 << 20) + 12345) // 4096 * 4096
    with open(segment_files(path)[0], "r+b") as f:
        f.seek(page)
        f.write(bytes(4096))
    survivors = complete_before(positions, page)
    after = sum(1 for p in positions if p >= page + 4096)
    lost = range(survivors, count - after)
    with caplog.at_level(logging.WARNING, logger="mqs._seglog"):
        with mqs.SegmentLog(path, segment_bytes=4 << 20) as log:
            report = log.recovery
            assert log.end_offset == count
            values = [read_or_damaged(log, i) for i in range(count)]
            assert log.append(b"after") == count
    assert values == [None if i in lost else value_for(i)
                      for i in range(count)]
    assert not report.ended_before_checkpoint
    assert report.torn_segments == 0
    assert report.records_dropped == 0
    assert report.records_skipped == len(lost)
    assert report.damaged_ranges == 1
    assert report.first_skipped_offset == survivors
    assert report.first_skipped_position == positions[survivors]
    assert f"skipped {len(lost)} damaged record(s) in 1 range(s)" \
        in caplog.text


def test_seglog_cuts_zeroed_pages_at_clean_end(tmp_path, caplog):
    # Zeros up to the recorded end leave no valid record to resume at,
    # and a zero length is lost pages rather than damage: cut there.
    path = tmp_path / "log"
    fill(path, 200)
    positions, end = record_positions(200)
    with open(segment_files(path)[0], "r+b") as f:
        f.seek(positions[150])
        f.write(bytes(end - positions[150]))
    with caplog.at_level(logging.WARNING, logger="mqs._seglog"):
        report = reopen_and_check(path, 150)
    assert report.ended_before_checkpoint
    assert report.first_bad_offset == 150
    assert report.records_skipped == 0
    assert "before the end recorded at its last clean close" in caplog.text


@pytest.mark.parametrize("fsync", ["never", "interval", "always"])
def test_seglog_recovery_cuts_at_flipped_bit_after_crash(tmp_path, fsync):
    fill_and_crash(tmp_path / "log", 50, fsync=fsync)
    positions, _ = record_positions(50)
    flip_byte(segment_files(tmp_path / "log")[0],
              positions[20] + RECORD_HEADER + 3)
    report = reopen_and_check(tmp_path / "log", 20)
    assert report.first_bad_offset == 20
    assert report.records_dropped == 30
    assert not report.ended_before_checkpoint


FIVE_RECORDS = [b"rec-%d" % i for i in range(5)]


def damage_record_2_of_5(path, fsync):
    """Write rec-0..rec-4, close cleanly, then flip a byte of rec-2."""
    with mqs.SegmentLog(path, segment_bytes=SEGMENT, fsync=fsync) as log:
        log.append_many(FIVE_RECORDS)
    segment = segment_files(path)[0]
    flip_byte(segment, segment.read_bytes().find(b"rec-2"))


@pytest.mark.parametrize("fsync", ["never", "interval", "always"])
def test_seglog_reader_sees_damage_after_clean_close(tmp_path, fsync):
    damage_record_2_of_5(tmp_path / "log", fsync)
    with mqs.SegmentLog(tmp_path / "log", readonly=True) as reader:
        assert reader.end_offset == 5
        assert not reader.recovery.ended_before_checkpoint
        with pytest.raises(mqs.LogCorrupted,
                           match="record at offset 2 .* failed") as e:
            reader.read(2)
        assert e.value.offset == 2
        assert bytes(reader.read(1)) == b"rec-1"
        assert bytes(reader.read(3)) == b"rec-3"
        assert bytes(reader.read(4)) == b"rec-4"


@pytest.mark.parametrize("fsync", ["never", "interval", "always"])
def test_seglog_writer_keeps_records_after_damage(tmp_path, fsync, caplog):
    damage_record_2_of_5(tmp_path / "log", fsync)
    with caplog.at_level(logging.WARNING, logger="mqs._seglog"):
        with mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT,
                            fsync=fsync) as log:
            report = log.recovery
            assert log.end_offset == 5
            with pytest.raises(mqs.LogCorrupted, match="offset 2"):
                log.read(2)
            assert bytes(log.read(3)) == b"rec-3"
            assert bytes(log.read(4)) == b"rec-4"
            assert log.append(b"rec-5") == 5
    assert report.torn_segments == 0
    assert report.bytes_zeroed == 0
    assert report.records_dropped == 0
    assert caplog.text == ""
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT,
                        fsync=fsync) as log:
        assert log.end_offset == 6
        assert bytes(log.read(4)) == b"rec-4"
        assert bytes(log.read(5)) == b"rec-5"
        with pytest.raises(mqs.LogCorrupted, match="offset 2"):
            log.read(2)


@pytest.mark.parametrize("fsync", ["never", "interval", "always"])
@pytest.mark.parametrize("added", [1 << 20, 1 << 11],
                         ids=["past-segment", "past-clean-end"])
def test_seglog_resyncs_after_length_damaged_below_clean_end(
        tmp_path, fsync, added, caplog):
    path = tmp_path / "log"
    fill(path, 10, fsync=fsync)
    positions, end = record_positions(10)
    # A bit flipped in record 4's length: the walk by lengths can no
    # longer locate the records after it. 1 MiB runs past the 64 KiB
    # segment; 2 KiB stays inside it but past the end recorded at the
    # close.
    assert positions[4] + stride(value_for(4)) + added > end
    flip_byte(segment_files(path)[0], positions[4] + added.bit_length() // 8,
              1 << ((added.bit_length() - 1) % 8))
    expected = [None if i == 4 else value_for(i) for i in range(10)]

    with caplog.at_level(logging.WARNING, logger="mqs._seglog"):
        with mqs.SegmentLog(path, readonly=True) as reader:
            report = reader.recovery
            assert reader.end_offset == 10
            assert [read_or_damaged(reader, i) for i in range(10)] \
                == expected
    assert not report.ended_before_checkpoint
    assert report.records_skipped == 1
    assert report.first_skipped_offset == 4
    assert report.first_skipped_segment == 0
    assert report.first_skipped_position == positions[4]
    assert "skipped 1 damaged record(s)" in caplog.text

    with mqs.SegmentLog(path, segment_bytes=SEGMENT, fsync=fsync) as log:
        report = log.recovery
        assert log.end_offset == 10
        assert log.append(b"after") == 10
    assert report.torn_segments == 0
    assert report.records_dropped == 0
    assert report.records_skipped == 1
    with mqs.SegmentLog(path, segment_bytes=SEGMENT, fsync=fsync) as log:
        assert log.recovery.records_skipped == 1
        assert log.end_offset == 11
        assert [read_or_damaged(log, i) for i in range(10)] == expected
        assert bytes(log.read(10)) == b"after"


def truncate_recovery_point_to_32_bytes(path):
    """Make the recovery point look like one written before it recorded
    the next offset."""
    with open(path / "recovery-point", "r+b") as f:
        f.truncate(32)


@pytest.mark.parametrize("fsync", ["never", "interval", "always"])
@pytest.mark.parametrize("added", [1 << 20, 1 << 11],
                         ids=["past-segment", "past-clean-end"])
def test_seglog_cuts_damaged_last_length_without_next_offset(
        tmp_path, fsync, added, caplog):
    # Record 9 is the last before the recorded end, so no valid record
    # follows it, and a recovery point without the next offset cannot
    # tell how many offsets the damage took: cut it as after a crash.
    path = tmp_path / "log"
    fill(path, 10, fsync=fsync)
    positions, end = record_positions(10)
    flip_byte(segment_files(path)[0], positions[9] + added.bit_length() // 8,
              1 << ((added.bit_length() - 1) % 8))
    truncate_recovery_point_to_32_bytes(path)

    with caplog.at_level(logging.WARNING, logger="mqs._seglog"):
        with mqs.SegmentLog(path, readonly=True) as reader:
            report = reader.recovery
            assert reader.end_offset == 9
    assert report.ended_before_checkpoint
    assert report.records_skipped == 0
    assert report.first_bad_offset == 9
    assert report.first_bad_position == positions[9]
    assert "before the end recorded at its last clean close" in caplog.text

    with mqs.SegmentLog(path, segment_bytes=SEGMENT, fsync=fsync) as log:
        report = log.recovery
        assert log.end_offset == 9
        assert log.append(b"after") == 9
    assert report.ended_before_checkpoint
    assert report.torn_segments == 1
    # Record 9 itself, while its length still fits in the segment.
    assert report.records_dropped == (1 if added < SEGMENT else 0)
    with mqs.SegmentLog(path, segment_bytes=SEGMENT, fsync=fsync) as log:
        assert not log.recovery.ended_before_checkpoint
        assert log.end_offset == 10
        assert bytes(log.read(9)) == b"after"


def test_seglog_resyncs_damaged_last_length_with_next_offset(tmp_path):
    path = tmp_path / "log"
    fill(path, 10)
    positions, _ = record_positions(10)
    flip_byte(segment_files(path)[0], positions[9] + 2, 0x10)
    with mqs.SegmentLog(path, segment_bytes=SEGMENT, fsync="never") as log:
        report = log.recovery
        assert log.end_offset == 10
        assert [read_or_damaged(log, i) for i in range(10)] \
            == [value_for(i) for i in range(9)] + [None]
        assert log.append(b"after") == 10
    assert not report.ended_before_checkpoint
    assert report.records_skipped == 1
    assert report.first_skipped_offset == 9


def test_seglog_resyncs_two_damaged_lengths(tmp_path):
    path = tmp_path / "log"
    fill(path, 40)
    positions, _ = record_positions(40)
    segment = segment_files(path)[0]
    flip_byte(segment, positions[7] + 1, 0x04)
    # Records 20 and 21 damaged together: length and offset of 20, and
    # a zero length in 21.
    with open(segment, "r+b") as f:
        f.seek(positions[20])
        f.write(random.Random(3).randbytes(16))
        f.seek(positions[21])
        f.write(bytes(4))
    damaged = {7, 20, 21}
    with mqs.SegmentLog(path, segment_bytes=SEGMENT, fsync="never") as log:
        report = log.recovery
        assert log.end_offset == 40
        assert [read_or_damaged(log, i) for i in range(40)] \
            == [None if i in damaged else value_for(i) for i in range(40)]
        with pytest.raises(mqs.LogCorrupted, match="offset 20"):
            [bytes(record.value) for record in log.iter_from(8)]
        assert [bytes(record.value) for record in log.iter_from(22)] \
            == [value_for(i) for i in range(22, 40)]
        batch = log.read_batch(0)
        assert batch.num_rows == 7
        assert log.read_batch(8).column("offset").to_pylist() \
            == list(range(8, 20))
    assert report.damaged_ranges == 2
    assert report.records_skipped == 3
    assert report.first_skipped_offset == 7


def test_seglog_random_garbage_does_not_resync(tmp_path):
    # Garbage from record 5 to the recorded end contains no record with
    # this file's CRC seed, so nothing in it is returned as a record.
    path = tmp_path / "log"
    fill(path, 30)
    positions, end = record_positions(30)
    garbage = random.Random(7).randbytes(end - positions[5])
    with open(segment_files(path)[0], "r+b") as f:
        f.seek(positions[5])
        f.write(garbage)
    with mqs.SegmentLog(path, readonly=True) as reader:
        # The recovery point records the next offset, so offsets 5 to 29
        # are known and damaged.
        assert reader.end_offset == 30
        assert [read_or_damaged(reader, i) for i in range(30)] \
            == [value_for(i) for i in range(5)] + [None] * 25
        assert reader.recovery.records_skipped == 25
    truncate_recovery_point_to_32_bytes(path)
    with mqs.SegmentLog(path, segment_bytes=SEGMENT, fsync="never") as log:
        report = log.recovery
        assert log.end_offset == 5
        assert read_all(log) == [value_for(i) for i in range(5)]
    assert report.ended_before_checkpoint
    assert report.records_skipped == 0
    assert report.first_bad_offset == 5
    assert report.records_dropped == 0


def test_seglog_checkpoint_removed_after_cut_below_it(tmp_path):
    path = tmp_path / "log"
    fill(path, 10)
    positions, _ = record_positions(10)
    flip_byte(segment_files(path)[0], positions[9] + 2, 0x10)
    truncate_recovery_point_to_32_bytes(path)
    with mqs.SegmentLog(path, segment_bytes=SEGMENT, fsync="never") as log:
        assert log.recovery.ended_before_checkpoint
        # The cut removed the recovery point; it covered bytes that new
        # records now overwrite.
        assert not (path / "recovery-point").exists()
        log.append(b"after")
    assert (path / "recovery-point").exists()


def test_seglog_verifies_log_without_recovery_point(tmp_path):
    # A "never" log closed by an earlier version has no recovery point,
    # like one whose writer crashed: every record is verified on open.
    path = tmp_path / "log"
    fill(path, 30)
    (path / "recovery-point").unlink()
    positions, _ = record_positions(30)
    with mqs.SegmentLog(path, readonly=True) as reader:
        assert reader.recovery.records_verified == 30
        assert reader.end_offset == 30
    with mqs.SegmentLog(path, segment_bytes=SEGMENT, fsync="never") as log:
        assert log.recovery.records_verified == 30
        assert read_all(log) == [value_for(i) for i in range(30)]
    assert (path / "recovery-point").exists()
    flip_byte(segment_files(path)[0], positions[10] + RECORD_HEADER + 1)
    with mqs.SegmentLog(path, segment_bytes=SEGMENT, fsync="never") as log:
        assert log.recovery.records_verified == 0
        assert log.end_offset == 30
        with pytest.raises(mqs.LogCorrupted, match="offset 10"):
            log.read(10)


def test_seglog_flipped_bit_in_sealed_segment_raises_on_read(tmp_path):
    path = tmp_path / "log"
    fill(path, 600, segment_bytes=8192)
    second = segment_files(path)[1]
    base = int(second.name[:20])
    with open(second, "r+b") as f:
        f.seek(HEADER + stride(value_for(base)) + RECORD_HEADER + 5)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    damaged = base + 1
    with mqs.SegmentLog(path, segment_bytes=8192) as log:
        assert log.recovery.torn_segments == 0
        with pytest.raises(mqs.LogCorrupted,
                           match=f"record at offset {damaged} .* failed") as e:
            log.read(damaged)
        assert e.value.offset == damaged
        assert bytes(log.read(damaged - 1)) == value_for(damaged - 1)
        assert bytes(log.read(damaged + 1)) == value_for(damaged + 1)
        assert log.read_batch(base, 100).num_rows == 1
        with pytest.raises(mqs.LogCorrupted):
            list(log.iter_from(base))
        assert [r.offset for r in log.iter_from(damaged + 1)][:2] == [
            damaged + 1, damaged + 2]
        assert log.append(b"x") == 600


def test_seglog_recovery_is_idempotent(tmp_path):
    fill_and_crash(tmp_path / "log", 40)
    _, end = record_positions(40)
    with open(segment_files(tmp_path / "log")[0], "r+b") as f:
        f.seek(end - 50)
        f.write(b"\x17" * 300)
    states = []
    for _ in range(2):
        with mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT) as log:
            states.append((log.end_offset, read_all(log),
                           log.recovery.torn_segments))
        data = segment_files(tmp_path / "log")[0].read_bytes()
        states[-1] += (data[HEADER:],)
    assert states[0][0] == 39
    assert states[0][2] == 1
    assert states[1][2] == 0
    assert states[0][:2] == states[1][:2]
    assert states[0][3] == states[1][3]


def test_seglog_removes_half_created_segment(tmp_path):
    fill(tmp_path / "log", 5)
    stale = tmp_path / "log" / "00000000000000000005.seg.tmp"
    stale.write_bytes(b"partial")
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT) as log:
        assert log.recovery.temp_files_removed == 1
        assert log.end_offset == 5
    assert not stale.exists()


# ---- consumer groups --------------------------------------------------------

def test_seglog_commit_round_trip(tmp_path):
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT) as log:
        log.append_many([b"record"] * 50)
        assert log.committed("billing") is None
        log.commit("billing", 42)
        log.commit("billing", 43)
        assert log.committed("billing") == 43
    with mqs.SegmentLog(tmp_path / "log", readonly=True) as reader:
        assert reader.committed("billing") == 43
        reader.commit("audit", 7)
    assert [p.name for p in (tmp_path / "log").glob(".consumer-*")] == []


def test_seglog_relative_path_survives_chdir(tmp_path, monkeypatch):
    """A log opened with a relative path keeps its directory after the
    process changes its working directory: commits and group offsets go
    to the log it opened, not to a path under the new directory."""
    monkeypatch.chdir(tmp_path)
    log = mqs.SegmentLog("events", segment_bytes=8192, fsync="never")
    try:
        for i in range(5):
            log.append(b"e%d" % i)
        elsewhere = tmp_path / "elsewhere"
        (elsewhere / "events").mkdir(parents=True)
        monkeypatch.chdir(elsewhere)
        log.commit("billing", 3)
        assert log.committed("billing") == 3
        assert log.path == str(tmp_path / "events")
    finally:
        log.close()
    assert os.listdir(elsewhere / "events") == []
    with mqs.SegmentLog(tmp_path / "events", fsync="never") as reopened:
        assert reopened.committed("billing") == 3


def test_seglog_commit_detects_damage(tmp_path):
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT) as log:
        log.append_many([b"record"] * 6)
        log.commit("g", 5)
        name = tmp_path / "log" / "consumer-g.offset"
        data = bytearray(name.read_bytes())
        data[9] ^= 1
        name.write_bytes(bytes(data))
        with pytest.raises(mqs.LogCorrupted, match="failed its CRC check"):
            log.committed("g")
        log.commit("g", 6)
        assert log.committed("g") == 6


def test_seglog_commit_rejects_offset_past_end(tmp_path):
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT) as log:
        log.append_many([b"record"] * 6)
        log.commit("g", 6)
        with pytest.raises(ValueError, match="offset 7 is past the end of "
                                             r"the log \(next offset 6\)"):
            log.commit("g", 7)
        assert log.committed("g") == 6


def test_seglog_commit_rejects_closed_log(tmp_path):
    log = mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT)
    log.append(b"record")
    log.close()
    with pytest.raises(ValueError, match="is closed"):
        log.commit("g", 1)


@pytest.mark.parametrize("group", ["", ".hidden", "a/b", "x" * 201])
def test_seglog_commit_rejects_bad_group(tmp_path, group):
    with mqs.SegmentLog(tmp_path / "log", segment_bytes=SEGMENT) as log:
        with pytest.raises(ValueError, match="group must be 1 to 200"):
            log.commit(group, 1)


# ---- readers in other processes ---------------------------------------------

TAIL_READER = r"""
import json, sys, time
import mqs

path, total = sys.argv[1], int(sys.argv[2])
log = mqs.SegmentLog(path, readonly=True)
offset, errors = 0, []
deadline = time.monotonic() + 120
while offset < total and time.monotonic() < deadline:
    try:
        record = log.read_record(offset)
    except mqs.OffsetOutOfRange as exc:
        if "not written yet" not in str(exc):
            errors.append(repr(exc))
            break
        time.sleep(0.001)
        continue
    expected = offset.to_bytes(8, "little") * 8
    if bytes(record.value) != expected:
        errors.append(f"offset {offset}: wrong value")
    offset += 1
    if offset % 200 == 0:
        log.commit("tail", offset)
log.commit("tail", offset)
print(json.dumps({"read": offset, "errors": errors}))
"""


def test_seglog_reader_process_tails_through_retention(tmp_path):
    path = tmp_path / "log"
    total = 20000
    log = mqs.SegmentLog(path, segment_bytes=65536, fsync="never",
                         retention_bytes=16 * 65536)
    reader = subprocess.Popen(
        [sys.executable, "-c", TAIL_READER, str(path), str(total)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        for offset in range(total):
            # Stay within retention of the reader, as a producer would
            # throttle on its slowest consumer group.
            while offset - (log.committed("tail") or 0) > 3000:
                assert time.monotonic() < deadline, "reader stalled"
                time.sleep(0.002)
            log.append(offset.to_bytes(8, "little") * 8)
        out, err = reader.communicate(timeout=120)
        stats = log.stats()
    finally:
        if reader.poll() is None:
            reader.kill()
        log.close()
    assert reader.returncode == 0, err
    result = json.loads(out)
    assert result["errors"] == []
    assert result["read"] == total
    assert stats.segments_deleted > 0


def test_seglog_reader_reads_records_sealed_after_its_walk(tmp_path):
    """A reader that walked a segment, then saw it sealed through
    delete_before (which loads seals) while the writer had appended more
    records and rolled, reads those records: the seal never hides the
    records it covers."""
    path = tmp_path / "log"
    writer = mqs.SegmentLog(path, segment_bytes=8192, fsync="never")
    reader = mqs.SegmentLog(path, readonly=True)
    for n in range(3):
        writer.append(b"%04d" % n + b"x" * 100)
    assert bytes(reader.read_record(2).value)[:4] == b"0002"
    count = 3
    while writer.stats().segments < 2:
        writer.append(b"%04d" % count + b"x" * 100)
        count += 1
    assert reader.delete_before(1) == 0
    for n in range(3, count):
        assert bytes(reader.read_record(n).value)[:4] == b"%04d" % n
    reader.close()
    writer.close()


ROLLING_WRITER = r"""
import sys, time
import mqs

log = mqs.SegmentLog(sys.argv[1], segment_bytes=8192, fsync="never")
deadline = time.monotonic() + float(sys.argv[2])
count = 0
while time.monotonic() < deadline:
    # 3,000 bytes: one record per 8 KiB segment, so every append rolls.
    log.append(count.to_bytes(8, "little") * 375)
    count += 1
log.close()
print(count)
"""


def test_seglog_reader_follows_fast_rolls(tmp_path):
    """A reader follows a writer in another process that rolls at every
    append, in a directory of 20,000 other files, so that each listing
    runs while segments are renamed into place. readdir() may skip such
    a file even when it returns a later one. The reader must still open
    every segment, by the name that the previous segment's seal gives,
    and read every record. A skipped segment used to read as damaged."""
    path = tmp_path / "log"
    path.mkdir()
    for n in range(20000):
        (path / f"unrelated-{n:05d}").touch()
    mqs.SegmentLog(path, segment_bytes=8192, fsync="never").close()

    writer = subprocess.Popen(
        [sys.executable, "-c", ROLLING_WRITER, str(path), "1.0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader = mqs.SegmentLog(path, readonly=True)
    offset = 0
    total = None
    try:
        deadline = time.monotonic() + 60
        while total is None or offset < total:
            assert time.monotonic() < deadline, f"stalled at {offset}"
            if total is None and writer.poll() is not None:
                out, err = writer.communicate()
                assert writer.returncode == 0, err
                total = int(out)
            try:
                record = reader.read_record(offset)
            except mqs.OffsetOutOfRange:
                continue
            expected = offset.to_bytes(8, "little") * 375
            assert bytes(record.value) == expected, f"offset {offset}"
            offset += 1
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        reader.close()
    assert total > 100
    assert offset == total


RETAINING_WRITER = r"""
import sys, time
import mqs

log = mqs.SegmentLog(sys.argv[1], segment_bytes=8192, fsync="never",
                     retention_bytes=8 * 8192)
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    log.append(b"x" * 3000)
log.close()
"""


def test_seglog_readonly_open_during_retention(tmp_path):
    """Read-only handles opened while a writer in another process rolls
    at every append and retention deletes the oldest segments. A file
    listed by the reader may be gone before it is opened. The open must
    skip it instead of raising FileNotFoundError."""
    path = tmp_path / "log"
    mqs.SegmentLog(path, segment_bytes=8192, fsync="never").close()
    writer = subprocess.Popen(
        [sys.executable, "-c", RETAINING_WRITER, str(path), "1.0"],
        stderr=subprocess.PIPE, text=True)
    opens = 0
    try:
        while writer.poll() is None:
            with mqs.SegmentLog(path, readonly=True) as reader:
                assert reader.end_offset >= reader.start_offset
            opens += 1
        assert writer.returncode == 0, writer.stderr.read()
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        writer.stderr.close()
    assert opens > 100


FLIPPING_WRITER = r"""
import random, sys, time
import mqs
from test_seglog import mixed_record

log = mqs.SegmentLog(sys.argv[1], segment_bytes=65536, fsync="always")
rng = random.Random(5)
deadline = time.monotonic() + float(sys.argv[2])
offset = 0
while time.monotonic() < deadline:
    if rng.random() < 0.3:
        # One sync for the batch: the syncs cover many records each.
        batch = [mixed_record(offset + n) for n in range(rng.randrange(50, 200))]
        assert log.append_many(
            [value if key is None else (key, value) for key, value in batch]
        ) == offset
        offset += len(batch)
    else:
        # A sync per record: appends go through pwrite() once the syncs
        # of recent rounds covered few records each.
        for _ in range(rng.randrange(20, 100)):
            key, value = mixed_record(offset)
            assert log.append(value, key=key) == offset
            offset += 1
log.close()
print(offset)
"""


def mixed_record(offset):
    """Return the (key, value) of record `offset` of FLIPPING_WRITER:
    values of 0 bytes to more than two pages, a third of them keyed."""
    rng = random.Random(offset)
    size = rng.choice([0, 1, 7, 100, 4095, 4096, 4097, rng.randrange(9000)])
    key = b"key-%d" % offset if rng.random() < 0.33 else None
    return key, (value_for(offset, size) * (size // 1000 + 1))[:size]


def test_seglog_readers_follow_always_writer(tmp_path):
    """Two read-only processes follow a writer under fsync="always" that
    switches between batches (one sync each) and a sync per record,
    rolling 64 KiB segments. This process then reads the log again.
    Every record a reader returns has the key and value written, in
    order and without gaps, whether it was stored into the mapping or
    written with pwrite()."""

    path = tmp_path / "log"
    mqs.SegmentLog(path, segment_bytes=65536, fsync="always").close()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(pathlib.Path(__file__).parent), env.get("PYTHONPATH", "")])
    writer = subprocess.Popen(
        [sys.executable, "-c", FLIPPING_WRITER, str(path), "1.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    readers = [subprocess.Popen(
        [sys.executable, "-c", FOLLOWING_READER, str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    try:
        out, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err
        total = int(out)
        results = [reader.communicate(f"{total}\n", timeout=60)
                   for reader in readers]
        with mqs.SegmentLog(path, readonly=True) as log:
            for offset in range(total):
                record = log.read_record(offset)
                key, value = mixed_record(offset)
                assert bytes(record.value) == value, f"offset {offset}"
                assert (None if record.key is None
                        else bytes(record.key)) == key, f"offset {offset}"
    finally:
        for child in [writer] + readers:
            if child.poll() is None:
                child.kill()
                child.communicate()
    assert total > 1000
    for reader, (out, err) in zip(readers, results):
        assert reader.returncode == 0, err
        assert out.split() == [str(total), "0"]


# Reads until the record count arrives on stdin and it has read them all.
# Prints how many it read and how many differed from what was written.
FOLLOWING_READER = r"""
import select, sys
import mqs
from test_seglog import mixed_record

log = mqs.SegmentLog(sys.argv[1], readonly=True)
offset, errors = 0, 0
total = None
while total is None or offset < total:
    for record in log.iter_from(offset):
        key, value = mixed_record(offset)
        if (record.offset != offset or bytes(record.value) != value
                or (None if record.key is None else bytes(record.key)) != key):
            errors += 1
        offset += 1
    if total is None and select.select([sys.stdin], [], [], 0.001)[0]:
        total = int(sys.stdin.readline())
print(offset, errors)
"""


# ---- model-based ------------------------------------------------------------

@settings(max_examples=25, stateful_step_count=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
class SegmentLogModel(RuleBasedStateMachine):
    """Compare the log with a list over append, roll, retain and reopen."""

    @initialize(tmp=st.just(None))
    def open_log(self, tmp):
        import tempfile
        self.dir = tempfile.mkdtemp(prefix="mqs-seglog-model-")
        self.path = os.path.join(self.dir, "log")
        self.model = []
        self.start = 0
        self.log = self.open()

    def open(self):
        return mqs.SegmentLog(self.path, segment_bytes=8192, fsync="never",
                              retention_bytes=3 * 8192)

    @rule(value=st.binary(max_size=600), key=st.none() | st.binary(max_size=8))
    def append(self, value, key):
        assert self.log.append(value, key=key) == len(self.model)
        self.model.append(value)

    @rule(values=st.lists(st.binary(max_size=300), max_size=40))
    def append_many(self, values):
        first = self.log.append_many(values)
        assert first == len(self.model)
        self.model.extend(values)

    @rule()
    def roll(self):
        self.log.roll()

    @rule()
    def retain(self):
        self.log.enforce_retention()
        start = self.log.start_offset
        assert start >= self.start
        self.start = start

    @rule()
    def reopen(self):
        self.log.close()
        self.log = self.open()
        assert self.log.recovery.torn_segments == 0

    @rule(data=st.data())
    def read_one(self, data):
        if self.start < len(self.model):
            offset = data.draw(st.integers(self.start, len(self.model) - 1))
            assert bytes(self.log.read(offset)) == self.model[offset]

    @invariant()
    def offsets_match(self):
        if not hasattr(self, "log"):
            return
        # Rolls inside appends apply retention too, so the start moves
        # without a retain step; it never moves back.
        start = self.log.start_offset
        assert start >= self.start
        self.start = start
        assert self.log.end_offset == len(self.model)
        assert self.start <= len(self.model)

    def teardown(self):
        if hasattr(self, "log"):
            self.log.close()
            values = [bytes(r.value) for r in self.open()]
            assert values == self.model[self.start:]
        shutil.rmtree(self.dir, ignore_errors=True)


TestSegmentLogModel = SegmentLogModel.TestCase


# ---- typing -----------------------------------------------------------------

def test_seglog_stubs_type_check_usage(tmp_path):
    pytest.importorskip("mypy")
    usage = pathlib.Path(__file__).parent / "typing" / "usage_seglog.py"
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         "--cache-dir=/dev/null", "--ignore-missing-imports", str(usage)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- benchmark harness --------------------------------------------------------

def test_seglog_bench_reports_cases_and_ratios(tmp_path):
    from mqs import bench_seglog

    result = bench_seglog.run_seglog_bench(
        directory=str(tmp_path), scale=0.001, repeat=1,
        cases=["seglog.always.100B", "seglog.read_batch",
               "python.write_flush"])
    cases = {case["case"]: case for case in result["cases"]}
    assert set(cases) == {"seglog.always.100B", "seglog.read_batch",
                          "python.write_flush"}
    assert cases["seglog.always.100B"]["syncs"] == \
        cases["seglog.always.100B"]["amount"]
    assert cases["seglog.read_batch"]["rate_per_s"] > 0
    ratios = {ratio["name"]: ratio for ratio in result["ratios"]}
    assert ratios["read_batch_records_per_s"]["value"] > 0
    assert ratios["always_100B_vs_sqlitequeue"]["met"] is None
    assert "seglog.read_batch" in bench_seglog.format_seglog_bench(result)
    assert list(tmp_path.iterdir()) == []


def test_durable_queue_bench_times_puts_not_exit(tmp_path, monkeypatch):
    from mqs import bench_seglog

    producer = bench_seglog._durable_producer

    def slow_exit_producer(*args):
        producer(*args)
        time.sleep(1.0)

    monkeypatch.setattr(bench_seglog, "_durable_producer",
                        slow_exit_producer)
    done = bench_seglog._durable_queue_round(str(tmp_path), 16)
    assert done.amount == 16
    assert 0 < done.elapsed_ns < 0.9e9


def test_durable_queue_bench_min_puts(tmp_path):
    from mqs import bench_seglog

    result = bench_seglog.run_seglog_bench(
        directory=str(tmp_path), scale=0.001, repeat=1,
        cases=["durable_queue.always.8_processes"])
    (case,) = result["cases"]
    assert case["amount"] == bench_seglog.MIN_PROCESS_PUTS


def test_seglog_bench_compares_with_redis(tmp_path, redis_server_factory):
    # The fixture only checks for redis-server (skip or CI failure):
    # the benchmark starts its own servers.
    pytest.importorskip("redis")
    from mqs import bench_seglog

    result = bench_seglog.run_seglog_bench(
        directory=str(tmp_path), scale=0.01, repeat=1,
        cases=["seglog.interval.100B", "redis.appendfsync_everysec",
               "seglog.always.100B", "redis.appendfsync_always"])
    cases = {case["case"]: case for case in result["cases"]}
    for name in ("redis.appendfsync_everysec", "redis.appendfsync_always"):
        assert "skipped" not in cases[name], cases[name]
        assert cases[name]["amount"] == 30
        assert cases[name]["rate_per_s"] > 0
    ratios = {ratio["name"]: ratio for ratio in result["ratios"]}
    assert ratios["interval_100B_vs_redis_everysec"]["value"] > 0
    assert ratios["interval_100B_vs_redis_everysec"]["target"] == 100.0
    assert ratios["always_100B_vs_redis_always"]["value"] > 0
    assert ratios["always_100B_vs_redis_always"]["target"] == 1.0
    assert "always_100B_vs_redis_always" in \
        bench_seglog.format_seglog_bench(result)
    assert list(tmp_path.iterdir()) == []


RESIDENT_CHILD = """
import sys
import mqs

def rss_file_kib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1])

path, total = sys.argv[1], int(sys.argv[2])
record = bytes(4096 - 64)
before = rss_file_kib()
log = mqs.SegmentLog(path, segment_bytes=16 << 20, fsync="never")
for _ in range(total // 4096 // 64):
    log.append_many([record] * 64)
log.flush()
written = rss_file_kib() - before
views = []
log.close()
reader = mqs.SegmentLog(path, readonly=True)
before = rss_file_kib()
for offset in range(reader.start_offset, reader.end_offset):
    view = reader.read(offset)
    if offset % 10_000 == 0:
        views.append(view)
read = rss_file_kib() - before
assert all(len(v) == len(record) for v in views)
print(written, read)
"""


def test_seglog_resident_memory_follows_pages_in_use(tmp_path):
    """Writing and reading 256 MiB keeps well under 256 MiB of the log
    resident in the process: about one segment plus what is being
    written, not the log's size."""
    total = 256 << 20
    result = subprocess.run(
        [sys.executable, "-c", RESIDENT_CHILD, str(tmp_path / "log"),
         str(total)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    written_kib, read_kib = (int(x) for x in result.stdout.split())
    # One 16 MiB segment plus the writer's 8 MiB release step, with room.
    assert written_kib < 48 << 10
    assert read_kib < 48 << 10


def test_open_rejects_log_broker_directory(tmp_path):
    path = tmp_path / "broker"
    broker = mqs.Broker(backend="log", path=str(path))
    broker.declare_topic("orders")
    broker.close()
    before = sorted(os.listdir(path))
    with pytest.raises(mqs.DirectoryKindError, match="log broker"):
        mqs.SegmentLog(path)
    assert sorted(os.listdir(path)) == before
    reopened = mqs.Broker(backend="log", path=str(path))
    assert reopened.stats("orders")["published"] == 0
    reopened.close()


def test_seglog_forked_writer_rejects_writes(tmp_path):
    """A writer handle inherited through fork raises on writes in the
    child, because the parent keeps the writer lock and would overwrite
    them. Closing it in the child leaves the parent's log and lock alone."""
    path = tmp_path / "log"
    log = mqs.SegmentLog(path, segment_bytes=SEGMENT, fsync="always")
    log.append(b"parent-0")

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            outcome = []
            for call in (lambda: log.append(b"child"),
                         lambda: log.append_many([b"child"]),
                         log.flush, log.roll):
                try:
                    call()
                    outcome.append("wrote")
                except mqs.LogLocked as exc:
                    outcome.append("locked" if "forked" in str(exc)
                                   else str(exc))
            with mqs.SegmentLog(path, readonly=True) as reader:
                outcome.append(bytes(reader.read(0)).decode())
            log.close()
            outcome.append("closed" if log.closed else "open")
            os.write(write_end, ",".join(outcome).encode())
            code = 0
        finally:
            os._exit(code)

    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        report = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == "locked,locked,locked,locked,parent-0,closed"

    # The parent still writes at the next offset and holds the lock.
    assert log.append(b"parent-1") == 1
    with pytest.raises(mqs.LogLocked):
        mqs.SegmentLog(path, segment_bytes=SEGMENT)
    log.close()
    with mqs.SegmentLog(path, readonly=True) as reader:
        assert [bytes(r.value) for r in reader] == [b"parent-0", b"parent-1"]
