"""Splitting and routing without the tokenizer (statements.py, "plain" statements) gives what the tokenizer
gives: the same statements and first keywords, the same policy-table verdict, for hand-picked statements and
for seeded random ones over the plain alphabet (where the tokenizer is also asked whether it would fail)."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest

from dpgateway.errors import QuerySyntaxError
from dpgateway.server import statements as st

CONFIG: Any = SimpleNamespace(tables=[SimpleNamespace(name="pums"), SimpleNamespace(name="clinic.visits")])

STATEMENTS = [
    "SELECT COUNT(*) AS n FROM pums WHERE income > -7",
    "  select count(*) from PUMS group by sex  ",
    "SELECT\n\tCOUNT(*)\r\nFROM visits",
    "WITH t AS (SELECT age FROM pums) SELECT COUNT(*) FROM t",
    "SELECT 1",
    "SELECT x::bigint % 3 FROM pums_2",
    "SELECT 1.5e3, 2 <> 3, 4 != 5 FROM t1 -- pums",
    "SELECT 1pums",
    "SELECT 1.pums",
    "SELECT count(*) FROM public.pums",
    "BEGIN",
    "commit",
    "SHOW dp.budget",
    "SET dp.epsilon = 0.5",
    "EXPLAIN SELECT COUNT(*) FROM pums",
    "DOUBLE PRECISION",
    "GROUP BY pums",
    "ORDER BY x",
    "select--c\n1",
    "SELECT group_x FROM t",
    "SELECTX 1",
    "SELECT(1)",
    "_x y",
]
NOT_PLAIN = [
    "SELECT 'pums'",
    "SELECT 1; SELECT 2",
    "SELECT 1 /* x */",
    "SELECT $1",
    'SELECT "pums" FROM t',
    "(SELECT 1)",
    "",
    "   ",
    "SELECT 'unterminated",
    "1 + 1",
    "SELECT é",
]
PIECES = [
    "select", "SELECT", "with", "from", "pums", "PUMS", "visits", "income", "count", "group", "by", "order", "x1",
    "_a", "1", "007", "1.5", "1e5", ".5", "1pums", "1.pums", "pums_", "double", "precision", "similar", "to",
    "(", ")", ",", ".", "*", "<", ">", "=", "!", "+", "%", ":", "::", "-", "--", "\n", "\t", "\r", " ", "  ",
]  # fmt: skip


def _random_plain(rng: random.Random) -> str:
    first = rng.choice(["SELECT", "select", "WITH", "pums", "x", "_y", "group", "Double", "BEGIN", "show"])
    parts = [rng.choice([" ", "\n", ""]), first]
    for _ in range(rng.randrange(0, 14)):
        parts.append(rng.choice([" ", "", "\t"]))
        parts.append(rng.choice(PIECES))
    return "".join(parts)


def _tokenizer_ok(sql: str) -> bool:
    try:
        st._split_tokens(sql)
    except QuerySyntaxError:
        return False
    return True


@pytest.mark.parametrize("sql", STATEMENTS)
def test_plain_statements_split_and_route_as_the_tokenizer_does(sql: str) -> None:
    if st._plain_first_word(sql) is None:
        assert sql.split()[0].upper() in st._MULTIWORD_FIRST  # only a word starting a keyword of several words
    assert st.split(sql) == st._split_tokens(sql)
    names = {"pums", "visits"}
    assert st.names_policy_table(sql, CONFIG) == st._names_in_tokens(sql, names)


@pytest.mark.parametrize("sql", NOT_PLAIN)
def test_other_statements_take_the_tokenizer(sql: str) -> None:
    assert st._plain_first_word(sql) is None


def test_random_plain_statements_agree_with_the_tokenizer() -> None:
    """5,000 seeded statements over the plain alphabet: the tokenizer never fails on one the fast path takes,
    and both give the same statements, keywords and policy-table verdict."""
    rng = random.Random(20261203)
    taken = named = 0
    for _ in range(5000):
        sql = _random_plain(rng)
        first = st._plain_first_word(sql)
        if first is None:
            continue
        taken += 1
        assert _tokenizer_ok(sql), sql
        assert st.split(sql) == st._split_tokens(sql), sql
        verdict = st.names_policy_table(sql, CONFIG)
        assert verdict == st._names_in_tokens(sql, {"pums", "visits"}), sql
        named += verdict and first.upper() in ("SELECT", "WITH") and "--" not in sql
    assert taken > 3000 and named > 300  # both fast paths were exercised, not skipped


def test_a_syntax_error_outside_the_plain_class_is_still_raised() -> None:
    with pytest.raises(QuerySyntaxError, match="syntax error"):
        st.split("SELECT 'unterminated")
