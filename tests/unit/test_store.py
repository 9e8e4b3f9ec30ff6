from __future__ import annotations

import contextlib
import errno
import itertools
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from peewee import DoesNotExist, IntegrityError, SqliteDatabase

from orchestrator.channels import OutFile
from orchestrator.masking import MASK
from orchestrator.states import State
from orchestrator.store import AlwaysAllowed, OutboxRecord, Store, TransitionRefused, refused_for_now


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


def test_a_chat_is_stored_once_and_keeps_its_latest_name(store: Store) -> None:
    store.ensure_chat("oc_a")
    assert store.chat("oc_a").name == ""
    store.set_session("oc_a", "s-1")
    store.ensure_chat("oc_a", "Team")
    store.ensure_chat("oc_a")  # an event without the chat's name: the name stays
    assert store.chat("oc_a").name == "Team"
    store.ensure_chat("oc_a", "Team renamed")
    assert store.chats() == [store.chat("oc_a")]
    assert store.chat_and_session("oc_a") == (store.chat("oc_a"), "s-1")
    assert (store.chat("oc_a").name, store.chat("oc_a").session_id) == ("Team renamed", "s-1")


def test_a_chat_this_store_wrote_costs_no_statement_until_its_name_changes(store: Store) -> None:
    statements: list[str] = []
    store.db.connection().set_trace_callback(statements.append)
    store.ensure_chat("oc_a", "Team")
    store.ensure_chat("oc_a", "Team")
    store.ensure_chat("oc_a")
    assert len(statements) == 1
    store.ensure_chat("oc_a", "Team renamed")
    store.ensure_chat("oc_b")
    store.ensure_chat("oc_b")
    assert len(statements) == 3
    assert [(chat.chat_id, chat.name) for chat in store.chats()] == [("oc_a", "Team renamed"), ("oc_b", "")]


def test_a_chat_found_gone_is_stored_again_by_its_next_message(store: Store) -> None:
    store.ensure_chat("oc_a", "Team")
    store.db.execute_sql("DELETE FROM chats")  # by hand, or a failover to a replica that missed it
    with pytest.raises(DoesNotExist, match="no chat oc_a in the store"):  # the operator's log says which
        store.chat("oc_a")
    store.ensure_chat("oc_a", "Team")
    assert store.chat("oc_a").name == "Team"


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
    assert store.chat_and_session("oc_1", "omt_a") == (store.chat("oc_1"), "topic-a2")
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


# ---- two chats: every write changes the chat (or the item) it names, and nothing of another chat's ----

A, B = "oc_a", "oc_b"


