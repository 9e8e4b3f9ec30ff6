"""Approvals under faults (issue 12): tool calls that wait for an approver in chats that ask, while the orchestrator
is killed with -9 at random moments around the clicks (before one, right after one, while two approvers click at
once). Every message must be answered once, every allowed tool must have run once, every request must have been
decided once, and no request may have got a second card."""

from __future__ import annotations

import random
import threading
import time

from bench.faults_lib.rig import Result, Rig, Sent, wait_for
from tests.harness import chat

SENDER, APPROVER = "ou_user", "ou_approver"
MOMENTS = ("kill before the click", "kill right after the click", "two approvers at once", "plain click")


def approvals(quick: bool, rng: random.Random) -> Result:
    rounds, chats = (2, 2) if quick else (10, 3)
    result = Result("approvals")
    with Rig("approvals", result, defaults={"permission_mode": "default", "approvers": [APPROVER]},
             scheduler={"queue_depth": 100}) as rig:
        ids = [chat() for _ in range(chats)]
        rig.start()
        moments: list[str] = []
        for n in range(rounds):
            sent = [rig.say(chat_id, f"RUN_BASH: touch /workspace/ap-{n}-{i}; echo ap-{n}-{i}", f"ran: ap-{n}-{i}")
                    for i, chat_id in enumerate(ids)]
            for one in sent:
                card = wait_for(lambda one=one: _card(rig, one), 90)
                if not card:
                    result.problems.append(f"{one.message_id}: no approval card")
                    continue
                moment = rng.choice(MOMENTS)
                moments.append(moment)
                _decide(rig, card, moment, rng)
        settled = rig.settle(timeout=180)
        rig.tally()
        _check_effects(rig, result)
    counts = {moment: moments.count(moment) for moment in MOMENTS}
    result.notes.append(f"{len(rig.sent)} tool calls asked over {chats} chats; moments: {counts}; settled: {settled}")
    return result


def _card(rig: Rig, sent: Sent) -> str | None:
    """The approval card replying to the message, once its buttons show."""
    for message in rig.feishu.messages(sent.chat_id):
        if message.reply_to == sent.message_id and message.msg_type == "interactive" and message.card_id is None \
                and rig.feishu.buttons(message.message_id):
            return message.message_id
    return None


def _decide(rig: Rig, card: str, moment: str, rng: random.Random) -> None:
    if moment == "kill before the click":
        rig.kill()
        rig.start()
        rig.redeliver_unacked()
        rig.feishu.click(card, "Allow once", SENDER)
    elif moment == "kill right after the click":
        rig.feishu.click(card, "Allow once", SENDER)
        time.sleep(rng.uniform(0, 0.05))
        rig.kill()
        rig.start()
        rig.redeliver_unacked()
    elif moment == "two approvers at once":
        clickers = [threading.Thread(target=rig.feishu.click, args=(card, "Allow once", who))
                    for who in (SENDER, APPROVER)]
        for clicker in clickers:
            clicker.start()
        for clicker in clickers:
            clicker.join(10)
    else:
        rig.feishu.click(card, "Allow once", SENDER)


def _check_effects(rig: Rig, result: Result) -> None:
    """Each request decided once and allowed (the store), each tool run (its file), one card per request."""
    rows = rig.store._rows("select turn, number, state, decided_by from approvals")
    allowed = [row for row in rows if row["state"] == "allowed" and row["decided_by"]]
    if len(allowed) != len(rows):
        result.problems.append(f"requests not allowed by a person: {[r for r in rows if r not in allowed]}")
    for sent in rig.sent:
        tag = sent.expect.removeprefix("ran: ")
        if not (rig.data / "chats" / sent.chat_id / "workspace" / tag).exists():
            result.problems.append(f"{sent.message_id}: its tool never ran ({tag} missing)")
        cards = [m for m in rig.feishu.messages(sent.chat_id)
                 if m.reply_to == sent.message_id and m.msg_type == "interactive" and m.card_id is None]
        if len(cards) != 1:
            result.problems.append(f"{sent.message_id}: {len(cards)} approval cards")
