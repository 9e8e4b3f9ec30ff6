"""`im.message.receive_v1` events → messages for the service, or the reason one is ignored. Pure.

Works on the event as plain JSON (the `event` part of the v2 envelope), whichever way it arrived (the
long connection or the webhook), so malformed input is handled here and unit-tested without the SDK.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.channels import Incoming
from orchestrator.ids import is_valid_chat_id

READABLE_TYPES = ("text", "post")


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
        return Incoming(chat_id=chat_id, message_id=message_id, sender_id=sender_id, text="", kind=kind)
    try:
        content = json.loads(message.get("content") or "")
    except (TypeError, ValueError):
        return Ignored(f"malformed event: {kind} content is not JSON")
    if not isinstance(content, dict):
        return Ignored(f"malformed event: {kind} content is not an object")
    raw_text = content.get("text", "") if kind == "text" else post_text(content)
    text = "\n".join(line.strip() for line in replace_mentions(str(raw_text), mentions, bot_open_id).splitlines())
    # lone surrogates (valid JSON escapes, not valid UTF-8) would fail every store write and every send
    text = text.strip().encode("utf-8", "replace").decode("utf-8")
    return Incoming(chat_id=chat_id, message_id=message_id, sender_id=sender_id, text=text or "/help")


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