@pytest.fixture
def ticking(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's clock moves on at every reading, so a write that stamps a row it should not have touched
    always shows in the row."""
    readings = itertools.count(1_000)
    monkeypatch.setattr("orchestrator.store.time", SimpleNamespace(time=lambda: float(next(readings))))


def _take_files(store: Store, message_id: str) -> object:
    store.record_received(f"{message_id}-taker", store.message(message_id).chat_id, "ou_1", "the text for them")
    return store.merge(f"{message_id}-taker", "[]", [message_id])


def _deliver(store: Store, message_id: str) -> None:
    [item] = [i for i in store.outbox(store.message(message_id).chat_id) if i.message_id == message_id]
    store.mark_sent(item)


# How the service brings a received message to each state: the steps, each a store write.
STEPS: dict[State, Callable[[Store, str], object]] = {
    State.QUEUED: lambda s, m: s.mark_queued(m),
    State.RUNNING: lambda s, m: s.mark_running(m, f"{m}-turn"),
    State.ANSWERED: lambda s, m: s.answer(m, "the answer", 0.01, 100, card=None),
    State.DELIVERED: _deliver,
    State.FAILED: lambda s, m: s.fail(m, "failed before", "told before"),
    State.MERGED: _take_files,
}
ROUTES: dict[State, list[State]] = {
    State.RECEIVED: [], State.QUEUED: [State.QUEUED], State.RUNNING: [State.QUEUED, State.RUNNING],
    State.ANSWERED: [State.QUEUED, State.RUNNING, State.ANSWERED],
    State.DELIVERED: [State.QUEUED, State.RUNNING, State.ANSWERED, State.DELIVERED],
    State.FAILED: [State.FAILED], State.MERGED: [State.MERGED],
}


def in_state(store: Store, message_id: str, state: State, chat_id: str = A) -> None:
    """A message (of files) brought to `state`."""
    store.record_received(message_id, chat_id, "ou_1", "question", attachments='[{"key": "img_1"}]')
    for step in ROUTES[state]:
        STEPS[step](store, message_id)
    assert store.message(message_id).state is state


def populate(store: Store, chat_id: str) -> None:
    """One of everything the store keeps for a chat."""
    store.ensure_chat(chat_id, f"name of {chat_id}")
    store.set_container(chat_id, f"orchestrator-{chat_id}", f"id-{chat_id}")
    store.set_session(chat_id, f"session-{chat_id}")
    store.set_session(chat_id, f"topic-session-{chat_id}", "omt_1")
    store.touch(chat_id)
    store.record_refusal(chat_id)
    for state in (State.RECEIVED, State.QUEUED, State.RUNNING, State.ANSWERED):
        in_state(store, f"{chat_id}-{state}", state, chat_id)
    store.record_received(f"{chat_id}-files", chat_id, "ou_1", "", attachments='[{"key": "img_2"}]')
    store.say(chat_id, "a notice")
    store.open_usage(chat_id, "ou_1", f"{chat_id}-running", "claude-x", input_tokens=1, output_tokens=1,
                     cache_write_tokens=0, cache_read_tokens=0, cost_nano=10)
    for number, key in enumerate((f"ask-{chat_id}", f"always-{chat_id}"), 1):
        store.open_approval(key, chat_id, f"{chat_id}-running", f"turn-{chat_id}", number, f"Tool{number}", "{}",
                            "ou_1", 1.0, 2.0)
    store.decide(f"always-{chat_id}", "allowed", "ou_1", 1.5, always=True)


def rows(store: Store) -> dict[tuple[str, int], dict[str, object]]:
    """Every row of every table, by table and rowid."""
    found = {}
    for (table,) in store.db.execute_sql("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
        cursor = store.db.execute_sql(f"SELECT rowid AS row_key, * FROM {table}")
        columns = [column[0] for column in cursor.description]
        assert "chat_id" in columns, f"{table} has no chat_id: say here how this test tells whose its rows are"
        for values in cursor.fetchall():
            row = dict(zip(columns, values, strict=True))
            found[(table, row.pop("row_key"))] = row
    return found


def changed_chats(before: dict[tuple[str, int], dict[str, object]],
                  after: dict[tuple[str, int], dict[str, object]]) -> set[object]:
    """The chats of the rows a write added, changed or removed."""
    return {(after.get(key) or before[key])["chat_id"] for key in before.keys() | after.keys()
            if before.get(key) != after.get(key)}


def answer_item(store: Store, chat_id: str = A) -> OutboxRecord:
    [item] = [i for i in store.outbox(chat_id) if i.message_id == f"{chat_id}-answered"]
    return item


WRITES: dict[str, Callable[[Store], object]] = {
    "ensure_chat": lambda s: s.ensure_chat(A, "renamed"),
    "set_container": lambda s: s.set_container(A, "orchestrator-new", "id-new"),
    "set_session": lambda s: s.set_session(A, "session-new"),
    "set_session of a topic": lambda s: s.set_session(A, "topic-session-new", "omt_1"),
    "set_session of a new topic": lambda s: s.set_session(A, "topic-session-2", "omt_2"),
    "forget_sessions": lambda s: s.forget_sessions(A),
    "touch": lambda s: s.touch(A),
    "record_refusal": lambda s: s.record_refusal(A),
    "record_received": lambda s: s.record_received("om_new", A, "ou_1", "new"),
    "set_display": lambda s: s.set_display(f"{A}-running", '{"card": "om_card"}'),
    "mark_queued": lambda s: s.mark_queued(f"{A}-received"),
    "mark_queued again": lambda s: s.mark_queued(f"{A}-running", "a fresh session"),
    "mark_running": lambda s: s.mark_running(f"{A}-queued", "turn-2"),
    "start_turn": lambda s: s.start_turn(f"{A}-running", "turn-3"),
    "answer": lambda s: s.answer(f"{A}-running", "done", 0.5, 5, card="om_card"),
    "answer_without_turn": lambda s: s.answer_without_turn(f"{A}-received", "a command's reply"),
    "fail": lambda s: s.fail(f"{A}-queued", "it broke", "it broke, sorry"),
    "fail_unanswered": lambda s: s.fail_unanswered(f"{A}-running", "unexpected", "something went wrong"),
    "merge": lambda s: s.merge(f"{A}-received", '[{"key": "both"}]', [f"{A}-files"]),
    "say": lambda s: s.say(A, "notice"),
    "mark_sent": lambda s: s.mark_sent(answer_item(s)),
    "set_uploaded": lambda s: s.set_uploaded(answer_item(s), "file_v3_upload"),
    "mark_retry": lambda s: s.mark_retry(answer_item(s), "429", 5.0),
    "mark_dead": lambda s: s.mark_dead(answer_item(s), "bot removed", notice="could not deliver"),
    "open_usage": lambda s: s.open_usage(A, "ou_1", None, "claude-x", input_tokens=2, output_tokens=2,
                                         cache_write_tokens=0, cache_read_tokens=0, cost_nano=20),
    "update_usage": lambda s: s.update_usage(s.usage(A)[0].id, input_tokens=5, output_tokens=6, cache_write_tokens=7,
                                             cache_read_tokens=8, cost_nano=99, complete=True),
    "drop_usage": lambda s: s.drop_usage(s.usage(A)[0].id),
    "open_approval": lambda s: s.open_approval(f"new-{A}", A, f"{A}-running", f"turn-{A}", 3, "Edit", "{}", "ou_1",
                                               3.0, 4.0),
    "decide": lambda s: s.decide(f"ask-{A}", "denied", "ou_2", 3.0, reason="no"),
    "decide always": lambda s: s.decide(f"ask-{A}", "allowed", "ou_2", 3.0, always=True),
    "note_answers": lambda s: s.note_answers(f"ask-{A}", '{"q": "a"}'),
    "set_approval_card": lambda s: s.set_approval_card(f"ask-{A}", "om_approval_card"),
    "set_approval_shown": lambda s: s.set_approval_shown(f"ask-{A}", "allowed"),
    "set_approval_answered": lambda s: s.set_approval_answered(f"ask-{A}"),
    "reset_always_allowed": lambda s: s.reset_always_allowed(A),
}


@pytest.mark.parametrize("write", list(WRITES))
def test_a_write_for_one_chat_changes_nothing_of_another_chat(store: Store, ticking: None, write: str) -> None:
    """One chat's /new must not wipe every chat's session, nor one delivery mark every chat's answers sent: each
    write is made for chat A, with chat B holding one of everything, and B's rows must come out as they were."""
    populate(store, A)
    populate(store, B)
    before = rows(store)
    WRITES[write](store)
    assert changed_chats(before, rows(store)) == {A}  # A's did change: the write is not a no-op here


# ---- every move through the store, from every state ----

MOVES, FALSE, RAISES = "moves", "returns False", "raises"
# What each write does to a message in each state: (the state it moves to, outcomes by state, the others' outcome).
OUTCOMES: dict[str, tuple[State, dict[State, str], str]] = {
    "mark_queued": (State.QUEUED, {State.RECEIVED: MOVES, State.RUNNING: MOVES}, RAISES),
    "mark_running": (State.RUNNING, {State.QUEUED: MOVES}, RAISES),
    "start_turn": (State.RUNNING, {State.QUEUED: MOVES, State.RUNNING: MOVES}, RAISES),
    "answer": (State.ANSWERED, {State.RUNNING: MOVES, State.FAILED: FALSE}, RAISES),
    "fail": (State.FAILED, {State.RECEIVED: MOVES, State.QUEUED: MOVES, State.RUNNING: MOVES, State.FAILED: FALSE},
             RAISES),
    "fail_unanswered": (State.FAILED, {State.RECEIVED: MOVES, State.QUEUED: MOVES, State.RUNNING: MOVES}, FALSE),
    "merged into another": (State.MERGED, {State.RECEIVED: MOVES}, RAISES),
    "takes another's files": (State.RECEIVED, {State.RECEIVED: MOVES}, RAISES),
}
ATTEMPTS: dict[str, Callable[[Store, str], object]] = {
    "mark_queued": lambda s, m: s.mark_queued(m),
    "mark_running": lambda s, m: s.mark_running(m, "turn-new"),
    "start_turn": lambda s, m: s.start_turn(m, "turn-new"),
    "answer": lambda s, m: s.answer(m, "the answer", None, None, card=None),
    "fail": lambda s, m: s.fail(m, "it broke", "it broke, sorry"),
    "fail_unanswered": lambda s, m: s.fail_unanswered(m, "unexpected", "something went wrong"),
    "merged into another": lambda s, m: s.merge("om_later", "[]", [m]),
    "takes another's files": lambda s, m: s.merge(m, '[{"key": "both"}]', ["om_later"]),
}


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("write", list(OUTCOMES))
def test_each_write_moves_a_message_only_from_the_states_that_allow_it(store: Store, ticking: None, write: str,
                                                                       state: State) -> None:
    """Failing must stay possible from every state before the answer (a crashed turn is always told); a refusal
    that means a bug raises and one the caller expects returns False, and either leaves every row as it was."""
    target, outcomes, others = OUTCOMES[write]
    expected = outcomes.get(state, others)
    in_state(store, "om_1", state)
    store.record_received("om_later", A, "ou_1", "", attachments='[{"key": "img_9"}]')
    before = rows(store)
    if expected == RAISES:
        with pytest.raises(TransitionRefused):
            ATTEMPTS[write](store, "om_1")
    else:
        assert (ATTEMPTS[write](store, "om_1") is False) == (expected == FALSE)
    if expected == MOVES:
        assert store.message("om_1").state is target
        assert rows(store) != before
    else:
        assert rows(store) == before


def test_only_an_undeliverable_answer_takes_an_answered_message_to_failed(store: Store) -> None:
    in_state(store, "om_1", State.ANSWERED)
    for attempt in (ATTEMPTS["fail"], ATTEMPTS["fail_unanswered"]):
        with contextlib.suppress(TransitionRefused):
            attempt(store, "om_1")
    assert store.message("om_1").state is State.ANSWERED
    [item] = store.due_outbox()
    store.mark_dead(item, "the chat is gone")
    assert store.message("om_1").state is State.FAILED


# ---- what each record holds, what each read selects, and in which order ----


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The store's clock, standing still until a test moves it: [now]."""
    now = [1_000.0]
    monkeypatch.setattr("orchestrator.store.time", SimpleNamespace(time=lambda: now[0]))
    return now


def test_every_move_of_a_message_stamps_its_update_time(store: Store, ticking: None) -> None:
    """updated_at is when the message last changed: each move and merge sets it anew."""
    store.ensure_chat(A)
    received = store.record_received("om_1", A, "ou_1", "question")
    assert received is not None and received.updated_at == received.received_at
    stamps = [received.updated_at]
    for write in (lambda: store.mark_queued("om_1"), lambda: store.start_turn("om_1", "t1"),
                  lambda: store.start_turn("om_1", "t2"), lambda: store.answer("om_1", "done", None, None, card=None)):
        write()
        stamps.append(store.message("om_1").updated_at)
    store.record_received("om_2", A, "ou_1", "")
    store.record_received("om_3", A, "ou_1", "the text")
    before = store.message("om_3").updated_at
    assert store.merge("om_3", "[]", ["om_2"]).updated_at > before
    assert stamps == sorted(set(stamps))  # each later than the one before


def test_a_refusal_names_the_message_its_state_and_the_move_and_nothing_else(store: Store) -> None:
    store.ensure_chat(A)
    store.record_received("om_1", A, "ou_1", "hello")
    with pytest.raises(TransitionRefused) as refused:
        store.mark_running("om_1", "t1")
    assert str(refused.value) == "message om_1 is received: it may not become running"
    with pytest.raises(TransitionRefused) as unknown:
        store.mark_queued("om_9")
    assert str(unknown.value) == "message om_9 is not stored: it may not become queued"
    in_state(store, "om_2", State.ANSWERED)
    with pytest.raises(TransitionRefused) as late:
        store.start_turn("om_2", "turn-late")
    assert str(late.value) == "message om_2 is answered: it may not become running (turn turn-late not recorded)"


def test_records_hold_what_was_written(store: Store, ticking: None) -> None:
    store.ensure_chat(A)
    chat = store.chat(A)
    assert chat.name == "" and chat.last_activity is None  # no name given: none made up
    store.touch(A)
    touched = store.chat(A).last_activity
    assert touched is not None and touched > 1_000
    store.record_received("om_1", A, "ou_1", "question")
    store.set_display("om_1", '{"card": "om_card"}')
    assert store.message("om_1").display == '{"card": "om_card"}'
    first, second = store.say(A, "one"), store.say(A, "two")
    assert [item.key for item in store.outbox(A)] == [first.key, second.key]
    assert len(first.key) == 32 and first.key != second.key  # Feishu drops a repeat of a key: each is its own
    usage_id = store.open_usage(A, "ou_1", "om_1", "claude-x", input_tokens=1, output_tokens=2, cache_write_tokens=3,
                                cache_read_tokens=4, cost_nano=5, complete=True)
    [usage] = store.usage(A)
    assert (usage.id, usage.chat_id, usage.user_id, usage.message_id, usage.model) == \
        (usage_id, A, "ou_1", "om_1", "claude-x")
    assert (usage.input_tokens, usage.output_tokens, usage.cache_write_tokens, usage.cache_read_tokens,
            usage.cost_nano, usage.complete) == (1, 2, 3, 4, 5, True)


def test_a_decision_is_kept_with_who_when_and_why(store: Store) -> None:
    store.open_approval("k1", A, "om_1", "turn-a", 1, "Bash", "{}", "ou_1", 1.0, 9.0)
    store.open_approval("k2", B, "om_2", "turn-b", 1, "Edit", "{}", "ou_2", 1.0, 9.0)
    store.open_approval("k3", B, "om_2", "turn-b", 2, "Write", "{}", "ou_2", 1.0, 9.0)
    assert store.decide("k1", "allowed", "ou_1", 2.5)
    decided = store.approval("k1")
    assert decided is not None
    assert (decided.turn, decided.state, decided.decided_by, decided.decided_at, decided.reason, decided.always) == \
        ("turn-a", "allowed", "ou_1", 2.5, "", False)
    assert store.always_allowed(A) == []  # allowed once, not for good
    assert store.decide("k3", "allowed", None, 3.5, reason="r" * 3000, always=True)
    assert len(store.approval("k3").reason or "") == 2000
    assert store.always_allowed(B) == [AlwaysAllowed("Write", "", 3.5)]  # the tool of the approval decided
    with pytest.raises(ValueError, match=r"^'maybe' is not an approval's outcome$"):
        store.decide("k2", "maybe", "ou_2", 4.0)


def test_every_reply_is_threaded_under_the_message_it_answers(store: Store) -> None:
    store.ensure_chat(A)
    in_state(store, "om_1", State.RUNNING)
    image = OutFile("image", "plot.png", "/data/files/plot.png", 10)
    assert store.answer("om_1", "the answer", None, None, card="om_card", files=[(image, "the plot")])
    in_state(store, "om_2", State.QUEUED)
    assert store.fail("om_2", "it broke", "it broke, sorry", card="om_card_2")
    in_state(store, "om_3", State.RUNNING)
    assert store.fail_unanswered("om_3", "unexpected", "something went wrong")
    store.say(A, "a command's reply", reply_to="om_4")
    assert [(item.text, item.reply_to, item.card) for item in store.outbox(A)] == [
        ("the answer", "om_1", "om_card"), ("the plot", "om_1", None), ("it broke, sorry", "om_2", "om_card_2"),
        ("something went wrong", "om_3", None), ("a command's reply", "om_4", None)]


def test_an_undeliverable_item_keeps_its_error_and_its_notice_answers_the_same_message(store: Store) -> None:
    store.ensure_chat(A)
    in_state(store, "om_1", State.ANSWERED)
    store.mark_dead(answer_item_of(store, "om_1"), "bot removed", notice="could not deliver")
    dead, notice = store.outbox(A)
    assert (dead.state, dead.last_error) == ("dead", "bot removed")
    assert (notice.text, notice.reply_to, notice.state) == ("could not deliver", "om_1", "pending")


def answer_item_of(store: Store, message_id: str) -> OutboxRecord:
    [item] = [i for i in store.outbox(store.message(message_id).chat_id) if i.message_id == message_id]
    return item


def test_a_message_queued_again_keeps_why_until_another_reason_replaces_it(store: Store) -> None:
    store.ensure_chat(A)
    in_state(store, "om_1", State.RUNNING)
    store.mark_queued("om_1", "session s1 was not found; started a new one")
    assert store.message("om_1").error == "session s1 was not found; started a new one"
    store.mark_running("om_1", "t2")
    store.mark_queued("om_1")
    assert store.message("om_1").error == "session s1 was not found; started a new one"


def test_a_reply_without_a_turn_records_no_turn(store: Store) -> None:
    store.ensure_chat(A)
    store.record_received("om_1", A, "ou_1", "/status")
    store.answer_without_turn("om_1", "Container: none")
    assert not store.message("om_1").turn  # `orchestrator history` shows "turn -"; no turn folder is followed


def test_reads_for_one_chat_show_nothing_of_another(store: Store) -> None:
    populate(store, A)
    populate(store, B)
    assert {m.chat_id for m in store.messages(A)} == {A} and {m.chat_id for m in store.messages()} == {A, B}
    assert {i.chat_id for i in store.outbox(A)} == {A}
    assert {u.chat_id for u in store.usage(A)} == {A} and {u.chat_id for u in store.usage()} == {A, B}
    assert {a.chat_id for a in store.approvals(A)} == {A} and {a.chat_id for a in store.approvals()} == {A, B}
    assert store.always_allowed(A) == [AlwaysAllowed("Tool2", "ou_1", 1.5)]
    assert store.thread_sessions(A) == {"omt_1": f"topic-session-{A}"}
    found = store.find_chat(B)
    assert found is not None and found.chat_id == B
    assert store.find_chat("oc_unknown") is None


def test_lists_come_in_the_order_they_promise_whatever_order_the_engine_reads_in(store: Store) -> None:
    """SQLite happens to read rows in insertion order; PostgreSQL does not (an updated row moves to the end of its
    table's heap). Here each list's first row is updated last, and SQLite reads backwards where no order is asked."""
    if isinstance(store.db, SqliteDatabase):
        store.db.execute_sql("pragma reverse_unordered_selects = on")
    for chat_id in (B, "oc_c", A):
        store.ensure_chat(chat_id)
    for n in range(3):
        store.record_received(f"om_{n}", A, "ou_1", "question")
        store.say(A, f"notice {n}")
        store.open_usage(A, "ou_1", None, "claude-x", input_tokens=n, output_tokens=0, cache_write_tokens=0,
                         cache_read_tokens=0, cost_nano=n)
        store.open_approval(f"k{n}", A, "om_0", "turn", n, f"Tool{2 - n}", "{}", "ou_1", 1.0, 2.0)
        store.decide(f"k{n}", "allowed", "ou_1", 1.5, always=True)
    store.set_container(B, "orchestrator-b", "id-b")
    store.set_display("om_0", "{}")
    store.set_uploaded(store.outbox(A)[0], "file_v3_upload")
    store.update_usage(store.usage(A)[0].id, input_tokens=0, output_tokens=1, cache_write_tokens=0,
                       cache_read_tokens=0, cost_nano=0, complete=True)
    store.set_approval_shown("k0", "allowed")
    assert [c.chat_id for c in store.chats()] == [A, B, "oc_c"]
    assert [m.message_id for m in store.messages()] == [m.message_id for m in store.messages(A)] == \
        ["om_0", "om_1", "om_2"]
    assert [i.text for i in store.outbox(A)] == [i.text for i in store.due_outbox()] == \
        ["notice 0", "notice 1", "notice 2"]
    assert [u.input_tokens for u in store.usage()] == [u.input_tokens for u in store.usage(A)] == [0, 1, 2]
    assert [a.number for a in store.approvals()] == [a.number for a in store.approvals(A)] == [0, 1, 2]
    assert [a.tool for a in store.always_allowed(A)] == ["Tool0", "Tool1", "Tool2"]


def test_the_running_message_of_a_chat_is_its_latest(store: Store) -> None:
    store.ensure_chat(A)
    assert store.running_message(A) is None
    for message_id in ("om_1", "om_2"):
        in_state(store, message_id, State.RUNNING)
    running = store.running_message(A)
    assert running is not None and running.message_id == "om_2"


def test_an_item_whose_time_is_now_is_due(store: Store, clock: list[float]) -> None:
    store.say(A, "now")
    assert [i.text for i in store.due_outbox()] == ["now"]
    store.mark_retry(store.due_outbox()[0], "429", delay=5)
    clock[0] = 1_004.5
    assert store.due_outbox() == []
    clock[0] = 1_005.0
    assert [i.text for i in store.due_outbox()] == ["now"]


def test_spending_counts_the_requests_from_since_up_to_but_not_at_until(store: Store, clock: list[float]) -> None:
    for at, chat_id, cost in ((100.0, A, 1), (200.0, A, 10), (200.0, B, 20), (300.0, A, 100)):
        clock[0] = at
        store.open_usage(chat_id, "ou_1", None, "claude-x", input_tokens=0, output_tokens=0, cache_write_tokens=0,
                         cache_read_tokens=0, cost_nano=cost)
    assert store.spent(200.0) == 130
    assert store.spent(200.0, 300.0) == 30
    assert store.spent(200.0, 300.0, chat_id=A) == 10
    assert store.spent_by_chat(200.0) == {A: 110, B: 20}
