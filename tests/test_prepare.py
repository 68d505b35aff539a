"""Prepared copies: the same exact bounded aggregates as on-the-fly bounding for unfiltered queries (weighted
and row-bounded shapes; every weighted measurement kind read from the copy's stored contributions, with
negative bounds and NULLs), used only while valid, never for filtered queries, and invalidated by any
change of source or policy (a copy built under other bounds is not read)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from helpers import trusted_sql

from dpgateway import Gateway
from dpgateway.cli import cli
from dpgateway.errors import ConfigError, InvalidParameterError, UnknownTableError
from dpgateway.policies.loader import load_config

UNFILTERED = [
    "SELECT COUNT(*) FROM t",
    "SELECT COUNT(income), SUM(income) FROM t",
    "SELECT sex, COUNT(*) AS n, AVG(income) FROM t GROUP BY sex",
    "SELECT region, COUNT(*), STDDEV(age) FROM t GROUP BY region",
    "SELECT CASE WHEN age < 30 THEN 'y' WHEN age < 60 THEN 'm' ELSE 'o' END AS band, COUNT(*) FROM t GROUP BY 1",
    "SELECT sex, VAR_POP(income), COUNT(age) FROM t GROUP BY sex",
    "SELECT region, SUM(income), AVG(age) FROM t GROUP BY region",
    # expressions and FILTER: weighted from the copy's stored unit counts (no stored contribution)
    "SELECT sex, SUM(income * 2) FILTER (WHERE age > 30), AVG(ABS(age - 50) / 7) FROM t GROUP BY sex",
]


EVERY_KIND = [  # every weighted measurement: SUM(x), SUM(x - c), SUM((x - c)^2), COUNT(x), COUNT(*)
    "SELECT SUM(income), AVG(income), VARIANCE(income), COUNT(income), COUNT(*) FROM t",
    "SELECT sex, SUM(age), AVG(age), STDDEV_POP(age), COUNT(age), COUNT(*) FROM t GROUP BY sex",
    "SELECT sex, VAR_POP(income), COUNT(region), COUNT(pid), SUM(income) FROM t GROUP BY sex",
    "SELECT AVG(income), AVG(age) FROM t",
    "SELECT sex, COUNT(income) FROM t GROUP BY sex",
]
BOUNDS = [  # (age, income): non-negative, negative lower, symmetric (SUM(x - c) is SUM(x)), all negative
    ((0, 100), (0, 1000)),
    ((-10, 100), (-300, 900)),
    ((-50, 50), (-500, 500)),
    ((-100, -5), (-2000.5, -0.25)),
]


def _write_data(path: Path, seed: int = 3, n_units: int = 300, *, nulls: bool = False) -> None:
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 11, size=n_units)
    n = int(counts.sum())
    frame = pd.DataFrame(
        {
            "pid": np.repeat(np.arange(n_units), counts),
            "age": rng.integers(-60, 110, size=n) if nulls else rng.integers(0, 110, size=n),
            "income": rng.uniform(-2500, 1200, size=n).round(2) if nulls else rng.uniform(-50, 1200, size=n).round(2),
            "sex": rng.integers(0, 2, size=n),
            "region": rng.integers(0, 8, size=n),
        }
    )
    if nulls:  # NULL values in every column, and NULL units; NaN and infinities among the incomes
        for column in ("age", "income", "region", "pid"):
            frame[column] = frame[column].astype(object).where(rng.random(n) > 0.1)
        frame.loc[frame.index[[3, 17, 41]], "income"] = ["nan", "inf", "-inf"]
    frame.to_csv(path, index=False)


def _config(
    folder: Path,
    *,
    k: int = 3,
    income_hi: float = 1000,
    income_lo: float = 0,
    age: tuple = (0, 100),
    prepare: dict | None = None,
) -> Path:
    policy = {
        "tables": {
            "t": {
                "source": "t.csv",
                "privacy_unit": "pid",
                "max_rows_per_unit": k,
                "columns": {
                    "pid": {"type": "int"},
                    "age": {"type": "int", "bounds": list(age)},
                    "income": {"type": "float", "bounds": [income_lo, income_hi]},
                    "sex": {"type": "int", "public_values": [0, 1]},
                    "region": {"type": "int"},
                },
            },
            "open": {"source": "t.csv", "public": True},
        },
        "budget": {"per_subject": {"epsilon": 1e6, "delta": 0.5}, "per_analyst": {"epsilon": 1e6, "delta": 0.5}},
        "ledger": "sqlite:///ledger.db",
        "cache_dir": "cache",
        "prepare": prepare if prepare is not None else {"auto": False},
    }
    path = folder / "dpgateway.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    _write_data(tmp_path / "t.csv")
    _config(tmp_path)
    return tmp_path


def _exact(gw: Gateway, sql: str) -> tuple[str, list[tuple]]:
    """('prepared' or the on-the-fly rewrite, the exact bounded aggregates)."""
    plan = gw.explain(sql, epsilon=1.0, delta=1e-6).plan
    assert plan is not None
    return "prepared" if plan.prepared else plan.rewrite, sorted(gw.connector.execute(plan.bounded_sql).rows, key=repr)


@pytest.mark.parametrize("sql", UNFILTERED)
def test_prepared_copy_gives_the_on_the_fly_bounded_aggregates(folder: Path, sql: str) -> None:
    with Gateway.from_config(folder / "dpgateway.yaml") as gw:
        rewrite, on_the_fly = _exact(gw, sql)
        scalar = "GROUP BY" not in sql
        expected = (
            "rows"
            if "region" in sql
            else "unit_count"
            if sql == "SELECT COUNT(*) FROM t"
            else "unit_weighted"
            if scalar
            else "weighted"
        )
        assert rewrite == expected
        copy = gw.prepare("t")
        assert Path(copy.path).parent == folder / "cache" and copy.k == 3
        plan = gw.explain(sql, epsilon=1.0, delta=1e-6).plan
        assert plan is not None and plan.prepared == copy.path and plan.rewrite == expected
        assert _exact(gw, sql) == ("prepared", on_the_fly)


@pytest.mark.parametrize("bounds", BOUNDS)
def test_prepared_contributions_give_the_on_the_fly_weighted_aggregates_for_every_kind(
    tmp_path: Path, bounds: tuple
) -> None:
    (age, (income_lo, income_hi)) = bounds
    _write_data(tmp_path / "t.csv", seed=5, nulls=True)
    _config(tmp_path, age=age, income_lo=income_lo, income_hi=income_hi)
    with Gateway.from_config(tmp_path / "dpgateway.yaml") as gw:
        on_the_fly = {sql: _exact(gw, sql) for sql in EVERY_KIND}
        expected = {sql: "weighted" if "GROUP BY" in sql else "unit_weighted" for sql in EVERY_KIND}
        assert {sql: rewrite for sql, (rewrite, _) in on_the_fly.items()} == expected
        gw.prepare("t")
        for sql in EVERY_KIND:
            plan = gw.explain(sql, epsilon=1.0, delta=1e-6).plan
            assert plan is not None and plan.prepared and plan.rewrite == expected[sql]
            # every measurement is a SUM of a stored contribution column: no weighting per row left
            assert '"__n"' not in plan.bounded_sql and "//" not in plan.bounded_sql, plan.bounded_sql
            assert _exact(gw, sql) == ("prepared", on_the_fly[sql][1]), sql


def test_scalar_query_with_a_measurement_the_copy_does_not_store_runs_on_the_fly(folder: Path) -> None:
    """A copy stores each unit's total contribution for bare-column measurements only: ``SUM(income * 2)``
    is pre-aggregated per unit on the fly, and gives the same aggregates with a copy as without."""
    sql = "SELECT SUM(income * 2), COUNT(*), AVG(income) FROM t"
    with Gateway.from_config(folder / "dpgateway.yaml") as gw:
        before = _exact(gw, sql)
        gw.prepare("t")
        assert before[0] == "unit_weighted" and _exact(gw, sql) == before
        stored = _exact(gw, "SELECT COUNT(*), AVG(income) FROM t")
        assert stored[0] == "prepared" and stored[1][0] == before[1][0][1:]


def test_prepared_copy_stores_every_row_with_unit_counts_and_ranks_clustered(folder: Path) -> None:
    source = pd.read_csv(folder / "t.csv")
    with Gateway.from_config(folder / "dpgateway.yaml") as gw:
        copy = gw.prepare("t")
        stored = pd.DataFrame(
            gw.connector.execute(trusted_sql(f"SELECT pid, __n, __rn FROM read_parquet('{copy.path}')")).rows,
            columns=["pid", "n", "rn"],
        )
    assert len(stored) == len(source)  # every row (no NULL units in this file), unclamped values
    assert stored["pid"].is_monotonic_increasing  # clustered by unit
    sizes = source.groupby("pid").size()
    assert (stored["n"].to_numpy() == sizes.loc[stored["pid"]].to_numpy()).all()
    ranks = stored.groupby("pid")["rn"].apply(list)
    assert all(r == list(range(1, len(r) + 1)) for r in ranks)


FILTERED = [  # every rewrite and every weighted kind, with filters on several columns
    "SELECT COUNT(*) FROM t WHERE age > 40",
    "SELECT SUM(income), AVG(income), VARIANCE(income), COUNT(income), COUNT(*) FROM t WHERE sex = 1",
    "SELECT sex, SUM(age), AVG(age), STDDEV_POP(age), COUNT(age) FROM t WHERE income < 300 GROUP BY sex",
    "SELECT region, COUNT(*), AVG(income) FROM t WHERE age BETWEEN 20 AND 70 GROUP BY region",
    "SELECT CASE WHEN age < 30 THEN 'y' ELSE 'o' END AS b, COUNT(*) FROM t WHERE income > 0 OR region = 2 GROUP BY 1",
    "SELECT sex, COUNT(pid) FROM t WHERE pid * 2 > 150 GROUP BY sex",
    "SELECT age, SUM(income) FROM t WHERE sex = 0 GROUP BY age",
    "SELECT sex, SUM(income * 2) FILTER (WHERE age > 30), AVG(ABS(age - 50) / 7), COUNT(*) FILTER (WHERE region = 2) "
    "FROM t WHERE income > 0 GROUP BY sex",
    "SELECT age / 10 AS d, COUNT(*), SUM(COALESCE(income, 0)) FROM t WHERE sex = 1 GROUP BY 1",
]


@pytest.mark.parametrize("bounds", BOUNDS[1:3])
def test_bound_first_filtered_queries_read_the_copy_and_give_the_on_the_fly_aggregates(
    tmp_path: Path, bounds: tuple
) -> None:
    """Under ``prepare.filtered: bound_first`` the cold path computes the estimator a copy answers: a copy
    changes speed, never the exact bounded aggregates (negative bounds, NULL values and units)."""
    (age, (income_lo, income_hi)) = bounds
    _write_data(tmp_path / "t.csv", seed=6, nulls=True)
    _config(
        tmp_path, age=age, income_lo=income_lo, income_hi=income_hi, prepare={"filtered": "bound_first", "auto": False}
    )
    with Gateway.from_config(tmp_path / "dpgateway.yaml") as gw:
        on_the_fly = {sql: _exact(gw, sql) for sql in FILTERED}
        rewrites = [*["weighted"] * 3, "rows", "weighted", "weighted", "rows", "weighted", "weighted"]
        assert [r for r, _ in on_the_fly.values()] == rewrites
        gw.prepare("t")
        for sql in FILTERED:
            plan = gw.explain(sql, epsilon=1.0, delta=1e-6).plan
            assert plan is not None and plan.prepared
            assert _exact(gw, sql) == ("prepared", on_the_fly[sql][1]), sql


def test_bound_first_differs_from_filter_first_only_for_units_with_more_than_k_rows(tmp_path: Path) -> None:
    """The two estimators agree when no unit has more than k rows, and bound-first is lower otherwise."""
    sql = "SELECT COUNT(*), SUM(income) FROM t WHERE age > 30"
    _write_data(tmp_path / "t.csv")
    answers = {}
    for k in (3, 10):  # _write_data gives 1-10 rows per unit
        for order in ("filter_first", "bound_first"):
            _config(tmp_path, k=k, prepare={"filtered": order, "auto": False})
            with Gateway.from_config(tmp_path / "dpgateway.yaml") as gw:
                answers[k, order] = _exact(gw, sql)[1]
    assert answers[10, "filter_first"] == answers[10, "bound_first"]
    ((count_ff, sum_ff),), ((count_bf, sum_bf),) = answers[3, "filter_first"], answers[3, "bound_first"]
    assert count_bf < count_ff and sum_bf < sum_ff


@pytest.mark.parametrize("order", ["filter_first", "bound_first"])
def test_explain_names_the_estimator_of_a_filtered_query(tmp_path: Path, order: str) -> None:
    _write_data(tmp_path / "t.csv")
    _config(tmp_path, prepare={"filtered": order, "auto": False})
    with Gateway.from_config(tmp_path / "dpgateway.yaml") as gw:
        notes = gw.explain("SELECT COUNT(*) FROM t WHERE age > 3").notes
        assert any(f"prepare.filtered: {order}" in n for n in notes), notes
        assert not any("estimator" in n for n in gw.explain("SELECT COUNT(*) FROM t").notes)


def test_filtered_queries_do_not_use_the_copy(folder: Path) -> None:
    with Gateway.from_config(folder / "dpgateway.yaml") as gw:
        gw.prepare("t")
        assert _exact(gw, "SELECT sex, SUM(income) FROM t WHERE age > 40 GROUP BY sex")[0] == "weighted"
        assert _exact(gw, "SELECT region, SUM(income) FROM t WHERE age > 40 GROUP BY region")[0] == "rows"
        assert _exact(gw, "SELECT COUNT(*) FROM t WHERE age > 40")[0] == "unit_count"
        assert _exact(gw, "SELECT COUNT(*) FROM t")[0] == "prepared"


def test_a_changed_source_invalidates_the_copy(folder: Path) -> None:
    with Gateway.from_config(folder / "dpgateway.yaml") as gw:
        gw.prepare("t")
        assert _exact(gw, "SELECT COUNT(*) FROM t")[0] == "prepared"
        _write_data(folder / "t.csv", seed=4)  # new content
        rewrite, fresh = _exact(gw, "SELECT COUNT(*) FROM t")
        assert rewrite == "unit_count"
        gw.prepare("t")
        assert _exact(gw, "SELECT COUNT(*) FROM t") == ("prepared", fresh)
        stat = (folder / "t.csv").stat()
        os.utime(folder / "t.csv", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched only
        assert _exact(gw, "SELECT COUNT(*) FROM t")[0] == "unit_count"


@pytest.mark.parametrize("change", [{"k": 4}, {"income_hi": 2000}])
def test_a_changed_policy_invalidates_the_copy(folder: Path, change: dict) -> None:
    with Gateway.from_config(folder / "dpgateway.yaml") as gw:
        gw.prepare("t")
        assert _exact(gw, "SELECT COUNT(*) FROM t")[0] == "prepared"
    _config(folder, **change)
    with Gateway.from_config(folder / "dpgateway.yaml") as gw:
        assert _exact(gw, "SELECT COUNT(*) FROM t")[0] == "unit_count"


@pytest.mark.parametrize("change", [{"income_lo": -100}, {"income_hi": 2000}, {"age": (10, 100)}])
def test_a_copy_built_under_other_bounds_is_not_read(folder: Path, change: dict) -> None:
    """The stored contributions are clamped, centred and scaled by the bounds: other bounds, other values."""
    sql = "SELECT sex, SUM(income), AVG(age), VARIANCE(income) FROM t GROUP BY sex"
    with Gateway.from_config(folder / "dpgateway.yaml") as gw:
        old = gw.prepare("t")
        assert _exact(gw, sql)[0] == "prepared"
    _config(folder, **change)
    with Gateway.from_config(folder / "dpgateway.yaml") as gw:
        assert Path(old.path).is_file()  # still on disk, but not valid for the new bounds
        rewrite, on_the_fly = _exact(gw, sql)
        assert rewrite == "weighted"
        new = gw.prepare("t")
        assert new.path != old.path
        assert _exact(gw, sql) == ("prepared", on_the_fly)


def test_another_secret_seed_invalidates_the_copy(folder: Path) -> None:
    with Gateway.from_config(folder / "dpgateway.yaml") as gw:
        gw.prepare("t")
    (folder / "ledger.db").unlink()  # a new ledger has a new secret seed
    with Gateway.from_config(folder / "dpgateway.yaml") as gw:
        assert _exact(gw, "SELECT COUNT(*) FROM t")[0] == "unit_count"


def test_prepared_queries_are_answered_and_charged(folder: Path) -> None:
    with Gateway.from_config(folder / "dpgateway.yaml") as gw:
        gw.prepare("t")
        res = gw.query("SELECT sex, COUNT(*) AS n FROM t GROUP BY sex", analyst="ann", epsilon=1.0)
        assert res.epsilon == pytest.approx(1.0) and res.columns == ["sex", "n"]
        assert any("prepared" in n for n in gw.explain("SELECT COUNT(*) FROM t").notes)


def test_prepare_refuses_tables_without_a_unit(folder: Path) -> None:
    with Gateway.from_config(folder / "dpgateway.yaml") as gw:
        with pytest.raises(InvalidParameterError, match="no privacy_unit"):
            gw.prepare("open")
        with pytest.raises(UnknownTableError, match="does not exist"):
            gw.prepare("nope")


def test_cli_prepare(folder: Path) -> None:
    result = CliRunner().invoke(cli, ["prepare", "t", "--config", str(folder / "dpgateway.yaml")])
    assert result.exit_code == 0, result.output
    assert "prepared t:" in result.output and (folder / "cache" / "t.json").is_file()
    missing = CliRunner().invoke(cli, ["prepare", "nope", "--config", str(folder / "dpgateway.yaml")])
    assert missing.exit_code == 1 and "42P01" in missing.output


def _auto(folder: Path, after: int = 2, **prepare: object) -> Gateway:
    _config(folder, prepare={"auto": True, "after_queries": after, **prepare})
    return Gateway.from_config(folder / "dpgateway.yaml")


def _copy_used(gw: Gateway, sql: str = "SELECT COUNT(*) FROM t") -> bool:
    plan = gw.explain(sql, epsilon=1.0, delta=1e-6).plan
    return plan is not None and plan.prepared is not None


def test_a_table_queried_repeatedly_is_prepared_in_the_background(folder: Path) -> None:
    with _auto(folder, after=2) as gw:
        gw.query("SELECT COUNT(*) AS a FROM t", analyst="ann", epsilon=0.1)
        gw.auto_prepare.wait()
        assert not _copy_used(gw)  # one query: not yet
        gw.query("SELECT COUNT(*) AS b FROM t", analyst="ann", epsilon=0.1)
        gw.auto_prepare.wait()
        assert _copy_used(gw)
        assert stat_mode(folder / "cache") == 0o700
        assert {stat_mode(f) for f in (folder / "cache").iterdir()} == {0o600}


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_auto_false_never_prepares(folder: Path) -> None:
    with _auto(folder, after=1, auto=False) as gw:
        for i in range(3):
            gw.query(f"SELECT COUNT(*) AS a{i} FROM t", analyst="ann", epsilon=0.1)
        gw.auto_prepare.wait()
        assert not _copy_used(gw) and not (folder / "cache").exists()


def test_filter_first_queries_do_not_trigger_preparation(folder: Path) -> None:
    with _auto(folder, after=1) as gw:
        gw.query("SELECT COUNT(*) AS a FROM t WHERE age > 3", analyst="ann", epsilon=0.1)
        gw.auto_prepare.wait()
        assert not (folder / "cache").exists()
    with _auto(folder, after=1, filtered="bound_first") as gw:
        gw.query("SELECT COUNT(*) AS b FROM t WHERE age > 3", analyst="ann", epsilon=0.1)  # b: not a replay
        gw.auto_prepare.wait()
        assert _copy_used(gw, "SELECT COUNT(*) FROM t WHERE age > 4")


def test_automatic_preparation_never_blocks_a_query(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The build is held until every query below has been answered: queries never wait for it."""
    release = threading.Event()
    with _auto(folder, after=1) as gw:
        materialize = gw.connector.materialize

        def held(sql: object, path: str) -> int:
            assert release.wait(30), "the build was never released"
            return materialize(sql, path)  # type: ignore[arg-type]

        monkeypatch.setattr(gw.connector, "materialize", held)
        for i in range(5):
            result = gw.query(f"SELECT sex, COUNT(*) AS n{i} FROM t GROUP BY sex", analyst="ann", epsilon=0.1)
            assert result.columns == ["sex", f"n{i}"] and not _copy_used(gw)
        release.set()
        gw.auto_prepare.wait()
        assert _copy_used(gw)


