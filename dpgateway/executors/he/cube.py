"""The data owner's step: bound each row locally, pack its contributions, encrypt them (``dpgateway he encrypt``).

Bounding happens at the owner, who holds the rows: it runs the gateway's own per-row bounded SQL (the
prepared-copy statement, :func:`dpgateway.passes.bounding.prepared_copy_tree`, verified like every
backend statement) on its own DuckDB, which gives every row with a privacy unit, the unit's row count
``n_u``, the row's rank within its unit and the row's weighted contribution ``trunc(v * k / max(n_u, k))``
to each measurement (clamped, centred, fixed point; the proof note is in passes/bounding.py). The cube
stores, per row, one *field* per (grouping cell, measurement):

- global fields (no GROUP BY): each chosen weighted measurement, plus ``[rank <= k]`` for the
  ``unit_count`` estimator of a scalar ``COUNT(*)`` (``sum_u min(n_u, k)``, independent of which ranks);
- for each chosen public-key column ``g`` and each value ``d`` of its declared domain: each weighted
  measurement times the one-hot ``[g = d]`` (a row outside the domain or NULL is in no cell, as the plain
  path drops it).

So the encrypted sums are exactly what the plain executor's weighted / unit-count SQL returns for an
unfiltered query, and the accountant's sensitivity (passes/budget.py) holds unchanged: the cube is a
different place to add the same per-row integers. Each field's per-row bound ``B_f`` (``COUNT_SCALE`` for
weighted counts, ``ceil(bound * scale)`` for sums, 1 for the unit count) goes in the manifest; the owner
refuses to encrypt when ``capacity * B_f`` could wrap modulo ``t`` (scheme.py).

Layout: fields padded to ``S`` slots (a power of two), ``R = N / S`` rows per ciphertext, row ``r`` of a
batch in slots ``[r S, (r + 1) S)``. Ciphertexts go to one ``.npy`` memory map (raw coefficients), written in
batches; the gateway learns the number of ciphertexts, so the row count rounded up to a multiple of ``R``
(``--pad-to`` hides it further).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
from sqlglot import exp

from dpgateway.errors import InvalidParameterError, UnsupportedError
from dpgateway.executors.base import decode_value, encode_value
from dpgateway.executors.he import scheme
from dpgateway.passes.aggregates import moment_center
from dpgateway.passes.budget import COUNT_SCALE, FIXED_POINT_DIGITS
from dpgateway.passes.sql_parts import stored_contributions
from dpgateway.plan import Measurement
from dpgateway.policies.model import Column, Config, Table

VERSION = 1
MANIFEST = "manifest.json"
CIPHERTEXTS = "ciphertexts.npy"
BATCH_ROWS = 64 * 1024  # rows read into memory at once while encrypting

# (grouping column or None, cell value, rewrite, kind, column, centre, squared, scale)
FieldKey = tuple[str | None, Any, str, str, str | None, float, bool, float]


@dataclass(frozen=True)
class Field:
    """One slot of each row's block: a measurement's contribution in one grouping cell."""

    grouping: str | None
    value: Any
    rewrite: str  # 'weighted' or 'unit_count'
    measurement: Measurement
    bound: int  # largest absolute per-row contribution

    @property
    def key(self) -> FieldKey:
        m = self.measurement
        return (self.grouping, self.value, self.rewrite, m.kind, m.column, m.center, m.squared, m.scale)

    def to_json(self) -> list[Any]:
        m = self.measurement
        return [
            self.grouping, encode_value(self.value), self.rewrite, m.kind, m.column,
            float(m.center).hex(), m.squared, float(m.scale).hex(), self.bound,
        ]  # fmt: skip

    @classmethod
    def from_json(cls, data: Sequence[Any]) -> Field:
        grouping, value, rewrite, kind, column, center, squared, scale, bound = data
        m = Measurement(
            name="",
            kind=kind,
            arg=exp.column(column) if column is not None else None,
            center=float.fromhex(center),
            squared=squared,
            scale=float.fromhex(scale),
        )
        return cls(grouping, decode_value(value), rewrite, m, int(bound))


def field_key(grouping: str | None, value: Any, rewrite: str, m: Measurement) -> FieldKey:
    return (grouping, value, rewrite, m.kind, m.column, m.center, m.squared, m.scale)


@dataclass(frozen=True)
class Cube:
    """A table's encrypted contributions as the gateway holds them (manifest plus ciphertext file)."""

    folder: Path
    table: str
    policy: str
    fields: tuple[Field, ...]
    period: int
    ciphertexts: int
    key_id: str

    @property
    def rows_per_ciphertext(self) -> int:
        return scheme.DEGREE // self.period

    @property
    def capacity(self) -> int:
        """An upper bound on the rows encrypted (every slot block of every ciphertext)."""
        return self.ciphertexts * self.rows_per_ciphertext

    @property
    def groupings(self) -> set[str | None]:
        return {f.grouping for f in self.fields}

    def slot(self, key: FieldKey) -> int | None:
        for i, f in enumerate(self.fields):
            if f.key == key:
                return i
        return None

    def batches(self, size: int = 1024) -> Iterator[np.ndarray]:
        """The raw ciphertexts, ``size`` at a time from a memory map (bounded memory)."""
        data = np.load(self.folder / CIPHERTEXTS, mmap_mode="r")
        if data.dtype != np.uint64 or data.shape != (self.ciphertexts, 2, len(scheme.COEFF_BITS) - 1, scheme.DEGREE):
            raise InvalidParameterError(f"{self.folder}: the ciphertext file does not match its manifest")
        for start in range(0, len(data), size):
            yield data[start : start + size]

    @classmethod
    def load(cls, folder: Path) -> Cube:
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            raise InvalidParameterError(
                f"no encrypted data in {str(folder)!r}; the data owner runs `dpgateway he encrypt TABLE` and "
                "copies its output there"
            ) from None
        if not isinstance(manifest, dict) or manifest.get("version") != VERSION:
            raise InvalidParameterError(f"{folder}: encrypted by another dpgateway version; encrypt the table again")
        try:
            return cls(
                folder=folder,
                table=str(manifest["table"]),
                policy=str(manifest["policy"]),
                fields=tuple(Field.from_json(f) for f in manifest["fields"]),
                period=int(manifest["period"]),
                ciphertexts=int(manifest["ciphertexts"]),
                key_id=str(manifest["key_id"]),
            )
        except (KeyError, TypeError, ValueError):
            raise InvalidParameterError(f"{folder}: a malformed manifest; encrypt the table again") from None


