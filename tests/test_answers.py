"""Released answers are close to the exact bounded answers: noise hides people, it does not replace the data.

Each bound below is many noise scales wide, so a false failure has probability < 1e-6 (stated per test).
"""

from __future__ import annotations

import duckdb
import pytest

from dpgateway import Gateway

# Every pid in the bundled sample repeats one row 1-4 times, so with k = 3 the exact bounded statistics
# weight each person's row by min(n, 3), whichever bounding rewrite is used.
EXACT = """
WITH p AS (SELECT pid, ANY_VALUE(sex) AS sex, ANY_VALUE(income) AS income, ANY_VALUE(age) AS age,
                  LEAST(COUNT(*), 3) AS w FROM read_csv(?) GROUP BY pid)
SELECT sex, SUM(w) AS n, SUM(w * income) / SUM(w) AS avg_income, SUM(w * age) AS total_age
FROM p GROUP BY sex ORDER BY sex
"""


def test_counts_sums_and_averages_are_near_the_exact_bounded_values(demo_gateway: Gateway) -> None:
    source = str(demo_gateway.config.tables[0].source)
    exact = duckdb.execute(EXACT, [source]).fetchall()
    res = demo_gateway.query(
        "SELECT sex, COUNT(*) AS n, AVG(income) AS avg_income, SUM(age) AS total_age FROM pums GROUP BY sex",
        analyst="checker",
        epsilon=8.0,
    )
    # 5 measurements at epsilon 1.6: COUNT scale 3/1.6 < 2, so |noise| < 40 w.p. 1 - 1e-9;
    # SUM(age) scale 300/1.6 = 188, so |noise| < 5000 w.p. 1 - 1e-11; AVG(income): centred sum scale
    # 750000/1.6 < 470000 over n > 600 rows, |error| < 15000 w.p. 1 - 1e-7 (counts' noise adds < 0.1%).
    assert [r[0] for r in res.rows] == [row[0] for row in exact]
    for (sex, n, avg, total_age), (_, n_true, avg_true, age_true) in zip(res.rows, exact, strict=True):
        assert abs(n - n_true) < 40, (sex, n, n_true)
        assert abs(avg - avg_true) < 15000, (sex, avg, avg_true)
        assert abs(total_age - age_true) < 5000, (sex, total_age, age_true)


@pytest.mark.parametrize("educ", [9, 13])
def test_private_group_counts_are_near_exact(demo_gateway: Gateway, educ: int) -> None:
    source = str(demo_gateway.config.tables[0].source)
    (n_true,) = duckdb.execute(
        "SELECT SUM(LEAST(c, 3)) FROM (SELECT pid, COUNT(*) AS c FROM read_csv(?) WHERE educ = ? GROUP BY pid)",
        [source, educ],
    ).fetchone()
    res = demo_gateway.query(
        "SELECT educ, COUNT(*) AS n FROM pums GROUP BY educ", analyst="checker", epsilon=4.0, delta=1e-6
    )
    released = dict(res.rows)
    # educ 9 and 13 have > 300 rows, far above the threshold (< 30 at this epsilon): released w.p. > 1 - 1e-9;
    # COUNT noise scale 3/4, so |noise| < 20 w.p. 1 - 1e-11.
    assert abs(released[educ] - n_true) < 20
