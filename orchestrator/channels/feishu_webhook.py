"""Feishu's event webhook: an HTTP endpoint anyone can reach, so every request is hostile until its signature
says otherwise, and none may cost more than a bounded share of memory, threads and time.

- One asyncio server reads requests; a slow client costs a socket and a coroutine, not a thread. At most
  `max_connections` are open at once, and at most `max_per_client` from one client (an IPv4 address, an IPv6
  /64): the next one is answered 503 at once, without reading it. Without the per-client cap one client
  holding 64 idle connections made every genuine event get 503 (security review of issue 9).
- The request line and headers must arrive within `head_timeout` seconds (Feishu sends them in one packet),
  all of the request within `read_timeout` (a client that sends a byte every few seconds is cut off then:
  408), headers within 16 KiB (431). So an idle connection holds its slot for `head_timeout`, not longer.
- The body is read only after its Content-Length is checked: missing 411, not a plain number 400 (so a
  negative one too), over `max_body` 413. Chunked bodies are not taken (411 without a length).
- Feishu's signature (sha256 of timestamp + nonce + Encrypt Key + raw body, lower-case hex) is checked before
  anything decrypts or parses the body, then the timestamp (within `REPLAY_WINDOW` of now) and that the same
  signature was not seen within that window (an exact replay). Only then does the SDK's dispatcher get it,
  on one of `workers` threads (it blocks until the service has stored the event).
- Feishu's URL verification is the one request that comes unsigned (no X-Lark-* headers, even with an
  Encrypt Key: lark-oapi skips its signature check for it too); it is handed to `challenge`, which must
  decrypt it with the key and find the verification token in it.
- Every check that fails gives the same answer, 401 `{"msg":"refused"}`: a bad signature, a stale or
  replayed one, a body that does not decrypt (bad padding), a wrong token. Nothing tells an attacker which
  check failed. The log says, once per reason per minute, with a count (an attack cannot flood it).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.client
import io
import ipaddress
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from loguru import logger

TIMESTAMP, NONCE, SIGNATURE = "X-Lark-Request-Timestamp", "X-Lark-Request-Nonce", "X-Lark-Signature"
REPLAY_WINDOW = 300.0  # seconds a signed request's timestamp may be off from now; signatures are kept this long
SEEN_CAPACITY = 20_000  # signatures remembered at most (≈ 66 events a second over the window); past it, refuse
HEADER_LIMIT = 16 * 1024  # request line and headers together
WRITE_TIMEOUT = 5.0  # seconds for an answer to leave; a client that does not read it is dropped
REFUSAL_LOG_INTERVAL = 60.0
_DIGITS = re.compile(r"[0-9]{1,18}")


class Refused(Exception):
    """A request that fails a check; the reason goes to the log, never to the client."""


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes


REFUSED = Reply(401, b'{"msg":"refused"}')
BUSY = Reply(503, b'{"msg":"busy"}')


@dataclass(frozen=True)
class WebhookLimits:
    max_body: int = 1024 * 1024
    max_connections: int = 64
    max_per_client: int = 8
    head_timeout: float = 3.0  # capped by read_timeout
    read_timeout: float = 10.0
    workers: int = 4


# A signed request's headers (canonical case, as the SDK wants them) and raw body → the body of a 200 answer.
Dispatch = Callable[[dict[str, str], bytes], bytes]
# An unsigned request's raw body → the body of the answer to Feishu's URL verification.
Challenge = Callable[[bytes], bytes]


class Verifier:
    """Feishu's request signature, the timestamp window, and the signatures already seen within it. Used from
    one thread (the server's loop)."""

    def __init__(self, encrypt_key: str, window: float = REPLAY_WINDOW, capacity: int = SEEN_CAPACITY,
                 clock: Callable[[], float] = time.time) -> None:
        self._key = encrypt_key.encode()
        self._window = window
        self._capacity = capacity
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()  # signature → when it may be forgotten

    def check(self, headers: Mapping[str, str], body: bytes) -> None:
        """Raise Refused unless the request is signed with our key, recent, and new."""
        timestamp, nonce, signature = (headers.get(name, "") for name in (TIMESTAMP, NONCE, SIGNATURE))
        signed = timestamp.encode("latin-1") + nonce.encode("latin-1") + self._key + body
        if not hmac.compare_digest(hashlib.sha256(signed).hexdigest().encode(), signature.encode("latin-1")):
            raise Refused("bad signature")
        now = self._clock()
        if not _DIGITS.fullmatch(timestamp) or abs(now - int(timestamp)) > self._window:
            raise Refused("timestamp outside the replay window")
        self._forget_expired(now)
        if signature in self._seen:
            raise Refused("replayed (a signature already seen)")
        if len(self._seen) >= self._capacity:
            raise Refused(f"more than {self._capacity} signed requests within the replay window")
        self._seen[signature] = int(timestamp) + self._window

    def forget(self, signature: str) -> None:
        """A request the service did not take: Feishu may send exactly the same one again."""
        self._seen.pop(signature, None)

    def _forget_expired(self, now: float) -> None:
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)


