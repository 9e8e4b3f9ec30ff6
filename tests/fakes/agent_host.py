"""A fake agent host for unit tests of the orchestrator's side of the channel (orchestrator/turns.py,
orchestrator/turn_runner.py): a thread that plays orchestrator/agent_host.py against the chat's real folders,
with a scripted CLI in place of Claude Code.

It takes the requests in the chat's input folder in (row, attempt) order, claims each by making its folder in
turns/, and writes pid, process, output.jsonl, stderr and, last, exit_code there, every file owned by
the agent's uid as the real host's are (the tests run as root; the orchestrator refuses files of another owner).
Each file appears whole (written aside, chowned, renamed), as the real host's small files do.

What the CLI does in each turn is a `Reply`, taken in order from `replies` (a plain answer when they run out). A
CLI process answers turns until one ends without a result or is signalled, or a request needs another argv, env
or session; its `total_cost_usd` is cumulative over its turns (COST_PER_TURN each), as the real CLI's.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import agent_host
from orchestrator.agent_host import Request
from orchestrator.layout import ChatPaths

WAIT_SECONDS = 10.0  # for what a test waits for: a turn taken, a message delivered
COST_PER_TURN = 0.0006
POLL_SECONDS = 0.005
# `kill` options as the runner sends them → the CLI's exit status; SIGINT ends it after a result (measured: exit 0)
SIGNALS = {"-INT": 0, "-TERM": 143, "-KILL": 137}
ANSWERED, INTERRUPTED = "answered", "interrupted"  # how a turn ends, besides a signal


@dataclass(frozen=True)
class Reply:
    """How the CLI answers one turn."""

    text: str | None = None  # None: "Fake answer to: <prompt>"
    output: bool = True  # False: it ends before writing a line (a pids limit that refused its processes)
    exit_code: int = 1  # when it ends without output
    hold: bool = False  # after its first text, it works on until interrupted, stopped, signalled or `release`d
    obey_interrupt: bool = True  # False: the host does not pass `<turn>.interrupt` on (the SIGINT fallback's case)
    obey_stop: bool = True  # False: the host does not act on `<turn>.stop` (the runner's SIGKILL fallback's case)
    obey_signals: bool = True  # False: signals change nothing either (a wedged host: only a stopped container helps)
    error: str | None = None  # the turn ends in an error result with these words (the model API refused, say)
    limit_hits: int | None = None  # the pids limit's refusals the host counted in the turn (None: it could not read)


@dataclass
class _Process:
    pid: int
    id: str
    key: tuple[Any, ...]  # the argv and env it was started with
    session: str
    cost: float = 0.0


class FakeAgentHost:
    def __init__(self, paths: ChatPaths, uid: int = 1000, replies: list[Reply] | None = None) -> None:
        self.paths = paths
        self.uid = uid
        self.replies = list(replies or [])
        self.taken: list[str] = []  # turn names, in the order taken
        self.requests: list[Request] = []  # the decoded request of each
        self.processes: list[str] = []  # the CLI process id that answered each
        self.interrupts_seen: list[str] = []  # turns whose `.interrupt` the host found
        self.stops_seen: list[str] = []  # turns the host stopped for their `.stop`
        self._taking = True  # False: requests wait (a host not started yet, or stuck)
        self._claiming = threading.Lock()  # held while a request is claimed: `pause` waits for it
        self._release = threading.Event()
        self._signal: str | None = None  # a `kill -<sig>` of the current turn's CLI, from `run_in_container`
        self._current: tuple[str, int, Reply] | None = None  # (turn, pid, its reply) being answered
        self._process: _Process | None = None
        self._pids = 4000
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake agent host", daemon=True)

    # ---- what a test does ----

    def start(self) -> FakeAgentHost:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)

    def pause(self) -> None:
        """No request is taken from now on (one being claimed at this moment is taken first)."""
        with self._claiming:
            self._taking = False

    def resume(self) -> None:
        with self._claiming:
            self._taking = True

    def release(self) -> None:
        """The held turn goes on to its answer."""
        self._release.set()

    def kill(self, option: str = "-KILL") -> None:
        """A signal to the CLI answering the current turn (`kill` option: -INT, -TERM, -KILL)."""
        assert option in SIGNALS
        self._signal = option

    def run_in_container(self, container_id: str, argv: list[str], user: str) -> tuple[int, str]:
        """`FakeRuntime.on_run`: a `kill -<SIG> <pid>` reaches the CLI of the turn being answered, or ends the hot
        CLI between turns (the next turn starts another)."""
        current, idle = self._current, self._process
        if len(argv) == 3 and argv[0] == "kill" and argv[1] in SIGNALS and current and argv[2] == str(current[1]):
            if current[2].obey_signals:
                self.kill(argv[1])
            return 0, ""
        if len(argv) == 3 and argv[0] == "kill" and current is None and idle and argv[2] == str(idle.pid):
            self._process = None
            return 0, ""
        return 1, f"{argv[0]}: no such process"

    # ---- the host ----

    def _serve(self) -> None:
        while not self._stopping.is_set():
            with self._claiming:
                claimed = self._claim_next() if self._taking else None
            if claimed is not None:
                self._answer(*claimed)
            time.sleep(POLL_SECONDS)

    def _claim_next(self) -> tuple[str, Request] | None:
        names = sorted((order, name) for name in os.listdir(self.paths.input)
                       if name not in self.taken and (order := agent_host.turn_order(name)) is not None)
        for _, name in names:
            try:
                data = (self.paths.input / name).read_bytes()
                os.mkdir(self.paths.turns / name)  # the claim
            except (FileNotFoundError, FileExistsError):
                continue  # withdrawn meanwhile, or taken before
            os.chown(self.paths.turns / name, self.uid, self.uid)
            return name, agent_host.decode_request(data)
        return None

    def _answer(self, name: str, request: Request) -> None:
        folder = self.paths.turns / name
        reply = self.replies.pop(0) if self.replies else Reply()
        process = self._process_for(request)
        self._current, self._signal = (name, process.pid, reply), None
        for file, text in ((agent_host.PID, f"{process.pid}\n"), (agent_host.PROCESS, f"{process.id}\n"),
                           (agent_host.OUTPUT, ""),
                           (agent_host.STDERR, "")):
            self._write(folder / file, text)
        self.requests.append(request)
        self.processes.append(process.id)
        self.taken.append(name)
        code = self._run_turn(name, folder, reply, process, request.message["message"]["content"])
        if code is not None:
            if reply.limit_hits is not None:
                self._write(folder / agent_host.LIMIT_HITS, f"{reply.limit_hits}\n")
            self._write(folder / agent_host.EXIT_CODE, f"{code}\n")
        self._current = None

    def _process_for(self, request: Request) -> _Process:
        """The running CLI if it has the request's argv and env and is in its session (the session it resumed or
        made); else a new one, as the real host decides."""
        process = self._process
        if process is None or process.key != request.cli_key or process.session != request.session:
            self._pids += 1
            process = self._process = _Process(self._pids, uuid.uuid4().hex[:16], request.cli_key,
                                               request.session or str(uuid.uuid4()))
        return process

    def _run_turn(self, name: str, folder: Path, reply: Reply, process: _Process, prompt: str) -> int | None:
        """The CLI's lines of one turn; its exit code (None: the host was stopped mid-turn)."""
        if not reply.output:
            self._process = None
            return reply.exit_code
        text = reply.text or f"Fake answer to: {prompt}"
        self._emit(folder, {"type": "system", "subtype": "init", "session_id": process.session, "model": "fake"},
                   {"type": "assistant", "message": {"content": [{"type": "text", "text": text}]},
                    "session_id": process.session})
        ending = self._hold(name, reply) if reply.hold else ANSWERED
        if ending is None:
            return None
        if SIGNALS.get(ending):  # SIGTERM, SIGKILL: the CLI ends at once, without a result
            self._process = None
            return SIGNALS[ending]
        process.cost += COST_PER_TURN
        result: dict[str, Any] = {"type": "result", "is_error": ending != ANSWERED or reply.error is not None,
                                  "session_id": process.session, "total_cost_usd": process.cost, "duration_ms": 5,
                                  "num_turns": 1}
        if reply.error is not None:
            result.update(subtype="success", result=reply.error, errors=[reply.error])
        elif ending == ANSWERED:
            result.update(subtype="success", result=text)
        else:  # interrupted, through the control protocol or by SIGINT: a result, and the session goes on
            result.update(subtype="error_during_execution", errors=[], terminal_reason="aborted_streaming")
        self._emit(folder, result)
        if ending in SIGNALS:
            self._process = None
        return 0

    def _hold(self, name: str, reply: Reply) -> str | None:
        """Wait for how the held turn ends: ANSWERED (released), INTERRUPTED (through the control protocol), a
        signal's `kill` option, or None (the host stopped)."""
        interrupt = self.paths.input / (name + agent_host.INTERRUPT_SUFFIX)
        stop = self.paths.input / (name + agent_host.STOP_SUFFIX)
        while not self._stopping.is_set():
            if self._release.is_set():
                self._release.clear()
                return ANSWERED
            if self._signal is not None:
                return self._signal
            if reply.obey_stop and stop.exists():
                self.stops_seen.append(name)
                return "-TERM"  # the host's SIGTERM to the CLI
            if name not in self.interrupts_seen and interrupt.exists():
                self.interrupts_seen.append(name)
            if name in self.interrupts_seen and reply.obey_interrupt:
                return INTERRUPTED
            time.sleep(POLL_SECONDS)
        return None

    def _emit(self, folder: Path, *lines: dict[str, Any]) -> None:
        with (folder / agent_host.OUTPUT).open("a") as output:
            output.write("".join(json.dumps(line) + "\n" for line in lines))

    def _write(self, path: Path, text: str) -> None:
        aside = path.with_name(f"{path.name}.tmp")
        aside.write_text(text)
        os.chown(aside, self.uid, self.uid)
        os.rename(aside, path)


async def until(check: Callable[[], object], what: str) -> None:
    """`tests.harness.wait_until` for a test on the event loop (the host's turns, the store's states): it must not
    block the runner or the service it waits for."""
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {WAIT_SECONDS} s waiting for {what}")
        await asyncio.sleep(0.005)
