from pathlib import Path

from orchestrator.config import load_settings, resolve_chat
from orchestrator.layout import chat_paths
from orchestrator.runtime import container_spec


def test_spec_from_resolved_settings(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("instance: bot\ndefaults: {cpus: 1.5, memory: 1g, pids_limit: 99, network: none}\n"
                      "groups: {oc_x: {cpus: 0.25}}\n")
    settings = load_settings(config, {})
    chat = resolve_chat(settings, "oc_x")
    paths = chat_paths(settings.data_dir, chat)
    spec = container_spec(settings, chat, paths, chat_name="Team X")
    assert spec.name == "bot-oc_x"
    assert spec.labels == {"orchestrator.managed": "true", "orchestrator.chat_id": "oc_x",
                           "orchestrator.instance": "bot", "orchestrator.chat_name": "Team X"}
    assert (spec.nano_cpus, spec.mem_limit, spec.pids_limit, spec.network) == (250_000_000, 1024**3, 99, "none")
    assert spec.user == "1000:1000"
    chat_dir = tmp_path / "data" / "chats" / "oc_x"
    assert dict(spec.mounts) == {str(chat_dir / "workspace"): "/workspace",
                                 str(chat_dir / "claude"): "/home/agent/.claude", str(chat_dir / "turns"): "/turns"}


def test_fingerprint_follows_caps_not_labels(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("groups: {oc_x: {memory: 1g}}\n")
    settings = load_settings(config, {})
    chat = resolve_chat(settings, "oc_x")
    paths = chat_paths(settings.data_dir, chat)
    base = container_spec(settings, chat, paths)
    assert container_spec(settings, chat, paths, chat_name="renamed").fingerprint() == base.fingerprint()
    other = resolve_chat(settings, "oc_y")
    assert container_spec(settings, other, chat_paths(settings.data_dir, other)).fingerprint() != base.fingerprint()
