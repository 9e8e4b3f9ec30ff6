"""Footprint: the orchestrator's RSS and CPU with 1,000 known chats and 50 running containers, and while
idle right after start (CPU should be near zero). Stand-in CLI for the 50 turns that start the containers.

    python -m bench.footprint [--quick]
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.common import main, new_chat, rig, start_chats, stub_image
from orchestrator.store import Store

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def run(quick: bool) -> list[str]:
    known, running, window = (100, 5, 2.0) if quick else (1000, 50, 10.0)
    with rig() as setup:
        setup.configure(stub_image(setup.client), containers={"idle_stop": 3600})
        store = Store(setup.data / "orchestrator.db")
        for _ in range(known - running):
            store.ensure_chat(new_chat())
        store.close()
        bot = setup.start()
        pid = bot.process.pid
        time.sleep(2)
        rss_idle, cpu_idle = rss_mib(pid), cpu_percent(pid, window)
        began = cpu_seconds(pid)
        start_chats(setup, running)
        busy_cpu = (cpu_seconds(pid) - began) / running
        time.sleep(2)
        rss_loaded, cpu_loaded = rss_mib(pid), cpu_percent(pid, window)
        bot.stop()
    return [
        f"footprint: idle after start with {known - running} known chats: RSS={rss_idle:.0f} MiB "
        f"CPU={cpu_idle:.2f}% of one core over {window:g} s (absolute, this machine)",
        f"footprint: {known} known chats and {running} running containers, idle: RSS={rss_loaded:.0f} MiB "
        f"CPU={cpu_loaded:.2f}% of one core over {window:g} s",
        f"footprint: orchestrator CPU per turn while starting them: {busy_cpu * 1000:.0f} ms",
    ]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def cpu_percent(pid: int, window: float) -> float:
    before = cpu_seconds(pid)
    time.sleep(window)
    return 100 * (cpu_seconds(pid) - before) / window


if __name__ == "__main__":
    main(run, __doc__ or "")
