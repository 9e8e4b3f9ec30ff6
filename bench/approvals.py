"""Approvals: the time from a click on an approval card to the tool starting in the chat's container (median, p95),
and the Feishu API calls one approval costs, in one run against a baseline: the same Bash call in a chat that asks
nothing (bypassPermissions), timed from its message to the tool starting. The real orchestrator, the real CLI in
the agent image (the fake Messages API asks for the tool), the fake Feishu delivering the click over the long
connection. The tool writes the wall clock when it starts (`date +%s.%N`; the container shares the host's clock).

    python -m bench.approvals [--quick]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from bench.common import Rig, main, median_p95, ms, new_chat, new_message, rig
from tests.fakes.feishu import Call
from tests.harness import AGENT_IMAGE, wait_until

ASKING = "oc_bench_asking"  # a chat that asks (permission_mode: default)
SENDER = "ou_user"  # the fake's default sender: the one who may decide


def run(quick: bool) -> list[str]:
    samples = 3 if quick else 20
    with rig() as setup:
        setup.configure(AGENT_IMAGE, groups={ASKING: {"permission_mode": "default"}})
        setup.start()
        plain = new_chat()
        for chat_id in (plain, ASKING):  # each chat's container started and its CLI hot
            warm_up = new_message()
            event = setup.feishu.text_event(chat_id, "RUN_BASH: touch /workspace/warm", message_id=warm_up)
            setup.feishu.push_event(event)
            _approve_if_asked(setup, chat_id, warm_up)
            setup.reply_time(warm_up)
        baseline, clicks, calls, plain_calls, card_calls = [], [], [], [], []
        for n in range(samples):
            began, writes = _turn(setup, plain, f"plain{n}", lambda message_id: None)
            baseline.append(began)
            plain_calls.append(writes)
            marker = len(setup.feishu.calls)
            began, writes = _turn(setup, ASKING, f"asked{n}", lambda message_id: _approve(setup, message_id))
            clicks.append(began)
            calls.append(writes)
            card_calls.append(sum(1 for call in setup.feishu.calls[marker:] if _approval_card_call(call)))
    click_median, click_p95 = median_p95(clicks)
    base_median, base_p95 = median_p95(baseline)
    return [f"approvals: click -> tool start: samples={samples} median={ms(click_median)} p95={ms(click_p95)}; "
            f"baseline (no approval) message -> tool start: median={ms(base_median)} p95={ms(base_p95)} "
            f"(absolute, this machine); ratio={click_median / base_median:.2f}x median",
            f"approvals: Feishu API calls per turn with one approval: {_spread(calls)}; without: {_spread(plain_calls)}"
            f"; on the approval card itself: {_spread(card_calls)} (its send; the toast and the decided card ride on "
            "the callback's answer, and the answer card's waiting line on its streaming updates)"]


def _turn(setup: Rig, chat_id: str, name: str, decide: Callable[[str], float | None]) -> tuple[float, int]:
    """One message whose Bash command writes when it started; (seconds from the message, or from the click when
    `decide` clicks, to the tool's start; Feishu write calls of the turn)."""
    message_id = new_message()
    marker = setup.data / "chats" / chat_id / "workspace" / name
    calls = len(setup.feishu.calls)
    pushed = time.time()
    setup.feishu.push_event(setup.feishu.text_event(chat_id, f"RUN_BASH: date +%s.%N > /workspace/{name}",
                                                    message_id=message_id))
    clicked = decide(message_id)
    setup.reply_time(message_id)
    started = float(wait_until(lambda: _read(marker), 30, f"{marker}"))
    time.sleep(0.5)  # the card updates after the reply (the Typing reaction's removal)
    writes = sum(1 for call in setup.feishu.calls[calls:] if call.write)
    return started - (clicked if clicked is not None else pushed), writes


def _approve(setup: Rig, message_id: str) -> float:
    card = _card_of(setup, message_id)
    clicked = time.time()
    answer = setup.feishu.click(card, "Allow once", SENDER)
    if answer.failure is not None:
        raise RuntimeError(f"the click failed: {answer.failure}")
    return clicked


def _approve_if_asked(setup: Rig, chat_id: str, message_id: str) -> None:
    if chat_id == ASKING:
        _approve(setup, message_id)


def _card_of(setup: Rig, message_id: str) -> str:
    """The approval card replying to `message_id`, once its buttons show."""
    def card() -> str | None:
        for message in setup.feishu.messages():
            if message.reply_to == message_id and message.msg_type == "interactive" and message.card_id is None \
                    and setup.feishu.buttons(message.message_id):
                return message.message_id
        return None

    return wait_until(card, 60, f"the approval card for {message_id}")


def _approval_card_call(call: Call) -> bool:
    """A send of a card written out in full (an approval card; answer cards are CardKit references), or a PATCH of a
    message's card."""
    if not call.write or "/im/v1/messages" not in call.path:
        return False
    if call.method == "PATCH":
        return True
    body = call.body if isinstance(call.body, dict) else {}
    return body.get("msg_type") == "interactive" and '"card_id"' not in str(body.get("content"))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def _spread(counts: list[int]) -> str:
    return f"min {min(counts)}, max {max(counts)}"


if __name__ == "__main__":
    main(run, __doc__ or "")
