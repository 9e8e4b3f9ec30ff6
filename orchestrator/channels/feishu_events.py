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
from typing import Any

from orchestrator.channels import CardAction, Incoming
from orchestrator.ids import is_valid_chat_id

READABLE_TYPES = ("text", "post")
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
    if not isinstance(message, dict) or not isinstance(sender, dict):
        return Ignored("malformed event: no message or sender")
    chat_id, message_id = message.get("chat_id"), message.get("message_id")
    if not isinstance(message_id, str) or not message_id:
        return Ignored("malformed event: no message_id")
    if not is_valid_chat_id(chat_id):
        return Ignored(f"malformed event: chat_id {str(chat_id)[:80]!r} is not valid")
    sender_ids = sender.get("sender_id")
    sender_id = str(sender_ids.get("open_id") or "") if isinstance(sender_ids, dict) else ""
    if sender.get("sender_type") != "user":
        return Ignored(f"sent by {sender.get('sender_type') or 'an unknown sender'}, not a user")
    if sender_id and sender_id == bot_open_id:
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
    raw_text = content.get("text", "") if kind == "text" else post_text(content)
    text = "\n".join(line.strip() for line in replace_mentions(str(raw_text), mentions, bot_open_id).splitlines())
    text = _storable(text.strip())
    return Incoming(chat_id=chat_id, message_id=message_id, sender_id=sender_id, text=text or "/help",
                    thread_id=_thread_id(message))


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
    if "content" not in content and len(content) == 1:  # some deliveries wrap it in a language key
        inner = next(iter(content.values()))
        content = inner if isinstance(inner, dict) else {}
    lines = [str(content["title"])] if content.get("title") else []
    paragraphs = content.get("content")
    for paragraph in paragraphs if isinstance(paragraphs, list) else []:
        if isinstance(paragraph, list):
            lines.append("".join(_element_text(element) for element in paragraph if isinstance(element, dict)))
    return "\n".join(lines)


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
