"""1,000 messages over 100 chats on a Swarm of three nodes with a PostgreSQL store, each answered exactly once
(issue 14); the same load on the Docker runtime with SQLite first, in the same run, as the baseline.

The orchestrator on this host drives the tests' Swarm (three Docker-in-Docker nodes, tests/swarm.py; one service per
chat, Swarm's own balancing) with its store in a new, migrated database on the tests' PostgreSQL server. The
messages go through the fake Feishu interleaved over the chats, all at once (bench.throughput's load: its
concurrency and raised rate limits); then every message must have exactly one reply in the fake Feishu's records,
and in the store one row, delivered, whose answer went out as one sent outbox item. Printed: messages per second
from the first event to the last reply; latency from each event to its reply (every event is sent at the start, so
this is mostly the wait in the queue) and from its turn's start to its reply; how the chats spread over the nodes;
the nodes' peak memory (each node's engine and its chats' containers: usage less inactive file pages, sampled
every second).

The stand-in CLI by default (bench/stub: the orchestrator's, the runtime's and the store's own cost, as
bench.throughput); `--real-cli` runs the real one against the fake model, each chat's CLI exiting `--hot-idle`
seconds after its turn (a hot CLI holds about 116 MiB: 100 of them at once are about 12 GiB).

    python -m bench.swarm_load [--quick] [--real-cli] [--hot-idle S]   (--quick: 100 messages over 10 chats;
                                                    SWARM_TEST_REUSE=FILE: a Swarm left up by the tests)
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import docker
import psycopg2

from bench.common import Rig, ms, new_chat, percentile, rig, stub_image
from bench.postgres import migrate, postgres_server
from bench.swarm import CAPS, on_swarm, swarm_up
from bench.throughput import CONCURRENCY, UNPACED, answer_all
from tests.harness import AGENT_IMAGE
from tests.postgres import PostgresServer
from tests.swarm import Swarm

CGROUP_MEMORY = Path("/sys/fs/cgroup/memory/docker")  # the host's engine: cgroupfs driver, cgroup v1
MIB = 1024**2
SAMPLE_SECONDS = 1.0


@dataclass
class Load:
    """What one load run measured."""

    messages: int
    rate: float  # messages per second, first event to last reply
    replies: Counter[str]  # replies per message in the fake Feishu
    stored: Counter[str]  # our messages' states in the store (one row each: counted)
    rows: int  # our messages' rows in the store
    sent: Counter[int]  # sent outbox items per message -> how many messages
    waited: list[float]  # seconds from event to reply
    served: list[float]  # seconds from the turn's start to the reply
    activity: list[float]  # PostgreSQL: transactions and rows written per message, over every session ([]: SQLite)
    nodes: Counter[str] = field(default_factory=Counter)  # chats per node
    peak_mib: dict[str, float] = field(default_factory=dict)  # per node
    peak_total_mib: float = 0.0  # the nodes' summed memory, at its peak
    before_mib: dict[str, float] = field(default_factory=dict)  # per node, before the orchestrator started

    def lines(self, name: str) -> list[str]:
        twice = sum(1 for count in self.replies.values() if count > 1)
        once = sum(1 for count in self.replies.values() if count == 1)
        exactly = (once == self.messages and self.rows == self.messages and self.sent == Counter({1: self.messages})
                   and self.stored == Counter({"delivered": self.messages}))
        return [
            f"{name}: messages={self.messages} answered once={once} twice or more={twice} "
            f"unanswered={self.messages - len(self.replies)}; store: rows={self.rows} states={dict(self.stored)} "
            f"sent outbox items per message={dict(self.sent)}: {'exactly once' if exactly else 'NOT exactly once'}",
            f"{name}: {self.rate:.1f} msg/s (absolute, this machine, concurrency {CONCURRENCY}); event to reply "
            f"{_percentiles(self.waited)}; turn start to reply {_percentiles(self.served)}",
        ] + ([f"{name}: store load per message: {self.activity[0]} transactions committed, {self.activity[1]} rows "
              "written (every session of the store's database)"] if self.activity else [])


def _percentiles(samples: list[float]) -> str:
    return " ".join(f"{label}={ms(percentile(samples, fraction))}"
                    for label, fraction in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0)))


def run(quick: bool, real_cli: bool = False, hot_idle: float = 10.0, swarm: Swarm | None = None,
        server: PostgresServer | None = None) -> list[str]:
    """The figures' lines; on `swarm` and `server` if given (a test session's), else on the benchmark's own."""
    chats, per_chat = (10, 10) if quick else (100, 10)
    client = docker.from_env(timeout=300)
    try:
        image = AGENT_IMAGE if real_cli else stub_image(client)
        agent = {"hot_idle": hot_idle} if real_cli else {}
        with rig() as setup:
            setup.configure(image, defaults=CAPS, agent=agent, containers={"idle_stop": 3600}, **UNPACED)
            setup.start()
            docker_load = _load(setup, f"sqlite:///{setup.data / 'orchestrator.db'}", chats, per_chat)
        with (contextlib.nullcontext(swarm) if swarm else swarm_up(client)) as swarm, \
                (contextlib.nullcontext(server) if server else postgres_server()) as server, rig() as setup, \
                on_swarm(setup, swarm, server) as sections:
            if not real_cli:
                image = swarm.push(image)  # the stand-in's one layer over the agent image the nodes have
                swarm.pull_everywhere(image)
            setup.configure(swarm.agent_image if real_cli else image, defaults=CAPS, agent=agent,
                            containers={"idle_stop": 3600}, **UNPACED, **sections)
            migrate(setup.config)
            with _NodeMemory(swarm) as memory:
                setup.start()
                swarm.wait_ready(setup.instance)  # as a deployment's nodes are, before its chats' messages
                swarm_load = _load(setup, sections["store"]["url"], chats, per_chat, Path(sections["data_dir"]))
            swarm_load.peak_mib, swarm_load.peak_total_mib = memory.peak, memory.peak_total
            swarm_load.before_mib = memory.before
            swarm_load.nodes = _chats_per_node(swarm, setup.instance)
    finally:
        client.close()
    cli = f"real CLI, hot_idle {hot_idle:g} s" if real_cli else "stand-in CLI"
    spread = " ".join(f"{node.rsplit('-', 1)[-1]}={count}" for node, count in sorted(swarm_load.nodes.items()))
    peaks = " ".join(f"{node.rsplit('-', 1)[-1]}={mib:.0f}" for node, mib in sorted(swarm_load.peak_mib.items()))
    return [
        f"swarm_load: {chats * per_chat} messages over {chats} chats, {cli}, all sent at once, interleaved",
        *docker_load.lines("swarm_load docker+sqlite"),
        *swarm_load.lines("swarm_load swarm+postgres"),
        f"swarm_load: rate on swarm+postgres {swarm_load.rate / docker_load.rate:.2f}x of docker+sqlite's; turn start "
        f"to reply p50 {percentile(swarm_load.served, 0.5) / percentile(docker_load.served, 0.5):.2f}x",
        f"swarm_load: chats per node {spread}; the nodes' peak memory (engine and chats' containers) {peaks} MiB, "
        f"all three at once {swarm_load.peak_total_mib:.0f} MiB (before the orchestrator started: "
        f"{sum(swarm_load.before_mib.values()):.0f} MiB)",
    ]


