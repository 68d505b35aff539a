"""Post-processing on released (noisy) values only: outputs, HAVING, ORDER BY, LIMIT.

It runs in a separate in-memory DuckDB that holds nothing but the noisy frame and cannot read files,
so anything computed here is a function of the DP release. The sandbox database is opened once per
process (opening one costs about 17 ms); each call gets its own cursor, a separate connection on which
the noisy frame is registered, and which is closed afterwards, so calls never see each other's frames.
"""

from __future__ import annotations

import os
import threading

import duckdb
import pandas as pd
from sqlglot import exp

from dpgateway.errors import InvalidParameterError
from dpgateway.plan import DPPlan

NOISY = "__noisy"

_lock = threading.Lock()
_sandbox: tuple[int, duckdb.DuckDBPyConnection] | None = None


def post_process(plan: DPPlan, noisy: pd.DataFrame) -> pd.DataFrame:
    """Evaluate the query's SELECT list, HAVING, ORDER BY and LIMIT over the noisy frame."""
    frame = run_sandboxed(plan.post_sql or post_processing_sql(plan), noisy)
    frame.columns = [o.name for o in plan.outputs]
    return frame


def post_processing_sql(plan: DPPlan) -> str:
    """The sandbox query over ``__noisy`` (rendered once per plan by passes/post.py)."""
    query = exp.select(*(exp.alias_(o.expr.copy(), o.name, quoted=True) for o in plan.outputs)).from_(NOISY)
    if plan.having is not None:
        query = query.where(plan.having.copy())
    if plan.order:
        query = query.order_by(*(o.copy() for o in plan.order))
    if plan.limit is not None:
        query = query.limit(plan.limit)
    if plan.offset is not None:
        query = query.offset(plan.offset)
    return query.sql(dialect="duckdb")


def run_sandboxed(query: exp.Expr | str, noisy: pd.DataFrame | None = None) -> pd.DataFrame:
    """Run ``query`` where only ``noisy`` (as table ``__noisy``) exists and no file can be read."""
    con = _sandbox_cursor()
    try:
        if noisy is not None:
            con.register(NOISY, noisy)
        result = con.execute(query if isinstance(query, str) else query.sql(dialect="duckdb"))
        return pd.DataFrame(result.fetchall(), columns=[d[0] for d in result.description or ()])
    except duckdb.Error as exc:
        # Only released values are involved, so the message is safe to show.
        raise InvalidParameterError(f"could not compute the outputs from the released values: {exc}") from None
    finally:
        con.close()


def _sandbox_cursor() -> duckdb.DuckDBPyConnection:
    """A fresh cursor on this process's sandbox database (re-opened after a fork)."""
    global _sandbox
    with _lock:
        if _sandbox is None or _sandbox[0] != os.getpid():
            _sandbox = (os.getpid(), duckdb.connect(":memory:", config={"enable_external_access": False}))
        return _sandbox[1].cursor()
