"""The Swarm runtime on a PostgreSQL store against the Docker runtime on SQLite (issue 14), in the same run,
alternately: the real CLI against the fake model through the fake Feishu, from the event to the reply. Cold: a new
chat's first message (its service made and its task started on a node, against its container made and started on
this host). Warm: the next messages of the same chats (a running task or container, the hot CLI in it). Both on
`egress: none` (the only egress Swarm serves), the Swarm one on three Docker-in-Docker nodes (tests/swarm.py) with
the chats' folders on their shared storage and its store in a new database on the tests' PostgreSQL server
(tests/postgres.py), migrated first, as a deployment of several hosts would run.

    python -m bench.swarm [--quick]        (SWARM_TEST_REUSE=FILE: a Swarm left up by the tests, as they take it)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker

from bench.common import Rig, main, median_p95, ms, new_chat, new_message, rig
from bench.postgres import migrate, new_database, postgres_server
from tests.harness import AGENT_IMAGE, MODEL_KEY, ORCHESTRATOR_IMAGE
from tests.postgres import PostgresServer
from tests.swarm import Swarm

TARGET = 1.2  # warm time per message on Swarm + PostgreSQL, at most this many times Docker + SQLite's
CAPS = {"cpus": 1, "memory": "512m", "pids_limit": 200, "egress": "none"}


def run(quick: bool) -> list[str]:
    chats, per_chat, rounds = (2, 3, 1) if quick else (4, 8, 2)
    client = docker.from_env(timeout=300)
    try:
        with swarm_up(client) as swarm, postgres_server() as server:
            cold: dict[str, list[float]] = {"docker": [], "swarm": []}
            warm: dict[str, list[float]] = {"docker": [], "swarm": []}
            to_model: dict[str, list[float]] = {"docker": [], "swarm": []}
            for _ in range(rounds):
                for runtime in ("docker", "swarm"):
                    with rig() as setup:
                        first, later, asked = _measure(setup, (swarm, server) if runtime == "swarm" else None, chats,
                                                       per_chat)
                    cold[runtime] += first
                    warm[runtime] += later
                    to_model[runtime] += asked
    finally:
        client.close()
    lines = []
    for name, samples, target in (("cold", cold, None), ("warm", warm, TARGET)):
        docker_median, docker_p95 = median_p95(samples["docker"])
        swarm_median, swarm_p95 = median_p95(samples["swarm"])
        ratio = swarm_median / docker_median
        verdict = f"target <= {target}x: {'meets' if ratio <= target else 'misses'}" if target else "no target"
        lines += [f"swarm/{name}: samples={len(samples['swarm'])} swarm+postgres median={ms(swarm_median)} "
                  f"p95={ms(swarm_p95)}; docker+sqlite median={ms(docker_median)} p95={ms(docker_p95)} "
                  "(absolute, this machine)",
                  f"swarm/{name}: ratio={ratio:.2f}x median, {swarm_p95 / docker_p95:.2f}x p95; {verdict}"]
    lines.append(f"swarm/warm: mean swarm+postgres {ms(statistics.mean(warm['swarm']))}, docker+sqlite "
                 f"{ms(statistics.mean(warm['docker']))}")
    split = {runtime: (statistics.median(to_model[runtime]),
                       statistics.median(w - a for w, a in zip(warm[runtime], to_model[runtime], strict=True)))
             for runtime in warm}
    lines.append("swarm/warm split, median: event to the model's request "
                 f"swarm+postgres {ms(split['swarm'][0])}, docker+sqlite {ms(split['docker'][0])}; "
                 f"the model's request to the reply swarm+postgres {ms(split['swarm'][1])}, "
                 f"docker+sqlite {ms(split['docker'][1])}")
    return lines


@contextlib.contextmanager
def swarm_up(client: docker.DockerClient) -> Iterator[Swarm]:
    """The tests' Swarm of three nodes with the agent image pulled on each: the one SWARM_TEST_REUSE names, else a new
    one (left up and saved there when SWARM_TEST_REUSE names a file that does not exist yet; else removed after)."""
    reuse = os.environ.get("SWARM_TEST_REUSE")
    saved = Path(reuse) if reuse else None
    swarm = Swarm.attach(client, saved) if saved and saved.exists() else Swarm(client)
    try:
        if not (saved and saved.exists()):
            swarm.start()
        if not swarm.orchestrator_image:
            swarm.push_images(AGENT_IMAGE, ORCHESTRATOR_IMAGE)
        if saved:
            swarm.save(saved)
        yield swarm
    finally:
        if not (saved and saved.exists()):  # kept only once saved whole
            swarm.remove()


@contextlib.contextmanager
def on_swarm(setup: Rig, swarm: Swarm, server: PostgresServer) -> Iterator[dict[str, Any]]:
    """The config sections that put `setup`'s instance on `swarm` with its store on `server` (a new database; call
    `migrate` once configured), the instance prepared as an operator would; after: its orchestrators killed, its
    services, networks and shared folder removed."""
    swarm.prepare_instance(setup.instance)
    shared = swarm.shared / setup.instance
    # The nodes' gateways reach the fake model API and the store through relays on their network (tests/swarm.py)
    setup.api.serve_unix(swarm.folder / f"{setup.instance}-model.sock")
    model = swarm.relay(f"{setup.instance}-model", swarm.folder / f"{setup.instance}-model.sock")
    store = swarm.relay(f"{setup.instance}-store", server.socket)
    try:
        yield {"data_dir": str(shared / "data"), "runtime": "swarm",
               "swarm": {"manager": swarm.manager_url, "orchestrator_image": swarm.orchestrator_image},
               "gateway": {"upstream_url": f"http://{model}", "api_key": MODEL_KEY},
               "store": new_database(server, store)}
    finally:
        for bot in setup.bots:
            if bot.process.poll() is None:
                bot.kill()
        swarm.remove_instance(setup.instance)
        for relay in ("model", "store"):
            swarm.remove_relay(f"{setup.instance}-{relay}")
        shutil.rmtree(shared, ignore_errors=True)


def _measure(setup: Rig, on: tuple[Swarm, PostgresServer] | None, chats: int, per_chat: int
             ) -> tuple[list[float], list[float], list[float]]:
    """Each chat's first message (cold), then its later ones (warm), one at a time: seconds from event to reply;
    and of each warm one, seconds from the event to the model API's first request of its turn."""
    with contextlib.ExitStack() as stack:
        sections: dict = {"defaults": CAPS}
        if on is not None:
            sections.update(stack.enter_context(on_swarm(setup, *on)))
        setup.configure(on[0].agent_image if on else AGENT_IMAGE, **sections)
        if on is not None:
            migrate(setup.config)
        setup.start()
        if on is not None:  # a deployment's guard and gateway run on its nodes long before a chat's first message
            on[0].wait_ready(setup.instance)
        cold, warm, to_model = [], [], []
        for n in range(chats):
            chat_id = new_chat()
            for m in range(per_chat):
                message_id, text = new_message(), f"message {n}.{m}."
                pushed = time.monotonic()
                setup.feishu.push_event(setup.feishu.text_event(chat_id, text, message_id=message_id))
                (warm if m else cold).append(setup.reply_time(message_id, timeout=300) - pushed)
                asked = setup.api.first_asked(text)
                if asked is None:
                    raise RuntimeError(f"the model API was never asked about {text!r}: the chat shows "
                                       f"{[m.text for m in setup.feishu.messages(chat_id)]}")
                if m:
                    to_model.append(asked - pushed)
        for bot in setup.bots:
            bot.stop()
        return cold, warm, to_model


if __name__ == "__main__":
    main(run, __doc__ or "")
