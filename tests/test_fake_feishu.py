"""The fake Feishu is only worth something if the REAL lark-oapi SDK works against it: these tests drive the
SDK's long-connection client, its REST client and its webhook dispatcher against tests/fakes/feishu.py."""

from __future__ import annotations

import io
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import lark_oapi as lark
import pytest
import requests
from lark_oapi.api.cardkit.v1 import (
    Card,
    ContentCardElementRequest,
    ContentCardElementRequestBody,
    CreateCardRequest,
    CreateCardRequestBody,
    SettingsCardRequest,
    SettingsCardRequestBody,
    UpdateCardRequest,
    UpdateCardRequestBody,
)
from lark_oapi.api.im.v1 import (
    CreateFileRequest,
    CreateFileRequestBody,
    CreateFileResponse,
    CreateImageRequest,
    CreateImageRequestBody,
    CreateImageResponse,
    CreateMessageReactionRequest,
    CreateMessageReactionRequestBody,
    CreateMessageRequest,
    CreateMessageRequestBody,
    CreateMessageResponse,
    DeleteMessageReactionRequest,
    Emoji,
    GetMessageResourceRequest,
    GetMessageResourceResponse,
    P2ImMessageReceiveV1,
    PatchMessageRequest,
    PatchMessageRequestBody,
    ReplyMessageRequest,
    ReplyMessageRequestBody,
    UpdateMessageRequest,
    UpdateMessageRequestBody,
)
from lark_oapi.event.callback.model.p2_card_action_trigger import P2CardActionTrigger, P2CardActionTriggerResponse

from tests.fakes import feishu as fake_feishu
from tests.fakes.feishu import (
    DOWNLOAD_LIMIT,
    FILE_LIMIT,
    IMAGE_LIMIT,
    PATCH_QPS,
    TENANT_TOKEN,
    Button,
    DownloadFault,
    FakeFeishu,
    Toast,
    Upload,
    Webhook,
    WsClientThread,
    url_verification,
    webhook_request,
)

CHAT = "oc_chat"


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def fake() -> Iterator[FakeFeishu]:
    server = FakeFeishu().start()
    yield server
    server.stop()


@pytest.fixture
def received() -> queue.Queue[P2ImMessageReceiveV1]:
    return queue.Queue()


@pytest.fixture
def ws(fake: FakeFeishu, received: queue.Queue[P2ImMessageReceiveV1]) -> Iterator[WsClientThread]:
    """A real lark.ws.Client connected to the fake; a handler that sees "boom" raises, to test 500 acks."""

    def on_message(data: P2ImMessageReceiveV1) -> None:
        if "boom" in (data.event.message.content or ""):
            raise RuntimeError("handler failed on purpose")
        received.put(data)

    def make_client() -> lark.ws.Client:
        handler = lark.EventDispatcherHandler.builder("", "").register_p2_im_message_receive_v1(on_message).build()
        return lark.ws.Client(fake.app_id, fake.app_secret, event_handler=handler, domain=fake.base_url,
                              log_level=lark.LogLevel.WARNING)

    runner = WsClientThread(make_client).start()
    fake.wait_connected()
    yield runner
    runner.stop()


@pytest.fixture
def api(fake: FakeFeishu) -> lark.Client:
    return (lark.Client.builder().app_id(fake.app_id).app_secret(fake.app_secret).domain(fake.base_url)
            .log_level(lark.LogLevel.WARNING).build())


def _text_of(data: P2ImMessageReceiveV1) -> str:
    return json.loads(data.event.message.content)["text"]


def _send_text(api: lark.Client, chat_id: str, text: str, uuid: str | None = None) -> CreateMessageResponse:
    body = CreateMessageRequestBody.builder().receive_id(chat_id).msg_type("text").content(json.dumps({"text": text}))
    request = CreateMessageRequest.builder().receive_id_type("chat_id").request_body(
        (body.uuid(uuid) if uuid else body).build()).build()
    return api.im.v1.message.create(request)


# ----- long connection ----------------------------------------------------------------------------------


def test_ws_client_receives_a_pushed_event_and_acks_it(fake: FakeFeishu, ws: WsClientThread,
                                                       received: queue.Queue[P2ImMessageReceiveV1]) -> None:
    event = fake.text_event(CHAT, "hello", chat_type="group", mention_bot=True)
    frame_id = fake.push_event(event)

    data = received.get(timeout=5)
    assert data.event.message.message_id == event["event"]["message"]["message_id"]
    assert data.event.message.chat_type == "group"
    assert _text_of(data) == "@_user_1 hello"
    assert data.event.message.mentions[0].id.open_id == fake.bot_open_id
    assert data.event.sender.sender_id.open_id == "ou_user"
    assert data.header.event_type == "im.message.receive_v1"
    ack = fake.wait_ack(frame_id)
    assert ack.code == 200
    assert ack.latency < 3
    fake.wait_for(lambda: fake.pings >= 1, timeout=10, what="the client's first ping")


def test_split_event_is_joined_by_the_client(fake: FakeFeishu, ws: WsClientThread,
                                             received: queue.Queue[P2ImMessageReceiveV1]) -> None:
    frame_id = fake.push_event(fake.post_event(CHAT, ["first line", "second line"], title="T"), parts=2)

    data = received.get(timeout=5)
    assert json.loads(data.event.message.content)["content"][1][0]["text"] == "second line"
    assert fake.wait_ack(frame_id).code == 200


