"""psycopg2 (libpq) against the in-process server."""

from __future__ import annotations

import psycopg2
import pytest
from conftest import Running


def test_select_one(wire: Running) -> None:
    with psycopg2.connect(wire.dsn()) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchall() == [(1,)]
        assert cur.description[0].type_code == 23


def test_dp_count_is_int8_with_a_spend_notice(wire: Running) -> None:
    with psycopg2.connect(wire.dsn()) as conn, conn.cursor() as cur:
        cur.execute("SELECT sex, COUNT(*) AS n, AVG(income) AS avg_income FROM pums GROUP BY sex ORDER BY sex")
        rows = cur.fetchall()
        assert [d.type_code for d in cur.description] == [20, 20, 701]
        assert [r[0] for r in rows] == [0, 1] and all(isinstance(r[1], int) for r in rows)
        assert any("dp: spent epsilon 0.5" in n and "remaining epsilon" in n for n in conn.notices)


def test_unknown_user_and_wrong_password_are_indistinguishable(wire: Running) -> None:
    messages = []
    for user, password in (("alice", "wrong-password"), ("nobody", "wrong-password"), ("nobody", "x" * 9)):
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed") as info:
            psycopg2.connect(wire.dsn(user=user, password=password))
        messages.append(str(info.value).replace(f'"{user}"', '"?"'))
    assert len(set(messages)) == 1


def test_refusal_has_its_sqlstate_and_the_session_goes_on(wire: Running) -> None:
    conn = psycopg2.connect(wire.dsn())
    conn.autocommit = True
    with conn.cursor() as cur:
        with pytest.raises(psycopg2.Error, match="would release raw rows") as info:
            cur.execute("SELECT * FROM pums")
        assert info.value.pgcode == "42501"
        cur.execute("SELECT COUNT(*) FROM pums")
        assert isinstance(cur.fetchone()[0], int)
    conn.close()


def test_failed_transaction_is_25P02_until_rollback(wire: Running) -> None:
    conn = psycopg2.connect(wire.dsn())
    with conn.cursor() as cur:
        with pytest.raises(psycopg2.Error, match='relation "pums_nope" does not exist') as info:
            cur.execute("SELECT COUNT(*) FROM pums_nope")
        assert info.value.pgcode == "42P01"
        with pytest.raises(psycopg2.Error, match="current transaction is aborted") as info:
            cur.execute("SELECT 1")
        assert info.value.pgcode == "25P02"
        conn.rollback()
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    conn.close()


def test_set_and_show_dp_settings(wire: Running) -> None:
    conn = psycopg2.connect(wire.dsn())
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SHOW dp.budget")
        before = float(cur.fetchone()[0])
        cur.execute("SET dp.epsilon = 0.25")
        cur.execute("SHOW dp.epsilon")
        assert cur.fetchone() == ("0.25",)
        cur.execute("SELECT COUNT(*) FROM pums WHERE age > 40")
        cur.execute("SHOW dp.budget")
        assert float(cur.fetchone()[0]) == pytest.approx(before - 0.25)
        with pytest.raises(psycopg2.Error, match=r"dp\.epsilon must be a positive") as info:
            cur.execute("SET dp.epsilon = -1")
        assert info.value.pgcode == "22023"
        cur.execute("SET application_name = 'tests'")
        assert conn.get_parameter_status("application_name") == "tests"
    conn.close()


def test_explain_spends_nothing(wire: Running) -> None:
    conn = psycopg2.connect(wire.dsn())
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SHOW dp.budget")
        before = cur.fetchone()[0]
        cur.execute("EXPLAIN SELECT COUNT(*) AS n FROM pums")
        lines = [r[0] for r in cur.fetchall()]
        assert cur.description[0].name == "QUERY PLAN"
        assert "epsilon: 0.5" in lines and any(line.startswith("accuracy (95%) n: ±") for line in lines)
        cur.execute("SHOW dp.budget")
        assert cur.fetchone()[0] == before
    conn.close()


def test_multi_statement_and_empty_query(wire: Running) -> None:
    conn = psycopg2.connect(wire.dsn())
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SET dp.epsilon = 0.3; SELECT 1 AS a; SELECT 2 AS b")
        assert cur.fetchall() == [(2,)]  # psycopg2 keeps the last result
        cur.execute("SHOW dp.epsilon")
        assert cur.fetchone() == ("0.3",)
        with pytest.raises(psycopg2.ProgrammingError, match="empty query"):
            cur.execute("  ;  ")
    conn.close()


def test_analyst_is_the_authenticated_user(wire: Running) -> None:
    with psycopg2.connect(wire.dsn(user="bob")) as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM pums WHERE age < 30")
    spent = wire.server.gateway.store.usage("analyst")
    assert {u.scope for u in spent if u.spent_epsilon > 0} == {"analyst:bob"}
