from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.config import ChatOptions, ConfigError, load_settings, resolve_chat

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, config: dict | str) -> Path:
    path = tmp_path / "bot.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def error_of(tmp_path: Path, config: dict | str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, config), environ or {})
    return str(caught.value)


def test_the_shipped_example_config_loads() -> None:
    settings = load_settings(REPO / "config.yaml", {})
    assert settings.data_dir == REPO / "data"
    assert settings.agent.env == {}  # every ${VAR:-} in it is empty here, so nothing is passed on
    assert not settings.feishu.configured


def test_empty_config_gives_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, ""), {})
    assert settings.data_dir == tmp_path / "data"
    assert settings.defaults == ChatOptions()
    assert settings.feishu.domain == "https://open.feishu.cn"
    assert settings.feishu.mode == "websocket"
    assert not settings.access.allows("oc_any", "ou_any")


def test_env_interpolation_with_and_without_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {
        "data_dir": "${ROOT}/state",
        "agent": {"env": {"ANTHROPIC_API_KEY": "${KEY}", "ANTHROPIC_BASE_URL": "${URL:-http://gw.local}",
                          "EMPTY": "${NOPE:-}"}},
    }), {"ROOT": "/srv/bot", "KEY": "sk-1"})
    assert settings.data_dir == Path("/srv/bot/state")
    assert settings.agent.env == {"ANTHROPIC_API_KEY": "sk-1", "ANTHROPIC_BASE_URL": "http://gw.local"}


def test_group_settings_override_defaults_for_one_chat(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {
        "defaults": {"cpus": 2, "memory": "1g", "pids_limit": 100, "network": "none"},
        "groups": {"oc_big": {"memory": "1.5G", "cpus": 0.5}},
    }), {})
    big = resolve_chat(settings, "oc_big")
    other = resolve_chat(settings, "oc_other")
    assert big.options == ChatOptions(cpus=0.5, memory=int(1.5 * 1024**3), pids_limit=100, network="none")
    assert other.options == ChatOptions(cpus=2.0, memory=1024**3, pids_limit=100, network="none")
    assert other.workspace == tmp_path / "data" / "chats" / "oc_other" / "workspace"


def test_workspace_template(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {
        "defaults": {"workspace": "/srv/ws/{chat_id}"}, "groups": {"oc_repo": {"workspace": "/srv/repo"}},
    }), {})
    assert resolve_chat(settings, "oc_a").workspace == Path("/srv/ws/oc_a")
    assert resolve_chat(settings, "oc_repo").workspace == Path("/srv/repo")


def test_memory_sizes(tmp_path: Path) -> None:
    for value, expected in (("512m", 512 * 1024**2), ("2g", 2 * 1024**3), ("64M", 64 * 1024**2),
                            (100_000_000, 100_000_000), ("10000k", 10000 * 1024)):
        settings = load_settings(write(tmp_path, {"defaults": {"memory": value}}), {})
        assert settings.defaults.memory == expected


