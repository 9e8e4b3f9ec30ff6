"""Where messages come from and answers go: the terminal, or Feishu."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Attachment:
    """A file that came with a message: Feishu's key for it, and what it is."""

    kind: str  # "image" or "file" (audio comes as a file; Feishu's resource API `type` is the same word)
    key: str  # image_key or file_key, validated ([A-Za-z0-9_-], bounded)
    name: str  # the event's file_name (files), or "" (images); NOT sanitised here (the middle does it)


class AttachmentRefused(Exception):
    """An attachment that could not be fetched; the message is for the user (no secret, no path)."""


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
    thread_id: str = ""  # the topic (thread) it was sent in, "" outside one
    attachments: tuple[Attachment, ...] = ()  # the files that came with it (at most 20)


@dataclass(frozen=True)
class OutFile:
    """A file the bot sends in a chat: a copy in the orchestrator's own folder, never one the agent can change."""

    kind: str  # "image" (sent with the image API) or "file"
    name: str  # as the chat shows it (safe: inbox.safe_name)
    path: str  # the copy on the host (root's), for the upload
    size: int


@dataclass(frozen=True)
class Outgoing:
    """One thing to say in a chat, from the outbox: text (finishing a streaming card), or a file uploaded before
    (`upload_key`) with its caption as the text."""

    chat_id: str
    text: str
    key: str  # the same for every attempt at this item, so the chat can drop a repeat
    reply_to: str | None = None
    card: str | None = None  # a streaming card to finish with this text
    file: OutFile | None = None
    upload_key: str | None = None  # the file's image_key or file_key, from `Channel.upload`


class DeliveryFailed(Exception):
    """A send did not go through. `retry_after` is the server's hint; `permanent` means never retry."""

    def __init__(self, reason: str, retry_after: float | None = None, permanent: bool = False) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.permanent = permanent


@dataclass(frozen=True)
class Question:
    """One question of the agent's AskUserQuestion: its options become buttons, and a text field takes any answer."""

    text: str
    header: str = ""
    options: tuple[str, ...] = ()  # the option labels, in order


@dataclass(frozen=True)
class ApprovalView:
    """What an approval card shows: who asked for what, who may decide, and once settled how it ended. Every text
    in it that came from the agent is bounded by the middle and escaped by the channel."""

    key: str  # the approval's random key: every button of the card carries it
    chat_id: str
    reply_to: str  # the user message whose turn asks
    tool: str  # the tool's name (Bash, Edit, WebFetch, AskUserQuestion, ...)
    details: tuple[tuple[str, str], ...]  # (label, text) lines: ("Command", "touch x"), ("File", ...), ("Diff", ...)
    approvers: tuple[str, ...]  # open ids of who may decide
    questions: tuple[Question, ...] = ()  # AskUserQuestion: answered instead of allowed or denied
    outcome: str | None = None  # None while it waits (buttons shown); else one line, e.g. "Allowed once"
    decided_by: str | None = None  # open id of who decided; None for a timeout, a shutdown, a turn that ended
    decided_at: float | None = None  # epoch seconds


@dataclass(frozen=True)
class CardAction:
    """A click on an approval card (or its form sent), parsed by the channel; nothing in it is trusted yet."""

    key: str  # the approval key the button carried
    choice: str  # "allow" (once), "always" (this tool in this chat), "deny", "answer" (a question)
    operator_id: str  # open id of who clicked
    chat_id: str  # the chat the card is in, as Feishu says
    message_id: str  # the card's message, as Feishu says
    text: str = ""  # the form's text field: a reason to deny, or a typed answer
    question: int | None = None  # "answer" by a button: which question (index) ...
    option: int | None = None  # ... and which of its options (index)


@dataclass(frozen=True)
class ActionReply:
    """The answer to a click, within Feishu's 3 s: a toast, and the card to show from now on (None: unchanged)."""

    toast: str
    level: str = "info"  # success, info, warning, error
    view: ApprovalView | None = None


Submit = Callable[[Incoming], Awaitable[None]]
Act = Callable[[CardAction], Awaitable[ActionReply]]


class TurnDisplay(Protocol):
    """How a running turn shows in its chat. Best effort: these never raise."""

    async def start(self) -> None: ...

    async def update(self, text_so_far: str) -> None: ...

    async def end(self) -> str | None:
        """Stop showing work; the id of the card the final text should finish, if one was shown."""


class Channel(Protocol):
    async def run(self, submit: Submit, act: Act) -> None:
        """Receive messages and hand each to `submit`, and clicks on approval cards to `act` (whose reply is shown
        to the clicker), until the channel ends (or is cancelled)."""

    def display(self, chat_id: str, message_id: str, saved: str | None, save: Callable[[str], None]) -> TurnDisplay:
        """How this message's turn shows in its chat. `save` keeps what the display made (a card, a reaction)
        with the message, and `saved` hands it back after a restart, so the same card goes on."""

    async def deliver(self, item: Outgoing) -> None:
        """Send one outbox item; raise DeliveryFailed when it did not go through."""

    async def upload(self, chat_id: str, file: OutFile) -> str:
        """Upload a file for a later `deliver`; its key. Raise DeliveryFailed when it did not go through (permanent
        when the chat's service refuses the file itself)."""

    async def show_approval(self, view: ApprovalView) -> str:
        """Send an approval card (a reply to `view.reply_to`); its message id. Raise DeliveryFailed when it did not
        go through."""

    async def update_approval(self, message_id: str, view: ApprovalView) -> None:
        """Show `view` in the approval card sent before (its buttons gone once it has an outcome). Raise
        DeliveryFailed when it did not go through."""

    async def fetch_attachment(self, message_id: str, attachment: Attachment, max_bytes: int) -> bytes:
        """The attachment's bytes, at most max_bytes (more: AttachmentRefused naming the limit)."""

    def health(self) -> str | None:
        """None when the channel works; otherwise what is wrong. Called from another thread."""