def test_an_event_over_the_clients_frame_cap_arrives_split_and_is_acked(
        fake: FakeFeishu, ws: WsClientThread, received: queue.Queue[P2ImMessageReceiveV1]) -> None:
    """The fault suite's fuzz once sent a 1.25 MB event in one frame: lark-oapi's websocket (1 MiB frames) closed
    the connection and the event was never acked. Feishu splits big payloads; so does the fake."""
    text = "x" * (1536 * 1024)
    frame_id = fake.push_event(fake.text_event(CHAT, text))
    data = received.get(timeout=10)
    assert json.loads(data.event.message.content)["text"] == text
    assert fake.wait_ack(frame_id, timeout=10).code == 200


def test_client_reconnects_after_the_server_drops_it(fake: FakeFeishu, ws: WsClientThread,
                                                     received: queue.Queue[P2ImMessageReceiveV1]) -> None:
    before = fake.connection_count
    started = time.monotonic()
    assert fake.drop_connections() == 1

    fake.wait_connected(timeout=5, total=before + 1)
    assert time.monotonic() - started < 3
    fake.push_event(fake.text_event(CHAT, "after reconnect"))
    assert _text_of(received.get(timeout=5)) == "after reconnect"


def test_a_refused_reconnect_ends_the_sdks_reconnecting_for_good(fake: FakeFeishu, ws: WsClientThread) -> None:
    """What the orchestrator's watchdog is for: the SDK tries once, takes the answer as fatal, and stops."""
    fake.refuse_connections()
    assert fake.drop_connections() == 1
    fake.wait_for(lambda: fake.refused_connections == 1, 10, "the reconnect, refused")
    fake.refuse_connections(False)
    time.sleep(1.6)  # nothing to wait for: the SDK would retry every ReconnectInterval (1 s) if it still tried
    assert (fake.refused_connections, fake.connection_count, fake.open_connections) == (1, 1, 0)


def test_a_failing_handler_is_acked_with_500(fake: FakeFeishu, ws: WsClientThread) -> None:
    assert fake.wait_ack(fake.push_event(fake.text_event(CHAT, "boom"))).code == 500


def test_stop_retires_a_client_that_was_never_stopped(received: queue.Queue[P2ImMessageReceiveV1]) -> None:
    """What a service under test leaves behind: fake.stop() must end its reconnect attempts for good."""
    first = FakeFeishu().start()
    handler = lark.EventDispatcherHandler.builder("", "").register_p2_im_message_receive_v1(received.put).build()
    runner = WsClientThread(lambda: lark.ws.Client(first.app_id, first.app_secret, event_handler=handler,
                                                   domain=first.base_url, log_level=lark.LogLevel.CRITICAL)).start()
    first.wait_connected()
    first.stop()
    assert [c.code for c in first.calls if c.path == "/callback/ws/endpoint"] == [0, 403]
    assert runner.client is not None and runner.client._conn is None
    runner.stop()


# ----- REST ----------------------------------------------------------------------------------------------


def test_bot_info_through_the_sdk_raw_request(fake: FakeFeishu, api: lark.Client) -> None:
    request = (lark.BaseRequest.builder().http_method(lark.HttpMethod.GET).uri("/open-apis/bot/v3/info")
               .token_types({lark.AccessTokenType.TENANT}).build())
    response = api.request(request)
    assert json.loads(response.raw.content)["bot"]["open_id"] == fake.bot_open_id


def test_send_reply_and_stream_a_card(fake: FakeFeishu, api: lark.Client) -> None:
    user_message = fake.text_event(CHAT, "question", chat_type="group")["event"]["message"]["message_id"]
    sent = _send_text(api, CHAT, "working on it")
    assert sent.success(), sent.msg

    card = {"schema": "2.0", "config": {"streaming_mode": True},
            "body": {"elements": [{"tag": "markdown", "element_id": "answer", "content": ""}]}}
    created = api.cardkit.v1.card.create(CreateCardRequest.builder().request_body(
        CreateCardRequestBody.builder().type("card_json").data(json.dumps(card)).build()).build())
    assert created.success(), created.msg
    card_id = created.data.card_id
    reply = api.im.v1.message.reply(ReplyMessageRequest.builder().message_id(user_message).request_body(
        ReplyMessageRequestBody.builder().msg_type("interactive")
        .content(json.dumps({"type": "card", "data": {"card_id": card_id}})).build()).build())
    assert reply.success(), reply.msg
    for sequence, text in enumerate(["The", "The answer", "The answer is 42"], start=1):
        streamed = api.cardkit.v1.card_element.content(ContentCardElementRequest.builder().card_id(card_id)
                                                       .element_id("answer").request_body(
            ContentCardElementRequestBody.builder().content(text).sequence(sequence).build()).build())
        assert streamed.success(), streamed.msg
    closed = api.cardkit.v1.card.settings(SettingsCardRequest.builder().card_id(card_id).request_body(
        SettingsCardRequestBody.builder().settings(json.dumps({"config": {"streaming_mode": False}}))
        .sequence(4).build()).build())
    assert closed.success(), closed.msg

    shown = fake.messages(CHAT)
    assert [(m.msg_type, m.text, m.reply_to) for m in shown] == [
        ("text", "working on it", None), ("interactive", "The answer is 42", user_message)]
    assert reply.data.chat_id == CHAT
    state = fake.card(card_id)
    assert not state.streaming_mode
    assert state.versions == ["", "The", "The answer", "The answer is 42", "The answer is 42"]


