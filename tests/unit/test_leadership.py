"""Leader and standby (orchestrator/leadership.py, the service's run): with a fake of the leader lock, a fake turn
runner and channel, a real SQLite store. A standby stores what it receives and routes nothing; once it leads it
recovers what waited and takes what others stored; a leader that loses the lock stops at once and stops nothing of
the chats'. The lock itself on a real PostgreSQL server: tests/unit/test_store_postgres.py."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from orchestrator import commands, leadership, service
from orchestrator.channels import Act, Incoming, Submit
from orchestrator.config import AccessSettings, Settings
from orchestrator.leadership import Leadership
from orchestrator.service import Service
from orchestrator.states import State
from orchestrator.store import MessageRecord, Store
from tests.fakes.channel import RecordingChannel
from tests.unit.test_files_wait import Turns
from tests.unit.test_service_resilience import Engine

CHAT = "oc_a"


class Lock:
    """The leader lock: granted from the `grant_at`-th ask on; `held` until the test takes it away."""

    def __init__(self, grant_at: int = 1, failing: int = 0) -> None:
        self.grant_at = grant_at
        self.failing = failing  # the first asks raise, as with a server that cannot be reached
        self.asks = 0
        self.holding = False
        self.released = False

    def try_take(self) -> bool:
        self.asks += 1
        if self.asks <= self.failing:
            raise OSError("could not connect to server")
        self.holding = self.holding or self.asks >= self.grant_at
        return self.holding

    def held(self) -> bool:
        return self.holding

    def release(self) -> None:
        self.holding, self.released = False, True


class StoppingEngine(Engine):
    def __init__(self) -> None:
        super().__init__()
        self.stopped: list[str] = []

    async def stop(self, name: str, grace_seconds: float) -> None:
        self.stopped.append(name)


class Chat(RecordingChannel):
    """A channel that hands the test its submit and waits."""

    def __init__(self) -> None:
        super().__init__()
        self.submit: Submit | None = None

    async def run(self, submit: Submit, act: Act) -> None:
        self.submit = submit
        await asyncio.Event().wait()


@pytest.fixture(autouse=True)
def fast_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leadership, "POLL_SECONDS", 0.01)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "data" / "orchestrator.db")
    yield store
    store.close()


def make_service(tmp_path: Path, store: Store, lock: Lock,
                 engine: Engine | None = None) -> tuple[Service, Turns, Chat]:
    settings = Settings(source=tmp_path / "config.yaml", data_dir=tmp_path / "data", chats_dir=tmp_path / "chats",
                        access=AccessSettings(allowed_chats=(CHAT,), allowed_users=("*",)))
    chat = Chat()
    made = Service(settings, store, engine or Engine(), chat, Leadership(lock, poll=0.01))  # type: ignore[arg-type]
    turns = made.turns = Turns(store)  # type: ignore[assignment]

    async def no_network() -> None:
        pass

    made.close_network = no_network  # type: ignore[method-assign]  # iptables and the engine: not here
    return made, turns, chat


@contextlib.asynccontextmanager
async def serving(svc: Service) -> AsyncIterator[asyncio.Task[int]]:
    """The service running; stopped as on SIGTERM on the way out if it still runs, so that a wait that failed fails
    the test rather than leave the service running under asyncio.run's teardown."""
    running = asyncio.create_task(svc.run())
    try:
        yield running
    finally:
        if not running.done():
            svc._on_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.wait({running}), 10)


async def submitting(chat: Chat) -> Submit:
    """The service's submit, once its channel runs."""
    await until(lambda: chat.submit is not None, "the channel")
    assert chat.submit is not None
    return chat.submit


