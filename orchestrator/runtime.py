"""Docker: one container per chat. The only module that imports docker.

Like DockerSpawner, the container name is the idempotency key (derived from the chat id), so a restart
of the orchestrator re-finds its containers by name, and a create that races another one ends in a 409
that is adopted. docker-py blocks, so every call runs on this module's own thread pool, never on the
event loop; the public methods are coroutines.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.models.containers import Container
from docker.types import LogConfig, Mount, Ulimit

from orchestrator import credentials, egress, layout
from orchestrator.config import INSTANCE_NETWORK, ChatOptions, ChatSettings, Settings
from orchestrator.layout import WORKSPACE_PATH, ChatPaths
from orchestrator.supervise import LIVENESS

MANAGED_LABEL = "orchestrator.managed"
CHAT_LABEL = "orchestrator.chat_id"
CHAT_NAME_LABEL = "orchestrator.chat_name"
INSTANCE_LABEL = "orchestrator.instance"
ROLE_LABEL = "orchestrator.role"  # a container of the instance's that serves no one chat (gateway, egress proxy)
SPEC_LABEL = "orchestrator.spec"

ICC_OPTION = "com.docker.network.bridge.enable_icc"
BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"
IMAGE_CHECK_SECONDS = 30.0
HOME_TMPFS_SIZE = 64 * 1024**2  # the agent's home: the CLI's and tools' caches; its .claude is a mount
OPEN_FILES = 8192
MODEL_PORT = 4141  # the model gateway, on the agent's loopback (agent-init relays it to the chat's socket)
HOST_MODEL_PORTS = (20000, 20000)  # on the host's network: the first port, and how many, to spread chats over

T = TypeVar("T")


class RuntimeFailure(Exception):
    """The engine refused or could not be reached; the message is worded for the operator."""


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str
    labels: dict[str, str]
    nano_cpus: int
    mem_limit: int
    pids_limit: int
    network: str
    user: str
    mounts: tuple[tuple[str, str, bool], ...]  # (host path, container path, read-only)
    tmpfs: tuple[tuple[str, str], ...]  # (container path, mount options)
    ulimits: tuple[tuple[str, int], ...]  # (name, soft and hard limit)
    environment: tuple[tuple[str, str], ...]
    command: tuple[str, ...] = ()  # empty: the image's
    # The engine writes what PID 1 prints to the container's log, and the agent can write to PID 1's stdout
    # (/proc/1/fd/1): without a cap that file grows on the engine's disk, outside any budget.
    log_max_size: str = "1m"
    networks: tuple[str, ...] = ()  # more networks than `network`, connected before the first start
    cap_add: tuple[str, ...] = ()  # the capabilities it keeps (all others are dropped)
    # The engine's restart policy: the instance's own services (the gateway, the proxy) come back at once when they
    # die (an OOM kill, a crash) or the engine restarts, without waiting for the orchestrator; chats' need none.
    restart: str = ""

    def fingerprint(self) -> str:
        """Changes when anything but the labels changes: a container with another one is re-created. Fields added
        since count only when set, so a container made before they existed keeps its fingerprint."""
        decisive = {k: v for k, v in asdict(self).items() if k != "labels" and not (k in _LATER_FIELDS and not v)}
        return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]


_LATER_FIELDS = ("networks", "cap_add", "restart")


@dataclass(frozen=True)
class AgentNetwork:
    name: str
    bridge: str  # the host's interface for it
    subnets: tuple[str, ...]


@dataclass(frozen=True)
class InstanceNetworks:
    agents: AgentNetwork  # internal: agents whose egress is an allowlist, and the proxy
    egress: AgentNetwork  # goes out: the proxy, and agents whose egress is open


@dataclass(frozen=True)
class Usage:
    """A running container's use of its caps, from the engine's stats."""

    cpu_percent: float  # of one CPU, like `docker stats`
    memory_bytes: int
    memory_limit: int
    pids: int


@dataclass(frozen=True)
class ContainerState:
    name: str
    id: str
    status: str  # created, running, paused, restarting, exited, dead, or missing
    oom_killed: bool = False
    exit_code: int | None = None
    chat_id: str = ""
    nano_cpus: int = 0  # the caps it really has (the config may have changed since it was made)
    memory: int = 0
    pids_limit: int = 0
    started_at: str = ""  # when it last started: a restart gives it a new cgroup, whose counters start at 0

    @property
    def running(self) -> bool:
        return self.status == "running"


class Runtime(Protocol):
    """What the service and the turn runner need of a container engine; `DockerRuntime` is the real one, and unit
    tests of the middle use a fake."""

    def ping(self) -> str | None: ...

    def watch(self, instance: str, on_event: Callable[[str, str], None]) -> None: ...

    async def ensure(self, spec: ContainerSpec) -> ContainerState: ...

    async def ensure_networks(self, instance: str) -> InstanceNetworks: ...

    async def address(self, name: str, network: str) -> str | None: ...

    async def inspect(self, name: str) -> ContainerState: ...

    async def stop(self, name: str, grace_seconds: float) -> None: ...

    async def list_managed(self, instance: str) -> list[ContainerState]: ...

    async def usage(self, name: str) -> Usage | None: ...

    async def process_limit_hits(self, container_id: str, user: str) -> int | None: ...

    async def run(self, container_id: str, argv: list[str], user: str) -> tuple[int, str]: ...


def container_name(instance: str, chat_id: str) -> str:
    return f"{instance}-{chat_id}"


def gateway_container_name(instance: str) -> str:
    return f"{instance}-gateway"


def gateway_container_spec(settings: Settings, settings_digest: str) -> ContainerSpec:
    """The instance's model gateway (see `gateway`): the orchestrator's image on the host's network (the model's
    API may be on the host's loopback), serving each chat's socket in the run folder and writing usage to the
    store, at their own paths; root there only to own the sockets in root's folders and the store, with no
    capability. The settings' digest in its environment makes a changed config re-create it."""
    data_dir = str(settings.data_dir)
    read_only = (str(layout.gateway_settings_path(settings)), str(layout.secret_path(settings)))
    return ContainerSpec(
        name=gateway_container_name(settings.instance),
        image=settings.gateway.image,
        labels={MANAGED_LABEL: "true", INSTANCE_LABEL: settings.instance, ROLE_LABEL: "model-gateway"},
        nano_cpus=1_000_000_000,
        mem_limit=384 * 1024**2,  # gateway.BODY_MEMORY of request bodies, PARSE_MEMORY to read one, and Python
        pids_limit=64,  # one process, a few threads
        network="host",
        user="0:0",
        # data_dir itself is read-write, not only run/ and the store's file: the store is data_dir/orchestrator.db,
        # and SQLite in WAL mode makes (and at the last close removes) its -wal and -shm files beside it, which a
        # file mount would pin to an inode the orchestrator may have replaced. Its settings and the instance's
        # secret are mounted read-only over it.
        mounts=((data_dir, data_dir, False), *((path, path, True) for path in read_only)),
        tmpfs=(("/tmp", "rw,nosuid,nodev,noexec,size=1m"),),
        ulimits=(("nofile", OPEN_FILES), ("core", 0)),
        environment=(("GATEWAY_SETTINGS_DIGEST", settings_digest),),
        command=("python", "-m", "orchestrator.gateway", str(layout.gateway_settings_path(settings))),
        restart="unless-stopped",
    )


