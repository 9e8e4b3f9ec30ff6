"""What a chat is doing: its container, caps and use, session, turn and queue, and its last turn's cost.

One function for `/status` in the chat and for `orchestrator status` beside the service, so the two agree.
Everything comes from the store and the engine, never from a running service's memory: a turn is running
when the store has the chat's message running, and the queue is what the store holds waiting.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Protocol

from orchestrator import agent_host, budgets, layout, untrusted
from orchestrator.config import NO_APPROVALS, Settings, resolve_chat
from orchestrator.runtime import ContainerState, RuntimeFailure, Usage
from orchestrator.states import State
from orchestrator.store import Store

MIB = 2**20


class Engine(Protocol):
    """What of the container runtime a status needs."""

    async def inspect(self, name: str) -> ContainerState: ...

    async def usage(self, name: str) -> Usage | None: ...


@dataclass(frozen=True)
class ChatStatus:
    chat_id: str
    name: str
    container_name: str
    container_id: str
    container_state: str  # the engine's (running, exited, …), missing, or unknown (the engine did not answer)
    cpu_percent: float | None  # use now, None unless running
    cpus: float  # caps: the container's own, or the config's while it has none
    memory_mib: float | None
    memory_limit_mib: int
    pids: int | None
    pids_limit: int
    network: str
    session_id: str | None  # of the chat's own conversation, or of the topic /status was asked in
    last_activity: float | None
    busy: bool  # a turn is running
    queued: int  # messages waiting for their turn
    last_turn_cost_usd: float | None
    last_turn_seconds: float | None
    spent_today_usd: float  # priced from the gateway's usage records, since the day's reset (budgets.reset_at)
    permission_mode: str = "bypassPermissions"
    always_allowed: tuple[str, ...] = ()  # tools an approver allowed for good in this chat
    approvals_waiting: int = 0
    topics: int = 0  # topics with a session of their own
    node: str = ""  # runtime: swarm: the node the chat's task runs on (or last ran on)
    # Where cpu_percent, memory_mib and pids come from: "engine" (its stats of the container), "agent" (runtime:
    # swarm: the chat's own agent host's report, the agent's to write), "" (none).
    usage_from: str = ""


async def chat_status(settings: Settings, store: Store, engine: Engine | None, chat_id: str,
                      asking: str | None = None, thread_id: str = "") -> ChatStatus:
    """The chat's status; `engine` None: its container is unknown. `asking`: the message that asks (a /status
    waiting to be answered), not counted as queued. `thread_id`: the topic it is asked in, whose session it shows."""
    chat = store.chat(chat_id)
    container, use = await _container(engine, chat.container_name)
    usage_from = "engine" if use else ""
    if use is None and container is not None and container.running:  # a Swarm task's stats are on its node
        use = await asyncio.to_thread(reported_usage, settings, chat_id, time.time())
        usage_from = "agent" if use else ""
    options = resolve_chat(settings, chat_id).options
    unfinished = [m for m in store.unfinished_messages(chat_id) if m.message_id != asking]
    last = store.last_turn(chat_id)
    known = container is not None and container.status != "missing"
    return ChatStatus(
        chat_id=chat_id,
        name=chat.name,
        container_name=chat.container_name,
        container_id=container.id if known else chat.container_id,
        container_state=container.status if container else "unknown",
        cpu_percent=use.cpu_percent if use else None,
        cpus=container.nano_cpus / 1e9 if container and container.nano_cpus else options.cpus,
        memory_mib=round(use.memory_bytes / MIB, 1) if use else None,
        memory_limit_mib=(container.memory if container and container.memory else options.memory) // MIB,
        pids=use.pids if use else None,
        pids_limit=container.pids_limit if container and container.pids_limit else options.pids_limit,
        network=options.network,
        session_id=store.session(chat_id, options.conversation(thread_id)),
        topics=len(store.thread_sessions(chat_id)),
        last_activity=chat.last_activity,
        busy=any(m.state is State.RUNNING for m in unfinished),
        queued=sum(1 for m in unfinished if m.state in (State.RECEIVED, State.QUEUED)),
        last_turn_cost_usd=last.cost_usd if last else None,
        last_turn_seconds=last.duration_ms / 1000 if last and last.duration_ms is not None else None,
        spent_today_usd=budgets.spent_today_usd(settings, store, chat_id),
        permission_mode=options.permission_mode,
        always_allowed=tuple(allowed.tool for allowed in store.always_allowed(chat_id)),
        approvals_waiting=len(store.approvals(chat_id, pending=True)),
        node=container.node if container else "",
        usage_from=usage_from,
    )


async def every_chat(settings: Settings, store: Store, engine: Engine | None) -> list[ChatStatus]:
    """Every known chat's status, in chat id order."""
    return list(await asyncio.gather(*(chat_status(settings, store, engine, chat.chat_id)
                                       for chat in store.chats())))


