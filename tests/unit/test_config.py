from __future__ import annotations

import dataclasses
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from orchestrator import egress
from orchestrator.config import (
    DEFAULT_EGRESS_ALLOW,
    DEFAULT_PRICES,
    AccessSettings,
    AgentSettings,
    BudgetSettings,
    ChatOptions,
    ConfigError,
    ContainerSettings,
    Egress,
    FeishuSettings,
    FileSettings,
    GatewaySettings,
    LimitSettings,
    LoggingSettings,
    MetricsSettings,
    Placement,
    Price,
    SchedulerSettings,
    Settings,
    ShutdownSettings,
    StoreSettings,
    SwarmSettings,
    load_settings,
    parse_settings,
    resolve_chat,
)
from tests.postgres import EXAMPLE_URL

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


# ---- every section read through parse_settings, with values that are not the defaults ----

EVERYTHING = {
    "data_dir": "/srv/bot", "chats_dir": "/mnt/chats", "instance": "bot-2",
    "runtime": "swarm", "swarm": {"manager": "unix:///run/manager/docker.sock", "start_timeout": 90,
                                   "orchestrator_image": "reg:5000/orchestrator:2", "egress_port": 13128},
    "agent": {"image": "runner:2", "env": {"REGION": "eu"}, "model": "claude-opus-4-5",
              "extra_args": ["--max-turns", "7"], "idle_timeout": 30, "turn_timeout": 120, "hot_idle": 45, "uid": 1001},
    "defaults": {"cpus": 0.5, "memory": "1g", "pids_limit": 64, "network": "none", "unsafe_network": True,
                 "workspace": "/srv/ws/{chat_id}", "require_mention": False, "disk": "2g", "tmp_size": "32m",
                 "egress": "open", "permission_mode": "default", "approvers": ["ou_boss"], "auto_allow": ["Read"],
                 "approval_timeout": 60, "threads": "shared",
                 "placement": {"constraints": ["node.labels.gpu==true"], "spread": ["node.labels.zone"],
                               "reserve_cpus": 0.25, "reserve_memory": "512m"}},
    "groups": {"oc_big": {"cpus": 4, "threads": "per_thread"}},
    "access": {"allowed_chats": ["oc_big"], "allowed_users": ["ou_boss"]},
    "feishu": {"app_id": "cli_a", "app_secret": "app-secret", "domain": "https://open.larksuite.com",
               "mode": "webhook", "verification_token": "v-token", "encrypt_key": "e-key", "rate_per_chat": 3,
               "rate_per_app": 20, "rate_per_app_minute": 500, "webhook_host": "0.0.0.0", "webhook_port": 9000,
               "webhook_path": "/hook", "webhook_max_body": "512k", "webhook_max_concurrent": 16,
               "webhook_max_per_client": 2, "webhook_timeout": 3, "reconnect_after": 12},
    "scheduler": {"max_concurrent_turns": 2, "queue_depth": 3},
    "containers": {"idle_stop": 60, "max_running": 5, "stop_timeout": 2},
    "shutdown": {"drain_timeout": 0, "keep_containers": True},
    "limits": {"line_bytes": "2k", "output_bytes": "1m", "answer_bytes": 4096, "min_free_disk": 0,
               "disk_check_interval": 0.5},
    "files": {"max_bytes": "1m", "message_bytes": "4m", "answer_as_file_bytes": 0, "wait_for_text": 0},
    "gateway": {"upstream_url": "https://gw.example.com/v1/", "api_key": "sk-gw", "auth_token": "gw-token",
                "image": "orchestrator:2", "max_request_bytes": "2m", "request_timeout": 60, "max_concurrent": 3},
    "budgets": {"per_chat_daily_usd": 1, "per_user_daily_usd": "2.5", "instance_daily_usd": 3,
                "per_chat_monthly_usd": 4, "per_user_monthly_usd": 5, "instance_monthly_usd": "6.75",
                "timezone": "Asia/Shanghai", "reset_at": "06:30", "footer": False,
                "prices": {"claude-fake": {"input": 1, "output": 2, "cache_write": 3, "cache_read": 4}}},
    "store": {"url": EXAMPLE_URL},
    "metrics": {"listen": "127.0.0.1:9464"},
    "logging": {"json": True, "level": "DEBUG"},
}


