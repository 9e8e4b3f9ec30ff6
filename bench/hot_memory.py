"""Memory of a hot chat: the real CLI's RSS while it idles between turns, and the container's memory with the CLI
hot and again after `agent.hot_idle` has passed and the CLI has exited: what hot_idle gives back per chat.

The CLI's RSS comes from `docker top` (ps inside the container's cgroup); the container's memory is the engine's
stats as `docker stats` shows it: usage minus inactive file pages.

    python -m bench.hot_memory [--quick]
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.common import main, rig, start_chats
from tests.harness import AGENT_IMAGE, wait_until

SETTLE_SECONDS = 2.0  # after the answer, before the idle CLI is measured
MIB = 1024**2


def run(quick: bool) -> list[str]:
    chats, hot_idle = (1, 3.0) if quick else (5, 10.0)
    with rig() as setup:
        setup.configure(AGENT_IMAGE, agent={"hot_idle": hot_idle}, containers={"idle_stop": 3600})
        bot = setup.start()
        containers = [setup.container(chat_id) for chat_id in start_chats(setup, chats)]
        time.sleep(SETTLE_SECONDS)
        cli_rss = [wait_until(lambda c=c: cli_rss_kib(c), 10, "the hot CLI") / 1024 for c in containers]
        hot = [memory_mib(c) for c in containers]
        wait_until(lambda: not any(cli_rss_kib(c) for c in containers), hot_idle + 60, "every CLI's exit")
        cold = [memory_mib(c) for c in containers]
        bot.stop()
    given_back = [h - c for h, c in zip(hot, cold, strict=True)]
    return [
        f"hot_memory: chats={chats} the idle CLI's RSS median={statistics.median(cli_rss):.0f} MiB "
        f"max={max(cli_rss):.0f} MiB (real CLI, absolute)",
        f"hot_memory: container memory with the CLI hot median={statistics.median(hot):.0f} MiB, after hot_idle "
        f"({hot_idle:g} s) and the CLI's exit median={statistics.median(cold):.0f} MiB: hot_idle gives back "
        f"{statistics.median(given_back):.0f} MiB per chat (median)",
    ]


def cli_rss_kib(container: Any) -> int:
    """The RSS of the chat's CLI process (0 when it runs none), from ps in the container's cgroup."""
    top = container.top(ps_args="-o pid,rss,args")  # the engine needs the pid column
    return sum(int(rss) for _, rss, args in top["Processes"]
               if args.startswith("claude ") and "--input-format" in args.split())


def memory_mib(container: Any) -> float:
    stats = container.stats(stream=False)["memory_stats"]
    inactive = stats["stats"].get("total_inactive_file", stats["stats"].get("inactive_file", 0))
    return (stats["usage"] - inactive) / MIB


if __name__ == "__main__":
    main(run, __doc__ or "")
