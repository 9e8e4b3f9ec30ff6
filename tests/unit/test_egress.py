"""egress's pure parts: policies, proxy users and their environment, squid's config, the refusal log and the
basic-auth helper; and how the runtime places a chat and the proxy on the instance's networks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import credentials, egress, egress_node, untrusted
from orchestrator.config import Egress, Settings, load_settings, resolve_chat
from orchestrator.layout import chat_paths
from orchestrator.runtime import ContainerSpec, chat_network, container_spec, egress_proxy_spec

SECRET = b"s" * 32


def settings_of(tmp_path: Path, text: str) -> Settings:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    return load_settings(config, {})


def env_of(settings: Settings, chat_id: str = "oc_x") -> dict[str, str]:
    chat = resolve_chat(settings, chat_id)
    return dict(container_spec(settings, chat, chat_paths(settings, chat), SECRET).environment)


# ---- policies ----


def test_a_policy_is_its_domains_in_squids_notation_without_overlaps() -> None:
    policy = egress.policy(Egress(allow=("www.example.com", "*.example.com", "example.com", "pypi.org",
                                         "*.a.example.com", "*.cdn.net", "cdn.net.evil.org")))
    assert policy.domains == (".cdn.net", ".example.com", "cdn.net.evil.org", "pypi.org")
    assert policy == egress.policy(Egress(allow=("pypi.org", "*.example.com", "*.cdn.net", "cdn.net.evil.org")))
    assert policy.name == egress.policy(Egress(allow=("*.cdn.net", "cdn.net.evil.org", "pypi.org", "*.example.com")
                                               )).name  # the order of the list does not matter
    assert policy.name != egress.policy(Egress(allow=("pypi.org",))).name
    assert len(policy.name) == 13 and policy.name.startswith("p")


@pytest.mark.parametrize("domain", ["pypi.org http_access allow all", "pypi.org\nhttp_access allow all", "PyPI.org",
                                    "*", "-x.org", "a..b", ""])
def test_a_domain_is_validated_again_before_it_reaches_squids_config(domain: str) -> None:
    with pytest.raises(ValueError):
        egress.policy(Egress(allow=(domain,)))


def test_policies_are_the_distinct_allowlists_of_chats_on_the_proxy(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, """
defaults: {egress: {allow: [pypi.org]}}
groups:
  oc_a: {egress: {allow: [allowed.test]}}
  oc_b: {egress: {allow: [allowed.test]}}
  oc_c: {egress: open}
  oc_d: {egress: none}
  oc_e: {network: none, egress: {allow: [only.test]}}
