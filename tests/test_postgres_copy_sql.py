"""The statements a PostgreSQL prepared copy runs are verified sqlglot trees (no server needed): config names
stay names, a statement that would parse back differently or is of another kind is refused, and the copy's
schema is a plain identifier."""

from __future__ import annotations

import pytest
import sqlglot
from sqlglot import exp

from dpgateway.connectors import postgres_copy
from dpgateway.errors import ConfigError, PrivacyViolationError
from dpgateway.policies.connections import connector_source
from dpgateway.sqlcheck import verify_statement

HOSTILE = "pums'); DROP TABLE census.pums; --"


@pytest.mark.parametrize("version", [False, True])
def test_the_catalog_check_keeps_hostile_names_as_literals(version: bool) -> None:
    source = postgres_copy._table("census", HOSTILE)
    copy = postgres_copy._table("dpgateway", "pums__0123456789abcdef")
    sql = verify_statement(postgres_copy.state_tree(source, copy, "dpgateway", version=version), "postgres")
    (parsed,) = sqlglot.parse(sql, read="postgres")
    assert isinstance(parsed, exp.Select)
    assert not list(parsed.find_all(exp.Drop))
    literals = {node.this for node in parsed.find_all(exp.Literal) if node.is_string}
    assert '"census"."pums\'); DROP TABLE census.pums; --"' in literals


def test_statements_of_other_kinds_or_that_parse_back_differently_are_refused() -> None:
    insert = sqlglot.parse_one("INSERT INTO dpgateway.source_changes (relid) VALUES (1)", read="postgres")
    with pytest.raises(PrivacyViolationError, match="not one the gateway runs"):
        verify_statement(insert, "postgres")
    smuggled = exp.select(exp.Anonymous(this="x(); DROP TABLE census.pums; SELECT f", expressions=[]))
    with pytest.raises(PrivacyViolationError, match=r"exactly one statement|different statement|parse back"):
        verify_statement(smuggled, "postgres")
    table = postgres_copy._table("dpgateway", "t")
    for statement in (
        exp.Drop(tables=[table], kind="TABLE", exists=True),
        postgres_copy._revoke(table),
        exp.Analyze(tables=[table.copy()]),
    ):
        assert verify_statement(statement, "postgres") == statement.sql("postgres")


def test_copy_names_are_plain_identifiers_whatever_the_table_is_called() -> None:
    from dpgateway.policies.model import Table

    table = Table(name="Clinic.Visits-2024", source={"connector": "postgres", "copy_schema": "dp_copies"}, columns=())
    relation = postgres_copy.PostgresCopies(None, "", "1", ()).relation(table, "ab" * 32)
    schema, name = relation.split(".")
    assert schema == "dp_copies" and name == "clinic_visits_2024__" + "ab" * 8
    assert postgres_copy.NAME.match(schema) and postgres_copy.NAME.match(name)


@pytest.mark.parametrize("schema", ["Dp", "dp.x", 'dp"', "", 7, "a" * 64])
def test_copy_schema_must_be_a_plain_lower_case_name(schema: object) -> None:
    spec = {"connector": "postgres", "url": "postgresql://u@h/d", "table": "census.pums", "copy_schema": schema}
    with pytest.raises(ConfigError, match="copy_schema: must be a lower-case schema name"):
        connector_source(spec, "tables.pums.source")


def test_copy_schema_defaults_to_dpgateway() -> None:
    spec = {"connector": "postgres", "url": "postgresql://u@h/d", "table": "census.pums"}
    assert connector_source(spec, "tables.pums.source")["copy_schema"] == "dpgateway"
