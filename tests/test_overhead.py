"""The per-query shortcuts of the fixed overhead (issue 19) change no key, plan, answer or privacy cost."""

from __future__ import annotations

import pytest

from dpgateway.planner import alias_free
from dpgateway.sqlparse import READ_DIALECT, normalize, parse

QUERIES = [
    "SELECT sex, COUNT(*) AS n, AVG(income) AS a FROM t GROUP BY sex",
    "select   COUNT(*)  from T where income > -1 and sex in (1, 2)",
    "SELECT CASE WHEN age < 30 THEN 'y' ELSE 'o' END AS band, SUM(income) AS s FROM t GROUP BY 1 ORDER BY s LIMIT 3",
    "SELECT EXTRACT(year FROM d) AS y, COUNT(DISTINCT pid) AS u FROM t GROUP BY 1 HAVING COUNT(*) > 2",
    "SELECT sex, PERCENTILE_CONT(0.5) WITHIN GROUP (ORDER BY income) AS med FROM t GROUP BY sex",
]


@pytest.mark.parametrize("sql", QUERIES)
def test_generating_without_a_copy_is_the_same_text(sql: str) -> None:
    """normalize and alias_free generate from a tree nothing else holds, without sqlglot's deep copy: the text
    is what generating a copy gives (so replay and plan-cache keys are unchanged)."""
    assert normalize.__wrapped__(sql) == parse(sql).sql(dialect=READ_DIALECT, normalize=True)
    free = alias_free.__wrapped__(sql)
    if free is not None:
        tree = parse(sql)
        for position, item in enumerate(tree.expressions):
            if item.alias:
                item.set("alias", parse(f'SELECT 1 AS "__out{position}"').expressions[0].args["alias"])
        assert free[0] == tree.sql(dialect=READ_DIALECT, normalize=True)
