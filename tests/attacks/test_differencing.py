"""Differencing, averaging, budget races, isolating one person, rare group keys and NULLs: attacks an analyst
with valid credentials can run through ``Gateway.query``, and what bounds them.

Statistical assertions use exact Clopper-Pearson intervals; each states its false-failure probability.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from attack_support import ATTACKER, attack_gateway, clopper_pearson
from helpers import run_concurrently

from dpgateway import Gateway
from dpgateway.errors import BudgetError, DPGatewayError

ALPHA = 1e-3  # false-failure probability of each statistical assertion
COLUMNS = {
    "pid": {"type": "int"},
    "age": {"type": "int", "bounds": [0, 100]},
    "income": {"type": "float", "bounds": [0, 100000]},
    "city": {"type": "str"},
    "sex": {"type": "int", "public_values": [0, 1]},
}
TARGET = 999


def people(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` ordinary people (one row each) living in two big cities."""
    return [
        {
            "pid": i,
            "age": 20 + (i * 7 + seed) % 60,
            "income": 1000.0 * (i % 90),
            "city": ["north", "south"][i % 2],
            "sex": i % 2,
        }
        for i in range(n)
    ]


def target(rows: int = 1, **values: Any) -> list[dict[str, Any]]:
    """The person the attacker is after, with ``rows`` identical rows."""
    row = {"pid": TARGET, "age": 50, "income": 50000.0, "city": "north", "sex": 1, **values}
    return [dict(row) for _ in range(rows)]


def dlap_tail_margin(scale: float, failure: float) -> float:
    """m with P(|Z| >= m) <= failure for discrete Laplace of ``scale`` (P(|Z| >= m) = 2 q^m / (1 + q))."""
    return math.ceil(scale * math.log(2 / failure))


# -- differencing: COUNT with and without one person ---------------------------------------------------


def membership_rates(tmp_path: Path, trials: int, epsilon: float) -> tuple[int, int]:
    """The attacker asks COUNT(*) and says "in" when the answer is at least n + 1: on D + target (true
    positives) and on D (false positives). Replay is off so each trial is a fresh release."""
    n = 100
    hits = []
    for name, rows in (("with", people(n) + target()), ("without", people(n))):
        with attack_gateway(tmp_path / name, rows, COLUMNS, replay="off") as gw:
            answers = [
                gw.query("SELECT COUNT(*) FROM t", analyst=ATTACKER, epsilon=epsilon).rows[0][0] for _ in range(trials)
            ]
        hits.append(sum(a >= n + 1 for a in answers))
    return hits[0], hits[1]


def assert_membership_bounded(tp: int, fp: int, trials: int, epsilon: float) -> None:
    """Pure epsilon-DP: TPR <= e^eps * FPR + delta (delta = 0 for a count). The test {answer >= n + 1} is the
    likelihood-ratio test of the discrete Laplace, for which the bound is tight, so a mechanism with less
    noise than claimed fails it. Fails wrongly w.p. <= ALPHA (each one-sided bound w.p. <= ALPHA / 2)."""
    tpr_lo, _ = clopper_pearson(tp, trials, ALPHA)
    _, fpr_hi = clopper_pearson(fp, trials, ALPHA)
    print(
        f"membership: TPR {tp / trials:.3f} (>= {tpr_lo:.3f}), FPR {fp / trials:.3f} (<= {fpr_hi:.3f}), e^eps {math.exp(epsilon):.3f}"
    )
    assert tpr_lo <= math.exp(epsilon) * fpr_hi
    assert tp > fp  # the attack is the right one: it has some power, as DP allows


def test_differencing_membership_is_bounded_by_epsilon(tmp_path: Path) -> None:
    tp, fp = membership_rates(tmp_path, 200, 1.0)
    assert_membership_bounded(tp, fp, 200, 1.0)


@pytest.mark.slow
def test_differencing_membership_many_trials(tmp_path: Path) -> None:
    tp, fp = membership_rates(tmp_path, 1000, 1.0)
    assert_membership_bounded(tp, fp, 1000, 1.0)


# -- averaging: repeat a query, or rephrase it --------------------------------------------------------


