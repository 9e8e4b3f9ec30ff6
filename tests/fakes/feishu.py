"""A fake Feishu/Lark Open Platform that the real lark-oapi SDK (1.7.5) talks to, on 127.0.0.1 only.

It serves what our service uses, on the real wire protocol:

- REST (`base_url`, pass it as the SDK `domain`): tenant/app access tokens, bot info, the long-connection
  endpoint, IM messages (send, reply, text update, card patch, reactions) and CardKit cards (create,
  stream element content, settings, full update). Every request is recorded in `calls`; the bot's
  messages and the cards' current state are kept so a test can read what a user would see
  (`messages(chat_id)`, `card(card_id)`).
- The long connection: a WebSocket server speaking pbbp2 protobuf frames. It answers the client's pings
  with pongs that carry a fast-reconnect ClientConfig, pushes events (`push_event`, optionally split over
  several frames) and records the client's acks (`acks`, `wait_ack`).
- Faults and measurement: `rate_limit` (HTTP 429, code 99991400, x-ogw-ratelimit-* headers), `set_down`
  (HTTP 503, or hang up without answering), `drop_connections` (the client must reconnect),
  `refuse_connections` (an endpoint answer the SDK takes as fatal: its reconnect gives up for good), `max_rate`
  (the densest window of accepted write calls, per app or per chat) and `rejected_count`.
- Event builders (`text_event`, `post_event`, `image_event`, `file_event`, `audio_event`, and `message_event` for
  any other type) producing real `im.message.receive_v1` v2 envelopes (options common to all: `EventOptions`), and
  webhook helpers (`encrypt_body`, `signature_headers`, `webhook_request`, `url_verification`) that the
  SDK's own EventDispatcherHandler decrypts and verifies.
- Card callbacks: `buttons(message_id)` lists the buttons of the card a message shows now, `click(...)` delivers
  Feishu's `card.action.trigger` for one of them over the long connection or a webhook and returns how Feishu
  took the answer (`CallbackAnswer`: toast, card, time, or why it failed); an answer's card replaces the
  message's card (`card_updates`). `send_callback` delivers a hand-made or forged envelope, `replay` re-posts
  a webhook request byte for byte (as an attacker would; neither changes a card).
- Files in: `add_resource` (or a builder's `data=`) registers a message's image or file bytes, served by the message
  resource API as Feishu does (binary body, Content-Type, Content-Disposition with the name in raw UTF-8 bytes:
  HTTP clients read it as Latin-1 and lark-oapi re-decodes it; Feishu's errors as JSON). Every download is recorded
  in `downloads`; `download_fault` makes bodies slow or cut off mid-body; `recall` and `set_bot_in_chat` give the
  errors of a deleted message and of a chat the bot left.
- Files out: image and file uploads (multipart/form-data, Feishu's size and format checks; `uploads`,
  `uploaded(key)`) and messages of type image/file/audio/media, which must name a key this app uploaded with a
  matching type; `received_files(chat_id)` gives the bytes a chat received. `hold_sends` holds sends of some
  message types before Feishu takes them (a test kills the bot meanwhile), `drop_held_sends` drops them.

Running the SDK's long-connection client in tests (lark_oapi.ws.Client)
-----------------------------------------------------------------------
`lark_oapi.ws.client` keeps ONE module-level event loop (`loop`, captured at import) and reads it at call
time: `start()` runs on it, and every received frame and every reconnect is scheduled with
`loop.create_task(...)`. So:

1. Run each client in its own daemon thread with a fresh loop: `asyncio.set_event_loop(new)`,
   `lark_oapi.ws.client.loop = new`, build the client in that thread (its ExpiringCache schedules a task
   on the loop current at construction), then `start()`. `WsClientThread` does exactly that.
2. Only ONE client may be alive per process. A client started earlier would, on its next frame or
   reconnect, schedule its work on the newest client's loop from the wrong thread. Stop the previous
   client first: `WsClientThread.stop()` stops its loop, cancels its tasks and closes its WebSocket (the
   SDK has no `stop()`).
3. `FakeFeishu.stop()` also retires clients that were never stopped (a service under test that owns its
   client): it closes their connections and answers their reconnect with a fatal endpoint error, which
   makes the SDK give up for good instead of retrying against a dead port forever.

With one fake and one client per test, and the client stopped before the next test starts one, any number
of tests can use the long connection in one pytest process.

Other SDK behaviour the fake relies on or mimics:

- ClientConfig only takes effect after a successful endpoint call (the defaults before that are a random
  reconnect delay up to 30 s and a 120 s retry interval). The fake sends ReconnectNonce 0 and
  ReconnectInterval 1, so a dropped client is back within milliseconds and a failed retry costs 1 s.
- The SDK joins split payloads by `seq` and treats an empty part as missing, so parts are never empty.
- `resp.raw.headers` is a plain (case-sensitive) dict: the fake sends the rate-limit headers lower-case,
  as Feishu does, and Content-Type and Content-Disposition capitalised: lark-oapi looks those up so (it parses a
  failed download's JSON error only when it finds `Content-Type`, and takes `file_name` from `Content-Disposition`).
- The SDK caches tenant tokens per app_id for the whole process, so the token is the constant `t-fake`
  (a later fake may see no token request at all).
- Error codes follow Feishu's documentation where it names one (230001, 230020, 230025, 230054, 230071, 230072,
  200740, 200860, 300317, 99991400); codes the fake invents, or applies to a case the documentation does not name,
  are in `msg` marked "(fake)". Files: the server API reference pages "获取消息中的资源文件"
  (im-v1/message-resource/get: 230110, 234001, 234003, 234004, 234037, 234043), "上传图片" (im-v1/image/create:
  234001, 234006, 234010, 234011; ≤ 10 MB; JPG, PNG, WEBP, GIF, BMP, ICO, TIFF, HEIC), "上传文件"
  (im-v1/file/create: 234001, 234006, 234010; ≤ 30 MB) and "发送消息" (im-v1/message/create: 230002, 230017, 230055).
  Not modelled: image resolution limits (234039), key expiry, HTTP Range requests.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import email.message
import hashlib
import http.client
import json
import mimetypes
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO, Literal, NamedTuple, TypedDict, Unpack
from urllib.parse import parse_qs, unquote, urlsplit

import lark_oapi as lark
from Crypto.Cipher import AES
from lark_oapi.ws import client as lark_ws_client
from lark_oapi.ws.pb.pbbp2_pb2 import Frame
from requests_toolbelt.multipart.decoder import (
    ImproperBodyPartContentException,
    MultipartDecoder,
    NonMultipartContentTypeException,
)
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

TENANT_TOKEN = "t-fake"
APP_TOKEN = "a-fake"
VERIFICATION_TOKEN = "v-fake"
RATE_LIMIT_CODE = 99991400
EXCEED_CONN_LIMIT = 1000040350  # lark_oapi.ws.const: the app has too many long connections
TEXT_LIMIT = 150 * 1024
CARD_LIMIT = 30 * 1024
MAX_EDITS = 20
_MSG_TYPES = {"text", "post", "interactive", "image", "file", "audio", "media", "sticker", "share_chat",
              "share_user", "system"}
_TEXT_TAGS = {"markdown", "plain_text", "lark_md"}
DOWNLOAD_LIMIT = 100 * 1024 * 1024  # a message resource Feishu serves at most
IMAGE_LIMIT = 10 * 1024 * 1024  # an image upload
FILE_LIMIT = 30 * 1024 * 1024  # a file upload
FILE_TYPES = {"opus", "mp4", "pdf", "doc", "xls", "ppt", "stream"}
IMAGE_TYPES = {"message", "avatar"}
# The upload types each message type can send (Feishu: mp4 goes as media, opus as audio, else 230055).
_FILE_MESSAGES = {"image": IMAGE_TYPES, "file": {"pdf", "doc", "xls", "ppt", "stream"}, "audio": {"opus"},
                  "media": {"mp4"}}
_NO_RESOURCES = {"sticker", "merge_forward", "interactive"}  # the resource API refuses these (234043)

Json = dict[str, Any]

CALLBACK_DEADLINE = 3.0  # seconds Feishu waits for a callback's answer; later, the clicker sees error 200340
CALLBACK_WAIT = 5.0  # seconds the fake waits anyway, so that a late answer is reported with its time
PATCH_QPS = 5  # card updates (PATCH) per second on one message
INPUT_MAX_LENGTH = 1000  # a card input's default max_length: the client takes no longer text
TOAST_TYPES = {"success", "info", "warning", "error"}

MAX_FRAME_PAYLOAD = 512 * 1024  # bytes of one event frame's payload; a bigger event is split


@dataclass
class Call:
    """One HTTP request the fake received. `time` is time.monotonic(); `status` 0 means it hung up."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    chat_id: str | None
    time: float
    write: bool
    status: int = 0
    code: int | None = None
    rejected: bool = False


@dataclass(frozen=True)
class Ack:
    """The client's answer to a pushed event: its code (200, or 500 if the handler raised), and for a callback
    `data`, the base64 of the handler's answer JSON (what lark-oapi puts in the ack frame's payload)."""

    message_id: str
    code: int
    latency: float
    biz_rt_ms: int | None
    data: str | None = None


@dataclass
class BotMessage:
    """A message the bot sent, as a chat member would see it now (`text` is filled in by `messages()`)."""

    message_id: str
    chat_id: str | None
    msg_type: str
    content: Json
    reply_to: str | None = None
    reply_in_thread: bool = False
    card_id: str | None = None
    uuid: str | None = None
    edits: int = 0
    text: str = ""
    thread_id: str | None = None  # the topic it is in


@dataclass
class Card:
    """A CardKit card entity: its current card JSON (2.0) and the text it showed after each operation."""

    card_id: str
    json: Json
    sequence: int = 0
    message_id: str | None = None
    versions: list[str] = field(default_factory=list)
    uuids: set[str] = field(default_factory=set)

    @property
    def streaming_mode(self) -> bool:
        return bool(self.json.get("config", {}).get("streaming_mode", False))

    @property
    def texts(self) -> dict[str, str]:
        """Current text of each text element that has an element_id."""
        return {eid: text for eid, text in card_texts(self.json) if eid}

    @property
    def text(self) -> str:
        return "\n".join(text for _, text in card_texts(self.json))


