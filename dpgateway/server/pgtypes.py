"""PostgreSQL types on the wire: OIDs, text and binary encoding of results, decoding of bound parameters."""

from __future__ import annotations

import datetime as dt
import math
import struct
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from dpgateway.errors import DPGatewayError


class InvalidParameterValue(DPGatewayError):
    """A bound parameter's bytes do not match its type (SQLSTATE 22P02/08P01 in PostgreSQL)."""

    sqlstate = "22P02"


@dataclass(frozen=True)
class PgType:
    name: str
    oid: int
    length: int


BOOL = PgType("bool", 16, 1)
INT2 = PgType("int2", 21, 2)
INT4 = PgType("int4", 23, 4)
INT8 = PgType("int8", 20, 8)
FLOAT4 = PgType("float4", 700, 4)
FLOAT8 = PgType("float8", 701, 8)
NUMERIC = PgType("numeric", 1700, -1)
TEXT = PgType("text", 25, -1)
VARCHAR = PgType("varchar", 1043, -1)
NAME = PgType("name", 19, 64)  # what current_user, current_schema() and current_database() return
DATE = PgType("date", 1082, 4)
UNKNOWN = PgType("unknown", 705, -2)
BY_OID = {t.oid: t for t in (BOOL, INT2, INT4, INT8, FLOAT4, FLOAT8, NUMERIC, TEXT, VARCHAR, NAME, DATE, UNKNOWN)}
INTEGERS = frozenset({INT2.oid, INT4.oid, INT8.oid})
BINARY_RESULTS = frozenset(
    {BOOL.oid, INT2.oid, INT4.oid, INT8.oid, FLOAT4.oid, FLOAT8.oid, NUMERIC.oid, TEXT.oid, VARCHAR.oid, NAME.oid}
)

POLICY_TYPES = {"int": INT8, "float": FLOAT8, "str": TEXT, "bool": BOOL, "date": DATE}
"""A policy column type as PostgreSQL types it (int columns are int8: the policy does not say narrower)."""

_INT_STRUCT = {INT2.oid: struct.Struct("!h"), INT4.oid: struct.Struct("!i"), INT8.oid: struct.Struct("!q")}
_FLOAT_STRUCT = {FLOAT4.oid: struct.Struct("!f"), FLOAT8.oid: struct.Struct("!d")}


def encode_value(value: Any, oid: int, fmt: int) -> bytes | None:
    """One result value as text (``fmt`` 0) or binary (1) bytes of type ``oid``; ``None`` is SQL NULL."""
    if value is None:
        return None
    if oid in INTEGERS:
        whole = round(value) if isinstance(value, float) else int(value)
        return _INT_STRUCT[oid].pack(whole) if fmt else str(whole).encode()
    if oid in _FLOAT_STRUCT:
        real = float(value)
        return _FLOAT_STRUCT[oid].pack(real) if fmt else _float_text(real).encode()
    if oid == BOOL.oid:
        flag = bool(value)
        return (b"\x01" if flag else b"\x00") if fmt else (b"t" if flag else b"f")
    if fmt and oid == NUMERIC.oid:
        return numeric_binary(Decimal(str(value)))
    if fmt:
        if oid in (TEXT.oid, VARCHAR.oid, NAME.oid, UNKNOWN.oid):
            return _text(value).encode()
        raise InvalidParameterValue(f"binary format is not supported for result type {BY_OID[oid].name}")
    if oid == NUMERIC.oid:
        return (_float_text(value) if isinstance(value, float) else str(value)).encode()
    return _text(value).encode()


def _float_text(number: float) -> str:
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    return repr(number)  # shortest round-trip form, as PostgreSQL 12+ with extra_float_digits >= 1


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat(sep=" ") if isinstance(value, dt.datetime) else value.isoformat()
    return str(value)


def result_format_ok(oid: int, fmt: int) -> bool:
    """Whether results of type ``oid`` can be sent in format ``fmt``."""
    return fmt == 0 or oid in BINARY_RESULTS


# ---- bound parameters -----------------------------------------------------------------------------------