def policy_digest(table: Table) -> str:
    """What the stored contributions depend on: columns, bounds, domains, unit, ``k`` and the fixed-point constants."""
    parts = (table.name, table.columns, table.privacy_unit, table.max_rows_per_unit, FIXED_POINT_DIGITS, COUNT_SCALE)
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def key_id(public_key: Path) -> str:
    return hashlib.sha256(public_key.read_bytes()).hexdigest()


def plan_fields(table: Table, *, sums: Sequence[str], avgs: Sequence[str], variances: Sequence[str],
                groupings: Sequence[str]) -> list[Field]:  # fmt: skip
    """The cube's fields for the owner's choice of measures and public-key columns (refusing what cannot be)."""
    if table.privacy_unit is None:
        raise UnsupportedError(
            f"table {table.name} has no privacy_unit; the he executor encrypts per-unit bounded contributions "
            "(declare privacy_unit, or use the plain executor)"
        )
    if table.unit_path:
        raise UnsupportedError(
            f"table {table.name} reaches its privacy unit through other tables; the he executor needs the unit "
            "as a column of the table it encrypts"
        )
    stored = [m for _, m in stored_contributions(table)]
    wanted: list[Measurement] = [m for m in stored if m.kind == "count" and m.column is None]
    for name in [*sums, *avgs, *variances]:
        column = _numeric(table, name)
        assert column.bounds is not None
        mid = moment_center(column.bounds)
        picks = [("sum", 0.0, False)]
        if name in avgs or name in variances:
            picks += [("count", 0.0, False), ("sum", mid, False)]
        if name in variances:
            picks.append(("sum", mid, True))
        for kind, center, squared in picks:
            m = next(
                m for m in stored
                if (m.kind, m.column, m.center if kind == "sum" else 0.0, m.squared) == (kind, name, center, squared)
            )  # fmt: skip
            if m not in wanted:
                wanted.append(m)
    unit_count = Measurement(name="", kind="count", arg=None, scale=1.0)
    fields = [Field(None, None, "unit_count", unit_count, 1)]
    fields += [Field(None, None, "weighted", m, _bound(m)) for m in wanted]
    for name in groupings:
        for value in _domain(table, name):
            fields += [Field(name, value, "weighted", m, _bound(m)) for m in wanted]
    return fields


def _numeric(table: Table, name: str) -> Column:
    column = table.column(name)
    if column is None or not column.is_numeric or column.bounds is None or column.name == table.privacy_unit:
        raise InvalidParameterError(f"{table.name}.{name}: choose a numeric column with declared bounds")
    return column


def _domain(table: Table, name: str) -> tuple[Any, ...]:
    column = table.column(name)
    if column is not None and column.type == "bool":
        return (False, True)
    if column is None or column.public_values is None or column.type not in ("int", "str", "bool"):
        raise InvalidParameterError(
            f"{table.name}.{name}: GROUP BY in the he executor needs an int, str or bool column with public_values"
        )
    return column.public_values


