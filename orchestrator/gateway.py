"""The model gateway: the only process that holds the model's key. `python -m orchestrator.gateway SETTINGS_JSON`.

It runs in its own container (`<instance>-gateway`, the orchestrator's image, host network, root without any
capability, read-only), so a turn's model requests go on while the orchestrator restarts. It serves one unix
socket per chat, `<data_dir>/run/<chat_id>/model.sock`, in root's folder that the chat's container mounts
read-only (agent-init serves it there on 127.0.0.1:MODEL_RELAY_PORT). The socket a request comes in on names
the chat; the request must carry that chat's token (`credentials.model_token`: x-api-key, or Authorization:
Bearer), go to the Messages API (POST /v1/messages or /v1/messages/count_tokens), and fit the chat's share:
gateway.max_concurrent requests and MAX_CHAT_CONNECTIONS connections at once, bodies of gateway.max_request_bytes
together (by their Content-Length), each arriving within BODY_SECONDS. A body's memory grows as its bytes come
(all chats' together at most BODY_MEMORY) and is given back as soon as it is sent upstream. A Messages body is
read as JSON (one at a time, within PARSE_MEMORY): it must give max_tokens, and must not have Anthropic's servers
fetch anything, which would go past the chat's egress allowlist (mcp_servers, web_fetch and code_execution tools
are refused; web_search is let through, and priced).

Billing: in one call on the store's one thread, the budgets are checked and the request's reservation written
(its input estimated from the body, its max_tokens of output, at its model's price), so requests in flight count
in the sums the next check sees. Then it goes upstream with the real key (redirects are not followed: the key
would go along), and the response comes back unchanged, chunk by chunk, while its usage is read from it:
message_start replaces the input estimate with the real counts, message_delta (or a whole message's usage)
settles the output, and the row is complete before the chunk with message_stop reaches the CLI, so a turn's
result never arrives before its cost is stored. A request that does not finish (the client left, a timeout, the
upstream broke off) keeps its real input and the output that was streamed (`StreamUsage.cut`), or all its
reservation if it was not a stream; one the API never got or refused costs nothing; a gateway killed mid-stream
leaves the reservation's output counted. A request past a budget is refused with the Messages API's
billing_error (402) and `x-should-retry: false`: the CLI (2.1.332, measured) does not retry it and ends the turn
with "API Error: 402 <our text>", which says what was spent and when the budget resets (a 403 permission_error
reads "Failed to authenticate. API Error: 403 …"). Refusals are logged at most once per chat every
REFUSAL_LOG_SECONDS, with how many there were.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from loguru import logger
from yarl import URL

from orchestrator import credentials, egress, ids, layout, spending
from orchestrator.config import BUDGET_LIMITS, BudgetSettings, GatewaySettings, Price, Settings, url_secrets
from orchestrator.logs import setup_logging
from orchestrator.model_socket import SOCKET
from orchestrator.store import Store, refused_for_now

T = TypeVar("T")

POLL_SECONDS = 0.2  # how often new chat folders are looked for (a chat's container waits for its socket)
BODY_SECONDS = 60.0  # a request body must have arrived by then (408)
MAX_CHAT_CONNECTIONS = 64  # open connections per chat; more are closed at once (the CLI keeps a few)
# runtime: swarm: egress connections relayed at once, of one chat and of all chats together. Each holds up to
# RELAY_BUFFER of the container's memory in each direction (its read, its write buffer), so all of them together
# take at most 512 * 4 * 16 KiB = 32 MiB, beside the model's bodies, and 1,024 of its 8,192 descriptors (measured
# before these bounds: about 1 MB each with asyncio's default buffers, 256 stalled connections of one chat 290 MB).
MAX_RELAYED_PER_CHAT = 32
MAX_RELAYED = 512
RELAY_BUFFER = 16 * 1024
RELAY_LINGER_SECONDS = 10.0  # after one side ended, how long the other may send nothing before both are closed
IDLE_SECONDS = 75.0  # a kept-alive connection without a request this long is closed
BODY_MEMORY = 128 * 1024**2  # request bodies' bytes held at once, all chats together (the container has 384 MiB)
PARSE_MEMORY = 128 * 1024**2  # what reading one body's JSON may take (bodies are read one at a time)
READ_PIECE = 256 * 1024  # a body is read and sent upstream in pieces of this size
MAX_JSON_RESPONSE = 8 * 1024**2  # a non-streaming answer is read whole to find its usage (a long one is ~1 MB)
REFUSAL_LOG_SECONDS = 10.0  # a chat's refused requests are logged once in this time at most (it may send no end)
MESSAGES = "/v1/messages"
PATHS = (MESSAGES, "/v1/messages/count_tokens")
ADMIT_WAIT_SECONDS = 60.0  # a request waits this long for a store that refuses for now, then gets 529
WRITE_RETRY_SECONDS = 1.0  # a usage write the store refused (locked, disk full) is tried again this often
IN_FLIGHT_RETRY = 2  # seconds a request waits (429) when only other requests' reservations reach a budget
# Tool types Anthropic's servers run that reach any address, and fields that make them connect to one: past the
# egress allowlist. web_search (Claude Code's WebSearch) only searches: it is let through, and priced.
SERVER_TOOLS = ("web_fetch", "code_execution")
SERVER_FIELDS = ("mcp_servers",)
_PAST_BMP = tuple(bytes([lead]) for lead in range(0xF0, 0xF5))  # how UTF-8 starts a character past U+FFFF
_ESCAPED_PAST_BMP = re.compile(rb"\\u[dD][89abAB]")  # and how JSON escapes one (a high surrogate first)
FORWARDED_HEADERS = ("anthropic-version", "anthropic-beta", "content-type", "accept", "user-agent")
RETURNED_HEADERS = ("content-type", "request-id", "retry-after", "x-should-retry")


@dataclass(frozen=True)
class GatewayConfig:
    """What the gateway reads at start: the gateway and budget sections of the config, and where things are."""

    gateway: GatewaySettings
    budgets: BudgetSettings
    store_url: str  # the orchestrator's store (config: store.url): SQLite in data_dir, or PostgreSQL
    run_dir: Path  # the chats' run folders (made by the orchestrator): which chats to serve
    secret_path: Path
    socket_dir: Path | None = None  # where each chat's socket is bound, a folder per chat; None: in run_dir's
    egress_port: int | None = None  # runtime: swarm: the node's egress proxy, to relay the chats' egress sockets to
    log_json: bool = False
    log_level: str = "INFO"


# ---- the settings file (written by the orchestrator, read by the gateway) ----

def settings_json(settings: Settings) -> str:
    """The gateway's settings as JSON (amounts as strings: exact). Pure."""
    return json.dumps({
        "gateway": dataclasses.asdict(settings.gateway),
        "budgets": dataclasses.asdict(settings.budgets),
        "store_url": settings.store.url, "run_dir": str(layout.run_dir(settings)),
        "socket_dir": str(layout.model_socket_dir(settings)), "egress_port": egress.node_port(settings),
        "secret_path": str(layout.secret_path(settings)),
        "log_json": settings.logging.json, "log_level": settings.logging.level,
    }, default=str, sort_keys=True, indent=1)


