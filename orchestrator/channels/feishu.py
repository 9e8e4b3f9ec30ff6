"""Feishu (Lark) through the official lark-oapi SDK: events and card clicks in, replies, streaming cards and
approval cards out.

The only module that imports lark_oapi. Events arrive on the SDK's own thread (the long-connection
client, which insists on its own event loop; a watchdog builds it anew when it stays down) or from the
webhook server (feishu_webhook: signed, bounded); each is parsed, handed to the service's loop, and
acknowledged once the service has stored it, so an event is never acked and then lost, and a slow agent
never delays an ack. Every REST call that writes goes through one limiter (per chat and app-wide) and is
retried on Feishu's rate-limit answers; the SDK's blocking calls run on this module's thread pool. Text
leaves made safe to show as the bot (feishu_render: no mentions, tags or hidden links from the agent).
A click on an approval card (`card.action.trigger`, by either way in) is parsed, handed to the service's `act`
and answered within Feishu's 3 s with a toast and the card to show from then on; it never raises (the SDK
would answer 500, and the clicker would see Feishu's own error). The files users send are downloaded streamed,
cut off at the caller's limit (the SDK's message_resource.get would read all of a body into memory first).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import lark_oapi as lark
import lark_oapi.ws.client as lark_ws_client
import requests
from lark_oapi.api.cardkit.v1 import (
    ContentCardElementRequest,
    ContentCardElementRequestBody,
    CreateCardRequest,
    CreateCardRequestBody,
    SettingsCardRequest,
    SettingsCardRequestBody,
)
from lark_oapi.api.im.v1 import (
    CreateFileRequest,
    CreateFileRequestBody,
    CreateImageRequest,
    CreateImageRequestBody,
    CreateMessageReactionRequest,
    CreateMessageReactionRequestBody,
    CreateMessageRequest,
    CreateMessageRequestBody,
    DeleteMessageReactionRequest,
    Emoji,
    P2ImMessageReceiveV1,
    PatchMessageRequest,
    PatchMessageRequestBody,
    ReplyMessageRequest,
    ReplyMessageRequestBody,
)
from lark_oapi.core.exception import AccessTokenException, ObtainAccessTokenException
from lark_oapi.core.token import TokenManager
from lark_oapi.core.utils import AESCipher
from lark_oapi.event.callback.model.p2_card_action_trigger import P2CardActionTrigger, P2CardActionTriggerResponse
from lark_oapi.ws.const import HEADER_TYPE
from lark_oapi.ws.enum import MessageType
from lark_oapi.ws.pb.pbbp2_pb2 import Frame
from loguru import logger

from orchestrator import disk, metrics
from orchestrator.channels import (
    Act,
    ActionReply,
    ApprovalView,
    Attachment,
    AttachmentRefused,
    CardAction,
    DeliveryFailed,
    OutFile,
    Outgoing,
    Submit,
)
from orchestrator.channels.feishu_events import Ignored, is_resource, parse_card_action, parse_message_event
from orchestrator.channels.feishu_render import (
    approval_card,
    card_markdown,
    message_text,
    split_answer,
    upload_file_type,
)
from orchestrator.channels.feishu_webhook import Refused, Verifier, WebhookLimits, WebhookServer
from orchestrator.config import FeishuSettings
from orchestrator.ratelimit import Limiter

RATE_LIMIT_CODES = (99991400, 230020)
SEND_ATTEMPTS = 4  # per call, before the outbox takes over with its own backoff
CARD_TEXT_LIMIT = 8000  # characters of answer per card (cards are capped at 30 KB of JSON)
TEXT_LIMIT = 8000  # characters per further text message
CARD_OPS_PER_SECOND = 10
CARD_UPDATE_INTERVAL = 0.5  # seconds between streaming updates of one card (Feishu allows 10/s)
ACK_WAIT_SECONDS = 2.5  # Feishu wants an answer within 3 s; past this the event is refused and re-pushed
# A call leaves our limiter and reaches Feishu a little later, by a delay that varies (threads, network), so
# Feishu's window can catch one call more than ours did; widening ours by this much keeps us under its limit.
WINDOW_MARGIN = 0.25
ANSWER_ELEMENT = "answer"
WATCH_INTERVAL = 1.0  # seconds between the watchdog's looks at the long connection
REST_HEALTH_SECONDS = 60  # a failed API call makes the channel unhealthy this long, unless one succeeds
TYPING = "Typing"
TOAST_LEVELS = ("success", "info", "warning", "error")
TOAST_CHARS = 200
CANNOT_HANDLE = ActionReply("This card cannot be handled.", "error")
BUSY = ActionReply("The bot is busy; try again in a moment.", "warning")
DOWNLOAD_TIMEOUT = (10.0, 30.0)  # seconds: to connect, and at most between two reads of a file's body
DOWNLOAD_CHUNK = 64 * 1024
# Downloads and uploads have their own threads: a 30 MB file holds one for seconds, and the API calls' pool must
# stay free for replies and streaming cards.
DOWNLOADS_AT_ONCE = 4
UPLOADS_AT_ONCE = 2
ERROR_BODY_BYTES = 4096  # of a refused download's JSON error
# Feishu's refusals of the message resource API ("获取消息中的资源文件"), as the sender reads them.
RESOURCE_ERRORS = {
    230110: "the message was recalled",
    234003: "Feishu has no such file in the message",
    234004: "the bot is no longer in this chat",
    234037: "Feishu serves no file this large",
    234043: "Feishu serves no files of this kind of message",
}


class FeishuError(Exception):
    def __init__(self, reason: str, retry_after: float | None = None, permanent: bool = False) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.permanent = permanent


class FeishuChannel:
    def __init__(self, settings: FeishuSettings, require_mention: Callable[[str], bool]) -> None:
        self.settings = settings
        self.require_mention = require_mention
        self.client = (lark.Client.builder().app_id(settings.app_id).app_secret(settings.app_secret)
                       .domain(settings.domain).timeout(10).log_level(lark.LogLevel.WARNING).build())
        app_windows = [(settings.rate_per_app, 1.0 + WINDOW_MARGIN),
                       (settings.rate_per_app_minute, 60.0 + WINDOW_MARGIN)]
        # Feishu's limits: 5 QPS per chat for sending and editing messages, 10 operations/s per card.
        self.limiter = Limiter(app_windows, scopes={"chat": (settings.rate_per_chat, 1.0 + WINDOW_MARGIN),
                                                    "card": (CARD_OPS_PER_SECOND, 1.0 + WINDOW_MARGIN)})
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="feishu")
        self._downloads = ThreadPoolExecutor(max_workers=DOWNLOADS_AT_ONCE, thread_name_prefix="feishu-download")
        self._uploads = ThreadPoolExecutor(max_workers=UPLOADS_AT_ONCE, thread_name_prefix="feishu-upload")
        self._sequence = 0
        self.bot_open_id = ""
        self._ws: lark.ws.Client | None = None
        self._ws_loop: asyncio.AbstractEventLoop | None = None
        self._rebuild = threading.Event()  # set by the watchdog: drop the long-connection client, build a new one
        self._ws_lock = threading.Lock()  # the client's loop is stopped only while it runs a client
        self._webhook: WebhookServer | None = None
        self._rest_failed_at = 0.0
        self._rest_ok_at = 0.0
        self._rest_problem = ""
        self._background: set[asyncio.Task[None]] = set()

    # ---- inbound ----

    async def run(self, submit: Submit, act: Act) -> None:
        self.bot_open_id = await self._bot_open_id()
        handler = self.handler(asyncio.get_running_loop(), submit, act)
        if self.settings.mode == "webhook":
            await self._serve_webhook(handler)
        else:
            threading.Thread(target=self._run_long_connection, args=(handler,), name="feishu-ws", daemon=True).start()
            await self._watch_long_connection()

    def handler(self, loop: asyncio.AbstractEventLoop, submit: Submit, act: Act) -> lark.EventDispatcherHandler:
        """The SDK's dispatcher for both ways in (the long connection, the webhook): messages and card clicks, each
        handed to the service on `loop`."""
        return (lark.EventDispatcherHandler.builder(self.settings.encrypt_key, self.settings.verification_token)
                .register_p2_im_message_receive_v1(lambda data: self._on_message(loop, submit, data))
                .register_p2_card_action_trigger(lambda data: self._on_card_action(loop, act, data)).build())

    def _on_message(self, loop: asyncio.AbstractEventLoop, submit: Submit, data: P2ImMessageReceiveV1) -> None:
        """On an SDK thread. Returns (and so acks) only once the service has stored the message."""
        event = json.loads(lark.JSON.marshal(data.event) or "null")
        parsed = parse_message_event(event, self.bot_open_id, self.require_mention)
        message = (event or {}).get("message") or {} if isinstance(event, dict) else {}
        if isinstance(parsed, Ignored):
            logger.bind(chat_id=message.get("chat_id", "-"), message_id=message.get("message_id", "-")).info(
                f"ignored: {parsed.reason}")
            return
        future = asyncio.run_coroutine_threadsafe(submit(parsed), loop)
        try:
            future.result(ACK_WAIT_SECONDS)
        except FutureTimeout:
            future.cancel()
            raise TimeoutError("the service did not take the message in time; Feishu will deliver it again") from None

    def _on_card_action(self, loop: asyncio.AbstractEventLoop, act: Act, data: P2CardActionTrigger
                        ) -> P2CardActionTriggerResponse:
        """On an SDK thread: a click, answered with what `act` said (within ACK_WAIT_SECONDS), never an error."""
        try:
            event = json.loads(lark.JSON.marshal(data.event) or "null")
            action = parse_card_action(event)
            if isinstance(action, Ignored):
                context = event.get("context") if isinstance(event, dict) else None
                ids = context if isinstance(context, dict) else {}
                logger.bind(chat_id=str(ids.get("open_chat_id", "-"))[:80],
                            message_id=str(ids.get("open_message_id", "-"))[:80]).warning(
                    f"card action ignored: {action.reason}")
                return card_response(CANNOT_HANDLE)
            return card_response(self._act(loop, act, action))
        except Exception as exc:  # a raise would make the SDK answer 500
            logger.opt(exception=exc).error(f"a card action could not be handled: {exc!r}")
            return card_response(CANNOT_HANDLE)

    def _act(self, loop: asyncio.AbstractEventLoop, act: Act, action: CardAction) -> ActionReply:
        future = asyncio.run_coroutine_threadsafe(act(action), loop)
        try:
            return future.result(ACK_WAIT_SECONDS)
        except FutureTimeout:
            # Not cancelled: the click may have decided by now, and then its card must still lose its buttons,
            # which the answer to Feishu no longer can do: the card is updated once `act` is done.
            future.add_done_callback(lambda done: loop.call_soon_threadsafe(self._late_reply, action, done))
            logger.bind(chat_id=action.chat_id, message_id=action.message_id).warning(
                f"a click on approval {action.key[:8]} took over {ACK_WAIT_SECONDS:g} s; its card is updated later")
            return BUSY

    def _late_reply(self, action: CardAction, done: Future[ActionReply]) -> None:
        """On the service's loop: the card of a click answered after Feishu stopped waiting, updated."""
        view = None if done.cancelled() or done.exception() is not None else done.result().view
        if view is not None:
            self.in_background(self._update_after_click(action, view))

    async def _update_after_click(self, action: CardAction, view: ApprovalView) -> None:
        try:
            await self.update_approval(action.message_id, view)
        except DeliveryFailed as exc:
            logger.bind(chat_id=action.chat_id, message_id=action.message_id).warning(
                f"approval {action.key[:8]}: its card could not be updated after a slow click ({exc})")

    def _run_long_connection(self, handler: lark.EventDispatcherHandler) -> None:
        """On its own thread: a client, until it fails for good or the watchdog drops it; then a new one."""
        while True:
            try:
                self._connect_once(handler)
            except Exception as exc:  # this thread must outlive anything, or nothing would ever connect again
                logger.opt(exception=exc).error(f"the Feishu long connection failed: {exc!r}")
            self._rebuild.wait(self.settings.reconnect_after)

    def _connect_once(self, handler: lark.EventDispatcherHandler) -> None:
        self._rebuild.clear()
        # The SDK's client runs on a module-level loop captured at import; it must be this thread's own, and a
        # fresh one per client, so nothing of a dropped client can run beside the next one.
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        client = CardFrameClient(self.settings.app_id, self.settings.app_secret, event_handler=handler,
                                 domain=self.settings.domain, log_level=lark.LogLevel.WARNING)
        with self._ws_lock:
            lark_ws_client.loop = self._ws_loop = loop
            self._ws = client
        logger.info(f"connecting to Feishu over the long connection ({self.settings.domain})")
        try:
            client.start()  # reconnects by itself; ends only by raising: a fatal error, or the watchdog
        except Exception as exc:
            if not self._rebuild.is_set():
                logger.error(f"the Feishu long connection stopped ({exc}); starting it again in "
                             f"{self.settings.reconnect_after:g} s")
        finally:
            with self._ws_lock:  # from now on the watchdog leaves this loop alone
                self._ws_loop = None
            _dispose(loop, client)

    async def _watch_long_connection(self) -> None:
        """The SDK's reconnect can die while start() sleeps on (an endpoint answer it takes as fatal, such as
        "too many connections", ends its reconnect task), and nothing else would notice: down for
        `reconnect_after` seconds, the client is dropped and a new one built, again each such period."""
        down_since: float | None = None
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            now = time.monotonic()
            if self._connected():
                down_since = None
            elif down_since is None:
                down_since = now
            elif now - down_since >= self.settings.reconnect_after:
                logger.warning(f"the long connection to Feishu has been down for {now - down_since:.0f} s; "
                               "building it anew")
                down_since = now
                self._rebuild.set()
                with self._ws_lock:
                    if self._ws_loop is not None:  # start() then raises, and its thread builds a new client
                        self._ws_loop.call_soon_threadsafe(self._ws_loop.stop)

    def _connected(self) -> bool:
        return self._ws is not None and self._ws._conn is not None  # the SDK has no public state; _conn when up

    async def _serve_webhook(self, handler: lark.EventDispatcherHandler) -> None:
        settings = self.settings
        limits = WebhookLimits(max_body=settings.webhook_max_body, max_connections=settings.webhook_max_concurrent,
                               max_per_client=settings.webhook_max_per_client, read_timeout=settings.webhook_timeout)
        self._webhook = WebhookServer(settings.webhook_host, settings.webhook_port, settings.webhook_path, limits,
                                      Verifier(settings.encrypt_key), functools.partial(self._dispatch, handler),
                                      self._challenge)
        await self._webhook.serve()

    def _dispatch(self, handler: lark.EventDispatcherHandler, headers: dict[str, str], body: bytes) -> bytes:
        """A request whose signature was checked, to the SDK (which decrypts it and checks it again)."""
        request = lark.RawRequest()
        request.uri, request.headers, request.body = self.settings.webhook_path, headers, body
        response = handler.do(request)
        if response.status_code != 200:  # its reason (bad padding, a wrong token, ...) is for the log only
            raise Refused(f"lark-oapi refused it: {(response.content or b'')[:200].decode(errors='replace')}")
        return response.content or b""

    def _challenge(self, body: bytes) -> bytes:
        """Feishu's URL verification, the one request that comes unsigned: it must decrypt with the Encrypt Key
        and carry the Verification Token. Every way it can fail is one reason, so the log is no oracle either."""
        token = self.settings.verification_token.encode()
        try:
            plain = json.loads(AESCipher(self.settings.encrypt_key).decrypt_str(json.loads(body)["encrypt"]))
            if plain["type"] == "url_verification" and hmac.compare_digest(str(plain["token"]).encode(), token):
                return json.dumps({"challenge": str(plain["challenge"])}).encode()
        except (ValueError, KeyError, TypeError):  # not JSON, not base64, bad padding, not an object, ...
            pass
        raise Refused("unsigned, and not Feishu's URL verification")

    async def _bot_open_id(self) -> str:
        request = (lark.BaseRequest.builder().http_method(lark.HttpMethod.GET).uri("/open-apis/bot/v3/info")
                   .token_types({lark.AccessTokenType.TENANT}).build())
        while True:
            try:
                response = await self._call(self.client.request, request, limited=False)
                return str(json.loads(response.raw.content)["bot"]["open_id"])
            except (FeishuError, KeyError, ValueError) as exc:
                logger.error(f"cannot read the bot's identity from Feishu ({exc}); retrying in 5 s")
                await asyncio.sleep(5)

    def health(self) -> str | None:
        """None when events can arrive and the last API call went through; otherwise what is wrong."""
        if self.settings.mode == "webhook":
            if self._webhook is None or not self._webhook.listening:
                return "the webhook server is not listening"
        elif not self._connected():
            return "the long connection to Feishu is down"
        if self._rest_failed_at > self._rest_ok_at and time.monotonic() - self._rest_failed_at < REST_HEALTH_SECONDS:
            return f"Feishu API calls fail: {self._rest_problem}"
        return None

    # ---- outbound ----

    def display(self, chat_id: str, message_id: str, saved: str | None, save: Callable[[str], None]
                ) -> FeishuDisplay:
        return FeishuDisplay(self, chat_id, message_id, json.loads(saved) if saved else {}, save)

    async def deliver(self, item: Outgoing) -> None:
        with _delivery():
            await self._deliver(item)

    async def show_approval(self, view: ApprovalView) -> str:
        """The approval card, a reply to the message whose turn asks; the same key for every attempt, so Feishu
        sends it once."""
        with _delivery():
            return await self._send(view.chat_id, "interactive", _card_content(view), view.reply_to,
                                    f"approval-{view.key}")

    async def update_approval(self, message_id: str, view: ApprovalView) -> None:
        body = PatchMessageRequestBody.builder().content(_card_content(view)).build()
        request = PatchMessageRequest.builder().message_id(message_id).request_body(body).build()
        with _delivery():
            await self._call(self.client.im.v1.message.patch, request, view.chat_id, ("chat", view.chat_id))

    async def upload(self, chat_id: str, file: OutFile) -> str:
        """An image by the image API, anything else by the file API (Feishu's limits: 10 and 30 MB); its key. The
        file is opened anew for each attempt (an attempt reads it to the end)."""
        with _delivery():
            response = await self._call(functools.partial(self._upload_once, file), None, chat_id,
                                        executor=self._uploads)
        key = response.data.image_key if file.kind == "image" else response.data.file_key
        logger.bind(chat_id=chat_id).info(f"uploaded {file.kind} {file.name} ({file.size} bytes) as {key}")
        return str(key)

    def _upload_once(self, file: OutFile, _: None) -> Any:
        """On an API thread: one upload attempt."""
        with open(file.path, "rb") as data:
            if file.kind == "image":
                body: Any = CreateImageRequestBody.builder().image_type("message").image(data).build()
                return self.client.im.v1.image.create(CreateImageRequest.builder().request_body(body).build())
            body = (CreateFileRequestBody.builder().file_type(upload_file_type(file.name)).file_name(file.name)
                    .file(data).build())
            return self.client.im.v1.file.create(CreateFileRequest.builder().request_body(body).build())

    async def _deliver(self, item: Outgoing) -> None:
        if item.file is not None:
            await self._deliver_file(item)
            return
        chunks = split_answer(item.text, CARD_TEXT_LIMIT if item.card else TEXT_LIMIT)
        rest = chunks
        if item.card:
            try:
                await self.finish_card(item.chat_id, item.card, chunks[0])
                rest = chunks[1:]
            except FeishuError as exc:
                if exc.retry_after is not None:
                    raise
                logger.bind(chat_id=item.chat_id, message_id=item.reply_to or "-").warning(
                    f"card {item.card} could not be finished ({exc}); answering in plain text instead")
        for number, chunk in enumerate(rest):
            await self.send_text(item.chat_id, chunk, item.reply_to, f"{item.key}-{number}")

    async def _deliver_file(self, item: Outgoing) -> None:
        """The file's message, then its caption (if any) as text: each with its own key, so a retry after either
        sends neither twice."""
        assert item.file is not None and item.upload_key, "a file is uploaded before it is delivered"
        field = "image_key" if item.file.kind == "image" else "file_key"
        await self._send(item.chat_id, item.file.kind, json.dumps({field: item.upload_key}), item.reply_to, item.key)
        if item.text:
            await self.send_text(item.chat_id, item.text, item.reply_to, f"{item.key}-caption")

    async def send_text(self, chat_id: str, text: str, reply_to: str | None, key: str) -> str:
        return await self._send(chat_id, "text", json.dumps({"text": message_text(text)}), reply_to, key)

    async def send_card(self, chat_id: str, card_id: str, reply_to: str | None, key: str) -> str:
        content = json.dumps({"type": "card", "data": {"card_id": card_id}})
        return await self._send(chat_id, "interactive", content, reply_to, key)

    async def _send(self, chat_id: str, msg_type: str, content: str, reply_to: str | None, key: str) -> str:
        if reply_to:
            body = ReplyMessageRequestBody.builder().msg_type(msg_type).content(content).uuid(key[:50]).build()
            request: Any = ReplyMessageRequest.builder().message_id(reply_to).request_body(body).build()
            response = await self._call(self.client.im.v1.message.reply, request, chat_id, ("chat", chat_id))
        else:
            body = (CreateMessageRequestBody.builder().receive_id(chat_id).msg_type(msg_type).content(content)
                    .uuid(key[:50]).build())
            request = CreateMessageRequest.builder().receive_id_type("chat_id").request_body(body).build()
            response = await self._call(self.client.im.v1.message.create, request, chat_id, ("chat", chat_id))
        return str(response.data.message_id)

    async def create_card(self, chat_id: str, text: str) -> str:
        card = {
            "schema": "2.0",
            "config": {"streaming_mode": True, "summary": {"content": "Working…"},
                       "streaming_config": {"print_frequency_ms": {"default": 30}, "print_step": {"default": 2},
                                            "print_strategy": "fast"}},
            "body": {"elements": [{"tag": "markdown", "element_id": ANSWER_ELEMENT,
                                   "content": card_markdown(text)}]},
        }
        body = CreateCardRequestBody.builder().type("card_json").data(json.dumps(card, ensure_ascii=False)).build()
        response = await self._call(self.client.cardkit.v1.card.create,
                                    CreateCardRequest.builder().request_body(body).build(), chat_id)
        return str(response.data.card_id)

    async def stream_card(self, chat_id: str, card_id: str, text: str) -> None:
        body = (ContentCardElementRequestBody.builder().content(card_markdown(text)).sequence(self._next_sequence())
                .build())
        request = (ContentCardElementRequest.builder().card_id(card_id).element_id(ANSWER_ELEMENT)
                   .request_body(body).build())
        await self._call(self.client.cardkit.v1.card_element.content, request, chat_id, ("card", card_id))

    async def finish_card(self, chat_id: str, card_id: str, text: str) -> None:
        await self.stream_card(chat_id, card_id, text)
        settings = {"config": {"streaming_mode": False, "summary": {"content": message_text(text[:60])}}}
        body = (SettingsCardRequestBody.builder().settings(json.dumps(settings, ensure_ascii=False))
                .sequence(self._next_sequence()).build())
        await self._call(self.client.cardkit.v1.card.settings,
                         SettingsCardRequest.builder().card_id(card_id).request_body(body).build(), chat_id,
                         ("card", card_id))

    async def add_reaction(self, chat_id: str, message_id: str, emoji: str) -> str:
        reaction = Emoji.builder().emoji_type(emoji).build()
        body = CreateMessageReactionRequestBody.builder().reaction_type(reaction).build()
        request = CreateMessageReactionRequest.builder().message_id(message_id).request_body(body).build()
        response = await self._call(self.client.im.v1.message_reaction.create, request, chat_id)
        return str(response.data.reaction_id)

    async def remove_reaction(self, chat_id: str, message_id: str, reaction_id: str) -> None:
        request = DeleteMessageReactionRequest.builder().message_id(message_id).reaction_id(reaction_id).build()
        await self._call(self.client.im.v1.message_reaction.delete, request, chat_id)

    async def fetch_attachment(self, message_id: str, attachment: Attachment, max_bytes: int) -> bytes:
        """A file or image of a user's message, read as it streams in and refused as soon as it passes
        `max_bytes`. One attempt (under the app's rate limit): a failure is told to the sender, who can send it
        again. The log line takes its chat id from the caller's `logger.contextualize`, if any."""
        if not is_resource(message_id, attachment):
            raise AttachmentRefused("it is not a file Feishu can serve")
        log = logger.bind(message_id=message_id)
        metrics.RATE_LIMIT_WAIT.inc(await self.limiter.acquire())
        started = time.monotonic()
        try:
            data = await asyncio.get_running_loop().run_in_executor(self._downloads, self._download, message_id,
                                                                    attachment, max_bytes)
        except AttachmentRefused as exc:
            log.warning(f"{attachment.kind} {attachment.key} not downloaded after "
                        f"{(time.monotonic() - started) * 1000:.0f} ms: {exc}")
            raise
        log.info(f"downloaded {attachment.kind} {attachment.key}: {len(data)} bytes in "
                 f"{(time.monotonic() - started) * 1000:.0f} ms")
        return data

    def _download(self, message_id: str, attachment: Attachment, max_bytes: int) -> bytes:
        """On a download thread. Leaving the `with` early closes the connection, so the rest is never sent."""
        url = f"{self.settings.domain}/open-apis/im/v1/messages/{message_id}/resources/{attachment.key}"
        try:
            token = TokenManager.get_self_tenant_token(self.client.config)  # the SDK's cached tenant token
            with requests.get(url, params={"type": attachment.kind}, headers={"Authorization": f"Bearer {token}"},
                              stream=True, timeout=DOWNLOAD_TIMEOUT) as response:
                if response.status_code != 200:
                    raise AttachmentRefused(_resource_refusal(response))
                return _read_within(response, max_bytes)
        except (ObtainAccessTokenException, AccessTokenException) as exc:
            raise AttachmentRefused("Feishu gave the bot no access token") from exc
        except requests.Timeout as exc:
            raise AttachmentRefused("Feishu did not send it in time") from exc
        except requests.RequestException as exc:  # a cut body (ChunkedEncodingError), a dropped connection
            raise AttachmentRefused(f"the download from Feishu broke off ({exc.__class__.__name__})") from exc

    def in_background(self, work: Coroutine[None, None, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _next_sequence(self) -> int:
        """Card operations need rising sequence numbers, also across restarts: tenths of a second."""
        self._sequence = max(self._sequence + 1, int((time.time() - 1_700_000_000) * 10))
        return self._sequence

    async def _call(self, method: Callable[[Any], Any], request: Any, chat_id: str = "-",
                    scope: tuple[str, str] | None = None, limited: bool = True,
                    executor: ThreadPoolExecutor | None = None) -> Any:
        """One SDK call under the app's rate limits (and its scope's: a chat, a card), retried on rate-limit
        answers and transient failures, on the API calls' threads unless `executor` is given. `chat_id` is for
        the log."""
        for attempt in range(1, SEND_ATTEMPTS + 1):
            if limited:
                metrics.RATE_LIMIT_WAIT.inc(await self.limiter.acquire(*(scope or (None, ""))))
            try:
                response = await asyncio.get_running_loop().run_in_executor(executor or self._executor, method,
                                                                            request)
                error = _error_of(response)
            except requests.RequestException as exc:
                error = FeishuError(f"Feishu could not be reached: {exc.__class__.__name__}")
            except (ObtainAccessTokenException, AccessTokenException) as exc:  # the token call failed first
                error = FeishuError(f"no access token from Feishu: {exc}")
            except ValueError as exc:  # not the JSON the SDK expected (a proxy's error page, a cut-off answer)
                error = FeishuError(f"Feishu gave an unreadable answer: {exc}")
            if error is None:
                self._rest_ok_at = time.monotonic()
                return response
            self._rest_failed_at, self._rest_problem = time.monotonic(), str(error)
            if error.permanent or attempt == SEND_ATTEMPTS:
                raise error
            metrics.FEISHU_RETRIES.inc()
            delay = error.retry_after if error.retry_after is not None else 0.5 * 2 ** attempt
            logger.bind(chat_id=chat_id).warning(f"Feishu call failed ({error}); retry {attempt} in {delay:g} s")
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")


class FeishuDisplay:
    """The Typing reaction while a turn runs, and its answer streaming into one card, throttled. What it
    made is saved with the message, so after a restart the same card goes on and the same reaction goes."""

    def __init__(self, channel: FeishuChannel, chat_id: str, message_id: str, saved: dict[str, Any],
                 save: Callable[[str], None]) -> None:
        self.channel = channel
        self.chat_id = chat_id
        self.message_id = message_id
        self.reaction_id: str | None = saved.get("reaction")
        self.card_id: str | None = saved.get("card")
        self.card_sent = False  # in this process: a saved card is sent again (the uuid makes that a no-op)
        self._save = save
        self.shown = ""
        self.latest = ""
        self.last_push = 0.0
        self._flush: asyncio.Task[None] | None = None
        self._typing: asyncio.Task[None] | None = None
        self.log = logger.bind(chat_id=chat_id, message_id=message_id)

    def _remember(self) -> None:
        self._save(json.dumps({"card": self.card_id, "reaction": self.reaction_id}))

    async def start(self) -> None:
        """Show the Typing reaction without holding up the turn (unless it is still there from before)."""
        if self.reaction_id is None:
            self._typing = self.channel.in_background(self._add_typing())

    async def _add_typing(self) -> None:
        try:
            self.reaction_id = await self.channel.add_reaction(self.chat_id, self.message_id, TYPING)
            self._remember()
        except FeishuError as exc:
            self.log.warning(f"could not show the Typing reaction: {exc}")

    async def update(self, text_so_far: str) -> None:
        self.latest = text_so_far[:CARD_TEXT_LIMIT]
        if self._flush is None or self._flush.done():
            wait = max(0.0, self.last_push + CARD_UPDATE_INTERVAL - time.monotonic())
            self._flush = asyncio.create_task(self._push_after(wait))

    async def _push_after(self, wait: float) -> None:
        """The latest text pushed after `wait`, and again, paced, for as long as newer text came while it was
        pushed: `update` starts no flush while this one runs, and a turn waiting for approval calls it no more."""
        await asyncio.sleep(wait)
        while self.latest != self.shown:
            text = self.latest
            self.last_push = time.monotonic()
            try:
                created = self.card_id is None
                if self.card_id is None:
                    self.card_id = await self.channel.create_card(self.chat_id, text)
                    self._remember()
                if not self.card_sent:
                    await self.channel.send_card(self.chat_id, self.card_id, self.message_id, f"card-{self.card_id}")
                    self.card_sent = True
                if not created:
                    await self.channel.stream_card(self.chat_id, self.card_id, text)
                self.shown = text
            except FeishuError as exc:
                self.log.warning(f"could not update the streaming card: {exc}")
                return
            if self.latest != self.shown:
                await asyncio.sleep(max(0.0, self.last_push + CARD_UPDATE_INTERVAL - time.monotonic()))

    async def end(self) -> str | None:
        if self._flush is not None:
            if self.card_sent:
                self._flush.cancel()
            else:
                # let a card that is being created appear, so the answer finishes it; asyncio.wait, not
                # await: a cancelled flush must not end us, and our own cancellation must not be swallowed
                await asyncio.wait({self._flush})
        if self.card_id is not None and not self.card_sent:  # a card from before a restart: show it again
            try:
                await self.channel.send_card(self.chat_id, self.card_id, self.message_id, f"card-{self.card_id}")
                self.card_sent = True
            except FeishuError as exc:
                self.log.warning(f"could not send the card again: {exc}")
        self.channel.in_background(self._remove_typing())  # the answer need not wait for it
        return self.card_id if self.card_sent else None  # a card nobody sees cannot carry the answer

    async def _remove_typing(self) -> None:
        if self._typing is not None:
            await self._typing
        if self.reaction_id is not None:
            try:
                await self.channel.remove_reaction(self.chat_id, self.message_id, self.reaction_id)
            except FeishuError as exc:
                self.log.warning(f"could not remove the Typing reaction: {exc}")


class CardFrameClient(lark.ws.Client):
    """The long-connection client, also for card callbacks in frames whose `type` header is `card`: Feishu has
    been seen to send them so, and lark-oapi 1.7.5 drops such frames unanswered (`_handle_data_frame` returns
    early). Taken as `event` frames, their payload (the v2 callback JSON) reaches the dispatcher, which routes it
    by its event type to the card handler, and the answer goes back in the frame as for any event."""

    async def _handle_data_frame(self, frame: Frame) -> None:
        for header in frame.headers:
            if header.key == HEADER_TYPE and header.value == MessageType.CARD.value:
                header.value = MessageType.EVENT.value
        await super()._handle_data_frame(frame)


def card_response(reply: ActionReply) -> P2CardActionTriggerResponse:
    """The answer to a card callback: a toast, and the card to show from now on when there is one."""
    level = reply.level if reply.level in TOAST_LEVELS else "info"
    body: dict[str, Any] = {"toast": {"type": level, "content": message_text(reply.toast[:TOAST_CHARS])}}
    if reply.view is not None:
        body["card"] = {"type": "raw", "data": approval_card(reply.view)}
    return P2CardActionTriggerResponse(body)


def _card_content(view: ApprovalView) -> str:
    return json.dumps(approval_card(view), ensure_ascii=False)


@contextlib.contextmanager
def _delivery() -> Iterator[None]:
    """A FeishuError as the DeliveryFailed the service handles."""
    try:
        yield
    except FeishuError as exc:
        raise DeliveryFailed(str(exc), exc.retry_after, exc.permanent) from exc


def _dispose(loop: asyncio.AbstractEventLoop, client: lark.ws.Client) -> None:
    """Cancel what a dropped client left on its loop (its receive, ping and reconnect tasks), close its
    connection and the loop: it can neither reconnect later nor take events beside its successor."""
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    with contextlib.suppress(Exception):  # a stop the watchdog sent as start() failed by itself ends this early
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    with contextlib.suppress(Exception):  # a connection that cannot even be closed is dropped with the loop
        loop.run_until_complete(asyncio.wait_for(client._disconnect(), 5))
    loop.close()


def _read_within(response: requests.Response, max_bytes: int) -> bytes:
    """The body, refused as soon as it is known to pass max_bytes: by its Content-Length, or by what came."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise AttachmentRefused(_too_large(max_bytes))
    data = bytearray()
    for chunk in response.iter_content(DOWNLOAD_CHUNK):
        data += chunk
        if len(data) > max_bytes:
            raise AttachmentRefused(_too_large(max_bytes))
    return bytes(data)


def _too_large(max_bytes: int) -> str:
    return f"it is larger than the limit of {disk.human(max_bytes)}"


def _resource_refusal(response: requests.Response) -> str:
    """Why Feishu would not serve a file, briefly, from its JSON error (its code, and its msg for codes not known
    here); a body that is not one gives the status alone."""
    try:
        payload = json.loads(next(response.iter_content(ERROR_BODY_BYTES), b""))
    except ValueError:
        payload = None
    error = payload if isinstance(payload, dict) else {}
    code = error.get("code")
    if not isinstance(code, int):
        return f"Feishu answered {response.status_code}"
    msg = str(error.get("msg", ""))[:100].encode("utf-8", "replace").decode()  # it is stored, then sent
    return RESOURCE_ERRORS.get(code) or f"Feishu answered {response.status_code} code {code}: {msg}"


def _error_of(response: Any) -> FeishuError | None:
    """None for success; otherwise what went wrong and whether (and when) to try again."""
    if response.success():
        return None
    raw = getattr(response, "raw", None)
    status = getattr(raw, "status_code", 0) or 0
    headers = getattr(raw, "headers", None) or {}
    reason = f"Feishu answered {status} code {response.code}: {response.msg}"
    if status == 429 or response.code in RATE_LIMIT_CODES:
        reset = headers.get("x-ogw-ratelimit-reset") or headers.get("X-Ogw-Ratelimit-Reset")
        try:
            retry_after = max(0.1, float(reset)) if reset is not None else 1.0
        except ValueError:
            retry_after = 1.0
        return FeishuError(reason, retry_after=retry_after)
    return FeishuError(reason, permanent=400 <= status < 500)
