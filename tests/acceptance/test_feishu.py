"""The Feishu channel (issue 3): the orchestrator's real lark-oapi client against our fake Feishu, the real
CLI in the real image against the fake Messages API."""

from __future__ import annotations

import json
import re
import urllib.request
import uuid

from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.feishu import FakeFeishu, url_verification, webhook_request
from tests.harness import Orchestrator, StoreView, answers, chat, free_port, run_cli, wait_answer, wait_until

ENCRYPT_KEY = "test-encrypt-key"


def test_p2p_message_streams_a_card_that_ends_in_the_answer_as_a_reply(feishu: FakeFeishu, feishu_config, start,
                                                                        fake_api: FakeAnthropic) -> None:
    bot = start(feishu_config())
    chat_id, marker = chat(), uuid.uuid4().hex[:8]
    event = feishu.text_event(chat_id, f"RUN_BASH: sleep 1; echo streamed-{marker}")
    feishu.push_event(event)
    wait_answer(feishu, chat_id, f"ran: streamed-{marker}")
    wait_until(lambda: not feishu.card(feishu.messages(chat_id)[0].card_id).streaming_mode, 30, "the card to close")

    [message] = feishu.messages(chat_id)
    assert message.msg_type == "interactive"
    assert message.reply_to == event["event"]["message"]["message_id"]
    card = feishu.card(message.card_id)
    assert card.text == f"Running it now.\n\nran: streamed-{marker}"
    assert "Running it now." in card.versions  # the first part was shown before the answer was complete
    assert feishu.reactions(message.reply_to) == []  # the Typing sign came and went
    assert any(c.path.endswith("/reactions") and c.method == "POST" for c in feishu.calls)
    bot.stop()


def test_group_messages_need_a_mention_which_is_not_in_the_prompt(feishu: FakeFeishu, feishu_config, start,
                                                                   fake_api: FakeAnthropic) -> None:
    start(feishu_config())
    group, marker = chat(), uuid.uuid4().hex[:8]
    unmentioned = feishu.push_event(feishu.text_event(group, f"just chatting {marker}", chat_type="group"))
    assert feishu.wait_ack(unmentioned, timeout=10).code == 200
    feishu.push_event(feishu.text_event(group, f"what is up {marker}", chat_type="group", mention_bot=True))
    wait_answer(feishu, group, f"Fake answer to: what is up {marker}")
    assert len(feishu.messages(group)) == 1
    assert not fake_api.requests_mentioning(f"just chatting {marker}")
    assert "@_user" not in json.dumps(fake_api.requests_mentioning(f"what is up {marker}")[0]["messages"][-1])

    feishu.push_event(feishu.post_event(group, [f"post line one {marker}", "line two"], title="Title",
                                        chat_type="group", mention_bot=True))
    wait_answer(feishu, group, f"post line one {marker}\nline two")


def test_redelivered_event_is_answered_once_also_after_a_restart(feishu: FakeFeishu, feishu_config, start,
                                                                  store_view: StoreView) -> None:
    config = feishu_config()
    bot = start(config)
    chat_id = chat()
    event = feishu.text_event(chat_id, "only once please")
    for _ in range(3):
        feishu.push_event(event)
    wait_answer(feishu, chat_id, "Fake answer to: only once please")
    assert bot.stop() == 0

    start(config, connections=2)
    frame = feishu.push_event(event)
    assert feishu.wait_ack(frame, timeout=10).code == 200
    feishu.push_event(feishu.text_event(chat_id, "a later message"))
    wait_answer(feishu, chat_id, "Fake answer to: a later message")
    wait_until(lambda: [m["state"] for m in store_view.messages(chat_id)] == ["delivered", "delivered"], 30,
               "both delivered")
    assert answers(feishu, chat_id) == ["Fake answer to: only once please", "Fake answer to: a later message"]


def test_long_connection_dropped_by_the_server_reconnects(feishu: FakeFeishu, feishu_config, start) -> None:
    start(feishu_config())
    chat_id = chat()
    assert feishu.drop_connections() == 1
    feishu.wait_connected(timeout=30, total=2)
    feishu.push_event(feishu.text_event(chat_id, "after the drop"))
    wait_answer(feishu, chat_id, "Fake answer to: after the drop")