def test_automatic_preparation_never_changes_an_answer_or_its_cost(folder: Path) -> None:
    """Same exact bounded aggregates, same mechanisms, same charge, before and after the copy appears."""
    sqls = [
        "SELECT sex, COUNT(*) AS n, AVG(income) AS a FROM t GROUP BY sex",
        "SELECT region, SUM(income) AS s FROM t GROUP BY region",
        "SELECT COUNT(*) AS n FROM t WHERE age > 30",
    ]
    with _auto(folder, after=1, filtered="bound_first") as gw:
        before = {sql: (_exact(gw, sql)[1], gw.explain(sql, epsilon=0.5).mechanisms) for sql in sqls}
        charged = [gw.query(sql, analyst="ann", epsilon=0.5).epsilon for sql in sqls]
        gw.auto_prepare.wait()
        for sql in sqls:
            assert _copy_used(gw, sql)
            assert (_exact(gw, sql)[1], gw.explain(sql, epsilon=0.5).mechanisms) == before[sql]
        again = [gw.query(sql.replace(" FROM", " , 1 AS one FROM"), analyst="ann", epsilon=0.5) for sql in sqls]
        assert [r.epsilon for r in again] == charged == [0.5, 0.5, 0.5]
        assert gw.remaining("ann")["analyst"]["epsilon"] == pytest.approx(1e6 - 3.0)


