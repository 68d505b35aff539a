"""Executors: who computes a plan's bounded aggregates and adds its noise (see docs/executors.md)."""

from __future__ import annotations

from dpgateway.connectors.base import Connector
from dpgateway.errors import PrivacyViolationError, UnsupportedError
from dpgateway.executors.base import Executor
from dpgateway.executors.plain import PlainExecutor
from dpgateway.plan import DPPlan
from dpgateway.policies.model import EXECUTORS, Config


class ExecutorPool:
    """The executors of one gateway, created on first use and closed with it."""

    def __init__(self, config: Config, connector: Connector) -> None:
        self.config = config
        self.plain = PlainExecutor(connector)
        self._mpc: dict[str, Executor] = {}
        self._enclave: Executor | None = None
        self._he: dict[str, Executor] = {}

    def choose(self, plan: DPPlan, override: str | None = None) -> Executor:
        """The table's executor, or ``override`` where the table's policy allows it (``executors_allowed``)."""
        table = plan.table
        if table is None:
            return self.plain
        name = table.executor if override is None else override
        if name not in EXECUTORS:
            raise UnsupportedError(f"executor {name!r} does not exist; choose one of {', '.join(EXECUTORS)}")
        if name != table.executor and name not in table.executors_allowed:
            raise PrivacyViolationError(
                f"table {table.name} runs on executor {table.executor}; its policy does not allow {name} "
                f"(the data owner lists alternatives in tables.{table.name}.executors_allowed)"
            )
        executor: Executor
        if name == "plain":
            executor = self.plain
        elif name == "he":
            executor = self._he_for(table.name)
        elif name == "mpc":
            executor = self._mpc_for(table.name)
        else:
            executor = self._enclave_executor()
        reason = executor.unsupported(plan)
        if reason is not None:
            raise UnsupportedError(reason)
        return executor

    def _mpc_for(self, name: str) -> Executor:
        if name not in self._mpc:
            from dpgateway.executors.mpc.executor import MpcExecutor

            table = self.config.table(name)
            assert table is not None
            self._mpc[name] = MpcExecutor(table, self.config.mpc)
        return self._mpc[name]

    def _enclave_executor(self) -> Executor:
        if self._enclave is None:
            try:
                from dpgateway.executors.enclave.executor import EnclaveExecutor
            except ModuleNotFoundError as exc:  # the optional dependency
                raise UnsupportedError(
                    f"the enclave executor needs the {exc.name} package: pip install 'dpgateway[enclave]'"
                ) from None
            self._enclave = EnclaveExecutor(self.config.enclave)
        return self._enclave

    def _he_for(self, name: str) -> Executor:
        if name not in self._he:
            try:
                from dpgateway.executors.he.executor import HeExecutor
            except ModuleNotFoundError as exc:  # the optional dependency
                raise UnsupportedError(
                    f"the he executor needs the {exc.name} package: pip install 'dpgateway[he]'"
                ) from None

            table = self.config.table(name)
            assert table is not None
            self._he[name] = HeExecutor(table, self.config.he)
        return self._he[name]

    def close(self) -> None:
        for executor in [*self._mpc.values(), *self._he.values()]:
            executor.close()
        self._mpc.clear()
        if self._enclave is not None:
            self._enclave.close()
            self._enclave = None
        self._he.clear()
