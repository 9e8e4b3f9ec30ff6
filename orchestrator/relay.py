"""The model relay: agents on a closed network reach a model API that the operator runs on the host's loopback.

When `agent.env.ANTHROPIC_BASE_URL` names a loopback address (a local gateway, or the tests' fake), an agent
on the instance network cannot reach it: the host is closed to it. So each chat gets a unix socket in a
root-owned run folder of its own, mounted read-only into its container, where the container's main process
(agent-init) serves it on the same loopback port, and the CLI's URL is unchanged.

The sockets are served by the instance's relay container (`<instance>-relay`: the agent image's socat, host
network, root without capabilities, read-only), not by the orchestrator's process: a turn's model requests
must go on while the orchestrator restarts or is killed (invariant 2). Per chat socket, socat serves at most
MAX_CHAT_CONNECTIONS at once (one chat cannot take the others' share) and closes a connection after
IDLE_SECONDS without a byte either way. It carries bytes to that one address only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from urllib.parse import urlsplit

from loguru import logger

from orchestrator import layout
from orchestrator.config import Settings

MAX_CHAT_CONNECTIONS = 32  # at once, per chat (the CLI uses a few)
IDLE_SECONDS = 300  # a connection without a byte either way this long is closed (the API pings every few s)
SOCKET = "model.sock"
RELAY_POLL_SECONDS = 0.2  # how often the relay container looks for new chat folders (a shell loop: cheap)
SOCKET_WAIT_SECONDS = 5.0


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


def relay_command(port: int) -> tuple[str, ...]:
    """What the relay container runs (images/claude-runner/model-relay). Pure."""
    return ("model-relay", str(port), str(MAX_CHAT_CONNECTIONS), str(IDLE_SECONDS), str(RELAY_POLL_SECONDS))


def prepare_chat(settings: Settings, chat_id: str) -> None:
    """The chat's run folder (root's, read-only in its container): the relay starts serving it within
    RELAY_POLL_SECONDS, while the chat's container is made ready."""
    folder = layout.chat_run_dir(settings, chat_id)
    folder.mkdir(exist_ok=True)
    os.chmod(folder, 0o755, follow_symlinks=False)  # whatever the umask: the agent connects to the socket


async def wait_served(settings: Settings, chat_id: str) -> None:
    """Until the relay listens in the chat's run folder (the CLI's first request would fail and be retried
    after a pause otherwise); a missing relay is logged, not fatal."""
    folder = layout.chat_run_dir(settings, chat_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SOCKET_WAIT_SECONDS
    while not (folder / SOCKET).exists():
        if loop.time() > deadline:
            logger.bind(chat_id=chat_id).warning("the model relay does not serve this chat yet; is the "
                                                 f"{settings.instance}-relay container running?")
            return
        await asyncio.sleep(0.05)
