"""The terminal as a chat: each line typed is a message to one local chat; answers print as they stream."""

from __future__ import annotations

import asyncio
import sys
import threading
import uuid
from collections.abc import Callable
from typing import TextIO

from orchestrator.channels import Incoming, Outgoing, Submit

CONSOLE_CHAT_ID = "console"


class ConsoleChannel:
    def __init__(self, chat_id: str = CONSOLE_CHAT_ID, source: TextIO = sys.stdin,
                 sink: TextIO = sys.stdout) -> None:
        self.chat_id = chat_id
        self.source = source
        self.sink = sink
        self._shown: dict[str, str] = {}  # what each streamed answer printed so far, by display id

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
                                      sender_id="console", text=text, trusted=True))

    def display(self, chat_id: str, message_id: str, saved: str | None, save: Callable[[str], None]
                ) -> ConsoleDisplay:
        return ConsoleDisplay(self, message_id)

    async def deliver(self, item: Outgoing) -> None:
        shown = self._shown.pop(item.card, "") if item.card else ""
        if shown and item.text.startswith(shown):
            self.write(f"{item.text[len(shown):]}\n")
        else:
            self.write(f"{chr(10) if shown else ''}{item.text}\n")

    def health(self) -> str | None:
        return None

    def remember(self, display_id: str, shown: str) -> None:
        self._shown[display_id] = shown

    def write(self, text: str) -> None:
        self.sink.write(text)
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
