"""The model gateway, for real: aiohttp on unix sockets in a temporary run folder, the fake Messages API upstream
(which answers only the real key), a real SQLite store. No Docker: the container that runs it is in
tests/acceptance (test_spending)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from loguru import logger

from orchestrator import credentials, egress, gateway, layout
from orchestrator.config import BudgetSettings, GatewaySettings, Price, load_settings
from orchestrator.gateway import Gateway, GatewayConfig, read_settings, settings_digest, write_settings
from orchestrator.runtime import CHAT_LABEL, ROLE_LABEL, gateway_container_spec
from orchestrator.spending import Usage
from orchestrator.store import Store
from tests.fakes.anthropic import FakeAnthropic
from tests.harness import wait_until
from tests.postgres import EXAMPLE_URL

KEY = "sk-ant-api03-CANARY-gateway-test-key-0123456789"
SECRET = bytes(range(32))
MODEL = "claude-test-1"
PRICES = {MODEL: Price(Decimal(1), Decimal(2), Decimal(3), Decimal(4)),
          "default": Price(Decimal(15), Decimal(75), Decimal("18.75"), Decimal("1.5"))}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeAnthropic]:
    fake = FakeAnthropic(api_key=KEY).start()
    yield fake
    fake.stop()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A unix socket's path has at most 107 bytes: pytest's tmp_path can be longer."""
    with tempfile.TemporaryDirectory(prefix="gw", dir="/tmp") as folder:
        yield Path(folder)


@pytest.fixture
def logs() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="DEBUG",
                      format="{message} {extra} {exception}")
    yield lines
    logger.remove(sink)


class Served:
    def __init__(self, gw: Gateway, store: Store, run_dir: Path) -> None:
        self.gateway, self.store, self.run_dir = gw, store, run_dir

    def socket(self, chat_id: str = "oc_a") -> Path:
        return self.run_dir / chat_id / gateway.SOCKET

    @contextlib.asynccontextmanager
    async def client(self, chat_id: str = "oc_a") -> AsyncIterator[aiohttp.ClientSession]:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.socket(chat_id)))) as session:
            yield session

    async def post(self, prompt: str = "hello", chat_id: str = "oc_a", token: str | None = None,
                   path: str = "/v1/messages?beta=true", stream: bool = True, body: Any = None,
                   **headers: str) -> tuple[int, dict[str, str], bytes]:
        token = credentials.model_token(SECRET, chat_id) if token is None else token
        sent = {"data": body} if isinstance(body, bytes) else {"json": body or body_of(prompt, stream)}
        async with self.client(chat_id) as session, session.post(
                f"http://gateway{path}", **sent,
                headers={"x-api-key": token, "anthropic-version": "2023-06-01", **headers}) as response:
            return response.status, dict(response.headers), await response.read()

    def rows(self) -> list[tuple[int, int, bool]]:
        """(input, output, complete) of each usage row."""
        return [(row.input_tokens, row.output_tokens, row.complete) for row in self.store.usage()]

    async def rows_become(self, rows: list[tuple[int, int, bool]]) -> None:
        """Wait for the usage rows to be these: a request that did not finish is settled after its client saw it
        end."""
        with contextlib.suppress(AssertionError):
            await asyncio.to_thread(wait_until, lambda: self.rows() == rows, 10, "the usage rows")
        assert self.rows() == rows


def body_of(prompt: str = "hello", stream: bool = True, max_tokens: int = 100, **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": prompt}], **fields}


def estimate(body: dict[str, Any]) -> int:
    """The gateway's estimate of a body's input tokens: a third of its bytes (aiohttp's json= is json.dumps)."""
    return len(json.dumps(body).encode()) // 3


def config_of(run_dir: Path, upstream_url: str, budgets: BudgetSettings | None = None,
              **gateway_fields: Any) -> GatewayConfig:
    return GatewayConfig(gateway=GatewaySettings(**{"upstream_url": upstream_url, "api_key": KEY, **gateway_fields}),
                         budgets=budgets or BudgetSettings(prices=PRICES),
                         store_url=f"sqlite:///{run_dir.parent / 'orchestrator.db'}",
                         run_dir=run_dir, secret_path=run_dir.parent / "secret")


@contextlib.asynccontextmanager
async def serving(folder: Path, upstream_url: str, chats: tuple[str, ...] = ("oc_a",),
                  budgets: BudgetSettings | None = None, **gateway_fields: Any) -> AsyncIterator[Served]:
    run_dir = folder / "run"
    run_dir.mkdir(exist_ok=True)
    for chat_id in chats:
        (run_dir / chat_id).mkdir(parents=True, exist_ok=True)
    config = config_of(run_dir, upstream_url, budgets, **gateway_fields)
    store = Store(config.store_url)
    gw = Gateway(config, store, SECRET)
    await gw.start()
    try:
        yield Served(gw, store, run_dir)
    finally:
        await gw.close()
        store.close()


@contextlib.asynccontextmanager
async def raw_upstream(answer: bytes) -> AsyncIterator[str]:
    """An upstream on 127.0.0.1 that reads a request whole, sends these bytes and closes; its URL."""
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                      if line.startswith(b"content-length:"))
        await reader.readexactly(length)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(respond, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def upload(served: Served, chat_id: str, length: int, sent: bytes) -> tuple[asyncio.StreamReader,
                                                                                 asyncio.StreamWriter]:
    """A request to the chat's socket that says it has `length` bytes of body and sends only `sent` of them."""
    reader, writer = await asyncio.open_unix_connection(str(served.socket(chat_id)))
    token = credentials.model_token(SECRET, chat_id).encode()
    writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: g\r\ncontent-length: %d\r\nx-api-key: %s\r\n\r\n%s"
                 % (length, token, sent))
    await writer.drain()
    return reader, writer


def error_of(body: bytes) -> tuple[str, str]:
    payload = json.loads(body)
    assert payload["type"] == "error"
    return payload["error"]["type"], payload["error"]["message"]


