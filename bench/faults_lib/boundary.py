"""The container is a boundary (issue 9), trial after trial: a hostile agent, running shell commands in its own
chat's container through the fake model's tool calls, plants links and folders for the root orchestrator to
follow, writes gigabytes without a newline, fills its disk, and knocks on its neighbours' containers, while a
bystander chat is answered. The attacks, and the helpers that stage and judge them, are the acceptance tests'
(tests/attacks.py).

A message is lost when it gets no reply (for a message that must be answered: no reply with its answer), and
duplicated when its answer comes twice; a trial passes when every check of it held.
"""

from __future__ import annotations

import contextlib
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from bench.faults_lib.rig import Result, Rig, Sent, wait_for
from bench.faults_lib.webhook import RSS_BOUND, percentile
from orchestrator import runtime
from tests import attacks
from tests.harness import chat

SECRET_ENV = "ORCHESTRATOR_FAULTS_SECRET"
MIB = attacks.MIB


# ---- shared by the scenarios ---------------------------------------------------------------------------------


def _ask(rig: Rig, chat_id: str, label: str, timeout: float = 90) -> tuple[Sent, float | None]:
    """A plain question to a chat: the message, and the seconds until its answer was in the chat (None when it
    was not answered within `timeout`)."""
    sent = rig.say(chat_id, f"{label} {uuid.uuid4().hex[:6]}")
    began = time.monotonic()
    answered = wait_for(lambda: rig.answered(sent), timeout, 0.02)
    return sent, (time.monotonic() - began if answered else None)


def _finished(rig: Rig, sent: Sent) -> bool:
    """Answered, and its turn delivered or failed: what the chat shows of it is final (a card streams)."""
    return rig.answered(sent) and rig.states().get(sent.message_id) in ("delivered", "failed")


def _warm(rig: Rig, ids: Iterable[str], timeout: float = 180) -> bool:
    """One question to each chat at once (each starts its container); whether all were answered."""
    sent = [rig.say(c, f"warm up {uuid.uuid4().hex[:6]}") for c in ids]
    return bool(wait_for(lambda: all(rig.answered(s) for s in sent), timeout, 0.1))


def _judge(rig: Rig, result: Result, sent: Iterable[Sent]) -> None:
    """Count each message lost (no reply with `expect` in it; "" expects any reply) or duplicated (two of them)."""
    for s in sent:
        replies = rig.replies(s)
        hits = sum(s.expect in m.text for m in replies) if s.expect else min(len(replies), 1)
        if hits == 0:
            result.lost += 1
            result.problems.append(f"{s.text[:60]!r} in {s.chat_id}: no reply with {s.expect[:40]!r}; replies "
                                   f"{[m.text[:80] for m in replies]}")
        elif hits > 1:
            result.duplicated += 1
            result.problems.append(f"{s.text[:60]!r} in {s.chat_id}: answered {hits} times")


def _trial(result: Result, label: str, failed: list[str]) -> None:
    result.trials += 1
    result.passed += not failed
    result.problems += [f"{label}: {problem}" for problem in failed]


def _seconds(values: list[float]) -> str:
    if not values:
        return "no samples"
    return f"p50 {percentile(values, 0.5):.2f} s, p95 {percentile(values, 0.95):.2f} s (n={len(values)})"


def _processes(rig: Rig, chat_id: str) -> list[str]:
    """The command lines running in a chat's container (none when it is not running)."""
    with contextlib.suppress(Exception):
        return [p[-1] for p in rig.docker.containers.get(f"{rig.instance}-{chat_id}").top()["Processes"] or []]
    return []


# ---- 1. links, folders and FIFOs planted for the root orchestrator ----------------------------------------------


