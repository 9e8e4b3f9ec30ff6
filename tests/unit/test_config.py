from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from orchestrator.config import (
    DEFAULT_EGRESS_ALLOW,
    DEFAULT_PRICES,
    ChatOptions,
    ConfigError,
    Egress,
    load_settings,
    resolve_chat,
)

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
        "agent": {"env": {"DEPLOY_TOKEN": "${KEY}", "REGION": "${REGION:-eu}", "EMPTY": "${NOPE:-}"}},
        "gateway": {"api_key": "${KEY}", "upstream_url": "${URL:-http://gw.local/}"},
    }), {"ROOT": "/srv/bot", "KEY": "sk-1"})
    assert settings.data_dir == Path("/srv/bot/state")
    assert settings.agent.env == {"DEPLOY_TOKEN": "sk-1", "REGION": "eu"}
    assert (settings.gateway.api_key, settings.gateway.upstream_url) == ("sk-1", "http://gw.local")


@pytest.mark.parametrize("name", ["ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "CLAUDE_CODE_OAUTH_TOKEN", "HTTPS_PROXY"])
def test_agent_env_may_not_set_the_model_credentials_or_the_proxy(tmp_path: Path, name: str) -> None:
    message = error_of(tmp_path, {"agent": {"env": {name: "value"}}})
    assert message.startswith(f"bot.yaml: agent.env.{name}: is set by the orchestrator")
    assert "gateway.api_key" in message
    assert load_settings(write(tmp_path, {"agent": {"env": {name: ""}}}), {}).agent.env == {}  # empty: dropped


def test_gateway_budget_and_egress_values(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {
        "gateway": {"auth_token": "tok", "max_request_bytes": "1m", "request_timeout": 30, "max_concurrent": 2},
        "budgets": {"per_chat_daily_usd": "2.50", "instance_monthly_usd": 100, "timezone": "Asia/Shanghai",
                    "reset_at": "06:30:15", "footer": False,
                    "prices": {"claude-fake": {"input": 1, "output": 2, "cache_write": "1.25", "cache_read": 0.1}}},
        "defaults": {"egress": {"allow": ["pypi.org", "*.example.com"]}},
        "groups": {"oc_open": {"egress": "open"}, "oc_none": {"egress": "none"}},
    }), {})
    assert settings.gateway.configured and settings.gateway.max_request_bytes == 1024**2
    assert settings.budgets.per_chat_daily_usd == Decimal("2.50") and settings.budgets.per_user_daily_usd is None
    assert (settings.budgets.timezone, settings.budgets.reset_at, settings.budgets.footer) == (
        "Asia/Shanghai", "06:30:15", False)
    assert settings.budgets.prices["claude-fake"].cache_read == Decimal("0.1")
    assert settings.budgets.prices["claude-sonnet-4"] == DEFAULT_PRICES["claude-sonnet-4"]  # merged over defaults
    assert settings.defaults.egress == Egress("allowlist", ("pypi.org", "*.example.com"))
    assert resolve_chat(settings, "oc_open").options.egress.mode == "open"
    assert resolve_chat(settings, "oc_none").options.egress.mode == "none"
    assert resolve_chat(settings, "oc_other").options.egress.allow == ("pypi.org", "*.example.com")
    assert ChatOptions().egress.allow == DEFAULT_EGRESS_ALLOW and "pypi.org" in DEFAULT_EGRESS_ALLOW


@pytest.mark.parametrize(("section", "problem"), [
    ({"gateway": {"upstream_url": "ftp://x"}}, "gateway.upstream_url: 'ftp://x' must be an http:// or https:// URL"),
    ({"budgets": {"per_chat_daily_usd": -1}}, "budgets.per_chat_daily_usd: -1 must be an amount in USD, 0 or more"),
    ({"budgets": {"per_user_daily_usd": "lots"}}, "budgets.per_user_daily_usd: 'lots' must be an amount in USD"),
    ({"budgets": {"timezone": "Mars/Olympus"}}, "budgets.timezone: 'Mars/Olympus' is not a known time zone"),
    ({"budgets": {"reset_at": "24:00"}}, "budgets.reset_at: '24:00' must be a time of day"),
    ({"budgets": {"prices": {"m": {"input": 1}}}}, "budgets.prices.m: needs output, cache_write, cache_read"),
    ({"budgets": {"prices": {"m": {"input": 1, "output": 1, "cache_write": 1, "cache_read": 1, "x": 1}}}},
     "budgets.prices.m.x: unknown key"),
    ({"defaults": {"egress": "closed"}}, "defaults.egress: 'closed' must be open, none, or a mapping"),
    ({"defaults": {"egress": {"allow": ["evil.com\nhttp_access allow all"]}}}, "is not a domain"),
    ({"defaults": {"egress": {"allow": ["Example.COM"]}}}, "is not a domain"),
    ({"groups": {"oc_a": {"egress": {"deny": ["x.com"]}}}}, "groups.oc_a.egress: {'deny': ['x.com']} must be"),
])
def test_bad_gateway_budget_and_egress_values_name_the_key(tmp_path: Path, section: dict, problem: str) -> None:
    assert problem in error_of(tmp_path, section)


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
    ({"defaults": {"workspace": "chats/{chat_id}"}}, "defaults.workspace", "a folder of the service's"),
    ({"defaults": {"workspace": "chats/{chat_id}-ws"}}, "defaults.workspace", "a folder of the service's"),
    ({"defaults": {"workspace": "run/{chat_id}"}}, "defaults.workspace", "a folder of the service's"),
    ({"groups": {"oc_a": {"workspace": "."}}}, "groups.oc_a.workspace", "a folder of the service's"),
    ({"groups": {"oc_a": {"workspace": "/"}}}, "groups.oc_a.workspace", "a folder of the service's"),
    ({"groups": {"../etc": {"cpus": 1}}}, "groups.../etc", "not a valid chat id"),
    ({"groups": {"oc_a": {"memroy": "1g"}}}, "groups.oc_a.memroy", "unknown key"),
    ({"groups": {"oc_a": {"memory": "2gb"}}}, "groups.oc_a.memory", "is not a size"),
    ({"agnet": {}}, "agnet", "unknown key"),
    ({"defaults": {"permission_mode": "yolo"}}, "defaults.permission_mode", "is not one of"),
    ({"agent": {"permission_mode": "default"}}, "agent.permission_mode", "moved to defaults.permission_mode"),
    ({"groups": {"oc_a": {"approvers": ["alice"]}}}, "groups.oc_a.approvers", "is not a Feishu open id"),
    ({"defaults": {"auto_allow": ["Bash(ls"]}}, "defaults.auto_allow", "is not a permission rule"),
    ({"defaults": {"approval_timeout": 0}}, "defaults.approval_timeout", ""),
    ({"agent": {"extra_args": ["--resume=abc"]}}, "agent.extra_args", "set by the orchestrator"),
    ({"agent": {"env": ["A=1"]}}, "agent.env", "must map"),
    ({"agent": {"idle_timeout": 0}}, "agent.idle_timeout", "above 0"),
    ({"access": {"allowed_chats": ["oc ok"]}}, "access.allowed_chats", "not a valid chat id"),
    ({"feishu": {"mode": "polling"}}, "feishu.mode", "is not one of"),
    ({"feishu": {"app_key": "x"}}, "feishu.app_key", "unknown key"),
    ({"instance": "my bot"}, "instance", "letters, digits"),
    ({"defaults": ["cpus"]}, "defaults", "must be a mapping"),
    ({"agent": {"env": {"A=B": "x"}}}, "agent.env.A=B", "is not a variable name"),
    ({"agent": {"env": {"KEY": "a\0b"}}}, "agent.env.KEY", "may not hold a NUL"),
    ({"agent": {"turn_timeout": 0}}, "agent.turn_timeout", ""),
])
def test_bad_values_name_the_file_and_the_key(tmp_path: Path, config: dict, key: str, problem: str) -> None:
    message = error_of(tmp_path, config)
    assert message.startswith(f"bot.yaml: {key}: ")
    assert problem in message


