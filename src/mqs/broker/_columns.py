"""Compact encodings of one column of values, for `TopicState` snapshots.

A snapshot stores each field of the messages of a topic as one column
(a list with one value per message). Pickling a list of floats, ints,
strs or bytes still costs one pickle opcode and, for strs and bytes,
one memo entry per value, and unpickling it builds one object per
value. `encode_column` turns the common columns into a few large
objects that pickle copies in one piece:

- a column of one repeated None, bool, int, str or nonzero float
  becomes that value and the length;
- floats and 64-bit ints become the bytes of an `array.array`;
- bytes values become one joined blob and an array of lengths;
- strs without a NUL character become one NUL-joined str;
- dicts that are all empty become a count (each gets a new dict back).

Any other column is kept as the list itself, which pickle stores as
before, object identities included. `decode_column` returns a list
equal to the input, element for element and type for type.
"""

from __future__ import annotations

import itertools
from array import array
from typing import Any

__all__ = ["decode_column", "encode_column", "encode_typed_column"]

# Column kinds, the first field of an encoded column.
_CONST, _F64, _I64, _BYTES, _STR, _EMPTY_DICTS, _LIST = range(7)
# A repeated value of these types is stored once. Floats are not in
# the list, because 0.0 == -0.0 would merge two different values; see
# `_encode_floats`.
_CONST_TYPES = (type(None), bool, int, str)
_SEPARATOR = "\0"


def encode_column(values: list[Any]) -> tuple:
    """Return a compact, picklable form of `values` (see module docs)."""
    kinds = set(map(type, values))
    return encode_typed_column(values, kinds.pop() if len(kinds) == 1
                               else None)


def encode_typed_column(values: list[Any], kind: type | None) -> tuple:
    """Return `encode_column(values)`, given the type `kind` that every
    value has, or None if their types differ (or there are none)."""
    count = len(values)
    if kind is None or not count:
        return (_LIST, values)
    first = values[0]
    if kind in _CONST_TYPES and values.count(first) == count:
        return (_CONST, first, count)
    if kind is float:
        return _encode_floats(values)
    if kind is int:
        try:
            return (_I64, array("q", values).tobytes())
        except OverflowError:
            return (_LIST, values)
    if kind is bytes:
        lengths = array("Q", map(len, values))
        return (_BYTES, b"".join(values), lengths.tobytes())
    if kind is str:
        joined = _SEPARATOR.join(values)
        if joined.count(_SEPARATOR) == count - 1:
            return (_STR, joined)
        return (_LIST, values)
    if kind is dict and not any(values):
        return (_EMPTY_DICTS, count)
    return (_LIST, values)


def _encode_floats(values: list[float]) -> tuple:
    first = values[0]
    # `count` compares with ==, which holds for 0.0 and -0.0 and fails
    # for NaN, so only a nonzero value repeated is surely one value.
    if first != 0.0 and values.count(first) == len(values):
        return (_CONST, first, len(values))
    return (_F64, array("d", values).tobytes())


def decode_column(encoded: tuple) -> list[Any]:
    """Return the list that `encode_column` encoded."""
    kind = encoded[0]
    if kind == _CONST:
        return [encoded[1]] * encoded[2]
    if kind == _F64 or kind == _I64:
        numbers = array("d" if kind == _F64 else "q")
        numbers.frombytes(encoded[1])
        return numbers.tolist()
    if kind == _BYTES:
        return _split_bytes(encoded[1], encoded[2])
    if kind == _STR:
        return encoded[1].split(_SEPARATOR)
    if kind == _EMPTY_DICTS:
        return [{} for _ in range(encoded[1])]
    if kind == _LIST:
        return encoded[1]
    raise ValueError(f"unknown snapshot column kind {kind!r}; the snapshot "
                     f"was written by a newer mqs")


def _split_bytes(blob: bytes, lengths_bytes: bytes) -> list[bytes]:
    lengths = array("Q")
    lengths.frombytes(lengths_bytes)
    ends = list(itertools.accumulate(lengths))
    starts = [0, *ends[:-1]]
    return [blob[start:end] for start, end in zip(starts, ends)]
