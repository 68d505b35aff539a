"""``dpgateway he``: key generation, the data owner's encryption step, and the key holder service."""

from __future__ import annotations

import time
from pathlib import Path

import click

from dpgateway.cli_common import config_option, reports_errors
from dpgateway.errors import UnknownTableError


@click.group("he")
def he() -> None:
    """Homomorphic-encryption executor (needs pip install 'dpgateway[he]').

    The key holder runs `he keygen` once and keeps the secret key file; the data owner runs
    `he encrypt TABLE` on its own rows with the public key file and hands the output folder to the
    gateway; the gateway adds ciphertexts and asks the key holder (`he holder`) for noisy totals.
    See docs/executors.md.
    """


@he.command()
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False),
    default="keys",
    show_default=True,
    help="Folder for holder.key (secret, 0600: the key holder's only), public.key (owner and gateway) and "
    "gateway.key (0600: the gateway's, to sign its requests to the key holder).",
)
@reports_errors
def keygen(out: str) -> None:
    """Generate a BFV key pair (128-bit security) for the key holder."""
    from dpgateway.executors.he import scheme

    folder = Path(out)
    holder, public, gateway = folder / "holder.key", folder / "public.key", folder / "gateway.key"
    if holder.exists():
        raise click.ClickException(f"{holder} exists; move it away first (its ciphertexts need it)")
    scheme.write_keys(scheme.generate(), holder, public, gateway)
    click.echo(
        f"wrote {holder} (secret key, mode 0600: the key holder's only), {public} (public: owner and gateway) "
        f"and {gateway} (mode 0600: the gateway's request key)"
    )


@he.command()
@click.argument("table")
@config_option
@click.option(
    "--public-key",
    type=click.Path(dir_okay=False, exists=True),
    default="keys/public.key",
    show_default=True,
    help="The public key file of `he keygen` (the key holder's).",
)
@click.option("--out", type=click.Path(file_okay=False), default="he-data", show_default=True,
              help="Folder of cubes; TABLE's goes to OUT/TABLE (the gateway's executors.he.ciphertexts).")  # fmt: skip
@click.option("--sum", "sums", multiple=True, help="A bounded numeric column whose SUM is encrypted (repeatable).")
@click.option("--avg", "avgs", multiple=True, help="A column for AVG (adds its COUNT and centred SUM; repeatable).")
@click.option("--var", "variances", multiple=True, help="A column for VARIANCE/STDDEV (also AVG; repeatable).")
@click.option("--group-by", "groupings", multiple=True, help="A column with public_values to GROUP BY (repeatable).")
@click.option("--pad-to", type=int, default=0, help="Encrypt at least this many rows (zeros) to hide the row count.")
@reports_errors
def encrypt(
    table: str,
    config_path: str | None,
    public_key: str,
    out: str,
    sums: tuple[str, ...],
    avgs: tuple[str, ...],
    variances: tuple[str, ...],
    groupings: tuple[str, ...],
    pad_to: int,
) -> None:
    """Bound TABLE's rows locally and encrypt each row's contributions (the data owner's step).

    Runs the gateway's per-row bounded SQL on the owner's own copy of the data (the config's source),
    then encrypts, for every row, COUNT(*) and the chosen measures, globally and one-hot per public
    GROUP BY value. The gateway can then answer unfiltered COUNT/SUM/AVG/VAR queries over these, with
    or without one of the GROUP BY columns.
    """
    from dpgateway.executors.he import cube, scheme
    from dpgateway.policies.loader import load_config

    started = time.monotonic()
    config = load_config(config_path)
    policy = config.table(table)
    if policy is None:
        raise UnknownTableError(f'relation "{table}" does not exist in the policy')
    fields = cube.plan_fields(policy, sums=sums, avgs=avgs, variances=variances, groupings=groupings)
    keys = scheme.read_keys(Path(public_key))
    result = cube.encrypt_table(
        policy,
        cube.owner_copy(config, policy.name),
        keys,
        Path(out) / policy.name,
        fields=fields,
        key_digest=cube.key_id(Path(public_key)),
        pad_to=pad_to,
    )
    click.echo(
        f"encrypted {policy.name}: {result.ciphertexts} ciphertexts, {len(fields)} fields per row, "
        f"in {result.folder} ({time.monotonic() - started:.1f} s)"
    )


@he.command()
@click.option("--key", type=click.Path(dir_okay=False, exists=True), default="keys/holder.key", show_default=True,
              help="The secret key file (mode 0600).")  # fmt: skip
@click.option("--listen", default="127.0.0.1:0", show_default=True, help="HOST:PORT (port 0: any free port).")
@reports_errors
def holder(key: str, listen: str) -> None:
    """Run the key holder: decrypt final aggregates only, add the planned noise, return noisy values."""
    from dpgateway.executors.he.holder import serve

    serve(Path(key), listen)