def settings_digest(settings: Settings) -> str:
    """Changes when the gateway's settings do (its container is then made anew)."""
    return hashlib.sha256(settings_json(settings).encode()).hexdigest()[:16]


def write_settings(settings: Settings) -> Path:
    """<data_dir>/gateway.json, root's and 0600 (it holds the key), replaced whole."""
    path = layout.gateway_settings_path(settings)
    partial = path.with_name(f".{path.name}.partial")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(partial)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(settings_json(settings))
    os.replace(partial, path)
    return path


def read_settings(path: Path) -> GatewayConfig:
    raw = json.loads(path.read_text())
    budgets = raw["budgets"]
    money = {name: Decimal(budgets[name]) for name in BUDGET_LIMITS if budgets.get(name) is not None}
    prices = {model: Price(**{name: Decimal(value) for name, value in price.items()})
              for model, price in budgets["prices"].items()}
    return GatewayConfig(
        gateway=GatewaySettings(**raw["gateway"]),
        budgets=BudgetSettings(**money, timezone=budgets["timezone"], reset_at=budgets["reset_at"],
                               footer=budgets["footer"], prices=prices),
        store_url=raw["store_url"], run_dir=Path(raw["run_dir"]), secret_path=Path(raw["secret_path"]),
        socket_dir=Path(raw["socket_dir"]) if raw.get("socket_dir") else None, egress_port=raw.get("egress_port"),
        log_json=raw["log_json"], log_level=raw["log_level"])


# ---- serving ----