def planted_links(quick: bool, rng: random.Random) -> Result:
    trials, seconds, samples = (1, 10, 3) if quick else (4, 30, 5)
    result = Result("planted_links")
    secret = f"SECRET-{uuid.uuid4().hex}"
    with Rig("planted_links", result, agent={"idle_timeout": 15}, limits={"disk_check_interval": 2}) as rig:
        bot = rig.start(env={SECRET_ENV: secret})
        attacker, bystander = chat(), chat()
        marker = f"bystander-{uuid.uuid4().hex[:8]}"
        first = rig.say(bystander, f"RUN_BASH: echo {marker}", f"ran: {marker}")  # a transcript to aim at
        _warm(rig, [attacker])
        wait_for(lambda: rig.answered(first), 90)
        [bystander_turn] = [p for p in (rig.data / "chats" / bystander / "turns").iterdir() if p.is_dir()]
        canaries = attacks.plant_canaries(rig.root / "host")
        pth = attacks.evil_pth()
        targets = attacks.link_targets(canaries, pth, rig.data, bystander, bystander_turn)
        script = attacks.in_workspace(rig.data, attacker, "plant.sh", attacks.PLANTER)
        attack = _Planting(rig, result, attacker, bystander, secret, marker, pth)
        try:
            for n in range(trials):
                attack.trial(n, script, [str(seconds), *targets], samples)
        finally:
            pth.unlink(missing_ok=True)
        rig.settle(timeout=180)  # the attacker's own messages of the attack: each answered or told why not
        _judge(rig, result, rig.sent)
        states = rig.states()
        outcomes = Counter(states.get(s.message_id) for s in attack.attacking)
        why = Counter(rig.replies(s)[-1].text[:100] for s in attack.attacking
                      if states.get(s.message_id) == "failed" and rig.replies(s))
        refused = bot.log().count("its output is refused")
    result.notes.append(f"{trials} trial(s) of {seconds} s: links to {len(targets)} targets (canaries, a new .pth in "
                        f"site-packages, /proc/*/environ, the store, the bystander's transcript and folders), "
                        f"folders under the next 40 old-style turn names, FIFOs, files swapped for links every 50 ms")
    result.notes.append(f"bystander answer latency: before {_seconds(attack.before)}; during the attack "
                        f"{_seconds(attack.during)}")
    result.notes.append(f"attacker answered again after the planting in {_seconds(attack.after)}; its messages "
                        f"during it: {dict(outcomes)}{f', failed with {dict(why)}' if why else ''}; turn outputs "
                        f"refused by the orchestrator (a link or not the agent's file): {refused}")
    return result


class _Planting:
    """One chat plants links while the bystander is asked; the checks of each trial."""

    def __init__(self, rig: Rig, result: Result, attacker: str, bystander: str, secret: str, marker: str,
                 pth: Path) -> None:
        self.rig, self.result = rig, result
        self.attacker, self.bystander, self.secret, self.marker, self.pth = attacker, bystander, secret, marker, pth
        self.before: list[float] = []
        self.during: list[float] = []
        self.after: list[float] = []
        self.attacking: list[Sent] = []  # the attacker's messages while it plants: answered or told, never lost

    def trial(self, n: int, script: str, args: list[str], samples: int) -> None:
        rig, data = self.rig, self.rig.data
        host = attacks.snapshot(rig.root, skip=data)
        owners = {p: p.stat().st_uid for p in (data / "orchestrator.db", data / "chats" / self.bystander / "turns")}
        before = [_ask(rig, self.bystander, f"before planting {n}") for _ in range(samples)]
        finished = data / "chats" / self.attacker / "workspace" / "planter-finished"
        finished.unlink(missing_ok=True)
        self.attacking.append(rig.say(self.attacker, attacks.background(script, *args), expect=""))
        failed = [] if wait_for(lambda: any("plant.sh" in p for p in _processes(rig, self.attacker)), 60) else [
            "the planter never ran"]
        during = []
        while any("plant.sh" in p for p in _processes(rig, self.attacker)):
            during.append(_ask(rig, self.bystander, f"while planting {n}", timeout=60))
            if len(during) % 3 == 1:  # and the attacker reads what it planted, hoping for the host's files
                self.attacking.append(rig.say(self.attacker, f"RUN_BASH: cat /turns/*/stderr 2>&1 | head -c 300; "
                                                             f"echo {uuid.uuid4().hex[:6]}", expect=""))
        wait_for(finished.exists, 60)
        after = _ask(rig, self.attacker, f"after planting {n}", timeout=180)
        self.before += [s for _, s in before if s is not None]
        self.during += [s for _, s in during if s is not None]
        self.after += [after[1]] if after[1] is not None else []
        failed += self._harm(host, owners)
        failed += [f"bystander message {sent.text!r} not answered" for sent, s in before + during if s is None]
        failed += [] if after[1] is not None else ["the attacker was not answered after the planting"]
        _trial(self.result, f"planting trial {n}", failed)

    def _harm(self, host: attacks.Snapshot, owners: dict[Path, int]) -> list[str]:
        """What reached the host, a secret or the other chat: nothing, when the boundary holds."""
        rig, harm = self.rig, []
        now = attacks.snapshot(rig.root, skip=rig.data)
        changed = sorted(p for p in host.keys() | now.keys() if host.get(p) != now.get(p))
        harm += [f"host files outside the chats' folders written, created or chowned: {changed[:5]}"] if changed else []
        harm += [f"{self.pth} was created"] if self.pth.exists() else []
        harm += [f"{p} now owned by uid {p.stat().st_uid}" for p, uid in owners.items() if p.stat().st_uid != uid]
        leaked = attacks.leaks(attacks.all_chat_text(rig.feishu), self.secret, rig.feishu.app_secret)
        harm += [f"reached a chat: {[s[:12] + '...' for s in leaked]}"] if leaked else []
        attacker_text = "\n".join(m.text for m in rig.feishu.messages(self.attacker))
        harm += ["the bystander's transcript reached the attacker's chat"] if self.marker in attacker_text else []
        return harm


