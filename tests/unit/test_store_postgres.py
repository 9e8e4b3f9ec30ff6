"""The store on PostgreSQL (a real server of the session's own: tests/postgres.py) and what both backends share:
the store's behaviours (test_store.py's bodies, run here on PostgreSQL), the values it gives back, migrations from an
older schema, `orchestrator migrate`, the store URL in the config, and a PostgreSQL server that goes away in the
middle of the work: refused for now, tried again once it is back, nothing lost or stored twice."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest
from peewee import QueryEvent

from orchestrator import cli, delivery, leadership, service, supervise
from orchestrator.agent import Answer
from orchestrator.channels import Incoming
from orchestrator.config import ConfigError, Settings, load_settings, url_secrets
from orchestrator.gateway import read_settings, write_settings
from orchestrator.leadership import Leadership
from orchestrator.states import State
from orchestrator.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Store,
    StoreError,
    migrate_store,
    public_url,
    refused_for_now,
)
from tests.harness import wait_until
from tests.postgres import PASSWORD, PostgresServer
from tests.unit import test_store, test_store_usage
from tests.unit.test_service_resilience import Chat, handle, make_service

# ---- fixtures ----

ticking = test_store.ticking  # the store's clock moves on at every reading


@pytest.fixture(scope="module")
def migrated(postgres_server: PostgresServer) -> Iterator[str]:
    """A migrated database for this module's stores, emptied for each test (TRUNCATE takes 5 ms here; a database of
    each test's own, 100 ms)."""
    name = f"store_{uuid.uuid4().hex[:8]}"
    postgres_server.create_database(name)
    migrate_store(postgres_server.url(name))
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


@pytest.fixture
def store(migrated: str) -> Iterator[Store]:
    """A store on PostgreSQL, empty, its ids starting at 1."""
    store = Store(migrated)
    tables = ", ".join(f'"{table}"' for table in store.db.get_tables() if table != "schema_version")
    store.db.execute_sql(f"TRUNCATE {tables} RESTART IDENTITY")
    yield store
    store.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a store that does not exist yet: a SQLite file, or an empty PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'orchestrator.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def any_store(empty_url: str) -> Iterator[Store]:
    migrate_store(empty_url)
    store = Store(empty_url)
    yield store
    store.close()


@pytest.fixture
def restarted(postgres_server: PostgresServer) -> Iterator[PostgresServer]:
    """The server, which the test stops; running again afterwards whatever became of the test."""
    yield postgres_server
    with contextlib.suppress(RuntimeError):  # already running
        postgres_server.start()


# ---- test_store.py's behaviours on PostgreSQL ----

SHARED: list[Callable[[Store], None]] = [
    test_store.test_a_message_id_is_recorded_once,
    test_store.test_a_chat_is_stored_once_and_keeps_its_latest_name,
    test_store.test_transitions_happen_once_and_in_order,
    test_store.test_a_refused_transition_that_means_a_bug_raises_and_changes_nothing,
    test_store.test_a_turn_that_ends_after_a_shutdown_failed_its_message_is_dropped_quietly,
    test_store.test_an_item_marked_twice_delivers_its_message_once,
    test_store.test_unfinished_messages_in_arrival_order,
    test_store.test_the_last_turn_is_the_latest_message_that_reported_its_duration,
    test_store.test_an_answer_is_queued_for_delivery_with_it_and_delivered_once,
    test_store.test_a_failure_is_told_to_the_user,
    test_store.test_a_chat_waits_for_its_earlier_items_while_other_chats_go_on,
    test_store.test_an_undeliverable_answer_fails_its_message,
    test_store.test_a_chat_is_refused_once,
    test_store.test_an_unexpected_failure_never_takes_back_a_stored_answer,
    test_store.test_topics_keep_their_own_sessions_and_reset_forgets_them_all,
    test_store.test_files_sent_without_text_are_merged_into_the_next_message_at_once_or_not_at_all,
    test_store.test_only_an_undeliverable_answer_takes_an_answered_message_to_failed,
    test_store_usage.test_a_row_opened_before_the_request_is_counted_and_then_completed,
    test_store_usage.test_a_reservation_the_api_never_had_is_dropped,
    test_store_usage.test_sums_by_window_chat_and_user,
    test_store_usage.test_the_running_message_is_the_one_to_bill,
]


