"""The Swarm runtime (issue 14): the real orchestrator with `runtime: swarm` on a Swarm of three Docker-in-Docker nodes
the session made (tests/swarm.py), the agent image from a local registry, the chats' folders on storage every node
mounts at the same path, the real CLI against the fake model, through the fake Feishu."""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
from docker.models.containers import Container

from orchestrator import agent_host, firewall
from orchestrator.runtime import CHAT_LABEL, INSTANCE_LABEL, MANAGED_LABEL, SWARM_TASK_LABEL, SWARM_WATCH_SECONDS
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.feishu import FakeFeishu
from tests.harness import (
    AGENT_IMAGE,
    MODEL_KEY,
    ORCHESTRATOR_IMAGE,
    StoreView,
    answers,
    chat,
    run_cli,
    status_json,
    wait_answer,
    wait_until,
)
from tests.postgres import PostgresServer
from tests.swarm import Swarm

MiB = 1024**2


@dataclass(frozen=True)
class OnSwarm:
    swarm: Swarm
    model_url: str  # the fake model API as the nodes' gateways reach it (through a relay on their network)
    store_url: str  # the test's database, as the orchestrator and the nodes' gateways reach it (through a relay)
    store: StoreView  # the same database, read by the test


@pytest.fixture
def on_swarm(swarm_cluster: Swarm, instance: str, fake_api: FakeAnthropic,
             postgres_server: PostgresServer) -> Iterator[OnSwarm]:
    """The session's Swarm, prepared for this test's instance as an operator would, with the test's fake model API and
    a new database on the session's PostgreSQL server reachable from its nodes; its services, the relays and the
    database removed after."""
    swarm_cluster.prepare_instance(instance)
    fake_api.serve_unix(swarm_cluster.folder / f"{instance}-model.sock")
    model = swarm_cluster.relay(f"{instance}-model", swarm_cluster.folder / f"{instance}-model.sock")
    database = f"t_{uuid.uuid4().hex[:12]}"
    postgres_server.create_database(database)
    store = swarm_cluster.relay(f"{instance}-store", postgres_server.socket)
    yield OnSwarm(swarm_cluster, f"http://{model}", postgres_server.url(database, store),
                  StoreView(postgres_server.url(database)))
    swarm_cluster.remove_instance(instance)
    for relay in ("model", "store"):
        swarm_cluster.remove_relay(f"{instance}-{relay}")
    postgres_server.drop_database(database)


def swarm_config(feishu_config: Callable[..., Path], on: OnSwarm, instance: str, swarm_section: dict | None = None,
                 **sections: object) -> Path:
    """The instance's data on the shared storage (the same path on every node) and its store in the test's database
    (migrated, as an operator would before the first start); chats spread over the zones unless `defaults` says
    otherwise; the gateway on every node, to the fake model through the relay."""
    swarm = on.swarm
    sections.setdefault("defaults", {"egress": "none", "placement": {"spread": ["node.labels.zone"]}})
    config = feishu_config(data_dir=str(swarm.shared / instance / "data"), runtime="swarm",
                           swarm={"manager": swarm.manager_url, "orchestrator_image": swarm.orchestrator_image,
                                  **(swarm_section or {})},
                           gateway={"upstream_url": on.model_url, "api_key": MODEL_KEY},
                           agent={"image": swarm.agent_image}, store={"url": on.store_url}, **sections)
    migrated = run_cli(config, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    return config


# A listener on a chat task's own 127.0.0.1:53, run beside it in its network namespace (a container on its node with
# `--network container:TASK` and the capability to bind port 53, which neither the agent nor an exec in the task has).
DNS_LISTENER = """
import socket
listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
listener.bind(("127.0.0.1", 53))
print("listening", flush=True)
while True:
    print("heard", listener.recvfrom(512)[0], flush=True)
"""
TCP_LISTENER = """
import socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("0.0.0.0", int(sys.argv[1])))
listener.listen()
print("listening", flush=True)
while True:
    connection, peer = listener.accept()
    print("accepted", peer[0], flush=True)
    connection.close()
"""
CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    print("connected")
except OSError as exc:
    print("not connected:", exc)
"""
# Swarm's ports (firewall.SWARM_PORTS) and one more of each kind that nothing closes, on the test's host "out
# there": what reaches it is printed.
SWARM_PORTS_LISTENER = """
import os, socket, threading
def serve(kind, port):
    server = socket.socket(type=socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))
    if kind == "tcp":
        server.listen()
    def loop():
        while True:
            if kind == "tcp":
                server.accept()[0].close()
            else:
                server.recvfrom(2048)
            os.write(1, f"got {kind} {port}\\n".encode())  # one write: the threads' lines do not mix
    threading.Thread(target=loop, daemon=True).start()
for kind, port in (("tcp", 2377), ("tcp", 7946), ("udp", 7946), ("udp", 4789), ("tcp", 8081), ("udp", 4790)):
    serve(kind, port)
