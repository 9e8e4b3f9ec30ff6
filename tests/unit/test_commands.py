"""Chat commands with a real store, a fake engine and a fake turn runner: what each one says and does, and
that a failing command is logged, never raised into the service."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from loguru import logger
from peewee import OperationalError

from orchestrator import commands
from orchestrator.commands import HELP, Context
from orchestrator.config import BudgetSettings, Settings
from orchestrator.runtime import ContainerState, Usage
from orchestrator.store import MessageRecord, Store


class Engine:
    async def inspect(self, name: str) -> ContainerState:
        return ContainerState(name=name, id="c0ffee", status="exited")

    async def usage(self, name: str) -> Usage | None:
        return None


class Turns:
    """The turn runner's stop: `running` is the message id of the chat's running turn, if any."""

    def __init__(self, running: str | None = None) -> None:
        self.running = running
        self.stopped: list[str] = []

    async def stop(self, chat_id: str) -> str | None:
        self.stopped.append(chat_id)
        return self.running


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "data" / "orchestrator.db")
    store.ensure_chat("oc_a")
    yield store
    store.close()


class Chat:
    def __init__(self, tmp_path: Path, store: Store, turns: Turns | None = None) -> None:
        settings = Settings(source=tmp_path / "config.yaml", data_dir=tmp_path / "data", chats_dir=tmp_path / "chats")
        self.replies: list[tuple[str, str]] = []
        self.store = store
        self.context = Context(settings, store, Engine(), turns or Turns(), self.reply)

    def reply(self, message: MessageRecord, text: str) -> None:
        self.replies.append((message.message_id, text))

    def send(self, text: str, message_id: str = "om_cmd", thread_id: str = "") -> list[tuple[str, str]]:
        message = self.store.record_received(message_id, "oc_a", "ou_1", text, thread_id)
        assert message is not None
        command = commands.find(text)
        assert command is not None
        asyncio.run(commands.run(command, self.context, message))
        return self.replies


def test_only_a_whole_message_is_a_command_in_any_case() -> None:
    assert commands.find("  /STATUS \n") is commands.COMMANDS["/status"]
    assert commands.find("/status please") is None and commands.find("tell me /help") is None


def test_help_lists_every_command(tmp_path: Path, store: Store) -> None:
    assert Chat(tmp_path, store).send("/help") == [("om_cmd", HELP)]
    assert all(f"\n{name}  " in f"\n{HELP}" for name in commands.COMMANDS)


def test_new_forgets_the_session(tmp_path: Path, store: Store) -> None:
    store.set_session("oc_a", "sess-1")
    [(_, text)] = Chat(tmp_path, store).send("/new")
    assert text.startswith("Started a new conversation") and store.chat("oc_a").session_id is None


def test_new_and_status_in_a_topic_touch_only_its_session(tmp_path: Path, store: Store) -> None:
    store.set_session("oc_a", "sess-chat")
    store.set_session("oc_a", "sess-topic", "omt_1")
    chat = Chat(tmp_path, store)
    [(_, status)] = chat.send("/status", "om_s1", thread_id="omt_1")
    assert "Session: sess-topic; 1 topic(s) have their own\n" in status
    [_, (_, text)] = chat.send("/new", "om_n1", thread_id="omt_1")
    assert text == "Started a new conversation in this topic: the next message begins with a fresh context."
    assert store.session("oc_a", "omt_1") is None and store.session("oc_a") == "sess-chat"


def test_stop_asks_the_turn_runner_and_says_whether_anything_ran(tmp_path: Path, store: Store) -> None:
    turns = Turns(running="om_running")
    assert Chat(tmp_path, store, turns).send("/stop") == [("om_cmd", "Stopping the current answer.")]
    idle = Turns()
    assert Chat(tmp_path, store, idle).send("/stop", "om_2") == [("om_2", "Nothing is running in this chat.")]
    assert turns.stopped == idle.stopped == ["oc_a"]


def test_status_replies_with_the_chats_status_without_counting_itself(tmp_path: Path, store: Store) -> None:
    store.set_container("oc_a", "bot-oc_a", "c0ffee")
    store.set_session("oc_a", "sess-1")
    store.record_received("om_waiting", "oc_a", "ou_1", "a question")
    store.mark_queued("om_waiting")
    [(_, text)] = Chat(tmp_path, store).send("/status")
    assert "Container: bot-oc_a exited\n" in text and "Session: sess-1\n" in text
    assert "Running: no; queued: 1" in text


def test_a_failing_command_is_logged_not_raised(tmp_path: Path, store: Store) -> None:
    class Broken(Turns):
        async def stop(self, chat_id: str) -> str | None:
            raise KeyError("the runner's bug")

    class Locked(Turns):
        async def stop(self, chat_id: str) -> str | None:
            raise OperationalError("database is locked")

    logged: list[tuple[str, str]] = []
    sink = logger.add(lambda m: logged.append((m.record["level"].name, m.record["message"])), format="{message}")
    try:
        assert Chat(tmp_path, store, Broken()).send("/stop", "om_1") == []
        assert Chat(tmp_path, store, Locked()).send("/stop", "om_2") == []
    finally:
        logger.remove(sink)
    assert logged == [("ERROR", "the command /stop failed: KeyError: \"the runner's bug\""),
                      ("WARNING", "the command /stop could not be answered yet: OperationalError: database is locked")]


def spend(store: Store, chat_id: str, user_id: str, nano_usd: int, days_ago: float = 0) -> None:
    """A model request, as the gateway records it (`days_ago` moves it back in time)."""
    usage_id = store.open_usage(chat_id, user_id, None, "claude-x", input_tokens=1, output_tokens=1,
                                cache_write_tokens=0, cache_read_tokens=0, cost_nano=nano_usd, complete=True)
    if days_ago:
        store.db.execute_sql("update usage set at = at - ? where id = ?", (days_ago * 86400, usage_id))


def test_cost_shows_the_chats_and_the_senders_spending_today_and_this_month(tmp_path: Path, store: Store) -> None:
    spend(store, "oc_a", "ou_1", 1_250_000_000)  # this chat, the one asking
    spend(store, "oc_a", "ou_2", 20_000_000)  # this chat, someone else
    spend(store, "oc_b", "ou_1", 30_000_000)  # another chat, the one asking
    spend(store, "oc_a", "ou_1", 5_000_000_000, days_ago=40)  # last month or before: in neither figure
    chat = Chat(tmp_path, store)
    chat.context = dataclasses.replace(chat.context, settings=dataclasses.replace(
        chat.context.settings, budgets=BudgetSettings(per_chat_daily_usd=Decimal("2"), per_user_monthly_usd=Decimal(
            "50"), timezone="Asia/Shanghai", reset_at="06:00")))
    [(_, text)] = chat.send("/cost")
    lines = text.splitlines()
    assert lines[0] == "This chat: $1.27 today of a budget of $2.00, $1.27 this month"
    assert lines[1] == "You: $1.28 today, $1.28 this month of a budget of $50.00"
    assert lines[2].startswith("A new day starts at ") and lines[2].endswith(" 06:00 Asia/Shanghai.")
