"""Egress through the allowlisting proxy (issue 11): from real agent containers, through the real CLI (the fake
model's RUN_BASH), a real squid in the instance's proxy container lets a chat reach the hosts of its allowlist and
nothing else; direct connections fail on the internal network; `egress: none` reaches nothing; refusals are
logged with the chat and the host, and counted.

The hosts are the test's own: a listener container on a network the test makes, under the names allowed.test and
other.test, with the proxy container connected to that network. No other address is ever contacted.
"""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import docker
import pytest
from docker.models.containers import Container

from orchestrator import egress, firewall, runtime
from orchestrator.config import Egress
from tests.fakes.feishu import FakeFeishu
from tests.harness import AGENT_IMAGE, Orchestrator, answers, chat, free_port, wait_answer, wait_until

# Answers any request with the Host it asked for and the headers it came with (the proxy must add none of its own).
LISTENER = r"""
import http.server, sys, threading
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from " + self.headers.get("Host", "?") + "\n" + "".join(
            "header " + name.lower() + "\n" for name in self.headers)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
servers = [http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler) for port in (8080, 443)]
for server in servers[1:]:
    threading.Thread(target=server.serve_forever, daemon=True).start()
print("listening", flush=True)
servers[0].serve_forever()
"""


@dataclass(frozen=True)
class Hosts:
    network: str
    address: str  # the listener's, on the test's network


@pytest.fixture
def hosts(docker_client: docker.DockerClient) -> Iterator[Hosts]:
    """The test's network with one listener (root in its own container, for port 443) named allowed.test and
    other.test."""
    name = f"egress-test-{uuid.uuid4().hex[:8]}"
    network = docker_client.networks.create(name, driver="bridge", labels={"orchestrator.test": "egress"})
    listener = docker_client.containers.run(AGENT_IMAGE, ["python3", "-c", LISTENER], name=name, user="0:0",
                                            detach=True, network=name, entrypoint=[])
    try:
        # Bound before the test asks (CI saw squid's "connection refused" from a listener still starting).
        wait_until(lambda: b"listening" in listener.logs(), 60, "the test's listener")
        network.disconnect(listener)
        network.connect(listener, aliases=["allowed.test", "other.test"])
        listener.reload()
        yield Hosts(name, listener.attrs["NetworkSettings"]["Networks"][name]["IPAddress"])
    finally:
        listener.remove(force=True)
        network.reload()
        for container in network.containers:  # the proxy, if the instance's removal has not taken it yet
            network.disconnect(container, force=True)
        network.remove()


def _say(feishu: FakeFeishu, chat_id: str, text: str) -> None:
    feishu.push_event(feishu.text_event(chat_id, text))


def _ran(feishu: FakeFeishu, chat_id: str, command: str, marker: str, timeout: float = 120) -> str:
    """Run a command in the chat's container through the CLI; its output (ending with the marker)."""
    _say(feishu, chat_id, f"RUN_BASH: {command}; echo {marker}")
    wait_answer(feishu, chat_id, marker, timeout)
    return next(text for text in answers(feishu, chat_id) if marker in text)