print("listening", flush=True)
threading.Event().wait()
"""
# What a hostile open chat sends to those ports: a connection to each TCP one, datagrams to each UDP one.
SWARM_PORTS_SEND = """
import socket, sys
for kind, port in (("tcp", 2377), ("tcp", 7946), ("udp", 7946), ("udp", 4789), ("tcp", 8081), ("udp", 4790)):
    if kind == "tcp":
        try:
            socket.create_connection((sys.argv[1], port), timeout=5).close()
        except OSError:
            pass
    else:
        sender = socket.socket(type=socket.SOCK_DGRAM)
        for _ in range(3):
            try:  # a rejected datagram's ICMP answer fails the socket's next send
                sender.sendto(b"vxlan?", (sys.argv[1], port))
            except OSError:
                pass
print("sent", flush=True)
"""
LOOKUP = "import socket, sys\ntry:\n    socket.getaddrinfo(sys.argv[1], 80)\nexcept OSError:\n    pass\n"


def ask(feishu: FakeFeishu, chat_id: str, text: str) -> None:
    feishu.push_event(feishu.text_event(chat_id, text))
    wait_answer(feishu, chat_id, f"Fake answer to: {text}", timeout=180)


def test_chats_are_services_placed_over_the_nodes_answered_by_the_real_cli(
        on_swarm: OnSwarm, instance: str, feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic) -> None:
    swarm = on_swarm.swarm
    gpu, zone_a, zone_b, anywhere = chat(), chat(), chat(), chat()
    spread = [zone_a, zone_b, anywhere]
    config = swarm_config(feishu_config, on_swarm, instance, containers={"stop_timeout": 4}, groups={
        gpu: {"placement": {"constraints": ["node.labels.gpu==true"], "reserve_cpus": 0.25, "reserve_memory": "64m"}},
        zone_a: {"placement": {"constraints": ["node.labels.zone==a"]}},
        zone_b: {"placement": {"constraints": ["node.labels.zone==b", "node.labels.gpu!=true"]}}})
    bot = start(config)
    marker = uuid.uuid4().hex[:8]
    for chat_id in (gpu, *spread):
        feishu.push_event(feishu.text_event(chat_id, f"hello {chat_id} {marker}"))
    for chat_id in (gpu, *spread):
        wait_answer(feishu, chat_id, f"Fake answer to: hello {chat_id} {marker}", timeout=180)

    # `docker service ls` on the manager: every chat a service of one running replica, with its labels and limits
    listed = swarm.exec(swarm.manager, "docker", "service", "ls", "--filter", f"label=orchestrator.instance={instance}",
                        "--format", "{{.Name}} {{.Replicas}}").split("\n")
    assert sorted(line for line in listed if line) == sorted(
        [*(f"{instance}-{c} 1/1" for c in (gpu, *spread)),
         f"{instance}-guard 3/3", f"{instance}-gateway 3/3"])  # the guard and the model gateway on every node
    nodes = {}
    for chat_id in (gpu, *spread):
        service = swarm.service(f"{instance}-{chat_id}")["Spec"]
        assert service["Labels"]["orchestrator.chat_id"] == chat_id
        assert service["Labels"]["orchestrator.managed"] == "true"
        assert service["Labels"]["orchestrator.instance"] == instance
        task = service["TaskTemplate"]
        assert task["Resources"]["Limits"] == {"NanoCPUs": 1_000_000_000, "MemoryBytes": 512 * MiB, "Pids": 200}
        assert task["ContainerSpec"]["ReadOnly"] and task["ContainerSpec"]["CapabilityDrop"] == ["ALL"]
        assert task["ContainerSpec"]["User"] == "1000:1000"
        assert task["ContainerSpec"]["Image"].startswith(f"{swarm.agent_image}@sha256:")  # pinned to the pushed build
        assert task["ContainerSpec"]["StopGracePeriod"] == 4 * 10**9  # containers.stop_timeout, not Swarm's 10 s
        nodes[chat_id] = swarm.task_node(f"{instance}-{chat_id}")
    gpu_service = swarm.service(f"{instance}-{gpu}")["Spec"]["TaskTemplate"]
    assert gpu_service["Placement"] == {"Constraints": ["node.labels.gpu==true",
                                                        f"node.labels.orchestrator.ready.{instance}==true"]}
    assert gpu_service["Resources"]["Reservations"] == {"NanoCPUs": 250_000_000, "MemoryBytes": 64 * MiB}
    # each where its group's constraints put it (node 1 is zone a; nodes 2 and 3 zone b, node 3 alone gpu=true)
    assert (nodes[gpu], nodes[zone_a], nodes[zone_b]) == tuple(swarm.nodes[n] for n in (2, 0, 1))
    assert nodes[anywhere] in swarm.nodes
    # the task container on its node carries the caps (the node's engine, as the kernel will apply them)
    container = swarm.exec(nodes[gpu], "docker", "ps", "-q", "--filter", f"label=orchestrator.chat_id={gpu}").strip()
    caps = swarm.exec(nodes[gpu], "docker", "inspect", "--format",
                      "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}} {{.HostConfig.PidsLimit}}", container).split()
    assert caps == ["1000000000", str(512 * MiB), "200"]
    # no IPv6 in the task's namespace: no address at all (the guard's rules are IPv4's)
    assert swarm.exec(nodes[gpu], "docker", "exec", container, "cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6",
                      "/proc/net/if_inet6").strip() == "1"
    # its model socket is its node's gateway's, in the node's own folder (a unix socket does not cross hosts), not in
    # its run folder on the shared storage
    swarm.exec(nodes[gpu], "test", "-S", f"/var/lib/orchestrator/{instance}/model/{gpu}/model.sock")
    assert not (swarm.shared / instance / "data" / "run" / gpu / "model.sock").exists()
    # A lookup in the task is asked from the task's own network namespace (a listener on its own 127.0.0.1:53
    # hears it; the chats' internal network answers nothing else), not forwarded by its node's engine to the node's
    # resolver from the node's namespace: Debian's 20.10 engines do that (CVE-2024-29018), a way out by DNS.
    listener = swarm.exec(nodes[gpu], "docker", "run", "-d", "--network", f"container:{container}", "--cap-drop", "ALL",
                          "--cap-add", "NET_BIND_SERVICE", "-u", "0", "--entrypoint", "python3", swarm.agent_image,
                          "-c", DNS_LISTENER).strip()
    try:
        wait_until(lambda: "listening" in swarm.exec(nodes[gpu], "docker", "logs", listener), 30, "the DNS listener")
        swarm.exec(nodes[gpu], "docker", "exec", container, "python3", "-c", LOOKUP, f"probe-{marker}.invalid")
        wait_until(lambda: f"probe-{marker}" in swarm.exec(nodes[gpu], "docker", "logs", listener), 30,
                   "the lookup at the task's own 127.0.0.1:53")  # the query's bytes, the name's labels in them
    finally:
        swarm.run(nodes[gpu], "docker", "rm", "-f", listener)

    # orchestrator status: each chat's node
    rows = {row["chat_id"]: row for row in status_json(config)}
    assert {chat_id: rows[chat_id]["node"] for chat_id in nodes} == nodes
    assert all(rows[c]["container_state"] == "running" for c in nodes)
    # and its use of its caps, as its agent host reports it from its cgroup (the node's engine's stats are out of
    # reach from here)
    assert all(rows[c]["memory_mib"] and rows[c]["memory_mib"] > 1 and rows[c]["pids"] for c in nodes), rows
    assert all(rows[c]["usage_from"] == "agent" for c in nodes)  # marked as the agent's own report

    # idle stop is a scale to zero; the next message scales it up again, in the same session
    session = on_swarm.store.chat(spread[0])["session_id"]
    assert session
    assert run_cli(config, "stop", spread[0]).returncode == 0
    assert swarm.exec(swarm.manager, "docker", "service", "ls", "--filter", f"name={instance}-{spread[0]}",
                      "--format", "{{.Replicas}}").strip() == "0/0"
    ask(feishu, spread[0], f"again {marker}")
    assert on_swarm.store.chat(spread[0])["session_id"] == session
    # the model saw the first exchange: the CLI resumed the session from the chat's folder
    assert f"hello {spread[0]} {marker}" in str(fake_api.requests_mentioning(f"again {marker}")[-1]["messages"])

    # a turn refused processes by its pids cap (200): the task's agent host counts the refusals from its cgroup on
    # its node into the turn's folder on the shared storage (no `docker exec` reaches another node); the chat is
    # told, its container restarted where the turn failed for it, and it answers again
    bomb = "RUN_BASH: for i in $(seq 300); do sleep 5 & done; wait; echo forked"
    feishu.push_event(feishu.text_event(anywhere, bomb))
    wait_until(lambda: any("ran:" in t or "limit of 200" in t for t in answers(feishu, anywhere)), 180,
               "the turn at the pids cap to end")
    counted = [int(hits.read_text()) for hits in (swarm.shared / instance / "data" / "chats" / anywhere / "turns").glob(
        f"*/{agent_host.LIMIT_HITS}")]
    assert counted and max(counted) > 0, counted
    ask(feishu, anywhere, f"after the cap {marker}")
    assert bot.stop() == 0
    # a planned stop on a shared store leaves every chat's task running for the next leader (a standby may be one)
    bot.wait_log("leaving 0 running turn(s) and the containers for the next leader", timeout=5)
    assert all(swarm.task_node(f"{instance}-{c}") for c in nodes)


def test_a_drained_nodes_chat_comes_up_elsewhere_its_running_turn_told_its_session_intact(
        on_swarm: OnSwarm, instance: str, feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic) -> None:
    swarm = on_swarm.swarm
    chat_id, marker = chat(), uuid.uuid4().hex[:8]
    config = swarm_config(feishu_config, on_swarm, instance)
    bot = start(config)
    ask(feishu, chat_id, f"first {marker}")
    name = f"{instance}-{chat_id}"
    before = swarm.task_node(name)
    store = on_swarm.store
    session = store.chat(chat_id)["session_id"]
    # a turn that runs (its command sleeps) when the node is drained
    feishu.push_event(feishu.text_event(chat_id, f"RUN_BASH: sleep 20; echo slept-{marker}"))
    wait_until(lambda: fake_api.requests_mentioning(f"slept-{marker}"), 60, "the turn to run")
    time.sleep(2 * SWARM_WATCH_SECONDS + 1)  # the watch looks every 2 s: it has seen the task run
    swarm.exec(swarm.manager, "docker", "node", "update", "--availability", "drain", before)
    try:
        after = wait_until(lambda: (node := swarm.task_node(name)) not in ("", before) and node, 120,
                           f"{name}'s task to move off {before}")
        bot.wait_log("the chat's container stopped", timeout=30)  # the watch saw the task go
        # the running turn is told, and is not run again in the new task
        wait_answer(feishu, chat_id, "this answer is not run again", timeout=60)
        [told] = [m for m in store.messages(chat_id) if m["text"].startswith("RUN_BASH")]
        assert told["state"] == "failed"
        ask(feishu, chat_id, f"second {marker}")
        assert not any(f"ran: slept-{marker}" in text for text in answers(feishu, chat_id))
        assert len([r for r in fake_api.requests_mentioning(f"slept-{marker}")
                    if f"second {marker}" not in json.dumps(r)]) == 1  # asked once, never again
        # the session is intact: the CLI in the new task resumed it from the chat's folder on the shared storage
        assert store.chat(chat_id)["session_id"] == session
        assert f"first {marker}" in json.dumps(fake_api.requests_mentioning(f"second {marker}")[-1]["messages"])
        assert {row["chat_id"]: row["node"] for row in status_json(config)}[chat_id] == after
    finally:
        swarm.exec(swarm.manager, "docker", "node", "update", "--availability", "active", before)
    assert bot.stop() == 0


def test_a_lost_nodes_chat_comes_up_on_another_with_its_session(
        on_swarm: OnSwarm, instance: str, feishu: FakeFeishu, feishu_config, start, fake_api: FakeAnthropic) -> None:
    """A worker's whole engine killed (its container, as a host that crashes): Swarm marks the node down and starts
    the chat's task on the other worker; the next message is answered there in the same session."""
    swarm = on_swarm.swarm
    chat_id, marker = chat(), uuid.uuid4().hex[:8]
    config = swarm_config(feishu_config, on_swarm, instance,
                          defaults={"egress": "none", "placement": {"constraints": ["node.role==worker"]}})
    bot = start(config)
    ask(feishu, chat_id, f"first {marker}")
    name = f"{instance}-{chat_id}"
    lost = swarm.task_node(name)
    session = on_swarm.store.chat(chat_id)["session_id"]
    began = time.monotonic()
    swarm.kill_node(lost)
    try:
        after = wait_until(lambda: (node := swarm.task_node(name)) not in ("", lost) and node, 120,
                           f"{name}'s task to come up off {lost}")
        moved = time.monotonic() - began
        ask(feishu, chat_id, f"second {marker}")
        assert on_swarm.store.chat(chat_id)["session_id"] == session
        assert f"first {marker}" in json.dumps(fake_api.requests_mentioning(f"second {marker}")[-1]["messages"])
        assert {row["chat_id"]: row["node"] for row in status_json(config)}[chat_id] == after
        print(f"\nswarm: the chat's task ran again on {after} {moved:.1f} s after {lost} was killed")
        # The task on the lost node still reads as running (its node cannot say otherwise): a stop must not wait
        # for it (its grace, 10 s, and 60 s more, past run_cli's 60 s)
        stopped = run_cli(config, "stop", chat_id)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
        assert swarm.task_node(name) == ""
    finally:
        swarm.restart_node(lost)
    assert bot.stop() == 0


