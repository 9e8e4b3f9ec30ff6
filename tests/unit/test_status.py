"""One status for `/status` and `orchestrator status`, from a real store and a fake engine: the container's
own caps and use, busy and queued from the store, the last turn's cost and seconds."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import agent_host, operations, status
from orchestrator.config import ChatOptions, Settings
from orchestrator.runtime import ContainerState, RuntimeFailure, Usage
from orchestrator.status import ChatStatus, chat_status
from orchestrator.store import Store

MIB = 2**20


class Engine:
    """Containers by name; asking for one that is not there says "missing", as the engine does."""

    def __init__(self, *containers: ContainerState, usage: Usage | None = None, down: bool = False) -> None:
        self.containers = {c.name: c for c in containers}
        self._usage = usage
        self.down = down
        self.asked: list[str] = []

    async def inspect(self, name: str) -> ContainerState:
        self.asked.append(name)
        if self.down:
            raise RuntimeFailure("the Docker engine cannot be reached")
        return self.containers.get(name, ContainerState(name=name, id="", status="missing"))

    async def usage(self, name: str) -> Usage | None:
        return self._usage if self.containers[name].running else None


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(source=tmp_path / "config.yaml", data_dir=tmp_path / "data", chats_dir=tmp_path / "chats",
                    defaults=ChatOptions(cpus=1.0, memory=2048 * MIB, pids_limit=256),
                    groups={"oc_a": {"cpus": 0.5, "memory": 300 * MIB, "network": "none"}})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "data" / "orchestrator.db")
    yield store
    store.close()


def message(store: Store, message_id: str, chat_id: str = "oc_a") -> None:
    store.record_received(message_id, chat_id, "ou_1", f"question {message_id}")


def answered(store: Store, message_id: str, cost_usd: float | None, duration_ms: int | None) -> None:
    message(store, message_id)
    store.mark_queued(message_id)
    store.start_turn(message_id, f"turn-{message_id}")
    store.answer(message_id, "answer", cost_usd, duration_ms, card=None)


def status_of(settings: Settings, store: Store, engine: Engine | None, asking: str | None = None) -> ChatStatus:
    return asyncio.run(chat_status(settings, store, engine, "oc_a", asking=asking))


def test_a_running_chat_shows_its_containers_caps_and_use_and_the_stores_turns(settings: Settings,
                                                                              store: Store) -> None:
    store.ensure_chat("oc_a", "Team A")
    store.set_container("oc_a", "bot-oc_a", "stale-id")
    store.set_session("oc_a", "sess-1")
    answered(store, "om_1", 0.5, 4000)
    answered(store, "om_2", 0.02, 1500)  # the last turn: its own cost, not the CLI's running total
    answered(store, "om_3", None, None)  # a command's reply: no turn
    message(store, "om_4")
    store.mark_queued("om_4")
    store.start_turn("om_4", "turn-om_4")  # running
    message(store, "om_5")
    store.mark_queued("om_5")  # waits for its turn
    message(store, "om_6")  # the /status that asks: not counted
    message(store, "om_7", chat_id="oc_b")  # another chat's
    container = ContainerState("bot-oc_a", "c0ffee", "running", chat_id="oc_a", nano_cpus=250_000_000,
                               memory=512 * MIB, pids_limit=100)
    engine = Engine(container, usage=Usage(cpu_percent=12.5, memory_bytes=45 * MIB + 1, memory_limit=512 * MIB,
                                           pids=7))
    store.open_usage("oc_a", "ou_1", "om_5", "claude-x", input_tokens=10, output_tokens=10, cache_write_tokens=0,
                     cache_read_tokens=0, cost_nano=25_000_000, complete=True)  # the gateway priced a request
    store.open_usage("oc_b", "ou_1", None, "claude-x", input_tokens=10, output_tokens=10, cache_write_tokens=0,
                     cache_read_tokens=0, cost_nano=7_000_000, complete=True)  # another chat's: not this one's
    assert status_of(settings, store, engine, asking="om_6") == ChatStatus(
        chat_id="oc_a", name="Team A", container_name="bot-oc_a", container_id="c0ffee", container_state="running",
        cpu_percent=12.5, cpus=0.25, memory_mib=45.0, memory_limit_mib=512, pids=7, pids_limit=100, network="none",
        session_id="sess-1", last_activity=None, busy=True, queued=1, last_turn_cost_usd=0.02,
        last_turn_seconds=1.5, spent_today_usd=0.025, usage_from="engine")
    assert status_of(settings, store, engine).queued == 2  # `orchestrator status` counts a command still waiting


def test_a_chat_without_a_container_shows_the_configs_caps_and_the_engine_is_not_asked(settings: Settings,
                                                                                      store: Store) -> None:
    store.ensure_chat("oc_a")
    engine = Engine()
    now = status_of(settings, store, engine)
    assert engine.asked == []
    assert (now.container_state, now.container_id, now.cpus, now.memory_limit_mib, now.pids_limit) == \
        ("missing", "", 0.5, 300, 256)
    assert (now.cpu_percent, now.memory_mib, now.pids, now.busy, now.queued) == (None, None, None, False, 0)
    assert (now.last_turn_cost_usd, now.last_turn_seconds) == (None, None)


@pytest.mark.parametrize(("engine", "state"), [
    (None, "unknown"),  # the CLI could not reach the engine at all
    (Engine(down=True), "unknown"),
    (Engine(ContainerState("bot-oc_a", "c0ffee", "exited", chat_id="oc_a", memory=512 * MIB)), "exited"),
    (Engine(), "missing"),  # removed behind the store's back
])
def test_a_stopped_missing_or_unknown_container(settings: Settings, store: Store, engine: Engine | None,
                                                state: str) -> None:
    store.ensure_chat("oc_a")
    store.set_container("oc_a", "bot-oc_a", "stored-id")
    now = status_of(settings, store, engine)
    assert now.container_state == state and now.memory_mib is None and now.cpu_percent is None
    assert now.container_id == ("c0ffee" if state == "exited" else "stored-id")
    assert now.memory_limit_mib == (512 if state == "exited" else 300)


def test_the_chat_and_the_cli_render_the_same_status(settings: Settings, store: Store) -> None:
    store.ensure_chat("oc_a")
    store.set_container("oc_a", "bot-oc_a", "c0ffee")
    store.set_session("oc_a", "sess-1")
    answered(store, "om_1", 0.0123, 2345)
    engine = Engine(ContainerState("bot-oc_a", "c0ffee", "running", chat_id="oc_a"),
                    usage=Usage(cpu_percent=3.0, memory_bytes=60 * MIB, memory_limit=300 * MIB, pids=9))
    now = status_of(settings, store, engine)
    assert status.render(now) == (
        "Container: bot-oc_a running\n"
        "Limits: 0.5 CPUs, 300 MiB memory, 256 processes, network none\n"
        "In use: 3% CPU, 60 MiB memory, 9 processes\n"
        "Session: sess-1\n"
        "Running: no; queued: 0\n"
        "Last turn: 2.3 s, $0.0123\n"
        "Spent today: $0.0000")
    [row] = operations.status_rows(settings, store, engine)
    assert row == dataclasses.asdict(now)
    assert set(operations.STATUS_COLUMNS) <= set(row)


def test_a_chat_that_never_had_a_container_says_so(settings: Settings, store: Store) -> None:
    store.ensure_chat("oc_b")
    now = asyncio.run(chat_status(settings, store, Engine(), "oc_b"))
    assert status.render(now).splitlines()[:3] == [
        "Container: none yet (the next message starts one)",
        "Limits: 1 CPUs, 2048 MiB memory, 256 processes, network instance",
        "Session: (new)"]


def test_the_chat_is_not_told_which_node_its_task_runs_on_the_operator_is(settings: Settings, store: Store) -> None:
    store.ensure_chat("oc_a")
    store.set_container("oc_a", "bot-oc_a", "c0ffee")
    engine = Engine(ContainerState("bot-oc_a", "c0ffee", "running", chat_id="oc_a", node="worker-7.internal"))
    now = status_of(settings, store, engine)
    assert now.node == "worker-7.internal"
    assert status.render(now).splitlines()[0] == "Container: bot-oc_a running"
    assert "worker-7" not in status.render(now)
    [row] = operations.status_rows(settings, store, engine)
    assert row["node"] == "worker-7.internal"


def report(settings: Settings, text: str, owner: int | None = None) -> Path:
    """The chat's agent host's usage report (agent_host.USAGE), owned by the agent as the host's files are."""
    turns = settings.chats_dir / "oc_a" / "turns"
    turns.mkdir(parents=True, exist_ok=True)
    path = turns / agent_host.USAGE
    path.write_text(text)
    os.chown(path, settings.agent.uid if owner is None else owner, -1)
    return path


