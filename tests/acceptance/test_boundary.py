"""The container is a boundary (issue 9): a hostile agent, running shell commands in its own chat's container
through the fake model's tool calls, cannot make the root orchestrator write, create, chown or read a host file,
cannot leak a secret or another chat's text into a chat, cannot grow the orchestrator's memory or fill the disk,
and cannot reach the other chats' containers; the bystander chat is answered throughout.

Real engine, real agent image, real CLI, real SQLite; Feishu and the Messages API are the fakes.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests import attacks
from tests.fakes.feishu import FakeFeishu
from tests.harness import Orchestrator, answers, chat, wait_answer, wait_until

SECRET_ENV = "ORCHESTRATOR_TEST_SECRET"


def _start(feishu: FakeFeishu, config: Path, secret: str) -> Orchestrator:
    """The orchestrator with a secret in its own environment (where /proc/self/environ would show it)."""
    bot = Orchestrator(config, env={SECRET_ENV: secret})
    feishu.wait_connected(timeout=60)
    return bot


def _say(feishu: FakeFeishu, chat_id: str, text: str) -> str:
    event = feishu.text_event(chat_id, text)
    feishu.push_event(event)
    return event["event"]["message"]["message_id"]


def _ask(feishu: FakeFeishu, chat_id: str, timeout: float = 90) -> None:
    """A plain question to a chat, answered."""
    marker = uuid.uuid4().hex[:10]
    _say(feishu, chat_id, f"are you there {marker}")
    wait_answer(feishu, chat_id, f"Fake answer to: are you there {marker}", timeout)


@pytest.fixture
def canaries(tmp_path: Path) -> Iterator[Path]:
    """Host files and folders an attacker would aim at: a secret file, a root folder, a path for a new .pth."""
    yield attacks.plant_canaries(tmp_path / "host")


# ---- 1. links, folders and swaps under every name the agent can see or guess ---------------------------------

def test_planted_links_and_folders_reach_no_host_file_secret_or_other_chat(
        feishu: FakeFeishu, feishu_config, tmp_path: Path, canaries: Path, docker_client: docker.DockerClient) -> None:
    secret = f"SECRET-{uuid.uuid4().hex}"
    config = feishu_config(agent={"idle_timeout": 15}, limits={"disk_check_interval": 2})
    bot = _start(feishu, config, secret)
    data = tmp_path / "data"
    attacker, bystander = chat(), chat()
    bystander_marker = f"bystander-{uuid.uuid4().hex[:8]}"
    _say(feishu, bystander, f"RUN_BASH: echo {bystander_marker}")
    wait_answer(feishu, bystander, f"ran: {bystander_marker}")
    _ask(feishu, attacker)
    [bystander_turn] = [p for p in (data / "chats" / bystander / "turns").iterdir() if p.is_dir()]
    pth = attacks.evil_pth()
    targets = attacks.link_targets(canaries, pth, data, bystander, bystander_turn)
    before = attacks.snapshot(tmp_path, skip=data)
    bystander_db = (data / "chats" / bystander / "turns").stat()

    script = attacks.in_workspace(data, attacker, "plant.sh", attacks.PLANTER)
    _say(feishu, attacker, attacks.background(script, "30", *targets))
    began = time.monotonic()
    while time.monotonic() - began < 30:  # the bystander is answered while the planting goes on
        _ask(feishu, bystander, timeout=60)
        _say(feishu, attacker, f"RUN_BASH: cat /turns/*/stderr 2>&1 | head -c 300; echo {uuid.uuid4().hex[:6]}")
        time.sleep(2)
    wait_until(lambda: (data / "chats" / attacker / "workspace" / "planter-finished").exists(), 60,
               "the planter to finish")
    _ask(feishu, attacker, timeout=120)  # the chat answers again once the agent stops
    _ask(feishu, bystander)

    try:
        assert not pth.exists()
        assert attacks.snapshot(tmp_path, skip=data) == before  # nothing outside the chats' folders written or chowned
        assert (canaries / "root-only").stat().st_uid == 0
        assert not (canaries / "new.pth").exists()
        assert (data / "chats" / bystander / "turns").stat().st_uid == bystander_db.st_uid
        assert (data / "orchestrator.db").stat().st_uid == 0
        assert not attacks.leaks(attacks.all_chat_text(feishu), secret, feishu.app_secret)  # secrets, canaries, environ
        assert bystander_marker not in "\n".join(answers(feishu, attacker))  # the other chat's transcript
    finally:
        pth.unlink(missing_ok=True)
    bot.stop()


# ---- 2. gigabytes without a newline -----------------------------------------------------------------------------

def test_gigabytes_without_newlines_keep_the_orchestrator_small_and_the_answer_capped(
        feishu: FakeFeishu, feishu_config, tmp_path: Path, instance: str, docker_client: docker.DockerClient) -> None:
    answer_cap = 200_000
    config = feishu_config(defaults={"disk": "20g"}, limits={"answer_bytes": answer_cap},
                           files={"answer_as_file_bytes": 0})  # the capped answer as messages, not as a file
    bot = _start(feishu, config, "unused")
    data = tmp_path / "data"
    attacker, bystander = chat(), chat()
    _ask(feishu, attacker)
    _ask(feishu, bystander)

    flood = attacks.in_workspace(data, attacker, "flood.sh", attacks.FLOODER)
    _say(feishu, attacker, f"RUN_BASH: bash {flood}; head -c 1G /dev/zero | tr '\\0' q")
    wait_answer(feishu, attacker, "more than 64.0 MiB of output", timeout=180)
    _ask(feishu, bystander)

    forge = attacks.in_workspace(data, attacker, "forge.js", attacks.FORGER)
    forged_id = _say(feishu, attacker, f"RUN_BASH: node {forge}")
    wait_answer(feishu, attacker, "The answer was cut here", timeout=180)
    _ask(feishu, bystander)

    peak = attacks.peak_rss(bot.process.pid)
    print(f"orchestrator peak RSS: {peak / attacks.MIB:.0f} MiB")
    assert peak < 300 * attacks.MIB
    forged_answer = "".join(m.text for m in feishu.messages(attacker) if m.reply_to == forged_id)
    assert answer_cap < len(forged_answer.encode()) < answer_cap + 1000
    assert all(len(m.text) <= 8000 for m in feishu.messages())  # no chat message over the split size
    log_path = docker_client.containers.get(f"{instance}-{attacker}").attrs["LogPath"]
    assert Path(log_path).stat().st_size < 2 * attacks.MIB  # the engine's log of it is capped too
    assert "skipped" in bot.log() and "output line(s) over" in bot.log()
    assert max(len(line) for line in bot.log().splitlines()) < 2000  # only bounded excerpts are logged
    bot.stop()


# ---- 3. the disk budget, and a full disk -------------------------------------------------------------------------

def test_a_chat_over_its_disk_budget_is_stopped_told_and_refused_until_under_it(
        feishu: FakeFeishu, feishu_config, tmp_path: Path, instance: str, docker_client: docker.DockerClient) -> None:
    config = feishu_config(defaults={"disk": "100m"}, limits={"disk_check_interval": 1})
    bot = _start(feishu, config, "unused")
    workspace = tmp_path / "data" / "chats"
    attacker, bystander = chat(), chat()
    _ask(feishu, attacker)
    fill = attacks.in_workspace(tmp_path / "data", attacker, "fill.sh", attacks.FILLER)
    _say(feishu, attacker, f"RUN_BASH: bash {fill}")
    wait_answer(feishu, attacker, "over its disk budget of 100.0 MiB", timeout=120)
    used = attacks.used(workspace / attacker)
    assert used < 300 * attacks.MIB  # stopped long before the 600 MiB it meant to write
    assert docker_client.containers.get(f"{instance}-{attacker}").status != "running"  # its writers are gone
    _ask(feishu, bystander)

    refused = _say(feishu, attacker, "one more please")
    wait_until(lambda: any(m.reply_to == refused and "No answer can start" in m.text
                           for m in feishu.messages(attacker)), 60, "the refusal")
    for path in (workspace / attacker / "workspace").glob("fill-*"):  # an operator frees space
        path.unlink()
    _ask(feishu, attacker, timeout=120)
    bot.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with attacks.tmpfs(tmp_path / "small", "96m") as mount:
        yield mount


def test_the_service_survives_a_full_disk_and_recovers_when_space_is_back(
        feishu: FakeFeishu, feishu_config, small_disk: Path) -> None:
    config = feishu_config(data_dir=str(small_disk / "data"), limits={"min_free_disk": "24m"},
                           defaults={"disk": "16m"})
    bot = _start(feishu, config, "unused")
    first = chat()
    _ask(feishu, first)

    filler = attacks.fill(small_disk, leave=12 * attacks.MIB)  # under the floor, with room left for the store
    nearly = _say(feishu, first, "while the disk is nearly full")
    wait_until(lambda: any(m.reply_to == nearly and "disk is nearly full" in m.text for m in feishu.messages(first)),
               60, "the refusal for a nearly full disk")
    assert "refusing a turn" in bot.log()

    attacks.fill(small_disk, leave=0)  # full: not even the store can write
    full_event = feishu.text_event(first, "while the disk is full")
    frame = feishu.push_event(full_event)
    assert feishu.wait_ack(frame, timeout=10).code != 200  # not stored, so not acked: Feishu delivers it again
    assert bot.process.poll() is None

    filler.unlink()  # space is back
    feishu.push_event(full_event)  # Feishu's redelivery
    wait_answer(feishu, first, "Fake answer to: while the disk is full", timeout=120)
    _ask(feishu, first)
    assert bot.process.poll() is None
    bot.stop()


# ---- 4. networks ---------------------------------------------------------------------------------------------


def _iptables(*args: str) -> str:
    return subprocess.run(["iptables", "-w", "10", *args], capture_output=True, text=True, check=True).stdout


def test_agents_reach_neither_each_other_nor_the_host_and_the_model_still_works(
        feishu: FakeFeishu, feishu_config, instance: str, docker_client: docker.DockerClient, tmp_path: Path) -> None:
    bot = _start(feishu, feishu_config(), "unused")
    attacker, neighbour = chat(), chat()
    _ask(feishu, attacker)  # the model on the host's loopback is reached through the gateway
    _ask(feishu, neighbour)

    network = docker_client.networks.get(f"{instance}-agents")
    assert network.attrs["Internal"] is True  # no route out: only the egress proxy is reachable on it
    assert network.attrs["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    assert network.attrs["Labels"]["orchestrator.instance"] == instance
    target = docker_client.containers.get(f"{instance}-{neighbour}")
    assert target.attrs["HostConfig"]["NetworkMode"] == f"{instance}-agents"
    address = target.attrs["NetworkSettings"]["Networks"][f"{instance}-agents"]["IPAddress"]
    # A listener the test starts in the neighbour's container; it answers from inside that container.
    attacks.listen(target, 8099)

    _say(feishu, attacker, f"RUN_BASH: {attacks.probe(address, 8099)}")
    wait_answer(feishu, attacker, "unreachable-", timeout=90)
    assert attacks.NEIGHBOUR_REPLY not in "\n".join(answers(feishu, attacker))

    # The host and everything private or link-local: proven from the rules installed, not by probing them.
    egress_network = docker_client.networks.get(f"{instance}-egress")
    agents_bridge = network.attrs["Options"]["com.docker.network.bridge.name"]
    egress_bridge = egress_network.attrs["Options"]["com.docker.network.bridge.name"]
    docker_user, host_input = _iptables("-S", "DOCKER-USER"), _iptables("-S", "INPUT")
    [agents_chain] = [line.split()[-1] for line in docker_user.splitlines() if f"-i {agents_bridge} " in line]
    [forward_chain] = [line.split()[-1] for line in docker_user.splitlines() if f"-i {egress_bridge} " in line]
    proxy = docker_client.containers.get(f"{instance}-egress-proxy")
    proxy_address = proxy.attrs["NetworkSettings"]["Networks"][f"{instance}-agents"]["IPAddress"]
    agents_rules = _iptables("-S", agents_chain).splitlines()[1:]
    assert [rule for rule in agents_rules if "ACCEPT" in rule] == [
        f"-A {agents_chain} -s {proxy_address}/32 -p tcp -m tcp --sport 3128 -m conntrack --ctstate "
        "RELATED,ESTABLISHED -j ACCEPT",
        f"-A {agents_chain} -d {proxy_address}/32 -p tcp -m tcp --dport 3128 -j ACCEPT"]  # the proxy's port only
    assert agents_rules[-1] == f"-A {agents_chain} -j REJECT --reject-with icmp-net-prohibited"
    forward = _iptables("-S", forward_chain)  # the egress network's way out: the proxy's, and `egress: open`'s
    for blocked in ("169.254.0.0/16", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"):
        assert f"-d {blocked} -j REJECT" in forward
    for protocol, port in (("tcp", 2377), ("tcp", 7946), ("udp", 7946), ("udp", 4789)):  # Swarm's, on any address
        assert f"-p {protocol} -m {protocol} --dport {port} -j REJECT" in forward
    for bridge in (agents_bridge, egress_bridge):
        [local_chain] = [line.split()[-1] for line in host_input.splitlines() if f"-i {bridge} " in line]
        assert _iptables("-S", local_chain).splitlines()[-1].startswith(f"-A {local_chain} -j REJECT")
    rules = docker_user.splitlines()[1:]  # after "-N DOCKER-USER"
    before = rules[:max(n for n, rule in enumerate(rules) if rule.endswith((forward_chain, agents_chain)))]
    assert all("-j ORCH-" in rule for rule in before)  # nothing accepts before them (other instances' jumps may)
    bot.stop()


def _config_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "config", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


def test_host_and_container_networks_are_refused_unless_named_unsafe(make_config) -> None:
    for network in ("host", "bridge", "container:other"):
        check = _config_check(make_config(defaults={"network": network}))
        assert check.returncode == 2 and "defaults.network" in check.stderr and "unsafe_network" in check.stderr
    assert _config_check(make_config(defaults={"network": "none"})).returncode == 0
    assert _config_check(make_config(defaults={"network": "host", "unsafe_network": True})).returncode == 0


def test_firewall_rules_taken_away_are_put_back(feishu: FakeFeishu, feishu_config, instance: str,
                                                docker_client: docker.DockerClient) -> None:
    bot = _start(feishu, feishu_config(containers={"idle_stop": 2}), "unused")  # housekeeping every second
    bridge = docker_client.networks.get(f"{instance}-agents").attrs["Options"]["com.docker.network.bridge.name"]
    [jump] = [line for line in _iptables("-S", "DOCKER-USER").splitlines() if f"-i {bridge} " in line]
    chain = jump.split()[-1]
    first_reject = next(line for line in _iptables("-S", chain).splitlines() if "REJECT" in line)
    _iptables("-D", *jump.split()[1:])  # a firewall reload, a flush by hand
    _iptables("-D", *first_reject.split()[1:])
    wait_until(lambda: jump in _iptables("-S", "DOCKER-USER") and first_reject in _iptables("-S", chain), 30,
               "the rules to be put back")
    bot.wait_log("firewall rules were changed or removed (or the egress proxy's address changed); installing them")
    # a firewall manager's reload (or an operator) puts rules above the jumps that would let the chats' packets
    # through first: the jumps go back on top, the other rules stay below them
    accepts = [("DOCKER-USER", ["-i", bridge, "-j", "ACCEPT"]), ("INPUT", ["-i", bridge, "-j", "ACCEPT"])]
    try:
        for parent, rule in accepts:
            _iptables("-I", parent, "1", *rule)
        wait_until(lambda: _first_for(bridge, "DOCKER-USER") == jump
                   and _first_for(bridge, "INPUT").startswith(f"-A INPUT -i {bridge} -j ORCH-"), 30,
                   "the jumps to be put back above the ACCEPT rules")
        for parent, rule in accepts:
            assert " ".join(["-A", parent, *rule]) in _iptables("-S", parent).splitlines()
    finally:
        for parent, rule in accepts:
            subprocess.run(["iptables", "-w", "10", "-D", parent, *rule], capture_output=True)
    bot.stop()


def _first_for(bridge: str, chain: str) -> str:
    """The first rule of `chain` for packets from `bridge`."""
    return next(line for line in _iptables("-S", chain).splitlines() if f" -i {bridge} " in line)
