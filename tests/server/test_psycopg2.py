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
