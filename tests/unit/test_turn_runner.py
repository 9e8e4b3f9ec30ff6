"""The turn runner against a fake engine and a fake agent host that writes the real turn files in tmp_path
(a real store, real settings): the pids-limit retry records the attempt that runs, a turn recorded before a
restart is followed and never requested twice, requests are withdrawn when their turn ends, /stop interrupts
through the host and falls back to SIGINT, a turn's cost is its own share of its CLI process's running total, and
a container that stops or cannot start ends the turn with a reason."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
from loguru import logger

from orchestrator import agent, agent_host, files_out, layout, turn_runner, turns
from orchestrator.agent import Answer, Failure
from orchestrator.approvals import Approvals
from orchestrator.channels import CardAction
from orchestrator.config import BudgetSettings, ChatOptions, Settings, resolve_chat
from orchestrator.layout import ChatPaths
from orchestrator.runtime import ContainerState, container_name, container_spec
from orchestrator.states import State
from orchestrator.store import MessageRecord, Store
from orchestrator.turn_runner import TurnRunner
from tests.fakes.agent_host import WAIT_SECONDS, FakeAgentHost, Reply, until
from tests.fakes.channel import RecordingChannel, RecordingDisplay
from tests.fakes.runtime import FakeRuntime, Ran

CHAT = "oc_a"


@dataclass
class Bench:
    settings: Settings
    store: Store
    runtime: FakeRuntime
    host: FakeAgentHost
    paths: ChatPaths
    runner: TurnRunner

    @property
    def container(self) -> str:
        return container_name(self.settings.instance, CHAT)

    def message(self, text: str = "hello", message_id: str = "om_1") -> MessageRecord:
        self.store.record_received(message_id, CHAT, "ou_1", text)
        self.store.mark_queued(message_id)
        return self.store.message(message_id)

    def run(self, message: MessageRecord, display: RecordingDisplay | None = None) -> asyncio.Task[Answer | Failure]:
        """The message's turn, on a task that gives up after WAIT_SECONDS (a broken runner fails, never hangs)."""
        log = logger.bind(chat_id=CHAT, message_id=message.message_id)
        turn = self.runner.run(message, display or RecordingDisplay(), log)
        return asyncio.create_task(asyncio.wait_for(turn, WAIT_SECONDS))

    def requests(self) -> list[str]:
        return sorted(os.listdir(self.paths.input))


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    settings = Settings(source=tmp_path / "config.yaml", data_dir=tmp_path / "data", chats_dir=tmp_path / "chats",
                        budgets=BudgetSettings(footer=False))
    store = Store(settings.data_dir / "orchestrator.db")
    store.ensure_chat(CHAT)
    layout.prepare_instance(settings)
    paths = layout.chat_paths(settings, resolve_chat(settings, CHAT))
    layout.prepare(paths, settings.agent.uid)
    host = FakeAgentHost(paths, settings.agent.uid)
    runtime = FakeRuntime(on_run=host.run_in_container)

    async def started(chat_id: str) -> None:
        pass

    host.start()
    yield Bench(settings, store, runtime, host, paths,
                TurnRunner(settings, store, runtime, Approvals(settings, store, RecordingChannel()),
                           RecordingChannel().fetch_attachment, started))
    host.stop()
    store.close()


def test_a_turn_is_answered_and_its_request_withdrawn_when_it_ends(bench: Bench) -> None:
    display = RecordingDisplay()

    async def scenario() -> Answer | Failure:
        return await bench.run(bench.message("hello"), display)

    result = asyncio.run(scenario())
    assert isinstance(result, Answer) and result.text == "Fake answer to: hello"
    assert display.shown == ["Fake answer to: hello"]
    [name] = bench.host.taken
    assert bench.store.message("om_1").turn == name and agent_host.turn_order(name) == (1, 1)
    assert bench.host.requests[0].argv == tuple(agent.cli_argv(bench.settings.agent, bench.settings.defaults))
    assert bench.requests() == []  # nothing left for a container started later to take
    assert (bench.paths.turns / name / agent_host.EXIT_CODE).read_text() == "0\n"


