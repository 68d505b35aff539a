"""Joined relations: the FROM/JOIN tree over per-table typed sources, one privacy unit, one bound ``k``.

A query over several tables (joins), a table whose unit is reached through foreign keys
(``privacy_unit: {column, path}``) or a per-person subquery (passes/per_unit.py) reads a *relation*:
each declared table becomes a CTE of its typed columns (``__s0``, ``__s1``, ...; the privacy unit on its
exact identity, as for one table), joined as the analyst wrote it, and the ``typed`` CTE of
passes/bounding.py selects the joined columns under unique names (a column's own name, or
``alias.column`` where two joined tables share it). To every later pass the relation is one table
(:class:`~dpgateway.policies.model.Table`, ``source=None``) with one privacy unit and one bound ``k``, so
row bounding, weighting, clamping and the budget split apply unchanged.

Rules (each refusal names the declaration that would allow the join):

- public tables join freely, on any condition (or none); private tables need a ``privacy_unit``;
- private tables must describe the same people (one ``domain``: 42501 otherwise) and be joined so that
  every joined row pairs rows of one unit: an ``ON`` conjunct equating their unit columns, or a table's
  declared one-hop unit path (``lineitem.l_orderkey = orders.o_orderkey``); otherwise 42501;
- INNER, LEFT (with the private side preserved) and CROSS joins to public tables; RIGHT, FULL and
  ``USING`` are 0A000;
- a table reached through a unit path and not joined to its parent by the query is joined to the path's
  tables by the gateway (INNER): a row whose foreign key finds no parent has no unit and is dropped, as a
  row with a NULL unit is;
- ``k`` of the relation: the product of the ``max_rows_per_unit`` of its private tables, a parent joined
  along a child's unit path counting 1 (each child row has one parent when ``to`` is the parent's key),
  at most 10000 (the largest ``max_rows_per_unit`` the loader accepts). ``k`` only decides how many joined rows of
  a unit are kept (accuracy), never whether the bound holds.

Proof note (one unit moves the result by at most the sensitivity): neighbouring datasets differ by one
unit ``u`` with all of its rows in every table of its domain (a row of a table with a unit path belongs to
the unit its path reaches; if ``to`` is not unique in the parent, the row is attributed to each unit it
reaches, as one row of each). Public tables are the same in both. A joined row combines at most one row
per joined table; its private rows all belong to one unit, because every private table is tied to the
relation's unit by ``ON`` equalities of unit columns or by the declared path edge (a row that fails the
equality does not join; on the preserved side of a LEFT join the unit comes from the preserved table).
So the joined rows of the relation are partitioned by unit, and removing ``u`` removes exactly the joined
rows whose unit is ``u`` and changes no other joined row. Bounding then runs on the joined relation as on
one table: each unit keeps at most ``k`` joined rows (or weight ``k / max(n_u, k)``), clamped per row,
so the L1 sensitivity is ``k * ceil(bound * scale)``, the value passes/budget.py charges. ``ON``
conditions run on raw rows, so they are made total as WHERE is (passes/total.py): a bare equality of two
columns of one type cannot fail and stays bare (so engines hash-join it). Tests:
tests/test_relations.py (one person with many rows in every joined table, refusals, golden SQL
against pandas), tests/backends/test_conformance.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from sqlglot import exp

from dpgateway.errors import PrivacyViolationError, UnknownColumnError, UnknownTableError, UnsupportedError
from dpgateway.passes.context import PlanContext
from dpgateway.policies.model import NUMERIC_TYPES, Column, PartySources, Table, table_key
from dpgateway.sqlparse import row_expression

MAX_K = 10_000  # the loader's largest max_rows_per_unit
TABLE_ARGS = frozenset({"this", "db", "alias"})


@dataclass(frozen=True)
class Relation:
    """What the ``typed`` CTE of passes/bounding.py reads for a joined or per-person relation."""

    ctes: tuple[tuple[str, exp.Select], ...]  # per-table typed sources, per-person aggregates, in order
    sources: tuple[tuple[str, Table], ...]  # the CTE that reads each declared source (verify, explain)
    from_: exp.Expr  # the first FROM item (a CTE reference)
    joins: tuple[exp.Join, ...]
    columns: tuple[tuple[str, exp.Expr], ...]  # exposed column name -> expression over the CTEs

    def typed(self, names: Iterable[str]) -> exp.Select:
        """``SELECT <expr> AS name, ... FROM <joined CTEs>`` for the exposed columns ``names``."""
        wanted = set(names)
        items = [exp.alias_(e.copy(), n, quoted=True) for n, e in self.columns if n in wanted]
        select = exp.select(*(items or [exp.true()]), copy=False).from_(self.from_.copy(), copy=False)
        if self.joins:
            select.set("joins", [j.copy() for j in self.joins])
        return select


@dataclass
class Instance:
    """One FROM item: a declared table (``table``) or a per-person subquery (``table`` None)."""

    names: set[str]  # how the query may qualify its columns (alias, table name)
    label: str  # for messages: the table name or the subquery's alias
    cte: str
    columns: tuple[Column, ...]
    private: bool
    domain: str
    k: int
    unit: str | None = None  # its own column holding the unit (None: none, or through a path)
    table: Table | None = None
    nullable: bool = False
    parent_of: list[int] = field(default_factory=list)  # children joined to it along their unit path
    via: int | None = None  # the parent this path table is joined to
    unit_expr: exp.Expr | None = None


def refuse_unconsumed(node: exp.Expr, consumed: frozenset[str], where: str) -> None:
    """0A000 for any argument of ``node`` the planner would not act on (it would change the question)."""
    for key, value in node.args.items():
        if key not in consumed and value not in (None, False, []):
            what = value.key.upper() if isinstance(value, exp.Expr) else key.upper()
            raise UnsupportedError(
                f"{what} is not supported in {where}: the gateway would ignore it and answer a different "
                "question; remove it"
            )


class RelationBuilder:
    """Builds one :class:`Relation` (and the virtual table) from a FROM clause and its joins."""

    def __init__(self, ctx: PlanContext, ctes: list[tuple[str, exp.Select]], sources: list[tuple[str, Table]]):
        self.ctx = ctx
        self.ctes = ctes  # shared by nested per-person subqueries, so CTE names stay unique
        self.sources = sources
        self.instances: list[Instance] = []
        self.joins: list[exp.Join] = []
        self._classes: dict[int, int] = {}  # union-find over instances tied to one unit

    # -- FROM items ---------------------------------------------------------------------------------
    def add_table(self, table: Table, names: set[str], label: str) -> Instance:
        if not table.columns:
            raise UnsupportedError(
                f"public table {table.name} has no declared columns, so its joined columns cannot be typed; "
                f"declare the ones you join under tables.{table.name}.columns"
            )
        if not table.public and table.privacy_unit is None:
            raise PrivacyViolationError(
                f"table {table.name} has no privacy_unit, so one person's joined rows cannot be bounded; declare "
                f"tables.{table.name}.privacy_unit (and domain) to join it"
            )
        cte = self._source_cte(table)
        own_unit = table.privacy_unit if table.privacy_unit and not table.unit_path else None
        instance = Instance(
            names=names, label=self._label(label), cte=cte, columns=table.columns, private=not table.public,
            domain=table.subject_domain, k=table.max_rows_per_unit, unit=own_unit, table=table,
        )  # fmt: skip
        self.instances.append(instance)
        return instance

    def add_derived(self, label: str, cte: str, columns: tuple[Column, ...], unit: str, domain: str) -> Instance:
        """A per-person subquery: one row per unit, so ``k`` is 1."""
        instance = Instance(
            names={label.lower()},
            label=self._label(label),
            cte=cte,
            columns=columns,
            private=True,
            domain=domain,
            k=1,
            unit=unit,
        )
        self.instances.append(instance)
        return instance

    def _label(self, label: str) -> str:
        if any(i.label.lower() == label.lower() for i in self.instances):
            raise UnsupportedError(f'table name "{label}" specified more than once; give each an alias')
        return label

    def _source_cte(self, table: Table) -> str:
        if table.executor != "plain" or isinstance(table.source, PartySources):
            raise UnsupportedError(f"table {table.name} runs on executor {table.executor}; joins run on plain only")
        hooks = self.ctx.hooks
        unit = table.privacy_unit if not table.unit_path else None
        items = [
            exp.alias_(hooks.unit(c) if c.name == unit else hooks.typed(c), c.name, quoted=True) for c in table.columns
        ]
        name = f"__s{len(self.sources)}"
        self.ctes.append((name, exp.select(*items, copy=False).from_(hooks.source(table), copy=False)))
        self.sources.append((name, table))
        return name

    # -- columns ------------------------------------------------------------------------------------
    def find(self, column: exp.Column, upto: int | None = None) -> tuple[Instance, Column]:
        """The instance and declared column a reference names (``upto``: only the first instances)."""
        scope = self.instances if upto is None else self.instances[:upto]
        if column.args.get("catalog") is not None:
            raise UnknownTableError(f'cross-database references are not supported: "{column.sql("postgres")}"')
        qualifier = ".".join(p for p in (column.text("db"), column.table) if p).lower()
        if qualifier:
            hits = [i for i in scope if qualifier in i.names or table_key(qualifier) in i.names]
            if not hits:
                raise UnknownTableError(f'missing FROM-clause entry for table "{qualifier}"')
            scope = hits[:1]
        found = [(i, c) for i in scope for c in i.columns if c.name.lower() == column.name.lower()]
        if not found:
            where = f" in {scope[0].label}" if qualifier else ""
            raise UnknownColumnError(f'column "{column.name}" does not exist{where} (or is not declared in the policy)')
        if len(found) > 1:
            raise UnknownColumnError(
                f'column reference "{column.name}" is ambiguous: it is in {found[0][0].label} and {found[1][0].label}; '
                "qualify it with the table name or alias"
            )
        return found[0]

    def qualified(self, column: exp.Column, upto: int | None = None) -> tuple[exp.Column, Column]:
        instance, declared = self.find(column, upto)
        return exp.column(declared.name, table=instance.cte, quoted=True), declared

    # -- joins --------------------------------------------------------------------------------------
    def join(self, node: exp.Join, instance: Instance) -> exp.Join:
        """The analyst's JOIN over the typed CTEs, its condition allowlisted and total."""
        refuse_unconsumed(node, frozenset({"this", "on", "side", "kind"}), "JOIN (use ON a.x = b.y)")
        side, kind = (str(node.args.get(k) or "").upper() for k in ("side", "kind"))
        if side not in ("", "LEFT") or kind not in ("", "INNER", "OUTER", "CROSS"):
            raise UnsupportedError(
                f"{side or kind} JOIN is not supported; use INNER or LEFT JOIN with the private table on the left"
            )
        instance.nullable = side == "LEFT"
        on = node.args.get("on")
        upto = len(self.instances)
        condition = None
        if on is not None:
            checked = row_expression(on, "JOIN ... ON")
            conjuncts = [self._conjunct(c, upto, instance) for c in _conjuncts(checked)]
            condition = exp.and_(*conjuncts) if len(conjuncts) > 1 else conjuncts[0]
        target = exp.Table(this=exp.to_identifier(instance.cte))
        return exp.Join(this=target, on=condition, side="LEFT" if side == "LEFT" else None)

    def _conjunct(self, node: exp.Expr, upto: int, joined: Instance) -> exp.Expr:
        if isinstance(node, exp.EQ) and isinstance(node.this, exp.Column) and isinstance(node.expression, exp.Column):
            (left, a), (right, b) = self.find(node.this, upto), self.find(node.expression, upto)
            self._link(left, a, right, b)
            same = a.type == b.type or {a.type, b.type} <= NUMERIC_TYPES
            qa, qb = exp.column(a.name, table=left.cte, quoted=True), exp.column(b.name, table=right.cte, quoted=True)
            equality = exp.EQ(this=qa, expression=qb)
            return equality if same else self.ctx.hooks.total(equality)
        rewritten = node.copy()
        for column in list(rewritten.find_all(exp.Column)):
            column.replace(self.qualified(column, upto)[0])
        return self.ctx.hooks.total(exp.Paren(this=rewritten))

    def _link(self, left: Instance, a: Column, right: Instance, b: Column) -> None:
        """Record what an equality ties: two unit columns, or a child's unit path to its parent."""
        for child, key, parent, parent_key in ((left, a, right, b), (right, b, left, a)):
            path = child.table.unit_path if child.table is not None else ()
            if len(path) == 1 and parent.table is not None and child is not parent:
                step = path[0]
                if (
                    key.name == step.from_
                    and table_key(parent.table.name) == table_key(step.table)
                    and parent_key.name == step.to
                    and child.via is None
                ):
                    child.via = self.instances.index(parent)
                    parent.parent_of.append(self.instances.index(child))
                    return
        # Unit columns of different types (an int 7 and a text '7') are not one identity: no tie.
        if left.unit == a.name and right.unit == b.name and left is not right and a.type == b.type:
            _union(self._classes, self.instances.index(left), self.instances.index(right))

    # -- the whole relation -------------------------------------------------------------------------
    def relation(self) -> tuple[Relation, Table]:
        """Check the unit ties, add hidden path joins, expose columns; the relation and its virtual table."""
        private = [i for i in self.instances if i.private]
        if not private:
            raise UnsupportedError(
                "joins of public tables only are not supported yet; query one public table at a time"
            )
        domains = {i.domain for i in private}
        if len(domains) > 1:
            first, other = private[0], next(i for i in private if i.domain != private[0].domain)
            raise PrivacyViolationError(
                f"{first.label} (domain {first.domain!r}) and {other.label} (domain {other.domain!r}) describe "
                "different people, so a joined row could hold two people's data; declare the same `domain` "
                "(and privacy unit) for both if they do describe the same people"
            )
        for i, inst in enumerate(self.instances):  # a path table joined to its parent shares its unit
            if inst.via is not None:
                _union(self._classes, i, inst.via)
        rep = private[0]
        if rep.nullable:
            raise UnsupportedError(
                f"{rep.label} is on the nullable side of a LEFT JOIN; put the private table on the left of LEFT JOIN"
            )
        hidden: list[exp.Join] = []
        if rep.unit is None and rep.via is None:  # a unit path the query did not join: the gateway does (INNER)
            hidden = self._path_joins(rep)
        rep_index = self.instances.index(rep)
        for inst in private:
            if _find(self._classes, self.instances.index(inst)) != _find(self._classes, rep_index):
                raise PrivacyViolationError(_untied(rep, inst))
        unit_expr = self._unit_expr(rep)
        exposed = self._exposed()
        unit_name = next((n for n, e in exposed if e == unit_expr), None)
        if unit_name is None:
            taken = {n for n, _ in exposed}
            own = rep.table.privacy_unit if rep.table is not None else None
            unit_name = own if own is not None and own not in taken else "__unit"
            exposed.append((unit_name, unit_expr))
        k = 1
        for inst in self.instances:
            if inst.private and not inst.parent_of:
                k *= inst.k
        columns = tuple(self._exposed_column(n, e) for n, e in exposed)
        unit_column = next(c for c in columns if c.name == unit_name)
        if unit_column.type not in ("int", "str"):
            columns = tuple(c if c.name != unit_name else Column(c.name, "str") for c in columns)
        virtual = Table(
            name=" JOIN ".join(i.label for i in self.instances),
            source=None,
            columns=columns,
            privacy_unit=unit_name,
            max_rows_per_unit=min(k, MAX_K),
            domain=rep.domain,
        )
        relation = Relation(
            ctes=(),
            sources=(),
            from_=exp.Table(this=exp.to_identifier(self.instances[0].cte)),
            joins=(*self.joins, *hidden),
            columns=tuple(exposed),
        )
        return relation, virtual

    def _path_joins(self, inst: Instance) -> list[exp.Join]:
        assert inst.table is not None
        joins = []
        current, cte = inst.table, inst.cte
        for step in inst.table.unit_path:
            parent = self.ctx.config.table(step.table)
            assert parent is not None  # the loader checked every hop
            parent_cte = self._source_cte(parent)
            a, b = current.column(step.from_), parent.column(step.to)
            assert a is not None and b is not None
            condition: exp.Expr = exp.EQ(
                this=exp.column(a.name, table=cte, quoted=True),
                expression=exp.column(b.name, table=parent_cte, quoted=True),
            )
            if not (a.type == b.type or {a.type, b.type} <= NUMERIC_TYPES):
                condition = self.ctx.hooks.total(condition)
            joins.append(exp.Join(this=exp.Table(this=exp.to_identifier(parent_cte)), on=condition))
            current, cte = parent, parent_cte
        assert current.privacy_unit is not None
        inst.unit_expr = exp.column(current.privacy_unit, table=cte, quoted=True)
        return joins

    def _unit_expr(self, inst: Instance) -> exp.Expr:
        if inst.unit_expr is not None:
            return inst.unit_expr
        if inst.unit is not None:
            return exp.column(inst.unit, table=inst.cte, quoted=True)
        assert inst.via is not None
        return self._unit_expr(self.instances[inst.via])

    def _exposed(self) -> list[tuple[str, exp.Expr]]:
        exposed: list[tuple[str, exp.Expr]] = []
        for inst in self.instances:
            for c in inst.columns:
                exposed.append((self.exposed_name(inst, c), exp.column(c.name, table=inst.cte, quoted=True)))
        return exposed

    def exposed_name(self, instance: Instance, column: Column) -> str:
        """A joined column's name in the relation: its own, or ``label.column`` where two tables share it."""
        count = sum(1 for i in self.instances for c in i.columns if c.name.lower() == column.name.lower())
        return column.name if count == 1 else f"{instance.label}.{column.name}"

    def _exposed_column(self, name: str, expr: exp.Expr) -> Column:
        assert isinstance(expr, exp.Column)
        inst = next((i for i in self.instances if i.cte == expr.table), None)
        if inst is not None:
            declared = next(c for c in inst.columns if c.name == expr.name)
        else:  # the unit of a hidden path table
            found = next(t for n, t in self.sources if n == expr.table).column(expr.name)
            assert found is not None
            declared = found
        return replace(declared, name=name)  # its type and every declared bound (numeric or date) kept


