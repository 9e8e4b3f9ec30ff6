"""Decisions about containers, made from what the store believes and what the engine shows. Pure.

Reconciling goes both ways, as in DockerSpawner and E2B: a chat's container that runs is adopted, one that
vanished is noticed (the next message re-creates it), and a labelled container the store does not know is
adopted too, never killed. Idle culling stops containers of chats without turns, least recently used first.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from orchestrator.runtime import ContainerState
from orchestrator.store import ChatRecord


class Finding(StrEnum):
    RUNNING = "running"  # adopt it as it is
    STOPPED = "stopped"  # there, not running: started again by the chat's next message
    VANISHED = "vanished"  # gone: re-created by the chat's next message
    UNKNOWN = "unknown"  # labelled as ours but not in the store: adopt it


@dataclass(frozen=True)
class Reconciled:
    chat_id: str
    finding: Finding
    container: ContainerState | None


def reconcile(chats: list[ChatRecord], containers: list[ContainerState]) -> list[Reconciled]:
    by_name = {c.name: c for c in containers}
    known = {chat.chat_id for chat in chats}
    results = []
    for chat in chats:
        if not chat.container_name:
            continue  # never had a container
        container = by_name.get(chat.container_name)
        if container is None:
            results.append(Reconciled(chat.chat_id, Finding.VANISHED, None))
        else:
            results.append(Reconciled(chat.chat_id, Finding.RUNNING if container.running else Finding.STOPPED,
                                      container))
    results += [Reconciled(c.chat_id, Finding.UNKNOWN, c) for c in containers if c.chat_id and c.chat_id not in known]
    return results


@dataclass(frozen=True)
class Candidate:
    chat_id: str
    container_name: str
    last_activity: float


def containers_to_stop(running: list[Candidate], busy: set[str], now: float, idle_stop: float,
                       max_running: int) -> list[Candidate]:
    """Idle past `idle_stop`, then the least recently used idle ones until at most `max_running` run."""
    idle = sorted((c for c in running if c.chat_id not in busy), key=lambda c: c.last_activity)
    stop = [c for c in idle if now - c.last_activity >= idle_stop]
    if max_running:
        excess = len(running) - len(stop) - max_running
        stop += [c for c in idle if c not in stop][:max(0, excess)]
    return stop
