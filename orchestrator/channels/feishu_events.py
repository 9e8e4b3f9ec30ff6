"""`im.message.receive_v1` events → messages for the service, and `card.action.trigger` callbacks → clicks on
approval cards, or the reason one is ignored. Pure.

Works on the event as plain JSON (the `event` part of the v2 envelope), whichever way it arrived (the
long connection or the webhook), so malformed input is handled here and unit-tested without the SDK. A click is
as untrusted as a message: anyone can post a forged callback shape to a webhook that skips checks, and a card's
button values are ours only if Feishu says so; so every field is checked and bounded here, and the middle
(approvals) still checks the key, the chat, the card and who clicked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

from orchestrator.channels import Attachment, CardAction, Incoming
from orchestrator.ids import is_valid_chat_id

READABLE_TYPES = ("text", "post", "image", "file", "audio")  # the rest get a short "not supported" reply
# Files of one message: a post can hold many images; beyond this they are left out without a word (each costs a
# download and a turn's share of files.message_bytes, and 20 is more than people send at once).
MAX_ATTACHMENTS = 20
FILE_NAME_CHARS = 1000  # of a file's name as the event gives it (the middle makes the safe, shorter one)
AUDIO_NAME = "audio.opus"  # a voice message has no name; Feishu serves it as an Opus file
_KEY = re.compile(r"[A-Za-z0-9_-]{1,200}")  # an image_key or file_key: it goes into a URL path
_THREAD_ID = re.compile(r"omt_[A-Za-z0-9_-]{1,100}")
CHOICES = ("allow", "always", "deny", "answer")
FORM_TEXT_CHARS = 2000  # of a card's text field: a reason to deny, or a typed answer
MAX_INDEX = 99  # a question's or an option's index (a card has a handful)
_OPEN_ID = re.compile(r"ou_[A-Za-z0-9_-]{1,100}")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,100}")  # an approval key, a message id


@dataclass(frozen=True)
class Ignored:
    reason: str


def parse_message_event(event: Any, bot_open_id: str, require_mention: Callable[[str], bool]) -> Incoming | Ignored:
    if not isinstance(event, dict):
        return Ignored("malformed event: not an object")
    message, sender = event.get("message"), event.get("sender")
    if not isinstance(message, dict):
        return Ignored("malformed event: no message")
    if not isinstance(sender, dict):
        return Ignored("malformed event: no sender")
    chat_id, message_id = message.get("chat_id"), message.get("message_id")
    if not isinstance(message_id, str) or not message_id:
        return Ignored("malformed event: no message_id")
    if not is_valid_chat_id(chat_id):
        return Ignored(f"malformed event: chat_id {str(chat_id)[:80]!r} is not valid")
    sender_ids = sender.get("sender_id")
    sender_id = sender_ids.get("open_id") if isinstance(sender_ids, dict) else None
    if sender.get("sender_type") != "user":
        return Ignored(f"sent by {str(sender.get('sender_type') or 'an unknown sender')[:80]}, not a user")
    # A user's message without an open id could not be checked against allowed_users, approvers or budgets.
    if not is_open_id(sender_id):
        return Ignored(f"malformed event: sender open_id {_shown(sender_id)} is not valid")
    if sender_id == bot_open_id:
        return Ignored("the bot's own message")
    raw_mentions = message.get("mentions")
    mentions = [m for m in raw_mentions if isinstance(m, dict)] if isinstance(raw_mentions, list) else []
    mentioned = any(_mentions_bot(m, bot_open_id) for m in mentions)
    if message.get("chat_type") != "p2p" and require_mention(chat_id) and not mentioned:
        return Ignored("a group message that does not mention the bot")
    kind = message.get("message_type")
    kind = kind if isinstance(kind, str) and kind.isidentifier() else "unknown"
    if kind not in READABLE_TYPES:
        return Incoming(chat_id=chat_id, message_id=message_id, sender_id=sender_id, text="", kind=kind,
                        thread_id=_thread_id(message))
    try:
        content = json.loads(message.get("content") or "")
    except (TypeError, ValueError):
        return Ignored(f"malformed event: {kind} content is not JSON")
    if not isinstance(content, dict):
        return Ignored(f"malformed event: {kind} content is not an object")
    read = _read_content(kind, content)
    if isinstance(read, Ignored):
        return read
    raw_text, attachments = read
    text = "\n".join(line.strip() for line in replace_mentions(raw_text, mentions, bot_open_id).splitlines())
    text = _storable(text.strip())
    return Incoming(chat_id=chat_id, message_id=message_id, sender_id=sender_id,
                    text=text or ("" if attachments else "/help"), thread_id=_thread_id(message),
                    attachments=attachments)


def _read_content(kind: str, content: dict[str, Any]) -> tuple[str, tuple[Attachment, ...]] | Ignored:
    """The text and the files of a readable message's content."""
    if kind == "text":
        return str(content.get("text", "")), ()
    if kind == "post":
        keys = post_image_keys(content)
        if bad := [key for key in keys if not _is_key(key)]:
            return Ignored(f"malformed event: image key {_shown(bad[0])} is not valid")
        unique = tuple(dict.fromkeys(keys))[:MAX_ATTACHMENTS]
        return post_text(content), tuple(Attachment("image", key, "") for key in unique)
    if kind == "image":
        return _single("image", content.get("image_key"), "")
    name = content.get("file_name") if kind == "file" else AUDIO_NAME
    if not isinstance(name, str) or not name:
        return Ignored(f"malformed event: file name {_shown(name)} is not valid")
    return _single("file", content.get("file_key"), _storable(name[:FILE_NAME_CHARS]))


