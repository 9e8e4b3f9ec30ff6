from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from orchestrator import credentials
from orchestrator.config import Settings, load_settings, resolve_chat
from orchestrator.layout import chat_paths
from orchestrator.runtime import (
    MODEL_PORT,
    ContainerSpec,
    bridge_name,
    container_spec,
    egress_proxy_spec,
    gateway_container_spec,
    network_name,
)

MiB = 1024**2


def settings_of(tmp_path: Path, text: str) -> Settings:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    return load_settings(config, {})


SECRET = b"k" * 32


def spec_of(settings: Settings, chat_id: str = "oc_x", chat_name: str = "", secret: bytes = SECRET) -> ContainerSpec:
    chat = resolve_chat(settings, chat_id)
    return container_spec(settings, chat, chat_paths(settings, chat), secret, chat_name=chat_name)


def test_spec_from_resolved_settings(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, "instance: bot\ndefaults: {cpus: 1.5, memory: 1g, pids_limit: 99, network: none}\n"
                                     "groups: {oc_x: {cpus: 0.25}}\n")
    spec = spec_of(settings, chat_name="Team X")
    assert spec.name == "bot-oc_x"
    assert spec.labels == {"orchestrator.managed": "true", "orchestrator.chat_id": "oc_x",
                           "orchestrator.instance": "bot", "orchestrator.chat_name": "Team X"}
    assert (spec.nano_cpus, spec.mem_limit, spec.pids_limit, spec.network) == (250_000_000, 1024**3, 99, "none")
    assert spec.user == "1000:1000"
    chat_dir = tmp_path / "data" / "chats" / "oc_x"
    assert spec.mounts == ((str(chat_dir / "workspace"), "/workspace", False),
                           (str(chat_dir / "claude"), "/home/agent/.claude", False),
                           (str(chat_dir / "turns"), "/turns", False),
                           (str(chat_dir / "input"), "/input", True),
                           (str(tmp_path / "data" / "run" / "oc_x"), "/run/orchestrator", True))  # its gateway socket


def test_chats_dir_places_the_chat_folders(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, "chats_dir: /srv/chats\n")
    mounts = {target: (source, read_only) for source, target, read_only in spec_of(settings).mounts}
    assert mounts["/turns"] == ("/srv/chats/oc_x/turns", False)
    assert mounts["/input"] == ("/srv/chats/oc_x/input", True)
    assert mounts["/workspace"] == ("/srv/chats/oc_x/workspace", False)


def test_hardening_tmpfs_and_ulimits(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, "defaults: {disk: 2g, tmp_size: 64m}\ngroups: {oc_y: {disk: 500m}}\n")
    spec = spec_of(settings)
    tmpfs = dict(spec.tmpfs)
    assert set(tmpfs) == {"/tmp", "/home/agent"}
    for options in tmpfs.values():
        assert {"nosuid", "nodev"} <= set(options.split(","))
    assert f"size={64 * MiB}" in tmpfs["/tmp"].split(",")
    assert "uid=1000" in tmpfs["/home/agent"].split(",")
    ulimits = dict(spec.ulimits)
    assert ulimits["fsize"] == 2 * 1024**3 and ulimits["core"] == 0 and ulimits["nofile"] > 0
    assert dict(spec_of(settings, "oc_y").ulimits)["fsize"] == 500 * MiB


@pytest.mark.parametrize(("config", "network"), [
    ("", "orchestrator-agents"),
    ("instance: bot\n", "bot-agents"),
    ("defaults: {network: instance}\n", "orchestrator-agents"),
    ("defaults: {network: none}\n", "none"),
    ("defaults: {network: host, unsafe_network: true}\n", "host"),
    ("groups: {oc_x: {network: 'container:proxy', unsafe_network: true}}\n", "container:proxy"),
])
def test_network(tmp_path: Path, config: str, network: str) -> None:
    assert spec_of(settings_of(tmp_path, config)).network == network


def test_network_and_bridge_names() -> None:
    assert network_name("orchestrator") == "orchestrator-agents"
    names = {bridge_name(instance) for instance in ("orchestrator", "staging", "t1234abcd")}
    assert len(names) == 3 and all(len(name) <= 15 for name in names)  # the kernel's limit for an interface


@pytest.mark.parametrize("network", ["instance", "none"])
def test_the_agent_reaches_the_gateway_on_its_loopback_with_its_chats_token(tmp_path: Path, network: str) -> None:
    settings = settings_of(tmp_path, f"defaults: {{network: {network}}}\n")
    env = dict(spec_of(settings).environment)
    assert env["ANTHROPIC_BASE_URL"] == f"http://127.0.0.1:{MODEL_PORT}" and env["MODEL_RELAY_PORT"] == str(MODEL_PORT)
    assert env["ANTHROPIC_API_KEY"] == credentials.model_token(SECRET, "oc_x")
    assert dict(spec_of(settings, "oc_y").environment)["ANTHROPIC_API_KEY"] != env["ANTHROPIC_API_KEY"]
    assert dict(spec_of(settings, secret=b"j" * 32).environment)["ANTHROPIC_API_KEY"] != env["ANTHROPIC_API_KEY"]


def test_on_the_host_network_each_chat_has_its_own_model_port(tmp_path: Path) -> None:
    """Chats on the host's network share its loopback: one port for all would let a chat's relay serve another's."""
    settings = settings_of(tmp_path, "defaults: {network: host, unsafe_network: true}\n")
    ports = {dict(spec_of(settings, f"oc_{n}").environment)["MODEL_RELAY_PORT"] for n in range(20)}
    assert len(ports) == 20 and all(int(port) >= 20000 for port in ports)
    assert ports == {dict(spec_of(settings, f"oc_{n}").environment)["MODEL_RELAY_PORT"] for n in range(20)}


def test_fingerprint_follows_caps_not_labels(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, "groups: {oc_x: {memory: 1g}}\n")
    base = spec_of(settings)
    assert spec_of(settings, chat_name="renamed").fingerprint() == base.fingerprint()
    assert spec_of(settings, "oc_y").fingerprint() != base.fingerprint()
    assert spec_of(settings, secret=b"j" * 32).fingerprint() != base.fingerprint()  # a new secret: new tokens
    for change in ("{memory: 1g, tmp_size: 32m}", "{memory: 1g, disk: 1g}", "{memory: 1g, network: none}"):
        other = settings_of(tmp_path, f"groups: {{oc_x: {change}}}\n")
        assert spec_of(other).fingerprint() != base.fingerprint(), change


def test_only_the_instances_own_services_restart_by_themselves(tmp_path: Path) -> None:
    """The gateway and the proxy come back at once when they die (the engine restarts them); a chat's container
    does not (the orchestrator decides when a chat runs), and its fingerprint is what it was before `restart`."""
    settings = settings_of(tmp_path, "")
    services = (gateway_container_spec(settings, "d1"), egress_proxy_spec(settings, "d2"))
    assert [service.restart for service in services] == ["unless-stopped"] * 2
    chat = spec_of(settings)
    assert chat.restart == ""
    assert chat.fingerprint() == dataclasses.replace(chat, restart="").fingerprint()
    assert dataclasses.replace(chat, restart="always").fingerprint() != chat.fingerprint()
