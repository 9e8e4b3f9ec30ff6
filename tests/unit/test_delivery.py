"""The outbox sender against a real SQLite store that another connection holds locked for a while."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import supervise
from orchestrator.channels import DeliveryFailed, OutFile, Outgoing
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


class FilesChat(Chat):
    """A channel that takes uploads, and fails the next sends or uploads as told."""

    def __init__(self) -> None:
        super().__init__()
        self.uploads: list[str] = []
        self.failing_sends = 0
        self.upload_refusal: DeliveryFailed | None = None

    async def upload(self, chat_id: str, file: OutFile) -> str:
        if self.upload_refusal is not None:
            raise self.upload_refusal
        self.uploads.append(file.name)
        return f"key-{len(self.uploads)}"

    async def deliver(self, item: Outgoing) -> None:
        if item.file is not None and self.failing_sends:
            self.failing_sends -= 1
            raise DeliveryFailed("Feishu could not be reached")
        await super().deliver(item)


async def passes(deliverer: Deliverer, store: Store, rounds: int = 50) -> None:
    """Passes of the outbox (as its loop makes them when woken) until nothing is pending or `rounds` have run."""
    for _ in range(rounds):
        await deliverer.deliver_due()
        if not store.pending_outbox():
            return
        await asyncio.sleep(0.01)


def answered_with_a_file(tmp_path: Path) -> tuple[Store, OutFile]:
    store = Store(tmp_path / "o.db")
    store.record_received("om_1", "oc_a", "ou_1", "question")
    store.mark_queued("om_1")
    store.mark_running("om_1", "t")
    copy = tmp_path / "copy"
    copy.write_bytes(b"csv")
    file = OutFile("file", "report.csv", str(copy), 3)
    store.answer("om_1", "the answer", None, None, card=None, files=[(file, "the numbers")])
    return store, file


def test_a_file_goes_after_its_answer_uploaded_once_across_a_failed_send(tmp_path: Path) -> None:
    store, file = answered_with_a_file(tmp_path)
    chat = FilesChat()
    chat.failing_sends = 1
    deliverer = Deliverer(store, chat)  # type: ignore[arg-type]
    asyncio.run(passes(deliverer, store, rounds=5))  # the answer goes; the file's send fails after its upload
    [item] = [item for item in store.outbox("oc_a") if item.file]
    assert item.upload_key == "key-1" and item.state == "pending"  # the key was stored before the send
    store.mark_retry(item, "", 0)
    asyncio.run(passes(Deliverer(store, chat), store))  # as after a restart: a new sender, the same store
    assert chat.uploads == ["report.csv"]  # not uploaded again
    assert [(i.text, i.file, i.upload_key) for i in chat.delivered] == [
        ("the answer", None, None), ("the numbers", file, "key-1")]
    assert store.message("om_1").state is State.DELIVERED
    assert not Path(file.path).exists()  # its copy is gone once sent


def test_a_file_refused_for_good_is_told_to_the_chat(tmp_path: Path) -> None:
    store, _ = answered_with_a_file(tmp_path)
    chat = FilesChat()
    chat.upload_refusal = DeliveryFailed("Feishu answered 400 code 234001: bad file", permanent=True)
    asyncio.run(passes(Deliverer(store, chat), store))
    assert [i.text for i in chat.delivered] == [
        "the answer", "The file report.csv could not be sent: Feishu answered 400 code 234001: bad file"]
    assert [i.state for i in store.outbox("oc_a") if i.file] == ["dead"]
    assert store.message("om_1").state is State.DELIVERED


def test_a_chats_slow_upload_holds_up_neither_another_chats_answer_nor_its_own_order(tmp_path: Path) -> None:
    store, _ = answered_with_a_file(tmp_path)  # chat oc_a: an answer, then a file
    store.say("oc_a", "after the file")
    release = asyncio.Event()

    class SlowUploads(FilesChat):
        async def upload(self, chat_id: str, file: OutFile) -> str:
            await release.wait()
            return await super().upload(chat_id, file)

    chat = SlowUploads()
    deliverer = Deliverer(store, chat)  # type: ignore[arg-type]

    async def scenario() -> None:
        await deliverer.deliver_due()  # oc_a's answer goes, its file's upload starts
        store.say("oc_b", "another chat's answer")
        await deliverer.deliver_due()
        assert [i.text for i in chat.delivered] == ["the answer", "another chat's answer"]  # not held by oc_a
        release.set()
        await passes(deliverer, store)

    asyncio.run(scenario())
    assert [i.text for i in chat.delivered] == ["the answer", "another chat's answer", "the numbers",
                                                "after the file"]


def test_a_file_whose_copy_is_gone_is_given_up_and_told_not_retried_for_ever(tmp_path: Path) -> None:
    store, file = answered_with_a_file(tmp_path)
    Path(file.path).unlink()
    chat = FilesChat()
    asyncio.run(passes(Deliverer(store, chat), store))
    assert [i.text for i in chat.delivered] == ["the answer", "The file report.csv could not be sent: its copy is gone"]
    assert chat.uploads == []
