"""The service's own error paths, with fakes for the engine, the channel and the turn (a real SQLite store):
a task that dies stops the service with exit code 1 and shows in /healthz; an unexpected error while
handling a message fails it with a generic reason; a store that refuses a write gets the message handled
again, without a second answer."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger
from peewee import OperationalError

from orchestrator import delivery, service, supervise
from orchestrator.agent import Answer, Failure
from orchestrator.channels import Act, Submit
from orchestrator.config import Settings
from orchestrator.runtime import ContainerSpec, ContainerState
from orchestrator.service import UNEXPECTED_ERROR, Service
from orchestrator.states import State
from orchestrator.store import MessageRecord, Store
from orchestrator.supervise import Liveness
from tests.fakes.channel import RecordingChannel


class Engine:
    """The Docker runtime as far as the service's lifecycle uses it, with no containers."""

    def __init__(self, leftovers: tuple[str, ...] = ()) -> None:
        self.listed = 0
        self.leftovers = list(leftovers)  # another runtime's containers, running until stop_leftovers
        self.stopped: list[tuple[str, float]] = []

    async def list_managed(self, instance: str) -> list[ContainerState]:
        self.listed += 1
        return []

    async def stop_leftovers(self, instance: str, grace_seconds: float) -> list[str]:
        left, self.leftovers = self.leftovers, []
        self.stopped += [(name, grace_seconds) for name in left]
        return left

    async def ensure(self, spec: ContainerSpec) -> ContainerState:  # the gateway's: the only container made here
        return ContainerState(spec.name, "gateway-id", "running")

    async def stop(self, name: str, grace_seconds: float) -> None:
        pass

    def watch(self, instance: str, on_event: Callable[[str, str], None]) -> None:
        pass

    def ping(self) -> str | None:
        return None


class Chat(RecordingChannel):
    """A channel: `run` does what the test says; deliveries and turn displays are recorded."""

    def __init__(self, run: Callable[[], Any] | None = None) -> None:
        super().__init__()
        self._run = run

    async def run(self, submit: Submit, act: Act) -> None:
        if self._run is None:
            await asyncio.Event().wait()
        else:
            await self._run()


class Turns:
    """The turn runner: each call takes the next of `outcomes` (an exception is raised) after marking the
    message running, as the real one does before it starts the CLI."""

    def __init__(self, store: Store, *outcomes: Answer | Failure | Exception) -> None:
        self.store = store
        self.outcomes = list(outcomes)
        self.seen: list[State] = []
        self.running: dict[str, object] = {}

    async def run(self, message: MessageRecord, display: object, log: object) -> Answer | Failure:
        self.seen.append(message.state)
        self.store.start_turn(message.message_id, "t1")
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


@pytest.fixture(autouse=True)
def liveness(monkeypatch: pytest.MonkeyPatch) -> Iterator[Liveness]:
    """A fresh registry per test (a died loop stays dead), and backoffs of milliseconds."""
    fresh = Liveness()
    for module in (service, delivery):
        monkeypatch.setattr(module, "LIVENESS", fresh)
    monkeypatch.setattr(supervise, "FIRST_DELAY", 0.01)
    yield fresh


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "data" / "orchestrator.db")
    yield store
    store.close()


def make_service(tmp_path: Path, store: Store, channel: Chat, engine: Engine | None = None) -> Service:
    settings = Settings(source=tmp_path / "config.yaml", data_dir=tmp_path / "data", chats_dir=tmp_path / "chats")
    made = Service(settings, store, engine or Engine(), channel)  # type: ignore[arg-type]

    async def no_network() -> None:
        pass

    made.close_network = no_network  # type: ignore[method-assign]  # iptables and the engine: not here
    return made


def test_a_channel_that_fails_stops_the_service_gracefully_with_exit_code_1(tmp_path: Path, store: Store) -> None:
    async def fail() -> None:
        raise RuntimeError("the webhook port is taken")

    engine = Engine()
    svc = make_service(tmp_path, store, Chat(fail), engine)
    assert asyncio.run(svc.run()) == 1
    assert svc.health()["channel"] == "died: RuntimeError: the webhook port is taken"
    assert engine.listed == 2  # reconciled at the start, and the containers stopped on the way out


def test_reconcile_stops_what_another_runtime_left_running_for_the_chats_and_says_so(tmp_path: Path,
                                                                                     store: Store) -> None:
    engine = Engine(leftovers=("orchestrator-oc_a",))
    svc = make_service(tmp_path, store, Chat(), engine)
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(message.record["message"]), level="WARNING")
    try:
        asyncio.run(svc.reconcile())
    finally:
        logger.remove(sink)
    assert engine.stopped == [("orchestrator-oc_a", svc.settings.containers.stop_timeout)] and engine.listed == 1
    assert lines == ["reconcile: stopped orchestrator-oc_a, left running by another runtime (it would take its chat's "
                     "turns beside this runtime's)"]