def network_name(instance: str) -> str:
    """The agents' network: internal (no route out); the egress proxy is on it."""
    return f"{instance}-agents"


def bridge_name(instance: str) -> str:
    """The host's interface of the agents' network, named so the firewall rules can match it (15 chars)."""
    return f"orch-{hashlib.sha256(instance.encode()).hexdigest()[:10]}"


def egress_network_name(instance: str) -> str:
    """The network that goes out (closed by the firewall to the host and private addresses): the egress proxy's,
    and that of chats with `egress: open`."""
    return f"{instance}-egress"


def egress_bridge_name(instance: str) -> str:
    """The host's interface of the egress network (15 chars)."""
    return f"oegr-{hashlib.sha256(instance.encode()).hexdigest()[:10]}"


def chat_network(instance: str, options: ChatOptions) -> str:
    """The network of a chat's container: on the instance network, the one its egress mode needs. Pure."""
    if options.network != INSTANCE_NETWORK:
        return options.network  # `none`, or one the operator named unsafe
    return {"allowlist": network_name(instance), "open": egress_network_name(instance), "none": "none"}[
        options.egress.mode]


def egress_proxy_spec(settings: Settings, files_digest: str) -> ContainerSpec:
    """The instance's egress proxy (see `egress`): squid from the orchestrator's image, on the agents' network (where
    agents resolve it by its name) and the egress network. Root only to start: squid drops to user proxy, which
    takes SETUID and SETGID and no other capability; read-only, its config folder read-only, writing only its
    refusal log. The digest of its config and key in its environment makes a changed config re-create it."""
    return ContainerSpec(
        name=egress.proxy_name(settings.instance),
        image=settings.gateway.image,  # the orchestrator's own, like the gateway's
        labels={MANAGED_LABEL: "true", INSTANCE_LABEL: settings.instance, ROLE_LABEL: "egress-proxy"},
        nano_cpus=1_000_000_000,
        mem_limit=256 * 1024**2,  # squid without a cache takes about 15 MiB, plus buffers per connection
        pids_limit=64,  # squid and its few helpers
        network=network_name(settings.instance),
        user="0:0",
        mounts=((str(egress.conf_dir(settings)), egress.CONF_PATH, True),
                (str(egress.log_dir(settings)), egress.LOG_PATH, False)),
        tmpfs=(("/tmp", "rw,nosuid,nodev,noexec,size=16m"),),
        ulimits=(("nofile", OPEN_FILES), ("core", 0)),
        environment=(("EGRESS_FILES_DIGEST", files_digest),),
        command=("squid", "-N", "-f", f"{egress.CONF_PATH}/{egress.CONFIG_NAME}"),
        networks=(egress_network_name(settings.instance),),
        cap_add=("SETUID", "SETGID"),
        restart="unless-stopped",
    )


