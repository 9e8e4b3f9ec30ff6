"""Failover under load (issue 14): two orchestrators share a PostgreSQL store (a server of the scenario's own) and the
fake Feishu, which gives each event to the newest long connection (the standby's: it stores, the leader takes it from
the store). Round after round, messages go to several chats, then the leader is killed with -9 at a random moment,
turns in flight; the standby must lead within the bound, a new standby is started, and at the end every message must
have been answered exactly once (one reply, one turn)."""

from __future__ import annotations

import random
import statistics
import time
import uuid
from typing import Any

from bench.faults_lib.rig import Result, Rig
from orchestrator.store import Store
from tests.harness import Orchestrator, chat, run_cli
from tests.postgres import PostgresServer, server_binaries

BOUND = 15.0  # seconds from the leader's death to its standby leading (docs/SCALING.md)
LEADING = "leading: this orchestrator runs the chats now"


class StoreRows:
    """The store's messages as StoreView gives them (dicts by column), read from PostgreSQL."""

    def __init__(self, url: str) -> None:
        self._store = Store(url)

    def messages(self, chat_id: str) -> list[dict[str, Any]]:
        return [{"message_id": m.message_id, "state": str(m.state), "turn": m.turn}
                for m in self._store.messages(chat_id)]

    def close(self) -> None:
        self._store.close()


class FailoverRig(Rig):
    """A rig whose store is a database on `server`, with a leader and a standby."""

    def __init__(self, name: str, result: Result, server: PostgresServer, **sections: Any) -> None:
        database = f"failover_{uuid.uuid4().hex[:8]}"
        server.create_database(database)
        self.url = server.url(database)
        super().__init__(name, result, store={"url": self.url}, **sections)
        migrated = run_cli(self.config, "migrate")
        if migrated.returncode:
            raise RuntimeError(f"orchestrator migrate failed: {migrated.stderr}")
        self.rows = StoreRows(self.url)
        self.standby: Orchestrator | None = None

    @property
    def store(self) -> StoreRows:  # type: ignore[override]
        return self.rows

    def start_standby(self) -> Orchestrator:
        """Another orchestrator, the newest connection: Feishu's events go to it from now on."""
        leader = self.bot
        self.standby = self.start()
        self.bot = leader
        self.standby.wait_log("standing by", timeout=60)
        return self.standby

    def fail_over(self) -> float:
        """Kill the leader with -9; the seconds until the standby leads (the standby is the leader after it)."""
        assert self.bot is not None and self.standby is not None
        self.bot.kill()
        killed = time.monotonic()
        self.standby.wait_log(LEADING, timeout=BOUND + 30)
        took = time.monotonic() - killed
        self.bot, self.standby = self.standby, None
        return took

    def __exit__(self, *exc: object) -> None:
        if self.standby is not None and self.standby.process.poll() is None:
            self.standby.kill()
        self.rows.close()
        super().__exit__(*exc)


def failover(quick: bool, rng: random.Random) -> Result:
    rounds, chats = (2, 2) if quick else (10, 3)
    result = Result("failover")
    binaries = server_binaries()
    if binaries is None:
        result.problems.append("PostgreSQL's server is not installed (./scripts/dev setup installs it)")
        return result
    server = PostgresServer(binaries)
    server.start()
    try:
        with FailoverRig("failover", result, server, scheduler={"queue_depth": 100}) as rig:
            ids = [chat() for _ in range(chats)]
            rig.start().wait_log(LEADING, timeout=60)
            rig.start_standby()
            took, in_flight = [], 0
            for n in range(rounds):
                for i, chat_id in enumerate(ids):
                    rig.say(chat_id, f"SLOW {rng.uniform(0, 4):.1f} fo-{n}-{i}")
                time.sleep(rng.uniform(0.5, 3))
                in_flight += any(not rig.answered(s) for s in rig.sent)
                took.append(rig.fail_over())
                rig.start_standby()
            settled = rig.settle(timeout=180)
            rig.tally()
    finally:
        server.remove()
    slow = [t for t in took if t > BOUND]
    if slow:
        result.problems.append(f"{len(slow)} failover(s) over the {BOUND:.0f} s bound: {slow}")
    result.notes.append(f"{rounds} failovers (leader killed -9), {in_flight} with turns in flight; {len(rig.sent)} "
                        f"messages over {chats} chats; settled: {settled}")
    if took:
        result.notes.append(f"leader killed -> standby leading: median {statistics.median(took):.1f} s, max "
                            f"{max(took):.1f} s (bound {BOUND:.0f} s)")
    return result