def test_a_loop_that_ends_is_a_death_and_healthz_says_which(tmp_path: Path, store: Store,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    svc = make_service(tmp_path, store, Chat())

    async def returns() -> None:
        pass

    monkeypatch.setattr(svc.deliverer, "run", returns)
    assert asyncio.run(svc.run()) == 1
    checks = svc.health()
    assert checks["outbox"] == "died: it returned"
    assert checks["channel"] is None and checks["housekeeping.prune"] is None


def test_the_channel_ending_its_input_is_no_death(tmp_path: Path, store: Store) -> None:
    async def ends() -> None:
        pass

    svc = make_service(tmp_path, store, Chat(ends))
    assert asyncio.run(svc.run()) == 0
    assert all(problem is None for problem in svc.health().values())


def handle(svc: Service, store: Store, text: str) -> MessageRecord:
    """Store a message, queue it, and wait until its worker is done with it."""

    async def run() -> None:
        message = store.record_received("om_1", "oc_a", "ou_1", text)
        assert message is not None
        svc._enqueue(message)
        await svc.queues["oc_a"].join()
        await svc.deliverer.deliver_due()

    store.ensure_chat("oc_a")
    asyncio.run(run())
    return store.message("om_1")


def test_an_unexpected_error_fails_the_message_with_a_generic_reason(tmp_path: Path, store: Store) -> None:
    chat = Chat()
    svc = make_service(tmp_path, store, chat)
    svc.turns = Turns(store, KeyError("/srv/orchestrator/data/chats/oc_a/turns"))  # type: ignore[assignment]
    logged: list[str] = []
    sink = logger.add(lambda message: logged.append(message.record["message"]), format="{message}")
    try:
        message = handle(svc, store, "hello")
    finally:
        logger.remove(sink)
    assert message.state is State.FAILED
    assert [item.text for item in chat.delivered] == [UNEXPECTED_ERROR]
    assert "/srv/orchestrator" in (message.error or "")  # for `orchestrator logs`, never for the chat
    assert any("unexpected error while handling the message: KeyError" in line for line in logged)


def test_a_store_that_refuses_a_write_gets_the_message_handled_again_and_answered_once(
        tmp_path: Path, store: Store) -> None:
    chat = Chat()
    svc = make_service(tmp_path, store, chat)
    turns = Turns(store, OperationalError("database is locked"), Answer("the answer", "sess-1"))
    svc.turns = turns  # type: ignore[assignment]
    message = handle(svc, store, "hello")
    assert message.state is State.DELIVERED and message.answer == "the answer"
    assert turns.seen == [State.QUEUED, State.RUNNING]  # the second time, its turn is followed, not started
    assert [item.text for item in chat.delivered] == ["the answer"]
    assert svc.retrying == set()


def test_a_failing_housekeeping_step_holds_up_none_of_the_others(tmp_path: Path, store: Store, liveness: Liveness,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    svc = make_service(tmp_path, store, Chat())
    ran: Counter[str] = Counter()

    async def prune() -> None:
        ran["prune"] += 1
        raise FileNotFoundError("an agent deleted turns/7 meanwhile")

    async def idle_stop() -> None:
        ran["idle_stop"] += 1

    monkeypatch.setattr(svc, "_prune_turns", prune)
    monkeypatch.setattr(svc, "_stop_idle_containers", idle_stop)
    real_sleep = asyncio.sleep

    async def no_wait(delay: float) -> None:  # the interval and the backoff, without the waiting
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", no_wait)

    async def run() -> None:
        housekeeping = asyncio.create_task(svc._housekeep_forever())
        deadline = asyncio.get_running_loop().time() + 10
        while ran["idle_stop"] < 5 and asyncio.get_running_loop().time() < deadline:
            await real_sleep(0)
        housekeeping.cancel()

    asyncio.run(run())
    assert ran["idle_stop"] >= 5 and ran["prune"] >= 2
    checks = liveness.checks()
    assert (checks["housekeeping.prune"] or "").endswith("FileNotFoundError: an agent deleted turns/7 meanwhile")
    assert checks["housekeeping.idle_stop"] is None


def test_a_message_stored_but_never_queued_is_handed_on(tmp_path: Path, store: Store) -> None:
    chat = Chat()
    svc = make_service(tmp_path, store, chat)
    svc.turns = Turns(store, Answer("the answer", "sess-1"))  # type: ignore[assignment]
    store.ensure_chat("oc_a")
    store.record_received("om_1", "oc_a", "ou_1", "hello")  # then queueing it failed: never acked, a duplicate after
    store.record_received("om_2", "oc_a", "ou_1", "just now")  # being handed on by submit() this moment
    store.db.execute_sql("update messages set received_at = received_at - 61 where message_id = 'om_1'")

    async def run() -> None:
        await svc._resume_stranded()
        await svc.queues["oc_a"].join()
        await svc.deliverer.deliver_due()

    asyncio.run(run())
    assert store.message("om_1").state is State.DELIVERED and store.message("om_2").state is State.RECEIVED
    assert [item.text for item in chat.delivered] == ["the answer"]


def test_a_disk_below_the_floor_stops_every_chat_container(tmp_path: Path, store: Store) -> None:
    """What writes may not be measurable (a file deleted but held open counts in no folder): below the floor,
    every chat's container is stopped, not only those measured over their budget."""
    import dataclasses

    from orchestrator.config import LimitSettings

    class Running(Engine):
        def __init__(self) -> None:
            super().__init__()
            self.stopped: list[str] = []

        async def list_managed(self, instance: str) -> list[ContainerState]:
            return [ContainerState(f"bot-{chat}", chat, "running", chat_id=chat) for chat in ("oc_a", "oc_b")]

        async def stop(self, name: str, grace_seconds: float) -> None:
            self.stopped.append(name)

    engine = Running()
    svc = make_service(tmp_path, store, Chat(), engine)
    (tmp_path / "chats").mkdir()
    asyncio.run(svc._stop_containers_over_budget())
    assert engine.stopped == []  # plenty of room, nothing measured over budget
    svc.settings = dataclasses.replace(svc.settings, limits=LimitSettings(min_free_disk=2**60))
    svc.turns.settings = svc.settings
    asyncio.run(svc._stop_containers_over_budget())
    assert sorted(engine.stopped) == ["bot-oc_a", "bot-oc_b"]
