"""PostgreSQL semantics of post-processing (outputs, HAVING, ORDER BY over noisy values), in both evaluators.

The noisy release is fixed by hand, so the expected answers are what PostgreSQL computes on those values:
``/`` of integers truncates toward zero, ROUND of a numeric rounds half away from zero, NULL propagates.
The Python evaluator (where it answers) and the sandbox DuckDB must both give them.
"""

from __future__ import annotations

from typing import Any

import pytest

from dpgateway import Gateway
from dpgateway.noise import Noisy
from dpgateway.postprocess import _python_outputs, post_processing_sql, run_sandboxed

CASES: list[tuple[str, list[int], list[Any]]] = [
    # (query over GROUP BY sex, noisy COUNT(*) per sex group 0 and 1, expected first output per group)
    ("SELECT COUNT(*) / 7 AS v FROM pums GROUP BY sex", [100, 6], [14, 0]),
    ("SELECT (COUNT(*) - 50) / 7 AS v FROM pums GROUP BY sex", [10, 57], [-5, 1]),  # truncates toward zero
    ("SELECT -COUNT(*) / 4 AS v FROM pums GROUP BY sex", [9, 3], [-2, 0]),
    ("SELECT COUNT(*) / 2 * 2 AS v FROM pums GROUP BY sex", [9, 10], [8, 10]),
    ("SELECT COUNT(*) / 2.0 AS v FROM pums GROUP BY sex", [9, 10], [4.5, 5.0]),  # not an integer division
    ("SELECT sex / 2 + COUNT(*) / 3 AS v FROM pums GROUP BY sex", [7, 8], [2, 2]),  # integer key
    ("SELECT COUNT(*) / (COUNT(*) - 5) AS v FROM pums GROUP BY sex", [5, 7], [None, 3]),  # zero divisor: NULL
    ("SELECT ROUND(COUNT(*) / 2.0) AS v FROM pums GROUP BY sex", [5, -7], [3.0, 0.0]),  # half away (count >= 0)
    ("SELECT ROUND(COUNT(*) / 4.0, 1) AS v FROM pums GROUP BY sex", [1, 3], [0.3, 0.8]),
]


@pytest.mark.parametrize(("sql", "counts", "expected"), CASES, ids=[c[0] for c in CASES])
def test_post_processing_follows_postgresql(
    demo_gateway: Gateway, sql: str, counts: list[int], expected: list[Any]
) -> None:
    plan = demo_gateway.explain(sql, epsilon=1.0).plan
    assert plan is not None
    (count,) = [m.name for m in plan.measurements]
    noisy = Noisy(("__g0", count), ([0, 1], counts), frozenset({count}))
    sandbox = [row[0] for row in run_sandboxed(post_processing_sql(plan), noisy.frame(), what="the outputs").rows]
    assert sandbox == expected
    python = _python_outputs(plan, noisy)
    if python is not None:  # where the Python evaluator answers, it agrees
        assert [row[0] for row in python] == expected


def test_having_and_order_by_use_integer_division(demo_gateway: Gateway) -> None:
    sql = "SELECT sex, COUNT(*) / 10 AS d FROM pums GROUP BY sex HAVING COUNT(*) / 10 >= 1 ORDER BY d DESC"
    plan = demo_gateway.explain(sql, epsilon=1.0).plan
    assert plan is not None
    (count,) = [m.name for m in plan.measurements]
    noisy = Noisy(("__g0", count), ([0, 1], [19, 9]), frozenset({count}))
    rows = run_sandboxed(post_processing_sql(plan), noisy.frame(), what="the outputs").rows
    assert rows == [(0, 1)]  # 19 / 10 = 1 passes; 9 / 10 = 0 does not