def _metric(port: int, chat_id: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = re.search(rf'orchestrator_egress_refused_total\{{chat_id="{re.escape(chat_id)}"\}} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def test_agents_reach_their_allowlist_through_the_proxy_and_nothing_else(
        feishu: FakeFeishu, feishu_config, start, instance: str, docker_client: docker.DockerClient,
        hosts: Hosts) -> None:
    allowed, grouped, isolated = chat(), chat(), chat()
    metrics_port = free_port()
    config = feishu_config(
        defaults={"egress": {"allow": ["allowed.test"]}},
        groups={grouped: {"egress": {"allow": ["other.test"]}}, isolated: {"egress": "none"}},
        metrics={"listen": f"127.0.0.1:{metrics_port}"})
    bot = start(config)
    proxy = wait_until(lambda: _running(docker_client, egress.proxy_name(instance)), 60, "the egress proxy")
    docker_client.networks.get(hosts.network).connect(proxy)  # the test's hosts, reachable from the proxy only
    proxy.reload()

    agents = docker_client.networks.get(f"{instance}-agents")
    assert agents.attrs["Internal"] is True
    assert agents.attrs["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    assert sorted(cap.removeprefix("CAP_") for cap in proxy.attrs["HostConfig"]["CapAdd"]) == ["SETGID", "SETUID"]
    assert proxy.attrs["HostConfig"]["ReadonlyRootfs"] is True
    assert set(proxy.attrs["NetworkSettings"]["Networks"]) == {f"{instance}-agents", f"{instance}-egress",
                                                               hosts.network}

    # Listed: plain HTTP (any port) and CONNECT to 443, with the agent's own proxy settings; the proxy adds nothing
    # about the agent to the request.
    plain = _ran(feishu, allowed, "curl -sS http://allowed.test:8080/", "m-plain")
    assert "hello from allowed.test:8080" in plain
    assert not re.search(r"header (via|x-forwarded-for|forwarded|proxy-authorization)\b", plain)
    tunnel = _ran(feishu, allowed, "curl -sS --proxytunnel http://allowed.test:443/", "m-tunnel")
    assert "hello from allowed.test:443" in tunnel

    # Not listed: squid's ordinary refusal, logged with the chat and the host, and counted.
    refused = _ran(feishu, allowed, "curl -sS -o /dev/null -w 'code=%{http_code}' http://other.test:8080/; "
                                    "curl -sS --proxytunnel http://other.test:443/ 2>&1 | tail -c 200", "m-refused")
    assert "code=403" in refused and "CONNECT tunnel failed, response 403" in refused
    wait_until(lambda: all(re.search(rf"egress refused: {request} .*chat_id={allowed}", bot.log())
                           for request in (r"GET other\.test:8080", r"CONNECT other\.test:443")), 30,
               "both refusals in the log")
    wait_until(lambda: _metric(metrics_port, allowed) >= 2, 30, "the refusals counted")

    # Without the proxy: no route out of the internal network, not even to the listener's address.
    direct = _ran(feishu, allowed, f"curl -sS --noproxy '*' -m 5 http://{hosts.address}:8080/ 2>&1 | tail -c 200",
                  "m-direct")
    assert "curl: (7) Failed to connect" in direct and "hello from" not in direct
    assert docker_client.containers.get(f"{instance}-{allowed}").attrs["HostConfig"]["NetworkMode"] == \
        f"{instance}-agents"

    # A chat in a group with another allowlist: its own list, and its password is worthless under any other user
    # name (the default policy's for itself, or another chat's).
    assert "hello from other.test:8080" in _ran(feishu, grouped, "curl -sS http://other.test:8080/", "m-group")
    default_policy = egress.policy(Egress(allow=("allowed.test",)))
    for user in (egress.proxy_username(grouped, default_policy), egress.proxy_username(allowed, default_policy)):
        forged = _ran(feishu, grouped, 'own=${HTTP_PROXY#http://*:}; own=${own%@*}; '
                                       "curl -sS -o /dev/null -w 'code=%{http_code}' "
                                       f"-x http://{user}:$own@{egress.proxy_name(instance)}:3128 "
                                       "http://allowed.test:8080/", f"m-forged-{user[-6:]}")
        assert "code=407" in forged
    wait_until(lambda: "egress refused: GET allowed.test:8080 (bad proxy credentials" in bot.log(), 30,
               "the forged credentials in the log")

    # egress: none: no network at all, and the model still answers through the gateway's socket.
    nothing = _ran(feishu, isolated, "curl -sS -m 5 http://allowed.test:8080/ 2>&1 | tail -c 200; "
                                     f"curl -sS --noproxy '*' -m 5 http://{hosts.address}:8080/ 2>&1 | tail -c 200",
                   "m-none")
    assert "curl: (6) Could not resolve host: allowed.test" in nothing and "curl: (7) Failed to connect" in nothing
    assert "hello from" not in nothing
    container = docker_client.containers.get(f"{instance}-{isolated}")
    assert container.attrs["HostConfig"]["NetworkMode"] == "none"
    assert not {"HTTP_PROXY", "HTTPS_PROXY"} & {v.split("=", 1)[0] for v in container.attrs["Config"]["Env"]}
    bot.stop()


def _running(client: docker.DockerClient, name: str) -> Container | None:
    try:
        container = client.containers.get(name)
    except docker.errors.NotFound:
        return None
    return container if container.status == "running" else None


def test_an_agents_network_of_an_older_version_is_made_again_internal_once_no_container_runs_on_it(
        make_config, instance: str, docker_client: docker.DockerClient) -> None:
    """Before the egress proxy the agents' network went out to the internet: a start refuses it while a container
    (one an upgrade left running) is on it, saying which, and makes it again as an internal one once none is."""
    name = f"{instance}-agents"
    docker_client.networks.create(name, driver="bridge", labels={"orchestrator.instance": instance}, options={
        runtime.ICC_OPTION: "false", runtime.BRIDGE_NAME_OPTION: runtime.bridge_name(instance)})
    left_running = docker_client.containers.run(AGENT_IMAGE, ["sleep", "300"], name=f"{instance}-left-running",
                                                detach=True, network=name, entrypoint=[],
                                                labels={"orchestrator.instance": instance})
    config = make_config()
    refused = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "--config", str(config)],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert "made by an older version" in refused.stderr and left_running.name in refused.stderr
    assert docker_client.networks.get(name).attrs["Internal"] is False  # nothing was taken from under it

    left_running.remove(force=True)
    assert Orchestrator(config).finish() == 0
    assert docker_client.networks.get(name).attrs["Internal"] is True


def test_a_network_with_ipv6_is_refused(make_config, instance: str, docker_client: docker.DockerClient) -> None:
    """The firewall's rules are IPv4's: an egress network the engine gave IPv6 (its default-network-opts, or an
    operator) would let chats past them, so the start is refused, saying why and what to do."""
    name = f"{instance}-egress"
    ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet="fd00:5ec::/64")])
    docker_client.networks.create(name, driver="bridge", enable_ipv6=True, ipam=ipam,
                                  labels={"orchestrator.instance": instance}, options={
                                      runtime.ICC_OPTION: "false",
                                      runtime.BRIDGE_NAME_OPTION: runtime.egress_bridge_name(instance)})
    refused = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "--config", str(make_config())],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert f"the network {name} has IPv6" in refused.stderr and "docker network rm" in refused.stderr