def expected_everything(source: Path) -> Settings:
    return Settings(
        source=source, data_dir=Path("/srv/bot"), chats_dir=Path("/mnt/chats"), instance="bot-2",
        runtime="swarm", swarm=SwarmSettings(manager="unix:///run/manager/docker.sock", start_timeout=90.0,
                                                                 orchestrator_image="reg:5000/orchestrator:2",
                                                                 egress_port=13128),
        agent=AgentSettings(image="runner:2", env={"REGION": "eu"}, model="claude-opus-4-5",
                            extra_args=("--max-turns", "7"), idle_timeout=30.0, turn_timeout=120.0, hot_idle=45.0,
                            uid=1001),
        defaults=ChatOptions(cpus=0.5, memory=1024**3, pids_limit=64, network="none", unsafe_network=True,
                             workspace="/srv/ws/{chat_id}", require_mention=False, disk=2 * 1024**3,
                             tmp_size=32 * 1024**2, egress=Egress(mode="open"), permission_mode="default",
                             approvers=("ou_boss",), auto_allow=("Read",), approval_timeout=60.0, threads="shared",
                             placement=Placement(constraints=("node.labels.gpu==true",), spread=("node.labels.zone",),
                                                 reserve_cpus=0.25, reserve_memory=512 * 1024**2)),
        groups={"oc_big": {"cpus": 4.0, "threads": "per_thread"}},
        access=AccessSettings(allowed_chats=("oc_big",), allowed_users=("ou_boss",)),
        feishu=FeishuSettings(app_id="cli_a", app_secret="app-secret", domain="https://open.larksuite.com",
                              mode="webhook", verification_token="v-token", encrypt_key="e-key", rate_per_chat=3,
                              rate_per_app=20, rate_per_app_minute=500, webhook_host="0.0.0.0", webhook_port=9000,
                              webhook_path="/hook", webhook_max_body=512 * 1024, webhook_max_concurrent=16,
                              webhook_max_per_client=2, webhook_timeout=3.0, reconnect_after=12.0),
        scheduler=SchedulerSettings(max_concurrent_turns=2, queue_depth=3),
        containers=ContainerSettings(idle_stop=60.0, max_running=5, stop_timeout=2.0),
        shutdown=ShutdownSettings(drain_timeout=0.0, keep_containers=True),
        limits=LimitSettings(line_bytes=2048, output_bytes=1024**2, answer_bytes=4096, min_free_disk=0,
                             disk_check_interval=0.5),
        files=FileSettings(max_bytes=1024**2, message_bytes=4 * 1024**2, answer_as_file_bytes=0, wait_for_text=0.0),
        gateway=GatewaySettings(upstream_url="https://gw.example.com/v1", api_key="sk-gw", auth_token="gw-token",
                                image="orchestrator:2", max_request_bytes=2 * 1024**2, request_timeout=60.0,
                                max_concurrent=3),
        budgets=BudgetSettings(per_chat_daily_usd=Decimal(1), per_user_daily_usd=Decimal("2.5"),
                               instance_daily_usd=Decimal(3), per_chat_monthly_usd=Decimal(4),
                               per_user_monthly_usd=Decimal(5), instance_monthly_usd=Decimal("6.75"),
                               timezone="Asia/Shanghai", reset_at="06:30", footer=False,
                               prices={**DEFAULT_PRICES, "claude-fake": Price(Decimal(1), Decimal(2), Decimal(3),
                                                                              Decimal(4))}),
        store=StoreSettings(EXAMPLE_URL),
        metrics=MetricsSettings(listen="127.0.0.1:9464"),
        logging=LoggingSettings(json=True, level="DEBUG"),
    )


def test_every_key_of_every_section_is_read(tmp_path: Path) -> None:
    source = tmp_path / "bot.yaml"
    expected = expected_everything(source)
    assert parse_settings(EVERYTHING, source, {}) == expected
    defaults = Settings(source=source, data_dir=tmp_path / "data")
    for section in (field for field in dataclasses.fields(Settings) if field.name != "source"):
        # each value above differs from its default, so a key left unread shows
        value, default = getattr(expected, section.name), getattr(defaults, section.name)
        if dataclasses.is_dataclass(value):
            for key in dataclasses.fields(value):
                assert getattr(value, key.name) != getattr(default, key.name), f"{section.name}.{key.name}"
        else:
            assert value != default, section.name