def _load(setup: Rig, store_url: str, chats: int, per_chat: int, data: Path | None = None) -> Load:
    """The messages through the orchestrator, then what the fake Feishu and the store show of them."""
    chat_ids = [new_chat() for _ in range(chats)]
    pushed: dict[str, float] = {}
    before = _store_activity(store_url)
    rate, replies = answer_all(setup, chat_ids, per_chat, pushed, timeout=1800)
    for bot in setup.bots:
        bot.stop()
    activity = [round((after - began) / len(pushed), 1)
                for began, after in zip(before, _store_activity(store_url), strict=True)]
    replied = {c.path.split("/")[-2]: c.time for c in setup.feishu.calls
               if c.path.endswith("/reply") and c.status == 200}  # the last reply of each (there is one)
    ours = set(pushed)
    rows = [row for row in _rows(store_url, "select message_id, chat_id, state, turn from messages") if row[0] in ours]
    sent = Counter(message_id for message_id, state in _rows(store_url, "select message_id, state from outbox")
                   if message_id in ours and state == "sent")
    to_wall = time.time() - time.monotonic()
    chats_dir = (data or setup.data) / "chats"
    served = [replied[message_id] + to_wall - (chats_dir / chat_id / "turns" / turn / "pid").stat().st_mtime
              for message_id, chat_id, _, turn in rows if message_id in replied and turn]
    return Load(messages=len(ours), rate=rate, replies=replies, stored=Counter(row[2] for row in rows),
                rows=len(rows), sent=Counter(sent[message_id] for message_id in ours),
                waited=[replied[m] - pushed[m] for m in ours if m in replied], served=served,
                activity=activity)


