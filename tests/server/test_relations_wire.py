"""Joins and per-person subqueries over the wire (psycopg2): answered with types, refusals with SQLSTATEs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
import tpch
from conftest import Running, start_server

from dpgateway.server.server import ServerSettings


@pytest.fixture
def tpch_wire(tmp_path: Path) -> Iterator[Running]:
    with tpch.gateway(tmp_path, tpch.generate(80)) as gateway:
        yield from start_server(gateway, ServerSettings(port=0, startup_timeout=2.0))


def test_joins_and_per_person_subqueries_over_the_wire(tpch_wire: Running) -> None:
    conn = psycopg2.connect(tpch_wire.dsn())
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(
            "SELECT c_mktsegment, COUNT(*) AS n FROM customer JOIN orders ON c_custkey = o_custkey "
            "GROUP BY c_mktsegment ORDER BY c_mktsegment"
        )
        rows = cur.fetchall()
        assert [r[0] for r in rows] == sorted(tpch.SEGMENTS) and all(isinstance(r[1], int) for r in rows)
        cur.execute(
            "WITH s AS (SELECT o_custkey, SUM(o_totalprice) AS t FROM orders GROUP BY o_custkey) "
            "SELECT COUNT(*), AVG(t) FROM s WHERE t > 100000"
        )
        ((count, mean),) = cur.fetchall()
        assert isinstance(count, int) and isinstance(mean, float)
        with pytest.raises(psycopg2.Error, match="pair one person") as info:
            cur.execute("SELECT COUNT(*) FROM orders a JOIN orders b ON a.o_orderkey = b.o_orderkey")
        assert info.value.pgcode == "42501"
    conn.close()
