"""One MPC party: runs the gateway's bounded SQL on its own rows, noises, secret-shares, sums shares.

Run one per data holder: ``python -m dpgateway.executors.mpc.party --data site_a.parquet --listen 127.0.0.1:0
--collusion-threshold 1`` (it prints ``listening HOST:PORT``). For one query with K parties:

1. The gateway sends each party the verified bounded SQL, the noise plan, the party's index and the peers'
   addresses. The party checks the noise plan's fingerprint, that the plan tolerates at least its own
   collusion threshold, and verifies the SQL itself (allowlisted nodes, reads only its own rows).
2. It computes its local exact aggregates x_i (a vector of cells x measurements) on its own DuckDB.
3. Parties 0..t (t = collusion threshold) each add OpenDP discrete Laplace noise of the planned scale:
   y_i = x_i + e_i; the others send y_i = x_i.
4. It splits y_i into K additive shares over GF(2^127 - 1) (field.py), sends share j to party j directly
   and keeps its own; after receiving K - 1 shares it returns their sum s_i to the gateway. The gateway
   adds the s_i and learns only sum_i y_i = sum_i x_i + sum_{i<=t} e_i.

Proof note (the honest parties' noise alone is the central mechanism): at most t parties collude, with the
gateway. Among the t + 1 noising parties at least one, h, is honest; e_h is the central mechanism's noise
(OpenDP discrete Laplace, scale b = sensitivity / epsilon from the accountant, the same sampler as
``plain``), independent of everything else. What the coalition sees: its own rows, noise and shares; the
honest parties' shares it receives (each a proper subset of a sharing, so uniform and independent of the
values, field.py); the partial sums s_i, which with its own shares determine only the SUM over honest
parties of y_i; and the release. So its view is a function of (its own data and randomness, fresh uniform
values, and sum_honest x + e_h + independent noise), a post-processing of the central mechanism applied to
the honest parties' total, whose sensitivity is at most the planned one (every party's local bound, times K
unless units are disjoint: Table.cross_party_factor). With t = 0 exactly one party noises and the release
has exactly the central distribution; in general the noise is a sum of t + 1 independent central draws.
Tests: tests/executors/test_mpc.py (distribution, what crosses the gateway boundary, drop-out).
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import sqlglot
from sqlglot import exp

from dpgateway.connectors.duckdb import PARTY_RELATION, DuckDBConnector, DuckDBHooks
from dpgateway.executors.base import NoisePlan
from dpgateway.executors.mpc import field, wire
from dpgateway.mechanisms import noisy_vector
from dpgateway.noise import exact_vectors
from dpgateway.sqlcheck import verify

MAX_PENDING = 256  # queries whose shares may wait at once; older ones are dropped


class Party:
    """A data holder's side of the protocol (thread-safe: one handler thread per connection)."""

    def __init__(
        self, data: Path, *, collusion_threshold: int, timeout: float = 30.0, threads: int | None = None
    ) -> None:
        self.threshold = collusion_threshold
        self.timeout = timeout
        self.connector = DuckDBConnector(threads=threads, allowed_paths=[data])
        rows = exp.select(exp.Star()).from_(
            exp.Table(this=exp.Anonymous(this="read_parquet", expressions=[exp.Literal.string(str(data))]))
        )
        view = exp.Create(this=exp.to_table(PARTY_RELATION), kind="VIEW", expression=rows)
        self.connector._con.execute(view.sql("duckdb"))  # operator-given path, quoted by sqlglot
        self._inbox: dict[str, dict[int, list[int]]] = {}
        self._arrived = threading.Condition()

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        if message.get("type") == "share":
            return self._receive_share(message)
        if message.get("type") == "query":
            try:
                return self._query(message)
            except Exception as exc:  # refuse without echoing data-dependent text
                return {"error": f"party refused or failed: {type(exc).__name__}: {_safe(exc)}"}
        return {"error": "unknown message"}

    def _receive_share(self, message: dict[str, Any]) -> dict[str, Any]:
        with self._arrived:
            if len(self._inbox) >= MAX_PENDING and message["qid"] not in self._inbox:
                self._inbox.pop(next(iter(self._inbox)))
            self._inbox.setdefault(str(message["qid"]), {})[int(message["sender"])] = [
                int(v) for v in message["values"]
            ]
            self._arrived.notify_all()
        return {"ok": True}

    def _query(self, message: dict[str, Any]) -> dict[str, Any]:
        qid, index, peers = str(message["qid"]), int(message["index"]), message["peers"]
        noise = NoisePlan.from_json(message["noise"])
        if noise.fingerprint() != message["fingerprint"]:
            raise Refused("the noise plan does not match its fingerprint")
        if int(message["collusion_threshold"]) < self.threshold:
            raise Refused(f"the plan tolerates fewer colluding parties than this party requires ({self.threshold})")
        if noise.cells is None:
            raise Refused("private group keys (partition selection) are not supported")
        if any(not (m.scale > 0 and math.isfinite(m.scale)) or m.threshold is not None for m in noise.measurements):
            raise Refused("every measurement needs a positive, finite noise scale")
        if any(m.mechanism != "laplace" for m in noise.measurements):  # the proof note is for Laplace draws
            raise Refused("only discrete Laplace noise is supported")
        local = self._local(message["sql"], noise)
        if index <= int(message["collusion_threshold"]):  # parties 0..t add the central noise
            local = [noisy_vector(column, m.scale) for column, m in zip(local, noise.measurements, strict=True)]
        values = [v for column in local for v in column]
        shares = field.share(values, len(peers))

        def send(j: int) -> None:
            message = {"type": "share", "qid": qid, "sender": index, "values": shares[j]}
            if not wire.request(_address(peers[j]), message, self.timeout).get("ok"):
                raise Refused(f"party {j} did not take its share")

        others = [j for j in range(len(peers)) if j != index]
        with ThreadPoolExecutor(max_workers=len(others)) as pool:  # to all peers at once: one hop, not K - 1
            list(pool.map(send, others))
        deadline = time.monotonic() + self.timeout
        with self._arrived:
            while len(self._inbox.get(qid, {})) < len(peers) - 1:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._inbox.pop(qid, None)
                    raise Refused("a party did not send its share in time (aborted)")
                self._arrived.wait(left)
            received = self._inbox.pop(qid)
        return {"partial": field.add([shares[index], *received.values()]), "fingerprint": noise.fingerprint()}

    def _local(self, sql: str, noise: NoisePlan) -> list[list[int]]:
        """This party's exact bounded aggregates per measurement and cell (never sent in the clear)."""
        hooks = DuckDBHooks
        verified = verify(
            sqlglot.parse_one(sql, dialect="duckdb"),
            "duckdb",
            sources=[exp.to_table(PARTY_RELATION)],
            nodes=hooks.BACKEND_NODES,
            functions=hooks.BACKEND_FUNCTIONS,
        )
        exact = self.connector.execute(verified)
        if len(exact.columns) != noise.n_keys + len(noise.measurements):
            raise Refused("the bounded statement returns other columns than the noise plan")
        by_key = {tuple(row[: noise.n_keys]): row for row in exact.rows}
        assert noise.cells is not None
        names = [m.name for m in noise.measurements]
        vectors = exact_vectors(by_key, list(noise.cells), noise.n_keys, names)
        return [vectors[name] for name in names]

    def close(self) -> None:
        self.connector.close()


class Refused(Exception):
    """The party will not run this request (its message names the rule)."""


def _safe(exc: Exception) -> str:
    return str(exc) if isinstance(exc, Refused) else "details withheld"


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.removeprefix("tcp://").rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dpgateway.executors.mpc.party")
    parser.add_argument("--data", required=True, type=Path, help="this party's rows (Parquet)")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free port)")
    parser.add_argument("--collusion-threshold", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: all cores)")
    args = parser.parse_args(argv)
    party = Party(args.data, collusion_threshold=args.collusion_threshold, timeout=args.timeout, threads=args.threads)
    with wire.MessageServer(_address(args.listen), party.handle) as server:
        host, port = str(server.server_address[0]), int(server.server_address[1])
        sys.stdout.write(f"listening {host}:{port}\n")
        sys.stdout.flush()
        server.serve_forever()


if __name__ == "__main__":
    main()