def test_missing_environment_variable_names_the_key(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"feishu": {"app_secret": "${FEISHU_SECRET}"}})
    assert message == "bot.yaml: feishu.app_secret: ${FEISHU_SECRET} is not set in the environment"
    message = error_of(tmp_path, {"gateway": {"api_key": "${KEY}"}})
    assert message.startswith("bot.yaml: gateway.api_key: ${KEY} is not set")


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
    config = write(tmp_path, {"gateway": {"api_key": ""}})
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert "No credentials for the model: set ANTHROPIC_API_KEY" in result.stderr


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


@pytest.mark.parametrize("missing", ["encrypt_key", "verification_token"])
def test_webhook_mode_without_both_keys_is_refused_by_config_check_and_run(tmp_path: Path, missing: str) -> None:
    """Without them lark-oapi checks nothing: anyone reaching the port could post events as any user."""
    feishu = {"app_id": "cli_x", "app_secret": "s", "mode": "webhook", "encrypt_key": "k", "verification_token": "t"}
    config = write(tmp_path, {"feishu": {**feishu, missing: ""}, "gateway": {"api_key": "sk-x"}})
    for command in (["config", "check"], ["run"]):
        result = subprocess.run([sys.executable, "-m", "orchestrator.cli", *command, "--config", str(config)],
                                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert result.returncode == 2, (command, result.stderr)
        assert f"bot.yaml: feishu.{missing}: webhook mode needs the Encrypt Key and the Verification Token" \
            in result.stderr
    assert load_settings(write(tmp_path, {"feishu": feishu}), {}).feishu.mode == "webhook"
    assert load_settings(write(tmp_path, {"feishu": {**feishu, "mode": "websocket", missing: ""}}), {})


def test_webhook_bounds_and_the_reconnect_period(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {"feishu": {"webhook_max_body": "64k", "webhook_max_concurrent": 8,
                                                         "webhook_timeout": 2.5, "reconnect_after": 5}}), {})
    feishu = settings.feishu
    assert (feishu.webhook_max_body, feishu.webhook_max_concurrent, feishu.webhook_timeout, feishu.reconnect_after) \
        == (64 * 1024, 8, 2.5, 5.0)
    assert error_of(tmp_path, {"feishu": {"webhook_max_concurrent": 0}}) == \
        "bot.yaml: feishu.webhook_max_concurrent: 0 must be a whole number above 0"
    assert "feishu.webhook_max_body: '-1' is not a size" in error_of(tmp_path, {"feishu": {"webhook_max_body": "-1"}})
    assert "feishu.reconnect_after" in error_of(tmp_path, {"feishu": {"reconnect_after": 0}})