def _markdown_card(text: str) -> str:
    return json.dumps({"schema": "2.0", "body": {"elements": [{"tag": "markdown", "element_id": "md",
                                                               "content": text}]}})


def test_card_sequence_must_grow_and_full_update_replaces_the_card(fake: FakeFeishu, api: lark.Client) -> None:
    card_id = api.cardkit.v1.card.create(CreateCardRequest.builder().request_body(
        CreateCardRequestBody.builder().type("card_json").data(_markdown_card("x")).build()).build()).data.card_id

    def stream(text: str, sequence: int) -> int:
        return api.cardkit.v1.card_element.content(ContentCardElementRequest.builder().card_id(card_id)
                                                   .element_id("md").request_body(
            ContentCardElementRequestBody.builder().content(text).sequence(sequence).build()).build()).code

    assert stream("new", 5) == 0
    assert stream("old", 5) == 300317
    assert fake.card(card_id).texts == {"md": "new"}
    replaced = api.cardkit.v1.card.update(UpdateCardRequest.builder().card_id(card_id).request_body(
        UpdateCardRequestBody.builder().card(Card.builder().type("card_json").data(_markdown_card("final")).build())
        .sequence(6).build()).build())
    assert replaced.success(), replaced.msg
    assert fake.card(card_id).text == "final"


def test_patch_replaces_an_inline_card_message(fake: FakeFeishu, api: lark.Client) -> None:
    sent = api.im.v1.message.create(CreateMessageRequest.builder().receive_id_type("chat_id").request_body(
        CreateMessageRequestBody.builder().receive_id(CHAT).msg_type("interactive")
        .content(_markdown_card("draft")).build()).build())
    patched = api.im.v1.message.patch(PatchMessageRequest.builder().message_id(sent.data.message_id).request_body(
        PatchMessageRequestBody.builder().content(_markdown_card("done")).build()).build())
    assert patched.success(), patched.msg
    assert [m.text for m in fake.messages(CHAT)] == ["done"]


def test_uuid_dedupes_sends_and_text_updates_and_reactions_work(fake: FakeFeishu, api: lark.Client) -> None:
    first = _send_text(api, CHAT, "once", uuid="same-uuid")
    again = _send_text(api, CHAT, "once", uuid="same-uuid")
    assert first.data.message_id == again.data.message_id
    message_id = first.data.message_id

    updated = api.im.v1.message.update(UpdateMessageRequest.builder().message_id(message_id).request_body(
        UpdateMessageRequestBody.builder().msg_type("text").content(json.dumps({"text": "edited"})).build()).build())
    assert updated.success(), updated.msg
    added = api.im.v1.message_reaction.create(CreateMessageReactionRequest.builder().message_id(message_id)
                                              .request_body(CreateMessageReactionRequestBody.builder()
                                                            .reaction_type(Emoji.builder().emoji_type("Typing")
                                                                           .build()).build()).build())
    assert fake.reactions(message_id) == ["Typing"]
    deleted = api.im.v1.message_reaction.delete(DeleteMessageReactionRequest.builder().message_id(message_id)
                                                .reaction_id(added.data.reaction_id).build())
    assert deleted.success(), deleted.msg

    [message] = fake.messages(CHAT)
    assert (message.text, message.edits) == ("edited", 1)
    assert fake.reactions(message_id) == []
    assert [c.chat_id for c in fake.calls if c.write] == [CHAT] * 5


# ----- faults and rates -----------------------------------------------------------------------------------


def test_rate_limited_calls_look_like_feishus(fake: FakeFeishu, api: lark.Client) -> None:
    fake.rate_limit(every_nth=2, reset_seconds=3)
    ok, limited = _send_text(api, CHAT, "a"), _send_text(api, CHAT, "b")

    assert ok.success()
    assert (limited.code, limited.raw.status_code) == (99991400, 429)
    assert limited.raw.headers["x-ogw-ratelimit-reset"] == "3"
    assert limited.raw.headers["x-ogw-ratelimit-limit"] == "50"
    assert fake.rejected_count == 1
    assert [m.text for m in fake.messages(CHAT)] == ["a"]


def test_fractional_rate_limit_is_deterministic(fake: FakeFeishu, api: lark.Client) -> None:
    def pattern() -> list[int]:
        fake.rate_limit(0.5, seed=7)
        return [_send_text(api, CHAT, str(i)).code for i in range(12)]

    first = pattern()
    assert first == pattern()
    assert 0 < first.count(99991400) < 12


def test_max_rate_counts_accepted_writes_per_app_and_per_chat(fake: FakeFeishu, api: lark.Client) -> None:
    for i in range(4):
        _send_text(api, "oc_a", f"a{i}")
    for i in range(2):
        _send_text(api, "oc_b", f"b{i}")
    fake.rate_limit(every_nth=1)
    _send_text(api, "oc_b", "refused")

    assert fake.max_rate(per="app") == 6
    assert fake.max_rate(per="chat") == 4
    assert fake.max_rate(per="app", window=1e-9) == 1
    assert fake.rejected_count == 1


def test_down_answers_503_or_hangs_up(fake: FakeFeishu, api: lark.Client) -> None:
    fake.set_down(True)
    down = _send_text(api, CHAT, "x")
    assert (down.raw.status_code, down.success()) == (503, False)

    fake.set_down(True, hang_up=True)
    with pytest.raises(requests.exceptions.ConnectionError):
        _send_text(api, CHAT, "x")

    fake.set_down(False)
    assert _send_text(api, CHAT, "back").success()
    assert fake.rejected_count == 2


