"""Literal-only statements are answered by the gateway with the bytes PostgreSQL 15 sends.

Differential at the byte level: the same statement goes to the shadow catalog (a real PostgreSQL 15 started
by the tests, over its raw protocol connection) and to a gateway session (sans-I/O), over the simple protocol
(through the event loop's path and the worker's) and the extended one (text and binary results); the
messages must be equal byte for byte. Statements outside the narrow class must still go to the shadow.
"""

from __future__ import annotations

import struct

import pytest

from dpgateway import Gateway
from dpgateway.server import protocol as p
from dpgateway.server.literals import literal_select
from dpgateway.server.memory import Memory
from dpgateway.server.session import Session
from dpgateway.server.shadow import ShadowCluster

ANSWERED = [
    "SELECT 1",
    "select 1 as x",
    "SELECT 1;",
    "  SELECT\n\t1  ",
    "SELECT -1",
    "SELECT - 1",
    "SELECT 0",
    "SELECT -0",
    "SELECT 007",
    "SELECT 2147483647",
    "SELECT -2147483648",
    "SELECT 2147483648",
    "SELECT -2147483649",
    "SELECT 9223372036854775807",
    "SELECT -9223372036854775808",
    "SELECT true",
    "SELECT FALSE AS f",
    "SELECT 'a'",
    "SELECT '' AS empty",
    "SELECT 'héllo wörld' AS s",
    "SELECT 1 AS X",
    'SELECT 1 AS "MixedCase"',
    'SELECT 1 AS "with space"',
    "SELECT 1 AS select",
    "SELECT 1 AS a$b",
    "SELECT 1, 2, 3",
    "SELECT 1 AS a, true AS b, 'c' AS c, -5 AS d, 5000000000 AS e",
    "SELECT 1 AS " + "n" * 63,
]
NOT_ANSWERED = [
    "SELECT 9223372036854775808",  # numeric
    "SELECT -9223372036854775809",
    "SELECT 1.5",
    "SELECT 1e3",
    "SELECT +1",
    "SELECT (1)",
    "SELECT - -1",
    "SELECT 1 x",  # bare alias
    "SELECT 1 AS " + "n" * 64,  # truncated by PostgreSQL, with a NOTICE
    'SELECT 1 AS "a""b"',
    "SELECT 'it''s'",
    "SELECT 'back\\slash'",
    "SELECT E'a'",
    "SELECT 1 -- comment",
    "SELECT /* c */ 1",
    "SELECT 1::int8",
    "SELECT NULL",
    "SELECT 1,",
    "SELECT 1 FROM pums",
    "SELECT 1 WHERE false",
    "SELECT trueish",
    "SELECT 1 AS x y",
    "SELECT 1\x0b",
    "SELECT 1; SELECT 2",
    "SELECTED 1",
    "SELECT " + ", ".join(["1"] * 65),  # too many items to examine
]


@pytest.mark.parametrize("sql", NOT_ANSWERED)
def test_statements_outside_the_class_are_not_matched(sql: str) -> None:
    assert literal_select(sql) is None


def test_adversarial_text_is_examined_in_linear_time() -> None:
    import time

    start = time.perf_counter()
    for text in ("SELECT 1" + " " * 990 + "x", "SELECT 1 AS" + " " * 985 + "-", "SELECT '" + "a" * 990):
        assert literal_select(text) is None
    assert time.perf_counter() - start < 0.05


def _session(gateway: Gateway, shadow: ShadowCluster | None = None) -> Session:
    return Session(gateway, "alice", shadow=shadow, memory=Memory())


@pytest.fixture
def shadow(shadow_cluster: ShadowCluster):  # type: ignore[no-untyped-def]
    conn = shadow_cluster.connect()
    yield conn
    conn.close()


def _q(sql: str) -> p.Message:
    return p.Message(b"Q", p.cstr(sql))


