"""The Swarm runtime on a PostgreSQL store against the Docker runtime on SQLite (issue 14), in the same run,
alternately: the real CLI against the fake model through the fake Feishu, from the event to the reply. Cold: a new
chat's first message (its service made and its task started on a node, against its container made and started on
this host). Warm: the next messages of the same chats (a running task or container, the hot CLI in it). Both on
`egress: none` (the only egress Swarm serves), the Swarm one on three Docker-in-Docker nodes (tests/swarm.py) with
the chats' folders on their shared storage and its store in a new database on the tests' PostgreSQL server
(tests/postgres.py), migrated first, as a deployment of several hosts would run. Between them, the Docker runtime
on the same PostgreSQL server: what the store costs a message apart from what the Swarm does.

    python -m bench.swarm [--quick]        (SWARM_TEST_REUSE=FILE: a Swarm left up by the tests, as they take it)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import statistics
import time
from collections.abc import Iterator
from datetime import datetime
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


# The deployments measured, each in its rounds: the baseline, the one the target is about, and between them the one
# host on the same PostgreSQL store, which tells what the store costs a message from what the Swarm does.
DEPLOYMENTS = ("docker+sqlite", "docker+postgres", "swarm+postgres")
# The orchestrator's lines for a message received and for its turn requested (its log's time, to the millisecond):
# they split a warm message's time before the model's request into the channel's, the orchestrator's and the rest
# (the agent host, the CLI and the model gateway).
LOGGED = re.compile(r"(\S+ \S+) +\w+ +(received|turn \S+ requested) .*message_id=(\S+)")
PHASES = ("the event to the orchestrator's line 'received'", "from there to the turn requested",
          "from there to the model's request")


def run(quick: bool) -> list[str]:
    chats, per_chat, rounds = (2, 3, 1) if quick else (4, 8, 2)
    client = docker.from_env(timeout=300)
    cold: dict[str, list[float]] = {name: [] for name in DEPLOYMENTS}
    warm: dict[str, list[float]] = {name: [] for name in DEPLOYMENTS}
    to_model: dict[str, list[float]] = {name: [] for name in DEPLOYMENTS}
    phases: dict[str, list[tuple[float, ...]]] = {name: [] for name in DEPLOYMENTS}
    try:
        with swarm_up(client) as swarm, postgres_server() as server:
            for _ in range(rounds):
                for deployment in DEPLOYMENTS:
                    with rig() as setup:
                        first, later, asked, split = _measure(setup, deployment, swarm, server, chats, per_chat)
                    cold[deployment] += first
                    warm[deployment] += later
                    to_model[deployment] += asked
                    phases[deployment] += split
    finally:
        client.close()
    lines = []
    for name, samples, target in (("cold", cold, None), ("warm", warm, TARGET)):
        docker_median, docker_p95 = median_p95(samples["docker+sqlite"])
        swarm_median, swarm_p95 = median_p95(samples["swarm+postgres"])
        ratio = swarm_median / docker_median
        verdict = f"target <= {target}x: {'meets' if ratio <= target else 'misses'}" if target else "no target"
        lines += [f"swarm/{name}: samples={len(samples['swarm+postgres'])} swarm+postgres median={ms(swarm_median)} "
                  f"p95={ms(swarm_p95)}; docker+sqlite median={ms(docker_median)} p95={ms(docker_p95)} "
                  "(absolute, this machine)",
                  f"swarm/{name}: ratio={ratio:.2f}x median, {swarm_p95 / docker_p95:.2f}x p95; {verdict}"]
    lines.append(f"swarm/warm: mean swarm+postgres {ms(statistics.mean(warm['swarm+postgres']))}, docker+sqlite "
                 f"{ms(statistics.mean(warm['docker+sqlite']))}")
    medians = {name: statistics.median(warm[name]) for name in DEPLOYMENTS}
    lines.append(f"swarm/warm, the store apart: docker+postgres median={ms(medians['docker+postgres'])} "
                 f"({medians['docker+postgres'] / medians['docker+sqlite']:.2f}x docker+sqlite); swarm+postgres "
                 f"{medians['swarm+postgres'] / medians['docker+postgres']:.2f}x docker+postgres")
    for name in DEPLOYMENTS:
        after = [w - a for w, a in zip(warm[name], to_model[name], strict=True)]
        lines.append(f"swarm/warm split, median, {name}: event to the model's request "
                     f"{ms(statistics.median(to_model[name]))}, the model's request to the reply "
                     f"{ms(statistics.median(after))}")
    for name in DEPLOYMENTS:
        medians = [ms(statistics.median(column)) for column in zip(*phases[name], strict=True)]
        lines.append(f"swarm/warm before the model's request, median, {name}: "
                     + ", ".join(f"{phase} {median}" for phase, median in zip(PHASES, medians, strict=True)))
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


def _measure(setup: Rig, deployment: str, swarm: Swarm, server: PostgresServer, chats: int, per_chat: int
             ) -> tuple[list[float], list[float], list[float], list[tuple[float, ...]]]:
    """Each chat's first message (cold), then its later ones (warm), one at a time: seconds from event to reply;
    and of each warm one, seconds from the event to the model API's first request of its turn, and that time in
    PHASES."""
    with contextlib.ExitStack() as stack:
        sections: dict = {"defaults": CAPS}
        if deployment == "swarm+postgres":
            sections.update(stack.enter_context(on_swarm(setup, swarm, server)))
        elif deployment == "docker+postgres":
            sections["store"] = new_database(server)
        setup.configure(swarm.agent_image if deployment == "swarm+postgres" else AGENT_IMAGE, **sections)
        if "store" in sections:
            migrate(setup.config)
        setup.start()
        if deployment == "swarm+postgres":  # a deployment's guard and gateway run on its nodes long before a chat
            swarm.wait_ready(setup.instance)
        cold, warm, to_model = [], [], []
        pushed_at: dict[str, tuple[float, float]] = {}  # a warm message's event and model request, wall clock
        for n in range(chats):
            chat_id = new_chat()
            for m in range(per_chat):
                message_id, text = new_message(), f"message {n}.{m}."
                pushed, pushed_wall = time.monotonic(), time.time()
                setup.feishu.push_event(setup.feishu.text_event(chat_id, text, message_id=message_id))
                (warm if m else cold).append(setup.reply_time(message_id, timeout=300) - pushed)
                asked = setup.api.first_asked(text)
                if asked is None:
                    raise RuntimeError(f"the model API was never asked about {text!r}: the chat shows "
                                       f"{[said.text for said in setup.feishu.messages(chat_id)]}")
                if m:
                    to_model.append(asked - pushed)
                    pushed_at[message_id] = (pushed_wall, pushed_wall + asked - pushed)
        logged = _logged(setup)
        for bot in setup.bots:
            bot.stop()
        split = [(logged[id_]["received"] - pushed, logged[id_]["turn"] - logged[id_]["received"],
                  asked - logged[id_]["turn"]) for id_, (pushed, asked) in pushed_at.items()]
        return cold, warm, to_model, split


def _logged(setup: Rig) -> dict[str, dict[str, float]]:
    """By message id: when its orchestrator logged it "received" and its turn requested ("turn"), wall clock."""
    logged: dict[str, dict[str, float]] = {}
    for bot in setup.bots:
        for found in map(LOGGED.match, bot.log().splitlines()):
            if found:
                at = datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S.%f").timestamp()
                logged.setdefault(found[3], {})[found[2].split()[0]] = at
    return logged


if __name__ == "__main__":
    main(run, __doc__ or "")
