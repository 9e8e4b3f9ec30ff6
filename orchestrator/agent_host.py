"""The agent host: the main process of a chat's container (under tini), as the agent's user. Standard library
only: images/build.sh copies this file into the agent image; the orchestrator imports its names and its request
format from here, so both sides of the channel are one piece of code.

It keeps one Claude Code CLI process in stream-json input mode (`claude -p --input-format stream-json`) and feeds
it the chat's turns, one at a time. The channel with the orchestrator is two mounted folders, so a turn and its
output outlive the orchestrator, and nothing needs `docker exec` or a socket (the folders may be on shared storage):

    /input/<turn>            a turn request, written by the orchestrator (root's folder, read-only here): the CLI's
                             argv and env, the session to resume, the user message, how long to stay hot, and the
                             files that came with the message, to be copied into the workspace before it is sent
    /input/<turn>.files/     those files (the orchestrator downloaded them; it never writes into the workspace)
    /input/<turn>.interrupt  the orchestrator asks to interrupt that turn (/stop, shutdown)
    /input/<turn>.stop       the orchestrator asks to end that turn's CLI (the turn passed a limit): SIGTERM, SIGKILL
                             STOP_KILL_SECONDS later, the turn ended with its status, and the next turn gets a new
                             CLI; nothing when the turn is no longer the one in progress (its CLI, hot, may be
                             answering the next turn: a signal from outside could not tell them apart); a turn not
                             yet taken (like an interrupted one) ends INTERRUPTED_BEFORE_START without a CLI
    /input/<turn>.decision-<n>  the orchestrator's answer to the turn's n-th permission request:
                             {"behavior": "allow"|"deny", "message": why (deny), "answers": {question: answer}}
    /turns/usage             the container's use of its caps, from its cgroup, rewritten every USAGE_SECONDS:
                             {"at": time, "cpu_percent": of one CPU over the last interval, "memory_bytes": less
                             inactive file pages as `docker stats` shows it, "memory_limit", "pids"} (status reads it
                             where the engine's stats are out of reach: a Swarm task on another node)
    /turns/<turn>/           made by this host when it takes the turn (mkdir is the claim), then in it:
        pid          the CLI process's pid (for the orchestrator's fallbacks: SIGINT, SIGKILL)
        process      a random id of the CLI process, the same in every turn that process answers
        output.jsonl the CLI's stream-json lines of this turn, up to and including its result
        stderr       what the CLI wrote to stderr during this turn
        process_limit_hits  how often the kernel refused a process in this container for its pids limit while
                     the turn ran (cgroup v2 or v1 `pids.events`), written just before exit_code when it can be read:
                     so the orchestrator needs no `docker exec` to see it, wherever the container runs (Swarm)
        exit_code    written last: 0 when the turn's result came, the CLI's exit status when it ended mid-turn,
                     WITHDRAWN when the request was gone by the time it was taken
        ask-<n>      the CLI's n-th permission request of the turn (n = 1, 2, ...): {"tool": name, "input": {...}};
                     the CLI waits until the decision comes (a chat whose permission mode asks: see approvals.py)
        ask-<n>.cancelled  the CLI withdrew that request (the turn was interrupted meanwhile)

The CLI is this host's child. It starts at the first turn (with `--resume=` of the chat's session), answers the
following turns without starting again, and is closed after the request's `hot_idle` seconds without a turn, or
when a turn asks for another argv, env or session. Everything here runs as the agent, so the orchestrator
trusts none of it (see orchestrator/untrusted.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

INPUT = "/input"
TURNS = "/turns"
WORKSPACE = "/workspace"
INTERRUPT_SUFFIX = ".interrupt"
STOP_SUFFIX = ".stop"
ASK_PREFIX = "ask-"
CANCELLED_SUFFIX = ".cancelled"
DECISION_INFIX = ".decision-"
MAX_DECISION_BYTES = 1024**2
TURN_NAME = re.compile(r"(\d+)-(\d+)-[0-9a-f]{16}")
OUTPUT, STDERR, EXIT_CODE, PID, PROCESS = "output.jsonl", "stderr", "exit_code", "pid", "process"
LIMIT_HITS = "process_limit_hits"
USAGE = "usage"
USAGE_SECONDS = 10.0
CGROUP = "/sys/fs/cgroup"
NO_LIMIT_V1 = 2**62  # v1's memory.limit_in_bytes without a cap: 9223372036854771712 (v2 says "max")
# Where the cgroup's counters are, v2 then v1: CPU time (µs in v2's cpu.stat, ns in v1's cpuacct.usage), memory in
# use and its cap, the memory.stat line of inactive file pages (`docker stats` leaves them out), processes, and the
# pids limit's events (their "max" line: processes refused).
CGROUP_FILES = ({"cpu": "cpu.stat", "memory": "memory.current", "limit": "memory.max", "stat": "memory.stat",
                 "inactive": "inactive_file", "pids": "pids.current", "events": "pids.events"},
                {"cpu": "cpuacct/cpuacct.usage", "memory": "memory/memory.usage_in_bytes",
                 "limit": "memory/memory.limit_in_bytes", "stat": "memory/memory.stat",
                 "inactive": "total_inactive_file", "pids": "pids/pids.current", "events": "pids/pids.events"})
COUNTERS = ("cpu", "memory", "limit", "stat", "pids")  # the files of cgroup_counters
WITHDRAWN = -1
INTERRUPTED_BEFORE_START = 130
# A turn an earlier host of the chat took and never ended: its CLI went with that host's container (it died, was
# restarted, or its Swarm task moved to another node). Ended so by the next host as it starts, which tells the
# orchestrator at once, also one that restarted meanwhile and would otherwise follow the turn until its idle timeout.
ABANDONED = -2
RESCAN_SECONDS = 1.0  # with inotify, /input is scanned again this often all the same (shared storage sends no event)
POLL_SECONDS = 0.25  # without inotify
READ_CHUNK = 256 * 1024
MAX_PARSED_LINE = 16 * 1024**2  # a longer line is passed through to the turn's output without being parsed
HEAD_BYTES = 64
RESULT_HEAD = b'{"type":"result"'  # how the CLI starts a result line: enough to end a turn whose result is huge
CLOSE_GRACE_SECONDS = 5.0  # for the CLI to exit after its stdin closes
STOP_GRACE_SECONDS = 3.0  # at SIGTERM, for an interrupted turn to end with its result
STOP_KILL_SECONDS = 2.0  # after a stopped turn's SIGTERM, before its CLI's SIGKILL
INTERRUPT_RESEND_SECONDS = 1.0

_IN_CLOSE_WRITE, _IN_MOVED_TO, _IN_CREATE = 0x8, 0x80, 0x100
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC


# ---- the request (written by the orchestrator, read here) -------------------------------------------------


@dataclass(frozen=True)
class Request:
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    session: str | None
    message: dict[str, Any]  # the stream-json user message line
    hot_idle: float
    files: tuple[tuple[str, str], ...] = ()  # (under /input, under /workspace): copied before the message is sent

    @property
    def cli_key(self) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
        """What a running CLI must have been started with to take this turn."""
        return self.argv, self.env


def encode_request(argv: list[str], env: dict[str, str], session: str | None, text: str, hot_idle: float,
                   files: tuple[tuple[str, str], ...] = (), images: tuple[dict[str, Any], ...] = ()) -> bytes:
    """A turn's request. `images` are image content blocks sent with the text (the CLI's stream-json input takes
    them); `files` are copied into the workspace first."""
    content: str | list[dict[str, Any]] = [{"type": "text", "text": text}, *images] if images else text
    message = {"type": "user", "message": {"role": "user", "content": content}}
    return json.dumps({"argv": argv, "env": env, "session": session, "message": message, "hot_idle": hot_idle,
                       "files": [list(pair) for pair in files]}).encode()


def decode_request(data: bytes) -> Request:
    """A request, or ValueError naming what is wrong with it."""
    raw = json.loads(data)
    if not isinstance(raw, dict):
        raise ValueError("a request must be a JSON object")
    argv, env, session, message, hot_idle = (raw.get(k) for k in ("argv", "env", "session", "message", "hot_idle"))
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
        raise ValueError("argv must be a list of strings")
    if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        raise ValueError("env must map strings to strings")
    if session is not None and not isinstance(session, str):
        raise ValueError("session must be a string or null")
    if not (isinstance(message, dict) and message.get("type") == "user"):
        raise ValueError("message must be a stream-json user message")
    if isinstance(hot_idle, bool) or not isinstance(hot_idle, int | float) or not 0 <= hot_idle < 10**9:
        raise ValueError("hot_idle must be a number of seconds")
    files = raw.get("files") or []
    if not (isinstance(files, list) and all(_file_pair(pair) for pair in files)):
        raise ValueError("files must be pairs of relative paths without '..'")
    return Request(tuple(argv), tuple(sorted(env.items())), session, message, float(hot_idle),
                   tuple((source, dest) for source, dest in files))


def _file_pair(pair: object) -> bool:
    return (isinstance(pair, list) and len(pair) == 2
            and all(isinstance(p, str) and p and not p.startswith("/") and ".." not in p.split("/") and "\0" not in p
                    for p in pair))


def ask_name(number: int) -> str:
    return f"{ASK_PREFIX}{number}"


def decision_name(turn: str, number: int) -> str:
    return f"{turn}{DECISION_INFIX}{number}"


def encode_decision(allow: bool, message: str = "", answers: dict[str, str] | None = None) -> bytes:
    decision: dict[str, Any] = {"behavior": "allow" if allow else "deny", "message": message}
    if answers:
        decision["answers"] = answers
    return json.dumps(decision).encode()


def permission_response(decision: bytes, tool_input: dict[str, Any]) -> dict[str, Any]:
    """The CLI's answer to a permission request, from the orchestrator's decision: allow runs the tool with its own
    input (and, for AskUserQuestion, the answers the chat gave); anything unreadable denies."""
    try:
        raw = json.loads(decision)
    except ValueError:
        raw = None
    if not isinstance(raw, dict) or raw.get("behavior") not in ("allow", "deny"):
        return {"behavior": "deny", "message": "The approval could not be read; denied."}
    if raw["behavior"] == "deny":
        return {"behavior": "deny", "message": str(raw.get("message") or "Denied.")}
    answers = raw.get("answers")
    extra = {"answers": answers} if isinstance(answers, dict) and answers else {}
    return {"behavior": "allow", "updatedInput": {**tool_input, **extra}}


def turn_order(name: str) -> tuple[int, int] | None:
    """(message row, attempt) of a turn's name; None for any other name."""
    match = TURN_NAME.fullmatch(name)
    return (int(match[1]), int(match[2])) if match else None


