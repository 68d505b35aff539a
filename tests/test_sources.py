"""Sources: read by the policy's rules, never by what is in the data.

The CSV dialect is the policy's (no sniffing), a bad record changes only its own contribution, the
privacy unit is bounded on its exact identity, explain and the audit hash show no path, option or key,
and the files the gateway writes with person-level rows are private and never reused after a rewrite.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import exact_by_group, make_gateway
from sqlglot import exp

from dpgateway import Gateway
from dpgateway.errors import ConfigError, InternalError
from dpgateway.passes.groups import public_cells
from dpgateway.plan import GroupKey
from dpgateway.sqlcheck import verify

K = 2
POLICY: dict[str, Any] = {
    "privacy_unit": "pid",
    "max_rows_per_unit": K,
    "columns": {
        "pid": {"type": "int"},
        "sex": {"type": "int", "public_values": [0, 1]},
        "educ": {"type": "int"},
        "income": {"type": "float", "bounds": [0, 1000]},
        "note": {"type": "str"},
    },
}
HEADER = b"pid,sex,educ,income,note\n"
# public keys (weighted), private keys (row bounding), scalar count (per-unit count)
QUERIES = [
    "SELECT sex, COUNT(*) AS n, SUM(income) AS s FROM t GROUP BY sex",
    "SELECT educ, COUNT(*) AS n, COUNT(note) AS c FROM t GROUP BY educ",
    "SELECT COUNT(*) AS n FROM t",
]


def _good(first: int, n: int) -> bytes:
    """``n`` people with 1-3 rows each; a value with the delimiter, quoted as RFC 4180 writes it."""
    lines = []
    for pid in range(first, first + n):
        for r in range(1 + pid % 3):
            note = '"a, ""b"""' if (pid + r) % 4 == 0 else "plain"
            lines.append(f"{pid},{(pid + r) % 2},{pid % 5},{(pid * 37 + r) % 1200},{note}\n".encode())
    return b"".join(lines)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    source = tmp_path / "t.csv"
    source.write_bytes(HEADER + _good(1, 40))
    with make_gateway(tmp_path, source, POLICY) as gw:
        yield gw


def _exact(gw: Gateway, sql: str, body: bytes) -> dict[tuple[Any, ...], tuple[int, ...]]:
    source = Path(gw.config.tables[0].source)
    source.write_bytes(HEADER + body)
    plan = gw.explain(sql).plan
    assert plan is not None
    return exact_by_group(gw.connector.execute(plan.bounded_sql, plan.settings), len(plan.group_keys))


def _plus(a: dict[tuple[Any, ...], tuple[int, ...]], b: dict[tuple[Any, ...], tuple[int, ...]]) -> dict:
    width = len(next(iter(a.values())))
    keys = set(a) | set(b)
    total = {k: tuple(x + y for x, y in zip(a.get(k, (0,) * width), b.get(k, (0,) * width), strict=True)) for k in keys}
    return {k: v for k, v in total.items() if any(v)}


BAD_RECORDS = {
    "too few fields": b"900,1,2\n",
    "too many fields": b"900,1,2,500,x,extra,more\n",
    "invalid UTF-8": b"900,1,2,500,\xff\xfe\n",
    "a line over 2 MB": b"900,1,2,500," + b"z" * 3_000_000 + b"\n",
    "text after a closing quote": b'900,1,2,500,"ab"cd\n',
    "a quote inside an unquoted value": b'900,1,2,500,ab"cd\n',
    "a NUL byte": b"900,1,2,500,a\x00b\n",
    "a quoted line break": b'900,1,2,500,"two\nlines"\n',
    "an empty line": b"\n",
    "only delimiters": b",,,,\n",
}


@pytest.mark.parametrize("sql", QUERIES)
@pytest.mark.parametrize("record", BAD_RECORDS.values(), ids=list(BAD_RECORDS))
def test_parse_problems_stay_in_their_row(gateway: Gateway, record: bytes, sql: str) -> None:
    """Neighbours: everyone, and everyone plus person 900 whose record is malformed, in the middle of the
    file. The difference is exactly 900's own contribution (read alone), and no query fails."""
    before, after = _good(1, 20), _good(21, 20)
    without = _exact(gateway, sql, before + after)
    alone = _exact(gateway, sql, record)
    assert _exact(gateway, sql, before + record + after) == _plus(without, alone)
    assert _exact(gateway, sql, before + after + record.rstrip(b"\n")) == _plus(without, alone)  # last, no newline


def test_unparsable_value_is_null_in_every_plan(gateway: Gateway) -> None:
    """A cast right above the CSV scan is the plan where DuckDB 2.0 pushed it into ``read_csv`` and dropped
    the whole record with ``ignore_errors``; the connector keeps the record and reads the value as NULL."""
    table = gateway.config.tables[0]
    Path(table.source).write_bytes(HEADER + b"1,0,2,10,a\n2,1,3,oops,b\n3,0,4,30,c\n")
    source = gateway.connector.hooks.source(table)
    income = exp.TryCast(this=exp.column("income"), to=exp.DataType.build("BIGINT"))
    tree = exp.select(exp.column("pid"), income).from_(source.copy())
    rows = gateway.connector.execute(verify(tree, "duckdb", sources=[source]))
    assert sorted(rows.rows) == [("1", 10), ("2", None), ("3", 30)]


