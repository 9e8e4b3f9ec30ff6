"""The model gateway: the only process that holds the model's key. `python -m orchestrator.gateway SETTINGS_JSON`.

It runs in its own container (`<instance>-gateway`, the orchestrator's image, host network, root without any
capability, read-only), so a turn's model requests go on while the orchestrator restarts. It serves one unix
socket per chat, `<data_dir>/run/<chat_id>/model.sock`, in root's folder that the chat's container mounts
read-only (agent-init serves it there on 127.0.0.1:MODEL_RELAY_PORT). The socket a request comes in on names
the chat; the request must carry that chat's token (`credentials.model_token`: x-api-key, or Authorization:
Bearer), go to the Messages API (POST /v1/messages or /v1/messages/count_tokens), send a body of at most
gateway.max_request_bytes within BODY_SECONDS, and fit the chat's share (gateway.max_concurrent requests at once,
MAX_CHAT_CONNECTIONS connections) and the budgets. Then it goes upstream with the real key, and the response
comes back unchanged, chunk by chunk, while its usage is read from it and written to the store: the row at
message_start (what was streamed counts even if the gateway dies), its counts at message_delta, and its end
before the chunk with message_stop reaches the CLI, so a turn's result never arrives before its cost is stored.
A request past a budget is refused with the Messages API's billing_error (402) and `x-should-retry: false`: the CLI
(2.1.332, measured) does not retry it and ends the turn with "API Error: 402 <our text>", which says what was spent
and when the budget resets (a 403 permission_error reads "Failed to authenticate. API Error: 403 …").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from loguru import logger
from yarl import URL

from orchestrator import credentials, ids, layout, spending
from orchestrator.config import BUDGET_LIMITS, BudgetSettings, GatewaySettings, Price, Settings
from orchestrator.logs import setup_logging
from orchestrator.relay import SOCKET
from orchestrator.store import Store

T = TypeVar("T")

SETTINGS_FILE = "gateway.json"
POLL_SECONDS = 0.2  # how often new chat folders are looked for (a chat's container waits for its socket)
BODY_SECONDS = 60.0  # a request body must have arrived by then (408)
MAX_CHAT_CONNECTIONS = 64  # open connections per chat; more are closed at once (the CLI keeps a few)
IDLE_SECONDS = 75.0  # a kept-alive connection without a request this long is closed
BODY_MEMORY = 128 * 1024**2  # request bodies held at once, all chats together (the container has 256 MiB)
MAX_JSON_RESPONSE = 8 * 1024**2  # a non-streaming answer is read whole to find its usage (a long one is ~1 MB)
PATHS = ("/v1/messages", "/v1/messages/count_tokens")
FORWARDED_HEADERS = ("anthropic-version", "anthropic-beta", "content-type", "accept", "user-agent")
RETURNED_HEADERS = ("content-type", "request-id", "retry-after", "x-should-retry")


@dataclass(frozen=True)
class GatewayConfig:
    """What the gateway reads at start: the gateway and budget sections of the config, and where things are."""

    gateway: GatewaySettings
    budgets: BudgetSettings
    db_path: Path
    run_dir: Path
    secret_path: Path
    log_json: bool = False
    log_level: str = "INFO"


# ---- the settings file (written by the orchestrator, read by the gateway) ----

def settings_path(settings: Settings) -> Path:
    return settings.data_dir / SETTINGS_FILE


def settings_json(settings: Settings) -> str:
    """The gateway's settings as JSON (amounts as strings: exact). Pure."""
    return json.dumps({
        "gateway": dataclasses.asdict(settings.gateway),
        "budgets": dataclasses.asdict(settings.budgets),
        "db_path": str(settings.db_path), "run_dir": str(layout.run_dir(settings)),
        "secret_path": str(layout.secret_path(settings)),
        "log_json": settings.logging.json, "log_level": settings.logging.level,
    }, default=str, sort_keys=True, indent=1)


def settings_digest(settings: Settings) -> str:
    """Changes when the gateway's settings do (its container is then made anew)."""
    return hashlib.sha256(settings_json(settings).encode()).hexdigest()[:16]


def write_settings(settings: Settings) -> Path:
    """<data_dir>/gateway.json, root's and 0600 (it holds the key), replaced whole."""
    path = settings_path(settings)
    partial = path.with_name(f".{SETTINGS_FILE}.partial")
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
        db_path=Path(raw["db_path"]), run_dir=Path(raw["run_dir"]), secret_path=Path(raw["secret_path"]),
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


@dataclass(frozen=True)
class _Payer:
    user_id: str
    message_id: str | None


