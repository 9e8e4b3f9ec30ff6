"""The outbox sender against a real SQLite store that another connection holds locked for a while."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import supervise
from orchestrator.channels import Outgoing
from orchestrator.delivery import Deliverer
from orchestrator.states import State
from orchestrator.store import Store
from orchestrator.supervise import LIVENESS


class Chat:
    """A channel that only records what it was asked to deliver."""

    def __init__(self) -> None:
        self.delivered: list[Outgoing] = []

    async def deliver(self, item: Outgoing) -> None:
        self.delivered.append(item)


async def until(check: Callable[[], object], what: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_a_locked_store_delays_the_outbox_which_recovers_and_sends_nothing_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervise, "FIRST_DELAY", 0.05)
    store = Store(tmp_path / "o.db")
    store.db.execute_sql("pragma busy_timeout = 100")  # the service waits 2 s; the refusal is the same
    store.record_received("om_1", "oc_a", "ou_1", "question")
    store.mark_queued("om_1")
    store.mark_running("om_1", "t")
    store.answer("om_1", "the answer", None, None, card=None)
    holder = sqlite3.connect(store.path)
    holder.execute("BEGIN EXCLUSIVE")
    chat = Chat()
    deliverer = Deliverer(store, chat)  # type: ignore[arg-type]
    outbox = LIVENESS.streak("outbox")

    async def scenario() -> None:
        loop = asyncio.create_task(deliverer.run())
        await until(lambda: chat.delivered and outbox.problem(), "a sent item whose sending cannot be recorded")
        assert "database is locked" in (outbox.problem() or "")
        await asyncio.sleep(0.3)  # a few passes while it is locked: the item is not sent again
        holder.rollback()
        await until(lambda: store.message("om_1").state is State.DELIVERED, "the item recorded as sent")
        await until(lambda: outbox.problem() is None, "the outbox healthy again")
        loop.cancel()

    asyncio.run(scenario())
    assert [item.text for item in chat.delivered] == ["the answer"]
    assert store.pending_outbox() == 0
    holder.close()
    store.close()


def test_the_outbox_loop_ends_when_cancelled_as_it_is_woken(tmp_path: Path) -> None:
    """A shutdown cancels the outbox loop; an answer may wake it in the same moment. On Python 3.11 wait_for
    swallowed that cancel and the loop outlived the service (seen as a hung restart)."""
    deliverer = Deliverer(Store(tmp_path / "o.db"), Chat())

    async def scenario() -> None:
        waiting = asyncio.create_task(deliverer._next_round())
        await asyncio.sleep(0.01)  # it waits for a wake-up
        deliverer.wake()
        waiting.cancel()
        done, _ = await asyncio.wait({waiting}, timeout=2)
        assert done and waiting.cancelled()

    asyncio.run(scenario())