@dataclass(frozen=True)
class Button:
    """A button of a card as a chat member sees it."""

    text: str
    name: str
    value: Any  # what a click sends as action.value: its behaviors' callback value, or a legacy top-level value
    form: str | None  # the name of the form it is in
    form_action: str | None = None  # in a form: "submit" sends the form's inputs, "reset" only clears them
    disabled: bool = False

    @property
    def calls_back(self) -> bool:
        """Whether a click reaches the app at all."""
        if self.disabled or self.form_action == "reset":
            return False
        return self.form_action == "submit" or self.value is not None


@dataclass(frozen=True)
class CardUpdate:
    """A change of a card message's card: by the app's PATCH, or by the card in a callback's answer."""

    message_id: str
    source: Literal["patch", "callback"]
    card: Json
    time: float


@dataclass(frozen=True)
class Toast:
    type: str  # success, info, warning, error
    content: str


@dataclass(frozen=True)
class Webhook:
    """Where the app takes callbacks over HTTP (127.0.0.1 only), and its Encrypt Key (None: plain JSON, which
    the app checks by the verification token)."""

    url: str
    encrypt_key: str | None = None


@dataclass(frozen=True)
class WebhookRequest:
    url: str
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class CallbackAnswer:
    """How Feishu took the app's answer to one card callback."""

    message_id: str | None  # the card's message, as the envelope said
    via: Literal["ws", "webhook"]
    envelope: Json  # what was delivered
    status: int  # webhook: the HTTP status; ws: the ack's code; 0: no answer within CALLBACK_WAIT
    seconds: float  # from delivery to the answer
    toast: Toast | None = None
    card: Json | None = None  # the card the answer carried (its `data`)
    failure: str | None = None  # why Feishu counts the callback failed: the clicker sees error 200340, no update
    request: WebhookRequest | None = None  # the webhook request as sent, for replay()

    @property
    def ok(self) -> bool:
        return self.failure is None


class NotConnected(RuntimeError):
    """No long-connection client is connected (and Feishu does not replay what it could not push)."""


class EventOptions(TypedDict, total=False):
    """What every event builder takes besides the content: the message id (default: a new one), the chat type
    (default p2p), the sender (default ou_user, a "user"), the message it replies to and the topic it is in."""

    message_id: str | None
    chat_type: Literal["p2p", "group"]
    sender_open_id: str
    sender_type: str
    parent_id: str | None
    thread_id: str | None


@dataclass(frozen=True)
class Upload:
    """An image or file the app uploaded. `file_type` is the upload's file_type (for an image, its image_type);
    `name` its file_name (an image's is its key); `duration` in ms, if given."""

    key: str
    kind: Literal["image", "file"]
    file_type: str
    name: str
    data: bytes
    duration: int | None = None


class ReceivedFile(NamedTuple):
    """An image/file/audio/media message a chat received from the bot: its type, name and bytes."""

    kind: str
    name: str
    data: bytes


@dataclass(frozen=True)
class DownloadFault:
    """How resource bodies are served: `chunk` bytes at a time with `delay` seconds after each (slow), and with
    `cut_after` the connection is closed after that many bytes although Content-Length promised them all."""

    chunk: int = 64 * 1024
    delay: float = 0.0
    cut_after: int | None = None


DownloadOutcome = Literal["sending", "complete", "cut", "client_closed"]


@dataclass
class Download:
    """One resource body served: bytes written so far, and how it ended: "complete", "cut" (by a DownloadFault) or
    "client_closed" (the client hung up first; without a delay the socket buffers may take the whole body before the
    client closes, so a test of an aborted download slows it down)."""

    message_id: str
    file_key: str
    size: int
    sent: int = 0
    outcome: DownloadOutcome = "sending"


@dataclass(frozen=True)
class _Resource:
    kind: Literal["image", "file"]
    data: bytes
    name: str | None


@dataclass(frozen=True)
class _Body:
    """A binary response body: the HTTP thread writes it as `fault` says and reports progress in `record`."""

    data: bytes
    fault: DownloadFault
    record: Download


@dataclass(frozen=True)
class _Reply:
    status: int
    payload: Json
    headers: dict[str, str] = field(default_factory=dict)
    body: _Body | None = None  # a binary answer instead of the JSON payload


_HANG_UP = _Reply(0, {})


@dataclass
class _RateLimit:
    fraction: float
    every_nth: int
    code: int
    status: int
    reset_seconds: int
    limit: int
    rng: random.Random
    seen: int = 0

    def hit(self) -> bool:
        """Whether the next write call is refused: every n-th one, or a seeded random share."""
        self.seen += 1
        if self.every_nth:
            return self.seen % self.every_nth == 0
        return self.rng.random() < self.fraction


@dataclass(eq=False)
class _Conn:
    ws: ServerConnection
    service_id: int


RouteHandler = Callable[[dict[str, str], dict[str, str], Json], _Reply]