# ---- inotify (Linux; via ctypes, the standard library has none) ---------------------------------------------


class Inotify:
    """Wake-ups when a watched folder changes. Only a hint: callers look at the folder itself afterwards."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")

    def watch(self, path: str, mask: int = _IN_CREATE | _IN_MOVED_TO | _IN_CLOSE_WRITE) -> None:
        if self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")

    def fileno(self) -> int:
        return self.fd

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.fd, 65536):
                pass

    def close(self) -> None:
        os.close(self.fd)


# ---- the CLI process -------------------------------------------------------------------------------------


class Cli:
    """One CLI process in stream-json input mode, its output read without blocking."""

    def __init__(self, request: Request, cwd: str) -> None:
        argv = [*request.argv, *([f"--resume={request.session}"] if request.session else [])]
        # A session (and process group) of its own: a stopped turn's tool processes (a hung command, a flood) go
        # with its CLI (`close(gently=False)`), not left running beside the next turn's.
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        env={**os.environ, **dict(request.env)}, cwd=cwd, start_new_session=True)
        assert self.process.stdout and self.process.stderr and self.process.stdin
        self.stdout, self.stderr = self.process.stdout.fileno(), self.process.stderr.fileno()
        os.set_blocking(self.stdout, False)
        os.set_blocking(self.stderr, False)
        self.key = request.cli_key
        self.session = request.session
        self.id = secrets.token_hex(8)
        self._partial = b""
        self._passing = False  # inside a line longer than MAX_PARSED_LINE
        self._head = b""  # the start of that line

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, message: dict[str, Any]) -> bool:
        """One line to the CLI's stdin; False if it is gone."""
        try:
            assert self.process.stdin
            self.process.stdin.write(json.dumps(message).encode() + b"\n")
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            return False
        return True

    def interrupt(self) -> bool:
        return self.send({"type": "control_request", "request_id": f"interrupt-{secrets.token_hex(4)}",
                          "request": {"subtype": "interrupt"}})

    def lines(self, data: bytes) -> list[tuple[bytes, bool, bytes]]:
        """The output `data` completes, as (bytes, whether it ends a line, the line's start); a line longer than
        MAX_PARSED_LINE comes in pieces, and only its start is kept to be looked at."""
        pieces: list[tuple[bytes, bool, bytes]] = []
        *complete, rest = (self._partial + data).split(b"\n")
        for line in complete:
            pieces.append((line, True, self._head if self._passing else line[:HEAD_BYTES]))
            self._passing = False
        if self._passing or len(rest) > MAX_PARSED_LINE:
            if not self._passing:
                self._head = rest[:HEAD_BYTES]
            pieces.append((rest, False, self._head))
            rest, self._passing = b"", True
        self._partial = rest
        return pieces

    def close(self, gently: bool = True) -> int:
        """Close its stdin (it ends after the turn it is in), then end it if it does not (SIGTERM, then SIGKILL);
        not `gently`: SIGTERM at once to it and every process of its group (its tools' processes), SIGKILL to those
        left after the grace. Its exit status."""
        with contextlib.suppress(OSError, ValueError):
            assert self.process.stdin
            self.process.stdin.close()
        if gently:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return exit_status(self.process.wait(CLOSE_GRACE_SECONDS))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            self._signal(sig, group=not gently)
            with contextlib.suppress(subprocess.TimeoutExpired):
                status = exit_status(self.process.wait(STOP_KILL_SECONDS))
                if not gently:
                    self._signal(signal.SIGKILL, group=True)  # what of its group outlived it
                return status
        return exit_status(self.process.wait())

    def _signal(self, sig: signal.Signals, group: bool) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(self.process.pid, sig)  # its group's id is its pid (a session of its own)
            else:
                self.process.send_signal(sig)


