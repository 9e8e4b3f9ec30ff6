"""Files that come with a message: fetched through the channel (bounded), named safely, and handed to the turn.

The orchestrator never writes into a chat's workspace (the agent owns it and can swap its folders for links): the
files go into root's input folder beside the turn's request (`turns.write_inbound`), and the agent host copies
them into `/workspace/inbox/<message>/` before it gives the CLI the message. The prompt says where each file is;
images small enough for the model also go with it as image blocks.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from orchestrator import disk, turns
from orchestrator.channels import Attachment, AttachmentRefused
from orchestrator.config import FileSettings
from orchestrator.store import MessageRecord

INBOX = "inbox"
NAME_BYTES = 100  # of a file's name in the workspace (its extension kept)
# The Messages API takes an image of at most 5 MB (its base64 is what is sent); a bigger one goes as a file only.
IMAGE_BLOCK_BYTES = 3_750_000
_MEDIA_TYPES = ((b"\x89PNG\r\n\x1a\n", "image/png", ".png"), (b"\xff\xd8\xff", "image/jpeg", ".jpg"),
                (b"GIF87a", "image/gif", ".gif"), (b"GIF89a", "image/gif", ".gif"))
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]+")

Fetch = Callable[[str, Attachment, int], Awaitable[bytes]]


@dataclass(frozen=True)
class Inbound:
    """What a message's files make of its turn."""

    text: str  # the prompt: what the user wrote, and where each file is
    contents: dict[str, bytes]  # by safe name: for turns.write_inbound
    files: tuple[tuple[str, str], ...]  # (under /input, under /workspace): for the agent host to copy
    images: tuple[dict, ...]  # image content blocks sent with the text


def attachments_of(message: MessageRecord) -> tuple[Attachment, ...]:
    raw = json.loads(message.attachments or "[]")
    return tuple(Attachment(**item) for item in raw)


def encode_attachments(attachments: tuple[Attachment, ...]) -> str:
    return json.dumps([{"kind": a.kind, "key": a.key, "name": a.name} for a in attachments]) if attachments else ""


async def prepare(message: MessageRecord, turn: str, limits: FileSettings, fetch: Fetch) -> Inbound:
    """The message's files fetched (each within limits.max_bytes, all within limits.message_bytes) and placed;
    AttachmentRefused, naming the file and the limit, when one cannot be had (nothing of the message is kept)."""
    contents: dict[str, bytes] = {}
    lines, images = [], []
    left = limits.message_bytes
    for number, attachment in enumerate(attachments_of(message), 1):
        label = attachment.name or f"image {number}"
        try:
            data = await fetch(message.message_id, attachment, min(limits.max_bytes, left))
        except AttachmentRefused as exc:
            raise AttachmentRefused(f"{label}: {exc}") from exc
        left -= len(data)
        media = media_type(data)
        name = safe_name(attachment.name or f"image-{number}{media[1] if media else '.bin'}", contents)
        contents[name] = data
        where = f"{INBOX}/{message.message_id}/{name}"
        note = ""
        if attachment.kind == "image" and media and len(data) <= IMAGE_BLOCK_BYTES:
            images.append({"type": "image", "source": {"type": "base64", "media_type": media[0],
                                                       "data": base64.b64encode(data).decode()}})
            note = ", shown to you with this message"
        elif attachment.kind == "image":
            note = ", not shown to you directly (too large or not PNG, JPEG or GIF): open the file"
        lines.append(f"- {where} ({attachment.kind}, {disk.human(len(data))}{note})")
    folder = turns.files_folder(turn)
    files = tuple((f"{folder}/{name}", f"{INBOX}/{message.message_id}/{name}") for name in contents)
    said = message.text or "(The user sent only these files.)"
    text = f"{said}\n\nFiles sent with this message, saved in your workspace:\n" + "\n".join(lines) if lines \
        else message.text
    return Inbound(text, contents, files, tuple(images))


def media_type(data: bytes) -> tuple[str, str] | None:
    """(media type, extension) of an image the model takes, by its first bytes; None for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp", ".webp"
    return next(((media, extension) for magic, media, extension in _MEDIA_TYPES if data.startswith(magic)), None)


def safe_name(name: str, taken: dict[str, bytes] | set[str]) -> str:
    """A file name that is safe in a folder and a prompt: its last part only, no control characters or path
    separators, no leading dot or dash (a hidden file, an option), at most NAME_BYTES bytes (its extension kept),
    and not one of `taken` ("name (2).ext" then)."""
    base = _UNSAFE.sub("_", name.replace("\\", "/").rsplit("/", 1)[-1]).strip().lstrip(".-").strip() or "file"
    stem, dot, extension = base.rpartition(".")
    if not stem:
        stem, dot, extension = base, "", ""
    extension = _cut(extension, 16)
    stem = _cut(stem, NAME_BYTES - len((dot + extension).encode()) - 4)
    candidate, number = f"{stem}{dot}{extension}", 1
    while candidate in taken:
        number += 1
        candidate = f"{stem} ({number}){dot}{extension}"
    return candidate


def _cut(text: str, most: int) -> str:
    return text.encode()[:max(1, most)].decode(errors="ignore")
