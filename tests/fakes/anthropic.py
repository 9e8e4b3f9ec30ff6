"""A fake Anthropic Messages API that the real `claude` CLI talks to through ANTHROPIC_BASE_URL.

It speaks the real wire protocol (POST /v1/messages, SSE events message_start … message_stop, or one
JSON message when stream is false) and answers by what the latest user prompt asks for:

- `RUN_BASH: <command>`  say `Running it now.` and ask for a Bash tool_use; after its result, `ran: <result>`
                       (a denied call's result too: the CLI's refusal text, or the deny message)
- `WRITE_FILE: <path> <text>`  say `Writing it now.` and ask for a Write tool_use (file_path, content); after its
                       result, `ran: <result>`
- `ASK_USER: <question> | <option> | <option> [| ...]`  say `Let me ask.` and ask for an AskUserQuestion tool_use
                       with that one question (header `Choice`, single select; the CLI takes 2 to 4 options and
                       returns an error for other counts without asking); after its result, `answered: <result>`
- `SLOW <seconds>`       stream a first piece of text, wait, then finish
- `SILENT <seconds>`     wait before sending anything at all
- `STREAM <n> <gap>`     answer in n text blocks `part i of n.`, `gap` seconds apart
- `LONG_ANSWER <bytes>`  answer with `long_answer(bytes)`: numbered paragraphs and a code block, at least that long
- `TOKENS <in> <out> [<cache written> <cache read>]`  report these token counts (default 10 in, 10 out)
- anything else          `Fake answer to: <prompt>`

A prompt sent after an interrupt comes in one user message with the refused tool's result: it is answered afresh;
text the CLI adds next to a tool result (a message sent mid-turn) is not, the result is.

Every request body is recorded in `requests`, so a test can see what the CLI sent (resumed history); the usage
the fake reported for each (the API's `usage` fields, and `model`) in `usages`, and the bytes of its answer in
`responses`. Given an `api_key`, it answers any request without that key (x-api-key, or Authorization: Bearer)
with 401, as the real API does.
"""

from __future__ import annotations

import json
import re
import socketserver
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_BASH = re.compile(r"RUN_BASH:\s*(.+)", re.DOTALL)
_WRITE = re.compile(r"WRITE_FILE:\s*(\S+)\s+(.+)", re.DOTALL)
_ASK = re.compile(r"ASK_USER:\s*(.+)", re.DOTALL)
_LONG_ANSWER = re.compile(r"LONG_ANSWER\s+(\d{1,7})")
_SLOW = re.compile(r"SLOW\s+(\d+(?:\.\d+)?)")
_SILENT = re.compile(r"SILENT\s+(\d+(?:\.\d+)?)")
_STREAM = re.compile(r"STREAM\s+(\d+)\s+(\d+(?:\.\d+)?)")
_INTERRUPTED = "[Request interrupted by user"
_TOKENS = re.compile(r"TOKENS\s+(\d+)\s+(\d+)(?:\s+(\d+)\s+(\d+))?")


