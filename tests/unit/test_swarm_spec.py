"""The Swarm runtime's pure parts: a chat's service built from its container spec, a service's tasks read back as a
container's state, and the watch's events. The real Swarm is in tests/acceptance/test_swarm.py."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from orchestrator import node_guard
from orchestrator.config import Settings, resolve_chat
from orchestrator.layout import chat_paths
from orchestrator.runtime import (
    SPEC_LABEL,
    ContainerSpec,
    ContainerState,
    RuntimeFailure,
    SwarmNode,
    _tmpfs_options,
    config_network_problem,
    container_spec,
    engine_too_old,
    gateway_container_spec,
    guard_bridges,
    guard_service_spec,
    guarding,
    newest_task,
    node_label_updates,
    node_service_spec,
    of_spec,
    open_label,
    pinned_image,
    ready_label,
    required_labels,
    running_on,
    service_spec,
    service_state,
    swarm_network_name,
    swarm_network_of,
    swarm_node_network_name,
    swarm_nodes,
    swarm_open_network_name,
    swarm_open_node_network_name,
    task_live,
    watch_events,
    within_grace,
)
from tests.postgres import EXAMPLE_URL
from tests.unit.test_runtime_spec import MiB, settings_of


def spec_of(settings: Settings, chat_id: str = "oc_x") -> ContainerSpec:
    chat = resolve_chat(settings, chat_id)
    return container_spec(settings, chat, chat_paths(settings, chat), b"k" * 32, chat_name="Team X")


POSTGRES = f"store: {{url: '{EXAMPLE_URL}'}}\n"  # runtime: swarm takes no SQLite store
SWARM = ("instance: bot\nruntime: swarm\nswarm: {orchestrator_image: reg/orchestrator}\n" + POSTGRES +
         "defaults: {egress: none, cpus: 1.5, memory: 1g, pids_limit: 99, tmp_size: 32m, "
         "placement: {spread: [node.labels.zone]}}\n"
         "groups: {oc_gpu: {placement: {constraints: [node.labels.gpu==true], reserve_cpus: 0.5, "
         "reserve_memory: 256m}}}\n")


def test_a_chats_service_has_its_containers_caps_hardening_and_placement(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, SWARM)
    spec = spec_of(settings, "oc_gpu")
    service = service_spec(spec, "reg:5000/runner@sha256:ab", "fp1", swarm_network_name("bot"), 1)
    assert service["Name"] == "bot-oc_gpu"
    assert service["Labels"] == {**spec.labels, SPEC_LABEL: "fp1"}
    assert service["Mode"] == {"Replicated": {"Replicas": 1}}
    task = service["TaskTemplate"]
    container = task["ContainerSpec"]
    assert container["Image"] == "reg:5000/runner@sha256:ab"
    assert container["Labels"]["orchestrator.chat_id"] == "oc_gpu"
    assert container["User"] == "1000:1000" and container["ReadOnly"] is True
    assert container["CapabilityDrop"] == ["ALL"] and "CapabilityAdd" not in container
    assert container["Dir"] == "/workspace"
    assert "Args" not in container and "Command" not in container  # the image's entrypoint: agent-init
    assert dict(e.split("=", 1) for e in container["Env"]) == dict(spec.environment)
    binds = [m for m in container["Mounts"] if m["Type"] == "bind"]
    assert [(m["Source"], m["Target"], m["ReadOnly"]) for m in binds] == list(spec.mounts)
    tmpfs = {m["Target"]: m["TmpfsOptions"] for m in container["Mounts"] if m["Type"] == "tmpfs"}
    assert tmpfs == {"/tmp": {"SizeBytes": 32 * MiB}, "/home/agent": {"SizeBytes": 64 * MiB, "Mode": 0o1777}}
    assert {u["Name"]: (u["Soft"], u["Hard"]) for u in container["Ulimits"]} == {
        "nofile": (8192, 8192), "fsize": (10 * 1024**3, 10 * 1024**3), "core": (0, 0)}
    assert task["Resources"] == {"Limits": {"NanoCPUs": 1_500_000_000, "MemoryBytes": 1024**3, "Pids": 99},
                                 "Reservations": {"NanoCPUs": 500_000_000, "MemoryBytes": 256 * MiB}}
    assert task["RestartPolicy"]["Condition"] == "on-failure" and task["RestartPolicy"]["MaxAttempts"] == 0
    assert task["Placement"] == {"Constraints": ["node.labels.gpu==true"]}  # a group's placement replaces the whole
    assert task["Networks"] == [{"Target": "bot-chats"}]
    assert task["LogDriver"] == {"Name": "json-file", "Options": {"max-size": "1m", "max-file": "1"}}
    assert task["ForceUpdate"] == 0
    # Its DNS queries are asked from its own namespace, where the internal network answers none (CVE-2024-29018).
    assert container["DNSConfig"] == {"Nameservers": ["127.0.0.1"]}
    assert container["Sysctls"] == {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"}
    assert "StopGracePeriod" not in container  # none given: Swarm's own


def test_the_stop_grace_is_the_services(tmp_path: Path) -> None:
    spec = spec_of(settings_of(tmp_path, SWARM))
    container = service_spec(spec, "runner", "fp", "bot-chats", 1, stop_grace=2.5)["TaskTemplate"]["ContainerSpec"]
    assert container["StopGracePeriod"] == 2_500_000_000


def test_spread_and_no_reservations_and_a_forced_update(tmp_path: Path) -> None:
    spec = spec_of(settings_of(tmp_path, SWARM))
    service = service_spec(spec, "runner", "fp", "bot-chats", 0, force_update=3)
    spread = [{"Spread": {"SpreadDescriptor": "node.labels.zone"}}]
    assert service["TaskTemplate"]["Placement"] == {"Preferences": spread}
    assert service["TaskTemplate"]["Resources"]["Reservations"] == {}
    assert service["TaskTemplate"]["ForceUpdate"] == 3
    assert service["Mode"] == {"Replicated": {"Replicas": 0}}
    assert spec.network == "none"  # egress: none; the runtime puts it on the instance's Swarm network
    # The tasks carry the fingerprint: a start waits for the task of this spec, not the last spec's still running.
    assert service["TaskTemplate"]["ContainerSpec"]["Labels"][SPEC_LABEL] == "fp"
    made = {"Spec": {"ContainerSpec": service["TaskTemplate"]["ContainerSpec"]}}
    assert of_spec(made, "fp") and not of_spec(made, "fp-before") and not of_spec(None, "fp")


def test_placement_changes_the_fingerprint_only_when_set(tmp_path: Path) -> None:
    """A Docker container made before placement existed keeps its fingerprint (it is not re-created)."""
    docker = spec_of(settings_of(tmp_path, "instance: bot\ndefaults: {egress: none}\n"))
    assert docker.constraints == () and docker.reserve_memory == 0
    swarm = spec_of(settings_of(tmp_path, "instance: bot\nruntime: swarm\nswarm: {orchestrator_image: g}\n"
                                          "defaults: {egress: none}\n" + POSTGRES))
    # the same but for the chat's model socket folder (its node's own on Swarm): unset placement fields do not count
    assert docker.fingerprint() == dataclasses.replace(swarm, mounts=docker.mounts).fingerprint()
    placed = spec_of(settings_of(tmp_path, SWARM))
    assert placed.fingerprint() != swarm.fingerprint()


def test_a_command_is_swarms_args_and_kept_capabilities_are_added(tmp_path: Path) -> None:
    spec = ContainerSpec(name="n", image="i", labels={}, nano_cpus=1, mem_limit=2, pids_limit=3, network="none",
                         user="0:0", mounts=(), tmpfs=(("/tmp", "rw,nosuid,nodev,noexec,size=1m"),), ulimits=(),
                         environment=(), command=("squid", "-N"), cap_add=("SETUID",))
    container = service_spec(spec, "i", "fp", "net", 1)["TaskTemplate"]["ContainerSpec"]
    assert container["Args"] == ["squid", "-N"] and container["CapabilityAdd"] == ["SETUID"]
    assert container["Mounts"] == [{"Type": "tmpfs", "Target": "/tmp", "TmpfsOptions": {"SizeBytes": 1024**2}}]


@pytest.mark.parametrize(("options", "expected"), [
    ("rw,nosuid,nodev,size=256m", {"SizeBytes": 256 * MiB}),
    ("rw,size=2g,mode=0700", {"SizeBytes": 2 * 1024**3, "Mode": 0o700}),
    ("size=64k,uid=1000,gid=1000,mode=0700", {"SizeBytes": 64 * 1024, "Mode": 0o1777}),
    ("size=4096,uid=0", {"SizeBytes": 4096}),
    ("rw,nosuid", {}),
])
def test_tmpfs_options_as_swarm_takes_them(options: str, expected: dict[str, int]) -> None:
    assert _tmpfs_options(options) == expected


def node(hostname: str, lost: bool = False) -> SwarmNode:
    return SwarmNode(hostname=hostname, lost=lost, active=not lost, engine="27.3.1")


NODES = {"n1": node("node1"), "n2": node("node2"), "n3": node("node3", lost=True)}


def service(replicas: int = 1) -> dict:
    return {"ID": "s1", "Spec": {"Name": "bot-oc_x", "Labels": {"orchestrator.chat_id": "oc_x"},
                                 "Mode": {"Replicated": {"Replicas": replicas}},
                                 "TaskTemplate": {"Resources": {"Limits": {"NanoCPUs": 5, "MemoryBytes": 6,
                                                                           "Pids": 7}}}}}


def task(task_id: str, state: str, created: str, node: str = "n1", desired: str = "running", container: str = "",
         exit_code: int = 0) -> dict:
    status: dict = {"State": state, "Timestamp": f"{created}.5"}
    if container:
        status["ContainerStatus"] = {"ContainerID": container, "ExitCode": exit_code}
    return {"ID": task_id, "NodeID": node, "DesiredState": desired, "CreatedAt": created, "Status": status}


def test_a_running_task_is_a_running_container_on_its_node() -> None:
    tasks = [task("t1", "shutdown", "2026-01-01T00:00:01", "n1", "shutdown", "c1", 137),
             task("t2", "running", "2026-01-01T00:00:02", "n2", container="c2")]
    assert service_state(service(), tasks, NODES) == ContainerState(
        name="bot-oc_x", id="c2", status="running", chat_id="oc_x", nano_cpus=5, memory=6, pids_limit=7,
        started_at="2026-01-01T00:00:02.5", node="node2")


@pytest.mark.parametrize(("tasks", "replicas", "status", "node", "exit_code"), [
    ([], 1, "created", "", None),  # made, no task yet
    ([], 0, "exited", "", None),
    ([task("t1", "pending", "1")], 1, "created", "node1", None),  # waiting for a node that fits
    ([task("t1", "preparing", "1", "n9")], 1, "created", "n9", None),  # pulling the image; an unknown node by its id
    ([task("t1", "running", "1", "n3", container="c1")], 1, "exited", "node3", None),  # its node is down
    ([task("t1", "running", "1", desired="shutdown", container="c1")], 0, "running", "node1", None),  # stopping
    ([task("t1", "shutdown", "1", desired="shutdown", container="c1", exit_code=143)], 0, "exited", "node1", 143),
    ([task("t1", "failed", "1", container="c1", exit_code=1)], 1, "exited", "node1", 1),
    ([task("t1", "rejected", "1")], 1, "dead", "node1", None),
    ([task("t1", "complete", "1", desired="shutdown", container="c1"),
      task("t2", "assigned", "2")], 1, "created", "node1", None),  # the node was drained: its new task is on its way
])
def test_task_states(tasks: list, replicas: int, status: str, node: str, exit_code: int | None) -> None:
    state = service_state(service(replicas), tasks, NODES)
    assert (state.status, state.node, state.exit_code) == (status, node, exit_code)
    assert state.running == (status == "running")
    assert state.started_at == ("1.5" if status == "running" else "")


def test_the_newest_task_that_should_run_stands_for_the_service() -> None:
    old, new = task("a", "running", "2"), task("b", "shutdown", "3", desired="shutdown")
    assert newest_task([old, new]) is old
    assert newest_task([task("a", "shutdown", "1", desired="shutdown"), new]) is new
    assert newest_task([]) is None


@pytest.mark.parametrize(("earlier", "later"), [
    ("2026-01-01T00:00:05Z", "2026-01-01T00:00:05.5Z"),  # as text, "Z" sorts after "."
    ("2026-01-01T00:00:05.5Z", "2026-01-01T00:00:05.50001Z"),  # as text, "Z" sorts after "0"
    ("2026-01-01T00:00:05.45Z", "2026-01-01T00:00:05.5Z"),
    ("2026-01-01T00:00:05.999999999Z", "2026-01-01T00:00:06Z"),
])
def test_tasks_are_ordered_by_their_creation_time_not_its_text(earlier: str, later: str) -> None:
    first, second = task("a", "running", earlier), task("b", "running", later)
    assert newest_task([first, second]) is second and newest_task([second, first]) is second


def test_a_task_on_a_lost_node_is_not_running_whatever_it_last_said() -> None:
    stale = task("t1", "running", "2026-01-01T00:00:01", "n3", container="c1")
    assert not task_live(stale, NODES) and task_live(task("t2", "running", "1", "n1"), NODES)
    assert task_live(task("t3", "pending", "1", ""), NODES)  # not placed yet
    assert not task_live(task("t4", "shutdown", "1", "n1", desired="shutdown"), NODES)
    state = service_state(service(), [stale], NODES)
    assert (state.status, state.running, state.node, state.exit_code) == ("exited", False, "node3", None)
    assert service_state(service(0), [stale], NODES).status == "exited"
    # Swarm's replacement on another node stands for the chat once it is made.
    moved = service_state(service(), [{**stale, "DesiredState": "shutdown"},
                                      task("t5", "running", "2026-01-01T00:00:09", "n1", container="c5")], NODES)
    assert (moved.status, moved.id, moved.node) == ("running", "c5", "node1")


def test_the_nodes_table_and_old_engines() -> None:
    nodes = swarm_nodes([
        {"ID": "n1", "Description": {"Hostname": "a", "Engine": {"EngineVersion": "20.10.24+dfsg1"}},
         "Status": {"State": "ready"}, "Spec": {"Availability": "active"}},
        {"ID": "n2", "Description": {"Hostname": "b", "Engine": {"EngineVersion": "19.03.15"}},
         "Status": {"State": "ready"}, "Spec": {"Availability": "drain"}},
        {"ID": "n3", "Status": {"State": "down"}, "Spec": {"Availability": "active"}},
        {"ID": "n4", "Description": {"Hostname": "d"}, "Status": {"State": "disconnected"}},
    ])
    assert nodes == {"n1": SwarmNode("a", lost=False, active=True, engine="20.10.24+dfsg1"),
                     "n2": SwarmNode("b", lost=False, active=False, engine="19.03.15"),
                     "n3": SwarmNode("n3", lost=True, active=False, engine=""),
                     "n4": SwarmNode("d", lost=True, active=False, engine="")}
    assert [engine_too_old(v) for v in ("20.10.0", "20.9.1", "19.03.15", "27.3.1", "100.0", "", "v28")] == [
        False, True, True, False, False, True, True]


def test_watch_events() -> None:
    assert watch_events(None, {"a": "c1"}) == []  # the first look: what runs is known, nothing happened
    assert watch_events({"a": "c1"}, {"a": "c1"}) == []
    assert watch_events({"a": "c1"}, {}) == [("a", "die")]
    assert watch_events({}, {"a": "c1"}) == [("a", "start")]
    assert watch_events({"a": "c1", "b": "c2"}, {"a": "c3", "b": "c2"}) == [("a", "die"), ("a", "start")]


def test_network_names() -> None:
    assert (swarm_network_name("bot"), swarm_node_network_name("bot")) == ("bot-chats", "bot-chats-node")
    assert (swarm_open_network_name("bot"), swarm_open_node_network_name("bot")) == ("bot-open", "bot-open-node")


def test_a_config_network_must_keep_chats_apart_and_leave_the_bridges_name_to_the_engine() -> None:
    icc = "com.docker.network.bridge.enable_icc"
    make = ("make it on EVERY node (managers and workers) with `docker network create --config-only --opt "
            f"{icc}=false bot-open-node`, then start again")
    assert config_network_problem({"Options": {icc: "false"}}, "bot-open-node") is None
    for missing in (None, {"Options": None}, {"Options": {icc: "true"}}):
        assert config_network_problem(missing, "bot-open-node") == (
            f"the Swarm's nodes lack the network bot-open-node: {make}")
    named = {"Options": {icc: "false", "com.docker.network.bridge.name": "chats0"}}
    assert config_network_problem(named, "bot-open-node") == (
        "the network bot-open-node names its bridge (com.docker.network.bridge.name), which the guard's rules would "
        f"not match: remove it (`docker network rm bot-open-node`) and {make}")


def test_each_chats_network_on_swarm() -> None:
    assert swarm_network_of("none", "bot", False) == swarm_network_of("bot-agents", "bot", True) == "bot-chats"
    assert swarm_network_of("bot-egress", "bot", True) == "bot-open"
    for network, open_egress in (("bot-egress", False), ("host", True), ("other-agents", True)):
        with pytest.raises(RuntimeFailure, match=f"network {network} is not served on runtime: swarm"):
            swarm_network_of(network, "bot", open_egress)


def test_an_open_chats_service_is_on_the_open_network_and_asks_the_engines_dns(tmp_path: Path) -> None:
    """egress: open: the open chats' network, and no DNSConfig (the embedded DNS forwards to the node's resolvers,
    as on one host); the rest of the hardening as any chat's."""
    settings = settings_of(tmp_path, SWARM.replace("groups: {", "groups: {oc_out: {egress: open}, "))
    spec = spec_of(settings, "oc_out")
    service = service_spec(spec, "reg:5000/runner@sha256:ab", "fp1", swarm_open_network_name("bot"), 1,
                           goes_out=True)
    container = service["TaskTemplate"]["ContainerSpec"]
    assert service["TaskTemplate"]["Networks"] == [{"Target": "bot-open"}]
    # placed only where the node is ready and its guard keeps the open chats' bridge
    assert required_labels("bot", goes_out=True) == ("node.labels.orchestrator.ready.bot==true",
                                                     "node.labels.orchestrator.open.bot==true")
    assert required_labels("bot", goes_out=False) == ("node.labels.orchestrator.ready.bot==true",)
    assert "DNSConfig" not in container
    assert container["Sysctls"] == {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"}
    assert container["CapabilityDrop"] == ["ALL"] and container["ReadOnly"] is True


def test_the_image_pinned_to_its_digest_and_the_last_known_kept_through_a_registry_outage() -> None:
    assert pinned_image("reg:5000/runner:latest", "sha256:ab", "") == "reg:5000/runner:latest@sha256:ab"
    assert pinned_image("reg:5000/runner@sha256:00", "sha256:ab", "x") == "reg:5000/runner@sha256:ab"
    assert pinned_image("reg:5000/runner:latest", "", "reg:5000/runner:latest@sha256:ab") == \
        "reg:5000/runner:latest@sha256:ab"
    assert pinned_image("reg:5000/runner:latest", "", "") == "reg:5000/runner:latest"


def test_the_guard_is_one_task_per_node_with_the_node_network_and_two_capabilities() -> None:
    spec = guard_service_spec("bot", "reg:5000/orchestrator@sha256:ab", "br-0123456789ab")
    assert spec["Name"] == "bot-guard" and spec["Mode"] == {"Global": {}}
    assert spec["Labels"] == {"orchestrator.managed": "true", "orchestrator.instance": "bot",
                              "orchestrator.role": "guard"}  # no chat label: not a chat to reconcile
    task = spec["TaskTemplate"]
    container = task["ContainerSpec"]
    assert task["Networks"] == [{"Target": "host"}]
    assert container["Args"] == ["python", "-m", "orchestrator.node_guard", "bot", "br-0123456789ab"]
    assert container["CapabilityDrop"] == ["ALL"] and container["CapabilityAdd"] == ["CAP_NET_ADMIN", "CAP_NET_RAW"]
    assert container["ReadOnly"] is True and container["User"] == "0:0"
    assert container["Healthcheck"]["Test"] == [
        "CMD-SHELL", "test $(( $(date +%s) - $(stat -c %Y /run/orchestrator-guard.ok) )) -lt 15"]
    assert task["RestartPolicy"]["Condition"] == "any"
    assert task["Resources"]["Limits"] == {"NanoCPUs": 200_000_000, "MemoryBytes": 128 * MiB, "Pids": 32}
    assert spec["UpdateConfig"] == {"Parallelism": 1, "Order": "start-first", "FailureAction": "continue"}
    # some chat's egress open: the guard keeps the open chats' bridge too
    opened = guard_service_spec("bot", "reg:5000/orchestrator@sha256:ab", "br-0123456789ab", "br-fedcba987654")
    assert opened["TaskTemplate"]["ContainerSpec"]["Args"] == [
        "python", "-m", "orchestrator.node_guard", "bot", "br-0123456789ab", "br-fedcba987654"]


def test_a_chat_is_placed_only_where_the_guard_and_the_gateway_run(tmp_path: Path) -> None:
    spec = spec_of(settings_of(tmp_path, SWARM), "oc_gpu")
    required = (f"node.labels.{ready_label('bot')}==true",)
    service = service_spec(spec, "runner", "fp", "bot-chats", 1, required=required)
    assert service["TaskTemplate"]["Placement"]["Constraints"] == [
        "node.labels.gpu==true", "node.labels.orchestrator.ready.bot==true"]
    assert service_spec(spec_of(settings_of(tmp_path, SWARM)), "runner", "fp", "bot-chats", 1, required=required)[
        "TaskTemplate"]["Placement"]["Constraints"] == ["node.labels.orchestrator.ready.bot==true"]


def guard_task(node: str, state: str, desired: str = "running", fingerprint: str = "fp2",
               bridges: tuple[str, ...] = ("br-a",)) -> dict:
    return {"NodeID": node, "DesiredState": desired, "Status": {"State": state},
            "Spec": {"ContainerSpec": {"Labels": {SPEC_LABEL: fingerprint},
                                       "Args": ["python", "-m", "orchestrator.node_guard", "bot", *bridges]}}}


def test_ready_nodes_and_their_labels() -> None:
    tasks = [guard_task("n1", "running"), guard_task("n2", "starting"),  # its health check has not passed yet
             guard_task("n3", "running", desired="shutdown"), guard_task("n4", "failed"), guard_task("", "pending"),
             guard_task("n5", "running", fingerprint="fp1")]  # the last spec's, not replaced yet on its node
    assert running_on(tasks, "fp2") == {"n1"}
    assert running_on(tasks, "fp1") == {"n5"}
    label, opened = ready_label("bot"), open_label("bot")
    nodes = [{"ID": "n1", "Version": {"Index": 5}, "Spec": {"Role": "worker", "Labels": {"zone": "a"}}},
             {"ID": "n2", "Version": {"Index": 6}, "Spec": {"Role": "worker", "Labels": {label: "true"}}},
             {"ID": "n3", "Version": {"Index": 7}, "Spec": {"Role": "manager"}},
             {"ID": "n4", "Version": {"Index": 8}, "Spec": {"Labels": {label: "true", "gpu": "true"}}}]
    assert node_label_updates(nodes, {label: {"n1", "n4"}}) == [
        ("n1", 5, {"Role": "worker", "Labels": {"zone": "a", label: "true"}}),
        ("n2", 6, {"Role": "worker", "Labels": {}})]
    assert node_label_updates(nodes, {label: set()})[-1] == ("n4", 8, {"Labels": {"gpu": "true"}})
    assert node_label_updates(nodes, {label: set()}, kept={"n2", "n4"}) == []  # left as they are
    # both labels in one update of a node (a second would carry a stale version)
    assert node_label_updates(nodes, {label: {"n2", "n4"}, opened: {"n4"}}) == [
        ("n4", 8, {"Labels": {label: "true", "gpu": "true", opened: "true"}})]


def test_a_node_is_guarded_by_a_guard_task_of_any_spec_that_keeps_the_current_bridge() -> None:
    """An upgrade or open egress turned on changes the guard's spec, and Swarm replaces its tasks node by node, each
    old one running until the new one there is healthy: its rules hold meanwhile, so the node keeps its label (its
    chats' tasks are not stopped). A task keeping a bridge that is gone does not count."""
    tasks = [guard_task("n1", "running", fingerprint="new", bridges=("br-a", "br-o")),
             guard_task("n2", "running", fingerprint="old"),  # not replaced yet: keeps the chats' bridge only
             guard_task("n3", "running", fingerprint="older", bridges=("br-gone",)),
             guard_task("n4", "starting", fingerprint="new", bridges=("br-a", "br-o")),
             guard_task("n5", "running", desired="shutdown")]
    assert guarding(tasks, "br-a") == {"n1", "n2"}
    assert guarding(tasks, "br-o") == {"n1"}
    assert guarding(tasks, "bot") == set()  # the instance's name is not a bridge
    guard = guard_service_spec("bot", "img", "br-a", "br-o")
    assert guard_bridges({"Spec": guard}) == ["br-a", "br-o"]
    assert guard_bridges({"Spec": guard_service_spec("bot", "img", "br-a")}) == ["br-a"]
    assert guard_bridges(None) == []


def test_a_node_keeps_its_ready_label_for_a_grace_after_its_gateway_stops_not_its_guard() -> None:
    """Taking the label makes Swarm stop every chat's task on the node: a gateway that Swarm restarts at once must not
    cost them; one that stays down does, after the grace. A node whose guard stopped, or never seen ready, has none."""
    guarded = {"n1", "n2", "n3"}
    since, kept = within_grace({}, {"n1"}, {"n1", "n2"}, guarded, now=100.0, grace=30)
    assert since == {"n2": 100.0} and kept == {"n2"}  # n3: not ready before, so no grace
    since, kept = within_grace(since, {"n1"}, {"n1"}, guarded, now=129.9, grace=30)
    assert since == {"n2": 100.0} and kept == {"n2"}
    assert within_grace(since, {"n1"}, {"n1"}, guarded, now=130.0, grace=30) == ({"n2": 100.0}, set())
    assert within_grace(since, {"n1"}, {"n1"}, {"n1"}, now=110.0, grace=30) == ({}, set())  # n2's guard stopped too
    # back in time: forgotten, and a later stop starts a new grace
    assert within_grace(since, {"n1", "n2"}, {"n1"}, guarded, now=131.0, grace=30) == ({}, set())
    assert within_grace({}, set(), {"n1"}, set(), now=1.0, grace=30) == ({}, set())  # the guard gone: no grace


def test_the_gateway_on_swarm_is_a_global_service_of_its_container_spec(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, SWARM)
    spec = gateway_container_spec(settings, "digest1")
    service = node_service_spec(spec, "reg/orchestrator@sha256:cd")
    assert service["Name"] == "bot-gateway" and service["Mode"] == {"Global": {}}
    task = service["TaskTemplate"]
    container = task["ContainerSpec"]
    assert task["Networks"] == [{"Target": "host"}] and task["RestartPolicy"]["Condition"] == "any"
    assert container["Image"] == "reg/orchestrator@sha256:cd" and container["Args"] == list(spec.command)
    assert container["User"] == "0:0" and container["CapabilityDrop"] == ["ALL"] and "CapabilityAdd" not in container
    assert container["Env"] == ["GATEWAY_SETTINGS_DIGEST=digest1"] and container["ReadOnly"] is True
    assert [(m["Source"], m["ReadOnly"]) for m in container["Mounts"] if m["Type"] == "bind"] == [
        (source, read_only) for source, _, read_only in spec.mounts]
    assert spec.mounts[-1] == ("/var/lib/orchestrator", "/var/lib/orchestrator", False)
    assert task["Resources"]["Limits"] == {"NanoCPUs": spec.nano_cpus, "MemoryBytes": spec.mem_limit,
                                           "Pids": spec.pids_limit}
    # a chat on Swarm mounts its socket folder from its node's own folder, where its node's gateway binds it
    chat = spec_of(settings, "oc_x")
    assert ("/var/lib/orchestrator/bot/model/oc_x", "/run/orchestrator", True) in chat.mounts


def test_the_guard_keeps_no_health_while_bridged_traffic_bypasses_iptables(tmp_path: Path) -> None:
    """br_netfilter off (or not loaded): the chat-to-chat DROP would see nothing; the guard reports no health, so
    Swarm never reports its task running and the node takes no chat."""
    for value in ("0\n", None):
        netfilter, health = tmp_path / "bridge-nf-call-iptables", tmp_path / "guard.ok"
        netfilter.unlink(missing_ok=True)
        if value is not None:
            netfilter.write_text(value)
        stop = threading.Event()
        keeper = threading.Thread(target=node_guard.keep, args=("bot", "br-x", None, stop, netfilter, health))
        keeper.start()
        stop.wait(0.3)
        stop.set()
        keeper.join(5)
        assert not keeper.is_alive() and not health.exists()
