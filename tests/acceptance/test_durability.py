"""Never lose a turn (issue 4): crashes, graceful shutdown, reconciliation, fair scheduling, idle
containers and resource isolation. Through the fake Feishu, with the real engine and the real CLI."""

from __future__ import annotations

import itertools
import signal
import time
from pathlib import Path

import docker

from orchestrator import agent_host
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.feishu import FakeFeishu
from tests.harness import StoreView, answers, chat, status_json, wait_answer, wait_until


def container(client: docker.DockerClient, instance: str, chat_id: str):
    return client.containers.get(f"{instance}-{chat_id}")


def turn_started(fake_api: FakeAnthropic, text: str) -> None:
    wait_until(lambda: fake_api.requests_mentioning(text), 60, f"the turn for {text!r} to call the model")


def assert_settled(store_view: StoreView, config: Path, *chat_ids: str) -> None:
    """No message is left waiting or running, and `orchestrator status` shows the same."""
    for chat_id in chat_ids:
        states = [m["state"] for m in store_view.messages(chat_id)]
        assert set(states) <= {"delivered", "failed"}, (chat_id, states)
    rows = {row["chat_id"]: row for row in status_json(config)}
    for chat_id in chat_ids:
        assert (rows[chat_id]["busy"], rows[chat_id]["queued"]) == (False, 0)


def turn_intervals(data_dir: Path, chat_id: str) -> list[tuple[float, float]]:
    """When each turn of a chat started and ended, from the files the agent host writes in the turn's folder (its
    CLI's pid when it takes the turn, the exit code last)."""
    turns = data_dir / "chats" / chat_id / "turns"
    return [((turn / "pid").stat().st_mtime, (turn / "exit_code").stat().st_mtime) for turn in turns.iterdir()
            if turn.is_dir()]  # not the host's usage report


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    moments = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                     key=lambda m: (m[0], m[1]))
    return max(itertools.accumulate(delta for _, delta in moments))


def test_kill_9_during_a_turn_and_a_turn_that_ends_while_down_are_each_delivered_once(
        feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic, store_view: StoreView,
        tmp_path: Path) -> None:
    config = feishu_config()
    bot = start(config)
    slow, quick = chat(), chat()
    feishu.push_event(feishu.text_event(slow, "SLOW 6 outlive the crash"))
    feishu.push_event(feishu.text_event(quick, "SLOW 1 finish while it is down"))
    turn_started(fake_api, "SLOW 6 outlive the crash")
    turn_started(fake_api, "SLOW 1 finish while it is down")
    bot.kill()
    # the quick turn ends in its container meanwhile; the slow one goes on
    quick_turns = tmp_path / "data" / "chats" / quick / "turns"
    wait_until(lambda: any(quick_turns.glob("*/exit_code")), 30, "the quick turn to end while the service is down")
    assert not any((tmp_path / "data" / "chats" / slow / "turns").glob("*/exit_code"))

    start(config, connections=2)
    wait_answer(feishu, slow, "Fake answer to: SLOW 6 outlive the crash")
    wait_answer(feishu, quick, "Fake answer to: SLOW 1 finish while it is down")
    wait_until(lambda: all(store_view.messages(c)[0]["state"] == "delivered" for c in (slow, quick)), 30, "delivery")
    assert answers(feishu, slow) == ["Fake answer to: SLOW 6 outlive the crash"]
    assert answers(feishu, quick) == ["Fake answer to: SLOW 1 finish while it is down"]
    assert len(fake_api.requests_mentioning("SLOW 6 outlive the crash")) == 1  # one turn, not a second run
    assert_settled(store_view, config, slow, quick)