# ---- 2. gigabytes without a newline ---------------------------------------------------------------------------


FLOOD_TOLD = "more than 64.0 MiB of output"
CUT_NOTE = "The answer was cut here"
MESSAGE_CAP = 8000  # characters of one chat message: a longer answer is split


def output_flood(quick: bool, rng: random.Random) -> Result:
    trials = 1 if quick else 3
    answer_cap = 200_000
    result = Result("output_flood")
    peaks: list[int] = []  # the orchestrator's VmHWM per trial, and its RSS before it
    baselines: list[int] = []
    forged_sizes: list[int] = []  # bytes of the forged answer that reached the chat
    stopped: list[float] = []  # seconds from the flood's message to the chat being told it was stopped
    latency: list[float] = []  # the bystander's answers during and after the floods
    # The capped answer goes as messages (its size is what is checked), not as a file.
    with Rig("output_flood", result, defaults={"disk": "20g"}, limits={"answer_bytes": answer_cap},
             files={"answer_as_file_bytes": 0}) as rig:
        bot = rig.start()
        bystander = chat()
        _warm(rig, [bystander])
        for n in range(trials):
            attacker = chat()  # a new chat each trial: what a flood leaves running cannot blur the next one
            _warm(rig, [attacker])
            _reset_peak(bot.process.pid)
            baselines.append(attacks.peak_rss(bot.process.pid))
            flood = attacks.in_workspace(rig.data, attacker, "flood.sh", attacks.FLOODER)
            flooding = rig.say(attacker, f"RUN_BASH: bash {flood}; head -c 1G /dev/zero | tr '\\0' q", FLOOD_TOLD)
            began, asked = time.monotonic(), []
            while not rig.answered(flooding) and time.monotonic() - began < 240:  # the bystander, meanwhile
                asked.append(_ask(rig, bystander, f"during the flood {n}"))
            told = wait_for(lambda flooding=flooding: rig.answered(flooding), 240 - (time.monotonic() - began))
            stopped += [time.monotonic() - began] if told else []
            forge = attacks.in_workspace(rig.data, attacker, "forge.js", attacks.FORGER)
            forged = rig.say(attacker, f"RUN_BASH: node {forge}", CUT_NOTE)
            asked.append(_ask(rig, bystander, f"during the forgery {n}"))
            wait_for(lambda forged=forged: _finished(rig, forged), 240)
            asked.append(_ask(rig, bystander, f"after the flood {n}"))
            peak = attacks.peak_rss(bot.process.pid)
            peaks.append(peak)
            answer = len("".join(m.text for m in rig.replies(forged)).encode())
            forged_sizes.append(answer)
            failed = [] if told else [f"the flood was not stopped with {FLOOD_TOLD!r}"]
            failed += [] if peak < RSS_BOUND else [f"peak RSS {peak / MIB:.0f} MiB, over {RSS_BOUND / MIB:.0f} MiB"]
            failed += [] if answer_cap < answer < answer_cap + 1000 else [
                f"the forged answer reached the chat with {answer} bytes (cap {answer_cap})"]
            failed += [f"bystander message {s.text!r} not answered" for s, seconds in asked if seconds is None]
            latency += [seconds for _, seconds in asked if seconds is not None]
            _trial(result, f"flood trial {n}", failed)
        longest = max(len(m.text) for m in rig.feishu.messages())
        log = bot.log()
        widest = max(len(line) for line in log.splitlines())
        if longest > MESSAGE_CAP:
            result.problems.append(f"a chat message of {longest} characters (over {MESSAGE_CAP})")
        if widest >= 2000 or "output line(s) over" not in log:
            result.problems.append(f"log lines up to {widest} characters; over-long lines noted: "
                                   f"{'output line(s) over' in log}")
        _judge(rig, result, rig.sent)
    result.notes.append(f"{trials} trial(s), each in a new chat: 1 GiB without a newline into the turn's output and "
                        f"stderr, 256 MiB into the workspace, 1 GiB printed by the tool; then 60 forged answer lines "
                        f"of 100 kB (answer cap {answer_cap:,} bytes)")
    result.notes.append(f"orchestrator peak RSS per trial (VmHWM, reset before each): "
                        f"{', '.join(f'{p / MIB:.0f}' for p in peaks)} MiB, max {max(peaks, default=0) / MIB:.0f} "
                        f"MiB (bound {RSS_BOUND / MIB:.0f} MiB); RSS before each trial "
                        f"{', '.join(f'{p / MIB:.0f}' for p in baselines)} MiB")
    result.notes.append(f"flood stopped and told in {_seconds(stopped)}; forged answers reached the chat with "
                        f"{', '.join(map(str, forged_sizes))} bytes; longest chat message {longest} characters, "
                        f"longest log line {widest}; bystander answered during and after in {_seconds(latency)}")
    return result


