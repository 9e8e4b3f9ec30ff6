"""The Swarm runtime against the Docker one (issue 14), in the same run, alternately: the real CLI against the fake
model through the fake Feishu, from the event to the reply. Cold: a new chat's first message (its service made and
its task started on a node, against its container made and started on this host). Warm: the next messages of the
same chats (a running task or container, the hot CLI in it). Both on `egress: none` (the only egress Swarm serves),
the Swarm one on three Docker-in-Docker nodes (tests/swarm.py) with the chats' folders on their shared storage.

    python -m bench.swarm [--quick]        (SWARM_TEST_REUSE=FILE: a Swarm left up by the tests, as they take it)
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import docker

from bench.common import Rig, main, median_p95, ms, new_chat, new_message, rig
from tests.harness import AGENT_IMAGE
from tests.swarm import Swarm

TARGET = 1.2  # warm time per message on Swarm, at most this many times Docker's
CAPS = {"cpus": 1, "memory": "512m", "pids_limit": 200, "egress": "none"}


def run(quick: bool) -> list[str]:
    chats, per_chat, rounds = (2, 3, 1) if quick else (4, 8, 2)
    client = docker.from_env(timeout=300)
    reuse = os.environ.get("SWARM_TEST_REUSE")
    if reuse and Path(reuse).exists():
        swarm = Swarm.attach(client, Path(reuse))
    else:
        swarm = Swarm(client).start()
        reuse = ""
    try:
        if not swarm.agent_image:
            swarm.agent_image = swarm.push(AGENT_IMAGE)
            swarm.pull_everywhere(swarm.agent_image)
        cold: dict[str, list[float]] = {"docker": [], "swarm": []}
        warm: dict[str, list[float]] = {"docker": [], "swarm": []}
        for _ in range(rounds):
            for runtime in ("docker", "swarm"):
                with rig() as setup:
                    first, later = _measure(setup, swarm if runtime == "swarm" else None, chats, per_chat)
                cold[runtime] += first
                warm[runtime] += later
    finally:
        if not reuse:
            swarm.remove()
        client.close()
    lines = []
    for name, samples, target in (("cold", cold, None), ("warm", warm, TARGET)):
        docker_median, docker_p95 = median_p95(samples["docker"])
        swarm_median, swarm_p95 = median_p95(samples["swarm"])
        ratio = swarm_median / docker_median
        verdict = f"target <= {target}x: {'meets' if ratio <= target else 'misses'}" if target else "no target"
        lines += [f"swarm/{name}: samples={len(samples['swarm'])} swarm median={ms(swarm_median)} p95={ms(swarm_p95)}; "
                  f"docker median={ms(docker_median)} p95={ms(docker_p95)} (absolute, this machine)",
                  f"swarm/{name}: ratio={ratio:.2f}x median, {swarm_p95 / docker_p95:.2f}x p95; {verdict}"]
    lines.append(f"swarm/warm: mean swarm {ms(statistics.mean(warm['swarm']))}, docker "
                 f"{ms(statistics.mean(warm['docker']))}")
    return lines


def _measure(setup: Rig, swarm: Swarm | None, chats: int, per_chat: int) -> tuple[list[float], list[float]]:
    """Each chat's first message (cold), then its later ones (warm), one at a time: seconds from event to reply."""
    sections: dict = {"defaults": CAPS}
    if swarm is not None:
        swarm.prepare_instance(setup.instance)
        sections.update(data_dir=str(swarm.shared / setup.instance / "data"), runtime="swarm",
                        swarm={"manager": swarm.manager_url})
    try:
        setup.configure(swarm.agent_image if swarm else AGENT_IMAGE, **sections)
        setup.start()
        cold, warm = [], []
        for n in range(chats):
            chat_id = new_chat()
            for m in range(per_chat):
                message_id = new_message()
                pushed = time.monotonic()
                setup.feishu.push_event(setup.feishu.text_event(chat_id, f"message {n}.{m}", message_id=message_id))
                (warm if m else cold).append(setup.reply_time(message_id, timeout=300) - pushed)
        for bot in setup.bots:
            bot.stop()
        return cold, warm
    finally:
        if swarm is not None:
            swarm.remove_instance(setup.instance)


if __name__ == "__main__":
    main(run, __doc__ or "")
