"""A private PostgreSQL cluster (Debian's ``postgresql`` package; scripts/bootstrap.sh installs it) for
tests and benchmarks: :func:`cluster` runs one until its block ends.

The cluster lives in a temporary directory: ``initdb`` (trust authentication: only the unix socket in
that directory reaches it), then ``pg_ctl start`` with no TCP listener (``listen_addresses=''``) and the
socket in the same directory. PostgreSQL refuses to run as root, so as root the server runs as the
``postgres`` system user the package creates (``runuser``), owning the directory; otherwise as the
current user. When the block ends, whatever happened, the server is stopped (``pg_ctl stop -m
immediate``: its process by the PID file pg_ctl reads, never by name) and the directory removed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

SUPERUSER = "ghost"
START_TIMEOUT = 30  # seconds pg_ctl waits for the server to accept connections


def pg_bin() -> Path | None:
    """The newest installed ``/usr/lib/postgresql/<ver>/bin`` with initdb and pg_ctl, if any."""
    found = []
    for d in Path("/usr/lib/postgresql").glob("*/bin"):
        if (d / "initdb").exists() and (d / "pg_ctl").exists() and d.parent.name.isdigit():
            found.append((int(d.parent.name), d))
    return max(found)[1] if found else None


def pg_unavailable() -> str:
    """Empty when a private cluster can run here, else why not."""
    if pg_bin() is None:
        return "PostgreSQL is not installed (apt-get install postgresql; scripts/bootstrap.sh does)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and no postgres system user to run the server as"
    return ""


@dataclass
class PgCluster:
    socket_dir: Path

    def dsn(self, dbname: str) -> str:
        return f"host={self.socket_dir} user={SUPERUSER} dbname={dbname}"

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        """A superuser connection to the maintenance database (autocommit)."""
        return psycopg.connect(self.dsn("postgres"), autocommit=True)

    def create_database(self) -> str:
        """A fresh empty database; its DSN."""
        name = f"t_{secrets.token_hex(6)}"
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0".encode())
        return self.dsn(name)


def _as_server_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def cluster() -> Iterator[PgCluster]:
    """Start a private cluster; stop it and remove its directory when the block ends."""
    bindir = pg_bin()
    if bindir is None:
        raise RuntimeError(pg_unavailable())
    root = Path(tempfile.mkdtemp(prefix="ghostpg."))
    try:
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        data = root / "data"
        made = subprocess.run(
            _as_server_user([str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust",
                             "-E", "UTF8", "--locale=C.UTF-8"]),
            check=False, capture_output=True, timeout=120,
        )  # fmt: skip
        if made.returncode != 0:
            raise RuntimeError(f"initdb failed: {made.stderr.decode(errors='replace')[-2000:]}")
        opts = f"-c listen_addresses='' -c unix_socket_directories={root} -c max_connections=50"
        started = subprocess.run(
            _as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w",
                             "-t", str(START_TIMEOUT), "-o", opts, "start"]),
            check=False, capture_output=True, timeout=START_TIMEOUT + 10,
        )  # fmt: skip
        try:
            if started.returncode != 0:
                log = (root / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"pg_ctl start failed: {started.stderr.decode()}\n{log}")
            yield PgCluster(root)
        finally:
            subprocess.run(
                _as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                check=False, capture_output=True, timeout=60,
            )  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