def _untied(rep: Instance, other: Instance) -> str:
    """42501 message for a private table not tied to the relation's unit, naming the declaration to add."""
    hints = []
    for inst in (rep, other):
        if inst.unit:
            hints.append(f"{inst.label}.{inst.unit}")
        elif inst.table is not None and inst.table.unit_path:
            step = inst.table.unit_path[0]
            hints.append(f"{inst.label}.{step.from_} = {step.table}.{step.to} (its declared unit path)")
    return (
        f"joining {other.label} to {rep.label} this way could pair one person's rows with another's (a join on a "
        "key that is not the privacy unit, or a cross join), multiplying rows without a bound; tie every private "
        "table to the privacy unit with ON conditions on the unit columns or along a declared unit path ("
        + "; ".join(hints)
        + "), or declare the table's privacy_unit as a path through its foreign key "
        "(privacy_unit: {column, path: [{from, table, to}]})"
    )


def _conjuncts(node: exp.Expr) -> list[exp.Expr]:
    inner = node.this if isinstance(node, exp.Paren) else node
    if isinstance(inner, exp.And):
        return _conjuncts(inner.this) + _conjuncts(inner.expression)
    return [inner]


def _find(classes: dict[int, int], i: int) -> int:
    while classes.get(i, i) != i:
        i = classes[i]
    return i


