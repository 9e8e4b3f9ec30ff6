"""The fault suite (issue 6): each scenario drives the real orchestrator, the real engine and the real Claude
CLI against the two fakes, counts trials, and says what was lost or duplicated. The target is nothing lost.

    python -m bench.faults [--quick] [--only NAME] [--seed N]

One line per scenario (`kill9: trials=20 passed=20 lost=0 duplicated=0`), then its figures; the exit code is
1 when anything was lost or duplicated or a check failed. `--quick` shrinks every scenario to seconds (CI).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from bench.faults_lib import approvals, boundary, failover, files, resilience, webhook
from bench.faults_lib import events as fuzz
from bench.faults_lib.rig import Result, Rig, Sent, wait_for
from orchestrator import cli
from orchestrator.channels import Incoming
from orchestrator.channels.feishu_events import Ignored, parse_message_event
from orchestrator.ids import is_valid_chat_id
from orchestrator.store import Store
from tests.fakes.anthropic import latest_user_blocks, text_of
from tests.harness import chat, run_cli

Scenario = Callable[[bool, random.Random], Result]


# ---- 1. kill -9 at random moments with turns in flight ----------------------------------------------------


def kill9(quick: bool, rng: random.Random) -> Result:
    rounds, chats = (3, 2) if quick else (20, 4)
    result = Result("kill9")
    with Rig("kill9", result, agent={"idle_timeout": 12}, scheduler={"queue_depth": 100}) as rig:
        ids = [chat() for _ in range(chats)]
        rig.start()
        in_flight = redelivered = 0
        for n in range(rounds):
            for i, chat_id in enumerate(ids):
                seconds, tag = round(rng.uniform(0, 3), 1), f"k9-{n}-{i}"
                if rng.random() < 0.25:  # a tool call: its first words are shown on a card before the answer
                    rig.say(chat_id, f"RUN_BASH: sleep {seconds}; echo {tag}", f"ran: {tag}")
                else:
                    rig.say(chat_id, f"SLOW {seconds} {tag}")
            time.sleep(rng.uniform(0, 3))
            in_flight += any(not rig.answered(s) for s in rig.sent)
            rig.kill()
            rig.start()
            redelivered += rig.redeliver_unacked()
        targeted, target_chat = [], chat()
        for label, prompt, expect, moment in KILL_MOMENTS:
            sent = rig.say(target_chat, prompt, expect)
            hit = wait_for(lambda sent=sent, moment=moment: moment(rig, sent), 30, 0.002)
            targeted.append(f"{label}: {'hit' if hit else 'missed'}")
            rig.kill()
            rig.start()
            redelivered += rig.redeliver_unacked()
        settled = rig.settle(timeout=120)
        rig.tally()
    result.notes.append(f"{rounds} kills at random moments, {in_flight} with turns in flight, and {len(targeted)} "
                        f"at chosen ones; {len(rig.sent)} messages over {chats + 1} chats; {redelivered} unacked "
                        f"events redelivered after restarts; settled: {settled}")
    result.notes.append("chosen moments: kill -9 when " + "; ".join(targeted))
    return result


def _running_not_started(rig: Rig, sent: Sent) -> bool:
    row = rig.row(sent)
    return bool(row and row["state"] == "running" and row["turn"]
                and not (rig.data / "chats" / sent.chat_id / "turns" / row["turn"] / "pid").exists())


def _card_shown(rig: Rig, sent: Sent) -> bool:
    row = rig.row(sent)
    return bool(row and row["state"] == "running" and rig.replies(sent))


def _answer_stored(rig: Rig, sent: Sent) -> bool:
    row = rig.row(sent)
    return bool(row and row["state"] == "answered")


KILL_MOMENTS: list[tuple[str, str, str | None, Callable[[Rig, Sent], bool]]] = [
    ("its turn is marked running, its process not yet started", "SLOW 1 k9-running-not-started", None,
     _running_not_started),
    ("its card shows the first words, the answer is not in yet", "RUN_BASH: sleep 2; echo k9-card-shown",
     "ran: k9-card-shown", _card_shown),
    ("its answer is stored, not yet delivered", "SLOW 1 k9-answer-stored", None, _answer_stored),
]


# ---- 2. every event delivered three times ----------------------------------------------------------------------


def duplicates(quick: bool, rng: random.Random) -> Result:
    chats, per_chat = (2, 3) if quick else (3, 10)
    result = Result("duplicates")
    with Rig("duplicates", result, scheduler={"queue_depth": 100}) as rig:
        ids = [chat() for _ in range(chats)]
        rig.start()
        messages = [rig.message(c, f"SLOW 1 dup-{n} in {c}" if n % 3 == 0 else f"dup-{n} in {c}")
                    for n in range(per_chat) for c in ids]
        schedule = sorted((n * 0.2 + rng.uniform(0, 1.0), k, sent) for n, sent in enumerate(messages)
                          for k in range(3))
        restart_at = None if quick else len(schedule) // 2
        began = time.monotonic()
        for index, (at, _, sent) in enumerate(schedule):
            if index == restart_at:  # some copies before the crash, the rest after it
                rig.kill()
                rig.start()
                rig.redeliver_unacked()
                began = time.monotonic() - at
            time.sleep(max(0.0, began + at - time.monotonic()))
            rig.push(sent)
        rig.settle(timeout=90)
        rig.tally()
        acks = Counter(a.code for a in rig.feishu.acks)
    restart = "" if quick else "; one kill -9 and restart half-way"
    result.notes.append(f"{len(messages)} messages x 3 copies within ~1 s of each other{restart}; acks {dict(acks)}")
    return result


# ---- 3. Feishu rate-limits 30 % of sends -------------------------------------------------------------------------


def ratelimit(quick: bool, rng: random.Random) -> Result:
    chats, notices, turn_chats, turns_each = (6, 8, 2, 1) if quick else (20, 24, 4, 5)
    per_chat, per_app = 5, 20
    result = Result("ratelimit")
    with Rig("ratelimit", result, feishu={"rate_per_chat": per_chat, "rate_per_app": per_app}) as rig:
        ids = [chat() for _ in range(chats)]
        rig.start()
        rig.feishu.rate_limit(0.3, reset_seconds=1, seed=rng.randrange(1000))
        turns = [rig.say(c, f"rl-turn-{n} in {c}") for n in range(turns_each) for c in ids[:turn_chats]]
        expected = {c: [f"rl-notice {n} in {c}" for n in range(notices)] for c in ids}
        for c in ids[:3]:  # as a script would, through the CLI ...
            if (done := run_cli(rig.config, "notify", "--chat", c, expected[c][0])).returncode:
                result.problems.append(f"orchestrator notify failed: {done.stderr.strip()}")
        store = Store(rig.data / "orchestrator.db")  # ... and the rest as `notify` does it, straight into the outbox
        try:
            for n in range(notices):
                for c in ids if n else ids[3:]:
                    store.say(c, expected[c][n])
            total = chats * notices + len(turns)

            def delivered() -> bool:
                return store.pending_outbox() == 0 and all(rig.row(s) for s in turns) and all(
                    rig.row(s)["state"] in ("delivered", "failed") for s in turns)  # type: ignore[index]

            began = time.monotonic()
            wait_for(delivered, timeout=total / 5 + 60, interval=0.5)
            took = time.monotonic() - began
            unsent = Counter(item.state for c in ids for item in store.outbox(c) if item.state != "sent")
        finally:
            store.close()
        for c in ids:
            shown = [m.text for m in rig.feishu.messages(c) if m.text.startswith("rl-notice")]
            result.trials += notices
            result.passed += sum(shown.count(text) == 1 for text in expected[c])
            result.lost += sum(text not in shown for text in expected[c])
            result.duplicated += sum(max(0, shown.count(text) - 1) for text in expected[c])
            if sorted(set(shown), key=shown.index) != [t for t in expected[c] if t in shown]:
                result.problems.append(f"chat {c}: notices out of order: {shown}")
        rig.tally(turns)
        writes = [call for call in rig.feishu.calls if call.write]
        rates = {"app": rig.feishu.max_rate(per="app"), "chat": rig.feishu.max_rate(per="chat"),
                 "card": rig.feishu.max_rate(per="card")}
        for per, limit in (("app", per_app), ("chat", per_chat), ("card", 10)):
            if rates[per] > limit:
                result.problems.append(f"{rates[per]} sends in one second per {per}, over the limit of {limit}")
        if unsent:
            result.problems.append(f"outbox items not sent: {dict(unsent)}")
    result.notes.append(f"{total} replies ({chats * notices} notices over {chats} chats, {len(turns)} turn answers) "
                        f"delivered in {took:.1f} s; {rig.feishu.rejected_count} of {len(writes)} write calls "
                        f"refused with 429/99991400")
    result.notes.append(f"densest second: app {rates['app']} (limit {per_app}), chat {rates['chat']} (limit "
                        f"{per_chat}), card {rates['card']} (limit 10)")
    return result


# ---- 4. malformed and random events ----------------------------------------------------------------------------


def malformed(quick: bool, rng: random.Random) -> Result:
    result = Result("malformed")
    parser_examples, wire_examples = (600, 40) if quick else (10_000, 300)
    _fuzz_parser(result, parser_examples, rng)
    _fuzz_wire(result, wire_examples, rng)
    return result


def _hypothesis(examples: int) -> settings:
    return settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck))


def _fuzz_parser(result: Result, examples: int, rng: random.Random) -> None:
    """(a) The pure parser: never raises; an Incoming with a valid chat id and storable text, or a reason."""
    outcomes: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    shown: dict[str, str] = {}

    @seed(rng.randrange(2**32))
    @_hypothesis(examples)
    @given(fuzz.events, st.booleans())
    def check(event: Any, require_mention: bool) -> None:
        try:
            parsed = parse_message_event(event, fuzz.BOT, lambda _: require_mention)
            problem = _parsed_problem(parsed)
        except Exception as exc:  # the property under test is that nothing is raised
            problem = f"raised {exc!r}"
        outcomes[problem or (f"incoming {parsed.kind}" if isinstance(parsed, Incoming) else "ignored")] += 1
        if problem:
            failures[problem] += 1
            shown.setdefault(problem, json.dumps(_short(event), ensure_ascii=True)[:400])

    began = time.monotonic()
    check()
    total = sum(outcomes.values())
    result.trials += total
    result.passed += total - failures.total()
    result.problems += [f"parser: {p} ({n} events), e.g. {shown[p]}" for p, n in failures.most_common()]
    kinds = ", ".join(f"{k} {v}" for k, v in outcomes.most_common(6))
    result.notes.append(f"parser: {total} generated events in {time.monotonic() - began:.0f} s: {kinds}")


def _short(value: Any) -> Any:
    """A generated value made readable in a report: long strings and lists cut short."""
    if isinstance(value, str):
        return value if len(value) <= 40 else f"{value[:30]}...({len(value)} chars)"
    if isinstance(value, list):
        return [_short(v) for v in value[:4]] + (["..."] if len(value) > 4 else [])
    if isinstance(value, dict):
        return {_short(k): _short(v) for k, v in value.items()}
    return value


def _parsed_problem(parsed: Incoming | Ignored) -> str:
    if isinstance(parsed, Ignored):
        return "" if isinstance(parsed.reason, str) and parsed.reason else "ignored without a reason"
    if not isinstance(parsed, Incoming):
        return f"returned {type(parsed).__name__}"
    if not is_valid_chat_id(parsed.chat_id) or not (isinstance(parsed.message_id, str) and parsed.message_id):
        return f"accepted chat id {parsed.chat_id!r} / message id {parsed.message_id!r}"
    try:
        parsed.text.encode()
    except UnicodeEncodeError:
        return "accepted a text that is not valid Unicode (a lone surrogate): the store cannot keep it"
    return ""


SDK_SHAPE_ERRORS = ("but was", "processor not found")  # lark-oapi refusing a shape before our handler runs


def _fuzz_wire(result: Result, examples: int, rng: random.Random) -> None:
    """(b) Random envelopes over the long connection to a running orchestrator: each frame acked, each one
    accounted for by a log line (ignored, received, duplicate, or refused by the SDK), the service alive."""
    with Rig("malformed", result) as rig:
        sinks = [chat() for _ in range(2)]  # where events that look valid are sent, so few containers start
        bot = rig.start()
        outcomes: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        failures: Counter[str] = Counter()
        shown: dict[str, str] = {}
        received: list[str] = []

        @seed(rng.randrange(2**32))
        @_hypothesis(examples)
        @given(fuzz.envelopes(rig.feishu))
        def push(envelope: dict[str, Any]) -> None:
            message = envelope.get("event", {}).get("message") if isinstance(envelope.get("event"), dict) else None
            if isinstance(message, dict) and is_valid_chat_id(message.get("chat_id")):
                message["chat_id"] = sinks[len(received) % len(sinks)]
            log_at, out_at = len(bot.log()), len(bot.stdout)
            frame = rig.feishu.push_event(envelope, parts=rng.choice([1, 1, 2]))  # Feishu splits big ones
            ack = wait_for(lambda: next((a for a in rig.feishu.acks if a.message_id == frame), None), 10)
            line = wait_for(lambda: _outcome(bot.log()[log_at:], bot.stdout[out_at:]), 2)
            kind, reason = line or ("silent", "no log line")
            outcomes[kind] += 1
            reasons[f"{kind}: {reason[:50]}"] += 1
            if kind == "received" and isinstance(message, dict):
                received.append(str(message.get("message_id")))
            if ack is None or kind in ("silent", "error") or (ack.code == 200) != (kind != "sdk-refused"):
                failure = f"ack {ack and ack.code}, {kind}: {reason[:120]}"
                failures[failure] += 1
                shown.setdefault(failure, json.dumps(_short(envelope.get("event")), ensure_ascii=True)[:400])
            else:
                result.passed += 1
            result.trials += 1

        push()
        result.problems += [f"long connection: {f} ({n} events), e.g. event {shown[f]}"
                            for f, n in failures.most_common()]

        def unsettled() -> list[str]:
            states = {m["message_id"]: m["state"] for c in sinks for m in rig.store.messages(c)}
            return [m for m in received if states.get(m) not in ("delivered", "failed")]

        wait_for(lambda: not unsettled(), 120, 0.5)
        left = unsettled()
        result.lost += len(left) + outcomes["error"]
        alive = bot.process.poll() is None
        probe = rig.say(chat(), "still there after the fuzz?") if alive else None
        answered = probe is not None and wait_for(lambda: rig.answered(probe), 60)
        if not (alive and answered):
            result.problems.append(f"after the fuzz: service alive {alive}, normal message answered {answered}")
    result.notes.append(f"long connection: {sum(outcomes.values())} random events: "
                        + ", ".join(f"{k} {v}" for k, v in outcomes.most_common()) + f"; {len(received)} accepted "
                        f"ones all answered or refused: {not left}")
    result.notes.append("most frequent reasons: " + "; ".join(f"{r} ({n})" for r, n in reasons.most_common(5)))
    if outcomes["sdk-refused"]:
        result.notes.append(f"weakness: {outcomes['sdk-refused']} event(s) refused inside lark-oapi (ack 500, an "
                            "ERROR line on stdout, no 'ignored:' line): Feishu redelivers what is not acked 200")


def _outcome(log: str, stdout: list[str]) -> tuple[str, str] | None:
    """What the orchestrator made of one frame, from the log lines it wrote meanwhile."""
    for line in log.splitlines():
        for marker, kind in (("ignored: ", "ignored"), ("received (", "received"), ("duplicate delivery", "duplicate"),
                             ("refused: ", "refused"), ("rejected: ", "rejected")):
            if marker in line:  # the reason, without the `key=value` extras after two spaces
                return kind, line.split(marker, 1)[1].split("  ")[0] if kind in ("ignored", "refused") else marker
    for line in stdout:
        if "handle message failed" in line:
            error = line.split("err: ", 1)[-1].split(" [conn_id=")[0]
            return ("sdk-refused" if any(e in error for e in SDK_SHAPE_ERRORS) else "error"), error
    return None


# ---- 5. hostile turns next to a bystander ------------------------------------------------------------------


HOGS = {  # name: (prompt, what its process is called while it runs, what the chat must be told at the end)
    "cpu hog": ("RUN_BASH: timeout {t} sh -c 'while :; do :; done & while :; do :; done'; echo cpu-hog-done",
                "timeout", ("ran: cpu-hog-done",)),
    "memory hog": ("RUN_BASH: for i in $(seq {n}); do head -c 2000m /dev/zero | tail; done; echo mem-hog-done",
                   "head", ("ran out of memory (its limit is 700 MiB)",)),
    "fork bomb": ("RUN_BASH: timeout -s KILL {t} sh -c 'b() {{ b | b & }}; b; sleep 600' 2>/dev/null; "
                  "echo fork-bomb-done",
                  "timeout", ("fork-bomb-done", "reached its limit of 80 processes")),
    "process leak": ("RUN_BASH: nohup sh -c 'sleep 1; for i in $(seq 200); do (sleep 3600 &); done' >/dev/null 2>&1 &"
                     " echo leak-started", "sleep 3600", ("leak-started", "reached its limit of 80 processes")),
}


def hostile_turns(quick: bool, rng: random.Random) -> Result:
    samples, seconds, rounds = (2, 6, 4) if quick else (5, 15, 10)
    result = Result("hostile_turns")
    hogs = {name: chat() for name in HOGS}
    groups = {hogs["cpu hog"]: {"cpus": 0.5}, hogs["memory hog"]: {"memory": "700m"},
              hogs["fork bomb"]: {"pids_limit": 80}, hogs["process leak"]: {"pids_limit": 80}}
    with Rig("hostile_turns", result, groups=groups) as rig:
        bystander = chat()
        rig.start()
        rig.say(bystander, "warm up")
        for chat_id in hogs.values():  # containers made before the measurement, so it shows the hogs alone
            rig.say(chat_id, "warm up")
        rig.settle(60)
        baseline = _latencies(rig, bystander, "baseline", samples)
        phases = [[name] for name in HOGS] if not quick else [list(HOGS)]  # quick: all three at once
        lines = [f"bystander median answer latency (n={samples}): before {baseline:.2f} s"]
        for phase in phases:
            hostile = {name: rig.say(hogs[name], HOGS[name][0].format(t=seconds, n=rounds), expect="")
                       for name in phase}
            for name in phase:
                wait_for(lambda name=name: any(HOGS[name][1] in p[-1] for p in _top(rig, hogs[name])), 60)
            during = _latencies(rig, bystander, "+".join(phase), samples)
            still = all(rig.row(sent)["state"] == "running" for sent in hostile.values())  # type: ignore[index]
            lines.append(f"during {' + '.join(phase)} {during:.2f} s ({during / baseline:.2f}x, "
                         f"{'hostile turns still running after the samples' if still else 'some ended before'})")
            for name, sent in hostile.items():
                wait_for(lambda sent=sent: rig.states().get(sent.message_id) in ("delivered", "failed"), 240, 0.5)
                told = "\n".join(m.text for m in rig.replies(sent))
                clear = next((text for text in HOGS[name][2] if text in told), "")
                if name == "process leak":  # what it left behind holds every process slot of the container
                    wait_for(lambda: len(_top(rig, hogs["process leak"])) >= 75, 60)
                after = rig.say(hogs[name], f"after the {name}")
                wait_for(lambda after=after: rig.replies(after) and rig.states().get(after.message_id)
                         in ("delivered", "failed"), 60)
                recovered = rig.answered(after)
                result.trials += 1
                result.passed += bool(clear) and recovered
                result.lost += not told
                if not recovered:
                    result.problems.append(f"{name}: the chat's next message was not answered but told "
                                           f"{[m.text[:150] for m in rig.replies(after)]}")
                lines.append(f"{name} told: {clear or (told.strip().splitlines() or ['nothing'])[-1][:110]!r}")
                if name == "fork bomb":
                    lines.append(f"fork bomb: forks refused by the pids cap: {_pids_refused(rig, hogs[name])}")
                if not clear:
                    result.problems.append(f"{name}: the chat was told {told[:200]!r}")
        bystanders = [s for s in rig.sent if s.chat_id == bystander]
        wait_for(lambda: all(rig.answered(s) for s in bystanders), 60)
        result.lost += sum(not rig.answered(s) for s in bystanders)
        result.problems += [f"bystander message {s.text!r} not answered" for s in bystanders if not rig.answered(s)]
    result.notes += [lines[0], "; ".join(lines[1:])]
    return result


def _latencies(rig: Rig, chat_id: str, label: str, samples: int) -> float:
    """Median seconds from the event to the answer in the chat, over `samples` messages one after another."""
    seconds = []
    for n in range(samples):
        sent = rig.say(chat_id, f"bystander {label} {n}")
        began = time.monotonic()
        if wait_for(lambda sent=sent: rig.answered(sent), 60, 0.02):
            seconds.append(time.monotonic() - began)
    return statistics.median(seconds) if seconds else float("inf")


def _pids_refused(rig: Rig, chat_id: str) -> str:
    """The pids cgroup's count of refused forks (cgroup v1 or v2), read in the chat's container."""
    container = rig.docker.containers.get(f"{rig.instance}-{chat_id}")
    for path in ("/sys/fs/cgroup/pids/pids.events", "/sys/fs/cgroup/pids.events"):
        found = container.exec_run(["cat", path])
        if found.exit_code == 0:
            return found.output.decode().split()[-1]
    return "unknown"


def _top(rig: Rig, chat_id: str) -> list[list[str]]:
    with contextlib.suppress(Exception):
        return rig.docker.containers.get(f"{rig.instance}-{chat_id}").top()["Processes"] or []
    return []


# ---- 6. hostile chat ids and texts -----------------------------------------------------------------------------


FLAGS = ("--resume=00000000-0000-0000-0000-000000000000", "--dangerously-skip-permissions", "-p", "--model=evil")


def hostile_input(quick: bool, rng: random.Random) -> Result:
    result = Result("hostile_input")
    marker = f"/tmp/pwned-{rng.randrange(10**9)}"
    with Rig("hostile_input", result) as rig:
        rig.start()
        _hostile_chat_ids(rig, result)
        _hostile_texts(rig, result, marker, quick)
        valid = {s.chat_id for s in rig.sent if is_valid_chat_id(s.chat_id)}
        labels = {c.labels["orchestrator.chat_id"] for c in rig.containers() if "orchestrator.role" not in c.labels}
        folders = {p.name for p in (rig.data / "chats").iterdir()}
        strays = [str(p.relative_to(rig.root)) for p in rig.root.rglob("*") if _stray(p.relative_to(rig.root), valid)]
        for what, found in (("containers", labels - valid), ("chat folders", folders - valid), ("files", strays)):
            if found:
                result.problems.append(f"{what} for invalid chat ids or outside a chat's folder: {sorted(found)[:5]}")
        if Path(marker).exists():
            result.problems.append(f"{marker} was created on the host: a text reached a shell")
        for container in (c for c in rig.containers() if c.status == "running"):
            listing = container.exec_run(["ls", "-a", "/tmp", "/workspace", "/home/agent"]).output.decode()
            if Path(marker).name in listing:
                result.problems.append(f"{marker} was created in {container.name}: a text reached a shell")
    result.notes.append(f"{len(labels)} container(s) and {len(folders)} chat folder(s), all for valid chat ids; "
                        f"{len(strays)} stray files")
    return result


def _stray(relative: Path, valid: set[str]) -> bool:
    """A path in the rig's folder that is none of: config, logs, the store, the instance's secret, the gateway's
    settings, the egress proxy's folder, a valid chat's folder, a valid chat's model socket folder."""
    parts = relative.parts
    if parts[0] != "data":
        return len(parts) > 1 or not parts[0].endswith((".log", ".yaml"))
    if len(parts) == 1:
        return False
    if parts[1] in ("chats", "run"):
        return len(parts) > 2 and parts[2] not in valid
    return not (parts[1].startswith("orchestrator.db") or parts[1] in ("secret", "gateway.json", "egress"))


