"""A throwaway PostgreSQL server for the tests, from Debian's `postgresql` package (./scripts/dev setup installs it
and starts no cluster of the system's): `initdb` into a temporary folder, run as the `postgres` user when the tests
run as root (the server refuses root), listening on 127.0.0.1 on a free port and on a socket in that folder.
Clients log in over TCP as `postgres` with PASSWORD, as the orchestrator would; the tests' own statements (making and
dropping databases) go through the socket."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg2

PASSWORD = "pg-test-password-5b1e"  # the throwaway server's, on 127.0.0.1 only
USER = "postgres"
EXAMPLE_URL = "postgresql://bot:pw@db:5432/bot"  # a store URL for config tests: no server is asked


def server_binaries() -> Path | None:
    """The newest installed server's folder of binaries (Debian: /usr/lib/postgresql/<major>/bin), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda path: int(path.parts[-3]))
    return found[-1].parent if found else None


class PostgresServer:
    def __init__(self, binaries: Path) -> None:
        self.binaries = binaries
        self.folder = Path(tempfile.mkdtemp(prefix="pg-"))  # short: the socket's path must fit in 107 bytes
        self.data = self.folder / "data"
        self.port = _free_port()
        self._as_owner = ["runuser", "-u", USER, "--"] if os.geteuid() == 0 else []
        if self._as_owner:
            shutil.chown(self.folder, USER, USER)
        (self.folder / "password").write_text(PASSWORD)
        self._run("initdb", "-D", str(self.data), "-U", USER, f"--pwfile={self.folder / 'password'}",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8",
                  "--no-sync", "--no-instructions")

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self._as_owner, str(self.binaries / tool), *args], capture_output=True, text=True,
                              timeout=60)
        if done.returncode:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stdout}{done.stderr}")

    def start(self) -> None:
        """Start it and wait until it takes connections. fsync off: a test's database lives seconds."""
        options = (f"-h 127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off")
        self._run("pg_ctl", "start", "-D", str(self.data), "-w", "-t", "30", "-l", str(self.folder / "log"),
                  "-o", options)

    def stop(self) -> None:
        """As an operator's restart does it: every connection is ended, the server's transactions rolled back."""
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w")

    def remove(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str, address: str = "") -> str:
        """The database's URL, on the server's port or at `address` (host:port of a relay to its socket)."""
        return f"postgresql://{USER}:{PASSWORD}@{address or f'127.0.0.1:{self.port}'}/{database}"

    @property
    def socket(self) -> Path:
        return self.folder / f".s.PGSQL.{self.port}"

    def execute(self, statement: str) -> None:
        """One statement outside a transaction (CREATE DATABASE needs that), through the socket."""
        with contextlib.closing(psycopg2.connect(host=str(self.folder), port=self.port, user=USER,
                                                 dbname="postgres")) as admin:
            admin.autocommit = True
            with admin.cursor() as cursor:
                cursor.execute(statement)

    def create_database(self, name: str, template: str = "template1") -> None:
        self.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')

    def drop_database(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