def test_the_pids_limit_retry_records_the_attempt_that_runs(bench: Bench) -> None:
    """Attempt 1 ends with no output and the host counted a pids-limit refusal: the container is restarted and
    attempt 2 runs. The message's row names attempt 2's turn while it runs, so a restart now follows attempt 2
    (the row once kept attempt 1's: `running → running` was refused silently)."""
    bench.host.replies = [Reply(output=False, exit_code=1, limit_hits=1), Reply(hold=True, limit_hits=0)]

    async def scenario() -> Answer | Failure:
        task = bench.run(bench.message())
        await until(lambda: len(bench.host.taken) == 2, "attempt 2 to be taken")
        assert bench.store.message("om_1").turn == bench.host.taken[1]
        outbox = bench.paths.workspace / files_out.OUTBOX  # attempt 2 leaves a file to send
        outbox.mkdir()
        (outbox / "report.txt").write_text("made by attempt 2")
        for made in (outbox, outbox / "report.txt"):
            os.chown(made, bench.settings.agent.uid, bench.settings.agent.uid)
        bench.host.release()
        return await task

    result = asyncio.run(scenario())
    assert isinstance(result, Answer)
    first, second = bench.host.taken
    # the file is kept for sending under the turn that made it, where a restart looks for it again
    [(sent, _)] = result.files
    assert (sent.name, Path(sent.path).parent) == ("report.txt", bench.paths.root / files_out.SENDING / second)
    assert [agent_host.turn_order(first), agent_host.turn_order(second)] == [(1, 1), (1, 2)]
    message = bench.store.message("om_1")
    assert message.state is State.RUNNING and message.turn == second
    assert bench.runtime.stopped == [bench.container]  # restarted to clear the processes left over
    assert bench.runtime.started == [bench.container, bench.container]
    assert bench.requests() == []


def test_a_turn_that_wrote_output_is_not_run_again_after_the_pids_limit(bench: Bench) -> None:
    """Its tool calls may have run: the user is told, and nothing runs twice."""
    bench.host.replies = [Reply(hold=True, limit_hits=1)]

    async def scenario() -> Answer | Failure:
        task = bench.run(bench.message())
        await until(lambda: bench.host.taken, "the turn to be taken")
        bench.host.kill()
        return await task

    result = asyncio.run(scenario())
    assert isinstance(result, Failure) and "limit of" in result.reason
    assert len(bench.host.taken) == 1 and bench.runtime.stopped == [bench.container]


def test_the_pids_limit_is_seen_again_after_the_restart_that_cleared_it(bench: Bench) -> None:
    """Attempt 2 is refused processes too: the host counts each turn's refusals (the restarted container's new
    cgroup counts from 0)."""
    bench.host.replies = [Reply(output=False, limit_hits=1), Reply(output=False, limit_hits=1)]

    async def scenario() -> Answer | Failure:
        return await bench.run(bench.message())

    result = asyncio.run(scenario())
    assert len(bench.host.taken) == 2
    assert isinstance(result, Failure) and "limit of" in result.reason
    assert bench.runtime.stopped == [bench.container, bench.container]