def decode_parameter(data: bytes, oid: int, fmt: int) -> Any:
    """A bound parameter as a Python value: int, float, Decimal, bool, str or date.

    Text parameters of unknown type (OID 0 or 705) stay strings; the statement's own text decides how they
    are used once they are literals.
    """
    try:
        return _binary(data, oid) if fmt else _decode_text(data.decode("utf-8"), oid)
    except (ValueError, InvalidOperation, struct.error, UnicodeDecodeError):
        kind = BY_OID[oid].name if oid in BY_OID else f"type {oid}"
        raise InvalidParameterValue(f"invalid input for a parameter of {kind}") from None


def _decode_text(text: str, oid: int) -> Any:
    if oid in INTEGERS:
        return int(text)
    if oid in _FLOAT_STRUCT:
        return float(text)
    if oid == NUMERIC.oid:
        return Decimal(text)
    if oid == BOOL.oid:
        lowered = text.strip().lower()
        if lowered in ("t", "true", "yes", "on", "1", "y"):
            return True
        if lowered in ("f", "false", "no", "off", "0", "n"):
            return False
        raise ValueError(text)
    if oid == DATE.oid:
        return dt.date.fromisoformat(text)
    return text


def _binary(data: bytes, oid: int) -> Any:
    if oid in _INT_STRUCT:
        return _INT_STRUCT[oid].unpack(data)[0]
    if oid in _FLOAT_STRUCT:
        return _FLOAT_STRUCT[oid].unpack(data)[0]
    if oid == BOOL.oid:
        if len(data) != 1:
            raise ValueError("bool")
        return data != b"\x00"
    if oid in (TEXT.oid, VARCHAR.oid, UNKNOWN.oid, 0):
        return data.decode("utf-8")
    if oid == NUMERIC.oid:
        return _numeric_binary(data)
    if oid == DATE.oid:
        (days,) = struct.unpack("!i", data)
        return dt.date(2000, 1, 1) + dt.timedelta(days=days)
    raise ValueError(f"binary parameters of type {oid}")


def _numeric_binary(data: bytes) -> Decimal:
    """PostgreSQL's binary numeric: ndigits, weight, sign, dscale, then base-10000 digits."""
    ndigits, weight, sign, dscale = struct.unpack_from("!hhHh", data)
    if len(data) != 8 + 2 * ndigits or ndigits < 0:
        raise ValueError("numeric")
    if sign == 0xC000:
        return Decimal("NaN")
    if sign not in (0, 0x4000):
        raise ValueError("numeric sign")
    digits = struct.unpack_from(f"!{ndigits}h", data, 8)
    value = Decimal(0)
    for i, d in enumerate(digits):
        if not 0 <= d < 10000:
            raise ValueError("numeric digit")
        value += Decimal(d).scaleb(4 * (weight - i))
    value = value.quantize(Decimal(1).scaleb(-dscale)) if dscale >= 0 else value
    return -value if sign == 0x4000 else value


def numeric_binary(value: Decimal) -> bytes:
    """PostgreSQL's binary numeric of ``value`` (the inverse of :func:`_numeric_binary`)."""
    if not value.is_finite():
        return struct.pack("!hhHh", 0, 0, 0xC000, 0)
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, digits))
    dscale = max(0, -exponent)
    if exponent > 0:
        text, exponent = text + "0" * exponent, 0
    text = text.rjust(-exponent + 1, "0")
    whole, fraction = text[: len(text) + exponent], text[len(text) + exponent :]
    whole = whole.rjust(-(-len(whole) // 4) * 4, "0")
    fraction = fraction.ljust(-(-len(fraction) // 4) * 4, "0")
    groups = [int(whole[i : i + 4]) for i in range(0, len(whole), 4)]
    weight = len(groups) - 1
    groups += [int(fraction[i : i + 4]) for i in range(0, len(fraction), 4)]
    while groups and groups[0] == 0:
        groups.pop(0)
        weight -= 1
    while groups and groups[-1] == 0:
        groups.pop()
    if not groups:
        weight = 0
    header = struct.pack("!hhHh", len(groups), weight, 0x4000 if sign else 0, dscale)
    return header + struct.pack(f"!{len(groups)}h", *groups)