def test_repeating_a_query_replays_the_same_answer_for_free(tmp_path: Path) -> None:
    with attack_gateway(tmp_path, people(50) + target(), COLUMNS) as gw:
        first = gw.query("SELECT COUNT(*) AS n FROM t WHERE pid = 999", analyst=ATTACKER, epsilon=0.5)
        spellings = [
            "SELECT COUNT(*) AS n FROM t WHERE pid = 999",
            "select count(*) as n from t where pid=999",
            "SELECT  COUNT(*)  AS n\nFROM t WHERE pid = 999 ",
        ]
        for sql in spellings * 10:
            again = gw.query(sql, analyst=ATTACKER, epsilon=0.5)
            assert again.replayed and again.epsilon == 0.0 and again.rows == first.rows
        assert gw.remaining(ATTACKER)["analyst"]["epsilon"] == pytest.approx(first.remaining["analyst"]["epsilon"])


REPHRASINGS = [
    "SELECT COUNT(*) FROM t WHERE pid = 999",
    "SELECT COUNT(*) FROM t WHERE pid = 999 AND 1 = 1",
    "SELECT COUNT(*) FROM t WHERE pid IN (999)",
    "SELECT COUNT(*) FROM t WHERE pid BETWEEN 999 AND 999",
    "SELECT COUNT(*) FROM t WHERE NOT pid <> 999",
    "SELECT COUNT(*) FROM t WHERE pid + 0 = 999",
    "SELECT COUNT(*) FROM t WHERE pid * 1 = 999",
    "SELECT COUNT(pid) FROM t WHERE pid = 999",
    "SELECT COUNT(*) AS x FROM t WHERE pid = 999",
    "SELECT COUNT(*) FROM t AS u WHERE u.pid = 999",
]


def test_rephrasing_costs_budget_until_refusal(tmp_path: Path) -> None:
    """Averaging rephrased queries needs fresh budget for each; the analyst cap stops it."""
    cap = {
        "per_subject": {"epsilon": 100.0, "delta": 1e-6},
        "per_analyst": {"epsilon": 2.0, "delta": 1e-6},
        "per_query": {"epsilon": 1.0, "delta": 1e-6},
    }
    with attack_gateway(tmp_path, people(50) + target(), COLUMNS, budget=cap) as gw:
        answered = 0
        for sql in REPHRASINGS:
            try:
                res = gw.query(sql, analyst=ATTACKER, epsilon=0.5)
            except BudgetError as exc:
                assert exc.sqlstate == "53000"
                continue
            assert not res.replayed and res.epsilon == pytest.approx(0.5)
            answered += 1
        assert answered == 4  # 4 x 0.5 = the cap of 2
        assert gw.remaining(ATTACKER)["analyst"]["epsilon"] == pytest.approx(0.0, abs=1e-9)


def test_many_analysts_share_the_subject_domain_cap(tmp_path: Path) -> None:
    """Sybil averaging: fresh analyst names do not bring fresh budget for the same people."""
    cap = {
        "per_subject": {"epsilon": 2.0, "delta": 1e-6},
        "per_analyst": {"epsilon": 100.0, "delta": 1e-6},
        "per_query": {"epsilon": 1.0, "delta": 1e-6},
    }
    with attack_gateway(tmp_path, people(50) + target(), COLUMNS, budget=cap) as gw:
        outcomes = []
        for i in range(8):
            try:
                gw.query("SELECT COUNT(*) FROM t WHERE pid = 999", analyst=f"sybil{i}", epsilon=0.5)
                outcomes.append("ok")
            except BudgetError as exc:
                outcomes.append(exc.sqlstate)
        assert outcomes == ["ok"] * 4 + ["53000"] * 4


# -- budget races ----------------------------------------------------------------------------------------