def _hostile_chat_ids(rig: Rig, result: Result) -> None:
    """Over Feishu: ignored with a reason; through every CLI command and the config: refused, exit 2."""
    assert rig.bot is not None
    for chat_id in fuzz.HOSTILE_CHAT_IDS:
        log_at = len(rig.bot.log())
        frame = rig.feishu.push_event(rig.feishu.text_event(chat_id, "hello from a hostile chat id"))
        ack = wait_for(lambda frame=frame: next((a for a in rig.feishu.acks if a.message_id == frame), None), 10)
        logged = wait_for(lambda log_at=log_at: "ignored: malformed event: chat_id" in rig.bot.log()[log_at:], 2)
        codes = [_cli(rig, command, chat_id) for command in ("notify", "reset", "logs", "stop", "run", "group")]
        result.trials += 1
        if ack is not None and ack.code == 200 and logged and set(codes) == {2}:
            result.passed += 1
        else:
            result.problems.append(f"chat id {chat_id!r}: ack {ack and ack.code}, logged {logged}, CLI exit codes "
                                   f"{codes} (notify, reset, logs, stop, run --chat, groups key)")


def _cli(rig: Rig, command: str, chat_id: str) -> int:
    """The CLI in this process (fast): its exit code for a command naming `chat_id`."""
    config = str(rig.config)
    argv = {"notify": ["notify", "--config", config, "--chat", chat_id, "hi"], "run": ["run", "--config", config,
            "--chat", chat_id], "group": ["config", "check", "--config", str(rig.root / "hostile-group.yaml")]}
    if command == "group":
        raw = yaml.safe_load(rig.config.read_text())
        (rig.root / "hostile-group.yaml").write_text(yaml.safe_dump({**raw, "groups": {chat_id: {"cpus": 0.5}}}))
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            return cli.main(argv.get(command, [command, "--config", config, chat_id]))
        except SystemExit as exc:  # argparse refuses some before we do (an empty or flag-like argument)
            return 2 if exc.code == 2 else -1


