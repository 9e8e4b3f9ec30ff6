"""bench.swarm_load's short version on the session's Swarm and PostgreSQL server (no second Swarm: that would cost
about 80 s of moving the agent image): 100 messages over 10 chats, on Docker + SQLite and then on the Swarm +
PostgreSQL, each answered exactly once in both; its figures print. No figure is asserted."""

from __future__ import annotations

from bench import swarm_load
from tests.postgres import PostgresServer
from tests.swarm import Swarm


def test_the_load_benchmark_answers_every_message_exactly_once_on_both_runtimes(
        swarm_cluster: Swarm, postgres_server: PostgresServer) -> None:
    lines = swarm_load.run(quick=True, swarm=swarm_cluster, server=postgres_server)
    print("\n" + "\n".join(lines))
    verdicts = [line for line in lines if line.endswith("exactly once")]
    assert len(verdicts) == 2 and not any("NOT exactly once" in line for line in verdicts), lines
    assert any(line.startswith("swarm_load: chats per node ") for line in lines), lines
