"""Hot agents (issue 10): one long-lived Claude Code process per active chat, kept by the agent host in the chat's
container and driven through the chat's folders, with the real engine and the real CLI against the fake model."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import docker

from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.feishu import FakeFeishu
from tests.harness import Orchestrator, StoreView, answers, chat, wait_answer, wait_until


def turn_dirs(data: Path, chat_id: str) -> list[Path]:
    """The chat's turn folders, oldest first."""
    return sorted((p for p in (data / "chats" / chat_id / "turns").iterdir() if p.is_dir()),  # not its usage report
                  key=lambda p: (p / "pid").stat().st_mtime)


def cli_of(turn: Path) -> tuple[str, str]:
    """(pid, process id) of the CLI that answered a turn, as the agent host wrote them."""
    return (turn / "pid").read_text().strip(), (turn / "process").read_text().strip()


def claude_processes(client: docker.DockerClient, instance: str, chat_id: str) -> list[str]:
    """Host pids of the `claude` processes in the chat's container, from the engine (`docker top`)."""
    top = client.containers.get(f"{instance}-{chat_id}").top(ps_args="-eo pid,comm")
    return [row[0] for row in top["Processes"] if row[1] == "claude"]


def ask(bot: Orchestrator) -> str:
    """A question, answered (after an interrupt, the CLI puts "[Request interrupted by user]" before it)."""
    marker = uuid.uuid4().hex[:8]
    bot.send(f"are you there {marker}")
    return bot.wait_output(f"are you there {marker}", timeout=90)


def test_later_messages_are_answered_by_the_same_cli_process_without_exec(
        make_config, instance: str, docker_client: docker.DockerClient, store_view: StoreView, tmp_path: Path) -> None:
    bot = Orchestrator(make_config(), chat="hot")
    for _ in range(4):
        ask(bot)
    data = tmp_path / "data"
    turns = turn_dirs(data, "hot")
    assert len(turns) == 4 and len({cli_of(t) for t in turns}) == 1  # one process answered them all
    assert len(claude_processes(docker_client, instance, "hot")) == 1
    # The costs stored are each turn's own, as the gateway priced its requests (not a running total).
    costs = [m["cost_usd"] for m in store_view.messages("hot")]
    assert len(costs) == 4 and all(c is not None and c > 0 for c in costs)
    assert max(costs) < 1.5 * min(costs)
    # No `docker exec` served a turn: the engine counts every exec a container ever had.
    assert docker_client.api.inspect_container(f"{instance}-hot")["ExecIDs"] in (None, [])
    assert bot.finish() == 0


def test_the_cli_exits_after_hot_idle_and_the_next_message_starts_it_again(
        make_config, instance: str, docker_client: docker.DockerClient, tmp_path: Path,
        fake_api: FakeAnthropic) -> None:
    bot = Orchestrator(make_config(agent={"hot_idle": 2}), chat="cooling")
    ask(bot)
    first = cli_of(turn_dirs(tmp_path / "data", "cooling")[0])
    wait_until(lambda: not claude_processes(docker_client, instance, "cooling"), 30, "the idle CLI to exit")
    assert docker_client.containers.get(f"{instance}-cooling").status == "running"  # the container stays
    ask(bot)
    second = cli_of(turn_dirs(tmp_path / "data", "cooling")[1])
    assert second[1] != first[1]
    # the new process resumed the session: the model saw the first question again
    assert sum("are you there" in p for p in fake_api.prompts()[-3:]) >= 2
    assert bot.finish() == 0


def test_stop_interrupts_through_the_control_protocol_and_the_session_goes_on(
        make_config, fake_api: FakeAnthropic, tmp_path: Path, store_view: StoreView) -> None:
    bot = Orchestrator(make_config(), chat="stopper")
    ask(bot)
    bot.send("SLOW 30 please stop me")
    wait_until(lambda: fake_api.requests_mentioning("SLOW 30 please stop me"), 60, "the slow turn to call the model")
    began = time.monotonic()
    bot.send("/stop")
    bot.wait_output("Stopped at your request", timeout=30)
    assert time.monotonic() - began < 20  # not the 30 s of the slow answer
    ask(bot)
    turns = turn_dirs(tmp_path / "data", "stopper")
    assert len({cli_of(t) for t in turns}) == 1  # interrupted, not killed: the same process answers on
    assert "SIGINT" not in bot.log()  # the fallback was not needed
    states = [m["state"] for m in store_view.messages("stopper")]
    assert states.count("failed") == 1 and "delivered" in states
    assert bot.finish() == 0