def read(tmp_path: Path, key: str, value: object, environ: dict[str, str] | None = None) -> object:
    """`value` for the key `section.name` (or `groups.<chat>.name`) read through parse_settings, as the settings
    hold it."""
    *path, name = key.split(".")
    raw: dict = {name: value}
    for part in reversed(path):
        raw = {part: raw}
    settings = parse_settings(raw, tmp_path / "bot.yaml", environ or {})
    if path[0] == "groups":
        return resolve_chat(settings, path[1]).options.__getattribute__(name)
    return getattr(getattr(settings, path[0]), name)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("scheduler.max_concurrent_turns", 1, 1), ("scheduler.queue_depth", "1", 1),
    ("containers.max_running", 0, 0), ("containers.idle_stop", 0.001, 0.001), ("containers.stop_timeout", "0.5", 0.5),
    ("shutdown.drain_timeout", 0, 0.0),
    ("files.answer_as_file_bytes", 0, 0), ("files.wait_for_text", 0, 0.0), ("files.max_bytes", "1k", 1024),
    ("files.message_bytes", 1024, 1024),
    ("gateway.max_concurrent", 1, 1), ("gateway.max_request_bytes", 1024, 1024),
    ("feishu.webhook_port", 65535, 65535), ("feishu.webhook_port", 1, 1), ("feishu.rate_per_app_minute", 1, 1),
    ("defaults.cpus", 0.01, 0.01), ("defaults.memory", "6m", 6 * 1024**2), ("defaults.pids_limit", 1, 1),
    ("defaults.approval_timeout", 0.5, 0.5), ("defaults.disk", "1m", 1024**2),
    ("defaults.tmp_size", "1.5m", 3 * 512 * 1024), ("feishu.webhook_max_body", "1.5k", 1536),
    ("agent.uid", 1, 1), ("agent.hot_idle", 0.1, 0.1),
    ("metrics.listen", "", ""), ("metrics.listen", "[::1]:65535", "[::1]:65535"),
    ("logging.level", "WARNING", "WARNING"),
    ("budgets.instance_daily_usd", 0, Decimal(0)), ("budgets.reset_at", "23:59:59", "23:59:59"),
    ("limits.min_free_disk", 0, 0), ("limits.line_bytes", 1024, 1024),
])
def test_the_least_and_the_most_each_key_takes(tmp_path: Path, key: str, value: object, expected: object) -> None:
    assert read(tmp_path, key, value) == expected


@pytest.mark.parametrize(("key", "value"), [
    ("scheduler.max_concurrent_turns", 0), ("scheduler.max_concurrent_turns", -1), ("scheduler.queue_depth", "0"),
    ("containers.max_running", -1), ("containers.idle_stop", 0), ("containers.stop_timeout", -5),
    ("shutdown.drain_timeout", -0.5), ("shutdown.keep_containers", "yes"),
    ("files.answer_as_file_bytes", -1), ("files.wait_for_text", -1), ("files.max_bytes", 1023),
    ("gateway.max_concurrent", 0), ("gateway.max_request_bytes", 1023), ("gateway.request_timeout", 0),
    ("feishu.webhook_port", 65536), ("feishu.webhook_port", 0), ("feishu.rate_per_chat", 0),
    ("defaults.cpus", 0.009), ("defaults.cpus", 0), ("defaults.memory", 6 * 1024**2 - 1), ("defaults.pids_limit", 0),
    ("defaults.approval_timeout", -1), ("defaults.threads", "per_topic"),
    ("agent.uid", 0), ("agent.hot_idle", 0), ("agent.model", ["sonnet"]), ("agent.extra_args", ["-p"]),
    ("agent.extra_args", ["--permission-mode=default"]),
    ("metrics.listen", "127.0.0.1:0"), ("metrics.listen", "127.0.0.1:65536"), ("metrics.listen", "localhost"),
    ("metrics.listen", ":9464"), ("logging.level", "debug"), ("logging.level", "TRACE"), ("logging.json", 1),
    ("budgets.instance_daily_usd", "-0.01"), ("budgets.instance_daily_usd", "nan"), ("budgets.footer", "no"),
    ("budgets.per_chat_monthly_usd", "inf"), ("budgets.reset_at", "7:00"), ("budgets.reset_at", "12:60"),
    ("limits.line_bytes", 1023),
])
def test_values_past_a_bound_name_the_key(tmp_path: Path, key: str, value: object) -> None:
    with pytest.raises(ConfigError) as refused:
        read(tmp_path, key, value)
    assert str(refused.value).startswith(f"bot.yaml: {key}: ")


BOOLEANS = ("defaults.unsafe_network", "defaults.require_mention", "groups.oc_a.require_mention",
            "shutdown.keep_containers", "logging.json", "budgets.footer")