def test_sigterm_drains_quick_turns_interrupts_slow_ones_and_stops_containers(
        feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic, store_view: StoreView,
        docker_client: docker.DockerClient, instance: str) -> None:
    config = feishu_config(shutdown={"drain_timeout": 4})
    bot = start(config)
    quick, slow1, slow2 = chat(), chat(), chat()
    feishu.push_event(feishu.text_event(quick, "SLOW 2 quick enough"))
    feishu.push_event(feishu.text_event(slow1, "SLOW 60 too slow one"))
    feishu.push_event(feishu.text_event(slow2, "SLOW 60 too slow two"))
    for text in ("SLOW 2 quick enough", "SLOW 60 too slow one", "SLOW 60 too slow two"):
        turn_started(fake_api, text)

    began = time.monotonic()
    bot.process.send_signal(signal.SIGTERM)
    assert bot.wait(60) == 0
    assert time.monotonic() - began < 40
    assert answers(feishu, quick) == ["Fake answer to: SLOW 2 quick enough"]
    for chat_id in (slow1, slow2):
        [told] = answers(feishu, chat_id)
        assert "interrupted because the bot is restarting" in told
        assert store_view.messages(chat_id)[0]["state"] == "failed"
    running = docker_client.containers.list(filters={"label": f"orchestrator.instance={instance}"})
    assert running == []
    assert_settled(store_view, config, quick, slow1, slow2)


def test_keep_containers_leaves_turns_running_for_the_next_start(
        feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic, store_view: StoreView,
        docker_client: docker.DockerClient, instance: str) -> None:
    config = feishu_config(shutdown={"keep_containers": True})
    bot = start(config)
    chat_id = chat()
    feishu.push_event(feishu.text_event(chat_id, "SLOW 4 survive an upgrade"))
    turn_started(fake_api, "SLOW 4 survive an upgrade")
    assert bot.stop(30) == 0
    assert container(docker_client, instance, chat_id).status == "running"
    assert answers(feishu, chat_id) == []

    start(config, connections=2)
    wait_answer(feishu, chat_id, "Fake answer to: SLOW 4 survive an upgrade")
    assert len(fake_api.requests_mentioning("SLOW 4 survive an upgrade")) == 1
    wait_until(lambda: store_view.messages(chat_id)[0]["state"] == "delivered", 30, "delivery")


def test_containers_killed_or_removed_by_hand(feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic,
                                             store_view: StoreView, docker_client: docker.DockerClient,
                                             instance: str) -> None:
    config = feishu_config()
    start(config)
    chat_id = chat()
    feishu.push_event(feishu.text_event(chat_id, "remember the first"))
    wait_answer(feishu, chat_id, "Fake answer to: remember the first")
    session = store_view.chat(chat_id)["session_id"]

    container(docker_client, instance, chat_id).kill()
    feishu.push_event(feishu.text_event(chat_id, "after a kill"))
    wait_answer(feishu, chat_id, "Fake answer to: after a kill")
    container(docker_client, instance, chat_id).remove(force=True)
    feishu.push_event(feishu.text_event(chat_id, "after a removal"))
    wait_answer(feishu, chat_id, "Fake answer to: after a removal")
    for text in ("after a kill", "after a removal"):
        assert "remember the first" in str(fake_api.requests_mentioning(text)[0]["messages"])
    assert store_view.chat(chat_id)["session_id"] == session

    feishu.push_event(feishu.text_event(chat_id, "SLOW 60 killed under me"))
    turn_started(fake_api, "SLOW 60 killed under me")
    container(docker_client, instance, chat_id).kill()
    wait_answer(feishu, chat_id, "The chat's container stopped during this turn")
    wait_until(lambda: store_view.messages(chat_id)[-1]["state"] == "failed", 30, "the failure recorded")
    assert_settled(store_view, config, chat_id)