def _single(kind: str, key: object, name: str) -> tuple[str, tuple[Attachment, ...]] | Ignored:
    """A message that is one file (or image) and no text."""
    if not _is_key(key):
        return Ignored(f"malformed event: {kind} key {_shown(key)} is not valid")
    return "", (Attachment(kind, key, name),)


_BUTTON_NAME = re.compile(r"(allow|always|deny|answer)-([A-Za-z0-9_]{1,100})(?:-([0-9]{1,2})-([0-9]{1,2}))?")


def parse_card_action(event: Any) -> CardAction | Ignored:
    """A click on an approval card (the `event` of a `card.action.trigger` callback), or why it is not one."""
    if not isinstance(event, dict):
        return Ignored("malformed card action: not an object")
    action, operator, context = (_object(event.get(name)) for name in ("action", "operator", "context"))
    value = _object(action.get("value")) or _named_value(action.get("name"))
    key, choice, operator_id = value.get("approval"), value.get("choice"), operator.get("open_id")
    chat_id, message_id = context.get("open_chat_id"), context.get("open_message_id")
    if action.get("tag") != "button":
        return Ignored(f"malformed card action: not a button ({_shown(action.get('tag'))})")
    if not _is_token(key):
        return Ignored(f"malformed card action: no approval key ({_shown(key)})")
    if choice not in CHOICES:
        return Ignored(f"malformed card action: choice {_shown(choice)} is not one of {', '.join(CHOICES)}")
    if not is_open_id(operator_id):
        return Ignored(f"malformed card action: operator {_shown(operator_id)} is not an open id")
    if not is_valid_chat_id(chat_id) or not _is_token(message_id):
        return Ignored(f"malformed card action: chat {_shown(chat_id)} or message {_shown(message_id)} not valid")
    picked = _picked(value) if choice == "answer" else (None, None)
    if picked is None:
        return Ignored("malformed card action: question and option must both be small non-negative numbers")
    text = _object(action.get("form_value")).get("text", "")
    if not isinstance(text, str):
        return Ignored("malformed card action: the text field is not text")
    return CardAction(key=key, choice=choice, operator_id=operator_id, chat_id=chat_id, message_id=message_id,
                      text=_storable(text[:FORM_TEXT_CHARS]), question=picked[0], option=picked[1])


def _named_value(name: object) -> dict[str, Any]:
    """The value a button's name carries (feishu_render.button_name), for a click that came without its value."""
    match = _BUTTON_NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        return {}
    value: dict[str, Any] = {"choice": match[1], "approval": match[2]}
    if match[3] is not None:
        value.update(question=int(match[3]), option=int(match[4]))
    return value


