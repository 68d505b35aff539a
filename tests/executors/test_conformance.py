"""One suite, every executor: the same answers (within noise), the same noise distribution, the same debits,
and the planned failure behaviour. The executors and their tables: conftest.py (``EXECUTORS``, ``TABLES``).
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import pytest
from helpers import chi_square, dlap_pmf

from dpgateway.errors import AuthenticationError, BackendError, InternalError, UnsupportedError
from dpgateway.executors.base import Executor, NoisePlan, NoisyResult, accept
from dpgateway.gateway import Gateway
from dpgateway.passes.budget import gaussian_plan
from dpgateway.passes.split import error_weights
from executors.common import EXECUTORS, TABLES, Data

SQL = "SELECT g, COUNT(*) AS n, SUM(x) AS s FROM {table} GROUP BY g ORDER BY g"
FAILURE = 1e-4  # the answers test fails with at most this probability per executor (union bound over values)


def _plan(gw: Gateway, sql: str, epsilon: float) -> Any:
    plan = gw.explain(sql, epsilon=epsilon).plan
    assert plan is not None
    return plan


@pytest.mark.parametrize("executor", EXECUTORS)
def test_answers_are_within_noise_of_the_exact_and_plain_answers(
    executor_gateway: Gateway, executor_data: Data, executor: str
) -> None:
    gw, exact = executor_gateway, executor_data.exact()
    sql = SQL.format(table=TABLES[executor])
    result = gw.query(sql, analyst=f"answers-{executor}", epsilon=2.0)
    plain = gw.query(SQL.format(table="pooled"), analyst=f"answers-plain-{executor}", epsilon=2.0)
    plan = _plan(gw, sql, 2.0)
    runner = gw.executors.choose(plan)
    assert runner.name == executor
    values = len(plan.measurements) * len(exact)
    # each released value within its half-width at confidence 1 - FAILURE / values (so all at 1 - FAILURE)
    width = {m.name: runner.half_width(m.noise_scale, 1 - FAILURE / values) / m.scale for m in plan.measurements}
    n_name, s_name = (m.name for m in plan.measurements)
    assert [row[0] for row in result.rows] == [row[0] for row in plain.rows] == sorted(exact)
    for (g, n, s), (_, plain_n, plain_s) in zip(result.rows, plain.rows, strict=True):
        assert abs(n - exact[g][0]) <= width[n_name] and abs(s - exact[g][1]) <= width[s_name]
        assert abs(plain_n - exact[g][0]) <= width[n_name] and abs(plain_s - exact[g][1]) <= width[s_name]


def _as_gaussian(plan: Any, epsilon: float, delta: float) -> Any:
    """The plan with its measurements as discrete Gaussians (what passes/budget.py releases for wide queries)."""
    sized = list(plan.measurements)
    real = {m.name: m.sensitivity / m.scale for m in sized}
    planned = gaussian_plan(sized, error_weights(plan, sized), real, epsilon, delta)
    assert planned is not None
    noisy, rho, (eps, dlt) = planned
    return plan.with_(measurements=tuple(noisy), zcdp_rho=rho, zcdp_epsilon=eps, delta=dlt)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_gaussian_noise_plans_run_where_supported(
    executor_gateway: Gateway, executor_data: Data, executor: str
) -> None:
    """plain, enclave and he add the planned discrete Gaussian (answers within its half-width); mpc parties add
    Laplace only, so the executor refuses a Gaussian plan, and a party refuses one sent to it regardless."""
    gw, exact = executor_gateway, executor_data.exact()
    laplace = _plan(gw, SQL.format(table=TABLES[executor]), 2.0)
    plan = _as_gaussian(laplace, 2.0, 1e-5)
    noise = NoisePlan.from_plan(plan)
    assert {m.mechanism for m in noise.measurements} == {"gaussian"}
    assert NoisePlan.from_json(noise.to_json()) == noise
    if executor == "mpc":
        with pytest.raises(UnsupportedError, match="discrete Laplace noise only"):
            gw.executors.choose(plan)
        with pytest.raises(BackendError, match="aborted the query"):
            gw.executors.choose(laplace).execute(plan, noise)
        return
    runner = gw.executors.choose(plan).admit(plan, noise)
    result = runner.execute(plan, noise)
    accept(noise, result)
    values = len(plan.measurements) * len(exact)
    for i, m in enumerate(plan.measurements):
        width = runner.half_width(m.noise_scale, 1 - FAILURE / values, mechanism="gaussian") / m.scale
        for cell, released in zip(result.cells, result.values[m.name], strict=True):
            assert abs(released / m.scale - exact[cell[0]][i]) <= width


@pytest.mark.parametrize("executor", EXECUTORS)
def test_plan_noise_and_debit_are_plains(executor_gateway: Gateway, executor: str) -> None:
    gw = executor_gateway
    ours, plains = (_plan(gw, SQL.format(table=t), 1.5) for t in (TABLES[executor], "pooled"))
    mine, theirs = NoisePlan.from_plan(ours), NoisePlan.from_plan(plains)
    assert mine.measurements == theirs.measurements and mine.cells == theirs.cells and mine.delta == theirs.delta
    gw.query(SQL.format(table=TABLES[executor]), analyst=f"debit-{executor}", epsilon=1.5)
    gw.query(SQL.format(table="pooled"), analyst=f"debit-plain-{executor}", epsilon=1.5)
    spent = {c.analyst: (c.epsilon, c.delta, c.state) for c in gw.store.history()}
    assert spent[f"debit-{executor}"] == spent[f"debit-plain-{executor}"] == (1.5, 0.0, "committed")
    audit = gw.store.audit_log(analyst=f"debit-{executor}", limit=1)[0]
    assert audit.outcome == "released" and f"executor: {executor}" in audit.message


@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_result_for_another_noise_plan_is_rejected_and_charged(
    executor_gateway: Gateway, executor: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = executor_gateway.executors.choose(_plan(executor_gateway, SQL.format(table=TABLES[executor]), 1.0))
    admit = type(runner).admit

    class Forger(Executor):
        """Runs the real executor, then claims its values were noised by another plan."""

        name = runner.name

        def __init__(self, inner: Executor) -> None:
            self.inner = inner

        def execute(self, plan: Any, noise: NoisePlan) -> NoisyResult:
            return dataclasses.replace(self.inner.execute(plan, noise), noise_fingerprint="0" * 64)

    monkeypatch.setattr(type(runner), "admit", lambda self, plan, noise: Forger(admit(self, plan, noise)))
    gw = executor_gateway
    with pytest.raises(InternalError, match="values for another noise plan"):
        gw.query(SQL.format(table=TABLES[executor]), analyst=f"forged-{executor}", epsilon=0.5)
    assert [(c.epsilon, c.state) for c in gw.store.history() if c.analyst == f"forged-{executor}"] == [
        (0.5, "committed")
    ]


def _draws(gw: Gateway, table: str, n: int) -> tuple[list[int], float, int]:
    """``n`` releases of the global count minus the exact count, the planned scale and the noise terms per release."""
    plan = _plan(gw, f"SELECT COUNT(*) AS n FROM {table}", 0.5)
    runner = gw.executors.choose(plan)
    noise = NoisePlan.from_plan(plan)
    (measurement,) = noise.measurements
    draws = []
    for _ in range(n):
        result = runner.admit(plan, noise).execute(plan, noise)
        accept(noise, result)
        draws.append(result.values[measurement.name][0])
    terms = runner.settings.collusion_threshold + 1 if runner.name == "mpc" else 1  # type: ignore[attr-defined]
    return draws, measurement.scale, terms


@pytest.mark.slow
@pytest.mark.parametrize("executor", EXECUTORS)
def test_released_values_follow_the_central_sampler(
    executor_gateway: Gateway, executor_data: Data, executor: str
) -> None:
    """Release minus truth ~ OpenDP discrete Laplace of the planned scale (mpc with collusion threshold t: the sum
    of t + 1 such draws). Chi-square at alpha = 1e-6 (bins of expected count >= 5): a correct executor fails
    with probability 1e-6 per case (OpenDP cannot be seeded). Power, simulated with 200 runs of 400 draws at
    scale 2: a scale 1.5x the planned one fails 95% of runs, a missing or extra noise term 97-100%."""
    draws, scale, terms = _draws(executor_gateway, TABLES[executor], 400)
    truth = len(executor_data.rows)
    single = {z: dlap_pmf(scale, z) for z in range(-40, 41)}
    pmf = single
    for _ in range(terms - 1):
        pmf = {z: sum(pmf.get(a, 0.0) * single.get(z - a, 0.0) for a in pmf) for z in range(-40, 41)}
    stat, critical = chi_square([d - truth for d in draws], pmf)
    assert stat < critical, (stat, critical)


def test_enclave_tampered_quote_is_refused_without_a_debit(
    executor_gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dpgateway.executors.enclave.executor import EnclaveExecutor

    real = EnclaveExecutor._ask

    def tamper(self: EnclaveExecutor, message: dict[str, Any]) -> dict[str, Any]:
        reply = real(self, message)
        if message["op"] == "quote":  # one bit of the measurement flipped on the way to the key broker
            raw = bytearray(base64.b64decode(reply["report"]))
            raw[0x90] ^= 1
            reply["report"] = base64.b64encode(bytes(raw)).decode()
        return reply

    monkeypatch.setattr(EnclaveExecutor, "_ask", tamper)
    gw = executor_gateway
    with pytest.raises(AuthenticationError, match="report signature does not verify"):
        gw.query(SQL.format(table="vault"), analyst="tamper", epsilon=0.5)
    assert [c for c in gw.store.history() if c.analyst == "tamper"] == []
    (record,) = gw.store.audit_log(analyst="tamper")
    assert record.outcome == "refused" and "executor enclave" in record.message
    assert gw.remaining("tamper")["analyst"]["epsilon"] == 1e6


def test_mpc_party_drop_out_aborts_and_is_charged(executor_gateway: Gateway) -> None:
    """Last in this module: it stops one of the shared gateway's parties."""
    gw = executor_gateway
    gw.query(SQL.format(table="trial"), analyst="drop", epsilon=0.5)  # the parties run
    runner = gw.executors.choose(_plan(gw, SQL.format(table="trial"), 0.5))
    process = runner._processes[1]  # type: ignore[attr-defined]
    process.kill()
    process.wait()
    with pytest.raises(BackendError, match=r"mpc party \d aborted"):
        gw.query(SQL.format(table="trial") + " -- again", analyst="drop", epsilon=0.5)
    assert [c.state for c in gw.store.history() if c.analyst == "drop"] == ["committed", "committed"]
