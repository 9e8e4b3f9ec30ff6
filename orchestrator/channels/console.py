"""The terminal as a chat: each line typed is a message to one local chat; answers print as they stream."""

from __future__ import annotations

import asyncio
import sys
import threading
import uuid
from typing import TextIO

from orchestrator.channels import Incoming, Submit

CONSOLE_CHAT_ID = "console"


class ConsoleChannel:
    def __init__(self, chat_id: str = CONSOLE_CHAT_ID, source: TextIO = sys.stdin,
                 sink: TextIO = sys.stdout) -> None:
        self.chat_id = chat_id
        self.source = source
        self.sink = sink

    async def run(self, submit: Submit) -> None:
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
            if text:
                await submit(Incoming(chat_id=self.chat_id, message_id=f"console-{uuid.uuid4().hex}",
                                      sender_id="console", text=text))

    def reply_to(self, chat_id: str, message_id: str) -> ConsoleReply:
        return ConsoleReply(self.sink)

    async def notify(self, chat_id: str, text: str) -> None:
        _write(self.sink, f"[{text}]\n")


class ConsoleReply:
    def __init__(self, sink: TextIO) -> None:
        self.sink = sink
        self.shown = ""

    async def progress(self, text_so_far: str) -> None:
        if text_so_far.startswith(self.shown):
            _write(self.sink, text_so_far[len(self.shown):])
            self.shown = text_so_far

    async def finish(self, text: str) -> None:
        rest = text[len(self.shown):] if text.startswith(self.shown) else f"\n{text}"
        _write(self.sink, f"{rest}\n")

    async def fail(self, reason: str) -> None:
        _write(self.sink, f"{chr(10) if self.shown else ''}error: {reason}\n")


def _write(sink: TextIO, text: str) -> None:
    sink.write(text)
    sink.flush()
