"""The Claude Code CLI: the argv of one turn, stream-json parsed into typed events, and a turn's outcome.

Pure: no I/O. The prompt is never part of the argv; it reaches the CLI as stdin data, so a message that
starts with `-` or looks like a flag is just text.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from orchestrator.channels import OutFile
from orchestrator.config import AgentSettings, ChatOptions

UNKNOWN_SESSION = "No conversation found with session ID"
# The CLI's session ids are UUIDs; anything else in an init or result line was forged (it would be stored and
# passed to --resume= later), so it is ignored.
_SESSION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
ERROR_SHOWN = 500  # characters of the CLI's own error text shown in the chat
MAX_COST_USD = 10_000.0  # a process's running total above this is not believed
MAX_DURATION_MS = 10**10


# What Claude is told of the chat around it: where the user's files are and how to send files back (files_out).
CHAT_PROMPT = ("You are answering in a Feishu chat. Files the user sends are saved under /workspace/inbox/. To send "
               "a file to the chat, write it into /workspace/outbox/ or run `send-file PATH [caption]`: what the "
               "outbox holds is sent after your answer (images as images), then removed from it.")


def cli_argv(agent: AgentSettings, chat: ChatOptions) -> list[str]:
    """The argv of a chat's long-lived CLI process (the agent host adds `--resume=<session>`): turns go to its
    stdin as stream-json lines, so no chat text is ever part of it. A chat that asks for approvals gets the CLI's
    permission prompts on its stdio (the agent host hands them to the orchestrator), except for `auto_allow`'s
    rules, which the CLI's own matcher lets through (it splits compound shell commands; ours would not)."""
    argv = ["claude", "-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose",
            "--permission-mode", chat.permission_mode, "--append-system-prompt", CHAT_PROMPT]
    if chat.asks_approval:
        # No settings files: the agent can write them (the workspace's .claude/, a cloned repository's, the config
        # dir's), and the CLI honours the permission rules in them, even live (measured: a file allowing Bash made
        # every later Bash call run unasked, ~5 s after it was written).
        argv += ["--permission-prompt-tool", "stdio", "--setting-sources", ""]
        argv += [f"--allowedTools={rule}" for rule in chat.auto_allow]
    if agent.model:
        argv += ["--model", agent.model]
    return argv + list(agent.extra_args)


@dataclass(frozen=True)
class Init:
    session_id: str
    model: str = ""


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class ToolUse:
    name: str
    input: dict


@dataclass(frozen=True)
class Result:
    is_error: bool
    subtype: str
    text: str = ""
    errors: tuple[str, ...] = ()
    session_id: str = ""
    cost_usd: float | None = None
    duration_ms: int | None = None
    num_turns: int | None = None


@dataclass(frozen=True)
class Unparsed:
    """A line that is not a stream-json object (a warning the CLI printed, a torn write)."""

    line: str


Event = Init | Text | ToolUse | Result | Unparsed


def parse_line(line: str) -> list[Event]:
    """The events in one line of stream-json output; none for lines that carry nothing we use."""
    line = line.strip()
    if not line:
        return []
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: a forged line nested thousands deep
        return [Unparsed(line)]
    if not isinstance(data, dict):
        return [Unparsed(line)]
    kind = data.get("type")
    if kind == "system" and data.get("subtype") == "init":
        return [Init(session_id=_session_id(data), model=str(data.get("model", ""))[:100])]
    if kind == "assistant":
        return _assistant_events(data.get("message"))
    if kind == "result":
        return [_result(data)]
    return []


def _assistant_events(message: object) -> list[Event]:
    """The text and tool-use blocks of an assistant line; what is not shaped like one is skipped."""
    content = message.get("content") if isinstance(message, dict) else None
    events: list[Event] = []
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str) and block["text"]:
            events.append(Text(block["text"]))
        elif block.get("type") == "tool_use":
            tool_input = block.get("input")
            events.append(ToolUse(name=str(block.get("name", "")),
                                  input=tool_input if isinstance(tool_input, dict) else {}))
    return events


def _session_id(data: dict) -> str:
    session_id = data.get("session_id")
    return session_id if isinstance(session_id, str) and _SESSION_ID.fullmatch(session_id) else ""