@pytest.mark.parametrize("key", BOOLEANS)
@pytest.mark.parametrize(("text", "expected"), [("true", True), ("false", False), ("TRUE", True), ("False", False)])
def test_true_and_false_from_the_environment_are_booleans(tmp_path: Path, key: str, text: str,
                                                          expected: bool) -> None:
    assert read(tmp_path, key, "${FLAG}", {"FLAG": text}) is expected


@pytest.mark.parametrize("key", BOOLEANS)
@pytest.mark.parametrize("text", ["yes", "1", "", "truth"])
def test_other_words_from_the_environment_are_not_booleans(tmp_path: Path, key: str, text: str) -> None:
    with pytest.raises(ConfigError) as refused:
        read(tmp_path, key, "${FLAG}", {"FLAG": text})
    assert str(refused.value) == f"bot.yaml: {key}: {text!r} must be true or false"


# ---- what a mutation run found unpinned (issue 15): whole messages, defaults, bounds ----

LONG_OPEN_ID = "ou_" + "x" * 100
LONG_RULE = "Bash(" + "x" * 300


@pytest.mark.parametrize(("config", "message"), [
    ("- 1\n- 2\n", "top level: must be a mapping of keys to values"),
    ({"access": {"allowed": "x"}}, "access.allowed: unknown key (known here: allowed_chats, allowed_users)"),
    ({"access": {"allowed_chats": {"a": 1}}}, "access.allowed_chats: {'a': 1} must be a list of strings"),
    ({"access": {"allowed_users": {"a": 1}}}, "access.allowed_users: {'a': 1} must be a list of strings"),
    ({"access": {"allowed_chats": ["oc_a", "${CHAT}"]}},
     "access.allowed_chats[1]: ${CHAT} is not set in the environment"),
    ({"data_dir": ["x"]}, "data_dir: ['x'] must be a string"),
    ({"agent": {"permission_mode": "default"}}, "agent.permission_mode: moved to defaults.permission_mode (per group "
                                                "since approvals: groups.<chat_id>.permission_mode)"),
    ({"agent": {"image": ["x"]}}, "agent.image: ['x'] must be a string"),
    ({"agent": {"env": ["A=1"]}}, "agent.env: must map variable names to values"),
    ({"agent": {"env": {"TOKEN": "${MISSING}"}}}, "agent.env.TOKEN: ${MISSING} is not set in the environment"),
    ({"agent": {"env": {"A=B": "x"}}}, "agent.env.A=B: is not a variable name (letters, digits and _)"),
    ({"agent": {"env": {"KEY": "a\0b"}}}, "agent.env.KEY: may not hold a NUL character"),
    ({"agent": {"env": {"ANTHROPIC_API_KEY": "x"}}},
     "agent.env.ANTHROPIC_API_KEY: is set by the orchestrator: agents reach the model through the gateway and the "
     "network through the egress proxy; the model's key and address go in gateway.api_key (or gateway.auth_token) "
     "and gateway.upstream_url"),
    ({"agent": {"extra_args": {"a": 1}}}, "agent.extra_args: {'a': 1} must be a list of strings"),
    ({"agent": {"extra_args": ["--resume=a=b"]}}, "agent.extra_args: '--resume=a=b' is set by the orchestrator itself"),
    ({"budgets": {"prices": ["x"]}}, "budgets.prices: must map model name prefixes to prices"),
    ({"budgets": {"prices": {"m": {"input": "x", "output": 1, "cache_write": 1, "cache_read": 1}}}},
     "budgets.prices.m.input: 'x' must be an amount in USD, like 5 or 2.50"),
    ({"budgets": {"instance_daily_usd": True}}, "budgets.instance_daily_usd: True must be an amount in USD, like 5 or "
                                                "2.50"),
    ({"defaults": {"network": "host"}}, "defaults.network: 'host' lets the agent reach the host, other chats or "
                                        "private addresses; use instance or none, or set defaults.unsafe_network: "
                                        "true to accept that risk"),
    ({"feishu": {"mode": "webhook", "verification_token": "t"}},
     "feishu.encrypt_key: webhook mode needs the Encrypt Key and the Verification Token from the app's event "
     "settings (both), so forged events are refused"),
    ({"groups": ["oc_a"]}, "groups: must map chat ids to their settings"),
    ({"groups": {"../etc": {}}}, "groups.../etc: not a valid chat id (letters, digits, '_', '-')"),
    ({"groups": {"oc_a": {"approvers": [LONG_OPEN_ID]}}},
     f"groups.oc_a.approvers: {LONG_OPEN_ID[:80]!r} is not a Feishu open id (ou_...)"),
    ({"defaults": {"auto_allow": [LONG_RULE]}},
     f"defaults.auto_allow: {LONG_RULE[:80]!r} is not a permission rule (a tool name, or Tool(specifier))"),
    ({"defaults": {"workspace": "/srv/shared"}},
     "defaults.workspace: must contain {chat_id}, or every chat would share one folder"),
    ({"defaults": {"workspace": "run/{chat_id}"}},
     "defaults.workspace: 'run/{chat_id}' is, holds or is inside a folder of the service's (chats_dir, data_dir, "
     "its run or egress folder, /var/lib/orchestrator): put workspaces elsewhere"),
    ({"defaults": {"cpus": 0.001}}, "defaults.cpus: 0.001 is below the engine's minimum of 0.01"),
    ({"defaults": {"cpus": -1}}, "defaults.cpus: -1 must be a number above 0"),
    ({"defaults": {"egress": {"allow": ["Example.COM"]}}},
     "defaults.egress: 'Example.COM' is not a domain (like pypi.org) or a *.suffix pattern (like *.example.com), "
     "in lower case"),
    ({"logging": {"level": "TRACE"}}, "logging.level: 'TRACE' is not one of DEBUG, INFO, WARNING, ERROR"),
    ({"containers": {"max_running": -1}}, "containers.max_running: -1 must be a whole number, 0 or more"),
    ({"containers": {"max_running": 1.5}}, "containers.max_running: 1.5 must be a whole number, 0 or more"),
    ({"shutdown": {"drain_timeout": -1}}, "shutdown.drain_timeout: -1 must be a number, 0 or more"),
    ({"feishu": {"webhook_port": 65536}}, "feishu.webhook_port: 65536 is not a port number"),
    ({"metrics": {"listen": "localhost"}},
     "metrics.listen: 'localhost' must be host:port, like 127.0.0.1:9464 or [::1]:9464"),
    ({"limits": {"min_free_disk": -1}}, "limits.min_free_disk: -1 must not be negative"),
    ({"limits": {"min_free_disk": True}},
     "limits.min_free_disk: True is not a size: use bytes or a number with k, m or g, like 512m or 2g"),
])
def test_the_whole_message_the_operator_reads(tmp_path: Path, config: dict | str, message: str) -> None:
    assert error_of(tmp_path, config) == f"bot.yaml: {message}"


