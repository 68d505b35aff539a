"""bench/server.py runs end to end (both servers, every statement, the paired overhead) and writes its section
of RESULTS.md without touching the rest (no timing asserts)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "bench" / "server.py"


@pytest.mark.slow
@pytest.mark.postgres
def test_bench_server_smoke_run(tmp_path: Path) -> None:
    md = tmp_path / "RESULTS.md"
    md.write_text("# kept\n\n<!-- server: start -->\nold\n<!-- server: end -->\n\n## also kept\n")
    argv = ["--runs", "1", "--seconds", "0.5", "--warmup", "0.2", "--clients", "2", "--markdown", str(md)]
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = md.read_text()
    assert text.startswith("# kept") and text.rstrip().endswith("## also kept") and "\nold\n" not in text
    for row in ("| SELECT 1 | 2 |", "| replayed DP | 2 |", "| fresh DP | 2 |", "wire - API"):
        assert row in text


def test_run_py_keeps_the_sections_other_scripts_maintain(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_run", SCRIPT.parent / "run.py")
    assert spec is not None and spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    md = tmp_path / "RESULTS.md"
    backends = "<!-- backends: start -->\nB\n<!-- backends: end -->"
    server = "<!-- server: start -->\nS\n<!-- server: end -->"
    md.write_text(f"# figures\n\n{backends}\n\nrun.py's own text\n\n{server}\n")
    assert run.kept_sections(md) == f"\n{backends}\n\n{server}\n"