def test_racing_threads_never_overspend(tmp_path: Path) -> None:
    """16 threads, one analyst with a cap of 1.0, 80 distinct queries of 0.1 each: exactly 10 are answered."""
    cap = {
        "per_subject": {"epsilon": 100.0, "delta": 1e-6},
        "per_analyst": {"epsilon": 1.0, "delta": 1e-6},
        "per_query": {"epsilon": 1.0, "delta": 1e-6},
    }
    results: list[str] = []
    lock = threading.Lock()
    with attack_gateway(tmp_path, people(200), COLUMNS, budget=cap) as gw:

        def attack(worker: int) -> None:
            for i in range(5):
                try:
                    gw.query(f"SELECT COUNT(*) FROM t WHERE age > {worker * 5 + i}", analyst=ATTACKER, epsilon=0.1)
                    outcome = "ok"
                except DPGatewayError as exc:
                    outcome = exc.sqlstate
                with lock:
                    results.append(outcome)

        run_concurrently(attack, 16)
        left = gw.remaining(ATTACKER)["analyst"]["epsilon"]
    assert len(results) == 80 and set(results) <= {"ok", "53000"}
    assert results.count("ok") == 10
    assert left == pytest.approx(0.0, abs=1e-9)


# -- isolating one person: WHERE pid = ..., CASE, joins -------------------------------------------------


def test_filter_on_one_person_is_still_bounded(tmp_path: Path) -> None:
    """The target has 50 rows of income 1e9 (bounds [0, 1e5], k = 3). Asking about them alone at a huge epsilon
    releases at most k * 1e5 plus noise: the released value moves at most by the sensitivity."""
    k, hi, eps = 3, 100000.0, 1000.0
    rich = target(50, income=1e9)
    released = {}
    for name, rows in (("with", people(50) + rich), ("without", people(50))):
        with attack_gateway(tmp_path / name, rows, COLUMNS, k=k) as gw:
            sql = "SELECT SUM(income) AS s, COUNT(*) AS n FROM t WHERE pid = 999"
            plan = gw.explain(sql, epsilon=eps)
            released[name] = gw.query(sql, analyst=ATTACKER, epsilon=eps).rows[0]
    sums = {m.measurement: m for m in plan.mechanisms}
    assert sums["SUM(income)"].sensitivity == pytest.approx(k * hi)
    assert sums["COUNT(*)"].sensitivity == k
    # Each noisy value is within its margin of the exact bounded value w.p. >= 1 - 1e-9 (so this fails
    # wrongly w.p. <= 4e-9); the exact bounded values are k * hi and k with the target, 0 without.
    sum_margin = dlap_tail_margin(sums["SUM(income)"].noise_scale, 1e-9)
    count_margin = dlap_tail_margin(sums["COUNT(*)"].noise_scale, 1e-9)
    assert abs(released["with"][0] - k * hi) <= sum_margin
    assert abs(released["with"][1] - k) <= count_margin
    assert released["without"][0] <= sum_margin and released["without"][1] <= count_margin