def _hostile_texts(rig: Rig, result: Result, marker: str, quick: bool) -> None:
    """In a valid chat: each text reaches the model as exactly that prompt, the session is resumed as usual."""
    chat_id = chat()
    first = rig.say(chat_id, "remember the first message")
    wait_for(lambda: rig.answered(first), 60)
    session = rig.store.chat(chat_id)["session_id"]
    texts = [t.replace("/tmp/pwned", marker) for t in fuzz.HOSTILE_TEXTS] + [" ".join(FLAGS), "A" * 100_000]
    if quick:
        texts = texts[:3] + texts[5:8] + texts[-2:]
    for text in texts:
        sent = rig.say(chat_id, text, expect=f"Fake answer to: {text}"[:200])
        answered = wait_for(lambda sent=sent: rig.answered(sent), 60)
        request = next((body for body in reversed(rig.api.requests) if _prompt(body) == text), None)
        resumed = request is not None and "remember the first message" in json.dumps(request["messages"])
        result.trials += 1
        if answered and request and resumed and rig.store.chat(chat_id)["session_id"] == session:
            result.passed += 1
        else:
            result.lost += not answered
            result.problems.append(f"text {text[:60]!r}: answered {bool(answered)}, exact prompt {request is not None},"
                                   f" session resumed {resumed}")
    _argv_while_running(rig, result, chat_id, marker)
    _lone_surrogate(rig, result, chat_id)