def test_turns_are_serial_per_chat_parallel_across_chats_and_globally_bounded(
        feishu: FakeFeishu, feishu_config, start, store_view: StoreView, tmp_path: Path) -> None:
    config = feishu_config(scheduler={"max_concurrent_turns": 2, "queue_depth": 4})
    start(config)
    busy, other1, other2 = chat(), chat(), chat()
    feishu.push_event(feishu.text_event(other1, "SLOW 3 in parallel one"))
    feishu.push_event(feishu.text_event(other2, "SLOW 3 in parallel two"))
    for n in range(5):
        feishu.push_event(feishu.text_event(busy, f"quick {n}"))
    for n in range(5):
        wait_answer(feishu, busy, f"Fake answer to: quick {n}", timeout=120)
    wait_answer(feishu, other1, "Fake answer to: SLOW 3 in parallel one")
    wait_answer(feishu, other2, "Fake answer to: SLOW 3 in parallel two")

    assert answers(feishu, busy) == [f"Fake answer to: quick {n}" for n in range(5)]
    # The card shows the answer's text as it streams, before the turn's CLI has ended and its exit code is
    # written: read the turn files only once every answer is delivered (a loaded CI run read one too early).
    wait_until(lambda: all(m["state"] == "delivered" for c in (busy, other1, other2)
                           for m in store_view.messages(c)), 30, "delivery")
    data = tmp_path / "data"
    assert max_overlap(turn_intervals(data, busy)) == 1
    assert max_overlap(turn_intervals(data, other1) + turn_intervals(data, other2)) == 2
    everything = [i for c in (busy, other1, other2) for i in turn_intervals(data, c)]
    assert max_overlap(everything) == 2
    assert_settled(store_view, config, busy, other1, other2)


def test_a_full_queue_refuses_with_a_reply(feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic,
                                           store_view: StoreView) -> None:
    config = feishu_config(scheduler={"queue_depth": 2})
    start(config)
    chat_id = chat()
    feishu.push_event(feishu.text_event(chat_id, "SLOW 4 hold the line"))
    turn_started(fake_api, "SLOW 4 hold the line")
    for n in range(4):
        feishu.push_event(feishu.text_event(chat_id, f"waiting {n}"))
    wait_answer(feishu, chat_id, "Fake answer to: waiting 1", timeout=60)
    refusals = [t for t in answers(feishu, chat_id) if "2 messages are already waiting" in t]
    assert len(refusals) == 2
    assert not fake_api.requests_mentioning("waiting 2") and not fake_api.requests_mentioning("waiting 3")
    states = {m["text"]: m["state"] for m in store_view.messages(chat_id)}
    assert (states["waiting 2"], states["waiting 3"]) == ("failed", "failed")
    wait_until(lambda: states_of(store_view, chat_id).count("delivered") == 3, 30, "delivery")
    assert_settled(store_view, config, chat_id)


def states_of(store_view: StoreView, chat_id: str) -> list[str]:
    return [m["state"] for m in store_view.messages(chat_id)]


def test_idle_containers_stop_and_come_back_with_the_session(
        feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic, store_view: StoreView,
        docker_client: docker.DockerClient, instance: str) -> None:
    config = feishu_config(containers={"idle_stop": 2})
    start(config)
    chat_id = chat()
    feishu.push_event(feishu.text_event(chat_id, "before the nap"))
    wait_answer(feishu, chat_id, "Fake answer to: before the nap")
    wait_until(lambda: container(docker_client, instance, chat_id).status == "exited", 30, "the idle stop")
    feishu.push_event(feishu.text_event(chat_id, "after the nap"))
    wait_answer(feishu, chat_id, "Fake answer to: after the nap")
    assert "before the nap" in str(fake_api.requests_mentioning("after the nap")[0]["messages"])


def test_max_running_stops_the_least_recently_used_idle_container(
        feishu: FakeFeishu, feishu_config, start, docker_client: docker.DockerClient, instance: str) -> None:
    config = feishu_config(containers={"max_running": 1})
    start(config)
    first, second = chat(), chat()
    feishu.push_event(feishu.text_event(first, "first chat"))
    wait_answer(feishu, first, "Fake answer to: first chat")
    feishu.push_event(feishu.text_event(second, "second chat"))
    wait_answer(feishu, second, "Fake answer to: second chat")
    wait_until(lambda: container(docker_client, instance, first).status == "exited", 30, "the LRU stop")
    assert container(docker_client, instance, second).status == "running"