def is_open_id(value: object) -> bool:
    """A Feishu user's open id (`ou_…`): safe to put in an `<at id=…>` mention, in a log, in the store."""
    return isinstance(value, str) and _OPEN_ID.fullmatch(value) is not None


def _is_token(value: object) -> bool:
    return isinstance(value, str) and _TOKEN.fullmatch(value) is not None


def _is_key(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and _KEY.fullmatch(value) is not None


def is_resource(message_id: str, attachment: Attachment) -> bool:
    """Whether a message id and an attachment can go into a resource URL as they are (they come back from the store,
    so they are checked again where they are used)."""
    return _is_token(message_id) and attachment.kind in ("image", "file") and _is_key(attachment.key)


def _picked(value: dict[str, Any]) -> tuple[int | None, int | None] | None:
    """(question, option) of an option's button, (None, None) for the typed answer's; None when malformed."""
    question, option = value.get("question"), value.get("option")
    if question is None and option is None:
        return None, None
    if all(type(n) is int and 0 <= n <= MAX_INDEX for n in (question, option)):  # not bool, not float
        return question, option
    return None


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _shown(value: Any) -> str:
    """A hostile value, short, for a log line."""
    return repr(value if isinstance(value, str | int | None) else type(value).__name__)[:80]


def _storable(text: str) -> str:
    """Lone surrogates (valid JSON escapes, not valid UTF-8) would fail every store write and every send."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _thread_id(message: dict[str, Any]) -> str:
    """The topic the message is in: its thread_id (a topic's first message may have no root_id), when it has the
    shape of one; anything else is taken as no topic (it becomes a store key and a session's)."""
    thread_id = message.get("thread_id")
    return thread_id if isinstance(thread_id, str) and _THREAD_ID.fullmatch(thread_id) else ""


def post_text(content: dict[str, Any]) -> str:
    """The plain text of a rich-text (post) message: title, then each paragraph's text on its own line."""
    body = _post_body(content)
    lines = [str(body["title"])] if body.get("title") else []
    lines += ["".join(_element_text(element) for element in paragraph) for paragraph in _paragraphs(body)]
    return "\n".join(lines)


def post_image_keys(content: dict[str, Any]) -> list[object]:
    """The image_key of each image in a rich-text (post) message, in order, as they are (unchecked)."""
    return [element.get("image_key") for paragraph in _paragraphs(_post_body(content)) for element in paragraph
            if element.get("tag") == "img"]


def _post_body(content: dict[str, Any]) -> dict[str, Any]:
    if "content" not in content and len(content) == 1:  # some deliveries wrap it in a language key
        inner = next(iter(content.values()))
        return inner if isinstance(inner, dict) else {}
    return content


def _paragraphs(body: dict[str, Any]) -> list[list[dict[str, Any]]]:
    paragraphs = body.get("content")
    return [[element for element in paragraph if isinstance(element, dict)]
            for paragraph in (paragraphs if isinstance(paragraphs, list) else []) if isinstance(paragraph, list)]


def _element_text(element: dict[str, Any]) -> str:
    tag = element.get("tag")
    if tag == "at":
        return str(element.get("user_id") or element.get("key") or "")
    if tag in ("text", "a", "md", "code_block"):
        return str(element.get("text") or "")
    return ""


def replace_mentions(text: str, mentions: list[dict[str, Any]], bot_open_id: str) -> str:
    """Drop the bot's own mention from the prompt; other people's become @name."""
    for mention in mentions:
        key = mention.get("key")
        if not isinstance(key, str) or not key:
            continue
        text = text.replace(key, "" if _mentions_bot(mention, bot_open_id) else f"@{mention.get('name') or 'someone'}")
    return re.sub(r"[ \t]{2,}", " ", text)


def _mentions_bot(mention: dict[str, Any], bot_open_id: str) -> bool:
    ids = mention.get("id")
    return isinstance(ids, dict) and bool(bot_open_id) and ids.get("open_id") == bot_open_id