def test_unterminated_quote_is_confined_with_quote_off(tmp_path: Path) -> None:
    """RFC 4180 lets a quoted value span lines, so an unclosed quote would swallow the lines after it;
    with ``quote: ""`` every line is one record, and the defect stays in its line."""
    source = tmp_path / "t.csv"
    source.write_bytes(HEADER + _good(1, 5).replace(b'"', b""))
    policy = {**POLICY, "csv": {"quote": ""}}
    sql = "SELECT educ, COUNT(*) AS n FROM t GROUP BY educ"
    with make_gateway(tmp_path, source, policy) as gw:
        before, after = _good(1, 20).replace(b'"', b""), _good(21, 20).replace(b'"', b"")
        record = b'900,1,2,500,"never closed\n'
        without, alone = _exact(gw, sql, before + after), _exact(gw, sql, record)
        assert alone == {(2,): (1,)}
        assert _exact(gw, sql, before + record + after) == _plus(without, alone)


def test_the_sql_does_not_depend_on_the_data(tmp_path: Path) -> None:
    """Values that need quoting, or none at all, give the same bounded SQL: no dialect is sniffed."""
    sql = QUERIES[1]
    seen = set()
    for i, body in enumerate([_good(1, 30), _good(1, 30).replace(b'"a, ""b"""', b"x"), b""]):
        folder = tmp_path / str(i)
        folder.mkdir()
        source = folder / "t.csv"
        source.write_bytes(HEADER + body)
        with make_gateway(folder, source, POLICY) as gw:
            plan = gw.explain(sql).plan
            assert plan is not None
            gw.connector.execute(plan.bounded_sql)
            key = gw.connector.hooks.row_order_key(gw._ctx.seed)  # each ledger has its own seed
            seen.add((plan.shown_sql, plan.bounded_sql.replace(str(folder), "<folder>").replace(key, "<key>")))
    assert len(seen) == 1
    assert "auto_detect => FALSE" in next(iter(seen))[1] and "sniff" not in next(iter(seen))[1]


def test_csv_dialect_from_the_policy(tmp_path: Path) -> None:
    source = tmp_path / "t.csv"
    source.write_text("# exported\npid;sex;educ;income;note\n1;0;2;10;'x; y'\n2;1;2;NA;NA\n# 3;1;1;1;z\n")
    policy = {**POLICY, "csv": {"delimiter": ";", "quote": "'", "comment": "#", "null": "NA"}}
    with make_gateway(tmp_path, source, policy) as gw:
        plan = gw.explain("SELECT educ, COUNT(*), COUNT(income), COUNT(note) FROM t GROUP BY educ").plan
        assert plan is not None
        assert gw.connector.execute(plan.bounded_sql).rows == ((2, 2, 1, 1),)
    no_header = {**POLICY, "csv": {"header": False}}
    (tmp_path / "t.csv").write_text("1,0,2,10,x\n2,1,2,20,y\n")
    with make_gateway(tmp_path, tmp_path / "t.csv", no_header) as gw:
        plan = gw.explain("SELECT COUNT(*) FROM t").plan
        assert plan is not None and gw.connector.execute(plan.bounded_sql).rows == ((2,),)


def test_a_header_that_names_a_column_twice_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "t.csv"
    source.write_text("pid,sex,educ,income,note,Sex\n")
    with pytest.raises(ConfigError, match=r"tables\.t\.source: the header line of t\.csv must name every column once"):
        make_gateway(tmp_path, source, POLICY)


# -- explain and the audit hash ------------------------------------------------------------------------


def test_explain_shows_no_path_option_or_key(gateway: Gateway, tmp_path: Path) -> None:
    key = gateway.connector.hooks.row_order_key(gateway._ctx.seed)
    for sql in QUERIES:
        explanation = gateway.explain(sql)
        shown = json.dumps(explanation.to_dict())
        assert explanation.plan is not None and str(tmp_path) in explanation.plan.bounded_sql
        for secret in (str(tmp_path), "t.csv", "read_csv", "auto_detect", "delim", "ignore_errors", key):
            assert secret.lower() not in shown.lower(), (secret, shown)
        assert 'FROM \\"t\\"' in shown
    row_bounded = gateway.explain(QUERIES[1])
    assert "<row-order key>" in row_bounded.bounded_sql and key in row_bounded.plan.bounded_sql  # type: ignore[union-attr]


