"""A chat's way to the model gateway: its run folder, root's, mounted read-only into its container, where the
gateway (`orchestrator.gateway`, a container of its own) serves the chat's socket and the container's main process
(agent-init) serves that socket on 127.0.0.1:MODEL_RELAY_PORT, the CLI's ANTHROPIC_BASE_URL.
"""

from __future__ import annotations

import asyncio
import os

from loguru import logger

from orchestrator import layout
from orchestrator.config import Settings
from orchestrator.egress import PROXIED_MARKER

SOCKET = "model.sock"
SOCKET_WAIT_SECONDS = 5.0


def prepare_chat(settings: Settings, chat_id: str, proxied: bool) -> None:
    """The chat's run folder (root's, read-only in its container): the gateway starts serving it within
    gateway.POLL_SECONDS, while the chat's container is made ready. It holds egress.PROXIED_MARKER while the chat's
    egress is an allowlist: on Swarm the gateway relays the chat's egress socket only then."""
    folder = layout.chat_run_dir(settings, chat_id)
    folder.mkdir(exist_ok=True)
    os.chmod(folder, 0o755, follow_symlinks=False)  # whatever the umask: the agent connects to the socket
    marker = folder / PROXIED_MARKER
    if proxied:
        marker.touch()
    else:
        marker.unlink(missing_ok=True)


async def wait_served(settings: Settings, chat_id: str) -> None:
    """Until the gateway listens in the chat's run folder (the CLI's first request would fail and be retried
    after a pause otherwise); a missing gateway is logged, not fatal. On Swarm the socket is on the chat's node,
    out of sight: the node is labelled for chats only while its gateway runs (runtime.ready_label)."""
    if layout.model_socket_dir(settings) != layout.run_dir(settings):
        return
    folder = layout.chat_run_dir(settings, chat_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SOCKET_WAIT_SECONDS
    while not (folder / SOCKET).exists():
        if loop.time() > deadline:
            logger.bind(chat_id=chat_id).warning("the model gateway does not serve this chat yet; is the "
                                                 f"{settings.instance}-gateway container running?")
            return
        await asyncio.sleep(0.05)
