"""Durable state in SQLite or PostgreSQL (peewee): chats, messages, topics' sessions, the model's usage and
approvals. The only module that speaks SQL.

Callers get plain records, never rows. Message state changes are conditional updates (see `states`),
so a transition happens once even when two workers race for it. A transition the message's state refuses
raises `TransitionRefused` (the caller's idea of the message is wrong: going on would lose or repeat work),
except where a method's docstring names the refusal its callers expect; those return False. Nothing here
clears a session id except `set_session` and `forget_sessions`, which run only on /new, `orchestrator reset`,
or when the CLI reports the session gone. Every text for a chat is kept with the secrets masked (`masking`).

The schema changes by numbered migrations (`MIGRATIONS`), through peewee's migrator. A SQLite store (one host) is
migrated when it is opened, as it always was; a PostgreSQL store, shared by several processes, only by `orchestrator
migrate` (`migrate_store`), and opening one whose schema is behind raises `StoreError` saying so. A write refused for
now (`refused_for_now`: SQLite locked, a PostgreSQL server gone) is tried again by its caller; a PostgreSQL
connection the server closed is replaced before the next statement.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import select
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import psycopg2
from peewee import (
    AutoField,
    BooleanField,
    CharField,
    CompositeKey,
    Database,
    DatabaseError,
    DatabaseProxy,
    FloatField,
    IntegerField,
    IntegrityError,
    InterfaceError,
    Model,
    OperationalError,
    PostgresqlDatabase,
    SchemaManager,
    SqliteDatabase,
    TextField,
    fn,
)
from playhouse import db_url
from playhouse.migrate import SchemaMigrator, migrate

from orchestrator.channels import OutFile
from orchestrator.config import POSTGRES_SCHEMES, SQLITE_URL, sqlite_file
from orchestrator.masking import Masker
from orchestrator.states import UNANSWERED, UNFINISHED, State, predecessors

_database = DatabaseProxy()
# SQLite's words for a write it refuses for now: another process holds the database (past busy_timeout), or
# the disk is full (SQLITE_FULL, or an I/O error growing the WAL). Trying again later succeeds.
_REFUSED_FOR_NOW = ("database is locked", "database table is locked", "database or disk is full", "disk i/o error")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
BUSY_TIMEOUT_MS = 2_000
# PostgreSQL's SQLSTATE classes of a server that cannot serve now: 08 connection exception, 40 transaction rollback
# (a serialization failure or a deadlock: the transaction may simply run again), 53 insufficient resources (disk
# full, out of memory, too many connections), 57P shutting down or starting up, 55P03 a row lock another session
# held past lock_timeout (CONNECTION_PARAMS).
_POSTGRES_REFUSED_FOR_NOW = ("08", "40", "53", "57P", "55P03")
# Seconds a new PostgreSQL connection may take (libpq's connect_timeout) before what needed it is refused for now:
# the service's writes run on its event loop, which waits with them, as with BUSY_TIMEOUT_MS.
CONNECT_TIMEOUT_S = 2
# Every connection to PostgreSQL: a statement that waits for another session's row lock more than 2 s is refused for
# now (SQLite's BUSY_TIMEOUT_MS), and a server that stops answering (its host or the network gone, no reset) is given
# up on after STORE_USER_TIMEOUT_MS of unacknowledged data, or after keepalive probes of an idle connection: the
# kernel would otherwise retransmit for about 15 minutes, with the service's event loop waiting on it.
STORE_USER_TIMEOUT_MS = 10_000
CONNECTION_PARAMS = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 1, "keepalives_count": 5,
                     "tcp_user_timeout": STORE_USER_TIMEOUT_MS, "options": "-c lock_timeout=2000"}
# The leader lock's connection gives up on a silent server sooner (LEADER_USER_TIMEOUT_MS) than the server gives
# up on a silent holder (LEADER_SERVER_TIMEOUT_MS, set on the server's side of it): a holder cut off stops leading
# before the server lets another take the lock.
LEADER_USER_TIMEOUT_MS = 3_000
LEADER_SERVER_TIMEOUT_MS = 10_000
# The advisory lock a migration of a PostgreSQL store holds: two `orchestrator migrate` at once run one after the
# other, and the second finds nothing left to do.
MIGRATION_LOCK = 0x6F7263


class StoreError(Exception):
    """The store cannot be used as configured: its URL, a server that cannot be reached, a schema behind this
    version's."""


def refused_for_now(error: BaseException) -> bool:
    """Whether `error` is the store (or the disk) refusing a write for now, not a bug: the work that hit it
    should be done again once the store takes writes, rather than given up. On PostgreSQL that is also a server
    that went away or cannot be reached: the store connects anew on the next try."""
    if isinstance(error, OSError):
        return error.errno in _DISK_FULL
    driver = error
    while isinstance(getattr(driver, "orig", None), Exception):  # peewee's errors carry the driver's (or peewee's)
        driver = driver.orig
    if isinstance(driver, psycopg2.Error):
        return _postgres_refused_for_now(driver)
    return isinstance(error, OperationalError | sqlite3.OperationalError) and any(
        words in str(error).lower() for words in _REFUSED_FOR_NOW)


def _postgres_refused_for_now(error: psycopg2.Error) -> bool:
    """psycopg2's InterfaceError is a connection closed already; its OperationalError without a SQLSTATE one that
    failed or broke (the server went away, refused it, or did not answer within CONNECT_TIMEOUT_S)."""
    if isinstance(error, psycopg2.InterfaceError):
        return True
    return isinstance(error, psycopg2.OperationalError) and (
        error.pgcode is None or error.pgcode.startswith(_POSTGRES_REFUSED_FOR_NOW))


