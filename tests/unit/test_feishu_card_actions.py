"""Clicks on approval cards through the real lark-oapi dispatcher (orchestrator/channels/feishu.py): a callback is
answered with `act`'s toast and card, never with an error, within Feishu's time; over the long connection also
in frames typed `card`, which lark-oapi 1.7.5 alone drops. No network: the webhook's dispatch is called with a
request body, and the long-connection client is handed a frame."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
from collections.abc import Awaitable, Callable
from typing import Any

import lark_oapi as lark
import pytest
from lark_oapi.ws.pb.pbbp2_pb2 import Frame

from orchestrator.channels import ActionReply, ApprovalView, CardAction, Incoming
from orchestrator.channels import feishu as feishu_module
from orchestrator.channels.feishu import TOAST_CHARS, CardFrameClient, FeishuChannel, card_response
from orchestrator.channels.feishu_render import BREAK, approval_card
from orchestrator.config import FeishuSettings
from tests.fakes.feishu import FakeFeishu

KEY = "0123456789abcdef0123456789abcdef"
VIEW = ApprovalView(key=KEY, chat_id="oc_a", reply_to="om_1", tool="Bash", details=(("Command", "touch x"),),
                    approvers=("ou_alice",), outcome="Allowed once", decided_by="ou_alice", decided_at=0.0)
ALLOWED = ActionReply("Allowed once.", "success", VIEW)


def callback(value: dict[str, Any] | None = None) -> bytes:
    """A `card.action.trigger` callback as Feishu sends it (schema 2.0)."""
    return json.dumps({
        "schema": "2.0",
        "header": {"event_id": "ev_1", "event_type": "card.action.trigger", "create_time": "1700000000000",
                   "app_id": "cli_x", "tenant_key": "t1"},
        "event": {"operator": {"open_id": "ou_alice"}, "token": "c-1",
                  "action": {"tag": "button", "name": "allow",
                             "value": value if value is not None else {"approval": KEY, "choice": "allow"},
                             "form_value": {"text": ""}},
                  "context": {"open_message_id": "om_card", "open_chat_id": "oc_a"}},
    }).encode()


def channel() -> FeishuChannel:
    return FeishuChannel(FeishuSettings(app_id="cli_x", app_secret="secret", mode="webhook"), lambda chat_id: True)


async def no_message(message: Incoming) -> None:
    raise AssertionError("no message expected")


def webhook(act: Callable[[CardAction], Awaitable[ActionReply]], body: bytes,
            feishu: FeishuChannel | None = None) -> dict[str, Any]:
    """The webhook's answer to `body`, dispatched on a worker thread as the server does, `act` on the loop."""
    feishu = feishu or channel()

    async def run() -> bytes:
        handler = feishu.handler(asyncio.get_running_loop(), no_message, act)
        return await asyncio.to_thread(feishu._dispatch, handler, {}, body)

    return json.loads(asyncio.run(run()))


def test_a_click_is_answered_with_the_toast_and_the_card() -> None:
    actions: list[CardAction] = []

    async def act(action: CardAction) -> ActionReply:
        actions.append(action)
        return ALLOWED

    assert webhook(act, callback()) == {"toast": {"type": "success", "content": "Allowed once."},
                                        "card": {"type": "raw", "data": approval_card(VIEW)}}
    assert actions == [CardAction(KEY, "allow", "ou_alice", "oc_a", "om_card")]


def test_a_reply_without_a_card_leaves_the_card_alone() -> None:
    async def act(action: CardAction) -> ActionReply:
        return ActionReply("Only the person who asked and this chat's approvers can decide.", "warning")

    assert webhook(act, callback()) == {
        "toast": {"type": "warning", "content": "Only the person who asked and this chat's approvers can decide."}}


@pytest.mark.parametrize("value", [{}, {"approval": KEY, "choice": "approve"}, {"approval": "../x", "choice": "deny"}])
def test_a_malformed_click_gets_a_toast_not_an_error(value: dict[str, Any]) -> None:
    async def act(action: CardAction) -> ActionReply:
        raise AssertionError("a malformed click must not reach the service")

    assert webhook(act, callback(value)) == {"toast": {"type": "error", "content": "This card cannot be handled."}}


def test_a_failing_service_gets_a_toast_not_an_error() -> None:
    async def act(action: CardAction) -> ActionReply:
        raise RuntimeError("a bug")

    assert webhook(act, callback()) == {"toast": {"type": "error", "content": "This card cannot be handled."}}