class Gateway:
    def __init__(self, config: GatewayConfig, store: Store, secret: bytes) -> None:
        self.config, self.store, self.secret = config, store, secret
        self.upstream = config.gateway.upstream_url.rstrip("/")
        self._credentials = {name: value for name, value in (
            ("x-api-key", config.gateway.api_key),
            ("authorization", f"Bearer {config.gateway.auth_token}" if config.gateway.auth_token else "")) if value}
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-store")  # one writer, in order
        self._sites: dict[str, web.UnixSite] = {}  # chat id → its socket's site
        self._chats: dict[str, str] = {}  # socket path → chat id
        self._tokens: dict[str, str] = {}
        self._busy: dict[str, int] = {}  # requests in progress per chat
        self._body_bytes = 0
        self._unservable: set[str] = set()  # folders whose socket could not be made (logged once)
        self._runner: web.ServerRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=True, timeout=aiohttp.ClientTimeout(
            total=self.config.gateway.request_timeout, sock_connect=30))
        self._runner = web.ServerRunner(_Server(self.handle, handler_cancellation=True,
                                                keepalive_timeout=IDLE_SECONDS), handle_signals=False)
        await self._runner.setup()
        await self.scan()
        self._poller = asyncio.create_task(self._poll())
        logger.info(f"model gateway serving {len(self._sites)} chats' sockets in {self.config.run_dir}, "
                    f"upstream {self.upstream}")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        self._db.shutdown(wait=True)

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
            self._tokens.pop(chat_id)
            self._chats = {path: chat for path, chat in self._chats.items() if chat != chat_id}
        for chat_id in sorted(folders - self._sites.keys()):
            await self._serve(chat_id)

    async def _serve(self, chat_id: str) -> None:
        path = self.config.run_dir / chat_id / SOCKET
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # one a gateway before this one left (never followed: unlink removes the link)
            assert self._runner is not None
            site = web.UnixSite(self._runner, str(path))
            await site.start()
            os.chmod(path, 0o666)  # the agent's uid connects; the folder (root's, 0755) keeps it from replacing it
        except OSError as exc:
            if chat_id not in self._unservable:
                logger.bind(chat_id=chat_id).warning(f"cannot serve the chat's model socket {path}: {exc}")
            self._unservable.add(chat_id)
            return
        self._unservable.discard(chat_id)
        self._sites[chat_id] = site
        self._chats[str(path)] = chat_id
        self._tokens[chat_id] = credentials.model_token(self.secret, chat_id)

    # ---- one request ----

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        chat_id = self._chats.get(str(request.transport.get_extra_info("sockname")) if request.transport else "")
        log = logger.bind(chat_id=chat_id or "-")
        try:
            self._authorize(request, chat_id)
            assert chat_id is not None
            if request.method != "POST" or request.path not in PATHS:
                raise Refused(404, "not_found_error", f"this gateway serves only POST {' and '.join(PATHS)}")
            length = self._length(request)
            async with self._share(chat_id):
                async with self._memory(length):  # the body is held until the upstream has it
                    payer = await self._in_store(self._payer, chat_id)
                    body = await self._read_body(request, length)
                    upstream = await self._send(request, body)
                async with upstream:
                    return await self._answer(request, upstream, chat_id, payer)
        except Refused as refused:
            log.warning(f"model request refused ({refused.status}): {refused.message}")
            return refused.response()
        except Exception as exc:  # the store refused a write, or a bug: logged here, the connection closed
            log.opt(exception=exc).error(f"model request failed: {exc.__class__.__name__}: {exc}")
            raise

    def _authorize(self, request: web.BaseRequest, chat_id: str | None) -> None:
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        expected = self._tokens.get(chat_id or "")
        if expected is None or not credentials.matches(expected, given):
            raise Refused(401, "authentication_error", "this is not the chat's token for the model gateway")

    def _length(self, request: web.BaseRequest) -> int:
        limit = self.config.gateway.max_request_bytes
        if request.content_length is None:
            raise Refused(411, "invalid_request_error", "the request must give its Content-Length")
        if request.content_length > limit:
            raise Refused(413, "request_too_large", f"the request body is over the gateway's {limit} bytes")
        return request.content_length

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

    @contextlib.asynccontextmanager
    async def _memory(self, length: int) -> AsyncIterator[None]:
        """Room for a body in BODY_MEMORY, or 529 overloaded (the CLI retries it after a pause)."""
        if self._body_bytes and self._body_bytes + length > BODY_MEMORY:
            raise Refused(529, "overloaded_error", "the gateway holds too many request bodies at once")
        self._body_bytes += length
        try:
            yield
        finally:
            self._body_bytes -= length

    async def _read_body(self, request: web.BaseRequest, length: int) -> bytearray:
        body = bytearray(length)
        received = 0
        try:
            async with asyncio.timeout(BODY_SECONDS):
                while received < length:
                    chunk = await request.content.read(min(length - received, 256 * 1024))
                    if not chunk:
                        break
                    body[received:received + len(chunk)] = chunk
                    received += len(chunk)
        except TimeoutError:
            raise Refused(408, "timeout_error", f"the request body did not arrive within {BODY_SECONDS:g} s") from None
        if received < length:
            raise Refused(400, "invalid_request_error", "the request body ended before its Content-Length")
        return body

    def _payer(self, chat_id: str) -> _Payer:
        """Who pays (the sender of the chat's running message), once the budgets allow the request. In the
        store's thread."""
        running = self.store.running_message(chat_id)
        payer = _Payer(running.sender_id, running.message_id) if running else _Payer("", None)
        refusal = spending.check(self.config.budgets, datetime.now(UTC), chat_id, payer.user_id, self.store.spent)
        if refusal is not None:
            raise Refused(402, "billing_error", refusal.text, {"x-should-retry": "false"})
        return payer

    async def _send(self, request: web.BaseRequest, body: bytearray) -> aiohttp.ClientResponse:
        assert self._session is not None
        headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
        headers.update(self._credentials, **{"accept-encoding": "identity"})  # usage is read from the bytes
        url = URL(self.upstream + request.path).with_query(request.query)
        try:
            return await self._session.post(url, data=body, headers=headers)
        except TimeoutError:
            raise Refused(504, "timeout_error", "the model API did not answer in time") from None
        except aiohttp.ClientError as exc:
            logger.warning(f"the model API cannot be reached: {exc.__class__.__name__}: {exc}")
            raise Refused(502, "api_error", "the model API cannot be reached from the gateway") from None

    async def _answer(self, request: web.BaseRequest, upstream: aiohttp.ClientResponse, chat_id: str,
                      payer: _Payer) -> web.StreamResponse:
        headers = {name: upstream.headers[name] for name in RETURNED_HEADERS if name in upstream.headers}
        meter = _Meter(self, chat_id, payer)
        if upstream.content_type != "text/event-stream":
            body = await self._whole(upstream)
            usage = spending.usage_of_message(body) if upstream.status == 200 else None
            if usage is not None:
                await meter.record(usage, complete=True)
            return web.Response(status=upstream.status, headers=headers, body=body)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        stream = spending.StreamUsage()
        try:
            async for chunk in upstream.content.iter_any():
                if (usage := stream.feed(chunk)) is not None:
                    await meter.record(usage, stream.complete)
                await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The client must see a broken stream, not a finished one: its connection is closed, unfinished.
            meter.log.warning(f"the model API's stream broke off: {exc.__class__.__name__} {exc}")
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

    async def _in_store(self, fn: Callable[..., T], *args: Any) -> T:
        """Store calls run on the gateway's one store thread: a busy database never holds the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)


class _Meter:
    """One response's usage row: made at the first usage seen, then kept up to date."""

    def __init__(self, gateway: Gateway, chat_id: str, payer: _Payer) -> None:
        self.gateway, self.chat_id, self.payer = gateway, chat_id, payer
        self.row: int | None = None
        self.log = logger.bind(chat_id=chat_id, message_id=payer.message_id or "-")

    async def record(self, usage: spending.Usage, complete: bool) -> None:
        cost = usage.cost(self.gateway.config.budgets.prices)
        store = self.gateway.store
        if self.row is None:
            self.row = await self.gateway._in_store(lambda: store.open_usage(
                self.chat_id, self.payer.user_id, self.payer.message_id, usage.model, **usage.counts(),
                cost_nano=cost, complete=complete))
        else:
            row = self.row
            await self.gateway._in_store(lambda: store.update_usage(row, **usage.counts(), cost_nano=cost,
                                                                    complete=complete))
        if complete:
            self.log.info(f"model request: {usage.model}, {usage.input_tokens} in, {usage.output_tokens} out, "
                          f"cache {usage.cache_write_tokens} written, {usage.cache_read_tokens} read: "
                          f"{spending.usd(cost)}")


# ---- the process ----

async def serve(config: GatewayConfig) -> None:
    """Serve until SIGTERM or SIGINT."""
    store = Store(config.db_path)
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
    setup_logging(config.log_json, config.log_level,
                  secrets=[s for s in (config.gateway.api_key, config.gateway.auth_token) if s])
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