class _Str(CharField):
    """A string of any length: SQLite never held CharField to its 255 characters, PostgreSQL would refuse a longer
    chat name or tool name (hostile input among them) and with it the whole write."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(max_length=None, **kwargs)


class _Table(Model):
    class Meta:
        database = _database


class _Chat(_Table):
    chat_id = _Str(primary_key=True)
    name = _Str(default="")
    container_name = _Str(default="")
    container_id = _Str(default="")
    session_id = _Str(null=True)
    last_activity = FloatField(null=True)
    created_at = FloatField()

    class Meta:
        table_name = "chats"


class _Message(_Table):
    id = AutoField()
    message_id = _Str(unique=True)
    chat_id = _Str(index=True)
    sender_id = _Str(default="")
    thread_id = _Str(default="")  # the topic it was sent in ("" outside one)
    text = TextField()
    attachments = TextField(default="")  # the files that came with it (JSON: inbox.encode_attachments), or ""
    state = _Str(index=True)
    turn = _Str(null=True)  # the folder of its latest turn, under the chat's turns/
    display = TextField(null=True)  # the channel's state of the turn's display (card, reaction), for a restart
    error = TextField(null=True)
    answer = TextField(null=True)
    cost_usd = FloatField(null=True)
    duration_ms = IntegerField(null=True)
    received_at = FloatField()
    updated_at = FloatField()

    class Meta:
        table_name = "messages"


class _Outbox(_Table):
    """Everything the bot says in a chat, kept until it is delivered: answers, failures, notices."""

    id = AutoField()
    key = _Str(unique=True)  # sent with each send, so Feishu drops a repeat of it
    chat_id = _Str(index=True)
    reply_to = _Str(null=True)  # the chat message this answers
    message_id = _Str(null=True)  # our message whose answer this is; delivered when this is
    text = TextField()
    card = _Str(null=True)  # a streaming card to finish with this text
    file_kind = _Str(null=True)  # a file to send (image or file), with the text as its caption ...
    file_name = _Str(null=True)  # ... shown under this name ...
    file_path = TextField(null=True)  # ... from this copy in root's folder (files_out) ...
    file_size = IntegerField(null=True)
    upload_key = _Str(null=True)  # ... once uploaded: its key, stored before the send (uploaded once)
    state = _Str(index=True, default="pending")  # pending, sent, dead
    attempts = IntegerField(default=0)
    next_attempt_at = FloatField()
    last_error = TextField(null=True)
    created_at = FloatField()
    sent_at = FloatField(null=True)

    class Meta:
        table_name = "outbox"


class _ThreadSession(_Table):
    """The Claude session of each topic (thread) of a chat, where topics keep their own (`threads: per_thread`);
    the chat's own conversation keeps its session in `chats`."""

    chat_id = _Str()
    thread_id = _Str()
    session_id = _Str(null=True)

    class Meta:
        table_name = "thread_sessions"
        primary_key = CompositeKey("chat_id", "thread_id")


class _Refusal(_Table):
    """Chats that were told once that they are not allowed."""

    chat_id = _Str(primary_key=True)
    refused_at = FloatField()
    messages = IntegerField(default=1)

    class Meta:
        table_name = "refusals"


class _Usage(_Table):
    """One model request's tokens and price, written by the gateway (another process) as the response streams."""

    id = AutoField()
    chat_id = _Str(index=True)
    user_id = _Str(index=True, default="")  # the sender of the message the chat was running; "" if none
    message_id = _Str(index=True, null=True)  # that message
    model = _Str(default="")
    input_tokens = IntegerField(default=0)
    output_tokens = IntegerField(default=0)
    cache_write_tokens = IntegerField(default=0)
    cache_read_tokens = IntegerField(default=0)
    cost_nano = IntegerField(default=0)  # USD × 1e9, from the config's prices when the row was written
    at = FloatField(index=True)  # when the request was let through
    complete = BooleanField(default=False)  # the response ended (message_stop); False: in flight, or cut off

    class Meta:
        table_name = "usage"


class _Approval(_Table):
    """One permission request of a turn's, and how it was decided: the audit trail, and what a card's buttons find."""

    id = AutoField()
    key = _Str(unique=True)  # random: the card's buttons carry it
    chat_id = _Str(index=True)
    message_id = _Str(index=True)  # the message whose turn asked
    turn = _Str()
    number = IntegerField()  # the turn's n-th request
    tool = _Str()
    request = TextField()  # what the card shows (JSON, masked, bounded)
    requested_by = _Str(default="")  # the sender of that message
    state = _Str(index=True)  # pending, allowed, denied, timed_out, cancelled
    always = BooleanField(default=False)  # allowed for the rest of the chat's life (until /permissions reset)
    answers = TextField(null=True)  # AskUserQuestion: JSON {question: answer}
    reason = TextField(null=True)
    decided_by = _Str(null=True)
    asked_at = FloatField()
    deadline = FloatField()
    decided_at = FloatField(null=True)
    card = _Str(null=True)  # the card's message id, once sent
    shown = _Str(null=True)  # the state the card shows: pending when sent, the outcome once updated
    answered = BooleanField(default=False)  # the decision was written for the agent host

    class Meta:
        table_name = "approvals"
        indexes = ((("turn", "number"), True),)


class _AlwaysAllowed(_Table):
    """Tools a chat's approver allowed for good ("Always allow"), until /permissions reset."""

    chat_id = _Str()
    tool = _Str()
    allowed_by = _Str(default="")
    allowed_at = FloatField()

    class Meta:
        table_name = "always_allowed"
        primary_key = CompositeKey("chat_id", "tool")


_TABLES = [_Chat, _Message, _Outbox, _Refusal, _Usage, _Approval, _AlwaysAllowed, _ThreadSession]


class _SchemaVersion(_Table):
    """The migrations a PostgreSQL store has had. SQLite keeps its version in the file's header (user_version)."""

    version = IntegerField(primary_key=True)
    name = TextField()
    applied_at = FloatField()

    class Meta:
        table_name = "schema_version"


# ---- the databases ----


class _Postgres(PostgresqlDatabase):
    """PostgreSQL through psycopg2 (peewee's driver for it), holding what SQLite holds, and getting over a server that
    went away: a connection the server closed is given up before the next statement or transaction (the ROLLBACK of
    one that failed with it included), and a new one made. Not inside a transaction, whose work went with the
    connection: that statement fails, refused for now, and its caller tries the whole write again."""

    # SQLite's REAL and INTEGER are 8 bytes, PostgreSQL's 4: there a time.time() would be off by up to a minute (a
    # 24-bit mantissa) and a cost_nano past 2**31 (2.15 USD) refused.
    field_types: ClassVar[dict[str, str]] = {**PostgresqlDatabase.field_types, "FLOAT": "DOUBLE PRECISION",
                                             "INT": "BIGINT"}

    def cursor(self, named_cursor: Any = None) -> Any:
        if not self.in_transaction() and not self.is_closed() and _closed_by_server(self._state.conn):
            self._forget_connection()
        return super().cursor(named_cursor)

    def execute_sql(self, sql: str, params: Sequence[Any] | None = None) -> Any:
        # PostgreSQL's text cannot hold NUL, which SQLite keeps (an agent's answer may have one): U+FFFD in its place.
        if params:
            params = [value.replace("\0", "\ufffd") if isinstance(value, str) else value for value in params]
        return super().execute_sql(sql, params)

    def _forget_connection(self) -> None:
        with contextlib.suppress(psycopg2.Error):
            self._state.conn.close()
        self._state.reset()