@pytest.mark.parametrize("network", ["host", "bridge", "container:other", "some-network"])
def test_a_network_beyond_the_instance_needs_unsafe_network_named_in_the_error(tmp_path: Path, network: str) -> None:
    message = error_of(tmp_path, {"defaults": {"network": network}})
    assert message.startswith(f"bot.yaml: defaults.network: {network!r} lets the agent reach the host")
    assert "defaults.unsafe_network: true" in message
    message = error_of(tmp_path, {"groups": {"oc_a": {"network": network}}})
    assert message.startswith("bot.yaml: groups.oc_a.network: ") and "groups.oc_a.unsafe_network: true" in message
    settings = load_settings(write(tmp_path, {"defaults": {"network": network, "unsafe_network": True}}), {})
    assert settings.defaults.network == network
    settings = load_settings(write(tmp_path, {"groups": {"oc_a": {"network": network, "unsafe_network": "true"}}}), {})
    assert resolve_chat(settings, "oc_a").options.network == network
    assert resolve_chat(settings, "oc_b").options.network == "instance"
    settings = load_settings(write(tmp_path, {"defaults": {"unsafe_network": True},
                                              "groups": {"oc_a": {"network": network}}}), {})
    assert resolve_chat(settings, "oc_a").options.network == network  # the group inherits the acceptance
    message = error_of(tmp_path, {"defaults": {"network": network, "unsafe_network": True},
                                  "groups": {"oc_a": {"unsafe_network": False}}})
    assert message.startswith("bot.yaml: groups.oc_a.network: ")  # a group may take the acceptance back


