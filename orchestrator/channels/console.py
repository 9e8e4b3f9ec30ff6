"""The terminal as a chat: each line typed is a message to one local chat; answers print as they stream.

Approval requests print as text; while one this console showed waits, a line that starts with /allow, /always,
/deny or /answer decides the latest one (as the operator "console", who is the sender of every message typed
here, so the one who may decide). What the agent wrote is printed without control characters: an escape
sequence in it could rewrite what the terminal shows (a request's command, say).
"""

from __future__ import annotations

import asyncio
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import TextIO

from orchestrator import disk
from orchestrator.channels import (
    Act,
    ApprovalView,
    Attachment,
    AttachmentRefused,
    CardAction,
    Incoming,
    OutFile,
    Outgoing,
    Submit,
)

CONSOLE_CHAT_ID = "console"
OPERATOR = "console"  # the sender of what is typed here, and so who decides here
DECISIONS = ("/allow", "/always", "/deny", "/answer")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all but tab and newline


class ConsoleChannel:
    def __init__(self, chat_id: str = CONSOLE_CHAT_ID, source: TextIO = sys.stdin,
                 sink: TextIO = sys.stdout) -> None:
        self.chat_id = chat_id
        self.source = source
        self.sink = sink
        self._shown: dict[str, str] = {}  # what each streamed answer printed so far, by display id
        self._waiting: dict[str, ApprovalView] = {}  # approvals shown here that wait, by card id, latest last

    async def run(self, submit: Submit, act: Act) -> None:
        """Until end of input. Lines are read on a daemon thread: a blocked read never holds up exit."""
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str] = asyncio.Queue()

        def read() -> None:
            for line in self.source:
                loop.call_soon_threadsafe(lines.put_nowait, line)
            loop.call_soon_threadsafe(lines.put_nowait, "")

        threading.Thread(target=read, name="console input", daemon=True).start()
        while True:
            line = await lines.get()
            if not line:
                return
            text = line.strip()
            action = self._decision(text)
            if action is not None:
                reply = await act(action)
                self.write(f"{reply.toast}\n")
                if reply.view is not None and reply.view.outcome is not None:
                    self._waiting.pop(action.message_id, None)
            elif text:
                await submit(Incoming(chat_id=self.chat_id, message_id=f"console-{uuid.uuid4().hex}",
                                      sender_id=OPERATOR, text=text, trusted=True))

    def _decision(self, text: str) -> CardAction | None:
        """A typed decision on the latest approval that waits; None for a message."""
        command, _, rest = text.partition(" ")
        if command not in DECISIONS or not self._waiting:
            return None
        card, view = next(reversed(self._waiting.items()))
        rest = rest.strip()
        picked = _picked(view, rest) if command == "/answer" else None
        question, option = picked if picked else (None, None)
        return CardAction(key=view.key, choice=command[1:], operator_id=OPERATOR, chat_id=view.chat_id,
                          message_id=card, text="" if picked else rest, question=question, option=option)

    def display(self, chat_id: str, message_id: str, saved: str | None, save: Callable[[str], None]
                ) -> ConsoleDisplay:
        return ConsoleDisplay(self, message_id)

    async def deliver(self, item: Outgoing) -> None:
        if item.file is not None:
            caption = f": {item.text}" if item.text else ""
            self.write(f"[{item.file.kind} {item.file.name}, {disk.human(item.file.size)}{caption}]\n")
            return
        shown = self._shown.pop(item.card, "") if item.card else ""
        if shown and item.text.startswith(shown):
            self.write(f"{item.text[len(shown):]}\n")
        else:
            self.write(f"{chr(10) if shown else ''}{item.text}\n")

    async def show_approval(self, view: ApprovalView) -> str:
        card = f"approval-{view.key}"
        await self.update_approval(card, view)
        return card

    async def update_approval(self, message_id: str, view: ApprovalView) -> None:
        if view.outcome is None:
            self._waiting[message_id] = view
            self.write(_request_text(view))
        else:
            self._waiting.pop(message_id, None)
            self.write(_outcome_text(view))

    async def upload(self, chat_id: str, file: OutFile) -> str:
        return file.name  # the terminal shows a file's name and size only

    async def fetch_attachment(self, message_id: str, attachment: Attachment, max_bytes: int) -> bytes:
        raise AttachmentRefused("The terminal sends no files.")  # and none of its messages has any

    def health(self) -> str | None:
        return None

    def remember(self, display_id: str, shown: str) -> None:
        self._shown[display_id] = shown

    def write(self, text: str) -> None:
        self.sink.write(_CONTROL.sub("", text))
        self.sink.flush()


class ConsoleDisplay:
    def __init__(self, channel: ConsoleChannel, display_id: str) -> None:
        self.channel = channel
        self.display_id = display_id
        self.shown = ""

    async def start(self) -> None:
        pass

    async def update(self, text_so_far: str) -> None:
        if text_so_far.startswith(self.shown):
            self.channel.write(text_so_far[len(self.shown):])
            self.shown = text_so_far

    async def end(self) -> str | None:
        if not self.shown:
            return None
        self.channel.remember(self.display_id, self.shown)
        return self.display_id


def _options(view: ApprovalView) -> list[tuple[int, int]]:
    """(question, option) of every option of the request's questions, in the order they are numbered from 1."""
    return [(number, index) for number, question in enumerate(view.questions)
            for index in range(len(question.options))]


def _picked(view: ApprovalView, text: str) -> tuple[int, int] | None:
    """The option `text` numbers ("2": the second listed), or None when it is a typed answer."""
    options = _options(view)
    number = int(text) if text.isdecimal() and len(text) <= 3 else 0
    return options[number - 1] if 1 <= number <= len(options) else None


def _request_text(view: ApprovalView) -> str:
    lines = [f"[approval] Approval needed: {view.tool}"]
    lines += [f"  {label}: {_indented(text)}" for label, text in view.details]
    numbers = iter(range(1, len(_options(view)) + 1))
    for question in view.questions:
        lines.append(f"  {question.header + ': ' if question.header else ''}{_indented(question.text)}")
        lines += [f"    {next(numbers)}. {option}" for option in question.options]
    lines.append("Answer with /answer <number> or /answer <text>, or /deny [reason]." if view.questions
                 else "Answer with /allow, /always (this tool in this chat), or /deny [reason].")
    return "\n".join(lines) + "\n"


def _outcome_text(view: ApprovalView) -> str:
    by = f" by {view.decided_by}" if view.decided_by else ""
    when = time.strftime(" at %H:%M UTC", time.gmtime(view.decided_at)) if view.decided_at is not None else ""
    return f"[approval] {view.outcome}{by}{when}\n"


def _indented(text: str) -> str:
    return text.replace("\n", "\n    ")