# ----- webhook -------------------------------------------------------------------------------------------


def _raw_request(body: bytes, headers: dict[str, str]) -> lark.RawRequest:
    request = lark.RawRequest()
    request.uri, request.body, request.headers = "/webhook/event", body, headers
    return request


def test_encrypted_signed_webhook_event_passes_the_sdk_checks(fake: FakeFeishu) -> None:
    got: list[P2ImMessageReceiveV1] = []
    handler = (lark.EventDispatcherHandler.builder("encrypt-key", fake.verification_token)
               .register_p2_im_message_receive_v1(got.append).build())

    body, headers = webhook_request(fake.text_event(CHAT, "via webhook"), "encrypt-key")
    response = handler.do(_raw_request(body, headers))
    assert response.status_code == 200, response.content
    assert _text_of(got[0]) == "via webhook"

    tampered = dict(headers, **{"X-Lark-Signature": "0" * 64})
    assert handler.do(_raw_request(body, tampered)).status_code == 500
    assert len(got) == 1


def test_plain_webhook_event_is_checked_by_its_token(fake: FakeFeishu) -> None:
    got: list[P2ImMessageReceiveV1] = []
    handler = (lark.EventDispatcherHandler.builder("", fake.verification_token)
               .register_p2_im_message_receive_v1(got.append).build())
    event = fake.text_event(CHAT, "plain")

    assert handler.do(_raw_request(*webhook_request(event))).status_code == 200
    event["header"]["token"] = "wrong"
    assert handler.do(_raw_request(*webhook_request(event))).status_code == 500
    assert len(got) == 1


def test_url_verification_challenge_round_trips(fake: FakeFeishu) -> None:
    handler = lark.EventDispatcherHandler.builder("encrypt-key", fake.verification_token).build()
    body, headers = webhook_request(url_verification("challenge-123", fake.verification_token), "encrypt-key")

    response = handler.do(_raw_request(body, headers))
    assert json.loads(response.content) == {"challenge": "challenge-123"}


# ----- card callbacks ------------------------------------------------------------------------------------

KEY = "k-approval"
APPROVER, OTHER = "ou_approver", "ou_other"


def _button(label: str, name: str, value: Any, **extra: Any) -> dict[str, Any]:
    return {"tag": "button", "name": name, "text": {"tag": "plain_text", "content": label}, "type": "default",
            "behaviors": [{"type": "callback", "value": value}], **extra}


def _approval_card() -> dict[str, Any]:
    """A card like the approval card of docs/plan: a form with a text input and submit buttons, one in columns."""
    def choice(label: str, name: str) -> dict[str, Any]:
        return _button(label, name, {"approval": KEY, "choice": name}, form_action_type="submit")

    return {"schema": "2.0", "config": {"update_multi": True, "summary": {"content": "Approval needed"}},
            "header": {"title": {"tag": "plain_text", "content": "Bash wants to run"}, "template": "orange"},
            "body": {"elements": [
                {"tag": "markdown", "content": "```\ntouch x\n```"},
                {"tag": "form", "name": "decision", "elements": [
                    {"tag": "input", "name": "text", "placeholder": {"tag": "plain_text", "content": "Reason"}},
                    choice("Allow once", "allow"),
                    {"tag": "column_set", "columns": [{"tag": "column", "elements": [choice("Deny", "deny")]}]},
                ]},
            ]}}


def _decided_card(outcome: str) -> dict[str, Any]:
    return {"schema": "2.0", "config": {"update_multi": True},
            "header": {"title": {"tag": "plain_text", "content": "Bash"}, "template": "green"},
            "body": {"elements": [{"tag": "markdown", "content": outcome}]}}


def _send_card(api: lark.Client, card: dict[str, Any]) -> str:
    sent = api.im.v1.message.create(CreateMessageRequest.builder().receive_id_type("chat_id").request_body(
        CreateMessageRequestBody.builder().receive_id(CHAT).msg_type("interactive").content(json.dumps(card))
        .build()).build())
    assert sent.success(), sent.msg
    return sent.data.message_id


def _deciding(clicks: list[P2CardActionTrigger]) -> Callable[[P2CardActionTrigger], P2CardActionTriggerResponse]:
    """An app's click handler: answers with a toast and the decided card; a reason "slow" makes it miss 3 s."""
    def on_click(data: P2CardActionTrigger) -> P2CardActionTriggerResponse:
        clicks.append(data)
        if (data.event.action.form_value or {}).get("text") == "slow":
            time.sleep(fake_feishu.CALLBACK_DEADLINE + 0.3)  # the behaviour under test: slower than Feishu waits
        outcome = f"{data.event.action.value['choice']} by {data.event.operator.open_id}"
        return P2CardActionTriggerResponse({"toast": {"type": "success", "content": outcome},
                                            "card": {"type": "raw", "data": _decided_card(outcome)}})
    return on_click


@pytest.fixture
def clicks() -> list[P2CardActionTrigger]:
    return []


