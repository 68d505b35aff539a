"""Literal-only statements (``SELECT 1``, ``SELECT 1 AS x, true, 'a'``), answered by the gateway itself.

Drivers and pools send ``SELECT 1`` to test a connection, often once per checkout. Such a statement names no
table and no function, so its answer is fixed by its text; the session answers it without the shadow catalog's
round trip, with the bytes PostgreSQL 15 sends (RowDescription, DataRow, CommandComplete ``SELECT 1``).

The class is narrow on purpose: ``SELECT`` followed by one or more items, each an integer constant (decimal
digits, optionally after one ``-``), ``true``/``false``, or a string constant without quote or backslash
inside, each optionally followed by ``AS name`` (unquoted, folded to lower case, or double-quoted without
``""`` inside; at most 63 bytes, so never truncated). Anything else (comments, casts, parentheses, ``+``, bare
aliases, underscores in numbers, ...) is not matched and goes where it went before (the shadow catalog).

Types as PostgreSQL's parser gives them (``make_const``; a leading ``-`` is folded into the constant first):
an integer is int4 when it fits, else int8 when it fits, else numeric (not matched here: it goes to the
shadow); ``true``/``false`` bool; a string constant of unknown type in a SELECT list becomes text. Every
column is ``?column?`` unless named with ``AS``. Text output: integers in canonical decimal, booleans ``t``/``f``,
strings as written. Tests: tests/server/test_literals.py compares the bytes with the shadow PostgreSQL's for
every case, and the clients' view with a real PostgreSQL in tests/server/test_differential.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from dpgateway.server import pgtypes as t
from dpgateway.server.protocol import Field

NAMEDATALEN = 64  # PostgreSQL truncates longer names (with a NOTICE): such names are not matched
MAX_LENGTH = 1000  # longer statements are not examined here
MAX_ITEMS = 64  # nor are longer SELECT lists (the event loop runs this: it must stay cheap)
_WS = r"[ \t\n\r\f]"
# possessive quantifiers (*+, ++): no backtracking, so a match costs time linear in the text
_VALUE = r"(?:(-)" + _WS + r"*+)?([0-9]++)|(true|false)|'([^'\\]*+)'"
_NAME = r"[A-Za-z_][A-Za-z0-9_$]*+|\"([^\"]++)\""
_ITEM = re.compile(
    _WS
    + r"*+(?:"
    + _VALUE
    + r")(?:"
    + _WS
    + r"++AS"
    + _WS
    + r"++("
    + _NAME
    + r"))?"
    + _WS
    + r"*+(,|;?"
    + _WS
    + r"*+\Z)",
    re.IGNORECASE,
)
_SELECT = re.compile(_WS + r"*+SELECT(?=" + _WS + ")", re.IGNORECASE)
INT4 = 2**31
INT8 = 2**63


@dataclass(frozen=True)
class Literals:
    """The row shape and the one row of a literal-only SELECT."""

    fields: list[Field]
    row: list[Any]


def literal_select(sql: str) -> Literals | None:
    """The answer of ``sql`` when it is a literal-only SELECT of the narrow class above, else ``None``."""
    if len(sql) > MAX_LENGTH:
        return None
    start = _SELECT.match(sql)
    if start is None:
        return None
    pos, fields, row = start.end(), [], []
    while True:
        item = _ITEM.match(sql, pos)
        if item is None:
            return None
        minus, digits, boolean, text, name, quoted, end = item.groups()
        if digits is not None:
            value: Any = -int(digits) if minus else int(digits)
            if -INT4 <= value < INT4:
                pg = t.INT4
            elif -INT8 <= value < INT8:
                pg = t.INT8
            else:
                return None  # numeric: left to the shadow
        elif boolean is not None:
            value, pg = boolean.lower() == "true", t.BOOL
        else:
            value, pg = text, t.TEXT
        column = "?column?"
        if name is not None:
            column = quoted if quoted is not None else name.lower()
            if "\x00" in column or len(column.encode()) >= NAMEDATALEN:
                return None
        fields.append(Field(column, pg.oid, pg.length))
        row.append(value)
        pos = item.end()
        if end == "," and len(row) == MAX_ITEMS:
            return None
        if end != ",":
            return Literals(fields, row)
