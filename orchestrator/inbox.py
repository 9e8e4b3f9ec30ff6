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
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from orchestrator import disk, turns
from orchestrator.channels import Attachment, AttachmentRefused
from orchestrator.config import FileSettings
from orchestrator.store import MessageRecord

INBOX = "inbox"
NAME_BYTES = 100  # of a file's name in the workspace (its extension kept)
# What goes to the model as image blocks. The Messages API refuses an image over 5 MB (base64) or 8000 px a side
# (2000 px when a request holds many), and the CLI keeps a refused message in the session, so every later turn of
# the chat would fail the same way: only images well inside those bounds go as blocks, the rest as files only.
IMAGE_BLOCK_BYTES = 3_750_000
IMAGE_BLOCK_PIXELS = 2000  # a side
IMAGE_BLOCKS = 5  # per message
IMAGE_BLOCKS_BYTES = 10 * 1024**2  # all of them together (the gateway takes 32 MB of request)
_MEDIA_TYPES = ((b"\x89PNG\r\n\x1a\n", "image/png", ".png"), (b"\xff\xd8\xff", "image/jpeg", ".jpg"),
                (b"GIF87a", "image/gif", ".gif"), (b"GIF89a", "image/gif", ".gif"))
_UNSAFE = re.compile(r"[/\\:*?\"<>|]+")
_LEADING = re.compile(r"^[\s.\-]+")

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
    left, shown = limits.message_bytes, 0
    for number, attachment in enumerate(attachments_of(message), 1):
        label = attachment.name or f"image {number}"
        if left <= 0:
            raise AttachmentRefused(f"{label}: the files of one message are over the limit of "
                                    f"{disk.human(limits.message_bytes)}")
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
        if attachment.kind == "image" and _fits(data, media, len(images), shown):
            assert media is not None
            images.append({"type": "image", "source": {"type": "base64", "media_type": media[0],
                                                       "data": base64.b64encode(data).decode()}})
            shown += len(data)
            note = ", shown to you with this message"
        elif attachment.kind == "image":
            note = (", not shown to you directly (too large, too many, or not PNG, JPEG, GIF or WebP): open the "
                    "file")
        lines.append(f"- {where} ({attachment.kind}, {disk.human(len(data))}{note})")
    folder = turns.files_folder(turn)
    files = tuple((f"{folder}/{name}", f"{INBOX}/{message.message_id}/{name}") for name in contents)
    said = message.text or "(The user sent only these files.)"
    text = f"{said}\n\nFiles sent with this message, saved in your workspace:\n" + "\n".join(lines) if lines \
        else message.text
    return Inbound(text, contents, files, tuple(images))


def _fits(data: bytes, media: tuple[str, str] | None, blocks: int, shown: int) -> bool:
    """Whether an image may go to the model as a block: a kind it takes, its size read from its header and within
    IMAGE_BLOCK_PIXELS, and within the message's count and bytes of blocks."""
    if media is None or len(data) > IMAGE_BLOCK_BYTES or blocks >= IMAGE_BLOCKS:
        return False
    if shown + len(data) > IMAGE_BLOCKS_BYTES:
        return False
    size = image_size(data)
    return size is not None and 0 < size[0] <= IMAGE_BLOCK_PIXELS and 0 < size[1] <= IMAGE_BLOCK_PIXELS


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's, GIF's, WebP's or JPEG's header; None when it cannot be read (then the image is
    not sent as a block: a corrupt one would be refused by the API, and kept in the session)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8 " and len(data) >= 30:
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """The frame size from the first SOF marker, walking the segments (bounded: a hostile file cannot loop)."""
    at = 2
    while at + 9 <= len(data):
        if data[at] != 0xFF:
            return None
        marker, length = data[at + 1], int.from_bytes(data[at + 2:at + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(data[at + 7:at + 9], "big"), int.from_bytes(data[at + 5:at + 7], "big")
        if length < 2:
            return None
        at += 2 + length
    return None


def media_type(data: bytes) -> tuple[str, str] | None:
    """(media type, extension) of an image the model takes, by its first bytes; None for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp", ".webp"
    return next(((media, extension) for magic, media, extension in _MEDIA_TYPES if data.startswith(magic)), None)


def safe_name(name: str, taken: dict[str, bytes] | set[str]) -> str:
    """A file name that is safe in a folder and a prompt: its last part only, no control characters or path
    separators, no leading dot or dash (a hidden file, an option), at most NAME_BYTES bytes (its extension kept),
    and not one of `taken` ("name (2).ext" then)."""
    last = name.replace("\\", "/").rsplit("/", 1)[-1]
    visible = "".join("_" if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch for ch in last)
    base = _LEADING.sub("", _UNSAFE.sub("_", visible)).strip() or "file"
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