def model_port(network: str, chat_id: str) -> int:
    """Where the chat's model gateway is served inside its container (on its loopback, by agent-init): one port
    for all, except on the host's network, where the chats share one loopback and each needs its own. Pure."""
    if network != "host":
        return MODEL_PORT
    return HOST_MODEL_PORTS[0] + int(hashlib.sha256(chat_id.encode()).hexdigest()[:8], 16) % HOST_MODEL_PORTS[1]


def model_environment(secret: bytes, network: str, chat_id: str) -> tuple[tuple[str, str], ...]:
    """The agent's model settings: the gateway on its loopback, and the chat's token, worthless anywhere else. Pure."""
    port = model_port(network, chat_id)
    return (("ANTHROPIC_API_KEY", credentials.model_token(secret, chat_id)),
            ("ANTHROPIC_BASE_URL", f"http://127.0.0.1:{port}"), ("MODEL_RELAY_PORT", str(port)))


def container_spec(settings: Settings, chat: ChatSettings, paths: ChatPaths, secret: bytes,
                   chat_name: str = "") -> ContainerSpec:
    """What the chat's container must look like: caps, labels, mounts, user, hardening. Pure."""
    options = chat.options
    labels = {MANAGED_LABEL: "true", CHAT_LABEL: chat.chat_id, INSTANCE_LABEL: settings.instance}
    if chat_name:
        labels[CHAT_NAME_LABEL] = chat_name
    network = chat_network(settings.instance, options)
    gateway_mount = (str(layout.chat_run_dir(settings, chat.chat_id)), layout.RUN_PATH, True)
    mounts = (*paths.mounts(), gateway_mount)
    return ContainerSpec(
        name=container_name(settings.instance, chat.chat_id),
        image=settings.agent.image,
        labels=labels,
        nano_cpus=int(options.cpus * 1_000_000_000),
        mem_limit=options.memory,
        pids_limit=options.pids_limit,
        network=network,
        user=f"{settings.agent.uid}:{settings.agent.uid}",
        mounts=mounts,
        # The root filesystem is read-only: all the agent keeps is in the mounts, and what it writes elsewhere
        # lives in these size-capped tmpfs (counted in its memory cap).
        tmpfs=(("/tmp", f"rw,nosuid,nodev,size={options.tmp_size}"),
               ("/home/agent", f"rw,nosuid,nodev,size={HOME_TMPFS_SIZE},uid={settings.agent.uid},"
                               f"gid={settings.agent.uid},mode=0700")),
        # One file may not outgrow the chat's whole disk budget; no core dumps (they could hold secrets).
        ulimits=(("nofile", OPEN_FILES), ("fsize", options.disk), ("core", 0)),
        environment=(*model_environment(secret, network, chat.chat_id),
                     *sorted(egress.proxy_environment(settings, chat, secret).items())),
    )


