"""Docker: one container per chat. The only module that imports docker.

Like DockerSpawner, the container name is the idempotency key (derived from the chat id), so a restart
of the orchestrator re-finds its containers by name, and a create that races another one ends in a 409
that is adopted. docker-py blocks, so every call runs on this module's own thread pool, never on the
event loop; the public methods are coroutines.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound, create_api_error_from_http_exception
from docker.models.containers import Container
from docker.types import LogConfig, Mount, Ulimit
from loguru import logger

from orchestrator import credentials, egress, layout
from orchestrator.config import INSTANCE_NETWORK, ChatOptions, ChatSettings, Settings
from orchestrator.layout import WORKSPACE_PATH, ChatPaths
from orchestrator.node_guard import HEALTH_FILE as GUARD_HEALTH_FILE
from orchestrator.node_guard import HEALTHY_SECONDS as GUARD_HEALTHY_SECONDS
from orchestrator.supervise import LIVENESS

MANAGED_LABEL = "orchestrator.managed"
CHAT_LABEL = "orchestrator.chat_id"
CHAT_NAME_LABEL = "orchestrator.chat_name"
INSTANCE_LABEL = "orchestrator.instance"
SWARM_TASK_LABEL = "com.docker.swarm.task.id"  # the engine's, on the container of a Swarm task
ROLE_LABEL = "orchestrator.role"  # a container of the instance's that serves no one chat (gateway, egress proxy)
GATEWAY_ROLE = "model-gateway"
EGRESS_PROXY_ROLE = "egress-proxy"
NODE_ROLES = (GATEWAY_ROLE, EGRESS_PROXY_ROLE)  # runtime: swarm: the instance's services on every node
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
    # runtime: swarm only (config.Placement): where the chat's service may run, and what its node reserves for it
    constraints: tuple[str, ...] = ()
    spread: tuple[str, ...] = ()
    reserve_nano_cpus: int = 0
    reserve_memory: int = 0

    def fingerprint(self) -> str:
        """Changes when anything but the labels changes: a container with another one is re-created. Fields added
        since count only when set, so a container made before they existed keeps its fingerprint."""
        decisive = {k: v for k, v in asdict(self).items() if k != "labels" and not (k in _LATER_FIELDS and not v)}
        return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]


_LATER_FIELDS = ("networks", "cap_add", "restart", "constraints", "spread", "reserve_nano_cpus", "reserve_memory")


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
    node: str = ""  # runtime: swarm: the node its task runs on (or last ran on)

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

    async def stop_leftovers(self, instance: str, grace_seconds: float) -> list[str]: ...

    async def usage(self, name: str) -> Usage | None: ...

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
    # runtime: swarm: one on every node (a global service), from the registry, binding the chats' sockets in the
    # node's own folder (layout.model_socket_dir)
    on_swarm = settings.runtime == "swarm"
    node_folder = ((str(layout.NODE_FOLDER), str(layout.NODE_FOLDER), False),) if on_swarm else ()
    return ContainerSpec(
        name=gateway_container_name(settings.instance),
        image=settings.swarm.orchestrator_image if on_swarm else settings.gateway.image,
        labels={MANAGED_LABEL: "true", INSTANCE_LABEL: settings.instance, ROLE_LABEL: GATEWAY_ROLE},
        nano_cpus=1_000_000_000,
        mem_limit=384 * 1024**2,  # gateway.BODY_MEMORY of request bodies, PARSE_MEMORY to read one, and Python
        pids_limit=64,  # one process, a few threads
        network="host",
        user="0:0",
        # data_dir itself is read-write, not only run/ and the store's file: the store is data_dir/orchestrator.db,
        # and SQLite in WAL mode makes (and at the last close removes) its -wal and -shm files beside it, which a
        # file mount would pin to an inode the orchestrator may have replaced. Its settings and the instance's
        # secret are mounted read-only over it.
        mounts=((data_dir, data_dir, False), *((path, path, True) for path in read_only), *node_folder),
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
    refusal log. The digest of its config and key in its environment makes a changed config re-create it.
    runtime: swarm: one on every node (a global service, from the registry), on the node's network listening on
    its loopback (the gateway relays the chats' sockets to it), started as user proxy with no capability by
    `egress_node`, which gives each node's refusals a folder of its own (the node's id from the service's
    template)."""
    spec = ContainerSpec(
        name=egress.proxy_name(settings.instance),
        image=settings.gateway.image,  # the orchestrator's own, like the gateway's
        labels={MANAGED_LABEL: "true", INSTANCE_LABEL: settings.instance, ROLE_LABEL: EGRESS_PROXY_ROLE},
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
    if settings.runtime != "swarm":
        return spec
    return dataclasses.replace(
        spec, image=settings.swarm.orchestrator_image, network="host", networks=(), cap_add=(),
        user=f"{egress.PROXY_UID}:{egress.PROXY_UID}", environment=(*spec.environment, ("NODE_ID", "{{.Node.ID}}")),
        command=("python", "-m", "orchestrator.egress_node"))


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
    gateway_mount = (str(layout.chat_model_socket_dir(settings, chat.chat_id)), layout.RUN_PATH, True)
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
        constraints=options.placement.constraints,
        spread=options.placement.spread,
        reserve_nano_cpus=int(options.placement.reserve_cpus * 1_000_000_000),
        reserve_memory=options.placement.reserve_memory,
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


async def _in_thread(executor: ThreadPoolExecutor, engine: str, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` (docker-py, which blocks) on a runtime's own threads, its errors as RuntimeFailure worded for the
    operator: `engine` names the engine it talks to."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(executor, fn, *args)
    except ImageNotFound as exc:
        raise RuntimeFailure(f"image not found ({exc.explanation}): build it with images/build.sh") from exc
    except APIError as exc:
        raise RuntimeFailure(f"{engine} refused: {exc.explanation or exc}") from exc
    except (DockerException, requests.RequestException) as exc:
        raise RuntimeFailure(f"{engine} cannot be reached: {exc}") from exc


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
        return await _in_thread(self._executor, "the Docker engine", fn, *args)

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
        if network.attrs.get("EnableIPv6"):  # the firewall's rules are IPv4's: IPv6 would pass them all
            raise RuntimeFailure(f"the network {name} has IPv6 (the engine's default-network-opts, or made by "
                                 "hand), which the orchestrator's firewall rules do not close: turn IPv6 off for new "
                                 "networks, remove it with `docker network rm` and start again")
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
        return [_state(c) for c in self._client.containers.list(all=True, filters={"label": labels})
                if SWARM_TASK_LABEL not in c.labels]  # a Swarm node's chat tasks (carrying our labels) are Swarm's

    async def stop_leftovers(self, instance: str, grace_seconds: float) -> list[str]:
        """Chats' containers of another runtime that would serve this instance's chats: none on one host."""
        return []

    # ---- processes in a container ----

    async def run(self, container_id: str, argv: list[str], user: str) -> tuple[int, str]:
        """Run a short command in the container and wait for it: (exit code, output)."""
        return await self._call(self._run, container_id, argv, user)

    def _run(self, container_id: str, argv: list[str], user: str) -> tuple[int, str]:
        code, output = self._client.containers.get(container_id).exec_run(argv, user=user)
        return code, output.decode(errors="replace")


# ---- Docker Swarm: one service per chat ----------------------------------------------------------------------------

SWARM_POLL_SECONDS = 0.25  # how often a start or a stop looks at the chat's tasks (from the event loop)
SWARM_STOP_SECONDS = 60.0  # after a scale to zero, how long to wait for the task to be gone
SWARM_WATCH_SECONDS = 2.0  # how often the watch looks at the chats' tasks (Swarm sends no task events to a manager)
SWARM_NODES_SECONDS = 2.0  # how long the nodes' table (hostnames, up or down, engines) is taken as current
# How long a node keeps the ready label after its gateway stopped running there (its guard running on): taking it
# away makes Swarm stop every chat's task on the node (turns and all), while Swarm restarts a crashed gateway within
# seconds (SWARM_RESTART_DELAY_NS, then it binds the chats' sockets in about a second). A node whose guard stopped
# loses the label at once: the label also lets new chats onto the node.
READY_GRACE_SECONDS = 30.0
SWARM_RESTART_DELAY_NS = 2_000_000_000
# Where a chat's task sends DNS queries that its node's embedded resolver forwards: an address given in the service's
# DNS config is asked from the task's own network namespace, and on the chats' internal network nothing answers there.
# Left to the node's resolv.conf, an engine before 23.0.11 / 25.0.4 / 26.0 asks a loopback resolver (systemd's
# 127.0.0.53, a Docker-in-Docker node's 127.0.0.11) from the node's namespace, a way out of an internal network
# (CVE-2024-29018). Measured on Debian's 20.10.24: with this setting the query reached a listener on the task's own
# 127.0.0.1:53, not the node's.
SWARM_TASK_NAMESERVER = "127.0.0.1"
MIN_NODE_ENGINE = (20, 10)  # API 1.41: before it a node drops a service's capability drop, ulimits and pids limit
# A task's states (swarmkit's TaskState) as the container states the service and the turn runner know.
_TASK_STATES = {
    "new": "created", "pending": "created", "assigned": "created", "accepted": "created", "preparing": "created",
    "ready": "created", "starting": "created", "running": "running", "complete": "exited", "shutdown": "exited",
    "failed": "exited", "rejected": "dead", "orphaned": "dead", "remove": "exited",
}
_TASK_LIVE = ("new", "pending", "assigned", "accepted", "preparing", "ready", "starting", "running")
_NODE_LOST = ("down", "disconnected")  # the manager no longer hears from it: what its tasks last said is stale


def swarm_network_name(instance: str) -> str:
    """The chats' network on the Swarm: a swarm-scoped bridge on each node, internal (no route out), its per-node
    options (enable_icc=false: no chat reaches another on its node) from `swarm_node_network_name` on each node."""
    return f"{instance}-chats"


def swarm_node_network_name(instance: str) -> str:
    """The config-only network the operator makes on every node (`docker network create --config-only --opt
    com.docker.network.bridge.enable_icc=false NAME`): Swarm takes a local network's driver options only so."""
    return f"{instance}-chats-node"


def swarm_open_network_name(instance: str) -> str:
    """The open chats' network on the Swarm (`egress: open`): a swarm-scoped bridge on each node with a route out
    (the node's NAT), closed to the node, to the other chats and to private addresses by the guard, its per-node
    options from `swarm_open_node_network_name`."""
    return f"{instance}-open"


def swarm_open_node_network_name(instance: str) -> str:
    return f"{instance}-open-node"


def swarm_network_of(network: str, instance: str, open_egress: bool) -> str:
    """The Swarm network of a chat whose container on one host would be on `network`: the chats' (internal) for an
    allowlist or none, the open chats' for open egress (kept only while the config has such a chat). Pure."""
    if network in ("none", network_name(instance)):
        return swarm_network_name(instance)
    if network == egress_network_name(instance) and open_egress:
        return swarm_open_network_name(instance)
    raise RuntimeFailure(f"network {network} is not served on runtime: swarm")


def guard_name(instance: str) -> str:
    return f"{instance}-guard"


def ready_label(instance: str) -> str:
    """The node label the orchestrator sets where the instance's guard (healthy) and model gateway run; chats are
    placed only there."""
    return f"orchestrator.ready.{instance}"


def open_label(instance: str) -> str:
    """The node label set where the node is ready and its guard keeps the open chats' bridge too; open chats are
    placed only there."""
    return f"orchestrator.open.{instance}"


BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"


def config_network_problem(config: dict[str, Any] | None, name: str) -> str | None:
    """What is wrong with the manager's copy of a config-only network the operator makes on every node, for the
    operator; None when nothing. It must keep chats apart (enable_icc=false) and leave the bridge's name to the
    engine (br-<network id>: the name the guard's rules are written for). Pure."""
    make = (f"make it on EVERY node (managers and workers) with `docker network create --config-only --opt "
            f"{ICC_OPTION}=false {name}`, then start again")
    options = (config or {}).get("Options") or {}
    if config is None or options.get(ICC_OPTION) != "false":
        return f"the Swarm's nodes lack the network {name}: {make}"
    if BRIDGE_NAME_OPTION in options:
        return (f"the network {name} names its bridge ({BRIDGE_NAME_OPTION}), which the guard's rules would not "
                f"match: remove it (`docker network rm {name}`) and {make}")
    return None


def required_labels(instance: str, goes_out: bool) -> tuple[str, ...]:
    """The constraints every chat's service gets (the ready label), and an open chat's (the open label). Pure."""
    return (f"node.labels.{ready_label(instance)}==true", *([f"node.labels.{open_label(instance)}==true"]
                                                           if goes_out else []))


def chats_bridge(network_id: str) -> str:
    """The interface of a swarm-scoped bridge network on each node: the engine names it by the network's id."""
    return f"br-{network_id[:12]}"


def _swarm_container(spec: ContainerSpec, image: str, labels: dict[str, str]) -> dict[str, Any]:
    """A service's ContainerSpec from a container's: its user, read-only root, every capability dropped but those it
    keeps, mounts, ulimits, environment and command. Pure."""
    container: dict[str, Any] = {
        "Image": image,
        "Labels": labels,
        "Env": [f"{name}={value}" for name, value in spec.environment],
        "User": spec.user,
        "ReadOnly": True,
        "Mounts": [{"Type": "bind", "Source": source, "Target": target, "ReadOnly": read_only}
                   for source, target, read_only in spec.mounts]
                  + [{"Type": "tmpfs", "Target": target, "TmpfsOptions": _tmpfs_options(options)}
                     for target, options in spec.tmpfs],
        "Ulimits": [{"Name": name, "Soft": limit, "Hard": limit} for name, limit in spec.ulimits],
        "CapabilityDrop": ["ALL"],
    }
    if spec.cap_add:
        container["CapabilityAdd"] = list(spec.cap_add)
    if spec.command:
        container["Args"] = list(spec.command)  # Swarm's Command is the entrypoint; Args the image's CMD
    return container


def node_service_spec(spec: ContainerSpec, image: str) -> dict[str, Any]:
    """One of the instance's own containers as a global service: a task on every node, on the node's network (as
    on one host), with the spec's user, capabilities, mounts, limits and command; restarted whenever it ends. Pure."""
    container = _swarm_container(spec, image, dict(spec.labels))
    return {
        "Name": spec.name,
        "Labels": dict(spec.labels),
        "TaskTemplate": {
            "ContainerSpec": container,
            "Resources": {"Limits": {"NanoCPUs": spec.nano_cpus, "MemoryBytes": spec.mem_limit,
                                     "Pids": spec.pids_limit}},
            "RestartPolicy": {"Condition": "any", "Delay": SWARM_RESTART_DELAY_NS, "MaxAttempts": 0},
            "Networks": [{"Target": "host"}],
            "LogDriver": {"Name": "json-file", "Options": {"max-size": spec.log_max_size, "max-file": "1"}},
        },
        "Mode": {"Global": {}},
        # A new spec's task starts before the last one stops (the guard's rules and the gateway's sockets are made
        # again, whichever runs), one node at a time, and a node that fails it does not stop the others' update.
        "UpdateConfig": {"Parallelism": 1, "Order": "start-first", "FailureAction": "continue"},
    }


def guard_service_spec(instance: str, image: str, bridge: str, open_bridge: str | None = None) -> dict[str, Any]:
    """The instance's guard (orchestrator.node_guard) of the chats' bridge and the open chats' (when some chat's
    egress is open): one task on every node, on the node's network, root with the two capabilities iptables needs
    and nothing else; healthy while its loop keeps the rules. Pure."""
    guard = ContainerSpec(
        name=guard_name(instance), image=image,
        labels={MANAGED_LABEL: "true", INSTANCE_LABEL: instance, ROLE_LABEL: "guard"},
        nano_cpus=200_000_000, mem_limit=128 * 1024**2, pids_limit=32, network="host", user="0:0", mounts=(),
        tmpfs=(("/run", "size=1m"), ("/tmp", "size=1m")), ulimits=(), environment=(),
        command=(*GUARD_COMMAND, instance, bridge, *([open_bridge] if open_bridge else [])),
        cap_add=("CAP_NET_ADMIN", "CAP_NET_RAW"))
    spec = node_service_spec(guard, image)
    health = f"test $(( $(date +%s) - $(stat -c %Y {GUARD_HEALTH_FILE}) )) -lt {GUARD_HEALTHY_SECONDS}"
    spec["TaskTemplate"]["ContainerSpec"]["Healthcheck"] = {
        "Test": ["CMD-SHELL", health], "Interval": 5_000_000_000, "Timeout": 5_000_000_000, "Retries": 2}
    return spec


def running_on(tasks: list[dict[str, Any]], fingerprint: str) -> set[str]:
    """The nodes where a task of the service's current spec (its fingerprint) runs: the gateway's, the proxy's (a
    task of the last spec, which Swarm replaces node by node, may serve another folder or port; `within_grace`
    keeps the label meanwhile). Pure."""
    return {t["NodeID"] for t in tasks if _running_task(t) and of_spec(t, fingerprint)}


def _running_task(task: dict[str, Any]) -> bool:
    """A task placed on a node that runs there and should (a guard's: once its health check passed). Pure."""
    return bool(task.get("NodeID")) and task.get("DesiredState") == "running" \
        and task.get("Status", {}).get("State") == "running"


GUARD_COMMAND = ("python", "-m", "orchestrator.node_guard")  # then INSTANCE BRIDGE [OPEN_BRIDGE]
GUARD_BRIDGES_AT = len(GUARD_COMMAND) + 1


def guard_bridges(guard: dict[str, Any] | None) -> list[str]:
    """The bridges the guard service's current spec keeps (the chats', then the open chats' when there is one);
    none when the service is gone. Pure."""
    if guard is None:
        return []
    return list(guard["Spec"]["TaskTemplate"]["ContainerSpec"].get("Args", [])[GUARD_BRIDGES_AT:])


def guarding(tasks: list[dict[str, Any]], bridge: str) -> set[str]:
    """The nodes where a guard task runs (its health check passed) that keeps `bridge`'s rules, of the service's
    current spec or an earlier one: a new spec (an image upgrade, open egress turned on) replaces the tasks node by
    node, each old one running until the new one there is healthy, and its rules hold meanwhile. By the bridge among
    its arguments: a task that keeps the rules of a bridge that is gone does not count. Pure."""
    return {t["NodeID"] for t in tasks if _running_task(t)
            and bridge in t.get("Spec", {}).get("ContainerSpec", {}).get("Args", [])[GUARD_BRIDGES_AT:]}


def node_label_updates(nodes: list[dict[str, Any]], wanted: dict[str, set[str]],
                       kept: Collection[str] = ()) -> list[tuple[str, int, dict]]:
    """The nodes whose labels must change (each label set on its `wanted` nodes and removed elsewhere, but left as it
    is on the `kept` ones): (id, version, new spec), one update a node. Pure."""
    updates = []
    for node in nodes:
        if node["ID"] in kept:
            continue
        spec = node.get("Spec") or {}
        labels = dict(spec.get("Labels") or {})
        for label, where in wanted.items():
            if node["ID"] in where:
                labels[label] = "true"
            else:
                labels.pop(label, None)
        if labels != (spec.get("Labels") or {}):
            updates.append((node["ID"], node["Version"]["Index"], {**spec, "Labels": labels}))
    return updates


def within_grace(unready: dict[str, float], ready: set[str], ready_before: set[str], guarded: set[str], now: float,
                 grace: float) -> tuple[dict[str, float], set[str]]:
    """Of the nodes that were ready and whose gateway stopped running while their guard runs on: since when, and
    those within `grace` of it, whose label stays meanwhile. A node whose guard stopped has none (its rules may not
    hold: br_netfilter off, rules it could not put back), nor one this process never saw ready. Pure."""
    since = {node: unready.get(node, now) for node in guarded - ready if node in unready or node in ready_before}
    return since, {node for node, first in since.items() if now - first < grace}


def _tmpfs_options(options: str) -> dict[str, int]:
    """A tmpfs's options (rw,nosuid,size=256m,uid=1000,mode=0700) as Swarm's TmpfsOptions, which hold a size and a
    mode only: Swarm mounts every tmpfs nosuid, nodev and noexec, and root's. A tmpfs that was to be another user's
    is made sticky and writable by all instead (the agent's home: the agent is the container's only user). Pure."""
    values = dict(item.partition("=")[::2] for item in options.split(","))
    size = _SIZE_SUFFIXES.get(values.get("size", "")[-1:].lower())
    result: dict[str, int] = {}
    if "size" in values:
        raw = values["size"]
        result["SizeBytes"] = int(raw[:-1]) * size if size else int(raw)
    if values.get("uid", "0") != "0":
        result["Mode"] = 0o1777
    elif "mode" in values:
        result["Mode"] = int(values["mode"], 8)
    return result


_SIZE_SUFFIXES = {"k": 1024, "m": 1024**2, "g": 1024**3}


def service_spec(spec: ContainerSpec, image: str, fingerprint: str, network: str, replicas: int,
                 force_update: int = 0, stop_grace: float = 0.0, required: tuple[str, ...] = (),
                 goes_out: bool = False) -> dict[str, Any]:
    """The Swarm service of a chat's container spec, as the engine's API takes it (API 1.41: capabilities, ulimits
    and the pids limit are there, which docker-py's helpers do not all know; `SwarmRuntime` refuses an older engine).
    The fingerprint is on the tasks too, so a start can tell the task of this spec from one of the last. A chat that
    `goes_out` (on the open chats' network) asks the engine's embedded DNS, which forwards to the engine's upstream
    resolvers (those the guard lets through: docs/SCALING.md); the others' DNS goes nowhere (see
    SWARM_TASK_NAMESERVER). Pure."""
    container = _swarm_container(spec, image, {**spec.labels, SPEC_LABEL: fingerprint})
    container["Dir"] = WORKSPACE_PATH
    if not goes_out:
        container["DNSConfig"] = {"Nameservers": [SWARM_TASK_NAMESERVER]}
    # No IPv6 in the chat's namespace: the guard's rules are IPv4 (iptables), and a node's engine or config network
    # may give the bridge IPv6 (a link-local address at least) that would reach the node and the other chats.
    container["Sysctls"] = {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"}
    if stop_grace:
        container["StopGracePeriod"] = int(stop_grace * 1e9)  # SIGTERM, then SIGKILL this long after (Swarm: 10 s)
    limits = {"NanoCPUs": spec.nano_cpus, "MemoryBytes": spec.mem_limit, "Pids": spec.pids_limit}
    reservations = {key: value for key, value in (("NanoCPUs", spec.reserve_nano_cpus),
                                                  ("MemoryBytes", spec.reserve_memory)) if value}
    placement: dict[str, Any] = {}
    if spec.constraints or required:
        placement["Constraints"] = [*spec.constraints, *required]  # required: the runtime's own (the guard's label)
    if spec.spread:
        placement["Preferences"] = [{"Spread": {"SpreadDescriptor": attribute}} for attribute in spec.spread]
    return {
        "Name": spec.name,
        "Labels": {**spec.labels, SPEC_LABEL: fingerprint},
        "TaskTemplate": {
            "ContainerSpec": container,
            "Resources": {"Limits": limits, "Reservations": reservations},
            "RestartPolicy": {"Condition": "on-failure", "Delay": SWARM_RESTART_DELAY_NS, "MaxAttempts": 0},
            "Placement": placement,
            "Networks": [{"Target": network}],
            "LogDriver": {"Name": "json-file", "Options": {"max-size": spec.log_max_size, "max-file": "1"}},
            "ForceUpdate": force_update,
        },
        "Mode": {"Replicated": {"Replicas": replicas}},
    }


@dataclass(frozen=True)
class SwarmNode:
    """What the runtime needs of a Swarm node: its hostname (shown per chat), whether the manager hears from it, and
    whether it takes tasks with an engine new enough for a chat's service."""

    hostname: str
    lost: bool  # down or disconnected: its tasks' last reported states are stale
    active: bool  # availability active and ready: Swarm may place a chat there
    engine: str  # the engine's version, as it reports it (20.10.24+dfsg1, 27.3.1)


def swarm_nodes(nodes: list[dict[str, Any]]) -> dict[str, SwarmNode]:
    """The engine's `GET /nodes` by node id. Pure."""
    table = {}
    for node in nodes:
        description, status = node.get("Description") or {}, node.get("Status") or {}
        table[node["ID"]] = SwarmNode(
            hostname=description.get("Hostname") or node["ID"],
            lost=status.get("State") in _NODE_LOST,
            active=status.get("State") == "ready" and (node.get("Spec") or {}).get("Availability") == "active",
            engine=(description.get("Engine") or {}).get("EngineVersion", ""))
    return table


def engine_too_old(version: str) -> bool:
    """Whether an engine's version is before MIN_NODE_ENGINE (or unreadable). Pure."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return match is None or (int(match[1]), int(match[2])) < MIN_NODE_ENGINE


def pinned_image(image: str, digest: str, last_known: str) -> str:
    """The reference a chat's service runs: the image at the digest the registry gave, else the reference last known
    (a registry's outage must not change every chat's fingerprint, replacing its task twice), else the tag. Pure."""
    if digest:
        return f"{image.split('@')[0]}@{digest}"
    return last_known or image


def _created(task: dict[str, Any]) -> tuple[str, int, int]:
    """A task's creation time as (seconds, nanoseconds) and its version: the API's RFC 3339 text drops a fraction's
    trailing zeros (`…:05Z`, `…:05.5Z`, `…:05.45Z`), so as text it does not sort by time. Pure."""
    seconds, _, fraction = task.get("CreatedAt", "").rstrip("Z").partition(".")
    nanoseconds = int(fraction[:9].ljust(9, "0")) if fraction.isdigit() else 0
    return seconds, nanoseconds, task.get("Version", {}).get("Index", 0)


def newest_task(tasks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The task that stands for the service now: the newest that should run, else the newest of all. Pure."""
    if not tasks:
        return None
    wanted = [t for t in tasks if t.get("DesiredState") == "running"]
    return max(wanted or tasks, key=_created)


def task_live(task: dict[str, Any], nodes: dict[str, SwarmNode]) -> bool:
    """Whether a task runs or is on its way, by its last reported state, unless its node is lost: a task of a node
    that went down reads as running until the node comes back, and must not hold a stop or stand for the chat. Pure."""
    node = nodes.get(task.get("NodeID", ""))
    return task.get("Status", {}).get("State") in _TASK_LIVE and not (node and node.lost)


def of_spec(task: dict[str, Any] | None, fingerprint: str) -> bool:
    """Whether a task was made from the service spec with this fingerprint. Pure."""
    labels = (task or {}).get("Spec", {}).get("ContainerSpec", {}).get("Labels", {})
    return labels.get(SPEC_LABEL) == fingerprint


def service_state(service: dict[str, Any], tasks: list[dict[str, Any]],
                  nodes: dict[str, SwarmNode]) -> ContainerState:
    """A chat's service and its tasks as a container's state: running while its newest task runs on a node the
    manager hears from, with that task's container id and node (by hostname); a service scaled to zero is
    `exited`, and so is a task whose node is lost (whatever it last said). Pure."""
    spec = service.get("Spec", {})
    limits = spec.get("TaskTemplate", {}).get("Resources", {}).get("Limits", {})
    replicas = spec.get("Mode", {}).get("Replicated", {}).get("Replicas", 0)
    task = newest_task(tasks) or {}
    status = task.get("Status", {})
    node = nodes.get(task.get("NodeID", ""))
    lost = bool(task) and not task_live(task, nodes) and status.get("State") in _TASK_LIVE
    if not task or (replicas == 0 and not task_live(task, nodes)):
        current = "exited" if replicas == 0 else "created"
    else:
        current = "exited" if lost else _TASK_STATES.get(status.get("State", ""), "exited")
    container = status.get("ContainerStatus") or {}
    return ContainerState(
        name=spec.get("Name", ""),
        id=container.get("ContainerID") or task.get("ID", "") or service.get("ID", ""),
        status=current,
        exit_code=container.get("ExitCode") if current != "running" and container and not lost else None,
        chat_id=spec.get("Labels", {}).get(CHAT_LABEL, ""),
        nano_cpus=limits.get("NanoCPUs") or 0,
        memory=limits.get("MemoryBytes") or 0,
        pids_limit=limits.get("Pids") or 0,
        started_at=status.get("Timestamp", "") if current == "running" else "",
        node=node.hostname if node else task.get("NodeID", ""),
    )


class SwarmRuntime(Runtime):
    """Each chat a Swarm service on a manager's engine (one replica; idle stop scales it to zero), its folders on
    storage every node mounts at the same path. The instance's own services (the guard, the model gateway, the
    egress proxy) are global: one task on every node. This host's engine (`local`) keeps the networks and firewall
    of one host, unused by the chats. A start's and a stop's waits poll from the event loop, so a chat whose image
    is being pulled holds none of the pool's threads.

    What a chat's task cannot give from another node (no `docker exec` there, no stats): `run` refuses, `usage`
    knows nothing (a turn's pids-limit refusals come from the agent host, in the turn's folder). See
    docs/SCALING.md."""

    def __init__(self, manager: str, local: DockerRuntime, orchestrator_image: str, start_timeout: float,
                 stop_grace: float, timeout: float = 120, open_egress: bool = False) -> None:
        self.local = local
        self.open_egress = open_egress  # some chat's egress is open: the open chats' network is kept on every node
        self.orchestrator_image = orchestrator_image
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="swarm")
        self._digests: dict[str, tuple[str, float]] = {}
        self._started: dict[str, tuple[str, ContainerState]] = {}  # by service: `ensure`'s state, and of which spec
        self._nodes: tuple[dict[str, SwarmNode], float] = ({}, 0.0)
        self._task_containers: set[str] = set()  # ids of chats' task containers seen: not this host's to exec in
        self._ready: set[str] = set()  # node ids where the guard and the gateway ran at the watch's last look
        self._unready: dict[str, float] = {}  # by node id: since when its gateway has not run there (see within_grace)
        self._watching = False
        try:
            self._client = docker.DockerClient(base_url=manager, timeout=timeout) if manager \
                else docker.from_env(timeout=timeout)
        except DockerException as exc:
            raise RuntimeFailure(f"the Swarm manager's engine cannot be reached: {exc}") from exc
        self._api = self._client.api

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await _in_thread(self._executor, "the Swarm manager's engine", fn, *args)

    def close(self) -> None:
        self._watching = False
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._client.close()
        self.local.close()

    def ping(self) -> str | None:
        try:
            info = self._client.info()
        except (DockerException, requests.RequestException) as exc:
            return f"the Swarm manager's engine cannot be reached: {exc.__class__.__name__}"
        swarm = info.get("Swarm") or {}
        if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
            return "the engine of swarm.manager is not a manager of an active Swarm"
        return self.local.ping()

    # ---- reading the Swarm ----

    def _service(self, name: str) -> dict[str, Any] | None:
        try:
            service: dict[str, Any] = self._api.inspect_service(name)
        except NotFound:
            return None
        return service if service.get("Spec", {}).get("Name") == name else None  # not one whose id starts so

    def _tasks(self, service_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        """The tasks of these services, in one call, by service id."""
        by_service: dict[str, list[dict[str, Any]]] = {}
        if service_ids:
            for task in self._api.tasks(filters={"service": service_ids}):
                by_service.setdefault(task.get("ServiceID", ""), []).append(task)
        return by_service

    def _node_table(self, tasks: Sequence[dict[str, Any]] = ()) -> dict[str, SwarmNode]:
        """The nodes, read again when older than SWARM_NODES_SECONDS or when a task names one not in it."""
        table, read_at = self._nodes
        if time.monotonic() - read_at > SWARM_NODES_SECONDS or any(
                t.get("NodeID") and t["NodeID"] not in table for t in tasks):
            table = swarm_nodes(self._api.nodes())
            self._nodes = (table, time.monotonic())
        return table

    def _state(self, service: dict[str, Any], tasks: list[dict[str, Any]]) -> ContainerState:
        state = service_state(service, tasks, self._node_table(tasks))
        if state.id:
            self._task_containers.add(state.id)
        return state

    def _look(self, name: str) -> tuple[dict[str, Any], list[dict[str, Any]], ContainerState]:
        service = self._service(name)
        if service is None:
            raise RuntimeFailure(f"the service {name} was removed while it was started or stopped")
        tasks = self._tasks([service["ID"]]).get(service["ID"], [])
        return service, tasks, self._state(service, tasks)

    def _check_engines(self) -> None:
        """Refuses a manager's engine before API 1.41 (Docker 20.10), and a node that takes tasks with an engine
        before 20.10: they drop a service's capability drop, ulimits and pids limit without a word (moby's
        adjustForAPIVersion, and an old node's executor knows no such fields), and its chats would run with Docker's
        default capabilities and no process cap."""
        version = str(self._api.api_version)
        if tuple(int(part) for part in version.split(".")[:2]) < (1, 41):
            raise RuntimeFailure(f"the Swarm manager's engine speaks API {version}: before 1.41 (Docker 20.10) a "
                                 "service loses its capability drop, ulimits and pids limit; upgrade the engines")
        old = sorted(f"{node.hostname} ({node.engine or 'no version'})"
                     for node in self._node_table().values() if node.active and engine_too_old(node.engine))
        if old:
            raise RuntimeFailure(f"Swarm nodes with an engine before {'.'.join(map(str, MIN_NODE_ENGINE))} would run "
                                 f"chats without their capability drop, ulimits and pids limit: {', '.join(old)}; "
                                 "upgrade them or drain them (`docker node update --availability drain NODE`)")

    def _image(self, image: str) -> str:
        """`image@digest` as the registry has it now, so every node runs the same image and a push reaches the chats
        (looked up at most every IMAGE_CHECK_SECONDS, with the credentials of `docker login` on this host). When
        the registry cannot say, the digest last known (else the tag): taking the tag would change every chat's
        fingerprint and replace its task, and again when the registry is back."""
        cached = self._digests.get(image)
        if cached is None or time.monotonic() - cached[1] > IMAGE_CHECK_SECONDS:
            try:
                reference = pinned_image(image, self._api.inspect_distribution(image)["Descriptor"]["digest"], "")
            except (APIError, KeyError) as exc:
                reference = pinned_image(image, "", cached[0] if cached else "")
                logger.warning(f"the registry did not give the digest of {image} ({exc}): {reference} is used")
            cached = self._digests[image] = (reference, time.monotonic())
        return cached[0]

    # ---- writing services (docker-py sends the registry credentials of `docker login` on this host with them) ----

    def _create(self, service: dict[str, Any]) -> None:
        self._api.create_service(service["TaskTemplate"], name=service["Name"], labels=service["Labels"],
                                 mode=service["Mode"], update_config=service.get("UpdateConfig"))

    def _update(self, service_id: str, version: int, service: dict[str, Any]) -> None:
        self._api.update_service(service_id, version, task_template=service["TaskTemplate"], name=service["Name"],
                                 labels=service["Labels"], mode=service["Mode"],
                                 update_config=service.get("UpdateConfig"))

    def _set_replicas_to_zero(self, service: dict[str, Any]) -> None:
        spec = service["Spec"]
        if spec.get("Mode", {}).get("Replicated", {}).get("Replicas", 0) != 0:
            self._update(service["ID"], service["Version"]["Index"],
                         {**spec, "Labels": spec.get("Labels", {}), "Mode": {"Replicated": {"Replicas": 0}}})

    # ---- lifecycle ----

    async def ensure(self, spec: ContainerSpec) -> ContainerState:
        """A chat's service made, brought up to date or scaled up, and waited for until its task runs (on the first
        start on a node that includes pulling the image); the model gateway a global service (one on every node,
        not waited for: chats are placed only where it runs), and so is the egress proxy."""
        if spec.labels.get(ROLE_LABEL) in NODE_ROLES:
            return await self._call(self._ensure_node_service, spec)
        if CHAT_LABEL not in spec.labels:
            return await self.local.ensure(spec)
        fingerprint, running = await self._call(self._apply, spec)
        if running is None:
            running = await self._until_running(spec.name, fingerprint)
            self._started[spec.name] = (fingerprint, running)
        return running

    def _apply(self, spec: ContainerSpec) -> tuple[str, ContainerState | None]:
        """The chat's service made, or updated to this spec and one replica; its fingerprint, and its state when its
        task already runs with this spec (then nothing was changed)."""
        instance = spec.labels.get(INSTANCE_LABEL, "")
        network = swarm_network_of(spec.network, instance, self.open_egress)
        goes_out = network == swarm_open_network_name(instance)
        image = self._image(spec.image)
        fingerprint = f"{spec.fingerprint()}:{image}:{self.stop_grace:g}"
        self._check_engines()
        running = self._still_running(spec.name, fingerprint)
        if running is not None:
            return fingerprint, running
        required = required_labels(instance, goes_out)
        service = self._service(spec.name)
        if service is None:
            try:
                self._create(service_spec(spec, image, fingerprint, network, 1, stop_grace=self.stop_grace,
                                          required=required, goes_out=goes_out))
            except APIError as exc:
                if exc.status_code != 409:
                    raise
            return fingerprint, None
        current = service["Spec"]
        replicas = current.get("Mode", {}).get("Replicated", {}).get("Replicas", 0)
        force = current.get("TaskTemplate", {}).get("ForceUpdate", 0)
        task = newest_task(self._tasks([service["ID"]]).get(service["ID"], []))
        if replicas == 1 and (task is None or not task_live(task, self._node_table([task]))):
            force += 1  # its task ended and Swarm will not start another (it exited 0): a new one, by force
        if current.get("Labels", {}).get(SPEC_LABEL) != fingerprint or replicas != 1 \
                or force != current.get("TaskTemplate", {}).get("ForceUpdate", 0):
            self._update(service["ID"], service["Version"]["Index"],
                         service_spec(spec, image, fingerprint, network, 1, force, self.stop_grace, required, goes_out))
        return fingerprint, None

    def _still_running(self, name: str, fingerprint: str) -> ContainerState | None:
        """The state `ensure` last returned for this service while the same task still runs it with this spec, in
        one call to the manager, where the whole check takes four: a warm turn's start waited about 15 ms for them
        on the benchmark's busy manager (bench.swarm). Else None, and the whole check follows."""
        known = self._started.pop(name, None)
        if known is None or known[0] != fingerprint:
            return None
        try:  # the manager resolves a service's name in this filter
            tasks = self._api.tasks(filters={"service": name, "desired-state": "running"})
        except APIError:  # gone (404), or anything else: the whole check says what
            return None
        task = newest_task(tasks)
        status = (task or {}).get("Status", {})
        if task is None or status.get("State") != "running" or not of_spec(task, fingerprint) \
                or (status.get("ContainerStatus") or {}).get("ContainerID") != known[1].id \
                or not task_live(task, self._node_table([task])):
            return None
        self._started[name] = known
        return known[1]

    async def _until_running(self, name: str, fingerprint: str) -> ContainerState:
        """Until the task of this spec runs: just after an update, Swarm may not have replaced the last spec's task
        yet, and a turn handed to that one would be taken by the next (and told it was not run while it runs)."""
        deadline = time.monotonic() + self.start_timeout
        while True:
            service, tasks, state = await self._call(self._look, name)
            if state.running and of_spec(newest_task(tasks), fingerprint):
                return state
            if time.monotonic() > deadline:
                # Left at one replica, Swarm would go on pulling or placing it every few seconds, and idle stop,
                # which looks at running chats only, would never take it down.
                await self._call(self._set_replicas_to_zero, service)
                status = (newest_task(tasks) or {}).get("Status", {})
                instance = service["Spec"].get("Labels", {}).get(INSTANCE_LABEL, "")
                raise RuntimeFailure(f"the service {name} has no running task after {self.start_timeout:g} s "
                                     f"(swarm.start_timeout), and is scaled to zero: {status.get('State', 'no task')}"
                                     f": {status.get('Err') or status.get('Message')} (chats run only on nodes where "
                                     f"the instance's guard and gateway run: `docker service ps "
                                     f"{guard_name(instance)} {gateway_container_name(instance)}`)")
            await asyncio.sleep(SWARM_POLL_SECONDS)

    async def inspect(self, name: str) -> ContainerState:
        state = await self._call(self._inspect, name)
        return state if state is not None else await self.local.inspect(name)

    def _inspect(self, name: str) -> ContainerState | None:
        service = self._service(name)
        if service is None:
            return None
        if "Global" in service["Spec"].get("Mode", {}):
            return self._global_state(service)
        return self._state(service, self._tasks([service["ID"]]).get(service["ID"], []))

    async def stop(self, name: str, grace_seconds: float) -> None:
        """A chat's service scaled to zero (its definition stays: the next `ensure` scales it up), waited for until
        its task has stopped (its StopGracePeriod is `containers.stop_timeout`) or its node is lost; a global
        service (the model gateway) removed (the next start makes it again); a container of this host's stopped as
        on Docker."""
        service = await self._call(self._service, name)
        if service is None:
            return await self.local.stop(name, grace_seconds)
        if "Global" in service["Spec"].get("Mode", {}):
            return await self._call(self._api.remove_service, service["ID"])
        await self._call(self._set_replicas_to_zero, service)
        deadline = time.monotonic() + max(grace_seconds, self.stop_grace) + SWARM_STOP_SECONDS
        while await self._call(self._any_task_live, service["ID"]):
            if time.monotonic() > deadline:
                raise RuntimeFailure(f"the task of the service {name} did not stop within {grace_seconds:g} s + "
                                     f"{SWARM_STOP_SECONDS:g} s after it was scaled to zero")
            await asyncio.sleep(SWARM_POLL_SECONDS)

    def _any_task_live(self, service_id: str) -> bool:
        tasks = self._tasks([service_id]).get(service_id, [])
        nodes = self._node_table(tasks)
        return any(task_live(task, nodes) for task in tasks)

    async def list_managed(self, instance: str) -> list[ContainerState]:
        return await self._call(self._list_managed, instance)

    async def stop_leftovers(self, instance: str, grace_seconds: float) -> list[str]:
        """This host's running chat containers of the instance, left from `runtime: docker`, stopped (kept for an
        operator to look at): their agent hosts would take the chats' turns from the shared folders beside the Swarm's
        tasks, with the old caps and network. Their names."""
        left = [container for container in await self.local.list_managed(instance) if container.running]
        for container in left:
            await self.local.stop(container.name, grace_seconds)
        return [container.name for container in left]

    def _list_managed(self, instance: str) -> list[ContainerState]:
        labels = [f"{MANAGED_LABEL}=true", f"{INSTANCE_LABEL}={instance}", CHAT_LABEL]
        services = self._api.services(filters={"label": labels})
        tasks = self._tasks([s["ID"] for s in services])
        return [self._state(s, tasks.get(s["ID"], [])) for s in services]

    # ---- events: the chats' tasks, looked at every SWARM_WATCH_SECONDS ----

    def watch(self, instance: str, on_event: Callable[[str, str], None]) -> None:
        """`on_event(chat_id, "start" | "die")` when a chat's task starts running, or stops (its node drained or lost,
        its container died, scaled to zero); a task that moved is a die, then a start."""
        self._watching = True
        threading.Thread(target=self._watch, args=(instance, on_event), name="swarm-watch", daemon=True).start()

    def _watch(self, instance: str, on_event: Callable[[str, str], None]) -> None:
        streak = LIVENESS.streak("swarm_watch")
        seen: dict[str, str] | None = None  # chat id → id of its running task's container
        labels = LIVENESS.streak("swarm_node_labels")
        while self._watching:
            try:  # apart: the chats' events go on whatever the labels meet
                self._label_ready_nodes(instance)
                labels.ok()
            except Exception as exc:
                labels.failed(exc)
            try:
                now = {s.chat_id: s.id for s in self._list_managed(instance) if s.running and s.chat_id}
                streak.ok()
            except Exception as exc:  # the manager restarted, lost its quorum, or anything else: look again
                time.sleep(streak.failed(exc))
                continue
            for chat_id, event in watch_events(seen, now):
                on_event(chat_id, event)
            seen = now
            time.sleep(SWARM_WATCH_SECONDS)

    def _label_ready_nodes(self, instance: str) -> None:
        """The ready label set on the nodes where the guard (healthy, keeping the chats' bridge), the model gateway
        and (when some chat's egress is an allowlist) the egress proxy run, and taken from the others once
        READY_GRACE_SECONDS passed; the open label where the node is ready and its guard keeps the open chats'
        bridge too. Swarm then places chats only where the node's rules are kept and the chat's sockets are served,
        and stops a chat's task on a node that lost one (a node's labels are its constraints' input)."""
        guard = self._service(guard_name(instance))
        guard_tasks = self._api.tasks(filters={"service": guard["ID"]}) if guard is not None else []
        bridges = guard_bridges(guard)
        guarded = guarding(guard_tasks, bridges[0]) if bridges else set()
        served = self._running_of(self._service(gateway_container_name(instance)))
        proxy = self._service(egress.proxy_name(instance))
        if proxy is not None:  # some chat's egress is an allowlist: served where the proxy runs
            served &= self._running_of(proxy)
        nodes = self._api.nodes()
        self._nodes = (swarm_nodes(nodes), time.monotonic())  # the chats' states just after read it, not again
        ready = guarded & served
        self._unready, kept = within_grace(self._unready, ready, self._ready, guarded, time.monotonic(),
                                           READY_GRACE_SECONDS)
        self._ready = ready
        opened = ready & guarding(guard_tasks, bridges[1]) if len(bridges) > 1 else set()
        wanted = {ready_label(instance): ready, open_label(instance): opened}
        for node_id, version, spec in node_label_updates(nodes, wanted, kept):
            self._api.update_node(node_id, version, spec)
            logger.info(f"node {node_id}: " + ", ".join(f"{label} {'set' if label in spec['Labels'] else 'removed'}"
                                                        for label in wanted))

    # ---- the instance's networks: the chats' on the Swarm (closed on every node by the guard), this host's ----

    async def ensure_networks(self, instance: str) -> InstanceNetworks:
        """This host's networks (the egress proxy's), the chats' network on the Swarm, and the guard on its nodes."""
        await self._call(self._ensure_swarm_networks, instance)
        await self._call(self._ensure_guard, instance)
        return await self.local.ensure_networks(instance)

    def _running_of(self, service: dict[str, Any] | None) -> set[str]:
        """The nodes where the global service's current spec runs; none when the service is gone (None: removed by
        hand, or by a planned stop), so that no node keeps the label."""
        if service is None:
            return set()
        tasks = self._api.tasks(filters={"service": service["ID"]})
        return running_on(tasks, service["Spec"].get("Labels", {}).get(SPEC_LABEL, ""))

    def _ensure_guard(self, instance: str) -> None:
        """The guard of the chats' bridge and, while the open chats' network exists (made while some chat's egress is
        open, and kept: an open chat's task may run on until its next message or idle stop), of that one too."""
        bridge = self._bridge_of(swarm_network_name(instance))
        if bridge is None:
            raise RuntimeFailure(f"the manager has no swarm network named {swarm_network_name(instance)}")
        image = self._image(self.orchestrator_image)
        self._ensure_global(guard_service_spec(instance, image, bridge,
                                               self._bridge_of(swarm_open_network_name(instance))))

    def _bridge_of(self, name: str) -> str | None:
        """The interface of the swarm-scoped bridge network `name` on every node; None when there is none."""
        networks = [n for n in self._api.networks(names=[name]) if n.get("Name") == name and n.get("Scope") == "swarm"]
        if len(networks) > 1:
            raise RuntimeFailure(f"the manager has {len(networks)} swarm networks named {name}")
        return chats_bridge(networks[0]["Id"]) if networks else None

    def _ensure_node_service(self, spec: ContainerSpec) -> ContainerState:
        return self._global_state(self._ensure_global(node_service_spec(spec, self._image(spec.image))))

    def _global_state(self, service: dict[str, Any]) -> ContainerState:
        """A global service (the gateway, the egress proxy) as a container: running while its spec runs on a node, on
        the nodes named."""
        running = self._running_of(service)
        nodes = self._node_table()
        return ContainerState(name=service["Spec"]["Name"], id=service["ID"],
                              status="running" if running else "created",
                              node=", ".join(sorted(nodes[n].hostname if n in nodes else n for n in running)))

    def _ensure_global(self, spec: dict[str, Any]) -> dict[str, Any]:
        """A global service made, or updated when its spec changed (its fingerprint is a label); the service."""
        fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        spec["Labels"] = {**spec["Labels"], SPEC_LABEL: fingerprint}
        container = spec["TaskTemplate"]["ContainerSpec"]
        container["Labels"] = {**container["Labels"], SPEC_LABEL: fingerprint}  # on its tasks: see running_on
        service = self._service(spec["Name"])
        if service is None:
            self._create(spec)
        elif service["Spec"].get("Labels", {}).get(SPEC_LABEL) != fingerprint:
            self._update(service["ID"], service["Version"]["Index"], spec)
        service = self._service(spec["Name"])
        if service is None:
            raise RuntimeFailure(f"the service {spec['Name']} was made and is gone")
        return service

    def _ensure_swarm_networks(self, instance: str) -> None:
        self._ensure_swarm_network(swarm_network_name(instance), swarm_node_network_name(instance), internal=True)
        if self.open_egress:
            self._ensure_swarm_network(swarm_open_network_name(instance), swarm_open_node_network_name(instance),
                                       internal=False)

    def _ensure_swarm_network(self, name: str, node_config: str, internal: bool) -> None:
        """A swarm-scoped bridge on every node, its options from the config-only network `node_config` that the
        operator makes on each node; internal (no route out) or not (the node's NAT, closed by the guard)."""
        found = [n for n in self._api.networks(names=[name, node_config]) if n.get("Name") in (name, node_config)]
        by_name = {n["Name"]: n for n in found}
        problem = config_network_problem(by_name.get(node_config), node_config)
        if problem is not None:
            raise RuntimeFailure(problem)
        network = by_name.get(name)
        if network is not None and (network.get("Scope") != "swarm" or bool(network.get("Internal")) != internal
                                    or (network.get("ConfigFrom") or {}).get("Network") != node_config):
            raise RuntimeFailure(f"the network {name} exists but was not made by the orchestrator (it must be "
                                 f"swarm-scoped, {'internal' if internal else 'not internal'}, with its options from "
                                 f"{node_config}); remove it with `docker network rm` on the manager and start again")
        if network is None:
            try:  # a network made from a config network may carry no labels of its own
                self._create_chats_network(name, node_config, internal)
            except APIError as exc:
                if exc.status_code != 409:
                    raise

    def _create_chats_network(self, name: str, node_config: str, internal: bool) -> None:
        """docker-py's create_network has no ConfigFrom: the API's own call, through the client's HTTP session."""
        api = self._api
        response = api.post(f"{api.base_url}/v{api.api_version}/networks/create", timeout=api.timeout, json={
            "Name": name, "Driver": "bridge", "Scope": "swarm", "Internal": internal,
            "ConfigFrom": {"Network": node_config}, "CheckDuplicate": True})
        try:
            response.raise_for_status()
        except requests.HTTPError as exc:
            create_api_error_from_http_exception(exc)  # raises docker's APIError, as the client's own calls do

    async def address(self, name: str, network: str) -> str | None:
        return await self.local.address(name, network)

    async def usage(self, name: str) -> Usage | None:
        """None for a chat (its task's stats are on its node's engine); a container of this host's as on Docker."""
        if await self._call(self._service, name) is not None:
            return None
        return await self.local.usage(name)

    async def run(self, container_id: str, argv: list[str], user: str) -> tuple[int, str]:
        if container_id in self._task_containers:
            raise RuntimeFailure("a chat's task runs on a Swarm node: no command is run in it from here")
        return await self.local.run(container_id, argv, user)


def watch_events(seen: dict[str, str] | None, now: dict[str, str]) -> list[tuple[str, str]]:
    """What changed between two looks at the chats' running tasks (chat id → task container id): a chat no longer
    running died, a new one started, one whose task changed died and started. The first look reports nothing. Pure."""
    if seen is None:
        return []
    events = []
    for chat_id, task in seen.items():
        if now.get(chat_id) != task:
            events.append((chat_id, "die"))
    for chat_id, task in now.items():
        if seen.get(chat_id) != task:
            events.append((chat_id, "start"))
    return events


def make_runtime(settings: Settings) -> DockerRuntime | SwarmRuntime:
    """The runtime the config names: Docker on this host, or Swarm through a manager (plus this host's engine)."""
    local = DockerRuntime()
    if settings.runtime != "swarm":
        return local
    try:
        return SwarmRuntime(settings.swarm.manager, local, orchestrator_image=settings.swarm.orchestrator_image,
                            start_timeout=settings.swarm.start_timeout, stop_grace=settings.containers.stop_timeout,
                            open_egress=egress.any_goes_out(settings))
    except RuntimeFailure:
        local.close()
        raise