def test_long_connection_is_built_anew_when_the_sdk_gives_up_reconnecting(feishu: FakeFeishu, feishu_config,
                                                                         start) -> None:
    """lark-oapi's reconnect ends for good on an endpoint answer it takes as fatal (here: too many connections)
    while start() sleeps on; after feishu.reconnect_after seconds down, the watchdog builds a new client."""
    metrics_port = free_port()
    bot = start(feishu_config({"reconnect_after": 2}, metrics={"listen": f"127.0.0.1:{metrics_port}"}))
    healthz = f"http://127.0.0.1:{metrics_port}/healthz"
    chat_id = chat()
    feishu.refuse_connections()
    assert feishu.drop_connections() == 1
    wait_until(lambda: feishu.refused_connections >= 1, 30, "the SDK's reconnect, refused")
    bot.wait_log("s; building it anew", timeout=30)
    status, body = get(healthz)
    assert (status, json.loads(body)["checks"]["feishu"]) == (503, "the long connection to Feishu is down")
    wait_until(lambda: feishu.refused_connections >= 2, 30, "a new client, refused too")
    feishu.refuse_connections(False)
    feishu.wait_connected(timeout=30, total=2)
    feishu.push_event(feishu.text_event(chat_id, "after the watchdog"))
    wait_answer(feishu, chat_id, "Fake answer to: after the watchdog")
    assert json.loads(get(healthz)[1])["checks"]["feishu"] == "ok"
    assert feishu.open_connections == 1  # the dropped client is gone, not connected beside the new one


def test_agent_text_cannot_mention_everyone_nor_hide_a_link(feishu: FakeFeishu, feishu_config, start) -> None:
    """The fake model answers with the prompt, so the agent's text is whatever the user wrote: every way it
    leaves for Feishu (the streaming card, its summary, the text messages past the card's size) is checked."""
    start(feishu_config())
    chat_id = chat()
    hostile, marker = "<at id=all></at> see [the docs](https://evil.example/login) <font color='red'>!</font>", chat()
    feishu.push_event(feishu.text_event(chat_id, f"{hostile} {'x' * 8100} <at user_id=\"all\"></at> {marker}"))
    wait_answer(feishu, chat_id, marker)
    card_message, text_message = feishu.messages(chat_id)
    card = feishu.card(card_message.card_id)
    shown = [*card.versions, card.json["config"]["summary"]["content"], text_message.text]
    assert not [text for text in shown if re.search(r"<(at|font)|\]\(", text)], shown
    assert "see the docs (https://evil.example/login)" in card.text
    assert card.text.replace("\u200b", "").startswith("Fake answer to: <at id=all></at> see the docs")


def test_rate_limited_sends_all_arrive_in_order_within_the_configured_rates(
        feishu: FakeFeishu, feishu_config, start, store_view: StoreView) -> None:
    config = feishu_config({"rate_per_chat": 3, "rate_per_app": 6})
    start(config)
    chats = [chat() for _ in range(3)]
    feishu.rate_limit(every_nth=3, reset_seconds=1)
    for n in range(2):
        for chat_id in chats:
            feishu.push_event(feishu.text_event(chat_id, f"turn {n} in {chat_id}"))
    for n in range(13):  # 3 chats × (2 answers + 13 notices, shared limiter) = 45 sends, plus the cards
        for chat_id in chats:
            assert run_cli(config, "notify", "--chat", chat_id, f"notice {n}").returncode == 0
    for chat_id in chats:
        wait_answer(feishu, chat_id, "notice 12", timeout=180)
        wait_answer(feishu, chat_id, f"Fake answer to: turn 1 in {chat_id}", timeout=180)
    for chat_id in chats:
        texts = answers(feishu, chat_id)
        notices = [t for t in texts if t.startswith("notice")]
        assert notices == [f"notice {n}" for n in range(13)]  # every one, once, in order
        assert [t for t in texts if t.startswith("Fake answer")] == \
            [f"Fake answer to: turn {n} in {chat_id}" for n in range(2)]
    assert feishu.rejected_count >= 15
    assert feishu.max_rate(per="app") <= 6
    assert feishu.max_rate(per="chat") <= 3
    assert feishu.max_rate(per="card") <= 10
    wait_until(lambda: all(m["state"] == "delivered" for c in chats for m in store_view.messages(c)), 30,
               "every message delivered")