def test_a_chat_no_node_can_take_is_told_and_scaled_back_to_zero(
        on_swarm: OnSwarm, instance: str, feishu: FakeFeishu, feishu_config, start,
        docker_client: docker.DockerClient) -> None:
    """A chat whose placement no node meets: its task waits for a node; after swarm.start_timeout the message is
    answered with the error and the service goes back to zero replicas (left at one, Swarm would go on trying, and idle
    stop, which looks at running chats, would never take it down). And a chat's container this host's engine still
    runs from `runtime: docker` (its agent host would take the chat's turns from the shared folder) is stopped at the
    start."""
    swarm = on_swarm.swarm
    chat_id, earlier = chat(), chat()
    config = swarm_config(feishu_config, on_swarm, instance, {"start_timeout": 8}, groups={
        chat_id: {"placement": {"constraints": ["node.labels.nowhere==true"]}}})
    labels = {MANAGED_LABEL: "true", INSTANCE_LABEL: instance}
    left = docker_client.containers.run(ORCHESTRATOR_IMAGE, ["300"], entrypoint="sleep", init=True, detach=True,
                                        name=f"{instance}-{earlier}", labels={**labels, CHAT_LABEL: earlier})
    # a chat's task on this host's engine, were it a Swarm node (as a manager is by default): Swarm's, left alone
    task = docker_client.containers.run(ORCHESTRATOR_IMAGE, ["300"], entrypoint="sleep", init=True, detach=True,
                                        labels={**labels, CHAT_LABEL: chat(), SWARM_TASK_LABEL: "t" * 25})
    try:
        bot = start(config)
        bot.wait_log(f"reconcile: stopped {instance}-{earlier}, left running by another runtime", timeout=60)
        bot.wait_log("reconciled with the engine", timeout=10)
        for container in (left, task):
            container.reload()
        assert (left.status, task.status) == ("exited", "running")
        assert "reconcile: stopped" not in bot.log().replace(f"reconcile: stopped {instance}-{earlier},", "")
    finally:
        for container in (left, task):
            container.remove(force=True)
    feishu.push_event(feishu.text_event(chat_id, "hello"))
    wait_answer(feishu, chat_id, "The chat's container could not be started", timeout=90)
    bot.wait_log("has no running task after 8 s (swarm.start_timeout), and is scaled to zero", timeout=10)
    assert swarm.service(f"{instance}-{chat_id}")["Spec"]["Mode"] == {"Replicated": {"Replicas": 0}}
    assert swarm.task_node(f"{instance}-{chat_id}") == ""
    assert bot.stop() == 0