@pytest.mark.parametrize(("config", "key"), [({"agent": {"imag": "x"}}, "agent.imag"),
                                             ({"budgets": {"daily": 1}}, "budgets.daily")])
def test_an_unknown_key_in_a_section_is_named_with_its_section(tmp_path: Path, config: dict, key: str) -> None:
    assert error_of(tmp_path, config).startswith(f"bot.yaml: {key}: unknown key (known here: ")


def test_an_empty_config_holds_the_default_of_every_key(tmp_path: Path) -> None:
    source = tmp_path / "bot.yaml"
    settings = parse_settings({}, source, {})
    assert settings == Settings(source=source, data_dir=tmp_path / "data")
    assert settings.agent == AgentSettings() and settings.budgets == BudgetSettings()
    assert settings.budgets.footer is True and settings.agent.image == "claude-runner:latest"
    assert settings.access == AccessSettings()
    starred = load_settings(write(tmp_path, {"access": {"allowed_chats": "*"}}), {}).access
    assert not starred.allows("oc_a", "ou_a")  # no allowed_users: nobody, in every chat


def test_load_settings_reads_the_process_environment_by_default(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_TEST_ROOT", "/srv/from-env")
    assert load_settings(write(tmp_path, {"data_dir": "${ORCHESTRATOR_TEST_ROOT}"})).data_dir == Path("/srv/from-env")


def test_an_absolute_path_is_kept_as_written(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    settings = load_settings(write(tmp_path, {"data_dir": str(tmp_path / "link")}), {})
    assert settings.data_dir == tmp_path / "link"


def test_a_workspace_holding_data_dir_is_refused_when_chats_dir_is_elsewhere(tmp_path: Path) -> None:
    config = {"data_dir": str(tmp_path / "srv" / "data"), "chats_dir": str(tmp_path / "chats"),
              "groups": {"oc_a": {"workspace": str(tmp_path / "srv")}}}
    assert error_of(tmp_path, config).startswith("bot.yaml: groups.oc_a.workspace: ")
    config["groups"] = {"oc_a": {"workspace": str(tmp_path / "srv" / "ws")}}
    assert resolve_chat(load_settings(write(tmp_path, config), {}), "oc_a").workspace == tmp_path / "srv" / "ws"


@pytest.mark.parametrize("workspace", ["/var/lib/orchestrator/{chat_id}", "/var/lib/{chat_id}/../orchestrator",
                                       "/var/{chat_id}/.."])
def test_a_workspace_in_or_holding_the_nodes_socket_folder_is_refused(tmp_path: Path, workspace: str) -> None:
    """On Swarm each node's gateway binds the chats' model sockets under /var/lib/orchestrator: a workspace there
    would hand a chat the other chats' sockets."""
    assert error_of(tmp_path, {"groups": {"oc_a": {"workspace": workspace}}}).startswith(
        f"bot.yaml: groups.oc_a.workspace: {workspace!r} is, holds or is inside a folder of the service's")
    fine = load_settings(write(tmp_path, {"groups": {"oc_a": {"workspace": "/var/lib/orchestrator-ws/{chat_id}"}}}), {})
    assert resolve_chat(fine, "oc_a").workspace == Path("/var/lib/orchestrator-ws/oc_a")


def test_a_data_dir_written_with_dot_dot_does_not_hide_its_folders_from_the_workspace_check(tmp_path: Path) -> None:
    config = {"data_dir": str(tmp_path / "orch" / ".." / "orch"), "defaults": {"workspace": "run/{chat_id}"}}
    assert error_of(tmp_path, config).startswith("bot.yaml: defaults.workspace: 'run/{chat_id}' is, holds or is "
                                                 "inside a folder of the service's")
    config["defaults"] = {"workspace": f"{tmp_path}/orch/../orch/chats/{{chat_id}}"}
    assert error_of(tmp_path, config).startswith("bot.yaml: defaults.workspace: ")


@pytest.mark.parametrize(("key", "folder"), [("data_dir", "/var/lib/orchestrator/bot"), ("data_dir", "/var/lib"),
                                             ("chats_dir", "/var/lib/orchestrator/../orchestrator/chats")])
def test_on_swarm_the_nodes_own_folder_holds_no_data_dir_nor_chats(tmp_path: Path, key: str, folder: str) -> None:
    """Each node's gateway binds its chats' sockets in /var/lib/orchestrator: on shared storage, every node's would
    take the others' chats' sockets."""
    assert error_of(tmp_path, {**SWARM, key: folder}) == (
        f"bot.yaml: {key}: {folder!r} is, holds or is inside /var/lib/orchestrator, each Swarm node's own folder (its "
        "gateway's sockets for the chats on it): use the shared storage")
    assert load_settings(write(tmp_path, {key: folder}), {}).runtime == "docker"  # one host: no node folder


def test_a_chat_in_shared_mode_has_one_conversation_whatever_the_topic() -> None:
    assert ChatOptions().conversation("omt_1") == "omt_1"
    assert ChatOptions(threads="shared").conversation("omt_1") == ""
    assert ChatOptions(threads="shared").conversation("") == ""


def test_egress_allowlist_by_name_and_the_longest_domain(tmp_path: Path) -> None:
    assert read(tmp_path, "defaults.egress", "allowlist") == Egress()
    longest = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert len(longest) == 253 and read(tmp_path, "defaults.egress", {"allow": [longest]}) == Egress(allow=(longest,))
    assert "is not a domain" in error_of(tmp_path, {"defaults": {"egress": {"allow": [longest + "b"]}}})


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("gateway.upstream_url", "https://gw.example.com/vX/", "https://gw.example.com/vX"),
    ("metrics.listen", "X:1", "X:1"),
    ("defaults.tmp_size", "1m", 1024**2), ("feishu.webhook_max_body", 1024, 1024),
    ("shutdown.drain_timeout", 0.5, 0.5), ("files.wait_for_text", "2.5", 2.5),
])
def test_more_values_each_key_takes(tmp_path: Path, key: str, value: object, expected: object) -> None:
    assert read(tmp_path, key, value) == expected