@pytest.mark.parametrize(
    ("sql", "sqlstate"),
    [
        ("SELECT SUM(CASE WHEN pid = 999 THEN income END) FROM t", "0A000"),
        ("SELECT SUM(CASE WHEN pid = 999 THEN income ELSE 0 END) FROM t", "0A000"),
        ("SELECT COUNT(CASE WHEN pid = 999 THEN 1 END) FROM t", "0A000"),
        ("SELECT AVG(income * (pid = 999)) FROM t", "0A000"),
        ("SELECT CASE WHEN pid = 999 THEN 'x' ELSE 'y' END AS g, SUM(income) FROM t GROUP BY 1", "42501"),
        ("SELECT pid = 999 AS g, SUM(income) FROM t GROUP BY 1", "42501"),
        ("SELECT pid AS p, COUNT(*) FROM t GROUP BY p", "42501"),
        ("SELECT -pid AS p, COUNT(*) FROM t GROUP BY 1", "42501"),
        ("SELECT SUM(a.income) FROM t AS a JOIN t AS b ON a.age = b.age WHERE a.pid = 999", "42501"),
        ("SELECT SUM(a.income) FROM t AS a, t AS b WHERE a.pid = 999", "42501"),
        ("SELECT SUM(a.income) FROM t AS a CROSS JOIN t AS b", "42501"),
        ("SELECT SUM(a.income) FROM t AS a NATURAL JOIN t AS b", "0A000"),
        ("SELECT SUM(income) FROM t JOIN t AS b USING (pid)", "0A000"),
        ("SELECT SUM(income) FROM t, LATERAL (SELECT 1) AS x", "0A000"),
        ("SELECT SUM(income) FROM t WHERE pid = (SELECT MAX(pid) FROM t)", "0A000"),
        ("SELECT SUM(income) FROM t WHERE EXISTS (SELECT 1 FROM t AS u WHERE u.pid = 999)", "0A000"),
        ("SELECT SUM(income) FROM (SELECT * FROM t UNION ALL SELECT * FROM t) AS u", "0A000"),
        ("SELECT SUM(income) FROM t GROUP BY GROUPING SETS ((city), ())", "0A000"),
        ("SELECT income FROM t WHERE pid = 999", "42501"),
        ("SELECT income, COUNT(*) FROM t WHERE pid = 999 GROUP BY income", None),  # allowed: partition selection
    ],
)
def test_isolation_tricks_are_refused_or_bounded(tmp_path: Path, sql: str, sqlstate: str | None) -> None:
    with attack_gateway(tmp_path, people(50) + target(3), COLUMNS, k=3) as gw:
        if sqlstate is None:
            # The target's income is a private key with a bounded count of k = 3: below the threshold,
            # released w.p. <= delta = 1e-6 per query (20 queries: fails wrongly w.p. <= 2e-5).
            for i in range(20):
                res = gw.query(f"{sql} HAVING {i} = {i}", analyst=ATTACKER, epsilon=1.0, delta=1e-6)
                assert res.rows == []
            return
        with pytest.raises(DPGatewayError, match=r".") as info:
            gw.query(sql, analyst=ATTACKER, epsilon=1.0)
        assert info.value.sqlstate == sqlstate, info.value.message


def test_self_join_on_the_unit_is_bounded(tmp_path: Path) -> None:
    """A self-join on the unit pairs the target's 50 rows with each other (2500 joined rows); the joined
    relation keeps k * k of them, so one person moves the exact sum by at most its sensitivity."""
    k, hi = 3, 100000.0
    sql = "SELECT SUM(a.income) FROM t AS a JOIN t AS b ON a.pid = b.pid WHERE a.pid = 999"
    exact = {}
    for name, rows in (("with", people(50) + target(50, income=1e9)), ("without", people(50))):
        with attack_gateway(tmp_path / name, rows, COLUMNS, k=k) as gw:
            plan = gw.explain(sql, epsilon=1.0).plan
            assert plan is not None and plan.table is not None and plan.table.max_rows_per_unit == k * k
            assert plan.bounded_sql is not None
            exact[name] = gw.connector.execute(plan.bounded_sql).rows[0][0] or 0
    (m,) = plan.measurements
    assert m.sensitivity == k * k * math.ceil(hi * m.scale)
    assert 0 < abs(exact["with"] - exact["without"]) <= m.sensitivity


# -- rare group keys ----------------------------------------------------------------------------------


def rare_key_releases(tmp_path: Path, trials: int, delta: float) -> int:
    """How often the target's unique city is released by ``GROUP BY city`` (k = 2 rows in it)."""
    rows = people(200) + target(2, city="atlantis")
    released = 0
    with attack_gateway(tmp_path, rows, COLUMNS, k=2, replay="off") as gw:
        for i in range(trials):
            if i % 20 == 0:  # the test harness, not the attacker, refills the delta budget (caps are < 1)
                for scope in (f"analyst:{ATTACKER}", "domain:pid"):
                    gw.store.reset(scope, by="test harness")
            res = gw.query(
                "SELECT city, COUNT(*) AS n FROM t GROUP BY city", analyst=ATTACKER, epsilon=1.0, delta=delta
            )
            cities = [r[0] for r in res.rows]
            assert set(cities) <= {"north", "south", "atlantis"}
            released += "atlantis" in cities
    return released


