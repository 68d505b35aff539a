"""SQL injection through the analyst's query: the parser allowlist, the round-trip check and the locked engine.

Each layer is tested on its own (a test per layer would fail without it), then together by a hypothesis
property test that puts injection text into every node kind that carries text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlglot
import yaml
from helpers import GENEROUS_BUDGET, trusted_sql, write_csv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlglot import exp

from dpgateway import Gateway
from dpgateway.connectors.base import ExactAggregates, MockConnector
from dpgateway.connectors.duckdb import DuckDBConnector
from dpgateway.errors import BackendError, DPGatewayError, InternalError, PrivacyViolationError, UnsupportedError
from dpgateway.policies.loader import load_config
from dpgateway.sqlcheck import VerifiedSQL, verify

ROWS = [
    {"pid": i, "age": 20 + i, "sex": i % 2, "city": "abc"[i % 3], "born": "2000-01-0" + str(1 + i % 9)}
    for i in range(40)
]
COLUMNS = {
    "pid": {"type": "int"},
    "age": {"type": "int", "bounds": [0, 100]},
    "sex": {"type": "int", "public_values": [0, 1]},
    "city": {"type": "str"},
    "born": {"type": "date"},
}


def _config(folder: Path) -> Path:
    write_csv(folder / "t.csv", ROWS)
    write_csv(folder / "regions.csv", [{"code": 1, "name": "north"}, {"code": 2, "name": "south"}])
    write_csv(folder / "other.csv", [{"pid": 1, "secret": 42}])
    policy = {
        "tables": {
            "clinic.t": {"source": "t.csv", "privacy_unit": "pid", "max_rows_per_unit": 2, "columns": COLUMNS},
            "billing.t": {"source": "other.csv", "privacy_unit": "pid", "columns": {"pid": {"type": "int"}}},
            "regions": {"source": "regions.csv", "public": True},
        },
        "budget": GENEROUS_BUDGET,
        "ledger": f"sqlite:///{folder / 'ledger.db'}",
    }
    (folder / "dpgateway.yaml").write_text(yaml.safe_dump(policy))
    return folder / "dpgateway.yaml"


def _recording_gateway(folder: Path) -> tuple[Gateway, list[str]]:
    """A gateway whose backend is the real DuckDB connector, recording every statement it is given."""
    config = load_config(_config(folder))
    real = DuckDBConnector.for_config(config)
    seen: list[str] = []

    def answer(sql: str) -> ExactAggregates:
        assert isinstance(sql, VerifiedSQL)  # MockConnector.execute let only verified SQL through
        seen.append(sql)
        return real.execute(sql)

    recorder = MockConnector(answer)
    recorder.hooks = real.hooks
    return Gateway(config, connector=recorder), seen


@pytest.fixture
def gateway(tmp_path: Path) -> Any:
    with Gateway.from_config(_config(tmp_path)) as gw:
        yield gw


# -- layer 1: the parser allowlist ----------------------------------------------------------------------

INJECTIONS = [
    # The date-part unit of EXTRACT / date_part closed the TRY(...) wrapper and appended a subquery
    """SELECT COUNT(*) FROM clinic.t WHERE EXTRACT("year FROM age)) > 0 OR (SELECT COUNT(*) FROM read_text('x')) > 0 OR TRY((1" FROM age) > 0""",
    """SELECT COUNT(*) FROM clinic.t WHERE date_part('year FROM born)) > 0 OR (SELECT MAX(age) FROM typed) > 0 --', born) > 0""",
    """SELECT COUNT(*) FROM clinic.t WHERE date_trunc('month'', x) FROM read_csv(''/etc/passwd'')) --', born) IS NULL""",
    # A type parameter was generated verbatim
    """SELECT COUNT(*) FROM clinic.t WHERE CAST(age AS DECIMAL("a)) > 0 OR (SELECT 1) = 1 OR CAST(1 AS DECIMAL(1", 2)) > 0""",
    """SELECT COUNT(*) FROM clinic.t WHERE CAST(age AS "my) type") > 0""",
    """SELECT sex, COUNT(*) FROM clinic.t GROUP BY sex HAVING COUNT(*) > LENGTH(version())""",
]


@pytest.mark.parametrize("sql", INJECTIONS)
def test_injected_text_never_reaches_the_bounded_sql(tmp_path: Path, sql: str) -> None:
    """Before the allowlist the first query's bounded SQL held ``(SELECT COUNT(*) FROM READ_TEXT('X'))``."""
    gw, seen = _recording_gateway(tmp_path)
    with gw, pytest.raises(UnsupportedError, match=r"not supported|unknown date part|must be integers"):
        gw.query(sql, analyst="mallory", epsilon=1.0)
    assert seen == []


def test_date_parts_are_rebuilt_from_the_keyword_list(gateway: Gateway) -> None:
    plan = gateway.explain("SELECT COUNT(*) FROM clinic.t WHERE date_part('year', born) = 2000").plan
    assert plan is not None and "EXTRACT(YEAR FROM" in plan.bounded_sql
    extract = next(plan.bounded.find_all(exp.Extract))  # type: ignore[union-attr]
    assert extract.this == exp.var("YEAR")