@pytest.mark.parametrize(("key", "value"), [
    ("metrics.listen", "[]:9464"), ("defaults.tmp_size", 1024**2 - 1), ("feishu.webhook_max_body", 1023),
])
def test_more_values_past_a_bound(tmp_path: Path, key: str, value: object) -> None:
    with pytest.raises(ConfigError) as refused:
        read(tmp_path, key, value)
    assert str(refused.value).startswith(f"bot.yaml: {key}: ")


def test_the_default_prices_are_anthropics_list_prices() -> None:
    assert DEFAULT_PRICES["claude-sonnet-4"] == Price(Decimal("3"), Decimal("15"), Decimal("3.75"), Decimal("0.30"))
    assert DEFAULT_PRICES["claude-3-5-haiku"] == Price(input=Decimal("0.80"), output=Decimal("4"),
                                                       cache_write=Decimal("1"), cache_read=Decimal("0.08"))
    assert DEFAULT_PRICES["default"] == DEFAULT_PRICES["claude-opus-4"]  # the dearest: an unknown model errs safe


# ---- runtime: swarm ----

SWARM = {"runtime": "swarm", "swarm": {"orchestrator_image": "reg:5000/orchestrator"}, "defaults": {"egress": "none"},
         "store": {"url": EXAMPLE_URL}}