def test_a_chat_reaches_nothing_of_its_node_nor_another_chat_there(
        on_swarm: OnSwarm, instance: str, feishu: FakeFeishu, feishu_config, start) -> None:
    """The guard (a global service) keeps each node's rules for the chats' bridge: a listener of the node's own, on
    all its addresses, is refused to a chat at the bridge's gateway address, and a listener in another chat on the
    node too, on a worker whose config network leaves enable_icc on (the operator's step, missed there)."""
    swarm = on_swarm.swarm
    node = swarm.nodes[1]
    swarm.exec(node, "docker", "network", "rm", f"{instance}-chats-node")
    swarm.exec(node, "docker", "network", "create", "--config-only", f"{instance}-chats-node")  # icc left on
    one, two = chat(), chat()
    config = swarm_config(feishu_config, on_swarm, instance, defaults={
        "egress": "none", "placement": {"constraints": [f"node.hostname=={node}"]}})
    bot = start(config)
    for chat_id in (one, two):
        ask(feishu, chat_id, f"hello {chat_id}")
    # the guard and the model gateway run on every node, and every node carries the label chats are placed by
    for service in (f"{instance}-guard", f"{instance}-gateway"):
        tasks = swarm.exec(swarm.manager, "docker", "service", "ps", service, "--filter", "desired-state=running",
                           "--format", "{{.Node}} {{.CurrentState}}").splitlines()
        assert sorted(line.split()[0] for line in tasks if " Running " in f" {line} ") == sorted(swarm.nodes)
    for each in swarm.nodes:
        labels = json.loads(swarm.exec(swarm.manager, "docker", "node", "inspect", "--format",
                                       "{{json .Spec.Labels}}", each))
        assert labels.get(f"orchestrator.ready.{instance}") == "true", (each, labels)
    # its rules on the node, for the chats' bridge (named by the network's id)
    network = json.loads(swarm.exec(node, "docker", "network", "inspect", f"{instance}-chats"))[0]
    bridge, gateway = f"br-{network['Id'][:12]}", network["IPAM"]["Config"][0]["Gateway"]
    chain = firewall.node_chain(instance)
    assert swarm.exec(node, "iptables", "-S", chain).splitlines() == [
        f"-N {chain}", f"-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        f"-A {chain} -j REJECT --reject-with icmp-host-prohibited"]
    assert f"-A INPUT -i {bridge} -j {chain}" in swarm.exec(node, "iptables", "-S", "INPUT").splitlines()
    assert f"-A DOCKER-USER -i {bridge} -o {bridge} -j DROP" in swarm.exec(
        node, "iptables", "-S", "DOCKER-USER").splitlines()

    tasks = {c: swarm.exec(node, "docker", "ps", "-q", "--filter", f"label=orchestrator.chat_id={c}").strip()
             for c in (one, two)}
    two_address = json.loads(swarm.exec(node, "docker", "inspect", tasks[two]))[0][
        "NetworkSettings"]["Networks"][f"{instance}-chats"]["IPAddress"]
    on_node = swarm.exec(node, "docker", "run", "-d", "--network", "host", "--entrypoint", "python3",
                         swarm.agent_image, "-c", TCP_LISTENER, "18080").strip()
    in_two = swarm.exec(node, "docker", "run", "-d", "--network", f"container:{tasks[two]}", "--entrypoint",
                        "python3", swarm.agent_image, "-c", TCP_LISTENER, "18081").strip()
    try:
        for listener in (on_node, in_two):
            wait_until(lambda listener=listener: "listening" in swarm.exec(node, "docker", "logs", listener), 30,
                       "a test listener")
        # each listener answers where it is (from the node; from chat two's own namespace)...
        assert swarm.exec(node, "docker", "exec", on_node, "python3", "-c", CONNECT, gateway, "18080").strip() \
            == "connected"
        assert swarm.exec(node, "docker", "exec", in_two, "python3", "-c", CONNECT, two_address, "18081").strip() \
            == "connected"
        # ...and neither to chat one
        to_node = swarm.exec(node, "docker", "exec", tasks[one], "python3", "-c", CONNECT, gateway, "18080")
        to_two = swarm.exec(node, "docker", "exec", tasks[one], "python3", "-c", CONNECT, two_address, "18081")
        assert to_node.startswith("not connected") and to_two.startswith("not connected"), (to_node, to_two)
        one_address = json.loads(swarm.exec(node, "docker", "inspect", tasks[one]))[0][
            "NetworkSettings"]["Networks"][f"{instance}-chats"]["IPAddress"]
        for listener in (on_node, in_two):
            assert f"accepted {one_address}" not in swarm.exec(node, "docker", "logs", listener)
    finally:
        swarm.run(node, "docker", "rm", "-f", on_node, in_two)
    assert bot.stop() == 0


# Answers any GET with the Host it asked for (test_egress's listener): on 8080, and as root on 443.
HTTP_LISTENER = r"""
import http.server, threading
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from " + self.headers.get("Host", "?") + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        print("accepted", self.client_address[0], flush=True)
servers = [http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler) for port in (8080, 443)]
threading.Thread(target=servers[1].serve_forever, daemon=True).start()
print("listening", flush=True)
servers[0].serve_forever()
"""
# What a hostile agent whose chat has egress: none tries: its node's egress socket, straight (relayed to the proxy,
# it would wait for a request and time out; closed at once, it reads the end).
SOCKET_STRAIGHT = ('python3 -c \'import socket; s = socket.socket(socket.AF_UNIX); s.settimeout(10); '
                   's.connect("/run/orchestrator/egress.sock"); print("got", s.recv(200))\'')


@pytest.fixture
def outside(docker_client: docker.DockerClient, swarm_cluster: Swarm) -> Iterator[tuple[str, Container]]:
    """The test's hosts: a network of its own in a documentation range (TEST-NET-2, 198.51.100.0/24, which no rule
    closes: it stands for the internet), every node joined to it, and a listener there named allowed.test and
    other.test; also on the nodes' own network (a private range) as private.test. The network's name and the
    listener."""
    name = f"{swarm_cluster.prefix}-outside-{uuid.uuid4().hex[:6]}"
    pool = docker.types.IPAMPool(subnet="198.51.100.0/24")
    network = docker_client.networks.create(name, driver="bridge", ipam=docker.types.IPAMConfig(pool_configs=[pool]),
                                            labels={"orchestrator.test": "swarm"})
    listener = docker_client.containers.run(AGENT_IMAGE, ["python3", "-u", "-c", HTTP_LISTENER], name=name,
                                            user="0:0", detach=True, network=name, entrypoint=[],
                                            labels={"orchestrator.test": "swarm"})
    try:
        wait_until(lambda: b"listening" in listener.logs(), 60, "the test's listener")
        network.disconnect(listener)
        network.connect(listener, aliases=["allowed.test", "other.test"])
        docker_client.networks.get(swarm_cluster.network).connect(listener, aliases=["private.test"])
        yield name, listener
    finally:
        listener.remove(force=True)
        network.reload()
        for container in network.containers:
            network.disconnect(container, force=True)
        network.remove()


def ran(feishu: FakeFeishu, chat_id: str, command: str, marker: str) -> str:
    """A command run in the chat's task through the CLI (the fake model's RUN_BASH); its output."""
    feishu.push_event(feishu.text_event(chat_id, f"RUN_BASH: {command}; echo {marker}"))
    wait_answer(feishu, chat_id, marker, timeout=180)
    return next(text for text in answers(feishu, chat_id) if marker in text)


def test_a_chat_reaches_its_allowlist_through_its_nodes_proxy_and_nothing_else(
        on_swarm: OnSwarm, instance: str, feishu: FakeFeishu, feishu_config, start,
        docker_client: docker.DockerClient, outside: tuple[str, Container]) -> None:
    """egress: {allow: [...]} on Swarm: the proxy runs on every node (a global service), the chat reaches its own
    node's through its egress socket, relayed by the node's gateway; listed hosts answer, others are refused and
    the refusal reaches the orchestrator's log; a listed name that resolves to the node itself or a private address
    is refused by the node's rules on the proxy's way out; a chat with egress: none gets nothing of the socket."""
    swarm = on_swarm.swarm
    network, listener = outside
    node = swarm.nodes[1]
    for each in swarm.nodes:  # the nodes reach "the internet"; this one is also self.test there
        docker_client.networks.get(network).connect(each, aliases=["self.test"] if each == node else [])
    proxied, isolated = chat(), chat()
    config = swarm_config(feishu_config, on_swarm, instance, defaults={
        "egress": {"allow": ["allowed.test", "private.test", "self.test"]},
        "placement": {"constraints": [f"node.hostname=={node}"]}}, groups={isolated: {"egress": "none"}})
    on_node = swarm.exec(node, "docker", "run", "-d", "--network", "host", "--entrypoint", "python3",
                         swarm.agent_image, "-c", TCP_LISTENER, "18080").strip()
    try:
        bot = start(config)
        plain = ran(feishu, proxied, "curl -sS http://allowed.test:8080/", "m-plain")
        assert "hello from allowed.test:8080" in plain
        assert "hello from allowed.test:443" in ran(feishu, proxied, "curl -sS --proxytunnel http://allowed.test:443/",
                                                     "m-tunnel")
        # the proxy on every node, as user proxy with no capability, on the node's network
        tasks = swarm.exec(swarm.manager, "docker", "service", "ps", f"{instance}-egress-proxy", "--filter",
                           "desired-state=running", "--format", "{{.Node}} {{.CurrentState}}").splitlines()
        assert sorted(line.split()[0] for line in tasks if " Running " in f" {line} ") == sorted(swarm.nodes)
        spec = swarm.service(f"{instance}-egress-proxy")["Spec"]["TaskTemplate"]
        [attached] = spec["Networks"]
        assert swarm.exec(swarm.manager, "docker", "network", "inspect", "--format", "{{.Name}}",
                          attached["Target"]).strip() == "host"
        assert spec["ContainerSpec"]["User"] == "13:13"
        assert spec["ContainerSpec"]["CapabilityDrop"] == ["ALL"] and "CapabilityAdd" not in spec["ContainerSpec"]

        # not listed: refused by squid, and the refusal in the orchestrator's log from the node's own log folder
        refused = ran(feishu, proxied, "curl -sS -o /dev/null -w 'code=%{http_code}' http://other.test:8080/",
                      "m-refused")
        assert "code=403" in refused
        wait_until(lambda: re.search(rf"egress refused: GET other\.test:8080 .*chat_id={proxied}", bot.log()), 30,
                   "the refusal in the log")
        # listed, but resolving to a private address or to the node itself: closed by the node's rules
        served = listener.logs().count(b"accepted")
        for host, port in (("private.test", "8080"), ("self.test", "18080")):
            blocked = ran(feishu, proxied, f"curl -sS -o /dev/null -w 'code=%{{http_code}}' http://{host}:{port}/",
                          f"m-{host}")
            assert "code=503" in blocked, blocked
        assert listener.logs().count(b"accepted") == served
        assert "accepted" not in swarm.exec(node, "docker", "logs", on_node)
        # without the proxy: no route out of the chats' network
        listener.reload()
        address = listener.attrs["NetworkSettings"]["Networks"][network]["IPAddress"]
        direct = ran(feishu, proxied, f"curl -sS --noproxy '*' -m 5 http://{address}:8080/ 2>&1 | tail -c 200",
                     "m-direct")
        assert "hello from" not in direct and re.search(r"curl: \((7|28)\)", direct), direct  # refused, or dropped
        # egress: none: no proxy settings, and its egress socket closes at once
        straight = ran(feishu, isolated, f"env | grep -i _proxy || echo no-proxy-settings; {SOCKET_STRAIGHT}",
                       "m-straight")
        assert "no-proxy-settings" in straight and "got b''" in straight, straight
        # the node's rules for the proxy's way out
        chain = firewall.node_proxy_chain(instance)
        rules = swarm.exec(node, "iptables", "-S", chain).splitlines()
        assert rules[1:4] == [f"-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
                              f"-A {chain} -p udp -m conntrack --ctorigdst 127.0.0.11 --ctorigdstport 53 -j RETURN",
                              f"-A {chain} -p tcp -m conntrack --ctorigdst 127.0.0.11 --ctorigdstport 53 -j RETURN"]
        assert f"-A {chain} -m addrtype --dst-type LOCAL -j REJECT --reject-with icmp-net-prohibited" in rules
        assert f"-A OUTPUT -m owner --uid-owner 13 -j {chain}" in swarm.exec(node, "iptables", "-S", "OUTPUT")
        if swarm.run(node, "test", "-e", "/proc/net/if_inet6").returncode == 0:  # and no IPv6 connection at all
            assert swarm.exec(node, "ip6tables", "-S", chain).splitlines()[1:] == [
                f"-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
                f"-A {chain} -j REJECT --reject-with icmp6-adm-prohibited"]
            assert f"-A OUTPUT -m owner --uid-owner 13 -j {chain}" in swarm.exec(node, "ip6tables", "-S", "OUTPUT")
        assert bot.stop() == 0
    finally:
        swarm.run(node, "docker", "rm", "-f", on_node)
        for each in swarm.nodes:
            with contextlib.suppress(docker.errors.APIError):
                docker_client.networks.get(network).disconnect(each, force=True)


def test_an_open_chat_goes_out_through_its_node_and_reaches_nothing_private(
        on_swarm: OnSwarm, instance: str, feishu: FakeFeishu, feishu_config, start,
        docker_client: docker.DockerClient, outside: tuple[str, Container]) -> None:
    """egress: open on Swarm: the open chats' network (a swarm-scoped bridge, out through the node's NAT) on every
    node, closed by the node's guard as one host's egress bridge is: an open chat reaches a host on the internet (the
    test's listener in TEST-NET-2), and neither a private address (the same listener on the nodes' network), nor the
    node itself (at its address out there, at its bridge's gateway), nor another open chat on the node, nor Swarm's
    ports of the host out there; a chat with egress: none on the same node has no way out."""
    swarm = on_swarm.swarm
    network, listener = outside
    node = swarm.nodes[1]
    for each in swarm.nodes:  # the nodes reach "the internet"
        docker_client.networks.get(network).connect(each)
    one, two, closed = chat(), chat(), chat()
    pinned = {"constraints": [f"node.hostname=={node}"]}
    config = swarm_config(feishu_config, on_swarm, instance, defaults={"egress": "open", "placement": pinned},
                          groups={closed: {"egress": "none"}})
    on_node = swarm.exec(node, "docker", "run", "-d", "--network", "host", "--entrypoint", "python3",
                         swarm.agent_image, "-c", TCP_LISTENER, "18080").strip()
    in_two = ""
    try:
        bot = start(config)
        for chat_id in (one, two, closed):
            ask(feishu, chat_id, f"hello {chat_id}")
        tasks = {c: swarm.exec(node, "docker", "ps", "-q", "--filter", f"label=orchestrator.chat_id={c}").strip()
                 for c in (one, two, closed)}
        assert all(tasks.values()), tasks

        def address_of(container: str, on: str, where: str = node) -> str:
            return json.loads(swarm.exec(where, "docker", "inspect", container))[0][
                "NetworkSettings"]["Networks"][on]["IPAddress"]

        listener.reload()
        out_there = listener.attrs["NetworkSettings"]["Networks"][network]["IPAddress"]
        private = listener.attrs["NetworkSettings"]["Networks"][swarm.network]["IPAddress"]
        node_out_there = docker_client.containers.get(node).attrs["NetworkSettings"]["Networks"][network]["IPAddress"]
        opened = json.loads(swarm.exec(node, "docker", "network", "inspect", f"{instance}-open"))[0]
        bridge, gateway = f"br-{opened['Id'][:12]}", opened["IPAM"]["Config"][0]["Gateway"]
        one_address, two_address = (address_of(tasks[c], f"{instance}-open") for c in (one, two))
        in_two = swarm.exec(node, "docker", "run", "-d", "--network", f"container:{tasks[two]}", "--entrypoint",
                            "python3", swarm.agent_image, "-c", TCP_LISTENER, "18081").strip()
        for each in (on_node, in_two):
            wait_until(lambda each=each: "listening" in swarm.exec(node, "docker", "logs", each), 30,
                       "a test listener")

        def connect(chat_id: str, address: str, port: str) -> str:
            return swarm.exec(node, "docker", "exec", tasks[chat_id], "python3", "-c", CONNECT, address, port).strip()

        # the internet, through the node's NAT
        assert connect(one, out_there, "8080") == "connected"
        got = swarm.exec(node, "docker", "exec", tasks[one], "curl", "-sS", "-m", "10", f"http://{out_there}:8080/")
        assert got.startswith(f"hello from {out_there}:8080"), got
        assert f"accepted {node_out_there}".encode() in listener.logs()  # its HTTP log: the node's address
        served = listener.logs().count(b"accepted")
        # Swarm's own ports, even at an address out there (an overlay's VXLAN has no authentication)
        swarm_ports = docker_client.containers.run(AGENT_IMAGE, ["python3", "-u", "-c", SWARM_PORTS_LISTENER],
                                                   detach=True, network_mode=f"container:{listener.id}",
                                                   entrypoint=[], labels={"orchestrator.test": "swarm"})
        try:
            wait_until(lambda: b"listening" in swarm_ports.logs(), 30, "the test's Swarm ports")
            assert swarm.exec(node, "docker", "exec", tasks[one], "python3", "-c", SWARM_PORTS_SEND,
                              out_there).strip() == "sent"
            wait_until(lambda: b"got tcp 8081" in (got := swarm_ports.logs()) and b"got udp 4790" in got, 30,
                       "a port nothing closes reached, over TCP and UDP")
            assert set(swarm_ports.logs().decode().splitlines()) == {"listening", "got tcp 8081", "got udp 4790"}
        finally:
            swarm_ports.remove(force=True)
        # nothing private, nothing of the node, no other chat
        for address, port in ((private, "8080"), (node_out_there, "18080"), (gateway, "18080"),
                              (two_address, "18081")):
            assert connect(one, address, port).startswith("not connected"), (address, port)
        assert listener.logs().count(b"accepted") == served
        assert "accepted" not in swarm.exec(node, "docker", "logs", on_node)
        assert f"accepted {one_address}" not in swarm.exec(node, "docker", "logs", in_two)
        # egress: none on the same node: no way out
        assert connect(closed, out_there, "8080").startswith("not connected")
        assert listener.logs().count(b"accepted") == served

        # the service on the open chats' network, asking the engine's DNS; the guard's rules on the node
        task = swarm.service(f"{instance}-{one}")["Spec"]["TaskTemplate"]
        assert [n["Target"] for n in task["Networks"]] == [opened["Id"]]
        assert not task["ContainerSpec"].get("DNSConfig")  # none given (the engine shows an empty one)
        assert f"node.labels.orchestrator.open.{instance}==true" in task["Placement"]["Constraints"]
        labels = json.loads(swarm.exec(swarm.manager, "docker", "node", "inspect", "--format", "{{json .Spec.Labels}}",
                                       node))
        assert labels.get(f"orchestrator.open.{instance}") == labels.get(f"orchestrator.ready.{instance}") == "true"
        closed_task = swarm.service(f"{instance}-{closed}")["Spec"]["TaskTemplate"]
        assert f"node.labels.orchestrator.open.{instance}==true" not in closed_task["Placement"]["Constraints"]
        out, chain = firewall.node_out_chain(instance), firewall.node_chain(instance)
        # the node's resolver is the test engine's own (127.0.0.11, loopback): asked from the node, not the chat
        assert swarm.exec(node, "iptables", "-S", out).splitlines()[1:] == [
            f"-A {out} {' '.join(rule)}" for rule in firewall.forward_rules([])]
        assert f"-A DOCKER-USER -i {bridge} -j {out}" in swarm.exec(node, "iptables", "-S", "DOCKER-USER")
        assert f"-A DOCKER-USER -i {bridge} -o {bridge} -j DROP" in swarm.exec(node, "iptables", "-S", "DOCKER-USER")
        assert f"-A INPUT -i {bridge} -j {chain}" in swarm.exec(node, "iptables", "-S", "INPUT")
        assert bot.stop() == 0
    finally:
        swarm.run(node, "docker", "rm", "-f", on_node, *([in_two] if in_two else []))
        for each in swarm.nodes:
            with contextlib.suppress(docker.errors.APIError):
                docker_client.networks.get(network).disconnect(each, force=True)