class _Refusals:
    """Refused requests counted by reason; each reason logged when first seen, then at most once a minute."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._logged_at: dict[str, float] = {}

    def add(self, reason: str, peer: str) -> None:
        self.counts[reason] += 1
        now = time.monotonic()
        if now - self._logged_at.get(reason, -REFUSAL_LOG_INTERVAL) >= REFUSAL_LOG_INTERVAL:
            self._logged_at[reason] = now
            logger.warning(f"webhook request refused: {reason} (from {peer}; {self.counts[reason]} so far)")


class WebhookServer:
    def __init__(self, host: str, port: int, path: str, limits: WebhookLimits, verifier: Verifier,
                 dispatch: Dispatch, challenge: Challenge) -> None:
        self.host, self.port, self.path = host, port, path
        self.limits = limits
        self.verifier = verifier
        self.dispatch = dispatch
        self.challenge = challenge
        self.refusals = _Refusals()
        self._open: Counter[str] = Counter()  # client → its open connections
        self._server: asyncio.Server | None = None
        self._workers = ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="feishu-webhook")

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def serve(self) -> None:
        """Listen until cancelled."""
        self._server = await asyncio.start_server(self._connection, self.host, self.port, limit=HEADER_LIMIT)
        host, port = self._server.sockets[0].getsockname()[:2]
        logger.info(f"listening for Feishu events on http://{host}:{port}{self.path} (at most "
                    f"{self.limits.max_connections} connections, {self.limits.max_per_client} from one client, "
                    f"{self.limits.max_body} bytes a body)")
        try:
            await self._server.serve_forever()
        finally:
            self._server.close()
            self._workers.shutdown(wait=False, cancel_futures=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, peer = _peer(writer)
        client = client_of(host)
        if busy := self._over_limit(client):
            self.refusals.add(busy, peer)
            await _answer(writer, BUSY)
            return
        self._open[client] += 1
        try:
            reply = await self._request(reader, peer)
            if reply is not None:
                await _answer(writer, reply)
            else:
                writer.transport.abort()
        finally:
            self._open[client] -= 1
            if not self._open[client]:
                del self._open[client]

    def _over_limit(self, client: str) -> str | None:
        """Why one more connection from `client` is refused, or None."""
        if self._open.total() >= self.limits.max_connections:
            return f"more than {self.limits.max_connections} connections at once"
        if self._open[client] >= self.limits.max_per_client:
            return f"more than {self.limits.max_per_client} connections at once from {client}"
        return None

    async def _request(self, reader: asyncio.StreamReader, peer: str) -> Reply | None:
        """The answer to one request, or None when the client went away before it was complete."""
        limits = self.limits
        deadline = asyncio.get_running_loop().time() + limits.read_timeout
        head_timeout = min(limits.head_timeout, limits.read_timeout)
        late = f"request line and headers not sent within {head_timeout:g} s"
        try:
            async with asyncio.timeout(head_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
            headers, problem = self._parse(head)
            if problem is not None:
                self.refusals.add(f"{problem.status}: {problem.body.decode()}", peer)
                return problem
            late = f"not sent in full within {limits.read_timeout:g} s"
            async with asyncio.timeout_at(deadline):
                body = await reader.readexactly(int(headers["Content-Length"]))
        except TimeoutError:
            self.refusals.add(late, peer)
            return Reply(408, b'{"msg":"request timeout"}')
        except asyncio.LimitOverrunError:
            self.refusals.add(f"headers over {HEADER_LIMIT} bytes", peer)
            return Reply(431, b'{"msg":"headers too large"}')
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        try:
            return Reply(200, await self._handle(headers, body))
        except Refused as refused:
            self.refusals.add(str(refused), peer)
        except Exception as exc:  # a bug must not leave the client hanging, nor tell it more than a refusal does
            logger.opt(exception=exc).error(f"webhook request from {peer} failed: {exc!r}")
        return REFUSED

    def _parse(self, head: bytes) -> tuple[dict[str, str], Reply | None]:
        """The headers (canonical case), or the answer that refuses the request before its body is read."""
        line, _, rest = head.partition(b"\r\n")
        parts = line.decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return {}, Reply(400, b'{"msg":"bad request line"}')
        try:
            message = http.client.parse_headers(io.BytesIO(rest))
        except http.client.HTTPException:
            return {}, Reply(431, b'{"msg":"headers too large"}')
        if parts[0] != "POST":
            return {}, Reply(405, b'{"msg":"method not allowed"}')
        if parts[1].split("?", 1)[0] != self.path:
            return {}, Reply(404, b'{"msg":"not found"}')
        lengths = message.get_all("Content-Length") or []
        if not lengths:
            return {}, Reply(411, b'{"msg":"length required"}')
        if len(lengths) > 1 or message.get("Transfer-Encoding") or not _DIGITS.fullmatch(lengths[0].strip()):
            return {}, Reply(400, b'{"msg":"bad content length"}')
        if int(lengths[0]) > self.limits.max_body:
            return {}, Reply(413, b'{"msg":"body too large"}')
        # the SDK looks headers up case-sensitively, in the canonical case
        return {"-".join(p.capitalize() for p in k.split("-")): v for k, v in message.items()}, None

    async def _handle(self, headers: dict[str, str], body: bytes) -> bytes:
        """Check, then dispatch on a worker thread (decrypting and storing the event block)."""
        loop = asyncio.get_running_loop()
        if not any(name in headers for name in (TIMESTAMP, NONCE, SIGNATURE)):
            return await loop.run_in_executor(self._workers, self.challenge, body)
        self.verifier.check(headers, body)
        try:
            return await loop.run_in_executor(self._workers, self.dispatch, headers, body)
        except Refused:
            self.verifier.forget(headers[SIGNATURE])
            raise


async def _answer(writer: asyncio.StreamWriter, reply: Reply) -> None:
    head = (f"HTTP/1.1 {reply.status} {HTTPStatus(reply.status).phrase}\r\n"
            f"Content-Type: application/json; charset=utf-8\r\nContent-Length: {len(reply.body)}\r\n"
            "Connection: close\r\n\r\n")
    try:
        writer.write(head.encode() + reply.body)
        async with asyncio.timeout(WRITE_TIMEOUT):  # not wait_for: on 3.11 it can swallow a cancel
            await writer.drain()
        writer.close()
    except (TimeoutError, ConnectionError):
        writer.transport.abort()


def client_of(host: str) -> str:
    """The client a connection counts against: its IPv4 address (also when mapped into IPv6), or its IPv6 /64,
    since one IPv6 host is commonly given a whole /64 and could take a new address per connection."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _peer(writer: asyncio.StreamWriter) -> tuple[str, str]:
    """The peer's address, and address:port for the log."""
    peer: Any = writer.get_extra_info("peername")
    return (str(peer[0]), f"{peer[0]}:{peer[1]}") if isinstance(peer, tuple) else ("?", "?")
