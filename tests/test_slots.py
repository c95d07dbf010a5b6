"""`mqs._slots`: bulk reads and writes of ``__slots__`` fields."""

import sys

import pytest

from mqs._slots import new_with_slots, slot_columns


class Point:
    __slots__ = ("x", "y", "label")

    def __init__(self, x, y, label=None):
        self.x = x
        self.y = y
        self.label = label


class Child(Point):
    __slots__ = ()


class Plain:
    def __init__(self):
        self.x = 1


def test_slot_columns_reads_fields_and_types():
    points = [Point(1, 2.0, "a"), Point(3, 4.0, None)]
    columns, kinds = slot_columns(Point, points, ("x", "y", "label"))
    assert columns == [[1, 3], [2.0, 4.0], ["a", None]]
    assert kinds == [int, float, None]


def test_slot_columns_of_no_objects():
    columns, kinds = slot_columns(Point, [], ("x", "y"))
    assert columns == [[], []]
    assert kinds == [None, None]


def test_slot_columns_counts_references():
    value = object()
    point = Point(value, value)
    before = sys.getrefcount(value)
    columns, _ = slot_columns(Point, [point], ("x", "y"))
    assert sys.getrefcount(value) == before + 2
    del columns
    assert sys.getrefcount(value) == before


def test_slot_columns_rejects_other_classes():
    with pytest.raises(TypeError, match="object 1 is a Child, not a Point"):
        slot_columns(Point, [Point(1, 2), Child(3, 4)], ("x",))


def test_slot_columns_rejects_names_outside_slots():
    with pytest.raises(TypeError, match="Point.z is not a __slots__"):
        slot_columns(Point, [Point(1, 2)], ("z",))
    with pytest.raises(TypeError, match="Plain.x is not a __slots__"):
        slot_columns(Plain, [Plain()], ("x",))


def test_slot_columns_raises_for_unset_field():
    point = Point.__new__(Point)
    point.x = 1
    with pytest.raises(AttributeError, match="has no value for 'y'"):
        slot_columns(Point, [point], ("x", "y"))


def test_new_with_slots_builds_objects():
    points = new_with_slots(Point, ("x", "y", "label"),
                            [[1, 3], [2.0, 4.0], ["a", None]])
    assert [type(point) for point in points] == [Point, Point]
    assert [(point.x, point.y, point.label) for point in points] \
        == [(1, 2.0, "a"), (3, 4.0, None)]


def test_new_with_slots_leaves_other_fields_unset():
    (point,) = new_with_slots(Point, ("x",), [[5]])
    assert point.x == 5
    with pytest.raises(AttributeError):
        point.y


def test_new_with_slots_counts_references():
    value = object()
    before = sys.getrefcount(value)
    column = [value] * 3
    points = new_with_slots(Point, ("x",), [column])
    del column
    assert sys.getrefcount(value) == before + 3
    del points
    assert sys.getrefcount(value) == before


def test_new_with_slots_rejects_bad_columns():
    with pytest.raises(ValueError, match="got 1 columns for 2 names"):
        new_with_slots(Point, ("x", "y"), [[1]])
    with pytest.raises(ValueError, match="list of 2 values"):
        new_with_slots(Point, ("x", "y"), [[1, 2], [3]])
    with pytest.raises(ValueError, match="list of 1 values"):
        new_with_slots(Point, ("x", "y"), [[1], (3,)])
