"""One MPC party: runs the gateway's bounded SQL on its own rows, noises, secret-shares, sums shares.

Run one per data holder: ``python -m dpgateway.executors.mpc.party --data site_a.parquet --key keys/party0.key
--listen 127.0.0.1:0 --collusion-threshold 1`` (it prints ``listening HOST:PORT``). For one query with K parties:

1. The gateway sends each party the verified bounded SQL, the noise plan, the party's index and the peers'
   addresses, signed with that party's request key (keys.py) and bound to the connection's challenge and
   sequence number (wire.py). The party refuses a request that is unsigned, signed with another key,
   changed after signing or replayed, one for another party index, then checks the noise plan's
   fingerprint, that the plan tolerates at least its own collusion threshold, and verifies the SQL itself
   (allowlisted nodes, reads only its own rows).
2. It computes its local exact aggregates x_i (a vector of cells x measurements) on its own DuckDB, which
   holds a copy of its rows (loaded at start, loaded again when the file changes).
3. Parties 0..t (t = collusion threshold) each add OpenDP discrete Laplace noise of the planned scale:
   y_i = x_i + e_i; the others send y_i = x_i.
4. It splits y_i into K additive shares over GF(2^127 - 1) (field.py), sends share j to party j directly
   (masked with a pad from their pair key and signed with it, so party j takes it only from party i) and keeps its own; after receiving
   K - 1 shares it returns their sum s_i to the gateway, signed with its request key. The gateway
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

Who may ask (keys.py, wire.py): a party computes only for a request MACed with its own request key, bound to
its connection's fresh challenge and next sequence number, so only the gateway (the one other holder of that
key, and the one place queries are charged) can obtain partial sums, and no request runs twice. It takes a
share only under the pair key of the party the share names, and signs its partial sum for the request it
answers. Tests: tests/executors/test_mpc.py (unsigned, tampered, wrong key, replayed, forged share/partial).
"""

from __future__ import annotations

import argparse
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlglot
from sqlglot import exp

from dpgateway.connectors.duckdb import PARTY_RELATION, DuckDBConnector, DuckDBHooks
from dpgateway.executors import signing
from dpgateway.executors.base import NoisePlan
from dpgateway.executors.mpc import field, keys, wire
from dpgateway.mechanisms import noisy_vector
from dpgateway.noise import exact_vectors
from dpgateway.sqlcheck import VerifiedSQL, verify

MAX_PENDING = 256  # queries whose shares may wait at once; older ones are dropped
VERIFIED = 64  # bounded statements kept verified (by exact text)


