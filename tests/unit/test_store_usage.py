"""The store's usage records: written by the gateway as responses stream, summed for budgets, /cost and metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.states import State
from orchestrator.store import Store

NO_TOKENS = {"input_tokens": 0, "output_tokens": 0, "cache_write_tokens": 0, "cache_read_tokens": 0}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "data" / "orchestrator.db")
    yield store
    store.close()


def spend(store: Store, chat_id: str, user_id: str, nano: int, message_id: str | None = None) -> int:
    return store.open_usage(chat_id, user_id, message_id, "claude-x", **NO_TOKENS, cost_nano=nano, complete=True)


def test_a_row_opened_before_the_request_is_counted_and_then_completed(store: Store) -> None:
    row = store.open_usage("oc_a", "ou_1", "om_1", "claude-sonnet-4-5", input_tokens=100, output_tokens=1,
                           cache_write_tokens=20, cache_read_tokens=30, cost_nano=500)
    [opened] = store.usage("oc_a")
    assert (opened.id, opened.user_id, opened.message_id, opened.model, opened.input_tokens, opened.cost_nano,
            opened.complete) == (row, "ou_1", "om_1", "claude-sonnet-4-5", 100, 500, False)
    assert abs(opened.at - time.time()) < 60
    assert store.turn_spent("om_1") == 500  # counted while the response still streams
    store.update_usage(row, input_tokens=100, output_tokens=42, cache_write_tokens=20, cache_read_tokens=30,
                       cost_nano=900, complete=True)
    [done] = store.usage()
    assert (done.output_tokens, done.cost_nano, done.complete, done.at) == (42, 900, True, opened.at)


def test_a_reservation_the_api_never_had_is_dropped(store: Store) -> None:
    kept = spend(store, "oc_a", "ou_1", 100)
    dropped = spend(store, "oc_a", "ou_1", 7000)
    assert store.spent(0, chat_id="oc_a") == 7100  # in flight: counted
    store.drop_usage(dropped)
    assert [row.id for row in store.usage()] == [kept] and store.spent(0) == 100


def test_sums_by_window_chat_and_user(store: Store) -> None:
    spend(store, "oc_a", "ou_1", 100, "om_1")
    spend(store, "oc_a", "ou_2", 20, "om_2")
    spend(store, "oc_b", "ou_1", 3, "om_3")
    spend(store, "oc_b", "", 4)  # a request while no message of the chat ran
    now = time.time()
    assert store.spent(now - 60) == 127
    assert store.spent(now - 60, chat_id="oc_a") == 120
    assert store.spent(now - 60, user_id="ou_1") == 103
    assert store.spent(now - 60, chat_id="oc_b", user_id="ou_1") == 3
    assert store.spent(now + 60) == 0  # nothing started since
    assert store.spent(now - 60, until=now - 30) == 0
    assert store.spent(now - 60, chat_id="oc_none") == 0
    assert store.turn_spent("om_1") == 100 and store.turn_spent("om_none") == 0
    assert store.spent_by_chat(now - 60) == {"oc_a": 120, "oc_b": 7}
    assert store.spent_by_chat(now + 60) == {}


def test_the_running_message_is_the_one_to_bill(store: Store) -> None:
    assert store.running_message("oc_a") is None
    store.record_received("om_1", "oc_a", "ou_1", "first")
    store.record_received("om_2", "oc_b", "ou_2", "other chat")
    store.mark_queued("om_1")
    assert store.running_message("oc_a") is None  # queued: no turn runs yet
    store.mark_running("om_1", "1-1")
    store.mark_queued("om_2")
    store.mark_running("om_2", "1-1")
    running = store.running_message("oc_a")
    assert running is not None and (running.message_id, running.sender_id) == ("om_1", "ou_1")
    assert store.answer("om_1", "done", None, None, card=None)
    assert store.running_message("oc_a") is None
    assert store.message("om_1").state is State.ANSWERED


def test_the_usage_table_joins_an_existing_database(tmp_path: Path) -> None:
    """A store made before the usage table existed gets it on the next start, its other tables kept."""
    path = tmp_path / "orchestrator.db"
    old = Store(path)
    old.ensure_chat("oc_a")
    old.db.execute_sql("DROP TABLE usage")
    old.close()
    store = Store(path)
    try:
        assert store.find_chat("oc_a") is not None
        spend(store, "oc_a", "ou_1", 5)
        assert store.spent(0) == 5
    finally:
        store.close()