def test_swarm_placement_per_group_overrides_the_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {
        **SWARM, "swarm": {"manager": "unix:///run/manager/docker.sock", "orchestrator_image": "reg:5000/orchestrator"},
        "defaults": {"egress": "none", "placement": {"spread": "node.labels.zone"}},
        "groups": {"oc_gpu": {"placement": {"constraints": ["node.labels.gpu == true", "node.role!=manager"],
                                            "reserve_memory": "1g"}}}}), {})
    assert settings.runtime == "swarm" and settings.swarm.manager == "unix:///run/manager/docker.sock"
    assert resolve_chat(settings, "oc_any").options.placement == Placement(spread=("node.labels.zone",))
    assert resolve_chat(settings, "oc_gpu").options.placement == Placement(
        constraints=("node.labels.gpu == true", "node.role!=manager"), reserve_memory=1024**3)
    assert load_settings(write(tmp_path, {}), {}).runtime == "docker"
    assert load_settings(write(tmp_path, {**SWARM, "defaults": {"network": "none"}}), {}).runtime == "swarm"
    # an allowlist is served on every node (the default one, and a group's)
    allowlists = load_settings(write(tmp_path, {**SWARM, "defaults": {}, "groups": {
        "oc_a": {"egress": {"allow": ["pypi.org"]}}}}), {})
    assert resolve_chat(allowlists, "oc_b").options.egress.mode == "allowlist"
    assert resolve_chat(allowlists, "oc_a").options.egress.allow == ("pypi.org",)
    # and open egress on every node's network for it (a group's, the defaults')
    for opened in ({"groups": {"oc_a": {"egress": "open"}}}, {"defaults": {"egress": "open"}}):
        settings = load_settings(write(tmp_path, {**SWARM, **opened}), {})
        assert resolve_chat(settings, "oc_a").options.egress.mode == "open" and egress.any_goes_out(settings)
    assert not egress.any_goes_out(allowlists)
    assert load_settings(write(tmp_path, SWARM), {}).swarm == SwarmSettings(
        manager="", start_timeout=300.0, orchestrator_image="reg:5000/orchestrator")


ENGINE_ADDRESS = ("must be an engine's address: unix:///path/docker.sock (tcp:// without TLS would leave the Swarm's "
                  "API open, and is refused)")
NODE_ATTRIBUTE = ("must be a node attribute (node.labels.NAME, node.hostname, node.role, ...), == or !=, and a value, "
                  "like node.labels.gpu==true")
PLACEMENT_KEYS = "must be a mapping of constraints, spread, reserve_cpus and reserve_memory"
NOT_ON_DOCKER = "applies to runtime: swarm only (one host places nothing)"
ORCHESTRATOR_IMAGE = ("is required on runtime: swarm: the orchestrator's image in a registry every node pulls from "
                      "(images/build.sh --orchestrator --push REGISTRY), which each node runs to close the chats' "
                      "network and to serve their model gateway")


SQLITE_ON_SWARM = ("runtime: swarm needs a PostgreSQL store (postgresql://...): the model gateway on every node writes "
                   "to it, and SQLite's locks do not hold between hosts nor on NFS")