class FakeFeishu:
    """The fake platform. Every public method is safe to call from any thread."""

    def __init__(self, app_id: str = "cli_fake", app_secret: str = "fake-secret", *, bot_open_id: str = "ou_bot",
                 bot_name: str = "FakeBot", verification_token: str = VERIFICATION_TOKEN,
                 tenant_key: str = "tenant-fake", ping_interval: int = 120, reconnect_interval: int = 1) -> None:
        self.app_id, self.app_secret = app_id, app_secret
        self.bot_open_id, self.bot_name = bot_open_id, bot_name
        self.verification_token, self.tenant_key = verification_token, tenant_key
        self.client_config = {"ReconnectCount": -1, "ReconnectInterval": reconnect_interval,
                              "ReconnectNonce": 0, "PingInterval": ping_interval}
        self._cond = threading.Condition(threading.RLock())
        self._calls: list[Call] = []
        self._acks: list[Ack] = []
        self._pushed: dict[str, float] = {}
        self._chat_of: dict[str, str | None] = {}
        self._thread_of: dict[str, str] = {}  # message id -> the topic (thread) it is in
        self._type_of: dict[str, str] = {}  # message id -> its message type
        self._resources: dict[tuple[str, str], _Resource] = {}  # (message id, key) -> what the resource API serves
        self._recalled: set[str] = set()
        self._outside: set[str] = set()  # chats the bot is not in
        self._uploads: dict[str, Upload] = {}
        self._downloads: list[Download] = []
        self._faults: dict[str | None, DownloadFault] = {}  # by file key; None: every other key
        self._p2p: dict[str, str] = {}
        self._sent: dict[str, BotMessage] = {}
        self._uuids: dict[str, str] = {}
        self._cards: dict[str, Card] = {}
        self._reactions: dict[str, tuple[str, str]] = {}
        self._updates: list[CardUpdate] = []
        self._limit: _RateLimit | None = None
        self._down: Literal["503", "hang_up"] | None = None
        self._conns: list[_Conn] = []
        self._connection_count = 0
        self._pings = 0
        self._stopping = False
        self._retired = 0
        self._refusing: int | None = None
        self._refused_connections = 0
        self._held_types: frozenset[str] = frozenset()  # message types whose sends are held (`hold_sends`)
        self._held = 0  # sends held now
        self._routes = self._route_table()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._http.daemon_threads = True
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="fake-feishu-ws", daemon=True)
        self._ws_server: Server | None = None

    # ----- lifecycle -------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    @property
    def ws_port(self) -> int:
        assert self._ws_server is not None, "start() first"
        return self._ws_server.sockets[0].getsockname()[1]

    def start(self) -> FakeFeishu:
        threading.Thread(target=self._http.serve_forever, args=(0.05,), name="fake-feishu-http", daemon=True).start()
        self._loop_thread.start()
        self._ws_server = self._on_loop(self._open_ws_server())
        return self

    async def _open_ws_server(self) -> Server:
        """websockets binds a server to the running loop, so it must be created on the fake's loop."""
        return await serve(self._serve_ws, "127.0.0.1", 0, close_timeout=2)

    def stop(self) -> None:
        """Retire connected clients for good (see the module docstring), then shut both servers down."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()  # held sends end
            retire_target = self._retired + len(self._open())
        if self.drop_connections():
            self._wait(lambda: self._retired >= retire_target, timeout=3.0)
        self._http.shutdown()
        self._http.server_close()
        self._on_loop(self._close_ws_server())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(5)
        self._loop.close()

    async def _close_ws_server(self) -> None:
        if self._ws_server is not None:
            self._ws_server.close()
            await self._ws_server.wait_closed()

    # ----- waiting -----------------------------------------------------------------------------------

    def _wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait for a change to make `predicate` true; also re-check every 50 ms for outside state."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
            return True

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
        """Block until `predicate()` is true; raise TimeoutError naming `what` otherwise."""
        if not self._wait(predicate, timeout):
            raise TimeoutError(f"fake feishu: timed out after {timeout}s waiting for {what}")

    # ----- recorded state ------------------------------------------------------------------------------

    @property
    def calls(self) -> list[Call]:
        with self._cond:
            return list(self._calls)

    @property
    def acks(self) -> list[Ack]:
        with self._cond:
            return list(self._acks)

    @property
    def connection_count(self) -> int:
        """How many long connections were ever accepted (a reconnect adds one)."""
        with self._cond:
            return self._connection_count

    @property
    def open_connections(self) -> int:
        with self._cond:
            return len(self._open())

    def _open(self) -> list[_Conn]:
        """Connections not already closing: a client that closed its side is gone even before our handler
        has noticed, and must not be waited for (it will never reconnect to be retired)."""
        return [conn for conn in self._conns if conn.ws.state is State.OPEN]

    @property
    def refused_connections(self) -> int:
        """How many long-connection endpoint calls `refuse_connections` refused."""
        with self._cond:
            return self._refused_connections

    @property
    def pings(self) -> int:
        with self._cond:
            return self._pings

    @property
    def rejected_count(self) -> int:
        """Calls refused by `rate_limit` (writes) or `set_down` (all)."""
        with self._cond:
            return sum(1 for call in self._calls if call.rejected)

    def messages(self, chat_id: str | None = None) -> list[BotMessage]:
        """The bot's messages (of one chat, or all) in sending order, with the text they show now."""
        with self._cond:
            return [replace(copy.deepcopy(m), text=self._shown_text(m)) for m in self._sent.values()
                    if chat_id is None or m.chat_id == chat_id]

    def card(self, card_id: str) -> Card:
        with self._cond:
            return copy.deepcopy(self._cards[card_id])

    def message(self, message_id: str) -> BotMessage:
        """One of the bot's messages as it shows now (for a card message, `content` is its current card)."""
        with self._cond:
            if message_id not in self._sent:
                raise ValueError(f"fake feishu: the bot sent no message {message_id}")
            found = self._sent[message_id]
            return replace(copy.deepcopy(found), text=self._shown_text(found))

    def card_updates(self, message_id: str | None = None) -> list[CardUpdate]:
        """Every change of a card message's card (of one message, or all), in order."""
        with self._cond:
            return [copy.deepcopy(u) for u in self._updates if message_id is None or u.message_id == message_id]

    def reactions(self, message_id: str) -> list[str]:
        """Emoji types currently on a message (added and not deleted), in the order they were added."""
        with self._cond:
            return [emoji for mid, emoji in self._reactions.values() if mid == message_id]

    def max_rate(self, per: Literal["app", "chat", "card"] = "app", window: float = 1.0) -> int:
        """The most accepted write calls in any `window` seconds: app-wide (all IM and CardKit writes), in
        any one chat (message sends, replies and edits: Feishu's 5 QPS per chat), or on any one card
        (CardKit operations: 10 per second per card)."""
        with self._cond:
            calls = [c for c in self._calls if c.write and not c.rejected]
        groups: dict[str | None, list[float]] = {}
        for call in calls:
            key = None if per == "app" else call.chat_id if per == "chat" and _is_message_call(call.path) \
                else _card_of(call.path) if per == "card" else None
            if per == "app" or key is not None:
                groups.setdefault(key, []).append(call.time)
        return max((_densest(sorted(times), window) for times in groups.values()), default=0)

    # ----- fault injection -----------------------------------------------------------------------------

    def rate_limit(self, fraction: float = 0.0, *, every_nth: int = 0, code: int = RATE_LIMIT_CODE,
                   status: int = 429, reset_seconds: int = 1, limit: int = 50, seed: int = 0) -> None:
        """Refuse every n-th IM/CardKit write call, or a seeded-random `fraction` of them; both 0 turns it off."""
        with self._cond:
            self._limit = None if not (fraction or every_nth) else _RateLimit(
                fraction, every_nth, code, status, reset_seconds, limit, random.Random(seed))

    def set_down(self, down: bool = True, *, hang_up: bool = False) -> None:
        """Make every REST call fail, as in an outage: HTTP 503 with a JSON body (the SDK returns a response
        with a non-zero code and raw.status_code 503), or with `hang_up` close the connection unanswered (the
        SDK raises requests.exceptions.ConnectionError). The long-connection endpoint fails too, so a client
        whose connection drops cannot come back until the fake is up again."""
        with self._cond:
            self._down = ("hang_up" if hang_up else "503") if down else None

    def refuse_connections(self, refusing: bool = True, *, code: int = EXCEED_CONN_LIMIT) -> None:
        """Answer the long-connection endpoint with `code` until called with False. lark-oapi takes every code but
        0, 1 and 1000040343 as fatal (as for bad credentials): a client whose connection drops tries once, and
        its reconnect task ends for good while start() sleeps on."""
        with self._cond:
            self._refusing = code if refusing else None

    def hold_sends(self, *msg_types: str) -> None:
        """Hold every message send of these types, before Feishu takes it, until `drop_held_sends`; then the held
        ones are dropped (their connections closed, no message made). A test kills the bot while a send is held:
        the bot died after its upload and before its send."""
        with self._cond:
            self._held_types = frozenset(msg_types)

    @property
    def held_sends(self) -> int:
        with self._cond:
            return self._held

    def drop_held_sends(self) -> None:
        with self._cond:
            self._held_types = frozenset()
            self._cond.notify_all()

    def _hold(self, method: str, path: str, body: Any) -> bool:
        """Whether this request is a send that was held, and then dropped."""
        if method != "POST" or not isinstance(body, dict) or not re.fullmatch(
                r"/open-apis/im/v1/messages(/[^/]+/reply)?", path):
            return False
        with self._cond:
            if body.get("msg_type") not in self._held_types:
                return False
            self._held += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: body.get("msg_type") not in self._held_types or self._stopping)
            self._held -= 1
            return True

    # ----- long connection -------------------------------------------------------------------------------

    def wait_connected(self, timeout: float = 10.0, *, total: int = 1) -> None:
        """Wait until a client is connected and at least `total` connections were ever made."""
        self.wait_for(lambda: bool(self._open()) and self._connection_count >= total, timeout,
                      f"a long connection (#{total})")

    def push_event(self, event: Json, *, parts: int = 1) -> str:
        """Send an event to the newest connected client, split over `parts` frames; returns the frame
        message_id (what the ack carries). Raises if no client is connected: Feishu does not replay."""
        payload = json.dumps(event, ensure_ascii=False).encode()
        if not 1 <= parts <= len(payload):
            raise ValueError(f"parts must be between 1 and {len(payload)}")
        with self._cond:
            self._learn(event)
        return self._push(payload, parts, "event")

    def _push(self, payload: bytes, parts: int, frame_type: Literal["event", "card"]) -> str:
        """Send a payload to the newest connected client in data frames of `frame_type`; their message_id."""
        # Feishu splits a big payload over frames (sum/seq); none may pass the client's frame cap (websockets'
        # default 1 MiB, which lark-oapi keeps): a bigger one closed the connection and was never acked.
        parts = max(parts, -(-len(payload) // MAX_FRAME_PAYLOAD))
        with self._cond:
            if not (open_conns := self._open()):
                raise NotConnected("fake feishu: no long-connection client is connected")
            conn = open_conns[-1]
            message_id = f"fm_{uuid.uuid4().hex}"
            self._pushed[message_id] = time.monotonic()
        frames = _data_frames(payload, message_id, parts, conn.service_id, frame_type)
        self._on_loop(_send_all(conn.ws, frames))
        return message_id

    def wait_ack(self, message_id: str, timeout: float = 5.0) -> Ack:
        self.wait_for(lambda: any(a.message_id == message_id for a in self._acks), timeout, f"ack of {message_id}")
        with self._cond:
            return next(a for a in self._acks if a.message_id == message_id)

    def drop_connections(self) -> int:
        """Close every long connection from the server side; returns how many were open."""
        with self._cond:
            conns, self._conns = self._conns, []
            self._cond.notify_all()
        if conns:
            self._on_loop(_close_all([c.ws for c in conns]))
        return len(conns)

    def _on_loop(self, coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _serve_ws(self, ws: ServerConnection) -> None:
        query = parse_qs(urlsplit(ws.request.path if ws.request else "").query)
        conn = _Conn(ws, int(query.get("service_id", ["1"])[0]))
        with self._cond:
            self._conns.append(conn)
            self._connection_count += 1
            self._cond.notify_all()
        try:
            async for raw in ws:
                await self._on_client_frame(conn, raw if isinstance(raw, bytes) else raw.encode())
        except ConnectionClosed:
            pass
        finally:
            with self._cond:
                if conn in self._conns:
                    self._conns.remove(conn)
                self._cond.notify_all()

    async def _on_client_frame(self, conn: _Conn, raw: bytes) -> None:
        frame = Frame()
        frame.ParseFromString(raw)
        headers = {h.key: h.value for h in frame.headers}
        if frame.method == 0 and headers.get("type") == "ping":
            with self._cond:
                self._pings += 1
            pong = _frame(0, frame.service, {"type": "pong"}, json.dumps(self.client_config).encode())
            await conn.ws.send(pong.SerializeToString())
        elif frame.method == 1:
            self._record_ack(headers, frame.payload)

    def _record_ack(self, headers: dict[str, str], payload: bytes) -> None:
        message_id = headers.get("message_id", "")
        with self._cond:
            latency = time.monotonic() - self._pushed.get(message_id, time.monotonic())
            biz_rt = int(headers["biz_rt"]) if "biz_rt" in headers else None
            answer = json.loads(payload)
            self._acks.append(Ack(message_id, int(answer.get("code", 0)), latency, biz_rt, answer.get("data")))
            self._cond.notify_all()

    # ----- event builders ----------------------------------------------------------------------------

    def text_event(self, chat_id: str, text: str, *, mentions: list[Json] | None = None, mention_bot: bool = False,
                   **options: Unpack[EventOptions]) -> Json:
        """An im.message.receive_v1 event for a text message (in a topic: `thread_id`). `mentions` are Feishu
        mention objects ({"key": "@_user_1", "id": {"open_id": ...}, "name": ...}) whose keys the text should
        contain; `mention_bot` adds a mention of the bot and puts its key in front of the text."""
        mentions = self._mentions(mentions, mention_bot)
        if mention_bot:
            text = f"{mentions[-1]['key']} {text}"
        return self.message_event(chat_id, "text", {"text": text}, mentions, **options)

    def post_event(self, chat_id: str, lines: list[str], *, title: str = "",
                   images: Sequence[str] | Mapping[str, bytes] = (), mentions: list[Json] | None = None,
                   mention_bot: bool = False, **options: Unpack[EventOptions]) -> Json:
        """An im.message.receive_v1 event for a rich-text (post) message, one paragraph per line, then one per image
        (`{"tag": "img", "image_key": ...}`, as Feishu delivers them); a mapping of image keys to bytes also
        registers each image's bytes for the resource API."""
        mentions = self._mentions(mentions, mention_bot)
        paragraphs: list[list[Json]] = [[{"tag": "text", "text": line}] for line in lines]
        paragraphs += [[{"tag": "img", "image_key": key}] for key in images]
        paragraphs = paragraphs or [[]]
        if mention_bot:
            paragraphs[0].insert(0, {"tag": "at", "user_id": mentions[-1]["key"], "user_name": self.bot_name})
        event = self.message_event(chat_id, "post", {"title": title, "content": paragraphs}, mentions, **options)
        for key, data in images.items() if isinstance(images, Mapping) else ():
            self._serve(event, key, "image", data, None)
        return event

    def image_event(self, chat_id: str, image_key: str | None = None, *, data: bytes | None = None,
                    **options: Unpack[EventOptions]) -> Json:
        """An image message (content {"image_key"}; default key: a new one); `data` registers the image's bytes."""
        key = image_key or _new_key("img_v3")
        return self._serve(self.message_event(chat_id, "image", {"image_key": key}, **options), key, "image", data,
                           None)

    def file_event(self, chat_id: str, file_key: str | None = None, file_name: str = "file.bin", *,
                   data: bytes | None = None, **options: Unpack[EventOptions]) -> Json:
        """A file message (content {"file_key", "file_name"}); `data` registers the file's bytes under that name."""
        key = file_key or _new_key("file_v3")
        content = {"file_key": key, "file_name": file_name}
        return self._serve(self.message_event(chat_id, "file", content, **options), key, "file", data, file_name)

    def audio_event(self, chat_id: str, file_key: str | None = None, duration: int = 1000, *,
                    data: bytes | None = None, **options: Unpack[EventOptions]) -> Json:
        """A voice message (content {"file_key", "duration"} in ms; served with type=file); `data` registers it."""
        key = file_key or _new_key("file_v3")
        content = {"file_key": key, "duration": duration}
        return self._serve(self.message_event(chat_id, "audio", content, **options), key, "file", data, None)

    def _serve(self, event: Json, key: str, kind: Literal["image", "file"], data: bytes | None,
               name: str | None) -> Json:
        if data is not None:
            self.add_resource(event["event"]["message"]["message_id"], key, data, kind=kind, name=name)
        return event

    def _mentions(self, mentions: list[Json] | None, mention_bot: bool) -> list[Json]:
        result = [{"tenant_key": self.tenant_key, **m} for m in mentions or []]
        if mention_bot:
            result.append({"key": f"@_user_{len(result) + 1}", "name": self.bot_name, "tenant_key": self.tenant_key,
                           "id": {"open_id": self.bot_open_id, "user_id": "", "union_id": "on_bot"}})
        return result

    def message_event(self, chat_id: str, message_type: str, content: Json, mentions: list[Json] | None = None,
                      **options: Unpack[EventOptions]) -> Json:
        """An im.message.receive_v1 event for a message of any type with the given content (e.g. a sticker
        {"file_key"}, a merge_forward, an interactive card)."""
        now = str(int(time.time() * 1000))
        message: Json = {"message_id": options.get("message_id") or f"om_{uuid.uuid4().hex}", "chat_id": chat_id,
                         "chat_type": options.get("chat_type", "p2p"), "message_type": message_type,
                         "create_time": now, "update_time": now, "content": json.dumps(content, ensure_ascii=False),
                         "mentions": mentions or []}
        if parent_id := options.get("parent_id"):
            message.update(parent_id=parent_id, root_id=parent_id)
        if thread_id := options.get("thread_id"):  # a topic's new message has its thread_id; root_id may be empty
            message["thread_id"] = thread_id
        sender = options.get("sender_open_id", "ou_user")
        event = {"schema": "2.0",
                 "header": {"event_id": uuid.uuid4().hex, "event_type": "im.message.receive_v1", "create_time": now,
                            "token": self.verification_token, "app_id": self.app_id, "tenant_key": self.tenant_key},
                 "event": {"sender": {"sender_id": {"open_id": sender, "user_id": f"u_{sender}",
                                                    "union_id": f"on_{sender}"},
                                      "sender_type": options.get("sender_type", "user"),
                                      "tenant_key": self.tenant_key},
                           "message": message}}
        self._learn(event)
        return event

    def _learn(self, event: Json) -> None:
        """Remember a user message's chat, so replies and reactions to it land in the right chat."""
        message = event.get("event", {}).get("message")
        if not message:
            return
        with self._cond:
            self._chat_of[message["message_id"]] = message.get("chat_id")
            self._type_of[message["message_id"]] = message.get("message_type", "")
            if message.get("thread_id"):
                self._thread_of[message["message_id"]] = message["thread_id"]
            sender = event["event"].get("sender", {}).get("sender_id", {}).get("open_id")
            if message.get("chat_type") == "p2p" and sender:
                self._p2p[sender] = message["chat_id"]

    # ----- files: resources of user messages, uploads, what chats received ---------------------------------

    def add_resource(self, message_id: str, key: str, data: bytes, *, kind: Literal["image", "file"] | None = None,
                     name: str | None = None) -> None:
        """Serve `data` as the resource `key` of a message (kind: by default "image" for an img_ key, else "file";
        `name`: the file name in Content-Disposition)."""
        with self._cond:
            self._resources[(message_id, key)] = _Resource(kind or ("image" if key.startswith("img_") else "file"),
                                                           data, name)

    def recall(self, message_id: str) -> None:
        """The user deletes their message: its resources are gone (230110)."""
        with self._cond:
            self._recalled.add(message_id)

    def set_bot_in_chat(self, chat_id: str, present: bool = True) -> None:
        """Take the bot out of a chat (or put it back): resources of the chat's messages answer 234004 and sends
        to it 230002."""
        with self._cond:
            (self._outside.discard if present else self._outside.add)(chat_id)

    def download_fault(self, fault: DownloadFault | None, file_key: str | None = None) -> None:
        """Serve one resource's body (or with no key, every other one) as `fault` says; None serves it normally."""
        with self._cond:
            if fault is None:
                self._faults.pop(file_key, None)
            else:
                self._faults[file_key] = fault

    @property
    def downloads(self) -> list[Download]:
        """Every resource body served, in order."""
        with self._cond:
            return [copy.copy(d) for d in self._downloads]

    @property
    def uploads(self) -> list[Upload]:
        """Every image and file upload Feishu accepted, in order."""
        with self._cond:
            return list(self._uploads.values())

    def uploaded(self, key: str) -> Upload:
        with self._cond:
            if key not in self._uploads:
                raise ValueError(f"fake feishu: nothing was uploaded as {key}")
            return self._uploads[key]

    def received_files(self, chat_id: str) -> list[ReceivedFile]:
        """The images and files the bot sent to a chat, in order: (message type, name, bytes)."""
        with self._cond:
            return [ReceivedFile(m.msg_type, upload.name, upload.data) for m in self._sent.values()
                    if m.chat_id == chat_id and (upload := self._upload_of(m)) is not None]

    def _upload_of(self, message: BotMessage) -> Upload | None:
        key = _resource_key(message.msg_type, message.content)
        return self._uploads.get(key) if key is not None else None

    # ----- card callbacks -----------------------------------------------------------------------------

    def buttons(self, message_id: str) -> list[Button]:
        """The buttons of the card a message shows now, in display order ([] once it has none)."""
        with self._cond:
            return card_buttons(self._shown_card(message_id))

    def card_action_event(self, message_id: str, button: Button | str, operator_open_id: str, *,
                          form_value: dict[str, str] | None = None) -> Json:
        """The `card.action.trigger` envelope Feishu sends when `operator_open_id` clicks `button` (one of
        `buttons()`, or its text) on the card the message shows now. A form's submit button sends all the form's
        inputs: as typed (`form_value`) or as left (their default_value, or "")."""
        with self._cond:
            card = self._shown_card(message_id)
            chat_id = self._sent[message_id].chat_id
        pressed = _pressed(card_buttons(card), button)
        action: Json = {"tag": "button", "name": pressed.name}
        if pressed.value is not None:
            action["value"] = pressed.value
        if pressed.form is not None and pressed.form_action == "submit":
            action["form_value"] = _form_value(card, pressed.form, form_value or {})
        elif form_value:
            raise ValueError(f"button {pressed.text!r} submits no form, so a click on it sends no form_value")
        operator = {"tenant_key": self.tenant_key, "user_id": f"u_{operator_open_id}", "open_id": operator_open_id,
                    "union_id": f"on_{operator_open_id}"}
        return {"schema": "2.0",
                "header": {"event_id": uuid.uuid4().hex, "token": self.verification_token,
                           "create_time": str(int(time.time() * 1000)), "event_type": "card.action.trigger",
                           "tenant_key": self.tenant_key, "app_id": self.app_id},
                "event": {"operator": operator, "token": f"c-{uuid.uuid4().hex}", "action": action,
                          "host": "im_message", "context": {"open_message_id": message_id, "open_chat_id": chat_id}}}

    def click(self, message_id: str, button: Button | str, operator_open_id: str, *,
              form_value: dict[str, str] | None = None, via: Literal["ws", "webhook"] = "ws",
              frame_type: Literal["card", "event"] = "card", webhook: Webhook | None = None,
              wait: float = CALLBACK_WAIT) -> CallbackAnswer:
        """A click as Feishu delivers it: over the long connection in a data frame of `frame_type` (Feishu sends
        callbacks as `card` frames; `event` ones have been seen too), or to `webhook`. See send_callback."""
        envelope = self.card_action_event(message_id, button, operator_open_id, form_value=form_value)
        return self.send_callback(envelope, via=via, frame_type=frame_type, webhook=webhook, wait=wait)

    def send_callback(self, envelope: Json, *, via: Literal["ws", "webhook"] = "ws",
                      frame_type: Literal["card", "event"] = "card", webhook: Webhook | None = None,
                      signature: str | None = None, wait: float = CALLBACK_WAIT) -> CallbackAnswer:
        """Deliver a callback envelope (from card_action_event, altered or not) and wait for the answer; Feishu
        takes one within CALLBACK_DEADLINE, and a card in it replaces the message's card. `signature` forges the
        webhook request's X-Lark-Signature: such a request comes from an attacker, whose answer changes no card.
        `wait`: how long the long connection's ack is waited for (shorter where none is to come)."""
        if via == "ws":
            if signature is not None:
                raise ValueError("the long connection carries no signature to forge")
            answer = self._callback_over_ws(envelope, frame_type, wait)
        elif webhook is None:
            raise ValueError("via='webhook' needs webhook=Webhook(url, encrypt_key)")
        else:
            answer = _post_callback(_webhook_request(webhook, envelope, signature), envelope)
        if signature is None:
            self._apply(answer)
        return answer

    def replay(self, answer: CallbackAnswer) -> CallbackAnswer:
        """Post a webhook callback's request again byte for byte, as an attacker who captured it would (Feishu
        never does): the app's answer is returned and changes no card."""
        if answer.request is None:
            raise ValueError("only a webhook callback can be replayed")
        return _post_callback(answer.request, answer.envelope)

    def _callback_over_ws(self, envelope: Json, frame_type: Literal["card", "event"], wait: float) -> CallbackAnswer:
        """Push the callback in one data frame; the client's ack carries the answer (base64 JSON in `data`)."""
        started = time.monotonic()
        try:
            ack = self.wait_ack(self._push(json.dumps(envelope, ensure_ascii=False).encode(), 1, frame_type),
                                wait)
        except (NotConnected, TimeoutError) as exc:
            return _failed(envelope, "ws", 0, time.monotonic() - started, f"no answer: {exc}")
        try:
            body = base64.b64decode(ack.data or "", validate=True)
        except ValueError:
            return _failed(envelope, "ws", ack.code, ack.latency, f"the ack's data is not base64: {ack.data!r:.200}")
        return _callback_answer(envelope, "ws", ack.code, ack.latency, body)

    def _apply(self, answer: CallbackAnswer) -> None:
        """Feishu shows the card of an answer it took in place of the clicked one (an update, not an API call)."""
        if not answer.ok or answer.card is None:
            return
        with self._cond:
            message = self._sent.get(answer.message_id or "")
            if message is not None and message.msg_type == "interactive":
                self._show_card(message, answer.card, "callback")

    def _shown_card(self, message_id: str) -> Json:
        """The card a card message shows now: its CardKit card's, or its own."""
        message = self._sent.get(message_id)
        if message is None or message.msg_type != "interactive":
            raise ValueError(f"fake feishu: {message_id} is not a card message the bot sent")
        return copy.deepcopy(self._cards[message.card_id].json if message.card_id else message.content)

    def _show_card(self, message: BotMessage, content: Json, source: Literal["patch", "callback"]) -> None:
        message.content, message.card_id = content, _card_ref(content)
        self._updates.append(CardUpdate(message.message_id, source, copy.deepcopy(content), time.monotonic()))
        self._cond.notify_all()

    # ----- HTTP --------------------------------------------------------------------------------------

    def _route_table(self) -> list[tuple[str, re.Pattern[str], RouteHandler, bool]]:
        """(method, path pattern, handler, needs the tenant token)."""
        msg = r"/open-apis/im/v1/messages/(?P<message_id>[^/]+)"
        card = r"/open-apis/cardkit/v1/cards/(?P<card_id>[^/]+)"
        table: list[tuple[str, str, RouteHandler, bool]] = [
            ("POST", r"/open-apis/auth/v3/tenant_access_token/internal", self._token, False),
            ("POST", r"/open-apis/auth/v3/app_access_token/internal", self._token, False),
            ("POST", r"/callback/ws/endpoint", self._ws_endpoint, False),
            ("GET", r"/open-apis/bot/v3/info", self._bot_info, True),
            ("POST", r"/open-apis/im/v1/messages", self._send, True),
            ("GET", msg + "/resources/(?P<file_key>[^/]+)", self._get_resource, True),
            ("POST", r"/open-apis/im/v1/images", self._upload_image, True),
            ("POST", r"/open-apis/im/v1/files", self._upload_file, True),
            ("POST", msg + "/reply", self._reply, True),
            ("PUT", msg, self._update, True),
            ("PATCH", msg, self._patch, True),
            ("POST", msg + "/reactions", self._add_reaction, True),
            ("DELETE", msg + "/reactions/(?P<reaction_id>[^/]+)", self._delete_reaction, True),
            ("POST", r"/open-apis/cardkit/v1/cards", self._create_card, True),
            ("PUT", card, self._update_card, True),
            ("PATCH", card + "/settings", self._card_settings, True),
            ("PUT", card + "/elements/(?P<element_id>[^/]+)/content", self._card_content, True),
        ]
        return [(method, re.compile(pattern), handler, auth) for method, pattern, handler, auth in table]

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                reply = fake._dispatch(self.command, self.path, self.headers.get("Authorization"),
                                       self.headers.get("Content-Type", ""), raw)
                if reply is _HANG_UP:
                    self.close_connection = True
                elif reply.body is not None:
                    self._head(reply.status, reply.headers)
                    self.close_connection = not fake._write_body(self.wfile, reply.body)
                else:
                    data = json.dumps(reply.payload, ensure_ascii=False).encode()
                    self._head(reply.status, {**reply.headers, "Content-Type": "application/json; charset=utf-8",
                                              "Content-Length": str(len(data))})
                    self.wfile.write(data)

            def _head(self, status: int, headers: dict[str, str]) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        return Handler

    def _dispatch(self, method: str, raw_path: str, authorization: str | None, content_type: str,
                  raw: bytes) -> _Reply:
        url = urlsplit(raw_path)
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        body, recorded = _request_body(content_type, raw)
        if self._hold(method, url.path, body):
            return _HANG_UP
        with self._cond:
            route, params = self._match(method, url.path)
            write = method != "GET" and url.path.startswith(("/open-apis/im/", "/open-apis/cardkit/"))
            call = Call(method, url.path, query, recorded, self._chat_for(params, query, body), time.monotonic(),
                        write)
            reply = self._answer(call, route, params, query, body, authorization)
            call.status, call.code = reply.status, reply.payload.get("code")
            self._calls.append(call)
            self._cond.notify_all()
            return reply

    def _match(self, method: str, path: str) -> tuple[tuple[RouteHandler, bool] | None, dict[str, str]]:
        for route_method, pattern, handler, auth in self._routes:
            if route_method == method and (found := pattern.fullmatch(path)):
                return (handler, auth), {key: unquote(value) for key, value in found.groupdict().items()}
        return None, {}

    def _answer(self, call: Call, route: tuple[RouteHandler, bool] | None, params: dict[str, str],
                query: dict[str, str], body: Any, authorization: str | None) -> _Reply:
        if route is None:
            return _error(404, 404, f"no route for {call.method} {call.path} (fake)")
        handler, needs_token = route
        if needs_token and authorization != f"Bearer {TENANT_TOKEN}":
            return _error(400, 99991663, "Invalid access token for authorization (fake)")
        if not isinstance(body, dict | None):
            return _error(400, 230001, "request body is not a JSON object (fake)")
        if (refusal := self._refusal(call.write)) is not None:
            call.rejected = True
            return refusal
        return handler(params, query, body or {})

    def _refusal(self, write: bool) -> _Reply | None:
        """Down refuses every call (the long-connection endpoint too); rate limits refuse writes only."""
        if self._down == "hang_up":
            return _HANG_UP
        if self._down == "503":
            return _error(503, 503, "service unavailable (fake feishu is down)")
        if write and self._limit is not None and self._limit.hit():
            headers = {"x-ogw-ratelimit-limit": str(self._limit.limit),
                       "x-ogw-ratelimit-reset": str(self._limit.reset_seconds)}
            return _Reply(self._limit.status, {"code": self._limit.code, "msg": "request trigger frequency limit"},
                          headers)
        return None

    def _chat_for(self, params: dict[str, str], query: dict[str, str], body: Any) -> str | None:
        """The chat a call acts in, for per-chat rates: the message's, the card's message's, or the receiver."""
        if "message_id" in params:
            return self._chat_of.get(params["message_id"])
        if "card_id" in params:
            card = self._cards.get(params["card_id"])
            return self._chat_of.get(card.message_id) if card and card.message_id else None
        if isinstance(body, dict) and body.get("receive_id"):
            receiver = body["receive_id"]
            return receiver if query.get("receive_id_type") == "chat_id" else self._p2p.get(receiver, receiver)
        return None

    # ----- auth, bot, endpoint -------------------------------------------------------------------------

    def _token(self, params: dict[str, str], query: dict[str, str], body: Json) -> _Reply:
        if (body.get("app_id"), body.get("app_secret")) != (self.app_id, self.app_secret):
            return _error(400, 10014, "app secret invalid")
        return _Reply(200, {"code": 0, "msg": "ok", "tenant_access_token": TENANT_TOKEN,
                            "app_access_token": APP_TOKEN, "expire": 7200})

    def _bot_info(self, params: dict[str, str], query: dict[str, str], body: Json) -> _Reply:
        return _Reply(200, {"code": 0, "msg": "ok", "bot": {
            "activate_status": 2, "app_name": self.bot_name, "avatar_url": "", "ip_white_list": [],
            "open_id": self.bot_open_id}})

    def _ws_endpoint(self, params: dict[str, str], query: dict[str, str], body: Json) -> _Reply:
        """Hand out a ws:// URL; a stopping fake answers with a code the SDK treats as fatal (no retry)."""
        if self._stopping:
            self._retired += 1
            return _error(200, 403, "fake feishu is stopped (fake)")
        if (body.get("AppID"), body.get("AppSecret")) != (self.app_id, self.app_secret):
            return _error(200, 403, "invalid app credentials (fake)")
        if self._refusing is not None:
            self._refused_connections += 1
            return _error(200, self._refusing, "the app has too many long connections (fake)")
        url = f"ws://127.0.0.1:{self.ws_port}/ws?device_id=fake-{uuid.uuid4().hex[:12]}&service_id=1"
        return _ok({"URL": url, "ClientConfig": self.client_config})

    # ----- IM messages ---------------------------------------------------------------------------------

    def _send(self, params: dict[str, str], query: dict[str, str], body: Json) -> _Reply:
        if not query.get("receive_id_type") or not body.get("receive_id"):
            return _error(400, 230001, "receive_id_type and receive_id are required")
        return self._new_message(self._chat_for({}, query, body), body, reply_to=None)

    def _reply(self, params: dict[str, str], query: dict[str, str], body: Json) -> _Reply:
        parent = params["message_id"]
        if parent not in self._chat_of:
            return _error(400, 230001, f"unknown message_id {parent} (fake)")
        return self._new_message(self._chat_of[parent], body, reply_to=parent)

    def _new_message(self, chat_id: str | None, body: Json, reply_to: str | None) -> _Reply:
        """Create a bot message; the same `uuid` again returns the first message instead of a new one."""
        if (key := body.get("uuid")) and key in self._uuids:
            return _ok(self._message_data(self._sent[self._uuids[key]]))
        if chat_id in self._outside:
            return _error(400, 230002, "The bot can not be outside the group.")
        content, error = _parse_content(body.get("msg_type"), body.get("content"))
        if error or (error := self._unknown_card(content) or self._unowned_resource(body["msg_type"], content)):
            return error
        card_id = _card_ref(content)
        message = BotMessage(f"om_{uuid.uuid4().hex}", chat_id, body["msg_type"], content, reply_to,
                             bool(body.get("reply_in_thread")), card_id, key,
                             thread_id=self._reply_thread(reply_to, bool(body.get("reply_in_thread"))))
        self._sent[message.message_id] = message
        if message.thread_id:
            self._thread_of[message.message_id] = message.thread_id
        self._chat_of[message.message_id] = chat_id
        self._type_of[message.message_id] = message.msg_type
        if key:
            self._uuids[key] = message.message_id
        if card_id is not None:
            self._cards[card_id].message_id = message.message_id
        if (upload := self._upload_of(message)) is not None:  # the resource API serves it in the chat
            self._resources[(message.message_id, upload.key)] = _Resource(upload.kind, upload.data, upload.name)
        return _ok(self._message_data(message))

    def _reply_thread(self, reply_to: str | None, in_thread: bool) -> str | None:
        """The topic a reply lands in: the one its message is in (Feishu: a reply to a message in a topic goes into
        it whatever reply_in_thread says), a new one with reply_in_thread, or none."""
        if reply_to is None:
            return None
        if reply_to in self._thread_of:
            return self._thread_of[reply_to]
        if in_thread:
            self._thread_of[reply_to] = f"omt_{uuid.uuid4().hex[:16]}"
            return self._thread_of[reply_to]
        return None

    def _update(self, params: dict[str, str], query: dict[str, str], body: Json) -> _Reply:
        """Edit a text/post message (PUT); Feishu allows 20 edits and only of the bot's own messages."""
        message = self._own_message(params["message_id"])
        if isinstance(message, _Reply):
            return message
        if message.msg_type not in ("text", "post") or body.get("msg_type") not in ("text", "post"):
            return _error(400, 230054, "This operation is not supported for this message type.")
        if message.edits >= MAX_EDITS:
            return _error(400, 230072, "The message has reached the number of times it can be edited.")
        content, error = _parse_content(body["msg_type"], body.get("content"))
        if error:
            return error
        message.msg_type, message.content, message.edits = body["msg_type"], content, message.edits + 1
        return _ok(self._message_data(message))

    def _patch(self, params: dict[str, str], query: dict[str, str], body: Json) -> _Reply:
        """Replace a card message's card (PATCH): at most PATCH_QPS a second on one message."""
        message = self._own_message(params["message_id"])
        if isinstance(message, _Reply):
            return message
        if message.msg_type != "interactive":
            return _error(400, 230054, "This operation is not supported for this message type.")
        now = time.monotonic()
        if sum(1 for u in self._updates if u.message_id == message.message_id and u.source == "patch"
               and now - u.time < 1.0) >= PATCH_QPS:
            return _error(400, 230020, "This message triggers the frequency limit (5 updates a second).")
        content, error = _parse_content("interactive", body.get("content"))
        if error or (error := self._unknown_card(content)):
            return error
        self._show_card(message, content, "patch")
        return _ok({})

    def _unowned_resource(self, msg_type: str, content: Json) -> _Reply | None:
        """The error for an image/file/audio/media message whose key this app did not upload, or uploaded as a type
        that message type does not take."""
        if msg_type not in _FILE_MESSAGES:
            return None
        upload = self._uploads.get(_resource_key(msg_type, content) or "")
        if upload is None:
            return _error(400, 230017, "Bot is NOT the owner of the resource.")
        if upload.file_type not in _FILE_MESSAGES[msg_type]:
            return _error(400, 230055, "The type of file upload does not match the type of message being sent.")
        return None

    def _unknown_card(self, content: Json) -> _Reply | None:
        """The error for a card message that points at a card entity that does not exist."""
        card_id = _card_ref(content)
        if card_id is not None and card_id not in self._cards:
            return _error(400, 230099, f"Failed to create card content, card {card_id} does not exist (fake)")
        return None

    def _own_message(self, message_id: str) -> BotMessage | _Reply:
        """The bot's message, or the error Feishu gives for someone else's or an unknown one."""
        if message_id in self._sent:
            return self._sent[message_id]
        if message_id in self._chat_of:
            return _error(400, 230071, "The operator is not the sender of the message.")
        return _error(400, 230001, f"unknown message_id {message_id} (fake)")

    def _message_data(self, message: BotMessage) -> Json:
        now = str(int(time.time() * 1000))
        data = {"message_id": message.message_id, "chat_id": message.chat_id, "msg_type": message.msg_type,
                "create_time": now, "update_time": now, "deleted": False, "updated": message.edits > 0,
                "sender": {"id": self.app_id, "id_type": "app_id", "sender_type": "app",
                           "tenant_key": self.tenant_key},
                "body": {"content": json.dumps(message.content, ensure_ascii=False)}}
        if message.reply_to:
            data.update(parent_id=message.reply_to, root_id=message.reply_to)
        if message.thread_id:
            data["thread_id"] = message.thread_id
        return data

    def _shown_text(self, message: BotMessage) -> str:
        if message.card_id is not None:
            return self._cards[message.card_id].text
        if (upload := self._upload_of(message)) is not None:
            return f"[{message.msg_type} {upload.name}]"
        return message_text(message.msg_type, message.content)

    # ----- reactions -----------------------------------------------------------------------------------

    def _add_reaction(self, params: dict[str, str], query: dict[str, str], body: Json) -> _Reply:
        emoji = (body.get("reaction_type") or {}).get("emoji_type")
        if params["message_id"] not in self._chat_of or not emoji:
            return _error(400, 230001, "unknown message_id or missing reaction_type.emoji_type (fake)")
        reaction_id = uuid.uuid4().hex
        self._reactions[reaction_id] = (params["message_id"], emoji)
        return _ok(self._reaction_data(reaction_id, emoji))

    def _delete_reaction(self, params: dict[str, str], query: dict[str, str], body: Json) -> _Reply:
        found = self._reactions.get(params["reaction_id"])
        if found is None or found[0] != params["message_id"]:
            return _error(400, 230001, "unknown reaction_id for this message (fake)")
        del self._reactions[params["reaction_id"]]
        return _ok(self._reaction_data(params["reaction_id"], found[1]))

    def _reaction_data(self, reaction_id: str, emoji: str) -> Json:
        return {"reaction_id": reaction_id, "reaction_type": {"emoji_type": emoji},
                "operator": {"operator_id": self.app_id, "operator_type": "app"},
                "action_time": str(int(time.time() * 1000))}

    # ----- message resources and uploads ---------------------------------------------------------------

    def _get_resource(self, params: dict[str, str], query: dict[str, str], body: Json) -> _Reply:
        """A message's image or file: its bytes (written by the HTTP thread, see _write_body), or Feishu's error."""
        message_id, key = params["message_id"], params["file_key"]
        resource = self._resources.get((message_id, key))
        if error := self._resource_error(message_id, query.get("type"), resource):
            return error
        assert resource is not None
        record = Download(message_id, key, len(resource.data))
        self._downloads.append(record)
        fault = self._faults.get(key) or self._faults.get(None) or DownloadFault()
        return _Reply(200, {}, _resource_headers(key, resource), _Body(resource.data, fault, record))

    def _resource_error(self, message_id: str, kind: str | None, resource: _Resource | None) -> _Reply | None:
        if kind not in ("image", "file"):
            return _error(400, 234001, "Invalid request param. (fake: type must be image or file)")
        if message_id not in self._chat_of:
            return _error(400, 234001, f"Invalid request param. (fake: no message {message_id})")
        if message_id in self._recalled:
            return _error(400, 230110, "Action unavailable as the message has been deleted.")
        if self._chat_of[message_id] in self._outside:
            return _error(400, 234004, "App not in chat.")
        if self._type_of.get(message_id) in _NO_RESOURCES:
            return _error(400, 234043, "Unsupported message type.")
        if resource is None:
            return _error(400, 234003, "File not in message.")
        if resource.kind != kind:
            return _error(400, 234001, f"Invalid request param. (fake: the resource is of type {resource.kind})")
        if len(resource.data) > DOWNLOAD_LIMIT:
            return _error(400, 234037, "Downloaded file size exceeds limit.")
        return None

    def _write_body(self, out: BinaryIO, body: _Body) -> bool:
        """Write a resource body as its fault says, recording progress; False: the connection must be closed."""
        view, fault = memoryview(body.data), body.fault
        end = len(view) if fault.cut_after is None else min(fault.cut_after, len(view))
        sent = 0
        try:
            while sent < end:
                piece = view[sent:min(sent + fault.chunk, end)]
                out.write(piece)
                sent += len(piece)
                self._progress(body.record, sent)
                time.sleep(fault.delay)
        except OSError:  # BrokenPipeError, ConnectionResetError: the client hung up
            self._progress(body.record, sent, "client_closed")
            return False
        self._progress(body.record, sent, "complete" if end == len(view) else "cut")
        return end == len(view)

    def _progress(self, record: Download, sent: int, outcome: DownloadOutcome = "sending") -> None:
        with self._cond:
            record.sent, record.outcome = sent, outcome
            self._cond.notify_all()

    def _upload_image(self, params: dict[str, str], query: dict[str, str], body: Json) -> _Reply:
        data = body.get("image")
        if body.get("image_type") not in IMAGE_TYPES or not isinstance(data, bytes):
            return _error(400, 234001, "Invalid request param. (fake: image_type message|avatar and an image part)")
        if error := _size_error(data, IMAGE_LIMIT):
            return error
        if _image_mime(data) is None:
            return _error(400, 234011, "Can't regonnize the image format.")  # sic, Feishu's text
        key = _new_key("img_v3")
        return self._store(Upload(key, "image", body["image_type"], key, data))

    def _upload_file(self, params: dict[str, str], query: dict[str, str], body: Json) -> _Reply:
        # lark-oapi sends every field of the body, an unset one (duration, file_name) as an empty string
        data, duration = body.get("file"), str(body.get("duration") or "")
        if body.get("file_type") not in FILE_TYPES or not body.get("file_name") or not isinstance(data, bytes) \
                or not (duration.isdigit() or duration == ""):
            return _error(400, 234001, "Invalid request param. (fake: file_type, file_name and a file part are "
                                       "required, duration is an integer)")
        if error := _size_error(data, FILE_LIMIT):
            return error
        return self._store(Upload(_new_key("file_v3"), "file", body["file_type"], body["file_name"], data,
                                  int(duration) if duration else None))

    def _store(self, upload: Upload) -> _Reply:
        self._uploads[upload.key] = upload
        return _ok({f"{upload.kind}_key": upload.key})

    # ----- CardKit -------------------------------------------------------------------------------------

    def _create_card(self, params: dict[str, str], query: dict[str, str], body: Json) -> _Reply:
        card_json, error = _parse_card(body)
        if error:
            return error
        card = Card(str(random.randrange(10**18, 10**19)), card_json)
        card.versions.append(card.text)
        self._cards[card.card_id] = card
        return _ok({"card_id": card.card_id})

    def _card_content(self, params: dict[str, str], query: dict[str, str], body: Json) -> _Reply:
        """Stream text into one element: `content` is the element's full new text."""
        def apply(card: Card) -> _Reply | None:
            if not _set_element_text(card.json, params["element_id"], str(body.get("content", ""))):
                return _error(400, 10002, f"element {params['element_id']} not found (fake)")
            return None
        return self._card_op(params["card_id"], body, apply)

    def _card_settings(self, params: dict[str, str], query: dict[str, str], body: Json) -> _Reply:
        def apply(card: Card) -> _Reply | None:
            try:
                settings = json.loads(body.get("settings") or "")
            except ValueError:
                return _error(400, 10002, "settings is not a JSON string")
            card.json.setdefault("config", {}).update(settings.get("config", {}))
            return None
        return self._card_op(params["card_id"], body, apply)

    def _update_card(self, params: dict[str, str], query: dict[str, str], body: Json) -> _Reply:
        def apply(card: Card) -> _Reply | None:
            card_json, error = _parse_card(body.get("card") or {})
            if card_json is not None:
                card.json = card_json
            return error
        return self._card_op(params["card_id"], body, apply)

    def _card_op(self, card_id: str, body: Json, apply: Callable[[Card], _Reply | None]) -> _Reply:
        """The rules every card operation shares: the card exists, `uuid` makes a retry a no-op, and
        `sequence` must be strictly greater than the card's previous one."""
        card = self._cards.get(card_id)
        if card is None:
            return _error(400, 200740, "The card entity does not exist")
        if body.get("uuid") in card.uuids:
            return _ok({})
        sequence = body.get("sequence")
        if not isinstance(sequence, int) or sequence <= card.sequence:
            return _error(400, 300317, f"sequence {sequence} is not greater than {card.sequence}")
        if error := apply(card):
            return error
        if len(json.dumps(card.json, ensure_ascii=False).encode()) > CARD_LIMIT:
            return _error(400, 200860, "Card content exceeds limit.")
        card.sequence = sequence
        if body.get("uuid"):
            card.uuids.add(body["uuid"])
        card.versions.append(card.text)
        return _ok({})


# ----- webhook helpers (module level: they need no server) ---------------------------------------------


def encrypt_body(event: Json, encrypt_key: str) -> dict[str, str]:
    """The body Feishu posts when an Encrypt Key is set: base64(iv + AES-256-CBC(PKCS7)), key sha256(key)."""
    key = hashlib.sha256(encrypt_key.encode()).digest()
    plain = json.dumps(event, ensure_ascii=False).encode()
    pad = AES.block_size - len(plain) % AES.block_size
    iv = os.urandom(AES.block_size)
    encrypted = AES.new(key, AES.MODE_CBC, iv).encrypt(plain + bytes([pad]) * pad)
    return {"encrypt": base64.b64encode(iv + encrypted).decode()}


def signature_headers(raw_body: bytes, encrypt_key: str, *, timestamp: str | None = None,
                      nonce: str | None = None) -> dict[str, str]:
    """Feishu's signature headers: sha256_hex(timestamp + nonce + encrypt_key + raw body). The names are
    capitalised like Feishu's because the SDK looks them up case-sensitively."""
    timestamp = timestamp or str(int(time.time()))
    nonce = nonce or uuid.uuid4().hex
    signature = hashlib.sha256((timestamp + nonce + encrypt_key).encode() + raw_body).hexdigest()
    return {"X-Lark-Request-Timestamp": timestamp, "X-Lark-Request-Nonce": nonce, "X-Lark-Signature": signature}


def webhook_request(event: Json, encrypt_key: str | None = None) -> tuple[bytes, dict[str, str]]:
    """A ready-to-POST webhook delivery: raw body and headers, encrypted and signed when a key is given."""
    body = json.dumps(encrypt_body(event, encrypt_key) if encrypt_key else event).encode()
    headers = {"Content-Type": "application/json; charset=utf-8"}
    if encrypt_key:
        headers.update(signature_headers(body, encrypt_key))
    return body, headers


def url_verification(challenge: str, token: str) -> Json:
    """The request Feishu sends when a webhook URL is configured; the answer must echo `challenge`."""
    return {"challenge": challenge, "token": token, "type": "url_verification"}


# ----- card callbacks: delivery over the webhook, and how Feishu takes an answer ----------------------------


def _webhook_request(webhook: Webhook, envelope: Json, signature: str | None) -> WebhookRequest:
    """A callback request signed (and encrypted) like an event; `signature` replaces the real signature."""
    body, headers = webhook_request(envelope, webhook.encrypt_key)
    if signature is not None:
        headers["X-Lark-Signature"] = signature
    return WebhookRequest(webhook.url, body, headers)


def _post_callback(request: WebhookRequest, envelope: Json) -> CallbackAnswer:
    """POST a callback request (to 127.0.0.1 only) and read the answer, waiting up to CALLBACK_WAIT."""
    url = urlsplit(request.url)
    if url.scheme != "http" or url.hostname not in ("127.0.0.1", "localhost") or url.port is None:
        raise ValueError(f"fake feishu posts callbacks to http://127.0.0.1:PORT/... only, not {request.url}")
    started = time.monotonic()
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=CALLBACK_WAIT)
    try:
        connection.request("POST", url.path + (f"?{url.query}" if url.query else ""), request.body, request.headers)
        response = connection.getresponse()
        status, body = response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:  # a timeout is an OSError too
        return _failed(envelope, "webhook", 0, time.monotonic() - started, f"no answer: {exc!r}", request)
    finally:
        connection.close()
    return _callback_answer(envelope, "webhook", status, time.monotonic() - started, body, request)


def _failed(envelope: Json, via: Literal["ws", "webhook"], status: int, seconds: float, why: str,
            request: WebhookRequest | None = None) -> CallbackAnswer:
    return CallbackAnswer(_clicked_message(envelope), via, envelope, status, seconds, failure=why, request=request)


def _callback_answer(envelope: Json, via: Literal["ws", "webhook"], status: int, seconds: float, body: bytes,
                     request: WebhookRequest | None = None) -> CallbackAnswer:
    """How Feishu takes an answer: it must come in time, with status 200, as a JSON object (empty: nothing to
    show) whose toast and card are well formed; anything else fails the callback."""
    if seconds > CALLBACK_DEADLINE:
        why = f"answered after {seconds:.2f} s; Feishu waits {CALLBACK_DEADLINE:.0f} s"
    elif status != 200:
        why = f"answered with status {status}: {body[:200]!r}"
    else:
        try:
            parsed = _answer_json(body)
            return CallbackAnswer(_clicked_message(envelope), via, envelope, status, seconds,
                                  _toast(parsed.get("toast")), _answer_card(parsed.get("card")), request=request)
        except ValueError as exc:
            why = str(exc)
    return _failed(envelope, via, status, seconds, why, request)


def _clicked_message(envelope: Json) -> str | None:
    return ((envelope.get("event") or {}).get("context") or {}).get("open_message_id")


def _answer_json(body: bytes) -> Json:
    try:
        parsed = json.loads(body) if body.strip() else {}
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise ValueError(f"the answer is not a JSON object: {body[:200]!r}")
    return parsed


def _toast(value: Any) -> Toast | None:
    if value is None:
        return None
    i18n = value.get("i18n") if isinstance(value, dict) else None
    content = value.get("content") if isinstance(value, dict) else None
    if isinstance(i18n, dict) and content is None:
        content = next(iter(i18n.values()), None)
    if not isinstance(value, dict) or value.get("type") not in TOAST_TYPES or not isinstance(content, str):
        raise ValueError(f"bad toast {value!r}: its type is one of {sorted(TOAST_TYPES)}, its content a string")
    return Toast(value["type"], content)


def _answer_card(value: Any) -> Json | None:
    """The card of an answer: `{"type": "raw", "data": <card JSON object>}` (templates are not faked)."""
    if value is None:
        return None
    if isinstance(value, dict) and value.get("type") == "template":
        raise NotImplementedError("fake feishu renders no card templates")
    if not isinstance(value, dict) or value.get("type") != "raw" or not isinstance(value.get("data"), dict):
        raise ValueError(f"bad card in the answer: {str(value)[:200]}; expected {{'type': 'raw', 'data': {{...}}}}")
    if len(json.dumps(value["data"], ensure_ascii=False).encode()) > CARD_LIMIT:
        raise ValueError("the card in the answer is over 30 KB")
    return value["data"]


# ----- running the SDK's long-connection client --------------------------------------------------------


class WsClientThread:
    """Runs one lark.ws.Client in a daemon thread on its own event loop, the way the SDK allows (see the
    module docstring), and can stop it, which the SDK itself cannot."""

    def __init__(self, make_client: Callable[[], lark.ws.Client]) -> None:
        self._make_client = make_client
        self._loop = asyncio.new_event_loop()
        self._built = threading.Event()
        self._stopping = False
        self.client: lark.ws.Client | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lark-ws-client", daemon=True)

    def start(self) -> WsClientThread:
        self._thread.start()
        self._built.wait(10)
        if self.client is None:
            raise RuntimeError("could not build the lark ws client") from self.error
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        lark_ws_client.loop = self._loop
        try:
            self.client = self._make_client()
            self._built.set()
            self.client.start()
        except Exception as exc:  # start() only ends by raising: a fatal error, or our loop.stop()
            if not self._stopping:
                self.error = exc
        finally:
            self._built.set()
            self._shut_down()

    def _shut_down(self) -> None:
        """Cancel the client's tasks (so it cannot reconnect), close its WebSocket, close the loop."""
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        if self.client is not None:
            self._loop.run_until_complete(asyncio.wait_for(self.client._disconnect(), 3))
        self._loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop until the thread exits (a stop can land between two run_until_complete calls)."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            if not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(0.1)
        if self._thread.is_alive():
            raise TimeoutError("lark ws client thread did not stop")


# ----- pure helpers ------------------------------------------------------------------------------------


def _ok(data: Json) -> _Reply:
    return _Reply(200, {"code": 0, "msg": "success", "data": data})


def _error(status: int, code: int, msg: str) -> _Reply:
    return _Reply(status, {"code": code, "msg": msg})


async def _close_all(sockets: list[ServerConnection]) -> None:
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


async def _send_all(ws: ServerConnection, frames: list[Frame]) -> None:
    for frame in frames:
        await ws.send(frame.SerializeToString())


def _frame(method: int, service: int, headers: dict[str, str], payload: bytes) -> Frame:
    frame = Frame(SeqID=0, LogID=0, service=service, method=method, payload=payload)
    for key, value in headers.items():
        header = frame.headers.add()
        header.key, header.value = key, value
    return frame


def _data_frames(payload: bytes, message_id: str, parts: int, service: int,
                 frame_type: Literal["event", "card"]) -> list[Frame]:
    """Data frames for one payload; the parts are never empty (the SDK would wait for them forever)."""
    bounds = [len(payload) * i // parts for i in range(parts + 1)]
    trace_id = uuid.uuid4().hex
    return [_frame(1, service, {"type": frame_type, "message_id": message_id, "trace_id": trace_id,
                                "sum": str(parts), "seq": str(i)}, payload[bounds[i]:bounds[i + 1]])
            for i in range(parts)]


def _is_message_call(path: str) -> bool:
    return path.startswith("/open-apis/im/v1/messages") and "/reactions" not in path


def _card_of(path: str) -> str | None:
    prefix = "/open-apis/cardkit/v1/cards/"
    return path[len(prefix):].split("/", 1)[0] or None if path.startswith(prefix) else None


def _densest(times: list[float], window: float) -> int:
    """The most sorted timestamps that fit in any half-open interval of length `window`."""
    best, start = 0, 0
    for end, moment in enumerate(times):
        while moment - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def _parse_content(msg_type: Any, content: Any) -> tuple[Json, _Reply | None]:
    """A message's content (a JSON string) checked the way Feishu does: type, JSON, size."""
    if msg_type not in _MSG_TYPES or not isinstance(content, str):
        return {}, _error(400, 230001, f"invalid msg_type {msg_type!r} or content not a string")
    try:
        parsed = json.loads(content)
    except ValueError:
        return {}, _error(400, 230001, "content is not valid JSON")
    if not isinstance(parsed, dict) or (msg_type == "text" and not isinstance(parsed.get("text"), str)) or (
            msg_type in _FILE_MESSAGES and not isinstance(_resource_key(msg_type, parsed), str)):
        return {}, _error(400, 230001, f"content does not fit msg_type {msg_type}")
    if len(content.encode()) > (TEXT_LIMIT if msg_type == "text" else CARD_LIMIT):
        return {}, _error(400, 230025, "The length of the message content reaches its limit.")
    return parsed, None


def _resource_key(msg_type: str, content: Json) -> Any:
    """The key an image/file/audio/media message's content names (None for other types)."""
    return content.get("image_key" if msg_type == "image" else "file_key") if msg_type in _FILE_MESSAGES else None


def _new_key(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4()}"


def _request_body(content_type: str, raw: bytes) -> tuple[Any, Any]:
    """The body a handler gets, and what `calls` records: JSON parsed; multipart/form-data as a dict of its fields
    (the image/file part as bytes, recorded by its size only); anything else as text."""
    if content_type.startswith("multipart/form-data"):
        try:  # requests_toolbelt 1.0 raises AttributeError for a Content-Type without a boundary
            fields = _form_fields(raw, content_type)
        except (ValueError, AttributeError, ImproperBodyPartContentException, NonMultipartContentTypeException) as exc:
            return f"bad multipart body: {exc}", f"bad multipart body: {exc}"
        return fields, {k: f"<{len(v)} bytes>" if isinstance(v, bytes) else v for k, v in fields.items()}
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = raw.decode(errors="replace")
    return body, body


def _form_fields(raw: bytes, content_type: str) -> Json:
    """multipart/form-data fields by name: `image` and `file` as bytes, the others as text."""
    fields: Json = {}
    for part in MultipartDecoder(raw, content_type).parts:
        disposition = email.message.Message()
        disposition["content-disposition"] = part.headers.get(b"content-disposition", b"").decode()
        name = str(disposition.get_param("name", "", header="content-disposition"))
        fields[name] = part.content if name in ("image", "file") else part.content.decode()
    return fields


def _size_error(data: bytes, limit: int) -> _Reply | None:
    if not data:
        return _error(400, 234010, "File's size can't be 0.")
    if len(data) > limit:
        return _error(400, 234006, "The file size exceed the max value.")
    return None


_IMAGE_MAGIC = [(b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
                (b"GIF89a", "image/gif"), (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"),
                (b"\x00\x00\x01\x00", "image/x-icon")]
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1"}


def _image_mime(data: bytes) -> str | None:
    """The type of an image Feishu takes, by its magic bytes (WEBP: RIFF....WEBP; HEIC: an ftyp box's brand)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "image/heic"
    return next((mime for magic, mime in _IMAGE_MAGIC if data.startswith(magic)), None)


def _resource_headers(key: str, resource: _Resource) -> dict[str, str]:
    """Content-Type, -Length and -Disposition of a resource. Feishu puts the file name into Content-Disposition as
    raw UTF-8 bytes (clients read headers as Latin-1; lark-oapi's Files.parse_file_name re-decodes them); the fake
    replaces control characters, quotes and backslashes, which would break the header."""
    mime = (_image_mime(resource.data) if resource.kind == "image" else None) \
        or mimetypes.guess_type(resource.name or "")[0] or "application/octet-stream"
    name = resource.name or key + (mimetypes.guess_extension(mime) or "")
    shown = re.sub(r'[\x00-\x1f\x7f"\\]', "_", name).encode().decode("latin-1")
    return {"Content-Type": mime, "Content-Length": str(len(resource.data)),
            "Content-Disposition": f'attachment; filename="{shown}"'}


def _parse_card(body: Json) -> tuple[Json | None, _Reply | None]:
    """A CardKit `{"type": "card_json", "data": "<card JSON>"}` body."""
    data = body.get("data")
    if body.get("type") != "card_json" or not isinstance(data, str):
        return None, _error(400, 10002, "type must be card_json and data a card JSON string")
    if len(data.encode()) > CARD_LIMIT:
        return None, _error(400, 200860, "Card content exceeds limit.")
    try:
        card = json.loads(data)
    except ValueError:
        return None, _error(400, 200220, "Failed to generate card content")
    return (card, None) if isinstance(card, dict) else (None, _error(400, 200220, "Failed to generate card content"))


def _card_ref(content: Json) -> str | None:
    """The card_id of a `{"type": "card", "data": {"card_id": ...}}` message content, else None."""
    if content.get("type") == "card" and isinstance(content.get("data"), dict):
        return content["data"].get("card_id")
    return None


def card_texts(card: Json) -> list[tuple[str | None, str]]:
    """(element_id, text) of every text in a card's body (2.0) or elements (1.0), in display order."""
    found: list[tuple[str | None, str]] = []
    _collect_texts(card.get("body", card).get("elements", []), None, found)
    return found


def _collect_texts(node: Any, element_id: str | None, found: list[tuple[str | None, str]]) -> None:
    if isinstance(node, list):
        for item in node:
            _collect_texts(item, element_id, found)
    elif isinstance(node, dict):
        element_id = node.get("element_id", element_id)
        if node.get("tag") in _TEXT_TAGS and isinstance(node.get("content"), str):
            found.append((element_id, node["content"]))
            return
        for value in node.values():
            _collect_texts(value, element_id, found)


def card_buttons(card: Json) -> list[Button]:
    """The buttons of a card in display order, with the form each is in: in JSON 2.0 `body.elements` (or 1.0
    `elements`), also inside forms, columns and panels."""
    return [_button(node, form) for node, form in _components(_card_elements(card), "button")]


def _card_elements(card: Json) -> Any:
    return card.get("body", card).get("elements", [])


def _components(node: Any, tag: str, form: str | None = None) -> Iterator[tuple[Json, str | None]]:
    """Every component with `tag` under `node` in display order, with the name of the form it is in. It does not
    look inside a button: its callback value is the app's data, not part of the card."""
    if isinstance(node, list):
        for item in node:
            yield from _components(item, tag, form)
    elif isinstance(node, dict):
        if node.get("tag") == tag:
            yield node, form
        elif node.get("tag") != "button":
            form = str(node.get("name", "")) if node.get("tag") == "form" else form
            for value in node.values():
                yield from _components(value, tag, form)


def _button(node: Json, form: str | None) -> Button:
    callbacks = [b.get("value") for b in node.get("behaviors") or [] if isinstance(b, dict)
                 and b.get("type") == "callback"]
    text = node.get("text")
    return Button(str(text.get("content", "")) if isinstance(text, dict) else "", str(node.get("name", "")),
                  callbacks[0] if callbacks else node.get("value"), form,
                  node.get("form_action_type") if form is not None else None, bool(node.get("disabled")))


def _pressed(buttons: list[Button], wanted: Button | str) -> Button:
    """The button a click lands on: `wanted` if the card shows it now, or the one it shows with that text."""
    matches = [b for b in buttons if (b.text == wanted if isinstance(wanted, str) else b == wanted)]
    if len(matches) != 1:
        raise ValueError(f"no single button {wanted!r} on the card; it shows {[b.text for b in buttons]}")
    if not matches[0].calls_back:
        raise ValueError(f"a click on {matches[0].text!r} does not reach the app (disabled, reset, or no callback)")
    return matches[0]


def _form_value(card: Json, form: str, typed: dict[str, str]) -> dict[str, str]:
    """What the client submits for a form: every input by name, as typed or as left (its default_value, or "").
    Like the client, it refuses a required input left empty and text longer than an input takes."""
    inputs = {str(node.get("name", "")): node for node, where in _components(_card_elements(card), "input")
              if where == form}
    if unknown := sorted(set(typed) - set(inputs)):
        raise ValueError(f"form {form!r} has no input {unknown}; it has {sorted(inputs)}")
    values = {name: str(typed.get(name, node.get("default_value", ""))) for name, node in inputs.items()}
    for name, node in inputs.items():
        if node.get("required") and not values[name]:
            raise ValueError(f"the client does not submit form {form!r} while its required input {name!r} is empty")
        if len(values[name]) > int(node.get("max_length", INPUT_MAX_LENGTH)):
            raise ValueError(f"input {name!r} takes at most {node.get('max_length', INPUT_MAX_LENGTH)} characters")
    return values


def _set_element_text(node: Any, element_id: str, text: str) -> bool:
    """Set the text of the element with `element_id` (markdown/plain_text, or a div's text)."""
    if isinstance(node, list):
        return any(_set_element_text(item, element_id, text) for item in node)
    if not isinstance(node, dict):
        return False
    if node.get("element_id") == element_id:
        target = node if node.get("tag") in _TEXT_TAGS else node.get("text")
        if isinstance(target, dict):
            target["content"] = text
            return True
        return False
    return any(_set_element_text(value, element_id, text) for value in node.values())


def message_text(msg_type: str, content: Json) -> str:
    """What a chat member reads in a message: the text, a post's title and lines, or a card's texts."""
    if msg_type == "text":
        return str(content.get("text", ""))
    if msg_type == "post":
        return _post_text(content)
    if msg_type == "interactive":
        return "\n".join(text for _, text in card_texts(content))
    return json.dumps(content, ensure_ascii=False)


def _post_text(content: Json) -> str:
    """Posts are sent as {"zh_cn": {...}} and received as {"title", "content"}; accept both."""
    post = content if "content" in content else next((v for v in content.values() if isinstance(v, dict)), {})
    lines = ["".join(_post_element_text(element) for element in paragraph) for paragraph in post.get("content", [])]
    return "\n".join(([post["title"]] if post.get("title") else []) + lines)


def _post_element_text(element: Json) -> str:
    if element.get("tag") == "at":
        return f"@{element.get('user_name') or element.get('user_id', '')}"
    return str(element.get("text", ""))

