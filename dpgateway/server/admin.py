"""Admin functions and the audit view over the wire.

``SELECT dp_grant('analyst', 'alice', 1.0 [, delta])``, ``SELECT dp_set_cap(kind, name, epsilon [, delta])`` and
``SELECT dp_reset(kind, name)`` change the ledger as the authenticated user, and only for a user with the admin
flag (``dpgateway user add NAME --admin``); anyone else gets 42501 and nothing changes. ``SHOW dp.audit`` lists
audit records: an analyst's own, or everyone's for an admin. The caller's identity is the login, never an argument.
Tests: tests/server/test_admin.py.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from dpgateway.budget_store.base import scope_name
from dpgateway.errors import InvalidParameterError, PrivacyViolationError
from dpgateway.gateway import Gateway
from dpgateway.server import pgtypes as t
from dpgateway.server.protocol import Field

FUNCTIONS = ("dp_grant", "dp_set_cap", "dp_reset")
_MENTION = re.compile(r"(?i)\bdp_(grant|set_cap|reset)\s*\(")
AUDIT_LIMIT = 1000
AUDIT_FIELDS = [
    Field(name, pg.oid, pg.length)
    for name, pg in (
        ("at", t.TEXT),
        ("analyst", t.TEXT),
        ("outcome", t.TEXT),
        ("epsilon", t.FLOAT8),
        ("delta", t.FLOAT8),
        ("sql", t.TEXT),
        ("message", t.TEXT),
    )
]


def call(sql: str) -> tuple[str, list[Any]] | None:
    """``(function, arguments)`` if the statement is ``SELECT dp_xxx(literal, ...)`` and nothing else."""
    if not _MENTION.search(sql):
        return None
    try:
        tree = sqlglot.parse_one(sql, read="postgres")
    except SqlglotError:
        return None
    if not isinstance(tree, exp.Select) or tree.args.get("from") or len(tree.selects) != 1:
        return None
    node = tree.selects[0].unalias()
    if not isinstance(node, exp.Anonymous) or node.name.lower() not in FUNCTIONS:
        return None
    return node.name.lower(), [_value(arg, node.name.lower()) for arg in node.expressions]


def _value(node: exp.Expr, function: str) -> Any:
    negative = isinstance(node, exp.Neg)
    inner = node.this if negative else node
    if isinstance(inner, exp.Literal):
        if inner.is_string and not negative:
            return str(inner.this)
        if not inner.is_string:
            return -float(inner.this) if negative else float(inner.this)
    raise InvalidParameterError(f"{function}() takes literal arguments (a kind, a name and numbers), not {node.sql()}")


def run(gateway: Gateway, user: str, is_admin: bool, function: str, args: list[Any]) -> str:
    """Run an admin function as ``user``; its answer (one text value)."""
    if not is_admin:
        raise PrivacyViolationError(
            f'{function}() needs an admin: user "{user}" is not one (admins are added with '
            "`dpgateway user add NAME --admin`)"
        )
    wanted = 2 if function == "dp_reset" else 3
    if len(args) not in (wanted, 4 if wanted == 3 else 2) or not all(isinstance(a, str) for a in args[:2]):
        usage = "(kind, name)" if function == "dp_reset" else "(kind, name, epsilon [, delta])"
        raise InvalidParameterError(f"usage: SELECT {function}{usage} with kind 'analyst' or 'domain'")
    kind, name = args[0], args[1]
    if kind not in ("analyst", "domain"):
        raise InvalidParameterError(f"{function}(): kind must be 'analyst' or 'domain', not {kind!r}")
    scope = scope_name(kind, name.strip())
    amounts = [_amount(function, a) for a in args[2:]]
    store = gateway.store
    if function == "dp_reset":
        count = store.reset(scope, by=user)
        return f"reset {scope}: {count} charge(s) no longer count"
    epsilon, delta = amounts[0], amounts[1] if len(amounts) > 1 else None
    if function == "dp_grant":
        cap = store.grant(scope, epsilon=epsilon, delta=delta or 0.0, by=user)
    else:
        cap = store.set_cap(scope, epsilon=epsilon, delta=delta, by=user)
    return f"{scope}: epsilon cap {cap.epsilon:g}, delta cap {cap.delta:g}"


def _amount(function: str, value: Any) -> float:
    if not isinstance(value, float) or not (math.isfinite(value) and value >= 0):
        raise InvalidParameterError(f"{function}(): epsilon and delta must be finite numbers >= 0, not {value!r}")
    return value


def audit(gateway: Gateway, user: str, is_admin: bool) -> list[list[Any]]:
    """The newest audit records: the user's own, or everyone's for an admin."""
    records = gateway.store.audit_log(analyst=None if is_admin else user, limit=AUDIT_LIMIT)
    return [
        [
            datetime.fromtimestamp(r.at, timezone.utc).isoformat(),
            r.analyst,
            r.outcome,
            r.epsilon,
            r.delta,
            r.sql,
            r.message,
        ]
        for r in records
    ]
