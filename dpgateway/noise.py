"""Noise the exact bounded aggregates: the only step that sees exact values, and it releases none."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from dpgateway import mechanisms
from dpgateway.connectors.base import ExactAggregates
from dpgateway.errors import InternalError
from dpgateway.mechanisms import Mechanism, noisy_vector, select_partitions
from dpgateway.passes.groups import public_cells
from dpgateway.passes.quantiles import grid, noisy_indexes, split_bins
from dpgateway.plan import DPPlan, Measurement

Key = tuple[Any, ...]


@dataclass(frozen=True)
class Noisy:
    """The noisy release as plain Python columns (key values; ints for counts; floats for sums in real units).

    Post-processing reads it directly when it can (postprocess.py); :meth:`frame` is the pandas form the
    sandbox DuckDB reads otherwise. Building a DataFrame costs more than the rest of this module.
    """

    columns: tuple[str, ...]
    values: tuple[list[Any], ...]
    counts: frozenset[str] = frozenset()  # columns typed as nullable integers in the frame

    def frame(self) -> pd.DataFrame:
        data = {
            name: pd.array(column, dtype="Int64") if name in self.counts else column
            for name, column in zip(self.columns, self.values, strict=True)
        }
        return pd.DataFrame(data, columns=list(self.columns))


def add_noise(plan: DPPlan, exact: ExactAggregates) -> Noisy:
    """One row per released group: key columns, then each measurement in real units (noisy).

    Public key domains are released whole (missing groups count zero, values outside the domain are
    dropped); private keys only through the threshold of the selecting count.
    """
    cells, values = noisy_integers(plan, exact)
    return release(plan, cells, values)


def noisy_integers(plan: DPPlan, exact: ExactAggregates) -> tuple[list[Key], dict[str, list[int]]]:
    """The released cells and each measurement's noisy integers (fixed-point units), in cell order."""
    n_keys = len(plan.group_keys)
    exact, histograms = split_bins(plan, exact)  # quantiles: per-candidate counts (passes/quantiles.py)
    by_key: dict[Key, tuple[Any, ...]] = {tuple(row[:n_keys]): row for row in exact.rows}
    if len(exact.columns) != n_keys + len(plan.measurements):
        raise InternalError("the backend returned an unexpected number of columns")
    public = _public_additive(plan)
    noisy: dict[str, list[int]] = {}
    if public is not None:
        cells, by_scale = list(public[0]), public[1]
    else:
        cells, noisy = _select(plan, by_key)
        by_scale = _by_scale([m for m in plan.measurements if m.name not in noisy and m.kind != "quantile"])
    values = exact_vectors(by_key, cells, n_keys, [m.name for m in plan.measurements])
    noisy.update(_noised_by_scale(by_scale, values))
    return cells, {
        m.name: noisy[m.name] if m.name in noisy else noisy_indexes(plan, m, histograms, cells)
        for m in plan.measurements
    }


def draw_ahead(plan: DPPlan) -> None:
    """Start drawing the plan's additive noise now, while its backend runs (dpgateway/noise_pool.py).

    Only where the vector lengths are public: no group keys, or public key domains (cells x measurements of
    each scale); with private keys the number of released cells depends on the data, so nothing is asked.
    """
    public = _public_additive(plan)
    if public is None:
        return
    cells, by_scale = public
    for (scale, mechanism), group in by_scale.items():
        mechanisms.draw_ahead(mechanism, scale, len(cells) * len(group))


ByScale = dict[tuple[float, Mechanism], list[Measurement]]


def _public_additive(plan: DPPlan) -> tuple[tuple[Key, ...], ByScale] | None:
    """With public cells (no group keys, or public key domains): the cells and the additive measurements
    (all but quantiles: no threshold applies) by scale, once per plan, so that what :func:`draw_ahead` asks
    of the pool is exactly what :func:`noisy_integers` takes. None with private keys (selection first)."""

    def compute(plan: DPPlan) -> tuple[tuple[Key, ...], ByScale] | None:
        cells = public_cells(plan.group_keys) if plan.group_keys else [()]
        if cells is None:
            return None
        return tuple(cells), _by_scale([m for m in plan.measurements if m.kind != "quantile"])

    return plan.memo("noise.public_additive", compute)


