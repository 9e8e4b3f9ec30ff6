"""The service end to end on the turn path, with a fake engine, a fake agent host writing the real turn files, a
fake channel and a real store: messages are answered and delivered, the session goes from one turn to the next,
each turn's cost is its own, an OOM event reaches the turn's answer, and a shutdown interrupts a running turn
through the agent host (`TurnRunner.interrupt_all`) and tells the chat."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from loguru import logger

from orchestrator import layout
from orchestrator.agent import cli_argv
from orchestrator.channels import Act, Incoming, Submit
from orchestrator.config import AccessSettings, BudgetSettings, Settings, ShutdownSettings, resolve_chat
from orchestrator.runtime import container_name, gateway_container_name
from orchestrator.service import Service
from orchestrator.states import State
from orchestrator.store import Store
from orchestrator.turn_runner import INTERRUPTED_BY_RESTART
from tests.fakes.agent_host import WAIT_SECONDS, FakeAgentHost, Reply, until
from tests.fakes.channel import RecordingChannel
from tests.fakes.runtime import FakeRuntime

CHAT = "oc_a"


class FakeChannel(RecordingChannel):
    """Messages the test sends go to the service; what it delivers, and what its turns showed, are recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.inbox: asyncio.Queue[Incoming] = asyncio.Queue()

    def send(self, message_id: str, text: str) -> None:
        self.inbox.put_nowait(Incoming(CHAT, message_id, "ou_1", text))

    async def run(self, submit: Submit, act: Act) -> None:
        while True:
            await submit(await self.inbox.get())


@dataclass
class Bench:
    settings: Settings
    store: Store
    runtime: FakeRuntime
    host: FakeAgentHost

    @property
    def container(self) -> str:
        return container_name(self.settings.instance, CHAT)

    def state(self, message_id: str) -> State | None:
        return next((m.state for m in self.store.messages(CHAT) if m.message_id == message_id), None)

    def serve(self, scenario: Callable[[Service, FakeChannel], Awaitable[None]]) -> tuple[int, FakeChannel]:
        """Run the service until `scenario` has done its part, then stop it as SIGTERM does; the service's exit
        code and its channel."""
        channel = FakeChannel()

        async def run() -> int:
            service = Service(self.settings, self.store, self.runtime, channel)

            async def no_firewall() -> None:  # iptables: not in unit tests
                pass

            service.close_network = no_firewall  # type: ignore[method-assign]
            service._keep_network_closed = no_firewall  # type: ignore[method-assign]
            served = asyncio.create_task(service.run())
            await until(lambda: self.runtime.watchers, "the service to watch the engine")
            await scenario(service, channel)
            service._on_signal(signal.SIGTERM)
            return await asyncio.wait_for(served, WAIT_SECONDS)

        return asyncio.run(run()), channel


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    settings = Settings(source=tmp_path / "config.yaml", data_dir=tmp_path / "data", chats_dir=tmp_path / "chats",
                        access=AccessSettings(allowed_chats=(CHAT,), allowed_users=("*",)),
                        shutdown=ShutdownSettings(drain_timeout=0.1), budgets=BudgetSettings(footer=False))
    store = Store(settings.data_dir / "orchestrator.db")
    paths = layout.chat_paths(settings, resolve_chat(settings, CHAT))
    layout.prepare_instance(settings)
    layout.prepare(paths, settings.agent.uid)
    host = FakeAgentHost(paths, settings.agent.uid).start()
    runtime = FakeRuntime(on_run=host.run_in_container)
    yield Bench(settings, store, runtime, host)
    host.stop()
    store.close()


