"""The store on PostgreSQL against SQLite (issue 14): the same messages through the orchestrator (stand-in CLI, so
the orchestrator's own cost), once with each store, alternately, in the same run; the time per message is compared.
The PostgreSQL server is the tests' own (tests/postgres.py: on 127.0.0.1, fsync off, as SQLite's WAL with
synchronous=normal does not wait for the disk either).

    python -m bench.postgres [--quick]
"""

from __future__ import annotations

import statistics
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import main, new_chat, rig, stub_image
from bench.throughput import CONCURRENCY, UNPACED, answer_all
from tests.harness import run_cli
from tests.postgres import PostgresServer, server_binaries

TARGET = 1.2  # time per message on PostgreSQL, at most this many times SQLite's


def run(quick: bool) -> list[str]:
    chats, per_chat, rounds = (3, 3, 1) if quick else (20, 10, 2)
    with postgres_server() as server:
        rates: dict[str, list[float]] = {"sqlite": [], "postgres": []}
        once = total = 0
        for _ in range(rounds):
            for backend in rates:
                rate, replies = _through(server if backend == "postgres" else None, chats, per_chat)
                rates[backend].append(rate)
                once += sum(1 for count in replies.values() if count == 1)
                total += chats * per_chat
    sqlite, postgres = statistics.median(rates["sqlite"]), statistics.median(rates["postgres"])
    ratio = sqlite / postgres  # time per message: 1/rate
    return [f"postgres: {chats * per_chat} messages over {chats} chats per run, {rounds} run(s) per store: "
            f"sqlite={sqlite:.1f} msg/s, postgres={postgres:.1f} msg/s (absolute, this machine, concurrency "
            f"{CONCURRENCY}); answered once {once} of {total}",
            f"postgres: time per message {ratio:.2f}x of SQLite's; target <= {TARGET}x: "
            f"{'meets' if ratio <= TARGET else 'misses'}"]


def _through(server: PostgresServer | None, chats: int, per_chat: int) -> tuple[float, Counter[str]]:
    with rig() as setup:
        store = {"store": new_database(server)} if server is not None else {}
        setup.configure(stub_image(setup.client), **UNPACED, **store)
        if server is not None:
            migrate(setup.config)
        setup.start()
        return answer_all(setup, [new_chat() for _ in range(chats)], per_chat)


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """The tests' throwaway server (tests/postgres.py), started, and removed after."""
    binaries = server_binaries()
    if binaries is None:
        raise SystemExit("PostgreSQL's server is not installed (./scripts/dev setup installs it)")
    server = PostgresServer(binaries)
    server.start()
    try:
        yield server
    finally:
        server.remove()


def new_database(server: PostgresServer, address: str = "") -> dict[str, str]:
    """A new, empty database on `server`: the config's `store` section for it (`migrate` it once configured); at
    `address` (a relay's host:port) if given."""
    database = f"bench_{uuid.uuid4().hex[:8]}"
    server.create_database(database)
    return {"url": server.url(database, address)}


def migrate(config: Path) -> None:
    """`orchestrator migrate`, as an operator runs it before a PostgreSQL store's first start."""
    migrated = run_cli(config, "migrate")
    if migrated.returncode:
        raise SystemExit(f"orchestrator migrate failed: {migrated.stderr}")


if __name__ == "__main__":
    main(run, __doc__ or "")