def test_a_reply_survives_feishu_being_down_and_an_orchestrator_restart(
        feishu: FakeFeishu, feishu_config, start, store_view: StoreView) -> None:
    config = feishu_config()
    bot = start(config)
    chat_id = chat()
    feishu.set_down(True)
    feishu.push_event(feishu.text_event(chat_id, "answer me while you cannot"))
    wait_until(lambda: [m["state"] for m in store_view.messages(chat_id)] == ["answered"], 90, "the answer")
    bot.wait_log("retrying in", timeout=60)
    bot.kill()

    restarted = Orchestrator(config)
    restarted.wait_log("cannot read the bot's identity from Feishu")  # still down while it starts
    feishu.set_down(False)
    feishu.wait_connected(timeout=60, total=2)
    wait_answer(feishu, chat_id, "Fake answer to: answer me while you cannot")
    wait_until(lambda: store_view.messages(chat_id)[0]["state"] == "delivered", 30, "delivered")
    assert answers(feishu, chat_id) == ["Fake answer to: answer me while you cannot"]
    restarted.stop()


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_webhook_mode_with_an_encrypt_key(feishu: FakeFeishu, feishu_config, store_view: StoreView) -> None:
    port = free_port()
    config = feishu_config({"mode": "webhook", "encrypt_key": ENCRYPT_KEY, "verification_token": "v-fake",
                            "webhook_port": port})
    bot = Orchestrator(config)
    url = f"http://127.0.0.1:{port}/feishu/events"
    bot.wait_log("listening for Feishu events")
    try:
        status, body = post(url, *webhook_request(url_verification("challenge-123", "v-fake"), ENCRYPT_KEY))
        assert (status, json.loads(body)) == (200, {"challenge": "challenge-123"})

        chat_id = chat()
        forged_body, headers = webhook_request(feishu.text_event(chat_id, "forged"), ENCRYPT_KEY)
        headers["X-Lark-Signature"] = "0" * 64
        assert post(url, forged_body, headers)[0] != 200

        assert post(url, *webhook_request(feishu.text_event(chat_id, "signed"), ENCRYPT_KEY))[0] == 200
        wait_answer(feishu, chat_id, "Fake answer to: signed")
        assert [m["text"] for m in store_view.messages(chat_id)] == ["signed"]
    finally:
        bot.stop()


def test_access_refusal_commands_and_notify(feishu: FakeFeishu, feishu_config, start, store_view: StoreView,
                                            fake_api: FakeAnthropic) -> None:
    allowed = chat()
    config = feishu_config(access={"allowed_chats": [allowed], "allowed_users": "*"})
    start(config)
    stranger = chat()
    for n in range(2):
        feishu.push_event(feishu.text_event(stranger, f"let me in {n}"))
    wait_answer(feishu, stranger, f"add its chat id {stranger} to access.allowed_chats")
    feishu.push_event(feishu.text_event(allowed, "hello"))
    wait_answer(feishu, allowed, "Fake answer to: hello")
    assert len(feishu.messages(stranger)) == 1
    assert not fake_api.requests_mentioning("let me in")

    session = store_view.chat(allowed)["session_id"]
    feishu.push_event(feishu.text_event(allowed, "/status"))
    wait_answer(feishu, allowed, f"Session: {session}")
    feishu.push_event(feishu.text_event(allowed, "/new"))
    wait_answer(feishu, allowed, "Started a new conversation")
    feishu.push_event(feishu.text_event(allowed, "fresh start"))
    wait_answer(feishu, allowed, "Fake answer to: fresh start")
    assert store_view.chat(allowed)["session_id"] not in (None, session)
    assert "Fake answer to: hello" not in str(fake_api.requests_mentioning("fresh start")[0]["messages"])

    feishu.push_event(feishu.text_event(allowed, "SLOW 60 a long one"))
    wait_until(lambda: fake_api.requests_mentioning("SLOW 60 a long one"), 60, "the slow turn to start")
    feishu.push_event(feishu.text_event(allowed, "/stop"))
    wait_answer(feishu, allowed, "Stopped at your request.", timeout=30)
    feishu.push_event(feishu.text_event(allowed, "/help"))
    wait_answer(feishu, allowed, "/stop  stop the answer being worked on")

    result = run_cli(config, "notify", "--chat", allowed, "--wait", "30", "the nightly job finished")
    assert result.returncode == 0, result.stderr
    wait_answer(feishu, allowed, "the nightly job finished")
