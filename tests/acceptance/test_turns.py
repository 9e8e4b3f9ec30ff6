"""A message reaches a capped per-chat container running the real Claude Code CLI (issue 2).

Real engine, real agent image, real CLI, real SQLite; the Messages API is the fake on 127.0.0.1.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import docker

from tests.fakes.anthropic import FakeAnthropic
from tests.harness import Orchestrator, StoreView, status_json, wait_until

MIB = 1024 * 1024


def _marker() -> str:
    return uuid.uuid4().hex[:10]


def test_new_chat_gets_a_capped_labelled_non_root_container_and_an_answer(
        make_config, instance: str, docker_client: docker.DockerClient, store_view: StoreView, tmp_path: Path) -> None:
    config = make_config(groups={"alpha": {"cpus": 0.5, "memory": "300m", "pids_limit": 64}})
    marker = _marker()

    bot = Orchestrator(config, chat="alpha")
    bot.send(f"hello {marker}")
    bot.wait_output(f"Fake answer to: hello {marker}")
    assert bot.finish() == 0

    container = docker_client.containers.get(f"{instance}-alpha")
    host = container.attrs["HostConfig"]
    assert container.status == "running"
    assert host["NanoCpus"] == 500_000_000
    assert host["Memory"] == 300 * MIB
    assert host["PidsLimit"] == 64
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["NetworkMode"] == f"{instance}-agents"  # the instance's own network, not the host's
    assert host["ReadonlyRootfs"] is True
    assert container.labels["orchestrator.managed"] == "true"
    assert container.labels["orchestrator.chat_id"] == "alpha"
    data = tmp_path / "data"
    chat_dir = data / "chats" / "alpha"
    mounts = {m["Destination"]: (m["Source"], m["RW"]) for m in container.attrs["Mounts"]}
    # the agent writes its folders; its prompts and the model gateway's socket are root's, read-only to it
    assert mounts == {"/workspace": (str(chat_dir / "workspace"), True),
                      "/home/agent/.claude": (str(chat_dir / "claude"), True),
                      "/turns": (str(chat_dir / "turns"), True), "/input": (str(chat_dir / "input"), False),
                      "/run/orchestrator": (str(data / "run" / "alpha"), False)}  # its own model socket folder
    assert not any("docker.sock" in source for source, _ in mounts.values())
    assert container.attrs["Config"]["User"] == "1000:1000"
    assert container.exec_run(["id", "-u"]).output.decode().strip() == "1000"
    # the caps are the kernel's, not only the engine's bookkeeping
    assert container.exec_run(["cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]).output.decode().strip() \
        == str(300 * MIB)

    [message] = store_view.messages("alpha")
    assert message["state"] == "delivered"
    assert message["answer"] == f"Fake answer to: hello {marker}"
    chat = store_view.chat("alpha")
    assert chat["container_id"] == container.id
    assert chat["session_id"]


def test_session_is_resumed_across_messages_restarts_and_container_removal(
        make_config, instance: str, docker_client: docker.DockerClient, store_view: StoreView,
        fake_api: FakeAnthropic) -> None:
    config = make_config()
    first, second, third, fourth = (f"remember {_marker()}" for _ in range(4))

    bot = Orchestrator(config, chat="beta")
    bot.send(first)
    bot.wait_output(f"Fake answer to: {first}")
    bot.send(second)
    bot.wait_output(f"Fake answer to: {second}")
    assert bot.finish() == 0
    session = store_view.chat("beta")["session_id"]
    assert _history_seen(fake_api, second, earlier=first)

    restarted = Orchestrator(config, chat="beta")
    restarted.send(third)
    restarted.wait_output(f"Fake answer to: {third}")
    assert restarted.finish() == 0
    assert _history_seen(fake_api, third, earlier=first)

    old_id = docker_client.containers.get(f"{instance}-beta").id
    docker_client.containers.get(f"{instance}-beta").remove(force=True)
    after_removal = Orchestrator(config, chat="beta")
    after_removal.send(fourth)
    after_removal.wait_output(f"Fake answer to: {fourth}")
    assert after_removal.finish() == 0
    assert docker_client.containers.get(f"{instance}-beta").id != old_id
    assert _history_seen(fake_api, fourth, earlier=first)
    assert store_view.chat("beta")["session_id"] == session
    assert [m["state"] for m in store_view.messages("beta")] == ["delivered"] * 4


def _history_seen(fake_api: FakeAnthropic, prompt: str, earlier: str) -> bool:
    """The fake received a request for `prompt` whose conversation already held `earlier` and its answer."""
    return any(earlier in str(body["messages"]) and f"Fake answer to: {earlier}" in str(body["messages"])
               for body in fake_api.requests_mentioning(prompt))


def test_two_chats_get_their_own_containers_workspaces_and_limits(
        make_config, instance: str, docker_client: docker.DockerClient, tmp_path: Path) -> None:
    config = make_config(groups={"red": {"memory": "200m", "pids_limit": 50},
                                 "blue": {"memory": "400m", "cpus": 0.25}})
    marker = _marker()
    for chat in ("red", "blue"):
        bot = Orchestrator(config, chat=chat)
        bot.send(f"RUN_BASH: echo {chat}-{marker} > note.txt && cat note.txt")
        bot.wait_output(f"ran: {chat}-{marker}")
        assert bot.finish() == 0

    red = docker_client.containers.get(f"{instance}-red").attrs["HostConfig"]
    blue = docker_client.containers.get(f"{instance}-blue").attrs["HostConfig"]
    assert (red["Memory"], red["PidsLimit"], red["NanoCpus"]) == (200 * MIB, 50, 1_000_000_000)
    assert (blue["Memory"], blue["PidsLimit"], blue["NanoCpus"]) == (400 * MIB, 200, 250_000_000)
    chats = tmp_path / "data" / "chats"
    # the Bash tool ran in each chat's container and wrote into that chat's workspace only
    assert (chats / "red" / "workspace" / "note.txt").read_text().strip() == f"red-{marker}"
    assert (chats / "blue" / "workspace" / "note.txt").read_text().strip() == f"blue-{marker}"
    assert sorted(p.name for p in (chats / "red" / "workspace").iterdir()) == ["note.txt"]

    rows = {row["chat_id"]: row for row in status_json(config)}
    assert set(rows) == {"red", "blue"}
    for chat, row in rows.items():
        assert row["container_name"] == f"{instance}-{chat}"
        assert row["container_state"] == "running"
        assert row["session_id"]
        assert row["busy"] is False and row["queued"] == 0


def test_text_that_looks_like_flags_is_just_the_prompt(make_config, store_view: StoreView) -> None:
    text = f"--resume=nope -p --model x `touch /tmp/pwned` $(id) {_marker()}"
    bot = Orchestrator(make_config(), chat="gamma")
    bot.send(text)
    bot.wait_output(f"Fake answer to: {text}")
    assert bot.finish() == 0
    assert store_view.messages("gamma")[0]["state"] == "delivered"


def test_unknown_session_starts_a_new_one_and_says_so(make_config, store_view: StoreView) -> None:
    config = make_config()
    bot = Orchestrator(config, chat="delta")
    bot.send("first")
    bot.wait_output("Fake answer to: first")
    assert bot.finish() == 0
    lost = str(uuid.uuid4())
    store_view.set_session("delta", lost)

    again = Orchestrator(config, chat="delta")
    again.send("after the loss")
    again.wait_output("The previous conversation could not be found")
    again.wait_output("Fake answer to: after the loss")
    assert again.finish() == 0
    message = store_view.messages("delta")[-1]
    assert message["state"] == "delivered"
    assert lost in message["error"]
    assert store_view.chat("delta")["session_id"] not in (None, lost)


def test_a_crashed_cli_ends_the_turn_with_a_recorded_error(
        make_config, instance: str, docker_client: docker.DockerClient, store_view: StoreView, tmp_path: Path,
        fake_api: FakeAnthropic) -> None:
    bot = Orchestrator(make_config(), chat="epsilon")
    bot.send("SLOW 30 then crash")
    # once the CLI is waiting on the model, kill it the way the kernel would
    turns = tmp_path / "data" / "chats" / "epsilon" / "turns"
    pid_file = wait_until(lambda: next(turns.glob("*/pid"), None), 60, "the turn's pid file")
    pid = wait_until(lambda: pid_file.read_text().strip(), 60, "the CLI's pid")
    wait_until(lambda: fake_api.requests_mentioning("SLOW 30 then crash"), 60, "the CLI to call the model")
    docker_client.containers.get(f"{instance}-epsilon").exec_run(["kill", "-KILL", pid])
    bot.wait_output("Claude Code stopped in the middle of this answer")
    assert bot.finish() == 0
    message = store_view.messages("epsilon")[0]
    assert message["state"] == "failed"
    assert "stopped in the middle of this answer (exit code 137)" in message["error"]
    assert message["turn"] == pid_file.parent.name and re.fullmatch(r"\d+-1-[0-9a-f]{16}", message["turn"])


def test_a_silent_cli_is_stopped_by_its_agent_host_after_the_idle_timeout(
        make_config, instance: str, docker_client: docker.DockerClient, store_view: StoreView,
        tmp_path: Path) -> None:
    bot = Orchestrator(make_config(agent={"idle_timeout": 3}), chat="zeta")
    bot.send("SILENT 60 please")
    bot.wait_output("Claude Code produced no output for 3 seconds", timeout=60)
    bot.send("are you back")
    bot.wait_output("Fake answer to: are you back")
    assert bot.finish() == 0
    failed, answered = store_view.messages("zeta")
    assert failed["state"] == "failed" and "no output for 3 seconds" in failed["error"]
    assert answered["state"] == "delivered"
    # the host ended the CLI (SIGTERM: 143) on the orchestrator's request, and started another for the next turn
    turns = tmp_path / "data" / "chats" / "zeta" / "turns"
    assert (turns / failed["turn"] / "exit_code").read_text() == "143\n"
    pids = [(turns / message["turn"] / "pid").read_text() for message in (failed, answered)]
    assert pids[0] != pids[1]
    host_log = docker_client.containers.get(f"{instance}-zeta").logs().decode()
    assert f"the orchestrator stopped turn {failed['turn']}" in host_log
    assert "did not stop the turn" not in bot.log()  # no fallback was needed


