"""Files users send, downloaded by FeishuChannel.fetch_attachment from the fake Feishu's message resource API
(127.0.0.1, the real HTTP wire): streamed, refused past the limit with the connection closed at once, and every
refusal Feishu gives (a recalled message, a chat the bot left) or a broken download told briefly."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
from collections.abc import Iterator

import pytest
import requests
from loguru import logger

from orchestrator.channels import ActionReply, Attachment, AttachmentRefused, CardAction, Incoming
from orchestrator.channels import feishu as feishu_module
from orchestrator.channels.console import ConsoleChannel
from orchestrator.channels.feishu import FeishuChannel
from orchestrator.config import FeishuSettings
from tests.fakes.feishu import DownloadFault, FakeFeishu

CHAT = "oc_files"
MB = 1024 * 1024


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeFeishu]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    fake = FakeFeishu().start()
    yield fake
    fake.stop()


def channel(fake: FakeFeishu) -> FeishuChannel:
    settings = FeishuSettings(app_id=fake.app_id, app_secret=fake.app_secret, domain=fake.base_url,
                              verification_token=fake.verification_token)
    return FeishuChannel(settings, lambda chat_id: True)


def fetch(fake: FakeFeishu, message_id: str, attachment: Attachment, max_bytes: int = 10 * MB) -> bytes:
    return asyncio.run(channel(fake).fetch_attachment(message_id, attachment, max_bytes))


def message_id(event: dict) -> str:
    return event["event"]["message"]["message_id"]


def test_a_file_event_through_lark_oapi_reaches_the_service_with_its_attachment(fake: FakeFeishu) -> None:
    """The SDK's event model keeps the content as it came: the webhook's dispatch hands the parsed message on."""
    feishu = channel(fake)
    received: list[Incoming] = []

    async def submit(message: Incoming) -> None:
        received.append(message)

    async def act(action: CardAction) -> ActionReply:
        raise AssertionError("no click expected")

    async def deliver(event: dict) -> None:
        handler = feishu.handler(asyncio.get_running_loop(), submit, act)
        await asyncio.to_thread(feishu._dispatch, handler, {}, json.dumps(event).encode())

    asyncio.run(deliver(fake.file_event(CHAT, "file_v3_notes", "notes 1.txt", message_id="om_f1")))
    assert received == [Incoming(CHAT, "om_f1", "ou_user", "",
                                 attachments=(Attachment("file", "file_v3_notes", "notes 1.txt"),))]


def test_an_image_and_a_file_are_downloaded_whole_and_logged(fake: FakeFeishu) -> None:
    image, data = "img_v3_photo", b"\x89PNG\r\n\x1a\n" + os.urandom(300_000)
    shown = message_id(fake.image_event(CHAT, image, data=data))
    sent = message_id(fake.file_event(CHAT, "file_v3_doc", "report.pdf", data=b"%PDF-1.7 x"))
    lines: list[str] = []
    sink = logger.add(lambda line: lines.append(line.record["message"]), format="{message}")
    try:
        assert fetch(fake, shown, Attachment("image", image, "")) == data
        assert fetch(fake, sent, Attachment("file", "file_v3_doc", "report.pdf")) == b"%PDF-1.7 x"
    finally:
        logger.remove(sink)
    resources = [call for call in fake.calls if "/resources/" in call.path]
    assert [(call.path, call.query, call.status) for call in resources] == [
        (f"/open-apis/im/v1/messages/{shown}/resources/{image}", {"type": "image"}, 200),
        (f"/open-apis/im/v1/messages/{sent}/resources/file_v3_doc", {"type": "file"}, 200)]
    # the fake marks a body complete after its last write, which the client may have read already
    fake.wait_for(lambda: [d.outcome for d in fake.downloads] == ["complete", "complete"], 10, "both complete")
    image_line, file_line = (line for line in lines if line.startswith("downloaded"))
    assert re.fullmatch(rf"downloaded image {image}: {len(data)} bytes in \d+ ms", image_line)
    assert re.fullmatch(r"downloaded file file_v3_doc: 10 bytes in \d+ ms", file_line)


def test_a_file_over_the_limit_is_refused_and_its_download_stopped_at_once(fake: FakeFeishu) -> None:
    size = 4 * MB
    sent = message_id(fake.file_event(CHAT, "file_v3_big", "big.bin", data=bytes(size)))
    # slow, so the socket buffers cannot take the whole body before the client hangs up
    fake.download_fault(DownloadFault(chunk=64 * 1024, delay=0.02), "file_v3_big")
    with pytest.raises(AttachmentRefused, match=r"^it is larger than the limit of 1\.0 MiB$"):
        fetch(fake, sent, Attachment("file", "file_v3_big", "big.bin"), max_bytes=MB)
    fake.wait_for(lambda: fake.downloads[-1].outcome != "sending", 10, "the download to end")
    # closed on its Content-Length, before a limit's worth was read (the socket buffers hold a few chunks)
    assert fake.downloads[-1].outcome == "client_closed" and fake.downloads[-1].sent < MB


def test_a_file_exactly_at_the_limit_is_taken(fake: FakeFeishu) -> None:
    sent = message_id(fake.file_event(CHAT, "file_v3_edge", "edge.bin", data=b"x" * 1000))
    assert fetch(fake, sent, Attachment("file", "file_v3_edge", "edge.bin"), max_bytes=1000) == b"x" * 1000


def test_a_body_without_a_length_is_cut_off_once_it_passes_the_limit() -> None:
    """Feishu declares Content-Length, but a chunked or compressed body may not: what came is counted."""
    body = io.BytesIO(bytes(10 * MB))
    response = requests.Response()
    response.status_code, response.raw = 200, body
    with pytest.raises(AttachmentRefused, match=r"^it is larger than the limit of 100\.0 KiB$"):
        feishu_module._read_within(response, 100 * 1024)
    assert body.tell() <= 100 * 1024 + feishu_module.DOWNLOAD_CHUNK  # it stopped reading


def test_a_body_cut_off_is_refused(fake: FakeFeishu) -> None:
    sent = message_id(fake.file_event(CHAT, "file_v3_cut", "cut.bin", data=bytes(MB)))
    fake.download_fault(DownloadFault(cut_after=300_000), "file_v3_cut")
    with pytest.raises(AttachmentRefused, match=r"^the download from Feishu broke off \(ChunkedEncodingError\)$"):
        fetch(fake, sent, Attachment("file", "file_v3_cut", "cut.bin"))
    assert fake.downloads[-1].outcome == "cut"


def test_a_body_that_stalls_past_the_read_timeout_is_refused(fake: FakeFeishu,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feishu_module, "DOWNLOAD_TIMEOUT", (10.0, 0.3))
    sent = message_id(fake.file_event(CHAT, "file_v3_slow", "slow.bin", data=bytes(MB)))
    fake.download_fault(DownloadFault(chunk=64 * 1024, delay=2.0), "file_v3_slow")
    with pytest.raises(AttachmentRefused, match=r"^the download from Feishu broke off"):
        fetch(fake, sent, Attachment("file", "file_v3_slow", "slow.bin"))


@pytest.mark.parametrize(("arrange", "reason"), [
    (lambda fake, sent: fake.recall(sent), "the message was recalled"),
    (lambda fake, sent: fake.set_bot_in_chat(CHAT, False), "the bot is no longer in this chat"),
])
def test_feishus_refusals_are_told_briefly(fake: FakeFeishu, arrange, reason: str) -> None:
    sent = message_id(fake.image_event(CHAT, "img_v3_gone", data=b"\x89PNG\r\n\x1a\n"))
    arrange(fake, sent)
    with pytest.raises(AttachmentRefused, match=f"^{reason}$"):
        fetch(fake, sent, Attachment("image", "img_v3_gone", ""))
    assert fake.downloads == []


def test_an_unknown_refusal_names_feishus_code(fake: FakeFeishu) -> None:
    sent = message_id(fake.image_event(CHAT, "img_v3_pic", data=b"\x89PNG\r\n\x1a\n"))
    with pytest.raises(AttachmentRefused, match=r"^Feishu answered 400 code 234001: Invalid request param"):
        fetch(fake, sent, Attachment("file", "img_v3_pic", ""))  # an image asked for as a file


@pytest.mark.parametrize(("sent", "attachment"), [
    ("om_1", Attachment("image", "../../auth/v3/x", "")),
    ("om_1", Attachment("image", "img?type=file", "")),
    ("om_1/../om_2", Attachment("image", "img_1", "")),
    ("om_1", Attachment("audio", "file_1", "")),
])
def test_what_cannot_be_a_resource_is_refused_without_a_request(fake: FakeFeishu, sent: str,
                                                                 attachment: Attachment) -> None:
    with pytest.raises(AttachmentRefused, match="not a file Feishu can serve"):
        fetch(fake, sent, attachment)
    assert fake.calls == []


def test_the_terminal_has_no_files() -> None:
    with pytest.raises(AttachmentRefused, match="The terminal sends no files"):
        asyncio.run(ConsoleChannel().fetch_attachment("m1", Attachment("file", "f", "a"), 10))
