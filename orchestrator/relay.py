"""The model relay: agents on a closed network reach a model API that the operator runs on the host's loopback.

When `agent.env.ANTHROPIC_BASE_URL` names a loopback address (a local gateway, or the tests' fake), an agent
on the instance network cannot reach it: the host is closed to it. The orchestrator then listens on a unix
socket in a root-owned folder mounted read-only into each container, and the container's main process
(agent-init) serves that socket on the same loopback port inside the container, so the CLI's URL is
unchanged. The relay carries bytes to that one address only; nothing an agent sends can choose another.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
from pathlib import Path
from urllib.parse import urlsplit

from loguru import logger

MAX_CONNECTIONS = 256  # at once, over all chats: a flood of connections cannot exhaust the orchestrator
CHUNK = 64 * 1024


def loopback_target(base_url: str | None) -> tuple[str, int] | None:
    """(host, port) when the model API's URL is plain HTTP on a loopback address; None otherwise. Pure."""
    if not base_url:
        return None
    url = urlsplit(base_url)
    if url.scheme != "http" or not url.hostname:
        return None
    host = url.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        port = url.port or 80  # ValueError when it is not a port number
    except ValueError:
        return None
    return (host, port) if loopback else None


class ModelRelay:
    def __init__(self, socket_path: Path, target: tuple[str, int]) -> None:
        self.socket_path = socket_path
        self.target = target
        self._server: asyncio.base_events.Server | None = None
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path))
        os.chmod(self.socket_path, 0o666)  # the agent's uid connects; the folder is read-only to it
        logger.info(f"relaying agents' model requests to {self.target[0]}:{self.target[1]}")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._slots.locked():
            writer.close()
            return
        async with self._slots:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError as exc:
                logger.warning(f"model relay: the model API at {self.target[0]}:{self.target[1]} refused: {exc}")
                writer.close()
                return
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                for side in (writer, up_writer):
                    side.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()  # back-pressure: a slow side holds the other, memory stays bounded
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, OSError):
            if writer.can_write_eof():
                writer.write_eof()  # the other way may still carry the answer
