"""Warm overhead: a message to a chat whose container runs, from the Feishu event to the reply API call,
against a bare `docker exec` of the same CLI command in the same container. Target: <= 1.2x.

Run twice: with the real CLI against the fake Messages API answering at once, and with the stand-in CLI
(answers with no work at all), which shows the orchestrator's own overhead. The two paths alternate, so
drift on a shared machine hits both alike.

    python -m bench.warm [--quick]
"""

from __future__ import annotations

import time

from bench.common import AGENT_USER, CLI_ARGS, Rig, compare, main, new_chat, new_message, rig, stub_image, timed
from tests.harness import AGENT_IMAGE, StoreView


def run(quick: bool) -> list[str]:
    samples = 3 if quick else 30
    lines = []
    with rig() as setup:
        for label, image in (("warm/real-cli", AGENT_IMAGE), ("warm/stub-cli", stub_image(setup.client))):
            setup.configure(image)
            bot = setup.start()
            ours, bare = measure(setup, samples)
            bot.stop()
            lines += compare(label, ours, bare, target=1.2)
    return lines


def measure(setup: Rig, samples: int) -> tuple[list[float], list[float]]:
    chat_id = new_chat()
    warm_up = new_message()
    setup.feishu.push_event(setup.feishu.text_event(chat_id, "warm up", message_id=warm_up))
    setup.reply_time(warm_up)
    container = setup.container(chat_id)
    store = StoreView(setup.data / "orchestrator.db")
    ours, bare = [], []
    for n in range(samples):
        message_id = new_message()
        event = setup.feishu.text_event(chat_id, f"warm message {n}", message_id=message_id)
        pushed = time.monotonic()
        setup.feishu.push_event(event)
        ours.append(setup.reply_time(message_id) - pushed)
        session = store.chat(chat_id)["session_id"]
        argv = [*CLI_ARGS, f"--resume={session}", f"bare message {n}"]
        bare.append(timed(lambda argv=argv: _exec(container, argv, setup.env())))
    return ours, bare


def _exec(container: object, argv: list[str], env: dict[str, str]) -> None:
    result = container.exec_run(argv, environment=env, user=AGENT_USER, workdir="/workspace")  # type: ignore[attr-defined]
    if result.exit_code != 0:
        raise RuntimeError(f"bare exec failed: {result.output[-500:]!r}")


if __name__ == "__main__":
    main(run, __doc__ or "")
