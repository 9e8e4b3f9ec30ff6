from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from orchestrator.states import State
from orchestrator.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "data" / "orchestrator.db")
    yield store
    store.close()


def test_wal_mode_and_busy_timeout(store: Store) -> None:
    assert store.db.execute_sql("pragma journal_mode").fetchone()[0] == "wal"
    assert store.db.execute_sql("pragma busy_timeout").fetchone()[0] == 10_000


def test_a_message_id_is_recorded_once(store: Store) -> None:
    store.ensure_chat("oc_a")
    first = store.record_received("om_1", "oc_a", "ou_1", "hello")
    assert first is not None and first.state is State.RECEIVED
    assert store.record_received("om_1", "oc_a", "ou_1", "hello") is None
    assert len(store.messages("oc_a")) == 1


def test_transitions_happen_once_and_in_order(store: Store) -> None:
    store.record_received("om_1", "oc_a", "ou_1", "hello")
    assert not store.mark_running("om_1", "1-1")  # not queued yet
    assert store.mark_queued("om_1")
    assert store.mark_running("om_1", "1-1")
    assert store.mark_answered("om_1", "hi there", 0.01, 120)
    assert not store.mark_answered("om_1", "a second answer", None, None)
    assert not store.mark_failed("om_1", "too late")
    assert store.mark_delivered("om_1")
    message = store.message("om_1")
    assert (message.state, message.answer, message.turn, message.error) == (State.DELIVERED, "hi there", "1-1", None)
    assert store.unfinished_messages() == []


def test_unfinished_messages_in_arrival_order(store: Store) -> None:
    for n in range(4):
        store.record_received(f"om_{n}", "oc_a", "ou_1", f"m{n}")
    store.mark_queued("om_1")
    store.mark_queued("om_2")
    store.mark_failed("om_2", "nope")
    assert [m.message_id for m in store.unfinished_messages()] == ["om_0", "om_1", "om_3"]


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
