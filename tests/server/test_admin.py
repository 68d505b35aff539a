"""Admin functions over the wire, and what a non-admin cannot do however they name themselves."""

from __future__ import annotations

import pytest
from conftest import PASSWORD, Running

psycopg = pytest.importorskip("psycopg")


def _connect(wire: Running, user: str) -> psycopg.Connection:
    return psycopg.connect(wire.dsn(user=user), autocommit=True)


def _budget(conn: psycopg.Connection) -> float:
    return float(conn.execute("SHOW dp.budget").fetchone()[0])


def _own(wire: Running, analyst: str) -> float:
    """The analyst's own remaining epsilon (SHOW dp.budget is the tightest cap, which the domain shares)."""
    return float(wire.server.gateway.remaining(analyst)["analyst"]["epsilon"])


def test_only_admins_change_caps(wire: Running) -> None:
    with _connect(wire, "alice") as alice, _connect(wire, "root") as root:
        before = _budget(alice)
        for sql in (
            "SELECT dp_grant('analyst', 'alice', 100)",
            "SELECT dp_set_cap('analyst', 'alice', 5000, 0.5)",
            "SELECT dp_reset('analyst', 'alice')",
            "select DP_GRANT('analyst', 'alice', 100) AS x",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="needs an admin"):
                alice.execute(sql)
        for attempt in ("SET SESSION AUTHORIZATION root", "SET ROLE root", "SET session_authorization = 'root'"):
            with pytest.raises(psycopg.Error, match=r"configuration parameter|syntax"):
                alice.execute(attempt)
        alice.execute("SET dp.analyst = 'root'")  # a custom setting: it names nobody
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="needs an admin"):
            alice.execute("SELECT dp_grant('analyst', 'alice', 100)")
        assert _budget(alice) == before
        root.execute("SELECT dp_set_cap('analyst', 'alice', 1, 0.001)")
        assert _budget(alice) == pytest.approx(1.0)  # below the domain cap, so it is the tightest
        granted = root.execute("SELECT dp_grant('analyst', 'alice', 2.5)").fetchone()[0]
        assert granted == "analyst:alice: epsilon cap 3.5, delta cap 0.001"
        assert _budget(alice) == pytest.approx(3.5)
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="finite numbers >= 0"):
            root.execute("SELECT dp_grant('analyst', 'alice', -1)")


def test_analysts_see_only_their_own_audit_and_spend_only_their_own_budget(wire: Running) -> None:
    secret_sql = "SELECT COUNT(*) AS bobs_secret_question FROM pums WHERE income > 123456"
    with _connect(wire, "alice") as alice, _connect(wire, "bob") as bob, _connect(wire, "root") as root:
        alice_before, bob_before = _own(wire, "alice"), _own(wire, "bob")
        notices: list[str] = []
        bob.add_notice_handler(lambda n: notices.append(n.message_primary or ""))
        bob.execute(secret_sql).fetchone()
        assert _own(wire, "alice") == alice_before and _own(wire, "bob") < bob_before

        alice_notices: list[str] = []
        alice.add_notice_handler(lambda n: alice_notices.append(n.message_primary or ""))
        alice.execute(secret_sql).fetchone()  # the same SQL: alice pays, bob's answer is not replayed to her
        assert "spent epsilon" in alice_notices[-1] and "replayed" not in alice_notices[-1]
        alice_after = _own(wire, "alice")
        assert alice_after < alice_before
        bob.execute(secret_sql).fetchone()  # bob's replay is his own and free
        assert "replayed" in notices[-1] and _own(wire, "alice") == alice_after

        mine = alice.execute("SHOW dp.audit").fetchall()
        assert mine and {row[1] for row in mine} == {"alice"}
        assert not any(row[1] == "bob" for row in mine)
        everyone = root.execute("SHOW dp.audit").fetchall()
        assert any(row[1] == "bob" and "bobs_secret_question" in row[5] for row in everyone)


def test_a_login_is_the_only_identity(wire: Running) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wire.dsn(user="root", password=PASSWORD + "x"))
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wire.dsn(user="nobody"))
    options = "-c session_authorization=root -c dp.analyst=bob"
    with psycopg.connect(wire.dsn(user="alice", options=f"'{options}'"), autocommit=True) as alice:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="needs an admin"):
            alice.execute("SELECT dp_reset('analyst', 'alice')")
        assert alice.execute("SELECT session_user, current_user").fetchone() == ("alice", "alice")
