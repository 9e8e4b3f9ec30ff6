"""A Docker Swarm of three Docker-in-Docker nodes for the Swarm runtime's tests, made from nothing but the local
node image (images/build.sh --swarm-node), and taken down with everything it made.

- The nodes run on a network of their own (no traffic leaves it but the registry's port on 127.0.0.1), never
  privileged (refused here): every capability but SYS_RESOURCE, and the host's cgroup v1 controllers mounted one by
  one inside (the recipe of ../shared/reference/swarm.md); each engine keeps its images in a volume of its own.
- Node 1 is the manager; the others join as workers, labelled `zone` (a, b, b) and node 3 `gpu=true`, for placement.
- The manager's socket is also served in a host folder, so the orchestrator on the host reaches it as
  `unix://…/docker.sock` (never TCP to a node's address). Tests drive any node with `docker exec NODE docker …`.
- A local registry (Debian's docker-registry, in the node image) on the network, also published on 127.0.0.1 for the
  host's engine to push to; nodes pull from it by its name on the network, `REGISTRY:5000/NAME:TAG`.
- The shared chat storage: one host folder bind-mounted into every node at the same path (NFS in production).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
from docker.errors import NotFound

from tests.harness import AGENT_IMAGE

NODE_IMAGE = "orchestrator-swarm-node:latest"
REGISTRY_PORT = 5000
RELAY_PORT = 8080
NODES = 3
ZONES = ("a", "b", "b")
# cgroup v1 with each controller in its own hierarchy: mounted one by one, or the node's engine has no CFS quota and
# Swarm refuses CPU limits ("NanoCPUs can not be set").
_NODE_SCRIPT = """
for s in cpu cpuacct cpuset memory devices freezer blkio pids systemd; do umount /sys/fs/cgroup/$s 2>/dev/null; done
umount /sys/fs/cgroup 2>/dev/null
mount -t tmpfs cgroup_root /sys/fs/cgroup
for s in cpu cpuacct cpuset memory devices freezer blkio pids; do
  mkdir -p /sys/fs/cgroup/$s; mount -t cgroup -o $s cgroup /sys/fs/cgroup/$s; done
mkdir -p /sys/fs/cgroup/systemd; mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
exec dockerd --host=unix:///var/run/docker.sock --host=unix:///run/swarm-sock/docker.sock \
  --insecure-registry {registry}:{port} >/var/log/dockerd.log 2>&1
"""
_REGISTRY_CONFIG = """version: 0.1
storage:
  filesystem:
    rootdirectory: /var/lib/docker-registry
http:
  addr: :5000
