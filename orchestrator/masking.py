"""Secrets kept out of what the bot says. Every text for a chat (answers, failures, notices, the streaming
card while a turn runs, and approval cards: what the agent asks to run is its text too) has the values of the
secret settings replaced by a mask, so an agent that prints its environment shows the chat the mask, not the key.
The store masks what it keeps; the channel wrapper masks what leaves.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterable

from orchestrator.channels import (
    Act,
    ActionReply,
    ApprovalView,
    Attachment,
    CardAction,
    Channel,
    DeliveryFailed,
    OutFile,
    Outgoing,
    Question,
    Submit,
    TurnDisplay,
)

# Not `***` (as in the logs): in card markdown that is a rule or the start of bold italics.
MASK = "[secret]"
FILE_CHUNK = 1024**2


class Masker:
    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first: a secret that contains another is masked whole.
        self.secrets = sorted({secret for secret in secrets if secret}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text

    def in_file(self, path: str) -> bool:
        """Whether a file holds a secret: read in chunks that overlap by the longest secret's length."""
        needles = [secret.encode() for secret in self.secrets]
        if not needles:
            return False
        overlap = max(map(len, needles)) - 1
        with open(path, "rb") as file:
            tail = b""
            while chunk := file.read(FILE_CHUNK):
                window = tail + chunk
                if any(needle in window for needle in needles):
                    return True
                tail = window[-overlap:] if overlap else b""
        return False

    def view(self, view: ApprovalView) -> ApprovalView:
        """Every text of an approval card masked: the tool, the details, the questions, the outcome."""
        return dataclasses.replace(
            view, tool=self(view.tool), details=tuple((self(label), self(text)) for label, text in view.details),
            questions=tuple(Question(self(question.text), self(question.header), tuple(map(self, question.options)))
                            for question in view.questions),
            outcome=None if view.outcome is None else self(view.outcome))

    def settled(self, text: str) -> str:
        """Streamed text, masked, less a tail that could be the start of a secret whose rest is still to come
        (shown with the next update, masked if it was one)."""
        masked = self(text)
        tail = max((k for secret in self.secrets for k in range(len(secret) - 1, 0, -1)
                    if masked.endswith(secret[:k])), default=0)
        return masked[:len(masked) - tail]


class MaskedDisplay:
    def __init__(self, display: TurnDisplay, mask: Masker) -> None:
        self.display = display
        self.mask = mask

    async def start(self) -> None:
        await self.display.start()

    async def update(self, text_so_far: str) -> None:
        await self.display.update(self.mask.settled(text_so_far))

    async def end(self) -> str | None:
        return await self.display.end()


class MaskedChannel:
    """A channel whose every text to a chat is masked: outbox items (also those other processes queued), streamed
    turns, approval cards (also the one a click's answer shows)."""

    def __init__(self, channel: Channel, mask: Masker) -> None:
        self.channel = channel
        self.mask = mask

    async def run(self, submit: Submit, act: Act) -> None:
        async def masked_act(action: CardAction) -> ActionReply:
            reply = await act(action)  # its toast may quote the outcome: what was typed, an option the agent wrote
            view = None if reply.view is None else self.mask.view(reply.view)
            return dataclasses.replace(reply, toast=self.mask(reply.toast), view=view)

        await self.channel.run(submit, masked_act)

    def display(self, chat_id: str, message_id: str, saved: str | None, save: Callable[[str], None]) -> TurnDisplay:
        return MaskedDisplay(self.channel.display(chat_id, message_id, saved, save), self.mask)

    async def deliver(self, item: Outgoing) -> None:
        file = item.file and dataclasses.replace(item.file, name=self.mask(item.file.name))
        await self.channel.deliver(dataclasses.replace(item, text=self.mask(item.text), file=file))

    async def upload(self, chat_id: str, file: OutFile) -> str:
        """A file is not masked (its bytes may be anything) but refused for good when it holds a secret."""
        if await asyncio.to_thread(self.mask.in_file, file.path):
            raise DeliveryFailed("it holds a secret of the bot's settings", permanent=True)
        return await self.channel.upload(chat_id, dataclasses.replace(file, name=self.mask(file.name)))

    async def show_approval(self, view: ApprovalView) -> str:
        return await self.channel.show_approval(self.mask.view(view))

    async def update_approval(self, message_id: str, view: ApprovalView) -> None:
        await self.channel.update_approval(message_id, self.mask.view(view))

    async def fetch_attachment(self, message_id: str, attachment: Attachment, max_bytes: int) -> bytes:
        return await self.channel.fetch_attachment(message_id, attachment, max_bytes)

    def health(self) -> str | None:
        return self.channel.health()
