"""A message of files only waits for its sender's next text (orchestrator/service.py `_route`, the store's `merge`,
inbox's attachments with the message they came with): the service with a fake turn and channel, a real store.
People paste a screenshot, then type the question: both must be one turn with the file at hand."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from orchestrator import inbox
from orchestrator.agent import Answer
from orchestrator.channels import Act, Attachment, Incoming, Submit
from orchestrator.config import AccessSettings, FileSettings, Settings
from orchestrator.service import Service
from orchestrator.states import State
from orchestrator.store import MessageRecord, Store
from tests.fakes.channel import RecordingChannel
from tests.unit.test_service_resilience import Engine

CHAT = "oc_a"
WAIT = 0.3  # seconds a message of files only waits in these tests: what the timer tests wait for at most


class Turns:
    """The turn runner: records each turn's message (its text and files) and answers it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.ran: list[MessageRecord] = []

    async def run(self, message: MessageRecord, display: object, log: object) -> Answer:
        self.store.start_turn(message.message_id, "t1")
        self.ran.append(message)
        return Answer(f"answer to {message.message_id}", "sess-1")

    def running_chats(self) -> set[str]:  # for a shutdown
        return set()

    async def interrupt_all(self) -> list[str]:
        return []


class Chat(RecordingChannel):
    """A channel whose input is the test's `scenario`, given the service's submit; then it waits."""

    def __init__(self, scenario: Callable[[Submit], Awaitable[None]]) -> None:
        super().__init__()
        self.scenario = scenario

    async def run(self, submit: Submit, act: Act) -> None:
        await self.scenario(submit)
        await asyncio.Event().wait()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "data" / "orchestrator.db")
    store.ensure_chat(CHAT)
    yield store
    store.close()


def make_service(tmp_path: Path, store: Store, wait: float = WAIT,
                 channel: RecordingChannel | None = None) -> tuple[Service, Turns]:
    settings = Settings(source=tmp_path / "config.yaml", data_dir=tmp_path / "data", chats_dir=tmp_path / "chats",
                        access=AccessSettings(allowed_chats=(CHAT,), allowed_users=("*",)),
                        files=FileSettings(wait_for_text=wait))
    made = Service(settings, store, Engine(), channel or RecordingChannel())  # type: ignore[arg-type]
    turns = made.turns = Turns(store)  # type: ignore[assignment]

    async def no_network() -> None:
        pass

    made.close_network = no_network  # type: ignore[method-assign]  # iptables and the engine: not here
    return made, turns


def image(message_id: str, sender: str = "ou_1", thread: str = "") -> Incoming:
    return Incoming(CHAT, message_id, sender, "", thread_id=thread,
                    attachments=(Attachment("image", f"img_{message_id}", ""),))


def text(message_id: str, words: str, sender: str = "ou_1", thread: str = "") -> Incoming:
    return Incoming(CHAT, message_id, sender, words, thread_id=thread)