def test_a_task_on_another_node_shows_the_use_its_agent_host_reported(settings: Settings, store: Store) -> None:
    """The engine has no stats of a Swarm task on another node (usage None): its agent host's report is shown."""
    store.ensure_chat("oc_a")
    store.set_container("oc_a", "bot-oc_a", "c0ffee")
    engine = Engine(ContainerState("bot-oc_a", "c0ffee", "running", chat_id="oc_a", node="worker-2"), usage=None)
    before = status_of(settings, store, engine)
    assert (before.memory_mib, before.usage_from) == (None, "")  # nothing reported yet: unknown, not 0
    report(settings, json.dumps({"at": time.time(), "cpu_percent": 12.5, "memory_bytes": 96 * MIB,
                                 "memory_limit": 300 * MIB, "pids": 7}))
    now = status_of(settings, store, engine)
    assert (now.cpu_percent, now.memory_mib, now.pids, now.usage_from) == (12.5, 96.0, 7, "agent")
    assert "In use: 12.5% CPU, 96 MiB memory, 7 processes (as the container reports it)" in status.render(now)


@pytest.mark.parametrize("text", [
    json.dumps({"at": time.time() - 120, "cpu_percent": 1, "memory_bytes": 1, "memory_limit": 1, "pids": 1}),  # old
    json.dumps({"at": time.time() + 600, "cpu_percent": 1, "memory_bytes": 1, "memory_limit": 1, "pids": 1}),
    json.dumps({"at": time.time(), "cpu_percent": 1, "memory_bytes": 2**60, "memory_limit": 1, "pids": 1}),
    json.dumps({"at": time.time(), "cpu_percent": -1, "memory_bytes": 1, "memory_limit": 1, "pids": 1}),
    json.dumps({"at": time.time(), "cpu_percent": 1, "memory_bytes": 1, "memory_limit": 1, "pids": True}),
    json.dumps({"at": time.time(), "cpu_percent": "1", "memory_bytes": 1, "memory_limit": 1, "pids": 1}),
    json.dumps({"at": time.time(), "cpu_percent": 1, "memory_bytes": 1, "memory_limit": 1}),
    '{"at": 1e300, "cpu_percent": NaN, "memory_bytes": 1, "memory_limit": 1, "pids": 1}',
    json.dumps([1, 2]), "not json", json.dumps({"at": time.time(), "pad": "x" * 2000}), "[" * 1000,
], ids=["stale", "future", "huge", "negative", "bool", "string", "missing", "nan", "list", "garbage", "long", "deep"])
def test_a_report_that_is_stale_or_forged_is_not_shown(settings: Settings, text: str) -> None:
    report(settings, text)
    assert status.reported_usage(settings, "oc_a", time.time()) is None


def test_a_report_of_another_owner_or_behind_a_link_is_not_read(settings: Settings, tmp_path: Path) -> None:
    good = json.dumps({"at": time.time(), "cpu_percent": 1, "memory_bytes": 1, "memory_limit": 1, "pids": 1})
    path = report(settings, good)
    assert status.reported_usage(settings, "oc_a", time.time()) is not None
    os.chown(path, settings.agent.uid + 1, -1)
    assert status.reported_usage(settings, "oc_a", time.time()) is None
    path.unlink()
    (tmp_path / "elsewhere").write_text(good)
    path.symlink_to(tmp_path / "elsewhere")
    assert status.reported_usage(settings, "oc_a", time.time()) is None
