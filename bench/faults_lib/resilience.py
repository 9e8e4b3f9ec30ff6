"""The service cannot silently stop serving (issue 9): the store held locked by another process while messages
arrive and answers fall due. Every message must end answered exactly once or failed with a reason, /healthz
must say what is wrong meanwhile, and the figure is how long the service takes to catch up after the unlock."""

from __future__ import annotations

import json
import random
import sqlite3
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from bench.faults_lib.rig import Result, Rig, wait_for
from bench.faults_lib.webhook import percentile
from tests.harness import chat, free_port

SETTLE_SECONDS = 240


@dataclass
class Trial:
    """One lock: whether /healthz reported it, how long the service took to catch up, and whether /healthz was
    healthy again afterwards."""

    reported: bool
    recovery: float | None  # seconds from the unlock until every message was answered or failed
    healthy_after: bool
    redelivered: int


def store_locked(quick: bool, rng: random.Random) -> Result:
    trials, chats, (shortest, longest) = (2, 2, (4.0, 6.0)) if quick else (8, 3, (5.0, 20.0))
    result = Result("store_locked")
    port = free_port()
    with Rig("store_locked", result, metrics={"listen": f"127.0.0.1:{port}"}, scheduler={"queue_depth": 100}) as rig:
        ids = [chat() for _ in range(chats)]
        rig.start()
        done = [_trial(rig, port, n, ids, round(rng.uniform(shortest, longest), 1), rng) for n in range(trials)]
        answered, failed = _count(rig, result)
    recovery = [t.recovery for t in done if t.recovery is not None]
    reported, healthy_after = sum(t.reported for t in done), sum(t.healthy_after for t in done)
    if reported < trials:
        result.problems.append(f"/healthz reported the locked store in only {reported} of {trials} trials")
    if healthy_after < trials:
        result.problems.append(f"/healthz was healthy again after only {healthy_after} of {trials} unlocks")
    if len(recovery) < trials:
        result.problems.append(f"{trials - len(recovery)} trial(s) did not settle within {SETTLE_SECONDS} s")
    result.notes.append(f"{trials} locks of {shortest:g}-{longest:g} s (BEGIN EXCLUSIVE from another process) over "
                        f"{chats} chats, each with a turn whose answer fell due during the lock and a message "
                        f"arriving during it; {sum(t.redelivered for t in done)} unacked events pushed again")
    if recovery:
        result.notes.append(f"recovery (unlock to every message answered or failed): p50 "
                            f"{percentile(recovery, 0.5):.1f} s, p95 {percentile(recovery, 0.95):.1f} s, "
                            f"max {max(recovery):.1f} s")
    result.notes.append(f"{answered} answered exactly once, {failed} failed with a reason; /healthz reported the "
                        f"lock in {reported}/{trials} trials and was healthy after {healthy_after}/{trials}")
    return result


def _trial(rig: Rig, port: int, n: int, ids: list[str], seconds: float, rng: random.Random) -> Trial:
    """A turn under way in each chat whose answer falls due during the lock; the store locked for `seconds`
    while a message arrives in each chat; then the unacked events pushed again, as Feishu does."""
    due = [rig.say(c, f"SLOW {round(rng.uniform(0.5, seconds), 1)} lock-{n}-due-{i}") for i, c in enumerate(ids)]
    wait_for(lambda: all((rig.row(s) or {}).get("state") == "running" for s in due), 120)
    holder = sqlite3.connect(rig.data / "orchestrator.db", timeout=30, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    locked_at = time.monotonic()
    reported = "locked" in (_checks(port).get("store") or "")
    arriving = []
    for i, c in enumerate(ids):
        time.sleep(rng.uniform(0, max(0.0, seconds - (time.monotonic() - locked_at)) / len(ids)))
        arriving.append(rig.say(c, f"lock-{n}-arriving-{i}"))
    time.sleep(max(0.0, seconds - (time.monotonic() - locked_at)))  # the fault: held this long
    holder.execute("ROLLBACK")
    holder.close()
    unlocked_at = time.monotonic()
    wait_for(lambda: _all_acked(rig), 30)
    redelivered = rig.redeliver_unacked()
    settled = wait_for(lambda: all((rig.row(s) or {}).get("state") in ("delivered", "failed")
                                   for s in due + arriving), SETTLE_SECONDS, 0.1)
    recovery = time.monotonic() - unlocked_at if settled else None
    healthy_after = bool(wait_for(lambda: _checks(port) == {}, 60, 0.5))
    return Trial(reported, recovery, healthy_after, redelivered)


def _checks(port: int) -> dict[str, str]:
    """What /healthz says is wrong (empty when healthy)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=20) as response:
            body = response.read()
    except urllib.error.HTTPError as error:
        body = error.read()
    except OSError as error:
        return {"healthz": str(error)}
    return {name: problem for name, problem in json.loads(body)["checks"].items() if problem != "ok"}


def _all_acked(rig: Rig) -> bool:
    acked = {ack.message_id for ack in rig.feishu.acks}
    return all(frame in acked for frames in rig.frames.values() for frame in frames)


def _count(rig: Rig, result: Result) -> tuple[int, int]:
    """Each message: one reply and one turn (answered, or failed with the reason as its reply), or else lost or
    duplicated; (answered, failed)."""
    turns, states = rig.turns(), rig.states()
    answered = failed = 0
    for s in rig.sent:
        replies, state, count = rig.replies(s), states.get(s.message_id), turns[s.text.strip()]
        result.trials += 1
        if not replies:
            result.lost += 1
            result.problems.append(f"{s.message_id} ({s.text!r}): no reply, state {state}")
        elif len(replies) > 1 or count > 1:
            result.duplicated += 1
            result.problems.append(f"{s.message_id} ({s.text!r}): {len(replies)} replies, {count} turns")
        elif state == "delivered" and rig.answered(s):
            answered += 1
            result.passed += 1
        elif state == "failed":
            failed += 1
            result.passed += 1
        else:
            result.problems.append(f"{s.message_id} ({s.text!r}): state {state}, reply {replies[0].text[:80]!r}")
    return answered, failed