@pytest.mark.parametrize("body", SHARED, ids=lambda body: body.__name__.removeprefix("test_"))
def test_the_store_behaves_on_postgres_as_on_sqlite(store: Store, body: Callable[[Store], None]) -> None:
    body(store)


def rows(store: Store) -> dict[tuple[str, tuple[object, ...]], dict[str, object]]:
    """test_store.rows on either backend: every row of every table of the store's data, keyed by its table and
    values (PostgreSQL has no rowid; each table's key is among its columns). A changed row is one gone and one new,
    both of its chat."""
    found = {}
    for table in store.db.get_tables():
        if table == "schema_version":
            continue
        cursor = store.db.execute_sql(f'SELECT * FROM "{table}"')
        columns = [column[0] for column in cursor.description]
        assert "chat_id" in columns, f"{table} has no chat_id: say here how this test tells whose its rows are"
        for values in cursor.fetchall():
            found[(table, tuple(values))] = dict(zip(columns, values, strict=True))
    return found


@pytest.mark.parametrize("write", list(test_store.WRITES))
def test_a_write_for_one_chat_changes_nothing_of_another_chat(store: Store, ticking: None, write: str) -> None:
    test_store.populate(store, test_store.A)
    test_store.populate(store, test_store.B)
    before = rows(store)
    test_store.WRITES[write](store)
    assert test_store.changed_chats(before, rows(store)) == {test_store.A}


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("write", list(test_store.OUTCOMES))
def test_each_write_moves_a_message_only_from_the_states_that_allow_it(store: Store, ticking: None, write: str,
                                                                       state: State) -> None:
    target, outcomes, others = test_store.OUTCOMES[write]
    expected = outcomes.get(state, others)
    test_store.in_state(store, "om_1", state)
    store.record_received("om_later", test_store.A, "ou_1", "", attachments='[{"key": "img_9"}]')
    before = rows(store)
    if expected == test_store.RAISES:
        with pytest.raises(test_store.TransitionRefused):
            test_store.ATTEMPTS[write](store, "om_1")
    else:
        assert (test_store.ATTEMPTS[write](store, "om_1") is False) == (expected == test_store.FALSE)
    assert (rows(store) != before) == (expected == test_store.MOVES)
    if expected == test_store.MOVES:
        assert store.message("om_1").state is target


# ---- values come back as SQLite gives them ----


def test_times_and_amounts_come_back_whole(any_store: Store) -> None:
    """PostgreSQL's REAL and INTEGER are 4 bytes: a timestamp there was off by up to a minute, and a request past
    2.15 USD (2**31 nano-USD) refused. Sums are ints on both (PostgreSQL's SUM of a BIGINT is a NUMERIC)."""
    any_store.record_received("om_1", "oc_a", "ou_1", "hello")
    stored = any_store.message("om_1")
    assert abs(stored.received_at - time.time()) < 5 and stored.received_at == any_store.message("om_1").updated_at
    nano = 7 * 10**9  # a 7 USD request
    row = any_store.open_usage("oc_a", "ou_1", "om_1", "claude-opus-4", input_tokens=3 * 10**9, output_tokens=1,
                               cache_write_tokens=0, cache_read_tokens=0, cost_nano=nano, complete=True)
    any_store.open_usage("oc_a", "ou_1", "om_1", "claude-opus-4", input_tokens=1, output_tokens=1,
                         cache_write_tokens=0, cache_read_tokens=0, cost_nano=nano)
    [first, _] = any_store.usage("oc_a")
    assert (first.id, first.input_tokens, first.cost_nano) == (row, 3 * 10**9, nano)
    sums = (any_store.spent(0), any_store.turn_spent("om_1"), any_store.spent_by_chat(0)["oc_a"])
    assert sums == (2 * nano,) * 3 and all(type(total) is int for total in sums)


def test_a_timestamp_is_kept_to_the_microsecond(any_store: Store) -> None:
    any_store.ensure_chat("oc_a")
    any_store.touch("oc_a")
    touched = any_store.chat("oc_a").last_activity
    assert touched is not None and touched == pytest.approx(time.time(), abs=5)
    assert touched != round(touched)  # a 4-byte float holds no fraction of a second at today's times
    assert any_store.chat("oc_a").last_activity == touched