def test_a_container_that_stops_mid_turn_ends_the_turn_and_says_why(bench: Bench,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(turn_runner, "CONTAINER_CHECK_SECONDS", 0.05)
    bench.host.replies = [Reply(hold=True)]

    async def scenario() -> Answer | Failure:
        task = bench.run(bench.message())
        await until(lambda: bench.host.taken, "the turn to be taken")
        bench.runtime.crash(bench.container, oom=True)  # the host's turn never ends: it died with the container
        return await task

    result = asyncio.run(scenario())
    assert isinstance(result, Failure) and "ran out of memory" in result.reason
    assert result.partial_text == "Fake answer to: hello"
    assert bench.requests() == []


def pending_turn(bench: Bench, message: MessageRecord) -> turns.TurnFiles:
    """What an orchestrator killed right after requesting a turn leaves: the running message names the turn, and
    its request waits in the chat's input folder of a running container."""
    asyncio.run(bench.runtime.ensure(container_spec(bench.settings, resolve_chat(bench.settings, CHAT), bench.paths,
                                                    b"s" * 32)))
    bench.store.set_container(CHAT, bench.container, bench.runtime.containers[bench.container].id)
    files = turns.turn_files(bench.paths, turns.new_turn_name(message.id, 1), bench.settings.agent.uid)
    bench.store.start_turn(message.message_id, files.name)
    argv = agent.cli_argv(bench.settings.agent, bench.settings.defaults)
    turns.write_request(files, agent_host.encode_request(argv, {}, None, message.text, 600))
    return files


def test_a_turn_taken_before_a_restart_is_followed_not_requested_again(bench: Bench) -> None:
    bench.host.replies = [Reply(hold=True)]
    files = pending_turn(bench, bench.message())

    async def scenario() -> Answer | Failure:
        await until(lambda: bench.host.taken, "the host to take the turn")
        task = bench.run(bench.store.message("om_1"))
        await until(lambda: bench.runner.running_message(CHAT) == "om_1", "the runner to follow the turn")
        bench.host.release()
        return await task

    result = asyncio.run(scenario())
    assert isinstance(result, Answer) and result.text == "Fake answer to: hello"
    assert bench.host.taken == [files.name] and bench.store.message("om_1").turn == files.name
    assert bench.requests() == [] and bench.runtime.started == [bench.container]


def test_a_turn_the_next_containers_host_ended_abandoned_is_told_at_once_not_run_again(bench: Bench) -> None:
    """After a restart, the turn of a container that was replaced meanwhile: the new container's host ended it
    ABANDONED; the chat is told at once (not after agent.idle_timeout), and nothing is requested again."""
    files = pending_turn(bench, bench.message())
    folder = bench.paths.turns / files.name
    folder.mkdir()  # taken by the last container's host, which wrote a line of output and went with its container
    (folder / agent_host.OUTPUT).write_text(json.dumps({"type": "assistant", "message": {"content": [
        {"type": "text", "text": "Half an"}]}}) + "\n")
    (folder / agent_host.EXIT_CODE).write_text(f"{agent_host.ABANDONED}\n")
    for path in (folder, *folder.iterdir()):
        os.chown(path, bench.host.uid, bench.host.uid)  # the agent's, as the real host's are
    os.unlink(bench.paths.input / files.name)

    async def scenario() -> Answer | Failure:
        return await bench.run(bench.store.message("om_1"))

    result = asyncio.run(scenario())
    assert isinstance(result, Failure) and result.reason == turn_runner.RESTARTED_MID_TURN
    assert result.reason.startswith("The chat's container stopped during this turn and runs again now; this answer "
                                    "is not run again")
    assert result.partial_text == "Half an"
    assert bench.requests() == [] and bench.host.taken == []


def test_a_pending_request_taken_within_the_claim_time_is_followed(bench: Bench,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(turn_runner, "CLAIM_SECONDS", 5.0)
    bench.host.pause()  # the container's agent host is still starting
    files = pending_turn(bench, bench.message())

    async def scenario() -> Answer | Failure:
        task = bench.run(bench.store.message("om_1"))
        await until(lambda: bench.runtime.inspected, "the runner to look at the container")
        bench.host.resume()
        return await task

    result = asyncio.run(scenario())
    assert isinstance(result, Answer)
    assert bench.host.taken == [files.name] and bench.store.message("om_1").turn == files.name
    assert bench.requests() == []


def test_a_request_never_taken_is_withdrawn_and_a_new_turn_requested(bench: Bench,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(turn_runner, "CLAIM_SECONDS", 0.2)
    bench.host.pause()
    old = pending_turn(bench, bench.message())

    async def scenario() -> Answer | Failure:
        task = bench.run(bench.store.message("om_1"))
        await until(lambda: bench.requests() and old.name not in bench.requests(), "a new request")
        bench.host.resume()
        return await task

    result = asyncio.run(scenario())
    assert isinstance(result, Answer)
    [new] = bench.host.taken
    assert new != old.name and agent_host.turn_order(new) == (1, 1)
    assert bench.store.message("om_1").turn == new
    assert bench.requests() == []


def stop_held_turn(bench: Bench) -> tuple[Answer | Failure, str | None]:
    async def scenario() -> tuple[Answer | Failure, str | None]:
        task = bench.run(bench.message())
        await until(lambda: bench.host.taken and bench.runner.running_message(CHAT), "the turn to run")
        stopped = await bench.runner.stop(CHAT)
        return await task, stopped

    return asyncio.run(scenario())


def test_stop_interrupts_through_the_agent_host(bench: Bench) -> None:
    bench.host.replies = [Reply(hold=True)]
    result, stopped = stop_held_turn(bench)
    assert stopped == "om_1"
    assert isinstance(result, Failure) and result.reason == "Stopped at your request."
    assert result.partial_text == "Fake answer to: hello"
    assert bench.host.interrupts_seen == bench.host.taken
    assert bench.runtime.ran == []  # no SIGINT, no docker exec
    assert bench.requests() == []  # the request and its interrupt withdrawn


def test_stop_falls_back_to_sigint_when_the_host_does_not_interrupt(bench: Bench,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(turn_runner, "INTERRUPT_GRACE_SECONDS", 0.2)
    bench.host.replies = [Reply(hold=True, obey_interrupt=False)]
    result, stopped = stop_held_turn(bench)
    assert stopped == "om_1"
    assert isinstance(result, Failure) and result.reason == "Stopped at your request."
    [name] = bench.host.interrupts_seen
    pid = (bench.paths.turns / name / agent_host.PID).read_text().strip()
    container_id = bench.runtime.containers[bench.container].id
    assert bench.runtime.ran == [Ran(container_id, ["kill", "-INT", pid], "1000:1000")]
    assert bench.requests() == []


def test_the_next_turn_waits_for_a_stops_sigint_still_on_its_way(bench: Bench,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """/stop, the host does not interrupt, and the SIGINT fallback's `docker exec` is slow: the stopped turn ends by
    itself meanwhile. The chat's next turn is requested only once the SIGINT has landed (on the idle CLI, which it
    ends): requested before, its turn would be the one the SIGINT ended."""
    monkeypatch.setattr(turn_runner, "INTERRUPT_GRACE_SECONDS", 0.2)
    bench.runtime.run_seconds = 1.0
    bench.host.replies = [Reply(hold=True, obey_interrupt=False), Reply(hold=True)]

    async def scenario() -> tuple[Answer | Failure, Answer | Failure]:
        first = bench.run(bench.message("one", "om_1"))
        await until(lambda: bench.host.taken and bench.runner.running_message(CHAT), "the turn to run")
        await bench.runner.stop(CHAT)
        await asyncio.sleep(0.5)  # the grace has passed: the SIGINT is on its way
        bench.host.release()  # and the turn ends by itself before it lands
        stopped = await first
        second = bench.run(bench.message("two", "om_2"))
        await until(lambda: len(bench.host.taken) == 2, "the next turn to be taken")
        await until(lambda: bench.runtime.ran, "the SIGINT to land")
        bench.host.release()
        return stopped, await second

    stopped, after = asyncio.run(scenario())
    assert isinstance(stopped, Failure) and stopped.reason == "Stopped at your request."
    assert [ran.argv[:2] for ran in bench.runtime.ran] == [["kill", "-INT"]]
    assert isinstance(after, Answer) and after.text == "Fake answer to: two", after
    assert bench.host.processes[0] != bench.host.processes[1]  # the SIGINT ended the idle CLI, not the next turn


def test_a_wedged_host_that_ignores_the_interrupt_and_sigint_gets_its_container_stopped(
        bench: Bench, monkeypatch: pytest.MonkeyPatch) -> None:
    """No turn holds its slot for ever: when neither the interrupt nor SIGINT ends it, the container is stopped."""
    monkeypatch.setattr(turn_runner, "INTERRUPT_GRACE_SECONDS", 0.2)
    monkeypatch.setattr(turn_runner, "KILL_GRACE_SECONDS", 0.2)
    monkeypatch.setattr(turn_runner, "CONTAINER_CHECK_SECONDS", 0.1)
    bench.host.replies = [Reply(hold=True, obey_interrupt=False, obey_signals=False)]
    result, stopped = stop_held_turn(bench)
    assert stopped == "om_1"
    assert isinstance(result, Failure) and "container stopped" in result.reason
    assert bench.runtime.stopped == [bench.container]
    assert [ran.argv[:2] for ran in bench.runtime.ran] == [["kill", "-INT"]]
    bench.host.release()


def test_a_container_the_engine_cannot_start_fails_the_turn_for_the_operators_log(bench: Bench) -> None:
    bench.runtime.ensure_failure = "image claude-runner:latest not found"

    async def scenario() -> Answer | Failure:
        return await bench.run(bench.message())

    result = asyncio.run(scenario())
    assert isinstance(result, Failure) and "could not be started" in result.reason
    assert "not found" in result.detail and "not found" not in result.reason
    assert bench.host.taken == [] and bench.requests() == []


def test_stop_with_nothing_running_says_so(bench: Bench) -> None:
    assert asyncio.run(bench.runner.stop(CHAT)) is None
    assert bench.requests() == [] and bench.runtime.ran == []


def priced(bench: Bench, message_id: str | None, nano_usd: int, chat_id: str = CHAT) -> None:
    """A model request of the chat's, as the gateway records it while the message's turn runs."""
    bench.store.open_usage(chat_id, "ou_1", message_id, "claude-x", input_tokens=10, output_tokens=10,
                           cache_write_tokens=0, cache_read_tokens=0, cost_nano=nano_usd, complete=True)


def with_budgets(bench: Bench, **budgets: object) -> None:
    bench.runner.settings = dataclasses.replace(bench.settings, budgets=BudgetSettings(**budgets))  # type: ignore[arg-type]


def test_a_turns_cost_is_what_the_gateway_priced_for_its_message_and_the_footer_says_it(bench: Bench) -> None:
    with_budgets(bench, per_chat_daily_usd=Decimal("5"))
    priced(bench, "om_0", 10_000_000)  # an earlier turn of the chat's, today
    priced(bench, None, 99_000_000, chat_id="oc_other")  # another chat's

    async def scenario() -> Answer | Failure:
        task = bench.run(bench.message("one", "om_1"))
        priced(bench, "om_1", 20_000_000)  # two model requests of this turn's
        priced(bench, "om_1", 1_500_000)
        return await task

    answer = asyncio.run(scenario())
    assert isinstance(answer, Answer) and answer.cost_usd == pytest.approx(0.0215)  # not the CLI's 0.0006
    assert answer.text == ("Fake answer to: one\n\n"
                           "Cost: $0.02 this answer, $0.03 today in this chat of a budget of $5.00")


def test_a_spent_budget_refuses_the_turn_before_it_starts_with_the_figure(bench: Bench) -> None:
    with_budgets(bench, per_chat_daily_usd=Decimal("0.03"))
    priced(bench, "om_0", 30_000_000)
    async def scenario() -> Answer | Failure:
        return await bench.run(bench.message("one", "om_1"))

    result = asyncio.run(scenario())
    assert isinstance(result, Failure)
    assert result.reason.startswith("This chat has spent $0.03 of its daily budget of $0.03; it resets at ")
    assert result.reason.endswith(" UTC.")
    assert bench.host.requests == [] and bench.requests() == []  # nothing was asked of the agent


def test_a_turn_the_gateway_stopped_at_the_budget_says_why(bench: Bench) -> None:
    with_budgets(bench, per_user_daily_usd=Decimal("0.03"))
    refusal = "API Error: 402 This chat has spent $0.04 of its daily budget of $0.03"
    bench.host.replies = [Reply(hold=True, error=refusal)]

    async def scenario() -> Answer | Failure:
        task = bench.run(bench.message("one", "om_1"))
        await until(lambda: bench.host.taken and bench.runner.running_message(CHAT), "the turn to run")
        priced(bench, "om_1", 40_000_000)  # its first request crossed the budget; the gateway refused the next
        bench.host.release()
        return await task

    result = asyncio.run(scenario())
    assert isinstance(result, Failure) and result.partial_text == "Fake answer to: one"
    assert result.reason.startswith("This answer was stopped: You have spent $0.04 of your daily budget of $0.03")


def test_a_turn_waiting_for_approval_shows_it_and_a_cancelled_follower_leaves_it_waiting(bench: Bench) -> None:
    """A shutdown that keeps the containers cancels the follower: the request stays pending, and the next
    follower (after a restart) takes the click and answers the host."""
    settings = dataclasses.replace(bench.settings, defaults=ChatOptions(permission_mode="default"))
    channel = RecordingChannel()
    approvals = Approvals(settings, bench.store, channel)

    async def started(chat_id: str) -> None:
        pass

    bench.host.replies = [Reply(hold=True)]
    message = bench.message("RUN_BASH: touch x")
    display = RecordingDisplay()

    async def scenario() -> Answer | Failure:
        runner = TurnRunner(settings, bench.store, bench.runtime, approvals, channel.fetch_attachment, started)
        log = logger.bind(chat_id=CHAT, message_id=message.message_id)
        task = asyncio.create_task(runner.run(message, display, log))
        await until(lambda: bench.host.taken, "the turn to be taken")
        folder = bench.paths.turns / bench.host.taken[0]
        (folder / "ask-1").write_text(json.dumps({"tool": "Bash", "input": {"command": "touch x"}}))
        os.chown(folder / "ask-1", settings.agent.uid, settings.agent.uid)
        await until(lambda: channel.cards, "the approval card")
        await until(lambda: any("Waiting for approval: Bash" in shown for shown in display.shown), "the note")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        [approval] = bench.store.approvals(CHAT)
        assert approval.pending  # not cancelled with the follower
        again = TurnRunner(settings, bench.store, bench.runtime, approvals, channel.fetch_attachment, started)
        follow = asyncio.create_task(again.run(bench.store.message(message.message_id), RecordingDisplay(), log))
        card = next(iter(channel.cards))
        reply = await approvals.act(CardAction(approval.key, "allow", "ou_1", CHAT, card))
        assert reply.toast == "Allowed once."
        decision = bench.paths.input / agent_host.decision_name(folder.name, 1)
        await until(decision.exists, "the decision for the host")
        bench.host.release()
        return await asyncio.wait_for(follow, WAIT_SECONDS)

    result = asyncio.run(scenario())
    assert isinstance(result, Answer)
    assert bench.store.approvals(CHAT)[0].state == "allowed"


def test_a_cancelled_follower_leaves_the_turns_request_interrupt_and_decisions_for_the_next_start(
        bench: Bench) -> None:
    """A stop that leaves the turn running (a lost leadership, a shutdown that keeps containers) is a kill -9 for the
    turn: its host may not have read an interrupt or a decision yet, and the next leader does not write them again."""
    bench.host.replies = [Reply(hold=True)]
    message = bench.message()

    async def scenario() -> None:
        task = bench.run(message)
        await until(lambda: bench.host.taken and bench.runner.running_message(CHAT), "the turn to run")
        files = turns.turn_files(bench.paths, bench.host.taken[0], bench.settings.agent.uid)
        turns.request_interrupt(files)
        turns.write_decision(files, 1, b"{\"behavior\": \"allow\"}")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    [name] = bench.host.taken
    left = bench.requests()
    assert name + agent_host.INTERRUPT_SUFFIX in left
    assert any(agent_host.DECISION_INFIX in entry for entry in left), left


def with_settings(bench: Bench, *, limits: dict[str, object] | None = None,
                  agent_settings: dict[str, object] | None = None) -> Bench:
    """The bench with a runner of these limits and agent settings."""
    settings = dataclasses.replace(bench.settings,
                                   limits=dataclasses.replace(bench.settings.limits, **(limits or {})),
                                   agent=dataclasses.replace(bench.settings.agent, **(agent_settings or {})))

    async def started(chat_id: str) -> None:
        pass

    runner = TurnRunner(settings, bench.store, bench.runtime, Approvals(settings, bench.store, RecordingChannel()),
                        RecordingChannel().fetch_attachment, started)
    return dataclasses.replace(bench, settings=settings, runner=runner)


def two_turns(bench: Bench) -> tuple[Answer | Failure, Answer | Failure]:
    async def scenario() -> tuple[Answer | Failure, Answer | Failure]:
        return await bench.run(bench.message("one", "om_1")), await bench.run(bench.message("two", "om_2"))

    return asyncio.run(scenario())


def test_a_turn_that_ended_past_the_output_cap_is_told_so_not_taken_for_a_cli_that_stopped(bench: Bench) -> None:
    """The turn wrote more than limits.output_bytes and ended before the reader got that far (a fast flood, a slow
    orchestrator): its result line lies past what may be read, so the user is told of the cap, not that Claude Code
    stopped mid-answer. Its CLI, hot and idle now, is not signalled: it answers the next turn (a SIGTERM sent to it
    once ended the chat's next turn in the fault suite, exit code 143)."""
    bench = with_settings(bench, limits={"output_bytes": 64 * 1024})
    bench.host.replies = [Reply(text="flood " * 40_000)]  # one 240 kB text line, then the result: past 64 KiB
    flood, after = two_turns(bench)
    assert isinstance(flood, Failure), flood
    assert flood.reason == "This answer was stopped: Claude Code wrote more than 64.0 KiB of output in one turn."
    assert bench.runtime.ran == []
    assert isinstance(after, Answer) and after.text == "Fake answer to: two"
    assert bench.host.processes[0] == bench.host.processes[1]
    assert bench.requests() == []  # the stop request withdrawn with the turn


@pytest.mark.parametrize("limit", ["turn_timeout", "idle_timeout"])
def test_a_turn_past_its_time_is_stopped_by_its_host_and_the_next_turn_gets_a_new_cli(bench: Bench,
                                                                                      limit: str) -> None:
    bench = with_settings(bench, agent_settings={limit: 0.3})
    bench.host.replies = [Reply(hold=True)]
    stopped, after = two_turns(bench)
    assert isinstance(stopped, Failure) and "0.3 seconds" in stopped.reason, stopped
    assert stopped.partial_text == "Fake answer to: one"
    assert bench.host.stops_seen == bench.host.taken[:1]
    assert (bench.paths.turns / bench.host.taken[0] / agent_host.EXIT_CODE).read_text() == "143\n"
    assert bench.runtime.ran == []  # no docker exec: the host's own SIGTERM
    assert isinstance(after, Answer) and bench.host.processes[0] != bench.host.processes[1]
    assert bench.requests() == []


def test_a_host_that_does_not_stop_the_turn_gets_sigkill_then_its_container_stopped(
        bench: Bench, monkeypatch: pytest.MonkeyPatch) -> None:
    """An older agent image, or a wedged host: SIGKILL through `docker exec` after the grace; a CLI that outlives
    even that (a host stopped, so nobody writes the exit code) ends with its container stopped."""
    monkeypatch.setattr(turn_runner, "KILL_GRACE_SECONDS", 0.2)
    monkeypatch.setattr(turn_runner, "CONTAINER_CHECK_SECONDS", 0.1)
    bench = with_settings(bench, agent_settings={"turn_timeout": 0.3})
    bench.host.replies = [Reply(hold=True, obey_stop=False), Reply(hold=True, obey_stop=False, obey_signals=False)]
    killed, wedged = two_turns(bench)
    first, second = bench.host.taken
    assert isinstance(killed, Failure) and "0.3 seconds" in killed.reason
    assert (bench.paths.turns / first / agent_host.EXIT_CODE).read_text() == "137\n"
    container_id = bench.runtime.containers[bench.container].id
    pids = [(bench.paths.turns / name / agent_host.PID).read_text().strip() for name in (first, second)]
    assert bench.runtime.ran == [Ran(container_id, ["kill", "-KILL", pid], "1000:1000") for pid in pids]
    assert bench.runtime.stopped == [bench.container]
    assert isinstance(wedged, Failure)
    bench.host.release()


@pytest.mark.parametrize(("state", "told"), [
    (ContainerState("bot-oc_a", "c2", "running", node="worker-7"), "The chat's container was replaced during this "
     "turn; this answer is not run again: please send it again if you still want it."),  # no hostname to the chat
    (ContainerState("bot-oc_a", "t1", "created", node="worker-7"), "The chat's container stopped during this turn "
     "and is being started again; this answer is not run again: please send it again if you still want it."),
    (ContainerState("bot-oc_a", "c1", "exited", exit_code=137), "The chat's container stopped during this turn "
     "(exited, exit code 137)."),
    (ContainerState("bot-oc_a", "", "missing"), "The chat's container was removed during this turn."),
])
def test_what_a_chat_is_told_when_its_container_stopped_under_a_turn(state: ContainerState, told: str) -> None:
    assert turn_runner._stopped_reason(state) == told
