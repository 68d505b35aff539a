"""Date GROUP BY keys with public domains: ``EXTRACT``/``date_part`` and ``date_trunc`` of a bounded date column.

``EXTRACT(year FROM d)``, ``EXTRACT(quarter|month|day|dow FROM d)``, ``date_part('year', d)`` and
``date_trunc('year'|'quarter'|'month', d)`` of a ``date`` column with declared ``bounds: [lo, hi]`` read
``d`` clamped to ``[lo, hi]`` (NULL stays NULL), as passes/groups.py clamps numeric columns, so a date
outside the bounds lands in the edge cell. The backend's hooks render the function with PostgreSQL's
meaning (connectors/base.py ``SQLHooks.date_part``/``date_trunc``): parts are BIGINT (``dow`` 0 = Sunday),
a truncation is a TIMESTAMP at midnight of the period's first day, on DuckDB, PostgreSQL and Spark alike.

Proof note (public date domain): the domain is the image of the declared day range ``[lo, hi]`` under the
key's function, computed here from the policy alone: years ``lo.year .. hi.year`` (consecutive days run
through consecutive years), the period starts from ``trunc(lo)`` to ``trunc(hi)``, and for quarter, month,
day and dow the values of the days from ``lo`` to ``min(hi, lo + 800 days)`` (any 800 consecutive days hold
every quarter, month, day of month and weekday, so the rest add nothing). Every row's key lies in it: its
date is clamped into ``[lo, hi]`` first, and a NULL date gives a NULL key, in no public cell. So the released
cells are the same on neighbouring datasets, as for a declared ``public_values`` column, and each is
released once (the values are distinct). A domain over ``MAX_PUBLIC_CELLS`` values (e.g. months over
centuries) is not listed: the clamped key is then private, released through partition selection.
Totality: the clamped date is a real day of years 1 to 9999 (policies/loader.py), where these functions and
casts cannot fail on any backend, so no row can make the query fail (passes/total.py).
Tests: tests/test_dates.py (domains, pandas reference, one person with many rows),
tests/backends/test_conformance.py (identical keys and aggregates on every backend).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlglot import exp

from dpgateway.connectors.base import SQLHooks
from dpgateway.plan import GroupKey
from dpgateway.policies.model import Table

EXTRACT_PARTS = ("YEAR", "QUARTER", "MONTH", "DAY", "DOW")
TRUNC_UNITS = ("YEAR", "QUARTER", "MONTH")
SPAN = dt.timedelta(days=800)  # holds every quarter, month, day of month and weekday


def date_key(expr: exp.Expr, name: str, table: Table, hooks: SQLHooks, cells: int) -> GroupKey | None:
    """The key ``expr`` with a clamped date and its public domain, or None (not such a key, or no bounds).

    ``expr`` is the allowlisted analyst node (kept as the key's ``expr`` so the SELECT list matches it);
    ``cells`` caps the domain's size (``MAX_PUBLIC_CELLS`` of passes/groups.py).
    """
    if isinstance(expr, exp.Extract):
        part, operand = expr.name.upper(), expr.expression
        if part not in EXTRACT_PARTS:
            return None
    elif isinstance(expr, (exp.TimestampTrunc, exp.DateTrunc)):
        unit = expr.args.get("unit")
        part, operand = (unit.name.upper() if unit is not None else ""), expr.this
        if part not in TRUNC_UNITS:
            return None
    else:
        return None
    column = table.column(operand.name) if isinstance(operand, exp.Column) else None
    if column is None or column.type != "date" or column.date_bounds is None:
        return None
    lo, hi = column.date_bounds
    x = exp.column(column.name, quoted=True)
    clamped = exp.Least(
        this=exp.Greatest(this=x.copy(), expressions=[_date(lo)], ignore_nulls=True),
        expressions=[_date(hi)],
        ignore_nulls=True,
    )
    value = exp.Case(ifs=[exp.If(this=exp.Not(this=exp.Is(this=x.copy(), expression=exp.Null())), true=clamped)])
    domain: tuple[Any, ...] | None
    if isinstance(expr, exp.Extract):
        bounded, domain = hooks.date_part(part, value), _part_domain(part, lo, hi)
    else:
        bounded, domain = hooks.date_trunc(part, value), _trunc_domain(part, lo, hi, cells)
    if domain is not None and len(domain) > cells:
        domain = None
    return GroupKey(name=name, expr=expr, public_values=domain, bounded=bounded)


def _date(day: dt.date) -> exp.Expr:
    """A policy date as a DATE literal (our own ISO text, never the analyst's)."""
    return exp.cast(exp.Literal.string(day.isoformat()), "DATE")


def part_of(part: str, day: dt.date) -> int:
    """``EXTRACT(part FROM day)`` as PostgreSQL computes it (``dow``: 0 is Sunday)."""
    return {
        "YEAR": day.year,
        "QUARTER": (day.month - 1) // 3 + 1,
        "MONTH": day.month,
        "DAY": day.day,
        "DOW": day.isoweekday() % 7,
    }[part]


def trunc_of(unit: str, day: dt.date) -> dt.datetime:
    """``date_trunc(unit, day)``: midnight of the first day of the day's year, quarter or month."""
    month = {"YEAR": 1, "QUARTER": (day.month - 1) // 3 * 3 + 1, "MONTH": day.month}[unit]
    return dt.datetime(day.year, month, 1)


def _part_domain(part: str, lo: dt.date, hi: dt.date) -> tuple[int, ...]:
    if part == "YEAR":
        return tuple(range(lo.year, hi.year + 1))
    last = min(hi, lo + SPAN)
    values = {part_of(part, lo + dt.timedelta(days=i)) for i in range((last - lo).days + 1)}
    return tuple(sorted(values))


def _trunc_domain(unit: str, lo: dt.date, hi: dt.date, cells: int) -> tuple[Any, ...] | None:
    step = {"YEAR": 12, "QUARTER": 3, "MONTH": 1}[unit]
    first, last = trunc_of(unit, lo), trunc_of(unit, hi)
    months = (last.year - first.year) * 12 + last.month - first.month
    if months // step + 1 > cells:
        return None
    starts = []
    for i in range(0, months + 1, step):
        year, month = divmod(first.month - 1 + i, 12)
        starts.append(dt.datetime(first.year + year, month + 1, 1))
    return tuple(starts)