def test_strings_of_any_length_are_stored(any_store: Store) -> None:
    """A chat's name comes from Feishu, a tool's name from the agent: PostgreSQL would refuse a VARCHAR(255) past
    its length, and with it the message's whole write (never acked, redelivered, refused again)."""
    name = "n" * 1000
    any_store.ensure_chat("oc_a", name)
    assert any_store.chat("oc_a").name == name
    message = any_store.record_received("om_" + "1" * 300, "oc_a", "ou_" + "u" * 300, "hi", "omt_" + "t" * 300)
    assert message is not None and any_store.message("om_" + "1" * 300).sender_id == "ou_" + "u" * 300


def test_text_with_a_nul_is_stored(store: Store) -> None:
    """An agent's answer may hold NUL, which PostgreSQL's text cannot: U+FFFD in its place, not a failed write."""
    test_store.answered(store, "om_1", text="before\0after")
    assert store.message("om_1").answer == "before\ufffdafter"
    assert [item.text for item in store.outbox("oc_a")] == ["before\ufffdafter"]


# ---- migrations ----

# The messages table as issue 11 left it (no thread_id, no attachments) and chats before they had a name; the other
# tables did not exist. {key} and {real} are each database's words.
OLD_TABLES = (
    "CREATE TABLE messages (id {key}, message_id VARCHAR(255) NOT NULL UNIQUE, chat_id VARCHAR(255) NOT NULL, "
    "sender_id VARCHAR(255) NOT NULL, text TEXT NOT NULL, state VARCHAR(255) NOT NULL, turn VARCHAR(255), "
    "display TEXT, error TEXT, answer TEXT, cost_usd {real}, duration_ms INTEGER, received_at {real} NOT NULL, "
    "updated_at {real} NOT NULL)",
    "CREATE TABLE chats (chat_id VARCHAR(255) NOT NULL PRIMARY KEY, container_name VARCHAR(255) NOT NULL, "
    "container_id VARCHAR(255) NOT NULL, session_id VARCHAR(255), last_activity {real}, created_at {real} NOT NULL)",
    "INSERT INTO messages (message_id, chat_id, sender_id, text, state, received_at, updated_at) "
    "VALUES ('om_old', 'oc_1', 'ou_1', 'from before', 'delivered', 1.5, 1.5)",
    "INSERT INTO chats (chat_id, container_name, container_id, session_id, created_at) "
    "VALUES ('oc_1', 'orchestrator-oc_1', 'abc', 'sess-old', 1.5)",
)


def make_old_store(url: str) -> None:
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True)
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            for statement in OLD_TABLES:
                db.execute(statement.format(key="INTEGER PRIMARY KEY", real="REAL"))
        return
    with contextlib.closing(psycopg2.connect(url)) as db, db, db.cursor() as cursor:
        for statement in OLD_TABLES:
            cursor.execute(statement.format(key="SERIAL PRIMARY KEY", real="DOUBLE PRECISION"))


def schema(store: Store) -> dict[str, list[tuple[str, str, bool]]]:
    return {table: [(c.name, c.data_type.lower(), c.null) for c in store.db.get_columns(table)]
            for table in store.db.get_tables()}


def recorded_version(store: Store) -> object:
    if store.path is not None:
        return store.db.pragma("user_version")
    return store.db.execute_sql("SELECT version, name FROM schema_version ORDER BY version").fetchall()


def test_an_older_schema_is_migrated_with_its_data_and_migrating_again_changes_nothing(empty_url: str) -> None:
    make_old_store(empty_url)
    if not empty_url.startswith("sqlite:"):  # a shared PostgreSQL store is migrated only when an operator says so
        with pytest.raises(StoreError, match=r"schema version 0, .* needs 1: run `orchestrator migrate` first"):
            Store(empty_url)
    assert migrate_store(empty_url) == list(MIGRATIONS)
    store = Store(empty_url)
    try:
        old = store.message("om_old")
        assert (old.text, old.state, old.received_at, old.thread_id, old.attachments) == \
            ("from before", State.DELIVERED, 1.5, "", "")
        chat = store.chat("oc_1")
        assert (chat.name, chat.session_id, chat.container_name) == ("", "sess-old", "orchestrator-oc_1")
        store.ensure_chat("oc_1", "Team")  # the new columns and tables take writes
        store.record_received("om_new", "oc_1", "ou_1", "in a topic", "omt_a", attachments='[{"key": "f"}]')
        store.set_session("oc_1", "s-topic", "omt_a")
        test_store_usage.spend(store, "oc_1", "ou_1", 5)
        assert (store.chat("oc_1").name, store.message("om_new").thread_id, store.session("oc_1", "omt_a"),
                store.spent(0)) == ("Team", "omt_a", "s-topic", 5)
        migrated = schema(store)
        version = recorded_version(store)
    finally:
        store.close()
    assert version == (SCHEMA_VERSION if empty_url.startswith("sqlite:") else
                       [(migration.version, migration.name) for migration in MIGRATIONS])
    assert migrate_store(empty_url) == []
    store = Store(empty_url)
    try:
        assert schema(store) == migrated and recorded_version(store) == version
        assert [m.message_id for m in store.messages()] == ["om_old", "om_new"]
    finally:
        store.close()