@pytest.fixture
def card_ws(fake: FakeFeishu, clicks: list[P2CardActionTrigger]) -> Iterator[WsClientThread]:
    """A real lark.ws.Client whose dispatcher answers card.action.trigger as `_deciding` does."""
    def make_client() -> lark.ws.Client:
        handler = lark.EventDispatcherHandler.builder("", "").register_p2_card_action_trigger(_deciding(clicks)).build()
        return lark.ws.Client(fake.app_id, fake.app_secret, event_handler=handler, domain=fake.base_url,
                              log_level=lark.LogLevel.CRITICAL)

    runner = WsClientThread(make_client).start()
    fake.wait_connected()
    yield runner
    runner.stop()


class SdkWebhook:
    """The SDK's own dispatcher (EventDispatcherHandler.do) behind an HTTP server on 127.0.0.1, as an app in webhook
    mode runs it; it keeps the raw body of every request."""

    def __init__(self, dispatcher: lark.EventDispatcherHandler) -> None:
        self.bodies: list[bytes] = []
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                request = lark.RawRequest()
                request.uri, request.body = self.path, self.rfile.read(int(self.headers["Content-Length"]))
                request.headers = dict(self.headers.items())  # case kept: the SDK's header lookup is case-sensitive
                bodies.append(request.body)
                response = dispatcher.do(request)
                self.send_response(response.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(response.content)))
                self.end_headers()
                self.wfile.write(response.content)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def webhook(self, encrypt_key: str | None) -> Webhook:
        return Webhook(f"http://127.0.0.1:{self.server.server_address[1]}/feishu/card", encrypt_key)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sdk_webhook(fake: FakeFeishu, clicks: list[P2CardActionTrigger]) -> Iterator[SdkWebhook]:
    handler = (lark.EventDispatcherHandler.builder("encrypt-key", fake.verification_token)
               .register_p2_card_action_trigger(_deciding(clicks)).build())
    server = SdkWebhook(handler)
    yield server
    server.close()


def test_buttons_are_found_in_forms_and_columns_and_a_click_sends_the_form(fake: FakeFeishu, api: lark.Client) -> None:
    card = _approval_card()
    card["body"]["elements"] += [
        {"tag": "button", "name": "legacy", "text": {"tag": "plain_text", "content": "Legacy"}, "value": {"v": 1}},
        _button("Greyed", "greyed", {"v": 2}, disabled=True),
        {"tag": "button", "text": {"tag": "plain_text", "content": "Docs"},
         "behaviors": [{"type": "open_url", "default_url": "https://open.feishu.cn"}]},
    ]
    message_id = _send_card(api, card)

    allow, deny, legacy, greyed, docs = fake.buttons(message_id)
    assert allow == Button("Allow once", "allow", {"approval": KEY, "choice": "allow"}, "decision", "submit")
    assert (deny.text, deny.form, deny.value["choice"]) == ("Deny", "decision", "deny")
    assert (legacy.value, legacy.form, greyed.disabled, docs.value) == ({"v": 1}, None, True, None)

    event = fake.card_action_event(message_id, deny, APPROVER, form_value={"text": "not now"})
    assert event["schema"] == "2.0"
    assert {k: event["header"][k] for k in ("event_type", "token", "app_id", "tenant_key")} == {
        "event_type": "card.action.trigger", "token": fake.verification_token, "app_id": fake.app_id,
        "tenant_key": fake.tenant_key}
    body = event["event"]
    assert body["operator"]["open_id"] == APPROVER and body["token"].startswith("c-") and body["host"] == "im_message"
    assert body["action"] == {"tag": "button", "name": "deny", "value": {"approval": KEY, "choice": "deny"},
                              "form_value": {"text": "not now"}}
    assert body["context"] == {"open_message_id": message_id, "open_chat_id": CHAT}
    assert fake.card_action_event(message_id, "Allow once", OTHER)["event"]["action"]["form_value"] == {"text": ""}
    assert "form_value" not in fake.card_action_event(message_id, legacy, OTHER)["event"]["action"]

    for bad in (lambda: fake.card_action_event(message_id, greyed, OTHER),  # the client sends nothing
                lambda: fake.card_action_event(message_id, docs, OTHER),
                lambda: fake.card_action_event(message_id, "Allow once", OTHER, form_value={"nope": "x"}),
                lambda: fake.card_action_event(message_id, legacy, OTHER, form_value={"text": "x"}),
                lambda: fake.card_action_event(message_id, "Allow once", OTHER, form_value={"text": "x" * 1001}),
                lambda: fake.card_action_event(message_id, "Missing", OTHER)):
        with pytest.raises(ValueError):
            bad()
    card["body"]["elements"][1]["elements"][0]["required"] = True
    required = _send_card(api, card)
    with pytest.raises(ValueError, match="required input 'text' is empty"):
        fake.card_action_event(required, "Deny", OTHER)

    unconnected = fake.click(message_id, "Allow once", APPROVER)  # no long connection: the click fails
    assert (unconnected.ok, unconnected.status) == (False, 0)
    assert "no long-connection client" in (unconnected.failure or "")


