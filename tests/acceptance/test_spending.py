"""The model gateway and budgets (issue 11): agents reach the model only through the instance's gateway, which alone
holds the key, records every request's usage and enforces the budgets. The real engine, the real CLI in the agent
image, the real gateway container, against the fake Messages API (which answers only requests with the real key).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import docker

from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.feishu import FakeFeishu
from tests.harness import MODEL_KEY, StoreView, answers, chat, wait_answer, wait_until

MODEL = "claude-sonnet-4-5-test"
# $0.001 a token of every kind, so that one request of the fake (10 tokens in, 10 out) costs $0.02.
# The key as a grep pattern that does not match itself: the prompt that asks for the search is kept in the
# container's files (the turn's request, the session), and the search's own command line is in /proc.
KEY_PATTERN = MODEL_KEY[:-1] + f"[{MODEL_KEY[-1]}]"
PRICE = {"input": 1000, "output": 1000, "cache_write": 1000, "cache_read": 1000}


def priced_config(feishu_config, **budgets):
    return feishu_config(agent={"model": MODEL}, budgets={"prices": {MODEL: PRICE}, "footer": True, **budgets})


def dollars(usage: dict) -> Decimal:
    """What the fake's reported usage of one request costs at PRICE, computed here on its own."""
    tokens = sum(int(usage.get(k) or 0) for k in ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                                                  "cache_read_input_tokens"))
    return Decimal(tokens) * Decimal("0.001")


def spent_since(fake_api: FakeAnthropic, first: int) -> Decimal:
    return sum((dollars(usage) for usage in fake_api.usages[first:]), Decimal(0))


def usd(amount: Decimal) -> str:
    return f"${amount:.2f}"


def last_text(feishu: FakeFeishu, chat_id: str) -> str:
    return answers(feishu, chat_id)[-1]


def test_answers_end_with_the_spend_and_cost_agrees_with_the_upstream_to_the_cent(
        feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic, store_view: StoreView) -> None:
    start(priced_config(feishu_config, per_chat_daily_usd=50))
    chat_id, first = chat(), len(fake_api.usages)
    feishu.push_event(feishu.text_event(chat_id, "hello there"))
    wait_answer(feishu, chat_id, "Cost: ")
    one = spent_since(fake_api, first)
    assert one > 0
    assert f"Cost: {usd(one)} this answer, {usd(one)} today in this chat of a budget of $50.00" in last_text(
        feishu, chat_id)
    feishu.push_event(feishu.text_event(chat_id, "RUN_BASH: echo tool-ran"))
    # the finished answer, with its footer: the card shows "ran: tool-ran" while it still streams
    wait_until(lambda: "ran: tool-ran" in last_text(feishu, chat_id) and "Cost: " in last_text(feishu, chat_id), 90,
               "the second answer with its footer")
    total = spent_since(fake_api, first)
    assert f"this answer, {usd(total)} today in this chat" in last_text(feishu, chat_id)
    [_, second] = store_view.messages(chat_id)
    assert Decimal(str(second["cost_usd"])).quantize(Decimal("0.01")) == total - one  # the gateway's price, stored
    feishu.push_event(feishu.text_event(chat_id, "/cost"))
    wait_answer(feishu, chat_id, "This chat: ")
    report = last_text(feishu, chat_id)
    assert f"This chat: {usd(total)} today of a budget of $50.00, {usd(total)} this month" in report
    assert f"You: {usd(total)} today" in report  # the sender's, over all chats (this test's only)


def test_a_spent_budget_stops_the_turn_midway_then_refuses_the_next_until_it_resets(
        feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic) -> None:
    # The day starts 40 s from now (UTC): until then the spending of this test counts, then a new day begins.
    reset = datetime.now(UTC) + timedelta(seconds=40)
    start(priced_config(feishu_config, per_chat_daily_usd="0.03", reset_at=reset.strftime("%H:%M:%S")))
    chat_id, first = chat(), len(fake_api.usages)
    feishu.push_event(feishu.text_event(chat_id, "first question"))
    wait_answer(feishu, chat_id, "Fake answer to: first question")
    requests = len(fake_api.usages)
    # $0.02 spent of $0.03: the turn starts; its first request takes it to $0.04; the one after the tool is refused.
    feishu.push_event(feishu.text_event(chat_id, "RUN_BASH: echo over-budget"))
    wait_answer(feishu, chat_id, "This answer was stopped: This chat has spent")
    spent = spent_since(fake_api, first)
    stopped = last_text(feishu, chat_id)
    assert f"This chat has spent {usd(spent)} of its daily budget of $0.03" in stopped
    assert len(fake_api.usages) == requests + 1  # the refused request never reached the upstream
    # Now no turn starts at all: the chat is told the figure and when the budget resets.
    feishu.push_event(feishu.text_event(chat_id, "are you still there"))
    wait_until(lambda: len(answers(feishu, chat_id)) == 3, 60, "the refusal")
    refused = last_text(feishu, chat_id)
    assert f"This chat has spent {usd(spent)} of its daily budget of $0.03; it resets at" in refused
    # To the second, or to the minute when the reset falls on second 0 (a CI run drew it once).
    assert reset.strftime("%Y-%m-%d %H:%M" + (":%S" if reset.second else "") + " UTC") in refused
    assert not fake_api.requests_mentioning("are you still there")
    wait_until(lambda: datetime.now(UTC) > reset + timedelta(seconds=1), 60, "the budget's reset")
    feishu.push_event(feishu.text_event(chat_id, "a new day"))
    # The new day's answer, finished (its card streams first; the footer comes with its end).
    wait_until(lambda: len(answers(feishu, chat_id)) == 4 and "Cost: " in last_text(feishu, chat_id), 90,
               "an answer on the new day")
    assert "Cost: $0.02 this answer, $0.02 today in this chat" in last_text(feishu, chat_id)  # the day starts at 0
    assert fake_api.requests_mentioning("a new day")


