"""Warm message: a message to a chat whose container runs and whose CLI is hot, from the Feishu event to the reply
API call, against two bare paths in the same container, all three alternating sample by sample, so drift on a
shared machine hits them alike:

- a bare `docker exec` of the one-shot CLI command each turn ran before issue 10 (`claude -p ... --resume=<the
  chat's session> <prompt>`): target <= 0.35x;
- a bare hot CLI: `claude -p --input-format stream-json ...` started once with `docker exec -i`, fed one user line
  per sample, timed to its result line. The orchestrator's own overhead is our time minus that one, per sample:
  target <= 30 ms median.

Run twice: with the real CLI against the fake Messages API answering at once, and with the stand-in CLI (answers
with no work at all; its one-shot ratio has no target, as a bare exec of it is docker exec's own cost).

    python -m bench.warm [--quick]
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from bench.common import (
    AGENT_USER,
    CLI_ARGS,
    HotCli,
    Rig,
    compare,
    main,
    ms,
    new_chat,
    new_message,
    percentile,
    rig,
    stub_image,
    timed,
)
from tests.harness import AGENT_IMAGE, StoreView

ONE_SHOT_TARGET = 0.35
OVERHEAD_TARGET = 0.030
# The chat's hot CLI, the bare hot CLI and a one-shot CLI live in the container at once (about 200 MiB each for
# the real one): the tests' 512 MiB cap would OOM-kill one of them.
MEMORY = "2g"


@dataclass
class Samples:
    ours: list[float] = field(default_factory=list)
    one_shot: list[float] = field(default_factory=list)
    hot: list[float] = field(default_factory=list)


def run(quick: bool) -> list[str]:
    samples = 3 if quick else 30
    lines = []
    with rig() as setup:
        for label, image, target in (("warm/real-cli", AGENT_IMAGE, ONE_SHOT_TARGET),
                                     ("warm/stub-cli", stub_image(setup.client), None)):
            setup.configure(image, defaults={"memory": MEMORY})
            bot = setup.start()
            measured = measure(setup, samples)
            bot.stop()
            lines += compare(label, measured.ours, measured.one_shot, target=target)
            lines.append(overhead(label, measured))
    return lines


def measure(setup: Rig, samples: int) -> Samples:
    chat_id = new_chat()
    warm_up = new_message()
    setup.feishu.push_event(setup.feishu.text_event(chat_id, "warm up", message_id=warm_up))
    setup.reply_time(warm_up)
    container = setup.container(chat_id)
    store = StoreView(setup.data / "orchestrator.db")
    # The bare paths run in the chat's container with its own environment: the model through the chat's gateway
    # socket with its token, as the chat's turns reach it (the container has no other way out).
    hot = HotCli(container.id, {})
    hot.ask("warm up the bare hot CLI")  # its start, as the chat's own CLI started at the warm-up message
    measured = Samples()
    try:
        for n in range(samples):
            message_id = new_message()
            event = setup.feishu.text_event(chat_id, f"warm message {n}", message_id=message_id)
            pushed = time.monotonic()
            setup.feishu.push_event(event)
            measured.ours.append(setup.reply_time(message_id) - pushed)
            argv = [*CLI_ARGS, f"--resume={store.chat(chat_id)['session_id']}", f"bare message {n}"]
            measured.one_shot.append(timed(lambda argv=argv: _exec(container, argv)))
            measured.hot.append(hot.ask(f"bare hot message {n}"))
    finally:
        hot.close()
    return measured


def overhead(label: str, measured: Samples) -> str:
    extra = [ours - hot for ours, hot in zip(measured.ours, measured.hot, strict=True)]
    median = statistics.median(extra)
    verdict = "meets" if median <= OVERHEAD_TARGET else "misses"
    return (f"{label}: overhead on the hot CLI: median={ms(median)} p90={ms(percentile(extra, 0.9))} "
            f"(ours minus a bare hot CLI, per sample; bare hot CLI median={ms(statistics.median(measured.hot))}, "
            f"absolute, this machine); target <= {ms(OVERHEAD_TARGET)} median: {verdict}")


def _exec(container: object, argv: list[str]) -> None:
    result = container.exec_run(argv, user=AGENT_USER, workdir="/workspace")  # type: ignore[attr-defined]
    if result.exit_code != 0:
        raise RuntimeError(f"bare exec failed: {result.output[-500:]!r}")


if __name__ == "__main__":
    main(run, __doc__ or "")