def test_ws_event_frame_callback_is_answered_in_the_ack_and_its_card_replaces_the_card(
        fake: FakeFeishu, api: lark.Client, card_ws: WsClientThread, clicks: list[P2CardActionTrigger]) -> None:
    message_id = _send_card(api, _approval_card())
    calls_before = len(fake.calls)

    answer = fake.click(message_id, "Allow once", APPROVER, form_value={"text": "go"}, frame_type="event")

    assert answer.ok, answer.failure
    assert (answer.status, answer.toast) == (200, Toast("success", f"allow by {APPROVER}"))
    assert answer.card == _decided_card(f"allow by {APPROVER}")
    [data] = clicks
    assert (data.header.event_type, data.header.token) == ("card.action.trigger", fake.verification_token)
    assert data.event.action.value == {"approval": KEY, "choice": "allow"}
    assert data.event.action.form_value == {"text": "go"}
    assert (data.event.context.open_message_id, data.event.context.open_chat_id) == (message_id, CHAT)
    assert fake.buttons(message_id) == []
    assert fake.message(message_id).text == f"allow by {APPROVER}"
    assert [u.source for u in fake.card_updates(message_id)] == ["callback"]
    assert len(fake.calls) == calls_before  # Feishu applied the answer's card: no API call


def test_the_stock_ws_client_drops_card_frames(fake: FakeFeishu, api: lark.Client, card_ws: WsClientThread,
                                              clicks: list[P2CardActionTrigger]) -> None:
    """lark-oapi 1.7.5 returns from _handle_data_frame for a `card` frame without calling the handler or acking:
    Feishu's click fails (the user sees error 200340). Our channel routes such frames itself."""
    message_id = _send_card(api, _approval_card())

    # frame_type="card", as Feishu sends callbacks; an ack comes within milliseconds when the app answers at all
    answer = fake.click(message_id, "Deny", APPROVER, wait=1.0)

    assert (answer.ok, answer.status, answer.toast) == (False, 0, None)
    assert clicks == []
    assert [b.text for b in fake.buttons(message_id)] == ["Allow once", "Deny"]
    assert fake.card_updates() == []


def test_webhook_callback_through_the_sdk_dispatcher_and_forged_or_replayed_ones(
        fake: FakeFeishu, api: lark.Client, sdk_webhook: SdkWebhook, clicks: list[P2CardActionTrigger]) -> None:
    message_id = _send_card(api, _approval_card())
    webhook = sdk_webhook.webhook("encrypt-key")
    forged_event = fake.card_action_event(message_id, "Allow once", OTHER)

    forged = fake.send_callback(forged_event, via="webhook", webhook=webhook, signature="0" * 64)
    assert (forged.ok, forged.status, clicks) == (False, 500, [])
    answer = fake.click(message_id, "Deny", APPROVER, form_value={"text": "no"}, via="webhook", webhook=webhook)
    assert answer.ok, answer.failure
    assert answer.toast == Toast("success", f"deny by {APPROVER}")
    assert json.loads(sdk_webhook.bodies[-1]).keys() == {"encrypt"}  # encrypted as Feishu does with a key
    assert fake.buttons(message_id) == []

    replayed = fake.replay(answer)
    assert sdk_webhook.bodies[-1] == sdk_webhook.bodies[-2] == answer.request.body
    assert replayed.status == 200 and len(clicks) == 2  # the stock dispatcher has no replay defence: the app needs one
    assert [u.source for u in fake.card_updates(message_id)] == ["callback"]  # an attacker's answer updates nothing


def test_an_answer_later_than_3_s_fails_the_callback_and_changes_no_card(
        fake: FakeFeishu, api: lark.Client, sdk_webhook: SdkWebhook, clicks: list[P2CardActionTrigger],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fake_feishu, "CALLBACK_DEADLINE", 0.5)  # Feishu's 3 s, shortened: the rule is the same
    message_id = _send_card(api, _approval_card())

    answer = fake.click(message_id, "Deny", APPROVER, form_value={"text": "slow"}, via="webhook",
                        webhook=sdk_webhook.webhook("encrypt-key"))

    assert len(clicks) == 1 and answer.status == 200 and answer.seconds > fake_feishu.CALLBACK_DEADLINE
    assert not answer.ok and "answered after" in (answer.failure or "")
    assert [b.text for b in fake.buttons(message_id)] == ["Allow once", "Deny"]


def test_patch_replaces_a_card_and_buttons_follow(fake: FakeFeishu, api: lark.Client) -> None:
    message_id = _send_card(api, _approval_card())

    def patch(target: str, card: dict[str, Any] | str) -> int:
        content = card if isinstance(card, str) else json.dumps(card)
        return api.im.v1.message.patch(PatchMessageRequest.builder().message_id(target).request_body(
            PatchMessageRequestBody.builder().content(content).build()).build()).code

    assert patch(message_id, _decided_card("Timed out")) == 0
    assert fake.buttons(message_id) == []
    assert fake.message(message_id).content["header"]["template"] == "green"
    assert patch("om_unknown", _decided_card("x")) == 230001
    assert patch(message_id, _decided_card("x" * 31 * 1024)) == 230025
    assert [u.source for u in fake.card_updates(message_id)] == ["patch"]

    codes = [patch(message_id, _approval_card())]
    while codes[-1] == 0 and len(codes) < 100:  # until the per-message limit refuses one
        codes.append(patch(message_id, _approval_card()))
    assert codes[-1] == 230020
    refused_at = next(c.time for c in reversed(fake.calls) if c.code == 230020)
    assert sum(1 for u in fake.card_updates(message_id) if refused_at - u.time < 1.0) == PATCH_QPS
    assert [b.text for b in fake.buttons(message_id)] == ["Allow once", "Deny"]


# ----- files: message resources, uploads, image and file messages ------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # the magic bytes, then every byte value (binary-safe?)


def _download(api: lark.Client, message_id: str, key: str, kind: str) -> GetMessageResourceResponse:
    request = GetMessageResourceRequest.builder().message_id(message_id).file_key(key).type(kind).build()
    return api.im.v1.message_resource.get(request)