def test_messages_are_answered_by_one_hot_cli_each_turn_costing_its_own_share(bench: Bench) -> None:
    for message_id, nano_usd in (("om_1", 2_100_000), ("om_2", 1_300_000)):  # as the gateway priced their requests
        bench.store.open_usage(CHAT, "ou_1", message_id, "claude-x", input_tokens=1, output_tokens=1,
                               cache_write_tokens=0, cache_read_tokens=0, cost_nano=nano_usd, complete=True)

    async def scenario(service: Service, channel: FakeChannel) -> None:
        for message_id, text in (("om_1", "hello"), ("om_2", "again")):
            channel.send(message_id, text)
            await until(lambda message_id=message_id: bench.state(message_id) is State.DELIVERED,
                        f"{message_id} to be delivered")

    code, channel = bench.serve(scenario)
    assert code == 0
    assert [item.text for item in channel.delivered] == ["Fake answer to: hello", "Fake answer to: again"]
    assert channel.shown == ["Fake answer to: hello", "Fake answer to: again"]
    first, second = bench.store.messages(CHAT)
    assert first.cost_usd == pytest.approx(0.0021) and second.cost_usd == pytest.approx(0.0013)  # the gateway's
    assert len(set(bench.host.processes)) == 1  # the CLI stayed hot
    session = bench.store.chat(CHAT).session_id
    assert [r.session for r in bench.host.requests] == [None, session] and session is not None
    assert bench.host.requests[0].argv == tuple(cli_argv(bench.settings.agent, bench.settings.defaults))
    gateway = gateway_container_name(bench.settings.instance)
    assert bench.runtime.started == [gateway, bench.container]  # the model gateway first, at the start
    assert bench.runtime.stopped == [bench.container, gateway]  # and stopped last: it served the turns
    assert bench.runtime.ran == []  # no docker exec on a turn's path


def test_an_oom_event_during_a_turn_is_told_with_its_answer(bench: Bench) -> None:
    bench.host.replies = [Reply(hold=True)]

    async def scenario(service: Service, channel: FakeChannel) -> None:
        channel.send("om_1", "hello")
        await until(lambda: bench.host.taken, "the turn to be taken")
        bench.runtime.emit(CHAT, "oom")  # from the engine's watch: the service passes it to the turn runner
        await asyncio.sleep(0)  # the event is handed to the loop with call_soon_threadsafe
        bench.host.release()
        await until(lambda: bench.state("om_1") is State.DELIVERED, "the answer to be delivered")

    bench.serve(scenario)
    [answer] = bench.store.messages(CHAT)
    assert answer.answer is not None and answer.answer.startswith("Fake answer to: hello\n\n(A process in this chat")
    assert "ran out of memory" in answer.answer


def test_a_shutdown_interrupts_the_running_turn_through_the_agent_host(bench: Bench) -> None:
    bench.host.replies = [Reply(hold=True)]

    async def scenario(service: Service, channel: FakeChannel) -> None:
        channel.send("om_1", "hello")
        await until(lambda: bench.host.taken, "the turn to be taken")

    code, channel = bench.serve(scenario)
    assert code == 0
    assert bench.host.interrupts_seen == bench.host.taken  # through the control protocol, no SIGINT
    assert bench.runtime.ran == []
    message = bench.store.messages(CHAT)[0]
    assert message.state is State.FAILED and message.error == INTERRUPTED_BY_RESTART
    assert [item.text for item in channel.delivered] == [f"Fake answer to: hello\n\n{INTERRUPTED_BY_RESTART}"]
    assert bench.runtime.stopped == [bench.container, gateway_container_name(bench.settings.instance)]


def shutdown_with_list_failures(bench: Bench, failures: list[str]) -> list[str]:
    """Serve one message, then stop while the engine fails `failures` container listings; what was logged."""
    logged: list[str] = []
    sink = logger.add(lambda m: logged.append(f"{m.record['level'].name} {m.record['message']}"), format="{message}")

    async def scenario(service: Service, channel: FakeChannel) -> None:
        channel.send("om_1", "hello")
        await until(lambda: bench.state("om_1") is State.DELIVERED, "om_1 to be delivered")
        bench.runtime.list_failures = list(failures)

    try:
        code, _ = bench.serve(scenario)
    finally:
        logger.remove(sink)
    assert code == 0
    return logged


def test_a_shutdown_asks_again_for_the_containers_when_the_engine_fails_once(bench: Bench) -> None:
    logged = shutdown_with_list_failures(bench, ["the Docker engine cannot be reached: connection reset"])
    assert bench.runtime.stopped == [bench.container, gateway_container_name(bench.settings.instance)]
    assert ("WARNING cannot list the chats' containers to stop them (the Docker engine cannot be reached: connection "
            "reset): asking again in a second") in logged


def test_a_shutdown_that_cannot_list_the_containers_leaves_them_and_still_stops_the_gateway(bench: Bench) -> None:
    logged = shutdown_with_list_failures(bench, ["connection reset", "connection refused"])
    assert bench.runtime.containers[bench.container].running  # left for the next start to adopt
    assert bench.runtime.stopped == [gateway_container_name(bench.settings.instance)]
    assert ("ERROR cannot list the chats' containers to stop them (connection refused): they keep running, and the "
            "next start adopts them") in logged
