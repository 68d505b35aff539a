"""node-postgres (``pg`` from the npm registry) against the gateway, and the same script against the reference
PostgreSQL 15 (shapes compared, as in test_differential.py). ``pg`` is installed by the test itself into
``$DPGATEWAY_NODE_CACHE`` (default ``~/.cache/dpgateway-tests/node``); the test is skipped only when node or npm
is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORD, Running

PG_VERSION = "8"
SCRIPT = r"""
const { Client } = require("pg");

async function main() {
  const [host, port] = process.argv.slice(2);
  const client = new Client({ host, port: Number(port), user: "alice", password: process.env.PGPASSWORD,
                              database: "dpgateway" });
  const notices = [];
  client.on("notice", (n) => notices.push(n.message));
  await client.connect();
  const out = {};
  const shape = (r) => ({ fields: r.fields.map((f) => [f.name, f.dataTypeID]), rows: r.rowCount });
  const cases = {
    one: ["SELECT 1 AS one", []],
    count: ["SELECT COUNT(*) AS n FROM pums WHERE age > 30", []],
    bound: ["SELECT COUNT(*) AS n FROM pums WHERE age > $1", [30]],
    grouped: ["SELECT sex, AVG(income) AS a, SUM(age) AS s FROM pums GROUP BY sex ORDER BY sex", []],
    catalog: ["SELECT table_name FROM information_schema.tables WHERE table_schema = $1", ["public"]],
    missing: ["SELECT COUNT(*) FROM pums_nope", []],
    refused: ["SELECT * FROM pums", []],
  };
  for (const [name, [sql, params]] of Object.entries(cases)) {
    try {
      const result = await client.query(sql, params);
      out[name] = shape(result);
      if (name === "count") out.count_is_digits = /^\d+$/.test(result.rows[0].n);
      if (name === "catalog") out.catalog_rows = result.rows;
    } catch (err) {
      out[name] = { error: err.code };
    }
  }
  out.notice = notices.some((n) => n.startsWith("dp: spent epsilon"));
  await client.end();
  console.log(JSON.stringify(out));
}

main().catch((err) => { console.error(err); process.exit(1); });
"""


@pytest.fixture(scope="session")
def node_pg() -> Path:
    """A folder where ``require("pg")`` works: npm installs node-postgres there once (a cached install is reused)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        if os.environ.get("CI"):
            pytest.fail("node and npm are missing in CI: install nodejs and npm")
        pytest.skip("node-postgres needs node and npm, which are not installed (apt-get install -y nodejs npm)")
    folder = Path(os.environ.get("DPGATEWAY_NODE_CACHE", Path.home() / ".cache" / "dpgateway-tests" / "node"))
    if not (folder / "node_modules" / "pg" / "package.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--prefix", str(folder), f"pg@{PG_VERSION}"],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, f"npm install pg@{PG_VERSION} failed: {done.stderr[-2000:]}"
    (folder / "probe.js").write_text(SCRIPT)
    return folder


def _probe(folder: Path, target: Running) -> dict[str, Any]:
    done = subprocess.run(
        ["node", str(folder / "probe.js"), target.host, str(target.port)],
        env=dict(os.environ, PGPASSWORD=PASSWORD, NODE_PATH=str(folder / "node_modules")),
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def test_node_postgres(node_pg: Path, catalog_wire: Running, reference_pg: Running) -> None:
    got = _probe(node_pg, catalog_wire)
    assert got["count"] == {"fields": [["n", 20]], "rows": 1} and got["count_is_digits"]  # int8: pg gives a string
    assert got["bound"] == got["count"]  # the extended protocol with a bound parameter
    assert got["refused"] == {"error": "42501"} and got["notice"]
    expected = _probe(node_pg, reference_pg)
    for differs in ("refused", "notice"):  # SELECT * is refused by design; DP notices are the gateway's own
        got.pop(differs), expected.pop(differs)
    assert got == expected