async def until(done: object, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def ran(turns: Turns) -> list[str]:
    return [message.message_id for message in turns.ran]


def text(message_id: str) -> Incoming:
    return Incoming(CHAT, message_id, "ou_1", f"question {message_id}")


def test_without_a_lock_an_instance_leads_from_its_start() -> None:
    sole = Leadership(None)
    asyncio.run(sole.take())
    assert sole.leading and not sole.shared


def test_a_standby_asks_until_it_gets_the_lock_and_a_server_it_cannot_reach_is_no_leadership() -> None:
    lock = Lock(grant_at=5, failing=2)
    standby = Leadership(lock, poll=0.001)
    assert not standby.leading and standby.shared
    asyncio.run(standby.take())
    assert standby.leading and lock.asks == 5


def test_the_leader_finds_out_it_lost_the_lock_and_leads_no_more() -> None:
    lock = Lock()
    leader = Leadership(lock, poll=0.001)

    async def scenario() -> None:
        await leader.take()
        watching = asyncio.create_task(leader.kept())
        await asyncio.sleep(0.02)
        assert not watching.done()
        lock.holding = False
        await asyncio.wait_for(watching, 1)

    asyncio.run(scenario())
    assert not leader.leading


def test_a_standby_stores_and_routes_nothing_then_leads_with_what_waited_and_what_others_stored(
        tmp_path: Path, store: Store) -> None:
    lock = Lock(grant_at=10**9)
    svc, turns, chat = make_service(tmp_path, store, lock)

    async def scenario() -> int:
        async with serving(svc) as running:
            submit = await submitting(chat)
            await submit(text("om_1"))
            await asyncio.sleep(0.1)
            assert store.message("om_1").state is State.RECEIVED and turns.ran == []  # stored (acked), not handled
            lock.grant_at = 0  # the leader died
            await until(lambda: ran(turns) == ["om_1"], "om_1 handled once leading")
            store.record_received("om_2", CHAT, "ou_1", "stored by another instance")
            await until(lambda: ran(turns) == ["om_1", "om_2"], "om_2, stored by the standby")
            await submit(text("om_3"))
            await until(lambda: ran(turns) == ["om_1", "om_2", "om_3"], "om_3, received by the leader")
            svc._on_signal(signal.SIGTERM)
        return running.result()

    assert asyncio.run(scenario()) == 0
    assert ran(turns) == ["om_1", "om_2", "om_3"]  # each once
    assert {store.message(m).state for m in ran(turns)} == {State.DELIVERED}
    assert lock.released


def test_a_standby_stopped_leaves_what_it_stored_for_the_leader(tmp_path: Path, store: Store) -> None:
    engine = StoppingEngine()
    svc, turns, chat = make_service(tmp_path, store, Lock(grant_at=10**9), engine)

    async def scenario() -> int:
        async with serving(svc) as running:
            submit = await submitting(chat)
            await submit(text("om_1"))
            svc._on_signal(signal.SIGTERM)
        return running.result()

    assert asyncio.run(scenario()) == 0
    assert store.message("om_1").state is State.RECEIVED and turns.ran == [] and engine.listed == 0
    assert engine.stopped == []


@pytest.mark.parametrize(("how", "exit_code"), [("lock lost", 1), ("SIGTERM", 0)])
def test_a_leader_among_several_stops_no_container_when_it_loses_the_lock_or_is_stopped(
        tmp_path: Path, store: Store, how: str, exit_code: int) -> None:
    """Losing the lock (its connection to the store's server broke): exit 1 at once. A planned stop: exit 0. Either
    way the next leader adopts the gateway and the chats' containers, and their turns."""
    engine = StoppingEngine()
    lock = Lock()
    svc, _, chat = make_service(tmp_path, store, lock, engine)

    async def scenario() -> int:
        async with serving(svc) as running:
            await submitting(chat)
            if how == "lock lost":
                lock.holding = False
                await asyncio.wait_for(running, 5)
            else:
                svc._on_signal(signal.SIGTERM)
        return running.result()

    assert asyncio.run(scenario()) == exit_code
    assert engine.stopped == [] and lock.released


def test_a_check_that_does_not_answer_is_no_leadership(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server gone silent: the check blocks; the leader stops leading after CHECK_SECONDS, not when the kernel
    gives up on the connection."""
    monkeypatch.setattr(leadership, "CHECK_SECONDS", 0.2)
    lock = Lock()
    release = threading.Event()
    leader = Leadership(lock, poll=0.001)

    def silent() -> bool:
        release.wait(5)
        return True

    async def scenario() -> float:
        await leader.take()
        lock.held = silent  # type: ignore[method-assign]
        began = time.monotonic()
        try:
            await asyncio.wait_for(leader.kept(), 3)
            return time.monotonic() - began
        finally:
            release.set()  # the blocked check's thread ends, as the kernel's give-up would end it

    assert asyncio.run(scenario()) < 1.0
    assert not leader.leading


def test_what_a_deposed_leader_queued_after_this_one_recovered_is_taken_over_once_still(
        tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old leader, not yet aware it lost the lock, queued a message after the new leader's start: the new one
    takes it once nobody touched it for ADOPT_SECONDS; its own queued messages it never takes twice."""
    monkeypatch.setattr(service, "ADOPT_SECONDS", 0.3)
    lock = Lock()
    svc, turns, chat = make_service(tmp_path, store, lock)

    async def scenario() -> int:
        async with serving(svc) as running:
            submit = await submitting(chat)
            store.record_received("om_old", CHAT, "ou_1", "queued by the old leader")
            store.mark_queued("om_old")  # not in this leader's queues
            await submit(text("om_new"))
            await until(lambda: sorted(ran(turns)) == ["om_new", "om_old"], "om_old taken over")
            await asyncio.sleep(0.5)  # polls go on: nothing is taken twice
            svc._on_signal(signal.SIGTERM)
        return running.result()

    assert asyncio.run(scenario()) == 0
    assert sorted(ran(turns)) == ["om_new", "om_old"]  # each once


def test_a_command_running_here_is_not_handed_on_again_while_it_runs(tmp_path: Path, store: Store,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A command's message stays received while it runs in the background: the leader's poll for what others
    stored must not run it again."""
    runs: list[str] = []

    async def slow_command(command: object, context: object, message: MessageRecord) -> None:
        runs.append(message.message_id)
        await asyncio.sleep(0.3)  # many polls of 0.01 s
        store.answer_without_turn(message.message_id, "status")

    monkeypatch.setattr(commands, "run", slow_command)
    svc, _, chat = make_service(tmp_path, store, Lock())

    async def scenario() -> int:
        async with serving(svc) as running:
            submit = await submitting(chat)
            await submit(Incoming(CHAT, "om_cmd", "ou_1", "/status"))
            await until(lambda: store.message("om_cmd").state is not State.RECEIVED, "the command's answer")
            await asyncio.sleep(0.1)
            svc._on_signal(signal.SIGTERM)
        return running.result()

    assert asyncio.run(scenario()) == 0
    assert runs == ["om_cmd"]
