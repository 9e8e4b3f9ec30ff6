"""Chat commands: /help, /new, /stop, /status, /cost and /permissions reset, answered without a turn.

A command gets a `Context` with what it may use (the store, the settings, the engine to inspect, the turn
runner's stop, a way to reply), never the service itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from loguru import logger

from orchestrator import budgets, status
from orchestrator.config import Settings, resolve_chat
from orchestrator.store import MessageRecord, Store, refused_for_now
from orchestrator.supervise import describe

HELP = ("Send a message and Claude Code answers it in this chat's own container.\n"
        "/new  start a new conversation (Claude forgets this chat's earlier context)\n"
        "/stop  stop the answer being worked on\n"
        "/status  this chat's container, limits, session and queue\n"
        "/cost  what this chat and you spent today and this month, and the budgets\n"
        "/permissions reset  forget the tools an approver allowed for good in this chat\n"
        "/help  this text")


class Turns(Protocol):
    """What of the turn runner a command needs."""

    async def stop(self, chat_id: str) -> str | None:
        """Interrupt the chat's running turn; its message id, or None when nothing ran."""
        ...


@dataclass(frozen=True)
class Context:
    settings: Settings
    store: Store
    engine: status.Engine
    turns: Turns
    reply: Callable[[MessageRecord, str], None]  # answers the command's message, durably, without a turn


Command = Callable[[Context, MessageRecord], Awaitable[None]]


def find(text: str) -> Command | None:
    """The command a message is (its whole text, in any case), or None."""
    return COMMANDS.get(text.strip().lower())


async def run(command: Command, context: Context, message: MessageRecord) -> None:
    """Run a command; what it raises is logged, not raised (it runs in the background). A command whose reply
    the store refused for now is handed on again by the service's housekeeping, like any stranded message."""
    try:
        await command(context, message)
    except Exception as exc:
        log = logger.bind(chat_id=message.chat_id, message_id=message.message_id)
        if refused_for_now(exc):
            log.warning(f"the command {message.text.strip()} could not be answered yet: {describe(exc)}")
        else:
            log.opt(exception=exc).error(f"the command {message.text.strip()} failed: {describe(exc)}")


async def _help(context: Context, message: MessageRecord) -> None:
    context.reply(message, HELP)


async def _new(context: Context, message: MessageRecord) -> None:
    conversation = resolve_chat(context.settings, message.chat_id).options.conversation(message.thread_id)
    context.store.set_session(message.chat_id, None, conversation)
    logger.bind(chat_id=message.chat_id, message_id=message.message_id).info(
        "session cleared by /new" + (f" in topic {conversation}" if conversation else ""))
    where = "this topic" if conversation else "this chat"
    context.reply(message, f"Started a new conversation in {where}: the next message begins with a fresh context.")


async def _stop(context: Context, message: MessageRecord) -> None:
    stopped = await context.turns.stop(message.chat_id)
    if stopped is None:
        context.reply(message, "Nothing is running in this chat.")
        return
    logger.bind(chat_id=message.chat_id, message_id=stopped).info("turn interrupted by /stop")
    context.reply(message, "Stopping the current answer.")


async def _status(context: Context, message: MessageRecord) -> None:
    now = await status.chat_status(context.settings, context.store, context.engine, message.chat_id,
                                   asking=message.message_id, thread_id=message.thread_id)
    context.reply(message, status.render(now))


async def _cost(context: Context, message: MessageRecord) -> None:
    context.reply(message, budgets.cost_report(context.settings, context.store, message.chat_id, message.sender_id))


async def _reset_permissions(context: Context, message: MessageRecord) -> None:
    forgotten = context.store.reset_always_allowed(message.chat_id)
    logger.bind(chat_id=message.chat_id, message_id=message.message_id).info(
        f"/permissions reset by {message.sender_id}: {forgotten} always-allowed tool(s) forgotten")
    context.reply(message, f"Forgot {forgotten} tool(s) allowed for good in this chat: each asks an approver again."
                  if forgotten else "No tool was allowed for good in this chat.")


COMMANDS: dict[str, Command] = {"/help": _help, "/new": _new, "/stop": _stop, "/status": _status, "/cost": _cost,
                                "/permissions reset": _reset_permissions}
