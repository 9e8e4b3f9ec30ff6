"""Where messages come from and answers go: the terminal, or Feishu."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Incoming:
    """One user message, already parsed and allowed by its channel."""

    chat_id: str
    message_id: str
    sender_id: str
    text: str
    chat_name: str = ""


Submit = Callable[[Incoming], Awaitable[None]]


class Reply(Protocol):
    """The answer to one message, as it streams."""

    async def progress(self, text_so_far: str) -> None: ...

    async def finish(self, text: str) -> None: ...

    async def fail(self, reason: str) -> None: ...


class Channel(Protocol):
    async def run(self, submit: Submit) -> None:
        """Receive messages and hand each to `submit` until the channel ends (or is cancelled)."""

    def reply_to(self, chat_id: str, message_id: str) -> Reply: ...

    async def notify(self, chat_id: str, text: str) -> None:
        """Tell a chat something that is not an answer (a session was reset, a turn interrupted)."""