def exit_status(returncode: int) -> int:
    """As a shell reports it: 128 + the signal for a process a signal ended."""
    return 128 - returncode if returncode < 0 else returncode


def peek(line: bytes) -> dict[str, Any]:
    """The line's JSON object, or {} (the host only needs a few fields of a few kinds of line)."""
    if not line.startswith(b"{"):
        return {}
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: a model's tool input nested thousands deep
        return {}
    return data if isinstance(data, dict) else {}


# ---- one turn's folder -----------------------------------------------------------------------------------


class TurnFolder:
    """The files this host writes for one turn."""

    def __init__(self, turns_dir: str, name: str) -> None:
        self.name = name
        self.fd = os.open(os.path.join(turns_dir, name), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        self._output = self._stderr = -1
        try:
            self._output = self._open(OUTPUT)
            self._stderr = self._open(STDERR)
        except OSError:
            self.close()
            raise
        self.limit_hits_before = process_limit_count(CGROUP)
        self.interrupts_sent = 0
        self.interrupted_at = float("-inf")
        self.asks = 0  # permission requests so far
        self.waiting: dict[int, tuple[str, dict[str, Any]]] = {}  # by number: (the CLI's request id, its tool input)

    def _open(self, name: str) -> int:
        # O_NONBLOCK: a FIFO the agent put there is refused (ENXIO) instead of holding the host; a file is the same
        return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644,
                       dir_fd=self.fd)

    def write_file(self, name: str, text: str) -> None:
        write_small(self.fd, name, text)

    def output(self, data: bytes) -> None:
        os.write(self._output, data)

    def ask(self, request_id: str, tool: str, tool_input: dict[str, Any]) -> int:
        """A permission request of the CLI's, for the orchestrator to decide; its number."""
        self.asks += 1
        self.waiting[self.asks] = (request_id, tool_input)
        self.write_file(ask_name(self.asks), json.dumps({"tool": tool, "input": tool_input}))
        return self.asks

    def cancel(self, request_id: str) -> None:
        for number, (waiting_id, _) in list(self.waiting.items()):
            if waiting_id == request_id:
                del self.waiting[number]
                self.write_file(ask_name(number) + CANCELLED_SUFFIX, "")

    def error(self, data: bytes) -> None:
        os.write(self._stderr, data)

    def end(self, code: int) -> None:
        try:
            after = process_limit_count(CGROUP)
            if after is not None and self.limit_hits_before is not None:
                with contextlib.suppress(OSError):  # the agent's folder: whatever it put there, the exit code follows
                    self.write_file(LIMIT_HITS, f"{max(0, after - self.limit_hits_before)}\n")
            self.write_file(EXIT_CODE, f"{code}\n")
        finally:
            self.close()

    def close(self) -> None:
        for fd in (self._output, self._stderr, self.fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._output = self._stderr = self.fd = -1


def write_small(dir_fd: int, name: str, text: str) -> None:
    """A whole small file, made visible at once (written aside, then renamed). O_NONBLOCK: a FIFO the agent put
    where it is written aside is refused (ENXIO) instead of holding the host."""
    fd = os.open(f"{name}.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644,
                 dir_fd=dir_fd)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.rename(f"{name}.tmp", name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def cgroup_counters(root: str) -> dict[str, int] | None:
    """This container's CPU time (ns), memory in use less inactive file pages, memory cap (0: none) and processes,
    from its cgroup (v2, else v1); None where they cannot be read."""
    for files in CGROUP_FILES:
        try:
            read = {key: _read_text(os.path.join(root, files[key])) for key in COUNTERS}
        except (OSError, UnicodeDecodeError):
            continue
        try:
            stat = dict(line.split(" ", 1) for line in read["stat"].splitlines() if " " in line)
            cpu = (int(dict(line.split(" ", 1) for line in read["cpu"].splitlines())["usage_usec"]) * 1000
                   if files["cpu"] == "cpu.stat" else int(read["cpu"]))
            limit = 0 if read["limit"].strip() == "max" else int(read["limit"])
            return {"cpu_ns": cpu, "memory_bytes": max(0, int(read["memory"]) - int(stat.get(files["inactive"], 0))),
                    "memory_limit": 0 if limit >= NO_LIMIT_V1 else limit, "pids": int(read["pids"])}
        except (KeyError, ValueError):
            continue
    return None


def _read_text(path: str) -> str:
    with open(path, "rb") as file:
        return file.read(65536).decode()


def process_limit_count(root: str) -> int | None:
    """How often the kernel refused a process in this container's cgroup for its pids limit (the `max` count of
    pids.events, v2 else v1) since the container started; None where it cannot be read. A read, never a new process:
    after a fork bomb no process may start."""
    for files in CGROUP_FILES:
        try:
            events = _read_text(os.path.join(root, files["events"]))
        except (OSError, UnicodeDecodeError):
            continue
        for line in events.splitlines():
            name, _, count = line.partition(" ")
            if name == "max" and count.strip().isdigit():
                return int(count)
    return None


# ---- the host --------------------------------------------------------------------------------------------


def log(text: str) -> None:
    """One line to the container's log (`docker logs`)."""
    print(f"agent-host: {text}", file=sys.stderr, flush=True)


class Host:
    def __init__(self, input_dir: str = INPUT, turns_dir: str = TURNS, workspace: str = WORKSPACE) -> None:
        self.input_dir, self.turns_dir, self.workspace = input_dir, turns_dir, workspace
        self.cli: Cli | None = None
        self.turn: TurnFolder | None = None
        self.taken: set[str] = set()  # turns this host has seen claimed (by itself or an earlier host)
        self.hot_idle = 600.0
        self.idle_since = time.monotonic()
        self.stop_at: float | None = None  # set by SIGTERM: the deadline for the turn in progress
        self.selector = selectors.DefaultSelector()
        self.inotify: Inotify | None = None
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # stop() ends a wait at once
        self.selector.register(self._wake_read, selectors.EVENT_READ, "wake")
        self.usage_at = float("-inf")  # when the usage was last written, and the CPU time then
        self.cpu_ns_then: int | None = None

    def run(self) -> int:
        """As the container's main process: SIGTERM (the container stopping) ends it after the turn in progress
        is interrupted; SIGINT goes on to the CLI."""
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self._forward(signal.SIGINT))
        return self.serve()

    def serve(self) -> int:
        try:
            self.inotify = Inotify()
            self.inotify.watch(self.input_dir)
            self.selector.register(self.inotify, selectors.EVENT_READ, "input")
        except OSError as exc:
            log(f"no inotify ({exc}); looking at {self.input_dir} every {POLL_SECONDS} s")
            self.inotify = None
        log(f"serving turns from {self.input_dir}")
        self._end_abandoned_turns()
        while not self._finished():
            self._report_usage()
            if self.turn is None and self.stop_at is None:
                self._take_next()
            if self.turn is not None:
                self._check_stop()
            if self.turn is not None:
                self._check_interrupt()
                self._check_decisions()
            self._end_idle_cli()
            self._wait()
        if self.cli is not None:
            self._close_cli("the container is stopping")
        return 0

    def _finished(self) -> bool:
        return self.stop_at is not None and (self.turn is None or time.monotonic() > self.stop_at)

    def stop(self) -> None:
        self.stop_at = time.monotonic() + STOP_GRACE_SECONDS
        if self.turn is not None and self.cli is not None:
            self.cli.interrupt()  # the CLI ends the turn with a result and keeps what it had
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, b"x")

    def _forward(self, sig: signal.Signals) -> None:
        if self.cli is not None:
            with contextlib.suppress(ProcessLookupError):
                self.cli.process.send_signal(sig)

    def _wait(self) -> None:
        timeout = min(RESCAN_SECONDS if self.inotify else POLL_SECONDS,
                      max(0.0, self.usage_at + USAGE_SECONDS - time.monotonic()))  # the next usage report
        if self.turn is not None and self.turn.interrupts_sent == 1:
            timeout = min(timeout, INTERRUPT_RESEND_SECONDS)
        if self.cli is not None and self.turn is None:
            timeout = max(0.0, min(timeout, self.idle_since + self.hot_idle - time.monotonic()))
        if self.stop_at is not None:
            timeout = max(0.0, min(timeout, self.stop_at - time.monotonic()))
        for key, _ in self.selector.select(timeout):
            if key.data == "input":
                assert self.inotify
                self.inotify.drain()
            elif key.data == "wake":
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_read, 4096)
            elif key.data == "stdout":
                self._on_stdout()
            elif key.data == "stderr":
                self._on_stderr()

    def _report_usage(self) -> None:
        """/turns/usage rewritten every USAGE_SECONDS (the first at once); nothing when the cgroup or the folder
        cannot be had (the agent's folder: whatever it put there, the host serves on)."""
        now = time.monotonic()
        if now - self.usage_at < USAGE_SECONDS:
            return
        counters = cgroup_counters(CGROUP)
        elapsed, self.usage_at = now - self.usage_at, now  # also without counters: `_wait` sleeps until the next
        then, self.cpu_ns_then = self.cpu_ns_then, counters["cpu_ns"] if counters else None
        if counters is None:
            return
        cpu = 100.0 * (counters.pop("cpu_ns") - then) / (elapsed * 1e9) if then is not None else 0.0
        try:
            fd = os.open(self.turns_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                write_small(fd, USAGE, json.dumps({"at": time.time(), "cpu_percent": round(max(0.0, cpu), 1),
                                                   **counters}))
            finally:
                os.close(fd)
        except OSError as exc:
            log(f"cannot write {USAGE}: {exc}")

    # ---- taking turns ----

    def _end_abandoned_turns(self) -> None:
        """Ends with ABANDONED every turn an earlier host claimed and never ended (this host has taken none yet)."""
        try:
            names = [name for name in os.listdir(self.turns_dir) if TURN_NAME.fullmatch(name)]
        except OSError as exc:
            log(f"cannot list {self.turns_dir}: {exc}")
            return
        for name in names:
            if os.path.lexists(os.path.join(self.turns_dir, name, EXIT_CODE)):
                continue
            try:  # the folder is the agent's: a link, a FIFO, a folder where a file goes are refused, not fatal
                turn = TurnFolder(self.turns_dir, name)
                try:
                    turn.error(b"agent-host: the container that ran this turn stopped before it ended\n")
                finally:
                    turn.end(ABANDONED)
            except OSError as exc:
                log(f"turn {name}: taken by an earlier host and never ended, and cannot be ended: {exc}")
                continue
            log(f"turn {name}: taken by an earlier host and never ended: ended {ABANDONED}")

    def _take_next(self) -> None:
        try:
            names = sorted((order, name) for name in os.listdir(self.input_dir)
                           if name not in self.taken and (order := turn_order(name)) is not None)
        except OSError as exc:
            log(f"cannot list {self.input_dir}: {exc}")
            return
        for _, name in names:
            self.taken.add(name)
            try:
                os.mkdir(os.path.join(self.turns_dir, name), 0o755)  # the claim: exactly one host takes a turn
            except FileExistsError:
                continue  # taken before (by this container's earlier host)
            self._start(name)
            return

    def _start(self, name: str) -> None:
        try:
            turn = TurnFolder(self.turns_dir, name)
        except OSError as exc:  # the agent raced this host to the folder it just made (a FIFO, a link in it)
            log(f"turn {name}: cannot open its folder: {exc}")
            return
        try:
            with open(os.path.join(self.input_dir, name), "rb") as request_file:
                request = decode_request(request_file.read())
        except FileNotFoundError:
            log(f"turn {name}: withdrawn before it was taken")
            turn.end(WITHDRAWN)
            return
        except ValueError as exc:
            turn.error(f"agent-host: a request it cannot read: {exc}\n".encode())
            turn.end(2)
            return
        if any(os.path.exists(os.path.join(self.input_dir, name + asked)) for asked in (INTERRUPT_SUFFIX, STOP_SUFFIX)):
            turn.end(INTERRUPTED_BEFORE_START)  # no CLI started for it
            return
        self.hot_idle = request.hot_idle
        try:
            cli = self._cli_for(request)
        except (OSError, ValueError) as exc:  # ValueError: an env name with "=" or a NUL in a value
            turn.error(f"agent-host: cannot start the CLI: {exc}\n".encode())
            turn.end(127)
            log(f"turn {name}: cannot start the CLI: {exc}")
            return
        turn.write_file(PID, f"{cli.pid}\n")
        turn.write_file(PROCESS, f"{cli.id}\n")
        self.turn = turn
        log(f"turn {name}: started, CLI {cli.pid}")
        self._copy_files(turn, request)
        if not cli.send(request.message):
            log(f"turn {name}: the CLI took no input")  # its end is seen on its stdout

    def _copy_files(self, turn: TurnFolder, request: Request) -> None:
        """The files that came with the message, into the workspace (as the agent: they are its files now)."""
        for source, dest in request.files:
            target = os.path.join(self.workspace, dest)
            try:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(os.path.join(self.input_dir, source), target)
            except OSError as exc:
                turn.error(f"agent-host: cannot copy {dest} into the workspace: {exc}\n".encode())
                log(f"turn {turn.name}: cannot copy {dest}: {exc}")

    def _cli_for(self, request: Request) -> Cli:
        """The running CLI if it was started for this kind of turn and is in the requested session; else a new one."""
        if self.cli is not None and (self.cli.key != request.cli_key or self.cli.session != request.session):
            self._close_cli("the next turn needs another argv, env or session")
        if self.cli is None:
            self.cli = Cli(request, self.workspace)
            self.selector.register(self.cli.stdout, selectors.EVENT_READ, "stdout")
            self.selector.register(self.cli.stderr, selectors.EVENT_READ, "stderr")
            log(f"CLI {self.cli.pid} started" + (f", resuming {request.session}" if request.session else ""))
        return self.cli

    def _check_stop(self) -> None:
        """End the turn's CLI when the orchestrator asks (the turn passed a limit): the turn ends with its status."""
        assert self.turn is not None
        if self.cli is not None and os.path.exists(os.path.join(self.input_dir, self.turn.name + STOP_SUFFIX)):
            self._close_cli(f"the orchestrator stopped turn {self.turn.name}", gently=False)

    def _check_interrupt(self) -> None:
        """Send the CLI an interrupt when the orchestrator asks for one, and once more if no result came a second
        later: one that arrives just after the user message, before the CLI starts the turn, is ignored."""
        assert self.turn is not None
        turn, now = self.turn, time.monotonic()
        if self.cli is None or turn.interrupts_sent >= 2 or now - turn.interrupted_at < INTERRUPT_RESEND_SECONDS:
            return
        if os.path.exists(os.path.join(self.input_dir, turn.name + INTERRUPT_SUFFIX)):
            turn.interrupts_sent += 1
            turn.interrupted_at = now
            log(f"turn {turn.name}: interrupting" + (" again" if turn.interrupts_sent > 1 else ""))
            self.cli.interrupt()

    def _check_decisions(self) -> None:
        """Answer the CLI's permission requests the orchestrator has decided."""
        assert self.turn is not None
        turn = self.turn
        for number, (request_id, tool_input) in list(turn.waiting.items()):
            path = os.path.join(self.input_dir, decision_name(turn.name, number))
            try:
                with open(path, "rb") as decision_file:
                    decision = decision_file.read(MAX_DECISION_BYTES)
            except FileNotFoundError:
                continue
            except OSError as exc:  # never the orchestrator's (it links a finished file in place): wait for it
                log(f"turn {turn.name}: decision {number} not readable yet ({exc})")
                continue
            del turn.waiting[number]
            response = permission_response(decision, tool_input)
            log(f"turn {turn.name}: permission request {number}: {response['behavior']}")
            if self.cli is not None:
                self.cli.send({"type": "control_response", "response": {
                    "subtype": "success", "request_id": request_id, "response": response}})

    # ---- the CLI's output ----

    def _on_stdout(self) -> None:
        if self.cli is None:  # ended while handling another event of the same wake-up
            return
        try:
            data = os.read(self.cli.stdout, READ_CHUNK)
        except BlockingIOError:
            return
        if not data:
            self._cli_ended()
            return
        for piece, whole, head in self.cli.lines(data):
            if self.turn is not None:
                self.turn.output(piece + b"\n" if whole else piece)
            if whole:
                self._on_line(piece if piece.startswith(head) else b"", head)

    def _on_line(self, line: bytes, head: bytes) -> None:
        """A whole line of the CLI's (`line` is empty when it was too long to keep)."""
        assert self.cli is not None
        data = peek(line)
        kind = "result" if head.startswith(RESULT_HEAD) else data.get("type")
        session = data.get("session_id")
        if kind in ("system", "result") and isinstance(session, str):
            self.cli.session = session
        if kind == "control_request":
            self._on_control_request(data)
        elif kind == "control_cancel_request" and self.turn is not None:
            self.turn.cancel(str(data.get("request_id")))
        if kind == "result":
            self._end_turn(0)

    def _on_control_request(self, data: dict[str, Any]) -> None:
        """A permission request goes to the orchestrator (as a file of the turn); the CLI asks nothing else of a
        host (hooks, MCP servers) that this one can answer."""
        assert self.cli is not None
        request, request_id = data.get("request"), data.get("request_id")
        request = request if isinstance(request, dict) else {}
        tool_input = request.get("input")
        if (request.get("subtype") == "can_use_tool" and self.turn is not None and isinstance(request_id, str)
                and isinstance(tool_input, dict)):
            number = self.turn.ask(request_id, str(request.get("tool_name") or ""), tool_input)
            log(f"turn {self.turn.name}: permission request {number} for {str(request.get('tool_name'))[:60]}")
            return
        self.cli.send({"type": "control_response", "response": {
            "subtype": "error", "request_id": request_id, "error": "not supported by this host"}})

    def _on_stderr(self) -> None:
        if self.cli is None:  # its stdout ended first, in the same wake-up
            return
        try:
            data = os.read(self.cli.stderr, READ_CHUNK)
        except BlockingIOError:
            return
        if data and self.turn is not None:
            self.turn.error(data)
        elif data:
            log(f"CLI {self.cli.pid} between turns: {data[:300]!r}")

    def _cli_ended(self) -> None:
        assert self.cli is not None
        cli, self.cli = self.cli, None
        for fd in (cli.stdout, cli.stderr):
            self.selector.unregister(fd)
        with contextlib.suppress(BlockingIOError, OSError):
            rest = os.read(cli.stderr, READ_CHUNK)
            if rest and self.turn is not None:
                self.turn.error(rest)
        status = cli.close()
        log(f"CLI {cli.pid} ended with {status}" + (" during a turn" if self.turn else ""))
        if self.turn is not None:
            self._end_turn(status)

    def _end_turn(self, code: int) -> None:
        if self.turn is None:
            return
        self.turn.end(code)
        log(f"turn {self.turn.name}: ended ({code})")
        self.turn = None
        self.idle_since = time.monotonic()

    def _end_idle_cli(self) -> None:
        if self.cli is not None and self.turn is None and time.monotonic() - self.idle_since >= self.hot_idle:
            self._close_cli(f"no turn for {self.hot_idle:g} s")

    def _close_cli(self, why: str, gently: bool = True) -> None:
        assert self.cli is not None
        log(f"closing CLI {self.cli.pid}: {why}")
        for fd in (self.cli.stdout, self.cli.stderr):
            self.selector.unregister(fd)
        status = self.cli.close(gently)
        cli, self.cli = self.cli, None
        log(f"CLI {cli.pid} ended with {status}")
        if self.turn is not None:
            self._end_turn(status)


def main() -> int:
    return Host().run()


if __name__ == "__main__":
    sys.exit(main())
