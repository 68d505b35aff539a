"""docs/backends.md's runnable examples run as written: the section's YAML block becomes ``dpgateway.yaml``
in an empty folder and its shell block runs there with bash (``dpgateway`` and ``python`` from this
environment). The PostgreSQL example gets a fresh throwaway server of its own (it creates a role and a
schema); the Spark example starts its own local Spark in the ``dpgateway`` process, so it is slow."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from pg_server import PostgresUnavailable, start_postgres

DOC = Path(__file__).parents[2] / "docs" / "backends.md"


def example(section: str) -> tuple[str, str]:
    """The first YAML block of ``## section`` and its shell block that runs ``dpgateway query``."""
    text = DOC.read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    config = re.search(r"```yaml\n(.*?)```", text, re.S)
    script = next((b for b in re.findall(r"```sh\n(.*?)```", text, re.S) if "dpgateway query" in b), None)
    assert config is not None and script is not None, f"docs/backends.md lost the {section} example"
    return config.group(1), script


def run(folder: Path, section: str, env: dict[str, str], timeout: float) -> str:
    config, script = example(section)
    (folder / "dpgateway.yaml").write_text(config)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=folder,
        env={**os.environ, "PATH": path, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.postgres
def test_postgres_example_runs(tmp_path: Path) -> None:
    try:
        server = start_postgres()
    except PostgresUnavailable as exc:
        pytest.skip(f"PostgreSQL could not start: {exc}")
    try:
        url = sa.make_url(server.url)
        host = url.host or str(url.query.get("host", ""))
        env = {"PGHOST": host, "PGPORT": str(url.port or 5432), "PGUSER": url.username or "postgres"}
        out = run(tmp_path, "PostgreSQL", {**env, "PGDATABASE": url.database or "postgres"}, timeout=300)
    finally:
        server.stop()
    assert "count" in out.lower() and "avg" in out.lower(), out


@pytest.mark.spark
@pytest.mark.slow
def test_spark_example_runs(tmp_path: Path) -> None:
    pytest.importorskip("pyspark", reason="pip install 'dpgateway[spark]'")
    out = run(tmp_path, "Spark", {}, timeout=600)
    assert "count" in out.lower() and "avg" in out.lower(), out