def test_a_source_rewritten_while_the_copy_is_built_is_never_served_stale(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _auto(folder, after=1) as gw:
        materialize = gw.connector.materialize

        def rewrite_then_build(sql: object, path: str) -> int:
            rows = materialize(sql, path)  # type: ignore[arg-type]
            _write_data(folder / "t.csv", seed=9)  # the source changes after it was read
            return rows

        monkeypatch.setattr(gw.connector, "materialize", rewrite_then_build)
        gw.query("SELECT COUNT(*) AS a FROM t", analyst="ann", epsilon=0.1)
        gw.auto_prepare.wait()
        assert (folder / "cache" / "t.json").is_file()  # a copy was written ...
        rewrite, fresh = _exact(gw, "SELECT COUNT(*) FROM t")
        assert rewrite == "unit_count"  # ... but is never read: it is of the old file
        monkeypatch.setattr(gw.connector, "materialize", materialize)
        gw.query("SELECT COUNT(*) AS b FROM t", analyst="ann", epsilon=0.1)  # a later query rebuilds it
        gw.auto_prepare.wait()
        assert _exact(gw, "SELECT COUNT(*) FROM t") == ("prepared", fresh)


def test_a_failed_build_is_not_retried_until_the_source_changes(folder: Path) -> None:
    (folder / "cache").write_text("not a folder")  # cache_dir unusable
    with _auto(folder, after=1) as gw:
        calls = []
        build = gw.auto_prepare._build
        gw.auto_prepare._build = lambda table: (calls.append(table), build(table))  # type: ignore[method-assign]
        for i in range(3):
            gw.query(f"SELECT COUNT(*) AS a{i} FROM t", analyst="ann", epsilon=0.1)
            gw.auto_prepare.wait()
        assert calls == ["t"]
        _write_data(folder / "t.csv", seed=10)
        gw.query("SELECT COUNT(*) AS z FROM t", analyst="ann", epsilon=0.1)
        gw.auto_prepare.wait()
        assert calls == ["t", "t"]


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        ({"auto": "yes"}, "prepare.auto: must be true"),
        ({"after_queries": 0}, "prepare.after_queries: must be a whole number"),
        ({"after_queries": 1.5}, "prepare.after_queries: must be a whole number"),
        ({"filtered": "later"}, "prepare.filtered: must be filter_first"),
        ({"when": 1}, "prepare"),
    ],
)
def test_prepare_settings_are_validated(tmp_path: Path, prepare: dict, message: str) -> None:
    _config(tmp_path, prepare=prepare)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "dpgateway.yaml")