@pytest.mark.parametrize(("config", "key", "problem"), [
    ({"defaults": {"memory": "2gb"}}, "defaults.memory", "is not a size"),
    ({"defaults": {"memory": "lots"}}, "defaults.memory", "is not a size"),
    ({"defaults": {"memory": "1m"}}, "defaults.memory", "minimum"),
    ({"defaults": {"cpus": -1}}, "defaults.cpus", "above 0"),
    ({"defaults": {"cpus": "two"}}, "defaults.cpus", "above 0"),
    ({"defaults": {"pids_limit": 1.5}}, "defaults.pids_limit", "whole number"),
    ({"defaults": {"workspace": "/srv/shared"}}, "defaults.workspace", "{chat_id}"),
    ({"groups": {"../etc": {"cpus": 1}}}, "groups.../etc", "not a valid chat id"),
    ({"groups": {"oc_a": {"memroy": "1g"}}}, "groups.oc_a.memroy", "unknown key"),
    ({"groups": {"oc_a": {"memory": "2gb"}}}, "groups.oc_a.memory", "is not a size"),
    ({"agnet": {}}, "agnet", "unknown key"),
    ({"agent": {"permission_mode": "yolo"}}, "agent.permission_mode", "is not one of"),
    ({"agent": {"extra_args": ["--resume=abc"]}}, "agent.extra_args", "set by the orchestrator"),
    ({"agent": {"env": ["A=1"]}}, "agent.env", "must map"),
    ({"agent": {"idle_timeout": 0}}, "agent.idle_timeout", "above 0"),
    ({"access": {"allowed_chats": ["oc ok"]}}, "access.allowed_chats", "not a valid chat id"),
    ({"feishu": {"mode": "polling"}}, "feishu.mode", "is not one of"),
    ({"feishu": {"app_key": "x"}}, "feishu.app_key", "unknown key"),
    ({"instance": "my bot"}, "instance", "letters, digits"),
    ({"defaults": ["cpus"]}, "defaults", "must be a mapping"),
])
def test_bad_values_name_the_file_and_the_key(tmp_path: Path, config: dict, key: str, problem: str) -> None:
    message = error_of(tmp_path, config)
    assert message.startswith(f"bot.yaml: {key}: ")
    assert problem in message


def test_missing_environment_variable_names_the_key(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"feishu": {"app_secret": "${FEISHU_SECRET}"}})
    assert message == "bot.yaml: feishu.app_secret: ${FEISHU_SECRET} is not set in the environment"
    message = error_of(tmp_path, {"agent": {"env": {"ANTHROPIC_API_KEY": "${KEY}"}}})
    assert message.startswith("bot.yaml: agent.env.ANTHROPIC_API_KEY: ${KEY} is not set")


def test_broken_yaml_and_missing_file(tmp_path: Path) -> None:
    assert "not valid YAML" in error_of(tmp_path, "defaults: [unclosed")
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.yaml", {})


def test_access_is_deny_by_default_and_star_allows_all(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {"access": {"allowed_chats": ["oc_a"], "allowed_users": "*"}}), {})
    assert settings.access.allows("oc_a", "ou_anyone")
    assert not settings.access.allows("oc_b", "ou_anyone")
    settings = load_settings(write(tmp_path, {"access": {"allowed_chats": "*", "allowed_users": ["ou_1"]}}), {})
    assert settings.access.allows("oc_b", "ou_1")
    assert not settings.access.allows("oc_b", "ou_2")


def test_config_check_command_reports_and_exits_non_zero(tmp_path: Path) -> None:
    bad = write(tmp_path, {"defaults": {"memory": "2gb"}})
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "config", "check", "--config", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "bot.yaml: defaults.memory: '2gb' is not a size" in result.stderr
    good = subprocess.run([sys.executable, "-m", "orchestrator.cli", "config", "check", "--config",
                           str(REPO / "config.yaml")], capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr


def test_run_without_credentials_says_what_to_set(tmp_path: Path) -> None:
    config = write(tmp_path, {"agent": {"env": {}}})
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert "No credentials for Claude: set ANTHROPIC_API_KEY" in result.stderr


def test_numbers_booleans_and_list_items_from_the_environment(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {
        "defaults": {"cpus": "${CPUS:-2}", "pids_limit": "${PIDS}", "require_mention": "${MENTION}"},
        "access": {"allowed_chats": ["${CHAT}", "oc_fixed"]},
        "metrics": {"listen": "[::1]:9464"},
    }), {"PIDS": "64", "MENTION": "false", "CHAT": "oc_from_env"})
    assert (settings.defaults.cpus, settings.defaults.pids_limit, settings.defaults.require_mention) == (2.0, 64, False)
    assert settings.access.allowed_chats == ("oc_from_env", "oc_fixed")
    message = error_of(tmp_path, {"defaults": {"pids_limit": "${PIDS}"}}, {"PIDS": "many"})
    assert message == "bot.yaml: defaults.pids_limit: 'many' must be a whole number above 0"
