"""A small TPC-H-like dataset, generated locally and deterministically (customers are the privacy unit).

DuckDB's tpch extension cannot be downloaded here and no TPC-H generator is on the package index, so
this writes the five tables the join tests need (region, nation, customer, orders, lineitem) with the
TPC-H column names and key structure, from a seeded NumPy generator: the same seed gives the same rows.
Each customer has at most ``MAX_ORDERS`` orders and each order at most ``MAX_LINES`` lines, so the
policy below never truncates an ordinary customer; ``orphans`` lines point to no order.

    python tests/tpch.py OUT_DIR [--customers N]   # Parquet files plus dpgateway.yaml in OUT_DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import yaml
from helpers import GENEROUS_BUDGET

from dpgateway import Gateway
from dpgateway.budget_store import open_store
from dpgateway.policies.loader import load_config

SEGMENTS = ["AUTOMOBILE", "BUILDING", "FURNITURE", "HOUSEHOLD", "MACHINERY"]
PRIORITIES = ["1-URGENT", "2-HIGH", "3-MEDIUM", "4-NOT SPECIFIED", "5-LOW"]
FLAGS = ["A", "N", "R"]
REGIONS = ["AFRICA", "AMERICA", "ASIA", "EUROPE", "MIDDLE EAST"]
MAX_ORDERS = 8
MAX_LINES = 4


def generate(customers: int = 300, *, seed: int = 17, orphans: int = 5) -> dict[str, pd.DataFrame]:
    """The tables as DataFrames."""
    rng = np.random.default_rng(seed)
    region = pd.DataFrame({"r_regionkey": range(5), "r_name": REGIONS})
    nation = pd.DataFrame(
        {
            "n_nationkey": range(25),
            "n_name": [f"NATION{i:02d}" for i in range(25)],
            "n_regionkey": [i % 5 for i in range(25)],
        }
    )
    custkeys = np.arange(1, customers + 1)
    customer = pd.DataFrame(
        {
            "c_custkey": custkeys,
            "c_nationkey": rng.integers(0, 25, customers),
            "c_mktsegment": rng.choice(SEGMENTS, customers),
            "c_acctbal": np.round(rng.uniform(-999.99, 9999.99, customers), 2),
        }
    )
    per_customer = rng.integers(0, MAX_ORDERS + 1, customers)
    o_custkey = np.repeat(custkeys, per_customer)
    n_orders = len(o_custkey)
    orders = pd.DataFrame(
        {
            "o_orderkey": np.arange(1, n_orders + 1) * 4,  # sparse keys, as in TPC-H
            "o_custkey": o_custkey,
            "o_orderpriority": rng.choice(PRIORITIES, n_orders),
            "o_totalprice": np.round(rng.uniform(900, 400000, n_orders), 2),
        }
    )
    per_order = rng.integers(1, MAX_LINES + 1, n_orders)
    l_orderkey = np.repeat(orders["o_orderkey"].to_numpy(), per_order)
    l_linenumber = np.concatenate([np.arange(1, n + 1) for n in per_order]) if n_orders else np.array([], dtype=int)
    lines = len(l_orderkey)
    lineitem = pd.DataFrame(
        {
            "l_orderkey": l_orderkey,
            "l_linenumber": l_linenumber,
            "l_quantity": rng.integers(1, 51, lines),
            "l_extendedprice": np.round(rng.uniform(900, 95000, lines), 2),
            "l_returnflag": rng.choice(FLAGS, lines),
        }
    )
    if orphans:  # order keys no order has (odd): these lines have no unit
        extra = pd.DataFrame(
            {
                "l_orderkey": np.arange(orphans) * 4 + 1,
                "l_linenumber": 1,
                "l_quantity": 10,
                "l_extendedprice": 1000.0,
                "l_returnflag": "N",
            }
        )
        lineitem = pd.concat([lineitem, extra], ignore_index=True)
    return {"region": region, "nation": nation, "customer": customer, "orders": orders, "lineitem": lineitem}


def policy(sources: dict[str, Any]) -> dict[str, Any]:
    """The tables of ``dpgateway.yaml`` for ``sources`` (table name -> the policy's ``source``)."""
    return {
        "region": {
            "source": sources["region"],
            "public": True,
            "columns": {"r_regionkey": {"type": "int"}, "r_name": {"type": "str"}},
        },
        "nation": {
            "source": sources["nation"],
            "public": True,
            "columns": {"n_nationkey": {"type": "int"}, "n_name": {"type": "str"}, "n_regionkey": {"type": "int"}},
        },
        "customer": {
            "source": sources["customer"],
            "privacy_unit": "c_custkey",
            "max_rows_per_unit": 1,
            "domain": "customer",
            "columns": {
                "c_custkey": {"type": "int"},
                "c_nationkey": {"type": "int"},
                "c_mktsegment": {"type": "str", "public_values": SEGMENTS},
                "c_acctbal": {"type": "float", "bounds": [-1000, 10000]},
            },
        },
        "orders": {
            "source": sources["orders"],
            "privacy_unit": "o_custkey",
            "max_rows_per_unit": MAX_ORDERS,
            "domain": "customer",
            "columns": {
                "o_orderkey": {"type": "int"},
                "o_custkey": {"type": "int"},
                "o_orderpriority": {"type": "str", "public_values": PRIORITIES},
                "o_totalprice": {"type": "float", "bounds": [0, 500000]},
            },
        },
        "lineitem": {
            "source": sources["lineitem"],
            "privacy_unit": {
                "column": "o_custkey",
                "path": [{"from": "l_orderkey", "table": "orders", "to": "o_orderkey"}],
            },
            "max_rows_per_unit": MAX_ORDERS * MAX_LINES,
            "domain": "customer",
            "columns": {
                "l_orderkey": {"type": "int"},
                "l_linenumber": {"type": "int"},
                "l_quantity": {"type": "int", "bounds": [1, 50]},
                "l_extendedprice": {"type": "float", "bounds": [0, 100000]},
                "l_returnflag": {"type": "str", "public_values": FLAGS},
            },
        },
    }


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    """``frame`` as a Parquet file (DuckDB writes it: pandas would need pyarrow)."""
    with duckdb.connect() as con:
        con.register("frame", frame)
        con.execute(f"COPY frame TO '{path}' (FORMAT parquet)")


def gateway(folder: Path, frames: dict[str, pd.DataFrame]) -> Gateway:
    """A gateway over ``frames`` as Parquet files in ``folder``, under :func:`policy` with a large budget."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = {}
    for name, frame in frames.items():
        write_parquet(frame, folder / f"{name}.parquet")
        sources[name] = str(folder / f"{name}.parquet")
    config = {"tables": policy(sources), "budget": GENEROUS_BUDGET, "ledger": f"sqlite:///{folder / 'l.db'}"}
    (folder / "dpgateway.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    loaded = load_config(folder / "dpgateway.yaml")
    return Gateway(loaded, store=open_store(loaded.ledger, loaded.budget))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--customers", type=int, default=300)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sources = {}
    for name, frame in generate(args.customers).items():
        write_parquet(frame, args.out / f"{name}.parquet")
        sources[name] = f"{name}.parquet"
    (args.out / "dpgateway.yaml").write_text(yaml.safe_dump({"tables": policy(sources)}, sort_keys=False))


if __name__ == "__main__":
    main()
