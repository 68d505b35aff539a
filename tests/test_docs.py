"""The documentation keeps up with the code: every SQLSTATE, config key and CLI command is documented."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from dpgateway.cli import cli
from dpgateway.errors import ALL_ERRORS
from dpgateway.policies import loader

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
DOCS = README + "".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))


@pytest.mark.parametrize("error", ALL_ERRORS, ids=lambda e: e.__name__)
def test_every_sqlstate_is_in_the_readme(error: type) -> None:
    assert f"| {error.sqlstate} |" in README


@pytest.mark.parametrize(
    "key",
    sorted(loader.TOP_KEYS | loader.TABLE_KEYS | loader.COLUMN_KEYS | loader.BUDGET_KEYS),
)
def test_every_config_key_is_in_the_readme(key: str) -> None:
    assert re.search(rf"\b{key}:", README), f"config key {key!r} is not documented in README.md"


def _commands(group: click.Group, prefix: str = "") -> list[str]:
    names = []
    for name, command in group.commands.items():
        names.append(f"{prefix}{name}")
        if isinstance(command, click.Group):
            names.extend(_commands(command, f"{prefix}{name} "))
    return names


@pytest.mark.parametrize("command", _commands(cli))
def test_every_cli_command_is_documented(command: str) -> None:
    assert f"dpgateway {command}" in DOCS, f"`dpgateway {command}` appears in no doc"


def test_readme_python_example_runs(demo_config_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    block = re.search(r"```python\n(.*?)```", README, re.S)
    assert block is not None
    monkeypatch.chdir(demo_config_path.parent)
    namespace: dict[str, object] = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)


def test_readme_documents_the_query_json_shape() -> None:
    from dpgateway.gateway import Result
    from dpgateway.postprocess import Released

    keys = Result(Released(("n",), [(1,)]), 0.5, 0.0, {}).to_dict()
    shape = re.search(r"- JSON: `(\{.*?\})`", README, re.S)
    assert shape is not None, "README.md lost the JSON shape of `dpgateway query --format json`"
    for key in keys:
        assert f'"{key}"' in shape.group(1), f"JSON key {key!r} of a query answer is not in README.md's JSON shape"
