"""Executor commands: ``dpgateway demo --executor NAME`` (its runner), ``dpgateway enclave seal|measurement`` and
``dpgateway mpc keygen|party``."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.panel import Panel
from rich.text import Text

from dpgateway.cli_common import console, render_rows, reports_errors
from dpgateway.errors import FileAccessError, InvalidParameterError, UnsupportedError
from dpgateway.executors import demo as executor_demo
from dpgateway.gateway import Gateway, Result
from dpgateway.policies.loader import parse_config


def run_executor_demo(name: str, csv: Path, *, epsilon: float, fmt: str, show: Callable[[Result, str], None]) -> None:
    """Prepare the sample for executor ``name``, run each demo query on it and on plain, print answers and timings."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepared = executor_demo.setup(name, folder, csv)
        timings: list[list[Any]] = [[step, round(seconds, 4), ""] for step, seconds in prepared.timings.items()]
        documents = []
        out = console()
        with Gateway(parse_config(prepared.config, base_dir=folder)) as gw:
            for i, (title, template) in enumerate(executor_demo.QUERIES):
                sql = template.format(table="pums")
                start = time.perf_counter()
                with out.status(f"[dim]{title} ({name})"):
                    result = gw.query(sql, analyst="demo", epsilon=epsilon)
                took = time.perf_counter() - start
                start = time.perf_counter()
                gw.query(template.format(table="pums_plain"), analyst="demo-plain", epsilon=epsilon)
                plain = time.perf_counter() - start
                label = f"query {i + 1} on {name}" + (" (includes starting the executor)" if i == 0 else "")
                timings.append([label, round(took, 4), f"{took / plain:.2f}x plain ({plain:.4f} s)"])
                if fmt == "json":
                    documents.append(
                        {"title": title, "sql": sql, "seconds": took, "plain_seconds": plain, **result.to_dict()}
                    )
                    continue
                out.print(Panel(Text(sql), title=f"{title} [{name}]", title_align="left", border_style="cyan"))
                show(result, fmt)
            history = {c.analyst: (c.epsilon, c.delta) for c in gw.store.history()}
        same = history.get("demo") == history.get("demo-plain")
        if fmt == "json":
            render_rows(
                [],
                [],
                "json",
                extra={"executor": name, "queries": documents, "timings": timings, "debits_equal_plain": same},
            )
            return
        render_rows(["step", "seconds", "vs plain"], timings, fmt, title=f"timings: {name} executor")
        out.print(Text(f"ledger debits identical to plain: {'yes' if same else 'NO'}", style="dim"))


@click.group()
def enclave() -> None:
    """The enclave executor's data-owner commands (see docs/executors.md)."""


@enclave.command()
@click.argument("source", type=click.Path(dir_okay=False, exists=True))
@click.option(
    "--key", "key_path", required=True, type=click.Path(dir_okay=False), help="Data key file (created if missing)."
)
@click.option(
    "--out", "out_path", default=None, type=click.Path(dir_okay=False), help="Sealed copy (default SOURCE.sealed)."
)
@reports_errors
def seal(source: str, key_path: str, out_path: str | None) -> None:
    """Encrypt SOURCE (a Parquet file) into a sealed copy that only an attested enclave can open.

    The key file stays with the data owner's key broker (executors.enclave.sealed.TABLE.key); the sealed copy
    goes where the gateway runs (executors.enclave.sealed.TABLE.file).
    """
    from dpgateway.executors.enclave import protocol

    key_file, target = Path(key_path), Path(out_path or f"{source}.sealed")
    if target.exists():
        raise InvalidParameterError(f"{target} already exists; seal never overwrites a file: choose another --out")
    try:
        key = protocol.read_key_file(key_file) if key_file.exists() else protocol.new_key_file(key_file)
        target.write_bytes(protocol.seal(Path(source).read_bytes(), key))
    except protocol.ProtocolError as exc:
        raise InvalidParameterError(str(exc)) from None
    except OSError as exc:
        raise FileAccessError(f"cannot write {target} or {key_file} ({exc.strerror})") from None
    click.echo(f"sealed {source} -> {target} (key: {key_file}, keep it with the key broker)")


@enclave.command()
@reports_errors
def measurement() -> None:
    """Print this installation's enclave measurement (for executors.enclave.measurements)."""
    try:
        from dpgateway.executors.enclave.simulated import code_measurement
    except ModuleNotFoundError as exc:
        raise UnsupportedError(f"the enclave executor needs {exc.name}: pip install 'dpgateway[enclave]'") from None
    click.echo(code_measurement().hex())


@click.group()
def mpc() -> None:
    """The mpc executor's set-up: keys for the gateway and each party, and running a party (docs/executors.md)."""


@mpc.command("keygen")
@click.option("--parties", required=True, type=click.IntRange(min=2), help="Number of parties (K).")
@click.option(
    "--out",
    default="keys/mpc",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for gateway.key (the gateway's) and party0.key ... (one per party), each mode 0600.",
)
@reports_errors
def mpc_keygen(parties: int, out: str) -> None:
    """Make the keys with which the gateway signs its requests to each party and the parties sign their shares."""
    from dpgateway.executors.mpc import keys

    folder = Path(out)
    keys.generate(parties, folder)
    files = ", ".join(str(keys.party_file(folder, i)) for i in range(parties))
    click.echo(
        f"wrote {keys.gateway_file(folder)} (the gateway's: executors.mpc.keys: {folder}) and {files} "
        "(each to its party only), mode 0600"
    )


@mpc.command("party")
@click.option("--data", required=True, type=click.Path(dir_okay=False, exists=True), help="This party's rows.")
@click.option("--key", required=True, type=click.Path(dir_okay=False, exists=True), help="Its party<i>.key.")
@click.option("--listen", default="127.0.0.1:0", show_default=True, help="HOST:PORT (port 0: any free port).")
@click.option("--collusion-threshold", default=1, show_default=True, type=click.IntRange(min=0))
@click.option("--timeout", default=30.0, show_default=True, type=float, help="Seconds to wait for the others' shares.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="DuckDB threads (default: all cores).")
@reports_errors
def mpc_party(data: str, key: str, listen: str, collusion_threshold: int, timeout: float, threads: int | None) -> None:
    """Run one party on its own rows until stopped; it answers only requests signed with its key."""
    from dpgateway.executors.mpc import party

    party.serve(
        Path(data), Path(key), listen, collusion_threshold=collusion_threshold, timeout=timeout, threads=threads
    )
