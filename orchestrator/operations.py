"""What operators run beside the service: status, stop, reset, logs and notify.

They work on the same store and engine as a running service, and through them only: `reset` changes the
session the next turn resumes, `notify` adds to the outbox the service delivers from, `stop` stops a
chat's container (the service starts it again on the chat's next message).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

from orchestrator import status
from orchestrator.config import Settings
from orchestrator.runtime import Runtime, RuntimeFailure
from orchestrator.store import ApprovalRecord, Store
from orchestrator.untrusted import excerpt

STATUS_COLUMNS = ("chat_id", "container_name", "container_state", "cpu_percent", "memory_mib", "memory_limit_mib",
                  "session_id", "last_activity", "busy", "queued", "last_turn_cost_usd", "last_turn_seconds",
                  "spent_today_usd")


def status_rows(settings: Settings, store: Store, engine: status.Engine | None) -> list[dict[str, Any]]:
    """One row per known chat (`status.chat_status`, as /status shows it); container state and use are 'unknown'
    when the engine cannot be asked."""
    return [dataclasses.asdict(row) for row in asyncio.run(status.every_chat(settings, store, engine))]


def format_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    table = [columns, *[tuple(_cell(c, row[c]) for c in columns) for row in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in table)


def _cell(column: str, value: object) -> str:
    if value is None:
        return "-"
    if column == "last_activity" and isinstance(value, float):  # a unix time
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def recent_turns(store: Store, chat_id: str, count: int) -> str:
    """The chat's last messages: when, what became of each, what was asked and answered."""
    if store.find_chat(chat_id) is None:
        raise LookupError(f"chat {chat_id} is not known")
    lines = []
    asked: dict[str, list[ApprovalRecord]] = {}
    for approval in store.approvals(chat_id):
        asked.setdefault(approval.message_id, []).append(approval)
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
        lines += [f"  ? {_approval_line(approval)}" for approval in asked.get(m.message_id, [])]
    return "\n".join(lines)


def _approval_line(approval: ApprovalRecord) -> str:
    """One permission request for the audit: what was asked, and who decided what, when."""
    details = json.loads(approval.request)["details"]
    asked = _one_line(details[0][1], 120) if details else ""
    decided = "waiting"
    if approval.decided_at is not None:
        when = time.strftime("%H:%M:%S", time.localtime(approval.decided_at))
        how = "always allowed" if approval.always else approval.state
        decided = (f"{how} by {approval.decided_by or 'the bot'} at {when} after "
                   f"{approval.decided_at - approval.asked_at:.1f} s")
        if approval.reason:
            decided += f" ({_one_line(approval.reason, 80)})"
    return f"approval {approval.key[:8]} {approval.tool}: {asked} -> {decided}"


def _one_line(text: str, limit: int = 200) -> str:
    """One line for the operator's terminal: what the agent wrote cannot send it escape sequences."""
    flat = " ".join(text.split())
    return excerpt(flat, limit)


def stop_chat(settings: Settings, store: Store, runtime: Runtime, chat_id: str) -> str:
    chat = store.find_chat(chat_id)
    if chat is None or not chat.container_name:
        raise LookupError(f"chat {chat_id} has no container")
    try:
        asyncio.run(runtime.stop(chat.container_name, settings.containers.stop_timeout))
    except RuntimeFailure as exc:
        raise LookupError(str(exc)) from exc
    return chat.container_name


def reset_chat(store: Store, chat_id: str) -> str | None:
    """Forget the chat's Claude sessions, its own and its topics' (as /new does for one); the old one's id, for the
    operator's record."""
    chat = store.find_chat(chat_id)
    if chat is None:
        raise LookupError(f"chat {chat_id} is not known")
    store.forget_sessions(chat_id)
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