def _store_activity(url: str) -> tuple[int, ...]:
    """PostgreSQL's counts for the store's database: transactions committed, rows inserted, updated or deleted; ()
    for SQLite. Read after its sessions ended (each hands its counts over at its end, or within a second)."""
    if url.startswith("sqlite:///"):
        return ()
    time.sleep(1.5)
    return _rows(url, "select xact_commit, tup_inserted + tup_updated + tup_deleted from pg_stat_database "
                      "where datname = current_database()")[0]


def _rows(url: str, sql: str) -> list[tuple]:
    """Rows of the store, read with the database's own driver (not through our store module)."""
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
            return db.execute(sql).fetchall()
    with contextlib.closing(psycopg2.connect(url)) as db, db.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall()


def _chats_per_node(swarm: Swarm, instance: str) -> Counter[str]:
    services = swarm.exec(swarm.manager, "docker", "service", "ls", "-q", "--filter",
                          f"label=orchestrator.instance={instance}").split()
    return Counter(swarm.exec(swarm.manager, "docker", "service", "ps", *services, "--filter", "desired-state=running",
                              "--format", "{{.Node}}").split())


class _NodeMemory:
    """Each node's memory, sampled every second while in use: its own container's cgroup (its engine) and those of
    the containers its engine runs (the nodes share the host's cgroup hierarchy, so those sit beside it)."""

    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm
        self.peak: dict[str, float] = dict.fromkeys(swarm.nodes, 0.0)
        self.peak_total = 0.0
        self.before: dict[str, float] = {}  # when it began
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._ids = {node: swarm.client.containers.get(node).id for node in swarm.nodes}

    def __enter__(self) -> _NodeMemory:
        self.before = self._used(self._containers())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(30)

    def _containers(self) -> dict[str, list[str]]:
        return {node: [self._ids[node], *self.swarm.run(node, "docker", "ps", "-q", "--no-trunc").stdout.split()]
                for node in self.swarm.nodes}

    def _used(self, containers: dict[str, list[str]]) -> dict[str, float]:
        return {node: sum(_memory_mib(cid) for cid in ids) for node, ids in containers.items()}

    def _sample(self) -> None:
        containers: dict[str, list[str]] = {}
        listed = 0.0
        while not self._done.wait(SAMPLE_SECONDS):
            if time.monotonic() - listed > 5:  # its containers come and go: a `docker ps` in each node every 5 s
                containers, listed = self._containers(), time.monotonic()
            used = self._used(containers)
            for node, mib in used.items():
                self.peak[node] = max(self.peak[node], mib)
            self.peak_total = max(self.peak_total, sum(used.values()))


def _memory_mib(container_id: str) -> float:
    """A container's memory as `docker stats` shows it (usage less inactive file pages); 0 once it is gone."""
    folder = CGROUP_MEMORY / container_id
    try:
        usage = int((folder / "memory.usage_in_bytes").read_text())
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
    except OSError:
        return 0.0
    return (usage - int(stat.get("total_inactive_file", 0))) / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100 messages over 10 chats")
    parser.add_argument("--real-cli", action="store_true", help="the real CLI against the fake model")
    parser.add_argument("--hot-idle", type=float, default=10.0, help="agent.hot_idle with --real-cli (seconds)")
    args = parser.parse_args()
    for line in run(args.quick, args.real_cli, args.hot_idle):
        print(line, flush=True)


if __name__ == "__main__":
    main()
