from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from peewee import IntegrityError

from orchestrator.masking import MASK
from orchestrator.states import State
from orchestrator.store import Store, TransitionRefused, refused_for_now


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "data" / "orchestrator.db")
    yield store
    store.close()


def test_wal_mode_and_busy_timeout(store: Store) -> None:
    assert store.db.execute_sql("pragma journal_mode").fetchone()[0] == "wal"
    assert store.db.execute_sql("pragma busy_timeout").fetchone()[0] == 2_000


def test_a_message_id_is_recorded_once(store: Store) -> None:
    store.ensure_chat("oc_a")
    first = store.record_received("om_1", "oc_a", "ou_1", "hello")
    assert first is not None and first.state is State.RECEIVED
    assert store.record_received("om_1", "oc_a", "ou_1", "hello") is None
    assert len(store.messages("oc_a")) == 1


def test_transitions_happen_once_and_in_order(store: Store) -> None:
    store.record_received("om_1", "oc_a", "ou_1", "hello")
    store.mark_queued("om_1")
    store.mark_running("om_1", "1-1")
    assert store.answer("om_1", "hi there", 0.01, 120, card=None)
    store.mark_sent(store.due_outbox()[0])
    message = store.message("om_1")
    assert (message.state, message.answer, message.turn, message.error) == (State.DELIVERED, "hi there", "1-1", None)
    assert store.unfinished_messages() == []


def test_a_refused_transition_that_means_a_bug_raises_and_changes_nothing(store: Store) -> None:
    """A caller whose idea of the message is wrong must not go on as if the change happened: `running → running`
    refused silently is how recovery came to follow a turn that never ran (issue 10)."""
    store.ensure_chat("oc_a")
    store.record_received("om_1", "oc_a", "ou_1", "hello")
    with pytest.raises(TransitionRefused, match="om_1 is received: it may not become running"):
        store.mark_running("om_1", "1-1")  # not queued yet
    with pytest.raises(TransitionRefused, match="is received: it may not become answered"):
        store.answer("om_1", "an answer without a turn", None, None, card=None)
    store.mark_queued("om_1")
    with pytest.raises(TransitionRefused):
        store.mark_queued("om_1")
    store.mark_running("om_1", "1-1")
    with pytest.raises(TransitionRefused, match="is running: it may not become running"):
        store.mark_running("om_1", "1-2")
    assert store.answer("om_1", "hi there", 0.01, 120, card=None)
    with pytest.raises(TransitionRefused, match="is answered: it may not become answered"):
        store.answer("om_1", "a second answer", None, None, card=None)
    with pytest.raises(TransitionRefused):
        store.mark_queued("om_1")  # an answer is delivered, never run a second time
    with pytest.raises(TransitionRefused, match="is answered: it may not become failed"):
        store.fail("om_1", "late", "too late")  # only an undeliverable answer is taken back (mark_dead)
    store.mark_sent(store.due_outbox()[0])
    with pytest.raises(TransitionRefused, match="is delivered: it may not become failed"):
        store.fail("om_1", "late", "too late")
    with pytest.raises(TransitionRefused, match="om_2 is not stored"):
        store.mark_queued("om_2")
    message = store.message("om_1")
    assert (message.state, message.turn, message.answer) == (State.DELIVERED, "1-1", "hi there")
    assert [item.text for item in store.outbox("oc_a")] == ["hi there"]


def test_a_turn_that_ends_after_a_shutdown_failed_its_message_is_dropped_quietly(store: Store) -> None:
    """A shutdown that could not wait fails the running turn's message and tells the user; the turn may still
    end before the service stops: its answer or failure is refused without raising, and nothing more is said."""
    store.ensure_chat("oc_a")
    for message_id in ("om_1", "om_2"):
        store.record_received(message_id, "oc_a", "ou_1", "hello")
        store.mark_queued(message_id)
        store.start_turn(message_id, f"{message_id}-turn")
        assert store.fail(message_id, "interrupted by a restart", "interrupted")
    assert not store.answer("om_1", "the late answer", 0.01, 100, card="card_1")
    assert not store.fail("om_2", "the CLI was interrupted", "partial\n\ninterrupted")
    assert {store.message(m).error for m in ("om_1", "om_2")} == {"interrupted by a restart"}
    assert store.message("om_1").answer is None
    assert [item.text for item in store.outbox("oc_a")] == ["interrupted", "interrupted"]