def test_a_new_store_gets_every_table_of_the_models(empty_url: str) -> None:
    assert [migration.version for migration in migrate_store(empty_url)] == [1]
    store = Store(empty_url)
    try:
        assert set(store.db.get_tables()) - {"schema_version"} == {
            "chats", "messages", "outbox", "thread_sessions", "refusals", "usage", "approvals", "always_allowed"}
        test_store.populate(store, "oc_a")  # a write of each kind
    finally:
        store.close()


@pytest.mark.postgres
def test_two_migrators_at_once_migrate_once(postgres_url: str) -> None:
    """Two instances started (or `orchestrator migrate` run) together: the advisory lock lets one migrate and the
    other find nothing to do; without it both would make the tables and record the version."""
    start = threading.Barrier(2)
    results: list[list[int]] = []

    def migrator() -> None:
        start.wait()
        results.append([migration.version for migration in migrate_store(postgres_url)])

    threads = [threading.Thread(target=migrator) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results) == [[], [1]]
    store = Store(postgres_url)
    try:
        assert recorded_version(store) == [(1, MIGRATIONS[0].name)]
    finally:
        store.close()


# ---- orchestrator migrate ----


def write_config(tmp_path: Path, url: str | None) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\n" + (f"store: {{url: '{url}'}}\n" if url else ""))
    return config


