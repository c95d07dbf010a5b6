"""Measure the resident memory of a large segment log.

The script writes a log of 2 GiB (by default) in 4 KiB records, then
reads it back with `read` and with `read_batch`. For each phase it
prints the peak growth of the process's file-backed resident memory
(RssFile in /proc/self/status).

A mapped segment is resident only while its pages are in use, so the
peaks should stay near one segment, whatever the size of the log.

    python benchmarks/seglog_resident_memory.py [--size-mib 2048]
        [--segment-mib 64] [--dir DIR]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile

import mqs

RECORD = bytes(4096 - 64)   # 4 KiB once the record header is added


def rss_file_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise RuntimeError("no RssFile line in /proc/self/status")


def measure(path: str, size: int, segment_bytes: int) -> dict[str, int]:
    start = rss_file_kib()
    peak_write = 0
    log = mqs.SegmentLog(path, segment_bytes=segment_bytes, fsync="never")
    for batch in range(size // 4096 // 64):
        log.append_many([RECORD] * 64)
        if batch % 64 == 0:
            peak_write = max(peak_write, rss_file_kib() - start)
    log.flush()
    log.close()

    reader = mqs.SegmentLog(path, readonly=True)
    records = reader.end_offset - reader.start_offset
    start = rss_file_kib()
    peak_read = 0
    for offset in range(reader.start_offset, reader.end_offset):
        view = reader.read(offset)
        assert len(view) == len(RECORD)
        del view
        if offset % 4096 == 0:
            peak_read = max(peak_read, rss_file_kib() - start)

    start = rss_file_kib()
    peak_batch = 0
    offset = reader.start_offset
    while offset < reader.end_offset:
        batch = reader.read_batch(offset, 10_000)
        offset += batch.num_rows
        del batch
        peak_batch = max(peak_batch, rss_file_kib() - start)
    reader.close()
    return {"records": records, "write_kib": peak_write,
            "read_kib": peak_read, "read_batch_kib": peak_batch,
            "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--segment-mib", type=int, default=64)
    parser.add_argument("--dir", default=None,
                        help="where to create the log (default: a "
                             "temporary directory, removed afterwards)")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(dir=args.dir)
    try:
        result = measure(f"{workdir}/log", args.size_mib << 20,
                         args.segment_mib << 20)
    finally:
        shutil.rmtree(workdir)
    print(f"log of {args.size_mib} MiB in {result['records']:,} records, "
          f"segments of {args.segment_mib} MiB")
    print(f"peak growth of RssFile: write {result['write_kib'] >> 10} MiB, "
          f"read {result['read_kib'] >> 10} MiB, "
          f"read_batch {result['read_batch_kib'] >> 10} MiB; "
          f"ru_maxrss {result['maxrss_kib'] >> 10} MiB")


if __name__ == "__main__":
    main()