@pytest.mark.parametrize("sql", ANSWERED)
def test_simple_query_bytes_equal_postgresql(
    sql: str, demo_gateway: Gateway, shadow_cluster: ShadowCluster, shadow: object
) -> None:
    expected = b"".join(shadow.simple(sql))  # type: ignore[attr-defined]
    assert literal_select(sql.strip().rstrip(";")) is not None
    session = _session(demo_gateway, shadow_cluster)
    rfq = p.ready_for_query("I")
    on_loop = session.now(_q(sql))  # the event loop's path (and again, from its memory)
    assert isinstance(on_loop, list) and b"".join(on_loop) == expected + rfq
    assert session.now(_q(sql)) == on_loop
    in_worker = session.handle(_q(sql))  # the worker's path (e.g. inside a multi-statement string)
    assert b"".join(in_worker) == expected + rfq
    assert session._conn is None  # the shadow was never asked


def _extended(send: object, sql: str, result_formats: tuple[int, ...]) -> list[bytes]:
    """Parse, Bind (result formats), Describe statement and portal, Execute: each answer, as one list."""
    parse = p.cstr("s1") + p.cstr(sql) + struct.pack("!h", 0)
    bind = p.cstr("") + p.cstr("s1") + struct.pack("!hh", 0, 0)
    bind += struct.pack("!h", len(result_formats)) + b"".join(struct.pack("!h", f) for f in result_formats)
    out = []
    for kind, body in (
        (b"P", parse),
        (b"D", b"S" + p.cstr("s1")),
        (b"B", bind),
        (b"D", b"P" + p.cstr("")),
        (b"E", p.cstr("") + struct.pack("!i", 0)),
        (b"C", b"S" + p.cstr("s1")),
    ):
        out.append(b"".join(send(kind, body)))  # type: ignore[operator]
    return out


@pytest.mark.parametrize("formats", [(), (1,)], ids=["text", "binary"])
@pytest.mark.parametrize(
    "sql", ["SELECT 1", "SELECT -2147483649 AS big", "SELECT true AS t, 'x' AS s, 7 AS n", "select 1 as x;"]
)
def test_extended_query_bytes_equal_postgresql(
    sql: str, formats: tuple[int, ...], demo_gateway: Gateway, shadow_cluster: ShadowCluster, shadow: object
) -> None:
    expected = _extended(shadow.extended, sql, formats)  # type: ignore[attr-defined]
    shadow.sync()  # type: ignore[attr-defined]
    session = _session(demo_gateway, shadow_cluster)
    got = _extended(lambda kind, body: session.handle(p.Message(kind, body)), sql, formats)
    assert got == expected
    assert session._conn is None


@pytest.mark.parametrize("sql", ["SELECT 1 x", "SELECT +1", "SELECT 9223372036854775808", "SELECT 1 -- c"])
def test_statements_outside_the_class_still_go_to_the_shadow(
    sql: str, demo_gateway: Gateway, shadow_cluster: ShadowCluster, shadow: object
) -> None:
    expected = b"".join(shadow.simple(sql))  # type: ignore[attr-defined]
    session = _session(demo_gateway, shadow_cluster)
    assert session.now(_q(sql)) is None
    try:
        assert b"".join(session.handle(_q(sql))) == expected + p.ready_for_query("I")
        assert session._conn is not None  # answered by the shadow
    finally:
        session.close()


def test_a_failed_transaction_refuses_literals_too(demo_gateway: Gateway) -> None:
    session = _session(demo_gateway)
    session.handle(_q("BEGIN"))
    session.handle(_q("SELECT COUNT(*) FROM pums_nope"))
    assert session.status == "E"
    assert session.now(_q("SELECT 1")) is None  # not from memory: the worker answers 25P02
    answer = b"".join(session.handle(_q("SELECT 1")))
    assert b"C25P02" in answer and answer.endswith(p.ready_for_query("E"))
    session.handle(_q("ROLLBACK"))
    assert session.now(_q("SELECT 1")) == [session.memory.literals.get(p.cstr("SELECT 1")), p.ready_for_query("I")]  # type: ignore[union-attr]