def test_a_stream_passes_through_byte_for_byte_and_its_usage_is_stored(short_dir: Path,
                                                                      upstream: FakeAnthropic) -> None:
    async def scenario() -> None:
        async with serving(short_dir, upstream.base_url) as served:
            served.store.record_received("om_1", "oc_a", "ou_1", "the chat's message")
            served.store.mark_queued("om_1")
            served.store.mark_running("om_1", "1-1")
            status, headers, body = await served.post("TOKENS 1234 567 89 10 please")
            assert status == 200 and headers["Content-Type"] == "text/event-stream"
            assert body == upstream.responses[-1]  # unchanged, byte for byte
            reported = upstream.usages[-1]
            [row] = served.store.usage("oc_a")
            assert (row.input_tokens, row.output_tokens, row.cache_write_tokens, row.cache_read_tokens) == (
                reported["input_tokens"], reported["output_tokens"], reported["cache_creation_input_tokens"],
                reported["cache_read_input_tokens"]) == (1234, 567, 89, 10)
            # $1, $2, $3 and $4 per million: 1234 + 1134 + 267 + 40 = 2675 micro-USD
            assert (row.model, row.cost_nano, row.complete) == (MODEL, 2_675_000, True)
            assert (row.user_id, row.message_id) == ("ou_1", "om_1")  # the running message's sender pays
            assert served.store.turn_spent("om_1") == 2_675_000
            assert upstream.requests[-1]["messages"][0]["content"] == "TOKENS 1234 567 89 10 please"
            rows_at_stop = await stored_when_the_stream_stops(served)
            assert [(row.output_tokens, row.complete) for row in rows_at_stop] == [(567, True), (10, True)]

    asyncio.run(scenario())


async def stored_when_the_stream_stops(served: Served) -> list[Any]:
    """The usage rows as they are the moment message_stop reaches the client: its cost is stored before."""
    token = credentials.model_token(SECRET, "oc_a")
    async with served.client() as session, session.post("http://g/v1/messages", json=body_of("STREAM 3 0"),
                                                        headers={"x-api-key": token}) as response:
        seen = b""
        while b"message_stop" not in seen:
            chunk = await response.content.readany()
            assert chunk, "the stream ended without message_stop"
            seen += chunk
        return served.store.usage("oc_a")


def test_a_whole_message_and_count_tokens(short_dir: Path, upstream: FakeAnthropic) -> None:
    async def scenario() -> None:
        async with serving(short_dir, upstream.base_url) as served:
            status, headers, body = await served.post("TOKENS 100 200", stream=False)
            assert status == 200 and headers["Content-Type"] == "application/json"
            assert body == upstream.responses[-1] and json.loads(body)["usage"]["output_tokens"] == 200
            [row] = served.store.usage()
            assert (row.input_tokens, row.output_tokens, row.complete, row.user_id, row.message_id) == (
                100, 200, True, "", None)  # no message was running: the chat pays, no user
            status, _, body = await served.post(path="/v1/messages/count_tokens?beta=true", stream=False)
            assert (status, json.loads(body)) == (200, {"input_tokens": 10})
            assert len(served.store.usage()) == 1  # counting tokens costs nothing

    asyncio.run(scenario())


def test_only_the_chats_own_token_is_let_in(short_dir: Path, upstream: FakeAnthropic, logs: list[str]) -> None:
    async def scenario() -> None:
        async with serving(short_dir, upstream.base_url, chats=("oc_a", "oc_b")) as served:
            before = len(upstream.requests)
            for token in ("", "wrong", KEY, credentials.model_token(SECRET, "oc_b"),
                          credentials.model_token(b"another instance's secret", "oc_a")):
                status, _, body = await served.post(token=token)
                assert status == 401 and error_of(body)[0] == "authentication_error"
            bearer = f"Bearer {credentials.model_token(SECRET, 'oc_a')}"
            async with served.client() as session, session.post(
                    "http://gateway/v1/messages", json=body_of(), headers={"authorization": bearer}) as response:
                assert response.status == 200
            assert len(upstream.requests) == before + 1
            assert upstream.api_keys == {KEY}  # the real key went upstream, never the chat's token

    asyncio.run(scenario())
    assert not any(KEY in line or credentials.model_token(SECRET, "oc_a") in line for line in logs)


def test_other_paths_and_methods_are_not_found(short_dir: Path, upstream: FakeAnthropic) -> None:
    async def scenario() -> None:
        async with serving(short_dir, upstream.base_url) as served:
            for path in ("/v1/complete", "/v1/messages/batches", "/v1/messages/", "/v1/models", "/"):
                status, _, body = await served.post(path=path)
                assert status == 404 and error_of(body)[0] == "not_found_error", path
            async with served.client() as session, session.get(
                    "http://gateway/v1/messages", headers={"x-api-key": credentials.model_token(SECRET, "oc_a")}
            ) as response:
                assert response.status == 404

    asyncio.run(scenario())


def test_a_body_too_big_or_without_a_length_is_refused(short_dir: Path, upstream: FakeAnthropic) -> None:
    async def chunked() -> AsyncIterator[bytes]:
        yield b'{"model": "x"}'

    async def scenario() -> None:
        async with serving(short_dir, upstream.base_url, max_request_bytes=2000) as served:
            before = len(upstream.requests)
            status, _, body = await served.post("x" * 3000)
            assert status == 413 and error_of(body)[0] == "request_too_large"
            async with served.client() as session, session.post(
                    "http://gateway/v1/messages", data=chunked(),
                    headers={"x-api-key": credentials.model_token(SECRET, "oc_a")}) as response:
                assert response.status == 411
            assert len(upstream.requests) == before

    asyncio.run(scenario())


def test_a_body_that_does_not_arrive_in_time_is_refused(short_dir: Path, upstream: FakeAnthropic,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway, "BODY_SECONDS", 0.3)

    async def scenario() -> None:
        async with serving(short_dir, upstream.base_url) as served:
            reader, writer = await asyncio.open_unix_connection(str(served.socket()))
            writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: g\r\ncontent-length: 100\r\nx-api-key: "
                         + credentials.model_token(SECRET, "oc_a").encode() + b"\r\n\r\n{\"model\":")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(4096), 10)
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert b"did not arrive within 0.3 s" in answer
            writer.close()

    asyncio.run(scenario())