def _bound(m: Measurement) -> int:
    """Largest |trunc(w v)| of one row: ``|v| <= ceil(bound * scale)`` (COUNT_SCALE for a weighted count)."""
    return COUNT_SCALE if m.kind == "count" else math.ceil(m.bound * m.scale)


def period_for(n_fields: int) -> int:
    period = 1 << max(0, (n_fields - 1).bit_length())
    if period > scheme.ROW:
        raise InvalidParameterError(
            f"{n_fields} fields per row do not fit one ciphertext row ({scheme.ROW} slots); choose fewer measures or "
            "group-by columns"
        )
    return period


def owner_copy(config: Config, name: str) -> Path:
    """The owner's bounded per-row copy of table ``name`` (``Gateway.prepare`` on the owner's own config).

    The owner holds the rows, so the table is read as ``plain`` here even when the shared policy says ``he``
    (the gateway refuses to prepare a confidential table because it never reads its rows; the owner does).
    """
    from dpgateway.gateway import Gateway

    tables = tuple(dataclasses.replace(t, executor="plain") if t.name == name else t for t in config.tables)
    with Gateway(dataclasses.replace(config, tables=tables)) as gw:
        return Path(gw.prepare(name).path)


def contributions(rows: dict[str, np.ndarray], table: Table, fields: Sequence[Field], period: int) -> np.ndarray:
    """The ``(rows, period)`` matrix of per-row field values from the prepared copy's columns."""
    names = {_ckey(m): name for name, m in stored_contributions(table)}
    n = len(next(iter(rows.values())))
    out = np.zeros((n, period), dtype=np.int64)
    _, rank = _unit_columns(table)
    for i, f in enumerate(fields):
        if f.rewrite == "unit_count":
            values = (_filled(rows[rank]) <= table.max_rows_per_unit).astype(np.int64)
        else:
            values = _filled(rows[names[_ckey(f.measurement)]])
        if f.grouping is not None:
            column = rows[f.grouping]
            present = ~np.ma.getmaskarray(column)
            values = values * ((np.ma.getdata(column) == f.value) & present)
        out[:, i] = values
    return out


def _ckey(m: Measurement) -> tuple[str, str | None, float, bool, float]:
    return (m.kind, m.column, m.center, m.squared, m.scale)


def _unit_columns(table: Table) -> tuple[str, str]:
    from dpgateway.passes.sql_parts import unit_columns

    return unit_columns(table)


def _filled(column: np.ndarray) -> np.ndarray:
    return np.asarray(np.ma.filled(column, 0), dtype=np.int64)


def encrypt_table(
    table: Table,
    prepared: Path,
    keys: scheme.Keys,
    out: Path,
    *,
    fields: Sequence[Field],
    key_digest: str,
    pad_to: int = 0,
) -> Cube:
    """Encrypt the prepared copy's rows into ``out`` (manifest written last, so a partial cube is never read)."""
    period = period_for(len(fields))
    per_ct = scheme.DEGREE // period
    con = duckdb.connect()
    try:
        relation = con.read_parquet(str(prepared))
        n = int(relation.shape[0])
        count = max(1, -(-max(n, pad_to) // per_ct))
        for f in fields:
            if not scheme.fits(count * per_ct, f.bound, keys.plain_modulus):
                raise InvalidParameterError(
                    f"table {table.name}: {count * per_ct} rows of values up to {f.bound} could wrap the plaintext "
                    f"modulus ({keys.plain_modulus}); split the table or narrow the bounds"
                )
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
        data = np.lib.format.open_memmap(
            out / CIPHERTEXTS, mode="w+", dtype=np.uint64, shape=(count, 2, len(scheme.COEFF_BITS) - 1, scheme.DEGREE)
        )
        encryptor = scheme.Encryptor(keys)
        written = 0
        for offset in range(0, count * per_ct, BATCH_ROWS):
            if offset < n:
                batch = relation.limit(BATCH_ROWS, offset).fetchnumpy()
                matrix = contributions(batch, table, fields, period)
            else:
                matrix = np.zeros((0, period), dtype=np.int64)
            target = min(BATCH_ROWS, count * per_ct - offset)
            matrix = np.vstack([matrix, np.zeros((target - len(matrix), period), dtype=np.int64)])
            for block in matrix.reshape(-1, scheme.DEGREE):
                data[written] = encryptor.encrypt(block)
                written += 1
        data.flush()
        del data
    finally:
        con.close()
    manifest = {
        "version": VERSION,
        "table": table.name,
        "policy": policy_digest(table),
        "fields": [f.to_json() for f in fields],
        "period": period,
        "ciphertexts": count,
        "key_id": key_digest,
    }
    temporary = out / (MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest))
    os.replace(temporary, out / MANIFEST)
    return Cube.load(out)