# Whole messages: the operator reads them, and a test of a part would not see the rest garbled.
@pytest.mark.parametrize(("config", "key", "problem"), [
    ({"runtime": "kubernetes"}, "runtime", "'kubernetes' is not one of docker, swarm"),
    ({**SWARM, "groups": {"oc_a": {"network": "host", "unsafe_network": True}}}, "groups.oc_a.network",
     "'host': on runtime: swarm a chat's service is on the instance's Swarm network (instance or none); no other "
     "network is served"),
    ({**SWARM, "swarm": {"manager": "manager:2376"}}, "swarm.manager", f"'manager:2376' {ENGINE_ADDRESS}"),
    ({**SWARM, "swarm": {"manager": "unix://relative.sock"}}, "swarm.manager",
     f"'unix://relative.sock' {ENGINE_ADDRESS}"),
    ({**SWARM, "swarm": {"manager": "tcp://manager:2376"}}, "swarm.manager", f"'tcp://manager:2376' {ENGINE_ADDRESS}"),
    ({**SWARM, "swarm": {"manager": "ssh://admin@manager"}}, "swarm.manager",
     f"'ssh://admin@manager' {ENGINE_ADDRESS}"),
    ({**SWARM, "swarm": {"nodes": 3}}, "swarm.nodes",
     "unknown key (known here: manager, orchestrator_image, start_timeout, egress_port)"),
    ({**SWARM, "swarm": {"egress_port": 70000}}, "swarm.egress_port", "70000 is not a port number"),
    ({**SWARM, "swarm": {"start_timeout": 0}}, "swarm.start_timeout", "0 must be a number above 0"),
    ({**SWARM, "swarm": {"manager": "unix:///m.sock"}}, "swarm.orchestrator_image", ORCHESTRATOR_IMAGE),
    ({**SWARM, "swarm": {"orchestrator_image": ""}}, "swarm.orchestrator_image", ORCHESTRATOR_IMAGE),
    ({**SWARM, "store": {}}, "store.url", SQLITE_ON_SWARM),
    ({**SWARM, "store": {"url": "sqlite:///data/orchestrator.db"}}, "store.url", SQLITE_ON_SWARM),
    ({**SWARM, "swarm": {"start_timeout": "5m"}}, "swarm.start_timeout", "'5m' must be a number above 0"),
    ({"swarm": {"manager": "unix:///m.sock"}}, "swarm", "applies to runtime: swarm only"),
    ({"defaults": {"placement": {"spread": ["node.labels.zone"]}}}, "defaults.placement", NOT_ON_DOCKER),
    ({"groups": {"oc_a": {"placement": {"reserve_cpus": 1}}}}, "groups.oc_a.placement", NOT_ON_DOCKER),
    ({**SWARM, "defaults": {"egress": "none", "placement": {"constraints": ["gpu==true"]}}}, "defaults.placement",
     f"constraint 'gpu==true' {NODE_ATTRIBUTE}"),
    ({**SWARM, "defaults": {"egress": "none", "placement": {"constraints": ["node.labels.gpu=true"]}}},
     "defaults.placement", f"constraint 'node.labels.gpu=true' {NODE_ATTRIBUTE}"),
    ({**SWARM, "defaults": {"egress": "none", "placement": {"constraints": ["node.labels.a==b; rm"]}}},
     "defaults.placement", f"constraint 'node.labels.a==b; rm' {NODE_ATTRIBUTE}"),
    ({**SWARM, "defaults": {"egress": "none", "placement": {"spread": ["zone"]}}}, "defaults.placement",
     "spread 'zone' must be a node attribute, like node.labels.zone"),
    ({**SWARM, "defaults": {"egress": "none", "placement": {"pin": "x"}}}, "defaults.placement",
     f"{{'pin': 'x'}} {PLACEMENT_KEYS}"),
    ({**SWARM, "defaults": {"egress": "none", "placement": ["node.labels.zone"]}}, "defaults.placement",
     f"['node.labels.zone'] {PLACEMENT_KEYS}"),
    ({**SWARM, "defaults": {"egress": "none", "cpus": 1, "placement": {"reserve_cpus": 2}}},
     "defaults.placement.reserve_cpus", "2 is more than the chat's CPU cap (1)"),
    ({**SWARM, "groups": {"oc_a": {"memory": "1g", "placement": {"reserve_memory": "2g"}}}},
     "groups.oc_a.placement.reserve_memory", "is more than the chat's memory cap"),
    ({**SWARM, "defaults": {"egress": "none", "placement": {"reserve_memory": "1m"}}}, "defaults.placement",
     "'1m' is below the engine's minimum of 6m"),
])
def test_bad_swarm_settings_name_the_key(tmp_path: Path, config: dict, key: str, problem: str) -> None:
    assert error_of(tmp_path, config) == f"bot.yaml: {key}: {problem}"


def test_reservations_up_to_the_caps_are_fine(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {**SWARM, "defaults": {
        "egress": "none", "cpus": 2, "memory": "1g", "placement": {"reserve_cpus": 2, "reserve_memory": "1g"}}}), {})
    assert settings.defaults.placement == Placement(reserve_cpus=2.0, reserve_memory=1024**3)
    assert not Placement().configured and Placement(reserve_cpus=0.5).configured