def test_one_chats_stalled_uploads_do_not_fail_another_chats_request(short_dir: Path, upstream: FakeAnthropic,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway, "BODY_MEMORY", 8100)

    async def scenario() -> None:
        async with serving(short_dir, upstream.base_url, chats=("oc_a", "oc_b"), max_request_bytes=4000) as served:
            _, stalled = await upload(served, "oc_a", 4000, b'{"model":')  # the chat's share, 9 bytes of memory
            reader, writer = await upload(served, "oc_a", 4000, b"")
            answer = await asyncio.wait_for(reader.read(4096), 10)  # over its share: refused before a byte is read
            assert answer.startswith(b"HTTP/1.1 429") and b"would be over the gateway's 4000 bytes" in answer
            writer.close()
            assert (await served.post("another chat meanwhile", chat_id="oc_b"))[0] == 200
            # what did come in counts for all chats: 3009 bytes of oc_a's and 2000 of oc_b's are over 5000
            monkeypatch.setattr(gateway, "BODY_MEMORY", 5000)
            stalled.write(b"x" * 3000)
            await stalled.drain()
            await asyncio.to_thread(wait_until, lambda: served.gateway._body_bytes == 3009, 10, "the bytes in")
            status, _, body = await served.post("x" * 2000, chat_id="oc_b")
            assert (status, error_of(body)[0]) == (529, "overloaded_error")
            stalled.close()
            await asyncio.to_thread(wait_until, lambda: not served.gateway._chat_bodies, 10, "the body let go")
            assert served.gateway._body_bytes == 0

    asyncio.run(scenario())


def test_a_body_is_let_go_once_it_is_sent_upstream(short_dir: Path, upstream: FakeAnthropic) -> None:
    async def scenario() -> None:
        async with serving(short_dir, upstream.base_url) as served:
            answer = asyncio.create_task(served.post("SILENT 1 to let go " + "x" * 100_000))
            await asyncio.to_thread(wait_until, lambda: any("to let go" in p for p in upstream.prompts()), 10,
                                    "the request upstream")
            # the API has not answered yet: the body's memory is free again
            assert (served.gateway._body_bytes, served.gateway._chat_bodies) == (0, {})
            assert (await answer)[0] == 200

    asyncio.run(scenario())


def test_a_token_that_is_not_text_is_refused_and_refusals_are_logged_sparingly(
        short_dir: Path, upstream: FakeAnthropic, logs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with serving(short_dir, upstream.base_url) as served:
            for _ in range(5):
                reader, writer = await asyncio.open_unix_connection(str(served.socket()))
                writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: g\r\nconnection: close\r\ncontent-length: 2\r\n"
                             b"x-api-key: \xff\r\n\r\n{}")
                answer = await asyncio.wait_for(reader.read(), 10)
                assert answer.startswith(b"HTTP/1.1 401") and b"authentication_error" in answer
                writer.close()
            monkeypatch.setattr(gateway, "REFUSAL_LOG_SECONDS", 0)
            assert (await served.post(token="wrong"))[0] == 401

    asyncio.run(scenario())
    refused = [line for line in logs if "model request refused" in line]
    assert len(refused) == 2, refused  # one for the first five, and one with their count once the time passed
    assert "4 more refused since the last of these lines" in refused[1]
    assert not any("Traceback" in line or "failed" in line for line in logs)


def test_a_chat_gets_its_share_of_requests_at_once(short_dir: Path, upstream: FakeAnthropic) -> None:
    async def scenario() -> None:
        async with serving(short_dir, upstream.base_url, chats=("oc_a", "oc_b"), max_concurrent=1) as served:
            slow = asyncio.create_task(served.post("SLOW 1"))
            await asyncio.to_thread(wait_until, lambda: any("SLOW 1" in p for p in upstream.prompts()), 10,
                                    "the slow request upstream")
            status, _, body = await served.post("meanwhile")
            assert status == 429 and error_of(body)[0] == "rate_limit_error"
            assert (await served.post("another chat meanwhile", chat_id="oc_b"))[0] == 200
            assert (await slow)[0] == 200
            assert (await served.post("afterwards"))[0] == 200

    asyncio.run(scenario())


def test_a_spent_budget_is_refused_with_its_figure_and_no_retry(short_dir: Path, upstream: FakeAnthropic) -> None:
    # One request of 10000 tokens in and 10000 out at $1 and $2 per million costs $0.03; the cap is $0.05.
    budgets = BudgetSettings(per_chat_daily_usd=Decimal("0.05"), prices=PRICES)

    async def scenario() -> None:
        async with serving(short_dir, upstream.base_url, chats=("oc_a", "oc_b"), budgets=budgets) as served:
            assert (await served.post("TOKENS 10000 10000"))[0] == 200
            assert (await served.post("TOKENS 10000 10000"))[0] == 200  # $0.03 < $0.05: allowed, crosses it
            before = len(upstream.requests)
            status, headers, body = await served.post("one more")
            assert (status, headers["x-should-retry"]) == (402, "false")
            kind, message = error_of(body)
            assert kind == "billing_error"
            assert message.startswith("This chat has spent $0.06 of its daily budget of $0.05; it resets at ")
            assert message.endswith(" 00:00 UTC.")
            assert len(upstream.requests) == before  # never went upstream
            assert (await served.post("TOKENS 1 1", chat_id="oc_b"))[0] == 200  # another chat's budget is its own

    asyncio.run(scenario())


def test_upstream_unreachable_or_too_slow(short_dir: Path, upstream: FakeAnthropic) -> None:
    async def scenario() -> None:
        async with serving(short_dir, "http://127.0.0.1:1") as served:  # nothing listens there
            status, _, body = await served.post()
            assert status == 502 and error_of(body)[0] == "api_error"
            assert served.rows() == []  # the API never had it: its reservation is dropped
        async with serving(short_dir, upstream.base_url, request_timeout=0.5) as served:
            body = body_of("SILENT 2")
            status, _, answer = await served.post(body=body)
            assert status == 504 and error_of(answer)[0] == "timeout_error"
            await served.rows_become([(estimate(body), 0, False)])  # it went up, nothing was streamed

    asyncio.run(scenario())