def test_the_real_key_is_nowhere_an_agent_can_look_and_its_token_is_worthless_elsewhere(
        feishu: FakeFeishu, feishu_config, start, instance: str, docker_client: docker.DockerClient,
        fake_api: FakeAnthropic, tmp_path: Path, store_view: StoreView) -> None:
    bot = start(feishu_config(logging={"level": "DEBUG"}))
    chat_id, other = chat(), chat()
    # The agent looks everywhere it can: its environment, every process's, its files; and it prints them.
    feishu.push_event(feishu.text_event(
        chat_id, "RUN_BASH: env; cat /proc/*/environ /proc/*/cmdline | tr '\\0' '\\n'; ps aux; "
                 f"grep -rl '{KEY_PATTERN}' / --exclude-dir=proc --exclude-dir=sys 2>/dev/null; echo searched"))
    wait_answer(feishu, chat_id, "searched")
    feishu.push_event(feishu.text_event(other, "hello from the other chat"))
    wait_answer(feishu, other, "Fake answer to: hello from the other chat")
    assert MODEL_KEY in fake_api.api_keys  # the model was asked with the real key

    container = docker_client.containers.get(f"{instance}-{chat_id}")
    assert MODEL_KEY not in json.dumps(container.attrs)  # not in its config, environment or labels
    _, found = container.exec_run(
        ["sh", "-c", f"cat /proc/*/environ /proc/*/cmdline 2>/dev/null | tr '\\0' '\\n' | grep -c '{KEY_PATTERN}'; "
                     f"grep -rl '{KEY_PATTERN}' / --exclude-dir=proc --exclude-dir=sys 2>/dev/null; true"], user="0")
    assert found.decode().split() == ["0"], found  # as root in the container: no process, no file holds it
    for text in answers(feishu, chat_id) + answers(feishu, other):
        assert MODEL_KEY not in text
    assert MODEL_KEY not in bot.log()
    assert not any(MODEL_KEY in json.dumps(row) for row in store_view.messages(chat_id))

    # The chat's token, replayed outside the instance: the upstream has never heard of it.
    env = dict(item.split("=", 1) for item in container.attrs["Config"]["Env"])
    token = env["ANTHROPIC_API_KEY"]
    assert token != MODEL_KEY and env["ANTHROPIC_BASE_URL"].startswith("http://127.0.0.1:")
    assert token not in fake_api.api_keys  # the gateway never passed a chat's token on
    request = urllib.request.Request(f"{fake_api.base_url}/v1/messages", method="POST", headers={
        "x-api-key": token, "content-type": "application/json", "anthropic-version": "2023-06-01"},
        data=json.dumps({"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}).encode())
    try:
        urllib.request.urlopen(request, timeout=10)
        raise AssertionError("the upstream answered a chat's token")
    except urllib.error.HTTPError as exc:
        assert exc.code == 401
    # And at another chat's socket of the gateway, it is refused too.
    status = post_on_socket(tmp_path / "data" / "run" / other / "model.sock", token)
    assert status.startswith("HTTP/1.1 401"), status


def post_on_socket(path: Path, token: str) -> str:
    """A Messages API request on a gateway socket, as the agent's relay would carry it; the status line back."""
    body = json.dumps({"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}).encode()
    head = (f"POST /v1/messages HTTP/1.1\r\nHost: gateway\r\nx-api-key: {token}\r\ncontent-type: application/json\r\n"
            f"anthropic-version: 2023-06-01\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
    folder = os.open(path.parent, os.O_PATH)  # a short name for the socket, however deep tmp_path is
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(f"/proc/self/fd/{folder}/{path.name}")
            client.sendall(head + body)
            return client.recv(4096).decode(errors="replace").split("\r\n", 1)[0]
    finally:
        os.close(folder)


def test_a_gateway_killed_mid_answer_comes_back_and_what_was_streamed_stays_counted(
        feishu: FakeFeishu, feishu_config, start, instance: str, docker_client: docker.DockerClient,
        fake_api: FakeAnthropic, store_view: StoreView) -> None:
    start(priced_config(feishu_config, per_chat_daily_usd=50))
    chat_id = chat()
    feishu.push_event(feishu.text_event(chat_id, "SLOW 5 through a crash"))
    usage = "select * from usage where chat_id = ? order by id"
    # The row is a reservation from before the request goes upstream; message_start gives it the real input.
    wait_until(lambda: any(row["input_tokens"] == 10 for row in store_view._rows(usage, chat_id)), 60,
               "the answer to start streaming")
    gateway = f"{instance}-gateway"
    os.kill(docker_client.api.inspect_container(gateway)["State"]["Pid"], signal.SIGKILL)  # a crash, not a stop
    wait_answer(feishu, chat_id, "Fake answer to: SLOW 5 through a crash", timeout=120)
    assert docker_client.api.inspect_container(gateway)["RestartCount"] >= 1  # the engine brought it back
    rows = store_view._rows(usage, chat_id)
    cut = [row for row in rows if not row["complete"]]
    # Counted as far as it went: the real input, and the output still reserved (no one was left to settle it).
    assert cut and all(row["input_tokens"] == 10 and row["output_tokens"] > 0 for row in cut)
    assert any(row["complete"] for row in rows)  # the CLI's retry, through the gateway that came back
