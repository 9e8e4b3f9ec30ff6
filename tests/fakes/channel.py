"""A channel and a turn display for unit tests of the middle (a fake of our own seam, orchestrator.channels):
what a turn showed and what was delivered are recorded."""

from __future__ import annotations

from collections.abc import Callable

from orchestrator.channels import ApprovalView, Attachment, AttachmentRefused, DeliveryFailed, Outgoing


class RecordingDisplay:
    """A TurnDisplay that records the text each update showed."""

    def __init__(self) -> None:
        self.shown: list[str] = []

    async def start(self) -> None:
        pass

    async def update(self, text_so_far: str) -> None:
        self.shown.append(text_so_far)

    async def end(self) -> str | None:
        return None


class RecordingChannel(RecordingDisplay):
    """A channel whose every turn display is itself; it records what it delivers. Subclasses say how it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.delivered: list[Outgoing] = []
        self.cards: dict[str, list[ApprovalView]] = {}  # approval cards by message id: each version shown
        self.failing_cards = 0  # the next this many approval card sends or updates fail
        self.files: dict[str, bytes] = {}  # attachment bytes by key, for fetch_attachment

    def display(self, chat_id: str, message_id: str, saved: str | None,
                save: Callable[[str], None]) -> RecordingChannel:
        return self

    async def deliver(self, item: Outgoing) -> None:
        self.delivered.append(item)

    async def show_approval(self, view: ApprovalView) -> str:
        self._maybe_fail()
        card = f"card-{len(self.cards) + 1}"
        self.cards[card] = [view]
        return card

    async def update_approval(self, message_id: str, view: ApprovalView) -> None:
        self._maybe_fail()
        self.cards[message_id].append(view)

    def _maybe_fail(self) -> None:
        if self.failing_cards:
            self.failing_cards -= 1
            raise DeliveryFailed("the card could not be sent (a test's failure)", retry_after=0.01)

    async def fetch_attachment(self, message_id: str, attachment: Attachment, max_bytes: int) -> bytes:
        if attachment.key not in self.files:
            raise AttachmentRefused("it is not there any more")
        if len(self.files[attachment.key]) > max_bytes:
            raise AttachmentRefused(f"it is larger than {max_bytes} bytes")
        return self.files[attachment.key]

    def health(self) -> str | None:
        return None
