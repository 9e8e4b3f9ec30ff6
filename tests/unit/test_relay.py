"""The model relay: which model URLs it carries, the container that serves it, and a chat's folder for it.

The relay's bytes are carried by socat in the relay container; tests/acceptance (every turn on the instance
network reaches the fake model through it, and test_durability's kill -9 turns finish while the service is down)
show that it works and outlives the orchestrator."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from orchestrator import relay
from orchestrator.config import load_settings, resolve_chat
from orchestrator.layout import chat_paths
from orchestrator.relay import loopback_target, prepare_chat, wait_served
from orchestrator.runtime import CHAT_LABEL, container_spec, relay_container_spec


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


def test_the_relay_container_serves_the_run_folder_from_the_hosts_network_without_a_chat(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("instance: bot\n")
    settings = load_settings(config, {})
    spec = relay_container_spec(settings, 4242)
    assert spec.name == "bot-relay" and spec.network == "host" and spec.user == "0:0"
    assert spec.command == ("model-relay", "4242", str(relay.MAX_CHAT_CONNECTIONS), str(relay.IDLE_SECONDS),
                            str(relay.RELAY_POLL_SECONDS))
    assert spec.mounts == ((str(tmp_path / "data" / "run"), "/relay", False),)
    assert CHAT_LABEL not in spec.labels and spec.labels["orchestrator.role"] == "model-relay"
    assert spec.image == settings.agent.image  # its socat; and rebuilt with the agent image
    assert spec.fingerprint() != relay_container_spec(settings, 4243).fingerprint()


def test_a_chat_is_served_once_its_socket_is_there_and_its_folder_is_readable(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("instance: bot\n")
    settings = load_settings(config, {})
    (tmp_path / "data" / "run").mkdir(parents=True)
    folder = tmp_path / "data" / "run" / "oc_a"

    async def scenario() -> None:
        prepare_chat(settings, "oc_a")
        waiting = asyncio.ensure_future(wait_served(settings, "oc_a"))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # the relay has not made its socket yet
        (folder / relay.SOCKET).touch()
        await asyncio.wait_for(waiting, 2)

    old = os.umask(0o077)
    try:
        asyncio.run(scenario())
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755  # the agent's uid must reach the socket


def test_serving_a_chat_gives_up_waiting_for_a_relay_that_is_not_there(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay, "SOCKET_WAIT_SECONDS", 0.2)
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    settings = load_settings(config, {})
    (tmp_path / "data" / "run").mkdir(parents=True)
    prepare_chat(settings, "oc_a")
    asyncio.run(asyncio.wait_for(wait_served(settings, "oc_a"), 5))  # returns (and logs) instead of hanging
    chat = resolve_chat(settings, "oc_a")
    spec = container_spec(settings, chat, chat_paths(settings, chat), relay_port=None)
    assert not any(target == "/run/orchestrator" for _, target, _ in spec.mounts)