def test_an_item_marked_twice_delivers_its_message_once(store: Store) -> None:
    answered(store, "om_1")
    answered(store, "om_2")
    first, second = store.due_outbox()
    store.mark_sent(first)
    store.mark_sent(first)
    store.mark_dead(second, "bot was removed from the chat")
    store.mark_dead(second, "bot was removed from the chat")
    assert [(m.state, m.error) for m in store.messages("oc_a")] == \
        [(State.DELIVERED, None), (State.FAILED, "the answer could not be delivered: bot was removed from the chat")]
    assert [(item.state, item.attempts) for item in store.outbox("oc_a")] == [("sent", 1), ("dead", 1)]


def test_unfinished_messages_in_arrival_order(store: Store) -> None:
    for n in range(4):
        store.record_received(f"om_{n}", "oc_a", "ou_1", f"m{n}")
    store.mark_queued("om_1")
    store.mark_queued("om_2")
    store.fail("om_2", "nope", "nope")
    store.record_received("om_4", "oc_b", "ou_1", "another chat")
    assert [m.message_id for m in store.unfinished_messages()] == ["om_0", "om_1", "om_3", "om_4"]
    assert [m.message_id for m in store.unfinished_messages("oc_a")] == ["om_0", "om_1", "om_3"]


def test_the_last_turn_is_the_latest_message_that_reported_its_duration(store: Store) -> None:
    store.ensure_chat("oc_a")
    assert store.last_turn("oc_a") is None
    answered(store, "om_1")
    store.record_received("om_2", "oc_a", "ou_1", "/status")
    store.mark_queued("om_2")
    store.mark_running("om_2", "")
    store.answer("om_2", "a command's reply has no turn", None, None, card=None)
    answered(store, "om_3", chat_id="oc_b")
    last = store.last_turn("oc_a")
    assert last is not None and (last.message_id, last.cost_usd, last.duration_ms) == ("om_1", 0.01, 100)


def test_session_ids_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    first = Store(path)
    first.ensure_chat("oc_a", "Team A")
    first.set_session("oc_a", "sess-1")
    first.set_container("oc_a", "orchestrator-oc_a", "abc123")
    first.close()
    reopened = Store(path)
    chat = reopened.chat("oc_a")
    assert (chat.session_id, chat.name, chat.container_name, chat.container_id) == \
        ("sess-1", "Team A", "orchestrator-oc_a", "abc123")
    reopened.ensure_chat("oc_a")  # seeing the chat again changes nothing it knows
    assert reopened.chat("oc_a").session_id == "sess-1"
    reopened.close()
    with sqlite3.connect(path) as db:
        assert db.execute("select session_id from chats").fetchall() == [("sess-1",)]


def answered(store: Store, message_id: str, chat_id: str = "oc_a", text: str = "the answer") -> None:
    store.record_received(message_id, chat_id, "ou_1", "question")
    store.mark_queued(message_id)
    store.mark_running(message_id, "t")
    assert store.answer(message_id, text, 0.01, 100, card="card_1")


def test_an_answer_is_queued_for_delivery_with_it_and_delivered_once(store: Store) -> None:
    answered(store, "om_1")
    [item] = store.due_outbox()
    assert (item.chat_id, item.reply_to, item.message_id, item.text, item.card) == \
        ("oc_a", "om_1", "om_1", "the answer", "card_1")
    assert store.message("om_1").state is State.ANSWERED
    store.mark_sent(item)
    assert store.message("om_1").state is State.DELIVERED
    assert store.due_outbox() == [] and store.pending_outbox() == 0


def test_a_failure_is_told_to_the_user(store: Store) -> None:
    store.record_received("om_1", "oc_a", "ou_1", "question")
    store.mark_queued("om_1")
    assert store.fail("om_1", "it broke", "partial text\n\nit broke")
    [item] = store.due_outbox()
    assert item.text == "partial text\n\nit broke" and item.message_id is None
    assert store.message("om_1").error == "it broke"


def test_a_chat_waits_for_its_earlier_items_while_other_chats_go_on(store: Store) -> None:
    answered(store, "om_1", "oc_a", "first")
    answered(store, "om_2", "oc_a", "second")
    answered(store, "om_3", "oc_b", "other chat")
    first = store.due_outbox()[0]
    store.mark_retry(first, "429", delay=30)
    assert [i.text for i in store.due_outbox()] == ["other chat"]
    assert store.outbox("oc_a")[0].attempts == 1 and store.outbox("oc_a")[0].last_error == "429"