def _by_scale(measurements: list[Measurement]) -> ByScale:
    by_scale: ByScale = {}
    for m in measurements:
        by_scale.setdefault((m.noise_scale, m.mechanism), []).append(m)
    return by_scale


def _noised_by_scale(by_scale: ByScale, values: dict[str, list[int]]) -> dict[str, list[int]]:
    """Each measurement's values with the discrete noise of its mechanism and scale, one OpenDP call per
    distinct (scale, mechanism).

    The vector mechanism adds an independent draw of the scale to every coordinate, so noising the
    measurements of one scale as one concatenated vector gives exactly the distribution of noising each
    alone (each measurement's privacy cost is accounted by the planner, not by this call); it saves
    OpenDP's fixed cost per call (about 0.1 ms)."""
    noisy: dict[str, list[int]] = {}
    for (scale, mechanism), group in by_scale.items():
        joined = noisy_vector([v for m in group for v in values[m.name]], scale, mechanism)
        start = 0
        for m in group:
            noisy[m.name] = joined[start : start + len(values[m.name])]
            start += len(values[m.name])
    return noisy


def exact_vectors(
    by_key: dict[Key, tuple[Any, ...]], cells: list[Key], n_keys: int, names: list[str]
) -> dict[str, list[int]]:
    """Each measurement's exact integer per cell (a missing group or an empty SUM is zero)."""
    return {name: [_exact(by_key.get(cell), n_keys + i) for cell in cells] for i, name in enumerate(names)}


def release(plan: DPPlan, cells: list[Key], noisy: dict[str, list[int]]) -> Noisy:
    """The noisy integers in real units beside their key columns (post-processing only)."""
    n_keys = len(plan.group_keys)
    columns: list[list[Any]] = [[cell[j] for cell in cells] for j in range(n_keys)]
    for m in plan.measurements:
        raw = noisy[m.name]
        if m.kind in ("count", "count_distinct"):  # a fixed-point count (weighted rewrite) is presented as an integer
            columns.append(list(raw) if m.scale == 1 else [round(v / m.scale) for v in raw])
        elif m.kind == "quantile":  # the released candidate index, as the candidate's value
            assert plan.table is not None
            candidates = grid(m, plan.table)
            columns.append([candidates.value(i) for i in raw])
        else:
            columns.append([v / m.scale for v in raw])
    return Noisy(
        columns=(*(k.name for k in plan.group_keys), *(m.name for m in plan.measurements)),
        values=tuple(columns),
        counts=frozenset(m.name for m in plan.measurements if m.kind in ("count", "count_distinct")),
    )


def _select(plan: DPPlan, by_key: dict[Key, tuple[Any, ...]]) -> tuple[list[Key], dict[str, list[int]]]:
    """Partition selection: keys whose noisy bounded row count reaches the threshold, sorted by key."""
    selector = next(m for m in plan.measurements if m.threshold is not None)
    position = len(plan.group_keys) + plan.measurements.index(selector)
    assert selector.threshold is not None
    cells, kept = select_cells(by_key, position, selector.noise_scale, selector.threshold)
    return cells, {selector.name: kept}


def select_cells(
    by_key: dict[Key, tuple[Any, ...]], position: int, scale: float, threshold: int
) -> tuple[list[Key], list[int]]:
    """The keys whose noisy count (column ``position``) reaches ``threshold``, sorted by key, and those counts."""
    keys = list(by_key)
    counts = {i: _exact(by_key[key], position) for i, key in enumerate(keys)}
    kept = select_partitions(counts, scale, threshold)
    order = sorted(kept, key=lambda i: tuple((v is None, str(type(v)), v if v is not None else 0) for v in keys[i]))
    return [keys[i] for i in order], [kept[i] for i in order]


def _exact(row: tuple[Any, ...] | None, index: int) -> int:
    """An exact aggregate as an int; a missing group or an empty SUM is zero."""
    if row is None or row[index] is None:
        return 0
    return int(row[index])