def test_orchestrator_migrate_prints_what_it_applied(empty_url: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    postgres = not empty_url.startswith("sqlite:")
    if postgres:  # the password from the environment, as an operator gives it
        monkeypatch.setenv("STORE_PASSWORD", PASSWORD)
        config = write_config(tmp_path, empty_url.replace(f":{PASSWORD}@", ":${STORE_PASSWORD}@"))
        assert cli.main(["logs", "oc_a", "--config", str(config)]) == 1
        assert "run `orchestrator migrate` first" in capsys.readouterr().err
    else:
        config = write_config(tmp_path, None)  # the default: data_dir/orchestrator.db
    assert cli.main(["migrate", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert printed == f"{public_url(empty_url)}: applied migration 1: {MIGRATIONS[0].name}\n"
    assert cli.main(["migrate", "--config", str(config)]) == 0
    assert capsys.readouterr().out == f"{public_url(empty_url)}: up to date (schema version 1), nothing to apply\n"
    assert cli.main(["logs", "oc_a", "--config", str(config)]) == 1  # the store answers: the chat is not known
    assert "chat oc_a is not known" in capsys.readouterr().err
    assert PASSWORD not in printed


def test_orchestrator_migrate_says_when_it_cannot_reach_the_server(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with socket_nobody_listens_on() as port:
        config = write_config(tmp_path, f"postgresql://orchestrator:secret-pw@127.0.0.1:{port}/orchestrator")
        assert cli.main(["migrate", "--config", str(config)]) == 1
    error = capsys.readouterr().err
    assert f"error: cannot migrate the store postgresql://orchestrator@127.0.0.1:{port}/orchestrator: " in error
    assert "Connection refused" in error  # the driver's reason, not only where
    assert "secret-pw" not in error


def test_a_server_that_takes_the_connection_and_never_answers_is_given_up_on_within_seconds() -> None:
    """A host that accepts TCP and then says nothing (a firewall's black hole, a wedged proxy): the connect timeout
    bounds the wait, where libpq would wait for ever with the service's event loop."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        began = time.monotonic()
        with pytest.raises(StoreError, match="timeout expired"):
            migrate_store(f"postgresql://u:pw@127.0.0.1:{silent.getsockname()[1]}/orchestrator")
        assert time.monotonic() - began < 10


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://u:p@ss@h/db", "postgresql://u@h/db"),  # an unencoded @ in the password (the config takes it)
    ("postgresql://u:pa:ss@h/db", "postgresql://u@h/db"),  # an unencoded :
    ("postgresql://u:pw@h:5433/db?sslmode=require", "postgresql://u@h:5433/db?sslmode=require"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),
])
def test_a_printed_store_url_holds_no_part_of_the_password(url: str, shown: str) -> None:
    assert public_url(url) == shown


def test_a_sqlite_store_is_made_in_folders_that_do_not_exist_yet_and_commits_without_fsync(tmp_path: Path) -> None:
    store = Store(tmp_path / "a" / "b" / "orchestrator.db")
    try:
        assert store.db.pragma("synchronous") == 1  # NORMAL: see _sqlite
        assert store.db.pragma("journal_mode") == "wal"
    finally:
        store.close()


def test_an_up_to_date_sqlite_store_opens_while_another_process_holds_its_write_lock(tmp_path: Path) -> None:
    """`orchestrator status` beside a running service that writes: opening reads the version and takes no lock."""
    path = tmp_path / "orchestrator.db"
    Store(path).close()
    with contextlib.closing(sqlite3.connect(path)) as other:
        other.execute("BEGIN IMMEDIATE")
        began = time.monotonic()
        store = Store(path)
        assert time.monotonic() - began < 1 and store.chats() == []
        store.close()


@contextlib.contextmanager
def socket_nobody_listens_on() -> Iterator[int]:
    """A port of 127.0.0.1 that refuses connections, held (bound, not listening) for the test's time."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


# ---- the store URL in the config ----


def test_the_store_is_sqlite_in_data_dir_by_default(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, None), {})
    assert settings.store.url == f"sqlite:///{tmp_path / 'data' / 'orchestrator.db'}" == \
        Settings(source=tmp_path / "c.yaml", data_dir=tmp_path / "data").store.url
    assert settings.store.sqlite_file == settings.db_path
    relative = tmp_path / "relative.yaml"
    relative.write_text("data_dir: ./data\nstore: {url: 'sqlite:///./data/state.db'}\n")
    assert load_settings(relative, {}).store.url == f"sqlite:///{tmp_path / 'data' / 'state.db'}"


IN_USER_INFO = re.escape("give the password as postgresql://user:${VAR}@host/dbname, not as a password= or ")


@pytest.mark.parametrize(("url", "problem"), [
    ("sqlite:////srv/elsewhere/orchestrator.db", "a SQLite store must be a .db file directly in data_dir"),
    ("sqlite:///./data/chats/oc_a.db", "a SQLite store must be a .db file directly in data_dir"),
    ("sqlite:///./data/secret", "a SQLite store must be a .db file directly in data_dir"),
    ("mysql://u:p@db/orchestrator", "must be sqlite:///FILE or postgresql://user:password@host:port/dbname"),
    ("postgresql://u:p@db", "must be sqlite:///FILE or postgresql://"),
    ("postgresql:///orchestrator", "must be sqlite:///FILE or postgresql://"),
    ("postgresql://u:p@db:99999/orchestrator", "must be sqlite:///FILE or postgresql://"),
    ("postgresql://u:p@db/a/b", "must be sqlite:///FILE or postgresql://"),
    ("postgresql://u:p@db:0/orchestrator", "must be sqlite:///FILE or postgresql://"),
    ("postgresql://u:p@db//x", "must be sqlite:///FILE or postgresql://"),
    ("postgresql://u@db/orchestrator?sslmode=require&password=hunter2", IN_USER_INFO),
    ("postgresql://u@db/orchestrator?sslpassword=hunter2", IN_USER_INFO),
])
def test_a_store_url_that_cannot_be_is_an_error_naming_the_key(tmp_path: Path, url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=f"config.yaml: store.url: {problem}"):
        load_settings(write_config(tmp_path, url), {})


@pytest.mark.parametrize(("store", "problem"), [
    ("{url: true}", "store.url: True must be a string"),
    ("{uri: x}", "store.uri: unknown key"),
])
def test_a_store_section_that_cannot_be_names_its_key(tmp_path: Path, store: str, problem: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\nstore: {store}\n")
    with pytest.raises(ConfigError, match=f"config.yaml: {re.escape(problem)}"):
        load_settings(config, {})


def test_a_one_letter_database_name_is_a_database_name(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, "postgresql://u:pw@db:1/x"), {})
    assert settings.store.url == "postgresql://u:pw@db:1/x"


def test_the_stores_password_is_a_secret_and_the_gateway_gets_the_url(tmp_path: Path) -> None:
    config = write_config(tmp_path, "postgresql://orch:${DB_PASSWORD}@db.internal:5432/orchestrator?sslmode=require")
    settings = load_settings(config, {"DB_PASSWORD": "p%40ss-w0rd"})
    assert settings.store.url == "postgresql://orch:p%40ss-w0rd@db.internal:5432/orchestrator?sslmode=require"
    assert settings.store.sqlite_file is None
    assert {"p%40ss-w0rd", "p@ss-w0rd"} <= set(settings.secrets)
    assert url_secrets(f"sqlite:///{tmp_path}/x:y@z.db") == []
    assert public_url(settings.store.url) == "postgresql://orch@db.internal:5432/orchestrator?sslmode=require"
    (tmp_path / "data").mkdir()
    assert read_settings(write_settings(settings)).store_url == settings.store.url


# ---- the server goes away ----


def outbox_texts(store: Store, chat_id: str = "oc_a") -> list[str]:
    return [item.text for item in store.outbox(chat_id)]


@pytest.mark.postgres
def test_a_write_while_the_server_is_down_is_refused_for_now_and_goes_through_once_it_is_back(
        store: Store, restarted: PostgresServer) -> None:
    store.ensure_chat("oc_a")
    store.record_received("om_1", "oc_a", "ou_1", "before")
    assert store.writable() is None
    restarted.stop()  # every connection ended, as an operator's restart or a failover does
    for attempt in (lambda: store.record_received("om_2", "oc_a", "ou_1", "during"), lambda: store.messages()):
        with pytest.raises(Exception) as refused:
            attempt()
        assert refused_for_now(refused.value), refused.value
    assert "the store cannot be written: connection to server" in (store.writable() or "")
    restarted.start()
    assert store.record_received("om_2", "oc_a", "ou_1", "during") is not None  # on a new connection
    assert store.record_received("om_2", "oc_a", "ou_1", "during") is None  # a redelivery: stored once
    assert [(m.message_id, m.text) for m in store.messages()] == [("om_1", "before"), ("om_2", "during")]
    assert store.writable() is None


@pytest.mark.postgres
def test_a_connection_the_server_closed_while_it_was_idle_is_replaced_before_it_is_used(
        store: Store, restarted: PostgresServer) -> None:
    """A restart of the server between two writes costs the next one nothing: not even one refusal."""
    store.ensure_chat("oc_a")
    restarted.stop()
    restarted.start()
    assert store.record_received("om_1", "oc_a", "ou_1", "after a restart") is not None
    assert [m.message_id for m in store.messages()] == ["om_1"]


@pytest.mark.postgres
def test_a_transaction_cut_off_by_the_server_going_away_leaves_nothing_and_is_done_once_when_tried_again(
        store: Store, restarted: PostgresServer) -> None:
    """The answer and its outbox item are one transaction: the server goes away after the message became answered
    and before the item was written. Nothing of it is kept, and trying again stores both, once."""
    store.ensure_chat("oc_a")
    store.record_received("om_1", "oc_a", "ou_1", "question")
    store.mark_queued("om_1")
    store.mark_running("om_1", "t1")

    def stop_after_the_answer(event: QueryEvent) -> None:
        if event.sql.startswith('UPDATE "messages"') and event.exception is None:
            store.db.query_hooks.remove(stop_after_the_answer)
            restarted.stop()

    store.db.query_hooks.append(stop_after_the_answer)
    with pytest.raises(Exception) as refused:
        store.answer("om_1", "the answer", 0.01, 100, card=None)
    assert refused_for_now(refused.value), refused.value
    assert stop_after_the_answer not in store.db.query_hooks  # it was cut off where meant
    restarted.start()
    assert (store.message("om_1").state, outbox_texts(store)) == (State.RUNNING, [])
    assert store.answer("om_1", "the answer", 0.01, 100, card=None)
    assert (store.message("om_1").state, outbox_texts(store)) == (State.ANSWERED, ["the answer"])


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backoffs of milliseconds, and a registry of loops of the test's own."""
    fresh = supervise.Liveness()
    for module in (service, delivery):
        monkeypatch.setattr(module, "LIVENESS", fresh)
    monkeypatch.setattr(supervise, "FIRST_DELAY", 0.01)


@pytest.mark.postgres
def test_a_message_is_acked_only_once_stored_and_stored_once_when_delivered_again(
        store: Store, restarted: PostgresServer, tmp_path: Path, quick_retries: None) -> None:
    """The channel acks Feishu when `submit` returns: while the server is down it raises (refused for now), so Feishu
    delivers the event again; once the server is back the message is stored, and a further redelivery is not."""
    svc = make_service(tmp_path, store, Chat())
    # a sticker: answered at once, in `submit` ("… messages are not supported yet"), with no turn
    incoming = Incoming(chat_id="oc_a", message_id="om_1", sender_id="ou_1", text="", kind="sticker", trusted=True)
    restarted.stop()
    with pytest.raises(Exception) as refused:
        asyncio.run(svc.submit(incoming))
    assert refused_for_now(refused.value), refused.value
    restarted.start()
    asyncio.run(svc.submit(incoming))
    asyncio.run(svc.submit(incoming))
    assert [(m.message_id, m.state) for m in store.messages()] == [("om_1", State.ANSWERED)]
    assert len(store.outbox("oc_a")) == 1


class OutageTurns:
    """The turn runner: the first time, the server goes away as the turn ends (back 0.4 s later), so the answer's
    write is refused; the next time, the message is running, and its turn is followed, not started again."""

    def __init__(self, store: Store, server: PostgresServer) -> None:
        self.store, self.server = store, server
        self.seen: list[State] = []
        self.restart = threading.Timer(0.4, server.start)

    async def run(self, message: object, display: object, log: object) -> Answer:
        self.seen.append(message.state)  # type: ignore[attr-defined]
        if message.state is State.QUEUED:  # type: ignore[attr-defined]
            self.store.start_turn(message.message_id, "t1")  # type: ignore[attr-defined]
            self.server.stop()
            self.restart.start()
        return Answer("the answer", "sess-1")


@pytest.mark.postgres
def test_an_answer_met_by_the_outage_is_stored_and_delivered_once_after_retries(
        store: Store, restarted: PostgresServer, tmp_path: Path, quick_retries: None) -> None:
    """The worker's retry (refused_for_now, backoff) over a store that reconnects: as with a locked SQLite."""
    chat = Chat()
    svc = make_service(tmp_path, store, chat)
    turns = OutageTurns(store, restarted)
    svc.turns = turns  # type: ignore[assignment]
    try:
        message = handle(svc, store, "hello")
    finally:
        turns.restart.join(10)
    assert message.state is State.DELIVERED and message.answer == "the answer"
    assert turns.seen[0] is State.QUEUED and set(turns.seen[1:]) == {State.RUNNING}
    assert [item.text for item in chat.delivered] == ["the answer"]
    assert outbox_texts(store) == ["the answer"]


# ---- the leader lock ----


def test_a_sqlite_store_has_no_leader_lock(tmp_path: Path) -> None:
    store = Store(tmp_path / "orchestrator.db")
    assert store.leader_lock() is None  # one host, one orchestrator: it leads from its start
    store.close()


@pytest.mark.postgres
def test_one_orchestrator_holds_the_leader_lock_until_its_connection_ends(
        store: Store, postgres_server: PostgresServer) -> None:
    first, second, third = store.leader_lock(), store.leader_lock(), store.leader_lock()
    assert first is not None and second is not None and third is not None
    try:
        assert first.try_take() and first.try_take()  # asking again while holding it: still ours
        assert not second.try_take() and not second.held()
        assert not third.try_take()  # one lock per database, whatever the instances are named
        assert first.held()
        postgres_server.execute(f"SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                                f"AND objid = {first.key & 0xFFFFFFFF}")  # the server ended the holder's session
        assert not first.held()  # the holder sees it at its next check ...
        assert second.try_take() and second.held()  # ... and the standby may take it
        assert not first.try_take() and not third.try_take()  # the one deposed does not get it back
        second.release()
        # Closing the holder's connection lets the lock go when its server process has ended, a moment after the
        # close returns (measured: a CI run's try right after it failed once): the next ask within a second takes it.
        wait_until(first.try_take, 5, "the lock let go by the closed connection")
    finally:
        for lock in (first, second, third):
            lock.release()


@pytest.mark.postgres
def test_a_row_another_session_holds_locked_refuses_the_write_for_now_within_seconds(
        store: Store, postgres_server: PostgresServer, migrated: str) -> None:
    """An operator's psql holding a row in a transaction: SQLite's busy timeout has its like (lock_timeout), so the
    service's event loop waits 2 s, not until the operator commits."""
    store.ensure_chat("oc_a")
    database = migrated.rsplit("/", 1)[1]
    holder = psycopg2.connect(host=str(postgres_server.folder), port=postgres_server.port, user="postgres",
                              dbname=database)
    try:
        with holder.cursor() as cursor:
            cursor.execute("SELECT * FROM chats WHERE chat_id = 'oc_a' FOR UPDATE")
        began = time.monotonic()
        with pytest.raises(Exception) as refused:
            store.set_session("oc_a", "s1")
        assert refused_for_now(refused.value), refused.value
        assert time.monotonic() - began < 5
    finally:
        holder.close()
    store.set_session("oc_a", "s1")
    assert store.chat("oc_a").session_id == "s1"


@pytest.mark.postgres
def test_a_connection_on_a_descriptor_past_1023_is_checked_all_the_same(store: Store) -> None:
    """The gateway holds thousands of chat sockets: select.select would refuse the store's descriptor there."""
    store.close()
    spare = []
    try:
        while len(spare) < 1100:  # every lower descriptor taken
            spare.append(os.open("/dev/null", os.O_RDONLY))
        store.ensure_chat("oc_a")  # a new connection, on a descriptor past 1023
        assert store.db.connection().fileno() > 1023
        store.ensure_chat("oc_b")
        assert [chat.chat_id for chat in store.chats()] == ["oc_a", "oc_b"]
    finally:
        for fd in spare:
            os.close(fd)


@pytest.mark.postgres
def test_a_leader_killed_lets_its_standby_lead_within_a_poll(store: Store, migrated: str) -> None:
    """kill -9 of the leader's process: its connection closes, the server lets the lock go, and the standby's next
    ask gets it (leadership.POLL_SECONDS later at most)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from orchestrator.store import Store\n"
         "lock = Store(sys.argv[1]).leader_lock()\n"
         "assert lock.try_take(); print('leading', flush=True); time.sleep(60)", migrated],
        stdout=subprocess.PIPE, text=True)
    standby = Leadership(store.leader_lock())
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "leading"
        assert not asyncio.run(_takes_within(standby, 0.5))
        holder.kill()
        killed = time.monotonic()
        assert asyncio.run(_takes_within(standby, 10))
        took = time.monotonic() - killed
        assert took < 2 * leadership.POLL_SECONDS + 1, took
    finally:
        holder.kill()
        holder.wait()
        standby.release()


async def _takes_within(standby: Leadership, seconds: float) -> bool:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(standby.take(), seconds)
    return standby.leading


@pytest.mark.postgres
def test_a_user_and_password_that_must_be_percent_encoded_log_in(postgres_server: PostgresServer,
                                                                   postgres_url: str) -> None:
    """Hosted PostgreSQL names users user@server; passwords hold any character: both come %-encoded in the URL."""
    database = postgres_url.rsplit("/", 1)[1]
    postgres_server.execute("CREATE ROLE \"orch@corp\" LOGIN PASSWORD 'p@ss:w%rd/1'")
    try:
        postgres_server.execute(f'GRANT ALL ON DATABASE "{database}" TO "orch@corp"')
        postgres_server.execute(f'ALTER DATABASE "{database}" OWNER TO "orch@corp"')
        url = f"postgresql://orch%40corp:p%40ss%3Aw%25rd%2F1@127.0.0.1:{postgres_server.port}/{database}"
        assert [migration.version for migration in migrate_store(url)] == [SCHEMA_VERSION]
        store = Store(url)
        store.ensure_chat("oc_a")
        assert [chat.chat_id for chat in store.chats()] == ["oc_a"]
        store.close()
    finally:
        postgres_server.drop_database(database)  # with what the role owns in it (the fixture finds it gone)
        postgres_server.execute('DROP ROLE "orch@corp"')