def _state(container: Container) -> ContainerState:
    state, host = container.attrs.get("State", {}), container.attrs.get("HostConfig", {})
    return ContainerState(
        name=container.name,
        id=container.id,
        status=container.status,
        oom_killed=bool(state.get("OOMKilled")),
        exit_code=state.get("ExitCode"),
        chat_id=container.labels.get(CHAT_LABEL, ""),
        nano_cpus=host.get("NanoCpus") or 0,
        memory=host.get("Memory") or 0,
        pids_limit=host.get("PidsLimit") or 0,
        started_at=state.get("StartedAt") or "",
    )


class DockerRuntime(Runtime):
    def __init__(self, timeout: float = 120) -> None:
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="docker")
        self._events: Any = None
        self._image_ids: dict[str, tuple[str, float]] = {}
        self._watching = False
        try:
            self._client = docker.from_env(timeout=timeout)
        except DockerException as exc:
            raise RuntimeFailure(f"the Docker engine cannot be reached: {exc}") from exc

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except ImageNotFound as exc:
            raise RuntimeFailure(f"image not found ({exc.explanation}): build it with images/build.sh") from exc
        except APIError as exc:
            raise RuntimeFailure(f"the Docker engine refused: {exc.explanation or exc}") from exc
        except (DockerException, requests.RequestException) as exc:
            raise RuntimeFailure(f"the Docker engine cannot be reached: {exc}") from exc

    def close(self) -> None:
        self._watching = False
        if self._events is not None:
            self._events.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def ping(self) -> str | None:
        """None when the engine answers; otherwise why not. Blocking: for the health endpoint's thread."""
        try:
            self._client.api.ping()
        except (DockerException, requests.RequestException) as exc:
            return f"the Docker engine cannot be reached: {exc.__class__.__name__}"
        return None

    async def usage(self, name: str) -> Usage | None:
        """CPU, memory and processes of a running container (takes about a second: the engine samples)."""
        return await self._call(self._usage, name)

    def _usage(self, name: str) -> Usage | None:
        container = self._find(name)
        if container is None or container.status != "running":
            return None
        stats = container.stats(stream=False)
        cpu, precpu = stats.get("cpu_stats", {}), stats.get("precpu_stats", {})
        cpu_delta = cpu.get("cpu_usage", {}).get("total_usage", 0) - precpu.get("cpu_usage", {}).get("total_usage", 0)
        system_delta = cpu.get("system_cpu_usage", 0) - precpu.get("system_cpu_usage", 0)
        cpus = cpu.get("online_cpus") or 1
        memory = stats.get("memory_stats", {})
        return Usage(
            cpu_percent=round(100.0 * cpu_delta / system_delta * cpus, 1) if system_delta > 0 else 0.0,
            memory_bytes=int(memory.get("usage", 0)) - int(memory.get("stats", {}).get("cache", 0)),
            memory_limit=int(memory.get("limit", 0)),
            pids=int(stats.get("pids_stats", {}).get("current", 0)),
        )

    # ---- events ----

    def watch(self, instance: str, on_event: Callable[[str, str], None]) -> None:
        """Call `on_event(chat_id, action)` (on a thread of its own) when one of our containers dies, is
        OOM-killed in part or whole, or starts. The engine drops slow readers, so callers relist as well."""
        self._watching = True
        threading.Thread(target=self._watch, args=(instance, on_event), name="docker-events", daemon=True).start()

    def _watch(self, instance: str, on_event: Callable[[str, str], None]) -> None:
        filters = {"type": "container", "event": ["die", "oom", "start"],
                   "label": [f"{MANAGED_LABEL}=true", f"{INSTANCE_LABEL}={instance}"]}
        streak = LIVENESS.streak("docker_events")
        while self._watching:
            try:
                self._events = self._client.events(filters=filters, decode=True)
                streak.ok()
                for event in self._events:
                    attributes = event.get("Actor", {}).get("Attributes", {})
                    on_event(attributes.get(CHAT_LABEL, ""), event.get("Action", event.get("status", "")))
            except Exception as exc:  # the engine restarted, the stream broke, or anything else: follow it again
                if self._watching:
                    time.sleep(streak.failed(exc))

    # ---- lifecycle ----

    async def ensure(self, spec: ContainerSpec) -> ContainerState:
        """Adopt the chat's container if running, start it if stopped, create it if missing."""
        return await self._call(self._ensure, spec)

    def _ensure(self, spec: ContainerSpec) -> ContainerState:
        # The image's id, not its tag: an agent image rebuilt under the same tag reaches every chat this way.
        fingerprint = f"{spec.fingerprint()}:{self._image_id(spec.image)}"
        container = self._find(spec.name)
        if container is not None and container.labels.get(SPEC_LABEL) != fingerprint:
            container.remove(force=True)  # its image, caps or mounts are out of date; its state is in the mounts
            container = None
        if container is None:
            container = self._create(spec, fingerprint)
        if container.status == "paused":
            container.unpause()
            container.reload()
        elif container.status != "running":
            container.start()
            container.reload()
        return _state(container)

    def _image_id(self, image: str) -> str:
        """The id behind a tag, looked up at most every IMAGE_CHECK_SECONDS (it changes only on a rebuild)."""
        cached = self._image_ids.get(image)
        if cached is None or time.monotonic() - cached[1] > IMAGE_CHECK_SECONDS:
            cached = self._image_ids[image] = (self._client.images.get(image).id, time.monotonic())
        return cached[0]

    def _find(self, name: str) -> Container | None:
        try:
            return self._client.containers.get(name)
        except NotFound:
            return None

    def _create(self, spec: ContainerSpec, fingerprint: str) -> Container:
        try:
            container = self._client.containers.create(
                spec.image,
                name=spec.name,
                labels={**spec.labels, SPEC_LABEL: fingerprint},
                detach=True,
                user=spec.user,
                working_dir=WORKSPACE_PATH,
                nano_cpus=spec.nano_cpus,
                mem_limit=spec.mem_limit,
                memswap_limit=spec.mem_limit,  # no swap: the memory cap is the cap
                pids_limit=spec.pids_limit,
                network_mode=spec.network,
                mounts=[Mount(target=target, source=source, type="bind", read_only=read_only)
                        for source, target, read_only in spec.mounts],
                tmpfs=dict(spec.tmpfs),
                read_only=True,
                ulimits=[Ulimit(name=name, soft=limit, hard=limit) for name, limit in spec.ulimits],
                environment=dict(spec.environment),
                command=list(spec.command) or None,
                log_config=LogConfig(type="json-file", config={"max-size": spec.log_max_size, "max-file": "1"}),
                cap_drop=["ALL"],
                cap_add=list(spec.cap_add) or None,
                restart_policy={"Name": spec.restart} if spec.restart else None,
                security_opt=["no-new-privileges"],
            )
        except APIError as exc:
            if exc.status_code != 409:
                raise
            return self._client.containers.get(spec.name)  # created meanwhile by someone else: adopt it
        try:
            for network in spec.networks:  # the engine's API before 1.44 takes one network at create
                self._client.networks.get(network).connect(container)
        except Exception:
            container.remove(force=True)  # not adopted half-connected: the next ensure makes it again
            raise
        return container

    # ---- the instance's networks ----

    async def ensure_networks(self, instance: str) -> InstanceNetworks:
        """The instance's own bridges, made if missing, labelled, with inter-container traffic off (enable_icc=false,
        so no chat reaches another's container): the agents' network, internal (no route out), and the egress
        network, which goes out (the firewall closes it to the host and private addresses)."""
        return await self._call(self._ensure_networks, instance)

    def _ensure_networks(self, instance: str) -> InstanceNetworks:
        return InstanceNetworks(
            agents=self._network(instance, network_name(instance), bridge_name(instance), internal=True),
            egress=self._network(instance, egress_network_name(instance), egress_bridge_name(instance), internal=False))

    def _network(self, instance: str, name: str, bridge: str, internal: bool) -> AgentNetwork:
        try:
            network = self._client.networks.get(name)
        except NotFound:
            network = None
        if network is not None and internal and not network.attrs.get("Internal"):
            self._remove_outdated(network)
            network = None
        if network is None:
            try:
                network = self._client.networks.create(
                    name, driver="bridge", internal=internal, labels={MANAGED_LABEL: "true", INSTANCE_LABEL: instance},
                    options={ICC_OPTION: "false", BRIDGE_NAME_OPTION: bridge}, check_duplicate=True)
            except APIError as exc:
                if exc.status_code != 409:
                    raise
                network = self._client.networks.get(name)  # made meanwhile by another start: use it
            network.reload()
        options = network.attrs.get("Options") or {}
        if (options.get(ICC_OPTION) != "false" or options.get(BRIDGE_NAME_OPTION) != bridge
                or bool(network.attrs.get("Internal")) != internal):
            raise RuntimeFailure(f"the network {name} exists but was not made by the orchestrator (it lets "
                                 "containers reach each other, or goes out where it must not, or not where it must); "
                                 "remove it with `docker network rm` and start again")
        subnets = [c.get("Subnet", "") for c in (network.attrs.get("IPAM") or {}).get("Config") or []]
        return AgentNetwork(name=name, bridge=bridge, subnets=tuple(s for s in subnets if s))

    @staticmethod
    def _remove_outdated(network: Any) -> None:
        """The agents' network of a version before the egress proxy went out to the internet: it is made again as an
        internal one, which the engine allows only once no running container is on it (those of turns left
        running for an upgrade). Stopped chat containers are made again by their next turn (their spec changed)."""
        network.reload()
        attached = sorted(c.get("Name", "?") for c in (network.attrs.get("Containers") or {}).values())
        if attached:
            raise RuntimeFailure(
                f"the network {network.name} was made by an older version and goes out to the internet; it must be "
                f"made again as an internal network, and {len(attached)} container(s) still run on it "
                f"({', '.join(attached[:5])}): once their turns are done, remove them (`docker rm -f NAME`; their "
                "chats keep their folders and sessions) and start again")
        network.remove()

    async def address(self, name: str, network: str) -> str | None:
        """A running container's IPv4 address on a network, or None."""
        return await self._call(self._address, name, network)

    def _address(self, name: str, network: str) -> str | None:
        container = self._find(name)
        if container is None or container.status != "running":
            return None
        return (container.attrs["NetworkSettings"].get("Networks") or {}).get(network, {}).get("IPAddress") or None

    async def inspect(self, name: str) -> ContainerState:
        return await self._call(self._inspect, name)

    def _inspect(self, name: str) -> ContainerState:
        container = self._find(name)
        return _state(container) if container else ContainerState(name=name, id="", status="missing")

    async def stop(self, name: str, grace_seconds: float) -> None:
        """SIGTERM to the container's init, then SIGKILL after the grace period."""
        await self._call(self._stop, name, grace_seconds)

    def _stop(self, name: str, grace_seconds: float) -> None:
        container = self._find(name)
        if container is not None and container.status in ("running", "paused", "restarting"):
            container.stop(timeout=max(1, round(grace_seconds)))

    async def list_managed(self, instance: str) -> list[ContainerState]:
        return await self._call(self._list_managed, instance)

    def _list_managed(self, instance: str) -> list[ContainerState]:
        labels = [f"{MANAGED_LABEL}=true", f"{INSTANCE_LABEL}={instance}", CHAT_LABEL]  # chats' only
        return [_state(c) for c in self._client.containers.list(all=True, filters={"label": labels})]

    # ---- processes in a container ----

    async def process_limit_hits(self, container_id: str, user: str) -> int | None:
        """How often the kernel refused a new process in the container for its pids limit (cgroup v1 or v2),
        or None if that cannot be read (for a moment after a fork bomb, not even `cat` can start)."""
        for _ in range(3):
            try:
                _, output = await self.run(container_id, ["sh", "-c", "cat /sys/fs/cgroup/pids/pids.events "
                                                             "/sys/fs/cgroup/pids.events 2>/dev/null"], user)
            except RuntimeFailure:
                return None
            for line in output.splitlines():
                name, _, count = line.partition(" ")
                if name == "max" and count.strip().isdigit():
                    return int(count)
            await asyncio.sleep(1)
        return None

    async def run(self, container_id: str, argv: list[str], user: str) -> tuple[int, str]:
        """Run a short command in the container and wait for it: (exit code, output)."""
        return await self._call(self._run, container_id, argv, user)

    def _run(self, container_id: str, argv: list[str], user: str) -> tuple[int, str]:
        code, output = self._client.containers.get(container_id).exec_run(argv, user=user)
        return code, output.decode(errors="replace")
