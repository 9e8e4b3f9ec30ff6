"""A fake Claude Code CLI in long-lived stream-json mode, for the agent host's unit tests.

Run as `python stream_cli.py -p --input-format stream-json --output-format stream-json --verbose [--resume=<id>]`
(other arguments are accepted and ignored). Like the real one (reference/claude-cli.md, "Long-lived stream-json
mode"), it reads one JSON line per user message on stdin and answers each with a system/init line, an assistant
line and a result whose total_cost_usd is the running total of the process (+0.0006 a turn). What the user's text
asks for:

- `SLOW <s>`      wait s seconds before answering; an interrupt control_request meanwhile ends the turn at once
                  (a control_response, then a result with subtype error_during_execution)
- `CRASH`         SIGKILL itself after the init line (mid-turn)
- `TOOL <s>`      start a child process that sleeps s seconds (as a Bash tool call would), say `child <pid>`, then
                  wait as SLOW does
- `STDERR <text>` write text to stderr first, then answer
- `ENV <name>`    answer `<name>=<its value in the environment>`
- `LONG <n>`      an assistant line of n characters of text before the answer (the result stays short, as the
                  real CLI's does when the long text was not the last message)
- `ASK <tool> <json>`  a permission request (`control_request` can_use_tool) for that tool and input, as the CLI
                  sends one with `--permission-prompt-tool stdio`; it waits for the control_response and answers
                  `allowed: <updatedInput as JSON>` or `denied: <message>`; an interrupt meanwhile withdraws the
                  request (`control_cancel_request`) and ends the turn
- anything else   `Fake answer to: <text>`

`--resume=<id>` keeps that session id; an id starting with "dead" is unknown: the message the real CLI prints, and
exit status 1. Closing stdin ends it with status 0.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

COST_PER_TURN = 0.0006
_SLOW = re.compile(r"SLOW\s+(\d+(?:\.\d+)?)")
_TOOL = re.compile(r"TOOL\s+(\d+(?:\.\d+)?)")
_LONG = re.compile(r"LONG\s+(\d+)")
_ASK = re.compile(r"ASK\s+(\S+)\s+(.+)", re.DOTALL)


class Stdin:
    """Lines of fd 0, read without Python's buffering so that select() tells the truth about what is pending."""

    def __init__(self) -> None:
        self._buffer = b""
        self.closed = False

    def line(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next JSON line, or None at the timeout or at the end of input."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            if self.closed:
                return None
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([0], [], [], wait)[0]:
                return None
            data = os.read(0, 65536)
            self.closed = not data
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def text_of(message: dict[str, Any]) -> str:
    content = message.get("message", {}).get("content", "")
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content if block.get("type") == "text")


def answer_to(text: str) -> str:
    if text.startswith("ENV "):
        name = text.removeprefix("ENV ")
        return f"{name}={os.environ.get(name, '')}"
    return f"Fake answer to: {text}"


class FakeCli:
    def __init__(self, session: str) -> None:
        self.session = session
        self.turns = 0
        self.stdin = Stdin()
        self.pending: list[dict[str, Any]] = []  # user messages that came while a turn was running

    def serve(self) -> int:
        while True:
            message = self.pending.pop(0) if self.pending else self.stdin.line()
            if message is None:
                return 0
            if message.get("type") == "user":
                self.turn(text_of(message))
            elif message.get("type") == "control_request":
                self.control(message)  # between turns an interrupt has nothing to end

    def turn(self, text: str) -> None:
        if text.startswith("STDERR "):
            sys.stderr.write(text.removeprefix("STDERR ") + "\n")
            sys.stderr.flush()
        emit({"type": "system", "subtype": "init", "session_id": self.session, "cwd": os.getcwd(),
              "tools": [], "model": "fake"})
        if text == "CRASH":
            os.kill(os.getpid(), signal.SIGKILL)
        if tool := _TOOL.fullmatch(text):
            child = subprocess.Popen(["sleep", tool[1]])
            emit(self.assistant(f"child {child.pid}"))
        slow = _SLOW.fullmatch(text) or tool
        if slow and self.interrupted_within(float(slow[1])):
            emit(self.result("error_during_execution", None))
            return
        ask = _ASK.fullmatch(text)
        answer = self.permission(ask[1], json.loads(ask[2])) if ask else answer_to(text)
        if answer is None:
            emit(self.result("error_during_execution", None))
            return
        self.turns += 1
        if long := _LONG.fullmatch(text):
            emit(self.assistant("x" * int(long[1])))
        emit(self.assistant(answer))
        emit(self.result("success", answer))

    def assistant(self, text: str) -> dict[str, Any]:
        return {"type": "assistant", "session_id": self.session, "parent_tool_use_id": None,
                "message": {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": "fake",
                            "content": [{"type": "text", "text": text}]}}

    def interrupted_within(self, seconds: float) -> bool:
        """Wait, answering control requests; True if an interrupt came."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            line = self.stdin.line(left)
            if line is None and self.stdin.closed:
                time.sleep(left)  # the real CLI finishes the turn it is in
            if line is None:
                continue
            if line.get("type") == "user":
                self.pending.append(line)
            elif line.get("type") == "control_request" and self.control(line):
                return True
        return False

    def permission(self, tool: str, tool_input: dict[str, Any]) -> str | None:
        """Ask for permission and wait for the answer; what the turn then says, or None when interrupted."""
        request_id = str(uuid.uuid4())
        emit({"type": "control_request", "request_id": request_id,
              "request": {"subtype": "can_use_tool", "tool_name": tool, "input": tool_input, "tool_use_id": "toolu_1"}})
        while (line := self.stdin.line()) is not None:
            if line.get("type") == "control_response" and line["response"].get("request_id") == request_id:
                decision = line["response"]["response"]
                if decision["behavior"] == "allow":
                    return f"allowed: {json.dumps(decision['updatedInput'], sort_keys=True)}"
                return f"denied: {decision['message']}"
            if line.get("type") == "control_request" and self.control(line):
                emit({"type": "control_cancel_request", "request_id": request_id})
                return None
            if line.get("type") == "user":
                self.pending.append(line)
        return None

    def control(self, request: dict[str, Any]) -> bool:
        """Answer a control request; True if it asks for an interrupt."""
        emit({"type": "control_response",
              "response": {"subtype": "success", "request_id": request.get("request_id"), "response": {}}})
        return request.get("request", {}).get("subtype") == "interrupt"

    def result(self, subtype: str, answer: str | None) -> dict[str, Any]:
        return {"type": "result", "subtype": subtype, "is_error": subtype != "success", "num_turns": 1,
                "session_id": self.session, "total_cost_usd": round(self.turns * COST_PER_TURN, 6),
                **({"result": answer} if answer is not None else {})}


def main(argv: list[str]) -> int:
    resume = next((arg.removeprefix("--resume=") for arg in argv if arg.startswith("--resume=")), None)
    if resume is not None and resume.startswith("dead"):
        sys.stderr.write(f"No conversation found with session ID: {resume}\n")
        return 1
    return FakeCli(resume or str(uuid.uuid4())).serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
