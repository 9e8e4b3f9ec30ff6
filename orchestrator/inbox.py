"""Files that come with a message: fetched through the channel (bounded), named safely, and handed to the turn.

The orchestrator never writes into a chat's workspace (the agent owns it and can swap its folders for links): the
files go into root's input folder beside the turn's request (`turns.write_inbound`), and the agent host copies
them into `/workspace/inbox/<message>/` before it gives the CLI the message. The prompt says where each file is;
images also go with it as image blocks: as sent when they surely fit what the model takes, else scaled down (Pillow).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import unicodedata
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

from loguru import logger
from PIL import Image, ImageOps

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
# Any other image is decoded and scaled down: hostile input from chat users, decoded by root (those that fit are not
# decoded here at all). Only these formats are tried (no plugin that shells out, e.g. EPS to Ghostscript); an image
# over DECODE_PIXELS is refused once its header is read (a decompression bomb: a 100000x100000 PNG is a few kB),
# which makes Pillow's DecompressionBombWarning an error without a warnings filter (process-wide, not thread-safe);
# Pillow itself raises over twice that wherever it decodes. A truncated file is an error (LOAD_TRUNCATED_IMAGES
# stays False).
DECODE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
# A 7000x7000 RGBA PNG (49 MP) peaked at 450 MB (measured): the orchestrator's whole bound is ~300 MB, so 25 MP (a
# 6000x4000 photo or screenshot, about half that) is the most it decodes.
DECODE_PIXELS = 25_000_000
Image.MAX_IMAGE_PIXELS = DECODE_PIXELS
JPEG_QUALITY = 85
# One decoding thread, beside the event loop: it bounds the memory and CPU that images take. Measured here (2 cores,
# Pillow 13): a 30 MB 6000x4000 PNG scales down in 0.95 s, a 12 MP JPEG in 0.09 s (0.29 s without Image.draft),
# a 7000x7000 RGBA PNG in 2.7 s.
_DECODER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="images")
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


class Received(NamedTuple):
    """A file and the message it came with: Feishu serves it only under that message's id, which is not the id of
    the message it is answered with when a message of files only was merged into the sender's next one."""

    attachment: Attachment
    message_id: str


def attachments_of(message: MessageRecord) -> tuple[Received, ...]:
    """The message's files, in order; one stored without the message it came with came with this one."""
    return tuple(Received(Attachment(item["kind"], item["key"], item["name"]),
                          item.get("message_id", message.message_id))
                 for item in json.loads(message.attachments or "[]"))


def encode_attachments(attachments: tuple[Attachment, ...]) -> str:
    """A new message's files, for the store."""
    return _stored([_fields(a) for a in attachments])


def merged_attachments(messages: list[MessageRecord]) -> str:
    """The files of `messages`, in order, each with the message it came with: what the last of them holds once the
    others are merged into it."""
    return _stored([{**_fields(item.attachment), "message_id": item.message_id}
                    for message in messages for item in attachments_of(message)])


def _fields(attachment: Attachment) -> dict[str, str]:
    return {"kind": attachment.kind, "key": attachment.key, "name": attachment.name}


def _stored(items: list[dict[str, str]]) -> str:
    return json.dumps(items) if items else ""


async def prepare(message: MessageRecord, turn: str, limits: FileSettings, fetch: Fetch) -> Inbound:
    """The message's files fetched (each within limits.max_bytes, all within limits.message_bytes) and placed;
    AttachmentRefused, naming the file and the limit, when one cannot be had (nothing of the message is kept)."""
    contents: dict[str, bytes] = {}
    lines, images = [], []
    left, shown = limits.message_bytes, 0
    for number, (attachment, source) in enumerate(attachments_of(message), 1):
        label = attachment.name or f"image {number}"
        if left <= 0:
            raise AttachmentRefused(f"{label}: the files of one message are over the limit of "
                                    f"{disk.human(limits.message_bytes)}")
        try:
            data = await fetch(source, attachment, min(limits.max_bytes, left))
        except AttachmentRefused as exc:
            raise AttachmentRefused(f"{label}: {exc}") from exc
        left -= len(data)
        media = media_type(data)
        name = safe_name(attachment.name or f"image-{number}{media[1] if media else '.bin'}", contents)
        contents[name] = data
        where = f"{INBOX}/{message.message_id}/{name}"
        note = ""
        if attachment.kind == "image":
            block = await _block(data, media, message) if len(images) < IMAGE_BLOCKS else None
            if block is not None and shown + len(block.data) <= IMAGE_BLOCKS_BYTES:
                images.append({"type": "image", "source": {"type": "base64", "media_type": block.media,
                                                           "data": base64.b64encode(block.data).decode()}})
                shown += len(block.data)
                note = block.note
            else:
                note = ", not shown to you directly (too many, too large, or not an image that could be read): open " \
                       "the file"
        lines.append(f"- {where} ({attachment.kind}, {disk.human(len(data))}{note})")
    folder = turns.files_folder(turn)
    files = tuple((f"{folder}/{name}", f"{INBOX}/{message.message_id}/{name}") for name in contents)
    said = message.text or "(The user sent only these files.)"
    text = f"{said}\n\nFiles sent with this message, saved in your workspace:\n" + "\n".join(lines) if lines \
        else message.text
    return Inbound(text, contents, files, tuple(images))