def test_the_instance_network_and_none_need_nothing(tmp_path: Path) -> None:
    assert ChatOptions().network == "instance" and not ChatOptions().unsafe_network
    settings = load_settings(write(tmp_path, {"defaults": {"network": "none"},
                                              "groups": {"oc_a": {"network": "instance"}}}), {})
    assert settings.defaults.network == "none"
    assert resolve_chat(settings, "oc_a").options.network == "instance"
    assert "defaults.network: must name a network" in error_of(tmp_path, {"defaults": {"network": ""}})


def test_disk_budget_and_tmp_size(tmp_path: Path) -> None:
    assert (ChatOptions().disk, ChatOptions().tmp_size) == (10 * 1024**3, 256 * 1024**2)
    settings = load_settings(write(tmp_path, {"defaults": {"disk": "20g", "tmp_size": "64m"},
                                              "groups": {"oc_a": {"disk": "1.5g"}}}), {})
    assert (settings.defaults.disk, settings.defaults.tmp_size) == (20 * 1024**3, 64 * 1024**2)
    assert resolve_chat(settings, "oc_a").options.disk == int(1.5 * 1024**3)
    assert resolve_chat(settings, "oc_a").options.tmp_size == 64 * 1024**2
    for key in ("disk", "tmp_size"):
        assert f"defaults.{key}: '512k' is below the minimum" in error_of(tmp_path, {"defaults": {key: "512k"}})
        assert f"groups.oc_a.{key}: 'lots' is not a size" in error_of(tmp_path, {"groups": {"oc_a": {key: "lots"}}})


def test_limits(tmp_path: Path) -> None:
    limits = load_settings(write(tmp_path, ""), {}).limits
    assert (limits.line_bytes, limits.output_bytes, limits.answer_bytes) == (1024**2, 64 * 1024**2, 1_000_000)
    assert (limits.min_free_disk, limits.disk_check_interval) == (256 * 1024**2, 5.0)
    limits = load_settings(write(tmp_path, {"limits": {
        "line_bytes": "2m", "output_bytes": "${OUT}", "answer_bytes": 500_000, "min_free_disk": 0,
        "disk_check_interval": 0.5}}), {"OUT": "1g"}).limits
    assert (limits.line_bytes, limits.output_bytes, limits.answer_bytes) == (2 * 1024**2, 1024**3, 500_000)
    assert (limits.min_free_disk, limits.disk_check_interval) == (0, 0.5)


@pytest.mark.parametrize(("limits", "key", "problem"), [
    ({"line_bytes": 100}, "limits.line_bytes", "below the minimum of 1024 bytes"),
    ({"output_bytes": "1000"}, "limits.output_bytes", "below the minimum of 1024 bytes"),
    ({"answer_bytes": 0}, "limits.answer_bytes", "below the minimum of 1024 bytes"),
    ({"min_free_disk": "-1"}, "limits.min_free_disk", "is not a size"),
    ({"disk_check_interval": 0}, "limits.disk_check_interval", "above 0"),
    ({"line_bytes": "1mb"}, "limits.line_bytes", "is not a size"),
    ({"answer_chars": 10}, "limits.answer_chars", "unknown key"),
])
def test_bad_limits_name_the_key(tmp_path: Path, limits: dict, key: str, problem: str) -> None:
    message = error_of(tmp_path, {"limits": limits})
    assert message.startswith(f"bot.yaml: {key}: ") and problem in message


def test_chats_dir_is_relative_to_the_config_file_and_defaults_under_data_dir(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {"data_dir": "/srv/bot"}), {})
    assert settings.chats_dir == Path("/srv/bot/chats")
    assert resolve_chat(settings, "oc_a").workspace == Path("/srv/bot/chats/oc_a/workspace")
    settings = load_settings(write(tmp_path, {"chats_dir": "chats"}), {})
    assert settings.chats_dir == tmp_path / "chats"
    assert load_settings(write(tmp_path, {"chats_dir": "../elsewhere"}), {}).chats_dir == tmp_path.parent / "elsewhere"
    settings = load_settings(write(tmp_path, {"chats_dir": "${CHATS}"}), {"CHATS": "/mnt/chats"})
    assert settings.chats_dir == Path("/mnt/chats") and settings.data_dir == tmp_path / "data"
    assert resolve_chat(settings, "oc_a").workspace == Path("/mnt/chats/oc_a/workspace")