def test_an_undeliverable_answer_fails_its_message(store: Store) -> None:
    answered(store, "om_1")
    store.mark_dead(store.due_outbox()[0], "bot was removed from the chat")
    assert store.message("om_1").state is State.FAILED
    assert "could not be delivered: bot was removed" in store.message("om_1").error
    assert store.due_outbox() == []


def test_a_chat_is_refused_once(store: Store) -> None:
    assert store.record_refusal("oc_x")
    assert not store.record_refusal("oc_x")
    assert store.record_refusal("oc_y")


def test_what_the_bot_says_is_kept_with_the_secrets_masked(tmp_path: Path) -> None:
    key = "sk-ant-api03-unit-4f1d"
    store = Store(tmp_path / "o.db", secrets=[key])
    answered(store, "om_1", text=f"ANTHROPIC_API_KEY={key}")
    store.record_received("om_2", "oc_a", "ou_1", "question")
    store.mark_queued("om_2")
    store.fail("om_2", f"stderr: {key}", f"partial {key}\n\nit broke")
    store.say("oc_a", f"notice {key}")
    assert [item.text for item in store.outbox("oc_a")] == \
        [f"ANTHROPIC_API_KEY={MASK}", f"partial {MASK}\n\nit broke", f"notice {MASK}"]
    assert (store.message("om_1").answer, store.message("om_2").error) == \
        (f"ANTHROPIC_API_KEY={MASK}", f"stderr: {MASK}")
    store.close()
    assert key not in (tmp_path / "o.db").read_bytes().decode(errors="replace")


def test_an_unexpected_failure_never_takes_back_a_stored_answer(store: Store) -> None:
    answered(store, "om_1")
    assert not store.fail_unanswered("om_1", "unexpected error: KeyError", "Something went wrong")
    assert store.message("om_1").state is State.ANSWERED and len(store.outbox("oc_a")) == 1
    store.record_received("om_2", "oc_a", "ou_1", "question")
    store.mark_queued("om_2")
    store.mark_running("om_2", "t")
    assert store.fail_unanswered("om_2", "unexpected error: KeyError", "Something went wrong")
    assert store.message("om_2").state is State.FAILED
    assert store.outbox("oc_a")[-1].text == "Something went wrong"


@pytest.fixture
def locked(store: Store) -> Iterator[sqlite3.Connection]:
    """Another process's connection holding the store's write lock; the store waits 0.1 s for it, not 2."""
    store.db.execute_sql("pragma busy_timeout = 100")
    holder = sqlite3.connect(store.path)
    holder.execute("BEGIN EXCLUSIVE")
    yield holder
    holder.rollback()
    holder.close()


def test_a_locked_store_refuses_writes_for_now_and_reads_go_on(store: Store, locked: sqlite3.Connection) -> None:
    with pytest.raises(Exception) as refused:
        store.ensure_chat("oc_a")
    assert refused_for_now(refused.value)
    assert store.chats() == [] and "locked" in (store.writable() or "")
    locked.rollback()
    store.ensure_chat("oc_a")
    assert store.writable() is None


def test_only_a_busy_store_or_a_full_disk_is_refused_for_now() -> None:
    assert refused_for_now(sqlite3.OperationalError("database or disk is full"))
    assert refused_for_now(OSError(errno.ENOSPC, "No space left on device"))
    assert not refused_for_now(OSError(errno.ENOENT, "No such file or directory"))
    assert not refused_for_now(sqlite3.OperationalError("no such table: messages"))
    assert not refused_for_now(IntegrityError("UNIQUE constraint failed"))
    assert not refused_for_now(KeyError("database is locked"))


def test_a_running_messages_new_turn_is_recorded_and_a_finished_message_refuses_one(tmp_path: Path) -> None:
    """Recovery follows the stored turn: a turn started anew (never started before a restart, or retried after
    the pids limit) must replace it, or every restart re-runs the new turn's tool calls (seen in kill9)."""
    store = Store(tmp_path / "s.db")
    store.ensure_chat("oc_a")
    store.record_received("om_1", "oc_a", "ou_1", "hi")
    store.mark_queued("om_1")
    store.start_turn("om_1", "1-1-aaaa")
    assert (store.message("om_1").state, store.message("om_1").turn) == (State.RUNNING, "1-1-aaaa")
    store.start_turn("om_1", "1-1-bbbb")
    assert store.message("om_1").turn == "1-1-bbbb"
    store.answer("om_1", "done", None, None, card=None)
    with pytest.raises(TransitionRefused, match="is answered: it may not become running"):
        store.start_turn("om_1", "1-2-cccc")
    assert store.message("om_1").turn == "1-1-bbbb"
    store.close()


