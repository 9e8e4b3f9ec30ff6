"""Streaming: the delay from the CLI's first text to the first card the chat sees, and card updates per
second against Feishu's limit of 10 per card per second. Real CLI; the fake model answers in 20 text
blocks 0.1 s apart.

    python -m bench.streaming [--quick]
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from bench.common import main, ms, new_chat, new_message, rig
from tests.harness import AGENT_IMAGE, wait_until

CARD_LIMIT = 10


def run(quick: bool) -> list[str]:
    samples, blocks = (2, 10) if quick else (10, 20)
    delays, rates = [], []
    with rig() as setup:
        setup.configure(AGENT_IMAGE)
        setup.start()
        for _ in range(samples):
            chat_id, message_id = new_chat(), new_message()
            setup.feishu.push_event(setup.feishu.text_event(chat_id, f"STREAM {blocks} 0.1", message_id=message_id))
            first_text = watch_first_text(setup.data / "chats" / chat_id / "turns")
            delays.append(setup.reply_time(message_id) - first_text)
            final = f"part {blocks} of {blocks}."
            wait_until(lambda chat_id=chat_id, final=final: any(final in m.text
                                                                for m in setup.feishu.messages(chat_id)),
                       60, "the last part")
            card = f"/cards/{setup.feishu.messages(chat_id)[0].card_id}/elements/answer/content"
            updates = [c.time for c in setup.feishu.calls if c.path.endswith(card)]
            rates.append((len(updates) - 1) / (updates[-1] - updates[0]) if len(updates) > 1 else 0.0)
        densest = setup.feishu.max_rate(per="card")
    return [
        f"streaming: first text to first card: median={ms(statistics.median(delays))} max={ms(max(delays))} "
        f"(absolute, this machine; card updates are throttled to one per 0.5 s)",
        f"streaming: card updates median={statistics.median(rates):.1f}/s; densest second on one card={densest} "
        f"against Feishu's {CARD_LIMIT}/s per card ({densest / CARD_LIMIT:.0%} of the limit)",
    ]


def watch_first_text(turns: Path, timeout: float = 60) -> float:
    """When the first assistant text line appeared in the turn's output, watched every 2 ms."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for output in turns.glob("*/output.jsonl"):
            if '"type":"text"' in output.read_text(errors="replace"):
                return time.monotonic()
        time.sleep(0.002)
    raise TimeoutError("no text from the CLI")


if __name__ == "__main__":
    main(run, __doc__ or "")
