"""The peer-comparison workloads: data, schemas, contribution bounds and queries, shared by every system.

Standalone (standard library only): the peers' runners import it from their own virtual environments.
A workload's tables carry everything each system needs to be configured *equally*: the privacy unit (a
column, or a foreign-key path to it), the same per-table bound on rows per person, the same value bounds
and the same public group-key domains. Each query lists its group-key columns (for matching released cells
with the exact answer) and, for Tumult Analytics (no SQL), the name of a builder in ``runner_tumult.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # 'int', 'float', 'str' or 'date'
    bounds: tuple[float, float] | None = None
    public_values: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class Table:
    name: str
    file: str  # CSV file name inside the workload's data folder
    columns: tuple[Column, ...]
    unit: str | None = None  # the privacy-unit column (on this table or at the end of ``path``)
    path: tuple[tuple[str, str, str], ...] = ()  # (from column, parent table, parent column) hops to the unit
    k: int = 1  # rows per person kept
    public: bool = False


@dataclass(frozen=True)
class Query:
    id: str
    sql: str
    keys: tuple[str, ...] = ()
    tumult: str | None = None  # builder name in runner_tumult.py; None: no faithful translation


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    tables: tuple[Table, ...]
    queries: tuple[Query, ...]
    unit_table: str  # the table whose one row is one person (Qrlew's privacy-unit root, SmartNoise's id)
    unit_key: str
    data_dir: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _c(name: str, type_: str, bounds: tuple[float, float] | None = None, values: Any = None) -> Column:
    return Column(name, type_, bounds, tuple(values) if values is not None else None)


PRIORITIES = ("1-URGENT", "2-HIGH", "3-MEDIUM", "4-NOT SPECIFIED", "5-LOW")
NATIONS = (
    "ALGERIA", "ARGENTINA", "BRAZIL", "CANADA", "EGYPT", "ETHIOPIA", "FRANCE", "GERMANY", "INDIA", "INDONESIA",
    "IRAN", "IRAQ", "JAPAN", "JORDAN", "KENYA", "MOROCCO", "MOZAMBIQUE", "PERU", "CHINA", "ROMANIA",
    "SAUDI ARABIA", "VIETNAM", "RUSSIA", "UNITED KINGDOM", "UNITED STATES",
)  # fmt: skip
REGIONS = ("AFRICA", "AMERICA", "ASIA", "EUROPE", "MIDDLE EAST")
SEGMENTS = ("AUTOMOBILE", "BUILDING", "FURNITURE", "HOUSEHOLD", "MACHINERY")

TPCH = Workload(
    name="tpch",
    description=(
        "TPC-H at scale factor 0.1 generated locally by tpchgen-cli (15,000 customers, 150,000 orders, "
        "600,572 line items); one person is one customer: orders belong to `o_custkey`, line items reach "
        "their customer through `l_orderkey -> orders.o_orderkey`; nation and region are public."
    ),
    unit_table="customer",
    unit_key="c_custkey",
    tables=(
        Table(
            "customer",
            "customer.csv",
            (
                _c("c_custkey", "int"),
                _c("c_nationkey", "int", (0, 24)),
                _c("c_acctbal", "float", (-1000, 10000)),
                _c("c_mktsegment", "str", values=SEGMENTS),
            ),
            unit="c_custkey",
            k=1,
        ),
        Table(
            "orders",
            "orders.csv",
            (
                _c("o_orderkey", "int"),
                _c("o_custkey", "int"),
                _c("o_orderstatus", "str", values=("F", "O", "P")),
                _c("o_totalprice", "float", (0, 600000)),
                _c("o_orderdate", "date"),
                _c("o_orderpriority", "str", values=PRIORITIES),
            ),
            unit="o_custkey",
            k=32,
        ),
        Table(
            "lineitem",
            "lineitem.csv",
            (
                _c("l_orderkey", "int"),
                _c("l_quantity", "float", (0, 50)),
                _c("l_extendedprice", "float", (0, 110000)),
                _c("l_returnflag", "str", values=("A", "N", "R")),
            ),
            unit="o_custkey",
            path=(("l_orderkey", "orders", "o_orderkey"),),
            k=128,
        ),
        Table(
            "nation",
            "nation.csv",
            (_c("n_nationkey", "int"), _c("n_name", "str", values=NATIONS), _c("n_regionkey", "int")),
            public=True,
        ),
        Table("region", "region.csv", (_c("r_regionkey", "int"), _c("r_name", "str", values=REGIONS)), public=True),
    ),
    queries=(
        Query("orders", "SELECT COUNT(*) AS n FROM orders", (), "count_orders"),
        Query(
            "by_priority",
            "SELECT o_orderpriority, COUNT(*) AS n FROM orders GROUP BY o_orderpriority",
            ("o_orderpriority",),
            "count_by_priority",
        ),
        Query(
            "revenue_by_status",
            "SELECT o_orderstatus, SUM(o_totalprice) AS revenue FROM orders GROUP BY o_orderstatus",
            ("o_orderstatus",),
            "revenue_by_status",
        ),
        Query("avg_price", "SELECT AVG(o_totalprice) AS avg_price FROM orders", (), "avg_price"),
        Query(
            "by_segment",
            "SELECT c_mktsegment, COUNT(*) AS n FROM customer GROUP BY c_mktsegment",
            ("c_mktsegment",),
            "count_by_segment",
        ),
        Query(
            "orders_by_nation",
            "SELECT n_name, COUNT(*) AS n FROM orders JOIN customer ON o_custkey = c_custkey "
            "JOIN nation ON c_nationkey = n_nationkey GROUP BY n_name",
            ("n_name",),
            "orders_by_nation",
        ),
        Query(
            "revenue_by_region",
            "SELECT r_name, SUM(o_totalprice) AS revenue FROM orders JOIN customer ON o_custkey = c_custkey "
            "JOIN nation ON c_nationkey = n_nationkey JOIN region ON n_regionkey = r_regionkey GROUP BY r_name",
            ("r_name",),
            "revenue_by_region",
        ),
        Query(
            "quantity_by_flag",
            "SELECT l_returnflag, SUM(l_quantity) AS qty FROM lineitem GROUP BY l_returnflag",
            ("l_returnflag",),
            "quantity_by_flag",
        ),
        Query(
            "frequent_customers",
            "SELECT COUNT(*) AS n FROM (SELECT o_custkey, COUNT(*) AS orders FROM orders GROUP BY o_custkey) AS t "
            "WHERE orders >= 15",
            (),
            "frequent_customers",
        ),
        Query(
            "avg_spend",
            "SELECT AVG(spend) AS avg_spend FROM "
            "(SELECT o_custkey, SUM(o_totalprice) AS spend FROM orders GROUP BY o_custkey) AS t",
            (),
            "avg_spend",
        ),
        Query(
            "customers_ordering", "SELECT COUNT(DISTINCT o_custkey) AS customers FROM orders", (), "distinct_customers"
        ),
        Query(
            "median_price",
            "SELECT PERCENTILE_CONT(0.5) WITHIN GROUP (ORDER BY o_totalprice) AS median_price FROM orders",
            (),
            "median_price",
        ),
    ),
)

PUMS = Workload(
    name="pums",
    description=(
        "SmartNoise's own `PUMS_dup.csv`: 1,000 people (`pid`) on 1,948 rows; at most 3 rows per person kept; "
        "age in [0, 100], income in [0, 500000]; sex, married, educ (1..16) and race (1..6) public."
    ),
    unit_table="pums",
    unit_key="pid",
    tables=(
        Table(
            "pums",
            "PUMS_dup.csv",
            (
                _c("pid", "int"),
                _c("age", "int", (0, 100)),
                _c("income", "float", (0, 500000)),
                _c("sex", "int", values=(0, 1)),
                _c("married", "int", values=(0, 1)),
                _c("educ", "int", values=range(1, 17)),
                _c("race", "int", values=range(1, 7)),
            ),
            unit="pid",
            k=3,
        ),
    ),
    queries=(
        Query("count", "SELECT COUNT(*) AS n FROM pums", (), "pums_count"),
        Query("sum_income", "SELECT SUM(income) AS total_income FROM pums", (), "pums_sum_income"),
        Query("avg_age", "SELECT AVG(age) AS avg_age FROM pums", (), "pums_avg_age"),
        Query("var_age", "SELECT VAR_SAMP(age) AS var_age FROM pums", (), "pums_var_age"),
        Query("by_sex", "SELECT sex, COUNT(*) AS n FROM pums GROUP BY sex", ("sex",), "pums_count_by_sex"),
        Query(
            "avg_income_by_sex",
            "SELECT sex, AVG(income) AS avg_income FROM pums GROUP BY sex",
            ("sex",),
            "pums_avg_income_by_sex",
        ),
        Query("by_educ", "SELECT educ, COUNT(*) AS n FROM pums GROUP BY educ", ("educ",), "pums_count_by_educ"),
        Query(
            "sum_income_by_educ",
            "SELECT educ, SUM(income) AS total_income FROM pums GROUP BY educ",
            ("educ",),
            "pums_sum_income_by_educ",
        ),
        Query(
            "by_race_educ",
            "SELECT race, educ, COUNT(*) AS n FROM pums GROUP BY race, educ",
            ("race", "educ"),
            "pums_count_by_race_educ",
        ),
        Query(
            "filtered",
            "SELECT COUNT(*) AS n, AVG(income) AS avg_income FROM pums WHERE age > 40 AND married = 1",
            (),
            "pums_filtered",
        ),
        Query(
            "median_income",
            "SELECT PERCENTILE_CONT(0.5) WITHIN GROUP (ORDER BY income) AS median_income FROM pums",
            (),
            "pums_median_income",
        ),
        Query(
            "max_age",
            "SELECT MAX(age) AS max_age FROM pums",
            (),
            "pums_max_age",
        ),
    ),
)

WORKLOADS = {w.name: w for w in (TPCH, PUMS)}


def table(workload: Workload, name: str) -> Table:
    return next(t for t in workload.tables if t.name == name)


def csv_path(workload: Workload, name: str) -> Path:
    return Path(workload.data_dir) / table(workload, name).file
