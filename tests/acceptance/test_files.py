"""Files in (issue 13): what people send with their messages reaches the agent, through the real lark-oapi client
fetching the fake Feishu's message resources, the orchestrator placing them, the agent host copying them into the
workspace, and the real CLI sending images to the model as image blocks."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

from PIL import Image, ImageDraw

from tests.fakes.anthropic import FakeAnthropic, latest_user_blocks
from tests.fakes.feishu import FakeFeishu
from tests.harness import StoreView, chat, wait_answer, wait_until

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
    start(feishu_config(files={"wait_for_text": 0}))
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
    start(feishu_config(files={"max_bytes": "2k", "wait_for_text": 0}))
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


def test_a_large_screenshot_reaches_the_model_scaled_down_and_the_workspace_whole(
        feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic, tmp_path: Path) -> None:
    screen = Image.new("RGB", (3000, 2000), "white")
    draw = ImageDraw.Draw(screen)
    draw.rectangle((0, 0, 2999, 80), fill="#3c3c3c")
    draw.rectangle((200, 300, 2800, 1700), outline="crimson", width=12)
    draw.text((260, 360), "Traceback (most recent call last): KeyError: 'user'", fill="black", font_size=64)
    out = io.BytesIO()
    screen.save(out, "PNG")
    start(feishu_config(files={"wait_for_text": 0}))
    chat_id, before = chat(), len(fake_api.requests)  # the fake model is the session's: other tests' images too
    event = feishu.image_event(chat_id, data=out.getvalue())
    feishu.push_event(event)
    message_id = event["event"]["message"]["message_id"]
    wait_answer(feishu, chat_id, f"inbox/{message_id}/image-1.png (image, ")
    wait_answer(feishu, chat_id, "shown to you scaled down to 2000x1333)")
    assert (inbox(tmp_path, chat_id, message_id) / "image-1.png").read_bytes() == out.getvalue()
    [data] = {block["source"]["data"] for body in fake_api.requests[before:] for block in latest_user_blocks(body)
              if block["type"] == "image"}
    shown = Image.open(io.BytesIO(base64.b64decode(data)))
    assert shown.size == (2000, 1333) and shown.format == "PNG"


def test_a_screenshot_then_its_question_are_one_turn_and_files_alone_get_theirs_after_the_wait(
        feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic, tmp_path: Path,
        store_view: StoreView) -> None:
    """People paste a screenshot, then type the question: one turn, whose request to the model holds the question
    and the image, the file in the workspace (fetched under the image's own message id, as Feishu serves it)."""
    wait = 3  # seconds: the question below comes within milliseconds; the file alone waits this long
    start(feishu_config(files={"wait_for_text": wait}))
    chat_id = chat()
    screenshot = feishu.image_event(chat_id, data=PNG)
    question = feishu.text_event(chat_id, "why does this screenshot show an error?")
    feishu.push_event(screenshot)
    feishu.push_event(question)
    wait_answer(feishu, chat_id, "Fake answer to: why does this screenshot show an error?")
    asked = question["event"]["message"]["message_id"]
    blocks = latest_user_blocks(fake_api.requests_mentioning("why does this screenshot show an error?")[0])
    assert any(b.get("type") == "text" and "why does this screenshot show an error?" in b["text"] for b in blocks)
    assert base64.b64encode(PNG).decode() in [b["source"]["data"] for b in blocks if b.get("type") == "image"]
    assert (inbox(tmp_path, chat_id, asked) / "image-1.png").read_bytes() == PNG
    wait_until(lambda: [m["state"] for m in store_view.messages(chat_id)] == ["merged", "delivered"], 30,
               "the screenshot merged into its question, which is delivered")
    assert [m.reply_to for m in feishu.messages(chat_id)] == [asked]  # the screenshot gets no reply of its own
    assert not fake_api.requests_mentioning(f"inbox/{screenshot['event']['message']['message_id']}/")  # no own turn

    log = feishu.file_event(chat_id, file_name="build.log", data=b"error: it broke")
    sent = time.monotonic()
    feishu.push_event(log)
    wait_answer(feishu, chat_id, "(The user sent only these files.)")
    assert time.monotonic() - sent >= wait  # it waited for a text that did not come
    alone = log["event"]["message"]["message_id"]
    assert (inbox(tmp_path, chat_id, alone) / "build.log").read_bytes() == b"error: it broke"
