"""Two orchestrators, one leader (issue 14): both run against one PostgreSQL store (a real server of the test
session's) and the fake Feishu, which gives each event to the newest long connection, the standby's. The leader runs
the chats with the real engine and CLI; killed with SIGKILL in the middle of a turn, its standby takes the lead,
follows the running turn, and every message is answered once."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.feishu import FakeFeishu
from tests.harness import Orchestrator, answers, chat, run_cli, wait_answer, wait_until

FAILOVER_BOUND = 15.0  # seconds from the leader's death to its standby leading (docs/SCALING.md)


def turn_started(fake_api: FakeAnthropic, text: str) -> None:
    wait_until(lambda: fake_api.requests_mentioning(text), 60, f"the turn for {text!r} to call the model")


def test_the_leader_killed_mid_turn_its_standby_leads_within_the_bound_and_each_message_is_answered_once(
        feishu: FakeFeishu, feishu_config: Callable[..., Path], start: Callable[..., Orchestrator],
        fake_api: FakeAnthropic, postgres_url: str) -> None:
    config = feishu_config(store={"url": postgres_url})
    migrated = run_cli(config, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    leader = start(config)
    leader.wait_log("leading: this orchestrator runs the chats now")
    standby = start(config, connections=2)
    standby.wait_log("standing by: another orchestrator leads")

    slow, other = chat(), chat()
    feishu.push_event(feishu.text_event(slow, "SLOW 8 outlive the leader"))  # to the standby, which stores it
    standby.wait_log("stored for the leader")
    turn_started(fake_api, "SLOW 8 outlive the leader")  # the leader took it from the store and runs it
    assert "taken from a standby" in leader.log()

    leader.kill()
    killed = time.monotonic()
    standby.wait_log("leading: this orchestrator runs the chats now", timeout=FAILOVER_BOUND + 5)
    took = time.monotonic() - killed
    assert took < FAILOVER_BOUND, took
    feishu.push_event(feishu.text_event(other, "after the failover"))

    wait_answer(feishu, slow, "Fake answer to: SLOW 8 outlive the leader")
    wait_answer(feishu, other, "Fake answer to: after the failover")
    assert answers(feishu, slow) == ["Fake answer to: SLOW 8 outlive the leader"]
    assert answers(feishu, other) == ["Fake answer to: after the failover"]
    assert len(fake_api.requests_mentioning("SLOW 8 outlive the leader")) == 1  # followed, not run again
    assert standby.stop() == 0