def text_of(content: Any) -> str:
    """The text of a message's content, without the CLI's <system-reminder> blocks."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if block.get("type") == "text" and not block.get("text", "").startswith("<system-reminder>"):
            parts.append(block["text"])
        elif block.get("type") == "tool_result":
            parts.append(text_of(block.get("content")))
    return "\n".join(parts)


def latest_user_blocks(body: dict[str, Any]) -> list[dict[str, Any]]:
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            content = message.get("content")
            return [{"type": "text", "text": content}] if isinstance(content, str) else content
    return []


class _UnixHTTPServer(socketserver.ThreadingUnixStreamServer):
    """http.server's handlers on a unix socket: a peer there has no address, which the handlers' logging reads."""

    daemon_threads = True

    def get_request(self) -> tuple[Any, Any]:
        connection, _ = super().get_request()
        return connection, ("unix", 0)


class FakeAnthropic:
    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key  # the only key it accepts; None: any
        self.requests: list[dict[str, Any]] = []
        self.arrivals: list[float] = []  # time.monotonic() when each of `requests` arrived (benchmarks split a turn)
        self.api_keys: set[str] = set()  # the x-api-key each request came with
        self.usages: list[dict[str, Any]] = []  # the usage it reported for each Messages request, in order
        self.responses: list[bytes] = []  # the body it sent for each, byte for byte
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._unix: list[_UnixHTTPServer] = []

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeAnthropic:
        self._thread.start()
        return self

    def serve_unix(self, path: Path) -> None:
        """The same API on a unix socket too (until `stop`): for clients that cannot reach the host's 127.0.0.1,
        through a relay that mounts the socket's folder (tests/swarm.py's nodes)."""
        server = _UnixHTTPServer(str(path), self._handler_class())
        self._unix.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        for server in [self._server, *self._unix]:
            server.shutdown()
            server.server_close()

    def prompts(self) -> list[str]:
        """The text of every user message of every recorded request, in order."""
        with self._lock:
            bodies = list(self.requests)
        return [text_of(m.get("content")) for body in bodies for m in body.get("messages", [])
                if m.get("role") == "user"]

    def first_asked(self, text: str) -> float | None:
        """When the first request whose latest user message mentions `text` arrived (time.monotonic()), or None."""
        with self._lock:
            timed = list(zip(self.requests, self.arrivals, strict=True))
        return next((at for body, at in timed if text in text_of(latest_user_blocks(body))), None)

    def requests_mentioning(self, text: str) -> list[dict[str, Any]]:
        with self._lock:
            return [body for body in self.requests if text in json.dumps(body)]

    def _record(self, body: dict[str, Any], api_key: str) -> None:
        with self._lock:
            self.requests.append(body)
            self.arrivals.append(time.monotonic())
            self.api_keys.add(api_key)

    def _answered(self, usage: dict[str, Any], response: bytes) -> None:
        with self._lock:
            self.usages.append(usage)
            self.responses.append(response)

    def _authorized(self, headers: Any) -> bool:
        """Whether the request has the key; a refused one's x-api-key is recorded too."""
        given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
        if self.api_key is None or given == self.api_key:
            return True
        with self._lock:
            self.api_keys.add(headers.get("x-api-key", ""))
        return False

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if not fake._authorized(self.headers):
                    self._json(401, {"type": "error", "error": {"type": "authentication_error",
                                                                "message": "invalid x-api-key"}})
                    return
                if not self.path.startswith("/v1/messages") or self.path.startswith("/v1/messages/count"):
                    self._json(200, {"input_tokens": 10}) if "count_tokens" in self.path else self._json(
                        404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}})
                    return
                fake._record(body, self.headers.get("x-api-key", ""))
                blocks, delay_before, delay_mid, block_gap = plan_answer(body)
                usage = planned_usage(body)
                if delay_before:
                    time.sleep(delay_before)
                # Recorded before it is sent, as the API bills a request: a test that sees the answer arrive
                # sees its usage here too (recorded after, it raced the answer through the gateway and the CLI).
                if body.get("stream"):
                    events = [f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
                              for name, data in sse_events(body, blocks, usage)]
                    fake._answered({"model": body.get("model", "claude-fake"), **usage}, b"".join(events))
                    self._stream(events, delay_mid, block_gap)
                else:
                    data = json.dumps(message_json(body, blocks, usage)).encode()
                    fake._answered({"model": body.get("model", "claude-fake"), **usage}, data)
                    self._send_json(200, data)

            def do_GET(self) -> None:
                self._json(404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}})

            def do_HEAD(self) -> None:
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                self._send_json(status, json.dumps(payload).encode())

            def _send_json(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, events: list[bytes], delay_mid: float, block_gap: float) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("cache-control", "no-cache")
                self.send_header("connection", "close")
                self.end_headers()
                self.close_connection = True
                try:
                    for event in events:
                        self.wfile.write(event)
                        self.wfile.flush()
                        if event.startswith(b"event: content_block_delta") and delay_mid:
                            time.sleep(delay_mid)
                            delay_mid = 0
                        if event.startswith(b"event: content_block_stop") and block_gap:
                            time.sleep(block_gap)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the CLI went away mid-answer (a test killed or interrupted it)

        return Handler


def plan_answer(body: dict[str, Any]) -> tuple[list[dict[str, Any]], float, float, float]:
    """The content blocks to answer with, a delay before answering, one after the first piece of text, and
    one after each block."""
    blocks = latest_user_blocks(body)
    # After an interrupt the CLI sends the refused tool's result, a "[Request interrupted by user for tool use]" text
    # block and the next prompt in one user message; a message sent mid-turn comes as a text block next to the
    # running turn's tool result (measured, /work/notes/cli_approvals.md). Only what follows an interrupt is new.
    marks = [index for index, block in enumerate(blocks) if block.get("text", "").startswith(_INTERRUPTED)]
    later = blocks[marks[-1] + 1:] if marks else blocks
    if results := [block for block in later if block.get("type") == "tool_result"]:
        verb = "answered" if tool_names(body).get(results[-1].get("tool_use_id")) == "AskUserQuestion" else "ran"
        return [{"type": "text", "text": f"{verb}: {text_of(results[-1].get('content')).strip()}"}], 0, 0, 0
    prompt = text_of(later).strip()
    if requested := requested_tool(prompt):
        intro, name, tool_input = requested
        tool = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:20]}", "name": name, "input": tool_input}
        return [{"type": "text", "text": intro}, tool], 0, 0, 0
    if match := _LONG_ANSWER.search(prompt):
        return [{"type": "text", "text": long_answer(int(match.group(1)))}], 0, 0, 0
    if match := _STREAM.search(prompt):
        count, gap = int(match.group(1)), float(match.group(2))
        return [{"type": "text", "text": f"part {n} of {count}."} for n in range(1, count + 1)], 0, 0, gap
    silent = _SILENT.search(prompt)
    slow = _SLOW.search(prompt)
    answer = [{"type": "text", "text": f"Fake answer to: {prompt}"}]
    return answer, float(silent.group(1)) if silent else 0, float(slow.group(1)) if slow else 0, 0