"""


class Swarm:
    def __init__(self, client: docker.DockerClient, prefix: str = "", folder: Path | None = None) -> None:
        """A new Swarm's names; or, with `prefix` and `folder`, those of one made before (`attach`)."""
        self.client = client
        self.prefix = prefix or f"sw{uuid.uuid4().hex[:6]}"
        self.network = f"{self.prefix}-net"
        self.registry_name = f"{self.prefix}-registry"
        self.registry = f"{self.registry_name}:{REGISTRY_PORT}"  # as the nodes name it
        self.nodes = [f"{self.prefix}-node{n}" for n in range(1, NODES + 1)]
        self.manager = self.nodes[0]
        # short: a socket's path fits in 107 bytes
        self.folder = folder or Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.shared = self.folder / "shared"  # the chats' storage, at this same path in every node
        self.shared.mkdir(exist_ok=True)
        self.socket_dir = self.folder / "sock"
        self.socket_dir.mkdir(exist_ok=True)
        self.host_registry = ""  # 127.0.0.1:PORT, for the host's engine
        self.agent_image = ""  # the agent image as the nodes pull it, once pushed
        self.orchestrator_image = ""  # the orchestrator's image as the nodes pull it, once pushed

    @classmethod
    def attach(cls, client: docker.DockerClient, saved: Path) -> Swarm:
        """A Swarm `save`d by an earlier run, left up (for a developer's repeated runs: SWARM_TEST_REUSE=FILE)."""
        state = json.loads(saved.read_text())
        swarm = cls(client, state["prefix"], Path(state["folder"]))
        swarm.host_registry, swarm.agent_image = state["host_registry"], state["agent_image"]
        swarm.orchestrator_image = state.get("orchestrator_image", "")
        return swarm

    def save(self, saved: Path) -> None:
        saved.write_text(json.dumps({"prefix": self.prefix, "folder": str(self.folder),
                                     "host_registry": self.host_registry, "agent_image": self.agent_image,
                                     "orchestrator_image": self.orchestrator_image}))

    @property
    def manager_url(self) -> str:
        return f"unix://{self.socket_dir / 'docker.sock'}"

    # ---- up ----

    def start(self) -> Swarm:
        self.client.images.get(NODE_IMAGE)  # built by ./scripts/dev setup (images/build.sh --swarm-node)
        self.client.networks.create(self.network, driver="bridge", labels={"orchestrator.test": "swarm"})
        self._start_registry()
        for n, name in enumerate(self.nodes):
            self._start_node(name, self.socket_dir if n == 0 else None)
        for name in self.nodes:
            self._wait_engine(name)
        address = self.exec(self.manager, "hostname", "-i").split()[0]
        self.exec(self.manager, "docker", "swarm", "init", "--advertise-addr", address)
        token = self.exec(self.manager, "docker", "swarm", "join-token", "-q", "worker").strip()
        for name in self.nodes[1:]:
            self.exec(name, "docker", "swarm", "join", "--token", token, f"{address}:2377")
        for name, zone in zip(self.nodes, ZONES, strict=True):
            self.exec(self.manager, "docker", "node", "update", "--label-add", f"zone={zone}", name)
        self.exec(self.manager, "docker", "node", "update", "--label-add", "gpu=true", self.nodes[2])
        self._wait(lambda: self.exec(self.manager, "docker", "node", "ls", "--format", "{{.Status}}").split()
                   == ["Ready"] * NODES, 60, "every node Ready")
        return self

    def _start_registry(self) -> None:
        config = self.folder / "registry.yml"
        config.write_text(_REGISTRY_CONFIG)
        container = self.client.containers.run(
            NODE_IMAGE, ["docker-registry", "serve", "/etc/registry.yml"], name=self.registry_name, detach=True,
            network=self.network, volumes={str(config): {"bind": "/etc/registry.yml", "mode": "ro"}},
            ports={f"{REGISTRY_PORT}/tcp": ("127.0.0.1", None)}, labels={"orchestrator.test": "swarm"})
        container.reload()
        port = container.attrs["NetworkSettings"]["Ports"][f"{REGISTRY_PORT}/tcp"][0]["HostPort"]
        self.host_registry = f"127.0.0.1:{port}"  # loopback: the host's engine pushes here without TLS

    def _start_node(self, name: str, socket_dir: Path | None) -> None:
        # the docker CLI: docker-py has no `systempaths=unconfined` (no masked /proc paths, for the node's engine)
        argv = ["docker", "run", "-d", "--name", name, "--hostname", name, "--network", self.network,
                "--label", "orchestrator.test=swarm", "--tmpfs", "/run",
                "-v", "/var/lib/docker",  # a volume for the engine's images: overlay2 cannot sit on an overlay root
                "-v", f"{self.shared}:{self.shared}",
                "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE", "--device-cgroup-rule", "a *:* rwm",
                "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
                "--security-opt", "systempaths=unconfined"]
        if socket_dir is not None:
            argv += ["-v", f"{socket_dir}:/run/swarm-sock"]
        else:
            argv += ["--tmpfs", "/run/swarm-sock"]
        script = _NODE_SCRIPT.format(registry=self.registry_name, port=REGISTRY_PORT)
        subprocess.run([*argv, NODE_IMAGE, "sh", "-c", script], check=True, capture_output=True, timeout=120)

    def _wait_engine(self, name: str) -> None:
        self._wait(lambda: self.run(name, "docker", "info").returncode == 0, 60, f"the engine in {name}")

    def push(self, image: str) -> str:
        """The host's `image` pushed to the registry; its name for the nodes (REGISTRY:5000/NAME:TAG)."""
        name = image.rsplit("/", 1)[-1]
        name = name if ":" in name else f"{name}:latest"
        host_name = f"{self.host_registry}/{name}"
        self.client.images.get(image).tag(host_name)
        try:
            for line in self.client.api.push(host_name, stream=True, decode=True):
                if "error" in line:
                    raise RuntimeError(f"push of {image} failed: {line['error']}")
        finally:
            with contextlib.suppress(NotFound):
                self.client.images.remove(host_name)
        return f"{self.registry}/{name}"

    def push_images(self, agent: str, orchestrator: str) -> str:
        """The agent's image and the orchestrator's (the guard's) pushed and pulled on every node, as an operator's
        nodes would have them after their first tasks; what it took, for the log."""
        began = time.monotonic()
        self.agent_image, self.orchestrator_image = self.push(agent), self.push(orchestrator)
        pushed = time.monotonic()
        self.pull_everywhere(self.agent_image)
        self.pull_everywhere(self.orchestrator_image)
        return f"images pushed in {pushed - began:.1f} s, pulled on every node in {time.monotonic() - pushed:.1f} s"

    def pull_everywhere(self, image: str) -> None:
        """Every node pulls `image` (as Swarm would at a task's first start there): tests then time what they mean."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            for result in pool.map(lambda node: self.run(node, "docker", "pull", "-q", image), self.nodes):
                if result.returncode != 0:
                    raise RuntimeError(f"pull of {image} failed: {result.stderr}")

    def prepare_instance(self, instance: str) -> None:
        """What an operator does on every node: once per instance, the config-only networks that give the chats'
        Swarm network and the open chats' their per-node options (no traffic between chats on a node); once, the
        gateways' folder."""
        for node in self.nodes:
            for config in ("chats-node", "open-node"):
                self.exec(node, "docker", "network", "create", "--config-only", "--opt",
                          "com.docker.network.bridge.enable_icc=false", f"{instance}-{config}")
            self.exec(node, "mkdir", "-p", "/var/lib/orchestrator")  # once per node: the gateways' sockets there

    def remove_instance(self, instance: str) -> None:
        """The instance's services, its Swarm network and its nodes' config networks."""
        services = self.exec(self.manager, "docker", "service", "ls", "-q", "--filter",
                             f"label=orchestrator.instance={instance}").split()
        if services:
            self.exec(self.manager, "docker", "service", "rm", *services)
        for node in self.nodes:  # the guard's label (a lost node's too: the label is the manager's record)
            self.run(self.manager, "docker", "node", "update", "--label-rm", f"orchestrator.ready.{instance}", node)
        for network in ("chats", "open"):
            self._wait(lambda network=network: self._removed(self.manager, f"{instance}-{network}"), 60,
                       f"the {network} network to go")
        for node in self.nodes:  # a config network goes once no node's copy of the network needs it; a node whose
            # engine was killed keeps a stale copy until the Swarm goes (harmless: the next test has another instance)
            for config in ("chats-node", "open-node"):
                with contextlib.suppress(TimeoutError):
                    self._wait(lambda node=node, config=config: self._removed(node, f"{instance}-{config}"), 15,
                               f"the config network {config} on {node} to go")

    def _removed(self, node: str, network: str) -> bool:
        result = self.run(node, "docker", "network", "rm", network)
        return result.returncode == 0 or "No such network" in result.stderr or "not found" in result.stderr

    def service(self, name: str) -> dict:
        """`docker service inspect NAME` on the manager."""
        return json.loads(self.exec(self.manager, "docker", "service", "inspect", name))[0]

    def task_node(self, name: str) -> str:
        """The node the service's running task is on ("" when none runs)."""
        lines = self.exec(self.manager, "docker", "service", "ps", name, "--filter", "desired-state=running",
                          "--format", "{{.Node}} {{.CurrentState}}").splitlines()
        return next((line.split()[0] for line in lines if " Running " in f" {line} "), "")

    def wait_ready(self, instance: str, timeout: float = 120) -> None:
        """Until every node carries the label the orchestrator sets where the instance's guard and gateway run."""
        label = f"orchestrator.ready.{instance}"
        self._wait(lambda: all(label in (json.loads(self.exec(self.manager, "docker", "node", "inspect", "--format",
                                                               "{{json .Spec.Labels}}", node)) or {})
                               for node in self.nodes), timeout, f"the guard and gateway of {instance} on every node")

    def relay(self, name: str, socket: Path) -> str:
        """A container on the nodes' network that forwards TCP RELAY_PORT to a unix socket of the host's (its folder
        mounted): how the nodes reach a server of the test's on the host (the fake model API, PostgreSQL) without
        the host's address, which tests never target; the host reaches the relay too. Its address:port."""
        container = self.client.containers.run(
            AGENT_IMAGE, ["socat", f"TCP-LISTEN:{RELAY_PORT},fork,reuseaddr,nodelay", f"UNIX-CONNECT:{socket}"],
            entrypoint=[], name=f"{self.prefix}-{name}", detach=True, user="0:0", network=self.network,
            volumes={str(socket.parent): {"bind": str(socket.parent), "mode": "rw"}},
            labels={"orchestrator.test": "swarm"})
        container.reload()
        return f"{container.attrs['NetworkSettings']['Networks'][self.network]['IPAddress']}:{RELAY_PORT}"

    def remove_relay(self, name: str) -> None:
        with contextlib.suppress(NotFound):
            self.client.containers.get(f"{self.prefix}-{name}").remove(force=True)

    def kill_node(self, node: str) -> None:
        """The node's container killed: its engine and every task on it die at once, as in a host's crash."""
        self.client.containers.get(node).kill()

    def restart_node(self, node: str) -> None:
        """A killed node started again (its engine keeps its state in its volume and rejoins), until it is Ready."""
        self.client.containers.get(node).start()
        self._wait_engine(node)
        self._wait(lambda: self.exec(self.manager, "docker", "node", "inspect", "--format", "{{.Status.State}}",
                                     node).strip() == "ready", 120, f"{node} Ready again")

    # ---- driving ----

    def run(self, node: str, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["docker", "exec", node, *argv], capture_output=True, text=True, timeout=timeout)

    def exec(self, node: str, *argv: str, timeout: float = 600) -> str:
        result = self.run(node, *argv, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} on {node} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    @staticmethod
    def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.5)

    # ---- down ----

    def remove(self) -> None:
        """The nodes with their volumes (their engines' images, the tasks), the registry, the network, the folders.
        The chat folders hold files of the agent's uid and of root: removed as root."""
        relays = [c.name for c in self.client.containers.list(all=True, filters={"name": f"{self.prefix}-"})]
        for name in {*self.nodes, self.registry_name, *relays}:
            with contextlib.suppress(NotFound):
                self.client.containers.get(name).remove(force=True, v=True)
        with contextlib.suppress(NotFound):
            self.client.networks.get(self.network).remove()
        shutil.rmtree(self.folder, ignore_errors=True)
