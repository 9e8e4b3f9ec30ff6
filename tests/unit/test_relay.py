"""The model relay: a unix socket that carries bytes to one loopback address, both ways, with bounds."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from orchestrator import relay
from orchestrator.relay import ModelRelay, loopback_target

TIMEOUT = 10.0
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.mark.parametrize(("url", "target"), [
    ("http://127.0.0.1:8080/v1", ("127.0.0.1", 8080)),
    ("http://127.0.0.1:8080", ("127.0.0.1", 8080)),
    ("http://127.5.6.7:9", ("127.5.6.7", 9)),
    ("http://localhost", ("localhost", 80)),
    ("http://LOCALHOST:3000/", ("localhost", 3000)),
    ("http://[::1]:4000", ("::1", 4000)),
    ("https://127.0.0.1:8443", None),  # TLS to loopback: the relay carries plain HTTP only
    ("http://api.anthropic.example", None),
    ("https://api.anthropic.com", None),
    ("http://10.0.0.5:8080", None),
    ("http://169.254.169.254/", None),
    ("http://127.0.0.1:99999", None),  # not a port: no relay (and no crash at start)
    ("http://127.0.0.1:port", None),
    ("127.0.0.1:8080", None),
    ("", None),
    (None, None),
])
def test_loopback_target(url: str | None, target: tuple[str, int] | None) -> None:
    assert loopback_target(url) == target


async def serve_upstream(handler: Handler) -> tuple[asyncio.base_events.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def echo_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers once the request has ended (the client's half-close), like a server reading a whole body."""
    data = await reader.read()
    writer.write(b"echo:" + data)
    await writer.drain()
    writer.close()


def run(coroutine: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coroutine, TIMEOUT))


def test_bytes_go_both_ways_with_half_close(tmp_path: Path) -> None:
    async def scenario() -> None:
        upstream, port = await serve_upstream(echo_after_eof)
        socket_path = tmp_path / "model.sock"
        socket_path.write_text("stale")  # left by an earlier run: replaced
        model_relay = ModelRelay(socket_path, ("127.0.0.1", port))
        await model_relay.start()
        assert stat.S_ISSOCK(socket_path.stat().st_mode)
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o666
        payload = os.urandom(3 * 1024**2)  # many chunks: carried with back-pressure, whole
        for _ in range(2):  # one connection after another
            reader, writer = await asyncio.open_unix_connection(str(socket_path))
            writer.write(payload)
            await writer.drain()
            writer.write_eof()  # the request ends; the answer must still come back
            assert await reader.read() == b"echo:" + payload
            writer.close()
        await model_relay.stop()
        upstream.close()

    run(scenario())


def test_the_upstream_may_speak_first(tmp_path: Path) -> None:
    async def greet_then_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello\n")
        await writer.drain()
        while line := await reader.readline():
            writer.write(line.upper())
            await writer.drain()
        writer.close()

    async def scenario() -> None:
        upstream, port = await serve_upstream(greet_then_echo)
        model_relay = ModelRelay(tmp_path / "model.sock", ("127.0.0.1", port))
        await model_relay.start()
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "model.sock"))
        assert await reader.readline() == b"hello\n"
        for word in (b"one\n", b"two\n"):
            writer.write(word)
            assert await reader.readline() == word.upper()
        writer.write_eof()
        assert await reader.read() == b""
        writer.close()
        await model_relay.stop()
        upstream.close()

    run(scenario())


def test_an_unreachable_upstream_closes_the_connection(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def scenario() -> None:
        model_relay = ModelRelay(tmp_path / "model.sock", ("127.0.0.1", port))
        await model_relay.start()
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "model.sock"))
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        assert await reader.read() == b""
        writer.close()
        await model_relay.stop()

    run(scenario())


def test_connections_beyond_the_cap_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(relay, "MAX_CONNECTIONS", 2)

    async def scenario() -> None:
        arrived = asyncio.Queue[asyncio.StreamWriter]()

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await arrived.put(writer)
            await reader.read()
            writer.close()

        upstream, port = await serve_upstream(hold)
        model_relay = ModelRelay(tmp_path / "model.sock", ("127.0.0.1", port))
        await model_relay.start()
        held = []
        for _ in range(2):
            held.append(await asyncio.open_unix_connection(str(tmp_path / "model.sock")))
            await arrived.get()  # relayed: it holds a slot
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "model.sock"))
        assert await reader.read() == b""  # closed at once: no slot
        assert arrived.empty()  # and never carried upstream
        writer.close()
        held_writer = held.pop()[1]
        held_writer.close()  # a slot is freed
        await held_writer.wait_closed()
        while True:  # the relay frees the slot once both ways have ended (a condition, not a timed assertion)
            reader, writer = await asyncio.open_unix_connection(str(tmp_path / "model.sock"))
            refused, carried = asyncio.ensure_future(reader.read()), asyncio.ensure_future(arrived.get())
            await asyncio.wait({refused, carried}, return_when=asyncio.FIRST_COMPLETED)
            if carried.done():
                break
            carried.cancel()
            writer.close()
            await asyncio.sleep(0.05)
        await model_relay.stop()
        upstream.close()

    run(scenario())