def _prompt(body: dict[str, Any]) -> str:
    return text_of(latest_user_blocks(body)).strip()


def _argv_while_running(rig: Rig, result: Result, chat_id: str, marker: str) -> None:
    """While a turn whose text is all flags runs, no process in the container has one of them in its argv."""
    text = f"SLOW 3 {' '.join(FLAGS)} $(touch {marker})"
    sent = rig.say(chat_id, text)
    processes = wait_for(lambda: [p[-1] for p in _top(rig, chat_id) if "claude" in p[-1]], 30)
    leaked = [p for p in processes if any(flag in p for flag in (*FLAGS, "pwned") if flag != "-p")]  # -p is ours
    answered = wait_for(lambda: rig.answered(sent), 60)
    result.trials += 1
    if processes and not leaked and answered:
        result.passed += 1
        result.notes.append(f"argv of the CLI while a flag-only text ran: {processes[0][:300]}")
    else:
        result.problems.append(f"flags in argv: processes {processes}, leaked {leaked}, answered {bool(answered)}")


def _lone_surrogate(rig: Rig, result: Result, chat_id: str) -> None:
    """A text that is valid JSON but not valid Unicode (a lone UTF-16 surrogate): answered or told, not dropped."""
    event = rig.feishu.text_event(chat_id, "placeholder")
    event["event"]["message"]["content"] = '{"text": "lone \\ud83d surrogate"}'
    sent = Sent(chat_id, "lone surrogate", "", event)
    rig.push(sent)
    told = wait_for(lambda: rig.replies(sent), 15)
    acks = [a.code for a in rig.feishu.acks if a.message_id in rig.frames[sent.message_id]]
    result.trials += 1
    if told:
        result.passed += 1
    else:
        result.lost += 1
        result.problems.append(f"a text with a lone surrogate (\\ud83d) was never answered nor refused: ack {acks}, "
                               f"stored {sent.message_id in rig.states()}")