class Refused(Exception):
    """A request the gateway answers itself, with the Messages API's error shape."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}

    def response(self) -> web.Response:
        return web.json_response({"type": "error", "error": {"type": self.kind, "message": self.message}},
                                 status=self.status, headers=self.headers)


class _Server(web.Server):
    """aiohttp's low-level server, with at most MAX_CHAT_CONNECTIONS open connections per chat socket: a chat's
    agent can open as many as it likes, and would otherwise use up the gateway's files for every chat."""

    def connection_made(self, handler: Any, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        socket = transport.get_extra_info("sockname")
        same = [h for h in self.connections if h.transport and h.transport.get_extra_info("sockname") == socket]
        if len(same) > MAX_CHAT_CONNECTIONS:
            transport.close()


@dataclass
class _Held:
    """A request body from its first byte until it is sent upstream: its Content-Length counts in the chat's share,
    its bytes that came in the gateway's BODY_MEMORY."""

    chat_id: str
    length: int
    data: bytearray = field(default_factory=bytearray)
    released: bool = False


@dataclass
class _Bill:
    """One model request's usage row: its reservation before it goes upstream, then what it cost."""

    chat_id: str
    user_id: str  # the sender of the chat's running message, who pays; "" when none runs
    message_id: str | None
    ask: spending.Request | None  # None: a request that costs nothing (count_tokens)
    row: int | None = None
    streaming: bool = False  # the answer is (or, until it comes, was asked to be) an event stream
    sent: bool = False  # all the body went upstream
    status: int | None = None  # the upstream's answer's
    done: bool = False  # what it cost is stored
    stream: spending.StreamUsage = field(default_factory=spending.StreamUsage)

    @property
    def log(self) -> Any:
        return logger.bind(chat_id=self.chat_id, message_id=self.message_id or "-")


class Gateway:
    def __init__(self, config: GatewayConfig, store: Store, secret: bytes) -> None:
        self.config, self.store, self.secret = config, store, secret
        self.upstream = config.gateway.upstream_url.rstrip("/")
        self._credentials = {name: value for name, value in (
            ("x-api-key", config.gateway.api_key),
            ("authorization", f"Bearer {config.gateway.auth_token}" if config.gateway.auth_token else "")) if value}
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-store")  # one writer, in order
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-json")  # one body at a time
        self._sites: dict[str, web.SockSite] = {}  # chat id → its socket's site
        self._relays: dict[str, asyncio.Server] = {}  # chat id → its egress socket's server (runtime: swarm)
        self._relayed: dict[str, int] = {}  # chat id → its egress connections open
        self._folders: dict[str, int] = {}  # chat id → its folder's descriptor, which names its socket
        self._chats: dict[str, str] = {}  # socket path → chat id
        self._tokens: dict[str, str] = {}
        self._busy: dict[str, int] = {}  # requests in progress per chat
        self._chat_bodies: dict[str, int] = {}  # per chat, the Content-Length of its bodies not sent upstream yet
        self._body_bytes = 0  # the bytes of all bodies held
        self._refusals: dict[str, tuple[float, int]] = {}  # per chat: when its last refusal was logged, how many since
        # Rows whose cost is still a reservation (the request is in flight): row → (chat id, user id, nano-USD).
        # Read and changed on the store thread only.
        self._reserved: dict[int, tuple[str, str, int]] = {}
        self._unwritten: dict[int, Callable[[], None]] = {}  # row → its latest usage write the store refused
        self._writer: asyncio.Task[None] | None = None
        self._unservable: set[tuple[str, str]] = set()  # (chat, socket kind) that could not be made (logged once)
        self._runner: web.ServerRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._poller: asyncio.Task[None] | None = None
        self._socket_dir = config.socket_dir or config.run_dir
        self._own_folders = self._socket_dir != config.run_dir  # made and removed here, not by the orchestrator

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=True, timeout=aiohttp.ClientTimeout(
            total=self.config.gateway.request_timeout, sock_connect=30))
        self._runner = web.ServerRunner(_Server(self.handle, handler_cancellation=True,
                                                keepalive_timeout=IDLE_SECONDS), handle_signals=False)
        await self._runner.setup()
        await self.scan()
        self._poller = asyncio.create_task(self._poll())
        logger.info(f"model gateway serving {len(self._sites)} chats' sockets in {self._socket_dir}, "
                    f"upstream {self.upstream}")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        for relay in self._relays.values():
            relay.close()
        for fd in self._folders.values():
            os.close(fd)
        self._folders.clear()
        if self._session is not None:
            await self._session.close()
        self._db.shutdown(wait=True)
        self._reader.shutdown(wait=True)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                await self.scan()
            except Exception as exc:  # a bad moment of the file system must not end the serving of every chat
                logger.exception(f"looking for chat folders failed: {exc!r}")

    async def scan(self) -> None:
        """Serve every chat folder of the run folder (real folders only, never a link), and stop serving those
        that are gone."""
        try:
            with os.scandir(self.config.run_dir) as entries:
                folders = {entry.name for entry in entries
                           if ids.is_valid_chat_id(entry.name) and entry.is_dir(follow_symlinks=False)}
        except FileNotFoundError:  # not made yet (the orchestrator makes it at its start)
            folders = set()
        for chat_id in self._sites.keys() - folders:
            await self._sites.pop(chat_id).stop()
            relay = self._relays.pop(chat_id, None)
            if relay is not None:
                relay.close()  # its open connections end with their clients
            os.close(self._folders.pop(chat_id))
            if self._own_folders:  # the sockets, then the folder this gateway made
                for name in (SOCKET, egress.EGRESS_SOCKET):
                    with contextlib.suppress(OSError):
                        os.unlink(self._socket_dir / chat_id / name)
                with contextlib.suppress(OSError):
                    os.rmdir(self._socket_dir / chat_id)
            self._tokens.pop(chat_id)
            self._refusals.pop(chat_id, None)
            self._chats = {path: chat for path, chat in self._chats.items() if chat != chat_id}
        for chat_id in sorted(folders - self._sites.keys()):
            await self._serve(chat_id)
        if self.config.egress_port is not None:
            for chat_id in sorted(self._sites.keys() - self._relays.keys()):
                await self._serve_egress(chat_id)

    async def _serve(self, chat_id: str) -> None:
        folder = self._socket_dir / chat_id
        try:
            if self._own_folders:  # the node's own folder (runtime: swarm), where nothing of a chat's can write
                folder.mkdir(mode=0o755, parents=True, exist_ok=True)
            fd = os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)  # a link is refused (ENOTDIR)
        except OSError as exc:
            self._cannot_serve(chat_id, folder, exc)
            return
        # A unix socket's name is at most 107 bytes, which a deep data_dir passes: named through the folder's
        # descriptor, it is short whatever data_dir is (and it is the name its connections report).
        path = f"/proc/self/fd/{fd}/{SOCKET}"
        try:
            assert self._runner is not None
            site = web.SockSite(self._runner, _listening_socket(path))
            await site.start()
        except OSError as exc:
            os.close(fd)
            self._cannot_serve(chat_id, folder, exc)
            return
        self._unservable.discard((chat_id, "model"))
        self._sites[chat_id] = site
        self._folders[chat_id] = fd
        self._chats[path] = chat_id
        self._tokens[chat_id] = credentials.model_token(self.secret, chat_id)

    async def _serve_egress(self, chat_id: str) -> None:
        """runtime: swarm: the chat's egress socket beside its model socket, relayed to the node's proxy (tried again
        at the next scan when it cannot be made)."""
        path = f"/proc/self/fd/{self._folders[chat_id]}/{egress.EGRESS_SOCKET}"
        try:
            self._relays[chat_id] = await asyncio.start_unix_server(
                lambda reader, writer: self._relay(chat_id, reader, writer), sock=_listening_socket(path),
                limit=RELAY_BUFFER)
        except OSError as exc:
            self._cannot_serve(chat_id, self._socket_dir / chat_id, exc, "egress")
            return
        self._unservable.discard((chat_id, "egress"))

    async def _relay(self, chat_id: str, client_reader: asyncio.StreamReader,
                     client: asyncio.StreamWriter) -> None:
        """One connection of a chat's egress socket piped to the node's proxy (which asks for the chat's proxy
        credentials), while the chat's egress is an allowlist (its run folder's marker: the socket is there for
        every chat) and it has fewer than MAX_RELAYED_PER_CHAT open (all chats fewer than MAX_RELAYED); otherwise
        closed at once. Once either side has ended, the other is closed when it has moved nothing for
        RELAY_LINGER_SECONDS (a client that never ends its side holds no slot for good: the proxy closes idle
        connections)."""
        marker = self.config.run_dir / chat_id / egress.PROXIED_MARKER
        if self._relayed.get(chat_id, 0) >= MAX_RELAYED_PER_CHAT or sum(self._relayed.values()) >= MAX_RELAYED \
                or not marker.exists():
            client.close()
            return
        self._relayed[chat_id] = self._relayed.get(chat_id, 0) + 1
        try:
            assert self.config.egress_port is not None
            proxy_reader, proxy = await asyncio.open_connection("127.0.0.1", self.config.egress_port,
                                                                limit=RELAY_BUFFER)
        except OSError as exc:
            logger.bind(chat_id=chat_id).warning(f"the node's egress proxy cannot be reached: {exc}")
            self._relay_ended(chat_id)
            client.close()
            return
        for writer in (client, proxy):
            writer.transport.set_write_buffer_limits(high=RELAY_BUFFER)
        moved = [0]  # bytes relayed either way
        pipes = {asyncio.create_task(_pipe(client_reader, proxy, moved)),
                 asyncio.create_task(_pipe(proxy_reader, client, moved))}
        try:
            _, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            while pending:  # one side ended: the other goes on while it moves bytes
                before = moved[0]
                _, pending = await asyncio.wait(pending, timeout=RELAY_LINGER_SECONDS)
                if moved[0] == before:
                    break
        finally:
            for pipe in pipes:
                pipe.cancel()
            self._relay_ended(chat_id)
            client.close()
            proxy.close()

    def _relay_ended(self, chat_id: str) -> None:
        left = self._relayed.pop(chat_id) - 1
        if left:
            self._relayed[chat_id] = left

    def _cannot_serve(self, chat_id: str, folder: Path, error: OSError, socket_kind: str = "model") -> None:
        if (chat_id, socket_kind) not in self._unservable:
            logger.bind(chat_id=chat_id).warning(f"cannot serve the chat's {socket_kind} socket in {folder}: {error}")
        self._unservable.add((chat_id, socket_kind))

    # ---- one request ----

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        chat_id = self._chats.get(str(request.transport.get_extra_info("sockname")) if request.transport else "")
        try:
            self._authorize(request, chat_id)
            assert chat_id is not None
            if request.method != "POST" or request.path not in PATHS:
                raise Refused(404, "not_found_error", f"this gateway serves only POST {' and '.join(PATHS)}")
            async with self._share(chat_id), self._holding(chat_id, self._length(request)) as held:
                await self._read_body(request, held)
                ask = await self._ask(request.path, held.data)
                bill = await self._admitted(chat_id, ask)
                try:
                    upstream = await self._send(request, held, bill)
                    async with upstream:
                        return await self._answer(request, upstream, bill)
                finally:
                    await self._settle(bill)
        except Refused as refused:
            self._log_refusal(chat_id, refused)
            return refused.response()
        except Exception as exc:  # the store refused a write, or a bug: logged here, the connection closed
            logger.bind(chat_id=chat_id or "-").opt(exception=exc).error(
                f"model request failed: {exc.__class__.__name__}: {exc}")
            raise

    def _authorize(self, request: web.BaseRequest, chat_id: str | None) -> None:
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        expected = self._tokens.get(chat_id or "")
        if expected is None or not given.isascii() or not credentials.matches(expected, given):
            raise Refused(401, "authentication_error", "this is not the chat's token for the model gateway")

    def _length(self, request: web.BaseRequest) -> int:
        limit = self.config.gateway.max_request_bytes
        if request.content_length is None:
            raise Refused(411, "invalid_request_error", "the request must give its Content-Length")
        if request.content_length > limit:
            raise Refused(413, "request_too_large", f"the request body is over the gateway's {limit} bytes")
        return request.content_length

    def _log_refusal(self, chat_id: str | None, refused: Refused) -> None:
        """A warning, but at most one per chat every REFUSAL_LOG_SECONDS (with how many were left out), so no
        chat can flood the gateway's log."""
        key = chat_id or "-"
        now = time.monotonic()
        logged_at, unlogged = self._refusals.get(key, (-math.inf, 0))
        if now - logged_at < REFUSAL_LOG_SECONDS:
            self._refusals[key] = (logged_at, unlogged + 1)
            return
        self._refusals[key] = (now, 0)
        more = f" ({unlogged} more refused since the last of these lines)" if unlogged else ""
        logger.bind(chat_id=key).warning(f"model request refused ({refused.status}): {refused.message}{more}")

    @contextlib.asynccontextmanager
    async def _share(self, chat_id: str) -> AsyncIterator[None]:
        """One of the chat's max_concurrent requests, or 429 (the CLI retries it after a pause)."""
        if self._busy.get(chat_id, 0) >= self.config.gateway.max_concurrent:
            raise Refused(429, "rate_limit_error", f"this chat has {self.config.gateway.max_concurrent} model "
                          "requests in progress already")
        self._busy[chat_id] = self._busy.get(chat_id, 0) + 1
        try:
            yield
        finally:
            self._busy[chat_id] -= 1
            if not self._busy[chat_id]:
                del self._busy[chat_id]

    # ---- the body: held while it comes, until it is sent ----

    @contextlib.asynccontextmanager
    async def _holding(self, chat_id: str, length: int) -> AsyncIterator[_Held]:
        """Room for a body of this length in the chat's share (gateway.max_request_bytes for all its bodies not
        sent yet), or 429; its memory is given back once it is sent, or at the end of the request."""
        limit, share = self.config.gateway.max_request_bytes, self._chat_bodies.get(chat_id, 0)
        if share + length > limit:
            raise Refused(429, "rate_limit_error", f"this chat's request bodies not sent upstream yet would be over "
                          f"the gateway's {limit} bytes with this one")
        self._chat_bodies[chat_id] = share + length
        held = _Held(chat_id, length)
        try:
            yield held
        finally:
            self._release(held)

    def _take(self, held: _Held, chunk: bytes) -> None:
        """More of a body, if BODY_MEMORY has room for it; else 529 overloaded (the CLI retries after a pause)."""
        if self._body_bytes + len(chunk) > BODY_MEMORY:
            raise Refused(529, "overloaded_error", "the gateway holds too many request bodies at once")
        self._body_bytes += len(chunk)
        held.data += chunk

    def _release(self, held: _Held) -> None:
        if held.released:
            return
        held.released = True
        self._body_bytes -= len(held.data)
        held.data.clear()
        self._chat_bodies[held.chat_id] -= held.length
        if not self._chat_bodies[held.chat_id]:
            del self._chat_bodies[held.chat_id]

    async def _read_body(self, request: web.BaseRequest, held: _Held) -> None:
        try:
            async with asyncio.timeout(BODY_SECONDS):
                while len(held.data) < held.length:
                    chunk = await request.content.read(min(held.length - len(held.data), READ_PIECE))
                    if not chunk:
                        break
                    self._take(held, chunk)
        except TimeoutError:
            raise Refused(408, "timeout_error", f"the request body did not arrive within {BODY_SECONDS:g} s") from None
        if len(held.data) < held.length:
            raise Refused(400, "invalid_request_error", "the request body ended before its Content-Length")

    async def _ask(self, path: str, body: bytearray) -> spending.Request | None:
        """What a Messages request asks for (read in the reader's one thread: one body at a time), or None for
        count_tokens, which costs nothing."""
        if path != MESSAGES:
            return None
        ask = await asyncio.get_running_loop().run_in_executor(self._reader, _read, body)
        refused = [f"the field {name}" for name in SERVER_FIELDS if name in ask.fields] + [
            f"a {kind} tool" for kind in ask.tool_types if kind.startswith(SERVER_TOOLS)]
        if refused:
            raise Refused(400, "invalid_request_error", f"this gateway does not pass on {refused[0]}: Anthropic's "
                          "servers would reach the internet for it, past the chat's egress allowlist")
        return ask

    async def _send(self, request: web.BaseRequest, held: _Held, bill: _Bill) -> aiohttp.ClientResponse:
        assert self._session is not None
        headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
        headers.update(self._credentials, **{"accept-encoding": "identity",  # usage is read from the bytes
                                             "content-length": str(held.length)})
        url = URL(self.upstream + request.path).with_query(request.query)
        try:  # a redirect is not followed: aiohttp would send the key along to wherever it points
            return await self._session.post(url, data=self._upload(held, bill), headers=headers,
                                            allow_redirects=False)
        except TimeoutError:
            raise Refused(504, "timeout_error", "the model API did not answer in time") from None
        except aiohttp.ClientError as exc:
            bill.log.warning(f"the model API cannot be reached: {exc.__class__.__name__}: {exc}")
            raise Refused(502, "api_error", "the model API cannot be reached from the gateway") from None

    async def _upload(self, held: _Held, bill: _Bill) -> AsyncIterator[bytes]:
        """The body for the upstream, a piece at a time; its memory is given back once all of it is sent."""
        for start in range(0, held.length, READ_PIECE):
            yield bytes(held.data[start:start + READ_PIECE])
        bill.sent = True
        self._release(held)

    # ---- the answer, and what it cost ----

    async def _admitted(self, chat_id: str, ask: spending.Request | None) -> _Bill:
        """`_admit`, waiting up to ADMIT_WAIT_SECONDS while the store refuses for now (locked by another process,
        disk full): the request waits, as the CLI would between its few retries, rather than ending the turn."""
        deadline = asyncio.get_running_loop().time() + ADMIT_WAIT_SECONDS
        while True:
            try:
                return await self._in_store(self._admit, chat_id, ask)
            except Exception as exc:
                if not refused_for_now(exc):
                    raise
                if asyncio.get_running_loop().time() > deadline:
                    raise Refused(529, "overloaded_error", "the gateway's store is busy; try again in a moment",
                                  {"retry-after": "1"}) from None
            await asyncio.sleep(WRITE_RETRY_SECONDS)

    def _admit(self, chat_id: str, ask: spending.Request | None) -> _Bill:
        """Who pays (the sender of the chat's running message), whether the budgets allow the request, and its
        reservation: in the store's one thread, so no other request's check comes between."""
        running = self.store.running_message(chat_id)
        bill = _Bill(chat_id, running.sender_id if running else "", running.message_id if running else None, ask)
        now = datetime.now(UTC)
        refusal = spending.check(self.config.budgets, now, chat_id, bill.user_id, self.store.spent)
        if refusal is not None:
            if spending.check(self.config.budgets, now, chat_id, bill.user_id, self._settled) is None:
                # Only the reservations of requests still in flight reach the cap: they settle at far less, as a
                # rule, so this one waits (the CLI retries a 429) rather than ending the turn.
                raise Refused(429, "rate_limit_error", "other model requests of this chat are still running and "
                              "may reach its budget; try again in a moment", {"retry-after": str(IN_FLIGHT_RETRY)})
            raise Refused(402, "billing_error", refusal.text, {"x-should-retry": "false"})
        if ask is not None:
            reserved = ask.reservation()
            cost = reserved.cost(self.config.budgets.prices)
            bill.streaming = ask.stream
            bill.row = self.store.open_usage(chat_id, bill.user_id, bill.message_id, ask.model, **reserved.counts(),
                                             cost_nano=cost)
            self._reserved[bill.row] = (chat_id, bill.user_id, cost)
        return bill

    def _settled(self, since: float, until: float | None = None, chat_id: str | None = None,
                 user_id: str | None = None) -> int:
        """`Store.spent` without the reservations of requests in flight (they all started within any window)."""
        held = sum(cost for chat, user, cost in self._reserved.values()
                   if chat_id in (None, chat) and user_id in (None, user))
        return self.store.spent(since, until, chat_id, user_id) - held

    async def _answer(self, request: web.BaseRequest, upstream: aiohttp.ClientResponse,
                      bill: _Bill) -> web.StreamResponse:
        bill.status = upstream.status
        bill.streaming = upstream.content_type == "text/event-stream"
        headers = {name: upstream.headers[name] for name in RETURNED_HEADERS if name in upstream.headers}
        if not bill.streaming:
            body = await self._whole(upstream)
            usage = spending.usage_of_message(body) if upstream.status == 200 else None
            if usage is not None:
                await self._record(bill, usage, complete=True)
            return web.Response(status=upstream.status, headers=headers, body=body)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                if bill.ask and bill.stream.feed(chunk) is not None:
                    await self._record(bill, bill.stream.so_far(bill.ask.max_tokens), bill.stream.complete)
                await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The client must see a broken stream, not a finished one: its connection is closed, unfinished.
            bill.log.warning(f"the model API's stream broke off: {exc.__class__.__name__} {exc}")
            request.protocol.force_close()
        return response

    async def _whole(self, upstream: aiohttp.ClientResponse) -> bytes:
        body = bytearray()
        try:
            async for chunk in upstream.content.iter_any():
                body += chunk
                if len(body) > MAX_JSON_RESPONSE:
                    raise Refused(502, "api_error", "the model API's answer is too large for the gateway")
        except TimeoutError:
            raise Refused(504, "timeout_error", "the model API did not answer in time") from None
        except aiohttp.ClientError:
            raise Refused(502, "api_error", "the model API's answer broke off") from None
        return bytes(body)

    async def _record(self, bill: _Bill, usage: spending.Usage, complete: bool, final: bool = False) -> None:
        """The row's counts and cost so far; `complete`: the API said what it all cost; `final`: nothing more of
        the request will come (either way its cost is no longer a reservation)."""
        if bill.row is None:
            return
        row, cost = bill.row, usage.cost(self.config.budgets.prices)

        def update() -> None:
            self.store.update_usage(row, **usage.counts(), cost_nano=cost, complete=complete)
            if complete or final:
                self._reserved.pop(row, None)
            elif row in self._reserved:
                self._reserved[row] = (bill.chat_id, bill.user_id, cost)

        try:
            await self._in_store(update)
        except Exception as exc:
            if not refused_for_now(exc):
                raise
            # The answer goes on (a turn must not wait on a locked or full store, nor be broken and asked again,
            # paid twice); the row's latest counts are written as soon as the store takes them.
            bill.log.warning(f"the store refused a usage write for now ({exc}); it is tried again meanwhile")
            self._unwritten[row] = update
            if self._writer is None or self._writer.done():
                self._writer = asyncio.create_task(self._write_later())
        bill.done = complete
        if complete:
            bill.log.info(f"model request: {_counted(usage)}: {spending.usd(cost)}")

    async def _settle(self, bill: _Bill) -> None:
        """The row of a request that did not finish: dropped if the API never got it or refused it (that costs
        nothing); a stream's counts what was streamed; a whole message's keeps its reservation. Shielded: a
        request cancelled again while it settles is still billed."""
        if bill.row is None or bill.done or bill.ask is None:
            return
        row = bill.row
        if not bill.sent or bill.status not in (None, 200):
            await asyncio.shield(self._in_store(lambda: (self._reserved.pop(row, None), self.store.drop_usage(row))))
            return
        usage = bill.ask.reservation()
        if bill.streaming:
            usage = bill.stream.cut(usage, bill.ask.max_tokens)
            await asyncio.shield(self._record(bill, usage, complete=False, final=True))
        else:
            await asyncio.shield(self._in_store(self._reserved.pop, row, None))  # it keeps its reservation
        bill.log.info(f"model request did not finish, counted: {_counted(usage)}: "
                      f"{spending.usd(usage.cost(self.config.budgets.prices))}")

    async def _write_later(self) -> None:
        """The usage writes the store refused, each row's latest, tried again every second until it takes them."""
        while self._unwritten:
            await asyncio.sleep(WRITE_RETRY_SECONDS)
            for row, update in list(self._unwritten.items()):
                try:
                    await self._in_store(update)
                except Exception as exc:
                    if not refused_for_now(exc):
                        raise
                    break
                if self._unwritten.get(row) is update:
                    del self._unwritten[row]

    async def _in_store(self, fn: Callable[..., T], *args: Any) -> T:
        """Store calls run on the gateway's one store thread: a busy database never holds the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)


def _listening_socket(path: str) -> socket.socket:
    """A unix socket bound at `path` (in place of one a gateway before this one left: never followed, unlink removes
    a link) that the agent's uid may connect to (the folder, root's and 0755, keeps it from replacing it)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        os.chmod(path, 0o666)
    except OSError:
        listener.close()
        raise
    return listener


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, moved: list[int]) -> None:
    """Bytes from one side of a relayed connection to the other (counted in `moved`) until the source ends (passed
    on as the end of what the sink will get) or either side breaks (the sink closed, which ends the other direction
    too)."""
    try:
        while chunk := await source.read(RELAY_BUFFER):
            sink.write(chunk)
            moved[0] += len(chunk)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except OSError:
        sink.close()