def _upload_image(api: lark.Client, data: bytes, image_type: str = "message") -> CreateImageResponse:
    body = CreateImageRequestBody.builder().image_type(image_type).image(io.BytesIO(data)).build()
    return api.im.v1.image.create(CreateImageRequest.builder().request_body(body).build())


def _upload_file(api: lark.Client, data: bytes, name: str | None = "report.csv", file_type: str = "stream",
                 duration: int | None = None) -> CreateFileResponse:
    body = CreateFileRequestBody.builder().file_type(file_type).file(io.BytesIO(data)).duration(duration)
    body = body.file_name(name) if name is not None else body
    return api.im.v1.file.create(CreateFileRequest.builder().request_body(body.build()).build())


def _send(api: lark.Client, msg_type: str, content: dict[str, Any]) -> CreateMessageResponse:
    body = CreateMessageRequestBody.builder().receive_id(CHAT).msg_type(msg_type).content(json.dumps(content))
    request = CreateMessageRequest.builder().receive_id_type("chat_id").request_body(body.build()).build()
    return api.im.v1.message.create(request)


def _message_id(event: dict[str, Any]) -> str:
    return event["event"]["message"]["message_id"]


def test_resources_of_image_file_audio_and_post_messages_download_through_the_sdk(
        fake: FakeFeishu, api: lark.Client, ws: WsClientThread, received: queue.Queue[P2ImMessageReceiveV1]) -> None:
    image = fake.image_event(CHAT, data=PNG, chat_type="group", thread_id="omt_1")
    file = fake.file_event(CHAT, "file_v3_log", "报告 2024.csv", data=b"a,b\r\n1,2\n", sender_open_id="ou_x")
    audio = fake.audio_event(CHAT, duration=2500, data=b"OggS-opus")
    post = fake.post_event(CHAT, ["look"], images={"img_v3_a": PNG, "img_v3_b": b"GIF89a-b"})

    fake.push_event(file)
    delivered = received.get(timeout=5).event.message
    assert (delivered.message_type, json.loads(delivered.content)) == (
        "file", {"file_key": "file_v3_log", "file_name": "报告 2024.csv"})
    image_key = json.loads(image["event"]["message"]["content"])["image_key"]
    assert image_key.startswith("img_v3_") and image["event"]["message"]["thread_id"] == "omt_1"
    assert json.loads(audio["event"]["message"]["content"])["duration"] == 2500
    assert json.loads(post["event"]["message"]["content"])["content"][1:] == [
        [{"tag": "img", "image_key": "img_v3_a"}], [{"tag": "img", "image_key": "img_v3_b"}]]

    got = _download(api, _message_id(image), image_key, "image")
    assert got.success() and got.file.read() == PNG and got.raw.headers["Content-Type"] == "image/png"
    got = _download(api, _message_id(file), "file_v3_log", "file")
    assert got.file.read() == b"a,b\r\n1,2\n"
    assert got.file_name == "报告 2024.csv"  # sent as raw UTF-8, as Feishu does; the SDK re-decodes it
    audio_key = json.loads(audio["event"]["message"]["content"])["file_key"]
    assert _download(api, _message_id(audio), audio_key, "file").file.read() == b"OggS-opus"
    assert _download(api, _message_id(post), "img_v3_b", "image").file.read() == b"GIF89a-b"

    # the client can have the last byte before the server thread records the outcome
    fake.wait_for(lambda: [d.outcome for d in fake.downloads] == ["complete"] * 4, what="4 complete downloads")
    assert fake.downloads[1].size == fake.downloads[1].sent == 9
    gets = [c for c in fake.calls if "/resources/" in c.path]
    assert len(gets) == 4 and not any(c.write for c in gets) and fake.max_rate("app") == 0


def test_resource_errors_are_feishus(fake: FakeFeishu, api: lark.Client) -> None:
    first = _message_id(fake.file_event(CHAT, "file_v3_1", "a.txt", data=b"one"))
    second = _message_id(fake.image_event(CHAT, "img_v3_2", data=PNG))
    assert _download(api, "om_nowhere", "file_v3_1", "file").code == 234001
    assert _download(api, first, "file_v3_1", "zip").code == 234001
    assert _download(api, first, "file_v3_1", "image").code == 234001  # a file is not served as an image
    assert _download(api, second, "file_v3_1", "file").code == 234003  # that key is not in this message
    sticker = _message_id(fake.message_event(CHAT, "sticker", {"file_key": "file_v3_s"}))
    fake.add_resource(sticker, "file_v3_s", b"sticker")
    assert _download(api, sticker, "file_v3_s", "file").code == 234043

    huge = _message_id(fake.file_event(CHAT, "file_v3_huge", data=bytes(DOWNLOAD_LIMIT + 1)))  # calloc: no RAM
    assert _download(api, huge, "file_v3_huge", "file").code == 234037

    fake.set_bot_in_chat(CHAT, False)
    assert _download(api, first, "file_v3_1", "file").code == 234004
    assert _send_text(api, CHAT, "hi").code == 230002
    fake.set_bot_in_chat(CHAT)
    fake.recall(first)
    assert _download(api, first, "file_v3_1", "file").code == 230110
    assert _download(api, second, "img_v3_2", "image").file.read() == PNG
    assert len(fake.downloads) == 1


