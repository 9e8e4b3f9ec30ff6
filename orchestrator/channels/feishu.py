"""Feishu (Lark) through the official lark-oapi SDK: events in, replies and streaming cards out.

The only module that imports lark_oapi. Events arrive on the SDK's own thread (the long-connection
client, which insists on its own event loop) or on the webhook server's threads; each is parsed, handed
to the service's loop, and acknowledged once the service has stored it, so an event is never acked and
then lost, and a slow agent never delays an ack. Every REST call that writes goes through one limiter
(per chat and app-wide) and is retried on Feishu's rate-limit answers; the SDK's blocking calls run on
this module's thread pool.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
    CreateMessageReactionRequest,
    CreateMessageReactionRequestBody,
    CreateMessageRequest,
    CreateMessageRequestBody,
    DeleteMessageReactionRequest,
    Emoji,
    P2ImMessageReceiveV1,
    ReplyMessageRequest,
    ReplyMessageRequestBody,
)
from lark_oapi.core.exception import AccessTokenException, ObtainAccessTokenException
from loguru import logger

from orchestrator import metrics
from orchestrator.channels import DeliveryFailed, Outgoing, Submit
from orchestrator.channels.feishu_events import Ignored, parse_message_event
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
LONG_CONNECTION_RESTART_SECONDS = 30
REST_HEALTH_SECONDS = 60  # a failed API call makes the channel unhealthy this long, unless one succeeds
TYPING = "Typing"


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
        self._sequence = 0
        self.bot_open_id = ""
        self._ws: lark.ws.Client | None = None
        self._webhook: ThreadingHTTPServer | None = None
        self._rest_failed_at = 0.0
        self._rest_ok_at = 0.0
        self._rest_problem = ""
        self._background: set[asyncio.Task[None]] = set()

    # ---- inbound ----

    async def run(self, submit: Submit) -> None:
        self.bot_open_id = await self._bot_open_id()
        loop = asyncio.get_running_loop()
        handler = (lark.EventDispatcherHandler.builder(self.settings.encrypt_key, self.settings.verification_token)
                   .register_p2_im_message_receive_v1(lambda data: self._on_message(loop, submit, data)).build())
        if self.settings.mode == "webhook":
            self._serve_webhook(handler)
        else:
            threading.Thread(target=self._run_long_connection, args=(handler,), name="feishu-ws", daemon=True).start()
        try:
            await asyncio.Event().wait()  # events are handed over by the threads above
        finally:
            if self._webhook is not None:
                self._webhook.shutdown()

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

    def _run_long_connection(self, handler: lark.EventDispatcherHandler) -> None:
        # The SDK's client runs on a module-level loop captured at import; it must be this thread's own.
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        lark_ws_client.loop = loop
        while True:
            self._ws = lark.ws.Client(self.settings.app_id, self.settings.app_secret, event_handler=handler,
                                      domain=self.settings.domain, log_level=lark.LogLevel.WARNING)
            logger.info(f"connecting to Feishu over the long connection ({self.settings.domain})")
            try:
                self._ws.start()  # reconnects by itself; returns only on a fatal error such as bad credentials
            except Exception as exc:
                logger.error(f"the Feishu long connection stopped ({exc}); starting it again in "
                             f"{LONG_CONNECTION_RESTART_SECONDS} s")
            time.sleep(LONG_CONNECTION_RESTART_SECONDS)

    def _serve_webhook(self, handler: lark.EventDispatcherHandler) -> None:
        path = self.settings.webhook_path

        class Webhook(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                if self.path.split("?", 1)[0] != path:
                    self.send_error(404)
                    return
                request = lark.RawRequest()
                request.uri = self.path
                request.body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                # the SDK looks headers up case-sensitively, in the canonical case
                request.headers = {"-".join(p.capitalize() for p in k.split("-")): v for k, v in self.headers.items()}
                response = handler.do(request)
                if response.status_code != 200:
                    logger.warning(f"webhook request refused: {(response.content or b'').decode(errors='replace')}")
                self.send_response(response.status_code)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(response.content or b"")))
                self.end_headers()
                self.wfile.write(response.content or b"")

        self._webhook = ThreadingHTTPServer((self.settings.webhook_host, self.settings.webhook_port), Webhook)
        self._webhook.daemon_threads = True
        threading.Thread(target=self._webhook.serve_forever, name="feishu-webhook", daemon=True).start()
        host, port = self._webhook.server_address[:2]
        logger.info(f"listening for Feishu events on http://{host}:{port}{path}")

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
            if self._webhook is None:
                return "the webhook server is not listening"
        elif self._ws is None or self._ws._conn is None:  # the SDK has no public state; _conn is None when down
            return "the long connection to Feishu is down"
        if self._rest_failed_at > self._rest_ok_at and time.monotonic() - self._rest_failed_at < REST_HEALTH_SECONDS:
            return f"Feishu API calls fail: {self._rest_problem}"
        return None

    # ---- outbound ----

    def display(self, chat_id: str, message_id: str, saved: str | None, save: Callable[[str], None]
                ) -> FeishuDisplay:
        return FeishuDisplay(self, chat_id, message_id, json.loads(saved) if saved else {}, save)

    async def deliver(self, item: Outgoing) -> None:
        try:
            await self._deliver(item)
        except FeishuError as exc:
            raise DeliveryFailed(str(exc), exc.retry_after, exc.permanent) from exc

    async def _deliver(self, item: Outgoing) -> None:
        chunks = split_text(item.text, CARD_TEXT_LIMIT if item.card else TEXT_LIMIT)
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

    async def send_text(self, chat_id: str, text: str, reply_to: str | None, key: str) -> str:
        return await self._send(chat_id, "text", json.dumps({"text": text}), reply_to, key)

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
            "body": {"elements": [{"tag": "markdown", "element_id": ANSWER_ELEMENT, "content": text}]},
        }
        body = CreateCardRequestBody.builder().type("card_json").data(json.dumps(card, ensure_ascii=False)).build()
        response = await self._call(self.client.cardkit.v1.card.create,
                                    CreateCardRequest.builder().request_body(body).build(), chat_id)
        return str(response.data.card_id)

    async def stream_card(self, chat_id: str, card_id: str, text: str) -> None:
        body = ContentCardElementRequestBody.builder().content(text).sequence(self._next_sequence()).build()
        request = (ContentCardElementRequest.builder().card_id(card_id).element_id(ANSWER_ELEMENT)
                   .request_body(body).build())
        await self._call(self.client.cardkit.v1.card_element.content, request, chat_id, ("card", card_id))

    async def finish_card(self, chat_id: str, card_id: str, text: str) -> None:
        await self.stream_card(chat_id, card_id, text)
        settings = {"config": {"streaming_mode": False, "summary": {"content": text[:60]}}}
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
                    scope: tuple[str, str] | None = None, limited: bool = True) -> Any:
        """One SDK call under the app's rate limits (and its scope's: a chat, a card), retried on rate-limit
        answers and transient failures. `chat_id` is for the log."""
        for attempt in range(1, SEND_ATTEMPTS + 1):
            if limited:
                metrics.RATE_LIMIT_WAIT.inc(await self.limiter.acquire(*(scope or (None, ""))))
            try:
                response = await asyncio.get_running_loop().run_in_executor(self._executor, method, request)
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
        await asyncio.sleep(wait)
        text = self.latest
        if text == self.shown:
            return
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


def split_text(text: str, limit: int) -> list[str]:
    """Pieces of at most `limit` characters, cut at a line break where there is one."""
    pieces = []
    while len(text) > limit:
        cut = text.rfind("\n", limit // 2, limit)
        cut = cut if cut > 0 else limit
        pieces.append(text[:cut])
        text = text[cut:].lstrip("\n")
    return [*pieces, text]