# -- layer 2: the round trip ----------------------------------------------------------------------------


def test_verification_refuses_a_tree_that_parses_back_differently() -> None:
    """A node whose text the generator writes verbatim (a Var) is what the allowlist stops; verify stops it too."""
    source = exp.to_table("t")
    built = exp.select(exp.Extract(this=exp.var("YEAR FROM x) + (SELECT 1"), expression=exp.column("x"))).from_(source)
    with pytest.raises(PrivacyViolationError, match="failed verification"):
        verify(built, "duckdb", sources=[source])
    assert verify(exp.select(exp.column("x")).from_(source), "duckdb", sources=[source]) == "SELECT x FROM t"


@pytest.mark.parametrize(
    ("built", "why"),
    [
        (exp.select("x").from_("other"), "neither the declared source"),
        (exp.select(exp.func("read_text", exp.Literal.string("/etc/passwd"))).from_("t"), "uses READ_TEXT"),
        (exp.select(exp.Subquery(this=exp.select("x").from_("t"))).from_("t"), "(?i)subquery"),
    ],
)
def test_verification_allows_only_the_source_and_allowlisted_functions(built: exp.Expr, why: str) -> None:
    with pytest.raises(PrivacyViolationError, match=why):
        verify(built, "duckdb", sources=[exp.to_table("t")])


def test_connectors_accept_only_verified_sql() -> None:
    mock = MockConnector(lambda sql: ExactAggregates(columns=(), rows=()))
    with pytest.raises(InternalError, match="not verified"):
        mock.execute("SELECT 1")  # type: ignore[arg-type]
    with pytest.raises(InternalError, match="created only by"):
        VerifiedSQL("SELECT 1")
    assert mock.statements == []


# -- layer 3: the locked engine -------------------------------------------------------------------------


def test_locked_engine_refuses_other_files(gateway: Gateway, tmp_path: Path) -> None:
    """Were both layers above to miss a case, the data connection still reads only the policy's files."""
    connector = gateway.connector
    for sql in (
        "SELECT * FROM read_text('/etc/passwd')",
        f"SELECT * FROM read_csv('{tmp_path / 'ledger.db'}')",
        "SET enable_external_access = true",
        "INSTALL httpfs",
    ):
        with pytest.raises(BackendError, match="could not run"):
            connector.execute(trusted_sql(sql))
    assert connector.execute(trusted_sql(f"SELECT COUNT(*) FROM read_csv('{tmp_path / 't.csv'}')")).rows == ((40,),)


# -- passthrough, table-less statements, clauses, schemas -------------------------------------------------


def test_public_table_passthrough_is_allowlisted_and_verified(gateway: Gateway) -> None:
    assert gateway.query("SELECT code, name FROM regions ORDER BY code", analyst="a").rows == [
        [1, "north"],
        [2, "south"],
    ]
    with pytest.raises(UnsupportedError, match="CURRENT_VERSION is not supported"):
        gateway.query("SELECT version() FROM regions", analyst="a")
    with pytest.raises(UnsupportedError, match="READ_TEXT is not supported"):
        gateway.query("SELECT name FROM regions WHERE name = read_text('/etc/passwd')", analyst="a")


@pytest.mark.parametrize(
    ("sql", "match"),
    [
        ("SELECT version()", "CURRENT_VERSION is not supported"),
        ("SELECT current_setting('threads')", "CURRENT_SETTING is not supported"),
        ("SELECT CAST('x' AS INT) AS x", r"could not compute the constant expressions \(\w+\): check"),
    ],
)
def test_table_less_statements_are_constants_only(gateway: Gateway, sql: str, match: str) -> None:
    with pytest.raises(DPGatewayError, match=match) as info:
        gateway.query(sql, analyst="a")
    assert "Error:" not in info.value.message  # no engine text echoed


def test_table_less_constants_answer(gateway: Gateway) -> None:
    assert gateway.query("SELECT 1 + 2 AS x, UPPER('a') AS y", analyst="a").rows == [[3, "A"]]


@pytest.mark.parametrize(
    ("clause", "sql"),
    [
        ("TABLESAMPLE", "SELECT COUNT(*) FROM clinic.t TABLESAMPLE SYSTEM (10)"),
        ("TABLESAMPLE", "SELECT COUNT(*) FROM clinic.t USING SAMPLE 10%"),
        ("INTO", "SELECT COUNT(*) INTO x FROM clinic.t"),
        ("LOCKS", "SELECT COUNT(*) FROM clinic.t FOR UPDATE"),
        ("QUALIFY", "SELECT COUNT(*) FROM clinic.t QUALIFY 1"),
        ("COLUMNS", "SELECT COUNT(*) FROM clinic.t AS u(a, b)"),
        ("ONLY", "SELECT COUNT(*) FROM ONLY clinic.t"),
    ],
)
def test_clauses_the_planner_would_drop_are_refused(gateway: Gateway, clause: str, sql: str) -> None:
    with pytest.raises(UnsupportedError, match=f"{clause} is not supported") as info:
        gateway.query(sql, analyst="a")
    assert info.value.sqlstate == "0A000"


