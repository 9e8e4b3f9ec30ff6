"""Where messages come from and answers go: the terminal, or Feishu."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Incoming:
    """One user message, parsed by its channel."""

    chat_id: str
    message_id: str
    sender_id: str
    text: str
    chat_name: str = ""
    kind: str = "text"  # the chat's message type; only text reaches the agent
    trusted: bool = False  # the local terminal: no access check


@dataclass(frozen=True)
class Outgoing:
    """One thing to say in a chat, from the outbox."""

    chat_id: str
    text: str
    key: str  # the same for every attempt at this item, so the chat can drop a repeat
    reply_to: str | None = None
    card: str | None = None  # a streaming card to finish with this text


class DeliveryFailed(Exception):
    """A send did not go through. `retry_after` is the server's hint; `permanent` means never retry."""

    def __init__(self, reason: str, retry_after: float | None = None, permanent: bool = False) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.permanent = permanent


Submit = Callable[[Incoming], Awaitable[None]]


class TurnDisplay(Protocol):
    """How a running turn shows in its chat. Best effort: these never raise."""

    async def start(self) -> None: ...

    async def update(self, text_so_far: str) -> None: ...

    async def end(self) -> str | None:
        """Stop showing work; the id of the card the final text should finish, if one was shown."""


class Channel(Protocol):
    async def run(self, submit: Submit) -> None:
        """Receive messages and hand each to `submit` until the channel ends (or is cancelled)."""

    def display(self, chat_id: str, message_id: str, saved: str | None, save: Callable[[str], None]) -> TurnDisplay:
        """How this message's turn shows in its chat. `save` keeps what the display made (a card, a reaction)
        with the message, and `saved` hands it back after a restart, so the same card goes on."""

    async def deliver(self, item: Outgoing) -> None:
        """Send one outbox item; raise DeliveryFailed when it did not go through."""

    def health(self) -> str | None:
        """None when the channel works; otherwise what is wrong. Called from another thread."""
