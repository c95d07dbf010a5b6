import os
from collections.abc import Iterable, Iterator
from typing import Callable, NamedTuple, Union

import pyarrow

_BytesLike = Union[bytes, bytearray, memoryview]
_Item = Union[_BytesLike, tuple[_BytesLike | None, _BytesLike]]

class LogRecord(NamedTuple):
    offset: int
    timestamp: int
    key: memoryview | None
    value: memoryview

class SegmentLogStats(NamedTuple):
    start_offset: int
    end_offset: int
    synced_offset: int
    segments: int
    bytes: int
    appended_records: int
    syncs: int
    sync_errno: int
    segments_deleted: int
    records_deleted: int

class RecoveryReport(NamedTuple):
    segments_scanned: int
    records_verified: int
    torn_segments: int
    bytes_zeroed: int
    records_dropped: int
    first_bad_offset: int
    first_bad_segment: int
    first_bad_position: int
    temp_files_removed: int

class SegmentLog:
    path: str
    readonly: bool
    def __init__(
        self,
        path: str | os.PathLike[str],
        segment_bytes: int = ...,
        fsync: str = ...,
        fsync_interval_s: float = ...,
        retention_bytes: int | None = ...,
        retention_s: float | None = ...,
        readonly: bool = ...,
        *,
        fsync_interval_records: int = ...,
    ) -> None: ...
    def append(
        self,
        data: _BytesLike,
        key: _BytesLike | None = ...,
        timestamp: int | None = ...,
    ) -> int: ...
    def append_many(self, items: Iterable[_Item]) -> int: ...
    def flush(self) -> None: ...
    def roll(self) -> None: ...
    def enforce_retention(self) -> int: ...
    def refresh(self) -> int: ...
    def read(self, offset: int) -> memoryview: ...
    def read_record(self, offset: int) -> LogRecord: ...
    def read_batch(
        self, offset: int, max_records: int = ...
    ) -> pyarrow.RecordBatch: ...
    def iter_from(
        self, offset: int | None = ..., *, timestamp: int | None = ...
    ) -> Iterator[LogRecord]: ...
    def __iter__(self) -> Iterator[LogRecord]: ...
    def __len__(self) -> int: ...
    def commit(self, group: str, offset: int) -> None: ...
    def committed(self, group: str) -> int | None: ...
    def stats(self) -> SegmentLogStats: ...
    @property
    def start_offset(self) -> int: ...
    @property
    def end_offset(self) -> int: ...
    @property
    def synced_offset(self) -> int: ...
    @property
    def recovery(self) -> RecoveryReport: ...
    @property
    def fsync(self) -> str: ...
    @property
    def segment_bytes(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def _set_sync_hook(
        self, hook: Callable[[int, int], int | None] | None
    ) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> SegmentLog: ...
    def __exit__(self, *exc_info: object) -> None: ...
