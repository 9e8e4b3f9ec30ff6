"""A container engine in memory, implementing `orchestrator.runtime.Runtime` for unit tests of the middle (the turn
runner, the service): containers are records made from their specs; what the engine would report is set by the
test (the pids limit's refusal counts, a container that stops, the answer of a command run in a container), and
every call that changes something is recorded.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from orchestrator.layout import RUN_PATH
from orchestrator.model_socket import SOCKET
from orchestrator.runtime import (
    CHAT_LABEL,
    INSTANCE_LABEL,
    AgentNetwork,
    ContainerSpec,
    ContainerState,
    InstanceNetworks,
    RuntimeFailure,
    Usage,
    bridge_name,
    egress_bridge_name,
    egress_network_name,
    network_name,
)

RunHandler = Callable[[str, list[str], str], tuple[int, str]]  # (container id, argv, user) → (code, output)


@dataclass
class Ran:
    """One command run in a container (`Runtime.run`)."""

    container_id: str
    argv: list[str]
    user: str


@dataclass
class FakeRuntime:
    on_run: RunHandler | None = None  # answers `run`; None: (0, "")
    run_seconds: float = 0.0  # how long a `run` takes before it lands (docker exec: 50 to 300 ms on a busy host)
    ensure_failure: str | None = None  # ensure raises RuntimeFailure with it
    list_failures: list[str] = field(default_factory=list)  # list_managed raises RuntimeFailure with each, in turn
    containers: dict[str, ContainerState] = field(default_factory=dict)  # by name
    specs: dict[str, ContainerSpec] = field(default_factory=dict)  # by name: the spec each was last ensured with
    started: list[str] = field(default_factory=list)  # names, each time ensure started one
    stopped: list[str] = field(default_factory=list)  # names, each time stop was asked
    ran: list[Ran] = field(default_factory=list)
    inspected: list[str] = field(default_factory=list)
    watchers: list[Callable[[str, str], None]] = field(default_factory=list)

    # ---- what a test does ----

    def emit(self, chat_id: str, action: str) -> None:
        """An engine event (start, die, oom) to every watcher (the real engine calls them from its watch thread)."""
        for on_event in list(self.watchers):
            on_event(chat_id, action)

    def crash(self, name: str, exit_code: int = 137, oom: bool = False) -> None:
        """The container stops by itself (killed, out of memory), and the engine says so."""
        state = self.containers[name]
        self.containers[name] = replace(state, status="exited", exit_code=exit_code, oom_killed=oom)
        if oom:
            self.emit(state.chat_id, "oom")
        self.emit(state.chat_id, "die")

    # ---- Runtime ----

    def ping(self) -> str | None:
        return None

    def watch(self, instance: str, on_event: Callable[[str, str], None]) -> None:
        self.watchers.append(on_event)

    async def ensure(self, spec: ContainerSpec) -> ContainerState:
        await asyncio.sleep(0)
        if self.ensure_failure is not None:
            raise RuntimeFailure(self.ensure_failure)
        state = self.containers.get(spec.name)
        self.specs[spec.name] = spec
        if state is None:
            state = ContainerState(spec.name, secrets.token_hex(32), "created", chat_id=spec.labels.get(CHAT_LABEL, ""),
                                   nano_cpus=spec.nano_cpus, memory=spec.mem_limit, pids_limit=spec.pids_limit)
        if not state.running:
            state = replace(state, status="running", exit_code=None, oom_killed=False,
                            started_at=f"start-{len(self.started)}")  # a new start, a new cgroup
            self.started.append(spec.name)
            self.emit(state.chat_id, "start")
        self.containers[spec.name] = state
        self._serve_model_socket(spec)
        return state

    @staticmethod
    def _serve_model_socket(spec: ContainerSpec) -> None:
        """The instance's gateway container serves each chat's model socket; in this engine nothing runs, so the
        socket's place is marked served when the chat's container is made."""
        for source, target, _ in spec.mounts:
            if target == RUN_PATH:
                Path(source).mkdir(parents=True, exist_ok=True)
                (Path(source) / SOCKET).touch()

    async def ensure_networks(self, instance: str) -> InstanceNetworks:
        return InstanceNetworks(
            agents=AgentNetwork(network_name(instance), bridge_name(instance), ("10.254.0.0/24",)),
            egress=AgentNetwork(egress_network_name(instance), egress_bridge_name(instance), ("10.253.0.0/24",)))

    async def address(self, name: str, network: str) -> str | None:
        return "10.254.0.2" if name in self.containers and self.containers[name].running else None

    async def inspect(self, name: str) -> ContainerState:
        await asyncio.sleep(0)
        self.inspected.append(name)
        return self.containers.get(name) or ContainerState(name, "", "missing")

    async def stop(self, name: str, grace_seconds: float) -> None:
        await asyncio.sleep(0)
        self.stopped.append(name)
        state = self.containers.get(name)
        if state is not None and state.running:
            self.containers[name] = replace(state, status="exited", exit_code=0)
            self.emit(state.chat_id, "die")

    async def list_managed(self, instance: str) -> list[ContainerState]:
        if self.list_failures:
            raise RuntimeFailure(self.list_failures.pop(0))
        return [state for name, state in self.containers.items()
                if self.specs[name].labels.get(INSTANCE_LABEL) == instance and state.chat_id]

    async def stop_leftovers(self, instance: str, grace_seconds: float) -> list[str]:
        return []  # one runtime only

    async def usage(self, name: str) -> Usage | None:
        state = self.containers.get(name)
        if state is None or not state.running:
            return None
        return Usage(cpu_percent=1.0, memory_bytes=64 * 1024**2, memory_limit=state.memory, pids=3)

    async def run(self, container_id: str, argv: list[str], user: str) -> tuple[int, str]:
        await asyncio.sleep(self.run_seconds)
        self.ran.append(Ran(container_id, list(argv), user))
        if not any(state.id == container_id and state.running for state in self.containers.values()):
            raise RuntimeFailure(f"container {container_id[:12]} is not running")
        return self.on_run(container_id, argv, user) if self.on_run else (0, "")