class Party:
    """A data holder's side of the protocol (thread-safe: one handler thread per connection)."""

    def __init__(
        self,
        data: Path,
        party_keys: keys.PartyKeys,
        *,
        collusion_threshold: int,
        timeout: float = 30.0,
        threads: int | None = None,
    ) -> None:
        self.data = data
        self.keys = party_keys
        self.threshold = collusion_threshold
        self.timeout = timeout
        self.connector = DuckDBConnector(threads=threads, allowed_paths=[data])
        self.peers = wire.Pool(timeout, challenge=True)
        self._loaded: tuple[int, int] | None = None
        self._load_lock = threading.Lock()
        self._load()
        self._verified: OrderedDict[str, VerifiedSQL] = OrderedDict()
        self._inbox: dict[str, dict[int, list[int]]] = {}
        self._arrived = threading.Condition()

    def handle(self, message: dict[str, Any], session: wire.Session) -> dict[str, Any]:
        kind = message.get("type")
        try:
            if kind == "share":
                sender = message.get("sender")
                key = self.keys.pair_keys.get(sender) if isinstance(sender, int) else None
                if key is None or not signing.signed_by(key, message):
                    raise Refused("the share is not signed by the party it names")
                if not session.fresh(message):
                    raise Refused("the share is replayed or out of order on this connection")
                return self._receive_share(message)
            if kind == "query":
                if not signing.signed_by(self.keys.request_key, message):
                    raise Refused("the request is not signed by the gateway this party serves")
                if not session.fresh(message):
                    raise Refused("the request is replayed (not this connection's challenge and next number)")
                reply = {**self._query(message), "qid": message["qid"], "seq": message["seq"]}
                return signing.signed(self.keys.request_key, reply)
        except Exception as exc:  # refuse without echoing data-dependent text
            return {"error": f"party refused or failed: {type(exc).__name__}: {_safe(exc)}"}
        return {"error": "unknown message"}

    def _receive_share(self, message: dict[str, Any]) -> dict[str, Any]:
        with self._arrived:
            if len(self._inbox) >= MAX_PENDING and message["qid"] not in self._inbox:
                self._inbox.pop(next(iter(self._inbox)))
            qid, sender = str(message["qid"]), int(message["sender"])
            masked = [int(v) for v in message["values"]]
            mask = field.pad(self.keys.pair_keys[sender], qid, sender, self.keys.index, len(masked))
            self._inbox.setdefault(qid, {})[sender] = [(v - m) % field.PRIME for v, m in zip(masked, mask, strict=True)]
            self._arrived.notify_all()
        return {"ok": True}

    def _query(self, message: dict[str, Any]) -> dict[str, Any]:
        qid, index, peers = str(message["qid"]), int(message["index"]), message["peers"]
        if index != self.keys.index or len(peers) != self.keys.parties:
            raise Refused(f"the request is for party {index} of {len(peers)}; this is party {self.keys.index}")
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
        sent = self._send_shares(qid, [_address(p) for p in peers], shares)
        deadline = time.monotonic() + self.timeout
        with self._arrived:
            while len(self._inbox.get(qid, {})) < len(peers) - 1:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._inbox.pop(qid, None)
                    _close(sent)
                    raise Refused("a party did not send its share in time (aborted)")
                self._arrived.wait(left)
            received = self._inbox.pop(qid)
        self._receipts(sent)
        return {"partial": field.add([shares[index], *received.values()]), "fingerprint": noise.fingerprint()}

    def _send_shares(self, qid: str, peers: list[tuple[str, int]], shares: list[list[int]]) -> list[_Sent]:
        """Share j to party j, masked and signed with their pair key (field.pad), on connections kept open."""
        index = self.keys.index
        sent: list[_Sent] = []
        for j, address in enumerate(peers):
            if j == index:
                continue
            try:
                connection = self.peers.take(address)
            except (OSError, ValueError):
                _close(sent)
                raise Refused(f"party {j} is unreachable") from None
            sent.append(_Sent(j, address, connection))
            try:
                mask = field.pad(self.keys.pair_keys[j], qid, index, j, len(shares[j]))
                masked = [(v + m) % field.PRIME for v, m in zip(shares[j], mask, strict=True)]
                message = {"type": "share", "qid": qid, "sender": index, "values": masked}
                connection.send(message, self.keys.pair_keys[j])
            except OSError:
                _close(sent)
                raise Refused(f"party {j} is unreachable") from None
        return sent

    def _receipts(self, sent: list[_Sent]) -> None:
        """Every peer's receipt for its share (read after the shares for this party arrived: off the critical path)."""
        try:
            while sent:
                entry = sent[0]
                if not entry.connection.receive().get("ok"):
                    raise Refused(f"party {entry.index} did not take its share")
                sent.pop(0)
                self.peers.give(entry.address, entry.connection)
        except (OSError, ValueError):
            raise Refused(f"party {sent[0].index} did not confirm its share") from None
        finally:
            _close(sent)

    def _local(self, sql: str, noise: NoisePlan) -> list[list[int]]:
        """This party's exact bounded aggregates per measurement and cell (never sent in the clear)."""
        self._load()
        exact = self.connector.execute(self._verify(sql))
        if len(exact.columns) != noise.n_keys + len(noise.measurements):
            raise Refused("the bounded statement returns other columns than the noise plan")
        by_key = {tuple(row[: noise.n_keys]): row for row in exact.rows}
        assert noise.cells is not None
        names = [m.name for m in noise.measurements]
        vectors = exact_vectors(by_key, list(noise.cells), noise.n_keys, names)
        return [vectors[name] for name in names]

    def _verify(self, sql: str) -> VerifiedSQL:
        """The statement verified by this party (allowlisted nodes, its own rows only); remembered by text."""
        with self._load_lock:
            verified = self._verified.get(sql)
            if verified is not None:
                self._verified.move_to_end(sql)
                return verified
        hooks = DuckDBHooks
        verified = verify(
            sqlglot.parse_one(sql, dialect="duckdb"),
            "duckdb",
            sources=[exp.to_table(PARTY_RELATION)],
            nodes=hooks.BACKEND_NODES,
            functions=hooks.BACKEND_FUNCTIONS,
        )
        with self._load_lock:
            self._verified[sql] = verified
            if len(self._verified) > VERIFIED:
                self._verified.popitem(last=False)
        return verified

    def _load(self) -> None:
        """Copy this party's rows into its DuckDB as ``party_rows`` at start and whenever the file changed."""
        stat = self.data.stat()
        version = (stat.st_mtime_ns, stat.st_size)
        with self._load_lock:
            if version == self._loaded:
                return
            rows = exp.select(exp.Star()).from_(
                exp.Table(this=exp.Anonymous(this="read_parquet", expressions=[exp.Literal.string(str(self.data))]))
            )
            copy = exp.Create(this=exp.to_table(PARTY_RELATION), kind="TABLE", replace=True, expression=rows)
            self.connector._con.execute(copy.sql("duckdb"))  # operator-given path, quoted by sqlglot
            self._loaded = version

    def close(self) -> None:
        self.peers.close()
        self.connector.close()


@dataclass
class _Sent:
    """A share sent to party ``index`` whose receipt is still to be read."""

    index: int
    address: tuple[str, int]
    connection: wire.Connection


def _close(sent: list[_Sent]) -> None:
    for entry in sent:
        entry.connection.close()
    sent.clear()


class Refused(Exception):
    """The party will not run this request (its message names the rule)."""


def _safe(exc: Exception) -> str:
    return str(exc) if isinstance(exc, Refused) else "details withheld"


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.removeprefix("tcp://").rpartition(":")
    return host, int(port)


def serve(data: Path, key: Path, listen: str, *, collusion_threshold: int, timeout: float, threads: int | None) -> None:
    """Run one party until killed, printing ``listening HOST:PORT`` once ready."""
    party = Party(data, keys.read_party(key), collusion_threshold=collusion_threshold, timeout=timeout, threads=threads)
    wire.serve_announced(listen, party.handle, challenge=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dpgateway.executors.mpc.party")
    parser.add_argument("--data", required=True, type=Path, help="this party's rows (Parquet)")
    parser.add_argument("--key", required=True, type=Path, help="this party's key file (party<i>.key, 0600)")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free port)")
    parser.add_argument("--collusion-threshold", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: all cores)")
    args = parser.parse_args(argv)
    serve(
        args.data,
        args.key,
        args.listen,
        collusion_threshold=args.collusion_threshold,
        timeout=args.timeout,
        threads=args.threads,
    )


if __name__ == "__main__":
    main()
