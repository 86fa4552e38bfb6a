"""Benchmark: registrations per second through the store, PostgreSQL as a ratio to SQLite in this run.

A registration is what ghostmesh's hub commits for one: a node inserted with one use of a reusable auth
key counted, and its sealed audit entry appended, in one transaction. Both backends keep their
durability defaults (SQLite WAL with ``synchronous=FULL``; PostgreSQL ``fsync`` and
``synchronous_commit`` on): one fsync per commit each. PostgreSQL is a private cluster on this machine
(:mod:`lab.pgcluster`) reached over its unix socket, the store's synchronous calls each one round trip.
Also measured: one primary-key read (``get_auth_key``), the cost of a round trip on the event loop.

Rounds alternate the backends (each on a fresh database) so that machine noise hits both; medians are
printed with PostgreSQL / SQLite ratios. Run: `.venv/bin/python -m bench.store [--nodes N] [--rounds R]`
(as root the cluster runs as the ``postgres`` user).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ghostcore import auditchain as ac
from ghostcore.auditchain import GENESIS, AuditRecord
from ghostmesh.store.base import AuthKeyRec, NodeRec
from ghostmesh.store.postgres import PostgresStore
from ghostmesh.store.sql import SqlStore
from ghostmesh.store.sqlite import SqliteStore
from lab.pgcluster import cluster

KEY = Ed25519PrivateKey.generate()
READS = 2000


def _node(i: int) -> NodeRec:
    return NodeRec(
        0, f"n{i}", "u", f"key{i}", f"100.64.{i >> 8}.{i & 255}", f"fd7a:115c:a1e0::{i:x}", False, (),
        1.0, 0.0, 1.0, ("192.0.2.1:41641",), f"h{i}", "aaaaaaaaaaaa",
    )  # fmt: skip


def measure(store: SqlStore, nodes: int) -> tuple[float, float]:
    """Registrations per second, and microseconds per primary-key read, on an empty store."""
    store.create_user("u", 1.0)
    store.insert_auth_key(AuthKeyRec("aaaaaaaaaaaa", b"h" * 32, "u", reusable=True))
    prev, t0 = GENESIS, time.perf_counter()
    for i in range(1, nodes + 1):
        entry = ac.seal(AuditRecord(i, i, "bench", "node.register", f"n{i}", "{}", "", prev), KEY)
        with store.transaction():
            store.insert_node(_node(i), consume_auth_key="aaaaaaaaaaaa")
            store.append_audit(entry)
        prev = entry.hash
    per_second = nodes / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(READS):
        store.get_auth_key("aaaaaaaaaaaa")
    return per_second, (time.perf_counter() - t0) / READS * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"sqlite": [], "postgres": []}
    with cluster() as pg, tempfile.TemporaryDirectory(prefix="ghostbench.") as tmp:
        opens: dict[str, Callable[[int], SqlStore]] = {
            "sqlite": lambda r: SqliteStore(Path(tmp) / f"r{r}.db"),
            "postgres": lambda _r: PostgresStore(pg.create_database()),
        }
        for r in range(args.rounds):
            for kind, open_store in opens.items():
                store = open_store(r)
                try:
                    results[kind].append(measure(store, args.nodes))
                finally:
                    store.close()
    med = {
        k: (statistics.median(v[0] for v in rs), statistics.median(v[1] for v in rs))
        for k, rs in results.items()
    }
    for kind, (rate, read_us) in med.items():
        print(f"{kind:9s} {rate:8.0f} registrations/s   {read_us:7.1f} us per primary-key read")
    print(f"postgres / sqlite: registrations/s x{med['postgres'][0] / med['sqlite'][0]:.2f}, "
          f"read time x{med['postgres'][1] / med['sqlite'][1]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