def test_a_slow_download_can_be_abandoned_and_a_cut_one_fails_in_the_sdk(fake: FakeFeishu, api: lark.Client) -> None:
    data = bytes(range(256)) * 16 * 1024  # 4 MiB: 13 s at the slow rate below, if the fake did not notice
    slow = _message_id(fake.file_event(CHAT, "file_v3_slow", data=data))
    fake.download_fault(DownloadFault(chunk=16 * 1024, delay=0.05), "file_v3_slow")
    url = f"{fake.base_url}/open-apis/im/v1/messages/{slow}/resources/file_v3_slow?type=file"
    with requests.get(url, headers={"Authorization": f"Bearer {TENANT_TOKEN}"}, stream=True, timeout=5) as resp:
        assert resp.headers["Content-Length"] == str(len(data))
        assert next(resp.iter_content(1024)) == data[:1024]
    fake.wait_for(lambda: fake.downloads[0].outcome == "client_closed", what="the fake to see the client hang up")
    assert 1024 <= fake.downloads[0].sent < len(data)

    cut = _message_id(fake.file_event(CHAT, "file_v3_cut", data=data))
    fake.download_fault(DownloadFault(cut_after=1000))
    with pytest.raises(requests.exceptions.ChunkedEncodingError):  # the body ends before its Content-Length
        _download(api, cut, "file_v3_cut", "file")
    assert (fake.downloads[1].outcome, fake.downloads[1].sent) == ("cut", 1000)
    fake.download_fault(None)
    assert _download(api, cut, "file_v3_cut", "file").file.read() == data


def test_uploaded_image_and_file_are_sent_once_per_uuid_and_received(fake: FakeFeishu, api: lark.Client) -> None:
    image = _upload_image(api, PNG)
    file = _upload_file(api, b"a,b\n1,2\n", "report.csv")
    assert image.success() and image.data.image_key.startswith("img_v3_")
    assert file.success() and file.data.file_key.startswith("file_v3_")
    assert fake.uploaded(file.data.file_key) == Upload(file.data.file_key, "file", "stream", "report.csv",
                                                       b"a,b\n1,2\n")
    assert fake.uploaded(image.data.image_key).data == PNG
    recorded = next(c for c in fake.calls if c.path == "/open-apis/im/v1/images")
    assert recorded.body == {"image_type": "message", "image": f"<{len(PNG)} bytes>"} and recorded.write

    sent = _send(api, "image", {"image_key": image.data.image_key})
    question = _message_id(fake.text_event(CHAT, "the report?"))
    replies = [api.im.v1.message.reply(ReplyMessageRequest.builder().message_id(question).request_body(
        ReplyMessageRequestBody.builder().msg_type("file").content(json.dumps({"file_key": file.data.file_key}))
        .uuid("report-once").build()).build()) for _ in range(2)]
    assert sent.success() and all(r.success() for r in replies)
    assert replies[0].data.message_id == replies[1].data.message_id

    assert fake.received_files(CHAT) == [("image", image.data.image_key, PNG), ("file", "report.csv", b"a,b\n1,2\n")]
    assert [m.text for m in fake.messages(CHAT)] == [f"[image {image.data.image_key}]", "[file report.csv]"]
    assert len(fake.uploads) == 2
    back = _download(api, replies[0].data.message_id, file.data.file_key, "file")  # the chat can fetch it again
    assert (back.file.read(), back.file_name) == (b"a,b\n1,2\n", "report.csv")


def test_uploads_are_refused_like_feishu(fake: FakeFeishu, api: lark.Client) -> None:
    assert _upload_image(api, b"").code == 234010
    assert _upload_image(api, b"GIF89a" + bytes(IMAGE_LIMIT)).code == 234006
    assert _upload_image(api, b"#!/bin/sh\necho not an image\n").code == 234011
    assert _upload_image(api, PNG, image_type="sticker").code == 234001
    webp, heic = b"RIFF\x10\x00\x00\x00WEBPVP8 ", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00"
    assert [_upload_image(api, data).code for data in (webp, heic, b"\xff\xd8\xff\xe0", b"BM..")] == [0] * 4

    assert _upload_file(api, bytes(FILE_LIMIT + 1)).code == 234006
    assert _upload_file(api, b"").code == 234010
    assert _upload_file(api, b"x", file_type="zip").code == 234001
    assert _upload_file(api, b"x", name=None).code == 234001
    assert len(fake.uploads) == 4


def test_file_messages_need_a_key_this_app_uploaded_with_a_matching_type(fake: FakeFeishu, api: lark.Client) -> None:
    opus = _upload_file(api, b"OggS", "voice.opus", file_type="opus", duration=3000).data.file_key
    assert fake.uploaded(opus).duration == 3000
    stream = _upload_file(api, b"x", "x.bin").data.file_key
    users_image = json.loads(fake.image_event(CHAT, data=PNG)["event"]["message"]["content"])["image_key"]
    assert _send(api, "image", {"image_key": "img_v3_never_uploaded"}).code == 230017
    assert _send(api, "image", {"image_key": users_image}).code == 230017  # a user's image is not the bot's
    assert _send(api, "file", {"file_key": opus}).code == 230055  # opus goes as audio
    assert _send(api, "audio", {"file_key": stream}).code == 230055
    assert _send(api, "file", {"name": "no key"}).code == 230001
    assert _send(api, "audio", {"file_key": opus}).code == 0
    assert fake.received_files(CHAT) == [("audio", "voice.opus", b"OggS")]