def _closed_by_server(connection: Any) -> bool:
    """Whether the server has let go of this idle connection: psycopg2 knows once a statement met it; before that,
    its socket is readable (the server's last message, or the end of the stream, waits in it), where an idle
    connection has nothing to read. A server that vanished without a word is met by the next statement."""
    if connection.closed:
        return True
    poller = select.poll()  # not select.select: it refuses a descriptor past 1023 (the gateway holds thousands)
    poller.register(connection.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def _sqlite(path: Path) -> SqliteDatabase:
    path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteDatabase(str(path), pragmas={
        "journal_mode": "wal",
        # How long a write waits for another process's (`orchestrator notify`, a backup) before it is refused.
        # The service writes on its event loop, which waits with it: held locked for 15 s, a 10 s wait let the
        # whole service try two writes in all. Refused writes are tried again with backoff (`refused_for_now`),
        # and other writers hold the lock for milliseconds.
        "busy_timeout": BUSY_TIMEOUT_MS,
        # In WAL mode NORMAL survives any crash of the orchestrator (kill -9, OOM) and never corrupts; only
        # a power loss of the host may roll back the last moment's commits. FULL would fsync each of the
        # ~8 writes of every message on the event loop (6.6 ms each here against 0.2 ms).
        "synchronous": "normal",
    })


def _open(url: str) -> Database:
    """The database of a store URL (config: store.url), not connected yet."""
    file = sqlite_file(url)
    if file is not None:
        return _sqlite(file)
    if urlsplit(url).scheme in POSTGRES_SCHEMES:
        params = db_url.parse(url, unquote_password=True, unquote_user=True)
        params.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
        params = {**CONNECTION_PARAMS, **params}
        return _Postgres(params.pop("database"), **params)
    raise StoreError(f"{public_url(url)} is not a store URL: sqlite:///FILE or postgresql://user:password@host/db")


def public_url(url: str) -> str:
    """The store URL without its password, to print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user_info, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user_info.partition(':')[0]}@{host}"))


# ---- migrations ----


@dataclass(frozen=True)
class Migration:
    """A step of the schema. Each does only what its store lacks (a store made at a later version, its tables made
    from the models of its day, has it already), so a store made at any version ends with the same schema."""

    version: int
    name: str
    apply: Callable[[Database], None]


def _models_made(db: Database) -> None:
    """The models' tables, and the columns a table lacks, each with its default (nothing is dropped or changed): all
    of it on a new store; on a SQLite store made before versions were kept, what it lacks."""
    for model in _TABLES:
        SchemaManager(model, db).create_all(safe=True)  # only those missing, with their indexes
    migrator = SchemaMigrator.from_database(db)
    for model in _TABLES:
        present = {column.name for column in db.get_columns(model._meta.table_name)}
        missing = [field for field in model._meta.sorted_fields if field.column_name not in present]
        if missing:
            migrate(*(migrator.add_column(model._meta.table_name, field.column_name, field) for field in missing))


MIGRATIONS = (
    Migration(1, "chats, messages, outbox, topics' sessions, refusals, usage, approvals", _models_made),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def migrate_store(url: str) -> list[Migration]:
    """`orchestrator migrate`: the migrations the store at `url` lacked, applied; empty when it had them all."""
    db = _open(url)
    try:
        return _apply(db)
    except (DatabaseError, InterfaceError) as exc:
        raise StoreError(f"cannot migrate the store {public_url(url)}: {str(exc).strip()}") from exc
    finally:
        db.close()


def _version(db: Database) -> int:
    if isinstance(db, SqliteDatabase):
        return db.pragma("user_version")
    if not db.table_exists(_SchemaVersion._meta.table_name):
        return 0
    return db.execute(_SchemaVersion.select(fn.MAX(_SchemaVersion.version))).fetchone()[0] or 0


def _apply(db: Database) -> list[Migration]:
    """The migrations `db` lacks, in order, in one transaction (DDL is transactional in both: a step that fails
    leaves the store as it was), one migrator at a time (SQLite's write lock, taken at the start, or PostgreSQL's
    advisory lock); on `db` itself, whatever the models are bound to. Those it applied."""
    if _version(db) >= SCHEMA_VERSION:
        return []
    with _migrating(db):
        done = _version(db)  # another process may have migrated while this one waited for the lock
        pending = [migration for migration in MIGRATIONS if migration.version > done]
        for migration in pending:
            migration.apply(db)
            if isinstance(db, SqliteDatabase):
                db.pragma("user_version", migration.version)
            else:
                db.execute(_SchemaVersion.insert(version=migration.version, name=migration.name,
                                                 applied_at=time.time()))
    return pending


@contextlib.contextmanager
def _migrating(db: Database) -> Iterator[None]:
    if isinstance(db, SqliteDatabase):
        with db.atomic("IMMEDIATE"):
            yield
        return
    with db.atomic():
        db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        SchemaManager(_SchemaVersion, db).create_all(safe=True)
        yield


class LeaderLock:
    """Leadership among the orchestrators sharing a PostgreSQL store: a session advisory lock held on a connection of
    its own. It is the database's to give: when the holder's process dies, its connection closes and the server lets
    the lock go at once; when its host or network dies, the server finds the connection dead by TCP keepalive
    (keepalive, or unacknowledged data for LEADER_SERVER_TIMEOUT_MS: about 10 s) and lets it go then. The holder
    checks every poll that its connection still answers, and gives up on a silent server after LEADER_USER_TIMEOUT_MS
    (3 s): it stops leading before the server could give the lock to another. One lock per database: a database holds
    one deployment's state (every instance sharing it has the same name)."""

    # 63 bits, not negative: pg_locks shows the key as two unsigned halves (classid, objid).
    KEY = int.from_bytes(hashlib.sha256(b"orchestrator leader").digest()[:8], "big") >> 1

    def __init__(self, params: dict[str, Any]) -> None:
        self._params = {**params, "connect_timeout": CONNECT_TIMEOUT_S, "tcp_user_timeout": LEADER_USER_TIMEOUT_MS,
                        "keepalives_idle": 1, "keepalives_interval": 1, "keepalives_count": 2}
        self.key = self.KEY
        self._conn: Any = None

    def try_take(self) -> bool:
        """Whether this process holds the lock now (it may have had it already). Raises psycopg2.Error when the
        server cannot be reached: not leading."""
        if self._conn is None or self._conn.closed:
            self._conn = psycopg2.connect(**self._params)
            self._conn.autocommit = True
            with self._conn.cursor() as cursor:
                # The server's side: a dead holder's lock is let go within about 10 s, idle or not.
                cursor.execute(f"SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 1; "
                               f"SET tcp_keepalives_count = 5; SET tcp_user_timeout = {LEADER_SERVER_TIMEOUT_MS}")
        return self._query("SELECT pg_try_advisory_lock(%s)")

    def held(self) -> bool:
        """Whether the lock is still this process's: its connection answers (within LEADER_USER_TIMEOUT_MS when the
        server went silent) and holds it."""
        try:
            return self._conn is not None and self._query(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
                "pid = pg_backend_pid() AND ((classid::bigint << 32) | objid::bigint) = %s::bigint)")
        except psycopg2.Error:
            self.release()
            return False

    def _query(self, sql: str) -> bool:
        with self._conn.cursor() as cursor:
            cursor.execute("SET statement_timeout = 1000")
            cursor.execute(sql, (self.key,))
            return bool(cursor.fetchone()[0])

    def release(self) -> None:
        """Let the lock go (closing its connection does it)."""
        if self._conn is not None:
            with contextlib.suppress(psycopg2.Error):
                self._conn.close()
        self._conn = None


class TransitionRefused(Exception):
    """A message's state does not allow the change asked for, and no caller expects that: a bug."""


@dataclass(frozen=True)
class ChatRecord:
    chat_id: str
    name: str
    container_name: str
    container_id: str
    session_id: str | None
    last_activity: float | None


@dataclass(frozen=True)
class MessageRecord:
    id: int
    message_id: str
    chat_id: str
    sender_id: str
    thread_id: str
    text: str
    attachments: str
    state: State
    turn: str | None
    display: str | None
    error: str | None
    answer: str | None
    cost_usd: float | None
    duration_ms: int | None
    received_at: float
    updated_at: float


@dataclass(frozen=True)
class OutboxRecord:
    id: int
    key: str
    chat_id: str
    reply_to: str | None
    message_id: str | None
    text: str
    card: str | None
    state: str
    attempts: int
    last_error: str | None
    file: OutFile | None = None
    upload_key: str | None = None


@dataclass(frozen=True)
class UsageRecord:
    id: int
    chat_id: str
    user_id: str
    message_id: str | None
    model: str
    input_tokens: int
    output_tokens: int
    cache_write_tokens: int
    cache_read_tokens: int
    cost_nano: int
    at: float
    complete: bool


PENDING = "pending"
APPROVAL_OUTCOMES = ("allowed", "denied", "timed_out", "cancelled")


@dataclass(frozen=True)
class ApprovalRecord:
    key: str
    chat_id: str
    message_id: str
    turn: str
    number: int
    tool: str
    request: str
    requested_by: str
    state: str
    always: bool
    answers: str | None
    reason: str | None
    decided_by: str | None
    asked_at: float
    deadline: float
    decided_at: float | None
    card: str | None
    shown: str | None
    answered: bool

    @property
    def pending(self) -> bool:
        return self.state == PENDING


@dataclass(frozen=True)
class AlwaysAllowed:
    tool: str
    allowed_by: str
    allowed_at: float


def _approval_record(row: _Approval) -> ApprovalRecord:
    return ApprovalRecord(row.key, row.chat_id, row.message_id, row.turn, row.number, row.tool, row.request,
                          row.requested_by, row.state, row.always, row.answers, row.reason, row.decided_by,
                          row.asked_at, row.deadline, row.decided_at, row.card, row.shown, row.answered)


def _chat_record(row: _Chat) -> ChatRecord:
    return ChatRecord(row.chat_id, row.name, row.container_name, row.container_id, row.session_id,
                      row.last_activity)


def _message_record(row: _Message) -> MessageRecord:
    return MessageRecord(row.id, row.message_id, row.chat_id, row.sender_id, row.thread_id, row.text,
                         row.attachments, State(row.state), row.turn, row.display, row.error, row.answer,
                         row.cost_usd, row.duration_ms, row.received_at, row.updated_at)


def _usage_record(row: _Usage) -> UsageRecord:
    return UsageRecord(row.id, row.chat_id, row.user_id, row.message_id, row.model, row.input_tokens,
                       row.output_tokens, row.cache_write_tokens, row.cache_read_tokens, row.cost_nano, row.at,
                       row.complete)


def _outbox_record(row: _Outbox) -> OutboxRecord:
    file = OutFile(row.file_kind, row.file_name, row.file_path, row.file_size) if row.file_kind else None
    return OutboxRecord(row.id, row.key, row.chat_id, row.reply_to, row.message_id, row.text, row.card, row.state,
                        row.attempts, row.last_error, file, row.upload_key)


class Store:
    def __init__(self, location: Path | str, secrets: Sequence[str] = ()) -> None:
        """`location`: a SQLite file, or a store URL (settings.store.url). A SQLite store is migrated as it opens
        (one host, where the orchestrator and its gateway run one version); a PostgreSQL store, which several
        processes share, must have been migrated already (`orchestrator migrate`): StoreError if not."""
        self.url = location if isinstance(location, str) else f"{SQLITE_URL}{location}"
        self.path = location if isinstance(location, Path) else sqlite_file(location)  # None: PostgreSQL
        self._mask = Masker(secrets)
        self._chat_names: dict[str, str] = {}  # chat id: the name this store last wrote for it (see ensure_chat)
        self.db = _sqlite(self.path) if self.path is not None else _open(self.url)
        _database.initialize(self.db)
        if self.path is None:
            self._check_schema()
        elif not _apply(self.db):
            _models_made(self.db)  # as every start did before versions were kept: whatever lacks is made

    def _check_schema(self) -> None:
        try:
            version = _version(self.db)
        except (DatabaseError, InterfaceError) as exc:
            self.db.close()
            raise StoreError(f"cannot read the store {public_url(self.url)}: {exc}".strip()) from exc
        if version < SCHEMA_VERSION:
            self.db.close()
            raise StoreError(f"the store {public_url(self.url)} has schema version {version}, this version of the "
                             f"orchestrator needs {SCHEMA_VERSION}: run `orchestrator migrate` first")

    def close(self) -> None:
        self.db.close()

    def writable(self) -> str | None:
        """None when a write transaction can start within 2 s; otherwise why not. Any thread."""
        try:
            if self.path is not None:
                with contextlib.closing(sqlite3.connect(self.path, timeout=2)) as probe:
                    probe.execute("BEGIN IMMEDIATE")
                    probe.rollback()
            else:
                self._probe_postgres()
        except (sqlite3.Error, psycopg2.Error) as exc:
            return f"the store cannot be written: {str(exc).strip()}"
        return None

    def _probe_postgres(self) -> None:
        """A connection of its own (the store's are its threads'), and a read-write transaction: refused by a server
        that is down, does not answer within CONNECT_TIMEOUT_S, or is a read-only standby."""
        params = {**self.db.connect_params, "connect_timeout": CONNECT_TIMEOUT_S}
        with contextlib.closing(psycopg2.connect(dbname=self.db.database, **params)) as probe:
            probe.autocommit = True
            with probe.cursor() as cursor:
                cursor.execute("SET statement_timeout = 2000")
                cursor.execute("START TRANSACTION READ WRITE")
                cursor.execute("ROLLBACK")

    def leader_lock(self) -> LeaderLock | None:
        """The lock whose holder leads the orchestrators sharing this store; None for a SQLite store, which one
        host's one orchestrator uses alone."""
        if self.path is not None:
            return None
        return LeaderLock({**self.db.connect_params, "dbname": self.db.database})

    # ---- chats ----

    def ensure_chat(self, chat_id: str, name: str = "") -> None:
        """The chat stored, with its name when one is given (a name it had is kept otherwise): one statement, and
        none when this store wrote the chat with that name before (the service deletes no chat's row; one found
        gone is written again), as on every message a round trip to PostgreSQL counts. Another orchestrator's
        later name for the chat is kept when this one is given the name it wrote before."""
        known = self._chat_names.get(chat_id)
        if known is not None and name in ("", known):
            return
        insert = _Chat.insert(chat_id=chat_id, name=name, created_at=time.time())
        if name:
            insert = insert.on_conflict(conflict_target=[_Chat.chat_id], update={_Chat.name: name},
                                        where=_Chat.name != name)
        else:
            insert = insert.on_conflict_ignore()
        insert.execute()
        self._chat_names[chat_id] = name

    def chat(self, chat_id: str) -> ChatRecord:
        found = self.find_chat(chat_id)
        if found is None:
            raise _Chat.DoesNotExist(f"no chat {chat_id} in the store")
        return found

    def find_chat(self, chat_id: str) -> ChatRecord | None:
        row = _Chat.get_or_none(_Chat.chat_id == chat_id)
        if row is None:  # gone since this store wrote it (deleted by hand, a failover to a replica that missed it)
            self._chat_names.pop(chat_id, None)  # so that the chat's next message stores it again
        return _chat_record(row) if row else None

    def chats(self) -> list[ChatRecord]:
        return [_chat_record(row) for row in _Chat.select().order_by(_Chat.chat_id)]

    def set_container(self, chat_id: str, name: str, container_id: str) -> None:
        _Chat.update(container_name=name, container_id=container_id).where(_Chat.chat_id == chat_id).execute()

    def session(self, chat_id: str, thread_id: str = "") -> str | None:
        """The Claude session of the chat's own conversation, or of one of its topics."""
        return self.chat(chat_id).session_id if not thread_id else self._topic_session(chat_id, thread_id)

    def chat_and_session(self, chat_id: str, thread_id: str = "") -> tuple[ChatRecord, str | None]:
        """The chat and `session(chat_id, thread_id)`, with one read for the chat's own conversation (a turn's start
        needs both)."""
        chat = self.chat(chat_id)
        return chat, chat.session_id if not thread_id else self._topic_session(chat_id, thread_id)

    def _topic_session(self, chat_id: str, thread_id: str) -> str | None:
        row = _ThreadSession.get_or_none((_ThreadSession.chat_id == chat_id) & (_ThreadSession.thread_id == thread_id))
        return row.session_id if row else None

    def set_session(self, chat_id: str, session_id: str | None, thread_id: str = "") -> None:
        if not thread_id:
            _Chat.update(session_id=session_id).where(_Chat.chat_id == chat_id).execute()
            return
        _ThreadSession.insert(chat_id=chat_id, thread_id=thread_id, session_id=session_id).on_conflict(
            conflict_target=[_ThreadSession.chat_id, _ThreadSession.thread_id],
            update={_ThreadSession.session_id: session_id}).execute()

    def thread_sessions(self, chat_id: str) -> dict[str, str | None]:
        return {row.thread_id: row.session_id
                for row in _ThreadSession.select().where(_ThreadSession.chat_id == chat_id)}

    def forget_sessions(self, chat_id: str) -> None:
        """`orchestrator reset`: the chat's conversation and every topic's start anew."""
        with self.db.atomic():
            self.set_session(chat_id, None)
            _ThreadSession.delete().where(_ThreadSession.chat_id == chat_id).execute()

    def touch(self, chat_id: str) -> None:
        _Chat.update(last_activity=time.time()).where(_Chat.chat_id == chat_id).execute()

    # ---- messages ----

    def record_received(self, message_id: str, chat_id: str, sender_id: str, text: str,
                        thread_id: str = "", attachments: str = "") -> MessageRecord | None:
        """Store a new message; None when this message_id was seen before (a redelivery)."""
        now = time.time()
        # One statement (a round trip to PostgreSQL on every message): a message_id stored before inserts nothing and
        # returns no row.
        stored = (_Message.insert(message_id=message_id, chat_id=chat_id, sender_id=sender_id, text=text,
                                  thread_id=thread_id, attachments=attachments, state=State.RECEIVED,
                                  received_at=now, updated_at=now)
                  .on_conflict(conflict_target=[_Message.message_id], action="NOTHING")
                  .returning(*_Message._meta.sorted_fields).objects(_Message).execute())
        row = next(iter(stored), None)
        return _message_record(row) if row else None

    def merge(self, into: str, attachments: str, merged: Sequence[str]) -> MessageRecord:
        """Messages of files only (`merged`) taken into the message `into`, all received, in one transaction: `into`
        holds `attachments` from now on (their files and its own: inbox.merged_attachments), and they are merged,
        never answered on their own. When one of them is not received any more, that raises and nothing changes."""
        with self.db.atomic():
            for message_id in merged:
                self._transition(message_id, State.MERGED)
            if not _Message.update(attachments=attachments, updated_at=time.time()).where(
                    (_Message.message_id == into) & (_Message.state == str(State.RECEIVED))).execute():
                raise TransitionRefused(f"message {into} is {self._state(into)}: it may not take other messages' "
                                        "files")
        return self.message(into)

    def message(self, message_id: str) -> MessageRecord:
        return _message_record(_Message.get(_Message.message_id == message_id))

    def messages(self, chat_id: str | None = None) -> list[MessageRecord]:
        query = _Message.select().order_by(_Message.id)
        if chat_id is not None:
            query = query.where(_Message.chat_id == chat_id)
        return [_message_record(row) for row in query]

    def unfinished_messages(self, chat_id: str | None = None) -> list[MessageRecord]:
        query = _Message.select().where(_Message.state.in_([str(s) for s in UNFINISHED])).order_by(_Message.id)
        if chat_id is not None:
            query = query.where(_Message.chat_id == chat_id)
        return [_message_record(row) for row in query]

    def last_turn(self, chat_id: str) -> MessageRecord | None:
        """The chat's latest message whose turn reported its duration (and cost), or None."""
        row = (_Message.select().where((_Message.chat_id == chat_id) & _Message.duration_ms.is_null(False))
               .order_by(_Message.id.desc()).first())
        return _message_record(row) if row else None

    def running_message(self, chat_id: str) -> MessageRecord | None:
        """The chat's message whose turn is running (its sender pays for the model's requests), or None."""
        row = (_Message.select().where((_Message.chat_id == chat_id) & (_Message.state == str(State.RUNNING)))
               .order_by(_Message.id.desc()).first())
        return _message_record(row) if row else None

    def set_display(self, message_id: str, display: str) -> None:
        _Message.update(display=display).where(_Message.message_id == message_id).execute()

    def mark_queued(self, message_id: str, error: str | None = None) -> None:
        """Queued for a turn (received → queued, or running → queued to run again with a fresh session);
        `error` notes why a message that already ran is queued again."""
        self._transition(message_id, State.QUEUED, **({"error": error} if error else {}))

    def mark_running(self, message_id: str, turn: str) -> None:
        """Queued → running (a turn is recorded with `start_turn`, which also takes a running message's new one)."""
        self._transition(message_id, State.RUNNING, turn=turn)

    def start_turn(self, message_id: str, turn: str) -> None:
        """The message's turn is now `turn`: queued → running, or a running message's turn started anew (one
        that never started before a restart, a retry after the pids limit). Recovery follows the turn stored
        here, so a refusal is a bug and raises: the new turn's tool calls would run again after a restart."""
        updated = (_Message.update(state=State.RUNNING, turn=turn, updated_at=time.time())
                   .where((_Message.message_id == message_id)
                          & (_Message.state.in_([str(State.QUEUED), str(State.RUNNING)])))
                   .execute())
        if updated != 1:
            raise self._refused(message_id, State.RUNNING, f"turn {turn} not recorded")

    def answer(self, message_id: str, text: str, cost_usd: float | None, duration_ms: int | None,
               card: str | None, files: Sequence[tuple[OutFile, str]] = ()) -> bool:
        """Running → answered, and the answer queued for delivery, then its `files` (each with its caption), in
        one transaction: none can be lost between. False when the message failed meanwhile (a shutdown that could
        not wait for the turn failed it and told the user): the late answer is dropped. Any other refusal raises."""
        with self.db.atomic():
            chat_id = self._move_unless_failed(message_id, State.ANSWERED, answer=self._mask(text), cost_usd=cost_usd,
                                               duration_ms=duration_ms)
            if chat_id is None:
                return False
            self._say(chat_id, text, reply_to=message_id, message_id=message_id, card=card)
            for file, caption in files:
                self._say(chat_id, caption, reply_to=message_id, file=file)
        return True

    def answer_without_turn(self, message_id: str, text: str) -> None:
        """A command's reply (or a notice for a message no turn can read): received → queued → running → answered
        and the reply queued for delivery, in one transaction, so a store that refuses a write part-way leaves the
        message received, never queued (where the next start would hand "/status" to Claude as a prompt)."""
        with self.db.atomic():
            self._transition(message_id, State.QUEUED)
            self._transition(message_id, State.RUNNING, turn="")
            if not self.answer(message_id, text, None, None, card=None):
                raise self._refused(message_id, State.ANSWERED)

    def fail(self, message_id: str, reason: str, text: str, card: str | None = None) -> bool:
        """The message failed for `reason`; the user is told `text`, durably. False when it had failed already
        (a shutdown failed it, then its turn ended with a failure of its own): the user was told once. Any other
        refusal raises: a delivered message, or an answered one (only `mark_dead` takes an answer back, when it
        proved undeliverable; failing it here would leave its answer in the outbox)."""
        with self.db.atomic():
            chat_id = self._move_unless_failed(message_id, State.FAILED, only_from=UNANSWERED, error=self._mask(reason))
            if chat_id is None:
                return False
            self._say(chat_id, text, reply_to=message_id, card=card)
        return True

    def fail_unanswered(self, message_id: str, reason: str, text: str) -> bool:
        """As `fail`, but only while the message has no answer yet (received, queued or running): an error
        after its answer was stored must not take the answer back. Never raises for the message's state: an
        unexpected error may come at any point of a message's life, so False (answered or finished already)
        is an outcome the caller expects."""
        with self.db.atomic():
            chat_id = self._move(message_id, State.FAILED, only_from=UNANSWERED, error=self._mask(reason))
            if chat_id is None:
                return False
            self._say(chat_id, text, reply_to=message_id)
        return True

    def _move(self, message_id: str, target: State, only_from: frozenset[State] | None = None,
              **fields: object) -> str | None:
        """Move a message to `target` if its current state allows it (and is one of `only_from`, if given): its
        chat when it moved (returned by the update itself: no second round trip), None if it did not."""
        allowed = [str(state) for state in predecessors(target) & (only_from or frozenset(State))]
        moved = (_Message.update(state=target, updated_at=time.time(), **fields)
                 .where((_Message.message_id == message_id) & (_Message.state.in_(allowed)))
                 .returning(_Message.chat_id).tuples().execute())
        row = next(iter(moved), None)
        return row[0] if row else None

    def _transition(self, message_id: str, target: State, **fields: object) -> None:
        """`_move`, where a refusal is a bug: it raises."""
        if self._move(message_id, target, **fields) is None:
            raise self._refused(message_id, target)

    def _move_unless_failed(self, message_id: str, target: State, only_from: frozenset[State] | None = None,
                            **fields: object) -> str | None:
        """`_move`; None when the message had failed already, and any other refusal raises."""
        chat_id = self._move(message_id, target, only_from, **fields)
        if chat_id is not None:
            return chat_id
        if self._state(message_id) is State.FAILED:
            return None
        raise self._refused(message_id, target)

    def _state(self, message_id: str) -> State | None:
        row = _Message.get_or_none(_Message.message_id == message_id)
        return State(row.state) if row else None

    def _refused(self, message_id: str, target: State, note: str = "") -> TransitionRefused:
        state = self._state(message_id)
        where = f"is {state}" if state else "is not stored"
        return TransitionRefused(f"message {message_id} {where}: it may not become {target}"
                                 + (f" ({note})" if note else ""))

    # ---- outbox ----

    def say(self, chat_id: str, text: str, reply_to: str | None = None) -> OutboxRecord:
        """Queue a message to a chat that answers no turn (a notice, a command's reply, `orchestrator notify`)."""
        return self._say(chat_id, text, reply_to=reply_to)

    def _say(self, chat_id: str, text: str, reply_to: str | None = None, message_id: str | None = None,
             card: str | None = None, file: OutFile | None = None) -> OutboxRecord:
        now = time.time()
        sent = {"file_kind": file.kind, "file_name": file.name, "file_path": file.path, "file_size": file.size} \
            if file else {}
        row = _Outbox.create(key=uuid.uuid4().hex, chat_id=chat_id, reply_to=reply_to, message_id=message_id,
                             text=self._mask(text), card=card, next_attempt_at=now, created_at=now, **sent)
        return _outbox_record(row)

    def pending_outbox(self) -> int:
        return _Outbox.select().where(_Outbox.state == "pending").count()

    def due_outbox(self) -> list[OutboxRecord]:
        """Pending items whose time has come, oldest first; a chat's later items wait for its earlier ones."""
        rows = _Outbox.select().where(_Outbox.state == "pending").order_by(_Outbox.id)
        now, blocked, due = time.time(), set(), []
        for row in rows:
            if row.chat_id in blocked:
                continue
            if row.next_attempt_at > now:
                blocked.add(row.chat_id)
                continue
            due.append(_outbox_record(row))
        return due

    def outbox_item(self, item_id: int) -> OutboxRecord:
        return _outbox_record(_Outbox.get_by_id(item_id))

    def outbox(self, chat_id: str) -> list[OutboxRecord]:
        return [_outbox_record(row) for row in _Outbox.select().where(_Outbox.chat_id == chat_id).order_by(_Outbox.id)]

    def mark_sent(self, item: OutboxRecord) -> None:
        """The item went out, and the message it answers is delivered with it. Marking an item that is no longer
        pending changes nothing (a sender that marks it twice: its message is delivered once); a pending answer
        whose message is not answered raises."""
        with self.db.atomic():
            sent = (_Outbox.update(state="sent", sent_at=time.time(), attempts=_Outbox.attempts + 1)
                    .where((_Outbox.id == item.id) & (_Outbox.state == "pending")).execute())
            if sent and item.message_id:
                self._transition(item.message_id, State.DELIVERED)

    def set_uploaded(self, item: OutboxRecord, upload_key: str) -> None:
        """The item's file was uploaded as `upload_key`: stored before the send, so a restart sends that upload
        rather than uploading the file again."""
        _Outbox.update(upload_key=upload_key).where(_Outbox.id == item.id).execute()

    def mark_retry(self, item: OutboxRecord, error: str, delay: float) -> None:
        _Outbox.update(attempts=_Outbox.attempts + 1, last_error=error, next_attempt_at=time.time() + delay).where(
            _Outbox.id == item.id).execute()

    def mark_dead(self, item: OutboxRecord, error: str, notice: str | None = None) -> None:
        """Undeliverable for good (the bot left the chat, the chat is gone, a file refused): stop trying, keep the
        record, fail the message it answers, and queue `notice` for the chat, all at once. As `mark_sent`, an item
        that is no longer pending is left as it is."""
        with self.db.atomic():
            dead = (_Outbox.update(state="dead", attempts=_Outbox.attempts + 1, last_error=error)
                    .where((_Outbox.id == item.id) & (_Outbox.state == "pending")).execute())
            if dead and item.message_id:
                self._transition(item.message_id, State.FAILED,
                                 error=self._mask(f"the answer could not be delivered: {error}"))
            if dead and notice:
                self._say(item.chat_id, notice, reply_to=item.reply_to)

    def pending_file_paths(self) -> set[str]:
        """The copies that outbox items still waiting to be sent name (files_out.prune keeps them)."""
        rows = _Outbox.select(_Outbox.file_path).where((_Outbox.state == "pending") & _Outbox.file_path.is_null(False))
        return {row.file_path for row in rows}

    # ---- refusals ----

    def record_refusal(self, chat_id: str) -> bool:
        """True the first time a chat is refused, so it is told once."""
        try:
            with self.db.atomic():
                _Refusal.create(chat_id=chat_id, refused_at=time.time())
            return True
        except IntegrityError:
            pass
        _Refusal.update(messages=_Refusal.messages + 1).where(_Refusal.chat_id == chat_id).execute()
        return False

    # ---- usage ----

    def open_usage(self, chat_id: str, user_id: str, message_id: str | None, model: str, *, input_tokens: int,
                   output_tokens: int, cache_write_tokens: int, cache_read_tokens: int, cost_nano: int,
                   complete: bool = False) -> int:
        """Record a model request before it goes upstream, at the most it may cost (its reservation: requests in
        flight count in the sums), to be brought to its real counts as the response comes; its id."""
        return _Usage.insert(chat_id=chat_id, user_id=user_id, message_id=message_id, model=model,
                             input_tokens=input_tokens, output_tokens=output_tokens,
                             cache_write_tokens=cache_write_tokens, cache_read_tokens=cache_read_tokens,
                             cost_nano=cost_nano, at=time.time(), complete=complete).execute()

    def update_usage(self, usage_id: int, *, input_tokens: int, output_tokens: int, cache_write_tokens: int,
                     cache_read_tokens: int, cost_nano: int, complete: bool) -> None:
        """The request's counts as now known: its reservation's, then its response's (the API's are cumulative)."""
        _Usage.update(input_tokens=input_tokens, output_tokens=output_tokens, cache_write_tokens=cache_write_tokens,
                      cache_read_tokens=cache_read_tokens, cost_nano=cost_nano, complete=complete).where(
            _Usage.id == usage_id).execute()

    def drop_usage(self, usage_id: int) -> None:
        """Forget a request's reservation: it never reached the API, or the API refused it (which costs nothing)."""
        _Usage.delete().where(_Usage.id == usage_id).execute()

    def usage(self, chat_id: str | None = None) -> list[UsageRecord]:
        query = _Usage.select().order_by(_Usage.id)
        if chat_id is not None:
            query = query.where(_Usage.chat_id == chat_id)
        return [_usage_record(row) for row in query]

    def spent(self, since: float, until: float | None = None, chat_id: str | None = None,
              user_id: str | None = None) -> int:
        """nano-USD of the requests let through in [since, until), of one chat or user if given, or of all."""
        condition = _Usage.at >= since
        if until is not None:
            condition &= _Usage.at < until
        if chat_id is not None:
            condition &= _Usage.chat_id == chat_id
        if user_id is not None:
            condition &= _Usage.user_id == user_id
        # int(): PostgreSQL's SUM of a BIGINT is a NUMERIC, which psycopg2 reads as a Decimal
        return int(_Usage.select(fn.COALESCE(fn.SUM(_Usage.cost_nano), 0)).where(condition).scalar())

    def turn_spent(self, message_id: str) -> int:
        """nano-USD of the model requests made while this message's turn ran."""
        return int(_Usage.select(fn.COALESCE(fn.SUM(_Usage.cost_nano), 0)).where(_Usage.message_id == message_id)
                   .scalar())

    def spent_by_chat(self, since: float) -> dict[str, int]:
        """nano-USD per chat of the requests let through since then (chats that spent nothing are left out)."""
        query = (_Usage.select(_Usage.chat_id, fn.SUM(_Usage.cost_nano).alias("total")).where(_Usage.at >= since)
                 .group_by(_Usage.chat_id).order_by(_Usage.chat_id))
        return {row.chat_id: int(row.total) for row in query}

    # ---- approvals ----

    def open_approval(self, key: str, chat_id: str, message_id: str, turn: str, number: int, tool: str, request: str,
                      requested_by: str, asked_at: float, deadline: float) -> ApprovalRecord:
        """A turn's permission request, pending; the one stored before when the turn's request was seen already (a
        restarted orchestrator reads the turn's requests again)."""
        try:
            with self.db.atomic():
                _Approval.create(key=key, chat_id=chat_id, message_id=message_id, turn=turn, number=number, tool=tool,
                                 request=self._mask(request), requested_by=requested_by, state=PENDING,
                                 asked_at=asked_at, deadline=deadline)
        except IntegrityError:
            pass
        return _approval_record(_Approval.get((_Approval.turn == turn) & (_Approval.number == number)))

    def approval(self, key: str) -> ApprovalRecord | None:
        row = _Approval.get_or_none(_Approval.key == key)
        return _approval_record(row) if row else None

    def turn_approval(self, turn: str, number: int) -> ApprovalRecord | None:
        row = _Approval.get_or_none((_Approval.turn == turn) & (_Approval.number == number))
        return _approval_record(row) if row else None

    def approvals(self, chat_id: str | None = None, *, pending: bool = False, turn: str | None = None
                  ) -> list[ApprovalRecord]:
        query = _Approval.select().order_by(_Approval.id)
        if chat_id is not None:
            query = query.where(_Approval.chat_id == chat_id)
        if pending:
            query = query.where(_Approval.state == PENDING)
        if turn is not None:
            query = query.where(_Approval.turn == turn)
        return [_approval_record(row) for row in query]

    def decide(self, key: str, outcome: str, decided_by: str | None, decided_at: float, reason: str = "",
               always: bool = False, answers: str | None = None) -> bool:
        """Pending → `outcome`, once: of two decisions at once (two approvers, a click and the timeout) the first
        wins and the other gets False. "Always" also allows the tool in the chat from now on."""
        if outcome not in APPROVAL_OUTCOMES:
            raise ValueError(f"{outcome!r} is not an approval's outcome")
        with self.db.atomic():
            decided = (_Approval.update(state=outcome, decided_by=decided_by, reason=self._mask(reason)[:2000],
                                        always=always, answers=answers, decided_at=decided_at)
                       .where((_Approval.key == key) & (_Approval.state == PENDING)).execute())
            if decided and always:
                row = _Approval.get(_Approval.key == key)
                _AlwaysAllowed.insert(chat_id=row.chat_id, tool=row.tool, allowed_by=decided_by or "",
                                      allowed_at=decided_at).on_conflict_ignore().execute()
        return decided == 1

    def note_answers(self, key: str, answers: str) -> None:
        """Some of a waiting question's answers (the request stays pending until all are given)."""
        _Approval.update(answers=answers).where((_Approval.key == key) & (_Approval.state == PENDING)).execute()

    def set_approval_card(self, key: str, card: str) -> None:
        _Approval.update(card=card, shown=PENDING).where((_Approval.key == key) & _Approval.card.is_null()).execute()

    def set_approval_shown(self, key: str, shown: str) -> None:
        _Approval.update(shown=shown).where(_Approval.key == key).execute()

    def set_approval_answered(self, key: str) -> None:
        _Approval.update(answered=True).where(_Approval.key == key).execute()

    def always_allowed(self, chat_id: str) -> list[AlwaysAllowed]:
        rows = _AlwaysAllowed.select().where(_AlwaysAllowed.chat_id == chat_id).order_by(_AlwaysAllowed.tool)
        return [AlwaysAllowed(row.tool, row.allowed_by, row.allowed_at) for row in rows]

    def reset_always_allowed(self, chat_id: str) -> int:
        """/permissions reset: the chat's "always allow" decisions forgotten; how many."""
        return _AlwaysAllowed.delete().where(_AlwaysAllowed.chat_id == chat_id).execute()
