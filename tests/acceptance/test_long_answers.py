"""Long answers (issue 13): a 200 kB answer of the real CLI reaches the chat whole and in order, the card first and
then text messages, each cut where it renders (paragraphs; code blocks closed and opened again)."""

from __future__ import annotations

import re

from tests.fakes.anthropic import FakeAnthropic, long_answer
from tests.fakes.feishu import FakeFeishu
from tests.harness import StoreView, chat, wait_until

FENCE_LINE = re.compile(r"[ \t]{0,3}(`{3,}|~{3,})")


def words(text: str) -> str:
    return re.sub(r"\s+", "", "\n".join(line for line in text.split("\n") if not FENCE_LINE.match(line)))


def test_a_200_kb_answer_arrives_complete_in_order_and_split_where_it_renders(
        feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic, store_view: StoreView) -> None:
    start(feishu_config(files={"answer_as_file_bytes": 0}))  # messages, not a file: the split is under test
    chat_id = chat()
    event = feishu.text_event(chat_id, "LONG_ANSWER 200000")
    feishu.push_event(event)
    message_id = event["event"]["message"]["message_id"]
    wait_until(lambda: [m["state"] for m in store_view.messages(chat_id)] == ["delivered"], 120,
               "the answer delivered")
    replies = [m for m in feishu.messages(chat_id) if m.reply_to == message_id]
    texts = [m.text for m in replies]
    assert replies[0].card_id is not None and all(m.msg_type == "text" for m in replies[1:])  # the card, then text
    assert len(replies) >= 25 and all(len(text) <= 8000 for text in texts)
    assert words("\n".join(texts)) == words(long_answer(200000))  # nothing lost, nothing out of order
    for text in texts:  # each piece renders: every code block it opens, it closes
        assert sum(1 for line in text.split("\n") if FENCE_LINE.match(line)) % 2 == 0, text[:200]
