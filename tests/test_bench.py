"""The benchmark script runs end to end on a small table and writes its JSON and Markdown (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

RUN = Path(__file__).parents[1] / "bench" / "run.py"


@pytest.mark.slow
def test_bench_smoke_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(RUN.parent))  # run.py imports overhead.py, which imports run.py
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out, md = tmp_path / "results.json", tmp_path / "RESULTS.md"
    argv = ["--rows", "100000", "--reps", "1", "--overhead-queries", "5", "--out", str(out), "--markdown", str(md)]
    assert bench.main(argv) == 0
    results = json.loads(out.read_text())
    (scale,) = results["scales"]
    assert scale["rows"] == 100000 and set(scale["cold"]) == set(bench.SHAPES) == set(scale["prepared"])
    assert all(v["rewrite"].startswith("prepared ") for v in scale["prepared"].values())
    assert set(scale["top_n_window_elimination"]) == set(bench.ROW_BOUNDED)
    assert scale["cold"]["COUNT(*)"]["rewrite"] == "unit_count"
    assert results["overhead"]["distinct"]["mean_ms_by_stage"]["ledger"] > 0
    assert "## 100,000 rows" in md.read_text() and results["machine"]["cores"]


def _load(name: str) -> object:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", RUN.parent / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_keeps_the_sections_other_scripts_maintain(tmp_path: Path) -> None:
    md = tmp_path / "RESULTS.md"
    md.write_text(
        "# old\n<!-- executors: start -->\nE\n<!-- executors: end -->\nx\n<!-- backends: start -->B<!-- backends: end -->\n"
    )
    kept = _load("run").kept_sections(md)  # type: ignore[attr-defined]
    assert "<!-- executors: start -->\nE\n<!-- executors: end -->" in kept and "B<!-- backends: end -->" in kept
    assert "# old" not in kept and "\nx\n" not in kept


@pytest.mark.slow
def test_executors_bench_smoke_run(tmp_path: Path) -> None:
    md = tmp_path / "RESULTS.md"
    md.write_text("# kept\n")
    bench = _load("executors")
    assert bench.main(["--rows", "20000", "--reps", "1", "--executor", "enclave", "--markdown", str(md)]) == 0  # type: ignore[attr-defined]
    text = md.read_text()
    assert text.startswith("# kept\n") and "| 20,000 | enclave | COUNT(*) BY g |" in text and "| yes |" in text


def test_stage_clock_times_nested_stages_exclusively(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(RUN.parent))
    clock = _load("overhead").StageClock()  # type: ignore[attr-defined]
    inner = clock.wrap("inner", lambda: time.sleep(0.02))
    outer = clock.wrap("outer", lambda: (inner(), time.sleep(0.01)))
    outer()
    assert 15 < clock.times["inner"] < 100 and 5 < clock.times["outer"] < 19  # the 20 ms are inner's only


def test_overhead_stages_cover_the_query_and_are_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stage of a DP query is timed (noise, post-processing and the ledger were once missed: wrappers
    bypassed by imported names), and every wrapper is removed afterwards."""
    monkeypatch.syspath_prepend(str(RUN.parent))
    overhead = _load("overhead")
    from dpgateway import gateway, planner
    from dpgateway.executors import plain

    before = (planner.PASSES, planner.parse, gateway.post_process, gateway.release, plain.noisy_integers)
    result = overhead.measure_labels(3, ("repeated, replay cache off",))  # type: ignore[attr-defined]
    stages = result["repeated, replay cache off"]["mean_ms_by_stage"]
    for stage in ("backend", "ledger", "noise (OpenDP)", "post-process", "accuracy statements"):
        assert stages[stage] > 0, stage
    assert (planner.PASSES, planner.parse, gateway.post_process, gateway.release, plain.noisy_integers) == before


@pytest.mark.slow
def test_cold_forms_candidates_give_the_current_integers(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/cold_forms.py asserts every exact candidate against the gateway's bounded SQL; a small run does that."""
    monkeypatch.syspath_prepend(str(RUN.parent))
    forms = _load("cold_forms")
    results = forms.run(20_000, 1)  # type: ignore[attr-defined]
    assert set(results) == {"unfiltered", "filtered"}
    exact = {name for name, (_, _, _, is_exact) in results["filtered"].items() if is_exact}
    assert "single-cell units, MIN/MAX(branch index)" in exact and "exact count minus heavy correction" in exact
    assert "unit_grouped: COUNT(*) BY region" in results["filtered"]  # the session-9 form, timed beside them


def test_single_cell_form_equals_per_row_weights_on_adversarial_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The single-cell ``COUNT(*) BY key`` form of bench/cold_forms.py against an independent per-row reference:
    NULL units (dropped), NULL keys (a cell of their own), units mixing NULL and non-NULL keys, a unit of many
    rows across cells, units of at most k rows, and a filter."""
    import duckdb

    monkeypatch.syspath_prepend(str(RUN.parent))
    forms = _load("cold_forms")
    rows = [(1, "a", 5.0)] * 40 + [(1, "b", -3.0)] * 7 + [(1, None, 1.0)] * 3  # 50 rows over three cells
    rows += [(2, None, 1.0), (2, "a", 2.0), (3, None, None), (3, None, 4.0), (4, "b", 1.0)] + [(5, "c", -1.0)] * 9
    rows += [(None, "a", 1.0), (None, None, 1.0), (6, "a", None), (6, "a", 7.0), (6, "c", 8.0), (6, "c", 9.0)]
    con = duckdb.connect()
    con.execute("CREATE TABLE t (pid BIGINT, k TEXT, income DOUBLE)")
    con.executemany("INSERT INTO t VALUES (?, ?, ?)", rows)
    scale, k = forms.S, forms.K  # type: ignore[attr-defined]
    for where, keep in (("TRUE", lambda r: True), ("income > 0", lambda r: r[2] is not None and r[2] > 0)):
        kept = [r for r in rows if r[0] is not None and keep(r)]
        n = {u: sum(1 for r in kept if r[0] == u) for u in {r[0] for r in kept}}
        expected: dict[object, int] = {}
        for pid, key, _ in kept:
            expected[key] = expected.get(key, 0) + scale * k // max(n[pid], k)
        sql = forms.single_cell("typed AS (SELECT * FROM t)", "k", where)  # type: ignore[attr-defined]
        assert dict(con.execute(sql).fetchall()) == expected
