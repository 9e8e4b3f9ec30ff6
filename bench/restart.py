"""Restart: the time to adopt 100 running containers on start, and the time of a graceful shutdown
(SIGTERM: drain, interrupt, tell, stop containers) with 20 busy chats.

    python -m bench.restart [--quick]
"""

from __future__ import annotations

import re
import signal
import time

from bench.common import main, new_chat, rig, start_chats, stub_image
from tests.harness import AGENT_IMAGE, wait_until

RECONCILED = re.compile(r"reconciled with the engine in ([\d.]+) s: \d+ chats, (\d+) containers \((\d+) running\)")


def run(quick: bool) -> list[str]:
    adopt, busy = (10, 3) if quick else (100, 20)
    lines = []
    with rig() as setup:
        setup.configure(stub_image(setup.client), shutdown={"keep_containers": True},
                        scheduler={"max_concurrent_turns": 8}, containers={"idle_stop": 3600})
        bot = setup.start()
        start_chats(setup, adopt)
        bot.stop()  # keep_containers: they stay up
        began = time.monotonic()
        restarted = setup.start()
        ready = time.monotonic() - began
        seconds, containers, running = RECONCILED.search(restarted.log()).groups()
        lines.append(f"restart: adopted {running} of {containers} running containers: reconcile took {seconds} s; "
                     f"start to connected {ready:.1f} s (absolute, this machine; includes Python start-up)")
        restarted.stop()

    with rig() as setup:
        setup.configure(AGENT_IMAGE, shutdown={"drain_timeout": 2}, scheduler={"max_concurrent_turns": busy})
        bot = setup.start()
        for n in range(busy):
            setup.feishu.push_event(setup.feishu.text_event(new_chat(), f"SLOW 120 busy {n}"))
        wait_until(lambda: sum(1 for n in range(busy) if setup.api.requests_mentioning(f"SLOW 120 busy {n}")) == busy,
                   300, "every turn running", interval=0.2)
        began = time.monotonic()
        bot.process.send_signal(signal.SIGTERM)
        code = bot.wait(300)
        took = time.monotonic() - began
        left = setup.client.containers.list(filters={"label": f"orchestrator.instance={setup.instance}"})
        lines.append(f"restart: graceful shutdown with {busy} busy chats took {took:.1f} s (drain_timeout 2 s, then "
                     f"interrupt, tell, stop containers); exit code {code}; containers left running {len(left)}")
    return lines


if __name__ == "__main__":
    main(run, __doc__ or "")
