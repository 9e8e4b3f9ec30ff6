"""A chat's run folder, where the model gateway serves its socket (tests/unit/test_gateway.py serves it for real;
tests/acceptance: every turn reaches the fake model through it, and test_durability's kill -9 turns finish while the
service is down)."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from orchestrator import model_socket
from orchestrator.config import load_settings
from orchestrator.egress import PROXIED_MARKER
from orchestrator.model_socket import prepare_chat, wait_served


def test_a_chat_is_served_once_its_socket_is_there_and_its_folder_is_readable(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("instance: bot\n")
    settings = load_settings(config, {})
    (tmp_path / "data" / "run").mkdir(parents=True)
    folder = tmp_path / "data" / "run" / "oc_a"

    async def scenario() -> None:
        prepare_chat(settings, "oc_a", proxied=True)
        assert (folder / PROXIED_MARKER).is_file()  # on Swarm the gateway relays the chat's egress socket
        prepare_chat(settings, "oc_a", proxied=False)
        assert not (folder / PROXIED_MARKER).exists()  # no longer
        waiting = asyncio.ensure_future(wait_served(settings, "oc_a"))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # the gateway has not made its socket yet
        (folder / model_socket.SOCKET).touch()
        await asyncio.wait_for(waiting, 2)

    old = os.umask(0o077)
    try:
        asyncio.run(scenario())
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755  # the agent's uid must reach the socket


def test_serving_a_chat_gives_up_waiting_for_a_gateway_that_is_not_there(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_socket, "SOCKET_WAIT_SECONDS", 0.2)
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    settings = load_settings(config, {})
    (tmp_path / "data" / "run").mkdir(parents=True)
    prepare_chat(settings, "oc_a", proxied=False)
    asyncio.run(asyncio.wait_for(wait_served(settings, "oc_a"), 5))  # returns (and logs) instead of hanging