def test_memory_hog_is_oom_killed_and_told_and_the_chat_goes_on(
        feishu: FakeFeishu, feishu_config, start, store_view: StoreView) -> None:
    hog = chat()
    config = feishu_config(groups={hog: {"memory": "700m"}})
    start(config)
    feishu.push_event(feishu.text_event(hog, "RUN_BASH: head -c 2000m /dev/zero | tail; echo survived"))
    wait_answer(feishu, hog, "ran out of memory (its limit is 700 MiB)", timeout=120)
    feishu.push_event(feishu.text_event(hog, "still there?"))
    wait_answer(feishu, hog, "Fake answer to: still there?")
    wait_until(lambda: states_of(store_view, hog).count("delivered") + states_of(store_view, hog).count("failed")
               == 2, 30, "both settled")
    assert_settled(store_view, config, hog)


def test_cpu_hog_does_not_stop_another_chat_and_a_fork_bomb_hits_pids_limit(
        feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic, docker_client: docker.DockerClient,
        instance: str, store_view: StoreView) -> None:
    hog, bomb, bystander = chat(), chat(), chat()
    config = feishu_config(groups={hog: {"cpus": 0.5}, bomb: {"pids_limit": 80}})
    start(config)
    feishu.push_event(feishu.text_event(hog, "RUN_BASH: timeout 20 sh -c 'while :; do :; done & while :; do :; done';"
                                             " echo hog-done"))
    turn_started(fake_api, "hog-done")
    feishu.push_event(feishu.text_event(bystander, "are you responsive"))
    wait_answer(feishu, bystander, "Fake answer to: are you responsive", timeout=60)
    assert not any("hog-done" in t for t in answers(feishu, hog))  # the hog was still running meanwhile
    wait_answer(feishu, hog, "ran: hog-done", timeout=120)

    feishu.push_event(feishu.text_event(bomb, "RUN_BASH: for i in $(seq 300); do sleep 3 & done; wait; echo forked"))
    # Either the CLI survives and reports the refused forks, or it is among the refused and the user is told
    # (and the container, full of the bomb's children, is restarted).
    told = wait_until(lambda: next((t for t in answers(feishu, bomb) if "ran:" in t or "limit of 80" in t), None),
                      180, "the fork bomb's turn to end")
    if "ran:" in told:
        assert "Resource temporarily unavailable" in str(fake_api.requests_mentioning("echo forked"))
    else:
        assert "This chat's container reached its limit of 80 processes" in told
        assert "it was restarted to clear them" in told
    assert container(docker_client, instance, bomb).attrs["HostConfig"]["PidsLimit"] == 80
    # the agent host counted the refusals from its cgroup's pids.events into the turn's folder (no `docker exec`)
    counted = [int(hits.read_text()) for hits in (config.parent / "data" / "chats" / bomb / "turns").glob(
        f"*/{agent_host.LIMIT_HITS}")]
    assert counted and max(counted) > 0, counted
    feishu.push_event(feishu.text_event(bomb, "after the bomb"))
    wait_answer(feishu, bomb, "Fake answer to: after the bomb", timeout=60)
    wait_until(lambda: all(s in ("delivered", "failed") for c in (hog, bomb, bystander)
                           for s in states_of(store_view, c)), 30, "all settled")
    assert_settled(store_view, config, hog, bomb, bystander)


def test_reconcile_adopts_a_labelled_container_the_store_does_not_know(
        feishu: FakeFeishu, feishu_config, start, docker_client: docker.DockerClient, instance: str,
        store_view: StoreView) -> None:
    stray = chat()
    labels = {"orchestrator.managed": "true", "orchestrator.chat_id": stray, "orchestrator.instance": instance}
    made = docker_client.containers.run("claude-runner:latest", name=f"{instance}-{stray}", labels=labels,
                                        detach=True)
    config = feishu_config()
    bot = start(config)
    bot.wait_log("reconcile: adopted a labelled container the store did not know")
    assert store_view.chat(stray)["container_id"] == made.id
    [row] = [r for r in status_json(config) if r["chat_id"] == stray]
    assert row["container_state"] == "running"
    made.reload()
    assert made.status == "running"  # adopted, never killed