def _counted(usage: spending.Usage) -> str:
    searches = f", {usage.web_searches} web searches" if usage.web_searches else ""
    return (f"{usage.model}, {usage.input_tokens} in, {usage.output_tokens} out, cache {usage.cache_write_tokens} "
            f"written ({usage.cache_write_1h_tokens} for an hour), {usage.cache_read_tokens} read{searches}")


def _read(body: bytearray) -> spending.Request:
    """The request a Messages body makes, if reading it fits in PARSE_MEMORY. In the reader's thread: a body of
    32 MiB takes a tenth of a second to measure, and as long to read."""
    if (needed := _reading_memory(body)) > PARSE_MEMORY:
        raise Refused(413, "request_too_large", f"the request body would take {needed // 1024**2} MiB to read, "
                      f"over the gateway's {PARSE_MEMORY // 1024**2} MiB")
    try:
        return spending.read_request(body)
    except ValueError as exc:
        raise Refused(400, "invalid_request_error", str(exc)) from None


def _reading_memory(body: bytearray) -> int:
    """The most json.loads takes for this body (measured with tracemalloc): the body decoded and its strings, at
    a byte a character for ASCII, 2 for the rest of the BMP, 4 once a character past it is there; up to 80
    bytes for each array, object, item or member, counted by their punctuation (some of it inside strings); and
    64 kB for the rest."""
    if body.isascii() and b"\\u" not in body:
        width = 1
    else:
        width = 4 if any(lead in body for lead in _PAST_BMP) or _ESCAPED_PAST_BMP.search(body) else 2
    return 2 * width * len(body) + 80 * sum(body.count(mark) for mark in (b"[", b"{", b",", b":")) + 64 * 1024


# ---- the process ----

async def serve(config: GatewayConfig) -> None:
    """Serve until SIGTERM or SIGINT."""
    store = Store(config.store_url)
    gateway = Gateway(config, store, credentials.read_secret(config.secret_path))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await gateway.start()
    try:
        await stop.wait()
    finally:
        await gateway.close()
        store.close()
    logger.info("model gateway stopped")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m orchestrator.gateway SETTINGS_JSON")
    config = read_settings(Path(args[0]))
    setup_logging(config.log_json, config.log_level, secrets=[
        *(s for s in (config.gateway.api_key, config.gateway.auth_token) if s), *url_secrets(config.store_url)])
    # aiohttp's own lines are a traceback for each malformed request, which anyone in a chat can send without end,
    # and for each request that failed, which `handle` has logged already.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