def test_the_audit_hash_does_not_depend_on_where_the_data_is(tmp_path: Path) -> None:
    hashes = set()
    for folder in (tmp_path / "a", tmp_path / "b" / "deeper"):
        folder.mkdir(parents=True)
        (folder / "t.csv").write_bytes(HEADER + _good(1, 10))
        with make_gateway(folder, folder / "t.csv", POLICY) as gw:
            gw.query(QUERIES[1], analyst="ann")
            hashes |= {r.rewritten_sha256 for r in gw.store.audit_log() if r.rewritten_sha256}
    assert len(hashes) == 1


# -- the privacy unit ------------------------------------------------------------------------------------


def test_unit_type_must_round_trip(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_bytes(HEADER)
    policy = {**POLICY, "columns": {**POLICY["columns"], "pid": {"type": "float"}}}
    with pytest.raises(ConfigError, match=r"privacy_unit: column 'pid' is float; a privacy unit must be int or str"):
        make_gateway(tmp_path, tmp_path / "t.csv", policy)


SPELLINGS = ["07", "7.0", " 7", "+7", "0x7", "7_0", "7e0", "7 ", "-0"]  # none is the canonical text of an int


def _spellings(pid: int) -> list[str]:
    """Spellings that cast to ``pid`` (or to a near id) in DuckDB, none of them ``str(pid)``."""
    return [f"0{pid}", f"{pid}.0", f" {pid}", f"+{pid}", f"0x{pid:x}", f"{pid}_0", f"{pid}e0", f"{pid} ", "-0"]


@pytest.mark.parametrize("prepared", [False, True], ids=["on the fly", "prepared copy"])
def test_near_equal_ids_stay_two_people(tmp_path: Path, prepared: bool) -> None:
    """Person 7 has k rows in group 1; people spelled '07', '7.0', ... have k rows each in group 2. Cast
    first, they were one unit of many rows, and row bounding traded person 7's rows for theirs (a
    change of 2k for one added person). Now only the exact spelling '7' is person 7, the others are no
    valid id and dropped, so adding any of them changes nothing, and 7 keeps all of their rows."""
    body = b"".join(f"{7 + 100 * i},1,1,5,x\n".encode() for i in range(10) for _ in range(K))
    others = b"".join(f'"{s}",0,2,5,y\n'.encode() for i in range(10) for s in _spellings(7 + 100 * i) for _ in range(K))
    sql = "SELECT educ, COUNT(*) AS n FROM t GROUP BY educ"
    source = tmp_path / "t.csv"
    source.write_bytes(HEADER + body + others)
    with make_gateway(tmp_path, source, POLICY) as gw:
        if prepared:
            gw.prepare("t")
        plan = gw.explain(sql).plan
        assert plan is not None and (plan.prepared is not None) == prepared
        assert exact_by_group(gw.connector.execute(plan.bounded_sql, plan.settings), 1) == {(1,): (10 * K,)}
        unfiltered = gw.explain("SELECT COUNT(*) AS n FROM t").plan
        assert unfiltered is not None and gw.connector.execute(unfiltered.bounded_sql).rows == ((10 * K,),)


def test_string_units_keep_every_spelling_apart(tmp_path: Path) -> None:
    body = b"".join(f'"{s}",1,1,5,x\n'.encode() for s in ["7", *SPELLINGS] for _ in range(K + 3))
    source = tmp_path / "t.csv"
    source.write_bytes(HEADER + body)
    policy = {**POLICY, "columns": {**POLICY["columns"], "pid": {"type": "str"}}}
    with make_gateway(tmp_path, source, policy) as gw:
        plan = gw.explain("SELECT COUNT(*) AS n FROM t").plan
        assert plan is not None
        assert gw.connector.execute(plan.bounded_sql).rows == ((K * (1 + len(SPELLINGS)),),)  # each bounded alone


def test_public_cells_are_distinct() -> None:
    from sqlglot import exp

    key = GroupKey(name="__g0", expr=exp.column("x"), public_values=(1, 1.0))
    with pytest.raises(InternalError, match="public group key values repeat"):
        public_cells((key,))


# -- files with person-level rows ----------------------------------------------------------------------------


def test_prepared_copy_and_cache_dir_are_private(gateway: Gateway) -> None:
    old = os.umask(0o002)  # a permissive umask must not make person-level rows readable by others
    try:
        copy = gateway.prepare("t")
    finally:
        os.umask(old)
    folder = gateway.config.cache_folder
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = sorted(folder.iterdir())
    assert sorted(f.suffix for f in files) == [".json", ".parquet"] and Path(copy.path) in files  # no temporary left
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o600}


def test_a_rewritten_source_with_restored_mtime_is_not_read(gateway: Gateway) -> None:
    sql = "SELECT sex, COUNT(*) FROM t GROUP BY sex"
    source = Path(gateway.config.tables[0].source)
    gateway.prepare("t")
    plan = gateway.explain(sql).plan
    assert plan is not None and plan.prepared is not None
    before = source.stat()
    data = source.read_bytes()
    source.write_bytes(data.replace(b"1,0,1,", b"1,1,1,", 1))  # same size, other content
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = source.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    plan = gateway.explain(sql).plan
    assert plan is not None and plan.prepared is None
