"""The per-query shortcuts of the fixed overhead (issue 19) change no key, plan, answer or privacy cost."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpgateway import mechanisms, postprocess
from dpgateway.noise_pool import NoisePool
from dpgateway.sqlparse import READ_DIALECT, normal_forms, parse

QUERIES = [
    "SELECT sex, COUNT(*) AS n, AVG(income) AS a FROM t GROUP BY sex",
    "select   COUNT(*)  from T where income > -1 and sex in (1, 2)",
    "SELECT CASE WHEN age < 30 THEN 'y' ELSE 'o' END AS band, SUM(income) AS s FROM t GROUP BY 1 ORDER BY s LIMIT 3",
    "SELECT EXTRACT(year FROM d) AS y, COUNT(DISTINCT pid) AS u FROM t GROUP BY 1 HAVING COUNT(*) > 2",
    "SELECT sex, PERCENTILE_CONT(0.5) WITHIN GROUP (ORDER BY income) AS med FROM t GROUP BY sex",
]


@pytest.mark.parametrize("sql", QUERIES)
def test_generating_without_a_copy_is_the_same_text(sql: str) -> None:
    """normal_forms generates both texts from one tree nothing else holds, without sqlglot's deep copy: the text
    is what generating a copy gives (so replay and plan-cache keys are unchanged)."""
    text, free = normal_forms.__wrapped__(sql)
    assert text == parse(sql).sql(dialect=READ_DIALECT, normalize=True)
    if free is not None:
        tree = parse(sql)
        for position, item in enumerate(tree.expressions):
            if item.alias:
                item.set("alias", parse(f'SELECT 1 AS "__out{position}"').expressions[0].args["alias"])
        assert free[0] == tree.sql(dialect=READ_DIALECT, normalize=True)


def _per_value(fn: Callable[..., Any], *columns: list[Any]) -> list[Any] | str:
    try:
        return [fn(*row) for row in zip(*columns, strict=True)]
    except postprocess._Declined:
        return "declined"


def _whole(fn: Callable[..., Any], *args: Any) -> list[Any] | str:
    try:
        return fn(*args)
    except postprocess._Declined:
        return "declined"


VALUES = st.one_of(
    st.integers(min_value=-(2**32), max_value=2**32),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 0.0, -0.0, 2**31 - 1, -(2**31) + 1, 2**31, True, "a"]),
)
HOMOGENEOUS = st.one_of(
    st.lists(st.integers(min_value=-(2**32), max_value=2**32), min_size=1, max_size=6),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=6),
    st.lists(VALUES, min_size=1, max_size=6),
)


def _same(a: Any, b: Any) -> bool:
    """Equal values of equal types (NaN equal to NaN)."""
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return len(a) == len(b) and all(
        type(x) is type(y) and (x == y or (x != x and y != y)) for x, y in zip(a, b, strict=True)
    )


@settings(max_examples=300, deadline=None)
@given(data=st.data(), width=st.integers(min_value=1, max_value=3))
def test_column_evaluators_equal_the_per_value_ones(data: st.DataObject, width: int) -> None:
    """Post-processing evaluated a column at a time gives exactly the per-value results and declines alike."""
    n = data.draw(st.integers(min_value=1, max_value=6))
    columns = [(c * n)[:n] for c in (data.draw(HOMOGENEOUS) for _ in range(width))]
    first = columns[0]
    assert _same(_whole(postprocess._checked_column, list(first)), _per_value(postprocess._checked, first))
    assert _same(
        _whole(postprocess._arith_column, operator.neg, first),
        _per_value(lambda v: postprocess._arith(operator.neg, v), first),
    )
    for pick in (max, min):
        assert _same(
            _whole(postprocess._extreme_column, pick, columns),
            _per_value(lambda *row, pick=pick: postprocess._extreme(pick, list(row)), *columns),
        )
    if width >= 2:
        left, right = columns[0], columns[1]
        for op in (operator.add, operator.sub, operator.mul):
            assert _same(
                _whole(postprocess._arith_column, op, left, right),
                _per_value(lambda a, b, op=op: postprocess._arith(op, a, b), left, right),
            )
        assert _same(_whole(postprocess._divide_column, left, right), _per_value(postprocess._divide, left, right))


@pytest.mark.parametrize(
    "values",
    [
        [0, 5, -7, 2**62],
        [mechanisms.I64_MAX, -mechanisms.I64_MAX],
        [2**70, -(2**70), 3],  # beyond 64 bits: saturated
        [True, 2, 3],  # not all plain ints: value by value
        [np.int64(4), 5],
    ],
)
def test_noise_input_is_the_saturated_aggregates(monkeypatch: pytest.MonkeyPatch, values: list[Any]) -> None:
    """OpenDP's measurement gets exactly each value saturated into 64 bits, with or without the shortcut; with
    the noise pool on, the pooled draws (here zeros) are added to exactly those values."""
    seen: list[list[int]] = []
    monkeypatch.setattr(mechanisms, "_vector_laplace", lambda scale: lambda xs: seen.append(xs) or xs)
    monkeypatch.setattr(mechanisms, "NOISE_POOL", None)
    mechanisms.noisy_vector(values, 1.0)
    assert seen == [[mechanisms._saturate(v) for v in values]]
    assert all(type(v) is int for v in seen[0])
    pool = NoisePool(lambda mechanism, scale, n: [0] * n)  # draws of zero: the release is the input itself
    monkeypatch.setattr(mechanisms, "NOISE_POOL", pool)
    released = mechanisms.noisy_vector(values, 1.0)
    pool.close()
    assert released == seen[0] and all(type(v) is int for v in released)