def _result(data: dict) -> Result:
    errors = data.get("errors") or []
    return Result(
        is_error=bool(data.get("is_error")),
        subtype=str(data.get("subtype", "")),
        text=str(data.get("result") or ""),
        errors=tuple(str(e) for e in errors) if isinstance(errors, list) else (str(errors),),
        session_id=_session_id(data),
        cost_usd=_number(data.get("total_cost_usd"), float, MAX_COST_USD),
        duration_ms=_number(data.get("duration_ms"), int, MAX_DURATION_MS),
        num_turns=_number(data.get("num_turns"), int, MAX_DURATION_MS),
    )


def _number(value: object, kind: type[float] | type[int], most: float) -> Any:
    """A result's number as `kind`, or None when it is not one a CLI could have meant (the line is the agent's to
    forge: infinity, 1e300, a string or a bool would break the store and `orchestrator status`)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    if kind is int and value != int(value):
        return None
    return kind(value) if 0 <= value <= most else None


@dataclass
class Transcript:
    """What a turn has said so far, folded from its events; its text kept up to `answer_bytes` (UTF-8)."""

    answer_bytes: int = 1_000_000
    session_id: str | None = None
    texts: list[str] = field(default_factory=list)
    result: Result | None = None
    tools_used: int = 0
    truncated: bool = False  # text past `answer_bytes` was dropped
    _kept: int = 0

    def add(self, event: Event) -> None:
        match event:
            case Init(session_id=session_id) if session_id:
                self.session_id = session_id
            case Text(text=text):
                self._keep(text)
            case ToolUse():
                self.tools_used += 1
            case Result():
                self.result = event
                self.session_id = event.session_id or self.session_id

    def _keep(self, text: str) -> None:
        text = text.encode("utf-8", "replace").decode()  # a lone surrogate (a valid JSON escape) breaks every write
        separator = 2 if self.texts else 0  # the "\n\n" that joins it to the text before counts too
        room = self.answer_bytes - self._kept - separator
        if self.truncated or len(text.encode()) > room:  # nothing after the cut: the note marks where it is
            text = "" if self.truncated else text.encode()[:max(0, room)].decode(errors="ignore")
            self.truncated = True
        if text:
            self.texts.append(text)
            self._kept += separator + len(text.encode())

    @property
    def text_so_far(self) -> str:
        text = "\n\n".join(self.texts)
        if self.truncated:
            text += f"\n\n(The answer was cut here: it was longer than {self.answer_bytes:,} bytes.)"
        return text


@dataclass(frozen=True)
class Answer:
    text: str
    session_id: str | None
    cost_usd: float | None = None
    duration_ms: int | None = None
    files: tuple[tuple[OutFile, str], ...] = ()  # sent after the text, each with its caption (files_out)
    turn: str = ""  # the turn that gave it: the files it sends are in that turn's outbox


@dataclass(frozen=True)
class Failure:
    """A turn that ended without an answer. `reason` is one sentence the user is shown."""

    reason: str
    unknown_session: bool = False
    partial_text: str = ""
    detail: str = ""  # for the operator's log only: it may hold what the chat must not see


def outcome(turn: str, transcript: Transcript, exit_code: int | None, stderr: str) -> Answer | Failure:
    """Decide how the finished turn `turn` ended: its answer, or why there is none."""
    result = transcript.result
    if UNKNOWN_SESSION in stderr or (result and any(UNKNOWN_SESSION in e for e in result.errors)):
        return Failure("The previous conversation could not be found.", unknown_session=True)
    if result is None:
        return Failure(f"Claude Code stopped in the middle of this answer (exit code {exit_code}). The conversation "
                       "is kept: your next message continues it, and nothing of this one runs again unless you ask.",
                       partial_text=transcript.text_so_far, detail=_last_line(stderr) or "no output")
    if result.is_error:
        detail = "; ".join(result.errors) or result.text or result.subtype
        if len(detail) > ERROR_SHOWN:  # the CLI's words (the API's error, say) help the user; a page of them does not
            detail = detail[:ERROR_SHOWN] + "…"
        return Failure(f"Claude Code reported an error: {detail}", partial_text=transcript.text_so_far)
    return Answer(  # all it said, not only its last words: the chat saw the rest streaming
        text=transcript.text_so_far or result.text or "(Claude Code finished without any text.)",
        session_id=transcript.session_id,
        cost_usd=result.cost_usd,
        duration_ms=result.duration_ms,
        turn=turn,
    )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