""")
    assert [p.domains for p in egress.policies(settings)] == sorted(
        [("pypi.org",), ("allowed.test",)], key=lambda domains: egress.policy(Egress(allow=domains)).name)
    assert egress.policies(settings_of(tmp_path, "defaults: {egress: open}\n")) == []


# ---- a chat's proxy settings ----


def test_an_allowlist_chat_gets_the_proxy_with_its_own_credentials(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, "instance: bot\ngroups: {oc_g: {egress: {allow: [allowed.test]}}}\n")
    env = env_of(settings)
    policy = egress.policy(resolve_chat(settings, "oc_x").options.egress)
    username = f"{policy.name}.oc_x"
    password = credentials.proxy_password(egress.proxy_key(SECRET), username)
    url = f"http://{username}:{password}@bot-egress-proxy:3128"
    assert {name: env[name] for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")} == dict.fromkeys(
        ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"), url)
    assert env["NO_PROXY"] == env["no_proxy"] == "127.0.0.1,localhost"  # the model gateway, on the loopback
    assert password not in (credentials.proxy_password(SECRET, username), credentials.model_token(SECRET, "oc_x"))
    grouped = env_of(settings, "oc_g")["HTTP_PROXY"]
    assert grouped.startswith(f"http://{egress.policy(Egress(allow=('allowed.test',))).name}.oc_g:")


SWARM = ("runtime: swarm\nswarm: {orchestrator_image: 'reg:5000/orchestrator', egress_port: 13128}\n"
         "store: {url: 'postgresql://u:p@db/bot'}\n")


def test_on_swarm_an_allowlist_chat_gets_its_proxy_on_its_own_loopback(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, "instance: bot\n" + SWARM)
    env = env_of(settings)
    username = f"{egress.policy(resolve_chat(settings, 'oc_x').options.egress).name}.oc_x"
    password = credentials.proxy_password(egress.proxy_key(SECRET), username)
    assert env["HTTPS_PROXY"] == env["http_proxy"] == f"http://{username}:{password}@127.0.0.1:3128"
    assert env["EGRESS_RELAY_PORT"] == "3128"  # agent-init relays it to the chat's egress socket
    assert egress.node_port(settings) == 13128  # where the node's gateway relays it to
    none = settings_of(tmp_path, "instance: bot\n" + SWARM + "defaults: {egress: none}\n")
    assert not {"HTTP_PROXY", "EGRESS_RELAY_PORT"} & set(env_of(none))
    assert egress.node_port(none) is None  # no proxy on the nodes, no relay
    assert egress.node_port(settings_of(tmp_path, "instance: bot\n")) is None  # one host: agents reach it directly


@pytest.mark.parametrize(("config", "network"), [
    ("defaults: {egress: open}\n", "bot-egress"),
    ("defaults: {egress: none}\n", "none"),
    ("defaults: {network: none}\n", "none"),
    ("defaults: {network: host, unsafe_network: true}\n", "host"),
])
def test_open_none_and_operators_networks_get_no_proxy(tmp_path: Path, config: str, network: str) -> None:
    settings = settings_of(tmp_path, "instance: bot\n" + config)
    assert chat_network("bot", resolve_chat(settings, "oc_x").options) == network
    assert not {"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"} & set(env_of(settings))
    assert "ANTHROPIC_BASE_URL" in env_of(settings)  # the model is reached through the gateway whatever egress says


def test_an_allowlist_chat_is_on_the_internal_agents_network(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, "instance: bot\n")
    assert chat_network("bot", resolve_chat(settings, "oc_x").options) == "bot-agents"


# ---- squid ----


def test_squid_config_allows_each_policy_its_domains_for_its_users_only() -> None:
    first, second = egress.policy(Egress(allow=("*.example.com", "pypi.org"))), egress.policy(Egress(allow=()))
    config = egress.squid_config([first, second])
    lines = config.splitlines()
    assert f"acl user_{first.name} proxy_auth_regex ^{first.name}\\." in lines
    assert f"acl allow_{first.name} dstdomain -n .example.com" in lines
    assert f"acl allow_{first.name} dstdomain -n pypi.org" in lines
    assert f"http_access allow user_{first.name} allow_{first.name} !to_localhost !link_local" in lines
    assert second.name not in config  # an empty allowlist allows nothing
    access = [line for line in lines if line.startswith("http_access")]
    assert access[:3] == ["http_access deny !authenticated", "http_access deny CONNECT !tls_port",
                          "http_access deny too_many"]
    assert "acl too_many maxconn 256" in lines
    assert access[-1] == "http_access deny all"
    for line in ("cache deny all", "via off", "forwarded_for delete", "cache_effective_user proxy",
                 # a flood of bad credentials is answered as failed, not the end of squid
                 "auth_param basic children 4 startup=1 idle=1 queue-size=64 on-persistent-overload=ERR",
                 "access_log stdio:/var/log/egress/refused.log logformat=refused refused",
                 "auth_param basic program /usr/bin/env /opt/orchestrator/bin/python -I -m orchestrator.egress "
                 "/etc/egress/key"):
        assert line in lines


def test_on_a_node_squid_listens_on_the_loopback_and_leaves_the_per_chat_cap_to_the_relay() -> None:
    policy = egress.policy(Egress(allow=("pypi.org",)))
    lines = egress.squid_config([policy], on_node=13128).splitlines()
    assert "http_port 127.0.0.1:13128" in lines and "http_port 3128" not in lines
    assert not [line for line in lines if "too_many" in line]  # every connection comes from the loopback there
    assert [line for line in lines if line.startswith("http_access")] == [
        "http_access deny !authenticated", "http_access deny CONNECT !tls_port",
        f"http_access allow user_{policy.name} allow_{policy.name} !to_localhost !link_local", "http_access deny all"]


def test_squid_config_refuses_a_domain_that_could_change_it() -> None:
    with pytest.raises(ValueError):
        egress.squid_config([egress.Policy(domains=("pypi.org\nhttp_access allow all",))])


def test_the_proxy_container_keeps_only_what_squid_needs(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, "instance: bot\n")
    spec = egress_proxy_spec(settings, "d1")
    assert (spec.name, spec.network, spec.networks) == ("bot-egress-proxy", "bot-agents", ("bot-egress",))
    assert spec.cap_add == ("SETUID", "SETGID") and spec.user == "0:0"
    assert spec.labels["orchestrator.role"] == "egress-proxy" and "orchestrator.chat_id" not in spec.labels
    assert spec.mounts == ((str(tmp_path / "data" / "egress" / "conf"), "/etc/egress", True),
                           (str(tmp_path / "data" / "egress" / "log"), "/var/log/egress", False))
    assert spec.fingerprint() != egress_proxy_spec(settings, "d2").fingerprint()  # a new config makes it again


def test_on_swarm_the_proxy_runs_on_each_nodes_network_as_user_proxy_without_capabilities(tmp_path: Path) -> None:
    spec = egress_proxy_spec(settings_of(tmp_path, "instance: bot\n" + SWARM), "d1")
    assert (spec.network, spec.networks, spec.cap_add, spec.user) == ("host", (), (), "13:13")
    assert spec.image == "reg:5000/orchestrator" and spec.command == ("python", "-m", "orchestrator.egress_node")
    assert dict(spec.environment) == {"EGRESS_FILES_DIGEST": "d1", "NODE_ID": "{{.Node.ID}}"}  # Swarm's template
    assert spec.mounts == ((str(tmp_path / "data" / "egress" / "conf"), "/etc/egress", True),
                           (str(tmp_path / "data" / "egress" / "log"), "/var/log/egress", False))


def test_fields_added_later_leave_older_fingerprints_alone(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, "")
    chat = resolve_chat(settings, "oc_x")
    spec = container_spec(settings, chat, chat_paths(settings, chat), SECRET)
    assert (spec.networks, spec.cap_add) == ((), ())
    old_shape = {k: v for k, v in spec.__dict__.items() if k not in ("networks", "cap_add")}
    assert spec.fingerprint() == ContainerSpec(**old_shape).fingerprint()
    assert ContainerSpec(**old_shape, cap_add=("SETUID",)).fingerprint() != spec.fingerprint()


def test_write_files_makes_the_config_and_a_key_only_squids_group_reads(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, "")
    settings.data_dir.mkdir()
    digest = egress.write_files(settings, SECRET)
    conf = egress.conf_dir(settings)
    assert (conf / "squid.conf").read_text() == egress.squid_config(egress.policies(settings))
    key = conf / "key"
    assert key.read_text().strip() == egress.proxy_key(SECRET).hex()
    assert (key.stat().st_mode & 0o777, key.stat().st_gid) == (0o640, egress.PROXY_UID)
    assert egress.log_dir(settings).stat().st_uid == egress.PROXY_UID
    assert egress.write_files(settings, SECRET) == digest
    assert egress.write_files(settings, b"t" * 32) != digest  # a new secret makes the proxy again


# ---- refusals ----


def test_refusal_lines() -> None:
    chat = egress.parse_refusal("1796354664 403 CONNECT other.test 443 p0123456789ab.oc_x")
    assert chat == egress.Refusal("oc_x", "CONNECT", "other.test", "443", "not allowed by the chat's egress policy")
    forged = egress.parse_refusal("1796354664 407 GET allowed.test 80 p0123456789ab.oc_other")
    assert forged is not None and forged.chat_id == "-" and "bad proxy credentials" in forged.reason
    assert egress.parse_refusal("1796354664 407 GET allowed.test 80 -") is None  # a challenge: credentials follow
    assert egress.parse_refusal("1796354664 403 GET x.test 80 someone").chat_id == "-"  # type: ignore[union-attr]
    assert egress.parse_refusal("garbage") is None
    odd = egress.parse_refusal("1 403 GET \x1b[31mred\x1b[0m 80 p0123456789ab.oc_x")
    assert odd is not None and "\x1b" not in odd.host


def test_the_refusal_log_is_followed_from_its_end_with_bounds(tmp_path: Path) -> None:
    log = tmp_path / "refused.log"
    line = "1 403 GET other.test 80 p0123456789ab.oc_x\n"
    reader = egress.RefusalLog(tmp_path)
    assert reader.read() == []  # no log yet: all it will hold is new
    log.write_text(line)
    assert [r.host for r in reader.read()] == ["other.test"]
    log.write_text(line * 3)  # an earlier run's lines are not reported again by a new reader
    fresh = egress.RefusalLog(tmp_path)
    log.write_text(line * 3 + line.replace("other", "later"))  # but what came after it was made is
    assert [r.host for r in fresh.read()] == ["later.test"]
    assert fresh.read() == []
    with log.open("a") as file:
        file.write(line + "1 403 GET half")
    assert len(fresh.read()) == 1  # the half line waits for its end
    with log.open("a") as file:
        file.write(".test 80 p0123456789ab.oc_y\n" + "x" * (egress.MAX_LINE + 1) + "\n")
    assert [(r.chat_id, r.host) for r in fresh.read()] == [("oc_y", "half.test")]  # the overlong line skipped


def test_the_refusal_log_is_emptied_once_read_past_its_cap(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(egress, "TRUNCATE_AT", 100)
    log = tmp_path / "refused.log"
    reader = egress.RefusalLog(tmp_path)
    log.write_text("1 403 GET other.test 80 p0123456789ab.oc_x\n" * 5)
    assert len(reader.read()) == 5
    assert log.stat().st_size == 0
    with log.open("a") as file:  # squid appends (O_APPEND): its next line lands at the new start
        file.write("1 403 GET again.test 80 p0123456789ab.oc_x\n")
    assert [r.host for r in reader.read()] == ["again.test"]


def test_a_link_in_place_of_the_refusal_log_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").write_text("1 403 GET other.test 80 p0123456789ab.oc_x\n")
    os.symlink(tmp_path / "elsewhere", tmp_path / "refused.log")
    with pytest.raises(untrusted.Refused):
        egress.RefusalLog(tmp_path).read()


NODE_A, NODE_B = "a" * 25, "b" * 25


def test_each_nodes_refusal_log_is_followed_from_the_end_it_had_or_from_its_start_when_new(tmp_path: Path) -> None:
    line = "1 403 GET {host} 80 p0123456789ab.oc_x\n"
    (tmp_path / NODE_A).mkdir()
    (tmp_path / NODE_A / "refused.log").write_text(line.format(host="before.test"))
    (tmp_path / "not-a-node").mkdir()
    (tmp_path / "not-a-node" / "refused.log").write_text(line.format(host="planted.test"))
    os.symlink(tmp_path / NODE_A, tmp_path / ("c" * 25))  # a link is no node's folder
    logs = egress.NodeRefusalLogs(tmp_path)
    assert logs.read() == []  # an earlier run's lines are not reported again
    (tmp_path / NODE_B).mkdir()
    (tmp_path / NODE_B / "refused.log").write_text(line.format(host="b.test"))  # a node whose proxy started since
    with (tmp_path / NODE_A / "refused.log").open("a") as file:
        file.write(line.format(host="a.test"))
    assert sorted(r.host for r in logs.read()) == ["a.test", "b.test"]
    assert logs.read() == []
    assert egress.NodeRefusalLogs(tmp_path / "missing").read() == []


def test_a_nodes_log_that_cannot_be_read_is_said_and_the_others_are_read_on(tmp_path: Path) -> None:
    """Every node's proxy can write the whole log folder: one node's log made a link or a FIFO fails that node."""
    line = "1 403 GET {host} 80 p0123456789ab.oc_x\n"
    for node in (NODE_A, NODE_B):
        (tmp_path / node).mkdir()
    os.symlink("/etc/passwd", tmp_path / NODE_A / "refused.log")  # there from the start
    logs = egress.NodeRefusalLogs(tmp_path)  # does not raise: the service must start
    assert "refused.log" in logs.problems[NODE_A]
    (tmp_path / NODE_B / "refused.log").write_text(line.format(host="b.test"))
    assert [r.host for r in logs.read()] == ["b.test"]  # the other node's lines
    os.unlink(tmp_path / NODE_A / "refused.log")
    (tmp_path / NODE_A / "refused.log").write_text(line.format(host="a.test"))
    assert [r.host for r in logs.read()] == ["a.test"] and logs.problems == {}  # mended: read again, from its start
    os.unlink(tmp_path / NODE_B / "refused.log")
    os.mkfifo(tmp_path / NODE_B / "refused.log")
    with (tmp_path / NODE_A / "refused.log").open("a") as file:
        file.write(line.format(host="later.test"))
    assert [r.host for r in logs.read()] == ["later.test"] and "not a regular file" in logs.problems[NODE_B]


def test_at_most_max_nodes_logs_are_followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(egress, "MAX_NODES", 1)
    for node in (NODE_A, NODE_B):
        (tmp_path / node).mkdir()
    logs = egress.NodeRefusalLogs(tmp_path)
    logs.read()
    assert list(logs.logs) == [NODE_A]


def test_refusal_logs_are_one_hosts_or_every_nodes(tmp_path: Path) -> None:
    assert isinstance(egress.refusal_logs(settings_of(tmp_path, "instance: bot\n")), egress.RefusalLog)
    assert isinstance(egress.refusal_logs(settings_of(tmp_path, "instance: bot\n" + SWARM)), egress.NodeRefusalLogs)


def test_a_node_gives_squid_a_config_with_its_own_refusal_log(tmp_path: Path) -> None:
    config = egress.squid_config([egress.policy(Egress(allow=("pypi.org",)))], on_node=13128)
    (tmp_path / "squid.conf").write_text(config)
    (tmp_path / "log").mkdir()
    egress_node.prepare(NODE_A, tmp_path / "log", tmp_path / "squid.conf", tmp_path / "copy.conf")
    copy = (tmp_path / "copy.conf").read_text()
    assert f"access_log stdio:/var/log/egress/{NODE_A}/refused.log logformat=refused refused" in copy.splitlines()
    assert copy.replace(f"/{NODE_A}/", "/") == config  # nothing else changed
    assert (tmp_path / "log" / NODE_A).is_dir() and oct((tmp_path / "log" / NODE_A).stat().st_mode & 0o777) == "0o750"
    for bad in ("", "../../etc", NODE_A.upper()):  # the template not filled in, or not a node's id
        with pytest.raises(ValueError, match="is not a Swarm node id"):
            egress_node.prepare(bad, tmp_path / "log", tmp_path / "squid.conf", tmp_path / "copy.conf")
    with pytest.raises(ValueError, match="names its refusal log other than"):
        egress_node.node_config("http_port 3128\n", NODE_A)


# ---- the basic-auth helper ----


def test_the_helper_accepts_only_a_users_own_password() -> None:
    key = egress.proxy_key(SECRET)
    user = "p0123456789ab.oc_x"
    password = credentials.proxy_password(key, user)
    assert egress.check(key, f"{user} {password}\n")
    assert egress.check(key, f"{user.replace('.', '%2E')} {password}\n")  # squid URL-encodes both
    assert not egress.check(key, f"{user} {password[:-1]}0\n")
    assert not egress.check(key, f"p0123456789ab.oc_y {password}\n")  # another chat's name with this password
    assert not egress.check(key, f"{user} {credentials.proxy_password(SECRET, user)}\n")  # not the proxy's key
    assert not egress.check(key, f"admin {credentials.proxy_password(key, 'admin')}\n")
    assert not egress.check(key, f"{user} {password} extra\n")


def test_the_helper_speaks_squids_line_protocol(tmp_path: Path) -> None:
    key = egress.proxy_key(SECRET)
    (tmp_path / "key").write_text(key.hex() + "\n")
    user = "p0123456789ab.oc_x"
    lines = f"{user} {credentials.proxy_password(key, user)}\n{user} wrong\n\n"
    run = subprocess.run([sys.executable, "-m", "orchestrator.egress", str(tmp_path / "key")], input=lines,
                         capture_output=True, text=True, timeout=30)
    assert (run.returncode, run.stdout) == (0, "OK\nERR\nERR\n")