def long_answer(size: int) -> str:
    """At least `size` bytes of plain words in numbered paragraphs, with a code block every 50 paragraphs: what a
    long answer looks like, and nothing a card or a text message would show otherwise."""
    paragraphs, length, number = [], 0, 0
    while length < size:
        number += 1
        if number % 50 == 0:
            paragraph = "```python\n" + "\n".join(f"print({number}, {line})" for line in range(30)) + "\n```"
        else:
            paragraph = f"Paragraph {number}: " + " ".join(f"word{n}" for n in range(number % 7, 60))
        paragraphs.append(paragraph)
        length += len(paragraph) + 2
    return "\n\n".join(paragraphs)


def tool_names(body: dict[str, Any]) -> dict[str, str]:
    """The name of every tool_use the assistant asked for in the history, by its id."""
    return {block["id"]: block.get("name", "") for message in body.get("messages", [])
            if message.get("role") == "assistant" and isinstance(message.get("content"), list)
            for block in message["content"] if block.get("type") == "tool_use" and "id" in block}


def requested_tool(prompt: str) -> tuple[str, str, dict[str, Any]] | None:
    """The text to say, and the tool and input to ask for, when the prompt asks for a tool call."""
    if match := _BASH.search(prompt):
        return "Running it now.", "Bash", {"command": match.group(1).strip(),
                                           "description": "run the requested command"}
    if match := _WRITE.search(prompt):
        return "Writing it now.", "Write", {"file_path": match.group(1), "content": match.group(2).strip()}
    if match := _ASK.search(prompt):
        question, *labels = [part.strip() for part in match.group(1).split("|")]
        options = [{"label": label, "description": f"Answer {label}"} for label in labels]
        # The CLI checks this input before it asks (measured, /work/notes/cli_approvals.md): header and each
        # option's description required, 2 to 4 options with distinct labels; other counts come back as errors.
        return "Let me ask.", "AskUserQuestion", {"questions": [
            {"question": question, "header": "Choice", "options": options, "multiSelect": False}]}
    return None


def planned_usage(body: dict[str, Any]) -> dict[str, int]:
    """The usage to report: what the latest prompt's `TOKENS in out [cache_written cache_read]` asks, or 10 and 10."""
    match = _TOKENS.search(text_of(latest_user_blocks(body)))
    counts = [int(n) for n in match.groups(default="0")] if match else [10, 10, 0, 0]
    return dict(zip(("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"),
                    counts, strict=True))


def _message_start(body: dict[str, Any], usage: dict[str, int]) -> dict[str, Any]:
    """As the API sends it: the input counts in full, one output token so far."""
    return {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
            "model": body.get("model", "claude-fake"), "content": [], "stop_reason": None,
            "stop_sequence": None, "usage": {**usage, "output_tokens": min(1, usage["output_tokens"])}}


def _stop_reason(blocks: list[dict[str, Any]]) -> str:
    return "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"


def message_json(body: dict[str, Any], blocks: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
    return {**_message_start(body, usage), "content": blocks, "stop_reason": _stop_reason(blocks), "usage": usage}


def sse_events(body: dict[str, Any], blocks: list[dict[str, Any]],
               usage: dict[str, int]) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": _message_start(body, usage)})]
    for index, block in enumerate(blocks):
        if block["type"] == "text":
            start = {"type": "text", "text": ""}
            text = block["text"]
            middle = max(1, len(text) // 2)
            deltas = [{"type": "text_delta", "text": part} for part in (text[:middle], text[middle:]) if part]
        else:
            start = {**block, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": json.dumps(block["input"])}]
        events.append(("content_block_start",
                       {"type": "content_block_start", "index": index, "content_block": start}))
        events += [("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
                   for d in deltas]
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    events.append(("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": _stop_reason(blocks), "stop_sequence": None},
                                     "usage": {"output_tokens": usage["output_tokens"]}}))
    events.append(("message_stop", {"type": "message_stop"}))
    return events


if __name__ == "__main__":
    server = FakeAnthropic().start()
    print(server.base_url, flush=True)
    threading.Event().wait()
