"""Files out (issue 13): what the agent (the real CLI running Bash in its container) leaves in its workspace's
outbox is uploaded through the real lark-oapi client to the fake Feishu's image and file APIs and sent in the chat
after the answer, once, also when the orchestrator is killed between an upload and its send; a link to a host file
sends nothing; a long answer goes as a markdown file."""

from __future__ import annotations

import base64
from pathlib import Path

from tests.fakes.anthropic import FakeAnthropic, long_answer
from tests.fakes.feishu import FakeFeishu
from tests.harness import answers, chat, wait_answer, wait_until

# A real 1x1 PNG (Feishu's image API checks the format).
PNG_BASE64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
CSV = "month,revenue\njan,10\nfeb,12\n"
CSV_PRINTF = r"month,revenue\njan,10\nfeb,12\n"  # printf's escapes for CSV
MAKE_BOTH = (f"RUN_BASH: mkdir -p /workspace/outbox && echo {PNG_BASE64} | base64 -d > /workspace/outbox/chart.png"
             f" && printf '{CSV_PRINTF}' > /workspace/outbox/report.csv && echo made")


def workspace(tmp_path: Path, chat_id: str) -> Path:
    return tmp_path / "data" / "chats" / chat_id / "workspace"


def test_an_image_and_a_file_arrive_once_also_when_killed_between_upload_and_send(
        feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic, tmp_path: Path) -> None:
    config = feishu_config()
    bot = start(config)
    chat_id = chat()
    feishu.hold_sends("image")  # the chart is uploaded, then its send is held: the bot dies before it is taken
    feishu.push_event(feishu.text_event(chat_id, MAKE_BOTH))
    wait_answer(feishu, chat_id, "ran: made")
    wait_until(lambda: feishu.held_sends == 1, 60, "the chart's send held")
    assert [upload.kind for upload in feishu.uploads] == ["image"]
    bot.kill()
    feishu.drop_held_sends()
    start(config, connections=2)
    wait_until(lambda: len(feishu.received_files(chat_id)) == 2, 60, "both files in the chat")
    [chart, report] = feishu.received_files(chat_id)
    assert (chart.kind, chart.data) == ("image", base64.b64decode(PNG_BASE64))
    assert (report.kind, report.name, report.data) == ("file", "report.csv", CSV.encode())
    assert [upload.kind for upload in feishu.uploads] == ["image", "file"]  # the chart's upload was not repeated
    assert sum("ran: made" in text for text in answers(feishu, chat_id)) == 1
    assert list((workspace(tmp_path, chat_id) / "outbox").iterdir()) == []  # sent once: the outbox is emptied
    sent = [m for m in feishu.messages(chat_id) if m.msg_type in ("image", "file")]
    assert all(m.reply_to for m in sent)  # replies to the user's message (so in its topic, if it has one)


def test_a_link_to_a_host_file_sends_nothing_and_send_file_sends_with_a_caption(
        feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic, tmp_path: Path) -> None:
    start(feishu_config())
    chat_id = chat()
    # /etc/passwd in the container's view is the HOST's /etc/passwd to an orchestrator that follows the link.
    feishu.push_event(feishu.text_event(
        chat_id, "RUN_BASH: mkdir -p /workspace/outbox && ln -s /etc/passwd /workspace/outbox/passwd"
                 " && printf 'my notes' > /workspace/notes.txt && send-file /workspace/notes.txt 'the notes'"))
    wait_answer(feishu, chat_id, "outbox/passwd was not sent: it is a link, and links are not followed.")
    wait_until(lambda: feishu.received_files(chat_id), 60, "the notes in the chat")
    wait_answer(feishu, chat_id, "the notes")
    assert feishu.received_files(chat_id) == [("file", "notes.txt", b"my notes")]
    assert not any(b"root:" in upload.data for upload in feishu.uploads)
    assert "will be sent to the chat after this answer" in next(t for t in answers(feishu, chat_id) if "ran:" in t)
    assert not (workspace(tmp_path, chat_id) / "outbox" / "passwd").is_symlink()


def test_a_long_answer_goes_as_a_markdown_file_with_its_beginning_in_the_card(
        feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic) -> None:
    start(feishu_config(files={"answer_as_file_bytes": "8k"}))
    chat_id = chat()
    feishu.push_event(feishu.text_event(chat_id, "LONG_ANSWER 20000"))
    wait_until(lambda: feishu.received_files(chat_id), 90, "answer.md in the chat")
    [answer] = feishu.received_files(chat_id)
    assert (answer.kind, answer.name) == ("file", "answer.md")
    assert answer.data.decode() == long_answer(20000)
    card = next(text for text in answers(feishu, chat_id) if "answer.md" in text)
    assert card.startswith("Paragraph 1:") and "is in the file answer.md below" in card and len(card) < 2500


def test_stickers_merged_forwards_and_cards_get_a_clear_not_supported_reply(
        feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic) -> None:
    start(feishu_config())
    chat_id, before = chat(), len(fake_api.requests)  # the fake model is the session's: other tests' requests too
    for kind, content in (("sticker", {"file_key": "v3_sticker"}), ("merge_forward", {}),
                          ("interactive", {"elements": []})):
        feishu.push_event(feishu.message_event(chat_id, kind, content))
        wait_answer(feishu, chat_id, f"{kind} messages are not supported yet.")
    assert len(fake_api.requests) == before  # no turn ran
