"""Topics (issue 13): in a topic the conversation is the topic's. The real orchestrator and CLI, the fake Feishu
delivering messages with a thread_id and placing replies as Feishu does (a reply to a message in a topic goes into
it), and the fake Messages API showing which history each turn resumed."""

from __future__ import annotations

import json

from tests.fakes.anthropic import FakeAnthropic, latest_user_blocks, text_of
from tests.fakes.feishu import FakeFeishu
from tests.harness import StoreView, chat, wait_answer, wait_until

TOPIC = "omt_topic1"


def history_of(fake_api: FakeAnthropic, prompt: str) -> str:
    """Everything the CLI sent the model with the turn whose prompt this is (its resumed conversation)."""
    bodies = [body for body in list(fake_api.requests) if text_of(latest_user_blocks(body)).strip() == prompt]
    assert bodies, f"no request for {prompt!r}"
    return json.dumps(bodies[-1]["messages"])


def test_a_topic_keeps_its_own_session_while_the_chat_keeps_another(
        feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic, store_view: StoreView) -> None:
    start(feishu_config())
    chat_id = chat()
    feishu.push_event(feishu.text_event(chat_id, "remember apple"))
    wait_answer(feishu, chat_id, "Fake answer to: remember apple")
    feishu.push_event(feishu.text_event(chat_id, "remember banana", thread_id=TOPIC))
    wait_answer(feishu, chat_id, "Fake answer to: remember banana")
    feishu.push_event(feishu.text_event(chat_id, "what is in the chat"))
    wait_answer(feishu, chat_id, "Fake answer to: what is in the chat")
    feishu.push_event(feishu.text_event(chat_id, "what is in the topic", thread_id=TOPIC))
    wait_answer(feishu, chat_id, "Fake answer to: what is in the topic")

    in_chat, in_topic = history_of(fake_api, "what is in the chat"), history_of(fake_api, "what is in the topic")
    assert "remember apple" in in_chat and "remember banana" not in in_chat
    assert "remember banana" in in_topic and "remember apple" not in in_topic
    answers = {m.text: m.thread_id for m in feishu.messages(chat_id)}
    assert answers["Fake answer to: remember banana"] == TOPIC  # the answer went into the topic
    assert answers["Fake answer to: what is in the chat"] is None

    chat_session = store_view.chat(chat_id)["session_id"]
    [topic_row] = store_view._rows("select * from thread_sessions where chat_id = ?", chat_id)
    assert chat_session and topic_row["thread_id"] == TOPIC and topic_row["session_id"] not in (None, chat_session)

    # /new in the topic resets the topic only; /status there shows its session
    feishu.push_event(feishu.text_event(chat_id, "/new", thread_id=TOPIC))
    wait_answer(feishu, chat_id, "Started a new conversation in this topic")
    wait_until(lambda: store_view._rows("select session_id from thread_sessions where chat_id = ?",
                                        chat_id)[0]["session_id"] is None, 30, "the topic's session cleared")
    assert store_view.chat(chat_id)["session_id"] == chat_session
    feishu.push_event(feishu.text_event(chat_id, "after new", thread_id=TOPIC))
    wait_answer(feishu, chat_id, "Fake answer to: after new")
    assert "remember banana" not in history_of(fake_api, "after new")
