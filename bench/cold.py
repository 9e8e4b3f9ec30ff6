"""Cold chat: the first message of a new chat (its container created and started, then the turn), from the
Feishu event to the reply API call, against a bare `docker run --rm` of the same image, caps and CLI
command. Target: <= 1.3x. Real CLI against the fake Messages API, and the stand-in CLI.

Ours runs as deployed: on the instance's closed network, hardened, reaching the fake on the host's loopback
through the model gateway. The bare run has none of that: it sits on the host's network, the only way a plain
container reaches a loopback address, so the ratio includes what the boundary costs.

    python -m bench.cold [--quick]
"""

from __future__ import annotations

import time

from bench.common import AGENT_USER, CLI_ARGS, Rig, compare, main, new_chat, new_message, rig, stub_image, timed
from tests.harness import AGENT_IMAGE

CAPS = {"cpus": 1, "memory": "512m", "pids_limit": 200}


def run(quick: bool) -> list[str]:
    samples = 3 if quick else 20
    lines = []
    with rig() as setup:
        for label, image in (("cold/real-cli", AGENT_IMAGE), ("cold/stub-cli", stub_image(setup.client))):
            setup.configure(image, defaults=CAPS)
            bot = setup.start()
            ours, bare = measure(setup, image, samples)
            bot.stop()
            lines += compare(label, ours, bare, target=1.3)
    return lines


def measure(setup: Rig, image: str, samples: int) -> tuple[list[float], list[float]]:
    ours, bare = [], []
    for n in range(samples):
        message_id = new_message()
        event = setup.feishu.text_event(new_chat(), f"first message {n}", message_id=message_id)
        pushed = time.monotonic()
        setup.feishu.push_event(event)
        ours.append(setup.reply_time(message_id) - pushed)
        bare.append(timed(lambda n=n: setup.client.containers.run(
            image, [*CLI_ARGS, f"bare first message {n}"], remove=True, user=AGENT_USER, network_mode="host",
            environment=setup.env(), working_dir="/workspace", nano_cpus=CAPS["cpus"] * 10**9,
            mem_limit=CAPS["memory"], pids_limit=CAPS["pids_limit"], cap_drop=["ALL"],
            security_opt=["no-new-privileges"])))
    return ours, bare


if __name__ == "__main__":
    main(run, __doc__ or "")
