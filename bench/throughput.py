"""Throughput and fairness: 1,000 messages over 100 chats through the fake Feishu, all answered exactly once;
messages per second against raw `docker exec` throughput of the one-shot command each turn ran before issue 10,
over the same containers with the same concurrency, and against the full run before issue 10; queue wait per chat
(no chat starved). Stand-in CLI: this measures the orchestrator.
The fake Feishu's rate limits are raised, so they do not set the pace (Feishu's real ones would).

    python -m bench.throughput [--quick]
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from bench.common import AGENT_USER, CLI_ARGS, Rig, main, new_chat, new_message, rig, stub_image
from tests.harness import StoreView, wait_until

CONCURRENCY = 4  # scheduler.max_concurrent_turns, and the bare path's worker threads
# The config sections of the load benchmarks: CONCURRENCY turns at once, and Feishu's rate limits raised far enough
# not to set the pace (the fake enforces the configured ones).
UNPACED = {"scheduler": {"max_concurrent_turns": CONCURRENCY, "queue_depth": 50},
           "feishu": {"rate_per_chat": 1000, "rate_per_app": 5000, "rate_per_app_minute": 300000}}
# The full run's figures of 2026-12-03, before issue 10 (a `docker exec` per turn), on a loaded machine: the new
# path must do at least as well. The ratio to bare is the figure that travels between runs; the rate is absolute.
BEFORE_RATE, BEFORE_RATIO = 6.0, 0.40


def run(quick: bool) -> list[str]:
    chats, per_chat = (5, 4) if quick else (100, 10)
    with rig() as setup:
        setup.configure(stub_image(setup.client), **UNPACED)
        setup.start()
        chat_ids = [new_chat() for _ in range(chats)]
        ours_rate, replies, waits = through_orchestrator(setup, chat_ids, per_chat)
        bare_rate = through_docker_exec(setup, chat_ids, per_chat)
    total = chats * per_chat
    once = sum(1 for count in replies.values() if count == 1)
    mean_waits = sorted(statistics.mean(w) for w in waits.values())
    ratio = ours_rate / bare_rate
    return [
        f"throughput: messages={total} chats={chats} answered_once={once} answered_twice_or_more="
        f"{sum(1 for c in replies.values() if c > 1)} unanswered={total - len(replies)}",
        f"throughput: orchestrator={ours_rate:.1f} msg/s, bare docker exec={bare_rate:.1f} msg/s "
        f"(absolute, this machine, concurrency {CONCURRENCY}); ratio={ratio:.2f}x of bare",
        f"throughput: against the full run before issue 10 ({BEFORE_RATE} msg/s, {BEFORE_RATIO:.2f}x of bare): "
        f"rate {_against(ours_rate, BEFORE_RATE)}, ratio {_against(ratio, BEFORE_RATIO)}"
        + (" (a quick run: not comparable)" if quick else ""),
        f"throughput: queue wait per chat (mean of its messages): min={mean_waits[0]:.2f} s "
        f"median={statistics.median(mean_waits):.2f} s max={mean_waits[-1]:.2f} s; "
        f"max/median={mean_waits[-1] / statistics.median(mean_waits):.2f}",
    ]


def _against(value: float, before: float) -> str:
    return "at least as high" if value >= before else "lower"


def through_orchestrator(setup: Rig, chat_ids: list[str], per_chat: int
                         ) -> tuple[float, Counter[str], dict[str, list[float]]]:
    """Messages per second from the first event to the last reply; replies per message; waits per chat."""
    rate, replies = answer_all(setup, chat_ids, per_chat)
    store = StoreView(setup.data / "orchestrator.db")
    waits: dict[str, list[float]] = {}
    for chat_id in chat_ids:
        for message in store.messages(chat_id):
            started = (setup.data / "chats" / chat_id / "turns" / message["turn"] / "pid").stat().st_mtime  # taken
            waits.setdefault(chat_id, []).append(started - message["received_at"])
    return rate, replies, waits


def answer_all(setup: Rig, chat_ids: list[str], per_chat: int, pushed: dict[str, float] | None = None,
               timeout: float = 3600) -> tuple[float, Counter[str]]:
    """`per_chat` messages to each chat, interleaved; messages per second from the first event to the last reply,
    and the replies per message (a second one shows up within a second after the last). `pushed`, if given, gets
    each message's id and when its event was sent (time.monotonic, as the fake Feishu's calls)."""
    message_ids = []
    began = time.monotonic()
    for n in range(per_chat):  # interleaved, as a busy team would send them
        for chat_id in chat_ids:
            message_id = new_message()
            message_ids.append(message_id)
            if pushed is not None:
                pushed[message_id] = time.monotonic()
            setup.feishu.push_event(setup.feishu.text_event(chat_id, f"message {n}", message_id=message_id))
    wanted = set(message_ids)

    def replied() -> Counter[str]:
        return Counter(c.path.split("/")[-2] for c in setup.feishu.calls
                       if c.path.endswith("/reply") and c.status == 200 and c.path.split("/")[-2] in wanted)

    wait_until(lambda: len(replied()) == len(wanted), timeout, "every message answered", interval=0.2)
    elapsed = max(c.time for c in setup.feishu.calls if c.path.endswith("/reply")) - began
    time.sleep(1)  # a second reply to any message would show up now
    return len(wanted) / elapsed, replied()


def through_docker_exec(setup: Rig, chat_ids: list[str], per_chat: int) -> float:
    containers = [setup.container(chat_id) for chat_id in chat_ids]

    def execute(container: object) -> None:
        container.exec_run([*CLI_ARGS, "bare"], user=AGENT_USER)  # type: ignore[attr-defined]

    began = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(execute, [c for _ in range(per_chat) for c in containers]))
    return len(chat_ids) * per_chat / (time.monotonic() - began)


if __name__ == "__main__":
    main(run, __doc__ or "")
