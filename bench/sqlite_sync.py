"""Benchmark: what ``synchronous=FULL`` costs ghostmesh's SQLite store on registrations, against NORMAL.

The store commits with ``PRAGMA synchronous=FULL`` (the WAL is fsynced at every commit, so a power loss
cannot take back an acknowledged registration). This measures registrations per second through
``State.register`` in one store transaction each (what a Register commits, without gRPC and without the
audit row), on a fresh database in ``--dir`` (default /var/tmp: a real disk, not a tmpfs), once with the
store as it is and once with ``synchronous=NORMAL`` set after opening it, in interleaved rounds, and prints
the medians and FULL / NORMAL. Compare the per-registration difference with a whole Register over the
network (``bench.fleet``'s reg/s) to see what it costs end to end.

Run: ``.venv/bin/python -m bench.sqlite_sync [--nodes 300] [--rounds 5] [--dir /var/tmp]``. No root needed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from ghostcore.keys import PrivateKey
from ghostmesh.state import State, StateConfig
from ghostmesh.store.sqlite import SqliteStore


def registrations_per_second(mode: str, n: int, where: str) -> float:
    with tempfile.TemporaryDirectory(dir=where) as d:
        store = SqliteStore(Path(d) / "db.sqlite")
        if mode != "FULL":
            store._db.execute(f"PRAGMA synchronous={mode}")  # the one setting under test
        try:
            st = State(store, StateConfig(), time.time())
            _, key = st.create_auth_key(reusable=True, now=time.time())
            node_keys = [PrivateKey.generate().public_key().base64() for _ in range(n)]
            started = time.perf_counter()
            for i, node_key in enumerate(node_keys):
                with store.transaction():
                    st.register(node_key, key, f"n{i}", time.time())
            return n / (time.perf_counter() - started)
        finally:
            store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp", help="where the databases are made (a real disk)")
    opts = ap.parse_args()
    results: dict[str, list[float]] = {"FULL": [], "NORMAL": []}
    for r in range(opts.rounds):
        for mode in ("FULL", "NORMAL") if r % 2 == 0 else ("NORMAL", "FULL"):
            results[mode].append(registrations_per_second(mode, opts.nodes, opts.dir))
    full, normal = (statistics.median(results[m]) for m in ("FULL", "NORMAL"))
    for mode, rates in results.items():
        median, rounds = statistics.median(rates), [round(x) for x in rates]
        print(f"synchronous={mode:<6} registrations/s median {median:7.0f}  rounds {rounds}")
    extra_ms = 1000 / full - 1000 / normal
    print(f"FULL / NORMAL: {full / normal:.2f}; FULL costs {extra_ms:.2f} ms more per registration")


if __name__ == "__main__":
    main()
