"""Wire encodings of values and parameters."""

from __future__ import annotations

import datetime as dt
import struct
from decimal import Decimal

import pytest

from dpgateway.server import pgtypes as t


@pytest.mark.parametrize(
    "text", ["0", "1", "-1", "12345.678", "0.001", "10000", "-0.5", "123456789012345678.25", "1E+5", "3.50"]
)
def test_numeric_binary_round_trip(text: str) -> None:
    value = Decimal(text)
    assert t._numeric_binary(t.numeric_binary(value)) == value


def test_numeric_binary_matches_postgresql_layout() -> None:
    # 12345.678 = [1][2345].[6780], weight 1, dscale 3 (as PostgreSQL's numeric_send writes it)
    assert t.numeric_binary(Decimal("12345.678")) == struct.pack("!hhHhhhh", 3, 1, 0, 3, 1, 2345, 6780)


@pytest.mark.parametrize(
    ("value", "oid", "fmt", "expected"),
    [
        (5, t.INT8.oid, 0, b"5"),
        (5, t.INT8.oid, 1, struct.pack("!q", 5)),
        (4.6, t.INT8.oid, 0, b"5"),
        (0.1, t.FLOAT8.oid, 0, b"0.1"),
        (float("nan"), t.FLOAT8.oid, 0, b"NaN"),
        (True, t.BOOL.oid, 0, b"t"),
        (False, t.BOOL.oid, 1, b"\x00"),
        ("é", t.TEXT.oid, 1, "é".encode()),
        (None, t.TEXT.oid, 0, None),
        (dt.date(2024, 1, 2), t.DATE.oid, 0, b"2024-01-02"),
    ],
)
def test_encode_value(value: object, oid: int, fmt: int, expected: bytes | None) -> None:
    assert t.encode_value(value, oid, fmt) == expected


@pytest.mark.parametrize(
    ("data", "oid", "fmt", "expected"),
    [
        (b"42", t.INT4.oid, 0, 42),
        (struct.pack("!h", -3), t.INT2.oid, 1, -3),
        (struct.pack("!d", 2.5), t.FLOAT8.oid, 1, 2.5),
        (b"on", t.BOOL.oid, 0, True),
        (b"\x01", t.BOOL.oid, 1, True),
        (b"1.50", t.NUMERIC.oid, 0, Decimal("1.50")),
        (t.numeric_binary(Decimal("-7.25")), t.NUMERIC.oid, 1, Decimal("-7.25")),
        (struct.pack("!i", 1), t.DATE.oid, 1, dt.date(2000, 1, 2)),
        (b"abc", 0, 0, "abc"),
    ],
)
def test_decode_parameter(data: bytes, oid: int, fmt: int, expected: object) -> None:
    assert t.decode_parameter(data, oid, fmt) == expected


@pytest.mark.parametrize(
    ("data", "oid", "fmt"), [(b"x", t.INT8.oid, 0), (b"\x00\x01", t.INT8.oid, 1), (b"maybe", t.BOOL.oid, 0)]
)
def test_bad_parameters_are_22P02(data: bytes, oid: int, fmt: int) -> None:
    with pytest.raises(t.InvalidParameterValue, match="invalid input for a parameter") as info:
        t.decode_parameter(data, oid, fmt)
    assert info.value.sqlstate == "22P02"