def test_a_request_is_reserved_before_it_goes_upstream_then_billed_what_it_used(short_dir: Path,
                                                                               upstream: FakeAnthropic) -> None:
    async def scenario() -> None:
        async with serving(short_dir, upstream.base_url) as served:
            body = body_of("SILENT 1 TOKENS 300 40 to reserve", max_tokens=5000)
            answer = asyncio.create_task(served.post(body=body))
            await asyncio.to_thread(wait_until, lambda: any("to reserve" in p for p in upstream.prompts()), 10,
                                    "the request upstream")
            [row] = served.store.usage()  # while the API has not answered yet
            assert (row.model, row.input_tokens, row.output_tokens, row.complete) == (
                MODEL, estimate(body), 5000, False)
            assert row.cost_nano == Usage(MODEL, estimate(body), 5000).cost(PRICES)
            assert (await answer)[0] == 200
            assert served.rows() == [(300, 40, True)]

    asyncio.run(scenario())


def test_a_client_that_leaves_mid_stream_is_billed_for_what_was_streamed(short_dir: Path,
                                                                         upstream: FakeAnthropic) -> None:
    prompt = "TOKENS 900 5000 SLOW 30 " + "words " * 100
    answer = f"Fake answer to: {prompt.strip()}"
    streamed = answer[:len(answer) // 2]  # the fake's first piece of text; it then waits 30 s

    async def scenario() -> None:
        async with serving(short_dir, upstream.base_url) as served:
            async with served.client() as session, session.post(
                    "http://g/v1/messages", json=body_of(prompt, max_tokens=8000),
                    headers={"x-api-key": credentials.model_token(SECRET, "oc_a")}) as response:
                seen = b""
                while b"text_delta" not in seen:
                    seen += await response.content.readany()
                # message_start's input, and the reservation's output until message_delta says
                assert served.rows() == [(900, 8000, False)]
            # the client went away: a third of the streamed text's bytes, not message_start's one token
            await served.rows_become([(900, len(streamed.encode()) // 3, False)])

    asyncio.run(scenario())


def test_a_whole_message_cut_off_keeps_its_reservation_and_a_refusal_costs_nothing(short_dir: Path) -> None:
    cut = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{"type": "message"'
    error = b'{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}'
    overloaded = (b"HTTP/1.1 529 Overloaded\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                  % (len(error), error))

    async def scenario() -> None:
        body = body_of(stream=False, max_tokens=3000)
        async with raw_upstream(cut) as url, serving(short_dir, url) as served:
            status, _, answer = await served.post(body=body)
            assert (status, error_of(answer)) == (502, ("api_error", "the model API's answer broke off"))
            await served.rows_become([(estimate(body), 3000, False)])  # what it used is not known: all it may
        async with raw_upstream(overloaded) as url, serving(short_dir, url) as served:
            status, _, answer = await served.post(body=body)
            assert (status, answer) == (529, error)
            assert served.rows() == [(estimate(body), 3000, False)]  # the one before; this one is dropped

    asyncio.run(scenario())


def test_a_stream_the_upstream_breaks_off_reaches_the_client_broken_and_stays_counted(short_dir: Path) -> None:
    start = {"type": "message_start", "message": {"type": "message", "model": MODEL,
                                                  "usage": {"input_tokens": 700, "output_tokens": 1}}}
    event = f"event: message_start\ndata: {json.dumps(start)}\n\n".encode()
    broken = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
              + f"{len(event):x}\r\n".encode() + event + b"\r\n")  # without the last chunk: the answer broke off

    async def scenario() -> None:
        async with raw_upstream(broken) as url, serving(short_dir, url) as served:
            async with served.client() as session, session.post(
                    "http://g/v1/messages", json=body_of(),
                    headers={"x-api-key": credentials.model_token(SECRET, "oc_a")}) as response:
                assert response.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
            await served.rows_become([(700, 1, False)])  # nothing but message_start was streamed

    asyncio.run(scenario())


def test_a_redirect_is_not_followed_with_the_key(short_dir: Path) -> None:
    heads: list[bytes] = []

    async def elsewhere(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(elsewhere, "127.0.0.1", 0)
        target = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/messages"
        redirect = f"HTTP/1.1 307 Temporary Redirect\r\nlocation: {target}\r\ncontent-length: 0\r\n\r\n".encode()
        async with server, raw_upstream(redirect) as url, serving(short_dir, url) as served:
            assert (await served.post())[0] == 307  # passed back as it came
            assert served.rows() == []
        assert heads == []  # nothing went to where it pointed, with the key or without

    asyncio.run(scenario())


def test_requests_in_flight_count_in_the_budget(short_dir: Path, upstream: FakeAnthropic) -> None:
    # A request's reservation: 100000 tokens out at $2 per million, $0.20, reaches the $0.10 cap alone; what it
    # uses (10 in, 10 out: $0.00003) is far under it.
    budgets = BudgetSettings(per_chat_daily_usd=Decimal("0.10"), prices=PRICES)

    async def scenario() -> None:
        async with serving(short_dir, upstream.base_url, budgets=budgets) as served:
            body = body_of("SLOW 0.5", max_tokens=100_000)  # in flight while the other four come
            answers = await asyncio.gather(*(served.post(body=body) for _ in range(5)))
            # Only the first one's reservation reached the cap: the others are asked to come back (the CLI retries
            # a 429), not refused for good (a 402 would end the turn).
            assert sorted(status for status, _, _ in answers) == [200, 429, 429, 429, 429]
            assert all({k.lower(): v for k, v in headers.items()}["retry-after"] == "2"
                       for status, headers, _ in answers if status == 429)
            assert served.rows() == [(10, 10, True)]  # the refused ones reserved nothing
            assert (await served.post(body=body))[0] == 200  # settled at what it used, it leaves room again

    asyncio.run(scenario())


def test_a_body_must_say_what_it_may_cost_and_not_have_anthropic_fetch_anything(short_dir: Path,
                                                                                upstream: FakeAnthropic) -> None:
    refused: list[tuple[Any, str]] = [
        ({"model": MODEL, "messages": []}, "the request must give max_tokens, a whole number from 1 to 16777216"),
        (body_of(max_tokens=0), "must give max_tokens"),
        (body_of(max_tokens="100"), "must give max_tokens"),
        (body_of(max_tokens=True), "must give max_tokens"),
        (body_of(max_tokens=2**24 + 1), "must give max_tokens"),
        ([body_of()], "the request body is not a JSON object"),
        (b"{not json", "the request body is not JSON"),
        (b'{"max_tokens": 1, "max_tokens": 100000, "messages": []}', "the request body repeats a key in an object"),
        (body_of(mcp_servers=[{"type": "url", "url": "https://example.com/sse", "name": "x"}]),
         "this gateway does not pass on the field mcp_servers: Anthropic's servers would reach the internet for "
         "it, past the chat's egress allowlist"),
        (body_of(tools=[{"type": "web_fetch_20250910", "name": "web_fetch"}]), "a web_fetch_20250910 tool"),
        (body_of(tools=[{"name": "Bash", "input_schema": {"type": "object"}},
                        {"type": "code_execution_20250825", "name": "code_execution"}]),
         "a code_execution_20250825 tool"),
    ]

    async def scenario() -> None:
        async with serving(short_dir, upstream.base_url) as served:
            before = len(upstream.requests)
            for body, words in refused:
                status, _, answer = await served.post(body=body)
                kind, message = error_of(answer)
                assert (status, kind) == (400, "invalid_request_error") and words in message, body
            assert len(upstream.requests) == before and served.rows() == []
            search = body_of(tools=[{"name": "Bash", "input_schema": {"type": "object"}},
                                    {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}])
            assert (await served.post(body=search))[0] == 200  # Claude Code's WebSearch: let through, and priced

    asyncio.run(scenario())


def test_a_body_too_dense_to_read_is_refused(short_dir: Path, upstream: FakeAnthropic,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway, "PARSE_MEMORY", 2 * 1024**2)
    dense = b'{"max_tokens": 1, "messages": [' + b"[]," * 20_000 + b"[]]}"  # 60 kB that json.loads makes 1.3 MB of

    async def scenario() -> None:
        async with serving(short_dir, upstream.base_url) as served:
            status, _, answer = await served.post(body=dense)
            assert (status, error_of(answer)) == (413, ("request_too_large", "the request body would take 3 MiB to "
                                                        "read, over the gateway's 2 MiB"))
            assert (await served.post("words " * 40_000))[0] == 200  # four times as long, but text

    asyncio.run(scenario())


@pytest.mark.parametrize("body", [
    b"[" + b"[]," * 50_000 + b"[]]",
    b"[" + b"{}," * 50_000 + b"{}]",
    b"{" + b",".join(b'"k%d": 0' % n for n in range(20_000)) + b"}",
    b"[" + b"1.5," * 50_000 + b"1]",
    b"[" + b'"ab",' * 50_000 + b'"a"]',
    json.dumps(["a" * 200_000 + "\U0001f600"], ensure_ascii=False).encode(),  # an emoji: 4 bytes a character
    json.dumps(["a" * 200_000 + "\U0001f600"]).encode(),  # the same, escaped as a surrogate pair
    json.dumps(["中文" * 50_000], ensure_ascii=False).encode(),
    json.dumps(["中文" * 50_000]).encode(),
    json.dumps({"messages": [{"content": [{"type": "text", "text": "x, y: [z]" * 30}]}] * 500}).encode(),
], ids=["arrays", "objects", "members", "floats", "short strings", "emoji", "escaped emoji", "chinese",
        "escaped chinese", "messages"])
def test_what_reading_a_body_takes_is_bounded_before_it_is_read(body: bytes) -> None:
    tracemalloc.start()
    try:
        json.loads(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= gateway._reading_memory(bytearray(body)) <= 60 * len(body)


def test_a_chat_cannot_take_every_connection(short_dir: Path, upstream: FakeAnthropic,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway, "MAX_CHAT_CONNECTIONS", 3)

    async def scenario() -> None:
        async with serving(short_dir, upstream.base_url, chats=("oc_a", "oc_b")) as served:
            held = [await asyncio.open_unix_connection(str(served.socket())) for _ in range(5)]
            closed = [await asyncio.wait_for(reader.read(1), 5) == b"" for reader, _ in held[3:]]
            assert closed == [True, True]  # over the chat's share: closed at once
            assert (await served.post(chat_id="oc_b"))[0] == 200  # another chat is served
            for _, writer in held:
                writer.close()
            await asyncio.to_thread(wait_until, lambda: len(served.gateway._runner.server.connections) <= 1, 5,
                                    "the connections closed")
            assert (await served.post())[0] == 200  # and the chat again, once it let go

    asyncio.run(scenario())


def test_the_key_is_in_no_answer_and_no_log_line(short_dir: Path, upstream: FakeAnthropic, logs: list[str]) -> None:
    async def scenario() -> list[bytes]:
        seen = []
        async with serving(short_dir, upstream.base_url) as served:
            for prompt, token in (("hello", None), ("hi", "wrong"), ("RUN_BASH: env", None)):
                status, headers, body = await served.post(prompt, token=token)
                seen.append(json.dumps(headers).encode() + body)
        async with serving(short_dir, "http://127.0.0.1:1") as served:
            seen.append((await served.post())[2])
        async with serving(short_dir, upstream.base_url, api_key="") as served:  # no key: the upstream's 401
            status, _, body = await served.post()
            assert status == 401
            seen.append(body)
        return seen

    for answer in asyncio.run(scenario()):
        assert KEY.encode() not in answer
    assert logs and not any(KEY in line for line in logs)


def test_chat_folders_are_served_as_they_come_and_go(short_dir: Path, upstream: FakeAnthropic) -> None:
    async def scenario() -> None:
        async with serving(short_dir, upstream.base_url, chats=()) as served:
            run_dir = served.run_dir
            (run_dir / "oc_new").mkdir()
            (run_dir / "-bad").mkdir()  # not a chat id
            (short_dir / "elsewhere").mkdir()
            (run_dir / "oc_link").symlink_to(short_dir / "elsewhere")  # never followed
            await asyncio.to_thread(wait_until, lambda: served.socket("oc_new").exists(), 5, "the new chat's socket")
            assert stat.S_IMODE(os.lstat(served.socket("oc_new")).st_mode) == 0o666
            assert (await served.post(chat_id="oc_new"))[0] == 200
            await asyncio.sleep(gateway.POLL_SECONDS * 3)
            assert not (run_dir / "-bad" / gateway.SOCKET).exists()
            assert list((short_dir / "elsewhere").iterdir()) == []
            os.unlink(served.socket("oc_new"))
            (run_dir / "oc_new").rmdir()
            await asyncio.to_thread(wait_until, lambda: "oc_new" not in served.gateway._sites, 5, "the chat gone")

    asyncio.run(scenario())


def test_on_swarm_each_chats_socket_is_in_the_nodes_own_folder(short_dir: Path, upstream: FakeAnthropic) -> None:
    """runtime: swarm: the run folders (on the shared storage) say which chats to serve; each socket is bound in a
    folder of the node's own that the gateway makes, and removes when the chat's run folder goes."""
    async def scenario() -> None:
        run_dir, node = short_dir / "run", short_dir / "node"
        (run_dir / "oc_a").mkdir(parents=True)
        config = dataclasses.replace(config_of(run_dir, upstream.base_url), socket_dir=node / "bot" / "model")
        store = Store(config.store_url)
        gw = Gateway(config, store, SECRET)
        await gw.start()
        try:
            served = Served(gw, store, node / "bot" / "model")
            assert stat.S_ISSOCK(os.lstat(served.socket()).st_mode) and not (run_dir / "oc_a" / gateway.SOCKET).exists()
            assert stat.S_IMODE(os.stat(node / "bot" / "model" / "oc_a").st_mode) == 0o755
            assert (await served.post())[0] == 200
            (run_dir / "oc_b").mkdir()
            await asyncio.to_thread(wait_until, lambda: served.socket("oc_b").exists(), 5, "oc_b's socket")
            (run_dir / "oc_b").rmdir()
            await asyncio.to_thread(wait_until, lambda: not (node / "bot" / "model" / "oc_b").exists(), 5,
                                    "oc_b's node folder gone")
        finally:
            await gw.close()
            store.close()

    asyncio.run(scenario())


@contextlib.asynccontextmanager
async def echoing_proxy() -> AsyncIterator[int]:
    """A TCP server on the loopback standing for a node's egress proxy: answers each piece with `echo:` and it;
    `slow` with five pieces 0.2 s apart; `bye` with `bye` and the end of its side."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while piece := await reader.read(65536):
            if piece == b"bye":
                writer.write(b"bye")
                break
            for _ in range(5 if piece == b"slow" else 1):
                if piece == b"slow":
                    await asyncio.sleep(0.2)
                writer.write(b"echo:" + piece)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def test_on_swarm_a_proxied_chats_egress_socket_is_relayed_to_the_nodes_proxy(
        short_dir: Path, upstream: FakeAnthropic, logs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Only while the chat's run folder holds the marker (its egress is an allowlist), and only MAX_RELAYED_PER_CHAT
    connections of a chat at once; the socket goes with the chat's folder."""
    monkeypatch.setattr(gateway, "MAX_RELAYED_PER_CHAT", 2)

    async def exchange(path: Path, data: bytes) -> bytes:
        """What comes back for `data` until the relay ends the connection; b"" when it closed it unread."""
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            writer.write(data)
            writer.write_eof()  # passed on: the proxy's side ends, and so does the answer
            return await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:  # closed with what was sent unread
            return b""
        finally:
            writer.close()

    async def scenario() -> None:
        run_dir, node = short_dir / "run", short_dir / "node"
        for chat_id in ("oc_a", "oc_b"):
            (run_dir / chat_id).mkdir(parents=True)
        (run_dir / "oc_a" / egress.PROXIED_MARKER).touch()
        async with echoing_proxy() as port:
            config = dataclasses.replace(config_of(run_dir, upstream.base_url), socket_dir=node, egress_port=port)
            store = Store(config.store_url)
            gw = Gateway(config, store, SECRET)
            await gw.start()
            try:
                sockets = {chat_id: node / chat_id / egress.EGRESS_SOCKET for chat_id in ("oc_a", "oc_b")}
                assert stat.S_IMODE(os.lstat(sockets["oc_a"]).st_mode) == 0o666
                assert await exchange(sockets["oc_a"], b"CONNECT pypi.org:443") == b"echo:CONNECT pypi.org:443"
                assert await exchange(sockets["oc_b"], b"GET http://pypi.org/") == b""  # egress none: closed
                held = [await asyncio.open_unix_connection(str(sockets["oc_a"])) for _ in range(2)]
                assert await exchange(sockets["oc_a"], b"third") == b""  # past its share: closed at once
                held[0][1].write(b"still")
                assert await asyncio.wait_for(held[0][0].read(10), 5) == b"echo:still"  # the two held go on
                for _, writer in held:
                    writer.close()
                await asyncio.to_thread(wait_until, lambda: not gw._relayed, 5, "the held connections ended")
                assert await exchange(sockets["oc_a"], b"again") == b"echo:again"
                monkeypatch.setattr(gateway, "RELAY_LINGER_SECONDS", 0.3)
                # a client that ended its side still gets an answer that keeps coming, however long in all
                assert await exchange(sockets["oc_a"], b"slow") == b"echo:slow" * 5
                # the proxy ended its side and the client never does: closed once nothing moved for the linger
                reader, writer = await asyncio.open_unix_connection(str(sockets["oc_a"]))
                writer.write(b"bye")
                assert await asyncio.wait_for(reader.read(), 5) == b"bye"
                await asyncio.to_thread(wait_until, lambda: not gw._relayed, 5, "the lingering connection closed")
                writer.close()
                monkeypatch.setattr(gateway, "MAX_RELAYED", 1)  # all chats' share, taken by another's connection
                gw._relayed["oc_c"] = 1
                assert await exchange(sockets["oc_a"], b"over all") == b""
                del gw._relayed["oc_c"]
                (run_dir / "oc_a" / egress.PROXIED_MARKER).unlink()  # its egress is no longer an allowlist
                assert await exchange(sockets["oc_a"], b"after") == b""
                (run_dir / "oc_b").rmdir()
                await asyncio.to_thread(wait_until, lambda: not sockets["oc_b"].exists(), 5, "oc_b's socket gone")
            finally:
                await gw.close()
                store.close()
        # the proxy not there: the connection closed, the operator told
        gw = Gateway(dataclasses.replace(config, egress_port=port), Store(config.store_url), SECRET)
        (run_dir / "oc_a" / egress.PROXIED_MARKER).touch()
        await gw.start()
        try:
            assert await exchange(node / "oc_a" / egress.EGRESS_SOCKET, b"x") == b""
        finally:
            await gw.close()
            gw.store.close()
        assert any("the node's egress proxy cannot be reached" in line and "oc_a" in line for line in logs)

    asyncio.run(scenario())


def test_an_egress_socket_that_cannot_be_made_is_said_once_and_made_at_a_later_scan(
        short_dir: Path, upstream: FakeAnthropic, logs: list[str]) -> None:
    async def scenario() -> None:
        run_dir, node = short_dir / "run", short_dir / "node"
        (run_dir / "oc_a").mkdir(parents=True)
        (node / "oc_a" / egress.EGRESS_SOCKET).mkdir(parents=True)  # in the way: neither unlinked nor bound over
        config = dataclasses.replace(config_of(run_dir, upstream.base_url), socket_dir=node, egress_port=9)
        gw = Gateway(config, Store(config.store_url), SECRET)
        await gw.start()
        try:
            assert "oc_a" in gw._sites and "oc_a" not in gw._relays  # the model socket is served all the same
            await gw.scan()
            assert sum("cannot serve the chat's egress socket" in line for line in logs) == 1
            (node / "oc_a" / egress.EGRESS_SOCKET).rmdir()
            await gw.scan()
            assert "oc_a" in gw._relays and stat.S_ISSOCK(os.lstat(node / "oc_a" / egress.EGRESS_SOCKET).st_mode)
        finally:
            await gw.close()
            gw.store.close()

    asyncio.run(scenario())


def test_one_host_serves_no_egress_socket(short_dir: Path, upstream: FakeAnthropic) -> None:
    """runtime: docker: agents reach the proxy on their network; the gateway relays nothing."""
    async def scenario() -> None:
        async with serving(short_dir, upstream.base_url) as served:
            (served.run_dir / "oc_a" / egress.PROXIED_MARKER).touch()
            assert served.socket().exists() and not (served.run_dir / "oc_a" / egress.EGRESS_SOCKET).exists()

    asyncio.run(scenario())


def test_a_stale_socket_is_replaced(short_dir: Path, upstream: FakeAnthropic) -> None:
    async def scenario() -> None:
        (short_dir / "run" / "oc_a").mkdir(parents=True)
        (short_dir / "run" / "oc_a" / gateway.SOCKET).write_text("left by a gateway before")
        async with serving(short_dir, upstream.base_url) as served:
            assert stat.S_ISSOCK(os.lstat(served.socket()).st_mode)
            assert (await served.post())[0] == 200

    asyncio.run(scenario())


# ---- the process: its settings file, and a kill -9 mid-stream ----

def test_the_settings_file_round_trips_and_is_the_roots_alone(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\ngateway: {{api_key: {KEY}, max_concurrent: 3}}\n"
                      "budgets: {per_user_monthly_usd: '12.5', timezone: Asia/Shanghai, reset_at: '04:00:30',\n"
                      "          prices: {claude-x: {input: 1, output: 2, cache_write: 3, cache_read: '0.1'}}}\n")
    settings = load_settings(config, {})
    (tmp_path / "data").mkdir()
    path = write_settings(settings)
    assert path == tmp_path / "data" / "gateway.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = read_settings(path)
    assert loaded.gateway == settings.gateway and loaded.budgets == settings.budgets
    assert (loaded.store_url, loaded.run_dir, loaded.secret_path, loaded.socket_dir) == (
        f"sqlite:///{settings.db_path}", layout.run_dir(settings), layout.secret_path(settings),
        layout.run_dir(settings))  # runtime: docker: the sockets in the run folders
    changed = replace(settings, budgets=replace(settings.budgets, per_chat_daily_usd=Decimal(1)))
    assert settings_digest(changed) != settings_digest(settings) == settings_digest(load_settings(config, {}))
    assert write_settings(changed) == path and read_settings(path).budgets.per_chat_daily_usd == Decimal(1)


def test_a_gateway_killed_mid_stream_leaves_what_was_streamed_counted(short_dir: Path,
                                                                      upstream: FakeAnthropic) -> None:
    data = short_dir / "data"
    config = short_dir / "c.yaml"
    config.write_text(f"data_dir: {data}\ngateway: {{upstream_url: '{upstream.base_url}', api_key: {KEY}}}\n"
                      f"budgets: {{prices: {{{MODEL}: {{input: 1, output: 2, cache_write: 3, cache_read: 4}}}}}}\n")
    settings = load_settings(config, {})
    layout.prepare_instance(settings)
    secret = credentials.load_or_make_secret(layout.secret_path(settings))
    (layout.run_dir(settings) / "oc_a").mkdir()
    Store(settings.db_path).close()
    process = subprocess.Popen([sys.executable, "-m", "orchestrator.gateway", str(write_settings(settings))],
                               stderr=subprocess.PIPE, text=True)
    socket_path = layout.run_dir(settings) / "oc_a" / gateway.SOCKET
    try:
        wait_until(lambda: socket_path.exists() or process.poll() is not None, 20, "the gateway's socket")
        assert process.poll() is None

        async def scenario() -> bytes:
            token = credentials.model_token(secret, "oc_a")
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket_path))) as session, \
                    session.post("http://g/v1/messages", json=body_of("TOKENS 5000 99 SLOW 30", max_tokens=1000),
                                 headers={"x-api-key": token}) as response:
                seen = b""
                while b"text_delta" not in seen:  # the first piece of the answer: the fake now waits 30 s
                    chunk = await asyncio.wait_for(response.content.readany(), 20)
                    assert chunk, f"the answer ended before its text: {response.status} {seen!r}"
                    seen += chunk
                os.kill(process.pid, signal.SIGKILL)
                with contextlib.suppress(aiohttp.ClientError):
                    seen += await response.content.read()
                return seen

        seen = asyncio.run(scenario())
        assert b"message_start" in seen and b"message_stop" not in seen
        assert process.wait(10) == -signal.SIGKILL
    finally:
        process.kill()
        stderr = process.communicate()[1]
    store = Store(settings.db_path)
    try:
        [row] = store.usage("oc_a")
    finally:
        store.close()
    # message_start's input, and the reservation's output: the gateway died before it knew what was streamed
    assert (row.input_tokens, row.output_tokens, row.complete) == (5000, 1000, False)
    assert row.cost_nano == Usage(MODEL, 5000, 1000).cost(PRICES) == 7_000_000
    assert "model gateway serving 1 chats" in stderr and KEY not in stderr


def test_on_swarm_the_gateway_is_the_registrys_image_with_the_nodes_folder(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"instance: bot\ndata_dir: {tmp_path / 'data'}\ngateway: {{api_key: {KEY}}}\nruntime: swarm\n"
                      "swarm: {orchestrator_image: reg:5000/orchestrator:1}\ndefaults: {egress: none}\n"
                      f"store: {{url: '{EXAMPLE_URL}'}}\n")
    settings = load_settings(config, {})
    spec = gateway_container_spec(settings, settings_digest(settings))
    assert spec.image == "reg:5000/orchestrator:1"
    assert spec.mounts[-1] == ("/var/lib/orchestrator", "/var/lib/orchestrator", False)
    assert layout.model_socket_dir(settings) == Path("/var/lib/orchestrator/bot/model")
    (tmp_path / "data").mkdir()
    assert read_settings(write_settings(settings)).socket_dir == Path("/var/lib/orchestrator/bot/model")


def test_the_gateway_container(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"instance: bot\ndata_dir: {tmp_path / 'data'}\ngateway: {{api_key: {KEY}}}\n")
    settings = load_settings(config, {})
    spec = gateway_container_spec(settings, settings_digest(settings))
    data = str(tmp_path / "data")
    assert (spec.name, spec.image, spec.network, spec.user) == ("bot-gateway", "orchestrator:latest", "host", "0:0")
    assert spec.command == ("python", "-m", "orchestrator.gateway", f"{data}/gateway.json")
    # the same paths: the settings name the store and the run folder; the settings and the secret read-only
    assert spec.mounts == ((data, data, False), (f"{data}/gateway.json", f"{data}/gateway.json", True),
                           (f"{data}/secret", f"{data}/secret", True))
    assert spec.labels[ROLE_LABEL] == "model-gateway" and CHAT_LABEL not in spec.labels
    assert spec.mem_limit == 384 * 1024**2 >= gateway.BODY_MEMORY + gateway.PARSE_MEMORY + 64 * 1024**2
    assert KEY not in json.dumps(dataclasses.asdict(spec))  # the key is in the settings file only
    changed = replace(settings, gateway=replace(settings.gateway, max_concurrent=2))
    assert gateway_container_spec(changed, settings_digest(changed)).fingerprint() != spec.fingerprint()


@contextlib.contextmanager
def locked(store: Store) -> Iterator[None]:
    """Another process holds the store (an exclusive transaction); the gateway's writes are refused at once (a busy
    timeout of 0.2 s, not 2 s) meanwhile."""
    store.db.execute_sql("pragma busy_timeout = 200")
    holder = sqlite3.connect(store.path, timeout=5, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_locked_store_neither_holds_nor_breaks_an_answer_and_its_usage_is_written_after(
        short_dir: Path, upstream: FakeAnthropic, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process holds the store while a stream ends: the answer reaches the client whole (a broken one would
    be asked again, and paid twice) and its row is written once the store takes writes again."""
    monkeypatch.setattr(gateway, "WRITE_RETRY_SECONDS", 0.2)

    async def scenario() -> None:
        async with serving(short_dir, upstream.base_url) as served:
            asking = asyncio.create_task(served.post("SLOW 1"))
            await asyncio.to_thread(wait_until, lambda: served.rows() == [(10, 100, False)], 10, "message_start")
            with locked(served.store):
                status, _, body = await asyncio.wait_for(asking, 20)
                assert status == 200 and b"message_stop" in body
            await served.rows_become([(10, 10, True)])

    asyncio.run(scenario())


def test_a_chat_is_served_however_deep_data_dir_is(short_dir: Path, upstream: FakeAnthropic) -> None:
    """A unix socket's name holds at most 107 bytes; the chat's full path here is far longer."""
    deep = short_dir / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)

    async def scenario() -> None:
        async with serving(deep, upstream.base_url) as served:
            assert len(str(served.socket())) > 108
            await asyncio.to_thread(wait_until, served.socket().exists, 10, "the socket")
            folder = os.open(served.socket().parent, os.O_PATH)  # the client reaches it by a short name too
            try:
                connector = aiohttp.UnixConnector(path=f"/proc/self/fd/{folder}/{gateway.SOCKET}")
                async with aiohttp.ClientSession(connector=connector) as session, session.post(
                        "http://gateway/v1/messages", json=body_of("deep"),
                        headers={"x-api-key": credentials.model_token(SECRET, "oc_a")}) as response:
                    assert response.status == 200 and b"message_stop" in await response.read()
            finally:
                os.close(folder)

    asyncio.run(scenario())


def test_a_request_waits_for_a_locked_store_rather_than_fail(short_dir: Path, upstream: FakeAnthropic,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway, "WRITE_RETRY_SECONDS", 0.2)

    async def scenario() -> None:
        async with serving(short_dir, upstream.base_url) as served:
            with locked(served.store):
                asking = asyncio.create_task(served.post("while locked"))
                await asyncio.sleep(1.5)  # the store is held this long: several admissions refused meanwhile
                assert not asking.done()
            status, _, body = await asyncio.wait_for(asking, 20)
            assert status == 200 and b"message_stop" in body
            assert served.rows() == [(10, 10, True)]

    asyncio.run(scenario())
