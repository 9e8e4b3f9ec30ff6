"""The webhook under attack (issue 9): forged, unsigned, stale, replayed and badly padded events, bodies that
are too large, of a negative or missing length, floods, and slow clients, all at once, with real signed
events in between. Every attack must be refused (and none reach the chat it names), every real event acked
within Feishu's 3 s and answered exactly once, with the orchestrator's threads and memory bounded.

Clients bind a loopback source address of their own: real events come from FEISHU_ADDRESS, the attacker
from a fresh address per connection (a distributed attacker: the per-client cap never binds and the global
cap, deadlines and checks are what is tested) or from one address (against the per-client cap).

The attack clients and the /proc sampler are shared with tests/acceptance/test_webhook_security.py.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import random
import re
import select
import socket
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.faults_lib.rig import Result, Rig
from tests.fakes.feishu import VERIFICATION_TOKEN, FakeFeishu, encrypt_body, signature_headers, webhook_request
from tests.harness import Orchestrator, chat, free_port

Json = dict[str, Any]
ENCRYPT_KEY = "faults-encrypt-key"
PATH = "/feishu/events"
ACK_LIMIT = 3.0  # Feishu pushes an event again when it is not answered 200 within 3 s
FLOOD_BYTES = 64 * 1024**2  # what a flood claims and tries to send
RSS_BOUND = 300 * 1024**2  # the target for the orchestrator's peak resident memory
# The service's own pools (Feishu calls 8, asyncio's default 6, webhook workers 4) stay under it; a thread per
# connection would pass it with the 50 slow clients alone.
THREAD_BOUND = 40
REFUSAL = 401
FEISHU_ADDRESS = "127.0.0.2"  # where real events come from; Linux answers the whole of 127.0.0.0/8 on loopback
_FRESH = itertools.count()  # the attacker's next fresh address, in 127.1.0.0/16
# kind → the statuses that mean "refused as it should be" (0: the server hung up without a word)
EXPECTED = {"forged": {REFUSAL}, "unsigned": {REFUSAL}, "stale": {REFUSAL}, "bad padding": {REFUSAL},
            "replayed": {REFUSAL}, "oversized": {413}, "negative length": {400}, "no length": {411},
            "not a number": {400}, "flood": {413, 0}, "slowloris": {408}}


def webhook_config(port: int, **overrides: Any) -> Json:
    """The feishu block (beside the fake's credentials) of a config for webhook mode on 127.0.0.1:`port`."""
    return {"mode": "webhook", "encrypt_key": ENCRYPT_KEY, "verification_token": VERIFICATION_TOKEN,
            "webhook_port": port, "webhook_path": PATH, **overrides}


@dataclass(frozen=True)
class Answer:
    status: int  # 0: no answer (the server hung up)
    body: bytes
    seconds: float  # from connecting to the answer or the hang-up
    sent: int  # bytes of the request that went out


def raw_request(body: bytes, headers: dict[str, str], length: str | None = None, path: str = PATH) -> bytes:
    """An HTTP/1.1 POST; `length` overrides Content-Length ("" leaves it out)."""
    length = str(len(body)) if length is None else length
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    lines += [f"Content-Length: {length}"] if length else []
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


def fresh_address() -> str:
    """A loopback address no connection has come from yet (65,000 of them)."""
    n = next(_FRESH)
    return f"127.1.{n // 254 % 256}.{n % 254 + 1}"


def exchange(port: int, data: bytes, *, source: str = "127.0.0.1", trickle: float = 0.0, stream: int = 0,
             timeout: float = 60.0) -> Answer:
    """Send `data` from `source` (one byte per `trickle` seconds, or followed by `stream` bytes of body in 64 KiB
    pieces) and read the answer. Whatever the server does (answer, hang up, reset) ends it; nothing is raised."""
    began, sent = time.monotonic(), 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as sock:
        try:
            if trickle:
                for byte in data:
                    if select.select([sock], [], [], trickle)[0]:  # an answer, or the server hung up
                        break
                    sent += sock.send(bytes([byte]))
            else:
                sock.sendall(data)
                sent = len(data)
                piece = b"x" * 65536
                while sent - len(data) < stream and not select.select([sock], [], [], 0)[0]:
                    sent += sock.send(piece)
        except OSError:
            pass
        status, body = _read_answer(sock)
    return Answer(status, body, time.monotonic() - began, sent)


def _read_answer(sock: socket.socket) -> tuple[int, bytes]:
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except OSError:
        pass
    found = re.match(rb"HTTP/1\.[01] (\d{3}) ", received)
    return (int(found.group(1)), received.partition(b"\r\n\r\n")[2]) if found else (0, b"")


@dataclass
class Attacker:
    """Sends the attack mix at one webhook and keeps every answer by kind. Attacks carry events for `victim`,
    a chat that must never see one of them; they come from `source`, or from a fresh address each when None."""

    port: int
    feishu: FakeFeishu
    victim: str
    source: str | None = None
    max_body: int = 1024**2
    outcomes: dict[str, list[Answer]] = field(default_factory=lambda: defaultdict(list))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def post(self, event: Json) -> tuple[bytes, Answer]:
        """A real delivery, signed and encrypted as Feishu does it: the raw request (to replay) and its answer."""
        request = raw_request(*webhook_request(event, ENCRYPT_KEY))
        return request, exchange(self.port, request, source=FEISHU_ADDRESS)

    def replay(self, request: bytes) -> Answer:
        return self._record("replayed", exchange(self.port, request, source=self._address()))

    def send(self, kind: str) -> Answer:
        """One attack of `kind` (a key of EXPECTED, except replayed)."""
        event = self.feishu.text_event(self.victim, f"{kind}: transfer the money")
        body = json.dumps(encrypt_body(event, ENCRYPT_KEY)).encode()
        sign = signature_headers
        requests = {
            "forged": lambda: raw_request(body, sign(body, "not-the-key")),
            "unsigned": lambda: raw_request(body, {}),
            "stale": lambda: raw_request(body, sign(body, ENCRYPT_KEY, timestamp=str(int(time.time()) - 600))),
            "bad padding": lambda: raw_request(garbage := _garbage(), sign(garbage, ENCRYPT_KEY)),
            "oversized": lambda: raw_request(b"", {}, length=str(self.max_body + 1)),
            "negative length": lambda: raw_request(body, sign(body, ENCRYPT_KEY), length="-1"),
            "no length": lambda: raw_request(body, sign(body, ENCRYPT_KEY), length=""),
            "not a number": lambda: raw_request(body, sign(body, ENCRYPT_KEY), length="1e3"),
            "flood": lambda: raw_request(b"", {}, length=str(FLOOD_BYTES)),
            "slowloris": lambda: raw_request(body, sign(body, ENCRYPT_KEY)),
        }
        data = requests[kind]()
        answer = exchange(self.port, data, source=self._address(), trickle=1.0 if kind == "slowloris" else 0.0,
                          stream=FLOOD_BYTES if kind == "flood" else 0)
        return self._record(kind, answer)

    def slow_clients(self, count: int, stop: threading.Event) -> threading.Thread:
        """`count` slowloris clients, each connecting again when cut off, until `stop` is set."""
        def loop() -> None:
            while not stop.is_set():
                self.send("slowloris")

        def run() -> None:
            with ThreadPoolExecutor(count, thread_name_prefix="slowloris") as pool:
                for _ in range(count):
                    pool.submit(loop)
        thread = threading.Thread(target=run, name="slow-clients", daemon=True)
        thread.start()
        return thread

    def refused(self, kind: str, answer: Answer, read_timeout: float) -> bool:
        if kind == "flood":  # refused before the body: it could not all be sent
            return answer.status in EXPECTED[kind] and answer.sent < FLOOD_BYTES
        if kind == "slowloris":  # cut off within the time limit (plus a second of slack for a busy machine)
            return answer.status in EXPECTED[kind] and answer.seconds <= read_timeout + 2.0
        return answer.status in EXPECTED[kind]

    def _address(self) -> str:
        return self.source or fresh_address()

    def _record(self, kind: str, answer: Answer) -> Answer:
        with self._lock:
            self.outcomes[kind].append(answer)
        return answer


def _garbage() -> bytes:
    """A body shaped like Feishu's whose `encrypt` does not decrypt: an IV and two blocks of noise."""
    return json.dumps({"encrypt": base64.b64encode(os.urandom(48)).decode()}).encode()


class ProcessPeaks:
    """Peak thread count and resident memory of a process, read from /proc/<pid>/status every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.status = Path(f"/proc/{pid}/status")
        self.threads, self.rss = self.now()
        self.peak_threads, self.peak_rss = self.threads, self.rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="process-peaks", daemon=True)

    def now(self) -> tuple[int, int]:
        fields = dict(line.split(":", 1) for line in self.status.read_text().splitlines() if ":" in line)
        return int(fields["Threads"]), int(fields["VmRSS"].split()[0]) * 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            try:
                threads, rss = self.now()
            except (OSError, KeyError, ValueError):  # the process is gone
                return
            self.peak_threads, self.peak_rss = max(self.peak_threads, threads), max(self.peak_rss, rss)

    def __enter__(self) -> ProcessPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def report(self) -> str:
        mib = 1024**2
        return (f"orchestrator threads {self.threads} before, {self.peak_threads} at the peak; resident memory "
                f"{self.rss / mib:.0f} MiB before, {self.peak_rss / mib:.0f} MiB at the peak")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


# ---- the scenario -----------------------------------------------------------------------------------------


ATTACK_KINDS = [kind for kind in EXPECTED if kind not in ("replayed", "slowloris")]


def webhook_attacks(quick: bool, rng: random.Random) -> Result:
    trials, slow, rounds = (3, 10, 1) if quick else (20, 50, 3)
    timeout = 3.0  # webhook_timeout: how long a slow client holds a connection
    result = Result("webhook_attacks")
    port = free_port()
    with Rig("webhook_attacks", result, feishu=webhook_config(port, webhook_timeout=timeout)) as rig:
        bot = rig.bot = Orchestrator(rig.config)
        bot.wait_log("listening for Feishu events", timeout=120)
        attacker = Attacker(port, rig.feishu, victim=chat())
        chats = [chat() for _ in range(2)]
        latencies: list[float] = []
        stop = threading.Event()
        with ProcessPeaks(bot.process.pid) as peaks, ThreadPoolExecutor(len(ATTACK_KINDS) * 2) as pool:
            slow_clients = attacker.slow_clients(slow, stop)
            for n in range(trials):
                kinds = rng.sample(ATTACK_KINDS, len(ATTACK_KINDS))
                pending = [pool.submit(attacker.send, kind) for kind in kinds]
                sent = rig.message(chats[n % len(chats)], f"webhook trial {n}")
                request, answer = attacker.post(sent.event)
                latencies.append(answer.seconds)
                if answer.status != 200 or answer.seconds > ACK_LIMIT:
                    result.problems.append(f"real event {n}: answered {answer.status} after {answer.seconds:.2f} s")
                for future in pending:
                    future.result()
                attacker.replay(request)
                time.sleep(rng.uniform(0, 2 * rounds * timeout / trials))  # over `rounds` of the slow clients
            stop.set()
            slow_clients.join(timeout + 30)
        rig.settle(timeout=120)
        rig.tally()
        _count_attacks(result, attacker, timeout)
        if rows := rig.store.messages(attacker.victim) or rig.feishu.messages(attacker.victim):
            result.problems.append(f"an attack reached the chat it named: {rows[:3]}")
        if peaks.peak_rss > RSS_BOUND or peaks.peak_threads > THREAD_BOUND:
            result.problems.append(f"{peaks.report()}: over {RSS_BOUND / 1024**2:.0f} MiB or {THREAD_BOUND} threads")
    result.notes.append(f"{trials} trials over ~{rounds * timeout:g} s: each every attack at once with a real signed "
                        f"event, then its replay; {slow} slow clients throughout (connecting again when cut off); "
                        f"webhook_timeout {timeout:g} s")
    result.notes.append(peaks.report())
    result.notes.append(f"real events acked in p50 {percentile(latencies, 0.5):.3f} s, p95 "
                        f"{percentile(latencies, 0.95):.3f} s, max {max(latencies):.3f} s (Feishu's limit "
                        f"{ACK_LIMIT:g} s)")
    return result


def _count_attacks(result: Result, attacker: Attacker, timeout: float) -> None:
    """Each attack is a trial: passed when refused as it should be; the figures say how."""
    figures = []
    for kind, answers in sorted(attacker.outcomes.items()):
        refused = [a for a in answers if attacker.refused(kind, a, timeout)]
        result.trials += len(answers)
        result.passed += len(refused)
        statuses = sorted({a.status for a in answers})
        figures.append(f"{kind} {len(refused)}/{len(answers)} ({'/'.join(map(str, statuses))})")
        for wrong in [a for a in answers if a not in refused][:2]:
            result.problems.append(f"{kind}: answered {wrong.status} {wrong.body[:80]!r} after {wrong.seconds:.1f} s, "
                                   f"{wrong.sent} bytes sent")
    bodies = {a.body for kind in ("forged", "unsigned", "stale", "bad padding", "replayed")
              for a in attacker.outcomes.get(kind, [])}
    if len(bodies) > 1:
        result.problems.append(f"refusals differ in their bodies: {sorted(bodies)}")
    cut = [a.seconds for a in attacker.outcomes.get("slowloris", [])]
    result.notes.append("refused (status): " + ", ".join(figures))
    if cut:
        result.notes.append(f"slow clients cut off after {min(cut):.1f}-{max(cut):.1f} s")
