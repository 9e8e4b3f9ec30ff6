"""The model gateway's cost: latency added to one model request (median, p95) and throughput, against calls
straight to the same fake Messages API, in one run. The real gateway (`python -m orchestrator.gateway`, as its
container runs it) on a chat's unix socket, with its store, token check, budget check and usage records; the
same client (aiohttp, streaming the answer to its end) on both paths.

    python -m bench.gateway [--quick]
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path

import aiohttp

from bench.common import compare, main
from orchestrator import credentials, layout
from orchestrator.config import BudgetSettings, GatewaySettings, Settings
from orchestrator.gateway import write_settings
from orchestrator.store import Store
from tests.fakes.anthropic import FakeAnthropic
from tests.harness import MODEL_KEY, wait_until

CHAT = "oc_bench"
CONCURRENCY = 8  # requests at once in the throughput runs (gateway.max_concurrent's default)
BODY = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": True,
                   "messages": [{"role": "user", "content": "hello"}]}).encode()
HEADERS = {"content-type": "application/json", "anthropic-version": "2023-06-01"}

Request = Callable[[aiohttp.ClientSession], Awaitable[None]]


def run(quick: bool) -> list[str]:
    samples, seconds = (30, 2.0) if quick else (400, 10.0)
    api = FakeAnthropic(api_key=MODEL_KEY).start()
    root = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    settings = Settings(source=root / "config.yaml", data_dir=root / "data",
                        gateway=GatewaySettings(upstream_url=api.base_url, api_key=MODEL_KEY),
                        budgets=BudgetSettings(per_chat_daily_usd=Decimal(10**6)))  # checked on every request
    layout.prepare_instance(settings)
    Store(settings.db_path).close()
    secret = credentials.load_or_make_secret(layout.secret_path(settings))
    (layout.chat_run_dir(settings, CHAT)).mkdir()
    gateway = subprocess.Popen([sys.executable, "-m", "orchestrator.gateway", str(write_settings(settings))],
                               stderr=subprocess.DEVNULL)
    socket = layout.chat_run_dir(settings, CHAT) / "model.sock"
    try:
        wait_until(socket.exists, 30, "the gateway's socket")
        direct = _client(None, api.base_url, MODEL_KEY)
        through = _client(str(socket), "http://gateway", credentials.model_token(secret, CHAT))
        lines = asyncio.run(_measure(direct, through, samples, seconds))
    finally:
        gateway.terminate()
        gateway.wait(10)
        api.stop()
    return lines


def _client(unix_socket: str | None, base_url: str, key: str) -> tuple[str | None, str, dict[str, str]]:
    return unix_socket, f"{base_url}/v1/messages", {**HEADERS, "x-api-key": key}


async def _measure(direct: tuple[str | None, str, dict[str, str]], through: tuple[str | None, str, dict[str, str]],
                   samples: int, seconds: float) -> list[str]:
    async with _session(direct) as plain, _session(through) as gated:
        ask_direct, ask_gated = _asker(direct), _asker(through)
        for _ in range(5):  # warm both paths (connections, the gateway's first store queries)
            await ask_direct(plain)
            await ask_gated(gated)
        latency_direct, latency_gated = [], []
        for _ in range(samples):  # alternated, so a noisy moment hits both
            latency_direct.append(await _timed(ask_direct, plain))
            latency_gated.append(await _timed(ask_gated, gated))
        rate_direct = await _throughput(ask_direct, plain, seconds)
        rate_gated = await _throughput(ask_gated, gated, seconds)
    added = sorted(g - d for g, d in zip(sorted(latency_gated), sorted(latency_direct), strict=True))
    return [
        *compare("gateway latency", latency_gated, latency_direct, None),
        f"gateway latency: added per request median={added[len(added) // 2] * 1000:.1f} ms "
        f"p95={added[int(len(added) * 0.95)] * 1000:.1f} ms (streamed answers read to their end)",
        f"gateway throughput: {rate_gated:.0f} req/s through the gateway, {rate_direct:.0f} req/s direct "
        f"(concurrency {CONCURRENCY}); ratio={rate_gated / rate_direct:.2f}x of direct",
    ]


def _session(client: tuple[str | None, str, dict[str, str]]) -> aiohttp.ClientSession:
    unix_socket = client[0]
    connector = aiohttp.UnixConnector(path=unix_socket) if unix_socket else aiohttp.TCPConnector()
    return aiohttp.ClientSession(connector=connector)


def _asker(client: tuple[str | None, str, dict[str, str]]) -> Request:
    _, url, headers = client

    async def ask(session: aiohttp.ClientSession) -> None:
        async with session.post(url, data=BODY, headers=headers) as response:
            assert response.status == 200, await response.text()
            body = await response.read()
            assert b"message_stop" in body

    return ask


async def _timed(ask: Request, session: aiohttp.ClientSession) -> float:
    began = time.monotonic()
    await ask(session)
    return time.monotonic() - began


async def _throughput(ask: Request, session: aiohttp.ClientSession, seconds: float) -> float:
    deadline = time.monotonic() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await ask(session)
            done += 1

    began = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done / (time.monotonic() - began)


if __name__ == "__main__":
    main(run, __doc__ or "")