def _union(classes: dict[int, int], a: int, b: int) -> None:
    classes[_find(classes, a)] = _find(classes, b)


Derive = Callable[[str, exp.Select, "RelationBuilder"], Instance]


def from_clause(select: exp.Select, builder: RelationBuilder, scope: dict[str, exp.Select], derive: Derive) -> None:
    """Add the FROM item and every JOIN of ``select`` to ``builder`` (``scope``: the WITH names visible).

    ``derive`` turns a subquery or a CTE into a per-person instance (passes/per_unit.py).
    """
    source = select.args.get("from_") or select.args.get("from")
    assert source is not None
    joins = []
    for position, node in enumerate([source, *(select.args.get("joins") or [])]):
        item = node.this
        instance = _item(item, builder, scope, derive)
        if position:
            joins.append(builder.join(node, instance))
    builder.joins = joins


def _item(item: exp.Expr, builder: RelationBuilder, scope: dict[str, exp.Select], derive: Derive) -> Instance:
    alias = item.args.get("alias")
    if alias is not None:
        refuse_unconsumed(alias, frozenset({"this"}), "FROM (column aliases)")
    if isinstance(item, exp.Subquery):
        refuse_unconsumed(item, frozenset({"this", "alias"}), "FROM (subquery)")
        inner = item.this
        if not isinstance(inner, exp.Select):
            raise UnsupportedError("a subquery in FROM must be one SELECT grouped by the privacy unit")
        return derive(item.alias or f"subquery{len(builder.instances)}", inner, builder)
    if not isinstance(item, exp.Table):
        raise UnsupportedError(f"{item.key.upper()} is not supported in FROM; join declared tables or subqueries")
    if not isinstance(item.this, exp.Identifier):
        raise PrivacyViolationError("FROM must name a table declared in the policy (table functions are not allowed)")
    refuse_unconsumed(item, TABLE_ARGS, "FROM")
    name = item.name
    if item.args.get("db") is None and name.lower() in scope:
        instance = derive(item.alias_or_name, scope[name.lower()], builder)
        instance.names |= {name.lower()} if not item.alias else set()
        return instance
    qualified = ".".join(p.name for p in (item.args.get("db"), item.this) if p is not None)
    table = builder.ctx.config.table(qualified)
    if table is None:
        known = ", ".join(t.name for t in builder.ctx.config.tables)
        raise UnknownTableError(f'relation "{qualified}" does not exist; the policy declares: {known}')
    names = {item.alias_or_name.lower()} if item.alias else {table_key(qualified), table_key(table.name), name.lower()}
    return builder.add_table(table, names, item.alias or table.name)