def test_a_reply_without_a_turn_is_all_or_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "o.db")
    store.ensure_chat("oc_1")
    store.record_received("om_1", "oc_1", "ou_1", "/status")
    store.answer_without_turn("om_1", "Container: none")
    assert store.message("om_1").state is State.ANSWERED and [i.text for i in store.outbox("oc_1")] == [
        "Container: none"]
    with pytest.raises(TransitionRefused):  # answered already: nothing changes, nothing is queued twice
        store.answer_without_turn("om_1", "again")
    assert store.message("om_1").state is State.ANSWERED and len(store.outbox("oc_1")) == 1


def test_topics_keep_their_own_sessions_and_reset_forgets_them_all(store: Store) -> None:
    store.ensure_chat("oc_1")
    store.set_session("oc_1", "chat-session")
    store.set_session("oc_1", "topic-a", "omt_a")
    store.set_session("oc_1", "topic-a2", "omt_a")  # replaced, not added
    store.set_session("oc_1", "topic-b", "omt_b")
    assert store.session("oc_1") == "chat-session" and store.session("oc_1", "omt_a") == "topic-a2"
    assert store.thread_sessions("oc_1") == {"omt_a": "topic-a2", "omt_b": "topic-b"}
    assert store.session("oc_1", "omt_new") is None
    store.forget_sessions("oc_1")
    assert store.session("oc_1") is None and store.thread_sessions("oc_1") == {}


def test_a_store_made_by_an_earlier_version_gets_the_new_tables_and_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:  # the messages table as issue 11 left it: no thread_id
        old.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, message_id VARCHAR(255) NOT NULL UNIQUE, "
                    "chat_id VARCHAR(255) NOT NULL, sender_id VARCHAR(255) NOT NULL, text TEXT NOT NULL, "
                    "state VARCHAR(255) NOT NULL, turn VARCHAR(255), display TEXT, error TEXT, answer TEXT, "
                    "cost_usd REAL, duration_ms INTEGER, received_at REAL NOT NULL, updated_at REAL NOT NULL)")
        old.execute("INSERT INTO messages (message_id, chat_id, sender_id, text, state, received_at, updated_at) "
                    "VALUES ('om_old', 'oc_1', 'ou_1', 'from before', 'delivered', 1, 1)")
    store = Store(path)
    try:
        assert store.message("om_old").thread_id == "" and store.message("om_old").text == "from before"
        store.record_received("om_new", "oc_1", "ou_1", "in a topic", "omt_a")
        assert store.message("om_new").thread_id == "omt_a"
        store.ensure_chat("oc_1")
        store.set_session("oc_1", "s", "omt_a")
        assert store.session("oc_1", "omt_a") == "s"
    finally:
        store.close()
    Store(path).close()  # opening it again adds nothing twice


def test_files_sent_without_text_are_merged_into_the_next_message_at_once_or_not_at_all(store: Store) -> None:
    store.ensure_chat("oc_1")
    for message_id, text in (("om_img", ""), ("om_log", ""), ("om_text", "what is wrong here?"), ("om_late", ""),
                             ("om_more", "")):
        store.record_received(message_id, "oc_1", "ou_1", text, attachments=f'[{{"key": "{message_id}"}}]')
    taken = store.merge("om_text", "the files of all three", ["om_img", "om_log"])
    assert (taken.state, taken.attachments, taken.text) == (State.RECEIVED, "the files of all three",
                                                            "what is wrong here?")
    assert [m.state for m in store.messages("oc_1")] == [State.MERGED, State.MERGED] + [State.RECEIVED] * 3
    assert [m.message_id for m in store.unfinished_messages()] == ["om_text", "om_late", "om_more"]  # merged: final
    store.mark_queued("om_text")
    with pytest.raises(TransitionRefused, match="om_text is queued: it may not take other messages' files"):
        store.merge("om_text", "again", ["om_late"])
    with pytest.raises(TransitionRefused, match="om_img is merged: it may not become merged"):
        store.merge("om_late", "twice", ["om_more", "om_img"])
    late, more = store.message("om_late"), store.message("om_more")  # nothing of a refused merge is kept
    assert (late.state, late.attachments, more.state) == (State.RECEIVED, '[{"key": "om_late"}]', State.RECEIVED)
    assert store.outbox("oc_1") == []  # a merged message is told nothing
