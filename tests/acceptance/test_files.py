"""Files in (issue 13): what people send with their messages reaches the agent, through the real lark-oapi client
fetching the fake Feishu's message resources, the orchestrator placing them, the agent host copying them into the
workspace, and the real CLI sending images to the model as image blocks."""

from __future__ import annotations

import base64
from pathlib import Path

from tests.fakes.anthropic import FakeAnthropic, latest_user_blocks
from tests.fakes.feishu import FakeFeishu
from tests.harness import chat, wait_answer

# A real 1x1 PNG: the model's API checks images, and so does the CLI.
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5Erk"
                       "Jggg==")


def inbox(tmp_path: Path, chat_id: str, message_id: str) -> Path:
    return tmp_path / "data" / "chats" / chat_id / "workspace" / "inbox" / message_id


def image_blocks(fake_api: FakeAnthropic) -> list[str]:
    """The base64 data of every image block the model was sent as the newest user message."""
    return [block["source"]["data"] for body in list(fake_api.requests) for block in latest_user_blocks(body)
            if block.get("type") == "image"]


def test_a_screenshot_and_a_picture_with_a_question_reach_the_agent(
        feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic, tmp_path: Path) -> None:
    start(feishu_config())
    chat_id = chat()
    screenshot = feishu.image_event(chat_id, data=PNG)
    feishu.push_event(screenshot)
    wait_answer(feishu, chat_id, "(The user sent only these files.)")
    message_id = screenshot["event"]["message"]["message_id"]
    assert (inbox(tmp_path, chat_id, message_id) / "image-1.png").read_bytes() == PNG
    assert base64.b64encode(PNG).decode() in image_blocks(fake_api)
    wait_answer(feishu, chat_id, f"inbox/{message_id}/image-1.png (image, 70 bytes, shown to you with this message)")

    question = feishu.post_event(chat_id, ["what is in this picture?"], images={"img_question": PNG})
    feishu.push_event(question)
    wait_answer(feishu, chat_id, "Fake answer to: what is in this picture?")
    assert (inbox(tmp_path, chat_id, question["event"]["message"]["message_id"]) / "image-1.png").exists()


def test_oversized_and_hostile_files(feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic,
                                     tmp_path: Path) -> None:
    start(feishu_config(files={"max_bytes": "2k"}))
    chat_id = chat()
    big = feishu.file_event(chat_id, file_name="big.log", data=b"x" * 4096)
    feishu.push_event(big)
    wait_answer(feishu, chat_id, "a file could not be read (big.log:")
    assert "limit of 2.0 KiB" in next(t for t in [m.text for m in feishu.messages(chat_id)] if "big.log" in t)
    assert not inbox(tmp_path, chat_id, big["event"]["message"]["message_id"]).exists()  # nothing partial
    assert not fake_api.requests_mentioning("big.log")  # no turn ran

    hostile = feishu.file_event(chat_id, file_name="../../../../etc/cron.d/-evil\nname.sh", data=b"echo hi")
    feishu.push_event(hostile)
    message_id = hostile["event"]["message"]["message_id"]
    wait_answer(feishu, chat_id, f"inbox/{message_id}/evil_name.sh (file, 7 bytes)")
    assert (inbox(tmp_path, chat_id, message_id) / "evil_name.sh").read_bytes() == b"echo hi"
    workspace = tmp_path / "data" / "chats" / chat_id / "workspace"
    assert [p.relative_to(workspace) for p in workspace.rglob("*") if p.is_file()] == [
        Path("inbox") / message_id / "evil_name.sh"]