def test_a_slow_service_gets_a_busy_toast_and_the_card_is_updated_when_it_answers(monkeypatch) -> None:
    monkeypatch.setattr(feishu_module, "ACK_WAIT_SECONDS", 0.05)
    feishu = channel()
    updated: list[tuple[str, ApprovalView]] = []

    async def update_approval(message_id: str, view: ApprovalView) -> None:
        updated.append((message_id, view))

    feishu.update_approval = update_approval  # type: ignore[method-assign]  # Feishu's PATCH: not reached here

    async def run() -> bytes:
        release = asyncio.Event()

        async def act(action: CardAction) -> ActionReply:
            await release.wait()
            return ALLOWED

        handler = feishu.handler(asyncio.get_running_loop(), no_message, act)
        answer = await asyncio.to_thread(feishu._dispatch, handler, {}, callback())
        assert not updated
        release.set()
        async with asyncio.timeout(5):
            while not updated:
                await asyncio.sleep(0.01)
        return answer

    assert json.loads(asyncio.run(run())) == {
        "toast": {"type": "warning", "content": "The bot is busy; try again in a moment."}}
    assert updated == [("om_card", VIEW)]


def test_the_toast_is_bounded_and_its_level_one_feishu_knows() -> None:
    answer = json.loads(lark.JSON.marshal(card_response(ActionReply("<at id=all></at>" + "x" * 1000, "fatal"))))
    assert answer["toast"]["type"] == "info"
    toast = answer["toast"]["content"]
    assert len(toast.replace(BREAK, "")) == TOAST_CHARS and "<at id=all>" not in toast


class Socket:
    """Where the long-connection client writes its answers."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send(self, data: bytes) -> None:
        self.sent.append(data)


def frame(kind: str, payload: bytes) -> Frame:
    data = Frame(SeqID=1, LogID=1, service=1, method=1, payload=payload)
    for key, value in {"type": kind, "message_id": "msg_1", "trace_id": "tr_1", "sum": "1", "seq": "0"}.items():
        header = data.headers.add()
        header.key, header.value = key, value
    return data


def over_the_long_connection(client_class: type[lark.ws.Client], kind: str) -> list[dict[str, Any]]:
    """What a client answers to a callback frame: the decoded payloads it sent back."""
    feishu = channel()

    async def act(action: CardAction) -> ActionReply:
        return ALLOWED

    async def run() -> list[bytes]:
        handler = feishu.handler(asyncio.get_running_loop(), no_message, act)
        client = client_class("cli_x", "secret", event_handler=handler, domain="http://127.0.0.1:9")
        client._conn = Socket()  # the connection the client would have opened; the frame is handled on its own loop
        await asyncio.to_thread(asyncio.run, client._handle_data_frame(frame(kind, callback())))
        return client._conn.sent

    answers = []
    for sent in asyncio.run(run()):
        reply = Frame()
        reply.ParseFromString(sent)
        answers.append(json.loads(reply.payload))
    return answers


@pytest.mark.parametrize("kind", ["card", "event"])
def test_the_long_connection_answers_callbacks_in_card_and_event_frames(kind: str) -> None:
    [answer] = over_the_long_connection(CardFrameClient, kind)
    assert answer["code"] == 200
    assert json.loads(base64.b64decode(answer["data"])) == {"toast": {"type": "success", "content": "Allowed once."},
                                                            "card": {"type": "raw", "data": approval_card(VIEW)}}


def test_lark_oapi_alone_drops_card_frames() -> None:
    """Why CardFrameClient exists: if this fails, lark-oapi handles card frames itself and the override can go."""
    assert over_the_long_connection(lark.ws.Client, "card") == []


def test_an_approval_card_is_a_reply_sent_once_then_patched(monkeypatch) -> None:
    """Against the fake Feishu's REST API (127.0.0.1): the card JSON as sent, a retry that is a no-op at Feishu
    (the same uuid), and the update that takes the buttons away."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    fake = FakeFeishu().start()
    try:
        asked = fake.text_event("oc_a", "make a file")["event"]["message"]["message_id"]
        feishu = FeishuChannel(FeishuSettings(app_id="cli_fake", app_secret="fake-secret", domain=fake.base_url),
                               lambda chat_id: True)
        waiting = dataclasses.replace(VIEW, reply_to=asked, outcome=None, decided_by=None, decided_at=None)

        async def show_twice_then_settle() -> tuple[str, str]:
            shown = await feishu.show_approval(waiting), await feishu.show_approval(waiting)
            await feishu.update_approval(shown[0], VIEW)
            return shown

        first, again = asyncio.run(show_twice_then_settle())
        [message] = fake.messages("oc_a")
        assert first == again == message.message_id and message.reply_to == asked
        assert message.msg_type == "interactive" and message.uuid == f"approval-{KEY}"
        assert [(update.source, update.card) for update in fake.card_updates(first)] == [("patch", approval_card(VIEW))]
        assert message.content == approval_card(VIEW) and fake.buttons(first) == []
    finally:
        fake.stop()