def test_schema_qualified_tables_do_not_collide(gateway: Gateway) -> None:
    plan = gateway.explain("SELECT COUNT(*) FROM clinic.t").plan
    assert plan is not None and plan.table is not None and plan.table.name == "clinic.t"
    other = gateway.explain("SELECT COUNT(*) FROM billing.t").plan
    assert other is not None and other.table is not None and other.table.name == "billing.t"
    with pytest.raises(DPGatewayError, match='relation "t" does not exist'):
        gateway.explain("SELECT COUNT(*) FROM t")
    assert gateway.query("SELECT COUNT(*) FROM public.regions", analyst="a").rows == [[2]]


# -- post-processing bound at plan time --------------------------------------------------------------------


def test_having_on_an_aggregate_not_selected_is_answered(gateway: Gateway) -> None:
    """Was charged, then failed with a binder error (the HAVING count was registered too late)."""
    result = gateway.query("SELECT sex, AVG(age) FROM clinic.t GROUP BY sex HAVING COUNT(*) > 0", analyst="a")
    assert result.columns == ["sex", "avg"] and result.epsilon > 0


def test_post_processing_errors_are_refused_before_the_spend(gateway: Gateway) -> None:
    before = gateway.remaining("a")
    with pytest.raises(DPGatewayError, match=r"could not compute the query's outputs, HAVING or ORDER BY"):
        gateway.query("SELECT sex, COUNT(*) FROM clinic.t GROUP BY sex HAVING UPPER(COUNT(*)) = 1", analyst="a")
    assert gateway.remaining("a") == before


# -- all layers: injection text in every node kind that carries text ----------------------------------------

PAYLOADS = [") (", "'", '"', ";", "--", "/*", "*/", "SELECT", "FROM", "read_csv", "read_text", "UNION", "typed"]
TEMPLATES = [
    "SELECT COUNT(*) FROM clinic.t WHERE city = '{s}'",  # string literal
    "SELECT COUNT(*) FROM clinic.t WHERE city LIKE '%{s}%'",  # LIKE pattern
    'SELECT COUNT(*) AS "{i}" FROM clinic.t',  # output alias
    'SELECT COUNT(*) FROM clinic.t WHERE "{i}" = 1',  # identifier
    'SELECT COUNT(*) FROM clinic.t AS "{i}"',  # table alias
    'SELECT COUNT(*) FROM clinic.t WHERE EXTRACT("{i}" FROM born) = 1',  # date part (identifier)
    "SELECT COUNT(*) FROM clinic.t WHERE date_part('{s}', born) = 1",  # date part (string)
    "SELECT COUNT(*) FROM clinic.t WHERE date_trunc('{s}', born) IS NULL",  # truncation unit
    'SELECT COUNT(*) FROM clinic.t WHERE CAST(age AS "{i}") = 1',  # type name
    'SELECT COUNT(*) FROM clinic.t WHERE CAST(age AS DECIMAL("{i}", 2)) = 1',  # type parameter
    "SELECT COUNT(*) FROM clinic.t WHERE TRIM(city) = '{s}'",
    "SELECT sex, COUNT(*) FROM clinic.t GROUP BY sex HAVING '{s}' = 'x'",  # post-processing
    "SELECT COUNT(*) FROM regions WHERE name = '{s}'",  # passthrough
    "SELECT '{s}' AS x",  # table-less
]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(template=st.sampled_from(TEMPLATES), parts=st.lists(st.sampled_from(PAYLOADS), min_size=1, max_size=4))
def test_injection_is_refused_or_round_trips(tmp_path_factory: Any, template: str, parts: list[str]) -> None:
    """Refused with a SQLSTATE (never XX000), or every statement the backend got holds only our relations,
    our functions and no injected subquery."""
    folder = tmp_path_factory.mktemp("inject")
    payload = " ".join(parts)
    sql = template.format(s=payload.replace("'", "''"), i=payload.replace('"', '""'))
    gw, seen = _recording_gateway(folder)
    with gw:
        try:
            gw.query(sql, analyst="mallory", epsilon=1.0)
        except DPGatewayError as exc:
            assert exc.sqlstate != "XX000", exc.message
    for statement in seen:
        assert isinstance(statement, VerifiedSQL)
        (parsed,) = sqlglot.parse(statement, read="duckdb")
        assert parsed is not None
        ctes = {cte.alias for cte in parsed.find_all(exp.CTE)}
        for table in parsed.find_all(exp.Table):
            if isinstance(table.this, exp.Identifier):
                assert table.name in ctes, statement
            else:
                rendered = table.this.sql("duckdb")
                assert rendered.startswith("READ_CSV(") and str(folder) in rendered, statement
        assert not any(isinstance(n, exp.Subquery) for n in parsed.walk()), statement
        assert sum(isinstance(n, exp.Select) for n in parsed.walk()) == len(ctes) + 1, statement
        functions = {n.name.upper() for n in parsed.find_all(exp.Anonymous)}
        assert functions <= {"HASH"}, statement