def test_rare_group_key_is_released_with_probability_at_most_delta(tmp_path: Path) -> None:
    """With delta = 0.02 the release probability is observable: its lower confidence bound must not exceed
    delta (fails wrongly w.p. <= ALPHA / 2)."""
    trials, delta = 300, 0.02
    released = rare_key_releases(tmp_path, trials, delta)
    lo, _ = clopper_pearson(released, trials, ALPHA)
    print(f"rare key released {released} / {trials} times (delta {delta})")
    assert lo <= delta


def test_rare_null_key_is_a_rare_key(tmp_path: Path) -> None:
    """A NULL group key only the target has is suppressed like any other rare key."""
    rows = people(200) + target(2, city=None)
    with attack_gateway(tmp_path, rows, COLUMNS, k=2) as gw:
        for i in range(10):  # released w.p. <= 1e-6 each: fails wrongly w.p. <= 1e-5
            res = gw.query(
                f"SELECT city, COUNT(*) FROM t WHERE age >= -{i} GROUP BY city",
                analyst=ATTACKER,
                epsilon=1.0,
                delta=1e-6,
            )
            assert sorted(r[0] for r in res.rows) == ["north", "south"]


# -- NULL handling -----------------------------------------------------------------------------------


def margins(gw: Gateway, sql: str, epsilon: float) -> list[float]:
    """Per output (one measurement each): m with P(|noise| >= m) <= 1e-9, in real units (from EXPLAIN)."""
    return [dlap_tail_margin(m.noise_scale, 1e-9) for m in gw.explain(sql, epsilon=epsilon).mechanisms]


def test_rows_without_a_privacy_unit_are_dropped(tmp_path: Path) -> None:
    """50 rows with a NULL unit cannot be bounded, so they count for nothing (epsilon 1000: little noise).
    Each difference is within two noise margins w.p. >= 1 - 2e-9: fails wrongly w.p. <= 6e-9."""
    base = pd.DataFrame(people(100))
    orphans = pd.DataFrame(target(50, income=90000.0)).assign(pid=None)
    sql = "SELECT COUNT(*), SUM(income), COUNT(income) FROM t"
    answers = {}
    for name, frame in (("base", base), ("orphans", pd.concat([base, orphans]))):
        with attack_gateway(tmp_path / name, frame, COLUMNS) as gw:
            answers[name] = gw.query(sql, analyst=ATTACKER, epsilon=1000.0).rows[0]
            margin = margins(gw, sql, 1000.0)
    for got, expected, m in zip(answers["orphans"], answers["base"], margin, strict=True):
        assert abs(got - expected) <= 2 * m


def test_a_person_with_only_null_values_moves_only_count_star(tmp_path: Path) -> None:
    """Adding a person whose 3 rows hold only NULLs adds 3 to COUNT(*) and nothing to COUNT(income) or SUM(age);
    the NULL public key is dropped. Fails wrongly w.p. <= 6e-9 (two noise margins per difference)."""
    ghost = [{"pid": TARGET, "age": None, "income": None, "city": None, "sex": None}] * 3
    sql = "SELECT COUNT(*), COUNT(income), SUM(age) FROM t"
    answers = {}
    for name, rows in (("without", people(100)), ("with", people(100) + ghost)):
        with attack_gateway(tmp_path / name, rows, COLUMNS, k=3) as gw:
            answers[name] = gw.query(sql, analyst=ATTACKER, epsilon=1000.0).rows[0]
            margin = margins(gw, sql, 1000.0)
            res = gw.query("SELECT sex, COUNT(*) FROM t GROUP BY sex", analyst=ATTACKER, epsilon=1000.0)
            assert [r[0] for r in res.rows] == [0, 1]  # the NULL key is outside the public domain: dropped
    for got, expected, shift, m in zip(answers["with"], answers["without"], (3, 0, 0), margin, strict=True):
        assert abs(got - expected - shift) <= 2 * m


def test_gateway_fixture_budget_is_not_a_bypass(demo_gateway: Gateway) -> None:
    """The per-query cap applies whatever the analyst asks (here the fixture allows 10 per query)."""
    with pytest.raises(DPGatewayError, match=r"budget\.per_query") as info:
        demo_gateway.query("SELECT COUNT(*) FROM pums", analyst=ATTACKER, epsilon=10.5)
    assert info.value.sqlstate == "53400"