async def until(done: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def answered(svc: Service, *message_ids: str) -> None:
    """Until each of `message_ids` has its answer stored, then what is due delivered."""
    await until(lambda: all(svc.store.message(m).state is State.ANSWERED for m in message_ids),
                f"{', '.join(message_ids)} to be answered")
    await svc.deliverer.deliver_due()


def sources(message: MessageRecord) -> list[tuple[str, str]]:
    """(key, message it came with) of each of the message's files."""
    return [(item.attachment.key, item.message_id) for item in inbox.attachments_of(message)]


def test_a_screenshot_then_its_question_are_one_turn_with_the_file_fetched_from_its_own_message(
        tmp_path: Path, store: Store) -> None:
    channel = RecordingChannel()
    svc, turns = make_service(tmp_path, store, wait=60, channel=channel)

    async def run() -> None:
        await svc.submit(image("om_img"))
        await svc.submit(Incoming(CHAT, "om_post", "ou_1", "why does this fail?",
                                  attachments=(Attachment("image", "img_post", ""),)))
        await answered(svc, "om_post")

    asyncio.run(run())
    [turn] = turns.ran
    assert turn.message_id == "om_post" and turn.text == "why does this fail?"
    assert sources(turn) == [("img_om_img", "om_img"), ("img_post", "om_post")]  # held first, then its own
    assert store.message("om_img").state is State.MERGED
    assert [(item.reply_to, item.text) for item in channel.delivered] == [("om_post", "answer to om_post")]
    assert svc._held == {}

    fetched: list[tuple[str, str]] = []

    async def fetch(message_id: str, attachment: Attachment, max_bytes: int) -> bytes:
        fetched.append((message_id, attachment.key))
        return b"GIF89a\x01\x00\x01\x00" + b"\x00" * 20

    made = asyncio.run(inbox.prepare(store.message("om_post"), "t1", FileSettings(), fetch))
    assert fetched == [("om_img", "img_om_img"), ("om_post", "img_post")]  # Feishu serves each under its message
    assert [where for _, where in made.files] == ["inbox/om_post/image-1.gif", "inbox/om_post/image-2.gif"]
    assert made.text.startswith("why does this fail?\n\nFiles sent with this message")


def test_commands_and_other_senders_take_no_files_and_files_alone_get_their_own_turn_after_the_wait(
        tmp_path: Path, store: Store) -> None:
    channel = RecordingChannel()
    svc, turns = make_service(tmp_path, store, channel=channel)

    async def run() -> None:
        await svc.submit(image("om_1"))
        await svc.submit(image("om_2"))  # several in a row wait together
        await svc.submit(image("om_topic", thread="omt_a"))  # another topic: another wait
        await svc.submit(text("om_help", "/help"))
        await svc.submit(text("om_other", "hello", sender="ou_2"))
        await answered(svc, "om_help", "om_other")
        assert [t.message_id for t in turns.ran] == ["om_other"] and len(svc._held) == 2
        await answered(svc, "om_2", "om_topic")

    asyncio.run(run())
    assert [t.message_id for t in turns.ran] == ["om_other", "om_2", "om_topic"]
    assert sources(turns.ran[1]) == [("img_om_1", "om_1"), ("img_om_2", "om_2")] and turns.ran[1].text == ""
    assert store.message("om_1").state is State.MERGED and store.message("om_help").attachments == ""
    assert {item.reply_to for item in channel.delivered} == {"om_help", "om_other", "om_2", "om_topic"}


def test_without_waiting_files_alone_are_answered_at_once(tmp_path: Path, store: Store) -> None:
    svc, turns = make_service(tmp_path, store, wait=0)

    async def run() -> None:
        await svc.submit(image("om_1"))
        await svc.submit(text("om_2", "and this?"))
        await answered(svc, "om_1", "om_2")

    asyncio.run(run())
    assert [(t.message_id, sources(t)) for t in turns.ran] == [("om_1", [("img_om_1", "om_1")]), ("om_2", [])]


def test_after_a_restart_files_wait_for_the_time_left_and_nothing_else_hands_them_on(
        tmp_path: Path, store: Store) -> None:
    """Held messages are received rows: the next start holds those still inside their window (a text then takes
    them, and the stranded check leaves them alone however old) and hands on those whose time is up."""
    files = inbox.encode_attachments((Attachment("image", "img", ""),))
    store.record_received("om_old", CHAT, "ou_1", "", attachments=files)
    store.record_received("om_old_2", CHAT, "ou_1", "", attachments=files)
    store.record_received("om_recent", CHAT, "ou_2", "", attachments=files)
    store.db.execute_sql("update messages set received_at = received_at - 500 where message_id like 'om_old%'")
    store.db.execute_sql("update messages set received_at = received_at - 100 where message_id = 'om_recent'")
    svc, turns = make_service(tmp_path, store, wait=300)

    async def run() -> None:
        svc.recover()
        await svc._resume_stranded()  # om_recent was received 100 s ago, but waits for its text
        await answered(svc, "om_old_2")
        assert list(svc._held) == [(CHAT, "ou_2", "")] and store.message("om_recent").state is State.RECEIVED
        await svc.submit(text("om_question", "what is it?", sender="ou_2"))
        await answered(svc, "om_question")

    asyncio.run(run())
    assert [t.message_id for t in turns.ran] == ["om_old_2", "om_question"]
    assert sources(turns.ran[0]) == [("img", "om_old"), ("img", "om_old_2")]
    assert sources(turns.ran[1]) == [("img", "om_recent")]


def test_a_text_that_came_after_the_window_does_not_take_the_files(tmp_path: Path, store: Store) -> None:
    """At a start, stored messages are routed in arrival order: the files whose time was up before the text came
    get their turn first, and the text its own."""
    files = inbox.encode_attachments((Attachment("image", "img", ""),))
    store.record_received("om_file", CHAT, "ou_1", "", attachments=files)
    store.record_received("om_text", CHAT, "ou_1", "later")
    store.db.execute_sql("update messages set received_at = received_at - 10 where message_id = 'om_file'")
    svc, turns = make_service(tmp_path, store, wait=5)

    async def run() -> None:
        svc.recover()
        await answered(svc, "om_file", "om_text")

    asyncio.run(run())
    assert [(t.message_id, sources(t)) for t in turns.ran] == [("om_file", [("img", "om_file")]), ("om_text", [])]


def test_a_stop_cancels_the_waits_and_leaves_the_files_for_the_next_start(tmp_path: Path, store: Store) -> None:
    held: list[asyncio.TimerHandle] = []

    async def scenario(submit: Submit) -> None:
        await submit(image("om_1"))
        held.extend(waiting.timer for waiting in svc._held.values())
        svc._on_signal(signal.SIGTERM)

    svc, turns = make_service(tmp_path, store, wait=60, channel=Chat(scenario))
    assert asyncio.run(svc.run()) == 0
    assert len(held) == 1 and held[0].cancelled() and svc._held == {}
    assert store.message("om_1").state is State.RECEIVED and turns.ran == []