def test_a_proxy_that_stopped_is_started_again_and_the_firewall_follows_its_address(
        feishu: FakeFeishu, feishu_config, start, instance: str, docker_client: docker.DockerClient,
        hosts: Hosts) -> None:
    allowed = chat()
    bot = start(feishu_config(defaults={"egress": {"allow": ["allowed.test"]}},
                              containers={"idle_stop": 4}))  # housekeeping every 2 s
    proxy = wait_until(lambda: _running(docker_client, egress.proxy_name(instance)), 60, "the egress proxy")
    docker_client.networks.get(hosts.network).connect(proxy)
    assert "hello from allowed.test" in _ran(feishu, allowed, "curl -sS http://allowed.test:8080/", "m-before")

    # Stopped, and another container takes its address meanwhile: it comes back on another one, which the
    # firewall's rule for the agents must follow.
    proxy.stop(timeout=1)
    squatter = docker_client.containers.run(AGENT_IMAGE, ["sleep", "300"], name=f"{instance}-squatter", detach=True,
                                            network=f"{instance}-agents", entrypoint=[],
                                            labels={"orchestrator.instance": instance})
    restarted = wait_until(lambda: _running(docker_client, proxy.name), 30, "the proxy started again")
    assert "is not running; starting it again" in bot.log()
    address = restarted.attrs["NetworkSettings"]["Networks"][f"{instance}-agents"]["IPAddress"]
    agents_chain = firewall.chains(instance).agents
    wait_until(lambda: f"-d {address}/32 -p tcp -m tcp --dport 3128 -j ACCEPT" in _iptables("-S", agents_chain), 30,
               f"the agents' rule for the proxy's address {address}")
    assert "hello from allowed.test" in _ran(feishu, allowed, "curl -sS http://allowed.test:8080/", "m-after")
    squatter.remove(force=True)
    bot.stop()


def _iptables(*args: str) -> str:
    return subprocess.run(["iptables", "-w", "10", *args], capture_output=True, text=True, check=True).stdout