async def _container(engine: Engine | None, name: str) -> tuple[ContainerState | None, Usage | None]:
    """The container as the engine has it ("missing" when there is none) and its use while it runs; None for
    what the engine could not be asked."""
    if not name:
        return ContainerState(name="", id="", status="missing"), None  # no container made yet
    if engine is None:
        return None, None
    try:
        container = await engine.inspect(name)
    except RuntimeFailure:
        return None, None
    try:
        return container, await engine.usage(name) if container.running else None
    except RuntimeFailure:  # stopped between the two questions, or the engine went away
        return container, None


# The agent host rewrites its report every agent_host.USAGE_SECONDS: an older one is of a container gone or hung.
REPORT_STALE_SECONDS = 60.0
REPORT_BOUNDS = {"cpu_percent": 100.0 * 1024, "memory_bytes": 2**50, "memory_limit": 2**50, "pids": 2**22}


def reported_usage(settings: Settings, chat_id: str, now: float) -> Usage | None:
    """The use of its caps the chat's agent host last reported in its turns folder (agent_host.USAGE); None when it
    is absent, older than REPORT_STALE_SECONDS or not numbers within REPORT_BOUNDS: the agent's to write, so it is
    shown for its own chat only, as what its container says."""
    turns = layout.chat_paths(settings, resolve_chat(settings, chat_id)).turns
    try:
        with untrusted.directory(turns) as folder:
            data = untrusted.read_small(folder, agent_host.USAGE, settings.agent.uid, 1024)
        report = json.loads(data) if data else None
    except (OSError, ValueError, RecursionError):  # RecursionError: a kilobyte of "[" nests too deep for json
        return None
    if not isinstance(report, dict) or not _number_within(report.get("at"), now + REPORT_STALE_SECONDS) \
            or now - report["at"] > REPORT_STALE_SECONDS \
            or not all(_number_within(report.get(key), bound) for key, bound in REPORT_BOUNDS.items()):
        return None
    return Usage(cpu_percent=float(report["cpu_percent"]), memory_bytes=int(report["memory_bytes"]),
                 memory_limit=int(report["memory_limit"]), pids=int(report["pids"]))


def _number_within(value: object, bound: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= bound


def render(status: ChatStatus) -> str:
    """The status as a chat message: not the node a chat's task runs on (the operators' `orchestrator status` shows
    it; a hostname of the Swarm is nothing the chat needs)."""
    lines = [
        f"Container: {status.container_name} {status.container_state}" if status.container_name
        else "Container: none yet (the next message starts one)",
        f"Limits: {status.cpus:g} CPUs, {status.memory_limit_mib} MiB memory, {status.pids_limit} processes, "
        f"network {status.network}",
    ]
    if status.memory_mib is not None:
        lines.append(f"In use: {status.cpu_percent:g}% CPU, {status.memory_mib:g} MiB memory, {status.pids} "
                     "processes" + (" (as the container reports it)" if status.usage_from == "agent" else ""))
    lines += [
        f"Session: {status.session_id or '(new)'}" + (f"; {status.topics} topic(s) have their own" if status.topics
                                                       else ""),
        f"Running: {'yes' if status.busy else 'no'}; queued: {status.queued}",
    ]
    if status.last_turn_seconds is not None:
        lines.append(f"Last turn: {status.last_turn_seconds:.1f} s, ${status.last_turn_cost_usd or 0:.4f}")
    lines.append(f"Spent today: ${status.spent_today_usd:.4f}")
    if status.permission_mode != NO_APPROVALS:
        always = f"{', '.join(status.always_allowed)} (/permissions reset clears them)" if status.always_allowed \
            else "none"
        lines.append(f"Approvals: {status.permission_mode} mode, {status.approvals_waiting} waiting; always allowed "
                     f"here: {always}")
    return "\n".join(lines)