def test_a_cli_killed_mid_turn_is_told_and_the_next_message_resumes_without_rerunning_its_tool_call(
        make_config, instance: str, docker_client: docker.DockerClient, fake_api: FakeAnthropic, tmp_path: Path,
        store_view: StoreView) -> None:
    bot = Orchestrator(make_config(), chat="crashy")
    ask(bot)
    session = store_view.chat("crashy")["session_id"]
    bot.send("RUN_BASH: echo ran >> /workspace/ran.log; sleep 60")
    ran = tmp_path / "data" / "chats" / "crashy" / "workspace" / "ran.log"
    wait_until(ran.exists, 60, "the tool call to run")
    [pid] = claude_processes(docker_client, instance, "crashy")
    os.kill(int(pid), signal.SIGKILL)  # as the kernel's OOM killer would
    bot.wait_output("Claude Code stopped in the middle of this answer (exit code 137)", timeout=60)
    ask(bot)
    ask(bot)
    assert ran.read_text() == "ran\n"  # the killed turn's tool call ran once, and was not run again
    assert store_view.chat("crashy")["session_id"] == session  # resumed, not a new conversation
    [new_pid] = claude_processes(docker_client, instance, "crashy")
    assert new_pid != pid
    assert bot.finish() == 0


def test_the_agent_host_outlives_a_kill_9_of_the_orchestrator_and_the_answer_is_delivered_once(
        feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic, docker_client: docker.DockerClient,
        instance: str, tmp_path: Path, store_view: StoreView) -> None:
    config = feishu_config()
    bot = start(config)
    chat_id = chat()
    feishu.push_event(feishu.text_event(chat_id, "warm up"))
    wait_answer(feishu, chat_id, "Fake answer to: warm up")
    container = docker_client.containers.get(f"{instance}-{chat_id}")
    started_at = container.attrs["State"]["StartedAt"]
    feishu.push_event(feishu.text_event(chat_id, "SLOW 5 across the crash"))
    wait_until(lambda: fake_api.requests_mentioning("SLOW 5 across the crash"), 60, "the turn to call the model")
    bot.kill()
    start(config, connections=2)
    wait_answer(feishu, chat_id, "Fake answer to: SLOW 5 across the crash")
    wait_until(lambda: all(m["state"] == "delivered" for m in store_view.messages(chat_id)), 30, "delivery")
    assert sum("across the crash" in a for a in answers(feishu, chat_id)) == 1
    assert len(fake_api.requests_mentioning("SLOW 5 across the crash")) == 1  # one turn, not a second run
    container.reload()
    assert container.attrs["State"]["StartedAt"] == started_at  # the same container and agent host throughout
    turns = turn_dirs(tmp_path / "data", chat_id)
    assert len({cli_of(t) for t in turns}) == 1  # and the same CLI process


def test_a_turn_whose_container_restarted_while_the_orchestrator_was_down_is_told_at_once_not_run_again(
        feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic, docker_client: docker.DockerClient,
        instance: str, store_view: StoreView) -> None:
    """The orchestrator killed mid-turn and the chat's container killed and started again meanwhile (its CLI went
    with it; on Swarm, a task that moved): the new container's agent host ends the turn it finds unfinished, so the
    next start tells the chat at once, not after agent.idle_timeout (120 s here) with the same container running."""
    config = feishu_config(agent={"idle_timeout": 120})
    bot = start(config)
    chat_id = chat()
    feishu.push_event(feishu.text_event(chat_id, "warm up"))
    wait_answer(feishu, chat_id, "Fake answer to: warm up")
    feishu.push_event(feishu.text_event(chat_id, "SLOW 60 lost in the restart"))
    wait_until(lambda: fake_api.requests_mentioning("SLOW 60 lost in the restart"), 60, "the turn to call the model")
    bot.kill()
    container = docker_client.containers.get(f"{instance}-{chat_id}")
    container.kill()  # no grace: the agent host cannot end the turn itself
    container.start()
    began = time.monotonic()
    start(config, connections=2)
    wait_answer(feishu, chat_id, "The chat's container stopped during this turn and runs again now; this answer is "
                                 "not run again", timeout=60)
    assert time.monotonic() - began < 60
    [slow] = [m for m in store_view.messages(chat_id) if "lost in the restart" in m["text"]]
    assert slow["state"] in ("failed", "delivered") and slow["error"], slow
    assert len(fake_api.requests_mentioning("SLOW 60 lost in the restart")) == 1  # not run again
    feishu.push_event(feishu.text_event(chat_id, "after the restart"))
    wait_answer(feishu, chat_id, "Fake answer to: after the restart")


def test_a_config_change_that_needs_a_new_cli_takes_effect_at_the_next_turn(
        make_config, fake_api: FakeAnthropic, tmp_path: Path) -> None:
    bot = Orchestrator(make_config(), chat="reconfigured")
    ask(bot)
    bot.kill()  # the container and its hot CLI stay
    bot = Orchestrator(make_config(agent={"model": "claude-other-model"}), chat="reconfigured")
    ask(bot)
    first, second = (cli_of(t) for t in turn_dirs(tmp_path / "data", "reconfigured"))
    assert first[1] != second[1]  # a new process for the new argv
    assert fake_api.requests[-1]["model"] == "claude-other-model"
    assert bot.finish() == 0
