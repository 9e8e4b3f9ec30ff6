"""The service cannot silently stop serving, and secrets never reach a chat (issue 9, items 6 and 7): the real
orchestrator, engine, CLI and SQLite, with the store held locked by another process and a housekeeping step
failing on a real fault; an agent that prints its credentials."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest

from orchestrator.masking import MASK
from tests.acceptance.test_operations import get
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.feishu import FakeFeishu
from tests.harness import Orchestrator, StoreView, answers, chat, free_port, wait_answer, wait_until

# Long enough for the slow answer to fall due while it lasts: its model request ends 6 s in, and each write the
# orchestrator and the gateway try meanwhile waits out its busy timeout (2 s) before it is refused (measured: 13 s).
LOCK_SECONDS = 25
GENERIC = "Something went wrong on our side"


class Health:
    """/healthz polled on a thread of its own from start to stop: what it showed, and when."""

    def __init__(self, base: str) -> None:
        self.url = f"{base}/healthz"
        self.samples: list[tuple[float, int, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            status, body = get(self.url)
            self.samples.append((time.monotonic(), status, json.loads(body)["checks"]))

    def now(self) -> tuple[int, dict[str, str]]:
        status, body = get(self.url)
        return status, json.loads(body)["checks"]

    def showed(self, check: str, *words: str) -> bool:
        return any(all(w in checks.get(check, "") for w in words) for _, _, checks in self.samples)

    def __enter__(self) -> Health:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@dataclass
class Pushed:
    """The user messages pushed, and the frames that carried each (to redeliver the unacked, as Feishu does)."""

    feishu: FakeFeishu
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    frames: dict[str, list[str]] = field(default_factory=dict)

    def push(self, chat_id: str, text: str) -> str:
        event = self.feishu.text_event(chat_id, text)
        message_id = event["event"]["message"]["message_id"]
        self.events[message_id] = event
        self.frames.setdefault(message_id, []).append(self.feishu.push_event(event))
        return message_id

    def redeliver_unacked(self) -> int:
        again = [m for m, frames in self.frames.items()
                 if all(self.feishu.wait_ack(frame, timeout=30).code != 200 for frame in frames)]
        for message_id in again:
            self.frames[message_id].append(self.feishu.push_event(self.events[message_id]))
        return len(again)


def replies(feishu: FakeFeishu, chat_id: str, message_id: str) -> list[str]:
    return [m.text for m in feishu.messages(chat_id) if m.reply_to == message_id]


def state(store_view: StoreView, chat_id: str, message_id: str) -> str | None:
    return next((m["state"] for m in store_view.messages(chat_id) if m["message_id"] == message_id), None)


def schedule_notice(db: Path, chat_id: str, text: str, after: float) -> None:
    """What `orchestrator notify` queues, due `after` seconds from now (as an item waiting for its retry)."""
    now = time.time()
    with sqlite3.connect(db) as connection:
        connection.execute("insert into outbox (key, chat_id, text, state, attempts, next_attempt_at, created_at) "
                           "values (?, ?, ?, 'pending', 0, ?, ?)", (uuid.uuid4().hex, chat_id, text, now + after, now))


@pytest.fixture
def bot(feishu: FakeFeishu, feishu_config, start) -> Iterator[tuple[Orchestrator, Health]]:
    port = free_port()
    # idle_stop 6 s: housekeeping every 3 s, and a container outlives its last turn by 6 to 9 s
    config = feishu_config(metrics={"listen": f"127.0.0.1:{port}"}, containers={"idle_stop": 6})
    orchestrator = start(config)
    with Health(f"http://127.0.0.1:{port}") as health:
        wait_until(lambda: health.now()[0] == 200, 60, "healthy at the start")
        yield orchestrator, health


def test_a_store_locked_by_another_process_delays_messages_and_answers_which_all_end_once(
        feishu: FakeFeishu, bot: tuple[Orchestrator, Health], store_view: StoreView, fake_api: FakeAnthropic) -> None:
    orchestrator, health = bot
    pushed, first, second = Pushed(feishu), chat(), chat()
    slow = pushed.push(first, "SLOW 6 answered while the store is locked")
    # The slow answer is being made once the model has its request (through the gateway, which needs the store to
    # let a request in); its text (and so a card) comes only at the end of the slow block, so the card cannot be
    # what is waited for (it raced the answer and lost in a CI run). The answer then falls due during the lock.
    wait_until(lambda: state(store_view, first, slow) == "running"
               and fake_api.requests_mentioning("SLOW 6 answered while the store is locked"), 90,
               "the slow turn's model request")
    notice = f"a notice due while the store is locked {uuid.uuid4().hex[:6]}"
    schedule_notice(store_view.db, first, notice, after=1)

    holder = sqlite3.connect(store_view.db, timeout=30, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    locked_at = time.monotonic()
    during = [pushed.push(second, "arrived while the store is locked"),
              pushed.push(first, "RUN_BASH: echo queued-behind-the-slow-one")]
    wait_until(lambda: health.showed("store", "database is locked"), LOCK_SECONDS, "/healthz to show the lock")
    time.sleep(max(0.0, LOCK_SECONDS - (time.monotonic() - locked_at)))  # the fault itself: held this long
    holder.execute("ROLLBACK")
    holder.close()
    unlocked_at = time.monotonic()

    assert pushed.redeliver_unacked() >= 1  # refused while locked, not acked: Feishu pushes them again
    everyone = {slow: first, during[0]: second, during[1]: first}
    wait_until(lambda: all(state(store_view, c, m) in ("delivered", "failed") for m, c in everyone.items()), 120,
               f"every message answered or failed; log:\n{orchestrator.log()}")
    wait_until(lambda: health.now()[0] == 200, 60, "healthy again after the lock")
    for message_id, chat_id in everyone.items():
        assert len(replies(feishu, chat_id, message_id)) == 1, (message_id, answers(feishu, chat_id))
    assert "Fake answer to: SLOW 6 answered while the store is locked" in replies(feishu, first, slow)[0]
    assert answers(feishu, first).count(notice) == 1  # sent during the lock, recorded after, not sent again
    assert health.showed("outbox", "failing since", "database is locked")
    log = orchestrator.log()
    for line in ("outbox failed: OperationalError: database is locked", "outbox recovered after",
                 "handling the message recovered after"):
        assert line in log, line
    print(f"recovered {time.monotonic() - unlocked_at:.1f} s after the store was unlocked")


def test_a_failing_housekeeping_step_shows_in_healthz_holds_up_no_other_and_recovers(
        feishu: FakeFeishu, bot: tuple[Orchestrator, Health], store_view: StoreView, tmp_path: Path,
        instance: str, docker_client: docker.DockerClient) -> None:
    orchestrator, health = bot
    pushed, busy, other = Pushed(feishu), chat(), chat()
    hello = pushed.push(busy, "hello")
    wait_until(lambda: state(store_view, busy, hello) == "delivered", 90, "the answer delivered (not only streamed)")

    # The fault: the chats' folder is not a folder (root reads through any mode; a non-directory stops it).
    chats, aside = tmp_path / "data" / "chats", tmp_path / "data" / "chats-aside"
    chats.rename(aside)
    chats.write_text("not a folder")
    container = docker_client.containers.get(f"{instance}-{busy}")
    assert container.status == "running"  # its turn ended just now: idle-stopped 6 to 9 s later
    wait_until(lambda: "NotADirectoryError" in (health.now()[1].get("housekeeping.prune") or ""), 30,
               "/healthz to show the failing prune")
    failed = pushed.push(other, "arrives while the chats' folder is broken")
    # Other steps go on: the idle container is stopped meanwhile (its last turn ended seconds ago).
    wait_until(lambda: docker_client.containers.get(container.id).status == "exited", 60, "the idle stop")
    assert f"stopping idle container {instance}-{busy}" in orchestrator.log()
    wait_until(lambda: state(store_view, other, failed) == "failed", 60, "the message to fail")
    [told] = replies(feishu, other, failed)
    assert str(tmp_path) not in told and "Error" not in told, told  # details are in the log, not the chat
    assert health.now()[1]["housekeeping.prune"].startswith("failing since")

    chats.unlink()
    aside.rename(chats)
    wait_until(lambda: health.now()[0] == 200, 60, f"healthy again; it shows {health.now()}")
    assert "housekeeping.prune recovered after" in orchestrator.log()
    pushed.push(other, "after the repair")
    wait_answer(feishu, other, "Fake answer to: after the repair")


def test_a_secret_the_agent_prints_reaches_the_chat_and_the_store_masked(
        feishu: FakeFeishu, feishu_config, start, store_view: StoreView, fake_api: FakeAnthropic) -> None:
    key, token = f"sk-ant-api03-{uuid.uuid4().hex}", f"tok-{uuid.uuid4().hex}"
    config = feishu_config(agent={"env": {"SERVICE_KEY": key, "SERVICE_TOKEN": token}})
    start(config)
    chat_id = chat()
    feishu.push_event(feishu.text_event(chat_id, "RUN_BASH: printenv SERVICE_KEY SERVICE_TOKEN; echo end"))
    wait_answer(feishu, chat_id, "end")
    wait_until(lambda: [m["state"] for m in store_view.messages(chat_id)] == ["delivered"], 30, "delivered")

    [message] = feishu.messages(chat_id)
    assert MASK in message.text, message.text  # the agent did print them, and the chat saw the mask
    shown = [message.text, *(feishu.card(message.card_id).versions if message.card_id else [])]
    kept = store_view._rows("select text from outbox where chat_id = ?", chat_id) + \
        store_view._rows("select answer from messages where chat_id = ?", chat_id)
    for secret in (key, token):
        assert not any(secret[:12] in text for text in shown), "a streamed card showed (part of) a secret"
        assert not any(secret in str(row) for row in kept), "the store kept a secret"