def _reset_peak(pid: int) -> None:
    """Set the process's VmHWM back to its current RSS (Linux >= 4.0, as root), so a trial shows its own peak."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


# ---- 3. the disk budget, and a full disk ------------------------------------------------------------------------


BUDGET = 100 * MIB
BUDGET_TOLD = "over its disk budget of 100.0 MiB"
REFUSED = "No answer can start"
NEARLY_FULL = "disk is nearly full"


def disk_budget(quick: bool, rng: random.Random) -> Result:
    trials, cycles = (2, 1) if quick else (6, 3)
    result = Result("disk_budget")
    overshoot = _budget_trials(result, trials)
    recovery, told, acks = _full_disk_trials(result, cycles)
    result.notes.append(f"{trials} fill(s) of a workspace with a budget of {BUDGET / MIB:.0f} MiB (30 MiB every 0.5 s, "
                        f"up to 600 MiB; measured every 1 s): written past the budget p50 "
                        f"{percentile(overshoot, 0.5) / MIB:.0f} MiB, max {max(overshoot, default=0) / MIB:.0f} MiB")
    result.notes.append(f"full disk (data_dir on a 96 MiB tmpfs, limits.min_free_disk 24 MiB), {cycles} cycle(s): "
                        f"nearly full told {told!r}; full: acks {dict(acks)}; answered {_seconds(recovery)} after "
                        f"space was back")
    return result


def _budget_trials(result: Result, trials: int) -> list[int]:
    """A chat fills its workspace past its budget, trial after trial: stopped and told, refused while over,
    answered once an operator has freed the space. Returns the bytes written past the budget, per trial."""
    overshoot: list[int] = []
    with Rig("disk_budget", result, defaults={"disk": f"{BUDGET // MIB}m"}, limits={"disk_check_interval": 1}) as rig:
        rig.start()
        attacker, bystander = chat(), chat()
        _warm(rig, [attacker, bystander])
        folder = rig.data / "chats" / attacker
        script = attacks.in_workspace(rig.data, attacker, "fill.sh", attacks.FILLER)
        for n in range(trials):
            filling = rig.say(attacker, f"RUN_BASH: bash {script} # trial {n}", BUDGET_TOLD)
            told = wait_for(lambda filling=filling: rig.answered(filling), 120)
            over = attacks.used(folder) - BUDGET
            overshoot += [over] if told else []
            status = rig.docker.containers.get(f"{rig.instance}-{attacker}").status
            bystander_asked = _ask(rig, bystander, f"while {n} is over budget")
            refused = rig.say(attacker, f"one more please {n}", REFUSED)
            wait_for(lambda refused=refused: rig.answered(refused), 60)
            for path in (folder / "workspace").glob("fill-*"):  # an operator frees space
                path.unlink()
            after = _ask(rig, attacker, f"after freeing {n}", timeout=120)
            failed = [] if told else [f"not stopped with {BUDGET_TOLD!r}"]
            failed += [] if over < 200 * MIB else [f"{over / MIB:.0f} MiB written past the budget"]
            failed += [] if status != "running" else ["its container (and its writers) still running"]
            failed += [] if rig.answered(refused) else ["a message while over budget was not refused"]
            failed += [] if bystander_asked[1] is not None else ["the bystander was not answered"]
            failed += [] if after[1] is not None else ["not answered after the space was freed"]
            _trial(result, f"budget trial {n}", failed)
        _judge(rig, result, rig.sent)
    return overshoot


def _full_disk_trials(result: Result, cycles: int) -> tuple[list[float], str, Counter[int]]:
    """data_dir on a small tmpfs, nearly filled, then filled, then freed, `cycles` times: a clear refusal near
    full, no ack when full (Feishu delivers it again), answered once space is back, the service alive."""
    recovery: list[float] = []  # seconds from space being back to the answer
    told, acks = "", Counter[int]()
    with Rig("disk_full", result, limits={"min_free_disk": "24m"}, defaults={"disk": "16m"}) as rig, \
            attacks.tmpfs(rig.data, "96m"):
        bot = rig.start()
        first = chat()
        _warm(rig, [first])
        for n in range(cycles):
            filler = attacks.fill(rig.data, leave=12 * MIB)  # under the floor, with room left for the store
            nearly = rig.say(first, f"while the disk is nearly full {n}", NEARLY_FULL)
            wait_for(lambda nearly=nearly: rig.answered(nearly), 60)
            told = next((m.text for m in rig.replies(nearly)), "")
            attacks.fill(rig.data, leave=0)  # full: not even the store can write
            full = rig.message(first, f"while the disk is full {n}")
            frame = rig.push(full)
            ack = wait_for(lambda frame=frame: next((a for a in rig.feishu.acks if a.message_id == frame), None), 10)
            acks[ack.code if ack else 0] += 1
            alive = bot.process.poll() is None
            filler.unlink()  # space is back
            began = time.monotonic()
            rig.push(full)  # Feishu's redelivery
            answered = wait_for(lambda full=full: rig.answered(full), 120)
            recovery += [time.monotonic() - began] if answered else []
            after = _ask(rig, first, f"after the full disk {n}")
            failed = [] if rig.answered(nearly) else [f"nearly full: told {told!r}"]
            failed += [] if ack is not None and ack.code != 200 else [f"full: acked {ack and ack.code}"]
            failed += [] if answered and after[1] is not None else ["not answered after space was back"]
            failed += [] if alive and bot.process.poll() is None else ["the service died"]
            _trial(result, f"full-disk cycle {n}", failed)
        if "refusing a turn" not in bot.log():
            result.problems.append("the refusal for a nearly full disk was not logged")
        _judge(rig, result, rig.sent)
        bot.stop()  # before the tmpfs under its data_dir goes
    return recovery, told[:120], acks


# ---- 4. neighbours on the instance network ---------------------------------------------------------------------


PROBE_LINE = re.compile(r"(\d+\.\d+\.\d+\.\d+) (\S+) (\d+)ms$", re.MULTILINE)


def neighbours(quick: bool, rng: random.Random) -> Result:
    chats, trials = (3, 2) if quick else (4, 8)
    result = Result("neighbours")
    took: list[float] = []
    outcomes: Counter[str] = Counter()
    with Rig("neighbours", result) as rig:
        rig.start()
        ids = [chat() for _ in range(chats)]
        _warm(rig, ids)
        for n in range(trials):
            attacker = ids[n % chats]
            failed = _ensure_running(rig, ids)
            port = rng.randrange(20_000, 30_000)
            addresses = {c: _listen(rig, c, port, failed) for c in ids}  # the attacker's own: the probe works
            probes = " ".join(f"( {_timed(address, port)} ) &" for address in addresses.values())
            sent = rig.say(attacker, f"RUN_BASH: {probes} wait", "ran:")
            wait_for(lambda sent=sent: _finished(rig, sent), 90)
            reply = "\n".join(m.text for m in rig.replies(sent))
            seen = {address: (what, int(ms)) for address, what, ms in PROBE_LINE.findall(reply)}
            for chat_id, address in addresses.items():
                what, ms = seen.get(address, (f"no result in {reply[-300:]!r}", 0))
                if chat_id == attacker:
                    failed += [] if what == attacks.NEIGHBOUR_REPLY else [
                        f"the attacker's probe of its own listener got {what!r}: the probe itself does not work"]
                    continue
                outcomes[what] += 1
                took.append(ms / 1000)
                failed += [] if what.startswith("unreachable-") else [f"{address}:{port} answered {what!r}"]
            after = _ask(rig, attacker, f"after knocking {n}")
            failed += [] if after[1] is not None else ["the attacker was not answered after knocking"]
            _trial(result, f"neighbours trial {n}", failed)
        _judge(rig, result, rig.sent)
    result.notes.append(f"{trials} trial(s) over {chats} chats on the instance's network: one chat connects to a "
                        f"listener the scenario started in each other chat's container (each answering on its network "
                        f"address from inside its own container, and the attacker's own listener answering its probe)")
    result.notes.append(f"{len(took)} connections: {dict(outcomes)}; each failed after {_seconds(took)}")
    return result


def _ensure_running(rig: Rig, ids: list[str]) -> list[str]:
    """Every chat's container running (asked again if it was stopped meanwhile); what went wrong."""
    stopped = [c for c in ids if not _processes(rig, c)]
    return [] if not stopped or _warm(rig, stopped) else [f"chats {stopped} not answered"]


def _listen(rig: Rig, chat_id: str, port: int, failed: list[str]) -> str:
    """A listener in the chat's container; its address on the instance network, where it must answer from
    inside the same container (so a failure to reach it from elsewhere is the network's doing)."""
    container = rig.docker.containers.get(f"{rig.instance}-{chat_id}")
    attacks.listen(container, port)
    address = container.attrs["NetworkSettings"]["Networks"][runtime.network_name(rig.instance)]["IPAddress"]
    there = container.exec_run(["socat", "-T", "2", "-", f"TCP:{address}:{port}"]).output
    if attacks.NEIGHBOUR_REPLY.encode() not in there:
        failed.append(f"the listener in {chat_id} did not answer on {address}:{port} in its own container")
    return address


def _timed(address: str, port: int) -> str:
    """A shell line: the probe's outcome, as `<address> <what answered> <milliseconds>ms`."""
    return (f"s=$(date +%s%N); r=$({{ {attacks.probe(address, port)}; }} 2>/dev/null | tr -d '\\n'); "
            f"echo \"{address} ${{r:-nothing}} $(( ($(date +%s%N) - s) / 1000000 ))ms\"")