# ---- the command ---------------------------------------------------------------------------------------------


SCENARIOS: dict[str, Scenario] = {"kill9": kill9, "duplicates": duplicates, "ratelimit": ratelimit,
                                  "malformed": malformed, "hostile_turns": hostile_turns,
                                  "hostile_input": hostile_input, "webhook_attacks": webhook.webhook_attacks,
                                  "store_locked": resilience.store_locked, "planted_links": boundary.planted_links,
                                  "output_flood": boundary.output_flood, "disk_budget": boundary.disk_budget,
                                  "neighbours": boundary.neighbours, "approvals": approvals.approvals,
                                  "files_out": files.files_out, "failover": failover.failover}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every scenario shrunk to seconds (CI)")
    parser.add_argument("--only", choices=SCENARIOS, action="append", help="run only this scenario (repeatable)")
    parser.add_argument("--seed", type=int, default=6, help="seed of the random moments and delays (default 6)")
    args = parser.parse_args(argv)
    failed = False
    began = time.monotonic()
    for name in args.only or SCENARIOS:
        start = time.monotonic()
        try:
            result = SCENARIOS[name](args.quick, random.Random(args.seed))
        except Exception as exc:  # one broken scenario must not hide the others' results
            result = Result(name, problems=[f"the scenario itself failed: {exc!r}"])
        result.notes.append(f"took {time.monotonic() - start:.0f} s")
        print(result.report(), flush=True)
        failed |= not result.ok
    print(f"fault suite{' (quick)' if args.quick else ''}: {time.monotonic() - began:.0f} s, "
          f"{'FAILED' if failed else 'nothing lost or duplicated'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
