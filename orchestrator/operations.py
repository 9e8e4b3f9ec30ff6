"""What operators run beside the service: status, stop, reset, logs and notify.

They work on the same store and engine as a running service, and through them only: `reset` changes the
session the next turn resumes, `notify` adds to the outbox the service delivers from, `stop` stops a
chat's container (the service starts it again on the chat's next message).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from orchestrator.config import Settings, resolve_chat
from orchestrator.runtime import ContainerState, DockerRuntime, RuntimeFailure, Usage
from orchestrator.states import State
from orchestrator.store import ChatRecord, MessageRecord, Store

STATUS_COLUMNS = ("chat_id", "container_name", "container_state", "cpu_percent", "memory_mib", "memory_limit_mib",
                  "session_id", "last_activity", "busy", "queued", "last_turn_cost_usd", "last_turn_seconds")


def status_rows(settings: Settings, store: Store, runtime: DockerRuntime | None) -> list[dict[str, Any]]:
    """One row per known chat; container state and use are 'unknown' when the engine cannot be asked."""
    chats = store.chats()
    containers: dict[str, ContainerState] = {}
    usage: dict[str, Usage | None] = {}
    if runtime is not None:
        async def ask() -> None:
            containers.update({c.name: c for c in await runtime.list_managed(settings.instance)})
            running = [c.name for c in containers.values() if c.running]
            usage.update(zip(running, await asyncio.gather(*(runtime.usage(n) for n in running)), strict=True))

        asyncio.run(ask())
    unfinished = store.unfinished_messages()
    return [_status_row(settings, chat, containers.get(chat.container_name) if runtime else None,
                        usage.get(chat.container_name), runtime is None,
                        [m for m in unfinished if m.chat_id == chat.chat_id], store.messages(chat.chat_id))
            for chat in chats]


def _status_row(settings: Settings, chat: ChatRecord, container: ContainerState | None, use: Usage | None,
                engine_unknown: bool, unfinished: list[MessageRecord], messages: list[MessageRecord]) -> dict[str, Any]:
    last_turn = next((m for m in reversed(messages) if m.duration_ms is not None), None)
    options = resolve_chat(settings, chat.chat_id).options
    return {
        "chat_id": chat.chat_id,
        "name": chat.name,
        "container_name": chat.container_name,
        "container_id": container.id if container else chat.container_id,
        "container_state": "unknown" if engine_unknown else container.status if container else "missing",
        "cpu_percent": use.cpu_percent if use else None,
        "cpus": container.nano_cpus / 1e9 if container and container.nano_cpus else options.cpus,
        "memory_mib": round(use.memory_bytes / 2**20, 1) if use else None,
        "memory_limit_mib": (container.memory if container and container.memory else options.memory) // 2**20,
        "pids": use.pids if use else None,
        "pids_limit": container.pids_limit if container and container.pids_limit else options.pids_limit,
        "session_id": chat.session_id,
        "last_activity": chat.last_activity,
        "busy": any(m.state is State.RUNNING for m in unfinished),
        "queued": sum(1 for m in unfinished if m.state in (State.RECEIVED, State.QUEUED)),
        "last_turn_cost_usd": last_turn.cost_usd if last_turn else None,
        "last_turn_seconds": last_turn.duration_ms / 1000 if last_turn and last_turn.duration_ms else None,
    }


def format_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    table = [columns, *[tuple(_cell(row[c]) for c in columns) for row in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in table)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value > 1e9:  # a unix time
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def recent_turns(store: Store, chat_id: str, count: int) -> str:
    """The chat's last messages: when, what became of each, what was asked and answered."""
    if store.find_chat(chat_id) is None:
        raise LookupError(f"chat {chat_id} is not known")
    lines = []
    for m in store.messages(chat_id)[-count:]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.received_at))
        cost = f", ${m.cost_usd:.4f}" if m.cost_usd is not None else ""
        took = f", {m.duration_ms / 1000:.1f} s" if m.duration_ms is not None else ""
        lines.append(f"{when}  {m.message_id}  {m.state}{took}{cost}  turn {m.turn or '-'}")
        lines.append(f"  > {_one_line(m.text)}")
        if m.answer:
            lines.append(f"  < {_one_line(m.answer)}")
        if m.error:
            lines.append(f"  ! {_one_line(m.error)}")
    return "\n".join(lines)


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


def stop_chat(settings: Settings, store: Store, runtime: DockerRuntime, chat_id: str) -> str:
    chat = store.find_chat(chat_id)
    if chat is None or not chat.container_name:
        raise LookupError(f"chat {chat_id} has no container")
    try:
        asyncio.run(runtime.stop(chat.container_name, settings.containers.stop_timeout))
    except RuntimeFailure as exc:
        raise LookupError(str(exc)) from exc
    return chat.container_name


def reset_chat(store: Store, chat_id: str) -> str | None:
    """Forget the chat's Claude session (as /new does); the old one's id, for the operator's record."""
    chat = store.find_chat(chat_id)
    if chat is None:
        raise LookupError(f"chat {chat_id} is not known")
    store.set_session(chat_id, None)
    return chat.session_id


def notify(store: Store, chat_id: str, text: str, wait: float) -> tuple[bool, str]:
    """Queue `text` for the chat; with `wait`, whether it was delivered within that many seconds."""
    item = store.say(chat_id, text)
    deadline = time.monotonic() + wait
    while store.outbox_item(item.id).state == "pending" and time.monotonic() < deadline:
        time.sleep(0.2)
    state = store.outbox_item(item.id)
    if wait and state.state != "sent":
        return False, f"outbox item {item.id} not delivered yet ({state.last_error or 'the service has not sent it'})"
    return True, f"outbox item {item.id} {'delivered' if state.state == 'sent' else 'queued'}"
