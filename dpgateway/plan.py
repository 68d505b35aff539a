"""The frozen plan value that flows through every pass, from parsed SQL to released answer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from sqlglot import exp

from dpgateway.policies.model import Table
from dpgateway.sqlcheck import VerifiedSQL

if TYPE_CHECKING:
    from dpgateway.passes.relations import Relation

MeasureKind = Literal["count", "sum", "quantile", "count_distinct"]
T = TypeVar("T")


@dataclass(frozen=True)
class GroupKey:
    """One GROUP BY key: ``expr`` over source columns, released as column ``name`` of the exact result."""

    name: str
    expr: exp.Expr
    public_values: tuple[Any, ...] | None = None
    # a binned key over clamped bounded columns (passes/intervals.py), total by construction: make_total
    # puts it in place of ``expr`` as is
    bounded: exp.Expr | None = None


@dataclass(frozen=True)
class Measurement:
    """One noisy aggregate per group, computed exactly (and bounded) in SQL, then noised by OpenDP.

    The backend returns ``round(clamp(value) * scale)`` summed per group, an integer; ``bound`` is the
    largest absolute per-row value in real units, so one row moves the sum by at most
    ``ceil(bound * scale)`` integer units and one unit (``k`` rows) by ``sensitivity``.

    ``arg`` is the row expression measured: None for ``COUNT(*)``, a bare column, or an expression
    rebuilt by passes/intervals.py (columns clamped, conditions total; a ``FILTER`` folded in as
    ``CASE WHEN cond THEN value END``). ``bounds`` is the interval every non-NULL value of ``arg`` lies in
    (sums: the backend clamps to it); ``text`` is the analyst's spelling, for labels.
    """

    name: str
    kind: MeasureKind
    arg: exp.Expr | None  # None: COUNT(*)
    bounds: tuple[float, float] | None = None  # sums: the clamp applied to each row's value
    text: str = ""  # e.g. 'income * 2'; empty: the bare column name (or * for COUNT(*))
    center: float = 0.0  # value - center is summed (AVG/VAR use the mid-point of the bounds)
    squared: bool = False  # sum of (value - center)^2, for VAR/STDDEV
    bound: float = 1.0
    scale: float = 1.0
    sensitivity: int = 1
    epsilon: float = 0.0
    noise_scale: float = 0.0  # discrete Laplace (or Gaussian, see ``mechanism``) scale, integer units
    threshold: int | None = None  # set on the count that selects partitions
    alpha: float | None = None  # quantile: the fraction (passes/quantiles.py); noise_scale is then the noisy max's
    integer: bool = False  # quantile: ``arg`` is an integer, its candidate grid whole numbers over ``bounds``
    # 'gaussian': discrete Gaussian under zCDP (passes/budget.py); ``rho`` is then its cost and ``epsilon`` 0,
    # the plan's Gaussians costing DPPlan.zcdp_epsilon together
    mechanism: Literal["laplace", "gaussian"] = "laplace"
    rho: float = 0.0

    @property
    def is_laplace(self) -> bool:
        """Whether this is an integer noised additively (discrete Laplace or Gaussian: every kind but the quantile)."""
        return self.kind != "quantile"

    @property
    def column(self) -> str | None:
        """The column name when ``arg`` is a bare column, else None."""
        return self.arg.name if isinstance(self.arg, exp.Column) else None

    @property
    def columns(self) -> frozenset[str]:
        """Every declared column ``arg`` reads."""
        return frozenset(c.name for c in self.arg.find_all(exp.Column)) if self.arg is not None else frozenset()

    @property
    def label(self) -> str:
        """Human-readable description, e.g. ``SUM((income - 250000)^2)``."""
        if self.kind == "count":
            return f"COUNT({self.text or self.column or '*'})"
        if self.kind == "count_distinct":
            return f"COUNT(DISTINCT {self.text or self.column})"
        if self.kind == "quantile":
            return f"QUANTILE({self.text or self.column}, {self.alpha:g})"
        inner = self.text or self.column or "?"
        if self.center:
            inner = f"({inner}) - {self.center:g}" if self.text else f"{inner} - {self.center:g}"
        return f"SUM(({inner})^2)" if self.squared else f"SUM({inner})"


@dataclass(frozen=True)
class Output:
    """One released column: its name and the post-processing expression over the noisy frame."""

    name: str
    expr: exp.Expr
    kind: str  # 'key', 'count', 'sum', 'avg', 'var', 'stddev' or 'expr'
    measurements: tuple[str, ...] = ()


@dataclass(frozen=True)
class DPPlan:
    """Everything the gateway knows about one query; each pass returns an updated copy."""

    sql: str
    tree: exp.Expr
    epsilon: float
    delta: float
    table: Table | None = None
    relation: Relation | None = None  # joins, unit paths, per-person subqueries: what `typed` reads
    where: exp.Expr | None = None
    group_keys: tuple[GroupKey, ...] = ()
    measurements: tuple[Measurement, ...] = ()
    outputs: tuple[Output, ...] = ()
    having: exp.Expr | None = None
    order: tuple[exp.Ordered, ...] = ()
    limit: int | None = None
    offset: int | None = None
    passthrough: bool = False  # the query touches only public tables: answered exactly, no cost
    bounded: exp.Expr | None = None  # the statement for the backend, as the planner built it
    bounded_sql: VerifiedSQL | None = (
        None  # ``bounded`` rendered, parsed back and verified (the only SQL a backend runs)
    )
    shown_sql: str = ""  # bounded_sql with each source and the row-order key as placeholders (explain, audit hash)
    settings: tuple[tuple[str, Any], ...] = ()  # per-query backend settings
    prepared: str | None = None  # path of a valid prepared (pre-bounded) copy to read instead of the source
    rewrite: str = ""  # bounding rewrite (passes/rewrite.py): 'weighted', 'unit_*' (per unit) or 'rows'

    post_sql: str = ""  # post-processing query over the noisy frame (postprocess.py)
    # the same SELECT list as Python functions of the noisy columns, or None where DuckDB must evaluate it
    post_python: tuple[Callable[[Sequence[list[Any]]], list[Any]], ...] | None = None
    notes: tuple[str, ...] = field(default=())
    zcdp_rho: float = 0.0  # the Gaussian measurements' total rho (zCDP composes by adding rho)
    zcdp_epsilon: float = 0.0  # ... as epsilon at ``delta``, OpenDP's conversion (mechanisms.zcdp_to_approx)

    @property
    def selects_partitions(self) -> bool:
        """True when group keys are released through DP partition selection."""
        return any(m.threshold is not None for m in self.measurements)

    @property
    def spent_epsilon(self) -> float:
        """Basic composition: the pure-DP measurements' epsilons plus the Gaussians' converted epsilon."""
        return sum(m.epsilon for m in self.measurements) + self.zcdp_epsilon

    def measurement(self, name: str) -> Measurement:
        for m in self.measurements:
            if m.name == name:
                return m
        raise KeyError(name)

    def with_(self, **changes: Any) -> DPPlan:
        return replace(self, **changes)

    def memo(self, name: str, compute: Callable[[DPPlan], T]) -> T:
        """``compute(self)``, once per finished plan: for values derived from the planned computation only
        (measurements, keys, table, delta, bounded SQL), never from the output names or the SQL text, since
        :meth:`renamed` copies share them. Not for use while planning (passes replace those fields)."""
        memo: dict[str, Any] = self.__dict__.setdefault("_memo", {})
        if name not in memo:
            memo[name] = compute(self)
        return cast(T, memo[name])

    def renamed(self, **changes: Any) -> DPPlan:
        """A copy with other output names, post-processing or SQL text (the plan cache's copies for queries
        that differ only in those): the computation is the same, so the copy shares :meth:`memo`'s values."""
        if not changes.keys() <= RENAMING:
            raise ValueError(f"renamed() changes only {sorted(RENAMING)}, not {sorted(changes.keys() - RENAMING)}")
        copy = replace(self, **changes)
        copy.__dict__["_memo"] = self.__dict__.setdefault("_memo", {})
        return copy


RENAMING = frozenset({"sql", "outputs", "post_sql", "post_python"})
"""The fields :meth:`DPPlan.renamed` may change: they name or reshape the released columns only."""