@dataclass(frozen=True)
class _Block:
    """An image as it goes to the model."""

    media: str
    data: bytes
    note: str  # what the prompt says of it


async def _block(data: bytes, media: tuple[str, str] | None, message: MessageRecord) -> _Block | None:
    """The image as sent when it surely fits, else scaled down in the decoding thread; None when it cannot be read
    (logged: the image is then a file only)."""
    if _fits(data, media):
        assert media is not None
        return _Block(media[0], data, ", shown to you with this message")
    try:
        return await asyncio.get_running_loop().run_in_executor(_DECODER, _scaled, data)
    except Exception as exc:  # hostile input: Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error…
        logger.bind(chat_id=message.chat_id, message_id=message.message_id).warning(
            f"an image ({disk.human(len(data))}) could not be scaled down, sent as a file only: "
            f"{type(exc).__name__}: {exc}")
        return None


def _scaled(data: bytes) -> _Block:
    """The image decoded (its first frame) and re-encoded to fit a block: its longer side at most IMAGE_BLOCK_PIXELS,
    PNG when it was not a JPEG and that fits IMAGE_BLOCK_BYTES, else JPEG (transparency on white), smaller until it
    fits. Raises whatever Pillow raises for a file it cannot or will not decode."""
    with Image.open(io.BytesIO(data), formats=DECODE_FORMATS) as image:
        if image.width * image.height > DECODE_PIXELS:
            raise ValueError(f"{image.width}x{image.height} is over the limit of {DECODE_PIXELS} pixels")
        original, lossy = image.size, image.format == "JPEG"
        image.draft(None, _within(image.size, IMAGE_BLOCK_PIXELS))  # a JPEG decodes at 1/2, 1/4 or 1/8 the size
        mode = "RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB"
        picture = image if image.mode == mode else image.convert(mode)  # before resizing: a palette has no filter
        picture.thumbnail((IMAGE_BLOCK_PIXELS, IMAGE_BLOCK_PIXELS))
        ImageOps.exif_transpose(picture, in_place=True)  # a phone's photo stands as it was taken: EXIF is not kept
        encoded, media = _encoded(picture, lossy)
        while len(encoded) > IMAGE_BLOCK_BYTES and max(picture.size) > 1:
            picture.thumbnail(_within(picture.size, max(picture.size) * 3 // 4))
            encoded, media = _encoded(picture, lossy=True)
    if len(encoded) > IMAGE_BLOCK_BYTES:
        raise ValueError(f"{len(encoded)} bytes at 1x1")
    smaller = picture.width * picture.height < original[0] * original[1]
    note = f", shown to you scaled down to {picture.width}x{picture.height}" if smaller else \
        f", shown to you with this message as {media.removeprefix('image/').upper()}"
    return _Block(media, encoded, note)


def _within(size: tuple[int, int], longest: int) -> tuple[int, int]:
    """`size` scaled so that its longer side is at most `longest`, its aspect kept."""
    scale = min(1.0, longest / max(size))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _encoded(picture: Image.Image, lossy: bool) -> tuple[bytes, str]:
    """PNG unless `lossy` or the PNG is over IMAGE_BLOCK_BYTES, then JPEG; (bytes, media type)."""
    out = io.BytesIO()
    if not lossy:
        picture.save(out, "PNG")
        if out.tell() <= IMAGE_BLOCK_BYTES:
            return out.getvalue(), "image/png"
        out = io.BytesIO()
    flat = picture
    if picture.mode == "RGBA":
        flat = Image.new("RGB", picture.size, "white")
        flat.paste(picture, mask=picture.getchannel("A"))
    flat.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue(), "image/jpeg"


def _fits(data: bytes, media: tuple[str, str] | None) -> bool:
    """Whether an image may go to the model as it is: a kind it takes, within IMAGE_BLOCK_BYTES, and its size read
    from its header within IMAGE_BLOCK_PIXELS."""
    if media is None or len(data) > IMAGE_BLOCK_BYTES:
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
    visible = "".join("_" if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") else ch for ch in last)
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
